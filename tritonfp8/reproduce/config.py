"""What ``python -m tritonfp8 reproduce`` runs: the arms, the tasks and their constants.

Every constant lives in a dataclass field here and can be changed from the command
line with ``--set FIELD=VALUE`` (task fields) or in code. Defaults and why:

Fashion-MNIST CNN (``fashion-cnn``)
    SGD, momentum 0.9, lr 0.05, weight decay 5e-4, batch 128, cosine decay to 0, no
    warmup (BatchNorm makes it unnecessary): the textbook set-up for small CNNs,
    not tuned per arm. 5,000 training images are held out as a validation set for
    the curves (2,000 of them per curve point, to bound the cost of fp8 evaluation
    on a CPU); the final accuracy is on the full 10,000-image test set. Every
    arm evaluates with its own forward numerics (fp8 arms in fp8).
Fashion-MNIST ResNet (``fashion-resnet``)
    the same optimizer with a 3-stage ResNet (one BasicBlock per stage).
Text GPT (``text-gpt``)
    a byte-level GPT (2 layers, d_model 64, 4 heads, context 64) on the Python
    standard library sources (the last 10% is validation), AdamW lr 3e-3,
    betas (0.9, 0.99), weight decay 0.01, batch 16, cosine decay to 10% of lr.
    An "epoch" is ``steps_per_epoch`` batches of random windows (nanoGPT style).

Loss scaling (``ls_*`` fields): dynamic starts at 2**16 and halves on an overflow
(GradScaler, Micikevicius et al. 2018); it doubles after ``ls_growth_interval`` = 100
clean steps instead of GradScaler's 2000, because these runs are 200 to 1,000 steps
long: with 2000 the scale could never grow, so dynamic scaling would only ever back
off and the two loss-scaling arms could not differ. Enhanced scaling adds the
constant floor 2**13 (the library's default; Mellempudi et al. do not publish theirs).
In these tasks the dynamic scale never falls below its start (it grows to 2**19-2**24
before an overflow halves it), so that floor never acts; the arm ``fp8+enhanced-ls-high``
puts the floor at ``ls_high_floor`` = 2**22, one power of two below where the 2-layer
runs of 2026-11-29 first overflowed, so that overflows reach it and it acts (the report
counts on how many steps), and ``fp8+dynamic-ls-high`` starts plain dynamic scaling at the
same scale, so that the two differ by the floor alone. The static sweep (``fp8+static-ls-2^k``, k in
STATIC_SCALE_EXPONENTS) brackets the dynamic start: 2**10, 2**16, 2**22.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..recipe import RECIPES, Recipe, TensorRecipe

TASKS = ("fashion-cnn", "fashion-resnet", "text-gpt")
DEFAULT_TASKS = ("fashion-cnn", "text-gpt")

_E5M2_NEAREST = TensorRecipe("e5m2", "nearest", "none")

# FP8 vanilla: E5M2, round to nearest, for every role (weights, activations, errors, weight
# gradients), no per-tensor scale. It keeps the same layers in high precision as the full
# recipe (first conv, last linear), so that the ladder vanilla -> +loss scaling -> full recipe
# changes one thing at a time.
VANILLA = Recipe("fp8-vanilla", weight=_E5M2_NEAREST, activation=_E5M2_NEAREST, error=_E5M2_NEAREST,
                 weight_grad=_E5M2_NEAREST, keep_first_conv=True, keep_last_linear=True)


@dataclass(frozen=True)
class Arm:
    """One training configuration compared against fp32.

    Attributes:
        name: short id used in tables, JSON and plots.
        description: one line for the report.
        recipe: fp8 recipe (None: no fp8).
        amp_dtype: "bfloat16" to run the forward in torch.autocast, else None.
        loss_scaling: None, "dynamic" or "enhanced" (tf8.LossScaler mode with its defaults).
        master_dtype: "float32" or "float16": master weights of the layers that run in fp8
            (layers kept in high precision, norms and embeddings always keep fp32 masters,
            because their high-precision products take fp32 inputs).
        master_rounding: "stochastic" or "nearest": how the fp32 update is written to fp16 masters.
        static_scale: static mode's fixed loss scale.
        floor: enhanced mode's floor: "default" (the task's ``ls_floor``) or "high" (its
            ``ls_high_floor``, set where the floor acts; the scale then starts there too).
        start: dynamic / enhanced mode's first scale: "default" (the task's ``ls_init_scale``)
            or "high" (its ``ls_high_floor``: the same start as the high floor's arm).
    """

    name: str
    description: str
    recipe: Optional[Recipe] = None
    amp_dtype: Optional[str] = None
    loss_scaling: Optional[str] = None
    master_dtype: str = "float32"
    master_rounding: str = "stochastic"
    static_scale: Optional[float] = None
    floor: str = "default"
    start: str = "default"

    def __post_init__(self):
        if (self.loss_scaling == "static") != (self.static_scale is not None):
            raise ValueError(f"arm {self.name!r}: static_scale goes with loss_scaling='static' (and only with it)")
        for field in ("floor", "start"):
            if getattr(self, field) not in ("default", "high"):
                raise ValueError(f"arm {self.name!r}: {field} must be 'default' or 'high', got {getattr(self, field)!r}")

    @property
    def is_fp8(self) -> bool:
        return self.recipe is not None

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["recipe"] = None if self.recipe is None else recipe_dict(self.recipe)
        return d


def recipe_dict(recipe: Recipe) -> dict:
    d = dataclasses.asdict(recipe)
    for role in ("weight", "activation", "error", "weight_grad"):
        if d[role] is not None:
            d[role]["scaling"] = str(getattr(recipe, role).scaling)
    return d


_FULL = RECIPES["mellempudi2019"]
# The static loss-scale sweep: below, at and above where dynamic scaling starts (2**16).
STATIC_SCALE_EXPONENTS = (10, 16, 22)

ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("fp32", "fp32 everywhere (the baseline)"),
    Arm("bf16", "torch.autocast bfloat16 forward, fp32 master weights", amp_dtype="bfloat16"),
    Arm("fp8-vanilla", "E5M2 round-to-nearest for every role, no loss scaling, fp32 masters", recipe=VANILLA),
    Arm("fp8+dynamic-ls", "vanilla + dynamic loss scaling", recipe=VANILLA, loss_scaling="dynamic"),
    Arm("fp8+enhanced-ls", "vanilla + enhanced loss scaling (dynamic, never below the floor ls_floor)", recipe=VANILLA,
        loss_scaling="enhanced"),
    Arm("fp8+dynamic-ls-high", "vanilla + dynamic loss scaling starting at ls_high_floor (fp8+enhanced-ls-high "
        "without its floor)", recipe=VANILLA, loss_scaling="dynamic", start="high"),
    Arm("fp8+enhanced-ls-high", "vanilla + enhanced loss scaling with the floor raised to ls_high_floor, where "
        "overflows reach it (the floor acts); it starts there", recipe=VANILLA, loss_scaling="enhanced", floor="high",
        start="high"),
    *(Arm(f"fp8+static-ls-2^{k}", f"vanilla + a static loss scale of 2^{k}", recipe=VANILLA, loss_scaling="static",
          static_scale=2.0**k) for k in STATIC_SCALE_EXPONENTS),
    Arm("mellempudi2019", "full recipe: enhanced LS, stochastic errors and weight grads, fp16 masters with "
        "stochastic update", recipe=_FULL, loss_scaling="enhanced", master_dtype="float16"),
    Arm("mellempudi2019-all-fp8", "full recipe with the first conv and the last linear in fp8 too (the paper keeps "
        "them in 16 bits)", recipe=_FULL.with_(name="mellempudi2019-all-fp8", keep_first_conv=False,
                                               keep_last_linear=False),
        loss_scaling="enhanced", master_dtype="float16"),
    Arm("abl-nearest-grads", "full recipe but errors and weight grads rounded to nearest", recipe=VANILLA.with_(
        name="mellempudi2019-nearest-grads"), loss_scaling="enhanced", master_dtype="float16"),
    Arm("abl-nearest-master", "full recipe but fp16 master weights updated with round-to-nearest", recipe=_FULL,
        loss_scaling="enhanced", master_dtype="float16", master_rounding="nearest"),
    Arm("hybrid", "E4M3 forward / E5M2 errors, per-tensor current scaling (HFP8 / TE), fp32 masters",
        recipe=RECIPES["hybrid"]),
    Arm("blockwise", "E4M3 with 128x128 weight / 1x128 activation and error blocks (DeepSeek-V3), fp32 masters",
        recipe=RECIPES["blockwise"]),
)}
ARM_ORDER = tuple(ARMS)


@dataclass
class TaskConfig:
    """The constants of one task (see the module docstring for the defaults' reasons)."""

    task: str
    epochs: int = 2
    seeds: int = 3
    batch_size: int = 128
    optimizer: str = "sgd"          # "sgd" or "adamw"
    lr: float = 0.05
    momentum: float = 0.9
    betas: tuple = (0.9, 0.99)
    weight_decay: float = 5e-4
    min_lr_fraction: float = 0.0    # cosine decay from lr to lr * this
    warmup_steps: int = 0
    evals_per_epoch: int = 4        # points on the validation curve per epoch
    # Fashion-MNIST
    train_size: Optional[int] = None  # training images used (None: all but the validation hold-out)
    val_size: int = 5000              # held out of the training set for the curves
    curve_eval_size: int = 2000       # of those, evaluated at each curve point
    test_size: int = 10000            # test images for the final accuracy (10,000 = all)
    data_dir: Optional[str] = None
    # models
    cnn_channels: tuple = (16, 32)
    cnn_hidden: int = 64
    resnet_width: int = 16
    resnet_blocks: int = 1
    # text
    seq_len: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    steps_per_epoch: int = 250
    val_windows: int = 128            # fixed validation windows of seq_len + 1 bytes
    corpus_bytes: Optional[int] = None  # None: every Lib/*.py file
    eval_batch_size: int = 500
    # loss scaling (arms with loss_scaling set)
    ls_init_scale: float = 2.0**16
    ls_growth_interval: int = 100
    ls_floor: float = 2.0**13         # enhanced mode's constant floor
    ls_high_floor: float = 2.0**22    # the floor of the arm whose floor acts (fp8+enhanced-ls-high)
    arms: tuple = ()                  # the arms this task runs (empty: every arm; --arms overrides)
    device: str = "cpu"               # "cpu" (reference backend) or "cuda" (Triton kernels)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; use one of {TASKS}")
        if self.epochs < 1 or self.seeds < 1 or self.batch_size < 1:
            raise ValueError("epochs, seeds and batch_size must be >= 1")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        self.betas = tuple(self.betas)
        self.cnn_channels = tuple(self.cnn_channels)
        self.arms = tuple(self.arms)
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown} in arms=; use some of {list(ARMS)}")

    @property
    def metric(self) -> str:
        return "val_loss" if self.task == "text-gpt" else "test_acc"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# Per task: the quick configuration (the default: about 3 minutes on 2 CPU cores for the
# default tasks) and the full one (--full: about 75 minutes on 2 cores for all three tasks).
# The full runs are sized for a 2-core CPU running the reference backend: 5 seeds each; the
# CNN runs every arm; the ResNet (ResNet-20: 3 BasicBlocks per stage) and the 4-layer text
# model, which cost 4-15x more per step, run the arms that the paper's claims need.
_CLAIM_ARMS = ("fp32", "fp8-vanilla", "fp8+dynamic-ls", "mellempudi2019", "mellempudi2019-all-fp8",
               "abl-nearest-grads")
PRESETS: dict[str, dict[str, dict]] = {
    "fashion-cnn": {
        "quick": dict(epochs=1, seeds=1, train_size=25600, evals_per_epoch=4, curve_eval_size=1000, test_size=10000),
        "full": dict(epochs=3, seeds=5, train_size=25600, evals_per_epoch=4),
    },
    "fashion-resnet": {
        "quick": dict(epochs=1, seeds=1, train_size=6400, evals_per_epoch=2, curve_eval_size=500, test_size=2000),
        "full": dict(epochs=3, seeds=5, train_size=10240, resnet_blocks=3, evals_per_epoch=2, curve_eval_size=1000,
                     arms=_CLAIM_ARMS),
    },
    "text-gpt": {
        "quick": dict(epochs=1, seeds=1, steps_per_epoch=200, evals_per_epoch=4, val_windows=64, optimizer="adamw",
                      lr=3e-3, weight_decay=0.01, batch_size=16, min_lr_fraction=0.1, warmup_steps=20),
        "full": dict(epochs=3, seeds=5, steps_per_epoch=200, n_layers=4, d_model=128, optimizer="adamw", lr=2e-3,
                     weight_decay=0.01, batch_size=16, min_lr_fraction=0.1, warmup_steps=80, evals_per_epoch=4,
                     arms=(*_CLAIM_ARMS, "fp8+dynamic-ls-high", "fp8+enhanced-ls-high", "abl-nearest-master")),
    },
}


def task_config(task: str, full: bool = False, **overrides) -> TaskConfig:
    """The preset of ``task`` (quick or full) with ``overrides`` applied (None values are ignored)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    values = dict(PRESETS[task]["full" if full else "quick"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TaskConfig(task=task, **values)


def parse_override(text: str) -> tuple[str, object]:
    """``FIELD=VALUE`` -> (field, typed value) for a TaskConfig field (VALUE parsed as a Python literal)."""
    import ast

    if "=" not in text:
        raise ValueError(f"--set takes FIELD=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    names = {f.name for f in dataclasses.fields(TaskConfig)} - {"task"}
    if key not in names:
        raise ValueError(f"--set: unknown field {key!r}; fields: {', '.join(sorted(names))}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a plain string, e.g. optimizer=adamw
    return key, value


def select_arms(names: Optional[list[str]], cfg: Optional[TaskConfig] = None) -> list[Arm]:
    """The arms to run: ``names`` (the --arms option) if given, else ``cfg.arms``, else every arm;
    fp32 is always included, and the order is :data:`ARM_ORDER`'s."""
    names = list(names or (cfg.arms if cfg is not None else ()))
    if not names:
        return [ARMS[n] for n in ARM_ORDER]
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; use some of {list(ARM_ORDER)}")
    if "fp32" not in names:
        names = ["fp32", *names]  # every gap is measured against fp32
    return [ARMS[n] for n in ARM_ORDER if n in names]


__all__ = ["Arm", "ARMS", "ARM_ORDER", "TaskConfig", "TASKS", "DEFAULT_TASKS", "PRESETS", "VANILLA", "STATIC_SCALE_EXPONENTS",
           "task_config", "parse_override", "select_arms", "recipe_dict"]
