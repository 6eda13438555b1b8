// Splits a tensor list into (tensor, chunk) work items so that at::parallel_for balances
// small and large tensors. Per-item partial results are combined in item order, so
// reductions do not depend on the thread count.
#pragma once
#include <cstdint>
#include <vector>

namespace nto {

constexpr int64_t kChunk = 1 << 16;  // elements per work item (256 KiB of fp32)

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<WorkItem> make_work_items(const std::vector<int64_t>& sizes,
                                             int64_t chunk = kChunk) {
  std::vector<WorkItem> items;
  for (int64_t t = 0; t < (int64_t)sizes.size(); ++t)
    for (int64_t b = 0; b < sizes[t]; b += chunk)
      items.push_back({t, b, std::min(sizes[t], b + chunk)});
  return items;
}

}  // namespace nto
