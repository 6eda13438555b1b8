// The AVX2 feature macros ATen's vector headers test, for kernels_avx2.cpp and
// kernels_avx512.cpp, included right after their `#pragma GCC target`: GCC defines them
// for the pragma's target, these are the fallback where it does not.
#pragma once
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
