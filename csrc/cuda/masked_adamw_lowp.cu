// masked_adamw_lowp_ on CUDA: AdamW over whole bf16/fp16 params whose grads have their dtype
// (nto_ext/formats/master.py; spec: nto_ext/_reference.py masked_adamw_lowp_). One element
// per thread: widen the grad, update the fp32 master (or the widened param),
// write the param back rounded to nearest even or stochastically (csrc/stochastic_round.h:
// the stream is keyed on the element's position, so the draws match the CPU's). The math is
// adamw_math.h's, every op correctly rounded (__f*_rn). One launch per tensor; the step
// counts are read on the host before any launch (NTO keeps them there).
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
#include "../stochastic_round.h"
#include "arg_checks.cuh"

namespace nto {
namespace cuda {
namespace adamw_lowp {  // named: all files can share one TU (bench/cuda_syntax_check.sh)
namespace {

constexpr const char* kOp = "masked_adamw_lowp_";
constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamw_lowp_kernel(T* __restrict__ p, const T* __restrict__ g, float* __restrict__ m,
                      float* __restrict__ v, float* __restrict__ master, int64_t n,
                      AdamWScalars s, bool stochastic, bool maximize, uint32_t k1,
                      uint32_t k2) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= n) return;
  float x = master != nullptr ? master[j] : static_cast<float>(p[j]);
  const float gj = maximize ? -static_cast<float>(g[j]) : static_cast<float>(g[j]);
  float mj = m[j], vj = v[j];
  adamw_update<float>(x, gj, mj, vj, s, s.neg_step_size, s.bc2_sqrt);
  m[j] = mj;
  v[j] = vj;
  if (master != nullptr) master[j] = x;
  p[j] = stochastic ? stochastic_round<T>(x, sr_uniform(k1, k2, static_cast<uint64_t>(j)))
                    : T(x);
}

template <typename T>
void launch(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v,
            float* master, const AdamWScalars& s, bool stochastic, bool maximize, uint64_t key,
            cudaStream_t stream) {
  const int64_t n = p.numel();
  const int64_t blocks = (n + kThreads - 1) / kThreads;  // < 2^31 for any n < 2^39
  adamw_lowp_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<T*>(p.data_ptr()), static_cast<const T*>(g.const_data_ptr()),
      m.data_ptr<float>(), v.data_ptr<float>(), master, n, s, stochastic, maximize,
      static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_adamw_lowp_cuda(at::TensorList params, at::TensorList grads,
                            at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList masters, at::TensorList steps,
                            const c10::List<bool>& stochastic, at::IntArrayRef keys, double lr,
                            double beta1, double beta2, double eps, double weight_decay,
                            bool maximize) {
  check_adamw_lowp_meta(params, grads, exp_avgs, exp_avg_sqs, masters, steps, stochastic.size(),
                        keys.size(), lr, beta1, beta2, eps, weight_decay);
  const size_t n = params.size();
  if (n == 0) return;
  check_on_cuda(kOp, "params", params[0]);
  c10::cuda::CUDAGuard guard(params[0].device());
  const auto scal = per_tensor_scalars(kOp, steps, lr, beta1, beta2, eps, weight_decay);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (size_t i = 0; i < n; ++i) {
    if (params[i].numel() == 0) continue;
    float* master = masters.empty() ? nullptr : masters[i].data_ptr<float>();
    const bool sr = stochastic.get(i);
    const uint64_t key = static_cast<uint64_t>(keys[i]);
    if (params[i].scalar_type() == at::kBFloat16)
      launch<c10::BFloat16>(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], master, scal[i],
                            sr, maximize, key, stream);
    else
      launch<c10::Half>(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], master, scal[i], sr,
                        maximize, key, stream);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CUDA, m) { m.impl("masked_adamw_lowp_", &masked_adamw_lowp_cuda); }

}  // namespace adamw_lowp
}  // namespace cuda
}  // namespace nto
