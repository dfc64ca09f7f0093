"""FP8 attention: the Triton kernels (interpreted on CPU, compiled on a GPU) vs the reference,
both vs fp64 attention with derived error bounds, forward and backward, and the API.

Error model (derived below, checked element by element):

* u = 2**-4 (E4M3 nearest: half an ulp, relative), u5 = 2**-3 (E5M2), 2**-9 (bf16).
* Every sum the kernels compute (q.k over D, P.v and l over N_k, dO.v and dO.o over D,
  P^T dO over N_q, dS k over N_k, dS^T q over N_q) is accurate to acc(n) * sum|terms|,
  acc(n) = gamma_n = n 2**-24 / (1 - n 2**-24) for fp32 sums (the interpreter and the
  reference), plus 2**-11 on a GPU (Hopper's fp8 MMA keeps ~14 bits inside a <= 128 term
  chunk; the kernels promote every chunk).
* Softmax is Lipschitz in the sup norm of its logits: if |S'_ij - S_ij| <= delta_i for all
  j, then P'_ij / P_ij is in [exp(-2 delta_i), exp(2 delta_i)].
"""
import functools
import math

import pytest
import torch

import tritonfp8 as tf8
from conftest import KERNEL_DEVICE, ON_GPU, kernels, reference
from tritonfp8.formats import E5M2
from tritonfp8.ops import attention as attn

U4 = 2.0**-4  # E4M3 unit roundoff
UBF16 = 2.0**-9
U32 = 2.0**-24
# Absolute rounding of a P in E4M3's subnormal range, in units of P (the forward quantizes
# p * 2**7 with p_max in [1, 2) so l >= 1; the backward quantizes P * 2**8): half of 2**-9.
TAU_FWD = 2.0**-10 / attn.P_SCALE_FWD
TAU_BWD = 2.0**-10 / attn.P_SCALE_BWD
HW_ACC = 2.0**-11 if ON_GPU else 0.0


def acc(n: int) -> float:
    """Relative error bound (times sum |terms|) of an n-term sum as the kernels compute it."""
    return n * U32 / (1 - n * U32) + HW_ACC


# Kernel vs reference: the two compute the same quantized values and differ only in the order
# of fp32 sums. Worst case for an n-term fp32 sum is n 2**-24 of sum|terms| (n <= 128 here:
# 2**-17), amplified by at most ~|s2| ln 2 <= 8 through exp2 in the scores: 2**-14 of the
# output's magnitude. The E4M3 codes of P are the same (the integer stabilizer makes the
# online rescaling exact) except (a) for P that are E4M3-subnormal at the row's final max
# (p < 2**-13), which the kernel may have rounded at a smaller running max: at most 2**-16 max|v|
# per such P in o (_online_tolerance), and (b) when a last-bit difference of exp2 / q.k moves a
# value across an E4M3 rounding boundary (probability ~2**-20 per element; none with these
# inputs). On a GPU the fp8 MMA accumulates with ~14 bits, so about 1% of P codes move by one
# E4M3 step: 2**-7.
ACC_TOL = 2.0**-7 if ON_GPU else 2.0**-14


def _online_tolerance(q, k, v, causal, sm=None, attn_mask=None):
    """Per output row: (number of P that are E4M3-subnormal at the final row max) * 2**-16 * max|v|."""
    sm = 1 / math.sqrt(q.shape[-1]) if sm is None else sm
    with reference():
        q8, k8, v8, scales = attn.quantize_operands(q, k, v)
    s2 = attn._scores_log2(q8, k8, scales, sm).double() + _bias(attn_mask) * math.log2(math.e)
    mask = _mask(q.shape[2], k.shape[2], causal, attn_mask)
    s2 = s2.masked_fill(~mask, -math.inf)
    p = torch.exp2(s2 - torch.floor(s2).amax(-1, keepdim=True))
    n_sub = (p * attn.P_SCALE_FWD < 2.0**-6).logical_and(mask).sum(-1, keepdim=True)
    b, h = q.shape[:2]
    v_max = (v8.float().abs().amax(dim=(2, 3)) * scales[2].reshape(b, h)).reshape(b, h, 1, 1)
    return n_sub * 2.0**-16 * v_max


