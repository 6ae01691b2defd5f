"""Bipartite soft matching (whole rows or within windows) in two launches; the nA x nB score matrix is never
written.

Math (spec: :func:`tome_kernels.reference.match`): with A = non-protected even tokens and B = non-protected
odd tokens, ``score[a, b] = <m_a, m_b> / (max(|m_a|, eps) * max(|m_b|, eps))`` (cosine similarity of the
L2-normalised metric; a zero vector scores 0, never NaN); each A token keeps its best B partner (first on
ties); A tokens are ranked by best score, descending, ties to the lower position; the first r merge.

1. ``_match_fwd_kernel`` (grid: A blocks x B splits x batch, on axis 0) is a flash-style row reduction: per
   block of A rows it walks the B tokens of its split in tiles, computes ``A_tile @ B_tile^T`` with ``tl.dot`` (fp32 accumulate) over
   channel chunks, scales by the two inverse norms afterwards, and keeps a running (max, argmax) per A row.
   The norms are accumulated from the tiles already loaded for the dot (no separate normalisation pass
   over the metric). fp16/bf16 products are exact in fp32, so the fp32 accumulation is as accurate as the
   reference's fp32 normalise-then-matmul; fp32 metrics use ``input_precision="ieee"`` (not TF32) so the
   chosen indices equal the reference's. Only ``best_score/best_b [B, splits, nA]`` reach memory. The B
   split keeps small batches of long rows (DETR: batch 2, nA = nB = 550) from running on a handful of SMs.
2. ``_match_rank_kernel`` (grid: 16-token A blocks x batch, on axis 0) combines the splits (a later split
   wins only if strictly better: ties to the lower B index) and ranks its A tokens by counting the tokens
   that sort before each: ``rank[i] = #{j : s_j > s_i or (s_j == s_i and j < i)}`` — exactly the stable
   descending order. It then scatters ``src/dst`` to ``rank < r`` and the unmerged tokens either to
   ``rank - r`` (protected == 0, rank order) or in ascending position (protected >= 1, or r = 0 after the
   clamp: every op then returns its input unchanged); the ascending slots need every rank of the row, so
   the last program of the row to finish writes them all (an arrival counter, zeroed by the fwd kernel).

``window_match`` (spec: :func:`tome_kernels.reference.window_match`) differs only in where each A token looks
for its partner, so it keeps stage 2 (one split, unmerged slots ascending) and replaces stage 1 with
``_window_match_fwd_kernel`` (grid: 32-token A blocks x batch, on axis 0). Its programs own A tokens, not
windows, because every A token's entry must be written, unlisted ones with -inf (they rank last; r never
reaches them), and the table has no inverse map: windows could not write the unlisted tokens without a fill
launch before them. Each program finds its tokens' table slots by scanning the table's A column (O(nA x
listed) compares, as stage 2's ranking), then per token takes cosines with its window's B slots one at a
time (a runtime loop: any even width, one compile), channel-chunked elementwise products summed in fp32: a
window's few pairs are too small a matrix for ``tl.dot``, and fp32 products stay full fp32 (no TF32).

Why count instead of ``tl.sort`` or a torch sort: the ranking has to see the whole row, and a torch sort
is several launches (sort, gathers, the second sort of the unmerged tokens) where the launch budget of a
ToMe layer is 3 (this file 2 + merge 1). ``tl.sort`` needs the row in one power-of-two tile (a compile
per size bucket and a size limit), the count is O(nA^2) compares in fixed 16 x 128 tiles with runtime loops:
any N, one compile, no ties to break by hand. At ViT sizes (nA ~ 100-300) that is 10^4-10^5 compares per
row; at DETR's nA ~ 550, 3 x 10^5, spread over 35 programs per row of 5 tile steps each.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import (AotSpec, AOT_DTYPES, acc_dtype, autotune_configs, checked_grid, device_guard, dot_in_fp32,
                      next_pow2)

NORM_EPS = tl.constexpr(reference.NORM_EPS)

@triton.jit
def _inverse_norms(rows, mask, channels, stride_c, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """``1 / max(|row|, eps)`` of the BLOCK rows at ``rows`` (pointers to their first channel), read in
    BLOCK_C-channel chunks; masked rows read zeros."""
    squares = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for c0 in range(0, channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        row = tl.load(rows + cols[None, :] * stride_c, mask=mask[:, None] & (cols < channels)[None, :],
                      other=0.0).to(ACC_DTYPE)
        squares += tl.sum(row * row, axis=1)
    return 1.0 / tl.maximum(tl.sqrt(squares), NORM_EPS)


# Two configs (GPU autotune; the interpreter takes the first). The channel chunk follows the element size:
# fp32 metrics go through exact fp32 (FMA) dots whose operands live in registers, and 32-channel chunks of
# them spill on every arch (python -m tome_kernels.aot); 16-channel chunks do not.
# BLOCK_A is the same in every config: the grid is computed before autotuning picks one.
_BLOCK_A = 64
_FWD_CONFIGS = [
    triton.Config({"BLOCK_A": _BLOCK_A, "BLOCK_B": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_A": _BLOCK_A, "BLOCK_B": 128}, num_warps=8, num_stages=2),
]


def _block_c(dtype: torch.dtype) -> int:
    return 32 if dtype.itemsize == 2 else 16


@triton.autotune(configs=autotune_configs(_FWD_CONFIGS), key=["CHANNEL_BUCKET", "TOKEN_BUCKET"])
@triton.heuristics({"BLOCK_C": lambda args: _block_c(args["metric_ptr"].dtype)})
@triton.jit(do_not_specialize=["num_a", "num_b", "first_a", "first_b", "a_blocks", "splits", "b_per_split"])
def _match_fwd_kernel(
    best_score_ptr, best_b_ptr,  # [B, splits, nA] acc dtype, int32 (contiguous)
    arrived_ptr,  # [B] int32: zeroed here for _match_rank_kernel
    metric_ptr, stride_mb, stride_mn, stride_mc,  # [B, N, C]
    num_a, num_b, channels, first_a, first_b, a_blocks, splits, b_per_split,
    CHANNEL_BUCKET, TOKEN_BUCKET,  # autotune keys only (next powers of two of C and nB)
    ACC_DTYPE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_a = pid % a_blocks
    split = (pid // a_blocks) % splits
    batch = pid // (a_blocks * splits)
    if (pid_a == 0) & (split == 0):
        tl.store(arrived_ptr + batch, 0)
    ia = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = ia < num_a
    metric_ptr += batch * stride_mb
    a_rows = metric_ptr + (first_a + 2 * ia)[:, None] * stride_mn

    # The A rows' norms: one extra read of BLOCK_A rows (the B norms come from the dot's tiles).
    inv_a = _inverse_norms(a_rows, mask_a, channels, stride_mc, ACC_DTYPE, BLOCK_A, BLOCK_C)

    best = tl.full([BLOCK_A], float("-inf"), dtype=ACC_DTYPE)
    best_b = tl.zeros([BLOCK_A], dtype=tl.int32)
    b_start = split * b_per_split
    b_end = tl.minimum(b_start + b_per_split, num_b)
    for b0 in range(b_start, b_end, BLOCK_B):
        ib = b0 + tl.arange(0, BLOCK_B)
        mask_b = ib < b_end
        b_rows = metric_ptr + (first_b + 2 * ib.to(tl.int64))[:, None] * stride_mn
        dots = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC_DTYPE)
        ssq_b = tl.zeros([BLOCK_B], dtype=ACC_DTYPE)
        for c0 in range(0, channels, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask_c = cols < channels
            a = tl.load(a_rows + cols[None, :] * stride_mc, mask=mask_a[:, None] & mask_c[None, :], other=0.0)
            b = tl.load(b_rows + cols[None, :] * stride_mc, mask=mask_b[:, None] & mask_c[None, :], other=0.0)
            b_acc = b.to(ACC_DTYPE)
            ssq_b += tl.sum(b_acc * b_acc, axis=1)
            if DOT_F32:
                a = a.to(tl.float32)
                b = b_acc
            dots = tl.dot(a, tl.trans(b), dots, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        inv_b = 1.0 / tl.maximum(tl.sqrt(ssq_b), NORM_EPS)
        scores = dots * inv_a[:, None] * inv_b[None, :]
        # A NaN score (a NaN or infinite metric) ranks as torch.max / torch.sort rank NaN: above every number.
        # Finite scores are cosines in [-1, 1], so +inf stands for NaN below (first one wins, as torch.max).
        scores = tl.where(scores != scores, float("inf"), scores)
        scores = tl.where(mask_b[None, :], scores, float("-inf"))
        tile_best, tile_arg = tl.max(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best > best  # strict: on ties the earlier tile (lower B index) stays
        best = tl.where(better, tile_best, best)
        best_b = tl.where(better, (b0 + tile_arg).to(tl.int32), best_b)

    out = (batch * splits + split) * num_a + ia
    tl.store(best_score_ptr + out, best, mask=mask_a)
    tl.store(best_b_ptr + out, best_b, mask=mask_a)


@triton.jit
def _combined_best(best_score_ptr, best_b_ptr, ii, mask, num_a, splits):
    """Best score and partner of A tokens ``ii`` over the B splits; a split wins only if strictly better, so
    ties go to the lower B index (the splits are in B order)."""
    best = tl.load(best_score_ptr + ii, mask=mask, other=0.0)
    best_b = tl.load(best_b_ptr + ii, mask=mask, other=0)
    for split in range(1, splits):
        score = tl.load(best_score_ptr + split * num_a + ii, mask=mask, other=0.0)
        partner = tl.load(best_b_ptr + split * num_a + ii, mask=mask, other=0)
        best_b = tl.where(score > best, partner, best_b)
        best = tl.maximum(best, score)
    return best, best_b


@triton.jit(do_not_specialize=["num_a", "r", "first_a", "first_b", "i_blocks", "splits"])
def _match_rank_kernel(
    unm_ptr, src_ptr, dst_ptr,  # [B, nA - r], [B, r], [B, r] int64 (contiguous)
    rank_ptr, arrived_ptr,  # [B, nA] int32 scratch, [B] int32 (zeroed by _match_fwd_kernel); UNM_ASCENDING only
    best_score_ptr, best_b_ptr,  # [B, splits, nA] (contiguous)
    num_a, r, first_a, first_b, i_blocks, splits,
    UNM_ASCENDING: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    batch = pid // i_blocks
    ii = (pid % i_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = ii < num_a
    num_unm = num_a - r
    best_score_ptr += batch * splits * num_a
    best_b_ptr += batch * splits * num_a
    src_ptr += batch * r
    dst_ptr += batch * r
    unm_ptr += batch * num_unm
    rank_ptr += batch * num_a
    s_i, b_slot = _combined_best(best_score_ptr, best_b_ptr, ii, mask_i, num_a, splits)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, num_a, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        s_j, _ = _combined_best(best_score_ptr, best_b_ptr, jj, jj < num_a, num_a, splits)
        before = (s_j[None, :] > s_i[:, None]) | ((s_j[None, :] == s_i[:, None]) & (jj[None, :] < ii[:, None]))
        before = before & (jj < num_a)[None, :]
        rank += tl.sum(before.to(tl.int32), axis=1)
    a_pos = first_a + 2 * ii
    is_src = mask_i & (rank < r)
    tl.store(src_ptr + rank, a_pos, mask=is_src)
    tl.store(dst_ptr + rank, first_b + 2 * b_slot.to(tl.int64), mask=is_src)
    if UNM_ASCENDING:
        # An unmerged token's slot counts the unmerged tokens before it, whose ranks other programs compute:
        # the last program of the row to finish (arrival counter) writes every slot of the row. The barrier
        # then one release/acquire atomic is the usual CTA-to-CTA handoff; ranks are read past L1 (".cg").
        tl.store(rank_ptr + ii, rank, mask=mask_i)
        tl.debug_barrier()
        if tl.atomic_add(arrived_ptr + batch, 1, sem="acq_rel", scope="gpu") == i_blocks - 1:
            unmerged_before = 0
            for j0 in range(0, num_a, BLOCK_J):
                jj = j0 + tl.arange(0, BLOCK_J)
                mask_j = jj < num_a
                rank_j = tl.load(rank_ptr + jj, mask=mask_j, other=0, cache_modifier=".cg")
                is_unm = mask_j & (rank_j >= r)
                slot = unmerged_before + tl.cumsum(is_unm.to(tl.int32), axis=0) - 1
                tl.store(unm_ptr + slot, first_a + 2 * jj, mask=is_unm)
                unmerged_before += tl.sum(is_unm.to(tl.int32), axis=0)
    else:
        tl.store(unm_ptr + rank - r, a_pos, mask=mask_i & (rank >= r))


@triton.jit(do_not_specialize=["num_a", "num_slots", "half", "a_blocks"])
def _window_match_fwd_kernel(
    best_score_ptr, best_b_ptr,  # [B, 1, nA] acc dtype, int32 (contiguous): _match_rank_kernel's input
    arrived_ptr,  # [B] int32: zeroed here for _match_rank_kernel
    metric_ptr, stride_mb, stride_mn, stride_mc,  # [B, N, C]
    windows_ptr,  # [W, S] int64 (contiguous): its A slots are the even flat offsets, A slot k at 2k
    num_a, channels, num_slots, half, a_blocks,  # num_slots = W * S / 2 listed A tokens, half = S / 2
    ACC_DTYPE: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_a = pid % a_blocks
    batch = pid // a_blocks
    if pid_a == 0:
        tl.store(arrived_ptr + batch, 0)
    ia = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = ia < num_a
    a_pos = 2 * ia

    # The table slot listing each A token (-1: none), by scanning every A slot of the table.
    slot = tl.full([BLOCK_A], -1, dtype=tl.int32)
    for k0 in range(0, num_slots, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        listed_pos = tl.load(windows_ptr + 2 * kk.to(tl.int64), mask=kk < num_slots, other=-1)
        hit = listed_pos[None, :] == a_pos[:, None]
        slot = tl.maximum(slot, tl.max(tl.where(hit, kk[None, :], -1), axis=1))
    listed = mask_a & (slot >= 0)
    slot = slot.to(tl.int64)
    b_slots = windows_ptr + (slot // half) * (2 * half) + 1  # B slot 0 of the token's window

    metric_ptr += batch * stride_mb
    a_rows = metric_ptr + a_pos[:, None] * stride_mn
    inv_a = _inverse_norms(a_rows, listed, channels, stride_mc, ACC_DTYPE, BLOCK_A, BLOCK_C)

    best = tl.full([BLOCK_A], float("-inf"), dtype=ACC_DTYPE)
    best_pos = tl.zeros([BLOCK_A], dtype=tl.int64)
    for j in range(0, half):
        b_pos = tl.load(b_slots + 2 * j, mask=listed, other=0)
        b_rows = metric_ptr + b_pos[:, None] * stride_mn
        dots = tl.zeros([BLOCK_A], dtype=ACC_DTYPE)
        ssq_b = tl.zeros([BLOCK_A], dtype=ACC_DTYPE)
        for c0 in range(0, channels, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = listed[:, None] & (cols < channels)[None, :]
            a = tl.load(a_rows + cols[None, :] * stride_mc, mask=mask, other=0.0).to(ACC_DTYPE)
            b = tl.load(b_rows + cols[None, :] * stride_mc, mask=mask, other=0.0).to(ACC_DTYPE)
            dots += tl.sum(a * b, axis=1)
            ssq_b += tl.sum(b * b, axis=1)
        score = dots * inv_a * (1.0 / tl.maximum(tl.sqrt(ssq_b), NORM_EPS))
        score = tl.where(score != score, float("inf"), score)  # NaN ranks first, as in _match_fwd_kernel
        better = score > best  # strict: on ties the earlier slot stays
        best = tl.where(better, score, best)
        best_pos = tl.where(better, b_pos, best_pos)

    # Unlisted A tokens rank last (r never reaches them: r <= the listed count) and never merge.
    out = batch * num_a + ia
    tl.store(best_score_ptr + out, tl.where(listed, best, float("-inf")), mask=mask_a)
    tl.store(best_b_ptr + out, (best_pos // 2).to(tl.int32), mask=mask_a)  # B position 1 + 2 * slot


# Rank programs own 16 A tokens each (DETR's nA = 550 at batch 2: 70 programs of 5 compare steps, where one
# program per image took 81 serial steps); compare tiles of 16 x 128.
_RANK_BLOCK_I = 16
_RANK_BLOCK_J = 128
_RANK_WARPS = 4
# The B tokens are split across programs until a launch has about this many (two waves of an H100's 132
# SMs) or each split is one tile; each split is a multiple of every config's BLOCK_B.
_TARGET_PROGRAMS = 264
_SPLIT_GRANULE = max(config.kwargs["BLOCK_B"] for config in _FWD_CONFIGS)
# Window match: 32 A tokens per program, table scanned 64 A slots a step, 32-channel chunks.
_WINDOW_BLOCK_A = 32
_WINDOW_BLOCK_K = 64
_WINDOW_BLOCK_C = 32
_WINDOW_WARPS = 4


def _precision(dtype: torch.dtype) -> str:
    # fp32: exact fp32 products (no TF32) so the argmax and the ranking see the reference's scores.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def launch_shape(batch: int, n_a: int, n_b: int) -> dict:
    """Grids of both kernels and the B split, computed without launching (the grid test calls this)."""
    a_blocks = triton.cdiv(n_a, _BLOCK_A)
    b_granules = max(1, triton.cdiv(n_b, _SPLIT_GRANULE))
    wanted = min(b_granules, triton.cdiv(_TARGET_PROGRAMS, max(1, a_blocks * batch)))
    b_per_split = triton.cdiv(b_granules, wanted) * _SPLIT_GRANULE
    splits = max(1, triton.cdiv(n_b, b_per_split))
    return dict(a_blocks=a_blocks, splits=splits, b_per_split=b_per_split,
                fwd_grid=checked_grid(a_blocks * splits * batch), **_rank_shape(batch, n_a))


def window_launch_shape(batch: int, n_a: int) -> dict:
    """Grids of window_match's two kernels, computed without launching (the grid test calls this)."""
    a_blocks = triton.cdiv(n_a, _WINDOW_BLOCK_A)
    return dict(a_blocks=a_blocks, fwd_grid=checked_grid(a_blocks * batch), **_rank_shape(batch, n_a))


