// Value checks of device index tensors (sorted ascending, unique, in range), so that an
// out-of-range index never reaches memory and every bad index raises before any write.
//
// The choice, and its cost: a device kernel checks "non-negative and strictly increasing" and
// reads the last (largest) element; one 16-byte-per-tensor device-to-host copy brings those
// facts back (a host sync), and the range check is then `last < limit` on the host. Facts are
// cached per indexed memory (data pointer, numel, dtype; the storage held by a weak reference
// so that its address cannot be reused, plus the version counter, which views share with
// their base): the sparse policy passes fresh slices of the same index storage every call,
// so only the first call after they change checks and syncs, and a call with cached facts
// can be captured into a CUDA graph (one that needs a check refuses capture, naming the fix:
// a warm-up call before capturing).
//
// What the cache trusts: the version counter. An in-place change through torch bumps it and
// re-checks; writes that bypass it are not seen: through `.data` (a tensor with its own
// counter), DLPack / __cuda_array_inter__ consumers (CuPy, Numba, JAX), raw pointers, or
// other processes. For those, NTO_EXT_INDEX_CHECK=always checks every call (a host sync
// each); the kernels' own check at use (below) still keeps any index from reaching memory
// out of range either way. Inference tensors have no version counter: never cached.
// A replayed CUDA graph runs no host code at all: its indices are those checked at capture.
// When a tensor is bad, its error is rebuilt on the host from a copy by the CPU check
// (csrc/cpu/index_checks.h), so the words are those of every backend.
//
// Checked before is not checked at use: between this check (or its cached facts) and the
// kernel another thread may change an index (a torch write queued on the stream in between,
// or a raw write). So the kernels also check each index where they read it (one compare,
// in registers) and never dereference one out of range: they skip that position and the
// first such one is noted in a process-wide record in mapped pinned host memory
// (DeviceIndexFault below). Raising right after the kernel would need a host sync every
// call, the very cost the cache avoids; so the record is read, without a sync, at the start
// of the next masked_adamw_ / masked_adamw_int8_ / gather_accumulate_ call on CUDA, which
// raises the IndexError (naming the op, tensor and position that faulted) before it changes
// anything.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace nto {
namespace cuda {

// --------------------------------------------------------------- indices changed at use

enum FaultOp : int64_t { kFaultAdamW = 1, kFaultGather = 2, kFaultAdamWInt8 = 3 };

struct DeviceIndexFault {
  unsigned long long state;  // 0 empty, 1 being written, 2 complete
  int64_t op;                // FaultOp
  int64_t list;              // i of indices[i]
  int64_t pos;               // position in indices[i]
  int64_t value;             // the index as the kernel read it
  int64_t limit;             // the size it had to be below
};

// The record's device address for the current device (allocated on first use).
DeviceIndexFault* fault_record();

// Raises the IndexError of a fault an earlier launch recorded (and clears it); no-op when
// there is none. Reads pinned host memory: no sync.
void raise_recorded_fault();

// Device side: the first fault wins (later ones, and faults of later launches until the
// record is read, are dropped: one error is reported).
__device__ __forceinline__ void record_fault(DeviceIndexFault* f, int64_t op, int64_t list,
                                             int64_t pos, int64_t value, int64_t limit) {
  if (atomicCAS(&f->state, 0ull, 1ull) != 0ull) return;
  f->op = op;
  f->list = list;
  f->pos = pos;
  f->value = value;
  f->limit = limit;
  __threadfence_system();  // the fields are visible to the host before the state says so
  *reinterpret_cast<volatile unsigned long long*>(&f->state) = 2ull;
}

// Index x is usable for a tensor of n elements: x < 0 wraps to a huge unsigned value.
__device__ __forceinline__ bool index_in_range(int64_t x, int64_t n) {
  return static_cast<uint64_t>(x) < static_cast<uint64_t>(n);
}

// ------------------------------------------------------------------ checks before launch

struct IndexFacts {
  bool ok;       // every element >= 0 and strictly greater than the one before
  int64_t last;  // the last (so the largest, when ok) element; -1 for an empty tensor
};

struct IndexRef {
  const at::Tensor* t;  // 1-D int32/int64 CUDA tensor, metadata already checked
  const char* what;     // its list ("indices") and position there, as errors name it
  size_t list;
};

// Facts of each tensor (all on one device). At most one kernel launch and one host sync, and
// none when all are cached. `op` names the op in errors.
std::vector<IndexFacts> index_facts(const char* op, const std::vector<IndexRef>& idx);

// Raises the reference's IndexError / ValueError for `what[i]` (limit < 0: no upper bound,
// as the reference's limit=None); `target` names the list indexed ("params": params[i]).
// Reads the tensor on the host: the error path only.
[[noreturn]] void raise_index_error(const char* op, const char* what, size_t i,
                                    const at::Tensor& idx, int64_t limit, const char* target);

inline void check_index_values(const char* op, const char* what, size_t i, const at::Tensor& idx,
                               const IndexFacts& facts, int64_t limit, const char* target) {
  if (facts.ok && (limit < 0 || facts.last < limit)) return;
  raise_index_error(op, what, i, idx, limit, target);
}

}  // namespace cuda
}  // namespace nto
