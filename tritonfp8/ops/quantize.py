"""The fp8 cast: scale, amax, nearest / stochastic rounding, saturation count and
an optional transposed copy, in one pass over x (numerics.md sections 2 to 4).

Two implementations of the same numerics live here side by side:

* ``_quantize_kernel`` (Triton): one program per tile of the [M, K] view reads
  its tile of x once and writes every output of it: the fp8 codes, the scales of
  the groups it owns, the transposed codes, the amax and the saturation counts.
  Current scaling over a whole tensor, row or column needs the amax of data
  outside the tile, so those modes run ``_amax_kernel`` first (x is then read
  twice; block and MX scales are computed inside the tile).
* :func:`quantize_reference` (PyTorch): the whole tensor at once, written from
  the contract, shared by the CPU path, the tests and the benchmarks.

The public entry is :func:`quantize`; it dispatches through the
``tritonfp8::quantize`` torch.library op to the backend of x's device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import backend as _backend
from ..formats import E8M0, INPUT_DTYPES, ROUNDINGS, Format, check_seed, get_format
from ..tensor import FP8Tensor, Scaling
from .rounding import (
    abs_nan_as_inf,
    abs_max_reference,
    e8m0_from_amax,
    e8m0_from_amax_reference,
    hw_code,
    inv_scale_from_amax,
    inv_scale_from_amax_reference,
    inv_scale_from_scale,
    inv_scale_from_scale_reference,
    max_propagating_nan,
    mx_max_frac,
    overflow_midpoint,
    random_words_2d,
    random_words_reference,
    round_to_code,
    round_to_code_hw,
    round_to_code_reference,
    seed_tensor,
)
from .spec import capturing


# How a head (the normal output, or the transposed copy) finds its scale, in the
# coordinates of x's [M, K] view. Global modes read an amax computed beforehand;
# TILE_* modes compute the amax of groups that lie inside one tile.
MODE_NONE = tl.constexpr(0)
MODE_TENSOR = tl.constexpr(1)
MODE_ROW = tl.constexpr(2)
MODE_COL = tl.constexpr(3)
MODE_TILE_ROWS = tl.constexpr(4)  # groups of 1 x TILE_K
MODE_TILE_COLS = tl.constexpr(5)  # groups of TILE_M x 1
MODE_TILE = tl.constexpr(6)  # groups of TILE_M x TILE_K
_GLOBAL_MODES = (1, 2, 3)

# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


@triton.jit
def _amax_kernel(
    x_ptr, amax_ptr, amax_rows_ptr, amax_cols_ptr,  # pointers
    M, K,  # sizes
    stride_xm, stride_xk,  # strides
    ROWS: tl.constexpr, COLS: tl.constexpr, TILE_M: tl.constexpr, TILE_K: tl.constexpr,
):
    """Max |x| (NaN counted as +inf) over the tensor, and per row / per column on request."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * TILE_M + tl.arange(0, TILE_M)
    offs_k = pid_k * TILE_K + tl.arange(0, TILE_K)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    absx = abs_nan_as_inf(x.to(tl.float32))
    tl.atomic_max(amax_ptr, tl.max(tl.max(absx, axis=1), axis=0))
    if ROWS:
        tl.atomic_max(amax_rows_ptr + offs_m, tl.max(absx, axis=1), mask=offs_m < M)
    if COLS:
        tl.atomic_max(amax_cols_ptr + offs_k, tl.max(absx, axis=0), mask=offs_k < K)


@triton.jit
def _group_inv(amax, scale_ptrs, owner, scale_t_ptrs, ALSO_T: tl.constexpr, E8M0_SCALE: tl.constexpr,
               FMAX_MARGIN: tl.constexpr, POW2: tl.constexpr, EMAX: tl.constexpr, MX_MAX_FRAC: tl.constexpr):
    """The inverse scale of groups with max |x| ``amax`` (NaN counted as +inf); stores each group's
    scale (E8M0: its code) where ``owner``, and also at ``scale_t_ptrs`` with ALSO_T."""
    if E8M0_SCALE:
        inv, scale_code = e8m0_from_amax(amax, EMAX, MX_MAX_FRAC)
        stored = scale_code.to(tl.uint8)
    else:
        inv, stored = inv_scale_from_amax(amax, FMAX_MARGIN, POW2)
    tl.store(scale_ptrs, stored, mask=owner)
    if ALSO_T:
        tl.store(scale_t_ptrs, stored, mask=owner)
    return inv


@triton.jit
def _quantize_head(
    x, absx, rand, offs_m, offs_k, pid_m, pid_k, first_chunk, M, K,
    out_ptr, out_t_ptr, scale_ptr, scale_t_ptr, amax_ptr, amax_rows_ptr, amax_cols_ptr, span_col_amax, span_amax,
    chunk_inv, tensor_scale, stride_sm, stride_sk,
    MODE: tl.constexpr, GIVEN_SCALE: tl.constexpr, E8M0_SCALE: tl.constexpr, TRANSPOSED: tl.constexpr,
    ALSO_TRANSPOSED: tl.constexpr, HW_NEAREST: tl.constexpr, HW_MIDPOINT: tl.constexpr, BARE: tl.constexpr,
    CALLER_INV: tl.constexpr, BARE_SATURATES: tl.constexpr,
    EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, MAX_CODE: tl.constexpr,
    INF_CODE: tl.constexpr, NAN_CODE: tl.constexpr,
    STOCHASTIC: tl.constexpr, SATURATE: tl.constexpr, POW2: tl.constexpr,
    FMAX_MARGIN: tl.constexpr, EMAX: tl.constexpr, MX_MAX_FRAC: tl.constexpr,
):
    """Scale, round and store one output of a chunk of rows; returns its overflowed values (int32 0 / 1
    per element of the chunk, 0 outside the tensor).

    BARE: the chunk is known to hold no value that overflows, no Inf and no NaN, so nothing
    is fixed up or counted (BARE_SATURATES: no Inf and no NaN only; its overflows are saturated
    or made Inf / NaN and counted, ``round_to_code(FINITE=True)``): nearest casts on HW_NEAREST
    store the hardware conversion alone,
    the others round with ``round_to_code(IN_RANGE=True)``.

    ``span_col_amax`` [TILE_K] and ``span_amax`` [] are the amaxes of groups that span
    the whole tile (computed in a first pass). ``chunk_inv`` is the inverse scale the
    caller computed: MODE_TENSOR's one scale (once per program; ``tensor_scale`` is its
    scale, stored here) and, with CALLER_INV, the groups' scales of the FAST block modes
    (the caller stored them). TRANSPOSED stores x^T as a contiguous
    [K, M] tensor (the chunk is transposed in registers so the store stays coalesced).
    ALSO_TRANSPOSED stores the same codes both ways (to ``out_ptr`` and, as x^T, to
    ``out_t_ptr``; a computed tensor scale to ``scale_t_ptr`` too): the transposed copy
    of a cast whose two copies share their scale and their random words is the
    transpose of its codes.
    """
    in_m = offs_m < M
    in_k = offs_k < K
    y = x
    if MODE != MODE_NONE:
        # Index of each element's scale group, in the coordinates of x.
        if (MODE == MODE_ROW) or (MODE == MODE_TILE_ROWS):
            gm = offs_m[:, None]
        elif (MODE == MODE_TILE_COLS) or (MODE == MODE_TILE):
            gm = pid_m
        else:
            gm = 0
        if (MODE == MODE_COL) or (MODE == MODE_TILE_COLS):
            gk = offs_k[None, :]
        elif (MODE == MODE_TILE_ROWS) or (MODE == MODE_TILE):
            gk = pid_k
        else:
            gk = 0
        # Groups inside the tensor, and those whose scale this chunk writes (each exactly once).
        if (MODE == MODE_ROW) or (MODE == MODE_TILE_ROWS):
            valid = in_m[:, None]
        elif (MODE == MODE_COL) or (MODE == MODE_TILE_COLS):
            valid = in_k[None, :]
        else:
            valid = pid_m >= 0
        if MODE == MODE_TENSOR:
            owner = valid & (pid_m == 0) & (pid_k == 0) & first_chunk
        elif MODE == MODE_ROW:
            owner = valid & (pid_k == 0)
        elif MODE == MODE_COL:
            owner = valid & (pid_m == 0) & first_chunk
        elif MODE == MODE_TILE_ROWS:
            owner = valid
        else:
            owner = valid & first_chunk
        scale_ptrs = scale_ptr + gm * stride_sm + gk * stride_sk
        if CALLER_INV or (MODE == MODE_TENSOR):  # computed once per program / chunk by the kernel
            inv = chunk_inv
            if (MODE == MODE_TENSOR) and not GIVEN_SCALE:  # (the FAST block modes' are stored already)
                tl.store(scale_ptrs, tensor_scale, mask=owner)
                if ALSO_TRANSPOSED:  # the transposed copy shares it
                    tl.store(scale_t_ptr, tensor_scale, mask=owner)
        elif GIVEN_SCALE:
            inv = inv_scale_from_scale(tl.load(scale_ptrs, mask=valid, other=1.0))
        else:
            if MODE == MODE_ROW:
                amax = tl.load(amax_rows_ptr + offs_m, mask=in_m, other=0.0)[:, None]
            elif MODE == MODE_COL:
                amax = tl.load(amax_cols_ptr + offs_k, mask=in_k, other=0.0)[None, :]
            elif MODE == MODE_TILE_ROWS:
                amax = tl.max(absx, axis=1)[:, None]
            elif MODE == MODE_TILE_COLS:
                amax = span_col_amax[None, :]
            else:
                amax = span_amax
            inv = _group_inv(amax, scale_ptrs, owner, scale_ptrs, False, E8M0_SCALE, FMAX_MARGIN, POW2, EMAX,
                             MX_MAX_FRAC)
        y = x * inv
    if HW_NEAREST and BARE:
        code = hw_code(y, EXP_BITS)
        overflow = code < 0  # never: a code is 0..255
    elif HW_NEAREST:
        code, overflow = round_to_code_hw(y, EXP_BITS, MAN_BITS, MAX_CODE, INF_CODE, NAN_CODE, SATURATE, HW_MIDPOINT)
    else:
        code, overflow = round_to_code(y, rand, EXP_BITS, MAN_BITS, MAX_CODE, INF_CODE, NAN_CODE, STOCHASTIC,
                                       SATURATE, BARE and not BARE_SATURATES, FINITE=BARE and BARE_SATURATES)
    mask = in_m[:, None] & in_k[None, :]
    code8 = code.to(tl.uint8)  # transposed as bytes: a quarter of the shared-memory traffic of int32
    if TRANSPOSED:
        tl.store(out_ptr + offs_k[:, None] * M + offs_m[None, :], tl.trans(code8), mask=in_k[:, None] & in_m[None, :])
    else:
        tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], code8, mask=mask)
        if ALSO_TRANSPOSED:
            tl.store(out_t_ptr + offs_k[:, None] * M + offs_m[None, :], tl.trans(code8),
                     mask=in_k[:, None] & in_m[None, :])
    return (overflow & mask).to(tl.int32)


