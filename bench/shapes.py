"""The one shapes table of the op benchmarks, and the device and dtypes they run on.

Batches: the GPU value is what the issue asks (B=64 for ViTs); the CPU value keeps one merge call at
~1-20 ms on the 2-core machine (DETR keeps B=2 everywhere, as a detection batch). r per shape:

* ViT at 224 (N=197): r=16 per layer, the paper's ViT-B/L setting (12 or 24 layers).
* ViT-B at 384 (N=577): r=45, the setting docs/BENCHMARKS.md times vit_base_patch16_384 with (12 layers
  x 45 = 540 of the 576 patch tokens merged, the same 94% as 12 x 16 = 192 of 196 at 224).
* DETR encoder (N~1100 for an 800x1066 image): r=128, the er=100..140 range of docs/DETR.md.
* Diffusion (SD 1.x first UNet level, 64x64 latent, C=320, 8 heads of 40): r=1024, i.e. ToMe-SD's
  ``r = ratio * N`` at ratio 0.25. ToMe-SD's default 0.5 would merge every A token, where ranking is moot.
* Deformable DETR encoder (window_match only): 17,821 multi-scale tokens, 2x4 tiles, ratio 0.5.

Metric: ViTs match on the keys averaged over heads (metric C = head dim = 64, its own tensor); DETR and
diffusion match on x itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    label: str
    batch_cpu: int
    batch_gpu: int
    tokens: int
    channels: int
    metric_channels: int | None  # None: the metric is x
    protected: int  # 1: a class token that never merges
    r: int
    heads: int
    head_dim: int

    def batch(self, device: str) -> int:
        return self.batch_cpu if device == "cpu" else self.batch_gpu


SHAPES = {
    "vit_s": Shape("ViT-S/16 224", 32, 64, 197, 384, 64, 1, 16, 6, 64),
    "vit_b": Shape("ViT-B/16 224", 32, 64, 197, 768, 64, 1, 16, 12, 64),
    "vit_l": Shape("ViT-L/16 224", 16, 64, 197, 1024, 64, 1, 16, 16, 64),
    "vit_b_384": Shape("ViT-B/16 384", 8, 64, 577, 768, 64, 1, 45, 12, 64),
    "detr": Shape("DETR encoder", 2, 2, 1100, 256, None, 0, 128, 8, 32),
    "diffusion": Shape("diffusion 64x64", 1, 8, 4096, 320, None, 0, 1024, 8, 40),
    # window_match only: the encoder of Deformable DETR at 800x1066 (four levels, WINDOW_LEVELS), matched in
    # 2x4 tiles at ratio 0.5 (r = 8910, clamped to the 8680 A tokens the tiles hold).
    "deformable_detr": Shape("Deformable DETR encoder 800x1066", 1, 2, 17821, 256, None, 0, 8910, 8, 32),
}
WINDOW_SHAPES = ("deformable_detr",)
WINDOW_LEVELS = ((100, 134), (50, 67), (25, 34), (13, 17))
WINDOW_TILE = (2, 4)
# The headline shapes (the bars in docs/BENCHMARKS.md): bipartite_merge at these two, and
# prop_attention at N=197 and N=577.
MERGE_HEADLINE = ("vit_b", "detr")
ATTENTION_HEADLINE = ("vit_b", "vit_b_384")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# TOME_BENCH_DEVICE=cpu times CPU tensors on a GPU machine too.
DEVICE = os.environ.get("TOME_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
# Quick mode (CI: every op, direction and provider still runs, so none can rot): the headline shapes
# only, the compiled chain only in the fp32 forward, no warm-up call.
QUICK = os.environ.get("TOME_BENCH_QUICK") == "1"
RUN_SHAPES = tuple(name for name in SHAPES if name not in WINDOW_SHAPES
                   and (not QUICK or name in MERGE_HEADLINE + ATTENTION_HEADLINE))
