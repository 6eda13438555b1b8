// masked_adamw_int8_ on CUDA: AdamW over whole tensors, or at sorted unique positions
// (policy="sparse"), with 8-bit moments (nto_ext/formats/int8.py; spec: nto_ext/_reference.py
// masked_adamw_int8_, map: csrc/adamw_math.h).
//
// One warp per quantization block of kQ8Block = 256 elements, 8 consecutive elements per lane
// (lane l: [8l, 8l + 8)), kWarps blocks per CUDA block: the kernel moves 16 bytes per fp32
// element and does little math, so it is memory bound, and a warp per block needs no shared
// memory and no __syncthreads (the block-wide abs-max of the new moments is a shuffle
// butterfly). Each lane loads its 8 p and g values as 16-byte vectors and its 8 levels of
// each moment as one 64-bit word, dequantizes, updates (adamw_update_q8, the CPU kernels'
// math, op for op), takes the block's max |m| and max root (NaN propagates, as torch.amax),
// computes the new scales and requantizes. Vector accesses need aligned tensors (checked on
// the host; otherwise a scalar-load variant) and a whole block (a tensor's last, partial
// block takes the scalar path, its missing elements padded with zeros as the spec pads).
// One launch per tensor; the step counts are read on the host (NTO keeps them there).
//
// Indexed (indices[i] given): the grad, moments and blocks are compact, in the positions'
// order, so only p moves: lane element i0 + e reads its position idx[i0 + e] and p there,
// scalar loads (a gather has no vectors); g, qm and qw keep the dense path's loads. The
// positions are checked before any write (index_check.cuh: a host sync only the first time
// given index memory is seen at its current version) and each again where the kernel reads
// it: a warp whose block holds one out of range records it (raised by the next call, as
// masked_adamw.cu) and leaves the whole block untouched, as the CPU kernel does (the block's
// scales depend on all its positions).
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "../adamw_math.h"
#include "arg_checks.cuh"
#include "index_check.cuh"
#include "multi_tensor.cuh"

