"""No growth in resident memory over 10k calls of each op (forward and, through autograd, backward) on the
cpu backend (and the torch backend where it is the only one): small tensors, so a leak of even one buffer
per call (>= 10k x 1 KB) stands far above the allocator's noise."""

import os

import pytest
import torch
from tome_testing import tie_free_metric

import tome_kernels

ops = torch.ops.tome
CALLS = 10_000
SLACK = 4 << 20  # bytes: allocator / interpreter noise; a per-call leak of >= 400 bytes exceeds it
BACKEND = "cpu" if tome_kernels.available_backends("cpu")["cpu"] is None else "torch"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _calls():
    x = torch.randn(2, 33, 8, requires_grad=True)
    size = torch.rand(2, 33, 1) + 1
    metric = tie_free_metric(2, 33, 64)
    idx = ops.bipartite_match(metric, 10, 1)
    windows = torch.arange(32).view(4, 8)
    q = torch.randn(2, 2, 17, 8, requires_grad=True)
    source = torch.eye(33).expand(2, 33, 33)

    def backward(*outputs):
        torch.autograd.backward([o.sum() for o in outputs if o.requires_grad])

    return {
        "bipartite_match": lambda: ops.bipartite_match(metric, 10, 1),
        "window_match": lambda: ops.window_match(metric, windows, 6),
        "bipartite_merge": lambda: backward(*ops.bipartite_merge(x, x, size, 10, metric=metric, protected=1)[:3]),
        "merge": lambda: backward(*ops.merge(x, size, *idx, 1)),
        "unmerge": lambda: backward(ops.unmerge(x[:, :23], *idx, 1)),
        "prop_attention": lambda: backward(ops.prop_attention(q, q, q, size[:, :17, 0])),
        "merge_source": lambda: ops.merge_source(source, *idx, 1),
        "errors": lambda: pytest.raises(ValueError, ops.merge, x, size, idx[0], idx[1] + 1, idx[2], 1),
    }


@pytest.mark.parametrize("op", list(_calls()))
def test_no_rss_growth(op):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tome_kernels.use_backend(BACKEND):
            call = _calls()[op]
            for _ in range(1000):  # warm up: allocator pools, dispatcher caches
                call()
            before = rss()
            for _ in range(CALLS):
                call()
            growth = rss() - before
    finally:
        torch.set_num_threads(threads)
    assert growth <= SLACK, f"{op}: RSS grew by {growth / 2**20:.1f} MiB over {CALLS} calls"
