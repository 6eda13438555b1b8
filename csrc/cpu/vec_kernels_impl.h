// Per-capability inner loops; included once by each of kernels_{default,avx2,avx512}.cpp,
// which define CPU_CAPABILITY / CPU_CAPABILITY_<X> (so ATen's at::vec picks its AVX2 /
// AVX-512 implementation, in its own namespace at::vec::<X>) and NTO_CAP_NS (our own
// namespace for the same reason: no symbol is shared between the variants).
// Rules for this file: no static data with initializers, no ATen tensors, no TORCH_CHECK.
#ifndef NTO_CAP_NS
#error "include vec_kernels_impl.h from kernels_<capability>.cpp only"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../stochastic_round.h"
#include "vec_kernels.h"

namespace nto {

// Correctly rounded fp32 operations on at::vec lanes (see adamw_math.h). Vectorized<float>
// lives in at::vec::<capability>, so each variant's specialization is a distinct type.
template <>
struct FloatOps<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  static inline V mul(V a, V b) { return a * b; }
  static inline V add(V a, V b) { return a + b; }
  static inline V sub(V a, V b) { return a - b; }
  static inline V div(V a, V b) { return a / b; }
  static inline V sqrt(V a) { return a.sqrt(); }
  static inline V splat(float a) { return V(a); }
  static inline V fma(V a, V b, V c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    return at::vec::fmadd(a, b, c);  // one vfmadd: a single rounding
#else
    // The generic at::vec::fmadd is a*b+c with two roundings; torch's own is fused.
    float x[V::size()], y[V::size()], z[V::size()];
    a.store(x);
    b.store(y);
    c.store(z);
    for (int i = 0; i < V::size(); ++i) x[i] = std::fma(x[i], y[i], z[i]);
    return V::loadu(x);
#endif
  }
};

namespace NTO_CAP_NS {
namespace {

// Software prefetch distance for the streaming loops, which do enough work per cache line
// for the hardware prefetcher to fall behind (measured here: 2 KiB beats 4 and 8 KiB).
constexpr int64_t kPrefetchBytes = 2048;

// The cache lines kPrefetchBytes ahead of `count` elements at p.
template <typename T>
inline void prefetch_ahead(const T* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p) + kPrefetchBytes;
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(T)); b += 64)
    __builtin_prefetch(c + b);
}

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
constexpr int64_t kW = 2 * kV;  // elements per block: two float vectors = one 16-bit vector

// Two float vectors from kW elements of T (widened exactly), and back (rounded to nearest
// even, once).
template <typename T>
inline void load2(const T* src, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = Vec::loadu(src);
    b = Vec::loadu(src + kV);
  } else {
    at::vec::load_to_float(src, a, b);
  }
}

template <typename T>
inline void store2(T* dst, const Vec& a, const Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(dst);
    b.store(dst + kV);
  } else {
    at::vec::convert_from_float<T>(a, b).store(dst);
  }
}

// One block of kW contiguous elements (p/g possibly gathered into buffers by the caller).
// Moments of type S (fp32, or bf16: widened, and rounded to nearest even once stored).
template <typename P, typename G, typename S>
inline void adamw_block(P* p, const G* g, S* m, S* v, const AdamWScalars& s) {
  Vec p0, p1, g0, g1, m0, m1, v0, v1;
  load2(p, p0, p1);
  load2(g, g0, g1);
  load2(m, m0, m1);
  load2(v, v0, v1);
  const Vec nss(s.neg_step_size), bc2(s.bc2_sqrt);
  adamw_update(p0, g0, m0, v0, s, nss, bc2);
  adamw_update(p1, g1, m1, v1, s, nss, bc2);
  store2(p, p0, p1);
  store2(m, m0, m1);
  store2(v, v0, v1);
}

// A block of cnt indexed positions of which some were out of range when read (pos: as
// read; another thread changed the indices after the op's checks). Cold: only a racing
// writer gets here. The in-range positions go through the same vector code as always; the
// others are not read or written (p, g, m and v alike) and the first is noted in `fault`.
template <typename P, typename G, typename S>
__attribute__((noinline, cold)) void adamw_block_masked(const AdamWChunk& c,
                                                        const AdamWScalars& s, int64_t j,
                                                        int64_t cnt, const int64_t* pos,
                                                        IndexFault* fault) {
  P* p = static_cast<P*>(c.p);
  const G* g = static_cast<const G*>(c.g);
  S* const m = static_cast<S*>(c.m);
  S* const v = static_cast<S*>(c.v);
  alignas(64) P pb[kW];
  alignas(64) G gb[kW];
  alignas(64) S mb[kW], vb[kW];
  std::memset(pb, 0, sizeof(pb));
  std::memset(gb, 0, sizeof(gb));
  std::memset(mb, 0, sizeof(mb));
  std::memset(vb, 0, sizeof(vb));
  for (int64_t t = 0; t < cnt; ++t) {
    if (!in_range(pos[t], c.p_numel)) {
      fault->note(j + t, pos[t]);
      continue;
    }
    pb[t] = p[pos[t]];
    gb[t] = c.g_dense ? g[pos[t]] : g[j + t];
    mb[t] = m[j + t];
    vb[t] = v[j + t];
  }
  adamw_block(pb, gb, mb, vb, s);
  for (int64_t t = 0; t < cnt; ++t) {
    if (!in_range(pos[t], c.p_numel)) continue;
    p[pos[t]] = pb[t];
    m[j + t] = mb[t];
    v[j + t] = vb[t];
  }
}

// Dense or indexed chunk. Full dense blocks run in place; indexed blocks gather p (and a
// dense g) into small buffers; the last partial block runs on zero-padded buffers, so every
// element goes through the same vector code (dense and indexed results are bit-identical).
//
// Indexed blocks read their kW positions once, into `pos`, and check them there against
// the param's size: the op checked the indices before, but with the GIL released another
// thread may change them since; every later use reads `pos`, so no position is used that
// was not checked at its use (a changed one is skipped and reported, never dereferenced).
template <typename P, typename G, typename I, typename S>
void adamw_chunk_t(const AdamWChunk& c, const AdamWScalars& s, IndexFault* fault) {
  P* p = static_cast<P*>(c.p);
  const G* g = static_cast<const G*>(c.g);
  const I* idx = static_cast<const I*>(c.idx);
  S* const m = static_cast<S*>(c.m);
  S* const v = static_cast<S*>(c.v);
  const bool indexed = idx != nullptr;
  alignas(64) P pb[kW];
  alignas(64) G gb[kW];
  alignas(64) S mb[kW], vb[kW];
  alignas(64) int64_t pos[kW];
  for (int64_t j = 0; j < c.n; j += kW) {
    const int64_t cnt = std::min<int64_t>(kW, c.n - j);
    const bool full = cnt == kW;
    if (!indexed && full) {
      prefetch_ahead(p + j, kW), prefetch_ahead(g + j, kW);
      prefetch_ahead(m + j, kW), prefetch_ahead(v + j, kW);
      adamw_block(p + j, g + j, m + j, v + j, s);
      continue;
    }
    if (indexed) {
      // The gathered params kAhead positions on are fetched now: their lines are scattered,
      // so the hardware prefetcher cannot see them coming. Compact state streams. (A hint:
      // a prefetch never faults, so a changed position does no harm here.)
      constexpr int64_t kAhead = 4 * kW;
      const int64_t stop = std::min(c.n, j + kAhead + kW);
      for (int64_t t = j + kAhead; t < stop; ++t) {
        __builtin_prefetch(p + static_cast<int64_t>(idx[t]), 1);
        if (c.g_dense) __builtin_prefetch(g + static_cast<int64_t>(idx[t]));
      }
      prefetch_ahead(m + j, kW), prefetch_ahead(v + j, kW);
      if (!c.g_dense) prefetch_ahead(g + j, kW);
      bool bad = false;
      for (int64_t t = 0; t < cnt; ++t) {
        pos[t] = static_cast<int64_t>(idx[j + t]);
        bad |= !in_range(pos[t], c.p_numel);
      }
      if (bad) {
        adamw_block_masked<P, G, S>(c, s, j, cnt, pos, fault);
        continue;
      }
      // A run of kW consecutive positions (first and last in range and kW - 1 apart: the
      // param block, and a dense grad's, is contiguous and in range; no gather needed).
      if (full && pos[kW - 1] - pos[0] == kW - 1) {
        adamw_block(p + pos[0], c.g_dense ? g + pos[0] : g + j, m + j, v + j, s);
        continue;
      }
    }
    if (!full) {  // zero padding: finite garbage-free lanes, never stored
      std::memset(pb, 0, sizeof(pb));
      std::memset(gb, 0, sizeof(gb));
      std::memset(mb, 0, sizeof(mb));
      std::memset(vb, 0, sizeof(vb));
    }
    const G* gp = g + j;  // compact (or dense, unindexed) grads are read in place
    for (int64_t t = 0; t < cnt; ++t) pb[t] = p[indexed ? pos[t] : j + t];
    if ((indexed && c.g_dense) || !full) {
      for (int64_t t = 0; t < cnt; ++t) gb[t] = (indexed && c.g_dense) ? g[pos[t]] : g[j + t];
      gp = gb;
    }
    S* mp = m + j;
    S* vp = v + j;
    if (!full) {
      std::memcpy(mb, mp, cnt * sizeof(S));
      std::memcpy(vb, vp, cnt * sizeof(S));
      mp = mb, vp = vb;
    }
    adamw_block(pb, gp, mp, vp, s);
    for (int64_t t = 0; t < cnt; ++t) p[indexed ? pos[t] : j + t] = pb[t];
    if (!full) {
      std::memcpy(m + j, mb, cnt * sizeof(S));
      std::memcpy(v + j, vb, cnt * sizeof(S));
    }
  }
}

