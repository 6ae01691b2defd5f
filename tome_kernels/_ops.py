"""Every ``torch.ops.tome`` schema, defined once, with its validation, fake kernel and autograd.

Public ops: ``bipartite_match``, ``merge``, ``bipartite_merge``, ``unmerge``, ``prop_attention``,
``merge_source``. ``merge`` and ``prop_attention`` are CompositeImplicitAutograd compositions of the kernel
ops below, so their autograd, fakes and compile support come from those. Kernel ops (``bipartite_match``,
``bipartite_merge``, ``_merge``, ``_merge_backward``, ``unmerge``/``_unmerge_backward``, ``_prop_attention``
/ ``_prop_attention_backward``) route to the backend chosen for the device (:mod:`tome_kernels._backend`);
the C++ backends implement the ``_native_*`` schemas.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch.library import Library, custom_op

from . import reference
from ._backend import resolve

# Index and size values of CPU tensors are checked always (indices by the C++ cpu backend itself, before any
# parallel region, else here); of GPU tensors only on request, as the check synchronises.
_CHECK_GPU_INDICES = os.environ.get("TOME_CHECK_INDICES") == "1"

_lib = Library("tome", "FRAGMENT")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_POS_MODES = ("keep", "mean")

# ----------------------------------------------------------------------------------------------------
# Native (C++ CPU / CUDA) kernel schemas: implemented in csrc/ with TORCH_LIBRARY_IMPL(tome, CPU|CUDA).
# Sizes are [batch, N] (or None); size_out is [batch, N - r].
# ----------------------------------------------------------------------------------------------------
_lib.define("_native_match(Tensor metric, int r, int protected) -> (Tensor, Tensor, Tensor)")
_lib.define("_native_merge(Tensor x, Tensor? pos, Tensor? size, Tensor unm_idx, Tensor src_idx, "
            "Tensor dst_idx, int protected, bool pos_mean) -> (Tensor, Tensor, Tensor)")
_lib.define("_native_merge_backward(Tensor grad_x, Tensor? grad_pos, Tensor? size, Tensor size_out, "
            "Tensor unm_idx, Tensor src_idx, Tensor dst_idx, int protected, bool pos_mean) -> (Tensor, Tensor)")
_lib.define("_native_bipartite_merge(Tensor x, Tensor? pos, Tensor? size, Tensor metric, int r, int protected, "
            "bool pos_mean) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_lib.define("_native_unmerge(Tensor y, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, int protected) -> Tensor")
_lib.define("_native_unmerge_backward(Tensor grad, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, "
            "int protected) -> Tensor")
_lib.define("_native_attention(Tensor q, Tensor k, Tensor v, Tensor? size, float scale) -> (Tensor, Tensor)")
_lib.define("_native_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? size, "
            "Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)")


# ----------------------------------------------------------------------------------------------------
# Validation: one clear exception naming the argument, shared by the real and the fake kernels.
# ----------------------------------------------------------------------------------------------------
def _check_float(name: str, t: Tensor, rank: int) -> None:
    if t.dim() != rank:
        raise ValueError(f"tome: {name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"tome: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_same_device(**tensors: Optional[Tensor]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tome: tensors must be on one device, got {devices}")


def _check_tokens(name: str, t: Optional[Tensor], batch, num_tokens) -> None:
    if t is None:
        return
    if t.dim() < 2 or t.shape[0] != batch or t.shape[1] != num_tokens:
        raise ValueError(f"tome: {name} must start with [batch={batch}, N={num_tokens}], "
                         f"got shape {tuple(t.shape)}")


def _check_protected(protected: int, num_tokens) -> None:
    if protected < 0 or protected > num_tokens:
        raise ValueError(f"tome: protected must be in [0, N={num_tokens}], got {protected}")


def _size_2d(size: Optional[Tensor], batch, num_tokens, name: str = "size") -> Optional[Tensor]:
    """Validate ``size`` ([B, N, 1] or [B, N]) and return it as [B, N]."""
    if size is None:
        return None
    if size.dtype not in _FLOATS:
        raise TypeError(f"tome: {name} must be a floating tensor, got {size.dtype}")
    if size.dim() == 3 and size.shape[-1] == 1:
        size = size.squeeze(-1)
    if size.dim() != 2 or size.shape[0] != batch or size.shape[1] != num_tokens:
        raise ValueError(f"tome: {name} must be [batch={batch}, N={num_tokens}, 1] or [batch, N], "
                         f"got shape {tuple(size.shape)}")
    return size


def _check_indices(unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, batch, num_tokens, protected) -> None:
    """Shape checks of an index triple from ``bipartite_match`` for N input tokens."""
    for name, t in (("unm_idx", unm_idx), ("src_idx", src_idx), ("dst_idx", dst_idx)):
        if t.dtype != torch.int64 or t.dim() != 2 or t.shape[0] != batch:
            raise ValueError(f"tome: {name} must be an int64 [batch={batch}, k] tensor from bipartite_match, "
                             f"got {t.dtype} shape {tuple(t.shape)}")
    if src_idx.shape != dst_idx.shape:
        raise ValueError(f"tome: src_idx and dst_idx must have one shape, got {tuple(src_idx.shape)} "
                         f"and {tuple(dst_idx.shape)}")
    _check_protected(protected, num_tokens)
    r = src_idx.shape[1]
    if r > (num_tokens - protected) // 2 or unm_idx.shape[1] + r != reference.num_a(num_tokens, protected):
        raise ValueError(f"tome: unm_idx/src_idx ({unm_idx.shape[1]} + {r} A tokens) do not fit N={num_tokens} "
                         f"tokens with protected={protected}: pass the indices bipartite_match returned for them")


def _check_size_values(size: Optional[Tensor], allow_zero: bool, backend=None) -> None:
    """Merged sizes must be positive and finite (a weight of 0 or less has no mean); attention accepts 0 (log 0
    = -inf masks the key, as DETR's padding). Left to ``backend`` (the one that runs the op) on CPU when it
    checks them itself."""
    if size is None or not (size.device.type == "cpu" or _CHECK_GPU_INDICES) or size.numel() == 0:
        return
    if size.device.type == "cpu" and getattr(backend, "CHECKS_CPU_VALUES", False):
        return
    low = size.min()
    if not (torch.isfinite(size).all() and (low >= 0 if allow_zero else low > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"tome: size must be finite and {bound}, got min {low.item()}, "
                         f"{(~torch.isfinite(size)).sum().item()} non-finite")


def _fresh(t: Tensor) -> Tensor:
    """A contiguous copy (the r = 0 identity): outputs are contiguous, as the fakes say, whatever the input's
    strides (clone() would keep a transposed input's)."""
    return t.clone(memory_format=torch.contiguous_format)


def _check_index_values(backend, num_tokens, protected, unm_idx, src_idx, dst_idx) -> None:
    if unm_idx.device.type == "cpu" and getattr(backend, "CHECKS_CPU_VALUES", False):
        return
    if unm_idx.device.type == "cpu" or _CHECK_GPU_INDICES:
        reference.check_index_values(num_tokens, protected, unm_idx, src_idx, dst_idx)


# ----------------------------------------------------------------------------------------------------
# bipartite_match
# ----------------------------------------------------------------------------------------------------
@custom_op("tome::bipartite_match", mutates_args=())
def bipartite_match(metric: Tensor, r: int, protected: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Each A (even) token's most similar B (odd) token; the r best pairs merge.

    Returns ``(unm_idx [B, nA - r], src_idx [B, r], dst_idx [B, r])`` (int64 token positions). See
    :mod:`tome_kernels.reference` for the layout; equivalent PyTorch: ``reference.match``.
    """
    _check_match(metric, r, protected)
    if reference.clamp_r(r, metric.shape[1], protected) == 0:  # nothing merges: the identity layout
        unm_idx = reference.a_positions(metric.shape[1], protected, metric.device).expand(metric.shape[0], -1)
        empty = metric.new_empty(metric.shape[0], 0, dtype=torch.long)
        return unm_idx.clone(), empty, empty.clone()
    return resolve(metric.device).match(metric, r, protected)


def _check_match(metric: Tensor, r: int, protected: int) -> None:
    _check_float("metric", metric, 3)
    if r < 0:
        raise ValueError(f"tome: r must be >= 0, got {r}")
    _check_protected(protected, metric.shape[1])


@bipartite_match.register_fake
def _(metric, r, protected=0):
    _check_match(metric, r, protected)
    batch, num_tokens, _ = metric.shape
    r = reference.clamp_r(r, num_tokens, protected)
    num_unmerged = reference.num_a(num_tokens, protected) - r
    new = metric.new_empty
    return (new(batch, num_unmerged, dtype=torch.long), new(batch, r, dtype=torch.long),
            new(batch, r, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# _merge: x (size-weighted), pos (keep | mean), size (sum) in one kernel call
# ----------------------------------------------------------------------------------------------------
def _check_x_pos(x, pos, pos_mode, names=("x", "pos")):
    """Checks of the tokens to merge and their positions (or of their gradients, by ``names``); returns
    (batch, N)."""
    _check_float(names[0], x, 3)
    batch, num_tokens, _ = x.shape
    if pos is not None:
        _check_float(names[1], pos, 3)
        _check_tokens(names[1], pos, batch, num_tokens)
    if pos_mode not in _POS_MODES:
        raise ValueError(f"tome: pos_mode must be one of {_POS_MODES}, got {pos_mode!r}")
    return batch, num_tokens


def _check_merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mode):
    batch, num_tokens = _check_x_pos(x, pos, pos_mode)
    _check_same_device(x=x, pos=pos, size=size, unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx)
    _check_indices(unm_idx, src_idx, dst_idx, batch, num_tokens, protected)
    return _size_2d(size, batch, num_tokens)


@custom_op("tome::_merge", mutates_args=())
def _merge(x: Tensor, pos: Optional[Tensor], size: Optional[Tensor], unm_idx: Tensor, src_idx: Tensor,
           dst_idx: Tensor, protected: int, pos_mode: str) -> tuple[Tensor, Tensor, Tensor]:
    size = _check_merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mode)
    backend = resolve(x.device)
    _check_size_values(size, allow_zero=False, backend=backend if src_idx.shape[1] else None)
    _check_index_values(backend, x.shape[1], protected, unm_idx, src_idx, dst_idx)
    if src_idx.shape[1] == 0:  # r = 0: the input, unchanged and in the same order, on every backend
        size_out = x.new_ones(x.shape[:2]).unsqueeze(-1) if size is None else _fresh(size.unsqueeze(-1))
        return _fresh(x), (x.new_empty(0) if pos is None else _fresh(pos)), size_out
    x_out, pos_out, size_out = backend.merge(x, pos, size, unm_idx, src_idx, dst_idx, protected,
                                                       pos_mode == "mean")
    return x_out, pos_out, size_out.unsqueeze(-1)


@_merge.register_fake
def _(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mode):
    size = _check_merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mode)
    batch, num_tokens, channels = x.shape
    num_out = num_tokens - src_idx.shape[1]
    pos_out = x.new_empty(0) if pos is None else pos.new_empty(batch, num_out, pos.shape[-1])
    size_dtype = x.dtype if size is None else size.dtype
    return x.new_empty(batch, num_out, channels), pos_out, x.new_empty(batch, num_out, 1, dtype=size_dtype)


def _save_merge(ctx, x, pos, size, indices, merged, protected, pos_mode):
    """Autograd state of a merge of x/pos/size by ``indices`` into ``merged`` = (x_out, pos_out, size_out)."""
    x_out, pos_out, size_out = merged
    ctx.protected, ctx.pos_mode, ctx.has_pos, ctx.has_size = protected, pos_mode, pos is not None, size is not None
    size_grad = size is not None and size.requires_grad
    if not size_grad:
        # Sizes only depend on sizes: without a differentiable size they are constants.
        ctx.mark_non_differentiable(size_out)
    saved_x = (x, x_out, pos, pos_out) if size_grad else (None,) * 4
    ctx.size_shape = None if size is None else size.shape
    ctx.save_for_backward(size, size_out, *indices, *saved_x)


def _merge_gradients(ctx, grad_x_out, grad_pos_out, grad_size_out):
    """(grad x, grad pos, grad size) of a merge saved by ``_save_merge``."""
    size, size_out, unm_idx, src_idx, dst_idx, x, x_out, pos, pos_out = ctx.saved_tensors
    needs_x, needs_pos, needs_size = ctx.needs_input_grad[:3]
    grad_pos_out = grad_pos_out if (ctx.has_pos and needs_pos) else None
    grad_x, grad_pos = _merge_backward(grad_x_out, grad_pos_out, size, size_out, unm_idx, src_idx, dst_idx,
                                       ctx.protected, ctx.pos_mode)
    grad_size = None
    if needs_size and ctx.has_size:
        grad_size = _size_gradient(grad_x_out, grad_pos_out, grad_size_out, x, x_out, pos, pos_out, size_out,
                                   unm_idx, src_idx, dst_idx, ctx.protected, ctx.pos_mode)
        grad_size = grad_size.reshape(ctx.size_shape)
    return grad_x if needs_x else None, grad_pos if grad_pos_out is not None else None, grad_size


def _merge_setup_context(ctx, inputs, output):
    x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mode = inputs
    _save_merge(ctx, x, pos, size, (unm_idx, src_idx, dst_idx), output, protected, pos_mode)


def _merge_backward_autograd(ctx, grad_x_out, grad_pos_out, grad_size_out):
    return *_merge_gradients(ctx, grad_x_out, grad_pos_out, grad_size_out), None, None, None, None, None


def _size_gradient(grad_x_out, grad_pos_out, grad_size_out, x, x_out, pos, pos_out, size_out, unm_idx, src_idx,
                   dst_idx, protected, pos_mode):
    """d/d size_i of ``x_out[o] = sum_j size_j x_j / size_out[o]`` is ``(x_i - x_out[o]) . g[o] / size_out[o]``;
    ``size_out = sum size`` adds ``g_size[o]``. Made of ``unmerge`` so every backend has it."""
    def spread(t):
        return unmerge(t, unm_idx, src_idx, dst_idx, protected)

    grad = ((x - spread(x_out)) * spread(grad_x_out / size_out)).sum(-1)
    if grad_pos_out is not None and pos_mode == "mean":
        grad = grad + ((pos - spread(pos_out)) * spread(grad_pos_out / size_out)).sum(-1)
    if grad_size_out is not None:
        grad = grad + spread(grad_size_out).squeeze(-1)
    return grad


_merge.register_autograd(_merge_backward_autograd, setup_context=_merge_setup_context)


def _check_merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected, pos_mode):
    """Validate a direct call as _merge's; returns (size, size_out) as [B, N] and [B, N - r]."""
    batch, num_out = _check_x_pos(grad_x, grad_pos, pos_mode, names=("grad_x", "grad_pos"))
    _check_same_device(grad_x=grad_x, grad_pos=grad_pos, size=size, size_out=size_out, unm_idx=unm_idx,
                       src_idx=src_idx, dst_idx=dst_idx)
    num_tokens = num_out + _num_merges(src_idx)
    _check_indices(unm_idx, src_idx, dst_idx, batch, num_tokens, protected)
    return _size_2d(size, batch, num_tokens), _size_2d(size_out, batch, num_out, "size_out")


def _num_merges(src_idx: Tensor) -> int:
    if src_idx.dim() != 2:
        raise ValueError(f"tome: src_idx must be [batch, r], got shape {tuple(src_idx.shape)}")
    return src_idx.shape[1]


@custom_op("tome::_merge_backward", mutates_args=())
def _merge_backward(grad_x: Tensor, grad_pos: Optional[Tensor], size: Optional[Tensor], size_out: Tensor,
                    unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, protected: int,
                    pos_mode: str) -> tuple[Tensor, Tensor]:
    size, size_out = _check_merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected,
                                           pos_mode)
    backend = resolve(grad_x.device)
    _check_index_values(backend, grad_x.shape[1] + src_idx.shape[1], protected, unm_idx, src_idx, dst_idx)
    if src_idx.shape[1] == 0:
        return _fresh(grad_x), (grad_x.new_empty(0) if grad_pos is None else _fresh(grad_pos))
    grad_x_in, grad_pos_in = backend.merge_backward(
        grad_x.contiguous(), None if grad_pos is None else grad_pos.contiguous(), size, size_out,
        unm_idx, src_idx, dst_idx, protected, pos_mode == "mean")
    return grad_x_in, (grad_x.new_empty(0) if grad_pos_in is None else grad_pos_in)


@_merge_backward.register_fake
def _(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected, pos_mode):
    _check_merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected, pos_mode)
    batch, num_out, channels = grad_x.shape
    num_tokens = num_out + src_idx.shape[1]
    grad_pos_in = grad_x.new_empty(0) if grad_pos is None else grad_pos.new_empty(batch, num_tokens,
                                                                                   grad_pos.shape[-1])
    return grad_x.new_empty(batch, num_tokens, channels), grad_pos_in



# ----------------------------------------------------------------------------------------------------
# bipartite_merge: match + merge as one op (one dispatch; the C++ backends run both without returning to
# Python). Its autograd is the merge's: matching is piecewise constant, so the metric gets no gradient.
# ----------------------------------------------------------------------------------------------------
def _check_bipartite_merge(x, pos, size, r, metric, protected, pos_mode):
    batch, num_tokens = _check_x_pos(x, pos, pos_mode)
    if metric is not None:
        _check_float("metric", metric, 3)
        if metric.shape[:2] != x.shape[:2]:
            raise ValueError(f"tome: metric must be [batch, N, Cm] with the batch and N of x {tuple(x.shape)}, "
                             f"got shape {tuple(metric.shape)}")
    _check_match(x if metric is None else metric, r, protected)
    _check_same_device(x=x, pos=pos, size=size, metric=metric)
    return _size_2d(size, batch, num_tokens)


@custom_op("tome::bipartite_merge", mutates_args=())
def bipartite_merge(x: Tensor, pos: Optional[Tensor], size: Optional[Tensor], r: int, metric: Optional[Tensor] = None,
                    protected: int = 0, pos_mode: str = "keep"
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One ToMe step: ``bipartite_match(metric if given else x, r, protected)``, then the size-weighted merge
    of x (pos: kept from the B destination, or averaged with ``pos_mode="mean"``).

    Returns ``(x_out, pos_out, size_out [B, N - r, 1], unm_idx, src_idx, dst_idx)``; pos_out is empty
    without pos. Equivalent PyTorch: ``reference.match`` then ``reference.merge``.
    """
    size = _check_bipartite_merge(x, pos, size, r, metric, protected, pos_mode)
    metric = x if metric is None else metric
    if reference.clamp_r(r, x.shape[1], protected) == 0:  # nothing merges: the input, as every op returns it
        _check_size_values(size, allow_zero=False)
        unm_idx, src_idx, dst_idx = bipartite_match(metric, r, protected)
        size_out = x.new_ones(x.shape[:2]).unsqueeze(-1) if size is None else _fresh(size.unsqueeze(-1))
        return _fresh(x), (x.new_empty(0) if pos is None else _fresh(pos)), size_out, unm_idx, src_idx, dst_idx
    backend = resolve(x.device)
    _check_size_values(size, allow_zero=False, backend=backend)
    fused = getattr(backend, "bipartite_merge", None)
    if fused is not None:
        x_out, pos_out, size_out, unm_idx, src_idx, dst_idx = fused(x, pos, size, metric, r, protected,
                                                                    pos_mode == "mean")
    else:
        unm_idx, src_idx, dst_idx = backend.match(metric, r, protected)
        x_out, pos_out, size_out = backend.merge(x, pos, size, unm_idx, src_idx, dst_idx, protected,
                                                 pos_mode == "mean")
    return x_out, pos_out, size_out.unsqueeze(-1), unm_idx, src_idx, dst_idx


@bipartite_merge.register_fake
def _(x, pos, size, r, metric=None, protected=0, pos_mode="keep"):
    size = _check_bipartite_merge(x, pos, size, r, metric, protected, pos_mode)
    unm_idx, src_idx, dst_idx = bipartite_match(x if metric is None else metric, r, protected)
    batch, num_tokens, channels = x.shape
    num_out = num_tokens - src_idx.shape[1]
    pos_out = x.new_empty(0) if pos is None else pos.new_empty(batch, num_out, pos.shape[-1])
    size_out = x.new_empty(batch, num_out, 1, dtype=x.dtype if size is None else size.dtype)
    return x.new_empty(batch, num_out, channels), pos_out, size_out, unm_idx, src_idx, dst_idx


def _bipartite_merge_setup_context(ctx, inputs, output):
    x, pos, size, _, _, protected, pos_mode = inputs
    _save_merge(ctx, x, pos, size, output[3:], output[:3], protected, pos_mode)


def _bipartite_merge_backward_autograd(ctx, grad_x_out, grad_pos_out, grad_size_out, *_grad_indices):
    return *_merge_gradients(ctx, grad_x_out, grad_pos_out, grad_size_out), None, None, None, None


bipartite_merge.register_autograd(_bipartite_merge_backward_autograd, setup_context=_bipartite_merge_setup_context)

# ----------------------------------------------------------------------------------------------------
# unmerge
# ----------------------------------------------------------------------------------------------------
def _check_unmerge(y, unm_idx, src_idx, dst_idx, protected):
    _check_float("y", y, 3)
    _check_same_device(y=y, unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx)
    _check_indices(unm_idx, src_idx, dst_idx, y.shape[0], y.shape[1] + _num_merges(src_idx), protected)


@custom_op("tome::unmerge", mutates_args=())
def unmerge(y: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, protected: int = 0) -> Tensor:
    """Back to the N original positions: every token gets the value of the output token it merged into.

    Equivalent PyTorch: ``y.gather(1, group[..., None].expand(-1, -1, C))`` with
    ``group = reference.groups(N, protected, unm_idx, src_idx, dst_idx)``.
    """
    _check_unmerge(y, unm_idx, src_idx, dst_idx, protected)
    backend = resolve(y.device)
    _check_index_values(backend, y.shape[1] + src_idx.shape[1], protected, unm_idx, src_idx, dst_idx)
    if src_idx.shape[1] == 0:
        return _fresh(y)
    return backend.unmerge(y, unm_idx, src_idx, dst_idx, protected)


@unmerge.register_fake
def _(y, unm_idx, src_idx, dst_idx, protected=0):
    _check_unmerge(y, unm_idx, src_idx, dst_idx, protected)
    return y.new_empty(y.shape[0], y.shape[1] + src_idx.shape[1], y.shape[2])


def _unmerge_setup_context(ctx, inputs, output):
    _, unm_idx, src_idx, dst_idx, protected = inputs
    ctx.protected = protected
    ctx.save_for_backward(unm_idx, src_idx, dst_idx)


def _unmerge_backward_autograd(ctx, grad):
    unm_idx, src_idx, dst_idx = ctx.saved_tensors
    return _unmerge_backward(grad, unm_idx, src_idx, dst_idx, ctx.protected), None, None, None, None


unmerge.register_autograd(_unmerge_backward_autograd, setup_context=_unmerge_setup_context)


def _check_unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected):
    _check_float("grad", grad, 3)
    _check_same_device(grad=grad, unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx)
    _check_indices(unm_idx, src_idx, dst_idx, grad.shape[0], grad.shape[1], protected)


@custom_op("tome::_unmerge_backward", mutates_args=())
def _unmerge_backward(grad: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, protected: int) -> Tensor:
    _check_unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected)
    backend = resolve(grad.device)
    _check_index_values(backend, grad.shape[1], protected, unm_idx, src_idx, dst_idx)
    if src_idx.shape[1] == 0:
        return _fresh(grad)
    return backend.unmerge_backward(grad.contiguous(), unm_idx, src_idx, dst_idx, protected)


@_unmerge_backward.register_fake
def _(grad, unm_idx, src_idx, dst_idx, protected):
    _check_unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected)
    return grad.new_empty(grad.shape[0], grad.shape[1] - src_idx.shape[1], grad.shape[2])


# ----------------------------------------------------------------------------------------------------
# Proportional attention
# ----------------------------------------------------------------------------------------------------
def _check_attention(q, k, v, size):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t, 4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"tome: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"tome: attention shapes must be q [B, H, Nq, D], k and v [B, H, Nk, D], got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[3] == 0:
        raise ValueError(f"tome: q, k, v need a head dim >= 1, got q {tuple(q.shape)}")
    _check_same_device(q=q, k=k, v=v, size=size)
    return _size_2d(size, k.shape[0], k.shape[2])


@custom_op("tome::_prop_attention", mutates_args=())
def _prop_attention(q: Tensor, k: Tensor, v: Tensor, size: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    size = _check_attention(q, k, v, size)
    backend = resolve(q.device)
    _check_size_values(size, allow_zero=True, backend=backend)
    return backend.attention(q, k, v, size, scale)


@_prop_attention.register_fake
def _(q, k, v, size, scale):
    _check_attention(q, k, v, size)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, size, scale = inputs
    if size is not None and size.requires_grad:
        raise ValueError("tome: prop_attention has no gradient w.r.t. size; pass size.detach()")
    out, lse = output
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, size, out, lse)


def _attention_backward_autograd(ctx, grad_out, _grad_lse):
    q, k, v, size, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v = _prop_attention_backward(grad_out, q, k, v, size, out, lse, ctx.scale)
    return grad_q, grad_k, grad_v, None, None


_prop_attention.register_autograd(_attention_backward_autograd, setup_context=_attention_setup_context)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_attention_backward(grad_out, q, k, v, size, out, lse):
    size = _check_attention(q, k, v, size)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(f"tome: {name} must be {q.dtype} {tuple(q.shape)} like q, got {t.dtype} {tuple(t.shape)}")
    if lse.shape != q.shape[:3] or lse.dtype != _lse_dtype(q.dtype):
        raise ValueError(f"tome: lse must be {_lse_dtype(q.dtype)} {tuple(q.shape[:3])} (from _prop_attention), "
                         f"got {lse.dtype} {tuple(lse.shape)}")
    _check_same_device(grad_out=grad_out, q=q, out=out, lse=lse)
    return size


@custom_op("tome::_prop_attention_backward", mutates_args=())
def _prop_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, size: Optional[Tensor],
                             out: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    size = _check_attention_backward(grad_out, q, k, v, size, out, lse)
    return resolve(q.device).attention_backward(grad_out.contiguous(), q, k, v, size, out, lse, scale)


@_prop_attention_backward.register_fake
def _(grad_out, q, k, v, size, out, lse, scale):
    _check_attention_backward(grad_out, q, k, v, size, out, lse)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ----------------------------------------------------------------------------------------------------
# Source tracing (one implementation: plain tensor ops on any device)
# ----------------------------------------------------------------------------------------------------
@custom_op("tome::merge_source", mutates_args=())
def merge_source(source: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, protected: int = 0) -> Tensor:
    """Merge a source matrix ``[B, N, N0]`` (which original tokens each token stands for) with the indices
    of a ``bipartite_match``; start from ``torch.eye(N0).expand(B, N0, N0)``."""
    _check_source(source, unm_idx, src_idx, dst_idx, protected)
    _check_index_values(reference, source.shape[1], protected, unm_idx, src_idx, dst_idx)
    return reference.merge_source(source, unm_idx, src_idx, dst_idx, protected)


def _check_source(source, unm_idx, src_idx, dst_idx, protected):
    if source.dim() != 3:
        raise ValueError(f"tome: source must be [batch, N, N0], got shape {tuple(source.shape)}")
    _check_same_device(source=source, unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx)
    _check_indices(unm_idx, src_idx, dst_idx, source.shape[0], source.shape[1], protected)


@merge_source.register_fake
def _(source, unm_idx, src_idx, dst_idx, protected=0):
    _check_source(source, unm_idx, src_idx, dst_idx, protected)
    return source.new_empty(source.shape[0], source.shape[1] - src_idx.shape[1], source.shape[2])


# ----------------------------------------------------------------------------------------------------
# Public compositions (CompositeImplicitAutograd: autograd and fakes come from the kernel ops)
# ----------------------------------------------------------------------------------------------------
_lib.define("merge(Tensor x, Tensor? size, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, int protected=0) "
            "-> (Tensor x_out, Tensor size_out)")
_lib.define("prop_attention(Tensor q, Tensor k, Tensor v, Tensor? size=None, float? scale=None) -> Tensor")


def _merge_composite(x, size, unm_idx, src_idx, dst_idx, protected=0):
    x_out, _, size_out = _merge(x, None, size, unm_idx, src_idx, dst_idx, protected, "keep")
    return x_out, size_out


def _prop_attention_composite(q, k, v, size=None, scale=None):
    if q.dim() != 4:
        raise ValueError(f"tome: q must be [B, H, Nq, D], got shape {tuple(q.shape)}")
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0  # head dim 0: _prop_attention rejects it
    return _prop_attention(q, k, v, size, scale)[0]


_lib.impl("merge", _merge_composite, "CompositeImplicitAutograd")
_lib.impl("prop_attention", _prop_attention_composite, "CompositeImplicitAutograd")
