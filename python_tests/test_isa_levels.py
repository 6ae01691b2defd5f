"""The cpu backend at every instruction-set level of csrc/cpu/isa.h this CPU supports (TOME_CPU_ISA), and
under ATen's own lower CPU capabilities (ATEN_CPU_CAPABILITY, which changes the BLAS / ATen code our kernels
call): each level in a fresh process (both variables are read once), running a selection of the
determinism and parity tests."""

import os
import subprocess
import sys

import pytest

import tome_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(tome_kernels.available_backends("cpu")["cpu"] is not None,
                                reason="cpu backend not built")

# Thread-count determinism of every op and of the attention backward, parity with the reference.
SELECTION = [
    "python_tests/test_determinism.py::test_cpu_thread_counts_give_the_same_bits[(8, 197, 48)]",
    "python_tests/test_cpu_backend.py", "-k",
    "same_bits or deterministic or gradcheck or window or (equals_reference and (vit- or N197-p1 or N11-p0))",
]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


def _supported_levels() -> list[str]:
    flags, levels = _cpu_flags(), ["scalar"]
    if {"avx2", "fma"} <= flags:
        levels.append("avx2")
    if {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags:
        levels.append("avx512")
    return levels


def _run(env: dict[str, str], args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=1200)


def _run_selection(env: dict[str, str]):
    result = _run(env, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable", *SELECTION])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_tome_cpu_isa_levels(level):
    if level not in _supported_levels():
        pytest.skip(f"this CPU does not support {level}")
    _run_selection({"TOME_CPU_ISA": level})


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_aten_cpu_capabilities(capability):
    if capability == "avx2" and "avx2" not in _supported_levels():
        pytest.skip("this CPU does not support avx2")
    _run_selection({"ATEN_CPU_CAPABILITY": capability})


def test_bad_tome_cpu_isa_is_an_error_naming_it():
    """An unknown level, or one above what the CPU supports, is a ValueError naming the variable."""
    values = ["sse9"] + [level for level in ("avx2", "avx512") if level not in _supported_levels()]
    code = ("import torch, tome_kernels\n"
            "with tome_kernels.use_backend('cpu'):\n"
            "    try:\n"
            "        torch.ops.tome.bipartite_merge(torch.randn(2, 9, 4), None, None, 2)\n"
            "    except ValueError as error:\n"
            "        print(error)\n")
    for value in values:
        result = _run({"TOME_CPU_ISA": value}, ["-c", code])
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"TOME_CPU_ISA={value} but this CPU" in result.stdout or "TOME_CPU_ISA must be" in result.stdout
