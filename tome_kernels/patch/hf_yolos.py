"""ToMe for transformers' YOLOS (``YolosForObjectDetection`` / ``YolosModel``, transformers 5.x), per instance.

YOLOS is a plain ViT encoder whose sequence is ``[class ; patches ; detection tokens]``; the detector reads
only the last ``num_detection_tokens`` outputs. So patch tokens merge away for good (nothing is unmerged)
while the class and detection tokens never merge. Each patched layer (pre-norm, as ``YolosLayer``)::

    y, keys = attention(layernorm_before(x), size)     # metric = keys averaged over heads
    x = x + y
    x, pos, size = bipartite_merge(x, pos, size, r_layer, metric, protected=1 + num_detection_tokens)
    x = x + mlp(layernorm_after(x))
    x = x + mid_position_embedding[layer](pos)         # use_mid_position_embeddings, not after the last layer

The op protects *leading* tokens: at the first merge of a forward the detection tokens move next to the
class token (``[class ; detection ; patches]``, the metric with them), and after the last layer back to the
end, so the model's heads see the layout they expect. Attention is permutation-equivariant and every
position embedding travels with its token, so the order does not change the function; layers before the
first merge run in the original order, which keeps r = 0 bit-identical to the unpatched model.

Mid-position embeddings (interpolated to the image size, added after every layer but the last) follow the
merged tokens through the op's positional passthrough: ``pos_mode="keep"`` gives a merged token its B
destination's embedding, ``"mean"`` the size-weighted mean of its members' embeddings. ``"keep"`` carries one
channel, the original position of the token (the embedding is looked up after each layer); ``"mean"``
carries the embeddings of all later layers (``(layers - 1 - l) * hidden`` channels at layer l), so it costs
more memory traffic.

Attention: transformers' own path (its ``_attn_implementation``) until the first merge; afterwards, with
``prop_attn``, ``softmax(q kᵀ · scale + log size) v`` through ``torch.ops.tome.prop_attention`` or SDPA with a
``log size`` float bias (``attn_impl``); without ``prop_attn`` transformers' path throughout.

YOLOS takes no pixel mask (padded batches are plain images to it), so merging needs no padding rule.
The state of one forward is local to that call; afterwards ``model._tome_info`` holds ``size`` ([B, N, 1],
tokens per output token, None when nothing merged) and, with ``trace_source``, ``source`` ([B, N, N0]: which
input tokens each output token holds), both in the model's output order. Not supported while merging:
gradient checkpointing, ``output_attentions``; ``output_hidden_states`` gives per-layer states of shrinking
length (after the first merge in the ``[class ; detection ; patches]`` order).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

import tome_kernels  # noqa: F401  (registers torch.ops.tome)

from ._common import resolve_attn_impl
from .timm import parse_r

__all__ = ["apply_patch", "unpatch"]

POS_MODES = ("keep", "mean")


# ----------------------------------------------------------------------------------------------------
# One forward's token state
# ----------------------------------------------------------------------------------------------------
class _Tokens:
    """Sizes, carried positions and source map of the encoder tokens during one forward.

    ``pos`` is None until the first merge; then ``[B, N, 1]`` original positions (``"keep"``) or ``[B, N,
    k·C]`` the mid-position embeddings of the k layers still to come (``"mean"``).
    """

    def __init__(self, info: dict, num_layers: int, mid: torch.Tensor | None, num_detection: int):
        self.r = parse_r(info["r"], num_layers)
        self.prop_attn = info["prop_attn"]
        self.attn_impl = info["attn_impl"]
        self.pos_mode = info["pos_mode"]
        self.trace_source = info["trace_source"]
        self.mid = mid  # [layers - 1, 1, N0, C] or None
        self.num_detection = num_detection
        self.size = None
        self.pos = None
        self.source = None
        self.reordered = False

    def _to_merge_order(self, x: torch.Tensor, metric: torch.Tensor, layer: int):
        """First merge: ``[class ; patches ; detection]`` -> ``[class ; detection ; patches]``."""
        batch, num_tokens = x.shape[:2]
        first_detection = num_tokens - self.num_detection
        order = torch.cat([torch.zeros(1, dtype=torch.long, device=x.device),
                           torch.arange(first_detection, num_tokens, device=x.device),
                           torch.arange(1, first_detection, device=x.device)])
        if self.mid is not None and layer < len(self.mid):
            if self.pos_mode == "keep":
                self.pos = order.to(torch.float32).view(1, num_tokens, 1).expand(batch, -1, -1)
            else:
                later = self.mid[layer:, 0].index_select(1, order).permute(1, 0, 2)  # [N, k, C]
                self.pos = later.reshape(1, num_tokens, -1).to(x.dtype).expand(batch, -1, -1)
        if self.trace_source:
            eye = torch.eye(num_tokens, dtype=x.dtype, device=x.device)
            self.source = eye.index_select(0, order).expand(batch, -1, -1)
        self.reordered = True
        return x.index_select(1, order), metric.index_select(1, order)

    def merge(self, x: torch.Tensor, metric: torch.Tensor, r: int, layer: int) -> torch.Tensor:
        if not self.reordered:
            x, metric = self._to_merge_order(x, metric, layer)
        protected = 1 + self.num_detection
        pos = self.pos if self.pos is not None and self.pos.shape[-1] > 0 else None
        x, pos, size, unm_idx, src_idx, dst_idx = torch.ops.tome.bipartite_merge(
            x, pos, self.size, r, metric=metric, protected=protected, pos_mode=self.pos_mode)
        self.size = size
        if pos is not None:
            self.pos = pos
        if self.trace_source:
            self.source = torch.ops.tome.merge_source(self.source, unm_idx, src_idx, dst_idx, protected)
        return x

    def mid_embedding(self, layer: int) -> torch.Tensor:
        """The mid-position embedding added after ``layer``, for the current tokens."""
        if not self.reordered:
            return self.mid[layer]
        if self.pos_mode == "keep":
            return F.embedding(self.pos[..., 0].long(), self.mid[layer, 0])
        channels = self.mid.shape[-1]
        embedding, self.pos = self.pos[..., :channels], self.pos[..., channels:]
        return embedding

    def to_output_order(self, x: torch.Tensor) -> torch.Tensor:
        """``[class ; detection ; patches]`` -> ``[class ; patches ; detection]`` (rows of x or source)."""
        if not self.reordered:
            return x
        split = 1 + self.num_detection
        return torch.cat([x[:, :1], x[:, split:], x[:, 1:split]], dim=1)


def _self_attention(module: nn.Module, hidden: torch.Tensor, size: torch.Tensor | None, attn_impl: str):
    """``YolosSelfAttention`` (context layer, before the output projection) and its keys ``[B, H, N, D]``.

    Without sizes this is transformers' own computation; with sizes proportional attention."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.yolos.modeling_yolos import eager_attention_forward

    batch, num_tokens = hidden.shape[:2]
    shape = batch, -1, module.num_attention_heads, module.attention_head_size
    key = module.key(hidden).view(*shape).transpose(1, 2)
    value = module.value(hidden).view(*shape).transpose(1, 2)
    query = module.query(hidden).view(*shape).transpose(1, 2)
    dropout = module.dropout_prob if module.training else 0.0

    if size is None:
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation,
                                                          eager_attention_forward)
        context, _ = interface(module, query, key, value, None, is_causal=module.is_causal,
                               scaling=module.scaling, dropout=dropout)
    else:
        if attn_impl == "op" and dropout == 0.0:
            context = torch.ops.tome.prop_attention(query, key, value, size, module.scaling)
        else:  # the same function through PyTorch's fused SDPA with a log-size bias (also the dropout path)
            bias = size.to(query.dtype).log().reshape(batch, 1, 1, num_tokens)
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout,
                                                     scale=module.scaling)
        context = context.transpose(1, 2)
    return context.reshape(batch, num_tokens, module.all_head_size), key


