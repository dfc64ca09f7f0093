"""``fp8_autocast``: run a stock PyTorch model's products in fp8 without editing it, and
``convert``: swap modules for explicit fp8 modules.

Inside ``fp8_autocast``, calls of ``F.linear``, ``F.conv2d``,
``F.scaled_dot_product_attention`` and ``F.multi_head_attention_forward``
(``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and decoder layers) are
seen by one ``torch.overrides.TorchFunctionMode`` and run through the fp8 ops.
Nothing global is patched: the mode is active only inside the region, on this
thread, and leaving the region (also by an exception) restores everything.

Per-layer state (delayed-scaling amax histories, seeds) is keyed by the weight
tensor, so it persists across regions for as long as the weight lives.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .nn import functional as F8
from .nn.modules import Conv2d as FP8Conv2d
from .nn.modules import Linear as FP8Linear
from .nn.state import LayerState
from .recipe import Recipe, get_recipe

_local = threading.local()
# weight tensor -> {recipe name: LayerState}; outlives regions, dies with the weight.
_STATES: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@dataclass
class LayerRecord:
    """One row of the autocast summary: how a layer's calls ran."""

    op: str
    shape: str
    fp8_calls: int = 0
    high_precision_calls: int = 0
    reasons: Counter = field(default_factory=Counter)


class _Region:
    """The settings of one fp8_autocast region (an entry on the thread's stack)."""

    def __init__(self, recipe: Recipe, enabled: bool, summary: dict, names: dict, keep: set, learn: Callable):
        self.recipe, self.enabled, self.summary, self.names, self.keep = recipe, enabled, summary, names, keep
        self.learn = learn  # learn(module): name its layers and apply the recipe's keep rules

    def record(self, op: str, weight: Optional[torch.Tensor], shape: str, fp8: bool, reason: str = "") -> None:
        name = self.names.get(id(weight), f"{op}{shape}") if weight is not None else f"{op}{shape}"
        row = self.summary.setdefault(name, LayerRecord(op, shape))
        if fp8:
            row.fp8_calls += 1
        else:
            row.high_precision_calls += 1
            row.reasons[reason] += 1

    def state_for(self, weight: torch.Tensor) -> LayerState:
        return _layer_state(weight, self.recipe)


def _layer_state(weight: torch.Tensor, recipe: Recipe) -> LayerState:
    """The fp8 state of ``weight``'s layer under ``recipe`` (made on first use)."""
    per_recipe = _STATES.get(weight)
    if per_recipe is None:
        per_recipe = _STATES[weight] = {}
    state = per_recipe.get(recipe.name)
    if state is None:
        state = per_recipe[recipe.name] = LayerState(recipe, weight.device)
    return state


def _arg(args, kwargs, index, name, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _ineligible(region: _Region, x, weight, k: int, n: int) -> str:
    """Why a product cannot run in fp8 here ('' when it can)."""
    if weight is not None and id(weight) in region.keep:
        return "kept in high precision by the recipe"
    for t in (x, weight):
        if t is not None and t.dtype not in F8.SUPPORTED_DTYPES:
            return f"dtype {t.dtype}"
        if t is not None and t.device.type not in ("cpu", "cuda"):
            return f"device {t.device}"
    ok, reason = F8.fp8_shapes_ok(k, n, region.recipe)
    return "" if ok else reason


def _high_precision(func, args, kwargs, x, weight, bias):
    """The stock product, in the activation's dtype: a layer kept in high precision may hold
    16-bit master weights (tf8.optim) while its input is fp32; the weight (and bias) are cast
    for the call, as torch.autocast does, and their gradients flow back in their own dtype."""
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and weight.is_floating_point()
            and weight.dtype != x.dtype):
        return func(*args, **kwargs)
    cast = {id(weight): weight.to(x.dtype)}
    if isinstance(bias, torch.Tensor):
        cast[id(bias)] = bias.to(x.dtype)
    args = tuple(cast.get(id(a), a) for a in args)
    kwargs = {k: cast.get(id(v), v) for k, v in kwargs.items()}
    return func(*args, **kwargs)


