"""FP8 functional ops with autograd: linear (all three products in fp8), conv1d / conv2d /
conv3d as GEMMs, attention (with SDPA's masks and grouped-query heads).

The modules in :mod:`tritonfp8.nn` and :func:`tritonfp8.fp8_autocast` call these.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .._active import ERROR_COLLECTORS, OVERFLOW_TRACKERS
from .._autograd import refuse_double_backward
from ..ops.matmul import scaled_mm, transpose_view
from ..ops.quantize import quantize
from ..ops.rounding import nonzero_and_flushed
from ..formats import DTYPE_NAMES, DTYPES_BY_NAME, INPUT_DTYPES, SEED_LIMIT, get_format
from ..recipe import Recipe, get_recipe
from ..tensor import FP8Tensor
from .state import LayerState, state_of



def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """x's dtype, or torch.autocast's dtype inside an autocast region (so fp8 composes with it)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in INPUT_DTYPES:
            return dtype
    return x.dtype


def check_fp8_inputs(x: torch.Tensor, weight: torch.Tensor, what: str) -> None:
    """Clear errors for inputs the fp8 ops do not take."""
    for name, t in (("input", x), ("weight", weight)):
        if t.dtype not in INPUT_DTYPES:
            raise TypeError(f"fp8 {what} takes float32, bfloat16 or float16 {name}s, got {t.dtype}")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"fp8 {what} runs on CPU (reference) or CUDA (Triton) tensors, got {name} on {t.device}")
    if x.device != weight.device:
        raise ValueError(f"fp8 {what}: input is on {x.device} but weight is on {weight.device}")


def _quantize_error(state: LayerState, recipe: Recipe, dy2d: torch.Tensor, transpose: bool, seed: int) -> FP8Tensor:
    """The error cast of a backward product, reported to the active LossScaler and Trainer and
    to the layer's cast counts (the nonzero / flushed count computed once for both)."""
    dy2d = dy2d.contiguous()
    dy_q = state.quantize(dy2d, "error", recipe.error, transpose=transpose, seed=seed, count=False)
    state.error_saturated += dy_q.saturated
    tracker = OVERFLOW_TRACKERS.current()
    if tracker is not None:  # a LossScaler's overflow flag: device-side, read once per step
        tracker.record(dy_q)
    stats = ERROR_COLLECTORS.current()
    nonzero_flushed = None
    if stats is not None or state.cast_counts is not None:
        nonzero_flushed = nonzero_and_flushed(dy2d, dy_q.data.view(torch.uint8))
    state.record_cast("error", dy2d, dy_q, nonzero_flushed)
    if stats is not None:  # tf8.Trainer's statistics: error values flushed to zero / saturated, on device
        stats.record_error_cast(dy2d, dy_q, nonzero_flushed)
    return dy_q


def _fast(recipe: Recipe, product: str) -> bool:
    """Whether ``product`` ("forward", "input_grad", "weight_grad") accumulates fast (Recipe.fast_accumulation)."""
    return product in recipe.fast_accumulation


