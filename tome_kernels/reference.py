"""Plain-PyTorch reference of every tome op: the readable spec, and the ``torch`` backend.

Token layout (:mod:`tome_kernels.layout`): A = non-protected even positions, B = non-protected odd positions,
r clamped to (N - protected) // 2, output = [protected ; unmerged A ; every B], the input unchanged when the
clamped r is 0.

Index tensors (int64, absolute token positions in the input):

* ``unm_idx [batch, nA - r]``: the unmerged A tokens, in output order (ascending position when
  ``protected >= 1``, descending best score when ``protected == 0``, as in the original ToMe; ascending
  when the clamped r is 0, so that every op then returns its input unchanged).
* ``src_idx [batch, r]``: the A tokens that merge, in descending best-score order.
* ``dst_idx [batch, r]``: the B token each source merges into.

Everything below is expressed with the layout's two maps, ``rep`` (the input position representing each
output token) and ``group`` (the output token of each input token).

Windowed matching (``window_match``): a table ``windows [W, S]`` (S even) lists, per window, A positions in
its even slots and B positions in its odd slots (each A position in at most one window); each listed A token
finds its best B among its window's B slots, the listed A tokens are ranked over the whole row as above, and
the best r merge (unlisted A tokens never do). ``unm_idx`` is then always in ascending position.

Matching: cosine similarity of the L2-normalised metric; a zero metric vector normalises to zero (it
scores 0 against every token, never NaN). Ties are broken towards the lower position: the first best B
partner, and among equal best scores the lower A position ranks first.
"""

from __future__ import annotations

import torch

from ._backend import ANY_DEVICE, Backend
from ._validation import accumulate_dtype as _accumulate_dtype

# The layout is part of the spec: these names are also read as ``reference.<name>`` by the kernels' tests.
from .layout import (a_positions, b_positions, clamp_r, first_a, first_b, groups, num_a, num_b,  # noqa: F401
                     representatives, window_r)

NORM_EPS = 1e-12  # as torch.nn.functional.normalize: x / max(||x||, eps)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ----------------------------------------------------------------------------------------------------
# Ops (kernel-level signatures: size is [batch, N] or None, already validated)
# ----------------------------------------------------------------------------------------------------
def match(metric: torch.Tensor, r: int, protected: int):
    """Bipartite soft matching. Returns ``(unm_idx, src_idx, dst_idx)``."""
    batch, num_tokens, _ = metric.shape
    r = clamp_r(r, num_tokens, protected)
    metric = metric.to(_accumulate_dtype(metric.dtype))
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    a_pos = a_positions(num_tokens, protected, metric.device)
    b_pos = b_positions(num_tokens, protected, metric.device)
    scores = metric[:, a_pos] @ metric[:, b_pos].transpose(1, 2)  # [batch, nA, nB]
    if b_pos.numel() > 0:
        best_score, best_b = scores.max(dim=-1)  # first maximum on ties
    else:
        best_score = scores.new_zeros(batch, a_pos.numel())
        best_b = torch.zeros(batch, a_pos.numel(), dtype=torch.long, device=metric.device)
    rank = torch.sort(best_score, dim=-1, descending=True, stable=True).indices
    src_rank, unm_rank = rank[:, :r], rank[:, r:]
    if protected >= 1 or r == 0:
        unm_rank = unm_rank.sort(dim=-1).values
    src_idx = a_pos[src_rank]
    dst_idx = b_pos[best_b.gather(1, src_rank)]
    return a_pos[unm_rank], src_idx, dst_idx


