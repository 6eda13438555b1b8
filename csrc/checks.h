// Argument checks shared by every op and backend (CPU and CUDA). Each names the op, the
// list position and the rule, and runs before any memory is touched. The messages and
// the order of the checks are those of nto_ext/_reference.py (the executable spec):
// wrong dtypes raise TypeError, out-of-range indices IndexError, the rest ValueError.
// Checks of index *values* (sorted, unique, in range) read memory and live per backend
// (csrc/cpu/index_checks.h); everything here reads only metadata, but for a CPU step count's
// value (host_step). The overlap check (check_no_overlap) is the kernels' own: the reference
// updates entry after entry, where shared memory is harmless.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "adamw_math.h"

namespace nto {

// torch's Python spelling of a dtype, so messages read like the reference's.
inline std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kComplexHalf: return "torch.complex32";
    default: {  // c10's name lower-cased is Python's for the rest: UInt64 -> uint64
      std::string name = c10::toString(t);
      for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      return "torch." + name;
    }
  }
}

// Python's tuple(shape): "()", "(5,)", "(2, 3)".
inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t d = 0; d < s.size(); ++d) {
    if (d) out += ", ";
    out += std::to_string(s[d]);
  }
  if (s.size() == 1) out += ",";
  return out + ")";
}

inline std::string fmt_g(double x) {  // Python's f"{x:g}"
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%g", x);
  return buf;
}

constexpr const char* kFloats = "torch.float32, torch.bfloat16, torch.float16";
constexpr const char* kIndexTypes = "torch.int32, torch.int64";
// A step count's dtypes: those the kernels read (AT_DISPATCH_ALL_TYPES_AND2(Half, BFloat16)).
constexpr const char* kStepTypes =
    "torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, "
    "torch.int16, torch.int8, torch.uint8";
inline bool is_step_type(c10::ScalarType t) {
  switch (t) {
    case at::kDouble: case at::kFloat: case at::kBFloat16: case at::kHalf: case at::kLong:
    case at::kInt: case at::kShort: case at::kChar: case at::kByte: return true;
    default: return false;
  }
}

inline bool is_float_param(c10::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}
inline bool is_index_type(c10::ScalarType t) { return t == at::kInt || t == at::kLong; }

// dtype in `allowed`, strided, contiguous, on `dev` (when given) -- in that order.
inline void check_tensor(const char* op, const char* what, size_t i, const at::Tensor& t,
                         std::initializer_list<c10::ScalarType> dtypes, const char* allowed,
                         const c10::optional<at::Device>& dev) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", what, "[", i, "] is undefined; expected a Tensor");
  bool ok = false;
  for (auto d : dtypes) ok = ok || t.scalar_type() == d;
  TORCH_CHECK_TYPE(ok, op, ": ", what, "[", i, "] has dtype ", dtype_name(t.scalar_type()),
                   "; allowed: ", allowed);
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", what, "[", i,
                    "] is not a dense (strided) tensor");
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", what, "[", i,
                    "] is not contiguous; pass .contiguous() tensors");
  if (dev.has_value())
    TORCH_CHECK_VALUE(t.device() == *dev, op, ": ", what, "[", i, "] is on ", t.device(),
                      " but the first tensor is on ", *dev,
                      "; all tensors must share one device");
}

inline void check_float_list(const char* op, const char* what, at::TensorList ts) {
  c10::optional<at::Device> dev;
  if (!ts.empty() && ts[0].defined()) dev = ts[0].device();
  for (size_t i = 0; i < ts.size(); ++i)
    check_tensor(op, what, i, ts[i], {at::kFloat, at::kBFloat16, at::kHalf}, kFloats, dev);
}

// "got 3 params but 2 grads; every list needs one entry per param"
inline void check_same_length(const char* op, const char* first, size_t n, const char* name,
                              size_t len) {
  std::string one(first);
  if (!one.empty() && one.back() == 's') one.pop_back();
  TORCH_CHECK_VALUE(len == n, op, ": got ", n, " ", first, " but ", len, " ", name,
                    "; every list needs one entry per ", one);
}

