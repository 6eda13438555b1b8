#!/usr/bin/env bash
# The GPU check of issue 9, in one command for a machine with an NVIDIA GPU (sized for one
# H200 in under 10 minutes):
#   1. environment: torch (installed only if missing), CUDA, nvcc, versions printed;
#   2. build: NTO_EXT_BUILD=cuda pip install --no-build-isolation --no-deps -e .
#      (TORCH_CUDA_ARCH_LIST = this GPU's arch unless set; MAX_JOBS = nproc);
#   3. tests: pytest -m gpu (CUDA vs CPU vs reference, every dtype, past 2**31 elements,
#      bad inputs, no-host-sync and CUDA-graph checks);
#   4. benchmarks: bench/bench_cuda.py (copy bandwidth, fused AdamW, foreach_norm, topk).
# Results go to $OUT when set (else out/gpu_check): build.log, pytest_gpu.log/.xml,
# bench_cuda.json/.md, summary.md.
#
#   bash bench/gpu_check.sh
#
# Exit status: 0 all passed and the speed targets met; 1 a step failed; 3 tests passed but
# a speed target was missed (see bench_cuda.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${OUT:-$ROOT/out/gpu_check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-$(command -v python3 || command -v python)}
T0=$(date +%s)
log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
fail() { log "FAILED: $*"; echo "FAILED: $*" >> "$OUT_DIR/summary.md"; exit 1; }
: > "$OUT_DIR/summary.md"

# ------------------------------------------------------------------ 1. environment
log "python: $PY ($("$PY" --version 2>&1))"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  log "torch is missing: pip install torch"
  "$PY" -m pip install torch || fail "torch is not installed and pip could not install it"
fi
for mod in pytest hypothesis numpy tqdm; do  # test/runtime needs; installed only if missing
  "$PY" -c "import $mod" 2>/dev/null || "$PY" -m pip install -q "$mod" \
    || fail "python module $mod is missing and pip could not install it"
done
"$PY" - <<'EOF' || fail "torch cannot see a CUDA device (or is a CPU-only build)"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"device available: {torch.cuda.is_available()}")
assert torch.version.cuda is not None, "CPU-only torch"
assert torch.cuda.is_available(), "no CUDA device visible"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
EOF
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
log "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -2 | head -1)"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c \
    "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
fi
export TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-$(nproc)}
log "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

# ------------------------------------------------------------------------ 2. build
log "building: NTO_EXT_BUILD=cuda pip install --no-build-isolation --no-deps -e ."
if ! NTO_EXT_BUILD=cuda "$PY" -m pip install --no-build-isolation --no-deps -e . \
     > "$OUT_DIR/build.log" 2>&1; then
  tail -40 "$OUT_DIR/build.log"
  fail "the CUDA build failed (full log: $OUT_DIR/build.log)"
fi
"$PY" -c "import nto_ext.ops as o; b = o.backend(); print('backend:', b); assert b == 'cuda-ext'" \
  || fail "the installed extension does not run the CUDA kernels"
log "build ok"

# ------------------------------------------------------------------------ 3. tests
# Only the files that hold gpu tests: collecting the others would import what a bare GPU
# machine may lack (transformers, ...), and a collection error would fail the run.
mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)
log "tests: pytest -m gpu ${GPU_TESTS[*]}"
set +e
"$PY" -m pytest -q -p no:cacheprovider -o addopts="" -m gpu "${GPU_TESTS[@]}" \
  --junitxml="$OUT_DIR/pytest_gpu.xml" 2>&1 | tee "$OUT_DIR/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}
set -e
log "tests exit status $tests_rc"

# -------------------------------------------------------------------- 4. benchmarks
log "benchmarks: bench/bench_cuda.py"
set +e
"$PY" bench/bench_cuda.py --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench_cuda.log"
bench_rc=${PIPESTATUS[0]}
set -e

# ------------------------------------------------------------------------ summary
targets_met=$("$PY" - "$OUT_DIR/bench_cuda.json" <<'EOF' 2>/dev/null || echo unknown
import json, sys
r = json.load(open(sys.argv[1]))
print("yes" if all(t["met"] for t in r["targets"].values()) else "no")
EOF
)
{
  echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- tests (pytest -m gpu): $([ "$tests_rc" = 0 ] && echo passed || echo "FAILED (status $tests_rc)")"
  echo "- benchmarks: $([ "$bench_rc" = 0 ] && echo ran || echo "FAILED (status $bench_rc)"), targets met: $targets_met"
  echo "- total time: $(( $(date +%s) - T0 )) s"
  echo
  [ -f "$OUT_DIR/bench_cuda.md" ] && cat "$OUT_DIR/bench_cuda.md"
} >> "$OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] || exit 1
[ "$targets_met" = yes ] || exit 3
log "all passed"
