"""The merge family: ``unmerge``, ``_merge`` (x size-weighted, pos kept or averaged, sizes summed),
``bipartite_merge`` (match + merge in one op), the public composition ``merge`` and ``merge_source``.

The kernel ops route to the backend of the device. A call that reaches no backend (the clamped r is 0: the
input, unchanged; an empty batch: empty outputs) is answered here. The merge's autograd is made of tome ops
(``_merge_backward``, and ``unmerge`` for the size gradient), so every backend has it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import Library, custom_op

from .. import layout, reference
from .._backend import resolve
from .._validation import (check_float, check_index_values, check_indices, check_pos_mode, check_same_device,
                           check_size_values, check_tokens, size_2d)
from .match import bipartite_match, check_match, reaches_backend


def _fresh(t: Tensor) -> Tensor:
    """A contiguous copy (the r = 0 identity): outputs are contiguous, as the fakes say, whatever the input's
    strides (clone() would keep a transposed input's)."""
    return t.clone(memory_format=torch.contiguous_format)


def _num_merges(src_idx: Tensor) -> int:
    return src_idx.shape[1]


# ----------------------------------------------------------------------------------------------------
# unmerge, and its backward (a gather-sum per output token)
# ----------------------------------------------------------------------------------------------------
def _check_unmerge(y, unm_idx, src_idx, dst_idx, protected):
    check_float("y", y, 3)
    check_same_device(y=y, unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx)
    check_indices(unm_idx, src_idx, dst_idx, y.shape[0], y.shape[1] + _num_merges(src_idx), protected)


@custom_op("tome::unmerge", mutates_args=())
def unmerge(y: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, protected: int = 0) -> Tensor:
    """Back to the N original positions: every token gets the value of the output token it merged into.

    Equivalent PyTorch: ``y.gather(1, group[..., None].expand(-1, -1, C))`` with
    ``group = layout.groups(N, protected, unm_idx, src_idx, dst_idx)``.
    """
    _check_unmerge(y, unm_idx, src_idx, dst_idx, protected)
    backend = resolve(y.device) if reaches_backend(y.shape[0], _num_merges(src_idx)) else None
    check_index_values(backend, y.shape[1] + _num_merges(src_idx), protected, unm_idx, src_idx, dst_idx)
    if backend is None:
        return _fresh(y) if y.shape[0] else _unmerge_fake(y, unm_idx, src_idx, dst_idx, protected)
    return backend.unmerge(y, unm_idx, src_idx, dst_idx, protected)


@unmerge.register_fake
def _unmerge_fake(y, unm_idx, src_idx, dst_idx, protected=0):
    _check_unmerge(y, unm_idx, src_idx, dst_idx, protected)
    return y.new_empty(y.shape[0], y.shape[1] + _num_merges(src_idx), y.shape[2])


def _check_unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected):
    check_float("grad", grad, 3)
    check_same_device(grad=grad, unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx)
    check_indices(unm_idx, src_idx, dst_idx, grad.shape[0], grad.shape[1], protected)


@custom_op("tome::_unmerge_backward", mutates_args=())
def _unmerge_backward(grad: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, protected: int) -> Tensor:
    _check_unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected)
    backend = resolve(grad.device) if reaches_backend(grad.shape[0], _num_merges(src_idx)) else None
    check_index_values(backend, grad.shape[1], protected, unm_idx, src_idx, dst_idx)
    if backend is None:
        return _fresh(grad) if grad.shape[0] else _unmerge_backward_fake(grad, unm_idx, src_idx, dst_idx, protected)
    return backend.unmerge_backward(grad.contiguous(), unm_idx, src_idx, dst_idx, protected)


@_unmerge_backward.register_fake
def _unmerge_backward_fake(grad, unm_idx, src_idx, dst_idx, protected):
    _check_unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected)
    return grad.new_empty(grad.shape[0], grad.shape[1] - _num_merges(src_idx), grad.shape[2])


def _unmerge_setup_context(ctx, inputs, output):
    _, unm_idx, src_idx, dst_idx, protected = inputs
    ctx.protected = protected
    ctx.save_for_backward(unm_idx, src_idx, dst_idx)


def _unmerge_backward_autograd(ctx, grad):
    unm_idx, src_idx, dst_idx = ctx.saved_tensors
    return _unmerge_backward(grad, unm_idx, src_idx, dst_idx, ctx.protected), None, None, None, None


unmerge.register_autograd(_unmerge_backward_autograd, setup_context=_unmerge_setup_context)


# ----------------------------------------------------------------------------------------------------
# _merge_backward: gradients of x and pos (sizes held constant)
# ----------------------------------------------------------------------------------------------------
def _check_x_pos(x, pos, pos_mode, names=("x", "pos")):
    """Checks of the tokens to merge and their positions (or of their gradients, by ``names``); returns
    (batch, N)."""
    check_float(names[0], x, 3)
    batch, num_tokens, _ = x.shape
    if pos is not None:
        check_float(names[1], pos, 3)
        check_tokens(names[1], pos, batch, num_tokens)
    check_pos_mode(pos_mode)
    return batch, num_tokens


