// Headers every variant of the inner loops needs, included BEFORE the `#pragma GCC target`
// of kernels_avx2.cpp / kernels_avx512.cpp: their inline functions are then compiled for
// the baseline target, so an out-of-line copy the linker may share with other objects
// never carries AVX2/AVX-512 code (the one-definition-rule hazard of per-file targets).
// Only at::vec (namespaced per capability) and our own NTO_CAP_NS code get the target.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
