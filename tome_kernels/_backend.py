"""Backends: the interface a backend implements, the registry, and the choice (``set_backend`` /
``use_backend`` / env ``TOME_BACKEND``).

A backend is a :class:`Backend`: it declares its name, the device types ``auto`` may pick it for, a priority
(``auto`` tries higher first), why it cannot run on a device type (or None), which value checks it performs
itself, and implements the eight kernel-level functions (the signatures of :mod:`tome_kernels.reference`,
the spec). The ops (:mod:`tome_kernels._ops`) have validated every argument and handled r = 0 and empty
batches before they call a backend, so a backend may assume r >= 1 and batch >= 1. Adding one: a file
with a subclass, and one ``register_backend`` line (tome_kernels/__init__.py for the built-ins).

The choice: ``use_backend(name)`` holds for the calling thread (or asyncio task) until its block ends,
whatever other threads do (a ``contextvars.ContextVar``); ``set_backend(name)`` sets the process default,
the choice of every thread outside a ``use_backend`` block. The ops resolve the backend when they run, so a
choice made after ``torch.compile`` still takes effect.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import functools
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

ANY_DEVICE = "*"


class Backend(abc.ABC):
    """The kernel-level functions of one implementation of the tome ops.

    Sizes come as [batch, N] (or None) and go out as [batch, N - r]; ``pos_mean`` selects the size-weighted
    pos (else a merged token keeps its B destination's); every output is a fresh contiguous tensor.
    """

    name: str
    devices: tuple[str, ...] = ()  # device types ``auto`` may pick it for (ANY_DEVICE: all)
    priority: int = 0  # ``auto`` tries higher first
    checked_values: frozenset[str] = frozenset()  # "indices", "sizes": values of CPU tensors it checks itself

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        """Why this backend cannot run on ``device_type`` tensors here, or None if it can."""
        return None

    @abc.abstractmethod
    def match(self, metric: Tensor, r: int, protected: int) -> tuple[Tensor, Tensor, Tensor]:
        """(unm_idx, src_idx, dst_idx): ``reference.match``."""

    @abc.abstractmethod
    def window_match(self, metric: Tensor, windows: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
        """(unm_idx, src_idx, dst_idx): ``reference.window_match``."""

    @abc.abstractmethod
    def merge(self, x, pos, size, unm_idx, src_idx, dst_idx, protected: int, pos_mean: bool):
        """(x_out, pos_out (empty without pos), size_out [batch, N - r]): ``reference.merge``."""

    @abc.abstractmethod
    def merge_backward(self, grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected: int,
                       pos_mean: bool):
        """(grad_x, grad_pos or None): ``reference.merge_backward``."""

    @abc.abstractmethod
    def unmerge(self, y, unm_idx, src_idx, dst_idx, protected: int) -> Tensor:
        """``reference.unmerge``."""

    @abc.abstractmethod
    def unmerge_backward(self, grad, unm_idx, src_idx, dst_idx, protected: int) -> Tensor:
        """``reference.unmerge_backward``."""

    @abc.abstractmethod
    def attention(self, q, k, v, size, scale: float) -> tuple[Tensor, Tensor]:
        """(out, lse): ``reference.attention``."""

    @abc.abstractmethod
    def attention_backward(self, grad_out, q, k, v, size, out, lse, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """(grad_q, grad_k, grad_v): ``reference.attention_backward``."""

    def bipartite_merge(self, x, pos, size, metric, r: int, protected: int, pos_mean: bool):
        """match then merge: (x_out, pos_out, size_out, unm_idx, src_idx, dst_idx). Override to fuse them."""
        unm_idx, src_idx, dst_idx = self.match(metric, r, protected)
        return (*self.merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mean), unm_idx, src_idx, dst_idx)

    def __repr__(self) -> str:
        return f"<tome backend {self.name!r}>"


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------
_registry: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` choosable by its name and, on its ``devices``, by ``auto`` (by priority)."""
    if backend.name == "auto" or backend.name in _registry:
        raise ValueError(f"tome: a backend named {backend.name!r} is already registered")
    _registry[backend.name] = backend
    _clear_caches()
    return backend


def unregister_backend(name: str) -> None:
    _registry.pop(name)
    _clear_caches()


def backend_names() -> tuple[str, ...]:
    """``auto`` and every registered backend, highest priority first."""
    return ("auto",) + tuple(b.name for b in sorted(_registry.values(), key=lambda b: -b.priority))


def _check_name(name: str) -> None:
    if name not in backend_names():
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")


def unavailable_reason(name: str, device_type: str) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device_type`` tensors, or None if it can."""
    _check_name(name)
    return _registry[name].unavailable_reason(device_type)


def available_backends(device_type: str = "cpu") -> dict[str, Optional[str]]:
    """``{name: None if usable else the reason}`` for every registered backend on ``device_type``."""
    return {name: unavailable_reason(name, device_type) for name in backend_names()[1:]}


def _clear_caches() -> None:
    _auto.cache_clear()
    _reason.cache_clear()


@functools.cache  # availability does not change while a process runs, and resolve asks on every op call
def _reason(name: str, device_type: str) -> Optional[str]:
    return _registry[name].unavailable_reason(device_type)


@functools.cache
def _auto(device_type: str) -> Backend:
    for name in backend_names()[1:]:
        backend = _registry[name]
        if (device_type in backend.devices or ANY_DEVICE in backend.devices) and \
                backend.unavailable_reason(device_type) is None:
            return backend
    raise RuntimeError(f"tome_kernels: no backend can run on {device_type} tensors")


# ----------------------------------------------------------------------------------------------------
# Choice: a process default, and a per-thread / per-task override
# ----------------------------------------------------------------------------------------------------
_default = "auto"
_scoped: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("tome_backend", default=None)


def set_backend(name: str) -> None:
    """Choose the process default (``auto`` = best per device): the backend of every thread that is not
    inside a ``use_backend`` block."""
    global _default
    _check_name(name)
    _default = name


def get_backend() -> str:
    """The backend the calling thread's ops use: its innermost ``use_backend``, else the process default."""
    scoped = _scoped.get()
    return _default if scoped is None else scoped


@contextlib.contextmanager
def use_backend(name: str):
    """Use backend ``name`` in this block, in the calling thread (or asyncio task) only; blocks nest."""
    _check_name(name)
    token = _scoped.set(name)
    try:
        yield
    finally:
        _scoped.reset(token)


def set_default_from_env() -> None:
    """The process default from ``TOME_BACKEND`` (once every built-in backend is registered)."""
    name = os.environ.get("TOME_BACKEND", "auto")
    if name not in backend_names():
        raise ValueError(f"TOME_BACKEND={name!r} is not one of {backend_names()}")
    set_backend(name)


_warned_fallback = False


def resolve(device: torch.device) -> Backend:
    """The backend for tensors on ``device`` under the calling thread's choice."""
    global _warned_fallback
    name = get_backend()
    if name == "auto":
        backend = _auto(device.type)
        if backend.name == "torch" and device.type in ("cpu", "cuda") and not _warned_fallback:
            _warned_fallback = True
            reasons = {b.name: b.unavailable_reason(device.type) for b in _registry.values()
                       if device.type in b.devices}
            warnings.warn(f"tome_kernels: no compiled backend for {device.type} tensors, using the torch "
                          f"reference ({reasons})", stacklevel=3)
        return backend
    reason = _reason(name, device.type)
    if reason is not None:
        raise RuntimeError(f"tome_kernels backend {name!r} cannot run on {device.type} tensors: {reason}")
    return _registry[name]
