"""Minimal reference kernels for the SASS report (``python -m tritonfp8.aot --sass-report``).

They are what the report sets each shipped kernel beside, compiled in the same run
the same way (the JIT's specialization, the same tiles and warps). They do not
follow numerics.md and are never called by the library:

* ``hw_cast``: a nearest cast through the hardware conversion (``.to(fp8)``, i.e.
  ``cvt.rn.satfinite`` on sm_90), its amax kept in registers and reduced once per tile.
* ``hw_block_cast``: a nearest cast with block scales (1 x B rows, B x B tiles, MX's
  1 x 32 E8M0 groups) through the hardware conversion: each group's max |x| (a B x B
  tile's from a first pass over it), its inverse scale and scale, one multiply per
  element; with a transposed copy, the other groups' (B x 1) scales from a first pass.
  The report's reference divides exactly, as numerics.md's scales are defined; the
  ``approx-div`` row (Triton's default division, as DeepSeek-V3's kernels divide) shows
  what that exactness costs.
* ``philox4_cast``: a stochastic cast that draws one Philox call per 4 elements and
  adds the random bits below the target's mantissa (normal range only).
* ``gemm_no_promotion``: the persistent TMA fp8 GEMM with plain fp32 tensor-core
  accumulation (no promotion every BLOCK_K) and tensor scales in the epilogue.
* ``attention_fwd_hw_p``: a flash-attention forward whose probabilities P are
  converted to E4M3 by the hardware conversion.

Each launcher takes tensors like the shipped op's launcher, so the report can run it
on ``meta`` tensors under :func:`tritonfp8.ops.spec.captured_launches`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tensor import Scaling
from .matmul import CONFIGS, TensorDescriptor, _tile_coords
from .quantize import NUM_WARPS, quantize_meta, quantize_tile
from .rounding import e8m0_from_amax

_FP8_TYPES = {"e4m3": tl.float8e4nv, "e5m2": tl.float8e5}
# Bits of an fp32 mantissa below the target's: the stochastic reference adds that many random bits.
_DROPPED_BITS = {"e4m3": 20, "e5m2": 21}


@triton.jit
def _hw_cast_kernel(x_ptr, out_ptr, out_t_ptr, inv_scale_ptr, amax_ptr, M, K, stride_xm, stride_xk,
                    FP8: tl.constexpr, TRANSPOSE: tl.constexpr,
                    TILE_M: tl.constexpr, TILE_K: tl.constexpr, CHUNK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * TILE_K + tl.arange(0, TILE_K)
    inv = tl.load(inv_scale_ptr)
    amax = tl.zeros([CHUNK_M, TILE_K], dtype=tl.float32)
    for c in range(0, TILE_M, CHUNK_M):
        offs_m = pid_m * TILE_M + c + tl.arange(0, CHUNK_M)
        mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
        x = x.to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
        y = (x * inv).to(FP8)
        tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], y, mask=mask)
        if TRANSPOSE:  # the same codes, stored as x^T [K, M]
            tl.store(out_t_ptr + offs_k[:, None] * M + offs_m[None, :], tl.trans(y), mask=tl.trans(mask))
    tl.atomic_max(amax_ptr, tl.max(tl.max(amax, axis=1), axis=0))


@triton.jit
def _block_scale(amax, FMAX: tl.constexpr, E8M0: tl.constexpr, EMAX: tl.constexpr, MAX_FRAC: tl.constexpr,
                 EXACT: tl.constexpr):
    """(inverse scale, stored scale) of groups with max |x| ``amax``: FMAX / amax and its
    reciprocal (EXACT: IEEE divisions, as numerics.md's scales; else Triton's default fp32
    division, an approximation: DeepSeek-V3's reference kernels), or MX's power of two and
    its E8M0 code."""
    if E8M0:
        inv, code = e8m0_from_amax(amax, EMAX, MAX_FRAC)
        stored = code.to(tl.uint8)
    elif EXACT:
        inv = tl.math.div_rn(tl.zeros_like(amax) + FMAX, amax)
        stored = tl.math.div_rn(tl.zeros_like(inv) + 1.0, inv)
    else:
        inv = FMAX / amax
        stored = amax / FMAX
    return inv, stored


@triton.jit
def _hw_block_cast_kernel(x_ptr, out_ptr, out_t_ptr, scale_ptr, scale_t_ptr, M, K, stride_xm, stride_xk,
                          stride_sm, stride_sk, stride_tsm, stride_tsk,
                          FP8: tl.constexpr, FMAX: tl.constexpr, E8M0: tl.constexpr, EMAX: tl.constexpr,
                          MAX_FRAC: tl.constexpr, EXACT: tl.constexpr, SQUARE: tl.constexpr, TRANSPOSE: tl.constexpr,
                          TILE_M: tl.constexpr, TILE_K: tl.constexpr, CHUNK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * TILE_K + tl.arange(0, TILE_K)
    if SQUARE or TRANSPOSE:  # groups spanning the tile's rows: a first pass for their max |x|
        ACC_DTYPE: tl.constexpr = x_ptr.dtype.element_ty if TILE_M > CHUNK_M else tl.float32  # as the shipped cast
        acc = tl.zeros([CHUNK_M, TILE_K], dtype=ACC_DTYPE)
        for c in range(0, TILE_M, CHUNK_M):
            offs_m = pid_m * TILE_M + c + tl.arange(0, CHUNK_M)
            mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
            acc = tl.maximum(acc, tl.abs(x.to(ACC_DTYPE))).to(ACC_DTYPE)
        col_amax = tl.max(acc.to(tl.float32), axis=0)
        if SQUARE:  # one group: the tile (the transposed copy holds the same codes)
            inv, scale = _block_scale(tl.max(col_amax, axis=0), FMAX, E8M0, EMAX, MAX_FRAC, EXACT)
            tl.store(scale_ptr + pid_m * stride_sm + pid_k * stride_sk, scale)
            if TRANSPOSE:
                tl.store(scale_t_ptr + pid_m * stride_tsm + pid_k * stride_tsk, scale)
        else:  # the transposed copy's groups: B x 1 on x
            inv_t, scale_t = _block_scale(col_amax, FMAX, E8M0, EMAX, MAX_FRAC, EXACT)
            tl.store(scale_t_ptr + pid_m * stride_tsm + offs_k * stride_tsk, scale_t, mask=offs_k < K)
    for c in range(0, TILE_M, CHUNK_M):
        offs_m = pid_m * TILE_M + c + tl.arange(0, CHUNK_M)
        mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
        x = x.to(tl.float32)
        if not SQUARE:  # 1 x B groups: one per row of the chunk
            inv, scale = _block_scale(tl.max(tl.abs(x), axis=1), FMAX, E8M0, EMAX, MAX_FRAC, EXACT)
            tl.store(scale_ptr + offs_m * stride_sm + pid_k * stride_sk, scale, mask=offs_m < M)
            inv = inv[:, None]
        y = (x * inv).to(FP8)
        tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], y, mask=mask)
        if TRANSPOSE:
            if not SQUARE:
                y = (x * inv_t[None, :]).to(FP8)
            tl.store(out_t_ptr + offs_k[:, None] * M + offs_m[None, :], tl.trans(y), mask=tl.trans(mask))


@triton.jit(do_not_specialize=["seed"])
def _philox4_cast_kernel(x_ptr, out_ptr, inv_scale_ptr, M, K, seed, stride_xm, stride_xk,
                         FP8: tl.constexpr, DROPPED: tl.constexpr,
                         TILE_M: tl.constexpr, TILE_K: tl.constexpr, CHUNK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    inv = tl.load(inv_scale_ptr)
    offs_q = pid_k * (TILE_K // 4) + tl.arange(0, TILE_K // 4)  # groups of 4 columns
    offs_k = pid_k * TILE_K + tl.arange(0, TILE_K)
    for c in range(0, TILE_M, CHUNK_M):
        offs_m = pid_m * TILE_M + c + tl.arange(0, CHUNK_M)
        r0, r1, r2, r3 = tl.randint4x(seed, offs_m.to(tl.int64)[:, None] * (K // 4) + offs_q[None, :])
        rand = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (CHUNK_M, TILE_K))
        mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
        bits = (x.to(tl.float32) * inv).to(tl.uint32, bitcast=True)
        bits = (bits + (rand >> (32 - DROPPED))) & (0xFFFFFFFF - ((1 << DROPPED) - 1))
        y = bits.to(tl.float32, bitcast=True).to(FP8)
        tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], y, mask=mask)


@triton.jit
def _gemm_no_promotion_kernel(a_desc, bt_desc, a_scale_ptr, b_scale_ptr, out_ptr, M, N, K, stride_om, stride_on,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr):
    scale = tl.load(a_scale_ptr) * tl.load(b_scale_ptr)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])
            b = bt_desc.load([pid_n * BLOCK_N, k0]).T
            acc = tl.dot(a, b, acc)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 (acc * scale).to(tl.bfloat16), mask=mask)


@triton.jit
def _attention_fwd_hw_p_kernel(q_ptr, k_ptr, vt_ptr, o_ptr, N, qk_scale_log2,
                               stride_qz, stride_qn, stride_kz, stride_kn, stride_vz, stride_vd,
                               stride_oz, stride_on,
                               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_nb = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + z * stride_qz + offs_m[:, None] * stride_qn + offs_d[None, :])
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + offs_nb
        kt = tl.load(k_ptr + z * stride_kz + offs_n[None, :] * stride_kn + offs_d[:, None])
        s = tl.dot(q, kt) * qk_scale_log2
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(vt_ptr + z * stride_vz + offs_n[:, None] + offs_d[None, :] * stride_vd)  # K-major B
        acc = tl.dot((p * 256.0).to(tl.float8e4nv), v, acc * alpha[:, None])
        m_i = m_new
    o = acc / (l_i[:, None] * 256.0)
    tl.store(o_ptr + z * stride_oz + offs_m[:, None] * stride_on + offs_d[None, :], o.to(tl.bfloat16))


def _cast_tiles(transpose: bool = False) -> tuple[int, int, int]:
    """The shipped cast kernel's tile for an unscaled / tensor-scaled cast (quantize_tile)."""
    return quantize_tile(Scaling.parse("tensor"), transpose)


def hw_cast(x: torch.Tensor, fmt: str = "e4m3", transpose: bool = False):
    """x [M, K] (fp32 / bf16 / fp16) -> fp8 codes [M, K] (and [K, M] with ``transpose``)
    through the hardware conversion."""
    m, k = x.shape
    tile_m, tile_k, chunk_m = _cast_tiles(transpose)
    dtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
    out = torch.empty((m, k), dtype=dtype, device=x.device)
    out_t = torch.empty((k, m) if transpose else (0, 0), dtype=dtype, device=x.device)
    inv = torch.ones((), dtype=torch.float32, device=x.device)
    amax = torch.zeros((), dtype=torch.float32, device=x.device)
    _hw_cast_kernel[(triton.cdiv(m, tile_m), triton.cdiv(k, tile_k))](
        x, out, out_t, inv, amax, m, k, x.stride(0), x.stride(1),
        FP8=_FP8_TYPES[fmt], TRANSPOSE=transpose, TILE_M=tile_m, TILE_K=tile_k, CHUNK_M=chunk_m,
        num_warps=NUM_WARPS,
    )
    return (out, out_t) if transpose else out


def hw_block_cast(x: torch.Tensor, scaling, fmt: str = "e4m3", transpose: bool = False, exact: bool = True):
    """x [M, K] -> fp8 codes [M, K] (and [K, M] with ``transpose``) with ``scaling``'s block
    scales ((1, B), (B, B) or "mx"), in the shipped cast kernel's tiles and chunks; ``exact``:
    the scales by IEEE division (numerics.md's), else by Triton's approximate one. A minimal
    kernel: an all-zero group gets an infinite inverse scale, NaN is not propagated."""
    from ..formats import get_format

    sc = Scaling.parse(scaling)
    if sc.kind not in ("block", "mx") or sc.block[1] == 1:
        raise ValueError(f"hw_block_cast takes (1, B), (B, B) or 'mx' blocks, not {scaling!r}")
    f = get_format(fmt)
    m, k = x.shape
    meta = quantize_meta(f, sc, "nearest", True, transpose, False, 0, False, m, k, hardware_nearest=True)
    square = meta["MODE"] == 6
    dtype = torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2
    scale_dtype = torch.uint8 if sc.is_mx else torch.float32
    out = torch.empty((m, k), dtype=dtype, device=x.device)
    out_t = torch.empty((k, m) if transpose else (0, 0), dtype=dtype, device=x.device)
    scale = torch.empty(sc.scale_shape(m, k), dtype=scale_dtype, device=x.device)
    scale_t = torch.empty(sc.transposed().scale_shape(m, k) if transpose else (1, 1), dtype=scale_dtype,
                          device=x.device)
    _hw_block_cast_kernel[(triton.cdiv(m, meta["TILE_M"]), triton.cdiv(k, meta["TILE_K"]))](
        x, out, out_t, scale, scale_t, m, k, x.stride(0), x.stride(1), scale.stride(0), scale.stride(1),
        scale_t.stride(0), scale_t.stride(1),
        FP8=_FP8_TYPES[fmt], FMAX=f.max, E8M0=sc.is_mx, EMAX=meta["EMAX"], MAX_FRAC=meta["MX_MAX_FRAC"],
        EXACT=exact, SQUARE=square, TRANSPOSE=transpose, TILE_M=meta["TILE_M"], TILE_K=meta["TILE_K"], CHUNK_M=meta["CHUNK_M"],
        num_warps=NUM_WARPS,
    )
    return (out, scale, out_t, scale_t) if transpose else (out, scale)


def philox4_cast(x: torch.Tensor, seed: int, fmt: str = "e4m3") -> torch.Tensor:
    """x [M, K] -> fp8 [M, K] rounded stochastically, one Philox call per 4 elements (K % 4 == 0)."""
    m, k = x.shape
    tile_m, tile_k, chunk_m = _cast_tiles()
    out = torch.empty((m, k), dtype=torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2, device=x.device)
    inv = torch.ones((), dtype=torch.float32, device=x.device)
    _philox4_cast_kernel[(triton.cdiv(m, tile_m), triton.cdiv(k, tile_k))](
        x, out, inv, m, k, seed, x.stride(0), x.stride(1),
        FP8=_FP8_TYPES[fmt], DROPPED=_DROPPED_BITS[fmt], TILE_M=tile_m, TILE_K=tile_k, CHUNK_M=chunk_m,
        num_warps=NUM_WARPS,
    )
    return out


def gemm_no_promotion(a: torch.Tensor, bt: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                      config=CONFIGS[0], sms: int = 132) -> torch.Tensor:
    """a [M, K] fp8 x bt [N, K] fp8 (b^T, K-major) -> bf16 [M, N], tensor scales [] each."""
    m, k = a.shape
    n = bt.shape[0]
    out = torch.empty((m, n), dtype=torch.bfloat16, device=a.device)
    a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [config.block_m, config.block_k])
    bt_desc = TensorDescriptor(bt, [n, k], [bt.stride(0), 1], [config.block_n, config.block_k])
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    _gemm_no_promotion_kernel[(min(tiles, sms),)](
        a_desc, bt_desc, a_scale, b_scale, out, m, n, k, out.stride(0), out.stride(1),
        **config.meta(), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def attention_fwd_hw_p(q8: torch.Tensor, k8: torch.Tensor, vt8: torch.Tensor, sm_scale: float,
                       block_m: int, block_n: int, num_warps: int, num_stages: int) -> torch.Tensor:
    """q8, k8 [B, H, N, D] E4M3 and vt8 [B, H, D, N] (V^T, contiguous: K-major for the P @ V
    product, as the shipped kernel reads it) -> o [B, H, N, D] bf16; N a multiple of both
    blocks, no mask."""
    b, h, n, d = q8.shape
    o = torch.empty((b, h, n, d), dtype=torch.bfloat16, device=q8.device)
    _attention_fwd_hw_p_kernel[(triton.cdiv(n, block_m), b * h)](
        q8, k8, vt8, o, n, sm_scale * 1.4426950408889634,
        q8.stride(1), q8.stride(2), k8.stride(1), k8.stride(2), vt8.stride(1), vt8.stride(2),
        o.stride(1), o.stride(2),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
    )
    return o
