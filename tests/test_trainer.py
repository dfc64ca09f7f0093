"""tf8.Trainer: one call per step (autocast forward, scaled backward, overflow skip, scaler update)
and its per-step report, including the error-cast underflow statistic."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tritonfp8 as tf8
from tritonfp8 import optim as tf8_optim
from tritonfp8.trainer import ErrorCastStats, StepReport, Trainer, collecting, current_error_stats
from tritonfp8.training import LossScaler

E5M2_NEAREST = tf8.TensorRecipe("e5m2", "nearest", "none")
# Every role E5M2 round-to-nearest, no scales: which errors flush to zero follows from numerics.md alone.
NEAREST = tf8.Recipe(weight=E5M2_NEAREST, activation=E5M2_NEAREST, error=E5M2_NEAREST)
E5M2_UNDERFLOW = 2.0**-17  # half the smallest subnormal 2**-16: |x| <= this rounds to 0 (the tie goes to even 0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def _snapshot(model, opt):
    params = [_bits(p) for p in model.parameters()]
    state = {i: {k: (_bits(v) if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
             for i, p in enumerate(model.parameters())}
    return params, state


# ----------------------------------------------------------------------------
# A hand-checkable step
# ----------------------------------------------------------------------------


def _coefficients(huge: bool) -> torch.Tensor:
    """The error dy = d(sum(y * c))/dy = c: 32 values, hand-classified for the E5M2 nearest cast."""
    c = torch.ones(32)
    c[0:4] = 0.0                 # zero: not counted as nonzero
    c[4:7] = 2.0**-20            # below half the smallest subnormal: flushed to zero
    c[7] = 2.0**-17              # exactly half: the tie rounds to even, i.e. to zero
    c[8] = 3 * 2.0**-18          # 0.75 * 2**-16 rounds up to 2**-16: not flushed
    if huge:
        c[9:11] = 1e5            # above 61440 (halfway to the next binade): saturates to 57344
    return c.reshape(2, 16)


def _one_linear():
    torch.manual_seed(0)
    model = nn.Linear(16, 16)
    with torch.no_grad():
        model.bias.fill_(1.0)
    return model


def test_report_fields_on_a_hand_checkable_step():
    model = _one_linear()
    opt = tf8_optim.SGD(model.parameters(), lr=0.1, momentum=0.9, master_dtype=torch.float32)
    trainer = Trainer(model, opt, recipe=NEAREST, scaler=LossScaler("static", init_scale=1.0),
                      loss_fn=lambda out, c: (out * c).sum())
    x = torch.zeros(2, 16)  # y = 0 @ W^T + b = 1 exactly, so the loss is sum(c)
    before = _snapshot(model, opt)

    r = trainer.step((x, _coefficients(huge=True)))
    assert isinstance(r, StepReport) and r.step == 0
    assert r.loss == float(_coefficients(True).sum()) == pytest.approx(21 + 2e5, rel=1e-6)
    assert (r.scale, r.next_scale) == (1.0, 1.0)
    assert r.skipped  # the two saturated errors are an overflow: the static scaler skips the step
    assert (r.error_values, r.error_nonzero, r.error_underflow, r.error_saturated) == (32, 28, 4, 2)
    assert r.underflow_fraction == 4 / 28 and r.saturation_fraction == 2 / 32
    assert r.overflow_saturated == 4 and r.overflow_nonfinite == 0  # normal + transposed copy of dy
    assert r.output.shape == (2, 16) and torch.equal(r.output, torch.ones(2, 16))
    after = _snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))

    r = trainer.step((x, _coefficients(huge=False)))
    assert r.step == 1 and not r.skipped
    assert (r.error_values, r.error_nonzero, r.error_underflow, r.error_saturated) == (32, 28, 4, 0)
    assert r.overflow_saturated == 0 and r.saturation_fraction == 0.0
    assert not all(torch.equal(a, _bits(p)) for a, p in zip(before[0], model.parameters()))
    # The summary shows the layer ran in fp8.
    assert trainer.precision_summary()["weight"]["fp8_calls"] == 2


# ----------------------------------------------------------------------------
# A skipped step changes nothing
# ----------------------------------------------------------------------------


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))


def _weighted_sum(out, c):
    return (out.float() * c).mean()


@pytest.mark.parametrize("inject", ["saturated_error", "inf_loss"])
@pytest.mark.parametrize("opt_cls,kwargs", [
    pytest.param(tf8_optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01, master_dtype=torch.float16), id="sgd-fp16"),
    pytest.param(tf8_optim.AdamW, dict(lr=0.01, master_dtype=torch.float16), id="adamw-fp16"),
    pytest.param(torch.optim.SGD, dict(lr=0.1, momentum=0.9), id="torch-sgd"),
])
def test_skipped_step_leaves_params_and_optimizer_state_untouched(inject, opt_cls, kwargs):
    model = _mlp()
    opt = opt_cls(model.parameters(), **kwargs)
    scaler = LossScaler("dynamic", init_scale=2.0**6)
    # E5M2 nearest for every role (as the paper's recipe, but with deterministic rounding so that the
    # injected error saturates for sure); no layer is kept in high precision.
    recipe = NEAREST.with_(weight_grad=E5M2_NEAREST)
    trainer = Trainer(model, opt, recipe=recipe, scaler=scaler, loss_fn=_weighted_sum)
    g = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    x = torch.randn(8, 16, generator=g).to(dtype)
    clean = torch.randn(8, 16, generator=g)
    trainer.step((x, clean))
    trainer.step((x, clean))  # momentum / moments are nonzero now
    before = _snapshot(model, opt)

    bad = clean.clone()
    if inject == "saturated_error":
        bad[0, 0] = 1.26e5  # dy = 1.26e5 * 64 / 128 = 63000: finite in fp16, above E5M2's 61440 rounding limit
    else:
        bad[0, 0] = math.inf
    r = trainer.step((x, bad))
    assert r.skipped and r.scale == 2.0**6 and r.next_scale == 2.0**5 and scaler.skipped_steps == 1
    if inject == "saturated_error":
        assert r.error_saturated >= 1 and r.overflow_saturated >= 1
    else:
        assert r.overflow_nonfinite >= 1
    after = _snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), "parameters changed"
    for i, state in before[1].items():
        for key, value in state.items():
            other = after[1][i][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key

    r = trainer.step((x, clean))  # the next clean step updates again (the check above is not vacuous)
    assert not r.skipped and r.scale == 2.0**5
    assert not all(torch.equal(a, _bits(p)) for a, p in zip(before[0], model.parameters()))


# ----------------------------------------------------------------------------
# Underflow fraction against a direct count
# ----------------------------------------------------------------------------


class _Probe(nn.Module):
    """An MLP that keeps the gradients w.r.t. its fp8 layers' outputs (the errors they cast)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 16)
        self.outs = []

    def forward(self, x):
        h1 = self.fc1(x)
        h2 = self.fc2(F.relu(h1))
        if h1.requires_grad:
            h1.retain_grad()
            h2.retain_grad()
            self.outs = [h1, h2]
        return self.head(F.relu(h2))