# ----------------------------------------------------------------------------------------------------
# ToMe subclasses (mixins put in front of the original class)
# ----------------------------------------------------------------------------------------------------
class _ToMeYolosLayer:
    """``YolosLayer`` with a ToMe step between attention and MLP."""

    def forward(self, hidden_states: torch.Tensor, tome_tokens: _Tokens):
        tokens = tome_tokens
        hidden_norm = self.layernorm_before(hidden_states)
        size = tokens.size if tokens.prop_attn else None
        context, key = _self_attention(self.attention.attention, hidden_norm, size, tokens.attn_impl)
        hidden_states = self.attention.output(context, hidden_norm) + hidden_states

        r = tokens.r[self._tome_layer]
        if r > 0:
            hidden_states = tokens.merge(hidden_states, key.mean(1), r, self._tome_layer)

        layer_output = self.intermediate(self.layernorm_after(hidden_states))
        return self.output(layer_output, hidden_states)


class _ToMeYolosEncoder:
    """``YolosEncoder`` whose layers merge tokens; mid-position embeddings follow the merged tokens."""

    def forward(self, hidden_states: torch.Tensor, height: int, width: int):
        from transformers.modeling_outputs import BaseModelOutput

        info = self._tome_info
        num_layers = len(self.layer)
        mid = None
        if self.config.use_mid_position_embeddings:
            mid = self.interpolation((height, width)).to(hidden_states.device)
        tokens = _Tokens(info, num_layers, mid, self.config.num_detection_tokens)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and any(tokens.r):
            raise NotImplementedError("tome: gradient checkpointing would recompute the layers with the last "
                                      "layer's token state; call model.activation_checkpointing_disable()")

        for index, layer_module in enumerate(self.layer):
            hidden_states = layer_module(hidden_states, tome_tokens=tokens)
            if mid is not None and index < num_layers - 1:
                hidden_states = hidden_states + tokens.mid_embedding(index)

        info["size"] = None if tokens.size is None else tokens.to_output_order(tokens.size)
        if tokens.trace_source:
            source = tokens.source
            if source is None:
                batch, num_tokens = hidden_states.shape[:2]
                eye = torch.eye(num_tokens, dtype=hidden_states.dtype, device=hidden_states.device)
                source = eye.expand(batch, -1, -1)
            info["source"] = tokens.to_output_order(source)
        return BaseModelOutput(last_hidden_state=tokens.to_output_order(hidden_states))