def _rank_shape(batch: int, n_a: int) -> dict:
    i_blocks = triton.cdiv(n_a, _RANK_BLOCK_I)
    return dict(i_blocks=i_blocks, rank_grid=checked_grid(i_blocks * batch))


def _indices(metric: torch.Tensor, n_a: int, r: int):
    """Empty (unm_idx [B, nA - r], src_idx [B, r], dst_idx [B, r])."""
    batch, new = metric.shape[0], metric.new_empty
    return new(batch, n_a - r, dtype=torch.long), new(batch, r, dtype=torch.long), new(batch, r, dtype=torch.long)


def _scratch(metric: torch.Tensor, splits: int, n_a: int):
    """best_score [B, splits, nA] (accumulation dtype), best_b [B, splits, nA] and rank [B, nA] (int32), and the
    arrival counter [B] (int32; the first kernel zeroes it)."""
    batch, new = metric.shape[0], metric.new_empty
    score_dtype = torch.float64 if metric.dtype == torch.float64 else torch.float32
    return (new(batch, splits, n_a, dtype=score_dtype), new(batch, splits, n_a, dtype=torch.int32),
            new(batch, n_a, dtype=torch.int32), new(batch, dtype=torch.int32))


def _rank(shape: dict, indices, scratch, n_a: int, r: int, protected: int, splits: int, unm_ascending: bool):
    best_score, best_b, rank, arrived = scratch
    _match_rank_kernel[shape["rank_grid"]](
        *indices, rank, arrived, best_score, best_b, n_a, r, reference.first_a(protected),
        reference.first_b(protected), shape["i_blocks"], splits, UNM_ASCENDING=unm_ascending, BLOCK_I=_RANK_BLOCK_I,
        BLOCK_J=_RANK_BLOCK_J, num_warps=_RANK_WARPS)


