// select_topk on CUDA: exact global top-k by |x| over the concatenated list, without sorting
// and without copying the values.
//
// Each element gets a 31-bit rank key: the fp32 bit pattern of |x| plus one (monotone in
// |x| for non-negative floats), and 0 for NaN, which so ranks below every number.
//   1. Radix select, 3 passes over the data (key bits 30..20, 19..9, 8..0): a device
//      histogram of the next digit among the elements that share the digits found so far,
//      then one block finds the bucket holding the k-th largest key. After pass 3 the
//      threshold key T is exact and so is `need_eq`, how many elements equal to T to take.
//      No host sync: the state (prefix, remaining k) stays on the device between passes.
//   2. Per chunk, count keys > T and == T; one block scans the chunks in concatenated order:
//      the first `need_eq` ties (lowest concatenated positions) are taken, and every chunk
//      gets its output offset.
//   3. One device-to-host copy of the offsets (the outputs' sizes are data: the one sync),
//      then a compaction pass writes each tensor's positions in ascending order.
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "arg_checks.cuh"
#include "multi_tensor.cuh"

namespace nto {
namespace cuda {
namespace topk {  // named: all files can share one TU (bench/cuda_syntax_check.sh)
namespace {

constexpr const char* kOp = "select_topk";
constexpr int kThreads = 512;
constexpr int kScanThreads = 1024;
constexpr int kBins = 2048;  // digits of 11 bits (the last pass: 9 bits)
constexpr int64_t kInt32Max = 2147483647;

struct Pass {
  int shift, bits;
};
// Rank keys are < 2^31: digits of bits 30..20, 19..9 and 8..0.
__host__ __device__ constexpr Pass pass_of(int p) {
  return p == 0 ? Pass{20, 11} : (p == 1 ? Pass{9, 11} : Pass{0, 9});
}

__device__ __forceinline__ uint32_t rank_key(float f) {
  const uint32_t b = __float_as_uint(f) & 0x7fffffffu;
  return b > 0x7f800000u ? 0u : b + 1u;  // NaN: 0, below every number
}

struct TopkMeta {
  static constexpr int kTensors = 64;
  static constexpr int kBlocks = 320;
  const void* ptr[kTensors];
  void* out[kTensors];
  int64_t n[kTensors];
  int64_t chunk_base[kTensors];
  uint8_t out64[kTensors];
  uint8_t block_slot[kBlocks];
  int32_t block_chunk[kBlocks];
};

struct Span {
  int64_t begin, len, global;
};
__device__ __forceinline__ Span block_span(const TopkMeta& meta, int slot, int64_t chunk) {
  const ChunkSpan c = block_chunk_span(meta, slot, chunk);
  return {c.begin, c.len, meta.chunk_base[slot] + meta.block_chunk[blockIdx.x]};
}

// ------------------------------------------------------------------------ 1. radix select

// state[0]: the digits found so far (the prefix), state[1]: how many of the k still lie at
// or below the prefix. Pass p counts the next digit of the keys that match the prefix.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    hist_kernel(TopkMeta meta, int64_t chunk, int pass, const int64_t* state,
                unsigned long long* ghist) {
  __shared__ unsigned int hist[kBins];
  for (int b = threadIdx.x; b < kBins; b += kThreads) hist[b] = 0;
  __syncthreads();
  const Pass ps = pass_of(pass);
  const uint32_t prefix = pass == 0 ? 0u : static_cast<uint32_t>(state[0]);
  const int match_shift = ps.shift + ps.bits;
  const uint32_t mask = (1u << ps.bits) - 1u;
  const int slot = meta.block_slot[blockIdx.x];
  const Span sp = block_span(meta, slot, chunk);
  const T* x = static_cast<const T*>(meta.ptr[slot]) + sp.begin;
  constexpr int V = 16 / sizeof(T);
  const bool vec = aligned<16>(x);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int64_t base = static_cast<int64_t>(warp) * 32 * V; base < sp.len;
       base += static_cast<int64_t>(kThreads) * V) {  // warp-uniform trip count
    const int64_t e0 = base + static_cast<int64_t>(lane) * V;
    float f[V];
    load_floats<T, V>(x, e0, sp.len, vec, f);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const uint32_t key = rank_key(f[e]);
      const bool in = e0 + e < sp.len && (pass == 0 || (key >> match_shift) == prefix);
      warp_hist_add(hist, in ? (key >> ps.shift) & mask : kNoBin);
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < (1 << ps.bits); b += kThreads)
    if (hist[b]) atomicAdd(ghist + b, static_cast<unsigned long long>(hist[b]));
}

// One block: the bucket (digit) holding the k-th largest among the prefix-matching keys.
__global__ void __launch_bounds__(kScanThreads)
    find_bucket_kernel(int pass, int64_t k, const unsigned long long* ghist, int64_t* state) {
  __shared__ unsigned long long smem[kScanThreads / 32];
  const Pass ps = pass_of(pass);
  const int nb = 1 << ps.bits;
  const unsigned long long want =
      static_cast<unsigned long long>(pass == 0 ? k : state[1]);  // >= 1
  const int64_t prefix = pass == 0 ? 0 : state[0];
  // Thread t holds the bins nb-1-2t and nb-2-2t: thread order is descending key order.
  const int hi = nb - 1 - 2 * static_cast<int>(threadIdx.x), lo = hi - 1;
  const unsigned long long h_hi = hi >= 0 ? ghist[hi] : 0ull;
  const unsigned long long h_lo = lo >= 0 ? ghist[lo] : 0ull;
  unsigned long long total;
  const unsigned long long above =
      block_exclusive_scan<kScanThreads>(h_hi + h_lo, &total, smem);  // syncs: state read first
  int found = -1;
  unsigned long long rem = 0;
  if (hi >= 0 && above < want && want <= above + h_hi) {
    found = hi;
    rem = want - above;
  } else if (lo >= 0 && above + h_hi < want && want <= above + h_hi + h_lo) {
    found = lo;
    rem = want - above - h_hi;
  }
  if (found >= 0) {  // exactly one thread
    state[0] = (prefix << ps.bits) | found;
    state[1] = static_cast<int64_t>(rem);
  }
}

// ----------------------------------------------------------------- 2. counts and offsets

template <typename T>
__global__ void __launch_bounds__(kThreads)
    count_kernel(TopkMeta meta, int64_t chunk, const int64_t* state,
                 unsigned long long* cnt_gt, unsigned long long* cnt_eq) {
  __shared__ unsigned long long smem[kThreads / 32];
  const uint32_t thr = static_cast<uint32_t>(state[0]);
  const int slot = meta.block_slot[blockIdx.x];
  const Span sp = block_span(meta, slot, chunk);
  const T* x = static_cast<const T*>(meta.ptr[slot]) + sp.begin;
  constexpr int V = 16 / sizeof(T);
  const bool vec = aligned<16>(x);
  unsigned long long gt = 0, eq = 0;
  for (int64_t e0 = static_cast<int64_t>(threadIdx.x) * V; e0 < sp.len;
       e0 += static_cast<int64_t>(kThreads) * V) {
    float f[V];
    load_floats<T, V>(x, e0, sp.len, vec, f);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e0 + e >= sp.len) break;
      const uint32_t key = rank_key(f[e]);
      gt += key > thr;
      eq += key == thr;
    }
  }
  gt = block_sum<kThreads>(gt, smem);
  eq = block_sum<kThreads>(eq, smem);
  if (threadIdx.x == 0) {
    cnt_gt[sp.global] = gt;
    cnt_eq[sp.global] = eq;
  }
}

