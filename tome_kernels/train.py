"""``python -m tome_kernels.train``: runs :mod:`tome_kernels.tools.train`."""

from .tools.train import main

if __name__ == "__main__":
    main()
