"""DETR speed with and without ToMe: total, backbone, encoder and decoder time, and the Amdahl ceiling.

    python -m tome_kernels.bench_detr --model detr-resnet-50 --er 100 --mr 100 [--dr 0] [--batch 1] \\
        [--height 800 --width 1066] [--rounds 5] [--threads 2]
    python -m tome_kernels.bench_detr --model deformable-detr --ratio 0.5 [0.75 ...] [--plot speed.png]

Deformable DETR (``deformable-detr``: ResNet-50 stages 2-4 and one extra level, 6 + 6 layers, d_model 256) runs
unpatched, with ``tome_kernels.patch.deformable_detr`` at each ratio, and with a stand-in at the same query
counts (every k-th query runs the layer, its update copied to its neighbours: no matching, no averaging, the
speed limit of merging), all in one round-robin; ToMe's speed-up is also given as a share of the stand-in's.

Random weights (transformers ``DetrForObjectDetection`` with a transformers ResNet backbone, 6 + 6 layers,
d_model 256 for the ``detr-resnet-*`` names). One patched model runs in round-robin with er = mr = dr = 0
(transformers' own code, the baseline) and with the given merges, so that load from other processes hits
both alike; medians are reported. Per forward, hooks time the backbone (``model.model.backbone``), the
encoder and the decoder (the decoder's time includes the memory merge); "other" is the rest (input
projection, positional embeddings, heads).

The backbone does not change with ToMe, so the end-to-end speed-up is bounded by Amdahl's law: with
``p`` = the share of the baseline time outside encoder + decoder, even a free encoder + decoder gives at
most ``1 / p``. ``flop ceiling`` is the encoder + decoder FLOP ratio at the token counts merging leaves.

``bench_model`` dispatches ``--model detr-*`` here: :func:`matches` claims the name, :func:`main` takes the
same argv (``--model --batch --threads --rounds --warmup --backend``), :func:`bench` is the library call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Sequence

import torch
from torch import nn

import tome_kernels

# name -> (ResNetConfig kwargs, DetrConfig kwargs)
MODELS = {
    "detr-resnet-50": (dict(depths=[3, 4, 6, 3]), dict()),
    "detr-resnet-101": (dict(depths=[3, 4, 23, 3]), dict()),
    # A small model for tests and smoke runs.
    "detr-tiny": (dict(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic"),
                  dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=20)),
}


# name -> (ResNetConfig kwargs, DeformableDetrConfig kwargs): the backbone's last three stages feed the
# encoder (strides 8, 16, 32) and one more level comes from a stride-2 convolution.
DEFORMABLE_MODELS = {
    "deformable-detr": (dict(depths=[3, 4, 6, 3]), dict()),
    "deformable-detr-tiny": (dict(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1],
                                  layer_type="basic"),
                             dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                  num_queries=20)),
}


def matches(model_name: str) -> bool:
    return model_name in MODELS or model_name in DEFORMABLE_MODELS


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A random-weight ``DetrForObjectDetection`` or ``DeformableDetrForObjectDetection`` (eval mode); no
    download."""
    from transformers import (DeformableDetrConfig, DeformableDetrForObjectDetection, DetrConfig,
                              DetrForObjectDetection, ResNetConfig)

    if name in DEFORMABLE_MODELS:
        backbone_kwargs, detr_kwargs = DEFORMABLE_MODELS[name]
        config = DeformableDetrConfig(
            backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"], **backbone_kwargs),
            **detr_kwargs)
        torch.manual_seed(seed)
        return DeformableDetrForObjectDetection(config).eval()
    if name not in MODELS:
        raise ValueError(f"bench_detr: unknown model {name!r}; one of {sorted(MODELS) + sorted(DEFORMABLE_MODELS)}")
    backbone_kwargs, detr_kwargs = MODELS[name]
    config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                        backbone_config=ResNetConfig(out_features=["stage4"], **backbone_kwargs), **detr_kwargs)
    torch.manual_seed(seed)
    return DetrForObjectDetection(config).eval()


