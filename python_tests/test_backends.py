"""The backend registry and the backend choice: a backend added from outside runs the whole op contract;
``use_backend`` holds for the calling thread only; ``available_backends`` says why a backend cannot run."""

import inspect
import threading

import pytest
import torch

import test_ops
import tome_kernels
from toy_backend import ToyBackend

# The op contract of test_ops.py (every test that takes the ``backend`` fixture), on the toy backend.
for _name, _test in vars(test_ops).items():
    if _name.startswith("test_") and "backend" in inspect.signature(_test).parameters:
        globals()[_name] = _test


@pytest.fixture(scope="module")
def toy():
    toy = tome_kernels.register_backend(ToyBackend())
    yield toy
    tome_kernels.unregister_backend(toy.name)


@pytest.fixture
def backend(toy):
    """Overrides conftest's fixture: CPU tensors on the toy backend."""
    with tome_kernels.use_backend(toy.name):
        yield "cpu", toy.name


def test_the_toy_backend_runs_every_kernel(toy):
    """The contract tests above ran on the toy: each kernel-level function was called."""
    x = torch.randn(2, 11, 4, dtype=torch.float64, requires_grad=True)
    with tome_kernels.use_backend(toy.name):
        out, _, size, *indices = torch.ops.tome.bipartite_merge(x, None, None, 3, protected=1)
        q = out.view(2, 1, 8, 4)
        attended = torch.ops.tome.prop_attention(q, q, q, size).view(2, 8, 4)
        torch.ops.tome.unmerge(attended, *indices, 1).sum().backward()
        torch.ops.tome.bipartite_match(x.detach(), 0)  # r = 0 never reaches a backend
        torch.ops.tome.window_match(x.detach(), torch.tensor([[0, 1, 2, 3]]), 1)
    assert set(toy.calls) == {"match", "window_match", "merge", "merge_backward", "unmerge", "unmerge_backward", "attention",
                              "attention_backward"}
    assert "toy" in tome_kernels.backend_names() and tome_kernels.available_backends("cpu")["toy"] is None
    assert tome_kernels.available_backends("cuda")["toy"] == "the toy backend takes CPU tensors"


def test_a_backend_name_is_registered_once(toy):
    with pytest.raises(ValueError, match="already registered"):
        tome_kernels.register_backend(ToyBackend())


def test_use_backend_holds_for_the_calling_thread_only():
    """A thread inside ``use_backend("triton")`` (which cannot run CPU tensors without the interpreter, nor
    here: ``cuda``) leaves every other thread on its own choice."""
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def chooser():
        with tome_kernels.use_backend("cuda"):
            seen["chooser"] = tome_kernels.get_backend()
            entered.set()
            release.wait(10)
        seen["chooser after"] = tome_kernels.get_backend()

    thread = threading.Thread(target=chooser)
    thread.start()
    try:
        assert entered.wait(10)
        assert tome_kernels.get_backend() == "auto"
        x = torch.randn(2, 9, 4)
        for _ in range(20):  # while the other thread holds "cuda", CPU tensors here still run
            torch.ops.tome.bipartite_merge(x, None, None, 2)
    finally:
        release.set()
        thread.join()
    assert seen == {"chooser": "cuda", "chooser after": "auto"}


def test_overlapping_use_backend_blocks_restore_their_own_choice():
    """Blocks that open and close out of order (two threads, interleaved) each restore what they saw."""
    steps = [threading.Event() for _ in range(3)]
    seen = []

    def first():
        with tome_kernels.use_backend("torch"):
            steps[0].set()
            steps[1].wait(10)  # the second thread opens its block inside ours and closes it after
            seen.append(("first", tome_kernels.get_backend()))
        seen.append(("first after", tome_kernels.get_backend()))
        steps[2].set()

    def second():
        steps[0].wait(10)
        with tome_kernels.use_backend("cpu"):
            steps[1].set()
            steps[2].wait(10)
            seen.append(("second", tome_kernels.get_backend()))
        seen.append(("second after", tome_kernels.get_backend()))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [("first", "torch"), ("first after", "auto"), ("second", "cpu"), ("second after", "auto")]
    with tome_kernels.use_backend("torch"):  # nested in one thread: the inner block restores the outer
        with tome_kernels.use_backend("cpu"):
            assert tome_kernels.get_backend() == "cpu"
        assert tome_kernels.get_backend() == "torch"
    assert tome_kernels.get_backend() == "auto"


def test_set_backend_is_the_process_default_under_use_backend():
    """``set_backend`` sets what threads outside a ``use_backend`` block use; a block still wins inside."""
    try:
        tome_kernels.set_backend("torch")
        seen = []
        thread = threading.Thread(target=lambda: seen.append(tome_kernels.get_backend()))
        thread.start()
        thread.join()
        assert seen == ["torch"]
        with tome_kernels.use_backend("cpu"):
            assert tome_kernels.get_backend() == "cpu"
    finally:
        tome_kernels.set_backend("auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given on a machine without a GPU")
def test_available_backends_says_why_not_without_a_gpu():
    reasons = tome_kernels.available_backends("cuda")
    assert "no CUDA device" in reasons["cuda"] and "no CUDA device" in reasons["triton"]
    assert reasons["torch"] is None
    assert reasons["cpu"] == "the cpu backend takes CPU tensors"
