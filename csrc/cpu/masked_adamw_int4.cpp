// masked_adamw_int4_ on CPU: AdamW over whole tensors whose two moments share one byte per
// element (nto_ext/formats/int4.py; the spec: nto_ext/_reference.py masked_adamw_int4_).
// Checks everything first (metadata, step counts); then at::parallel_for over (tensor,
// chunk) work items (chunks start on block boundaries), each block of kQ4Block elements
// in one pass: decode (one byte: |qm| in bits 7-4, qw in bits 3-1, qm's sign in bit 0),
// AdamW's update (adamw_math.h, the 8-bit format's variant), new
// scales from the block's maxima, encode. Scalar code: the per-element update is the same
// op sequence the vector kernels run, and the block is small enough to stay in L1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <vector>

#include "../adamw_math.h"
#include "../checks.h"
#include "work_items.h"

namespace nto {
namespace {

constexpr const char* kOp = "masked_adamw_int4_";
constexpr int kMTop = 15, kWTop = 7;  // _reference.Q4_M_LEVELS, Q4_W_LEVELS
constexpr float kMSquare = 225.0f, kWSquare = 49.0f;  // levels^2, exact
static_assert(kChunk % kQ4Block == 0, "work items start on block boundaries");

// NaN-propagating running maximum (torch's amax): once NaN, it stays NaN.
inline float max_nan(float acc, float x) { return (x != x || x > acc) ? x : acc; }

// One block of kQ4Block elements, `cnt` of them real: the rest of the block is the
// reference's zero padding (p = g = 0, levels 0), updated and counted in the maxima as
// there, never stored.
template <typename P, typename G>
void adamw_q4_block(P* p, const G* g, uint8_t* codes, float* sm, float* sw, int64_t cnt,
                    const AdamWScalars& s) {
  float mb[kQ4Block], wb[kQ4Block];
  const float old_sm = *sm, old_sw = *sw;
  float amax_m = 0.0f, amax_w = 0.0f;
  for (int64_t j = 0; j < kQ4Block; ++j) {
    const bool real = j < cnt;
    const int code = real ? codes[j] : 0;  // (|qm| << 4) | (qw << 1) | (qm < 0)
    const int mag = code >> 4, qw = (code >> 1) & 7;
    float m = static_cast<float>((code & 1) ? -mag * mag : mag * mag) * old_sm;
    const float w = static_cast<float>(qw * qw) * old_sw;
    float v = w * w;
    float pj = real ? static_cast<float>(p[j]) : 0.0f;
    const float gj = real ? static_cast<float>(g[j]) : 0.0f;
    const float root = adamw_update_q8(pj, gj, m, v, s, s.neg_step_size, s.inv_bc2_sqrt);
    if (real) p[j] = static_cast<P>(pj);
    mb[j] = m, wb[j] = root;
    amax_m = max_nan(amax_m, std::fabs(m));
    amax_w = max_nan(amax_w, root);
  }
  const float new_sm = amax_m / kMSquare, new_sw = amax_w / kWSquare;
  *sm = new_sm, *sw = new_sw;
  const float inv_m = q8_inverse(new_sm), inv_w = q8_inverse(new_sw);
  for (int64_t j = 0; j < cnt; ++j) {
    const float um = q8_level_of(std::fabs(mb[j]) * inv_m, static_cast<float>(kMTop));
    float uw = q8_level_of(wb[j] * inv_w, static_cast<float>(kWTop));
    if (uw == 0.0f && wb[j] > 0.0f) uw = 1.0f;  // a positive root keeps a level
    const int negative = mb[j] < 0.0f && um > 0.0f;
    codes[j] = static_cast<uint8_t>((static_cast<int>(um) << 4) | (static_cast<int>(uw) << 1) |
                                    negative);
  }
}

template <typename P, typename G>
void adamw_q4_range(const at::Tensor& p, const at::Tensor& g, const at::Tensor& c,
                    const at::Tensor& sm, const at::Tensor& sw, int64_t begin, int64_t end,
                    const AdamWScalars& s) {
  P* pp = static_cast<P*>(p.data_ptr());
  const G* gp = static_cast<const G*>(g.const_data_ptr());
  uint8_t* cp = c.data_ptr<uint8_t>();
  float* smp = sm.data_ptr<float>();
  float* swp = sw.data_ptr<float>();
  for (int64_t j = begin; j < end; j += kQ4Block)
    adamw_q4_block(pp + j, gp + j, cp + j, smp + j / kQ4Block, swp + j / kQ4Block,
                   std::min<int64_t>(kQ4Block, end - j), s);
}

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
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = items[w];
      const size_t t = it.tensor;
      const at::Tensor &p = params[t], &g = grads[t];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), kOp, [&] {
        if (g.scalar_type() == p.scalar_type())
          adamw_q4_range<scalar_t, scalar_t>(p, g, codes[t], exp_avg_scales[t],
                                             exp_avg_sq_scales[t], it.begin, it.end, scal[t]);
        else  // the checks allow only the param's dtype or fp32
          adamw_q4_range<scalar_t, float>(p, g, codes[t], exp_avg_scales[t],
                                          exp_avg_sq_scales[t], it.begin, it.end, scal[t]);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CPU, m) { m.impl("masked_adamw_int4_", &masked_adamw_int4_cpu); }

}  // namespace nto
