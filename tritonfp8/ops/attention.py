"""FP8 flash attention, forward and backward (numerics.md sections 2 to 6).

``o = softmax(scale * q k^T (+ causal mask)) v`` for q [B, H, N_q, D], k and v
[B, H, N_k, D] (the layout of ``F.scaled_dot_product_attention``), with the two
forward products and three of the five backward products in fp8, the softmax
statistics in fp32 and no N_q x N_k matrix in memory.

Quantization points (the reference :func:`attention_fwd_reference` /
:func:`attention_bwd_reference` rounds at exactly the same points):

=====================  =============================================  ===========================
tensor                  format, scale                                  rounded by
=====================  =============================================  ===========================
q, k, v                 E4M3 nearest, one current scale per (b, h)     :func:`tf8.quantize` ("row" on
                        (amax / 448 of the [N, D] slice)               the [B*H, N*D] view)
P = exp(S - m) (fwd)    E4M3 nearest, fixed scale 2**-7 (P in [0, 2))  ``round_to_code`` in-kernel
dO                      E5M2 nearest, one current scale per (b, h)     :func:`tf8.quantize`
P (bwd, normalized)     E4M3 nearest, fixed scale 2**-8 (P in [0, 1])  ``round_to_code`` in-kernel
dS = P * (dP - delta)   bf16 nearest (no scale needed)                 RNE (``round_to_code`` in the
                                                                       interpreter, cvt.rn on GPUs)
=====================  =============================================  ===========================

Products (all accumulate in fp32; fp8 partial sums are promoted at least every
128 elements of K, numerics.md section 5):

=====================  ===================  ==========================================
product                 operands             why
=====================  ===================  ==========================================
S = q k^T               E4M3 x E4M3          forward and both backward kernels
O += P v                E4M3 x E4M3          forward
dP = dO v^T             E5M2 x E4M3          backward (errors are E5M2, as in the recipes)
dV += P^T dO            E4M3 x E5M2          backward
dQ += dS k, dK += dS^T q bf16 x bf16         dS has no a-priori range (it is a gradient times
                                             P, per row anywhere in fp32's range) and a
                                             scale would need its amax before the product,
                                             i.e. another pass or a tile-dependent block
                                             scale; bf16 keeps 8 bits and fp32's range with
                                             no scale. k and q enter as their E4M3 values,
                                             which bf16 holds exactly.
=====================  ===================  ==========================================

Softmax statistics, delta = rowsum(dO * O) and every accumulator are fp32.

Online softmax with an integer stabilizer. The kernel sees the keys block by
block, so the row max m it subtracts grows during the loop, and quantizing
``exp(s - m_running)`` would round differently from quantizing
``exp(s - m_final)``. Here, in base 2 (``s2 = log2(e) * scale * q.k``), every
score is split into ``floor(s2) + f`` with ``f`` in [0, 1), the stabilizer m is
the row max of ``floor(s2)`` (an integer) and ``p = exp2(f) * 2**(floor(s2) - m)``.
When m grows, the old terms are rescaled by an exact power of two, and
``p_running = p_final * 2**k`` bit for bit, so rounding ``p * 2**7`` to E4M3
gives the same codes (times 2**k) as the whole-matrix reference in E4M3's
normal range. Only values that are E4M3 subnormal at the final max
(``p < 2**-13``) can round differently; the difference is at most 2**-16 per
such P (``p_max`` is in [1, 2), so l >= 1).

Kernel design (FlashAttention-2):

* forward ``_attn_fwd_kernel``: one program per BLOCK_M queries of one (b, h),
  looping over key blocks (only up to the diagonal when causal); the P v
  product reads V through a transposed fp8 copy ([D, N_k]) so that both
  operands are K-major for Hopper's fp8 wgmma. Writes o and lse2 = m + log2(l)
  (base 2).
* backward: ``_attn_bwd_preprocess_kernel`` computes delta = rowsum(dO * O)
  (dO as its E5M2 values); ``_attn_bwd_dkdv_kernel`` owns BLOCK_N1 keys and
  loops over query blocks, recomputing P^T from lse2 (dV += P^T dO, dK +=
  dS^T q); ``_attn_bwd_dq_kernel`` owns BLOCK_M2 queries and loops over key
  blocks (dQ += dS k). dO is read both as is and through a transposed copy
  ([D, N_q]) so that every fp8 operand is K-major.
* every block loop is split into interior blocks (no masks) and the few masked
  ones (causal diagonal, partial last block); tiles per head dim in
  :data:`_GPU_CONFIGS` compile for sm_89 / sm_90 / sm_100 without spills.
* q, k, v, dO are quantized before the kernels by :func:`tf8.quantize`; sizes
  and strides are runtime values, only tiles, the head dim and the causal flag
  are constexpr.

Error bounds (derived, and checked element by element, in
tests/test_attention.py). With u = 2**-4 (E4M3), the exact softmax P, the
quantization errors e_x = |x_hat - x| <= u |x| + 2**-10 amax_head(x) / 448,
the largest score perturbation delta_i = max_j |S_hat_ij - S_ij| (+ fp32
rounding) and rho_i = exp(2 delta_i) - 1 (softmax is 2-Lipschitz in the sup
norm of its logits):

    |o_fp8 - o|_id <= sum_j [((u + t)(1 + rho_i) + rho_i) P_ij + 2**-17] |v_hat_jd|
                      + sum_j P_ij e_v,jd + (fp32 sums)

(t: fp32 rounding of l and the scaling; 2**-17: half an E4M3 subnormal step of
P). The gradient bounds compose the same way through dV = P^T dO (E5M2 dO),
dP = dO v^T, delta = rowsum(dO o), dS = P (dP - delta) rounded to bf16 and the
dS k / dS^T q products. Kernel and reference differ only by the order of fp32
sums, plus at most 2**-16 max|v| in o per P that is E4M3-subnormal at its row's
final max.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import backend as _backend
from .._autograd import refuse_double_backward
from ..formats import BF16, E4M3, E5M2, INPUT_DTYPES
from .quantize import hardware_nearest, quantize
from .rounding import codes_to_tensor, round_to_code, round_to_code_reference
from .spec import GPU_TARGETS, KernelSpec

__all__ = [
    "attention", "attention_reference", "attention_fwd_reference", "attention_bwd_reference",
    "quantize_operands", "quantize_heads", "HEAD_DIMS", "aot_specs",
]

HEAD_DIMS = (16, 32, 64, 128)
LOG2E = math.log2(math.e)
# Fixed scales of the in-kernel P quantization: the forward P (stabilized by the
# integer row max) lies in [0, 2), the backward P (normalized) in [0, 1].
P_SCALE_FWD = 2.0**7
P_SCALE_BWD = 2.0**8

_P_SCALE_FWD = tl.constexpr(P_SCALE_FWD)
_P_SCALE_BWD = tl.constexpr(P_SCALE_BWD)
# round_to_code's format arguments as literals (the interpreter passes module-level
# constexpr objects through unwrapped): E4M3 nearest saturating, bf16 nearest IEEE.
assert (E4M3.exp_bits, E4M3.man_bits, E4M3.max_code, E4M3.inf_code, E4M3.nan_code) == (4, 3, 0x7E, 0x7F, 0x7F)
assert (BF16.exp_bits, BF16.man_bits, BF16.max_code, BF16.inf_code, BF16.nan_code) == (8, 7, 0x7F7F, 0x7F80, 0x7FC0)
# Masked scores become this exponent: far below 2**-126, so their p is exactly 0.
_NEG_BIG = tl.constexpr(-1.0e30)

# ----------------------------------------------------------------------------
# Triton device functions
# ----------------------------------------------------------------------------


@triton.jit
def _exp2_int(e):
    """2**e for integer-valued fp32 e <= 0, built from the exponent bits (exact); 0 below 2**-126."""
    ok = e >= -126.0
    ei = tl.where(ok, e, 0.0).to(tl.int32)
    return tl.where(ok, ((ei + 127) << 23).to(tl.float32, bitcast=True), 0.0)


@triton.jit
def _to_e4m3(x, HW: tl.constexpr):
    """fp32 x (a scaled probability: finite, in [0, P_SCALE] with P_SCALE <= 256) -> E4M3,
    rounded to nearest even, as an fp8 tensor for tl.dot.

    HW (compiled sm_90+, where :func:`tritonfp8.ops.quantize.hardware_nearest` holds)
    uses the hardware conversion. It equals round_to_code on this range: x is finite,
    non-negative and below E4M3's max (448), so ``cvt.rn.satfinite`` neither saturates
    nor meets Inf / NaN, and both round the fp32 value once to nearest even, subnormals
    included (the conversion's other differences, numerics.md 3, need inputs out of range).
    """
    if HW:
        return x.to(tl.float8e4nv)
    else:
        code, _ = round_to_code(x, 0, 4, 3, 0x7E, 0x7F, 0x7F, False, True)
        return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _to_bf16(x, INTERPRET: tl.constexpr):
    """fp32 -> bf16, round to nearest even (IEEE: overflow gives inf).

    Triton 3.6's interpreter truncates fp32 -> bf16, so it rounds with
    round_to_code on the bits; compiled code uses cvt.rn, the same rounding.
    """
    if INTERPRET:
        code, _ = round_to_code(x, 0, 8, 7, 0x7F7F, 0x7F80, 0x7FC0, False, False)
        return code.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def _dot_bf16(a, b8, acc, INTERPRET: tl.constexpr):
    """acc + a @ b8 for bf16 a and fp8 b8 as a bf16 x bf16 product with fp32 accumulation.

    b8's values are exact in bf16; the conversion goes through fp32 (Triton 3.6 emits an
    sm_90-only cvt.bf16.f16 for a direct fp8 -> bf16 conversion on sm_89). The
    interpreter multiplies bf16 bit patterns as integers, so it takes the same products
    (bf16 x bf16 is exact in fp32) from an fp32 dot.
    """
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b8.to(tl.float32), acc)
    else:
        return tl.dot(a, b8.to(tl.float32).to(tl.bfloat16), acc)


@triton.jit
def _store(ptrs, x, mask, INTERPRET: tl.constexpr):
    """Store fp32 x in the pointee dtype, rounding to nearest even."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        tl.store(ptrs, _to_bf16(x, INTERPRET), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _load(ptrs, row_ok, col_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a 2-D tile, masking (with 0) only the dims asked for: interior tiles load unmasked."""
    if MASK_ROWS and MASK_COLS:
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif MASK_ROWS:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif MASK_COLS:
        x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------
