"""Floating-point formats (numerics.md section 1).

A :class:`Format` describes a sign-exponent-mantissa grid by its bit counts and
the integer codes that the rounding kernels emit. The rounding code in
``ops/rounding.py`` is written once for any such grid, so the same code rounds
fp32 to E5M2, E4M3, and (for 16-bit master weights) fp16 and bf16.

The code of a finite magnitude is linear in the grid: for a value
``n * 2**(e - man_bits)`` with ``e >= emin`` the code is ``((e - emin) << man_bits) + n``
(this covers subnormals and the carry into the next binade), so "rounded above the
largest finite value" is simply ``code > max_code``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Format", "E4M3", "E5M2", "E8M0", "FP16", "BF16", "get_format", "FP8_FORMATS",
           "ROUNDINGS", "INPUT_DTYPES", "DTYPE_NAMES", "DTYPES_BY_NAME", "SEED_LIMIT", "check_seed", "derive_seed"]

# The rounding modes of every cast, product epilogue and optimizer update (numerics.md 2-3).
ROUNDINGS = ("nearest", "stochastic")
# High-precision dtypes the casts, products and attention take.
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Their names, as the torch.library ops take dtypes.
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
# Seeds of the Philox streams are ints in [0, SEED_LIMIT).
SEED_LIMIT = 2**63


_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def derive_seed(base: int, *indices: int) -> int:
    """The one derivation of a Philox seed in [0, 2**63) from a base seed and the indices of
    one use (a layer's call and cast role; an optimizer bucket and step): splitmix64 chained
    over them, so neighbouring indices give unrelated keys."""
    x = _splitmix64(base & _M64)
    for i in indices:
        x = _splitmix64(x ^ (i & _M64))
    return x >> 1


def check_seed(seed, allow_none: bool = False) -> None:
    """Raise unless ``seed`` is an int in [0, 2**63) (or None with ``allow_none``)."""
    if seed is None and allow_none:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**63){' or None' if allow_none else ''}, got {seed!r}")


@dataclass(frozen=True)
class Format:
    """A binary floating-point format with a sign bit.

    Attributes:
        name: short lower-case name ("e4m3", "e5m2", ...).
        exp_bits, man_bits: exponent and explicit mantissa bit counts.
        bias: exponent bias.
        max_code: code (without sign) of the largest finite magnitude.
        inf_code: code stored for +-Inf (equal to ``nan_code`` when the format has no inf).
        nan_code: code stored for NaN (sign bit added separately).
        torch_dtype: the torch dtype holding this format.
    """

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_code: int
    inf_code: int
    nan_code: int
    torch_dtype: torch.dtype

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value."""
        return (self.max_code >> self.man_bits) - self.bias

    @property
    def max(self) -> float:
        """Largest finite value."""
        man = self.max_code & ((1 << self.man_bits) - 1)
        return (1 + man / (1 << self.man_bits)) * 2.0**self.emax

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)

    @property
    def has_inf(self) -> bool:
        return self.inf_code != self.nan_code

    @property
    def sign_bit(self) -> int:
        return 1 << (self.exp_bits + self.man_bits)

    def __repr__(self) -> str:  # short, shows in error messages and tables
        return f"Format({self.name}: max={self.max:g}, min_subnormal={self.min_subnormal:g})"


E5M2 = Format("e5m2", 5, 2, 15, max_code=0x7B, inf_code=0x7C, nan_code=0x7F, torch_dtype=torch.float8_e5m2)
# OCP E4M3 "fn": no inf, S.1111.111 is NaN; Inf converts to NaN.
E4M3 = Format("e4m3", 4, 3, 7, max_code=0x7E, inf_code=0x7F, nan_code=0x7F, torch_dtype=torch.float8_e4m3fn)
# 16-bit targets of the same rounding code (master weights, numerics.md section 8).
FP16 = Format("fp16", 5, 10, 15, max_code=0x7BFF, inf_code=0x7C00, nan_code=0x7E00, torch_dtype=torch.float16)
BF16 = Format("bf16", 8, 7, 127, max_code=0x7F7F, inf_code=0x7F80, nan_code=0x7FC0, torch_dtype=torch.bfloat16)

FP8_FORMATS = {"e4m3": E4M3, "e5m2": E5M2}


@dataclass(frozen=True)
class _E8M0:
    """OCP MX scale type: 8 exponent bits, no sign, no mantissa; 0xFF is NaN."""

    name: str = "e8m0"
    bias: int = 127
    nan_code: int = 0xFF
    torch_dtype: torch.dtype = torch.float8_e8m0fnu
    max: float = 2.0**127
    min: float = 2.0**-127


E8M0 = _E8M0()


def get_format(fmt: "str | Format") -> Format:
    """Return the fp8 :class:`Format` named by ``fmt`` ("e4m3" / "e5m2", or a Format)."""
    if isinstance(fmt, Format):
        if fmt.name not in FP8_FORMATS:
            raise ValueError(f"fmt={fmt.name!r} is not an fp8 format; use one of {sorted(FP8_FORMATS)}")
        return fmt
    if isinstance(fmt, torch.dtype):
        for f in FP8_FORMATS.values():
            if f.torch_dtype == fmt:
                return f
    if isinstance(fmt, str) and fmt.lower() in FP8_FORMATS:
        return FP8_FORMATS[fmt.lower()]
    raise ValueError(f"unknown fp8 format {fmt!r}; use one of {sorted(FP8_FORMATS)} (or tf8.E4M3 / tf8.E5M2)")
