"""The C++ CPU backend (csrc/cpu) against the reference: every ``_native_*`` kernel through the public ops
with ``use_backend("cpu")`` (expected values from ``use_backend("torch")``), plus the native ops called
directly (memory safety, fresh outputs) and determinism across thread counts."""

import pytest
import torch
from tome_testing import tie_free_metric, window_tie_free_metric
from torch.library import opcheck

import tome_kernels
from tome_kernels import layout, reference, use_backend

_REASON = tome_kernels.available_backends("cpu")["cpu"]
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"cpu backend unavailable: {_REASON}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (rtol, atol): fp32 accumulation everywhere, so half types differ from the reference by at most one ulp.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-5),
       torch.bfloat16: (8e-3, 1e-5)}
NUM_TOKENS = [2, 3, 11, 101, 197, 257, 577]  # tiny, odd, prime, ViT-B/16 224, ViT-L/14 224, ViT-B/16 384
PROTECTED = [0, 1, 2, 5]
def _cases(full_dtypes, num_tokens=NUM_TOKENS):
    """Every N x protected in ``full_dtypes``; the other dtypes on a ViT-sized and a tiny N."""
    cases = [(n, p, d) for n in num_tokens for p in PROTECTED if p <= n for d in full_dtypes]
    cases += [(n, p, d) for n in (11, 197) for p in (0, 1) for d in DTYPES if d not in full_dtypes]
    return [pytest.param(*case, id=f"N{case[0]}-p{case[1]}-{str(case[2])[6:]}") for case in cases]


MATCH_CASES = _cases((torch.float32, torch.float64))
MERGE_CASES = _cases((torch.float32,))
ops = torch.ops.tome


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core box a 2-thread OpenMP region waits for a descheduled thread
    (5-10x slower under load). Multi-threaded results are compared bit for bit with single-threaded ones in
    test_deterministic_across_calls_and_thread_counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def on_both(fn, *args, **kwargs):
    """``(cpu backend result, reference result)`` of one public-op call."""
    with use_backend("cpu"):
        actual = fn(*args, **kwargs)
    with use_backend("torch"):
        expected = fn(*args, **kwargs)
    return actual, expected


def assert_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape and actual.is_contiguous()
    rtol, atol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def assert_tie_free(metric, protected):
    """Precondition of exact index comparisons: best partners and best scores separated far above fp32
    rounding (fp64 scores of the metric actually passed)."""
    num_tokens = metric.shape[1]
    unit = metric.double() / metric.double().norm(dim=-1, keepdim=True).clamp_min(reference.NORM_EPS)
    scores = unit[:, reference.a_positions(num_tokens, protected)] @ unit[:, reference.b_positions(
        num_tokens, protected)].transpose(1, 2)
    if scores.numel() == 0:
        return
    top = scores.topk(min(2, scores.shape[-1]), dim=-1).values
    if top.shape[-1] == 2:
        assert (top[..., 0] - top[..., 1]).min() > 1e-5
    gaps = top[..., 0].sort(dim=-1).values.diff(dim=-1)
    assert gaps.numel() == 0 or gaps.min() > 1e-5


def tokens(batch, num_tokens, channels, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_tokens, channels, generator=gen, dtype=torch.float64).to(dtype)


