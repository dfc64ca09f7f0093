"""tf8.optim: fused SGD / AdamW with 16-bit master weights (numerics.md section 8).

"kernel" runs the Triton kernels (interpreted on a CPU, compiled on a GPU, see
conftest.py); "reference" runs the PyTorch reference on the CPU. Kernel results are
compared with the reference bit for bit.
"""
from __future__ import annotations

import io
import math

import pytest
import torch

from conftest import KERNEL_DEVICE, kernels, reference
from tritonfp8 import optim as tf8_optim
from tritonfp8.ops import optim as ops_optim
from tritonfp8.training import LossScaler

# implementation -> (context manager, device of the tensors)
IMPLS = {"kernel": (kernels, KERNEL_DEVICE), "reference": (reference, "cpu")}

SHAPES = [(5, 7), (13,), (3, 1, 9), (1100,)]  # odd sizes; the last spans two chunks


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    a, b = a.cpu(), b.cpu()
    if not torch.equal(bits(a), bits(b)):
        diff = (bits(a) != bits(b)).sum().item()
        raise AssertionError(f"{what}: {diff} bytes differ")


def make_params(seed: int = 0, shapes=SHAPES, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


def scripted_grads(params, step: int, seed: int = 1):
    """Deterministic gradients of step ``step``; parameter 1 has none on step 2."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    for i, p in enumerate(params):
        if step == 2 and i == 1:
            p.grad = None
        else:
            p.grad = (torch.randn(p.shape, generator=g) * 2.0 ** (i - 2)).to(p.device, p.dtype)


def run_steps(cls, kwargs, impl, steps=3, grad_scale=None):
    context, device = IMPLS[impl]
    params = make_params(device=device)
    opt = cls(params, seed=1234, **kwargs)
    with context():
        for step in range(1, steps + 1):
            scripted_grads(params, step)
            scale = grad_scale(params) if callable(grad_scale) else grad_scale
            opt.step(grad_scale=scale)
    return params, opt


def assert_same_run(a, b):
    (pa, oa), (pb, ob) = a, b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert_bits_equal(x, y, f"param {i}")
        assert set(oa.state[x]) == set(ob.state[y])
        for key in oa.state[x]:
            assert_bits_equal(oa.state[x][key], ob.state[y][key], f"state {key} of param {i}")


# ----------------------------------------------------------------------------
# Kernel vs reference, bit for bit
# ----------------------------------------------------------------------------

MASTER_STATE_ROUNDING = [
    pytest.param(m, s, r, id=f"{str(m)[6:]}-{str(s)[6:]}-{r}")
    for m in (torch.float16, torch.bfloat16, torch.float32)
    for s in (torch.float32, torch.bfloat16)
    for r in (("stochastic", "nearest") if m != torch.float32 else ("stochastic",))
]


@pytest.mark.parametrize("master,state,rounding", MASTER_STATE_ROUNDING)
@pytest.mark.parametrize("cls,kwargs", [
    pytest.param(tf8_optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01), id="sgd-momentum-wd"),
    pytest.param(tf8_optim.AdamW, dict(lr=0.01, weight_decay=0.1), id="adamw"),
])
def test_kernel_matches_reference_bit_exact(cls, kwargs, master, state, rounding):
    # Three steps; parameter 1 misses a gradient on step 2, so step 3 needs two launches
    # (two step counts) and exercises the chunk tables with gaps.
    kw = dict(kwargs, master_dtype=master, state_dtype=state, rounding=rounding)
    assert_same_run(run_steps(cls, kw, "kernel"), run_steps(cls, kw, "reference"))


@pytest.mark.parametrize("cls,kwargs", [
    pytest.param(tf8_optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True), id="sgd-nesterov-maximize"),
    pytest.param(tf8_optim.SGD, dict(lr=0.1), id="sgd-plain"),
    pytest.param(tf8_optim.AdamW, dict(lr=0.01, weight_decay=0.0, maximize=True, betas=(0.8, 0.99)), id="adamw-maximize"),
])
@pytest.mark.parametrize("master", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kernel_matches_reference_other_modes(cls, kwargs, master):
    kw = dict(kwargs, master_dtype=master)
    assert_same_run(run_steps(cls, kw, "kernel"), run_steps(cls, kw, "reference"))


@pytest.mark.parametrize("cls", [tf8_optim.SGD, tf8_optim.AdamW], ids=["sgd", "adamw"])
def test_kernel_per_parameter_grad_scales_bit_exact(cls):
    """Per-parameter loss scales (adaptive loss scaling) are removed inside the kernel."""
    def scales(params):
        return {p: torch.tensor(2.0 ** (3 * i + 1), device=p.device) for i, p in enumerate(params)}

    kw = dict(lr=0.05, master_dtype=torch.float16)
    assert_same_run(run_steps(cls, kw, "kernel", grad_scale=scales), run_steps(cls, kw, "reference", grad_scale=scales))


# ----------------------------------------------------------------------------
# Against independent implementations
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.1, maximize=True),
], ids=["plain", "momentum", "nesterov"])
@pytest.mark.parametrize("impl", IMPLS)
def test_sgd_fp32_matches_torch_sgd(kwargs, impl):
    # torch's CPU add(alpha=) may use an FMA: equal up to a few fp32 ulps, not bit for bit.
    context, device = IMPLS[impl]
    ours = make_params(device=device)
    theirs = make_params(device=device)
    opt = tf8_optim.SGD(ours, master_dtype=torch.float32, **kwargs)
    ref = torch.optim.SGD(theirs, **kwargs)
    with context():
        for step in (1, 3, 4, 5):
            scripted_grads(ours, step)
            scripted_grads(theirs, step)
            opt.step()
            ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_adamw_fp32_matches_torch_adamw(impl):
    context, device = IMPLS[impl]
    ours = make_params(device=device)
    theirs = make_params(device=device)
    kwargs = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    opt = tf8_optim.AdamW(ours, master_dtype=torch.float32, **kwargs)
    ref = torch.optim.AdamW(theirs, **kwargs)
    with context():
        for step in (1, 3, 4, 5, 6):
            scripted_grads(ours, step)
            scripted_grads(theirs, step)
            opt.step()
            ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], rtol=1e-5, atol=0)
        assert float(opt.state[a]["step"]) == float(ref.state[b]["step"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_nearest_rounding_equals_torch_cast(dtype, impl):
    """rounding='nearest' writes exactly torch's round-to-nearest-even cast of the fp32 update."""
    context, device = IMPLS[impl]
    params = make_params(device=device)
    opt = tf8_optim.SGD(params, lr=0.37, master_dtype=dtype, rounding="nearest")
    scripted_grads(params, 1)
    lr32 = torch.tensor(0.37, dtype=torch.float32)
    expected = [(p.detach().float().cpu() - p.grad.float().cpu() * lr32).to(dtype) for p in params]
    with context():
        opt.step()
    for p, e in zip(params, expected):
        assert_bits_equal(p, e)


# ----------------------------------------------------------------------------
# Swamping: nearest rounding loses small updates, stochastic rounding keeps them
# ----------------------------------------------------------------------------


def swamping_run(dtype, rounding, impl, n=512, steps=1000, lr=1e-4):
    context, device = IMPLS[impl]
    p = torch.nn.Parameter(torch.ones(n, device=device))
    opt = tf8_optim.SGD([p], lr=lr, master_dtype=dtype, rounding=rounding, seed=2024)
    grad = torch.full((n,), -1.0, dtype=dtype, device=device)  # w <- w + lr every step
    with context():
        for _ in range(steps):
            p.grad = grad
            opt.step()
    return p.detach().cpu()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_swamping_nearest_never_moves(dtype):
    w = swamping_run(dtype, "nearest", "reference")
    assert torch.equal(w, torch.ones_like(w))  # 1e-4 is under half an ulp of 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_swamping_stochastic_reaches_expected_value(dtype):
    """Each step rounds w + d up by one ulp u with probability exactly p = d / u (w stays in [1, 2)),
    so after 1000 steps w = 1 + u * Binomial(1000, p): mean 1 + 1000 d (= 1.1), std u * sqrt(1000 p (1-p))."""
    n, steps = 512, 1000
    w = swamping_run(dtype, "stochastic", "reference", n=n, steps=steps).double()
    u = 2.0 ** -(10 if dtype == torch.float16 else 7)  # ulp of [1, 2)
    lr32 = float(torch.tensor(1e-4, dtype=torch.float32))
    d = round(lr32 / 2**-23) * 2**-23  # fp32(w + lr) - w for every w in [1, 2) on the 16-bit grid
    p = d / u
    mean = 1.0 + steps * d
    std = u * math.sqrt(steps * p * (1 - p))  # fp16: 0.0094, bf16: 0.0277
    assert abs(mean - 1.1) < 2e-5  # d is 1e-4 rounded to fp32's grid at 1.0 (2**-23)
    assert (w < 2).all()  # the grid spacing never changed
    assert abs(w.mean().item() - mean) < 4.5 * std / math.sqrt(n), (w.mean().item(), mean, std)
    ratio = w.var().item() / std**2  # sample variance within about 5 sigma (relative sd sqrt(2/n))
    assert 0.7 < ratio < 1.3, ratio
    assert ((w - 1) / u).round().eq((w - 1) / u).all()  # whole ulps only


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_swamping_kernel_matches_reference_after_1000_steps(dtype):
    """The kernel's 1000 stochastic (and nearest) steps are the reference's, bit for bit, so the
    statistics above hold for it."""
    a = swamping_run(dtype, "stochastic", "kernel", n=64)
    b = swamping_run(dtype, "stochastic", "reference", n=64)
    assert_bits_equal(a, b)
    assert 1.05 < a.double().mean().item() < 1.15
    assert torch.equal(swamping_run(dtype, "nearest", "kernel", n=16, steps=50), torch.ones(16, dtype=dtype))


# ----------------------------------------------------------------------------
# Layout: 16-bit master weights in flat buffers, one launch per bucket
# ----------------------------------------------------------------------------


def test_parameters_become_16bit_views_of_one_buffer():
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    opt = tf8_optim.SGD(model.parameters(), lr=0.1, master_dtype=torch.bfloat16)
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 and isinstance(p, torch.nn.Parameter) for p in params)
    assert sum(p.numel() * p.element_size() for p in params) * 2 == fp32_bytes
    (flat,) = opt.master_buffers()
    base, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    for p, b in zip(params, before):
        assert base <= p.data_ptr() < end
        assert (p.data_ptr() - base) % 32 == 0  # segments start at multiples of 16 elements
        assert_bits_equal(p.detach(), b.to(torch.bfloat16))  # converted with round to nearest
    out = model(torch.randn(4, 7, dtype=torch.bfloat16))
    out.sum().backward()
    with reference():
        opt.step()
    assert all(base <= p.data_ptr() < end for p in model.parameters())