def _weight_grad(dy_q: FP8Tensor, x_t: FP8Tensor, recipe: Recipe, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """dW [N, K] = dy^T [N, T] @ x [T, K]; both quantized along T by the casts' transposed copies."""
    a, b = dy_q.transposed, transpose_view(x_t)
    fast = _fast(recipe, "weight_grad")
    if recipe.weight_grad is None:
        return scaled_mm(a, b, out_dtype=dtype, fast_accumulation=fast)
    g = recipe.weight_grad
    dw_q = scaled_mm(a, b, out_fmt=g.fmt, rounding=g.rounding, seed=seed if g.rounding == "stochastic" else None,
                     fast_accumulation=fast)
    return dw_q.dequantize(dtype)


def _recast_weight(state: LayerState, weight: torch.Tensor, recipe: Recipe, seed: int,
                   delayed_scale: Optional[torch.Tensor]) -> FP8Tensor:
    """The forward's weight cast again, with its transposed copy (W^T quantized along N) for dx.

    Same seed and (delayed) scale as the forward, and the weight is unchanged (autograd checks
    its version), so the codes are the forward's: the backward recasts W instead of keeping an
    fp8 copy alive between forward and backward."""
    return state.quantize(weight, "weight", recipe.weight, transpose=True, seed=seed,
                          delayed_scale=delayed_scale, count=False).transposed


def _delayed_scale(q: FP8Tensor, recipe: Recipe) -> Optional[torch.Tensor]:
    return q.scale if recipe.weight.scale_source == "delayed" else None


# The products are torch.library ops with their autograd registered, so torch.compile
# traces them as single nodes (no graph break) and eager runs the same code. A layer is
# passed as its state's handle (a string): the per-layer bookkeeping (seeds, call counter,
# delayed-scaling histories, cast counts, the LossScaler's and Trainer's error records)
# runs when the op runs, eagerly or compiled, never at trace time.
_EMPTY = (0,)


def _empty(like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return like.new_empty(_EMPTY, dtype=dtype)


def _activation_fp8(recipe: Recipe, data: torch.Tensor, scale: torch.Tensor) -> FP8Tensor:
    """The FP8Tensor of activation codes a forward op saved for its backward."""
    a = recipe.activation
    return FP8Tensor(data, scale, get_format(a.fmt), a.parsed_scaling)


def _grads_needed(x: torch.Tensor, weight: torch.Tensor) -> tuple[bool, bool]:
    """(need dx, need dW) of an fp8 product called now."""
    grad = torch.is_grad_enabled()
    return grad and x.requires_grad, grad and weight.requires_grad


def _seeds_tensor(state: LayerState) -> torch.Tensor:
    """int64 [3] on the CPU: the seeds of this call's weight, error and weight-gradient casts."""
    return torch.tensor([state.seed("weight"), state.seed("error"), state.seed("weight_grad")], dtype=torch.int64)


@torch.library.custom_op("tritonfp8::linear_fwd", mutates_args=())
def _linear_fwd_op(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], layer: str,
                   out_dtype: str, need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor, torch.Tensor]:
    """x2d [M, K] @ weight^T [K, N] (+ bias) in fp8 -> (y [M, N], for the backward: x^T's
    codes [K, M] and scale (empty unless need_dw), the weight's delayed scale (empty unless
    delayed and need_dx), the seeds int64 [3] (CPU))."""
    state = state_of(layer)
    recipe = state.recipe
    x_q = state.quantize(x2d, "activation", recipe.activation, transpose=need_dw)
    seeds = _seeds_tensor(state)
    w_q = state.quantize(weight, "weight", recipe.weight, transpose=False, seed=int(seeds[0]))
    y = scaled_mm(x_q, transpose_view(w_q), bias=bias, out_dtype=DTYPES_BY_NAME[out_dtype],
                  fast_accumulation=_fast(recipe, "forward"))
    state.calls += 1
    x_t = x_q.transposed
    delayed = _delayed_scale(w_q, recipe) if need_dx else None
    return (y, x_t.data if need_dw else _empty(x2d, torch.uint8), x_t.scale if need_dw else _empty(x2d),
            delayed if delayed is not None else _empty(x2d), seeds)


@_linear_fwd_op.register_fake
def _(x2d, weight, bias, layer, out_dtype, need_dx, need_dw):
    recipe = state_of(layer).recipe
    y = x2d.new_empty((x2d.shape[0], weight.shape[0]), dtype=DTYPES_BY_NAME[out_dtype])
    if need_dw:  # the cast's own fake gives the transposed copy's codes and scale
        a = recipe.activation
        x_t = quantize(x2d, a.fmt, "nearest", a.parsed_scaling, transpose=True).transposed
        x_t_data, x_t_scale = x_t.data, x_t.scale
    else:
        x_t_data, x_t_scale = _empty(x2d, torch.uint8), _empty(x2d)
    delayed = x2d.new_empty(()) if need_dx and recipe.weight.scale_source == "delayed" else _empty(x2d)
    return y, x_t_data, x_t_scale, delayed, torch.empty(3, dtype=torch.int64)


@torch.library.custom_op("tritonfp8::linear_bwd", mutates_args=())
def _linear_bwd_op(dy2d: torch.Tensor, x_t_data: torch.Tensor, x_t_scale: torch.Tensor, weight: torch.Tensor,
                   delayed: torch.Tensor, seeds: torch.Tensor, layer: str, x_dtype: str, need_dx: bool,
                   need_dw: bool, bias_dtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`_linear_fwd_op`: dy2d [M, N] -> (dx [M, K], dW [N, K], db [N]),
    each empty where not needed (bias_dtype "" when there is no bias gradient)."""
    state = state_of(layer)
    recipe = state.recipe
    weight_seed, error_seed, wgrad_seed = seeds.tolist()
    x_t = _activation_fp8(recipe, x_t_data, x_t_scale) if need_dw else None
    dy_q = _quantize_error(state, recipe, dy2d, need_dw, error_seed)
    dx, dw, db = _empty(dy2d), _empty(dy2d), _empty(dy2d)  # three tensors: outputs may not alias
    if need_dx:
        # dx [M, K] = dy [M, N] @ W [N, K]; b is W^T quantized along N, viewed as [N, K].
        w_t = _recast_weight(state, weight, recipe, weight_seed, delayed if delayed.numel() else None)
        dx = scaled_mm(dy_q, transpose_view(w_t), out_dtype=DTYPES_BY_NAME[x_dtype],
                       fast_accumulation=_fast(recipe, "input_grad"))
    if need_dw:
        dw = _weight_grad(dy_q, x_t, recipe, wgrad_seed, weight.dtype)
    if bias_dtype:
        db = dy2d.float().sum(0).to(DTYPES_BY_NAME[bias_dtype])
    return dx, dw, db


@_linear_bwd_op.register_fake
def _(dy2d, x_t_data, x_t_scale, weight, delayed, seeds, layer, x_dtype, need_dx, need_dw, bias_dtype):
    m, (n, k) = dy2d.shape[0], weight.shape
    dx = dy2d.new_empty((m, k), dtype=DTYPES_BY_NAME[x_dtype]) if need_dx else _empty(dy2d)
    dw = torch.empty_like(weight) if need_dw else _empty(dy2d)
    db = dy2d.new_empty((n,), dtype=DTYPES_BY_NAME[bias_dtype]) if bias_dtype else _empty(dy2d)
    return dx, dw, db


def _linear_setup_context(ctx, inputs, output):
    x2d, weight, bias, layer, _, need_dx, need_dw = inputs
    _, x_t_data, x_t_scale, delayed, seeds = output
    # Saved: the fp8 transposed copy of x (x^T quantized along the token dim, for dW) and its
    # scale, and W itself (a parameter, no copy): dx's operand W^T is recast from it with the
    # forward's seed and scale (the same bits), instead of keeping fp8 W alive.
    ctx.save_for_backward(x_t_data, x_t_scale, weight, delayed, seeds)
    ctx.mark_non_differentiable(x_t_data, x_t_scale, delayed, seeds)
    ctx.state = state_of(layer)  # alive until the backward ran (a call's fresh state too)
    ctx.layer, ctx.need_dx, ctx.need_dw = layer, need_dx, need_dw
    ctx.x_dtype = DTYPE_NAMES[x2d.dtype]
    ctx.bias_dtype = DTYPE_NAMES[bias.dtype] if bias is not None and bias.requires_grad else ""


def _linear_backward(ctx, dy, *_):
    refuse_double_backward("linear")
    x_t_data, x_t_scale, weight, delayed, seeds = ctx.saved_tensors
    dx, dw, db = _linear_bwd_op(dy.contiguous(), x_t_data, x_t_scale, weight, delayed, seeds, ctx.layer,
                                ctx.x_dtype, ctx.need_dx, ctx.need_dw, ctx.bias_dtype)
    return (dx if ctx.need_dx else None, dw if ctx.need_dw else None, db if ctx.bias_dtype else None,
            None, None, None, None)


_linear_fwd_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           recipe="hybrid", state: Optional[LayerState] = None) -> torch.Tensor:
    """FP8 ``F.linear``: x [..., K], weight [N, K], bias [N] -> y [..., N].

    All three products (y = x W^T, dx = dy W, dW = dy^T x) run through
    :func:`tritonfp8.scaled_mm` with the recipe's formats, roundings and scalings.
    ``state`` carries delayed-scaling histories and seeds between calls (a fresh one
    per call when None, so stochastic rounding then draws a new seed each call).
    """
    recipe = get_recipe(recipe)
    check_fp8_inputs(x, weight, "linear")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input [..., {x.shape[-1]}] does not match weight {tuple(weight.shape)} [N, K]")
    state = _state_for(state, recipe, x.device)
    k, n = x.shape[-1], weight.shape[0]
    y = _linear_fwd_op(x.reshape(-1, k), weight, bias, state.handle, DTYPE_NAMES[_output_dtype(x)],
                       *_grads_needed(x, weight))[0]
    return y.reshape(*x.shape[:-1], n)


def _state_for(state: Optional[LayerState], recipe: Recipe, device) -> LayerState:
    """``state``, or a fresh one for this call; a state made for another recipe is refused."""
    if state is None:
        return LayerState(recipe, device)
    if state.recipe is not recipe and state.recipe != recipe:
        raise ValueError(f"the fp8 layer state was made for recipe {state.recipe.name!r}, not {recipe.name!r}; "
                         "pass the layer's own recipe (or a LayerState made for this one)")
    return state


def _tuple(v, nd: int) -> tuple:
    return (v,) * nd if isinstance(v, int) else tuple(v)


CONV_LAYOUTS = {1: "[B, C, L]", 2: "[B, C, H, W]", 3: "[B, C, D, H, W]"}


def conv_padding(padding, kernel: tuple, dilation: tuple, what: str) -> tuple[tuple, tuple]:
    """(symmetric padding per dim, extra right padding per dim) of an int / tuple / 'valid' / 'same'.

    'same' pads d*(k-1) in total per dim, the odd one on the right as torch does, so even
    kernels work."""
    nd = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * nd, (0,) * nd
        if padding == "same":
            total = tuple(d * (k - 1) for d, k in zip(dilation, kernel))
            return tuple(t // 2 for t in total), tuple(t % 2 for t in total)
        raise ValueError(f"{what} padding {padding!r}: use an int, a tuple of {nd}, 'valid' or 'same'")
    padding = _tuple(padding, nd)
    if len(padding) != nd or any(p < 0 for p in padding):
        raise ValueError(f"{what} padding {padding}: use {nd} non-negative ints")
    return padding, (0,) * nd


def conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1, padding=0,
         dilation=1, groups: int = 1, recipe="hybrid", state: Optional[LayerState] = None) -> torch.Tensor:
    """FP8 ``F.conv1d`` / ``conv2d`` / ``conv3d`` as a GEMM (im2col), by the weight's rank:
    x [B, C, *S] and weight [O, C/groups, *k] with 1 to 3 spatial dims S -> [B, O, *S_out].

    The patches [B*prod(S_out), C*prod(k)] (per group) are multiplied by the weight
    [O, C*prod(k)], so forward, input gradient (before the col2im sum) and weight gradient
    are all fp8 products. padding: int, tuple, 'valid' or 'same' (even kernels too).
    """
    recipe = get_recipe(recipe)
    nd = weight.dim() - 2
    what = f"conv{nd}d"
    check_fp8_inputs(x, weight, what)
    if nd not in CONV_LAYOUTS or x.dim() != nd + 2:
        raise ValueError(f"fp8 conv takes x [B, C, *spatial] and weight [O, C/groups, *kernel] with 1 to 3 spatial "
                         f"dims, got {tuple(x.shape)} and {tuple(weight.shape)} (an unbatched input: unsqueeze(0))")
    b, c = x.shape[:2]
    o, cg = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    if c != cg * groups or o % groups:
        raise ValueError(f"{what}: {c} input channels and weight {tuple(weight.shape)} do not fit groups={groups}")
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    padding, extra = conv_padding(padding, kernel, dilation, what)
    if any(extra):  # even effective kernel with 'same': the odd pad on the right (code 0 is +0.0)
        x = F.pad(x, [p for e in reversed(extra) for p in (0, e)])
    spatial = tuple(x.shape[2:])
    out = tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                for n, p, d, k, s in zip(spatial, padding, dilation, kernel, stride))
    if any(n <= 0 for n in out):
        raise ValueError(f"{what}: input {tuple(x.shape)} is smaller than the (dilated) kernel {kernel} after padding")
    state = _state_for(state, recipe, x.device)
    geometry = _ConvGeometry(kernel, stride, padding, dilation, groups, out)
    if _codes_commute_with_im2col(recipe):
        return _conv_fwd_op(x, weight, bias, list(kernel), list(stride), list(padding), list(dilation), groups,
                            list(out), state.handle, DTYPE_NAMES[_output_dtype(x)], *_grads_needed(x, weight))[0]
    cols = _im2col(x, geometry)  # [B*L, C*prod(k)], channel-major patches as weight.reshape(O, -1)
    og, k = o // groups, cg * math.prod(kernel)
    outs = []
    for g in range(groups):
        cols_g = cols[..., g * k:(g + 1) * k]
        if padded_k(k) > k:  # zero columns add nothing to the product
            cols_g = F.pad(cols_g, (0, padded_k(k) - k))
        b_g = None if bias is None else bias[g * og:(g + 1) * og]
        outs.append(linear(cols_g, _group_weight(weight, g, groups, padded_k(k)), b_g, recipe, state))
    y = outs[0] if groups == 1 else torch.cat(outs, dim=-1)  # [B*L, O]
    return _channels_first(y, b, out)


def conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1, recipe="hybrid", state=None):
    """FP8 ``F.conv1d``: x [B, C, L], weight [O, C/groups, k] -> [B, O, L_out] (see :func:`conv`)."""
    _check_rank(weight, 1)
    return conv(x, weight, bias, stride, padding, dilation, groups, recipe, state)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1, recipe="hybrid", state=None):
    """FP8 ``F.conv2d``: x [B, C, H, W], weight [O, C/groups, kh, kw] -> [B, O, Ho, Wo] (see :func:`conv`)."""
    _check_rank(weight, 2)
    return conv(x, weight, bias, stride, padding, dilation, groups, recipe, state)


def conv3d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups: int = 1, recipe="hybrid", state=None):
    """FP8 ``F.conv3d``: x [B, C, D, H, W], weight [O, C/groups, kd, kh, kw] -> [B, O, Do, Ho, Wo] (see :func:`conv`)."""
    _check_rank(weight, 3)
    return conv(x, weight, bias, stride, padding, dilation, groups, recipe, state)


def _check_rank(weight: torch.Tensor, nd: int) -> None:
    if weight.dim() != nd + 2:
        raise ValueError(f"conv{nd}d takes a weight [O, C/groups, {', '.join('k' * nd)}] ({nd + 2} dims), "
                         f"got {tuple(weight.shape)}")


def padded_k(k: int) -> int:
    """K rounded up to a multiple of 16 (conv patches are zero-padded to it: exact, and fp8 MMA-friendly)."""
    return -(-k // 16) * 16


def _codes_commute_with_im2col(recipe: Recipe) -> bool:
    """Whether im2col of the quantized input equals quantizing im2col of the input, bit for bit.

    True for one scale over the tensor (or none) with nearest rounding: every copy of an input
    element rounds alike, and the zero padding is the code of +0. Then the conv quantizes x once
    and saves those codes (1 byte per input element) instead of the patch matrix.
    """
    a = recipe.activation
    return a.parsed_scaling.kind in ("none", "tensor") and a.rounding == "nearest"


@dataclass(frozen=True)
class _ConvGeometry:
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    out: tuple  # output spatial sizes


def _im2col(x: torch.Tensor, g: _ConvGeometry) -> torch.Tensor:
    """x [B, C, *S] -> patches [B*prod(S_out), C*prod(k)] (zero padding; views, then one copy;
    with autograd for float x)."""
    nd = len(g.kernel)
    x = F.pad(x, [p for pad in reversed(g.padding) for p in (pad, pad)])
    for i, (k, s, d) in enumerate(zip(g.kernel, g.stride, g.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)  # windows of the dilated extent, last dim
    if any(d > 1 for d in g.dilation):
        x = x[(Ellipsis, *(slice(None, None, d) for d in g.dilation))]
    # [B, C, *S_out, *k] -> [B, *S_out, C, *k]
    x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return x.reshape(x.shape[0] * math.prod(g.out), -1)


def _col2im(cols: torch.Tensor, spatial: tuple, g: _ConvGeometry) -> torch.Tensor:
    """The adjoint of im2col: cols [B*prod(S_out), C*prod(k)] -> x-gradient [B, C, *S] (sums the overlaps)."""
    nd = len(g.kernel)
    b = cols.shape[0] // math.prod(g.out)
    if nd == 2:  # F.fold: one fused kernel
        cols = cols.reshape(b, math.prod(g.out), -1).transpose(1, 2)
        return F.fold(cols, spatial, g.kernel, dilation=g.dilation, padding=g.padding, stride=g.stride)
    c = cols.shape[1] // math.prod(g.kernel)
    cols = cols.reshape(b, *g.out, c, *g.kernel)
    padded = [n + 2 * p for n, p in zip(spatial, g.padding)]
    dx = cols.new_zeros(b, c, *padded)
    to_channels_first = (0, nd + 1, *range(1, nd + 1))
    for offset in itertools.product(*(range(k) for k in g.kernel)):  # one strided add per kernel tap
        window = tuple(slice(i * d, i * d + s * (n - 1) + 1, s)
                       for i, d, s, n in zip(offset, g.dilation, g.stride, g.out))
        dx[(slice(None), slice(None), *window)] += cols[(Ellipsis, *offset)].permute(to_channels_first)
    return dx[(slice(None), slice(None), *(slice(p, p + n) for p, n in zip(g.padding, spatial)))]


def _channels_first(y: torch.Tensor, b: int, out: tuple) -> torch.Tensor:
    """GEMM output [B*prod(S_out), O] -> [B, O, *S_out] (contiguous)."""
    nd = len(out)
    return y.reshape(b, *out, y.shape[-1]).permute(0, nd + 1, *range(1, nd + 1)).contiguous()


def _im2col_codes(codes: torch.Tensor, g: _ConvGeometry, k_padded: int) -> torch.Tensor:
    """fp8 codes x [B, C, *S] -> patches [B*prod(S_out), k_padded] (channel-major, as weight.reshape(O, -1)), a copy."""
    cols = _im2col(codes.view(torch.uint8), g)  # code 0 is +0.0 in both formats
    if k_padded > cols.shape[1]:  # zero columns add nothing to the product
        cols = F.pad(cols, (0, k_padded - cols.shape[1]))
    return cols.view(codes.dtype)


def _group_weight(weight: torch.Tensor, group: int, groups: int, k_padded: int) -> torch.Tensor:
    """Group ``group``'s filters of weight [O, C/groups, *k] as a [O/groups, k_padded] matrix (zero-padded K)."""
    og = weight.shape[0] // groups
    w_g = weight[group * og:(group + 1) * og].reshape(og, -1)
    return F.pad(w_g, (0, k_padded - w_g.shape[1]))


def _group_seed(seed: int, group: int) -> int:
    """The seed of a grouped conv's group ``group`` (group 0: the layer's own)."""
    return (seed + group) % SEED_LIMIT


def _geometry(kernel, stride, padding, dilation, groups, out) -> _ConvGeometry:
    return _ConvGeometry(tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), groups, tuple(out))


@torch.library.custom_op("tritonfp8::conv_fwd", mutates_args=())
def _conv_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], kernel: list[int],
                 stride: list[int], padding: list[int], dilation: list[int], groups: int, out: list[int],
                 layer: str, out_dtype: str, need_dx: bool, need_dw: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """conv1d/2d/3d as GEMMs on the im2col of the fp8 input x [B, C, *S] (all three products
    in fp8) -> (y [B, O, *S_out], for the backward: x's codes [B, C, *S] and scale (empty
    unless need_dw), the weight's delayed scales [groups] (empty unless delayed and need_dx),
    the seeds int64 [3] (CPU)).

    Saving x's codes (1 byte per input element) instead of the patch matrix: the backward
    rebuilds the patches from them, 1/prod(k) of the size."""
    geometry = _geometry(kernel, stride, padding, dilation, groups, out)
    state = state_of(layer)
    recipe = state.recipe
    b, c = x.shape[:2]
    o = weight.shape[0]
    cg, og = c // groups, o // groups
    kp = padded_k(math.prod(weight.shape[1:]))
    x_q = state.quantize(x.reshape(-1, x.shape[-1]), "activation", recipe.activation, transpose=False)
    codes = x_q.data.reshape(x.shape)
    seeds = _seeds_tensor(state)
    weight_seed = int(seeds[0])
    outs, delayed = [], []
    for gi in range(groups):
        cols = FP8Tensor(_im2col_codes(codes[:, gi * cg:(gi + 1) * cg], geometry, kp), x_q.scale, x_q.fmt, x_q.scaling)
        w_q = state.quantize(_group_weight(weight, gi, groups, kp), "weight", recipe.weight, transpose=False,
                             seed=_group_seed(weight_seed, gi))
        b_g = None if bias is None else bias[gi * og:(gi + 1) * og]
        outs.append(scaled_mm(cols, transpose_view(w_q), bias=b_g, out_dtype=DTYPES_BY_NAME[out_dtype],
                              fast_accumulation=_fast(recipe, "forward")))
        if _delayed_scale(w_q, recipe) is not None:
            delayed.append(w_q.scale.reshape(1))
    y = outs[0] if groups == 1 else torch.cat(outs, dim=-1)  # [B*L, O]
    state.calls += 1
    return (_channels_first(y, b, geometry.out), codes if need_dw else _empty(x, torch.uint8),
            x_q.scale if need_dw else _empty(x),
            torch.cat(delayed) if need_dx and delayed else _empty(x), seeds)


