"""Determinism: the same inputs give identical bits on every backend, for any number of OpenMP threads (cpu
backend), and when several Python threads call the ops at once."""

import threading

import pytest
import torch
from tome_testing import random_windows, tie_free_metric

import tome_kernels

ops = torch.ops.tome
NATIVE = tome_kernels.available_backends("cpu")["cpu"] is None


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def every_op(batch, num_tokens, channels, protected=1, r=None):
    """Every public op and, through autograd, every backward op, on one input: a tuple of output tensors."""
    r = num_tokens // 3 if r is None else r
    x = randn(batch, num_tokens, channels).requires_grad_()
    pos = randn(batch, num_tokens, 4, seed=1).requires_grad_()
    size = (1 + randn(batch, num_tokens, 1, seed=2).abs()).requires_grad_()
    metric = tie_free_metric(batch, num_tokens, 64, seed=3)
    x_out, pos_out, size_out, *idx = ops.bipartite_merge(x, pos, size, r, metric=metric, protected=protected,
                                                         pos_mode="mean")
    match = ops.bipartite_match(randn(batch, num_tokens, 16, seed=4), r, protected)  # random: near-ties too
    windows = random_windows(num_tokens, num_tokens // 8, 8)
    window_match = ops.window_match(randn(batch, num_tokens, 16, seed=5), windows, r)
    merged, _ = ops.merge(x, size, *match, protected)
    y = ops.unmerge(x_out, *idx, protected)
    heads, dim = 2, channels // 2
    q = x[:, :, :2 * dim].reshape(batch, num_tokens, heads, dim).transpose(1, 2)
    attended = ops.prop_attention(q, q, q, size.detach().squeeze(-1))
    source = ops.merge_source(torch.eye(num_tokens).expand(batch, -1, -1), *idx, protected)
    loss = (x_out.square().sum() + pos_out.sum() + size_out.sum() + merged.sum() + y.square().sum()
            + attended.square().sum())
    grads = torch.autograd.grad(loss, (x, pos, size))
    return (x_out, pos_out, size_out, *idx, *match, *window_match, merged, y, attended, source, *grads)


def assert_bit_equal(first, second):
    for a, b in zip(first, second, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                           b.view(torch.uint8) if b.is_floating_point() else b)


def test_same_inputs_same_bits(backend):
    device, name = backend
    shape = (2, 23, 8) if name == "triton" else (3, 197, 32)
    assert_bit_equal(every_op(*shape), every_op(*shape))


@pytest.mark.skipif(not NATIVE, reason="cpu backend not built")
@pytest.mark.parametrize("shape", [(4, 577, 64), (2, 1025, 128), (8, 197, 48)], ids=str)
def test_cpu_thread_counts_give_the_same_bits(shape):
    """Large enough that parallel_chunks forks (and ATen's attention splits its rows) at 2 threads."""
    threads = torch.get_num_threads()
    try:
        with tome_kernels.use_backend("cpu"):
            torch.set_num_threads(1)
            one = every_op(*shape)
            torch.set_num_threads(2)
            two = every_op(*shape)
    finally:
        torch.set_num_threads(threads)
    assert_bit_equal(one, two)


def test_python_threads_give_the_same_answers(backend):
    """Four Python threads call every op (forward and backward) at once, 3 times each: every call gives the
    single-threaded bits."""
    device, name = backend
    if name == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter keeps the launch grid in global state: not thread-safe (GPU launches are)")
    shapes = [(3, 197, 32), (2, 64, 16), (1, 577, 8), (4, 11, 4)]
    expected = {shape: every_op(*shape) for shape in shapes}
    errors, barrier = [], threading.Barrier(4)

    def worker(i):
        try:
            barrier.wait()
            with tome_kernels.use_backend(name):  # the choice holds for the thread that makes it
                for k in range(3):
                    shape = shapes[(i + k) % len(shapes)]
                    assert_bit_equal(every_op(*shape), expected[shape])
        except BaseException as error:  # noqa: BLE001 (reported by the main thread)
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
