// adamw_first_step_ on CPU: the first update of a fresh AdamW state over whole contiguous
// params, the moments zero and kept nowhere (nto_ext/formats/none.py; spec:
// nto_ext/_reference.py adamw_first_step_). One read of p and g, one write of p.
// at::parallel_for over (tensor, chunk) work items, each running the per-capability block
// loop of vec_kernels_impl.h (first_chunk: masked_adamw_'s vector update on zero moments).
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

void adamw_first_step_cpu(at::TensorList params, at::TensorList grads, double lr, double beta1,
                          double beta2, double eps, double weight_decay) {
  check_adamw_first_meta(params, grads, lr, beta1, beta2, eps, weight_decay);
  const size_t n = params.size();
  const AdamWScalars s = adamw_scalars(lr, beta1, beta2, eps, weight_decay, /*step=*/1.0);
  std::vector<int64_t> sizes(n);
  for (size_t i = 0; i < n; ++i) sizes[i] = params[i].numel();
  const auto items = make_work_items(sizes);
  const auto& k = cpu_kernels();
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = items[w];
      const at::Tensor& p = params[it.tensor];
      const at::Tensor& g = grads[it.tensor];
      AdamWFirstChunk c;
      c.p = static_cast<char*>(p.data_ptr()) + it.begin * p.element_size();
      c.g = static_cast<const char*>(g.const_data_ptr()) + it.begin * g.element_size();
      c.n = it.end - it.begin;
      c.p_type = ftype(p.scalar_type());
      c.g_type = ftype(g.scalar_type());
      k.adamw_first(c, s);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CPU, m) { m.impl("adamw_first_step_", &adamw_first_step_cpu); }

}  // namespace nto
