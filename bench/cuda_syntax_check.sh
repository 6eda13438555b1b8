#!/usr/bin/env bash
# Compile-checks every csrc/cuda/*.cu with nvcc against the installed torch's headers, so
# the CUDA kernels are type-checked on machines without a GPU (even with a CPU-only torch:
# its wheel ships the c10/cuda headers). Not a build: nothing is linked or run.
#
# NTO_CUDA_CHECK selects what runs:
#   unity (default): one translation unit that #includes every .cu (each file keeps its code in
#          its own namespace for this), through nvcc's front ends for host and device code
#          (--cuda -fdevice-syntax-only): full C++/CUDA parsing, overload resolution and
#          template instantiation of every kernel, no code generation. torch's headers are
#          parsed once, so it takes ~1/6 of the per-file time (CI uses this).
#   files: the same check per file, in parallel (JOBS, default nproc): also catches a file
#          that leans on another's includes.
#   full:  per file, real objects (-c, device code for NTO_CUDA_ARCH, default sm_90).
#
#   bash bench/cuda_syntax_check.sh
#   NTO_CUDA_CHECK=full NTO_CUDA_ARCH=sm_80 JOBS=1 bash bench/cuda_syntax_check.sh
#
# NTO_CUDA_FILES (a glob, default csrc/cuda/*.cu) picks the files; NTO_CUDA_EXTRA adds nvcc
# flags, e.g. "-Xptxas -v" with full mode prints each kernel's registers and spills:
#   NTO_CUDA_CHECK=full NTO_CUDA_FILES=csrc/cuda/masked_adamw.cu NTO_CUDA_EXTRA="-Xptxas -v" \
#     bash bench/cuda_syntax_check.sh
#
# Exit status: 0 all compiled, 1 a file failed (its errors are printed), 77 skipped (no
# usable nvcc or no CUDA headers; the reason is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ARCH=${NTO_CUDA_ARCH:-sm_90}
MODE=${NTO_CUDA_CHECK:-unity}
case $MODE in unity|files|full) ;; *) echo "NTO_CUDA_CHECK=$MODE: allowed unity, files, full"; exit 2 ;; esac
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

skip() { echo "cuda_syntax_check: SKIP: $*"; exit 77; }

NVCC=${NVCC:-}
if [ -z "$NVCC" ]; then
  for c in "$(command -v nvcc || true)" "${CUDA_HOME:-/nonexistent}/bin/nvcc" \
           /usr/local/cuda/bin/nvcc; do
    if [ -n "$c" ] && [ -x "$c" ]; then NVCC=$c; break; fi
  done
fi
[ -n "$NVCC" ] || skip "nvcc not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"

# Flags: the build's own (nto_ext/_buildinfo.py and torch's nvcc flags), plus
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE: a CPU wheel lacks the generated
# c10/cuda/impl/cuda_cmake_macros.h, which only sets symbol-export macros.
FLAGS_FILE=$(mktemp)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP" "$FLAGS_FILE"' EXIT
"$PY" - "$FLAGS_FILE" <<'EOF' || skip "could not import torch with $PY"
import importlib.util, os, sys, sysconfig
import torch
from torch.utils import cpp_extension as ce
spec = importlib.util.spec_from_file_location("bi", os.path.join("nto_ext", "_buildinfo.py"))
bi = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bi)
inc = ce.include_paths() + [sysconfig.get_paths()["include"]]
flags = [f"-I{p}" for p in inc] + bi.cuda_args(torch.__version__) + list(ce.COMMON_NVCC_FLAGS)
flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
with open(sys.argv[1], "w") as f:
    f.write("\n".join(flags) + "\n")
print(f"cuda_syntax_check: torch {torch.__version__} (CUDA {torch.version.cuda}), headers "
      f"{inc[0]}")
EOF
mapfile -t FLAGS < "$FLAGS_FILE"
TORCH_INC=${FLAGS[0]#-I}
[ -f "$TORCH_INC/c10/cuda/CUDAStream.h" ] || skip "this torch ships no c10/cuda headers"

# Is nvcc usable at all (host compiler supported, toolkit complete)?
printf '__global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n' > "$TMP/probe.cu"
if ! probe_err=$("$NVCC" -arch="$ARCH" -c "$TMP/probe.cu" -o "$TMP/probe.o" 2>&1); then
  skip "nvcc at $NVCC cannot compile a trivial kernel for $ARCH: $(echo "$probe_err" | head -3)"
fi
echo "cuda_syntax_check: $("$NVCC" --version | tail -2 | head -1), arch $ARCH, mode $MODE, $JOBS jobs"

if [ "$MODE" = full ]; then
  MODE_FLAGS=(-c)
else
  MODE_FLAGS=(--cuda)
  if "$NVCC" --help | grep -q -- '-fdevice-syntax-only'; then MODE_FLAGS+=(-fdevice-syntax-only); fi
fi

check_one() {  # file -> prints "ok <file> <seconds>" or the errors
  local f=$1 out t0 t1
  out="$TMP/$(basename "$f").out"
  t0=$(date +%s)
  # shellcheck disable=SC2086  # NTO_CUDA_EXTRA is split into flags on purpose
  if "$NVCC" "${FLAGS[@]}" -arch="$ARCH" "${MODE_FLAGS[@]}" ${NTO_CUDA_EXTRA:-} "$f" \
       -o "$TMP/$(basename "$f").o" >"$out" 2>&1; then
    t1=$(date +%s)
    echo "ok   $f ($((t1 - t0)) s)"
    grep -E "ptxas info *: (Compiling entry|Used)|spill" "$out" || true
    # torch's headers use C++20 bit-field initializers (warning 3306 / -Wc++20-extensions)
    grep -i "warning" "$out" | grep -v "c++20\|3306\|Wc++20-extensions\|^Remark" | head -5 || true
  else
    echo "FAIL $f"
    cat "$out"
    return 1
  fi
}
export -f check_one
export NVCC ARCH TMP NTO_CUDA_EXTRA
export FLAGS_STR="${FLAGS[*]}" MODE_STR="${MODE_FLAGS[*]}"

# shellcheck disable=SC2086  # a glob
mapfile -t FILES < <(ls ${NTO_CUDA_FILES:-csrc/cuda/*.cu})
[ "${#FILES[@]}" -gt 0 ] || { echo "cuda_syntax_check: no csrc/cuda/*.cu files"; exit 1; }
if [ "$MODE" = unity ]; then
  for f in "${FILES[@]}"; do echo "#include \"$PWD/$f\""; done > "$TMP/all_cuda_ops.cu"
  echo "cuda_syntax_check: one unit of ${#FILES[@]} files: ${FILES[*]}"
  FILES=("$TMP/all_cuda_ops.cu")
fi
start=$(date +%s)
status=0
# Each job re-splits the exported flag strings (no flag contains spaces: checked below).
for fl in "${FLAGS[@]}"; do
  case $fl in *" "*) echo "cuda_syntax_check: flag with a space: $fl"; exit 1 ;; esac
done
printf '%s\n' "${FILES[@]}" | xargs -P "$JOBS" -I{} bash -c \
  'FLAGS=($FLAGS_STR); MODE_FLAGS=($MODE_STR); check_one "$1"' _ {} || status=1
echo "cuda_syntax_check: ${#FILES[@]} unit(s), $(( $(date +%s) - start )) s, $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
