#!/usr/bin/env bash
# The GPU check of issues 9 and 20, in one command for a machine with an NVIDIA GPU (sized
# for one H200 in under 10 minutes; no network needed):
#   1. environment: the installed torch (a preinstalled CUDA build is used as it is, whatever
#      its version: nothing is downloaded, PIP_NO_INDEX=1), CUDA, nvcc, versions printed;
#   2. build: NTO_EXT_BUILD=cuda pip install --no-build-isolation --no-deps -e .
#      (TORCH_CUDA_ARCH_LIST = this GPU's arch unless set; MAX_JOBS = nproc);
#   3. tests: pytest -m gpu (CUDA vs CPU vs reference, every dtype, past 2**31 elements,
#      bad inputs, no-host-sync and CUDA-graph checks). On a torch other than the pinned
#      one, comparisons with torch's own ops are within tolerance (tests/test_cuda.py warns
#      so); CUDA vs CPU kernels stay bit-exact;
#   4. compute-sanitizer memcheck and racecheck on one small test that runs every kernel
#      (test_every_op_once_small); skipped, with the reason, without compute-sanitizer;
#   5. benchmarks: bench/bench_cuda.py (copy bandwidth, fused AdamW, foreach_norm, topk).
# Every step runs under `timeout` (seconds: BUILD_TIMEOUT, TEST_TIMEOUT, SANITIZER_TIMEOUT,
# BENCH_TIMEOUT), and summary.md is written on any exit (a failure, a timeout, Ctrl-C), so a
# hang loses nothing already measured. Results go to $OUT when set (else out/gpu_check):
# build.log, pytest_gpu.log/.xml, sanitizer_memcheck.log, sanitizer_racecheck.log,
# bench_cuda.json/.md/.log, summary.md.
#
#   bash bench/gpu_check.sh
#
# Exit status: 0 all passed and the speed targets met; 1 a step failed or timed out; 3 all
# passed but a speed target was missed (see bench_cuda.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${OUT:-$ROOT/out/gpu_check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
BUILD_TIMEOUT=${BUILD_TIMEOUT:-900}
TEST_TIMEOUT=${TEST_TIMEOUT:-900}
SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-300}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-600}
T0=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }

# What summary.md reports, filled in as the steps run.
ENV_INFO="not reached"; BUILD="not reached"; TESTS="not reached"; MEMCHECK="not reached"
RACECHECK="not reached"; BENCH="not reached"; TARGETS="unknown"; FAILED=""
fail() { FAILED="$*"; log "FAILED: $*"; exit 1; }

write_summary() {
  local rc=$?
  {
    echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- environment: $ENV_INFO"
    echo "- build: $BUILD"
    echo "- tests (pytest -m gpu): $TESTS"
    echo "- compute-sanitizer memcheck: $MEMCHECK"
    echo "- compute-sanitizer racecheck: $RACECHECK"
    echo "- benchmarks: $BENCH; speed targets met: $TARGETS"
    if [ -n "$FAILED" ]; then echo "- FAILED: $FAILED"; fi
    echo "- exit status $rc, total time $(( $(date +%s) - T0 )) s"
    echo
    if [ -f "$OUT_DIR/bench_cuda.md" ]; then cat "$OUT_DIR/bench_cuda.md"; fi
  } > "$OUT_DIR/summary.md"
  cat "$OUT_DIR/summary.md"
}
trap write_summary EXIT
rm -f "$OUT_DIR/bench_cuda.md" "$OUT_DIR/bench_cuda.json"  # never report an older run's

# run_step SECONDS LOG CMD...: CMD under timeout (KILL 30 s after TERM), its output shown and
# written to LOG; returns CMD's status, 124 when it timed out (said in LOG).
run_step() {
  local secs=$1 logf=$2 rc
  shift 2
  set +e
  timeout --kill-after=30 "$secs" "$@" 2>&1 | tee "$logf"
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "TIMED OUT after $secs s: $*" | tee -a "$logf"
    rc=124
  fi
  return "$rc"
}
status_of() {  # exit status -> words for the summary
  case $1 in 0) echo passed ;; 124) echo "TIMED OUT" ;; *) echo "FAILED (status $1)" ;; esac
}

# ------------------------------------------------------------------ 1. environment
log "python: $PY ($("$PY" --version 2>&1))"
if command -v nvidia-smi >/dev/null; then
  timeout 60 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || true
fi
"$PY" -c "import torch" 2>/dev/null \
  || fail "torch is not installed for $PY (nothing is downloaded here: install a CUDA torch)"
for mod in pytest hypothesis numpy tqdm; do  # test/runtime needs: from a local cache at most
  "$PY" -c "import $mod" 2>/dev/null || timeout 120 "$PY" -m pip install -q "$mod" \
    || fail "python module $mod is missing and pip could not install it without network"
