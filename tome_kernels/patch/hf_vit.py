"""ToMe for Hugging Face transformers (5.x) vision transformers, patched per instance.

Families: ViT (``ViTModel``, ``ViTForImageClassification``), DeiT (``DeiTModel``,
``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``), DINOv2 (``Dinov2Model``),
DINOv2 with registers (``Dinov2WithRegistersModel``), CLIP (``CLIPVisionModel``,
``CLIPVisionModelWithProjection``, the vision tower of ``CLIPModel``) and SigLIP (``SiglipVisionModel``, the
vision tower of ``SiglipModel``). ``apply_patch(model)`` swaps the class of the vision backbone, of each of
its encoder layers and of each layer's attention for a ToMe subclass; text towers are left alone.

Each patched layer (pre-norm; the branches are the family's own modules, e.g. DINOv2's LayerScale)::

    y, metric = attention(norm1(x), size)      # metric = keys averaged over heads
    x = x + y
    x, size = bipartite_merge(x, size, r_layer, metric, protected=prefix tokens)
    x = x + mlp_branch(norm2(x))

Before the first merge (all sizes 1), or without ``prop_attn``, attention runs through the model's own
attention interface (``config._attn_implementation``: SDPA, eager, ...), so r = 0 reproduces the unpatched
model. Once tokens have merged it is proportional, ``softmax(q kᵀ · scale + log size) v``:
``torch.ops.tome.prop_attention`` or ``F.scaled_dot_product_attention`` with a log-size bias
(``attn_impl``, as :func:`tome_kernels.patch.timm.apply_patch`). Prefix tokens never merge: the class token
(ViT, DINOv2, CLIP), class and distillation tokens (DeiT), class and register tokens (DINOv2 with
registers); SigLIP has none. SigLIP's attention-pooling head adds ``log size`` to its logits.

Outputs: ``last_hidden_state`` holds the tokens left after merging (``[B, N - Σr, C]``, prefix tokens
first); pooled outputs and classification logits keep their shapes. The state of one forward lives in
``model._tome_info`` with the keys of the timm patch (``r``, ``size``, ``source``, ``trace_source``,
``prop_attn``, ``class_token``, ``distill_token``, ``num_prefix_tokens``, ``attn_impl``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import tome_kernels  # noqa: F401  (registers torch.ops.tome)

from ._common import resolve_attn_impl
from .timm import parse_r, unpatch

__all__ = ["apply_patch", "unpatch", "FAMILIES"]


# ----------------------------------------------------------------------------------------------------
# Patched classes (mixins put in front of the original class)
# ----------------------------------------------------------------------------------------------------
def _attend(module: nn.Module, hidden_states: torch.Tensor, attention_mask, size, scaling: float, dropout: float,
            kwargs: dict):
    """The attention of the HF vision families (``q_proj``/``k_proj``/``v_proj``, heads of ``head_dim``):
    ``(context [B, N, H·D], attention weights or None, metric [B, N, D])``, before the output projection."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    query = module.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = module.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    weights = None
    if size is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation,
                                                          _EAGER_ATTENTION[module._tome_original_class])
        context, weights = interface(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)
    elif dropout == 0.0 and module._tome_info["attn_impl"] == "op":
        context = torch.ops.tome.prop_attention(query, key, value, size, scaling).transpose(1, 2)
    else:
        # The same function through PyTorch's fused SDPA with a log-size bias (also the dropout path).
        bias = size.to(query.dtype).log().reshape(size.shape[0], 1, 1, size.shape[1])
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout,
                                                 scale=scaling).transpose(1, 2)
    return context.reshape(*input_shape, -1).contiguous(), weights, key.mean(1)


class _ToMeViTAttention:
    """ViT / DeiT / DINOv2 attention (``o_proj``, ``scaling``) that takes token sizes and also returns the
    merge metric; the first two outputs are the original ones (output capturing reads index 1)."""

    def forward(self, hidden_states, attention_mask=None, size=None, **kwargs):
        dropout = self.attention_dropout if self.training else 0.0
        context, weights, metric = _attend(self, hidden_states, attention_mask, size, self.scaling, dropout, kwargs)
        return self.o_proj(context), weights, metric


class _ToMeCLIPAttention:
    """CLIP / SigLIP attention (``out_proj``, ``scale``), as :class:`_ToMeViTAttention`."""

    def forward(self, hidden_states, attention_mask=None, size=None, **kwargs):
        dropout = self.dropout if self.training else 0.0
        if self._tome_passes_kwargs:
            kwargs = {**kwargs}
        else:  # SigLIP's attention hands the interface no kwargs, only is_causal
            kwargs = {"is_causal": self.is_causal}
        context, weights, metric = _attend(self, hidden_states, attention_mask, size, self.scale, dropout, kwargs)
        return self.out_proj(context), weights, metric