#
# Every loop over blocks is split into interior blocks (no masks at all) and the few
# blocks that need one (the causal diagonal, the partial block at the end): MASK and
# CAUSAL are constexpr arguments of the loop bodies. PAD_D masks the head dim when
# D < BLOCK_D (D = 16 runs in 32-wide tiles: fp8 dots contract over >= 32 elements).


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, k_base, v_base, mask_base, qk_scale, offs_m, offs_d, in_d, start, end, N_Q, N_K,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, PAD_D: tl.constexpr,
    HAS_MASK: tl.constexpr, HW_P: tl.constexpr,
):
    """Online softmax over the key blocks [start, end) for one query block."""
    offs_nb = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_nb
        in_n = offs_n < N_K
        kt = _load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, in_d, in_n, PAD_D, MASK)
        s2 = tl.dot(q, kt, max_num_imprecise_acc=BLOCK_D) * qk_scale
        if MASK:
            valid = in_n[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            if HAS_MASK:
                s2, valid = _add_mask(s2, valid, mask_base, offs_m, offs_n, N_Q, N_K, stride_mq, stride_mk)
            fl = tl.floor(s2)
            e = tl.where(valid, fl, _NEG_BIG)
        else:
            fl = tl.floor(s2)
            e = fl
        m_new = tl.maximum(m_i, tl.max(e, axis=1))
        alpha = _exp2_int(m_i - m_new)
        # p = exp2(s2 - m) computed as exp2(fraction) * (exact power of two); masked: 0
        p = tl.exp2(s2 - fl) * _exp2_int(e - m_new[:, None])
        if HAS_MASK:  # a row masked so far has m_new = _NEG_BIG: its masked p must still be 0
            p = tl.where(valid, p, 0.0)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, in_n, in_d, MASK, PAD_D)
        acc = tl.dot(_to_e4m3(p * _P_SCALE_FWD, HW_P), v, acc * alpha[:, None], max_num_imprecise_acc=BLOCK_N)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _add_mask(s2, valid, mask_base, offs_m, offs_n, N_Q, N_K, stride_mq, stride_mk):
    """Scores plus the attention mask (log2 units, fp32; -inf: masked) of a [queries, keys] tile,
    and the validity with masked entries off. Masked scores become 0 so that nothing is NaN."""
    b2 = tl.load(mask_base + offs_m[:, None] * stride_mq + offs_n[None, :] * stride_mk,
                 mask=(offs_m < N_Q)[:, None] & (offs_n < N_K)[None, :], other=float("-inf"))
    valid = valid & (b2 != float("-inf"))
    return tl.where(valid, s2 + b2, 0.0), valid