# (B, H, N_q, N_k, D, causal): odd lengths, N_q != N_k both ways, every head dim, both masks.
# The interpreter runs 16 x 32 / 32 x 16 tiles, so these cross several blocks of each kernel.
CASES = [
    pytest.param((1, 2, 77, 77, 64, False), id="77x77-D64"),
    pytest.param((1, 2, 77, 77, 64, True), id="77x77-D64-causal"),
    pytest.param((1, 1, 17, 70, 128, False), id="17x70-D128"),
    pytest.param((1, 2, 33, 33, 128, True), id="33x33-D128-causal"),
    pytest.param((2, 1, 40, 17, 32, False), id="40x17-D32"),
    pytest.param((1, 1, 1, 1, 16, False), id="1x1-D16"),
    pytest.param((1, 1, 1, 1, 64, True), id="1x1-D64-causal"),
]


def _inputs(case, seed=0, dtype=torch.float32):
    """q, k, v, dO [B, H, N, D] with a different magnitude per head (per-(b, h) scales matter)."""
    b, h, n_q, n_k, d, _ = case
    g = torch.Generator().manual_seed(seed)
    head_scale = torch.exp2(torch.arange(h, dtype=torch.float32) - 1).reshape(1, h, 1, 1)
    q = torch.randn(b, h, n_q, d, generator=g) * head_scale
    k = torch.randn(b, h, n_k, d, generator=g) * 1.5
    v = torch.randn(b, h, n_k, d, generator=g) / head_scale
    do = torch.randn(b, h, n_q, d, generator=g) * 1e-3  # gradients are small: scales adapt
    return [t.to(dtype) for t in (q, k, v, do)]


def _run(q, k, v, do, causal, scale=None, device="cpu", **kwargs):
    """(o, dq, dk, dv) as fp32 CPU tensors, through tf8's public attention and autograd."""
    q, k, v = (t.detach().to(device).requires_grad_(True) for t in (q, k, v))
    kwargs = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()}
    o = attn.attention(q, k, v, causal=causal, scale=scale, **kwargs)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do.to(device))
    return [t.detach().float().cpu() for t in (o, dq, dk, dv)]


@functools.lru_cache(maxsize=None)
def _results(case):
    """Kernel and reference results of one case, computed once for the tests that share them."""
    q, k, v, do = _inputs(case)
    causal = case[-1]
    with kernels():
        kern = _run(q, k, v, do, causal, device=KERNEL_DEVICE)
    with reference():
        ref = _run(q, k, v, do, causal)
    return kern, ref


NAMES = ("o", "dq", "dk", "dv")


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case):
    """Forward output and input gradients: kernel vs reference at fp32-accumulation level."""
    kern, ref = _results(case)
    q, k, v, _ = _inputs(case)
    online = _online_tolerance(q, k, v, case[-1])
    for name, a, b in zip(NAMES, kern, ref):
        tol = ACC_TOL * b.abs().max() + (online if name == "o" else 0)
        err = (a - b).abs()
        assert torch.all(err <= tol), f"{name}: kernel vs reference differ by up to {(err / tol).max():.3g} x the tolerance"


# ----------------------------------------------------------------------------
# fp64 attention and the error bounds
# ----------------------------------------------------------------------------


def _mask(n_q, n_k, causal, attn_mask=None):
    """Where scores count: the causal triangle and where an SDPA attn_mask attends (bool True,
    float above -2**99: lower values, finfo.min included, weigh exp(-2**99) = 0 in fp64 as in the
    kernels), broadcast with [B, H, N_q, N_k]."""
    m = torch.ones(n_q, n_k, dtype=torch.bool)
    m = m.tril() if causal else m
    if attn_mask is not None:
        m = m & (attn_mask if attn_mask.dtype == torch.bool else attn_mask > -2.0**99)
    return m


def _bias(attn_mask):
    """The float mask's additive scores (fp64, 0 where masked or for a bool mask)."""
    if attn_mask is None or attn_mask.dtype == torch.bool:
        return 0.0
    return attn_mask.double().masked_fill(attn_mask <= -2.0**99, 0.0)


def _softmax(s, mask):
    """Softmax over the valid keys; a row with none gives 0 (as torch's SDPA)."""
    return torch.softmax(s.masked_fill(~mask, -math.inf), dim=-1).nan_to_num(0.0)


def _dequantized(q, k, v, do):
    """fp64 values of the quantized operands, exactly as the op quantizes them."""
    with reference():
        q8, k8, v8, scales = attn.quantize_operands(q, k, v)
        do8, do_scale = attn.quantize_heads(do, E5M2)
    b, h = q.shape[:2]
    s = scales.double().reshape(3, b, h, 1, 1)
    return q8.double() * s[0], k8.double() * s[1], v8.double() * s[2], do8.double() * do_scale.double().reshape(b, h, 1, 1)