def sizes(batch, num_tokens, dtype, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return (1 + torch.rand(batch, num_tokens, 1, generator=gen, dtype=torch.float64) * 3).to(dtype)


def group_members(num_tokens, protected, indices):
    """Member count of every output token (1 = merged with nothing: its row must be copied bit-exactly)."""
    group = reference.groups(num_tokens, protected, *indices)
    num_out = num_tokens - indices[1].shape[1]
    return torch.zeros(group.shape[0], num_out, dtype=torch.long).scatter_add_(1, group, torch.ones_like(group))


# ----------------------------------------------------------------------------------------------------
# match
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens, protected, dtype", MATCH_CASES)
def test_match_indices_equal_reference(num_tokens, protected, dtype):
    for batch in (1, 3):
        metric = tie_free_metric(batch, num_tokens, 64, dtype, seed=num_tokens + protected)
        assert_tie_free(metric, protected)
        limit = max(0, (num_tokens - protected) // 2)
        for r in sorted({0, 1, 16, limit, limit + 7}):
            actual, expected = on_both(ops.bipartite_match, metric, r, protected)
            for a, e in zip(actual, expected):
                assert a.dtype == torch.int64 and a.is_contiguous()
                assert_exact(a, e)


@pytest.mark.parametrize("protected", [0, 1])
def test_match_exact_ties(protected):
    """Scores that tie exactly (one-hot tokens score exactly 0 or 1; zero vectors score 0, never NaN):
    first best B partner, then the lower A position ranks first."""
    gen = torch.Generator().manual_seed(0)
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 5, (2, 40), generator=gen), 5).double()
    scaled = one_hot * torch.randint(1, 4, (2, 40, 1), generator=gen)
    with_zeros = tie_free_metric(2, 40, 64)
    with_zeros[:, 4:20:3] = 0
    for metric in (one_hot, scaled, torch.zeros(2, 40, 8), with_zeros):
        for dtype in (torch.float32, torch.bfloat16):
            for r in (0, 7, 19):
                actual, expected = on_both(ops.bipartite_match, metric.to(dtype), r, protected)
                for a, e in zip(actual, expected):
                    assert_exact(a, e)


# Multi-scale feature grids (Deformable DETR-like: level offsets of both parities, edges off the tiles).
GRIDS = [(10, 13), (5, 7), (3, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", [(2, 4), (1, 2), (4, 4)], ids=str)
def test_window_match_on_grid_tiles_equals_reference(dtype, tile):
    windows = layout.grid_windows(GRIDS, *tile)
    num_tokens = sum(h * w for h, w in GRIDS)
    metric = window_tie_free_metric(2, num_tokens, windows, 64, dtype, seed=tile[0])
    for r in (0, 1, 40, windows.numel() // 2, 10**6):
        actual, expected = on_both(ops.window_match, metric, windows, r)
        for a, e in zip(actual, expected):
            assert a.dtype == torch.int64 and a.is_contiguous()
            assert_exact(a, e)


def test_window_match_exact_ties():
    """Exact ties (one-hot tokens, zero vectors): first B slot of the window, then the lower A position."""
    windows = layout.segment_windows([(0, 40), (40, 66)], 6)
    gen = torch.Generator().manual_seed(0)
    one_hot = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 66), generator=gen), 3).double()
    with_zeros = torch.randn(2, 66, 16, generator=gen, dtype=torch.float64)
    with_zeros[:, 2:50:5] = 0
    for metric in (one_hot, torch.zeros(2, 66, 4), with_zeros):
        for dtype in (torch.float32, torch.bfloat16):
            for r in (0, 7, 30):
                actual, expected = on_both(ops.window_match, metric.to(dtype), windows, r)
                for a, e in zip(actual, expected):
                    assert_exact(a, e)


