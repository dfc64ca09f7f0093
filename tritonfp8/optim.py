"""Optimizers with 16-bit master weights and fused, stochastically rounded updates
(numerics.md section 8).

``tf8.optim.SGD`` and ``tf8.optim.AdamW`` are ``torch.optim.Optimizer`` subclasses with
the hyperparameters and semantics of their torch namesakes, plus:

* ``master_dtype`` (fp16, bf16 or fp32; ``None`` keeps each parameter's dtype): the
  model's parameters ARE the master weights, converted to this dtype (round to
  nearest) when the optimizer is built, so a 16-bit model takes half the memory of
  an fp32 one and no separate fp32 copy exists.
* ``rounding``: the new master weight is computed in fp32 and written back rounded
  once to the master dtype, ``"stochastic"`` (default; unbiased, so updates smaller
  than half an ulp are not swamped) or ``"nearest"``.
* ``state_dtype``: fp32 (default) or bf16 optimizer state (momentum, Adam moments).
* ``seed``: base seed of the Philox bits; the bits of a step depend only on
  (seed, bucket, the parameter's step count, element offset), so a run resumed from
  a state dict continues bit-identically. ``None`` draws one from torch's RNG.

Memory layout: when a param group is added, its parameters are grouped by dtype
into *buckets*; each bucket owns one contiguous flat buffer and every parameter's
``.data`` becomes a view into it (segments start at multiples of 16 elements).
Gradients, momentum and Adam moments live in flat buffers of the same layout, and
``state[p]`` holds views into them. One ``step()`` launches ONE kernel per bucket
(``tritonfp8::sgd_update_`` / ``adamw_update_``), not one per tensor; parameters
whose step counts differ (some had no gradient on earlier steps) are updated by one
extra launch per distinct count.

Gradients: at ``step()`` each ``p.grad`` that is not already the parameter's view of
the flat gradient buffer is copied into it and ``p.grad`` is rebound to that view, so
with ``zero_grad(set_to_none=False)`` later backward passes accumulate straight into
the flat buffer (no copy). Parameters whose ``.grad`` is None are skipped, as in torch.

Do not move or cast the model (``.to()``, ``.half()``) after building the optimizer:
that replaces the parameters' storage; ``step()`` detects it and raises.

FSDP2 (DTensor parameters): convert the model to the master dtype before ``fully_shard``
(the sharding owns the storage and its dtype); each rank's local shards are read into a
flat buffer, updated by the fused kernel and written back, and ``state_dict()`` gives the
state as DTensors for ``torch.distributed.checkpoint``.

Data parallel (DDP): build the optimizer BEFORE wrapping the model in DDP. A dtype change
(fp32 -> 16-bit master weights) replaces each parameter's autograd gradient accumulator,
on which DDP hooks its all-reduce; built after DDP, the optimizer detects that and raises
(a model already in the master dtype works in either order). With ``seed=None`` every rank
takes rank 0's seed (one broadcast), so replicas round identical updates identically.

Loss scaling: ``step(grad_scale=...)`` divides gradients by a loss scale inside the
kernel (fp32, so unscaling a 16-bit gradient loses nothing); ``tf8.LossScaler`` uses
it. ``grad_scale`` is a scalar tensor, or a dict {parameter: scalar tensor} for
per-layer scales.
"""
from __future__ import annotations

import itertools
import weakref
from collections import defaultdict
from typing import Optional

import torch
from torch.autograd.graph import get_gradient_edge

from . import _distributed
from .formats import ROUNDINGS, check_seed, derive_seed
from .ops import optim as _ops

__all__ = ["SGD", "AdamW"]

_DTYPE_NAMES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
# Attribute of a parameter: weak reference to the optimizer whose flat buffer holds it.
_OWNER_ATTR = "_tf8_optimizer"


