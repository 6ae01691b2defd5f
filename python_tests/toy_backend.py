"""A toy backend, written as a new backend is: one file with a Backend subclass (here the reference's
functions, counting calls and asserting what the op layer promises a backend), registered with one line,
``tome_kernels.register_backend(ToyBackend())``."""

from __future__ import annotations

import collections

from tome_kernels import Backend, reference


class ToyBackend(Backend):
    name, devices, priority = "toy", (), 0  # chosen by name only

    def __init__(self):
        self.calls = collections.Counter()

    def unavailable_reason(self, device_type):
        return None if device_type == "cpu" else "the toy backend takes CPU tensors"

    def _called(self, function, batch, r=None):
        # The op layer answers r = 0 and empty batches itself: a backend never sees them.
        assert batch >= 1 and (r is None or r >= 1), (function, batch, r)
        self.calls[function] += 1

    def match(self, metric, r, protected):
        self._called("match", metric.shape[0], reference.clamp_r(r, metric.shape[1], protected))
        return reference.match(metric, r, protected)

    def window_match(self, metric, windows, r):
        self._called("window_match", metric.shape[0], r)
        return reference.window_match(metric, windows, r)

    def merge(self, x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mean):
        self._called("merge", x.shape[0], src_idx.shape[1])
        return reference.merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mean)

    def merge_backward(self, grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected, pos_mean):
        self._called("merge_backward", grad_x.shape[0], src_idx.shape[1])
        return reference.merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected,
                                        pos_mean)

    def unmerge(self, y, unm_idx, src_idx, dst_idx, protected):
        self._called("unmerge", y.shape[0], src_idx.shape[1])
        return reference.unmerge(y, unm_idx, src_idx, dst_idx, protected)

    def unmerge_backward(self, grad, unm_idx, src_idx, dst_idx, protected):
        self._called("unmerge_backward", grad.shape[0], src_idx.shape[1])
        return reference.unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected)

    def attention(self, q, k, v, size, scale):
        self._called("attention", q.shape[0])
        return reference.attention(q, k, v, size, scale)

    def attention_backward(self, grad_out, q, k, v, size, out, lse, scale):
        self._called("attention_backward", q.shape[0])
        return reference.attention_backward(grad_out, q, k, v, size, out, lse, scale)
