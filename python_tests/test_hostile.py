"""Hostile inputs (docs/RELIABILITY.md): every one gets a clear error (one ValueError / TypeError starting with
``tome:`` and naming the argument) or a documented result, on every backend, never a crash, hang,
out-of-bounds access or silent NaN."""

import re

import pytest
import torch
from tome_testing import assert_close, random_windows, reference_outputs, tie_free_metric, window_tie_free_metric

import tome_kernels
from tome_kernels import layout

ops = torch.ops.tome
NAN, INF = float("nan"), float("inf")
NATIVE = tome_kernels.available_backends("cpu")["cpu"] is None
needs_native = pytest.mark.skipif(not NATIVE, reason="cpu backend not built")


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def indices(batch, num_tokens, r, protected):
    return reference_outputs(ops.bipartite_match, tie_free_metric(batch, num_tokens), r, protected)


def assert_equal_nan(actual, expected, dtype=None):
    """assert_close that also requires NaN and +-inf in the same places."""
    assert torch.equal(actual.isnan(), expected.isnan()) and torch.equal(actual.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert torch.equal(actual[~finite & ~expected.isnan()], expected[~finite & ~expected.isnan()])
    assert_close(actual[finite], expected[finite], dtype or expected.dtype)


# ----------------------------------------------------------------------------------------------------
# NaN / Inf: a documented result, the same on every backend
# ----------------------------------------------------------------------------------------------------
def test_nan_in_x_stays_in_its_output_token(backend):
    """NaN / Inf in x reach only the output token(s) they merge into; size_out stays finite."""
    device, _ = backend
    unm, src, dst = indices(2, 21, 6, 1)
    x = randn(2, 21, 5)
    x[0, src[0, 0], 1] = NAN  # a source: poisons its destination's row
    x[0, 3, 2] = INF          # a B token
    x[1, unm[1, 0], 0] = NAN  # an unmerged A token: only its own row
    size = 1 + randn(2, 21, 1, seed=1).abs()
    idx = (unm.to(device), src.to(device), dst.to(device))
    x_out, size_out = ops.merge(x.to(device), size.to(device), *idx, 1)
    expected_x, expected_size = reference_outputs(ops.merge, x, size, unm, src, dst, 1)
    assert_equal_nan(x_out.cpu(), expected_x)
    assert torch.isfinite(size_out).all()
    group = layout.groups(21, 1, unm, src, dst)
    poisoned = torch.zeros(2, 21 - 6, dtype=torch.bool)
    for b, n in ((0, src[0, 0].item()), (0, 3), (1, unm[1, 0].item())):
        poisoned[b, group[b, n]] = True
    assert torch.equal(~torch.isfinite(x_out.cpu()).all(-1), poisoned)
    y = ops.unmerge(x_out, *idx, 1)  # unmerge spreads a poisoned token to its members only
    assert torch.equal(~torch.isfinite(y.cpu()).all(-1), poisoned.gather(1, group))


@pytest.mark.parametrize("protected", [0, 1])
def test_nan_and_inf_metric_match_the_reference(backend, protected):
    """A NaN score ranks above every number (torch.max / torch.sort): a token with a NaN or infinite metric
    merges first; a B token with one attracts every A token (its scores are NaN)."""
    device, _ = backend
    metric = tie_free_metric(2, 40, 64)
    metric[0, 6, 3] = NAN      # an A token
    metric[0, 12] = INF        # an A token
    metric[1, 9, 0] = -INF     # a B token: every score of row 1 is NaN
    expected = reference_outputs(ops.bipartite_match, metric, 7, protected)
    for a, e in zip(ops.bipartite_match(metric.to(device), 7, protected), expected):
        torch.testing.assert_close(a.cpu(), e, rtol=0, atol=0)
    assert {6, 12} <= set(expected[1][0, :2].tolist())


def test_nan_and_inf_metric_in_windows_match_the_reference(backend):
    """As bipartite_match, within windows: a NaN score wins its window's argmax (first NaN) and ranks first."""
    device, _ = backend
    windows = random_windows(40, 4, 8)
    metric = window_tie_free_metric(2, 40, windows)
    a_slots, b_slots = windows[:, 0::2], windows[:, 1::2]
    metric[0, a_slots[0, 1], 3] = NAN  # an A token
    metric[0, a_slots[2, 0]] = INF     # an A token
    metric[1, b_slots[1, 2], 0] = -INF  # a B token: every A token of its window scores NaN
    expected = reference_outputs(ops.window_match, metric, windows, 9)
    for a, e in zip(ops.window_match(metric.to(device), windows.to(device), 9), expected):
        torch.testing.assert_close(a.cpu(), e, rtol=0, atol=0)
    assert set(expected[1][0, :2].tolist()) == {a_slots[0, 1].item(), a_slots[2, 0].item()}
    assert set(a_slots[1].tolist()) <= set(expected[1][1].tolist())  # (windows may share that B token)


@pytest.mark.parametrize("bad", [0.0, -1.0, NAN, INF, -INF])
def test_merge_rejects_non_positive_or_non_finite_size(backend, bad):
    device, _ = backend
    x = randn(2, 10, 4).to(device)
    size = torch.ones(2, 10, 1, device=device)
    size[1, 7] = bad
    with pytest.raises(ValueError, match=r"^tome: size must be finite and > 0"):
        ops.bipartite_merge(x, None, size, 3)
    unm, src, dst = (t.to(device) for t in indices(2, 10, 3, 0))
    with pytest.raises(ValueError, match=r"^tome: size must be finite and > 0"):
        ops.merge(x, size, unm, src, dst, 0)


@pytest.mark.parametrize("bad", [-1.0, NAN, INF])
def test_attention_rejects_negative_or_non_finite_size(backend, bad):
    device, _ = backend
    q = randn(1, 2, 5, 8).to(device)
    size = torch.tensor([[1.0, 0.0, bad, 2.0, 1.0]], device=device)
    with pytest.raises(ValueError, match=r"^tome: size must be finite and >= 0"):
        ops.prop_attention(q, q, q, size)


@pytest.mark.parametrize("value", [1e-50, 1e300])
def test_float64_sizes_outside_the_float32_range(backend, value):
    """float64 sizes are checked in float64, before any cast: with float32 data (float32 accumulation) a size
    outside float32's normal range is a ValueError naming it, on every op and backend (also when r = 0 sends
    the call to no backend); with float64 data it is merged exactly."""
    device, _ = backend
    x = randn(1, 8, 4).to(device)
    size = torch.full((1, 8, 1), value, dtype=torch.float64, device=device)
    unm, src, dst = (t.to(device) for t in indices(1, 8, 2, 0))
    q = x.view(1, 1, 8, 4)
    message = r"^tome: size values must fit float32, the accumulation dtype of float32, float16 and bfloat16 data"
    for call in (lambda: ops.bipartite_merge(x, None, size, 2), lambda: ops.bipartite_merge(x, None, size, 0),
                 lambda: ops.merge(x, size, unm, src, dst, 0), lambda: ops.prop_attention(q, q, q, size)):
        with pytest.raises(ValueError, match=message):
            call()
    x_out, _, size_out, *_ = ops.bipartite_merge(x.double(), None, size, 2)
    assert torch.isfinite(x_out).all() and torch.equal(size_out.unique(), torch.tensor([value, 2 * value],
                                                                                         dtype=torch.float64,
                                                                                         device=device))
    assert torch.isfinite(ops.prop_attention(q.double(), q.double(), q.double(), size)).all()


def test_attention_float64_size_zero_is_still_a_masked_key(backend):
    """The range rule leaves size 0 to attention (a masked key); only nonzero sizes must fit float32."""
    device, _ = backend
    q = randn(1, 1, 4, 8).to(device)
    size = torch.tensor([[1.0, 0.0, 2.0, 1.0]], dtype=torch.float64, device=device)
    assert_close(ops.prop_attention(q, q, q, size), reference_outputs(ops.prop_attention, q, q, q, size))


def _attention_with_grads(q, k, v, size, scale=0.3):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = ops._prop_attention(q, k, v, size, scale)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), (q, k, v))
    return (out.detach(), lse, *grads)