class _CountingKernel:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_one_kernel_launch_per_bucket(monkeypatch):
    counter = _CountingKernel(ops_optim._sgd_kernel)
    monkeypatch.setattr(ops_optim, "_sgd_kernel", counter)
    params = make_params(shapes=[(3, 4), (17,), (2, 2, 2), (33,), (1,)], device=KERNEL_DEVICE)
    opt = tf8_optim.SGD(
        [{"params": params[:3]}, {"params": params[3:], "lr": 0.01}], lr=0.1, momentum=0.9, master_dtype=torch.float16
    )
    with kernels():
        for _ in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
    assert counter.launches == 2 * 2  # two param groups (one dtype each), two steps


@pytest.mark.parametrize("impl", IMPLS)
def test_parameter_without_grad_is_untouched(impl):
    context, device = IMPLS[impl]
    params = make_params(device=device)
    opt = tf8_optim.AdamW(params, lr=0.1, master_dtype=torch.float16)
    with context():
        scripted_grads(params, 1)
        opt.step()
        before = params[1].detach().clone()
        state_before = {k: v.clone() for k, v in opt.state[params[1]].items()}
        scripted_grads(params, 2)  # no gradient for parameter 1
        opt.step()
    assert_bits_equal(params[1].detach(), before)
    for k, v in state_before.items():
        assert_bits_equal(opt.state[params[1]][k], v, k)
    assert float(opt.state[params[1]]["step"]) == 1 and float(opt.state[params[0]]["step"]) == 2


