// masked_adamw_int4_ on CPU: AdamW over whole tensors whose two moments share one byte per
// element (nto_ext/formats/int4.py; the spec: nto_ext/_reference.py masked_adamw_int4_).
// Checks everything first (metadata, step counts); then at::parallel_for over (tensor,
// chunk) work items (chunks start on block boundaries), each running the per-capability
// block loop of vec_kernels_impl.h: decode, update, encode, one pass per block of 64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../adamw_math.h"
#include "../checks.h"
#include "ftype.h"
#include "vec_kernels.h"
#include "work_items.h"

namespace nto {
namespace {

constexpr const char* kOp = "masked_adamw_int4_";
static_assert(kChunk % kQ4Block == 0, "work items start on block boundaries");

void masked_adamw_int4_cpu(at::TensorList params, at::TensorList grads, at::TensorList codes,
                           at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                           at::TensorList steps, double lr, double beta1, double beta2,
                           double eps, double weight_decay) {
  check_adamw_int4_meta(params, grads, codes, exp_avg_scales, exp_avg_sq_scales, steps, lr,
                        beta1, beta2, eps, weight_decay);
  const auto scal = per_tensor_scalars(kOp, steps, lr, beta1, beta2, eps, weight_decay);
  std::vector<int64_t> sizes(params.size());
  for (size_t i = 0; i < params.size(); ++i) sizes[i] = params[i].numel();
  const auto items = make_work_items(sizes);
  const auto& k = cpu_kernels();
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = items[w];
      const size_t t = it.tensor;
      const int64_t b = it.begin;
      AdamWQ4Chunk c;
      c.p = static_cast<char*>(params[t].data_ptr()) + b * params[t].element_size();
      c.g = static_cast<const char*>(grads[t].const_data_ptr()) + b * grads[t].element_size();
      c.codes = codes[t].data_ptr<uint8_t>() + b;
      c.sm = exp_avg_scales[t].data_ptr<float>() + b / kQ4Block;
      c.sw = exp_avg_sq_scales[t].data_ptr<float>() + b / kQ4Block;
      c.n = it.end - b;
      c.p_type = ftype(params[t].scalar_type());
      c.g_type = ftype(grads[t].scalar_type());
      k.adamw_q4(c, scal[t]);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CPU, m) { m.impl("masked_adamw_int4_", &masked_adamw_int4_cpu); }

}  // namespace nto
