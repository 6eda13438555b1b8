// Stochastic rounding of an fp32 value to bf16/fp16 with a counter-based random stream,
// written once for the CPU and CUDA kernels of masked_adamw_lowp_. The spec is
// nto_ext/_reference.py (sr_uniform, stochastic_round), which formats/master.py has used
// since before this kernel: the bits here must stay the same, or training would change.
//   u(key, pos) = (lowbias32(lowbias32(lo32(pos) ^ k1) ^ hi32(pos) ^ k2) >> 8) * 2^-24
// (k1, k2: the low and high 32 bits of the param's 64-bit stream key; pos: the element's
// position in the flattened param), so a draw depends on no thread or chunk layout.
// x rounds to r = round-to-nearest-even(x), or to n, the neighbour one 16-bit pattern
// further from r on x's side, when u < |x - r| / |n - r| (fp32 arithmetic); NaN, Inf and
// values whose r or n is not finite keep r.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "adamw_math.h"

namespace nto {

// lowbias32 (Chris Wellons' integer hash); uint32 products wrap as the reference masks them.
static NTO_HOST_DEVICE uint32_t sr_hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The stream's number in [0, 1) for position `pos`: 24 random bits, exact in fp32.
static NTO_HOST_DEVICE float sr_uniform(uint32_t k1, uint32_t k2, uint64_t pos) {
  const uint32_t h = sr_hash32(sr_hash32(static_cast<uint32_t>(pos) ^ k1) ^
                               static_cast<uint32_t>(pos >> 32) ^ k2);
  return static_cast<float>(h >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

static NTO_HOST_DEVICE bool sr_finite(float x) { return x - x == 0.0f; }  // false: Inf, NaN

// x rounded to T (c10::BFloat16 or c10::Half) with the stream's number u.
template <typename T>
static NTO_HOST_DEVICE T stochastic_round(float x, float u) {
  using O = FloatOps<float>;
  const T r(x);  // round to nearest even, as torch's casts
  const float rf = static_cast<float>(r);
  if (!sr_finite(rf) || x == rf) return r;  // also NaN (r is NaN)
  const int bits = r.x;
  const bool away = fabsf(x) > fabsf(rf);  // the far neighbour is further from zero
  int mag = (bits & 0x7FFF) + (away ? 1 : -1);
  mag = mag < 0 ? 0 : (mag > 0x7FFF ? 0x7FFF : mag);
  const T n(static_cast<uint16_t>((bits & 0x8000) | mag), T::from_bits());
  const float nf = static_cast<float>(n);
  if (!sr_finite(nf)) return r;
  const float p = O::div(fabsf(O::sub(x, rf)), fabsf(O::sub(nf, rf)));
  // a select on bits, not a branch: u < p is a coin flip, which a branch would mispredict
  const uint16_t take = static_cast<uint16_t>(-static_cast<int>(u < p));
  return T(static_cast<uint16_t>(r.x ^ ((r.x ^ n.x) & take)), T::from_bits());
}

}  // namespace nto
