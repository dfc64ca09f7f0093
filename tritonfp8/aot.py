"""Ahead-of-time compilation of every kernel for real GPUs, on a machine without one.

Each kernel module exposes ``aot_specs() -> list[KernelSpec]``: the kernel, its
argument types and one set of constexprs (a mode / autotune config). This module
compiles every spec for sm_89 (Ada), sm_90 (Hopper) and sm_100 (Blackwell) with
``triton.compile`` and a ``GPUTarget``, and reads off the result:

* registers, STACK (bytes spilled to local memory) and shared memory, from
  ``cuobjdump --dump-resource-usage`` on the cubin (cuobjdump ships in Triton's wheel);
* the fp8 tensor-core instruction in the PTX, for specs that must use one.

Run it as ``python -m tritonfp8.aot [--markdown FILE] [--json FILE] [--jobs N]``.
Triton must not be in interpreter mode (unset TRITON_INTERPRET): interpreted
kernels cannot be compiled.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from .ops.spec import KernelSpec

KERNEL_MODULES = ("tritonfp8.ops.quantize", "tritonfp8.ops.matmul", "tritonfp8.ops.attention", "tritonfp8.ops.optim")
TARGETS = (89, 90, 100)
# The fp8 MMA instruction that each target's PTX must contain.
FP8_MMA = {
    89: re.compile(r"mma\.sync\.aligned\.m16n8k32\S*\.e[45]m[23]\.e[45]m[23]"),
    90: re.compile(r"wgmma\.mma_async\S*\.e[45]m[23]\.e[45]m[23]"),
    100: re.compile(r"tcgen05\.mma\S*kind::f8f6f4"),
}


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    usage = {}
    for line in out.splitlines():
        if "REG:" in line:
            for key in ("REG", "STACK", "SHARED", "LOCAL"):
                m = re.search(rf"\b{key}:(\d+)", line)
                if m:
                    usage[key.lower()] = max(usage.get(key.lower(), 0), int(m.group(1)))
    return usage


def compile_spec(spec: KernelSpec, cc: int) -> dict:
    """Compile one spec for sm_<cc>; returns a row of the report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    row = {"name": spec.name, "target": f"sm_{cc}", "num_warps": spec.num_warps, "num_stages": spec.num_stages,
           "fp8_mma_required": spec.fp8_mma}
    options = dict(spec.extra)
    attrs = options.pop("attrs", None)
    no_spill_targets = options.pop("no_spill_targets", TARGETS)
    row["spill_checked"] = cc in no_spill_targets
    try:
        src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", cc, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages, **options},
        )
    except Exception as exc:  # reported, and failed by the test
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return row
    ptx = compiled.asm["ptx"]
    match = FP8_MMA[cc].search(ptx)
    row.update(
        ok=True,
        mma=match.group(0) if match else None,
        fma=bool(re.search(r"\bfma\.rn\.f32\b", ptx)),
        shared_bytes=compiled.metadata.shared,
        seconds=round(time.perf_counter() - start, 2),
        **_resource_usage(compiled.asm["cubin"]),
    )
    return row


def all_specs(modules=KERNEL_MODULES) -> list[tuple[str, int]]:
    """(module, index) of every spec of every kernel module."""
    out = []
    for mod_name in modules:
        specs = importlib.import_module(mod_name).aot_specs()
        out += [(mod_name, i) for i in range(len(specs))]
    return out


def _job(args) -> list[dict]:
    mod_name, index, targets = args
    spec = importlib.import_module(mod_name).aot_specs()[index]
    return [dict(compile_spec(spec, cc), module=mod_name) for cc in targets]


def run(modules=KERNEL_MODULES, targets=TARGETS, jobs: int = 2, name_filter: str = "") -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    work = [(m, i, tuple(targets)) for m, i in all_specs(modules)]
    if name_filter:
        work = [w for w in work if name_filter in importlib.import_module(w[0]).aot_specs()[w[1]].name]
    if jobs <= 1:
        results = [_job(w) for w in work]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_job, work))
    return [row for rows in results for row in rows]


def markdown(rows: list[dict]) -> str:
    import triton

    head = (
        f"# Kernels compiled ahead of time (Triton {triton.__version__})\n\n"
        "Generated by `python -m tritonfp8.aot --markdown <file>`; do not edit by hand.\n\n"
        "| kernel | target | warps | stages | registers | stack (spill) bytes | shared bytes | fp8 MMA instruction |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['name']} | {r['target']} | {r['num_warps']} | {r['num_stages']} | FAILED: {r.get('error')} | | | |")
            continue
        mma = f"`{r['mma']}`" if r.get("mma") else ("-" if not r["fp8_mma_required"] else "MISSING")
        lines.append(
            f"| {r['name']} | {r['target']} | {r['num_warps']} | {r['num_stages']} | {r.get('reg')} | "
            f"{r.get('stack')} | {r.get('shared_bytes')} | {mma} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tritonfp8.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write every row as JSON to this file")
    parser.add_argument("--markdown", help="write a markdown table to this file")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--filter", default="", help="only specs whose name contains this")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    args = parser.parse_args(argv)
    rows = run(targets=[int(t) for t in args.targets.split(",")], jobs=args.jobs, name_filter=args.filter)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows))
    if not args.json and not args.markdown:
        sys.stdout.write(markdown(rows))
    bad = [r for r in rows if not r.get("ok") or (r["spill_checked"] and r.get("stack", 0))
           or (r["fp8_mma_required"] and not r.get("mma"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
