"""``tome::bipartite_match``: each A (even) token's most similar B (odd) token; the r best pairs merge."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from .. import layout
from .._backend import resolve
from .._validation import check_float, check_r


def check_match(metric: Tensor, r: int, protected: int) -> None:
    check_float("metric", metric, 3)
    check_r(r, metric.shape[1], protected)


def identity_match(metric: Tensor, r: int, protected: int) -> tuple[Tensor, Tensor, Tensor]:
    """The indices when nothing reaches a backend: nothing merges (every A token stays, in ascending
    position), or an empty batch (the shapes of r merges)."""
    batch, num_tokens, _ = metric.shape
    r = layout.clamp_r(r, num_tokens, protected)  # 0 unless the batch is empty
    unm_idx = layout.a_positions(num_tokens, protected, metric.device).expand(batch, -1)
    empty = metric.new_empty(batch, r, dtype=torch.long)
    return unm_idx[:, : unm_idx.shape[1] - r].clone(), empty, empty.clone()


def reaches_backend(batch: int, r: int) -> bool:
    """Whether a call with ``batch`` rows and ``r`` merges (clamped) runs a backend: backends may assume
    r >= 1 and batch >= 1."""
    return batch > 0 and r > 0


@custom_op("tome::bipartite_match", mutates_args=())
def bipartite_match(metric: Tensor, r: int, protected: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Each A (even) token's most similar B (odd) token; the r best pairs merge.

    Returns ``(unm_idx [B, nA - r], src_idx [B, r], dst_idx [B, r])`` (int64 token positions). See
    :mod:`tome_kernels.layout` for the layout; equivalent PyTorch: ``reference.match``.
    """
    check_match(metric, r, protected)
    if not reaches_backend(metric.shape[0], layout.clamp_r(r, metric.shape[1], protected)):
        return identity_match(metric, r, protected)
    return resolve(metric.device).match(metric, r, protected)


@bipartite_match.register_fake
def _(metric, r, protected=0):
    check_match(metric, r, protected)
    batch, num_tokens, _ = metric.shape
    r = layout.clamp_r(r, num_tokens, protected)
    num_unmerged = layout.num_a(num_tokens, protected) - r
    new = metric.new_empty
    return (new(batch, num_unmerged, dtype=torch.long), new(batch, r, dtype=torch.long),
            new(batch, r, dtype=torch.long))
