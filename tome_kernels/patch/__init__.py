"""Per-instance ToMe patches for model libraries (the libraries are imported on first use).

``tome_kernels.patch.detr(model, er=0, mr=0, dr=0, prop_attn=True, pos_mode="keep")``: transformers 5.x
``DetrForObjectDetection`` / ``DetrModel``; ``tome_kernels.patch.detr_unpatch(model)`` reverts it.
The names are functions; the module is ``importlib.import_module("tome_kernels.patch.detr")``.
"""

from .detr import apply_patch as detr
from .detr import unpatch as detr_unpatch

__all__ = ["detr", "detr_unpatch"]
