"""Loss scaling for fp8 / 16-bit training (numerics.md section 7).

:class:`LossScaler` follows the API of ``torch.amp.GradScaler`` (``scale``, ``unscale_``,
``step``, ``update``, ``get_scale``, ``state_dict`` / ``load_state_dict``), so a
training loop changes one line::

    scaler = tf8.LossScaler("enhanced")            # was: torch.amp.GradScaler()
    for x, y in data:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)                      # optional, e.g. before clipping
        scaler.step(opt)                          # skipped if anything overflowed
        scaler.update()

Modes:

========== ====================================================================================
static     a fixed scale; a step with an overflow is skipped, the scale stays.
dynamic    Micikevicius et al. 2018 / GradScaler: start at ``init_scale`` (2**16); an
           overflow skips the step and multiplies the scale by ``backoff_factor`` (0.5);
           ``growth_interval`` (2000) clean steps in a row multiply it by ``growth_factor`` (2).
enhanced   Mellempudi et al. 2019: dynamic, with a minimum threshold (the *floor*) that
           rises on a schedule. An overflow never takes the scale below the floor; at the
           floor an overflow skips the step and leaves the scale where it is. When the
           floor rises above the scale, the scale is raised to the floor.
adaptive   dynamic global scale, plus a per-layer scale after Zhao et al. 2019 applied
           through backward hooks (see :meth:`LossScaler.attach`): each layer's error
           tensor (the gradient w.r.t. its output) is multiplied, before the layer's
           backward quantizes it, by a power of two chosen so that at most
           ``target_underflow`` of its nonzero values fall below the fp8 format's smallest
           subnormal, without letting its largest value exceed the format's max.
========== ====================================================================================

Overflow detection costs one host sync per optimizer step, not one per layer: an
:class:`OverflowTracker` accumulates, on the device, the saturation counts and
non-finite amaxes of quantized tensors (``record(q)`` for an :class:`FP8Tensor`) and
the non-finite check of the gradients; ``step()`` reads it once. A step with any
non-finite or saturated gradient is skipped: parameters, master weights, optimizer
state and the optimizer's step counters stay bit-for-bit as they were.

The schedule step used by the enhanced floor is the number of ``update()`` calls so
far (iterations, skipped ones included).
"""
from __future__ import annotations

import math
import struct
import zlib
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from . import _distributed
from ._active import OVERFLOW_TRACKERS, DeviceCounters
from .formats import get_format
from .tensor import FP8Tensor

__all__ = ["LossScaler", "OverflowTracker", "tracking", "current_tracker", "MODES", "sync_amax_histories"]

MODES = ("static", "dynamic", "enhanced", "adaptive")

# Defaults. Dynamic: those of Micikevicius et al. 2018 and torch.amp.GradScaler.
DEFAULT_INIT_SCALE = 2.0**16
DEFAULT_GROWTH_FACTOR = 2.0
DEFAULT_BACKOFF_FACTOR = 0.5
DEFAULT_GROWTH_INTERVAL = 2000
# Enhanced: Mellempudi et al. 2019 publish the idea of a rising floor but not its values.
# 2**13 keeps the scale within three halvings of the default start: enough room to ride
# out a few transient overflows, while E5M2 errors (smallest subnormal 2**-16) scaled by
# at least 2**13 keep gradients down to about 2**-29 representable.
DEFAULT_FLOOR = 2.0**13
# Adaptive (Zhao et al. 2019 use an underflow-rate target of 1e-3); bounds keep every
# per-layer factor a finite power of two with room left in fp32 for the global scale.
DEFAULT_TARGET_UNDERFLOW = 1e-3
DEFAULT_LAYER_SCALE_BOUNDS = (2.0**-32, 2.0**32)

FloorSchedule = Union[float, Sequence, Mapping, Callable[[int, Optional[torch.Tensor]], float]]


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", float(x)))[0]


# ----------------------------------------------------------------------------
# Overflow tracking on the device
# ----------------------------------------------------------------------------


