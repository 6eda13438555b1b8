// An index out of range when a kernel reads it. The ops check their indices (sorted, unique,
// in range) before any read through them, but they run with the GIL released: another
// thread may change an index tensor after the check. So the kernels read each index once,
// at its use, check it there (one unsigned compare, in the loop that reads it anyway), never
// dereference one that is out of range, note the first such position per work item, and the
// op raises after the pass (index_checks.h: raise_changed_index). Plain C++: the
// per-capability kernels (vec_kernels_impl.h) include it.
#pragma once
#include <cstdint>

namespace nto {

// Index x is usable for a tensor of n elements: x < 0 wraps to a huge unsigned value.
inline bool in_range(int64_t x, int64_t n) {
  return static_cast<uint64_t>(x) < static_cast<uint64_t>(n);
}

// The first out-of-range position a work item met (offset from the item's first position).
struct IndexFault {
  int64_t at = -1;    // -1: none
  int64_t value = 0;  // the index as the kernel read it
  void note(int64_t offset, int64_t v) {
    if (at < 0) at = offset, value = v;
  }
};

}  // namespace nto
