"""The CUDA kernels' own code, run on the CPU by a small emulator of CUDA's execution model.

No GPU is needed: the csrc/cuda/*.cu sources are copied, their `kernel<<<grid, block>>>(...)`
launches rewritten into calls of an emulator, and the copies compiled by the host compiler
against stub c10/cuda headers. The emulator runs every block's threads as fibers on one OS
thread, in a seeded shuffled order (deterministic, yet a race between threads' writes
changes the result), with real __syncthreads barriers, warp shuffles / match / vote,
atomics and `__shared__` memory. The host side of each op (checks, index cache, grouping,
multi-tensor launch tables, workspaces) is the real code, on CPU tensors.

What this verifies: the kernels' indexing, chunking, vector/tail paths, block scans, radix
select and compaction, merges and the multi-tensor launcher, against the reference and the
CPU kernels. What it does not: GPU memory-model effects, real warp scheduling, nvcc's device
code generation (bench/cuda_syntax_check.sh checks that it compiles), 1-element steps held on
a device (the emulator's tensors are all on the CPU), and speed. Marked slow: building the
emulated module takes about a minute.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from test_cuda import first_values

from nto_ext import _reference, ops

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FLOATS = (torch.float32, torch.bfloat16, torch.float16)

# ------------------------------------------------------------------- the emulator

CUDA_RUNTIME_H = r"""
#pragma once
// Emulated CUDA runtime: each block's threads run as ucontext fibers on the calling thread.
#include <ucontext.h>
#include <math.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
typedef void* cudaStream_t;
typedef int cudaError_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = 2; return 0; }

namespace emu {
struct Dim { unsigned x = 0, y = 0, z = 0; };
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  int wait = 0;  // 0 runnable, 1 block barrier, 2 warp barrier
  uint64_t gen = 0;
};
struct Sched {
  ucontext_t main;
  std::vector<Fiber> fibers;
  unsigned cur = 0, threads = 0;
  int live = 0, arrived = 0;
  uint64_t gen = 0;
  std::vector<int> warp_live, warp_arrived;
  std::vector<uint64_t> warp_gen, slot;
  std::vector<int> flag;
  std::function<void()> body;
};
inline Sched* S = nullptr;
inline Dim tid, bid, bdim;

inline void release_if_all_arrived(unsigned w) {
  Sched& s = *S;
  if (s.arrived > 0 && s.arrived == s.live) { s.arrived = 0; ++s.gen; }
  if (s.warp_arrived[w] > 0 && s.warp_arrived[w] == s.warp_live[w]) {
    s.warp_arrived[w] = 0;
    ++s.warp_gen[w];
  }
}
inline void yield(int kind, uint64_t gen) {
  Fiber& f = S->fibers[S->cur];
  f.wait = kind;
  f.gen = gen;
  swapcontext(&f.ctx, &S->main);
  f.wait = 0;
  tid.x = S->cur;
}
inline void block_barrier() {
  Sched& s = *S;
  const uint64_t g = s.gen;
  if (++s.arrived == s.live) { s.arrived = 0; ++s.gen; return; }
  yield(1, g);
}
inline void warp_barrier() {
  Sched& s = *S;
  const unsigned w = S->cur / 32;
  const uint64_t g = s.warp_gen[w];
  if (++s.warp_arrived[w] == s.warp_live[w]) { s.warp_arrived[w] = 0; ++s.warp_gen[w]; return; }
  yield(2, g);
}
inline void fiber_main() {
  S->body();
  Sched& s = *S;
  const unsigned w = s.cur / 32;
  s.fibers[s.cur].done = true;
  --s.live;
  --s.warp_live[w];
  release_if_all_arrived(w);
}

inline uint64_t rng = 0x9E3779B97F4A7C15ull;
inline void shuffle(std::vector<unsigned>& v) {
  for (size_t i = v.size(); i > 1; --i) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    std::swap(v[i - 1], v[rng % i]);
  }
}

inline long long launches = 0;  // kernel launches so far (tests count the index checks)
inline bool capturing = false;  // what cudaStreamIsCapturing reports (tests set it)

struct Launch {
  unsigned blocks, threads;
  template <class F, class... A>
  void operator()(F f, A... args) const {
    ++launches;
    Sched s;
    s.threads = threads;
    s.fibers.resize(threads);
    for (auto& fb : s.fibers) fb.stack.resize(1 << 17);
    S = &s;
    // Blocks and fibers run in a shuffled (seeded) order, so a kernel whose result depends on
    // the order of its threads' writes (a race) gives a different, wrong answer.
    std::vector<unsigned> border(blocks), torder(threads);
    for (unsigned b = 0; b < blocks; ++b) border[b] = b;
    for (unsigned t = 0; t < threads; ++t) torder[t] = t;
    shuffle(border);
    for (unsigned b : border) {
      s.live = threads;
      s.arrived = 0;
      s.warp_live.assign(threads / 32, 32);
      s.warp_arrived.assign(threads / 32, 0);
      s.warp_gen.assign(threads / 32, 0);
      s.slot.assign(threads, 0);
      s.flag.assign(threads, 0);
      bid.x = b;
      bdim.x = threads;
      s.body = [&] { f(args...); };
      for (unsigned t = 0; t < threads; ++t) {
        Fiber& fb = s.fibers[t];
        fb.done = false;
        fb.wait = 0;
        getcontext(&fb.ctx);
        fb.ctx.uc_stack.ss_sp = fb.stack.data();
        fb.ctx.uc_stack.ss_size = fb.stack.size();
        fb.ctx.uc_link = &s.main;
        makecontext(&fb.ctx, fiber_main, 0);
      }
      while (s.live > 0) {
        bool ran = false;
        shuffle(torder);
        for (unsigned t : torder) {
          Fiber& fb = s.fibers[t];
          if (fb.done) continue;
          const bool ready = fb.wait == 0 || (fb.wait == 1 && s.gen != fb.gen) ||
                             (fb.wait == 2 && s.warp_gen[t / 32] != fb.gen);
          if (!ready) continue;
          s.cur = t;
          tid.x = t;
          swapcontext(&s.main, &fb.ctx);
          ran = true;
        }
        if (!ran) { std::fprintf(stderr, "emu: deadlock in block %u\n", b); std::abort(); }
      }
    }
    S = nullptr;
  }
};
inline Launch launch(long long blocks, long long threads, int, cudaStream_t) {
  return {static_cast<unsigned>(blocks), static_cast<unsigned>(threads)};
}

template <class T>
T shfl(T v, int src_lane, bool ok) {
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  S->slot[S->cur] = bits;
  warp_barrier();
  T r = v;
  const unsigned base = S->cur & ~31u;
  if (ok) std::memcpy(&r, &S->slot[base + src_lane], sizeof(T));
  warp_barrier();
  return r;
}
}  // namespace emu

#define threadIdx ::emu::tid
#define blockIdx ::emu::bid
#define blockDim ::emu::bdim

