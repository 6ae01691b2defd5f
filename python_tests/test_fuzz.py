"""Property-based tests (hypothesis) of every op on every backend against the reference.

Shapes: B 1..4, N 2..4097 (odd and even; weighted toward small N so the budget holds), C and metric C 1..1024,
protected 0..8, r from 0 past the clamp (and 2**40), every float dtype, and contiguous, strided, transposed,
offset and expanded (stride 0) views; sizes not all 1. Budgets (examples per op): 500 on the cpu and torch
backends, 20 on triton (its interpreter is ~100x slower: N <= 96, C <= 32); ``TOME_FUZZ_EXAMPLES=10000``
sets the cpu / torch budget and scales triton's with it. ``derandomize=True``: the examples are a function
of the test alone, so a CI failure replays exactly on any machine (no example database to ship); hypothesis
prints the failing example and a ``@reproduce_failure`` blob.

Matching has near-ties (scores within rounding) where backends may legitimately pick another B partner, so
indices are compared exactly only on tie-free metrics (``tie_free_metric``); on random metrics a backend's
indices must be *a* valid answer (every choice within rounding of the best, computed in float64), and
merge / unmerge / attention (no ties) are compared given the reference's indices.
"""

import os

import pytest
import torch
from tome_testing import (TOL, assert_close, available, random_windows, reference_outputs, tie_free_metric,
                          window_tie_free_metric)
from hypothesis import HealthCheck, given, settings, strategies as st

import tome_kernels
from tome_kernels import layout, reference
from tome_kernels._validation import check_index_values

