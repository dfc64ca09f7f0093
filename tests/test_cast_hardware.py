"""The hardware nearest conversion of compiled sm_90+ casts (rounding.round_to_code_hw).

No GPU here, so three things are shown on the CPU and the rest is left to the GPU:
* its fix-ups are right: ``cvt.rn.satfinite`` (IEEE round to nearest even, saturating
  to +-max, Inf to +-max, NaN to NaN) modelled with torch's own conversion, then the
  fix-ups with the kernel's constants, give the integer rounding bit for bit on the
  probe values (every bf16 pattern and the boundary cases);
* the kernel function itself, interpreted, flags overflow exactly as the integer path
  and fixes up what the fix-ups decide (the interpreter's conversion is wrong elsewhere);
* where it is used: sm_90+ only, never in the interpreter, never for stochastic casts.
On a GPU the probe (quantize._probe_hardware_nearest) compares the kernel's two paths
once per device and falls back to the integer path if they differ; the GPU test run
(perf/gpu_check.sh) compares every cast with the reference.
"""
import pytest
import torch
import triton
import triton.language as tl

import tritonfp8 as tf8
from conftest import KERNEL_DEVICE
from tritonfp8.ops import quantize as q
from tritonfp8.ops.rounding import overflow_midpoint, round_to_code_hw, round_to_code_reference