def _parse_dtype(value, allowed, what: str, allow_none: bool):
    if value is None and allow_none:
        return None
    dtype = _DTYPE_NAMES.get(value.lower()) if isinstance(value, str) else value
    if dtype not in allowed:
        names = ", ".join(str(d) for d in allowed) + (" (or None to keep each parameter's dtype)" if allow_none else "")
        raise ValueError(f"unsupported {what} {value!r}; use one of {names}")
    return dtype


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return False
    return isinstance(p, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view of the storage its sharding owns)."""
    with torch.no_grad():
        return t.to_local()


def _shard_salt(p) -> int:
    """1 + this rank's index among the shards of DTensor ``p`` (over its Shard mesh dims only,
    so replicas of a shard share it)."""
    mesh, coord, index = p.device_mesh, p.device_mesh.get_coordinate(), 0
    for dim, placement in enumerate(p.placements):
        if placement.is_shard():
            index = index * mesh.size(dim) + coord[dim]
    return 1 + index


def _gradient_accumulator_held(p: torch.Tensor) -> bool:
    """Whether anything besides ``p`` keeps its autograd gradient accumulator alive.

    Changing a parameter's dtype (``p.data = ...``) makes autograd drop the accumulator
    and create a new one, and the hooks registered on the old one die with it: DDP's
    Reducer holds the accumulator and hooks its all-reduce there, so after the change the
    gradients would no longer be reduced, silently. Probed by tagging the accumulator:
    the tag survives only if the node is kept alive elsewhere.
    """
    if not p.requires_grad:
        return False
    node = get_gradient_edge(p).node
    node.metadata["_tf8_probe"] = True
    del node
    again = get_gradient_edge(p).node
    return again.metadata.pop("_tf8_probe", False)


class _Bucket:
    """The parameters of one param group with one dtype, stored in one flat buffer.

    A *sharded* bucket holds DTensor parameters (FSDP2): the flat buffer holds a copy of
    this rank's local shards, the parameters keep the storage their sharding owns (they are
    not rebound), and each update reads the shards in (so writes from outside, e.g. a
    checkpoint loaded into the model, are seen) and copies its result back. ``seed_salt`` tells
    the shards of one parameter apart (their element offsets coincide), and is the same
    on replicas of a shard (HSDP), whose updates must round identically.
    """

    def __init__(self, index: int, group_index: int, params: list, dtype: torch.dtype, device: torch.device,
                 sharded: bool = False, seed_salt: int = 0):
        self.index = index
        self.group_index = group_index
        self.params = params
        self.dtype = dtype
        self.device = device
        self.sharded = sharded
        self.seed_salt = seed_salt
        self.shapes = [_local(p).shape if sharded else p.shape for p in params]
        self.numels = [_local(p).numel() if sharded else p.numel() for p in params]
        # Each segment is padded to ALIGN elements; the padding stays zero through every update.
        self.sizes = [-(-max(n, 1) // _ops.ALIGN) * _ops.ALIGN for n in self.numels]
        self.offsets = [0, *itertools.accumulate(self.sizes)][: len(params)]
        self.total = sum(self.sizes)
        self.flat_param = torch.zeros(self.total, dtype=dtype, device=device)
        self.flat_grad: Optional[torch.Tensor] = None
        self.grad_views: list = []
        self.dirty = [False] * len(params)  # a grad slot holds values from an earlier step
        self.state: dict[str, torch.Tensor] = {}
        self.fresh_state = False
        self.state_ready = False
        self._chunks: dict = {}  # chunk tables by the tuple of updated parameters (a few patterns)
        self._ones: dict = {}
        self._empty: Optional[torch.Tensor] = None

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        return flat[self.offsets[i]: self.offsets[i] + self.numels[i]].view(self.shapes[i])

    @property
    def seed_index(self) -> int:
        """The bucket's index in the Philox seed derivation (salted for shards)."""
        return self.index + (self.seed_salt << 32)

    def fill(self) -> None:
        """Convert every parameter's values into the flat buffer (round to nearest); rebinds nothing."""
        with torch.no_grad():
            for i, p in enumerate(self.params):
                src = _local(p) if self.sharded else p.detach()
                dst = self.view(self.flat_param, i)
                dst.copy_(src)
                if src.dtype != self.dtype and bool((torch.isinf(dst) & torch.isfinite(src)).any()):
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} has values outside the {self.dtype} range "
                        f"(max {torch.finfo(self.dtype).max:g}); they would become Inf in the master weights"
                    )

    def rebind(self) -> None:
        """Make every ``p.data`` its view of the flat buffer (gradients are converted to its dtype).
        Sharded buckets rebind nothing: they remember where the local shards live."""
        if self.sharded:
            return
        with torch.no_grad():
            for i, p in enumerate(self.params):
                grad = p.grad
                p.grad = None
                p.data = self.view(self.flat_param, i)
                if grad is not None:
                    p.grad = grad.to(self.dtype)
        self.ptrs = [p.data_ptr() for p in self.params]

    def check_storage(self) -> None:
        for i, p in enumerate(self.params):
            if self.sharded:  # shards are copied in at every update: only their dtype must stay
                if p.dtype != self.dtype:
                    raise RuntimeError(f"a sharded parameter of shape {tuple(p.shape)} changed dtype from {self.dtype} "
                                       f"to {p.dtype} after the optimizer was built; build it after casting the model")
                continue
            if p.data_ptr() != self.ptrs[i] or p.dtype != self.dtype:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} no longer lives in the optimizer's flat buffer "
                    f"(its storage was replaced, e.g. by model.to() / .half() / .cuda() after the optimizer was "
                    f"built); build the optimizer after moving or casting the model"
                )

    def adopt_grads(self) -> list[int]:
        """Move every present gradient into the flat gradient buffer; indices of the parameters with one."""
        self.check_storage()
        if self.flat_grad is None:
            self.flat_grad = torch.zeros(self.total, dtype=self.dtype, device=self.device)
            self.grad_views = [self.view(self.flat_grad, i) for i in range(len(self.params))]
        members = []
        for i, p in enumerate(self.params):
            g = p.grad
            view = self.grad_views[i]
            if g is None:
                if self.dirty[i]:  # stale values would be seen by a whole-buffer non-finite check
                    view.zero_()
                    self.dirty[i] = False
                continue
            if g.is_sparse:
                raise RuntimeError("tf8.optim optimizers do not support sparse gradients")
            if self.sharded:  # p.grad stays the DTensor the sharding made; its local shard is copied
                view.copy_(_local(g))
            elif g.data_ptr() != view.data_ptr() or g.stride() != view.stride():
                view.copy_(g)
                p.grad = view
            self.dirty[i] = True
            members.append(i)
        return members

    def read_shards(self, members) -> None:
        """Sharded buckets: copy the current local shards of ``members`` into the flat buffer."""
        if self.sharded:
            for i in members:
                self.view(self.flat_param, i).copy_(_local(self.params[i]))

    def write_back(self, members) -> None:
        """Sharded buckets: copy the updated values of ``members`` into the local shards."""
        if self.sharded:
            for i in members:
                _local(self.params[i]).copy_(self.view(self.flat_param, i))

    def chunks(self, members: tuple) -> torch.Tensor:
        table = self._chunks.get(members)
        if table is None:
            if len(self._chunks) >= 16:  # gradients present in ever new patterns: do not keep them all
                self._chunks.clear()
            segments = [(self.offsets[i], self.sizes[i]) for i in members]
            table = self._chunks[members] = _ops.build_chunks(segments, self.device)
        return table

    def empty_state(self) -> torch.Tensor:
        """A placeholder state buffer (SGD without momentum): no aliasing of the mutated parameter buffer."""
        if self._empty is None:
            self._empty = torch.empty(0, dtype=torch.float32, device=self.device)
        return self._empty

    def ones(self, n: int) -> torch.Tensor:
        t = self._ones.get(n)
        if t is None:
            t = self._ones[n] = torch.ones(n, dtype=torch.float32, device=self.device)
        return t


