"""The "current object" of nested ``with`` blocks (the loss scaler's overflow tracker, the
trainer's error-cast statistics), read by the fp8 modules' backward."""
from __future__ import annotations

import contextlib
from typing import Generic, Iterator, Optional, TypeVar

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
