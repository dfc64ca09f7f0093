"""fp8_autocast on unmodified PyTorch models: forms, scoping, counts, training curves."""
import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonfp8 as tf8
from stock_models import GPT, ResNet18, TransformerClassifier, count_products, text_corpus


def _mode_stack_depth() -> int:
    from torch.overrides import _get_current_function_mode_stack

    return len(_get_current_function_mode_stack())


def _fp8_calls(ac) -> int:
    return sum(r.fp8_calls for r in ac.summary().values())


def test_context_manager_function_class_and_instance_forms():
    x = torch.randn(4, 32)
    layer = nn.Linear(32, 32)

    with tf8.fp8_autocast("hybrid") as ac:
        layer(x)
    assert _fp8_calls(ac) == 1

    ac_fn = tf8.fp8_autocast("hybrid")

    @ac_fn
    def f(t):
        return layer(t)

    f(x)
    assert _fp8_calls(ac_fn) == 1

    ac_cls = tf8.fp8_autocast("hybrid")

    @ac_cls
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(32, 32)

        def forward(self, t):
            return self.l1(t)

    Net()(x)
    assert list(ac_cls.summary()) == ["l1.weight"] and _fp8_calls(ac_cls) == 1

    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    ac_inst = tf8.fp8_autocast("hybrid")
    assert ac_inst(model) is model
    model(x)
    assert list(ac_inst.summary()) == ["0.weight", "2.weight"] and _fp8_calls(ac_inst) == 2


def test_result_is_fp8_not_high_precision():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    with tf8.fp8_autocast("hybrid"):
        y = layer(x)
    explicit = tf8.nn.functional.linear(x, layer.weight, layer.bias, "hybrid")
    assert torch.equal(y, explicit)
    assert not torch.equal(y, F.linear(x, layer.weight, layer.bias))


def test_nesting_disabled_regions_and_exceptions_restore_everything():
    layer = nn.Linear(32, 32)
    x = torch.randn(2, 32)
    depth = _mode_stack_depth()
    with tf8.fp8_autocast("hybrid") as outer:
        with tf8.fp8_autocast(enabled=False):
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        with tf8.fp8_autocast("hybrid_delayed") as inner:
            layer(x)
        layer(x)
    assert _fp8_calls(outer) == 1 and _fp8_calls(inner) == 1
    assert _mode_stack_depth() == depth
    with pytest.raises(RuntimeError, match="boom"):
        with tf8.fp8_autocast("hybrid"):
            layer(x)
            raise RuntimeError("boom")
    assert _mode_stack_depth() == depth
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_composes_with_torch_autocast_bf16():
    layer = nn.Linear(64, 32)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16), tf8.fp8_autocast("hybrid") as ac:
        y = layer(x)
    assert y.dtype == torch.bfloat16 and _fp8_calls(ac) == 1


def test_layers_that_cannot_gain_fall_back_with_a_reason():
    model = nn.Sequential(nn.Linear(24, 32), nn.Linear(32, 10), nn.Linear(10, 16, bias=False))
    x = torch.randn(3, 24)
    ac = tf8.fp8_autocast("hybrid")
    ac(model)
    with torch.no_grad():
        model(x)
    s = ac.summary()
    assert s["0.weight"].high_precision_calls == 1 and "in_features=24 is not a multiple of 16" in s["0.weight"].reasons
    assert "out_features=10 is not a multiple of 16" in s["1.weight"].reasons
    assert s["2.weight"].high_precision_calls == 1
    assert "0.weight" in ac.report()


def test_mellempudi_keeps_first_conv_and_last_linear():
    model = ResNet18(num_classes=16, width=16)
    ac = tf8.fp8_autocast("mellempudi2019")
    ac(model)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    s = ac.summary()
    assert s["conv1.weight"].reasons == {"kept in high precision by the recipe": 1}
    assert s["fc.weight"].reasons == {"kept in high precision by the recipe": 1}
    assert s["layer1.0.conv1.weight"].fp8_calls == 1


