"""Proportional attention on CPU (fp32, B=8, H=12, D=64): the cpu backend's fused path (ATen's flash CPU
kernel with log(size) as a float mask) against the explicit-softmax reference (torch backend) and unbiased
SDPA (no size: the cost without proportional attention). Targets: >= 1.5x explicit, within 1.2x of SDPA.

    PYTHONPATH=. python -m pytest bench/test_bench_cpu_attention.py --benchmark-only --benchmark-min-rounds=10
"""

import os

import pytest
import torch
import torch.nn.functional as F

import tome_kernels

PROVIDERS = ["cpu", "torch", "sdpa_unbiased"]


@pytest.fixture(autouse=True)
def threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TOME_BENCH_THREADS", previous)))
    yield torch.get_num_threads()
    torch.set_num_threads(previous)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens", [197, 577])
def test_prop_attention(benchmark, threads, tokens, provider):
    if provider == "cpu" and tome_kernels.available_backends("cpu")["cpu"] is not None:
        pytest.skip(tome_kernels.available_backends("cpu")["cpu"])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 12, tokens, 64, generator=gen) for _ in range(3))
    size = 1 + torch.randint(0, 4, (8, tokens, 1), generator=gen).float()
    if provider == "sdpa_unbiased":
        step = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    else:
        def step():
            with tome_kernels.use_backend(provider):
                return torch.ops.tome.prop_attention(q, k, v, size)
    step()
    benchmark.group = f"prop_attention-N{tokens}"
    benchmark.extra_info.update(flops=4 * 8 * 12 * tokens * tokens * 64, threads=threads)
    with torch.inference_mode():
        benchmark(step)
