"""Train one (task, arm, seed) run, and many of them in worker processes with a progress bar."""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from ..nn.state import ROLES
from ..trainer import Trainer
from ..training import LossScaler
from . import tasks
from .config import ARMS, Arm, TaskConfig

# Seconds per training step on one CPU thread with the reference backend (measured on a shared
# 2-core AMD EPYC; used for the ETA only, whose shape does not depend on the machine's speed).
_STEP_COST = {
    "fashion-cnn": {"fp32": 0.02, "bf16": 0.015, "fp8-vanilla": 0.13, "fp8+dynamic-ls": 0.14, "fp8+enhanced-ls": 0.14,
                    "mellempudi2019": 0.22, "abl-nearest-grads": 0.19, "abl-nearest-master": 0.2, "hybrid": 0.7,
                    "blockwise": 0.48},
    "fashion-resnet": {"fp32": 0.03, "bf16": 0.03, "hybrid": 2.0, "blockwise": 2.0},
    "text-gpt": {"fp32": 0.02, "bf16": 0.015, "fp8-vanilla": 0.26, "fp8+dynamic-ls": 0.28, "fp8+enhanced-ls": 0.28,
                 "mellempudi2019": 0.45, "abl-nearest-grads": 0.3, "abl-nearest-master": 0.45, "hybrid": 0.2,
                 "blockwise": 0.23},
}
_DEFAULT_STEP_COST = {"fashion-cnn": 0.2, "fashion-resnet": 2.0, "text-gpt": 0.3}
# arms that cost what another arm costs (they change only the loss scaling or which layers run in fp8)
_COSTS_LIKE = {"fp8+enhanced-ls-high": "fp8+enhanced-ls", "fp8+dynamic-ls-high": "fp8+dynamic-ls",
               "mellempudi2019-all-fp8": "mellempudi2019",
               **{name: "fp8+dynamic-ls" for name in ARMS if name.startswith("fp8+static-ls")}}


def _step_cost(cfg: TaskConfig, arm: Arm) -> float:
    name = _COSTS_LIKE.get(arm.name, arm.name)
    return _STEP_COST.get(cfg.task, {}).get(name, _DEFAULT_STEP_COST.get(cfg.task, 0.3))


def run_cost(cfg: TaskConfig, arm: Arm) -> float:
    """Work units of one run (estimated seconds): training steps plus evaluations, for the ETA."""
    steps = cfg.epochs * tasks.steps_per_epoch(cfg)
    return _step_cost(cfg, arm) * (steps + _eval_units(cfg))


def _eval_units(cfg: TaskConfig) -> float:
    # a forward-only sample costs roughly a third of a training sample
    if cfg.task == "text-gpt":
        per_eval = cfg.val_windows / cfg.batch_size
        return (cfg.epochs * cfg.evals_per_epoch + 1) * per_eval / 3
    per_eval = min(cfg.curve_eval_size, cfg.val_size or cfg.test_size) / cfg.batch_size
    return (cfg.epochs * cfg.evals_per_epoch * per_eval + cfg.test_size / cfg.batch_size) / 3


def build_scaler(cfg: TaskConfig, arm: Arm) -> Optional[LossScaler]:
    """The arm's tf8.LossScaler with the task's settings (None without loss scaling)."""
    if arm.loss_scaling is None:
        return None
    if arm.loss_scaling == "static":
        return LossScaler("static", init_scale=arm.static_scale)
    extra = {}
    if arm.loss_scaling == "enhanced":
        extra["floor"] = cfg.ls_high_floor if arm.floor == "high" else cfg.ls_floor
    init = cfg.ls_high_floor if arm.start == "high" else cfg.ls_init_scale
    return LossScaler(arm.loss_scaling, init_scale=init, growth_interval=cfg.ls_growth_interval, **extra)


