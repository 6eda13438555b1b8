// masked_adamw_lowp_ on CPU: AdamW over whole bf16/fp16 params whose grads have their dtype
// (nto_ext/formats/master.py; spec: nto_ext/_reference.py masked_adamw_lowp_). One pass per
// element: widen the grad, update the fp32 master (or the widened param), write the param
// back rounded to nearest even or stochastically (csrc/stochastic_round.h). No temporaries:
// formats/master.py used to stage fp32 copies of grads and params for the fp32 kernel.
// at::parallel_for over (tensor, chunk) work items, each running the per-capability block
// loop of vec_kernels_impl.h (lowp_chunk: the update in vector lanes, the stochastic
// rounding per element).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../adamw_math.h"
#include "../checks.h"
#include "vec_kernels.h"
#include "work_items.h"

namespace nto {
namespace {

constexpr const char* kOp = "masked_adamw_lowp_";

void masked_adamw_lowp_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList masters,
                           at::TensorList steps, const c10::List<bool>& stochastic,
                           at::IntArrayRef keys, double lr, double beta1, double beta2,
                           double eps, double weight_decay, bool maximize) {
  check_adamw_lowp_meta(params, grads, exp_avgs, exp_avg_sqs, masters, steps, stochastic.size(),
                        keys.size(), lr, beta1, beta2, eps, weight_decay);
  const size_t n = params.size();
  const auto scal = per_tensor_scalars(kOp, steps, lr, beta1, beta2, eps, weight_decay);
  std::vector<int64_t> sizes(n);
  std::vector<char> sr(n);  // c10::List<bool> is read once here, not in the loop
  for (size_t i = 0; i < n; ++i) {
    sr[i] = stochastic.get(i);
    sizes[i] = params[i].numel();
  }
  const auto items = make_work_items(sizes);
  const auto& k = cpu_kernels();
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = items[w];
      const size_t t = it.tensor;
      const uint64_t key = static_cast<uint64_t>(keys[t]);
      AdamWLowpChunk c;
      c.p = params[t].data_ptr();
      c.g = grads[t].const_data_ptr();
      c.m = exp_avgs[t].data_ptr<float>();
      c.v = exp_avg_sqs[t].data_ptr<float>();
      c.master = masters.empty() ? nullptr : masters[t].data_ptr<float>();
      c.begin = it.begin;
      c.n = it.end - it.begin;
      c.p_type = params[t].scalar_type() == at::kBFloat16 ? FType::BF16 : FType::F16;
      c.stochastic = sr[t] != 0;
      c.maximize = maximize;
      c.k1 = static_cast<uint32_t>(key);
      c.k2 = static_cast<uint32_t>(key >> 32);
      k.adamw_lowp(c, scal[t]);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CPU, m) { m.impl("masked_adamw_lowp_", &masked_adamw_lowp_cpu); }

}  // namespace nto
