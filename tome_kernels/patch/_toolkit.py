"""The shared machinery of the ToMe model patches: one family file holds only its family's forwards.

A *family* (timm ViT, HF DETR, ...) is one file in ``tome_kernels/patch/`` that defines mixins (classes holding
only the methods ToMe changes) and an apply function, and registers itself once::

    from . import _toolkit as tk

    FAMILY = "my_family"
    KNOWN_CODE = {"Block.forward": {"0cd0a1e21c7255f9"}}  # fingerprints of the library methods rendered here

    class _ToMeBlock:                                   # put in front of the library's Block, per instance
        def forward(self, x):
            call = tk.current_call()                    # this forward's state (None: block run on its own)
            ...                                         # attention with call.size, then:
            x, _ = tk.merge_tokens(call, x, metric, call.r[self._tome_layer], protected=1)

    class _ToMeModel:
        r = tk.r_property(lambda model: len(model.blocks))   # int, (r, inflection) or per-layer list

        def forward(self, *args, **kwargs):
            return tk.run_call(self, self._tome_start, super().forward, args, kwargs, self._tome_finish)

        def _tome_start(self) -> tk.Call:               # a fresh state per forward
            return tk.Call(self._tome_info, r=tk.parse_r(self.r, len(self.blocks)), size=None, source=None)

        def _tome_finish(self, call: tk.Call) -> None:  # what users read after a forward
            self._tome_info.update(r=call.r, size=call.size, source=call.source)

    @tk.register_family(FAMILY, ("library.module.ModelClass",), "library ModelClass (model names)")
    def my_family(model, r=0, *, prop_attn=True, attn_impl="auto"):
        for index, block in enumerate(model.blocks):    # refuse overridden or changed library code
            tk.check_forward(block, Block, "forward", FAMILY, KNOWN_CODE, where=f"block {index}")
        tk.swap_class(model, _ToMeModel)
        for layer, block in enumerate(model.blocks):
            tk.swap_class(block, _ToMeBlock)
            block._tome_layer = layer
        model._tome_info = {"prop_attn": prop_attn, "trace_source": False,
                            "attn_impl": tk.resolve_attn_impl(attn_impl, model)}
        model.r = r
        return model

and imports the file in ``tome_kernels/patch/__init__.py`` (``from .my_family import my_family``). Then
``tome_kernels.patch.apply_patch(model, r=8)`` patches such a model and ``tome_kernels.patch.unpatch(model)``
reverts it.

What the toolkit gives:

* **Class swap** (:func:`swap_class`, :func:`patched_class`, :func:`original_class`): an instance's class is
  replaced by ``type(name, (mixin, original), ...)``, made once per (original, mixin) pair. The generated
  classes live in this module under stable names (the module's ``__getattr__`` rebuilds them on demand), so
  ``pickle`` / ``torch.save`` / ``copy.deepcopy`` of a patched model work, also in a fresh process. A mixin
  with ``_tome_keep_name = True`` keeps the original class name (HF ``save_pretrained`` writes it).
* **Forward check** (:func:`check_forward`, :func:`fingerprint`): a patch replaces library methods with its
  own rendering of them; it refuses (TypeError) a module whose class overrides such a method, and
  (RuntimeError) a library whose method's code differs from the versions the family knows, instead of
  silently dropping the change. ``python -m tome_kernels.patch._toolkit module.Class.method`` prints the
  fingerprint of an installed version.
* **Unpatch** (:func:`unpatch`): for every family: classes restored, ``_tome_*`` attributes and the hooks
  added with :func:`add_hook` removed.
* **Per-call state** (:class:`Call`, :func:`run_call`, :func:`current_call`): the state of one forward (sizes,
  sources, counters) is a fresh :class:`Call` made by the model's forward and found by its layers through a
  thread-local slot, never in a dict shared by callers: threads running one model at once do not interfere,
  and ``torch.compile(fullgraph=True)`` / ``torch.export`` trace it (a Python object made and mutated inside
  the traced call; thread-locals are supported by Dynamo, context variables are not). ``model._tome_info``
  holds the configuration, and :func:`run_call`'s ``finish`` copies the results the original ToMe exposes
  (``size``, ``source``) into it after each forward: with several threads, those of the forward that
  finished last.
* **Attention** (:func:`resolve_attn_impl`, :func:`attention`): proportional attention through
  ``torch.ops.tome.prop_attention`` or SDPA with a ``log size`` float bias, whichever serves the device best.
* **Merging** (:func:`merge_tokens`: one ToMe step updating the call's sizes and source map;
  :func:`source_or_identity`, :func:`weighted_mean` for size-weighted pooling).
* **Merge schedules** (:func:`parse_r`, :func:`r_property`, :func:`merge_count`).
* **Registry** (:func:`register_family`, :func:`apply_patch`, :func:`families`): ``apply_patch(model)``
  finds the family by the class names in ``type(model).__mro__`` (no library is imported to look).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import inspect
import io
import numbers
import operator
import sys
import textwrap
import threading
import tokenize
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import tome_kernels

__all__ = [
    "ATTN_IMPLS", "Call", "Family", "add_hook", "apply_patch", "attention", "check_forward", "class_path",
    "current_call", "families", "find_family", "fingerprint", "merge_count", "merge_tokens", "original_class",
    "parse_r", "patched_class", "source_or_identity", "weighted_mean",
    "r_property", "register_family", "resolve_attn_impl", "run_call", "swap_class", "unpatch",
]

ATTN_IMPLS = ("auto", "op", "sdpa")


# ----------------------------------------------------------------------------------------------------
# Class swap (picklable generated classes)
# ----------------------------------------------------------------------------------------------------
_CLASS_PREFIX = "ToMe__"
_CLASSES: dict[tuple[type, type], type] = {}
_CLASSES_LOCK = threading.Lock()


def class_path(cls: type) -> str:
    """``module:qualname`` of a class (how the generated class names refer to it)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _encode(path: str) -> str:
    # Reversible and free of "__" (every "_" is followed by a digit), so "__" can separate the parts.
    return path.replace("_", "_0").replace(".", "_1").replace(":", "_2")


