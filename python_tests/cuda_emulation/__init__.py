"""Runs the csrc/cuda kernels on the CPU: the sources, with a few lines rewritten to use emulation.h, are
compiled as host C++ and registered as ``torch.ops.tome_emu._native_*`` (CPU kernels).

This executes the real kernel code (indexing, tiling, barriers, shuffles, host launch code) where no GPU
exists; it says nothing about speed, and floating-point contraction may differ from nvcc's. See
emulation.h for what it checks beyond the results.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
NAMESPACE = "tome_emu"
BACKEND_NAME = "cuda_emulation"
NATIVE_OPS = ("_native_match", "_native_window_match", "_native_merge", "_native_bipartite_merge",
              "_native_merge_backward", "_native_unmerge", "_native_unmerge_backward", "_native_attention",
              "_native_attention_backward")

# (file pattern, exact text, replacement): each text must occur in every file the pattern names, so a
# change to the CUDA sources that breaks the emulation fails loudly here.
_EDITS = [
    ("common.cuh", "#include <c10/cuda/CUDAException.h>\n#include <c10/cuda/CUDAGuard.h>\n"
                   "#include <c10/cuda/CUDAStream.h>\n", '#include "emulation.h"\n'),
    ("common.cuh", "kernel<<<grid_size(blocks), threads, shared_bytes, at::cuda::getCurrentCUDAStream()>>>(args...);",
     "emu::run(kernel, grid_size(blocks), threads, shared_bytes, args...);"),
    ("common.cuh", "t.is_cuda()", "t.is_cpu()"),
    ("attention.cu", "extern __shared__ __align__(16) unsigned char shared_memory[];",
     "unsigned char* shared_memory = emu::shared_memory();"),
    ("*.cu", "TORCH_LIBRARY_IMPL(tome, CUDA, m)", f"TORCH_LIBRARY_IMPL({NAMESPACE}, CPU, m)"),
    # The device-generic _native_bipartite_merge (match then merge through the dispatcher), on the emulated ops.
    ("bipartite_merge.cpp", '"tome::_native_match"', f'"{NAMESPACE}::_native_match"'),
    ("bipartite_merge.cpp", '"tome::_native_merge"', f'"{NAMESPACE}::_native_merge"'),
    ("bipartite_merge.cpp", "TORCH_LIBRARY_IMPL(tome, CompositeExplicitAutograd, m)",
     f"TORCH_LIBRARY_IMPL({NAMESPACE}, CompositeExplicitAutograd, m)"),
]
# Fresh outputs are poisoned (NaN) so unwritten elements fail the comparisons.
_EMPTY = re.compile(r"\bat::empty(_like)?\(")


def _rewrite(name: str, text: str) -> str:
    for pattern, old, new in _EDITS:
        if pattern == name or (pattern == "*.cu" and name.endswith(".cu")):
            if old not in text:
                raise RuntimeError(f"cuda emulation: {name} no longer contains {old!r}; update {__file__}")
            text = text.replace(old, new)
    return _EMPTY.sub(lambda m: f"emu::empty{m.group(1) or ''}(", text)


def default_build_dir() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    return os.path.join(root, "tome_cuda_emulation")


def build(build_dir: str | os.PathLike | None = None) -> None:
    """Compile (ninja rebuilds only what changed; build times in docs/CUDA.md) and load the emulated
    kernels into ``torch.ops.tome_emu``."""
    build_dir = build_dir or default_build_dir()
    import tome_kernels  # noqa: F401  (defines the tome schemas copied below)
    from torch.utils.cpp_extension import load

    src = pathlib.Path(build_dir) / "src"
    src.mkdir(parents=True, exist_ok=True)
    sources = []
    for path in sorted((ROOT / "csrc" / "cuda").iterdir()) + [ROOT / "csrc" / "bipartite_merge.cpp"]:
        target = src / (path.stem + ".cpp" if path.suffix == ".cu" else path.name)
        text = _rewrite(path.name, path.read_text())
        if not target.exists() or target.read_text() != text:  # keep mtimes, so ninja rebuilds only changes
            target.write_text(text)
        if path.suffix in (".cu", ".cpp"):
            sources.append(str(target))
    schemas = [str(getattr(torch.ops.tome, op).default._schema).replace("tome::", "") for op in NATIVE_OPS]
    registry = src / "schemas.cpp"
    text = "#include <torch/library.h>\n\nTORCH_LIBRARY(%s, m) {\n%s}\n" % (
        NAMESPACE, "".join(f'  m.def("{s}");\n' for s in schemas))
    if not registry.exists() or registry.read_text() != text:
        registry.write_text(text)
    load(name="tome_cuda_emulation", sources=sources + [str(registry)], build_directory=str(build_dir),
         extra_include_paths=[str(ROOT / "csrc" / "include"), str(HERE)], extra_cflags=["-O2", "-g0"],
         is_python_module=False, verbose=False)


def backend():
    """The emulated CUDA kernels as a tome backend, ``cuda_emulation``: CPU tensors, chosen by name only
    (never by ``auto``), registered once. It is the ``cuda`` backend's class on another op namespace, and
    like the ``cuda`` backend it leaves index and size values to the Python layer (which checks them for CPU
    tensors) and device asserts."""
    import tome_kernels
    from tome_kernels._native import NativeBackend

    if BACKEND_NAME not in tome_kernels.backend_names():
        tome_kernels.register_backend(NativeBackend(BACKEND_NAME, "cpu", "CPU", priority=0, namespace=NAMESPACE,
                                                    auto=False))
    return BACKEND_NAME


@contextlib.contextmanager
def routed():
    """Inside, the public tome ops send CPU tensors to the emulated CUDA kernels (calling thread only)."""
    import tome_kernels

    with tome_kernels.use_backend(backend()):
        yield
