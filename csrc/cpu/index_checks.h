// CPU checks of index *values*: sorted ascending, unique, in range. They read the indices
// (never the memory they point into) before any op writes, so a bad index never reaches
// memory. A parallel pass over (list, chunk) items finds whether anything is wrong; only
// then a serial pass names the first offending entry, as _reference.py does.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "../checks.h"
#include "index_fault.h"
#include "work_items.h"

namespace nto {

struct IndexList {
  const at::Tensor* idx;  // int32/int64, 1-D, contiguous (checked before)
  int64_t limit;          // positions must be < limit; -1: only >= 0
  const char* what;       // "indices"
  size_t i;               // list position
  const char* target;     // the list indexed: "params" names params[i] (i as above)
};

// Strictly ascending over [begin, end) (and across the boundary with begin - 1); the ends
// of the whole list are checked against the range: with strict order, that covers every
// entry. A plain compare loop on the index type, which the compiler vectorizes.
template <typename I>
inline bool chunk_ok_t(const I* x, int64_t n, int64_t begin, int64_t end, int64_t limit) {
  bool bad = false;
  for (int64_t j = std::max<int64_t>(begin, 1); j < end; ++j) bad |= x[j] <= x[j - 1];
  if (begin == 0 && end > 0) bad |= static_cast<int64_t>(x[0]) < 0;
  if (end == n && n > 0 && limit >= 0) bad |= static_cast<int64_t>(x[n - 1]) >= limit;
  return !bad;
}

inline bool chunk_ok(const at::Tensor& idx, int64_t begin, int64_t end, int64_t limit) {
  const int64_t n = idx.numel();
  if (idx.scalar_type() == at::kInt)
    return chunk_ok_t(idx.const_data_ptr<int32_t>(), n, begin, end, limit);
  return chunk_ok_t(idx.const_data_ptr<int64_t>(), n, begin, end, limit);
}

// Throws for the first violation in list l (range before order at the same entry).
inline void explain_first(const char* op, const IndexList& l) {
  const at::Tensor& idx = *l.idx;
  const int64_t n = idx.numel();
  auto at = [&](int64_t j) -> int64_t {
    return idx.scalar_type() == at::kInt ? idx.const_data_ptr<int32_t>()[j]
                                         : idx.const_data_ptr<int64_t>()[j];
  };
  for (int64_t j = 0; j < n; ++j) {
    const int64_t a = at(j);
    if (l.limit < 0) {
      TORCH_CHECK_INDEX(a >= 0, op, ": ", l.what, "[", l.i, "][", j, "] = ", a,
                        " is negative; positions are >= 0");
    } else {
      const std::string allowed = l.limit > 0 ? "0.." + std::to_string(l.limit - 1)
                                              : std::string("none (it is empty)");
      TORCH_CHECK_INDEX(a >= 0 && a < l.limit, op, ": ", l.what, "[", l.i, "][", j, "] = ", a,
                        " is out of range for ", l.target, "[", l.i, "] with ", l.limit,
                        " elements; allowed: ", allowed);
    }
    if (j > 0) {
      const int64_t b = at(j - 1);
      TORCH_CHECK_VALUE(a > b, op, ": ", l.what, "[", l.i, "][", j, "] = ", a, " follows ", b,
                        "; indices must be sorted ascending and unique (torch.unique sorts)");
    }
  }
}

// True when every list is valid; otherwise returns false (the caller then runs its checks
// serially in the reference's order, calling explain_first).
inline bool all_indices_ok(const std::vector<IndexList>& lists) {
  std::vector<int64_t> sizes;
  sizes.reserve(lists.size());
  for (const auto& l : lists) sizes.push_back(l.idx->numel());
  const auto items = make_work_items(sizes, int64_t(1) << 18);
  std::atomic<bool> ok{true};
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi && ok.load(std::memory_order_relaxed); ++w) {
      const auto& it = items[w];
      const auto& l = lists[it.tensor];
      if (!chunk_ok(*l.idx, it.begin, it.end, l.limit)) ok = false;
    }
  });
  return ok.load();
}

// The IndexError for an index that passed the op's check but was out of range when the
// kernel read it: another thread changed the index tensor during the call (see
// index_fault.h). `j` is the position in indices[i]; `value` what the kernel read there.
// `skipped`: what the kernel left undone for it.
[[noreturn]] inline void raise_changed_index(const char* op, size_t i, int64_t j, int64_t value,
                                             int64_t limit, const std::string& target,
                                             const char* skipped) {
  TORCH_CHECK_INDEX(false, op, ": indices[", i, "][", j, "] = ", value, " is out of range for ",
                    target, " with ", limit,
                    " elements when the kernel read it, after it had passed the op's index "
                    "check: another thread changed indices[", i,
                    "] during the call. ", skipped,
                    "; do not write to index tensors while an op uses them");
  __builtin_unreachable();
}

// The index tensor of each entry of an op's `Tensor?[] indices` (undefined: dense).
inline std::vector<at::Tensor> index_tensors(const c10::List<std::optional<at::Tensor>>& indices) {
  std::vector<at::Tensor> idx(indices.size());
  for (size_t i = 0; i < idx.size(); ++i) {
    std::optional<at::Tensor> o = indices.get(i);
    if (o.has_value() && o->defined()) idx[i] = *o;
  }
  return idx;
}

// The AdamW ops' value checks: each entry's positions (idx[i] into params[i]) and step
// count. Returns the steps read on the host; raises for the first offence in the
// reference's order (per entry: its indices, then its step) when there is one.
inline std::vector<double> checked_indices_and_steps(const char* op, at::TensorList params,
                                                     const std::vector<at::Tensor>& idx,
                                                     at::TensorList steps) {
  std::vector<IndexList> lists;
  for (size_t i = 0; i < idx.size(); ++i)
    if (idx[i].defined()) lists.push_back({&idx[i], params[i].numel(), "indices", i, "params"});
  bool ok = all_indices_ok(lists);
  std::vector<double> host(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) {
    host[i] = host_step(steps[i].is_cpu() ? steps[i] : steps[i].to(at::kCPU));
    ok = ok && host[i] >= 1.0;  // also refuses NaN
  }
  if (ok) return host;
  size_t li = 0;
  for (size_t i = 0; i < idx.size(); ++i) {  // something is wrong: name the first offence
    if (idx[i].defined()) explain_first(op, lists[li++]);
    checked_host_step(op, i, steps[i].is_cpu() ? steps[i] : steps[i].to(at::kCPU));
  }
  return host;
}

// After a pass over `items` with one IndexFault each: raises for the first fault in item
// order (the lowest tensor, then position), if any. limit(t), target(t): tensor t's size and
// name ("params[3]").
template <class Limit, class Target>
void raise_first_fault(const char* op, const std::vector<WorkItem>& items,
                       const std::vector<IndexFault>& faults, Limit&& limit, Target&& target,
                       const char* skipped = "That position was skipped (the in-range ones "
                                             "were updated)") {
  for (size_t w = 0; w < items.size(); ++w) {
    if (faults[w].at < 0) continue;
    const int64_t t = items[w].tensor;
    raise_changed_index(op, static_cast<size_t>(t), items[w].begin + faults[w].at,
                        faults[w].value, limit(t), target(t), skipped);
  }
}

}  // namespace nto
