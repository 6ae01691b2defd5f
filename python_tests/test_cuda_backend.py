"""The CUDA backend (csrc/cuda).

* ``test_cuda_kernels_registered`` needs no GPU: when the extension was built with CUDA, every
  ``tome::_native_*`` op must have a CUDA kernel.
* The kernel tests compare every ``_native_*`` kernel with its reference.py function on two targets:
  ``cuda``, the real kernels on a GPU (skipped without one), and ``emulated``, the same sources compiled for
  the CPU by ``cuda_emulation`` (run with ``TOME_CUDA_EMULATION=1``; the first build takes ~2 minutes and
  is cached). Public-op gradchecks go through ``use_backend("cuda")`` (or the emulated routing).
* ``test_layout_header`` compiles python_tests/layout_check.cpp against csrc/include/tome/layout.h.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
from typing import Callable, ContextManager

import pytest
import torch
from tome_testing import random_windows, tie_free_metric, window_tie_free_metric

import cuda_emulation
import tome_kernels
from tome_kernels import reference

NATIVE_OPS = cuda_emulation.NATIVE_OPS
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HALF = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# Registration (runs without a GPU)
# ----------------------------------------------------------------------------------------------------
def _extension_links_cuda() -> bool:
    """Whether tome_kernels._C was built as a CUDA extension (it then names the CUDA runtime it links)."""
    from tome_kernels import _native

    if _native.load_error is not None:
        pytest.skip(f"tome_kernels._C is not built: {_native.load_error}")
    return b"libcudart" in pathlib.Path(_native._C.__file__).read_bytes()


def test_cuda_kernels_registered():
    if not _extension_links_cuda():
        pytest.skip("tome_kernels._C was built without CUDA")
    # _native_bipartite_merge is device-generic (csrc/bipartite_merge.cpp chains the other two).
    missing = [op for op in NATIVE_OPS
               if not any(torch._C._dispatch_has_kernel_for_dispatch_key(f"tome::{op}", key)
                          for key in ("CUDA", "CompositeExplicitAutograd"))]
    assert not missing, f"no CUDA kernel registered for {missing}"


# ----------------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Target:
    device: str
    native: object  # the op namespace holding the _native_* kernels
    route: Callable[[], ContextManager]  # inside, public tome ops use these kernels
    emulated: bool


@pytest.fixture(scope="module", params=["cuda", "emulated"])
def target(request):
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        reason = tome_kernels.available_backends("cuda")["cuda"]
        if reason is not None:
            pytest.skip(reason)
        return Target("cuda", torch.ops.tome, lambda: tome_kernels.use_backend("cuda"), emulated=False)
    if os.environ.get("TOME_CUDA_EMULATION") != "1":
        pytest.skip("set TOME_CUDA_EMULATION=1 to run the CUDA kernels under CPU emulation")
    cuda_emulation.build()
    return Target("cpu", getattr(torch.ops, cuda_emulation.NAMESPACE), cuda_emulation.routed, emulated=True)


def tokens(batch, num_tokens, channels, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_tokens, channels, generator=gen, dtype=torch.float64).to(dtype).to(device)


def sizes(batch, num_tokens, device, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return (1 + torch.randint(0, 4, (batch, num_tokens), generator=gen)).float().to(device)


def assert_close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOL[expected.dtype]
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=tol, atol=tol)


def assert_equal(actual, expected):
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0)


def singleton_outputs(num_tokens, protected, indices):
    """[batch, N - r] bool: output tokens that merged nothing (the kernels must copy them bit-exactly)."""
    group = reference.groups(num_tokens, protected, *indices)
    members = torch.zeros(group.shape[0], num_tokens - indices[1].shape[1], dtype=torch.long)
    return members.scatter_add_(1, group, torch.ones_like(group)) == 1


# (batch, N, protected, r): ViT-B/16 at 224 and 384 px, odd and prime N, r = 0, r past the clamp.
SHAPES = [(2, 197, 1, 16), (2, 577, 1, 100), (3, 61, 0, 20), (1, 61, 2, 1000), (2, 33, 5, 7), (2, 20, 0, 0),
          (1, 2, 0, 1), (1, 1, 0, 5), (2, 9, 9, 3)]
SHAPE_IDS = [f"B{b}-N{n}-p{p}-r{r}" for b, n, p, r in SHAPES]


# ----------------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", HALF + (torch.float64,))
def test_match_exact_on_tie_free_data(target, shape, dtype):
    batch, num_tokens, protected, r = shape
    metric = tie_free_metric(batch, num_tokens, 64, dtype, target.device, seed=num_tokens)
    actual = target.native._native_match(metric, r, protected)
    for a, e in zip(actual, reference.match(metric.cpu(), r, protected)):
        assert_equal(a, e)


@pytest.mark.parametrize("channels", [1, 4, 256])  # exact normalisation; 256: several channel stages
def test_match_ties_go_to_the_lower_position(target, channels):
    """Identical and zero vectors: scores tie exactly, so the first best B token wins and the ranking keeps
    the A order (zero vectors score 0 against everything, never NaN)."""
    metric = torch.ones(2, 131, channels, device=target.device)
    metric[1, ::3] = 0
    for protected in (0, 1):
        expected = reference.match(metric.cpu(), 40, protected)
        for a, e in zip(target.native._native_match(metric, 40, protected), expected):
            assert_equal(a, e)


def test_match_nan_metric_gives_valid_indices(target):
    """NaN ranks above every number (as in torch.max / torch.sort): still a permutation of the A tokens."""
    metric = tie_free_metric(1, 41, 64, torch.float32, target.device)
    metric[0, 6] = float("nan")
    unm, src, dst = (t.cpu() for t in target.native._native_match(metric, 10, 1))
    a_tokens = torch.cat([unm, src], 1).sort().values
    assert torch.equal(a_tokens, torch.arange(2, 41, 2)[None])
    assert src[0, 0] == 6 and bool((dst % 2 == 1).all())


# (batch, N, windows, width, r): ViT-B/16 in 4 x 4 windows of 2 x 2 tokens, unlisted A tokens with r past the
# listed ones, single-slot windows, a wide window, one token, no windows.
WINDOW_SHAPES = [(2, 197, 12, 8, 40), (1, 61, 4, 6, 50), (3, 9, 4, 2, 3), (2, 40, 1, 40, 7), (1, 1, 0, 4, 2),
                 (2, 20, 0, 6, 3)]
WINDOW_IDS = [f"B{b}-N{n}-W{w}x{s}-r{r}" for b, n, w, s, r in WINDOW_SHAPES]


def _window_match(target, metric, windows, r):
    """The emulated or real kernel against reference.window_match, index for index."""
    actual = target.native._native_window_match(metric, windows.to(target.device), r)
    expected = reference.window_match(metric.cpu(), windows.cpu(), r)
    for a, e in zip(actual, expected):
        assert a.is_contiguous()
        assert_equal(a, e)
    return [a.cpu() for a in actual]


@pytest.mark.parametrize("shape", WINDOW_SHAPES, ids=WINDOW_IDS)
@pytest.mark.parametrize("dtype", HALF + (torch.float64,))
def test_window_match_exact_on_tie_free_data(target, shape, dtype):
    batch, num_tokens, num_windows, width, r = shape
    windows = (random_windows(num_tokens, num_windows, width, seed=num_tokens) if num_windows
               else torch.empty(0, width, dtype=torch.long))
    metric = window_tie_free_metric(batch, num_tokens, windows, 64, dtype, target.device, seed=num_tokens)
    _window_match(target, metric, windows, r)


@pytest.mark.parametrize("channels", [1, 4, 256])  # exact normalisation; 256: several channels per lane
def test_window_match_ties_go_to_the_lower_position(target, channels):
    """Identical and zero vectors: the first best B slot wins, equal best scores rank by A position, and r past
    the listed A tokens merges only those."""
    metric = torch.ones(2, 131, channels, device=target.device)
    metric[1, ::3] = 0
    windows = random_windows(131, 9, 6, seed=3)
    _, src, _ = _window_match(target, metric, windows, 40)
    assert src.shape == (2, 27)


def test_window_match_nan_metric_gives_valid_indices(target):
    """A NaN score wins its window and ranks first (as torch.max / torch.sort), ties between NaNs to the lower
    position: still a permutation of the A tokens."""
    windows = random_windows(41, 5, 4, seed=1)
    metric = window_tie_free_metric(1, 41, windows, 64, torch.float32, target.device)
    metric[0, windows[0, 2]] = float("nan")  # an A token
    metric[0, windows[3, 1]] = float("nan")  # a B token: both A tokens of window 3
    unm, src, dst = _window_match(target, metric, windows, 6)
    assert sorted(src[0, :3].tolist()) == src[0, :3].tolist()
    assert torch.equal(torch.cat([unm, src], 1).sort().values, torch.arange(0, 41, 2)[None])


def test_window_match_checks_its_arguments(target):
    metric = torch.randn(1, 10, 4, device=target.device)
    windows = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]], device=target.device)
    with pytest.raises(ValueError, match=r"windows must be an int64 \[num_windows, even width\]"):
        target.native._native_window_match(metric, windows[:, :3], 2)
    with pytest.raises(ValueError, match=r"windows must be an int64 \[num_windows, even width\]"):
        target.native._native_window_match(metric, windows.int(), 2)
    with pytest.raises(ValueError, match="r must be >= 0"):
        target.native._native_window_match(metric, windows, -1)


# ----------------------------------------------------------------------------------------------------
# merge / merge_backward / unmerge / unmerge_backward
# ----------------------------------------------------------------------------------------------------
def _indices(batch, num_tokens, protected, r, device):
    metric = tie_free_metric(batch, num_tokens, 64, torch.float32, "cpu", seed=num_tokens + 1)
    return [t.to(device) for t in reference.match(metric, r, protected)]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("pos_mean", [False, True])
@pytest.mark.parametrize("with_size", [False, True])
def test_merge_and_backward(target, shape, dtype, pos_mean, with_size):
    batch, num_tokens, protected, r = shape
    device = target.device
    indices = _indices(batch, num_tokens, protected, r, device)
    x = tokens(batch, num_tokens, 48, dtype, device)  # 48: 16-byte packs
    pos = tokens(batch, num_tokens, 5, torch.float32, device, seed=3)  # another dtype, single elements
    size = sizes(batch, num_tokens, device) if with_size else None
    args = (*indices, protected, pos_mean)

    actual = target.native._native_merge(x, pos, size, *args)
    expected = reference.merge(x.cpu(), pos.cpu(), None if size is None else size.cpu(),
                               *(i.cpu() for i in indices), protected, pos_mean)
    for a, e in zip(actual, expected):
        assert_close(a, e)
    singleton = singleton_outputs(num_tokens, protected, [i.cpu() for i in indices])
    assert_equal(actual[0].cpu()[singleton], expected[0][singleton])  # merged with nothing: copied
    if not pos_mean:
        assert_equal(actual[1], expected[1])

    grad_x, grad_pos = torch.randn_like(actual[0]), torch.randn_like(actual[1])
    size_out = expected[2].to(device)
    actual = target.native._native_merge_backward(grad_x, grad_pos, size, size_out, *args)
    expected = reference.merge_backward(grad_x.cpu(), grad_pos.cpu(), None if size is None else size.cpu(),
                                        size_out.cpu(), *(i.cpu() for i in indices), protected, pos_mean)
    for a, e in zip(actual, expected):
        assert_close(a, e)
    if not pos_mean:
        assert_equal(actual[1], expected[1])


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", HALF)
def test_unmerge_and_backward(target, shape, dtype):
    batch, num_tokens, protected, r = shape
    indices = _indices(batch, num_tokens, protected, r, target.device)
    cpu_indices = [i.cpu() for i in indices]
    y = tokens(batch, num_tokens - indices[1].shape[1], 24, dtype, target.device)
    assert_equal(target.native._native_unmerge(y, *indices, protected),
                 reference.unmerge(y.cpu(), *cpu_indices, protected))
    grad = tokens(batch, num_tokens, 24, dtype, target.device, seed=4)
    assert_close(target.native._native_unmerge_backward(grad, *indices, protected),
                 reference.unmerge_backward(grad.cpu(), *cpu_indices, protected))


def test_all_sources_into_one_destination(target):
    """A zero metric sends every source to B token 0: one output token sums half the input."""
    x = tokens(2, 101, 8, torch.float32, target.device)
    indices = target.native._native_match(torch.zeros(2, 101, 4, device=target.device), 50, 0)
    assert bool((indices[2] == 1).all())
    cpu = [i.cpu() for i in indices]
    for a, e in zip(target.native._native_merge(x, None, None, *indices, 0, False),
                    reference.merge(x.cpu(), None, None, *cpu, 0, False)):
        assert_close(a, e)
    assert_close(target.native._native_unmerge_backward(x, *indices, 0), reference.unmerge_backward(x.cpu(), *cpu, 0))


def test_merge_family_is_deterministic(target):
    x = tokens(4, 197, 64, torch.float32, target.device)
    size = sizes(4, 197, target.device)
    indices = target.native._native_match(torch.zeros(4, 197, 4, device=target.device), 60, 1)  # big groups
    for call in (lambda: target.native._native_merge(x, x, size, *indices, 1, True),
                 lambda: target.native._native_unmerge_backward(x, *indices, 1)):
        first, second = call(), call()
        for a, b in zip(first, second):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------
# (batch, heads, Nq, Nk, head dim): ViT-B/16, cross attention, head dims past one warp and at the limit,
# no keys, no queries, an empty head dim.
ATTENTION_SHAPES = [(2, 3, 197, 197, 64), (1, 2, 37, 45, 24), (1, 1, 20, 70, 130), (1, 2, 17, 9, 256),
                    (1, 1, 40, 33, 128), (2, 1, 5, 0, 8), (1, 1, 0, 6, 8), (1, 1, 3, 4, 0)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=[f"B{b}-H{h}-q{q}-k{k}-D{d}" for b, h, q, k, d in
                                                      ATTENTION_SHAPES])
@pytest.mark.parametrize("dtype", HALF + (torch.float64,))
@pytest.mark.parametrize("with_size", [False, True])
def test_attention_and_backward(target, shape, dtype, with_size):
    batch, heads, nq, nk, dim = shape
    if target.emulated and batch * heads * nq * nk * max(dim, 1) > 400_000:
        pytest.skip("too slow under emulation")
    device = target.device
    q = tokens(batch * heads, nq, dim, dtype, device, 1).view(batch, heads, nq, dim)
    k = tokens(batch * heads, nk, dim, dtype, device, 2).view(batch, heads, nk, dim)
    v = tokens(batch * heads, nk, dim, dtype, device, 3).view(batch, heads, nk, dim)
    size = sizes(batch, nk, device) if with_size else None
    scale = max(dim, 1) ** -0.5
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731

    out, lse = target.native._native_attention(q, k, v, size, scale)
    expected_out, expected_lse = reference.attention(q.cpu(), k.cpu(), v.cpu(), cpu(size), scale)
    assert_close(out, expected_out)
    assert_close(lse, expected_lse)

    grad_out = torch.randn_like(out)
    actual = target.native._native_attention_backward(grad_out, q, k, v, size, out, lse, scale)
    expected = reference.attention_backward(grad_out.cpu(), q.cpu(), k.cpu(), v.cpu(), cpu(size), out.cpu(),
                                            lse.cpu(), scale)
    for a, e in zip(actual, expected):
        assert_close(a, e)


def test_attention_strided_inputs_and_determinism(target):
    qkv = tokens(2, 50, 3 * 2 * 32, torch.float32, target.device).view(2, 50, 3, 2, 32).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # strided views, as timm makes them
    size = sizes(2, 50, target.device)
    out, lse = target.native._native_attention(q, k, v, size, 0.2)
    dense = target.native._native_attention(q.contiguous(), k.contiguous(), v.contiguous(), size, 0.2)
    assert torch.equal(out, dense[0]) and torch.equal(lse, dense[1])
    grad_out = torch.randn_like(out)
    first = target.native._native_attention_backward(grad_out, q, k, v, size, out, lse, 0.2)
    second = target.native._native_attention_backward(grad_out, q, k, v, size, out, lse, 0.2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_attention_head_dim_limit(target):
    q = torch.zeros(1, 1, 2, 257, device=target.device)
    with pytest.raises(ValueError, match="head dims up to 256, got 257"):
        target.native._native_attention(q, q, q, None, 1.0)


# ----------------------------------------------------------------------------------------------------
# Autograd through the public ops (fp64)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos_mode", ["keep", "mean"])
@pytest.mark.parametrize("protected", [0, 2])
def test_bipartite_merge_gradcheck(target, pos_mode, protected):
    device = target.device
    x = tokens(2, 9, 2, torch.float64, device).requires_grad_()
    pos = tokens(2, 9, 2, torch.float64, device, 5).requires_grad_()
    size = (sizes(2, 9, device).double()[..., None] + 0.5).requires_grad_()
    metric = tie_free_metric(2, 9, 64, torch.float64, device)

    def step(x, pos, size):
        return torch.ops.tome.bipartite_merge(x, pos, size, 3, metric=metric, protected=protected,
                                              pos_mode=pos_mode)[:3]

    with target.route():
        assert torch.autograd.gradcheck(step, (x, pos, size))


def test_unmerge_and_attention_gradcheck(target):
    device = target.device
    metric = tie_free_metric(2, 12, 64, torch.float64, device)
    y = tokens(2, 8, 3, torch.float64, device).requires_grad_()
    q, k, v = (tokens(2, 5, 4, torch.float64, device, s).view(1, 2, 5, 4).requires_grad_() for s in (1, 2, 3))
    key_size = sizes(1, 5, device).double()
    with target.route():
        indices = torch.ops.tome.bipartite_match(metric, 4, 1)
        assert torch.autograd.gradcheck(lambda y: torch.ops.tome.unmerge(y, *indices, 1), (y,))
        assert torch.autograd.gradcheck(lambda q, k, v: torch.ops.tome.prop_attention(q, k, v, key_size), (q, k, v))


# ----------------------------------------------------------------------------------------------------
# layout.h (host side of the shared index arithmetic)
# ----------------------------------------------------------------------------------------------------
def test_layout_header(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    root = pathlib.Path(__file__).resolve().parents[1]
    binary = tmp_path / "layout_check"
    subprocess.run([compiler, "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{root / 'csrc' / 'include'}",
                    str(root / "python_tests" / "layout_check.cpp"), "-o", str(binary)], check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout
