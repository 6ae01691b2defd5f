"""ToMe for transformers' YOLOS (``YolosForObjectDetection`` / ``YolosModel``, transformers 5.x), per instance.

``tome_kernels.patch.yolos(model, r=300)`` (or ``tome_kernels.patch.apply_patch(model, r=300)``) patches one
model in place; ``model.r`` can change between calls (int, ``(r, inflection)`` or a per-layer list).

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

Attention: transformers' own path (its ``_attn_implementation``) until the first merge (its module itself in
layers that do not merge, so r = 0 also returns its ``output_attentions``); afterwards, with ``prop_attn``,
``softmax(q kᵀ · scale + log size) v`` through ``torch.ops.tome.prop_attention`` or SDPA with a ``log size``
float bias (``attn_impl``); without ``prop_attn`` transformers' attention function throughout.

YOLOS takes no pixel mask (padded batches are plain images to it), so merging needs no padding rule.
The state of one forward is local to that call; afterwards ``model._tome_info`` holds ``size`` ([B, N, 1],
tokens per output token, None when nothing merged) and, with ``trace_source``, ``source`` ([B, N, N0]: which
input tokens each output token holds), both in the model's output order. Not supported while merging:
gradient checkpointing, ``output_attentions`` (layers that merge, and all after the first merge, record no
attention map); ``output_hidden_states`` gives per-layer states of shrinking length (after the first merge in
the ``[class ; detection ; patches]`` order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import tome_kernels  # noqa: F401  (registers torch.ops.tome)

from . import _toolkit as tk

__all__ = ["yolos"]

FAMILY = "yolos"
POS_MODES = ("keep", "mean")
# The transformers methods this file renders itself (transformers 5.23; see tk.check_forward).
KNOWN_CODE = {
    "YolosEncoder.forward": {"4ea87d26608164dc"},
    "YolosLayer.forward": {"7cc0e9764148bf63"},
    "YolosAttention.forward": {"5da702561b09e836"},
    "YolosSelfAttention.forward": {"9215ef6fe470d295"},
}


# ----------------------------------------------------------------------------------------------------
# One forward's token state
# ----------------------------------------------------------------------------------------------------
class _Tokens:
    """The encoder tokens' order and carried positions during one forward (sizes and source map: in ``call``).

    ``pos`` is None until the first merge; then ``[B, N, 1]`` original positions (``"keep"``) or ``[B, N,
    k·C]`` the mid-position embeddings of the k layers still to come (``"mean"``).
    """

    def __init__(self, call: tk.Call, mid: torch.Tensor | None, num_detection: int):
        self.call = call
        self.r = call.r
        self.pos_mode = call.config["pos_mode"]
        self.mid = mid  # [layers - 1, 1, N0, C] or None
        self.num_detection = num_detection
        self.pos = None
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
        if self.call.config["trace_source"]:
            self.call.source = tk.source_or_identity(None, x).index_select(1, order)
        self.reordered = True
        return x.index_select(1, order), metric.index_select(1, order)

    def merge(self, x: torch.Tensor, metric: torch.Tensor, r: int, layer: int) -> torch.Tensor:
        if not self.reordered:
            x, metric = self._to_merge_order(x, metric, layer)
        pos = self.pos if self.pos is not None and self.pos.shape[-1] > 0 else None
        x, pos = tk.merge_tokens(self.call, x, metric, r, 1 + self.num_detection, pos, self.pos_mode)
        if pos is not None:
            self.pos = pos
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
        context = tk.attention(query, key, value, size, module.scaling, attn_impl, dropout).transpose(1, 2)
    return context.reshape(batch, num_tokens, module.all_head_size), key


# ----------------------------------------------------------------------------------------------------
# ToMe subclasses (mixins put in front of the original class)
# ----------------------------------------------------------------------------------------------------
class _ToMeYolosLayer:
    """``YolosLayer`` with a ToMe step between attention and MLP."""

    def forward(self, hidden_states: torch.Tensor, tome_tokens: _Tokens | None = None, **kwargs):
        tokens = tome_tokens
        if tokens is None:  # run on its own, outside its encoder: nothing merged, nothing to merge
            return super().forward(hidden_states, **kwargs)
        config = tokens.call.config
        hidden_norm = self.layernorm_before(hidden_states)
        size = tokens.call.size if config["prop_attn"] else None
        r = tokens.r[self._tome_layer]
        if r == 0 and size is None:  # no metric needed: transformers' module itself (output_attentions works)
            hidden_states = self.attention(hidden_norm) + hidden_states
        else:
            context, key = _self_attention(self.attention.attention, hidden_norm, size, config["attn_impl"])
            hidden_states = self.attention.output(context, hidden_norm) + hidden_states
        if r > 0:
            hidden_states = tokens.merge(hidden_states, key.mean(1), r, self._tome_layer)

        layer_output = self.intermediate(self.layernorm_after(hidden_states))
        return self.output(layer_output, hidden_states)


class _ToMeYolosEncoder:
    """``YolosEncoder`` whose layers merge tokens; mid-position embeddings follow the merged tokens."""

    def forward(self, hidden_states: torch.Tensor, height: int, width: int):
        from transformers.modeling_outputs import BaseModelOutput

        call = tk.current_call()
        if call is None:  # run on its own, outside its model's forward
            return super().forward(hidden_states, height, width)
        num_layers = len(self.layer)
        mid = None
        if self.config.use_mid_position_embeddings:
            mid = self.interpolation((height, width)).to(hidden_states.device)
        tokens = _Tokens(call, mid, self.config.num_detection_tokens)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and any(tokens.r):
            raise NotImplementedError("tome: gradient checkpointing would recompute the layers with the last "
                                      "layer's token state; call model.activation_checkpointing_disable()")

        for index, layer_module in enumerate(self.layer):
            hidden_states = layer_module(hidden_states, tome_tokens=tokens)
            if mid is not None and index < num_layers - 1:
                hidden_states = hidden_states + tokens.mid_embedding(index)

        if call.size is not None:
            call.size = tokens.to_output_order(call.size)
        if call.config["trace_source"]:
            call.source = tokens.to_output_order(tk.source_or_identity(call.source, hidden_states))
        return BaseModelOutput(last_hidden_state=tokens.to_output_order(hidden_states))


def _yolos_model(model: nn.Module) -> nn.Module:
    """The ``YolosModel`` of ``model`` (itself, or the detector's ``vit``)."""
    return model.vit if hasattr(model, "class_labels_classifier") else model


class _ToMeYolos(tk.KeepsOutputCapture):
    """The patched top-level model: ``model.r`` sets the merges per encoder layer; each forward is one call."""

    _tome_keep_name = True  # save_pretrained writes the class name as the architecture

    r = tk.r_property(lambda model: len(_yolos_model(model).encoder.layer))

    def _tome_start(self) -> tk.Call:
        return tk.Call(self._tome_info, r=tk.parse_r(self._tome_r, len(_yolos_model(self).encoder.layer)),
                       size=None, source=None)

    def _tome_finish(self, call: tk.Call) -> None:
        self._tome_info.update(r=call.r, size=call.size, source=call.source)

    def forward(self, *args, **kwargs):
        return tk.run_call(self, self._tome_start, super().forward, args, kwargs, self._tome_finish)


# ----------------------------------------------------------------------------------------------------
# Patching
# ----------------------------------------------------------------------------------------------------
def _check_supported(model: nn.Module) -> nn.Module:
    from transformers.models.yolos import modeling_yolos as my

    if not isinstance(model, (my.YolosForObjectDetection, my.YolosModel)):
        raise TypeError(f"tome_kernels.patch.{FAMILY}: got {tk.class_path(tk.original_class(model))}; supported: "
                        f"transformers YolosForObjectDetection, YolosModel")
    yolos = _yolos_model(model)
    tk.check_forward(yolos.encoder, my.YolosEncoder, "forward", FAMILY, KNOWN_CODE, where="the encoder")
    for index, layer in enumerate(yolos.encoder.layer):
        tk.check_forward(layer, my.YolosLayer, "forward", FAMILY, KNOWN_CODE, where=f"layer {index}")
        tk.check_forward(layer.attention, my.YolosAttention, "forward", FAMILY, KNOWN_CODE,
                         where=f"layer {index}'s attention")
        tk.check_forward(layer.attention.attention, my.YolosSelfAttention, "forward", FAMILY, KNOWN_CODE,
                         where=f"layer {index}'s self-attention")
    return yolos


@tk.register_family(FAMILY, ("transformers.models.yolos.modeling_yolos.YolosForObjectDetection",
                             "transformers.models.yolos.modeling_yolos.YolosModel"),
                    "transformers YolosForObjectDetection, YolosModel")
def yolos(model: nn.Module, r=None, *, trace_source: bool = False, prop_attn: bool = True, pos_mode: str = "keep",
          attn_impl: str = "auto") -> nn.Module:
    """Make ``model`` (``YolosForObjectDetection`` or ``YolosModel``) a ToMe model in place and return it.

    ``r``: merges per encoder layer (see :func:`tome_kernels.patch.parse_r`; also ``model.r = ...`` later);
    None keeps the current value of a patched model, else 0. ``trace_source``: keep
    ``model._tome_info["source"]``. ``prop_attn``: proportional attention. ``pos_mode``: how merged tokens'
    mid-position embeddings combine, ``"keep"`` or ``"mean"``. ``attn_impl``: ``"op"``, ``"sdpa"`` or
    ``"auto"`` (see ``tome_kernels.patch.timm``). Patching a patched model updates the flags.
    """
    if pos_mode not in POS_MODES:
        raise ValueError(f"tome: pos_mode must be one of {POS_MODES}, got {pos_mode!r}")
    encoder = _check_supported(model).encoder
    if r is None:
        r = model.r if getattr(model, "_tome_info", None) is not None else 0
    tk.swap_class(model, _ToMeYolos)
    tk.keep_output_capture(model)
    model._tome_info = {
        "r": [], "size": None, "source": None,
        "trace_source": bool(trace_source), "prop_attn": bool(prop_attn), "pos_mode": pos_mode,
        "attn_impl": tk.resolve_attn_impl(attn_impl, model),
        "num_protected": 1 + encoder.config.num_detection_tokens,
    }
    model.r = r
    tk.swap_class(encoder, _ToMeYolosEncoder)
    for index, layer in enumerate(encoder.layer):
        tk.swap_class(layer, _ToMeYolosLayer)
        layer._tome_layer = index
    return model
