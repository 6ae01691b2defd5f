"""The ``triton`` backend: the functions of :mod:`tome_kernels.triton`, imported on first use (importing
Triton takes a while, and it may be missing)."""

from __future__ import annotations

import functools
import importlib
import os

import torch

from ._backend import Backend


@functools.cache
def _kernels():
    return importlib.import_module("tome_kernels.triton")


class TritonBackend(Backend):
    """CUDA tensors; CPU tensors only under the Triton interpreter, when chosen by name (not by ``auto``)."""

    name, devices, priority = "triton", ("cuda",), 30

    def unavailable_reason(self, device_type):
        try:
            _kernels()
        except ImportError as error:
            return f"the Triton kernels are not importable ({error}); pip install triton"
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return ("Triton runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before "
                    "importing tome_kernels")
        if device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device here (torch.cuda.is_available() is False)"
        if device_type not in ("cpu", "cuda"):
            return f"no Triton path for {device_type} tensors"
        return None

    def match(self, metric, r, protected):
        return _kernels().match(metric, r, protected)

    def window_match(self, metric, windows, r):
        return _kernels().window_match(metric, windows, r)

    def merge(self, x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mean):
        return _kernels().merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mean)

    def merge_backward(self, grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected, pos_mean):
        return _kernels().merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected,
                                         pos_mean)

    def unmerge(self, y, unm_idx, src_idx, dst_idx, protected):
        return _kernels().unmerge(y, unm_idx, src_idx, dst_idx, protected)

    def unmerge_backward(self, grad, unm_idx, src_idx, dst_idx, protected):
        return _kernels().unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected)

    def attention(self, q, k, v, size, scale):
        return _kernels().attention(q, k, v, size, scale)

    def attention_backward(self, grad_out, q, k, v, size, out, lse, scale):
        return _kernels().attention_backward(grad_out, q, k, v, size, out, lse, scale)
