// masked_adamw_int8_ on CPU: AdamW over whole tensors, or at sorted unique positions
// (policy="sparse"), whose moments are stored in 8 bits (nto_ext/formats/int8.py; the
// spec: nto_ext/_reference.py masked_adamw_int8_). Checks everything first (metadata,
// positions, step counts); then at::parallel_for over (tensor, chunk) work items (chunks
// start on block boundaries), each running the per-capability block loop of
// vec_kernels_impl.h: dequantize, update, requantize, one pass per block.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../adamw_math.h"
#include "../checks.h"
#include "index_checks.h"
#include "ftype.h"
#include "vec_kernels.h"
#include "work_items.h"

namespace nto {
namespace {

constexpr const char* kOp = "masked_adamw_int8_";
static_assert(kChunk % kQ8Block == 0, "work items start on block boundaries");

void masked_adamw_int8_cpu(at::TensorList params, at::TensorList grads,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                           at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                           const c10::List<std::optional<at::Tensor>>& indices,
                           at::TensorList steps, double lr, double beta1, double beta2,
                           double eps, double weight_decay) {
  check_adamw_int8_meta(params, grads, exp_avgs, exp_avg_sqs, exp_avg_scales,
                        exp_avg_sq_scales, indices, steps, lr, beta1, beta2, eps,
                        weight_decay);
  const size_t n = params.size();
  const std::vector<at::Tensor> idx = index_tensors(indices);
  checked_indices_and_steps(kOp, params, idx, steps);
  const auto scal = per_tensor_scalars(kOp, steps, lr, beta1, beta2, eps, weight_decay);
  std::vector<int64_t> sizes(n);
  for (size_t i = 0; i < n; ++i) sizes[i] = exp_avgs[i].numel();
  const auto items = make_work_items(sizes);
  std::vector<IndexFault> faults(items.size());  // indices changed after the checks
  const auto& k = cpu_kernels();
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = items[w];
      const size_t t = it.tensor;
      const int64_t b = it.begin;
      const at::Tensor& ix = idx[t];
      AdamWQ8Chunk c;
      c.p = static_cast<char*>(params[t].data_ptr()) +
            (ix.defined() ? 0 : b * params[t].element_size());
      c.g = static_cast<const char*>(grads[t].const_data_ptr()) + b * grads[t].element_size();
      c.qm = exp_avgs[t].data_ptr<int8_t>() + b;
      c.qw = exp_avg_sqs[t].data_ptr<uint8_t>() + b;
      c.sm = exp_avg_scales[t].data_ptr<float>() + b / kQ8Block;
      c.sw = exp_avg_sq_scales[t].data_ptr<float>() + b / kQ8Block;
      c.idx64 = ix.defined() && ix.scalar_type() == at::kLong;
      c.idx = ix.defined() ? static_cast<const char*>(ix.const_data_ptr()) + b * (c.idx64 ? 8 : 4)
                           : nullptr;
      c.n = it.end - b;
      c.p_numel = params[t].numel();
      c.p_type = ftype(params[t].scalar_type());
      c.g_type = ftype(grads[t].scalar_type());
      k.adamw_q8(c, scal[t], &faults[w]);
    }
  });
  raise_first_fault(
      kOp, items, faults, [&](int64_t t) { return params[t].numel(); },
      [](int64_t t) { return "params[" + std::to_string(t) + "]"; },
      "Its block of 256 positions was skipped (a block's scales depend on all of them; the "
      "other blocks were updated)");
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CPU, m) { m.impl("masked_adamw_int8_", &masked_adamw_int8_cpu); }

}  // namespace nto