template <typename P, typename G, typename S>
void adamw_chunk_pgs(const AdamWChunk& c, const AdamWScalars& s, IndexFault* f) {
  if (c.idx == nullptr || !c.idx64)
    adamw_chunk_t<P, G, int32_t, S>(c, s, f);
  else
    adamw_chunk_t<P, G, int64_t, S>(c, s, f);
}

template <typename P, typename G>
void adamw_chunk_pg(const AdamWChunk& c, const AdamWScalars& s, IndexFault* f) {
  if (c.s_type == FType::F32)
    adamw_chunk_pgs<P, G, float>(c, s, f);
  else  // the checks allow fp32 and bf16 moments
    adamw_chunk_pgs<P, G, c10::BFloat16>(c, s, f);
}

template <typename P>
void adamw_chunk_p(const AdamWChunk& c, const AdamWScalars& s, IndexFault* f) {
  if (c.g_type == FType::F32)
    adamw_chunk_pg<P, float>(c, s, f);
  else if constexpr (!std::is_same_v<P, float>)
    adamw_chunk_pg<P, P>(c, s, f);  // checks allow only the param's dtype or fp32
  else if (c.g_type == FType::BF16)  // an fp32 master with the model's bf16/fp16 grad
    adamw_chunk_pg<float, c10::BFloat16>(c, s, f);
  else
    adamw_chunk_pg<float, c10::Half>(c, s, f);
}

void adamw_chunk(const AdamWChunk& c, const AdamWScalars& s, IndexFault* f) {
  switch (c.p_type) {
    case FType::F32: adamw_chunk_p<float>(c, s, f); break;
    case FType::BF16: adamw_chunk_p<c10::BFloat16>(c, s, f); break;
    case FType::F16: adamw_chunk_p<c10::Half>(c, s, f); break;
  }
}

// ------------------------------------------------------------------ masked_adamw_int8_

// Largest lane of lanes >= 0, NaN if any lane is NaN (torch's amax).
inline float lane_max_nan(const Vec& a) {
#if defined(CPU_CAPABILITY_AVX512)
  // No NaN lane (one compare to a mask): the hardware's reduction, then max(+0, r) as the
  // loop below starts from +0 (a block of zeros gives +0, never -0). The same value.
  if (_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) == 0) return std::max(0.0f, _mm512_reduce_max_ps(a));
#elif defined(CPU_CAPABILITY_AVX2)
  if (_mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) == 0) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return std::max(0.0f, _mm_cvtss_f32(m));
  }
#endif
  alignas(64) float x[kV];
  a.store(x);
  float out = 0.0f;
  for (int64_t t = 0; t < kV; ++t) {
    if (std::isnan(x[t])) return x[t];
    out = std::max(out, x[t]);
  }
  return out;
}

// An estimate of sqrt(c) for c in [1, 2^16] within 0.1 (rsqrt: relative error
// <= 1.5 * 2^-12, one cheap instruction instead of the divider's sqrt); q8_levels
// corrects it exactly, so the estimate's bits never reach a result.
inline Vec sqrt_estimate(const Vec& c) {
#if defined(CPU_CAPABILITY_AVX512)
  return c * Vec(_mm512_rsqrt14_ps(c));
#elif defined(CPU_CAPABILITY_AVX2)
  return c * Vec(_mm256_rsqrt_ps(c));
#else
  return c.sqrt();
#endif
}
inline Vec select(const Vec& mask, const Vec& if_set, const Vec& if_clear) {
  return Vec::blendv(if_clear, if_set, mask);
}
// max(y, lo) with NaN -> lo: one instruction on x86 (maxps returns its second operand
// when either is NaN).
inline Vec max_or(const Vec& y, const Vec& lo) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(y, lo);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(y, lo);
#else
  return select(y == y, at::vec::maximum(y, lo), lo);
#endif
}
// min / max of NaN-free lanes in one instruction (at::vec::minimum / maximum add NaN
// propagation).
inline Vec min_finite(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_min_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_min_ps(a, b);
#else
  return at::vec::minimum(a, b);
#endif
}
inline Vec max_finite(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}
// The levels of x (adamw_math.h q8_level_of, per lane): y = |x| * inv; the estimate
// k = rint(sqrt(y clamped to [1, (top - 1/2)^2])) at most top - 1 is within one level
// (the clamp keeps it finite: NaN, 0 and subnormal y estimate 1, inf top - 1), and the
// level is k - 1 plus [y >= (k - 1/2)^2] plus [y >= (k + 1/2)^2] (exact fp32
// thresholds). A NaN y compares false: level k - 1 = 0.
inline Vec q8_levels(const Vec& x, float inv, float top) {
  const Vec y = x.abs() * Vec(inv);
  const Vec one(1.0f), half(0.5f);
  const Vec c = min_finite(max_or(y, one), Vec((top - 0.5f) * (top - 0.5f)));
  const Vec k = min_finite(sqrt_estimate(c).round(), Vec(top - 1.0f));
  const Vec lo = (k - half) * (k - half);
  const Vec hi = at::vec::fmadd(k, Vec(2.0f), lo);  // (k + 1/2)^2: exact, one rounding
#if defined(CPU_CAPABILITY_AVX512)
  // the two steps as masked adds (a compare to a mask register each): the same sums
  const __m512 base = k - one;
  const __m512 up = _mm512_mask_add_ps(base, _mm512_cmp_ps_mask(y, lo, _CMP_GE_OQ), base, one);
  return _mm512_mask_add_ps(up, _mm512_cmp_ps_mask(y, hi, _CMP_GE_OQ), up, one);
#else
  return (k - one) + ((y >= lo) & one) + ((y >= hi) & one);
#endif
}
// kV levels (whole numbers in [-127, 255]: exact conversions) stored as bytes: their low 8
// bits are the int8 level (two's complement) or the uint8 one.
template <typename B>
inline void store_levels(const Vec& x, B* dst) {
  static_assert(sizeof(B) == 1, "levels are bytes");
#if defined(CPU_CAPABILITY_AVX512)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(x)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i q = _mm256_cvttps_epi32(x);  // 8 int32 -> 8 int16 -> 8 bytes (both packs
  const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(q),  // keep values in range)
                                    _mm256_extracti128_si256(q, 1));
  const __m128i b = std::is_signed_v<B> ? _mm_packs_epi16(h, h) : _mm_packus_epi16(h, h);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), b);
#else
  alignas(64) float f[kV];
  x.store(f);
  for (int64_t t = 0; t < kV; ++t) dst[t] = static_cast<B>(static_cast<int>(f[t]));
