// param_stats on CPU: numel, sum of squares (double), abs-max and (unless histogram=False)
// a 256-bin histogram of the IEEE fp32 exponent field of |x|, in one pass over each tensor.
// at::parallel_for over (tensor, chunk) work items; the per-chunk vector scan is
// vec_kernels_impl.h's; partials are combined in item order, so results do not depend on
// the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "ftype.h"
#include "vec_kernels.h"
#include "work_items.h"

namespace nto {
namespace {

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Stats param_stats_cpu(at::TensorList ts, bool histogram) {
  check_float_list("param_stats", "tensors", ts);
  const int64_t n = ts.size();
  std::vector<int64_t> sizes(n);
  for (int64_t i = 0; i < n; ++i) sizes[i] = ts[i].numel();
  const auto items = make_work_items(sizes);
  std::vector<StatsPartial> parts(items.size());
  const auto chunk = histogram ? cpu_kernels().stats : cpu_kernels().sums;

  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = items[w];
      const auto& t = ts[it.tensor];
      const char* base = static_cast<const char*>(t.const_data_ptr());
      chunk(base + it.begin * t.element_size(), ftype(t.scalar_type()), it.end - it.begin,
              &parts[w]);
    }
  });

  auto numel = at::empty({n}, at::kLong);
  auto sumsq = at::zeros({n}, at::kDouble);
  auto absmax = at::zeros({n}, at::kFloat);
  auto hist = at::zeros({n, histogram ? 256 : 0}, at::kLong);
  auto* pn = numel.data_ptr<int64_t>();
  auto* ps = sumsq.data_ptr<double>();
  auto* pa = absmax.data_ptr<float>();
  auto* ph = hist.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) pn[i] = sizes[i];
  for (size_t w = 0; w < items.size(); ++w) {  // fixed order: thread-count independent
    const int64_t t = items[w].tensor;
    ps[t] += parts[w].sumsq;
    const float a = parts[w].absmax;
    pa[t] = (std::isnan(a) || std::isnan(pa[t])) ? NAN : std::fmax(pa[t], a);
    if (histogram)
      for (int e = 0; e < 256; ++e) ph[t * 256 + e] += parts[w].hist[e];
  }
  return {numel, sumsq, absmax, hist};
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CPU, m) { m.impl("param_stats", &param_stats_cpu); }

}  // namespace nto