class OverflowTracker(DeviceCounters):
    """Device-side overflow counts of one training step; read on the host once.

    Every ``record*`` call only queues device work (no host synchronization). Two int64
    counters per device: [saturated values, non-finite tensors].
    """

    def __init__(self):
        super().__init__(2)

    def record(self, q: FP8Tensor) -> None:
        """Record a quantized tensor: its ``saturated`` count and whether its ``amax`` is non-finite.

        The transposed copy (``q.transposed``), when present, is recorded too.
        """
        if not isinstance(q, FP8Tensor):
            raise TypeError(f"record() takes an FP8Tensor, got {type(q).__name__}; use record_tensor() for a plain tensor")
        for t in (q, q.transposed):
            if t is None:
                continue
            c = self._slot(t.data.device)
            if t.saturated is not None:
                c[0].add_(t.saturated.to(torch.int64).sum())
            if t.amax is not None:
                c[1].add_((~torch.isfinite(t.amax)).any())

    def record_saturated(self, count: torch.Tensor) -> None:
        """Add a device count of saturated values (e.g. a quantize kernel's output)."""
        self._slot(count.device)[0].add_(count.to(torch.int64).sum())

    def record_tensor(self, t: torch.Tensor) -> None:
        """Record whether a plain tensor (e.g. a gradient) holds any NaN or Inf."""
        self._slot(t.device)[1].add_((~torch.isfinite(t)).any())

    def record_found_inf(self, found: torch.Tensor) -> None:
        """Record a device flag (nonzero = overflow), e.g. from ``torch._amp_foreach_non_finite_check_and_unscale_``."""
        self._slot(found.device)[1].add_((found != 0).any())

    def counts(self) -> tuple[int, int]:
        """(saturated values, non-finite tensors) recorded since the last reset (host sync)."""
        sat, nonfinite = self._totals()
        return sat, nonfinite

    def found(self) -> bool:
        """True if anything overflowed since the last reset (one host sync per device)."""
        return any(bool(c.any()) for c in self._counts.values())


def tracking(tracker: "OverflowTracker | LossScaler"):
    """Context manager: make ``tracker`` (or a scaler's tracker) the one :func:`current_tracker`
    returns, e.g. for the fp8 modules to record their quantized gradients into during backward."""
    return OVERFLOW_TRACKERS.active(tracker.tracker if isinstance(tracker, LossScaler) else tracker)


def current_tracker() -> Optional[OverflowTracker]:
    """The innermost tracker of an active :func:`tracking` block, or None."""
    return OVERFLOW_TRACKERS.current()


# ----------------------------------------------------------------------------
# Per-layer (adaptive) scales
# ----------------------------------------------------------------------------

_F32_MIN_EXP = -149  # floor(log2) of the smallest fp32 subnormal
_F32_BINS = 128 - _F32_MIN_EXP  # floor(log2 |x|) of a finite nonzero fp32 lies in [-149, 127]