inline void __syncthreads() { ::emu::block_barrier(); }
inline int __syncthreads_or(int p) {
  auto& s = *::emu::S;
  s.flag[s.cur] = p;
  ::emu::block_barrier();
  int r = 0;
  for (unsigned t = 0; t < s.threads; ++t) r |= s.flag[t] != 0;
  ::emu::block_barrier();
  return r;
}
template <class T>
T __shfl_down_sync(unsigned, T v, int d) {
  const int lane = ::emu::S->cur & 31;
  return ::emu::shfl(v, lane + d, lane + d < 32);
}
template <class T>
T __shfl_up_sync(unsigned, T v, int d) {
  const int lane = ::emu::S->cur & 31;
  return ::emu::shfl(v, lane - d, lane - d >= 0);
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int d) {
  const int lane = ::emu::S->cur & 31;
  return ::emu::shfl(v, lane ^ d, (lane ^ d) < 32);
}
inline unsigned __match_any_sync(unsigned, unsigned v) {
  auto& s = *::emu::S;
  s.slot[s.cur] = v;
  ::emu::warp_barrier();
  const unsigned base = s.cur & ~31u;
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) m |= (s.slot[base + l] == v ? 1u : 0u) << l;
  ::emu::warp_barrier();
  return m;
}
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned o = *p; *p += v; return o; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  unsigned long long o = *p; *p += v; return o;
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp,
                                    unsigned long long v) {
  unsigned long long o = *p; if (o == cmp) *p = v; return o;
}
inline void __threadfence_system() {}
enum { cudaHostAllocPortable = 1, cudaHostAllocMapped = 2 };
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return 0; }
inline cudaError_t cudaHostAlloc(void** p, size_t n, unsigned) { *p = std::malloc(n); return 0; }
inline cudaError_t cudaHostGetDevicePointer(void** d, void* h, unsigned) { *d = h; return 0; }
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1 };
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* s) {
  *s = ::emu::capturing ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return 0;
}
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
"""

STUBS = {
    "cuda_runtime.h": CUDA_RUNTIME_H,
    "c10/cuda/CUDAException.h": """#pragma once
#include <cuda_runtime.h>
#define C10_CUDA_CHECK(x) (void)(x)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() do { } while (0)
""",
    "c10/cuda/CUDAGuard.h": """#pragma once
#include <c10/core/Device.h>
namespace c10 { namespace cuda {
struct CUDAGuard { explicit CUDAGuard(c10::Device) {} };
} }
""",
    "c10/cuda/CUDAStream.h": """#pragma once