def _fp64_attention(q, k, v, do, causal, sm, attn_mask=None):
    """Exact (fp64) forward and backward of softmax attention."""
    mask = _mask(q.shape[2], k.shape[2], causal, attn_mask)
    p = _softmax(sm * q @ k.transpose(-1, -2) + _bias(attn_mask), mask)
    o = p @ v
    dv = p.transpose(-1, -2) @ do
    dp = do @ v.transpose(-1, -2)
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    return o, sm * ds @ k, sm * ds.transpose(-1, -2) @ q, dv, p, dp, delta, ds


def error_bounds(q, k, v, do, o_fp8, causal, sm, attn_mask=None):
    """Element-wise bounds on |fp8 result - fp64 attention of the original inputs| for
    (o, dq, dk, dv), a posteriori: from the actual quantization errors of q, k, v, dO (each
    within u |x| plus half a subnormal step) and the first-order-free triangle inequalities
    of each product. ``o_fp8`` is the fp8 forward's output (it enters delta)."""
    qh, kh, vh, doh = _dequantized(q, k, v, do)
    q, k, v, do = (t.double() for t in (q, k, v, do))
    n_q, n_k, d = q.shape[2], k.shape[2], q.shape[3]
    mask = _mask(n_q, n_k, causal, attn_mask)
    valid = mask.double()
    o, dq, dk, dv, p, dp, delta, ds = _fp64_attention(q, k, v, do, causal, sm, attn_mask)
    eq, ek, ev, edo = (qh - q).abs(), (kh - k).abs(), (vh - v).abs(), (doh - do).abs()

    # Score perturbation: quantization (exact, fp64) + the fp32 q.k sum + the scale products
    # (+ a float mask: its log2 rounding and the fp32 addition, 2 U32 of each magnitude).
    s_hat = sm * qh @ kh.transpose(-1, -2)
    s_abs = sm * qh.abs() @ kh.abs().transpose(-1, -2)
    bias = _bias(attn_mask)
    dev = ((s_hat - sm * q @ k.transpose(-1, -2)).abs() + acc(d) * s_abs + 8 * U32 * s_hat.abs()
           + 4 * U32 * (abs(bias) + (s_hat + bias).abs())) * valid
    delta_s = dev.amax(-1, keepdim=True)
    rho = torch.expm1(2 * delta_s)  # |P_fp32 - P| <= rho P (before P is rounded to E4M3)

    # Forward: P_hat = P_fp32 (1 + eta) (+ TAU_FWD in E4M3's subnormal range), l and the
    # final scaling in fp32 (theta); o_fp8 = sum_j P_hat_ij v_hat_j, summed with acc(n_k).
    theta = acc(n_k) + 8 * U32
    eta = (U4 + theta + U4 * theta) * (1 + rho) + rho
    mag_o = p @ vh.abs()
    b_o = (eta * p + TAU_FWD * valid) @ vh.abs() + p @ ev + acc(n_k) * (1 + U4) * (1 + rho) * mag_o + 16 * U32 * mag_o

    # Backward: P_b = exp2(s2 - lse2) with the forward's fp32 lse: |P_b - P| <= rho_b P.
    rho_b = (1 + rho) * (1 + theta) - 1
    p_b = p * (1 + rho_b)
    e_p = (U4 * (1 + rho_b) + rho_b) * p + TAU_BWD * valid  # |E4M3(P_b) - P|
    mag_dv = p_b.transpose(-1, -2) @ doh.abs()
    b_dv = (e_p.transpose(-1, -2) @ doh.abs() + p.transpose(-1, -2) @ edo
            + acc(n_q) * (1 + U4) * mag_dv + 16 * U32 * mag_dv)
    e_dp = edo @ vh.abs().transpose(-1, -2) + do.abs() @ ev.transpose(-1, -2) + acc(d) * doh.abs() @ vh.abs().transpose(-1, -2)
    o_fp8 = o_fp8.double()
    e_delta = (edo * o_fp8.abs() + do.abs() * (o_fp8 - o).abs() + acc(d) * doh.abs() * o_fp8.abs()).sum(-1, keepdim=True)
    g = (dp - delta).abs() + e_dp + e_delta  # >= |dP_fp8 - delta_fp8|
    e_ds = (rho_b * p * g + p * (e_dp + e_delta) + (UBF16 + 4 * U32) * p_b * g) * valid
    ds_fp8 = p_b * g * (1 + UBF16) * valid  # >= |dS_fp8| (bf16)
    mag_dq = sm * ds_fp8 @ kh.abs()
    mag_dk = sm * ds_fp8.transpose(-1, -2) @ qh.abs()
    b_dq = sm * (e_ds @ kh.abs() + ds.abs() @ ek) + acc(n_k) * mag_dq + 16 * U32 * mag_dq
    b_dk = sm * (e_ds.transpose(-1, -2) @ qh.abs() + ds.abs().transpose(-1, -2) @ eq) + acc(n_q) * mag_dk + 16 * U32 * mag_dk
    return (o, dq, dk, dv), (b_o, b_dq, b_dk, b_dv)


