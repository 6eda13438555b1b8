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

// Per-element bias corrections, cached on the last step value: compact state activated at
// the same time shares its count, so runs are long and pow() is rarely called.
struct StepCache {
  int32_t step = -1;
  float neg_step_size = 0.0f, bc2_sqrt = 1.0f;
  void get(int32_t s, const StepHyper& h, float* nss, float* bc2) {
    if (s != step) {
      step = s;
      adamw_step_scalars(h.lr, h.beta1, h.beta2, static_cast<double>(s), &neg_step_size,
                         &bc2_sqrt);
    }
    *nss = neg_step_size;
    *bc2 = bc2_sqrt;
  }
};

// One block of kW contiguous elements (p/g possibly gathered into buffers by the caller).
template <typename P, typename G>
inline void adamw_block(P* p, const G* g, float* m, float* v, const AdamWScalars& s,
                        const float* nss, const float* bc2) {
  Vec p0, p1, g0, g1;
  load2(p, p0, p1);
  load2(g, g0, g1);
  Vec m0 = Vec::loadu(m), m1 = Vec::loadu(m + kV);
  Vec v0 = Vec::loadu(v), v1 = Vec::loadu(v + kV);
  Vec n0, n1, b0, b1;
  if (nss) {
    n0 = Vec::loadu(nss), n1 = Vec::loadu(nss + kV);
    b0 = Vec::loadu(bc2), b1 = Vec::loadu(bc2 + kV);
  } else {
    n0 = n1 = Vec(s.neg_step_size);
    b0 = b1 = Vec(s.bc2_sqrt);
  }
  adamw_update(p0, g0, m0, v0, s, n0, b0);
  adamw_update(p1, g1, m1, v1, s, n1, b1);
  store2(p, p0, p1);
  m0.store(m);
  m1.store(m + kV);
  v0.store(v);
  v1.store(v + kV);
}

