"""Which implementation runs an op.

* ``"triton"``: compiled Triton kernels; needs CUDA tensors.
* ``"interpret"``: the same Triton kernels run by Triton's CPU interpreter, on CPU
  (or CUDA) tensors. Selectable at any time: when Triton was imported in compiled
  mode, choosing it builds interpreted twins of the kernels and of the
  ``triton.language`` functions they call, and leaving it restores the compiled ones.
* ``"torch"``: the pure-PyTorch reference, on any device. On CPU tensors its
  element-wise numerics (casts, Philox, the optimizer update) run as loops fused
  by Inductor (``torch.compile``, C++ backend) from the same reference source:
  the same bits as the eager reference, about one pass over memory per cast.
  Without a C++ compiler, or with ``TRITONFP8_COMPILE=0``, the eager reference
  runs (and says so once).
* ``"auto"`` (default): "triton" for CUDA tensors (interpreted when Triton is in
  interpreter mode) and "torch" for CPU tensors.

Environment variables:

=====================  ====================================================
TRITONFP8_BACKEND       initial backend: auto / triton / interpret / torch
TRITON_INTERPRET        Triton's own switch, read at Triton's import; "1" runs every
                        kernel interpreted (the "interpret" backend does not need it)
TRITONFP8_COMPILE       "1" (default): the reference backend runs compiled on CPU
                        tensors; "0": always the eager reference
=====================  ====================================================
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from typing import Optional

BACKENDS = ("auto", "triton", "interpret", "torch")
_ENV = "TRITONFP8_BACKEND"

_requested = os.environ.get(_ENV, "auto").strip().lower() or "auto"
if _requested not in BACKENDS:
    raise ValueError(f"{_ENV}={_requested!r} is not a backend; use one of {BACKENDS}")


def triton_interprets() -> bool:
    """True when Triton runs kernels in its interpreter in this process."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.randint, InterpretedFunction)


def _check(name: str) -> str:
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; use one of {BACKENDS}")
    return name


_backend = _check(_requested)


def set_backend(name: str) -> None:
    """Choose the implementation of every op: "auto", "triton", "interpret" or "torch"."""
    global _backend
    _backend = _check(name)
    _interpreter.switch(_backend == "interpret")


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of :func:`set_backend`; restores the previous backend on exit."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


@contextlib.contextmanager
def _temporarily(name: str, value):
    """Set this module's global ``name`` to ``value`` inside the block; restore it on exit."""
    module = globals()
    previous = module[name]
    module[name] = value
    try:
        yield
    finally:
        module[name] = previous


def cuda_ok() -> tuple[bool, str]:
    """(available, reason): whether compiled Triton kernels can run here."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device is visible to torch"
    if triton_interprets():
        return False, "Triton runs in interpreter mode (TRITON_INTERPRET=1)"
    return fp8_tensor_cores(torch.device("cuda", torch.cuda.current_device()))


# fp8 tensor-core instructions: mma.sync e4m3/e5m2 from sm_89 (Ada), wgmma from sm_90.
FP8_MIN_CAPABILITY = (8, 9)


def fp8_tensor_cores(device) -> tuple[bool, str]:
    """(present, "sm_XY" or why not) for the CUDA device ``device``: the one probe of the
    compute capability that the compiled fp8 kernels need."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        return False, (f"fp8 tensor cores need compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} "
                       f"or newer, {device} has {major}.{minor}")
    return True, f"sm_{major}{minor}"


def resolve(device) -> str:
    """The backend that runs an op on tensors of ``device``: "triton", "interpret" or "torch"."""
    import torch

    device = torch.device(device)
    name = _backend
    if name == "auto":
        if device.type == "cuda":
            name = "interpret" if triton_interprets() else "triton"
        else:
            return "torch"
    if name == "interpret":
        _interpreter.ensure()
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
    interpreter's ``tensor.__index__`` at the array's single element. Idempotent;
    applied the first time an op runs interpreted, not at import.
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


class _RunTimeInterpreter:
    """Interpreted twins of the compiled ``@triton.jit`` functions, swapped in while the
    "interpret" backend is chosen.

    Triton decides at each function's decoration whether it is compiled (JITFunction) or
    interpreted (InterpretedFunction, under TRITON_INTERPRET=1). Kernels are launched, and
    device functions called, through module globals looked up at call time, so replacing
    every JITFunction in the namespaces of ``triton.language*`` and ``tritonfp8*`` by an
    InterpretedFunction of the same Python function runs the kernels interpreted; Triton's
    ``interpret`` knob is set meanwhile (constexpr functions return plain values under
    the interpreter). Modules imported later are swept when an op next runs interpreted.
    """

    _PACKAGES = ("triton.language", "tritonfp8")

    def __init__(self) -> None:
        self.native: Optional[bool] = None  # Triton's own mode, fixed at its import (read once)
        self.active = False
        self.swapped: list = []  # (namespace, name, the compiled function)
        self.swept: set = set()
        self.modules_seen = 0  # len(sys.modules) at the last sweep: ops sweep only after imports
        self.twins: dict = {}
        self.knob = None

    def _sweep(self) -> None:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        self.modules_seen = len(sys.modules)
        for module_name, module in list(sys.modules.items()):
            if module is None or module_name in self.swept:
                continue
            if not any(module_name == p or module_name.startswith(p + ".") for p in self._PACKAGES):
                continue
            self.swept.add(module_name)
            namespace = vars(module)
            for name, value in list(namespace.items()):
                if isinstance(value, JITFunction):
                    twin = self.twins.get(id(value))
                    if twin is None:
                        twin = self.twins[id(value)] = (value, InterpretedFunction(value.fn))
                    namespace[name] = twin[1]
                    self.swapped.append((namespace, name, value))

    def switch(self, on: bool) -> None:
        if on:
            self.ensure()
        elif self.active:
            from triton import knobs

            for namespace, name, compiled in reversed(self.swapped):
                namespace[name] = compiled
            self.swapped.clear()
            self.swept.clear()
            self.modules_seen = 0
            knobs.runtime.interpret = self.knob
            self.active = False

    def ensure(self) -> None:
        """Make every kernel run interpreted (a no-op when Triton itself interprets). Called by
        every op that runs interpreted, so its steady state is two checks."""
        if self.native is None:  # before any swap, so this reads Triton's own mode
            self.native = triton_interprets()
            if self.native:  # TRITON_INTERPRET=1 at Triton's import: nothing to swap
                _interpreter_loop_bounds()
        if self.native:
            return
        if not self.active:
            from triton import knobs

            self.knob = knobs.runtime.interpret
            knobs.runtime.interpret = True
            self.active = True
            _interpreter_loop_bounds()
        if len(sys.modules) != self.modules_seen:
            self._sweep()