#endif
}
// The kW moments stored at qm / qw, dequantized (_reference.dequantize_q8): m = q|q| * sm
// and v = w^2 with w = r^2 * sw; the products of small whole numbers are exact.
inline void q8_widen(const int8_t* qm, const uint8_t* qw, Vec* q, Vec* r) {
#if defined(CPU_CAPABILITY_AVX512)
  for (int h = 0; h < 2; ++h) {
    q[h] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(qm + h * kV))));
    r[h] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(qw + h * kV))));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  for (int h = 0; h < 2; ++h) {
    q[h] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
        reinterpret_cast<const __m128i*>(qm + h * kV))));
    r[h] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
        reinterpret_cast<const __m128i*>(qw + h * kV))));
  }
#else
  alignas(64) float a[kW], b[kW];
  for (int64_t t = 0; t < kW; ++t) a[t] = qm[t], b[t] = qw[t];
  for (int h = 0; h < 2; ++h) q[h] = Vec::loadu(a + h * kV), r[h] = Vec::loadu(b + h * kV);
#endif
}
// A positive root's level is at least 1 (no update is divided by eps alone).
inline Vec at_least_one_if_positive(const Vec& level, const Vec& w) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_mask_max_ps(level, _mm512_cmp_ps_mask(w, _mm512_setzero_ps(), _CMP_GT_OQ),
                            level, _mm512_set1_ps(1.0f));
#else
  return max_finite(level, (w > Vec(0.0f)) & Vec(1.0f));
#endif
}
// A block's new scales from the abs-maxima of its new m and root w (lanes >= 0; NaN
// propagates), stored at sm / sw; returns their inverses (q8_inverse) for the levels.
inline std::pair<float, float> store_scales(const Vec& amax_m, const Vec& amax_w,
                                            float m_square, float w_square, float* sm,
                                            float* sw) {
  *sm = lane_max_nan(amax_m) / m_square;
  *sw = lane_max_nan(amax_w) / w_square;
  return {q8_inverse(*sm), q8_inverse(*sw)};
}
// Pass 1 of a quantized block (int8, int4), per vector of decoded moments m and root w:
// AdamW's update of p (adamw_update_q8), the new m and root kept in the block's L1 buffers
// at element `i`, their abs-maxima (for the new scales) tracked.
struct QBlockPass1 {
  const AdamWScalars& s;
  float* mb;
  float* wb;
  const Vec nss = Vec(s.neg_step_size), inv_bc2 = Vec(s.inv_bc2_sqrt);
  Vec amax_m = Vec(0.0f), amax_w = Vec(0.0f);

  void update(Vec& p, const Vec& g, Vec m, const Vec& w, int64_t i) {
    Vec v = w * w;
    const Vec root = adamw_update_q8(p, g, m, v, s, nss, inv_bc2);
    m.store(mb + i);
    root.store(wb + i);
    amax_m = at::vec::maximum(amax_m, m.abs());
    amax_w = at::vec::maximum(amax_w, root);
  }
};
// One block of kQ8Block elements (a partial block: the caller's zero-padded copies, whose
// padding dequantizes and updates to zeros): pass 1 dequantizes, updates p and keeps the
// new m and root w = sqrt(v) in L1 buffers with their abs-max; pass 2 takes the block's
// new scales and stores the levels (_reference.quantize_q8).
template <typename P, typename G>
inline void adamw_q8_block(P* p, const G* g, int8_t* qm, uint8_t* qw, float* sm, float* sw,
                           const AdamWScalars& s) {
  alignas(64) float mb[kQ8Block], wb[kQ8Block];
  const Vec s_m(*sm), s_w(*sw);
  QBlockPass1 pass{s, mb, wb};
  for (int64_t j = 0; j < kQ8Block; j += kW) {
    Vec pv[2], gv[2], q[2], r[2];
    load2(p + j, pv[0], pv[1]);
    load2(g + j, gv[0], gv[1]);
    q8_widen(qm + j, qw + j, q, r);
    for (int h = 0; h < 2; ++h)
      pass.update(pv[h], gv[h], (q[h] * q[h].abs()) * s_m, (r[h] * r[h]) * s_w, j + h * kV);
    store2(p + j, pv[0], pv[1]);
  }
  const auto [inv_m, inv_w] =
      store_scales(pass.amax_m, pass.amax_w, kQ8MSquare, kQ8WSquare, sm, sw);
  const Vec sign(-0.0f);
  for (int64_t j = 0; j < kQ8Block; j += kV) {
    const Vec m = Vec::loadu(mb + j), w = Vec::loadu(wb + j);
    store_levels(q8_levels(m, inv_m, kQ8MLevels) | (m & sign), qm + j);  // signed (-0: 0)
    store_levels(at_least_one_if_positive(q8_levels(w, inv_w, kQ8WLevels), w), qw + j);
  }
}
// Indexed (policy="sparse"): a block's params are read at its positions, each checked where
// it is read. A block of 256 consecutive positions (first and last 255 apart: they are
// sorted and unique) is updated in place like a dense one; any other is gathered into a
// copy, updated there and scattered back. A block with a position out of range (changed by
// another thread after the op's checks) is not touched: `fault` notes it and the op raises
// after the pass (index_fault.h).
inline int64_t position(const AdamWQ8Chunk& c, int64_t j) {
  return c.idx64 ? static_cast<const int64_t*>(c.idx)[j] : static_cast<const int32_t*>(c.idx)[j];
}

template <typename P>
bool gather_block(const AdamWQ8Chunk& c, int64_t j, int64_t cnt, P* pb, int64_t* pos,
                  IndexFault* fault) {
  const P* p = static_cast<const P*>(c.p);
  for (int64_t t = 0; t < cnt; ++t) {
    const int64_t x = position(c, j + t);
    if (!in_range(x, c.p_numel)) {
      fault->note(j + t, x);
      return false;
    }
    pos[t] = x, pb[t] = p[x];
  }
  return true;
}

template <typename P, typename G>
void adamw_q8_chunk_t(const AdamWQ8Chunk& c, const AdamWScalars& s, IndexFault* fault) {
  P* p = static_cast<P*>(c.p);
  const G* g = static_cast<const G*>(c.g);
  for (int64_t j = 0, b = 0; j < c.n; j += kQ8Block, ++b) {
    const int64_t cnt = std::min<int64_t>(kQ8Block, c.n - j);
    P* at = p + j;  // the block's params in place: dense, or a run of consecutive positions
    if (c.idx && cnt == kQ8Block) {
      const int64_t first = position(c, j), last = position(c, j + kQ8Block - 1);
      const bool run = last - first == kQ8Block - 1 && in_range(first, c.p_numel) &&
                       in_range(last, c.p_numel);
      at = run ? p + first : nullptr;
    }
    if (cnt == kQ8Block && at) {
      prefetch_ahead(at, kQ8Block), prefetch_ahead(g + j, kQ8Block);
      adamw_q8_block(at, g + j, c.qm + j, c.qw + j, c.sm + b, c.sw + b, s);
      continue;
    }
    alignas(64) P pb[kQ8Block];  // a gathered block's params (zero padded if partial)
    int64_t pos[kQ8Block];
    if (cnt == kQ8Block) {  // scattered positions, whole block: only p goes through a copy
      if (!gather_block(c, j, cnt, pb, pos, fault)) continue;
      adamw_q8_block(pb, g + j, c.qm + j, c.qw + j, c.sm + b, c.sw + b, s);
      for (int64_t t = 0; t < cnt; ++t) p[pos[t]] = pb[t];
      continue;
    }
    alignas(64) G gb[kQ8Block];  // the last partial block: zero-padded copies of all
    alignas(64) int8_t mb[kQ8Block];
    alignas(64) uint8_t wb[kQ8Block];
    std::memset(pb, 0, sizeof(pb)), std::memset(gb, 0, sizeof(gb));
    std::memset(mb, 0, sizeof(mb)), std::memset(wb, 0, sizeof(wb));
    if (c.idx) {
      if (!gather_block(c, j, cnt, pb, pos, fault)) continue;
    } else {
      std::memcpy(pb, p + j, cnt * sizeof(P));
    }
    std::memcpy(gb, g + j, cnt * sizeof(G));
    std::memcpy(mb, c.qm + j, cnt), std::memcpy(wb, c.qw + j, cnt);
    adamw_q8_block(pb, gb, mb, wb, c.sm + b, c.sw + b, s);
    if (c.idx) {
      for (int64_t t = 0; t < cnt; ++t) p[pos[t]] = pb[t];
    } else {
      std::memcpy(p + j, pb, cnt * sizeof(P));
    }
    std::memcpy(c.qm + j, mb, cnt), std::memcpy(c.qw + j, wb, cnt);
  }
}

