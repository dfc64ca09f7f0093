"""The reproduction's outputs: summary numbers, findings, a markdown report, JSON, PNG plots."""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .config import ARMS, ARM_ORDER, TaskConfig

FULL = "mellempudi2019"
ABLATIONS = ("fp8-vanilla", "fp8+dynamic-ls", "fp8+enhanced-ls", "abl-nearest-grads", "abl-nearest-master")
ACC_TOLERANCE = 0.3       # points of test accuracy: the "within 0.3 points of fp32"
LOSS_TOLERANCE = 0.01     # relative validation loss: "within 1% of fp32"
VISIBLE_SE = 2.0          # "visibly worse" also needs the gap to exceed this many standard errors


def _mean(xs):
    return statistics.fmean(xs) if xs else math.nan


def _std(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _pool(runs, num, den):
    n = sum(r[num] for r in runs)
    d = sum(r[den] for r in runs)
    return n / d if d else None


def summarize(cfg: TaskConfig, runs: list[dict]) -> dict:
    """Per arm: the final metric over seeds (mean, std, min, max), gaps to fp32, skips, underflow, timing."""
    by_arm: dict[str, list] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], []).append(r)
    base = by_arm.get("fp32")
    base_mean = _mean([r["final"] for r in base]) if base else math.nan
    base_step = _mean([r["step_time_s"] for r in base]) if base else math.nan
    base_cpu = _mean([r["step_cpu_s"] for r in base]) if base else math.nan
    out = {}
    for name in [a for a in ARM_ORDER if a in by_arm]:
        rs = sorted(by_arm[name], key=lambda r: r["seed"])
        finals = [r["final"] for r in rs]
        mean = _mean(finals)
        fp8_layers = sorted(k.rsplit(".", 1)[0] for k, v in rs[0]["layers"].items()
                            if v.get("fp8_calls", v.get("fp8", 0)))
        hp_layers = sorted(k.rsplit(".", 1)[0] for k, v in rs[0]["layers"].items()
                           if not v.get("fp8_calls", v.get("fp8", 0)))
        step = _mean([r["step_time_s"] for r in rs])
        cpu = _mean([r["step_cpu_s"] for r in rs])
        out[name] = {
            "seeds": [r["seed"] for r in rs], "finals": finals, "mean": mean, "std": _std(finals),
            "min": min(finals), "max": max(finals),
            "gap_to_fp32": mean - base_mean,
            "rel_gap_to_fp32": (mean - base_mean) / base_mean if base_mean else math.nan,
            "skipped_steps": _mean([r["skipped_steps"] for r in rs]), "steps": rs[0]["steps"],
            "nonfinite_losses": sum(r["nonfinite_losses"] for r in rs),
            "underflow_fraction": _pool(rs, "error_underflow", "error_nonzero"),
            "saturation_fraction": _pool(rs, "error_saturated", "error_values"),
            "fp8_layers": fp8_layers, "high_precision_layers": hp_layers,
            "step_time_s": step, "step_cpu_s": cpu,
            "step_time_vs_fp32": step / base_step if base_step else math.nan,
            "step_cpu_vs_fp32": cpu / base_cpu if base_cpu else math.nan,
            "final_scale": [r["final_scale"] for r in rs],
            "min_scale": min((scale for r in rs for _, scale in r.get("loss_scale", [])), default=None),
            "floor_raises_per_run": _mean([len(r.get("floor_steps", [])) for r in rs]),
            "floor_first_step": min((st for r in rs for st in r.get("floor_steps", [])), default=None),
            "floor_last_step": max((st for r in rs for st in r.get("floor_steps", [])), default=None),
            "tail_change": _tail_change(rs),
        }
    return out