class _FusedOptimizer(torch.optim.Optimizer):
    """Shared machinery of the tf8 optimizers: flat buckets, grad adoption, state dicts."""

    _tf8_fused_unscale = True  # step(grad_scale=...) unscales inside the kernel (used by tf8.LossScaler)

    def __init__(self, params, defaults: dict):
        self._buckets: list[_Bucket] = []
        self._device: Optional[torch.device] = None
        if defaults.get("seed") is None:
            # Data-parallel replicas must round their identical updates with identical bits:
            # under torch.distributed every rank takes rank 0's draw (one broadcast).
            drawn = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            defaults["seed"] = _distributed.broadcast_int(drawn, _distributed.resolve_group())
        super().__init__(params, defaults)

    # -- configuration -------------------------------------------------------------

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        raise NotImplementedError

    def _validate_group(self, group: dict) -> None:
        group["master_dtype"] = _parse_dtype(group["master_dtype"], _ops.MASTER_DTYPES, "master_dtype", True)
        group["state_dtype"] = _parse_dtype(group["state_dtype"], _ops.STATE_DTYPES, "state_dtype", False)
        if group["seed"] is None:
            group["seed"] = self.defaults["seed"]
        if group["rounding"] not in ROUNDINGS:
            raise ValueError(f"unknown rounding {group['rounding']!r}; use one of {ROUNDINGS}")
        check_seed(group["seed"], allow_none=True)  # None was replaced by the default; the message says it is allowed
        if not isinstance(group["lr"], (int, float)) or isinstance(group["lr"], bool) or not group["lr"] >= 0:
            raise ValueError(f"lr must be a float >= 0, got {group['lr']!r}")
        if not group["weight_decay"] >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']!r}")

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group; its parameters are converted to the master dtype and moved into flat buffers."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
            self._build_buckets(len(self.param_groups) - 1, group)
        except Exception:
            self.param_groups.pop()
            raise

    def _build_buckets(self, group_index: int, group: dict) -> None:
        by_dtype: dict = {}
        device = self._device
        for p in group["params"]:
            sharded = _is_dtensor(p)
            if sharded and group["master_dtype"] not in (None, p.dtype):
                raise TypeError(
                    f"a DTensor parameter of shape {tuple(p.shape)} (sharded by FSDP2 fully_shard) is {p.dtype}, "
                    f"master_dtype is {group['master_dtype']}: the sharding owns the storage and its dtype, so "
                    f"convert the model (model.to({group['master_dtype']})) before fully_shard, or pass "
                    f"master_dtype=None"
                )
            if not p.is_floating_point():
                raise TypeError(
                    f"tf8.optim optimizers update floating-point parameters only, got a {p.dtype} parameter "
                    f"of shape {tuple(p.shape)}; leave it out of the optimizer"
                )
            if device is None:
                device = p.device
            elif p.device != device:
                raise ValueError(
                    f"all parameters of a tf8.optim optimizer must be on one device, got {device} and {p.device}; "
                    f"use one optimizer per device"
                )
            owner = getattr(p, _OWNER_ATTR, None)
            if owner is not None and owner() is not None and owner() is not self:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} already belongs to another tf8.optim optimizer "
                    f"(its storage is that optimizer's flat buffer); use one optimizer per parameter"
                )
            dtype = group["master_dtype"] or p.dtype
            if dtype not in _ops.MASTER_DTYPES:
                raise ValueError(
                    f"unsupported parameter dtype {p.dtype} (shape {tuple(p.shape)}); master weights are "
                    f"torch.float16, torch.bfloat16 or torch.float32: pass master_dtype= to convert"
                )
            by_dtype.setdefault((dtype, _shard_salt(p) if sharded else 0), []).append(p)
        buckets = [_Bucket(len(self._buckets) + i, group_index, params, dtype, device, sharded=salt > 0, seed_salt=salt)
                   for i, ((dtype, salt), params) in enumerate(by_dtype.items())]
        for bucket in buckets:  # every value is checked before any parameter is rebound
            for p in bucket.params:
                if p.dtype != bucket.dtype and _gradient_accumulator_held(p):
                    raise RuntimeError(
                        f"a parameter of shape {tuple(p.shape)} would change dtype ({p.dtype} -> {bucket.dtype}) "
                        f"while something holds its gradient accumulator: DistributedDataParallel (whose "
                        f"gradient all-reduce would silently stop: build the tf8.optim optimizer BEFORE "
                        f"wrapping the model in DDP) or a live autograd graph (run or drop the pending "
                        f"backward first). Alternatively convert the model to {bucket.dtype} before wrapping it."
                    )
            bucket.fill()
        for bucket in buckets:
            bucket.rebind()
            for p in bucket.params:
                setattr(p, _OWNER_ATTR, weakref.ref(self))
        self._buckets += buckets
        self._device = device

    def master_buffers(self) -> list[torch.Tensor]:
        """The flat master-weight buffers (one per bucket); every parameter is a view into one of them."""
        return [b.flat_param for b in self._buckets]

    # -- state -----------------------------------------------------------------------

    def _ensure_state(self, bucket: _Bucket) -> None:
        """Allocate the bucket's flat state buffers (zeros) and the per-parameter state views."""
        group = self.param_groups[bucket.group_index]
        missing = [k for k in self._state_keys(group) if k not in bucket.state]
        for k in missing:
            bucket.state[k] = torch.zeros(bucket.total, dtype=group["state_dtype"], device=bucket.device)
        if missing:
            bucket.fresh_state = True  # a new momentum buffer starts as the gradient (torch semantics)
        if missing or not bucket.state_ready:
            for i, p in enumerate(bucket.params):
                st = self.state[p]
                st.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
                for k in missing:
                    st[k] = bucket.view(bucket.state[k], i)
            bucket.state_ready = True

    def prepare_grads(self) -> list[torch.Tensor]:
        """Move the gradients into the flat gradient buffers and return those buffers (one per bucket).

        Padding and the slots of parameters without a gradient hold zeros, so a reduction
        over a whole buffer (e.g. a non-finite check) sees exactly the present gradients.
        """
        out = []
        for bucket in self._buckets:
            if bucket.adopt_grads():
                out.append(bucket.flat_grad)
        return out

    def _inv_scales(self, bucket: _Bucket, members: list[int], grad_scale) -> torch.Tensor:
        n = len(members)
        if grad_scale is None:
            return bucket.ones(n)
        if isinstance(grad_scale, torch.Tensor):
            if grad_scale.numel() != 1:
                raise ValueError(f"grad_scale must hold one value, got shape {tuple(grad_scale.shape)}")
            inv = grad_scale.detach().to(bucket.device).double().reciprocal().float()
            return inv.reshape(1).expand(n).contiguous()
        if isinstance(grad_scale, dict):
            try:
                scales = [grad_scale[bucket.params[i]] for i in members]
            except KeyError:
                raise ValueError("grad_scale dict has no entry for a parameter that has a gradient") from None
            inv = torch.stack([s.detach().reshape(()).to(bucket.device) for s in scales])
            return inv.double().reciprocal().float().contiguous()
        raise TypeError(f"grad_scale must be a tensor, a dict {{param: tensor}} or None, got {type(grad_scale).__name__}")

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale=None):
        """One update of every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
            grad_scale: loss scale to divide the gradients by inside the kernel: a scalar
                tensor, or a dict {param: scalar tensor}; None for no unscaling.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for bucket in self._buckets:
            members = bucket.adopt_grads()
            if not members:
                continue
            self._ensure_state(bucket)
            inv = self._inv_scales(bucket, members, grad_scale)
            by_step: dict[int, list[int]] = defaultdict(list)
            for pos, i in enumerate(members):
                by_step[int(self.state[bucket.params[i]]["step"])].append(pos)
            group = self.param_groups[bucket.group_index]
            for step, positions in sorted(by_step.items()):
                idx = tuple(members[pos] for pos in positions)
                sub_inv = inv if len(positions) == len(members) else inv[torch.tensor(positions, device=inv.device)]
                seed = derive_seed(group["seed"], bucket.seed_index, step + 1)
                bucket.read_shards(idx)
                self._update(bucket, group, bucket.chunks(idx), sub_inv, seed, step + 1)
                bucket.write_back(idx)
                for i in idx:
                    self.state[bucket.params[i]]["step"] += 1
            bucket.fresh_state = False
        return loss

    def _update(self, bucket, group, chunks, inv_scales, seed, step) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer.state_dict``; the state of a DTensor parameter is a DTensor
        of the parameter's global shape and placements (its local shard: what this rank holds),
        so ``torch.distributed.checkpoint`` saves each rank's shard rather than one rank's."""
        out = super().state_dict()
        sharded = {p for b in self._buckets if b.sharded for p in b.params}
        if not sharded:
            return out
        from torch.distributed.tensor import DTensor

        params = [p for g in self.param_groups for p in g["params"]]
        for index, st in out["state"].items():
            p = params[index]
            if p in sharded:
                out["state"][index] = {
                    k: v if k == "step" else DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                                 shape=p.shape, stride=p.stride())
                    for k, v in st.items()}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of the same optimizer class and layout, copying into the flat buffers.

        Unlike ``torch.optim.Optimizer``, state tensors are not cast to the parameter dtype:
        they keep ``state_dtype`` (a saved state of another dtype is an error).
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, the optimizer {len(self.param_groups)}")
        id_map = {}
        for group, saved in zip(self.param_groups, saved_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("a param group of the state dict has a different number of parameters")
            for key in ("master_dtype", "state_dtype"):
                if saved.get(key) != group[key]:
                    raise ValueError(f"state dict has {key}={saved.get(key)}, this optimizer {group[key]}")
            id_map.update(zip(saved["params"], group["params"]))
        for group, saved in zip(self.param_groups, saved_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = value
        bucket_of = {p: b for b in self._buckets for p in b.params}
        # Detached copies first: the values may alias this optimizer's own buffers (the state
        # dict of this very optimizer, or DTensors that torch.distributed.checkpoint loaded
        # into them in place), which are zeroed below before the copy.
        saved_states = {
            pid: {k: (_local(v) if _is_dtensor(v) else v).clone() if isinstance(v, torch.Tensor) else v
                  for k, v in saved_state.items()}
            for pid, saved_state in state_dict["state"].items()
        }
        with torch.no_grad():
            for bucket in self._buckets:  # every parameter starts fresh, then the saved state is copied in
                self._ensure_state(bucket)
                for flat in bucket.state.values():
                    flat.zero_()
                for p in bucket.params:
                    self.state[p]["step"] = torch.tensor(0.0, dtype=torch.float32)
            for pid, saved_state in saved_states.items():
                if pid not in id_map:
                    raise ValueError(f"state dict has state for parameter index {pid}, which does not exist")
                p = id_map[pid]
                st = self.state[p]
                for key, value in saved_state.items():
                    if key == "step":
                        st["step"] = torch.tensor(float(value), dtype=torch.float32)
                    elif key in bucket_of[p].state:
                        if value.dtype != st[key].dtype or value.shape != st[key].shape:
                            raise ValueError(
                                f"state {key!r} of a parameter of shape {tuple(p.shape)} has {value.dtype} "
                                f"{tuple(value.shape)} in the state dict, expected {st[key].dtype} {tuple(st[key].shape)}"
                            )
                        st[key].copy_(value)
                    else:
                        raise ValueError(f"unknown optimizer state {key!r} in the state dict")
            for bucket in self._buckets:
                bucket.fresh_state = False


class SGD(_FusedOptimizer):
    """SGD with momentum, Nesterov and weight decay (torch.optim.SGD semantics), fused, 16-bit masters.

    Args:
        params: parameters or param groups (dicts may override any keyword below).
        lr, momentum, dampening, weight_decay, nesterov, maximize: as ``torch.optim.SGD``.
        master_dtype: torch.float16 / torch.bfloat16 / torch.float32, or None (keep each
            parameter's dtype). Parameters are converted in place when the group is added.
        state_dtype: dtype of the momentum buffer, torch.float32 or torch.bfloat16.
        rounding: "stochastic" or "nearest", how the fp32 update is written to 16-bit masters.
        seed: base seed of the stochastic rounding (int in [0, 2**63)); None draws one
            from torch's default generator.

    State per parameter: ``step`` (float32 CPU scalar, as torch) and, with momentum,
    ``momentum_buffer`` (a view into the flat state buffer).
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 master_dtype=None, state_dtype=torch.float32, rounding: str = "stochastic",
                 seed: Optional[int] = None):
        if not momentum >= 0:
            raise ValueError(f"momentum must be >= 0, got {momentum!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, master_dtype=master_dtype,
                        state_dtype=state_dtype, rounding=rounding, seed=seed)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        if not group["momentum"] >= 0:
            raise ValueError(f"momentum must be >= 0, got {group['momentum']!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _update(self, bucket, group, chunks, inv_scales, seed, step) -> None:
        has_momentum = group["momentum"] != 0
        buf = bucket.state["momentum_buffer"] if has_momentum else bucket.empty_state()
        _ops.sgd_update_(
            bucket.flat_param, bucket.flat_grad, buf, chunks, inv_scales, seed,
            float(group["lr"]), float(group["weight_decay"]), float(group["momentum"]), float(group["dampening"]),
            bool(group["nesterov"]), bool(group["maximize"]), step == 1 or bucket.fresh_state, has_momentum,
            group["rounding"] == "stochastic" and bucket.dtype != torch.float32,
        )


class AdamW(_FusedOptimizer):
    """AdamW (decoupled weight decay, torch.optim.AdamW semantics), fused, 16-bit master weights.

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW`` (amsgrad is not supported).
        master_dtype, state_dtype, rounding, seed: as :class:`SGD`; the state is
            ``exp_avg`` and ``exp_avg_sq`` (views into flat buffers) and ``step``.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, maximize: bool = False, master_dtype=None,
                 state_dtype=torch.float32, rounding: str = "stochastic", seed: Optional[int] = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
                        master_dtype=master_dtype, state_dtype=state_dtype, rounding=rounding, seed=seed)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
        if not group["eps"] >= 0:
            raise ValueError(f"eps must be >= 0, got {group['eps']!r}")

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _update(self, bucket, group, chunks, inv_scales, seed, step) -> None:
        beta1, beta2 = group["betas"]
        _ops.adamw_update_(
            bucket.flat_param, bucket.flat_grad, bucket.state["exp_avg"], bucket.state["exp_avg_sq"],
            chunks, inv_scales, seed, float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
            float(group["weight_decay"]), int(step), bool(group["maximize"]),
            group["rounding"] == "stochastic" and bucket.dtype != torch.float32,
        )
