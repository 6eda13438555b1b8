// Argument checks shared by every op and backend. Each names the op, the list position
// and the rule, and runs before any memory is touched.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace nto {

inline bool is_float_param(c10::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_float_list(const char* op, const char* what, at::TensorList ts) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto& t = ts[i];
    TORCH_CHECK(t.defined(), op, ": ", what, "[", i, "] is undefined");
    TORCH_CHECK(is_float_param(t.scalar_type()), op, ": ", what, "[", i, "] has dtype ",
                t.scalar_type(), "; allowed: float32, bfloat16, float16");
    TORCH_CHECK(t.is_contiguous(), op, ": ", what, "[", i,
                "] is not contiguous; pass .contiguous() tensors");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", what, "[", i,
                "] is not a dense (strided) tensor");
  }
}

inline void check_same_device(const char* op, const char* what, at::TensorList ts,
                              const at::Device& dev) {
  for (size_t i = 0; i < ts.size(); ++i) {
    if (!ts[i].defined()) continue;
    TORCH_CHECK(ts[i].device() == dev, op, ": ", what, "[", i, "] is on ", ts[i].device(),
                " but the first tensor is on ", dev, "; all tensors must share one device");
  }
}

}  // namespace nto