@pytest.mark.parametrize("size", [[[0.0] * 6], [[0.0, 1, 0, 2, 0, 0]], [[1.0] * 6, [0.0] * 6]],
                         ids=["all-masked", "some-masked", "one-row-masked"])
def test_attention_size_zero_masks_keys(backend, size):
    """size 0 masks a key (log 0 = -inf); a query whose keys are all masked gets output 0, lse -inf and zero
    gradients, never NaN."""
    device, _ = backend
    size = torch.tensor(size)
    batch = size.shape[0]
    q, k, v = randn(batch, 2, 3, 8), randn(batch, 2, 6, 8, seed=1), randn(batch, 2, 6, 8, seed=2)
    expected = _attention_with_grads(q, k, v, size)
    actual = _attention_with_grads(q.to(device), k.to(device), v.to(device), size.to(device))
    dead = (size == 0).all(1)
    assert torch.equal(expected[1][dead], torch.full_like(expected[1][dead], -INF))
    for a, e in zip(actual, expected):
        assert not a.isnan().any()
        assert_equal_nan(a.cpu(), e)
    for t in (expected[0], expected[2]):  # out and grad_q of the all-masked rows
        assert (t[dead] == 0).all()


def test_attention_masked_leading_key_tiles(backend):
    """Regression (triton): a row whose first key tile(s) are all masked gave NaN (exp(-inf - -inf))."""
    device, _ = backend
    q, k, v = randn(1, 1, 3, 8), randn(1, 1, 100, 8, seed=1), randn(1, 1, 100, 8, seed=2)
    size = torch.ones(1, 100)
    size[:, :70] = 0
    expected = reference_outputs(ops.prop_attention, q, k, v, size)
    assert_close(ops.prop_attention(q.to(device), k.to(device), v.to(device), size.to(device)).cpu(), expected)


