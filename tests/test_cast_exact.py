"""The reference cast vs independent implementations, bit for bit.

Oracles: ml_dtypes (IEEE-style, non-saturating: E5M2 overflows to Inf, E4M3 to
NaN) and torch's own casts (E5M2 non-saturating; E4M3 saturating, but it turns
Inf into the largest finite value, which the contract forbids, so torch is
compared on finite values only for E4M3). The saturating mode's oracle is the
cast of the value clamped to [-max, max] (finite values only; Inf/NaN keep the
non-saturating result). NaN results are compared as NaN: torch and ml_dtypes
choose different NaN payloads.
"""
import ml_dtypes
import numpy as np
import pytest
import torch

import tritonfp8 as tf8
from conftest import reference

FORMATS = {"e5m2": (tf8.E5M2, ml_dtypes.float8_e5m2), "e4m3": (tf8.E4M3, ml_dtypes.float8_e4m3fn)}


def _oracle_ml_dtypes(x32: torch.Tensor, fmt, ml_type, saturate: bool) -> np.ndarray:
    v = x32.numpy()
    if saturate:
        v = np.where(np.isfinite(v), np.clip(v, -fmt.max, fmt.max), v).astype(np.float32)
    with np.errstate(invalid="ignore"):
        return v.astype(ml_type).view(np.uint8)


def _oracle_torch(x32: torch.Tensor, fmt, saturate: bool) -> tuple[np.ndarray, np.ndarray]:
    """torch's cast and the mask of elements where it is a valid oracle."""
    v = x32
    if saturate:
        v = torch.where(torch.isfinite(v), v.clamp(-fmt.max, fmt.max), v)
    valid = torch.ones_like(v, dtype=torch.bool)
    if fmt is tf8.E4M3:
        # torch's e4m3fn cast saturates overflow (so only the saturating mode matches) and maps Inf to max.
        valid = torch.isfinite(v) if saturate else torch.isfinite(v) & (v.abs() <= fmt.max)
    return v.to(fmt.torch_dtype).view(torch.uint8).numpy(), valid.numpy()


def _assert_bits_equal(got: np.ndarray, want: np.ndarray, x: torch.Tensor, fmt, what: str, valid=None):
    got_nan = (got & 0x7F) == fmt.nan_code if fmt is tf8.E4M3 else ((got & 0x7C) == 0x7C) & ((got & 0x03) != 0)
    want_nan = (want & 0x7F) == fmt.nan_code if fmt is tf8.E4M3 else ((want & 0x7C) == 0x7C) & ((want & 0x03) != 0)
    ok = np.where(want_nan, got_nan, got == want)
    if valid is not None:
        ok |= ~valid
    bad = np.flatnonzero(~ok)
    assert bad.size == 0, (
        f"{what}: {bad.size} mismatches, e.g. x={x.flatten()[bad[:5]].tolist()} got={got.flatten()[bad[:5]].tolist()} "
        f"want={want.flatten()[bad[:5]].tolist()}"
    )


def _reference_cast(x: torch.Tensor, fmt, saturate: bool) -> np.ndarray:
    with reference():
        return tf8.quantize(x, fmt, "nearest", "none", saturate=saturate).data.view(torch.uint8).numpy()


