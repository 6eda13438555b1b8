// Argument checks of the CUDA ops: the metadata checks are csrc/checks.h's (shared with the
// CPU kernels, messages and order of nto_ext/_reference.py); this adds what only a CUDA
// kernel needs. Index *values* are checked by index_check.cuh.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../checks.h"

namespace nto {
namespace cuda {

// The dispatcher picks CUDA when any tensor argument is on the GPU; the lists' own device
// rule (checks.h) then catches mixed lists. This names the case where the first list is on
// the CPU but another argument (a step, an index) is on the GPU.
inline void check_on_cuda(const char* op, const char* what, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", what, "[0] is on ", t.device(),
                    "; the CUDA kernel needs CUDA tensors (move them with .cuda())");
}

}  // namespace cuda
}  // namespace nto