#include <cuda_runtime.h>
namespace c10 { namespace cuda {
struct CUDAStream { cudaStream_t stream() const { return nullptr; } };
inline CUDAStream getCurrentCUDAStream() { return {}; }
} }
""",
}

# The CUDA entry point of each op (nto::cuda::<namespace>::<function>); schemas: ops.SCHEMAS.
CUDA_FUNCTIONS = {
    "param_stats": "stats::param_stats_cuda",
    "masked_adamw_": "adamw::masked_adamw_cuda",
    "masked_adamw_int8_": "adamw_int8::masked_adamw_int8_cuda",
    "masked_adamw_int4_": "adamw_int4::masked_adamw_int4_cuda",
    "masked_adamw_lowp_": "adamw_lowp::masked_adamw_lowp_cuda",
    "adamw_first_step_": "first::adamw_first_step_cuda",
    "select_topk": "topk::select_topk_cuda",
    "remap_state": "remap::remap_state_cuda",
    "gather_accumulate_": "gather::gather_accumulate_cuda",
}

LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def _emulated_sources(dst: Path) -> Path:
    """csrc copied to dst with launches rewritten; returns the one source to compile."""
    shutil.copytree(ROOT / "csrc", dst / "csrc")
    cuda = dst / "csrc" / "cuda"
    units = sorted(p.name for p in cuda.glob("*.cu"))
    for name in units:
        p = cuda / name
        text = LAUNCH.sub(lambda m: f"::emu::launch({m.group(2)})({m.group(1)}, ", p.read_text())
        assert "<<<" not in text, f"{name}: a launch the rewrite missed"
        p.write_text(text)
    for rel, body in STUBS.items():
        f = dst / "stubs" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(body)
    defs = "\n".join(f'  m.def("{name}{ops.SCHEMAS[name]}", &nto::cuda::{fn});'
                     for name, fn in CUDA_FUNCTIONS.items())
    main = cuda / "emu_ops.cpp"
    main.write_text("\n".join([
        "#include <cuda_runtime.h>",
        "#include <torch/library.h>",
        "#undef TORCH_LIBRARY_IMPL  // the files' CUDA registrations: compiled, not registered",
        "#define TORCH_LIBRARY_IMPL(ns, k, m) [[maybe_unused]] static void "
        "C10_CONCATENATE(nto_emu_unused_, __COUNTER__)(torch::Library & m)",
        '#include "multi_tensor.cuh"',
        '#include "arg_checks.cuh"',
        "#define check_on_cuda(...) ((void)0)  // every tensor here is a CPU tensor",
        *[f'#include "{u}"' for u in units],
        "TORCH_LIBRARY(nto_emu, m) {",
        defs,
        '  m.def("emu_launches() -> int", [] { return static_cast<int64_t>(::emu::launches); });',
        '  m.def("emu_set_capturing(bool on) -> ()", [](bool on) { ::emu::capturing = on; });',
        "}",
        "",
    ]))
    return main


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no host C++ compiler")
    from torch.utils.cpp_extension import load

    root = tmp_path_factory.mktemp("cuda_emu")
    main = _emulated_sources(root)
    load(name="nto_cuda_emu", sources=[str(main)], build_directory=str(root),
         extra_include_paths=[str(root / "stubs")],
         extra_cflags=["-O1", "-ffp-contract=off", "-w"], is_python_module=False,
         verbose=False)
    return torch.ops.nto_emu


def _cpu(name):
    """The CPU kernel when built (the dispatcher prefers it), else the reference."""
    ops.backend()
    return getattr(torch.ops.nto, name)


def _positions(n, density, dtype, gen):
    return torch.nonzero(torch.rand(n, generator=gen) < density).view(-1).to(dtype)


SIZES = (0, 1, 3, 4097, 65537)
HYPER = (1e-2, 0.9, 0.999, 1e-8, 0.1)

# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("dtype", FLOATS)
def test_param_stats(emu, dtype):
    gen = torch.Generator().manual_seed(0)
    ts = [torch.randn(n, generator=gen).to(dtype) for n in SIZES + (140_000,)]
    ts.append(torch.tensor([0.0, -0.0, 1e-40, float("inf"), -2.5, float("nan")]).to(dtype))
    ts[-2] = ts[-2][1:]  # an unaligned start: the scalar path
    got, want = emu.param_stats(ts), _reference.param_stats(ts)
    assert torch.equal(got[0], want[0]) and torch.equal(got[3], want[3])
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0, equal_nan=True)


def _adamw_case(sizes, pdtype, gdtype, kind, idx_dtype, step, gen, offset,
                sdtype=torch.float32, soffset=0):
    """soffset: the moments start that many elements into their storage (alignment)."""
    cols = [[] for _ in range(6)]
    for n in sizes:
        p = torch.randn(n + offset, generator=gen).to(pdtype)[offset:]
        pos = None if kind == "dense" else _positions(n, 0.3, idx_dtype, gen)
        length = n if pos is None else pos.numel()
        g = torch.randn(n if kind in ("dense", "dense_grad") else length, generator=gen)
        m = (torch.randn(length + soffset, generator=gen) * 0.1).to(sdtype)[soffset:]
        v = (torch.rand(length + soffset, generator=gen) * 0.01).to(sdtype)[soffset:]
        for c, x in zip(cols, (p, g.to(gdtype), m, v, pos, step.clone())):
            c.append(x)
    return cols


def _run(op, case):
    cols = [[t.clone() if isinstance(t, torch.Tensor) else t for t in c] for c in case]
    op(*cols, *HYPER)
    return cols[0] + cols[2] + cols[3]


@pytest.mark.parametrize("pdtype", FLOATS)
@pytest.mark.parametrize("kind", ["dense", "compact", "dense_grad"])
def test_masked_adamw(emu, pdtype, kind):
    gen = torch.Generator().manual_seed(1)
    # an fp32 param (a master weight) also takes the model's bf16/fp16 grad
    for gdtype in FLOATS if pdtype == torch.float32 else (pdtype, torch.float32):
        for idx_dtype, step, offset in ((torch.int32, torch.tensor([7.0], dtype=torch.float64), 0),
                                        (torch.int64, torch.tensor([13], dtype=torch.int32), 1)):
            case = _adamw_case(SIZES, pdtype, gdtype, kind, idx_dtype, step, gen, offset)
            got, want = _run(emu.masked_adamw_, case), _run(_cpu("masked_adamw_"), case)
            for g, w in zip(got, want):
                assert torch.equal(g, w), (kind, gdtype, idx_dtype, step, offset)


@pytest.mark.parametrize("pdtype", FLOATS)
@pytest.mark.parametrize("kind", ["dense", "compact", "dense_grad"])
def test_masked_adamw_bf16_moments(emu, pdtype, kind):
    """bf16 moments: widened, updated in fp32, rounded once; bit for bit the CPU kernel's,
    through the vector and scalar paths (odd param / moment offsets) and the tails."""
    gen = torch.Generator().manual_seed(3)
    sizes = (0, 1, 33, 4097, 65537 + 3)
    for gdtype in FLOATS if pdtype == torch.float32 else (pdtype, torch.float32):
        for idx_dtype, step, offset, soffset in (
                (torch.int32, torch.tensor([7.0], dtype=torch.float64), 0, 0),
                (torch.int64, torch.tensor([13], dtype=torch.int32), 1, 0),
                (torch.int64, torch.tensor([2], dtype=torch.int64), 0, 1),
                (torch.int32, torch.tensor([5.0]), 0, 2)):
            case = _adamw_case(sizes, pdtype, gdtype, kind, idx_dtype, step, gen, offset,
                               torch.bfloat16, soffset)
            got, want = _run(emu.masked_adamw_, case), _run(_cpu("masked_adamw_"), case)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and torch.equal(g, w), (gdtype, idx_dtype, soffset)


def test_masked_adamw_mixed_moment_dtypes_in_one_call(emu):
    """fp32 and bf16 moments in one call (separate launch groups), many small tensors."""
    gen = torch.Generator().manual_seed(4)
    sizes = [int(n) for n in torch.randint(0, 300, (60,), generator=gen)]
    for kind in ("dense", "compact"):
        step = torch.tensor([7.0], dtype=torch.float64)
        a = _adamw_case(sizes[:30], torch.bfloat16, torch.float32, kind, torch.int32, step,
                        gen, 0, torch.bfloat16)
        b = _adamw_case(sizes[30:], torch.bfloat16, torch.float32, kind, torch.int32, step,
                        gen, 0)
        case = [x + y for x, y in zip(a, b)]
        got, want = _run(emu.masked_adamw_, case), _run(_cpu("masked_adamw_"), case)
        assert all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want))


def test_masked_adamw_many_tensors(emu):
    gen = torch.Generator().manual_seed(2)
    sizes = [int(n) for n in torch.randint(0, 300, (70,), generator=gen)]
    for kind in ("dense", "compact"):
        case = _adamw_case(sizes, torch.bfloat16, torch.float32, kind, torch.int32,
                           torch.tensor([7.0], dtype=torch.float64), gen, 0)
        got, want = _run(emu.masked_adamw_, case), _run(_cpu("masked_adamw_"), case)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_masked_adamw_int8(emu):
    """8-bit moments: the CUDA kernel (a warp per quantization block, 8 blocks per CUDA
    block) gives the CPU kernel's bits, NaN/Inf gradients included (NaN payloads aside):
    every dtype pair, whole and partial blocks (a last CUDA block with idle warps), and views
    at an odd offset (p, g, qm or qw unaligned: the scalar-load variant), and a partial
    block's padding dequantized with an inf scale, as the spec's zero padding is."""
    gen = torch.Generator().manual_seed(4)
    sizes = (1, 255, 256, 257, 2 * 256 * 8, 9 * 256 + 100, 4097)

    def view(t, off):  # t's values in a view starting `off` elements into a bigger tensor
        return torch.cat([t.new_zeros(off), t])[off:] if off else t

    for pdtype, gdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                           (torch.float16, torch.float16)):
        for odd in (None, 0, 1, 2, 3):  # which of p, g, qm, qw starts at offset 1
            cols = [[] for _ in range(7)]
            for n in sizes:
                nb = _reference.q8_blocks(n)
                g = torch.randn(n, generator=gen) * torch.logspace(-4, 0, n)
                if n == 4097:
                    g[5], g[700] = float("nan"), float("inf")
                vals = [torch.randn(n, generator=gen).to(pdtype), g.to(gdtype),
                        torch.randint(-127, 128, (n,), generator=gen).to(torch.int8),
                        torch.randint(0, 256, (n,), generator=gen).to(torch.uint8)]
                scales = [torch.rand(nb, generator=gen) * 1e-4,
                          torch.rand(nb, generator=gen) * 1e-6]
                if n == 257:  # an inf scale (after an inf grad): the padding's v is NaN too
                    vals[3][256], scales[1][1] = 1, float("inf")
                vals = [view(t, int(k == odd)) for k, t in enumerate(vals)]
                for c, v in zip(cols, (*vals, *scales, torch.tensor([3.0], dtype=torch.float64))):
                    c.append(v)
            runs = []
            for op in (emu.masked_adamw_int8_, _cpu("masked_adamw_int8_")):
                c = [[t.clone() if t.storage_offset() == 0 else view(t.clone(), 1)
                      for t in col] for col in cols]
                op(*c[:6], [None] * len(c[0]), c[6], *HYPER)
                runs.append([t for col in c[:6] for t in col])
            where = f"{pdtype} {gdtype} odd={odd}"
            for g, w in zip(*runs):
                torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True,
                                           msg=lambda m, where=where: f"{where}: {m}")


def _q8_indexed_case(sizes, pdtype, gdtype, idx_dtype, gen, spare=37):
    """Columns of masked_adamw_int8_ (steps last) for sorted unique positions of n = each
    size in params of 2n + spare elements; the grad and state compact."""
    cols = [[] for _ in range(8)]
    for n in sizes:
        numel, nb = 2 * n + spare, _reference.q8_blocks(n)
        pos = torch.randperm(numel, generator=gen)[:n].sort().values.to(idx_dtype)
        g = torch.randn(n, generator=gen) * torch.logspace(-4, 0, n)
        if n > 700:
            g[5], g[700] = float("nan"), float("inf")
        vals = (torch.randn(numel, generator=gen).to(pdtype), g.to(gdtype),
                torch.randint(-127, 128, (n,), generator=gen).to(torch.int8),
                torch.randint(0, 256, (n,), generator=gen).to(torch.uint8),
                torch.rand(nb, generator=gen) * 1e-4, torch.rand(nb, generator=gen) * 1e-6,
                pos, torch.tensor([3.0], dtype=torch.float64))
        for c, v in zip(cols, vals):
            c.append(v)
    return cols


def test_masked_adamw_int4(emu):
    """4-bit moments: the CUDA kernel (a warp per block of 64, lane l holding elements
    l + 32k) gives the CPU kernel's bits, NaN/Inf gradients included (NaN payloads aside):
    every dtype pair, whole and partial blocks (a last CUDA block with idle warps), several
    tensors in one call, and a partial block's padding dequantized with an inf scale."""
    gen = torch.Generator().manual_seed(5)
    sizes = (1, 63, 64, 65, 2 * 64 * 8, 9 * 64 + 40, 4097)
    for pdtype, gdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)):
        cols = [[] for _ in range(6)]
        for n in sizes:
            nb = _reference.q4_blocks(n)
            g = torch.randn(n, generator=gen) * torch.logspace(-4, 0, n)
            if n == 4097:
                g[5], g[700] = float("nan"), float("inf")
            scales = [torch.rand(nb, generator=gen) * 1e-4, torch.rand(nb, generator=gen) * 1e-6]
            if n == 65:  # an inf scale (after an inf grad): the padding's v is NaN too
                scales[1][1] = float("inf")
            for c, v in zip(cols, (torch.randn(n, generator=gen).to(pdtype), g.to(gdtype),
                                   torch.randint(0, 256, (n,), generator=gen).to(torch.uint8),
                                   *scales, torch.tensor([3.0], dtype=torch.float64))):
                c.append(v)
        runs = []
        for op in (emu.masked_adamw_int4_, _cpu("masked_adamw_int4_")):
            c = [[t.clone() for t in col] for col in cols]
            for _ in range(2):
                op(*c, *HYPER)
            runs.append([t for col in c[:5] for t in col])
        for g, w in zip(*runs):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m, d=pdtype: f"{d}: {m}")