ops = torch.ops.tome
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EXAMPLES = int(os.environ.get("TOME_FUZZ_EXAMPLES", "500"))
# (examples, largest N, largest C) per backend.
LIMITS = {"cpu": (EXAMPLES, 4097, 1024), "torch": (EXAMPLES, 4097, 1024),
          "triton": (max(1, EXAMPLES // 25), 96, 32)}
MAX_ELEMENTS = 1 << 18  # per tensor, so that one example stays in milliseconds
BACKENDS = [pytest.param(name, id=name) for name in available("cpu") if name in LIMITS]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (2 shared cores); thread counts are compared in test_determinism.py."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fuzz(backend, strategy, check):
    """Run ``check(case)`` on ``backend`` for the backend's budget of examples drawn from ``strategy(N, C)``."""
    examples, max_tokens, max_channels = LIMITS[backend]

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy(max_tokens, max_channels))
    def run(case):
        with tome_kernels.use_backend(backend):
            check(case)

    run()


# ----------------------------------------------------------------------------------------------------
# Strategies: hypothesis draws the shape and a seed; the data comes from a seeded torch.Generator.
# ----------------------------------------------------------------------------------------------------
VIEWS = ["contiguous", "strided", "transposed", "offset", "expanded"]


def tokens_count(max_tokens):
    """N from 2 to max_tokens, mostly small: 70% <= 64, 25% <= 600, 5% up to 4097."""
    tiers = [st.integers(2, min(64, max_tokens))]
    if max_tokens > 64:
        tiers.append(st.integers(65, min(600, max_tokens)))
    if max_tokens > 600:
        tiers.append(st.integers(601, max_tokens))
    return st.sampled_from([0] * 14 + [1] * 5 + [2]).flatmap(lambda i: tiers[min(i, len(tiers) - 1)])


def channels_count(max_channels, budget):
    """C from 1 to max_channels with batch * N * C <= MAX_ELEMENTS, mostly small."""
    top = max(1, min(max_channels, budget))
    return st.one_of(st.integers(1, min(16, top)), st.integers(1, top), st.sampled_from([c for c in (64, 1024)
                                                                                         if c <= top] or [top]))


def make(shape, dtype, view, gen):
    """A [B, N, C] tensor of ``dtype`` laid out as ``view``."""
    batch, num_tokens, channels = shape

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)

    if view == "strided":
        return randn(batch, num_tokens, 2 * channels)[..., ::2]
    if view == "transposed":
        return randn(batch, channels, num_tokens).transpose(1, 2)
    if view == "offset":
        return randn(batch + 1, num_tokens + 1, channels)[1:, 1:]
    if view == "expanded":
        return randn(1, num_tokens, channels).expand(batch, -1, -1)
    return randn(batch, num_tokens, channels)


def make_size(batch, num_tokens, kind, gen, dtype):
    """[B, N, 1] sizes: None, integers 1..4, or fractional in [0.25, 4)."""
    if kind == "none":
        return None
    if kind == "integer":
        return torch.randint(1, 5, (batch, num_tokens, 1), generator=gen).to(dtype)
    return (0.25 + 3.75 * torch.rand(batch, num_tokens, 1, generator=gen, dtype=torch.float64)).to(dtype)


@st.composite
def token_case(draw, max_tokens, max_channels):
    """Everything an index-taking op needs: shape, layout, dtype, views, size kind, seed."""
    num_tokens = draw(tokens_count(max_tokens))
    batch = draw(st.integers(1, 4 if num_tokens <= 600 else 2))
    channels = draw(channels_count(max_channels, MAX_ELEMENTS // (batch * num_tokens)))
    protected = draw(st.integers(0, min(8, num_tokens)))
    r = draw(st.one_of(st.integers(0, (num_tokens - protected) // 2 + 2), st.just(2**40)))
    return dict(batch=batch, num_tokens=num_tokens, channels=channels, protected=protected, r=r,
                dtype=draw(st.sampled_from(DTYPES)), view=draw(st.sampled_from(VIEWS)),
                size=draw(st.sampled_from(["none", "integer", "fractional"])),
                pos_mode=draw(st.sampled_from(["keep", "mean"])), seed=draw(st.integers(0, 2**31 - 1)))


def _metric(case, tie_free):
    batch, num_tokens = case["batch"], case["num_tokens"]
    if tie_free:
        return tie_free_metric(batch, num_tokens, 64, case["dtype"], seed=case["seed"])
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    return make((batch, num_tokens, case["channels"]), case["dtype"], case["view"], gen)


def _tie_free(case):
    """tie_free_metric's gaps (~1/N) are far above fp32 / fp64 rounding, and above half rounding for small N."""
    return case["dtype"] in (torch.float32, torch.float64) or case["num_tokens"] <= 64


# ----------------------------------------------------------------------------------------------------
# Oracle for matching on metrics with near-ties
# ----------------------------------------------------------------------------------------------------
def assert_valid_match(metric, r, protected, unm_idx, src_idx, dst_idx):
    """The indices are a ToMe matching of ``metric`` up to rounding: a partition of the A tokens, each source's
    destination a best B partner, sources ranked by best score, and every source at least as good as every
    unmerged token (scores in float64, tolerance above the backend's fp32 / fp64 accumulation error)."""
    batch, num_tokens, _ = metric.shape
    r = layout.clamp_r(r, num_tokens, protected)
    assert src_idx.shape == dst_idx.shape == (batch, r)
    assert unm_idx.shape == (batch, layout.num_a(num_tokens, protected) - r)
    check_index_values(None, num_tokens, protected, unm_idx, src_idx, dst_idx)
    if r == 0:
        assert torch.equal(unm_idx, layout.a_positions(num_tokens, protected).expand(batch, -1))
        return
    tol = 1e-9 if metric.dtype == torch.float64 else 2e-4
    unit = metric.double()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(reference.NORM_EPS)
    a_pos, b_pos = layout.a_positions(num_tokens, protected), layout.b_positions(num_tokens, protected)
    scores = unit[:, a_pos] @ unit[:, b_pos].transpose(1, 2)  # [B, nA, nB]
    best = scores.max(-1).values  # [B, nA]

    def a_slot(idx):
        return (idx - layout.first_a(protected)) // 2

    src_best = best.gather(1, a_slot(src_idx))
    chosen = scores.gather(1, a_slot(src_idx)[..., None].expand(-1, -1, b_pos.numel()))
    chosen = chosen.gather(2, ((dst_idx - layout.first_b(protected)) // 2)[..., None])[..., 0]
    assert (chosen >= src_best - tol).all(), "a source's destination is not a best B partner"
    assert (src_best[:, 1:] <= src_best[:, :-1] + tol).all(), "sources not in descending score order"
    if unm_idx.shape[1]:
        unm_best = best.gather(1, a_slot(unm_idx))
        assert (src_best.min(1).values >= unm_best.max(1).values - tol).all(), \
            "an unmerged token scores better than a source"
        if protected >= 1:
            assert (unm_idx.diff(dim=1) > 0).all()
        else:
            assert (unm_best[:, 1:] <= unm_best[:, :-1] + tol).all()


# ----------------------------------------------------------------------------------------------------
# The properties, one test per op
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_bipartite_match(backend):
    def check(case):
        tie_free = _tie_free(case) and case["seed"] % 2 == 0
        metric = _metric(case, tie_free)
        actual = ops.bipartite_match(metric, case["r"], case["protected"])
        assert_valid_match(metric, case["r"], case["protected"], *actual)
        if tie_free:
            expected = reference_outputs(ops.bipartite_match, metric, case["r"], case["protected"])
            for a, e in zip(actual, expected):
                torch.testing.assert_close(a, e, rtol=0, atol=0)

    fuzz(backend, token_case, check)


def assert_valid_window_match(metric, windows, r, unm_idx, src_idx, dst_idx):
    """The indices are a windowed matching of ``metric`` up to rounding: sources listed, each destination a
    best B of the source's window, sources in descending score order and at least as good as every listed
    unmerged token, the unmerged A tokens ascending (scores in float64)."""
    batch, num_tokens, _ = metric.shape
    r = layout.window_r(r, num_tokens, windows.shape)
    assert src_idx.shape == dst_idx.shape == (batch, r)
    check_index_values(None, num_tokens, 0, unm_idx, src_idx, dst_idx)
    assert (unm_idx.diff(dim=1) > 0).all()
    if r == 0:
        return
    tol = 1e-9 if metric.dtype == torch.float64 else 2e-4
    unit = metric.double()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(reference.NORM_EPS)
    a_pos, b_pos = windows[:, 0::2], windows[:, 1::2]
    scores = unit[:, a_pos] @ unit[:, b_pos].transpose(-1, -2)  # [B, W, S/2, S/2]
    best = torch.full((batch, num_tokens), -float("inf"), dtype=torch.float64)
    best[:, a_pos.flatten()] = scores.max(-1).values.flatten(1)
    window_of = torch.full((num_tokens,), -1, dtype=torch.long)
    window_of[a_pos.flatten()] = torch.arange(a_pos.shape[0]).repeat_interleave(a_pos.shape[1])
    src_best = best.gather(1, src_idx)
    assert (window_of[src_idx] >= 0).all(), "an unlisted A token merged"
    chosen = (unit.gather(1, src_idx[..., None].expand(-1, -1, unit.shape[-1]))
              * unit.gather(1, dst_idx[..., None].expand(-1, -1, unit.shape[-1]))).sum(-1)
    assert (chosen >= src_best - tol).all(), "a source's destination is not a best B of its window"
    assert (b_pos[window_of[src_idx]] == dst_idx[..., None]).any(-1).all(), "a destination outside the window"
    assert (src_best[:, 1:] <= src_best[:, :-1] + tol).all(), "sources not in descending score order"
    if unm_idx.shape[1]:
        assert (src_best.min(1).values >= best.gather(1, unm_idx).max(1).values - tol).all(), \
            "a listed unmerged token scores better than a source"


@st.composite
def window_case(draw, max_tokens, max_channels):
    """A token case (protected = 0) plus a window table: width 2..16, up to every A token listed."""
    case = draw(token_case(max_tokens, max_channels))
    width = 2 * draw(st.integers(1, 8))
    most = layout.num_a(case["num_tokens"], 0) // (width // 2)
    num_windows = draw(st.integers(min(1, most), most))
    r = draw(st.one_of(st.integers(0, num_windows * width // 2 + 2), st.just(2**40)))
    return dict(case, protected=0, r=r, width=width, num_windows=num_windows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_window_match(backend):
    def check(case):
        windows = random_windows(case["num_tokens"], case["num_windows"], case["width"], seed=case["seed"])
        tie_free = _tie_free(case) and case["seed"] % 2 == 0
        if tie_free:
            metric = window_tie_free_metric(case["batch"], case["num_tokens"], windows, 64, case["dtype"],
                                            seed=case["seed"])
        else:
            metric = _metric(case, False)
        actual = ops.window_match(metric, windows, case["r"])
        assert_valid_window_match(metric, windows, case["r"], *actual)
        if tie_free:
            expected = reference_outputs(ops.window_match, metric, windows, case["r"])
            for a, e in zip(actual, expected):
                torch.testing.assert_close(a, e, rtol=0, atol=0)

    fuzz(backend, window_case, check)


def _inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["batch"], case["num_tokens"], case["channels"])
    x = make(shape, case["dtype"], case["view"], gen)
    pos = make((*shape[:2], 3), case["dtype"], "contiguous", gen)
    size = make_size(*shape[:2], case["size"], gen, case["dtype"])
    return x, pos, size, gen


def assert_reduction_close(actual, expected, exact):
    """For sums over N or C (gradients): the largest error vs an fp64 reference ``exact`` is at most twice that
    of the same-precision reference ``expected``, plus the dtype's tolerance (STYLE.md rule 12)."""
    if exact.numel() == 0:
        return
    error, reference_error = ((t.double() - exact).abs().max() for t in (actual, expected))
    assert error <= 2 * reference_error + TOL[actual.dtype] * exact.abs().max().clamp_min(1), \
        f"max error {error} vs the reference's {reference_error}"


def _double(*tensors):
    return [None if t is None else t.double() for t in tensors]


def _grads(outputs, inputs, gen):
    """Gradients of a fixed random projection of ``outputs`` w.r.t. the inputs that require grad."""
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outputs]
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad([(o * w).sum() for o, w in zip(outputs, weights) if o.requires_grad], wanted)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_merge(backend):
    """merge (x, pos, size) with the reference's indices: forward and backward (x, pos, size) as the reference,
    passthrough exact, total size conserved."""

    def check(case):
        x, pos, size, gen = _inputs(case)
        indices = reference_outputs(ops.bipartite_match, _metric(case, False), case["r"], case["protected"])
        differentiable = case["dtype"] in (torch.float32, torch.float64)

        def run(x, pos, size):
            # detach() keeps the view's strides (clone() would not, for an expanded tensor)
            leaves = [t.detach().requires_grad_(differentiable) if t is not None else None for t in (x, pos, size)]
            out = ops._merge(*leaves, *indices, case["protected"], case["pos_mode"])
            grads = _grads(out, leaves, torch.Generator().manual_seed(case["seed"] + 7)) if differentiable else ()
            return out, grads

        actual, actual_grads = run(x, pos, size)
        expected, expected_grads = reference_outputs(run, x, pos, size)
        for a, e in zip(actual, expected):
            assert a.shape == e.shape and a.dtype == e.dtype
            assert_close(a.detach(), e.detach())
        if case["pos_mode"] == "keep":
            torch.testing.assert_close(actual[1], expected[1], rtol=0, atol=0)
        exact_grads = reference_outputs(run, *_double(x, pos, size))[1] if differentiable else ()
        for a, e, exact in zip(actual_grads, expected_grads, exact_grads):
            assert_reduction_close(a, e, exact)
        total = torch.ones(x.shape[:2], dtype=torch.float64) if size is None else size.double().squeeze(-1)
        torch.testing.assert_close(actual[2].double().sum((1, 2)), total.sum(1), rtol=TOL[x.dtype], atol=0)

    fuzz(backend, token_case, check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_unmerge(backend):
    """unmerge is data movement (exact); its backward sums each group as the reference."""

    def check(case):
        indices = reference_outputs(ops.bipartite_match, _metric(case, False), case["r"], case["protected"])
        gen = torch.Generator().manual_seed(case["seed"])
        num_out = case["num_tokens"] - indices[1].shape[1]
        y = make((case["batch"], num_out, case["channels"]), case["dtype"], case["view"], gen)

        def run(y):
            y = y.detach().requires_grad_()
            out = ops.unmerge(y, *indices, case["protected"])
            return out, _grads([out], [y], torch.Generator().manual_seed(case["seed"] + 7))[0]

        (out, grad), (expected, expected_grad) = run(y), reference_outputs(run, y)
        torch.testing.assert_close(out.detach(), expected.detach(), rtol=0, atol=0)
        assert_close(grad, expected_grad)

    fuzz(backend, token_case, check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_bipartite_merge(backend):
    """The whole step on tie-free metrics: indices exact, outputs as the reference."""

    def check(case):
        x, pos, size, _ = _inputs(case)
        metric = tie_free_metric(case["batch"], case["num_tokens"], 64, torch.float32, seed=case["seed"])
        kwargs = dict(metric=metric, protected=case["protected"], pos_mode=case["pos_mode"])
        actual = ops.bipartite_merge(x, pos, size, case["r"], **kwargs)
        expected = reference_outputs(ops.bipartite_merge, x, pos, size, case["r"], **kwargs)
        for a, e in zip(actual[3:], expected[3:]):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        for a, e in zip(actual[:3], expected[:3]):
            assert a.shape == e.shape and a.dtype == e.dtype and a.is_contiguous()
            assert_close(a, e)

    fuzz(backend, token_case, check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_merge_source(backend):
    """Source tracing from the identity: every original token in exactly one output token."""

    def check(case):
        indices = reference_outputs(ops.bipartite_match, _metric(case, False), case["r"], case["protected"])
        batch, num_tokens = case["batch"], case["num_tokens"]
        source = torch.eye(num_tokens, dtype=case["dtype"]).expand(batch, -1, -1)
        merged = ops.merge_source(source, *indices, case["protected"])
        expected = reference.merge_source(source, *indices, case["protected"])
        torch.testing.assert_close(merged, expected, rtol=0, atol=0)
        assert torch.equal(merged.sum(1), torch.ones(batch, num_tokens, dtype=case["dtype"]))

    fuzz(backend, token_case, check)


@st.composite
def attention_case(draw, max_tokens, max_channels):
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    num_k = draw(tokens_count(max_tokens)) - draw(st.integers(0, 1))  # Nk from 1
    num_q = draw(st.one_of(st.just(num_k), st.integers(1, 64)))
    while batch * heads * num_q * num_k > 4 * MAX_ELEMENTS:  # the reference materialises the logits
        num_q = max(1, num_q // 2)
        num_k = max(1, num_k // 2)
    dim = draw(st.one_of(st.integers(1, 16), st.sampled_from([32, 64, 80, 128]), st.integers(1, min(256, max_channels))))
    return dict(batch=batch, heads=heads, num_q=num_q, num_k=num_k, dim=dim, dtype=draw(st.sampled_from(DTYPES)),
                size=draw(st.sampled_from(["none", "integer", "fractional", "with_zeros"])),
                view=draw(st.sampled_from(["contiguous", "transposed", "expanded"])),
                # None: D ** -0.5; else a multiple of it (logits up to 4x sharper than attention's)
                temperature=draw(st.one_of(st.none(), st.floats(0.1, 4.0))), seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_prop_attention(backend):
    """Output (every dtype) and gradients (fp32 / fp64) as the reference; size 0 masks keys."""

    def check(case):
        gen = torch.Generator().manual_seed(case["seed"])
        batch, heads, dtype = case["batch"], case["heads"], case["dtype"]

        def tensor(num):  # [B, H, N, D] in the case's view
            return make((batch * heads, num, case["dim"]), dtype, case["view"], gen).unflatten(0, (batch, heads))

        q, k, v = tensor(case["num_q"]), tensor(case["num_k"]), tensor(case["num_k"])
        kind = case["size"]
        size = make_size(batch, case["num_k"], "integer" if kind == "with_zeros" else kind, gen, dtype)
        if kind == "with_zeros":
            size = size * (torch.rand(size.shape, generator=gen) < 0.7).to(dtype)
        differentiable = dtype in (torch.float32, torch.float64)

        def run(q, k, v):
            q, k, v = (t.detach().requires_grad_(differentiable) for t in (q, k, v))
            scale = None if case["temperature"] is None else case["temperature"] * case["dim"] ** -0.5
            out = ops.prop_attention(q, k, v, size, scale)
            grads = _grads([out], [q, k, v], torch.Generator().manual_seed(case["seed"] + 7)) if differentiable else ()
            return out.detach(), grads

        (out, grads), (expected, expected_grads) = run(q, k, v), reference_outputs(run, q, k, v)
        assert not out.isnan().any()
        assert_close(out, expected)
        exact_grads = reference_outputs(run, *_double(q, k, v))[1] if differentiable else ()
        for a, e, exact in zip(grads, expected_grads, exact_grads):
            assert_reduction_close(a, e, exact)

    fuzz(backend, attention_case, check)
