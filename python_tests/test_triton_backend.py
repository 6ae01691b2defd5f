"""The ``triton`` backend against the reference spec (tome_kernels/reference.py).

CPU tensors run the kernels in the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 when there is no
GPU); the same tests run compiled on CUDA tensors where a GPU is present. Tolerances by dtype; data
movement (unmerge, pos passthrough, unmerged tokens) and indices are compared exactly.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import pytest
import torch
from tome_testing import random_windows, tie_free_metric, window_tie_free_metric
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

import tome_kernels  # noqa: F401  (registers torch.ops.tome)
from tome_kernels import reference, use_backend
from tome_kernels._backend import unavailable_reason

triton = pytest.importorskip("triton")

_CPU_REASON = unavailable_reason("triton", "cpu")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(_CPU_REASON is not None, reason=str(_CPU_REASON))),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]
# (rtol, atol) for values computed in fp32 and rounded to the dtype: a couple of units in the last place.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}
LOW = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _triton_backend():
    with use_backend("triton"):
        yield


def _backend():
    return importlib.import_module("tome_kernels.triton")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(*shape, generator=_gen(seed)).to(device=device, dtype=dtype)


def _sizes(batch, num_tokens, device, dtype=torch.float32, seed=1):
    """Token sizes as ToMe makes them: small positive integers (exact in every dtype)."""
    return torch.randint(1, 5, (batch, num_tokens), generator=_gen(seed)).to(device=device, dtype=dtype)


def _close(actual, expected, dtype=None):
    rtol, atol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def _indices(metric, r, protected):
    return reference.match(metric.float(), r, protected)


# ----------------------------------------------------------------------------------------------------
# match
# ----------------------------------------------------------------------------------------------------
MATCH_CASES = [  # (batch, N, C, r, protected)
    (2, 197, 64, 16, 1),  # ViT-B/16 at 224 (class token protected)
    (1, 577, 64, 45, 1),  # ViT at 384
    (3, 31, 40, 7, 0),  # prime N, no protected token: unmerged tokens in rank order
    (2, 50, 24, 10, 2),
    (1, 37, 16, 1000, 5),  # r past the clamp, odd protected count
    (2, 20, 8, 0, 0),  # r = 0
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MATCH_CASES, ids=str)
def test_match_equals_reference(device, case):
    batch, num_tokens, channels, r, protected = case
    metric = _randn(batch, num_tokens, channels, device=device)
    got = _backend().match(metric, r, protected)
    expected = reference.match(metric, r, protected)
    for a, b in zip(got, expected):
        _exact(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_match_low_precision_equals_reference(device, dtype):
    metric = tie_free_metric(2, 197, 64, dtype, device)  # rounding differences cannot flip a choice
    for a, b in zip(_backend().match(metric, 16, 1), reference.match(metric, 16, 1)):
        _exact(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_match_zero_vectors_and_ties(device):
    """Zero metric vectors score 0 against everything (no NaN); ties go to the lower position."""
    metric = _randn(2, 41, 16, device=device, seed=5)
    metric[:, 3:20:3] = 0  # zero rows among A and B
    metric[1, 30] = metric[1, 32]  # identical A tokens: equal best scores
    for protected in (0, 1):
        got = _backend().match(metric, 12, protected)
        for a, b in zip(got, reference.match(metric, 12, protected)):
            _exact(a, b)
    all_zero = torch.zeros(1, 12, 8, device=device)
    for a, b in zip(_backend().match(all_zero, 3, 1), reference.match(all_zero, 3, 1)):
        _exact(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("protected", [0, 1])
def test_match_detr_rows_equal_reference(device, protected):
    """DETR's encoder (N = 1100): B tokens split across programs, 35 rank programs per row; with protected >= 1
    the last rank program of each row writes the ascending unmerged slots. Tie-free: at 550 x 550 random
    scores, fp32 rounding (normalise-then-dot vs. dot-then-scale) can flip a near tie."""
    metric = tie_free_metric(2, 1100, 32, torch.float32, device)
    assert _match_launch_splits(1100) > 1
    for a, b in zip(_backend().match(metric, 275, protected), reference.match(metric, 275, protected)):
        _exact(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_match_ties_across_b_splits(device):
    """Equal best scores found by different B splits go to the lower B index, as within one tile."""
    metric = _randn(1, 700, 8, device=device, seed=9)
    for b_slot in (200, 330):  # B tokens in other splits (launch_shape: 128-token granules) equal to B token 10
        metric[0, 1 + 2 * b_slot] = metric[0, 1 + 2 * 10]
    metric[0, 0:40:2] = metric[0, 1 + 2 * 10]  # A tokens whose best score (1) ties three ways
    assert _match_launch_splits(700) > 1
    for a, b in zip(_backend().match(metric, 100, 0), reference.match(metric, 100, 0)):
        _exact(a, b)


def _match_launch_splits(num_tokens):
    from tome_kernels.triton import _match

    return _match.launch_shape(1, reference.num_a(num_tokens, 0), reference.num_b(num_tokens, 0))["splits"]


# ----------------------------------------------------------------------------------------------------
# window_match
# ----------------------------------------------------------------------------------------------------
WINDOW_CASES = [  # (batch, N, windows, width, r, channels)
    (2, 64, 8, 8, 12, 24),
    (1, 41, 21, 2, 21, 16),  # width 2: one A and one B per window, every A listed, r at the clamp
    (2, 150, 3, 40, 30, 40),  # width 40: 20 B slots per window; most A tokens unlisted
    (3, 199, 90, 2, 1, 8),  # r = 1; 90 listed A tokens: the table scan takes two steps
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_window_match_equals_reference(device, case):
    batch, num_tokens, num_windows, width, r, channels = case
    windows = random_windows(num_tokens, num_windows, width, seed=num_tokens).to(device)
    metric = window_tie_free_metric(batch, num_tokens, windows.cpu(), channels, torch.float32, device)
    for a, b in zip(_backend().window_match(metric, windows, r), reference.window_match(metric, windows, r)):
        _exact(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW)
def test_window_match_low_precision_equals_reference(device, dtype):
    windows = random_windows(197, 12, 8).to(device)
    metric = window_tie_free_metric(2, 197, windows.cpu(), 64, dtype, device)
    for a, b in zip(_backend().window_match(metric, windows, 30), reference.window_match(metric, windows, 30)):
        _exact(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_window_match_ties_zeros_and_nan(device):
    """Equal B tokens: the first slot; equal best scores: the lower A position; a zero A vector scores 0
    against its whole window (first slot); a NaN metric row makes NaN scores, which rank first (first NaN
    slot, as torch.max). Ties come from equal vectors in one window: computed alike, whatever the rounding."""
    windows = torch.tensor([[8, 3, 2, 5, 6, 1], [0, 9, 4, 7, 10, 9], [12, 13, 14, 11, 16, 15]], device=device)
    for nan in (False, True):
        metric = _randn(2, 19, 8, device=device, seed=3)
        metric[:, 5] = metric[:, 3]  # window 0: B slots 0 and 1 equal
        metric[0, 8] = metric[0, 2] = metric[0, 5]  # best score ~1 at slots 0 and 1, for A positions 2 and 8
        metric[1, 14] = 0
        if nan:
            metric[0, 16, 3] = float("nan")  # an A token: NaN against its whole window
            metric[1, 9, 0] = float("nan")  # a B token (in window 1 twice)
        for r in (1, 4, 9):
            got = _backend().window_match(metric, windows, r)
            for a, b in zip(got, reference.window_match(metric, windows, r)):
                _exact(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_window_match_strided_inputs(device):
    """A metric view with channel and token strides, and a transposed window table through the op."""
    windows = random_windows(60, 6, 6, seed=2).to(device)
    base = window_tie_free_metric(2, 60, windows.cpu(), 32, torch.float32, device)
    metric = torch.zeros(60, 2, 64, device=device).transpose(0, 1)[:, :, ::2]
    metric.copy_(base)
    expected = reference.window_match(base, windows, 10)
    for table in (windows, windows.t().contiguous().t()):
        for a, b in zip(torch.ops.tome.window_match(metric, table, 10), expected):
            _exact(a, b)


# ----------------------------------------------------------------------------------------------------
# merge / merge_backward / unmerge / unmerge_backward
# ----------------------------------------------------------------------------------------------------
MERGE_CASES = [  # (batch, N, C, Cp, r, protected)
    (2, 197, 96, 8, 16, 1),
    (1, 61, 40, 40, 30, 0),  # prime N, r at the clamp ((61 - 0) // 2 = 30)
    (2, 37, 24, 16, 9, 5),
    (3, 16, 8, 8, 0, 2),  # r = 0: every token copied
]


def _dtype_cases(cases):
    """fp32 on every shape; fp16 / bf16 on the first (ViT) shape only: the interpreter costs ~50 ms a program."""
    return [pytest.param(torch.float32, case, id=f"float32-{case}") for case in cases] + [
        pytest.param(dtype, cases[0], id=f"{str(dtype)[6:]}-{cases[0]}") for dtype in LOW]


def _merge_inputs(case, device, dtype, seed=0):
    batch, num_tokens, channels, pos_channels, r, protected = case
    metric = _randn(batch, num_tokens, 16, device=device, seed=seed)
    idx = _indices(metric, r, protected)
    x = _randn(batch, num_tokens, channels, dtype=dtype, device=device, seed=seed + 1)
    pos = _randn(batch, num_tokens, pos_channels, dtype=dtype, device=device, seed=seed + 2)
    size = _sizes(batch, num_tokens, device, dtype)
    return x, pos, size, idx, protected


def _singletons(num_tokens, idx, protected):
    """(output rows that merged with nothing, their input positions) per batch row 0."""
    unm_idx, src_idx, dst_idx = (t[:1] for t in idx)
    group = reference.groups(num_tokens, protected, unm_idx, src_idx, dst_idx)[0]
    rep = reference.representatives(num_tokens, protected, unm_idx)[0]
    members = torch.bincount(group, minlength=rep.numel())
    return (members == 1).nonzero().squeeze(-1), rep[members == 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, case", _dtype_cases(MERGE_CASES))
def test_merge_equals_reference(device, dtype, case):
    x, pos, size, idx, protected = _merge_inputs(case, device, dtype)
    for pos_mean in (False, True):
        got = _backend().merge(x, pos, size, *idx, protected, pos_mean)
        expected = reference.merge(x, pos, size, *idx, protected, pos_mean)
        _close(got[0], expected[0])
        (_close if pos_mean else _exact)(got[1], expected[1])
        _exact(got[2], expected[2])  # integer sizes: sums are exact
        rows, positions = _singletons(x.shape[1], idx, protected)
        _exact(got[0][0, rows], x[0, positions])  # merged with nothing: copied bit-exactly
        _exact(got[1][0, rows], pos[0, positions])


@pytest.mark.parametrize("device", DEVICES)
def test_merge_without_size_and_pos(device):
    x, _, _, idx, protected = _merge_inputs(MERGE_CASES[0], device, torch.float32, seed=7)
    got = _backend().merge(x, None, None, *idx, protected, False)
    expected = reference.merge(x, None, None, *idx, protected, False)
    _close(got[0], expected[0])
    assert got[1].numel() == 0 and got[2].dtype == x.dtype
    _exact(got[2], expected[2])


@pytest.mark.parametrize("device", DEVICES)
def test_merge_strided_input_and_fractional_sizes(device):
    """Non-contiguous x (channels not innermost), pos of another dtype, non-integer sizes."""
    batch, num_tokens, channels = 2, 45, 20
    x = _randn(batch, channels, num_tokens, device=device).transpose(1, 2)
    pos = _randn(batch, num_tokens, 6, dtype=torch.float16, device=device, seed=2)
    size = torch.rand(batch, num_tokens, generator=_gen(3)).to(device) + 0.25
    idx = _indices(_randn(batch, num_tokens, 8, device=device, seed=4), 15, 1)
    for pos_mean in (False, True):
        got = _backend().merge(x, pos, size, *idx, 1, pos_mean)
        expected = reference.merge(x, pos, size, *idx, 1, pos_mean)
        for a, b in zip(got, expected):
            _close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, case", _dtype_cases(MERGE_CASES[:3]))
def test_merge_backward_equals_reference(device, dtype, case):
    x, pos, size, idx, protected = _merge_inputs(case, device, dtype, seed=11)
    for with_size in (True, False):
        s = size if with_size else None
        size_out = reference.merge(x, pos, s, *idx, protected, True)[2]
        grad_x = _randn(*size_out.shape, x.shape[-1], dtype=dtype, device=device, seed=12)
        grad_pos = _randn(*size_out.shape, pos.shape[-1], dtype=dtype, device=device, seed=13)
        for pos_mean in (False, True):
            got = _backend().merge_backward(grad_x, grad_pos, s, size_out, *idx, protected, pos_mean)
            expected = reference.merge_backward(grad_x, grad_pos, s, size_out, *idx, protected, pos_mean)
            _close(got[0], expected[0])
            (_close if pos_mean else _exact)(got[1], expected[1])
    got = _backend().merge_backward(grad_x, None, size, size_out, *idx, protected, False)
    assert got[1] is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, case", _dtype_cases(MERGE_CASES))
def test_unmerge_and_backward_equal_reference(device, dtype, case):
    batch, num_tokens, channels, _, r, protected = case
    idx = _indices(_randn(batch, num_tokens, 16, device=device, seed=21), r, protected)
    y = _randn(batch, num_tokens - idx[1].shape[1], channels, dtype=dtype, device=device, seed=22)
    _exact(_backend().unmerge(y, *idx, protected), reference.unmerge(y, *idx, protected))
    grad = _randn(batch, num_tokens, channels, dtype=dtype, device=device, seed=23)
    got = _backend().unmerge_backward(grad, *idx, protected)
    _close(got, reference.unmerge_backward(grad, *idx, protected))


@pytest.mark.parametrize("device", DEVICES)
def test_merge_all_sources_into_one_token(device):
    """Every A token matches the same B token (constant metric): one group of r + 1 members."""
    batch, num_tokens, channels = 1, 150, 16
    idx = _indices(torch.ones(batch, num_tokens, 8, device=device), 70, 1)
    assert (idx[2] == idx[2][0, 0]).all()
    x = _randn(batch, num_tokens, channels, device=device)
    size = _sizes(batch, num_tokens, device)
    got = _backend().merge(x, None, size, *idx, 1, False)
    expected = reference.merge(x, None, size, *idx, 1, False)
    _close(got[0], expected[0])
    _exact(got[2], expected[2])
    grad = _randn(batch, num_tokens, channels, device=device, seed=2)
    _close(_backend().unmerge_backward(grad, *idx, 1), reference.unmerge_backward(grad, *idx, 1))


# ----------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------
ATTN_CASES = [  # (batch, heads, Nq, Nk, D)
    (1, 2, 197, 197, 64),
    (1, 2, 77, 50, 32),  # cross attention, Nq != Nk
    (1, 2, 33, 33, 80),  # head dim padded to 128
    (1, 1, 20, 20, 16),  # head dim padded to 32
]
# Attention rounds p (and ds) to the input dtype before the tensor-core dots, as flash attention does:
# a few more ulps than one final rounding.
ATTN_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def _attn_inputs(case, device, dtype, seed=0):
    batch, heads, seq_q, seq_k, head_dim = case
    q = _randn(batch, heads, seq_q, head_dim, dtype=dtype, device=device, seed=seed)
    k = _randn(batch, heads, seq_k, head_dim, dtype=dtype, device=device, seed=seed + 1)
    v = _randn(batch, heads, seq_k, head_dim, dtype=dtype, device=device, seed=seed + 2)
    size = _sizes(batch, seq_k, device, torch.float32)
    return q, k, v, size, head_dim ** -0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, case", _dtype_cases(ATTN_CASES))
def test_attention_equals_reference(device, dtype, case):
    q, k, v, size, scale = _attn_inputs(case, device, dtype)
    rtol, atol = ATTN_TOL[dtype]
    for s in (size, None):
        out, lse = _backend().attention(q, k, v, s, scale)
        ref_out, ref_lse = reference.attention(q, k, v, s, scale)
        torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    grad_out = _randn(*out.shape, dtype=dtype, device=device, seed=9)
    got = _backend().attention_backward(grad_out, q, k, v, size, ref_out, ref_lse, scale)
    expected = reference.attention_backward(grad_out, q, k, v, size, ref_out, ref_lse, scale)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=rtol, atol=2 * atol)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_strided_qkv(device):
    """q, k, v as timm slices them from one qkv tensor: [B, N, 3, H, D] permuted (non-contiguous)."""
    batch, seq, heads, head_dim = 2, 40, 2, 32
    qkv = _randn(batch, seq, 3, heads, head_dim, device=device).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    size = _sizes(batch, seq, device)
    out, lse = _backend().attention(q, k, v, size, 0.2)
    ref_out, ref_lse = reference.attention(q, k, v, size, 0.2)
    _close(out, ref_out)
    grad_out = _randn(*out.shape, device=device, seed=3)
    for a, b in zip(_backend().attention_backward(grad_out, q, k, v, size, out, lse, 0.2),
                    reference.attention_backward(grad_out, q, k, v, size, ref_out, ref_lse, 0.2)):
        _close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_attention_falls_back_outside_kernel_shapes(device):
    """Head dim > 128 runs the reference (attention.py ``_supported``)."""
    q, k, v, size, scale = _attn_inputs((1, 1, 9, 9, 160), device, torch.float32)
    with count_launches() as launches:
        out, lse = _backend().attention(q, k, v, size, scale)
    assert launches == []
    ref_out, ref_lse = reference.attention(q, k, v, size, scale)
    _exact(out, ref_out)


# ----------------------------------------------------------------------------------------------------
# Public ops: gradcheck (fp64), opcheck, launch count
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_public_ops(device):
    """fp64 through torch.ops.tome with the triton backend (under the interpreter the kernels run in fp64;
    fp64 CUDA tensors run the reference). fast_mode: one random direction per input instead of the full
    Jacobian (the full one is ~200 launches per op in the interpreter)."""
    ops = torch.ops.tome
    opts = dict(dtype=torch.float64, device=device)
    idx = _indices(_randn(1, 11, 4, device=device), 4, 1)
    x = torch.randn(1, 11, 3, **opts, requires_grad=True)
    pos = torch.randn(1, 11, 2, **opts, requires_grad=True)
    size = (torch.rand(1, 11, 1, **opts) + 0.5).requires_grad_()

    def merge_all(x, pos, size):
        x_out, pos_out, size_out = ops._merge(x, pos, size, *idx, 1, "mean")
        return x_out, pos_out, size_out

    assert torch.autograd.gradcheck(merge_all, (x, pos, size), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, pos: ops._merge(x, pos, None, *idx, 1, "keep")[:2], (x, pos),
                                    fast_mode=True)
    y = torch.randn(1, 7, 3, **opts, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: ops.unmerge(y, *idx, 1), (y,), fast_mode=True)
    q, k, v = (torch.randn(1, 2, 6, 4, **opts, requires_grad=True) for _ in range(3))
    s = torch.rand(1, 6, 1, **opts) + 0.5
    assert torch.autograd.gradcheck(lambda q, k, v: ops.prop_attention(q, k, v, s), (q, k, v), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_kernel_ops(device):
    ops = torch.ops.tome
    metric = _randn(2, 13, 8, device=device)
    idx = _indices(metric, 4, 1)
    x = _randn(2, 13, 6, device=device, seed=1).requires_grad_()
    pos = _randn(2, 13, 4, device=device, seed=2).requires_grad_()
    size = _sizes(2, 13, device).unsqueeze(-1)
    y = _randn(2, 9, 6, device=device, seed=3).requires_grad_()
    q, k, v = (_randn(1, 2, 10, 16, device=device, seed=s).requires_grad_() for s in (4, 5, 6))
    checks = [
        (ops.bipartite_match.default, (metric, 4, 1)),
        (ops.window_match.default, (metric, random_windows(13, 3, 4).to(device), 4)),
        (ops._merge.default, (x, pos, size, *idx, 1, "mean")),
        (ops.unmerge.default, (y, *idx, 1)),
        (ops._prop_attention.default, (q, k, v, size[:1, :10], 0.25)),
    ]
    for op, args in checks:
        opcheck(op, args)


def count_launches():
    """Context manager collecting the name of every Triton kernel launched (interpreted or compiled)."""
    from tome_kernels.triton._common import INTERPRET

    if INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction as launcher
    else:
        from triton.runtime.jit import JITFunction as launcher
    launches = []
    original = launcher.run

    def run(self, *args, **kwargs):
        launches.append(self.fn.__name__ if hasattr(self, "fn") else self.__name__)
        _KERNEL_DEPTH[0] += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _KERNEL_DEPTH[0] -= 1

    @contextlib.contextmanager
    def patched():
        launcher.run = run
        try:
            yield launches
        finally:
            launcher.run = original

    return patched()


_KERNEL_DEPTH = [0]
_ALLOCATIONS = {"aten::empty.memory_format", "aten::empty_strided", "aten::new_empty"}


class _TorchOps(TorchDispatchMode):
    """Records aten ops run outside Triton launches (the interpreter itself uses torch inside them)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _KERNEL_DEPTH[0] == 0:
            self.ops.append(func._schema.name + ("." + func._overloadname if func._overloadname != "default" else ""))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_tome_layer_takes_three_launches(device):
    """match + merge of x, pos and size: 3 Triton launches, and no other torch work than allocations."""
    batch, num_tokens = 2, 197
    x = _randn(batch, num_tokens, 64, device=device)
    pos = _randn(batch, num_tokens, 64, device=device, seed=1)
    size = _sizes(batch, num_tokens, device)
    backend = _backend()
    torch.ops.tome.bipartite_merge(x, pos, size, 16, None, 1, "mean")  # warm-up: JIT compile / autotune
    with count_launches() as launches:
        torch.ops.tome.bipartite_merge(x, pos, size, 16, None, 1, "mean")
    assert launches == ["_match_fwd_kernel", "_match_rank_kernel", "_merge_fwd_kernel"]
    with count_launches() as launches, _TorchOps() as torch_ops:
        idx = backend.match(x, 16, 1)
        backend.merge(x, pos, size, *idx, 1, True)
    assert len(launches) == 3
    assert set(torch_ops.ops) <= _ALLOCATIONS, torch_ops.ops