def test_deep_copy_of_a_decorated_instance_runs_itself_under_a_region_of_its_own():
    """copy.deepcopy of a decorated module runs the copy (not the original, which the wrapped
    forward would call), decorated by a new region of the same recipe that names the copy's
    layers and keeps its first conv and last linear."""
    import copy

    model = ResNet18(num_classes=16, width=16)
    tf8.fp8_autocast("mellempudi2019")(model)
    duplicate = copy.deepcopy(model)
    with torch.no_grad():
        for p in duplicate.parameters():
            p.zero_()
    x = torch.randn(2, 3, 16, 16)
    assert torch.count_nonzero(duplicate(x)) == 0, "the copy's forward ran the original module"
    assert torch.count_nonzero(model(x)) > 0
    region = duplicate.__deepcopy__.args[1]
    s = region.summary()
    assert region.recipe.name == "mellempudi2019"
    assert s["conv1.weight"].reasons == {"kept in high precision by the recipe": 1}
    assert s["fc.weight"].reasons == {"kept in high precision by the recipe": 1}
    assert s["layer1.0.conv1.weight"].fp8_calls == 1


def test_with_form_names_layers_and_applies_keep_rules():
    """The README's form: a plain `with` region learns the model called in it (no watch())."""
    from torch.nn.modules import module as module_hooks

    with tf8.fp8_autocast("hybrid"):  # the first region installs the two module hooks, which stay
        pass
    hooks_before = (len(module_hooks._global_forward_pre_hooks), len(module_hooks._global_forward_hooks))
    model = ResNet18(num_classes=16, width=16)
    with tf8.fp8_autocast("mellempudi2019") as ac:
        model(torch.randn(2, 3, 16, 16)).sum().backward()
    s = ac.summary()
    assert s["conv1.weight"].reasons == {"kept in high precision by the recipe": 1}
    assert s["fc.weight"].reasons == {"kept in high precision by the recipe": 1}
    assert s["layer1.0.conv1.weight"].fp8_calls == 1 and s["layer4.1.conv2.weight"].fp8_calls == 1
    assert (len(module_hooks._global_forward_pre_hooks), len(module_hooks._global_forward_hooks)) == hooks_before
    assert hooks_before[0] >= 1 and hooks_before[1] >= 1
    # a forward that raises does not leave the next region thinking it is inside a module
    broken = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    with pytest.raises(ValueError, match="does not match weight"):
        with tf8.fp8_autocast("mellempudi2019"):
            broken(torch.randn(2, 31))
    with tf8.fp8_autocast("mellempudi2019") as again:
        broken(torch.randn(2, 32))
    assert again.summary()["0.weight"].fp8_calls == 1 and again.summary()["1.weight"].high_precision_calls == 1