def _linear(region: _Region, func, args, kwargs):
    x, weight, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    n, k = weight.shape if weight.dim() == 2 else (0, 0)
    why = _ineligible(region, x, weight, k, n)
    region.record("linear", weight, f"[{n}x{k}]", not why, why)
    if why:
        return _high_precision(func, args, kwargs, x, weight, bias)
    return F8.linear(x, weight, bias, region.recipe, region.state_for(weight))


def _conv2d(region: _Region, func, args, kwargs):
    x, weight, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    stride = _arg(args, kwargs, 3, "stride", 1)
    padding = _arg(args, kwargs, 4, "padding", 0)
    dilation = _arg(args, kwargs, 5, "dilation", 1)
    groups = _arg(args, kwargs, 6, "groups", 1)
    o, cg, kh, kw = weight.shape
    k = cg * kh * kw
    why = _ineligible(region, x, weight, F8.padded_k(k), o // groups) if x.dim() == 4 else "input is not [B, C, H, W]"
    region.record("conv2d", weight, f"[{o}x{cg}x{kh}x{kw}]", not why, why)
    if why:
        return _high_precision(func, args, kwargs, x, weight, bias)
    return F8.conv2d(x, weight, bias, stride, padding, dilation, groups, region.recipe, region.state_for(weight))


def _attention_impl():
    try:
        from .ops.attention import attention
    except ImportError:  # the fp8 attention op is not part of this build
        return None
    return attention


def _sdpa(region: _Region, func, args, kwargs):
    q, k, v = (_arg(args, kwargs, i, name) for i, name in enumerate(("query", "key", "value")))
    attn_mask = _arg(args, kwargs, 3, "attn_mask")
    dropout_p = _arg(args, kwargs, 4, "dropout_p", 0.0)
    is_causal = _arg(args, kwargs, 5, "is_causal", False)
    scale = _arg(args, kwargs, 6, "scale")
    why = F8.attention_ineligible(q, k, v, attn_mask, dropout_p, kwargs.get("enable_gqa", False), _attention_impl(),
                                  is_causal=bool(is_causal))
    region.record("attention", None, f"[d={q.shape[-1]}]", not why, why)
    if why:
        return func(*args, **kwargs)
    return _attention_impl()(q, k, v, causal=bool(is_causal), scale=scale)


def _mha(region: _Region, func, args, kwargs):
    """F.multi_head_attention_forward re-expressed with fp8 linear + fp8 attention."""
    names = list(inspect.signature(F.multi_head_attention_forward).parameters)
    bound = dict(zip(names, args))
    bound.update(kwargs)
    why = F8.mha_ineligible(bound, _attention_impl())
    if not why:
        e = bound["embed_dim_to_check"]
        why = _ineligible(region, bound["query"], bound["out_proj_weight"], e, e)
    region.record("multi_head_attention", bound.get("out_proj_weight"), f"[e={bound['embed_dim_to_check']}]", not why, why)
    if why:
        return func(*args, **kwargs)

    def lin(x, w, b):
        return F8.linear(x, w, b, region.recipe, region.state_for(w))

    return F8.multi_head_attention(bound, lin, _attention_impl())


_HANDLERS: dict[Callable, Callable] = {
    F.linear: _linear,
    F.conv2d: _conv2d,
    torch.conv2d: _conv2d,
    F.scaled_dot_product_attention: _sdpa,
    F.multi_head_attention_forward: _mha,
}


# While any thread is inside a region, global module hooks let the innermost region learn each
# module called at the top level (not from inside another module's forward): its layer names
# and the recipe's keep rules, as the decorator does for the module it wraps.
_hook_lock = threading.Lock()
_hook_users = 0
_hook_handles: list = []


def _top_level_pre_hook(module, args):
    stack = _stack()
    if not stack:
        return
    depth = getattr(_local, "module_depth", 0)
    if depth == 0:
        stack[-1].learn(module)
    _local.module_depth = depth + 1


def _top_level_post_hook(module, args, output):
    if _stack() and getattr(_local, "module_depth", 0) > 0:
        _local.module_depth -= 1


def _use_module_hooks(on: bool) -> None:
    global _hook_users
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    with _hook_lock:
        _hook_users += 1 if on else -1
        if on and _hook_users == 1:
            _hook_handles[:] = [register_module_forward_pre_hook(_top_level_pre_hook),
                                register_module_forward_hook(_top_level_post_hook, always_call=True)]
        elif not on and _hook_users == 0:
            for handle in _hook_handles:
                handle.remove()
            _hook_handles.clear()


class _FP8FunctionMode(TorchFunctionMode):
    """Routes the products of the innermost enabled region to the fp8 ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        stack = _stack()
        region = stack[-1] if stack else None
        if handler is None or region is None or not region.enabled:
            return func(*args, **kwargs)
        return handler(region, func, args, kwargs)


class fp8_autocast(contextlib.ContextDecorator):
    """Run the products of stock PyTorch code in fp8.

    Usable as ``with fp8_autocast(recipe="hybrid"):``, as ``@fp8_autocast(...)`` on a
    function, on an ``nn.Module`` subclass (its forward runs in the region) and on a
    module instance (returns the same instance with its forward wrapped).

    Args:
        recipe: preset name or tf8.Recipe ("mellempudi2019", "hybrid", "blockwise", ...).
        enabled: False makes a region (also nested) run in high precision.

    After (or during) a region, :meth:`summary` lists every layer seen and how its
    calls ran; :meth:`fp8_fraction` is the share of calls that ran in fp8.
    """

    def __init__(self, recipe="hybrid", enabled: bool = True):
        self.recipe = get_recipe(recipe)
        self.enabled = bool(enabled)
        self._summary: dict[str, LayerRecord] = {}
        self._names: dict[int, str] = {}
        self._keep: set[int] = set()
        self._watched: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
        self._entered: list = []

    # -- context manager ----------------------------------------------------
    def __enter__(self):
        stack = _stack()
        stack.append(_Region(self.recipe, self.enabled, self._summary, self._names, self._keep, self._learn))
        mode = None
        if len(stack) == 1:
            mode = _FP8FunctionMode()
            try:
                mode.__enter__()
            except BaseException:
                stack.pop()
                raise
            _local.module_depth = 0
            _use_module_hooks(True)
        self._entered.append(mode)
        return self

    def __exit__(self, *exc):
        mode = self._entered.pop()
        try:
            if mode is not None:
                _use_module_hooks(False)
                mode.__exit__(*exc)
        finally:
            _stack().pop()
        return False

    # -- decorator ----------------------------------------------------------
    def __call__(self, target):
        if isinstance(target, type) and issubclass(target, nn.Module):
            original = target.forward
            ctx = self

            @functools.wraps(original)
            def forward(module, *args, **kwargs):
                ctx._learn(module)
                with ctx:
                    return original(module, *args, **kwargs)

            target.forward = forward
            return target
        if isinstance(target, nn.Module):
            self.watch(target)
            original = target.forward

            @functools.wraps(original)
            def forward(*args, **kwargs):
                with self:
                    return original(*args, **kwargs)

            target.forward = forward
            return target
        if callable(target) and not isinstance(target, torch.Tensor):
            return super().__call__(target)
        raise TypeError(
            f"fp8_autocast decorates a function, an nn.Module subclass or an nn.Module instance, "
            f"got {type(target).__name__}; use `with fp8_autocast(...):` around other code"
        )

    def watch(self, model: nn.Module) -> "fp8_autocast":
        """Name the layers of ``model`` in the summary and apply the recipe's keep rules to them.

        Regions do this by themselves for every module called at the top level inside them
        (and the decorator for the module it wraps), so a call is needed only for a model
        whose pieces are called one by one (then each piece counts as a model: its own first
        conv and last linear would be kept) or to name layers before the first call."""
        self._watched.add(model)
        for name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                self._names.setdefault(id(p), f"{name}.{pname}" if name else pname)
        for module in kept_modules(model, self.recipe):
            if getattr(module, "weight", None) is not None:
                self._keep.add(id(module.weight))
        return self

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The fp8 state of ``model``'s layers under this region's recipe (seeds, call
        counters, delayed-scaling amax histories), as ``{"<parameter name>.<key>": tensor}``
        for every weight the region has used. Save it beside ``model.state_dict()``: with
        both, a resumed run is bit-identical (stochastic and delayed recipes included)."""
        state = {}
        for name, p in model.named_parameters():
            layer = _STATES.get(p, {}).get(self.recipe.name)
            if layer is not None:
                state.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
        return state

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        """Restore a :meth:`state_dict` onto ``model``'s weights (same parameter names)."""
        params = dict(model.named_parameters())
        per_param: dict[str, dict] = {}
        for key, value in state.items():
            name = next((n for n in _prefixes(key) if n in params), None)
            if name is None:
                raise KeyError(f"fp8 state key {key!r} names no parameter of the model; "
                               "load the state of the same model (same parameter names)")
            per_param.setdefault(name, {})[key[len(name) + 1:]] = value
        for name, layer_state in per_param.items():
            _layer_state(params[name], self.recipe).load_state_dict(layer_state)

    def _learn(self, module: nn.Module) -> None:
        """watch() a module called at the top level of a region, unless it is known already
        (or is a piece of a model known already, as inside a decorated module's forward)."""
        if module in self._watched:
            return
        params = list(module.parameters())
        if params and all(id(p) in self._names for p in params):
            self._watched.add(module)
            return
        self.watch(module)

    def summary(self) -> dict[str, LayerRecord]:
        return dict(self._summary)

    def fp8_fraction(self) -> float:
        fp8 = sum(r.fp8_calls for r in self._summary.values())
        total = fp8 + sum(r.high_precision_calls for r in self._summary.values())
        return fp8 / total if total else 0.0

    def report(self) -> str:
        lines = [f"{'layer':<40} {'op':<22} {'fp8':>5} {'high':>5}  reasons"]
        for name, r in self._summary.items():
            reasons = "; ".join(f"{k} (x{v})" for k, v in r.reasons.items())
            lines.append(f"{name:<40} {r.op:<22} {r.fp8_calls:>5} {r.high_precision_calls:>5}  {reasons}")
        return "\n".join(lines)


def _prefixes(key: str):
    """"a.b.c" -> "a.b", "a" (the candidate parameter names of a state key, longest first)."""
    parts = key.split(".")
    return (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))