class _ToMeYolosModel:
    """The patched top-level model: ``model.r`` sets the merges per layer."""

    @property
    def r(self):
        """Merges per layer: an int, an ``(r, inflection)`` schedule or a per-layer list (see ``parse_r``)."""
        return self._tome_info["r"]

    @r.setter
    def r(self, value) -> None:
        parse_r(value, self._tome_num_layers)  # reject bad values here, not in the next forward
        self._tome_info["r"] = list(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------------------------------
# Patching
# ----------------------------------------------------------------------------------------------------
_PATCHED_CLASSES: dict[tuple[type, type], type] = {}


def _patched_class(cls: type, mixin: type, keep_name: bool = False) -> type:
    if getattr(cls, "_tome_original_class", None) is not None:
        return cls  # already patched
    key = (cls, mixin)
    if key not in _PATCHED_CLASSES:
        name = cls.__name__ if keep_name else f"ToMe{cls.__name__}"
        _PATCHED_CLASSES[key] = type(name, (mixin, cls), {"_tome_original_class": cls, "__module__": __name__})
    return _PATCHED_CLASSES[key]


def _original(obj) -> type:
    return getattr(type(obj), "_tome_original_class", None) or type(obj)


def _check_forward(module: nn.Module, expected: type, what: str) -> None:
    """``module`` is an ``expected`` whose forward is transformers' own (the patch replaces that forward)."""
    cls = _original(module)
    known = inspect.unwrap(expected.forward)  # transformers wraps layer forwards for checkpointing
    if not isinstance(module, expected) or inspect.unwrap(cls.forward) is not known:
        raise TypeError(f"tome_kernels.patch.hf_yolos: {what} is {cls.__module__}.{cls.__qualname__}; only "
                        f"{expected.__qualname__} with transformers' forward is supported")


def _yolos_model(model: nn.Module) -> nn.Module:
    from transformers.models.yolos import modeling_yolos as my

    if isinstance(model, my.YolosForObjectDetection):
        _check_forward(model, my.YolosForObjectDetection, "the model")
        yolos = model.vit
    elif isinstance(model, my.YolosModel):
        yolos = model
    else:
        cls = _original(model)
        raise TypeError(f"tome_kernels.patch.hf_yolos supports transformers' YolosForObjectDetection and "
                        f"YolosModel, got {cls.__module__}.{cls.__qualname__}")
    _check_forward(yolos, my.YolosModel, "the YOLOS model")
    _check_forward(yolos.encoder, my.YolosEncoder, "the encoder")
    for index, layer in enumerate(yolos.encoder.layer):
        _check_forward(layer, my.YolosLayer, f"layer {index}")
        _check_forward(layer.attention, my.YolosAttention, f"layer {index}'s attention")
        _check_forward(layer.attention.attention, my.YolosSelfAttention, f"layer {index}'s self-attention")
    return yolos


def apply_patch(model: nn.Module, trace_source: bool = False, prop_attn: bool = True, pos_mode: str = "keep", *,
                attn_impl: str = "auto") -> nn.Module:
    """Make ``model`` (``YolosForObjectDetection`` or ``YolosModel``) a ToMe model in place and return it.

    ``model.r`` (0 unless the model was patched before) sets the merges per encoder layer. ``trace_source``:
    keep ``model._tome_info["source"]``. ``prop_attn``: proportional attention. ``pos_mode``: how merged
    tokens' mid-position embeddings combine, ``"keep"`` or ``"mean"``. ``attn_impl``: ``"op"``,
    ``"sdpa"`` or ``"auto"`` (see ``tome_kernels.patch._common.resolve_attn_impl``). Patching a patched model
    updates the flags.
    """
    if pos_mode not in POS_MODES:
        raise ValueError(f"tome: pos_mode must be one of {POS_MODES}, got {pos_mode!r}")
    yolos = _yolos_model(model)
    previous = getattr(model, "_tome_info", None)
    info = {
        "r": 0 if previous is None else previous["r"], "size": None, "source": None,
        "trace_source": bool(trace_source), "prop_attn": bool(prop_attn), "pos_mode": pos_mode,
        "attn_impl": resolve_attn_impl(attn_impl, model),
        "num_protected": 1 + yolos.config.num_detection_tokens,
    }
    model.__class__ = _patched_class(type(model), _ToMeYolosModel, keep_name=True)
    model._tome_info = info
    model._tome_num_layers = len(yolos.encoder.layer)
    yolos.encoder.__class__ = _patched_class(type(yolos.encoder), _ToMeYolosEncoder)
    yolos.encoder._tome_info = info
    for index, layer in enumerate(yolos.encoder.layer):
        layer.__class__ = _patched_class(type(layer), _ToMeYolosLayer)
        layer._tome_layer = index
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_patch` in place (classes and ToMe attributes) and return ``model``."""
    for module in model.modules():
        original = getattr(type(module), "_tome_original_class", None)
        if original is not None:
            module.__class__ = original
        for name in ("_tome_info", "_tome_layer", "_tome_num_layers"):
            module.__dict__.pop(name, None)
    return model
