// gather_accumulate_ on CPU: compact[i] += dense[i].view(-1)[indices[i]] (fp32, one rounding
// per add), the sparse policy's gradient compaction. Indices are checked (sorted, unique,
// in range) before any read through them; then at::parallel_for over (tensor, chunk) items.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "index_checks.h"
#include "work_items.h"

namespace nto {
namespace {

template <typename D, typename I>
void gather_add(const D* dense, const I* idx, float* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] += static_cast<float>(dense[idx[j]]);
}

template <typename D>
void gather_add_d(const D* dense, const at::Tensor& idx, int64_t b, float* out, int64_t n) {
  if (idx.scalar_type() == at::kInt)
    gather_add(dense, idx.const_data_ptr<int32_t>() + b, out, n);
  else
    gather_add(dense, idx.const_data_ptr<int64_t>() + b, out, n);
}

void gather_accumulate_cpu(at::TensorList dense, at::TensorList indices, at::TensorList compact) {
  const char* op = "gather_accumulate_";
  check_gather_meta(dense, indices, compact);
  const size_t n = dense.size();
  std::vector<IndexList> lists;
  for (size_t i = 0; i < n; ++i)
    lists.push_back({&indices[i], dense[i].numel(), "indices", i,
                     "dense[" + std::to_string(i) + "]"});
  if (!all_indices_ok(lists))
    for (const auto& l : lists) explain_first(op, l);

  std::vector<int64_t> sizes(n);
  for (size_t i = 0; i < n; ++i) sizes[i] = indices[i].numel();
  const auto items = make_work_items(sizes);
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = items[w];
      const at::Tensor& d = dense[it.tensor];
      float* out = compact[it.tensor].data_ptr<float>() + it.begin;
      const int64_t len = it.end - it.begin;
      const at::Tensor& idx = indices[it.tensor];
      switch (d.scalar_type()) {
        case at::kFloat: gather_add_d(d.const_data_ptr<float>(), idx, it.begin, out, len); break;
        case at::kBFloat16:
          gather_add_d(d.const_data_ptr<at::BFloat16>(), idx, it.begin, out, len);
          break;
        default: gather_add_d(d.const_data_ptr<at::Half>(), idx, it.begin, out, len); break;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CPU, m) { m.impl("gather_accumulate_", &gather_accumulate_cpu); }

}  // namespace nto