class _ToMeLayer:
    """An encoder layer with a ToMe step between the attention and MLP residual branches."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        info = self._tome_info
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and any(info["r"]):
            raise NotImplementedError("tome: gradient checkpointing would recompute the layers with the last "
                                      "layer's token sizes; call model.gradient_checkpointing_disable()")
        size = info["size"]
        y, metric = self._tome_attention_branch(hidden_states, attention_mask, size if info["prop_attn"] else None,
                                                kwargs)
        hidden_states = y + hidden_states

        r = info["r"][self._tome_layer]
        if r > 0:
            if attention_mask is not None:
                raise NotImplementedError("tome: an attention_mask cannot follow merged tokens; pass none or set "
                                          "model.r = 0")
            protected = info["num_prefix_tokens"]
            hidden_states, _, size, unm_idx, src_idx, dst_idx = torch.ops.tome.bipartite_merge(
                hidden_states, None, size, r, metric=metric, protected=protected)
            info["size"] = size
            if info["trace_source"]:
                info["source"] = torch.ops.tome.merge_source(
                    _source_or_identity(info["source"], metric), unm_idx, src_idx, dst_idx, protected)

        return self._tome_mlp_branch(hidden_states) + hidden_states


class _ToMeViTLayer(_ToMeLayer):
    """``ViTLayer`` / ``DeiTLayer``."""

    def _tome_attention_branch(self, x, attention_mask, size, kwargs):
        y, _, metric = self.attention(self.layernorm_before(x), attention_mask, size=size, **kwargs)
        return self.dropout(y), metric

    def _tome_mlp_branch(self, x):
        return self.dropout(self.mlp(self.layernorm_after(x)))


class _ToMeDinov2Layer(_ToMeLayer):
    """``Dinov2Layer`` / ``Dinov2WithRegistersLayer`` (LayerScale and drop path on both branches)."""

    def _tome_attention_branch(self, x, attention_mask, size, kwargs):
        y, _, metric = self.attention(self.norm1(x), attention_mask=attention_mask, size=size, **kwargs)
        return self.drop_path(self.layer_scale1(y)), metric

    def _tome_mlp_branch(self, x):
        return self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))))


class _ToMeCLIPLayer(_ToMeLayer):
    """``CLIPEncoderLayer`` / ``SiglipEncoderLayer``."""

    def _tome_attention_branch(self, x, attention_mask, size, kwargs):
        y, _, metric = self.self_attn(hidden_states=self.layer_norm1(x), attention_mask=attention_mask, size=size,
                                      **kwargs)
        return y, metric

    def _tome_mlp_branch(self, x):
        return self.mlp(self.layer_norm2(x))


def _source_or_identity(source: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """``source``, or the identity map ``[B, N, N]`` for the ``[B, N, ...]`` tokens when nothing merged yet."""
    if source is not None:
        return source
    batch, num_tokens = tokens.shape[:2]
    eye = torch.eye(num_tokens, dtype=tokens.dtype, device=tokens.device)
    return eye.expand(batch, num_tokens, num_tokens)


class _ToMeModel:
    """The model handed to :func:`apply_patch`: ``model.r``."""

    @property
    def r(self):
        """Merges per layer: an int, an ``(r, inflection)`` schedule or a per-layer list (see
        :func:`tome_kernels.patch.parse_r`)."""
        return self._tome_r

    @r.setter
    def r(self, value) -> None:
        self._tome_info["r"] = parse_r(value, len(self._tome_info["r"]))  # bad values fail here
        self._tome_r = list(value) if isinstance(value, list) else value


class _ToMeBackbone:
    """The vision backbone (the module that runs the encoder layers): resets the state of a forward."""

    def forward(self, *args, **kwargs):
        info = self._tome_info
        info["size"] = None
        info["source"] = None
        out = super().forward(*args, **kwargs)
        if info["trace_source"] and info["source"] is None:
            info["source"] = _source_or_identity(None, out.last_hidden_state)
        return out


class _ToMeBackboneModel(_ToMeBackbone, _ToMeModel):
    """A vision backbone handed to :func:`apply_patch` itself."""


class _ToMeSiglipHead:
    """``SiglipMultiheadAttentionPoolingHead`` whose probe attends to merged tokens by their size."""

    def forward(self, hidden_state):
        info = self._tome_info
        size = info["size"]
        if size is None or not info["prop_attn"]:
            return super().forward(hidden_state)
        batch, num_tokens = hidden_state.shape[:2]
        heads = self.attention.num_heads
        bias = size.to(hidden_state.dtype).log().reshape(batch, 1, 1, num_tokens)
        bias = bias.expand(batch, heads, 1, num_tokens).reshape(batch * heads, 1, num_tokens)
        probe = self.probe.repeat(batch, 1, 1)
        # need_weights=False: nn.MultiheadAttention then runs SDPA with the bias as its float mask.
        hidden_state = self.attention(probe, hidden_state, hidden_state, attn_mask=bias, need_weights=False)[0]
        residual = hidden_state
        hidden_state = self.layernorm(hidden_state)
        hidden_state = residual + self.mlp(hidden_state)
        return hidden_state[:, 0]


# ----------------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One transformers model family: where its classes live and how its prefix tokens are counted."""

    name: str
    module: str  # transformers module holding the classes
    backbone: str  # the model class that embeds the image and runs the encoder layers
    layer: str
    attention: str
    layer_mixin: type
    attention_mixin: type
    wrappers: dict[str, str] = field(default_factory=dict)  # model class -> attribute holding the backbone
    head: str | None = None  # a pooling head that needs the token sizes
    head_mixin: type | None = None
    extra_prefix_tokens: str | None = None  # config field counting prefix tokens after the class token
    class_tokens: int = 1  # leading class / distillation tokens
    attention_passes_kwargs: bool = True

    def classes(self):
        module = importlib.import_module(self.module)
        return module, getattr(module, self.backbone), getattr(module, self.layer), getattr(module, self.attention)

    def num_prefix_tokens(self, config) -> int:
        extra = getattr(config, self.extra_prefix_tokens) if self.extra_prefix_tokens else 0
        return self.class_tokens + int(extra)


