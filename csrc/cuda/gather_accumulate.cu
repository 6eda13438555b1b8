// gather_accumulate_ on CUDA: compact[i] += dense[i].view(-1)[indices[i]] in fp32 (one
// rounding per add), one multi-tensor launch for the whole list. Indices are checked before
// any write (index_check.cuh); the same index tensors come back every micro-batch, so after
// the first call this runs with no host sync. The kernel checks each index again where it
// reads it (another thread may change them meanwhile).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "arg_checks.cuh"
#include "index_check.cuh"
#include "multi_tensor.cuh"

namespace nto {
namespace cuda {
namespace gather {  // named: all files can share one TU (bench/cuda_syntax_check.sh)
namespace {

constexpr const char* kOp = "gather_accumulate_";
constexpr int kThreads = 512;
constexpr int kIlp = 4;
constexpr int64_t kChunk = 1 << 16;

struct GatherMeta {
  static constexpr int kTensors = 48;
  static constexpr int kBlocks = 320;
  const void* dense[kTensors];
  const void* idx[kTensors];
  float* compact[kTensors];
  int64_t n[kTensors];
  int64_t limit[kTensors];  // dense numel: positions must be below it
  int32_t list[kTensors];   // the tensor's position in the op's lists (for the fault record)
  uint8_t idx64[kTensors];
  uint8_t dtype[kTensors];  // dtype_code of dense
  uint8_t block_slot[kBlocks];
  int32_t block_chunk[kBlocks];
};

__device__ __forceinline__ float load_as_float(const void* p, int dtype, int64_t pos) {
  switch (dtype) {
    case 0: return static_cast<const float*>(p)[pos];
    case 1: return to_float(static_cast<const c10::BFloat16*>(p)[pos]);
    default: return to_float(static_cast<const c10::Half*>(p)[pos]);
  }
}

// Each index is read once and checked where it is used (index_check.cuh): one out of
// range is skipped and recorded, never dereferenced.
__global__ void __launch_bounds__(kThreads) gather_kernel(GatherMeta meta,
                                                          DeviceIndexFault* fault) {
  const int slot = meta.block_slot[blockIdx.x];
  const ChunkSpan span = block_chunk_span(meta, slot, kChunk);
  const int64_t begin = span.begin, len = span.len;
  const bool i64 = meta.idx64[slot];
  const int dtype = meta.dtype[slot];
  const int32_t* idx32 = static_cast<const int32_t*>(meta.idx[slot]) + (i64 ? 0 : begin);
  const int64_t* idx64 = static_cast<const int64_t*>(meta.idx[slot]) + (i64 ? begin : 0);
  const void* dense = meta.dense[slot];
  const int64_t limit = meta.limit[slot];
  float* c = meta.compact[slot] + begin;
  for (int64_t j0 = threadIdx.x; j0 < len; j0 += static_cast<int64_t>(kThreads) * kIlp) {
    float d[kIlp], acc[kIlp];
    bool ok[kIlp];
#pragma unroll
    for (int u = 0; u < kIlp; ++u) {  // kIlp gathers in flight per thread
      const int64_t j = j0 + static_cast<int64_t>(u) * kThreads;
      ok[u] = false;
      if (j < len) {
        const int64_t pos = i64 ? idx64[j] : static_cast<int64_t>(idx32[j]);
        ok[u] = index_in_range(pos, limit);
        if (ok[u]) {
          d[u] = load_as_float(dense, dtype, pos);
          acc[u] = c[j];
        } else {
          record_fault(fault, kFaultGather, meta.list[slot], begin + j, pos, limit);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kIlp; ++u) {
      const int64_t j = j0 + static_cast<int64_t>(u) * kThreads;
      if (ok[u]) c[j] = acc[u] + d[u];
    }
  }
}

void gather_accumulate_cuda(at::TensorList dense, at::TensorList indices,
                            at::TensorList compact) {
  check_gather_meta(dense, indices, compact);
  const size_t n = dense.size();
  if (n == 0) return;
  const at::Device dev = dense[0].device();
  check_on_cuda(kOp, "dense", dense[0]);
  raise_recorded_fault();  // an earlier launch's (index_check.cuh), before anything changes
  c10::cuda::CUDAGuard guard(dev);
  std::vector<IndexRef> refs(n);
  for (size_t i = 0; i < n; ++i) refs[i] = {&indices[i], "indices", i};
  const auto facts = index_facts(kOp, refs);
  for (size_t i = 0; i < n; ++i)
    check_index_values(kOp, "indices", i, indices[i], facts[i], dense[i].numel(), "dense");

  std::vector<int64_t> lengths(n);
  for (size_t i = 0; i < n; ++i) lengths[i] = indices[i].numel();
  const auto stream = current_stream();
  DeviceIndexFault* fault = fault_record();
  multi_tensor_launch<GatherMeta>(
      lengths, kChunk,
      [&](GatherMeta& meta, int slot, int64_t i) {
        meta.dense[slot] = dense[i].const_data_ptr();
        meta.idx[slot] = indices[i].const_data_ptr();
        meta.compact[slot] = compact[i].mutable_data_ptr<float>();
        meta.n[slot] = lengths[i];
        meta.limit[slot] = dense[i].numel();
        meta.list[slot] = static_cast<int32_t>(i);
        meta.idx64[slot] = indices[i].scalar_type() == at::kLong;
        meta.dtype[slot] = static_cast<uint8_t>(dtype_code(dense[i].scalar_type()));
      },
      [&](const GatherMeta& meta, int blocks) {
        gather_kernel<<<blocks, kThreads, 0, stream>>>(meta, fault);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CUDA, m) { m.impl("gather_accumulate_", &gather_accumulate_cuda); }

}  // namespace gather

}  // namespace cuda
}  // namespace nto