def a_priori_forward_bound(q, k, v, causal, sm):
    """The forward bound from u alone (no quantized values): |x_hat - x| <= u |x| + 2**-10 s_x
    with s_x = amax(x of that head) / 448, so |S_hat - S| <= sm sum_d (e_q |k| + (|q| + e_q) e_k)."""
    q, k, v = (t.double() for t in (q, k, v))
    mask = _mask(q.shape[2], k.shape[2], causal)
    n_k, d = k.shape[2], q.shape[3]

    def err(x):
        return U4 * x.abs() + 2.0**-10 * x.abs().amax(dim=(2, 3), keepdim=True) / 448

    eq, ek, ev = err(q), err(k), err(v)
    p = _softmax(sm * q @ k.transpose(-1, -2), mask)
    qa, ka = q.abs() + eq, k.abs() + ek
    dev = sm * (eq @ k.abs().transpose(-1, -2) + qa @ ek.transpose(-1, -2)) + (acc(d) + 8 * U32) * sm * qa @ ka.transpose(-1, -2)
    rho = torch.expm1(2 * (dev * mask).amax(-1, keepdim=True))
    theta = acc(n_k) + 8 * U32
    eta = (U4 + theta + U4 * theta) * (1 + rho) + rho
    va = v.abs() + ev
    mag = p @ va
    return p @ v, (eta * p + TAU_FWD * mask) @ va + p @ ev + acc(n_k) * (1 + U4) * (1 + rho) * mag + 16 * U32 * mag


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("case", CASES)
def test_error_vs_fp64_within_derived_bound(case, impl):
    """Forward output and input gradients vs fp64 attention on the same (unquantized) inputs."""
    q, k, v, do = _inputs(case)
    causal = case[-1]
    kern, ref = _results(case)
    got = kern if impl == "kernel" else ref
    sm = 1 / math.sqrt(q.shape[-1])
    exact, bounds = error_bounds(q, k, v, do, got[0], causal, sm)
    for name, x, want, bound in zip(NAMES, got, exact, bounds):
        err = (x.double() - want).abs()
        worst = (err / bound).max().item()
        assert worst <= 1, f"{name}: error exceeds the derived bound by a factor {worst:.3g}"
    o_exact, b_apriori = a_priori_forward_bound(q, k, v, causal, sm)
    assert torch.all((got[0].double() - o_exact).abs() <= b_apriori), "forward: a-priori bound violated"


@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
def test_reference_matches_an_independent_construction(causal):
    """The reference's quantization points, rebuilt in fp64 from the dequantized operands with
    torch's own casts (float8_e4m3fn and bfloat16 round to nearest even): P = exp2(s2 - m) with
    the integer stabilizer m, E4M3(P * 2**7) / 2**7 in the forward; E4M3(P * 2**8) / 2**8
    (normalized P), dS = bf16(P (dP - delta)) in the backward. Equal up to fp32 vs fp64
    arithmetic (ACC_TOL)."""
    case = (1, 2, 50, 50, 64, causal)
    q, k, v, do = _inputs(case, seed=5)
    sm = 1 / math.sqrt(64)
    with reference():
        ref = _run(q, k, v, do, causal)
    qh, kh, vh, doh = _dequantized(q, k, v, do)
    mask = _mask(50, 50, causal)
    s2 = (sm * math.log2(math.e) * qh @ kh.transpose(-1, -2)).masked_fill(~mask, -math.inf)
    m = torch.floor(s2).amax(-1, keepdim=True)
    p = torch.exp2(s2 - m)
    l = p.sum(-1, keepdim=True)

    def e4m3(x):
        return x.float().to(torch.float8_e4m3fn).double()

    o = (e4m3(p * 2**7) / 2**7) @ vh / l
    pn = p / l
    dv = (e4m3(pn * 2**8) / 2**8).transpose(-1, -2) @ doh
    ds = (pn * (doh @ vh.transpose(-1, -2) - (doh * o).sum(-1, keepdim=True))).float().bfloat16().double()
    dq, dk = sm * ds @ kh, sm * ds.transpose(-1, -2) @ qh
    for name, got, want in zip(NAMES, ref, (o, dq, dk, dv)):
        assert (got.double() - want).abs().max() <= ACC_TOL * want.abs().max(), name