# ----------------------------------------------------------------------------------------------------
# merge (+ backward)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos_mode", ["keep", "mean"])
@pytest.mark.parametrize("num_tokens, protected, dtype", MERGE_CASES)
def test_bipartite_merge_equals_reference(num_tokens, protected, dtype, pos_mode):
    batch = 1 if num_tokens > 200 else 2
    metric = tie_free_metric(batch, num_tokens, 64, torch.float32, seed=num_tokens)
    limit = max(0, (num_tokens - protected) // 2)
    for r, with_size in ((min(limit, num_tokens // 4 + 1), True), (limit + 3, False)):
        x = tokens(batch, num_tokens, 24, dtype).requires_grad_()
        pos = tokens(batch, num_tokens, 5, dtype, seed=3).requires_grad_()
        size = sizes(batch, num_tokens, dtype) if with_size else None
        actual, expected = on_both(ops.bipartite_merge, x, pos, size, r, metric=metric, protected=protected,
                                   pos_mode=pos_mode)
        for a, e in zip(actual[3:], expected[3:]):
            assert_exact(a, e)
        for a, e in zip(actual[:3], expected[:3]):
            assert_close(a, e)
        if pos_mode == "keep":
            assert_exact(actual[1], expected[1])
        alone = group_members(num_tokens, protected, actual[3:]) == 1
        assert_exact(actual[0][alone], expected[0][alone])

        grad_x, grad_pos = tokens(batch, num_tokens - actual[4].shape[1], 24, dtype, 4), tokens(
            batch, num_tokens - actual[4].shape[1], 5, dtype, 5)
        for a, e in zip(torch.autograd.grad(actual[:2], (x, pos), (grad_x, grad_pos)),
                        torch.autograd.grad(expected[:2], (x, pos), (grad_x, grad_pos))):
            assert_close(a, e)


@pytest.mark.parametrize("channels", [1, 3, 64, 255, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unmerge_channels(channels, dtype):
    batch, num_tokens, protected = 2, 197, 1
    indices = ops.bipartite_match(tie_free_metric(batch, num_tokens, 64), 50, protected)
    x = tokens(batch, num_tokens, channels, dtype).requires_grad_()
    size = sizes(batch, num_tokens, torch.float32)  # sizes may have another dtype than x
    actual, expected = on_both(ops.merge, x, size, *indices, protected)
    for a, e in zip(actual, expected):
        assert_close(a, e)
    grad = tokens(batch, num_tokens - 50, channels, dtype, 4)
    assert_close(torch.autograd.grad(actual[0], x, grad)[0], torch.autograd.grad(expected[0], x, grad)[0])

    y = tokens(batch, num_tokens - 50, channels, dtype, 5).requires_grad_()
    actual, expected = on_both(ops.unmerge, y, *indices, protected)
    assert_exact(actual, expected)  # data movement
    grad = tokens(batch, num_tokens, channels, dtype, 6)
    assert_close(torch.autograd.grad(actual, y, grad)[0], torch.autograd.grad(expected, y, grad)[0])


@pytest.mark.parametrize("num_tokens, protected, dtype", MERGE_CASES)
def test_unmerge_equals_reference(num_tokens, protected, dtype):
    metric = tie_free_metric(2, num_tokens, 64, seed=7)
    for r in (num_tokens // 3, num_tokens):
        indices = ops.bipartite_match(metric, r, protected)
        y = tokens(2, num_tokens - indices[1].shape[1], 9, dtype).requires_grad_()
        actual, expected = on_both(ops.unmerge, y, *indices, protected)
        assert_exact(actual, expected)
        grad = tokens(2, num_tokens, 9, dtype, 8)
        grad_actual, grad_expected = torch.autograd.grad(actual, y, grad)[0], torch.autograd.grad(expected, y, grad)[0]
        assert_close(grad_actual, grad_expected)
        alone = group_members(num_tokens, protected, indices) == 1  # a lone token's gradient is a copy
        assert_exact(grad_actual[alone], grad_expected[alone])


def test_size_gradient_equals_reference():
    metric = tie_free_metric(2, 41, 64)
    x = tokens(2, 41, 6, torch.float32).requires_grad_()
    pos = tokens(2, 41, 3, torch.float32, 3).requires_grad_()
    size = sizes(2, 41, torch.float32).requires_grad_()
    actual, expected = on_both(ops.bipartite_merge, x, pos, size, 12, metric=metric, protected=1, pos_mode="mean")
    outs = [tokens(2, 29, c, torch.float32, s) for c, s in ((6, 4), (3, 5), (1, 6))]
    for a, e in zip(torch.autograd.grad(actual[:3], (x, pos, size), outs),
                    torch.autograd.grad(expected[:3], (x, pos, size), outs)):
        assert_close(a, e)


# ----------------------------------------------------------------------------------------------------
# attention (+ backward)
# ----------------------------------------------------------------------------------------------------
def _attention_error(out, grads, reference_out, reference_grads):
    return [(a.double() - b).abs().max().item() for a, b in zip((out, *grads), (reference_out, *reference_grads))]


ATTENTION_SHAPES = {"vit": (2, 3, 197, 197, 64), "vit384": (1, 2, 577, 577, 64), "cross": (1, 2, 13, 29, 32),
                    "tiny": (2, 1, 2, 3, 8)}
ATTENTION_CASES = [pytest.param(shape, dtype, id=f"{name}-{str(dtype)[6:]}") for name, shape in ATTENTION_SHAPES.items()
                   for dtype in DTYPES if name != "vit384" or dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("shape, dtype", ATTENTION_CASES)
@pytest.mark.parametrize("with_size", [True, False])
def test_prop_attention_equals_reference(shape, dtype, with_size):
    """Output, fp32/fp64 lse and q/k/v gradients; half types: error vs an fp64 evaluation at most twice the
    reference's own (the flash kernel rounds differently, not worse)."""
    batch, heads, nq, nk, dim = shape
    q, k, v = (tokens(batch * heads, n, dim, dtype, seed).view(batch, heads, n, dim).requires_grad_()
               for n, seed in ((nq, 1), (nk, 2), (nk, 3)))
    size = sizes(batch, nk, dtype).squeeze(-1) if with_size else None
    scale = dim ** -0.5
    grad = tokens(batch * heads, nq, dim, dtype, 4).view(batch, heads, nq, dim)
    (out, lse), (ref_out, ref_lse) = on_both(ops._prop_attention, q, k, v, size, scale)
    assert lse.dtype == ref_lse.dtype and lse.is_contiguous() and out.is_contiguous()
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), grad)
    if dtype in (torch.float32, torch.float64):
        assert_close(lse, ref_lse)
        for a, e in zip((out, *grads), (ref_out, *ref_grads)):
            assert_close(a, e)
        return
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)  # fp32 both
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with use_backend("torch"):
        exact = ops._prop_attention(q64, k64, v64, None if size is None else size.double(), scale)[0]
    exact_grads = torch.autograd.grad(exact, (q64, k64, v64), grad.double())
    ulp = torch.finfo(dtype).eps
    for err, ref_err in zip(_attention_error(out, grads, exact, exact_grads),
                            _attention_error(ref_out, ref_grads, exact, exact_grads)):
        assert err <= 2 * ref_err + ulp


# ----------------------------------------------------------------------------------------------------
# Strided inputs, determinism
# ----------------------------------------------------------------------------------------------------
def test_noncontiguous_inputs():
    base = tokens(2, 197, 96, torch.float32)
    x = base[:, :, ::2]  # strided
    metric = base.transpose(1, 2).contiguous().transpose(1, 2)[..., :64]
    pos = tokens(1, 197, 4, torch.float32, 3).expand(2, 197, 4)  # stride 0 in batch
    size = torch.cat([sizes(2, 197, torch.float32), torch.zeros(2, 197, 1)], -1)[..., :1]
    kwargs = dict(metric=metric, protected=1, pos_mode="mean")
    actual, expected = on_both(ops.bipartite_merge, x, pos, size, 40, **kwargs)
    with use_backend("cpu"):
        dense = ops.bipartite_merge(x.contiguous(), pos.contiguous(), size.contiguous(), 40,
                                    metric=metric.contiguous(), protected=1, pos_mode="mean")
        y = base.transpose(1, 2)[:, :45, :157].transpose(1, 2)  # [2, 157, 45], strided
        assert_exact(ops.unmerge(y, *actual[3:], 1), ops.unmerge(y.contiguous(), *actual[3:], 1))
    for a, e, d in zip(actual, expected, dense):
        assert_exact(a, d)
        (assert_exact if a.dtype == torch.int64 else assert_close)(a, e)

    qkv = tokens(2, 50, 3 * 4 * 16, torch.float32).view(2, 50, 3, 4, 16).permute(2, 0, 3, 1, 4)  # timm layout
    q, k, v = qkv.unbind(0)
    size = sizes(2, 50, torch.float32)
    (out, lse), (ref_out, ref_lse) = on_both(ops._prop_attention, q, k, v, size, 0.25)
    with use_backend("cpu"):
        dense_out, _ = ops._prop_attention(q.contiguous(), k.contiguous(), v.contiguous(), size, 0.25)
    assert_exact(out, dense_out)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


def _one_step(x, pos, size, metric, heads, protected):
    x, pos = x.detach().requires_grad_(), pos.detach().requires_grad_()
    batch, num_tokens, channels = x.shape
    q = k = v = x.view(batch, num_tokens, heads, channels // heads).transpose(1, 2)
    attended = ops.prop_attention(q, k, v, size).transpose(1, 2).reshape(x.shape)
    out = ops.bipartite_merge(attended, pos, size, num_tokens // 3, metric=metric, protected=protected,
                              pos_mode="mean")
    restored = ops.unmerge(out[0], *out[3:], protected)
    (restored.square().sum() + out[1].sum()).backward()
    return [*out, restored, x.grad, pos.grad]


# ViT-B (many batch rows), ViT-B/16 384 with one row (several score tiles per row), DETR (metric = x).
@pytest.mark.parametrize("batch, num_tokens, channels, heads, protected",
                         [(3, 197, 64, 4, 1), (1, 577, 64, 4, 1), (2, 1100, 256, 8, 0)], ids=["vit", "vit384", "detr"])
def test_deterministic_across_calls_and_thread_counts(batch, num_tokens, channels, heads, protected):
    x = tokens(batch, num_tokens, channels, torch.float32)
    pos = tokens(batch, num_tokens, 5, torch.float32, 3)
    size = sizes(batch, num_tokens, torch.float32)
    metric = x if channels == 256 else tokens(batch, num_tokens, 64, torch.float32, 4)  # random: near-ties too
    results = []
    with use_backend("cpu"):
        for threads in (1, 1, 2, 2):
            torch.set_num_threads(threads)
            results.append(_one_step(x, pos, size, metric, heads, protected))
    for first, *others in zip(*results):
        assert all(torch.equal(first, other) for other in others)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 2, 577, 577, 32), (8, 2, 197, 197, 24), (1, 3, 13, 1100, 40)], ids=str)
def test_attention_backward_same_bits_for_any_thread_count(shape, dtype):
    """The backward is our own kernel with a fixed reduction order: identical bits for 1, 2 and 3 threads
    (masked keys included), at whatever instruction-set level the process runs (test_isa_levels.py)."""
    batch, heads, nq, nk, dim = shape
    q, k, v, grad = (tokens(batch * heads, n, dim, dtype, seed).view(batch, heads, n, dim)
                     for n, seed in ((nq, 1), (nk, 2), (nk, 3), (nq, 4)))
    size = sizes(batch, nk, dtype).squeeze(-1)
    size[:, ::7] = 0
    with use_backend("cpu"):
        out, lse = ops._prop_attention(q, k, v, size, dim ** -0.5)
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops._prop_attention_backward(grad, q, k, v, size, out, lse, dim ** -0.5))
    for first, *others in zip(*results):
        assert all(torch.equal(first.view(torch.uint8), o.view(torch.uint8)) for o in others)


def test_fully_masked_batch_rows_stay_on_the_flash_path():
    """A batch row whose keys all have size 0 (a padded image) gets out 0, lse -inf and zero gradients
    without recomputing the call with materialised [B, H, N, N] logits: it allocates no more than a call
    with sizes 1 (the fallback would allocate the 4 x 1500^2 fp32 logits, 36 MB, many times over)."""
    q, k, v = (tokens(4, 1500, 16, torch.float32, s).view(1, 4, 1500, 16).requires_grad_() for s in (1, 2, 3))
    ones, masked = torch.ones(1, 1500), torch.zeros(1, 1500)

    def allocated(size):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            with use_backend("cpu"):
                out, lse = ops._prop_attention(q, k, v, size, 0.25)
                grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0), out, lse, grads

    baseline, *_ = allocated(ones)
    used, out, lse, grads = allocated(masked)
    assert used <= 1.5 * baseline
    assert (out == 0).all() and lse.isneginf().all() and all((g == 0).all() for g in grads)
    size = torch.ones(2, 1500)
    size[1] = 0  # one padded row beside a real one: the real row is unchanged
    q2, k2, v2 = (torch.cat([t.detach(), t.detach()]) for t in (q, k, v))
    (out2, lse2), (ref_out, ref_lse) = on_both(ops._prop_attention, q2, k2, v2, size, 0.25)
    assert_close(out2, ref_out)
    assert torch.equal(lse2[1], ref_lse[1]) and lse2[1].isneginf().all()


# ----------------------------------------------------------------------------------------------------
# Autograd and op registration through the public ops
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos_mode", ["keep", "mean"])
@pytest.mark.parametrize("protected", [0, 1])
def test_gradcheck(pos_mode, protected):
    metric = tie_free_metric(2, 13, 64, torch.float64)
    x = tokens(2, 13, 3, torch.float64).requires_grad_()
    pos = tokens(2, 13, 2, torch.float64, 5).requires_grad_()
    size = sizes(2, 13, torch.float64).requires_grad_()
    with use_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda x, pos, size: ops.bipartite_merge(x, pos, size, 4, metric=metric, protected=protected,
                                                     pos_mode=pos_mode)[:3], (x, pos, size), fast_mode=True)
        indices = ops.bipartite_match(metric, 4, protected)
        y = tokens(2, 9, 3, torch.float64, 6).requires_grad_()
        assert torch.autograd.gradcheck(lambda y: ops.unmerge(y, *indices, protected), (y,), fast_mode=True)
        q, k, v = (tokens(2, 7, 8, torch.float64, s).view(1, 2, 7, 8).requires_grad_() for s in (1, 2, 3))
        assert torch.autograd.gradcheck(lambda q, k, v: ops.prop_attention(q, k, v, size[:1, :7].detach()), (q, k, v),
                                        fast_mode=True)