FAMILIES = (
    Family("ViT", "transformers.models.vit.modeling_vit", "ViTModel", "ViTLayer", "ViTAttention",
           _ToMeViTLayer, _ToMeViTAttention, {"ViTForImageClassification": "vit"}),
    Family("DeiT", "transformers.models.deit.modeling_deit", "DeiTModel", "DeiTLayer", "DeiTAttention",
           _ToMeViTLayer, _ToMeViTAttention,
           {"DeiTForImageClassification": "deit", "DeiTForImageClassificationWithTeacher": "deit"},
           class_tokens=2),
    Family("DINOv2", "transformers.models.dinov2.modeling_dinov2", "Dinov2Model", "Dinov2Layer",
           "Dinov2Attention", _ToMeDinov2Layer, _ToMeViTAttention),
    Family("DINOv2 with registers", "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers",
           "Dinov2WithRegistersModel", "Dinov2WithRegistersLayer", "Dinov2WithRegistersAttention",
           _ToMeDinov2Layer, _ToMeViTAttention, extra_prefix_tokens="num_register_tokens"),
    Family("CLIP", "transformers.models.clip.modeling_clip", "CLIPVisionModel", "CLIPEncoderLayer",
           "CLIPAttention", _ToMeCLIPLayer, _ToMeCLIPAttention,
           {"CLIPModel": "vision_model", "CLIPVisionModelWithProjection": "vision_model"}),
    Family("SigLIP", "transformers.models.siglip.modeling_siglip", "SiglipVisionModel", "SiglipEncoderLayer",
           "SiglipAttention", _ToMeCLIPLayer, _ToMeCLIPAttention, {"SiglipModel": "vision_model"},
           head="SiglipMultiheadAttentionPoolingHead", head_mixin=_ToMeSiglipHead, class_tokens=0,
           attention_passes_kwargs=False),
)

# The eager attention function of each family's attention class (the default of the attention interface).
_EAGER_ATTENTION: dict[type, object] = {}

_PATCHED_CLASSES: dict[tuple[type, type], type] = {}


def _patched_class(cls: type, mixin: type, extra: dict | None = None) -> type:
    if getattr(cls, "_tome_original_class", None) is not None:
        return cls  # already patched
    key = (cls, mixin)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(f"ToMe{cls.__name__}", (mixin, cls),
                                     {"_tome_original_class": cls, "__module__": __name__, **(extra or {})})
    return _PATCHED_CLASSES[key]


def _swap_class(module: nn.Module, cls: type) -> None:
    """``module.__class__ = cls``, keeping transformers' output capture (``output_hidden_states`` /
    ``output_attentions``): it looks a model's recordable outputs up by the name of its class."""
    from transformers.utils import output_capturing

    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    flags = registry.get(module) if registry is not None and hasattr(module, "config") else None
    module.__class__ = cls
    if flags:
        registry[module] = flags