class LayerErrorCounts:
    """Per fp8 layer, the error values its casts flushed to zero between two calls of
    :meth:`interval_underflow` (from the autocast's per-layer cast counts, cumulative on the device)."""

    _ERROR = ROLES.index("error")

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.last: dict[str, tuple[int, int]] = {}

    def interval_underflow(self) -> Optional[dict[str, Optional[float]]]:
        """{layer: flushed / nonzero error values since the last call (None where none were nonzero)};
        None without an fp8 recipe."""
        ac = self.trainer.autocast
        if ac is None:
            return None
        rows = [(name.rsplit(".", 1)[0] if name.endswith(".weight") else name, r.state)
                for name, r in ac.summary().items() if r.state is not None and r.state.cast_counts is not None]
        if not rows:
            return {}
        counts = torch.stack([state.cast_counts[self._ERROR, :2].cpu() for _, state in rows]).tolist()
        out = {}
        for (name, _), (nonzero, flushed) in zip(rows, counts):
            n0, f0 = self.last.get(name, (0, 0))
            self.last[name] = (nonzero, flushed)
            out[name] = (flushed - f0) / (nonzero - n0) if nonzero > n0 else None
        return out


def _median(xs):
    return statistics.median(xs) if xs else math.nan


def run_one(cfg: TaskConfig, arm: Arm, seed: int, progress: Optional[Callable[[float], None]] = None) -> dict:
    """Train ``arm`` on ``cfg.task`` with ``seed``; every number of the run as a JSON-able dict.

    The seed fixes the initial weights (the model is built right after ``torch.manual_seed``),
    the data order (its own generator) and the fp8 / optimizer random bits, so every arm of
    a seed starts from the same weights and sees the same batches.
    """
    t_start = time.perf_counter()
    device = torch.device(cfg.device)
    torch.manual_seed(seed)
    model = tasks.build_model(cfg).to(device)
    layers = tasks.probe_fp8_layers(model, arm, tasks.sample_input(cfg).to(device))
    opt = tasks.build_optimizer(model, cfg, arm, layers, seed)
    scaler = build_scaler(cfg, arm)
    amp = getattr(torch, arm.amp_dtype) if arm.amp_dtype else None
    trainer = Trainer(model, opt, recipe=arm.recipe, scaler=scaler, loss_fn=tasks.loss_fn(cfg), amp_dtype=amp)
    torch.manual_seed(seed + 7919)  # the fp8 layers' stochastic-rounding seeds come from torch's RNG
    data_gen = torch.Generator().manual_seed(seed)

    per_epoch = tasks.steps_per_epoch(cfg)
    total = cfg.epochs * per_epoch
    eval_at = sorted({max(1, round(per_epoch * (e + (i + 1) / cfg.evals_per_epoch)))
                      for e in range(cfg.epochs) for i in range(cfg.evals_per_epoch)})
    cost = _step_cost(cfg, arm)
    eval_unit = _eval_units(cfg) / max(1, len(eval_at) + 1) * cost

    scales, losses, step_wall, step_cpu, floor_steps = [], [], [], [], []
    layer_errors = LayerErrorCounts(trainer)
    curve = []
    interval = dict(loss=0.0, n=0, correct=0, seen=0, nonzero=0, underflow=0, values=0, saturated=0, skipped=0)
    totals = dict(nonzero=0, underflow=0, values=0, saturated=0, skipped=0, nonfinite_loss=0)
    done_units = 0.0
    step = 0
    train_wall = eval_wall = 0.0
    for epoch in range(cfg.epochs):
        for x, y in tasks.batches(cfg, data_gen, epoch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for g in opt.param_groups:
                g["lr"] = tasks.lr_at(cfg, step, total)
            w0, c0 = time.perf_counter(), time.process_time()
            raises = scaler.floor_raises if scaler is not None else 0
            r = trainer.step((x, y))
            dw, dc = time.perf_counter() - w0, time.process_time() - c0
            if scaler is not None and scaler.floor_raises > raises:
                floor_steps.append(step)
            train_wall += dw
            step_wall.append(dw)
            step_cpu.append(dc)
            step += 1
            scales.append(r.scale)
            losses.append(r.loss)
            if not math.isfinite(r.loss):
                totals["nonfinite_loss"] += 1
            interval["loss"] += r.loss
            interval["n"] += 1
            if cfg.task != "text-gpt" and r.output is not None:
                interval["correct"] += int((r.output.argmax(-1) == y).sum())
                interval["seen"] += len(y)
            for k, v in (("nonzero", r.error_nonzero), ("underflow", r.error_underflow),
                         ("values", r.error_values), ("saturated", r.error_saturated), ("skipped", int(r.skipped))):
                interval[k] += v
                totals[k] += v
            done_units += cost
            if step in eval_at:
                e0 = time.perf_counter()
                val = tasks.evaluate(cfg, trainer.forward, model, "val", cfg.curve_eval_size)
                eval_wall += time.perf_counter() - e0
                curve.append({
                    "step": step, "epoch": step / per_epoch, "train_loss": interval["loss"] / interval["n"],
                    "train_acc": 100.0 * interval["correct"] / interval["seen"] if interval["seen"] else None,
                    "val": val, "scale": r.next_scale, "skipped": interval["skipped"],
                    "underflow_fraction": interval["underflow"] / interval["nonzero"] if interval["nonzero"] else None,
                    "saturation_fraction": interval["saturated"] / interval["values"] if interval["values"] else None,
                    "layer_underflow": layer_errors.interval_underflow(),
                })
                interval = {k: 0 if isinstance(v, int) else 0.0 for k, v in interval.items()}
                done_units += eval_unit
            if progress is not None:
                progress(done_units)
    e0 = time.perf_counter()
    final = tasks.evaluate(cfg, trainer.forward, model, "test")
    eval_wall += time.perf_counter() - e0
    done_units += eval_unit
    if progress is not None:
        progress(done_units)
    warm = slice(min(2, len(step_wall) - 1), None)  # the first steps build caches and fp8 state
    return {
        "task": cfg.task, "arm": arm.name, "seed": seed,
        "final": final, "metric": cfg.metric,
        "curve": curve,
        # the loss scale of each step, run-length encoded: [first step, scale] whenever it changes
        "loss_scale": [[i, v] for i, v in enumerate(scales) if i == 0 or v != scales[i - 1]],
        "train_loss": losses,
        "skipped_steps": totals["skipped"], "steps": step, "nonfinite_losses": totals["nonfinite_loss"],
        "error_values": totals["values"], "error_nonzero": totals["nonzero"],
        "error_underflow": totals["underflow"], "error_saturated": totals["saturated"],
        "underflow_fraction": totals["underflow"] / totals["nonzero"] if totals["nonzero"] else None,
        "saturation_fraction": totals["saturated"] / totals["values"] if totals["values"] else None,
        "final_scale": scaler.get_scale() if scaler is not None else None,
        # steps whose scaler update the enhanced floor raised (the dynamic rule would have gone below it)
        "floor_steps": floor_steps,
        "layers": trainer.precision_summary() or layers,
        "master_dtypes": {name: str(p.dtype).replace("torch.", "") for name, p in model.named_parameters()},
        "step_time_s": _median(step_wall[warm]), "step_cpu_s": _median(step_cpu[warm]),
        "train_wall_s": train_wall, "eval_wall_s": eval_wall, "wall_s": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------
# Progress bar (stderr): redrawn in place on a terminal, a line every 30 s otherwise
# ----------------------------------------------------------------------------


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "--:--"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """A small progress bar with elapsed time and ETA, from work units done out of ``total``."""

    def __init__(self, total: float, stream=None, width: int = 28, min_interval: float = 0.5,
                 log_interval: float = 30.0, enabled: bool = True):
        self.total = max(total, 1e-9)
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = min_interval if self.tty else log_interval
        self.enabled = enabled
        self.start = time.perf_counter()
        self._last = -math.inf
        self.done = 0.0
        self.note = ""

    def eta(self) -> float:
        elapsed = time.perf_counter() - self.start
        if self.done <= 0:
            return math.inf
        return elapsed * (self.total - self.done) / self.done

    def line(self) -> str:
        frac = min(1.0, self.done / self.total)
        filled = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.start
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * frac:5.1f}%  "
                f"elapsed {_fmt_time(elapsed)}  ETA {_fmt_time(self.eta())}  {self.note}")

    def update(self, done: float, note: Optional[str] = None, force: bool = False) -> None:
        self.done = done
        if note is not None:
            self.note = note
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < self.min_interval):
            return
        self._last = now
        if self.tty:
            self.stream.write("\r" + self.line()[:160].ljust(160))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.update(self.done, force=True)
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------
# Many runs: in this process (jobs=1) or in spawned worker processes
# ----------------------------------------------------------------------------

