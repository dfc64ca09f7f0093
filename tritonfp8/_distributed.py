"""The few collectives tritonfp8 itself issues under ``torch.distributed``.

Replicas stay identical only if every rank takes the same decisions: the loss scaler's
skip / back-off (its overflow flags are per rank: a saturated error cast is seen by the
rank whose batch produced it), the adaptive scaler's per-layer factors (computed from
each rank's own errors, but gradients scaled by them are summed across ranks), and the
optimizers' default seed (drawn from each rank's RNG), and delayed scaling's amax
histories (each rank casts its own batch). Each decision costs one small collective on
the process group, issued by every rank at the same point of its step.
"""
from __future__ import annotations

import torch

try:
    import torch.distributed as dist
except ImportError:  # a torch built without distributed support
    dist = None


def resolve_group(group=None):
    """The process group to agree over, or None when this process runs alone.

    ``group`` None means the default group when ``torch.distributed`` is initialized;
    ``False`` means no agreement (each rank decides alone).
    """
    if group is False or dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    group = dist.group.WORLD if group is None else group
    return group if dist.get_world_size(group) > 1 else None


def _device(group) -> torch.device:
    """Where a collective's tensor must live for ``group``'s backend (NCCL: the current GPU)."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_any(flag: bool, group) -> bool:
    """True on every rank if ``flag`` is True on any rank of ``group`` (one all-reduce)."""
    if group is None:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _agree_(t: torch.Tensor, group, op: str) -> torch.Tensor:
    """All-reduce ``t`` in place with ``dist.ReduceOp.<op>`` over ``group`` (None: alone, unchanged)."""
    if group is None:
        return t
    device = _device(group)
    buf = t if t.device == device else t.to(device)
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, op), group=group)
    if buf is not t:
        t.copy_(buf)
    return t


def agree_min_(t: torch.Tensor, group) -> torch.Tensor:
    """Replace the values of ``t`` by their minimum over the ranks of ``group``, in place."""
    return _agree_(t, group, "MIN")


def agree_max_(t: torch.Tensor, group) -> torch.Tensor:
    """Replace the values of ``t`` by their maximum over the ranks of ``group``, in place."""
    return _agree_(t, group, "MAX")


def broadcast_int(value: int, group, src_rank: int = 0) -> int:
    """The value of rank ``src_rank`` (a rank of ``group``), on every rank."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device(group))
    dist.broadcast(t, src=dist.get_global_rank(group, src_rank), group=group)
    return int(t.item())

