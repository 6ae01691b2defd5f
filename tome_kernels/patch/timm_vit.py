"""ToMe for timm Vision Transformers (timm 1.0.x), patched per instance.

``tome_kernels.patch.timm(model)`` swaps the class of ``model``, of each of its ``Block`` s and of each
block's ``Attention`` for a ToMe subclass (``_toolkit.swap_class``); ``tome_kernels.patch.unpatch(model)``
swaps them back. Nothing in timm is modified, so unpatched models in the same process are unaffected.
RoPE models (``Eva``) are patched by ``timm_eva`` through the same call.

Each patched block (pre-norm, as timm's ``Block``)::

    y, metric = attn(norm1(x), size)          # metric = keys (after k_norm) averaged over heads
    x = x + drop_path1(ls1(y))
    x, size = bipartite_merge(x, size, r_layer, metric, protected=num_prefix_tokens)
    x = x + drop_path2(ls2(mlp(norm2(x))))

Attention is proportional, ``softmax(q kᵀ · scale + log size) v`` (``torch.ops.tome.prop_attention``, or SDPA
with a log-size bias: ``attn_impl``), once tokens have merged and ``prop_attn`` is set; before the first merge
(all sizes 1), or without ``prop_attn``, it is timm's own path (``F.scaled_dot_product_attention`` when
``fused_attn``), so r = 0 reproduces the unpatched model. Prefix tokens (class, distillation, registers:
``num_prefix_tokens``) never merge. Pooling: ``avg`` / ``avgmax`` weight each token by its size (prefix tokens
excluded unless ``pool_include_prefix``, as timm); ``map`` attention pooling adds ``log size`` to its logits
when ``prop_attn``; ``token`` / ``max`` / distilled heads read tokens that merging leaves in place.

The state of one forward (per-layer r, sizes, source) is a per-call object (see ``_toolkit``), so threads can
share one patched model, and ``torch.compile`` / ``torch.export`` trace it. ``model._tome_info`` holds the
configuration and, after each forward (with threads: the one that finished last), the results under the keys
of the original ToMe patch, so code written for it keeps working:

* ``r``: per-layer merge counts of the forward (from ``model.r``; see :func:`tome_kernels.patch.parse_r`);
* ``size``: ``[B, N, 1]`` original tokens per token, None when nothing merged;
* ``source``: ``[B, N, N0]`` 0/1 map from tokens to original tokens (``trace_source`` only; the identity
  when nothing merged);
* ``trace_source``, ``prop_attn``, ``class_token``, ``distill_token``, ``num_prefix_tokens``;
* ``attn_impl``: ``"op"`` or ``"sdpa"``, how proportional attention runs (see :func:`timm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import tome_kernels  # noqa: F401  (registers torch.ops.tome)

from . import _toolkit as tk

__all__ = ["timm"]

FAMILY = "timm"
# The timm methods this file renders itself (timm 1.0.31; see tk.check_forward).
KNOWN_CODE = {
    "Block.forward": {"0cd0a1e21c7255f9"},
    "Attention.forward": {"744100937146f60d"},
    "VisionTransformer.pool": {"1528af173962d4ac"},
}


# ----------------------------------------------------------------------------------------------------
# Patched classes (mixins put in front of the original class)
# ----------------------------------------------------------------------------------------------------
def attend(attention: nn.Module, q, k, v, size: torch.Tensor | None, attn_impl: str) -> torch.Tensor:
    """The attention of a timm attention module on ``[B, H, N, D]`` heads: with token sizes, proportional
    attention (``tk.attention``); without, the module's own path (SDPA when ``fused_attn``, else its explicit
    softmax), so that r = 0 gives timm's bits."""
    dropout = attention.attn_drop.p if attention.training else 0.0
    if size is not None:
        return tk.attention(q, k, v, size, attention.scale, attn_impl, dropout)
    if attention.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    return attention.attn_drop(((q * attention.scale) @ k.transpose(-2, -1)).softmax(dim=-1)) @ v


