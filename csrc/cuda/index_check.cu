// Device check of index tensors plus the per-tensor cache of its results (see
// index_check.cuh for the contract and the cost).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iterator>
#include <mutex>
#include <unordered_map>

#include "../cpu/index_checks.h"
#include "index_check.cuh"
#include "multi_tensor.cuh"

namespace nto {
namespace cuda {
namespace idxcheck {  // named: all files can share one TU (bench/cuda_syntax_check.sh)
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 1 << 16;

struct IdxMeta {
  static constexpr int kTensors = 96;
  static constexpr int kBlocks = 320;
  const void* ptr[kTensors];
  int64_t n[kTensors];
  int32_t out[kTensors];
  uint8_t is64[kTensors];
  uint8_t block_slot[kBlocks];
  int32_t block_chunk[kBlocks];
};

__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t j) {
  return is64 ? static_cast<const int64_t*>(p)[j] : static_cast<const int32_t*>(p)[j];
}

// facts[out] = 1 when a violation is seen (every writer stores the same 1: no race on the
// value), facts[m + out] = the last element.
__global__ void __launch_bounds__(kThreads) check_indices_kernel(IdxMeta meta, int64_t* facts,
                                                                 int64_t m) {
  const int slot = meta.block_slot[blockIdx.x];
  const int64_t n = meta.n[slot];
  const bool is64 = meta.is64[slot];
  const void* p = meta.ptr[slot];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  bool bad = false;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const int64_t x = load_index(p, is64, j);
    bad |= x < 0 || (j > 0 && x <= load_index(p, is64, j - 1));
    if (j == n - 1) facts[m + meta.out[slot]] = x;
  }
  if (bad) facts[meta.out[slot]] = 1;
}

// The cache is keyed on what the kernels read (data pointer, numel, dtype), not on the
// tensor object: callers slice their index tensors afresh on every call (the sparse policy's
// st["indices"][a:b]), and each slice is a new TensorImpl. An entry holds a weak reference
// to the storage, so an address freed and reused by another storage never matches, and the
// version counter, which views share with their base, so a torch write through any view of
// the storage makes every entry in it stale.
using WeakStorage = c10::weak_intrusive_ptr<c10::StorageImpl>;

struct Key {
  const void* data;
  int64_t numel;
  c10::ScalarType dtype;
  bool operator==(const Key& o) const {
    return data == o.data && numel == o.numel && dtype == o.dtype;
  }
};
struct KeyHash {
  size_t operator()(const Key& k) const {
    const size_t h = std::hash<const void*>()(k.data);
    return h ^ (std::hash<int64_t>()(k.numel) * 0x9E3779B97F4A7C15ull) ^
           static_cast<size_t>(k.dtype);
  }
};

struct Entry {
  WeakStorage storage;
  const c10::StorageImpl* impl;
  uint32_t version;
  int64_t last;
};

constexpr size_t kMaxEntries = 4096;
std::mutex cache_mu;
std::unordered_map<Key, Entry, KeyHash>& cache() {
  static auto* c = new std::unordered_map<Key, Entry, KeyHash>();  // never destroyed: safe to
  return *c;  // use from other static destructors at exit
}

// Inference tensors have no version counter, a tensor without storage nothing to hold.
bool cacheable(const at::Tensor& t) { return !t.is_inference() && t.has_storage(); }

Key key_of(const at::Tensor& t) { return Key{t.const_data_ptr(), t.numel(), t.scalar_type()}; }

bool lookup(const at::Tensor& t, int64_t* last) {
  if (!cacheable(t)) return false;
  std::lock_guard<std::mutex> g(cache_mu);
  auto& c = cache();
  auto it = c.find(key_of(t));
  if (it == c.end()) return false;
  const Entry& e = it->second;
  if (e.storage.expired()) {
    c.erase(it);
    return false;
  }
  if (e.impl != t.storage().unsafeGetStorageImpl() ||
      e.version != static_cast<uint32_t>(t._version()))
    return false;
  *last = e.last;
  return true;
}

void remember(const at::Tensor& t, int64_t last) {
  if (!cacheable(t)) return;
  std::lock_guard<std::mutex> g(cache_mu);
  auto& c = cache();
  if (c.size() >= kMaxEntries) {
    for (auto it = c.begin(); it != c.end();)
      it = it->second.storage.expired() ? c.erase(it) : std::next(it);
    if (c.size() >= kMaxEntries) c.clear();
  }
  c.insert_or_assign(key_of(t),
                     Entry{t.storage().getWeakStorageImpl(), t.storage().unsafeGetStorageImpl(),
                           static_cast<uint32_t>(t._version()), last});
}

// NTO_EXT_INDEX_CHECK: "cached" (default, or unset) or "always". Read on every call, so it
// can be switched at run time.
bool always_check() {
  const char* v = std::getenv("NTO_EXT_INDEX_CHECK");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "cached") == 0) return false;
  if (std::strcmp(v, "always") == 0) return true;
  TORCH_CHECK_VALUE(false, "NTO_EXT_INDEX_CHECK=", v,
                    "; allowed: cached (the default: an index tensor is checked once per "
                    "version) or always (checked on every call, a host sync each time); set "
                    "one of them or unset it");
  return false;
}

// A check needs a host sync, which a stream being captured into a CUDA graph forbids (the
// capture would fail inside torch with a message that names no index): name the fix.
void refuse_during_capture(const char* op, const char* what, size_t i, cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  TORCH_CHECK(status == cudaStreamCaptureStatusNone, op, ": ", what, "[", i,
              "] must be checked on the device (first sight, changed since, or "
              "NTO_EXT_INDEX_CHECK=always), which needs a host sync, but the stream is "
              "being captured into a CUDA graph; run the same call once before the capture "
              "(a warm-up step) so its indices' checks are cached, and leave "
              "NTO_EXT_INDEX_CHECK unset");
}

}  // namespace
}  // namespace idxcheck