def match(metric: torch.Tensor, r: int, protected: int):
    batch, num_tokens, channels = metric.shape
    r = reference.clamp_r(r, num_tokens, protected)
    n_a, n_b = reference.num_a(num_tokens, protected), reference.num_b(num_tokens, protected)
    indices = _indices(metric, n_a, r)
    if batch == 0 or n_a == 0:
        return indices
    shape = launch_shape(batch, n_a, n_b)
    splits = shape["splits"]
    scratch = best_score, best_b, _, arrived = _scratch(metric, splits, n_a)
    with device_guard(metric):
        _match_fwd_kernel[shape["fwd_grid"]](
            best_score, best_b, arrived, metric, *metric.stride(), n_a, n_b, channels, reference.first_a(protected),
            reference.first_b(protected), shape["a_blocks"], splits, shape["b_per_split"], next_pow2(channels),
            next_pow2(n_b), ACC_DTYPE=acc_dtype(metric.dtype), DOT_F32=dot_in_fp32(metric.dtype),
            PRECISION=_precision(metric.dtype))
        _rank(shape, indices, scratch, n_a, r, protected, splits, unm_ascending=protected >= 1 or r == 0)
    return indices


def window_match(metric: torch.Tensor, windows: torch.Tensor, r: int):
    """``reference.window_match``, given what the op layer guarantees: r clamped and >= 1, batch >= 1, and
    ``windows`` contiguous."""
    batch, num_tokens, channels = metric.shape
    num_windows, width = windows.shape
    n_a = reference.num_a(num_tokens, 0)
    indices = _indices(metric, n_a, r)
    shape = window_launch_shape(batch, n_a)
    scratch = best_score, best_b, _, arrived = _scratch(metric, 1, n_a)
    with device_guard(metric):
        _window_match_fwd_kernel[shape["fwd_grid"]](
            best_score, best_b, arrived, metric, *metric.stride(), windows, n_a, channels,
            num_windows * (width // 2), width // 2, shape["a_blocks"], ACC_DTYPE=acc_dtype(metric.dtype),
            BLOCK_A=_WINDOW_BLOCK_A, BLOCK_K=_WINDOW_BLOCK_K, BLOCK_C=_WINDOW_BLOCK_C, num_warps=_WINDOW_WARPS)
        _rank(shape, indices, scratch, n_a, r, 0, 1, unm_ascending=True)
    return indices


def aot_specs() -> list[AotSpec]:
    specs = []
    for name, dtype in AOT_DTYPES.items():
        for i, config in enumerate(_FWD_CONFIGS):
            blocks = {**config.kwargs, "BLOCK_C": _block_c(dtype)}
            specs.append(AotSpec(
                _match_fwd_kernel.fn.fn, f"{name} config{i} {blocks}",  # .fn.fn: under autotune and heuristics
                {"best_score_ptr": "fp32", "best_b_ptr": "i32", "arrived_ptr": "i32", "metric_ptr": name},
                {"stride_mc": 1, "ACC_DTYPE": tl.float32, "DOT_F32": False, "PRECISION": _precision(dtype), **blocks},
                num_warps=config.num_warps, num_stages=config.num_stages))
    for ascending in (False, True):
        specs.append(AotSpec(
            _match_rank_kernel, f"UNM_ASCENDING={ascending}",
            {"unm_ptr": "i64", "src_ptr": "i64", "dst_ptr": "i64", "rank_ptr": "i32", "arrived_ptr": "i32",
             "best_score_ptr": "fp32", "best_b_ptr": "i32"},
            {"UNM_ASCENDING": ascending, "BLOCK_I": _RANK_BLOCK_I, "BLOCK_J": _RANK_BLOCK_J}, num_warps=_RANK_WARPS))
    for name in AOT_DTYPES:
        specs.append(AotSpec(
            _window_match_fwd_kernel, name,
            {"best_score_ptr": "fp32", "best_b_ptr": "i32", "arrived_ptr": "i32", "metric_ptr": name,
             "windows_ptr": "i64"},
            {"stride_mc": 1, "ACC_DTYPE": tl.float32, "BLOCK_A": _WINDOW_BLOCK_A, "BLOCK_K": _WINDOW_BLOCK_K,
             "BLOCK_C": _WINDOW_BLOCK_C}, num_warps=_WINDOW_WARPS))
    return specs