class _ToMeAttention:
    """timm ``Attention`` that takes token sizes and also returns the merge metric (keys averaged over heads)."""

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None, attn_impl: str = "sdpa"):
        batch, num_tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = attend(self, q, k, v, size, attn_impl)
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
        call = tk.current_call()
        if call is None:  # run on its own, outside its model's forward: nothing merged, nothing to merge
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))[0]))
            return x + self._tome_mlp(x)
        config = call.config
        y, metric = self.attn(self.norm1(x), call.size if config["prop_attn"] else None, config["attn_impl"])
        x = x + self.drop_path1(self.ls1(y))

        r = call.r[self._tome_layer]
        if r > 0:
            x, _ = tk.merge_tokens(call, x, metric, r, config["num_prefix_tokens"])

        return x + self._tome_mlp(x)

    def _tome_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class _ToMeVisionTransformer:
    """timm ``VisionTransformer`` (or subclass) with ``model.r`` and size-aware pooling (also the base of the
    ``Eva`` mixin)."""

    r = tk.r_property(lambda model: len(model.blocks))

    def _tome_start(self) -> tk.Call:
        config = self._tome_info
        r = tk.parse_r(self._tome_r, len(self.blocks))
        if self.grad_checkpointing and torch.is_grad_enabled() and any(r):
            raise NotImplementedError("tome: gradient checkpointing would recompute the blocks with the last "
                                      "layer's token sizes; call model.set_grad_checkpointing(False)")
        return tk.Call(config, r=r, size=None, source=None)

    def _tome_finish(self, call: tk.Call) -> None:
        self._tome_info.update(r=call.r, size=call.size, source=call.source)

    def forward(self, *args, **kwargs):
        return tk.run_call(self, self._tome_start, super().forward, args, kwargs, self._tome_finish)

    def forward_features(self, *args, **kwargs):
        return tk.run_call(self, self._tome_start, self._tome_forward_features, args, kwargs, self._tome_finish)

    def _tome_forward_features(self, *args, **kwargs):
        x = super().forward_features(*args, **kwargs)
        call = tk.current_call()
        if call.config["trace_source"] and call.source is None:
            call.source = tk.source_or_identity(None, x)
        return x

    def forward_intermediates(self, *args, **kwargs):
        return tk.run_call(self, self._tome_start, self._tome_forward_intermediates, args, kwargs)

    def _tome_forward_intermediates(self, *args, **kwargs):
        if any(tk.current_call().r):
            raise NotImplementedError("tome: forward_intermediates reshapes tokens to the patch grid, which "
                                      "merging breaks; set model.r = 0 to use it")
        return super().forward_intermediates(*args, **kwargs)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        call = tk.current_call()  # inside forward; on its own, after forward_features: its published sizes
        config = call.config if call is not None else self._tome_info
        size = call.size if call is not None else config["size"]
        if size is None:  # nothing merged: every size is 1
            return super().pool(x, pool_type)
        if size.shape[:2] != x.shape[:2]:
            raise ValueError(f"tome: pool() got {tuple(x.shape[:2])} tokens but the last forward_features left "
                             f"sizes for {tuple(size.shape[:2])}; pool the output of forward_features")
        start = self._tome_pool_start()
        tokens, size = x[:, start:], size[:, start:].to(x.dtype)
        if self.attn_pool is not None:
            from timm.layers import AttentionPoolLatent

            if not isinstance(self.attn_pool, AttentionPoolLatent):
                raise NotImplementedError(f"tome: {type(self.attn_pool).__name__} pooling has no size weighting; "
                                          f"use global_pool 'token', 'avg', 'avgmax', 'max' or 'map', or r = 0")
            bias = size.log().reshape(size.shape[0], 1, 1, -1) if config["prop_attn"] else None
            return self.attn_pool(tokens, attn_mask=bias)
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type in ("avg", "avgmax"):
            mean = tk.weighted_mean(tokens, size)
            return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)
        return super().pool(x, pool_type)  # 'token', 'max', '': sizes do not enter

    def _tome_pool_start(self) -> int:
        """First token pooled (timm pools prefix tokens only with ``pool_include_prefix``)."""
        return 0 if self.pool_include_prefix else self.num_prefix_tokens