namespace nto {
namespace cuda {
namespace adamw_int8 {  // named: all files can share one TU (bench/cuda_syntax_check.sh)
namespace {

constexpr const char* kOp = "masked_adamw_int8_";
constexpr int kThreads = 256;                 // per CUDA block
constexpr int kWarps = kThreads / 32;         // quantization blocks per CUDA block
constexpr int kPer = kQ8Block / 32;           // elements per lane
static_assert(kPer == 8, "a lane's levels of one moment are one 64-bit word");

// sqrt(|x| * inv) rounded half up, in [0, top], NaN -> 0 (_reference._levels).
__device__ __forceinline__ float level(float x, float inv, float top) {
  return q8_level_of(FloatOps<float>::mul(fabsf(x), inv), top);
}

// x[0..kPer) as floats, in 16-byte vectors (x 16-byte aligned).
template <typename T>
__device__ __forceinline__ void load_vec(const T* x, float (&f)[kPer]) {
  constexpr int V = 16 / sizeof(T);
#pragma unroll
  for (int k = 0; k < kPer / V; ++k) {
    const Vec<T, V> w = reinterpret_cast<const Vec<T, V>*>(x)[k];
#pragma unroll
    for (int e = 0; e < V; ++e) f[k * V + e] = to_float(w.v[e]);
  }
}

template <typename T>
__device__ __forceinline__ void store_vec(T* x, const float (&f)[kPer]) {
  constexpr int V = 16 / sizeof(T);
#pragma unroll
  for (int k = 0; k < kPer / V; ++k) {
    Vec<T, V> w;
#pragma unroll
    for (int e = 0; e < V; ++e) w.v[e] = from_float<T>(f[k * V + e]);
    reinterpret_cast<Vec<T, V>*>(x)[k] = w;
  }
}

// An indexed launch's positions (unused by a dense one).
struct Positions {
  const void* idx;  // int32 or int64, compact (element j: position of state element j)
  bool is64;
  int64_t limit;  // the param's numel: positions must be below it
  int32_t list;   // i of indices[i], for the fault record
  DeviceIndexFault* fault;
};

// True in every lane when any lane's x is true.
__device__ __forceinline__ bool warp_any(bool x) {
  int v = x;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, o);
  return v != 0;
}

// This lane's positions (past n: 0, never used), each read once; false when one is out of
// range (changed after the host check): the first such one is recorded, none dereferenced.
__device__ __forceinline__ bool lane_positions(const Positions& x, int64_t i0, int64_t n,
                                               int64_t (&pos)[kPer]) {
  bool ok = true;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const int64_t j = i0 + e;
    pos[e] = j >= n ? 0
             : x.is64 ? static_cast<const int64_t*>(x.idx)[j]
                      : static_cast<int64_t>(static_cast<const int32_t*>(x.idx)[j]);
    if (j < n && !index_in_range(pos[e], x.limit)) {
      if (ok) record_fault(x.fault, kFaultAdamWInt8, x.list, j, pos[e], x.limit);
      ok = false;
    }
  }
  return ok;
}

// g as floats and the moments' levels (byte e = element i0 + e) of this lane; past n, zeros
// (not read). `full`: vector loads.
template <typename G>
__device__ __forceinline__ void load_state(const G* g, const int8_t* qm, const uint8_t* qw,
                                           int64_t i0, int64_t n, bool full,
                                           float (&gf)[kPer], uint64_t& qa, uint64_t& ra) {
  if (full) {
    load_vec(g + i0, gf);
    qa = *reinterpret_cast<const uint64_t*>(qm + i0);
    ra = *reinterpret_cast<const uint64_t*>(qw + i0);
    return;
  }
  qa = ra = 0;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const bool in = i0 + e < n;
    gf[e] = in ? to_float(g[i0 + e]) : 0.0f;
    qa |= in ? static_cast<uint64_t>(static_cast<uint8_t>(qm[i0 + e])) << (8 * e) : 0;
    ra |= in ? static_cast<uint64_t>(qw[i0 + e]) << (8 * e) : 0;
  }
}

template <typename P, bool kIndexed>
__device__ __forceinline__ void load_params(const P* p, int64_t i0, int64_t n, bool full,
                                            const int64_t (&pos)[kPer], float (&pf)[kPer]) {
  if (!kIndexed && full) {
    load_vec(p + i0, pf);
    return;
  }
#pragma unroll
  for (int e = 0; e < kPer; ++e)
    pf[e] = i0 + e < n ? to_float(p[kIndexed ? pos[e] : i0 + e]) : 0.0f;
}

template <typename P, bool kIndexed>
__device__ __forceinline__ void store_params(P* p, int64_t i0, int64_t n, bool full,
                                             const int64_t (&pos)[kPer],
                                             const float (&pf)[kPer]) {
  if (!kIndexed && full) {
    store_vec(p + i0, pf);
    return;
  }
#pragma unroll
  for (int e = 0; e < kPer; ++e)
    if (i0 + e < n) p[kIndexed ? pos[e] : i0 + e] = from_float<P>(pf[e]);
}

// kVec: g 16-byte and qm, qw 8-byte aligned, and p 16-byte aligned unless kIndexed
// (host-checked), so whole blocks use vectors (p's only when dense). n: the state's length.
template <typename P, typename G, bool kVec, bool kIndexed>
__global__ void __launch_bounds__(kThreads)
    adamw_q8_kernel(P* __restrict__ p, const G* __restrict__ g, int8_t* __restrict__ qm,
                    uint8_t* __restrict__ qw, float* __restrict__ sm, float* __restrict__ sw,
                    int64_t n, int64_t nblocks, AdamWScalars s, Positions x) {
  using O = FloatOps<float>;
  const int lane = threadIdx.x % 32;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (b >= nblocks) return;  // the whole warp (the grid's last CUDA block)
  const int64_t i0 = b * kQ8Block + lane * kPer;  // this lane's first element
  const bool full = kVec && (b + 1) * kQ8Block <= n;  // warp-uniform: no divergence

  int64_t pos[kPer] = {};
  if (kIndexed && warp_any(!lane_positions(x, i0, n, pos))) return;  // the whole warp
  float pf[kPer], gf[kPer], m[kPer], root[kPer];
  uint64_t qa, ra;  // the levels, byte e = element i0 + e
  load_params<P, kIndexed>(p, i0, n, full, pos, pf);
  load_state(g, qm, qw, i0, n, full, gf, qa, ra);
  // Every lane reads the old scales before the shuffles that lane 0's new ones depend on.
  const float smb = sm[b], swb = sw[b];
  float mx_m = 0.0f, mx_w = 0.0f;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    // The padding's levels are 0, dequantized with the block's scales as the spec's zero
    // padded blocks are (so an inf scale makes its m, v NaN there, as on the CPU).
    const float q = static_cast<float>(static_cast<int8_t>(qa >> (8 * e)));
    float me = O::mul(O::mul(q, fabsf(q)), smb);
    const float r = static_cast<float>(static_cast<uint8_t>(ra >> (8 * e)));
    const float w = O::mul(O::mul(r, r), swb);
    float ve = O::mul(w, w);
    root[e] = adamw_update_q8(pf[e], gf[e], me, ve, s, s.neg_step_size, s.inv_bc2_sqrt);
    m[e] = me;
    mx_m = e == 0 ? fabsf(me) : max_nan(mx_m, fabsf(me));
    mx_w = e == 0 ? root[e] : max_nan(mx_w, root[e]);
  }
  store_params<P, kIndexed>(p, i0, n, full, pos, pf);

