"""Model throughput with and without ToMe, against the FLOP-ratio ceiling.

    python -m tome_kernels.bench_model --model vit_base_patch16_224 --r 16 --batch 8
    python -m tome_kernels.bench_model --model vit_base_patch16_384 --r 45 --batch 2
    python -m tome_kernels.bench_model --model vit_base_patch16_224 --sweep 0,4,8,16 --plot speed_vs_r.png

Random weights unless ``--pretrained``. The unpatched model and a ToMe-patched copy run in round-robin
(baseline, then every merge setting, per round) so that load from other processes hits them alike; the
median time per batch gives throughput. The ceiling is the ratio of model FLOPs (attention and MLP
matmuls per block at the token counts merging leaves, plus the patch embedding and head) without and with
merging: a ToMe implementation with free merging and free bookkeeping would reach 100% of it.

Dispatch on ``--model``: DETR names (``--model detr-resnet-50 --er 100 --mr 100``) hand the whole command
line to :mod:`tome_kernels.tools.bench_detr` (its own options and an Amdahl ceiling: the backbone does not
merge); other families here (:data:`FAMILIES`: timm, and transformers models as ``--model hf:vit-base``, see
:data:`HF_MODELS`) add their options and build a :class:`Workload`.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

import tome_kernels
from tome_kernels import layout


# ----------------------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """One model at one input: the baseline, the ToMe model, and how to set and count a merge setting."""

    description: str
    inputs: tuple
    batch: int
    baseline: nn.Module
    tome: nn.Module
    settings: list  # merge settings to time, e.g. r values
    setting_name: str  # how a setting is printed, e.g. "r"
    apply: Callable[[object], None]  # put the ToMe model in a setting
    flops: Callable[[object], float]  # model FLOPs per batch in a setting (None = unmerged)
    # The baseline with merging replaced by dropping tokens (same token counts, no merge work): what a
    # free merge would reach. None where a family has no such model.
    free_merge: Callable[[object], Callable] | None = None


class Family:
    """A kind of model ``bench_model`` can run: claims model names, adds options, builds a Workload."""

    name = ""

    def matches(self, model_name: str) -> bool:
        raise NotImplementedError

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def build(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Workload:
        raise NotImplementedError


def _linear_flops(module: nn.Module) -> int:
    """Multiply-add FLOPs per token of every ``nn.Linear`` under ``module``."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def vit_token_counts(num_tokens: int, r_per_layer: Sequence[int], protected: int) -> list[tuple[int, int]]:
    """``(tokens into attention, tokens into the MLP)`` per block: a block merges between the two."""
    counts = []
    for r in r_per_layer:
        merged = num_tokens - layout.clamp_r(r, num_tokens, protected)
        counts.append((num_tokens, merged))
        num_tokens = merged
    return counts


def vit_flops(model: nn.Module, num_tokens: int, batch: int, r_per_layer: Sequence[int] | None = None) -> float:
    """FLOPs of a timm ViT forward: per block the attention projections and ``q kᵀ``, ``p v`` at the
    tokens entering attention and the MLP at the tokens left after merging; patch embedding and head once."""
    r_per_layer = [0] * len(model.blocks) if r_per_layer is None else r_per_layer
    counts = vit_token_counts(num_tokens, r_per_layer, model.num_prefix_tokens)
    total = 0.0
    for block, (n_attn, n_mlp) in zip(model.blocks, counts):
        total += n_attn * _linear_flops(block.attn) + 4 * n_attn * n_attn * block.attn.attn_dim
        total += n_mlp * _linear_flops(block.mlp)
    patch = model.patch_embed.proj
    total += 2 * model.patch_embed.num_patches * patch.out_channels * patch.in_channels * patch.kernel_size[0] \
        * patch.kernel_size[1]
    total += _linear_flops(model.head) + _linear_flops(getattr(model, "head_dist", nn.Identity()))
    return total * batch


