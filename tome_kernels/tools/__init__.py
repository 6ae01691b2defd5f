"""The command-line tools: model and detector benchmarks, the demo, the merge picture, training and the
accuracy study, evaluation, export and the Triton AOT check. Each runs as ``python -m tome_kernels.<name>``
(a thin entry module beside the library modules) or ``python -m tome_kernels.tools.<name>``."""
