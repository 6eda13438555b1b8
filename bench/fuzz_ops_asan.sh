#!/usr/bin/env bash
# Run the kernel fuzz target (tests/test_fuzz_ops.py) under AddressSanitizer.
#
# 1. Builds a separate, ASan-instrumented copy of the CPU kernels (csrc/ops.cpp +
#    csrc/cpu/*.cpp, the sources of nto_ext._C) in $NTO_ASAN_DIR (default /tmp/nto_asan)
#    with torch.utils.cpp_extension.load and -fsanitize=address. The installed nto_ext._C
#    is not touched and not loaded in the fuzz run.
# 2. Runs the fuzz tests with libasan preloaded (python itself is not instrumented) and
#    NTO_FUZZ_LIB pointing at the ASan library: tests/test_fuzz_ops.py then loads that
#    library instead of nto_ext._C and every torch.ops.nto.* call runs instrumented code.
#    NTO_FUZZ_EXAMPLES sets hypothesis' max_examples per fuzz test (default 2000).
#
# Usage (from the repository root, venv active):  bash bench/fuzz_ops_asan.sh
# Any ASan report aborts the run with a non-zero exit status and a stack trace.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${NTO_ASAN_DIR:-/tmp/nto_asan}
export NTO_FUZZ_EXAMPLES=${NTO_FUZZ_EXAMPLES:-2000}
# libstdc++ is preloaded too: python does not link it, and without it ASan's __cxa_throw
# interceptor finds no real __cxa_throw and aborts on the first C++ exception (every
# refused argument is one).
PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
# Leak checking is off: CPython and torch keep allocations alive until exit by design.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:halt_on_error=1:print_summary=1}
mkdir -p "$BUILD"

# The build runs with libasan preloaded too: load() imports the library it just built,
# and an ASan library refuses to load into a process whose runtime came without it.
LD_PRELOAD=$PRELOAD python - "$BUILD" <<'EOF'
import glob, sys, time
import torch
from torch.utils.cpp_extension import load
from nto_ext._buildinfo import compile_args

build = sys.argv[1]
sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
flags = [a for a in compile_args(torch.__version__, shell=True) if a != "-O3"]
flags += ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
t = time.time()
load(name="nto_ext_asan", sources=sources, extra_cflags=flags,
     extra_ldflags=["-fsanitize=address", "-fopenmp"], build_directory=build,
     is_python_module=False, verbose=False)
print(f"built {build}/nto_ext_asan.so in {time.time() - t:.0f} s")
EOF

# Positive control: an instrumented one-float write past the end of a torch tensor must be
# reported (torch's CPU allocator goes through the malloc ASan intercepts, so every tensor
# the fuzz allocates exactly has redzones). Expect "heap-buffer-overflow" below.
printf 'void write_past_end(float* p, long n) { p[n] = 1.0f; }\n' > "$BUILD/oob.c"
gcc -shared -fPIC -fsanitize=address -g -O1 "$BUILD/oob.c" -o "$BUILD/liboob.so"
if LD_PRELOAD=$PRELOAD ASAN_OPTIONS=detect_leaks=0 python -c "
import ctypes, torch
t = torch.zeros(10)
ctypes.CDLL('$BUILD/liboob.so').write_past_end(ctypes.c_void_p(t.data_ptr()), ctypes.c_long(10))
" 2> "$BUILD/control.log"; then
  echo "ASan control: the out-of-bounds write was NOT reported; ASan is not active" >&2
  exit 1
fi
grep -m1 "heap-buffer-overflow" "$BUILD/control.log" | sed 's/^/ASan control: /'

LD_PRELOAD=$PRELOAD NTO_FUZZ_LIB="$BUILD/nto_ext_asan.so" \
  python -m pytest -q -p no:cacheprovider -o addopts="" tests/test_fuzz_ops.py "$@"
