// The per-element AdamW update, written once for the CPU kernels (at::vec lanes) and the
// CUDA kernels (one float per thread). It reproduces torch.optim.AdamW's
// _single_tensor_adam op by op, each op rounded to fp32 as torch's CPU kernels round it
// (measured against torch 2.13: its lerp and addcmul are fused multiply-adds):
//   p *= decay                                  param.mul_(1 - lr*wd)
//   m  = fma(w, g - m, m)                       exp_avg.lerp_(grad, w = 1-beta1)
//        (w >= 0.5: fma(w - 1, g - m, g))       (torch's lerp switches formula there)
//   v  = fma((1-b2) * g, g, v * b2)             exp_avg_sq.mul_(b2).addcmul_(g, g, 1-b2)
//   p += (neg_step_size * m) / (sqrt(v) / bc2_sqrt + eps)        denom; param.addcdiv_
// The scalars are computed in double and rounded to fp32 once, as torch converts Python
// floats to an fp32 kernel's scalar type.
//
// Stable API (CUDA includes this; keep the signatures):
//   struct AdamWScalars;  AdamWScalars adamw_scalars(lr, beta1, beta2, eps, weight_decay);
//   void adamw_step_scalars(lr, beta1, beta2, double step, float* neg_step_size, float* bc2_sqrt);
//   template <T> void adamw_update(T& p, T g, T& m, T& v, const AdamWScalars&, T neg_step_size,
//                                  T bc2_sqrt);     // T = float, or a SIMD type with FloatOps<T>
//   template <T> T adamw_update_q8(...);  // the 8-bit format's variant, returning sqrt(new v)
// Every op is explicitly rounded: the CPU build passes -ffp-contract=off, and on the device
// the __f*_rn intrinsics keep nvcc's default fmad contraction out. The functions are
// `static` (one private copy per translation unit): the CPU's AVX2/AVX-512 variants include
// this header after a `#pragma GCC target`, and a shared out-of-line copy compiled for
// AVX-512 must never be picked by the linker for the portable code.
#pragma once
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NTO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NTO_HOST_DEVICE inline
#endif

