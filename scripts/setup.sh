#!/usr/bin/env bash
# Installs the pinned environment and builds tome_kernels._C in place: the C++ CPU kernels, plus the CUDA
# kernels for sm_80/sm_90 when torch has CUDA and nvcc is found (TOME_BUILD_CUDA=0 skips them). Idempotent:
# a second run only re-checks. To install as a package instead: pip install --no-build-isolation -e .
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -r requirements.txt
python setup.py -q build_ext --inplace
