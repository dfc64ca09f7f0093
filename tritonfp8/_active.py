"""Shared plumbing of the loss scaler's overflow tracker and the trainer's error-cast
statistics: the "current object" of nested ``with`` blocks, read by the fp8 modules'
backward, and int64 counters kept on each device until the host reads them.

The two stacks live here, below every layer, so that the fp8 layers (``tritonfp8.nn``)
read the current tracker / collector without importing the training layer that
defines them (``training.tracking``, ``trainer.collecting`` push onto them)."""
from __future__ import annotations

import contextlib
from typing import Generic, Iterator, Optional, TypeVar

import torch

T = TypeVar("T")


class ActiveStack(Generic[T]):
    """Objects made current by nested :meth:`active` blocks; the innermost one is :meth:`current`.

    Not thread-local on purpose: autograd runs the backward of CUDA ops on its own device
    thread, and that backward must see the object the training step made current.
    """

    def __init__(self) -> None:
        self._items: list[T] = []

    @contextlib.contextmanager
    def active(self, item: T) -> Iterator[T]:
        self._items.append(item)
        try:
            yield item
        finally:
            self._items.remove(item)

    def current(self) -> Optional[T]:
        return self._items[-1] if self._items else None


class DeviceCounters:
    """``width`` int64 counters per device; adding to them queues device work only, and
    :meth:`_totals` sums them over devices on the host (one sync per device)."""

    def __init__(self, width: int) -> None:
        self._width = width
        self._counts: dict[torch.device, torch.Tensor] = {}

    def _slot(self, device) -> torch.Tensor:
        device = torch.device(device)
        c = self._counts.get(device)
        if c is None:
            c = self._counts[device] = torch.zeros(self._width, dtype=torch.int64, device=device)
        return c

    def _totals(self) -> list[int]:
        total = [0] * self._width
        for c in self._counts.values():
            total = [a + b for a, b in zip(total, c.tolist())]
        return total

    def reset(self) -> None:
        for c in self._counts.values():
            c.zero_()


# The innermost OverflowTracker of a training.tracking() block (a LossScaler's, or the Trainer's).
OVERFLOW_TRACKERS: ActiveStack = ActiveStack()
# The innermost ErrorCastStats of a trainer.collecting() block.
ERROR_COLLECTORS: ActiveStack = ActiveStack()
