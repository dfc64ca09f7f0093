"""Scaled fp8 product throughput.

On a GPU: TFLOP/s and fraction of the fp8 peak of ``tf8.scaled_mm`` for each operand scaling
(tensor, row/col, 1x128 x 128x128 blocks, mx), quantization of both operands excluded and
included, against cuBLAS bf16 / fp16 (``torch.matmul``) and cuBLASLt fp8 (``torch._scaled_mm``,
tensor-wise with and without fast accumulation, and row-wise), on square shapes 1024 to 16384
and on the six forward / backward products of a Llama-style layer (hidden 4096, FFN 14336,
8192 tokens: the attention output projection and the MLP up / down projections, each forward
x W^T, input gradient dy W and weight gradient dy^T x). All operands are K-major (a row-major
[M, K], b the transposed view of a row-major [N, K]), as the layer's products hand them over.
Goal on an H200 (per-tensor scaling, 8192^3): >= 1.6x cuBLAS bf16 and >= 0.9x cuBLASLt fp8.

On a CPU: the same table on small shapes (the reference backend and torch's CPU kernels),
to show that the script runs; the figures say nothing about a GPU.

Results are written after every shape, so a run cut short keeps what it measured.

    python perf/bench_gemm.py [--out perf/results/gemm_<date>] [--quick] [--sizes 1024,8192]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench, machine_info, write_results  # noqa: E402

import tritonfp8 as tf8  # noqa: E402
from tritonfp8.ops.matmul import transpose_view  # noqa: E402

# Dense datasheet peaks in TFLOP/s (fp8, bf16).
PEAKS = {"H200": (1979.0, 989.0), "H100": (1979.0, 989.0), "B200": (4500.0, 2250.0), "L40S": (733.0, 362.0)}
SCALINGS = {  # name: (a's scaling on x [M, K], the weight's on W [N, K])
    "tensor": ("tensor", "tensor"),
    "row": ("row", "row"),
    "block": ((1, 128), (128, 128)),
    "mx": ("mx", "mx"),
}
GPU_SQUARE = (1024, 2048, 4096, 8192, 16384)
CPU_SQUARE = (64, 128)
COLUMNS = ["product", "M", "N", "K", "impl", "quantization", "ms", "TFLOP/s", "fraction of fp8 peak",
           "vs bf16 matmul", "vs _scaled_mm fp8"]
# On a GPU torch.matmul is cuBLAS and torch._scaled_mm is cuBLASLt.
BF16_MATMUL = "torch.matmul bf16"
SCALED_MM_FP8 = "torch._scaled_mm fp8 tensor"


def llama_products(hidden: int, ffn: int, tokens: int) -> list[tuple[str, int, int, int]]:
    """(name, M, N, K) of the forward, input-gradient and weight-gradient products of three linear
    layers y = x W^T (W [out, in]): fwd [T, out] x [in]; dgrad [T, in] x [out]; wgrad [out, in] x [T]."""
    rows = []
    for layer, (out_f, in_f) in (("attn.o", (hidden, hidden)), ("mlp.up", (ffn, hidden)), ("mlp.down", (hidden, ffn))):
        rows += [(f"llama {layer} fwd", tokens, out_f, in_f), (f"llama {layer} dgrad", tokens, in_f, out_f),
                 (f"llama {layer} wgrad", out_f, in_f, tokens)]
    return rows


def _peaks():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAKS.items() if k in name), None)


def _copies(bytes_per_set: int) -> int:
    """Input sets to rotate through so that the working set is at least twice the L2 cache."""
    if not torch.cuda.is_available():
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 60 << 20)
    return max(1, min(32, math.ceil(2 * l2 / max(bytes_per_set, 1))))


def _rotating(sets: list, fn):
    """A closure that calls ``fn(*sets[i])`` for i = 0, 1, 2, ... in turn."""
    state = {"i": 0}

    def call():
        args = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(*args)

    return call


def measure_shape(product: str, m: int, n: int, k: int, scalings, device: str) -> list[dict]:
    """Every implementation on one [m, k] x [k, n] product; the high-precision sources are
    x [m, k] and W [n, k] (b = W^T, K-major)."""
    flops = 2.0 * m * n * k
    peaks = _peaks()
    hp = torch.bfloat16
    n_sets = _copies((m * k + n * k) * 2)
    sources = [(torch.randn(m, k, device=device, dtype=hp), torch.randn(n, k, device=device, dtype=hp))
               for _ in range(n_sets)]
    rows: list[dict] = []

    def record(impl, quant, fn):
        try:
            fn()  # compile, tune, warm up
            ms = bench(fn)
        except Exception as exc:  # an unsupported baseline on this machine is recorded, not fatal
            rows.append({"product": product, "M": m, "N": n, "K": k, "impl": impl, "quantization": quant,
                         "ms": f"unsupported: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"})
            return
        row = {"product": product, "M": m, "N": n, "K": k, "impl": impl, "quantization": quant, "ms": ms,
               "TFLOP/s": flops / ms / 1e9}
        if peaks:
            row["fraction of fp8 peak"] = row["TFLOP/s"] / peaks[0]
        rows.append(row)

    # cuBLAS / cuBLASLt baselines, on the same layouts.
    for dtype, name in ((torch.bfloat16, BF16_MATMUL), (torch.float16, "torch.matmul fp16")):
        ops = [(x.to(dtype), w.to(dtype)) for x, w in sources]
        record(name, "-", _rotating(ops, lambda x, w: torch.matmul(x, w.t())))
    fp8 = [(x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)) for x, w in sources]
    one = torch.ones((), device=device)
    for fast in (False, True):
        record(SCALED_MM_FP8 + (" fast-accum" if fast else ""), "excluded",
               _rotating(fp8, lambda a, w, fast=fast: torch._scaled_mm(a, w.t(), one, one, out_dtype=torch.bfloat16,
                                                                      use_fast_accum=fast)))
    sa, sb = torch.ones(m, 1, device=device), torch.ones(1, n, device=device)
    record("torch._scaled_mm fp8 row", "excluded",
           _rotating(fp8, lambda a, w: torch._scaled_mm(a, w.t(), sa, sb, out_dtype=torch.bfloat16)))

    # The SASS report's reference kernel: the same persistent TMA GEMM without promotion.
    if device == "cuda":
        from tritonfp8.ops import baseline

        sms = torch.cuda.get_device_properties(device).multi_processor_count
        record("reference kernel gemm no promotion 128x128x128", "excluded",
               _rotating(fp8, lambda a, w: baseline.gemm_no_promotion(a, w, one, one, sms=sms)))

    # tf8.scaled_mm, quantization excluded (operands quantized beforehand) and included.
    for name in scalings:
        sx, sw = SCALINGS[name]
        quantized = [(tf8.quantize(x, "e4m3", scaling=sx), transpose_view(tf8.quantize(w, "e4m3", scaling=sw)))
                     for x, w in sources]
        record(f"tf8.scaled_mm {name}", "excluded",
               _rotating(quantized, lambda a, b: tf8.scaled_mm(a, b, out_dtype=torch.bfloat16)))
        record(f"tf8.scaled_mm {name}", "included", _rotating(sources, lambda x, w, sx=sx, sw=sw: tf8.scaled_mm(
            tf8.quantize(x, "e4m3", scaling=sx), transpose_view(tf8.quantize(w, "e4m3", scaling=sw)),
            out_dtype=torch.bfloat16)))

    def ms_of(impl):
        return next((r["ms"] for r in rows if r["impl"] == impl and isinstance(r["ms"], float)), None)

    bf16_ms, lt_ms = ms_of(BF16_MATMUL), ms_of(SCALED_MM_FP8)
    for r in rows:
        if isinstance(r["ms"], float):
            if bf16_ms:
                r["vs bf16 matmul"] = bf16_ms / r["ms"]
            if lt_ms:
                r["vs _scaled_mm fp8"] = lt_ms / r["ms"]
    return rows


def goal(rows: list[dict]) -> str:
    """The H200 goal on 8192^3 with per-tensor scaling (quantization excluded)."""
    r = next((r for r in rows if (r["M"], r["N"], r["K"]) == (8192, 8192, 8192)
              and r["impl"] == "tf8.scaled_mm tensor" and r["quantization"] == "excluded"
              and isinstance(r["ms"], float)), None)
    if r is None or "vs bf16 matmul" not in r:
        return "not measured"
    ok = r["vs bf16 matmul"] >= 1.6 and r.get("vs _scaled_mm fp8", 0.0) >= 0.9
    return (f"8192^3 tensor: {r['vs bf16 matmul']:.2f}x torch.matmul bf16 (goal 1.6), "
            f"{r.get('vs _scaled_mm fp8', float('nan')):.2f}x torch._scaled_mm fp8 (goal 0.9): "
            f"{'met' if ok else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write <out>.json and <out>.md (after every shape)")
    parser.add_argument("--quick", action="store_true", help="8192^3 and the Llama forward products only")
    parser.add_argument("--sizes", help="comma-separated square sizes (default 1024..16384 on GPU, 64,128 on CPU)")
    parser.add_argument("--scalings", default=",".join(SCALINGS), help=f"subset of {','.join(SCALINGS)}")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    scalings = [s for s in args.scalings.split(",") if s]
    unknown = set(scalings) - set(SCALINGS)
    if unknown:
        parser.error(f"unknown scalings {sorted(unknown)}; use {list(SCALINGS)}")
    if args.sizes:
        square = tuple(int(s) for s in args.sizes.split(","))
    else:
        square = GPU_SQUARE if gpu else CPU_SQUARE
        if args.quick:
            square = (8192,) if gpu else square[:1]
    llama = llama_products(4096, 14336, 8192) if gpu else llama_products(128, 256, 64)[3:6]  # CPU: mlp.up
    if args.quick:
        llama = [p for p in llama if p[0].endswith("fwd")]
    shapes = [("square", s, s, s) for s in square] + llama
    info = machine_info()
    info["backend"] = ("triton (compiled); torch.matmul = cuBLAS, torch._scaled_mm = cuBLASLt" if gpu
                       else "torch reference and torch's CPU kernels")
    rows: list[dict] = []
    for product, m, n, k in shapes:
        new = measure_shape(product, m, n, k, scalings, device)
        rows += new
        for r in new:
            print(", ".join(f"{c}={r[c]:.4g}" if isinstance(r[c], float) else f"{c}={r[c]}" for c in COLUMNS if c in r),
                  flush=True)
        info["goal"] = goal(rows)
        if args.out:
            write_results(args.out, rows, info, COLUMNS)
    print(f"goal: {info['goal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