def test_bound_is_not_vacuous():
    """The a-posteriori bounds stay a modest multiple of the actual errors (they are worst
    cases over the signs of the rounding errors, so not tight)."""
    case = (1, 2, 77, 77, 64, False)
    q, k, v, do = _inputs(case)
    _, ref = _results(case)
    exact, bounds = error_bounds(q, k, v, do, ref[0], False, 1 / 8)
    for name, x, want, bound in zip(NAMES, ref, exact, bounds):
        err = (x.double() - want).abs()
        ratio = (err.max() / bound.max()).item()
        assert 0.02 < ratio <= 1, f"{name}: max error / max bound = {ratio:.3g}"


# ----------------------------------------------------------------------------
# attn_mask and grouped-query attention
# ----------------------------------------------------------------------------


def _attn_masks(b, h, n_q, n_k):
    """SDPA masks of each kind: key padding (bool [B, 1, 1, N_k]), a random bool [N_q, N_k] with a
    row masked everywhere, a float bias [B, H, N_q, N_k] with -inf entries, and a finfo.min
    padding mask (Hugging Face's form) [B, 1, N_q, N_k]."""
    g = torch.Generator().manual_seed(11)
    padding = torch.ones(b, 1, 1, n_k, dtype=torch.bool)
    padding[0, ..., n_k - 5:] = False
    random = torch.rand(n_q, n_k, generator=g) < 0.7
    random[3] = False
    bias = torch.randn(b, h, n_q, n_k, generator=g) * 2
    bias[torch.rand(b, h, n_q, n_k, generator=g) < 0.2] = -math.inf
    bias[..., 0] = 0.0  # every row keeps a key
    hf = torch.zeros(b, 1, n_q, n_k)
    hf[-1, ..., :4] = torch.finfo(torch.float32).min
    return {"key_padding": padding, "random_bool": random, "float_bias": bias, "finfo_min": hf}


MASK_CASE = (2, 2, 45, 38, 64, False)  # crosses several tiles of each interpreted kernel


@functools.lru_cache(maxsize=None)
def _mask_results(kind):
    q, k, v, do = _inputs(MASK_CASE, seed=3)
    mask = _attn_masks(*MASK_CASE[:4])[kind]
    with kernels():
        kern = _run(q, k, v, do, False, device=KERNEL_DEVICE, attn_mask=mask)
    with reference():
        ref = _run(q, k, v, do, False, attn_mask=mask)
    return kern, ref


@pytest.mark.parametrize("kind", ["key_padding", "random_bool", "float_bias", "finfo_min"])
def test_masked_attention_kernel_matches_reference(kind):
    q, k, v, _ = _inputs(MASK_CASE, seed=3)
    mask = _attn_masks(*MASK_CASE[:4])[kind]
    kern, ref = _mask_results(kind)
    online = _online_tolerance(q, k, v, False, attn_mask=mask)
    for name, a, b in zip(NAMES, kern, ref):
        tol = ACC_TOL * b.abs().max() + (online if name == "o" else 0)
        assert torch.all((a - b).abs() <= tol), f"{name}: kernel vs reference differ beyond the tolerance"


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("kind", ["key_padding", "random_bool", "float_bias", "finfo_min"])
def test_masked_attention_within_derived_bound(kind, impl):
    """Forward and gradients vs fp64 attention with the same mask, within the derived bounds;
    a row masked everywhere gives 0 (random_bool row 3) as torch's SDPA; the finfo.min mask
    matches torch's own fp32 SDPA (which averages a fully masked row)."""
    q, k, v, do = _inputs(MASK_CASE, seed=3)
    mask = _attn_masks(*MASK_CASE[:4])[kind]
    kern, ref = _mask_results(kind)
    got = kern if impl == "kernel" else ref
    sm = 1 / math.sqrt(q.shape[-1])
    exact, bounds = error_bounds(q, k, v, do, got[0], False, sm, attn_mask=mask)
    for name, x, want, bound in zip(NAMES, got, exact, bounds):
        err = (x.double() - want).abs()
        worst = (err / bound.clamp_min(1e-300)).max().item()  # a masked key's gradient: 0 within 0
        assert torch.all(err <= bound), f"{name}: error exceeds the derived bound by a factor {worst:.3g}"
    if kind == "random_bool":
        assert torch.all(got[0][:, :, 3] == 0)
    torch_o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (got[0] - torch_o).abs().max() <= 0.1 * torch_o.abs().max()