@triton.jit
def _mask_base(mask_ptr, z, H, stride_mb, stride_mh):
    """The mask's [N_Q, N_K] slice of (b, h) = divmod(z, H) (broadcast dims have stride 0)."""
    return mask_ptr + (z // H) * stride_mb + (z % H) * stride_mh


@triton.jit
def _attn_fwd_kernel(
    # pointers
    q_ptr, k_ptr, vt_ptr, scale_ptr, o_ptr, lse_ptr, mask_ptr,
    # sizes
    BH, H, N_Q, N_K, sm_scale_log2,
    # strides (z = b * H + h; vt is V read as [N_K, D] through V^T's strides)
    stride_qz, stride_qn, stride_qd, stride_kz, stride_kn, stride_kd,
    stride_vz, stride_vn, stride_vd, stride_oz, stride_on, stride_od,
    stride_mb, stride_mh, stride_mq, stride_mk,
    # meta
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, INTERPRET: tl.constexpr, HW_P: tl.constexpr,
):
    """o [BLOCK_M, D] and lse2 [BLOCK_M] (base 2) of one query block of one (b, h).

    ``scale_ptr`` holds the dequantization scales [3, BH] of q, k and v. With HAS_MASK,
    ``mask_ptr`` is the additive mask in log2 units ([B, H, N_Q, N_K] through its strides)
    and every key block takes the masked path.
    """
    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
    pid_m = tl.program_id(0)
    pid_z = tl.program_id(1)
    z = pid_z.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < HEAD_DIM
    in_m = offs_m < N_Q
    q = _load(q_ptr + z * stride_qz + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, in_m, in_d, True, PAD_D)
    k_base = k_ptr + z * stride_kz
    v_base = vt_ptr + z * stride_vz
    qk_scale = tl.load(scale_ptr + pid_z) * tl.load(scale_ptr + BH + pid_z) * sm_scale_log2
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)  # integer stabilizer: row max of floor(s2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mask_base = mask_ptr  # None without a mask (a constexpr: the unmasked kernels do not take it)
    if HAS_MASK:
        mask_base = _mask_base(mask_ptr, z, H, stride_mb, stride_mh)
    if CAUSAL:  # keys before the diagonal blocks need no mask (N_Q == N_K)
        split = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
        end = tl.minimum(N_K, (pid_m + 1) * BLOCK_M)
    elif HAS_MASK:  # every block is masked
        split = 0
        end = N_K
    else:  # full key blocks, then at most one partial block
        split = N_K // BLOCK_N * BLOCK_N
        end = N_K
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, mask_base, qk_scale, offs_m, offs_d, in_d, 0,
                                split, N_Q, N_K, stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
                                BLOCK_N, BLOCK_D, False, False, PAD_D, False, HW_P)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, mask_base, qk_scale, offs_m, offs_d, in_d, split,
                                end, N_Q, N_K, stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
                                BLOCK_N, BLOCK_D, True, CAUSAL, PAD_D, HAS_MASK, HW_P)
    out_scale = tl.load(scale_ptr + 2 * BH + pid_z) * (1.0 / _P_SCALE_FWD)
    if HAS_MASK:  # a fully masked row has l = 0: its output is 0, as torch's
        l_i = tl.where(l_i == 0.0, float("inf"), l_i)
    o = tl.math.div_rn(acc * out_scale, l_i[:, None])
    _store(o_ptr + z * stride_oz + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, o,
           in_m[:, None] & in_d[None, :], INTERPRET)
    tl.store(lse_ptr + z * N_Q + offs_m, m_i + tl.log2(l_i), mask=in_m)