def test_gradients_are_adopted_into_the_flat_buffer():
    model = torch.nn.Linear(6, 4)
    opt = tf8_optim.SGD(model.parameters(), lr=0.1, master_dtype=torch.float32)
    x = torch.randn(3, 6)
    model(x).sum().backward()
    opt.step()
    (grad_flat,) = opt.prepare_grads()
    ptrs = [p.grad.data_ptr() for p in model.parameters()]
    lo, hi = grad_flat.data_ptr(), grad_flat.data_ptr() + grad_flat.numel() * 4
    assert all(lo <= q < hi for q in ptrs)
    opt.zero_grad(set_to_none=False)
    model(x).sum().backward()  # accumulates in place into the flat buffer
    assert [p.grad.data_ptr() for p in model.parameters()] == ptrs
    expected = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()  # set_to_none: fresh tensors next time, copied in at step()
    model(x).sum().backward()
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p.grad, e)
    opt.step()
    assert [p.grad.data_ptr() for p in model.parameters()] == ptrs


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


def test_error_mixed_devices():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="one device.*cpu.*meta"):
        tf8_optim.SGD([a, b], lr=0.1)


def test_error_non_float_parameter():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match="floating-point parameters.*torch.int64"):
        tf8_optim.AdamW([p])


@pytest.mark.parametrize("bad", [torch.float64, torch.float8_e5m2, "fp64", "int8"])
def test_error_unsupported_master_dtype(bad):
    with pytest.raises(ValueError, match="unsupported master_dtype.*torch.float16, torch.bfloat16, torch.float32"):
        tf8_optim.SGD([torch.nn.Parameter(torch.zeros(3))], master_dtype=bad)