std::vector<IndexFacts> index_facts(const char* op, const std::vector<IndexRef>& idx) {
  using namespace idxcheck;
  std::vector<IndexFacts> facts(idx.size(), IndexFacts{true, -1});
  std::vector<int64_t> todo;  // positions in idx that need the device check
  const bool always = always_check();
  for (size_t i = 0; i < idx.size(); ++i) {
    if (idx[i].t->numel() == 0) continue;
    int64_t last;
    if (!always && lookup(*idx[i].t, &last))
      facts[i].last = last;
    else
      todo.push_back(static_cast<int64_t>(i));
  }
  if (todo.empty()) return facts;

  const int64_t m = static_cast<int64_t>(todo.size());
  const at::Tensor& first = *idx[todo[0]].t;
  c10::cuda::CUDAGuard guard(first.device());
  const auto stream = current_stream();
  refuse_during_capture(op, idx[todo[0]].what, idx[todo[0]].list, stream);
  auto out = at::zeros({2 * m}, first.options().dtype(at::kLong));
  std::vector<int64_t> lengths(todo.size());
  for (size_t k = 0; k < todo.size(); ++k) lengths[k] = idx[todo[k]].t->numel();
  multi_tensor_launch<IdxMeta>(
      lengths, kChunk,
      [&](IdxMeta& meta, int slot, int64_t k) {
        const at::Tensor& t = *idx[todo[k]].t;
        meta.ptr[slot] = t.const_data_ptr();
        meta.n[slot] = t.numel();
        meta.out[slot] = static_cast<int32_t>(k);
        meta.is64[slot] = t.scalar_type() == at::kLong;
      },
      [&](const IdxMeta& meta, int blocks) {
        check_indices_kernel<<<blocks, kThreads, 0, stream>>>(meta, out.mutable_data_ptr<int64_t>(),
                                                              m);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  const auto host = out.cpu();  // the one host sync
  const int64_t* h = host.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < m; ++k) {
    IndexFacts& f = facts[todo[k]];
    f.ok = h[k] == 0;
    f.last = h[m + k];
    if (f.ok) remember(*idx[todo[k]].t, f.last);
  }
  return facts;
}

void raise_index_error(const char* op, const char* what, size_t i, const at::Tensor& idx,
                       int64_t limit, const char* target) {
  // The CPU check names the offence (same words as every backend) from a host copy.
  const at::Tensor host = idx.cpu();
  explain_first(op, IndexList{&host, limit, what, i, target});
  // The device saw a bad index that the host copy no longer has: it changed in between.
  TORCH_CHECK_INDEX(false, op, ": ", what, "[", i,
                    "] failed the device index check, but a second read finds it valid: "
                    "another thread changed it during the call; do not write to index "
                    "tensors while an op uses them");
  __builtin_unreachable();
}

// ----------------------------------------------------------- indices changed at use

namespace idxfault {
namespace {
std::mutex mu;
std::atomic<DeviceIndexFault*> host_record{nullptr};  // mapped, portable pinned; never freed
constexpr int kMaxDevices = 64;
DeviceIndexFault* device_ptr[kMaxDevices] = {};
}  // namespace
}  // namespace idxfault

DeviceIndexFault* fault_record() {
  using namespace idxfault;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> g(mu);
  DeviceIndexFault* host = host_record.load();
  if (host == nullptr) {
    void* p = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&p, sizeof(DeviceIndexFault),
                                 cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(p, 0, sizeof(DeviceIndexFault));
    host = static_cast<DeviceIndexFault*>(p);
    host_record.store(host);
  }
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached && device_ptr[dev] != nullptr) return device_ptr[dev];
  void* d = nullptr;  // the same address under unified addressing; asked, not assumed
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&d, host, 0));
  if (cached) device_ptr[dev] = static_cast<DeviceIndexFault*>(d);
  return static_cast<DeviceIndexFault*>(d);
}

void raise_recorded_fault() {
  using namespace idxfault;
  DeviceIndexFault* r = host_record.load();
  if (r == nullptr) return;  // no kernel has had the record yet
  volatile DeviceIndexFault* v = r;
  if (v->state != 2ull) return;
  std::atomic_thread_fence(std::memory_order_acquire);
  const int64_t op = v->op, list = v->list, pos = v->pos, value = v->value, limit = v->limit;
  v->state = 0ull;  // cleared: a later fault is reported by a later call
  const bool gather = op == kFaultGather, int8 = op == kFaultAdamWInt8;
  TORCH_CHECK_INDEX(false,
                    gather ? "gather_accumulate_" : int8 ? "masked_adamw_int8_" : "masked_adamw_",
                    ": indices[", list, "][", pos, "] = ", value, " is out of range for ",
                    gather ? "dense[" : "params[", list, "] with ", limit,
                    " elements when the kernel read it, after it had passed the op's index "
                    "check: another thread changed indices[", list, "] during that call. ",
                    // 8-bit moments: a block's scales depend on all its positions
                    int8 ? "That position's quantization block was skipped (the other blocks "
                           "were updated)"
                         : "That position was skipped (the in-range ones were updated)",
                    "; do not write to index tensors while an op uses them. (On CUDA the "
                    "kernel runs after its call returns, so this is raised by the next "
                    "masked_adamw_, masked_adamw_int8_ or gather_accumulate_ call, which "
                    "changed nothing.)");
  __builtin_unreachable();
}

}  // namespace cuda
}  // namespace nto