  const float new_sm = O::div(warp_max(mx_m), kQ8MSquare);
  const float new_sw = O::div(warp_max(mx_w), kQ8WSquare);
  const float inv_m = q8_inverse(new_sm), inv_w = q8_inverse(new_sw);
  uint64_t qo = 0, ro = 0;
#pragma unroll
  for (int e = 0; e < kPer; ++e) {
    const float um = level(m[e], inv_m, kQ8MLevels);
    const int sq = m[e] < 0.0f ? -static_cast<int>(um) : static_cast<int>(um);
    qo |= static_cast<uint64_t>(static_cast<uint8_t>(static_cast<int8_t>(sq))) << (8 * e);
    float uw = level(root[e], inv_w, kQ8WLevels);
    if (uw == 0.0f && root[e] > 0.0f) uw = 1.0f;  // a positive root never rounds to zero
    ro |= static_cast<uint64_t>(static_cast<uint8_t>(static_cast<int>(uw))) << (8 * e);
  }
  if (full) {
    *reinterpret_cast<uint64_t*>(qm + i0) = qo;
    *reinterpret_cast<uint64_t*>(qw + i0) = ro;
  } else {
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      if (i0 + e < n) {
        qm[i0 + e] = static_cast<int8_t>(qo >> (8 * e));
        qw[i0 + e] = static_cast<uint8_t>(ro >> (8 * e));
      }
    }
  }
  if (lane == 0) {
    sm[b] = new_sm;
    sw[b] = new_sw;
  }
}

bool aligned_to(const at::Tensor& t, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % bytes == 0;
}

template <typename P, typename G>
void launch(const at::Tensor& p, const at::Tensor& g, const at::Tensor& qm, const at::Tensor& qw,
            const at::Tensor& sm, const at::Tensor& sw, const Positions& x,
            const AdamWScalars& s, cudaStream_t stream) {
  const int64_t blocks = sm.numel();
  const int64_t grid = (blocks + kWarps - 1) / kWarps;
  TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), kOp, ": a tensor of ", qm.numel(),
              " elements needs more CUDA blocks than a launch allows");
  // A storage offset can misalign a view: then the scalar-load variant. An indexed p is
  // gathered element by element, so its alignment does not matter.
  const bool indexed = x.idx != nullptr;
  const bool vec = (indexed || aligned_to(p, 16)) && aligned_to(g, 16) && aligned_to(qm, 8) &&
                   aligned_to(qw, 8);
  const auto kernel = indexed ? (vec ? adamw_q8_kernel<P, G, true, true>
                                     : adamw_q8_kernel<P, G, false, true>)
                              : (vec ? adamw_q8_kernel<P, G, true, false>
                                     : adamw_q8_kernel<P, G, false, false>);
  kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      static_cast<P*>(p.data_ptr()), static_cast<const G*>(g.const_data_ptr()),
      qm.data_ptr<int8_t>(), qw.data_ptr<uint8_t>(), sm.data_ptr<float>(), sw.data_ptr<float>(),
      qm.numel(), blocks, s, x);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The index tensor of each entry (none: dense).
