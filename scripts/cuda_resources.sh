#!/usr/bin/env bash
# ptxas resource usage of the CUDA backend (csrc/cuda/*.cu) for the archs of python -m tome_kernels.aot, no
# GPU needed: one `nvcc -c -Xptxas -v` per file with every arch, the logs concatenated into LOG, which
#   python -m tome_kernels.aot --write-table docs/KERNELS.md --cuda-log LOG
# turns into the CUDA rows of the resource table. Slow: ~1.5 CPU-minutes per file (all six archs).
#   bash scripts/cuda_resources.sh [LOG]     (default cuda_resources.log)
set -euo pipefail
cd "$(dirname "$0")/.."
log="${1:-cuda_resources.log}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
python - "$log" <<'EOF'
import concurrent.futures, glob, os, subprocess, sys, tempfile

import torch
import torch.utils.cpp_extension as cpp

from tome_kernels.triton._common import SHARED_MEMORY_PER_BLOCK

nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
includes = [*cpp.include_paths(device_type="cuda"), "csrc/include",
            *glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include"))]
gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in SHARED_MEMORY_PER_BLOCK]


def compile_log(source):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", source, "-o", os.path.join(tmp, "k.o"), "-std=c++20", "-O3", "--expt-relaxed-constexpr",
               *cpp.COMMON_NVCC_FLAGS, "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
               "-Xptxas", "-v", *gencode, *(f"-I{i}" for i in includes)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"nvcc failed on {source}:\n{done.stderr[-4000:]}")
    return done.stderr  # ptxas -v reports on stderr


sources = sorted(glob.glob("csrc/cuda/*.cu"))
with concurrent.futures.ThreadPoolExecutor(max_workers=int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))) as pool:
    logs = list(pool.map(compile_log, sources))
with open(sys.argv[1], "w") as f:
    f.write("".join(logs))
print(f"cuda_resources: ptxas -v of {len(sources)} files for sm_{'/sm_'.join(map(str, SHARED_MEMORY_PER_BLOCK))}"
      f" in {sys.argv[1]}")
EOF
