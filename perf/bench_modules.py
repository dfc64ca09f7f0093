"""FP8 modules, forward + backward, against their PyTorch counterparts.

On a GPU: tf8.nn.Linear / tf8.nn.Conv2d / tf8.nn.functional.attention (each
recipe that applies) vs nn.Linear (cuBLAS), nn.Conv2d (cuDNN, channels_last) and
F.scaled_dot_product_attention (flash) in bf16. On a CPU: small shapes, the fp8
path (reference backend) relative to fp32.

    python perf/bench_modules.py [--out perf/results/modules-<date>]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench, machine_info, write_results  # noqa: E402

import tritonfp8 as tf8  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
BASE_DTYPE = torch.bfloat16 if GPU else torch.float32
LINEAR_SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336)] if GPU else [(256, 256, 256)]  # tokens, in, out
CONV_SHAPES = [(64, 256, 256, 28, 3)] if GPU else [(4, 32, 32, 16, 3)]  # batch, in, out, size, kernel
ATTN_SHAPES = [(4, 32, 4096, 128)] if GPU else [(1, 2, 128, 64)]  # batch, heads, seq, head dim
RECIPES = ["hybrid", "rowwise", "blockwise", "mellempudi2019"]


def _fwd_bwd(fn, *inputs):
    def run():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    return run


def _row(kind, shape, impl, ms, flops, base_ms):
    row = {"module": kind, "shape": shape, "impl": impl, "ms": ms, "speedup vs base": base_ms / ms}
    if GPU:
        row["TFLOP/s"] = flops / ms / 1e9
    print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def bench_linear(rows):
    for t, k, n in LINEAR_SHAPES:
        x = torch.randn(t, k, device=DEVICE, dtype=BASE_DTYPE, requires_grad=True)
        base = nn.Linear(k, n, device=DEVICE, dtype=BASE_DTYPE)
        flops = 3 * 2 * t * k * n
        base_ms = bench(_fwd_bwd(base, x))
        shape = f"{t}x{k}->{n}"
        rows.append(_row("linear", shape, f"torch {str(BASE_DTYPE)[6:]}", base_ms, flops, base_ms))
        for recipe in RECIPES:
            layer = tf8.nn.Linear(k, n, device=DEVICE, dtype=BASE_DTYPE, recipe=recipe)
            rows.append(_row("linear", shape, f"tf8 {recipe}", bench(_fwd_bwd(layer, x)), flops, base_ms))


def bench_conv(rows):
    for b, c, o, hw, ks in CONV_SHAPES:
        x = torch.randn(b, c, hw, hw, device=DEVICE, dtype=BASE_DTYPE, requires_grad=True)
        base = nn.Conv2d(c, o, ks, padding=ks // 2, device=DEVICE, dtype=BASE_DTYPE)
        xb = x
        if GPU:
            base = base.to(memory_format=torch.channels_last)
            xb = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        flops = 3 * 2 * b * hw * hw * o * c * ks * ks
        base_ms = bench(_fwd_bwd(base, xb))
        shape = f"{b}x{c}x{hw}x{hw}->{o} k{ks}"
        rows.append(_row("conv2d", shape, f"torch {str(BASE_DTYPE)[6:]}" + (" channels_last" if GPU else ""), base_ms, flops, base_ms))
        for recipe in ("hybrid", "blockwise"):
            conv = tf8.nn.Conv2d(c, o, ks, padding=ks // 2, device=DEVICE, dtype=BASE_DTYPE, recipe=recipe)
            rows.append(_row("conv2d", shape, f"tf8 {recipe}", bench(_fwd_bwd(conv, x)), flops, base_ms))


def bench_attention(rows):
    for b, h, n, d in ATTN_SHAPES:
        q, k, v = (torch.randn(b, h, n, d, device=DEVICE, dtype=BASE_DTYPE, requires_grad=True) for _ in range(3))
        flops = 3.5 * 4 * b * h * n * n * d  # forward: two N x N x D products per head; backward: 2.5x forward
        base_ms = bench(_fwd_bwd(F.scaled_dot_product_attention, q, k, v))
        shape = f"{b}x{h}x{n}x{d}"
        rows.append(_row("attention", shape, "torch SDPA " + str(BASE_DTYPE)[6:], base_ms, flops, base_ms))
        ms = bench(_fwd_bwd(lambda a, bb, c: tf8.nn.functional.attention(a, bb, c), q, k, v))
        rows.append(_row("attention", shape, "tf8 fp8 flash", ms, flops, base_ms))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write <out>.json and <out>.md")
    args = parser.parse_args()
    rows: list[dict] = []
    bench_linear(rows)
    bench_conv(rows)
    bench_attention(rows)
    if args.out:
        write_results(args.out, rows, machine_info(), ["module", "shape", "impl", "ms", "speedup vs base", "TFLOP/s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
