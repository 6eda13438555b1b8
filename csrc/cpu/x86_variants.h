// Whether the AVX2 / AVX-512 variants of the inner loops are built: GCC on x86-64 (the
// variants rely on `#pragma GCC target`, which also defines the __AVX2__-style macros
// ATen's vector headers test). Elsewhere only the portable variant exists.
#pragma once
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    !defined(NTO_NO_X86_VARIANTS)
#define NTO_HAVE_X86_VARIANTS 1
#endif
