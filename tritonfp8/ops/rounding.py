"""Rounding, scale and random-bit primitives: the Triton device functions and
their pure-PyTorch twins, side by side (numerics.md sections 2 to 4).

Every op that produces a narrow float (the cast, the fused GEMM epilogue, the
optimizer's 16-bit master-weight update) rounds through :func:`round_to_code`
on the GPU/interpreter and :func:`round_to_code_reference` on the reference
backend. Both work on the fp32 bit pattern with integer operations only (the
Triton interpreter's fp32->fp8 conversion is wrong when rounding carries into the
exponent). The one exception: compiled sm_90+ nearest casts use the hardware
conversion, :func:`round_to_code_hw` with explicit fix-ups (numerics.md 3), or
:func:`hw_code` alone on chunks that cannot overflow and hold no Inf or NaN. The
result is the target format's integer code, stored through a uint8/uint16 view.

Random words (:func:`random_words_2d`, :func:`random_words_1d`, twin
:func:`random_words_reference`): the element at offset o of a row-major view takes
word o % 4 of Philox(seed, o // 4), so one Philox call serves 4 elements.

Rounding of a finite fp32 value ``v = sig * 2**(e - 23)``:

* ``e_eff = max(e, emin)``; the target quantum is ``2**(e_eff - man_bits)``;
  ``s = 23 - man_bits + (e_eff - e)`` source bits fall below it.
* ``q = sig >> s`` quanta are kept, the dropped bits are ``D = sig mod 2**s``.
* nearest: round up when ``D > 2**(s-1)``, or on a tie when ``q`` is odd.
* stochastic with a uniform 32-bit ``R``: round up when ``D + (R >> (32 - s)) >= 2**s``
  (``s <= 32``: exactly k = s random bits, as numerics.md asks); for ``s > 32``
  (only magnitudes under 1/512 of the smallest subnormal) the top 32 dropped bits
  are used:
  ``(D >> (s - 32)) + R >= 2**32``, biased by under ``2**-32`` of a quantum. The kernels
  compute both cases as one carry test, ``R > ~A`` with ``A`` the low word of
  ``(sig << 32) >> s`` (one funnel shift); the reference spells the two cases out.
* code = ``((e_eff - emin) << man_bits) + q + up`` (linear, see formats.py);
  ``code > max_code`` is overflow: saturate to ``max_code`` (and count) or
  become Inf (E5M2) / NaN (E4M3). NaN -> NaN, Inf -> Inf (E4M3: NaN); the sign
  is copied, so -0.0 and negative values that round to zero give -0.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from .. import backend as _backend
from ..formats import Format

_INF = float("inf")
# An inverse scale is clamped here so its reciprocal (the stored scale) stays a
# normal fp32 number: 2**-126 is the smallest one.
_MAX_INV_SCALE = 2.0**126
FP32_INF = tl.constexpr(_INF)
MAX_INV_SCALE = tl.constexpr(_MAX_INV_SCALE)

# ----------------------------------------------------------------------------
# Triton device functions
# ----------------------------------------------------------------------------


@triton.jit
def abs_nan_as_inf(x):
    """|x| with NaN mapped to +inf, so that a max over it reports any non-finite value."""
    return tl.where(x != x, FP32_INF, tl.abs(x))


@triton.jit
def round_to_code(
    x,
    rand,
    EXP_BITS: tl.constexpr,
    MAN_BITS: tl.constexpr,
    MAX_CODE: tl.constexpr,
    INF_CODE: tl.constexpr,
    NAN_CODE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SATURATE: tl.constexpr,
    IN_RANGE: tl.constexpr = False,
    COMPACT: tl.constexpr = True,
    FINITE: tl.constexpr = False,
):
    """Round fp32 ``x`` to the format's grid; returns (int32 code with sign, overflow flag).

    ``rand`` is a uint32 block of random bits (unused unless STOCHASTIC). The overflow
    flag marks finite inputs that rounded above the largest finite value. IN_RANGE: the
    caller knows every x is finite and cannot round above the largest finite value
    (stochastic: |x| <= max; nearest: |x| below the overflow midpoint), so the overflow,
    Inf and NaN fix-ups are left out (the flag is then all False). FINITE: the caller knows
    every x is finite: overflows are saturated (or made Inf / NaN) and flagged, the Inf and NaN
    fix-ups left out. COMPACT (fp8 and fp16 targets): fp32 subnormals take the normal-number
    formula (they round to zero either way), fewer instructions; the fp8 GEMM epilogue passes
    False, as its registers grow with it (sm_90).
    """
    EMIN: tl.constexpr = 2 - (1 << (EXP_BITS - 1))
    SIGN: tl.constexpr = 1 << (EXP_BITS + MAN_BITS)
    # An fp32 subnormal (biased exponent 0) drops this many bits or more below the target's
    # quantum; from 56 on (fp8, fp16) it rounds to zero whatever its significand, so the
    # normal-number formula (implicit bit set, exponent -127) gives it the right code (0).
    SUBNORMALS_VANISH: tl.constexpr = (23 - MAN_BITS) + (EMIN + 127) >= 56
    bits = x.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    biased = mag >> 23
    frac = mag & 0x7FFFFF
    # Three spellings of the same quantities, each the one ptxas schedules best where it is used
    # (sm_90: fewest instructions, and registers of the kernels around it; see the SASS report).
    if SUBNORMALS_VANISH and COMPACT:
        sig = frac | 0x800000
        e = biased - 127
        e_eff = tl.maximum(e, EMIN)
        below = e_eff - e  # bits dropped below the smallest exponent
        code_exp = e_eff - EMIN  # the code's exponent field
    elif SUBNORMALS_VANISH:
        sig = tl.where(biased == 0, frac, frac | 0x800000)
        e = tl.where(biased == 0, -126, biased - 127)
        e_eff = tl.maximum(e, EMIN)
        below = e_eff - e
        code_exp = e_eff - EMIN
    else:  # bf16: the count of dropped bits from the clamped biased exponent
        sig = tl.where(biased == 0, frac, frac | 0x800000)
        biased_eff = tl.maximum(biased, 1)  # fp32 subnormals share the smallest normal's exponent
        below = tl.maximum((EMIN + 127) - biased_eff, 0)
        code_exp = biased_eff + below - (EMIN + 127)
    shift = (23 - MAN_BITS) + below  # >= 13 (fp16), 20 / 21 (fp8); clamped below where a shift needs it
    if STOCHASTIC:
        # The dropped bits D aligned as numerics.md 2 uses them: D << (32 - shift) for shift <= 32,
        # D >> (shift - 32) above (the top 32 dropped bits), in one funnel shift of sig:0 (D = sig
        # once shift >= 24, and 0 for shift >= 56). Round up iff R plus them carries out of 32 bits:
        # R > ~aligned, the same as (R >> (32 - shift)) + D >= 2**shift (resp. D' + R >= 2**32).
        q = sig >> tl.minimum(shift, 31)
        aligned = ((sig.to(tl.uint64) << 32) >> tl.minimum(shift, 63).to(tl.uint64)).to(tl.uint32)
        up = rand.to(tl.uint32, bitcast=True) > (aligned ^ 0xFFFFFFFF)  # ~aligned (the interpreter's ~ fails on uint32)
    else:
        q = sig >> tl.minimum(shift, 31)
        dropped = sig - (q << tl.minimum(shift, 31))
        half = 1 << tl.minimum(shift - 1, 30)
        up = (dropped > half) | ((dropped == half) & ((q & 1) == 1))
    code = (code_exp << MAN_BITS) + q + up.to(tl.int32)
    if IN_RANGE:
        overflow = up & (mag < 0)  # never: |x| is in range
    else:
        if FINITE:
            overflow = code > MAX_CODE
        else:
            overflow = (mag < 0x7F800000) & (code > MAX_CODE)
        code = tl.where(overflow, MAX_CODE if SATURATE else INF_CODE, code)
        if not FINITE:
            code = tl.where(mag == 0x7F800000, INF_CODE, code)
            code = tl.where(mag > 0x7F800000, NAN_CODE, code)
    code = code | tl.where(bits < 0, SIGN, 0)
    return code, overflow


@triton.jit
def max_propagating_nan(a, b):
    """max(a, b), NaN if either is NaN: a reduction with it finds any NaN (tl.max would drop it)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def hw_code(x, EXP_BITS: tl.constexpr):
    """The hardware conversion's int32 code of fp32 ``x`` (compiled sm_90+: ``cvt.rn.satfinite``).

    Exact (the integer rounding's code) for every finite |x| below the overflow midpoint;
    :func:`round_to_code_hw` fixes up the rest."""
    if EXP_BITS == 5:
        return x.to(tl.float8e5).to(tl.uint8, bitcast=True).to(tl.int32)
    return x.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)


