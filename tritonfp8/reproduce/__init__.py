"""``python -m tritonfp8 reproduce``: the seed paper's findings on real data, with tables and plots.

Mellempudi et al. 2019 claim that with E5M2 everywhere, enhanced loss scaling,
stochastic rounding and fp16 master weights, training matches fp32, while vanilla
FP8 does not. This command trains the arms of :data:`config.ARMS` (fp32, bf16, the
FP8 ladder from vanilla to the full recipe, two ablations, and the hybrid and
blockwise recipes for comparison) from the same initial weights and data order per
seed on:

* ``fashion-cnn``: a small CNN on Fashion-MNIST (IDX files; ``apt-get install -y
  dataset-fashion-mnist``);
* ``fashion-resnet``: a small ResNet on Fashion-MNIST (opt-in: slow on a CPU);
* ``text-gpt``: a byte-level GPT on the running Python's standard library sources.

and writes to ``--out``: ``report.md`` (tables, findings, the layers that ran in
fp8), ``results.json`` (every number, the exact configuration, versions) and PNG
plots of the curves and the loss-scale trajectories.

Without options it runs the quick configuration (``fashion-cnn`` and ``text-gpt``,
one seed, a fraction of an epoch; about 3 minutes on 2 CPU cores); ``--full`` runs
5 seeds, longer schedules and deeper models (see ``config.PRESETS``). CPU tensors run the PyTorch reference of every fp8 op,
CUDA tensors the Triton kernels (``--device``), with the same numerics.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from .config import ARM_ORDER, ARMS, DEFAULT_TASKS, TASKS, TaskConfig, parse_override, select_arms, task_config

__all__ = ["main", "reproduce", "build_parser", "ARMS", "TASKS", "TaskConfig", "task_config"]


def build_parser(prog: str = "python -m tritonfp8 reproduce") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Reproduce Mellempudi et al. 2019's FP8 training findings on Fashion-MNIST and text.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arms: " + ", ".join(ARM_ORDER) + "\nTask fields for --set: see tritonfp8/reproduce/config.py",
    )
    p.add_argument("--task", action="append", choices=TASKS, metavar="TASK",
                   help=f"{', '.join(TASKS)} (repeatable; default: {' and '.join(DEFAULT_TASKS)})")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the quick configuration (the default)")
    mode.add_argument("--full", action="store_true", help="the full configuration (5 seeds, longer schedules, deeper models)")
    p.add_argument("--epochs", type=int, help="epochs per run (text-gpt: blocks of steps_per_epoch steps)")
    p.add_argument("--seeds", type=int, help="seeds 0..S-1 per arm")
    p.add_argument("--arms", help="comma-separated subset of the arms for every task (fp32 is always included; "
                                  "default: each task's preset arms)")
    p.add_argument("--out", help="output directory (default: ./reproduce-<date>-<time>)")
    p.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files (default: $TRITONFP8_FASHION_MNIST, "
                                      "then /usr/share/datasets/fashion-mnist)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--jobs", type=int, help="runs in parallel worker processes (default: the CPU cores on cpu, 1 on cuda)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: cores / jobs)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a task constant, e.g. --set lr=0.1 --set train_size=10000 (all tasks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--readme", metavar="PATH", help="also write the tables, findings and curves into PATH between its "
                                                    "'reproduce:begin' / 'reproduce:end' marker lines")
    p.add_argument("--from-results", metavar="DIR", help="train nothing: rebuild DIR/report.md, the findings and the plots "
                                                         "from DIR/results.json of an earlier run (with --readme, also "
                                                         "the README section)")
    return p


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def reproduce(tasks: list[TaskConfig], arm_names: Optional[list[str]], out: Path, workers: int = 1,
              threads: Optional[int] = None, show_progress: bool = True, command: str = "") -> dict:
    """Run every task x arm x seed, write report.md / results.json / plots into ``out``; return the result dict."""
    from . import report, runner
    from .tasks import dataset_description

    arms_of = {cfg.task: select_arms(arm_names, cfg) for cfg in tasks}
    arms = [ARMS[n] for n in ARM_ORDER if any(a.name == n for task_arms in arms_of.values() for a in task_arms)]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    env = report.environment(tasks[0].device)
    datasets = {cfg.task: dataset_description(cfg) for cfg in tasks}  # fails early if data is missing
    jobs = [(cfg, arm, seed) for cfg in tasks for arm in arms_of[cfg.task] for seed in range(cfg.seeds)]
    # Every finished run is saved under out/runs/, keyed by its exact configuration, so an
    # interrupted invocation resumes where it stopped (delete the directory to start afresh).
    run_dir = out / "runs"
    run_dir.mkdir(exist_ok=True)
    paths = [run_dir / _run_file(cfg, arm, seed) for cfg, arm, seed in jobs]
    runs: list = [json.loads(p.read_text()) if p.is_file() else None for p in paths]
    todo = [i for i, r in enumerate(runs) if r is None]
    cores = os.cpu_count() or 1
    workers = max(1, min(workers, len(todo) or 1))
    threads = threads or max(1, cores // workers)
    print(f"reproduce: {len(jobs)} runs ({', '.join(f'{c.task}: {len(arms_of[c.task])} arms' for c in tasks)}"
          f"{f'; {len(jobs) - len(todo)} resumed from {run_dir}' if len(todo) < len(jobs) else ''}; "
          f"{workers} worker(s) x {threads} thread(s); backend {env['backend']}) -> {out}", file=sys.stderr)

    def save(k, run):
        runs[todo[k]] = run
        paths[todo[k]].write_text(json.dumps(run))

    runner.run_all([jobs[i] for i in todo], workers=workers, threads=threads, show_progress=show_progress,
                   on_result=save)
    wall = time.perf_counter() - started
    result = {
        "command": command, "date": date, "wall_s": wall, "workers": workers, "threads": threads,
        "resumed_runs": len(jobs) - len(todo),
        "tasks": [c.task for c in tasks], "arms": [a.name for a in arms],
        "arm_definitions": {a.name: a.as_dict() for a in arms},
        "environment": env, "results": {},
    }
    for cfg in tasks:
        result["results"][cfg.task] = {"config": cfg.as_dict(), "dataset": datasets[cfg.task],
                                       "runs": [r for r in runs if r["task"] == cfg.task]}
    _write_outputs(result, out)
    # Everything is in results.json now; remove only this invocation's run files (another
    # invocation into the same --out, e.g. for another task, may still need its own).
    for p in paths:
        p.unlink(missing_ok=True)
    if not any(run_dir.iterdir()):
        run_dir.rmdir()
    return result


def _write_outputs(result: dict, out: Path) -> None:
    """From each task's config and runs: summary, findings and plots, then report.md and results.json."""
    from . import report

    for t in result["results"].values():
        cfg = TaskConfig(**t["config"])
        t["summary"] = report.summarize(cfg, t["runs"])
        t["findings"] = report.findings(cfg, t["summary"])
        t["plots"] = report.plots(cfg.task, t["runs"], t["summary"], out)
    (out / "report.md").write_text(report.markdown(result))
    report.write_json(result, out / "results.json")


