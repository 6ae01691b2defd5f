"""Every ``torch.ops.tome`` op, forward and backward, on each backend of the device, against the baselines
of ``baselines.py``, at the shapes of ``shapes.py`` in fp32 and bf16.

One pytest-benchmark group per op x direction x shape x dtype holds its providers: the backends (CPU:
``cpu``, ``torch``; CUDA: ``triton``, ``cuda``, ``torch``. Triton on CPU tensors is the interpreter, not a
benchmark) and the baselines. ``bwd`` times the backward alone, as Liger-Kernel's "backward" mode: the
forward runs once outside the timer, each round is ``torch.autograd.grad(out, inputs, grad,
retain_graph=True)`` of a fixed random ``grad`` (``autograd.grad`` so that no ``.grad`` accumulates).
``extra_info`` holds what scripts/bench_report.py needs: the case, bytes moved and FLOPs.

    python -m pytest bench/ --benchmark-only --benchmark-json=bench.json && python scripts/bench_report.py bench.json

``TOME_BENCH_THREADS`` sets the threads, ``TOME_BENCH_QUICK=1`` is CI's quick mode (see shapes.py).
"""

from __future__ import annotations

import functools

import pytest
import torch

import tome_kernels
from tome_kernels import layout

import baselines
from shapes import (DEVICE, DTYPES, MERGE_HEADLINE, QUICK, RUN_SHAPES, SHAPES, WINDOW_LEVELS, WINDOW_SHAPES,
                    WINDOW_TILE)

BACKENDS = ("triton", "cuda", "torch") if DEVICE == "cuda" else ("cpu", "torch")


def cases(shapes=RUN_SHAPES, **providers_by_direction):
    """Parametrize ``direction, provider, shape, dtype`` over the given providers of each direction."""
    params = [pytest.param(direction, provider, shape, dtype, id=f"{direction}-{shape}-{dtype}-{provider}")
              for direction, providers in providers_by_direction.items() for shape in shapes
              for dtype in DTYPES for provider in providers]
    return pytest.mark.parametrize("direction, provider, shape, dtype", params)


@functools.cache
def merge_inputs(shape: str, dtype: str):
    """``(x, size, metric, (unm_idx, src_idx, dst_idx))`` on the device; the indices from the reference."""
    s = SHAPES[shape]
    x, size, metric = baselines.make_inputs(s, s.batch(DEVICE), DTYPES[dtype], DEVICE)
    with tome_kernels.use_backend("torch"):
        indices = torch.ops.tome.bipartite_match(metric, s.r, s.protected)
    return x, size, metric, indices


@functools.cache
def attention_inputs(shape: str, dtype: str):
    s = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s.batch(DEVICE), s.heads, s.tokens, s.head_dim, generator=gen) for _ in range(3))
    size = torch.randint(1, 5, (s.batch(DEVICE), s.tokens, 1), generator=gen).float()
    return tuple(t.to(DEVICE, DTYPES[dtype]) for t in (q, k, v, size))


def run(benchmark, threads, op, direction, provider, shape, dtype, forward, inputs, *, bytes_moved, flops=0):
    """Time ``forward(*inputs)`` (``fwd``) or its backward w.r.t. ``inputs`` (``bwd``) with ``provider``'s
    backend active (baselines run under ``auto``; they call no tome op)."""
    if provider in BACKENDS and (reason := tome_kernels.available_backends(DEVICE)[provider]) is not None:
        pytest.skip(reason)
    with tome_kernels.use_backend(provider if provider in BACKENDS else "auto"):
        # A floor is the same data movement in both directions (the backward reads an output-sized grad and
        # writes an input-sized one), and the backward of a copy would time no copy at all.
        if direction == "fwd" or provider.startswith("floor"):
            def step():
                return forward(*inputs)
        else:
            leaves = [t.detach().requires_grad_() for t in inputs]
            out = forward(*leaves)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)

            def step():
                return torch.autograd.grad(out, leaves, grad, retain_graph=True)
        if DEVICE == "cuda":  # the timer must see the kernels finish, not only their launch
            def timed():
                result = step()
                torch.cuda.synchronize()
                return result
        else:
            timed = step
        if not (benchmark.disabled or QUICK):
            timed()  # warm-up: compiles, autotunes, first-touch allocations
        if DEVICE == "cuda":
            torch.cuda.synchronize()  # the set-up's kernels must not land in the first round
        s = SHAPES[shape]
        benchmark.group = f"{op} {direction} {shape} {dtype}"
        benchmark.extra_info.update(
            op=op, direction=direction, provider=provider, shape=shape, dtype=dtype, device=DEVICE,
            threads=threads, label=s.label, batch=s.batch(DEVICE), tokens=s.tokens, channels=s.channels,
            metric_channels=s.metric_channels, protected=s.protected, r=s.r, heads=s.heads,
            head_dim=s.head_dim, bytes=bytes_moved, flops=flops)
        benchmark(timed)


