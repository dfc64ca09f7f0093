"""Stochastic rounding: the random bits, unbiasedness, P(up), determinism.

Statistics are drawn from one call on a tensor of N copies of each value: every
element has its own random word (word o % 4 of Philox(seed, o // 4) at element offset
o), so the N roundings are independent draws.
"""
import pytest
import torch
import triton
import triton.language as tl

import tritonfp8 as tf8
from conftest import KERNEL_DEVICE, kernels, reference
from tritonfp8.ops.rounding import philox_reference, random_words_reference, round_to_code_reference

N_DRAWS = 20_000


@triton.jit
def _randint4x_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r0, r1, r2, r3 = tl.randint4x(seed, offs.to(tl.int64))
    mask = offs < n
    tl.store(out_ptr + offs * 4 + 0, r0.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + offs * 4 + 1, r1.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + offs * 4 + 2, r2.to(tl.int32, bitcast=True), mask=mask)
    tl.store(out_ptr + offs * 4 + 3, r3.to(tl.int32, bitcast=True), mask=mask)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**40 + 17])
def test_reference_philox_equals_triton_randint4x(seed):
    n = 1000
    out = torch.empty(n * 4, dtype=torch.int32, device=KERNEL_DEVICE)
    _randint4x_kernel[(triton.cdiv(n, 256),)](out, seed, n, BLOCK=256)
    words = philox_reference(seed, torch.arange(n))
    want = torch.stack([w.to(torch.int32) if w.max() < 2**31 else (w - ((w >> 31) << 32)).to(torch.int32) for w in words], 1)
    assert torch.equal(out.cpu().view(n, 4), want.view(n, 4))


def _grid_neighbours(x: torch.Tensor, fmt):
    """(lo, hi): the fp8 grid values around each x (x > 0)."""
    codes = torch.arange(128, dtype=torch.int32).to(torch.uint8).view(fmt.torch_dtype).float()
    codes = codes[torch.isfinite(codes)].sort().values
    idx = torch.searchsorted(codes, x, right=True)
    lo = codes[idx - 1]
    hi = codes[idx.clamp(max=codes.numel() - 1)]
    return lo, hi


def _values(fmt):
    """Values spread across the range, subnormals included, none on the grid."""
    return torch.tensor([
        fmt.min_subnormal * 0.3, fmt.min_subnormal * 1.7, fmt.min_normal * 0.61, fmt.min_normal * 1.1,
        0.013, 0.3, 1.0 + 1 / 3, 3.7, fmt.max / 3.3, fmt.max * 0.97,
    ])


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("fmt", [tf8.E5M2, tf8.E4M3], ids=["e5m2", "e4m3"])
def test_unbiased_and_probability_of_rounding_up(fmt, impl):
    values = _values(fmt)
    # The kernel is bit-exact with the reference (test_cast_kernel); fewer draws keep the interpreter quick.
    n_draws = N_DRAWS if impl == "reference" else 2_000
    x = values.repeat_interleave(n_draws).view(-1, 500)
    ctx = kernels() if impl == "kernel" else reference()
    with ctx:
        q = tf8.quantize(x.to(KERNEL_DEVICE if impl == "kernel" else "cpu"), fmt, "stochastic", seed=2024)
    draws = q.dequantize().cpu().view(len(values), n_draws)
    lo, hi = _grid_neighbours(values, fmt)
    assert torch.all((draws == lo[:, None]) | (draws == hi[:, None])), "a draw left the two neighbours"
    p = ((values - lo) / (hi - lo)).double()
    p_up = (draws == hi[:, None]).double().mean(1)
    se_p = torch.sqrt(p * (1 - p) / n_draws)
    assert torch.all((p_up - p).abs() <= 4 * se_p), f"P(up) {p_up} vs {(values - lo) / (hi - lo)}"
    mean = draws.double().mean(1)
    se_mean = (hi - lo).double() * se_p
    assert torch.all((mean - values.double()).abs() <= 4 * se_mean), f"mean {mean} vs {values}"


def test_stochastic_beats_nearest_on_average():
    """The mean of many SR draws is closer to x than round-to-nearest is."""
    x = torch.full((N_DRAWS,), 1.0 + 1 / 3)
    with reference():
        sr = tf8.quantize(x, "e5m2", "stochastic", seed=9).dequantize().mean()
        rn = tf8.quantize(x[:1], "e5m2", "nearest").dequantize()[0]
    assert abs(sr - x[0]) < abs(rn - x[0]) / 10


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_values_on_the_grid_never_move(impl):
    for fmt in (tf8.E5M2, tf8.E4M3):
        grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fmt.torch_dtype).float()
        grid = grid[torch.isfinite(grid)].repeat(8).view(16, -1)
        with kernels() if impl == "kernel" else reference():
            q = tf8.quantize(grid.to(KERNEL_DEVICE if impl == "kernel" else "cpu"), fmt, "stochastic", seed=77)
        assert torch.equal(q.dequantize().cpu(), grid)


