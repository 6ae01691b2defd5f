"""Accuracy against r on a ViT trained here: ToMe off the shelf, ToMe-trained, and two controls.

    python -m tome_kernels.accuracy            # writes docs/ACCURACY.md and docs/accuracy.png

The model and data are :mod:`tome_kernels.tools.train`'s (scikit-learn's digits at 32×32, 64 patch tokens + a
class token, a 6-block timm ViT). Two models are trained from the same seed for the same steps: one
without merging, one with ToMe at ``--train-r`` in every block (gradients through ``bipartite_merge``,
proportional attention on). Each r is then evaluated on the 500 held-out images as:

* **ToMe, off the shelf**: the model trained without merging, patched with :func:`tome_kernels.patch.timm`;
* **ToMe, trained with ToMe**: the model trained with merging, at the same r;
* **pruning** (control): the model trained without merging; every block drops its r tokens with the least
  class-token attention (mean over heads) where ToMe would merge r pairs;
* **random merging** (control): as ToMe off the shelf, but the pairs are random (the bipartite match runs
  on a random metric, so merging, sizes and proportional attention are ToMe's own).

Every variant keeps the same number of tokens in every block at a given r. Speed: images per CPU-second of
the ToMe model against the unpatched one (one thread, round-robin, median: ``tome_kernels.tools.bench_model``'s
timing), and the FLOP-ratio ceiling. Everything is seeded; the accuracies repeat exactly on a machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import tome_kernels.patch
from tome_kernels import reference
from tome_kernels.tools.bench_model import (Workload, report, time_workload, vit_flops, vit_free_merge_forward,
                                      vit_token_counts)
from tome_kernels.tools.train import MAX_SHIFT, Split, accuracy, digits, make_vit, train

VARIANTS = ("ToMe, off the shelf", "ToMe, trained with ToMe", "pruning (control)", "random merging (control)")


# ----------------------------------------------------------------------------------------------------
# Controls: the unpatched timm ViT walked block by block, reducing tokens where ToMe merges
# ----------------------------------------------------------------------------------------------------
class Control(nn.Module):
    """A class-token timm ViT that, in every block where ToMe merges r pairs, instead

    * ``mode="prune"``: drops the r non-prefix tokens with the least class-token attention (mean over
      heads); the rest keep weight 1;
    * ``mode="merge"``: merges r pairs with ``torch.ops.tome.bipartite_merge`` chosen on ``metric(keys)``
      (keys averaged over heads, ``[B, N, head_dim]``), size-weighted, with proportional attention after:
      ToMe itself for ``metric=lambda keys: keys``; random pairs for a random metric (:func:`random_metric`).

    Set ``control.r`` (an int, every block) as on a patched model. Built on the public op and timm's block
    layout only (no patch internals), so it checks itself against the patch: see the tests.
    """

    def __init__(self, model: nn.Module, mode: str, metric=None):
        super().__init__()
        if mode not in ("prune", "merge"):
            raise ValueError(f"mode must be 'prune' or 'merge', got {mode!r}")
        if mode == "merge" and metric is None:
            raise ValueError("mode='merge' needs a metric function")
        if getattr(model, "cls_token", None) is None or model.global_pool != "token":
            raise ValueError("the controls need a class-token ViT with global_pool='token'")
        self.model, self.mode, self.metric, self.r = model, mode, metric, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model
        protected = model.num_prefix_tokens
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        size = None
        for block in model.blocks:
            y, q, k = _attention(block.attn, block.norm1(x), size)
            x = x + block.drop_path1(block.ls1(y))
            r = reference.clamp_r(self.r, x.shape[1], protected)
            if r > 0 and self.mode == "prune":
                attn = block.attn
                scores = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0, protected:]
                keep = scores.topk(scores.shape[1] - r, dim=1).indices.sort(dim=1).values + protected
                x = torch.cat([x[:, :protected], x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))], 1)
            elif r > 0:
                x, _, size, _, _, _ = torch.ops.tome.bipartite_merge(x, None, size, r, self.metric(k.mean(1)),
                                                                     protected)
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return model.forward_head(model.norm(x))


def _attention(attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None):
    """timm ``Attention`` (no gate) with proportional attention once sizes exist; returns (output, q, k)."""
    batch, num_tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.to(q.dtype).log().reshape(batch, 1, 1, num_tokens)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    out = attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, num_tokens, attn.attn_dim)))
    return out, q, k


def random_metric(seed: int):
    """A metric function returning Gaussian noise from a generator seeded with ``seed`` (restarted by
    ``.reset()``): the bipartite match on it pairs tokens at random."""
    generator = torch.Generator().manual_seed(seed)

    def metric(keys: torch.Tensor) -> torch.Tensor:
        return torch.randn(keys.shape, generator=generator, dtype=keys.dtype).to(keys.device)

    metric.reset = lambda: generator.manual_seed(seed)
    return metric


# ----------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------
def evaluate(models: dict[str, nn.Module], test: Split, rs: Sequence[int]) -> dict[str, list[float]]:
    """Top-1 (%) of every variant at every r; the random control restarts its generator at each r."""
    table = {name: [] for name in models}
    for r in rs:
        for name, model in models.items():
            model.r = r
            if hasattr(getattr(model, "metric", None), "reset"):
                model.metric.reset()
            table[name].append(accuracy(model, test))
    return table


def measure_speed(baseline: nn.Module, test: Split, rs: Sequence[int], rounds: int, batch: int,
                  progress: bool) -> list[dict]:
    """Images per CPU-second at each r (one thread), ToMe and unpatched in round-robin, as bench_model."""
    tome = tome_kernels.patch.timm(copy.deepcopy(baseline))
    num_tokens = baseline.patch_embed.num_patches + baseline.num_prefix_tokens
    depth = len(baseline.blocks)

    def apply(r):
        tome.r = r

    def flops(r):
        return vit_flops(baseline, num_tokens, batch, None if r is None else [r] * depth)

    def free_merge(r):
        return vit_free_merge_forward(baseline, vit_token_counts(num_tokens, [r] * depth, baseline.num_prefix_tokens))

    work = Workload("digits ViT", (test.images[:batch],), batch, baseline, tome, list(rs), "r", apply, flops,
                    free_merge)
    times = time_workload(work, torch.device("cpu"), rounds, warmup=1, progress=progress, timer="cpu",
                          free_merge=True)
    return report(work, times)


def plot(rs, tokens, table, speed_rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    styles = ["o-", "s-", "v--", "x:"]
    for (name, values), style in zip(table.items(), styles):
        left.plot(rs, values, style, label=name)
    left.set_xlabel("r (merges per block)")
    left.set_ylabel("top-1 on 500 held-out digits (%)")
    left.set_title("accuracy at equal token counts", fontsize=9)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    top = left.secondary_xaxis("top")
    top.set_xticks(rs, [str(t) for t in tokens], fontsize=7)
    top.set_xlabel("tokens left after the last block", fontsize=8)
    tome_rows = [row for row in speed_rows if row["kind"] == "tome"]
    free_rows = [row for row in speed_rows if row["kind"] == "free"]
    merged = [r for r in rs if r > 0]
    right.plot(merged, [row["speedup"] for row in tome_rows], "o-", label="ToMe (measured)")
    right.plot(merged, [row["speedup"] for row in free_rows], "s:", label="tokens dropped, no merge work")
    right.plot(merged, [row["ceiling"] for row in tome_rows], "--", color="gray", label="FLOP-ratio ceiling")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xlabel("r (merges per block)")
    right.set_ylabel("speed-up over the unpatched model")
    right.set_title("speed (1 thread, CPU time)", fontsize=9)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _verdicts(rs, table, train_r: int) -> list[str]:
    off, trained, prune, rand = (table[name] for name in VARIANTS)
    merged = [i for i, r in enumerate(rs) if r > 0]
    lines = []
    for control, name in ((prune, "pruning"), (rand, "random merging")):
        wins = [rs[i] for i in merged if off[i] > control[i]]
        ties = [rs[i] for i in merged if off[i] == control[i]]
        losses = [rs[i] for i in merged if off[i] < control[i]]
        lines.append(f"- ToMe off the shelf against {name}: above at r = {_list(wins)}, equal at r = {_list(ties)}, "
                     f"below at r = {_list(losses)}.")
    high = [i for i in merged if rs[i] >= train_r]
    wins = [rs[i] for i in high if trained[i] > off[i]]
    lines.append(f"- Trained with ToMe (r = {train_r}) against off the shelf at r ≥ {train_r}: above at r = "
                 f"{_list(wins)} of {_list([rs[i] for i in high])}; at r = 0: {trained[0]:.1f}% against "
                 f"{off[0]:.1f}%.")
    last = len(rs) - 1
    lines.append(f"- At the largest r ({rs[last]}): {off[last]:.1f}% off the shelf, {trained[last]:.1f}% trained with "
                 f"ToMe, {prune[last]:.1f}% pruning, {rand[last]:.1f}% random merging (unmerged: {off[0]:.1f}%).")
    return lines


def _list(values) -> str:
    return ", ".join(str(v) for v in values) if values else "none"


def write_markdown(path: str, args, rs, tokens, table, speed_rows, seconds: dict, png: str, params: int) -> None:
    speed = {row["value"]: row for row in speed_rows if row["kind"] == "tome"}
    free = {row["value"]: row for row in speed_rows if row["kind"] == "free"}
    base = speed_rows[0]
    header = ("| r | tokens after block 1…6 | " + " | ".join(VARIANTS)
              + " | ToMe img/CPU-s | speed-up | free merge | FLOP ceiling |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for i, (r, counts) in enumerate(zip(rs, tokens)):
        accs = " | ".join(f"{table[name][i]:.1f}" for name in VARIANTS)
        if r == 0:
            lines.append(f"| 0 | {counts} | {accs} | {base['img_s']:.0f} (unpatched) | 1.00× | | 1.00× |")
        else:
            row = speed[r]
            lines.append(f"| {r} | {counts} | {accs} | {row['img_s']:.0f} | {row['speedup']:.2f}× | "
                         f"{free[r]['speedup']:.2f}× | {row['ceiling']:.2f}× |")
    cpu = _cpu_name()
    with open(path, "w") as f:
        f.write(_TEMPLATE.format(
            command=f"python -m tome_kernels.accuracy{' ' + ' '.join(args.argv) if args.argv else ''}",
            steps=args.steps, batch=args.batch, train_r=args.train_r, seed=args.seed, table="\n".join(lines),
            verdicts="\n".join(_verdicts(rs, table, args.train_r)), png=os.path.basename(png),
            torch=torch.__version__, cpu=cpu, rounds=args.rounds, speed_batch=args.speed_batch,
            train_s=seconds["train"], total_s=seconds["total"], load=_load(), params=params / 1e6, shift=MAX_SHIFT))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]}, {len(names)} logical CPUs" if names else platform.processor() or platform.machine()


def _load() -> str:
    try:
        return "load average " + " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


_TEMPLATE = """# Accuracy against r

