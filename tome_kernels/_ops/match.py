"""``tome::bipartite_match``: each A (even) token's most similar B (odd) token; the r best pairs merge.
``tome::window_match``: the same within the windows of a table (each A token's best B in its window)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from .. import layout
from .._backend import resolve
from .._validation import check_float, check_r, check_same_device, check_window_values, check_windows


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


def check_window_match(metric: Tensor, windows: Tensor, r: int) -> None:
    check_float("metric", metric, 3)
    check_windows(windows, metric.shape[1])
    check_same_device(metric=metric, windows=windows)
    check_r(r, metric.shape[1], 0)


@custom_op("tome::window_match", mutates_args=())
def window_match(metric: Tensor, windows: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """Bipartite matching within windows: ``windows [W, S]`` (int64, S even) lists per window A (even)
    positions in its even slots and B (odd) positions in its odd slots, each A position at most once. Each
    listed A token's best B is the most similar B of its window (cosine, first on ties); the listed A tokens
    are ranked over the whole row (best score descending, ties to the lower position) and the first r merge
    (r clamped to W * S / 2). Unlisted A tokens never merge.

    Returns ``(unm_idx [B, nA - r], src_idx [B, r], dst_idx [B, r])`` for ``merge`` / ``unmerge`` with
    protected = 0; ``unm_idx`` is in ascending position. Equivalent PyTorch: ``reference.window_match``.
    """
    check_window_match(metric, windows, r)
    num_tokens = metric.shape[1]
    r = layout.window_r(r, num_tokens, windows.shape)
    backend = resolve(metric.device) if reaches_backend(metric.shape[0], r) else None
    check_window_values(backend, num_tokens, windows)
    if backend is None:
        return identity_match(metric, r, 0)
    return backend.window_match(metric, windows.contiguous(), r)


@window_match.register_fake
def _(metric, windows, r):
    check_window_match(metric, windows, r)
    batch, num_tokens, _ = metric.shape
    r = layout.window_r(r, num_tokens, windows.shape)
    new = metric.new_empty
    return (new(batch, layout.num_a(num_tokens, 0) - r, dtype=torch.long), new(batch, r, dtype=torch.long),
            new(batch, r, dtype=torch.long))
