"""``python -m tome_kernels.bench_detr``: runs :mod:`tome_kernels.tools.bench_detr`."""

from .tools.bench_detr import main

if __name__ == "__main__":
    main()
