import os

import pytest
import torch


@pytest.fixture(autouse=True)
def threads():
    """The thread count benchmarks run with: ``TOME_BENCH_THREADS``, else torch's default."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("TOME_BENCH_THREADS", previous)))
    yield torch.get_num_threads()
    torch.set_num_threads(previous)
