"""The CPU path side by side, in one run: training step time, cast throughput, memory kept for backward.

Also the GEMM of a CPU product on its route beside plain fp32 ``a @ b``.

Arms (same model, data and optimizer settings; rounds interleaved so machine noise hits every arm):
fp32 eager, bf16 ``torch.autocast``, tritonfp8 per recipe under ``fp8_autocast`` (reference
backend: the Inductor-compiled reference on CPU tensors), and torchao.float8 with
``emulate=True`` when torchao is installed. ``mellempudi2019`` runs the whole method: fp8
products plus ``tf8.optim.SGD`` with fp16 master weights and stochastic rounding.

    python perf/bench_cpu.py [--out perf/results/cpu-<date>] [--rounds 5] [--quick]

Writes ``<out>.md`` and ``<out>.json`` (machine, versions, commit). Ratios are to fp32 eager
in the same run; on these 2-core machines absolute times move by 10-30% between runs.

glibc returns every freed buffer over 32 MB to the OS, so each such temporary costs page
faults on its next use (fresh 32 MB: about 10 ms here). The products decode their operands
into reused buffers for that reason; the remaining temporaries still make the ratios move a
little with the allocator. Run once as is and once with
``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296`` (heap reuse, what
jemalloc / tcmalloc give); the results record which.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench, machine_info, write_results  # noqa: E402

import tritonfp8 as tf8  # noqa: E402
from tritonfp8 import backend  # noqa: E402
from tritonfp8.ops.matmul import _exact_gemm  # noqa: E402

RECIPES = ["hybrid", "hybrid_delayed", "rowwise", "blockwise", "mxfp8", "mellempudi2019"]
MLP = (2048, 1024, 4096)  # batch, in/out features, hidden
CAST_SHAPE = (4096, 4096)
CAST_MODES = [  # (label, fmt, rounding, scaling, transpose)
    ("nearest none", "e5m2", "nearest", "none", False),
    ("nearest tensor +T", "e4m3", "nearest", "tensor", True),
    ("stochastic none", "e5m2", "stochastic", "none", False),
    ("stochastic none +T", "e5m2", "stochastic", "none", True),
    ("nearest row", "e4m3", "nearest", "row", False),
    ("nearest 1x128 +T", "e4m3", "nearest", (1, 128), True),
    ("nearest 128x128", "e4m3", "nearest", (128, 128), False),
    ("nearest mx", "e4m3", "nearest", "mx", False),
]


def _mlp(batch_features):
    batch, features, hidden = batch_features
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, features))


def _torchao_convert():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except Exception:  # noqa: BLE001 - not installed, or not importable with this torch
        return None
    return lambda model: convert_to_float8_training(model, config=Float8LinearConfig(emulate=True))


def step_arms(shape) -> dict:
    """name -> a function running one training step (forward, backward, optimizer) on a fresh model."""
    batch, features, _ = shape
    x = torch.randn(batch, features)
    target = torch.randn(batch, features)

    def make(kind: str, recipe: str = ""):
        model = _mlp(shape)
        if kind == "torchao":
            model = _torchao_convert()(model)
        if recipe == "mellempudi2019":
            opt = tf8.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, master_dtype=torch.float16,
                                rounding="stochastic")
        else:
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def loss():
            return (model(x).float() - target).square().mean()

        def step():
            opt.zero_grad(set_to_none=True)
            if kind == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    value = loss()
            elif kind == "fp8":
                with tf8.fp8_autocast(recipe=recipe):
                    value = loss()
            else:
                value = loss()
            value.backward()
            opt.step()
        return step

    arms = {"fp32 eager": make("fp32"), "bf16 autocast": make("bf16")}
    for recipe in RECIPES:
        arms[f"tritonfp8 {recipe}"] = make("fp8", recipe)
    if _torchao_convert() is not None:
        arms["torchao.float8 emulate"] = make("torchao")
    return arms


def measure_steps(shape, rounds: int) -> list[dict]:
    arms = step_arms(shape)
    for step in arms.values():  # compile / warm up
        step()
        step()
    times = {name: [] for name in arms}
    for _ in range(rounds):
        for name, step in arms.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times["fp32 eager"])
    return [{"benchmark": "MLP step", "case": name, "ms": statistics.median(t), "vs fp32": statistics.median(t) / base,
             "detail": f"batch {shape[0]}, {shape[1]}->{shape[2]}->{shape[1]}, fwd+bwd+SGD, median of {rounds}"}
            for name, t in times.items()]


def measure_casts(shape) -> list[dict]:
    x = torch.randn(shape)
    rows = []
    for label, fmt, rounding, scaling, transpose in CAST_MODES:
        def cast():
            tf8.quantize(x, fmt, rounding, scaling, seed=1, transpose=transpose)
        compiled_ms = bench(cast, warmup=2, reps=7)
        with backend.use_compile(False):
            eager_ms = bench(cast, warmup=1, reps=3)
        rows.append({"benchmark": "cast", "case": label, "ms": compiled_ms,
                     "Melem/s": x.numel() / compiled_ms / 1e3, "eager Melem/s": x.numel() / eager_ms / 1e3,
                     "detail": f"{shape[0]}x{shape[1]} fp32, compiled reference (eager reference alongside)"})
    return rows


def measure_gemms(shape, rounds: int) -> list[dict]:
    """The GEMM of a CPU product (decoded fp8 values, exact in bf16) on the route the reference
    takes (``_exact_gemm``) beside the plain fp32 ``a @ b`` (MKL), at the MLP's forward shape
    (b as the transposed view of a weight, as in a linear layer); interleaved, median of rounds."""
    batch, features, hidden = shape
    a = torch.randn(batch, features).to(torch.float8_e4m3fn).float()
    b = torch.randn(hidden, features).to(torch.float8_e4m3fn).float().t()
    routes = {"fp32 a @ b (MKL)": lambda: a @ b, "tritonfp8 product route": lambda: _exact_gemm(a, b, True)}
    times = {name: [] for name in routes}
    for _ in range(rounds):
        for name, fn in routes.items():
            times[name].append(bench(fn, warmup=1, reps=3))
    base = statistics.median(times["fp32 a @ b (MKL)"])
    return [{"benchmark": "GEMM", "case": name, "ms": statistics.median(t), "vs fp32": statistics.median(t) / base,
             "detail": f"[{batch}x{features}] @ [{features}x{hidden}] fp32, median of {rounds}"}
            for name, t in times.items()]


def saved_bytes(model: nn.Module, x: torch.Tensor, region=None) -> int:
    """Bytes that autograd keeps for backward: unique storages of saved tensors, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if region is None:
            out = model(x)
        else:
            with region:
                out = model(x)
    del out
    return sum(storages.values())


