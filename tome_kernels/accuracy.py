"""``python -m tome_kernels.accuracy``: runs :mod:`tome_kernels.tools.accuracy`."""

from .tools.accuracy import main

if __name__ == "__main__":
    main()
