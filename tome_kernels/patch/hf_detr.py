"""ToMe for transformers' DETR (``DetrForObjectDetection`` / ``DetrModel``, transformers 5.x), per instance.

``tome_kernels.patch.detr(model, er=0, mr=0, dr=0, prop_attn=True, pos_mode="keep")`` patches one model in
place; ``model.er`` / ``model.mr`` / ``model.dr`` can be changed between calls. Nothing in transformers is
modified: the classes of this model, its DetrModel and its encoder / decoder layers are swapped for ToMe
subclasses (``_toolkit.swap_class``), and a forward pre-hook on the instance's encoder and decoder picks up
the flattened pixel mask and positional embeddings that ``DetrModel.forward`` computes. The state of one
forward (tokens, sizes, merges made) is a per-call object made by the outermost patched forward
(``_toolkit.run_call``), so threads can share one patched model; an encoder or decoder run on its own runs
transformers' code. ``tome_kernels.patch.unpatch(model)`` reverts the patch.

Where tokens merge (all with ``torch.ops.tome.bipartite_merge``, protected = 0)::

    encoder layer (post-norm), er per layer:
        x = self_attn_layer_norm(x + attn(x, pos, log size))     # metric = keys (x + pos) averaged over heads
        x, pos, size = bipartite_merge(x, pos, size, er, metric)
        x = final_layer_norm(x + mlp(x))
    memory, once before the decoder, mr:  metric = the encoder output itself
    decoder layer, dr per layer, after cross-attention (+ its norm) and before the FFN: metric = the queries;
        the queries' positional embeddings (object queries) merge with them.

Positional embeddings follow their tokens: ``pos_mode="keep"`` gives a merged token its B destination's
embedding, ``"mean"`` the size-weighted mean. With ``prop_attn`` every later self-attention and the decoder's
cross-attention add ``log size`` of the keys to their logits (``torch.ops.tome.prop_attention``).

Padding (``pixel_mask``): a token's padding flag rides along as an extra channel of ``pos``, so it follows
every merge (in "keep" mode exactly; in "mean" mode groups are all-padding or all-real, so the mean is 0 or
1). Merge metrics get two extra channels: real tokens are ``(m/|m|, 2, 0)``, padding ``(0, 0, 1)``. After the
op's L2 normalisation pad-pad similarity is 1 (the maximum, so padding merges first: it is free), pad-real
similarity is exactly 0 and real-real similarity is ``(cos + 4) / 5 >= 0.6``, a monotone map of the plain
cosine, so real tokens rank as without padding. A padded and a real token can then only meet if r exceeds
the number of A tokens that have a B partner of their own kind; r is clamped to that per batch (one host
sync per merge, only for padded batches), so a real token never merges with padding. Sizes stay token
counts (>= 1, so all-padding groups average finitely); the key mask is ``size * real`` handed to
``prop_attention`` (size 0 -> log 0 = -inf), rebuilt at the new length every layer.

Decoder output: with dr > 0 there are fewer predictions, ``num_queries - sum(decoder_r)``, one per merged
query (``model._tome_info["query_size"]`` counts the original queries in each, ``"query_source"`` maps them
with ``trace_source``). DETR is a set predictor without NMS: unmerging would copy a merged query's box and
score to all of its members, i.e. emit exact duplicate detections, so we return the merged set instead.

After each forward (with threads: the one that finished last), ``model._tome_info`` holds ``encoder_r`` /
``memory_r`` / ``decoder_r`` (merges made; r is clamped to half the tokens and, for padded batches, as above),
``memory_size``, ``memory_mask`` ([B, Nm] bool, None without padding), ``query_size``, and with
``trace_source`` ``source`` ([B, Nm, N0]: the flattened feature-map tokens each memory token holds),
``query_source`` ([B, Nq', num_queries]) and ``token_mask`` ([B, N0] bool, real tokens; None without padding).

Attention in the patched layers runs as ``torch.ops.tome.prop_attention`` or, with ``attn_impl="sdpa"``
(the ``"auto"`` choice where no compiled tome backend serves the device), as PyTorch's SDPA with the same
``log size`` float bias (-inf for padding keys).

er = mr = dr = 0 runs transformers' own code unchanged (bit-identical outputs). Not supported while
merging: ``output_attentions``, gradient checkpointing, ``auxiliary_loss`` with dr > 0,
``DetrForSegmentation`` (its mask head needs the full feature map).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

import tome_kernels  # noqa: F401  (registers torch.ops.tome)

from . import _toolkit as tk
from ._toolkit import merge_count

__all__ = ["detr"]

# Real tokens' constant metric channel: real-real similarity >= (a^2 - 1) / (a^2 + 1) = 0.6 > 0 = pad-real.
_REAL_CHANNEL = 2.0
FAMILY = "detr"
# The transformers methods this file renders itself (transformers 5.23; see tk.check_forward).
KNOWN_CODE = {
    "DetrEncoderLayer.forward": {"71552d2c69311edb"},
    "DetrDecoderLayer.forward": {"ceed5f131936c3f4"},
}


# ----------------------------------------------------------------------------------------------------
# Token state: one sequence being merged (encoder tokens -> memory, or decoder queries)
# ----------------------------------------------------------------------------------------------------
class _Tokens:
    """Positions (+ padding flag as the last channel when padded), sizes, padding flags, source map."""

    def __init__(self, num_tokens: int, pos, real, dtype, trace: bool, batch: int, device):
        self.num_pos = None if pos is None else pos.shape[-1]
        if real is not None and bool(real.all()):  # one host sync per forward: is there padding at all?
            real = None
        if real is not None:
            flag = real.to(pos.dtype if pos is not None else dtype).unsqueeze(-1)
            pos = flag if pos is None else torch.cat([pos, flag], dim=-1)
        self.pos = pos
        self.real = real          # [B, N] bool, None = no padding
        self.size = None          # [B, N, 1] original tokens per token, None = all ones
        self.source = (torch.eye(num_tokens, dtype=torch.float32, device=device).expand(batch, -1, -1)
                       if trace else None)
        self.initial_real = real
        self.output = None        # the encoder output these tokens describe (identity check in the decoder)

    @property
    def pos_embed(self):
        if self.num_pos is None:
            return None
        return self.pos if self.real is None else self.pos[..., :self.num_pos]

    def attn_size(self, prop_attn: bool):
        """The ``size`` argument of prop_attention: log size bias and/or 0 for padding keys (-inf)."""
        size = self.size.detach() if (prop_attn and self.size is not None) else None
        if self.real is not None:
            real = self.real.unsqueeze(-1).to(self.pos.dtype)
            size = real if size is None else size * real
        return size


def _pad_safe_r(real: torch.Tensor, r: int, windows: torch.Tensor | None = None) -> int:
    """Largest r <= ``r`` for which every merging A token has a B token of its own kind (real or padding)
    in every batch row (in its window of ``windows``, a ``tome.window_match`` table, when given): the top-r A
    tokens then never pick a partner of the other kind (score 0). One host sync."""
    kinds = real[:, None] if windows is None else real[:, windows]  # [B, windows, window tokens]
    a, b = kinds[..., 0::2], kinds[..., 1::2]
    same_kind = torch.where(a, b.any(-1, keepdim=True), (~b).any(-1, keepdim=True))
    return min(r, int(same_kind.sum((1, 2)).min()))


def _padding_metric(metric: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Real tokens -> (m/|m|, 2, 0), padding -> (0, 0, 1): see the module docstring."""
    flag = real.unsqueeze(-1).to(metric.dtype)
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cat([unit * flag, _REAL_CHANNEL * flag, 1.0 - flag], dim=-1)