@triton.jit
def _attn_bwd_preprocess_kernel(
    # pointers
    o_ptr, do_ptr, scale_ptr, delta_ptr,
    # sizes
    N_Q,
    # strides
    stride_oz, stride_on, stride_od, stride_dz, stride_dn, stride_dd,
    # meta
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta [BLOCK_M] = rowsum(dO * O), dO as its E5M2 values times its scale."""
    pid_m = tl.program_id(0)
    pid_z = tl.program_id(1)
    z = pid_z.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(o_ptr + z * stride_oz + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + z * stride_dz + offs_m[:, None] * stride_dn + offs_d[None, :] * stride_dd,
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1) * tl.load(scale_ptr + pid_z)
    tl.store(delta_ptr + z * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, q_base, do_base, dot_base, lse_base, delta_base, mask_base, qk_scale, dp_scale,
    offs_n, offs_d, in_d, start, end, N_Q, N_K,
    stride_qn, stride_qd, stride_dn, stride_dd, stride_tn, stride_td, stride_mq, stride_mk,
    BLOCK_M1: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
    PAD_D: tl.constexpr, HAS_MASK: tl.constexpr, INTERPRET: tl.constexpr, HW_P: tl.constexpr,
):
    """Accumulate dK and dV of one key block over the query blocks [start, end)."""
    offs_mb = tl.arange(0, BLOCK_M1)
    for start_m in range(start, end, BLOCK_M1):
        offs_m = start_m + offs_mb
        in_m = offs_m < N_Q
        qt = _load(q_base + offs_m[None, :] * stride_qn + offs_d[:, None] * stride_qd, in_d, in_m, PAD_D, MASK)
        if MASK:
            lse = tl.load(lse_base + offs_m, mask=in_m, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=in_m, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s2t = tl.dot(k, qt, max_num_imprecise_acc=BLOCK_D) * qk_scale
        if HAS_MASK:  # the mask tile read transposed: [keys, queries]
            s2t, attends = _add_mask(s2t, in_m[None, :], mask_base, offs_n, offs_m, N_K, N_Q, stride_mk, stride_mq)
        pt = tl.exp2(s2t - lse[None, :])
        if MASK:
            valid = in_m[None, :]
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            if HAS_MASK:
                valid = valid & attends
            pt = tl.where(valid, pt, 0.0)
        # dV += P^T dO: P^T in E4M3 with the fixed scale, dO E5M2 read through its transposed copy
        do_k = _load(dot_base + offs_m[:, None] * stride_tn + offs_d[None, :] * stride_td, in_m, in_d, MASK, PAD_D)
        dv = tl.dot(_to_e4m3(pt * _P_SCALE_BWD, HW_P), do_k, dv, max_num_imprecise_acc=BLOCK_M1)
        # dP^T = V dO^T (fp8), dS^T = P^T (dP^T - delta) (fp32), dK += dS^T q (bf16)
        dot = _load(do_base + offs_m[None, :] * stride_dn + offs_d[:, None] * stride_dd, in_d, in_m, PAD_D, MASK)
        dst = pt * (tl.dot(v, dot, max_num_imprecise_acc=BLOCK_D) * dp_scale - delta[None, :])
        dk = _dot_bf16(_to_bf16(dst, INTERPRET), tl.trans(qt), dk, INTERPRET)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, do_ptr, dot_ptr, scale_ptr, do_scale_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, mask_ptr,
    # sizes
    BH, H, N_Q, N_K, sm_scale_log2, sm_scale,
    # strides (dot is dO read as [N_Q, D] through dO^T's strides)
    stride_qz, stride_qn, stride_qd, stride_kz, stride_kn, stride_kd, stride_vz, stride_vn, stride_vd,
    stride_dz, stride_dn, stride_dd, stride_tz, stride_tn, stride_td,
    stride_dkz, stride_dkn, stride_dkd, stride_dvz, stride_dvn, stride_dvd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    # meta
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, INTERPRET: tl.constexpr, HW_P: tl.constexpr,
):
    """dK and dV of BLOCK_N1 keys of one (b, h), looping over query blocks."""
    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
    pid_n = tl.program_id(0)
    pid_z = tl.program_id(1)
    z = pid_z.to(tl.int64)
    offs_n = pid_n * BLOCK_N1 + tl.arange(0, BLOCK_N1)
    offs_d = tl.arange(0, BLOCK_D)
    in_n = offs_n < N_K
    in_d = offs_d < HEAD_DIM
    k = _load(k_ptr + z * stride_kz + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, in_n, in_d, True, PAD_D)
    v = _load(v_ptr + z * stride_vz + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, in_n, in_d, True, PAD_D)
    q_scale = tl.load(scale_ptr + pid_z)
    qk_scale = q_scale * tl.load(scale_ptr + BH + pid_z) * sm_scale_log2
    do_scale = tl.load(do_scale_ptr + pid_z)
    dp_scale = do_scale * tl.load(scale_ptr + 2 * BH + pid_z)
    q_base = q_ptr + z * stride_qz
    do_base = do_ptr + z * stride_dz
    dot_base = dot_ptr + z * stride_tz
    lse_base = lse_ptr + z * N_Q
    delta_base = delta_ptr + z * N_Q
    mask_base = mask_ptr  # None without a mask (a constexpr: the unmasked kernels do not take it)
    if HAS_MASK:
        mask_base = _mask_base(mask_ptr, z, H, stride_mb, stride_mh)
    dk = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
    if HAS_MASK:  # with a mask every block is masked
        full = 0
    else:
        full = N_Q // BLOCK_M1 * BLOCK_M1
    if CAUSAL:  # query blocks on the diagonal are masked; later ones see every key of this block
        lo = (pid_n * BLOCK_N1) // BLOCK_M1 * BLOCK_M1
        split = tl.cdiv((pid_n + 1) * BLOCK_N1, BLOCK_M1) * BLOCK_M1
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, dot_base, lse_base, delta_base, mask_base, qk_scale,
                              dp_scale, offs_n, offs_d, in_d, lo, tl.minimum(split, N_Q), N_Q, N_K,
                              stride_qn, stride_qd, stride_dn, stride_dd, stride_tn, stride_td, stride_mq, stride_mk,
                              BLOCK_M1, BLOCK_D, True, True, PAD_D, False, INTERPRET, HW_P)
    else:
        split = 0
    dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, dot_base, lse_base, delta_base, mask_base, qk_scale,
                          dp_scale, offs_n, offs_d, in_d, split, full, N_Q, N_K,
                          stride_qn, stride_qd, stride_dn, stride_dd, stride_tn, stride_td, stride_mq, stride_mk,
                          BLOCK_M1, BLOCK_D, False, False, PAD_D, False, INTERPRET, HW_P)
    dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, dot_base, lse_base, delta_base, mask_base, qk_scale,
                          dp_scale, offs_n, offs_d, in_d, tl.maximum(split, full), N_Q, N_Q, N_K,
                          stride_qn, stride_qd, stride_dn, stride_dd, stride_tn, stride_td, stride_mq, stride_mk,
                          BLOCK_M1, BLOCK_D, True, False, PAD_D, HAS_MASK, INTERPRET, HW_P)
    dv = dv * (do_scale * (1.0 / _P_SCALE_BWD))
    dk = dk * (q_scale * sm_scale)
    mask = in_n[:, None] & in_d[None, :]
    _store(dv_ptr + z * stride_dvz + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd, dv, mask, INTERPRET)
    _store(dk_ptr + z * stride_dkz + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk, mask, INTERPRET)


@triton.jit
def _dq_blocks(
    dq, q, do, lse, delta, k_base, v_base, mask_base, qk_scale, dp_scale, offs_m, offs_d, in_d, start, end, N_Q, N_K,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
    BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
    PAD_D: tl.constexpr, HAS_MASK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Accumulate dQ of one query block over the key blocks [start, end)."""
    offs_nb = tl.arange(0, BLOCK_N2)
    for start_n in range(start, end, BLOCK_N2):
        offs_n = start_n + offs_nb
        in_n = offs_n < N_K
        kt = _load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd, in_d, in_n, PAD_D, MASK)
        vt = _load(v_base + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd, in_d, in_n, PAD_D, MASK)
        s2 = tl.dot(q, kt, max_num_imprecise_acc=BLOCK_D) * qk_scale
        if HAS_MASK:
            s2, attends = _add_mask(s2, in_n[None, :], mask_base, offs_m, offs_n, N_Q, N_K, stride_mq, stride_mk)
        p = tl.exp2(s2 - lse[:, None])
        if MASK:
            valid = in_n[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            if HAS_MASK:
                valid = valid & attends
            p = tl.where(valid, p, 0.0)
        ds = p * (tl.dot(do, vt, max_num_imprecise_acc=BLOCK_D) * dp_scale - delta[:, None])
        dq = _dot_bf16(_to_bf16(ds, INTERPRET), tl.trans(kt), dq, INTERPRET)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, do_ptr, scale_ptr, do_scale_ptr, lse_ptr, delta_ptr, dq_ptr, mask_ptr,
    # sizes
    BH, H, N_Q, N_K, sm_scale_log2, sm_scale,
    # strides
    stride_qz, stride_qn, stride_qd, stride_kz, stride_kn, stride_kd, stride_vz, stride_vn, stride_vd,
    stride_dz, stride_dn, stride_dd, stride_dqz, stride_dqn, stride_dqd,
    stride_mb, stride_mh, stride_mq, stride_mk,
    # meta
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, INTERPRET: tl.constexpr,
):
    """dQ of BLOCK_M2 queries of one (b, h), looping over key blocks."""
    PAD_D: tl.constexpr = HEAD_DIM != BLOCK_D
    pid_m = tl.program_id(0)
    pid_z = tl.program_id(1)
    z = pid_z.to(tl.int64)
    offs_m = pid_m * BLOCK_M2 + tl.arange(0, BLOCK_M2)
    offs_d = tl.arange(0, BLOCK_D)
    in_m = offs_m < N_Q
    in_d = offs_d < HEAD_DIM
    q = _load(q_ptr + z * stride_qz + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, in_m, in_d, True, PAD_D)
    do = _load(do_ptr + z * stride_dz + offs_m[:, None] * stride_dn + offs_d[None, :] * stride_dd, in_m, in_d, True, PAD_D)
    lse = tl.load(lse_ptr + z * N_Q + offs_m, mask=in_m, other=0.0)
    delta = tl.load(delta_ptr + z * N_Q + offs_m, mask=in_m, other=0.0)
    k_scale = tl.load(scale_ptr + BH + pid_z)
    qk_scale = tl.load(scale_ptr + pid_z) * k_scale * sm_scale_log2
    dp_scale = tl.load(do_scale_ptr + pid_z) * tl.load(scale_ptr + 2 * BH + pid_z)
    k_base = k_ptr + z * stride_kz
    v_base = v_ptr + z * stride_vz
    mask_base = mask_ptr  # None without a mask (a constexpr: the unmasked kernels do not take it)
    if HAS_MASK:
        mask_base = _mask_base(mask_ptr, z, H, stride_mb, stride_mh)
    dq = tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        split = (pid_m * BLOCK_M2) // BLOCK_N2 * BLOCK_N2
        end = tl.minimum(N_K, (pid_m + 1) * BLOCK_M2)
    elif HAS_MASK:
        split = 0
        end = N_K
    else:
        split = N_K // BLOCK_N2 * BLOCK_N2
        end = N_K
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, mask_base, qk_scale, dp_scale, offs_m, offs_d, in_d, 0,
                    split, N_Q, N_K, stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
                    BLOCK_N2, BLOCK_D, False, False, PAD_D, False, INTERPRET)
    dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, mask_base, qk_scale, dp_scale, offs_m, offs_d, in_d, split,
                    end, N_Q, N_K, stride_kn, stride_kd, stride_vn, stride_vd, stride_mq, stride_mk,
                    BLOCK_N2, BLOCK_D, True, CAUSAL, PAD_D, HAS_MASK, INTERPRET)
    dq = dq * (k_scale * sm_scale)
    _store(dq_ptr + z * stride_dqz + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd, dq,
           in_m[:, None] & in_d[None, :], INTERPRET)


# ----------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelTiles:
    """Tile (rows x columns of the score tile a program owns), warps and pipeline stages of one kernel."""

    rows: int
    cols: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AttnConfig:
    """Forward: BLOCK_M queries x BLOCK_N keys; dK/dV: BLOCK_N1 keys x BLOCK_M1 queries;
    dQ: BLOCK_M2 queries x BLOCK_N2 keys."""

    fwd: KernelTiles
    dkdv: KernelTiles
    dq: KernelTiles


