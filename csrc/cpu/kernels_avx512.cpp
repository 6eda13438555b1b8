// The AVX-512 variant of the inner loops (vec_kernels_impl.h), for the ISA subset of
// ATen's AVX512 capability. Compiled for that target by the pragma below (no per-file
// flags needed); run only when at::native::get_cpu_capability() says AVX512.
#include "x86_variants.h"
#if defined(NTO_HAVE_X86_VARIANTS)
#include "vec_prelude.h"
#pragma GCC push_options
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq")
#include "avx2_macros.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define NTO_CAP_NS cpu_avx512
#define NTO_CAP_NAME "avx512"
#include "vec_kernels_impl.h"
#pragma GCC pop_options
#endif