def _run_q8(op, cols, steps=(3.0,)):
    c = [[None if t is None else t.clone() for t in col] for col in cols]
    for s in steps:
        op(*c[:7], [torch.tensor([s], dtype=torch.float64)] * len(c[0]), *HYPER)
    return c


@pytest.mark.parametrize("idx_dtype", (torch.int32, torch.int64))
def test_masked_adamw_int8_indexed(emu, idx_dtype):
    """Indexed (policy="sparse"): the CUDA kernel gathers p at the positions, the compact
    grad and state as the dense path: the CPU kernel's bits, partial blocks included, and
    the params' elements at no position untouched; dense and indexed tensors in one call,
    and a grad and moments at an odd offset (their scalar-load variant)."""
    gen = torch.Generator().manual_seed(6)
    sizes = (1, 255, 256, 257, 2 * 256 * 8, 4097)
    for pdtype, gdtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                           (torch.float16, torch.float16)):
        cols = _q8_indexed_case(sizes, pdtype, gdtype, idx_dtype, gen)
        cols[6][2] = None  # a dense tensor among indexed ones
        cols[0][2] = cols[0][2][:256]
        cols[1][-1] = torch.cat([cols[1][-1].new_zeros(1), cols[1][-1]])[1:]  # unaligned g
        cols[2][-2] = torch.cat([cols[2][-2].new_zeros(1), cols[2][-2]])[1:]  # unaligned qm
        got, want = _run_q8(emu.masked_adamw_int8_, cols, (1.0, 2.0)), _run_q8(
            _cpu("masked_adamw_int8_"), cols, (1.0, 2.0))
        where = f"{pdtype} {gdtype} {idx_dtype}"
        for k, (g, w) in enumerate(zip([t for col in got[:6] for t in col],
                                       [t for col in want[:6] for t in col])):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m, k=k, where=where: f"{where} [{k}]: {m}")
        for p0, p1, pos in zip(cols[0], got[0], cols[6]):
            if pos is not None:
                rest = torch.ones(p0.numel(), dtype=torch.bool)
                rest[pos.long()] = False
                assert torch.equal(p1[rest], p0[rest]), where  # not indexed: untouched
                assert not torch.equal(p1[~rest], p0[~rest]), where


def test_masked_adamw_int8_bad_indices_raise_the_cpu_errors_before_any_write(emu):
    def args(idx):
        gen = torch.Generator().manual_seed(8)
        n = idx.numel()
        return ([torch.randn(300, generator=gen)], [torch.randn(n, generator=gen)],
                [torch.randint(-127, 128, (n,), generator=gen).to(torch.int8)],
                [torch.randint(0, 256, (n,), generator=gen).to(torch.uint8)],
                [torch.rand(2, generator=gen)], [torch.rand(2, generator=gen)], [idx],
                [torch.tensor([1.0], dtype=torch.float64)], *HYPER)
    ok = torch.arange(0, 299, dtype=torch.int32)[:260]
    bad = []
    for dtype in (torch.int32, torch.int64):
        for j, value in ((259, 300), (0, -1), (259, 2**31 - 1), (130, 129), (3, 1)):
            x = ok.to(dtype).clone()
            x[j] = value  # out of range, negative, huge, a duplicate, not sorted
            bad.append(x)
    for idx in bad:
        a = args(idx)
        before = [t.clone() for lst in a[:6] for t in lst]
        got = _error(lambda a=a: emu.masked_adamw_int8_(*a))
        want = _error(lambda idx=idx: _cpu("masked_adamw_int8_")(*args(idx)))
        assert want[0] is not None and got == want, (idx.dtype, got, want)
        assert all(torch.equal(x, y) for x, y in zip([t for lst in a[:6] for t in lst], before))