def skip_compiled(benchmark, shape, dtype, direction):
    if benchmark.disabled:
        pytest.skip("compiling the chain takes ~30 s; only worth it when timing")
    if QUICK and (shape not in MERGE_HEADLINE or dtype != "fp32" or direction != "fwd"):
        pytest.skip("quick mode: the compiled chain only at the headline shapes, fp32, forward")


def token_bytes(x, tokens_in, tokens_out):
    """Bytes of reading x at ``tokens_in`` tokens and writing it at ``tokens_out``."""
    return x.element_size() * x.shape[0] * x.shape[-1] * (tokens_in + tokens_out)


@cases(fwd=BACKENDS + ("floor_scores",))
def test_match(benchmark, threads, direction, provider, shape, dtype):
    s = SHAPES[shape]
    _, _, metric, _ = merge_inputs(shape, dtype)
    num_a, num_b = layout.num_a(s.tokens, s.protected), layout.num_b(s.tokens, s.protected)
    if provider == "floor_scores":
        a, b = baselines.normalised_sets(metric, s.protected)
        forward, inputs = baselines.floor_scores, (a, b)
    else:
        forward, inputs = (lambda m: torch.ops.tome.bipartite_match(m, s.r, s.protected)), (metric,)
    run(benchmark, threads, "match", direction, provider, shape, dtype, forward, inputs,
        bytes_moved=metric.numel() * metric.element_size() + 8 * metric.shape[0] * num_a,
        flops=2 * metric.shape[0] * num_a * num_b * metric.shape[-1])