def _check_merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected, pos_mode):
    batch, num_out = _check_x_pos(grad_x, grad_pos, pos_mode, names=("grad_x", "grad_pos"))
    check_same_device(grad_x=grad_x, grad_pos=grad_pos, size=size, size_out=size_out, unm_idx=unm_idx)
    num_tokens = num_out + _num_merges(src_idx)
    check_indices(unm_idx, src_idx, dst_idx, batch, num_tokens, protected)
    return size_2d(size, batch, num_tokens), size_2d(size_out, batch, num_out, "size_out")


@custom_op("tome::_merge_backward", mutates_args=())
def _merge_backward(grad_x: Tensor, grad_pos: Optional[Tensor], size: Optional[Tensor], size_out: Tensor,
                    unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, protected: int,
                    pos_mode: str) -> tuple[Tensor, Tensor]:
    size, size_out = _check_merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected,
                                           pos_mode)
    backend = resolve(grad_x.device) if reaches_backend(grad_x.shape[0], _num_merges(src_idx)) else None
    check_index_values(backend, grad_x.shape[1] + _num_merges(src_idx), protected, unm_idx, src_idx, dst_idx)
    if backend is None:
        if not grad_x.shape[0]:
            return _merge_backward_fake(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected,
                                        pos_mode)
        return _fresh(grad_x), (grad_x.new_empty(0) if grad_pos is None else _fresh(grad_pos))
    grad_x_in, grad_pos_in = backend.merge_backward(
        grad_x.contiguous(), None if grad_pos is None else grad_pos.contiguous(), size, size_out,
        unm_idx, src_idx, dst_idx, protected, pos_mode == "mean")
    return grad_x_in, (grad_x.new_empty(0) if grad_pos_in is None else grad_pos_in)


@_merge_backward.register_fake
def _merge_backward_fake(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected, pos_mode):
    _check_merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected, pos_mode)
    batch, num_out, channels = grad_x.shape
    num_tokens = num_out + _num_merges(src_idx)
    grad_pos_in = grad_x.new_empty(0) if grad_pos is None else grad_pos.new_empty(batch, num_tokens,
                                                                                   grad_pos.shape[-1])
    return grad_x.new_empty(batch, num_tokens, channels), grad_pos_in


# ----------------------------------------------------------------------------------------------------
# The merge's autograd, shared by _merge and bipartite_merge
# ----------------------------------------------------------------------------------------------------
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


def _merged_fake(x, pos, size, num_out):
    """Empty (x_out, pos_out, size_out [B, num_out, 1]) of a merge into ``num_out`` tokens."""
    batch, _, channels = x.shape
    pos_out = x.new_empty(0) if pos is None else pos.new_empty(batch, num_out, pos.shape[-1])
    size_dtype = x.dtype if size is None else size.dtype
    return x.new_empty(batch, num_out, channels), pos_out, x.new_empty(batch, num_out, 1, dtype=size_dtype)


def _identity_merge(x, pos, size, num_out):
    """What a merge that reaches no backend returns: the input (r = 0), or the empty outputs (empty batch)."""
    if not x.shape[0]:
        return _merged_fake(x, pos, size, num_out)
    size_out = x.new_ones(x.shape[:2]).unsqueeze(-1) if size is None else _fresh(size.unsqueeze(-1))
    return _fresh(x), (x.new_empty(0) if pos is None else _fresh(pos)), size_out


# ----------------------------------------------------------------------------------------------------
# _merge: x (size-weighted), pos (keep | mean), size (sum) by given indices, in one kernel call
# ----------------------------------------------------------------------------------------------------
def _check_merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mode):
    batch, num_tokens = _check_x_pos(x, pos, pos_mode)
    check_same_device(x=x, pos=pos, size=size, unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx)
    check_indices(unm_idx, src_idx, dst_idx, batch, num_tokens, protected)
    return size_2d(size, batch, num_tokens)


@custom_op("tome::_merge", mutates_args=())
def _merge(x: Tensor, pos: Optional[Tensor], size: Optional[Tensor], unm_idx: Tensor, src_idx: Tensor,
           dst_idx: Tensor, protected: int, pos_mode: str) -> tuple[Tensor, Tensor, Tensor]:
    size = _check_merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mode)
    backend = resolve(x.device) if reaches_backend(x.shape[0], _num_merges(src_idx)) else None
    check_size_values(size, x.dtype, allow_zero=False, backend=backend)
    check_index_values(backend, x.shape[1], protected, unm_idx, src_idx, dst_idx)
    if backend is None:
        return _identity_merge(x, pos, size, x.shape[1] - _num_merges(src_idx))
    x_out, pos_out, size_out = backend.merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mode == "mean")
    return x_out, pos_out, size_out.unsqueeze(-1)


@_merge.register_fake
def _(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mode):
    size = _check_merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mode)
    return _merged_fake(x, pos, size, x.shape[1] - _num_merges(src_idx))


def _merge_setup_context(ctx, inputs, output):
    x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mode = inputs
    _save_merge(ctx, x, pos, size, (unm_idx, src_idx, dst_idx), output, protected, pos_mode)


