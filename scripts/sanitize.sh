#!/usr/bin/env bash
# ASan + UBSan run of the C++ CPU kernels (docs/RELIABILITY.md): builds a sanitized CPU-only copy of the
# tree in a temporary directory (the in-place tome_kernels/_C*.so is left alone) and runs the cpu-backend
# tests on it with the ASan runtime preloaded (python itself is not instrumented). Exits nonzero on any
# sanitizer report or test failure. About 5 minutes on 2 cores (3.5 build, 1.5 tests).
#
#   bash scripts/sanitize.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d -t tome_sanitize.XXXXXX)
trap 'rm -rf "$work"' EXIT

git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work"
cd "$work"
TOME_SANITIZE=1 TOME_BUILD_CUDA=0 python setup.py -q build_ext --inplace > build.log 2>&1 || { cat build.log; exit 1; }

log="$work/sanitize.log"
status=0
# detect_leaks=0: CPython and torch keep allocations alive at exit by design. halt_on_error: the first
# report fails the run (UBSan is built with -fno-sanitize-recover, so it aborts too).
# libstdc++ too: python does not link it, and ASan's __cxa_throw interceptor must find the real one at startup
# (else "CHECK failed: real___cxa_throw != 0" on the first C++ exception).
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
TOME_FUZZ_EXAMPLES=50 TOME_BACKEND=cpu PYTHONPATH="$work" \
    python -m pytest -q -p no:cacheprovider python_tests/test_ops.py python_tests/test_cpu_backend.py \
        python_tests/test_hostile.py python_tests/test_fuzz.py python_tests/test_determinism.py \
        -k "not triton and not compile" "$@" 2>&1 | tee "$log" || status=$?

if grep -qE "ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer" "$log"; then
    echo "sanitize.sh: sanitizer report(s) above" >&2
    exit 1
fi
exit "$status"