def test_nan_in_attention_inputs_match_the_reference(backend):
    """NaN in q poisons that query's row; in k or v, every row of its batch and head (as softmax attention)."""
    device, _ = backend
    q, k, v = randn(2, 2, 4, 8), randn(2, 2, 5, 8, seed=1), randn(2, 2, 5, 8, seed=2)
    q[0, 0, 1, 2] = NAN
    k[1, 1, 3, 0] = INF
    expected = reference_outputs(ops.prop_attention, q, k, v)
    assert_equal_nan(ops.prop_attention(q.to(device), k.to(device), v.to(device)).cpu(), expected)


# ----------------------------------------------------------------------------------------------------
# Degenerate shapes: B = 0, N = 0 / 1, C = 0, protected = N, huge r, empty attention
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch, num_tokens, channels", [(0, 10, 4), (2, 0, 4), (2, 1, 4), (2, 2, 4), (2, 9, 0),
                                                         (0, 0, 0)])
@pytest.mark.parametrize("r, protected", [(3, 0), (3, 1), (2**62, 0), (2**63 - 1, 1)])
def test_degenerate_shapes_equal_reference(backend, batch, num_tokens, channels, r, protected):
    device, _ = backend
    protected = min(protected, num_tokens)
    x = randn(batch, num_tokens, channels)
    pos, size = randn(batch, num_tokens, 3, seed=1), 1 + randn(batch, num_tokens, 1, seed=2).abs()
    args = (x, pos, size, r)
    kwargs = dict(protected=protected, pos_mode="mean")
    expected = reference_outputs(ops.bipartite_merge, *args, **kwargs)
    actual = ops.bipartite_merge(*(t.to(device) for t in args[:3]), r, **kwargs)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert_close(a.cpu(), e, e.dtype if e.is_floating_point() else torch.float64)
    idx = [t.to(device) for t in actual[3:]]
    assert ops.unmerge(actual[0], *idx, protected).shape == x.shape
    source = torch.eye(num_tokens).expand(batch, num_tokens, num_tokens).to(device)
    assert ops.merge_source(source, *idx, protected).shape == (batch, actual[0].shape[1], num_tokens)


@pytest.mark.parametrize("num_tokens, protected, r", [(10, 10, 3), (10, 9, 5), (11, 0, 2**62), (1, 0, 1),
                                                      (1, 1, 0)])
def test_clamped_r_zero_is_the_identity(backend, num_tokens, protected, r):
    """protected = N (or N - 1), N = 1: the clamped r is 0 and every op returns its input unchanged; a huge r
    clamps to (N - protected) // 2."""
    device, _ = backend
    x = randn(2, num_tokens, 3).to(device)
    x_out, _, size_out, unm, src, dst = ops.bipartite_merge(x, None, None, r, protected=protected)
    assert src.shape[1] == layout.clamp_r(r, num_tokens, protected)
    if src.shape[1] == 0:
        assert torch.equal(x_out, x) and torch.equal(size_out, torch.ones_like(x[..., :1]))


