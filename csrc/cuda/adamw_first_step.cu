// adamw_first_step_ on CUDA: the first update of a fresh AdamW state over whole contiguous
// params, the moments zero and kept nowhere (nto_ext/formats/none.py; spec:
// nto_ext/_reference.py adamw_first_step_). masked_adamw.cu's dense kernel with m = v = 0 in
// registers: the same adamw_math.h update on the same step-1 scalars, so the param's bits are
// masked_adamw_'s on a fresh fp32 state; one read of p and g, one write of p. One
// multi-tensor launch per (param dtype, grad dtype) group.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "../adamw_math.h"
#include "arg_checks.cuh"
#include "multi_tensor.cuh"

namespace nto {
namespace cuda {
namespace first {  // named: all files can share one TU (bench/cuda_syntax_check.sh)
namespace {

constexpr const char* kOp = "adamw_first_step_";
constexpr int kThreads = 512;
constexpr int64_t kChunk = 1 << 16;  // elements per block
// Two 512-thread blocks per SM (a 64-register cap) as masked_adamw.cu's dense kernel. With
// two streams (p, g) instead of its four, 4 vectors per thread keep the same loads in flight
// and still fit: 53-56 registers, no spills (ptxas, sm_90; 44-48 with 2 vectors).
constexpr int kIlp = 4;
constexpr int kBlocksPerSm = 2;

// Two pointers and a length per slot: twice masked_adamw_'s 32 slots fit the 4 KiB.
struct FirstMeta {
  static constexpr int kTensors = 64;
  static constexpr int kBlocks = 320;
  void* p[kTensors];
  const void* g[kTensors];
  int64_t n[kTensors];
  uint8_t block_slot[kBlocks];
  int32_t block_chunk[kBlocks];
};

// One element: the moments are fresh zeros, updated in registers and dropped.
template <typename P>
__device__ __forceinline__ P first_update(float pf, float gf, const AdamWScalars& s) {
  float m = 0.0f, v = 0.0f;
  adamw_update(pf, gf, m, v, s, s.neg_step_size, s.bc2_sqrt);
  return from_float<P>(pf);  // bf16 / fp16: rounded to nearest even once
}

template <typename P, typename G>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    first_kernel(FirstMeta meta, AdamWScalars s) {
  const int slot = meta.block_slot[blockIdx.x];
  const ChunkSpan span = block_chunk_span(meta, slot, kChunk);
  const int64_t len = span.len;
  P* __restrict__ p = static_cast<P*>(meta.p[slot]) + span.begin;
  const G* __restrict__ g = static_cast<const G*>(meta.g[slot]) + span.begin;

  constexpr int V = 4;
  using PV = Vec<P, V>;
  using GV = Vec<G, V>;
  // Chunks start at multiples of kChunk elements, so a tensor's base decides the alignment.
  const bool vec = aligned<sizeof(PV)>(p) && aligned<sizeof(GV)>(g);
  const int64_t nvec = vec ? len / V : 0;
  for (int64_t q0 = threadIdx.x; q0 < nvec; q0 += static_cast<int64_t>(kThreads) * kIlp) {
    PV pv[kIlp];
    GV gv[kIlp];
#pragma unroll
    for (int u = 0; u < kIlp; ++u) {  // all loads first: kIlp vectors in flight
      const int64_t q = q0 + static_cast<int64_t>(u) * kThreads;
      if (q < nvec) {
        pv[u] = reinterpret_cast<const PV*>(p)[q];
        gv[u] = reinterpret_cast<const GV*>(g)[q];
      }
    }
#pragma unroll
    for (int u = 0; u < kIlp; ++u) {
      const int64_t q = q0 + static_cast<int64_t>(u) * kThreads;
      if (q < nvec) {
#pragma unroll
        for (int e = 0; e < V; ++e)
          pv[u].v[e] = first_update<P>(to_float(pv[u].v[e]), to_float(gv[u].v[e]), s);
        reinterpret_cast<PV*>(p)[q] = pv[u];
      }
    }
  }
  for (int64_t e = nvec * V + threadIdx.x; e < len; e += kThreads)  // tail / unaligned
    p[e] = first_update<P>(to_float(p[e]), to_float(g[e]), s);
}

template <typename P, typename G>
void launch(const std::vector<int64_t>& ids, at::TensorList params, at::TensorList grads,
            const AdamWScalars& s, cudaStream_t stream) {
  if (ids.empty()) return;
  std::vector<int64_t> lengths;
  for (int64_t i : ids) lengths.push_back(params[i].numel());
  multi_tensor_launch<FirstMeta>(
      lengths, kChunk,
      [&](FirstMeta& meta, int slot, int64_t k) {
        meta.p[slot] = params[ids[k]].data_ptr();
        meta.g[slot] = grads[ids[k]].const_data_ptr();
        meta.n[slot] = lengths[k];
      },
      [&](const FirstMeta& meta, int blocks) {
        first_kernel<P, G><<<blocks, kThreads, 0, stream>>>(meta, s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void adamw_first_step_cuda(at::TensorList params, at::TensorList grads, double lr, double beta1,
                           double beta2, double eps, double weight_decay) {
  check_adamw_first_meta(params, grads, lr, beta1, beta2, eps, weight_decay);
  const size_t n = params.size();
  if (n == 0) return;
  check_on_cuda(kOp, "params", params[0]);
  c10::cuda::CUDAGuard guard(params[0].device());
  // Groups: param dtype x grad dtype (the checks allow only the param's dtype or fp32).
  std::vector<int64_t> same[3], g32[3];
  for (size_t i = 0; i < n; ++i) {
    const int pt = dtype_code(params[i].scalar_type());
    (grads[i].scalar_type() == params[i].scalar_type() ? same : g32)[pt].push_back(
        static_cast<int64_t>(i));
  }
  const AdamWScalars s = adamw_scalars(lr, beta1, beta2, eps, weight_decay, /*step=*/1.0);
  const cudaStream_t stream = current_stream();
  launch<float, float>(same[0], params, grads, s, stream);
  launch<c10::BFloat16, c10::BFloat16>(same[1], params, grads, s, stream);
  launch<c10::BFloat16, float>(g32[1], params, grads, s, stream);
  launch<c10::Half, c10::Half>(same[2], params, grads, s, stream);
  launch<c10::Half, float>(g32[2], params, grads, s, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CUDA, m) { m.impl("adamw_first_step_", &adamw_first_step_cuda); }

}  // namespace first
}  // namespace cuda
}  // namespace nto
