// masked_adamw_int8_ on CUDA: AdamW over whole tensors with 8-bit moments (nto_ext/formats/
// int8.py; spec: nto_ext/_reference.py masked_adamw_int8_, map: csrc/adamw_math.h). One
// thread block per quantization block of kQ8Block elements, one element per thread:
// dequantize, update (adamw_update_q8, the CPU kernels' math), block-wide abs-max of the
// new moments (NaN propagates, as torch.amax), new scales, requantize. One launch per
// tensor; the step counts are read on the host (NTO keeps them there).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../adamw_math.h"
#include "arg_checks.cuh"
#include "multi_tensor.cuh"

namespace nto {
namespace cuda {
namespace adamw_int8 {  // named: all files can share one TU (bench/cuda_syntax_check.sh)
namespace {

constexpr const char* kOp = "masked_adamw_int8_";
constexpr int kWarps = kQ8Block / 32;
static_assert(kQ8Block % 32 == 0, "whole warps per block");

__device__ __forceinline__ float max_nan(float a, float b) {  // lanes >= 0 or NaN
  return a != a ? a : (b != b ? b : fmaxf(a, b));
}

// The largest of the block's values (NaN if any is NaN); every thread gets it (each warp's
// lane 0 holds its warp's after the shuffles).
__device__ __forceinline__ float block_max(float x, float* shared) {
  for (int o = 16; o > 0; o >>= 1) x = max_nan(x, __shfl_down_sync(0xffffffffu, x, o));
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = x;
  __syncthreads();
  float out = shared[0];
  for (int w = 1; w < kWarps; ++w) out = max_nan(out, shared[w]);
  return out;
}

// sqrt(|x| * inv) rounded half up, in [0, top], NaN -> 0 (_reference._levels).
__device__ __forceinline__ float level(float x, float inv, float top) {
  return q8_level_of(FloatOps<float>::mul(fabsf(x), inv), top);
}

template <typename P, typename G>
__global__ void __launch_bounds__(kQ8Block)
    adamw_q8_kernel(P* __restrict__ p, const G* __restrict__ g, int8_t* __restrict__ qm,
                    uint8_t* __restrict__ qw, float* __restrict__ sm, float* __restrict__ sw,
                    int64_t n, AdamWScalars s) {
  using O = FloatOps<float>;
  __shared__ float red_m[kWarps], red_w[kWarps];
  const int64_t b = blockIdx.x;
  const int64_t i = b * kQ8Block + threadIdx.x;
  const bool in = i < n;
  float pf = 0.0f, gf = 0.0f, m = 0.0f, v = 0.0f;  // the padding of a partial block: zeros
  if (in) {
    pf = static_cast<float>(p[i]);
    gf = static_cast<float>(g[i]);
    const float q = static_cast<float>(qm[i]);
    m = O::mul(O::mul(q, fabsf(q)), sm[b]);
    const float r = static_cast<float>(qw[i]);
    const float w = O::mul(O::mul(r, r), sw[b]);
    v = O::mul(w, w);
  }
  const float root = adamw_update_q8(pf, gf, m, v, s, s.neg_step_size, s.inv_bc2_sqrt);
  if (in) p[i] = static_cast<P>(pf);
  const float new_sm = O::div(block_max(fabsf(m), red_m), kQ8MSquare);
  const float new_sw = O::div(block_max(root, red_w), kQ8WSquare);
  if (in) {
    const float um = level(m, q8_inverse(new_sm), kQ8MLevels);
    qm[i] = static_cast<int8_t>(m < 0.0f ? -static_cast<int>(um) : static_cast<int>(um));
    float uw = level(root, q8_inverse(new_sw), kQ8WLevels);
    if (uw == 0.0f && root > 0.0f) uw = 1.0f;  // a positive root never rounds to zero
    qw[i] = static_cast<uint8_t>(static_cast<int>(uw));
  }
  if (threadIdx.x == 0) {  // every thread read the old scales before block_max's barrier
    sm[b] = new_sm;
    sw[b] = new_sw;
  }
}

template <typename P, typename G>
void launch(const at::Tensor& p, const at::Tensor& g, const at::Tensor& qm, const at::Tensor& qw,
            const at::Tensor& sm, const at::Tensor& sw, const AdamWScalars& s,
            cudaStream_t stream) {
  const int64_t blocks = sm.numel();
  adamw_q8_kernel<P, G><<<static_cast<unsigned>(blocks), kQ8Block, 0, stream>>>(
      static_cast<P*>(p.data_ptr()), static_cast<const G*>(g.const_data_ptr()),
      qm.data_ptr<int8_t>(), qw.data_ptr<uint8_t>(), sm.data_ptr<float>(), sw.data_ptr<float>(),
      p.numel(), s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_adamw_int8_cuda(at::TensorList params, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                            at::TensorList steps, double lr, double beta1, double beta2,
                            double eps, double weight_decay) {
  check_adamw_int8_meta(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales,
                        exp_avg_sq_scales, steps, lr, beta1, beta2, eps, weight_decay);
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
    const auto& a = params[i];
    const auto& g = grads[i];
    const auto& qm = exp_avgs[i];
    const auto& qw = exp_avg_sqs[i];
    const auto& sm = exp_avg_scales[i];
    const auto& sw = exp_avg_sq_scales[i];
    if (pt == at::kFloat) {
      launch<float, float>(a, g, qm, qw, sm, sw, scal[i], stream);
    } else if (pt == at::kBFloat16) {
      if (g32) launch<c10::BFloat16, float>(a, g, qm, qw, sm, sw, scal[i], stream);
      else launch<c10::BFloat16, c10::BFloat16>(a, g, qm, qw, sm, sw, scal[i], stream);
    } else {
      if (g32) launch<c10::Half, float>(a, g, qm, qw, sm, sw, scal[i], stream);
      else launch<c10::Half, c10::Half>(a, g, qm, qw, sm, sw, scal[i], stream);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CUDA, m) { m.impl("masked_adamw_int8_", &masked_adamw_int8_cuda); }

}  // namespace adamw_int8
}  // namespace cuda
}  // namespace nto
