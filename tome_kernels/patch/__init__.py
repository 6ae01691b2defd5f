"""Per-instance ToMe patches for model libraries.

``tome_kernels.patch.timm(model, trace_source=False, prop_attn=True)`` turns a timm ``VisionTransformer``
into a ToMe model in place (then set ``model.r``); ``tome_kernels.patch.unpatch(model)`` reverts it.
Only the patched instance changes: its class and its blocks' and attention layers' classes are swapped
for ToMe subclasses, no library code is modified. The model libraries are imported on first use.
"""

from .timm import apply_patch as timm
from .timm import parse_r, unpatch

__all__ = ["timm", "unpatch", "parse_r"]
