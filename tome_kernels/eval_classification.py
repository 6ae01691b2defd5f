"""``python -m tome_kernels.eval_classification``: runs :mod:`tome_kernels.tools.eval_classification`."""

from .tools.eval_classification import main

if __name__ == "__main__":
    main()
