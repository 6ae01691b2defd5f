"""ToMe for timm Vision Transformers (timm 1.0.x), patched per instance.

``apply_patch(model)`` swaps the class of ``model``, of each of its ``Block`` s and of each block's
``Attention`` for a ToMe subclass (created once per original class); ``unpatch(model)`` swaps them back.
Nothing in timm is modified, so unpatched models in the same process are unaffected.

Each patched block (pre-norm, as timm's ``Block``)::

    y, metric = attn(norm1(x), size)          # metric = keys (after k_norm) averaged over heads
    x = x + drop_path1(ls1(y))
    x, size = bipartite_merge(x, size, r_layer, metric, protected=num_prefix_tokens)
    x = x + drop_path2(ls2(mlp(norm2(x))))

Attention is proportional, ``softmax(q kᵀ · scale + log size) v`` (``torch.ops.tome.prop_attention``, or
SDPA with a log-size bias: ``attn_impl``), once tokens have merged and ``prop_attn`` is set; before the
first merge (all sizes 1), or without ``prop_attn``, it is timm's own path (``F.scaled_dot_product_attention``
when ``fused_attn``), so r = 0 reproduces the unpatched model. Prefix tokens (class, distillation, registers: ``num_prefix_tokens``)
never merge. Pooling: ``avg`` / ``avgmax`` weight each token by its size (prefix tokens excluded unless
``pool_include_prefix``, as timm); ``map`` attention pooling adds ``log size`` to its logits when
``prop_attn``; ``token`` / ``max`` / distilled heads read tokens that merging leaves in place.

The state of one forward lives in ``model._tome_info``, a dict shared by reference with every block, with
the keys of the original ToMe patch so code written for it keeps working:

* ``r``: per-layer merge counts for this forward (from ``model.r``; see :func:`parse_r`);
* ``size``: ``[B, N, 1]`` original tokens per token, None until the first merge;
* ``source``: ``[B, N, N0]`` 0/1 map from tokens to original tokens (``trace_source`` only; the identity
  when nothing merged);
* ``trace_source``, ``prop_attn``, ``class_token``, ``distill_token``, ``num_prefix_tokens``;
* ``attn_impl``: ``"op"`` or ``"sdpa"``, how proportional attention runs (see :func:`apply_patch`).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

import tome_kernels  # noqa: F401  (registers torch.ops.tome)

from ._common import merge_count, resolve_attn_impl

__all__ = ["apply_patch", "unpatch", "parse_r"]


# ----------------------------------------------------------------------------------------------------
# Merge schedules
# ----------------------------------------------------------------------------------------------------
def parse_r(r, num_layers: int) -> list[int]:
    """Per-layer merge counts (before clamping to half the mergeable tokens) for ``num_layers`` blocks.

    * ``int``: r merges in every layer;
    * ``(r, inflection)`` with inflection in [-1, 1]: a linear schedule with the same total as constant r,
      from ``int(r * (1 - inflection))`` in the first layer to ``2 r`` minus that in the last
      (-1 decreasing from 2r to 0, 0 constant, 1 increasing from 0 to 2r), each layer rounded down;
    * ``list``: r per layer, missing trailing layers merge nothing.
    """
    if isinstance(r, list):
        if len(r) > num_layers:
            raise ValueError(f"tome: a per-layer r list has {len(r)} entries but the model has {num_layers} blocks")
        counts = [merge_count(value, f"r[{i}]") for i, value in enumerate(r)]
        return counts + [0] * (num_layers - len(counts))
    inflection = 0.0
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"tome: an r schedule is a tuple (r, inflection), got {r!r}")
        r, inflection = r
        if isinstance(inflection, bool) or not isinstance(inflection, numbers.Real) or not -1 <= inflection <= 1:
            raise ValueError(f"tome: the inflection of an (r, inflection) schedule must be a number in [-1, 1] "
                             f"(-1 decreasing, 0 constant, 1 increasing), got {inflection!r}")
    elif not isinstance(r, numbers.Integral) or isinstance(r, bool):
        raise TypeError(f"tome: r must be an int, an (r, inflection) tuple or a per-layer list of ints, "
                        f"got {type(r).__name__} {r!r}")
    r = merge_count(r, "r")
    first = int(r * (1.0 - inflection))
    step = (2 * r - 2 * first) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(first + step * layer) for layer in range(num_layers)]


# ----------------------------------------------------------------------------------------------------
# Patched classes (mixins put in front of the original class)
# ----------------------------------------------------------------------------------------------------
class _ToMeAttention:
    """timm ``Attention`` that takes token sizes and also returns the merge metric (keys averaged over heads)."""

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None):
        batch, num_tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_drop.p if self.training else 0.0

        if size is not None and dropout == 0.0 and self._tome_info["attn_impl"] == "op":
            x = torch.ops.tome.prop_attention(q, k, v, size, self.scale)
        elif size is not None:
            # The same function through PyTorch's fused SDPA with a log-size bias (also the dropout path).
            bias = size.to(q.dtype).log().reshape(batch, 1, 1, num_tokens)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=self.scale)
        elif self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attn_drop(attn) @ v

        x = x.transpose(1, 2).reshape(batch, num_tokens, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        return x, k.mean(1)


class _ToMeBlock:
    """timm ``Block`` with a ToMe step between attention and MLP."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("tome: a ToMe-patched Block takes no attn_mask / is_causal "
                                      "(the token count changes in every layer)")
        info = self._tome_info
        size = info["size"]
        y, metric = self.attn(self.norm1(x), size if info["prop_attn"] else None)
        x = x + self.drop_path1(self.ls1(y))

        r = info["r"][self._tome_layer]
        if r > 0:
            protected = info["num_prefix_tokens"]
            x, _, size, unm_idx, src_idx, dst_idx = torch.ops.tome.bipartite_merge(
                x, None, size, r, metric=metric, protected=protected)
            info["size"] = size
            if info["trace_source"]:
                info["source"] = torch.ops.tome.merge_source(
                    _source_or_identity(info["source"], metric), unm_idx, src_idx, dst_idx, protected)

        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _source_or_identity(source: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """``source``, or the identity map ``[B, N, N]`` for the ``[B, N, ...]`` tokens when nothing merged yet."""
    if source is not None:
        return source
    batch, num_tokens = tokens.shape[:2]
    eye = torch.eye(num_tokens, dtype=tokens.dtype, device=tokens.device)
    return eye.expand(batch, num_tokens, num_tokens)


class _ToMeVisionTransformer:
    """timm ``VisionTransformer`` (or subclass) with ``model.r`` and size-aware pooling."""

    @property
    def r(self):
        """Merges per layer: an int, an ``(r, inflection)`` schedule or a per-layer list (see :func:`parse_r`)."""
        return self._tome_r

    @r.setter
    def r(self, value) -> None:
        parse_r(value, len(self.blocks))  # reject bad values here, not in the next forward
        self._tome_r = list(value) if isinstance(value, list) else value

    def _tome_start(self) -> None:
        info = self._tome_info
        info["r"] = parse_r(self._tome_r, len(self.blocks))
        info["size"] = None
        info["source"] = None
        if self.grad_checkpointing and torch.is_grad_enabled() and any(info["r"]):
            raise NotImplementedError("tome: gradient checkpointing would recompute the blocks with the last "
                                      "layer's token sizes; call model.set_grad_checkpointing(False)")

    def forward_features(self, *args, **kwargs):
        self._tome_start()
        x = super().forward_features(*args, **kwargs)
        info = self._tome_info
        if info["trace_source"] and info["source"] is None:
            info["source"] = _source_or_identity(None, x)
        return x

    def forward_intermediates(self, *args, **kwargs):
        self._tome_start()
        if any(self._tome_info["r"]):
            raise NotImplementedError("tome: forward_intermediates reshapes tokens to the patch grid, which "
                                      "merging breaks; set model.r = 0 to use it")
        return super().forward_intermediates(*args, **kwargs)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        info = self._tome_info
        size = info["size"]
        if size is None:  # nothing merged: every size is 1
            return super().pool(x, pool_type)
        if size.shape[:2] != x.shape[:2]:
            raise ValueError(f"tome: pool() got {tuple(x.shape[:2])} tokens but the last forward_features left "
                             f"sizes for {tuple(size.shape[:2])}; pool the output of forward_features")
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        tokens, size = x[:, start:], size[:, start:].to(x.dtype)
        if self.attn_pool is not None:
            from timm.layers import AttentionPoolLatent

            if not isinstance(self.attn_pool, AttentionPoolLatent):
                raise NotImplementedError(f"tome: {type(self.attn_pool).__name__} pooling has no size weighting; "
                                          f"use global_pool 'token', 'avg', 'avgmax', 'max' or 'map', or r = 0")
            bias = size.log().reshape(size.shape[0], 1, 1, -1) if info["prop_attn"] else None
            return self.attn_pool(tokens, attn_mask=bias)
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type in ("avg", "avgmax"):
            mean = (tokens * size).sum(dim=1) / size.sum(dim=1)
            return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)
        return super().pool(x, pool_type)  # 'token', 'max', '': sizes do not enter