@triton.jit
def _tile_groups_inv(span_col_amax, span_amax, scale_ptr, scale_t_ptr, pid_m, pid_k, offs_k, K,
                     stride_sm, stride_sk, stride_tsm, stride_tsk, MODE: tl.constexpr, ALSO_T: tl.constexpr,
                     E8M0_SCALE: tl.constexpr, FMAX_MARGIN: tl.constexpr, POW2: tl.constexpr, EMAX: tl.constexpr,
                     MX_MAX_FRAC: tl.constexpr, FAST_LIMIT: tl.constexpr):
    """A head's groups that span the tile's rows (MODE_TILE: the tile; MODE_TILE_COLS: each column),
    from the first pass's amax: (inverse scale, stored here, with ALSO_T in the transposed copy's
    scales too; whether no scaled value of the tile can reach FAST_LIMIT)."""
    if MODE == MODE_TILE:
        inv = _group_inv(span_amax, scale_ptr + pid_m * stride_sm + pid_k * stride_sk, True,
                         scale_t_ptr + pid_m * stride_tsm + pid_k * stride_tsk, ALSO_T, E8M0_SCALE, FMAX_MARGIN, POW2,
                         EMAX, MX_MAX_FRAC)
        ok = span_amax * inv < FAST_LIMIT
    else:
        group_amax = span_col_amax[None, :]
        inv = _group_inv(group_amax, scale_ptr + pid_m * stride_sm + offs_k[None, :] * stride_sk, (offs_k < K)[None, :],
                         scale_ptr, False, E8M0_SCALE, FMAX_MARGIN, POW2, EMAX, MX_MAX_FRAC)
        ok = tl.max(tl.max(group_amax * inv, axis=1), axis=0) < FAST_LIMIT
    return inv, ok


@triton.jit
def _row_groups_inv(absx, offs_m, M, pid_k, scale_ptr, stride_sm, stride_sk, E8M0_SCALE: tl.constexpr,
                    FMAX_MARGIN: tl.constexpr, POW2: tl.constexpr, EMAX: tl.constexpr, MX_MAX_FRAC: tl.constexpr,
                    FAST_LIMIT: tl.constexpr):
    """A head's 1 x B groups, one per row of a chunk (|x| [CHUNK_M, TILE_K]): (inverse scale
    [CHUNK_M, 1], stored here; whether no scaled value of the chunk can reach FAST_LIMIT; each
    row's NaN-propagating max |x|). A NaN amax gets the scale of an Inf one (unusable: 1)."""
    row_peak = tl.reduce(absx, 1, max_propagating_nan)
    group_amax = row_peak[:, None]
    inv = _group_inv(group_amax, scale_ptr + offs_m[:, None] * stride_sm + pid_k * stride_sk, (offs_m < M)[:, None],
                     scale_ptr, False, E8M0_SCALE, FMAX_MARGIN, POW2, EMAX, MX_MAX_FRAC)
    bound = tl.reduce(tl.reduce(group_amax * inv, 1, max_propagating_nan), 0, max_propagating_nan)
    return inv, bound < FAST_LIMIT, row_peak  # (False for a NaN bound)


@triton.jit
def _checked_head(
    ok, x, absx, rand, offs_m, offs_k, pid_m, pid_k, first_chunk, M, K,
    out_ptr, out_t_ptr, scale_ptr, scale_t_ptr, amax_ptr, amax_rows_ptr, amax_cols_ptr, span_col_amax, span_amax,
    chunk_inv, tensor_scale, stride_sm, stride_sk,
    MODE: tl.constexpr, GIVEN_SCALE: tl.constexpr, E8M0_SCALE: tl.constexpr, TRANSPOSED: tl.constexpr,
    ALSO_TRANSPOSED: tl.constexpr, HW_NEAREST: tl.constexpr, HW_MIDPOINT: tl.constexpr, CALLER_INV: tl.constexpr,
    BARE_SATURATES: tl.constexpr,
    EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, MAX_CODE: tl.constexpr,
    INF_CODE: tl.constexpr, NAN_CODE: tl.constexpr,
    STOCHASTIC: tl.constexpr, SATURATE: tl.constexpr, POW2: tl.constexpr,
    FMAX_MARGIN: tl.constexpr, EMAX: tl.constexpr, MX_MAX_FRAC: tl.constexpr,
):
    """A FAST head: the chunk rounded without the fix-ups where ``ok`` (nothing in it can overflow,
    no Inf, no NaN; BARE_SATURATES: no Inf, no NaN), with them elsewhere; returns its overflow
    count (int32 [])."""
    count = tl.full([], 0, tl.int32)
    if ok:
        overflowed = _quantize_head(
            x, absx, rand, offs_m, offs_k, pid_m, pid_k, first_chunk, M, K,
            out_ptr, out_t_ptr, scale_ptr, scale_t_ptr, amax_ptr, amax_rows_ptr, amax_cols_ptr,
            span_col_amax, span_amax, chunk_inv, tensor_scale, stride_sm, stride_sk,
            MODE, GIVEN_SCALE, E8M0_SCALE, TRANSPOSED, ALSO_TRANSPOSED, HW_NEAREST, HW_MIDPOINT, True, CALLER_INV,
            BARE_SATURATES, EXP_BITS, MAN_BITS, MAX_CODE, INF_CODE, NAN_CODE, STOCHASTIC, SATURATE, POW2,
            FMAX_MARGIN, EMAX, MX_MAX_FRAC,
        )
        if BARE_SATURATES:
            count = tl.sum(tl.sum(overflowed, axis=1), axis=0)
    else:
        overflowed = _quantize_head(
            x, absx, rand, offs_m, offs_k, pid_m, pid_k, first_chunk, M, K,
            out_ptr, out_t_ptr, scale_ptr, scale_t_ptr, amax_ptr, amax_rows_ptr, amax_cols_ptr,
            span_col_amax, span_amax, chunk_inv, tensor_scale, stride_sm, stride_sk,
            MODE, GIVEN_SCALE, E8M0_SCALE, TRANSPOSED, ALSO_TRANSPOSED, HW_NEAREST, HW_MIDPOINT, False, CALLER_INV,
            False, EXP_BITS, MAN_BITS, MAX_CODE, INF_CODE, NAN_CODE, STOCHASTIC, SATURATE, POW2, FMAX_MARGIN, EMAX,
            MX_MAX_FRAC,
        )
        count = tl.sum(tl.sum(overflowed, axis=1), axis=0)
    return count


