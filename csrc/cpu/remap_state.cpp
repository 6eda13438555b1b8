// remap_state on CPU: compact state moves from one sorted index set to another in one
// merge pass per (tensor, chunk of new positions): positions present in both sets carry
// their values (every row of the [..., L] state), new positions start at zero.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "index_checks.h"
#include "work_items.h"

namespace nto {
namespace {

// src[j - begin] = position in `old` of new[j], or -1: a merge from the lower bound of
// new[begin] (both lists sorted ascending, unique).
template <typename IO, typename IN>
void match(const IO* old, int64_t n_old, const IN* nw, int64_t begin, int64_t end,
           int64_t* src) {
  const int64_t first = static_cast<int64_t>(nw[begin]);
  int64_t o = std::partition_point(old, old + n_old, [&](IO a) { return (int64_t)a < first; }) -
              old;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t want = nw[j];
    while (o < n_old && (int64_t)old[o] < want) ++o;
    src[j - begin] = (o < n_old && (int64_t)old[o] == want) ? o : -1;
  }
}

void match_any(const at::Tensor& old, const at::Tensor& nw, int64_t b, int64_t e, int64_t* src) {
  const int64_t n_old = old.numel();
  const bool o32 = old.scalar_type() == at::kInt, n32 = nw.scalar_type() == at::kInt;
  if (o32 && n32)
    match(old.const_data_ptr<int32_t>(), n_old, nw.const_data_ptr<int32_t>(), b, e, src);
  else if (o32)
    match(old.const_data_ptr<int32_t>(), n_old, nw.const_data_ptr<int64_t>(), b, e, src);
  else if (n32)
    match(old.const_data_ptr<int64_t>(), n_old, nw.const_data_ptr<int32_t>(), b, e, src);
  else
    match(old.const_data_ptr<int64_t>(), n_old, nw.const_data_ptr<int64_t>(), b, e, src);
}

// Copy rows: values are carried bit for bit (W = element width), new positions are +0.
template <typename W>
void carry(const W* s, W* d, int64_t rows, int64_t l_old, int64_t l_new, int64_t b,
           const int64_t* src, int64_t len) {
  for (int64_t r = 0; r < rows; ++r) {
    const W* sr = s + r * l_old;
    W* dr = d + r * l_new + b;
    for (int64_t j = 0; j < len; ++j) dr[j] = src[j] >= 0 ? sr[src[j]] : W(0);
  }
}

std::vector<at::Tensor> remap_state_cpu(at::TensorList old_idx, at::TensorList new_idx,
                                        at::TensorList states) {
  const char* op = "remap_state";
  check_remap_meta(old_idx, new_idx, states);
  const size_t n = states.size();
  std::vector<IndexList> lists;
  for (size_t i = 0; i < n; ++i) {
    lists.push_back({&old_idx[i], -1, "old_indices", i, "positions"});
    lists.push_back({&new_idx[i], -1, "new_indices", i, "positions"});
  }
  if (!all_indices_ok(lists))
    for (const auto& l : lists) explain_first(op, l);

  std::vector<at::Tensor> out(n);
  std::vector<int64_t> sizes(n), rows(n);
  for (size_t i = 0; i < n; ++i) {
    auto shape = states[i].sizes().vec();
    rows[i] = 1;
    for (size_t d = 0; d + 1 < shape.size(); ++d) rows[i] *= shape[d];
    shape.back() = new_idx[i].numel();
    out[i] = at::empty(shape, states[i].options());
    sizes[i] = new_idx[i].numel();
  }
  const auto items = make_work_items(sizes, int64_t(1) << 14);
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    std::vector<int64_t> src;
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = items[w];
      const int64_t len = it.end - it.begin, t = it.tensor;
      src.resize(len);
      match_any(old_idx[t], new_idx[t], it.begin, it.end, src.data());
      const int64_t l_old = old_idx[t].numel(), l_new = sizes[t];
      if (states[t].element_size() == 4)
        carry(static_cast<const int32_t*>(states[t].const_data_ptr()),
              static_cast<int32_t*>(out[t].data_ptr()), rows[t],
              l_old, l_new, it.begin, src.data(), len);
      else
        carry(static_cast<const int16_t*>(states[t].const_data_ptr()),
              static_cast<int16_t*>(out[t].data_ptr()), rows[t], l_old, l_new, it.begin,
              src.data(), len);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CPU, m) { m.impl("remap_state", &remap_state_cpu); }

}  // namespace nto
