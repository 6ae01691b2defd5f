"""The op contract, on every backend usable here, against the reference (tome_kernels/reference.py)."""

import re

import pytest
import torch
from tome_testing import (assert_close, random_windows, reference_outputs, tie_free_metric,
                          window_tie_free_metric)
from torch.library import opcheck

import tome_kernels

# (batch, N, channels, protected, r): ViT counts, odd/prime N, r = 0, r at and past the clamp.
SHAPES = [
    (2, 197, 48, 1, 16),
    (1, 11, 8, 0, 3),
    (3, 13, 5, 2, 100),
    (2, 16, 7, 5, 5),
    (2, 10, 4, 0, 0),
    (1, 2, 3, 0, 1),
    (2, 3, 4, 1, 1),
    (2, 257, 33, 0, 64),
]
SHAPE_IDS = [f"B{b}-N{n}-C{c}-p{p}-r{r}" for b, n, c, p, r in SHAPES]


def make_tokens(batch, num_tokens, channels, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_tokens, channels, generator=gen, dtype=torch.float64).to(dtype).to(device)


def make_size(batch, num_tokens, dtype, device, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return (1 + torch.randint(0, 4, (batch, num_tokens, 1), generator=gen)).to(dtype).to(device)


# ----------------------------------------------------------------------------------------------------
# Forward equality
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_match_indices_equal_reference(backend, shape, dtype):
    device, _ = backend
    batch, num_tokens, _, protected, r = shape
    metric = tie_free_metric(batch, num_tokens, 64, dtype, device)
    expected = reference_outputs(torch.ops.tome.bipartite_match, metric, r, protected)
    actual = torch.ops.tome.bipartite_match(metric, r, protected)
    for a, e in zip(actual, expected):
        assert a.dtype == torch.int64
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("protected", [0, 1])
def test_match_half_equal_reference(backend, dtype, protected):
    device, _ = backend
    metric = tie_free_metric(2, 41, 64, dtype, device)
    expected = reference_outputs(torch.ops.tome.bipartite_match, metric, 8, protected)
    for a, e in zip(torch.ops.tome.bipartite_match(metric, 8, protected), expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_match_layout_rules():
    """Output order: protected first; unmerged A ascending when protected >= 1, by score when 0."""
    metric = tie_free_metric(1, 21, 64)
    unm, src, dst = reference_outputs(torch.ops.tome.bipartite_match, metric, 4, 1)
    assert torch.all(unm.diff() > 0) and torch.all(unm % 2 == 0) and torch.all(dst % 2 == 1)
    unm0, src0, _ = reference_outputs(torch.ops.tome.bipartite_match, metric, 4, 0)
    by_score = reference_outputs(torch.ops.tome.bipartite_match, metric, 10, 0)[1]  # 10 of the 11 A tokens
    assert torch.equal(torch.cat([src0, unm0], 1)[:, :10], by_score)
    x = make_tokens(1, 21, 3, torch.float32, "cpu")
    out = reference_outputs(torch.ops.tome.bipartite_merge, x, None, None, 4, metric=metric, protected=2)[0]
    assert torch.equal(out[:, :2], x[:, :2])  # [token0, token1, rest of unmerged A, rest of B]


# (batch, N, windows, width, r): every A listed or a part, widths 2 to 16, r past the listed A tokens, r = 0.
WINDOW_CASES = [
    (2, 64, 8, 8, 12),
    (1, 37, 5, 4, 7),
    (3, 50, 25, 2, 100),
    (2, 17, 2, 6, 0),
    (1, 300, 18, 16, 100),
    (2, 1001, 120, 8, 400),
]
WINDOW_IDS = [f"B{b}-N{n}-W{w}x{s}-r{r}" for b, n, w, s, r in WINDOW_CASES]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=WINDOW_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_window_match_indices_equal_reference(backend, case, dtype):
    device, _ = backend
    batch, num_tokens, num_windows, width, r = case
    windows = random_windows(num_tokens, num_windows, width).to(device)
    metric = window_tie_free_metric(batch, num_tokens, windows.cpu(), 64, dtype, device)
    expected = reference_outputs(torch.ops.tome.window_match, metric, windows, r)
    actual = torch.ops.tome.window_match(metric, windows, r)
    assert actual[1].shape == (batch, min(r, num_windows * width // 2))
    for a, e in zip(actual, expected):
        assert a.dtype == torch.int64 and a.is_contiguous()
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_window_match_reference_rules():
    """The reference, against a loop over windows: best B of the window (first on ties), ranking over the
    row with ties to the lower A position, unmerged A ascending, unlisted A tokens never merging."""
    windows = torch.tensor([[8, 3, 2, 1], [0, 7, 4, 11], [12, 9, 14, 13]])
    metric = torch.randn(2, 17, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one_hot = torch.eye(6, dtype=torch.float64)[0]
    metric[0, [4, 7, 12, 9]] = one_hot  # two exact best scores of 1: the lower A position (4) ranks first
    metric[0, 0] = 2 * one_hot  # a tie within a window (B 7 and B 11): the first slot (7)
    metric[0, 11] = 3 * one_hot
    metric[1, 14] = 0  # a zero vector scores 0 against every B: the first slot (9)
    unm, src, dst = reference_outputs(torch.ops.tome.window_match, metric, windows, 5)
    unit = torch.nn.functional.normalize(metric, dim=-1)
    for b in range(2):
        best = {}
        for window in windows.tolist():
            for a in window[0::2]:
                scores = [float(unit[b, a] @ unit[b, j]) for j in window[1::2]]
                best[a] = (max(scores), window[1::2][scores.index(max(scores))])
        ranked = sorted(best, key=lambda a: (-best[a][0], a))[:5]
        assert src[b].tolist() == ranked and dst[b].tolist() == [best[a][1] for a in ranked]
        assert unm[b].tolist() == sorted(set(range(0, 17, 2)) - set(ranked))
    assert src[0, :3].tolist() == [0, 4, 12] and dst[0, :3].tolist() == [7, 7, 9]
    assert best[14] == (0.0, 9)


def test_window_tables_follow_the_parity_split():
    grid = tome_kernels.layout.grid_windows([(4, 6), (3, 5)], 2, 4)
    assert grid.tolist() == [[0, 1, 2, 3, 6, 7, 8, 9], [12, 13, 14, 15, 18, 19, 20, 21],
                             [24, 25, 26, 27, 30, 29, 32, 31]]
    runs = tome_kernels.layout.segment_windows([(0, 9), (9, 20)], 4)
    assert runs.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13], [14, 15, 16, 17]]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pos_mode", ["keep", "mean"])
def test_bipartite_merge_equals_reference(backend, shape, dtype, pos_mode):
    device, _ = backend
    batch, num_tokens, channels, protected, r = shape
    x = make_tokens(batch, num_tokens, channels, dtype, device)
    pos = make_tokens(batch, num_tokens, 6, dtype, device, seed=3)
    size = make_size(batch, num_tokens, dtype, device)
    metric = tie_free_metric(batch, num_tokens, 64, torch.float32, device)
    args = (x, pos, size, r)
    kwargs = dict(metric=metric, protected=protected, pos_mode=pos_mode)
    expected = reference_outputs(torch.ops.tome.bipartite_merge, *args, **kwargs)
    actual = torch.ops.tome.bipartite_merge(*args, **kwargs)
    for a, e in zip(actual[:3], expected[:3]):
        assert a.shape == e.shape and a.dtype == e.dtype and a.is_contiguous()
        assert_close(a, e)
    for a, e in zip(actual[3:], expected[3:]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    if pos_mode == "keep":  # passthrough is data movement: exact
        torch.testing.assert_close(actual[1], expected[1], rtol=0, atol=0)


@pytest.mark.parametrize("shape", SHAPES[:4], ids=SHAPE_IDS[:4])
def test_merge_and_unmerge_equal_reference(backend, shape):
    device, _ = backend
    batch, num_tokens, channels, protected, r = shape
    x = make_tokens(batch, num_tokens, channels, torch.float32, device)
    indices = reference_outputs(torch.ops.tome.bipartite_match, tie_free_metric(batch, num_tokens, 64), r, protected)
    indices = [i.to(device) for i in indices]
    for size in (None, make_size(batch, num_tokens, torch.float32, device).squeeze(-1)):
        expected = reference_outputs(torch.ops.tome.merge, x, size, *indices, protected)
        for a, e in zip(torch.ops.tome.merge(x, size, *indices, protected), expected):
            assert_close(a, e)
    y = make_tokens(batch, num_tokens - indices[1].shape[1], channels, torch.float32, device)
    expected = reference_outputs(torch.ops.tome.unmerge, y, *indices, protected)
    torch.testing.assert_close(torch.ops.tome.unmerge(y, *indices, protected), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 197, 197, 64), (1, 2, 13, 29, 32), (2, 1, 5, 1, 16)],
                         ids=["vit", "cross", "single-key"])
@pytest.mark.parametrize("with_size", [True, False])
def test_prop_attention_equals_reference(backend, dtype, shape, with_size):
    device, _ = backend
    batch, heads, nq, nk, dim = shape
    q = make_tokens(batch * heads, nq, dim, dtype, device, 1).view(batch, heads, nq, dim)
    k = make_tokens(batch * heads, nk, dim, dtype, device, 2).view(batch, heads, nk, dim)
    v = make_tokens(batch * heads, nk, dim, dtype, device, 3).view(batch, heads, nk, dim)
    size = make_size(batch, nk, dtype, device) if with_size else None
    expected = reference_outputs(torch.ops.tome.prop_attention, q, k, v, size)
    assert_close(torch.ops.tome.prop_attention(q, k, v, size), expected)


def test_merge_source_traces_groups():
    x = make_tokens(2, 15, 4, torch.float32, "cpu")
    source = torch.eye(15).expand(2, 15, 15)
    _, _, _, *indices = torch.ops.tome.bipartite_merge(x, None, None, 5, protected=1)
    merged = torch.ops.tome.merge_source(source, *indices, 1)
    assert merged.shape == (2, 10, 15) and torch.equal(merged.sum(1), torch.ones(2, 15))
    assert torch.equal(merged[:, 0], source[:, 0])  # the class token stands for itself only


# ----------------------------------------------------------------------------------------------------
# Contract details
# ----------------------------------------------------------------------------------------------------
def test_r_zero_returns_inputs_unchanged(backend):
    device, _ = backend
    x = make_tokens(2, 9, 5, torch.float32, device)
    pos = make_tokens(2, 9, 3, torch.float32, device, 4)
    size = make_size(2, 9, torch.float32, device)
    for r, protected in ((0, 0), (4, 9), (3, 8)):
        x_out, pos_out, size_out, unm, src, dst = torch.ops.tome.bipartite_merge(x, pos, size, r, protected=protected,
                                                                                 pos_mode="mean")
        assert src.shape[1] == 0
        assert torch.equal(x_out, x) and torch.equal(pos_out, pos) and torch.equal(size_out, size)
        assert x_out.data_ptr() != x.data_ptr()
        assert torch.equal(torch.ops.tome.unmerge(x, unm, src, dst, protected), x)


def test_zero_metric_vector_gives_no_nan(backend):
    device, _ = backend
    x = make_tokens(1, 12, 4, torch.float32, device)
    metric = make_tokens(1, 12, 8, torch.float32, device)
    metric[:, 2] = 0
    metric[:, 5] = 0
    out = torch.ops.tome.bipartite_merge(x, None, None, 5, metric=metric)
    assert torch.isfinite(out[0]).all()
    expected = reference_outputs(torch.ops.tome.bipartite_merge, x, None, None, 5, metric=metric)
    for a, e in zip(out[3:], expected[3:]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_calls_are_deterministic(backend):
    device, _ = backend
    x = make_tokens(3, 197, 40, torch.float32, device)
    size = make_size(3, 197, torch.float32, device)
    first = torch.ops.tome.bipartite_merge(x, x, size, 60, protected=1, pos_mode="mean")
    second = torch.ops.tome.bipartite_merge(x, x, size, 60, protected=1, pos_mode="mean")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_noncontiguous_and_expanded_inputs(backend):
    device, _ = backend
    base = make_tokens(2, 21, 12, torch.float32, device)
    x = base[:, :, ::2]  # strided view
    size = torch.arange(1.0, 22.0, device=device)[None, :, None].expand(2, 21, 1)  # stride 0 in batch
    pos = make_tokens(1, 21, 4, torch.float32, device).expand(2, 21, 4)
    metric = base.transpose(1, 2).contiguous().transpose(1, 2)
    strided = torch.ops.tome.bipartite_merge(x, pos, size, 6, metric=metric, protected=1, pos_mode="mean")
    dense = torch.ops.tome.bipartite_merge(x.contiguous(), pos.contiguous(), size.contiguous(), 6,
                                           metric=metric.contiguous(), protected=1, pos_mode="mean")
    for a, b in zip(strided, dense):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# Autograd, opcheck, compile
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos_mode", ["keep", "mean"])
@pytest.mark.parametrize("protected", [0, 2])
def test_bipartite_merge_gradcheck(backend, pos_mode, protected):
    device, name = backend
    x = make_tokens(2, 11, 3, torch.float64, device).requires_grad_()
    pos = make_tokens(2, 11, 2, torch.float64, device, 5).requires_grad_()
    size = (make_size(2, 11, torch.float64, device) + 0.5).requires_grad_()
    metric = tie_free_metric(2, 11, 64, torch.float64, device)

    def step(x, pos, size):
        return torch.ops.tome.bipartite_merge(x, pos, size, 3, metric=metric, protected=protected,
                                              pos_mode=pos_mode)[:3]

    # The Triton interpreter runs every program in Python: directional (fast_mode) checks keep it short.
    assert torch.autograd.gradcheck(step, (x, pos, size), fast_mode=name == "triton")


def test_unmerge_and_attention_gradcheck(backend):
    device, name = backend
    metric = tie_free_metric(2, 12, 64, torch.float64, device)
    indices = torch.ops.tome.bipartite_match(metric, 4, 1)
    y = make_tokens(2, 8, 3, torch.float64, device).requires_grad_()
    fast = name == "triton"
    assert torch.autograd.gradcheck(lambda y: torch.ops.tome.unmerge(y, *indices, 1), (y,), fast_mode=fast)
    q, k, v = (make_tokens(2, 7, 8, torch.float64, device, s).view(1, 2, 7, 8).requires_grad_() for s in (1, 2, 3))
    size = make_size(1, 7, torch.float64, device)
    assert torch.autograd.gradcheck(lambda q, k, v: torch.ops.tome.prop_attention(q, k, v, size), (q, k, v),
                                    fast_mode=fast)


def _opcheck_cases(device):
    x = make_tokens(2, 13, 4, torch.float32, device).requires_grad_()
    pos = make_tokens(2, 13, 3, torch.float32, device, 3).requires_grad_()
    size = make_size(2, 13, torch.float32, device)
    metric = tie_free_metric(2, 13, 64, torch.float32, device)
    indices = tuple(torch.ops.tome.bipartite_match(metric, 4, 1))
    q, k, v = (make_tokens(2, 9, 16, torch.float32, device, s).view(1, 2, 9, 16).requires_grad_() for s in (1, 2, 3))
    return [
        (torch.ops.tome.bipartite_match.default, (metric, 4, 1), {}),
        (torch.ops.tome.window_match.default, (metric, random_windows(13, 3, 4).to(device), 4), {}),
        (torch.ops.tome.bipartite_merge.default, (x, pos, size, 4), dict(metric=metric, protected=1, pos_mode="mean")),
        (torch.ops.tome._merge.default, (x, pos, size, *indices, 1, "keep"), {}),
        (torch.ops.tome.merge.default, (x, size, *indices, 1), {}),
        (torch.ops.tome.unmerge.default, (x[:, :9], *indices, 1), {}),
        (torch.ops.tome.prop_attention.default, (q, k, v, size[:1, :9]), {}),
        (torch.ops.tome._prop_attention.default, (q, k, v, None, 0.25), {}),
        (torch.ops.tome.merge_source.default, (torch.eye(13, device=device).expand(2, 13, 13), *indices, 1), {}),
    ]


def test_opcheck(backend):
    device, _ = backend
    for op, args, kwargs in _opcheck_cases(device):
        opcheck(op, args, kwargs)


def test_compile_fullgraph_with_backward(backend):
    """One ToMe layer (attention with sizes, merge, unmerge) compiles into a single graph."""
    device, _ = backend
    torch._dynamo.reset()
    x = make_tokens(2, 17, 16, torch.float32, device).requires_grad_()

    def layer(x):
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device)
        q = k = v = x.view(2, 17, 2, 8).transpose(1, 2)
        attended = torch.ops.tome.prop_attention(q, k, v, size).transpose(1, 2).reshape(2, 17, 16)
        merged, _, size_out, *indices = torch.ops.tome.bipartite_merge(attended, None, size, 5, metric=k.mean(1),
                                                                       protected=1)
        return torch.ops.tome.unmerge(merged * size_out, *indices, 1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    expected = layer(x)
    actual = compiled(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    (grad_expected,) = torch.autograd.grad(expected.sum(), x)
    (grad_actual,) = torch.autograd.grad(actual.sum(), x)
    torch.testing.assert_close(grad_actual, grad_expected, rtol=1e-6, atol=1e-6)


def test_window_match_compiles_with_merge_and_unmerge(backend):
    """The dense form (match in windows, merge, compute, unmerge) compiles into a single graph."""
    device, _ = backend
    torch._dynamo.reset()
    windows = random_windows(40, 5, 8).to(device)
    metric = window_tie_free_metric(2, 40, windows.cpu(), 64, torch.float32, device)
    x = make_tokens(2, 40, 16, torch.float32, device).requires_grad_()

    def layer(x):
        indices = torch.ops.tome.window_match(metric, windows, 12)
        merged, _ = torch.ops.tome.merge(x, None, *indices, 0)
        return x + torch.ops.tome.unmerge(merged.tanh(), *indices, 0)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    expected = layer(x)
    torch.testing.assert_close(compiled(x), expected, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(compiled(x).sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), x)[0], rtol=1e-6, atol=1e-6)


def test_compile_inductor_dynamic_shapes():
    """Inductor with shapes that change between calls (N shrinks every layer) does not recompile per N."""
    torch._dynamo.reset()

    def step(x):
        return torch.ops.tome.bipartite_merge(x, None, None, 4, protected=1)[0].sum(1)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for num_tokens in (31, 27, 23):
        x = make_tokens(2, num_tokens, 8, torch.float32, "cpu")
        torch.testing.assert_close(compiled(x), step(x))


# ----------------------------------------------------------------------------------------------------
# Bad input: one clear exception naming the argument
# ----------------------------------------------------------------------------------------------------
def _bad_calls():
    x = torch.randn(2, 10, 4)
    idx = torch.ops.tome.bipartite_match(x, 3, 1)
    other = torch.ops.tome.bipartite_match(torch.randn(2, 12, 4), 3, 1)
    duplicated = torch.cat([idx[1][:, :2], idx[1][:, :1]], 1)
    q = torch.randn(1, 2, 5, 8)
    ops = torch.ops.tome
    windows = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    return [
        ("windows must be an int64 [num_windows, even width]", lambda: ops.window_match(x, windows[:, :3], 2)),
        ("windows must be an int64 [num_windows, even width]", lambda: ops.window_match(x, windows.int(), 2)),
        ("windows must hold token positions in [0, N=10)", lambda: ops.window_match(x, windows + 4, 2)),
        ("windows must hold even (A) positions in its even slots", lambda: ops.window_match(x, windows.flip(1), 2)),
        ("windows must list each A (even) position at most once", lambda: ops.window_match(x, windows[[0, 0]], 2)),
        ("r must be >= 0", lambda: ops.window_match(x, windows, -1)),
        ("r must be >= 0", lambda: ops.bipartite_merge(x, None, None, -1)),
        ("x must have 3 dimensions", lambda: ops.bipartite_merge(x[0], None, None, 2)),
        ("metric must be [batch, N, Cm]", lambda: ops.bipartite_merge(x, None, None, 2, metric=torch.randn(2, 9, 4))),
        ("pos must start with [batch=2, N=10]", lambda: ops.bipartite_merge(x, torch.randn(2, 9, 4), None, 2)),
        ("size must be [batch=2, N=10, 1]", lambda: ops.bipartite_merge(x, None, torch.ones(1, 10, 1), 2)),
        ("protected must be in [0, N=10]", lambda: ops.bipartite_merge(x, None, None, 2, protected=-1)),
        ("protected must be in [0, N=10]", lambda: ops.bipartite_merge(x, None, None, 2, protected=11)),
        ("x must be float16, bfloat16, float32 or float64", lambda: ops.bipartite_merge(x.int(), None, None, 2)),
        ("metric must be float16", lambda: ops.bipartite_match(x.long(), 2)),
        ("pos_mode must be one of", lambda: ops.bipartite_merge(x, x, None, 2, pos_mode="avg")),
        ("attention shapes must be", lambda: ops.prop_attention(q, q[:, :1], q)),
        ("attention shapes must be", lambda: ops.prop_attention(q, q, q[..., :4])),
        ("size must be [batch=1, N=5, 1]", lambda: ops.prop_attention(q, q, q, torch.ones(1, 4))),
        ("q, k, v must share a dtype", lambda: ops.prop_attention(q, q.double(), q)),
        ("do not fit N=10 tokens", lambda: ops.merge(x, None, *other, 1)),
        ("do not fit N=10 tokens", lambda: ops.unmerge(x[:, :7], *other[:1], *idx[1:], 1)),
        ("dst_idx must hold odd (B) token positions", lambda: ops.merge(x, None, *idx[:2], idx[2] + 100, 1)),
        ("unm_idx and src_idx must hold every even (A) token position", lambda: ops.unmerge(x[:, :7], idx[0], duplicated, idx[2], 1)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_is_a_clear_error(backend, case):
    message, call = _bad_calls()[case]
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        call()


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        tome_kernels.set_backend("fast")
    with pytest.raises(RuntimeError, match="cannot run on cpu tensors"):
        with tome_kernels.use_backend("cuda"):
            torch.ops.tome.bipartite_match(torch.randn(1, 4, 2), 1)