# Compiled: every entry compiles for sm_89 / sm_90 / sm_100 without spilling registers
# (aot_specs; the score tile and its E4M3 rounding are what fill the registers).
_GPU_CONFIGS = {
    64: AttnConfig(fwd=KernelTiles(128, 64, 8, 3), dkdv=KernelTiles(64, 32, 4, 2), dq=KernelTiles(64, 64, 4, 2)),
    128: AttnConfig(fwd=KernelTiles(128, 32, 8, 3), dkdv=KernelTiles(64, 32, 8, 2), dq=KernelTiles(64, 64, 8, 2)),
}
# Interpreted: small tiles with unequal sides, so that short test sequences cross several
# blocks (online rescaling, causal diagonal blocks of both shapes, partial blocks).
# fp8 dots still contract over at least 32 elements (the GPU minimum).
_INTERPRET_CONFIG = AttnConfig(fwd=KernelTiles(16, 32, 4, 1), dkdv=KernelTiles(16, 32, 4, 1), dq=KernelTiles(32, 16, 4, 1))
PREPROCESS_BLOCK_M = 32


def block_d(head_dim: int) -> int:
    """The padded head dim of the tiles: fp8 dots contract over at least 32 elements."""
    return max(32, triton.next_power_of_2(head_dim))


def pick_config(head_dim: int) -> AttnConfig:
    """The tiles for head dim ``head_dim`` (padded to 32 / 64 / 128)."""
    if _backend.triton_interprets():
        return _INTERPRET_CONFIG
    return _GPU_CONFIGS[max(64, block_d(head_dim))]


# ----------------------------------------------------------------------------
# Quantization of the operands (shared by both backends)
# ----------------------------------------------------------------------------


