// Inner loops compiled once per CPU capability (kernels_default.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp include vec_kernels_impl.h with different targets) and chosen at run
// time from at::native::get_cpu_capability(), like ATen's DispatchStub. The op files
// (checks, work items, at::parallel_for) are compiled once, without special flags.
// Only plain pointers cross this boundary: no ATen types, no static initializers.
#pragma once
#include <cstdint>

#include "../adamw_math.h"
#include "index_fault.h"

namespace nto {

enum class FType : int8_t { F32 = 0, BF16 = 1, F16 = 2 };

// One work item of masked_adamw_. Dense (idx null): p, g, m, v point at the chunk's first
// element. Indexed: p (and g when g_dense) point at the whole flattened tensor; idx, m, v
// (and compact g) at the chunk's first position. m and v: fp32, or bf16 (state_dtype="bf16").
struct AdamWChunk {
  void* p;
  const void* g;
  void* m;
  void* v;
  const void* idx;  // null: dense
  int64_t n;        // elements (dense) or positions (indexed) in this chunk
  int64_t p_numel;  // indexed: positions must be < this (the param's, and a dense g's, numel)
  FType p_type;
  FType g_type;
  FType s_type;     // the moments': F32 or BF16
  bool idx64;
  bool g_dense;     // indexed only: g is the dense grad, read at idx
};

// One work item of masked_adamw_int8_: n elements (positions) from a block boundary; g,
// qm/qw (8-bit moments) and idx at its first one, sm/sw (scales) at its first block. Dense
// (idx null): p at its first element too. Indexed: p at the flattened param's element 0,
// the positions (< p_numel) in idx, the grad compact.
struct AdamWQ8Chunk {
  void* p;
  const void* g;
  int8_t* qm;
  uint8_t* qw;
  float* sm;
  float* sw;
  const void* idx;  // null: dense
  int64_t n;
  int64_t p_numel;
  FType p_type;
  FType g_type;
  bool idx64;
};

// One work item of masked_adamw_int4_ (dense): n elements from a block boundary; p, g and
// codes at its first element, sm/sw (scales) at its first block.
struct AdamWQ4Chunk {
  void* p;
  const void* g;
  uint8_t* codes;
  float* sm;
  float* sw;
  int64_t n;
  FType p_type;
  FType g_type;
};

// One work item of masked_adamw_lowp_ (dense, bf16/fp16 params and grads of that dtype):
// elements [begin, begin + n) of one tensor; p, g, m, v (and master) at element 0 of the
// tensor, so `begin + j` is the element's position in the random stream.
struct AdamWLowpChunk {
  void* p;
  const void* g;
  float* m;
  float* v;
  float* master;  // null: the value is the widened param (stochastic-rounding format)
  int64_t begin;
  int64_t n;
  FType p_type;  // BF16 or F16 (grads the same)
  bool stochastic;
  bool maximize;
  uint32_t k1, k2;  // the stream key's low and high 32 bits
};

// One work item of adamw_first_step_: n contiguous elements of a param and its grad.
struct AdamWFirstChunk {
  void* p;
  const void* g;
  int64_t n;
  FType p_type;
  FType g_type;  // the param's, or F32
};

// Per-chunk partial statistics of param_stats.
struct StatsPartial {
  double sumsq;
  float absmax;  // NaN when the chunk holds a NaN
  int64_t hist[256];
};

// fault: where an indexed chunk met a position out of range (see index_fault.h).
using AdamWChunkFn = void (*)(const AdamWChunk&, const AdamWScalars&, IndexFault*);
using AdamWQ8ChunkFn = void (*)(const AdamWQ8Chunk&, const AdamWScalars&, IndexFault*);
using AdamWQ4ChunkFn = void (*)(const AdamWQ4Chunk&, const AdamWScalars&);
using AdamWLowpChunkFn = void (*)(const AdamWLowpChunk&, const AdamWScalars&);
using AdamWFirstChunkFn = void (*)(const AdamWFirstChunk&, const AdamWScalars&);
using StatsChunkFn = void (*)(const void* x, FType t, int64_t n, StatsPartial* out);
// select_topk's ranking key of each element: fp32 bits of |x| plus one, NaN -> 0.
using TopkKeysFn = void (*)(const void* x, FType t, int64_t n, uint32_t* keys);

struct CpuKernels {
  const char* name;  // "default", "avx2", "avx512"
  AdamWChunkFn adamw;
  StatsChunkFn stats;  // sumsq, absmax and hist
  StatsChunkFn sums;   // sumsq and absmax only (the same bits as `stats`); hist untouched
  TopkKeysFn topk_keys;
  AdamWQ8ChunkFn adamw_q8;  // masked_adamw_int8_
  AdamWLowpChunkFn adamw_lowp;  // masked_adamw_lowp_
  AdamWFirstChunkFn adamw_first;  // adamw_first_step_
  AdamWQ4ChunkFn adamw_q4;  // masked_adamw_int4_
};

namespace cpu_default { const CpuKernels& kernels(); }
namespace cpu_avx2 { const CpuKernels& kernels(); }
namespace cpu_avx512 { const CpuKernels& kernels(); }

// The variant for this CPU (honours ATEN_CPU_CAPABILITY=default|avx2|avx512), chosen once.
const CpuKernels& cpu_kernels();

}  // namespace nto
