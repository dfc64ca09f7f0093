"""The reference backend compiled by Inductor (the CPU path) == the eager reference, bit for bit.

Every element-wise piece of the reference (the cast for each rounding, scaling, format,
saturation mode, input dtype and transposed copy; the decode of fp8 codes; the products'
epilogue; the optimizer updates for every mode) runs once compiled and once eager on inputs
large enough for the compiled path (backend.COMPILE_MIN_NUMEL), and each test checks that
the compiled form really ran. The interpreter kernels are compared with the compiled form in
tests/test_cast_kernel.py and here for the optimizer (same large shapes).
"""
from __future__ import annotations

import pytest
import torch

import tritonfp8 as tf8
from conftest import KERNEL_DEVICE, kernels, reference
from tritonfp8 import backend
from tritonfp8 import optim as tf8_optim
from tritonfp8.ops import optim as ops_optim
from tritonfp8.ops import quantize as q_ops
from tritonfp8.ops import rounding

SHAPE = (130, 257)  # 33410 elements: above COMPILE_MIN_NUMEL, odd in both dims
SCALINGS = ["none", "tensor", "row", "col", (1, 128), (128, 1), (128, 128), (1, 32), "mx"]


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def _assert_same(a: tf8.FP8Tensor, b: tf8.FP8Tensor):
    assert torch.equal(_bits(a.data), _bits(b.data)), "data differs"
    assert a.scale.dtype == b.scale.dtype and torch.equal(_bits(a.scale), _bits(b.scale)), "scale differs"
    assert torch.equal(a.amax, b.amax) and int(a.saturated) == int(b.saturated)
    assert (a.transposed is None) == (b.transposed is None)
    if a.transposed is not None:
        assert a.transposed.data.is_contiguous() and b.transposed.data.is_contiguous()
        _assert_same(a.transposed, b.transposed)


def _input(shape=SHAPE, dtype=torch.float32):
    x = torch.randn(shape) * torch.exp2(torch.randint(-12, 12, shape).float())
    flat = x.view(-1)
    flat[3], flat[5], flat[7], flat[-1] = float("nan"), float("inf"), -1e6, 1e-9
    return x.to(dtype)


def _compiled_and_eager(fn, counter):
    before = counter.compiled_calls
    with reference():
        compiled = fn()
        assert counter.compiled_calls > before, "the compiled reference did not run"
        with backend.use_compile(False):
            eager = fn()
    return compiled, eager


@pytest.mark.parametrize("transpose", [False, True], ids=["", "T"])
@pytest.mark.parametrize("rounding_mode", ["nearest", "stochastic"])
@pytest.mark.parametrize("scaling", SCALINGS, ids=str)
def test_cast_compiled_equals_eager(scaling, rounding_mode, transpose):
    x = _input()
    fmt = "e4m3" if (len(str(scaling)) + len(rounding_mode)) % 2 else "e5m2"
    a, b = _compiled_and_eager(lambda: tf8.quantize(x, fmt, rounding_mode, scaling, seed=2**40 + 3, transpose=transpose),
                               q_ops._round_codes_reference)
    _assert_same(a, b)


@pytest.mark.parametrize("fmt", ["e5m2", "e4m3"])
@pytest.mark.parametrize("saturate", [True, False], ids=["sat", "nosat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cast_formats_saturation_dtypes_compiled_equals_eager(fmt, saturate, dtype):
    x = _input(dtype=dtype)
    for rounding_mode, scaling in (("stochastic", "tensor"), ("nearest", "none")):
        a, b = _compiled_and_eager(
            lambda: tf8.quantize(x, fmt, rounding_mode, scaling, seed=9, saturate=saturate, transpose=True),
            q_ops._round_codes_reference)
        _assert_same(a, b)


def test_delayed_scale_and_options_compiled_equals_eager():
    x = _input()
    scale = torch.tensor(0.37)
    for kwargs in (dict(scaling="tensor", scale=scale, transpose=True), dict(scaling="row", margin=2),
                   dict(scaling=(1, 128), power_of_two=True, transpose=True)):
        a, b = _compiled_and_eager(lambda: tf8.quantize(x, "e4m3", "stochastic", seed=4, **kwargs),
                                   q_ops._round_codes_reference)
        _assert_same(a, b)


@pytest.mark.parametrize("fmt", [tf8.E4M3, tf8.E5M2], ids=["e4m3", "e5m2"])
def test_decode_of_every_code_compiled_equals_eager_and_torch(fmt):
    codes = torch.arange(256, dtype=torch.uint8).repeat(128)  # every code, above the compile threshold
    a, b = _compiled_and_eager(lambda: rounding.decode_codes(codes, fmt), rounding.decode_codes)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    expected = codes.view(fmt.torch_dtype).float()
    nan = expected.isnan()
    assert torch.equal(a.isnan(), nan) and torch.equal(a.view(torch.int32)[~nan], expected.view(torch.int32)[~nan])


@pytest.mark.parametrize("scalings", [("tensor", "tensor"), ("row", "col"), ((1, 128), (128, 128)), ("none", "none")],
                         ids=str)
def test_product_compiled_equals_eager(scalings):
    a = tf8.quantize(torch.randn(200, 300), "e4m3", "nearest", scalings[0])
    b = tf8.quantize(torch.randn(300, 170), "e5m2", "nearest", scalings[1])
    bias = torch.randn(170)
    y, y_eager = _compiled_and_eager(lambda: tf8.scaled_mm(a, b, bias=bias, out_dtype=torch.float32),
                                     rounding.decode_codes_into)
    assert torch.equal(y, y_eager)
    q8, q8_eager = _compiled_and_eager(
        lambda: tf8.scaled_mm(a, b, out_fmt="e5m2", rounding="stochastic", seed=5), q_ops._round_codes_reference)
    assert torch.equal(q8.data.view(torch.uint8), q8_eager.data.view(torch.uint8))


@pytest.mark.parametrize("fmt", [tf8.formats.FP16, tf8.formats.BF16], ids=["fp16", "bf16"])
def test_16_bit_codes_to_tensor_keep_every_pattern(fmt):
    """codes_to_tensor writes 16-bit patterns as byte pairs (a store Inductor vectorizes):
    every pattern keeps its bits, compiled and eager."""
    codes = torch.arange(1 << 16, dtype=torch.int32)
    convert = backend.compiled_reference(lambda c: rounding.codes_to_tensor(c, fmt))
    expected = (((codes & 0xFFFF) ^ 0x8000) - 0x8000).to(torch.int16)
    a, b = _compiled_and_eager(lambda: convert(codes), convert)
    assert a.dtype == fmt.torch_dtype and a.shape == codes.shape
    assert torch.equal(a.view(torch.int16), expected) and torch.equal(b.view(torch.int16), expected)


OPTIM_CASES = [
    pytest.param(tf8_optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01), id="sgd-momentum-wd"),
    pytest.param(tf8_optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True), id="sgd-nesterov-maximize"),
    pytest.param(tf8_optim.SGD, dict(lr=0.1), id="sgd-plain"),
    pytest.param(tf8_optim.AdamW, dict(lr=0.01, weight_decay=0.1), id="adamw"),
]
LARGE_SHAPES = [(130, 129), (13,), (5000,)]


