"""Validation of every tome op, in one module with one policy: one clear ValueError / TypeError naming the
argument, raised before any backend runs.

Who checks what (docs/ARCHITECTURE.md has the table):

* Shapes, dtypes, devices and scalar arguments: here, for every op, by its real kernel and its fake kernel
  alike (so ``torch.compile`` raises the same errors). The C++ ops (``torch.ops.tome._native_*``) repeat
  these checks with the same messages (csrc/include/tome/checks.h), as they can be called directly.
* Values (index triples, sizes, window tables): they need the data, so they are checked on CPU tensors always and on GPU
  tensors only with ``TOME_CHECK_INDICES=1`` (a check there synchronises). A backend that checks them itself
  in a pass that reads them anyway says so in ``Backend.checked_values`` (the ``cpu`` backend: both, in
  csrc/cpu/common.h, with these messages); this module checks the rest. When nothing reaches a backend (the
  clamped r is 0, or an empty batch) this module checks them all.
* Sizes are checked in their own dtype, before any cast: finite and > 0 (>= 0 for attention), and, when the
  data accumulates in a narrower dtype than the sizes (float64 sizes, float32 data), inside that dtype's
  normal range, so that the cast keeps every size finite and positive (docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import layout

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
POS_MODES = ("keep", "mean")
_CHECK_GPU_VALUES = os.environ.get("TOME_CHECK_INDICES") == "1"


# ----------------------------------------------------------------------------------------------------
# Shapes, dtypes, devices, scalar arguments (real and fake kernels)
# ----------------------------------------------------------------------------------------------------
def check_float(name: str, t: Tensor, rank: int) -> None:
    if t.dim() != rank:
        raise ValueError(f"tome: {name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOATS:
        raise TypeError(f"tome: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same_device(**tensors: Optional[Tensor]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tome: tensors must be on one device, got {devices}")


def check_tokens(name: str, t: Optional[Tensor], batch, num_tokens) -> None:
    if t is None:
        return
    if t.dim() < 2 or t.shape[0] != batch or t.shape[1] != num_tokens:
        raise ValueError(f"tome: {name} must start with [batch={batch}, N={num_tokens}], "
                         f"got shape {tuple(t.shape)}")


def check_protected(protected: int, num_tokens) -> None:
    if protected < 0 or protected > num_tokens:
        raise ValueError(f"tome: protected must be in [0, N={num_tokens}], got {protected}")


def check_r(r: int, num_tokens, protected: int) -> None:
    if r < 0:
        raise ValueError(f"tome: r must be >= 0, got {r}")
    check_protected(protected, num_tokens)


def check_pos_mode(pos_mode: str) -> None:
    if pos_mode not in POS_MODES:
        raise ValueError(f"tome: pos_mode must be one of {POS_MODES}, got {pos_mode!r}")


def size_2d(size: Optional[Tensor], batch, num_tokens, name: str = "size") -> Optional[Tensor]:
    """Validate ``size`` ([B, N, 1] or [B, N]) and return it as [B, N]."""
    if size is None:
        return None
    if size.dtype not in FLOATS:
        raise TypeError(f"tome: {name} must be a floating tensor, got {size.dtype}")
    if size.dim() == 3 and size.shape[-1] == 1:
        size = size.squeeze(-1)
    if size.dim() != 2 or size.shape[0] != batch or size.shape[1] != num_tokens:
        raise ValueError(f"tome: {name} must be [batch={batch}, N={num_tokens}, 1] or [batch, N], "
                         f"got shape {tuple(size.shape)}")
    return size


def check_indices(unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, batch, num_tokens, protected) -> None:
    """Shapes of an index triple from ``bipartite_match`` for N input tokens."""
    for name, t in (("unm_idx", unm_idx), ("src_idx", src_idx), ("dst_idx", dst_idx)):
        if t.dtype != torch.int64 or t.dim() != 2 or t.shape[0] != batch:
            raise ValueError(f"tome: {name} must be an int64 [batch={batch}, k] tensor from bipartite_match, "
                             f"got {t.dtype} shape {tuple(t.shape)}")
    if src_idx.shape != dst_idx.shape:
        raise ValueError(f"tome: src_idx and dst_idx must have one shape, got {tuple(src_idx.shape)} "
                         f"and {tuple(dst_idx.shape)}")
    check_protected(protected, num_tokens)
    r = src_idx.shape[1]
    if r > (num_tokens - protected) // 2 or unm_idx.shape[1] + r != layout.num_a(num_tokens, protected):
        raise ValueError(f"tome: unm_idx/src_idx ({unm_idx.shape[1]} + {r} A tokens) do not fit N={num_tokens} "
                         f"tokens with protected={protected}: pass the indices bipartite_match returned for them")


def check_windows(windows: Tensor, num_tokens) -> None:
    """Shape of a window table: int64 [W, S], S even."""
    if windows.dtype != torch.int64 or windows.dim() != 2 or windows.shape[1] % 2:
        raise ValueError(f"tome: windows must be an int64 [num_windows, even width] tensor of token positions, "
                         f"got {windows.dtype} shape {tuple(windows.shape)}")


def check_attention(q: Tensor, k: Tensor, v: Tensor, size: Optional[Tensor]) -> Optional[Tensor]:
    """q [B, H, Nq, D], k and v [B, H, Nk, D] of one float dtype, size [B, Nk(, 1)]; returns size as [B, Nk]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t, 4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"tome: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"tome: attention shapes must be q [B, H, Nq, D], k and v [B, H, Nk, D], got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[3] == 0:
        raise ValueError(f"tome: q, k, v need a head dim >= 1, got q {tuple(q.shape)}")
    check_same_device(q=q, k=k, v=v, size=size)
    return size_2d(size, k.shape[0], k.shape[2])


