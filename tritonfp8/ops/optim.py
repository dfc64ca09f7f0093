"""Fused optimizer updates with 16-bit master weights (numerics.md section 8).

One kernel launch updates every parameter of a *bucket*: the parameters of one
param group that share a dtype live in one contiguous flat buffer (see
``tritonfp8/optim.py``), and a *chunk table* lists the pieces of it to update::

    chunks: int64 [C, 3], row c = (start, end, segment) with end - start <= BLOCK

Program c updates elements ``start .. end-1`` of the flat buffers; ``segment`` indexes
``inv_scales`` (fp32 [S], one gradient unscale factor per parameter, so a per-layer
loss scale can be removed in the same pass). Each parameter's segment is padded to a
multiple of ``ALIGN`` elements and chunks cover the padding too, so every start and
end is a multiple of ALIGN and the loads and stores vectorize. The padding holds
zeros in every buffer, and an update of zeros is zeros (for any finite inv_scale).

Per element, in fp32, every operation rounded separately (no FMA contraction):

SGD (torch.optim.SGD semantics)::

    g = grad * inv_scale;  g = g * sign                    (sign = -1 for maximize)
    if weight_decay != 0:  g = g + p * weight_decay
    if momentum != 0:      buf = g                         (first step)
                           buf = buf * momentum + g * (1 - dampening)   (later steps)
                           g = g + buf * momentum  (nesterov)  or  g = buf
    p = p - g * lr

AdamW (torch.optim.AdamW semantics, decoupled weight decay)::

    g = grad * inv_scale;  g = g * sign
    p = p * (1 - lr * weight_decay)
    m = m * beta1 + g * (1 - beta1)
    v = v * beta2 + (g * g) * (1 - beta2)
    p = p - div_rn(m, div_rn(sqrt_rn(v), sqrt(1 - beta2**t)) + eps) * (lr / (1 - beta1**t))

Host-side scalars (``1 - dampening``, ``lr / (1 - beta1**t)``, ...) are computed in
double precision and rounded once to fp32 by :func:`sgd_scalars` / :func:`adamw_scalars`;
both backends receive the same fp32 values. The update uses the fp32 values of the
optimizer state computed in this step; the state is then stored in its dtype (fp32,
or bf16 rounded to nearest). The new master weight is written in the master dtype:
fp32 as is, fp16 / bf16 rounded ONCE from the fp32 result by ``round_to_code`` (the
same code that rounds to fp8), stochastically (element offset o in the flat buffer takes
word o % 4 of Philox(seed, o // 4): one call per 4 elements) or to nearest. Values above the 16-bit
range become +-Inf (IEEE, not saturated: a diverging weight stays visible).

Bit-exactness: the Triton kernel under the interpreter and the torch reference give
identical bits (tests/test_optim.py). Compiled for a GPU the kernels are launched with
``enable_fp_fusion=False``, so ``a * b + c`` is not contracted into an FMA (the PTX has
``mul.rn.f32`` / ``add.rn.f32``, no ``fma``), and ``div_rn`` / ``sqrt_rn`` are IEEE
correctly rounded; the reference rounds every operation the same way. Its sqrt is
computed in float64 and rounded to fp32 (correctly rounded for fp32 inputs), because
torch's CPU fp32 ``sqrt`` is not correctly rounded (it differs in about 20% of values).
"""
from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from .. import backend as _backend
from ..formats import BF16, FP16, Format
from .rounding import (codes_to_tensor, random_words_1d, random_words_reference, round_to_code, round_to_code_reference,
                       seed_tensor)

BLOCK = 1024  # elements per program
ALIGN = 16  # segments in a flat buffer start and end at multiples of this many elements
NUM_WARPS = 4
MASTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
STATE_DTYPES = (torch.float32, torch.bfloat16)