def test_error_unsupported_parameter_dtype_without_master_dtype():
    with pytest.raises(ValueError, match="unsupported parameter dtype torch.float64.*master_dtype="):
        tf8_optim.SGD([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])


@pytest.mark.parametrize("kwargs,match", [
    (dict(state_dtype=torch.float16), "unsupported state_dtype"),
    (dict(rounding="up"), "unknown rounding 'up'.*nearest.*stochastic"),
    (dict(nesterov=True), "nesterov=True requires momentum > 0"),
    (dict(lr=-1.0), "lr must be"),
    (dict(seed=-3), "seed must be"),
])
def test_error_bad_sgd_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tf8_optim.SGD([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_error_bad_adamw_betas():
    with pytest.raises(ValueError, match="betas"):
        tf8_optim.AdamW([torch.nn.Parameter(torch.zeros(3))], betas=(0.9, 1.0))


def test_error_overflowing_conversion():
    with pytest.raises(ValueError, match="outside the torch.float16 range"):
        tf8_optim.SGD([torch.nn.Parameter(torch.tensor([1e6]))], master_dtype=torch.float16)


def test_error_parameter_in_two_optimizers():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = tf8_optim.SGD([p])
    with pytest.raises(ValueError, match="already belongs to another"):
        tf8_optim.AdamW([p])
    del opt


def test_error_model_moved_after_building_the_optimizer():
    model = torch.nn.Linear(3, 2)
    opt = tf8_optim.SGD(model.parameters(), lr=0.1, master_dtype=torch.float16)
    model.float()  # replaces the parameters' storage
    model(torch.randn(1, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="no longer lives in the optimizer's flat buffer"):
        opt.step()


# ----------------------------------------------------------------------------
# State dicts and bit-identical resume
# ----------------------------------------------------------------------------


def _train(model, opt, scaler, steps, start, impl):
    context, device = IMPLS[impl]
    with context():
        for i in range(start, start + steps):
            g = torch.Generator().manual_seed(100 + i)
            x = torch.randn(8, 6, generator=g).to(device, torch.bfloat16)
            y = torch.randn(8, 3, generator=g).to(device, torch.bfloat16)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
            scaler.scale(loss).backward()
            if i == start + 1:  # one overflow: a skipped step inside the run
                next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()


def _fresh(cls, kwargs, impl):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(IMPLS[impl][1])
    opt = cls(model.parameters(), master_dtype=torch.bfloat16, **kwargs)
    scaler = LossScaler("dynamic", init_scale=2.0**10, growth_interval=2)
    return model, opt, scaler


@pytest.mark.parametrize("cls,kwargs", [
    pytest.param(tf8_optim.SGD, dict(lr=0.05, momentum=0.9, state_dtype=torch.bfloat16), id="sgd"),
    pytest.param(tf8_optim.AdamW, dict(lr=0.01), id="adamw"),
])
@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_round_trip_resumes_bit_identically(cls, kwargs, impl):
    model, opt, scaler = _fresh(cls, kwargs, impl)
    _train(model, opt, scaler, 3, 0, impl)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict()}, buf)
    _train(model, opt, scaler, 3, 3, impl)  # the uninterrupted run

    buf.seek(0)
    saved = torch.load(buf)
    model2, opt2, scaler2 = _fresh(cls, dict(kwargs, seed=99), impl)  # a different seed: the state dict restores it
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    scaler2.load_state_dict(saved["scaler"])
    _train(model2, opt2, scaler2, 3, 3, impl)

    assert scaler2.state_dict() == scaler.state_dict()
    assert scaler.skipped_steps == 2
    for p, q in zip(model.parameters(), model2.parameters()):
        assert_bits_equal(p.detach(), q.detach())
        for key in opt.state[p]:
            assert_bits_equal(opt.state[p][key], opt2.state[q][key], key)


def test_load_state_dict_rejects_other_state_dtype():
    p = torch.nn.Parameter(torch.zeros(3))
    a = tf8_optim.SGD([p], lr=0.1, momentum=0.9, state_dtype=torch.bfloat16)
    p.grad = torch.ones(3)
    a.step()
    sd = a.state_dict()
    del a
    q = torch.nn.Parameter(torch.zeros(3))
    b = tf8_optim.SGD([q], lr=0.1, momentum=0.9, state_dtype=torch.float32)
    with pytest.raises(ValueError, match="state_dtype"):
        b.load_state_dict(sd)


# Ahead-of-time compilation (sm_89/90/100, no spills, no FMA contraction): tests/test_aot.py.


def test_load_state_dict_of_its_own_state_dict_keeps_the_state():
    """state_dict() returns views of the flat state buffers; loading it back into the same
    optimizer (no copy in between) must not zero them before reading them."""
    p = torch.nn.Parameter(torch.randn(40))
    opt = tf8_optim.AdamW([p], lr=1e-2, master_dtype=torch.bfloat16, seed=3)
    for _ in range(2):
        p.grad = torch.randn(40).to(torch.bfloat16)
        opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    assert before["exp_avg"].abs().sum() > 0
    opt.load_state_dict(opt.state_dict())
    for k, v in before.items():
        assert torch.equal(opt.state[p][k], v), k