def _original(obj) -> type:
    return getattr(type(obj), "_tome_original_class", None) or type(obj)


def _class_name(obj) -> str:
    cls = _original(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def find_family(model: nn.Module):
    """``(family, backbone)`` for a supported model, else ``None``. Only transformers modules that were
    imported can match, so this never imports a model family the caller does not use."""
    import sys

    cls = _original(model)
    for family in FAMILIES:
        module = sys.modules.get(family.module)
        if module is None:
            continue
        if issubclass(cls, getattr(module, family.backbone)):
            return family, model
        for wrapper, attribute in family.wrappers.items():
            if issubclass(cls, getattr(module, wrapper)):
                return family, getattr(model, attribute)
    return None


def supported_models() -> list[str]:
    return [name for family in FAMILIES for name in (family.backbone, *family.wrappers)]


def _check_supported(family: Family, backbone: nn.Module) -> list[nn.Module]:
    """The encoder layers of ``backbone``, after checking that every layer and attention has the forward
    that the patch replaces (a subclass with another forward would be silently replaced)."""
    _, _, layer_cls, attention_cls = family.classes()
    layers = [m for m in backbone.modules() if isinstance(m, layer_cls)]
    for index, layer in enumerate(layers):
        if _original(layer).forward is not layer_cls.forward:
            raise TypeError(f"tome_kernels.patch: layer {index} is {_class_name(layer)}, whose forward is not "
                            f"{family.layer}'s")
        attention = [m for m in layer.children() if isinstance(m, attention_cls)]
        if len(attention) != 1 or _original(attention[0]).forward is not attention_cls.forward:
            raise TypeError(f"tome_kernels.patch: layer {index} has no {family.layer} attention with the forward "
                            f"of {family.attention}")
    if not layers:
        raise TypeError(f"tome_kernels.patch: {_class_name(backbone)} has no {family.layer}")
    return layers


def apply_patch(model: nn.Module, trace_source: bool = False, prop_attn: bool = True, *,
                attn_impl: str = "auto") -> nn.Module:
    """Make ``model`` (one of :func:`supported_models`) a ToMe model in place and return it; ``model.r`` = 0.

    Options as :func:`tome_kernels.patch.timm.apply_patch`. Patching a patched model updates the flags.
    """
    found = find_family(model)
    if found is None:
        raise TypeError(f"tome_kernels.patch: {_class_name(model)} is not a supported transformers vision model "
                        f"(supported: {', '.join(supported_models())})")
    family, backbone = found
    layers = _check_supported(family, backbone)
    module, _, _, attention_cls = family.classes()
    _EAGER_ATTENTION[attention_cls] = module.eager_attention_forward
    num_prefix_tokens = family.num_prefix_tokens(backbone.config)
    info = {
        "r": [0] * len(layers), "size": None, "source": None,
        "trace_source": bool(trace_source), "prop_attn": bool(prop_attn),
        "attn_impl": resolve_attn_impl(attn_impl, model),
        "class_token": family.class_tokens >= 1, "distill_token": family.class_tokens >= 2,
        "num_prefix_tokens": num_prefix_tokens,
    }
    previous_r = model.r if getattr(model, "_tome_info", None) is not None else 0
    model.__dict__.pop("r", None)
    model._tome_info = backbone._tome_info = info
    if backbone is model:
        _swap_class(model, _patched_class(type(model), _ToMeBackboneModel))
    else:
        _swap_class(model, _patched_class(type(model), _ToMeModel))
        _swap_class(backbone, _patched_class(type(backbone), _ToMeBackbone))
    model.r = previous_r
    for index, layer in enumerate(layers):
        attention = next(m for m in layer.children() if isinstance(m, attention_cls))
        layer.__class__ = _patched_class(type(layer), family.layer_mixin)
        attention.__class__ = _patched_class(type(attention), family.attention_mixin,
                                             {"_tome_passes_kwargs": family.attention_passes_kwargs})
        layer._tome_info = attention._tome_info = info
        layer._tome_layer = index
    if family.head is not None:
        head_cls = getattr(module, family.head)
        for head in backbone.modules():
            if isinstance(head, head_cls):
                if _original(head).forward is not head_cls.forward:
                    raise TypeError(f"tome_kernels.patch: {_class_name(head)} has another forward than {family.head}")
                head.__class__ = _patched_class(type(head), family.head_mixin)
                head._tome_info = info
    return model