def layer_scale_exponent(tensors: Sequence[torch.Tensor], target_underflow: float, threshold_exp: int,
                         fmax: float, kmin: int, kmax: int) -> torch.Tensor:
    """Exponent k (int64 device scalar) of the per-layer factor 2**k for an error tensor.

    With E = floor(log2 |x|) of each nonzero value, the scaled value |x| * 2**k is below
    2**threshold_exp exactly when E + k < threshold_exp, so the underflow fraction for
    every k follows from a histogram of E. k is the smallest exponent whose fraction is
    at most ``target_underflow``, lowered if needed so that max |x| * 2**k <= fmax (no
    such bound for fmax = inf), and clamped to [kmin, kmax]. A tensor with no nonzero
    values or any NaN / Inf gets k = 0. All device work, no host synchronization.
    """
    device = tensors[0].device
    counts = torch.zeros(_F32_BINS, dtype=torch.int64, device=device)
    amax = torch.zeros((), dtype=torch.float32, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for t in tensors:
        a = t.detach().reshape(-1).float().abs()
        finite = torch.isfinite(a)
        bad = bad | ~finite.all()
        a = torch.where(finite, a, torch.zeros_like(a))
        amax = torch.maximum(amax, a.amax() if a.numel() else amax)
        _, e = torch.frexp(a)  # a = m * 2**e with m in [0.5, 1): floor(log2 a) = e - 1
        bins = (e.to(torch.int64) - 1 - _F32_MIN_EXP).clamp(0, _F32_BINS - 1)
        counts.scatter_add_(0, bins, (a > 0).to(torch.int64))
    nnz = counts.sum()
    below = torch.cumsum(counts, 0) - counts  # below[j]: values with E < j + _F32_MIN_EXP
    ok = below.double() <= target_underflow * nnz.double()
    e_star = ok.sum() - 1 + _F32_MIN_EXP  # largest E with fraction(E' < E) <= target (a prefix)
    k_under = threshold_exp - e_star
    k = k_under
    if math.isfinite(fmax):  # the largest k with amax * 2**k <= fmax, exactly, from the exponents
        ma, ea = torch.frexp(amax)
        mf, ef = math.frexp(fmax)
        k = torch.minimum(k, ef - ea.to(torch.int64) - (ma > mf).to(torch.int64))
    k = k.clamp(kmin, kmax)
    return torch.where(bad | (nnz == 0), torch.zeros_like(k), k)


class _LayerScales:
    """Backward hooks that give each hooked module's error tensor its own power-of-two factor."""

    def __init__(self, scaler: "LossScaler", model: torch.nn.Module, modules):
        self.scaler = scaler
        self.handles = []
        self.factors: dict[torch.nn.Module, torch.Tensor] = {}
        self.owner: dict[torch.Tensor, torch.nn.Module] = {}
        self.names: dict[torch.nn.Module, str] = {}
        for name, m in model.named_modules():
            own = list(m.parameters(recurse=False))
            if not own:
                continue
            if modules is None:
                if any(True for c in m.children() for _ in c.parameters()):
                    continue  # hook the innermost modules that own parameters
            elif not modules(name, m):
                continue
            for p in own:
                if p in self.owner:
                    raise ValueError(f"parameter {name}.* is shared by two hooked modules; per-layer scales "
                                     f"cannot be unscaled for it (exclude one of them with modules=)")
                self.owner[p] = m
            self.names[m] = name
            self.handles.append(m.register_full_backward_pre_hook(self._pre_hook))
            self.handles.append(m.register_full_backward_hook(self._post_hook))
        if not self.names:
            raise ValueError("adaptive loss scaling found no module with parameters to hook")

    def _factor(self, module, grads) -> torch.Tensor:
        f = self.factors.get(module)
        if f is None:
            s = self.scaler
            fmax = s._fmax if s.power_of_two else math.inf
            k = layer_scale_exponent(grads, s.target_underflow, s._threshold_exp, fmax, s._kmin, s._kmax)
            f = torch.exp2(k.to(torch.float32))
            if not s.power_of_two:  # the underflow power of two, or the exact overflow bound if lower
                amax = torch.stack([g.detach().float().abs().amax() for g in grads if g.numel()]).amax()
                usable = (amax > 0) & torch.isfinite(amax)
                exact = (s._fmax / torch.where(usable, amax, torch.ones_like(amax))).clamp(*s.layer_scale_bounds)
                f = torch.where(usable, torch.minimum(f, exact), f)
            # Gradients scaled by f are summed across data-parallel ranks: one factor for all.
            f = _distributed.agree_min_(f, s._group())
            self.factors[module] = f
        return f

    def _pre_hook(self, module, grad_output):
        if not self.scaler._enabled:
            return None
        grads = [g for g in grad_output if g is not None]
        if not grads:
            return None
        f = self._factor(module, grads)
        return tuple(None if g is None else g * f.to(g.device) for g in grad_output)

    def _post_hook(self, module, grad_input, grad_output):
        f = self.factors.get(module)
        if f is None or not self.scaler._enabled:
            return None
        return tuple(None if g is None else g / f.to(g.device) for g in grad_input)

    def reset(self) -> None:
        self.factors.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


# ----------------------------------------------------------------------------
# LossScaler
# ----------------------------------------------------------------------------

_READY, _UNSCALED, _STEPPED = 0, 1, 2


class LossScaler:
    """Loss scaling in four modes with the ``torch.amp.GradScaler`` API (module docstring).

    Args:
        mode: "static", "dynamic", "enhanced" or "adaptive".
        init_scale: starting scale (the fixed scale in static mode). Default 2**16.
        growth_factor, backoff_factor, growth_interval: dynamic rules (2.0, 0.5, 2000).
        max_scale: optional cap on growth (None: only finiteness).
        floor: enhanced mode's minimum threshold schedule. One of: a number (constant);
            a sequence of (step, floor) pairs or a dict {step: floor}, piecewise constant
            from each step on (0 before the first listed step); or a callable
            ``floor(step, loss) -> float`` where loss is the last tensor given to
            :meth:`scale` (calling ``float(loss)`` there syncs with the device).
            Default (None): the constant 2**13 (see DEFAULT_FLOOR).
        model: adaptive mode: the model to hook (or call :meth:`attach` later).
        modules: adaptive mode: ``modules(name, module) -> bool`` choosing the hooked
            modules; default: the innermost modules that own parameters.
        target_underflow: adaptive: largest fraction of a layer's nonzero error values
            allowed below ``fmt``'s smallest subnormal (1e-3, Zhao et al.).
        fmt: adaptive: the fp8 format the errors are quantized to ("e5m2").
        margin: adaptive: powers of two of headroom below ``fmt``'s max (0).
        power_of_two: adaptive: per-layer factors are powers of two (True). False keeps
            the underflow-derived power of two but uses the exact overflow bound.
        layer_scale_bounds: adaptive: (min, max) per-layer factor, (2**-32, 2**32).
        enabled: False makes every method a pass-through (as GradScaler).
        process_group: the ranks that must take the same decisions (data-parallel
            replicas). Default None: the default group once ``torch.distributed`` is
            initialized (each overflow decision is then one all-reduce, so no rank skips
            a step alone, and adaptive per-layer factors are the minimum over ranks);
            False: every rank decides alone (e.g. ranks that train different models).
    """

    def __init__(
        self,
        mode: str = "dynamic",
        *,
        init_scale: float = DEFAULT_INIT_SCALE,
        growth_factor: float = DEFAULT_GROWTH_FACTOR,
        backoff_factor: float = DEFAULT_BACKOFF_FACTOR,
        growth_interval: int = DEFAULT_GROWTH_INTERVAL,
        max_scale: Optional[float] = None,
        floor: Optional[FloorSchedule] = None,
        model: Optional[torch.nn.Module] = None,
        modules: Optional[Callable[[str, torch.nn.Module], bool]] = None,
        target_underflow: float = DEFAULT_TARGET_UNDERFLOW,
        fmt="e5m2",
        margin: int = 0,
        power_of_two: bool = True,
        layer_scale_bounds: tuple[float, float] = DEFAULT_LAYER_SCALE_BOUNDS,
        enabled: bool = True,
        process_group=None,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown loss-scaling mode {mode!r}; use one of {MODES}")
        if not (isinstance(init_scale, (int, float)) and 0 < init_scale < math.inf):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor!r}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval must be an int >= 1, got {growth_interval!r}")
        if max_scale is not None and not max_scale > 0:
            raise ValueError(f"max_scale must be > 0 or None, got {max_scale!r}")
        if not 0.0 <= target_underflow < 1.0:
            raise ValueError(f"target_underflow must be in [0, 1), got {target_underflow!r}")
        lo, hi = layer_scale_bounds
        if not 0 < lo <= 1 <= hi < math.inf:
            raise ValueError(f"layer_scale_bounds must satisfy 0 < min <= 1 <= max < inf, got {layer_scale_bounds!r}")
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise ValueError(f"margin must be an int >= 0, got {margin!r}")
        self.mode = mode
        self._enabled = bool(enabled)
        self._process_group = process_group
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        self._max_scale = None if max_scale is None else _f32(max_scale)
        if floor is not None and mode != "enhanced":
            raise ValueError(f"floor= is a setting of mode 'enhanced', not {mode!r}")
        self._floor_schedule = self._check_schedule(DEFAULT_FLOOR if floor is None else floor) if mode == "enhanced" else None
        self._growth_tracker = 0
        self._iteration = 0
        self._skipped = 0
        self._floor_raises = 0
        self._last_loss: Optional[torch.Tensor] = None
        self._floor = self._floor_at(0) if mode == "enhanced" else 0.0
        self._scale = max(_f32(init_scale), self._floor)
        self._scale_cache: dict[torch.device, torch.Tensor] = {}
        self._per_optimizer: dict[int, dict] = {}
        self.tracker = OverflowTracker()
        # adaptive
        f = get_format(fmt)
        self.fmt = f
        self.target_underflow = float(target_underflow)
        self.power_of_two = bool(power_of_two)
        self.layer_scale_bounds = (float(lo), float(hi))
        self._threshold_exp = int(math.log2(f.min_subnormal))
        self._fmax = f.max * 2.0**-margin
        self._kmin, self._kmax = math.ceil(math.log2(lo)), math.floor(math.log2(hi))
        self._layers: Optional[_LayerScales] = None
        if model is not None:
            self.attach(model, modules)
        elif modules is not None:
            raise ValueError("modules= needs model= (or pass both to attach())")

    # -- configuration ----------------------------------------------------------------

    @staticmethod
    def _check_schedule(floor):
        if callable(floor):
            return floor
        if isinstance(floor, (int, float)) and not isinstance(floor, bool):
            pairs = [(0, float(floor))]
        elif isinstance(floor, Mapping):
            pairs = sorted((int(k), float(v)) for k, v in floor.items())
        elif isinstance(floor, Iterable):
            pairs = [(int(s), float(v)) for s, v in floor]
            if [s for s, _ in pairs] != sorted({s for s, _ in pairs}):
                raise ValueError(f"floor schedule steps must be strictly increasing, got {[s for s, _ in pairs]}")
        else:
            raise TypeError(f"floor must be a number, (step, floor) pairs, a dict or a callable, got {type(floor).__name__}")
        for s, v in pairs:
            if s < 0 or not 0 <= v < math.inf:
                raise ValueError(f"floor schedule entry ({s}, {v}) needs step >= 0 and a finite floor >= 0")
        return pairs

    def _floor_at(self, step: int) -> float:
        sched = self._floor_schedule
        if callable(sched):
            value = float(sched(step, self._last_loss))
            if not 0 <= value < math.inf:
                raise ValueError(f"the floor schedule returned {value!r} at step {step}; it must be finite and >= 0")
            return _f32(value)
        value = 0.0
        for s, v in sched:
            if s <= step:
                value = v
        return _f32(value)

    def attach(self, model: torch.nn.Module, modules: Optional[Callable[[str, torch.nn.Module], bool]] = None) -> None:
        """Adaptive mode: hook the modules of ``model`` that get per-layer scales.

        Each hooked module's ``grad_output`` is multiplied by its factor 2**k before the
        module's backward runs (so the module quantizes a well-scaled error), and its
        ``grad_input`` is divided by it again, so the tensors passed between layers carry
        only the global scale. The module's parameter gradients carry global * factor and
        are unscaled per parameter by :meth:`unscale_` / :meth:`step`. Factors are computed
        on the first backward through a module after each :meth:`update` and then kept,
        so gradient accumulation over micro-batches sees one factor. Limitations of full
        backward hooks apply (no in-place modification of a hooked module's output); a
        parameter used outside its module, or by two hooked modules, is not supported.
        """
        if self.mode != "adaptive":
            raise ValueError(f"attach() is for mode 'adaptive', this scaler is {self.mode!r}")
        if self._layers is not None:
            raise RuntimeError("this scaler is already attached to a model; call detach() first")
        self._layers = _LayerScales(self, model, modules)

    def detach(self) -> None:
        """Remove the adaptive hooks."""
        if self._layers is not None:
            self._layers.remove()
            self._layers = None

    def layer_scales(self) -> dict[str, float]:
        """Adaptive mode: {module name: per-layer factor} of the current iteration (host sync)."""
        if self._layers is None:
            return {}
        return {self._layers.names[m]: float(f) for m, f in self._layers.factors.items()}

    # -- GradScaler API ----------------------------------------------------------------

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        """The current global loss scale (1.0 when disabled)."""
        return self._scale if self._enabled else 1.0

    def get_floor(self) -> float:
        """Enhanced mode: the current minimum threshold (0 in other modes)."""
        return self._floor

    @property
    def skipped_steps(self) -> int:
        """Number of iterations whose optimizer step was skipped."""
        return self._skipped

    @property
    def floor_raises(self) -> int:
        """Enhanced mode: number of update() calls in which the floor raised the scale (the
        dynamic rule, or a rising floor schedule, would have left it below the floor)."""
        return self._floor_raises

    @property
    def iteration(self) -> int:
        """Number of update() calls so far (the step of the floor schedule)."""
        return self._iteration

    def _scale_tensor(self, device) -> torch.Tensor:
        device = torch.device(device)
        t = self._scale_cache.get(device)
        if t is None:
            t = self._scale_cache[device] = torch.full((), self._scale, dtype=torch.float32, device=device)
        return t

    def _set_scale(self, value: float) -> None:
        value = _f32(value)
        if value != self._scale:
            self._scale = value
            self._scale_cache.clear()

    def scale(self, outputs):
        """Multiply a loss (tensor, or nested lists / tuples of tensors) by the current scale."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            if outputs.numel() == 1:
                self._last_loss = outputs.detach()
            return outputs * self._scale_tensor(outputs.device)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise TypeError(f"scale() takes a tensor or a list / tuple of tensors, got {type(outputs).__name__}")

    def record(self, q: FP8Tensor) -> None:
        """Record a quantized gradient's saturation / non-finite amax (see :class:`OverflowTracker`)."""
        self.tracker.record(q)

    @property
    def process_group(self):
        """The ``process_group`` given (None: the default group; False: each rank decides alone)."""
        return self._process_group

    def _group(self):
        """The process group whose ranks agree on this scaler's decisions, or None (alone)."""
        return _distributed.resolve_group(self._process_group)

    def _found(self) -> bool:
        """Whether any rank recorded an overflow this iteration (one host sync, one all-reduce)."""
        return _distributed.agree_any(self.tracker.found(), self._group())

    def _opt_state(self, optimizer) -> dict:
        return self._per_optimizer.setdefault(id(optimizer), {"stage": _READY, "found": None})

    def _grad_scales(self, optimizer):
        """The loss scale of the gradients: one tensor, or {param: tensor} with per-layer factors."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return None
        if self._layers is None:
            return self._scale_tensor(params[0].grad.device)
        per_module: dict = {}
        out = {}
        for p in params:
            s = self._scale_tensor(p.grad.device)
            m = self._layers.owner.get(p)
            f = None if m is None else self._layers.factors.get(m)
            if f is None:
                out[p] = s
            else:
                if m not in per_module:
                    per_module[m] = s * f.to(s.device)
                out[p] = per_module[m]
        return out

    def unscale_(self, optimizer) -> None:
        """Divide the optimizer's gradients by their loss scale in place and check them for NaN / Inf.

        Recorded in the tracker on the device; nothing is read back here. Call it only when
        the unscaled gradients are needed before the step (e.g. for clipping): 16-bit
        gradients are unscaled in their own dtype (rounded to nearest, small values may
        underflow), whereas without it tf8.optim optimizers unscale inside their kernel in fp32.
        """
        if not self._enabled:
            return
        st = self._opt_state(optimizer)
        if st["stage"] == _UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update()")
        if st["stage"] == _STEPPED:
            raise RuntimeError("unscale_() is being called after step()")
        scales = self._grad_scales(optimizer)
        if scales is not None:
            groups: dict = {}
            if isinstance(scales, dict):
                for p, s in scales.items():
                    groups.setdefault((p.grad.device, id(s)), (s, []))[1].append(p.grad)
            else:
                for g in optimizer.param_groups:
                    for p in g["params"]:
                        if p.grad is not None:
                            groups.setdefault((p.grad.device, 0), (scales, []))[1].append(p.grad)
            for (device, _), (s, grads) in groups.items():
                if any(g.is_sparse for g in grads):
                    raise RuntimeError("LossScaler does not support sparse gradients")
                inv = s.to(device).double().reciprocal().float().reshape(1)
                found = torch.zeros(1, dtype=torch.float32, device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
                self.tracker.record_found_inf(found)
        st["stage"] = _UNSCALED

    def _check_grads(self, optimizer) -> None:
        """Non-finite check without unscaling (the optimizer unscales inside its kernel)."""
        prepare = getattr(optimizer, "prepare_grads", None)
        grads = prepare() if prepare is not None else [
            p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None
        ]
        for g in grads:
            self.tracker.record_tensor(g)

    def step(self, optimizer, *args, **kwargs):
        """``optimizer.step()`` unless an overflow was recorded this iteration (one host sync).

        tf8.optim optimizers get the loss scale(s) as ``grad_scale=`` and unscale inside
        their fused kernel, unless :meth:`unscale_` was called; other optimizers get
        gradients unscaled in place. Returns the optimizer's return value, or None if skipped.
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs or args:
            raise RuntimeError("closures are not supported by LossScaler.step() (as in torch.amp.GradScaler)")
        st = self._opt_state(optimizer)
        if st["stage"] == _STEPPED:
            raise RuntimeError("step() has already been called on this optimizer since the last update()")
        fused = getattr(optimizer, "_tf8_fused_unscale", False)
        pending_scale = fused and st["stage"] == _READY
        if st["stage"] == _READY:
            if fused:
                self._check_grads(optimizer)
            else:
                self.unscale_(optimizer)
        found = self._found()
        st["found"] = found
        st["stage"] = _STEPPED
        if found:
            return None
        if pending_scale:
            scales = self._grad_scales(optimizer)
            if scales is not None:
                kwargs["grad_scale"] = scales
        return optimizer.step(**kwargs)

    def update(self, new_scale: Optional[Union[float, torch.Tensor]] = None) -> None:
        """End the iteration: apply the mode's scale rule to this iteration's overflow outcome.

        ``new_scale`` sets the scale directly instead (as GradScaler). Requires a prior
        :meth:`step` (or :meth:`unscale_`) in this iteration.
        """
        if not self._enabled:
            return
        if new_scale is not None:
            value = float(new_scale)
            if not 0 < value < math.inf:
                raise ValueError(f"new_scale must be positive and finite, got {value!r}")
            self._set_scale(value)
        else:
            decided = [st["found"] for st in self._per_optimizer.values() if st["found"] is not None]
            if decided:
                found = any(decided)
            elif self._per_optimizer:
                found = self._found()
            else:
                raise RuntimeError("update() needs step() (or unscale_()) to have been called in this iteration")
            if found:
                self._skipped += 1
            self._apply_rule(found)
        self.tracker.reset()
        self._per_optimizer.clear()
        if self._layers is not None:
            self._layers.reset()

    def _apply_rule(self, found: bool) -> None:
        """The mode's scale update for one iteration (see the module docstring)."""
        scale = self._scale
        raised = False
        if self.mode != "static":
            if found:
                self._growth_tracker = 0
                scale = _f32(scale * _f32(self._backoff_factor))
                if self.mode == "enhanced" and scale < self._floor:
                    scale = self._floor
                    raised = True
            else:
                self._growth_tracker += 1
                if self._growth_tracker >= self._growth_interval:
                    self._growth_tracker = 0
                    grown = _f32(scale * _f32(self._growth_factor))
                    if self._max_scale is not None:
                        grown = min(grown, self._max_scale)
                    if math.isfinite(grown):
                        scale = grown
        self._iteration += 1
        if self.mode == "enhanced":
            self._floor = self._floor_at(self._iteration)
            if scale < self._floor:
                scale = self._floor
                self._growth_tracker = 0
                raised = True
        self._floor_raises += raised
        self._set_scale(scale)

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume: mode, scale, counters, floor and the growth rules."""
        if not self._enabled:
            return {}
        return {
            "mode": self.mode, "scale": self._scale, "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
            "growth_tracker": self._growth_tracker, "iteration": self._iteration, "floor": self._floor,
            "skipped_steps": self._skipped, "max_scale": self._max_scale, "floor_raises": self._floor_raises,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` of a scaler of the same mode (the floor schedule comes from the constructor)."""
        if not self._enabled:
            return
        if not state_dict:
            raise RuntimeError("the state dict is empty: it came from a disabled scaler")
        if state_dict.get("mode") != self.mode:
            raise ValueError(f"state dict is for mode {state_dict.get('mode')!r}, this scaler is {self.mode!r}")
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._growth_tracker = int(state_dict["growth_tracker"])
        self._iteration = int(state_dict["iteration"])
        self._floor = float(state_dict["floor"])
        self._skipped = int(state_dict["skipped_steps"])
        self._floor_raises = int(state_dict.get("floor_raises", 0))  # absent in checkpoints before it was counted
        self._max_scale = state_dict["max_scale"]
        self._scale_cache.clear()
        self._scale = _f32(state_dict["scale"])
        self._per_optimizer.clear()
        self.tracker.reset()


def sync_amax_histories(model: torch.nn.Module, group=None) -> int:
    """Make every delayed-scaling amax history of ``model``'s fp8 layers its maximum over the
    ranks of ``group`` (default: the default process group; ``False``: none); returns how many
    histories were agreed (0 when this process runs alone or the model has none).

    Data-parallel ranks cast different batches, so each rank records its own amaxes: left
    alone, their delayed scales drift apart, and away from one process trained on the whole
    batch, whose amax is the maximum of the ranks' amaxes. Call it once per step on every
    rank, after the backward and before the next forward (torchao's
    ``sync_float8_amax_and_scale_history`` does this job); :class:`tritonfp8.Trainer` does,
    over its loss scaler's process group. The whole histories are reduced, so several casts
    per step (gradient accumulation) are agreed too. Covers tf8.nn modules and the weights
    fp8_autocast casts (FSDP2 shards included), under DDP and FSDP2 alike.

    Two all-reduces: one that checks that every rank holds the same histories (names and
    sizes; a mismatch raises on every rank), then the histories. A model without delayed
    roles issues none, so every rank must run the same recipes.
    """
    from .autocast import layer_states
    from .nn.modules import fp8_layer_states

    group = _distributed.resolve_group(group)
    if group is None:
        return 0
    named, seen = [], set()
    for name, state in fp8_layer_states(model) + layer_states(model):
        if id(state) not in seen:  # a tied weight's state once
            seen.add(id(state))
            named += [(f"{name}.{role}", h) for role, h in sorted(state.amax_history.items())]
    if not named:
        return 0
    layout = zlib.crc32(";".join(f"{n}:{h.numel()}" for n, h in named).encode())
    numel = sum(h.numel() for _, h in named)
    check = torch.tensor([numel, -numel, layout, -layout], dtype=torch.int64)
    _distributed.agree_max_(check, group)
    if int(check[0]) != -int(check[1]) or int(check[2]) != -int(check[3]):
        raise RuntimeError(
            "sync_amax_histories: the ranks hold different delayed-scaling histories (layers, roles or lengths): "
            "every rank must run the same model under the same recipes")
    histories = [h for _, h in named]
    flat = torch.cat([h.reshape(-1).to(torch.float32) for h in histories])
    _distributed.agree_max_(flat, group)
    for h, part in zip(histories, flat.split([h.numel() for h in histories])):
        h.copy_(part.reshape(h.shape).to(h.device))
    return len(histories)
