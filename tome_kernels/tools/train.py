"""A small ViT on scikit-learn's digits, trained with or without ToMe, in one process or under DDP.

    python -m tome_kernels.train --steps 20 --batch 64 --tome-r 4 --losses single.json
    torchrun --standalone --nproc-per-node 2 -m tome_kernels.train --steps 20 --batch 64 --tome-r 4 --losses ddp.json

The task: the 1,797 8×8 handwritten digits of ``sklearn.datasets.load_digits`` (they ship inside the
package), upsampled to 32×32 and cut into 4×4 patches: 64 patch tokens and a class token. A fixed, seeded
split keeps 500 images for testing. Training shifts each image by up to ``MAX_SHIFT`` pixels (drawn from
the run's seeded generator); AdamW with a cosine schedule.

Under ``torchrun`` (gloo, CPU) every rank draws the same global batch and takes its own
contiguous slice of it; ``DistributedDataParallel`` averages the gradients, so a run with W ranks follows
the single-process run with the same global batch (``--batch`` is global). The loss each step is the mean
over the global batch; ``--losses`` writes it as JSON (rank 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMG_SIZE = 32
PATCH = 4
NUM_CLASSES = 10
TEST_IMAGES = 500
MAX_SHIFT = 1


@dataclass
class Split:
    images: torch.Tensor  # [N, 1, 32, 32] float32, normalised
    labels: torch.Tensor  # [N] int64


def digits(seed: int = 0) -> tuple[Split, Split]:
    """(train, test): scikit-learn's digits upsampled to 32×32, split by a permutation drawn from ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    small = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(small, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test, train = order[:TEST_IMAGES], order[TEST_IMAGES:]
    return Split(images[train], labels[train]), Split(images[test], labels[test])


def make_vit(seed: int = 0, depth: int = 6, embed_dim: int = 64, num_heads: int = 4) -> nn.Module:
    """The small timm ViT of this task (class-token pooling), initialised from ``seed``."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=IMG_SIZE, patch_size=PATCH, in_chans=1, num_classes=NUM_CLASSES,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=2.0,
                             global_pool="token")


def shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random offset in [-MAX_SHIFT, MAX_SHIFT]² (zero-padded: background)."""
    batch = images.shape[0]
    offsets = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (batch, 2), generator=generator)
    background = images.amin()
    padded = F.pad(images, (MAX_SHIFT,) * 4, value=float(background))
    rows = (torch.arange(IMG_SIZE) + MAX_SHIFT).unsqueeze(0) - offsets[:, :1]  # [B, H]
    cols = (torch.arange(IMG_SIZE) + MAX_SHIFT).unsqueeze(0) - offsets[:, 1:]  # [B, W]
    index = torch.arange(batch)[:, None, None]
    return padded[index, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train(model: nn.Module, data: Split, steps: int, batch: int, lr: float = 3e-3, seed: int = 0,
          rank: int = 0, world: int = 1, progress: bool = False) -> list[float]:
    """Train ``model`` (wrapped in DDP by the caller when ``world`` > 1) for ``steps`` global batches of
    ``batch`` images; this rank computes the slice ``[rank * batch / world, (rank + 1) * batch / world)``.
    Returns the loss of every step, averaged over the global batch."""
    if batch % world:
        raise ValueError(f"batch ({batch}) must be divisible by the number of ranks ({world})")
    local = batch // world
    generator = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                                  lr=lr)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    per_epoch = len(data.labels) // batch
    order = None
    losses = []
    from tqdm import tqdm

    model.train()
    for step in tqdm(range(steps), desc="train", unit="step", disable=not progress, leave=False):
        if step % per_epoch == 0:
            order = torch.randperm(len(data.labels), generator=generator)
        index = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        images = shift(data.images[index], generator)[rank * local:(rank + 1) * local]
        labels = data.labels[index][rank * local:(rank + 1) * local]
        loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        mean = loss.detach().clone()
        if world > 1:
            torch.distributed.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
    model.eval()
    return losses


@torch.inference_mode()
def accuracy(model: nn.Module, data: Split, batch: int = 250) -> float:
    """Top-1 accuracy (%) of ``model`` on ``data``."""
    model.eval()
    correct = sum(int((model(data.images[i:i + batch]).argmax(-1) == data.labels[i:i + batch]).sum())
                  for i in range(0, len(data.labels), batch))
    return 100.0 * correct / len(data.labels)


def main(argv: Sequence[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(prog="python -m tome_kernels.train", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64, help="global batch (split over the ranks)")
    # Not --r: torchrun would take it as an abbreviation of its own --rdzv-* options.
    parser.add_argument("--tome-r", type=int, default=4, help="ToMe merges per block while training (0: none)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--losses", default=None, help="write the per-step losses to this JSON file")
    args = parser.parse_args(argv)

    import tome_kernels.patch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model = tome_kernels.patch.timm(make_vit(args.seed))
    model.r = args.tome_r
    if world > 1:
        torch.distributed.init_process_group("gloo")
        model = nn.parallel.DistributedDataParallel(model)
    train_split, _ = digits(args.seed)
    losses = train(model, train_split, args.steps, args.batch, args.lr, args.seed, rank, world)
    if rank == 0:
        print(f"world {world}, global batch {args.batch}, r {args.tome_r}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        if args.losses:
            with open(args.losses, "w") as f:
                json.dump({"world": world, "losses": losses}, f)
    if world > 1:
        torch.distributed.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
