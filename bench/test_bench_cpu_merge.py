"""``torch.ops.tome.bipartite_merge`` on CPU (fp32): the cpu backend against the torch backend (reference),
the plain-PyTorch ToMe chain, eager and compiled, and the floor (the larger of one copy of x and one BLAS
product of the normalised A and B sets). Targets for the cpu backend: >= 4x the chain, >= 2x the compiled
chain, <= 2x the floor.

    PYTHONPATH=. python -m pytest bench/test_bench_cpu_merge.py --benchmark-only --benchmark-min-rounds=10 \\
        --benchmark-columns=min,median,rounds

``extra_info`` holds the bytes moved (x in and out, the metric in) and the score FLOPs of one step.
``TOME_BENCH_THREADS=n`` sets torch's intra-op threads (on a shared machine, 1 avoids timing the waits of
an OpenMP barrier for a descheduled thread).
"""

import os
import tempfile

import pytest
import torch

import tome_kernels

import baselines

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tome_bench_inductor"))

# name: (batch, tokens, channels, metric channels or None for metric = x, protected, r)
SHAPES = {
    "vit_b": (32, 197, 768, 64, 1, 16),
    "detr_encoder": (2, 1100, 256, None, 0, 128),
}
PROVIDERS = ["cpu", "torch", "chain", "chain_compiled", "floor_copy", "floor_scores"]


def _step(provider, x, size, metric, protected, r):
    if provider in ("cpu", "torch"):
        def run():
            with tome_kernels.use_backend(provider):
                return torch.ops.tome.bipartite_merge(x, None, size, r, metric=metric, protected=protected)

        return run
    if provider == "chain":
        return lambda: baselines.chain(x, size, metric, r, protected)
    if provider == "chain_compiled":
        compiled = baselines.compiled_chain()
        return lambda: compiled(x, size, metric, r, protected)
    if provider == "floor_copy":
        return lambda: baselines.floor_copy(x)
    a, b = baselines.normalised_sets(metric, protected)
    return lambda: baselines.floor_scores(a, b)


@pytest.fixture(autouse=True)
def threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TOME_BENCH_THREADS", previous)))
    yield torch.get_num_threads()
    torch.set_num_threads(previous)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bipartite_merge(benchmark, threads, shape, provider):
    reason = tome_kernels.available_backends("cpu")["cpu"]
    if provider == "cpu" and reason is not None:
        pytest.skip(reason)
    if provider == "chain_compiled" and benchmark.disabled:
        pytest.skip("compiling the chain takes ~30 s; only worth it when timing")
    batch, tokens, channels, metric_channels, protected, r = SHAPES[shape]
    x, size, metric = baselines.make_inputs(batch, tokens, channels, metric_channels)
    step = _step(provider, x, size, metric, protected, r)
    step()  # warm-up (and compile)
    num_a, num_b = tome_kernels.reference.num_a(tokens, protected), tome_kernels.reference.num_b(tokens, protected)
    benchmark.group = f"bipartite_merge-{shape}"
    benchmark.extra_info.update(
        bytes=x.element_size() * (x.numel() * (2 * tokens - r) // tokens + (0 if metric is x else metric.numel())),
        flops=2 * batch * num_a * num_b * metric.shape[-1], threads=threads)
    benchmark(step)
