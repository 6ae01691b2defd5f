import importlib.metadata
import os
import sys
import tempfile

import pytest
import torch

# The compiled-chain baselines reuse inductor's cache across runs (a compile takes ~30 s here).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tome_bench_inductor"))

import shapes  # noqa: E402


@pytest.fixture(autouse=True)
def threads():
    """The thread count benchmarks run with: ``TOME_BENCH_THREADS``, else torch's default. On a shared
    machine 1 avoids timing an OpenMP barrier's wait for a descheduled thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TOME_BENCH_THREADS", previous)))
    yield torch.get_num_threads()
    torch.set_num_threads(previous)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Versions and the device in the JSON, for scripts/bench_report.py."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    machine_info.update(
        torch=torch.__version__, triton=triton_version, device=shapes.DEVICE,
        device_name=torch.cuda.get_device_name() if shapes.DEVICE == "cuda" else None,
        cpu_count=os.cpu_count(),
        threads=int(os.environ.get("TOME_BENCH_THREADS", torch.get_num_threads())),
        quick=shapes.QUICK, load_average=os.getloadavg(), executable=sys.executable)
