"""Per-instance ToMe patches for model libraries (the libraries are imported on first use).

``tome_kernels.patch.timm(model, trace_source=False, prop_attn=True)`` turns a timm ``VisionTransformer``
into a ToMe model in place (then set ``model.r``); ``tome_kernels.patch.unpatch(model)`` reverts it.
``tome_kernels.patch.detr(model, er=0, mr=0, dr=0, prop_attn=True, pos_mode="keep")`` does the same for a
transformers 5.x ``DetrForObjectDetection`` / ``DetrModel``; ``tome_kernels.patch.detr_unpatch(model)``
reverts it. Only the patched instance changes: classes of the instance and its layers are swapped for
ToMe subclasses, no library code is modified. The names are functions; the modules are
``importlib.import_module("tome_kernels.patch.timm" | "tome_kernels.patch.detr")``.
"""

from .detr import apply_patch as detr
from .detr import unpatch as detr_unpatch
from .timm import apply_patch as timm
from .timm import parse_r, unpatch

__all__ = ["timm", "unpatch", "parse_r", "detr", "detr_unpatch"]
