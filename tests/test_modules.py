"""FP8 modules: accuracy bounds vs fp64 per recipe, kernels vs reference, memory, convert, errors.

Error bound (nearest rounding, operands in the normal range): a format with p
explicit mantissa bits has unit roundoff u = 2^-(p+1) (E4M3: 2^-4, E5M2: 2^-3);
stochastic rounding moves a value by less than one ulp, 2u. A product of two
quantized operands then errs by at most (u_a + u_b + u_a u_b) * sum |a_i b_i|,
plus, for values below the smallest normal (no scaling), half a subnormal step
times the other operand, plus the output's own rounding (bf16 2^-9, fp32 accumulation
K * 2^-24). The tests check this elementwise against an fp64 product.
"""
import copy
import math

import pytest
import torch
from torch import nn

import tritonfp8 as tf8
from conftest import KERNEL_DEVICE, kernels, reference
from tritonfp8.nn.functional import padded_k

RECIPES = ["mellempudi2019", "hybrid", "hybrid_delayed", "rowwise", "blockwise", "mxfp8"]


def _unit(tr) -> float:
    fmt = tf8.E4M3 if tr.fmt == "e4m3" else tf8.E5M2
    u = 2.0 ** -(fmt.man_bits + 1)
    return 2 * u if tr.rounding == "stochastic" else u


def _abs_floor(tr, t: torch.Tensor) -> float:
    """Absolute error of values that fall below the smallest normal (only without a scale)."""
    fmt = tf8.E4M3 if tr.fmt == "e4m3" else tf8.E5M2
    if tr.parsed_scaling.kind != "none":
        return 0.0
    return fmt.min_subnormal * (1.0 if tr.rounding == "stochastic" else 0.5)


def _bound(a, b, tr_a, tr_b, out_u: float, k: int):
    """Elementwise bound of |fp8 product - exact product| for a [M, K] @ b [K, N] (float64)."""
    ua, ub = _unit(tr_a), _unit(tr_b)
    abs_ab = a.abs() @ b.abs()
    floor = _abs_floor(tr_a, a) * b.abs().sum(0, keepdim=True) + _abs_floor(tr_b, b) * a.abs().sum(1, keepdim=True)
    floor = floor + _abs_floor(tr_a, a) * _abs_floor(tr_b, b) * k
    exact = a @ b
    return (ua + ub + ua * ub + k * 2.0**-24) * abs_ab * (1 + out_u) + floor * (1 + out_u) + out_u * exact.abs()


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_linear_within_derived_bound_of_fp64(recipe_name):
    recipe = tf8.get_recipe(recipe_name)
    torch.manual_seed(1)
    layer = tf8.nn.Linear(256, 128, recipe=recipe)
    x = torch.randn(96, 256, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64, dy64 = x.detach().double(), layer.weight.detach().double(), dy.double()
    b64 = layer.bias.detach().double()
    # forward: y = x W^T + b
    err = (y.double() - (x64 @ w64.t() + b64)).abs()
    assert torch.all(err <= _bound(x64, w64.t(), recipe.activation, recipe.weight, 2.0**-24, 256) + 1e-6)
    # input gradient: dx = dy W
    err = (x.grad.double() - dy64 @ w64).abs()
    assert torch.all(err <= _bound(dy64, w64, recipe.error, recipe.weight, 2.0**-24, 128) + 1e-6)
    # weight gradient: dW = dy^T x (rounded to fp8 again when the recipe says so)
    wg = recipe.weight_grad
    out_u = _unit(wg) if wg is not None else 2.0**-24
    exact = dy64.t() @ x64
    err = (layer.weight.grad.double() - exact).abs()
    bound = _bound(dy64.t(), x64, recipe.error, recipe.activation, 0.0, 96)
    bound = bound * (1 + out_u) + out_u * exact.abs() + (_abs_floor(wg, exact) if wg is not None else 0.0)
    assert torch.all(err <= bound + 1e-6)
    # and the bound is not vacuous: the typical error is far below the signal
    assert (err.norm() / exact.norm()) < 8 * _unit(recipe.error)


def _patches64(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """x [B, C, *S] -> im2col patches [B*L, C*prod(k)] (channel-major), written out for the test."""
    nd = len(kernel)
    x = torch.nn.functional.pad(x, [p for pad in reversed(padding) for p in pad])
    for i in range(nd):
        # each unfold appends its window dim last: [B, C, *S_out, k_0, ..., k_i]
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])[..., ::dilation[i]]
    x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return x.reshape(-1, math.prod(x.shape[1 + nd:]))


