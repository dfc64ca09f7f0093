"""torch.compile(fullgraph=True) of stock and Hugging Face models under fp8_autocast (entered
around the compiled model) and of tf8.convert'ed models: one graph, no breaks, a compiled
backward, the eager bits, and no recompiles across batch sizes and strides.

The fp8 products are torch.library ops with registered autograd (nn/functional.py): a compiled
graph holds them as nodes and they run the eager code, so with the "aot_eager" backend the
compiled step gives the eager step's bits for every recipe (stochastic and delayed included:
seeds, call counters and amax histories advance when an op runs, not when it is traced).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonfp8 as tf8

RECIPES = ("mellempudi2019", "hybrid", "hybrid_delayed", "rowwise", "blockwise", "mxfp8")


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.fc = nn.Linear(32 * 4 * 4, 16)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def _mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))


def _encoder():
    layer = nn.TransformerEncoderLayer(d_model=128, nhead=2, dim_feedforward=256, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=1,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _input(kind, batch, generator):
    if kind == "mlp":
        return torch.randn(batch, 64, generator=generator)
    if kind == "encoder":
        return torch.randn(batch, 16, 128, generator=generator)
    if kind == "conv":
        return torch.randn(batch, 3, 8, 8, generator=generator)
    return torch.randint(0, 128, (batch, 16), generator=generator)


MODELS = {"mlp": _mlp, "encoder": _encoder, "conv": _ConvNet, "gpt2": _gpt2}


def _loss(kind, model, x):
    out = model(x)
    if kind == "gpt2":
        out = out.logits
    return out.float().square().mean()


def _summary(ctx) -> dict:
    return {name: (r.op, r.fp8_calls, r.high_precision_calls, r.reasons, r.fp8_flops, r.high_precision_flops)
            for name, r in ctx.summary().items()}


class _GraphCounter:
    """An aot_eager backend that counts the forward and backward graphs it compiles."""

    def __init__(self):
        from torch._dynamo.backends.common import aot_autograd

        self.forward = self.backward = 0

        def fw(gm, example_inputs):
            self.forward += 1
            return gm.forward

        def bw(gm, example_inputs):
            self.backward += 1
            return gm.forward

        self.backend = aot_autograd(fw_compiler=fw, bw_compiler=bw)


def _steps(kind, model, recipe, compiled, steps=2, batches=(4, 4)):
    """Outputs' loss and every gradient of ``steps`` forward + backward passes, each in a new
    fp8_autocast(recipe) region (the usual loop), eager or through ``compiled`` (the same model
    compiled); and the last step's region."""
    g = torch.Generator().manual_seed(7)
    losses, grads = [], []
    run = compiled if compiled is not None else model
    for step in range(steps):
        x = _input(kind, batches[step % len(batches)], g)
        model.zero_grad(set_to_none=True)
        with tf8.fp8_autocast(recipe) as ctx:
            loss = _loss(kind, run, x)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    return losses, grads, ctx


def _assert_same_bits(eager, compiled, what):
    (le, ge, _), (lc, gc, _) = eager, compiled
    for step, (a, b) in enumerate(zip(le, lc)):
        assert torch.equal(a, b), f"{what}: step {step} loss {a.item()} eager vs {b.item()} compiled"
    for step, (ga, gb) in enumerate(zip(ge, gc)):
        assert len(ga) == len(gb) and ga, f"{what}: step {step} has {len(ga)} eager, {len(gb)} compiled gradients"
        for i, (a, b) in enumerate(zip(ga, gb)):
            assert torch.equal(a, b), (f"{what}: step {step} gradient {i} differs by "
                                       f"{(a.float() - b.float()).abs().max().item():g}")


def _assert_compiled_steps_match(kind, model, twin, compiled, steps):
    """``steps`` forward + backward passes of ``model`` (eager) and of ``compiled`` (its twin
    ``twin``, compiled) on the same batches: the same loss and gradient bits at every step."""
    for step in range(steps):
        x = _input(kind, 4, torch.Generator().manual_seed(step))
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        a, b = _loss(kind, model, x), _loss(kind, compiled, x)
        assert torch.equal(a, b), f"step {step}: loss {a.item()} eager vs {b.item()} compiled"
        a.backward()
        b.backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad), f"step {step}: {name}.grad differs"


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("kind", list(MODELS))
def test_fullgraph_compile_under_fp8_autocast_has_no_breaks_and_gives_the_eager_bits(kind, recipe):
    """fp8_autocast entered around torch.compile(model, fullgraph=True): dynamo's explain finds one
    graph and no break; the compiled forward and backward (one graph each, reused by the
    second step's new region) give the eager run's loss and gradient bits over 2 steps
    (seeds, call counters and delayed histories advance alike), and the summary counts the
    compiled calls as eager's."""
    torch.manual_seed(0)
    model = MODELS[kind]()
    twin = copy.deepcopy(model)
    x = _input(kind, 4, torch.Generator().manual_seed(0))
    with tf8.fp8_autocast(recipe):
        explained = torch._dynamo.explain(copy.deepcopy(model))(x)
    assert explained.graph_break_count == 0, [b.reason[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1

    torch.manual_seed(1)  # the layers' seed bases are drawn when the region first learns the model
    eager = _steps(kind, model, recipe, None)
    counter = _GraphCounter()
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True, backend=counter.backend)
    torch.manual_seed(1)
    result = _steps(kind, twin, recipe, compiled)
    assert counter.forward == 1 and counter.backward == 1, (counter.forward, counter.backward)
    _assert_same_bits(eager, result, f"{kind} under {recipe}")
    assert _summary(result[2]) == _summary(eager[2]), "the compiled run's summary differs from eager's"
    assert result[2].fp8_fraction() > 0, result[2].report()


@pytest.mark.parametrize("recipe", ["mellempudi2019", "hybrid_delayed"])
def test_fullgraph_compile_of_converted_modules_gives_the_eager_bits(recipe):
    """tf8.convert'ed layers (the module path, no autocast) compile to one graph and give the
    eager bits, stochastic rounding and delayed scaling included."""
    torch.manual_seed(0)
    model = tf8.convert(_ConvNet(), recipe, keep=lambda name, module: False)
    twin = copy.deepcopy(model)  # the copy's layers get states of their own, with the same seeds
    assert twin.fc.fp8_state.handle != model.fc.fp8_state.handle
    counter = _GraphCounter()
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True, backend=counter.backend)
    _assert_compiled_steps_match("conv", model, twin, compiled, steps=3)
    assert counter.forward == 1 and counter.backward == 1
    assert twin.fc.fp8_state.calls == model.fc.fp8_state.calls == 3


