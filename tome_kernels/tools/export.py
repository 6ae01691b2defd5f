"""``python -m tome_kernels.export``: a timm model, patched, to ONNX (standard operators), checked in
onnxruntime; ``--compare`` also exports r = 0 and times both graphs in onnxruntime and both settings in
PyTorch, round-robin. See docs/EXPORT.md."""

from __future__ import annotations

import argparse
import time

import torch

from tome_kernels.export import export_onnx


def _interleaved_seconds(runs: dict, rounds: int) -> dict:
    """Median seconds of each callable, timed round-robin so that load on the machine hits all alike."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tome_kernels.export",
                                     description="Export a ToMe-patched timm model to ONNX (standard operators).")
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    parser.add_argument("--checkpoint", help="a state_dict file for the model (default: random weights)")
    parser.add_argument("--r", default=16, type=int, help="tokens merged per layer")
    parser.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--batch", type=int, default=1, help="example batch (the graph's batch is dynamic)")
    parser.add_argument("--onnx", required=True, help="output .onnx path")
    parser.add_argument("--check", type=int, default=3,
                        help="rounds of the onnxruntime check; with --compare, timing rounds (0: no check)")
    parser.add_argument("--compare", action="store_true",
                        help="also export r = 0 and time both in onnxruntime and PyTorch, interleaved")
    args = parser.parse_args(argv)

    import timm

    from tome_kernels import patch

    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = timm.create_model(args.model, pretrained=False, **kwargs)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu"))
    model.eval()
    patch.timm(model)
    images = torch.randn(args.batch, *model.pretrained_cfg["input_size"][:1], *model.patch_embed.img_size)
    model.r = args.r
    with torch.no_grad():
        expected = model(images).numpy()
    export_onnx(model, (images,), args.onnx)
    print(f"wrote {args.onnx} ({args.model}, r = {args.r}, dynamic batch)")
    if args.check <= 0:
        return
    import numpy as np
    import onnxruntime

    def session(path):
        return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    tome_session = session(args.onnx)
    feed = {tome_session.get_inputs()[0].name: images.numpy()}
    print(f"onnxruntime vs PyTorch (r = {args.r}): max abs difference "
          f"{np.abs(tome_session.run(None, feed)[0] - expected).max():.2e}")
    if not args.compare:
        return
    baseline_path = args.onnx.removesuffix(".onnx") + "_r0.onnx"
    model.r = 0
    export_onnx(model, (images,), baseline_path)
    baseline_session = session(baseline_path)

    def torch_run(r):
        model.r = r
        with torch.no_grad():
            model(images)

    seconds = _interleaved_seconds({
        "onnxruntime r=0": lambda: baseline_session.run(None, feed),
        f"onnxruntime r={args.r}": lambda: tome_session.run(None, feed),
        "torch r=0": lambda: torch_run(0),
        f"torch r={args.r}": lambda: torch_run(args.r),
    }, args.check)
    for name, value in seconds.items():
        print(f"{name:>18}: {value * 1e3:8.1f} ms per batch of {args.batch} (median of {args.check}, interleaved)")
    for runtime in ("onnxruntime", "torch"):
        print(f"{runtime} speed-up at r = {args.r}: "
              f"{seconds[f'{runtime} r=0'] / seconds[f'{runtime} r={args.r}']:.2f}x")


if __name__ == "__main__":
    main()