template <typename P>
void adamw_q8_chunk_p(const AdamWQ8Chunk& c, const AdamWScalars& s, IndexFault* fault) {
  if (c.g_type == FType::F32)
    adamw_q8_chunk_t<P, float>(c, s, fault);
  else
    adamw_q8_chunk_t<P, P>(c, s, fault);  // checks allow only the param's dtype or fp32
}

void adamw_q8_chunk(const AdamWQ8Chunk& c, const AdamWScalars& s, IndexFault* fault) {
  switch (c.p_type) {
    case FType::F32: adamw_q8_chunk_p<float>(c, s, fault); break;
    case FType::BF16: adamw_q8_chunk_p<c10::BFloat16>(c, s, fault); break;
    case FType::F16: adamw_q8_chunk_p<c10::Half>(c, s, fault); break;
  }
}

// ------------------------------------------------------------------ masked_adamw_int4_

// kW codes (bytes) as floats: whole numbers, exact.
inline void u8_widen(const uint8_t* c, Vec* out) {
#if defined(CPU_CAPABILITY_AVX512)
  for (int h = 0; h < 2; ++h)
    out[h] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(c + h * kV))));
#elif defined(CPU_CAPABILITY_AVX2)
  for (int h = 0; h < 2; ++h)
    out[h] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
        reinterpret_cast<const __m128i*>(c + h * kV))));
#else
  alignas(64) float a[kW];
  for (int64_t t = 0; t < kW; ++t) a[t] = c[t];
  for (int h = 0; h < 2; ++h) out[h] = Vec::loadu(a + h * kV);
#endif
}
// One block of kQ4Block elements (a partial block: the caller's zero-padded copies), as
// adamw_q8_block: pass 1 decodes each byte in float arithmetic (exact on whole numbers up
// to 255: |q_m| = floor(c / 16), q_w = floor((c - 16 |q_m|) / 2), the sign the rest),
// updates p and keeps m and the root w in L1 with their abs-max; pass 2 takes the new
// scales and stores |q_m| * 16 + q_w * 2 + sign (_reference.quantize_q4).
template <typename P, typename G>
inline void adamw_q4_block(P* p, const G* g, uint8_t* codes, float* sm, float* sw,
                           const AdamWScalars& s) {
  static_assert(kQ4Block % kW == 0, "a block is whole vector pairs");
  alignas(64) float mb[kQ4Block], wb[kQ4Block];
  const Vec s_m(*sm), s_w(*sw);
  const Vec zero(0.0f), one(1.0f), two(2.0f), sixteen(16.0f), sign(-0.0f);
  QBlockPass1 pass{s, mb, wb};
  for (int64_t j = 0; j < kQ4Block; j += kW) {
    Vec pv[2], gv[2], c[2];
    load2(p + j, pv[0], pv[1]);
    load2(g + j, gv[0], gv[1]);
    u8_widen(codes + j, c);
    for (int h = 0; h < 2; ++h) {
      const Vec mag = (c[h] * Vec(1.0f / 16.0f)).floor();
      const Vec low = c[h] - mag * sixteen;
      const Vec r = (low * Vec(0.5f)).floor();
      const Vec negative = (low - r * two) > zero;
      const Vec m = ((mag * mag) * s_m) ^ (negative & sign);  // (-q^2) * s: the same bits
      pass.update(pv[h], gv[h], m, (r * r) * s_w, j + h * kV);
    }
    store2(p + j, pv[0], pv[1]);
  }
  const auto [inv_m, inv_w] =
      store_scales(pass.amax_m, pass.amax_w, kQ4MSquare, kQ4WSquare, sm, sw);
  for (int64_t j = 0; j < kQ4Block; j += kV) {
    const Vec m = Vec::loadu(mb + j), w = Vec::loadu(wb + j);
    const Vec um = q8_levels(m, inv_m, kQ4MLevels);
    const Vec uw = at_least_one_if_positive(q8_levels(w, inv_w, kQ4WLevels), w);
    const Vec negative = (m < zero) & (um > zero) & one;
    store_levels(um * sixteen + uw * two + negative, codes + j);  // whole numbers <= 255
  }
}

template <typename P, typename G>
void adamw_q4_chunk_t(const AdamWQ4Chunk& c, const AdamWScalars& s) {
  P* p = static_cast<P*>(c.p);
  const G* g = static_cast<const G*>(c.g);
  for (int64_t j = 0, b = 0; j < c.n; j += kQ4Block, ++b) {
    const int64_t cnt = std::min<int64_t>(kQ4Block, c.n - j);
    if (cnt == kQ4Block) {
      prefetch_ahead(p + j, kQ4Block), prefetch_ahead(g + j, kQ4Block);
      adamw_q4_block(p + j, g + j, c.codes + j, c.sm + b, c.sw + b, s);
      continue;
    }
    alignas(64) P pb[kQ4Block];  // the last partial block: zero-padded copies of all
    alignas(64) G gb[kQ4Block];
    alignas(64) uint8_t cb[kQ4Block];
    std::memset(pb, 0, sizeof(pb)), std::memset(gb, 0, sizeof(gb));
    std::memset(cb, 0, sizeof(cb));
    std::memcpy(pb, p + j, cnt * sizeof(P)), std::memcpy(gb, g + j, cnt * sizeof(G));
    std::memcpy(cb, c.codes + j, cnt);
    adamw_q4_block(pb, gb, cb, c.sm + b, c.sw + b, s);
    std::memcpy(p + j, pb, cnt * sizeof(P)), std::memcpy(c.codes + j, cb, cnt);
  }
}

void adamw_q4_chunk(const AdamWQ4Chunk& c, const AdamWScalars& s) {
  switch (c.p_type) {  // the checks allow only the param's dtype or fp32 for the grad
    case FType::F32: adamw_q4_chunk_t<float, float>(c, s); break;
    case FType::BF16:
      if (c.g_type == FType::F32) adamw_q4_chunk_t<c10::BFloat16, float>(c, s);
      else adamw_q4_chunk_t<c10::BFloat16, c10::BFloat16>(c, s);
      break;
    case FType::F16:
      if (c.g_type == FType::F32) adamw_q4_chunk_t<c10::Half, float>(c, s);
      else adamw_q4_chunk_t<c10::Half, c10::Half>(c, s);
      break;
  }
}

// ------------------------------------------------------------------------ param_stats

// Sums of squares go to 32 fp32 lanes, element j of each 32-element block to lane j, in
// every variant, as a separate multiply and add (two roundings; no FMA, which the generic
// variant lacks): the same bits whatever the vector width. After every kFlushBlocks blocks of
// the windowed loop (the same blocks in every variant) and at the end of the work item the
// fp32 lanes are added into 32 double lanes, which are added in one fixed order at the end.
// An fp32 lane thus sums at most 4 + 256 squares: relative error below 260 * 2^-24 ~ 1.6e-5
// worst case (~1e-7 on random data; a few 1e-6 on data with few distinct values, such as
// bf16 near 1, whose rounding errors do not cancel). A work item whose abs-max is outside
// [2^-40, 2^56] (fp32 squares could underflow or overflow) is summed again in double: see
// sumsq_double.
constexpr int64_t kLanes = 32;
static_assert(kLanes % kW == 0, "a 32-element block is a whole number of vector blocks");
constexpr int64_t kFlushBlocks = 256;
static_assert(kFlushBlocks % 16 == 0, "flushes fall between AVX-512 16-block groups");
constexpr float kSquareSafeLo = 0x1p-40f, kSquareSafeHi = 0x1p56f;

// The kLanes double lanes added in one fixed pairwise order (in place; returns the total).
inline double pairwise_total(double* lanes) {
  for (int64_t w = kLanes / 2; w >= 1; w /= 2)
    for (int64_t t = 0; t < w; ++t) lanes[t] += lanes[t + w];
  return lanes[0];
}

