"""The C++ backends (``cpu``: csrc/cpu, ``cuda``: csrc/cuda): the ``tome::_native_*`` schemas, defined
here once and implemented per dispatch key by the extension ``tome_kernels._C``
(``TORCH_LIBRARY_IMPL(tome, CPU | CUDA)``), and the backends that call them."""

from __future__ import annotations

import torch
from torch.library import Library

from ._backend import Backend

# Sizes are [batch, N] (or None); size_out is [batch, N - r].
_lib = Library("tome", "FRAGMENT")
_lib.define("_native_match(Tensor metric, int r, int protected) -> (Tensor, Tensor, Tensor)")
_lib.define("_native_window_match(Tensor metric, Tensor windows, int r) -> (Tensor, Tensor, Tensor)")
_lib.define("_native_merge(Tensor x, Tensor? pos, Tensor? size, Tensor unm_idx, Tensor src_idx, "
            "Tensor dst_idx, int protected, bool pos_mean) -> (Tensor, Tensor, Tensor)")
_lib.define("_native_merge_backward(Tensor grad_x, Tensor? grad_pos, Tensor? size, Tensor size_out, "
            "Tensor unm_idx, Tensor src_idx, Tensor dst_idx, int protected, bool pos_mean) -> (Tensor, Tensor)")
_lib.define("_native_bipartite_merge(Tensor x, Tensor? pos, Tensor? size, Tensor metric, int r, int protected, "
            "bool pos_mean) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_lib.define("_native_unmerge(Tensor y, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, int protected) -> Tensor")
_lib.define("_native_unmerge_backward(Tensor grad, Tensor unm_idx, Tensor src_idx, Tensor dst_idx, "
            "int protected) -> Tensor")
_lib.define("_native_attention(Tensor q, Tensor k, Tensor v, Tensor? size, float scale) -> (Tensor, Tensor)")
_lib.define("_native_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? size, "
            "Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)")

try:
    from . import _C  # noqa: F401  (registers the CPU / CUDA kernels)

    load_error: str | None = None
except ImportError as error:
    load_error = str(error)


class NativeBackend(Backend):
    """The ``_native_*`` ops of namespace ``namespace`` for one device type: a kernel registered for
    ``dispatch_key`` is what makes it available."""

    def __init__(self, name: str, device_type: str, dispatch_key: str, priority: int,
                 checked_values: frozenset[str] = frozenset(), namespace: str = "tome", auto: bool = True):
        self.name, self.device_type, self.dispatch_key, self.priority = name, device_type, dispatch_key, priority
        self.devices = (device_type,) if auto else ()
        self.checked_values, self.namespace = checked_values, namespace

    @property
    def ops(self):
        return getattr(torch.ops, self.namespace)

    def unavailable_reason(self, device_type):
        if device_type != self.device_type:
            return f"the {self.name} backend takes {self.device_type.upper()} tensors"
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device here (torch.cuda.is_available() is False)"
        if self.namespace == "tome" and load_error is not None:
            return (f"the C++ extension tome_kernels._C is not built ({load_error}); "
                    "run `pip install --no-build-isolation -e .`")
        if not hasattr(getattr(torch.ops, self.namespace), "_native_match"):
            return f"no {self.namespace}::_native_* ops are loaded"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{self.namespace}::_native_match", self.dispatch_key):
            return (f"tome_kernels._C was built without {self.dispatch_key} kernels (build with CUDA_HOME set and "
                    "torch with CUDA)")
        return None

    def match(self, metric, r, protected):
        return tuple(self.ops._native_match(metric, r, protected))

    def window_match(self, metric, windows, r):
        return tuple(self.ops._native_window_match(metric, windows, r))

    def bipartite_merge(self, x, pos, size, metric, r, protected, pos_mean):
        return tuple(self.ops._native_bipartite_merge(x, pos, size, metric, r, protected, pos_mean))

    def merge(self, x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mean):
        return tuple(self.ops._native_merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mean))

    def merge_backward(self, grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected, pos_mean):
        grad_x_in, grad_pos_in = self.ops._native_merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx,
                                                                 dst_idx, protected, pos_mean)
        return grad_x_in, (grad_pos_in if grad_pos is not None else None)

    def unmerge(self, y, unm_idx, src_idx, dst_idx, protected):
        return self.ops._native_unmerge(y, unm_idx, src_idx, dst_idx, protected)

    def unmerge_backward(self, grad, unm_idx, src_idx, dst_idx, protected):
        return self.ops._native_unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected)

    def attention(self, q, k, v, size, scale):
        return tuple(self.ops._native_attention(q, k, v, size, scale))

    def attention_backward(self, grad_out, q, k, v, size, out, lse, scale):
        return tuple(self.ops._native_attention_backward(grad_out, q, k, v, size, out, lse, scale))


# The CPU kernels check index, size and window values themselves (csrc/cpu/common.h: Groups, check_size_values;
# csrc/cpu/match.cpp: check_window_values), with the messages of _validation, in the pass that reads them anyway.
CPU = NativeBackend("cpu", "cpu", "CPU", priority=20, checked_values=frozenset({"indices", "sizes", "windows"}))
CUDA = NativeBackend("cuda", "cuda", "CUDA", priority=20)
