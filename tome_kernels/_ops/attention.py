"""Proportional attention: the public composition ``prop_attention`` over the kernel ops
``_prop_attention`` (returns the output and the row log-sum-exp) and ``_prop_attention_backward``.

Empty calls (no batch, head, query or key) reach no backend: a query row without keys gets output 0 and
lse -inf, and every gradient is 0 (the reference's rule for rows whose keys all have size 0).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import Library, custom_op

from .._backend import resolve
from .._validation import check_attention, check_same_device, check_size_values


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reaches_backend(q: Tensor, k: Tensor) -> bool:
    return q.numel() > 0 and k.shape[2] > 0


# ----------------------------------------------------------------------------------------------------
# _prop_attention_backward
# ----------------------------------------------------------------------------------------------------
def _check_attention_backward(grad_out, q, k, v, size, out, lse):
    size = check_attention(q, k, v, size)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(f"tome: {name} must be {q.dtype} {tuple(q.shape)} like q, got {t.dtype} {tuple(t.shape)}")
    if lse.shape != q.shape[:3] or lse.dtype != _lse_dtype(q.dtype):
        raise ValueError(f"tome: lse must be {_lse_dtype(q.dtype)} {tuple(q.shape[:3])} (from _prop_attention), "
                         f"got {lse.dtype} {tuple(lse.shape)}")
    check_same_device(grad_out=grad_out, q=q, out=out, lse=lse)
    return size


@custom_op("tome::_prop_attention_backward", mutates_args=())
def _prop_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, size: Optional[Tensor],
                             out: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    size = _check_attention_backward(grad_out, q, k, v, size, out, lse)
    if not _reaches_backend(q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return resolve(q.device).attention_backward(grad_out.contiguous(), q, k, v, size, out, lse, scale)


@_prop_attention_backward.register_fake
def _(grad_out, q, k, v, size, out, lse, scale):
    _check_attention_backward(grad_out, q, k, v, size, out, lse)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ----------------------------------------------------------------------------------------------------
# _prop_attention
# ----------------------------------------------------------------------------------------------------
@custom_op("tome::_prop_attention", mutates_args=())
def _prop_attention(q: Tensor, k: Tensor, v: Tensor, size: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    size = check_attention(q, k, v, size)
    backend = resolve(q.device) if _reaches_backend(q, k) else None
    check_size_values(size, q.dtype, allow_zero=True, backend=backend)
    if backend is None:
        return q.new_zeros(q.shape), q.new_full(q.shape[:3], -float("inf"), dtype=_lse_dtype(q.dtype))
    return backend.attention(q, k, v, size, scale)


@_prop_attention.register_fake
def _(q, k, v, size, scale):
    check_attention(q, k, v, size)
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


# ----------------------------------------------------------------------------------------------------
# prop_attention: the public composition (CompositeImplicitAutograd: autograd and fakes from _prop_attention)
# ----------------------------------------------------------------------------------------------------
_lib = Library("tome", "FRAGMENT")
_lib.define("prop_attention(Tensor q, Tensor k, Tensor v, Tensor? size=None, float? scale=None) -> Tensor")


def _prop_attention_composite(q, k, v, size=None, scale=None):
    if q.dim() != 4:
        raise ValueError(f"tome: q must be [B, H, Nq, D], got shape {tuple(q.shape)}")
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.shape[-1] > 0 else 1.0  # head dim 0: _prop_attention rejects it
    return _prop_attention(q, k, v, size, scale)[0]


_lib.impl("prop_attention", _prop_attention_composite, "CompositeImplicitAutograd")