@triton.jit
def _load_chunk(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, DTYPE: tl.constexpr = tl.float32):
    """A chunk of x (0 outside the tensor) as DTYPE."""
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    return x.to(DTYPE)


@triton.jit(do_not_specialize=["seed"])
def _quantize_kernel(
    # pointers
    x_ptr, out_ptr, scale_ptr, out_t_ptr, scale_t_ptr,
    amax_ptr, amax_rows_ptr, amax_cols_ptr, saturated_ptr,
    # sizes
    M, K, seed,
    # strides
    stride_xm, stride_xk, stride_sm, stride_sk, stride_tsm, stride_tsk,
    # modes
    MODE: tl.constexpr, MODE_T: tl.constexpr, GIVEN_SCALE: tl.constexpr,
    TRANSPOSE: tl.constexpr, RECORD_AMAX: tl.constexpr, E8M0_SCALE: tl.constexpr, RAND4: tl.constexpr,
    HW_NEAREST: tl.constexpr, HW_MIDPOINT: tl.constexpr, FAST: tl.constexpr, FAST_LIMIT: tl.constexpr,
    BARE_SATURATES: tl.constexpr,
    # format and rounding
    EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, MAX_CODE: tl.constexpr,
    INF_CODE: tl.constexpr, NAN_CODE: tl.constexpr,
    STOCHASTIC: tl.constexpr, SATURATE: tl.constexpr, POW2: tl.constexpr,
    FMAX_MARGIN: tl.constexpr, EMAX: tl.constexpr, MX_MAX_FRAC: tl.constexpr,
    # tile: TILE_M x TILE_K per program, CHUNK_M rows at a time
    TILE_M: tl.constexpr, TILE_K: tl.constexpr, CHUNK_M: tl.constexpr,
):
    """Cast one TILE_M x TILE_K tile of x [M, K] (any strides) to fp8 codes.

    Pass 1 (only when a group spans more rows than a chunk: TILE_COLS / TILE modes)
    reduces the column and tile amax; pass 2 scales, rounds and stores every output
    of each chunk. Register use stays at one CHUNK_M x TILE_K chunk. Stochastic
    rounding draws one Philox call per 4 elements (RAND4: K % 4 == 0), and both
    outputs take each element's word; when they share the scale too (none / tensor
    modes) the transposed copy stores the same codes. HW_NEAREST (compiled sm_90+)
    rounds to nearest through the hardware conversion (:func:`round_to_code_hw`). The
    amax and the overflow counts accumulate per element in registers and are reduced
    once per tile (FAST: the chunks' peaks and a scalar count of the chunks that take
    the fix-ups).

    FAST (:func:`fast_path`: every mode but row / column current scaling; with a
    transposed copy, where it holds the same codes (none, tensor, square blocks) or where
    each copy's groups are bounded on their own (TWO_HEADS: 1 x B rows with B x 1 columns))
    bounds each chunk's scaled values before rounding them. Where the largest scaled
    |x| is below FAST_LIMIT (nearest: the overflow midpoint; stochastic: just above the
    largest finite value), no value of the chunk can overflow and none is Inf or NaN (the
    scaled values are bounded by the scaled max: rounding is monotonic), so the chunk is
    rounded without the fix-ups (``BARE``: the bare hardware conversion for HW_NEAREST);
    only other chunks take them. The bound is the scaled NaN-propagating max |x| of the
    chunk (none / tensor) or of each row group in it (1 x B blocks), or of the tile's
    groups from the first pass (B x 1 and B x B blocks: one check per tile). The block
    modes' scales are then computed once per chunk (rows) or per tile, here. BARE_SATURATES
    (stochastic 1 x B / B x 1 groups, see quantize_meta): FAST_LIMIT is +inf, so the check only
    excludes Inf and NaN, and the fix-up-free rounding saturates and counts its overflows.
    """
    GLOBAL_ONE: tl.constexpr = (MODE == MODE_NONE) or (MODE == MODE_TENSOR)
    SQUARE: tl.constexpr = MODE == MODE_TILE  # block shapes are (1, B), (B, 1) or (B, B)
    SAME_CODES: tl.constexpr = TRANSPOSE and (MODE == MODE_T) and (GLOBAL_ONE or (SQUARE and FAST))
    tl.static_assert(not FAST or ((MODE != MODE_ROW) and (MODE != MODE_COL)), "FAST: see fast_path")
    TWO_HEADS: tl.constexpr = FAST and TRANSPOSE and not SAME_CODES  # 1 x B with B x 1 groups (or B x 1 with 1 x B)
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_k = pid_k * TILE_K + tl.arange(0, TILE_K)
    SPANS: tl.constexpr = (MODE == MODE_TILE_COLS) or (MODE == MODE_TILE) or (
        TRANSPOSE and ((MODE_T == MODE_TILE_COLS) or (MODE_T == MODE_TILE))
    )
    span_col_amax = tl.zeros([TILE_K], dtype=tl.float32)
    if SPANS:  # max |x| per element of a chunk over the chunks (NaN-propagating), then across rows once
        # In x's own dtype where the tile has several chunks: a 16-bit max handles two values per
        # instruction, and converts exactly. (A one-chunk tile is cheaper in fp32.)
        ACC_DTYPE: tl.constexpr = x_ptr.dtype.element_ty if TILE_M > CHUNK_M else tl.float32
        span_acc = tl.zeros([CHUNK_M, TILE_K], dtype=ACC_DTYPE)
        for c in range(0, TILE_M, CHUNK_M):
            offs_m = pid_m * TILE_M + c + tl.arange(0, CHUNK_M)
            x = _load_chunk(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk, ACC_DTYPE)
            span_acc = max_propagating_nan(span_acc, tl.abs(x)).to(ACC_DTYPE)
        span_col_amax = tl.reduce(span_acc.to(tl.float32), 0, max_propagating_nan)
        span_col_amax = tl.where(span_col_amax != span_col_amax, float("inf"), span_col_amax)
    span_amax = tl.max(span_col_amax, axis=0)
    if RECORD_AMAX and SPANS:  # the first pass saw the whole tile: record its amax now (not live across pass 2)
        tl.atomic_max(amax_ptr, span_amax)
    amax_acc = tl.zeros([CHUNK_M, TILE_K], dtype=tl.float32)
    peak_amax = tl.full([], 0.0, tl.float32)  # FAST's amax: the max of its chunks' peaks (NaN-propagating)
    row_peaks = tl.zeros([CHUNK_M], dtype=tl.float32)  # 1 x B groups' amax, per row of a chunk (NaN-propagating)
    overflow_count = tl.full([], 0, tl.int32)  # FAST's overflows (SAME_CODES: the same both ways)
    overflow_count_t = tl.full([], 0, tl.int32)  # TWO_HEADS: the transposed copy's
    saturated = tl.zeros([CHUNK_M, TILE_K], dtype=tl.int32)
    saturated_t = tl.zeros([CHUNK_M, TILE_K], dtype=tl.int32)
    # The inverse scale FAST rounds with (MODE_TENSOR: once per program).
    fast_inv = tl.full([], 1.0, tl.float32)
    tensor_scale = 1.0
    if MODE == MODE_TENSOR:
        if GIVEN_SCALE:
            fast_inv = inv_scale_from_scale(tl.load(scale_ptr))
        else:
            fast_inv, tensor_scale = inv_scale_from_amax(tl.load(amax_ptr), FMAX_MARGIN, POW2)
    # Groups spanning the tile's rows: their scales and bound, once per tile (for either copy).
    tile_inv = fast_inv
    tile_ok = True
    if FAST and ((MODE == MODE_TILE_COLS) or (MODE == MODE_TILE)):
        tile_inv, tile_ok = _tile_groups_inv(span_col_amax, span_amax, scale_ptr, scale_t_ptr, pid_m, pid_k, offs_k, K,
                                             stride_sm, stride_sk, stride_tsm, stride_tsk, MODE, SAME_CODES,
                                             E8M0_SCALE, FMAX_MARGIN, POW2, EMAX, MX_MAX_FRAC, FAST_LIMIT)
    tile_inv_t = fast_inv
    tile_ok_t = True
    if TWO_HEADS and (MODE_T == MODE_TILE_COLS):
        tile_inv_t, tile_ok_t = _tile_groups_inv(span_col_amax, span_amax, scale_t_ptr, scale_t_ptr, pid_m, pid_k,
                                                 offs_k, K, stride_tsm, stride_tsk, stride_tsm, stride_tsk, MODE_T,
                                                 False, E8M0_SCALE, FMAX_MARGIN, POW2, EMAX, MX_MAX_FRAC, FAST_LIMIT)
    for c in range(0, TILE_M, CHUNK_M):
        offs_m = pid_m * TILE_M + c + tl.arange(0, CHUNK_M)
        x = _load_chunk(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk)
        if STOCHASTIC:  # each element's word of Philox(seed, offset in x's [M, K] view // 4)
            rand = random_words_2d(seed, offs_m, pid_k * TILE_K, K, CHUNK_M, TILE_K, RAND4)
        else:
            rand = 0
        if FAST:
            absx = tl.abs(x)
            if MODE == MODE_TILE_ROWS:  # 1 x B groups: one per row of the chunk
                inv, ok, row_peak = _row_groups_inv(absx, offs_m, M, pid_k, scale_ptr, stride_sm, stride_sk,
                                                    E8M0_SCALE, FMAX_MARGIN, POW2, EMAX, MX_MAX_FRAC, FAST_LIMIT)
                row_peaks = max_propagating_nan(row_peaks, row_peak)
            elif (MODE == MODE_TILE_COLS) or (MODE == MODE_TILE):
                inv = tile_inv
                ok = tile_ok
            else:  # none / tensor: the chunk's max |x| bounds it
                inv = fast_inv
                peak = tl.reduce(tl.reduce(absx, 1, max_propagating_nan), 0, max_propagating_nan)
                peak_amax = max_propagating_nan(peak_amax, peak)
                ok = peak * tl.abs(inv) < FAST_LIMIT  # False for a NaN peak; |inv|: a given scale may be < 0
            overflow_count += _checked_head(
                ok, x, absx, rand, offs_m, offs_k, pid_m, pid_k, c == 0, M, K,
                out_ptr, out_t_ptr, scale_ptr, scale_t_ptr, amax_ptr, amax_rows_ptr, amax_cols_ptr,
                span_col_amax, span_amax, inv, tensor_scale, stride_sm, stride_sk,
                MODE, GIVEN_SCALE, E8M0_SCALE, False, SAME_CODES, HW_NEAREST, HW_MIDPOINT, not GLOBAL_ONE,
                BARE_SATURATES, EXP_BITS, MAN_BITS, MAX_CODE, INF_CODE, NAN_CODE, STOCHASTIC, SATURATE, POW2,
                FMAX_MARGIN, EMAX, MX_MAX_FRAC,
            )
            if TWO_HEADS:  # the transposed copy's own groups and bound
                if MODE_T == MODE_TILE_ROWS:
                    inv_t, ok_t, _ = _row_groups_inv(absx, offs_m, M, pid_k, scale_t_ptr, stride_tsm, stride_tsk,
                                                     E8M0_SCALE, FMAX_MARGIN, POW2, EMAX, MX_MAX_FRAC, FAST_LIMIT)
                else:
                    inv_t = tile_inv_t
                    ok_t = tile_ok_t
                overflow_count_t += _checked_head(
                    ok_t, x, absx, rand, offs_m, offs_k, pid_m, pid_k, c == 0, M, K,
                    out_t_ptr, out_t_ptr, scale_t_ptr, scale_t_ptr, amax_ptr, amax_rows_ptr, amax_cols_ptr,
                    span_col_amax, span_amax, inv_t, tensor_scale, stride_tsm, stride_tsk,
                    MODE_T, GIVEN_SCALE, E8M0_SCALE, True, False, HW_NEAREST, HW_MIDPOINT, True,
                    BARE_SATURATES, EXP_BITS, MAN_BITS, MAX_CODE, INF_CODE, NAN_CODE, STOCHASTIC, SATURATE, POW2,
                    FMAX_MARGIN, EMAX, MX_MAX_FRAC,
                )
        else:
            absx = abs_nan_as_inf(x)
            if RECORD_AMAX and not SPANS:  # with SPANS the first pass has the tile's amax
                amax_acc = tl.maximum(amax_acc, absx)
            overflowed = _quantize_head(
                x, absx, rand, offs_m, offs_k, pid_m, pid_k, c == 0, M, K,
                out_ptr, out_t_ptr, scale_ptr, scale_t_ptr, amax_ptr, amax_rows_ptr, amax_cols_ptr, span_col_amax,
                span_amax, fast_inv, tensor_scale, stride_sm, stride_sk,
                MODE, GIVEN_SCALE, E8M0_SCALE, False, SAME_CODES, HW_NEAREST, HW_MIDPOINT, False, False, False,
                EXP_BITS, MAN_BITS, MAX_CODE, INF_CODE, NAN_CODE, STOCHASTIC, SATURATE, POW2, FMAX_MARGIN, EMAX,
                MX_MAX_FRAC,
            )
            saturated += overflowed
            if SAME_CODES:
                saturated_t += overflowed
            elif TRANSPOSE:
                saturated_t += _quantize_head(
                    x, absx, rand, offs_m, offs_k, pid_m, pid_k, c == 0, M, K,
                    out_t_ptr, out_t_ptr, scale_t_ptr, scale_t_ptr, amax_ptr, amax_rows_ptr, amax_cols_ptr,
                    span_col_amax, span_amax, fast_inv, tensor_scale, stride_tsm, stride_tsk,
                    MODE_T, GIVEN_SCALE, E8M0_SCALE, True, False, HW_NEAREST, HW_MIDPOINT, False, False, False,
                    EXP_BITS, MAN_BITS, MAX_CODE, INF_CODE, NAN_CODE, STOCHASTIC, SATURATE, POW2, FMAX_MARGIN, EMAX,
                    MX_MAX_FRAC,
                )
    if RECORD_AMAX and FAST and not SPANS:
        if MODE == MODE_TILE_ROWS:
            peak_amax = tl.reduce(row_peaks, 0, max_propagating_nan)
        tl.atomic_max(amax_ptr, tl.where(peak_amax != peak_amax, float("inf"), peak_amax))
    elif RECORD_AMAX and not SPANS:
        tl.atomic_max(amax_ptr, tl.max(tl.max(amax_acc, axis=1), axis=0))
    if FAST:
        tl.atomic_add(saturated_ptr, overflow_count)
        if TWO_HEADS:
            tl.atomic_add(saturated_ptr + 1, overflow_count_t)
        elif TRANSPOSE:
            tl.atomic_add(saturated_ptr + 1, overflow_count)
    else:
        tl.atomic_add(saturated_ptr, tl.sum(tl.sum(saturated, axis=1), axis=0))
        if TRANSPOSE:
            tl.atomic_add(saturated_ptr + 1, tl.sum(tl.sum(saturated_t, axis=1), axis=0))