def copy_sharing_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that uses the very same parameter and buffer tensors. Timing two copies
    of the weights compares their memory placement too: two identical ViT-B forwards at batch 1 on two
    copies differed by 6% here (TLB and cache behaviour of 344 MB of weights)."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


def vit_free_merge_forward(model: nn.Module, counts: list[tuple[int, int]]) -> Callable:
    """A forward of the unpatched ViT ``model`` that keeps the first tokens instead of merging (the token
    counts of :func:`vit_token_counts`): the time of the model's own work at ToMe's token counts."""
    def forward(x):
        x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for block, (n_attn, n_mlp) in zip(model.blocks, counts):
            x = x[:, :n_attn]
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
            x = x[:, :n_mlp]
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return model.forward_head(model.norm(x))
    return forward


class TimmFamily(Family):
    name = "timm"

    def matches(self, model_name: str) -> bool:
        import timm

        return timm.is_model(model_name)

    def add_arguments(self, parser):
        group = parser.add_argument_group("ViT options (timm and hf: models)")
        group.add_argument("--r", default="16", help="tokens merged per layer: N, 'N,inflection' or "
                                                   "'[n1,n2,...]' (default 16)")
        group.add_argument("--sweep", default=None, help="comma-separated r values to time instead of --r")
        group.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
        group.add_argument("--prop-attn", action=argparse.BooleanOptionalAction, default=True,
                           help="proportional attention (default on)")
        group.add_argument("--attn-impl", default="auto", choices=("auto", "op", "sdpa"),
                           help="proportional attention through the tome op or SDPA with a log-size bias "
                                "(default auto: see tome_kernels.patch.timm)")

    def build(self, args, device, dtype):
        import timm

        from tome_kernels.patch import parse_r
        from tome_kernels.patch import timm as patch_timm

        kwargs = {} if args.img_size is None else {"img_size": args.img_size}
        baseline = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
        baseline = baseline.to(device=device, dtype=dtype).eval()
        tome = patch_timm(copy_sharing_weights(baseline), prop_attn=args.prop_attn, attn_impl=args.attn_impl)
        img_size = baseline.patch_embed.img_size
        inputs = (torch.randn(args.batch, 3, *img_size, device=device, dtype=dtype),)
        num_tokens = baseline.patch_embed.num_patches + baseline.num_prefix_tokens
        settings = ([int(v) for v in args.sweep.split(",")] if args.sweep else [_parse_r_arg(args.r)])
        for r in settings:
            parse_r(r, len(tome.blocks))  # bad values fail before any timing

        def apply(r):
            tome.r = r

        def flops(r):
            return vit_flops(baseline, num_tokens, args.batch, None if r is None else parse_r(r, len(tome.blocks)))

        def free_merge(r):
            counts = vit_token_counts(num_tokens, parse_r(r, len(tome.blocks)), baseline.num_prefix_tokens)
            return vit_free_merge_forward(baseline, counts)

        description = (f"{args.model} {img_size[0]}x{img_size[1]} ({num_tokens} tokens, "
                       f"{baseline.num_prefix_tokens} prefix), batch {args.batch}, prop_attn={args.prop_attn} "
                       f"(attn_impl={tome._tome_info['attn_impl']})")
        return Workload(description, inputs, args.batch, baseline, tome, settings, "r", apply, flops, free_merge)


# ----------------------------------------------------------------------------------------------------
# transformers vision models (random weights, from configs)
# ----------------------------------------------------------------------------------------------------
def _hf(name: str, config: str, **config_kwargs) -> Callable[[int], nn.Module]:
    """A builder ``image size -> model`` for ``transformers.<name>(transformers.<config>(...))``."""
    def build(img_size: int) -> nn.Module:
        import transformers

        return getattr(transformers, name)(getattr(transformers, config)(image_size=img_size, **config_kwargs))
    return build


_VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16)