_PATCHED_CLASSES: dict[tuple[type, type], type] = {}


def _patched_class(cls: type, mixin: type) -> type:
    if getattr(cls, "_tome_original_class", None) is not None:
        return cls  # already patched
    key = (cls, mixin)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(f"ToMe{cls.__name__}", (mixin, cls),
                                     {"_tome_original_class": cls, "__module__": __name__})
    return _PATCHED_CLASSES[key]


def _class_name(obj) -> str:
    cls = getattr(obj, "_tome_original_class", None) or type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_supported(model: nn.Module) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"tome_kernels.patch.timm supports timm VisionTransformer models and subclasses "
                        f"(vit_*, deit_*, deit3_*, *_reg*), got {_class_name(model)}")
    for index, block in enumerate(model.blocks):
        block_cls = getattr(block, "_tome_original_class", type(block))
        attn = getattr(block, "attn", None)
        attn_cls = getattr(attn, "_tome_original_class", type(attn))
        # A subclass that keeps the forward is fine; another forward would be silently replaced.
        if not isinstance(block, Block) or block_cls.forward is not Block.forward:
            raise TypeError(f"tome_kernels.patch.timm: block {index} is {_class_name(block)}; only "
                            f"timm.models.vision_transformer.Block is supported")
        if not isinstance(attn, Attention) or attn_cls.forward is not Attention.forward:
            raise TypeError(f"tome_kernels.patch.timm: block {index} has attention {_class_name(attn)}; only "
                            f"timm.layers.Attention is supported")


