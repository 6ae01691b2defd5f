"""The C++ backends (``cpu``: csrc/cpu, ``cuda``: csrc/cuda): one set of ``tome::_native_*`` schemas
(defined in :mod:`tome_kernels._ops`), implemented per dispatch key by the extension ``tome_kernels._C``."""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers the CPU / CUDA kernels)

    load_error: str | None = None
except ImportError as error:
    load_error = str(error)

_native = torch.ops.tome

# The CPU kernels validate index and size values themselves (csrc/cpu/common.h: Groups, check_size_values)
# with the ValueErrors of _ops, in the pass that reads them anyway.
CHECKS_CPU_VALUES = True


def match(metric, r, protected):
    return tuple(_native._native_match(metric, r, protected))


def bipartite_merge(x, pos, size, metric, r, protected, pos_mean):
    return tuple(_native._native_bipartite_merge(x, pos, size, metric, r, protected, pos_mean))


def merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mean):
    return tuple(_native._native_merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mean))


def merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected, pos_mean):
    grad_x_in, grad_pos_in = _native._native_merge_backward(grad_x, grad_pos, size, size_out, unm_idx,
                                                            src_idx, dst_idx, protected, pos_mean)
    return grad_x_in, (grad_pos_in if grad_pos is not None else None)


def unmerge(y, unm_idx, src_idx, dst_idx, protected):
    return _native._native_unmerge(y, unm_idx, src_idx, dst_idx, protected)


def unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected):
    return _native._native_unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected)


def attention(q, k, v, size, scale):
    return tuple(_native._native_attention(q, k, v, size, scale))


def attention_backward(grad_out, q, k, v, size, out, lse, scale):
    return tuple(_native._native_attention_backward(grad_out, q, k, v, size, out, lse, scale))