def test_opcheck():
    x = tokens(2, 13, 4, torch.float32).requires_grad_()
    pos = tokens(2, 13, 3, torch.float32, 3).requires_grad_()
    size = sizes(2, 13, torch.float32)
    metric = tie_free_metric(2, 13, 64)
    q, k, v = (tokens(2, 9, 16, torch.float32, s).view(1, 2, 9, 16).requires_grad_() for s in (1, 2, 3))
    with use_backend("cpu"):
        indices = tuple(ops.bipartite_match(metric, 4, 1))
        out, lse = ops._prop_attention(q, k, v, size[:1, :9, 0], 0.25)
        cases = [
            (ops.bipartite_match.default, (metric, 4, 1), {}),
            (ops.bipartite_merge.default, (x, pos, size, 4), dict(metric=metric, protected=1, pos_mode="mean")),
            (ops.merge.default, (x, size, *indices, 1), {}),
            (ops.unmerge.default, (x[:, :9], *indices, 1), {}),
            (ops.prop_attention.default, (q, k, v, size[:1, :9]), {}),
            (ops._merge.default, (x, pos, size, *indices, 1, "keep"), {}),
            (ops._merge_backward.default, (x[:, :9].detach(), pos[:, :9].detach(), size, size[:, :9], *indices, 1,
                                           "mean"), {}),
            (ops._unmerge_backward.default, (x.detach(), *indices, 1), {}),
            (ops._prop_attention.default, (q, k, v, size[:1, :9, 0], 0.25), {}),
            (ops._prop_attention_backward.default, (out.detach(), q.detach(), k.detach(), v.detach(),
                                                    size[:1, :9, 0], out.detach(), lse, 0.25), {}),
        ]
        for op, args, kwargs in cases:
            opcheck(op, args, kwargs)