def _decode(text: str) -> str:
    out, chars = [], iter(text)
    for char in chars:
        out.append({"0": "_", "1": ".", "2": ":"}[next(chars)] if char == "_" else char)
    return "".join(out)


def _resolve(path: str) -> type:
    module_name, qualname = path.split(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def original_class(obj) -> type:
    """The library class of a module (or class), patched or not."""
    cls = obj if isinstance(obj, type) else type(obj)
    return getattr(cls, "_tome_original_class", None) or cls


def patched_class(cls: type, mixin: type) -> type:
    """``cls`` (the original class, or an already patched one) with ``mixin``'s methods in front; made once
    per pair and published in this module under a stable name, so instances pickle by reference."""
    original = original_class(cls)
    key = (original, mixin)
    with _CLASSES_LOCK:
        if key not in _CLASSES:
            qualname = f"{_CLASS_PREFIX}{_encode(class_path(original))}__{_encode(class_path(mixin))}"
            name = original.__name__ if getattr(mixin, "_tome_keep_name", False) else f"ToMe{original.__name__}"
            patched = type(name, (mixin, original), {"_tome_original_class": original, "__module__": __name__,
                                                     "__qualname__": qualname})
            _CLASSES[key] = patched
            globals()[qualname] = patched
        return _CLASSES[key]


def __getattr__(name: str):
    """Rebuild a generated class from its name (unpickling in a process that has not patched yet)."""
    if name.startswith(_CLASS_PREFIX):
        parts = name[len(_CLASS_PREFIX):].split("__")
        if len(parts) == 2:
            original, mixin = (_resolve(_decode(part)) for part in parts)
            return patched_class(original, mixin)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def swap_class(module: nn.Module, mixin: type) -> None:
    """Make ``module`` an instance of :func:`patched_class` (its original class, ``mixin``), in place."""
    module.__class__ = patched_class(type(module), mixin)


# ----------------------------------------------------------------------------------------------------
# Forward checks
# ----------------------------------------------------------------------------------------------------
def fingerprint(function) -> str:
    """A short hash of a function's code tokens (comments, docstring and layout left out, so it is the same
    on every Python version for the same source)."""
    source = textwrap.dedent(inspect.getsource(function))
    node = ast.parse(source).body[0]
    doc_lines = set()
    if ast.get_docstring(node, clean=False) is not None:
        doc_lines = set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    tokens = [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
              if tok.type not in skip and not (tok.type == tokenize.STRING and tok.start[0] in doc_lines)]
    return hashlib.sha256(" ".join(tokens).encode()).hexdigest()[:16]


TRANSFORMERS_MAJOR = 5  # the layer signatures the transformers families render


def transformers_modeling(model_type: str, family: str):
    """``transformers.models.<model_type>.modeling_<model_type>`` of the supported major version; an
    ImportError (how to install) or a RuntimeError (the version found) naming ``family`` otherwise."""
    try:
        import transformers

        modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError as error:
        raise ImportError(f"tome_kernels.patch.{family} needs transformers {TRANSFORMERS_MAJOR}.x ({error}); pip "
                          f"install 'transformers>={TRANSFORMERS_MAJOR},<{TRANSFORMERS_MAJOR + 1}'") from None
    if int(transformers.__version__.split(".")[0]) != TRANSFORMERS_MAJOR:
        raise RuntimeError(f"tome_kernels.patch.{family} supports transformers {TRANSFORMERS_MAJOR}.x (its layer "
                           f"signatures); found transformers {transformers.__version__}")
    return modeling


def keep_output_capture(module: nn.Module) -> None:
    """Register ``module``'s (swapped) class for transformers' output capture (``output_hidden_states`` /
    ``output_attentions``), which looks a model's recordable outputs up by the name of its class; done when
    patching and again when a patched model is unpickled in another process."""
    from transformers.utils import output_capturing

    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    if registry is not None and getattr(module, "_can_record_outputs", None):
        registry[module] = module._can_record_outputs


class KeepsOutputCapture:
    """Mixin of a patched transformers model: re-registers its class for output capture when unpickled (in a
    process that has not patched this class yet)."""

    def __setstate__(self, state):
        super().__setstate__(state)
        keep_output_capture(self)


def check_forward(module: nn.Module, expected: type, methods, family: str, known: dict[str, set[str]],
                  where: str | None = None) -> None:
    """Refuse ``module`` unless it is an ``expected`` whose ``methods`` (the ones the family replaces) are
    ``expected``'s own, and their code is a version the family was written against.

    ``known``: ``{"Class.method": {fingerprint, ...}}`` (see :func:`fingerprint`). ``where`` names the module
    in the message (e.g. "block 3"). TypeError for another class, RuntimeError for an unknown library version.
    """
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    cls = original_class(module)
    what = f"{where} is {class_path(cls)}" if where else f"got {class_path(cls)}"
    overridden = [name for name in methods if getattr(cls, name, None) is not getattr(expected, name)]
    if not isinstance(module, expected) or overridden:
        raise TypeError(f"tome_kernels.patch.{family}: {what}; supported: {class_path(expected)} or a subclass "
                        f"keeping its {', '.join(methods)}")
    for name in methods:
        key = f"{expected.__qualname__}.{name}"
        found = fingerprint(getattr(expected, name))
        if found not in known.get(key, ()):
            library = expected.__module__.split(".")[0]
            version = getattr(sys.modules.get(library), "__version__", "?")
            raise RuntimeError(f"tome_kernels.patch.{family}: {library} {version}'s {key} is not a version this "
                               f"patch was written against (code fingerprint {found}, known "
                               f"{sorted(known.get(key, ()))}); the patch replaces it and would drop the changes")


# ----------------------------------------------------------------------------------------------------
# Hooks and unpatch
# ----------------------------------------------------------------------------------------------------
_HOOK_FUNCTIONS: set = set()


def add_hook(module: nn.Module, hook: Callable, kind: str = "forward_pre") -> None:
    """Register ``hook`` (``kind`` "forward_pre" or "forward", with kwargs) on ``module`` once; :func:`unpatch`
    removes it. Hooks look their state up on the module (never in a closure), so a deepcopy stays apart."""
    _HOOK_FUNCTIONS.add(hook)
    hooks = module._forward_pre_hooks if kind == "forward_pre" else module._forward_hooks
    if hook not in hooks.values():
        register = module.register_forward_pre_hook if kind == "forward_pre" else module.register_forward_hook
        register(hook, with_kwargs=True)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo any family's patch in place: original classes, no ``_tome_*`` attributes, no ToMe hooks."""
    for module in model.modules():
        for hooks, with_kwargs in ((module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
                                   (module._forward_hooks, module._forward_hooks_with_kwargs)):
            for key in [key for key, hook in hooks.items() if hook in _HOOK_FUNCTIONS]:
                del hooks[key]
                with_kwargs.pop(key, None)
        module.__class__ = original_class(module)
        for name in [name for name in module.__dict__ if name.startswith("_tome_")]:
            del module.__dict__[name]
    return model


# ----------------------------------------------------------------------------------------------------
# Per-call state
# ----------------------------------------------------------------------------------------------------
class Call:
    """The state of one forward of one patched model: ``config`` (the model's ``_tome_info`` at the start),
    ``mixin`` (the mixin of the module whose forward made it, set by :func:`run_call`) plus whatever fields the
    family sets (sizes, sources, per-layer merge counts, ...)."""

    def __init__(self, config: dict, **fields):
        self.config = config
        self.__dict__.update(fields)


_LOCAL = threading.local()


def current_call() -> Call | None:
    """The :class:`Call` of the forward running in this thread, None outside one."""
    return getattr(_LOCAL, "call", None)


def pixel_mask_given(args, kwargs) -> bool:
    """Whether a detector's forward ``(pixel_values, pixel_mask=None, ...)`` was given a pixel mask. Without
    one transformers makes an all-ones mask: knowing that there is no padding spares the patches a
    data-dependent check (which torch.export and torch.compile(fullgraph=True) cannot trace)."""
    return kwargs.get("pixel_mask") is not None or (len(args) > 1 and args[1] is not None)


def run_call(model: nn.Module, start: Callable[[], Call], forward: Callable, args, kwargs,
             finish: Callable[[Call], None] | None = None):
    """``forward(*args, **kwargs)`` with a fresh ``start()`` :class:`Call` current in this thread; then
    ``finish(call)`` (e.g. publish results to ``model._tome_info``; skipped while ``torch.export`` traces).
    A forward of a module with the same mixin inside the running one (e.g. DETR's detection model calling
    its patched inner model) joins it."""
    mixin = type(model).__mro__[1]
    outer = current_call()
    if outer is not None and outer.mixin is mixin:
        return forward(*args, **kwargs)
    call = start()
    call.mixin = mixin
    _LOCAL.call = call
    try:
        out = forward(*args, **kwargs)
    finally:
        _LOCAL.call = outer
    if finish is not None and not torch.compiler.is_exporting():  # an export trace's tensors are not results
        finish(call)
    return out


# ----------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------
def merge_tokens(call: Call, x: torch.Tensor, metric: torch.Tensor, r: int, protected: int,
                 pos: torch.Tensor | None = None, pos_mode: str = "keep"):
    """One ToMe step on a ViT-like sequence: merge ``r`` tokens of ``x`` [B, N, C] (and of ``pos`` [B, N, P],
    positions that follow their tokens) by ``metric``, the first ``protected`` tokens never merging.

    Updates ``call.size`` ([B, N, 1], None = all ones) and, when ``call.config["trace_source"]``,
    ``call.source`` ([B, N, N0], None = the identity). Returns ``(x, pos)`` (pos None when given None).
    """
    x, pos_out, call.size, unm_idx, src_idx, dst_idx = torch.ops.tome.bipartite_merge(
        x, pos, call.size, r, metric=metric, protected=protected, pos_mode=pos_mode)
    if call.config["trace_source"]:
        call.source = torch.ops.tome.merge_source(source_or_identity(call.source, metric), unm_idx, src_idx,
                                                  dst_idx, protected)
    return x, (None if pos is None else pos_out)


def source_or_identity(source: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """``source``, or the identity map ``[B, N, N]`` for the ``[B, N, ...]`` tokens when nothing merged yet."""
    if source is not None:
        return source
    batch, num_tokens = tokens.shape[:2]
    eye = torch.eye(num_tokens, dtype=tokens.dtype, device=tokens.device)
    return eye.expand(batch, num_tokens, num_tokens)


def weighted_mean(tokens: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Mean over the tokens [B, N, C] weighted by their sizes [B, N, 1] (the mean of the original tokens)."""
    if size is None:
        return tokens.mean(dim=1)
    size = size.to(tokens.dtype)
    return (tokens * size).sum(dim=1) / size.sum(dim=1)


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------
def resolve_attn_impl(attn_impl: str, model: nn.Module) -> str:
    """How proportional attention runs: ``"op"`` (``torch.ops.tome.prop_attention``) or ``"sdpa"``
    (``F.scaled_dot_product_attention`` with a ``log size`` float mask, the same function).

    ``auto``: ``"op"`` when a backend was chosen by hand, or on a GPU a compiled tome backend (Triton or
    CUDA: the log-size bias fused in the kernel) serves the model; otherwise ``"sdpa"``: on CPU PyTorch's
    flash SDPA with a float bias beats the tome CPU kernel (docs/TIMM.md).
    """
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"tome: attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    if attn_impl != "auto":
        return attn_impl
    if tome_kernels.get_backend() != "auto":
        return "op"  # a backend chosen by hand is meant to run
    device = next(model.parameters(), torch.empty(0)).device
    if device.type != "cuda":
        return "sdpa"
    usable = tome_kernels.available_backends(device.type)
    return "op" if any(usable.get(name) is None for name in ("triton", "cuda")) else "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, scale: float,
              attn_impl: str, dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax(q kᵀ · scale + log size) v`` for ``q`` [B, H, Nq, D], ``k`` / ``v`` [B, H, Nk, D], ``size``
    [B, Nk, 1] or None (no bias; size 0 masks a key). ``attn_impl`` from :func:`resolve_attn_impl`; attention
    dropout always takes SDPA, which has it."""
    if attn_impl == "op" and dropout_p == 0.0:
        return torch.ops.tome.prop_attention(q, k, v, size, scale)
    bias = None if size is None else size.to(q.dtype).log().reshape(q.shape[0], 1, 1, k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


# ----------------------------------------------------------------------------------------------------
# Merge counts and schedules
# ----------------------------------------------------------------------------------------------------
def merge_count(value, what: str) -> int:
    """A number of merges: an int >= 0 (bools refused), else a TypeError / ValueError naming ``what``."""
    if isinstance(value, bool):
        raise TypeError(f"tome: {what} must be an int >= 0, got {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"tome: {what} must be an int >= 0, got {type(value).__name__} {value!r}") from None
    if count < 0:
        raise ValueError(f"tome: {what} must be >= 0, got {count}")
    return count


def parse_r(r, num_layers: int) -> list[int]:
    """Per-layer merge counts (before clamping to half the mergeable tokens) for ``num_layers`` layers.

    * ``int``: r merges in every layer;
    * ``(r, inflection)`` with inflection in [-1, 1]: a linear schedule with the same total as constant r,
      from ``int(r * (1 - inflection))`` in the first layer to ``2 r`` minus that in the last
      (-1 decreasing from 2r to 0, 0 constant, 1 increasing from 0 to 2r), each layer rounded down;
    * ``list``: r per layer, missing trailing layers merge nothing.
    """
    if isinstance(r, list):
        if len(r) > num_layers:
            raise ValueError(f"tome: a per-layer r list has {len(r)} entries but the model has {num_layers} blocks")
        counts = [merge_count(value, f"r[{i}]") for i, value in enumerate(r)]
        return counts + [0] * (num_layers - len(counts))
    inflection = 0.0
    if isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"tome: an r schedule is a tuple (r, inflection), got {r!r}")
        r, inflection = r
        if isinstance(inflection, bool) or not isinstance(inflection, numbers.Real) or not -1 <= inflection <= 1:
            raise ValueError(f"tome: the inflection of an (r, inflection) schedule must be a number in [-1, 1] "
                             f"(-1 decreasing, 0 constant, 1 increasing), got {inflection!r}")
    elif not isinstance(r, numbers.Integral) or isinstance(r, bool):
        raise TypeError(f"tome: r must be an int, an (r, inflection) tuple or a per-layer list of ints, "
                        f"got {type(r).__name__} {r!r}")
    r = merge_count(r, "r")
    first = int(r * (1.0 - inflection))
    step = (2 * r - 2 * first) / (num_layers - 1) if num_layers > 1 else 0.0
    return [int(first + step * layer) for layer in range(num_layers)]


def r_property(num_layers: Callable[[nn.Module], int]) -> property:
    """``model.r`` for a mixin: any :func:`parse_r` value, checked when set, kept in ``model._tome_r``
    (``num_layers(model)`` layers; read it per forward with ``parse_r(model.r, ...)``)."""

    def getter(self):
        return self._tome_r

    def setter(self, value):
        parse_r(value, num_layers(self))  # reject bad values here, not in the next forward
        self._tome_r = list(value) if isinstance(value, list) else value

    return property(getter, setter, doc="Merges per layer: an int, an (r, inflection) schedule or a per-layer "
                                        "list (see tome_kernels.patch.parse_r).")


# ----------------------------------------------------------------------------------------------------
# Family registry
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: ``apply(model, r=0, **options)`` patches a model whose class (or a base class) is one
    of ``classes`` (``module.QualName`` where the class is defined)."""

    name: str
    classes: tuple[str, ...]
    description: str
    apply: Callable


_FAMILIES: dict[str, Family] = {}


def register_family(name: str, classes, description: str):
    """Decorator registering ``apply(model, r=0, **options) -> model`` as the family ``name``."""

    def decorator(apply: Callable) -> Callable:
        _FAMILIES[name] = Family(name, tuple(classes), description, apply)
        return apply

    return decorator


def families() -> dict[str, Family]:
    """The registered families by name."""
    return dict(_FAMILIES)


def find_family(model) -> Family:
    """The family whose class comes first in ``type(model).__mro__`` (the most specific), or a TypeError
    naming the supported families."""
    for cls in original_class(model).__mro__:
        path = f"{cls.__module__}.{cls.__qualname__}"
        for family in _FAMILIES.values():
            if path in family.classes:
                return family
    supported = "; ".join(f"{family.name}: {family.description}" for family in _FAMILIES.values())
    raise TypeError(f"tome_kernels.patch.apply_patch: no ToMe patch for {class_path(original_class(model))}. "
                    f"Supported families: {supported}")


def apply_patch(model: nn.Module, r=0, **options) -> nn.Module:
    """Patch ``model`` in place with its family's ToMe patch and return it (``options``: the family's)."""
    return find_family(model).apply(model, r=r, **options)


def _resolve_dotted(target: str):
    """``package.module.Class.method`` -> the object (the longest importable prefix is the module)."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(f"cannot import {target!r}")


if __name__ == "__main__":  # print fingerprints: python -m tome_kernels.patch._toolkit module.Class.method ...
    for name in sys.argv[1:]:
        print(name, fingerprint(_resolve_dotted(name)))
