"""Proportional attention, flash-attention style: ``softmax(q k^T * scale + log size) v``.

Spec: :func:`tome_kernels.reference.attention` / ``attention_backward``. ``size [B, Nk]`` is a per-key bias
``log size`` added to the logits (ToMe's proportional attention: a token standing for s merged tokens counts
s times in the softmax). Never materialises the Nq x Nk matrix.

``_attn_fwd_kernel`` (grid: q blocks x batch*heads, one axis): q tile in registers, walk k/v tiles with the online
    softmax (running max m, running sum l, rescaled accumulator), bias loaded once per key tile.
    Writes ``out`` (input dtype) and the natural-log ``lse = m + log l`` (fp32; fp64 for fp64 inputs).
``_attn_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` (fp32), one pass over O and dO.
``_attn_bwd_kernel`` (grid: (k blocks + q blocks) x batch*heads, one axis): the first programs own a key tile and
    walk the queries (``dv += p^T dO``, ``dk += ds^T q``), the others own a query tile and walk the keys
    (``dq += ds k``); ``p`` is recomputed from ``lse``. No atomics: each gradient row has one owner.

Token offsets: the tile a program owns is indexed in int64, the tiles it walks by advancing 64-bit pointers,
so no token x stride product is formed in 32 bits (a packed qkv row stride 3 * H * D passes 2^31 past ~930k
tokens).

Supported (kernel path): head dim <= 128 (tiles pad to 32/64/128 with masks), any Nq and Nk >= 1,
fp16/bf16/fp32 (fp64 under the interpreter). ``_supported`` below is the line: anything else (head dim >
128, fp64 CUDA tensors, empty tensors) runs the reference. fp32 inputs use 3xTF32 dots (``tf32x3``: tensor
cores, ~fp32 accuracy). Sizes are a runtime flag (a masked load of 1 gives a zero bias).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import (AotSpec, AOT_DTYPES, SHARED_MEMORY_PER_BLOCK, acc_dtype, checked_grid, device_guard,
                      dot_in_fp32, next_pow2, runs_kernels, shared_memory_per_block)

MAX_HEAD_DIM = 128


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit(do_not_specialize=["seq_q", "seq_k", "q_blocks"])
def _attn_fwd_kernel(
    out_ptr, lse_ptr,  # [B, H, Nq, D] (contiguous), [B, H, Nq] (contiguous)
    q_ptr, stride_qb, stride_qh, stride_qm, stride_qd,  # [B, H, Nq, D]
    k_ptr, stride_kb, stride_kh, stride_kn, stride_kd,  # [B, H, Nk, D]
    v_ptr, stride_vb, stride_vh, stride_vn, stride_vd,  # [B, H, Nk, D]
    size_ptr, stride_sb, stride_sn,  # [B, Nk]
    heads, seq_q, seq_k, head_dim, q_blocks, scale, has_size,
    ACC_DTYPE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // q_blocks
    b = bh // heads
    h = bh % heads
    rows = (pid % q_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask_m = rows < seq_q
    mask_d = dims < head_dim
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    tile_n = tl.arange(0, BLOCK_N)
    k_tile = k_ptr + b * stride_kb + h * stride_kh + tile_n[:, None] * stride_kn + dims[None, :] * stride_kd
    v_tile = v_ptr + b * stride_vb + h * stride_vh + tile_n[:, None] * stride_vn + dims[None, :] * stride_vd
    size_ptr += b * stride_sb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for n0 in range(0, seq_k, BLOCK_N):
        cols = n0 + tile_n
        mask_n = cols < seq_k
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_tile, mask=kv_mask, other=0.0)
        v = tl.load(v_tile, mask=kv_mask, other=0.0)
        k_tile += BLOCK_N * stride_kn  # 64-bit pointers advance: no token x stride product can overflow
        v_tile += BLOCK_N * stride_vn
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE), DOT_F32, PRECISION) * scale
        s += _load_bias(size_ptr, stride_sn, cols, mask_n, has_size, ACC_DTYPE)[None, :]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # While a row has seen only masked keys (size 0: -inf), shift by 0, not -inf (exp(-inf + inf) = NaN).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_shift[:, None])
        alpha = tl.exp(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_F32, PRECISION)
        m_i = m_new
    # All keys masked: out 0 (acc is 0), lse = -inf + log 0 = -inf.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_rows = bh * seq_q + rows
    tl.store(out_ptr + out_rows[:, None] * head_dim + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + out_rows, m_i + tl.log(l_i), mask=mask_m)


@triton.jit(do_not_specialize=["rows_total"])
def _attn_bwd_preprocess_kernel(
    delta_ptr,  # [B * H * Nq] acc dtype
    out_ptr, do_ptr,  # [B * H * Nq, D] (contiguous)
    rows_total, head_dim,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < rows_total
    delta = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    for d0 in range(0, head_dim, BLOCK_D):  # one compile for every head dim
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = mask_m[:, None] & (dims < head_dim)[None, :]
        offs = rows[:, None] * head_dim + dims[None, :]
        o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        delta += tl.sum(o * do, axis=1)
    tl.store(delta_ptr + rows, delta, mask=mask_m)


@triton.jit
def _load_bias(size_ptr, stride_sn, cols, mask_n, has_size, ACC_DTYPE: tl.constexpr):
    """``log size`` of a key tile; without sizes (``has_size`` 0) the masked load gives log 1 = 0. A runtime
    flag, not a constexpr: one compile serves both, at the cost of a log per key and tile."""
    return tl.log(tl.load(size_ptr + cols * stride_sn, mask=mask_n & (has_size != 0), other=1.0).to(ACC_DTYPE))


@triton.jit
def _recompute_p(q, k, lse, bias, mask_m, mask_n, scale, ACC_DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Probabilities of a [BLOCK_M, BLOCK_N] tile from the saved log-sum-exp (0 outside the matrix, and in
    all-masked rows, lse -inf: there every bias is -inf, so any finite shift gives 0, not NaN)."""
    s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], dtype=ACC_DTYPE), DOT_F32, PRECISION) * scale
    p = tl.exp(s + bias[None, :] - tl.where(lse == float("-inf"), 0.0, lse)[:, None])
    return tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)