# ----------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------

# Program tile (rows, cols) for modes whose groups do not constrain it, and the
# square one used when a transposed copy is emitted; a chunk holds about
# CHUNK_ELEMENTS values so that no configuration spills registers.
DEFAULT_TILE = (64, 128)
DEFAULT_TILE_TRANSPOSED = (64, 64)
# Stochastic casts with one scale and a transposed copy are issue-bound: two 64-row chunks per tile
# amortize the tile's end (its reductions, atomics) over twice the values (more registers: 164-180).
STOCHASTIC_TILE_TRANSPOSED = (128, 64)
CHUNK_ELEMENTS = 1024
FAST_CHUNK_ELEMENTS = 4096  # chunks of the FAST path (its per-chunk check is a block reduction)
ROW_GROUP_TILE_ELEMENTS = 4 * FAST_CHUNK_ELEMENTS  # a 1 x B block cast's tile: its end-of-tile reductions amortized
NUM_WARPS = 4


def _head_mode(scaling: Scaling) -> int:
    """The kernel mode that computes ``scaling``'s groups on x's [M, K] view."""
    if scaling.kind in ("block", "mx"):
        bm, bk = scaling.block
        return int(MODE_TILE_ROWS) if bm == 1 else int(MODE_TILE_COLS) if bk == 1 else int(MODE_TILE)
    return {"none": 0, "tensor": 1, "row": 2, "col": 3}[scaling.kind]