# ``--model hf:<key>``: builders of Base-size models at their usual input (224 px; DINOv2's 14 px patches).
HF_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "vit-base": _hf("ViTForImageClassification", "ViTConfig", num_labels=1000, **_VIT_B16),
    "deit-base-distilled": _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=1000, **_VIT_B16),
    "dinov2-base": _hf("Dinov2Model", "Dinov2Config"),
    "dinov2-base-cls": _hf("Dinov2ForImageClassification", "Dinov2Config", num_labels=1000),
    "dinov2-reg-base": _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", patch_size=14),
    "clip-vit-b16": _hf("CLIPVisionModel", "CLIPVisionConfig", **_VIT_B16),
    "siglip-base": _hf("SiglipVisionModel", "SiglipVisionConfig", **_VIT_B16),
}


def hf_vit_flops(tome: nn.Module, img_size: int, batch: int, r_per_layer: Sequence[int] | None = None) -> float:
    """FLOPs of a forward of a ToMe-patched transformers ViT-like model ``tome`` (the unpatched model's with
    ``r_per_layer`` None): per encoder layer the attention projections and ``q kᵀ``, ``p v`` at the tokens
    entering attention and the MLP at the tokens left after merging; the patch embedding and every other
    linear layer (heads) once per image, except a SigLIP attention-pooling head, whose keys and values are
    projected from every remaining token."""
    layers = sorted((m for m in tome.modules() if hasattr(m, "_tome_layer")), key=lambda m: m._tome_layer)
    r_per_layer = [0] * len(layers) if r_per_layer is None else r_per_layer
    counts = vit_token_counts(hf_num_tokens(tome, img_size), r_per_layer, tome._tome_info["num_prefix_tokens"])
    total, counted = 0.0, set()
    for layer, (n_attn, n_mlp) in zip(layers, counts):
        attn = getattr(layer, "attention", None) or layer.self_attn
        total += n_attn * _linear_flops(attn) + 4 * n_attn * n_attn * attn.q_proj.out_features
        total += n_mlp * _linear_flops(layer.mlp)
        counted.update(id(m) for m in layer.modules())
    for head in tome.modules():
        if hasattr(head, "probe"):  # SigLIP: one probe attends to the last tokens
            channels = head.probe.shape[-1]
            total += counts[-1][1] * (4 * channels * channels + 4 * channels) + 4 * channels * channels
            total += _linear_flops(head.mlp)
            counted.update(id(m) for m in head.modules())
    for module in tome.modules():
        if isinstance(module, nn.Conv2d):  # the patch embedding
            total += 2 * (img_size // module.stride[0]) * (img_size // module.stride[1]) * module.out_channels \
                * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear) and id(module) not in counted:
            total += 2 * module.in_features * module.out_features
    return total * batch


