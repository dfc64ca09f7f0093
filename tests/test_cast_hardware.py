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


def _fast_nearest_input(fmt, scale: float, rows: int = 128, cols: int = 128) -> torch.Tensor:
    """x [rows, cols]: values of the format's grid times ``scale`` (so x / scale is on the grid,
    where the interpreter's conversion is exact), and in rows 40-43 (one chunk of 32 rows) an
    overflow each way, an Inf and a NaN."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt.torch_dtype).float()
    grid = grid[torch.isfinite(grid)]
    g = torch.Generator().manual_seed(0)
    x = grid[torch.randint(0, grid.numel(), (rows, cols), generator=g)] * scale
    x[40, 5], x[41, 6], x[42, 7], x[43, 8] = fmt.max * 4 * scale, float("inf"), float("nan"), -fmt.max * 4 * scale
    return x


@pytest.mark.parametrize("transpose", [False, True], ids=["", "+T"])
@pytest.mark.parametrize("scaling", ["none", "tensor"])
@pytest.mark.parametrize("fmt", [tf8.E4M3, tf8.E5M2], ids=["e4m3", "e5m2"])
def test_fast_nearest_chunks_store_the_bare_conversion_and_the_rest_fix_up(fmt, scaling, transpose):
    """The kernel's FAST path with hardware nearest (no or one tensor scale), interpreted: chunks whose
    scaled max is below the overflow midpoint store the bare conversion, the chunk with an
    overflow, Inf and NaN takes the fix-ups. On values that stay on the grid the interpreter's
    conversion is exact, so the codes, the overflow counts and the amax must equal the
    reference's, and the transposed copy must be the transpose of the codes."""
    scale = torch.tensor(2.0**-3) if scaling == "tensor" else None  # a power of two: x / scale stays on the grid
    x = _fast_nearest_input(fmt, 1.0 if scale is None else scale.item())
    sc = tf8.Scaling.parse(scaling)
    meta = q.quantize_meta(fmt, sc, "nearest", True, transpose, scale is not None, 0, False, *x.shape,
                           hardware_nearest=True)
    assert meta["HW_NEAREST"] and meta["CHUNK_M"] * meta["TILE_K"] == q.FAST_CHUNK_ELEMENTS
    dev = x.to(KERNEL_DEVICE)
    got = q._quantize_triton(dev, fmt, "nearest", sc, 0, True, transpose, None if scale is None else
                             scale.to(KERNEL_DEVICE), 0, False, hardware=True)
    want = q.quantize_reference(x, fmt, "nearest", sc, 0, True, transpose, scale, 0, False)
    codes, want_codes = got[0].cpu().view(torch.uint8), want[0].view(torch.uint8)
    on_grid = torch.isfinite(x) & (x.abs() <= fmt.max * (1.0 if scale is None else scale.item()))
    assert torch.equal(codes[on_grid], want_codes[on_grid])
    inf_nan = ~torch.isfinite(x)  # the fix-ups decide these
    assert torch.equal(codes[inf_nan], want_codes[inf_nan])
    assert torch.equal(got[3].cpu(), want[3]) and got[3][0] == 2  # two overflows, counted by the slow chunk
    assert got[2].item() == float("inf") == want[2].item()  # the amax, NaN counted as inf
    if transpose:
        assert torch.equal(got[4].cpu().view(torch.uint8), codes.t())


