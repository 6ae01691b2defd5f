"""Every public ``torch.ops.tome`` op, by family, each module reading top to bottom: its schema, its real
kernel (validate, handle what reaches no backend, call the backend), its fake kernel, its autograd.

* :mod:`.match`: ``bipartite_match``
* :mod:`.merge`: ``bipartite_merge``, ``merge``, ``unmerge``, ``merge_source`` and their kernel ops
  ``_merge``, ``_merge_backward``, ``_unmerge_backward`` (uses ``bipartite_match``)
* :mod:`.attention`: ``prop_attention`` and its kernel ops ``_prop_attention``, ``_prop_attention_backward``

What reaches no backend is handled here, once: a clamped r of 0 (every op returns its input) and an
empty batch. Backends (:mod:`tome_kernels._backend`) may assume r >= 1 and batch >= 1. Validation:
:mod:`tome_kernels._validation`.
"""

from . import attention, match, merge  # noqa: F401  (defines the ops)
