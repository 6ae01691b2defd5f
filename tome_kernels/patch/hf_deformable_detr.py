"""ToMe for transformers' Deformable DETR encoder (``DeformableDetrForObjectDetection`` / ``DeformableDetrModel``,
transformers 5.x), dense form: every encoder output keeps its shape.

``tome_kernels.patch.deformable_detr(model, ratio=0.5, pos_mode="keep")`` patches one model in place;
``model.ratio`` (the fraction of the encoder's queries merged in each layer) can change between calls, and
``ratio = 0`` runs transformers' own code. Per encoder layer::

    groups = match(metric)                      # once per forward (match_once) or per layer
    q, q_pos, q_ref = merge(x), carry(pos), carry(reference points)
    x = self_attn_layer_norm(x + unmerge(deformable_attn(q, q_pos, q_ref, value=x)))   # value_proj sees all
    x = final_layer_norm(x + unmerge(ffn(merge(x))))

The value maps stay whole (multi-scale sampling reads the spatial grids) and the residual stream stays full,
so the groups stay valid in later layers: by default they are matched once, in the first layer, from the
layer's input, and reused. ``pos_mode="keep"`` gives a merged query the positional embedding and reference
points of its B destination, ``"mean"`` their size-weighted mean.

Matching: the op contract's bipartite split (A = even, B = odd positions of the flattened multi-scale
sequence) within windows, ``torch.ops.tome.window_match``: each A token's best B in its window, the pairs
ranked over the whole image, the best r merge. Windows (:mod:`tome_kernels.layout`): ``rows x cols`` tiles
of each feature level's grid (default 2 x 4, ``grid_windows``), or ``window`` consecutive tokens of one level
(``segment_windows``), or ``window=None`` (one global ``bipartite_match``).
Ratios above one half (a bipartite step merges at most half the tokens) take a second step on the merged
tokens. The merges are ``torch.ops.tome.merge`` / ``unmerge`` with these indices.

Padding (``pixel_mask``): the metric becomes ``(m/|m|, 2, 0)`` for real tokens and ``(0, 0, 1)`` for padding
(as :mod:`tome_kernels.patch.detr`): same-kind pairs score >= 0.6, cross-kind pairs 0, and r is clamped to
the number of same-kind candidate pairs in the worst batch row, so a real token never merges with padding.
The value mask is transformers' own (values at padded positions are zeroed).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

import tome_kernels  # noqa: F401  (registers torch.ops.tome)
from tome_kernels import layout

from . import _toolkit as tk
from .hf_detr import _pad_safe_r, _padding_metric

__all__ = ["deformable_detr", "apply_patch", "unpatch", "match", "Groups"]

METRICS = ("x+pos", "x", "random")
POS_MODES = ("keep", "mean")


# ----------------------------------------------------------------------------------------------------
# Groups: one or two bipartite steps, as (unm_idx, src_idx, dst_idx, size entering the step)
# ----------------------------------------------------------------------------------------------------
class Groups:
    """Merges of one forward: ``merge`` [B, N, C] -> [B, N', C], ``unmerge`` back, ``carry`` for the
    positional embeddings and reference points (kept from the representative or size-averaged)."""

    def __init__(self, steps, rep):
        self.steps = steps        # [(unm_idx, src_idx, dst_idx, size)]
        self.rep = rep            # [B, N'] input position whose pos a merged token keeps ("keep")
        self.queries = None       # (pos, reference points) of the merged queries, filled on first use

    @property
    def num_merged(self) -> int:
        return sum(step[1].shape[1] for step in self.steps)

    def merge(self, x):
        for unm_idx, src_idx, dst_idx, size in self.steps:
            x, _ = torch.ops.tome.merge(x, size, unm_idx, src_idx, dst_idx, 0)
        return x

    def unmerge(self, y):
        for unm_idx, src_idx, dst_idx, _ in reversed(self.steps):
            y = torch.ops.tome.unmerge(y, unm_idx, src_idx, dst_idx, 0)
        return y

    def carry(self, t, pos_mode: str):
        if pos_mode == "mean":
            return self.merge(t)
        return t.gather(1, self.rep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def _step(metric, real, table, r: int):
    """One bipartite step: ``(unm_idx, src_idx, dst_idx)`` merging the (at most) r best candidate pairs, the
    unmerged in ascending position (merged tokens stay in spatial order: a second step's windows are local)."""
    if real is not None:  # same-kind pairs score >= 0.6, cross-kind ones 0: the op ranks them first
        r = _pad_safe_r(real, r, table)
        metric = _padding_metric(metric, real)
    if table is not None:
        return torch.ops.tome.window_match(metric, table, r)
    unm_idx, src_idx, dst_idx = torch.ops.tome.bipartite_match(metric, r, 0)
    return unm_idx.sort(dim=1).values, src_idx, dst_idx


def match(metric, real, shapes, r: int, window) -> Groups:
    """Groups merging ``r`` of the tokens of ``metric`` [B, N, C] (``real`` [B, N] bool or None; ``shapes``:
    the feature levels' (height, width)), in one bipartite step or two when r exceeds half the tokens.
    ``window``: an even number of consecutive tokens, a (rows, even cols) tile of each level's grid (the first
    step; a later one, on merged tokens, takes rows x cols consecutive ones), or None (one global match)."""
    batch, num_tokens, _ = metric.shape
    segments, start = [], 0
    for height, width in shapes:
        segments.append((start, start + height * width))
        start += height * width
    steps = []
    size = None
    rep = torch.arange(num_tokens, device=metric.device).expand(batch, -1)
    while r > 0:
        n = metric.shape[1]
        if window is None:
            table = None
        elif isinstance(window, tuple):
            table = (layout.grid_windows(shapes, *window, metric.device) if not steps
                     else layout.segment_windows(segments, window[0] * window[1], metric.device))
        else:
            table = layout.segment_windows(segments, window, metric.device)
        unm_idx, src_idx, dst_idx = _step(metric, real, table, r)
        merged = src_idx.shape[1]
        if merged == 0:
            break
        steps.append((unm_idx, src_idx, dst_idx, size))
        metric, size = torch.ops.tome.merge(metric, size, unm_idx, src_idx, dst_idx, 0)
        # The output order is [unmerged A ; every B in order]: its representatives and its level ranges.
        kept = layout.representatives(n, 0, unm_idx)
        rep = rep.gather(1, kept)
        if real is not None:
            real = real.gather(1, kept)
        num_unm = unm_idx.shape[1]
        segments = [(0, num_unm)] + [(num_unm + lo // 2, num_unm + hi // 2) for lo, hi in segments]
        r -= merged
    return Groups(steps, rep)


def _metric(kind: str, hidden, pos, dim: int | None, seed: int = 0):
    if kind == "random":
        generator = torch.Generator(device=hidden.device).manual_seed(seed)
        return torch.randn(hidden.shape[:2] + (dim or 16,), generator=generator, device=hidden.device)
    metric = hidden + pos if kind == "x+pos" and pos is not None else hidden
    if dim is not None and dim < metric.shape[-1]:
        # Channel groups averaged: a cheaper metric for the per-window scores and the global match.
        metric = metric.unflatten(-1, (dim, -1)).mean(-1)
    return metric


# ----------------------------------------------------------------------------------------------------
# The patched model and encoder layers
# ----------------------------------------------------------------------------------------------------
FAMILY = "deformable_detr"
# Code fingerprints (tome_kernels.patch._toolkit.fingerprint) of the transformers method this patch renders.
KNOWN_FORWARDS = {"DeformableDetrEncoderLayer.forward": {"14206d342868ef55"}}


def _layer_groups(config, call, hidden, pos, mask, shapes) -> Groups:
    if call.groups is not None and config["match_once"]:
        return call.groups
    num_tokens = hidden.shape[1]
    r = int(round(config["ratio"] * num_tokens))
    builder = config.get("groups_fn")
    if builder is not None:  # benchmarks substitute other query selections
        return builder(hidden, pos, mask, shapes, r)
    padded = call.pixel_mask_given and mask is not None and not bool(mask.all())
    real = mask.bool() if padded else None
    metric = _metric(config["metric"], hidden, pos, config["metric_dim"])
    return match(metric, real, shapes, r, config["window"])


class _ToMeEncoderLayer:
    def forward(self, hidden_states, attention_mask, spatial_position_embeddings=None, reference_points=None,
                spatial_shapes=None, spatial_shapes_list=None, level_start_index=None, **kwargs):
        call = tk.current_call()
        if call is None or call.mixin is not _ToMeDeformableDetr or call.config["ratio"] == 0:
            return super().forward(hidden_states, attention_mask, spatial_position_embeddings, reference_points,
                                   spatial_shapes, spatial_shapes_list, level_start_index, **kwargs)
        config = call.config
        groups = _layer_groups(config, call, hidden_states, spatial_position_embeddings, attention_mask,
                               spatial_shapes_list)
        call.groups = groups
        call.queries.append(hidden_states.shape[1] - groups.num_merged)
        if groups.queries is None:  # positions and reference points are the same in every layer
            ref = reference_points.flatten(2)
            pos = spatial_position_embeddings
            groups.queries = (None if pos is None else groups.carry(pos, config["pos_mode"]),
                              groups.carry(ref, config["pos_mode"]).view(ref.shape[0], -1,
                                                                         *reference_points.shape[2:]))
        query_pos, query_ref = groups.queries

        residual = hidden_states
        update, _ = self.self_attn(hidden_states=groups.merge(hidden_states), attention_mask=attention_mask,
                                   encoder_hidden_states=hidden_states, encoder_attention_mask=attention_mask,
                                   position_embeddings=query_pos, reference_points=query_ref,
                                   spatial_shapes=spatial_shapes, spatial_shapes_list=spatial_shapes_list,
                                   level_start_index=level_start_index)
        update = nn.functional.dropout(update, p=self.dropout, training=self.training)
        hidden_states = self.self_attn_layer_norm(residual + groups.unmerge(update))

        residual = hidden_states
        update = groups.unmerge(self.mlp(groups.merge(hidden_states)))
        hidden_states = self.final_layer_norm(residual + update)
        if self.training and not torch.isfinite(hidden_states).all():
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ratio(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"tome: ratio must be a number in [0, 1), got {type(value).__name__} {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"tome: ratio must be in [0, 1), got {value!r}")
    return float(value)


class _ToMeDeformableDetr:
    """Top-level model (DeformableDetrForObjectDetection or DeformableDetrModel): ``ratio``, one Call per
    forward (the groups and the query counts of that forward)."""

    _tome_keep_name = True  # save_pretrained writes the class name as the architecture

    @property
    def ratio(self) -> float:
        return self._tome_info["ratio"]

    @ratio.setter
    def ratio(self, value) -> None:
        self._tome_info["ratio"] = _ratio(value)

    def forward(self, *args, **kwargs):
        return tk.run_call(self, functools.partial(self._tome_start, args, kwargs), super().forward, args, kwargs,
                           self._tome_finish)

    def _tome_start(self, args, kwargs) -> tk.Call:
        return tk.Call(dict(self._tome_info), groups=None, queries=[],
                       pixel_mask_given=tk.pixel_mask_given(args, kwargs))

    def _tome_finish(self, call: tk.Call) -> None:
        self._tome_info.update(queries=list(call.queries), groups=call.groups)


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------
def _inner_model(md, model) -> nn.Module:
    if isinstance(model, md.DeformableDetrForObjectDetection):
        inner = model.model
    elif isinstance(model, md.DeformableDetrModel):
        inner = model
    else:
        raise TypeError("tome_kernels.patch.deformable_detr supports transformers DeformableDetrForObjectDetection "
                        f"and DeformableDetrModel, got {tk.class_path(tk.original_class(model))}")
    for index, layer in enumerate(inner.encoder.layers):
        tk.check_forward(layer, md.DeformableDetrEncoderLayer, "forward", FAMILY, KNOWN_FORWARDS,
                         where=f"encoder layer {index}")
    return inner


def deformable_detr(model: nn.Module, ratio: float = 0.5, pos_mode: str = "keep", metric: str = "x+pos",
                    window=(2, 4), metric_dim: int | None = None, match_once: bool = True) -> nn.Module:
    """Make ``model`` (transformers ``DeformableDetrForObjectDetection`` / ``DeformableDetrModel``) merge its
    encoder queries in place; returns ``model``.

    ``ratio``: fraction of the encoder's queries merged in every layer, in [0, 1) (0: transformers' code);
    ``pos_mode``: ``"keep"`` (a merged query takes its destination's positional embedding and reference
    points) or ``"mean"`` (size-weighted); ``metric``: what matches, ``"x+pos"`` (the layer input plus its
    positional embedding: what the sampling offsets and weights are projected from), ``"x"``, or
    ``"random"`` (a control); ``window``: where partners are found, a ``(rows, cols)`` tile of each level's
    grid (cols even), an even number of consecutive tokens of one level, or None (one global match);
    ``metric_dim``: average the metric's channels down to this many; ``match_once``: match in the first
    layer and reuse the groups (else match in every layer).
    Patching a patched model updates its settings. After each forward ``model._tome_info`` holds ``queries``
    (the merged query count of every encoder layer) and ``groups`` (the last layer's :class:`Groups`).
    """
    md = tk.transformers_modeling("deformable_detr", "deformable_detr")
    inner = _inner_model(md, model)
    if pos_mode not in POS_MODES:
        raise ValueError(f"tome_kernels.patch.deformable_detr: pos_mode must be one of {POS_MODES}, got {pos_mode!r}")
    if metric not in METRICS:
        raise ValueError(f"tome_kernels.patch.deformable_detr: metric must be one of {METRICS}, got {metric!r}")
    if isinstance(window, list):
        window = tuple(window)
    if not (window is None or _is_count(window) and window >= 2 and window % 2 == 0
            or isinstance(window, tuple) and len(window) == 2 and all(_is_count(n) and n >= 1 for n in window)
            and window[1] % 2 == 0):
        raise ValueError(f"tome_kernels.patch.deformable_detr: window must be an even int >= 2, a (rows, even "
                         f"cols) tile or None, got {window!r}")
    if metric_dim is not None and (isinstance(metric_dim, bool) or not isinstance(metric_dim, int)
                                   or metric_dim < 1 or model.config.d_model % metric_dim):
        raise ValueError(f"tome_kernels.patch.deformable_detr: metric_dim must divide d_model "
                         f"({model.config.d_model}) or be None, got {metric_dim!r}")
    info = getattr(model, "_tome_info", None) or {}
    info.update(ratio=_ratio(ratio), pos_mode=pos_mode, metric=metric, window=window, metric_dim=metric_dim,
                match_once=bool(match_once))
    for top in {id(model): model, id(inner): inner}.values():
        tk.swap_class(top, _ToMeDeformableDetr)
        top._tome_info = info
    for layer in inner.encoder.layers:
        tk.swap_class(layer, _ToMeEncoderLayer)
    return model


@tk.register_family(FAMILY, ("transformers.models.deformable_detr.modeling_deformable_detr."
                             "DeformableDetrForObjectDetection",
                             "transformers.models.deformable_detr.modeling_deformable_detr.DeformableDetrModel"),
                    "transformers DeformableDetrForObjectDetection, DeformableDetrModel (ratio instead of r)")
def apply_patch(model: nn.Module, r=0, **options) -> nn.Module:
    """:func:`deformable_detr` for ``tome_kernels.patch.apply_patch``: the encoder merges a fraction of its
    queries (``ratio``, default 0.5), not a count, so ``r`` must stay 0."""
    if r:
        raise TypeError(f"tome_kernels.patch.deformable_detr merges a fraction of the encoder queries: pass "
                        f"ratio=..., not r={r!r}")
    return deformable_detr(model, **options)


unpatch = tk.unpatch