def test_masked_adamw_int8_index_changed_after_the_check_skips_its_block(emu):
    """As masked_adamw_'s check at use, per quantization block as on the CPU: a raw write
    (no version bump: the cached facts go stale) puts a position out of range; the kernel
    leaves that block (params at its positions, levels, scales) untouched, updates the
    others, and the next call raises naming the op, tensor and position."""
    def args(idx):
        gen = torch.Generator().manual_seed(9)
        n, nb = idx.numel(), _reference.q8_blocks(idx.numel())
        return [[torch.randn(600, generator=gen)], [torch.randn(n, generator=gen)],
                [torch.randint(-127, 128, (n,), generator=gen).to(torch.int8)],
                [torch.randint(0, 256, (n,), generator=gen).to(torch.uint8)],
                [torch.rand(2, generator=gen)[:nb]], [torch.rand(2, generator=gen)[:nb]],
                [idx], [torch.tensor([1.0], dtype=torch.float64)], *HYPER]

    idx = torch.arange(0, 600, 2)  # 300 positions: a whole block and a partial one
    emu.masked_adamw_int8_(*args(idx))  # checked, facts cached
    want = args(idx)  # block 0 alone, on the CPU
    want[6] = [idx[:256].clone()]
    for k in (1, 2, 3):
        want[k][0] = want[k][0][:256]
    for k in (4, 5):
        want[k][0] = want[k][0][:1]
    _cpu("masked_adamw_int8_")(*want)
    idx.numpy()[260] = 600  # out of range for params[0], unseen by the cache
    a, before = args(idx), args(idx)
    emu.masked_adamw_int8_(*a)
    block1 = idx[256:260].tolist() + idx[261:].tolist()
    assert torch.equal(a[0][0][block1], before[0][0][block1])
    for k in (2, 3):
        assert torch.equal(a[k][0][:256], want[k][0]) and torch.equal(a[k][0][256:],
                                                                      before[k][0][256:])
    for k in (4, 5):
        assert a[k][0][0] == want[k][0][0] and a[k][0][1] == before[k][0][1]
    rest = torch.ones(600, dtype=torch.bool)
    rest[idx[:256]] = False
    assert torch.equal(a[0][0][~rest], want[0][0][~rest])
    assert torch.equal(a[0][0][rest], before[0][0][rest])
    small = args(torch.tensor([1, 2]))
    with pytest.raises(IndexError, match=r"^masked_adamw_int8_: indices\[0\]\[260\] = 600 is "
                       r"out of range for params\[0\] with 600 elements when the kernel read "
                       r"it.*another thread changed indices\[0\].*quantization block"):
        emu.masked_adamw_int8_(*small)
    assert torch.equal(small[0][0], args(torch.tensor([1, 2]))[0][0])  # raised before writes
    emu.masked_adamw_int8_(*small)  # cleared


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("masters", (True, False))
def test_masked_adamw_lowp(emu, dtype, masters):
    """bf16/fp16 params with fp32 masters or stochastic rounding: the CUDA kernel (one
    element per thread) gives the CPU kernel's bits, the random draws included
    (keyed on the element's position, not on the thread)."""
    gen = torch.Generator().manual_seed(5)
    sizes = (1, 3, 4097, 65537)
    cols = [[] for _ in range(5)]
    for n in sizes:
        p32 = torch.randn(n, generator=gen)
        for c, v in zip(cols, (p32.to(dtype), (torch.randn(n, generator=gen) * 1e-2).to(dtype),
                               torch.randn(n, generator=gen) * 1e-3,
                               torch.rand(n, generator=gen) * 1e-5, p32 + 1e-4)):
            c.append(v)
    if not masters:
        cols[4] = []
    steps = [torch.tensor([3.0], dtype=torch.float64)] * len(sizes)
    sr = [not masters or i % 2 == 0 for i in range(len(sizes))]  # masters: a period's end
    keys = [ops._signed64(0x9E3779B97F4A7C15 * (i + 1)) for i in range(len(sizes))]
    runs = []
    for op in (emu.masked_adamw_lowp_, _cpu("masked_adamw_lowp_")):
        for maximize in (False, True):
            c = [[t.clone() for t in col] for col in cols]
            op(*c, steps, sr, keys, *HYPER, maximize)
            runs.append([t for col in c for t in col])
    for g, w in zip(runs[0] + runs[1], runs[2] + runs[3]):
        assert torch.equal(g.view(torch.int16) if g.element_size() == 2 else g,
                           w.view(torch.int16) if w.element_size() == 2 else w)


# ------------------------------------------------------------------ adamw_first_step_

# (lr, beta1, beta2, eps, weight_decay): w = 1 - beta1 below 0.5 (m = fma(w, g - m, m)),
# above it and at it exactly (m = fma(w - 1, g - m, g): torch's lerp switches formula there);
# with and without weight decay.
FIRST_HYPER = ((1e-2, 0.9, 0.999, 1e-8, 0.1), (3e-3, 0.3, 0.95, 1e-6, 0.0),
               (1e-3, 0.5, 0.99, 1e-3, 0.5))
FIRST_PAIRS = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
               (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
               (torch.float16, torch.float32))


