#!/usr/bin/env bash
# Installs the pinned environment, then tome_kernels itself as an editable package (pip install
# --no-build-isolation -e .: `import tome_kernels` works from any directory, and edits to the Python
# sources take effect without reinstalling). The build compiles tome_kernels._C: the C++ CPU kernels,
# plus the CUDA kernels when torch has CUDA and nvcc is found (TOME_BUILD_CUDA=0 skips them; archs: setup.py).
# Idempotent: a second run re-checks the requirements and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -r requirements.txt
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