inline void check_index_meta(const char* op, const char* what, size_t i, const at::Tensor& idx,
                             const c10::optional<at::Device>& dev) {
  check_tensor(op, what, i, idx, {at::kInt, at::kLong}, kIndexTypes, dev);
  TORCH_CHECK_VALUE(idx.dim() == 1, op, ": ", what, "[", i, "] has ", idx.dim(),
                    " dimensions; indices must be 1-D");
}

// ------------------------------------------------------------------ overlapping memory
//
// The kernels write params and state in parallel and read grads (and gather's dense) through
// __restrict__ pointers (on CUDA through the read-only, non-coherent cache), so a tensor an op
// writes must not share memory with any other argument: the same tensor twice in a list,
// exp_avgs[i] being exp_avg_sqs[i], a grad that is a view of its param. Refused on the host
// from the tensors' byte ranges (contiguous: checked before), O(n log n), no memory read.
// Two exceptions: read-only arguments may share memory (one dense gradient passed for several
// index lists), and so may params of *indexed* entries (the sparse policy passes one param
// once per cohort): each is written only at its own positions, which the caller keeps
// disjoint across entries (a contract: checking it would read every index).
enum class Access : uint8_t { kRead = 0, kWrite = 1, kScatter = 2 };  // kScatter: see above

struct Region {
  uintptr_t begin, end;  // bytes [begin, end)
  const char* what;      // "exp_avgs"
  uint32_t i;            // list position
  uint32_t order;        // position in argument order (errors name the first clash in it)
  Access access;
};

inline void add_region(std::vector<Region>& rs, const at::Tensor& t, const char* what, size_t i,
                       Access access) {
  if (t.numel() == 0) return;
  const auto b = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  rs.push_back({b, b + static_cast<uintptr_t>(t.numel()) * t.element_size(), what,
                static_cast<uint32_t>(i), static_cast<uint32_t>(rs.size()), access});
}

inline bool may_not_share(Access a, Access b) {
  return !(a == b && (a == Access::kRead || a == Access::kScatter));
}

inline bool clash(const Region& a, const Region& b) {
  return may_not_share(a.access, b.access) && a.begin < b.end && b.begin < a.end;
}

// Names the first clashing pair in argument order: the error path only (quadratic).
[[noreturn]] inline void raise_overlap(const char* op, std::vector<Region> rs) {
  std::sort(rs.begin(), rs.end(),
            [](const Region& a, const Region& b) { return a.order < b.order; });
  for (size_t b = 1; b < rs.size(); ++b)
    for (size_t a = 0; a < b; ++a) {
      if (!clash(rs[a], rs[b])) continue;
      const Region &x = rs[a], &y = rs[b];
      const bool written = x.access != Access::kRead && y.access != Access::kRead;
      TORCH_CHECK_VALUE(false, op, ": ", x.what, "[", x.i, "] and ", y.what, "[", y.i,
                        "] share memory; ",
                        written ? "tensors the op writes"
                                : "a tensor the op writes and one it reads",
                        " must not overlap (the kernel updates them in parallel); pass separate "
                        "tensors (e.g. .clone() one of them)");
    }
  TORCH_CHECK(false, op, ": internal error: overlapping arguments found but not named");
  __builtin_unreachable();
}

// Refuses a clash among `rs` (in argument order; sorted by address here, in place).
inline void check_no_overlap(const char* op, std::vector<Region>& rs) {
  std::sort(rs.begin(), rs.end(),
            [](const Region& a, const Region& b) { return a.begin < b.begin; });
  // Sweep by start: an earlier region overlaps r iff it ends past r's start, and whether the
  // overlap is allowed depends only on the two access kinds; so the earlier region of each
  // kind that ends furthest is the only one to compare with.
  const Region* furthest[3] = {nullptr, nullptr, nullptr};
  for (const Region& r : rs) {
    for (const Region* f : furthest)
      if (f != nullptr && clash(*f, r)) raise_overlap(op, rs);
    const Region*& f = furthest[static_cast<int>(r.access)];
    if (f == nullptr || r.end > f->end) f = &r;
  }
}