// One block over all chunks in concatenated order: eq_take[c] = ties taken in chunk c (the
// first need_eq ties overall), sel_before[c] = elements selected before chunk c
// (sel_before[nchunks] = k).
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(int64_t nchunks, const int64_t* state, const unsigned long long* cnt_gt,
                const unsigned long long* cnt_eq, unsigned long long* eq_take,
                unsigned long long* sel_before) {
  __shared__ unsigned long long smem[kScanThreads / 32];
  const unsigned long long need_eq = static_cast<unsigned long long>(state[1]);
  unsigned long long eq_carry = 0, sel_carry = 0;
  for (int64_t base = 0; base < nchunks; base += kScanThreads) {
    const int64_t c = base + threadIdx.x;
    const unsigned long long eq = c < nchunks ? cnt_eq[c] : 0ull;
    const unsigned long long gt = c < nchunks ? cnt_gt[c] : 0ull;
    unsigned long long eq_total, sel_total;
    const unsigned long long eq_before = eq_carry + block_exclusive_scan<kScanThreads>(
                                                        eq, &eq_total, smem);
    const unsigned long long left = need_eq > eq_before ? need_eq - eq_before : 0ull;
    const unsigned long long take = left < eq ? left : eq;
    const unsigned long long before =
        sel_carry + block_exclusive_scan<kScanThreads>(gt + take, &sel_total, smem);
    if (c < nchunks) {
      eq_take[c] = take;
      sel_before[c] = before;
    }
    eq_carry += eq_total;
    sel_carry += sel_total;
  }
  if (threadIdx.x == 0) sel_before[nchunks] = sel_carry;
}