Generated by `{command}` (seeded: the accuracies repeat exactly on one machine; another CPU or library
version can move a few test images). The model: a timm `VisionTransformer` (6 blocks, width 64, 4 heads,
MLP ×2, class-token pooling) on scikit-learn's handwritten digits upsampled to 32×32, cut into 4×4
patches: 64 patch tokens and a class token. 1,297 training images (shifted by up to {shift} pixel), 500 held
out. Both models: {steps} steps of batch {batch}, AdamW, cosine schedule, seed {seed}; one without merging,
one with ToMe at r = {train_r} in every block (gradients through `torch.ops.tome.bipartite_merge`,
proportional attention). Training took {train_s:.0f} s and the whole command {total_s:.0f} s on the machine
of the speed figures below (with its load).

![accuracy and speed against r]({png})

Top-1 (%) on the 500 held-out images. At each r every variant keeps the same number of tokens in each
block (column 2; r is clamped to half the mergeable tokens). *Pruning* drops the r tokens with the least
class-token attention where ToMe merges r pairs; *random merging* merges r random pairs with ToMe's own
size-weighted averaging and proportional attention. Speed: images per CPU-second of the ToMe model at
batch {speed_batch}, one thread, against the unpatched model and a "free merge" (the unpatched model
dropping tokens to the same counts: ToMe with merging at no cost), median of {rounds} round-robin rounds
(torch {torch}, {cpu}, {load}).

