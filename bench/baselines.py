"""Baselines for the CPU merge benchmarks: the plain-PyTorch ToMe chain (eager and ``torch.compile``) and
the floor of one ToMe step (one copy of x; one BLAS product of the normalised A and B sets).

The chain itself is the spec's ``reference.tome_chain`` (full normalised score matrix, max, argsort, gather,
``scatter_reduce`` of x * size and of size, then a division), so benchmarks and tests time and check one
function."""

from __future__ import annotations

import functools

import torch

from tome_kernels import reference


def make_inputs(batch: int, tokens: int, channels: int, metric_channels: int | None, seed: int = 0):
    """``(x, size, metric)`` fp32; ``metric`` is x itself when ``metric_channels`` is None (DETR)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=gen)
    metric = x if metric_channels is None else torch.randn(batch, tokens, metric_channels, generator=gen)
    return x, torch.ones(batch, tokens, 1), metric


def chain(x, size, metric, r: int, protected: int):
    """One ToMe step as the original chain of PyTorch ops (protected = 0, or 1 for a class token)."""
    return reference.tome_chain(x, size, metric, r, class_token=bool(protected))


@functools.cache
def compiled_chain():
    return torch.compile(chain, dynamic=False)


def normalised_sets(metric, protected: int):
    """The contiguous normalised A and B token sets that the floor's product takes."""
    unit = metric / metric.norm(dim=-1, keepdim=True)
    num_tokens = metric.shape[1]
    return (unit[:, reference.a_positions(num_tokens, protected)].contiguous(),
            unit[:, reference.b_positions(num_tokens, protected)].contiguous())


def floor_copy(x):
    return x.clone()


def floor_scores(a, b):
    return torch.bmm(a, b.transpose(1, 2))