namespace nto {

struct AdamWScalars {
  float decay;          // 1 - lr * weight_decay
  float lerp_coeff;     // w = 1 - beta1 when w < 0.5, else w - 1 (torch's lerp formulas)
  bool lerp_from_m;     // true: m = fma(w, g-m, m); false: m = fma(w-1, g-m, g)
  float beta2;          // beta2
  float one_minus_b2;   // 1 - beta2
  float eps;            // eps
  float neg_step_size;  // -(lr / (1 - beta1^step)) for a scalar step
  float bc2_sqrt;       // sqrt(1 - beta2^step) for a scalar step
  float inv_bc2_sqrt;   // 1 / sqrt(1 - beta2^step): the 8-bit path (adamw_update_q8) only
};

// Bias corrections in double from the step count (the count after incrementing, >= 1),
// exactly as torch computes them from a Python float step.
static NTO_HOST_DEVICE void adamw_step_scalars(double lr, double beta1, double beta2,
                                               double step, float* neg_step_size,
                                               float* bc2_sqrt) {
  const double bc1 = 1.0 - pow(beta1, step);
  const double bc2 = 1.0 - pow(beta2, step);
  *neg_step_size = static_cast<float>(-(lr / bc1));
  *bc2_sqrt = static_cast<float>(sqrt(bc2));
}

// 1 / sqrt(1 - beta2^step) in double, rounded to fp32 once (the 8-bit path's factor).
static NTO_HOST_DEVICE float adamw_inv_bc2_sqrt(double beta2, double step) {
  return static_cast<float>(1.0 / sqrt(1.0 - pow(beta2, step)));
}

// Hyper-parameter scalars, plus the per-step pair for `step` (pass 1 if steps vary by tensor).
static NTO_HOST_DEVICE AdamWScalars adamw_scalars(double lr, double beta1, double beta2,
                                                  double eps, double weight_decay,
                                                  double step = 1.0) {
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  const float w = static_cast<float>(1.0 - beta1);
  s.lerp_from_m = fabsf(w) < 0.5f;
  s.lerp_coeff = s.lerp_from_m ? w : w - 1.0f;
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_b2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  adamw_step_scalars(lr, beta1, beta2, step, &s.neg_step_size, &s.bc2_sqrt);
  s.inv_bc2_sqrt = adamw_inv_bc2_sqrt(beta2, step);
  return s;
}

// Correctly rounded fp32 operations on T. Specialized for float here; the CPU kernels
// specialize it for at::vec::Vectorized<float> (csrc/cpu/vec_kernels_impl.h).
template <typename T>
struct FloatOps;

template <>
struct FloatOps<float> {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  static __device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
  static __device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
  static __device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
  static __device__ __forceinline__ float div(float a, float b) { return __fdiv_rn(a, b); }
  static __device__ __forceinline__ float sqrt(float a) { return __fsqrt_rn(a); }
  static __device__ __forceinline__ float fma(float a, float b, float c) {
    return __fmaf_rn(a, b, c);
  }
  static __device__ __forceinline__ float splat(float a) { return a; }
#else
  static inline float mul(float a, float b) { return a * b; }
  static inline float add(float a, float b) { return a + b; }
  static inline float sub(float a, float b) { return a - b; }
  static inline float div(float a, float b) { return a / b; }
  static inline float sqrt(float a) { return std::sqrt(a); }
  static inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
  static inline float splat(float a) { return a; }
#endif
};

// The decay and both moments of one element (or one SIMD lane group), in place.
template <typename T>
static NTO_HOST_DEVICE void adamw_moments(T& p, T g, T& m, T& v, const AdamWScalars& s) {
  using O = FloatOps<T>;
  p = O::mul(p, O::splat(s.decay));
  const T diff = O::sub(g, m);
  m = O::fma(O::splat(s.lerp_coeff), diff, s.lerp_from_m ? m : g);
  v = O::fma(O::mul(O::splat(s.one_minus_b2), g), g, O::mul(v, O::splat(s.beta2)));
}

// One element (or one SIMD lane group), fp32; p, m, v are updated in place.
// neg_step_size / bc2_sqrt are arguments: each tensor's step count supplies its own pair.
template <typename T>
static NTO_HOST_DEVICE void adamw_update(T& p, T g, T& m, T& v, const AdamWScalars& s,
                                         T neg_step_size, T bc2_sqrt) {
  using O = FloatOps<T>;
  adamw_moments(p, g, m, v, s);
  const T denom = O::add(O::div(O::sqrt(v), bc2_sqrt), O::splat(s.eps));
  p = O::add(p, O::div(O::mul(neg_step_size, m), denom));
}

// The 8-bit format's update (nto_ext/formats/int8.py): AdamW's, but sqrt(v) is multiplied
// by inv_bc2_sqrt = 1 / sqrt(1 - beta2^step) (rounded once, from double) instead of divided
// by its inverse: one division less per element, where the divider is the bottleneck (the
// moments are quantized anyway). Returns sqrt(v), the root the format stores.
template <typename T>
static NTO_HOST_DEVICE T adamw_update_q8(T& p, T g, T& m, T& v, const AdamWScalars& s,
                                         T neg_step_size, T inv_bc2_sqrt) {
  using O = FloatOps<T>;
  adamw_moments(p, g, m, v, s);
  const T root = O::sqrt(v);
  const T denom = O::add(O::mul(root, inv_bc2_sqrt), O::splat(s.eps));
  p = O::add(p, O::div(O::mul(neg_step_size, m), denom));
  return root;
}

// The 8-bit moments' map (nto_ext/_reference.py quantize_q8 / dequantize_q8, the spec):
// blocks of kQ8Block elements; exp_avg m = q|q| * sm, q in [-127, 127], sm = max|m| / 127^2;
// the root w of exp_avg_sq: w = q^2 * sw, q in [0, 255], sw = max w / 255^2; levels
// q = the number of k in 1..top with (k - 1/2)^2 <= y, y = |x| * fp32(1 / scale) (0 for
// scale 0; NaN -> 0), a positive w at least 1: sqrt(y) rounded half up, decided by exact
// comparisons (the thresholds (k -+ 1/2)^2 are exact in fp32), so an estimate of sqrt(y)
// within one level, corrected by two comparisons, gives the same bits on every target.
constexpr int kQ8Block = 256;
constexpr float kQ8MLevels = 127.0f, kQ8WLevels = 255.0f;
constexpr float kQ8MSquare = 16129.0f, kQ8WSquare = 65025.0f;  // levels^2, exact

// The 4-bit format (_reference.quantize_q4): both moments in one byte per element, the same
// maps with 15 levels a side for m and 7 for the root w, blocks of kQ4Block; the byte is
// |q_m| << 4 | q_w << 1 | (q_m < 0).
constexpr int kQ4Block = 64;
constexpr float kQ4MLevels = 15.0f, kQ4WLevels = 7.0f;
constexpr float kQ4MSquare = 225.0f, kQ4WSquare = 49.0f;  // levels^2, exact

static NTO_HOST_DEVICE float q8_inverse(float scale) {
  return scale > 0.0f ? FloatOps<float>::div(1.0f, scale) : 0.0f;
}

// The level of y = |x| * inv (see above), at most top, NaN -> 0, from an estimate
// k = rint(sqrt(y clamped to [1, (top - 1/2)^2])) clamped to [1, top - 1]: the level is
// k - 1, k or k + 1, decided by y against (k - 1/2)^2 and (k + 1/2)^2 (the clamps keep
// the estimate finite and within one level for y = 0, inf or subnormal). Scalar form of
// the CPU's vector q8_levels; CUDA uses it per thread.
static NTO_HOST_DEVICE float q8_level_of(float y, float top) {
  const float t_hi = (top - 0.5f) * (top - 0.5f);
  const float c = y != y ? 1.0f : fminf(fmaxf(y, 1.0f), t_hi);
  const float k = fminf(fmaxf(rintf(FloatOps<float>::sqrt(c)), 1.0f), top - 1.0f);
  const float lo = (k - 0.5f) * (k - 0.5f), hi = (k + 0.5f) * (k + 0.5f);
  const float u = (k - 1.0f) + (y >= lo ? 1.0f : 0.0f) + (y >= hi ? 1.0f : 0.0f);
  return y != y ? 0.0f : u;
}

}  // namespace nto