def kept_modules(model: nn.Module, recipe: Recipe) -> list[nn.Module]:
    """The modules the recipe keeps in high precision: the first Conv2d and/or the last Linear."""
    kept = []
    if recipe.keep_first_conv:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        kept += convs[:1]
    if recipe.keep_last_linear:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)]
        kept += linears[-1:]
    return kept


def convert(model: nn.Module, recipe="hybrid", keep: Optional[Callable[[str, nn.Module], bool]] = None) -> nn.Module:
    """Swap every nn.Linear / nn.Conv2d of ``model`` (in place) for tf8.nn.Linear / Conv2d.

    The new modules share the old parameters; their fp8 state (amax histories, seeds)
    is saved in ``state_dict``. ``keep(name, module) -> True`` leaves a module in high
    precision; by default the recipe's rules apply (``mellempudi2019`` keeps the first
    conv and the last linear). Linear layers inside nn.MultiheadAttention are left alone
    (they are used through F.multi_head_attention_forward; use fp8_autocast for them).
    Returns ``model``.
    """
    recipe = get_recipe(recipe)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert takes an nn.Module, got {type(model).__name__}")
    default_kept = {id(m) for m in kept_modules(model, recipe)}
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, (FP8Linear, FP8Conv2d)):
                continue
            kept = keep(name, child) if keep is not None else id(child) in default_kept
            if kept:
                continue
            if type(child) is nn.Linear:
                setattr(parent, child_name, FP8Linear.from_float(child, recipe))
            elif type(child) is nn.Conv2d:
                setattr(parent, child_name, FP8Conv2d.from_float(child, recipe))
    return model
