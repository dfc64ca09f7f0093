"""The public cast API: clear errors, empty tensors, the torch.library op, backends."""
import math

import pytest
import torch

import tritonfp8 as tf8
from conftest import KERNEL_DEVICE, kernels, reference
from tritonfp8.ops.quantize import quantize_op


@pytest.mark.parametrize("bad,match", [
    (torch.arange(6).reshape(2, 3), "float32, bfloat16 or float16"),
    (torch.ones(2, 3, dtype=torch.complex64), "float32, bfloat16 or float16"),
    (torch.ones(2, 3, dtype=torch.float64), "convert float64 to float32"),
    ([1.0, 2.0], "expects a torch.Tensor"),
])
def test_bad_input_types(bad, match):
    with pytest.raises(TypeError, match=match):
        tf8.quantize(bad)


@pytest.mark.parametrize("kwargs,match", [
    (dict(fmt="e3m4"), r"unknown fp8 format 'e3m4'; use one of \['e4m3', 'e5m2'\]"),
    (dict(rounding="up"), r"unknown rounding 'up'; use one of \('nearest', 'stochastic'\)"),
    (dict(scaling="block"), "unknown scaling 'block'; use 'none', 'tensor', 'row', 'col', 'mx' or a block shape"),
    (dict(scaling=(1, 100)), r"block scaling \(1, 100\) is not supported; use \(1, B\), \(B, 1\) or \(B, B\)"),
    (dict(scaling=(64, 128)), r"block scaling \(64, 128\) is not supported"),
    (dict(scaling=(1, 128, 1)), "must be a pair of ints"),
    (dict(rounding="stochastic"), r"rounding='stochastic' needs seed=<int>"),
    (dict(rounding="stochastic", seed=-1), r"seed must be an int in \[0, 2\*\*63\)"),
    (dict(rounding="stochastic", seed=1.5), r"seed must be an int"),
    (dict(scaling="tensor", scale=torch.ones(2)), r"must be a float32 tensor of shape \(\)"),
    (dict(scaling="row", scale=torch.ones(4, 1)), r"shape \(3, 1\)"),
    (dict(scaling=(1, 32), scale=torch.ones(3, 1)), "delayed scaling"),
])
def test_bad_arguments_say_what_to_change(kwargs, match):
    x = torch.randn(3, 64)
    with pytest.raises((ValueError, TypeError), match=match):
        tf8.quantize(x, **kwargs)


@pytest.mark.parametrize("scaling", ["row", "col", (1, 128), (128, 128), "mx"], ids=str)
def test_grouped_scaling_needs_two_dims(scaling):
    with pytest.raises(ValueError, match="needs at least 2 dimensions"):
        tf8.quantize(torch.randn(256), scaling=scaling)
    with pytest.raises(ValueError, match="transpose=True needs at least 2 dimensions"):
        tf8.quantize(torch.randn(256), transpose=True)


EMPTY_CASES = [
    (shape, scaling)
    for shape in [(0,), (0, 5), (5, 0), (0, 128), (2, 0, 3)]
    for scaling in ["none", "tensor", "row", (1, 128), "mx"]
    if len(shape) >= 2 or scaling in ("none", "tensor")  # grouped scalings need 2 dims (tested above)
]


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("shape,scaling", EMPTY_CASES, ids=str)
def test_empty_tensors(shape, scaling, impl):
    x = torch.empty(shape, device=KERNEL_DEVICE if impl == "kernel" else "cpu")
    with kernels() if impl == "kernel" else reference():
        q = tf8.quantize(x, "e4m3", "stochastic", scaling, seed=0, transpose=len(shape) >= 2)
    assert q.data.shape == x.shape and q.data.dtype == torch.float8_e4m3fn
    assert q.dequantize().shape == x.shape
    assert int(q.saturated) == 0 and float(q.amax) == 0.0
    if len(shape) >= 2:
        k, m = shape[-1], math.prod(shape[:-1])
        assert q.transposed.data.shape == (k, m)


def test_backend_choice():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        tf8.set_backend("cuda")
    if not torch.cuda.is_available():
        with tf8.use_backend("triton"), pytest.raises(RuntimeError, match="needs|CUDA tensors"):
            tf8.quantize(x)
    assert tf8.get_backend() == "auto"
    from tritonfp8.backend import resolve
    assert resolve("cpu") == "torch"  # the reference is the CPU default


def test_library_op_registration():
    """opcheck: schema, fake (meta) implementation and dispatch agree."""
    x = torch.randn(33, 130)
    for args in [
        (x, "e4m3", "nearest", "block:1x128", 0, True, True, None, 0, False),
        (x, "e5m2", "stochastic", "tensor", 7, True, False, None, 1, True),
        (x, "e4m3", "nearest", "mx", 0, False, True, None, 0, False),
    ]:
        torch.library.opcheck(quantize_op, args)


def test_traces_with_torch_compile_fullgraph():
    def f(x):
        q = tf8.quantize(x, "e4m3", "nearest", (1, 128))
        return q.data.float() * q.scale.repeat_interleave(128, 1)[:, : x.shape[1]]

    x = torch.randn(8, 200)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), f(x))


def test_fp8tensor_dequantize_and_repr():
    x = torch.randn(2, 3, 64)
    q = tf8.quantize(x, "e4m3", "nearest", "row")
    assert q.scale.shape == (6, 1)
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert torch.allclose(q.dequantize(), x, rtol=2**-4, atol=0)
    assert "fmt=e4m3" in repr(q) and "scaling=row" in repr(q)