_interpreter = _RunTimeInterpreter()


def ensure_interpreter() -> None:
    """Make every Triton kernel run interpreted from now on, as the "interpret" backend's ops
    do; for kernels launched directly rather than through an op (tests)."""
    _interpreter.ensure()


# ----------------------------------------------------------------------------
# The reference backend, compiled by Inductor on CPU tensors
# ----------------------------------------------------------------------------

_COMPILE_ENV = "TRITONFP8_COMPILE"
_compile_setting = os.environ.get(_COMPILE_ENV, "1").strip().lower()
if _compile_setting not in ("0", "1", "false", "true", "off", "on"):
    raise ValueError(f"{_COMPILE_ENV}={_compile_setting!r}: use 1 (compiled reference on CPU) or 0 (eager)")
_compile_enabled = _compile_setting in ("1", "true", "on")
_compile_broken = ""  # why compiling failed in this process ('' while it works)
# Each compiled reference is specialized on its modes (format, rounding, scaling kind): a
# test run meets more of them than Dynamo's default limit of 8 per function.
_RECOMPILE_LIMIT = 256
# Smaller tensors run eager: there a fused loop saves less than a graph costs to compile.
COMPILE_MIN_NUMEL = 1 << 14


def compile_enabled() -> bool:
    """Whether the reference backend runs its compiled form on CPU tensors now."""
    return _compile_enabled and not _compile_broken


def set_compile(enabled: bool) -> None:
    """Run the reference backend compiled (True, the default) or eager (False) on CPU tensors."""
    global _compile_enabled
    _compile_enabled = bool(enabled)


def use_compile(enabled: bool):
    """Context manager form of :func:`set_compile`; restores the previous setting on exit."""
    return _temporarily("_compile_enabled", bool(enabled))


def _give_up_compiling(error: BaseException) -> None:
    global _compile_broken
    _compile_broken = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    warnings.warn(
        "tritonfp8: the reference backend could not be compiled by torch.compile (Inductor needs a "
        f"C++ compiler such as g++); running the eager reference from now on, same bits, slower. "
        f"Set {_COMPILE_ENV}=0 to skip the attempt. Cause: {_compile_broken}",
        RuntimeWarning, stacklevel=3,
    )


def compiled_reference(fn):
    """``fn`` (a reference function of pure tensor ops) run through Inductor on CPU tensors.

    Shapes are dynamic; Python arguments (formats, modes) specialize a graph each. The
    wrapped function runs eager when compiling is off, when a tensor argument is not on the
    CPU (the reference also serves other devices), when no tensor argument has
    ``COMPILE_MIN_NUMEL`` elements, or once compiling has failed (warned once).
    ``fn.eager`` is the uncompiled function.
    """
    state = {}

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not compile_enabled() or not _large_cpu_tensors(args, kwargs):
            return fn(*args, **kwargs)
        if "compiled" not in state:
            import torch

            state["compiled"] = torch.compile(fn, dynamic=True, fullgraph=True)
        import torch._dynamo

        try:
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                result = state["compiled"](*args, **kwargs)
            run.compiled_calls += 1
            return result
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back to the same numerics
            if not _is_compile_failure(error):
                raise
            _give_up_compiling(error)
            return fn(*args, **kwargs)

    run.eager = fn
    run.compiled_calls = 0  # how often the compiled form ran (tests check that it did)
    return run


def _large_cpu_tensors(args, kwargs) -> bool:
    """All tensor arguments on the CPU, and one of them with COMPILE_MIN_NUMEL elements."""
    import torch

    largest = 0
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                return False
            largest = max(largest, value.numel())
    return largest >= COMPILE_MIN_NUMEL


def _is_compile_failure(error: BaseException) -> bool:
    """Errors of the compiler stack (no C++ compiler, an Inductor bug), not of the inputs."""
    import torch._dynamo.exc as dynamo_exc

    kinds = [dynamo_exc.BackendCompilerFailed, dynamo_exc.InternalTorchDynamoError]
    try:
        from torch._inductor.exc import CppCompileError, InductorError

        kinds += [CppCompileError, InductorError]
    except ImportError:  # older torch
        pass
    return isinstance(error, tuple(kinds)) or "CppCompileError" in type(error).__name__