// The rare second pass: 32 double lanes (squares of fp32 values are exact in double), lanes
// added in the fixed pairwise order. Scalar code, independent lanes: the same bits in every
// variant whether or not the compiler vectorizes it.
template <typename T>
double sumsq_double(const T* x, int64_t n) {
  double lanes[kLanes] = {};
  for (int64_t j = 0; j < n; ++j) {
    const double d = static_cast<float>(x[j]);
    lanes[j % kLanes] += d * d;
  }
  return pairwise_total(lanes);
}

using VecI = at::vec::Vectorized<int32_t>;
static_assert(VecI::size() == kV, "int32 and float vectors have the same lane count");

inline VecI float_bits(const Vec& a) {  // reinterpret, no conversion
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castps_si512(a);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castps_si256(a);
#else
  return at::vec::cast<int32_t>(a);
#endif
}

// max without NaN handling (one instruction); callers detect NaN apart.
inline Vec plain_max(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

inline bool any_lane(const VecI& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_test_epi32_mask(x, x) != 0;
#elif defined(CPU_CAPABILITY_AVX2)
  return !_mm256_testz_si256(x, x);
#else
  int32_t v[kV];
  x.store(v);
  for (int64_t t = 0; t < kV; ++t)
    if (v[t]) return true;
  return false;
#endif
}

// Histogram of the fp32 exponent field of |x| (bits >> 23), counted mostly in vector
// registers. A 16-bin window [base, base+16) is chosen from the first elements of the chunk
// (a parameter tensor spans few exponents). Each element adds 1 << 2d (d = exponent - base)
// to a lane of 2-bit counters, one per bin: the shift count is ((bits >> 22) - 2 base) with
// its low bit (the top mantissa bit) cleared; x86 variable shifts give 0 for counts outside
// 0..31, so out-of-window elements add nothing there and go to scalar sub-histograms
// instead (one test per two vectors). Every 3 steps the 2-bit counters are widened into
// nibble counters (n0: bin 2j in nibble j, n1: bin 2j+1), every 2 widenings the nibbles into
// byte counters (c0..c3: bin base+4j+k in byte j of ck), and every 42 nibble flushes the
// bytes go to the scalar histogram (no counter overflows). The accumulators are plain
// locals so they stay in registers.
constexpr int64_t kScalarPrefix = 128;  // elements counted scalar before the window is chosen
using SubHist = uint32_t[8][256];

inline void hist_scalar(const Vec& a, const Vec& b, SubHist& h) {
  alignas(64) uint32_t bits[kW];
  a.store(bits);
  b.store(bits + kV);
  for (int64_t t = 0; t < kW; t += 8)
    for (int u = 0; u < 8; ++u) ++h[u][bits[t + u] >> 23];
}

inline int32_t best_window(const SubHist& h) {  // the 16 consecutive bins holding the most
  uint32_t tot[256];
  for (int e = 0; e < 256; ++e) tot[e] = h[0][e];
  for (int u = 1; u < 8; ++u)
    for (int e = 0; e < 256; ++e) tot[e] += h[u][e];
  uint32_t c = 0;
  for (int e = 0; e < 16; ++e) c += tot[e];
  uint32_t best = c;
  int32_t base = 0;
  for (int32_t b = 1; b + 16 <= 256; ++b) {  // sliding sum over [b, b + 16)
    c += tot[b + 15] - tot[b - 1];
    if (c > best) best = c, base = b;
  }
  return base;
}

inline void hist_out_of_window(const Vec& a, int32_t base, SubHist& h) {
  uint32_t bits[kV];
  a.store(bits);
  for (int64_t t = 0; t < kV; ++t) {
    const uint32_t x = bits[t] >> 23;
    if (static_cast<uint32_t>(static_cast<int32_t>(x) - base) >= 16u) ++h[t & 7][x];
  }
}

// Loop-invariant vectors of the windowed histogram, built once per chunk so that the loop
// keeps them in registers.
struct WindowConsts {
  VecI base2;  // 2 * base
  VecI one, even, outside;
  explicit WindowConsts(int32_t base)
      : base2(2 * base), one(1), even(~1), outside(~31) {}
};

// a and b: |x| of two vectors.
inline void hist_window(const Vec& a, const Vec& b, int32_t base, const WindowConsts& k,
                        VecI& wa, VecI& wb, SubHist& h) {
  const VecI da = (float_bits(a) >> VecI(22)) - k.base2;
  const VecI db = (float_bits(b) >> VecI(22)) - k.base2;
  wa = wa + (k.one << (da & k.even));
  wb = wb + (k.one << (db & k.even));
  if (any_lane((da | db) & k.outside)) {  // some exponents outside the window
    hist_out_of_window(a, base, h);
    hist_out_of_window(b, base, h);
  }
}

// 2-bit counters of wa and wb (<= 3 each) into the nibble counters n0, n1 (<= 6 each).
inline void widen2(const VecI& wa, const VecI& wb, const VecI& m, VecI& n0, VecI& n1) {
  n0 = n0 + ((wa & m) + (wb & m));
  n1 = n1 + (((wa >> VecI(2)) & m) + ((wb >> VecI(2)) & m));
}

// Nibble counters (<= 15) into the byte counters: n0 holds bins 4j (low nibble of byte j)
// and 4j+2, n1 bins 4j+1 and 4j+3.
inline void widen4(const VecI& n0, const VecI& n1, const VecI& m, VecI& c0, VecI& c1, VecI& c2,
                   VecI& c3) {
  c0 = c0 + (n0 & m);
  c2 = c2 + ((n0 >> VecI(4)) & m);
  c1 = c1 + (n1 & m);
  c3 = c3 + ((n1 >> VecI(4)) & m);
}

// Adds the byte counters of ck (bin base + 4j + k in byte j) to h; returns zero.
inline VecI flush_bytes(int32_t base, int k, const VecI& c, SubHist& h) {
  int32_t lanes[kV];
  c.store(lanes);
  for (int64_t t = 0; t < kV; ++t)
    for (int j = 0; j < 4; ++j)
      h[0][base + 4 * j + k] += (static_cast<uint32_t>(lanes[t]) >> (8 * j)) & 0xFFu;
  return VecI(0);
}

#if defined(CPU_CAPABILITY_AVX512)
// AVX-512 histogram of the window: positional popcount. A 32-element block is reduced to
// 32 16-bit words, the upper halves of its fp32 values (sign, exponent, 7 mantissa bits;
// for bf16 the words in memory); each word becomes the one-hot 1 << (exponent - base),
// which is 0 outside the window (vpsllvw gives 0 for counts over 15). Bit k of the words,
// summed over all words and blocks, is the count of bin base + k: one-hot vectors are added
// into bit-sliced counters (Harley-Seal carry-save adders over 16 blocks, then a ripple into
// deeper planes), so each block costs a handful of instructions and no per-bin work. A group
// of 16 blocks with an out-of-window element (a zero word, found through a running minimum)
// is rescanned block by block and those elements are counted scalar.
constexpr int kPlanes = 12;          // bit j of the per-(lane, bin) counts, weight 2^j
constexpr int kGroupsPerFlush = 255;  // <= 255 * 16 + 15 < 2^12 per counter between flushes

struct OneHotConsts {
  __m512i odd_words, base, one;
  explicit OneHotConsts(int32_t b) {
    alignas(64) int16_t idx[32];
    for (int i = 0; i < 16; ++i) idx[i] = static_cast<int16_t>(2 * i + 1), idx[16 + i] =
        static_cast<int16_t>(32 + 2 * i + 1);
    odd_words = _mm512_load_si512(idx);
    base = _mm512_set1_epi16(static_cast<int16_t>(b));
    one = _mm512_set1_epi16(1);
  }
};

// The upper 16 bits of each element of a block (in some fixed order), shifted left by one:
// exponent in the high byte, then 7 mantissa bits and a zero (no sign). As unsigned words
// these order like |x| truncated to bf16 (NaN above inf). a, b: the block as floats.
template <typename T>
inline __m512i top_words2(const T* p, const Vec& a, const Vec& b, const OneHotConsts& k) {
  __m512i w;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    w = _mm512_loadu_si512(p);
  } else {  // words 0-15: upper halves of a, 16-31: of b
    w = _mm512_permutex2var_epi16(_mm512_castps_si512(a), k.odd_words, _mm512_castps_si512(b));
  }
  return _mm512_slli_epi16(w, 1);
}