// A CPU step count's value (one read of host memory, no dispatch: the hot path calls this
// once per tensor and call).
inline double host_step(const at::Tensor& step) {
  const void* p = step.const_data_ptr();
  switch (step.scalar_type()) {
    case at::kDouble: return *static_cast<const double*>(p);
    case at::kFloat: return *static_cast<const float*>(p);
    case at::kBFloat16: return static_cast<float>(*static_cast<const c10::BFloat16*>(p));
    case at::kHalf: return static_cast<float>(*static_cast<const c10::Half*>(p));
    case at::kLong: return static_cast<double>(*static_cast<const int64_t*>(p));
    case at::kInt: return *static_cast<const int32_t*>(p);
    case at::kShort: return *static_cast<const int16_t*>(p);
    case at::kChar: return *static_cast<const int8_t*>(p);
    default: return *static_cast<const uint8_t*>(p);  // kByte: is_step_type was checked
  }
}

// _reference._check_steps_values: the value of CPU step i, refused below 1 (and NaN).
inline double checked_host_step(const char* op, size_t i, const at::Tensor& step) {
  const double s = host_step(step);
  TORCH_CHECK_VALUE(s >= 1.0, op, ": steps[", i, "] holds a step count of ", fmt_g(s),
                    "; step counts start at 1 (the count after incrementing)");
  return s;
}

// The AdamW scalars of every tensor from its step count (checked: >= 1), all read before
// any write, in the reference's order. A count on the device is read with item() (a sync:
// the 8-bit and bf16 ops take their counts from the host, where NTO keeps them).
inline std::vector<AdamWScalars> per_tensor_scalars(const char* op, at::TensorList steps,
                                                    double lr, double beta1, double beta2,
                                                    double eps, double weight_decay) {
  std::vector<AdamWScalars> scal(steps.size(),
                                 adamw_scalars(lr, beta1, beta2, eps, weight_decay));
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& t = steps[i];
    const double step = t.is_cpu() ? checked_host_step(op, i, t)
                                   : checked_host_step(op, i, t.to(at::kCPU));
    adamw_step_scalars(lr, beta1, beta2, step, &scal[i].neg_step_size, &scal[i].bc2_sqrt);
    scal[i].inv_bc2_sqrt = adamw_inv_bc2_sqrt(beta2, step);
  }
  return scal;
}

// ------------------------------------------------------------------- masked_adamw_

inline void check_adamw_hyper(double lr, double beta1, double beta2, double eps, double wd,
                              const char* op = "masked_adamw_") {
  auto rule = [&](const char* name, double v, bool ok, const char* r) {
    TORCH_CHECK_VALUE(ok, op, ": ", name, "=", v, " is not allowed; ", name, " must be ", r);
  };
  rule("lr", lr, lr >= 0.0, ">= 0");  // NaN fails every comparison, so it is refused too
  rule("beta1", beta1, beta1 >= 0.0 && beta1 < 1.0, "in [0, 1)");
  rule("beta2", beta2, beta2 >= 0.0 && beta2 < 1.0, "in [0, 1)");
  rule("eps", eps, eps >= 0.0, ">= 0");
  rule("weight_decay", wd, wd >= 0.0, ">= 0");
}

inline void check_step_meta(const char* op, size_t i, const at::Tensor& step,
                            const at::Device& dev);

// params[i] and grads[i] of both AdamW ops: float tensors on `dev`; the grad in the
// param's dtype or fp32, or (masked_adamw_ only: `fp32_takes_low`) any float dtype for an
// fp32 param -- a bf16 model's fp32 master updated from the model's gradient.
inline void check_param_grad(const char* op, size_t i, const at::Tensor& p, const at::Tensor& g,
                             const at::Device& dev, bool fp32_takes_low = false) {
  check_tensor(op, "params", i, p, {at::kFloat, at::kBFloat16, at::kHalf}, kFloats, dev);
  check_tensor(op, "grads", i, g, {at::kFloat, at::kBFloat16, at::kHalf}, kFloats, dev);
  TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type() || g.scalar_type() == at::kFloat ||
                       (fp32_takes_low && p.scalar_type() == at::kFloat),
                   op, ": grads[", i, "] has dtype ", dtype_name(g.scalar_type()), " but params[",
                   i, "] has ", dtype_name(p.scalar_type()), "; allowed: ",
                   dtype_name(p.scalar_type()),
                   p.scalar_type() == at::kFloat ? "" : " or torch.float32");
}