@pytest.mark.parametrize("device", DEVICES)
def test_window_match_takes_two_launches(device):
    """Its own forward kernel, then the rank kernel match uses; no torch op besides allocations."""
    windows = random_windows(197, 12, 8).to(device)
    metric = _randn(2, 197, 64, device=device)
    _backend().window_match(metric, windows, 16)  # warm-up: JIT compile
    with count_launches() as launches, _TorchOps() as torch_ops:
        _backend().window_match(metric, windows, 16)
    assert launches == ["_window_match_fwd_kernel", "_match_rank_kernel"]
    assert set(torch_ops.ops) <= _ALLOCATIONS, torch_ops.ops


@pytest.mark.parametrize("device", DEVICES)
def test_backward_launches(device):
    """merge_backward, unmerge, unmerge_backward: one launch each; attention backward: two."""
    x, pos, size, idx, protected = _merge_inputs(MERGE_CASES[2], device, torch.float32)
    backend = _backend()
    x_out, pos_out, size_out = backend.merge(x, pos, size, *idx, protected, True)
    q, k, v, s, scale = _attn_inputs((1, 2, 20, 20, 32), device, torch.float32)
    out, lse = backend.attention(q, k, v, s, scale)
    with count_launches() as launches:
        backend.merge_backward(x_out, pos_out, size, size_out, *idx, protected, True)
        backend.unmerge(x_out, *idx, protected)
        backend.unmerge_backward(x, *idx, protected)
        backend.attention_backward(out, q, k, v, s, out, lse, scale)
    assert launches == ["_merge_bwd_kernel", "_merge_bwd_kernel", "_merge_fwd_kernel",
                        "_attn_bwd_preprocess_kernel", "_attn_bwd_kernel"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_float64_runs_reference():
    q, k, v, size, scale = _attn_inputs((1, 1, 8, 8, 16), "cuda", torch.float64)
    with count_launches() as launches:
        _backend().attention(q, k, v, size, scale)
        _backend().match(q[0], 2, 1)
        _backend().window_match(q[0], torch.tensor([[0, 1, 2, 3]], device="cuda"), 2)
    assert launches == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_merge_is_deterministic():
    x, pos, size, idx, protected = _merge_inputs((8, 577, 768, 768, 200, 1), "cuda", torch.float16)
    first = _backend().merge(x, pos, size, *idx, protected, True)
    for _ in range(3):
        for a, b in zip(_backend().merge(x, pos, size, *idx, protected, True), first):
            _exact(a, b)


def test_interpreter_flag_matches_environment():
    from tome_kernels.triton._common import INTERPRET

    assert INTERPRET == (os.environ.get("TRITON_INTERPRET") == "1")
