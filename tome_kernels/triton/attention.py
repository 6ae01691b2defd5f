"""Proportional attention, flash-attention style: ``softmax(q k^T * scale + log size) v``.

Spec: :func:`tome_kernels.reference.attention` / ``attention_backward``. ``size [B, Nk]`` is a per-key bias
``log size`` added to the logits (ToMe's proportional attention: a token standing for s merged tokens counts
s times in the softmax). Never materialises the Nq x Nk matrix.

``_attn_fwd_kernel`` (grid: q blocks x batch*heads): q tile in registers, walk k/v tiles with the online
    softmax (running max m, running sum l, rescaled accumulator), bias loaded once per key tile.
    Writes ``out`` (input dtype) and the natural-log ``lse = m + log l`` (fp32; fp64 for fp64 inputs).
``_attn_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` (fp32), one pass over O and dO.
``_attn_bwd_kernel`` (grid: (k blocks + q blocks) x batch*heads): the first programs own a key tile and
    walk the queries (``dv += p^T dO``, ``dk += ds^T q``), the others own a query tile and walk the keys
    (``dq += ds k``); ``p`` is recomputed from ``lse``. No atomics: each gradient row has one owner.

Supported (kernel path): head dim <= 128 (tiles pad to 16/32/64/128 with masks), any Nq and Nk >= 1,
fp16/bf16/fp32 (fp64 under the interpreter). ``_supported`` below is the line: anything else (head dim >
128, fp64 CUDA tensors, empty tensors) runs the reference. fp32 inputs use exact fp32 dots unless
``torch.get_float32_matmul_precision()`` allows TF32, the switch that governs the reference's matmuls.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import (AotSpec, AOT_DTYPES, GPU_DTYPES, INTERPRET, acc_dtype, autotune_configs, device_guard,
                      dot_in_fp32, next_pow2, runs_kernels)

MAX_HEAD_DIM = 128


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
]


@triton.autotune(configs=autotune_configs(_FWD_CONFIGS), key=["SEQ_BUCKET", "BLOCK_D"])
@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def _attn_fwd_kernel(
    out_ptr, lse_ptr,  # [B, H, Nq, D] (contiguous), [B, H, Nq] (contiguous)
    q_ptr, stride_qb, stride_qh, stride_qm, stride_qd,  # [B, H, Nq, D]
    k_ptr, stride_kb, stride_kh, stride_kn, stride_kd,  # [B, H, Nk, D]
    v_ptr, stride_vb, stride_vh, stride_vn, stride_vd,  # [B, H, Nk, D]
    size_ptr, stride_sb, stride_sn,  # [B, Nk]
    heads, seq_q, seq_k, head_dim, scale,
    SEQ_BUCKET,  # autotune key only (next power of two of Nk)
    HAS_SIZE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask_m = rows < seq_q
    mask_d = dims < head_dim
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    size_ptr += b * stride_sb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for n0 in range(0, seq_k, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask_n = cols < seq_k
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE), DOT_F32, PRECISION) * scale
        if HAS_SIZE:
            s += tl.log(tl.load(size_ptr + cols * stride_sn, mask=mask_n, other=1.0).to(ACC_DTYPE))[None, :]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_F32, PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    out_rows = bh * seq_q + rows
    tl.store(out_ptr + out_rows[:, None] * head_dim + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + out_rows, m_i + tl.log(l_i), mask=mask_m)


@triton.jit(do_not_specialize=["rows_total"])
def _attn_bwd_preprocess_kernel(
    delta_ptr,  # [B * H * Nq] acc dtype
    out_ptr, do_ptr,  # [B * H * Nq, D] (contiguous)
    rows_total, head_dim,
    ACC_DTYPE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < rows_total)[:, None] & (dims < head_dim)[None, :]
    offs = rows[:, None] * head_dim + dims[None, :]
    o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(delta_ptr + rows, tl.sum(o * do, axis=1), mask=rows < rows_total)


@triton.jit
def _recompute_p(q, k, lse, bias, mask_m, mask_n, scale, HAS_SIZE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """Probabilities of a [BLOCK_M, BLOCK_N] tile from the saved log-sum-exp (0 outside the matrix)."""
    s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], dtype=ACC_DTYPE), DOT_F32, PRECISION) * scale
    if HAS_SIZE:
        s += bias[None, :]
    p = tl.exp(s - lse[:, None])
    return tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)


@triton.jit(do_not_specialize=["seq_q", "seq_k", "k_blocks"])
def _attn_bwd_kernel(
    dq_ptr, dk_ptr, dv_ptr,  # [B, H, Nq, D], [B, H, Nk, D], [B, H, Nk, D] (contiguous)
    q_ptr, stride_qb, stride_qh, stride_qm, stride_qd,  # [B, H, Nq, D]
    k_ptr, stride_kb, stride_kh, stride_kn, stride_kd,  # [B, H, Nk, D]
    v_ptr, stride_vb, stride_vh, stride_vn, stride_vd,  # [B, H, Nk, D]
    do_ptr, lse_ptr, delta_ptr,  # [B, H, Nq, D] (contiguous), [B, H, Nq] (contiguous) x2
    size_ptr, stride_sb, stride_sn,  # [B, Nk]
    heads, seq_q, seq_k, head_dim, k_blocks, scale,
    HAS_SIZE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    dims = tl.arange(0, BLOCK_D)
    mask_d = dims < head_dim
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    do_ptr += bh * seq_q * head_dim
    lse_ptr += bh * seq_q
    delta_ptr += bh * seq_q
    size_ptr += b * stride_sb
    if pid < k_blocks:  # dk, dv of one key tile
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < seq_k
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        bias = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
        if HAS_SIZE:
            bias = tl.log(tl.load(size_ptr + cols * stride_sn, mask=mask_n, other=1.0).to(ACC_DTYPE))
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
        for m0 in range(0, seq_q, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            mask_m = rows < seq_q
            q_mask = mask_m[:, None] & mask_d[None, :]
            q = tl.load(q_ptr + rows[:, None] * stride_qm + dims[None, :] * stride_qd, mask=q_mask, other=0.0)
            do = tl.load(do_ptr + rows[:, None] * head_dim + dims[None, :], mask=q_mask, other=0.0)
            lse = tl.load(lse_ptr + rows, mask=mask_m, other=0.0).to(ACC_DTYPE)
            delta = tl.load(delta_ptr + rows, mask=mask_m, other=0.0).to(ACC_DTYPE)
            p = _recompute_p(q, k, lse, bias, mask_m, mask_n, scale, HAS_SIZE, ACC_DTYPE, DOT_F32, PRECISION)
            dv = _dot(tl.trans(p.to(do.dtype)), do, dv, DOT_F32, PRECISION)
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE), DOT_F32, PRECISION)
            ds = p * (dp - delta[:, None])
            dk = _dot(tl.trans(ds.to(q.dtype)), q, dk, DOT_F32, PRECISION)
        out_rows = bh * seq_k + cols
        offs = out_rows[:, None] * head_dim + dims[None, :]
        tl.store(dk_ptr + offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)
    else:  # dq of one query tile
        rows = (pid - k_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rows < seq_q
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_ptr + rows[:, None] * stride_qm + dims[None, :] * stride_qd, mask=q_mask, other=0.0)
        do = tl.load(do_ptr + rows[:, None] * head_dim + dims[None, :], mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=mask_m, other=0.0).to(ACC_DTYPE)
        delta = tl.load(delta_ptr + rows, mask=mask_m, other=0.0).to(ACC_DTYPE)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
        for n0 in range(0, seq_k, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            mask_n = cols < seq_k
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_ptr + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
            bias = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
            if HAS_SIZE:
                bias = tl.log(tl.load(size_ptr + cols * stride_sn, mask=mask_n, other=1.0).to(ACC_DTYPE))
            p = _recompute_p(q, k, lse, bias, mask_m, mask_n, scale, HAS_SIZE, ACC_DTYPE, DOT_F32, PRECISION)
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE), DOT_F32, PRECISION)
            ds = p * (dp - delta[:, None])
            dq = _dot(ds.to(k.dtype), k, dq, DOT_F32, PRECISION)
        offs = (bh * seq_q + rows)[:, None] * head_dim + dims[None, :]
        tl.store(dq_ptr + offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


def _bwd_blocks(dtype: torch.dtype, block_d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the backward: its live set is ~3 fp32 tiles, smaller for wide heads."""
    if block_d >= 128 or dtype == torch.float32:
        return 32, 64, 4
    return 64, 64, 4


