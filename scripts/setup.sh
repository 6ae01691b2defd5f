#!/usr/bin/env bash
# Installs the pinned environment and builds tome_kernels in place (C++ CPU kernels, plus CUDA kernels for
# sm_80/sm_90 when nvcc is found). Idempotent: a second run only re-checks. See README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -r requirements.txt
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
