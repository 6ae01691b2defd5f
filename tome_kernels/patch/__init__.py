"""Per-instance ToMe patches for model libraries (each library is imported only when its model is patched).

``tome_kernels.patch.apply_patch(model, r=0, **options)`` finds the model's family and patches it in place;
``tome_kernels.patch.unpatch(model)`` reverts any family. The family calls stay public:

* ``tome_kernels.patch.timm(model, trace_source=False, prop_attn=True)``: timm ViTs and RoPE ViTs (then set
  ``model.r``);
* ``tome_kernels.patch.hf(model, r=0)``: transformers ViT, DeiT, DINOv2, CLIP and SigLIP vision models;
* ``tome_kernels.patch.yolos(model, r=0, pos_mode="keep")``: transformers YOLOS;
* ``tome_kernels.patch.detr(model, er=0, mr=0, dr=0, prop_attn=True, pos_mode="keep")``: transformers DETR;
* ``tome_kernels.patch.deformable_detr(model, ratio=0.5, pos_mode="keep")``: transformers Deformable DETR's
  encoder.

Only the patched instance changes: classes of the instance and its layers are swapped for ToMe subclasses;
no library code is modified. The family modules are ``timm_vit`` (with ``timm_eva``), ``hf_vit``,
``hf_yolos``, ``hf_detr`` and ``hf_deformable_detr``; the machinery they share (and how to add a family) is
in ``_toolkit``.
"""

from ._toolkit import apply_patch, families, parse_r, unpatch
from .hf_deformable_detr import deformable_detr
from .hf_detr import detr
from .hf_vit import hf
from .hf_yolos import yolos
from .timm_vit import timm

detr_unpatch = unpatch  # the name of earlier releases

__all__ = ["apply_patch", "unpatch", "families", "parse_r", "timm", "hf", "yolos", "detr", "deformable_detr",
           "detr_unpatch"]