// Dense or indexed chunk. Full dense blocks run in place; indexed blocks gather p (and a
// dense g) into small buffers; the last partial block runs on zero-padded buffers, so every
// element goes through the same vector code (dense and indexed results are bit-identical).
template <typename P, typename G, typename I>
void adamw_chunk_t(const AdamWChunk& c, const AdamWScalars& s, const StepHyper& h) {
  P* p = static_cast<P*>(c.p);
  const G* g = static_cast<const G*>(c.g);
  const I* idx = static_cast<const I*>(c.idx);
  const bool indexed = idx != nullptr;
  alignas(64) P pb[kW];
  alignas(64) G gb[kW];
  alignas(64) float mb[kW], vb[kW], nb[kW], bb[kW];
  StepCache cache;
  for (int64_t j = 0; j < c.n; j += kW) {
    const int64_t cnt = std::min<int64_t>(kW, c.n - j);
    const bool full = cnt == kW;
    float* nss = nullptr;
    float* bc2 = nullptr;
    if (c.steps) {
      nss = nb, bc2 = bb;
      for (int64_t t = 0; t < cnt; ++t) cache.get(c.steps[j + t], h, nb + t, bb + t);
      for (int64_t t = cnt; t < kW; ++t) nb[t] = 0.0f, bb[t] = 1.0f;
    }
    if (!indexed && full) {
      prefetch_ahead(p + j, kW), prefetch_ahead(g + j, kW);
      prefetch_ahead(c.m + j, kW), prefetch_ahead(c.v + j, kW);
      adamw_block(p + j, g + j, c.m + j, c.v + j, s, nss, bc2);
      continue;
    }
    if (indexed) {
      // The gathered params kAhead positions on are fetched now: their lines are scattered,
      // so the hardware prefetcher cannot see them coming. Compact state streams.
      constexpr int64_t kAhead = 4 * kW;
      const int64_t stop = std::min(c.n, j + kAhead + kW);
      for (int64_t t = j + kAhead; t < stop; ++t) {
        __builtin_prefetch(p + static_cast<int64_t>(idx[t]), 1);
        if (c.g_dense) __builtin_prefetch(g + static_cast<int64_t>(idx[t]));
      }
      prefetch_ahead(c.m + j, kW), prefetch_ahead(c.v + j, kW);
      if (!c.g_dense) prefetch_ahead(g + j, kW);
    }
    if (indexed && full) {
      // A run of kW consecutive positions (sorted and unique, so first and last decide):
      // the param block (and a dense grad's) is contiguous, no gather needed.
      const int64_t first = static_cast<int64_t>(idx[j]);
      if (static_cast<int64_t>(idx[j + kW - 1]) - first == kW - 1) {
        adamw_block(p + first, c.g_dense ? g + first : g + j, c.m + j, c.v + j, s, nss, bc2);
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
    for (int64_t t = 0; t < cnt; ++t)
      pb[t] = p[indexed ? static_cast<int64_t>(idx[j + t]) : j + t];
    if ((indexed && c.g_dense) || !full) {
      for (int64_t t = 0; t < cnt; ++t)
        gb[t] = (indexed && c.g_dense) ? g[static_cast<int64_t>(idx[j + t])] : g[j + t];
      gp = gb;
    }
    float* mp = c.m + j;
    float* vp = c.v + j;
    if (!full) {
      std::memcpy(mb, mp, cnt * sizeof(float));
      std::memcpy(vb, vp, cnt * sizeof(float));
      mp = mb, vp = vb;
    }
    adamw_block(pb, gp, mp, vp, s, nss, bc2);
    for (int64_t t = 0; t < cnt; ++t) p[indexed ? static_cast<int64_t>(idx[j + t]) : j + t] = pb[t];
    if (!full) {
      std::memcpy(c.m + j, mb, cnt * sizeof(float));
      std::memcpy(c.v + j, vb, cnt * sizeof(float));
    }
  }
}

template <typename P, typename G>
void adamw_chunk_pg(const AdamWChunk& c, const AdamWScalars& s, const StepHyper& h) {
  if (c.idx == nullptr || !c.idx64)
    adamw_chunk_t<P, G, int32_t>(c, s, h);
  else
    adamw_chunk_t<P, G, int64_t>(c, s, h);
}

template <typename P>
void adamw_chunk_p(const AdamWChunk& c, const AdamWScalars& s, const StepHyper& h) {
  if (c.g_type == FType::F32)
    adamw_chunk_pg<P, float>(c, s, h);
  else
    adamw_chunk_pg<P, P>(c, s, h);  // checks allow only the param's dtype or fp32
}

void adamw_chunk(const AdamWChunk& c, const AdamWScalars& s, const StepHyper& h) {
  switch (c.p_type) {
    case FType::F32: adamw_chunk_p<float>(c, s, h); break;
    case FType::BF16: adamw_chunk_p<c10::BFloat16>(c, s, h); break;
    case FType::F16: adamw_chunk_p<c10::Half>(c, s, h); break;
  }
}

// ------------------------------------------------------------------------ param_stats

using VecD = at::vec::Vectorized<double>;

// Sums of squares go to 32 double lanes, element j of each 32-element block to lane j, in
// every variant, and the lanes are added in one fixed order: the same bits whatever the
// vector width (squares of fp32 values are exact in double; only the summation rounds).
constexpr int64_t kLanes = 32;
static_assert(kLanes % kW == 0, "a 32-element block is a whole number of vector blocks");

// acc[0] += lower half of a squared, acc[1] += upper half squared.
inline void add_squares(const Vec& a, VecD* acc) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 f = a;
  const VecD lo(_mm512_cvtps_pd(_mm512_castps512_ps256(f)));
  const VecD hi(_mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 f = a;
  const VecD lo(_mm256_cvtps_pd(_mm256_castps256_ps128(f)));
  const VecD hi(_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
#else
  static_assert(kV == 2 * VecD::size(), "a float vector holds two double vectors");
  float x[kV];
  double d[kV];
  a.store(x);
  for (int64_t t = 0; t < kV; ++t) d[t] = x[t];
  const VecD lo = VecD::loadu(d), hi = VecD::loadu(d + VecD::size());
#endif
  acc[0] = acc[0] + lo * lo;  // exact product, one rounding in the add
  acc[1] = acc[1] + hi * hi;
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
// to a lane of 2-bit counters, one per bin; x86 variable shifts give 0 for d outside 0..15,
// so out-of-window elements add nothing there and go to scalar sub-histograms instead. Every
// 3 steps the 2-bit counters are widened into byte counters (c0..c3: bin base+4j+k in byte j
// of ck), and every 42 widenings the bytes go to the scalar histogram (no counter overflows).
// The accumulators are plain locals so they stay in registers.
constexpr int64_t kScalarPrefix = 2048;  // elements counted scalar before the window is chosen
using SubHist = uint32_t[8][256];

inline void hist_scalar(const Vec& a, const Vec& b, SubHist& h) {
  alignas(64) uint32_t bits[kW];
  a.store(bits);
  b.store(bits + kV);
  for (int64_t t = 0; t < kW; t += 8)
    for (int u = 0; u < 8; ++u) ++h[u][bits[t + u] >> 23];
}

inline int32_t best_window(const SubHist& h) {  // the 16 consecutive bins holding the most
  uint32_t best = 0;
  int32_t base = 0;
  for (int32_t b = 0; b + 16 <= 256; ++b) {
    uint32_t c = 0;
    for (int e = b; e < b + 16; ++e)
      for (int u = 0; u < 8; ++u) c += h[u][e];
    if (c > best) best = c, base = b;
  }
  return base;
}

inline void hist_window(const Vec& a, int32_t base, VecI& w, SubHist& h) {
  const VecI d = (float_bits(a) >> VecI(23)) - VecI(base);
  w = w + (VecI(1) << (d + d));
  if (any_lane(d & VecI(~15))) {  // some exponents outside the window
    uint32_t bits[kV];
    a.store(bits);
    for (int64_t t = 0; t < kV; ++t) {
      const uint32_t x = bits[t] >> 23;
      if (static_cast<uint32_t>(static_cast<int32_t>(x) - base) >= 16u) ++h[t & 7][x];
    }
  }
}

inline void widen(const VecI& w, VecI& c0, VecI& c1, VecI& c2, VecI& c3) {
  const VecI m(0x03030303);
  c0 = c0 + (w & m);
  c1 = c1 + ((w >> VecI(2)) & m);
  c2 = c2 + ((w >> VecI(4)) & m);
  c3 = c3 + ((w >> VecI(6)) & m);
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

// One pass: sum of squares (double), abs-max and the exponent histogram. NaN is found
// through the histogram: only a chunk with exponent-255 elements (inf or NaN) is rescanned.
template <typename T>
void stats_chunk_t(const T* x, int64_t n, StatsPartial* out) {
  SubHist h;
  std::memset(h, 0, sizeof(h));
  VecI wa(0), wb(0), c0(0), c1(0), c2(0), c3(0);
  int32_t base = -1;
  int steps = 0, widenings = 0;
  alignas(64) T pad[kLanes];
  constexpr int64_t kAcc = kLanes / VecD::size();
  VecD acc[kAcc];
  for (auto& a : acc) a = VecD(0.0);
  Vec amax(0.0f);
  for (int64_t j = 0; j < n; j += kLanes) {
    const int64_t cnt = std::min<int64_t>(kLanes, n - j);
    const T* blk = x + j;
    if (cnt < kLanes) {  // zero padding: adds 0 to the sums and to bin 0 (undone below)
      std::memset(pad, 0, sizeof(pad));
      std::memcpy(pad, blk, cnt * sizeof(T));
      blk = pad;
    }
    // ahead of the hardware prefetcher: this loop does enough work per line to fall behind
    prefetch_ahead(x + j, kLanes);
    for (int64_t off = 0; off < kLanes; off += kW) {
      Vec a, b;
      load2(blk + off, a, b);
      a = a.abs();
      b = b.abs();
      amax = plain_max(amax, plain_max(a, b));
      VecD* lane = acc + off / VecD::size();
      add_squares(a, lane);
      add_squares(b, lane + 2);
      if (base < 0) {
        hist_scalar(a, b, h);
        if (j + off + kW >= kScalarPrefix) base = best_window(h);
        continue;
      }
      hist_window(a, base, wa, h);
      hist_window(b, base, wb, h);
      if (++steps == 3) {  // 2-bit counters hold 3
        widen(wa, c0, c1, c2, c3);
        widen(wb, c0, c1, c2, c3);
        wa = wb = VecI(0);
        steps = 0;
        if (++widenings == 42) {  // bytes gain <= 6 per widening: 252 <= 255
          c0 = flush_bytes(base, 0, c0, h), c1 = flush_bytes(base, 1, c1, h);
          c2 = flush_bytes(base, 2, c2, h), c3 = flush_bytes(base, 3, c3, h);
          widenings = 0;
        }
      }
    }
    if (cnt < kLanes) h[1][0] -= static_cast<uint32_t>(kLanes - cnt);
  }
  if (base >= 0) {
    widen(wa, c0, c1, c2, c3);
    widen(wb, c0, c1, c2, c3);
    flush_bytes(base, 0, c0, h), flush_bytes(base, 1, c1, h);
    flush_bytes(base, 2, c2, h), flush_bytes(base, 3, c3, h);
  }
  alignas(64) double lanes[kLanes];
  for (int64_t a = 0; a < kAcc; ++a) acc[a].store(lanes + a * VecD::size());
  for (int64_t w = kLanes / 2; w >= 1; w /= 2)  // fixed pairwise order
    for (int64_t t = 0; t < w; ++t) lanes[t] += lanes[t + w];
  float lane_max[kV];
  amax.store(lane_max);
  float m = 0.0f;
  for (int t = 0; t < kV; ++t) m = std::max(m, lane_max[t]);
  for (int e = 0; e < 256; ++e) {
    uint32_t c = 0;  // modulo 2^32 (the padding fix-up may wrap a sub-histogram); < 2^32
    for (int u = 0; u < 8; ++u) c += h[u][e];
    out->hist[e] = c;
  }
  if (out->hist[255] > 0) {  // inf or NaN present: NaN wins, as in torch's amax
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(static_cast<float>(x[j]))) m = NAN;
  }
  out->sumsq = lanes[0];
  out->absmax = m;
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

}  // namespace

const CpuKernels& kernels() {
  static const CpuKernels k{NTO_CAP_NAME, &adamw_chunk, &stats_chunk, &topk_keys};
  return k;
}

}  // namespace NTO_CAP_NS
}  // namespace nto