{table}

## What it shows

{verdicts}

The variants differ in one thing each. Random merging shares everything with ToMe (size-weighted averages,
proportional attention, token counts) except the choice of pairs: the gap between them is what matching
similar tokens buys. Pruning keeps as many tokens per block but discards the rest instead of averaging
them into a neighbour: the gap to it is what keeping their content buys. The model trained with merging
has learned with averaged tokens and the log-size bias, so it loses less where the off-the-shelf model
meets many merged tokens for the first time.

## How far this carries

This is a toy: 10 classes, 8×8 source images (each patch token is about one original pixel), a model of
{params:.2f} M parameters trained for minutes, 500 test images (one image is 0.2 points). Digits have a
large uniform background, whose tokens are redundant. What is likely to carry over to real models is
the ordering at equal token counts and the benefit of training with merging; not the size of each gap, the r at which
accuracy falls, or the speed: on a model this small fixed per-layer costs weigh more than on ViT-B, whose
throughput is in [BENCHMARKS.md](BENCHMARKS.md). For real weights and data, measure with
`python -m tome_kernels.eval_classification` (and `eval_detection` for DETR).
"""


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tome_kernels.accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-r", type=int, default=12, help="r while training the ToMe model")
    parser.add_argument("--r", type=int, nargs="+", default=[0, 4, 8, 12, 16, 20, 24, 32],
                        help="r values to evaluate (every block)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per r (median)")
    parser.add_argument("--speed-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (training and timing)")
    parser.add_argument("--out", default="docs/ACCURACY.md", help="markdown to write ('' to skip)")
    parser.add_argument("--plot", default="docs/accuracy.png", help="PNG to write ('' to skip)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.argv = [] if argv is None else list(argv)
    if 0 not in args.r:
        args.r = [0] + list(args.r)
    rs = sorted(set(args.r))

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train_split, test = digits(args.seed)
    progress = not args.no_progress
    baseline = make_vit(args.seed)
    train(baseline, train_split, args.steps, args.batch, seed=args.seed, progress=progress)
    tome_trained = tome_kernels.patch.timm(make_vit(args.seed))
    tome_trained.r = args.train_r
    train(tome_trained, train_split, args.steps, args.batch, seed=args.seed, progress=progress)
    train_seconds = time.perf_counter() - start

    models = dict(zip(VARIANTS, (tome_kernels.patch.timm(copy.deepcopy(baseline)), tome_trained,
                                 Control(baseline, "prune"), Control(baseline, "merge", random_metric(args.seed)))))
    table = evaluate(models, test, rs)
    depth = len(baseline.blocks)
    num_tokens = baseline.patch_embed.num_patches + baseline.num_prefix_tokens
    tokens = [", ".join(str(mlp) for _, mlp in vit_token_counts(num_tokens, [r] * depth, baseline.num_prefix_tokens))
              for r in rs]
    speed_rows = measure_speed(baseline, test, [r for r in rs if r > 0], args.rounds, args.speed_batch, progress)
    seconds = {"train": train_seconds, "total": time.perf_counter() - start}

    print(f"{'r':>3s}  " + "  ".join(f"{name:>26s}" for name in VARIANTS))
    for i, r in enumerate(rs):
        print(f"{r:3d}  " + "  ".join(f"{table[name][i]:26.1f}" for name in VARIANTS))
    print("\n".join(_verdicts(rs, table, args.train_r)))
    if args.plot:
        plot(rs, [t.split(", ")[-1] for t in tokens], table, speed_rows, args.plot)
        print(f"wrote {args.plot}")
    if args.out:
        params = sum(p.numel() for p in baseline.parameters())
        write_markdown(args.out, args, rs, tokens, table, speed_rows, seconds, args.plot or "accuracy.png", params)
        print(f"wrote {args.out}")
    return {"r": rs, "accuracy": table, "speed": speed_rows, "seconds": seconds}


if __name__ == "__main__":
    main()