def test_underflow_fraction_equals_a_direct_count():
    fractions = []
    for scale in (2.0**-4, 1.0, 2.0**6):
        torch.manual_seed(0)
        model = _Probe()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        recipe = NEAREST.with_(keep_last_linear=True)  # head stays in high precision: its error is not cast
        trainer = Trainer(model, opt, recipe=recipe, scaler=LossScaler("static", init_scale=scale))
        g = torch.Generator().manual_seed(3)
        for _ in range(2):
            x, y = torch.randn(64, 32, generator=g), torch.randint(0, 16, (64,), generator=g)
            r = trainer.step((x, y))
            grads = [h.grad for h in model.outs]  # dy of fc1 and fc2, loss scale included
            nonzero = sum(int((d != 0).sum()) for d in grads)
            flushed = sum(int(((d != 0) & (d.abs() <= E5M2_UNDERFLOW)).sum()) for d in grads)
            assert r.error_values == sum(d.numel() for d in grads) == 64 * 64 + 64 * 32
            assert (r.error_nonzero, r.error_underflow) == (nonzero, flushed)
            assert r.underflow_fraction == flushed / nonzero
        assert trainer.precision_summary()["head.weight"]["fp8_calls"] == 0
        fractions.append(r.underflow_fraction)
    # a smaller loss scale flushes more: unscaled cross-entropy errors of a batch of 64 are tiny
    assert fractions[0] > 0.1 and fractions[0] > fractions[1] > fractions[2], fractions


def test_stats_are_collected_only_inside_a_collecting_block():
    assert current_error_stats() is None
    lin = tf8.nn.Linear(16, 16, recipe=NEAREST)
    x = torch.randn(4, 16)
    stats = ErrorCastStats()
    lin(x).sum().backward()  # no collector: nothing counted anywhere
    assert stats.counts() == {"values": 0, "nonzero": 0, "underflow": 0, "saturated": 0}
    with collecting(stats):
        assert current_error_stats() is stats
        lin(x).mul(2.0**-30).sum().backward()
    assert current_error_stats() is None
    counts = stats.counts()
    assert counts["values"] == 64 and counts["nonzero"] == 64 and counts["underflow"] == 64
    with pytest.raises(TypeError, match="ErrorCastStats"):
        with collecting(object()):
            pass


# ----------------------------------------------------------------------------
# Other set-ups
# ----------------------------------------------------------------------------


