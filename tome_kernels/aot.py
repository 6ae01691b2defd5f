"""``python -m tome_kernels.aot``: runs :mod:`tome_kernels.tools.aot`."""

import sys

from .tools.aot import main

if __name__ == "__main__":
    sys.exit(main())