CONV_CASES = {  # name: (module class, stock class, input shape, kwargs, torch padding (left, right) per dim)
    "conv2d_s2": (tf8.nn.Conv2d, nn.Conv2d, (2, 8, 9, 9), dict(kernel_size=3, stride=2, padding=1), ((1, 1),) * 2),
    "conv2d_k4_same": (tf8.nn.Conv2d, nn.Conv2d, (2, 8, 7, 6), dict(kernel_size=4, padding="same"), ((1, 2),) * 2),
    "conv1d_dilated": (tf8.nn.Conv1d, nn.Conv1d, (3, 8, 21), dict(kernel_size=5, stride=2, padding=3, dilation=2,
                                                                   groups=2), ((3, 3),)),
    "conv3d_s2": (tf8.nn.Conv3d, nn.Conv3d, (2, 4, 5, 6, 7), dict(kernel_size=3, stride=(2, 1, 2), padding=1),
                  ((1, 1),) * 3),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("recipe_name", ["hybrid", "blockwise", "mellempudi2019"])
def test_conv_matches_fp64_within_bound(recipe_name, case):
    """conv1d / conv2d / conv3d (even kernels with 'same', dilation, groups, strides): the output
    within the GEMM bound of its patches elementwise, the gradients within 8 units of the error format."""
    cls, stock_cls, shape, kwargs, torch_padding = CONV_CASES[case]
    recipe = tf8.get_recipe(recipe_name)
    torch.manual_seed(0)
    conv = cls(shape[1], 32, recipe=recipe, **kwargs)
    ref = stock_cls(shape[1], 32, **kwargs).double()
    ref.load_state_dict({k: v.double() for k, v in conv.state_dict().items()}, strict=True)
    x = torch.randn(*shape, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    y, y64 = conv(x), ref(x64)
    assert y.shape == y64.shape
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    nd = len(shape) - 2
    kernel = ref.weight.shape[2:]
    stride, dilation = ref.stride, ref.dilation
    cols = _patches64(x64.detach(), kernel, stride, torch_padding, dilation)  # [B*L, C*prod(k)]
    groups, o = ref.groups, ref.out_channels
    k, og = cols.shape[1] // groups, o // groups
    got = (y.double() - y64).movedim(1, -1).reshape(-1, o).abs()
    for g in range(groups):
        w = ref.weight.detach()[g * og:(g + 1) * og].reshape(og, k)
        bound = _bound(cols[:, g * k:(g + 1) * k], w.t(), recipe.activation, recipe.weight, 2.0**-24, padded_k(k))
        assert torch.all(got[:, g * og:(g + 1) * og] <= bound + 1e-6), f"group {g}"
    for g, g64 in ((x.grad, x64.grad), (conv.weight.grad, ref.weight.grad), (conv.bias.grad, ref.bias.grad)):
        assert ((g.double() - g64).norm() / g64.norm()) < 8 * _unit(recipe.error)
    assert nd == len(kernel)


@pytest.mark.parametrize("module", ["linear", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("recipe_name", ["hybrid", "blockwise", "mellempudi2019"])
def test_kernels_match_reference_at_fp32_accumulation_level(recipe_name, module):
    """Same quantized operands (bit-exact casts), so only the fp32 summation order differs."""
    torch.manual_seed(2)
    if module == "linear":
        layer = tf8.nn.Linear(128, 64, recipe=recipe_name)
        x, dy = torch.randn(40, 128), torch.randn(40, 64)
    elif module == "conv1d":
        layer = tf8.nn.Conv1d(16, 32, 4, padding="same", recipe=recipe_name)
        x, dy = torch.randn(2, 16, 9), torch.randn(2, 32, 9)
    elif module == "conv2d":
        layer = tf8.nn.Conv2d(16, 32, 3, padding=1, recipe=recipe_name)
        x, dy = torch.randn(2, 16, 6, 6), torch.randn(2, 32, 6, 6)
    else:
        layer = tf8.nn.Conv3d(8, 32, 3, padding=1, stride=(1, 2, 1), recipe=recipe_name)
        x, dy = torch.randn(1, 8, 4, 5, 4), torch.randn(1, 32, 4, 3, 4)
    grads = {}
    for name, ctx in (("kernel", kernels()), ("reference", reference())):
        layer.fp8_state.calls = 0  # the same seeds for both runs
        xi = x.clone().to(KERNEL_DEVICE if name == "kernel" else "cpu").requires_grad_()
        layer.to(xi.device)
        layer.weight.grad = None
        with ctx:
            y = layer(xi)
            y.backward(dy.to(xi.device))
        grads[name] = [t.detach().cpu().double() for t in (y, xi.grad, layer.weight.grad)]
    for got, want in zip(grads["kernel"], grads["reference"]):
        tol = 256 * 2.0**-23 * want.abs().max()  # K <= 256 terms, fp32 sums in any order
        if recipe_name == "mellempudi2019":  # dW is rounded to E5M2 after the sum: one rounding step may differ
            tol = max(tol, 2.0**-2 * want.abs().max())
        assert (got - want).abs().max() <= tol


def test_saved_activations_are_under_a_third_of_fp32():
    """Saved-tensor hooks count every byte autograd keeps (parameters excluded)."""
    def saved_bytes(model, x):
        params = {p.data_ptr() for p in model.parameters()}
        total = [0]

        def pack(t):
            if t.data_ptr() not in params:
                total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        return total[0]

    torch.manual_seed(0)
    dims = [256] * 5
    fp32 = nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(dims, dims[1:])])
    fp8 = tf8.convert(nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(dims, dims[1:])]), "hybrid")
    x = torch.randn(4096, 256, requires_grad=True)
    ratio = saved_bytes(fp8, x) / saved_bytes(fp32, x)
    # fp8 keeps x^T (1 byte/element) and W^T (1 byte/weight): 1/4 + N/(4 * tokens) = 0.266 here.
    assert ratio <= 0.3, ratio