def _optimizer_run(cls, kwargs, device="cpu", steps=3):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in LARGE_SHAPES]
    opt = cls(params, seed=77, **kwargs)
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        for i, p in enumerate(params):
            p.grad = (torch.randn(p.shape, generator=gen) * 2.0 ** (i - 2)).to(p.device, p.dtype)
        opt.step(grad_scale=torch.tensor(0.5, device=device))
    return [p.detach().cpu().reshape(-1).view(torch.uint8) for p in params] + [
        t.detach().cpu().reshape(-1).view(torch.uint8) for p in params for t in opt.state[p].values()
        if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("master,rounding_mode", [(torch.float16, "stochastic"), (torch.bfloat16, "stochastic"),
                                                  (torch.float16, "nearest"), (torch.float32, "stochastic")],
                         ids=["fp16-sr", "bf16-sr", "fp16-nearest", "fp32"])
@pytest.mark.parametrize("cls,kwargs", OPTIM_CASES)
def test_optimizer_compiled_equals_eager(cls, kwargs, master, rounding_mode):
    kw = dict(kwargs, master_dtype=master, rounding=rounding_mode)
    counter = ops_optim._adamw_run_reference if cls is tf8_optim.AdamW else ops_optim._sgd_run_reference
    a, b = _compiled_and_eager(lambda: _optimizer_run(cls, kw), counter)
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("cls,kwargs", [OPTIM_CASES[0], OPTIM_CASES[3]])
def test_optimizer_kernel_equals_compiled_reference(cls, kwargs):
    kw = dict(kwargs, master_dtype=torch.bfloat16, state_dtype=torch.bfloat16, rounding="stochastic")
    with kernels():
        k = _optimizer_run(cls, kw, device=KERNEL_DEVICE, steps=2)
    counter = ops_optim._adamw_run_reference if cls is tf8_optim.AdamW else ops_optim._sgd_run_reference
    before = counter.compiled_calls
    with reference():
        r = _optimizer_run(cls, kw, steps=2)
    assert counter.compiled_calls > before
    assert all(torch.equal(x, y) for x, y in zip(k, r))


def test_failed_compile_falls_back_once_with_a_warning(monkeypatch):
    """A compiler failure (no C++ compiler) runs the eager reference and says so once."""
    calls = []

    def broken(*args, **kwargs):
        from torch._inductor.exc import InductorError

        calls.append(1)
        raise InductorError(RuntimeError("no C++ compiler found"), "")

    fn = backend.compiled_reference(lambda t: t + 1)
    fn(torch.zeros(backend.COMPILE_MIN_NUMEL))  # builds the compiled form
    monkeypatch.setattr(backend, "_compile_broken", "")
    monkeypatch.setattr(torch, "compile", lambda *a, **k: broken)
    fn2 = backend.compiled_reference(lambda t: t * 2)
    x = torch.ones(backend.COMPILE_MIN_NUMEL)
    with pytest.warns(RuntimeWarning, match="eager reference"):
        assert torch.equal(fn2(x), x * 2)
    assert not backend.compile_enabled()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fn2(x), x * 2)  # eager now, no second warning
    assert len(calls) == 1