def test_loss_scaled_trainer_equals_a_plain_loop_in_fp32():
    """Power-of-two loss scaling without fp8 is exact: the Trainer must match a hand-written loop bit for bit."""
    model = _mlp()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    trainer = Trainer(model, opt, scaler=LossScaler("dynamic", init_scale=2.0**10), loss_fn=_weighted_sum)
    g = torch.Generator().manual_seed(2)
    for i in range(3):
        x, c = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
        r = trainer.step((x, c))
        ref_opt.zero_grad()
        loss = _weighted_sum(ref(x), c)
        loss.backward()
        ref_opt.step()
        assert r.loss == float(loss.detach()) and r.scale == 2.0**10 and not r.skipped
        assert r.error_values == 0 and math.isnan(r.underflow_fraction) and math.isnan(r.saturation_fraction)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_no_scaler_bf16_amp_and_clipping():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, opt, amp_dtype=torch.bfloat16, loss_fn=_weighted_sum, max_grad_norm=1e-3)
    x, c = torch.randn(8, 16), torch.randn(8, 16)
    before = [p.detach().clone() for p in model.parameters()]
    r = trainer.step((x, c))
    assert r.output.dtype == torch.bfloat16 and (r.scale, r.next_scale, r.skipped) == (1.0, 1.0, False)
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert float(step) <= 0.1 * 1e-3 * 1.001  # lr * clipped norm
    # without a scaler nothing is skipped even on an overflow, but the report counts it
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # the overflow step must not wreck the weights
    trainer = Trainer(model, frozen, recipe=NEAREST, loss_fn=lambda out, c: (out.float() * c).sum())
    r = trainer.step((x, torch.full((8, 16), 1e6)))
    assert not r.skipped and r.error_saturated > 0 and r.overflow_saturated > 0
    r = trainer.step((x, torch.ones(8, 16)))
    assert r.overflow_saturated == 0  # the tracker starts from zero every step


def test_trainer_argument_errors():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="LossScaler"):
        Trainer(model, opt, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(TypeError, match="nn.Module"):
        Trainer(lambda x: x, opt)
    with pytest.raises(ValueError, match="max_grad_norm"):
        Trainer(model, opt, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="unknown recipe"):
        Trainer(model, opt, recipe="no-such-recipe")


# ----------------------------------------------------------------------------
# Checkpoints: a resume is bit-identical
# ----------------------------------------------------------------------------


def _resumable(recipe: str, seed: int, through: str = "autocast"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    if through == "convert":  # the fp8 state then lives in the modules (Trainer state "fp8_modules")
        tf8.convert(model, recipe)
    # fp16 master weights with stochastic updates for the layers that may run in fp8; the last
    # linear (which mellempudi2019 keeps in high precision, where fp32 inputs meet it) stays fp32.
    groups = [{"params": [p for m in model[:-1] for p in m.parameters()], "master_dtype": torch.float16},
              {"params": list(model[-1].parameters()), "master_dtype": torch.float32}]
    opt = tf8_optim.SGD(groups, lr=0.05, momentum=0.9, rounding="stochastic", seed=seed)
    return Trainer(model, opt, recipe=recipe if through == "autocast" else None, scaler=LossScaler("enhanced"))


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(24, 32, generator=g), torch.randint(0, 16, (24,), generator=g)


@pytest.mark.parametrize("through", ["autocast", "convert"])
@pytest.mark.parametrize("recipe", sorted(tf8.recipe.RECIPES))
def test_resume_through_trainer_state_dict_is_bit_identical(recipe, through, tmp_path):
    """Train 3 steps, save (torch.save with weights_only=True: plain tensors and numbers), go on
    3 more; a Trainer built with other seeds that loads the checkpoint ends with the same bits,
    with the model under the Trainer's fp8_autocast or converted by tf8.convert."""
    trainer = _resumable(recipe, seed=1, through=through)
    for step in range(3):
        trainer.step(_batch(step))
    path = tmp_path / "trainer.pt"
    torch.save(trainer.state_dict(), path)
    if any(t.scale_source == "delayed" for t in (tf8.get_recipe(recipe).activation, tf8.get_recipe(recipe).weight)):
        saved = trainer.state_dict()["fp8" if through == "autocast" else "fp8_modules"]
        assert any(k.endswith("amax_history.weight") for k in saved)
    for step in range(3, 6):
        trainer.step(_batch(step))
    resumed = _resumable(recipe, seed=2, through=through)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    for step in range(3, 6):
        resumed.step(_batch(step))
    assert resumed.steps == trainer.steps == 6
    a, b = _snapshot(trainer.model, trainer.optimizer), _snapshot(resumed.model, resumed.optimizer)
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])), "parameters differ after the resume"
    assert trainer.scaler.get_scale() == resumed.scaler.get_scale()


def test_trainer_load_state_dict_refuses_a_different_setup():
    state = _resumable("hybrid", seed=1).state_dict()
    with pytest.raises(KeyError, match="lacks"):
        _resumable("hybrid", seed=1).load_state_dict({"model": state["model"]})
    no_scaler = Trainer(nn.Linear(32, 16), torch.optim.SGD(nn.Linear(32, 16).parameters(), lr=0.1), recipe="hybrid")
    with pytest.raises(ValueError, match="same scaler setting"):
        no_scaler.load_state_dict(state)
