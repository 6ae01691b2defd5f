"""The evaluation CLIs end to end on small data made here: an ImageFolder and a COCO-format set cut from a
scikit-image sample, random-weight models saved to disk and loaded the way a hub id would be."""

import json

import pytest
import torch

pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from tome_kernels.tools import eval_classification, eval_detection  # noqa: E402

CLASSES = ["cat", "dog", "eel"]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def _crops(count: int, size: int):
    from skimage import data

    picture = data.astronaut()  # 512 x 512 x 3
    step = (picture.shape[0] - size) // count
    return [PIL.fromarray(picture[i * step:i * step + size, i * step:i * step + size]) for i in range(count)]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    crops = _crops(2 * len(CLASSES), 96)
    for index, name in enumerate(CLASSES):
        (root / name).mkdir()
        for j in range(2):
            crops[2 * index + j].save(root / name / f"{j}.png")
    return root


def _check_rows(rows, rs, images):
    assert [row["r"] for row in rows] == rs
    for row in rows:
        assert row["images"] == images
        assert 0.0 <= row["top1"] <= 100.0 and row["img_s"] > 0


def test_classification_timm_checkpoint(image_folder, tmp_path, capsys):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=len(CLASSES), img_size=96)
    checkpoint = tmp_path / "vit.pth"
    torch.save(model.state_dict(), checkpoint)
    rows = eval_classification.main(["--model", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint),
                                     "--data", str(image_folder), "--r", "0", "4", "16", "--batch", "4",
                                     "--no-progress", "--model-kwargs", f"num_classes={len(CLASSES)}",
                                     "img_size=96"])
    _check_rows(rows, [0, 4, 16], 2 * len(CLASSES))
    # r = 0 is the unpatched model: the same predictions as timm's own forward.
    expected = _timm_top1(model, image_folder)
    assert rows[0]["top1"] == pytest.approx(expected)
    out = capsys.readouterr().out
    assert "top-1 %" in out and "img/s" in out and out.count("\n") >= 5


def _timm_top1(model, folder) -> float:
    from torchvision.datasets import ImageFolder

    data = ImageFolder(folder, transform=eval_classification.timm_transform(model))
    images = torch.stack([image for image, _ in data])
    labels = torch.tensor([label for _, label in data])
    with torch.inference_mode():
        return 100.0 * float((model.eval()(images).argmax(-1) == labels).float().mean())


def _hf_vit(directory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=len(CLASSES))
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(directory)


def test_classification_hf_local_dir(image_folder, tmp_path):
    from transformers import ViTForImageClassification

    import tome_kernels.patch

    _hf_vit(tmp_path / "vit")
    argv = ["--model", str(tmp_path / "vit"), "--data", str(image_folder), "--r", "0", "8", "--no-progress"]
    try:
        tome_kernels.patch.apply_patch(ViTForImageClassification.from_pretrained(tmp_path / "vit"))
    except TypeError:  # a build without the transformers ViT patch: one clear message, not a traceback
        with pytest.raises(SystemExit, match="no ToMe patch"):
            eval_classification.main(argv)
        return
    _check_rows(eval_classification.main(argv), [0, 8], 2 * len(CLASSES))


def test_classification_errors(image_folder, tmp_path):
    with pytest.raises(SystemExit, match="not a directory"):
        eval_classification.main(["--model", "vit_tiny_patch16_224", "--data", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="no ToMe patch"):
        eval_classification.main(["--model", "resnet18", "--data", str(image_folder), "--no-progress"])


# ----------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    """Three 128 x 160 images with two boxes each, categories with COCO-like ids 1, 3, 5."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 5, "name": "plane"}]
    images, annotations = [], []
    for index, crop in enumerate(_crops(3, 200)):
        crop.resize((160, 128)).save(root / "images" / f"{index}.jpg")
        images.append({"id": index + 1, "file_name": f"{index}.jpg", "height": 128, "width": 160})
        for j, box in enumerate(([10, 20, 50, 40], [70, 30, 60, 80])):
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": [1, 3, 5][j + index % 2], "bbox": box, "area": box[2] * box[3],
                                "iscrowd": 0})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root / "images", path


