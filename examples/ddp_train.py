"""Data-parallel FP8 training with DistributedDataParallel: one process per CPU core
(gloo) or per GPU (NCCL).

    torchrun --nproc-per-node 2 examples/ddp_train.py [--steps 50]

Every rank trains an MLP on its own shard of a regression task (a fixed random teacher
network) with the paper's recipe: fp8 casts with stochastic rounding, bf16 master weights
updated with stochastic rounding, and enhanced loss scaling. At the end rank 0 checks
that all replicas hold the same bits and prints the loss.
"""
import argparse
import gc
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import tritonfp8 as tf8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="rows per rank")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same teacher and initial weights on every rank
    teacher = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 32)).to(device)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 32)).to(device)

    # The tf8 optimizer turns the parameters into bf16 master weights: build it BEFORE DDP,
    # which hooks its all-reduce on each parameter as it is when DDP is built.
    opt = tf8.optim.AdamW(model.parameters(), lr=2e-3, master_dtype=torch.bfloat16, rounding="stochastic")
    model = DDP(model)
    scaler = tf8.LossScaler("enhanced")  # skip / back-off decisions are agreed across ranks
    recipe = "mellempudi2019"

    data = torch.Generator(device=device).manual_seed(1 + rank)  # each rank its own shard
    for step in range(args.steps):
        x = torch.randn(args.batch, 64, generator=data, device=device)
        with torch.no_grad():
            y = teacher(x)
        opt.zero_grad()
        with tf8.fp8_autocast(recipe):
            loss = nn.functional.mse_loss(model(x.to(torch.bfloat16)).float(), y)
        with tf8.training.tracking(scaler):  # the fp8 error casts report saturation
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step == 0:
            first = loss.detach().reshape(1).clone()

    mine = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    rank0 = mine.clone()
    dist.broadcast(rank0, src=0)
    same = torch.tensor([int(torch.equal(mine.view(torch.int32), rank0.view(torch.int32)))], device=device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    losses = torch.cat([first, loss.detach().reshape(1)])
    dist.all_reduce(losses)
    losses /= world
    if rank == 0:
        print(f"ranks {world}  steps {args.steps}  mean loss {losses[0].item():.4f} -> {losses[1].item():.4f}  "
              f"skipped {scaler.skipped_steps}  replicas identical: {bool(same.item())}")
    # gloo frees a finished collective's tensors on its own threads (taking the GIL): free
    # the model and end with a barrier before the group goes, or teardown can deadlock.
    del model, opt, scaler
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
