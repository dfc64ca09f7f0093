"""Scaled fp8 matrix products with fused epilogues (numerics.md sections 4 and 5).

``out = (a.data * a.scale) @ (b.data * b.scale) (+ bias)`` for fp8 operands
a [M, K] and b [K, N], accumulated in fp32, written as fp32 / bf16 / fp16 or
rounded straight to fp8 by the same code as the cast kernel.

Operand scalings, each described on the operand's own 2-D view (tensor.py):

=========================  ==========================  ==========================
a [M, K]                    b [K, N]                    where the scale is applied
=========================  ==========================  ==========================
"none"                      "none"                      -
"tensor" []                 "tensor" []                 epilogue
"row" [M, 1]                "col" [1, N]                epilogue
(1, B) [M, K/B]             (B, 1) [K/B, N]             each partial product
(B, B) [M/B, K/B]           (B, B) [K/B, N/B]           each partial product
"mx" (1, 32) E8M0           "mx" (32, 1) E8M0           each partial product
=========================  ==========================  ==========================

with B in 32, 64, 128 (128 is DeepSeek-V3's: (1, 128) activations and
gradients, (128, 128) weights; the weight gradient pairs (1, 128) with (128, 1)).
Any scaling of a pairs with any of b; when both vary along K their K-extents
must agree. Formats E4M3 and E5M2 mix freely.

Kernel design:

* One program owns a BLOCK_M x BLOCK_N tile of the output. Per-K ("block") scales
  are applied to each partial product: one fp8 ``tl.dot`` per scale block of K
  (BLOCK_K = the block's K-extent, at most 128), ``acc += dot * sa * sb`` in fp32.
  Otherwise ``acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)``: on Hopper
  the fp8 wgmma accumulator keeps ~14 bits, and this promotes the partial sums
  into the fp32 accumulator after every BLOCK_K (<= 128) elements of K (Triton's
  sm_90 default never promotes). Tensor / row / column scales, the bias, the cast
  to the output dtype or the fp8 rounding (with amax and saturation count) are
  fused in the epilogue.
* Operands are read through their strides, never copied. Hopper's fp8 wgmma wants
  both operands K-major: a row-major [M, K] and b as the transposed view of a
  row-major [N, K] (the layout of a weight, and of the cast kernel's transposed
  copy). :func:`transpose_view` and :func:`linear_operands` build the three
  products of a linear layer that way.
* Two variants of the same kernel: ``_scaled_mm_kernel`` (pointer loads, any
  strides, every target) and ``_scaled_mm_tma_kernel`` (persistent, tensor
  descriptors / TMA; used on sm_90+ when both operands are K-major and
  16-byte aligned, and when the installed Triton has tensor descriptors).
* The fp8 output (``out_fmt``) is rounded in the epilogue by the cast's own
  :func:`~tritonfp8.ops.rounding.round_to_code` with the same Philox offsets as
  quantize on an [M, N] tensor (m * N + n, first word), so it is bit-exact with
  ``quantize(product)``; with stochastic rounding the epilogue works on column
  slices of the tile so that the Philox state stays in registers.
* Configurations: :data:`CONFIGS`, pruned per problem by :func:`keep`, tuned on a
  GPU once per (M, N, K) bucket and mode, over both variants (:func:`pick_config`).
  With promotion, a Hopper tile keeps two fp32 accumulators (wgmma's and the
  promoted one), so 128 x 128 per 8 warps is the largest tile without spills.

:func:`scaled_mm_reference` is the pure-PyTorch reference (dequantize, multiply in
fp32, or fp64 for tests). :func:`scaled_mm` is the public entry; it dispatches
through the ``tritonfp8::scaled_mm`` torch.library op to the backend of a's device.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import backend as _backend
from ..formats import DTYPE_NAMES, DTYPES_BY_NAME, E8M0, ROUNDINGS, Format, check_seed, get_format
from ..tensor import FP8Tensor, Scaling, expand_scale
from .quantize import quantize_reference
from .rounding import (abs_nan_as_inf, decode_codes, decode_codes_into, inv_scale_from_scale, random_words_2d,
                       round_to_code)
from .spec import KernelSpec

try:  # host-side tensor descriptors (TMA); Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer kernel serves every target
    TensorDescriptor = None


OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALE_BLOCK_K = (32, 64, 128)  # K-extents of block scales the kernel applies per partial product

# Operand scale modes (constexpr A_SCALE / B_SCALE).
SCALE_NONE = tl.constexpr(0)
SCALE_OUTER = tl.constexpr(1)  # constant along K (tensor / row / col): applied in the epilogue
SCALE_BLOCK = tl.constexpr(2)  # varies along K (block / mx): applied to each partial product

# ----------------------------------------------------------------------------
# Triton device functions
# ----------------------------------------------------------------------------


@triton.jit
def _load_scale(ptrs, mask, E8M0_SCALE: tl.constexpr):
    """fp32 scales at ``ptrs``; E8M0 codes (uint8) decode to 2**(code - 127), 0xFF to NaN.
    Masked lanes (rows / columns past the edge, never stored) get 0 (E8M0: 2**-127)."""
    if E8M0_SCALE:
        code = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
        bits = tl.where(code == 0, 0x00400000, code << 23)  # 2**-127 is an fp32 subnormal
        bits = tl.where(code == 255, 0x7FC00000, bits)
        return bits.to(tl.float32, bitcast=True)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _tile_coords(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("super-tile") order of output tiles: GROUP_M row tiles share their b columns in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (tile_id // group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group) % size_m
    pid_n = (tile_id % group) // size_m
    return pid_m, pid_n


@triton.jit
def _partial(a, b, acc, k0, offs_m, offs_n, in_m, in_n,
             a_scale_ptr, b_scale_ptr, stride_asm, stride_ask, stride_bsk, stride_bsn,
             A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, A_GM: tl.constexpr, B_GN: tl.constexpr,
             SCALE_K: tl.constexpr, E8M0_A: tl.constexpr, E8M0_B: tl.constexpr, BLOCK_K: tl.constexpr,
             FAST_ACC: tl.constexpr):
    """Add one BLOCK_K slice of the product to the fp32 accumulator.

    Block scales multiply the partial product (promoted to fp32 here); otherwise
    the dot accumulates into ``acc`` and is promoted every BLOCK_K elements, unless
    FAST_ACC (the recipe's fast accumulation: on sm_90 the tensor cores' own
    accumulator then holds the whole sum; elsewhere nothing changes).
    """
    if (A_SCALE == SCALE_BLOCK) or (B_SCALE == SCALE_BLOCK):
        kb = k0 // SCALE_K
        part = tl.dot(a, b, max_num_imprecise_acc=BLOCK_K)
        if A_SCALE == SCALE_BLOCK:
            sa = _load_scale(a_scale_ptr + (offs_m // A_GM) * stride_asm + kb * stride_ask, in_m, E8M0_A)
            part = part * sa[:, None]
        if B_SCALE == SCALE_BLOCK:
            sb = _load_scale(b_scale_ptr + kb * stride_bsk + (offs_n // B_GN) * stride_bsn, in_n, E8M0_B)
            part = part * sb[None, :]
        acc += part
    elif FAST_ACC:
        acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
    return acc


@triton.jit
def _flat(x):
    """A 2-D tile as 1-D, for whole-tile reductions. (Two nested reductions of a tile
    split off an accumulator crash Triton 3.6's sm_100 TMEM layout pass.)"""
    return tl.reshape(x, (x.shape[0] * x.shape[1],), can_reorder=True)


@triton.jit
def _epilogue_part(
    acc, offs_m, offs_n, col0, M, N, seed,
    a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, amax_ptr, saturated_ptr,
    stride_asm, stride_bsn, stride_om, stride_on,
    A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, A_GM: tl.constexpr, B_GN: tl.constexpr,
    E8M0_A: tl.constexpr, E8M0_B: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP8_OUT: tl.constexpr, OUT_SCALED: tl.constexpr,
    EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, MAX_CODE: tl.constexpr,
    INF_CODE: tl.constexpr, NAN_CODE: tl.constexpr, STOCHASTIC: tl.constexpr, SATURATE: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, RAND4: tl.constexpr,
):
    """Outer scales, bias, then store as the output dtype or round to fp8 codes.

    The fp8 output [ROWS, COLS] (columns from ``col0``) is rounded by :func:`round_to_code`
    exactly as the cast kernel does: amax of the unscaled values (NaN as +inf),
    ``y = x * (1 / out_scale)``, the random word of element offset m * N + n
    (:func:`random_words_2d`: one Philox call per 4 outputs when RAND4, N % 4 == 0).
    """
    in_m = offs_m < M
    in_n = offs_n < N
    if A_SCALE == SCALE_OUTER:
        acc = acc * _load_scale(a_scale_ptr + (offs_m // A_GM) * stride_asm, in_m, E8M0_A)[:, None]
    if B_SCALE == SCALE_OUTER:
        acc = acc * _load_scale(b_scale_ptr + (offs_n // B_GN) * stride_bsn, in_n, E8M0_B)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    mask = in_m[:, None] & in_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if FP8_OUT:
        tile_amax = tl.max(_flat(tl.where(mask, abs_nan_as_inf(acc), 0.0)), axis=0)
        tl.atomic_max(amax_ptr, tile_amax)
        y = acc
        if OUT_SCALED:
            y = acc * inv_scale_from_scale(tl.load(out_scale_ptr))
        if STOCHASTIC:
            rand = random_words_2d(seed, offs_m, col0, N, ROWS, COLS, RAND4)
        else:
            rand = 0
        code, overflow = round_to_code(y, rand, EXP_BITS, MAN_BITS, MAX_CODE, INF_CODE, NAN_CODE, STOCHASTIC, SATURATE,
                                       COMPACT=False)  # (fewer registers here: see round_to_code)
        tl.store(out_ptrs, code.to(tl.uint8), mask=mask)
        tl.atomic_add(saturated_ptr, tl.sum(_flat((overflow & mask).to(tl.int32)), axis=0))
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_n(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right halves ([BLOCK_M, BLOCK_N // 2]) of a register tile."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _epilogue(
    acc, pid_n, offs_m, M, N, seed,
    a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, amax_ptr, saturated_ptr,
    stride_asm, stride_bsn, stride_om, stride_on,
    A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, A_GM: tl.constexpr, B_GN: tl.constexpr,
    E8M0_A: tl.constexpr, E8M0_B: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP8_OUT: tl.constexpr, OUT_SCALED: tl.constexpr,
    EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, MAX_CODE: tl.constexpr,
    INF_CODE: tl.constexpr, NAN_CODE: tl.constexpr, STOCHASTIC: tl.constexpr, SATURATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPI_SPLIT: tl.constexpr, RAND4: tl.constexpr,
):
    """The epilogue of one output tile, on EPI_SPLIT (1, 2 or 4) column slices in turn,
    so that the fp8 rounding (and its Philox bits) of a large tile stays in registers."""
    W: tl.constexpr = BLOCK_N // EPI_SPLIT
    if EPI_SPLIT == 1:
        parts = (acc,)
    elif EPI_SPLIT == 2:
        parts = _split_n(acc, BLOCK_M, BLOCK_N)
    else:
        left, right = _split_n(acc, BLOCK_M, BLOCK_N)
        p0, p1 = _split_n(left, BLOCK_M, BLOCK_N // 2)
        p2, p3 = _split_n(right, BLOCK_M, BLOCK_N // 2)
        parts = (p0, p1, p2, p3)
    for i in tl.static_range(EPI_SPLIT):
        col0 = pid_n * BLOCK_N + i * W
        offs_n = col0 + tl.arange(0, W)
        _epilogue_part(parts[i], offs_m, offs_n, col0, M, N, seed,
                       a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, amax_ptr, saturated_ptr,
                       stride_asm, stride_bsn, stride_om, stride_on,
                       A_SCALE, B_SCALE, A_GM, B_GN, E8M0_A, E8M0_B, HAS_BIAS, FP8_OUT, OUT_SCALED,
                       EXP_BITS, MAN_BITS, MAX_CODE, INF_CODE, NAN_CODE, STOCHASTIC, SATURATE, BLOCK_M, W, RAND4)


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed"])
def _scaled_mm_kernel(
    # pointers
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, amax_ptr, saturated_ptr,
    # sizes
    M, N, K, seed,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_asm, stride_ask, stride_bsk, stride_bsn, stride_om, stride_on,
    # operand scales
    A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, A_GM: tl.constexpr, B_GN: tl.constexpr,
    SCALE_K: tl.constexpr, E8M0_A: tl.constexpr, E8M0_B: tl.constexpr,
    # epilogue
    HAS_BIAS: tl.constexpr, FP8_OUT: tl.constexpr, OUT_SCALED: tl.constexpr,
    EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, MAX_CODE: tl.constexpr,
    INF_CODE: tl.constexpr, NAN_CODE: tl.constexpr, STOCHASTIC: tl.constexpr, SATURATE: tl.constexpr,
    # tile
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr, RAND4: tl.constexpr, FAST_ACC: tl.constexpr,
):
    """out [M, N] = a [M, K] @ b [K, N] for one BLOCK_M x BLOCK_N tile; any strides."""
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_n = offs_n < N
    # Rows and columns past the edge read a valid row / column again (their results are not stored).
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=in_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=in_k[:, None], other=0.0)
        acc = _partial(a, b, acc, k0, offs_m, offs_n, in_m, in_n,
                       a_scale_ptr, b_scale_ptr, stride_asm, stride_ask, stride_bsk, stride_bsn,
                       A_SCALE, B_SCALE, A_GM, B_GN, SCALE_K, E8M0_A, E8M0_B, BLOCK_K, FAST_ACC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    _epilogue(acc, pid_n, offs_m, M, N, seed,
              a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, amax_ptr, saturated_ptr,
              stride_asm, stride_bsn, stride_om, stride_on,
              A_SCALE, B_SCALE, A_GM, B_GN, E8M0_A, E8M0_B, HAS_BIAS, FP8_OUT, OUT_SCALED,
              EXP_BITS, MAN_BITS, MAX_CODE, INF_CODE, NAN_CODE, STOCHASTIC, SATURATE,
              BLOCK_M, BLOCK_N, EPI_SPLIT, RAND4)


@triton.jit(do_not_specialize=["seed"])
def _scaled_mm_tma_kernel(
    # tensor descriptors: a [M, K] and b^T [N, K], both K-contiguous
    a_desc, bt_desc,
    # pointers
    a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, amax_ptr, saturated_ptr,
    # sizes
    M, N, K, seed,
    # strides
    stride_asm, stride_ask, stride_bsk, stride_bsn, stride_om, stride_on,
    # operand scales
    A_SCALE: tl.constexpr, B_SCALE: tl.constexpr, A_GM: tl.constexpr, B_GN: tl.constexpr,
    SCALE_K: tl.constexpr, E8M0_A: tl.constexpr, E8M0_B: tl.constexpr,
    # epilogue
    HAS_BIAS: tl.constexpr, FP8_OUT: tl.constexpr, OUT_SCALED: tl.constexpr,
    EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, MAX_CODE: tl.constexpr,
    INF_CODE: tl.constexpr, NAN_CODE: tl.constexpr, STOCHASTIC: tl.constexpr, SATURATE: tl.constexpr,
    # tile
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr, RAND4: tl.constexpr, FAST_ACC: tl.constexpr,
):
    """Persistent variant: each program walks output tiles with a stride of the grid size.

    Operand tiles arrive by TMA (out-of-range rows, columns and K are zero-filled);
    the accumulation and the epilogue are those of ``_scaled_mm_kernel``.
    """
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m = offs_m < M
        in_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])
            b = bt_desc.load([pid_n * BLOCK_N, k0]).T
            acc = _partial(a, b, acc, k0, offs_m, offs_n, in_m, in_n,
                           a_scale_ptr, b_scale_ptr, stride_asm, stride_ask, stride_bsk, stride_bsn,
                           A_SCALE, B_SCALE, A_GM, B_GN, SCALE_K, E8M0_A, E8M0_B, BLOCK_K, FAST_ACC)
        _epilogue(acc, pid_n, offs_m, M, N, seed,
                  a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, out_scale_ptr, amax_ptr, saturated_ptr,
                  stride_asm, stride_bsn, stride_om, stride_on,
                  A_SCALE, B_SCALE, A_GM, B_GN, E8M0_A, E8M0_B, HAS_BIAS, FP8_OUT, OUT_SCALED,
                  EXP_BITS, MAN_BITS, MAX_CODE, INF_CODE, NAN_CODE, STOCHASTIC, SATURATE,
                  BLOCK_M, BLOCK_N, EPI_SPLIT, RAND4)


# ----------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    """One tile configuration of the product kernels.

    ``block_k`` is the K slice of one dot when no operand has block scales; with
    block scales the slice is the scale block's K-extent when that is smaller.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def meta(self, scale_k: int = 0) -> dict:
        block_k = min(self.block_k, scale_k) if scale_k else self.block_k
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=block_k, GROUP_M=self.group_m)

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}/g{self.group_m}/w{self.num_warps}/s{self.num_stages}"


# Every entry compiles for sm_89 / sm_90 / sm_100 without spilling on sm_90 (see
# aot_specs and tests/test_matmul.py). The promoted accumulation keeps two fp32
# accumulators per tile on Hopper (the wgmma one and the promoted one), so 128 x 128
# per 8 warps is the largest tile that stays in registers.
CONFIGS = (
    GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=4),
    GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=5),
    GemmConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=4),
    GemmConfig(64, 64, 128, group_m=8, num_warps=4, num_stages=4),
)


def bucket(x: int) -> int:
    """Size class of a dimension for the tuning cache: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(max(int(x), 1)))


def keep(config: GemmConfig, m: int, n: int, k: int) -> bool:
    """Whether ``config`` is worth trying on an [m, k] x [k, n] product.

    A tile more than twice as tall / wide as the (bucketed) problem only adds masked
    work. A problem of 2048 x 2048 outputs or more fills every SM with large tiles, so
    only the largest and the half-size ones are tried there: the promoted accumulation
    waits for every wgmma (wait depth 0 in the SASS report), and two 64 x 128 CTAs per
    SM can keep the tensor cores busy while the other promotes: the report's model
    (``python -m tritonfp8.aot --sass-report``, which ignores memory and wait latency)
    puts them at its ceiling, the fp8 peak, against 64% of it for one 128 x 128 CTA. The
    autotuner measures which wins. :func:`pick_config` falls back to the smallest tile
    when nothing is kept.
    """
    if config.block_m > max(64, bucket(m)) or config.block_n > max(64, bucket(n)):
        return False
    largest = max(c.block_m * c.block_n for c in CONFIGS)
    return bucket(m) * bucket(n) < 2048 * 2048 or 2 * config.block_m * config.block_n >= largest


# Time the kept candidates on a GPU and cache the fastest (pick_config). False uses the
# first candidate without timing: deterministic, and it compiles one kernel per mode.
AUTOTUNE = True
_TUNED: dict = {}


def pick_config(m: int, n: int, k: int, key: tuple = (), run=None,
                variants: tuple = ("pointer",)) -> tuple[str, GemmConfig]:
    """The (variant, configuration) for an [m, k] x [k, n] product.

    Candidates are every kept configuration in each of ``variants`` (in order).
    Without ``run`` (interpreter, CPU) the first candidate is used; with
    ``run(variant, config) -> ms`` the fastest one, measured once per
    (bucket(m), bucket(n), bucket(k), variants, key) and cached.
    """
    kept = [c for c in CONFIGS if keep(c, m, n, k)] or [min(CONFIGS, key=lambda c: c.block_m * c.block_n)]
    candidates = [(v, c) for c in kept for v in variants]
    if run is None or len(candidates) == 1:
        return candidates[0]
    cache_key = (bucket(m), bucket(n), bucket(k), tuple(variants)) + tuple(key)
    if cache_key not in _TUNED:
        _TUNED[cache_key] = min(candidates, key=lambda vc: run(*vc))
    return _TUNED[cache_key]


# ----------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------


def _operand_scale(scaling: Scaling, is_a: bool) -> tuple[int, int, int]:
    """(mode, outer group size, K-extent of a K-varying scale) of an operand's scaling."""
    if scaling.kind == "none":
        return int(SCALE_NONE), 1, 0
    if scaling.kind in ("tensor", "row", "col"):
        return int(SCALE_OUTER), 1, 0
    bm, bk = scaling.block  # on a [M, K] (outer, K); on b [K, N] (K, outer)
    return int(SCALE_BLOCK), (bm if is_a else bk), (bk if is_a else bm)


def _scale_strides(scale: torch.Tensor, is_a: bool) -> tuple[int, int]:
    """(outer stride, K stride) of a scale tensor; 0 for scalars."""
    if scale.dim() < 2:
        return 0, 0
    return (scale.stride(0), scale.stride(1)) if is_a else (scale.stride(1), scale.stride(0))


def scaled_mm_meta(a_scaling: Scaling, b_scaling: Scaling, has_bias: bool, out_fmt: Optional[Format],
                   out_scaled: bool, rounding: str, saturate: bool, config: GemmConfig, n: int = 1 << 30,
                   fast_accumulation: bool = False) -> dict:
    """The constexpr arguments of the product kernels for an output with ``n`` columns
    (also used to compile them ahead of time)."""
    a_mode, a_gm, a_k = _operand_scale(a_scaling, True)
    b_mode, b_gn, b_k = _operand_scale(b_scaling, False)
    scale_k = max(a_k, b_k)
    fmt = out_fmt
    return dict(
        A_SCALE=a_mode, B_SCALE=b_mode, A_GM=a_gm, B_GN=b_gn, SCALE_K=scale_k,
        E8M0_A=a_scaling.is_mx, E8M0_B=b_scaling.is_mx,
        HAS_BIAS=has_bias, FP8_OUT=fmt is not None, OUT_SCALED=out_scaled,
        EXP_BITS=fmt.exp_bits if fmt else 0, MAN_BITS=fmt.man_bits if fmt else 0,
        MAX_CODE=fmt.max_code if fmt else 0, INF_CODE=fmt.inf_code if fmt else 0,
        NAN_CODE=fmt.nan_code if fmt else 0,
        STOCHASTIC=fmt is not None and rounding == "stochastic", SATURATE=saturate,
        EPI_SPLIT=epilogue_split(config, fmt is not None and rounding == "stochastic"), RAND4=n % 4 == 0,
        FAST_ACC=fast_accumulation,
        **config.meta(scale_k),
    )


def epilogue_split(config: GemmConfig, stochastic: bool) -> int:
    """Column slices of the epilogue: stochastic rounding (its Philox words) works on
    slices of at most 32 columns per 4 warps, so no configuration spills."""
    if not stochastic:
        return 1
    return max(1, min(4, config.block_n * 4 // (32 * config.num_warps)))


def tma_ok(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    """(usable, reason): whether the persistent TMA kernel can run on a [M, K], b [K, N]."""
    if TensorDescriptor is None:
        return False, "this Triton has no host tensor descriptors (triton.tools.tensor_descriptor)"
    if a.device.type == "cuda" and not _backend.triton_interprets():
        if torch.cuda.get_device_capability(a.device)[0] < 9:
            return False, "TMA needs sm_90 or newer"
    if a.stride(1) != 1 or b.stride(0) != 1:
        return False, "TMA needs both operands K-major (a row-major [M, K], b the transposed view of a row-major [N, K])"
    if a.stride(0) % 16 or b.stride(1) % 16 or a.data_ptr() % 16 or b.data_ptr() % 16:
        return False, "TMA needs 16-byte aligned base pointers and row strides"
    return True, "ok"


def _bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20)


def _scaled_mm_triton(a, a_scale, a_scaling, b, b_scale, b_scaling, bias, out_dtype, out_fmt, out_scale,
                      rounding, seed, saturate, config: Optional[GemmConfig] = None,
                      variant: Optional[str] = None, fast_accumulation: bool = False):
    """Launch a product kernel on 2-D a [M, K], b [K, N] (validated by :func:`scaled_mm`).

    ``variant`` forces "pointer" or "tma" and ``config`` a configuration; otherwise
    :func:`pick_config` chooses among both variants (TMA only where :func:`tma_ok`,
    and only for compiled kernels; the interpreter uses the pointer kernel).
    Returns [out [M, N] (uint8 codes for an fp8 output), amax [], saturated []].
    """
    m, k = a.shape
    n = b.shape[1]
    device = a.device
    compiled = device.type == "cuda" and not _backend.triton_interprets()
    if variant is None:
        variants = ("tma", "pointer") if compiled and tma_ok(a, b)[0] else ("pointer",)
    elif variant == "tma":
        ok, reason = tma_ok(a, b)
        if not ok:
            raise ValueError(f"the TMA kernel cannot run here: {reason}")
        variants = (variant,)
    elif variant == "pointer":
        variants = (variant,)
    else:
        raise ValueError(f"variant must be 'pointer' or 'tma', got {variant!r}")
    out = torch.empty((m, n), dtype=torch.uint8 if out_fmt is not None else out_dtype, device=device)
    amax = torch.zeros((), dtype=torch.float32, device=device)
    saturated = torch.zeros((), dtype=torch.int32, device=device)
    stride_asm, stride_ask = _scale_strides(a_scale, True)
    stride_bsn, stride_bsk = _scale_strides(b_scale, False)
    dummy = amax  # stands in for absent optional pointers (never read)
    args = dict(
        a_scale_ptr=a_scale.view(torch.uint8) if a_scaling.is_mx else a_scale,
        b_scale_ptr=b_scale.view(torch.uint8) if b_scaling.is_mx else b_scale,
        bias_ptr=bias if bias is not None else dummy, out_ptr=out,
        out_scale_ptr=out_scale if out_scale is not None else dummy,
        amax_ptr=amax, saturated_ptr=saturated,
        M=m, N=n, K=k, seed=seed,
        stride_asm=stride_asm, stride_ask=stride_ask, stride_bsk=stride_bsk, stride_bsn=stride_bsn,
        stride_om=out.stride(0), stride_on=out.stride(1),
    )

    def launch(var: str, cfg: GemmConfig, out_args: dict):
        meta = scaled_mm_meta(a_scaling, b_scaling, bias is not None, out_fmt, out_scale is not None,
                              rounding, saturate, cfg, n, fast_accumulation)
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        if var == "tma":
            a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [cfg.block_m, meta["BLOCK_K"]])
            bt_desc = TensorDescriptor(b, [n, k], [b.stride(1), 1], [cfg.block_n, meta["BLOCK_K"]])
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
            _scaled_mm_tma_kernel[(min(tiles, sms),)](
                a_desc=a_desc, bt_desc=bt_desc, **out_args, **meta,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        else:
            _scaled_mm_kernel[(tiles,)](
                a_ptr=a, b_ptr=b, stride_am=a.stride(0), stride_ak=a.stride(1),
                stride_bk=b.stride(0), stride_bn=b.stride(1), **out_args, **meta,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )

    if config is None:
        def timed(var, cfg):  # on scratch outputs, so the atomics of the real call start from zero
            scratch = dict(args, out_ptr=torch.empty_like(out), amax_ptr=torch.zeros_like(amax),
                           saturated_ptr=torch.zeros_like(saturated))
            return _bench_ms(lambda: launch(var, cfg, scratch))

        run = timed if compiled and AUTOTUNE else None
        key = (a.dtype, b.dtype, str(a_scaling), str(b_scaling), bias is not None,
               str(out_dtype), out_fmt.name if out_fmt else "", rounding, fast_accumulation)
        variant, config = pick_config(m, n, k, key, run, variants)
    launch(variants[0] if variant is None else variant, config, args)
    return [out, amax, saturated]


# ----------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------


# Reused fp32 buffers for the decoded operands of CPU products, per thread and operand.
# A buffer over _WORKSPACE_MAX_NUMEL elements is not kept (fresh each call instead).
_WORKSPACE_MAX_NUMEL = 1 << 26
_OUTER_KINDS = ("none", "tensor", "row", "col")  # scales applied after the sum, not to the operands
_workspace = threading.local()


def release_workspace() -> None:
    """Free this thread's reused CPU decode buffers (they are rebuilt on the next product)."""
    _workspace.__dict__.clear()


def _scratch(slot: str, numel: int, device) -> Optional[torch.Tensor]:
    """A 1-D fp32 buffer of ``numel`` elements reused across calls, or None when not kept."""
    if device.type != "cpu" or numel > _WORKSPACE_MAX_NUMEL:
        return None
    buffer = getattr(_workspace, slot, None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=torch.float32, device=device)
        setattr(_workspace, slot, buffer)
    return buffer[:numel]


def _decode_operand(slot: str, data: torch.Tensor) -> torch.Tensor:
    """The exact fp32 values of 2-D codes, same strides; into a reused buffer when the codes
    are dense (row- or column-major), so a transposed view stays a view for the BLAS call."""
    fmt = get_format(data.dtype)
    rows, cols = data.shape
    if data.is_contiguous():
        dense, shape = data, (rows, cols)
    elif data.t().is_contiguous():
        dense, shape = data.t(), (cols, rows)
    else:
        return decode_codes(data, fmt)
    out = _scratch(slot, data.numel(), data.device)
    if out is None:
        return decode_codes(data, fmt)
    decode_codes_into(dense.reshape(-1), fmt, out)
    values = out.view(shape)
    return values if dense is data else values.t()


def _operand_reference(slot: str, data: torch.Tensor, scale: torch.Tensor, scaling: Scaling, rows: int, cols: int):
    """(fp32 values [rows, cols], outer scale or None) of one operand (``slot``: "a" or "b").

    The codes become their exact fp32 values. A scale constant along K (tensor / row / col)
    is returned to multiply the product, as the kernel's epilogue does; a block or MX scale,
    which varies along K, multiplies the values (each partial product of a block sees its
    own scale).
    """
    values = _decode_operand(slot, data)
    if scaling.kind == "none":
        return values, None
    if scaling.kind in _OUTER_KINDS:  # fp32 [], [rows, 1] or [1, cols]
        return values, scale
    return _scale_blocks_(values, scale, scaling, rows, cols), None


def _scale_blocks_(values: torch.Tensor, scale: torch.Tensor, scaling: Scaling, rows: int, cols: int) -> torch.Tensor:
    """values [rows, cols] *= its block / MX scale, in place: a broadcast over a blocked view
    when the blocks tile the operand (no expanded [rows, cols] scale), else the expanded scale."""
    gm, gk = scaling.group_shape(rows, cols)
    if rows % gm or cols % gk:
        return values.mul_(expand_scale(scale, scaling, rows, cols))
    values.view(rows // gm, gm, cols // gk, gk).mul_(scale.float().view(rows // gm, 1, cols // gk, 1))
    return values


def _exact_gemm(a_values: torch.Tensor, b_values: torch.Tensor, bf16_exact: bool) -> torch.Tensor:
    """fp32 a @ b accumulated in fp32, on the fastest exact CPU route.

    When every operand value is exact in bf16 (decoded fp8 codes, no scale folded in), the
    product runs under PyTorch's bf16 fp32-matmul mode, which routes it to oneDNN: on CPUs
    with bf16 matrix units (AMX) that converts the operands losslessly and accumulates in
    fp32; on the AVX512-BF16 CI machines (AMD Zen 4) oneDNN keeps fp32 math there, and its
    fp32 GEMM takes 0.72-0.85x the time of MKL's (perf/bench_cpu.py, "GEMM" rows). A block / MX
    scale folded into the operands is not exact in bf16, so those products take the plain
    fp32 GEMM. The mode is process-wide, so it is set for this call only (an fp32 matmul
    that another thread runs at that moment would see it too).
    """
    if not (bf16_exact and a_values.device.type == "cpu" and _cpu_has_bf16()):
        return a_values @ b_values
    precision = torch.backends.mkldnn.matmul
    before = precision.fp32_precision
    precision.fp32_precision = "bf16"
    try:
        return a_values @ b_values
    finally:
        precision.fp32_precision = before


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@_backend.compiled_reference
def _epilogue_reference(acc, a_outer, b_outer, bias) -> None:
    """acc [M, N] fp32 times the outer scales (a: [] or [M, 1], b: [] or [1, N]), plus bias [N],
    in place (acc is the GEMM's fresh output: writing it again skips a new buffer's page faults)."""
    result = acc
    if a_outer is not None:
        result = result * a_outer
    if b_outer is not None:
        result = result * b_outer
    if bias is not None:
        result = result + bias.float()
    acc.copy_(result)


def scaled_mm_reference(a, a_scale, a_scaling, b, b_scale, b_scaling, bias, out_dtype, out_fmt, out_scale,
                        rounding, seed, saturate):
    """Pure-PyTorch twin of the product kernels on 2-D a [M, K], b [K, N].

    The fp8 values are exact in fp32, so the product is one fp32 GEMM (BLAS) of the
    decoded operands (block / MX scales applied to them), then the kernel's epilogue:
    outer scales (tensor / row / col), bias, and a cast to ``out_dtype`` or, with
    ``out_fmt``, rounding with the cast's reference (``out_scale`` as a delayed tensor
    scale, Philox offsets m * N + n). Returns [out [M, N], amax [], saturated []] like
    the kernel launcher.
    """
    m, k = a.shape
    n = b.shape[1]
    a_values, a_outer = _operand_reference("a", a, a_scale, a_scaling, m, k)
    b_values, b_outer = _operand_reference("b", b, b_scale, b_scaling, k, n)
    bf16_exact = a_scaling.kind in _OUTER_KINDS and b_scaling.kind in _OUTER_KINDS
    y = _exact_gemm(a_values, b_values, bf16_exact)
    if a_outer is not None or b_outer is not None or bias is not None:
        _epilogue_reference(y, a_outer, b_outer, bias)
    if out_fmt is None:
        empty = torch.zeros((), dtype=torch.float32, device=a.device)
        return [y.to(out_dtype), empty, torch.zeros((), dtype=torch.int32, device=a.device)]
    scaling = Scaling("tensor" if out_scale is not None else "none")
    data, _, amax, sat, _, _ = quantize_reference(y, out_fmt, rounding, scaling, seed, saturate, False, out_scale, 0, False)
    return [data.view(torch.uint8), amax, sat[0]]


# ----------------------------------------------------------------------------
# torch.library op and the public function
# ----------------------------------------------------------------------------



@torch.library.custom_op("tritonfp8::scaled_mm", mutates_args=())
def scaled_mm_op(
    a: torch.Tensor, a_scale: torch.Tensor, a_scaling: str,
    b: torch.Tensor, b_scale: torch.Tensor, b_scaling: str,
    bias: Optional[torch.Tensor], out_dtype: str, out_fmt: str, out_scale: Optional[torch.Tensor],
    rounding: str, seed: int, saturate: bool, fast_accumulation: bool = False,
) -> list[torch.Tensor]:
    """The product on 2-D fp8 a [M, K], b [K, N]; see :func:`scaled_mm`.

    Returns [out [M, N] (uint8 codes when ``out_fmt`` is set), amax [], saturated []].
    """
    fmt = get_format(out_fmt) if out_fmt else None
    args = (a, a_scale, Scaling.parse(a_scaling), b, b_scale, Scaling.parse(b_scaling), bias,
            DTYPES_BY_NAME[out_dtype], fmt, out_scale, rounding, seed, saturate)
    if _backend.resolve(a.device) == "torch":
        return scaled_mm_reference(*args)  # exact fp32 sums: fast accumulation changes nothing here
    return _scaled_mm_triton(*args, fast_accumulation=fast_accumulation)


@scaled_mm_op.register_fake
def _(a, a_scale, a_scaling, b, b_scale, b_scaling, bias, out_dtype, out_fmt, out_scale, rounding, seed, saturate,
      fast_accumulation=False):
    dtype = torch.uint8 if out_fmt else DTYPES_BY_NAME[out_dtype]
    return [
        a.new_empty((a.shape[0], b.shape[1]), dtype=dtype),
        a.new_empty((), dtype=torch.float32),
        a.new_empty((), dtype=torch.int32),
    ]


_A_KINDS = "'none', 'tensor', 'row', (1, B) or (B, B) blocks with B in (32, 64, 128), or 'mx'"
_B_KINDS = "'none', 'tensor', 'col', (B, 1) or (B, B) blocks with B in (32, 64, 128), or 'mx' (32 x 1 on [K, N])"


def _span(t: torch.Tensor) -> int:
    """1 + the largest element offset of a 2-D view."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size)


def _describe(s: Scaling) -> str:
    return f"mx {s.block[0]}x{s.block[1]}" if s.is_mx else str(s)


def _check_operand(name: str, q, is_a: bool) -> tuple[int, int]:
    """Validate one operand; returns its 2-D shape."""
    if not isinstance(q, FP8Tensor):
        what = f"a torch.Tensor of dtype {q.dtype}" if isinstance(q, torch.Tensor) else type(q).__name__
        raise TypeError(f"scaled_mm takes FP8Tensor operands (from tf8.quantize); {name} is {what}")
    fmt = q.fmt
    if q.data.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{name}.data must be float8_e4m3fn or float8_e5m2, got {q.data.dtype}")
    if get_format(q.data.dtype) != fmt:
        raise TypeError(f"{name}.fmt is {fmt.name} but {name}.data is {q.data.dtype}")
    if q.data.dim() != 2:
        raise ValueError(f"{name} must be 2-D ([M, K] for a, [K, N] for b), got shape {tuple(q.data.shape)}")
    rows, cols = q.data.shape
    s = q.scaling
    if is_a:
        ok = s.kind in ("none", "tensor", "row") or (
            s.kind in ("block", "mx") and s.block[1] in SCALE_BLOCK_K and s.block[0] in (1, s.block[1]))
    else:
        ok = s.kind in ("none", "tensor", "col") or (
            s.kind in ("block", "mx") and s.block[0] in SCALE_BLOCK_K and s.block[1] in (1, s.block[0]))
    if not ok:
        shape = "[M, K]" if is_a else "[K, N]"
        why = " (a scale per element of K cannot be taken out of the dot)" if s.kind in ("row", "col") else ""
        raise ValueError(
            f"scaling {_describe(s)} of {name} {shape} is not supported{why}; use {_A_KINDS if is_a else _B_KINDS}")
    want_shape = s.scale_shape(rows, cols)
    want_dtype = E8M0.torch_dtype if s.is_mx else torch.float32
    if not isinstance(q.scale, torch.Tensor) or tuple(q.scale.shape) != want_shape or q.scale.dtype != want_dtype:
        got = f"{q.scale.dtype} {tuple(q.scale.shape)}" if isinstance(q.scale, torch.Tensor) else type(q.scale).__name__
        raise ValueError(
            f"{name}.scale for scaling {_describe(s)} on {name} [{rows}, {cols}] must be {want_dtype} "
            f"of shape {want_shape}, got {got}")
    if q.scale.device != q.data.device:
        raise ValueError(f"{name}.scale is on {q.scale.device} but {name}.data is on {q.data.device}")
    return rows, cols


def scaled_mm(
    a: FP8Tensor,
    b: FP8Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    out_fmt=None,
    *,
    out_scale: Optional[torch.Tensor] = None,
    rounding: str = "nearest",
    seed: Optional[int] = None,
    saturate: bool = True,
    fast_accumulation: bool = False,
):
    """``(a.data * a.scale) @ (b.data * b.scale) + bias`` with fp32 accumulation.

    Args:
        a: FP8Tensor [M, K] (E4M3 or E5M2); scaling "none", "tensor" ([]), "row"
            ([M, 1]), (1, B) ([M, K/B]), (B, B) ([M/B, K/B]) with B in 32/64/128,
            or "mx" ([M, K/32] E8M0). Any strides; row-major is fastest.
        b: FP8Tensor [K, N]; scaling "none", "tensor", "col" ([1, N]), (B, 1)
            ([K/B, N]), (B, B) ([K/B, N/B]) or "mx" (32 x 1, [K/32, N] E8M0).
            Fastest as the transposed view of a row-major [N, K] (K-major, see
            :func:`transpose_view`). When both scales vary along K, their blocks
            must have the same K-extent.
        bias: optional [N] tensor (fp32 / bf16 / fp16), added in fp32.
        out_dtype: torch.float32, torch.bfloat16 or torch.float16 (ignored with out_fmt).
        out_fmt: None, or "e4m3" / "e5m2": round the fp32 result straight to fp8 in
            the kernel's epilogue, as :func:`~tritonfp8.quantize` would.
        out_scale: with out_fmt, an optional fp32 [] dequantization scale of the
            output (delayed scaling: codes = round(result / out_scale)); without it
            the output has scaling "none".
        rounding, seed, saturate: as for :func:`~tritonfp8.quantize` (Philox offset
            of element (m, n) is m * N + n).
        fast_accumulation: on sm_90, let the tensor cores' reduced-precision accumulator
            (about 14 significant bits, numerics.md 5) sum the whole K instead of
            promoting every 128 elements: faster, less exact, what Transformer Engine does
            in the forward product. It applies to unscaled / tensor / row / col scales
            (block and MX scales promote per block anyway); the reference backend, the
            interpreter, sm_89 and sm_100 compute the promoted (exact fp32) sums either way.

    Returns:
        A tensor [M, N] of ``out_dtype``, or with ``out_fmt`` an FP8Tensor [M, N]
        whose ``amax`` is max |result| (+inf if any NaN/Inf) and ``saturated`` the
        count of values that rounded above the format's max.
    """
    m, k = _check_operand("a", a, True)
    k_b, n = _check_operand("b", b, False)
    if k != k_b:
        raise ValueError(f"mismatched K: a is [{m}, {k}] and b is [{k_b}, {n}]; a [M, K] @ b [K, N] needs equal K")
    if b.device != a.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")
    _, _, a_k = _operand_scale(a.scaling, True)
    _, _, b_k = _operand_scale(b.scaling, False)
    if a_k and b_k and a_k != b_k:
        raise ValueError(
            f"unsupported scaling pairing: a {_describe(a.scaling)} and b {_describe(b.scaling)} vary along K "
            f"in blocks of {a_k} and {b_k}; "
            "both block scales must cover the same K-extent (e.g. a (1, 128) with b (128, 128) or (128, 1); mx with mx)")
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be a floating dtype among {[str(d) for d in OUT_DTYPES]}, got {out_dtype!r}")
    fmt = get_format(out_fmt) if out_fmt is not None else None
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in OUT_DTYPES or tuple(bias.shape) != (n,):
            got = f"{bias.dtype} {tuple(bias.shape)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a float32 / bfloat16 / float16 tensor of shape ({n},), got {got}")
        if bias.device != a.device:
            raise ValueError(f"bias is on {bias.device} but a is on {a.device}")
    if fmt is None and (out_scale is not None or rounding != "nearest" or seed is not None):
        raise ValueError("out_scale, rounding and seed apply to an fp8 output: pass out_fmt='e4m3' or 'e5m2'")
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; use one of {ROUNDINGS}")
    if rounding == "stochastic":
        if seed is None:
            raise ValueError("rounding='stochastic' needs seed=<int>; the same seed gives the same bits")
        check_seed(seed)
    if out_scale is not None:
        if not isinstance(out_scale, torch.Tensor) or out_scale.dtype != torch.float32 or out_scale.dim() != 0:
            raise ValueError("out_scale must be a float32 tensor of shape [] (a delayed tensor scale)")
        if out_scale.device != a.device:
            raise ValueError(f"out_scale is on {out_scale.device} but a is on {a.device}")
    if max(_span(a.data), _span(b.data), m * n) >= 2**31:
        raise ValueError("operands and output must span fewer than 2**31 elements (the kernels use 32-bit offsets)")

    if m == 0 or n == 0:
        outs = [torch.empty((m, n), dtype=torch.uint8 if fmt else out_dtype, device=a.device),
                torch.zeros((), dtype=torch.float32, device=a.device), torch.zeros((), dtype=torch.int32, device=a.device)]
    else:
        outs = scaled_mm_op(
            a.data, a.scale, a.scaling.spec(), b.data, b.scale, b.scaling.spec(), bias, DTYPE_NAMES[out_dtype],
            fmt.name if fmt else "", out_scale, rounding, 0 if seed is None else seed, saturate,
            bool(fast_accumulation),
        )
    out, amax, saturated = outs
    if fmt is None:
        return out
    scale = out_scale.clone() if out_scale is not None else torch.ones((), dtype=torch.float32, device=a.device)
    return FP8Tensor(out.view(fmt.torch_dtype), scale, fmt, Scaling("tensor" if out_scale is not None else "none"),
                     amax, saturated)


# ----------------------------------------------------------------------------
# Operand layouts of a linear layer
# ----------------------------------------------------------------------------


def transpose_view(q: FP8Tensor) -> FP8Tensor:
    """The FP8Tensor of q^T as a view (no copy): data [K, M] with q's bytes, scale
    transposed, scaling described on the transposed view. A row-major [N, K]
    weight viewed this way is the K-major [K, N] operand b that wgmma wants."""
    if q.data.dim() != 2:
        raise ValueError(f"transpose_view needs a 2-D FP8Tensor, got shape {tuple(q.data.shape)}")
    scale = q.scale.t() if q.scale.dim() == 2 else q.scale
    return FP8Tensor(q.data.t(), scale, q.fmt, q.scaling.transposed(), q.amax, q.saturated)


def linear_operands(product: str, x_q: FP8Tensor = None, w_q: FP8Tensor = None,
                    dy_q: FP8Tensor = None) -> tuple[FP8Tensor, FP8Tensor]:
    """The (a, b) operands of the three products of y = x W^T, all K-major, no copies.

    * "forward":  y [T, N] = x [T, K] @ W^T: a = x_q, b = W_q viewed transposed.
    * "dgrad":    dx [T, K] = dy [T, N] @ W: a = dy_q, b = the transposed copy of W
      (W^T [K, N] quantized along N, from ``quantize(W, transpose=True)``) viewed transposed.
    * "wgrad":    dW [N, K] = dy^T [N, T] @ x [T, K]: a = dy_q.transposed (dy^T
      quantized along T), b = x_q.transposed (x^T quantized along T) viewed transposed.

    x_q, dy_q are quantized along their last dim, W_q [N, K] along K; "dgrad" needs
    ``W_q.transposed`` and "wgrad" ``dy_q.transposed`` and ``x_q.transposed``.
    """
    def need(q, name):
        if q is None:
            raise ValueError(f"linear_operands({product!r}) needs {name}")
        return q

    if product == "forward":
        return need(x_q, "x_q"), transpose_view(need(w_q, "w_q"))
    if product == "dgrad":
        w_t = need(w_q, "w_q").transposed
        if w_t is None:
            raise ValueError("dgrad needs w_q from quantize(W, transpose=True)")
        return need(dy_q, "dy_q"), transpose_view(w_t)
    if product == "wgrad":
        dy_t, x_t = need(dy_q, "dy_q").transposed, need(x_q, "x_q").transposed
        if dy_t is None or x_t is None:
            raise ValueError("wgrad needs dy_q and x_q from quantize(..., transpose=True)")
        return dy_t, transpose_view(x_t)
    raise ValueError(f"unknown product {product!r}; use 'forward', 'dgrad' or 'wgrad'")


def is_k_major(a: FP8Tensor, b: FP8Tensor) -> bool:
    """True when a [M, K] and b [K, N] are both contiguous along K (the wgmma layout)."""
    return a.data.stride(1) == 1 and b.data.stride(0) == 1


# ----------------------------------------------------------------------------
# Ahead-of-time compile specs
# ----------------------------------------------------------------------------

_TRITON_TYPES = {"e4m3": "fp8e4nv", "e5m2": "fp8e5"}
# What the JIT specializes at run time for the hot path (K-major operands, row-major
# output, sizes and row strides that are multiples of 16): arguments equal to 1
# become constants, 16-aligned pointers and integers get a divisibility hint.
_UNIT_STRIDES = ("stride_ak", "stride_bk", "stride_on")
_NOT_ALIGNED = ("seed",)


def aot_spec(config: GemmConfig, a_fmt: str, b_fmt: str, a_scaling, b_scaling, out: str = "bf16",
             has_bias: bool = False, rounding: str = "nearest", variant: str = "pointer",
             fast_accumulation: bool = False):
    """One :class:`tritonfp8.ops.spec.KernelSpec` of a product kernel, specialized as the JIT
    specializes a K-major product whose sizes are multiples of 16.

    ``a_scaling`` / ``b_scaling`` are given as for quantize on the operand's own 2-D
    view ("mx" on b means 32 x 1 blocks); ``out`` is "fp32" / "bf16" / "fp16", or
    "e4m3" / "e5m2" for the fused fp8 output.
    """

    a_s, b_s = Scaling.parse(a_scaling), Scaling.parse(b_scaling)
    if b_s.is_mx:
        b_s = b_s.transposed()
    out_fmt = get_format(out) if out in _TRITON_TYPES else None
    constexprs = scaled_mm_meta(a_s, b_s, has_bias, out_fmt, out_fmt is not None, rounding, True, config,
                                fast_accumulation=fast_accumulation)
    kernel = _scaled_mm_tma_kernel if variant == "tma" else _scaled_mm_kernel
    types = {
        "a_ptr": "*" + _TRITON_TYPES[a_fmt], "b_ptr": "*" + _TRITON_TYPES[b_fmt],
        "a_desc": f"tensordesc<{_TRITON_TYPES[a_fmt]}[{constexprs['BLOCK_M']}, {constexprs['BLOCK_K']}]>",
        "bt_desc": f"tensordesc<{_TRITON_TYPES[b_fmt]}[{constexprs['BLOCK_N']}, {constexprs['BLOCK_K']}]>",
        "a_scale_ptr": "*u8" if a_s.is_mx else "*fp32", "b_scale_ptr": "*u8" if b_s.is_mx else "*fp32",
        "bias_ptr": "*bf16", "out_ptr": "*u8" if out_fmt else "*" + out, "out_scale_ptr": "*fp32",
        "amax_ptr": "*fp32", "saturated_ptr": "*i32", "seed": "i64",
    }
    constexprs.update({name: 1 for name in _UNIT_STRIDES if name in kernel.arg_names})
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(kernel.arg_names)
        if name not in _NOT_ALIGNED and (signature[name] == "i32" or signature[name].startswith("*"))
    }
    name = (f"scaled_mm[{variant} {config} {a_fmt}x{b_fmt} a:{a_s} b:{b_s} -> {out}"
            f"{' +bias' if has_bias else ''}{' sr' if rounding == 'stochastic' else ''}"
            f"{' fast-acc' if fast_accumulation else ''}]")
    # The no-spill promise is for sm_90. On sm_100 per-column block scales (128 x 1, mx)
    # and on sm_89 a few block-scaled tiles spill (see the AOT table); the TMA kernel never
    # runs on sm_89 (tma_ok), where Triton lowers its descriptors to plain loads.
    return KernelSpec(name=name, kernel=kernel, signature=signature, constexprs=constexprs,
                      num_warps=config.num_warps, num_stages=config.num_stages, fp8_mma=True,
                      extra={"attrs": attrs, "no_spill_targets": (90,)})


def aot_specs() -> list:
    """Every configuration of :data:`CONFIGS` in both kernels, over representative
    scalings, both fp8 formats (mixed too), every output kind and both roundings."""
    specs = []
    for config in CONFIGS:
        specs += [
            aot_spec(config, "e4m3", "e4m3", "tensor", "tensor", "bf16", variant="pointer"),
            aot_spec(config, "e4m3", "e4m3", (1, 128), (128, 128), "bf16", variant="tma"),
            aot_spec(config, "e4m3", "e5m2", "tensor", "tensor", "e5m2", has_bias=True, rounding="stochastic",
                     variant="tma"),
            aot_spec(config, "e5m2", "e5m2", (1, 128), (128, 1), "fp32", variant="pointer"),
        ]
    first = CONFIGS[0]
    specs += [
        aot_spec(first, "e4m3", "e4m3", "mx", "mx", "bf16", variant="pointer"),
        aot_spec(first, "e5m2", "e4m3", "row", "col", "fp16", has_bias=True, variant="tma"),
        aot_spec(first, "e4m3", "e4m3", (1, 128), (128, 128), "e4m3", variant="tma"),
        aot_spec(first, "e5m2", "e4m3", "tensor", "tensor", "e4m3", rounding="stochastic", variant="pointer"),
        aot_spec(first, "e4m3", "e4m3", "tensor", "tensor", "bf16", variant="tma", fast_accumulation=True),
    ]
    return specs
