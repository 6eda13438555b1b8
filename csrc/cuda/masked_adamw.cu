// masked_adamw_ on CUDA: torch.optim.AdamW's update (csrc/adamw_math.h, shared with the CPU
// kernels) over whole tensor lists, in one multi-tensor launch per (param dtype, grad dtype)
// group and kind: dense (aligned vector loads, kDenseIlp vectors in flight per thread)
// or indexed (sorted unique positions; compact state; grad compact or dense). The moments
// are fp32 or bf16 (S): bf16 ones are widened, updated in fp32 and rounded to nearest even
// once, as the CPU kernel.
//
// Steps (one count per tensor): an int becomes a CPU scalar in ops.py and its bias
// corrections are computed here on the host, in double. A 1-element CUDA step tensor is read
// by the kernel itself, so it needs no host sync. Those device counts are not checked on the
// host (that would sync every step): a tensor whose device step is < 1 or NaN is left
// untouched (bit-identical) instead of raising as a CPU step does.
// Index tensors are checked before any write (index_check.cuh: a host sync only the first
// time given index memory is seen at its current version, through any view of it), and each
// position again where the kernel reads it. Arguments sharing memory are refused on the host
// (csrc/checks.h: grads are read through __restrict__ pointers, the non-coherent cache).
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../adamw_math.h"
#include "arg_checks.cuh"
#include "index_check.cuh"
#include "multi_tensor.cuh"