def apply_patch(model: nn.Module, trace_source: bool = False, prop_attn: bool = True, *,
                attn_impl: str = "auto") -> nn.Module:
    """Make ``model`` (a timm ``VisionTransformer``) a ToMe model in place and return it; ``model.r`` = 0.

    ``trace_source``: keep ``model._tome_info["source"]`` ([B, N, N0], which input tokens each output token
    holds; for visualisation). ``prop_attn``: proportional attention (the paper's default for off-the-shelf
    models; turn off for models trained with ToMe without it). ``attn_impl``: how proportional attention
    runs: ``"op"`` (``torch.ops.tome.prop_attention``), ``"sdpa"`` (``F.scaled_dot_product_attention`` with
    a ``log size`` float mask: same function) or ``"auto"`` (``"sdpa"`` on CPU, where it is the faster one;
    on a GPU ``"op"`` when a compiled tome backend serves it; ``"op"`` whenever a backend was chosen by hand;
    decided now, for the device the model is on). Patching a patched model updates the flags.
    """
    _check_supported(model)
    info = {
        "r": [], "size": None, "source": None,
        "trace_source": bool(trace_source), "prop_attn": bool(prop_attn),
        "attn_impl": resolve_attn_impl(attn_impl, model),
        "class_token": getattr(model, "cls_token", None) is not None,
        "distill_token": getattr(model, "dist_token", None) is not None,
        "num_prefix_tokens": int(model.num_prefix_tokens),
    }
    previous_r = model.r if getattr(model, "_tome_info", None) is not None else 0
    model.__dict__.pop("r", None)
    model.__class__ = _patched_class(type(model), _ToMeVisionTransformer)
    model._tome_info = info
    model.r = previous_r
    for layer, block in enumerate(model.blocks):
        block.__class__ = _patched_class(type(block), _ToMeBlock)
        block.attn.__class__ = _patched_class(type(block.attn), _ToMeAttention)
        block._tome_info = block.attn._tome_info = info
        block._tome_layer = layer
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_patch` in place (classes and ToMe attributes) and return ``model``."""
    for module in model.modules():
        original = getattr(type(module), "_tome_original_class", None)
        if original is not None:
            module.__class__ = original
        for name in ("_tome_info", "_tome_layer", "_tome_r"):
            module.__dict__.pop(name, None)
    return model