inline __m512i exponents(const __m512i& w2) { return _mm512_srli_epi16(w2, 8); }

inline __m512i one_hot(const __m512i& e, const OneHotConsts& k) {
  return _mm512_sllv_epi16(k.one, _mm512_sub_epi16(e, k.base));
}

// Carry-save adder: h = majority(a, b, c), l = a ^ b ^ c.
inline void csa(__m512i& h, __m512i& l, __m512i a, __m512i b, __m512i c) {
  const __m512i hh = _mm512_ternarylogic_epi32(a, b, c, 0xE8);
  l = _mm512_ternarylogic_epi32(a, b, c, 0x96);
  h = hh;
}

// Adds x (weight 2^from) into planes[from..]; the counts never overflow the top plane.
inline void ripple_add(__m512i* planes, int from, __m512i x) {
  for (int j = from; j < kPlanes; ++j) {
    const __m512i c = _mm512_and_si512(planes[j], x);
    planes[j] = _mm512_xor_si512(planes[j], x);
    x = c;
  }
}

// Adds the bit-sliced counts to h (bit k of a word: bin base + k) and zeroes them.
inline void flush_planes(__m512i* planes, int32_t base, SubHist& h) {
  for (int k = 0; k < 16; ++k) {
    const __m512i bit = _mm512_set1_epi16(static_cast<int16_t>(1 << k));
    uint32_t c = 0;
    for (int j = 0; j < kPlanes; ++j)
      c += static_cast<uint32_t>(__builtin_popcount(_mm512_test_epi16_mask(planes[j], bit))) << j;
    h[0][base + k] += c;
  }
  for (int j = 0; j < kPlanes; ++j) planes[j] = _mm512_setzero_si512();
}
#endif

// Sum of squares (fp32 lanes) and running abs-max of the kW elements at p; a, b get |x|.
template <typename T>
inline void sums_step(const T* p, Vec* lane, Vec& amax, Vec& a, Vec& b) {
  load2(p, a, b);
  lane[0] = lane[0] + a * a;
  lane[1] = lane[1] + b * b;
  a = a.abs();
  b = b.abs();
  amax = plain_max(amax, plain_max(a, b));
}

// A chunk's fp32 square lanes (element t of each 32-element block to lane t) and the double
// lanes they are flushed into: one definition for the histogram loop and the plain one, so
// both give the same bits.
struct SquareLanes {
  static constexpr int64_t kAcc = kLanes / kV;
  Vec acc[kAcc];
  double lanes[kLanes] = {};
  SquareLanes() {
    for (auto& a : acc) a = Vec(0.0f);
  }
  void flush() {  // fp32 lanes into the double lanes
    alignas(64) float f[kLanes];
    for (int64_t a = 0; a < kAcc; ++a) acc[a].store(f + a * kV), acc[a] = Vec(0.0f);
    for (int64_t t = 0; t < kLanes; ++t) lanes[t] += static_cast<double>(f[t]);
  }
  double total() {  // the last flush, then the lanes added in one fixed pairwise order
    flush();
    return pairwise_total(lanes);
  }
};

// The last partial block of `count` elements, zero padded (zeros add nothing to the
// sums); each(a, b) gets its |x| vectors.
template <typename T, typename F>
void padded_block(const T* x, int64_t count, SquareLanes& sq, Vec& amax, F&& each) {
  alignas(64) T pad[kLanes];
  std::memset(pad, 0, sizeof(pad));
  std::memcpy(pad, x, count * sizeof(T));
  for (int64_t off = 0; off < kLanes; off += kW) {
    Vec a, b;
    sums_step(pad + off, sq.acc + off / kV, amax, a, b);
    each(a, b);
  }
}

// sumsq and absmax of a chunk from its lane total and running abs-max. NaN wins the abs-max
// (as in torch's amax) and is looked for only when `maybe_nan` or the abs-max is inf;
// outside the safe range (NaN and inf included) fp32 squares may underflow or overflow, so
// the sum is taken again in double.
template <typename T>
void finish_sums(const T* x, int64_t n, double total, const Vec& amax, bool maybe_nan,
                 StatsPartial* out) {
  float lane_max[kV];
  amax.store(lane_max);
  float m = 0.0f;
  for (int t = 0; t < kV; ++t) m = std::max(m, lane_max[t]);
  if (maybe_nan || std::isinf(m))
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(static_cast<float>(x[j]))) m = NAN;
  const bool safe = m == 0.0f || (m >= kSquareSafeLo && m <= kSquareSafeHi);
  out->sumsq = safe ? total : sumsq_double(x, n);
  out->absmax = m;
}