def _shifted(t, off):
    """t's values in a contiguous view starting `off` elements into a bigger tensor."""
    return torch.cat([t.new_zeros(off), t.reshape(-1)])[off:].view(t.shape) if off else t


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _first_case(sizes, pdtype, gdtype, gen, odd=None):
    """params and grads of adamw_first_step_ (one 2-D param); odd = "p" or "g": those start
    one element into their storage (unaligned: the scalar path). Finite special values at
    the front: signed zeros, a tiny and a large grad."""
    ps, gs = [], []
    for n in sizes:
        p, g = first_values(n, gen)
        shape = (7, n // 7) if n == 7 * 9 else (n,)
        ps.append(_shifted(p.to(pdtype).view(shape), int(odd == "p")))
        gs.append(_shifted(g.to(gdtype).view(shape), int(odd == "g")))
    return ps, gs


def _run_first(op, ps, gs, hyper):
    """The params after op (clones, at the inputs' offsets); the grads must stay unchanged."""
    ps = [_shifted(p.clone(), p.storage_offset()) for p in ps]
    before = [g.clone() for g in gs]
    op(ps, gs, *hyper)
    assert all(torch.equal(_bits(g), _bits(b)) for g, b in zip(gs, before))
    return ps


def _first_by_masked_adamw(op, ps, gs, hyper):
    """The definition: masked_adamw_ (dense) on zero fp32 moments at step 1."""
    ps = [_shifted(p.clone(), p.storage_offset()) for p in ps]
    n = len(ps)
    op(ps, gs, [torch.zeros(p.numel()) for p in ps], [torch.zeros(p.numel()) for p in ps],
       [None] * n, [torch.tensor([1.0], dtype=torch.float64) for _ in ps], *hyper)
    return ps


def _first_spec(ps, gs, hyper):
    """The bit-for-bit spec: masked_adamw_'s reference math on zero fp32 moments at step 1
    with the kernels' correctly rounded root (torch's CPU sqrt is not always: the reference
    itself is within one rounding, as tests/test_ops.py compares masked_adamw_'s)."""
    out = []
    for p, g in zip(ps, gs):
        p32 = p.reshape(-1).to(torch.float32, copy=True)
        _reference._adamw_scalar_step(p32, g.reshape(-1).float(), torch.zeros(p.numel()),
                                      torch.zeros(p.numel()), 1.0, *hyper,
                                      sqrt=_reference.sqrt_rn)
        out.append(p32.to(p.dtype).view(p.shape))
    return out


def _assert_first_agrees(emu, ps, gs, hyper, where):
    got = _run_first(emu.adamw_first_step_, ps, gs, hyper)
    exact = {"spec": _first_spec(ps, gs, hyper),
             "cpu": _run_first(_cpu("adamw_first_step_"), ps, gs, hyper),
             "cpu masked_adamw_": _first_by_masked_adamw(_cpu("masked_adamw_"), ps, gs, hyper),
             "emulated masked_adamw_": _first_by_masked_adamw(emu.masked_adamw_, ps, gs, hyper)}
    for name, want in exact.items():
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype and g.shape == w.shape, (where, name, i)
            assert torch.equal(_bits(g), _bits(w)), (where, name, i, (g.float() - w.float())
                                                     .abs().max())
    ref = _run_first(_reference.adamw_first_step_, ps, gs, hyper)  # torch's sqrt
    for g, w in zip(got, ref):
        torch.testing.assert_close(g.float(), w.float(), rtol=torch.finfo(g.dtype).eps,
                                   atol=1e-6)


@pytest.mark.parametrize("pdtype", FLOATS)
def test_adamw_first_step(emu, pdtype):
    """Bit for bit masked_adamw_ (spec, CPU kernel, emulated CUDA) on a fresh fp32 state at
    step 1, and the CPU kernel's first step; the reference within one rounding (torch's
    root). Each grad dtype allowed, aligned (vector loads)
    and unaligned params or grads (scalar path), tails of 1-3 elements, an empty tensor, a
    tensor of several chunks (65536 elements each), both lerp formulas, with and without
    weight decay."""
    gen = torch.Generator().manual_seed(11)
    sizes = (0, 1, 3, 6, 7 * 9, 4097, 65536 + 5)
    for pd, gd in FIRST_PAIRS:
        if pd != pdtype:
            continue
        for odd in (None, "p", "g"):
            for hyper in FIRST_HYPER:
                ps, gs = _first_case(sizes, pd, gd, gen, odd)
                _assert_first_agrees(emu, ps, gs, hyper, (pd, gd, odd, hyper))


def test_adamw_first_step_many_tensors_mixed_dtypes(emu):
    """Every dtype pair in one call, interleaved (one launch group each), and 70 tensors in
    the bf16/fp32 group: more than a launch table's 64 slots, the 64th non-empty one three
    chunks long (the table is full: the launch waits for its last chunk), empty tensors
    among them (no slot)."""
    gen = torch.Generator().manual_seed(12)
    sizes = [int(n) for n in torch.randint(1, 300, (70,), generator=gen)]
    sizes[10], sizes[64], sizes[65] = 0, 2 * 65536 + 9, 0
    ps, gs = _first_case(sizes, torch.bfloat16, torch.float32, gen)
    others = [pair for pair in FIRST_PAIRS if pair != (torch.bfloat16, torch.float32)]
    for k, (pd, gd) in enumerate(others):
        more = _first_case([int(n) for n in torch.randint(0, 700, (9,), generator=gen)], pd, gd,
                           gen, (None, "p", "g")[k % 3])
        at = 7 + 13 * k
        ps, gs = ps[:at] + more[0] + ps[at:], gs[:at] + more[1] + gs[at:]
    before = emu.emu_launches()
    _run_first(emu.adamw_first_step_, ps, gs, FIRST_HYPER[0])
    assert emu.emu_launches() - before == len(others) + 2  # the bf16/fp32 group: 64 + 4 slots
    _assert_first_agrees(emu, ps, gs, FIRST_HYPER[0], "many")
    emu.adamw_first_step_([], [], *FIRST_HYPER[0])  # nothing to do


def _strided_copy(t):
    """A copy of t with its strides (a non-contiguous input stays so)."""
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype).copy_(t)


def test_adamw_first_step_bad_inputs_raise_the_reference_errors_before_any_write(emu):
    def args(**change):
        a = {"params": [torch.randn(5), torch.randn(8).bfloat16()],
             "grads": [torch.randn(5), torch.randn(8).bfloat16()],
             "hyper": list(FIRST_HYPER[0])}
        for key, (i, value) in change.items():
            a[key][i] = value
        return a

    cases = [args(grads=(1, torch.randn(8).half())),       # bf16 param, fp16 grad
             args(grads=(0, torch.randn(5).bfloat16())),   # fp32 param takes fp32 only
             args(grads=(1, torch.randn(7))),              # numel
             args(params=(0, torch.randn(5, 2)[:, 0])),    # not contiguous
             args(grads=(0, torch.randn(5).double())),     # not a float dtype it takes
             args(params=(1, torch.randn(8).long())),
             args(hyper=(1, 1.5)),                         # beta1 (1.0 reads "1" in C++)
             args(hyper=(4, -0.1))]                        # weight decay
    short = args()
    short["grads"] = short["grads"][:1]                    # one grad for two params
    cases.append(short)
    for a in cases:
        before = [x.clone() for x in a["params"]]
        got = _error(lambda a=a: emu.adamw_first_step_(a["params"], a["grads"], *a["hyper"]))
        want = _error(lambda a=a: _reference.adamw_first_step_(
            [_strided_copy(x) for x in a["params"]], a["grads"], *a["hyper"]))
        cpu = _error(lambda a=a: _cpu("adamw_first_step_")(
            [_strided_copy(x) for x in a["params"]], a["grads"], *a["hyper"]))
        assert want[0] is not None and got == want == cpu, (got, want, cpu)
        assert all(torch.equal(x, y) for x, y in zip(a["params"], before))
    # shared memory: the kernels' own check (the reference updates tensor after tensor)
    p = torch.randn(8).bfloat16()
    for ps, gs, match in (([torch.randn(5), p], [torch.randn(5), p[:]],
                           r"params\[1\] and grads\[1\] share memory"),
                          ([p[:6], p[4:]], [p.new_ones(6), p.new_ones(4)],
                           r"params\[0\] and params\[1\] share memory")):
        before = p.clone()
        got = _error(lambda ps=ps, gs=gs: emu.adamw_first_step_(ps, gs, *FIRST_HYPER[0]))
        cpu = _error(lambda ps=ps, gs=gs: _cpu("adamw_first_step_")(ps, gs, *FIRST_HYPER[0]))
        assert got[0] is ValueError and got == cpu and re.search(match, got[1]), (got, cpu)
        assert torch.equal(_bits(p), _bits(before))


@pytest.mark.parametrize("dtype", FLOATS)
def test_select_topk(emu, dtype):
    gen = torch.Generator().manual_seed(3)
    ts = [torch.randn(n, generator=gen).to(dtype) for n in SIZES]
    ties = torch.randint(-3, 4, (9000,), generator=gen).to(dtype)
    ties[::97] = float("nan")
    ts += [ties, torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1e-40]).to(dtype)]
    total = sum(t.numel() for t in ts)
    for k in (0, 1, 2, 17, 4097, total // 10, total // 2, total - 1, total):
        got, want = emu.select_topk(ts, k), _reference.select_topk(ts, k)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w), (k, g[:8], w[:8])


