"""tome_kernels: Token Merging (ToMe) as fused, autograd-capable ``torch.ops.tome`` ops.

Importing the package registers every op. Public ops (see README for shapes)::

    torch.ops.tome.bipartite_merge(x, pos, size, r, metric=None, protected=0, pos_mode="keep")
    torch.ops.tome.bipartite_match(metric, r, protected=0)
    torch.ops.tome.merge(x, size, unm_idx, src_idx, dst_idx, protected=0)
    torch.ops.tome.unmerge(y, unm_idx, src_idx, dst_idx, protected=0)
    torch.ops.tome.prop_attention(q, k, v, size=None, scale=None)
    torch.ops.tome.merge_source(source, unm_idx, src_idx, dst_idx, protected=0)
"""

import torch

from . import _ops  # noqa: F401  (defines the schemas)
from ._backend import BACKENDS, available_backends, get_backend, set_backend, use_backend

bipartite_merge = torch.ops.tome.bipartite_merge
bipartite_match = torch.ops.tome.bipartite_match
merge = torch.ops.tome.merge
unmerge = torch.ops.tome.unmerge
prop_attention = torch.ops.tome.prop_attention
merge_source = torch.ops.tome.merge_source

__all__ = ["BACKENDS", "available_backends", "get_backend", "set_backend", "use_backend", "bipartite_merge",
           "bipartite_match", "merge", "unmerge", "prop_attention", "merge_source"]