def test_grouped_query_attention_within_derived_bound():
    """H_q = 4 query heads on H_kv = 2 key/value heads (enable_gqa): the output within the bound of
    the equivalent 4-head attention, and dk / dv within the sum of the bounds of the heads they serve."""
    b, h, h_kv, n, d = 1, 4, 2, 40, 64
    g = torch.Generator().manual_seed(2)
    q = torch.randn(b, h, n, d, generator=g)
    k, v = torch.randn(b, h_kv, n, d, generator=g), torch.randn(b, h_kv, n, d, generator=g)
    do = torch.randn(b, h, n, d, generator=g) * 1e-3
    with kernels():
        got = _run(q, k, v, do, True, device=KERNEL_DEVICE, enable_gqa=True)
    k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    exact, bounds = error_bounds(q, k4, v4, do, got[0], True, 1 / math.sqrt(d))
    grouped = lambda t: t.reshape(b, h_kv, 2, n, d).sum(2)  # noqa: E731  (a k/v head's gradient sums its group)
    for name, x, want, bound in zip(NAMES, got, exact, bounds):
        if name in ("dk", "dv"):
            want, bound = grouped(want), grouped(bound)
        err = (x.double() - want).abs()
        worst = (err / bound.clamp_min(1e-300)).max().item()  # a masked key's gradient: 0 within 0
        assert torch.all(err <= bound), f"{name}: error exceeds the derived bound by a factor {worst:.3g}"
    torch_o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (got[0] - torch_o).abs().max() <= 0.1 * torch_o.abs().max()


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(attn_mask=torch.ones(8, 8, dtype=torch.bool), causal=True), ValueError, "either attn_mask or causal"),
    (dict(attn_mask=torch.ones(8, 8, dtype=torch.int32)), TypeError, "bool .* or floating"),
    (dict(attn_mask=torch.zeros(8, 8, requires_grad=True)), ValueError, "computes no gradient for the mask"),
    (dict(attn_mask=torch.ones(3, 8, dtype=torch.bool)), ValueError, r"does not broadcast to \[B, H, N_q, N_k\]"),
])
def test_bad_masks_say_what_is_accepted(kwargs, exc, match):
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(exc, match=match):
        attn.attention(q, q, q, **kwargs)


def test_double_backward_is_refused():
    q = torch.randn(1, 2, 8, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="second derivative through an fp8 attention"):
        torch.autograd.grad(attn.attention(q, q, q).sum(), q, create_graph=True)


def test_gqa_needs_a_multiple_of_the_kv_heads():
    q, k = torch.randn(1, 3, 8, 64), torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="multiple of the key / value heads"):
        attn.attention(q, k, k, enable_gqa=True)
    with pytest.raises(ValueError, match="must agree in B, H and D"):
        attn.attention(q, k, k)


# ----------------------------------------------------------------------------
# The kernel's own mechanisms
# ----------------------------------------------------------------------------


