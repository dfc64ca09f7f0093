"""Data, models, optimizers and evaluation of the reproduction's tasks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import data as tfdata
from .config import Arm, TaskConfig
from .models import ByteGPT, SmallCNN, SmallResNet

_CACHE: dict = {}
_SPLIT_SEED = 1234  # the fixed train / validation split of Fashion-MNIST (the same for every run seed)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


@dataclass
class ImageData:
    train_x: torch.Tensor  # [N, 1, 28, 28] fp32, normalized
    train_y: torch.Tensor  # [N] int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    description: dict


def fashion_data(cfg: TaskConfig) -> ImageData:
    """Fashion-MNIST as normalized tensors, with ``val_size`` training images held out (fixed split)."""
    key = ("fashion", cfg.data_dir, cfg.train_size, cfg.val_size, cfg.test_size)
    if key in _CACHE:
        return _CACHE[key]
    train = tfdata.load_fashion_mnist("train", cfg.data_dir)
    test = tfdata.load_fashion_mnist("test", cfg.data_dir)
    images = torch.from_numpy(train.images).float().div_(255.0)
    mean, std = float(images.mean()), float(images.std())  # from the training images only

    def norm(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).float().div_(255.0).sub_(mean).div_(std).unsqueeze(1)

    n = len(train)
    if not 0 <= cfg.val_size < n:
        raise ValueError(f"val_size={cfg.val_size} must be in [0, {n})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    val_idx, train_idx = order[:cfg.val_size], order[cfg.val_size:]
    if cfg.train_size is not None:
        if not 0 < cfg.train_size <= len(train_idx):
            raise ValueError(f"train_size={cfg.train_size} must be in [1, {len(train_idx)}]")
        train_idx = train_idx[:cfg.train_size]
    x_all, y_all = norm(train.images), torch.from_numpy(train.labels.astype(np.int64))
    test_n = min(cfg.test_size, len(test))
    out = ImageData(
        x_all[train_idx], y_all[train_idx], x_all[val_idx], y_all[val_idx],
        norm(test.images[:test_n]), torch.from_numpy(test.labels[:test_n].astype(np.int64)),
        {"name": "Fashion-MNIST (Zalando), IDX files", "files": list(train.files + test.files),
         "train_images": len(train_idx), "val_images": int(cfg.val_size), "test_images": test_n,
         "normalization": {"mean": mean, "std": std}, "split_seed": _SPLIT_SEED},
    )
    _CACHE[key] = out
    return out


@dataclass
class TextData:
    train: torch.Tensor   # uint8 bytes as int64 [n]
    val_windows: torch.Tensor  # [W, seq_len + 1] int64
    description: dict


def text_data(cfg: TaskConfig) -> TextData:
    key = ("text", cfg.corpus_bytes, cfg.seq_len, cfg.val_windows)
    if key in _CACHE:
        return _CACHE[key]
    corpus = tfdata.load_text_corpus(cfg.corpus_bytes)
    train = torch.from_numpy(corpus.train.astype(np.int64))
    val = torch.from_numpy(corpus.val.astype(np.int64))
    span = cfg.seq_len + 1
    if len(val) < span or len(train) < span:
        raise ValueError(f"the corpus is too small for windows of {span} bytes")
    starts = torch.linspace(0, len(val) - span, cfg.val_windows).long()  # evenly spread, fixed
    windows = val[starts[:, None] + torch.arange(span)]
    desc = dict(corpus.description, val_windows=int(cfg.val_windows), val_tokens=int(cfg.val_windows * cfg.seq_len))
    out = TextData(train, windows, desc)
    _CACHE[key] = out
    return out


def dataset_description(cfg: TaskConfig) -> dict:
    return text_data(cfg).description if cfg.task == "text-gpt" else fashion_data(cfg).description


# ----------------------------------------------------------------------------
# Models, losses, batches
# ----------------------------------------------------------------------------


def build_model(cfg: TaskConfig) -> torch.nn.Module:
    if cfg.task == "fashion-cnn":
        return SmallCNN(*cfg.cnn_channels, hidden=cfg.cnn_hidden)
    if cfg.task == "fashion-resnet":
        return SmallResNet(cfg.resnet_width, cfg.resnet_blocks)
    return ByteGPT(128, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.seq_len)


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def image_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target)


def loss_fn(cfg: TaskConfig) -> Callable:
    return lm_loss if cfg.task == "text-gpt" else image_loss


def steps_per_epoch(cfg: TaskConfig) -> int:
    if cfg.task == "text-gpt":
        return cfg.steps_per_epoch
    n = len(fashion_data(cfg).train_y)
    if n < cfg.batch_size:
        raise ValueError(f"{n} training images are fewer than one batch of {cfg.batch_size}")
    return n // cfg.batch_size  # the last incomplete batch is dropped


def batches(cfg: TaskConfig, generator: torch.Generator, epoch: int):
    """The batches of one epoch, in an order that depends only on the generator (the run seed)."""
    if cfg.task == "text-gpt":
        data = text_data(cfg).train
        span = cfg.seq_len + 1
        for _ in range(cfg.steps_per_epoch):
            starts = torch.randint(0, len(data) - span + 1, (cfg.batch_size,), generator=generator)
            chunk = data[starts[:, None] + torch.arange(span)]
            yield chunk[:, :-1], chunk[:, 1:]
        return
    d = fashion_data(cfg)
    perm = torch.randperm(len(d.train_y), generator=generator)
    for i in range(steps_per_epoch(cfg)):
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        yield d.train_x[idx], d.train_y[idx]


def lr_at(cfg: TaskConfig, step: int, total: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay from lr to lr * min_lr_fraction at ``total``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    lo = cfg.lr * cfg.min_lr_fraction
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * min(1.0, t)))


# ----------------------------------------------------------------------------
# Which layers run in fp8, optimizer with per-layer master dtypes
# ----------------------------------------------------------------------------


def probe_fp8_layers(model: torch.nn.Module, arm: Arm, sample) -> dict[str, dict]:
    """Run one forward (eval mode, no grad) under the arm's fp8 autocast: {layer: how it ran}."""
    from ..autocast import fp8_autocast

    if not arm.is_fp8:
        return {}
    ac = fp8_autocast(arm.recipe).watch(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), ac:
            model(sample)
    finally:
        model.train(was_training)
    return {name: {"op": r.op, "shape": r.shape, "fp8": r.fp8_calls > 0,
                   "reason": "; ".join(r.reasons) if r.high_precision_calls else ""}
            for name, r in ac.summary().items()}


