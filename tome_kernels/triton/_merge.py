"""Merge / unmerge as one launch each, deterministic (no float atomics).

Spec: :func:`tome_kernels.reference.merge` and friends. Output token ``o`` of a ToMe step is represented by
input position ``rep[o]`` (``o`` for protected tokens, ``unm_idx[o - P]`` for unmerged A tokens, the B token
itself otherwise); a B output also holds the sources ``src_idx[k]`` with ``dst_idx[k]`` == its position.

``_merge_fwd_kernel`` — a gather-reduce over output tokens (grid: token tiles x batch, channel blocks):
    ``x_out[o] = sum_{i in group o} size_i x_i / sum size_i`` (``MEAN``) or ``sum_i g_i`` (unmerge's
    backward). The members of a B output are found through an inverted index built inside the kernel,
    per chunk of ``BLOCK_R`` sources: a ``[BLOCK_T, BLOCK_R]`` membership mask ``slot(dst_k) == slot(row)``,
    whose rows are walked in k order (next member = smallest k past the last one, one ``tl.min`` per step;
    steps = the largest group in the tile). Summation order is therefore src_idx order: deterministic.
    Every channel-block program redoes these compares (O(BLOCK_T * r) per program, no extra memory)
    instead of a second launch writing a CSR: the launch budget of a ToMe layer is match (2) + merge (1).
    Tiles without B outputs skip them. (``tl.sort`` + ``tl.gather`` of packed (slot, k) keys was the first
    version: same result, but the sort costs 0.7 s per chunk in the interpreter and more registers.)
    A token merged with nothing is stored as loaded (bit-exact). One launch also covers ``pos`` (channel
    blocks after those of x: keep = the representative's row, mean = like x) and ``size_out``.
``_merge_bwd_kernel`` — a spread over input tokens (grid: item tiles x batch, channel blocks):
    item ``t < N - r`` is output token ``t`` and writes its representative's row; item ``N - r + k`` is
    source ``k`` and writes row ``src_idx[k]`` from output ``b_out(dst_idx[k])``. The writes are disjoint and
    cover all N rows, so no index needs inverting. With ``SCALE`` (merge's backward) a member gets
    ``g[o] * size_i / size_out[o]`` and singletons ``g[o]`` unchanged (they need the count of sources of a B
    output: compares against dst_idx in chunks); without it (unmerge) every row is a copy.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .. import reference
from ._common import AotSpec, AOT_DTYPES, acc_dtype, checked_grid, device_guard, next_pow2


@triton.jit
def _representatives(o, mask_o, unm_ptr, num_unm, protected, first_b, r):
    """Input position of output tokens ``o`` and their B slot (< 0 for protected / unmerged tokens).
    With r = 0 the layout is the identity (reference.py: every op returns its input unchanged)."""
    u = o - protected
    is_unm = (u >= 0) & (u < num_unm)
    unm_pos = tl.load(unm_ptr + u, mask=mask_o & is_unm & (r > 0), other=0)
    slot = u - num_unm
    rep = tl.where(o < protected, o, tl.where(is_unm, unm_pos, first_b + 2 * slot))
    rep = tl.where(r > 0, rep, o.to(rep.dtype))
    return rep, tl.where(mask_o & (r > 0), slot, -1)


@triton.jit
def _in_group(slot, dst_ptr, k0, r, first_b, BLOCK_R: tl.constexpr):
    """``[BLOCK_T, BLOCK_R]``: does source ``k0 + j`` merge into the B slot of row i (false for slot < 0)."""
    kk = k0 + tl.arange(0, BLOCK_R)
    dst_slot = ((tl.load(dst_ptr + kk, mask=kk < r, other=0) - first_b) // 2).to(tl.int32)
    return (dst_slot[None, :] == slot[:, None]) & (kk < r)[None, :]


@triton.jit
def _count_sources(slot, dst_ptr, r, first_b, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """How many sources merge into each B slot of ``slot`` (0 where slot < 0)."""
    count = tl.zeros([BLOCK_T], dtype=tl.int32)
    r_tile = tl.where(tl.max(slot, axis=0) >= 0, r, 0)  # tiles without B outputs skip the loop
    for k0 in range(0, r_tile, BLOCK_R):
        count += tl.sum(_in_group(slot, dst_ptr, k0, r, first_b, BLOCK_R).to(tl.int32), axis=1)
    return count


@triton.jit
def _gather_reduce(out_ptr, out_row, x_ptr, stride_xn, stride_xc, size_ptr, has_size, src_ptr, dst_ptr,
                   rep, slot, mask_o, cols, mask_c, r, first_b, members,
                   MEAN: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """``out[o] = sum_{i in group o} w_i x_i / sum w_i`` (MEAN, w = size or 1) or ``sum_i x_i``; singletons
    (and every row when ``members`` is 0: pos passthrough) are stored as loaded. Returns ``sum w_i``."""
    mask = mask_o[:, None] & mask_c[None, :]
    x_rep = tl.load(x_ptr + rep[:, None] * stride_xn + cols[None, :] * stride_xc, mask=mask, other=0.0)
    w_sum = tl.load(size_ptr + rep, mask=mask_o & (has_size != 0), other=1.0).to(ACC_DTYPE)
    acc = x_rep.to(ACC_DTYPE) * w_sum[:, None] if MEAN else x_rep.to(ACC_DTYPE)
    count = tl.zeros([BLOCK_T], dtype=tl.int32)
    local = tl.arange(0, BLOCK_R)
    # Tiles without B outputs (and pos passthrough) skip the member search.
    r_tile = tl.where((tl.max(slot, axis=0) >= 0) & (members != 0), r, 0)
    for k0 in range(0, r_tile, BLOCK_R):
        in_group = _in_group(slot, dst_ptr, k0, r, first_b, BLOCK_R)
        n_here = tl.sum(in_group.to(tl.int32), axis=1)
        count += n_here
        # Walk each row's members in k (src_idx) order: the next one is the smallest k past the last.
        last = tl.full([BLOCK_T], -1, dtype=tl.int32)
        for _ in range(0, tl.max(n_here, axis=0)):
            last = tl.min(tl.where(in_group & (local[None, :] > last[:, None]), local[None, :], BLOCK_R), axis=1)
            member = last < BLOCK_R
            src = tl.load(src_ptr + k0 + last, mask=member, other=0)
            x_src = tl.load(x_ptr + src[:, None] * stride_xn + cols[None, :] * stride_xc,
                            mask=member[:, None] & mask_c[None, :], other=0.0).to(ACC_DTYPE)
            if MEAN:
                w = tl.load(size_ptr + src, mask=member & (has_size != 0), other=1.0).to(ACC_DTYPE)
                w = tl.where(member, w, 0.0)
                w_sum += w
                acc += x_src * w[:, None]
            else:
                acc += x_src
    if MEAN:
        acc = acc / w_sum[:, None]
    result = tl.where((count > 0)[:, None], acc, x_rep.to(ACC_DTYPE)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_row[:, None] + cols[None, :], result, mask=mask)
    return w_sum


@triton.jit(do_not_specialize=["num_tokens", "num_out", "protected", "num_unm", "r", "first_b", "t_blocks"])
def _merge_fwd_kernel(
    out_ptr, pos_out_ptr, size_out_ptr,  # [B, N - r, C], [B, N - r, Cp], [B, N - r] (contiguous)
    x_ptr, stride_xb, stride_xn, stride_xc,  # [B, N, C]
    pos_ptr, stride_pb, stride_pn, stride_pc,  # [B, N, Cp]
    size_ptr,  # [B, N] (contiguous)
    unm_ptr, src_ptr, dst_ptr,  # [B, nA - r], [B, r], [B, r] int64 (contiguous)
    num_tokens, num_out, channels, pos_channels, protected, num_unm, r, first_b, x_blocks, t_blocks,
    has_size, pos_mean,  # 0 / 1
    MEAN: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0) % t_blocks
    pid_c = tl.program_id(1)
    batch = (tl.program_id(0) // t_blocks).to(tl.int64)
    o = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_o = o < num_out
    unm_ptr += batch * num_unm
    src_ptr += batch * r
    dst_ptr += batch * r
    size_ptr += batch * num_tokens
    rep, slot = _representatives(o, mask_o, unm_ptr, num_unm, protected, first_b, r)
    if pid_c < x_blocks:
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        w_sum = _gather_reduce(out_ptr, (batch * num_out + o) * channels, x_ptr + batch * stride_xb, stride_xn,
                               stride_xc, size_ptr, has_size, src_ptr, dst_ptr, rep, slot, mask_o, cols,
                               cols < channels, r, first_b, 1, MEAN, ACC_DTYPE, BLOCK_T, BLOCK_R)
        if MEAN:
            if pid_c == 0:
                tl.store(size_out_ptr + batch * num_out + o, w_sum.to(size_out_ptr.dtype.element_ty), mask=mask_o)
    else:  # pos channel blocks (only in the grid when pos is given)
        cols = (pid_c - x_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        _gather_reduce(pos_out_ptr, (batch * num_out + o) * pos_channels, pos_ptr + batch * stride_pb,
                       stride_pn, stride_pc, size_ptr, has_size, src_ptr, dst_ptr, rep, slot, mask_o, cols,
                       cols < pos_channels, r, first_b, pos_mean, MEAN, ACC_DTYPE, BLOCK_T, BLOCK_R)


@triton.jit
def _spread(out_ptr, out_row, g_ptr, stride_gn, stride_gc, size_ptr, has_size, size_out_ptr, dest, o, is_rep,
            passthrough, zero_sources, mask_t, cols, mask_c, SCALE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Row ``dest`` of out <- g[o], times ``size[dest] / size_out[o]`` (SCALE) where not ``passthrough``;
    zero for source items when ``zero_sources`` (pos kept: only the representative gets the gradient)."""
    mask = mask_t[:, None] & mask_c[None, :]
    g = tl.load(g_ptr + o[:, None] * stride_gn + cols[None, :] * stride_gc, mask=mask, other=0.0)
    if SCALE:
        w = tl.load(size_ptr + dest, mask=mask_t & (has_size != 0), other=1.0).to(ACC_DTYPE)
        share = w / tl.load(size_out_ptr + o, mask=mask_t, other=1.0).to(ACC_DTYPE)
        scaled = (g.to(ACC_DTYPE) * share[:, None]).to(g.dtype)
        g = tl.where((passthrough | (zero_sources != 0))[:, None], g, scaled)
        g = tl.where((is_rep | (zero_sources == 0))[:, None], g, tl.zeros_like(g))
    tl.store(out_ptr + out_row[:, None] + cols[None, :], g, mask=mask)