def test_same_seed_same_bits_other_seed_other_bits():
    x = torch.randn(64, 300)
    with reference():
        a = tf8.quantize(x, "e5m2", "stochastic", seed=1).data.view(torch.uint8)
        b = tf8.quantize(x, "e5m2", "stochastic", seed=1).data.view(torch.uint8)
        c = tf8.quantize(x, "e5m2", "stochastic", seed=2).data.view(torch.uint8)
    with kernels():
        d = tf8.quantize(x.to(KERNEL_DEVICE), "e5m2", "stochastic", seed=1).data.view(torch.uint8).cpu()
    assert torch.equal(a, b) and torch.equal(a, d)
    differing = (a != c).float().mean().item()
    # Each element rounds the other way with probability 2 p (1 - p); over uniform p that is 1/3.
    assert 0.25 < differing < 0.42, differing


def _documented_words(seed, m, k):
    """The words of an [m, k] row-major tensor by numerics.md 2, built from the Philox twin."""
    o = torch.arange(m * k, dtype=torch.int64)
    words = torch.stack(philox_reference(seed, o // 4), dim=-1)  # [m * k, 4]: the 4 words of o's counter
    return words.gather(1, (o % 4)[:, None]).reshape(m, k)


def test_random_words_reference_is_the_documented_stream():
    want = _documented_words(99, 1, 64).reshape(-1)
    assert torch.equal(random_words_reference(99, 37, start=16), want[16:53])
    assert torch.equal(random_words_reference(99, 37, start=torch.tensor(16)), want[16:53])
    with pytest.raises(ValueError, match="multiple of 4"):
        random_words_reference(99, 5, start=3)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("shape", [(24, 64), (13, 30)], ids=["k%4=0", "k%4=2"])
def test_stochastic_cast_takes_the_documented_words(impl, shape):
    """Element [m, k] rounds with word o % 4 of Philox(seed, o // 4), o = m * K + k, on both
    the one-call-per-4-elements path (K % 4 == 0) and the per-element one."""
    x = torch.randn(shape) * 4
    ctx, dev = (reference(), "cpu") if impl == "reference" else (kernels(), KERNEL_DEVICE)
    with ctx:
        q = tf8.quantize(x.to(dev), "e5m2", "stochastic", seed=31)
    want, _ = round_to_code_reference(x, _documented_words(31, *shape), tf8.E5M2, True, True)
    assert torch.equal(q.data.view(torch.uint8).cpu(), want.to(torch.uint8))


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_transposed_copy_takes_the_draws_of_its_elements(impl):
    """Both copies of a cast round element [m, k] with its one word: under one scale the
    transposed copy is the transpose of the codes; under per-column scales (the copy of a
    row-scaled cast) it is x's columns scaled and rounded with the same words."""
    x = torch.randn(32, 48) * torch.linspace(0.1, 10, 48)
    ctx, dev = (reference(), "cpu") if impl == "reference" else (kernels(), KERNEL_DEVICE)
    with ctx:
        t = tf8.quantize(x.to(dev), "e5m2", "stochastic", scaling="tensor", seed=4, transpose=True)
        # power-of-two scales: x * (1 / scale) below is then the kernel's scaling exactly
        r = tf8.quantize(x.to(dev), "e5m2", "stochastic", scaling="row", seed=4, transpose=True, power_of_two=True)
    codes = t.data.view(torch.uint8).cpu()
    assert torch.equal(t.transposed.data.view(torch.uint8).cpu(), codes.t())
    # not vacuous: values round both ways across the tensor
    with reference():
        nearest = tf8.quantize(x, "e5m2", "nearest", scaling="tensor").data.view(torch.uint8)
    assert 0.05 < (codes != nearest).float().mean() < 0.95
    col_scale = r.transposed.scale.cpu().reshape(1, -1)  # x^T's row scales: one per column of x
    want, _ = round_to_code_reference(x * (1.0 / col_scale), _documented_words(4, 32, 48), tf8.E5M2, True, True)
    assert torch.equal(r.transposed.data.view(torch.uint8).cpu(), want.to(torch.uint8).t())