@triton.jit
def _attn_bwd_dkdv(dk_ptr, dv_ptr, q_ptr, stride_qm, stride_qd, k_ptr, stride_kn, stride_kd, v_ptr, stride_vn,
                   stride_vd, do_ptr, lse_ptr, delta_ptr, size_ptr, stride_sn, out_row0, block, seq_q, seq_k,
                   head_dim, scale, has_size, ACC_DTYPE: tl.constexpr, DOT_F32: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk, dv of one key tile: walk every query tile."""
    dims = tl.arange(0, BLOCK_D)
    mask_d = dims < head_dim
    cols = block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < seq_k
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
    bias = _load_bias(size_ptr, stride_sn, cols, mask_n, has_size, ACC_DTYPE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    tile_m = tl.arange(0, BLOCK_M)
    q_tile = q_ptr + tile_m[:, None] * stride_qm + dims[None, :] * stride_qd
    do_tile = do_ptr + tile_m[:, None] * head_dim + dims[None, :]
    for m0 in range(0, seq_q, BLOCK_M):
        rows = m0 + tile_m
        mask_m = rows < seq_q
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_tile, mask=q_mask, other=0.0)
        do = tl.load(do_tile, mask=q_mask, other=0.0)
        q_tile += BLOCK_M * stride_qm
        do_tile += BLOCK_M * head_dim
        lse = tl.load(lse_ptr + rows, mask=mask_m, other=0.0).to(ACC_DTYPE)
        delta = tl.load(delta_ptr + rows, mask=mask_m, other=0.0).to(ACC_DTYPE)
        p = _recompute_p(q, k, lse, bias, mask_m, mask_n, scale, ACC_DTYPE, DOT_F32, PRECISION)
        dv = _dot(tl.trans(p.to(do.dtype)), do, dv, DOT_F32, PRECISION)
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE), DOT_F32, PRECISION)
        ds = p * (dp - delta[:, None])
        dk = _dot(tl.trans(ds.to(q.dtype)), q, dk, DOT_F32, PRECISION)
    offs = (out_row0 + cols)[:, None] * head_dim + dims[None, :]
    tl.store(dk_ptr + offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(dq_ptr, q_ptr, stride_qm, stride_qd, k_ptr, stride_kn, stride_kd, v_ptr, stride_vn, stride_vd,
                 do_ptr, lse_ptr, delta_ptr, size_ptr, stride_sn, out_row0, block, seq_q, seq_k, head_dim, scale, has_size,
                 ACC_DTYPE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq of one query tile: walk every key tile."""
    dims = tl.arange(0, BLOCK_D)
    mask_d = dims < head_dim
    rows = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < seq_q
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qm + dims[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + rows[:, None] * head_dim + dims[None, :], mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=mask_m, other=0.0).to(ACC_DTYPE)
    delta = tl.load(delta_ptr + rows, mask=mask_m, other=0.0).to(ACC_DTYPE)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    tile_n = tl.arange(0, BLOCK_N)
    k_tile = k_ptr + tile_n[:, None] * stride_kn + dims[None, :] * stride_kd
    v_tile = v_ptr + tile_n[:, None] * stride_vn + dims[None, :] * stride_vd
    for n0 in range(0, seq_k, BLOCK_N):
        cols = n0 + tile_n
        mask_n = cols < seq_k
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_tile, mask=kv_mask, other=0.0)
        v = tl.load(v_tile, mask=kv_mask, other=0.0)
        k_tile += BLOCK_N * stride_kn
        v_tile += BLOCK_N * stride_vn
        bias = _load_bias(size_ptr, stride_sn, cols, mask_n, has_size, ACC_DTYPE)
        p = _recompute_p(q, k, lse, bias, mask_m, mask_n, scale, ACC_DTYPE, DOT_F32, PRECISION)
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE), DOT_F32, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_F32, PRECISION)
    offs = (out_row0 + rows)[:, None] * head_dim + dims[None, :]
    tl.store(dq_ptr + offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=["seq_q", "seq_k", "k_blocks", "blocks"])