def test_kept_layer_with_16_bit_master_weights_computes_in_the_input_dtype():
    """mellempudi2019 keeps the last linear; with tf8.optim's fp16 master weights it still runs
    (weight cast to the fp32 input, as torch.autocast would) and its gradient reaches the fp16 weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    tf8.optim.SGD(model.parameters(), lr=0.1, master_dtype=torch.float16)
    seen = []
    model[2].register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    with tf8.fp8_autocast("mellempudi2019") as ac:
        y = model(torch.randn(4, 32))
    y.sum().backward()
    h, last = seen[0], model[2]
    assert ac.summary()["2.weight"].high_precision_calls == 1 and ac.summary()["0.weight"].fp8_calls == 1
    assert y.dtype == torch.float32 and torch.equal(y, F.linear(h, last.weight.float(), last.bias.float()))
    assert last.weight.grad.dtype == torch.float16
    assert torch.equal(last.weight.grad, (torch.ones(4, 16).t() @ h).half())


class _GPT2Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: y = addmm(bias, x, W) with W [in, out]."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.05)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


class _EveryProduct(nn.Module):
    """One of each product kind the report lists (fp8 where the op takes it)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 64)
        self.gpt2_conv1d = _GPT2Conv1D(64, 64)
        self.proj = nn.Parameter(torch.randn(64, 64) * 0.1)  # x @ proj
        self.left = nn.Parameter(torch.randn(64, 64) * 0.1)  # left @ x: high precision
        self.batched = nn.Parameter(torch.randn(2, 64, 64) * 0.1)  # bmm: high precision
        self.conv1d, self.conv2d, self.conv3d = nn.Conv1d(4, 16, 3), nn.Conv2d(4, 16, 3), nn.Conv3d(4, 16, 3)
        self.deconv = nn.ConvTranspose2d(4, 16, 3)  # high precision

    def forward(self, x, img):
        h = self.gpt2_conv1d(self.linear(x)) @ self.proj
        h = (self.left @ h.t()).t() + torch.bmm(h.reshape(2, -1, 64), self.batched).reshape(-1, 64)
        q = h.reshape(1, 2, -1, 64)
        pad = torch.ones(1, 1, 1, q.shape[2], dtype=torch.bool)
        pad[..., -2:] = False
        a = F.scaled_dot_product_attention(q, q, q, is_causal=True) + F.scaled_dot_product_attention(q, q, q, attn_mask=pad)
        a = a + F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)  # high precision
        convs = (self.conv1d(img[:, :, 0, 0]).mean() + self.conv2d(img[:, :, 0]).mean() + self.conv3d(img).mean()
                 + self.deconv(img[:, :, 0]).mean())
        return a.mean() + convs


def test_report_lists_every_product_kind_with_fp8_or_the_reason():
    torch.manual_seed(0)
    model = _EveryProduct()
    ac = tf8.fp8_autocast("hybrid")
    with ac:
        model(torch.randn(16, 64), torch.randn(2, 4, 5, 6, 6)).backward()
    s = ac.summary()
    runs = {name: (r.op, r.fp8_calls, r.high_precision_calls) for name, r in s.items()}
    assert runs == {
        "linear.weight": ("linear", 1, 0), "gpt2_conv1d.weight": ("addmm", 1, 0), "proj": ("matmul", 1, 0),
        "left": ("matmul", 0, 1), "batched": ("matmul", 0, 1), "attention[d=64]": ("attention", 2, 1),
        "conv1d.weight": ("conv1d", 1, 0), "conv2d.weight": ("conv2d", 1, 0), "conv3d.weight": ("conv3d", 1, 0),
        "deconv.weight": ("conv_transpose2d", 0, 1)}, runs
    assert "parameter on the left" in next(iter(s["left"].reasons))
    assert "batched" in next(iter(s["batched"].reasons))
    assert "dropout" in next(iter(s["attention[d=64]"].reasons))
    assert "transposed convolution" in next(iter(s["deconv.weight"].reasons))
    # every parameter got its gradient through the fp8 or the stock path
    assert all(p.grad is not None for p in model.parameters())
    # FLOP weighting: the forward multiply-adds of each row, 2 M N K for the x @ W products
    assert s["linear.weight"].fp8_flops == s["proj"].fp8_flops == 2 * 16 * 64 * 64
    assert s["left"].high_precision_flops == 2 * 16 * 64 * 64
    calls, flops = ac.fp8_fraction(), ac.fp8_fraction(by="flops")
    fp8 = sum(r.fp8_flops for r in s.values())
    assert flops == pytest.approx(fp8 / (fp8 + sum(r.high_precision_flops for r in s.values())))
    assert calls == pytest.approx(8 / 12) and flops != calls
    assert "of forward FLOPs" in ac.report()


def test_x_at_parameter_and_addmm_compute_what_stock_torch_does():
    torch.manual_seed(1)
    conv1d, w = _GPT2Conv1D(64, 32), nn.Parameter(torch.randn(64, 32))
    x = torch.randn(3, 8, 64)
    with tf8.fp8_autocast("hybrid") as ac:
        y1, y2 = conv1d(x), x @ w
    assert ac.fp8_fraction() == 1.0
    for got, want in ((y1, torch.addmm(conv1d.bias, x.reshape(-1, 64), conv1d.weight).reshape(3, 8, 32)), (y2, x @ w)):
        assert got.shape == want.shape
        assert ((got - want).norm() / want.norm()) < 0.1