def test_convert_swaps_and_keeps_per_recipe():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(),
                          nn.Linear(16, 32), nn.Linear(32, 16))
    tf8.convert(model, "mellempudi2019")
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2d", "ReLU", "Conv2d", "Flatten", "Linear", "Linear"]
    assert type(model[0]) is nn.Conv2d and isinstance(model[2], tf8.nn.Conv2d)  # first conv kept
    assert isinstance(model[4], tf8.nn.Linear) and type(model[5]) is nn.Linear  # last linear kept
    model2 = tf8.convert(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), "hybrid", keep=lambda n, m: n == "1")
    assert isinstance(model2[0], tf8.nn.Linear) and type(model2[1]) is nn.Linear


def test_fp8_state_dict_round_trip_keeps_amax_history(tmp_path):
    layer = tf8.nn.Linear(64, 32, recipe="hybrid_delayed")
    for _ in range(3):
        layer(torch.randn(8, 64)).sum().backward()
    path = tmp_path / "layer.pt"
    torch.save({"model": layer.state_dict(), "fp8": tf8.nn.fp8_state_dict(layer)}, path)
    saved = torch.load(path, weights_only=True)
    fresh = tf8.nn.Linear(64, 32, recipe="hybrid_delayed")
    fresh.load_state_dict(saved["model"], strict=True)
    tf8.nn.load_fp8_state_dict(fresh, saved["fp8"])
    assert fresh.fp8_state.calls == 3
    for role, hist in layer.fp8_state.amax_history.items():
        assert torch.equal(fresh.fp8_state.amax_history[role], hist)
        assert hist[:3].gt(0).all() and hist[3:].eq(0).all()
    x = torch.randn(8, 64)
    assert torch.equal(fresh(x), layer(x))


def test_load_fp8_state_dict_says_what_does_not_match():
    model = tf8.convert(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), "hybrid_delayed",
                        keep=lambda n, m: False)
    state = tf8.nn.fp8_state_dict(model)
    assert {k.split(".")[0] for k in state} == {"0", "1"}
    with pytest.raises(KeyError, match="names no tf8.nn module"):
        tf8.nn.load_fp8_state_dict(model, {"2.fp8_state.calls": torch.tensor(1)})
    with pytest.raises(KeyError, match=r"nothing for the tf8.nn modules \['1'\]"):
        tf8.nn.load_fp8_state_dict(model, {k: v for k, v in state.items() if k.startswith("0.")})
    model[1].fp8_state.calls = 7
    tf8.nn.load_fp8_state_dict(model, {k: v for k, v in state.items() if k.startswith("0.")}, strict=False)
    assert model[1].fp8_state.calls == 7


