"""The Triton cast kernel (interpreted on CPU, compiled on a GPU) vs the reference, bit for bit,
and the reference's scaling semantics vs independent constructions."""
import pytest
import torch

import tritonfp8 as tf8
from conftest import KERNEL_DEVICE, kernels, reference

SCALINGS = ["none", "tensor", "row", "col", (1, 128), (128, 1), (128, 128), (1, 32), "mx"]
SHAPES = [(1, 1), (5, 123), (129, 257)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _assert_same(a: tf8.FP8Tensor, b: tf8.FP8Tensor):
    assert a.data.shape == b.data.shape and a.scale.shape == b.scale.shape
    assert torch.equal(_bits(a.data).cpu(), _bits(b.data).cpu()), "data differs"
    assert torch.equal(_bits(a.scale).cpu(), _bits(b.scale).cpu()), "scale differs"
    assert torch.equal(a.amax.cpu(), b.amax.cpu()), f"amax {a.amax} vs {b.amax}"
    assert int(a.saturated) == int(b.saturated), f"saturated {a.saturated} vs {b.saturated}"
    assert (a.transposed is None) == (b.transposed is None)
    if a.transposed is not None:
        _assert_same(a.transposed, b.transposed)


def _both(x, *args, **kwargs):
    with kernels():
        a = tf8.quantize(x.to(KERNEL_DEVICE), *args, **kwargs)
    with reference():
        b = tf8.quantize(x.cpu(), *args, **kwargs)
    return a, b


def _input(shape, dtype=torch.float32, specials=True):
    x = torch.randn(shape) * torch.exp2(torch.randint(-12, 12, shape).float())
    if specials and x.numel() > 8:
        flat = x.view(-1)
        flat[3] = float("nan")
        flat[5] = float("inf")
        flat[7] = -1e6  # saturates in both formats under scaling "none"
        flat[-1] = 1e-9  # far below the smallest subnormal
    return x.to(dtype)


@pytest.mark.parametrize("transpose", [False, True], ids=["", "T"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("scaling", SCALINGS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kernel_matches_reference(shape, scaling, rounding, transpose):
    x = _input(shape)
    fmt = "e4m3" if (shape[0] + len(str(scaling)) + len(rounding)) % 2 else "e5m2"  # both formats, deterministically
    _assert_same(*_both(x, fmt, rounding, scaling, seed=11, transpose=transpose))


@pytest.mark.parametrize("fmt", ["e5m2", "e4m3"])
@pytest.mark.parametrize("saturate", [True, False], ids=["sat", "nosat"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_formats_dtypes_saturation(fmt, saturate, dtype):
    x = _input((33, 70), dtype)
    _assert_same(*_both(x, fmt, "stochastic", "none", seed=3, saturate=saturate, transpose=True))
    _assert_same(*_both(x, fmt, "nearest", (1, 32), saturate=saturate))


@pytest.mark.parametrize("layout", ["strided", "transposed", "3d", "expanded"])
@pytest.mark.parametrize("scaling", ["row", (1, 128), "mx"], ids=str)
def test_kernel_non_contiguous_inputs(layout, scaling):
    base = _input((150, 260), specials=False)
    x = {
        "strided": base[:, ::2],
        "transposed": base.t(),
        "3d": base[:150].reshape(3, 50, 260),
        "expanded": base[:1].expand(40, 260),
    }[layout]
    a, b = _both(x, "e4m3", "stochastic", scaling, seed=5, transpose=layout != "3d")
    _assert_same(a, b)
    assert a.data.shape == x.shape


@pytest.mark.parametrize("options", [
    dict(scaling="tensor", margin=2),
    dict(scaling="tensor", power_of_two=True),
    dict(scaling="row", power_of_two=True, margin=1),
    dict(scaling=(128, 128), power_of_two=True),
    dict(scaling="tensor", scale=torch.tensor(0.03125), transpose=True),
    dict(scaling="row", scale=torch.rand(37, 1) + 0.01),
    dict(scaling="col", scale=torch.rand(1, 45) + 0.01),
], ids=lambda o: ",".join(f"{k}={'given' if k == 'scale' else v}" for k, v in o.items()))
def test_kernel_scale_options(options):
    x = _input((37, 45))
    opts = dict(options)
    with kernels():
        a = tf8.quantize(x.to(KERNEL_DEVICE), "e4m3", "nearest", **{k: v.to(KERNEL_DEVICE) if k == "scale" else v for k, v in opts.items()})
    with reference():
        b = tf8.quantize(x, "e4m3", "nearest", **opts)
    _assert_same(a, b)


def test_zero_and_nonfinite_amax_give_a_usable_scale():
    x = torch.zeros(4, 256)
    x[1, 7] = float("inf")
    x[2, 200] = float("nan")
    for scaling in ["tensor", "row", (1, 128), "mx"]:
        a, b = _both(x, "e4m3", "nearest", scaling)
        _assert_same(a, b)
        s = a.scale.float()
        assert torch.all(torch.isfinite(s)) and torch.all(s > 0), f"{scaling}: {s}"


# ----------------------------------------------------------------------------
# Reference semantics vs independent constructions
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("scaling,block", [("row", (1, None)), ("col", (None, 1)), ((1, 128), (1, 128)),
                                           ((128, 128), (128, 128)), ((128, 1), (128, 1))], ids=str)
def test_block_scaling_is_tensor_scaling_per_block(scaling, block):
    """Each group of a grouped scaling equals the 'tensor' scaling of that group alone."""
    x = _input((200, 300), specials=False)
    with reference():
        q = tf8.quantize(x, "e4m3", "nearest", scaling)
        bm = block[0] or x.shape[0]
        bk = block[1] or x.shape[1]
        for i in range(0, x.shape[0], bm):
            for j in range(0, x.shape[1], bk):
                part = tf8.quantize(x[i:i + bm, j:j + bk].contiguous(), "e4m3", "nearest", "tensor")
                assert torch.equal(_bits(q.data[i:i + bm, j:j + bk]), _bits(part.data))
                assert q.scale[i // bm, j // bk] == part.scale


def test_tensor_scale_and_amax_definition():
    x = _input((64, 96), specials=False)
    with reference():
        q = tf8.quantize(x, "e4m3", "nearest", "tensor", margin=1)
    amax = x.abs().max()
    assert q.amax == amax
    assert q.scale == amax / torch.tensor(448.0 / 2)  # scale = amax / (max * 2**-margin)
    assert q.dequantize().abs().max() <= amax * (1 + 2**-4)


def test_mx_scales_are_powers_of_two_and_never_saturate():
    x = _input((16, 96), specials=False) * 1e3
    with reference():
        q = tf8.quantize(x, "e4m3", "nearest", "mx")
    assert q.scale.dtype == torch.float8_e8m0fnu and q.scale.shape == (16, 3)
    scale = q.scale.float()
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))
    assert int(q.saturated) == 0
    block_amax = x.abs().reshape(16, 3, 32).amax(-1)
    assert torch.all(block_amax <= 448 * scale) and torch.all(block_amax > 448 * scale / 2)


def test_nearest_transposed_copy_equals_quantizing_the_transpose():
    x = _input((70, 300), specials=False)
    for scaling in ["row", "col", (1, 128), (128, 128), "mx", "tensor"]:
        with reference():
            q = tf8.quantize(x, "e4m3", "nearest", scaling, transpose=True)
            qt = tf8.quantize(x.t().contiguous(), "e4m3", "nearest", scaling)
        assert torch.equal(_bits(q.transposed.data), _bits(qt.data)), scaling
        assert torch.equal(_bits(q.transposed.scale), _bits(qt.scale)), scaling


@pytest.mark.parametrize("scaling", ["none", "tensor", "row", (1, 128), "mx"], ids=str)
def test_nearest_error_is_within_half_an_ulp(scaling):
    """|x - dequantize(q)| <= half a quantum of the scaled value (E4M3: 2**-4 relative, or
    half the smallest subnormal times the scale)."""
    x = _input((40, 256), specials=False)
    with reference():
        q = tf8.quantize(x, "e4m3", "nearest", scaling)
    from tritonfp8.tensor import expand_scale
    scale = expand_scale(q.scale, q.scaling, 40, 256)
    y = x / scale
    fmt = tf8.E4M3
    quantum = torch.exp2(torch.floor(torch.log2(y.abs().clamp(min=fmt.min_normal))) - fmt.man_bits)
    in_range = y.abs() <= fmt.max
    err = (x - q.dequantize()).abs()
    assert torch.all(err[in_range] <= (quantum * scale)[in_range] / 2 * (1 + 1e-6))


def _in_range_input(fmt, rows: int = 128, cols: int = 128) -> torch.Tensor:
    """x [rows, cols] of finite values at every magnitude the stochastic rounding treats differently:
    the format's normal and subnormal ranges, below its smallest subnormal (more than 32 dropped
    bits), fp32 subnormals, zeros of both signs and its largest value; no Inf, NaN or overflow."""
    g = torch.Generator().manual_seed(7)
    exponents = torch.randint(-150, int(torch.log2(torch.tensor(fmt.max)).item()), (rows, cols), generator=g)
    x = torch.randn(rows, cols, generator=g).clamp(-1.9, 1.9) * torch.exp2(exponents.float())
    flat = x.view(-1)
    flat[:6] = torch.tensor([0.0, -0.0, fmt.max, -fmt.max, fmt.min_subnormal, -fmt.min_subnormal / 3])
    flat[6:10] = torch.tensor([1e-45, -3e-44, 1.1754942e-38, 2.0**-60])  # fp32 subnormals, tiny normals
    return x


@pytest.mark.parametrize("transpose", [False, True], ids=["", "+T"])
@pytest.mark.parametrize("scaling", ["none", "tensor"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_in_range_chunks_skip_the_fixups_and_keep_the_bits(rounding, fmt, scaling, transpose):
    """Casts with no scale or one tensor scale round a chunk whose scaled max cannot overflow
    without the overflow / Inf / NaN fix-ups (the kernel's FAST path). Those chunks, and a chunk
    with a NaN and an overflow in it, must give the reference's bits, counts and amax."""
    f = {"e4m3": tf8.E4M3, "e5m2": tf8.E5M2}[fmt]
    # under a computed tensor scale, an amax of 0.3 max makes the inverse scale no power of two, and
    # the scaled peak lands within about an ulp of max, next to the stochastic check's limit
    x = _in_range_input(f) * (0.3 if scaling == "tensor" else 1.0)
    a, b = _both(x, fmt, rounding=rounding, scaling=scaling, seed=11, transpose=transpose)
    _assert_same(a, b)
    x[70, 3], x[71, 4] = float("nan"), f.max * 8  # one chunk (rows 64-95) takes the fix-ups
    a, b = _both(x, fmt, rounding=rounding, scaling=scaling, seed=11, transpose=transpose, saturate=True)
    _assert_same(a, b)
    assert scaling != "none" or int(b.saturated) == 1


@pytest.mark.parametrize("case", [
    ((1, 128), "e4m3", "nearest", False), ((1, 128), "e5m2", "stochastic", False),
    ((128, 1), "e4m3", "stochastic", False), ((128, 128), "e5m2", "nearest", False),
    ((128, 128), "e4m3", "stochastic", True), ((128, 128), "e4m3", "nearest", True),
    ((1, 32), "e4m3", "stochastic", False), ("mx", "e4m3", "nearest", False), ("mx", "e5m2", "stochastic", False),
    ((1, 128), "e4m3", "stochastic", True), ((1, 128), "e5m2", "nearest", True), ((128, 1), "e4m3", "nearest", True),
    ("mx", "e4m3", "stochastic", True),
    # 16-bit inputs: the first pass takes its max in x's dtype
    ((128, 128), "e4m3", "nearest", True, torch.bfloat16), ((128, 1), "e5m2", "stochastic", False, torch.bfloat16),
    ((1, 128), "e4m3", "stochastic", True, torch.float16),
], ids=str)
def test_in_range_block_chunks_skip_the_fixups_and_keep_the_bits(case):
    """Block and MX scales: the kernel bounds each row group of a chunk (1 x B) or the tile's groups
    (B x 1, B x B: once per tile) by their scaled max |x| and rounds what cannot overflow without the
    fix-ups, computing the groups' scales once. Several tiles, partial groups at both edges, and a
    NaN and an Inf whose chunks (tiles) take the fix-ups: the reference's bits, scales, counts and
    amax. A (128, 128) transposed copy holds the same codes, transposed; the transposed copy of
    1 x B groups has B x 1 ones (and the other way round), each copy bounded on its own."""
    scaling, fmt, rounding, transpose, *dtype = case
    f = {"e4m3": tf8.E4M3, "e5m2": tf8.E5M2}[fmt]
    x = _in_range_input(f, 140, 260)  # 2 x 3 tiles of 128 x 128 (partial at both edges)
    x[:, 130:140] *= f.max  # groups whose scaled max lands near max from either side of an ulp
    if dtype:  # (no bf16 subnormals: Triton 3.6's interpreter converts them to fp32 wrongly)
        x = torch.where(x.abs() < 2.0**-126, torch.zeros_like(x), x.clamp(-6e4, 6e4)).to(dtype[0])
    a, b = _both(x, fmt, rounding=rounding, scaling=scaling, seed=5, transpose=transpose)
    _assert_same(a, b)
    x[5, 3], x[130, 250] = float("nan"), float("inf")
    a, b = _both(x, fmt, rounding=rounding, scaling=scaling, seed=5, transpose=transpose, saturate=False)
    _assert_same(a, b)
    assert b.amax.item() == float("inf")
    # a negative margin scales groups to 4x max: overflows in chunks with and without Inf / NaN, each
    # copy's counted on its own (the copies of 1 x B and B x 1 groups count differently)
    a, b = _both(x, fmt, rounding=rounding, scaling=scaling, seed=5, transpose=transpose, margin=-2)
    _assert_same(a, b)
    if scaling != "mx":  # (MX scales ignore the margin: powers of two that never saturate)
        assert int(b.saturated) > 0 and (not transpose or int(b.transposed.saturated) > 0)


@pytest.mark.parametrize("given", [-1e-3, -0.0, 0.0, float("inf"), 2.0**-3])
def test_in_range_check_with_any_given_tensor_scale(given):
    """A given tensor scale of any sign or size: the chunk check bounds the scaled values by
    |1 / scale|, so a negative, zero or infinite scale still gets the reference's bits and counts."""
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0] * 4] * 4)
    for rounding in ("nearest", "stochastic"):
        a, b = _both(x, "e4m3", rounding=rounding, scaling="tensor", seed=3, scale=torch.tensor(given))
        _assert_same(a, b)


@pytest.mark.parametrize("scaling", [(1, 32), (32, 32), (32, 1)], ids=str)
def test_a_given_block_scale_takes_the_general_path(scaling):
    """quantize() refuses given block scales, but the kernel's launcher can be handed one: the
    FAST path would compute its own scales, so such a cast takes the general path and keeps the
    reference's codes and the given scales (found in review)."""
    from tritonfp8.ops import quantize as q

    sc = tf8.Scaling.parse(scaling)
    x = _input((70, 90))
    scale = torch.rand(sc.scale_shape(70, 90), generator=torch.Generator().manual_seed(2)) + 0.5
    assert not q.quantize_meta(tf8.E4M3, sc, "nearest", True, False, True, 0, False, 70, 90)["FAST"]
    got = q._quantize_triton(x.to(KERNEL_DEVICE), tf8.E4M3, "nearest", sc, 0, True, False, scale.to(KERNEL_DEVICE),
                             0, False)
    want = q.quantize_reference(x, tf8.E4M3, "nearest", sc, 0, True, False, scale, 0, False)
    assert torch.equal(got[0].cpu().view(torch.uint8), want[0].view(torch.uint8))
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[1].cpu(), scale)
    assert torch.equal(got[3].cpu(), want[3])