def test_online_rescaling_matches_whole_matrix_quantization():
    """Scores that grow along the keys make the running max rise in every key block; the
    integer stabilizer still gives the whole-matrix reference's P codes (fp32-level match),
    where a plain exp(s - m_running) would round each block differently (fp8-level)."""
    b, h, n_q, n_k, d = 1, 1, 16, 96, 32
    g = torch.Generator().manual_seed(1)
    u = torch.randn(d, generator=g)
    q = (u + 0.3 * torch.randn(b, h, n_q, d, generator=g)) * 0.5
    ramp = torch.linspace(0, 2.5, n_k).reshape(1, 1, n_k, 1)
    k = ramp * u + 0.3 * torch.randn(b, h, n_k, d, generator=g)
    v = torch.randn(b, h, n_k, d, generator=g)
    with reference():
        q8, k8, _, scales = attn.quantize_operands(q, k, v)
        s2 = attn._scores_log2(q8, k8, scales, 1 / math.sqrt(d))
    first_block_max = torch.floor(s2[..., :32]).amax(-1)
    final_max = torch.floor(s2).amax(-1)
    assert (final_max - first_block_max >= 2).all(), "test data: the running max must grow"
    with kernels():
        o_k = attn.attention(q.to(KERNEL_DEVICE), k.to(KERNEL_DEVICE), v.to(KERNEL_DEVICE)).cpu()
    o_r = attn.attention_reference(q, k, v)
    assert torch.all((o_k - o_r).abs() <= ACC_TOL * o_r.abs().max() + _online_tolerance(q, k, v, False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inputs(dtype):
    """bf16 / fp16 q, k, v: outputs and gradients in that dtype, kernel vs reference within the
    accumulation tolerance plus one ulp of the output dtype (both round fp32 to it, to nearest)."""
    case = (1, 2, 20, 45, 64, False)
    q, k, v, do = _inputs(case, seed=3, dtype=dtype)
    with kernels():
        q_, k_, v_ = (t.to(KERNEL_DEVICE).requires_grad_(True) for t in (q, k, v))
        o = attn.attention(q_, k_, v_)
        grads = torch.autograd.grad(o, (q_, k_, v_), do.to(KERNEL_DEVICE))
        kern = [o, *grads]
    assert all(t.dtype == dtype for t in kern)
    with reference():
        ref = _run(q, k, v, do, False)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for name, a, b in zip(NAMES, kern, ref):
        a = a.detach().float().cpu()
        tol = (ACC_TOL + ulp) * b.abs().max().item()
        assert (a - b).abs().max().item() <= tol, name


def test_strided_inputs_and_explicit_scale():
    """q, k, v as [B, N, H, D] tensors viewed as [B, H, N, D] give bit-identical results to
    contiguous copies; scale=None is 1/sqrt(D)."""
    b, h, n, d = 1, 2, 24, 32
    base = [torch.randn(b, n, h, d) for _ in range(3)]
    views = [t.transpose(1, 2) for t in base]
    copies = [t.contiguous() for t in views]
    with kernels():
        o_view = attn.attention(*(t.to(KERNEL_DEVICE) for t in views), causal=True).cpu()
        o_copy = attn.attention(*(t.to(KERNEL_DEVICE) for t in copies), causal=True, scale=d**-0.5).cpu()
    assert torch.equal(o_view, o_copy)
    with reference():
        assert torch.equal(attn.attention(*views, scale=0.3), attn.attention(*copies, scale=0.3))


@pytest.mark.parametrize("impl", [
    pytest.param("kernel", marks=pytest.mark.skipif(
        not ON_GPU, reason="Triton 3.6's interpreter decodes the E4M3 NaN code 0x7F as 480 in tl.dot")),
    "reference",
])
def test_nan_stays_in_its_row(impl):
    """A NaN in q makes its own output row NaN (its head's scale stays finite: numerics.md 4)."""
    q, k, v, _ = _inputs((1, 1, 20, 20, 32, False))
    q[0, 0, 5, 3] = float("nan")
    ctx, device = (kernels(), KERNEL_DEVICE) if impl == "kernel" else (reference(), "cpu")
    with ctx:
        o = attn.attention(q.to(device), k.to(device), v.to(device)).cpu()
    assert torch.isnan(o[0, 0, 5]).all()
    assert not torch.isnan(o[0, 0, :5]).any() and not torch.isnan(o[0, 0, 6:]).any()


# ----------------------------------------------------------------------------
# API, errors, torch.library
# ----------------------------------------------------------------------------


def _qkv(shape_q=(1, 2, 8, 64), shape_kv=(1, 2, 8, 64), dtype=torch.float32):
    return torch.randn(shape_q, dtype=dtype), torch.randn(shape_kv, dtype=dtype), torch.randn(shape_kv, dtype=dtype)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: [t.to(torch.int32) for t in _qkv()], TypeError, "float32, bfloat16 or float16 q, k, v; q is torch.int32"),
    (lambda: [t.double() for t in _qkv()], TypeError, "float32, bfloat16 or float16"),
    (lambda: (lambda q, k, v: (q, k.half(), v))(*_qkv()), TypeError, "same dtype"),
    (lambda: _qkv((1, 2, 8, 48), (1, 2, 8, 48)), ValueError, r"head dim D=48 is not supported; use one of \(16, 32, 64, 128\)"),
    (lambda: _qkv((1, 2, 8, 256), (1, 2, 8, 256)), ValueError, "head dim D=256"),
    (lambda: _qkv((2, 8, 64), (2, 8, 64)), ValueError, r"4-d q, k, v \[B, H, N, D\]"),
    (lambda: _qkv((1, 2, 8, 64), (1, 3, 8, 64)), ValueError, "must agree in B, H and D"),
    (lambda: _qkv((1, 2, 8, 64), (1, 2, 8, 32)), ValueError, "must agree in B, H and D"),
    (lambda: (lambda q, k, v: (q, k, v[:, :, :5]))(*_qkv()), ValueError, "k and v must have the same shape"),
    (lambda: _qkv((1, 2, 8, 64), (1, 2, 0, 64)), ValueError, "zero keys"),
    (lambda: (lambda q, k, v: (q, k.to("meta"), v))(*_qkv()), ValueError, "same device"),
    (lambda: ([1.0], 2, 3), TypeError, "expects torch.Tensor"),
])
def test_bad_inputs_say_what_is_accepted(make, exc, match):
    with pytest.raises(exc, match=match):
        attn.attention(*make())


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(causal=True), ValueError, r"causal=True needs N_q == N_k .* N_q=8 and N_k=9"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(scale="0.1"), TypeError, "scale must be a float or None"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
])
def test_bad_options(kwargs, exc, match):
    q, k, v = _qkv((1, 2, 8, 64), (1, 2, 9, 64))
    with pytest.raises(exc, match=match):
        attn.attention(q, k, v, **kwargs)