def test_select_topk_many_tensors_mixed_dtypes(emu):
    gen = torch.Generator().manual_seed(4)
    ts = [torch.randn(int(n), generator=gen).to(FLOATS[i % 3])
          for i, n in enumerate(torch.randint(0, 800, (90,), generator=gen))]
    total = sum(t.numel() for t in ts)
    for k in (1, total // 3, total - 5):
        assert all(torch.equal(g, w) for g, w in
                   zip(emu.select_topk(ts, k), _reference.select_topk(ts, k)))


@pytest.mark.parametrize("dtype", FLOATS)
def test_remap_state(emu, dtype):
    gen = torch.Generator().manual_seed(5)
    olds, news, states = [], [], []
    for i, n in enumerate(SIZES + (30_000,)):
        olds.append(_positions(n, 0.5, (torch.int32, torch.int64)[i % 2], gen))
        news.append(_positions(n, 0.5, (torch.int64, torch.int32)[i % 2], gen))
        lead = [(2,), (), (3, 2)][i % 3]
        states.append(torch.randn(*lead, olds[-1].numel(), generator=gen).to(dtype))
    got, want = emu.remap_state(olds, news, states), _reference.remap_state(olds, news, states)
    assert all(g.shape == w.shape and torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_accumulate(emu, dtype):
    gen = torch.Generator().manual_seed(6)
    dense = [torch.randn(n, generator=gen).to(dtype) for n in SIZES + (70_001,)]
    idx = [_positions(d.numel(), 0.2, (torch.int32, torch.int64)[i % 2], gen)
           for i, d in enumerate(dense)]
    compact = [torch.randn(i.numel(), generator=gen) for i in idx]
    got, want = [c.clone() for c in compact], [c.clone() for c in compact]
    emu.gather_accumulate_(dense, idx, got)
    _reference.gather_accumulate_(dense, idx, want)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - compared by the caller
        return type(e), str(e).split("\n")[0]
    return None, None


def test_bad_indices_raise_the_cpu_errors_before_any_write(emu):
    def args(idx):
        p = torch.randn(10)
        return ([p], [torch.randn(4)], [torch.zeros(4)], [torch.zeros(4)], [idx],
                [torch.tensor([1.0], dtype=torch.float64)], *HYPER)
    for idx in (torch.tensor([1, 3, 5, 10], dtype=torch.int32), torch.tensor([-1, 3, 5, 9]),
                torch.tensor([1, 5, 3, 9]), torch.tensor([1, 3, 3, 9])):
        a = args(idx)
        before = a[0][0].clone()
        got = _error(lambda a=a: emu.masked_adamw_(*a))
        want = _error(lambda idx=idx: _cpu("masked_adamw_")(*args(idx)))
        assert want[0] is not None and got == want
        assert torch.equal(a[0][0], before)
    # the index cache: a checked tensor changed in place is checked again
    idx = torch.tensor([1, 3, 5, 9])
    emu.masked_adamw_(*args(idx))
    idx[3] = 12
    with pytest.raises(IndexError, match=r"indices\[0\]\[3\] = 12 is out of range"):
        emu.masked_adamw_(*args(idx))
    got = _error(lambda: emu.remap_state([torch.tensor([0, 2, 1])], [torch.tensor([1])],
                                         [torch.zeros(3)]))
    want = _error(lambda: _cpu("remap_state")([torch.tensor([0, 2, 1])], [torch.tensor([1])],
                                              [torch.zeros(3)]))
    assert want[0] is not None and got == want
    got = _error(lambda: emu.gather_accumulate_([torch.ones(4)], [torch.tensor([1, 4])],
                                                [torch.zeros(2)]))
    want = _error(lambda: _cpu("gather_accumulate_")([torch.ones(4)], [torch.tensor([1, 4])],
                                                     [torch.zeros(2)]))
    assert want[0] is not None and got == want


def test_an_index_changed_after_the_check_is_skipped_and_raised_by_the_next_call(emu):
    """The kernels' own check at use (issue 17 item 1). Deterministic route: a raw write
    (through numpy, no torch version bump) after a checked call leaves the index cache's
    facts stale, so the host lets the kernel see an out-of-range position, as a racing
    thread would. The kernel must skip it (no access out of bounds: the emulator's tensors
    are real memory), update the rest, and the next call must raise naming op and tensor."""
    def adamw_args(idx, g_dense):
        gen = torch.Generator().manual_seed(7)
        ps = [torch.randn(50, generator=gen), torch.randn(40, generator=gen)]
        gs = [torch.randn(p.numel() if g_dense else i.numel(), generator=gen)
              for p, i in zip(ps, idx)]
        return (ps, gs, [torch.zeros(i.numel()) for i in idx],
                [torch.zeros(i.numel()) for i in idx], list(idx),
                [torch.tensor([1.0], dtype=torch.float64)] * 2, *HYPER)

    for g_dense in (False, True):
        idx = [torch.tensor([0, 7, 9]), torch.arange(0, 40, 3, dtype=torch.int32)]
        emu.masked_adamw_(*adamw_args(idx, g_dense))  # checked, facts cached
        idx[1].numpy()[2] = 2**31 - 1  # out of range for params[1], unseen by the cache
        a = adamw_args(idx, g_dense)
        keep = torch.arange(idx[1].numel()) != 2
        # the same update without position 2 of indices[1]
        want = ([p.clone() for p in a[0]],
                [a[1][0], a[1][1] if g_dense else a[1][1][keep]],
                [torch.zeros(3), torch.zeros(13)], [torch.zeros(3), torch.zeros(13)],
                [idx[0], idx[1][keep]], *a[5:])
        emu.masked_adamw_(*a)
        _reference.masked_adamw_(*want)
        assert torch.equal(a[0][0], want[0][0]) and torch.equal(a[0][1], want[0][1])
        for got_state, want_state in ((a[2][1], want[2][1]), (a[3][1], want[3][1])):
            assert torch.equal(got_state[keep], want_state) and got_state[2] == 0  # untouched
        with pytest.raises(IndexError, match=r"^masked_adamw_: indices\[1\]\[2\] = 2147483647 "
                           r"is out of range for params\[1\] with 40 elements when the kernel "
                           r"read it.*another thread changed indices\[1\]"):
            emu.masked_adamw_(*adamw_args([torch.tensor([1]), torch.tensor([1])], g_dense))
        emu.masked_adamw_(*adamw_args([torch.tensor([1]), torch.tensor([1])], g_dense))  # cleared

    dense = [torch.randn(30), torch.randn(20)]
    idx = [torch.tensor([1, 2]), torch.tensor([0, 5, 19])]
    compact = [torch.zeros(2), torch.zeros(3)]
    emu.gather_accumulate_(dense, idx, compact)
    idx[1].numpy()[0] = -3
    emu.gather_accumulate_(dense, idx, compact)
    assert torch.equal(compact[1], torch.stack([dense[1][0], 2 * dense[1][5], 2 * dense[1][19]]))
    with pytest.raises(IndexError, match=r"^gather_accumulate_: indices\[1\]\[0\] = -3 is out "
                       r"of range for dense\[1\] with 20 elements"):
        emu.gather_accumulate_([torch.ones(2)], [torch.tensor([0])], [torch.zeros(1)])


# ------------------------------------------------- the index-check cache (issue 20)


def _gather_slices(emu, base, dense, compact):
    """gather_accumulate_ on fresh slices of one index tensor, as the sparse policy calls it
    (st["indices"][a:b]); returns the kernel launches it made (the index check is one)."""
    before = emu.emu_launches()
    emu.gather_accumulate_([dense, dense], [base[0:8], base[8:]], [compact[0:8], compact[8:]])
    return emu.emu_launches() - before


def test_index_checks_are_cached_per_storage_not_per_tensor_object(emu, monkeypatch):
    monkeypatch.delenv("NTO_EXT_INDEX_CHECK", raising=False)
    base, dense, compact = torch.arange(0, 40, 2), torch.randn(50), torch.zeros(20)
    assert _gather_slices(emu, base, dense, compact) == 2  # check + gather
    for _ in range(3):  # new slice objects each call, same memory: no check, no host sync
        assert _gather_slices(emu, base, dense, compact) == 1
    base[3] = 7  # a torch write through the base bumps the version its views share
    assert _gather_slices(emu, base, dense, compact) == 2
    assert _gather_slices(emu, base, dense, compact) == 1
    base[8:][0] = 17  # ... and so does one through a view
    assert _gather_slices(emu, base, dense, compact) == 2
    base[8:][0] = 50  # in place: seen, refused on the host before any write
    before = compact.clone()
    with pytest.raises(IndexError, match=r"indices\[1\]\[0\] = 50 is out of range for "
                                         r"dense\[1\] with 50 elements"):
        _gather_slices(emu, base, dense, compact)
    assert torch.equal(compact, before)


def test_always_check_sees_writes_that_bypass_the_version_counter(emu, monkeypatch):
    monkeypatch.delenv("NTO_EXT_INDEX_CHECK", raising=False)
    base, dense, compact = torch.arange(0, 40, 2), torch.randn(50), torch.zeros(20)
    _gather_slices(emu, base, dense, compact)  # cached
    monkeypatch.setenv("NTO_EXT_INDEX_CHECK", "always")
    assert _gather_slices(emu, base, dense, compact) == 2
    assert _gather_slices(emu, base, dense, compact) == 2  # every call
    base.numpy()[9] = 99  # a raw write: no version bump (as .data, DLPack, CuPy would)
    before = compact.clone()
    with pytest.raises(IndexError, match=r"^gather_accumulate_: indices\[1\]\[1\] = 99 is out "
                                         r"of range for dense\[1\] with 50 elements; allowed"):
        _gather_slices(emu, base, dense, compact)  # the host check, not the deferred fault
    assert torch.equal(compact, before)
    monkeypatch.setenv("NTO_EXT_INDEX_CHECK", "sometimes")
    with pytest.raises(ValueError, match=r"NTO_EXT_INDEX_CHECK=sometimes; allowed: cached .* "
                                         r"or always"):
        _gather_slices(emu, base, dense, compact)


def test_a_check_needed_during_graph_capture_is_refused_naming_the_fix(emu, monkeypatch):
    monkeypatch.delenv("NTO_EXT_INDEX_CHECK", raising=False)
    base, dense, compact = torch.arange(0, 40, 2), torch.randn(50), torch.zeros(20)
    emu.emu_set_capturing(True)
    try:
        with pytest.raises(RuntimeError, match=r"gather_accumulate_: indices\[0\] must be checked "
                                               r".* captured into a CUDA graph; run the same call "
                                               r"once before the capture"):
            _gather_slices(emu, base, dense, compact)
        assert not compact.any()
        emu.emu_set_capturing(False)
        _gather_slices(emu, base, dense, compact)  # the warm-up: checked and cached
        emu.emu_set_capturing(True)
        assert _gather_slices(emu, base, dense, compact) == 1  # captured: no check, no sync
    finally:
        emu.emu_set_capturing(False)


# ------------------------------------------------------ overlapping arguments (issue 20)


def _adamw_entries(n, indexed=False):
    gen = torch.Generator().manual_seed(9)
    p = [torch.randn(12, generator=gen) for _ in range(n)]
    idx = [torch.tensor([1, 4, 7]) if indexed else None for _ in range(n)]
    length = 3 if indexed else 12
    return [p, [torch.randn(length, generator=gen) for _ in range(n)],
            [torch.zeros(length) for _ in range(n)], [torch.zeros(length) for _ in range(n)],
            idx, [torch.tensor([1.0], dtype=torch.float64)] * n]


def test_overlapping_arguments_raise_the_cpu_errors_before_any_write(emu):
    cases = []
    a = _adamw_entries(2)
    a[3][1] = a[2][1]  # exp_avg is exp_avg_sq
    cases.append((a, r"exp_avgs\[1\] and exp_avg_sqs\[1\] share memory"))
    a = _adamw_entries(2)
    a[0][1] = a[0][0]  # the same param twice (dense)
    cases.append((a, r"params\[0\] and params\[1\] share memory"))
    a = _adamw_entries(1)
    a[1][0] = a[0][0][:]  # the grad is a view of its param
    cases.append((a, r"params\[0\] and grads\[0\] share memory; a tensor the op writes and"))
    for a, match in cases:
        before = [t.clone() for t in a[0] + a[2] + a[3]]
        got = _error(lambda a=a: emu.masked_adamw_(*a, *HYPER))
        want = _error(lambda a=a: _cpu("masked_adamw_")(*a, *HYPER))
        assert want[0] is ValueError and got == want and re.search(match, got[1]), got
        assert all(torch.equal(x, y) for x, y in zip(a[0] + a[2] + a[3], before))
    a = _adamw_entries(2, indexed=True)  # one param per cohort, disjoint positions: allowed
    a[0][1], a[4][1] = a[0][0], torch.tensor([0, 5])
    a[1][1], a[2][1], a[3][1] = torch.ones(2), torch.zeros(2), torch.zeros(2)
    got, want = _run(emu.masked_adamw_, a), _run(_cpu("masked_adamw_"), a)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    c = torch.zeros(4)
    got = _error(lambda: emu.gather_accumulate_([torch.ones(8)] * 2, [torch.tensor([1, 2])] * 2,
                                                [c[0:2], c[1:3]]))
    assert got[0] is ValueError and "compact[0] and compact[1] share memory" in got[1]
    assert got == _error(lambda: _cpu("gather_accumulate_")(
        [torch.ones(8)] * 2, [torch.tensor([1, 2])] * 2, [c[0:2], c[1:3]]))