def _merge_backward_autograd(ctx, grad_x_out, grad_pos_out, grad_size_out):
    return *_merge_gradients(ctx, grad_x_out, grad_pos_out, grad_size_out), None, None, None, None, None


_merge.register_autograd(_merge_backward_autograd, setup_context=_merge_setup_context)


# ----------------------------------------------------------------------------------------------------
# bipartite_merge: match + merge as one op (one dispatch; the C++ backends run both without returning to
# Python). Its autograd is the merge's: matching is piecewise constant, so the metric gets no gradient.
# ----------------------------------------------------------------------------------------------------
def _check_bipartite_merge(x, pos, size, r, metric, protected, pos_mode):
    batch, num_tokens = _check_x_pos(x, pos, pos_mode)
    if metric is not None:
        check_float("metric", metric, 3)
        if metric.shape[:2] != x.shape[:2]:
            raise ValueError(f"tome: metric must be [batch, N, Cm] with the batch and N of x {tuple(x.shape)}, "
                             f"got shape {tuple(metric.shape)}")
    check_match(x if metric is None else metric, r, protected)
    check_same_device(x=x, pos=pos, size=size, metric=metric)
    return size_2d(size, batch, num_tokens)


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
    backend = resolve(x.device) if reaches_backend(x.shape[0], layout.clamp_r(r, x.shape[1], protected)) else None
    check_size_values(size, x.dtype, allow_zero=False, backend=backend)
    if backend is None:
        indices = bipartite_match(metric, r, protected)
        return *_identity_merge(x, pos, size, x.shape[1] - _num_merges(indices[1])), *indices
    x_out, pos_out, size_out, unm_idx, src_idx, dst_idx = backend.bipartite_merge(x, pos, size, metric, r, protected,
                                                                                  pos_mode == "mean")
    return x_out, pos_out, size_out.unsqueeze(-1), unm_idx, src_idx, dst_idx


@bipartite_merge.register_fake
def _(x, pos, size, r, metric=None, protected=0, pos_mode="keep"):
    size = _check_bipartite_merge(x, pos, size, r, metric, protected, pos_mode)
    indices = bipartite_match(x if metric is None else metric, r, protected)
    return *_merged_fake(x, pos, size, x.shape[1] - _num_merges(indices[1])), *indices


def _bipartite_merge_setup_context(ctx, inputs, output):
    x, pos, size, _, _, protected, pos_mode = inputs
    _save_merge(ctx, x, pos, size, output[3:], output[:3], protected, pos_mode)


def _bipartite_merge_backward_autograd(ctx, grad_x_out, grad_pos_out, grad_size_out, *_grad_indices):
    return *_merge_gradients(ctx, grad_x_out, grad_pos_out, grad_size_out), None, None, None, None


bipartite_merge.register_autograd(_bipartite_merge_backward_autograd, setup_context=_bipartite_merge_setup_context)


# ----------------------------------------------------------------------------------------------------
# merge: the public composition (CompositeImplicitAutograd: autograd and fakes come from _merge)
# ----------------------------------------------------------------------------------------------------
_lib = Library("tome", "FRAGMENT")
_lib.define("merge(Tensor x, Tensor? size, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, int protected=0) "
            "-> (Tensor x_out, Tensor size_out)")


def _merge_composite(x, size, unm_idx, src_idx, dst_idx, protected=0):
    x_out, _, size_out = _merge(x, None, size, unm_idx, src_idx, dst_idx, protected, "keep")
    return x_out, size_out


_lib.impl("merge", _merge_composite, "CompositeImplicitAutograd")


# ----------------------------------------------------------------------------------------------------
# merge_source: source tracing (one implementation, the reference's tensor ops, on any device)
# ----------------------------------------------------------------------------------------------------
def _check_source(source, unm_idx, src_idx, dst_idx, protected):
    if source.dim() != 3:
        raise ValueError(f"tome: source must be [batch, N, N0], got shape {tuple(source.shape)}")
    check_same_device(source=source, unm_idx=unm_idx, src_idx=src_idx, dst_idx=dst_idx)
    check_indices(unm_idx, src_idx, dst_idx, source.shape[0], source.shape[1], protected)


@custom_op("tome::merge_source", mutates_args=())
def merge_source(source: Tensor, unm_idx: Tensor, src_idx: Tensor, dst_idx: Tensor, protected: int = 0) -> Tensor:
    """Merge a source matrix ``[B, N, N0]`` (which original tokens each token stands for) with the indices
    of a ``bipartite_match``; start from ``torch.eye(N0).expand(B, N0, N0)``."""
    _check_source(source, unm_idx, src_idx, dst_idx, protected)
    check_index_values(None, source.shape[1], protected, unm_idx, src_idx, dst_idx)
    return reference.merge_source(source, unm_idx, src_idx, dst_idx, protected)


@merge_source.register_fake
def _(source, unm_idx, src_idx, dst_idx, protected=0):
    _check_source(source, unm_idx, src_idx, dst_idx, protected)
    return source.new_empty(source.shape[0], source.shape[1] - _num_merges(src_idx), source.shape[2])
