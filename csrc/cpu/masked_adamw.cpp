// masked_adamw_ on CPU: torch.optim.AdamW's update over whole tensors or at sorted unique
// positions, all tensors in one call. Checks everything first (metadata, index values,
// step counts); then at::parallel_for over (tensor, chunk) work items, each running the
// per-capability vector loop of vec_kernels_impl.h, which checks each position again where
// it reads it (another thread may change the indices meanwhile: index_fault.h).
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

constexpr const char* kOp = "masked_adamw_";

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs,
                      const c10::List<std::optional<at::Tensor>>& indices, at::TensorList steps,
                      double lr, double beta1, double beta2, double eps, double weight_decay) {
  check_adamw_meta(params, grads, exp_avgs, exp_avg_sqs, indices, steps, lr, beta1, beta2, eps,
                   weight_decay);
  const size_t n = params.size();
  const std::vector<double> scalar_steps =
      checked_indices_and_steps(kOp, params, index_tensors(indices), steps);

  const AdamWScalars base = adamw_scalars(lr, beta1, beta2, eps, weight_decay);
  std::vector<AdamWScalars> scal(n, base);
  std::vector<AdamWChunk> proto(n);
  std::vector<int64_t> sizes(n);
  for (size_t i = 0; i < n; ++i) {
    std::optional<at::Tensor> o = indices.get(i);
    const bool indexed = o.has_value() && o->defined();
    AdamWChunk& c = proto[i];
    c.p = params[i].data_ptr();
    c.g = grads[i].const_data_ptr();
    c.m = exp_avgs[i].data_ptr();
    c.v = exp_avg_sqs[i].data_ptr();
    c.s_type = ftype(exp_avgs[i].scalar_type());
    c.idx = indexed ? o->const_data_ptr() : nullptr;
    c.idx64 = indexed && o->scalar_type() == at::kLong;
    c.p_numel = params[i].numel();
    c.p_type = ftype(params[i].scalar_type());
    c.g_type = ftype(grads[i].scalar_type());
    sizes[i] = indexed ? o->numel() : params[i].numel();
    c.g_dense = indexed && grads[i].numel() != sizes[i];
    adamw_step_scalars(lr, beta1, beta2, scalar_steps[i], &scal[i].neg_step_size,
                       &scal[i].bc2_sqrt);
  }

  const auto items = make_work_items(sizes);
  std::vector<IndexFault> faults(items.size());  // indices changed after the checks
  const auto& k = cpu_kernels();
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = items[w];
      AdamWChunk c = proto[it.tensor];
      const int64_t b = it.begin;
      c.n = it.end - it.begin;
      const int64_t gsize = grads[it.tensor].element_size();
      const int64_t ssize = exp_avgs[it.tensor].element_size();
      c.m = static_cast<char*>(c.m) + b * ssize;
      c.v = static_cast<char*>(c.v) + b * ssize;
      if (c.idx) {
        c.idx = static_cast<const char*>(c.idx) + b * (c.idx64 ? 8 : 4);
        if (!c.g_dense) c.g = static_cast<const char*>(c.g) + b * gsize;
      } else {
        c.p = static_cast<char*>(c.p) + b * params[it.tensor].element_size();
        c.g = static_cast<const char*>(c.g) + b * gsize;
      }
      k.adamw(c, scal[it.tensor], &faults[w]);
    }
  });
  raise_first_fault(
      kOp, items, faults, [&](int64_t t) { return params[t].numel(); },
      [](int64_t t) { return "params[" + std::to_string(t) + "]"; });
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CPU, m) { m.impl("masked_adamw_", &masked_adamw_cpu); }

}  // namespace nto
