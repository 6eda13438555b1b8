// masked_adamw_lowp_ on CPU: AdamW over whole bf16/fp16 params whose grads have their dtype
// (nto_ext/formats/master.py; spec: nto_ext/_reference.py masked_adamw_lowp_). One pass per
// element: widen the grad, update the fp32 master (or the widened param), write the param
// back rounded to nearest even or stochastically (csrc/stochastic_round.h). No temporaries:
// formats/master.py used to stage fp32 copies of grads and params for the fp32 kernel.
// at::parallel_for over (tensor, chunk) work items; the loop is a plain scalar loop (the
// math is adamw_math.h's, every op rounded as the vector kernels round it), compiled a
// second time for AVX2+FMA+F16C (hardware fma and half conversions) and picked when the
// vector kernels pick AVX2 or better (ATEN_CPU_CAPABILITY is honoured through them).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../adamw_math.h"
#include "../checks.h"
#include "../stochastic_round.h"
#include "vec_kernels.h"
#include "work_items.h"
#include "x86_variants.h"

namespace nto {
namespace {

constexpr const char* kOp = "masked_adamw_lowp_";

// One work item's elements [b, e) of one tensor; everything a chunk needs.
struct LowpChunk {
  void* p;
  const void* g;
  float* m;
  float* v;
  float* master;  // nullptr: the value is the widened param (stochastic-rounding format)
  int64_t b, e;
  bool stochastic, maximize;
  uint32_t k1, k2;
  AdamWScalars s;
};

template <typename T>
__attribute__((always_inline)) inline void lowp_loop(const LowpChunk& c) {
  T* __restrict__ p = static_cast<T*>(c.p);
  const T* __restrict__ g = static_cast<const T*>(c.g);
  float* __restrict__ m = c.m;
  float* __restrict__ v = c.v;
  float* __restrict__ master = c.master;
  const float nss = c.s.neg_step_size, bc2 = c.s.bc2_sqrt;
  for (int64_t j = c.b; j < c.e; ++j) {
    float x = master ? master[j] : static_cast<float>(p[j]);
    const float gj = c.maximize ? -static_cast<float>(g[j]) : static_cast<float>(g[j]);
    adamw_update<float>(x, gj, m[j], v[j], c.s, nss, bc2);
    if (master) master[j] = x;
    p[j] = c.stochastic ? stochastic_round<T>(x, sr_uniform(c.k1, c.k2, (uint64_t)j)) : T(x);
  }
}

void lowp_chunk_default(const LowpChunk& c, bool bf16) {
  bf16 ? lowp_loop<c10::BFloat16>(c) : lowp_loop<c10::Half>(c);
}

#if defined(NTO_HAVE_X86_VARIANTS)
__attribute__((target("avx2,fma,f16c"))) void lowp_chunk_avx2(const LowpChunk& c, bool bf16) {
  bf16 ? lowp_loop<c10::BFloat16>(c) : lowp_loop<c10::Half>(c);
}
#endif

using ChunkFn = void (*)(const LowpChunk&, bool);

ChunkFn choose_loop() {
#if defined(NTO_HAVE_X86_VARIANTS)
  if (std::strcmp(cpu_kernels().name, "default") != 0) return &lowp_chunk_avx2;
#endif
  return &lowp_chunk_default;
}

void masked_adamw_lowp_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList masters,
                           at::TensorList steps, const c10::List<bool>& stochastic,
                           at::IntArrayRef keys, double lr, double beta1, double beta2,
                           double eps, double weight_decay, bool maximize) {
  check_adamw_lowp_meta(params, grads, exp_avgs, exp_avg_sqs, masters, steps, stochastic.size(),
                        keys.size(), lr, beta1, beta2, eps, weight_decay);
  const size_t n = params.size();
  const AdamWScalars base = adamw_scalars(lr, beta1, beta2, eps, weight_decay);
  std::vector<AdamWScalars> scal(n, base);
  std::vector<int64_t> sizes(n);
  std::vector<char> sr(n);  // c10::List<bool> is read once here, not in the loop
  for (size_t i = 0; i < n; ++i) {  // step values, in the reference's order
    sr[i] = stochastic.get(i);
    const double step = checked_host_step(kOp, i, steps[i]);
    adamw_step_scalars(lr, beta1, beta2, step, &scal[i].neg_step_size, &scal[i].bc2_sqrt);
    sizes[i] = params[i].numel();
  }
  const auto items = make_work_items(sizes);
  static const ChunkFn loop = choose_loop();
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = items[w];
      const size_t t = it.tensor;
      const uint64_t key = static_cast<uint64_t>(keys[t]);
      const LowpChunk c{params[t].data_ptr(), grads[t].const_data_ptr(),
                        exp_avgs[t].data_ptr<float>(), exp_avg_sqs[t].data_ptr<float>(),
                        masters.empty() ? nullptr : masters[t].data_ptr<float>(), it.begin,
                        it.end, sr[t] != 0, maximize, static_cast<uint32_t>(key),
                        static_cast<uint32_t>(key >> 32), scal[t]};
      loop(c, params[t].scalar_type() == at::kBFloat16);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CPU, m) { m.impl("masked_adamw_lowp_", &masked_adamw_lowp_cpu); }

}  // namespace nto
