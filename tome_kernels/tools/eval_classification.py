"""Top-1 accuracy and images/s of an image classifier with ToMe at several r, on an ImageFolder.

    python -m tome_kernels.eval_classification --model vit_base_patch16_224 --pretrained --data val/ --r 0 8 16
    python -m tome_kernels.eval_classification --model vit_small_patch16_224 --checkpoint vit.pth \\
        --model-kwargs num_classes=10 --data val/
    python -m tome_kernels.eval_classification --model facebook/deit-small-patch16-224 --data val/ --r 0 8 16

``--data``: one folder per class; the sorted folder names are the label ids (as torchvision's
``ImageFolder``, e.g. an ImageNet validation set sorted into its 1,000 synset folders). ``--model``: a timm
name (random weights unless ``--pretrained`` or ``--checkpoint FILE``; also ``hf-hub:...`` and
``local-dir:...``), or a Hugging Face image-classification model (a hub id or a local directory saved with
``save_pretrained``, with its image processor), loaded with ``from_pretrained``. Preprocessing is the
model's own (timm's data config; the HF image processor). Each r runs over the whole set; images/s counts
the model's forward only (no decoding or resizing), batch ``--batch``.
"""

from __future__ import annotations

import argparse
import ast
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

import tome_kernels
import tome_kernels.patch


@dataclass
class Classifier:
    """A loaded model: its logits for a batch, its preprocessing and how to set ToMe's r."""

    name: str
    model: nn.Module
    transform: Callable  # PIL image -> [3, H, W] tensor
    logits: Callable[[torch.Tensor], torch.Tensor]
    set_r: Callable[[int], None]


def _is_timm(name: str) -> bool:
    import timm

    return name.startswith(("hf-hub:", "local-dir:")) or timm.is_model(name)


def load_timm(name: str, pretrained: bool, checkpoint: str | None, model_kwargs: dict | None = None) -> Classifier:
    import timm

    model = timm.create_model(name, pretrained=pretrained, checkpoint_path=checkpoint or "", **(model_kwargs or {}))
    model.eval()
    return Classifier(name, model, timm_transform(model), model, patch(model, name))


def timm_transform(model: nn.Module):
    """timm's evaluation transform for ``model``, at the input size it was built for (``img_size=`` may
    differ from its pretrained config's)."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        config["input_size"] = (config["input_size"][0], *img_size)
    return create_transform(**config)


def load_hf(name: str) -> Classifier:
    """A transformers image classifier by hub id or local directory (``from_pretrained`` either way)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(name).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise SystemExit(f"eval_classification: no image processor for {name!r} (save one beside the model with "
                         f"processor.save_pretrained): {error}") from None
    set_r = patch(model, name)

    def transform(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    def logits(pixels):
        return model(pixel_values=pixels).logits

    return Classifier(name, model, transform, logits, set_r)


def patch(model: nn.Module, name: str) -> Callable[[int], None]:
    """Patch ``model`` with ``tome_kernels.patch.apply_patch`` (its family registry: timm ViTs and Evas, and
    the transformers families this build has) and return the r setter; one clear error for a model without
    a ToMe patch."""
    try:
        tome_kernels.patch.apply_patch(model)
    except TypeError as error:
        raise SystemExit(f"eval_classification: no ToMe patch for {name!r}: {error}") from None

    def set_r(r: int) -> None:
        model.r = r

    return set_r


def load(name: str, pretrained: bool = False, checkpoint: str | None = None,
         model_kwargs: dict | None = None) -> Classifier:
    """A timm name (or ``hf-hub:`` / ``local-dir:``) goes to timm, anything else to transformers."""
    if _is_timm(name):
        return load_timm(name, pretrained, checkpoint, model_kwargs)
    if pretrained or checkpoint or model_kwargs:
        raise SystemExit("eval_classification: --pretrained / --checkpoint / --model-kwargs are for timm names; "
                         "a Hugging Face id or directory brings its own weights and config")
    return load_hf(name)


def evaluate(classifier: Classifier, data_dir: str, rs: Sequence[int], batch: int = 64, workers: int = 0,
             limit: int | None = None, progress: bool = True) -> list[dict]:
    """Top-1 (%) and images/s of the forward at each r: ``[{"r", "top1", "img_s", "images"}, ...]``."""
    from torchvision.datasets import ImageFolder
    from tqdm import tqdm

    dataset = ImageFolder(data_dir, transform=classifier.transform)
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    rows = []
    for r in rs:
        classifier.set_r(r)
        correct = seen = 0
        seconds = 0.0
        with torch.inference_mode():
            for images, labels in tqdm(loader, desc=f"r={r}", unit="batch", disable=not progress, leave=False):
                start = time.perf_counter()
                predictions = classifier.logits(images).argmax(-1)
                seconds += time.perf_counter() - start
                correct += int((predictions == labels).sum())
                seen += len(labels)
        rows.append({"r": r, "top1": 100.0 * correct / max(seen, 1), "img_s": seen / max(seconds, 1e-12),
                     "images": seen})
    return rows


def format_table(rows: list[dict]) -> str:
    base = rows[0]["img_s"]
    lines = [f"{'r':>4s} {'top-1 %':>8s} {'img/s':>9s} {'speed-up':>9s}"]
    lines += [f"{row['r']:4d} {row['top1']:8.2f} {row['img_s']:9.1f} {row['img_s'] / base:8.2f}x" for row in rows]
    return "\n".join(lines)


def _literal_kwargs(pairs: Sequence[str]) -> dict:
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"eval_classification: --model-kwargs takes KEY=VALUE, got {pair!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value  # a bare string, e.g. global_pool=avg
    return kwargs


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m tome_kernels.eval_classification",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="timm name, Hugging Face id or local directory")
    parser.add_argument("--data", required=True, help="ImageFolder directory: one folder per class")
    parser.add_argument("--r", type=int, nargs="+", default=[0, 8, 16], help="merges per block")
    parser.add_argument("--pretrained", action="store_true", help="timm: load the pretrained weights")
    parser.add_argument("--checkpoint", default=None, help="timm: a state-dict file to load")
    parser.add_argument("--model-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                        help="timm: create_model arguments, e.g. num_classes=10 img_size=384 (Python literals)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.data):
        raise SystemExit(f"eval_classification: --data {args.data!r} is not a directory")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    classifier = load(args.model, args.pretrained, args.checkpoint, _literal_kwargs(args.model_kwargs))
    rows = evaluate(classifier, args.data, args.r, args.batch, args.workers, args.limit, not args.no_progress)
    print(f"{args.model} on {args.data} ({rows[0]['images']} images), batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