def _merge(x: torch.Tensor, tokens: _Tokens, r: int, metric: torch.Tensor, pos_mode: str):
    """Merge r tokens of ``x`` (and of ``tokens``' pos / size / flags / source). Returns (x, merges made)."""
    if tokens.real is not None:
        r = _pad_safe_r(tokens.real, r) if r > 0 else 0
        metric = _padding_metric(metric, tokens.real)
    if r <= 0:
        return x, 0
    x, pos, size, unm_idx, src_idx, dst_idx = torch.ops.tome.bipartite_merge(
        x, tokens.pos, tokens.size, r, metric, 0, pos_mode)
    if tokens.pos is not None:
        tokens.pos = pos
    tokens.size = size
    if tokens.real is not None:
        tokens.real = pos[..., -1] > 0.5
    if tokens.source is not None:
        tokens.source = torch.ops.tome.merge_source(tokens.source, unm_idx, src_idx, dst_idx, 0)
    return x, src_idx.shape[1]


def _attention(attn: nn.Module, hidden: torch.Tensor, query_pos, memory: torch.Tensor, key_pos, size,
               attn_impl: str):
    """DETR attention (position added to queries and keys, not values), proportional: ``size`` as from
    :meth:`_Tokens.attn_size`. Returns (output after o_proj, keys [B, H, Nk, D])."""
    batch, num_q, _ = hidden.shape
    num_k = memory.shape[1]
    query_in = hidden if query_pos is None else hidden + query_pos
    if memory is hidden and key_pos is query_pos:
        key_in = query_in
    else:
        key_in = memory if key_pos is None else memory + key_pos
    q = attn.q_proj(query_in).view(batch, num_q, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(key_in).view(batch, num_k, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(memory).view(batch, num_k, -1, attn.head_dim).transpose(1, 2)
    dropout = attn.attention_dropout if attn.training else 0.0
    # size 0 (log 0 = -inf) masks padding keys; every row keeps a real key.
    out = tk.attention(q, k, v, size, float(attn.scaling), attn_impl, dropout)
    out = out.transpose(1, 2).reshape(batch, num_q, -1)
    return attn.o_proj(out), k


# ----------------------------------------------------------------------------------------------------
# Activity and checks
# ----------------------------------------------------------------------------------------------------
def _encoder_active(info) -> bool:
    return info["er"] > 0 or info["_force"]


def _decoder_active(info) -> bool:
    return info["er"] > 0 or info["mr"] > 0 or info["dr"] > 0 or info["_force"]


def _check_call_options(module, info, kwargs) -> None:
    if not _decoder_active(info):
        return
    config = module.config
    name = "tome_kernels.patch.detr"
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        raise NotImplementedError(f"{name}: output_attentions is not available while merging (er/mr/dr > 0): "
                                  "prop_attention does not return attention weights; set er = mr = dr = 0")
    if module.training and any(getattr(m, "gradient_checkpointing", False) for m in module.modules()):
        raise NotImplementedError(f"{name}: gradient checkpointing re-runs layers whose merges update shared "
                                  "state; disable it while merging")
    if info["dr"] > 0 and config.auxiliary_loss:
        raise NotImplementedError(f"{name}: auxiliary_loss stacks every decoder layer's queries, which have "
                                  "different lengths when dr > 0; set dr = 0 or auxiliary_loss = False")


@functools.lru_cache(maxsize=None)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _bind(module: nn.Module, args, kwargs) -> dict:
    """The call's arguments by name (the original forward's signature), var-keyword ones merged in."""
    signature = _signature(type(module))
    bound = signature.bind(module, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(signature.parameters)))  # self
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def _initial_tokens(x: torch.Tensor, mask, pos, trace: bool) -> _Tokens:
    batch, num_tokens = x.shape[:2]
    if pos is not None and pos.shape[:2] != (batch, num_tokens):
        raise ValueError(f"tome_kernels.patch.detr: positional embeddings {tuple(pos.shape)} do not match the "
                         f"{num_tokens} tokens of shape {tuple(x.shape)}")
    real = None
    if mask is not None:
        if mask.dim() != 2 or tuple(mask.shape) != (batch, num_tokens):
            raise ValueError(f"tome_kernels.patch.detr: expected a [batch, tokens] = [{batch}, {num_tokens}] mask, "
                             f"got shape {tuple(mask.shape)}")
        real = mask.to(device=x.device, dtype=torch.bool)
    return _Tokens(num_tokens, pos, real, x.dtype, trace, batch, x.device)


# ----------------------------------------------------------------------------------------------------
# Hooks on the encoder / decoder instances. They act inside a patched model's forward only (its Call);
# an encoder or decoder run on its own runs transformers' code.
# ----------------------------------------------------------------------------------------------------
def _detr_call():
    """The Call of the DETR forward running in this thread, or None."""
    call = tk.current_call()
    return call if call is not None and call.mixin is _ToMeDetr else None


def _padding_mask(call: tk.Call, mask):
    """The mask of padded tokens, or None when the forward was given no pixel_mask (tk.pixel_mask_given)."""
    return mask if call.pixel_mask_given else None


def _encoder_pre_hook(module, args, kwargs):
    call = _detr_call()
    if call is None or not _encoder_active(call.config):
        return None
    info = call.config
    arguments = _bind(module, args, kwargs)
    x = arguments.get("inputs_embeds")
    call.enc = _initial_tokens(x, _padding_mask(call, arguments.get("attention_mask")),
                               arguments.get("spatial_position_embeddings"), info["trace_source"])
    call.encoder_r = []
    return None


def _encoder_hook(module, args, kwargs, output):
    call = _detr_call()
    if call is not None and call.enc is not None and _encoder_active(call.config):
        call.enc.output = output[0]
    return None


def _decoder_pre_hook(module, args, kwargs):
    call = _detr_call()
    if call is None or not _decoder_active(call.config):
        return None
    info = call.config
    arguments = _bind(module, args, kwargs)
    memory = arguments.get("encoder_hidden_states")
    queries = arguments.get("inputs_embeds")
    if memory is not None:
        tokens = call.enc if (call.enc is not None and call.enc.output is memory) else None
        if tokens is None:  # memory from elsewhere (e.g. encoder_outputs=...): must still be full length
            tokens = _initial_tokens(memory, _padding_mask(call, arguments.get("encoder_attention_mask")),
                                     arguments.get("spatial_position_embeddings"), info["trace_source"])
        memory, call.memory_r = _merge(memory, tokens, info["mr"], memory, info["pos_mode"])
        call.mem = tokens
        arguments["encoder_hidden_states"] = memory
        arguments["spatial_position_embeddings"] = tokens.pos_embed
        arguments["encoder_attention_mask"] = None  # the layers mask through call.mem (size 0 = padding)
    call.dec = _initial_tokens(queries, arguments.get("attention_mask"),
                               arguments.get("object_queries_position_embeddings"), info["trace_source"])
    call.decoder_r = []
    arguments["attention_mask"] = None
    return (), arguments





# ----------------------------------------------------------------------------------------------------
# ToMe subclasses (mixins; the concrete classes are made per original class by tk.swap_class)
# ----------------------------------------------------------------------------------------------------
class _ToMeEncoderLayer:
    def forward(self, hidden_states, attention_mask=None, spatial_position_embeddings=None, **kwargs):
        call = _detr_call()
        if call is None or not _encoder_active(call.config) or call.enc is None:
            return super().forward(hidden_states, attention_mask, spatial_position_embeddings, **kwargs)
        info, tokens = call.config, call.enc
        if tokens.pos is not None and tokens.pos.shape[1] != hidden_states.shape[1]:
            raise RuntimeError(f"tome_kernels.patch.detr: encoder layer got {hidden_states.shape[1]} tokens, "
                               f"the merge state has {tokens.pos.shape[1]}")
        pos = tokens.pos_embed
        residual = hidden_states
        hidden_states, keys = _attention(self.self_attn, hidden_states, pos, hidden_states, pos,
                                         tokens.attn_size(info["prop_attn"]), info["attn_impl"])
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.self_attn_layer_norm(residual + hidden_states)

        hidden_states, merged = _merge(hidden_states, tokens, info["er"], keys.mean(1), info["pos_mode"])
        call.encoder_r.append(merged)

        residual = hidden_states
        hidden_states = self.final_layer_norm(residual + self.mlp(hidden_states))
        if self.training and not torch.isfinite(hidden_states).all():
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states


class _ToMeDecoderLayer:
    def forward(self, hidden_states, attention_mask=None, spatial_position_embeddings=None,
                object_queries_position_embeddings=None, encoder_hidden_states=None, encoder_attention_mask=None,
                **kwargs):
        call = _detr_call()
        if call is None or not _decoder_active(call.config) or call.dec is None:
            return super().forward(hidden_states, attention_mask, spatial_position_embeddings,
                                   object_queries_position_embeddings, encoder_hidden_states,
                                   encoder_attention_mask=encoder_attention_mask, **kwargs)
        info, queries = call.config, call.dec
        prop_attn = info["prop_attn"]
        query_pos = queries.pos_embed
        residual = hidden_states
        hidden_states, _ = _attention(self.self_attn, hidden_states, query_pos, hidden_states, query_pos,
                                      queries.attn_size(prop_attn), info["attn_impl"])
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.self_attn_layer_norm(residual + hidden_states)

        if encoder_hidden_states is not None:
            memory = call.mem
            residual = hidden_states
            hidden_states, _ = _attention(self.encoder_attn, hidden_states, query_pos, encoder_hidden_states,
                                          memory.pos_embed, memory.attn_size(prop_attn), info["attn_impl"])
            hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
            hidden_states = self.encoder_attn_layer_norm(residual + hidden_states)

        hidden_states, merged = _merge(hidden_states, queries, info["dr"], hidden_states, info["pos_mode"])
        call.decoder_r.append(merged)

        residual = hidden_states
        return self.final_layer_norm(residual + self.mlp(hidden_states))


def _merge_count_property(name: str):
    def getter(self):
        return self._tome_info[name]

    def setter(self, value):
        self._tome_info[name] = merge_count(value, name)

    return property(getter, setter, doc=f"ToMe merges: {name} (see tome_kernels.patch.detr)")


class _ToMeDetr:
    """Top-level model (DetrForObjectDetection or DetrModel): er / mr / dr, one state per forward."""

    _tome_keep_name = True  # save_pretrained writes the class name as the architecture

    er = _merge_count_property("er")
    mr = _merge_count_property("mr")
    dr = _merge_count_property("dr")

    def forward(self, *args, **kwargs):
        return tk.run_call(self, functools.partial(_start, self, args, kwargs), super().forward, args, kwargs,
                           _finish)


def _start(model: nn.Module, args: tuple, kwargs: dict) -> tk.Call:
    info = dict(model._tome_info)  # this forward's settings, whatever another thread sets meanwhile
    _check_call_options(model, info, kwargs)
    return tk.Call(info, enc=None, mem=None, dec=None, encoder_r=[], decoder_r=[], memory_r=0,
                   published=model._tome_info, pixel_mask_given=tk.pixel_mask_given(args, kwargs))


def _finish(call: tk.Call) -> None:
    memory, queries = call.mem, call.dec
    call.published.update(
        encoder_r=list(call.encoder_r), memory_r=call.memory_r, decoder_r=list(call.decoder_r),
        memory_size=None if memory is None else memory.size, memory_mask=None if memory is None else memory.real,
        query_size=None if queries is None else queries.size, source=None if memory is None else memory.source,
        query_source=None if queries is None else queries.source,
        token_mask=None if memory is None else memory.initial_real)


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------
def _check_supported(md, model) -> nn.Module:
    """Return the DetrModel inside ``model`` or raise a clear TypeError."""
    if isinstance(model, md.DetrForObjectDetection):
        detr_model = model.model
    elif isinstance(model, md.DetrModel):
        detr_model = model
    elif isinstance(model, md.DetrForSegmentation):
        raise TypeError("tome_kernels.patch.detr: DetrForSegmentation is not supported (its mask head reads the "
                        "encoder memory as a full feature map); patch DetrForObjectDetection or DetrModel")
    else:
        raise TypeError(f"tome_kernels.patch.detr supports transformers DetrForObjectDetection and DetrModel, got "
                        f"{tk.class_path(tk.original_class(model))}")
    tk.check_forward(detr_model.encoder, md.DetrEncoder, (), FAMILY, KNOWN_CODE)  # hooked, not replaced
    tk.check_forward(detr_model.decoder, md.DetrDecoder, (), FAMILY, KNOWN_CODE)
    for index, layer in enumerate(detr_model.encoder.layers):
        tk.check_forward(layer, md.DetrEncoderLayer, "forward", FAMILY, KNOWN_CODE, where=f"encoder layer {index}")
    for index, layer in enumerate(detr_model.decoder.layers):
        tk.check_forward(layer, md.DetrDecoderLayer, "forward", FAMILY, KNOWN_CODE, where=f"decoder layer {index}")
    return detr_model


@tk.register_family("detr", ("transformers.models.detr.modeling_detr.DetrForObjectDetection",
                             "transformers.models.detr.modeling_detr.DetrModel",
                             "transformers.models.detr.modeling_detr.DetrForSegmentation"),
                    "transformers DetrForObjectDetection, DetrModel (er / mr / dr instead of r)")
def detr(model: nn.Module, er: int = 0, mr: int = 0, dr: int = 0, prop_attn: bool = True, pos_mode: str = "keep",
         trace_source: bool = False, attn_impl: str = "auto", *, r: int = 0) -> nn.Module:
    """Make ``model`` (transformers ``DetrForObjectDetection`` or ``DetrModel``) a ToMe model in place.

    ``er``: encoder tokens merged per encoder layer; ``mr``: memory tokens merged once before the decoder;
    ``dr``: object queries merged per decoder layer (fewer predictions come out, see the module docstring).
    ``prop_attn``: proportional attention (``+ log size``); ``pos_mode``: ``"keep"`` or ``"mean"``;
    ``trace_source``: record which tokens / queries each merged one holds in ``model._tome_info``.
    ``attn_impl``: how the patched attention runs, ``"op"`` (``torch.ops.tome.prop_attention``), ``"sdpa"``
    (``F.scaled_dot_product_attention`` with a ``log size`` float bias: the same function) or ``"auto"``
    (``"op"`` where a compiled tome backend serves the model's device, else ``"sdpa"``); decided here.
    Attention dropout in training always takes the SDPA path. Patching a patched model updates its settings.
    ``r`` is there for :func:`tome_kernels.patch.apply_patch`: DETR has no single r, only 0 is accepted.
    Returns ``model``.
    """
    if merge_count(r, "r") != 0:
        raise ValueError("tome_kernels.patch.detr: DETR merges er (encoder), mr (memory) and dr (decoder) "
                         f"tokens, not one r; got r={r}")
    md = tk.transformers_modeling("detr", "detr")
    detr_model = _check_supported(md, model)
    if pos_mode not in ("keep", "mean"):
        raise ValueError(f"tome_kernels.patch.detr: pos_mode must be 'keep' or 'mean', got {pos_mode!r}")
    counts = {name: merge_count(value, name) for name, value in (("er", er), ("mr", mr), ("dr", dr))}
    info = getattr(model, "_tome_info", None)
    if info is None:
        info = {"_force": False}
    info.update(counts, prop_attn=bool(prop_attn), pos_mode=pos_mode, trace_source=bool(trace_source),
                attn_impl=tk.resolve_attn_impl(attn_impl, model))

    for top in {id(model): model, id(detr_model): detr_model}.values():
        tk.swap_class(top, _ToMeDetr)
        top._tome_info = info
    for layer in detr_model.encoder.layers:
        tk.swap_class(layer, _ToMeEncoderLayer)
    for layer in detr_model.decoder.layers:
        tk.swap_class(layer, _ToMeDecoderLayer)
    encoder, decoder = detr_model.encoder, detr_model.decoder
    # Registered once per instance; no handles kept (a deepcopy would share them with the original).
    tk.add_hook(encoder, _encoder_pre_hook, "forward_pre")
    tk.add_hook(encoder, _encoder_hook, "forward")
    tk.add_hook(decoder, _decoder_pre_hook, "forward_pre")
    return model