def _tail_change(rs: list[dict]) -> Optional[float]:
    """Relative change of the mean validation curve over the last quarter of training (None
    with fewer than 4 curve points): how flat the curve is at the end."""
    curves = [r["curve"] for r in rs if len(r.get("curve", [])) >= 4]
    if not curves or any(len(c) != len(curves[0]) for c in curves):
        return None
    points = len(curves[0])
    start = points - 1 - max(1, points // 4)
    first = _mean([c[start]["val"] for c in curves])
    last = _mean([c[-1]["val"] for c in curves])
    return (last - first) / first if first else None


def _diff_se(a: dict, b: dict) -> float:
    """Standard error of mean(a) - mean(b) over seeds, as if the arms were independent (0 with a single seed)."""
    return math.sqrt(a["std"] ** 2 / len(a["finals"]) + b["std"] ** 2 / len(b["finals"]))


def _pairs(a: dict, b: dict) -> list[tuple[float, float]]:
    """(a's final, b's final) for each seed both arms ran."""
    seeds_b = dict(zip(b.get("seeds", range(len(b["finals"]))), b["finals"]))
    return [(x, seeds_b[s]) for s, x in zip(a.get("seeds", range(len(a["finals"]))), a["finals"]) if s in seeds_b]


def _per_seed(a: dict, b: dict) -> list[float]:
    return [x - y for x, y in _pairs(a, b)]


# Student's t, two-sided 95%, by degrees of freedom (a dof between entries takes the smaller
# entry's, i.e. the wider interval); above 30, 2.0.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 30: 2.042}


def _t975(dof: int) -> float:
    return 2.0 if dof > 30 else _T975[max(k for k in _T975 if k <= dof)]


def paired_ci(diffs: list) -> Optional[tuple[float, float]]:
    """Two-sided 95% confidence interval of the mean of per-seed differences (Student's t on
    n - 1 degrees of freedom); None with fewer than 2 seeds."""
    if len(diffs) < 2:
        return None
    half = _t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    mean = statistics.fmean(diffs)
    return mean - half, mean + half


def _fmt_ci(ci, fmt: str = "{:+.2f}", unit: str = "") -> str:
    return "" if ci is None else f", paired 95% CI [{fmt.format(ci[0])}{unit}, {fmt.format(ci[1])}{unit}]"


def findings(cfg: TaskConfig, summary: dict) -> list[dict]:
    """The issue's checks on this task, each {'claim', 'holds' (True/False/None), 'text'}."""
    out = []
    fp32, full = summary.get("fp32"), summary.get(FULL)
    n = len(full["finals"]) if full else 0
    few = f" Only {n} seed(s): the claim asks for at least 3 (use --full or --seeds 3)." if n < 3 else ""
    if cfg.metric == "test_acc":
        if fp32 and full:
            gap = full["mean"] - fp32["mean"]
            holds = gap >= -ACC_TOLERANCE
            out.append({"claim": f"full recipe within {ACC_TOLERANCE} points of fp32 (or better)", "holds": holds,
                        "text": f"{FULL}: {full['mean']:.2f}% +- {full['std']:.2f} vs fp32 {fp32['mean']:.2f}% +- "
                                f"{fp32['std']:.2f} over {n} seed(s): gap {gap:+.2f} points"
                                f"{_fmt_ci(paired_ci(_per_seed(full, fp32)))} -> "
                                f"{'holds' if holds else 'DOES NOT hold'}.{few}"})
        if full:
            worse = []
            lines = []
            for name in ABLATIONS:
                a = summary.get(name)
                if a is None:
                    continue
                c = compare(cfg.metric, a, full)
                d, se, pairs, visible = c["diff"], c["se"], c["n"], c["worse"]
                if visible:
                    worse.append(name)
                stats = (f", paired SE {se:.2f} over {pairs} seeds (unpaired SE {_diff_se(a, full):.2f})"
                         f"{_fmt_ci(c['ci'])}; per seed {', '.join(f'{x:+.2f}' for x in c['per_seed'])}"
                         if pairs > 1 else "")
                lines.append(f"{name} {a['mean']:.2f}% ({d:+.2f} points vs the full recipe{stats}; "
                             f"{a['gap_to_fp32']:+.2f} vs fp32)"
                             f"{f' VISIBLY WORSE ({-d - ACC_TOLERANCE:.2f} points beyond the threshold)' if visible else ''}")
            if lines:
                out.append({
                    "claim": "at least one ablation visibly worse than the full recipe "
                             f"(by > {ACC_TOLERANCE} points and > {VISIBLE_SE:g} standard errors of the per-seed "
                             "difference)",
                    "holds": bool(worse),
                    "text": ("; ".join(lines) + ". " +
                             (f"Visibly worse: {', '.join(worse)}." if worse else "No ablation is visibly worse.") + few),
                })
    else:
        if fp32 and full:
            rel = (full["mean"] - fp32["mean"]) / fp32["mean"]
            holds = rel <= LOSS_TOLERANCE
            out.append({"claim": f"full recipe's validation loss within {100 * LOSS_TOLERANCE:g}% of fp32", "holds": holds,
                        "text": f"{FULL}: {full['mean']:.4f} +- {full['std']:.4f} vs fp32 {fp32['mean']:.4f} +- "
                                f"{fp32['std']:.4f} nats/byte over {n} seed(s): {100 * rel:+.2f}%"
                                f"{_fmt_ci(paired_ci([100 * (x - y) / y for x, y in _pairs(full, fp32)]), unit='%')} -> "
                                f"{'holds' if holds else 'DOES NOT hold'}"
                                + (f" (per seed {', '.join(f'{100 * (x - y) / y:+.2f}%' for x, y in _pairs(full, fp32))})"
                                   if n > 1 else "") + "."})
    out += paper_claims(cfg, summary)
    dyn, enh = summary.get("fp8+dynamic-ls"), summary.get("fp8+enhanced-ls")
    if dyn and enh and dyn.get("min_scale") is not None:
        same = dyn["finals"] == enh["finals"]
        floor_hit = dyn["min_scale"] < cfg.ls_floor
        out.append({
            "claim": "enhanced vs dynamic loss scaling (for information)", "holds": None,
            "text": f"{'identical final results' if same else 'final results differ'} "
                    f"(fp8+enhanced-ls {enh['mean']:.4g} vs fp8+dynamic-ls {dyn['mean']:.4g}); the dynamic scale's "
                    f"lowest value over all seeds was 2^{math.log2(dyn['min_scale']):g}, "
                    f"{'below' if floor_hit else 'never below'} the enhanced floor 2^{math.log2(cfg.ls_floor):g}"
                    + ("" if floor_hit else ", so the floor never acted in this configuration") + ".",
        })
    return out


# The seed paper's claims, each as (claim, arm, reference, direction): "worse" holds when the arm
# is visibly worse than the reference, "better" when visibly better.
CLAIMS = (
    ("vanilla FP8 (E5M2 for every role, round to nearest, no loss scaling) is visibly worse than fp32",
     "fp8-vanilla", "fp32", "worse"),
    ("loss scaling recovers what vanilla FP8 loses: dynamic loss scaling visibly better than vanilla",
     "fp8+dynamic-ls", "fp8-vanilla", "better"),
    ("stochastic rounding of the errors and weight gradients matters: round-to-nearest visibly worse than the "
     "full recipe", "abl-nearest-grads", FULL, "worse"),
    ("stochastic rounding of the fp16 master-weight update matters: round-to-nearest visibly worse than the full "
     "recipe", "abl-nearest-master", FULL, "worse"),
    ("the first and last layers need 16 bits: the full recipe with them in fp8 too is visibly worse",
     "mellempudi2019-all-fp8", FULL, "worse"),
    ("enhanced loss scaling beats plain dynamic scaling where its floor acts: visibly better than dynamic "
     "scaling from the same start", "fp8+enhanced-ls-high", "fp8+dynamic-ls-high", "better"),
)


def compare(metric: str, a: dict, b: dict) -> dict:
    """``a`` against ``b`` per seed: 'diff' (points of accuracy, or % of b's validation loss; positive
    is better for ``a``), its paired SE, the paired 95% CI, the per-seed values, and whether ``a`` is
    'visibly' better / worse (beyond the tolerance and, with 2+ seeds, 2 paired standard errors).

    The arms of one seed share initial weights and data order, so the per-seed difference
    removes the seed-to-seed spread that both arms share; this is the comparison the design is for."""
    if metric == "test_acc":
        per_seed, tol = _per_seed(a, b), ACC_TOLERANCE
    else:
        per_seed, tol = [-100 * (x - y) / y for x, y in _pairs(a, b)], 100 * LOSS_TOLERANCE
    n = len(per_seed)
    diff = statistics.fmean(per_seed) if per_seed else math.nan
    se = statistics.stdev(per_seed) / math.sqrt(n) if n > 1 else 0.0
    beyond = lambda d: abs(d) > tol and (n < 2 or abs(d) > VISIBLE_SE * se)  # noqa: E731
    return {"diff": diff, "se": se, "n": n, "ci": paired_ci(per_seed), "per_seed": per_seed,
            "better": diff > 0 and beyond(diff), "worse": diff < 0 and beyond(diff), "tolerance": tol}


def _fmt_compare(metric: str, c: dict) -> str:
    unit = " points" if metric == "test_acc" else "% of the loss"
    text = f"{c['diff']:+.2f}{unit} (positive: better)"
    if c["n"] > 1:
        text += (f", paired SE {c['se']:.2f}{_fmt_ci(c['ci'])}; per seed "
                 + ", ".join(f"{x:+.2f}" for x in c["per_seed"]))
    return text


def _value(metric: str, s: dict) -> str:
    return f"{s['mean']:.2f}%" if metric == "test_acc" else f"{s['mean']:.4f}"


def paper_claims(cfg: TaskConfig, summary: dict) -> list[dict]:
    """Each claim of :data:`CLAIMS` whose arms ran, and the static loss-scale sweep, the floor's
    action and (text) the fp32 spread and the curve's flatness as notes."""
    metric, out = cfg.metric, []
    n_seeds = len(summary["fp32"]["finals"]) if "fp32" in summary else 0
    few = f" Only {n_seeds} seed(s): a claim needs at least 3 (use --full)." if n_seeds < 3 else ""
    for claim, arm, ref, direction in CLAIMS:
        a, b = summary.get(arm), summary.get(ref)
        if a is None or b is None:
            continue
        c = compare(metric, a, b)
        holds = c[direction] if c["n"] else None  # no seed ran both arms: no verdict
        note = ""
        if arm == "fp8+enhanced-ls-high":
            acted = a.get("floor_raises_per_run")
            if not acted:
                holds = None
                note = f" The floor 2^{math.log2(cfg.ls_high_floor):g} never acted, so this says nothing about it."
            else:
                note = (f" The floor 2^{math.log2(cfg.ls_high_floor):g} raised the scale on {acted:.1f} steps per run "
                        f"(of {a['steps']}; {a['skipped_steps']:.1f} steps skipped per run), first at step "
                        f"{a['floor_first_step']}, last at step {a['floor_last_step']} over the seeds.")
        verdict = {True: "holds", False: "DOES NOT hold", None: "no verdict"}[holds]
        text = (f"{arm} {_value(metric, a)} vs {ref} {_value(metric, b)}: {_fmt_compare(metric, c)}; "
                f"threshold {c['tolerance']:g}{' points' if metric == 'test_acc' else '%'}"
                f"{' and 2 paired SE' if c['n'] > 1 else ''} -> {verdict}.{note}")
        out.append({"claim": claim, "holds": holds, "text": text + few})
    dyn = summary.get("fp8+dynamic-ls")
    sweep = [(name, s) for name, s in summary.items() if name.startswith("fp8+static-ls")]
    if sweep and dyn:
        parts = []
        for name, s in sweep:
            c = compare(metric, s, dyn)
            parts.append(f"{name} {_value(metric, s)} ({_fmt_compare(metric, c).split(' (')[0]} vs dynamic; "
                         f"underflow {_fmt_frac(s['underflow_fraction'])}, skipped {s['skipped_steps']:.0f} / "
                         f"{s['steps']}{', ' + str(s['nonfinite_losses']) + ' non-finite losses' if s['nonfinite_losses'] else ''})")
        out.append({"claim": "static loss-scale sweep against dynamic scaling (for information)", "holds": None,
                    "text": f"fp8+dynamic-ls {_value(metric, dyn)} (underflow {_fmt_frac(dyn['underflow_fraction'])}); "
                            + "; ".join(parts) + "."})
    fp32 = summary.get("fp32")
    if metric == "val_loss" and fp32:
        spread = (f"fp32 over {n_seeds} seeds: {fp32['mean']:.4f} +- {fp32['std']:.4f} "
                  f"({100 * fp32['std'] / fp32['mean']:.2f}% relative), range [{min(fp32['finals']):.4f}, "
                  f"{max(fp32['finals']):.4f}]")
        tail = fp32.get("tail_change")
        if tail is not None:
            spread += (f"; the mean validation loss changed by {100 * tail:+.2f}% over the last quarter of training "
                       f"({'flattened' if abs(tail) < 0.01 else 'still falling' if tail < 0 else 'rising'}: "
                       "'flattened' is under 1%)")
        out.append({"claim": "fp32 baseline's stability across seeds and convergence (for information)", "holds": None,
                    "text": spread + "."})
    return out


# ----------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict:
    import numpy
    import torch
    import triton

    import tritonfp8
    from ..backend import resolve

    try:
        import matplotlib
        mpl = matplotlib.__version__
    except ImportError:
        mpl = None
    env = {
        "python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
        "numpy": numpy.__version__, "matplotlib": mpl, "tritonfp8": tritonfp8.__version__, "git_commit": _git_commit(),
        "platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "device": device,
        "backend": resolve(device),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


# ----------------------------------------------------------------------------
# Markdown, JSON, plots
# ----------------------------------------------------------------------------

_METRIC_LABEL = {"test_acc": "test accuracy (%)", "val_loss": "validation loss (nats/byte)"}


def _fmt_frac(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.3g}%" if x else "0"


def markdown(result: dict) -> str:
    lines = [f"# tritonfp8 reproduce: {', '.join(result['tasks'])}", ""]
    env = result["environment"]
    lines += [
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; wall time {result['wall_s'] / 60:.1f} min"
        f"{' (this invocation; %d runs resumed from an earlier one)' % result['resumed_runs'] if result.get('resumed_runs') else ''}"
        f" with {result['workers']} worker "
        f"process(es) x {result['threads']} thread(s); {env['cpu']} ({env['cpu_count']} cores"
        f"{', load average at start %.1f' % env['load_average'][0] if env.get('load_average') else ''}); "
        f"backend `{env['backend']}` on {env['device']}.  ",
        f"Versions: tritonfp8 {env['tritonfp8']} (commit {env['git_commit']}), torch {env['torch']}, "
        f"triton {env['triton']}, numpy {env['numpy']}, Python {env['python']}."
        + (f"  \nSummaries, findings and plots rebuilt from results.json by `--from-results` on "
           f"{result['rebuilt']['date']} (commit {result['rebuilt']['git_commit']}); the runs are unchanged."
           if result.get("rebuilt") else ""),
        "",
        "Arms (all from the same initial weights and data order per seed):",
        "",
    ]
    for name in result["arms"]:
        lines.append(f"- `{name}`: {ARMS[name].description}")
    for task, t in result["results"].items():
        cfg = t["config"]
        metric = cfg["task"] == "text-gpt" and "val_loss" or "test_acc"
        lines += ["", f"## {task}", "", _task_intro(task, t), ""]
        lines += _summary_table(metric, t["summary"])
        n = len(next(iter(t["summary"].values()))["finals"])
        lines += ["", f"Mean +- standard deviation over {n} seed(s)"
                      f"{' [min, max]' if metric == 'test_acc' else ''}. Error underflow: nonzero error values "
                      "(gradients w.r.t. the outputs of the fp8 layers, after loss scaling) that the fp8 cast "
                      "flushed to zero, out of all nonzero ones, over the run; saturation: error values that "
                      "rounded above the format's max. Step time: median per training step.", ""]
        lines += ["Layers in fp8 (from the fp8 autocast summary; every other layer, BatchNorm / LayerNorm, "
                  "embeddings, the attention core and the loss run in high precision):", ""]
        seen = {}
        for name, s in t["summary"].items():
            key = (tuple(s["fp8_layers"]), tuple(s["high_precision_layers"]))
            seen.setdefault(key, []).append(name)
        for (fp8, hp), names in seen.items():
            lines.append(f"- {', '.join(f'`{x}`' for x in names)}: fp8: {', '.join(fp8) or 'none'}; "
                         f"high precision: {', '.join(hp) or ('all' if not fp8 else 'none')}")
        lines += ["", "Findings:", ""]
        for f in t["findings"]:
            mark = {True: "holds", False: "DOES NOT hold", None: "note"}[f["holds"]]
            lines.append(f"- **{f['claim']}** ({mark}): {f['text']}")
        for p in t.get("plots", []):
            lines += ["", f"![{task}]({p})"]
    lines += ["", "Generated by `python -m tritonfp8 reproduce`; every number is in `results.json`.", ""]
    return "\n".join(lines)


def _summary_table(metric: str, summary: dict, saturation: bool = True) -> list[str]:
    """Markdown table rows: one per arm (mean over seeds, gap to fp32, skips, underflow, step time)."""
    better = "lower is better" if metric == "val_loss" else "higher is better"
    lines = [
        f"| arm | {_METRIC_LABEL[metric]} ({better}) | gap to fp32 | skipped steps | error underflow | "
        + ("error saturation | " if saturation else "") + "step time vs fp32 (wall / CPU) |",
        "|---|---|---|---|---|" + ("---|" if saturation else "") + "---|",
    ]
    for name, s in summary.items():
        if metric == "val_loss":
            val = f"{s['mean']:.4f} +- {s['std']:.4f}"
            gap = "-" if name == "fp32" else f"{s['gap_to_fp32']:+.4f} ({100 * s['rel_gap_to_fp32']:+.2f}%)"
        else:
            val = f"{s['mean']:.2f} +- {s['std']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"
            gap = "-" if name == "fp32" else f"{s['gap_to_fp32']:+.2f}"
        nf = f", {s['nonfinite_losses']} non-finite losses" if s["nonfinite_losses"] else ""
        lines.append(
            f"| `{name}` | {val} | {gap} | {s['skipped_steps']:.0f} / {s['steps']}{nf} | "
            f"{_fmt_frac(s['underflow_fraction'])} | "
            + (f"{_fmt_frac(s['saturation_fraction'])} | " if saturation else "")
            + f"{s['step_time_vs_fp32']:.1f}x / {s['step_cpu_vs_fp32']:.1f}x ({1e3 * s['step_time_s']:.0f} ms) |")
    return lines


README_BEGIN = ("<!-- reproduce:begin: written by `python -m tritonfp8 reproduce --readme`; "
                "edits between these markers are overwritten -->")
README_END = "<!-- reproduce:end -->"


def readme_section(result: dict, out_dir: Path, readme: Path) -> str:
    """The README's view of a run: where it came from, a table and the findings per task, the curves."""
    env = result["environment"]
    report_link = os.path.relpath(out_dir / "report.md", readme.parent)
    lines = [
        f"Last run: `{result['command']}` on {result['date'][:10]}, {result['wall_s'] / 60:.0f} min wall"
        f"{' (this invocation; %d runs resumed)' % result['resumed_runs'] if result.get('resumed_runs') else ''}"
        f" with {result['workers']} worker(s) x {result['threads']} thread(s) on {env['cpu_count']} x {env['cpu']}, "
        f"backend `{env['backend']}` on {env['device']}, commit {str(env['git_commit'])[:12]}. "
        f"Full report: [`{report_link}`]({report_link}).",
    ]
    for task, t in result["results"].items():
        metric = "val_loss" if task == "text-gpt" else "test_acc"
        n = len(next(iter(t["summary"].values()))["finals"])
        lines += ["", f"**{task}**: {_task_intro(task, t)} Mean +- std over {n} seed(s).", ""]
        lines += _summary_table(metric, t["summary"], saturation=False)
        lines.append("")
        for f in t["findings"]:
            mark = {True: "HOLDS", False: "DOES NOT HOLD", None: "note"}[f["holds"]]
            lines.append(f"- {mark}: {f['claim']}. {f['text']}")
        for p in t.get("plots", [])[:1]:
            rel = os.path.relpath(out_dir / p, readme.parent)
            lines += ["", f"![{task} curves]({rel})"]
    return "\n".join(lines)


def readme_parts(readme: Path) -> tuple[str, str]:
    """The text of ``readme`` before :data:`README_BEGIN` and after :data:`README_END` (ValueError without them)."""
    text = readme.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or text.index(README_BEGIN) > text.index(README_END):
        raise ValueError(f"{readme} must contain these two marker lines, once each and in this order:\n"
                         f"{README_BEGIN}\n{README_END}")
    head, rest = text.split(README_BEGIN, 1)
    return head, rest.split(README_END, 1)[1]


def update_readme(readme: Path, section: str) -> None:
    """Replace the text between :data:`README_BEGIN` and :data:`README_END` in ``readme`` with ``section``."""
    head, tail = readme_parts(readme)
    readme.write_text(f"{head}{README_BEGIN}\n{section}\n{README_END}{tail}")


def _task_intro(task: str, t: dict) -> str:
    cfg, data = t["config"], t["dataset"]
    if task == "text-gpt":
        return (f"Byte-level GPT ({cfg['n_layers']} layers, d_model {cfg['d_model']}, {cfg['n_heads']} heads, "
                f"context {cfg['seq_len']}) on {data['name']}: {data['bytes'] / 1e6:.1f} MB in {data['files']} files "
                f"(sha256 {data['sha256'][:12]}), last 10% for validation ({data['val_tokens']} predicted bytes). "
                f"{cfg['epochs']} x {cfg['steps_per_epoch']} steps of batch {cfg['batch_size']}, "
                f"{cfg['optimizer']} lr {cfg['lr']}.")
    model = (f"CNN (conv {cfg['cnn_channels'][0]}-{cfg['cnn_channels'][1]}, fc {cfg['cnn_hidden']})"
             if task == "fashion-cnn" else f"ResNet (width {cfg['resnet_width']}, {cfg['resnet_blocks']} block(s) per stage)")
    return (f"{model} on Fashion-MNIST: {data['train_images']} training images, {cfg['epochs']} epoch(s) of batch "
            f"{cfg['batch_size']} ({cfg['optimizer']} lr {cfg['lr']}, momentum {cfg['momentum']}, weight decay "
            f"{cfg['weight_decay']}, cosine); final accuracy on {data['test_images']} test images, curves on "
            f"{cfg['curve_eval_size']} held-out training images.")


_PER_STEP = 64  # a list longer than this is a per-step series: 6 significant digits keep the file small


def _round(x, digits=10):
    """Floats to ``digits`` significant digits (enough to rebuild the summaries from the file), per-step
    series to 6; non-finite floats as strings."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, 6 if len(x) > _PER_STEP else digits) for v in x]
    return x


_FLAT_LIST = re.compile(r"\[\s*([^\[\]{}]*?)\s*\]")


def write_json(result: dict, path: Path) -> None:
    """Indented JSON with every list that holds no list or dict on one line (per-step arrays stay compact)."""
    text = json.dumps(_round(result), indent=1, sort_keys=False)
    text = _FLAT_LIST.sub(lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text)
    path.write_text(text + "\n")


def plots(task: str, runs: list[dict], summary: dict, out_dir: Path) -> list[str]:
    """PNG plots: curves per arm (train loss, validation metric) and loss scale / underflow per arm."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(ARM_ORDER)}
    by_arm: dict[str, list] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], []).append(r)
    metric = runs[0]["metric"]
    files = []

    def mean_curve(rs, key):
        steps = [p["step"] for p in rs[0]["curve"]]
        vals = []
        for i in range(len(steps)):
            xs = [r["curve"][i][key] for r in rs if i < len(r["curve"]) and r["curve"][i][key] is not None]
            vals.append(_mean(xs) if xs else math.nan)
        return steps, vals

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rs in by_arm.items():
        style = "-" if name in ("fp32", FULL) else "--"
        width = 2.2 if name in ("fp32", FULL) else 1.2
        for ax, key in ((axes[0], "train_loss"), (axes[1], "val")):
            s, v = mean_curve(rs, key)
            ax.plot(s, v, style, color=colors[name], lw=width, marker="o", ms=3, label=name)
    axes[0].set_title("training loss (mean over each evaluation interval)")
    axes[0].set_xlabel("step")
    axes[1].set_title(("validation accuracy (%)" if metric == "test_acc" else "validation loss (nats/byte)"))
    axes[1].set_xlabel("step")
    if metric == "test_acc":
        finals = [p["val"] for rs in by_arm.values() for r in rs for p in r["curve"][len(r["curve"]) // 2:]]
        if finals:
            axes[1].set_ylim(max(0.0, min(finals) - 1.0), min(100.0, max(finals) + 0.5))
    n = len(next(iter(by_arm.values())))
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{task}: mean over {n} seed(s)")
    fig.tight_layout()
    name = f"{task}-curves.png"
    fig.savefig(out_dir / name, dpi=90)
    plt.close(fig)
    files.append(name)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, rs in by_arm.items():
        r = min(rs, key=lambda r: r["seed"])
        if ARMS[arm].loss_scaling:
            xs = [step for step, _ in r["loss_scale"]] + [r["steps"]]
            ys = [scale for _, scale in r["loss_scale"]]
            axes[0].step(xs, ys + ys[-1:], where="post", color=colors[arm], label=arm)
        pts = [(p["step"], p["underflow_fraction"]) for p in r["curve"] if p["underflow_fraction"]]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", ms=3, color=colors[arm], label=arm)
    axes[0].set_yscale("log", base=2)
    axes[0].set_title("loss scale (seed %d)" % min(r["seed"] for r in runs))
    axes[0].set_xlabel("step")
    axes[1].set_yscale("log")
    axes[1].set_title("error values flushed to zero by the fp8 cast (fraction of nonzero)")
    axes[1].set_xlabel("step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    name = f"{task}-loss-scale.png"
    fig.savefig(out_dir / name, dpi=90)
    plt.close(fig)
    files.append(name)
    name = _layer_underflow_plot(task, by_arm, out_dir, plt)
    if name:
        files.append(name)
    return files


# the arms whose per-layer underflow is plotted, where they ran
UNDERFLOW_PLOT_ARMS = ("fp8-vanilla", "fp8+dynamic-ls", "fp8+static-ls-2^10", "mellempudi2019", "mellempudi2019-all-fp8",
                       "hybrid")


def _layer_underflow_plot(task: str, by_arm: dict, out_dir: Path, plt) -> Optional[str]:
    """One panel per arm of :data:`UNDERFLOW_PLOT_ARMS`: each fp8 layer's share of nonzero error
    values flushed to zero in each evaluation interval, mean over seeds."""
    arms = [a for a in UNDERFLOW_PLOT_ARMS if a in by_arm and by_arm[a][0]["curve"]
            and by_arm[a][0]["curve"][0].get("layer_underflow")]
    if not arms:
        return None
    cols = min(3, len(arms))
    rows = math.ceil(len(arms) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False, sharey=True)
    for ax, arm in zip(axes.flat, arms):
        rs = by_arm[arm]
        layers = list(rs[0]["curve"][0]["layer_underflow"])
        steps = [p["step"] for p in rs[0]["curve"]]
        for layer in layers:
            ys = []
            for i in range(len(steps)):
                xs = [r["curve"][i]["layer_underflow"].get(layer) for r in rs if i < len(r["curve"])]
                xs = [x for x in xs if x is not None]
                ys.append(_mean(xs) if xs else math.nan)
            ax.plot(steps, [max(y, 1e-7) for y in ys], marker="o", ms=2, lw=1, label=layer)
        ax.set_yscale("log")
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=5, ncol=2)
    for ax in list(axes.flat)[len(arms):]:
        ax.axis("off")
    fig.suptitle(f"{task}: error values flushed to zero per fp8 layer (fraction of nonzero, per evaluation "
                 f"interval, mean over seeds; floored at 1e-7)", fontsize=10)
    fig.tight_layout()
    name = f"{task}-layer-underflow.png"
    fig.savefig(out_dir / name, dpi=90)
    plt.close(fig)
    return name
