// Shared pieces of the CUDA kernels: the multi-tensor launcher (tensor lists chunked into
// one grid, as PyTorch's / apex's multi_tensor_apply), aligned vector loads, block scans and
// reductions in a fixed order, and small dtype helpers.
//
// Headers are kept lean on purpose: c10/cuda only (ATen/cuda/CUDAContext.h pulls cuBLAS and
// cuSPARSE headers, which a minimal CUDA toolkit lacks and which no kernel here needs).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace nto {
namespace cuda {

// ------------------------------------------------------------------ multi-tensor launch
//
// A launch carries, by value in the kernel's parameter space (4 KiB on every CUDA version),
// a table of up to Meta::kTensors tensors ("slots") and, for each of up to Meta::kBlocks
// blocks, which slot and which chunk of it the block works on. A tensor that does not fit in
// the current launch continues in the next one. Each op defines its Meta with the per-slot
// arrays it needs plus these two block arrays:
//
//   uint8_t block_slot[kBlocks];  int32_t block_chunk[kBlocks];
template <class Meta, class Fill, class Launch>
void multi_tensor_launch(const std::vector<int64_t>& lengths, int64_t chunk, Fill&& fill,
                         Launch&& launch) {
  static_assert(sizeof(Meta) <= 3900, "kernel parameters are limited to 4 KiB");
  static_assert(Meta::kTensors <= 256, "block_slot is a uint8_t");
  Meta meta;
  int slots = 0, blocks = 0;
  for (size_t t = 0; t < lengths.size(); ++t) {
    if (lengths[t] <= 0) continue;
    fill(meta, slots, static_cast<int64_t>(t));
    ++slots;
    const int64_t nchunks = (lengths[t] + chunk - 1) / chunk;
    for (int64_t c = 0; c < nchunks; ++c) {
      meta.block_slot[blocks] = static_cast<uint8_t>(slots - 1);
      meta.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == nchunks - 1;
      if (blocks == Meta::kBlocks || (slots == Meta::kTensors && last_chunk)) {
        launch(meta, blocks);
        blocks = 0;
        if (last_chunk) {
          slots = 0;
        } else {  // the rest of tensor t goes on in slot 0 of the next launch
          fill(meta, 0, static_cast<int64_t>(t));
          slots = 1;
        }
      }
    }
  }
  if (blocks > 0) launch(meta, blocks);
}

// The part of its slot's tensor that this block works on: elements [begin, begin + len).
struct ChunkSpan {
  int64_t begin, len;
};
template <class Meta>
__device__ __forceinline__ ChunkSpan block_chunk_span(const Meta& meta, int slot,
                                                      int64_t chunk) {
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * chunk;
  const int64_t rest = meta.n[slot] - begin;
  return {begin, rest < chunk ? rest : chunk};
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int sm_count(const at::Device& dev) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev.index()));
  return n > 0 ? n : 1;
}

// ------------------------------------------------------------------------ vector loads

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int Bytes>
__device__ __forceinline__ bool aligned(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % Bytes) == 0;
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

// Loads V consecutive elements from x[e0..] as floats (one vector load when vec and all are
// below len); missing ones (past len) are NaN-free zeros flagged invalid by the caller.
template <typename T, int V>
__device__ __forceinline__ void load_floats(const T* x, int64_t e0, int64_t len, bool vec,
                                            float (&f)[V]) {
  if (vec && e0 + V <= len) {
    const Vec<T, V> w = *reinterpret_cast<const Vec<T, V>*>(x + e0);
#pragma unroll
    for (int e = 0; e < V; ++e) f[e] = to_float(w.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) f[e] = e0 + e < len ? to_float(x[e0 + e]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);  // c10::BFloat16 / c10::Half round to nearest even
}

// ------------------------------------------------------------- fixed-order block reductions
//
// Every reduction below combines values in an order fixed by the thread layout alone, so a
// result depends only on the data and the (constant) launch shape, never on timing.

// The larger of two values >= 0, NaN if either is NaN (torch.amax's propagation).
__device__ __forceinline__ float max_nan(float a, float b) {
  return a != a ? a : (b != b ? b : fmaxf(a, b));
}

// The largest of the warp's values (NaN if any is NaN), in every lane: the quantized
// formats' block abs-max (a warp per block).
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max_nan(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  return x;  // valid in lane 0
}

// Sum over the block, returned to every thread. smem: at least kThreads / 32 entries.
template <int kThreads, typename T>
__device__ T block_sum(T x, T* smem) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  T total = T(0);
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += smem[w];  // same order in every thread
  __syncthreads();  // smem may be reused right after
  return total;
}

// Exclusive prefix sum over the block (thread order); *total receives the block's sum.
template <int kThreads, typename T>
__device__ T block_exclusive_scan(T x, T* total, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T inc = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  if (lane == 31) smem[warp] = inc;
  __syncthreads();
  T before = T(0), sum = T(0);
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    if (w < warp) before += smem[w];
    sum += smem[w];
  }
  __syncthreads();
  *total = sum;
  return before + inc - x;
}

// Adds `count` to shared-memory bin `bin` for every lane of the warp at once: lanes with the
// same bin are merged first (one atomic per distinct bin), so runs of equal bins, common in
// exponent histograms, do not serialize. bin == kNoBin skips a lane. All 32 lanes must call.
// Integer counts: the result does not depend on the order of the adds.
constexpr uint32_t kNoBin = 0xffffffffu;
__device__ __forceinline__ void warp_hist_add(unsigned int* hist, uint32_t bin) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
  const unsigned peers = __match_any_sync(0xffffffffu, bin);
  const int lane = threadIdx.x & 31;
  if (bin != kNoBin && lane == __ffs(peers) - 1) atomicAdd(hist + bin, __popc(peers));
#else  // no __match_any_sync before Volta: one atomic per lane
  if (bin != kNoBin) atomicAdd(hist + bin, 1u);
#endif
}

// ---------------------------------------------------------------------------- host side

inline int dtype_code(c10::ScalarType t) {  // 0 fp32, 1 bf16, 2 fp16
  return t == at::kFloat ? 0 : (t == at::kBFloat16 ? 1 : 2);
}

// The tensors' chunks in one numbering, for per-chunk workspaces (tensor i owns chunks
// base[i] .. base[i] + count[i] - 1 of `total`), and the tensors' positions grouped by
// dtype_code (one kernel instantiation per group).
struct ChunkTable {
  std::vector<int64_t> base, count, by_dtype[3];
  int64_t total = 0;
};
inline ChunkTable chunk_table(at::TensorList ts, int64_t chunk) {
  ChunkTable t;
  for (size_t i = 0; i < ts.size(); ++i) {
    t.base.push_back(t.total);
    t.count.push_back((ts[i].numel() + chunk - 1) / chunk);
    t.total += t.count.back();
    t.by_dtype[dtype_code(ts[i].scalar_type())].push_back(static_cast<int64_t>(i));
  }
  return t;
}

}  // namespace cuda
}  // namespace nto