def _unmerged_in_order(src_idx, num_tokens: int):
    """Every A position (protected = 0) not in ``src_idx``, ascending: ``[batch, nA - r]``."""
    batch, r = src_idx.shape
    count = num_a(num_tokens, 0)
    merged = torch.zeros(batch, count, dtype=torch.uint8, device=src_idx.device).scatter(1, src_idx // 2, 1)
    return torch.sort(merged, dim=1, stable=True).indices[:, : count - r] * 2


def window_match(metric: torch.Tensor, windows: torch.Tensor, r: int):
    """Bipartite soft matching within windows (see the module docstring). Returns ``(unm_idx, src_idx,
    dst_idx)``; r is clamped to the listed A tokens."""
    batch, num_tokens, _ = metric.shape
    r = window_r(r, num_tokens, windows.shape)
    metric = metric.to(_accumulate_dtype(metric.dtype))
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    a_pos, b_pos = windows[:, 0::2], windows[:, 1::2]  # [W, S/2] each
    scores = metric[:, a_pos] @ metric[:, b_pos].transpose(-1, -2)  # [batch, W, S/2 (A), S/2 (B)]
    best_score, best_slot = scores.max(dim=-1)  # first maximum on ties, NaN as torch.max
    best_b = b_pos.expand(batch, -1, -1).gather(2, best_slot)
    # Candidates in position order, so that the stable sort breaks ties towards the lower A position.
    by_position = a_pos.flatten().argsort()
    candidates = a_pos.flatten()[by_position]
    best_score, best_b = best_score.flatten(1)[:, by_position], best_b.flatten(1)[:, by_position]
    rank = torch.sort(best_score, dim=-1, descending=True, stable=True).indices[:, :r]
    src_idx = candidates[rank]
    return _unmerged_in_order(src_idx, num_tokens), src_idx, best_b.gather(1, rank)


def merge(x, pos, size, unm_idx, src_idx, dst_idx, protected: int, pos_mean: bool):
    """Size-weighted merge of x (and pos: B keeps its own when not ``pos_mean``); sizes add.

    Returns ``(x_out, pos_out, size_out [batch, N - r])``; ``pos_out`` is empty when pos is None.
    """
    batch, num_tokens, _ = x.shape
    group = groups(num_tokens, protected, unm_idx, src_idx, dst_idx)
    num_out = num_tokens - src_idx.shape[1]
    rep = representatives(num_tokens, protected, unm_idx)
    acc = _accumulate_dtype(x.dtype)
    weight = (torch.ones(batch, num_tokens, dtype=acc, device=x.device) if size is None
              else size.to(acc))
    # Out-of-place scatters throughout: tome_kernels.export traces this function for ONNX.
    size_out = weight.new_zeros(batch, num_out).scatter_add(1, group, weight)
    members = torch.zeros(batch, num_out, dtype=torch.long, device=x.device).scatter_add(1, group,
                                                                                        torch.ones_like(group))
    singleton = (members == 1).unsqueeze(-1)

    def weighted_mean(t):
        total = t.new_zeros(batch, num_out, t.shape[-1], dtype=acc).scatter_add(
            1, group.unsqueeze(-1).expand(-1, -1, t.shape[-1]), t.to(acc) * weight[..., None])
        # A token that merged with nothing is copied, not divided back (bit-exact passthrough).
        return torch.where(singleton, _gather_tokens(t, rep).to(acc), total / size_out[..., None]).to(t.dtype)

    x_out = weighted_mean(x)
    if pos is None:
        pos_out = x.new_empty(0)
    else:
        pos_out = weighted_mean(pos) if pos_mean else _gather_tokens(pos, rep)
    out_dtype = x.dtype if size is None else size.dtype
    return x_out, pos_out, size_out.to(out_dtype)


def merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected: int,
                   pos_mean: bool):
    """Gradients of ``merge`` w.r.t. x and pos (size treated as a constant): a member i of output o gets
    ``grad[o] * size[i] / size_out[o]``; with pos passthrough only the representative gets ``grad[o]``."""
    num_out = grad_x.shape[1]
    num_tokens = num_out + src_idx.shape[1]
    group = groups(num_tokens, protected, unm_idx, src_idx, dst_idx)
    acc = _accumulate_dtype(grad_x.dtype)
    if size is None:
        weight = torch.ones(group.shape, dtype=acc, device=grad_x.device)
    else:
        weight = size.to(acc)
    share = (weight / size_out.to(acc).gather(1, group)).unsqueeze(-1)
    rep = representatives(num_tokens, protected, unm_idx)
    members = torch.zeros_like(size_out, dtype=torch.long).scatter_add_(1, group, torch.ones_like(group))
    singleton = (members.gather(1, group) == 1).unsqueeze(-1)

    def spread(g):
        g_in = _gather_tokens(g, group)
        return torch.where(singleton, g_in, (g_in.to(acc) * share).to(g.dtype))

    grad_x_in = spread(grad_x)
    if grad_pos is None:
        grad_pos_in = None
    elif pos_mean:
        grad_pos_in = spread(grad_pos)
    else:
        grad_pos_in = grad_pos.new_zeros(grad_pos.shape[0], num_tokens, grad_pos.shape[-1])
        grad_pos_in.scatter_(1, rep.unsqueeze(-1).expand(-1, -1, grad_pos.shape[-1]), grad_pos)
    return grad_x_in, grad_pos_in