namespace nto {
namespace cuda {
namespace adamw {  // named: all files can share one TU (bench/cuda_syntax_check.sh)
namespace {

constexpr const char* kOp = "masked_adamw_";
constexpr int kThreads = 512;
constexpr int kIlp = 4;              // independent elements in flight per thread (indexed)
constexpr int64_t kChunk = 1 << 16;  // elements per block
// Dense: independent 4-element vectors in flight per thread, and blocks resident per SM
// (__launch_bounds__ caps registers at 65536 / (kThreads * kDenseBlocksPerSm) = 64). With
// 4 vectors the kernel took 102-114 registers (ptxas, sm_90), so one 512-thread block per SM;
// with 2 vectors it takes 48-55 and no spills (4 vectors under a 64 cap spill 150-750 bytes),
// so two blocks fit: the same bytes in flight per SM, twice the warps to hide the math and a
// block's tail behind another block.
constexpr int kDenseIlp = 2;
constexpr int kDenseBlocksPerSm = 2;

// Where a tensor's step count comes from.
enum StepCode : int8_t {
  kStepHost = 0,  // scalars computed on the host (CPU step)
  kStepF64,       // 1-element CUDA tensors, read by the kernel
  kStepF32,
  kStepI64,
  kStepI32,
};

struct Hyper {  // what a device step needs to compute its bias corrections
  double lr, beta1, beta2;
};

__device__ __forceinline__ double load_step(const void* p, int code) {
  switch (code) {
    case kStepF64: return *static_cast<const double*>(p);
    case kStepF32: return *static_cast<const float*>(p);
    case kStepI64: return static_cast<double>(*static_cast<const int64_t*>(p));
    default: return *static_cast<const int32_t*>(p);
  }
}

// The per-step scalars of one tensor; false when its device step is < 1 or NaN (skip it).
__device__ __forceinline__ bool tensor_step(int code, const void* step, float host_nss,
                                            float host_bc2, const Hyper& h, float* nss,
                                            float* bc2) {
  if (code == kStepHost) {
    *nss = host_nss;
    *bc2 = host_bc2;
    return true;
  }
  const double s = load_step(step, code);
  if (!(s >= 1.0)) return false;
  adamw_step_scalars(h.lr, h.beta1, h.beta2, s, nss, bc2);
  return true;
}

// The per-tensor fields both kernels read (kind-specific ones are added by each Meta).
template <int T, int B>
struct AdamWMeta {
  static constexpr int kTensors = T;
  static constexpr int kBlocks = B;
  void* p[T];
  const void* g[T];
  void* m[T];  // S*: the kernel's state type
  void* v[T];
  const void* step[T];
  int64_t n[T];  // updated elements (state length)
  float nss[T];
  float bc2[T];
  int8_t code[T];
  uint8_t block_slot[B];
  int32_t block_chunk[B];
};

// What one block works on: its tensor's slot and step scalars, and its chunk of the state.
struct BlockWork {
  int slot;
  float nss, bc2;
  int64_t begin, len;
};

// False when the tensor's device step is < 1 or NaN: the whole block skips it (uniform).
template <class Meta>
__device__ __forceinline__ bool block_work(const Meta& meta, const Hyper& h, BlockWork* w) {
  const int slot = meta.block_slot[blockIdx.x];
  if (!tensor_step(meta.code[slot], meta.step[slot], meta.nss[slot], meta.bc2[slot], h,
                   &w->nss, &w->bc2))
    return false;
  const ChunkSpan span = block_chunk_span(meta, slot, kChunk);
  w->slot = slot;
  w->begin = span.begin;
  w->len = span.len;
  return true;
}

// ---------------------------------------------------------------------------------- dense

struct DenseMeta : AdamWMeta<32, 320> {};

template <typename P, typename G, typename S>
__global__ void __launch_bounds__(kThreads, kDenseBlocksPerSm)
    dense_kernel(DenseMeta meta, AdamWScalars s, Hyper h) {
  BlockWork w;
  if (!block_work(meta, h, &w)) return;
  const int slot = w.slot;
  const float nss = w.nss, bc2 = w.bc2;
  const int64_t begin = w.begin, len = w.len;
  P* __restrict__ p = static_cast<P*>(meta.p[slot]) + begin;
  const G* __restrict__ g = static_cast<const G*>(meta.g[slot]) + begin;
  S* __restrict__ m = static_cast<S*>(meta.m[slot]) + begin;
  S* __restrict__ v = static_cast<S*>(meta.v[slot]) + begin;

  constexpr int V = 4;
  using PV = Vec<P, V>;
  using GV = Vec<G, V>;
  using SV = Vec<S, V>;
  const bool vec = aligned<sizeof(PV)>(p) && aligned<sizeof(GV)>(g) &&
                   aligned<sizeof(SV)>(m) && aligned<sizeof(SV)>(v);
  const int64_t nvec = vec ? len / V : 0;
  for (int64_t q0 = threadIdx.x; q0 < nvec; q0 += static_cast<int64_t>(kThreads) * kDenseIlp) {
    PV pv[kDenseIlp];
    GV gv[kDenseIlp];
    SV mv[kDenseIlp], vv[kDenseIlp];
#pragma unroll
    for (int u = 0; u < kDenseIlp; ++u) {  // all loads first: kDenseIlp vectors in flight
      const int64_t q = q0 + static_cast<int64_t>(u) * kThreads;
      if (q < nvec) {
        pv[u] = reinterpret_cast<const PV*>(p)[q];
        gv[u] = reinterpret_cast<const GV*>(g)[q];
        mv[u] = reinterpret_cast<const SV*>(m)[q];
        vv[u] = reinterpret_cast<const SV*>(v)[q];
      }
    }
#pragma unroll
    for (int u = 0; u < kDenseIlp; ++u) {
      const int64_t q = q0 + static_cast<int64_t>(u) * kThreads;
      if (q < nvec) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          float pf = to_float(pv[u].v[e]), mf = to_float(mv[u].v[e]);
          float vf = to_float(vv[u].v[e]);
          adamw_update(pf, to_float(gv[u].v[e]), mf, vf, s, nss, bc2);
          pv[u].v[e] = from_float<P>(pf);
          mv[u].v[e] = from_float<S>(mf);
          vv[u].v[e] = from_float<S>(vf);
        }
        reinterpret_cast<PV*>(p)[q] = pv[u];
        reinterpret_cast<SV*>(m)[q] = mv[u];
        reinterpret_cast<SV*>(v)[q] = vv[u];
      }
    }
  }
  for (int64_t e = nvec * V + threadIdx.x; e < len; e += kThreads) {  // tail / unaligned
    float pf = to_float(p[e]);
    float mf = to_float(m[e]), vf = to_float(v[e]);
    adamw_update(pf, to_float(g[e]), mf, vf, s, nss, bc2);
    p[e] = from_float<P>(pf);
    m[e] = from_float<S>(mf);
    v[e] = from_float<S>(vf);
  }
}

// ------------------------------------------------------------------------------- indexed

struct IndexedMeta : AdamWMeta<24, 320> {
  const void* idx[kTensors];
  int64_t limit[kTensors];  // param numel: positions must be below it
  int32_t list[kTensors];   // the tensor's position in the op's lists (for the fault record)
  uint8_t idx_mode[kTensors];  // 1: int32, 2: int64
  uint8_t g_dense[kTensors];   // grad has the param's numel: read it at the positions
};

// Each position is read once and checked where it is used (index_check.cuh): one out of
// range is skipped (p, g, m and v untouched there) and recorded, never dereferenced.
template <typename P, typename G, typename S>
__global__ void __launch_bounds__(kThreads)
    indexed_kernel(IndexedMeta meta, AdamWScalars s, Hyper h, DeviceIndexFault* fault) {
  BlockWork w;
  if (!block_work(meta, h, &w)) return;
  const int slot = w.slot;
  const float nss = w.nss, bc2 = w.bc2;
  const int64_t begin = w.begin, len = w.len;
  const int mode = meta.idx_mode[slot];
  const bool g_dense = meta.g_dense[slot];
  const int32_t* idx32 = static_cast<const int32_t*>(meta.idx[slot]) + (mode == 1 ? begin : 0);
  const int64_t* idx64 = static_cast<const int64_t*>(meta.idx[slot]) + (mode == 2 ? begin : 0);
  P* __restrict__ p = static_cast<P*>(meta.p[slot]);
  const G* __restrict__ g = static_cast<const G*>(meta.g[slot]) + (g_dense ? 0 : begin);
  S* __restrict__ m = static_cast<S*>(meta.m[slot]) + begin;
  S* __restrict__ v = static_cast<S*>(meta.v[slot]) + begin;
  const int64_t limit = meta.limit[slot];

  for (int64_t j0 = threadIdx.x; j0 < len; j0 += static_cast<int64_t>(kThreads) * kIlp) {
    int64_t pos[kIlp];
    float pf[kIlp], gf[kIlp], mf[kIlp], vf[kIlp];
    bool ok[kIlp];
#pragma unroll
    for (int u = 0; u < kIlp; ++u) {
      const int64_t j = j0 + static_cast<int64_t>(u) * kThreads;
      ok[u] = false;
      if (j < len) {
        pos[u] = mode == 1 ? static_cast<int64_t>(idx32[j]) : idx64[j];
        ok[u] = index_in_range(pos[u], limit);
        if (ok[u]) {
          pf[u] = to_float(p[pos[u]]);
          gf[u] = to_float(g_dense ? g[pos[u]] : g[j]);
          mf[u] = to_float(m[j]);
          vf[u] = to_float(v[j]);
        } else {
          record_fault(fault, kFaultAdamW, meta.list[slot], begin + j, pos[u], limit);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kIlp; ++u) {
      const int64_t j = j0 + static_cast<int64_t>(u) * kThreads;
      if (!ok[u]) continue;
      adamw_update(pf[u], gf[u], mf[u], vf[u], s, nss, bc2);
      p[pos[u]] = from_float<P>(pf[u]);
      m[j] = from_float<S>(mf[u]);
      v[j] = from_float<S>(vf[u]);
    }
  }
}

// ------------------------------------------------------------------------------ host side

struct Entry {  // one tensor's launch arguments
  size_t i;
  int8_t code;
  const void* step;
  float nss, bc2;
  uint8_t idx_mode;
  bool g_dense;
};

// The fields both kernels read, for entry e (state length n) in slot `slot`.
template <class Meta>
void fill_common(Meta& meta, int slot, const Entry& e, int64_t n, at::TensorList params,
                 at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs) {
  meta.p[slot] = params[e.i].data_ptr();
  meta.g[slot] = grads[e.i].const_data_ptr();
  meta.m[slot] = exp_avgs[e.i].data_ptr();
  meta.v[slot] = exp_avg_sqs[e.i].data_ptr();
  meta.step[slot] = e.step;
  meta.n[slot] = n;
  meta.nss[slot] = e.nss;
  meta.bc2[slot] = e.bc2;
  meta.code[slot] = e.code;
}

template <typename P, typename G, typename S>
void launch_dense(const std::vector<Entry>& es, at::TensorList params, at::TensorList grads,
                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs, const AdamWScalars& s,
                  const Hyper& h, cudaStream_t stream) {
  std::vector<int64_t> lengths;
  for (const auto& e : es) lengths.push_back(params[e.i].numel());
  multi_tensor_launch<DenseMeta>(
      lengths, kChunk,
      [&](DenseMeta& meta, int slot, int64_t k) {
        fill_common(meta, slot, es[k], lengths[k], params, grads, exp_avgs, exp_avg_sqs);
      },
      [&](const DenseMeta& meta, int blocks) {
        dense_kernel<P, G, S><<<blocks, kThreads, 0, stream>>>(meta, s, h);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

template <typename P, typename G, typename S>
void launch_indexed(const std::vector<Entry>& es, at::TensorList params, at::TensorList grads,
                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    const std::vector<std::optional<at::Tensor>>& idx, const AdamWScalars& s,
                    const Hyper& h, cudaStream_t stream) {
  DeviceIndexFault* fault = fault_record();
  std::vector<int64_t> lengths;
  for (const auto& e : es) lengths.push_back(exp_avgs[e.i].numel());
  multi_tensor_launch<IndexedMeta>(
      lengths, kChunk,
      [&](IndexedMeta& meta, int slot, int64_t k) {
        const Entry& e = es[k];
        fill_common(meta, slot, e, lengths[k], params, grads, exp_avgs, exp_avg_sqs);
        meta.idx[slot] = idx[e.i]->const_data_ptr();
        meta.limit[slot] = params[e.i].numel();
        meta.list[slot] = static_cast<int32_t>(e.i);
        meta.idx_mode[slot] = e.idx_mode;
        meta.g_dense[slot] = e.g_dense;
      },
      [&](const IndexedMeta& meta, int blocks) {
        indexed_kernel<P, G, S><<<blocks, kThreads, 0, stream>>>(meta, s, h, fault);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// Picks the kernel instantiation for a group of entries sharing (param dtype, grad dtype) and
// state type S (float or c10::BFloat16): the grad is the param's dtype or fp32, or bf16/fp16
// for an fp32 param (a master weight).
template <bool kIndexed, typename S>
void launch_group(c10::ScalarType pt, c10::ScalarType gt, const std::vector<Entry>& es,
                  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, const std::vector<std::optional<at::Tensor>>& idx,
                  const AdamWScalars& s, const Hyper& h, cudaStream_t stream) {
  if (es.empty()) return;
#define NTO_LAUNCH(P, G)                                                                   \
  if constexpr (kIndexed)                                                                  \
    launch_indexed<P, G, S>(es, params, grads, exp_avgs, exp_avg_sqs, idx, s, h, stream); \
  else                                                                                     \
    launch_dense<P, G, S>(es, params, grads, exp_avgs, exp_avg_sqs, s, h, stream);
  const bool g_fp32 = gt == at::kFloat;
  if (pt == at::kFloat) {
    if (g_fp32) {
      NTO_LAUNCH(float, float)
    } else if (gt == at::kBFloat16) {
      NTO_LAUNCH(float, c10::BFloat16)
    } else {
      NTO_LAUNCH(float, c10::Half)
    }
  } else if (pt == at::kBFloat16) {
    if (g_fp32) {
      NTO_LAUNCH(c10::BFloat16, float)
    } else {
      NTO_LAUNCH(c10::BFloat16, c10::BFloat16)
    }
  } else {
    if (g_fp32) {
      NTO_LAUNCH(c10::Half, float)
    } else {
      NTO_LAUNCH(c10::Half, c10::Half)
    }
  }
#undef NTO_LAUNCH
}

int8_t device_step_code(c10::ScalarType t) {
  switch (t) {
    case at::kDouble: return kStepF64;
    case at::kFloat: return kStepF32;
    case at::kLong: return kStepI64;
    case at::kInt: return kStepI32;
    default: return -1;  // converted to float64 on the device first
  }
}

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs,
                       const c10::List<std::optional<at::Tensor>>& indices, at::TensorList steps,
                       double lr, double beta1, double beta2, double eps, double weight_decay) {
  check_adamw_meta(params, grads, exp_avgs, exp_avg_sqs, indices, steps, lr, beta1, beta2, eps,
                   weight_decay);
  const size_t n = params.size();
  if (n == 0) return;
  std::vector<std::optional<at::Tensor>> idx(n);
  for (size_t i = 0; i < n; ++i) {
    std::optional<at::Tensor> o = indices.get(i);
    if (o.has_value() && o->defined()) idx[i] = std::move(o);
  }
  const at::Device dev = params[0].device();
  check_on_cuda(kOp, "params", params[0]);
  raise_recorded_fault();  // an earlier launch's (index_check.cuh), before anything changes
  c10::cuda::CUDAGuard guard(dev);

  // Values, entry by entry as the reference: the indices (one device check for all of them,
  // cached), then the host step counts (each read once, here).
  std::vector<IndexRef> idx_refs;
  for (size_t i = 0; i < n; ++i)
    if (idx[i].has_value()) idx_refs.push_back({&*idx[i], "indices", i});
  const auto facts = index_facts(kOp, idx_refs);
  std::vector<double> host_steps(n, 0.0);
  for (size_t i = 0, k = 0; i < n; ++i) {
    if (idx[i].has_value())
      check_index_values(kOp, "indices", i, *idx[i], facts[k++], params[i].numel(), "params");
    if (steps[i].device().is_cpu()) host_steps[i] = checked_host_step(kOp, i, steps[i]);
  }

  // Sort the entries into kernel groups: kind x param dtype x grad dtype x state dtype.
  std::vector<Entry> groups[2][3][3][2];
  std::vector<at::Tensor> keep;  // converted device steps live until the launches are queued
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& st = steps[i];
    Entry e{i, kStepHost, nullptr, 0.0f, 1.0f, 0, false};
    if (st.device().is_cpu()) {
      adamw_step_scalars(lr, beta1, beta2, host_steps[i], &e.nss, &e.bc2);
    } else {
      e.code = device_step_code(st.scalar_type());
      if (e.code < 0) {
        keep.push_back(st.to(at::kDouble));
        e.code = kStepF64;
        e.step = keep.back().const_data_ptr();
      } else {
        e.step = st.const_data_ptr();
      }
    }
    const bool indexed = idx[i].has_value();
    if (indexed) {
      e.idx_mode = idx[i]->scalar_type() == at::kLong ? 2 : 1;
      e.g_dense = grads[i].numel() != idx[i]->numel();
    }
    const int state = exp_avgs[i].scalar_type() == at::kBFloat16;  // 0: fp32, 1: bf16
    const int pt = dtype_code(params[i].scalar_type()), gt = dtype_code(grads[i].scalar_type());
    groups[indexed][pt][gt][state].push_back(e);
  }

  const AdamWScalars s = adamw_scalars(lr, beta1, beta2, eps, weight_decay);
  const Hyper h{lr, beta1, beta2};
  const cudaStream_t stream = current_stream();
  const c10::ScalarType types[3] = {at::kFloat, at::kBFloat16, at::kHalf};
  const auto launch_groups = [&](auto state, int pt, int gt) {  // dense, then indexed
    using S = decltype(state);
    const int k = std::is_same_v<S, float> ? 0 : 1;
    launch_group<false, S>(types[pt], types[gt], groups[0][pt][gt][k], params, grads,
                           exp_avgs, exp_avg_sqs, idx, s, h, stream);
    launch_group<true, S>(types[pt], types[gt], groups[1][pt][gt][k], params, grads, exp_avgs,
                          exp_avg_sqs, idx, s, h, stream);
  };
  for (int pt = 0; pt < 3; ++pt)
    for (int gt = 0; gt < 3; ++gt) {
      launch_groups(float{}, pt, gt);
      launch_groups(c10::BFloat16{}, pt, gt);
    }
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CUDA, m) { m.impl("masked_adamw_", &masked_adamw_cuda); }

}  // namespace adamw

}  // namespace cuda
}  // namespace nto
