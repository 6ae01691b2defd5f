"""The op contract of test_ops.py (every test that takes the ``backend`` fixture) on the CUDA kernels run
under CPU emulation (python_tests/cuda_emulation). Set TOME_CUDA_EMULATION=1; on a GPU, test_ops.py runs the
same tests on the real kernels."""

import inspect
import os

import pytest

import cuda_emulation
import test_ops

# The attention shape of a full ViT layer takes minutes under emulation; the smaller ones cover the kernel.
_TOO_SLOW = {"test_prop_attention_equals_reference": "vit"}

for _name, _test in vars(test_ops).items():
    if _name.startswith("test_") and "backend" in inspect.signature(_test).parameters:
        globals()[_name] = _test


@pytest.fixture(scope="module")
def _emulated_kernels():
    if os.environ.get("TOME_CUDA_EMULATION") != "1":
        pytest.skip("set TOME_CUDA_EMULATION=1 to run the CUDA kernels under CPU emulation")
    cuda_emulation.build()


@pytest.fixture
def backend(request, _emulated_kernels):
    """Overrides conftest's fixture: CPU tensors, routed to the emulated CUDA kernels."""
    skipped = _TOO_SLOW.get(request.function.__name__)
    if skipped and skipped in request.node.callspec.id.split("-"):
        pytest.skip("too slow under emulation")
    with cuda_emulation.routed():
        yield "cpu", cuda_emulation.BACKEND_NAME