// Metadata of entry i (no tensor contents): dtypes, layouts, devices and lengths.
inline void check_adamw_entry(size_t i, const at::Tensor& p, const at::Tensor& g,
                              const at::Tensor& m, const at::Tensor& v,
                              const c10::optional<at::Tensor>& idx, const at::Tensor& step,
                              const at::Device& dev) {
  const char* op = "masked_adamw_";
  check_param_grad(op, i, p, g, dev, /*fp32_takes_low=*/true);
  check_tensor(op, "exp_avgs", i, m, {at::kFloat, at::kBFloat16},
               "torch.float32 or torch.bfloat16", dev);
  check_tensor(op, "exp_avg_sqs", i, v, {at::kFloat, at::kBFloat16},
               "torch.float32 or torch.bfloat16", dev);
  TORCH_CHECK_TYPE(m.scalar_type() == v.scalar_type(), op, ": exp_avgs[", i, "] has dtype ",
                   dtype_name(m.scalar_type()), " but exp_avg_sqs[", i, "] has ",
                   dtype_name(v.scalar_type()), "; allowed: both moments of one dtype");
  const bool indexed = idx.has_value() && idx->defined();
  if (indexed) check_index_meta(op, "indices", i, *idx, dev);
  const int64_t length = indexed ? idx->numel() : p.numel();
  auto where = [&] {  // built only when a check fails (TORCH_CHECK's message is lazy)
    return indexed ? "len(indices[" + std::to_string(i) + "])"
                   : "params[" + std::to_string(i) + "].numel()";
  };
  const std::pair<const char*, const at::Tensor*> states[] = {{"exp_avgs", &m},
                                                              {"exp_avg_sqs", &v}};
  for (const auto& [name, t] : states)
    TORCH_CHECK_VALUE(t->numel() == length, op, ": ", name, "[", i, "] has ", t->numel(),
                      " elements but ", where(), " is ", length,
                      "; state must have one element per updated position");
  TORCH_CHECK_VALUE(g.numel() == length || g.numel() == p.numel(), op, ": grads[", i, "] has ",
                    g.numel(), " elements; allowed: ", length, " (compact) or ", p.numel(),
                    " (dense, like params[", i, "])");
  check_step_meta(op, i, step, dev);
}

// steps[i]: one count per tensor, of a readable dtype, on the cpu or the params' device.
inline void check_step_meta(const char* op, size_t i, const at::Tensor& step,
                            const at::Device& dev) {
  TORCH_CHECK_VALUE(step.defined(), op, ": steps[", i, "] is undefined; expected a Tensor");
  TORCH_CHECK_VALUE(step.numel() == 1, op, ": steps[", i, "] has ", step.numel(),
                    " elements; allowed: one step count per tensor (a 1-element tensor or a "
                    "number)");
  TORCH_CHECK_TYPE(is_step_type(step.scalar_type()), op, ": steps[", i, "] has dtype ",
                   dtype_name(step.scalar_type()), "; allowed: ", kStepTypes,
                   " (or a number); convert it with .to(torch.float64)");
  TORCH_CHECK_VALUE(step.device() == dev || step.device().is_cpu(), op, ": steps[", i,
                    "] is on ", step.device(), "; a 1-element step must be on the cpu or on ",
                    dev);
}

inline void check_adamw_meta(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs,
                             const c10::List<c10::optional<at::Tensor>>& indices,
                             at::TensorList steps, double lr, double beta1, double beta2,
                             double eps, double wd) {
  const char* op = "masked_adamw_";
  check_adamw_hyper(lr, beta1, beta2, eps, wd);
  const size_t n = params.size();
  check_same_length(op, "params", n, "grads", grads.size());
  check_same_length(op, "params", n, "exp_avgs", exp_avgs.size());
  check_same_length(op, "params", n, "exp_avg_sqs", exp_avg_sqs.size());
  check_same_length(op, "params", n, "indices", indices.size());
  check_same_length(op, "params", n, "steps", steps.size());
  if (n == 0) return;
  const at::Device dev = params[0].device();
  for (size_t i = 0; i < n; ++i)
    check_adamw_entry(i, params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], indices.get(i),
                      steps[i], dev);
  std::vector<Region> rs;
  rs.reserve(6 * n);
  for (size_t i = 0; i < n; ++i) {
    const c10::optional<at::Tensor> idx = indices.get(i);
    const bool indexed = idx.has_value() && idx->defined();
    add_region(rs, params[i], "params", i, indexed ? Access::kScatter : Access::kWrite);
    add_region(rs, grads[i], "grads", i, Access::kRead);
    add_region(rs, exp_avgs[i], "exp_avgs", i, Access::kWrite);
    add_region(rs, exp_avg_sqs[i], "exp_avg_sqs", i, Access::kWrite);
    if (indexed) add_region(rs, *idx, "indices", i, Access::kRead);
    // a step on the device is read by the kernel; a CPU one on the host before any write
    if (!dev.is_cpu() && steps[i].device() == dev)
      add_region(rs, steps[i], "steps", i, Access::kRead);
  }
  check_no_overlap(op, rs);
}