def quantize_heads(x: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, N, D] -> (fp8 data [B, H, N, D] contiguous, dequantization scales [B*H] fp32):
    one current scale per (b, h) slice, i.e. 'row' scaling of the [B*H, N*D] view."""
    b, h, n, d = x.shape
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=fmt.torch_dtype, device=x.device), torch.ones(b * h, device=x.device)
    q = quantize(x.reshape(b * h, n * d), fmt, "nearest", "row")
    return q.data.reshape(b, h, n, d), q.scale.reshape(b * h)


def quantize_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """E4M3 copies of q, k, v with per-(b, h) scales: (q8, k8, v8, scales [3, B*H] fp32)."""
    q8, qs = quantize_heads(q, E4M3)
    k8, ks = quantize_heads(k, E4M3)
    v8, vs = quantize_heads(v, E4M3)
    return q8, k8, v8, torch.stack([qs, ks, vs])


def _transposed_copy(x8: torch.Tensor) -> torch.Tensor:
    """fp8 [B, H, N, D] -> the same values as a [B, H, N, D] view of a [B, H, D, N_pad] buffer
    (bytes copied, no rounding): the K-major layout of V (and dO) for the products that
    contract over N. N is padded to a multiple of 16 so that every stride stays 16-aligned."""
    b, h, n, d = x8.shape
    buf = torch.empty((b, h, d, -(-n // 16) * 16), dtype=torch.uint8, device=x8.device)
    buf[..., :n].copy_(x8.view(torch.uint8).transpose(-1, -2))
    return buf[..., :n].transpose(-1, -2).view(x8.dtype)


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------


# The launchers address (b, h) slices as z = b * H + h with one stride, stride(1): every
# tensor they pass is contiguous in (B, H) (quantize's outputs, the copies, new outputs).


def _mask_args(mask2: Optional[torch.Tensor]) -> dict:
    """Kernel arguments of the log2 mask [B, H, N_q, N_k] (a broadcast view), or a placeholder."""
    if mask2 is None:  # None arguments are constexprs: the unmasked kernels do not even take them
        return dict(mask_ptr=None, H=None, stride_mb=None, stride_mh=None, stride_mq=None, stride_mk=None,
                    HAS_MASK=False)
    sb, sh, sq, sk = mask2.stride()
    return dict(mask_ptr=mask2, H=mask2.shape[1], stride_mb=sb, stride_mh=sh, stride_mq=sq, stride_mk=sk,
                HAS_MASK=True)


def _attention_fwd_triton(q8, k8, v8, scales, causal, sm_scale, out_dtype, mask2=None):
    b, h, n_q, d = q8.shape
    n_k = k8.shape[2]
    cfg = pick_config(d)
    bd = block_d(d)
    vt = _transposed_copy(v8)
    o = torch.empty((b, h, n_q, d), dtype=out_dtype, device=q8.device)
    lse = torch.empty((b, h, n_q), dtype=torch.float32, device=q8.device)
    t = cfg.fwd
    grid = (triton.cdiv(n_q, t.rows), b * h)
    _attn_fwd_kernel[grid](
        q_ptr=q8, k_ptr=k8, vt_ptr=vt, scale_ptr=scales, o_ptr=o, lse_ptr=lse,
        BH=b * h, N_Q=n_q, N_K=n_k, sm_scale_log2=sm_scale * LOG2E,
        stride_qz=q8.stride(1), stride_qn=q8.stride(2), stride_qd=q8.stride(3),
        stride_kz=k8.stride(1), stride_kn=k8.stride(2), stride_kd=k8.stride(3),
        stride_vz=vt.stride(1), stride_vn=vt.stride(2), stride_vd=vt.stride(3),
        stride_oz=o.stride(1), stride_on=o.stride(2), stride_od=o.stride(3),
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=t.rows, BLOCK_N=t.cols, CAUSAL=causal,
        INTERPRET=_backend.triton_interprets(), HW_P=hardware_nearest(q8.device),
        num_warps=t.num_warps, num_stages=t.num_stages,
        **_mask_args(mask2),
    )
    return o, lse


def _attention_bwd_triton(do, o, lse, q8, k8, v8, scales, causal, sm_scale, mask2=None):
    b, h, n_q, d = q8.shape
    n_k = k8.shape[2]
    bh = b * h
    cfg = pick_config(d)
    bd = block_d(d)
    interpret = _backend.triton_interprets()
    o, lse = o.contiguous(), lse.contiguous()
    do8, do_scale = quantize_heads(do, E5M2)
    do8t = _transposed_copy(do8)
    delta = torch.empty((b, h, n_q), dtype=torch.float32, device=q8.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(n_q, PREPROCESS_BLOCK_M), bh)](
        o_ptr=o, do_ptr=do8, scale_ptr=do_scale, delta_ptr=delta, N_Q=n_q,
        stride_oz=o.stride(1), stride_on=o.stride(2), stride_od=o.stride(3),
        stride_dz=do8.stride(1), stride_dn=do8.stride(2), stride_dd=do8.stride(3),
        HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=PREPROCESS_BLOCK_M, num_warps=4,
    )
    dq = torch.empty((b, h, n_q, d), dtype=o.dtype, device=q8.device)
    dk = torch.empty((b, h, n_k, d), dtype=o.dtype, device=q8.device)
    dv = torch.empty((b, h, n_k, d), dtype=o.dtype, device=q8.device)
    common = dict(BH=bh, N_Q=n_q, N_K=n_k, sm_scale_log2=sm_scale * LOG2E, sm_scale=sm_scale,
                  stride_qz=q8.stride(1), stride_qn=q8.stride(2), stride_qd=q8.stride(3),
                  stride_kz=k8.stride(1), stride_kn=k8.stride(2), stride_kd=k8.stride(3),
                  stride_vz=v8.stride(1), stride_vn=v8.stride(2), stride_vd=v8.stride(3),
                  stride_dz=do8.stride(1), stride_dn=do8.stride(2), stride_dd=do8.stride(3),
                  HEAD_DIM=d, BLOCK_D=bd, CAUSAL=causal, INTERPRET=interpret, **_mask_args(mask2))
    _attn_bwd_dkdv_kernel[(triton.cdiv(n_k, cfg.dkdv.rows), bh)](
        q_ptr=q8, k_ptr=k8, v_ptr=v8, do_ptr=do8, dot_ptr=do8t, scale_ptr=scales, do_scale_ptr=do_scale,
        lse_ptr=lse, delta_ptr=delta, dk_ptr=dk, dv_ptr=dv,
        stride_tz=do8t.stride(1), stride_tn=do8t.stride(2), stride_td=do8t.stride(3),
        stride_dkz=dk.stride(1), stride_dkn=dk.stride(2), stride_dkd=dk.stride(3),
        stride_dvz=dv.stride(1), stride_dvn=dv.stride(2), stride_dvd=dv.stride(3),
        BLOCK_N1=cfg.dkdv.rows, BLOCK_M1=cfg.dkdv.cols, HW_P=hardware_nearest(q8.device), num_warps=cfg.dkdv.num_warps,
        num_stages=cfg.dkdv.num_stages, **common,
    )
    _attn_bwd_dq_kernel[(triton.cdiv(n_q, cfg.dq.rows), bh)](
        q_ptr=q8, k_ptr=k8, v_ptr=v8, do_ptr=do8, scale_ptr=scales, do_scale_ptr=do_scale,
        lse_ptr=lse, delta_ptr=delta, dq_ptr=dq,
        stride_dqz=dq.stride(1), stride_dqn=dq.stride(2), stride_dqd=dq.stride(3),
        BLOCK_M2=cfg.dq.rows, BLOCK_N2=cfg.dq.cols, num_warps=cfg.dq.num_warps,
        num_stages=cfg.dq.num_stages, **common,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------


def _e4m3_values(x: torch.Tensor) -> torch.Tensor:
    """fp32 x (already in E4M3's range) rounded to E4M3 by round_to_code_reference, as fp32 values."""
    code, _ = round_to_code_reference(x, None, E4M3, False, True)
    return codes_to_tensor(code, E4M3).float()


def _bf16_values(x: torch.Tensor) -> torch.Tensor:
    code, _ = round_to_code_reference(x, None, BF16, False, False)
    return codes_to_tensor(code, BF16).float()


def _exp2_int_reference(e: torch.Tensor) -> torch.Tensor:
    ok = e >= -126.0
    ei = torch.where(ok, e, torch.zeros_like(e)).to(torch.int32)
    return torch.where(ok, ((ei + 127) << 23).view(torch.float32), torch.zeros_like(e))


def _valid_mask(n_q: int, n_k: int, causal: bool, device, mask2: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Where the scores count: the causal triangle and / or the entries the mask does not set to -inf."""
    valid = torch.ones((n_q, n_k), dtype=torch.bool, device=device).tril() if causal else None
    if mask2 is not None:
        valid = mask2 != -math.inf if valid is None else valid & (mask2 != -math.inf)
    return valid


def log2_mask(attn_mask: torch.Tensor, shape: tuple) -> torch.Tensor:
    """An ``F.scaled_dot_product_attention`` mask (bool: True attends; float: added to the scores)
    as the kernels take it: fp32 in log2 units, -inf where masked, broadcast to ``shape``
    [B, H, N_q, N_k] as a view. Finite values are clamped at -2**99 (before the log2 scaling) so that a float mask of
    finfo.min behaves as in torch (masked, and a row masked everywhere averages v uniformly)."""
    if attn_mask.dtype == torch.bool:
        mask2 = torch.zeros(attn_mask.shape, dtype=torch.float32, device=attn_mask.device)
        mask2.masked_fill_(~attn_mask, -math.inf)
    else:
        m = attn_mask.float()
        mask2 = torch.where(m == -math.inf, m, m.clamp(min=-2.0**99) * LOG2E)
    return mask2.expand(shape)


def _scores_log2(q8, k8, scales, sm_scale):
    """s2 = log2(e) * sm_scale * (q k^T) [B, H, N_q, N_k] in fp32, as the kernels compute it."""
    b, h = q8.shape[:2]
    qk_scale = (scales[0] * scales[1]) * torch.tensor(sm_scale * LOG2E, dtype=torch.float32, device=q8.device)
    return torch.matmul(q8.float(), k8.float().transpose(-1, -2)) * qk_scale.reshape(b, h, 1, 1)


def attention_fwd_reference(q8, k8, v8, scales, causal: bool, sm_scale: float, out_dtype: torch.dtype,
                            mask2: Optional[torch.Tensor] = None):
    """PyTorch twin of the forward kernel, whole-matrix in fp32 (the same quantization points).

    q8 [B, H, N_q, D], k8 / v8 [B, H, N_k, D] E4M3, scales [3, B*H] (q, k, v), mask2 (optional)
    [B, H, N_q, N_k] from :func:`log2_mask`. Returns (o [B, H, N_q, D] in ``out_dtype``,
    lse2 [B, H, N_q] fp32 in base 2).
    """
    b, h, n_q, _ = q8.shape
    n_k = k8.shape[2]
    s2 = _scores_log2(q8, k8, scales, sm_scale)
    valid = _valid_mask(n_q, n_k, causal, q8.device, mask2)
    if mask2 is not None:  # as the kernels: masked scores become 0 (never NaN)
        s2 = torch.where(valid, s2 + mask2, torch.zeros_like(s2))
    fl = torch.floor(s2)
    neg = torch.full_like(fl, -1.0e30)
    fl_valid = fl if valid is None else torch.where(valid, fl, neg)
    m = fl_valid.amax(dim=-1, keepdim=True)  # integer stabilizer
    p = torch.exp2(s2 - fl) * _exp2_int_reference(fl_valid - m if valid is None else torch.where(valid, fl - m, neg))
    l = p.sum(dim=-1, keepdim=True)
    if mask2 is not None:  # a fully masked row: output 0, as torch's
        l = torch.where(l == 0, torch.full_like(l, math.inf), l)
    p_hat = _e4m3_values(p * P_SCALE_FWD)
    acc = torch.matmul(p_hat, v8.float())
    out_scale = scales[2].reshape(b, h, 1, 1) * (1.0 / P_SCALE_FWD)
    o = (acc * out_scale) / l
    return o.to(out_dtype), (m + torch.log2(l)).squeeze(-1)


def attention_bwd_reference(do, o, lse, q8, k8, v8, scales, causal: bool, sm_scale: float,
                            mask2: Optional[torch.Tensor] = None):
    """PyTorch twin of the backward kernels (dO quantized to E5M2 here, as on the kernel path).

    Returns (dq, dk, dv) in o's dtype.
    """
    b, h, n_q, d = q8.shape
    n_k = k8.shape[2]
    do8, do_scale = quantize_heads(do, E5M2)
    do_s = do_scale.reshape(b, h, 1, 1)
    s_q, s_k, s_v = (s.reshape(b, h, 1, 1) for s in scales)
    delta = (o.float() * do8.float()).sum(-1, keepdim=True) * do_s
    s2 = _scores_log2(q8, k8, scales, sm_scale)
    valid = _valid_mask(n_q, n_k, causal, q8.device, mask2)
    if mask2 is not None:
        s2 = torch.where(valid, s2 + mask2, torch.zeros_like(s2))
    p = torch.exp2(s2 - lse.unsqueeze(-1))
    if valid is not None:
        p = torch.where(valid, p, torch.zeros_like(p))
    dv = torch.matmul(_e4m3_values(p * P_SCALE_BWD).transpose(-1, -2), do8.float()) * (do_s * (1.0 / P_SCALE_BWD))
    dp = torch.matmul(do8.float(), v8.float().transpose(-1, -2)) * (do_s * s_v)
    ds = _bf16_values(p * (dp - delta))
    dq = torch.matmul(ds, k8.float()) * (s_k * sm_scale)
    dk = torch.matmul(ds.transpose(-1, -2), q8.float()) * (s_q * sm_scale)
    return dq.to(o.dtype), dk.to(o.dtype), dv.to(o.dtype)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        scale: Optional[float] = None) -> torch.Tensor:
    """The forward of :func:`attention` computed by the reference (no autograd): quantize q, k, v,
    then :func:`attention_fwd_reference`. Returns o [B, H, N_q, D] in q's dtype."""
    _validate(q, k, v, causal, scale)
    q8, k8, v8, scales = quantize_operands(q, k, v)
    return attention_fwd_reference(q8, k8, v8, scales, bool(causal), _sm_scale(q, scale), q.dtype)[0]


# ----------------------------------------------------------------------------
# torch.library ops, autograd and the public function
# ----------------------------------------------------------------------------


@torch.library.custom_op("tritonfp8::attention_fwd", mutates_args=())
def attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float,
    mask2: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward on validated q [B, H, N_q, D], k, v [B, H, N_k, D] and the optional mask from
    :func:`log2_mask` ([B, H, N_q, N_k], a broadcast view).

    Returns (o [B, H, N_q, D] in q's dtype, lse2 [B, H, N_q] fp32 (base 2), q8, k8, v8
    (E4M3, contiguous), scales [3, B*H] fp32); everything after o is saved for the backward.
    """
    q8, k8, v8, scales = quantize_operands(q, k, v)
    if q.numel() == 0:
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    elif _backend.resolve(q.device) == "torch":
        o, lse = attention_fwd_reference(q8, k8, v8, scales, causal, sm_scale, q.dtype, mask2)
    else:
        o, lse = _attention_fwd_triton(q8, k8, v8, scales, causal, sm_scale, q.dtype, mask2)
    return o, lse, q8, k8, v8, scales


@attention_fwd_op.register_fake
def _(q, k, v, causal, sm_scale, mask2=None):
    b, h, n_q, d = q.shape
    fp8 = E4M3.torch_dtype
    return (
        q.new_empty((b, h, n_q, d)), q.new_empty((b, h, n_q), dtype=torch.float32),
        q.new_empty(q.shape, dtype=fp8), k.new_empty(k.shape, dtype=fp8), v.new_empty(v.shape, dtype=fp8),
        q.new_empty((3, b * h), dtype=torch.float32),
    )


@torch.library.custom_op("tritonfp8::attention_bwd", mutates_args=())
def attention_bwd_op(
    do: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor,
    scales: torch.Tensor, causal: bool, sm_scale: float, mask2: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dq, dk, dv) in o's dtype from dO [B, H, N_q, D] and the forward's saved tensors.

    q8, k8, v8 are the E4M3 codes as uint8 (torch's schema checks cannot compare fp8 inputs).
    """
    q8, k8, v8 = (t.view(E4M3.torch_dtype) for t in (q8, k8, v8))
    if q8.numel() == 0:
        return (torch.zeros(q8.shape, dtype=o.dtype, device=o.device), torch.zeros(k8.shape, dtype=o.dtype, device=o.device),
                torch.zeros(v8.shape, dtype=o.dtype, device=o.device))
    do = do.to(o.dtype)
    if _backend.resolve(do.device) == "torch":
        return attention_bwd_reference(do, o, lse, q8, k8, v8, scales, causal, sm_scale, mask2)
    return _attention_bwd_triton(do, o, lse, q8, k8, v8, scales, causal, sm_scale, mask2)


@attention_bwd_op.register_fake
def _(do, o, lse, q8, k8, v8, scales, causal, sm_scale, mask2=None):
    return o.new_empty(q8.shape), o.new_empty(k8.shape), o.new_empty(v8.shape)


def _setup_context(ctx, inputs, output):
    _, _, _, causal, sm_scale, *mask2 = inputs
    o, lse, q8, k8, v8, scales = output
    ctx.mark_non_differentiable(lse, q8, k8, v8, scales)
    ctx.save_for_backward(o, lse, q8, k8, v8, scales, mask2[0] if mask2 else None)
    ctx.causal, ctx.sm_scale = causal, sm_scale


def _backward(ctx, do, *unused):
    refuse_double_backward("attention")
    o, lse, q8, k8, v8, scales, mask2 = ctx.saved_tensors
    q8, k8, v8 = (t.view(torch.uint8) for t in (q8, k8, v8))
    dq, dk, dv = attention_bwd_op(do, o, lse, q8, k8, v8, scales, ctx.causal, ctx.sm_scale, mask2)
    return dq, dk, dv, None, None, None


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _sm_scale(q: torch.Tensor, scale) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _validate(q, k, v, causal, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention expects torch.Tensor q, k, v; {name} is a {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in INPUT_DTYPES:
            raise TypeError(f"attention takes float32, bfloat16 or float16 q, k, v; {name} is {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device} and {v.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention expects 4-d q, k, v [B, H, N, D]; {name} has shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, H, N_k, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q [B, H, N_q, D] and k, v [B, H, N_k, D] must agree in B, H and D, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"head dim D={q.shape[3]} is not supported; use one of {HEAD_DIMS}")
    if k.shape[2] == 0:
        raise ValueError("attention over zero keys (N_k = 0) is undefined")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal=True needs N_q == N_k (a square mask), got N_q={q.shape[2]} and N_k={k.shape[2]}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None (1/sqrt(D)), got {scale!r}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale!r}")


def _check_device(device: torch.device) -> None:
    """Compiled kernels need fp8 tensor cores (sm_89+); other devices use the reference."""
    if _backend.resolve(device) != "triton":
        return
    ok, why = _backend.fp8_tensor_cores(device)
    if not ok:
        raise RuntimeError(f"the fp8 attention kernels cannot run: {why}; use tf8.set_backend('torch') to run the reference")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None,
              enable_gqa: bool = False) -> torch.Tensor:
    """FP8 scaled dot-product attention: ``softmax(scale * q k^T + mask) v``.

    Args:
        q: [B, H, N_q, D]; k, v: [B, H_kv, N_k, D] (as ``F.scaled_dot_product_attention``),
            float32 / bfloat16 / float16, one dtype and device, any strides.
            D in :data:`HEAD_DIMS` (16, 32, 64, 128); any N_q, N_k >= 1.
        causal: mask keys after each query (query i sees keys 0..i); needs N_q == N_k.
        scale: the score scale, 1/sqrt(D) by default.
        attn_mask: as SDPA's, broadcastable to [B, H, N_q, N_k]: bool (True attends) or
            float (added to the scores; no gradient flows to it). Not with ``causal``.
            A query row masked everywhere gives 0 (as torch).
        enable_gqa: H a multiple of H_kv (grouped-query attention): each k / v head serves
            H / H_kv query heads (as torch, through a repeated copy of k and v).

    Returns:
        o [B, H, N_q, D] in q's dtype, differentiable in q, k and v.

    q, k, v are quantized to E4M3 with one scale per (b, h); P and the backward
    operands as in the module doc. CUDA tensors run the Triton kernels, CPU tensors
    the PyTorch reference (see :mod:`tritonfp8.backend`).
    """
    if enable_gqa and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == k.dim() == 4 \
            and k.shape[1] != q.shape[1]:
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"enable_gqa needs the query heads ({q.shape[1]}) to be a multiple of the "
                             f"key / value heads ({k.shape[1]})")
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    _validate(q, k, v, causal, scale)
    _check_device(q.device)
    mask2 = None
    if attn_mask is not None:
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        _validate_mask(attn_mask, shape, causal, q.device)
        mask2 = log2_mask(attn_mask, shape)
    # The op is differentiable itself (register_autograd above): the one autograd path.
    return attention_fwd_op(q, k, v, causal, _sm_scale(q, scale), mask2)[0]


def _validate_mask(attn_mask, shape: tuple, causal: bool, device) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if causal:
        raise ValueError("pass either attn_mask or causal=True, not both (as F.scaled_dot_product_attention)")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True attends) or floating (added to the scores), got {attn_mask.dtype}")
    if attn_mask.requires_grad:
        raise ValueError("attn_mask requires grad, and fp8 attention computes no gradient for the mask; "
                         "use F.scaled_dot_product_attention for a learned bias (e.g. T5's position bias)")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {device}")
    try:
        torch.broadcast_shapes(attn_mask.shape, shape)
    except RuntimeError:
        raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to [B, H, N_q, N_k] = {shape}") from None
    if attn_mask.dim() > 4 or torch.broadcast_shapes(attn_mask.shape, shape) != torch.Size(shape):
        raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to [B, H, N_q, N_k] = {shape}")


# ----------------------------------------------------------------------------
# Ahead-of-time compile specs (tritonfp8.aot)
# ----------------------------------------------------------------------------

# Strides that are 1 for the tensors the launchers pass (the JIT makes them constants).
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dd", "stride_tn",
                 "stride_dkd", "stride_dvd", "stride_dqd")
