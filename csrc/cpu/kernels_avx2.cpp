// The AVX2 + FMA variant of the inner loops (vec_kernels_impl.h). Compiled for that target
// by the pragma below, not by command-line flags, so setup.py and the JIT build need no
// per-file options; run only when at::native::get_cpu_capability() says AVX2 or better.
#include "x86_variants.h"
#if defined(NTO_HAVE_X86_VARIANTS)
#include "vec_prelude.h"
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "avx2_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define NTO_CAP_NS cpu_avx2
#define NTO_CAP_NAME "avx2"
#include "vec_kernels_impl.h"
#pragma GCC pop_options
#endif