@pytest.mark.parametrize("scale, kind", [(1e6, "saturated"), (1e-7, "flushed")])
def test_saturating_and_underflowing_layers_are_flagged(scale, kind):
    """mellempudi2019 casts without a scale: inputs of 1e6 saturate at E5M2's 57344 and inputs of
    1e-7 flush to zero. The layer is flagged in the report and warned about, once; the same inputs
    under 'hybrid' (per-tensor scales) are not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    x = torch.randn(32, 64) * scale
    ac = tf8.fp8_autocast("mellempudi2019")
    with pytest.warns(RuntimeWarning, match=f"'0.weight': .*activation values {kind[:5]}"):
        with ac:  # leaving the region checks the counts: the warning comes without asking
            model(x).sum().backward()
    fractions = ac.cast_fractions()
    assert fractions["0.weight"]["activation"][kind] > 0.9
    assert fractions["0.weight"]["weight"][kind] == 0.0
    assert fractions["0.weight"]["activation"]["values"] == x.numel()
    flagged = [line for line in ac.report().splitlines() if line.startswith("!")]
    assert [line.split()[0] for line in flagged] == ["!0.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per layer and role
        ac.cast_fractions()
    scaled = tf8.fp8_autocast("hybrid")
    with scaled:
        model(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = scaled.cast_fractions()
    assert all(v[kind] < 0.01 for layer in f.values() for v in layer.values())
    assert not [line for line in scaled.report().splitlines() if line.startswith("!")]


@pytest.mark.parametrize("masks", ["key_padding", "float_mask", "causal_and_padding", "bool_mask", "bool_both"])
def test_multihead_attention_masks_run_in_fp8(masks):
    """nn.MultiheadAttention with key_padding_mask / attn_mask (MHA's bool True = masked; bool and
    float masks, alone and combined): in fp8, every output row within the recipe's usual error of
    the stock layer's (a mask read the wrong way round, or one part dropped, is far off in the
    rows it touches)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(128, 2, batch_first=True)
    x = torch.randn(3, 20, 128)
    pad = torch.zeros(3, 20, dtype=torch.bool)
    pad[1, 12:] = True
    bool_mask = torch.rand(20, 20, generator=torch.Generator().manual_seed(1)) < 0.5
    bool_mask[:, :4] = False  # every query keeps a few keys
    kwargs = {"key_padding": dict(key_padding_mask=pad),
              "float_mask": dict(attn_mask=torch.randn(20, 20) * 3),
              "causal_and_padding": dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(20),
                                         key_padding_mask=pad.float() * -1e9),
              "bool_mask": dict(attn_mask=bool_mask),
              "bool_both": dict(attn_mask=bool_mask, key_padding_mask=pad)}[masks]
    want = mha(x, x, x, need_weights=False, **kwargs)[0]
    with tf8.fp8_autocast("hybrid") as ac:
        got = mha(x, x, x, need_weights=False, **kwargs)[0]
    row = ac.summary()["out_proj.weight"]
    assert (row.op, row.fp8_calls, row.high_precision_calls) == ("multi_head_attention", 1, 0), dict(row.reasons)
    per_row = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert per_row.max() < 0.1, per_row.max()


@pytest.mark.parametrize("arch", ["resnet18", "transformer", "gpt"])
def test_every_product_of_stock_models_runs_in_fp8(arch):
    torch.manual_seed(0)
    if arch == "resnet18":
        model, x = ResNet18(num_classes=16, width=16), torch.randn(2, 3, 16, 16)
    elif arch == "transformer":
        model, x = TransformerClassifier(), torch.randint(0, 64, (2, 16))
    else:
        model, x = GPT(layers=2, seq=32), torch.randint(0, 128, (2, 32))
    counts = count_products(model)
    ac = tf8.fp8_autocast("hybrid")
    ac(model)
    model(x).float().sum().backward()
    s = ac.summary()
    high = {k: dict(r.reasons) for k, r in s.items() if r.high_precision_calls}
    assert not high, high
    ops = [r.op for r in s.values()]
    assert ops.count("conv2d") == counts["conv2d"]
    mha = counts["mha"]
    # Linear modules inside nn.MultiheadAttention are reached through multi_head_attention_forward.
    assert ops.count("linear") == counts["linear"]
    assert ops.count("multi_head_attention") == mha
    assert sum(r.fp8_calls for r in s.values() if r.op == "attention") == counts["sdpa"]


