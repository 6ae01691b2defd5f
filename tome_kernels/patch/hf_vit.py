"""ToMe for Hugging Face transformers (5.x) vision transformers, patched per instance.

Families: ViT (``ViTModel``, ``ViTForImageClassification``), DeiT (``DeiTModel``,
``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``), DINOv2 (``Dinov2Model``,
``Dinov2ForImageClassification``), DINOv2 with registers (``Dinov2WithRegistersModel``,
``Dinov2WithRegistersForImageClassification``), CLIP (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``,
the vision tower of ``CLIPModel``) and SigLIP (``SiglipVisionModel``, the vision tower of ``SiglipModel``,
``SiglipForImageClassification``). ``apply_patch(model)`` swaps the class of the vision backbone, of each of
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
(``attn_impl``, as :func:`tome_kernels.patch.timm`). Prefix tokens never merge: the class token
(ViT, DINOv2, CLIP), class and distillation tokens (DeiT), class and register tokens (DINOv2 with
registers); SigLIP has none. SigLIP's attention-pooling head adds ``log size`` to its logits. The
classifiers that average the patch tokens (DINOv2's next to the class token, SigLIP's over all tokens) take
the size-weighted mean ``Σ sᵢ xᵢ / Σ sᵢ`` over them once tokens merge: the mean over the original patches.

Outputs: ``last_hidden_state`` holds the tokens left after merging (``[B, N - Σr, C]``, prefix tokens
first); pooled outputs and classification logits keep their shapes; ``output_hidden_states`` gives each
layer's tokens (fewer per layer), ``output_attentions`` the weights of the model's own attention, i.e. of
the layers before the first merge (proportional attention is fused and keeps none).

``model.r`` is set on the model handed to :func:`hf` (a wrapper such as ``ViTForImageClassification``
forwards it to its backbone). The state of one forward is a per-call object (see ``_toolkit``): threads can
share one patched model, and ``torch.compile`` traces it. ``model._tome_info`` holds the configuration and,
after each forward, the results under the keys of the timm patch (``r``, ``size``, ``source``,
``trace_source``, ``prop_attn``, ``class_token``, ``distill_token``, ``num_prefix_tokens``, ``attn_impl``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

import tome_kernels  # noqa: F401  (registers torch.ops.tome)

from . import _toolkit as tk

__all__ = ["hf", "FAMILIES"]

# The transformers 5.23 methods this file renders itself (see tk.check_forward).
KNOWN_CODE = {
    "ViTLayer.forward": {"1788d1bfb957ae1c"},
    "ViTAttention.forward": {"a9fcf5fbaaba5042"},
    "DeiTLayer.forward": {"1788d1bfb957ae1c"},
    "DeiTAttention.forward": {"a9fcf5fbaaba5042"},
    "Dinov2Layer.forward": {"0d6d7eb3369a3b13"},
    "Dinov2Attention.forward": {"a9fcf5fbaaba5042"},
    "Dinov2WithRegistersLayer.forward": {"0d6d7eb3369a3b13"},
    "Dinov2WithRegistersAttention.forward": {"a9fcf5fbaaba5042"},
    "CLIPEncoderLayer.forward": {"a0285730fcbf9c7c"},
    "CLIPAttention.forward": {"f845888d74f8a953"},
    "SiglipEncoderLayer.forward": {"a7fb59343448c5b4"},
    "SiglipAttention.forward": {"f14aa90afe382d91"},
    "SiglipMultiheadAttentionPoolingHead.forward": {"152c11e9d94a4538"},
    "Dinov2ForImageClassification.forward": {"ea8df3715bc6b0b7"},
    "Dinov2WithRegistersForImageClassification.forward": {"bd8a4f72a59ca106"},
    "SiglipForImageClassification.forward": {"3459f585908af5fe"},
}


# ----------------------------------------------------------------------------------------------------
# Patched classes (mixins put in front of the original class)
# ----------------------------------------------------------------------------------------------------
def _attend(module: nn.Module, hidden_states: torch.Tensor, attention_mask, size, attn_impl: str, scaling: float,
            dropout: float, kwargs: dict):
    """The attention of the HF vision families (``q_proj``/``k_proj``/``v_proj``, heads of ``head_dim``):
    ``(context [B, N, H·D], attention weights or None, metric [B, N, D])``, before the output projection.
    Without sizes it is the model's own attention interface (``config._attn_implementation``)."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    query = module.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = module.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    if size is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, module._tome_eager)
        context, weights = interface(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)
    else:
        context, weights = tk.attention(query, key, value, size, scaling, attn_impl, dropout).transpose(1, 2), None
    return context.reshape(*input_shape, -1).contiguous(), weights, key.mean(1)


