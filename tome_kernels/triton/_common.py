"""Shared pieces of the Triton kernels: interpreter flag, dtype choices, launch helpers, AOT specs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

# Read once, as triton.jit does when the decorators run (the interpreter must be chosen before import).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# What the GPU path ships (and python -m tome_kernels.aot compiles). float64 CUDA tensors run the reference;
# under the interpreter every kernel also runs in float64, so fp64 gradcheck exercises the kernels' math.
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

AOT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def runs_kernels(*tensors: torch.Tensor | None) -> bool:
    """True where the Triton kernels handle these tensors, False where the backend falls back to the reference."""
    for t in tensors:
        if t is not None and t.is_cuda and t.dtype not in GPU_DTYPES:
            return False
    return True


def acc_dtype(dtype: torch.dtype):
    """Accumulation dtype as a Triton constexpr: float64 for float64 inputs, else float32 (reference rule)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """bf16 tl.dot gives wrong results in the interpreter (../shared/PLATFORM.md): there the tiles are converted
    to fp32 before the dot. On GPUs bf16 tiles go to the tensor cores as they are."""
    return INTERPRET and dtype == torch.bfloat16


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# CUDA's grid limits per axis (x, y, z). The launchers fold batch (and heads) into axis 0, whose limit no
# tensor that fits in memory reaches; the check turns the impossible case into a clear error.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def checked_grid(*axes: int) -> tuple:
    for axis, (size, limit) in enumerate(zip(axes, GRID_LIMITS)):
        if size > limit:
            raise ValueError(f"tome: a launch grid of {axes} exceeds CUDA's limit of {limit} on axis {axis}")
    return axes


# Shared memory one block may use (opt-in maximum, bytes) on the architectures python -m tome_kernels.aot
# compiles for (CUDA tuning guides: A100 163 KB; GA10x, Ada, consumer Blackwell 99 KB; H100, B200 227 KB).
# On a GPU the launchers read the device's own value; this table serves the compile-time check.
SHARED_MEMORY_PER_BLOCK = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448, 120: 101_376}


def shared_memory_per_block(device: torch.device) -> int | None:
    """The opt-in shared memory limit per block of a CUDA device; None off CUDA (the interpreter has none)."""
    if device.type != "cuda":
        return None
    return _device_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _device_shared_memory(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def device_guard(t: torch.Tensor):
    """Launch on the tensor's device (Triton launches on the current device and the current torch stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def autotune_configs(gpu_configs: list[triton.Config]) -> list[triton.Config]:
    """The interpreter accepts only ONE autotune config: it gets the first (the one the tests cover)."""
    return gpu_configs[:1] if INTERPRET else gpu_configs


_ALIGNED_COUNTS = ("channels", "pos_channels", "head_dim")


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """One compile of one kernel for ``python -m tome_kernels.aot``.

    ``pointers`` maps each pointer argument to its element type (``fp16``, ``i64``...); ``floats`` names the
    fp32 scalar arguments; every other non-constexpr argument is an ``i32``.
    """

    kernel: object  # triton JITFunction
    label: str
    pointers: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    floats: tuple = ()

    def attrs(self) -> dict:
        """Divisibility-by-16 hints as the JIT derives them on the hot path: 16-byte aligned tensors, and
        strides / channel counts that are multiples of 16 (ViT-B, DETR). Token counts are never specialized
        (``do_not_specialize``: N shrinks every layer)."""
        aligned = [i for i, name in enumerate(self.kernel.arg_names)
                   if name not in self.constexprs and name not in self.floats
                   and (name in self.pointers or name.startswith("stride_") or name in _ALIGNED_COUNTS)]
        return {(i,): [["tt.divisibility", 16]] for i in aligned}

    def signature(self) -> dict:
        sig = {}
        for name in self.kernel.arg_names:
            if name in self.constexprs:
                sig[name] = "constexpr"
            elif name in self.pointers:
                sig[name] = "*" + self.pointers[name]
            elif name in self.floats:
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        return sig
