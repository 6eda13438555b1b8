// gather_accumulate_ on CPU: compact[i] += dense[i].view(-1)[indices[i]] (fp32, one rounding
// per add), the sparse policy's gradient compaction. Indices are checked (sorted, unique,
// in range) before any read through them, and each again where it is read (another thread
// may change them meanwhile: index_fault.h); at::parallel_for over (tensor, chunk) items.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "index_checks.h"
#include "work_items.h"

namespace nto {
namespace {

// The index is read once and checked where it is used (another thread may have changed it
// since the op's check: index_fault.h); an out-of-range one is skipped and noted. The check
// is a compare and a well-predicted branch next to a scattered load.
template <typename D, typename I>
void gather_add(const D* dense, int64_t limit, const I* idx, float* out, int64_t n,
                IndexFault* fault) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t k = static_cast<int64_t>(idx[j]);
    if (__builtin_expect(in_range(k, limit), 1))
      out[j] += static_cast<float>(dense[k]);
    else
      fault->note(j, k);
  }
}

template <typename D>
void gather_add_d(const D* dense, int64_t limit, const at::Tensor& idx, int64_t b, float* out,
                  int64_t n, IndexFault* fault) {
  if (idx.scalar_type() == at::kInt)
    gather_add(dense, limit, idx.const_data_ptr<int32_t>() + b, out, n, fault);
  else
    gather_add(dense, limit, idx.const_data_ptr<int64_t>() + b, out, n, fault);
}

void gather_accumulate_cpu(at::TensorList dense, at::TensorList indices, at::TensorList compact) {
  const char* op = "gather_accumulate_";
  check_gather_meta(dense, indices, compact);
  const size_t n = dense.size();
  std::vector<IndexList> lists;
  for (size_t i = 0; i < n; ++i)
    lists.push_back({&indices[i], dense[i].numel(), "indices", i, "dense"});
  if (!all_indices_ok(lists))
    for (const auto& l : lists) explain_first(op, l);

  std::vector<int64_t> sizes(n);
  for (size_t i = 0; i < n; ++i) sizes[i] = indices[i].numel();
  const auto items = make_work_items(sizes);
  std::vector<IndexFault> faults(items.size());  // indices changed after the checks
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = items[w];
      const at::Tensor& d = dense[it.tensor];
      const int64_t lim = d.numel();
      float* out = compact[it.tensor].data_ptr<float>() + it.begin;
      const int64_t len = it.end - it.begin;
      const at::Tensor& idx = indices[it.tensor];
      IndexFault* f = &faults[w];
      switch (d.scalar_type()) {
        case at::kFloat:
          gather_add_d(d.const_data_ptr<float>(), lim, idx, it.begin, out, len, f);
          break;
        case at::kBFloat16:
          gather_add_d(d.const_data_ptr<at::BFloat16>(), lim, idx, it.begin, out, len, f);
          break;
        default: gather_add_d(d.const_data_ptr<at::Half>(), lim, idx, it.begin, out, len, f);
      }
    }
  });
  raise_first_fault(
      op, items, faults, [&](int64_t t) { return dense[t].numel(); },
      [](int64_t t) { return "dense[" + std::to_string(t) + "]"; });
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CPU, m) { m.impl("gather_accumulate_", &gather_accumulate_cpu); }

}  // namespace nto