_FP32_ARGS = ("sm_scale_log2", "sm_scale")
_MASK_ARGS = ("mask_ptr", "H", "stride_mb", "stride_mh", "stride_mq", "stride_mk")


def _aot_spec(kind: str, head_dim: int, causal: bool, out: str = "bf16", masked: bool = False, hw_p: bool = True):
    """One kernel as the launchers build it; ``hw_p``: P through the hardware conversion, as on
    sm_90+ (hardware_nearest); False: the integer rounding that sm_89 runs."""
    cfg = _GPU_CONFIGS[max(64, block_d(head_dim))]
    bd = block_d(head_dim)
    types = {"q_ptr": "*fp8e4nv", "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "vt_ptr": "*fp8e4nv",
             "do_ptr": "*fp8e5", "dot_ptr": "*fp8e5", "scale_ptr": "*fp32", "do_scale_ptr": "*fp32",
             "lse_ptr": "*fp32", "delta_ptr": "*fp32", "o_ptr": "*" + out, "dq_ptr": "*" + out,
             "dk_ptr": "*" + out, "dv_ptr": "*" + out, "mask_ptr": "*fp32"}
    if kind == "fwd":
        kernel = _attn_fwd_kernel
        t = cfg.fwd
        meta = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=t.rows, BLOCK_N=t.cols, CAUSAL=causal, HAS_MASK=masked,
                    INTERPRET=False, HW_P=hw_p)
        unit = ("stride_qd", "stride_kd", "stride_vn", "stride_od")  # V is read through its transposed copy
    elif kind == "dkdv":
        kernel = _attn_bwd_dkdv_kernel
        t = cfg.dkdv
        meta = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_N1=t.rows, BLOCK_M1=t.cols, CAUSAL=causal, HAS_MASK=masked,
                    INTERPRET=False, HW_P=hw_p)
        unit = _UNIT_STRIDES
    elif kind == "dq":
        kernel = _attn_bwd_dq_kernel
        t = cfg.dq
        meta = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M2=t.rows, BLOCK_N2=t.cols, CAUSAL=causal, HAS_MASK=masked, INTERPRET=False)
        unit = _UNIT_STRIDES
    else:
        kernel = _attn_bwd_preprocess_kernel
        t = KernelTiles(PREPROCESS_BLOCK_M, bd, 4, 1)
        meta = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_M=PREPROCESS_BLOCK_M)
        unit = ("stride_od", "stride_dd")
        types["o_ptr"] = "*bf16"
    meta.update({name: 1 for name in unit if name in kernel.arg_names})
    if not masked:  # what the launchers pass without a mask (None: a constexpr)
        meta.update({name: None for name in _MASK_ARGS if name in kernel.arg_names})
    signature = {}
    for name in kernel.arg_names:
        if name in meta:
            signature[name] = "constexpr"
        elif name in _FP32_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = types.get(name, "i32")
    # What the JIT specializes: 16-byte aligned pointers and strides that are multiples of 16
    # (multiples of D >= 16, or of the padded N of the transposed copies); sizes stay unaligned.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if signature[name].startswith("*") or (name.startswith("stride_") and signature[name] == "i32")}
    rounds_p = kind in ("fwd", "dkdv")
    name = (f"attention_{kind}[D={head_dim}{',causal' if causal else ''}{',mask' if masked else ''},{out}"
            f"{',hwP' if rounds_p and hw_p else ''}]")
    return KernelSpec(name=name, kernel=kernel, signature=signature, constexprs=meta, num_warps=t.num_warps,
                      num_stages=t.num_stages, fp8_mma=kind != "preprocess", extra={"attrs": attrs},
                      targets=(90, 100) if rounds_p and hw_p else GPU_TARGETS)


def aot_specs() -> list:
    """Forward for D in (64, 128) x causal; dK/dV likewise; dQ and the preprocess once per D / mode.
    The non-causal D = 128 kernels are the masked ones (attn_mask; D = 64 covers no mask)."""
    specs = [_aot_spec("fwd", d, c, out, masked=(d, c) == (128, False), hw_p=hw) for d, c, out in
             [(64, False, "bf16"), (64, True, "fp16"), (128, False, "fp32"), (128, True, "bf16")] for hw in (False, True)]
    specs += [_aot_spec("dkdv", d, c, masked=(d, c) == (128, False), hw_p=hw)
              for d in (64, 128) for c in (False, True) for hw in (False, True)]
    specs += [_aot_spec("dq", 64, True), _aot_spec("dq", 128, False, masked=True)]
    specs.append(_aot_spec("preprocess", 128, False))
    return specs