def _attn_bwd_kernel(
    dq_ptr, dk_ptr, dv_ptr,  # [B, H, Nq, D], [B, H, Nk, D], [B, H, Nk, D] (contiguous)
    q_ptr, stride_qb, stride_qh, stride_qm, stride_qd,  # [B, H, Nq, D]
    k_ptr, stride_kb, stride_kh, stride_kn, stride_kd,  # [B, H, Nk, D]
    v_ptr, stride_vb, stride_vh, stride_vn, stride_vd,  # [B, H, Nk, D]
    do_ptr, lse_ptr, delta_ptr,  # [B, H, Nq, D] (contiguous), [B, H, Nq] (contiguous) x2
    size_ptr, stride_sb, stride_sn,  # [B, Nk]
    heads, seq_q, seq_k, head_dim, k_blocks, blocks, scale, has_size,
    ACC_DTYPE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0) % blocks  # blocks = k_blocks + q blocks
    bh = (tl.program_id(0) // blocks).to(tl.int64)
    b = bh // heads
    h = bh % heads
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    do_ptr += bh * seq_q * head_dim
    lse_ptr += bh * seq_q
    delta_ptr += bh * seq_q
    size_ptr += b * stride_sb
    if pid < k_blocks:
        _attn_bwd_dkdv(dk_ptr, dv_ptr, q_ptr, stride_qm, stride_qd, k_ptr, stride_kn, stride_kd, v_ptr, stride_vn,
                       stride_vd, do_ptr, lse_ptr, delta_ptr, size_ptr, stride_sn, bh * seq_k, pid, seq_q, seq_k,
                       head_dim, scale, has_size, ACC_DTYPE, DOT_F32, PRECISION, BLOCK_D, BLOCK_M, BLOCK_N)
    else:
        _attn_bwd_dq(dq_ptr, q_ptr, stride_qm, stride_qd, k_ptr, stride_kn, stride_kd, v_ptr, stride_vn, stride_vd,
                     do_ptr, lse_ptr, delta_ptr, size_ptr, stride_sn, bh * seq_q, pid - k_blocks, seq_q, seq_k,
                     head_dim, scale, has_size, ACC_DTYPE, DOT_F32, PRECISION, BLOCK_D, BLOCK_M, BLOCK_N)


@dataclasses.dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 3

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)


