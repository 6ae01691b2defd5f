"""``python -m tome_kernels.eval_detection``: runs :mod:`tome_kernels.tools.eval_detection`."""

from .tools.eval_detection import main

if __name__ == "__main__":
    main()
