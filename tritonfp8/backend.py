"""Which implementation runs an op.

* ``"triton"``: compiled Triton kernels; needs CUDA tensors.
* ``"interpret"``: the same Triton kernels run by Triton's CPU interpreter.
  Triton decides between compiled and interpreted kernels when it is imported
  (``TRITON_INTERPRET=1``), so this backend needs ``TRITONFP8_BACKEND=interpret``
  (or ``TRITON_INTERPRET=1``) in the environment before ``import tritonfp8``.
* ``"torch"``: the pure-PyTorch reference, on any device.
* ``"auto"`` (default): "triton" for CUDA tensors (interpreted when Triton is in
  interpreter mode) and "torch" for CPU tensors.

Environment variables:

=====================  ====================================================
TRITONFP8_BACKEND       initial backend: auto / triton / interpret / torch
TRITON_INTERPRET        Triton's own switch; "1" runs every kernel interpreted
=====================  ====================================================
"""
from __future__ import annotations

import contextlib
import os
import sys

BACKENDS = ("auto", "triton", "interpret", "torch")
_ENV = "TRITONFP8_BACKEND"

_requested = os.environ.get(_ENV, "auto").strip().lower() or "auto"
if _requested not in BACKENDS:
    raise ValueError(f"{_ENV}={_requested!r} is not a backend; use one of {BACKENDS}")
if _requested == "interpret" and "triton" not in sys.modules:
    # Must happen before Triton is imported: Triton builds its own JIT functions
    # (tl.randint among them) interpreted or compiled at import time.
    os.environ["TRITON_INTERPRET"] = "1"


def triton_interprets() -> bool:
    """True when Triton runs kernels in its interpreter in this process."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.randint, InterpretedFunction)


def _check(name: str) -> str:
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; use one of {BACKENDS}")
    if name == "interpret" and not triton_interprets():
        raise RuntimeError(
            "the 'interpret' backend needs Triton's interpreter, which Triton fixes when it is imported: "
            "set TRITONFP8_BACKEND=interpret (or TRITON_INTERPRET=1) in the environment before importing tritonfp8"
        )
    return name


_backend = _check(_requested)


def set_backend(name: str) -> None:
    """Choose the implementation of every op: "auto", "triton", "interpret" or "torch"."""
    global _backend
    _backend = _check(name)


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of :func:`set_backend`; restores the previous backend on exit."""
    global _backend
    previous = _backend
    _backend = _check(name)
    try:
        yield
    finally:
        _backend = previous


def cuda_ok() -> tuple[bool, str]:
    """(available, reason): whether compiled Triton kernels can run here."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    if triton_interprets():
        return False, "Triton runs in interpreter mode (TRITON_INTERPRET=1)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return False, f"fp8 tensor cores need compute capability 8.9 or newer, this GPU has {major}.{minor}"
    return True, f"sm_{major}{minor}"


def resolve(device) -> str:
    """The backend that runs an op on tensors of ``device``: "triton", "interpret" or "torch"."""
    import torch

    device = torch.device(device)
    name = _backend
    if name == "auto":
        if device.type == "cuda":
            return "interpret" if triton_interprets() else "triton"
        return "torch"
    if name == "triton" and device.type != "cuda":
        raise RuntimeError(
            f"backend 'triton' runs compiled kernels on CUDA tensors, got a {device.type} tensor; "
            "move the tensor to a GPU, or use set_backend('torch') (reference) or 'interpret'"
        )
    return name


def _interpreter_loop_bounds() -> None:
    """Let the Triton interpreter loop over runtime bounds (``range(0, K, BLOCK_K)``).

    Triton 3.6's interpreter turns a loop bound into a Python int with
    ``int(array of shape (1,))``, a TypeError since NumPy 2.4. This re-points the
    interpreter's ``tensor.__index__`` at the array's single element. Idempotent.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "tritonfp8_loop_bounds", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.tritonfp8_loop_bounds = True
    interpreter._patch_lang_tensor = patched


if triton_interprets():
    _interpreter_loop_bounds()