@pytest.mark.parametrize("shape_q, shape_k", [((0, 2, 5, 8), (0, 2, 5, 8)), ((1, 0, 5, 8), (1, 0, 5, 8)),
                                              ((1, 2, 0, 8), (1, 2, 5, 8)), ((1, 2, 5, 8), (1, 2, 0, 8))],
                         ids=["B0", "H0", "Nq0", "Nk0"])
def test_empty_attention(backend, shape_q, shape_k):
    """Regression (cpu): ATen's flash CPU kernel died of SIGFPE with H, Nq or Nk = 0. No keys = output 0,
    lse -inf, zero gradients."""
    device, _ = backend
    q, k, v = randn(*shape_q), randn(*shape_k, seed=1), randn(*shape_k, seed=2)
    expected = _attention_with_grads(q, k, v, None)
    actual = _attention_with_grads(q.to(device), k.to(device), v.to(device), None)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert_equal_nan(a.cpu(), e)
    assert (actual[1] == -INF).all() if shape_k[2] == 0 else True


@needs_native
def test_native_ops_with_batch_zero():
    """Regression (cpu): _native_match with B = 0 divided by zero (SIGFPE) in its tiling."""
    with tome_kernels.use_backend("cpu"):
        unm, src, dst = ops._native_match(torch.randn(0, 10, 4), 3, 1)
        assert unm.shape == (0, 1) and src.shape == dst.shape == (0, 3)
        x_out, pos_out, size_out = ops._native_merge(torch.randn(0, 10, 4), None, None, unm, src, dst, 1, False)
        assert x_out.shape == (0, 7, 4) and size_out.shape == (0, 7)
        assert ops._native_unmerge(x_out, unm, src, dst, 1).shape == (0, 10, 4)
        unm, src, dst = ops._native_window_match(torch.randn(0, 10, 4), torch.tensor([[0, 1, 2, 3]]), 3)
        assert unm.shape == (0, 3) and src.shape == dst.shape == (0, 2)


# ----------------------------------------------------------------------------------------------------
# Indices from another call, and malformed arguments: one clear exception
# ----------------------------------------------------------------------------------------------------
def _foreign_indices():
    """(what the message names, index triple) that do not describe a matching of N = 10, protected = 1."""
    unm, src, dst = indices(2, 10, 3, 1)
    other = indices(2, 12, 3, 1)
    return [
        ("do not fit N=10", other),
        ("dst_idx must hold odd (B) token positions", (unm, src, dst + 100)),
        ("dst_idx must hold odd (B) token positions", (unm, src, dst - 1)),
        ("unm_idx and src_idx must hold every even (A) token position", (unm, src + 1, dst)),
        ("unm_idx and src_idx must hold every even (A) token position", (unm, src.clone().fill_(-2), dst)),
        ("unm_idx and src_idx must hold every even (A) token position",
         (unm, torch.cat([src[:, :2], src[:, :1]], 1), dst)),
        ("unm_idx must be an int64", (unm.int(), src, dst)),
        ("src_idx and dst_idx must have one shape", (unm, src, dst[:, :2])),
        ("unm_idx must be an int64 [batch=2, k]", (unm[:1], src, dst)),
    ]


def _calls_with(idx, protected=1):
    """Every op that takes an index triple, as (name, call) for N = 10 and r = 3."""
    x, y, size = randn(2, 10, 4), randn(2, 7, 4, seed=1), torch.ones(2, 10)
    size_out = torch.ones(2, 7, 1)
    return [
        ("merge", lambda: ops.merge(x, size, *idx, protected)),
        ("_merge", lambda: ops._merge(x, x, size, *idx, protected, "mean")),
        ("unmerge", lambda: ops.unmerge(y, *idx, protected)),
        ("merge_source", lambda: ops.merge_source(torch.eye(10).expand(2, 10, 10), *idx, protected)),
        ("_merge_backward", lambda: ops._merge_backward(y, y, size, size_out, *idx, protected, "mean")),
        ("_unmerge_backward", lambda: ops._unmerge_backward(x, *idx, protected)),
    ]


