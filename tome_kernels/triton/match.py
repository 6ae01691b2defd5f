"""Bipartite soft matching in two launches; the nA x nB score matrix is never written.

Math (spec: :func:`tome_kernels.reference.match`): with A = non-protected even tokens and B = non-protected
odd tokens, ``score[a, b] = <m_a, m_b> / (max(|m_a|, eps) * max(|m_b|, eps))`` (cosine similarity of the
L2-normalised metric; a zero vector scores 0, never NaN); each A token keeps its best B partner (first on
ties); A tokens are ranked by best score, descending, ties to the lower position; the first r merge.

1. ``_match_fwd_kernel`` (grid: A blocks x batch) is a flash-style row reduction: per block of A rows it
   walks the B tokens in tiles, computes ``A_tile @ B_tile^T`` with ``tl.dot`` (fp32 accumulate) over
   channel chunks, scales by the two inverse norms afterwards, and keeps a running (max, argmax) per A row.
   The norms are accumulated from the tiles already loaded for the dot (no separate normalisation pass
   over the metric). fp16/bf16 products are exact in fp32, so the fp32 accumulation is as accurate as the
   reference's fp32 normalise-then-matmul; fp32 metrics use ``input_precision="ieee"`` (not TF32) so the
   chosen indices equal the reference's. Only ``best_score/best_b [B, nA]`` reach memory.
2. ``_match_rank_kernel`` (grid: batch) ranks the nA best scores by counting, for each A token, the tokens
   that sort before it: ``rank[i] = #{j : s_j > s_i or (s_j == s_i and j < i)}`` — exactly the stable
   descending order. It then scatters ``src/dst`` to ``rank < r`` and the unmerged tokens either to
   ``rank - r`` (protected == 0, rank order) or, with a running count, in ascending position
   (protected >= 1, or r = 0 after the clamp: every op then returns its input unchanged).

Why count instead of ``tl.sort`` or a torch sort: the ranking has to see the whole row, and a torch sort
is several launches (sort, gathers, the second sort of the unmerged tokens) where the launch budget of a
ToMe layer is 3 (this file 2 + merge 1). ``tl.sort`` needs the row in one power-of-two tile (a compile
per size bucket and a size limit), the count is O(nA^2) compares in fixed 64 x 64 tiles with runtime loops:
any N, one compile, no ties to break by hand. At ViT sizes (nA ~ 100-300) that is 10^4-10^5 compares per
row; at DETR's nA ~ 550, 3 x 10^5 (~ 75 tile steps on one CTA): microseconds, next to the fwd kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import AotSpec, AOT_DTYPES, acc_dtype, autotune_configs, device_guard, dot_in_fp32, next_pow2

NORM_EPS = tl.constexpr(reference.NORM_EPS)

# Two configs (GPU autotune; the interpreter takes the first). Channel chunks of 32: fp32 metrics go through
# exact fp32 (FMA) dots whose operands live in registers; at 64 channels they spill on sm_80.
_FWD_CONFIGS = [
    triton.Config({"BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_C": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_A": 64, "BLOCK_B": 128, "BLOCK_C": 32}, num_warps=8, num_stages=2),
]


@triton.autotune(configs=autotune_configs(_FWD_CONFIGS), key=["CHANNEL_BUCKET", "TOKEN_BUCKET"])
@triton.jit(do_not_specialize=["num_a", "num_b", "first_a", "first_b"])
def _match_fwd_kernel(
    best_score_ptr, best_b_ptr,  # [B, nA] acc dtype, int32 (contiguous)
    metric_ptr, stride_mb, stride_mn, stride_mc,  # [B, N, C]
    num_a, num_b, channels, first_a, first_b,
    CHANNEL_BUCKET, TOKEN_BUCKET,  # autotune keys only (next powers of two of C and nB)
    ACC_DTYPE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_a = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    ia = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = ia < num_a
    metric_ptr += batch * stride_mb
    a_rows = metric_ptr + (first_a + 2 * ia)[:, None] * stride_mn

    # Squared norms of the A rows (one extra read of BLOCK_A rows; the B norms come from the dot's tiles).
    ssq_a = tl.zeros([BLOCK_A], dtype=ACC_DTYPE)
    for c0 in range(0, channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        a = tl.load(a_rows + cols[None, :] * stride_mc, mask=mask_a[:, None] & (cols < channels)[None, :],
                    other=0.0).to(ACC_DTYPE)
        ssq_a += tl.sum(a * a, axis=1)
    inv_a = 1.0 / tl.maximum(tl.sqrt(ssq_a), NORM_EPS)

    best = tl.full([BLOCK_A], float("-inf"), dtype=ACC_DTYPE)
    best_b = tl.zeros([BLOCK_A], dtype=tl.int32)
    for b0 in range(0, num_b, BLOCK_B):
        ib = b0 + tl.arange(0, BLOCK_B)
        mask_b = ib < num_b
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
        best_b = tl.where(better, b0 + tile_arg, best_b)

    tl.store(best_score_ptr + batch * num_a + ia, best, mask=mask_a)
    tl.store(best_b_ptr + batch * num_a + ia, best_b, mask=mask_a)


@triton.jit(do_not_specialize=["num_a", "r", "first_a", "first_b"])
def _match_rank_kernel(
    unm_ptr, src_ptr, dst_ptr,  # [B, nA - r], [B, r], [B, r] int64 (contiguous)
    best_score_ptr, best_b_ptr,  # [B, nA] (contiguous)
    num_a, r, first_a, first_b,
    UNM_ASCENDING: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    best_score_ptr += batch * num_a
    num_unm = num_a - r
    unmerged_before = 0  # unmerged tokens in earlier i blocks (ascending order)
    for i0 in range(0, num_a, BLOCK_I):
        ii = i0 + tl.arange(0, BLOCK_I)
        mask_i = ii < num_a
        s_i = tl.load(best_score_ptr + ii, mask=mask_i, other=0.0)
        rank = tl.zeros([BLOCK_I], dtype=tl.int32)
        for j0 in range(0, num_a, BLOCK_J):
            jj = j0 + tl.arange(0, BLOCK_J)
            s_j = tl.load(best_score_ptr + jj, mask=jj < num_a, other=0.0)
            before = (s_j[None, :] > s_i[:, None]) | ((s_j[None, :] == s_i[:, None]) & (jj[None, :] < ii[:, None]))
            before = before & (jj < num_a)[None, :]
            rank += tl.sum(before.to(tl.int32), axis=1)
        a_pos = first_a + 2 * ii.to(tl.int64)
        is_src = mask_i & (rank < r)
        b_slot = tl.load(best_b_ptr + batch * num_a + ii, mask=is_src, other=0)
        tl.store(src_ptr + batch * r + rank, a_pos, mask=is_src)
        tl.store(dst_ptr + batch * r + rank, first_b + 2 * b_slot.to(tl.int64), mask=is_src)
        is_unm = mask_i & (rank >= r)
        if UNM_ASCENDING:
            slot = unmerged_before + tl.cumsum(is_unm.to(tl.int32), axis=0) - 1
            unmerged_before += tl.sum(is_unm.to(tl.int32), axis=0)
        else:
            slot = rank - r
        tl.store(unm_ptr + batch * num_unm + slot, a_pos, mask=is_unm)


_RANK_BLOCK = 64
_RANK_WARPS = 4


def _precision(dtype: torch.dtype) -> str:
    # fp32: exact fp32 products (no TF32) so the argmax and the ranking see the reference's scores.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def match(metric: torch.Tensor, r: int, protected: int):
    batch, num_tokens, channels = metric.shape
    r = reference.clamp_r(r, num_tokens, protected)
    n_a, n_b = reference.num_a(num_tokens, protected), reference.num_b(num_tokens, protected)
    new = metric.new_empty
    unm_idx, src_idx, dst_idx = (new(batch, n_a - r, dtype=torch.long), new(batch, r, dtype=torch.long),
                                 new(batch, r, dtype=torch.long))
    if batch == 0 or n_a == 0:
        return unm_idx, src_idx, dst_idx
    best_score = new(batch, n_a, dtype=torch.float64 if metric.dtype == torch.float64 else torch.float32)
    best_b = new(batch, n_a, dtype=torch.int32)
    with device_guard(metric):
        grid = lambda meta: (triton.cdiv(n_a, meta["BLOCK_A"]), batch)  # noqa: E731
        _match_fwd_kernel[grid](
            best_score, best_b, metric, *metric.stride(), n_a, n_b, channels,
            reference.first_a(protected), reference.first_b(protected), next_pow2(channels), next_pow2(n_b),
            ACC_DTYPE=acc_dtype(metric.dtype), DOT_F32=dot_in_fp32(metric.dtype),
            PRECISION=_precision(metric.dtype))
        _match_rank_kernel[(batch,)](
            unm_idx, src_idx, dst_idx, best_score, best_b, n_a, r,
            reference.first_a(protected), reference.first_b(protected),
            UNM_ASCENDING=protected >= 1 or r == 0, BLOCK_I=_RANK_BLOCK, BLOCK_J=_RANK_BLOCK, num_warps=_RANK_WARPS)
    return unm_idx, src_idx, dst_idx


def aot_specs() -> list[AotSpec]:
    specs = []
    for name, dtype in AOT_DTYPES.items():
        for i, config in enumerate(_FWD_CONFIGS):
            specs.append(AotSpec(
                _match_fwd_kernel.fn, f"{name} config{i} {config.kwargs}",
                {"best_score_ptr": "fp32", "best_b_ptr": "i32", "metric_ptr": name},
                {"stride_mc": 1, "ACC_DTYPE": tl.float32, "DOT_F32": False, "PRECISION": _precision(dtype),
                 **config.kwargs}, num_warps=config.num_warps, num_stages=config.num_stages))
    for ascending in (False, True):
        specs.append(AotSpec(
            _match_rank_kernel, f"UNM_ASCENDING={ascending}",
            {"unm_ptr": "i64", "src_ptr": "i64", "dst_ptr": "i64", "best_score_ptr": "fp32", "best_b_ptr": "i32"},
            {"UNM_ASCENDING": ascending, "BLOCK_I": _RANK_BLOCK, "BLOCK_J": _RANK_BLOCK}, num_warps=_RANK_WARPS))
    return specs
