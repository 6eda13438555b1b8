// select_topk on CPU: exact global top-k by |x| over a tensor list, by radix select on a
// 31-bit key of each element (the fp32 bit pattern of |x| plus one, NaN -> 0: monotone in
// |x| with NaN below every number). No sort and no copy of the values:
//   pass 1  histogram of key >> 16 (32768 bins)         -> the bucket of the k-th key
//   pass 2  histogram of key & 0xFFFF inside the bucket  -> the exact threshold key T
//   pass 3  per (tensor, chunk) item: how many keys > T and == T
//   pass 4  each item writes its positions straight into its tensor's output, at an offset
//           from the counts; keys == T are taken from the lowest concatenated positions.
// Histograms are integer counts (per thread, then summed), so results do not depend on
// the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../checks.h"
#include "vec_kernels.h"
#include "work_items.h"

namespace nto {
namespace {

constexpr int kHiBins = 1 << 15;  // key < 2^31: key >> 16 < 2^15
constexpr int kLoBins = 1 << 16;

constexpr int64_t kBlock = 2048;  // keys computed per step, kept in L1

// Calls f(keys, count, first position) for consecutive blocks of the work item's keys
// (computed by the per-capability vector loop).
template <typename F>
inline void for_key_blocks(const at::Tensor& t, int64_t begin, int64_t end, F&& f) {
  const auto& k = cpu_kernels();
  const FType ft = t.scalar_type() == at::kFloat      ? FType::F32
                   : t.scalar_type() == at::kBFloat16 ? FType::BF16
                                                      : FType::F16;
  const char* base = static_cast<const char*>(t.const_data_ptr());
  alignas(64) uint32_t keys[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    k.topk_keys(base + b * t.element_size(), ft, n, keys);
    f(keys, n, b);
  }
}

// A histogram of `bins` counts per thread, summed in thread order (integers: exact).
template <typename F>
std::vector<int64_t> histogram(const std::vector<WorkItem>& items, at::TensorList ts, int bins,
                               F&& bin_of) {
  const int nt = at::get_num_threads();
  std::vector<std::vector<int64_t>> per(nt);
  at::parallel_for(0, (int64_t)items.size(), 1, [&](int64_t lo, int64_t hi) {
    auto& h = per[at::get_thread_num()];
    if (h.empty()) h.assign(bins, 0);
    for (int64_t w = lo; w < hi; ++w) {
      const auto& it = items[w];
      for_key_blocks(ts[it.tensor], it.begin, it.end,
                     [&](const uint32_t* keys, int64_t cnt, int64_t) {
                       for (int64_t j = 0; j < cnt; ++j) {
                         const int b = bin_of(keys[j]);
                         if (b >= 0) ++h[b];
                       }
                     });
    }
  });
  std::vector<int64_t> out(bins, 0);
  for (const auto& h : per)
    if (!h.empty())
      for (int b = 0; b < bins; ++b) out[b] += h[b];
  return out;
}

// The highest bin where the running count from the top reaches `want`; `above` gets the
// count in the bins above it.
int top_bin(const std::vector<int64_t>& h, int64_t want, int64_t* above) {
  int64_t cum = 0;
  for (int b = (int)h.size() - 1; b >= 0; --b) {
    if (cum + h[b] >= want) {
      *above = cum;
      return b;
    }
    cum += h[b];
  }
  *above = cum;
  return 0;  // unreachable: want <= total (checked)
}

std::vector<at::Tensor> select_topk_cpu(at::TensorList ts, int64_t k) {
  check_topk_meta(ts, k);
  const size_t n = ts.size();
  std::vector<int64_t> sizes(n);
  std::vector<at::Tensor> out(n);
  for (size_t i = 0; i < n; ++i) sizes[i] = ts[i].numel();
  auto index_type = [](int64_t numel) { return numel > INT32_MAX ? at::kLong : at::kInt; };
  const auto opts = [&](size_t i) { return ts[i].options().dtype(index_type(sizes[i])); };
  if (k == 0) {
    for (size_t i = 0; i < n; ++i) out[i] = at::empty({0}, opts(i));
    return out;
  }
  const auto items = make_work_items(sizes);

  // Passes 1 and 2: the threshold key T and how many keys equal to T are taken.
  int64_t above_hi = 0, above_lo = 0;
  const auto h1 = histogram(items, ts, kHiBins, [](uint32_t key) { return (int)(key >> 16); });
  const uint32_t hi = (uint32_t)top_bin(h1, k, &above_hi);
  const auto h2 = histogram(items, ts, kLoBins, [hi](uint32_t key) {
    return (key >> 16) == hi ? (int)(key & 0xFFFFu) : -1;
  });
  const uint32_t lo = (uint32_t)top_bin(h2, k - above_hi, &above_lo);
  const uint32_t thr = (hi << 16) | lo;
  const int64_t take_ties = k - above_hi - above_lo;  // >= 1

  // Pass 3: per item counts of keys > T and == T; the ties go to the earliest items.
  const int64_t m = items.size();
  std::vector<int64_t> gt(m), eq(m);
  at::parallel_for(0, m, 1, [&](int64_t a, int64_t b) {
    for (int64_t w = a; w < b; ++w) {
      int64_t g = 0, e = 0;
      for_key_blocks(ts[items[w].tensor], items[w].begin, items[w].end,
                     [&](const uint32_t* keys, int64_t cnt, int64_t) {
                       uint32_t bg = 0, be = 0;  // vectorizable counts
                       for (int64_t j = 0; j < cnt; ++j) {
                         bg += keys[j] > thr;
                         be += keys[j] == thr;
                       }
                       g += bg, e += be;
                     });
      gt[w] = g, eq[w] = e;
    }
  });
  std::vector<int64_t> ties(m), offset(m);
  std::vector<int64_t> count(n, 0);
  int64_t ties_left = take_ties;
  for (int64_t w = 0; w < m; ++w) {  // concatenated order: lowest positions win ties
    ties[w] = std::min(eq[w], ties_left);
    ties_left -= ties[w];
    offset[w] = count[items[w].tensor];
    count[items[w].tensor] += gt[w] + ties[w];
  }
  for (size_t i = 0; i < n; ++i) out[i] = at::empty({count[i]}, opts(i));

  // Pass 4: each item writes its ascending positions at its offset.
  at::parallel_for(0, m, 1, [&](int64_t a, int64_t b) {
    for (int64_t w = a; w < b; ++w) {
      const auto& it = items[w];
      at::Tensor& o = out[it.tensor];
      int64_t at_ = offset[w], ties_w = ties[w];
      auto emit = [&](auto* dst) {
        using I = std::remove_pointer_t<decltype(dst)>;
        I buf[kBlock + 1];  // branchless compaction writes one slot past the last kept
        for_key_blocks(ts[it.tensor], it.begin, it.end,
                       [&](const uint32_t* keys, int64_t cnt, int64_t first) {
                         int64_t kept = 0;
                         for (int64_t j = 0; j < cnt; ++j) {
                           const uint32_t key = keys[j];
                           const int64_t tie = (key == thr) & (ties_w > 0);
                           buf[kept] = static_cast<I>(first + j);
                           kept += (key > thr) | tie;
                           ties_w -= tie;
                         }
                         std::memcpy(dst + at_, buf, kept * sizeof(I));
                         at_ += kept;
                       });
      };
      if (o.scalar_type() == at::kInt)
        emit(o.data_ptr<int32_t>());
      else
        emit(o.data_ptr<int64_t>());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nto, CPU, m) { m.impl("select_topk", &select_topk_cpu); }

}  // namespace nto
