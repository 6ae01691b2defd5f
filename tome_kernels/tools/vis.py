"""Pictures of what ToMe merged: each group of patches filled with its mean colour, group borders outlined.

    from tome_kernels.tools.vis import make_visualization
    model = tome_kernels.patch.timm(model, trace_source=True); model.r = 16; model(x)
    make_visualization(img, model._tome_info["source"][0], patch_size=16, num_prefix_tokens=1)

    python -m tome_kernels.vis --out docs/merging.png    # astronaut through a random-weight ViT-B/16
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def _as_rgb_array(img) -> np.ndarray:
    array = np.asarray(img)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"img must be an H x W x 3 image, got shape {array.shape}")
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = np.clip(array * 255.0 if array.max() <= 1.0 else array, 0, 255).astype(np.uint8)
    return array


def patch_groups(source, num_prefix_tokens: int = 1) -> np.ndarray:
    """Group id of every patch (``[num_patches]``) from a source map ``[N, N0]`` (or ``[1, N, N0]``)."""
    source = torch.as_tensor(source).detach().cpu()
    if source.dim() == 3:
        if source.shape[0] != 1:
            raise ValueError(f"pass the source map of one image, got shape {tuple(source.shape)}")
        source = source[0]
    patches = source[:, num_prefix_tokens:]
    if not torch.all(patches.sum(0) == 1):
        raise ValueError("source must map every patch to exactly one token (a ToMe source map)")
    return patches.argmax(0).numpy()


def make_visualization(img, source, patch_size: int = 16, num_prefix_tokens: int = 1, border_color=(255, 255, 255)):
    """The paper-style picture of a merge: ``img`` (PIL image or H x W x 3 array) with every group of
    merged patches filled with its mean colour and outlined. ``source`` is ``_tome_info["source"]`` of a
    ``trace_source=True`` forward (``[N, N0]`` or ``[1, N, N0]``). The image is resized to the patch grid
    (square unless its own size already fits). Returns a PIL image."""
    from PIL import Image

    groups = patch_groups(source, num_prefix_tokens)
    num_patches = groups.shape[0]
    rgb = _as_rgb_array(img)
    rows, cols = rgb.shape[0] // patch_size, rgb.shape[1] // patch_size
    if rows * cols != num_patches:
        rows = cols = int(round(num_patches ** 0.5))
        if rows * cols != num_patches:
            raise ValueError(f"{num_patches} patches do not fill a square grid; pass an image of the model's size")
    height, width = rows * patch_size, cols * patch_size
    if rgb.shape[:2] != (height, width):
        rgb = np.asarray(Image.fromarray(rgb).resize((width, height), Image.BICUBIC))

    labels = np.repeat(np.repeat(groups.reshape(rows, cols), patch_size, axis=0), patch_size, axis=1)
    flat = labels.reshape(-1)
    count = np.bincount(flat, minlength=groups.max() + 1)
    mean = np.stack([np.bincount(flat, weights=rgb[..., c].reshape(-1).astype(np.float64), minlength=count.size)
                     for c in range(3)], axis=-1) / np.maximum(count, 1)[:, None]
    out = mean[labels].round().astype(np.uint8)

    # Outline: the pixel on each side of a boundary between two groups (a 2-pixel line on patch edges).
    edge = np.zeros(labels.shape, dtype=bool)
    vertical = labels[:, 1:] != labels[:, :-1]
    edge[:, 1:] |= vertical
    edge[:, :-1] |= vertical
    horizontal = labels[1:] != labels[:-1]
    edge[1:] |= horizontal
    edge[:-1] |= horizontal
    out[edge] = border_color
    return Image.fromarray(out)


def _example_image(name: str):
    from skimage import data

    return getattr(data, name)()


def render_merging(image_name: str = "astronaut", model_name: str = "vit_base_patch16_224",
                   r_values=(8, 12, 16), seed: int = 0):
    """``[original, visualisation at each r]`` PIL images for ``image_name`` through a random-weight model."""
    import timm
    from PIL import Image

    from tome_kernels.patch import timm as patch_timm

    torch.manual_seed(seed)
    model = patch_timm(timm.create_model(model_name, pretrained=False).eval(), trace_source=True)
    height, width = model.patch_embed.img_size
    patch_size = model.patch_embed.patch_size[0]
    config = model.pretrained_cfg
    img = Image.fromarray(_as_rgb_array(_example_image(image_name))).resize((width, height), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = (torch.tensor(config.get(key, default)).view(3, 1, 1)
                 for key, default in (("mean", (0.485, 0.456, 0.406)), ("std", (0.229, 0.224, 0.225))))
    x = ((x - mean) / std).unsqueeze(0)
    panels = [img]
    with torch.no_grad():
        for r in r_values:
            model.r = r
            model(x)
            panels.append(make_visualization(img, model._tome_info["source"], patch_size, model.num_prefix_tokens))
    return panels


def _strip(panels, gap: int = 8):
    from PIL import Image

    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    strip = Image.new("RGB", (width, max(p.height for p in panels)), (255, 255, 255))
    left = 0
    for panel in panels:
        strip.paste(panel, (left, 0))
        left += panel.width + gap
    return strip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tome_kernels.vis", description=__doc__.split("\n")[0])
    parser.add_argument("--image", default="astronaut", help="a skimage.data image (astronaut, chelsea, ...)")
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model (random weights)")
    parser.add_argument("--r", default="8,12,16", help="comma-separated r values, one panel each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/merging.png")
    args = parser.parse_args(argv)
    panels = render_merging(args.image, args.model, [int(v) for v in args.r.split(",")], args.seed)
    _strip(panels).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
