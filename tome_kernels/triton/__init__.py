"""The ``triton`` backend: the kernel-level functions of :mod:`tome_kernels.reference`, as Triton kernels.

Launches per call (all deterministic, no float atomics):

=====================  ========  ==========================================================
function               launches  kernels
=====================  ========  ==========================================================
match                  2         ``_match_fwd_kernel``, ``_match_rank_kernel``
window_match           2         ``_window_match_fwd_kernel``, ``_match_rank_kernel``
merge                  1         ``_merge_fwd_kernel`` (x, pos and size together)
merge_backward         1         ``_merge_bwd_kernel``
unmerge                1         ``_merge_bwd_kernel`` (SCALE=False: a pure spread)
unmerge_backward       1         ``_merge_fwd_kernel`` (MEAN=False: a pure gather-sum)
attention              1         ``_attn_fwd_kernel``
attention_backward     2         ``_attn_bwd_preprocess_kernel``, ``_attn_bwd_kernel``
=====================  ========  ==========================================================

A ToMe layer (match + merge of x, pos, size) is 3 launches. On CPU tensors this runs only under the Triton
interpreter (``TRITON_INTERPRET=1`` before import). float64 CUDA tensors and the attention shapes listed in
:mod:`._attention` run the reference instead (the AOT-checked kernels cover fp16/bf16/fp32).
"""

from __future__ import annotations

from .. import reference
from ._common import runs_kernels
from . import _match, _merge
from ._attention import attention, attention_backward

__all__ = ["match", "window_match", "merge", "merge_backward", "unmerge", "unmerge_backward", "attention", "attention_backward"]


def match(metric, r: int, protected: int):
    if not runs_kernels(metric):
        return reference.match(metric, r, protected)
    return _match.match(metric, r, protected)


def window_match(metric, windows, r: int):
    if not runs_kernels(metric):
        return reference.window_match(metric, windows, r)
    return _match.window_match(metric, windows, r)


def merge(x, pos, size, unm_idx, src_idx, dst_idx, protected: int, pos_mean: bool):
    if not runs_kernels(x, pos, size):
        return reference.merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mean)
    return _merge.merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mean)


def merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected: int, pos_mean: bool):
    if not runs_kernels(grad_x, grad_pos, size, size_out):
        return reference.merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected,
                                        pos_mean)
    return _merge.merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected, pos_mean)


def unmerge(y, unm_idx, src_idx, dst_idx, protected: int):
    if not runs_kernels(y):
        return reference.unmerge(y, unm_idx, src_idx, dst_idx, protected)
    return _merge.unmerge(y, unm_idx, src_idx, dst_idx, protected)


def unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected: int):
    if not runs_kernels(grad):
        return reference.unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected)
    return _merge.unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected)