class _ToMeViTAttention:
    """ViT / DeiT / DINOv2 attention (``o_proj``, ``scaling``) that takes token sizes and also returns the
    merge metric; the first two outputs are the original ones (output capturing reads index 1)."""

    def forward(self, hidden_states, attention_mask=None, size=None, attn_impl="sdpa", **kwargs):
        dropout = self.attention_dropout if self.training else 0.0
        context, weights, metric = _attend(self, hidden_states, attention_mask, size, attn_impl, self.scaling,
                                           dropout, kwargs)
        return self.o_proj(context), weights, metric


class _ToMeCLIPAttention:
    """CLIP attention (``out_proj``, ``scale``), as :class:`_ToMeViTAttention`."""

    def forward(self, hidden_states, attention_mask=None, size=None, attn_impl="sdpa", **kwargs):
        dropout = self.dropout if self.training else 0.0
        context, weights, metric = _attend(self, hidden_states, attention_mask, size, attn_impl, self.scale,
                                           dropout, kwargs)
        return self.out_proj(context), weights, metric


class _ToMeSiglipAttention:
    """SigLIP attention: CLIP's, except that it hands the attention interface only ``is_causal``."""

    def forward(self, hidden_states, attention_mask=None, size=None, attn_impl="sdpa", **kwargs):
        dropout = self.dropout if self.training else 0.0
        context, weights, metric = _attend(self, hidden_states, attention_mask, size, attn_impl, self.scale,
                                           dropout, {"is_causal": self.is_causal})
        return self.out_proj(context), weights, metric


class _ToMeLayer:
    """An encoder layer with a ToMe step between the attention and MLP residual branches."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        call = tk.current_call()
        if call is None:  # run on its own, outside its model's forward: nothing merged, nothing to merge
            y, _ = self._tome_attention_branch(hidden_states, attention_mask, None, "sdpa", kwargs)
            hidden_states = y + hidden_states
            return self._tome_mlp_branch(hidden_states) + hidden_states
        config = call.config
        if attention_mask is not None and call.size is not None and not call.user_mask:
            attention_mask = None  # the all-visible mask transformers builds while tracing for export
        size = call.size if config["prop_attn"] else None
        y, metric = self._tome_attention_branch(hidden_states, attention_mask, size, config["attn_impl"], kwargs)
        hidden_states = y + hidden_states

        r = call.r[self._tome_layer]
        if r > 0:
            if attention_mask is not None and call.user_mask:
                raise NotImplementedError("tome: an attention_mask cannot follow merged tokens; pass none or set "
                                          "model.r = 0")
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                raise NotImplementedError("tome: gradient checkpointing would recompute the layers with the last "
                                          "layer's token sizes; call model.activation_checkpointing_disable()")
            hidden_states, _ = tk.merge_tokens(call, hidden_states, metric, r, config["num_prefix_tokens"])

        return self._tome_mlp_branch(hidden_states) + hidden_states


class _ToMeViTLayer(_ToMeLayer):
    """``ViTLayer`` / ``DeiTLayer``."""

    def _tome_attention_branch(self, x, attention_mask, size, attn_impl, kwargs):
        y, _, metric = self.attention(self.layernorm_before(x), attention_mask, size=size, attn_impl=attn_impl,
                                      **kwargs)
        return self.dropout(y), metric

    def _tome_mlp_branch(self, x):
        return self.dropout(self.mlp(self.layernorm_after(x)))


class _ToMeDinov2Layer(_ToMeLayer):
    """``Dinov2Layer`` / ``Dinov2WithRegistersLayer`` (LayerScale and drop path on both branches)."""

    def _tome_attention_branch(self, x, attention_mask, size, attn_impl, kwargs):
        y, _, metric = self.attention(self.norm1(x), attention_mask=attention_mask, size=size, attn_impl=attn_impl,
                                      **kwargs)
        return self.drop_path(self.layer_scale1(y)), metric

    def _tome_mlp_branch(self, x):
        return self.drop_path(self.layer_scale2(self.mlp(self.norm2(x))))


class _ToMeCLIPLayer(_ToMeLayer):
    """``CLIPEncoderLayer`` / ``SiglipEncoderLayer``."""

    def _tome_attention_branch(self, x, attention_mask, size, attn_impl, kwargs):
        y, _, metric = self.self_attn(hidden_states=self.layer_norm1(x), attention_mask=attention_mask, size=size,
                                      attn_impl=attn_impl, **kwargs)
        return y, metric

    def _tome_mlp_branch(self, x):
        return self.mlp(self.layer_norm2(x))


class _ToMeBackbone(tk.KeepsOutputCapture):
    """The vision backbone (embeds the image, runs the encoder layers): ``r`` and the state of a forward."""

    r = tk.r_property(lambda model: len(model._tome_info["r"]))

    def _tome_start(self) -> tk.Call:
        config = self._tome_info
        return tk.Call(config, r=tk.parse_r(self._tome_r, len(config["r"])), size=None, source=None)

    def _tome_finish(self, call: tk.Call) -> None:
        self._tome_info.update(r=call.r, size=call.size, source=call.source)

    def forward(self, *args, **kwargs):
        return tk.run_call(self, self._tome_start, self._tome_forward, args, kwargs, self._tome_finish)

    def _tome_forward(self, *args, **kwargs):
        call = tk.current_call()
        position = self._tome_mask_position
        mask = args[position] if position is not None and len(args) > position else kwargs.get("attention_mask")
        call.user_mask = mask is not None
        out = super().forward(*args, **kwargs)
        if call.config["trace_source"] and call.source is None:
            call.source = tk.source_or_identity(None, out.last_hidden_state)
        return out


class _ToMeWrapper(tk.KeepsOutputCapture):
    """A model holding the vision backbone (a classifier, a two-tower model): ``r`` is the backbone's."""

    @property
    def r(self):
        """Merges per layer of the vision backbone (see :func:`tome_kernels.patch.parse_r`)."""
        return self.get_submodule(self._tome_backbone).r

    @r.setter
    def r(self, value) -> None:
        self.get_submodule(self._tome_backbone).r = value