// -------------------------------------------------------------- masked_adamw_int8_

inline void check_adamw_int8_entry(size_t i, const at::Tensor& p, const at::Tensor& g,
                                   const at::Tensor& m, const at::Tensor& v,
                                   const at::Tensor& sm, const at::Tensor& sv,
                                   const c10::optional<at::Tensor>& idx, const at::Tensor& step,
                                   const at::Device& dev) {
  const char* op = "masked_adamw_int8_";
  check_param_grad(op, i, p, g, dev);
  check_tensor(op, "exp_avgs", i, m, {at::kChar}, "torch.int8", dev);
  check_tensor(op, "exp_avg_sqs", i, v, {at::kByte}, "torch.uint8", dev);
  check_tensor(op, "exp_avg_scales", i, sm, {at::kFloat}, "torch.float32", dev);
  check_tensor(op, "exp_avg_sq_scales", i, sv, {at::kFloat}, "torch.float32", dev);
  const bool indexed = idx.has_value() && idx->defined();
  if (indexed) check_index_meta(op, "indices", i, *idx, dev);
  const int64_t n = indexed ? idx->numel() : p.numel(), nb = (n + kQ8Block - 1) / kQ8Block;
  const std::pair<const char*, std::pair<const at::Tensor*, int64_t>> sizes[] = {
      {"grads", {&g, n}}, {"exp_avgs", {&m, n}}, {"exp_avg_sqs", {&v, n}},
      {"exp_avg_scales", {&sm, nb}}, {"exp_avg_sq_scales", {&sv, nb}}};
  for (const auto& [name, tw] : sizes)
    TORCH_CHECK_VALUE(tw.first->numel() == tw.second, op, ": ", name, "[", i, "] has ",
                      tw.first->numel(), " elements; allowed: ", tw.second, " (",
                      indexed ? "indices[" : "params[", i, indexed ? "] holds " : "] has ", n,
                      " elements, ", nb, " blocks of ", kQ8Block, ")");
  check_step_meta(op, i, step, dev);
}

inline void check_adamw_int8_meta(at::TensorList params, at::TensorList grads,
                                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                  at::TensorList exp_avg_scales,
                                  at::TensorList exp_avg_sq_scales,
                                  const c10::List<c10::optional<at::Tensor>>& indices,
                                  at::TensorList steps, double lr, double beta1, double beta2,
                                  double eps, double wd) {
  const char* op = "masked_adamw_int8_";
  check_adamw_hyper(lr, beta1, beta2, eps, wd, op);
  const size_t n = params.size();
  check_same_length(op, "params", n, "grads", grads.size());
  check_same_length(op, "params", n, "exp_avgs", exp_avgs.size());
  check_same_length(op, "params", n, "exp_avg_sqs", exp_avg_sqs.size());
  check_same_length(op, "params", n, "exp_avg_scales", exp_avg_scales.size());
  check_same_length(op, "params", n, "exp_avg_sq_scales", exp_avg_sq_scales.size());
  check_same_length(op, "params", n, "indices", indices.size());
  check_same_length(op, "params", n, "steps", steps.size());
  if (n == 0) return;
  const at::Device dev = params[0].device();
  for (size_t i = 0; i < n; ++i)
    check_adamw_int8_entry(i, params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                           exp_avg_scales[i], exp_avg_sq_scales[i], indices.get(i), steps[i],
                           dev);
  std::vector<Region> rs;
  rs.reserve(8 * n);
  for (size_t i = 0; i < n; ++i) {
    const c10::optional<at::Tensor> idx = indices.get(i);
    const bool indexed = idx.has_value() && idx->defined();
    add_region(rs, params[i], "params", i, indexed ? Access::kScatter : Access::kWrite);
    add_region(rs, grads[i], "grads", i, Access::kRead);
    add_region(rs, exp_avgs[i], "exp_avgs", i, Access::kWrite);
    add_region(rs, exp_avg_sqs[i], "exp_avg_sqs", i, Access::kWrite);
    add_region(rs, exp_avg_scales[i], "exp_avg_scales", i, Access::kWrite);
    add_region(rs, exp_avg_sq_scales[i], "exp_avg_sq_scales", i, Access::kWrite);
    if (indexed) add_region(rs, *idx, "indices", i, Access::kRead);
    if (!dev.is_cpu() && steps[i].device() == dev)
      add_region(rs, steps[i], "steps", i, Access::kRead);
  }
  check_no_overlap(op, rs);
}

