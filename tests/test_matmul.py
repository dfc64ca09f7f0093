"""Scaled fp8 products: the Triton kernels (interpreted on CPU, compiled on a GPU) against an fp64
product of the dequantized operands, the fused fp8 output bit for bit against quantize(), promotion
of the accumulator on long K, the operand layouts of a linear layer, configurations and errors.

The error bound of a product (``_bound``): every product of two fp8 values is exact in fp32, so
the kernel's only errors are fp32 roundings of sums and scale multiplications. Each term of an
output element passes through at most K + 5 of them (the additions of the K-long dot, in any
order or blocking, two per-partial scale multiplications, two epilogue scales and the bias), so
by the standard bound for floating-point sums (Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., section 4.2 and 3.1: |fl(sum) - sum| <= gamma_n * sum |terms|,
gamma_n = n u / (1 - n u), u = 2**-24)

    |C - C64| <= gamma_{K+5} * (|A| @ |B| + |bias|)     elementwise,

where A, B are the dequantized operands and C64 their fp64 product. This holds for any summation
order, so it is the right bound for an fp32-accumulating kernel; a kernel whose accumulator kept
fewer bits between promotions would break it on long K (test_long_k_needs_promotion shows by how
much). On a GPU, Hopper's fp8 tensor cores add up to 128 products (one promotion interval) in a
narrower accumulator (about 14 bits, DeepSeek-V3 report, section 3.3.2), so compiled runs add a
documented 2**-11 * (|A| @ |B|) to the bound. A bf16 / fp16 output adds its rounding of |C|.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import tritonfp8 as tf8
from conftest import KERNEL_DEVICE, ON_GPU, compiled_env, kernels, reference
from tritonfp8.ops import matmul as mm
from tritonfp8.tensor import FP8Tensor, Scaling, expand_scale

U32 = 2.0**-24
GPU_ACC_SLACK = 2.0**-11 if ON_GPU else 0.0

# Scalings of a [M, K], and of the weight W [N, K] whose transposed view is b [K, N].
A_SCALINGS = ["none", "tensor", "row", (1, 128), (128, 128), "mx"]
W_SCALINGS = ["none", "tensor", "row", (1, 128), (128, 128), "mx"]  # on b: none, tensor, col, (128,1), (128,128), mx 32x1


def _k_extent(s):
    return 32 if s == "mx" else (s[1] if isinstance(s, tuple) else 0)


PAIRINGS = [(sa, sw) for sa in A_SCALINGS for sw in W_SCALINGS
            if not (_k_extent(sa) and _k_extent(sw) and _k_extent(sa) != _k_extent(sw))]
SHAPES = [(1, 1, 16), (37, 53, 200), (129, 65, 384)]
# Representative pairings: per-tensor, outer (row x col), DeepSeek blocks, weight-gradient blocks, mx.
CORE_PAIRINGS = [("tensor", "tensor"), ("row", "row"), ((1, 128), (128, 128)), ((1, 128), (1, 128)), ("mx", "mx")]
# Compiled, every distinct case costs a kernel compile (1-2 s), so a GPU run checks every
# pairing on the largest odd shape and the other shapes on the representative pairings.
CASES = [(p, s) for p in PAIRINGS for s in SHAPES if not ON_GPU or s == SHAPES[-1] or p in CORE_PAIRINGS]


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    """Tests use the first kept configuration: deterministic, one compile per case on a GPU."""
    monkeypatch.setattr(mm, "AUTOTUNE", False)


def _sid(s):
    return s if isinstance(s, str) else f"{s[0]}x{s[1]}"


def _pid(pairing):
    return f"{_sid(pairing[0])}-{_sid(pairing[1])}"


def _values(rows, cols):
    """Random values over a wide range of magnitudes (so the scales matter)."""
    return torch.randn(rows, cols) * torch.exp2(torch.randint(-6, 7, (rows, cols)).float())


def _operands(m, n, k, sa, sw, fa="e4m3", fb="e4m3"):
    """a [M, K] and b [K, N] (the K-major transposed view of a quantized weight [N, K]), on the kernel device."""
    with reference():
        a = tf8.quantize(_values(m, k), fa, scaling=sa)
        w = tf8.quantize(_values(n, k), fb, scaling=sw)
    return _to(a), _to(mm.transpose_view(w))


def _to(q: FP8Tensor, device=KERNEL_DEVICE) -> FP8Tensor:
    return FP8Tensor(q.data.to(device), q.scale.to(device), q.fmt, q.scaling)


def _dequant64(q: FP8Tensor) -> torch.Tensor:
    rows, cols = q.data.shape
    return q.data.cpu().double() * expand_scale(q.scale.cpu(), q.scaling, rows, cols).double()


def _gamma(n):
    return n * U32 / (1 - n * U32)


def _bound(a, b, bias=None, out_dtype=torch.float32):
    """Elementwise bound on |C - C64| (see the module docstring) and C64."""
    a64, b64 = _dequant64(a), _dequant64(b)
    c64 = a64 @ b64
    mag = a64.abs() @ b64.abs()
    if bias is not None:
        c64 = c64 + bias.cpu().double()
        mag = mag + bias.cpu().double().abs()
    k = a.data.shape[1]
    bound = _gamma(k + 5) * mag + GPU_ACC_SLACK * (a64.abs() @ b64.abs())
    # Unit roundoff of the output cast; Triton's interpreter converts fp32 to bf16 by truncation
    # (a GPU's cvt rounds to nearest), so interpreted bf16 outputs get a whole ulp.
    bf16_u = 2.0**-8 if ON_GPU else 2.0**-7
    out_u = {torch.float32: 0.0, torch.bfloat16: bf16_u, torch.float16: 2.0**-11}[out_dtype]
    if out_u:  # rounding of the output (and fp16's subnormal spacing)
        bound = bound * (1 + out_u) + out_u * c64.abs() + (2.0**-24 if out_dtype == torch.float16 else 0.0)
    return c64, bound


def _check(out, a, b, bias=None, out_dtype=torch.float32):
    assert out.dtype == out_dtype and out.shape == (a.data.shape[0], b.data.shape[1])
    c64, bound = _bound(a, b, bias, out_dtype)
    err = (out.cpu().double() - c64).abs()
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, f"error exceeds the bound by {worst:.3g} (max err {err.max().item():.3g})"


# ----------------------------------------------------------------------------
# Kernel vs fp64, every pairing, both formats, odd shapes, layouts
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("pairing,shape", CASES, ids=[f"{_pid(p)}-{'x'.join(map(str, s))}" for p, s in CASES])
def test_kernel_vs_fp64(pairing, shape):
    i = PAIRINGS.index(pairing) + SHAPES.index(shape)
    fa, fb = ("e4m3", "e5m2")[i % 2], ("e4m3", "e5m2")[(i // 2) % 2]  # both formats and both mixes
    a, b = _operands(*shape, *pairing, fa, fb)
    with kernels():
        out = tf8.scaled_mm(a, b, out_dtype=torch.float32)
    _check(out, a, b)


@pytest.mark.parametrize("fa", ["e4m3", "e5m2"])
@pytest.mark.parametrize("fb", ["e4m3", "e5m2"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_formats_bias_and_output_dtypes(fa, fb, out_dtype):
    a, b = _operands(37, 53, 200, "row", (128, 128), fa, fb)
    bias = torch.randn(53).to(torch.bfloat16).to(KERNEL_DEVICE)
    with kernels():
        out = tf8.scaled_mm(a, b, bias=bias, out_dtype=out_dtype)
    _check(out, a, b, bias, out_dtype)


def _relayout(q: FP8Tensor, layout: str, is_a: bool) -> FP8Tensor:
    """The same values in another memory layout: "mn_major" (contiguous along M / N) or "padded"
    (K-major rows with a row stride that is not the row length)."""
    data = q.data
    if layout == "mn_major":
        data = data.t().contiguous().t() if is_a else data.contiguous()
    elif layout == "padded":
        rows, cols = (data.shape if is_a else data.t().shape)
        buf = torch.zeros(rows, cols + 3, dtype=torch.uint8, device=data.device).view(data.dtype)
        buf[:, :cols] = data if is_a else data.t()
        data = buf[:, :cols] if is_a else buf[:, :cols].t()
    return FP8Tensor(data, q.scale, q.fmt, q.scaling)


@pytest.mark.parametrize("layout", ["mn_major", "padded"])
@pytest.mark.parametrize("pairing", [("tensor", "tensor"), ("row", "row"), ((1, 128), (128, 128)), ("mx", "mx")], ids=_pid)
def test_non_contiguous_and_transposed_operands(pairing, layout):
    a, b = _operands(37, 53, 200, *pairing, "e5m2", "e4m3")
    a2, b2 = _relayout(a, layout, True), _relayout(b, layout, False)
    if layout == "mn_major":
        assert a2.data.stride(0) == 1 and b2.data.stride(1) == 1 and not mm.is_k_major(a2, b2)
    else:
        assert a2.data.stride(0) == 203 and b2.data.stride(1) == 203 and mm.is_k_major(a2, b2)
    with kernels():
        out = tf8.scaled_mm(a2, b2, out_dtype=torch.float32)
    _check(out, a, b)


@pytest.mark.parametrize("pairing", CORE_PAIRINGS if ON_GPU else PAIRINGS, ids=_pid)
def test_tma_kernel_vs_fp64(pairing):
    """The persistent tensor-descriptor kernel (run here on 4 programs, so each walks several tiles)."""
    a, b = _operands(129, 65, 384, *pairing, "e4m3", "e5m2")
    with kernels():
        out, _, _ = mm._scaled_mm_triton(a.data, a.scale, a.scaling, b.data, b.scale, b.scaling, None,
                                         torch.float32, None, None, "nearest", 0, True, variant="tma")
    _check(out, a, b)


@pytest.mark.parametrize("variant", ["pointer", "tma"])
@pytest.mark.parametrize("config", mm.CONFIGS, ids=str)
def test_every_config(config, variant):
    """Each autotune configuration computes the right product (tiles cut by every edge)."""
    for pairing in [("tensor", "tensor"), ((1, 128), (128, 128))]:
        a, b = _operands(70, 150, 256, *pairing, "e4m3", "e4m3")
        with kernels():
            out, _, _ = mm._scaled_mm_triton(a.data, a.scale, a.scaling, b.data, b.scale, b.scaling, None,
                                             torch.float32, None, None, "nearest", 0, True,
                                             config=config, variant=variant)
        _check(out, a, b)


# ----------------------------------------------------------------------------
# Fused fp8 output: bit-exact with quantize() of the reference product
# ----------------------------------------------------------------------------


def _exact_operand(rows, cols, fmt, scaling: Scaling):
    """Small integers in fp8 with power-of-two scales in [1/4, 4]: every partial sum of a
    product of two such operands (K <= 256) is exact in fp32, in any order."""
    data = torch.randint(-7, 8, (rows, cols)).float().to(tf8.formats.get_format(fmt).torch_dtype)
    shape = scaling.scale_shape(rows, cols)
    exps = torch.randint(-2, 3, shape)
    if scaling.kind == "none":
        scale = torch.ones(())
    elif scaling.is_mx:
        scale = (exps + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    else:
        scale = torch.exp2(exps.float())
    return FP8Tensor(data.to(KERNEL_DEVICE), scale.to(KERNEL_DEVICE), tf8.formats.get_format(fmt), scaling)


EXACT_PAIRINGS = [("tensor", "tensor"), ("row", "col"), ((1, 128), (128, 128)), ((1, 128), (128, 1)), ("mx", "mx")]
if ON_GPU:
    EXACT_PAIRINGS = EXACT_PAIRINGS[::2]


@pytest.mark.parametrize("out_scale", [None, 4.0], ids=["unscaled", "delayed"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("out_fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("pairing", EXACT_PAIRINGS, ids=_pid)
def test_fp8_output_bit_exact(pairing, out_fmt, rounding, out_scale):
    m, n, k = 37, 53, 200
    sa = Scaling.parse(pairing[0])
    sb = Scaling("mx", (32, 1)) if pairing[1] == "mx" else Scaling.parse(pairing[1])
    a = _exact_operand(m, k, "e4m3", sa)
    b = _exact_operand(k, n, "e5m2", sb)
    bias = torch.randint(-8, 9, (n,)).float().to(KERNEL_DEVICE)
    scale = None if out_scale is None else torch.tensor(out_scale, device=KERNEL_DEVICE)
    seed = 1234 if rounding == "stochastic" else None
    with kernels():
        y = tf8.scaled_mm(a, b, bias=bias, out_fmt=out_fmt, out_scale=scale, rounding=rounding, seed=seed)
    exact = (_dequant64(a) @ _dequant64(b) + bias.cpu().double()).float()
    assert torch.equal(exact.double(), _dequant64(a) @ _dequant64(b) + bias.cpu().double()), "test operands not exact"
    with reference():
        q = tf8.quantize(exact, out_fmt, rounding, "tensor" if scale is not None else "none", seed=seed,
                         scale=None if scale is None else scale.cpu())
    assert isinstance(y, FP8Tensor) and y.fmt == q.fmt and y.scaling == q.scaling
    assert torch.equal(y.data.cpu().view(torch.uint8), q.data.view(torch.uint8)), "fp8 codes differ"
    assert torch.equal(y.scale.cpu(), q.scale)
    assert torch.equal(y.amax.cpu(), q.amax), f"amax {y.amax} vs {q.amax}"
    assert int(y.saturated) == int(q.saturated)
    if out_fmt == "e4m3":
        assert int(q.saturated) > 0  # the case exercises saturation


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_fp8_output_reference_backend_matches_kernel_and_nonfinite():
    """The reference backend gives the same fp8 output; NaN / Inf in an operand propagate and show in amax."""
    a = _exact_operand(16, 64, "e5m2", Scaling("tensor"))
    b = _exact_operand(64, 24, "e5m2", Scaling("tensor"))
    a.data[3, 5] = float("inf")
    a.data[4, 6] = float("nan")
    outs = []
    for ctx, dev in ((kernels, KERNEL_DEVICE), (reference, "cpu")):
        with ctx():
            outs.append(tf8.scaled_mm(_to(a, dev), _to(b, dev), out_fmt="e5m2", rounding="stochastic", seed=7))
    k, r = outs
    assert torch.equal(k.data.cpu().view(torch.uint8), r.data.view(torch.uint8))
    assert k.amax.item() == r.amax.item() == float("inf")
    assert torch.isnan(r.data[4].float()).all()


# ----------------------------------------------------------------------------
# Promotion of the accumulator on long K
# ----------------------------------------------------------------------------


def _truncate(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x with its significand cut (toward zero) to ``bits`` bits."""
    mant, exp = torch.frexp(x)
    return torch.ldexp(torch.trunc(mant * 2.0**bits) / 2.0**bits, exp)


