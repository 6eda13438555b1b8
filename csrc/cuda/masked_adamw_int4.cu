// masked_adamw_int4_ on CUDA: AdamW over whole tensors whose two moments share one byte per
// element (nto_ext/formats/int4.py; spec: nto_ext/_reference.py masked_adamw_int4_; the CPU
// kernel: csrc/cpu/masked_adamw_int4.cpp, the same math op for op).
//
// One warp per quantization block of kQ4Block = 64 elements, lane l holding elements
// l + 32k (k < 2): every load and store of the warp is one coalesced run, and a warp per
// block needs no shared memory and no __syncthreads (the block's maxima are a shuffle
// butterfly). Each lane decodes its bytes (|qm| in bits 7-4, qw in bits 3-1, qm's sign in
// bit 0), updates (adamw_update_q8, the 8-bit format's variant of AdamW's update), takes
// the block's max |m| and max root (NaN propagates, as torch.amax), computes the new
// scales and encodes. A tensor's last, partial block pads its missing elements with zeros
// as the spec does (they count in the maxima, are never stored). Scalar loads: the 8-bit
// kernel's 16-byte vector variant is not written for this format yet. One launch per
// tensor; the step counts are read on the host (NTO keeps them there).
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

#include "../adamw_math.h"
#include "arg_checks.cuh"
#include "multi_tensor.cuh"

namespace nto {
namespace cuda {
namespace adamw_int4 {  // named: all files can share one TU (bench/cuda_syntax_check.sh)
namespace {

constexpr const char* kOp = "masked_adamw_int4_";
constexpr int kThreads = 256;          // per CUDA block
constexpr int kWarps = kThreads / 32;  // quantization blocks per CUDA block
constexpr int kPer = kQ4Block / 32;    // elements per lane (kQ4Block: adamw_math.h)

template <typename P, typename G>
__global__ void __launch_bounds__(kThreads)
    adamw_q4_kernel(P* __restrict__ p, const G* __restrict__ g, uint8_t* __restrict__ codes,
                    float* __restrict__ sm, float* __restrict__ sw, int64_t n, int64_t nblocks,
                    AdamWScalars s) {
  using O = FloatOps<float>;
  const int lane = threadIdx.x % 32;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (b >= nblocks) return;  // the whole warp (the grid's last CUDA block)
  // Every lane reads the old scales before the shuffles that lane 0's new ones depend on.
  const float smb = sm[b], swb = sw[b];
  float m[kPer], root[kPer];
  float mx_m = 0.0f, mx_w = 0.0f;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t i = b * kQ4Block + lane + 32 * k;
    const bool in = i < n;
    // The padding's levels are 0, dequantized with the block's scales as the spec's zero
    // padded blocks are (so an inf scale makes its m, v NaN there, as on the CPU).
    const int code = in ? codes[i] : 0;
    const float mag = static_cast<float>(code >> 4);
    const float q = (code & 1) ? -mag : mag;
    float me = O::mul(O::mul(q, mag), smb);
    const float r = static_cast<float>((code >> 1) & 7);
    const float w = O::mul(O::mul(r, r), swb);
    float ve = O::mul(w, w);
    float pe = in ? to_float(p[i]) : 0.0f;
    const float ge = in ? to_float(g[i]) : 0.0f;
    root[k] = adamw_update_q8(pe, ge, me, ve, s, s.neg_step_size, s.inv_bc2_sqrt);
    if (in) p[i] = from_float<P>(pe);
    m[k] = me;
    mx_m = k == 0 ? fabsf(me) : max_nan(mx_m, fabsf(me));
    mx_w = k == 0 ? root[k] : max_nan(mx_w, root[k]);
  }
  const float new_sm = O::div(warp_max(mx_m), kQ4MSquare);
  const float new_sw = O::div(warp_max(mx_w), kQ4WSquare);
  const float inv_m = q8_inverse(new_sm), inv_w = q8_inverse(new_sw);
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int64_t i = b * kQ4Block + lane + 32 * k;
    if (i >= n) continue;
    const float um = q8_level_of(O::mul(fabsf(m[k]), inv_m), kQ4MLevels);
    float uw = q8_level_of(O::mul(root[k], inv_w), kQ4WLevels);
    if (uw == 0.0f && root[k] > 0.0f) uw = 1.0f;  // a positive root never rounds to zero
    const int negative = m[k] < 0.0f && um > 0.0f;
    codes[i] = static_cast<uint8_t>((static_cast<int>(um) << 4) | (static_cast<int>(uw) << 1) |
                                    negative);
  }
  if (lane == 0) {
    sm[b] = new_sm;
    sw[b] = new_sw;
  }
}

template <typename P, typename G>
void launch(const at::Tensor& p, const at::Tensor& g, const at::Tensor& c, const at::Tensor& sm,
            const at::Tensor& sw, const AdamWScalars& s, cudaStream_t stream) {
  const int64_t blocks = sm.numel();
  const int64_t grid = (blocks + kWarps - 1) / kWarps;
  TORCH_CHECK(grid <= std::numeric_limits<int32_t>::max(), kOp, ": a tensor of ", p.numel(),
              " elements needs more CUDA blocks than a launch allows");
  adamw_q4_kernel<P, G><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(
      static_cast<P*>(p.data_ptr()), static_cast<const G*>(g.const_data_ptr()),
      c.data_ptr<uint8_t>(), sm.data_ptr<float>(), sw.data_ptr<float>(), p.numel(), blocks, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_adamw_int4_cuda(at::TensorList params, at::TensorList grads, at::TensorList codes,
                            at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                            at::TensorList steps, double lr, double beta1, double beta2,
                            double eps, double weight_decay) {
  check_adamw_int4_meta(params, grads, codes, exp_avg_scales, exp_avg_sq_scales, steps, lr,
                        beta1, beta2, eps, weight_decay);
  const size_t n = params.size();
  if (n == 0) return;
  check_on_cuda(kOp, "params", params[0]);
  c10::cuda::CUDAGuard guard(params[0].device());
  const auto scal = per_tensor_scalars(kOp, steps, lr, beta1, beta2, eps, weight_decay);
  const cudaStream_t stream = current_stream();
  for (size_t i = 0; i < n; ++i) {
    if (params[i].numel() == 0) continue;
    const auto pt = params[i].scalar_type();
    const bool g32 = grads[i].scalar_type() == at::kFloat;
    const auto &a = params[i], &g = grads[i], &c = codes[i];
    const auto &sm = exp_avg_scales[i], &sw = exp_avg_sq_scales[i];
    if (pt == at::kFloat) {
      launch<float, float>(a, g, c, sm, sw, scal[i], stream);
    } else if (pt == at::kBFloat16) {
      if (g32) launch<c10::BFloat16, float>(a, g, c, sm, sw, scal[i], stream);
      else launch<c10::BFloat16, c10::BFloat16>(a, g, c, sm, sw, scal[i], stream);
    } else {
      if (g32) launch<c10::Half, float>(a, g, c, sm, sw, scal[i], stream);
      else launch<c10::Half, c10::Half>(a, g, c, sm, sw, scal[i], stream);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CUDA, m) { m.impl("masked_adamw_int4_", &masked_adamw_int4_cuda); }

}  // namespace adamw_int4
}  // namespace cuda
}  // namespace nto
