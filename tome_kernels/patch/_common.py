"""Helpers shared by the model patches."""

from __future__ import annotations

import operator

import torch
from torch import nn

import tome_kernels

ATTN_IMPLS = ("auto", "op", "sdpa")


def merge_count(value, what: str) -> int:
    """A number of merges: an int >= 0 (bools refused), else a TypeError / ValueError naming ``what``."""
    if isinstance(value, bool):
        raise TypeError(f"tome: {what} must be an int >= 0, got {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"tome: {what} must be an int >= 0, got {type(value).__name__} {value!r}") from None
    if count < 0:
        raise ValueError(f"tome: {what} must be >= 0, got {count}")
    return count


def resolve_attn_impl(attn_impl: str, model: nn.Module) -> str:
    """How proportional attention runs: ``"op"`` (``torch.ops.tome.prop_attention``) or ``"sdpa"``
    (``F.scaled_dot_product_attention`` with a ``log size`` float mask, the same function).

    ``auto``: ``"op"`` when a backend was chosen by hand, or on a GPU a compiled tome backend (Triton or
    CUDA: the log-size bias fused in the kernel) serves the model; otherwise ``"sdpa"``. On CPU PyTorch's
    flash SDPA with a float bias beats both tome CPU paths (2-core CPU, ViT-B/16 batch 8, 12 layers of
    r = 16, attention summed over the 12 layers: 75 ms vs 90 ms for the C++ kernel; the torch reference's explicit softmax is ~3x slower).
    """
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"tome: attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    if attn_impl != "auto":
        return attn_impl
    if tome_kernels.get_backend() != "auto":
        return "op"  # a backend chosen by hand is meant to run
    device = next(model.parameters(), torch.empty(0)).device
    if device.type != "cuda":
        return "sdpa"
    usable = tome_kernels.available_backends(device.type)
    return "op" if any(usable.get(name) is None for name in ("triton", "cuda")) else "sdpa"