done
ENV_INFO=$(timeout 120 "$PY" - 2>&1 <<'EOF'
import torch
assert torch.version.cuda is not None, f"CPU-only torch {torch.__version__}"
assert torch.cuda.is_available(), "no CUDA device visible"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {p.name}, "
      f"{p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
EOF
) || { ENV_INFO=$(echo "$ENV_INFO" | tail -1); fail "torch cannot run CUDA here: $ENV_INFO"; }
log "$ENV_INFO"
if [ -z "${CUDA_HOME:-}" ]; then
  if command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
  elif [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  else
    fail "nvcc not found (PATH, /usr/local/cuda/bin): install the CUDA toolkit matching \
torch.version.cuda, or set CUDA_HOME"
  fi
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
ENV_INFO="$ENV_INFO; $("$CUDA_HOME/bin/nvcc" --version | tail -2 | head -1)"
log "nvcc: $ENV_INFO"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c \
    "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
fi
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-$(nproc)}
log "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
# The system compiler, not $CC/$CXX: on the lent H200 image CXX=/opt/gcc/bin/g++ links
# libstdc++ statically into the module, whose uninitialised copy of the locale then crashes
# the process (SIGSEGV) at the first error message that formats a number (seen 2026-12-04).
# NTO_GPU_CHECK_CXX=... picks another one (nto_ext refuses to load a module built so).
export CXX=${NTO_GPU_CHECK_CXX:-$(command -v g++ || echo "${CXX:-g++}")}
export CC=${NTO_GPU_CHECK_CC:-$(command -v gcc || echo "${CC:-gcc}")}
log "CC=$CC CXX=$CXX ($("$CXX" --version | head -1))"

# ------------------------------------------------------------------------ 2. build
log "building: NTO_EXT_BUILD=cuda pip install --no-build-isolation --no-deps -e . (timeout $BUILD_TIMEOUT s)"
rc=0
NTO_EXT_BUILD=cuda run_step "$BUILD_TIMEOUT" "$OUT_DIR/build.log" \
  "$PY" -m pip install --no-build-isolation --no-deps -e . > /dev/null || rc=$?
if [ "$rc" != 0 ]; then
  BUILD=$(status_of "$rc")
  tail -40 "$OUT_DIR/build.log"
  fail "the CUDA build (full log: $OUT_DIR/build.log)"
fi
if ! timeout 300 "$PY" -c \
    "import nto_ext.ops as o; b = o.backend(); print('backend:', b); assert b == 'cuda-ext'"; then
  BUILD="built, but the backend is not cuda-ext"
  fail "the installed extension does not run the CUDA kernels"
fi
BUILD=passed
log "build ok"

# ------------------------------------------------------------------------ 3. tests
# Only the files that hold gpu tests: collecting the others would import what a bare GPU
# machine may lack (transformers, ...), and a collection error would fail the run.
mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)
log "tests: pytest -m gpu ${GPU_TESTS[*]} (timeout $TEST_TIMEOUT s)"
tests_rc=0
run_step "$TEST_TIMEOUT" "$OUT_DIR/pytest_gpu.log" "$PY" -m pytest -q -p no:cacheprovider \
  -o addopts="" -m gpu -rfEw "${GPU_TESTS[@]}" --junitxml="$OUT_DIR/pytest_gpu.xml" \
  || tests_rc=$?
TESTS="$(status_of "$tests_rc"); $(grep -E "[0-9]+ (passed|failed)" "$OUT_DIR/pytest_gpu.log" \
  | tail -1 | tr -d '=' | sed 's/^ *//')"
log "tests: $TESTS"

# ---------------------------------------------------------- 4. compute-sanitizer
# memcheck: out-of-bounds and misaligned device accesses (torch's caching allocator is off,
# so each tensor is its own allocation and an overrun past it is seen); racecheck:
# shared-memory hazards (block scans, histograms, the radix select).
SAN=""
for c in "$(command -v compute-sanitizer || true)" "$CUDA_HOME/bin/compute-sanitizer" \
         "$CUDA_HOME/compute-sanitizer/compute-sanitizer"; do
  if [ -n "$c" ] && [ -x "$c" ]; then SAN=$c; break; fi
done
san_rc=0
if [ -z "$SAN" ]; then
  MEMCHECK="skipped: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, \$CUDA_HOME/compute-sanitizer)"
  RACECHECK=$MEMCHECK
else
  for tool in memcheck racecheck; do
    log "compute-sanitizer --tool $tool on test_every_op_once_small (timeout $SANITIZER_TIMEOUT s)"
    rc=0
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step "$SANITIZER_TIMEOUT" \
      "$OUT_DIR/sanitizer_$tool.log" "$SAN" --tool "$tool" --error-exitcode 99 \
      "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_cuda.py \
      -k test_every_op_once_small || rc=$?
    words="$(status_of "$rc"); $(grep -E "(ERROR|RACECHECK) SUMMARY" \
      "$OUT_DIR/sanitizer_$tool.log" | tail -1 | sed 's/^=* *//')"
    if [ "$tool" = memcheck ]; then MEMCHECK=$words; else RACECHECK=$words; fi
    if [ "$rc" != 0 ]; then san_rc=1; fi
  done
fi

# -------------------------------------------------------------------- 5. benchmarks
log "benchmarks: bench/bench_cuda.py (timeout $BENCH_TIMEOUT s)"
bench_rc=0
run_step "$BENCH_TIMEOUT" "$OUT_DIR/bench_cuda.log" "$PY" bench/bench_cuda.py --out "$OUT_DIR" \
  || bench_rc=$?
BENCH=$(status_of "$bench_rc")
TARGETS=$("$PY" - "$OUT_DIR/bench_cuda.json" <<'EOF' 2>/dev/null || echo unknown
import json, sys
r = json.load(open(sys.argv[1]))
print("yes" if all(t["met"] for t in r["targets"].values()) else "no")
EOF
)
if [ "$tests_rc" != 0 ] || [ "$san_rc" != 0 ] || [ "$bench_rc" != 0 ]; then exit 1; fi
if [ "$TARGETS" != yes ]; then exit 3; fi
log "all passed"