_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _Stopwatch:
    """Time of one module per forward, through hooks (the pre-hook first, before any other)."""

    def __init__(self, module: nn.Module, clock=time.perf_counter):
        self.clock = clock
        self.seconds = 0.0
        self._start = None
        self._handles = [module.register_forward_pre_hook(self._begin, prepend=True),
                         module.register_forward_hook(self._end)]

    def _begin(self, module, args):
        self._start = self.clock()

    def _end(self, module, args, output):
        self.seconds += self.clock() - self._start

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _linear_flops(*modules: nn.Module) -> int:
    return sum(2 * m.in_features * m.out_features for module in modules for m in module.modules()
               if isinstance(m, nn.Linear))


def encoder_decoder_flops(model: nn.Module, num_tokens: int, num_queries: int, encoder_r, memory_r: int,
                          decoder_r) -> float:
    """FLOPs of DETR's encoder + decoder (per image) at the token counts given by the merges made: per
    encoder layer attention at the tokens entering it and the FFN at those left after merging; the decoder
    with its memory after the memory merge, and its FFN after each query merge."""
    detr = model.model
    d_model = model.config.d_model
    total, n = 0.0, num_tokens
    for layer, r in zip(detr.encoder.layers, encoder_r):
        total += n * _linear_flops(layer.self_attn) + 4 * n * n * d_model
        n -= r
        total += n * _linear_flops(layer.mlp)
    memory, q = n - memory_r, num_queries
    for layer, r in zip(detr.decoder.layers, decoder_r):
        cross = layer.encoder_attn
        total += q * _linear_flops(layer.self_attn) + 4 * q * q * d_model
        total += q * _linear_flops(cross.q_proj, cross.o_proj) + memory * _linear_flops(cross.k_proj, cross.v_proj)
        total += 4 * q * memory * d_model
        q -= r
        total += q * _linear_flops(layer.mlp)
    return total


def _shape_info(net: nn.Module, out) -> dict:
    info = net._tome_info
    memory = out.encoder_last_hidden_state.shape[1]
    return dict(tokens=memory + sum(info.get("encoder_r") or [0]),
                memory_tokens=memory if info.get("memory_size") is None else info["memory_size"].shape[1],
                predictions=out.logits.shape[1], encoder_r=list(info.get("encoder_r") or []),
                memory_r=info.get("memory_r", 0), decoder_r=list(info.get("decoder_r") or []))


def _summary(rows: list[dict]) -> dict:
    """Medians per quantity over the same rounds (the parts need not add up exactly to the total), and
    under ``min`` the fastest: on a machine shared with other jobs, the least disturbed."""
    timing = {name: statistics.median(row[name] for row in rows) for name in rows[0]}
    timing["min"] = {name: min(row[name] for row in rows) for name in rows[0]}
    return timing


def _apply_detr(net, setting) -> None:
    net.er, net.mr, net.dr = setting


def _time_rounds(net, pixel_values, settings, watches, rounds, warmup, clock, apply=_apply_detr,
                 describe=_shape_info):
    """Round-robin over ``settings`` ({key: setting}, each made current by ``apply(net, setting)``); per key a
    list of per-forward timings, and ``describe(net, output)`` of its last forward."""
    samples, shapes = {key: [] for key in settings}, {}
    for round_index in range(warmup + rounds):
        for key, setting in settings.items():
            apply(net, setting)
            for watch in watches.values():
                watch.take()
            start = clock()
            out = net(pixel_values)
            total = clock() - start
            row = dict(total_s=total, **{f"{name}_s": watch.take() for name, watch in watches.items()})
            row["encoder_decoder_s"] = row["encoder_s"] + row["decoder_s"]
            row["other_s"] = total - row.get("backbone_s", 0.0) - row["encoder_decoder_s"]
            if round_index >= warmup:
                samples[key].append(row)
            shapes[key] = describe(net, out)
    return samples, shapes