# ----------------------------------------------------------------------------------------------------
# The native ops called directly: exact reference semantics, memory safety, fresh outputs
# ----------------------------------------------------------------------------------------------------
def test_native_ops_match_reference_directly():
    x = tokens(2, 21, 5, torch.float32)
    size = sizes(2, 21, torch.float32).squeeze(-1)
    for r in (0, 6):  # r = 0: the identity, in input order (ops do not short-cut at this level)
        indices = ops._native_match(x, r, 1)
        for a, e in zip(indices, reference.match(x, r, 1)):
            assert_exact(a, e)
        merged = ops._native_merge(x, x, size, *indices, 1, True)
        for a, e in zip(merged, reference.merge(x, x, size, *indices, 1, True)):
            assert_close(a, e)
            assert a.data_ptr() != x.data_ptr()
        y = merged[0]
        assert_exact(ops._native_unmerge(y, *indices, 1), reference.unmerge(y, *indices, 1))
        assert_close(ops._native_unmerge_backward(x, *indices, 1), reference.unmerge_backward(x, *indices, 1))
        for a, e in zip(ops._native_merge_backward(y, y, size, merged[2], *indices, 1, False),
                        reference.merge_backward(y, y, size, merged[2], *indices, 1, False)):
            assert_close(a, e)
    q = tokens(2, 7, 8, torch.float32).view(1, 2, 7, 8)
    out, lse = ops._native_attention(q, q, q, None, 0.3)
    assert out.data_ptr() != q.data_ptr() and out.is_contiguous() and lse.is_contiguous()
    for a, e in zip(ops._native_attention_backward(q, q, q, q, None, out, lse, 0.3),
                    reference.attention_backward(q, q, q, q, None, out, lse, 0.3)):
        assert_close(a, e)
        assert a.data_ptr() != q.data_ptr()


