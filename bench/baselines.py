"""Baselines of the op benchmarks, timed in the same groups as the ops.

* ``chain``: one ToMe step as the original chain of PyTorch ops (full normalised score matrix, max,
  argsort, gather, ``scatter_reduce`` of x * size and of size, a division, about 15 launches), eager and
  under ``torch.compile``; test_baselines.py checks that the ops make its merges.
* The floor of one ToMe step: the larger of one copy of x and one BLAS product of the normalised A and B
  sets (both timed; the report takes the larger).
* Attention: the explicit-softmax formulation is the ``torch`` backend itself; ``sdpa_unbiased`` is
  PyTorch's SDPA without the size bias, the cost of attention without proportional attention;
  ``sdpa_biased`` is SDPA with the log-size bias as a float mask, the same math as ``prop_attention``: on
  CPU ATen's flash kernel, whose forward the ``cpu`` backend calls and whose backward it replaces with a
  thread-count-independent one (docs/CPU.md), so its ``bwd`` row is that backward's baseline.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tome_kernels import layout

# One compiled chain serves every shape, dtype and grad mode (dynamic=False: one graph each); 6 shapes x
# 2 dtypes x {fwd, bwd} exceed dynamo's default of 8 graphs per function, past which it runs eagerly.
torch._dynamo.config.recompile_limit = 64


def make_inputs(shape, batch: int, dtype: torch.dtype, device: str, seed: int = 0):
    """``(x, size, metric)``: sizes 1-4 (a mid-network state); ``metric`` is x itself when the shape has no
    metric channels (DETR, diffusion)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, shape.tokens, shape.channels, generator=gen)
    size = torch.randint(1, 5, (batch, shape.tokens, 1), generator=gen).float()
    metric = None if shape.metric_channels is None else torch.randn(batch, shape.tokens, shape.metric_channels,
                                                                    generator=gen)
    x, size = x.to(device, dtype), size.to(device, dtype)
    return x, size, (x if metric is None else metric.to(device, dtype))


def chain(x, size, metric, r: int, protected: int):
    """One ToMe step written as the paper's algorithm: ``(x_out, size_out)``; protected = 0, or 1 for a
    class token."""
    class_token = bool(protected)
    r = layout.clamp_r(r, x.shape[1], int(class_token))
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    if class_token:
        scores[:, 0, :] = -float("inf")
    best_score, best_b = scores.max(dim=-1)
    ranked = best_score.argsort(dim=-1, descending=True)[..., None]
    unm_rank, src_rank = ranked[:, r:], ranked[:, :r]
    dst_slot = best_b[..., None].gather(1, src_rank)
    if class_token:
        unm_rank = unm_rank.sort(dim=1).values

    def merge_sum(t):
        a, b = t[:, ::2], t[:, 1::2]
        channels = t.shape[-1]
        unmerged = a.gather(1, unm_rank.expand(-1, -1, channels))
        sources = a.gather(1, src_rank.expand(-1, -1, channels))
        b = b.scatter_reduce(1, dst_slot.expand(-1, -1, channels), sources, reduce="sum")
        return torch.cat([unmerged, b], dim=1)

    x_out = merge_sum(x * size)
    size_out = merge_sum(size)
    return x_out / size_out, size_out


@functools.cache
def compiled_chain():
    return torch.compile(chain, dynamic=False)


def normalised_sets(metric, protected: int):
    """The contiguous normalised A and B token sets that the floor's product takes."""
    unit = metric / metric.norm(dim=-1, keepdim=True)
    num_tokens = metric.shape[1]
    return (unit[:, layout.a_positions(num_tokens, protected)].contiguous(),
            unit[:, layout.b_positions(num_tokens, protected)].contiguous())


def floor_copy(x):
    return x.clone()


def floor_scores(a, b):
    return torch.bmm(a, b.transpose(1, 2))


def sdpa_unbiased(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_biased(q, k, v, size):
    """``size`` [B, N, 1] as the mask log(size) broadcast over heads and queries, in q's dtype."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=size.log().to(q.dtype).view(size.shape[0], 1, 1, -1))


def window_match_composed(metric, windows, r: int):
    """``tome.window_match`` composed from a public op and torch: ``bipartite_match`` on the windows as batch
    rows (each A token's best B in its window), then the pairs' cosines ranked over the row by an argsort."""
    batch, num_tokens, channels = metric.shape
    num_windows, width = windows.shape
    local = metric[:, windows.flatten()].reshape(batch * num_windows, width, channels)
    _, src, dst = torch.ops.tome.bipartite_match(local, width, 0)
    positions = windows.repeat(batch, 1)
    src, dst = positions.gather(1, src).view(batch, -1), positions.gather(1, dst).view(batch, -1)
    unit = F.normalize(metric.to(torch.promote_types(metric.dtype, torch.float32)), dim=-1)
    score = (unit.gather(1, src[..., None].expand(-1, -1, channels))
             * unit.gather(1, dst[..., None].expand(-1, -1, channels))).sum(-1)
    order = score.argsort(dim=1, descending=True, stable=True)[:, :r]
    src, dst = src.gather(1, order), dst.gather(1, order)
    num_a = layout.num_a(num_tokens, 0)
    merged = torch.zeros(batch, num_a, dtype=torch.uint8, device=metric.device).scatter(1, src // 2, 1)
    unm = torch.sort(merged, dim=1, stable=True).indices[:, : num_a - src.shape[1]] * 2
    return unm, src, dst