def bench(model: str | nn.Module = "detr-resnet-50", er: int = 100, mr: int = 100, dr: int = 0, batch: int = 1,
          height: int = 800, width: int = 1066, repeats: int = 3, warmup: int = 1, transformer_rounds: int = 15,
          prop_attn: bool = True, pos_mode: str = "keep", attn_impl: str = "auto", clock: str = "wall",
          seed: int = 0) -> dict:
    """Time baseline (er = mr = dr = 0) and ToMe in round-robin.

    Two phases: ``repeats`` whole forwards each (end to end, with the backbone's share), then
    ``transformer_rounds`` forwards each with the backbone's output cached (the encoder + decoder alone:
    short runs, many rounds, so that their minimum is a stable figure on a shared machine).
    Returns ``{"baseline": timing, "tome": timing, "transformer": {"baseline": .., "tome": ..}, ...}``, a
    timing being ``total_s``, ``backbone_s``, ``encoder_s``, ``decoder_s``, ``encoder_decoder_s``,
    ``other_s`` (medians), ``min`` (the same for the fastest round) and the token counts.
    ``clock="cpu"`` measures process CPU time instead of wall time: with one thread it is the work done,
    whatever other processes do to the wall clock (it misses nothing on CPU; meaningless on GPUs).
    """
    import tome_kernels.patch

    net = build_model(model, seed) if isinstance(model, str) else model
    tome_kernels.patch.detr(net, prop_attn=prop_attn, pos_mode=pos_mode, attn_impl=attn_impl)
    pixel_values = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    settings = {"baseline": (0, 0, 0), "tome": (er, mr, dr)}
    backbone = net.model.backbone
    tick = _CLOCKS[clock]
    watches = {name: _Stopwatch(module, tick) for name, module in
               (("backbone", backbone), ("encoder", net.model.encoder), ("decoder", net.model.decoder))}
    try:
        with torch.inference_mode():
            samples, shapes = _time_rounds(net, pixel_values, settings, watches, repeats, warmup, tick)
            transformer = {}
            if transformer_rounds > 0:
                features = backbone(pixel_values, torch.ones(batch, height, width, dtype=torch.long))
                backbone.forward = lambda *args, **kwargs: features  # this instance only, removed below
                try:
                    parts, _ = _time_rounds(net, pixel_values, settings, watches, transformer_rounds, 1, tick)
                finally:
                    del backbone.forward
                transformer = {key: _summary(rows) for key, rows in parts.items()}
    finally:
        for watch in watches.values():
            watch.remove()
        net.er = net.mr = net.dr = 0

    result = {"model": model if isinstance(model, str) else type(model).__name__, "batch": batch,
              "height": height, "width": width, "er": er, "mr": mr, "dr": dr, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "backend": backend_name(), "attn_impl": net._tome_info["attn_impl"],
              "clock": clock,
              "transformer": transformer}
    for key, rows in samples.items():
        result[key] = {**_summary(rows), **shapes[key]}
    base, tome = result["baseline"], result["tome"]
    num_tokens, num_queries = base["tokens"], base["predictions"]
    layers_e, layers_d = len(net.model.encoder.layers), len(net.model.decoder.layers)
    flops_base = encoder_decoder_flops(net, num_tokens, num_queries, [0] * layers_e, 0, [0] * layers_d)
    flops_tome = encoder_decoder_flops(net, num_tokens, num_queries, tome["encoder_r"], tome["memory_r"],
                                       tome["decoder_r"] or [0] * layers_d)
    rest = base["total_s"] - base["encoder_decoder_s"]
    speedup = base["encoder_decoder_s"] / tome["encoder_decoder_s"]
    result.update(
        speedup_total=base["total_s"] / tome["total_s"],
        speedup_total_min=base["min"]["total_s"] / tome["min"]["total_s"],
        speedup_encoder_decoder=speedup,
        speedup_encoder_decoder_min=base["min"]["encoder_decoder_s"] / tome["min"]["encoder_decoder_s"],
        flop_ceiling_encoder_decoder=flops_base / flops_tome,
        backbone_share=base["backbone_s"] / base["total_s"],
        encoder_decoder_share=base["encoder_decoder_s"] / base["total_s"],
        amdahl_ceiling=base["total_s"] / rest,
        amdahl_expected=base["total_s"] / (rest + base["encoder_decoder_s"] / speedup),
    )
    if transformer:
        t_base, t_tome = transformer["baseline"], transformer["tome"]
        # End to end from the stable parts: the backbone does the same work in both settings, so its
        # median over all whole-model rounds stands for both; "other" (projection, heads) likewise.
        fixed = statistics.median(row["backbone_s"] + row["other_s"] for rows in samples.values() for row in rows)
        result.update(
            transformer_speedup_encoder_decoder=t_base["encoder_decoder_s"] / t_tome["encoder_decoder_s"],
            transformer_speedup_encoder_decoder_min=(t_base["min"]["encoder_decoder_s"]
                                                     / t_tome["min"]["encoder_decoder_s"]),
            end_to_end_estimate=(fixed + t_base["encoder_decoder_s"]) / (fixed + t_tome["encoder_decoder_s"]),
            backbone_share_estimate=fixed / (fixed + t_base["encoder_decoder_s"]),
        )
    return result