def _all_16bit(dtype) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def _hard_fp32_values(fmt) -> torch.Tensor:
    """At least 10^6 fp32 values: ties, neighbours of every power of two, subnormals,
    the overflow boundary, signed zeros, NaN, Inf, and random bit patterns."""
    g = torch.Generator().manual_seed(1234)
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt.torch_dtype).float()
    grid = grid[torch.isfinite(grid)].unique()  # every finite value, both signs
    ties = (grid[:-1] + grid[1:]) / 2  # exact in fp32
    parts = [grid, ties]
    for v in (grid, ties):  # their fp32 neighbours
        parts += [torch.nextafter(v, torch.tensor(float("inf"))), torch.nextafter(v, torch.tensor(-float("inf")))]
    pow2 = torch.ldexp(torch.ones(277), torch.arange(-149, 128))
    for v in (pow2, -pow2):
        parts += [v, torch.nextafter(v, torch.tensor(float("inf"))), torch.nextafter(v, torch.tensor(-float("inf")))]
    fmax = torch.tensor(fmt.max)
    overflow_edge = torch.tensor(fmt.max * (1 + 2.0 ** -(fmt.man_bits + 1)))  # max + half an ulp
    for v in (fmax, overflow_edge):
        near = v + torch.arange(-64, 65) * torch.finfo(torch.float32).eps * v
        parts += [near, -near]
    parts.append(torch.tensor([0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf")]))
    sub = torch.rand(200_000, generator=g) * fmt.min_normal * 2  # target subnormal range and just above
    parts += [sub, -sub]
    parts.append(torch.randint(-(2**31), 2**31, (400_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32))
    wide = torch.randn(300_000, generator=g) * torch.exp2(torch.randint(-30, 20, (300_000,), generator=g).float())
    parts.append(wide)
    x = torch.cat([p.flatten().float() for p in parts])
    assert x.numel() >= 1_000_000
    return x


@pytest.mark.parametrize("saturate", [True, False], ids=["sat", "nosat"])
@pytest.mark.parametrize("fmt_name", ["e5m2", "e4m3"])
@pytest.mark.parametrize("src", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_every_16bit_pattern(src, fmt_name, saturate):
    fmt, ml_type = FORMATS[fmt_name]
    x = _all_16bit(src)
    got = _reference_cast(x, fmt, saturate)
    x32 = x.float()  # exact
    _assert_bits_equal(got, _oracle_ml_dtypes(x32, fmt, ml_type, saturate), x32, fmt, "vs ml_dtypes")
    want, valid = _oracle_torch(x32, fmt, saturate)
    _assert_bits_equal(got, want, x32, fmt, "vs torch", valid)


@pytest.mark.parametrize("saturate", [True, False], ids=["sat", "nosat"])
@pytest.mark.parametrize("fmt_name", ["e5m2", "e4m3"])
def test_a_million_fp32_values(fmt_name, saturate):
    fmt, ml_type = FORMATS[fmt_name]
    x = _hard_fp32_values(fmt)
    got = _reference_cast(x, fmt, saturate)
    _assert_bits_equal(got, _oracle_ml_dtypes(x, fmt, ml_type, saturate), x, fmt, "vs ml_dtypes")
    want, valid = _oracle_torch(x, fmt, saturate)
    _assert_bits_equal(got, want, x, fmt, "vs torch", valid)


@pytest.mark.parametrize("fmt", [tf8.E5M2, tf8.E4M3], ids=["e5m2", "e4m3"])
def test_specials_and_counts(fmt):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), fmt.max * 1.2, -fmt.max * 1.2, fmt.max, 0.0, -0.0])
    with reference():
        sat = tf8.quantize(x, fmt, saturate=True)
        nosat = tf8.quantize(x, fmt, saturate=False)
    codes = sat.data.view(torch.uint8).tolist()
    inf_code = fmt.inf_code
    assert codes[0] == fmt.nan_code
    assert codes[1] == inf_code and codes[2] == inf_code | 0x80  # Inf stays Inf (E5M2) / becomes NaN (E4M3)
    assert codes[3] == fmt.max_code and codes[4] == fmt.max_code | 0x80  # finite overflow saturates
    assert codes[5] == fmt.max_code and codes[6] == 0 and codes[7] == 0x80
    nosat_codes = nosat.data.view(torch.uint8).tolist()
    assert nosat_codes[3] == inf_code and nosat_codes[4] == inf_code | 0x80
    # Only the two finite values that rounded above max are counted, in both modes.
    assert int(sat.saturated) == 2 and int(nosat.saturated) == 2
    # A non-finite value is never made finite, and amax reports it.
    assert torch.isinf(sat.amax)
    deq = sat.dequantize()
    assert torch.isnan(deq[0]) and not torch.isfinite(deq[1]) and not torch.isfinite(deq[2])


def test_interpreter_native_cast_is_not_trusted():
    """numerics.md section 3: 0.1198 rounds up across a binade to 0.125 in E5M2."""
    with reference():
        q = tf8.quantize(torch.tensor([0.1198]), "e5m2")
    assert q.dequantize().item() == 0.125