# ----------------------------------------------------------------------------------------------------
# Values (real kernels only)
# ----------------------------------------------------------------------------------------------------
def _values_checked_here(t: Tensor, backend, kind: str) -> bool:
    """Whether this module checks the ``kind`` values ("indices", "sizes" or "windows") of ``t``: on CPU (or with
    TOME_CHECK_INDICES=1) unless ``backend``, the one that will read them, checks them itself."""
    if not (t.device.type == "cpu" or _CHECK_GPU_VALUES):
        return False
    return backend is None or t.device.type != "cpu" or kind not in backend.checked_values


def check_index_values(backend, num_tokens: int, protected: int, unm_idx, src_idx, dst_idx) -> None:
    """Raise ValueError unless the indices describe a matching of N tokens (e.g. they come from another
    call); ``backend`` is the one that runs next (None: none does)."""
    if not _values_checked_here(unm_idx, backend, "indices"):
        return
    a_idx = torch.cat([unm_idx, src_idx], dim=1)
    if a_idx.numel() and (a_idx.min() < protected or a_idx.max() >= num_tokens or (a_idx % 2 != 0).any()):
        raise ValueError(f"tome: unm_idx and src_idx must hold every even (A) token position in "
                         f"[protected={protected}, N={num_tokens}) once")
    if dst_idx.numel() and (dst_idx.min() < protected or dst_idx.max() >= num_tokens or (dst_idx % 2 != 1).any()):
        raise ValueError(f"tome: dst_idx must hold odd (B) token positions in [protected={protected}, N={num_tokens})")
    seen = torch.zeros(a_idx.shape[0], num_tokens, dtype=torch.long, device=a_idx.device)
    seen.scatter_add_(1, a_idx, torch.ones_like(a_idx))
    if (seen[:, layout.first_a(protected)::2] != 1).any():
        raise ValueError(f"tome: unm_idx and src_idx must hold every even (A) token position in "
                         f"[protected={protected}, N={num_tokens}) once (one is missing or repeated)")


def check_window_values(backend, num_tokens: int, windows: Tensor) -> None:
    """Raise ValueError unless ``windows`` holds even (A) positions in its even slots, odd (B) positions in its
    odd slots, all in [0, N), and no A position twice (``backend``: the one that runs next, None: none does)."""
    if windows.numel() == 0 or not _values_checked_here(windows, backend, "windows"):
        return
    if windows.min() < 0 or windows.max() >= num_tokens:
        raise ValueError(f"tome: windows must hold token positions in [0, N={num_tokens}), got values in "
                         f"[{windows.min().item()}, {windows.max().item()}]")
    a_pos, b_pos = windows[:, 0::2], windows[:, 1::2]
    if (a_pos % 2 != 0).any() or (b_pos % 2 != 1).any():
        raise ValueError("tome: windows must hold even (A) positions in its even slots and odd (B) positions in "
                         "its odd slots")
    if a_pos.flatten().unique().numel() != a_pos.numel():
        raise ValueError("tome: windows must list each A (even) position at most once")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate data of ``dtype`` in: float32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def check_size_values(size: Optional[Tensor], data_dtype: torch.dtype, allow_zero: bool, backend) -> None:
    """Merged sizes must be finite and > 0 (a weight of 0 or less has no mean); attention accepts 0 (log 0 =
    -inf masks the key, as DETR's padding). Checked in the sizes' own dtype; sizes wider than the
    accumulation dtype of the ``data_dtype`` data must also fit its normal range. ``backend``: the one that
    runs next (None: none does)."""
    if size is None or size.numel() == 0 or not _values_checked_here(size, backend, "sizes"):
        return
    low = size.min()
    if not (torch.isfinite(size).all() and (low >= 0 if allow_zero else low > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"tome: size must be finite and {bound}, got min {low.item()}, "
                         f"{(~torch.isfinite(size)).sum().item()} non-finite")
    if not (size.dtype == torch.float64 and accumulate_dtype(data_dtype) == torch.float32):
        return
    info = torch.finfo(torch.float32)
    low_nonzero = size.masked_fill(size == 0, float("inf")).min() if allow_zero else low
    high = size.max()
    if high > info.max or low_nonzero < info.tiny:
        raise ValueError(f"tome: size values must fit float32, the accumulation dtype of float32, float16 and "
                         f"bfloat16 data: got min {low_nonzero.item():g}, max {high.item():g}, outside "
                         f"[{info.tiny:g}, {info.max:g}]; pass the data as float64 to merge such sizes")
