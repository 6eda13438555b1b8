// param_stats on CUDA: numel, sum of squares (double), abs-max and the 256-bin histogram of
// the fp32 exponent field of |x|, in one pass over memory.
//
// Deterministic without floating-point atomics: pass 1 gives every (tensor, chunk) block its
// own partial (sum, max, histogram) in a workspace; pass 2, one block per tensor, combines
// the partials in chunk order with a fixed-shape tree. The results depend on the data only
// (not on timing or on how many blocks ran at once). Histogram counts are integers, added in
// shared memory (integer adds give the same result in any order).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "arg_checks.cuh"
#include "multi_tensor.cuh"

namespace nto {
namespace cuda {
namespace stats {  // named: all files can share one TU (bench/cuda_syntax_check.sh)
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kFinalThreads = 256;
constexpr int64_t kChunk = 1 << 17;  // elements per partial

struct StatsMeta {
  static constexpr int kTensors = 90;
  static constexpr int kBlocks = 320;
  const void* ptr[kTensors];
  int64_t n[kTensors];
  int64_t chunk_base[kTensors];  // global id of the tensor's first chunk
  uint8_t block_slot[kBlocks];
  int32_t block_chunk[kBlocks];
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    partial_kernel(StatsMeta meta, double* ws_sum, float* ws_max, unsigned int* ws_hist) {
  __shared__ unsigned int hist[kWarps][256];  // one histogram per warp: fewer conflicts
  __shared__ double red[kWarps];
  for (int b = threadIdx.x; b < kWarps * 256; b += kThreads) (&hist[0][0])[b] = 0;
  __syncthreads();

  const int slot = meta.block_slot[blockIdx.x];
  const ChunkSpan span = block_chunk_span(meta, slot, kChunk);
  const int64_t begin = span.begin, len = span.len;
  const T* x = static_cast<const T*>(meta.ptr[slot]) + begin;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned int* wh = hist[warp];

  constexpr int V = 16 / sizeof(T);  // one 16-byte load per lane
  const bool vec = aligned<16>(x);
  double acc = 0.0;
  float amax = 0.0f;
  bool nan = false;
  // Warp-uniform trip count (warp_hist_add needs all 32 lanes); a warp reads 32*V
  // consecutive elements per step.
  for (int64_t base = static_cast<int64_t>(warp) * 32 * V; base < len;
       base += static_cast<int64_t>(kThreads) * V) {
    const int64_t e0 = base + static_cast<int64_t>(lane) * V;
    float f[V];
    load_floats<T, V>(x, e0, len, vec, f);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const bool valid = e0 + e < len;
      if (valid) {
        const double d = f[e];  // the square of an fp32 value is exact in double
        acc += d * d;
        amax = fmaxf(amax, fabsf(f[e]));
        nan |= f[e] != f[e];
      }
      warp_hist_add(wh, valid ? (__float_as_uint(f[e]) >> 23) & 0xFFu : kNoBin);
    }
  }

