"""tome_kernels: Token Merging (ToMe) as fused, autograd-capable ``torch.ops.tome`` ops.

Importing the package registers every op. Public ops (see README for shapes)::

    torch.ops.tome.bipartite_merge(x, pos, size, r, metric=None, protected=0, pos_mode="keep")
    torch.ops.tome.bipartite_match(metric, r, protected=0)
    torch.ops.tome.window_match(metric, windows, r)
    torch.ops.tome.merge(x, size, unm_idx, src_idx, dst_idx, protected=0)
    torch.ops.tome.unmerge(y, unm_idx, src_idx, dst_idx, protected=0)
    torch.ops.tome.prop_attention(q, k, v, size=None, scale=None)
    torch.ops.tome.merge_source(source, unm_idx, src_idx, dst_idx, protected=0)
"""

import torch

from . import _native, _ops, _triton_backend, reference
from ._backend import (Backend, available_backends, backend_names, get_backend, register_backend, set_backend,
                       set_default_from_env, unregister_backend, use_backend)

# The built-in backends, one line each (``auto`` orders them by priority).
register_backend(_triton_backend.TritonBackend())
register_backend(_native.CUDA)
register_backend(_native.CPU)
register_backend(reference.TorchBackend())
set_default_from_env()

BACKENDS = backend_names()  # the built-in ones; backend_names() also lists those registered later

bipartite_merge = torch.ops.tome.bipartite_merge
bipartite_match = torch.ops.tome.bipartite_match
window_match = torch.ops.tome.window_match
merge = torch.ops.tome.merge
unmerge = torch.ops.tome.unmerge
prop_attention = torch.ops.tome.prop_attention
merge_source = torch.ops.tome.merge_source

__all__ = ["BACKENDS", "Backend", "available_backends", "backend_names", "get_backend", "register_backend",
           "set_backend", "unregister_backend", "use_backend", "bipartite_merge", "bipartite_match", "window_match", "merge",
           "unmerge", "prop_attention", "merge_source"]