@pytest.mark.skipif(ON_GPU, reason="needs a machine without CUDA")
def test_triton_backend_on_cpu_tensors_is_a_clear_error():
    with tf8.use_backend("triton"), pytest.raises(RuntimeError, match="CUDA tensors"):
        attn.attention(*_qkv())


def test_empty_queries():
    q, k, v = _qkv((2, 3, 0, 32), (2, 3, 5, 32))
    for t in (q, k, v):
        t.requires_grad_(True)
    o = attn.attention(q, k, v)
    assert o.shape == (2, 3, 0, 32)
    dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))
    assert dq.shape == q.shape and torch.all(dk == 0) and torch.all(dv == 0)


def test_library_ops_opcheck():
    q, k, v = _qkv((1, 2, 9, 32), (1, 2, 12, 32))
    with reference():
        torch.library.opcheck(attn.attention_fwd_op, (q, k, v, False, 0.2))
        o, lse, q8, k8, v8, scales = attn.attention_fwd_op(q, k, v, False, 0.2)
        codes = [t.view(torch.uint8) for t in (q8, k8, v8)]
        torch.library.opcheck(attn.attention_bwd_op, (torch.randn_like(o), o, lse, *codes, scales, False, 0.2))


def test_custom_op_autograd_is_the_backward_reference():
    """attention() differentiates through torch.ops.tritonfp8.attention_fwd's registered
    autograd (its only autograd path): the gradients are attention_bwd_reference's."""
    q, k, v = (t.requires_grad_(True) for t in _qkv((1, 1, 10, 16), (1, 1, 10, 16)))
    with reference():
        o = attn.attention(q, k, v, causal=True, scale=0.25)
        do = 2 * o.detach()
        grads = torch.autograd.grad(o.square().sum(), (q, k, v))
        o_op, lse, q8, k8, v8, scales = torch.ops.tritonfp8.attention_fwd(q, k, v, True, 0.25)
        want = attn.attention_bwd_reference(do, o_op.detach(), lse, q8, k8, v8, scales, True, 0.25)
    assert torch.equal(o, o_op)
    assert all(torch.equal(a, b) for a, b in zip(grads, want))


def test_traces_with_torch_compile_fullgraph():
    def loss(q, k, v):
        return attn.attention(q, k, v, causal=True).square().sum()

    q, k, v = (t.requires_grad_(True) for t in _qkv((1, 2, 12, 32), (1, 2, 12, 32)))
    with reference():
        eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
        compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


def test_aot_specs_cover_head_dims_masks_and_kernels():
    specs = attn.aot_specs()
    assert len(specs) <= 20 and len({s.name for s in specs}) == len(specs)
    for kind in ("fwd", "dkdv"):
        # each in both roundings of P: the hardware conversion (sm_90+) and the integer one (what sm_89 runs)
        assert {(s.constexprs["HEAD_DIM"], s.constexprs["CAUSAL"], s.constexprs["HW_P"], s.targets)
                for s in specs if s.name.startswith(f"attention_{kind}[")} \
            == {(d, c, hw, (90, 100) if hw else (89, 90, 100)) for d in (64, 128) for c in (False, True)
                for hw in (False, True)}
    assert any(s.name.startswith("attention_dq[") for s in specs)
    assert {s.name.split("[")[0] for s in specs if s.constexprs.get("HAS_MASK")} == \
        {"attention_fwd", "attention_dkdv", "attention_dq"}
    for s in specs:
        assert set(s.signature) == set(s.kernel.arg_names)
        assert s.fp8_mma == (not s.name.startswith("attention_preprocess"))
        assert all(s.signature[n] == "constexpr" for n in s.constexprs)