@triton.jit
def round_to_code_hw(x, EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, MAX_CODE: tl.constexpr,
                     INF_CODE: tl.constexpr, NAN_CODE: tl.constexpr, SATURATE: tl.constexpr,
                     MIDPOINT: tl.constexpr):
    """Twin of ``round_to_code(x, 0, ..., STOCHASTIC=False)`` through the hardware conversion.

    For compiled sm_90+ kernels only: there Triton converts fp32 straight to fp8 with
    ``cvt.rn.satfinite`` (IEEE round to nearest even, subnormals included); on sm_89 it
    converts through fp16 rounded toward zero (two roundings) and the interpreter's
    conversion is wrong (numerics.md 3), so those keep :func:`round_to_code`. What the
    conversion does differently is fixed up (numerics.md 3): it saturates silently, so
    overflow is a compare of |x| with the midpoint above the largest finite value (a tie
    overflows when the largest code is odd: ties go to the even neighbour); without
    SATURATE an overflow becomes INF_CODE; Inf (which it turns into max) becomes INF_CODE
    and NaN the NAN_CODE, both with x's sign. MIDPOINT: :func:`overflow_midpoint`.
    """
    SIGN: tl.constexpr = 1 << (EXP_BITS + MAN_BITS)
    code = hw_code(x, EXP_BITS)
    bits = x.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    sign = tl.where(bits < 0, SIGN, 0)
    if (MAX_CODE & 1) == 1:
        overflow = (mag >= MIDPOINT) & (mag < 0x7F800000)
    else:
        overflow = (mag > MIDPOINT) & (mag < 0x7F800000)
    if not SATURATE:
        code = tl.where(overflow, INF_CODE | sign, code)
    code = tl.where(mag == 0x7F800000, INF_CODE | sign, code)
    code = tl.where(mag > 0x7F800000, NAN_CODE | sign, code)
    return code, overflow