std::vector<std::optional<at::Tensor>> index_tensors(
    const c10::List<std::optional<at::Tensor>>& indices) {
  std::vector<std::optional<at::Tensor>> idx(indices.size());
  for (size_t i = 0; i < idx.size(); ++i) {
    std::optional<at::Tensor> o = indices.get(i);
    if (o.has_value() && o->defined()) idx[i] = std::move(o);
  }
  return idx;
}

// Index values (one device check for all, cached: index_check.cuh), then step counts, in the
// CPU kernel's order (per entry: indices, then steps, when an index is bad); the AdamW
// scalars of each entry. Raises before any write.
std::vector<AdamWScalars> checked_scalars(at::TensorList params,
                                          const std::vector<std::optional<at::Tensor>>& idx,
                                          at::TensorList steps, double lr, double beta1,
                                          double beta2, double eps, double weight_decay) {
  std::vector<IndexRef> refs;
  for (size_t i = 0; i < idx.size(); ++i)
    if (idx[i].has_value()) refs.push_back({&*idx[i], "indices", i});
  const auto facts = index_facts(kOp, refs);
  bool ok = true;
  for (size_t k = 0; k < refs.size(); ++k)
    ok = ok && facts[k].ok && facts[k].last < params[refs[k].list].numel();
  for (size_t i = 0, k = 0; !ok && i < idx.size(); ++i) {  // name the first offence
    if (idx[i].has_value())
      check_index_values(kOp, "indices", i, *idx[i], facts[k++], params[i].numel(), "params");
    checked_host_step(kOp, i, steps[i].is_cpu() ? steps[i] : steps[i].to(at::kCPU));
  }
  return per_tensor_scalars(kOp, steps, lr, beta1, beta2, eps, weight_decay);
}

void masked_adamw_int8_cuda(at::TensorList params, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                            const c10::List<std::optional<at::Tensor>>& indices,
                            at::TensorList steps, double lr, double beta1, double beta2,
                            double eps, double weight_decay) {
  check_adamw_int8_meta(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales,
                        exp_avg_sq_scales, indices, steps, lr, beta1, beta2, eps,
                        weight_decay);
  const size_t n = params.size();
  if (n == 0) return;
  check_on_cuda(kOp, "params", params[0]);
  raise_recorded_fault();  // an earlier launch's (index_check.cuh), before anything changes
  c10::cuda::CUDAGuard guard(params[0].device());
  const auto idx = index_tensors(indices);
  const auto scal = checked_scalars(params, idx, steps, lr, beta1, beta2, eps, weight_decay);
  DeviceIndexFault* fault = nullptr;  // allocated on first use: dense-only calls need none
  const cudaStream_t stream = current_stream();
  for (size_t i = 0; i < n; ++i) {
    if (exp_avgs[i].numel() == 0) continue;
    Positions x{nullptr, false, params[i].numel(), static_cast<int32_t>(i), nullptr};
    if (idx[i].has_value()) {
      if (fault == nullptr) fault = fault_record();
      x.idx = idx[i]->const_data_ptr();
      x.is64 = idx[i]->scalar_type() == at::kLong;
      x.fault = fault;
    }
    const auto pt = params[i].scalar_type();
    const bool g32 = grads[i].scalar_type() == at::kFloat;
    const auto& a = params[i];
    const auto& g = grads[i];
    const auto& qm = exp_avgs[i];
    const auto& qw = exp_avg_sqs[i];
    const auto& sm = exp_avg_scales[i];
    const auto& sw = exp_avg_sq_scales[i];
    if (pt == at::kFloat) {
      launch<float, float>(a, g, qm, qw, sm, sw, x, scal[i], stream);
    } else if (pt == at::kBFloat16) {
      if (g32) launch<c10::BFloat16, float>(a, g, qm, qw, sm, sw, x, scal[i], stream);
      else launch<c10::BFloat16, c10::BFloat16>(a, g, qm, qw, sm, sw, x, scal[i], stream);
    } else {
      if (g32) launch<c10::Half, float>(a, g, qm, qw, sm, sw, x, scal[i], stream);
      else launch<c10::Half, c10::Half>(a, g, qm, qw, sm, sw, x, scal[i], stream);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CUDA, m) { m.impl("masked_adamw_int8_", &masked_adamw_int8_cuda); }

}  // namespace adamw_int8
}  // namespace cuda
}  // namespace nto