def quantize_tile(scaling: Scaling, transpose: bool, m: int = 1 << 30,
                  rounding: str = "nearest") -> tuple[int, int, int]:
    """(TILE_M, TILE_K, CHUNK_M) of the cast kernel for an [m, K] view; a block's size fixes the tiled dims."""
    if scaling.kind not in ("block", "mx"):
        tile_m, tile_k = DEFAULT_TILE_TRANSPOSED if transpose else DEFAULT_TILE
        if transpose and rounding == "stochastic" and scaling.kind in ("none", "tensor"):
            tile_m, tile_k = STOCHASTIC_TILE_TRANSPOSED
        if m < tile_m:  # few rows (a vector, per-head rows): no empty chunks, longer rows instead
            if not transpose:
                tile_k = min(1024, tile_k * tile_m // triton.next_power_of_2(m))
            tile_m = triton.next_power_of_2(m)
    else:
        size = max(scaling.block)
        bm, bk = scaling.block
        if transpose:
            tile_m, tile_k = size, size
        elif bm == 1:  # 1 x B groups, a row each: four FAST chunks of them (fewer rows: no empty chunks)
            tile_m, tile_k = min(ROW_GROUP_TILE_ELEMENTS // size, max(1, triton.next_power_of_2(m))), bk
        else:  # B x B: the group; B x 1: its free dim filled to 4096 elements per tile
            tile_m, tile_k = bm, bk if bk > 1 else 4096 // size
    return tile_m, tile_k, max(1, min(tile_m, CHUNK_ELEMENTS // tile_k))


def quantize_meta(fmt: Format, scaling: Scaling, rounding: str, saturate: bool, transpose: bool,
                  given_scale: bool, margin: int, power_of_two: bool, m: int = 1 << 30, k: int = 1 << 30,
                  hardware_nearest: bool = False) -> dict:
    """The constexpr arguments of ``_quantize_kernel`` for an [m, k] input; ``hardware_nearest``:
    round to nearest through the hardware conversion (see :func:`hardware_nearest`)."""
    mode = _head_mode(scaling)
    mode_t = _head_mode(scaling.transposed()) if transpose else 0
    tile_m, tile_k, chunk_m = quantize_tile(scaling, transpose, m, rounding)
    needs_prepass = not given_scale and (mode in _GLOBAL_MODES or mode_t in _GLOBAL_MODES)
    hw = hardware_nearest and rounding == "nearest"
    fast = fast_path(mode, mode_t, transpose, given_scale)
    # Stochastic row / column block groups under a computed scale that is no power of two: max |x|
    # times the inverse scale exceeds the largest value by an fp32 ulp in about 1 group of 11, which
    # can round up; most chunks would miss the fix-up-free path, so it saturates and counts itself
    # and the chunk check only excludes Inf and NaN.
    row_col = {int(MODE_TILE_ROWS), int(MODE_TILE_COLS)}
    bare_saturates = (fast and rounding == "stochastic" and not scaling.is_mx and not power_of_two
                      and (mode in row_col or (transpose and mode_t in row_col)))
    if fast:  # a chunk's check is a block reduction (or none), so the chunks are larger
        # (smaller when both copies' own groups are live and the rounding is the integer one: up to
        # 255 registers otherwise, and fp32 inputs of stochastic 128 x 1 casts spilled at 2048)
        two_heads = transpose and mode_t != mode and not hw
        shrink = (4 if rounding == "stochastic" else 2) if two_heads else 1
        chunk_m = max(1, min(tile_m, FAST_CHUNK_ELEMENTS // shrink // tile_k))
    return dict(
        MODE=mode, MODE_T=mode_t, GIVEN_SCALE=given_scale, TRANSPOSE=transpose,
        RECORD_AMAX=not needs_prepass, E8M0_SCALE=scaling.is_mx, RAND4=k % 4 == 0,
        HW_NEAREST=hw, HW_MIDPOINT=overflow_midpoint(fmt), FAST=fast,
        FAST_LIMIT=math.inf if bare_saturates else fast_limit(fmt, rounding), BARE_SATURATES=bare_saturates,
        EXP_BITS=fmt.exp_bits, MAN_BITS=fmt.man_bits, MAX_CODE=fmt.max_code,
        INF_CODE=fmt.inf_code, NAN_CODE=fmt.nan_code,
        STOCHASTIC=rounding == "stochastic", SATURATE=saturate, POW2=power_of_two,
        FMAX_MARGIN=fmt.max * 2.0**-margin, EMAX=fmt.emax, MX_MAX_FRAC=mx_max_frac(fmt),
        TILE_M=tile_m, TILE_K=tile_k, CHUNK_M=chunk_m,
    )


def fast_path(mode: int, mode_t: int, transpose: bool, given_scale: bool = False) -> bool:
    """Whether the cast kernel bounds each chunk's scaled values and rounds the chunks that
    cannot overflow without the fix-ups (its FAST path): no scale, a tensor scale and block
    scales (a row, column or square group). With a transposed copy: where it holds the same codes
    (both copies share every group: none, tensor, square blocks), or where each copy's groups are
    bounded on their own (1 x B with B x 1). Row and column current scaling read a prepass amax
    per row / column, which bounds nothing before the chunk is read; given block scales (which
    the public op refuses) take the general path, as the FAST path computes its scales."""
    if mode in (int(MODE_ROW), int(MODE_COL)) or (given_scale and mode not in (int(MODE_NONE), int(MODE_TENSOR))):
        return False  # (the block modes' FAST path computes its scales: a given one takes the general path)
    if not transpose or (mode_t == mode and mode in (int(MODE_NONE), int(MODE_TENSOR), int(MODE_TILE))):
        return True
    # 1 x B groups with the transposed copy's B x 1 ones (or the other way round): each bounded on its own
    return {mode, mode_t} == {int(MODE_TILE_ROWS), int(MODE_TILE_COLS)}


def fast_limit(fmt: Format, rounding: str) -> float:
    """The kernel's FAST check: a chunk whose scaled max |x| is below this holds no value that
    can round above the largest finite one (nearest: the overflow midpoint; stochastic: the
    next fp32 above the largest finite value, which rounds down or stays). An fp32 number."""
    if rounding == "nearest":
        return torch.tensor(overflow_midpoint(fmt), dtype=torch.int32).view(torch.float32).item()
    return torch.tensor(fmt.max, dtype=torch.float32).nextafter(torch.tensor(math.inf)).item()


def _empty_scale(scaling: Scaling, m: int, k: int, device) -> torch.Tensor:
    shape = scaling.scale_shape(m, k)
    if scaling.is_mx:
        return torch.empty(shape, dtype=torch.uint8, device=device).view(E8M0.torch_dtype)
    return torch.empty(shape, dtype=torch.float32, device=device)


# Per CUDA device: whether the hardware nearest conversion passed its probe (hardware_nearest).
_HARDWARE_NEAREST: dict = {}


def hardware_nearest(device) -> bool:
    """Whether compiled casts on ``device`` round to nearest through the hardware conversion.

    Yes on sm_90 and newer once a probe agreed with the integer rounding bit for bit (every
    bf16 pattern and the fp32 boundary cases, both formats, both saturation modes; run once
    per device, on the first nearest cast). sm_89 converts fp32 through fp16 rounded toward
    zero (two roundings), the interpreter's conversion is wrong: both keep the integer path.
    ``meta`` tensors stand for an sm_90 launch (the AOT compile and the SASS report).
    """
    device = torch.device(device)
    if device.type == "meta":
        return True
    if device.type != "cuda" or torch.version.hip is not None or _backend.triton_interprets():
        return False  # ROCm's conversion is not the one numerics.md describes
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _HARDWARE_NEAREST:  # once per device: every compiled nearest cast asks
        if torch.cuda.get_device_capability(index) < (9, 0):
            _HARDWARE_NEAREST[index] = False
        elif capturing() or torch.cuda.is_current_stream_capturing():
            return False  # the probe must run (a CUDA graph capture, recorded launches): integer path until then
        else:
            _HARDWARE_NEAREST[index] = _probe_hardware_nearest(torch.device("cuda", index))
    return _HARDWARE_NEAREST[index]


def _nearest_probe_values() -> torch.Tensor:
    """Every bf16 bit pattern as fp32, and fp32 values at each format's rounding boundaries
    (ties and their neighbours at the overflow midpoint, in the subnormal range, at zero)."""
    from ..formats import E4M3, E5M2

    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    edges = []
    for fmt in (E4M3, E5M2):
        midpoint = torch.tensor(overflow_midpoint(fmt), dtype=torch.int32).view(torch.float32).item()
        for v in (midpoint, fmt.max, fmt.min_subnormal / 2, fmt.min_subnormal * 1.5, fmt.min_normal):
            edges += [v, float(torch.tensor(v).nextafter(torch.tensor(0.0))), float(torch.tensor(v).nextafter(
                torch.tensor(float("inf"))))]
    edges = torch.tensor(edges, dtype=torch.float32)
    values = torch.cat([patterns, edges, -edges])
    pad = (-values.numel()) % 256
    return torch.cat([values, torch.zeros(pad)]).reshape(-1, 256)


def _probe_hardware_nearest(device) -> bool:
    """The hardware nearest path against the integer one on :func:`_nearest_probe_values`."""
    import warnings

    from ..formats import E4M3, E5M2

    x = _nearest_probe_values().to(device)
    none = Scaling.parse("none")
    for fmt in (E4M3, E5M2):
        for saturate in (True, False):
            try:
                hw = _quantize_triton(x, fmt, "nearest", none, 0, saturate, False, None, 0, False, hardware=True)
            except Exception as exc:  # the conversion did not compile or run here: the integer path stays
                why = f"failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            else:
                integer = _quantize_triton(x, fmt, "nearest", none, 0, saturate, False, None, 0, False, hardware=False)
                if torch.equal(hw[0].view(torch.uint8), integer[0].view(torch.uint8)) and torch.equal(hw[3], integer[3]):
                    continue
                why = "disagrees with the integer rounding"
            warnings.warn(
                f"tritonfp8: the hardware fp8 conversion on {torch.cuda.get_device_name(device)} {why} "
                f"({fmt.name}, saturate={saturate}); nearest casts use the integer path (correct, slower). "
                "Please report this with the GPU and driver version.", RuntimeWarning, stacklevel=3)
            return False
    return True


def _quantize_triton(x, fmt, rounding, scaling, seed, saturate, transpose, scale, margin, power_of_two,
                     hardware: Optional[bool] = None):
    """Launch the cast kernels on x [M, K]; ``hardware``: round to nearest through the hardware
    conversion (None: where :func:`hardware_nearest` says it is exact)."""
    m, k = x.shape
    device = x.device
    if hardware is None:
        hardware = rounding == "nearest" and hardware_nearest(device)
    meta = quantize_meta(fmt, scaling, rounding, saturate, transpose, scale is not None, margin, power_of_two, m, k,
                         hardware)
    out = torch.empty((m, k), dtype=torch.uint8, device=device)
    out_scale = scale.clone() if scale is not None else _empty_scale(scaling, m, k, device)
    if scaling.kind == "none":
        out_scale = torch.ones((), dtype=torch.float32, device=device)
    if transpose:
        out_t = torch.empty((k, m), dtype=torch.uint8, device=device)
        out_scale_t = scale.clone() if scale is not None else _empty_scale(scaling, k, m, device)
        if scaling.kind == "none":
            out_scale_t = torch.ones((), dtype=torch.float32, device=device)
    else:
        out_t = torch.empty((0, 0), dtype=torch.uint8, device=device)
        out_scale_t = torch.empty((0,), dtype=torch.float32, device=device)
    amax = torch.zeros((), dtype=torch.float32, device=device)
    saturated = torch.zeros((2,), dtype=torch.int32, device=device)
    modes = (meta["MODE"], meta["MODE_T"])
    amax_rows = torch.zeros((m,) if int(MODE_ROW) in modes else (1,), dtype=torch.float32, device=device)
    amax_cols = torch.zeros((k,) if int(MODE_COL) in modes else (1,), dtype=torch.float32, device=device)
    tile_m, tile_k = meta["TILE_M"], meta["TILE_K"]
    grid = (triton.cdiv(m, tile_m), triton.cdiv(k, tile_k))
    if not meta["RECORD_AMAX"]:
        _amax_kernel[grid](
            x_ptr=x, amax_ptr=amax, amax_rows_ptr=amax_rows, amax_cols_ptr=amax_cols,
            M=m, K=k, stride_xm=x.stride(0), stride_xk=x.stride(1),
            ROWS=int(MODE_ROW) in modes, COLS=int(MODE_COL) in modes, TILE_M=tile_m, TILE_K=tile_k,
            num_warps=NUM_WARPS,
        )
    # Scale strides in x's coordinates; the transposed copy's scale is laid out on [K, M].
    def strides(s, transposed):
        if s.dim() < 2:
            return 0, 0
        return (s.stride(1), s.stride(0)) if transposed else (s.stride(0), s.stride(1))

    stride_sm, stride_sk = strides(out_scale, False)
    stride_tsm, stride_tsk = strides(out_scale_t, True)
    scale_arg = out_scale.view(torch.uint8) if scaling.is_mx else out_scale
    scale_t_arg = out_scale_t.view(torch.uint8) if (scaling.is_mx and transpose) else out_scale_t
    _quantize_kernel[grid](
        x_ptr=x, out_ptr=out, scale_ptr=scale_arg, out_t_ptr=out_t, scale_t_ptr=scale_t_arg,
        amax_ptr=amax, amax_rows_ptr=amax_rows, amax_cols_ptr=amax_cols, saturated_ptr=saturated,
        M=m, K=k, seed=seed,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_sm=stride_sm, stride_sk=stride_sk, stride_tsm=stride_tsm, stride_tsk=stride_tsk,
        **meta, num_warps=NUM_WARPS,
    )
    return [out.view(fmt.torch_dtype), out_scale, amax, saturated, out_t.view(fmt.torch_dtype), out_scale_t]


# ----------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------


def _groups_view(x: torch.Tensor, gm: int, gk: int) -> torch.Tensor:
    """x [R, C] zero-padded to multiples of (gm, gk) and viewed as [ceil(R/gm), gm, ceil(C/gk), gk].

    Each scale group is then one [i, :, j, :] slice, so a group's scale broadcasts over it
    (padding zeros change no amax).
    """
    r, c = x.shape
    pad_r, pad_c = -(-r // gm) * gm - r, -(-c // gk) * gk - c
    if pad_r or pad_c:
        x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_r))
    return x.reshape(-(-r // gm), gm, -(-c // gk), gk)


def _transposed_copy(t: torch.Tensor) -> torch.Tensor:
    """t^T as a new contiguous tensor (never t itself, as .contiguous() would give for [1, K])."""
    return t.t().clone(memory_format=torch.contiguous_format)


# What a call of the element-wise cast emits: codes of x, codes of the transposed copy
# (still in x's orientation), or both from the same scaled values (the same codes).
EMIT_NORMAL, EMIT_TRANSPOSED, EMIT_BOTH = "normal", "transposed", "both"


@_backend.compiled_reference
def _round_codes_reference(x, inv, seed, fmt, stochastic: bool, saturate: bool, emit: str):
    """The element-wise cast: ``x * inv`` rounded once to ``fmt``.

    x: [M, K] fp32 / bf16 / fp16, contiguous; inv: fp32 [] inverse scale (1 when the caller
    applied group scales already). Stochastic rounding of element [m, k] takes word o % 4 of
    Philox(seed, o // 4), o = m * K + k, for either copy (numerics.md 2).
    Returns [codes [M, K], overflow count, codes of the transposed copy [M, K] (still in x's
    orientation), overflow count] (uint8 codes, int32 [] counts; the outputs ``emit`` leaves
    out are empty / zero; with EMIT_BOTH the copy's codes are x's). The caller transposes:
    inside a dynamic-shape graph Inductor's transposed store took minutes to compile for
    some shapes. Runs compiled on large CPU tensors (one fused loop per output), else eagerly.
    """
    y = x.float() * inv
    rand = random_words_reference(seed, x.numel(), device=x.device).reshape(x.shape) if stochastic else None
    code, over = round_to_code_reference(y, rand, fmt, stochastic, saturate)
    codes, overflow = code.to(torch.uint8), over.sum().to(torch.int32)
    none = torch.empty((0, 0), dtype=torch.uint8, device=x.device)
    zero = torch.zeros((), dtype=torch.int32, device=x.device)
    if emit == EMIT_NORMAL:
        return [codes, overflow, none, zero]
    if emit == EMIT_TRANSPOSED:
        return [none, zero, codes, overflow]
    return [codes, overflow, codes, overflow]


def _quantize_head_reference(x, amax, seed, fmt, scaling, stochastic, saturate, given_scale, margin,
                             power_of_two, emit):
    """Quantize x [M, K] with ``scaling`` on x's axes -> [codes, scale, overflow, codes_t, overflow_t].

    ``amax`` is max |x| over the whole tensor (the "tensor" scaling's group); E8M0 scales
    come back as uint8 codes; ``emit`` as for :func:`_round_codes_reference`.
    """
    m, k = x.shape
    one = torch.ones((), dtype=torch.float32, device=x.device)
    y, inv = x, one
    if scaling.kind == "none":
        scale = one
    elif given_scale is not None and scaling.kind == "tensor":
        scale = given_scale.clone()
        inv = inv_scale_from_scale_reference(scale)
    elif scaling.kind == "tensor":
        inv, scale = inv_scale_from_amax_reference(amax, fmt.max * 2.0**-margin, power_of_two)
    else:  # one scale per group: x * inv in fp32 here, then the rounding with inv = 1 (exact)
        gm, gk = scaling.group_shape(m, k)
        groups = _groups_view(x, gm, gk)
        n_gm, n_gk = groups.shape[0], groups.shape[2]
        if given_scale is not None:
            scale = given_scale.clone()
            group_inv = inv_scale_from_scale_reference(scale)
        elif scaling.is_mx:
            group_inv, code = e8m0_from_amax_reference(abs_max_reference(groups, (1, 3)), fmt)
            scale = code.to(torch.uint8)
        else:
            group_inv, scale = inv_scale_from_amax_reference(
                abs_max_reference(groups, (1, 3)), fmt.max * 2.0**-margin, power_of_two)
        y = (groups.float() * group_inv.reshape(n_gm, 1, n_gk, 1)).reshape(n_gm * gm, n_gk * gk)[:m, :k]
        y = y.contiguous()
    codes, overflow, codes_t, overflow_t = _round_codes_reference(y, inv, seed, fmt, stochastic, saturate, emit)
    if emit != EMIT_NORMAL:
        codes_t = _transposed_copy(codes_t)
    return codes, scale.contiguous(), overflow, codes_t, overflow_t


def quantize_reference(x, fmt, rounding, scaling, seed, saturate, transpose, scale, margin, power_of_two):
    """Pure-PyTorch twin of the cast kernel on a 2-D x [M, K] (M, K >= 1).

    Returns [data [M, K], scale, amax [], saturated [2] (normal, transposed),
    data_t [K, M] contiguous (or empty), scale_t (or empty)]. The element-wise rounding
    runs compiled on large CPU tensors (:func:`_round_codes_reference`), with the same bits.

    The transposed copy is computed in x's orientation: x^T's groups under ``scaling`` are
    x's groups under ``scaling.transposed()``, and element [k, m] of x^T takes the random
    word of x's element [m, k] (the same draw). With one scale for the whole tensor both
    copies are the same codes, from one call.
    """
    x = x.contiguous()
    stochastic = rounding == "stochastic"
    device = x.device
    seed_t = seed_tensor(seed, device)
    amax = abs_max_reference(x)

    def head(head_scaling, emit):
        return _quantize_head_reference(x, amax, seed_t, fmt, head_scaling, stochastic, saturate, scale, margin,
                                        power_of_two, emit)

    if transpose and scaling.kind in ("none", "tensor"):
        data, out_scale, sat, data_t, sat_t = head(scaling, EMIT_BOTH)
        scale_t = out_scale.clone()
    else:
        data, out_scale, sat, _, _ = head(scaling, EMIT_NORMAL)
        if transpose:
            _, scale_t, _, data_t, sat_t = head(scaling.transposed(), EMIT_TRANSPOSED)
            scale_t = scale_t.t().contiguous()
        else:
            data_t = torch.empty((0, 0), dtype=torch.uint8, device=device)
            scale_t = torch.empty((0,), dtype=torch.float32, device=device)
            sat_t = torch.zeros((), dtype=torch.int32, device=device)
    if scaling.is_mx:
        out_scale = out_scale.view(E8M0.torch_dtype)
        scale_t = scale_t.view(E8M0.torch_dtype) if transpose else scale_t
    return [data.view(fmt.torch_dtype), out_scale, amax, torch.stack([sat, sat_t]), data_t.view(fmt.torch_dtype), scale_t]


# ----------------------------------------------------------------------------
# torch.library op and the public function
# ----------------------------------------------------------------------------


@torch.library.custom_op("tritonfp8::quantize", mutates_args=())
def quantize_op(
    x: torch.Tensor, fmt: str, rounding: str, scaling: str, seed: int, saturate: bool, transpose: bool,
    scale: Optional[torch.Tensor], margin: int, power_of_two: bool,
) -> list[torch.Tensor]:
    """The cast on a 2-D x [M, K] with M, K >= 1; see :func:`quantize`."""
    args = (x, get_format(fmt), rounding, Scaling.parse(scaling), seed, saturate, transpose, scale, margin, power_of_two)
    if _backend.resolve(x.device) != "torch":
        return _quantize_triton(*args)
    return quantize_reference(*args)


@quantize_op.register_fake
def _(x, fmt, rounding, scaling, seed, saturate, transpose, scale, margin, power_of_two):
    f = get_format(fmt)
    s = Scaling.parse(scaling)
    m, k = x.shape

    def scale_like(sc, rows, cols):
        if sc.kind == "none":
            return x.new_empty((), dtype=torch.float32)
        dtype = E8M0.torch_dtype if sc.is_mx else torch.float32
        return x.new_empty(sc.scale_shape(rows, cols), dtype=dtype)

    data_t = x.new_empty((k, m) if transpose else (0, 0), dtype=f.torch_dtype)
    scale_t = scale_like(s, k, m) if transpose else x.new_empty((0,), dtype=torch.float32)
    return [
        x.new_empty((m, k), dtype=f.torch_dtype), scale_like(s, m, k), x.new_empty((), dtype=torch.float32),
        x.new_empty((2,), dtype=torch.int32), data_t, scale_t,
    ]


def _validate(x, fmt, rounding, scaling, seed, transpose, scale, margin):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quantize expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        hint = " (convert float64 to float32 first: rounding through float32 would round twice)" if x.dtype == torch.float64 else ""
        raise TypeError(f"quantize takes float32, bfloat16 or float16 tensors, got {x.dtype}{hint}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; use one of {ROUNDINGS}")
    if scaling.kind not in ("none", "tensor") and x.dim() < 2:
        raise ValueError(
            f"scaling {scaling} groups the [M, K] view of a tensor and needs at least 2 dimensions, "
            f"got a {x.dim()}-d tensor of shape {tuple(x.shape)}; use scaling='tensor' or reshape to [M, K]"
        )
    if transpose and x.dim() < 2:
        raise ValueError(f"transpose=True needs at least 2 dimensions, got shape {tuple(x.shape)}")
    if rounding == "stochastic":
        if seed is None:
            raise ValueError("rounding='stochastic' needs seed=<int> (e.g. the step number); the same seed gives the same bits")
        check_seed(seed)
    if not isinstance(margin, int) or isinstance(margin, bool):
        raise TypeError(f"margin must be an int (powers of two of headroom), got {margin!r}")
    if scale is not None:
        if scaling.kind not in ("tensor", "row", "col"):
            raise ValueError(f"scale= (delayed scaling) works with scaling 'tensor', 'row' or 'col', not {scaling}")
        if transpose and scaling.kind != "tensor":
            raise ValueError("transpose=True with a given row/col scale is not supported: the transposed copy needs its own scales")
        k = x.shape[-1] if x.dim() else 1
        want = scaling.scale_shape(math.prod(x.shape[:-1]), k)
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != want:
            got = f"{scale.dtype} {tuple(scale.shape)}" if isinstance(scale, torch.Tensor) else type(scale).__name__
            raise ValueError(f"scale for scaling {scaling} on [{math.prod(x.shape[:-1])}, {k}] must be a float32 tensor of shape {want}, got {got}")
        if scale.device != x.device:
            raise ValueError(f"scale is on {scale.device} but x is on {x.device}")


def _empty_result(x, fmt, scaling, transpose, m, k, scale):
    """Outputs for a tensor with no elements (no kernel runs)."""
    def ones(sc, rows, cols):
        if scale is not None:
            return scale.clone()
        if sc.kind in ("none", "tensor"):
            return torch.ones((), dtype=torch.float32, device=x.device)
        if sc.is_mx:
            return torch.full(sc.scale_shape(rows, cols), 127, dtype=torch.uint8, device=x.device).view(E8M0.torch_dtype)
        return torch.ones(sc.scale_shape(rows, cols), dtype=torch.float32, device=x.device)

    data_t = torch.empty((k, m), dtype=fmt.torch_dtype, device=x.device) if transpose else None
    return [
        torch.empty((m, k), dtype=fmt.torch_dtype, device=x.device), ones(scaling, m, k),
        torch.zeros((), dtype=torch.float32, device=x.device), torch.zeros((2,), dtype=torch.int32, device=x.device),
        data_t, ones(scaling, k, m) if transpose else None,
    ]


def quantize(
    x: torch.Tensor,
    fmt="e5m2",
    rounding: str = "nearest",
    scaling="none",
    seed: Optional[int] = None,
    saturate: bool = True,
    transpose: bool = False,
    *,
    scale: Optional[torch.Tensor] = None,
    margin: int = 0,
    power_of_two: bool = False,
) -> FP8Tensor:
    """Quantize x to fp8: ``x ~= q.data * q.scale``, rounding once from x's dtype.

    Args:
        x: float32 / bfloat16 / float16 tensor of any shape ``[..., K]``; scales are
            described on its 2-D view ``[M, K]`` (M = product of leading dims).
            Any strides (a 2-D transposed view is read in place).
        fmt: "e5m2" or "e4m3" (or ``tf8.E5M2`` / ``tf8.E4M3``).
        rounding: "nearest" (ties to even) or "stochastic" (exact, Philox keyed by
            (seed, element offset)).
        scaling: "none" (scale 1), "tensor" ([]), "row" ([M, 1]), "col" ([1, K]),
            a block (bm, bk) such as (1, 128) -> [M, ceil(K/128)] or (128, 128) ->
            [ceil(M/128), ceil(K/128)], or "mx" (1 x 32 blocks, E8M0 power-of-two
            scale [M, ceil(K/32)]).
        seed: int in [0, 2**63); required for stochastic rounding.
        saturate: finite values that round above ``fmt.max`` become +-max (True) or
            Inf (E5M2) / NaN (E4M3) (False). Either way they are counted.
        transpose: also emit ``q.transposed``, x^T [K, M] quantized with the same
            scaling applied to x^T, from the same pass (for the backward products).
        scale: delayed scaling: use this fp32 dequantization scale (shape as for the
            scaling; "tensor", "row" or "col") instead of one from x's amax.
        margin: current scaling leaves 2**margin of headroom: scale = amax / (max * 2**-margin).
        power_of_two: round current scales to powers of two (scaling is then exact).

    Returns:
        :class:`FP8Tensor` with data (x's shape), scale, amax ([] fp32, max |x|,
        +inf if x has NaN/Inf), saturated ([] int32) and transposed.
    """
    fmt = get_format(fmt)
    scaling = Scaling.parse(scaling)
    _validate(x, fmt, rounding, scaling, seed, transpose, scale, margin)
    shape = x.shape
    k = shape[-1] if x.dim() else 1
    m = math.prod(shape[:-1])
    if x.numel() == 0:
        outs = _empty_result(x, fmt, scaling, transpose, m, k, scale)
    else:
        x2d = x if x.dim() == 2 else x.reshape(m, k)
        outs = quantize_op(
            x2d, fmt.name, rounding, scaling.spec(), 0 if seed is None else seed, saturate, transpose,
            scale, margin, power_of_two,
        )
    data, out_scale, amax, saturated, data_t, scale_t = outs
    transposed = None
    if transpose:
        transposed = FP8Tensor(data_t, scale_t, fmt, scaling, amax, saturated[1])
    return FP8Tensor(data.reshape(shape), out_scale, fmt, scaling, amax, saturated[0], transposed)


# ----------------------------------------------------------------------------
# Ahead-of-time compile specs (tritonfp8.aot)
# ----------------------------------------------------------------------------


def aot_specs():
    """The cast kernel in every scaling mode, with and without the transposed copy, each
    specialized as the JIT specializes a launch on a contiguous [4096, 4096] input."""
    from ..formats import E4M3, E5M2
    from .spec import GPU_TARGETS, launched_spec

    _SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

    def launch(fmt, scaling, rounding, transpose, saturate=True, dtype=torch.float32, m=4096, hardware=False):
        sc = Scaling.parse(scaling)
        x = torch.empty((m, 4096), dtype=dtype, device="meta")
        return lambda: _quantize_triton(x, fmt, rounding, sc, 1234, saturate, transpose, None, 0, False, hardware)

    def spec(fmt, scaling, rounding, transpose, saturate=True, dtype=torch.float32, m=4096, hardware=False):
        sc = Scaling.parse(scaling)
        tile_m, tile_k, _ = quantize_tile(sc, transpose, m, rounding)
        name = (f"quantize[{fmt.name},{sc},{rounding}{',T' if transpose else ''}{'' if saturate else ',nosat'},"
                f"{_SHORT_NAMES[dtype]},tile={tile_m}x{tile_k}{',hw' if hardware else ''}]")
        # the hardware nearest conversion runs on sm_90+ only (hardware_nearest); sm_89 runs the integer path
        return launched_spec(name, launch(fmt, scaling, rounding, transpose, saturate, dtype, m, hardware),
                             kernel=_quantize_kernel, targets=(90, 100) if hardware else GPU_TARGETS)

    specs = [
        spec(E4M3, scaling, "stochastic", transpose)
        for scaling in ("none", "tensor", "row", "col", (1, 128), (128, 1), (128, 128), "mx")
        for transpose in (False, True)
    ]
    nearest = [
        dict(fmt=E5M2, scaling="none", saturate=False, dtype=torch.bfloat16),
        dict(fmt=E5M2, scaling=(1, 128), transpose=True, dtype=torch.float16),
        dict(fmt=E5M2, scaling="mx", transpose=True),
        dict(fmt=E4M3, scaling="tensor", transpose=True, dtype=torch.bfloat16),
    ]
    specs += [spec(rounding="nearest", hardware=hw, **{"transpose": False, **case})
              for case in nearest for hw in (False, True)]
    specs.append(spec(E4M3, "row", "stochastic", False, m=2))  # few rows: 1 x 1024 chunks
    specs.append(launched_spec("quantize_amax[rows,cols]", launch(E4M3, "row", "nearest", True), kernel=_amax_kernel))
    return specs
