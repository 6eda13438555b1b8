// The FType (vec_kernels.h) of a float tensor's ATen dtype, for the op files: vec_kernels.h
// stays free of ATen types, so the mapping lives here, once.
#pragma once
#include <c10/core/ScalarType.h>

#include "vec_kernels.h"

namespace nto {

// fp32, bf16 or fp16 (the ops' checks allow no other float dtype).
inline FType ftype(c10::ScalarType t) {
  return t == c10::kFloat ? FType::F32 : t == c10::kBFloat16 ? FType::BF16 : FType::F16;
}

}  // namespace nto