  const double total = block_sum<kThreads>(acc, red);
  // max is exact in any order; NaN is tracked apart (fmaxf drops it, torch.amax keeps it)
  __shared__ float redf[kWarps];
  float wmax = amax;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) wmax = fmaxf(wmax, __shfl_down_sync(0xffffffffu, wmax, o));
  if (lane == 0) redf[warp] = wmax;
  const int any_nan = __syncthreads_or(nan);
  const int64_t g = meta.chunk_base[slot] + meta.block_chunk[blockIdx.x];
  if (threadIdx.x == 0) {
    float bmax = 0.0f;
    for (int w = 0; w < kWarps; ++w) bmax = fmaxf(bmax, redf[w]);
    ws_sum[g] = total;
    ws_max[g] = any_nan ? __int_as_float(0x7fc00000) : bmax;
  }
  for (int b = threadIdx.x; b < 256; b += kThreads) {
    unsigned int c = 0;
    for (int w = 0; w < kWarps; ++w) c += hist[w][b];
    ws_hist[g * 256 + b] = c;
  }
}

struct FinalMeta {
  static constexpr int kTensors = 150;
  int64_t numel[kTensors];
  int64_t first[kTensors];  // first global chunk
  int32_t nchunks[kTensors];
  int32_t out[kTensors];  // position in the output
};

// One block per tensor: partials combined in chunk order, then a fixed-shape tree.
__global__ void __launch_bounds__(kFinalThreads)
    final_kernel(FinalMeta meta, const double* ws_sum, const float* ws_max,
                 const unsigned int* ws_hist, int64_t* numel, double* sumsq, float* absmax,
                 int64_t* hist) {
  __shared__ double red[kFinalThreads / 32];
  __shared__ float redf[kFinalThreads / 32];
  const int slot = blockIdx.x;
  const int64_t first = meta.first[slot];
  const int nc = meta.nchunks[slot];
  const int out = meta.out[slot];
  for (int b = threadIdx.x; b < 256; b += kFinalThreads) {
    int64_t c = 0;
#pragma unroll 8
    for (int k = 0; k < nc; ++k) c += ws_hist[(first + k) * 256 + b];
    hist[static_cast<int64_t>(out) * 256 + b] = c;
  }
  double acc = 0.0;
  float amax = 0.0f;
  bool nan = false;
  for (int k = threadIdx.x; k < nc; k += kFinalThreads) {
    acc += ws_sum[first + k];
    const float a = ws_max[first + k];
    amax = fmaxf(amax, a);
    nan |= a != a;
  }
  const double total = block_sum<kFinalThreads>(acc, red);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_down_sync(0xffffffffu, amax, o));
  if (lane == 0) redf[warp] = amax;
  const int any_nan = __syncthreads_or(nan);
  if (threadIdx.x == 0) {
    float m = 0.0f;
    for (int w = 0; w < kFinalThreads / 32; ++w) m = fmaxf(m, redf[w]);
    numel[out] = meta.numel[slot];
    sumsq[out] = total;
    absmax[out] = any_nan ? __int_as_float(0x7fc00000) : m;
  }
}

template <typename T>
void launch_partials(const std::vector<int64_t>& ids, at::TensorList ts,
                     const std::vector<int64_t>& chunk_base, double* ws_sum, float* ws_max,
                     unsigned int* ws_hist, cudaStream_t stream) {
  if (ids.empty()) return;
  std::vector<int64_t> lengths;
  for (int64_t i : ids) lengths.push_back(ts[i].numel());
  multi_tensor_launch<StatsMeta>(
      lengths, kChunk,
      [&](StatsMeta& meta, int slot, int64_t k) {
        meta.ptr[slot] = ts[ids[k]].const_data_ptr();
        meta.n[slot] = lengths[k];
        meta.chunk_base[slot] = chunk_base[ids[k]];
      },
      [&](const StatsMeta& meta, int blocks) {
        partial_kernel<T><<<blocks, kThreads, 0, stream>>>(meta, ws_sum, ws_max, ws_hist);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// histogram=False returns hist as [n, 0]; the device computes it anyway (the CPU kernel
// skips it to save its time; on a GPU the histogram shares the one read of memory).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> param_stats_cuda(at::TensorList ts,
                                                                             bool histogram) {
  check_float_list("param_stats", "tensors", ts);
  check_on_cuda("param_stats", "tensors", ts[0]);  // the dispatcher never sends an empty list
  const at::Device dev = ts[0].device();
  c10::cuda::CUDAGuard guard(dev);
  const int64_t n = static_cast<int64_t>(ts.size());
  const auto opts = ts[0].options();
  auto numel = at::empty({n}, opts.dtype(at::kLong));
  auto sumsq = at::empty({n}, opts.dtype(at::kDouble));
  auto absmax = at::empty({n}, opts.dtype(at::kFloat));
  auto hist = at::empty({n, 256}, opts.dtype(at::kLong));

  const ChunkTable table = chunk_table(ts, kChunk);
  const auto& chunk_base = table.base;
  const auto& nchunks = table.count;
  const auto& by_type = table.by_dtype;
  const int64_t total = table.total;
  const auto stream = current_stream();
  auto ws_sum = at::empty({total > 0 ? total : 1}, opts.dtype(at::kDouble));
  auto ws_max = at::empty({total > 0 ? total : 1}, opts.dtype(at::kFloat));
  auto ws_hist = at::empty({(total > 0 ? total : 1) * 256}, opts.dtype(at::kInt));
  auto* s = ws_sum.mutable_data_ptr<double>();
  auto* mx = ws_max.mutable_data_ptr<float>();
  auto* h = reinterpret_cast<unsigned int*>(ws_hist.mutable_data_ptr<int32_t>());
  launch_partials<float>(by_type[0], ts, chunk_base, s, mx, h, stream);
  launch_partials<c10::BFloat16>(by_type[1], ts, chunk_base, s, mx, h, stream);
  launch_partials<c10::Half>(by_type[2], ts, chunk_base, s, mx, h, stream);

  for (int64_t lo = 0; lo < n; lo += FinalMeta::kTensors) {
    const int64_t hi = std::min(n, lo + FinalMeta::kTensors);
    FinalMeta meta;
    for (int64_t i = lo; i < hi; ++i) {
      meta.numel[i - lo] = ts[i].numel();
      meta.first[i - lo] = chunk_base[i];
      meta.nchunks[i - lo] = static_cast<int32_t>(nchunks[i]);
      meta.out[i - lo] = static_cast<int32_t>(i);
    }
    final_kernel<<<hi - lo, kFinalThreads, 0, stream>>>(
        meta, s, mx, h, numel.mutable_data_ptr<int64_t>(), sumsq.mutable_data_ptr<double>(),
        absmax.mutable_data_ptr<float>(), hist.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {numel, sumsq, absmax, histogram ? hist : hist.narrow(1, 0, 0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CUDA, m) { m.impl("param_stats", &param_stats_cuda); }

}  // namespace stats

}  // namespace cuda
}  // namespace nto
