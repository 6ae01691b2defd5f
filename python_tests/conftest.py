import os
import tempfile

import torch

# The Triton interpreter must be chosen before any @triton.jit runs; real GPUs run the real kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
_cache = tempfile.mkdtemp(prefix="tome_test_cache_")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_cache, "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_cache, "triton"))

import pytest  # noqa: E402

import tome_kernels  # noqa: E402
from tome_testing import available  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKEND_CASES = [pytest.param((device, name), id=f"{device}-{name}") for device in DEVICES for name in available(device)]


@pytest.fixture(params=BACKEND_CASES)
def backend(request):
    """(device, backend name) for every backend usable here; the backend is active inside the test."""
    device, name = request.param
    with tome_kernels.use_backend(name):
        yield device, name


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One intra-op thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures(...)``): their
    matmuls are faster on one thread than on two fighting over a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