# ----------------------------------------------------------------------------
# Training curves: fp8 tracks fp32 on small real tasks
# ----------------------------------------------------------------------------


def _train(model, batches, steps, lr, loss_fn):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for step in range(steps):
        x, y = batches(step)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


def _compare(make_model, batches, steps, lr, loss_fn, recipe, tolerance, seed=0):
    """(fp32, fp8) mean loss of the last 20 steps; with ``tolerance``, asserts they agree."""
    torch.manual_seed(seed)
    base = make_model()
    fp32 = _train(copy.deepcopy(base), batches, steps, lr, loss_fn)
    fp8_model = copy.deepcopy(base)
    ac = tf8.fp8_autocast(recipe)
    ac(fp8_model)
    fp8 = _train(fp8_model, batches, steps, lr, loss_fn)
    assert ac.fp8_fraction() > 0.9
    tail_32, tail_8 = fp32[-20:].mean(), fp8[-20:].mean()
    assert tail_32 < fp32[:5].mean() * 0.7, "the fp32 run did not learn: the comparison would be empty"
    print(f"final loss (mean of last 20 steps): fp32 {tail_32:.4f}, fp8 {tail_8:.4f}")
    if tolerance is not None:
        assert abs(tail_8 - tail_32) <= tolerance * tail_32 + 0.02, (tail_32, tail_8)
    return tail_32, tail_8


def test_resnet18_on_digits_tracks_fp32():
    """Three seeds (weights and batch order), means compared. At 120 steps the fp32 run is
    chaotic: one seed's final loss moves by more than the fp8 difference between seeds (0.42
    to 0.79 over seeds 0-5), and the fp32 mean of seeds 0-2 itself moved from 0.701 to 0.504
    between two machines of this project (same seeds and versions, different oneDNN
    kernels), while the fp8 mean (the bit-exact reference) stayed 0.632. The tolerance is
    therefore fp32's own reproducibility, 0.25 * fp32 + 0.05; a broken fp8 path (loss near
    ln 10 = 2.3) fails it by far."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    tails = []
    for seed in range(3):
        order = torch.randint(0, len(labels), (120, 32), generator=torch.Generator().manual_seed(seed))

        def batches(step, order=order):
            return images[order[step]], labels[order[step]]

        tails.append(_compare(lambda: ResNet18(num_classes=16, width=16, in_channels=1),
                              batches, 120, 0.05, F.cross_entropy, "hybrid", tolerance=None, seed=seed))
    tail_32, tail_8 = (sum(t[i] for t in tails) / len(tails) for i in (0, 1))
    # measured here: fp32 0.504 vs fp8 0.632 (earlier machine: fp32 0.701 vs fp8 0.632)
    assert abs(tail_8 - tail_32) <= 0.25 * tail_32 + 0.05, tails


def test_gpt_on_python_source_tracks_fp32():
    data = torch.tensor(list(text_corpus(400_000)), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - 33, (120, 16), generator=g)

    def batches(step):
        idx = starts[step][:, None] + torch.arange(33)
        chunk = data[idx]
        return chunk[:, :-1], chunk[:, 1:]

    def loss_fn(logits, target):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))

    # measured: 2.418 (fp32) vs 2.417 (fp8)
    _compare(lambda: GPT(d_model=64, nhead=1, layers=2, seq=32), batches, 120, 0.1, loss_fn, "hybrid", tolerance=0.02)
