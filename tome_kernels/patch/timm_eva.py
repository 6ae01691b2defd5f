"""ToMe for timm's RoPE Vision Transformers (``timm.models.eva.Eva``: ``eva02_*``, ``vit_*_rope_*``), per instance.

Reached through ``tome_kernels.patch.timm(model, ..., pos_mode="keep")``; the model keeps the timm ViT
patch's ``model.r``, pooling and ``_tome_info`` (see ``timm_vit``). Each patched ``EvaBlock``::

    y, metric = attn(norm1(x), rope, size)    # metric = keys (after k_norm, before rotation) over heads
    x = x + drop_path1(gamma_1 * y)
    x, pos, size = bipartite_merge(x, pos, size, r_layer, metric, protected=num_prefix_tokens, pos_mode)
    x = x + drop_path2(gamma_2 * mlp(norm2(x)))

Rotary embeddings rotate queries and keys by angles of each patch token's grid position (prefix tokens are
not rotated). A merged token carries a position: the rotation tables (sin and cos, ``[N, 2 D]``; for
``rope_mixed`` models one table per layer and head, flattened into the channels) ride along as ``pos`` of
``torch.ops.tome.bipartite_merge``: ``pos_mode="keep"`` rotates a merged token as its B destination,
``"mean"`` by the size-weighted mean of the members' sin and cos tables. Until the first merge the blocks
use timm's own tables, so r = 0 reproduces the unpatched model. Prefix tokens (class, registers) never
merge. Not supported while merging: ``EvaBlockPostNorm``, patch dropout in training, attention masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _toolkit as tk
from .timm_vit import FAMILY, _ToMeVisionTransformer, attend, config, install

__all__ = ["patch_eva"]

POS_MODES = ("keep", "mean")
# The timm methods this file renders itself (timm 1.0.31; see tk.check_forward).
KNOWN_CODE = {
    "EvaBlock.forward": {"35b313e45db772d6"},
    "EvaAttention.forward": {"a618c0e7c5fa9dda"},
    "AttentionRope.forward": {"e1c26c11a1e658a9"},
    "Eva.pool": {"6fda4086cfbe48ce"},
}


class _ToMeRopeAttention:
    """timm ``EvaAttention`` / ``AttentionRope`` that takes token sizes and also returns the merge metric."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, size: torch.Tensor | None = None,
                attn_impl: str = "sdpa"):
        from timm.layers import apply_rot_embed_cat

        batch, num_tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._tome_qkv(x)
        q, k = self.q_norm(q), self.k_norm(k)
        metric = k.mean(1)

        if rope is not None:
            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        groups = getattr(self, "num_kv_groups", 1)
        if groups > 1:  # grouped-query attention: kv head h // groups serves query head h
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

        x = attend(self, q, k, v, size, attn_impl)
        x = self.norm(x.transpose(1, 2).reshape(batch, num_tokens, -1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x)), metric


class _ToMeEvaAttention(_ToMeRopeAttention):
    def _tome_qkv(self, x: torch.Tensor):
        batch, num_tokens, _ = x.shape
        if self.qkv is None:
            return (proj(x).reshape(batch, num_tokens, self.num_heads, -1).transpose(1, 2)
                    for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = self.qkv(x) + qkv_bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, qkv_bias)
        return qkv.reshape(batch, num_tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


class _ToMeAttentionRope(_ToMeRopeAttention):
    def _tome_qkv(self, x: torch.Tensor):
        batch, num_tokens, _ = x.shape
        if self.qkv is not None:
            qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim)
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)
        heads = (self.num_heads, self.num_kv_heads, self.num_kv_heads)
        return (proj(x).reshape(batch, num_tokens, h, self.head_dim).transpose(1, 2)
                for proj, h in zip((self.q_proj, self.k_proj, self.v_proj), heads))


