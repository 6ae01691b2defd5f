"""COCO AP and images/s of a DETR-family detector with ToMe at several merge settings.

    python -m tome_kernels.eval_detection --model facebook/detr-resnet-50 --images val2017/ \\
        --annotations annotations/instances_val2017.json --er 0 50 100 --mr 0 50 100
    python -m tome_kernels.eval_detection --model SenseTime/deformable-detr --images val2017/ \\
        --annotations annotations/instances_val2017.json --ratio 0 0.25 0.5

``--model``: a transformers object-detection model, a hub id or a local directory saved with
``save_pretrained`` (with its image processor), loaded with ``from_pretrained``. DETR takes ``--er``
(encoder merges per layer), ``--mr`` (memory merges before the decoder; one value, or one per ``--er``)
and ``--dr`` (decoder query merges per layer); Deformable DETR takes ``--ratio`` (the fraction of encoder
queries merged per layer). Detections: the processor's ``post_process_object_detection`` at score
threshold 0, boxes in the original image size. A model label counts as the COCO category of the same name
when every category name of the annotations is one of the model's labels, else as the category with that
id (COCO-trained DETR checkpoints use the COCO ids as label ids). AP: pycocotools' ``COCOeval`` (bbox).
images/s counts the model's forward only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time
from typing import Sequence

import torch
from torch import nn

import tome_kernels
import tome_kernels.patch

# transformers class name -> the tome_kernels.patch function for it (absent from a build: a clear error).
FAMILIES = {
    "DetrForObjectDetection": "detr",
    "DeformableDetrForObjectDetection": "deformable_detr",
}


def load(name: str):
    """(model, image processor) by hub id or local directory."""
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    model = AutoModelForObjectDetection.from_pretrained(name).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise SystemExit(f"eval_detection: no image processor for {name!r} (save one beside the model with "
                         f"processor.save_pretrained): {error}") from None
    return model, processor


def settings_for(model: nn.Module, args) -> list[dict]:
    """Patch ``model`` for its family and return the merge settings to evaluate (attribute -> value)."""
    kind = FAMILIES.get(type(model).__name__)
    patch = getattr(tome_kernels.patch, kind, None) if kind else None
    if patch is None:
        have = [cls for cls, attr in FAMILIES.items() if getattr(tome_kernels.patch, attr, None) is not None]
        raise SystemExit(f"eval_detection: no ToMe patch for {type(model).__name__} in this tome_kernels "
                         f"(supported: {', '.join(have)})")
    if kind == "detr":
        if args.ratio is not None:
            raise SystemExit("eval_detection: --ratio is for Deformable DETR; DETR takes --er / --mr / --dr")
        er = args.er or [0]
        mr = args.mr or [0]
        if len(mr) not in (1, len(er)):
            raise SystemExit(f"eval_detection: --mr takes one value or one per --er ({len(er)}), got {len(mr)}")
        mr = mr * len(er) if len(mr) == 1 else mr
        patch(model, er=0, mr=0, dr=args.dr)
        return [{"er": e, "mr": m} for e, m in zip(er, mr)]
    if args.er or args.mr or args.dr:
        raise SystemExit("eval_detection: Deformable DETR takes --ratio, not --er / --mr / --dr")
    patch(model, ratio=0.0)
    return [{"ratio": ratio} for ratio in (args.ratio or [0.0])]


def category_map(model: nn.Module, coco) -> dict[int, int]:
    """Model label id -> COCO category id (by name when the names cover the categories, else by id)."""
    labels = {int(i): name for i, name in model.config.id2label.items()}
    categories = {cat["id"]: cat["name"] for cat in coco.loadCats(coco.getCatIds())}
    by_name = {name: cat_id for cat_id, name in categories.items()}
    if set(by_name) <= set(labels.values()):
        return {label: by_name[name] for label, name in labels.items() if name in by_name}
    return {label: label for label in labels if label in categories}


def evaluate(model, processor, images_dir: str, annotations: str, settings: list[dict], batch: int = 1,
             limit: int | None = None, progress: bool = True) -> list[dict]:
    """COCO bbox AP, AP50, AP75 and images/s of the forward for each setting."""
    from PIL import Image
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from tqdm import tqdm

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(annotations)
    image_ids = sorted(coco.getImgIds())[:limit]
    to_category = category_map(model, coco)
    rows = []
    for setting in settings:
        for attr, value in setting.items():
            setattr(model, attr, value)
        results, seconds = [], 0.0
        label = " ".join(f"{k}={v}" for k, v in setting.items())
        for start in tqdm(range(0, len(image_ids), batch), desc=label, unit="batch", disable=not progress,
                          leave=False):
            ids = image_ids[start:start + batch]
            infos = coco.loadImgs(ids)
            pictures = [Image.open(os.path.join(images_dir, info["file_name"])).convert("RGB") for info in infos]
            inputs = processor(images=pictures, return_tensors="pt")
            with torch.inference_mode():
                begin = time.perf_counter()
                outputs = model(**inputs)
                seconds += time.perf_counter() - begin
            sizes = torch.tensor([[info["height"], info["width"]] for info in infos])
            found = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
            for image_id, detections in zip(ids, found):
                for score, label_id, box in zip(detections["scores"].tolist(), detections["labels"].tolist(),
                                                detections["boxes"].tolist()):
                    if label_id in to_category:
                        x0, y0, x1, y1 = box
                        results.append({"image_id": image_id, "category_id": to_category[label_id],
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
        stats = _coco_ap(coco, results, image_ids, COCOeval)
        rows.append({"setting": setting, "ap": stats[0], "ap50": stats[1], "ap75": stats[2],
                     "img_s": len(image_ids) / max(seconds, 1e-12), "images": len(image_ids),
                     "detections": len(results)})
    return rows


def _coco_ap(coco, results: list[dict], image_ids: list[int], coco_eval) -> list[float]:
    if not results:  # pycocotools refuses an empty result list
        return [0.0] * 12
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = coco_eval(coco, coco.loadRes(results), "bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [max(0.0, float(v)) * 100 for v in evaluator.stats]  # -1 (no ground truth in a range) -> 0


def format_table(rows: list[dict]) -> str:
    base = rows[0]["img_s"]
    names = list(rows[0]["setting"])
    lines = [" ".join(f"{name:>6s}" for name in names) + f" {'AP':>6s} {'AP50':>6s} {'AP75':>6s} {'img/s':>8s} "
             f"{'speed-up':>9s}"]
    for row in rows:
        values = " ".join(f"{row['setting'][name]:>6g}" for name in names)
        lines.append(f"{values} {row['ap']:6.1f} {row['ap50']:6.1f} {row['ap75']:6.1f} {row['img_s']:8.2f} "
                     f"{row['img_s'] / base:8.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m tome_kernels.eval_detection", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face id or local directory (DETR family)")
    parser.add_argument("--images", required=True, help="directory of the images named in the annotations")
    parser.add_argument("--annotations", required=True, help="COCO instances JSON")
    parser.add_argument("--er", type=int, nargs="+", default=None, help="DETR: encoder merges per layer")
    parser.add_argument("--mr", type=int, nargs="+", default=None, help="DETR: memory merges (one, or one per --er)")
    parser.add_argument("--dr", type=int, default=0, help="DETR: decoder query merges per layer")
    parser.add_argument("--ratio", type=float, nargs="+", default=None,
                        help="Deformable DETR: fraction of encoder queries merged per layer")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images (by id)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for path, what in ((args.images, "--images"), (args.annotations, "--annotations")):
        if not os.path.exists(path):
            raise SystemExit(f"eval_detection: {what} {path!r} does not exist")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model, processor = load(args.model)
    settings = settings_for(model, args)
    rows = evaluate(model, processor, args.images, args.annotations, settings, args.batch, args.limit,
                    not args.no_progress)
    print(f"{args.model} on {args.annotations} ({rows[0]['images']} images), batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; COCO bbox AP (%)")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
