"""``tf8.Trainer``: one call per training step, with the numbers the seed paper's loss scaling is about.

::

    trainer = tf8.Trainer(model, opt, recipe="mellempudi2019", scaler=tf8.LossScaler("enhanced"),
                          loss_fn=F.cross_entropy)
    for x, y in data:
        r = trainer.step((x, y))      # a StepReport
        print(r.loss, r.scale, r.skipped, r.underflow_fraction, r.saturation_fraction)

One :meth:`Trainer.step` does: zero the gradients; the forward pass inside
``fp8_autocast(recipe)`` (and ``torch.autocast`` when ``amp_dtype`` is given); the
loss; the scaled backward inside ``tracking(scaler)`` (the fp8 linears' error casts
feed the scaler's overflow flag) and inside :func:`collecting` (they also count the
error values that underflowed to zero or saturated); under torch.distributed, the
ranks' delayed-scaling amax histories agreed (:func:`sync_amax_histories`); the optional unscale + gradient
clipping; the scaler's overflow check, which skips the optimizer step or takes it;
the scaler's update. It returns a :class:`StepReport`.

Error-cast statistics: while an :class:`ErrorCastStats` is active (:func:`collecting`),
the backward of every fp8 linear / conv2d counts, on the device (no host sync), for
its error tensor dy [T, N] and its fp8 cast dy_q: the elements, the nonzero elements,
those nonzero in high precision but zero after the cast (*underflowed*), and those
that saturated. Outside such a block nothing is counted and training pays nothing.
Layers that run in high precision cast no error and are not counted; the fp8
attention op's casts are not counted either.

The fp8 layers read the active collector from :mod:`tritonfp8._active` (they do not
import this module, which sits above them).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ._active import ERROR_COLLECTORS, DeviceCounters
from .autocast import fp8_autocast
from .nn.modules import fp8_state_dict, load_fp8_state_dict
from .ops.rounding import nonzero_and_flushed
from .tensor import FP8Tensor
from .training import LossScaler, OverflowTracker, sync_amax_histories, tracking

__all__ = ["Trainer", "StepReport", "ErrorCastStats", "collecting", "current_error_stats"]


# ----------------------------------------------------------------------------
# Error-cast statistics (device-side counters)
# ----------------------------------------------------------------------------

# Indices of the counters of ErrorCastStats.
_VALUES, _NONZERO, _UNDERFLOW, _SATURATED = range(4)


class ErrorCastStats(DeviceCounters):
    """Device-side counts of the fp8 error casts in backward: values, nonzero, underflowed, saturated.

    ``record_error_cast`` only queues device work; :meth:`counts` reads the counters
    (one host sync per device) and :meth:`reset` zeroes them.
    """

    def __init__(self):
        super().__init__(4)

    def record_error_cast(self, dy: torch.Tensor, dy_q: FP8Tensor,
                          nonzero_flushed: Optional[torch.Tensor] = None) -> None:
        """Count the cast ``dy_q`` of the error ``dy`` (same shape): nonzero values that became +-0, saturations.
        ``nonzero_flushed``: :func:`nonzero_and_flushed` of the cast, when the caller has it."""
        c = self._slot(dy.device)
        if nonzero_flushed is None:
            nonzero_flushed = nonzero_and_flushed(dy, dy_q.data.reshape(dy.shape).view(torch.uint8))
        c[_VALUES].add_(dy.numel())
        c[_NONZERO].add_(nonzero_flushed[0])
        c[_UNDERFLOW].add_(nonzero_flushed[1])
        if dy_q.saturated is not None:
            c[_SATURATED].add_(dy_q.saturated.to(torch.int64).sum())

    def counts(self) -> dict[str, int]:
        """{'values', 'nonzero', 'underflow', 'saturated'} since the last reset (host sync)."""
        return dict(zip(("values", "nonzero", "underflow", "saturated"), self._totals()))


def collecting(stats: ErrorCastStats):
    """Context manager: make ``stats`` the collector that :func:`current_error_stats` returns inside the block."""
    if not isinstance(stats, ErrorCastStats):
        raise TypeError(f"collecting() takes an ErrorCastStats, got {type(stats).__name__}")
    return ERROR_COLLECTORS.active(stats)


def current_error_stats() -> Optional[ErrorCastStats]:
    """The innermost active :class:`ErrorCastStats`, or None (then the fp8 backward counts nothing)."""
    return ERROR_COLLECTORS.current()


# ----------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StepReport:
    """What one :meth:`Trainer.step` did.

    Attributes:
        step: index of this call (0-based).
        loss: the unscaled loss (float).
        scale: the loss scale this step's backward used (1.0 without loss scaling).
        next_scale: the loss scale after the scaler's update.
        skipped: True if the optimizer step was skipped (an overflow was found).
        overflow_saturated: saturated values the scaler's tracker saw in this step's fp8
            gradient casts (normal and transposed copies).
        overflow_nonfinite: non-finite tensors the tracker saw (gradients, amaxes).
        error_values: elements of the error tensors cast to fp8 in backward.
        error_nonzero: of those, nonzero in high precision.
        error_underflow: of those, zero after the fp8 cast (flushed to zero).
        error_saturated: error elements that saturated in the cast.
        output: the model output (detached), e.g. for training accuracy.
    """

    step: int
    loss: float
    scale: float
    next_scale: float
    skipped: bool
    overflow_saturated: int = 0
    overflow_nonfinite: int = 0
    error_values: int = 0
    error_nonzero: int = 0
    error_underflow: int = 0
    error_saturated: int = 0
    output: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    @property
    def underflow_fraction(self) -> float:
        """Nonzero error values flushed to zero by the fp8 cast / nonzero error values (NaN if none were cast)."""
        return self.error_underflow / self.error_nonzero if self.error_nonzero else math.nan

    @property
    def saturation_fraction(self) -> float:
        """Saturated error values / error values cast (NaN if none were cast)."""
        return self.error_saturated / self.error_values if self.error_values else math.nan

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("step", "loss", "scale", "next_scale", "skipped", "overflow_saturated",
                                           "overflow_nonfinite", "error_values", "error_nonzero", "error_underflow",
                                           "error_saturated")}
        d["underflow_fraction"] = self.underflow_fraction
        d["saturation_fraction"] = self.saturation_fraction
        return d


def _to_args(inputs) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


class Trainer:
    """Training steps with fp8 autocast, loss scaling, overflow skipping and error-cast statistics.

    Args:
        model: an ``nn.Module`` (unmodified PyTorch layers are fine).
        optimizer: any torch optimizer; ``tf8.optim`` optimizers unscale inside their kernel.
        recipe: fp8 recipe (preset name or ``tf8.Recipe``) for ``fp8_autocast``; None runs
            the model in its own precision.
        scaler: a ``tf8.LossScaler``; None means no loss scaling and no skipping (overflows
            are still counted in the report).
        loss_fn: ``loss_fn(output, target) -> scalar tensor`` (default cross entropy).
        amp_dtype: e.g. ``torch.bfloat16``: run the forward inside ``torch.autocast`` too.
        max_grad_norm: clip the unscaled gradients to this norm (needs ``scaler.unscale_``).
        collect_stats: count the error casts' underflows / saturations (default True).

    ``batch`` for :meth:`step` is ``(inputs, target)``; ``inputs`` is a tensor or a tuple
    of positional arguments of the model.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, recipe=None,
                 scaler: Optional[LossScaler] = None, loss_fn: Optional[Callable] = None, *,
                 amp_dtype: Optional[torch.dtype] = None, max_grad_norm: Optional[float] = None,
                 collect_stats: bool = True):

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Trainer takes an nn.Module, got {type(model).__name__}")
        if scaler is not None and not isinstance(scaler, LossScaler):
            raise TypeError(f"scaler must be a tf8.LossScaler or None, got {type(scaler).__name__}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.loss_fn = loss_fn if loss_fn is not None else torch.nn.functional.cross_entropy
        self.amp_dtype = amp_dtype
        self.max_grad_norm = max_grad_norm
        self.autocast = fp8_autocast(recipe).watch(model) if recipe is not None else None
        self.stats = ErrorCastStats() if collect_stats else None
        self._tracker = OverflowTracker() if scaler is None else scaler.tracker
        self.steps = 0

    # -- forward -------------------------------------------------------------------

    def _regions(self, device_type: str) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.autocast is not None:
            stack.enter_context(self.autocast)
        if self.amp_dtype is not None:
            stack.enter_context(torch.autocast(device_type, dtype=self.amp_dtype))
        return stack

    def forward(self, inputs, target=None):
        """The model's output for ``inputs`` in the trainer's precision (fp8 autocast / amp);
        with ``target``, (output, loss), the loss computed in the same regions.

        Does not change train / eval mode or grad mode: wrap in ``torch.no_grad()`` to evaluate.
        """
        args = _to_args(inputs)
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with self._regions(device_type):  # the loss too, so torch.autocast picks its fp32 loss ops
            output = self.model(*args)
            return output if target is None else (output, self.loss_fn(output, target))

    # -- one step ------------------------------------------------------------------

    def step(self, batch) -> StepReport:
        """Forward, scaled backward, (unscale, clip,) overflow check, step or skip, scaler update."""
        inputs, target = batch
        scaler = self.scaler
        scaling = scaler is not None and scaler.is_enabled()
        scale = scaler.get_scale() if scaling else 1.0
        skipped_before = scaler.skipped_steps if scaling else 0
        # tf8.optim keeps gradients in flat buffers: zeroing them in place avoids a copy per step.
        self.optimizer.zero_grad(set_to_none=not getattr(self.optimizer, "_tf8_fused_unscale", False))
        if self.stats is not None:
            self.stats.reset()
        with contextlib.ExitStack() as stack:
            stack.enter_context(tracking(self._tracker))
            if self.stats is not None:
                stack.enter_context(collecting(self.stats))
            output, loss = self.forward(inputs, target)
            (scaler.scale(loss) if scaling else loss).backward()
        # data-parallel ranks agree their delayed-scaling amaxes over the scaler's group (alone, or none: nothing)
        sync_amax_histories(self.model, scaler.process_group if scaler is not None else None)
        if self.max_grad_norm is not None:
            if scaling:
                scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if scaling:
            scaler.step(self.optimizer)  # the overflow check: one host sync, skips the step on an overflow
            saturated, nonfinite = self._tracker.counts()  # before update() resets the tracker
            scaler.update()
            skipped = scaler.skipped_steps > skipped_before
            next_scale = scaler.get_scale()
        else:  # no loss scaling: nothing is skipped, overflows are only reported
            saturated, nonfinite = self._tracker.counts()
            self.optimizer.step()
            self._tracker.reset()
            skipped, next_scale = False, scale
        errors = self.stats.counts() if self.stats is not None else {}
        report = StepReport(
            step=self.steps, loss=float(loss.detach()), scale=scale, next_scale=next_scale, skipped=skipped,
            overflow_saturated=saturated, overflow_nonfinite=nonfinite,
            error_values=errors.get("values", 0), error_nonzero=errors.get("nonzero", 0),
            error_underflow=errors.get("underflow", 0), error_saturated=errors.get("saturated", 0),
            output=output.detach() if isinstance(output, torch.Tensor) else None,
        )
        self.steps += 1
        return report

    # -- checkpoints -----------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a bit-identical resume needs: ``model``, ``optimizer``, ``scaler`` (or
        None), ``fp8`` (the autocast region's per-layer state: seeds, call counters, amax
        histories; {} without a recipe), ``fp8_modules`` (the same for tf8.nn modules, e.g.
        from ``tf8.convert``: :func:`tf8.nn.fp8_state_dict`) and ``steps``. Every leaf is a
        tensor or a number."""

        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "fp8": self.autocast.state_dict(self.model) if self.autocast is not None else {},
            "fp8_modules": fp8_state_dict(self.model),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` into a Trainer built the same way (model, optimizer, recipe, scaler)."""

        missing = {"model", "optimizer", "scaler", "fp8", "steps"} - set(state)
        if missing:
            raise KeyError(f"trainer state lacks {sorted(missing)}; pass a dict from Trainer.state_dict()")
        if (state["scaler"] is None) != (self.scaler is None):
            raise ValueError("the saved trainer " + ("had no" if state["scaler"] is None else "had a")
                             + " LossScaler and this one " + ("has one" if self.scaler is not None else "has none")
                             + "; build the Trainer with the same scaler setting")
        if state["fp8"] and self.autocast is None:
            raise ValueError("the saved trainer ran an fp8 recipe and this one has none; pass the same recipe")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.autocast is not None:
            self.autocast.load_state_dict(state["fp8"], self.model)
        # Saves of earlier versions hold the modules' fp8 state in "model" (restored above).
        if "fp8_modules" in state:
            load_fp8_state_dict(self.model, state["fp8_modules"])
        self.steps = int(state["steps"])

    # -- introspection ---------------------------------------------------------------

    def precision_summary(self) -> dict[str, dict]:
        """{layer: {'op', 'fp8_calls', 'high_precision_calls', 'reasons'}} from the fp8 autocast so far ({} without a recipe)."""
        if self.autocast is None:
            return {}
        return {name: {"op": r.op, "shape": r.shape, "fp8_calls": r.fp8_calls,
                       "high_precision_calls": r.high_precision_calls, "reasons": dict(r.reasons)}
                for name, r in self.autocast.summary().items()}
