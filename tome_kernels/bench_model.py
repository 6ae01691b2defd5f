"""``python -m tome_kernels.bench_model``: runs :mod:`tome_kernels.tools.bench_model`."""

from .tools.bench_model import main

if __name__ == "__main__":
    main()