def hf_num_tokens(tome: nn.Module, img_size: int) -> int:
    """Tokens entering the first layer of a patched transformers ViT-like model at ``img_size`` px."""
    conv = next(m for m in tome.modules() if isinstance(m, nn.Conv2d))
    patches = (img_size // conv.stride[0]) * (img_size // conv.stride[1])
    return patches + tome._tome_info["num_prefix_tokens"]


class HfFamily(Family):
    """transformers ViT, DeiT, DINOv2, CLIP and SigLIP vision models: ``--model hf:<key>`` of
    :data:`HF_MODELS`; the timm options (``--r``, ``--sweep``, ``--img-size``, ``--prop-attn``,
    ``--attn-impl``) apply."""

    name = "hf"

    def matches(self, model_name: str) -> bool:
        return model_name.startswith("hf:") and model_name[3:] in HF_MODELS

    def build(self, args, device, dtype):
        from tome_kernels.patch import apply_patch, parse_r

        if args.pretrained:
            raise SystemExit("bench_model: hf: models are built from configs (random weights); no --pretrained")
        img_size = args.img_size or 224
        baseline = HF_MODELS[args.model[3:]](img_size).to(device=device, dtype=dtype).eval()
        tome = apply_patch(copy_sharing_weights(baseline), prop_attn=args.prop_attn, attn_impl=args.attn_impl)
        info = tome._tome_info
        num_layers, protected = len(info["r"]), info["num_prefix_tokens"]
        num_tokens = hf_num_tokens(tome, img_size)
        inputs = (torch.randn(args.batch, 3, img_size, img_size, device=device, dtype=dtype),)
        settings = ([int(v) for v in args.sweep.split(",")] if args.sweep else [_parse_r_arg(args.r)])
        for r in settings:
            parse_r(r, num_layers)  # bad values fail before any timing

        def apply(r):
            tome.r = r

        def flops(r):
            return hf_vit_flops(tome, img_size, args.batch, None if r is None else parse_r(r, num_layers))

        description = (f"{args.model} ({type(baseline).__name__}, random weights) {img_size}x{img_size} "
                       f"({num_tokens} tokens, {protected} prefix), batch {args.batch}, prop_attn={args.prop_attn} "
                       f"(attn_impl={info['attn_impl']}, attention {baseline.config._attn_implementation})")
        return Workload(description, inputs, args.batch, baseline, tome, settings, "r", apply, flops)


def _parse_r_arg(text: str):
    text = text.strip()
    if text.startswith("["):
        return [int(v) for v in text.strip("[]").split(",") if v.strip()]
    if "," in text:
        r, inflection = text.split(",")
        return int(r), float(inflection)
    return int(text)


# Hugging Face YOLOS detectors, built from configs (random weights): name -> config arguments.
YOLOS_CONFIGS = {
    "hf:yolos-tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                          image_size=[800, 1344]),
    "hf:yolos-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                           image_size=[800, 1344]),
    "hf:yolos-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                          image_size=[800, 1344]),
}


def yolos_flops(model: nn.Module, num_tokens: int, batch: int, r_per_layer: Sequence[int] | None = None) -> float:
    """FLOPs of a YOLOS forward, counted as :func:`vit_flops`: per layer the attention projections and
    ``q kᵀ``, ``p v`` at the tokens entering attention, the MLP at the tokens left after merging; the patch
    embedding and the two detection heads (on the detection tokens) once."""
    yolos = model.vit
    layers = yolos.encoder.layer
    protected = 1 + model.config.num_detection_tokens
    counts = vit_token_counts(num_tokens, [0] * len(layers) if r_per_layer is None else r_per_layer, protected)
    total = 0.0
    for layer, (n_attn, n_mlp) in zip(layers, counts):
        total += n_attn * _linear_flops(layer.attention) + 4 * n_attn * n_attn * layer.attention.attention.all_head_size
        total += n_mlp * (_linear_flops(layer.intermediate) + _linear_flops(layer.output))
    patch = yolos.embeddings.patch_embeddings.projection
    num_patches = num_tokens - protected
    total += 2 * num_patches * patch.out_channels * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1]
    heads = _linear_flops(model.class_labels_classifier) + _linear_flops(model.bbox_predictor)
    total += model.config.num_detection_tokens * heads
    return total * batch


