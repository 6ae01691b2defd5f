"""Backend choice: ``set_backend`` / ``use_backend`` / env ``TOME_BACKEND``; ``auto`` picks per device.

A backend is a module with the kernel-level functions of :mod:`tome_kernels.reference` (``match``,
``merge``, ``merge_backward``, ``unmerge``, ``unmerge_backward``, ``attention``, ``attention_backward``).
The public ``torch.ops.tome.*`` ops resolve the backend when they run, so a choice made after
``torch.compile`` still takes effect.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

_chosen = os.environ.get("TOME_BACKEND", "auto")
if _chosen not in BACKENDS:
    raise ValueError(f"TOME_BACKEND={_chosen!r} is not one of {BACKENDS}")


@functools.cache  # the extension loads (or fails to) once per process
def _native_reason(dispatch_key: str) -> str | None:
    from . import _native

    if _native.load_error is not None:
        return f"the C++ extension tome_kernels._C is not built ({_native.load_error}); run `pip install --no-build-isolation -e .`"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("tome::_native_match", dispatch_key):
        return f"tome_kernels._C was built without {dispatch_key} kernels (build with CUDA_HOME set and torch with CUDA)"
    return None


def _triton_reason(device_type: str) -> str | None:
    try:
        importlib.import_module("tome_kernels.triton")
    except ImportError as error:
        return f"the Triton kernels are not importable ({error}); pip install triton"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before importing tome_kernels"
    if device_type not in ("cpu", "cuda"):
        return f"no Triton path for {device_type} tensors"
    return None


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot run on ``device_type`` tensors, or None if it can."""
    if name == "torch":
        return None
    if name == "cpu":
        return "the cpu backend takes CPU tensors" if device_type != "cpu" else _native_reason("CPU")
    if name == "cuda":
        return "the cuda backend takes CUDA tensors" if device_type != "cuda" else _native_reason("CUDA")
    if name == "triton":
        return _triton_reason(device_type)
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def available_backends(device_type: str = "cpu") -> dict[str, str | None]:
    """``{name: None if usable else the reason}`` for every concrete backend on ``device_type``."""
    return {name: unavailable_reason(name, device_type) for name in BACKENDS[1:]}


def set_backend(name: str) -> None:
    """Choose the backend for the whole process (``auto`` = best per device)."""
    global _chosen
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _chosen = name


def get_backend() -> str:
    return _chosen


@contextlib.contextmanager
def use_backend(name: str):
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@functools.cache
def _auto(device_type: str) -> str:
    order = ("triton", "cuda", "torch") if device_type == "cuda" else ("cpu", "torch")
    for name in order:
        if unavailable_reason(name, device_type) is None:
            return name
    return "torch"


def _module(name: str) -> ModuleType:
    if name == "torch":
        from . import reference

        return reference
    if name == "triton":
        from . import triton as triton_backend

        return triton_backend
    from . import _native

    return _native


_warned_fallback = False


def resolve(device: torch.device) -> ModuleType:
    """The backend module for tensors on ``device`` under the current choice."""
    global _warned_fallback
    name = get_backend()
    if name == "auto":
        name = _auto(device.type)
        if name == "torch" and device.type in ("cpu", "cuda") and not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"tome_kernels: no compiled backend for {device.type} tensors, using the torch "
                          f"reference ({unavailable_reason('cpu' if device.type == 'cpu' else 'cuda', device.type)})",
                          stacklevel=3)
        return _module(name)
    reason = unavailable_reason(name, device.type)
    if reason is not None:
        raise RuntimeError(f"tome_kernels backend {name!r} cannot run on {device.type} tensors: {reason}")
    return _module(name)