def _check_supported(model: nn.Module) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    tk.check_forward(model, VisionTransformer, "pool", FAMILY, KNOWN_CODE)
    for index, block in enumerate(model.blocks):
        tk.check_forward(block, Block, "forward", FAMILY, KNOWN_CODE, where=f"block {index}")
        tk.check_forward(getattr(block, "attn", None), Attention, "forward", FAMILY, KNOWN_CODE,
                         where=f"block {index}'s attention")


def _is_eva(model: nn.Module) -> bool:
    return any(f"{cls.__module__}.{cls.__qualname__}" == "timm.models.eva.Eva" for cls in type(model).__mro__)


@tk.register_family(FAMILY, ("timm.models.vision_transformer.VisionTransformer", "timm.models.eva.Eva"),
                    "timm VisionTransformer (vit_*, deit_*, deit3_*, *_reg*) and Eva (eva02_*, vit_*_rope_*)")
def timm(model: nn.Module, trace_source: bool = False, prop_attn: bool = True, *, r=None,
         attn_impl: str = "auto", pos_mode: str = "keep") -> nn.Module:
    """Make ``model`` (a timm ``VisionTransformer`` or ``Eva``) a ToMe model in place and return it.

    ``r``: merges per layer (see :func:`tome_kernels.patch.parse_r`; also ``model.r = ...`` later); None keeps
    the current value of a patched model, else 0. ``trace_source``: keep ``model._tome_info["source"]`` ([B, N,
    N0], which input tokens each output token holds; for visualisation). ``prop_attn``: proportional attention
    (the paper's default for off-the-shelf models; turn off for models trained with ToMe without it).
    ``attn_impl``: how proportional attention runs: ``"op"`` (``torch.ops.tome.prop_attention``), ``"sdpa"``
    (``F.scaled_dot_product_attention`` with a ``log size`` float mask: same function) or ``"auto"``
    (``"sdpa"`` on CPU, where it is the faster one; on a GPU ``"op"`` when a compiled tome backend serves it;
    ``"op"`` whenever a backend was chosen by hand; decided now, for the device the model is on). ``pos_mode``
    (RoPE models only): the rotary position of a merged token, ``"keep"`` its B destination's, ``"mean"`` the
    size-weighted mean of the rotation tables (see ``timm_eva``). Patching a patched model updates the flags.
    """
    if _is_eva(model):
        from .timm_eva import patch_eva

        return patch_eva(model, trace_source, prop_attn, r=r, attn_impl=attn_impl, pos_mode=pos_mode)
    if pos_mode != "keep":
        raise ValueError("tome_kernels.patch.timm: pos_mode is for RoPE models (Eva); this model has none")
    _check_supported(model)
    from timm.layers import Attention

    return install(model, _ToMeVisionTransformer, _ToMeBlock, {Attention: _ToMeAttention}, r,
                   config(model, trace_source, prop_attn, attn_impl))


def config(model: nn.Module, trace_source: bool, prop_attn: bool, attn_impl: str, **extra) -> dict:
    """The ``_tome_info`` of a freshly patched timm model."""
    return {
        "r": [], "size": None, "source": None,
        "trace_source": bool(trace_source), "prop_attn": bool(prop_attn),
        "attn_impl": tk.resolve_attn_impl(attn_impl, model),
        "class_token": getattr(model, "cls_token", None) is not None,
        "distill_token": getattr(model, "dist_token", None) is not None,
        "num_prefix_tokens": int(model.num_prefix_tokens),
        **extra,
    }


def install(model: nn.Module, model_mixin: type, block_mixin: type, attn_mixins: dict[type, type], r,
            info: dict) -> nn.Module:
    """Swap the classes of ``model``, its blocks and their attention (``attn_mixins``: library attention class
    -> mixin, checked already); ``r`` None keeps a patched model's value."""
    if r is None:
        r = model.r if getattr(model, "_tome_info", None) is not None else 0
    model.__dict__.pop("r", None)
    tk.swap_class(model, model_mixin)
    model._tome_info = info
    model.r = r
    for layer, block in enumerate(model.blocks):
        tk.swap_class(block, block_mixin)
        tk.swap_class(block.attn, next(mixin for cls, mixin in attn_mixins.items() if isinstance(block.attn, cls)))
        block._tome_layer = layer
    return model