@triton.jit
def _interleave4(r0, r1, r2, r3, SHAPE: tl.constexpr):
    """[..., n] words w0..w3 -> [..., 4n] with element 4 q + w taking word w of counter q."""
    return tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), SHAPE)


@triton.jit
def random_words_2d(seed, offs_m, col0, K, ROWS: tl.constexpr, COLS: tl.constexpr, ALIGNED: tl.constexpr):
    """Random words of the [ROWS, COLS] elements (offs_m, col0 + arange(COLS)) of a row-major
    [*, K] tensor: element offset o = m * K + k takes word o % 4 of Philox(seed, o // 4)
    (numerics.md 2). ALIGNED (K % 4 == 0, col0 % 4 == 0): one Philox call per 4 elements;
    otherwise one per element, the same words."""
    if ALIGNED:
        q = col0 // 4 + tl.arange(0, COLS // 4)
        r0, r1, r2, r3 = tl.randint4x(seed, offs_m.to(tl.int64)[:, None] * (K // 4) + q[None, :])
        words = _interleave4(r0, r1, r2, r3, (ROWS, COLS))
    else:
        o = offs_m.to(tl.int64)[:, None] * K + (col0 + tl.arange(0, COLS))[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, o // 4)
        w = o % 4
        words = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return words


@triton.jit
def random_words_1d(seed, start, BLOCK: tl.constexpr):
    """Random words of the elements start .. start + BLOCK - 1 of a flat stream (start % 4 == 0):
    element o takes word o % 4 of Philox(seed, o // 4), one call per 4 elements."""
    r0, r1, r2, r3 = tl.randint4x(seed, start // 4 + tl.arange(0, BLOCK // 4))
    return _interleave4(r0, r1, r2, r3, (BLOCK,))


@triton.jit
def inv_scale_from_amax(amax, FMAX_MARGIN: tl.constexpr, POW2: tl.constexpr):
    """Current scaling: (inverse scale, scale) with ``scale ~= amax / FMAX_MARGIN``.

    A zero, NaN or Inf amax gives 1; the inverse is capped at 2**126; POW2 rounds
    the inverse down to a power of two so that scaling is exact.
    """
    usable = (amax > 0) & (amax < FP32_INF)
    inv = tl.math.div_rn(tl.zeros_like(amax) + FMAX_MARGIN, tl.where(usable, amax, 1.0))
    inv = tl.where(usable, tl.minimum(inv, MAX_INV_SCALE), 1.0)
    if POW2:
        inv = (inv.to(tl.int32, bitcast=True) & -8388608).to(tl.float32, bitcast=True)  # clear mantissa
    scale = tl.math.div_rn(tl.zeros_like(inv) + 1.0, inv)
    return inv, scale


@triton.jit
def inv_scale_from_scale(scale):
    """Delayed scaling: the inverse of a given (positive, finite) dequantization scale."""
    return tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale)


@triton.jit
def e8m0_from_amax(amax, EMAX: tl.constexpr, MAX_FRAC: tl.constexpr):
    """MX scale: the smallest power of two 2**X with amax <= fmt.max * 2**X.

    Returns (inverse scale 2**-X as fp32, E8M0 code X + 127 as int32). X is clamped
    to [-127, 127]; a zero or non-finite amax gives X = 0. Rounding the exponent up
    (not the OCP floor) means finite values never saturate.
    """
    bits = amax.to(tl.int32, bitcast=True)
    usable = (amax > 0) & (amax < FP32_INF)
    x_exp = (bits >> 23) - 127 - EMAX + ((bits & 0x7FFFFF) > MAX_FRAC).to(tl.int32)
    x_exp = tl.where(usable, tl.minimum(tl.maximum(x_exp, -127), 127), 0)
    inv = ((127 - x_exp) << 23).to(tl.float32, bitcast=True)
    return inv, x_exp + 127


# ----------------------------------------------------------------------------
# PyTorch reference twins
# ----------------------------------------------------------------------------


def round_to_code_reference(
    x: torch.Tensor, rand: torch.Tensor | None, fmt: Format, stochastic: bool, saturate: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Twin of :func:`round_to_code`: fp32 ``x`` -> (int32 code with sign, overflow mask).

    The same integer algorithm, written for speed on the CPU: int32 throughout (int64 only
    for the stochastic comparison, whose random word is 32 bits), biased exponents, and
    the shift capped where it cannot change the result (below).
    """
    bits = x.float().view(torch.int32)
    mag = bits & 0x7FFFFFFF
    biased = mag >> 23
    e_biased = biased.clamp(min=1)  # fp32 subnormals share the exponent of the smallest normal
    sig = (mag & 0x7FFFFF) | ((biased > 0).to(torch.int32) << 23)
    emin_biased = fmt.emin + 127
    below = (emin_biased - e_biased).clamp(min=0)  # bits dropped below the target's smallest exponent
    shift = below + (23 - fmt.man_bits)
    # sig < 2**24, so with 24 or more dropped bits nothing is kept (q = 0, dropped = sig); for
    # nearest, 25 or more also means dropped < half a quantum: capping the shift there is exact.
    kept_shift = shift.clamp(max=24 if stochastic else 25)
    q = sig >> kept_shift
    dropped = sig - (q << kept_shift)
    if stochastic:
        if rand is None:
            raise ValueError("stochastic rounding needs random bits")
        r = rand.to(torch.int64)
        s64 = shift.clamp(max=60).to(torch.int64)
        d64 = dropped.to(torch.int64)
        few = s64 <= 32
        lhs = torch.where(few, d64 + (r >> (32 - s64).clamp(min=0)), (d64 >> (s64 - 32).clamp(min=0)) + r)
        up = lhs >= torch.where(few, torch.bitwise_left_shift(1, s64), 1 << 32)
    else:
        half = torch.bitwise_left_shift(1, kept_shift - 1)
        up = (dropped > half) | ((dropped == half) & ((q & 1) == 1))
    code = ((e_biased + below - emin_biased) << fmt.man_bits) + q + up.to(torch.int32)
    finite = biased < 255
    overflow = finite & (code > fmt.max_code)
    code = torch.where(overflow, fmt.max_code if saturate else fmt.inf_code, code)
    code = torch.where(finite, code, fmt.nan_code)
    code = torch.where(mag == 0x7F800000, fmt.inf_code, code)
    code = code | ((bits >> 31) & fmt.sign_bit)
    return code, overflow


def codes_to_tensor(code: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Int codes -> a tensor of ``fmt.torch_dtype`` with exactly those bits."""
    if fmt.bits == 8:
        return code.to(torch.uint8).view(fmt.torch_dtype)
    # Inductor's CPU loops vectorize uint8 stores but not int16 ones: write the two bytes of
    # each 16-bit pattern and view the pairs as the 16-bit dtype (4-6x faster optimizer steps).
    low, high = (code & 0xFF).to(torch.uint8), ((code >> 8) & 0xFF).to(torch.uint8)
    pair = torch.stack([low, high] if sys.byteorder == "little" else [high, low], dim=-1)
    return pair.view(fmt.torch_dtype).squeeze(-1)


def decode_codes_reference(codes: torch.Tensor, fmt: Format) -> torch.Tensor:
    """8-bit codes (uint8, or an fp8 tensor's bits) -> their exact fp32 values, same shape.

    Built on the bit pattern (exponent re-biased, mantissa shifted; subnormals as m * 2**(emin - man_bits),
    exact), so a compiled caller gets vectorized integer code instead of a per-element fp8 conversion.
    """
    c = codes.view(torch.uint8).to(torch.int32)
    exp_field = (c >> fmt.man_bits) & ((1 << fmt.exp_bits) - 1)
    man = c & ((1 << fmt.man_bits) - 1)
    normal = ((exp_field + (127 - fmt.bias)) << 23) | (man << (23 - fmt.man_bits))
    subnormal = (man.float() * 2.0 ** (fmt.emin - fmt.man_bits)).view(torch.int32)
    bits = torch.where(exp_field > 0, normal, subnormal)
    magnitude = c & (fmt.sign_bit - 1)
    inf = torch.full_like(bits, 0x7F800000)
    nan = torch.full_like(bits, 0x7FC00000)
    if fmt.inf_code != fmt.nan_code:  # E5M2: all-ones exponent is Inf (mantissa 0) or NaN
        bits = torch.where(magnitude >= fmt.inf_code, torch.where(magnitude == fmt.inf_code, inf, nan), bits)
    else:  # E4M3: only S.1111.111 is NaN
        bits = torch.where(magnitude == fmt.nan_code, nan, bits)
    return (bits | ((c & fmt.sign_bit) << (31 - fmt.exp_bits - fmt.man_bits))).view(torch.float32)


@_backend.compiled_reference
def nonzero_and_flushed(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """int64 [2]: how many of x's values are nonzero, and how many of those got the code of
    +-0 in ``codes`` (uint8 fp8 codes of x, x's shape; bit 7 is the sign in E4M3 and E5M2).
    NaN counts as nonzero (it never becomes zero)."""
    nonzero = x != 0
    flushed = nonzero & ((codes & 0x7F) == 0)
    return torch.stack([nonzero.sum(), flushed.sum()])


# The decode as the CPU path runs it: one compiled loop on large tensors.
decode_codes = _backend.compiled_reference(decode_codes_reference)


@_backend.compiled_reference
def decode_codes_into(codes: torch.Tensor, fmt: Format, out: torch.Tensor) -> None:
    """``decode_codes`` written into ``out`` (fp32, codes' shape): a reused buffer skips the
    page faults of a fresh one (about 9 ms per 32 MB here), which cost more than the decode."""
    out.copy_(decode_codes_reference(codes, fmt))


def abs_max_reference(x: torch.Tensor, dim=None) -> torch.Tensor:
    """max |x| (over ``dim``, default all) in fp32, +inf where a NaN occurs; the twin of
    ``max(abs_nan_as_inf(x))``, from min and max (no |x| temporary: one or two passes over x)."""
    if dim is None:
        lo, hi = torch.aminmax(x)
    else:
        lo, hi = x.amin(dim=dim), x.amax(dim=dim)  # both propagate NaN
    amax = torch.maximum(lo.float().abs(), hi.float().abs())
    return torch.where(torch.isnan(amax), torch.full_like(amax, _INF), amax)


def inv_scale_from_amax_reference(amax: torch.Tensor, fmax_margin: float, pow2: bool):
    amax = amax.float()
    usable = (amax > 0) & torch.isfinite(amax)
    inv = torch.full_like(amax, fmax_margin) / torch.where(usable, amax, torch.ones_like(amax))
    inv = torch.where(usable, inv.clamp(max=_MAX_INV_SCALE), torch.ones_like(amax))
    if pow2:
        inv = (inv.view(torch.int32) & -8388608).view(torch.float32)
    return inv, 1.0 / inv


def inv_scale_from_scale_reference(scale: torch.Tensor) -> torch.Tensor:
    return 1.0 / scale.float()


def e8m0_from_amax_reference(amax: torch.Tensor, fmt: Format):
    amax = amax.float()
    bits = amax.view(torch.int32).to(torch.int64)
    usable = (amax > 0) & torch.isfinite(amax)
    x_exp = (bits >> 23) - 127 - fmt.emax + ((bits & 0x7FFFFF) > mx_max_frac(fmt)).to(torch.int64)
    x_exp = torch.where(usable, x_exp.clamp(-127, 127), torch.zeros_like(x_exp))
    inv = ((127 - x_exp) << 23).to(torch.int32).view(torch.float32)
    return inv, x_exp + 127


def mx_max_frac(fmt: Format) -> int:
    """fp32 mantissa field of the format's largest finite value (1.75 -> 0x600000)."""
    return (fmt.max_code & ((1 << fmt.man_bits) - 1)) << (23 - fmt.man_bits)


# ----------------------------------------------------------------------------
# Philox 4x32-10, the generator behind tl.randint / tl.randint4x
# ----------------------------------------------------------------------------

_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_M32 = 0xFFFFFFFF


def _mul_hi_lo_u32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of uint32 ``a`` and ``b`` (int64 tensors).

    torch's int64 multiply wraps modulo 2**64 (two's complement), so the product's 64 bits
    are exact even when it exceeds int64's range; the arithmetic shift's sign extension
    is masked off. (tests/test_stochastic.py checks the result against ``tl.randint4x``.)
    """
    p = b * a
    return (p >> 32) & _M32, p & _M32


def philox_reference(seed, offsets: torch.Tensor, n_rounds: int = 10):
    """Twin of ``tl.randint4x(seed, offsets)``: four int64 tensors holding uint32 values.

    The counter is (offset low word, offset high word, 0, 0), the key is (seed low
    word, seed high word), exactly as Triton's ``philox`` builds them. ``seed`` is an
    int or an int64 tensor of one element (a tensor keeps a compiled caller from
    specializing on the seed's value).
    """
    offsets = offsets.to(torch.int64)
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=offsets.device, dtype=torch.int64).reshape(())
        k0, k1 = seed & _M32, (seed >> 32) & _M32
    else:
        seed = int(seed)
        k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo_u32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo_u32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def overflow_midpoint(fmt: Format) -> int:
    """fp32 bits of the midpoint between ``fmt``'s largest finite value and the next grid step
    (464 for E4M3, 61440 for E5M2): nearest rounding overflows above it (at it too when the
    largest code is odd, as ties go to the even neighbour)."""
    import struct

    return struct.unpack("<i", struct.pack("<f", fmt.max + 2.0 ** (fmt.emax - fmt.man_bits) / 2))[0]


def random_words_reference(seed, numel: int, start=0, device=None) -> torch.Tensor:
    """Twin of :func:`random_words_1d` / :func:`random_words_2d`: the words (uint32 values in
    int64) of elements start .. start + numel - 1 of a flat stream, element o taking word
    o % 4 of Philox(seed, o // 4). ``start`` (an int, or an int64 [] tensor that keeps a
    compiled caller from specializing on it) must be a multiple of 4."""
    if isinstance(start, torch.Tensor):
        device = start.device
    elif start % 4:
        raise ValueError(f"random_words_reference: start must be a multiple of 4, got {start}")
    counters = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device) + start // 4
    return torch.stack(philox_reference(seed, counters), dim=-1).reshape(-1)[:numel]


def seed_tensor(seed: int, device=None) -> torch.Tensor:
    """A Philox seed as an int64 tensor [], the form compiled references take."""
    return torch.tensor(int(seed), dtype=torch.int64, device=device)
