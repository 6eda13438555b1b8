// remap_state on CUDA: compact state moved from one sorted index set to another, as a merge.
// Each block takes a run of new positions; as both index sets are sorted, the old positions
// that can match lie in one window [lo, hi) of the old set (two binary searches by one
// thread), and every new position is then found by a binary search inside that window.
// Values are copied as raw 2- or 4-byte words (bit-exact for every float dtype); new
// positions get all-zero bits, which is 0.0 in fp32, bf16 and fp16.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "arg_checks.cuh"
#include "index_check.cuh"
#include "multi_tensor.cuh"

namespace nto {
namespace cuda {
namespace remap {  // named: all files can share one TU (bench/cuda_syntax_check.sh)
namespace {

constexpr const char* kOp = "remap_state";
constexpr int kThreads = 256;
constexpr int64_t kChunk = 1 << 12;  // new positions per block

struct RemapMeta {
  static constexpr int kTensors = 36;
  static constexpr int kBlocks = 320;
  const void* old_idx[kTensors];
  const void* new_idx[kTensors];
  const void* src[kTensors];
  void* dst[kTensors];
  int64_t n_old[kTensors];
  int64_t n_new[kTensors];
  int64_t rows[kTensors];  // product of the leading dimensions
  uint8_t old64[kTensors];
  uint8_t new64[kTensors];
  uint8_t esize[kTensors];  // bytes per state element: 2 or 4
  uint8_t block_slot[kBlocks];
  int32_t block_chunk[kBlocks];
};

__device__ __forceinline__ int64_t at_index(const void* p, bool is64, int64_t j) {
  return is64 ? static_cast<const int64_t*>(p)[j] : static_cast<const int32_t*>(p)[j];
}

// First position in [lo, hi) of the sorted set whose value is >= key.
__device__ __forceinline__ int64_t lower_bound(const void* p, bool is64, int64_t lo, int64_t hi,
                                               int64_t key) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (at_index(p, is64, mid) < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

template <typename W>
__device__ __forceinline__ void copy_rows(const void* src, void* dst, int64_t rows,
                                          int64_t n_old, int64_t n_new, int64_t a, int64_t j,
                                          bool found) {
  const W* s = static_cast<const W*>(src);
  W* d = static_cast<W*>(dst);
  for (int64_t r = 0; r < rows; ++r) d[r * n_new + j] = found ? s[r * n_old + a] : W(0);
}

__global__ void __launch_bounds__(kThreads) remap_kernel(RemapMeta meta) {
  __shared__ int64_t window[2];
  const int slot = meta.block_slot[blockIdx.x];
  const int64_t n_old = meta.n_old[slot], n_new = meta.n_new[slot];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t len = n_new - begin < kChunk ? n_new - begin : kChunk;
  const void* oi = meta.old_idx[slot];
  const void* ni = meta.new_idx[slot];
  const bool o64 = meta.old64[slot], n64 = meta.new64[slot];
  if (threadIdx.x == 0) {
    const int64_t first = at_index(ni, n64, begin), last = at_index(ni, n64, begin + len - 1);
    const int64_t lo = lower_bound(oi, o64, 0, n_old, first);
    window[0] = lo;
    window[1] = lower_bound(oi, o64, lo, n_old, last + 1);
  }
  __syncthreads();
  const int64_t lo = window[0], hi = window[1];
  for (int64_t j = begin + threadIdx.x; j < begin + len; j += kThreads) {
    const int64_t key = at_index(ni, n64, j);
    const int64_t a = lower_bound(oi, o64, lo, hi, key);
    const bool found = a < hi && at_index(oi, o64, a) == key;
    if (meta.esize[slot] == 4)
      copy_rows<uint32_t>(meta.src[slot], meta.dst[slot], meta.rows[slot], n_old, n_new, a, j,
                          found);
    else
      copy_rows<uint16_t>(meta.src[slot], meta.dst[slot], meta.rows[slot], n_old, n_new, a, j,
                          found);
  }
}

std::vector<at::Tensor> remap_state_cuda(at::TensorList old_indices, at::TensorList new_indices,
                                         at::TensorList states) {
  check_remap_meta(old_indices, new_indices, states);
  const size_t n = states.size();
  if (n == 0) return {};
  const at::Device dev = states[0].device();
  check_on_cuda(kOp, "states", states[0]);
  c10::cuda::CUDAGuard guard(dev);
  std::vector<IndexRef> all;
  for (size_t i = 0; i < n; ++i) all.push_back({&old_indices[i], "old_indices", i});
  for (size_t i = 0; i < n; ++i) all.push_back({&new_indices[i], "new_indices", i});
  const auto facts = index_facts(kOp, all);
  for (size_t i = 0; i < n; ++i) {
    check_index_values(kOp, "old_indices", i, old_indices[i], facts[i], -1, "positions");
    check_index_values(kOp, "new_indices", i, new_indices[i], facts[n + i], -1, "positions");
  }

  std::vector<at::Tensor> outs(n);
  std::vector<int64_t> lengths(n), rows(n);
  for (size_t i = 0; i < n; ++i) {
    auto shape = states[i].sizes().vec();
    shape.back() = new_indices[i].numel();
    outs[i] = at::empty(shape, states[i].options());
    rows[i] = 1;
    for (size_t d = 0; d + 1 < shape.size(); ++d) rows[i] *= shape[d];
    lengths[i] = rows[i] > 0 ? new_indices[i].numel() : 0;
  }
  const auto stream = current_stream();
  multi_tensor_launch<RemapMeta>(
      lengths, kChunk,
      [&](RemapMeta& meta, int slot, int64_t i) {
        meta.old_idx[slot] = old_indices[i].const_data_ptr();
        meta.new_idx[slot] = new_indices[i].const_data_ptr();
        meta.src[slot] = states[i].const_data_ptr();
        meta.dst[slot] = outs[i].data_ptr();
        meta.n_old[slot] = old_indices[i].numel();
        meta.n_new[slot] = new_indices[i].numel();
        meta.rows[slot] = rows[i];
        meta.old64[slot] = old_indices[i].scalar_type() == at::kLong;
        meta.new64[slot] = new_indices[i].scalar_type() == at::kLong;
        meta.esize[slot] = static_cast<uint8_t>(states[i].element_size());
      },
      [&](const RemapMeta& meta, int blocks) {
        remap_kernel<<<blocks, kThreads, 0, stream>>>(meta);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CUDA, m) { m.impl("remap_state", &remap_state_cuda); }

}  // namespace remap

}  // namespace cuda
}  // namespace nto