_PREPROCESS_BLOCK_M = 64
_HEAD_DIMS = (16, 32, 64, 128)  # BLOCK_D buckets


def _supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Where the kernels run; elsewhere the reference (see module docstring)."""
    return (q.shape[-1] <= MAX_HEAD_DIM and runs_kernels(q) and q.numel() > 0 and k.shape[2] > 0
            and (q.dtype in GPU_DTYPES or INTERPRET))


def _block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"  # (ignored for fp16/bf16)


def _flags(q: torch.Tensor, size) -> dict:
    return dict(HAS_SIZE=size is not None, ACC_DTYPE=acc_dtype(q.dtype), DOT_F32=dot_in_fp32(q.dtype),
                PRECISION=_precision(q.dtype), BLOCK_D=_block_d(q.shape[-1]))


def _size_args(size, q):
    return (q, 0, 0) if size is None else (size, *size.stride())


def attention(q, k, v, size, scale):
    if not _supported(q, k):
        return reference.attention(q, k, v, size, scale)
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty(batch, heads, seq_q, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    with device_guard(q):
        grid = lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
        _attn_fwd_kernel[grid](out, lse, q, *q.stride(), k, *k.stride(), v, *v.stride(), *_size_args(size, q),
                               heads, seq_q, seq_k, head_dim, scale, next_pow2(seq_k), **_flags(q, size))
    return out, lse


def attention_backward(grad_out, q, k, v, size, out, lse, scale):
    if not _supported(q, k):
        return reference.attention_backward(grad_out, q, k, v, size, out, lse, scale)
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    flags = _flags(q, size)
    delta = torch.empty(lse.shape, dtype=lse.dtype, device=q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=q.device)
    block_m, block_n, warps = _bwd_blocks(q.dtype, flags["BLOCK_D"])
    k_blocks = triton.cdiv(seq_k, block_n)
    with device_guard(q):
        rows = batch * heads * seq_q
        _attn_bwd_preprocess_kernel[(triton.cdiv(rows, _PREPROCESS_BLOCK_M),)](
            delta, out, grad_out, rows, head_dim, ACC_DTYPE=flags["ACC_DTYPE"], BLOCK_D=flags["BLOCK_D"],
            BLOCK_M=_PREPROCESS_BLOCK_M)
        _attn_bwd_kernel[(k_blocks + triton.cdiv(seq_q, block_m), batch * heads)](
            dq, dk, dv, q, *q.stride(), k, *k.stride(), v, *v.stride(), grad_out, lse, delta,
            *_size_args(size, q), heads, seq_q, seq_k, head_dim, k_blocks, scale, **flags,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return dq, dk, dv


def aot_specs() -> list[AotSpec]:
    specs = []
    qkv = ("q_ptr", "k_ptr", "v_ptr")
    for name, dtype in AOT_DTYPES.items():
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)
        for block_d in _HEAD_DIMS:
            for precision in precisions:
                common = {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "HAS_SIZE": True,
                          "ACC_DTYPE": tl.float32, "DOT_F32": False, "PRECISION": precision, "BLOCK_D": block_d}
                tag = f"{name} D={block_d}" + (f" {precision}" if dtype == torch.float32 else "")
                for i, config in enumerate(_FWD_CONFIGS):
                    specs.append(AotSpec(
                        _attn_fwd_kernel.fn, f"{tag} config{i} {config.kwargs}",
                        {"out_ptr": name, "lse_ptr": "fp32", "size_ptr": "fp32", **{p: name for p in qkv}},
                        {**common, **config.kwargs}, num_warps=config.num_warps, num_stages=config.num_stages,
                        floats=("scale",)))
                block_m, block_n, warps = _bwd_blocks(dtype, block_d)
                specs.append(AotSpec(
                    _attn_bwd_kernel, f"{tag} BLOCK_M={block_m} BLOCK_N={block_n}",
                    {"dq_ptr": name, "dk_ptr": name, "dv_ptr": name, "do_ptr": name, "lse_ptr": "fp32",
                     "delta_ptr": "fp32", "size_ptr": "fp32", **{p: name for p in qkv}},
                    {**common, "BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, floats=("scale",)))
            specs.append(AotSpec(
                _attn_bwd_preprocess_kernel, f"{name} D={block_d}",
                {"delta_ptr": "fp32", "out_ptr": name, "do_ptr": name},
                {"ACC_DTYPE": tl.float32, "BLOCK_D": block_d, "BLOCK_M": _PREPROCESS_BLOCK_M}))
    return specs