@cases(shapes=WINDOW_SHAPES, fwd=BACKENDS + ("composed",))
def test_window_match(benchmark, threads, direction, provider, shape, dtype):
    """Matching within 2x4 tiles of each feature level, ranked over the image, against the same matching
    composed from ``bipartite_match`` on the tiles plus torch scoring and sorting."""
    s = SHAPES[shape]
    _, _, metric = baselines.make_inputs(s, s.batch(DEVICE), DTYPES[dtype], DEVICE)
    windows = layout.grid_windows(WINDOW_LEVELS, *WINDOW_TILE, DEVICE)
    if provider == "composed":
        forward = functools.partial(baselines.window_match_composed, windows=windows, r=s.r)
    else:
        def forward(m):
            return torch.ops.tome.window_match(m, windows, s.r)
    listed = windows.shape[0] * windows.shape[1] // 2
    run(benchmark, threads, "window_match", direction, provider, shape, dtype, forward, (metric,),
        bytes_moved=metric.numel() * metric.element_size() + 8 * metric.shape[0] * layout.num_a(s.tokens, 0),
        flops=2 * metric.shape[0] * listed * (windows.shape[1] // 2) * metric.shape[-1])


@cases(fwd=BACKENDS + ("floor_copy",), bwd=BACKENDS + ("floor_copy",))
def test_merge(benchmark, threads, direction, provider, shape, dtype):
    s = SHAPES[shape]
    x, size, _, (unm_idx, src_idx, dst_idx) = merge_inputs(shape, dtype)
    if provider == "floor_copy":
        forward = baselines.floor_copy
    else:
        def forward(x):
            return torch.ops.tome.merge(x, size, unm_idx, src_idx, dst_idx, s.protected)[0]
    run(benchmark, threads, "merge", direction, provider, shape, dtype, forward, (x,),
        bytes_moved=token_bytes(x, s.tokens, s.tokens - s.r))


@cases(fwd=BACKENDS + ("chain", "chain_compiled", "floor_copy", "floor_scores"),
       bwd=BACKENDS + ("chain", "chain_compiled", "floor_copy"))
def test_bipartite_merge(benchmark, threads, direction, provider, shape, dtype):
    """Match + merge of x with sizes; the backward is the merge's, w.r.t. x (the metric is never
    differentiated: the chain gets a detached one too, so that both do the same work)."""
    s = SHAPES[shape]
    x, size, metric, _ = merge_inputs(shape, dtype)
    metric = metric.detach()
    inputs = (x,)
    if provider in ("chain", "chain_compiled"):
        if provider == "chain_compiled":
            skip_compiled(benchmark, shape, dtype, direction)
        chain = baselines.compiled_chain() if provider == "chain_compiled" else baselines.chain

        def forward(x):
            return chain(x, size, metric, s.r, s.protected)[0]
    elif provider == "floor_copy":
        forward = baselines.floor_copy
    elif provider == "floor_scores":
        forward, inputs = baselines.floor_scores, baselines.normalised_sets(metric, s.protected)
    else:
        def forward(x):
            return torch.ops.tome.bipartite_merge(x, None, size, s.r, metric=metric, protected=s.protected)[0]
    bytes_moved = token_bytes(x, s.tokens, s.tokens - s.r)
    if s.metric_channels is not None and direction == "fwd":
        bytes_moved += metric.numel() * metric.element_size()
    num_a, num_b = layout.num_a(s.tokens, s.protected), layout.num_b(s.tokens, s.protected)
    run(benchmark, threads, "bipartite_merge", direction, provider, shape, dtype, forward, inputs,
        bytes_moved=bytes_moved,
        flops=2 * metric.shape[0] * num_a * num_b * metric.shape[-1] if direction == "fwd" else 0)


@cases(fwd=BACKENDS + ("floor_copy",), bwd=BACKENDS + ("floor_copy",))
def test_unmerge(benchmark, threads, direction, provider, shape, dtype):
    s = SHAPES[shape]
    x, _, _, (unm_idx, src_idx, dst_idx) = merge_inputs(shape, dtype)
    y = x[:, s.r:].contiguous()  # a merged [B, N - r, C] tensor
    if provider == "floor_copy":
        forward, inputs = baselines.floor_copy, (x,)  # one copy of the unmerged size
    else:
        def forward(y):
            return torch.ops.tome.unmerge(y, unm_idx, src_idx, dst_idx, s.protected)
        inputs = (y,)
    run(benchmark, threads, "unmerge", direction, provider, shape, dtype, forward, inputs,
        bytes_moved=token_bytes(x, s.tokens - s.r, s.tokens))


@cases(fwd=BACKENDS + ("sdpa_unbiased", "sdpa_biased"), bwd=BACKENDS + ("sdpa_unbiased", "sdpa_biased"))
def test_prop_attention(benchmark, threads, direction, provider, shape, dtype):
    """``softmax(q kᵀ / √d + log size) v``; the ``torch`` backend is the explicit-softmax formulation."""
    if DEVICE == "cpu" and shape == "diffusion" and provider == "torch":
        pytest.skip("explicit softmax at N=4096 on CPU: GBs of logits and seconds per call")
    s = SHAPES[shape]
    q, k, v, size = attention_inputs(shape, dtype)
    if provider == "sdpa_unbiased":
        forward = baselines.sdpa_unbiased
    elif provider == "sdpa_biased":
        def forward(q, k, v):
            return baselines.sdpa_biased(q, k, v, size)
    else:
        def forward(q, k, v):
            return torch.ops.tome.prop_attention(q, k, v, size)
    batch_heads = q.shape[0] * q.shape[1]
    # fwd: q kᵀ and p v; bwd: the same two recomputed/transposed plus d(p), dq, dk (FlashAttention's 2.5x).
    matmuls = 2 if direction == "fwd" else 5
    run(benchmark, threads, "prop_attention", direction, provider, shape, dtype, forward, (q, k, v),
        bytes_moved=(4 if direction == "fwd" else 8) * q.numel() * q.element_size(),
        flops=matmuls * 2 * batch_heads * s.tokens * s.tokens * s.head_dim)