// --------------------------------------------------------------------------- 3. compaction

// Tiles of kThreads * 4 consecutive elements, 4 per thread in thread order, so that one
// block scan of packed (ties, greater) counts orders the outputs: the output slot of a
// selected element = (# greater before it) + min(# ties before it, ties taken in the chunk).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    write_kernel(TopkMeta meta, int64_t chunk, const int64_t* state,
                 const unsigned long long* eq_take, const unsigned long long* sel_before) {
  const int slot = meta.block_slot[blockIdx.x];
  const Span sp = block_span(meta, slot, chunk);
  if (sel_before[sp.global + 1] == sel_before[sp.global]) return;  // nothing chosen here
  __shared__ unsigned long long smem[kThreads / 32];
  const uint32_t thr = static_cast<uint32_t>(state[0]);
  const unsigned long long take = eq_take[sp.global];
  const int64_t out_base =
      static_cast<int64_t>(sel_before[sp.global] - sel_before[meta.chunk_base[slot]]);
  const T* x = static_cast<const T*>(meta.ptr[slot]) + sp.begin;
  const bool out64 = meta.out64[slot];
  int32_t* o32 = static_cast<int32_t*>(meta.out[slot]) + (out64 ? 0 : out_base);
  int64_t* o64 = static_cast<int64_t*>(meta.out[slot]) + (out64 ? out_base : 0);
  constexpr int V = 4;
  const bool vec = aligned<sizeof(T) * V>(x);
  unsigned long long gt_carry = 0, eq_carry = 0;
  for (int64_t tile = 0; tile < sp.len; tile += static_cast<int64_t>(kThreads) * V) {
    const int64_t e0 = tile + static_cast<int64_t>(threadIdx.x) * V;
    float f[V];
    load_floats<T, V>(x, e0, sp.len, vec, f);
    uint32_t key[V];
    unsigned long long packed = 0;  // ties in the high half, greater in the low half
#pragma unroll
    for (int e = 0; e < V; ++e) {
      key[e] = e0 + e < sp.len ? rank_key(f[e]) : 0u;
      const bool valid = e0 + e < sp.len;
      packed += valid && key[e] > thr ? 1ull : 0ull;
      packed += valid && key[e] == thr ? (1ull << 32) : 0ull;
    }
    unsigned long long tile_total;
    const unsigned long long before = block_exclusive_scan<kThreads>(packed, &tile_total, smem);
    unsigned long long gt_b = gt_carry + (before & 0xffffffffull);
    unsigned long long eq_b = eq_carry + (before >> 32);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e0 + e >= sp.len) break;
      int64_t slot_out = -1;
      if (key[e] > thr) {
        slot_out = static_cast<int64_t>(gt_b + (eq_b < take ? eq_b : take));
        ++gt_b;
      } else if (key[e] == thr) {
        if (eq_b < take) slot_out = static_cast<int64_t>(gt_b + eq_b);
        ++eq_b;
      }
      if (slot_out >= 0) {
        const int64_t pos = sp.begin + e0 + e;
        if (out64)
          o64[slot_out] = pos;
        else
          o32[slot_out] = static_cast<int32_t>(pos);
      }
    }
    gt_carry += tile_total & 0xffffffffull;
    eq_carry += tile_total >> 32;
  }
}

// ------------------------------------------------------------------------------ host side