_QUEUE = None


def _init_worker(threads: int, queue) -> None:
    global _QUEUE
    torch.set_num_threads(threads)
    _QUEUE = queue


def _worker(key, cfg: TaskConfig, arm_name: str, seed: int) -> tuple:
    last = [0.0]

    def progress(units):
        if units - last[0] >= 0.5:
            _QUEUE.put((key, units))
            last[0] = units

    result = run_one(cfg, ARMS[arm_name], seed, progress)
    return key, result


def run_all(jobs: list[tuple[TaskConfig, Arm, int]], workers: int = 1, threads: Optional[int] = None,
            show_progress: bool = True, stream=None,
            on_result: Optional[Callable[[int, dict], None]] = None) -> list[dict]:
    """Run every (config, arm, seed); ``workers`` > 1 runs them in that many spawned processes.

    ``threads``: torch threads per run (default: all cores / workers). ``on_result(i, result)``
    is called as each run finishes (e.g. to save it). Returns the results in the order of ``jobs``.
    """
    costs = [run_cost(cfg, arm) for cfg, arm, _ in jobs]
    bar = Progress(sum(costs), stream=stream, enabled=show_progress)
    done = [0.0] * len(jobs)
    results: list[Optional[dict]] = [None] * len(jobs)
    cores = os.cpu_count() or 1
    workers = max(1, min(workers, len(jobs)))
    threads = threads or max(1, cores // workers)

    def label(i):
        cfg, arm, seed = jobs[i]
        return f"{cfg.task}/{arm.name}/seed {seed}"

    if workers == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for i, (cfg, arm, seed) in enumerate(jobs):
                def progress(units, i=i):
                    done[i] = units
                    bar.update(sum(done), note=label(i))
                results[i] = run_one(cfg, arm, seed, progress)
                if on_result is not None:
                    on_result(i, results[i])
                done[i] = costs[i]
                bar.update(sum(done), note=label(i), force=True)
        finally:
            torch.set_num_threads(previous)
        bar.close()
        return results

    import concurrent.futures as cf
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")  # no fork: the parent's thread pools must not leak into workers
    q = ctx.Manager().Queue()
    # Task by task (an interrupted invocation leaves whole tasks done), longest first within a task
    # (packs the workers best).
    rank = {t: k for k, t in enumerate(dict.fromkeys(cfg.task for cfg, _, _ in jobs))}
    order = sorted(range(len(jobs)), key=lambda i: (rank[jobs[i][0].task], -costs[i]))
    running: set = set()
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, q)) as pool:
        futures = {pool.submit(_worker, i, jobs[i][0], jobs[i][1].name, jobs[i][2]): i for i in order}
        pending = set(futures)
        while pending:
            finished, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            while True:
                try:
                    i, units = q.get_nowait()
                except queue_mod.Empty:
                    break
                done[i] = units
                running.add(i)
            for f in finished:
                if f.exception() is not None:  # stop the other runs, then re-raise the worker's exception
                    for other in pending:
                        other.cancel()
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise f.exception()
                i, result = f.result()
                results[i] = result
                if on_result is not None:
                    on_result(i, result)
                done[i] = costs[i]
                running.discard(i)
            bar.update(sum(done), note="; ".join(label(i) for i in sorted(running))[:90])
    bar.close()
    return results
