// The portable variant of the inner loops (at::vec's generic path), and the run-time
// choice between the variants.
#include "x86_variants.h"
#define CPU_CAPABILITY DEFAULT
#define NTO_CAP_NS cpu_default
#define NTO_CAP_NAME "default"
#include "vec_kernels_impl.h"

#include <cstdlib>
#include <cstring>

namespace nto {

namespace {
// The capability ATen uses (torch.backends.cpu.get_cpu_capability()): ATEN_CPU_CAPABILITY
// when set, else what the CPU supports, with ATen's feature sets. (at::native's own
// get_cpu_capability() is not exported from libtorch.)
const CpuKernels& choose() {
#if defined(NTO_HAVE_X86_VARIANTS)
  const char* env = std::getenv("ATEN_CPU_CAPABILITY");
  const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma");
  const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  bool want512 = has512, want2 = has2;
  if (env && *env) {
    want512 = has512 && std::strcmp(env, "avx512") == 0;
    want2 = has2 && (want512 || std::strcmp(env, "avx2") == 0);
  }
  if (want512) return cpu_avx512::kernels();
  if (want2) return cpu_avx2::kernels();
#endif
  return cpu_default::kernels();
}
}  // namespace

const CpuKernels& cpu_kernels() {
  static const CpuKernels& k = choose();
  return k;
}

const char* cpu_kernels_name() { return cpu_kernels().name; }

}  // namespace nto