class _ToMeEvaBlock:
    """timm ``EvaBlock`` with a ToMe step between attention and MLP; merged tokens carry their rotary tables."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise NotImplementedError("tome: a ToMe-patched EvaBlock takes no attn_mask / is_causal "
                                      "(the token count changes in every layer)")
        call = tk.current_call()
        size, attn_impl, r = None, "sdpa", 0
        if call is not None:
            size = call.size if call.config["prop_attn"] else None
            attn_impl, r = call.config["attn_impl"], call.r[self._tome_layer]
            if call.pos is not None:  # tokens merged: this layer's tables follow them
                rope = _rope_of_layer(call, self._tome_layer)
        y, metric = self.attn(self.norm1(x), rope, size, attn_impl)
        x = x + self.drop_path1(y if self.gamma_1 is None else self.gamma_1 * y)

        if r > 0:
            pos = call.pos if call.pos is not None else _initial_pos(call, x)
            x, call.pos = tk.merge_tokens(call, x, metric, r, call.config["num_prefix_tokens"], pos,
                                          call.config["pos_mode"])

        y = self.mlp(self.norm2(x))
        return x + self.drop_path2(y if self.gamma_2 is None else self.gamma_2 * y)


def _initial_pos(call: tk.Call, x: torch.Tensor) -> torch.Tensor | None:
    """Rotation tables as per-token channels ``[B, N, P]`` (zeros for the prefix tokens), or None."""
    rope = call.rope
    if rope is None:
        return None
    if rope.dim() == 4:  # rope_mixed: [depth, heads, Np, 2D] -> [Np, depth * heads * 2D]
        rope = rope.permute(2, 0, 1, 3).flatten(1)
    elif rope.dim() != 2:
        raise NotImplementedError(f"tome: rotary tables of shape {tuple(rope.shape)} (patch dropout or per-image "
                                  f"tables) cannot be merged; set model.r = 0")
    prefix = rope.new_zeros(call.config["num_prefix_tokens"], rope.shape[-1])
    return torch.cat([prefix, rope]).expand(x.shape[0], -1, -1)


def _rope_of_layer(call: tk.Call, layer: int) -> torch.Tensor:
    """The merged tokens' rotation table for ``layer``, shaped to broadcast over q / k ``[B, H, Np, 2D]``."""
    pos = call.pos[:, call.config["num_prefix_tokens"]:]
    if call.rope.dim() == 2:
        return pos.unsqueeze(1)
    depth, heads, _, channels = call.rope.shape
    return pos.reshape(pos.shape[0], pos.shape[1], depth, heads, channels)[:, :, layer].transpose(1, 2)


class _ToMeEva(_ToMeVisionTransformer):
    """timm ``Eva``: the ViT mixin's ``model.r``, per-call state and pooling, plus the rotary tables."""

    def _tome_start(self) -> tk.Call:
        call = super()._tome_start()
        call.rope = call.pos = None
        return call

    def _pos_embed(self, x: torch.Tensor):
        x, rope = super()._pos_embed(x)
        call = tk.current_call()
        if call is not None:
            call.rope = rope
        return x, rope

    def _tome_pool_start(self) -> int:
        return 0 if self.attn_pool is not None else self.num_prefix_tokens  # as Eva.pool


def _attn_mixins() -> dict[type, type]:
    from timm.layers.attention import AttentionRope
    from timm.models.eva import EvaAttention

    return {EvaAttention: _ToMeEvaAttention, AttentionRope: _ToMeAttentionRope}


def _check_supported(model: nn.Module) -> None:
    from timm.models.eva import Eva, EvaBlock

    tk.check_forward(model, Eva, "pool", FAMILY, KNOWN_CODE)
    for index, block in enumerate(model.blocks):
        tk.check_forward(block, EvaBlock, "forward", FAMILY, KNOWN_CODE, where=f"block {index}")
        attn = getattr(block, "attn", None)
        expected = next((cls for cls in _attn_mixins() if isinstance(attn, cls)), next(iter(_attn_mixins())))
        tk.check_forward(attn, expected, "forward", FAMILY, KNOWN_CODE, where=f"block {index}'s attention")


def patch_eva(model: nn.Module, trace_source: bool, prop_attn: bool, *, r, attn_impl: str, pos_mode: str):
    """:func:`tome_kernels.patch.timm` for an ``Eva`` model."""
    if pos_mode not in POS_MODES:
        raise ValueError(f"tome_kernels.patch.timm: pos_mode must be one of {POS_MODES}, got {pos_mode!r}")
    _check_supported(model)
    return install(model, _ToMeEva, _ToMeEvaBlock, _attn_mixins(), r,
                   config(model, trace_source, prop_attn, attn_impl, pos_mode=pos_mode))