def _narrow_accumulator(a64, b64, promote_every: int, acc_bits: int = 14, step: int = 32):
    """Model of an fp8 tensor-core accumulation: each MMA step of ``step`` products is added into an
    accumulator that keeps ``acc_bits`` significant bits; every ``promote_every`` elements of K that
    accumulator is added into an fp32 one and cleared (DeepSeek-V3, section 3.3.2)."""
    (m, k), n = a64.shape, b64.shape[1]
    steps = torch.einsum("msj,sjn->smn", a64.reshape(m, k // step, step), b64.reshape(k // step, step, n))
    hi = torch.zeros(m, n, dtype=torch.float32)
    lo = torch.zeros(m, n, dtype=torch.float64)
    for i, partial in enumerate(steps):
        lo = _truncate(lo + partial, acc_bits)
        if ((i + 1) * step) % promote_every == 0 or i + 1 == len(steps):
            hi = (hi.double() + lo).float()
            lo = torch.zeros_like(lo)
    return hi


def test_long_k_needs_promotion():
    """K = 8192 with positive operands (the worst case for a narrow accumulator): the kernel stays
    within the fp32 bound; a model of a 14-bit tensor-core accumulator breaks that bound by far
    when never promoted, and stays within it when promoted every 128 elements, as the kernel does."""
    m, n, k = 16, 16, 8192
    with reference():
        a = _to(tf8.quantize(torch.rand(m, k) + 0.5, "e4m3", scaling="tensor"))
        w = tf8.quantize(torch.rand(n, k) + 0.5, "e4m3", scaling="tensor")
    b = _to(mm.transpose_view(w))
    with kernels():
        out = tf8.scaled_mm(a, b, out_dtype=torch.float32)
    c64, bound = _bound(a, b)
    rel = ((out.cpu().double() - c64).abs() / c64).max().item()
    fp32_bound = _gamma(k + 5)
    assert (out.cpu().double() - c64).abs().le(bound).all(), f"kernel error {rel:.3g}"
    a64, b64 = _dequant64(a), _dequant64(b)
    never = ((_narrow_accumulator(a64, b64, promote_every=k).double() - c64).abs() / c64).max().item()
    every_128 = ((_narrow_accumulator(a64, b64, promote_every=128).double() - c64).abs() / c64).max().item()
    print(f"K={k}: kernel {rel:.3g}, fp32 bound {fp32_bound:.3g}, 14-bit accumulator never promoted {never:.3g}, "
          f"promoted every 128 {every_128:.3g}")
    assert never > 4 * fp32_bound, f"unpromoted model error {never:.3g} vs bound {fp32_bound:.3g}"
    assert every_128 <= fp32_bound, f"promoted model error {every_128:.3g} vs bound {fp32_bound:.3g}"


def test_fast_accumulation_is_exact_off_hopper():
    """scaled_mm(fast_accumulation=True) runs the kernels' unpromoted dot (FAST_ACC; its sm_90
    code, a wgmma that stays in flight, is checked in tests/test_sass.py). Off Hopper (the
    interpreter, the reference) the sums are the exact fp32 ones: the same bits as promoted."""
    g = torch.Generator().manual_seed(3)
    with reference():
        a = tf8.quantize(torch.randn(48, 256, generator=g), "e4m3", scaling="tensor")
        b = mm.transpose_view(tf8.quantize(torch.randn(40, 256, generator=g), "e4m3", scaling="tensor"))
        ref_fast = tf8.scaled_mm(a, b, out_dtype=torch.float32, fast_accumulation=True)
        ref = tf8.scaled_mm(a, b, out_dtype=torch.float32)
    assert torch.equal(ref_fast, ref)
    with kernels():
        fast = tf8.scaled_mm(_to(a), _to(b), out_dtype=torch.float32, fast_accumulation=True).cpu()
        promoted = tf8.scaled_mm(_to(a), _to(b), out_dtype=torch.float32).cpu()
    if ON_GPU:  # sm_90 keeps about 14 bits per partial sum over K = 256
        assert torch.allclose(fast, promoted, rtol=2**-10, atol=2**-10 * promoted.abs().max().item())
    else:
        assert torch.equal(fast, promoted)


def test_hopper_code_promotes_the_accumulator():
    """Compiled for sm_90, the tensor-scaled kernel adds the wgmma accumulator into the fp32 one
    (one add.f32 per accumulator register per 128 of K): Triton's sm_90 default would never promote."""
    code = r"""
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tritonfp8.ops import matmul as mm
spec = [s for s in mm.aot_specs() if "pointer" in s.name and "a:tensor b:tensor -> bf16" in s.name][0]
src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=spec.extra["attrs"])
k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
ptx = k.asm["ptx"]
regs = spec.constexprs["BLOCK_M"] * spec.constexprs["BLOCK_N"] // (32 * spec.num_warps)
print(len(re.findall(r"\badd\.(?:rn\.)?f32\b", ptx)), regs, len(re.findall(r"wgmma\.mma_async\S*e4m3\.e4m3", ptx)))
"""
    env = compiled_env()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-2000:]
    adds, regs, mmas = map(int, res.stdout.split())
    assert mmas > 0 and adds >= regs, f"{adds} fp32 adds for {regs} accumulator registers"


# ----------------------------------------------------------------------------
# The three products of a linear layer
# ----------------------------------------------------------------------------

RECIPES = {
    "hybrid": dict(x=("e4m3", "tensor"), w=("e4m3", "tensor"), dy=("e5m2", "tensor")),
    "rowwise": dict(x=("e4m3", "row"), w=("e4m3", "row"), dy=("e4m3", "row")),
    "blockwise": dict(x=("e4m3", (1, 128)), w=("e4m3", (128, 128)), dy=("e4m3", (1, 128))),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_linear_layer_products(recipe):
    """forward x W^T, dgrad dy W and wgrad dy^T x, each with K-major operands that are the
    quantize op's own buffers (no transpose copy), against fp64 and the high-precision product."""
    t, k_in, n_out = 96, 160, 72
    cfg = RECIPES[recipe]
    x, w, dy = torch.randn(t, k_in), torch.randn(n_out, k_in) / 8, torch.randn(t, n_out)
    with reference():
        x_q = tf8.quantize(x, cfg["x"][0], scaling=cfg["x"][1], transpose=True)
        w_q = tf8.quantize(w, cfg["w"][0], scaling=cfg["w"][1], transpose=True)
        dy_q = tf8.quantize(dy, cfg["dy"][0], scaling=cfg["dy"][1], transpose=True)
    moved = {}
    for name, q in (("x", x_q), ("w", w_q), ("dy", dy_q)):
        moved[name] = FP8Tensor(q.data.to(KERNEL_DEVICE), q.scale.to(KERNEL_DEVICE), q.fmt, q.scaling,
                                transposed=_to(q.transposed))
    products = {"forward": x @ w.t(), "dgrad": dy @ w, "wgrad": dy.t() @ x}
    buffers = {"forward": (moved["x"].data, moved["w"].data),
               "dgrad": (moved["dy"].data, moved["w"].transposed.data),
               "wgrad": (moved["dy"].transposed.data, moved["x"].transposed.data)}
    for product, exact in products.items():
        a, b = mm.linear_operands(product, x_q=moved["x"], w_q=moved["w"], dy_q=moved["dy"])
        assert mm.is_k_major(a, b), product
        assert a.data.data_ptr() == buffers[product][0].data_ptr(), f"{product}: a is a copy"
        assert b.data.data_ptr() == buffers[product][1].data_ptr(), f"{product}: b is a copy"
        with kernels():
            out = tf8.scaled_mm(a, b, out_dtype=torch.float32)
        _check(out, a, b)
        sqnr = 10 * math.log10(exact.pow(2).sum() / (out.cpu() - exact).pow(2).sum())
        assert sqnr > 20, f"{product}: SQNR {sqnr:.1f} dB against the unquantized product"


# ----------------------------------------------------------------------------
# Reference, backends, torch.library
# ----------------------------------------------------------------------------


def test_reference_matches_torch_scaled_mm():
    """An independent implementation: torch._scaled_mm (tensor scales, b column-major)."""
    a, b = _operands(48, 40, 96, "tensor", "tensor")
    a, b = _to(a, "cpu"), _to(b, "cpu")
    with reference():
        ours = tf8.scaled_mm(a, b, out_dtype=torch.float32)
    theirs = torch._scaled_mm(a.data, b.data, a.scale, b.scale, out_dtype=torch.float32)
    _, bound = _bound(a, b)
    assert ((ours.double() - theirs.double()).abs() <= 2 * bound).all()


@pytest.mark.parametrize("mnk", [(150, 140, 256), (130, 128, 256)], ids=["edge-blocks", "tiled-blocks"])
@pytest.mark.parametrize("pairing", CORE_PAIRINGS + [("none", "none"), ("tensor", "mx")], ids=_pid)
def test_cpu_reference_within_the_fp32_bound(pairing, mnk):
    """The CPU path (decode into reused buffers; the bf16 matmul mode where every operand value
    is exact in bf16, fp32 BLAS where a block / MX scale is folded into the operands) keeps the
    fp32-accumulation bound. On a CPU whose oneDNN runs that mode on bf16 units (AMX), a block-
    scaled operand sent there (about 2**-9 relative) would break it; on the AMD CI machines
    oneDNN computes in fp32 there, so this checks the bound of the route taken."""
    if _k_extent(pairing[0]) and _k_extent(pairing[1]) and _k_extent(pairing[0]) != _k_extent(pairing[1]):
        pytest.skip("block shapes do not match along K")
    a, b = _operands(*mnk, *pairing)
    a, b = _to(a, "cpu"), _to(b, "cpu")
    with reference():
        _check(tf8.scaled_mm(a, b, out_dtype=torch.float32), a, b)


def test_cpu_bf16_route_accumulates_and_outputs_fp32():
    """Values k/8 in [1, 2) (exact in e4m3 and bf16): products are multiples of 2**-6 and every
    partial sum of K=512 stays below 2**18, so any fp32 accumulation is exact while a bf16
    accumulator or output (8 bits) is not, on any CPU. The process-wide matmul mode is restored."""
    g = torch.Generator().manual_seed(3)
    a64 = 1 + torch.randint(0, 8, (96, 512), generator=g).double() / 8
    b64 = 1 + torch.randint(0, 8, (512, 80), generator=g).double() / 8
    a = FP8Tensor(a64.float().to(torch.float8_e4m3fn), torch.tensor(1.0), tf8.E4M3, Scaling("none"))
    b = FP8Tensor(b64.float().to(torch.float8_e4m3fn), torch.tensor(1.0), tf8.E4M3, Scaling("none"))
    before = torch.backends.mkldnn.matmul.fp32_precision
    with reference():
        out = tf8.scaled_mm(a, b, out_dtype=torch.float32)
    assert torch.equal(out.double(), a64 @ b64)
    assert torch.backends.mkldnn.matmul.fp32_precision == before


def test_cpu_decode_buffers_are_reused_and_never_alias_results(monkeypatch):
    """Later products reuse the decode buffers without touching earlier outputs; operands over
    the cap get fresh buffers; release_workspace() frees them."""
    a1, b1 = (_to(t, "cpu") for t in _operands(130, 140, 160, "tensor", "tensor"))
    a2, b2 = (_to(t, "cpu") for t in _operands(140, 130, 150, "row", "row"))
    with reference():
        y1 = tf8.scaled_mm(a1, b1, out_dtype=torch.float32)
        kept = y1.clone()
        buffer = mm._workspace.a
        y2 = tf8.scaled_mm(a2, b2, out_dtype=torch.float32)
        assert mm._workspace.a is buffer  # the larger operand came first: reused, not grown
        assert torch.equal(y1, kept)
        assert torch.equal(tf8.scaled_mm(a1, b1, out_dtype=torch.float32), kept)
        _check(y2, a2, b2)
        mm.release_workspace()
        assert getattr(mm._workspace, "a", None) is None
        monkeypatch.setattr(mm, "_WORKSPACE_MAX_NUMEL", 100)
        assert torch.equal(tf8.scaled_mm(a1, b1, out_dtype=torch.float32), kept)
        assert getattr(mm._workspace, "a", None) is None


def test_cpu_tensors_use_the_reference_and_interpret_runs_the_kernel(monkeypatch):
    calls = []
    real_kernel, real_ref = mm._scaled_mm_triton, mm.scaled_mm_reference
    monkeypatch.setattr(mm, "_scaled_mm_triton", lambda *a, **k: calls.append("kernel") or real_kernel(*a, **k))
    monkeypatch.setattr(mm, "scaled_mm_reference", lambda *a, **k: calls.append("reference") or real_ref(*a, **k))
    a, b = _operands(5, 7, 64, "tensor", "tensor")
    a, b = _to(a, "cpu"), _to(b, "cpu")
    with tf8.use_backend("auto"):
        tf8.scaled_mm(a, b)
    with tf8.use_backend("torch"):
        tf8.scaled_mm(a, b)
    assert calls == ["reference", "reference"]
    if not ON_GPU:
        with tf8.use_backend("interpret"):
            tf8.scaled_mm(a, b)
        assert calls[-1] == "kernel"


def test_library_op_opcheck():
    a, b = _operands(8, 16, 64, (1, 128), (128, 128))
    a, b = _to(a, "cpu"), _to(b, "cpu")
    args = (a.data, a.scale, a.scaling.spec(), b.data, b.scale, b.scaling.spec(), None, "bfloat16", "",
            None, "nearest", 0, True)
    with reference():
        torch.library.opcheck(mm.scaled_mm_op, args, test_utils=("test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph():
    """quantize + scaled_mm trace into one graph (the ops are torch.library custom ops)."""
    x, w = torch.randn(32, 64, device=KERNEL_DEVICE), torch.randn(48, 64, device=KERNEL_DEVICE)

    def f(x, w):
        x_q = tf8.quantize(x, "e4m3", scaling=(1, 128))
        w_q = tf8.quantize(w, "e4m3", scaling=(128, 128))
        return tf8.scaled_mm(x_q, mm.transpose_view(w_q), out_dtype=torch.float32)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True)(x, w), f(x, w))


def test_empty_and_zero_k():
    with reference():
        a = tf8.quantize(torch.randn(0, 32), "e4m3", scaling="tensor")
        b = mm.transpose_view(tf8.quantize(torch.randn(8, 32), "e4m3", scaling="tensor"))
    with kernels():
        assert tf8.scaled_mm(_to(a), _to(b)).shape == (0, 8)
    a = FP8Tensor(torch.zeros(3, 0, dtype=torch.float8_e4m3fn), torch.ones(()), tf8.E4M3, Scaling("tensor"))
    b = FP8Tensor(torch.zeros(0, 5, dtype=torch.float8_e4m3fn), torch.ones(()), tf8.E4M3, Scaling("tensor"))
    bias = torch.arange(5.0)
    with kernels():
        out = tf8.scaled_mm(_to(a), _to(b), bias=bias.to(KERNEL_DEVICE), out_dtype=torch.float32)
    assert torch.equal(out.cpu(), bias.expand(3, 5))


# ----------------------------------------------------------------------------
# Configurations and ahead-of-time specs
# ----------------------------------------------------------------------------


def test_keep_prunes_by_size_and_pick_caches_per_bucket():
    small = [c for c in mm.CONFIGS if mm.keep(c, 16, 16, 4096)]
    assert small and all(c.block_m <= 64 and c.block_n <= 64 for c in small)
    # large problems: the largest tiles and the half-size ones (two CTAs per SM hide the promotion)
    assert {(c.block_m, c.block_n) for c in mm.CONFIGS if mm.keep(c, 8192, 8192, 8192)} == {(128, 128), (64, 128)}
    assert all(mm.keep(c, 512, 512, 512) for c in mm.CONFIGS)
    timings = {}

    def run(variant, config):
        timings[(variant, config)] = timings.get((variant, config), 0) + 1
        return config.block_m * config.block_n * (1 if variant == "tma" else 2) + config.num_stages

    mm._TUNED.clear()
    best = mm.pick_config(1000, 1000, 8192, ("k",), run, ("tma", "pointer"))
    assert best == ("tma", min(mm.CONFIGS, key=lambda c: c.block_m * c.block_n + c.num_stages))
    assert len(timings) == 2 * len(mm.CONFIGS)  # every kept config in both variants, once
    assert mm.pick_config(600, 900, 5000, ("k",), run, ("tma", "pointer")) == best  # same buckets: cached
    assert len(timings) == 2 * len(mm.CONFIGS)
    assert mm.pick_config(100, 100, 100)[0] == "pointer"


def test_aot_specs_cover_every_config_both_kernels_and_formats():
    specs = mm.aot_specs()
    names = [s.name for s in specs]
    assert len(set(names)) == len(names) and len(specs) <= 21  # about 63 compiles for three targets
    for config in mm.CONFIGS:
        for variant in ("pointer", "tma"):
            assert any(f"[{variant} {config} " in name for name in names), (variant, config)
    text = " ".join(names)
    for needle in ("e4m3xe4m3", "e5m2xe5m2", "e4m3xe5m2", "e5m2xe4m3", "-> e4m3", "-> e5m2", " sr]", "+bias",
                   "a:mx", "a:row b:col", "a:1x128 b:128x128", "a:1x128 b:128x1", "-> fp32", "-> fp16", " fast-acc]"):
        assert needle in text, needle
    for spec in specs:
        assert spec.fp8_mma and set(spec.signature) == set(spec.kernel.arg_names)
        assert all(spec.signature[k] == "constexpr" for k in spec.constexprs)


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


def _q(rows, cols, fmt="e4m3", scaling="tensor"):
    with reference():
        return tf8.quantize(torch.randn(rows, cols), fmt, scaling=scaling)


def test_errors():
    a = _q(4, 64)
    b = mm.transpose_view(_q(8, 64))
    with pytest.raises(ValueError, match="mismatched K"):
        tf8.scaled_mm(a, mm.transpose_view(_q(8, 32)))
    with pytest.raises(TypeError, match="FP8Tensor operands"):
        tf8.scaled_mm(torch.randn(4, 64), b)
    with pytest.raises(TypeError, match="float8_e4m3fn or float8_e5m2"):
        tf8.scaled_mm(FP8Tensor(torch.randn(4, 64, dtype=torch.float16), a.scale, a.fmt, a.scaling), b)
    with pytest.raises(TypeError, match="float8_e4m3fn or float8_e5m2, got torch.float8_e4m3fnuz"):
        tf8.scaled_mm(a, FP8Tensor(b.data.view(torch.float8_e4m3fnuz), b.scale, b.fmt, b.scaling))
    with pytest.raises(TypeError, match="fmt is e5m2"):
        tf8.scaled_mm(FP8Tensor(a.data, a.scale, tf8.E5M2, a.scaling), b)
    with pytest.raises(ValueError, match=r"must be torch.float32 of shape \(4, 1\)"):
        tf8.scaled_mm(FP8Tensor(a.data, torch.ones(4), a.fmt, Scaling("row")), b)
    with pytest.raises(ValueError, match=r"scale for scaling 1x128 .* shape \(4, 1\)"):
        tf8.scaled_mm(FP8Tensor(a.data, torch.ones(4, 2), a.fmt, Scaling("block", (1, 128))), b)
    with pytest.raises(ValueError, match="torch.float8_e8m0fnu"):
        tf8.scaled_mm(FP8Tensor(a.data, torch.ones(4, 2), a.fmt, Scaling("mx", (1, 32))), b)
    with pytest.raises(ValueError, match="scaling col of a .* per element of K"):
        tf8.scaled_mm(_q(4, 64, scaling="col"), b)
    with pytest.raises(ValueError, match="scaling row of b"):
        tf8.scaled_mm(a, _q(64, 8, scaling="row"))
    with pytest.raises(ValueError, match="scaling 1x16 of a"):
        tf8.scaled_mm(_q(4, 64, scaling=(1, 16)), b)
    with pytest.raises(ValueError, match="unsupported scaling pairing"):
        tf8.scaled_mm(_q(4, 64, scaling="mx"), mm.transpose_view(_q(8, 64, scaling=(128, 128))))
    for bad in (torch.int32, torch.float64, torch.float8_e4m3fn, "bf16"):
        with pytest.raises(TypeError, match="out_dtype must be a floating dtype"):
            tf8.scaled_mm(a, b, out_dtype=bad)
    with pytest.raises(ValueError, match=r"bias must be .* shape \(8,\)"):
        tf8.scaled_mm(a, b, bias=torch.zeros(4))
    with pytest.raises(ValueError, match="unknown fp8 format"):
        tf8.scaled_mm(a, b, out_fmt="e3m4")
    with pytest.raises(ValueError, match="needs seed"):
        tf8.scaled_mm(a, b, out_fmt="e4m3", rounding="stochastic")
    with pytest.raises(ValueError, match="apply to an fp8 output"):
        tf8.scaled_mm(a, b, rounding="stochastic", seed=1)
    with pytest.raises(ValueError, match="out_scale must be a float32 tensor of shape"):
        tf8.scaled_mm(a, b, out_fmt="e4m3", out_scale=torch.ones(1))
    with pytest.raises(ValueError, match="must be 2-D"):
        tf8.scaled_mm(FP8Tensor(a.data.reshape(2, 2, 64), a.scale, a.fmt, a.scaling), b)