// One pass: sum of squares (fp32 lanes), abs-max and the exponent histogram. NaN is found
// through the histogram: only a chunk with exponent-255 elements (inf or NaN) is rescanned.
// Whole 32-element blocks go through a scalar-histogram prefix (which chooses the window)
// and then the windowed loop; a last partial block is zero padded and counted scalar.
template <typename T>
void stats_chunk_t(const T* x, int64_t n, StatsPartial* out) {
  SubHist h;
  std::memset(h, 0, sizeof(h));
  SquareLanes sq;
  Vec* acc = sq.acc;
  Vec amax(0.0f);
  const int64_t full = n - n % kLanes;
  const int64_t prefix = std::min(full, kScalarPrefix);
  int64_t j = 0;
  for (; j < prefix; j += kLanes) {
    prefetch_ahead(x + j, kLanes);
    for (int64_t off = 0; off < kLanes; off += kW) {
      Vec a, b;
      sums_step(x + j + off, acc + off / kV, amax, a, b);
      hist_scalar(a, b, h);
    }
  }
#if defined(CPU_CAPABILITY_AVX512)
  if (j < full) {
    const int32_t base = best_window(h);
    static_assert(kW == kLanes, "one block is one pair of float vectors");
    const OneHotConsts k(base);
    __m512i planes[kPlanes];
    for (auto& p : planes) p = _mm512_setzero_si512();
    // the block at p: sums (in block order), then its one-hot words. Software prefetch:
    // prefetch_ahead (L1, 2 KiB ahead, per block) cost ~15% of the fp32 time here; one L2
    // prefetch per line 8 KiB ahead, issued per 16-block group, gained ~5% (fp32) to ~10%
    // (bf16) (bench: 6-layer decoder, 1 and 2 threads; 16-32 KiB measured the same).
    constexpr int64_t kGroupPrefetchBytes = 8192;
    // abs-max: bf16 from the words (exact: bf16 is the upper half of fp32), others from |x|
    constexpr bool kBF16 = std::is_same_v<T, c10::BFloat16>;
    Vec vmax(0.0f);
    __m512i wmax = _mm512_setzero_si512();
    auto block = [&](const T* p) {
      Vec a, b;
      load2(p, a, b);
      acc[0] = acc[0] + a * a;  // as sums_step: element t of the block to lane t
      acc[1] = acc[1] + b * b;
      const __m512i w2 = top_words2(p, a, b, k);
      if constexpr (kBF16) {
        wmax = _mm512_max_epu16(wmax, w2);
      } else {
        vmax = plain_max(vmax, plain_max(a.abs(), b.abs()));
      }
      return one_hot(exponents(w2), k);
    };
    auto rescan = [&](const T* p, int64_t blocks) {  // count out-of-window elements
      for (int64_t g = 0; g < blocks; ++g, p += kLanes) {
        Vec a, b;
        load2(p, a, b);
        const __m512i e = exponents(top_words2(p, a, b, k));
        const __m512i o = one_hot(e, k);
        uint32_t out_words = _mm512_testn_epi16_mask(o, o);
        if (out_words != 0) {
          alignas(64) uint16_t ex[32];
          _mm512_store_si512(ex, e);
          for (; out_words != 0; out_words &= out_words - 1) {
            const int w = __builtin_ctz(out_words);
            ++h[w & 7][ex[w]];
          }
        }
      }
    };
    int groups = 0, sum_groups = 0;
    constexpr int64_t kGroup = 16 * kLanes;
    for (; j + kGroup <= full; j += kGroup) {
      const T* p = x + j;
      {  // the group kGroupPrefetchBytes ahead, into L2 (see above)
        const char* c = reinterpret_cast<const char*>(p) + kGroupPrefetchBytes;
        for (int64_t q = 0; q < kGroup * static_cast<int64_t>(sizeof(T)); q += 64)
          _mm_prefetch(c + q, _MM_HINT_T1);
      }
      __m512i& ones = planes[0];
      __m512i& twos = planes[1];
      __m512i& fours = planes[2];
      __m512i& eights = planes[3];
      __m512i twos_a, twos_b, fours_a, fours_b, eights_a, eights_b, sixteens, o0, o1;
      __m512i mn = _mm512_set1_epi32(-1);
      // blocks strictly in order (the sums of squares depend on it)
#define NTO_PAIR(g, out_twos)                                       \
  o0 = block(p + (g) * kLanes);                                     \
  o1 = block(p + ((g) + 1) * kLanes);                               \
  mn = _mm512_min_epu16(mn, _mm512_min_epu16(o0, o1));              \
  csa(out_twos, ones, ones, o0, o1);
      NTO_PAIR(0, twos_a)
      NTO_PAIR(2, twos_b)
      csa(fours_a, twos, twos, twos_a, twos_b);
      NTO_PAIR(4, twos_a)
      NTO_PAIR(6, twos_b)
      csa(fours_b, twos, twos, twos_a, twos_b);
      csa(eights_a, fours, fours, fours_a, fours_b);
      NTO_PAIR(8, twos_a)
      NTO_PAIR(10, twos_b)
      csa(fours_a, twos, twos, twos_a, twos_b);
      NTO_PAIR(12, twos_a)
      NTO_PAIR(14, twos_b)
      csa(fours_b, twos, twos, twos_a, twos_b);
      csa(eights_b, fours, fours, fours_a, fours_b);
      csa(sixteens, eights, eights, eights_a, eights_b);
#undef NTO_PAIR
      ripple_add(planes, 4, sixteens);
      if (_mm512_testn_epi16_mask(mn, mn) != 0) rescan(p, 16);
      if (++groups == kGroupsPerFlush) flush_planes(planes, base, h), groups = 0;
      if (++sum_groups == kFlushBlocks / 16) sq.flush(), sum_groups = 0;
    }
    for (; j < full; j += kLanes) {
      const __m512i o = block(x + j);
      ripple_add(planes, 0, o);
      if (_mm512_testn_epi16_mask(o, o) != 0) rescan(x + j, 1);
    }
    flush_planes(planes, base, h);
    if constexpr (kBF16) {
      alignas(64) uint16_t words[32];
      _mm512_store_si512(words, wmax);
      uint32_t top = 0;
      for (int t = 0; t < 32; ++t) top = std::max<uint32_t>(top, words[t]);
      top = (top >> 1) << 16;  // the fp32 bits of the largest |x|
      float f;
      std::memcpy(&f, &top, sizeof(f));
      amax = plain_max(amax, Vec(f));
    } else {
      amax = plain_max(amax, vmax);
    }
  }
#else
  if (j < full) {
    const int32_t base = best_window(h);
    const WindowConsts k(base);
    const VecI m2(0x33333333), m4(0x0F0F0F0F);
    VecI wa(0), wb(0), n0(0), n1(0), c0(0), c1(0), c2(0), c3(0);
    int steps = 0, widenings = 0, nibble_flushes = 0;
    int64_t sum_blocks = 0;
    for (; j < full; j += kLanes) {
      // ahead of the hardware prefetcher: this loop does enough work per line to fall behind
      prefetch_ahead(x + j, kLanes);
      for (int64_t off = 0; off < kLanes; off += kW) {
        Vec a, b;
        sums_step(x + j + off, acc + off / kV, amax, a, b);
        hist_window(a, b, base, k, wa, wb, h);
        if (++steps == 3) {  // 2-bit counters hold 3
          widen2(wa, wb, m2, n0, n1);
          wa = wb = VecI(0);
          steps = 0;
          if (++widenings == 2) {  // nibbles gain <= 6 per widening: 12 <= 15
            widen4(n0, n1, m4, c0, c1, c2, c3);
            n0 = n1 = VecI(0);
            widenings = 0;
            if (++nibble_flushes == 21) {  // bytes gain <= 12 per nibble flush: 252 <= 255
              c0 = flush_bytes(base, 0, c0, h), c1 = flush_bytes(base, 1, c1, h);
              c2 = flush_bytes(base, 2, c2, h), c3 = flush_bytes(base, 3, c3, h);
              nibble_flushes = 0;
            }
          }
        }
      }
      if (++sum_blocks == kFlushBlocks) sq.flush(), sum_blocks = 0;
    }
    widen2(wa, wb, m2, n0, n1);
    widen4(n0, n1, m4, c0, c1, c2, c3);
    flush_bytes(base, 0, c0, h), flush_bytes(base, 1, c1, h);
    flush_bytes(base, 2, c2, h), flush_bytes(base, 3, c3, h);
  }
#endif
  if (full < n) {  // the padding's zeros also land in bin 0: undone below
    padded_block(x + full, n - full, sq, amax, [&](const Vec& a, const Vec& b) {
      hist_scalar(a, b, h);
    });
    h[1][0] -= static_cast<uint32_t>(kLanes - (n - full));
  }
  for (int e = 0; e < 256; ++e) {
    uint32_t c = 0;  // modulo 2^32 (the padding fix-up may wrap a sub-histogram); < 2^32
    for (int u = 0; u < 8; ++u) c += h[u][e];
    out->hist[e] = c;
  }
  finish_sums(x, n, sq.total(), amax, out->hist[255] > 0, out);  // bin 255: inf or NaN
}

// param_stats without the histogram (histogram=False): the same square lanes, flushed at
// the same blocks as stats_chunk_t (after the scalar prefix, every kFlushBlocks blocks), so
// sumsq and absmax are bit-identical to it, for one plain read of memory. NaN needs no
// histogram to be found: a NaN makes its fp32 lane, and so the double total, NaN (squares of
// finite fp32 values never overflow a double lane); only a chunk whose total is not finite
// or whose abs-max is inf is scanned for NaN. `out->hist` is not written.
template <typename T>
void sums_chunk_t(const T* x, int64_t n, StatsPartial* out) {
  SquareLanes sq;
  Vec amax(0.0f);
  const int64_t full = n - n % kLanes;
  const int64_t prefix = std::min(full, kScalarPrefix);
  int64_t blocks = 0;
  // One read stream with little work per line: the hardware prefetcher alone left it ~25%
  // slower (1 thread, 6-layer decoder grads; 2-16 KiB ahead measured within noise of 4).
  constexpr int64_t kGroup = 16 * kLanes, kAheadBytes = 4096;
  for (int64_t j = 0; j < full; j += kLanes) {
    if (j % kGroup == 0) {
      const char* c = reinterpret_cast<const char*>(x + j) + kAheadBytes;
      for (int64_t q = 0; q < kGroup * static_cast<int64_t>(sizeof(T)); q += 64)
        __builtin_prefetch(c + q);
    }
    for (int64_t off = 0; off < kLanes; off += kW) {
      Vec a, b;
      sums_step(x + j + off, sq.acc + off / kV, amax, a, b);
    }
    if (j >= prefix && ++blocks == kFlushBlocks) sq.flush(), blocks = 0;
  }
  if (full < n) padded_block(x + full, n - full, sq, amax, [](const Vec&, const Vec&) {});
  const double total = sq.total();
  finish_sums(x, n, total, amax, !std::isfinite(total), out);
}

void sums_chunk(const void* x, FType t, int64_t n, StatsPartial* out) {
  switch (t) {
    case FType::F32: sums_chunk_t(static_cast<const float*>(x), n, out); break;
    case FType::BF16: sums_chunk_t(static_cast<const c10::BFloat16*>(x), n, out); break;
    case FType::F16: sums_chunk_t(static_cast<const c10::Half*>(x), n, out); break;
  }
}

void stats_chunk(const void* x, FType t, int64_t n, StatsPartial* out) {
  switch (t) {
    case FType::F32: stats_chunk_t(static_cast<const float*>(x), n, out); break;
    case FType::BF16: stats_chunk_t(static_cast<const c10::BFloat16*>(x), n, out); break;
    case FType::F16: stats_chunk_t(static_cast<const c10::Half*>(x), n, out); break;
  }
}

// ------------------------------------------------------------------------ select_topk