# Tiles per (element size, BLOCK_D) of the forward and the backward. Fixed, not autotuned: attention is called
# at a handful of (N, D) per model, the table keeps the AOT set small (autotuning x 3 dtypes x 3 head dims x 6
# archs), and no first call pays for benchmarking. Chosen from python -m tome_kernels.aot (registers / spills /
# shared memory): the backward keeps ~3 fp32 [M, N] tiles and two [N, D] accumulators live, and fp32's 3xTF32
# dots split every operand in two, so wide heads and fp32 get smaller tiles and 8 warps.
# fp32 tiles are the ones that compile without spills on all six archs (mma.sync archs need ~250 registers
# for 3xTF32 tiles of 64 x 32 at head dim 64).
_FWD_TILES = {2: {32: Tile(64, 64, 4), 64: Tile(64, 64, 4), 128: Tile(64, 32, 4)},
              4: {32: Tile(64, 16, 4), 64: Tile(32, 32, 8), 128: Tile(16, 32, 8)}}
_BWD_TILES = {2: {32: Tile(64, 64, 4), 64: Tile(32, 64, 4), 128: Tile(32, 64, 8)},
              4: {32: Tile(16, 32, 4), 64: Tile(16, 32, 8), 128: Tile(16, 16, 8)}}
# Devices with less shared memory per block than an A100 (GA10x, Ada, consumer Blackwell: 99 KB) get these
# instead, keyed (element size, BLOCK_D), where the table's tile does not fit there (the AOT run checks every
# arch against its limit): fp32 head dim 65-128 needs 102,656 B with 3 stages, so it pipelines 2 deep there.
_FULL_SHARED_MEMORY = SHARED_MEMORY_PER_BLOCK[80]
_SMALL_SMEM_FWD_TILES = {(4, 128): Tile(16, 32, 8, num_stages=2)}
_SMALL_SMEM_BWD_TILES = {}
_PREPROCESS_BLOCK_M = 64
_PREPROCESS_BLOCK_D = 32
HEAD_DIM_TILES = (32, 64, 128)  # BLOCK_D: head dims pad up to one of these (masked)