@triton.jit
def _round_hw_kernel(x_ptr, code_ptr, overflow_ptr, n, EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr,
                     MAX_CODE: tl.constexpr, INF_CODE: tl.constexpr, NAN_CODE: tl.constexpr, SATURATE: tl.constexpr,
                     MIDPOINT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    code, overflow = round_to_code_hw(tl.load(x_ptr + offs, mask=mask, other=0.0), EXP_BITS, MAN_BITS, MAX_CODE,
                                      INF_CODE, NAN_CODE, SATURATE, MIDPOINT)
    tl.store(code_ptr + offs, code, mask=mask)
    tl.store(overflow_ptr + offs, overflow.to(tl.int32), mask=mask)


def _satfinite_rn(x: torch.Tensor, fmt) -> torch.Tensor:
    """A model of cvt.rn.satfinite: clamp to +-max (Inf too), then round to nearest even (NaN stays NaN)."""
    clamped = torch.where(torch.isnan(x), x, x.clamp(-fmt.max, fmt.max))
    return clamped.to(fmt.torch_dtype).view(torch.uint8).to(torch.int32)


def _hw_model(x: torch.Tensor, fmt, saturate: bool):
    """round_to_code_hw on the model conversion: the kernel's fix-ups, written the same way."""
    sign_bit = 1 << (fmt.exp_bits + fmt.man_bits)
    code = _satfinite_rn(x, fmt)
    bits = x.view(torch.int32)
    mag = bits & 0x7FFFFFFF
    sign = torch.where(bits < 0, sign_bit, 0)
    midpoint = overflow_midpoint(fmt)
    finite = mag < 0x7F800000
    overflow = finite & ((mag >= midpoint) if fmt.max_code & 1 else (mag > midpoint))
    if not saturate:
        code = torch.where(overflow, fmt.inf_code | sign, code)
    code = torch.where(mag == 0x7F800000, fmt.inf_code | sign, code)
    code = torch.where(mag > 0x7F800000, fmt.nan_code | sign, code)
    return code, overflow


def test_overflow_midpoint_is_max_plus_half_its_ulp():
    as_float = lambda bits: torch.tensor(bits, dtype=torch.int32).view(torch.float32).item()  # noqa: E731
    assert as_float(overflow_midpoint(tf8.E4M3)) == 464.0
    assert as_float(overflow_midpoint(tf8.E5M2)) == 61440.0


def test_probe_values_cover_the_boundaries():
    probe = q._nearest_probe_values()
    assert probe.dim() == 2 and probe.shape[1] == 256
    v = probe.reshape(-1)
    for fmt in (tf8.E4M3, tf8.E5M2):
        mid = torch.tensor(overflow_midpoint(fmt), dtype=torch.int32).view(torch.float32)
        for value in (mid, -mid, mid.nextafter(torch.tensor(0.0)), mid.nextafter(torch.tensor(1e9)),
                      torch.tensor(fmt.min_subnormal / 2)):
            assert (v == value).any(), (fmt.name, value)
    assert torch.isnan(v).any() and torch.isinf(v).any() and (v == float("-inf")).any()
    assert v.numel() >= 1 << 16


@pytest.mark.parametrize("saturate", [True, False])
@pytest.mark.parametrize("fmt", [tf8.E4M3, tf8.E5M2], ids=["e4m3", "e5m2"])
def test_fixups_of_the_hardware_conversion_give_the_integer_rounding(fmt, saturate):
    x = q._nearest_probe_values().reshape(-1)
    code, overflow = _hw_model(x, fmt, saturate)
    want, want_overflow = round_to_code_reference(x, None, fmt, False, saturate)
    bad = (code != want.to(torch.int32)).nonzero().reshape(-1)
    assert bad.numel() == 0, [(x[i].item(), code[i].item(), want[i].item()) for i in bad[:8]]
    assert torch.equal(overflow, want_overflow)


@pytest.mark.parametrize("saturate", [True, False])
@pytest.mark.parametrize("fmt", [tf8.E4M3, tf8.E5M2], ids=["e4m3", "e5m2"])
def test_the_kernel_function_flags_and_fixes_up_like_the_integer_rounding(fmt, saturate):
    """round_to_code_hw itself, run by Triton's interpreter. Its overflow flag must be the
    integer rounding's on every probe value; its code wherever the interpreter's own fp8
    conversion is not involved or is exact: Inf and NaN, the non-saturating overflow (the
    fix-ups decide those), and values already on the grid. (Elsewhere the interpreter's
    conversion is wrong, numerics.md 3, and does not saturate: the GPU run checks those.)"""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt.torch_dtype).float()
    x = torch.cat([q._nearest_probe_values().reshape(-1), grid[torch.isfinite(grid)]])
    code = torch.empty(x.numel(), dtype=torch.int32)
    overflow = torch.empty(x.numel(), dtype=torch.int32)
    dev = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    code_d, overflow_d = dev(code), dev(overflow)
    _round_hw_kernel[(triton.cdiv(x.numel(), 1024),)](
        dev(x), code_d, overflow_d, x.numel(), fmt.exp_bits, fmt.man_bits, fmt.max_code, fmt.inf_code, fmt.nan_code,
        saturate, overflow_midpoint(fmt), BLOCK=1024)
    code, overflow = code_d.cpu(), overflow_d.cpu().bool()
    want, want_overflow = round_to_code_reference(x, None, fmt, False, saturate)
    assert torch.equal(overflow, want_overflow)
    assert want_overflow.any() and (~want_overflow).any()
    decided = ~torch.isfinite(x) | (want_overflow if not saturate else torch.zeros_like(want_overflow))
    on_grid = torch.isfinite(x) & (x.to(fmt.torch_dtype).float() == x) & ~want_overflow
    checked = decided | on_grid
    assert checked.sum() > 256
    bad = (checked & (code != want.to(torch.int32))).nonzero().reshape(-1)
    assert bad.numel() == 0, [(x[i].item(), code[i].item(), want[i].item()) for i in bad[:8]]


def test_without_the_fixups_the_model_conversion_differs():
    """The fix-ups are needed: the bare conversion saturates Inf and overflows silently."""
    x = q._nearest_probe_values().reshape(-1)
    bare = _satfinite_rn(x, tf8.E5M2)
    want, _ = round_to_code_reference(x, None, tf8.E5M2, False, False)
    assert (bare != want.to(torch.int32)).any()


def test_the_hardware_path_is_used_only_where_it_is_exact():
    assert not q.hardware_nearest("cpu")
    assert q.hardware_nearest("meta")  # meta launches stand for sm_90 (AOT, SASS report)
    meta = q.quantize_meta(tf8.E4M3, tf8.Scaling.parse("tensor"), "stochastic", True, False, False, 0, False,
                           hardware_nearest=True)
    assert not meta["HW_NEAREST"]
    meta = q.quantize_meta(tf8.E4M3, tf8.Scaling.parse("tensor"), "nearest", True, False, False, 0, False,
                           hardware_nearest=True)
    assert meta["HW_NEAREST"]