# ----------------------------------------------------------------------------------------------------
# Deformable DETR: ToMe on the encoder's queries (dense form), next to a stand-in speed limit
# ----------------------------------------------------------------------------------------------------
class _EveryKth:
    """The stand-in's query selection: every k-th query runs the layer, its update is copied to the k - 1
    queries after it. No matching and no averaging: what merging to the same count could gain at most."""

    def __init__(self, num_tokens: int, stride: int):
        self.num_tokens, self.stride = num_tokens, stride
        self.num_merged = num_tokens - -(-num_tokens // stride)
        self.queries = None

    def merge(self, x):
        return x[:, ::self.stride]

    def unmerge(self, y):
        return y.repeat_interleave(self.stride, dim=1)[:, :self.num_tokens]

    def carry(self, t, pos_mode):
        return t[:, ::self.stride]


def stand_in(hidden, pos, mask, shapes, r):
    """``groups_fn`` of the stand-in: keep every k-th query, k = N / (N - r) rounded."""
    num_tokens = hidden.shape[1]
    return _EveryKth(num_tokens, max(1, round(num_tokens / (num_tokens - r))))


def _apply_deformable(net, setting) -> None:
    net.ratio, net._tome_info["groups_fn"] = setting


def _deformable_info(net, out) -> dict:
    return dict(tokens=out.encoder_last_hidden_state.shape[1], queries=list(net._tome_info.get("queries") or []))


def deformable_flops(model: nn.Module, num_tokens: int, queries) -> float:
    """FLOPs of Deformable DETR's encoder + decoder per image, the encoder layers running ``queries`` queries
    against ``num_tokens`` values: value projections at every token, the query-side projections, the
    sampling (4 bilinear taps and the weighting per point and channel, multiply-adds) and the FFN per query."""
    detr = model.model
    d_model = model.config.d_model

    def deformable(attn, num_queries):
        sampling = 10 * num_queries * attn.n_heads * attn.n_levels * attn.n_points * (d_model // attn.n_heads)
        return (num_tokens * _linear_flops(attn.value_proj) + sampling
                + num_queries * _linear_flops(attn.sampling_offsets, attn.attention_weights, attn.output_proj))

    total = 0.0
    for layer, num_queries in zip(detr.encoder.layers, queries):
        total += deformable(layer.self_attn, num_queries) + num_queries * _linear_flops(layer.mlp)
    q = model.config.num_queries
    for layer in detr.decoder.layers:
        total += q * _linear_flops(layer.self_attn, layer.mlp) + 4 * q * q * d_model + deformable(layer.encoder_attn, q)
    return total


def bench_deformable(model: str | nn.Module = "deformable-detr", ratios=(0.5,), batch: int = 1, height: int = 800,
                     width: int = 1066, repeats: int = 3, warmup: int = 1, pos_mode: str = "keep",
                     clock: str = "wall", seed: int = 0, **patch_kwargs) -> dict:
    """Time Deformable DETR unpatched (ratio 0: transformers' code), with ToMe at each of ``ratios`` and with
    the stand-in at the same query counts, all in one round-robin (whole forwards; hooks time the backbone,
    encoder and decoder). Returns ``{"rows": {key: timing}, ...}`` with speed-ups against the baseline, the
    FLOP ceiling of the encoder + decoder, and ToMe's speed-up as a share of the stand-in's."""
    import tome_kernels.patch.hf_deformable_detr as deformable

    net = build_model(model, seed) if isinstance(model, str) else model
    deformable.apply_patch(net, ratio=0.0, pos_mode=pos_mode, **patch_kwargs)
    pixel_values = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    settings = {"baseline": (0.0, None)}
    for ratio in ratios:
        settings[f"tome {ratio:g}"] = (ratio, None)
        settings[f"stand-in {ratio:g}"] = (ratio, stand_in)
    tick = _CLOCKS[clock]
    watches = {name: _Stopwatch(module, tick) for name, module in
               (("backbone", net.model.backbone), ("encoder", net.model.encoder), ("decoder", net.model.decoder))}
    try:
        with torch.inference_mode():
            samples, shapes = _time_rounds(net, pixel_values, settings, watches, repeats, warmup, tick,
                                           _apply_deformable, _deformable_info)
    finally:
        for watch in watches.values():
            watch.remove()
        _apply_deformable(net, (0.0, None))
    rows = {key: {**_summary(samples[key]), **shapes[key]} for key in settings}
    base = rows["baseline"]
    num_tokens, layers = base["tokens"], len(net.model.encoder.layers)
    flops_base = deformable_flops(net, num_tokens, [num_tokens] * layers)
    for key, row in rows.items():
        row["speedup_total"] = base["total_s"] / row["total_s"]
        row["speedup_total_min"] = base["min"]["total_s"] / row["min"]["total_s"]
        row["speedup_encoder"] = base["encoder_s"] / row["encoder_s"]
        row["flop_ceiling"] = flops_base / deformable_flops(net, num_tokens, row["queries"] or [num_tokens] * layers)
    for ratio in ratios:
        tome, limit = rows[f"tome {ratio:g}"], rows[f"stand-in {ratio:g}"]
        tome["share_of_stand_in"] = tome["speedup_total"] / limit["speedup_total"]
        tome["share_of_stand_in_min"] = tome["speedup_total_min"] / limit["speedup_total_min"]
    return {"model": model if isinstance(model, str) else type(model).__name__, "batch": batch, "height": height,
            "width": width, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "backend": backend_name(), "clock": clock, "settings": dict(net._tome_info, groups_fn=None),
            "rows": rows, "amdahl_ceiling": base["total_s"] / (base["total_s"] - base["encoder_s"])}


def print_deformable(result: dict) -> None:
    print(f"{result['model']} {result['height']}x{result['width']}, batch {result['batch']}, random weights; "
          f"torch {result['torch']}, {result['threads']} threads, tome backend {result['backend']}, "
          f"{result['clock']} clock; {result['rows']['baseline']['tokens']} encoder tokens")
    print(f"{'':14s} {'total':>9s} {'backbone':>9s} {'encoder':>9s} {'decoder':>9s}   speed-up: total (fastest) "
          f"encoder  FLOP ceiling  share of stand-in")
    for key, row in result["rows"].items():
        share = row.get("share_of_stand_in")
        print(f"{key:14s} " + " ".join(f"{row[name] * 1e3:7.0f}ms" for name in
                                      ("total_s", "backbone_s", "encoder_s", "decoder_s"))
              + f"   {row['speedup_total']:5.2f}x ({row['speedup_total_min']:.2f}x) {row['speedup_encoder']:6.2f}x"
              f" {row['flop_ceiling']:8.2f}x" + ("" if share is None else f"   {100 * share:5.1f}% "
                                                 f"({100 * row['share_of_stand_in_min']:.1f}%)"))
    print(f"Amdahl ceiling (a free encoder): {result['amdahl_ceiling']:.2f}x end to end")


def plot_deformable(result: dict, path: str) -> None:
    """Speed-up against ratio: ToMe and the stand-in, end to end and encoder, and the FLOP ceiling."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ratios = sorted(float(key.split()[1]) for key in rows if key.startswith("tome "))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for prefix, color in (("tome", "tab:blue"), ("stand-in", "tab:gray")):
        picked = [rows[f"{prefix} {ratio:g}"] for ratio in ratios]
        ax.plot(ratios, [row["speedup_total"] for row in picked], "o-", color=color, label=f"{prefix}: end to end")
        ax.plot(ratios, [row["speedup_encoder"] for row in picked], "s--", color=color, label=f"{prefix}: encoder")
    ax.plot(ratios, [rows[f"tome {ratio:g}"]["flop_ceiling"] for ratio in ratios], ":", color="black",
            label="FLOP ceiling (encoder + decoder)")
    ax.axhline(1.0, color="lightgray", lw=0.8)
    ax.set_xlabel("ratio (fraction of encoder queries merged per layer)")
    ax.set_ylabel("speed-up over the unpatched model")
    ax.set_title(f"Deformable DETR-R50, {result['height']}x{result['width']}, batch {result['batch']}, "
                 f"CPU, {result['threads']} threads", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def photo(name: str, height: int = 800, width: int = 1066) -> torch.Tensor:
    """A scikit-image sample photo (``skimage.data.<name>``), resized and ImageNet-normalised: [1, 3, H, W]."""
    import skimage.data

    image = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float()[None] / 255
    image = nn.functional.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (image - mean) / std


def deviation(model: str | nn.Module = "deformable-detr", choices: dict | None = None, ratios=(0.5, 0.75),
              images=("astronaut", "coffee", "chelsea", "rocket"), height: int = 800, width: int = 1066,
              seed: int = 0) -> dict:
    """Relative L2 error against the unpatched model (ratio 0) of the logits, the boxes (over their spread
    around their mean) and the encoder output, per matching choice (``{label: deformable_detr options}``),
    ratio and photo; the backbone output is computed once per photo. Returns ``{(label, ratio): [per photo
    (logits, boxes, encoder)]}``."""
    import tome_kernels.patch.hf_deformable_detr as deformable

    net = build_model(model, seed) if isinstance(model, str) else model
    choices = choices or {"default": {}, "random": {"metric": "random", "window": None}}
    deformable.apply_patch(net, ratio=0.0)
    backbone = net.model.backbone
    errors: dict = {}

    def relative(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    with torch.inference_mode():
        for name in images:
            pixel_values = photo(name, height, width)
            features = backbone(pixel_values, torch.ones(1, height, width, dtype=torch.long))
            backbone.forward = lambda *args, **kwargs: features  # this instance only, removed below
            try:
                net.ratio = 0.0
                base = net(pixel_values)
                spread = base.pred_boxes - base.pred_boxes.mean(1, keepdim=True)
                for label, options in choices.items():
                    for ratio in ratios:
                        deformable.apply_patch(net, ratio=ratio, **options)
                        out = net(pixel_values)
                        errors.setdefault((label, ratio), []).append((
                            relative(out.logits, base.logits),
                            float((out.pred_boxes - base.pred_boxes).norm() / spread.norm().clamp_min(1e-12)),
                            relative(out.encoder_last_hidden_state, base.encoder_last_hidden_state)))
            finally:
                del backbone.forward
    deformable.apply_patch(net, ratio=0.0)
    return errors


def backend_name() -> str:
    """The tome backend that CPU tensors use (``auto`` resolved)."""
    chosen = tome_kernels.get_backend()
    if chosen != "auto":
        return chosen
    usable = [name for name, reason in tome_kernels.available_backends("cpu").items() if reason is None]
    return f"auto -> {'cpu' if 'cpu' in usable else 'torch'}"


def print_result(result: dict) -> None:
    base, tome = result["baseline"], result["tome"]
    print(f"{result['model']} {result['height']}x{result['width']}, batch {result['batch']}, random weights; "
          f"torch {result['torch']}, {result['threads']} threads, tome backend {result['backend']}, "
          f"attn_impl {result['attn_impl']}, {result['clock']} clock")
    print(f"tokens {base['tokens']} -> encoder_r {tome['encoder_r']} -> memory {tome['memory_tokens']} "
          f"(mr {tome['memory_r']}); predictions {tome['predictions']} (decoder_r {tome['decoder_r']})")
    print(f"{'':10s} {'total':>9s} {'backbone':>9s} {'encoder':>9s} {'decoder':>9s} {'enc+dec':>9s} {'other':>9s}")
    for key, timing in (("baseline", base), ("ToMe", tome)):
        print(f"{key:10s} " + " ".join(f"{timing[name] * 1e3:7.1f}ms" for name in
                                       ("total_s", "backbone_s", "encoder_s", "decoder_s", "encoder_decoder_s",
                                        "other_s")))
    for key, timing in (("base min", base["min"]), ("ToMe min", tome["min"])):
        print(f"{key:10s} " + " ".join(f"{timing[name] * 1e3:7.1f}ms" for name in
                                       ("total_s", "backbone_s", "encoder_s", "decoder_s", "encoder_decoder_s",
                                        "other_s")))
    print(f"fastest rounds: encoder+decoder {result['speedup_encoder_decoder_min']:.2f}x, "
          f"end to end {result['speedup_total_min']:.2f}x")
    print(f"medians: encoder+decoder speed-up {result['speedup_encoder_decoder']:.2f}x "
          f"(FLOP ceiling {result['flop_ceiling_encoder_decoder']:.2f}x); "
          f"end to end {result['speedup_total']:.2f}x")
    if result["transformer"]:
        t_base, t_tome = result["transformer"]["baseline"], result["transformer"]["tome"]
        print("encoder + decoder alone (backbone output cached), median / fastest round:")
        for key, timing in (("baseline", t_base), ("ToMe", t_tome)):
            print(f"  {key:8s} encoder {timing['encoder_s'] * 1e3:7.1f} / {timing['min']['encoder_s'] * 1e3:7.1f}ms"
                  f"  decoder {timing['decoder_s'] * 1e3:7.1f} / {timing['min']['decoder_s'] * 1e3:7.1f}ms"
                  f"  enc+dec {timing['encoder_decoder_s'] * 1e3:7.1f} / "
                  f"{timing['min']['encoder_decoder_s'] * 1e3:7.1f}ms")
        print(f"  encoder+decoder speed-up {result['transformer_speedup_encoder_decoder']:.2f}x (median), "
              f"{result['transformer_speedup_encoder_decoder_min']:.2f}x (fastest rounds)")
        print(f"  end to end from these and the backbone + other median over all rounds: "
              f"{result['end_to_end_estimate']:.3f}x (backbone + other = "
              f"{100 * result['backbone_share_estimate']:.1f}% of the baseline)")
    print(f"backbone share {100 * result['backbone_share']:.1f}%, encoder+decoder share "
          f"{100 * result['encoder_decoder_share']:.1f}% of the baseline: Amdahl ceiling "
          f"{result['amdahl_ceiling']:.2f}x end to end (free encoder+decoder), "
          f"{result['amdahl_expected']:.2f}x expected at the measured encoder+decoder speed-up")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tome_kernels.bench_detr", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="detr-resnet-50", choices=sorted(MODELS) + sorted(DEFORMABLE_MODELS))
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.5],
                        help="deformable-detr*: fraction of encoder queries merged per layer (several: a sweep)")
    parser.add_argument("--plot", default=None, help="deformable-detr*: write the speed-vs-ratio plot here (PNG)")
    parser.add_argument("--er", type=int, default=100, help="encoder tokens merged per layer")
    parser.add_argument("--mr", type=int, default=100, help="memory tokens merged before the decoder")
    parser.add_argument("--dr", type=int, default=0, help="object queries merged per decoder layer")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1066)
    parser.add_argument("--rounds", type=int, default=3, help="timed whole-model rounds (median)")
    parser.add_argument("--transformer-rounds", type=int, default=15,
                        help="timed rounds of the encoder + decoder alone, backbone output cached (0: skip)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--backend", default=None, choices=tome_kernels.BACKENDS, help="tome backend")
    parser.add_argument("--pos-mode", default="keep", choices=("keep", "mean"))
    parser.add_argument("--clock", default="wall", choices=sorted(_CLOCKS),
                        help="wall time, or process CPU time (with --threads 1: robust on a shared machine)")
    parser.add_argument("--prop-attn", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--attn-impl", default="auto", choices=("auto", "op", "sdpa"),
                        help="patched attention: the tome op, SDPA with a log-size bias, or auto")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.backend is not None:
        tome_kernels.set_backend(args.backend)
    if args.model in DEFORMABLE_MODELS:
        result = bench_deformable(args.model, ratios=tuple(args.ratio), batch=args.batch, height=args.height,
                                  width=args.width, repeats=args.rounds, warmup=args.warmup, pos_mode=args.pos_mode,
                                  clock=args.clock)
        print_deformable(result)
        if args.plot:
            plot_deformable(result, args.plot)
        return result
    result = bench(args.model, er=args.er, mr=args.mr, dr=args.dr, batch=args.batch, height=args.height,
                   width=args.width, repeats=args.rounds, warmup=args.warmup,
                   transformer_rounds=args.transformer_rounds, prop_attn=args.prop_attn, pos_mode=args.pos_mode,
                   attn_impl=args.attn_impl, clock=args.clock)
    print_result(result)
    return result


if __name__ == "__main__":
    main()
