"""The SASS report's reference kernels (tritonfp8/ops/baseline.py) run and compute what they
claim, under the interpreter on small shapes, so that the GPU benchmarks that time them
(perf/bench_quantize.py, bench_gemm.py, bench_attention.py) do not meet them untested.

They are baselines, not part of the numeric contract: values are chosen where the
interpreter's fp8 conversion is exact (already on the grid)."""
import math

import pytest
import torch

import tritonfp8 as tf8
from conftest import KERNEL_DEVICE
from tritonfp8.ops import baseline


def _grid_values(shape, fmt=tf8.E4M3, seed=0):
    """Random finite values of ``fmt``'s grid (normal range), as fp32."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0x08, 0x78, shape, generator=g, dtype=torch.int32)  # no subnormals, no NaN
    sign = torch.randint(0, 2, shape, generator=g, dtype=torch.int32) << 7
    return (codes | sign).to(torch.uint8).view(fmt.torch_dtype).float()


@pytest.mark.parametrize("transpose", [False, True])
def test_hw_cast_keeps_grid_values_and_transposes(transpose):
    x = _grid_values((70, 96))
    out = baseline.hw_cast(x.to(KERNEL_DEVICE), "e4m3", transpose)
    codes, codes_t = out if transpose else (out, None)
    assert torch.equal(codes.cpu().view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))
    if transpose:
        assert torch.equal(codes_t.cpu().view(torch.uint8), codes.cpu().view(torch.uint8).t())


@pytest.mark.parametrize("scaling,transpose", [((1, 128), False), ((1, 128), True), ((128, 128), False),
                                                ((128, 128), True), ("mx", False)], ids=str)
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "approx-div"])
def test_hw_block_cast_scales_each_group(scaling, transpose, exact):
    """Every group of grid values times 2**k with max |x| = 448 * 2**k gets the scale 2**k and keeps
    its codes; the transposed copy's groups (B x 1 on x for 1 x B) get their own scales."""
    sc = tf8.Scaling.parse(scaling)
    rows, cols = 256, 256
    gm, gk = sc.group_shape(rows, cols)
    g = torch.Generator().manual_seed(4)
    powers = torch.randint(-6, 7, (rows // gm, cols // gk), generator=g).float()
    grid = _grid_values((rows, cols), seed=5)
    grid[::gm, ::gk] = 448.0  # each group's largest value (1 x 128: columns 0 and 128 of every row)
    x = grid * torch.exp2(powers).repeat_interleave(gm, 0).repeat_interleave(gk, 1)
    out = baseline.hw_block_cast(x.to(KERNEL_DEVICE), scaling, "e4m3", transpose, exact)
    codes, scale = out[0].cpu(), out[1].cpu()
    assert torch.equal(codes.view(torch.uint8), grid.to(torch.float8_e4m3fn).view(torch.uint8))
    stored = torch.exp2(powers)
    if sc.is_mx:
        assert torch.equal(scale.to(torch.int32), (powers + 127).to(torch.int32))
    else:
        assert torch.allclose(scale, stored, rtol=0 if exact else 2**-22)
    if transpose:
        codes_t, scale_t = out[2].cpu(), out[3].cpu()
        # (the transposed copy's scales are laid out in x's coordinates)
        if scaling == (128, 128):
            assert torch.equal(codes_t.view(torch.uint8), codes.view(torch.uint8).t())
            assert torch.allclose(scale_t, stored, rtol=0 if exact else 2**-22)
        else:  # B x 1 groups on x: each column's max |x| over 128 rows; exact: the reciprocal of 448 / amax
            col_amax = x.abs().reshape(rows // 128, 128, cols).amax(1)
            inv = torch.full_like(col_amax, 448.0) / col_amax  # (448 / t is 448 * (1 / t) in torch: inexact)
            assert torch.allclose(scale_t, torch.ones_like(inv) / inv, rtol=0 if exact else 2**-22)  # [M / 128, K]


def test_philox4_cast_keeps_grid_values_and_rounds_between_neighbours():
    x = _grid_values((64, 128))
    assert torch.equal(baseline.philox4_cast(x.to(KERNEL_DEVICE), 3).cpu().view(torch.uint8),
                       x.to(torch.float8_e4m3fn).view(torch.uint8))
    y = torch.full((64, 128), 1.0 + 1 / 32)  # between 1.0 and 1.125: a quarter of the way up
    out = baseline.philox4_cast(y.to(KERNEL_DEVICE), 3).cpu().float()
    assert set(out.unique().tolist()) <= {1.0, 1.125}
    assert abs((out == 1.125).float().mean().item() - 0.25) < 0.05


def test_gemm_without_promotion_is_the_product():
    a = _grid_values((64, 128), seed=1).to(torch.float8_e4m3fn)
    bt = _grid_values((64, 128), seed=2).to(torch.float8_e4m3fn)
    a_scale = torch.tensor(0.5)
    b_scale = torch.tensor(0.25)
    config = tf8.ops.matmul.GemmConfig(32, 32, 64, group_m=1, num_warps=4, num_stages=1)
    dev = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    out = baseline.gemm_no_promotion(dev(a), dev(bt), dev(a_scale), dev(b_scale), config, sms=4).cpu().float()
    want = (a.double() @ bt.double().t()) * 0.125
    assert torch.allclose(out.double(), want, rtol=2**-7, atol=1e-2 * want.abs().max().item() * 2**-7)


def test_attention_reference_kernel_is_softmax_attention():
    b, h, n, d = 1, 2, 64, 32
    q, k, v = (_grid_values((b, h, n, d), seed=s) / 16 for s in (3, 4, 5))
    q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
    vt8 = v8.transpose(2, 3).contiguous()
    dev = lambda t: t.to(KERNEL_DEVICE)  # noqa: E731
    o = baseline.attention_fwd_hw_p(dev(q8), dev(k8), dev(vt8), 1 / math.sqrt(d), 16, 32, 4, 1).cpu().float()
    p = torch.softmax((q8.double() @ k8.double().transpose(-1, -2)) / math.sqrt(d), dim=-1)
    want = p @ v8.double()
    # P is rounded to E4M3 by the conversion, which the interpreter gets wrong where rounding
    # carries into the exponent: a wiring check, not an exactness one
    assert (o.double() - want).abs().max().item() <= 0.1 * v.abs().max().item()
    assert o.abs().max().item() > 0.5 * want.abs().max().item()