template <class Kernel>
void launch_by_type(const ChunkTable& table, at::TensorList ts,
                    const std::vector<at::Tensor>& outs, int64_t chunk, Kernel&& kernel) {
  for (int type = 0; type < 3; ++type) {
    const auto& ids = table.by_dtype[type];
    if (ids.empty()) continue;
    std::vector<int64_t> lengths;
    for (int64_t i : ids) lengths.push_back(ts[i].numel());
    multi_tensor_launch<TopkMeta>(
        lengths, chunk,
        [&](TopkMeta& meta, int slot, int64_t k) {
          const int64_t i = ids[k];
          meta.ptr[slot] = ts[i].const_data_ptr();
          meta.out[slot] = outs.empty() || !outs[i].defined() ? nullptr : outs[i].data_ptr();
          meta.n[slot] = lengths[k];
          meta.chunk_base[slot] = table.base[i];
          meta.out64[slot] = ts[i].numel() > kInt32Max;
        },
        [&](const TopkMeta& meta, int blocks) {
          kernel(type, meta, blocks);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
}

#define NTO_BY_TYPE(type, KERNEL, ...)                                                   \
  do {                                                                                   \
    if ((type) == 0)                                                                     \
      KERNEL<float><<<blocks, kThreads, 0, stream>>>(__VA_ARGS__);                       \
    else if ((type) == 1)                                                                \
      KERNEL<c10::BFloat16><<<blocks, kThreads, 0, stream>>>(__VA_ARGS__);               \
    else                                                                                 \
      KERNEL<c10::Half><<<blocks, kThreads, 0, stream>>>(__VA_ARGS__);                   \
  } while (0)

std::vector<at::Tensor> select_topk_cuda(at::TensorList ts, int64_t k) {
  check_topk_meta(ts, k);
  int64_t total = 0;
  for (const auto& t : ts) total += t.numel();
  check_on_cuda(kOp, "tensors", ts[0]);
  const at::Device dev = ts[0].device();
  c10::cuda::CUDAGuard guard(dev);
  const int64_t n = static_cast<int64_t>(ts.size());
  const auto iopts = ts[0].options().dtype(at::kLong);
  auto index_dtype = [&](int64_t i) { return ts[i].numel() > kInt32Max ? at::kLong : at::kInt; };
  std::vector<at::Tensor> outs(n);
  if (k == 0 || k == total) {  // nothing, or everything: no need to look at the values
    for (int64_t i = 0; i < n; ++i)
      outs[i] = k == 0 ? at::empty({0}, iopts.dtype(index_dtype(i)))
                       : at::arange(ts[i].numel(), iopts.dtype(index_dtype(i)));
    return outs;
  }

  // One chunk size for every pass: a few blocks per SM, and few histogram flushes.
  const int64_t want = total / (static_cast<int64_t>(sm_count(dev)) * 4);
  int64_t chunk = int64_t{1} << 14;
  while (chunk < want && chunk < (int64_t{1} << 22)) chunk <<= 1;
  const ChunkTable table = chunk_table(ts, chunk);
  const int64_t nch = table.total;
  const auto stream = current_stream();
  auto ghist = at::zeros({3 * kBins}, iopts);  // one histogram per pass, zeroed at once
  auto state = at::empty({2}, iopts);
  auto* gh = reinterpret_cast<unsigned long long*>(ghist.mutable_data_ptr<int64_t>());
  int64_t* st = state.mutable_data_ptr<int64_t>();
  const std::vector<at::Tensor> no_outs;
  for (int pass = 0; pass < 3; ++pass) {
    launch_by_type(table, ts, no_outs, chunk,
                   [&](int type, const TopkMeta& meta, int blocks) {
                     NTO_BY_TYPE(type, hist_kernel, meta, chunk, pass, st, gh + pass * kBins);
                   });
    find_bucket_kernel<<<1, kScanThreads, 0, stream>>>(pass, k, gh + pass * kBins, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  auto counts = at::empty({4 * nch + 1}, iopts);  // gt, eq, eq_take, sel_before[nch + 1]
  auto* cnt = reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>());
  unsigned long long *cnt_gt = cnt, *cnt_eq = cnt + nch, *eq_take = cnt + 2 * nch,
                     *sel_before = cnt + 3 * nch;
  launch_by_type(table, ts, no_outs, chunk,
                 [&](int type, const TopkMeta& meta, int blocks) {
                   NTO_BY_TYPE(type, count_kernel, meta, chunk, st, cnt_gt, cnt_eq);
                 });
  scan_kernel<<<1, kScanThreads, 0, stream>>>(nch, st, cnt_gt, cnt_eq, eq_take, sel_before);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // The sizes of the outputs are data: one device-to-host copy (the one sync).
  const auto host = counts.narrow(0, 3 * nch, nch + 1).cpu();
  const int64_t* sb = host.const_data_ptr<int64_t>();
  TORCH_INTERNAL_ASSERT(sb[nch] == k, kOp, ": selected ", sb[nch], " of k=", k);
  for (int64_t i = 0; i < n; ++i)
    outs[i] = at::empty({sb[table.base[i] + table.count[i]] - sb[table.base[i]]},
                        iopts.dtype(index_dtype(i)));
  launch_by_type(table, ts, outs, chunk,
                 [&](int type, const TopkMeta& meta, int blocks) {
                   NTO_BY_TYPE(type, write_kernel, meta, chunk, st, eq_take, sel_before);
                 });
  return outs;
}

#undef NTO_BY_TYPE

}  // namespace

TORCH_LIBRARY_IMPL(nto, CUDA, m) { m.impl("select_topk", &select_topk_cuda); }

}  // namespace topk

}  // namespace cuda
}  // namespace nto