def _block_grid_input(fmt, scaling, rows: int, cols: int) -> torch.Tensor:
    """x [rows, cols] whose scale groups each hold values of the format's grid times 2**k (k per
    group, from -6 to 6) and ±fmt.max * 2**k, so that every group's inverse scale is exactly 2**-k
    (max / amax; MX: the power of two) and the scaled values stay on the grid, where the
    interpreter's conversion is exact; a NaN in one group and an Inf in another (k = 0 there)."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt.torch_dtype).float()
    grid = grid[torch.isfinite(grid)]
    g = torch.Generator().manual_seed(1)
    x = grid[torch.randint(0, grid.numel(), (rows, cols), generator=g)]
    gm, gk = tf8.Scaling.parse(scaling).group_shape(rows, cols)
    for r in range(0, rows, gm):
        for c in range(0, cols, gk):
            special = r <= 5 < r + gm and c <= 3 < c + gk or r <= 200 < r + gm and c <= 90 < c + gk
            k = 0 if special else int(torch.randint(-6, 7, (), generator=g))
            x[r, c] = fmt.max if (r + c) % 2 else -fmt.max
            x[r:r + gm, c:c + gk] *= 2.0**k
    x[5, 3], x[200, 90] = float("nan"), float("inf")
    return x


@pytest.mark.parametrize("scaling,transpose", [((1, 128), False), ((128, 1), False), ((128, 128), False),
                                                ((128, 128), True), ("mx", False)], ids=str)
@pytest.mark.parametrize("fmt", [tf8.E4M3, tf8.E5M2], ids=["e4m3", "e5m2"])
def test_fast_block_nearest_stores_the_bare_conversion_and_the_rest_fix_up(fmt, scaling, transpose):
    """Block and MX scales with hardware nearest, interpreted: the chunks (tiles) whose groups'
    scaled max is below the overflow midpoint store the bare conversion of x times the group's
    inverse scale, those with the NaN and the Inf take the fix-ups. On grid values (power-of-two
    scales) the codes, scales, counts and amax must equal the reference's; a (128, 128) transposed
    copy (the same groups) is the transpose of the codes. (Other transposed copies have other
    groups, whose scales are no powers of two here: the general path, tested in test_cast_kernel.)"""
    x = _block_grid_input(fmt, scaling, 260, 200)
    sc = tf8.Scaling.parse(scaling)
    meta = q.quantize_meta(fmt, sc, "nearest", True, transpose, False, 0, False, *x.shape, hardware_nearest=True)
    assert meta["HW_NEAREST"] and meta["FAST"]
    got = q._quantize_triton(x.to(KERNEL_DEVICE), fmt, "nearest", sc, 0, True, transpose, None, 0, False,
                             hardware=True)
    want = q.quantize_reference(x, fmt, "nearest", sc, 0, True, transpose, None, 0, False)
    names = ["codes", "scale", "amax", "saturated", "transposed codes", "transposed scale"]
    for name, g_, w in zip(names, got, want):
        g_ = g_.cpu()
        if g_.dtype != w.dtype or g_.element_size() == 1:
            g_, w = g_.view(torch.uint8), w.view(torch.uint8)
        assert torch.equal(g_, w), name
    assert got[2].item() == float("inf")
    if transpose and scaling == (128, 128):
        assert torch.equal(got[4].cpu().view(torch.uint8), got[0].cpu().view(torch.uint8).t())


def test_the_probe_takes_both_paths_of_fast_nearest():
    """The probe (every bf16 pattern) reaches chunks without and with fix-ups in both formats."""
    x = q._nearest_probe_values()
    for fmt in (tf8.E4M3, tf8.E5M2):
        meta = q.quantize_meta(fmt, tf8.Scaling.parse("none"), "nearest", True, False, False, 0, False, *x.shape,
                               hardware_nearest=True)
        mid = torch.tensor(overflow_midpoint(fmt), dtype=torch.int32).view(torch.float32)
        peaks = []
        for r in range(0, x.shape[0], meta["TILE_M"]):
            for c in range(0, meta["TILE_M"], meta["CHUNK_M"]):
                for k in range(0, x.shape[1], meta["TILE_K"]):
                    chunk = x[r + c:r + c + meta["CHUNK_M"], k:k + meta["TILE_K"]]
                    if chunk.numel():
                        peaks.append(bool(chunk.abs().max() < mid))  # NaN compares False: a slow chunk
        assert any(peaks) and not all(peaks), fmt.name