def _native_calls_with(idx, protected=1):
    x, y, size = randn(2, 10, 4), randn(2, 7, 4, seed=1), torch.ones(2, 10)
    return [
        ("_native_merge", lambda: ops._native_merge(x, x, size, *idx, protected, True)),
        ("_native_merge_backward",
         lambda: ops._native_merge_backward(y, y, size, torch.ones(2, 7), *idx, protected, True)),
        ("_native_unmerge", lambda: ops._native_unmerge(y, *idx, protected)),
        ("_native_unmerge_backward", lambda: ops._native_unmerge_backward(x, *idx, protected)),
    ]


FOREIGN = [pytest.param(i, id=f"{message.split()[0]}-{i}") for i, (message, _) in enumerate(_foreign_indices())]


@pytest.mark.parametrize("case", FOREIGN)
def test_foreign_indices_are_a_clear_error(backend, case):
    message, idx = _foreign_indices()[case]
    for name, call in _calls_with(idx):
        with pytest.raises(ValueError, match="^tome: .*" + re.escape(message)):
            call()


@needs_native
@pytest.mark.parametrize("case", FOREIGN)
def test_foreign_indices_to_native_ops_are_a_clear_error(case):
    """The _native_* ops called directly check the indices themselves, before any parallel region."""
    message, idx = _foreign_indices()[case]
    for name, call in _native_calls_with(idx):
        with pytest.raises(ValueError, match="^tome: .*" + re.escape(message)):
            call()