class _ToMeSiglipHead:
    """``SiglipMultiheadAttentionPoolingHead`` whose probe attends to merged tokens by their size."""

    def forward(self, hidden_state):
        call = tk.current_call()
        size = call.size if call is not None and call.config["prop_attn"] else None
        if size is None:
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


class _ToMePoolingClassifier(_ToMeWrapper):
    """A classifier whose head averages the patch tokens. Once tokens merge, a token stands for ``size``
    patches, so the head takes the size-weighted mean ``Σ sᵢ xᵢ / Σ sᵢ`` over the patch tokens (prefix tokens
    left out), which is the mean over the original patches that the unmerged model takes; ``_tome_classify``
    renders the family's forward with it. With r = 0 in every layer it is transformers' own forward.

    The forward owns the state of the call (the backbone's forward joins it), so the head reads the sizes of
    this forward, not those another thread published."""

    def forward(self, *args, **kwargs):
        backbone = self.get_submodule(self._tome_backbone)
        return tk.run_call(backbone, backbone._tome_start, self._tome_forward, args, kwargs, backbone._tome_finish)

    def _tome_forward(self, *args, **kwargs):
        if not any(tk.current_call().r):
            return super().forward(*args, **kwargs)
        return_dict = kwargs.pop("return_dict", None)  # as transformers' can_return_tuple
        out = self._tome_classify(*args, **kwargs)
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()

    @staticmethod
    def _tome_patch_mean(tokens: torch.Tensor) -> torch.Tensor:
        """The size-weighted mean of the patch tokens of ``tokens`` [B, N, C] (the backbone's output)."""
        call = tk.current_call()
        prefix = call.config["num_prefix_tokens"]
        return tk.weighted_mean(tokens[:, prefix:], None if call.size is None else call.size[:, prefix:])

    @staticmethod
    def _tome_output(outputs, logits, loss):
        from transformers.modeling_outputs import ImageClassifierOutput

        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


class _ToMeDinov2Classifier(_ToMePoolingClassifier):
    """``Dinov2ForImageClassification`` / ``Dinov2WithRegistersForImageClassification``: the class token next
    to the mean of the patch tokens (registers left out), into a linear classifier."""

    def _tome_classify(self, pixel_values=None, labels=None, attention_mask=None, **kwargs):
        outputs = self.get_submodule(self._tome_backbone)(pixel_values, attention_mask=attention_mask, **kwargs)
        sequence_output = outputs.last_hidden_state
        linear_input = torch.cat([sequence_output[:, 0], self._tome_patch_mean(sequence_output)], dim=1)
        logits = self.classifier(linear_input)
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        return self._tome_output(outputs, logits, loss)


