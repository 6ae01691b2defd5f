"""Builds tome_kernels._C: csrc/cpu (always) and csrc/cuda (when torch has CUDA and nvcc is found).

    pip install torch==2.14.1 setuptools ninja && pip install --no-build-isolation -e .

Environment:
    TOME_BUILD_CUDA=0|1  skip / require the CUDA sources (default: build them when possible)
    TOME_SANITIZE=1      ASan + UBSan build of the C++ sources (see docs/RELIABILITY.md)
    TOME_CUDA_WERROR=1   nvcc warnings are errors (.ci/build_cuda.sh; see docs/CUDA.md)
    TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100, H100) when no GPU is visible
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # nvcc on PATH may be a symlink outside the toolkit
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
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
                             extra_compile_args={"cxx": cxx + ["-DTOME_WITH_CUDA"], "nvcc": nvcc},
                             extra_link_args=link)
    return CppExtension("tome_kernels._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    name="tome_kernels",
    version="0.1.0",
    description="Token Merging (ToMe) as fused Triton, C++ and CUDA torch.ops",
    packages=find_packages(include=["tome_kernels", "tome_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.8"],
        "timm": ["timm>=1.0", "torchvision"],
        "detr": ["transformers>=5.0", "timm>=1.0"],
        "vis": ["scikit-image", "matplotlib", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "ninja", "pybind11"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