@needs_native
def test_foreign_indices_with_several_threads():
    """Large enough for several OpenMP chunks: the error still comes before the region (no terminate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = randn(2, 4097, 64)
        unm, src, dst = reference_outputs(ops.bipartite_match, x, 1000, 1)
        dst[1, -1] = 4097
        with pytest.raises(ValueError, match="^tome: dst_idx"):
            ops._native_merge(x, None, None, unm, src, dst, 1, False)
    finally:
        torch.set_num_threads(threads)


def _bad_arguments():
    x, y, q = randn(2, 10, 4), randn(2, 7, 4), randn(1, 2, 5, 8)
    idx = indices(2, 10, 3, 1)
    out, lse = reference_outputs(ops._prop_attention, q, q, q, None, 0.3)
    size_out = torch.ones(2, 7, 1)
    return [
        ("size_out must be", lambda: ops._merge_backward(y, None, None, size_out[:, :5], *idx, 1, "keep")),
        ("pos_mode must be one of", lambda: ops._merge_backward(y, y, None, size_out, *idx, 1, "avg")),
        ("grad_x must be float16", lambda: ops._merge_backward(y.int(), None, None, size_out, *idx, 1, "keep")),
        ("grad_x must have 3 dimensions", lambda: ops._merge_backward(y[0], None, None, size_out, *idx, 1, "keep")),
        ("grad_pos must start with", lambda: ops._merge_backward(y, x, None, size_out, *idx, 1, "mean")),
        ("protected must be in [0, N=10]", lambda: ops._merge_backward(y, None, None, size_out, *idx, 11, "keep")),
        ("grad must have 3 dimensions", lambda: ops._unmerge_backward(x[0], *idx, 1)),
        ("grad must be float16", lambda: ops._unmerge_backward(x.long(), *idx, 1)),
        ("lse must be", lambda: ops._prop_attention_backward(q, q, q, q, None, out, lse[..., :3], 0.3)),
        ("lse must be", lambda: ops._prop_attention_backward(q, q, q, q, None, out, lse.double(), 0.3)),
        ("grad_out must be", lambda: ops._prop_attention_backward(q[..., :4], q, q, q, None, out, lse, 0.3)),
        ("out must be", lambda: ops._prop_attention_backward(q, q, q, q, None, out.double(), lse, 0.3)),
        ("q must be float16", lambda: ops._prop_attention_backward(q, q.int(), q.int(), q.int(), None, out, lse, 0.3)),
        ("head dim >= 1", lambda: ops.prop_attention(q[..., :0], q[..., :0], q[..., :0])),
        ("size must be a floating tensor", lambda: ops.prop_attention(q, q, q, torch.ones(1, 5, dtype=torch.long))),
        ("size must be a floating tensor", lambda: ops.merge(x, torch.ones(2, 10, dtype=torch.long), *idx, 1)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_arguments())))
def test_bad_arguments_to_backward_ops_are_a_clear_error(backend, case):
    message, call = _bad_arguments()[case]
    with pytest.raises((ValueError, TypeError), match="^tome: .*" + re.escape(message)):
        call()


def _bad_native_arguments():
    x, q = randn(2, 10, 4), randn(1, 2, 5, 8)
    idx = indices(2, 10, 3, 1)
    windows = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    out, lse = reference_outputs(ops._prop_attention, q, q, q, None, 0.3)
    return [
        (ValueError, "r must be >= 0", lambda: ops._native_match(x, -1, 0)),
        (ValueError, "protected must be in [0, N=10]", lambda: ops._native_match(x, 2, 11)),
        (TypeError, "metric must be float16", lambda: ops._native_match(x.int(), 2, 0)),
        (TypeError, "metric must be float16", lambda: ops._native_window_match(x.int(), windows, 2)),
        (ValueError, "windows must be an int64 [num_windows, even width]",
         lambda: ops._native_window_match(x, windows[:, :3], 2)),
        (ValueError, "windows must be an int64 [num_windows, even width]",
         lambda: ops._native_window_match(x, windows.double(), 2)),
        (ValueError, "r must be >= 0", lambda: ops._native_window_match(x, windows, -1)),
        (ValueError, "windows must hold token positions in [0, N=10), got values in [4, 11]",
         lambda: ops._native_window_match(x, windows + 4, 2)),
        (ValueError, "windows must hold even (A) positions", lambda: ops._native_window_match(x, windows.flip(1), 2)),
        (ValueError, "windows must list each A (even) position at most once",
         lambda: ops._native_window_match(x, windows[[0, 0]], 2)),
        (ValueError, "metric must have 3 dimensions", lambda: ops._native_match(x[0], 2, 0)),
        (ValueError, "pos must have shape", lambda: ops._native_merge(x, x[:, :9], None, *idx, 1, False)),
        (TypeError, "size must be float16", lambda: ops._native_merge(x, None, torch.ones(2, 10).long(), *idx, 1, False)),
        (ValueError, "size must have shape", lambda: ops._native_merge(x, None, torch.ones(2, 9), *idx, 1, False)),
        (ValueError, "size must be finite and > 0, got min 0",
         lambda: ops._native_merge(x, None, torch.ones(2, 10).index_fill(1, torch.tensor([4]), 0.0), *idx, 1, False)),
        (ValueError, "size must be finite and > 0, got min nan, 2 non-finite",
         lambda: ops._native_bipartite_merge(x, None, torch.ones(2, 10).index_fill(1, torch.tensor([4]), NAN), x, 3, 1,
                                             False)),
        (ValueError, "size must be finite and >= 0, got min -1",
         lambda: ops._native_attention(q[:, :, :0], q, q, -torch.ones(1, 5), 0.3)),
        (ValueError, "unm_idx must be an int64", lambda: ops._native_merge(x, None, None, idx[0][0], *idx[1:], 1, False)),
        (ValueError, "attention shapes must be", lambda: ops._native_attention(q, q[:, :1], q, None, 0.3)),
        (TypeError, "q, k, v must share a dtype", lambda: ops._native_attention(q, q.double(), q, None, 0.3)),
        (ValueError, "size must have shape", lambda: ops._native_attention(q, q, q, torch.ones(1, 4), 0.3)),
        (ValueError, "lse must have shape", lambda: ops._native_attention_backward(q, q, q, q, None, out, lse[..., :2], 0.3)),
        (TypeError, "lse must be", lambda: ops._native_attention_backward(q, q, q, q, None, out, lse.double(), 0.3)),
    ]


@needs_native
@pytest.mark.parametrize("case", range(len(_bad_native_arguments())))
def test_bad_arguments_to_native_ops_are_a_clear_error(case):
    """ValueError / TypeError (TORCH_CHECK_VALUE / _TYPE), not RuntimeError, from the C++ checks too."""
    error, message, call = _bad_native_arguments()[case]
    with pytest.raises(error, match="^tome: .*" + re.escape(message)):
        call()
