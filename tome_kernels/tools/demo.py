"""The README's demo: ToMe on a random-weight timm ViT-B/16, and the ops against the plain-PyTorch reference.

    python -m tome_kernels.demo [--batch 8] [--r 16] [--model vit_base_patch16_224]
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch.utils import benchmark

import tome_kernels


def _seconds(fn, min_run_time: float) -> float:
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def model_speed(model_name: str, batch: int, r: int) -> None:
    import timm

    import tome_kernels.patch
    from tome_kernels.tools.bench_model import copy_sharing_weights

    model = timm.create_model(model_name, pretrained=False).eval()
    patched = copy_sharing_weights(model)
    tome_kernels.patch.timm(patched)
    patched.r = r
    images = torch.randn(batch, 3, *model.default_cfg["input_size"][1:])
    with torch.inference_mode():
        base = _seconds(lambda: model(images), 3.0)
        tome = _seconds(lambda: patched(images), 3.0)
    print(f"{model_name}, batch {batch}, random weights")
    print(f"  without ToMe : {batch / base:8.1f} img/s")
    print(f"  ToMe r={r:<5} : {batch / tome:8.1f} img/s   ({base / tome:.2f}x)")


def op_speed() -> None:
    """bipartite_merge at the ViT-B shape (B=32, N=197, C=768, metric C=64, class token, r=16), each compiled
    backend against the ``torch`` backend (the plain-PyTorch reference)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 197, 768, generator=gen)
    metric = torch.randn(32, 197, 64, generator=gen)
    size = torch.ones(32, 197, 1)

    def timed(backend: str) -> float:
        with tome_kernels.use_backend(backend):
            return _seconds(lambda: torch.ops.tome.bipartite_merge(x, None, size, 16, metric=metric, protected=1), 1.0)

    with torch.inference_mode():
        reference = timed("torch")
        print("bipartite_merge, ViT-B shape (B=32, N=197, C=768, r=16), fp32:")
        print(f"  plain-PyTorch reference  : {reference * 1e3:7.2f} ms")
        for backend, reason in tome_kernels.available_backends("cpu").items():
            if reason is not None or backend in ("torch", "triton"):  # the interpreter is not a benchmark
                continue
            seconds = timed(backend)
            print(f"  tome backend {backend:<11} : {seconds * 1e3:7.2f} ms   ({reference / seconds:.1f}x the reference)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"backends for CPU tensors: {[k for k, v in tome_kernels.available_backends('cpu').items() if v is None]}")
    model_speed(args.model, args.batch, args.r)
    op_speed()


if __name__ == "__main__":
    main()