def _tiny_detr(directory, labels, deformable=False):
    from transformers import (DeformableDetrConfig, DeformableDetrForObjectDetection, DeformableDetrImageProcessor,
                              DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig)

    torch.manual_seed(0)
    stages = ["stage2", "stage3", "stage4"] if deformable else ["stage4"]
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=stages)
    # Deformable DETR with one decoder layer fails transformers 5.23's weight-tying check (bbox_embed): two.
    settings = dict(backbone_config=backbone, d_model=32, encoder_layers=2, decoder_layers=2 if deformable else 1,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    num_queries=10, num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={n: i for i, n in enumerate(labels)})
    model_cls, config_cls, processor_cls = ((DeformableDetrForObjectDetection, DeformableDetrConfig,
                                             DeformableDetrImageProcessor) if deformable else
                                            (DetrForObjectDetection, DetrConfig, DetrImageProcessor))
    if not deformable:
        settings.update(use_timm_backbone=False, use_pretrained_backbone=False)
    model_cls(config_cls(**settings)).save_pretrained(directory)
    processor_cls(size={"shortest_edge": 128, "longest_edge": 160}).save_pretrained(directory)


def test_detection_detr_local_dir(coco_set, tmp_path, capsys):
    images, annotations = coco_set
    _tiny_detr(tmp_path / "detr", ["plane", "person", "car", "boat"])
    rows = eval_detection.main(["--model", str(tmp_path / "detr"), "--images", str(images), "--annotations",
                                str(annotations), "--er", "0", "8", "16", "--mr", "0", "8", "8", "--no-progress"])
    assert [row["setting"] for row in rows] == [{"er": 0, "mr": 0}, {"er": 8, "mr": 8}, {"er": 16, "mr": 8}]
    for row in rows:
        assert row["images"] == 3 and row["img_s"] > 0
        assert 0.0 <= row["ap"] <= 100.0 and 0.0 <= row["ap50"] <= 100.0
        assert row["detections"] > 0  # every label but "boat" maps to a category by name
    out = capsys.readouterr().out
    assert "AP50" in out and "img/s" in out and out.count("\n") >= 4


def test_detection_deformable_local_dir(coco_set, tmp_path):
    import tome_kernels.patch

    images, annotations = coco_set
    _tiny_detr(tmp_path / "deformable", ["plane", "person", "car"], deformable=True)
    argv = ["--model", str(tmp_path / "deformable"), "--images", str(images), "--annotations", str(annotations),
            "--ratio", "0", "0.5", "--no-progress"]
    if getattr(tome_kernels.patch, "deformable_detr", None) is None:  # a build without the Deformable DETR patch
        with pytest.raises(SystemExit, match="no ToMe patch for DeformableDetrForObjectDetection"):
            eval_detection.main(argv)
        return
    rows = eval_detection.main(argv)
    assert [row["setting"] for row in rows] == [{"ratio": 0.0}, {"ratio": 0.5}]
    assert all(row["images"] == 3 and row["detections"] > 0 and 0.0 <= row["ap"] <= 100.0 for row in rows)
    with pytest.raises(SystemExit, match="takes --ratio"):
        eval_detection.main(argv[:-4] + ["--er", "8", "--no-progress"])


def test_detection_category_map(coco_set, tmp_path):
    from pycocotools.coco import COCO
    from transformers import DetrConfig

    _, annotations = coco_set
    coco = COCO(str(annotations))

    class Named:
        config = DetrConfig(id2label={0: "plane", 1: "person", 2: "car", 3: "boat"})

    assert eval_detection.category_map(Named, coco) == {0: 5, 1: 1, 2: 3}

    class ById:  # names that are not the categories': label ids are taken as category ids
        config = DetrConfig(id2label={i: f"LABEL_{i}" for i in range(6)})

    assert eval_detection.category_map(ById, coco) == {1: 1, 3: 3, 5: 5}


def test_detection_errors(coco_set, tmp_path):
    images, annotations = coco_set
    _tiny_detr(tmp_path / "detr", ["plane", "person", "car"])
    common = ["--model", str(tmp_path / "detr"), "--images", str(images), "--annotations", str(annotations)]
    with pytest.raises(SystemExit, match="--ratio is for Deformable DETR"):
        eval_detection.main(common + ["--ratio", "0.5"])
    with pytest.raises(SystemExit, match="one per --er"):
        eval_detection.main(common + ["--er", "0", "8", "16", "--mr", "0", "8"])