class YolosFamily(Family):
    name = "hf-yolos"

    def matches(self, model_name: str) -> bool:
        return model_name in YOLOS_CONFIGS

    def add_arguments(self, parser):
        group = parser.add_argument_group("YOLOS options (--r, --sweep, --prop-attn, --attn-impl as for timm)")
        group.add_argument("--pos-mode", default="keep", choices=("keep", "mean"),
                           help="how merged tokens' mid-position embeddings combine (default keep)")
        group.add_argument("--image", default=None,
                           help="input height,width (multiples of 16; default the config's image_size)")

    def build(self, args, device, dtype):
        from transformers import YolosConfig, YolosForObjectDetection

        from tome_kernels.patch import parse_r
        from tome_kernels.patch import yolos as patch_yolos

        config = YolosConfig(**YOLOS_CONFIGS[args.model])
        baseline = YolosForObjectDetection(config)
        with torch.no_grad():  # position embeddings start at zero: give them values so they matter
            for name, param in baseline.named_parameters():
                if "position_embeddings" in name:
                    param.normal_(std=0.02)
        baseline = baseline.to(device=device, dtype=dtype).eval()
        tome = patch_yolos(copy_sharing_weights(baseline), prop_attn=args.prop_attn,
                                    pos_mode=args.pos_mode, attn_impl=args.attn_impl)
        height, width = config.image_size if args.image is None else (int(v) for v in args.image.split(","))
        inputs = (torch.randn(args.batch, 3, height, width, device=device, dtype=dtype),)
        patch = config.patch_size
        num_tokens = 1 + (height // patch) * (width // patch) + config.num_detection_tokens
        num_layers = config.num_hidden_layers
        settings = [int(v) for v in args.sweep.split(",")] if args.sweep else [_parse_r_arg(args.r)]
        for r in settings:
            parse_r(r, num_layers)

        def apply(r):
            tome.r = r

        def flops(r):
            return yolos_flops(baseline, num_tokens, args.batch, None if r is None else parse_r(r, num_layers))

        description = (f"{args.model} (YOLOS, hidden {config.hidden_size}, {num_layers} layers) {height}x{width} "
                       f"({num_tokens} tokens, {1 + config.num_detection_tokens} protected), batch {args.batch}, "
                       f"prop_attn={args.prop_attn}, pos_mode={args.pos_mode} "
                       f"(attn_impl={tome._tome_info['attn_impl']})")
        return Workload(description, inputs, args.batch, baseline, tome, settings, "r", apply, flops)


FAMILIES: list[Family] = [TimmFamily(), HfFamily(), YolosFamily()]


def family_for(model_name: str) -> Family:
    for family in FAMILIES:
        if family.matches(model_name):
            return family
    raise SystemExit(f"bench_model: no model family knows {model_name!r} (families: "
                     f"{', '.join(f.name for f in FAMILIES)}; timm names as in timm.list_models(), "
                     f"{', '.join('hf:' + key for key in HF_MODELS)})")


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_workload(work: Workload, device: torch.device, rounds: int, warmup: int, progress: bool = True,
                  timer: str = "wall", free_merge: bool = False):
    """Median seconds per batch: ``{"baseline": t, setting_index: t, ...}`` (and ``("free", index)`` with
    ``free_merge``), timed in round-robin.

    ``timer="cpu"`` counts this process's CPU time (``time.process_time``) instead of wall time: with one
    thread on a CPU shared with other jobs it is the time a dedicated core would take, without the
    stretches the scheduler gives to others (with more threads it also counts their spin-waits).
    """
    from tqdm import tqdm

    if timer == "cpu" and device.type != "cpu":
        raise ValueError("--timer cpu measures CPU time: use it with --device cpu")
    clock = time.process_time if timer == "cpu" else time.perf_counter

    runs = [("baseline", work.baseline, None)] + [(i, work.tome, s) for i, s in enumerate(work.settings)]
    if free_merge:
        runs += [(("free", i), work.free_merge(s), None) for i, s in enumerate(work.settings)]
    times: dict = {key: [] for key, _, _ in runs}
    bar = tqdm(total=(warmup + rounds) * len(runs), desc="bench", unit="fwd", disable=not progress, leave=False)
    with torch.inference_mode():
        for round_index in range(warmup + rounds):
            for key, model, setting in runs:
                if setting is not None:
                    work.apply(setting)
                _sync(device)
                start = clock()
                model(*work.inputs)
                _sync(device)
                if round_index >= warmup:
                    times[key].append(clock() - start)
                bar.update()
    bar.close()
    return {key: statistics.median(values) for key, values in times.items()}


def report(work: Workload, times: dict) -> list[dict]:
    """One row per timed model: time, throughput, speedup over the baseline, FLOP-ratio ceiling, % of it."""
    base_time, base_flops = times["baseline"], work.flops(None)

    def row(kind, label, t, setting=None):
        ceiling = 1.0 if setting is None else base_flops / work.flops(setting)
        speedup = base_time / t
        return {"kind": kind, "setting": label, "value": setting, "ms": t * 1e3, "img_s": work.batch / t,
                "speedup": speedup, "ceiling": ceiling, "pct": 100 * speedup / ceiling}

    rows = [row("baseline", "baseline", base_time)]
    rows += [row("tome", f"{work.setting_name}={s}", times[i], s) for i, s in enumerate(work.settings)]
    rows += [row("free", f"  free merge {s}", times[("free", i)], s) for i, s in enumerate(work.settings)
             if ("free", i) in times]
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'':16s} {'ms/batch':>9s} {'img/s':>8s} {'speedup':>8s} {'ceiling':>8s} {'% ceil':>7s}")
    for row in rows:
        print(f"{row['setting']:16s} {row['ms']:9.1f} {row['img_s']:8.2f} {row['speedup']:7.2f}x "
              f"{row['ceiling']:7.2f}x {row['pct']:6.1f}%")


