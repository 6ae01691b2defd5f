#!/usr/bin/env bash
# Installs the pinned environment, builds tome_kernels._C in place (the C++ CPU kernels, plus the CUDA
# kernels when torch has CUDA and nvcc is found; TOME_BUILD_CUDA=0 skips them; archs: setup.py), and
# installs this checkout as an editable package, so that `import tome_kernels` works from any directory.
# Idempotent: a second run re-checks the requirements and recompiles only what changed (the in-place build
# is incremental; the editable install, which would compile from scratch, runs only when this checkout is
# not yet the one Python imports).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -r requirements.txt
python setup.py -q build_ext --inplace
package="$PWD/tome_kernels"
if ! (cd / && python -c 'import os, sys, tome_kernels
sys.exit(os.path.realpath(tome_kernels.__path__[0]) != os.path.realpath(sys.argv[1]))' "$package") 2>/dev/null; then
  TOME_BUILD_EXTENSION=0 python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
fi