@triton.jit(do_not_specialize=["num_tokens", "num_out", "protected", "num_unm", "r", "first_b", "t_blocks"])
def _merge_bwd_kernel(
    out_ptr, pos_out_ptr,  # [B, N, C], [B, N, Cp] (contiguous)
    g_ptr, stride_gb, stride_gn, stride_gc,  # [B, N - r, C]
    gpos_ptr, stride_qb, stride_qn, stride_qc,  # [B, N - r, Cp]
    size_ptr, size_out_ptr,  # [B, N], [B, N - r] (contiguous)
    unm_ptr, src_ptr, dst_ptr,  # [B, nA - r], [B, r], [B, r] int64 (contiguous)
    num_tokens, num_out, channels, pos_channels, protected, num_unm, r, first_b, x_blocks, t_blocks,
    has_size, pos_mean,  # 0 / 1
    SCALE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_t = tl.program_id(0) % t_blocks
    pid_c = tl.program_id(1)
    batch = (tl.program_id(0) // t_blocks).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = t < num_tokens
    is_rep = t < num_out
    unm_ptr += batch * num_unm
    src_ptr += batch * r
    dst_ptr += batch * r
    size_ptr += batch * num_tokens
    size_out_ptr += batch * num_out
    # Items t < N - r: output token t -> its representative. Items N - r + k: source k -> src_idx[k].
    rep, slot = _representatives(t, mask_t & is_rep, unm_ptr, num_unm, protected, first_b, r)
    k = t - num_out
    is_src = mask_t & (k >= 0)
    src = tl.load(src_ptr + k, mask=is_src, other=0)
    dst = tl.load(dst_ptr + k, mask=is_src, other=0)
    dest = tl.where(is_rep, rep, src)
    o = tl.where(is_rep, t, protected + num_unm + (dst - first_b) // 2)
    if SCALE:  # a representative whose group has no sources is a singleton: its gradient passes unscaled
        passthrough = is_rep & (_count_sources(slot, dst_ptr, r, first_b, BLOCK_T, BLOCK_R) == 0)
    else:  # unmerge: every row is a plain copy (passthrough is not used)
        passthrough = is_rep
    if pid_c < x_blocks:
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        _spread(out_ptr, (batch * num_tokens + dest) * channels, g_ptr + batch * stride_gb, stride_gn, stride_gc,
                size_ptr, has_size, size_out_ptr, dest, o, is_rep, passthrough, 0, mask_t, cols, cols < channels,
                SCALE, ACC_DTYPE)
    else:  # pos channel blocks (only in the grid when grad_pos is given)
        cols = (pid_c - x_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        _spread(pos_out_ptr, (batch * num_tokens + dest) * pos_channels, gpos_ptr + batch * stride_qb,
                stride_qn, stride_qc, size_ptr, has_size, size_out_ptr, dest, o, is_rep, passthrough,
                1 - pos_mean, mask_t, cols, cols < pos_channels, SCALE, ACC_DTYPE)


# Launch shapes: memory-bound gathers of 32 tokens x up to 128 channels per program (16-byte vector loads
# with 8 warps), 64 sources per membership chunk (128-source chunks: 160-255 registers). 4 warps x 64-channel
# blocks compile to the same 25% occupancy (128 registers: 4 CTAs of 4 warps instead of 2 of 8), so the same
# bytes in flight per SM (4 x 4 KB = 2 x 8 KB per 32-token load), while every extra channel block redoes the
# membership compares: no gain, kept at 8 warps x 128 (python -m tome_kernels.aot, docs/KERNELS.md).
BLOCK_T = 32
BLOCK_R = 64
_MAX_BLOCK_C = 128
_NUM_WARPS = 8


def _block_c(*channel_counts: int) -> int:
    return min(_MAX_BLOCK_C, max(16, *(next_pow2(c) for c in channel_counts)))


def _launch_shape(batch: int, items: int, channels: int, pos_channels: int, min_x_blocks: int) -> dict:
    """Grid (item tiles x batch, channel blocks of x then of pos) and block sizes, computed without launching."""
    block_c = _block_c(channels, pos_channels)
    x_blocks = max(min_x_blocks, triton.cdiv(channels, block_c))
    t_blocks = triton.cdiv(items, BLOCK_T)
    grid = checked_grid(t_blocks * batch, x_blocks + triton.cdiv(pos_channels, block_c))
    return dict(grid=grid, block_c=block_c, x_blocks=x_blocks, t_blocks=t_blocks)


def gather_shape(batch: int, num_out: int, channels: int, pos_channels: int) -> dict:
    """``_merge_fwd_kernel``: channel block 0 also writes size_out, so there is one even for C = 0."""
    return _launch_shape(batch, num_out, channels, pos_channels, 1)


def spread_shape(batch: int, num_tokens: int, channels: int, pos_channels: int) -> dict:
    return _launch_shape(batch, num_tokens, channels, pos_channels, 0)


def _contiguous_indices(unm_idx, src_idx, dst_idx, size):
    return (unm_idx.contiguous(), src_idx.contiguous(), dst_idx.contiguous(),
            None if size is None else size.contiguous())


def _layout_args(num_tokens, protected, unm_idx, src_idx):
    r = src_idx.shape[1]
    return dict(num_tokens=num_tokens, num_out=num_tokens - r, protected=protected, num_unm=unm_idx.shape[1],
                r=r, first_b=reference.first_b(protected))


def _gather_launch(out, pos_out, size_out, x, pos, size, unm_idx, src_idx, dst_idx, protected, mean, pos_mean):
    batch, num_tokens, channels = x.shape
    pos_channels = 0 if pos is None else pos.shape[-1]
    unm_idx, src_idx, dst_idx, size = _contiguous_indices(unm_idx, src_idx, dst_idx, size)
    layout = _layout_args(num_tokens, protected, unm_idx, src_idx)
    shape = gather_shape(batch, layout["num_out"], channels, pos_channels)
    if batch == 0 or shape["grid"][0] == 0:
        return
    pos_t = x if pos is None else pos
    with device_guard(x):
        _merge_fwd_kernel[shape["grid"]](
            out, pos_out if pos is not None else out, size_out if size_out is not None else out,
            x, *x.stride(), pos_t, *pos_t.stride(), x if size is None else size,
            unm_idx, src_idx, dst_idx, channels=channels, pos_channels=pos_channels, x_blocks=shape["x_blocks"],
            t_blocks=shape["t_blocks"], **layout,
            has_size=int(size is not None), pos_mean=int(pos_mean), MEAN=mean, ACC_DTYPE=acc_dtype(x.dtype),
            BLOCK_T=BLOCK_T, BLOCK_C=shape["block_c"], BLOCK_R=BLOCK_R, num_warps=_NUM_WARPS)


def _spread_launch(out, pos_out, g, gpos, size, size_out, unm_idx, src_idx, dst_idx, protected, scale, pos_mean):
    batch, num_out, channels = g.shape
    num_tokens = num_out + src_idx.shape[1]
    pos_channels = 0 if gpos is None else gpos.shape[-1]
    unm_idx, src_idx, dst_idx, size = _contiguous_indices(unm_idx, src_idx, dst_idx, size)
    layout = _layout_args(num_tokens, protected, unm_idx, src_idx)
    shape = spread_shape(batch, num_tokens, channels, pos_channels)
    if batch == 0 or shape["grid"][0] == 0 or shape["grid"][1] == 0:
        return
    gpos_t = g if gpos is None else gpos
    with device_guard(g):
        _merge_bwd_kernel[shape["grid"]](
            out, out if pos_out is None else pos_out, g, *g.stride(), gpos_t, *gpos_t.stride(),
            g if size is None else size, g if size_out is None else size_out.contiguous(),
            unm_idx, src_idx, dst_idx, channels=channels, pos_channels=pos_channels, x_blocks=shape["x_blocks"],
            t_blocks=shape["t_blocks"], **layout,
            has_size=int(size is not None), pos_mean=int(pos_mean), SCALE=scale, ACC_DTYPE=acc_dtype(g.dtype),
            BLOCK_T=BLOCK_T, BLOCK_C=shape["block_c"], BLOCK_R=BLOCK_R, num_warps=_NUM_WARPS)


def merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mean):
    batch, num_tokens, channels = x.shape
    num_out = num_tokens - src_idx.shape[1]
    x_out = x.new_empty(batch, num_out, channels)
    pos_out = x.new_empty(0) if pos is None else pos.new_empty(batch, num_out, pos.shape[-1])
    size_out = x.new_empty(batch, num_out, dtype=x.dtype if size is None else size.dtype)
    _gather_launch(x_out, pos_out, size_out, x, pos, size, unm_idx, src_idx, dst_idx, protected, True, pos_mean)
    return x_out, pos_out, size_out


def unmerge_backward(grad, unm_idx, src_idx, dst_idx, protected):
    batch, num_tokens, channels = grad.shape
    out = grad.new_empty(batch, num_tokens - src_idx.shape[1], channels)
    _gather_launch(out, None, None, grad, None, None, unm_idx, src_idx, dst_idx, protected, False, False)
    return out


def merge_backward(grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected, pos_mean):
    batch, num_out, channels = grad_x.shape
    num_tokens = num_out + src_idx.shape[1]
    grad_x_in = grad_x.new_empty(batch, num_tokens, channels)
    grad_pos_in = None if grad_pos is None else grad_pos.new_empty(batch, num_tokens, grad_pos.shape[-1])
    _spread_launch(grad_x_in, grad_pos_in, grad_x, grad_pos, size, size_out, unm_idx, src_idx, dst_idx, protected,
                   True, pos_mean)
    return grad_x_in, grad_pos_in


def unmerge(y, unm_idx, src_idx, dst_idx, protected):
    batch, num_out, channels = y.shape
    out = y.new_empty(batch, num_out + src_idx.shape[1], channels)
    _spread_launch(out, None, y, None, None, None, unm_idx, src_idx, dst_idx, protected, False, False)
    return out


def aot_specs() -> list[AotSpec]:
    """One compile per op (merge / unmerge_backward, merge_backward / unmerge) and dtype: size and pos are
    runtime flags (masked loads, grid), only the op is a constexpr."""
    indices = {"unm_ptr": "i64", "src_ptr": "i64", "dst_ptr": "i64"}
    block = {"ACC_DTYPE": tl.float32, "BLOCK_T": BLOCK_T, "BLOCK_C": _MAX_BLOCK_C, "BLOCK_R": BLOCK_R}
    specs = []
    for name in AOT_DTYPES:
        for label, mean in (("merge", True), ("unmerge_backward", False)):
            specs.append(AotSpec(
                _merge_fwd_kernel, f"{name} {label}",
                {"out_ptr": name, "pos_out_ptr": name, "size_out_ptr": name, "x_ptr": name, "pos_ptr": name,
                 "size_ptr": name, **indices},
                {"stride_xc": 1, "stride_pc": 1, "MEAN": mean, **block}, num_warps=_NUM_WARPS))
        for label, scale in (("merge_backward", True), ("unmerge", False)):
            specs.append(AotSpec(
                _merge_bwd_kernel, f"{name} {label}",
                {"out_ptr": name, "pos_out_ptr": name, "g_ptr": name, "gpos_ptr": name, "size_ptr": name,
                 "size_out_ptr": name, **indices},
                {"stride_gc": 1, "stride_qc": 1, "SCALE": scale, **block}, num_warps=_NUM_WARPS))
    return specs