def plot(rows: list[dict], title: str, xlabel: str, ylabel: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tome_rows = [row for row in rows if row["kind"] == "tome"]
    free_rows = [row for row in rows if row["kind"] == "free"]
    xs = [row["value"] for row in tome_rows]
    base = rows[0]["img_s"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [row["img_s"] for row in tome_rows], "o-", label="ToMe (measured)")
    if free_rows:
        ax.plot(xs, [row["img_s"] for row in free_rows], "s:", label="tokens dropped, no merge work")
    ax.plot(xs, [base * row["ceiling"] for row in tome_rows], "--", color="gray", label="FLOP-ratio ceiling")
    ax.axhline(base, color="black", linewidth=0.8, label="unpatched model")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=7)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def backend_line(device: torch.device) -> str:
    usable = [name for name, reason in tome_kernels.available_backends(device.type).items() if reason is None]
    return f"tome backend: {tome_kernels.get_backend()} (usable on {device.type}: {', '.join(usable)})"


def main(argv: Sequence[str] | None = None) -> list[dict] | dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--model", default="vit_base_patch16_224")
    from tome_kernels.tools import bench_detr

    if bench_detr.matches(peek.parse_known_args(argv)[0].model):
        return bench_detr.main(argv)

    parser = argparse.ArgumentParser(prog="python -m tome_kernels.bench_model", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pretrained", action="store_true", help="load pretrained weights (needs them cached)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timer", default="wall", choices=("wall", "cpu"),
                        help="wall-clock time, or process CPU time (for --threads 1 on a shared CPU)")
    parser.add_argument("--backend", default=None, choices=tome_kernels.BACKENDS, help="tome backend")
    parser.add_argument("--plot", default=None, help="save throughput vs merge setting to this PNG")
    parser.add_argument("--free-merge", action="store_true",
                        help="also time the model with merging replaced by dropping tokens (a free merge)")
    parser.add_argument("--no-progress", action="store_true")
    for family in FAMILIES:
        family.add_arguments(parser)
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.backend is not None:
        tome_kernels.set_backend(args.backend)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    work = family_for(args.model).build(args, device, dtype)
    times = time_workload(work, device, args.rounds, args.warmup, progress=not args.no_progress, timer=args.timer,
                          free_merge=args.free_merge and work.free_merge is not None)
    rows = report(work, times)
    setup = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.device}, "
             f"{args.timer} time, median of {args.rounds}")
    print(work.description)
    print(f"{backend_line(device)}; {setup}")
    print_rows(rows)
    if args.plot:
        unit = "img/s" if args.timer == "wall" else "img per CPU-second"
        plot(rows, f"{work.description}\n{setup}", work.setting_name, f"throughput ({unit})", args.plot)
        print(f"wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