// -------------------------------------------------------------- masked_adamw_int4_
// _reference.check_masked_adamw_int4, in its order and words; then the overlap check.

inline void check_adamw_int4_entry(size_t i, const at::Tensor& p, const at::Tensor& g,
                                   const at::Tensor& c, const at::Tensor& sm,
                                   const at::Tensor& sw, const at::Tensor& step,
                                   const at::Device& dev) {
  const char* op = "masked_adamw_int4_";
  check_param_grad(op, i, p, g, dev);
  check_tensor(op, "codes", i, c, {at::kByte}, "torch.uint8", dev);
  check_tensor(op, "exp_avg_scales", i, sm, {at::kFloat}, "torch.float32", dev);
  check_tensor(op, "exp_avg_sq_scales", i, sw, {at::kFloat}, "torch.float32", dev);
  const int64_t n = p.numel(), nb = (n + kQ4Block - 1) / kQ4Block;
  const std::pair<const char*, std::pair<const at::Tensor*, int64_t>> sizes[] = {
      {"grads", {&g, n}}, {"codes", {&c, n}}, {"exp_avg_scales", {&sm, nb}},
      {"exp_avg_sq_scales", {&sw, nb}}};
  for (const auto& [name, tw] : sizes)
    TORCH_CHECK_VALUE(tw.first->numel() == tw.second, op, ": ", name, "[", i, "] has ",
                      tw.first->numel(), " elements; allowed: ", tw.second, " (params[", i,
                      "] has ", n, " elements, ", nb, " blocks of ", kQ4Block, ")");
  check_step_meta(op, i, step, dev);
}

inline void check_adamw_int4_meta(at::TensorList params, at::TensorList grads,
                                  at::TensorList codes, at::TensorList exp_avg_scales,
                                  at::TensorList exp_avg_sq_scales, at::TensorList steps,
                                  double lr, double beta1, double beta2, double eps, double wd) {
  const char* op = "masked_adamw_int4_";
  check_adamw_hyper(lr, beta1, beta2, eps, wd, op);
  const size_t n = params.size();
  check_same_length(op, "params", n, "grads", grads.size());
  check_same_length(op, "params", n, "codes", codes.size());
  check_same_length(op, "params", n, "exp_avg_scales", exp_avg_scales.size());
  check_same_length(op, "params", n, "exp_avg_sq_scales", exp_avg_sq_scales.size());
  check_same_length(op, "params", n, "steps", steps.size());
  if (n == 0) return;
  const at::Device dev = params[0].device();
  for (size_t i = 0; i < n; ++i)
    check_adamw_int4_entry(i, params[i], grads[i], codes[i], exp_avg_scales[i],
                           exp_avg_sq_scales[i], steps[i], dev);
  std::vector<Region> rs;
  rs.reserve(6 * n);
  for (size_t i = 0; i < n; ++i) {
    add_region(rs, params[i], "params", i, Access::kWrite);
    add_region(rs, grads[i], "grads", i, Access::kRead);
    add_region(rs, codes[i], "codes", i, Access::kWrite);
    add_region(rs, exp_avg_scales[i], "exp_avg_scales", i, Access::kWrite);
    add_region(rs, exp_avg_sq_scales[i], "exp_avg_sq_scales", i, Access::kWrite);
    if (!dev.is_cpu() && steps[i].device() == dev)
      add_region(rs, steps[i], "steps", i, Access::kRead);
  }
  check_no_overlap(op, rs);
}

