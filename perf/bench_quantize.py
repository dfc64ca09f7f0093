"""Cast throughput.

On a GPU: GB/s of every cast mode of ``tf8.quantize`` (bytes read + written),
as a fraction of HBM bandwidth, against ``x.to(torch.float8_e4m3fn)`` (a plain
cast, no scaling, no counting), a torch.compile'd per-tensor scaled cast and the
SASS report's reference kernels (``tritonfp8.ops.baseline``).
On a CPU: the reference backend's elements per second on a small tensor.

    python perf/bench_quantize.py [--out perf/results/quantize_<date>] [--size 8192]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench, machine_info, write_results  # noqa: E402

import tritonfp8 as tf8  # noqa: E402

HBM_GBPS = {"H200": 4800.0, "H100": 3350.0}  # datasheet peak
MODES = [
    ("e4m3 none nearest", dict(fmt="e4m3")),
    ("e4m3 tensor nearest", dict(fmt="e4m3", scaling="tensor")),
    ("e4m3 tensor nearest +T", dict(fmt="e4m3", scaling="tensor", transpose=True)),
    ("e4m3 tensor stochastic", dict(fmt="e4m3", scaling="tensor", rounding="stochastic", seed=1)),
    ("e4m3 row nearest", dict(fmt="e4m3", scaling="row")),
    ("e4m3 1x128 nearest", dict(fmt="e4m3", scaling=(1, 128))),
    ("e4m3 1x128 nearest +T", dict(fmt="e4m3", scaling=(1, 128), transpose=True)),
    ("e4m3 128x128 nearest", dict(fmt="e4m3", scaling=(128, 128))),
    ("e4m3 128x128 stochastic", dict(fmt="e4m3", scaling=(128, 128), rounding="stochastic", seed=1)),
    ("e4m3 mx nearest", dict(fmt="e4m3", scaling="mx")),
    ("e5m2 none nearest", dict(fmt="e5m2")),
    ("e5m2 none stochastic", dict(fmt="e5m2", rounding="stochastic", seed=1)),
    ("e5m2 none stochastic +T", dict(fmt="e5m2", rounding="stochastic", seed=1, transpose=True)),
]


def _bytes(x: torch.Tensor, transpose: bool) -> int:
    return x.numel() * (x.element_size() + (2 if transpose else 1))


def _peak_gbps() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in HBM_GBPS.items() if k in name), None)


def run(size: int) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(size, size, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    peak = _peak_gbps()
    rows = []

    def record(name, fn, transpose=False):
        ms = bench(fn)
        gbps = _bytes(x, transpose) / ms / 1e6
        row = {"op": name, "shape": f"{size}x{size}", "dtype": str(x.dtype).replace("torch.", ""), "ms": ms,
               "GB/s": gbps, "Gelem/s": x.numel() / ms / 1e6}
        if peak:
            row["fraction of HBM"] = gbps / peak
        rows.append(row)
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    for name, kwargs in MODES:
        record(f"tf8.quantize {name}", lambda kw=kwargs: tf8.quantize(x, **kw), kwargs.get("transpose", False))
    if device == "cuda":
        record("baseline x.to(float8_e4m3fn)", lambda: x.to(torch.float8_e4m3fn))

        @torch.compile
        def compiled_cast(t):
            amax = t.abs().amax().float()
            scale = 448.0 / amax.clamp(min=1e-12)
            return (t.float() * scale).clamp(-448, 448).to(torch.float8_e4m3fn), amax

        record("baseline torch.compile tensor-scaled e4m3", lambda: compiled_cast(x))
        # The SASS report's reference kernels (tritonfp8/ops/baseline.py): what its predictions compare with.
        from tritonfp8.ops import baseline

        record("reference kernel hw-cvt cast e4m3", lambda: baseline.hw_cast(x))
        record("reference kernel hw-cvt cast e4m3 +T", lambda: baseline.hw_cast(x, transpose=True), True)
        record("reference kernel philox-per-4 stochastic cast e4m3", lambda: baseline.philox4_cast(x, 1))
        for scaling, transpose in (((1, 128), False), ((1, 128), True), ((128, 128), False), ("mx", False)):
            record(f"reference kernel hw-cvt block cast e4m3 {scaling}{' +T' if transpose else ''}",
                   lambda s=scaling, t=transpose: baseline.hw_block_cast(x, s, "e4m3", t), transpose)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None, help="square size (default 8192 on GPU, 256 on CPU)")
    parser.add_argument("--out", help="write <out>.json and <out>.md")
    args = parser.parse_args()
    size = args.size or (8192 if torch.cuda.is_available() else 256)
    rows = run(size)
    if args.out:
        write_results(args.out, rows, machine_info(), ["op", "shape", "dtype", "ms", "GB/s", "fraction of HBM", "Gelem/s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