def _stock_and_converted(recipe):
    torch.manual_seed(0)
    stock = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Conv2d(1, 4, 3), nn.Linear(32, 16))
    converted = copy.deepcopy(stock)
    tf8.convert(converted, recipe, keep=lambda name, module: False)
    return stock, converted


def _train(model, steps=3):
    lin = nn.Sequential(model[0], model[1], model[3])
    for step in range(steps):
        lin(torch.randn(8, 64, generator=torch.Generator().manual_seed(step))).sum().backward()
        model[2](torch.randn(1, 1, 6, 6)).sum().backward()


@pytest.mark.parametrize("recipe", ["hybrid_delayed", "mellempudi2019"])
def test_state_dict_has_the_stock_keys_and_loads_strictly_both_ways(recipe):
    """A converted model's state_dict has exactly the stock model's keys, before and after
    training: stock -> converted -> stock loads strictly, and the fp8 state is apart."""
    stock, converted = _stock_and_converted(recipe)
    assert set(converted.state_dict()) == set(stock.state_dict())
    _train(converted)
    state = converted.state_dict()
    assert set(state) == set(stock.state_dict())
    fresh = _stock_and_converted(recipe)[1]
    calls = fresh[0].fp8_state.calls
    fresh.load_state_dict(stock.state_dict(), strict=True)
    assert fresh[0].fp8_state.calls == calls  # a stock checkpoint leaves the fp8 state alone
    for name, value in stock.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value)
    stock.load_state_dict(state, strict=True)
    for name, value in state.items():
        assert torch.equal(stock.state_dict()[name], value)
    fp8 = tf8.nn.fp8_state_dict(converted)
    assert fp8 and all(isinstance(v, torch.Tensor) for v in fp8.values())
    assert set(fp8) == set(tf8.nn.fp8_state_dict(_stock_and_converted(recipe)[1]))  # keys do not change with training


def test_safetensors_round_trip_resumes_bit_identically(tmp_path):
    import safetensors.torch as safetensors_torch
    _, converted = _stock_and_converted("hybrid_delayed")
    _train(converted)
    path, fp8_path = str(tmp_path / "model.safetensors"), str(tmp_path / "fp8.safetensors")
    safetensors_torch.save_file(converted.state_dict(), path)
    safetensors_torch.save_file(tf8.nn.fp8_state_dict(converted), fp8_path)
    fresh = _stock_and_converted("hybrid_delayed")[1]
    fresh.load_state_dict(safetensors_torch.load_file(path), strict=True)
    tf8.nn.load_fp8_state_dict(fresh, safetensors_torch.load_file(fp8_path))
    assert fresh[0].fp8_state.calls == 3
    for a, b in zip((converted[0], converted[3]), (fresh[0], fresh[3])):
        for role, hist in a.fp8_state.amax_history.items():
            assert torch.equal(b.fp8_state.amax_history[role], hist) and hist[0] > 0
    x = torch.randn(4, 64)
    lin = lambda m: m[3](m[1](m[0](x)))  # noqa: E731
    assert torch.equal(lin(fresh), lin(converted))


def test_fp8_state_in_state_dicts_of_earlier_versions_still_loads():
    """Earlier versions put the fp8 state in state_dict, flat (fp8_state.<key>) or nested."""
    layer = tf8.nn.Linear(64, 32, recipe="hybrid_delayed")
    layer(torch.randn(8, 64)).sum().backward()
    flat = {**layer.state_dict(), **tf8.nn.fp8_state_dict(layer)}
    nested = dict(layer.state_dict())
    nested["fp8_state"] = {"seed_base": layer.fp8_state.seed_base, "calls": 1,
                           "amax_history": {k: v.clone() for k, v in layer.fp8_state.amax_history.items()},
                           "error_saturated": torch.zeros((), dtype=torch.int32)}
    for old in (flat, nested):
        fresh = tf8.nn.Linear(64, 32, recipe="hybrid_delayed")
        fresh.load_state_dict(old, strict=True)
        assert fresh.fp8_state.calls == 1 and fresh.fp8_state.seed_base == layer.fp8_state.seed_base
        assert torch.equal(fresh.fp8_state.amax_history["activation"], layer.fp8_state.amax_history["activation"])


@pytest.mark.parametrize("make, shape", [(lambda: tf8.nn.Linear(16, 16), (4, 16)),
                                         (lambda: tf8.nn.Conv2d(2, 16, 3), (1, 2, 5, 5))])
