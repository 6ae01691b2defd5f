"""Compiles the extension tome_kernels._C; the package metadata and extras live in pyproject.toml.

_C holds the C++ CPU kernels of csrc/cpu (always) and the CUDA kernels of csrc/cuda (when torch has CUDA
and nvcc is found). Install torch first, then build against it without build isolation:

    pip install torch==2.14.1 setuptools ninja && pip install --no-build-isolation -e .

(or `python setup.py build_ext --inplace` for an in-place build without installing).

Environment:
    TOME_BUILD_CUDA=0|1  skip / require the CUDA sources (default: build them when possible)
    TOME_SANITIZE=1      ASan + UBSan build of the C++ sources (see docs/RELIABILITY.md)
    TOME_CUDA_WERROR=1   nvcc warnings are errors (.ci/build_cuda.sh; see docs/CUDA.md)
    TOME_BUILD_EXTENSION=0  install the Python package only, next to a _C built in place before
                         (scripts/setup.sh: an editable install compiles from scratch in a temporary
                         directory, the in-place build only what changed)
    TORCH_CUDA_ARCH_LIST when unset: the visible GPUs' archs if torch sees a GPU, else "8.0;9.0+PTX"
                         (sm_80 and sm_90 SASS plus compute_90 PTX, which newer GPUs compile at load time)
"""

import glob
import os
import shutil

from setuptools import setup

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # nvcc on PATH may be a symlink outside the toolkit

import torch  # noqa: E402

if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
    # Without a visible GPU cpp_extension has no arch to pick. The PTX lets GPUs newer than sm_90 run.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("TOME_BUILD_CUDA")
    possible = torch.version.cuda is not None and CUDA_HOME is not None and shutil.which(
        os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    if flag == "1" and not possible:
        raise RuntimeError("TOME_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found (set CUDA_HOME)")
    return possible and flag != "0"


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    link = ["-fopenmp"]
    if os.environ.get("TOME_SANITIZE") == "1":
        # -fno-wrapv: Python's CFLAGS add -fwrapv, which defines signed overflow and so hides it from UBSan.
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined",
                    "-fno-wrapv"]
        cxx = [f for f in cxx if f not in ("-O3", "-g0")] + ["-O1", "-g"] + sanitize
        link += sanitize
    if _want_cuda():
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xcompiler", "-fopenmp"]
        if os.environ.get("TOME_CUDA_WERROR") == "1":  # .ci/build_cuda.sh: the CUDA sources build warning-free
            nvcc += ["-Werror", "all-warnings"]
        return CUDAExtension("tome_kernels._C", sources + cuda_sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                             extra_link_args=link)
    return CppExtension("tome_kernels._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    ext_modules=[] if os.environ.get("TOME_BUILD_EXTENSION") == "0" else [_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
