"""What a kernel module declares for ahead-of-time compilation (``aot_specs()``); compiled
and reported by :mod:`tritonfp8.aot`."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KernelSpec:
    """One kernel configuration to compile.

    signature: every argument name -> Triton type ("*fp32", "*fp8e4nv", "i32", ...),
    "constexpr" for constexpr arguments (their values are in ``constexprs``).
    fp8_mma: True when the kernel must use fp8 tensor-core instructions.
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


def signature_of(kernel, constexprs: dict, types: dict, default: str = "i32") -> dict:
    """Signature dict for ``kernel``: constexprs as "constexpr", ``types`` by name, else ``default``."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:
            sig[name] = default
    return sig