# Format constants of the 16-bit targets, as constexpr globals the kernels may read
# (through ``.value``: the interpreter hands globals over as constexpr objects, which
# round_to_code's integer arithmetic does not accept).
FP16_EXP = tl.constexpr(FP16.exp_bits)
FP16_MAN = tl.constexpr(FP16.man_bits)
FP16_MAX = tl.constexpr(FP16.max_code)
FP16_INF = tl.constexpr(FP16.inf_code)
FP16_NAN = tl.constexpr(FP16.nan_code)
BF16_EXP = tl.constexpr(BF16.exp_bits)
BF16_MAN = tl.constexpr(BF16.man_bits)
BF16_MAX = tl.constexpr(BF16.max_code)
BF16_INF = tl.constexpr(BF16.inf_code)
BF16_NAN = tl.constexpr(BF16.nan_code)
ALIGN_C = tl.constexpr(ALIGN)


def f32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value (returned as a Python float)."""
    return struct.unpack("f", struct.pack("f", float(x)))[0]


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


@triton.jit
def _chunk(chunks_ptr, inv_scale_ptr, BLOCK: tl.constexpr):
    """(element offsets [BLOCK] int64, in-range mask, gradient unscale factor, first offset) of this program."""
    pid = tl.program_id(0)
    start = tl.load(chunks_ptr + pid * 3)
    end = tl.load(chunks_ptr + pid * 3 + 1)
    seg = tl.load(chunks_ptr + pid * 3 + 2)
    start = tl.multiple_of(start, ALIGN_C)
    end = tl.multiple_of(end, ALIGN_C)
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < end, tl.load(inv_scale_ptr + seg), start


@triton.jit
def _load_f32(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rounded(ptr, offs, mask, x, rand, STOCHASTIC: tl.constexpr):
    """Store fp32 ``x`` in the pointee dtype: fp32 as is, fp16 / bf16 rounded once (Inf on overflow)."""
    if ptr.dtype.element_ty == tl.float16:
        code, _ = round_to_code(
            x, rand, FP16_EXP.value, FP16_MAN.value, FP16_MAX.value, FP16_INF.value, FP16_NAN.value, STOCHASTIC, False
        )
        tl.store(ptr + offs, code.to(tl.uint16).to(tl.float16, bitcast=True), mask=mask)
    elif ptr.dtype.element_ty == tl.bfloat16:
        code, _ = round_to_code(
            x, rand, BF16_EXP.value, BF16_MAN.value, BF16_MAX.value, BF16_INF.value, BF16_NAN.value, STOCHASTIC, False
        )
        tl.store(ptr + offs, code.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, x, mask=mask)


@triton.jit(do_not_specialize=["seed", "first", "nesterov"])
def _sgd_kernel(
    # pointers: flat buffers [N] (param: fp16/bf16/fp32, grad: param dtype, buf: fp32/bf16), tables
    param_ptr, grad_ptr, buf_ptr, chunks_ptr, inv_scale_ptr,
    # scalars (fp32 values computed by sgd_scalars; first / nesterov are 0 or 1)
    seed, lr, weight_decay, momentum, damp, sign, first, nesterov,
    # modes
    MOMENTUM: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
):
    """One SGD step on one chunk of a flat buffer (see the module docstring for the math)."""
    offs, mask, inv_scale, start = _chunk(chunks_ptr, inv_scale_ptr, BLOCK)
    g = _load_f32(grad_ptr, offs, mask) * inv_scale
    g = g * sign
    p = _load_f32(param_ptr, offs, mask)
    if weight_decay != 0.0:
        g = g + p * weight_decay
    if MOMENTUM:
        if first != 0:
            buf = g
        else:
            buf = _load_f32(buf_ptr, offs, mask) * momentum + g * damp
        _store_rounded(buf_ptr, offs, mask, buf, 0, False)
        if nesterov != 0:
            g = g + buf * momentum
        else:
            g = buf
    p = p - g * lr
    if STOCHASTIC:
        rand = random_words_1d(seed, start, BLOCK)
    else:
        rand = 0
    _store_rounded(param_ptr, offs, mask, p, rand, STOCHASTIC)


@triton.jit(do_not_specialize=["seed"])
def _adamw_kernel(
    # pointers: flat buffers [N] (param: fp16/bf16/fp32, grad: param dtype, state: fp32/bf16), tables
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, chunks_ptr, inv_scale_ptr,
    # scalars (fp32 values computed by adamw_scalars)
    seed, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps, sign,
    # modes
    STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
):
    """One AdamW step on one chunk of a flat buffer (see the module docstring for the math)."""
    offs, mask, inv_scale, start = _chunk(chunks_ptr, inv_scale_ptr, BLOCK)
    g = _load_f32(grad_ptr, offs, mask) * inv_scale
    g = g * sign
    p = _load_f32(param_ptr, offs, mask) * decay
    m = _load_f32(exp_avg_ptr, offs, mask) * beta1 + g * one_minus_beta1
    v = _load_f32(exp_avg_sq_ptr, offs, mask) * beta2 + (g * g) * one_minus_beta2
    _store_rounded(exp_avg_ptr, offs, mask, m, 0, False)
    _store_rounded(exp_avg_sq_ptr, offs, mask, v, 0, False)
    denom = tl.math.div_rn(tl.math.sqrt_rn(v), tl.zeros_like(v) + bias_correction2_sqrt) + eps
    p = p - tl.math.div_rn(m, denom) * step_size
    if STOCHASTIC:
        rand = random_words_1d(seed, start, BLOCK)
    else:
        rand = 0
    _store_rounded(param_ptr, offs, mask, p, rand, STOCHASTIC)


# ----------------------------------------------------------------------------
# Host-side scalars (shared by both backends) and the chunk table
# ----------------------------------------------------------------------------


def sgd_scalars(lr: float, weight_decay: float, momentum: float, dampening: float, maximize: bool) -> dict:
    """fp32 scalars of the SGD kernel (Python floats holding fp32 values)."""
    return dict(
        lr=f32(lr), weight_decay=f32(weight_decay), momentum=f32(momentum),
        damp=f32(1.0 - dampening), sign=-1.0 if maximize else 1.0,
    )


def adamw_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                  maximize: bool) -> dict:
    """fp32 scalars of the AdamW kernel for step number ``step`` (1 for the first step)."""
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    return dict(
        decay=f32(1.0 - lr * weight_decay), beta1=f32(beta1), one_minus_beta1=f32(1.0 - beta1),
        beta2=f32(beta2), one_minus_beta2=f32(1.0 - beta2), step_size=f32(lr / bias_correction1),
        bias_correction2_sqrt=f32(math.sqrt(bias_correction2)), eps=f32(eps), sign=-1.0 if maximize else 1.0,
    )


def build_chunks(segments, device, block: int = BLOCK) -> torch.Tensor:
    """Chunk table int64 [C, 3] of (start, end, segment index) for ``segments`` = [(start, numel), ...].

    Each segment is cut into pieces of at most ``block`` elements; the segment index
    is the position in ``segments`` (it selects the segment's unscale factor).
    """
    if not segments:
        return torch.empty((0, 3), dtype=torch.int64, device=device)
    starts = torch.tensor([s for s, _ in segments], dtype=torch.int64)
    numels = torch.tensor([n for _, n in segments], dtype=torch.int64)
    if (numels <= 0).any():
        raise ValueError("build_chunks: every segment needs at least one element")
    counts = (numels + block - 1) // block
    seg = torch.repeat_interleave(torch.arange(len(segments), dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    within = torch.arange(int(counts.sum()), dtype=torch.int64) - first_chunk[seg]
    start = starts[seg] + within * block
    end = torch.minimum(start + block, (starts + numels)[seg])
    return torch.stack([start, end, seg], dim=1).contiguous().to(device)


# No FMA contraction on the GPU, so that the kernel rounds every operation like the reference.
_LAUNCH = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)


# ----------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------


def _sgd_triton(param, grad, momentum_buffer, chunks, inv_scales, seed, lr, weight_decay, momentum, dampening,
                nesterov, maximize, first, has_momentum, stochastic):
    if chunks.shape[0] == 0:
        return
    s = sgd_scalars(lr, weight_decay, momentum, dampening, maximize)
    _sgd_kernel[(chunks.shape[0],)](
        param_ptr=param, grad_ptr=grad, buf_ptr=momentum_buffer if has_momentum else param,
        chunks_ptr=chunks, inv_scale_ptr=inv_scales,
        seed=seed, first=int(first), nesterov=int(nesterov), **s,
        MOMENTUM=has_momentum, STOCHASTIC=stochastic, BLOCK=BLOCK, **_LAUNCH,
    )


def _adamw_triton(param, grad, exp_avg, exp_avg_sq, chunks, inv_scales, seed, lr, beta1, beta2, eps,
                  weight_decay, step, maximize, stochastic):
    if chunks.shape[0] == 0:
        return
    s = adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, maximize)
    _adamw_kernel[(chunks.shape[0],)](
        param_ptr=param, grad_ptr=grad, exp_avg_ptr=exp_avg, exp_avg_sq_ptr=exp_avg_sq,
        chunks_ptr=chunks, inv_scale_ptr=inv_scales, seed=seed, **s,
        STOCHASTIC=stochastic, BLOCK=BLOCK, **_LAUNCH,
    )


# ----------------------------------------------------------------------------
# PyTorch reference (same math, same operation order, same rounding)
# ----------------------------------------------------------------------------

_FORMAT_OF = {torch.float16: FP16, torch.bfloat16: BF16}


def round_to_dtype_reference(x: torch.Tensor, dtype: torch.dtype, rand, stochastic: bool) -> torch.Tensor:
    """Twin of ``_store_rounded``: fp32 ``x`` -> ``dtype`` (fp32 unchanged; fp16/bf16 rounded once, Inf on overflow)."""
    if dtype == torch.float32:
        return x
    fmt: Format = _FORMAT_OF[dtype]
    code, _ = round_to_code_reference(x, rand, fmt, stochastic, saturate=False)
    return codes_to_tensor(code, fmt)


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt (torch's CPU fp32 sqrt is not; float64 sqrt rounded to fp32 is)."""
    return torch.sqrt(x.double()).float()


def _scalar(v: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=like.device)


def _runs(chunks: torch.Tensor) -> list[tuple[int, int, int]]:
    """The chunk table's (start, end, segment index) merged into maximal contiguous runs of one segment."""
    runs: list[list[int]] = []
    for start, end, seg in chunks.to("cpu").tolist():
        if runs and runs[-1][1] == start and runs[-1][2] == seg:
            runs[-1][1] = end
        else:
            runs.append([start, end, seg])
    return [tuple(r) for r in runs]


@_backend.compiled_reference
def _sgd_run_reference(param, grad, momentum_buffer, inv_scale, seed, offset, s: dict, weight_decay: bool,
                       nesterov: bool, first: bool, has_momentum: bool, stochastic: bool):
    """One contiguous run of the flat buffers (param, grad, buffer: [n] views), updated in place.

    ``offset`` (int64 [], a multiple of ALIGN) is the run's first element offset in the flat
    buffer: the random words are the flat buffer's, as in the kernel. Runs compiled on large
    CPU tensors.
    """
    g = grad.float() * inv_scale
    g = g * s["sign"]
    p = param.float()
    if weight_decay:
        g = g + p * s["weight_decay"]
    if has_momentum:
        if first:
            buf = g
        else:
            buf = momentum_buffer.float() * s["momentum"] + g * s["damp"]
        momentum_buffer.copy_(round_to_dtype_reference(buf, momentum_buffer.dtype, None, False))
        g = g + buf * s["momentum"] if nesterov else buf
    p = p - g * s["lr"]
    rand = None
    if stochastic:
        rand = random_words_reference(seed, param.numel(), offset)
    param.copy_(round_to_dtype_reference(p, param.dtype, rand, stochastic))


@_backend.compiled_reference
def _adamw_run_reference(param, grad, exp_avg, exp_avg_sq, inv_scale, seed, offset, s: dict, stochastic: bool):
    """One contiguous run of the flat AdamW buffers ([n] views), updated in place (see :func:`_sgd_run_reference`)."""
    g = grad.float() * inv_scale
    g = g * s["sign"]
    p = param.float() * s["decay"]
    m = exp_avg.float() * s["beta1"] + g * s["one_minus_beta1"]
    v = exp_avg_sq.float() * s["beta2"] + (g * g) * s["one_minus_beta2"]
    exp_avg.copy_(round_to_dtype_reference(m, exp_avg.dtype, None, False))
    exp_avg_sq.copy_(round_to_dtype_reference(v, exp_avg_sq.dtype, None, False))
    denom = _sqrt_rn(v) / s["bias_correction2_sqrt"] + s["eps"]
    p = p - (m / denom) * s["step_size"]
    rand = None
    if stochastic:
        rand = random_words_reference(seed, param.numel(), offset)
    param.copy_(round_to_dtype_reference(p, param.dtype, rand, stochastic))


def _run_args(chunks, inv_scales, seed, device):
    """Per run: (slice, inv scale [], offset []) and the seed as a tensor."""
    seed_t = seed_tensor(seed, device)
    for start, end, seg in _runs(chunks):
        yield slice(start, end), inv_scales[seg], torch.tensor(start, dtype=torch.int64, device=device), seed_t


def sgd_reference(param, grad, momentum_buffer, chunks, inv_scales, seed, lr, weight_decay, momentum, dampening,
                  nesterov, maximize, first, has_momentum, stochastic):
    """Pure-torch twin of ``_sgd_kernel`` over all chunks; updates ``param`` (and the buffer) in place."""
    if chunks.shape[0] == 0:
        return
    host = sgd_scalars(lr, weight_decay, momentum, dampening, maximize)
    s = {k: _scalar(v, param) for k, v in host.items()}
    for run, inv_scale, offset, seed_t in _run_args(chunks, inv_scales, seed, param.device):
        _sgd_run_reference(param[run], grad[run], momentum_buffer[run] if has_momentum else momentum_buffer,
                           inv_scale, seed_t, offset, s, host["weight_decay"] != 0.0, nesterov, first,
                           has_momentum, stochastic)


def adamw_reference(param, grad, exp_avg, exp_avg_sq, chunks, inv_scales, seed, lr, beta1, beta2, eps,
                    weight_decay, step, maximize, stochastic):
    """Pure-torch twin of ``_adamw_kernel`` over all chunks; updates param and state in place."""
    if chunks.shape[0] == 0:
        return
    s = {k: _scalar(v, param) for k, v in adamw_scalars(lr, beta1, beta2, eps, weight_decay, step, maximize).items()}
    for run, inv_scale, offset, seed_t in _run_args(chunks, inv_scales, seed, param.device):
        _adamw_run_reference(param[run], grad[run], exp_avg[run], exp_avg_sq[run], inv_scale, seed_t, offset, s,
                             stochastic)


# ----------------------------------------------------------------------------
# torch.library ops: dispatch to the backend of the parameter's device
# ----------------------------------------------------------------------------


@torch.library.custom_op("tritonfp8::sgd_update_", mutates_args=("param", "momentum_buffer"))
def sgd_update_(
    param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor, chunks: torch.Tensor,
    inv_scales: torch.Tensor, seed: int, lr: float, weight_decay: float, momentum: float, dampening: float,
    nesterov: bool, maximize: bool, first: bool, has_momentum: bool, stochastic: bool,
) -> None:
    """Fused SGD step over the chunks of flat buffers.

    Args:
        param: flat master weights [N] (fp16 / bf16 / fp32), updated in place.
        grad: flat gradients [N], param's dtype.
        momentum_buffer: flat state [N] (fp32 / bf16), updated in place; ignored unless has_momentum.
        chunks: int64 [C, 3] table from :func:`build_chunks` (same device).
        inv_scales: fp32 [S], the factor each segment's gradient is multiplied by.
        seed: int in [0, 2**63), Philox key of the stochastic rounding.
        first: the momentum buffer is set to the gradient instead of updated.
    """
    impl = sgd_reference if _backend.resolve(param.device) == "torch" else _sgd_triton
    impl(param, grad, momentum_buffer, chunks, inv_scales, seed, lr, weight_decay, momentum, dampening,
         nesterov, maximize, first, has_momentum, stochastic)


@sgd_update_.register_fake
def _(param, grad, momentum_buffer, chunks, inv_scales, seed, lr, weight_decay, momentum, dampening,
      nesterov, maximize, first, has_momentum, stochastic):
    return None


@torch.library.custom_op("tritonfp8::adamw_update_", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def adamw_update_(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    chunks: torch.Tensor, inv_scales: torch.Tensor, seed: int, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, step: int, maximize: bool, stochastic: bool,
) -> None:
    """Fused AdamW step over the chunks of flat buffers (``step`` >= 1 is the bias-correction step).

    Shapes and dtypes as for :func:`sgd_update_`; exp_avg and exp_avg_sq are flat [N] fp32 / bf16.
    """
    impl = adamw_reference if _backend.resolve(param.device) == "torch" else _adamw_triton
    impl(param, grad, exp_avg, exp_avg_sq, chunks, inv_scales, seed, lr, beta1, beta2, eps, weight_decay,
         step, maximize, stochastic)


@adamw_update_.register_fake
def _(param, grad, exp_avg, exp_avg_sq, chunks, inv_scales, seed, lr, beta1, beta2, eps, weight_decay, step,
      maximize, stochastic):
    return None


# ----------------------------------------------------------------------------
# Ahead-of-time compile specs
# ----------------------------------------------------------------------------


_TRITON_TYPE = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def aot_specs() -> list:
    """The configurations of the optimizer kernels that must compile for sm_89 / sm_90 / sm_100,
    each specialized as the JIT specializes a launch on 1M-element flat buffers (weight decay on)."""
    from .spec import launched_spec

    n = 1 << 20

    def flat(dtype):
        return torch.empty((n,), dtype=dtype, device="meta")

    chunks = torch.empty((n // BLOCK, 3), dtype=torch.int64, device="meta")
    inv_scales = torch.empty((1,), dtype=torch.float32, device="meta")
    specs = []
    sgd_cases = [  # (master, state, momentum, stochastic)
        (torch.float16, torch.float32, True, True),
        (torch.bfloat16, torch.bfloat16, True, True),
        (torch.float32, torch.float32, True, False),
        (torch.float16, torch.float32, False, False),
    ]
    for master, state, mom, sr in sgd_cases:
        p, s = _TRITON_TYPE[master], _TRITON_TYPE[state] if mom else _TRITON_TYPE[master]
        name = f"sgd_{p[1:]}_{s[1:] if mom else 'nomom'}_{'sr' if sr else 'rn'}"
        specs.append(launched_spec(
            name, _sgd_triton, flat(master), flat(master), flat(state) if mom else None, chunks, inv_scales,
            1234, 0.01, 1e-4, 0.9 if mom else 0.0, 0.0, False, False, False, mom, sr,
        ))
    adam_cases = [  # (master, state, stochastic)
        (torch.float16, torch.float32, True),
        (torch.bfloat16, torch.bfloat16, True),
        (torch.bfloat16, torch.float32, False),
        (torch.float32, torch.float32, False),
    ]
    for master, state, sr in adam_cases:
        p, s = _TRITON_TYPE[master], _TRITON_TYPE[state]
        name = f"adamw_{p[1:]}_{s[1:]}_{'sr' if sr else 'rn'}"
        specs.append(launched_spec(
            name, _adamw_triton, flat(master), flat(master), flat(state), flat(state), chunks, inv_scales,
            1234, 1e-3, 0.9, 0.999, 1e-8, 0.01, 10, False, sr,
        ))
    return specs