// -------------------------------------------------------------- masked_adamw_lowp_
// _reference.check_masked_adamw_lowp, in its order and words; then the overlap check.

inline void check_adamw_lowp_entry(size_t i, const at::Tensor& p, const at::Tensor& g,
                                   const at::Tensor& m, const at::Tensor& v,
                                   const at::Tensor* master, const at::Tensor& step,
                                   const at::Device& dev) {
  const char* op = "masked_adamw_lowp_";
  const char* lowp = "torch.bfloat16, torch.float16";
  check_tensor(op, "params", i, p, {at::kBFloat16, at::kHalf}, lowp, dev);
  check_tensor(op, "grads", i, g, {at::kBFloat16, at::kHalf}, lowp, dev);
  TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), op, ": grads[", i, "] has dtype ",
                   dtype_name(g.scalar_type()), " but params[", i, "] has ",
                   dtype_name(p.scalar_type()), "; allowed: ", dtype_name(p.scalar_type()));
  check_tensor(op, "exp_avgs", i, m, {at::kFloat}, "torch.float32", dev);
  check_tensor(op, "exp_avg_sqs", i, v, {at::kFloat}, "torch.float32", dev);
  if (master != nullptr) check_tensor(op, "masters", i, *master, {at::kFloat}, "torch.float32", dev);
  const int64_t n = p.numel();
  const std::pair<const char*, const at::Tensor*> sizes[] = {
      {"grads", &g}, {"exp_avgs", &m}, {"exp_avg_sqs", &v}, {"masters", master}};
  for (const auto& [name, t] : sizes)
    TORCH_CHECK_VALUE(t == nullptr || t->numel() == n, op, ": ", name, "[", i, "] has ",
                      t->numel(), " elements; allowed: ", n, " (params[", i, "] has ", n, ")");
  check_step_meta(op, i, step, dev);
}

inline void check_adamw_lowp_meta(at::TensorList params, at::TensorList grads,
                                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                  at::TensorList masters, at::TensorList steps,
                                  size_t n_stochastic, size_t n_keys, double lr, double beta1,
                                  double beta2, double eps, double wd) {
  const char* op = "masked_adamw_lowp_";
  check_adamw_hyper(lr, beta1, beta2, eps, wd, op);
  const size_t n = params.size();
  check_same_length(op, "params", n, "grads", grads.size());
  check_same_length(op, "params", n, "exp_avgs", exp_avgs.size());
  check_same_length(op, "params", n, "exp_avg_sqs", exp_avg_sqs.size());
  check_same_length(op, "params", n, "steps", steps.size());
  check_same_length(op, "params", n, "stochastic", n_stochastic);
  check_same_length(op, "params", n, "keys", n_keys);
  TORCH_CHECK_VALUE(masters.empty() || masters.size() == n, op, ": got ", n, " params but ",
                    masters.size(), " masters; allowed: one master per param, or none "
                    "(stochastic rounding of the param)");
  if (n == 0) return;
  const at::Device dev = params[0].device();
  for (size_t i = 0; i < n; ++i)
    check_adamw_lowp_entry(i, params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
                           masters.empty() ? nullptr : &masters[i], steps[i], dev);
  std::vector<Region> rs;
  rs.reserve(6 * n);
  for (size_t i = 0; i < n; ++i) {
    add_region(rs, params[i], "params", i, Access::kWrite);
    add_region(rs, grads[i], "grads", i, Access::kRead);
    add_region(rs, exp_avgs[i], "exp_avgs", i, Access::kWrite);
    add_region(rs, exp_avg_sqs[i], "exp_avg_sqs", i, Access::kWrite);
    if (!masters.empty()) add_region(rs, masters[i], "masters", i, Access::kWrite);
    if (!dev.is_cpu() && steps[i].device() == dev)
      add_region(rs, steps[i], "steps", i, Access::kRead);
  }
  check_no_overlap(op, rs);
}

// -------------------------------------------------------------- adamw_first_step_
// _reference.check_adamw_first_step, in its order and words; then the overlap check.