// key = bits(|x|) + 1, NaN -> 0: ordered like |x| (non-negative floats order like their
// bits), NaN below every number (even +-0, whose key is 1).
template <typename T>
void topk_keys_t(const T* x, int64_t n, uint32_t* keys) {
  alignas(64) T pad[kW];
  alignas(64) uint32_t buf[kW];
  for (int64_t j = 0; j < n; j += kW) {
    const int64_t cnt = std::min<int64_t>(kW, n - j);
    const T* src = x + j;
    if (cnt < kW) {
      std::memset(pad, 0, sizeof(pad));
      std::memcpy(pad, src, cnt * sizeof(T));
      src = pad;
    }
    prefetch_ahead(x + j, kW);
    Vec a, b;
    load2(src, a, b);
    uint32_t* dst = cnt < kW ? buf : keys + j;
    a.abs().store(dst);
    b.abs().store(dst + kV);
    for (int64_t off = 0; off < kW; off += kV) {
      const VecI bits = VecI::loadu(dst + off);
      const VecI nan = bits > VecI(0x7F800000);
      ((bits + VecI(1)) & (nan ^ VecI(-1))).store(dst + off);
    }
    if (cnt < kW) std::memcpy(keys + j, buf, cnt * sizeof(uint32_t));
  }
}

void topk_keys(const void* x, FType t, int64_t n, uint32_t* keys) {
  switch (t) {
    case FType::F32: topk_keys_t(static_cast<const float*>(x), n, keys); break;
    case FType::BF16: topk_keys_t(static_cast<const c10::BFloat16*>(x), n, keys); break;
    case FType::F16: topk_keys_t(static_cast<const c10::Half*>(x), n, keys); break;
  }
}

// ------------------------------------------------------------- masked_adamw_lowp_
// One block of kW elements: the fp32 value (master, or the widened param) and the widened
// grad (negated for maximize: a sign flip, as the reference's -g) through adamw_update, the
// master stored, the param rounded to nearest even, or stochastically per element (the
// hash is integer work on each position; the update above stays in vector lanes).
template <typename P>
inline void lowp_block(P* p, const P* g, float* m, float* v, float* master, int64_t pos,
                       const AdamWLowpChunk& c, const AdamWScalars& s) {
  Vec x0, x1, g0, g1;
  if (master != nullptr) {
    x0 = Vec::loadu(master);
    x1 = Vec::loadu(master + kV);
  } else {
    load2(p, x0, x1);
  }
  load2(g, g0, g1);
  if (c.maximize) {
    g0 = g0.neg();
    g1 = g1.neg();
  }
  Vec m0 = Vec::loadu(m), m1 = Vec::loadu(m + kV);
  Vec v0 = Vec::loadu(v), v1 = Vec::loadu(v + kV);
  const Vec nss(s.neg_step_size), bc2(s.bc2_sqrt);
  adamw_update(x0, g0, m0, v0, s, nss, bc2);
  adamw_update(x1, g1, m1, v1, s, nss, bc2);
  m0.store(m);
  m1.store(m + kV);
  v0.store(v);
  v1.store(v + kV);
  if (master != nullptr) {
    x0.store(master);
    x1.store(master + kV);
  }
  if (!c.stochastic) {
    store2(p, x0, x1);
    return;
  }
  alignas(64) float xs[kW];
  x0.store(xs);
  x1.store(xs + kV);
  for (int64_t t = 0; t < kW; ++t)
    p[t] = stochastic_round<P>(xs[t], sr_uniform(c.k1, c.k2, static_cast<uint64_t>(pos + t)));
}

// Whole blocks in place; the last partial one on zero-padded buffers (the padding's
// results are dropped), so every element goes through the same vector code.
template <typename P>
void lowp_chunk_t(const AdamWLowpChunk& c, const AdamWScalars& s) {
  P* p = static_cast<P*>(c.p);
  const P* g = static_cast<const P*>(c.g);
  float* w = c.master;
  const int64_t end = c.begin + c.n;
  int64_t j = c.begin;
  for (; j + kW <= end; j += kW)
    lowp_block(p + j, g + j, c.m + j, c.v + j, w ? w + j : nullptr, j, c, s);
  const int64_t cnt = end - j;
  if (cnt == 0) return;
  alignas(64) P pb[kW];
  alignas(64) P gb[kW];
  alignas(64) float mb[kW], vb[kW], wb[kW];
  std::memset(pb, 0, sizeof(pb));
  std::memset(gb, 0, sizeof(gb));
  std::memset(mb, 0, sizeof(mb));
  std::memset(vb, 0, sizeof(vb));
  std::memset(wb, 0, sizeof(wb));
  for (int64_t t = 0; t < cnt; ++t) {
    pb[t] = p[j + t];
    gb[t] = g[j + t];
    mb[t] = c.m[j + t];
    vb[t] = c.v[j + t];
    if (w) wb[t] = w[j + t];
  }
  lowp_block(pb, gb, mb, vb, w ? wb : nullptr, j, c, s);
  for (int64_t t = 0; t < cnt; ++t) {
    p[j + t] = pb[t];
    c.m[j + t] = mb[t];
    c.v[j + t] = vb[t];
    if (w) w[j + t] = wb[t];
  }
}

void lowp_chunk(const AdamWLowpChunk& c, const AdamWScalars& s) {
  if (c.p_type == FType::BF16)
    lowp_chunk_t<c10::BFloat16>(c, s);
  else
    lowp_chunk_t<c10::Half>(c, s);
}

// ------------------------------------------------------------- adamw_first_step_
// masked_adamw_'s block on moments that are zero and never stored: the same vector code
// (adamw_update), so the param's bits are those of masked_adamw_ on a fresh state.
template <typename P, typename G>
inline void first_block(P* p, const G* g, const AdamWScalars& s) {
  Vec p0, p1, g0, g1;
  load2(p, p0, p1);
  load2(g, g0, g1);
  Vec m0(0.0f), m1(0.0f), v0(0.0f), v1(0.0f);
  const Vec nss(s.neg_step_size), bc2(s.bc2_sqrt);
  adamw_update(p0, g0, m0, v0, s, nss, bc2);
  adamw_update(p1, g1, m1, v1, s, nss, bc2);
  store2(p, p0, p1);
}

// Whole blocks in place; the last partial one on zero-padded buffers (as adamw_chunk_t).
template <typename P, typename G>
void first_chunk_t(const AdamWFirstChunk& c, const AdamWScalars& s) {
  P* p = static_cast<P*>(c.p);
  const G* g = static_cast<const G*>(c.g);
  int64_t j = 0;
  for (; j + kW <= c.n; j += kW) {
    prefetch_ahead(p + j, kW), prefetch_ahead(g + j, kW);
    first_block(p + j, g + j, s);
  }
  const int64_t cnt = c.n - j;
  if (cnt == 0) return;
  alignas(64) P pb[kW];
  alignas(64) G gb[kW];
  std::memset(pb, 0, sizeof(pb));
  std::memset(gb, 0, sizeof(gb));
  std::memcpy(pb, p + j, cnt * sizeof(P));
  std::memcpy(gb, g + j, cnt * sizeof(G));
  first_block(pb, gb, s);
  std::memcpy(p + j, pb, cnt * sizeof(P));
}

template <typename P>
void first_chunk_p(const AdamWFirstChunk& c, const AdamWScalars& s) {
  if (c.g_type == FType::F32)
    first_chunk_t<P, float>(c, s);
  else
    first_chunk_t<P, P>(c, s);  // the checks allow only the param's dtype or fp32
}

void first_chunk(const AdamWFirstChunk& c, const AdamWScalars& s) {
  switch (c.p_type) {
    case FType::F32: first_chunk_t<float, float>(c, s); break;
    case FType::BF16: first_chunk_p<c10::BFloat16>(c, s); break;
    case FType::F16: first_chunk_p<c10::Half>(c, s); break;
  }
}

}  // namespace

const CpuKernels& kernels() {
  static const CpuKernels k{NTO_CAP_NAME, &adamw_chunk, &stats_chunk, &sums_chunk,
                            &topk_keys, &adamw_q8_chunk, &lowp_chunk, &first_chunk,
                            &adamw_q4_chunk};
  return k;
}

}  // namespace NTO_CAP_NS
}  // namespace nto
