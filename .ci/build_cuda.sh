#!/usr/bin/env bash
# Builds tome_kernels._C with the CUDA kernels for sm_80 and sm_90 SASS plus compute_90 PTX (which GPUs
# newer than sm_90 compile when the library loads; no GPU needed), in place, in build/ (a fresh clone
# builds from scratch, so every diagnostic shows).
# Fails on a build error, on any warning not matched by ACCEPTED below, on a missing SASS arch or PTX, or
# when a tome::_native_* op has no CUDA kernel after the build. nvcc runs with -Werror all-warnings
# (TOME_CUDA_WERROR=1). Set MAX_JOBS to limit parallel compiles (nvcc takes ~1-2 min per file and arch).
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" TOME_BUILD_CUDA=1 TOME_CUDA_WERROR=1
# Compiler and Python diagnostics ("warning:", "nvcc warning :", "UserWarning:"), not "-Werror all-warnings".
DIAGNOSTIC='(^|[^-])warning ?:'
# Diagnostics accepted on purpose, one regex per alternative: none so far.
ACCEPTED='^$'

log="$(mktemp)"
start=$SECONDS
python setup.py build_ext --inplace 2>&1 | tee "$log"
echo "build: $((SECONDS - start)) s, log $log"

if grep -iE "$DIAGNOSTIC" "$log" | grep -vE "$ACCEPTED"; then
  echo "FAIL: the warnings above are not accepted (.ci/build_cuda.sh ACCEPTED)" >&2
  exit 1
fi

so="$(ls tome_kernels/_C*.so)"
cuobjdump="$(command -v cuobjdump || true)"
[ -n "$cuobjdump" ] || [ ! -x "$CUDA_HOME/bin/cuobjdump" ] || cuobjdump="$CUDA_HOME/bin/cuobjdump"
if [ -z "$cuobjdump" ]; then  # triton wheels ship one
  cuobjdump="$(python -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__),
                                                               "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"
fi
if [ -x "$cuobjdump" ]; then
  archs="$("$cuobjdump" --list-elf "$so" | grep -oE 'sm_[0-9]+[a-z]?' | sort | uniq -c)"
  echo "SASS in $so (ELF count per arch):"
  echo "$archs"
  for arch in sm_80 sm_90; do
    grep -qw "$arch" <<<"$archs" || { echo "FAIL: no $arch SASS in $so" >&2; exit 1; }
  done
  # cuobjdump names each PTX by its virtual arch: "PTX file 1: attention.sm_90.ptx" is compute_90.
  ptx="$("$cuobjdump" --list-ptx "$so")"
  echo "PTX in $so:"
  echo "$ptx"
  grep -qE '\.(sm|compute)_90\.ptx$' <<<"$ptx" || { echo "FAIL: no compute_90 PTX in $so" >&2; exit 1; }
else
  echo "cuobjdump not found: SASS archs and PTX not listed"
fi

python -m pytest -q -p no:cacheprovider python_tests/test_cuda_backend.py -k registered