def _bad_native_calls():
    x = tokens(2, 10, 4, torch.float32)
    unm, src, dst = ops._native_match(x, 3, 1)
    return [
        ("A) token position", lambda: ops._native_unmerge(x[:, :7], unm, src + 100, dst, 1)),
        ("A) token position", lambda: ops._native_unmerge(x[:, :7], unm, src - 100, dst, 1)),
        ("A) token position", lambda: ops._native_merge(x, None, None, unm, src + 1, dst, 1, False)),
        ("A) token position", lambda: ops._native_merge(x, None, None, unm, src[:, [0, 0, 1]], dst, 1, False)),
        ("dst_idx must hold odd", lambda: ops._native_merge_backward(x[:, :7], None, None, x[:, :7, 0], unm, src,
                                                                    dst - 1, 1, False)),
        ("dst_idx must hold odd", lambda: ops._native_unmerge_backward(x, unm, src, dst + 100, 1)),
        ("do not fit N=", lambda: ops._native_unmerge_backward(x, unm[:, :0], src, dst, 1)),
        ("unm_idx must be an int64", lambda: ops._native_unmerge(x[:, :7], unm.int(), src, dst, 1)),
        ("src_idx and dst_idx must have one shape", lambda: ops._native_unmerge(x[:, :7], unm, src, dst[:, :2], 1)),
        ("protected must be in", lambda: ops._native_match(x, 3, 11)),
        ("r must be >= 0", lambda: ops._native_match(x, -1, 0)),
        ("size must have shape", lambda: ops._native_merge(x, None, x[..., 0][:, :9], unm, src, dst, 1, False)),
        ("lse must be", lambda: ops._native_attention_backward(*[x.view(1, 2, 10, 4)] * 4, None, x.view(1, 2, 10, 4),
                                                               x[..., 0].view(1, 2, 10).double(), 0.5)),
        ("grad_out and out must have q's dtype", lambda: ops._native_attention_backward(
            x.view(1, 2, 10, 4).double(), *[x.view(1, 2, 10, 4)] * 3, None, x.view(1, 2, 10, 4), x[..., 0].view(1, 2, 10),
            0.5)),
        ("grad_out and out must have q's dtype", lambda: ops._native_attention_backward(
            *[x.view(1, 2, 10, 4)] * 4, None, x.view(1, 2, 10, 4).half(), x[..., 0].view(1, 2, 10), 0.5)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_native_calls())))
def test_native_ops_reject_bad_indices(case):
    message, call = _bad_native_calls()[case]
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        call()
