"""What a kernel module declares for ahead-of-time compilation (``aot_specs()``), how a spec is
compiled for a GPU target and its cubin read; reported by :mod:`tritonfp8.aot` and
:mod:`tritonfp8.sass`."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field


# The GPU architectures every kernel is compiled for ahead of time: Ada, Hopper, Blackwell.
GPU_TARGETS = (89, 90, 100)


@dataclass
class KernelSpec:
    """One kernel configuration to compile.

    signature: every argument name -> Triton type ("*fp32", "*fp8e4nv", "i32", ...),
    "constexpr" for constexpr arguments (their values are in ``constexprs``).
    fp8_mma: True when the kernel must use fp8 tensor-core instructions.
    targets: the architectures this configuration runs on (a variant that uses the
    hardware fp8 conversion runs on sm_90+ only), so the ones it is compiled for.
    extra: further compile options (e.g. ``enable_fp_fusion=False`` for kernels whose
    fp32 arithmetic must match the reference operation by operation), plus two keys of
    its own: "attrs" (the argument attributes, e.g. 16-byte divisibility, that the JIT
    specializes at run time, so the compile sees what runs) and "no_spill_targets"
    (the targets on which the spec must not spill; default: all).
    """

    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    fp8_mma: bool = False
    extra: dict = field(default_factory=dict)
    targets: tuple = GPU_TARGETS


@dataclass
class Launch:
    """One kernel launch recorded by :func:`captured_launches`: ``kernel[grid](*args, **kwargs)``."""

    kernel: object
    args: tuple
    kwargs: dict
    grid: object


@contextlib.contextmanager
def captured_launches():
    """Record every compiled-mode Triton launch in the block instead of running it.

    Yields the list the launches are appended to. A launcher run on ``meta`` tensors
    under this context shows what it would launch on a GPU (arguments, constexprs,
    warps) without one: the recorded launch is then specialized by :func:`spec_from_launch`
    exactly as Triton's JIT would. Kernels built in interpreter mode are not recorded
    (they do not go through ``JITFunction.run``).
    """
    from triton.runtime.jit import JITFunction

    global _capturing
    launches: list = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid))

    JITFunction.run = record
    _capturing += 1
    try:
        yield launches
    finally:
        _capturing -= 1
        JITFunction.run = original


_capturing = 0  # > 0 inside captured_launches: kernels are recorded, not run


def capturing() -> bool:
    """True inside :func:`captured_launches` (nothing a launcher starts actually runs)."""
    return _capturing > 0


def spec_from_launch(name: str, launch: Launch, fp8_mma: bool = False, cc: int = 90, targets: tuple = GPU_TARGETS,
                     **extra) -> KernelSpec:
    """The :class:`KernelSpec` of a recorded launch, specialized by Triton's own JIT binder.

    Its argument types, the arguments the JIT turns into constants (integers equal
    to 1, e.g. unit strides) and the 16-divisibility hints of pointers and integers
    are what ``kernel[grid](...)`` would compile on an sm_<cc> GPU with these
    arguments (``meta`` tensors have address 0, i.e. aligned like CUDA allocations).
    ``extra`` adds compile options / the "no_spill_targets" key of ``KernelSpec.extra``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    parsed, signature, constexpr_paths, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization,
                                                                  options)
    names = kernel.arg_names
    if any(len(path) != 1 for path in constexpr_paths):
        raise NotImplementedError(f"{name}: tuple arguments are not supported by spec_from_launch")
    constexprs = {names[path[0]]: value for path, value in constexpr_paths.items()}
    compile_options = {k: v for k, v in options.items() if k not in ("num_warps", "num_stages")}
    return KernelSpec(
        name=name, kernel=kernel, signature=signature, constexprs=constexprs,
        num_warps=parsed.num_warps, num_stages=parsed.num_stages, fp8_mma=fp8_mma,
        extra={"attrs": attrs, **compile_options, **extra}, targets=targets,
    )


def launched_spec(name: str, launcher, *args, kernel=None, fp8_mma: bool = False, targets: tuple = GPU_TARGETS,
                  **extra) -> KernelSpec:
    """Run ``launcher(*args)`` (on ``meta`` tensors) under :func:`captured_launches` and return
    the spec of its launch of ``kernel`` (its only launch when ``kernel`` is None)."""
    with captured_launches() as launches:
        launcher(*args)
    chosen = [l for l in launches if kernel is None or l.kernel is kernel]
    if len(chosen) != 1:
        raise RuntimeError(f"{name}: expected one launch{' of ' + kernel.__name__ if kernel else ''}, "
                           f"recorded {[l.kernel.__name__ for l in launches]}")
    return spec_from_launch(name, chosen[0], fp8_mma=fp8_mma, targets=targets, **extra)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _cuobjdump_of(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([_cuobjdump(), flag, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def resource_usage(cubin: bytes) -> dict:
    """Registers, STACK (spilled bytes), shared and local memory of a cubin (cuobjdump)."""
    out = _cuobjdump_of(cubin, "--dump-resource-usage")
    usage = {}
    for line in out.splitlines():
        if "REG:" in line:
            for key in ("REG", "STACK", "SHARED", "LOCAL"):
                m = re.search(rf"\b{key}:(\d+)", line)
                if m:
                    usage[key.lower()] = max(usage.get(key.lower(), 0), int(m.group(1)))
    return usage


def build(spec: KernelSpec, cc: int):
    """``triton.compile`` of one spec for sm_<cc> (the compiled kernel: .asm, .metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = dict(spec.extra)
    attrs = options.pop("attrs", None)
    options.pop("no_spill_targets", None)
    src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages, **options})


def dump_sass(cubin: bytes) -> str:
    """``cuobjdump --dump-sass`` of a cubin."""
    return _cuobjdump_of(cubin, "--dump-sass")
