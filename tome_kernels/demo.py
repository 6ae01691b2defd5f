"""``python -m tome_kernels.demo``: runs :mod:`tome_kernels.tools.demo`."""

from .tools.demo import main

if __name__ == "__main__":
    main()
