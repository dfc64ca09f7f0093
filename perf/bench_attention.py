"""Attention throughput: tf8's fp8 attention vs torch's scaled_dot_product_attention.

On a GPU: TFLOP/s of the forward and of forward + backward (bf16 inputs; the casts of
q, k, v and dO to fp8 are inside the timed region, as they are inside the op), with the
fraction of the dense fp8 peak, against ``F.scaled_dot_product_attention`` on bf16 with the
flash backend (fraction of the bf16 peak). FLOPs count the four N x N x D products
(4 B H N_q N_k D, halved when causal) and 2.5 times that for the backward.
On a CPU: the reference backend on a small shape, time relative to fp32 SDPA.

    python perf/bench_attention.py [--out perf/results/attention_<date>] [--seq 1024,4096]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench, machine_info, write_results  # noqa: E402

from tritonfp8 import backend  # noqa: E402
from tritonfp8.ops.attention import attention  # noqa: E402

PEAK_TFLOPS = {"H200": {"fp8": 1979.0, "bf16": 989.0}, "H100": {"fp8": 1979.0, "bf16": 989.0}}  # dense, datasheet
COLUMNS = ["op", "mode", "shape", "causal", "dtype", "ms", "TFLOP/s", "fraction of peak", "vs baseline"]


def _peak(kind: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v[kind] for k, v in PEAK_TFLOPS.items() if k in name), None)


def attention_flops(b: int, h: int, n_q: int, n_k: int, d: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * b * h * n_q * n_k * d * (0.5 if causal else 1.0)
    return fwd if mode == "fwd" else 3.5 * fwd


def _reference_kernel_row(q, k, v, b, h, n, d) -> dict:
    """The SASS report's reference attention (hardware-converted P, the shipped tiles) on fp8 q, k, v."""
    from tritonfp8.ops import attention as at
    from tritonfp8.ops import baseline

    t = at.pick_config(d).fwd
    q8, k8 = q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn)
    vt8 = v.to(torch.float8_e4m3fn).transpose(2, 3).contiguous()
    ms = bench(lambda: baseline.attention_fwd_hw_p(q8, k8, vt8, d ** -0.5, t.rows, t.cols, t.num_warps, t.num_stages))
    tflops = attention_flops(b, h, n, n, d, False, "fwd") / ms / 1e9
    row = {"op": "reference kernel attention fwd hw P (quantization excluded)", "mode": "fwd",
           "shape": f"{b}x{h}x{n}x{d}", "causal": False, "dtype": "float8_e4m3fn", "ms": ms, "TFLOP/s": tflops}
    if _peak("fp8"):
        row["fraction of peak"] = tflops / _peak("fp8")
    return row


def _sdpa(q, k, v, causal):
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def bench_attention(shapes=None, modes=("fwd", "fwd+bwd"), device: str | None = None) -> list[dict]:
    """Time tf8 attention and the SDPA baseline on each (B, H, N, D, causal) of ``shapes``.

    Defaults: on CUDA, B=4, H=16, N in (1024, 4096), D in (64, 128), both masks, bf16 inputs
    against SDPA flash (bf16); on CPU, B=1, H=2, N=256, D=64 in fp32 against fp32 SDPA.
    Returns one row per (shape, mode, implementation); "vs baseline" is the baseline's time
    divided by this row's (above 1: faster than the baseline).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if shapes is None:
        if on_gpu:
            shapes = [(4, 16, n, d, c) for n in (1024, 4096) for d in (64, 128) for c in (False, True)]
        else:
            shapes = [(1, 2, 256, 64, False), (1, 2, 256, 64, True)]
    baseline_name = "SDPA flash bf16" if on_gpu else "SDPA fp32"
    rows = []
    for b, h, n, d, causal in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen) for _ in range(4))
        for mode in modes:
            times = {}
            ours = f"tf8 fp8 attention ({backend.resolve(device)})"
            for name, fn in ((ours, attention), (baseline_name, _sdpa)):
                if mode == "fwd":
                    def run(fn=fn):
                        with torch.no_grad():
                            return fn(q, k, v, causal)
                else:
                    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))

                    def run(fn=fn, qg=qg, kg=kg, vg=vg):
                        return torch.autograd.grad(fn(qg, kg, vg, causal), (qg, kg, vg), do)
                ms = bench(run)
                times[name] = ms
                tflops = attention_flops(b, h, n, n, d, causal, mode) / ms / 1e9
                peak = _peak("fp8" if name.startswith("tf8") else "bf16")
                row = {"op": name, "mode": mode, "shape": f"{b}x{h}x{n}x{d}", "causal": causal,
                       "dtype": str(dtype).replace("torch.", ""), "ms": ms, "TFLOP/s": tflops}
                if peak:
                    row["fraction of peak"] = tflops / peak
                rows.append(row)
            if on_gpu and mode == "fwd" and not causal and d == 128:
                rows.append(_reference_kernel_row(q, k, v, b, h, n, d))
            new = rows[-3:] if rows[-1]["op"].startswith("reference kernel") else rows[-2:]
            for row in new:
                if row["op"] in times:
                    row["vs baseline"] = times[baseline_name] / row["ms"]
                print(", ".join(f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}" for key, val in row.items()),
                      flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write <out>.json and <out>.md")
    parser.add_argument("--seq", help="comma-separated sequence lengths (default 1024,4096 on GPU, 256 on CPU)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    args = parser.parse_args()
    shapes = None
    if args.seq or args.batch or args.heads:
        on_gpu = torch.cuda.is_available()
        seqs = [int(s) for s in args.seq.split(",")] if args.seq else ([1024, 4096] if on_gpu else [256])
        b = args.batch or (4 if on_gpu else 1)
        h = args.heads or (16 if on_gpu else 2)
        dims = (64, 128) if on_gpu else (64,)
        shapes = [(b, h, n, d, c) for n in seqs for d in dims for c in (False, True)]
    rows = bench_attention(shapes)
    if args.out:
        write_results(args.out, rows, machine_info(), COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
