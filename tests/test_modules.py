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

import pytest
import torch
from torch import nn

import tritonfp8 as tf8
from conftest import KERNEL_DEVICE, kernels, reference

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


@pytest.mark.parametrize("recipe_name", ["hybrid", "blockwise", "mellempudi2019"])
def test_conv2d_matches_fp64_within_bound(recipe_name):
    recipe = tf8.get_recipe(recipe_name)
    conv = tf8.nn.Conv2d(8, 32, 3, stride=2, padding=1, recipe=recipe)
    ref = nn.Conv2d(8, 32, 3, stride=2, padding=1).double()
    ref.load_state_dict({k: v.double() for k, v in conv.state_dict().items() if not k.startswith("fp8_state.")})
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    y, y64 = conv(x), ref(x64)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64.backward(dy.double())
    # As GEMMs: patches [B*L, C*9] @ W^T; bound from the same derivation.
    cols = torch.nn.functional.unfold(x64.detach(), 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 72)
    w = ref.weight.detach().reshape(32, 72)
    bound = _bound(cols, w.t(), recipe.activation, recipe.weight, 2.0**-24, 72)
    got = (y.double() - y64).permute(0, 2, 3, 1).reshape(-1, 32).abs()
    assert torch.all(got <= bound + 1e-6)
    for g, g64 in ((x.grad, x64.grad), (conv.weight.grad, ref.weight.grad)):
        assert ((g.double() - g64).norm() / g64.norm()) < 8 * _unit(recipe.error)


@pytest.mark.parametrize("module", ["linear", "conv2d"])
@pytest.mark.parametrize("recipe_name", ["hybrid", "blockwise", "mellempudi2019"])
def test_kernels_match_reference_at_fp32_accumulation_level(recipe_name, module):
    """Same quantized operands (bit-exact casts), so only the fp32 summation order differs."""
    torch.manual_seed(2)
    if module == "linear":
        layer = tf8.nn.Linear(128, 64, recipe=recipe_name)
        x, dy = torch.randn(40, 128), torch.randn(40, 64)
    else:
        layer = tf8.nn.Conv2d(16, 32, 3, padding=1, recipe=recipe_name)
        x, dy = torch.randn(2, 16, 6, 6), torch.randn(2, 32, 6, 6)
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


def test_state_dict_round_trip_keeps_amax_history(tmp_path):
    layer = tf8.nn.Linear(64, 32, recipe="hybrid_delayed")
    for _ in range(3):
        layer(torch.randn(8, 64)).sum().backward()
    path = tmp_path / "layer.pt"
    torch.save(layer.state_dict(), path)
    fresh = tf8.nn.Linear(64, 32, recipe="hybrid_delayed")
    fresh.load_state_dict(torch.load(path, weights_only=False))
    assert fresh.fp8_state.calls == 3
    for role, hist in layer.fp8_state.amax_history.items():
        assert torch.equal(fresh.fp8_state.amax_history[role], hist)
        assert hist[:3].gt(0).all() and hist[3:].eq(0).all()
    x = torch.randn(8, 64)
    assert torch.equal(fresh(x), layer(x))


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
def test_state_dict_is_tensors_and_loads_strictly_from_stock(recipe):
    """Every state_dict value is a tensor, the keys do not change with training, and a stock
    checkpoint of the same model loads strictly (the fp8 state is optional on load)."""
    stock, converted = _stock_and_converted(recipe)
    keys_before = set(converted.state_dict())
    _train(converted)
    state = converted.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert set(state) == keys_before
    assert set(state) - set(stock.state_dict()) == {k for k in state if ".fp8_state." in k}
    fresh = _stock_and_converted(recipe)[1]
    calls = fresh[0].fp8_state.calls
    fresh.load_state_dict(stock.state_dict(), strict=True)
    assert fresh[0].fp8_state.calls == calls  # the fresh fp8 state is kept
    for name, value in stock.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value)
    with pytest.raises(RuntimeError, match="fp8_state"):  # stock modules have no such keys
        stock.load_state_dict(state, strict=True)
    stock.load_state_dict({k: v for k, v in state.items() if ".fp8_state." not in k}, strict=True)


def test_safetensors_round_trip_resumes_bit_identically(tmp_path):
    import safetensors.torch as safetensors_torch
    _, converted = _stock_and_converted("hybrid_delayed")
    _train(converted)
    path = str(tmp_path / "model.safetensors")
    safetensors_torch.save_file(converted.state_dict(), path)
    fresh = _stock_and_converted("hybrid_delayed")[1]
    fresh.load_state_dict(safetensors_torch.load_file(path), strict=True)
    assert fresh[0].fp8_state.calls == 3
    for a, b in zip((converted[0], converted[3]), (fresh[0], fresh[3])):
        for role, hist in a.fp8_state.amax_history.items():
            assert torch.equal(b.fp8_state.amax_history[role], hist) and hist[0] > 0
    x = torch.randn(4, 64)
    lin = lambda m: m[3](m[1](m[0](x)))  # noqa: E731
    assert torch.equal(lin(fresh), lin(converted))


def test_nested_state_of_earlier_versions_still_loads():
    layer = tf8.nn.Linear(64, 32, recipe="hybrid_delayed")
    layer(torch.randn(8, 64)).sum().backward()
    flat = layer.state_dict()
    nested = {k: v for k, v in flat.items() if not k.startswith("fp8_state.")}
    nested["fp8_state"] = {"seed_base": layer.fp8_state.seed_base, "calls": 1,
                           "amax_history": {k: v.clone() for k, v in layer.fp8_state.amax_history.items()},
                           "error_saturated": torch.zeros((), dtype=torch.int32)}
    fresh = tf8.nn.Linear(64, 32, recipe="hybrid_delayed")
    fresh.load_state_dict(nested)
    assert fresh.fp8_state.calls == 1 and fresh.fp8_state.seed_base == layer.fp8_state.seed_base
    assert torch.equal(fresh.fp8_state.amax_history["activation"], layer.fp8_state.amax_history["activation"])


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