inline void check_adamw_first_meta(at::TensorList params, at::TensorList grads, double lr,
                                   double beta1, double beta2, double eps, double wd) {
  const char* op = "adamw_first_step_";
  check_adamw_hyper(lr, beta1, beta2, eps, wd, op);
  const size_t n = params.size();
  check_same_length(op, "params", n, "grads", grads.size());
  if (n == 0) return;
  const at::Device dev = params[0].device();
  for (size_t i = 0; i < n; ++i) {
    check_param_grad(op, i, params[i], grads[i], dev);
    TORCH_CHECK_VALUE(grads[i].numel() == params[i].numel(), op, ": grads[", i, "] has ",
                      grads[i].numel(), " elements; allowed: ", params[i].numel(), " (params[",
                      i, "] has ", params[i].numel(), ")");
  }
  std::vector<Region> rs;
  rs.reserve(2 * n);
  for (size_t i = 0; i < n; ++i) {
    add_region(rs, params[i], "params", i, Access::kWrite);
    add_region(rs, grads[i], "grads", i, Access::kRead);
  }
  check_no_overlap(op, rs);
}

// ------------------------------------------------------------------------ select_topk

inline void check_topk_meta(at::TensorList ts, int64_t k) {
  check_float_list("select_topk", "tensors", ts);
  int64_t total = 0;
  for (const auto& t : ts) total += t.numel();
  TORCH_CHECK_VALUE(k >= 0 && k <= total, "select_topk: k=", k, " is out of range; allowed: 0..",
                    total, " (the number of elements in all ", ts.size(), " tensors)");
}

// ------------------------------------------------------------------------ remap_state

inline void check_remap_meta(at::TensorList old_idx, at::TensorList new_idx,
                             at::TensorList states) {
  const char* op = "remap_state";
  const size_t n = states.size();
  check_same_length(op, "states", n, "old_indices", old_idx.size());
  check_same_length(op, "states", n, "new_indices", new_idx.size());
  if (n == 0) return;
  c10::optional<at::Device> dev;
  if (states[0].defined()) dev = states[0].device();
  for (size_t i = 0; i < n; ++i) {
    check_index_meta(op, "old_indices", i, old_idx[i], dev);
    check_index_meta(op, "new_indices", i, new_idx[i], dev);
    check_tensor(op, "states", i, states[i], {at::kFloat, at::kBFloat16, at::kHalf}, kFloats,
                 dev);
    const auto& s = states[i];
    const bool ok = s.dim() > 0 && s.size(-1) == old_idx[i].numel();
    TORCH_CHECK_VALUE(ok, op, ": states[", i, "] has shape ", shape_str(s.sizes()),
                      "; its last dimension (",
                      s.dim() ? std::to_string(s.size(-1)) : std::string("no dimension"),
                      ") must equal len(old_indices[", i, "]) = ", old_idx[i].numel());
  }
}

// ------------------------------------------------------------------ gather_accumulate_

inline void check_gather_meta(at::TensorList dense, at::TensorList indices,
                              at::TensorList compact) {
  const char* op = "gather_accumulate_";
  const size_t n = dense.size();
  check_same_length(op, "dense", n, "indices", indices.size());
  check_same_length(op, "dense", n, "compact", compact.size());
  if (n == 0) return;
  c10::optional<at::Device> dev;
  if (dense[0].defined()) dev = dense[0].device();
  for (size_t i = 0; i < n; ++i) {
    check_tensor(op, "dense", i, dense[i], {at::kFloat, at::kBFloat16, at::kHalf}, kFloats, dev);
    check_index_meta(op, "indices", i, indices[i], dev);
    check_tensor(op, "compact", i, compact[i], {at::kFloat}, "torch.float32", dev);
    TORCH_CHECK_VALUE(compact[i].numel() == indices[i].numel(), op, ": compact[", i, "] has ",
                      compact[i].numel(), " elements but len(indices[", i, "]) is ",
                      indices[i].numel(), "; they must match");
  }
  std::vector<Region> rs;
  rs.reserve(3 * n);
  for (size_t i = 0; i < n; ++i) {
    add_region(rs, dense[i], "dense", i, Access::kRead);
    add_region(rs, indices[i], "indices", i, Access::kRead);
    add_region(rs, compact[i], "compact", i, Access::kWrite);
  }
  check_no_overlap(op, rs);
}

}  // namespace nto