def rebuild(out: Path) -> dict:
    """Recompute the summaries, findings, report.md and plots of an earlier run from ``out/results.json``.

    Uses the runs as stored there (10 significant digits, per-step series 6); nothing is trained.
    """
    from . import report

    result = json.loads((out / "results.json").read_text())
    for t in result["results"].values():
        for key in ("summary", "findings", "plots"):
            t.pop(key, None)
    result["rebuilt"] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                         "git_commit": report._git_commit()}
    _write_outputs(result, out)
    return result


def _run_file(cfg: TaskConfig, arm, seed: int) -> str:
    task = cfg.as_dict()
    task.pop("arms")  # which other arms a task runs does not change this run
    key = json.dumps([task, arm.as_dict(), seed], sort_keys=True, default=str)
    return f"{cfg.task}.{arm.name}.seed{seed}.{hashlib.sha1(key.encode()).hexdigest()[:10]}.json"


def main(argv=None, prog: str = "python -m tritonfp8 reproduce") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    from .. import data as tfdata
    from . import report

    readme = Path(args.readme) if args.readme else None
    if readme is not None:  # before training: a long run must not end on a bad README
        try:
            report.readme_parts(readme)
        except (OSError, ValueError) as e:
            parser.error(f"--readme: {e}")
    if args.from_results:
        out = Path(args.from_results)
        try:
            result = rebuild(out)
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--from-results: cannot rebuild the report from {out / 'results.json'}: {e}")
        print(_console_summary(result, out))
        if readme is not None:
            _write_readme(parser, result, out, readme)
        return 0

    try:
        overrides = dict(parse_override(s) for s in args.set)
        arm_names = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
        select_arms(arm_names)
    except ValueError as e:
        parser.error(str(e))
    device = args.device or _default_device()
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
    overrides.update(device=device)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    task_names = list(dict.fromkeys(args.task or DEFAULT_TASKS))
    try:
        tasks = [task_config(t, full=args.full, epochs=args.epochs, seeds=args.seeds, **overrides) for t in task_names]
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    for cfg in tasks:
        if cfg.task.startswith("fashion"):
            try:
                tfdata.find_fashion_mnist(cfg.data_dir)
            except tfdata.DatasetMissing as e:
                print(f"error: task {cfg.task} needs Fashion-MNIST.\n{e}", file=sys.stderr)
                return 2
    jobs = args.jobs or (1 if device == "cuda" else (os.cpu_count() or 1))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    out = Path(args.out or f"reproduce-{stamp}")
    given = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join([prog, *(shlex.quote(a) for a in given)])
    try:
        result = reproduce(tasks, arm_names, out, workers=jobs, threads=args.threads,
                           show_progress=not args.no_progress, command=command)
    except (tfdata.DatasetMissing, tfdata.IDXError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_console_summary(result, out))
    if readme is not None:
        _write_readme(parser, result, out, readme)
    return 0


def _write_readme(parser, result: dict, out: Path, readme: Path) -> None:
    from . import report

    try:
        report.update_readme(readme, report.readme_section(result, out, readme))
    except ValueError as e:
        parser.error(f"--readme: {e}")
    print(f"wrote the results section of {readme}")


def _console_summary(result: dict, out: Path) -> str:
    lines = []
    for task, t in result["results"].items():
        metric = "val loss" if task == "text-gpt" else "test acc %"
        lines.append(f"\n{task}: {metric} (mean over {len(next(iter(t['summary'].values()))['finals'])} seed(s))")
        for name, s in t["summary"].items():
            gap = "" if name == "fp32" else f"  gap {s['gap_to_fp32']:+.4g}"
            uf = s["underflow_fraction"]
            lines.append(f"  {name:<20} {s['mean']:.4g}{gap:<16} skipped {s['skipped_steps']:.0f}"
                         f"  underflow {'-' if uf is None else f'{100 * uf:.3g}%'}"
                         f"  step {s['step_time_vs_fp32']:.1f}x fp32")
        for f in t["findings"]:
            mark = {True: "HOLDS", False: "DOES NOT HOLD", None: "note"}[f["holds"]]
            lines.append(f"  [{mark}] {f['claim']}: {f['text']}")
    lines.append(f"\nwall time {result['wall_s'] / 60:.1f} min; report: {out / 'report.md'}")
    return "\n".join(lines)