@_conv_fwd_op.register_fake
def _(x, weight, bias, kernel, stride, padding, dilation, groups, out, layer, out_dtype, need_dx, need_dw):
    recipe = state_of(layer).recipe
    y = x.new_empty((x.shape[0], weight.shape[0], *out), dtype=DTYPES_BY_NAME[out_dtype])
    a = recipe.activation
    codes = x.new_empty(x.shape, dtype=get_format(a.fmt).torch_dtype) if need_dw else _empty(x, torch.uint8)
    x_scale = x.new_empty(()) if need_dw else _empty(x)
    delayed = x.new_empty((groups,)) if need_dx and recipe.weight.scale_source == "delayed" else _empty(x)
    return y, codes, x_scale, delayed, torch.empty(3, dtype=torch.int64)


@torch.library.custom_op("tritonfp8::conv_bwd", mutates_args=())
def _conv_bwd_op(dy: torch.Tensor, codes: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                 delayed: torch.Tensor, seeds: torch.Tensor, x_shape: list[int], kernel: list[int],
                 stride: list[int], padding: list[int], dilation: list[int], groups: int, out: list[int],
                 layer: str, x_dtype: str, need_dx: bool, need_dw: bool, bias_dtype: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`_conv_fwd_op`: dy [B, O, *S_out] -> (dx [B, C, *S], dW, db [O]),
    each empty where not needed."""
    g = _geometry(kernel, stride, padding, dilation, groups, out)
    state = state_of(layer)
    recipe = state.recipe
    weight_seed, error_seed, wgrad_seed = seeds.tolist()
    c, o = x_shape[1], weight.shape[0]
    nd = len(g.kernel)
    cg, og, k = c // groups, o // groups, math.prod(weight.shape[1:])
    kp = padded_k(k)
    w_ts = []
    if need_dx:
        w_ts = [_recast_weight(state, _group_weight(weight, gi, groups, kp), recipe, _group_seed(weight_seed, gi),
                               delayed[gi] if delayed.numel() else None) for gi in range(groups)]
    dy2d = dy.permute(0, *range(2, nd + 2), 1).reshape(-1, o)  # [B*L, O]
    dx_cols, dws = [], []
    for gi in range(groups):
        dy_q = _quantize_error(state, recipe, dy2d[:, gi * og:(gi + 1) * og], need_dw, _group_seed(error_seed, gi))
        if w_ts:
            dx_cols.append(scaled_mm(dy_q, transpose_view(w_ts[gi]), out_dtype=DTYPES_BY_NAME[x_dtype],
                                     fast_accumulation=_fast(recipe, "input_grad"))[:, :k])
        if need_dw:
            cols = _im2col_codes(codes[:, gi * cg:(gi + 1) * cg], g, kp)
            # The activation's transposed copy: with one scale and nearest rounding, the same codes transposed.
            x_t = _activation_fp8(recipe, cols.t().contiguous(), x_scale)
            dws.append(_weight_grad(dy_q, x_t, recipe, _group_seed(wgrad_seed, gi), weight.dtype)[:, :k])
    dx, dw, db = _empty(dy), _empty(dy), _empty(dy)  # three tensors: outputs may not alias
    if dx_cols:
        cols = torch.cat(dx_cols, dim=-1) if groups > 1 else dx_cols[0]  # [B*L, C*prod(k)]
        dx = _col2im(cols, tuple(x_shape[2:]), g)
    if dws:
        dw = torch.cat(dws, dim=0).reshape(weight.shape)
    if bias_dtype:
        db = dy2d.float().sum(0).to(DTYPES_BY_NAME[bias_dtype])
    return dx, dw, db


@_conv_bwd_op.register_fake
def _(dy, codes, x_scale, weight, delayed, seeds, x_shape, kernel, stride, padding, dilation, groups, out, layer,
      x_dtype, need_dx, need_dw, bias_dtype):
    dx = dy.new_empty(x_shape, dtype=DTYPES_BY_NAME[x_dtype]) if need_dx else _empty(dy)
    dw = torch.empty_like(weight) if need_dw else _empty(dy)
    db = dy.new_empty((weight.shape[0],), dtype=DTYPES_BY_NAME[bias_dtype]) if bias_dtype else _empty(dy)
    return dx, dw, db


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, kernel, stride, padding, dilation, groups, out, layer, _, need_dx, need_dw = inputs
    _, codes, x_scale, delayed, seeds = output
    ctx.save_for_backward(codes, x_scale, weight, delayed, seeds)
    ctx.mark_non_differentiable(codes, x_scale, delayed, seeds)
    ctx.state = state_of(layer)
    ctx.geometry_args = (list(x.shape), kernel, stride, padding, dilation, groups, out, layer)
    ctx.need_dx, ctx.need_dw = need_dx, need_dw
    ctx.x_dtype = DTYPE_NAMES[x.dtype]
    ctx.bias_dtype = DTYPE_NAMES[bias.dtype] if bias is not None and bias.requires_grad else ""


def _conv_backward(ctx, dy, *_):
    refuse_double_backward("conv")
    codes, x_scale, weight, delayed, seeds = ctx.saved_tensors
    dx, dw, db = _conv_bwd_op(dy.contiguous(), codes, x_scale, weight, delayed, seeds, *ctx.geometry_args,
                              ctx.x_dtype, ctx.need_dx, ctx.need_dw, ctx.bias_dtype)
    return (dx if ctx.need_dx else None, dw if ctx.need_dw else None, db if ctx.bias_dtype else None,
            *(None,) * 10)


_conv_fwd_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              scale: Optional[float] = None, attn_mask: Optional[torch.Tensor] = None,
              enable_gqa: bool = False) -> torch.Tensor:
    """FP8 flash attention: q [B, H, Nq, D], k/v [B, H_kv, Nk, D] -> [B, H, Nq, D], with SDPA's
    attn_mask and enable_gqa (see ops/attention.py)."""
    from ..ops.attention import attention as fp8_attention

    return fp8_attention(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask, enable_gqa=enable_gqa)