def _tile(table, small_smem_table, dtype: torch.dtype, block_d: int, shared_memory: int | None) -> Tile:
    """The tile for this dtype and padded head dim on a device with ``shared_memory`` bytes per block (None:
    the interpreter, which has no limit)."""
    key = (min(torch.finfo(dtype).bits // 8, 4), block_d)
    if shared_memory is not None and shared_memory < _FULL_SHARED_MEMORY and key in small_smem_table:
        return small_smem_table[key]
    return table[key[0]][block_d]


def fwd_shape(batch: int, heads: int, seq_q: int, dtype: torch.dtype, block_d: int,
              shared_memory: int | None) -> dict:
    """Tile and grid of ``_attn_fwd_kernel`` (q blocks x batch*heads on axis 0), computed without launching."""
    tile = _tile(_FWD_TILES, _SMALL_SMEM_FWD_TILES, dtype, block_d, shared_memory)
    q_blocks = triton.cdiv(seq_q, tile.block_m)
    return dict(tile=tile, q_blocks=q_blocks, grid=checked_grid(q_blocks * batch * heads))


def bwd_shape(batch: int, heads: int, seq_q: int, seq_k: int, dtype: torch.dtype, block_d: int,
              shared_memory: int | None) -> dict:
    """Tile and grids of the backward kernels ((k blocks + q blocks) x batch*heads on axis 0)."""
    tile = _tile(_BWD_TILES, _SMALL_SMEM_BWD_TILES, dtype, block_d, shared_memory)
    k_blocks = triton.cdiv(seq_k, tile.block_n)
    blocks = k_blocks + triton.cdiv(seq_q, tile.block_m)
    return dict(tile=tile, k_blocks=k_blocks, blocks=blocks, grid=checked_grid(blocks * batch * heads),
                preprocess_grid=checked_grid(triton.cdiv(batch * heads * seq_q, _PREPROCESS_BLOCK_M)))


def _supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """THE LINE: where the kernels run. Anything else (head dim > 128, fp64 CUDA tensors, empty tensors) runs
    the reference."""
    return q.shape[-1] <= MAX_HEAD_DIM and runs_kernels(q) and q.numel() > 0 and k.shape[2] > 0


def _block_d(head_dim: int) -> int:
    return max(HEAD_DIM_TILES[0], next_pow2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    # fp32: 3xTF32 (tensor cores, ~fp32 accuracy; plain TF32 would be ~1e-3 off the reference). Ignored for
    # fp16/bf16 and by the interpreter.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _flags(q: torch.Tensor) -> dict:
    return dict(ACC_DTYPE=acc_dtype(q.dtype), DOT_F32=dot_in_fp32(q.dtype), PRECISION=_precision(q.dtype),
                BLOCK_D=_block_d(q.shape[-1]))


def _size_args(size, q):
    return (q, 0, 0, 0) if size is None else (size, *size.stride(), 1)


def attention(q, k, v, size, scale):
    if not _supported(q, k):
        return reference.attention(q, k, v, size, scale)
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty(batch, heads, seq_q, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    flags = _flags(q)
    shape = fwd_shape(batch, heads, seq_q, q.dtype, flags["BLOCK_D"], shared_memory_per_block(q.device))
    with device_guard(q):
        size_t, stride_sb, stride_sn, has_size = _size_args(size, q)
        _attn_fwd_kernel[shape["grid"]](
            out, lse, q, *q.stride(), k, *k.stride(), v, *v.stride(), size_t, stride_sb, stride_sn,
            heads, seq_q, seq_k, head_dim, shape["q_blocks"], scale, has_size, **flags, **shape["tile"].meta())
    return out, lse


def attention_backward(grad_out, q, k, v, size, out, lse, scale):
    if not _supported(q, k):
        return reference.attention_backward(grad_out, q, k, v, size, out, lse, scale)
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    flags = _flags(q)
    delta = torch.empty(lse.shape, dtype=lse.dtype, device=q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    shape = bwd_shape(batch, heads, seq_q, seq_k, q.dtype, flags["BLOCK_D"], shared_memory_per_block(q.device))
    with device_guard(q):
        rows = batch * heads * seq_q
        _attn_bwd_preprocess_kernel[shape["preprocess_grid"]](
            delta, out, grad_out, rows, head_dim, ACC_DTYPE=flags["ACC_DTYPE"], BLOCK_M=_PREPROCESS_BLOCK_M,
            BLOCK_D=_PREPROCESS_BLOCK_D)
        size_t, stride_sb, stride_sn, has_size = _size_args(size, q)
        _attn_bwd_kernel[shape["grid"]](
            dq, dk, dv, q, *q.stride(), k, *k.stride(), v, *v.stride(), grad_out, lse, delta,
            size_t, stride_sb, stride_sn, heads, seq_q, seq_k, head_dim, shape["k_blocks"], shape["blocks"], scale,
            has_size, **flags, **shape["tile"].meta())
    return dq, dk, dv


def aot_specs(arch: int) -> list[AotSpec]:
    """The tiles the launchers pick on ``arch`` (its shared memory per block decides)."""
    specs = []
    qkv = {p: None for p in ("q_ptr", "k_ptr", "v_ptr")}
    shared_memory = SHARED_MEMORY_PER_BLOCK[arch]
    for name, dtype in AOT_DTYPES.items():
        for block_d in HEAD_DIM_TILES:
            common = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "ACC_DTYPE": tl.float32, "DOT_F32": False,
                      "PRECISION": _precision(dtype), "BLOCK_D": block_d}
            for kernel, table, small, outputs in (
                    (_attn_fwd_kernel, _FWD_TILES, _SMALL_SMEM_FWD_TILES, ("out_ptr",)),
                    (_attn_bwd_kernel, _BWD_TILES, _SMALL_SMEM_BWD_TILES, ("dq_ptr", "dk_ptr", "dv_ptr", "do_ptr"))):
                tile = _tile(table, small, dtype, block_d, shared_memory)
                specs.append(AotSpec(
                    kernel, f"{name} D={block_d} BLOCK_M={tile.block_m} BLOCK_N={tile.block_n}"
                    f" stages={tile.num_stages}",
                    {**{p: name for p in (*qkv, *outputs)}, "lse_ptr": "fp32", "delta_ptr": "fp32", "size_ptr": "fp32"},
                    {**common, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n}, num_warps=tile.num_warps,
                    num_stages=tile.num_stages, floats=("scale",)))
        specs.append(AotSpec(
            _attn_bwd_preprocess_kernel, name, {"delta_ptr": "fp32", "out_ptr": name, "do_ptr": name},
            {"ACC_DTYPE": tl.float32, "BLOCK_M": _PREPROCESS_BLOCK_M, "BLOCK_D": _PREPROCESS_BLOCK_D}))
    return specs
