"""Compiled vs eager training step, per recipe, side by side in one run.

Arms per model (same weights, data and torch SGD; rounds interleaved so machine noise hits
every arm): fp32 eager, fp32 ``torch.compile``, and per recipe the eager step under
``fp8_autocast`` beside ``torch.compile(model, fullgraph=True)`` entered in the same region
(the default backend, Inductor: C++ on CPU, Triton on GPU). The fp8 products are torch.library
ops, so the compiled graph holds them as nodes; what compiling changes is the code around
them (norms, activations, residuals, reshapes, Python overhead), which Inductor fuses.

    python perf/bench_compile.py [--out perf/results/compile-<date>] [--rounds 5] [--quick]

Writes ``<out>.md`` and ``<out>.json`` (machine, versions, commit). "vs eager" is the
compiled step over the eager step of the same recipe, in this run.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine_info, write_results  # noqa: E402

import tritonfp8 as tf8  # noqa: E402

RECIPES = ["hybrid", "hybrid_delayed", "rowwise", "blockwise", "mxfp8", "mellempudi2019"]


def _mlp(features: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, features), nn.LayerNorm(features))


def _encoder(d_model: int, layers: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model, nhead=d_model // 64, dim_feedforward=4 * d_model, dropout=0.0,
                                       batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def models(quick: bool, device) -> dict:
    """name -> (model factory, input, target)."""
    g = torch.Generator().manual_seed(0)
    tokens, features, hidden = (256, 256, 1024) if quick else (1024, 512, 2048)
    batch, seq, d_model = (4, 64, 128) if quick else (8, 128, 256)
    return {
        f"MLP {tokens}x{features}->{hidden}": (lambda: _mlp(features, hidden),
                                                torch.randn(tokens, features, generator=g)),
        f"TransformerEncoder 2x d={d_model}, {batch}x{seq}": (lambda: _encoder(d_model, 2),
                                                             torch.randn(batch, seq, d_model, generator=g)),
    }


def step_arms(factory, x, device) -> dict:
    """arm name -> one training step (forward, backward, SGD) on its own copy of the model."""
    torch.manual_seed(0)
    base = factory().to(device)
    x = x.to(device)
    target = torch.randn_like(x)

    def make(recipe: str, compiled: bool):
        model = copy.deepcopy(base)
        run = torch.compile(model, fullgraph=True) if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            with tf8.fp8_autocast(recipe or "hybrid", enabled=bool(recipe)):
                loss = (run(x).float() - target).square().mean()
            loss.backward()
            opt.step()
        return step

    arms = {}
    for recipe in [""] + RECIPES:
        name = recipe or "fp32"
        arms[f"{name} eager"] = make(recipe, False)
        arms[f"{name} compiled"] = make(recipe, True)
    return arms


def measure(name, factory, x, device, rounds: int) -> list[dict]:
    arms = step_arms(factory, x, device)
    for step in arms.values():  # compile and warm up
        step()
        step()
    times = {arm: [] for arm in arms}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(rounds):
        for arm, step in arms.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[arm].append((time.perf_counter() - start) * 1e3)
    rows = []
    fp32 = statistics.median(times["fp32 eager"])
    for arm, t in times.items():
        recipe, mode = arm.rsplit(" ", 1)
        ms = statistics.median(t)
        eager = statistics.median(times[f"{recipe} eager"])
        rows.append({"model": name, "recipe": recipe, "mode": mode, "ms": ms, "vs eager": ms / eager,
                     "vs fp32 eager": ms / fp32, "detail": f"fwd+bwd+SGD, median of {rounds}"})
    return rows


def main() -> None:
    # 7 compiled copies of each model (fp32 and one per recipe) share its classes' code, and
    # each copy's layers are guarded by identity: one cache entry per copy.
    torch._dynamo.config.recompile_limit = 64
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      time.strftime("compile-%Y%m%d")))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name, (factory, x) in models(args.quick, device).items():
        rows += measure(name, factory, x, device, args.rounds)
        print(f"{name}: done", flush=True)
    write_results(args.out, rows, machine_info(), ["model", "recipe", "mode", "ms", "vs eager", "vs fp32 eager", "detail"])
    for r in rows:
        print(f"{r['model']:<40} {r['recipe']:<15} {r['mode']:<9} {r['ms']:8.1f} ms  {r['vs eager']:.2f}x eager")


if __name__ == "__main__":
    main()