def measure_memory() -> list[dict]:
    torch.manual_seed(0)
    linear_stack = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])
    x_linear = torch.randn(2048, 1024, requires_grad=True)
    conv_stack = nn.Sequential(*[nn.Conv2d(32, 32, 3, padding=1) for _ in range(4)])
    x_conv = torch.randn(8, 32, 32, 32, requires_grad=True)
    rows = []
    for name, model, x in (("Linear stack", linear_stack, x_linear), ("3x3 Conv2d stack", conv_stack, x_conv)):
        fp32 = saved_bytes(model, x)
        rows.append({"benchmark": "saved for backward", "case": f"{name}: fp32", "MB": fp32 / 2**20, "vs fp32": 1.0,
                     "detail": _describe(model, x)})
        for recipe in ("hybrid", "mellempudi2019", "blockwise"):
            fp8 = saved_bytes(model, x, tf8.fp8_autocast(recipe=recipe))
            rows.append({"benchmark": "saved for backward", "case": f"{name}: {recipe}", "MB": fp8 / 2**20,
                         "vs fp32": fp8 / fp32, "detail": _describe(model, x)})
    return rows


def _describe(model, x) -> str:
    return f"{len(model)} x {type(model[0]).__name__}, input {tuple(x.shape)}; unique storages, parameters excluded"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=f"perf/results/cpu-{time.strftime('%Y%m%d')}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a small MLP and cast (a smoke run)")
    args = parser.parse_args()
    mlp = (256, 256, 512) if args.quick else MLP
    cast = (512, 512) if args.quick else CAST_SHAPE
    rows = measure_steps(mlp, args.rounds) + measure_gemms(mlp, args.rounds) + measure_casts(cast) + measure_memory()
    info = machine_info()
    info["compiled_reference"] = backend.compile_enabled()
    info["torchao"] = _torchao_version()
    info["malloc"] = ", ".join(f"{k}={os.environ[k]}" for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                               if k in os.environ) or "glibc defaults"
    write_results(args.out, rows, info, ["benchmark", "case", "ms", "vs fp32", "Melem/s", "eager Melem/s", "MB", "detail"])
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "detail"})


def _torchao_version() -> str:
    try:
        import torchao

        return torchao.__version__
    except Exception:  # noqa: BLE001
        return "not installed"


if __name__ == "__main__":
    main()