def unmerge(y, unm_idx, src_idx, dst_idx, protected: int):
    """Back to N tokens: every input token gets the value of the output token it merged into."""
    num_tokens = y.shape[1] + src_idx.shape[1]
    return _gather_tokens(y, groups(num_tokens, protected, unm_idx, src_idx, dst_idx))


def unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected: int):
    """Gradient of ``unmerge``: each output token sums the gradients of its members."""
    batch, num_tokens, channels = grad.shape
    group = groups(num_tokens, protected, unm_idx, src_idx, dst_idx)
    acc = _accumulate_dtype(grad.dtype)
    out = torch.zeros(batch, num_tokens - src_idx.shape[1], channels, dtype=acc, device=grad.device)
    out.scatter_add_(1, group.unsqueeze(-1).expand(-1, -1, channels), grad.to(acc))
    return out.to(grad.dtype)


def _masked_row_safe(lse):
    """lse with -inf (a row whose keys all have size 0, or no keys) replaced by 0: such a row's logits are all
    -inf, so its probabilities become exp(-inf) = 0 (output and gradients 0) instead of exp(-inf + inf) = NaN."""
    return lse.masked_fill(lse.isneginf(), 0)


def attention(q, k, v, size, scale: float):
    """Proportional attention ``softmax(q k^T * scale + log size) v``. Returns ``(out, lse)`` with the
    row log-sum-exp ``lse [batch, heads, Nq]`` in fp32 (fp64 for fp64 inputs). A query row whose keys all
    have size 0 (or Nk = 0) gets output 0 and lse -inf, and zero gradients."""
    acc = _accumulate_dtype(q.dtype)
    logits = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if size is not None:
        logits = logits + size.to(acc).log()[:, None, None, :]
    lse = logits.logsumexp(dim=-1)
    probs = (logits - _masked_row_safe(lse)[..., None]).exp()
    return (probs @ v.to(acc)).to(q.dtype), lse


def attention_backward(grad_out, q, k, v, size, out, lse, scale: float):
    dtype, acc = q.dtype, _accumulate_dtype(q.dtype)
    q, k, v, grad_out, out = (t.to(acc) for t in (q, k, v, grad_out, out))
    logits = (q @ k.transpose(-1, -2)) * scale
    if size is not None:
        logits = logits + size.to(acc).log()[:, None, None, :]
    probs = (logits - _masked_row_safe(lse.to(acc))[..., None]).exp()
    grad_v = probs.transpose(-1, -2) @ grad_out
    grad_probs = grad_out @ v.transpose(-1, -2)
    delta = (grad_out * out).sum(-1, keepdim=True)
    grad_logits = probs * (grad_probs - delta) * scale
    return ((grad_logits @ k).to(dtype), (grad_logits.transpose(-1, -2) @ q).to(dtype), grad_v.to(dtype))


def merge_source(source, unm_idx, src_idx, dst_idx, protected: int):
    """Source tracing: ``source [batch, N, N0]`` (1 where output token n contains original token n0)
    merged with the same indices; a group's row is the union (max) of its members' rows."""
    num_tokens = source.shape[1]
    group = groups(num_tokens, protected, unm_idx, src_idx, dst_idx)
    out = source.new_zeros(source.shape[0], num_tokens - src_idx.shape[1], source.shape[2])
    return out.scatter_reduce(1, group.unsqueeze(-1).expand_as(source), source, reduce="amax")


class TorchBackend(Backend):
    """The spec as the ``torch`` backend: any device, ``auto``'s last choice."""

    name, devices, priority = "torch", (ANY_DEVICE,), 0
    match = staticmethod(match)
    window_match = staticmethod(window_match)
    merge = staticmethod(merge)
    merge_backward = staticmethod(merge_backward)
    unmerge = staticmethod(unmerge)
    unmerge_backward = staticmethod(unmerge_backward)
    attention = staticmethod(attention)
    attention_backward = staticmethod(attention_backward)
