// param_stats on CPU: numel, sum of squares (double), abs-max and a 256-bin histogram of
// the IEEE fp32 exponent field of |x|, in one pass over each tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstring>

#include "../checks.h"
#include "work_items.h"

namespace nto {
namespace {

struct Partial {
  double sumsq = 0.0;
  float absmax = 0.0f;
  std::array<int64_t, 256> hist{};
};

inline uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

// absmax propagates NaN (as torch.amax does): NaN > anything is false, so track it apart.
template <typename T>
void scan(const T* x, int64_t n, Partial& out) {
  // Four sub-histograms break the store-to-load chain on runs of equal exponents.
  uint32_t h[4][256];
  std::memset(h, 0, sizeof(h));
  double acc = 0.0;
  float amax = 0.0f;
  bool nan = false;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    float f0 = static_cast<float>(x[i]), f1 = static_cast<float>(x[i + 1]);
    float f2 = static_cast<float>(x[i + 2]), f3 = static_cast<float>(x[i + 3]);
    // Squares of fp32 values are exact in double; only the summation order rounds.
    const double d0 = f0, d1 = f1, d2 = f2, d3 = f3;
    acc += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    uint32_t b0 = float_bits(f0), b1 = float_bits(f1), b2 = float_bits(f2), b3 = float_bits(f3);
    h[0][(b0 >> 23) & 0xFF]++;
    h[1][(b1 >> 23) & 0xFF]++;
    h[2][(b2 >> 23) & 0xFF]++;
    h[3][(b3 >> 23) & 0xFF]++;
    float a = std::fmax(std::fmax(std::fabs(f0), std::fabs(f1)),
                        std::fmax(std::fabs(f2), std::fabs(f3)));
    amax = std::fmax(amax, a);
    nan |= (f0 != f0) | (f1 != f1) | (f2 != f2) | (f3 != f3);
  }
  for (; i < n; ++i) {
    float f = static_cast<float>(x[i]);
    acc += static_cast<double>(f) * f;
    h[0][(float_bits(f) >> 23) & 0xFF]++;
    amax = std::fmax(amax, std::fabs(f));
    nan |= (f != f);
  }
  out.sumsq = acc;
  out.absmax = nan ? NAN : amax;
  for (int e = 0; e < 256; ++e) out.hist[e] = (int64_t)h[0][e] + h[1][e] + h[2][e] + h[3][e];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> param_stats_cpu(at::TensorList ts) {
  check_float_list("param_stats", "tensors", ts);
  if (!ts.empty()) check_same_device("param_stats", "tensors", ts, ts[0].device());
  const int64_t n = ts.size();
  std::vector<int64_t> sizes(n);
  for (int64_t i = 0; i < n; ++i) sizes[i] = ts[i].numel();
  auto items = make_work_items(sizes);
  std::vector<Partial> parts(items.size());

  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = items[w];
      const auto& t = ts[it.tensor];
      const int64_t len = it.end - it.begin;
      switch (t.scalar_type()) {
        case at::kFloat: scan(t.const_data_ptr<float>() + it.begin, len, parts[w]); break;
        case at::kBFloat16:
          scan(t.const_data_ptr<at::BFloat16>() + it.begin, len, parts[w]);
          break;
        default: scan(t.const_data_ptr<at::Half>() + it.begin, len, parts[w]); break;
      }
    }
  });

  auto numel = at::empty({n}, at::kLong);
  auto sumsq = at::zeros({n}, at::kDouble);
  auto absmax = at::zeros({n}, at::kFloat);
  auto hist = at::zeros({n, 256}, at::kLong);
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
    for (int e = 0; e < 256; ++e) ph[t * 256 + e] += parts[w].hist[e];
  }
  return {numel, sumsq, absmax, hist};
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CPU, m) { m.impl("param_stats", &param_stats_cpu); }

}  // namespace nto
