// Value checks of device index tensors (sorted ascending, unique, in range), so that an
// out-of-range index never reaches memory and every bad index raises before any write.
//
// The choice, and its cost: a device kernel checks "non-negative and strictly increasing" and
// reads the last (largest) element; one 16-byte-per-tensor device-to-host copy brings those
// facts back (a host sync), and the range check is then `last < limit` on the host. Facts are
// cached per tensor (keyed on the TensorImpl, held by a weak reference so its address cannot
// be reused, plus its version counter, data pointer, numel and dtype): the sparse policy
// passes the same index tensors every step, so only the first call after they change syncs.
// An in-place change through torch bumps the version and re-checks; writes that bypass torch
// (raw pointers) are not seen. Inference tensors have no version counter: never cached.
// When a tensor is bad, its error is rebuilt on the host from a copy by the CPU check
// (csrc/cpu/index_checks.h), so the words are those of every backend.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace nto {
namespace cuda {

struct IndexFacts {
  bool ok;       // every element >= 0 and strictly greater than the one before
  int64_t last;  // the last (so the largest, when ok) element; -1 for an empty tensor
};

// Facts of each tensor (1-D int32/int64 CUDA tensors on one device, metadata already
// checked). At most one kernel launch and one host sync, and none when all are cached.
std::vector<IndexFacts> index_facts(const std::vector<at::Tensor>& idx);

// Raises the reference's IndexError / ValueError for `what[i]` (limit < 0: no upper bound,
// as the reference's limit=None). Reads the tensor on the host: the error path only.
[[noreturn]] void raise_index_error(const char* op, const char* what, size_t i,
                                    const at::Tensor& idx, int64_t limit,
                                    const std::string& target);

inline void check_index_values(const char* op, const char* what, size_t i, const at::Tensor& idx,
                               const IndexFacts& facts, int64_t limit,
                               const std::string& target) {
  if (facts.ok && (limit < 0 || facts.last < limit)) return;
  raise_index_error(op, what, i, idx, limit, target);
}

}  // namespace cuda
}  // namespace nto