def build_optimizer(model: torch.nn.Module, cfg: TaskConfig, arm: Arm, layers: dict, seed: int):
    """tf8.optim SGD / AdamW; the parameters of fp8 layers get the arm's master dtype and rounding,
    all others fp32 masters. Weight decay applies to parameters with 2+ dims only."""
    from .. import optim

    fp8_modules = {name.rsplit(".", 1)[0] for name, info in layers.items() if info["fp8"] and "." in name}
    groups: dict[tuple, list] = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            fp16 = arm.master_dtype == "float16" and mname in fp8_modules
            groups.setdefault((fp16, p.dim() >= 2), []).append(p)
    param_groups = []
    for (fp16, decay), params in sorted(groups.items()):
        param_groups.append({
            "params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
            "master_dtype": torch.float16 if fp16 else torch.float32,
            "rounding": arm.master_rounding,
        })
    if cfg.optimizer == "sgd":
        return optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, seed=seed)
    return optim.AdamW(param_groups, lr=cfg.lr, betas=cfg.betas, seed=seed)


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(cfg: TaskConfig, forward: Callable, model: torch.nn.Module, split: str,
             limit: Optional[int] = None) -> float:
    """Accuracy in % (images) or mean cross entropy in nats per byte (text) with ``forward``'s numerics."""
    was_training = model.training
    model.eval()
    try:
        if cfg.task == "text-gpt":
            windows = text_data(cfg).val_windows
            total, count = 0.0, 0
            step = max(1, cfg.eval_batch_size // cfg.seq_len)
            for i in range(0, len(windows), step):
                w = windows[i:i + step].to(cfg.device)
                logits = forward(w[:, :-1])
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1),
                                               reduction="sum"))
                count += w[:, 1:].numel()
            return total / count
        d = fashion_data(cfg)
        x, y = (d.val_x, d.val_y) if split == "val" and len(d.val_y) else (d.test_x, d.test_y)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        correct = 0
        for i in range(0, len(y), cfg.eval_batch_size):
            logits = forward(x[i:i + cfg.eval_batch_size].to(cfg.device))
            correct += int((logits.argmax(-1).cpu() == y[i:i + cfg.eval_batch_size]).sum())
        return 100.0 * correct / len(y)
    finally:
        model.train(was_training)


def sample_input(cfg: TaskConfig) -> torch.Tensor:
    if cfg.task == "text-gpt":
        return text_data(cfg).val_windows[:2, :-1]
    return fashion_data(cfg).val_x[:2] if cfg.val_size else fashion_data(cfg).train_x[:2]