def test_double_backward_is_refused_with_what_to_do(make, shape):
    layer = make()
    x = torch.randn(*shape, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).sum(), x)  # a first derivative works
    assert g.shape == x.shape
    with pytest.raises(RuntimeError, match="second derivative through an fp8 .* fp8_autocast\\(enabled=False\\)"):
        torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)


def test_convert_swaps_every_conv_rank():
    model = tf8.convert(nn.Sequential(nn.Conv1d(4, 16, 3), nn.Conv2d(4, 16, 3), nn.Conv3d(4, 16, 3),
                                      nn.ConvTranspose2d(4, 16, 3)), "hybrid", keep=lambda n, m: False)
    assert [type(m) for m in model] == [tf8.nn.Conv1d, tf8.nn.Conv2d, tf8.nn.Conv3d, nn.ConvTranspose2d]
    kept = tf8.convert(nn.Sequential(nn.Conv1d(4, 16, 3), nn.Conv2d(4, 16, 3)), "mellempudi2019")
    assert type(kept[0]) is nn.Conv1d and type(kept[1]) is tf8.nn.Conv2d  # the first conv of any rank is kept


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown recipe 'fp4'"):
        tf8.nn.Linear(16, 16, recipe="fp4")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tf8.nn.Linear(16, 16, dtype=torch.float64)(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(TypeError, match="fp8_autocast decorates a function, an nn.Module subclass or an nn.Module instance"):
        tf8.fp8_autocast()(42)
    with pytest.raises(ValueError, match="delayed"):
        tf8.TensorRecipe("e4m3", scaling="row", scale_source="delayed")
    with pytest.raises(ValueError, match="same K extent"):
        tf8.Recipe(weight=tf8.TensorRecipe("e4m3", scaling=(64, 64)), activation=tf8.TensorRecipe("e4m3", scaling=(1, 128)))


@pytest.mark.parametrize("recipe_name,just_below_tie", [("mellempudi2019", 1.125), ("hybrid", 136.0)])
def test_forward_bound_is_tight(recipe_name, just_below_tie):
    """Operands whose every value sits just below a rounding tie all round down by
    nearly u: the error then reaches most of the bound, so a looser rounding (or a
    wrong bound) fails test_linear_within_derived_bound_of_fp64's check."""
    recipe = tf8.get_recipe(recipe_name)
    value = just_below_tie * (1 - 2.0**-12)
    x = torch.full((32, 64), value)
    w = torch.full((16, 64), value)
    if recipe.activation.parsed_scaling.kind == "tensor":  # an anchor maps to the format's max exactly
        x[0, 0] = w[0, 0] = 448.0
    layer = tf8.nn.Linear(64, 16, bias=False, recipe=recipe)
    with torch.no_grad():
        layer.weight.copy_(w)
    y = layer(x).double()
    x64, w64 = x.double(), w.double()
    err = (y - x64 @ w64.t()).abs()
    bound = _bound(x64, w64.t(), recipe.activation, recipe.weight, 2.0**-24, 64)
    assert torch.all(err <= bound)
    assert (err[1:, 1:] / bound[1:, 1:]).min() > 0.75  # 0.79 (E5M2) and 0.93 (E4M3) measured


def test_recipe_fast_accumulation_reaches_its_products(monkeypatch):
    """Recipe.fast_accumulation names the products whose scaled_mm accumulates fast on sm_90:
    here the forward only (Transformer Engine's choice), so the backward's dx and dW promote."""
    import tritonfp8.nn.functional as fp8_functional

    calls = []
    real = fp8_functional.scaled_mm

    def spy(*args, **kwargs):
        calls.append(kwargs.get("fast_accumulation", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(fp8_functional, "scaled_mm", spy)
    recipe = tf8.get_recipe("hybrid").with_(fast_accumulation="forward")
    assert recipe.fast_accumulation == ("forward",)
    layer = tf8.nn.Linear(32, 16, recipe=recipe)
    layer(torch.randn(8, 32, requires_grad=True)).sum().backward()
    assert calls == [True, False, False]  # y, then dx and dW
    calls.clear()
    tf8.nn.Linear(32, 16, recipe=tf8.get_recipe("hybrid"))(torch.randn(8, 32, requires_grad=True)).sum().backward()
    assert calls == [False, False, False]
    with pytest.raises(ValueError, match="fast_accumulation names products"):
        tf8.get_recipe("hybrid").with_(fast_accumulation=("fwd",))