class _ToMeSiglipClassifier(_ToMePoolingClassifier):
    """``SiglipForImageClassification``: the mean of all tokens (SigLIP has no prefix tokens) into a linear
    classifier; the vision model's attention-pooling head is not what it reads."""

    def _tome_classify(self, pixel_values=None, labels=None, interpolate_pos_encoding=False, **kwargs):
        outputs = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        logits = self.classifier(self._tome_patch_mean(outputs.last_hidden_state))
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        return self._tome_output(outputs, logits, loss)


# ----------------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One transformers model family: where its classes live and how its prefix tokens are counted."""

    name: str  # registry name
    description: str
    module: str  # transformers module holding the classes
    backbone: str  # the model class that embeds the image and runs the encoder layers
    layer: str
    attention: str
    layer_mixin: type
    attention_mixin: type
    wrappers: tuple[tuple[str, str], ...] = ()  # (model class, attribute holding the backbone)
    classifiers: tuple[tuple[str, str], ...] = ()  # wrappers whose head averages the patch tokens
    classifier_mixin: type | None = None  # a _ToMePoolingClassifier rendering their forward
    head: str | None = None  # a pooling head that needs the token sizes
    head_mixin: type | None = None
    extra_prefix_tokens: str | None = None  # config field counting prefix tokens after the class token(s)
    class_tokens: int = 1  # leading class / distillation tokens

    def class_paths(self) -> tuple[str, ...]:
        wrappers = (name for name, _ in self.wrappers + self.classifiers)
        return tuple(f"{self.module}.{name}" for name in (self.backbone, *wrappers))

    def num_prefix_tokens(self, config) -> int:
        extra = getattr(config, self.extra_prefix_tokens) if self.extra_prefix_tokens else 0
        return self.class_tokens + int(extra)


_MODELS = "transformers.models."
FAMILIES = (
    Family("hf_vit", "transformers ViTModel, ViTForImageClassification", _MODELS + "vit.modeling_vit",
           "ViTModel", "ViTLayer", "ViTAttention", _ToMeViTLayer, _ToMeViTAttention,
           (("ViTForImageClassification", "vit"),)),
    Family("hf_deit", "transformers DeiTModel, DeiTForImageClassification(WithTeacher)",
           _MODELS + "deit.modeling_deit", "DeiTModel", "DeiTLayer", "DeiTAttention", _ToMeViTLayer,
           _ToMeViTAttention, (("DeiTForImageClassification", "deit"),
                               ("DeiTForImageClassificationWithTeacher", "deit")), class_tokens=2),
    Family("hf_dinov2", "transformers Dinov2Model, Dinov2ForImageClassification", _MODELS + "dinov2.modeling_dinov2",
           "Dinov2Model", "Dinov2Layer", "Dinov2Attention", _ToMeDinov2Layer, _ToMeViTAttention,
           classifiers=(("Dinov2ForImageClassification", "dinov2"),), classifier_mixin=_ToMeDinov2Classifier),
    Family("hf_dinov2_registers", "transformers Dinov2WithRegistersModel, Dinov2WithRegistersForImageClassification",
           _MODELS + "dinov2_with_registers.modeling_dinov2_with_registers", "Dinov2WithRegistersModel",
           "Dinov2WithRegistersLayer", "Dinov2WithRegistersAttention", _ToMeDinov2Layer, _ToMeViTAttention,
           classifiers=(("Dinov2WithRegistersForImageClassification", "dinov2_with_registers"),),
           classifier_mixin=_ToMeDinov2Classifier, extra_prefix_tokens="num_register_tokens"),
    Family("hf_clip", "transformers CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel (vision tower)",
           _MODELS + "clip.modeling_clip", "CLIPVisionModel", "CLIPEncoderLayer", "CLIPAttention",
           _ToMeCLIPLayer, _ToMeCLIPAttention,
           (("CLIPModel", "vision_model"), ("CLIPVisionModelWithProjection", "vision_model"))),
    Family("hf_siglip", "transformers SiglipVisionModel, SiglipModel (vision tower), SiglipForImageClassification",
           _MODELS + "siglip.modeling_siglip", "SiglipVisionModel", "SiglipEncoderLayer", "SiglipAttention",
           _ToMeCLIPLayer, _ToMeSiglipAttention, (("SiglipModel", "vision_model"),),
           classifiers=(("SiglipForImageClassification", "vision_model"),), classifier_mixin=_ToMeSiglipClassifier,
           head="SiglipMultiheadAttentionPoolingHead", head_mixin=_ToMeSiglipHead, class_tokens=0),
)