@pytest.mark.parametrize("kind", ["mlp", "encoder", "conv", "gpt2"])
def test_compiled_model_does_not_recompile_across_batch_sizes_and_strides(kind):
    """With the batch dim marked dynamic, batch sizes 4, 6, 10 and 7 run one graph: nothing in
    the fp8 path specializes on them. A first non-contiguous input (every other sample) costs
    one recompile: dynamo guards input strides, then treats them as dynamic, so a second
    stride pattern (every third sample) and further sizes run that graph."""
    torch.manual_seed(0)
    model = MODELS[kind]()
    counter = _GraphCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=counter.backend)
    g = torch.Generator().manual_seed(0)
    contiguous = [_input(kind, b, g) for b in (4, 6, 10, 7)]
    strided = [_input(kind, 12, g)[::2], _input(kind, 15, g)[::3], _input(kind, 9, g)[::2]]
    assert not any(x.is_contiguous() for x in strided)
    with tf8.fp8_autocast("hybrid") as ctx:
        for x in contiguous:
            torch._dynamo.mark_dynamic(x, 0)
            _loss(kind, compiled, x).backward()
        assert (counter.forward, counter.backward) == (1, 1), "a batch size recompiled"
        for x in strided:
            torch._dynamo.mark_dynamic(x, 0)
            _loss(kind, compiled, x).backward()
    assert (counter.forward, counter.backward) == (2, 2), "more than the one stride recompile"
    assert ctx.fp8_fraction() > 0.5, ctx.report()


def test_fullgraph_compile_with_inductor_tracks_eager():
    """The default backend (inductor, C++ on CPU) fuses the pointwise ops around the fp8 ops, so
    its bits may differ from eager's in fp32 rounding of those; the fp8 products are the same
    ops. Measured here: the loss within 1e-5 relative of eager's."""
    torch.manual_seed(0)
    model = _mlp()
    twin = copy.deepcopy(model)
    torch.manual_seed(1)
    eager = _steps("mlp", model, "hybrid", None)
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True)
    torch.manual_seed(1)
    result = _steps("mlp", twin, "hybrid", compiled)
    for a, b in zip(eager[0], result[0]):
        assert (a - b).abs() <= 1e-5 * a.abs(), (a.item(), b.item())


@pytest.mark.parametrize("recipe", ["mellempudi2019", "hybrid_delayed"])
def test_decorated_module_compiles_whole_with_no_breaks_and_the_eager_bits(recipe):
    """fp8_autocast as a decorator on a module instance, the region entered inside the compiled
    forward: one graph, no break, and the eager module's bits over 2 steps."""
    torch.manual_seed(0)
    model = _encoder()
    twin, probe = copy.deepcopy(model), copy.deepcopy(model)
    tf8.fp8_autocast(recipe)(probe)
    explained = torch._dynamo.explain(probe)(_input("encoder", 4, torch.Generator().manual_seed(0)))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch.manual_seed(1)  # decorating an instance makes its layers' states (seed bases drawn now)
    tf8.fp8_autocast(recipe)(model)
    torch.manual_seed(1)
    compiled_region = tf8.fp8_autocast(recipe)
    compiled_region(twin)
    counter = _GraphCounter()
    torch._dynamo.reset()
    compiled = torch.compile(twin, fullgraph=True, backend=counter.backend)
    _assert_compiled_steps_match("encoder", model, twin, compiled, steps=2)
    assert (counter.forward, counter.backward) == (1, 1)
    assert _summary(compiled_region)["layers.0.linear1.weight"][1] == 2, list(_summary(compiled_region))


def test_compiling_a_function_of_a_model_no_region_has_seen_says_to_watch_it():
    """A compiled function that calls a model: the layers' fp8 states cannot be made inside the
    trace. fullgraph=True raises, saying what to do; after region.watch(model) it compiles."""
    torch.manual_seed(0)
    model = _mlp()

    def step(x):
        return model(x).square().mean()

    x = torch.randn(4, 64)
    torch._dynamo.reset()
    with tf8.fp8_autocast("hybrid"):
        with pytest.raises(Exception, match=r"region\.watch\(model\)"):
            torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    other = _mlp()
    counter = _GraphCounter()

    def other_step(x):
        return other(x).square().mean()

    with tf8.fp8_autocast("hybrid") as region:
        region.watch(other)
        torch.compile(other_step, fullgraph=True, backend=counter.backend)(x).backward()
    assert counter.forward == 1 and region.summary()["0.weight"].fp8_calls == 1
