"""``fp8_autocast``: run a stock PyTorch model's products in fp8 without editing it, and
``convert``: swap modules for explicit fp8 modules.

Inside ``fp8_autocast``, calls of ``F.linear``, ``F.conv1d/2d/3d``, ``addmm`` /
``matmul`` / ``mm`` / ``@`` with a parameter on the right (Hugging Face's GPT-2 ``Conv1D``),
``F.scaled_dot_product_attention`` and ``F.multi_head_attention_forward``
(``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and decoder layers) are
seen by one ``torch.overrides.TorchFunctionMode`` and run through the fp8 ops. Products
that stay in high precision (transposed convs, ``bmm`` of a parameter, masked attention,
a parameter on the left of ``matmul``) are seen too and listed in the report with the reason.
Nothing global is patched: the mode is active only inside the region, on this
thread, and leaving the region (also by an exception) restores everything. The first
region installs two process-wide module hooks (how a region learns the model called in
it), which stay and do nothing outside regions.

Per-layer state (delayed-scaling amax histories, seeds) is keyed by the weight
tensor, so it persists across regions for as long as the weight lives.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import itertools
import math
import warnings
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .formats import INPUT_DTYPES
from . import _autocast_policy as policy
from .nn import functional as F8
from .nn.modules import Conv1d as FP8Conv1d
from .nn.modules import Conv2d as FP8Conv2d
from .nn.modules import Conv3d as FP8Conv3d
from .nn.modules import Linear as FP8Linear
from .nn.state import ROLES, LayerState
from .recipe import Recipe, get_recipe

_local = threading.local()
# key -> fp8_autocast, for the calls of regions entered inside compiled functions (_Region.owner_key).
_REGIONS: "weakref.WeakValueDictionary[str, fp8_autocast]" = weakref.WeakValueDictionary()
_region_keys = itertools.count()
# id(weight) -> {recipe name: LayerState}; outlives regions, dies with the weight (a weakref
# callback drops the entry before the id can be reused). A plain dict, which torch.compile
# reads while tracing; states are made outside the trace (see _new_layer_state).
_STATES: dict[int, dict] = {}
_STATE_OWNERS: dict[int, "weakref.ref"] = {}


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@dataclass
class LayerRecord:
    """One row of the autocast summary: how a layer's calls ran.

    ``fp8_flops`` / ``high_precision_flops``: forward multiply-adds x 2 of those calls.
    ``state``: the layer's fp8 state (its cast counts), None for attention and kept layers.
    """

    op: str
    shape: str
    fp8_calls: int = 0
    high_precision_calls: int = 0
    reasons: dict = field(default_factory=dict)  # reason -> calls
    fp8_flops: float = 0.0
    high_precision_flops: float = 0.0
    state: Optional[LayerState] = field(default=None, repr=False, compare=False)


class _Region:
    """The settings of one fp8_autocast region (an entry on the thread's stack).

    ``owner_key``: set for a region entered inside a compiled function (a decorated module
    compiled whole), whose stack entry exists only while tracing: its calls are counted into
    the owning fp8_autocast by key instead of into the thread's innermost region."""

    def __init__(self, recipe: Recipe, enabled: bool, summary: dict, names: dict, keep: set, learn: Callable,
                 owner_key: str = ""):
        self.recipe, self.enabled, self.summary, self.names, self.keep = recipe, enabled, summary, names, keep
        self.learn = learn  # learn(module): name its layers and apply the recipe's keep rules
        self.owner_key = owner_key

    def record(self, op: str, weight: Optional[torch.Tensor], shape: str, fp8: bool, reason: str = "",
               flops: int = 0) -> None:
        """Count one call in the summary when it runs: through :func:`_record_op`, which a
        compiled graph keeps as a node, so compiled calls count as eager ones do."""
        row = _ROW_SEP.join((op, "" if weight is None else str(id(weight)), shape, "1" if fp8 else "", reason,
                             self.owner_key))
        _record_op(_RECORD_TOKEN, row, flops)

    def state_for(self, weight: torch.Tensor) -> LayerState:
        return _layer_state(weight, self.recipe)


def _count(summary: dict, names: dict, recipe: Recipe, fields: list, flops: int) -> None:
    """Add one call of a row's ``fields`` (op, weight id, shape, fp8, reason; see _Region.record)
    to ``summary``."""
    op, weight_id, shape, fp8, reason = fields
    name = names.get(int(weight_id), f"{op}{shape}") if weight_id else f"{op}{shape}"
    record = summary.get(name)
    if record is None:
        record = summary[name] = LayerRecord(op, shape)
    if fp8:
        record.fp8_calls += 1
        record.fp8_flops += flops
        if weight_id and record.state is None:
            record.state = _STATES.get(int(weight_id), {}).get(recipe.name)
    else:
        record.high_precision_calls += 1
        record.high_precision_flops += flops
        record.reasons[reason] = record.reasons.get(reason, 0) + 1


_ROW_SEP = "\x1f"
# The record op's one tensor: none of the model's, so that no backward graph needs it (AOT
# autograd copies a side-effecting node into the backward when the backward holds its inputs).
_RECORD_TOKEN = torch.empty(0)


@torch.library.custom_op("tritonfp8::autocast_record", mutates_args=())
def _record_op(token: torch.Tensor, row: str, flops: int) -> None:
    """Count a call of the summary row ``row`` (op, weight id, shape, fp8, reason, owner key) in
    its owner, or else in the innermost region of this thread, when the call runs."""
    *fields, owner_key = row.split(_ROW_SEP)
    if owner_key:
        owner = _REGIONS.get(owner_key)
        if owner is not None:
            _count(owner._summary, owner._names, owner.recipe, fields, flops)
        return
    stack = _stack()
    if stack:
        top = stack[-1]
        _count(top.summary, top.names, top.recipe, fields, flops)


@_record_op.register_fake
def _(token, row, flops):
    return None


torch.fx.node.has_side_effect(torch.ops.tritonfp8.autocast_record.default)  # no graph may drop it


def _layer_state(weight: torch.Tensor, recipe: Recipe) -> LayerState:
    """The fp8 state of ``weight``'s layer under ``recipe`` (made on first use)."""
    state = _STATES.get(id(weight), {}).get(recipe.name)
    return state if state is not None else _new_layer_state(weight, recipe)


_NEW_STATE_IN_TRACE = (
    "fp8_autocast makes a layer's fp8 state when a region first sees its model, which is not traceable: "
    "compile the module itself (torch.compile(model)) or a decorated one, or call region.watch(model) "
    "before compiling a function that calls it")


@functools.partial(torch._dynamo.disable, reason=_NEW_STATE_IN_TRACE)
def _new_layer_state(weight: torch.Tensor, recipe: Recipe) -> LayerState:
    """Made eagerly: a region makes the states of the layers it learns before any trace (see
    fp8_autocast.watch), so a compiled model finds them; one made here inside a compiled
    function costs a graph break there."""
    key = id(weight)
    if key not in _STATE_OWNERS:
        _STATE_OWNERS[key] = weakref.ref(weight, lambda _, key=key: (_STATES.pop(key, None), _STATE_OWNERS.pop(key, None)))
    per_recipe = _STATES.setdefault(key, {})
    state = per_recipe.get(recipe.name)
    if state is None:
        state = per_recipe[recipe.name] = LayerState(recipe, weight.device)
        state.count_casts()  # what the report's saturated / flushed fractions read
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
        if t is not None and t.dtype not in INPUT_DTYPES:
            return f"dtype {t.dtype}"
        if t is not None and t.device.type not in ("cpu", "cuda"):
            return f"device {t.device}"
    ok, reason = policy.fp8_shapes_ok(k, n, region.recipe)
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
    return _linear_product(region, "linear", func, args, kwargs, x, weight, weight, bias, f"[{n}x{k}]")[0]


def _linear_product(region: _Region, op: str, func, args, kwargs, x, weight, weight_nk, bias, shape: str):
    """(x [..., K] @ weight_nk^T [K, N] (+ bias [N]) in fp8, True), or (the stock call, False)
    with the reason recorded. ``weight`` is the parameter the layer's state and name belong to
    (weight_nk may be its view)."""
    n, k = weight_nk.shape if weight_nk.dim() == 2 else (0, 0)
    why = _ineligible(region, x, weight, k, n)
    flops = 2 * (x.numel() // max(k, 1)) * n * k if isinstance(x, torch.Tensor) else 0
    region.record(op, weight, shape, not why, why, flops)
    if why:
        return _high_precision(func, args, kwargs, x, weight, bias), False
    return F8.linear(x, weight_nk, bias, region.recipe, region.state_for(weight)), True


def _is_parameter_matrix(t) -> bool:
    return isinstance(t, nn.Parameter) and t.dim() == 2


def _addmm(region: _Region, func, args, kwargs):
    """addmm(input, x [M, K], W [K, N]) with a parameter W (GPT-2's Conv1D): input + x @ W in fp8."""
    bias, x, weight = (_arg(args, kwargs, i, name) for i, name in enumerate(("input", "mat1", "mat2")))
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if not _is_parameter_matrix(weight):
        return _not_a_layer(region, "addmm", func, args, kwargs, x, weight)
    shape = f"[{weight.shape[0]}x{weight.shape[1]}]"
    if beta != 1 or alpha != 1 or "out" in kwargs or not isinstance(bias, torch.Tensor):
        region.record("addmm", weight, shape, False, "addmm with beta/alpha/out", _mm_flops(x, weight))
        return _high_precision(func, args, kwargs, x, weight, bias)
    as_bias = bias if bias.dim() == 1 and bias.shape[0] == weight.shape[1] else None
    y, fp8 = _linear_product(region, "addmm", func, args, kwargs, x, weight, weight.t(), as_bias, shape)
    return y + bias if fp8 and as_bias is None else y


def _matmul(region: _Region, func, args, kwargs):
    """matmul / mm / @ of x [..., K] and a parameter W [K, N]: x @ W in fp8 (the parameter on the
    left, or none, stays high precision: listed when a parameter takes part)."""
    a = _arg(args, kwargs, 0, "input")
    b = _arg(args, kwargs, 1, "other" if func in (torch.matmul, torch.Tensor.matmul) else "mat2")
    if _is_parameter_matrix(b) and isinstance(a, torch.Tensor) and a.dim() >= 1 and "out" not in kwargs:
        return _linear_product(region, "matmul", func, args, kwargs, a, b, b.t(), None,
                               f"[{b.shape[0]}x{b.shape[1]}]")[0]
    return _not_a_layer(region, "matmul", func, args, kwargs, a, b)


def _not_a_layer(region: _Region, op: str, func, args, kwargs, a, b):
    """A product of the region that fp8 does not take: listed when a parameter is an operand."""
    param = next((t for t in (a, b) if isinstance(t, nn.Parameter)), None)
    if param is not None:
        where = "on the left" if param is a else "batched" if param.dim() > 2 else "with this call form"
        region.record(op, param, "[" + "x".join(map(str, param.shape)) + "]", False,
                      f"{op} with the parameter {where} (x @ W, addmm and F.linear run in fp8)", _mm_flops(a, b))
        return _high_precision(func, args, kwargs, a if param is b else b, param, None)
    return func(*args, **kwargs)


def _mm_flops(a, b) -> int:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() == 0 or b.dim() == 0:
        return 0
    k = a.shape[-1]
    return 2 * (a.numel() // max(k, 1)) * k * (b.numel() // max(k, 1))


def _conv(region: _Region, func, args, kwargs):
    x, weight, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    stride = _arg(args, kwargs, 3, "stride", 1)
    padding = _arg(args, kwargs, 4, "padding", 0)
    dilation = _arg(args, kwargs, 5, "dilation", 1)
    groups = _arg(args, kwargs, 6, "groups", 1)
    nd = weight.dim() - 2
    o, cg = weight.shape[:2]
    k = cg * math.prod(weight.shape[2:])
    op = f"conv{nd}d"
    shape = "[" + "x".join(map(str, weight.shape)) + "]"
    why = (_ineligible(region, x, weight, F8.padded_k(k), o // groups) if x.dim() == nd + 2
           else f"input is not {F8.CONV_LAYOUTS.get(nd, 'batched')} (unbatched inputs run in high precision)")
    y = _high_precision(func, args, kwargs, x, weight, bias) if why else F8.conv(
        x, weight, bias, stride, padding, dilation, groups, region.recipe, region.state_for(weight))
    region.record(op, weight, shape, not why, why, 2 * y.numel() * k)
    return y


def _conv_transpose(region: _Region, func, args, kwargs):
    x, weight, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    y = _high_precision(func, args, kwargs, x, weight, bias)
    nd = weight.dim() - 2
    region.record(f"conv_transpose{nd}d", weight, "[" + "x".join(map(str, weight.shape)) + "]", False,
                  "transposed convolution (not in fp8)", 2 * x.numel() * math.prod(weight.shape[1:]))
    return y


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
    enable_gqa = bool(kwargs.get("enable_gqa", False))
    why = policy.attention_ineligible(q, k, v, attn_mask, dropout_p, enable_gqa, _attention_impl(),
                                  is_causal=bool(is_causal))
    n_q, n_k = (q.shape[-2], k.shape[-2]) if q.dim() >= 2 and k.dim() >= 2 else (0, 0)
    flops = (2 if is_causal and n_q == n_k else 4) * (q.numel() // max(q.shape[-1], 1)) * n_k * q.shape[-1]
    region.record("attention", None, f"[d={q.shape[-1]}]", not why, why, flops)
    if why:
        return func(*args, **kwargs)
    return _attention_impl()(q, k, v, causal=bool(is_causal), scale=scale, attn_mask=attn_mask, enable_gqa=enable_gqa)


_MHA_PARAMETERS = tuple(inspect.signature(F.multi_head_attention_forward).parameters)  # read once: not traceable


def _mha(region: _Region, func, args, kwargs):
    """F.multi_head_attention_forward re-expressed with fp8 linear + fp8 attention."""
    bound = dict(zip(_MHA_PARAMETERS, args))
    bound.update(kwargs)
    why = policy.mha_ineligible(bound, _attention_impl())
    if not why:
        e = bound["embed_dim_to_check"]
        why = _ineligible(region, bound["query"], bound["out_proj_weight"], e, e)
    q, e = bound["query"], bound["embed_dim_to_check"]
    tokens = q.numel() // max(e, 1)
    n_k = bound["key"].shape[0]
    flops = 2 * tokens * e * 4 * e + 4 * tokens * n_k * e  # projections + attention
    region.record("multi_head_attention", bound.get("out_proj_weight"), f"[e={e}]", not why, why, flops)
    if why:
        return func(*args, **kwargs)

    def lin(x, w, b):
        return F8.linear(x, w, b, region.recipe, region.state_for(w))

    return policy.multi_head_attention(bound, lin, _attention_impl())


_HANDLERS: dict[Callable, Callable] = {
    F.linear: _linear,
    torch.addmm: _addmm, torch.Tensor.addmm: _addmm,
    torch.matmul: _matmul, torch.Tensor.matmul: _matmul, torch.mm: _matmul, torch.Tensor.mm: _matmul,
    torch.bmm: _matmul, torch.Tensor.bmm: _matmul,
    torch.conv1d: _conv, torch.conv2d: _conv, torch.conv3d: _conv,
    torch.conv_transpose1d: _conv_transpose, torch.conv_transpose2d: _conv_transpose,
    torch.conv_transpose3d: _conv_transpose,
    F.scaled_dot_product_attention: _sdpa,
    F.multi_head_attention_forward: _mha,
}


# Global module hooks let the innermost region of a thread learn each module called at the top
# level (not from inside another module's forward): its layer names and the recipe's keep
# rules, as the decorator does for the module it wraps. They are installed by the first region
# and stay (inert outside regions): torch.compile guards on the set of global hooks, so hooks
# that came and went with each region would recompile a compiled model at every step.
_hook_lock = threading.Lock()
_hook_handles: list = []
_hooks_installed = False  # a flag, which a compiled region's trace can read (the handles it cannot)


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


def _install_module_hooks() -> None:
    global _hooks_installed
    if _hooks_installed:  # read without the lock first: a compiled region's trace takes no lock
        return
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    with _hook_lock:
        if not _hook_handles:
            _hook_handles[:] = [register_module_forward_pre_hook(_top_level_pre_hook),
                                register_module_forward_hook(_top_level_post_hook, always_call=True)]
        _hooks_installed = True


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


def _copy_decorated(module: nn.Module, region: "fp8_autocast", memo: dict) -> nn.Module:
    """copy.deepcopy of a module instance decorated by ``region``: a copy of the undecorated
    module, decorated by a new region of the same recipe (the wrapped forward would call the
    original module, and the region's names and keep rules are the original's layers')."""
    wrapped = {key: module.__dict__.pop(key) for key in ("forward", "__deepcopy__")}
    try:
        duplicate = copy.deepcopy(module, memo)
    finally:
        module.__dict__.update(wrapped)
    return fp8_autocast(region.recipe, region.enabled)(duplicate)


@contextlib.contextmanager
def _entered(region: "fp8_autocast"):
    """``with region:`` in a form torch.compile traces (a generator context manager made where it
    is used; dynamo does not enter a context object made outside the compiled function)."""
    region.__enter__()
    try:
        yield
    except BaseException as e:
        region.__exit__(type(e), e, e.__traceback__)
        raise
    region.__exit__(None, None, None)


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
        self._warned: set = set()
        self._exits = 0
        self._key = f"autocast{next(_region_keys)}"
        _REGIONS[self._key] = self

    # -- context manager ----------------------------------------------------
    def __enter__(self):
        stack = _stack()
        stack.append(_Region(self.recipe, self.enabled, self._summary, self._names, self._keep, self._learn,
                             owner_key=self._key if torch.compiler.is_compiling() else ""))
        mode = None
        if len(stack) == 1:
            mode = _FP8FunctionMode()
            try:
                mode.__enter__()
            except BaseException:
                stack.pop()
                raise
            _local.module_depth = 0
            _install_module_hooks()
        self._entered.append(mode)
        return self

    def __exit__(self, *exc):
        mode = self._entered.pop()
        try:
            if mode is not None:
                mode.__exit__(*exc)
        finally:
            _stack().pop()
        # Inside a compiled function (a decorated module compiled whole) the exit count would be
        # a guard that changes every call: the log-spaced checks run for regions entered eagerly.
        if mode is not None and exc[0] is None and not torch.compiler.is_compiling():
            self._exits += 1
            # Check the cast counts at exits 1, 2, 4, ..., 512, then every 1024th: the warnings of
            # cast_fractions come by themselves, for a host read at log-spaced steps only.
            if (self._exits & (self._exits - 1)) == 0 and self._exits <= 512 or self._exits % 1024 == 0:
                self.cast_fractions()
        return False

    # -- decorator ----------------------------------------------------------
    def __call__(self, target):
        _install_module_hooks()  # now, not in the first call (which torch.compile may be tracing)
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
                with _entered(self):
                    return original(*args, **kwargs)

            target.forward = forward
            target.__deepcopy__ = functools.partial(_copy_decorated, target, self)
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
            name = name.removeprefix("_orig_mod.").removeprefix("_orig_mod")  # torch.compile's wrapper
            for pname, p in module.named_parameters(recurse=False):
                self._names.setdefault(id(p), f"{name}.{pname}" if name else pname)
        for module in kept_modules(model, self.recipe):
            if getattr(module, "weight", None) is not None:
                self._keep.add(id(module.weight))
        # The states of every matrix and filter, made now (eagerly): a compiled model's trace
        # only looks them up.
        for p in model.parameters():
            if p.dim() >= 2 and id(p) not in self._keep:
                _layer_state(p, self.recipe)
        return self

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The fp8 state of ``model``'s layers under this region's recipe (seeds, call
        counters, delayed-scaling amax histories), as ``{"<parameter name>.<key>": tensor}``
        for every weight the region has used. Save it beside ``model.state_dict()``: with
        both, a resumed run is bit-identical (stochastic and delayed recipes included)."""
        state = {}
        for name, p in model.named_parameters():
            layer = _STATES.get(id(p), {}).get(self.recipe.name)
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
        """{layer name (or op and shape): LayerRecord} of every product seen so far."""
        return dict(self._summary)

    def fp8_fraction(self, by: str = "calls") -> float:
        """The share of the region's products that ran in fp8, counted by ``"calls"`` or
        weighted by their forward ``"flops"`` (a few large layers in high precision weigh more)."""
        if by not in ("calls", "flops"):
            raise ValueError(f"fp8_fraction(by={by!r}): use 'calls' or 'flops'")
        rows = self._summary.values()
        if by == "calls":
            fp8, high = sum(r.fp8_calls for r in rows), sum(r.high_precision_calls for r in rows)
        else:
            fp8, high = sum(r.fp8_flops for r in rows), sum(r.high_precision_flops for r in rows)
        return fp8 / (fp8 + high) if fp8 + high else 0.0

    def cast_fractions(self) -> dict[str, dict[str, dict[str, float]]]:
        """{layer: {role: {"values", "flushed", "saturated"}}}: per cast role of each fp8 layer
        (activation, weight, error, weight_grad), the values cast and the fractions of its nonzero
        values that flushed to zero and that saturated (one host read for all layers). Warns once
        per layer and role where more than half did (see ``MOSTLY``); leaving a region checks this
        by itself at its 1st, 2nd, 4th, ... 512th exit and every 1024th after."""
        rows = [(name, r.state) for name, r in self._summary.items()
                if r.state is not None and r.state.cast_counts is not None]
        if not rows:
            return {}
        counts = torch.stack([state.cast_counts.cpu() for _, state in rows]).tolist()
        fractions = {}
        for (name, state), per_role in zip(rows, counts):
            layer = fractions[name] = {}
            for role, values, (nonzero, flushed, saturated) in zip(ROLES, state.cast_values, per_role):
                if not values:
                    continue
                layer[role] = {"values": values, "flushed": flushed / nonzero if nonzero else 0.0,
                               "saturated": saturated / nonzero if nonzero else 0.0}
                self._warn_if_mostly_lost(name, role, layer[role])
        return fractions

    MOSTLY = 0.5  # the fraction of a cast's nonzero values lost (flushed or saturated) that warns

    def _warn_if_mostly_lost(self, name: str, role: str, f: dict) -> None:
        for kind, what, fix in (("saturated", "saturated at the format's largest value",
                                 "use a recipe with scaling (e.g. 'hybrid')"),
                                ("flushed", "flushed to zero", "use a recipe with scaling (e.g. 'hybrid') "
                                 "or loss scaling for errors")):
            if f[kind] > self.MOSTLY and (name, role, kind) not in self._warned:
                self._warned.add((name, role, kind))
                warnings.warn(f"fp8 layer {name!r}: {100 * f[kind]:.0f}% of its nonzero {role} values {what} "
                              f"under recipe {self.recipe.name!r}; its outputs are mostly lost. {fix[0].upper()}"
                              f"{fix[1:]}, or keep the layer in high precision", RuntimeWarning, stacklevel=4)

    def report(self) -> str:
        """A table of every product seen: fp8 / high-precision calls with the reasons, and per fp8
        layer the share of values flushed to zero / saturated in its casts (worst role); rows
        where more than half were lost are flagged with '!'."""
        fractions = self.cast_fractions()
        w = max([39] + [len(name) for name in self._summary])
        lines = [f" {'layer':<{w}} {'op':<22} {'fp8':>5} {'high':>5} {'flushed':>8} {'saturated':>9}  reasons"]
        for name, r in self._summary.items():
            roles = fractions.get(name, {})
            flushed = max((f["flushed"] for f in roles.values()), default=None)
            saturated = max((f["saturated"] for f in roles.values()), default=None)
            flag = "!" if max(flushed or 0.0, saturated or 0.0) > self.MOSTLY else " "
            pct = lambda v: "" if v is None else f"{100 * v:.1f}%"  # noqa: E731
            reasons = "; ".join(f"{k} (x{v})" for k, v in r.reasons.items())
            lines.append(f"{flag}{name:<{w}} {r.op:<22} {r.fp8_calls:>5} {r.high_precision_calls:>5} "
                         f"{pct(flushed):>8} {pct(saturated):>9}  {reasons}")
        lines.append(f"fp8 share: {100 * self.fp8_fraction():.1f}% of calls, "
                     f"{100 * self.fp8_fraction('flops'):.1f}% of forward FLOPs")
        return "\n".join(lines)


def _fsdp_unsharded(model: nn.Module) -> dict:
    """{id(sharded parameter): unsharded parameter} of the FSDP2 (``fully_shard``) modules of
    ``model``. A region casts the weight FSDP2 all-gathered, so that weight keys its state.
    Read through torch's private FSDPParam objects; empty before the first all-gather or
    where they are not available."""
    out = {}
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            continue
        try:
            group = get_state()._fsdp_param_group
            fsdp_params = group.fsdp_params if group is not None else []
        except AttributeError:
            continue
        for fsdp_param in fsdp_params:
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None:
                out[id(fsdp_param.sharded_param)] = unsharded
    return out


def layer_states(model: nn.Module) -> list:
    """("<parameter name>[<recipe>]", :class:`LayerState`) of every fp8 state that fp8_autocast
    keeps for ``model``'s weights (FSDP2's unsharded weights for sharded ones), in parameter
    order and by recipe name: the same list on every rank of a data-parallel run."""
    unsharded = _fsdp_unsharded(model)
    out = []
    for name, p in model.named_parameters():
        weight = unsharded.get(id(p), p)
        for recipe_name, state in sorted(_STATES.get(id(weight), {}).items()):
            out.append((f"{name}[{recipe_name}]", state))
    return out


def _prefixes(key: str):
    """"a.b.c" -> "a.b", "a" (the candidate parameter names of a state key, longest first)."""
    parts = key.split(".")
    return (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))


_FP8_CONVS = {nn.Conv1d: FP8Conv1d, nn.Conv2d: FP8Conv2d, nn.Conv3d: FP8Conv3d}


def kept_modules(model: nn.Module, recipe: Recipe) -> list[nn.Module]:
    """The modules the recipe keeps in high precision: the first Conv1d/2d/3d and/or the last Linear."""
    kept = []
    if recipe.keep_first_conv:
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        kept += convs[:1]
    if recipe.keep_last_linear:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)]
        kept += linears[-1:]
    return kept


def convert(model: nn.Module, recipe="hybrid", keep: Optional[Callable[[str, nn.Module], bool]] = None) -> nn.Module:
    """Swap every nn.Linear / nn.Conv1d / Conv2d / Conv3d of ``model`` (in place) for the tf8.nn modules.

    The new modules share the old parameters and the model's ``state_dict`` keeps its
    stock keys; their fp8 state (amax histories, seeds) is saved by
    :func:`tf8.nn.fp8_state_dict` (and in ``tf8.Trainer.state_dict``). ``keep(name, module) -> True`` leaves a module in high
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
            if isinstance(child, (FP8Linear, FP8Conv1d, FP8Conv2d, FP8Conv3d)):
                continue
            kept = keep(name, child) if keep is not None else id(child) in default_kept
            if kept:
                continue
            if type(child) is nn.Linear:
                setattr(parent, child_name, FP8Linear.from_float(child, recipe))
            elif type(child) in _FP8_CONVS:
                setattr(parent, child_name, _FP8_CONVS[type(child)].from_float(child, recipe))
    return model