def find_family(model: nn.Module) -> tuple[Family, str] | None:
    """``(family, attribute path of the vision backbone, "" for the model itself)``, or None. Goes by the class
    names in the model's MRO, so no transformers module is imported to look."""
    for cls in tk.original_class(model).__mro__:
        for family in FAMILIES:
            if cls.__module__ != family.module:
                continue
            if cls.__qualname__ == family.backbone:
                return family, ""
            for wrapper, attribute in family.wrappers + family.classifiers:
                if cls.__qualname__ == wrapper:
                    return family, attribute
    return None


def _swap_class(module: nn.Module, mixin: type) -> None:
    tk.swap_class(module, mixin)
    tk.keep_output_capture(module)


def _patch(model: nn.Module, family: Family, backbone_path: str, r, trace_source: bool, prop_attn: bool,
           attn_impl: str) -> nn.Module:
    library = importlib.import_module(family.module)
    layer_cls, attention_cls = getattr(library, family.layer), getattr(library, family.attention)
    backbone = model.get_submodule(backbone_path)
    layers = [m for m in backbone.modules() if isinstance(m, layer_cls)]
    if not layers:
        raise TypeError(f"tome_kernels.patch.hf: {tk.class_path(tk.original_class(backbone))} has no {family.layer}")
    attentions = []
    for index, layer in enumerate(layers):
        tk.check_forward(layer, layer_cls, "forward", family.name, KNOWN_CODE, where=f"layer {index}")
        found = [m for m in layer.children() if isinstance(m, attention_cls)]
        attention = found[0] if len(found) == 1 else None
        tk.check_forward(attention, attention_cls, "forward", family.name, KNOWN_CODE,
                         where=f"layer {index}'s attention")
        attentions.append(attention)
    wrapper_mixin = _ToMeWrapper
    for name, _ in family.classifiers:
        classifier_cls = getattr(library, name)
        if isinstance(model, classifier_cls):
            tk.check_forward(model, classifier_cls, "forward", family.name, KNOWN_CODE)
            wrapper_mixin = family.classifier_mixin
    heads = []
    if family.head is not None:
        head_cls = getattr(library, family.head)
        heads = [m for m in backbone.modules() if isinstance(m, head_cls)]
        for head in heads:
            tk.check_forward(head, head_cls, "forward", family.name, KNOWN_CODE, where="the pooling head")

    info = {
        "r": [0] * len(layers), "size": None, "source": None,
        "trace_source": bool(trace_source), "prop_attn": bool(prop_attn),
        "attn_impl": tk.resolve_attn_impl(attn_impl, model),
        "class_token": family.class_tokens >= 1, "distill_token": family.class_tokens >= 2,
        "num_prefix_tokens": family.num_prefix_tokens(backbone.config),
    }
    if r is None:
        r = model.r if getattr(model, "_tome_info", None) is not None else 0
    for module in (model, backbone):
        module.__dict__.pop("r", None)
        module._tome_info = info
    _swap_class(backbone, _ToMeBackbone)
    parameters = list(inspect.signature(tk.original_class(backbone).forward).parameters)[1:]  # after self
    backbone._tome_mask_position = parameters.index("attention_mask") if "attention_mask" in parameters else None
    if backbone is not model:
        _swap_class(model, wrapper_mixin)
        model._tome_backbone = backbone_path
    model.r = r
    for index, (layer, attention) in enumerate(zip(layers, attentions)):
        tk.swap_class(layer, family.layer_mixin)
        tk.swap_class(attention, family.attention_mixin)
        attention._tome_eager = library.eager_attention_forward  # the interface's default, as the original
        layer._tome_layer = index
    for head in heads:
        tk.swap_class(head, family.head_mixin)
    return model


def hf(model: nn.Module, trace_source: bool = False, prop_attn: bool = True, *, r=None,
       attn_impl: str = "auto") -> nn.Module:
    """Make ``model`` (a transformers ViT, DeiT, DINOv2, CLIP or SigLIP vision model; see :data:`FAMILIES`) a
    ToMe model in place and return it.

    ``r``: merges per layer (see :func:`tome_kernels.patch.parse_r`; also ``model.r = ...`` later); None keeps
    the current value of a patched model, else 0. ``trace_source``, ``prop_attn`` and ``attn_impl`` as
    :func:`tome_kernels.patch.timm`. Patching a patched model updates the flags.
    """
    found = find_family(model)
    if found is None:
        supported = "; ".join(family.description for family in FAMILIES)
        raise TypeError(f"tome_kernels.patch.hf: no ToMe patch for {tk.class_path(tk.original_class(model))}. "
                        f"Supported: {supported}")
    return _patch(model, *found, r, trace_source, prop_attn, attn_impl)


for _family in FAMILIES:
    tk.register_family(_family.name, _family.class_paths(), _family.description)(hf)
