"""``python -m tritonfp8 <command>``."""
from __future__ import annotations

import argparse
import sys


def info() -> int:
    """Formats, backend, versions and GPU availability."""
    import torch
    import triton

    import tritonfp8 as tf8
    from tritonfp8.backend import cuda_ok, resolve, triton_interprets

    print(f"tritonfp8 {tf8.__version__}  (torch {torch.__version__}, triton {triton.__version__})")
    print()
    print(f"{'format':<7} {'bits s-e-m':<10} {'bias':>4} {'max':>10} {'min normal':>12} {'min subnormal':>14} {'inf':>4}  torch dtype")
    for fmt in (tf8.E5M2, tf8.E4M3):
        print(f"{fmt.name:<7} {'1-%d-%d' % (fmt.exp_bits, fmt.man_bits):<10} {fmt.bias:>4} {fmt.max:>10g} "
              f"{fmt.min_normal:>12g} {fmt.min_subnormal:>14g} {'yes' if fmt.has_inf else 'no':>4}  {fmt.torch_dtype}")
    print(f"{'e8m0':<7} {'0-8-0':<10} {127:>4} {'2^127':>10} {'2^-127':>12} {'none':>14} {'no':>4}  {tf8.E8M0.torch_dtype}")
    print()
    gpu, reason = cuda_ok()
    print(f"GPU: {'yes, ' + reason if gpu else 'no (' + reason + ')'}")
    if torch.cuda.is_available():
        print(f"     {torch.cuda.get_device_name(0)}")
    print(f"backend setting: {tf8.get_backend()}; Triton interpreter: {'on' if triton_interprets() else 'off'}")
    print(f"  CPU tensors run on: {resolve('cpu')}")
    if torch.cuda.is_available():
        print(f"  CUDA tensors run on: {resolve('cuda')}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "reproduce":  # its own parser: python -m tritonfp8 reproduce --help
        from .reproduce import main as reproduce_main

        return reproduce_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m tritonfp8", description="FP8 training kernels for PyTorch")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="formats, backend, versions, GPU (the default)")
    sub.add_parser("reproduce", help="the seed paper's findings on Fashion-MNIST and text: tables, plots, JSON "
                                     "(python -m tritonfp8 reproduce --help)")
    args = parser.parse_args(argv)
    if args.command in (None, "info"):
        return info()
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
