"""``python -m tritonfp8 reproduce``: a tiny end-to-end run of every arm (synthetic Fashion-MNIST files and
a slice of the text corpus), the error paths, the findings logic and the progress bar."""
from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import statistics

import pytest

from test_data import make_fashion_dir
from tritonfp8 import cli
from tritonfp8.reproduce import config as rconfig
from tritonfp8.reproduce import report, runner

TINY = ["--set", "train_size=256", "--set", "val_size=64", "--set", "curve_eval_size=32", "--set", "test_size=64",
        "--set", "evals_per_epoch=1", "--set", "steps_per_epoch=2", "--set", "val_windows=2",
        "--set", "corpus_bytes=200000", "--set", "eval_batch_size=128"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    make_fashion_dir(root / "fm", n_train=320, n_test=64)
    out = root / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["reproduce", "--task", "fashion-cnn", "--task", "text-gpt", "--data-dir", str(root / "fm"),
                       "--out", str(out), "--jobs", "1", "--threads", "1", "--device", "cpu", *TINY])
    return rc, out, err.getvalue()


def test_smoke_run_writes_every_arm(smoke):
    rc, out, err = smoke
    assert rc == 0, err
    assert "ETA" in err and "100.0%" in err  # the progress bar ran to the end
    result = json.loads((out / "results.json").read_text())
    assert set(result["results"]) == {"fashion-cnn", "text-gpt"}
    assert result["arms"] == list(rconfig.ARM_ORDER)
    for key in ("torch", "triton", "numpy", "python", "tritonfp8", "backend"):
        assert result["environment"][key]
    for task, t in result["results"].items():
        assert t["config"]["task"] == task and t["dataset"]
        assert [r["arm"] for r in t["runs"]] == list(rconfig.ARM_ORDER)
        for r in t["runs"]:
            assert math.isfinite(r["final"]) and r["steps"] == 2 and r["loss_scale"][0][0] == 0
            assert r["curve"] and r["step_time_s"] > 0
            assert isinstance(r["floor_steps"], list)
            if rconfig.ARMS[r["arm"]].is_fp8:
                assert r["error_nonzero"] > 0 and 0 <= r["underflow_fraction"] <= 1
                assert any(v["fp8_calls"] for v in r["layers"].values())
                # per-layer underflow of the interval: one entry per fp8 layer, a fraction where it cast errors
                per_layer = r["curve"][-1]["layer_underflow"]
                fp8 = {k.rsplit(".", 1)[0] for k, v in r["layers"].items() if v["fp8_calls"]}
                assert set(per_layer) == fp8
                assert all(f is None or 0 <= f <= 1 for f in per_layer.values())
                assert any(f is not None for f in per_layer.values())
            else:
                assert r["underflow_fraction"] is None and r["curve"][-1]["layer_underflow"] is None
        s = t["summary"]
        assert set(s) == set(rconfig.ARM_ORDER) and s["fp32"]["gap_to_fp32"] == 0
        assert s["mellempudi2019"]["fp8_layers"] and "conv1" not in s["mellempudi2019"]["fp8_layers"]
        assert t["findings"]
    # fp16 master weights exactly for the fp8 layers of the fp16 arms
    cnn = {r["arm"]: r for r in result["results"]["fashion-cnn"]["runs"]}
    assert cnn["mellempudi2019"]["master_dtypes"]["fc1.weight"] == "float16"
    assert cnn["mellempudi2019"]["master_dtypes"]["conv1.weight"] == "float32"
    assert set(cnn["fp8-vanilla"]["master_dtypes"].values()) == {"float32"}
    md = (out / "report.md").read_text()
    assert "| arm |" in md and "Findings" in md and "`mellempudi2019`" in md and "step time vs fp32" in md
    # the quick configuration's wall time and the machine it ran on are in the report
    assert f"wall time {result['wall_s'] / 60:.1f} min" in md
    assert f"({result['environment']['cpu_count']} cores" in md
    pytest.importorskip("matplotlib")
    for task in ("fashion-cnn", "text-gpt"):
        for kind in ("curves", "loss-scale", "layer-underflow"):
            assert (out / f"{task}-{kind}.png").read_bytes()[:4] == b"\x89PNG"


def test_arms_start_from_the_same_weights_and_data(smoke):
    """Arms with the same forward numerics see bit-identical first losses: same init, same first batch."""
    rc, out, _ = smoke
    result = json.loads((out / "results.json").read_text())
    for task, t in result["results"].items():
        first = {r["arm"]: r["train_loss"][0] for r in t["runs"]}
        assert first["fp8-vanilla"] == first["fp8+dynamic-ls"] == first["fp8+enhanced-ls"], task
        assert first["mellempudi2019"] == first["abl-nearest-master"], task
        assert first["fp32"] != first["fp8-vanilla"]  # the fp8 forward differs from fp32 (not a vacuous check)
        assert abs(first["fp32"] - first["fp8-vanilla"]) < 0.05 * first["fp32"]


def test_run_one_is_deterministic():
    cfg = rconfig.task_config("text-gpt", steps_per_epoch=2, evals_per_epoch=1, val_windows=2, corpus_bytes=100_000)
    a = runner.run_one(cfg, rconfig.ARMS["mellempudi2019"], seed=5)
    b = runner.run_one(cfg, rconfig.ARMS["mellempudi2019"], seed=5)
    c = runner.run_one(cfg, rconfig.ARMS["mellempudi2019"], seed=6)
    assert a["train_loss"] == b["train_loss"] and a["final"] == b["final"]
    assert c["train_loss"] != a["train_loss"]


def test_an_interrupted_invocation_resumes(tmp_path, monkeypatch):
    from tritonfp8 import reproduce as rp

    cfg = rconfig.task_config("text-gpt", steps_per_epoch=2, evals_per_epoch=1, val_windows=2, corpus_bytes=100_000)
    calls = []
    real = runner.run_one

    def flaky(cfg, arm, seed, progress=None):
        calls.append(arm.name)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return real(cfg, arm, seed, progress)

    monkeypatch.setattr(runner, "run_one", flaky)
    arms = ["fp8-vanilla", "hybrid"]  # with fp32: three runs
    with pytest.raises(RuntimeError, match="interrupted"):
        rp.reproduce([cfg], arms, tmp_path, show_progress=False)
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2
    calls.clear()
    result = rp.reproduce([cfg], arms, tmp_path, show_progress=False)
    assert calls == ["hybrid"] and result["resumed_runs"] == 2
    assert [r["arm"] for r in result["results"]["text-gpt"]["runs"]] == ["fp32", "fp8-vanilla", "hybrid"]
    assert not (tmp_path / "runs").exists() and (tmp_path / "results.json").is_file()
    assert "2 runs resumed" in (tmp_path / "report.md").read_text()


def test_a_run_is_keyed_by_its_own_configuration():
    import dataclasses

    from tritonfp8 import reproduce as rp

    cfg = rconfig.task_config("text-gpt", full=True)
    arm = rconfig.ARMS["mellempudi2019"]
    key = rp._run_file(cfg, arm, 0)
    assert rp._run_file(dataclasses.replace(cfg, arms=("fp32",)), arm, 0) == key  # other arms: same run
    assert rp._run_file(dataclasses.replace(cfg, lr=1e-3), arm, 0) != key
    assert rp._run_file(cfg, arm, 1) != key and rp._run_file(cfg, rconfig.ARMS["hybrid"], 0) != key


def test_readme_section_is_written_between_the_markers(smoke, tmp_path, capsys):
    rc, smoke_out, err = smoke
    assert rc == 0, err
    out = tmp_path / "run"
    shutil.copytree(smoke_out, out)
    original = json.loads((out / "results.json").read_text())
    stale = json.loads((out / "results.json").read_text())
    for t in stale["results"].values():
        t["findings"] = [{"claim": "stale", "holds": None, "text": "stale"}]
    (out / "results.json").write_text(json.dumps(stale))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{report.README_BEGIN}\nstale table\n{report.README_END}\n\n## after\n")
    assert cli.main(["reproduce", "--from-results", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\n" + report.README_BEGIN) and text.endswith(report.README_END + "\n\n## after\n")
    assert "stale table" not in text
    result = json.loads((out / "results.json").read_text())
    # --from-results recomputed the summaries and findings from the stored runs
    for task, t in result["results"].items():
        assert t["findings"] == original["results"][task]["findings"]
        for arm, s in t["summary"].items():
            assert s["mean"] == pytest.approx(original["results"][task]["summary"][arm]["mean"], rel=1e-9)
    rebuilt_report = (out / "report.md").read_text()
    assert "stale" not in rebuilt_report and "rebuilt from results.json by `--from-results`" in rebuilt_report
    for task, t in result["results"].items():
        assert f"**{task}**" in text
        assert "| `mellempudi2019` |" in text
        for f in t["findings"]:
            assert f["claim"] in text
    # the plot link is relative to the README and points at the file
    link = text.split("![fashion-cnn curves](", 1)[1].split(")", 1)[0]
    assert (readme.parent / link).resolve() == (out / "fashion-cnn-curves.png").resolve()
    # a second write replaces the section instead of adding one
    assert cli.main(["reproduce", "--from-results", str(out), "--readme", str(readme)]) == 0
    assert readme.read_text() == text


def test_readme_without_markers_is_refused_before_training(tmp_path, capsys, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    monkeypatch.setattr(runner, "run_all", lambda *a, **k: pytest.fail("trained despite a bad --readme"))
    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", "--task", "text-gpt", "--readme", str(readme), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "reproduce:begin" in capsys.readouterr().err
    assert readme.read_text() == "# no markers\n"


def test_from_results_without_a_run_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["reproduce", "--from-results", str(tmp_path)])
    assert e.value.code == 2 and "results.json" in capsys.readouterr().err


def test_finishing_keeps_run_files_of_other_invocations(tmp_path):
    # Two invocations into the same --out (one task each): the first to finish must not delete the
    # other's saved runs.
    from tritonfp8 import reproduce as rp

    cfg = rconfig.task_config("text-gpt", steps_per_epoch=2, evals_per_epoch=1, val_windows=2, corpus_bytes=100_000)
    (tmp_path / "runs").mkdir()
    foreign = tmp_path / "runs" / "fashion-cnn.fp32.seed0.0123456789.json"
    foreign.write_text("{}")
    rp.reproduce([cfg], ["fp32"], tmp_path, show_progress=False)
    assert foreign.read_text() == "{}"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [foreign.name]


def test_missing_data_set_exits_with_instructions(tmp_path, capsys):
    rc = cli.main(["reproduce", "--task", "fashion-cnn", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "apt-get install -y dataset-fashion-mnist" in err and "--task text-gpt" in err
    assert not (tmp_path / "o").exists()


def test_corrupt_data_set_exits_with_a_clear_error(tmp_path, capsys):
    make_fashion_dir(tmp_path / "fm", n_train=320, n_test=64)
    path = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    rc = cli.main(["reproduce", "--task", "fashion-cnn", "--data-dir", str(tmp_path / "fm"),
                   "--out", str(tmp_path / "o"), "--jobs", "1", *TINY])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and "truncated or corrupt" in err and "Traceback" not in err


def test_bad_options_are_usage_errors(capsys):
    for argv in (["--set", "no_such_field=1"], ["--set", "lr"], ["--arms", "fp32,fp7"], ["--task", "imagenet"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["reproduce", *argv])
        assert info.value.code == 2
    assert rconfig.parse_override("lr=0.1") == ("lr", 0.1)
    assert rconfig.parse_override("optimizer=adamw") == ("optimizer", "adamw")
    assert rconfig.parse_override("cnn-channels=(8, 16)") == ("cnn_channels", (8, 16))


def test_presets_and_arms():
    quick, full = rconfig.task_config("fashion-cnn"), rconfig.task_config("fashion-cnn", full=True)
    assert quick.seeds == 1 and full.seeds >= 3 and full.epochs >= quick.epochs
    assert rconfig.task_config("fashion-cnn", full=True, seeds=5, epochs=None).seeds == 5
    a = rconfig.ARMS
    assert a["fp8-vanilla"].recipe.error.rounding == "nearest" and a["fp8-vanilla"].recipe.weight_grad.fmt == "e5m2"
    assert a["fp8-vanilla"].loss_scaling is None and a["fp8+enhanced-ls"].loss_scaling == "enhanced"
    assert a["mellempudi2019"].recipe.error.rounding == "stochastic" and a["mellempudi2019"].master_dtype == "float16"
    assert a["abl-nearest-grads"].recipe.error.rounding == "nearest"
    assert a["abl-nearest-grads"].recipe.weight_grad.rounding == "nearest"
    assert a["abl-nearest-master"].master_rounding == "nearest"
    assert [x.name for x in rconfig.select_arms(["hybrid"])] == ["fp32", "hybrid"]
    # the new arms: a static sweep, the floor that acts, the first / last layers in fp8
    assert [a[f"fp8+static-ls-2^{k}"].static_scale for k in rconfig.STATIC_SCALE_EXPONENTS] == [
        2.0**k for k in rconfig.STATIC_SCALE_EXPONENTS]
    assert a["fp8+enhanced-ls-high"].floor == "high" and a["fp8+enhanced-ls-high"].recipe == a["fp8-vanilla"].recipe
    everywhere = a["mellempudi2019-all-fp8"].recipe
    assert not everywhere.keep_first_conv and not everywhere.keep_last_linear
    assert everywhere.error == a["mellempudi2019"].recipe.error
    with pytest.raises(ValueError, match="static_scale"):
        rconfig.Arm("x", "x", recipe=rconfig.VANILLA, loss_scaling="static")
    with pytest.raises(ValueError, match="floor"):
        rconfig.Arm("x", "x", recipe=rconfig.VANILLA, loss_scaling="enhanced", floor="low")
    # per-task arms: the preset's, unless --arms names others; fp32 always
    for task in rconfig.TASKS:
        cfg = rconfig.task_config(task, full=True)
        assert cfg.seeds >= 5
        names = [x.name for x in rconfig.select_arms(None, cfg)]
        assert names[0] == "fp32" and {"fp8-vanilla", "mellempudi2019", "mellempudi2019-all-fp8"} <= set(names)
        assert [x.name for x in rconfig.select_arms(["hybrid"], cfg)] == ["fp32", "hybrid"]
    assert rconfig.task_config("text-gpt", full=True).n_layers >= 4
    assert rconfig.task_config("text-gpt", full=True).d_model >= 128
    with pytest.raises(ValueError, match="unknown arm"):
        rconfig.task_config("fashion-cnn", arms=("fp7",))


def test_scalers_of_the_loss_scaling_arms():
    cfg = rconfig.task_config("fashion-cnn", ls_floor=2.0**12, ls_high_floor=2.0**20)
    assert runner.build_scaler(cfg, rconfig.ARMS["fp8-vanilla"]) is None
    static = runner.build_scaler(cfg, rconfig.ARMS["fp8+static-ls-2^10"])
    assert static.mode == "static" and static.get_scale() == 2.0**10
    assert runner.build_scaler(cfg, rconfig.ARMS["fp8+enhanced-ls"]).get_floor() == 2.0**12
    high = runner.build_scaler(cfg, rconfig.ARMS["fp8+enhanced-ls-high"])
    assert high.get_floor() == 2.0**20 and high.get_scale() == 2.0**20  # the scale starts at the floor
    dynamic = runner.build_scaler(cfg, rconfig.ARMS["fp8+dynamic-ls"])
    assert dynamic.mode == "dynamic" and dynamic.get_scale() == cfg.ls_init_scale
    # the high floor's baseline: the same start, no floor
    same_start = runner.build_scaler(cfg, rconfig.ARMS["fp8+dynamic-ls-high"])
    assert same_start.mode == "dynamic" and same_start.get_scale() == 2.0**20 and same_start.get_floor() == 0


# ----------------------------------------------------------------------------
# Findings on hand-made summaries
# ----------------------------------------------------------------------------


def _arm(finals):
    mean = sum(finals) / len(finals)
    std = (sum((x - mean) ** 2 for x in finals) / (len(finals) - 1)) ** 0.5 if len(finals) > 1 else 0.0
    return {"finals": finals, "mean": mean, "std": std}


def test_findings_accuracy_claims():
    cfg = rconfig.task_config("fashion-cnn")
    s = {"fp32": _arm([90.0, 90.2, 90.4]), "mellempudi2019": _arm([90.0, 89.9, 90.1]),
         "fp8-vanilla": _arm([88.0, 88.2, 88.1]), "abl-nearest-master": _arm([89.8, 90.1, 89.9])}
    for v in s.values():
        v["gap_to_fp32"] = v["mean"] - s["fp32"]["mean"]
    f = report.findings(cfg, s)
    assert f[0]["holds"] is True and "gap -0.20 points" in f[0]["text"]
    assert f[1]["holds"] is True and "Visibly worse: fp8-vanilla." in f[1]["text"]
    assert "abl-nearest-master" in f[1]["text"] and "abl-nearest-master 89.93% (-0.07" in f[1]["text"]
    s["mellempudi2019"] = _arm([89.6, 89.9, 89.7])
    s["fp8-vanilla"] = _arm([89.2, 90.0, 88.6])  # 0.47 lower on average, but noisier than 2 standard errors
    for v in s.values():
        v["gap_to_fp32"] = v["mean"] - s["fp32"]["mean"]
    f = report.findings(cfg, s)
    assert f[0]["holds"] is False and "DOES NOT hold" in f[0]["text"]
    assert f[1]["holds"] is False and "No ablation is visibly worse" in f[1]["text"]
    # Arms of one seed share initial weights and data order: a gap that repeats in every seed is
    # visible even when the seed-to-seed spread (shared by both arms) is larger than the gap.
    s["mellempudi2019"] = _arm([90.4, 90.3, 89.8])
    s["fp8-vanilla"] = _arm([90.0, 89.9, 89.3])  # 0.4, 0.4, 0.5 lower
    for v in s.values():
        v["gap_to_fp32"] = v["mean"] - s["fp32"]["mean"]
    f = report.findings(cfg, s)
    assert report._diff_se(s["fp8-vanilla"], s["mellempudi2019"]) * 2 > 0.43  # unpaired: not visible
    assert f[1]["holds"] is True and "fp8-vanilla 89.73% (-0.43 points vs the full recipe, paired SE 0.03" in f[1]["text"]
    assert "per seed -0.40, -0.40, -0.50" in f[1]["text"] and "(0.13 points beyond the threshold)" in f[1]["text"]


def test_paired_confidence_interval():
    # diffs 1, 2, 3: mean 2, sd 1, t(2 dof) = 4.303 -> 2 +- 4.303 / sqrt(3)
    lo, hi = report.paired_ci([1.0, 2.0, 3.0])
    assert lo == pytest.approx(2 - 4.303 / 3 ** 0.5, abs=1e-9) and hi == pytest.approx(2 + 4.303 / 3 ** 0.5, abs=1e-9)
    assert report.paired_ci([0.5]) is None
    # 12 seeds: between table entries the smaller one's (wider) quantile, t(10) = 2.228
    diffs = [0.1 * i for i in range(12)]
    lo, hi = report.paired_ci(diffs)
    assert hi - lo == pytest.approx(2 * 2.228 * statistics.stdev(diffs) / 12 ** 0.5)
    assert report.paired_ci([1.0] * 40) == (1.0, 1.0)


def test_findings_give_paired_intervals():
    cfg = rconfig.task_config("fashion-cnn")
    s = {"fp32": _arm([90.0, 90.2, 90.4]), "mellempudi2019": _arm([90.4, 90.3, 89.8]),
         "fp8-vanilla": _arm([90.0, 89.9, 89.3])}
    for v in s.values():
        v["gap_to_fp32"] = v["mean"] - s["fp32"]["mean"]
    f = report.findings(cfg, s)
    lo, hi = report.paired_ci([0.4, 0.1, -0.6])  # full recipe - fp32, per seed
    assert f"gap -0.03 points, paired 95% CI [{lo:+.2f}, {hi:+.2f}]" in f[0]["text"]
    lo, hi = report.paired_ci([-0.4, -0.4, -0.5])
    assert f"paired 95% CI [{lo:+.2f}, {hi:+.2f}]; per seed -0.40, -0.40, -0.50" in f[1]["text"]
    one = {k: _arm(v["finals"][:1]) for k, v in s.items()}
    for v in one.values():
        v["gap_to_fp32"] = v["mean"] - one["fp32"]["mean"]
    assert "95% CI" not in report.findings(cfg, one)[0]["text"]  # one seed: no interval


def test_findings_say_whether_the_enhanced_floor_acted():
    cfg = rconfig.task_config("text-gpt", ls_floor=2.0**13)
    s = {"fp32": _arm([1.50, 1.52]), "mellempudi2019": _arm([1.52, 1.53]),
         "fp8+dynamic-ls": {**_arm([1.53, 1.54]), "min_scale": 2.0**14},
         "fp8+enhanced-ls": {**_arm([1.53, 1.54]), "min_scale": 2.0**14}}
    for v in s.values():
        v["rel_gap_to_fp32"] = 0.01
    note = report.findings(cfg, s)[-1]
    assert note["holds"] is None and "identical final results" in note["text"]
    assert "2^14, never below the enhanced floor 2^13, so the floor never acted" in note["text"]
    s["fp8+dynamic-ls"] = {**_arm([1.60, 1.70]), "min_scale": 2.0**5, "rel_gap_to_fp32": 0.1}
    note = report.findings(cfg, s)[-1]
    assert "final results differ" in note["text"] and "2^5, below the enhanced floor" in note["text"]


def test_findings_text_claim():
    cfg = rconfig.task_config("text-gpt")
    s = {"fp32": _arm([1.50, 1.52]), "mellempudi2019": _arm([1.52, 1.53])}
    s["mellempudi2019"]["rel_gap_to_fp32"] = (1.525 - 1.51) / 1.51
    f = report.findings(cfg, s)
    assert f[0]["holds"] is True and "+0.99%" in f[0]["text"]
    assert "(per seed +1.33%, +0.66%)" in f[0]["text"]
    lo, hi = report.paired_ci([100 * 0.02 / 1.50, 100 * 0.01 / 1.52])
    assert f"+0.99%, paired 95% CI [{lo:+.2f}%, {hi:+.2f}%]" in f[0]["text"]
    s["mellempudi2019"] = _arm([1.53, 1.54])
    assert report.findings(cfg, s)[0]["holds"] is False


def test_progress_bar_reports_eta():
    stream = io.StringIO()
    bar = runner.Progress(10.0, stream=stream, min_interval=0.0, log_interval=0.0)
    bar.start -= 30.0  # 30 s elapsed
    bar.update(2.5, note="task/arm", force=True)
    line = stream.getvalue().splitlines()[-1]
    assert "25.0%" in line and "elapsed 0:30" in line and "ETA 1:30" in line and "task/arm" in line
    bar.close()
    assert runner._fmt_time(3725) == "1:02:05" and runner._fmt_time(math.inf) == "--:--"


def _with_gaps(s):
    for v in s.values():
        v.setdefault("gap_to_fp32", v["mean"] - s["fp32"]["mean"])
        v.setdefault("rel_gap_to_fp32", (v["mean"] - s["fp32"]["mean"]) / s["fp32"]["mean"])
    return s


def _claim(findings, start):
    return next(f for f in findings if f["claim"].startswith(start))


def test_paper_claims_each_get_a_verdict():
    cfg = rconfig.task_config("fashion-cnn", ls_high_floor=2.0**22)
    s = _with_gaps({"fp32": _arm([90.0, 90.2, 90.4]), "mellempudi2019": _arm([90.0, 90.1, 90.3]),
                    "fp8-vanilla": _arm([80.0, 81.0, 79.0]), "fp8+dynamic-ls": _arm([90.0, 90.2, 90.3]),
                    "abl-nearest-grads": _arm([89.9, 90.1, 90.2]),
                    "mellempudi2019-all-fp8": _arm([88.0, 88.3, 88.1]),
                    "fp8+dynamic-ls-high": _arm([89.9, 90.1, 90.1]),
                    "fp8+enhanced-ls-high": {**_arm([90.0, 90.2, 90.3]), "floor_raises_per_run": 0, "steps": 100,
                                             "skipped_steps": 0}})
    f = report.findings(cfg, s)
    assert _claim(f, "vanilla FP8")["holds"] is True and "-10.20 points" in _claim(f, "vanilla FP8")["text"]
    assert _claim(f, "loss scaling recovers")["holds"] is True
    assert _claim(f, "stochastic rounding of the errors")["holds"] is False  # -0.07: within the tolerance
    assert "DOES NOT hold" in _claim(f, "stochastic rounding of the errors")["text"]
    assert _claim(f, "the first and last layers")["holds"] is True
    floor = _claim(f, "enhanced loss scaling beats")
    assert floor["holds"] is None and "never acted" in floor["text"] and "no verdict" in floor["text"]
    assert not any(x["claim"].startswith("stochastic rounding of the fp16") for x in f)  # its arm did not run
    s["fp8+enhanced-ls-high"].update(floor_raises_per_run=4.5, floor_first_step=12, floor_last_step=90,
                                     skipped_steps=4.5)
    floor = _claim(report.findings(cfg, s), "enhanced loss scaling beats")
    assert floor["holds"] is False and "raised the scale on 4.5 steps per run" in floor["text"]
    assert "first at step 12, last at step 90" in floor["text"] and "2^22" in floor["text"]
    assert "vs fp8+dynamic-ls-high" in floor["text"]  # against dynamic scaling from the same start
    # arms that share no seed give no verdict
    s["abl-nearest-grads"] = {**_arm([80.0, 80.0, 80.0]), "seeds": [7, 8, 9]}
    _with_gaps(s)
    assert _claim(report.findings(cfg, s), "stochastic rounding of the errors")["holds"] is None


def test_static_sweep_and_text_baseline_notes():
    cfg = rconfig.task_config("text-gpt")
    extra = {"underflow_fraction": 0.01, "skipped_steps": 0, "steps": 100, "nonfinite_losses": 0}
    s = _with_gaps({"fp32": {**_arm([1.50, 1.52, 1.51]), "tail_change": -0.004},
                    "mellempudi2019": _arm([1.52, 1.53, 1.52]),
                    "fp8+dynamic-ls": {**_arm([1.52, 1.53, 1.52]), **extra},
                    "fp8+static-ls-2^10": {**_arm([1.60, 1.62, 1.61]), **extra, "underflow_fraction": 0.4},
                    "fp8+static-ls-2^22": {**_arm([1.52, 1.53, 1.52]), **extra, "skipped_steps": 7}})
    f = report.findings(cfg, s)
    sweep = _claim(f, "static loss-scale sweep")["text"]
    # per seed -(1.60 - 1.52) / 1.52, -(1.62 - 1.53) / 1.53, -(1.61 - 1.52) / 1.52: mean -5.69%
    assert "fp8+static-ls-2^10 1.6100 (-5.69% of the loss vs dynamic; underflow 40%, skipped 0 / 100)" in sweep
    assert "fp8+static-ls-2^22 1.5233 (+0.00% of the loss vs dynamic; underflow 1%, skipped 7 / 100)" in sweep
    base = _claim(f, "fp32 baseline")["text"]
    assert "1.5100 +- 0.0100 (0.66% relative), range [1.5000, 1.5200]" in base
    assert "-0.40% over the last quarter of training (flattened" in base
    s["fp32"]["tail_change"] = -0.03
    assert "(still falling" in _claim(report.findings(cfg, s), "fp32 baseline")["text"]
    # the text task's claims compare relative losses: 5% worse is visibly worse
    s["fp8-vanilla"] = _arm([1.58, 1.60, 1.59])
    _with_gaps(s)
    vanilla = _claim(report.findings(cfg, s), "vanilla FP8")
    assert vanilla["holds"] is True and "% of the loss" in vanilla["text"]


def test_tail_change_of_the_mean_curve():
    runs = [{"curve": [{"val": v} for v in (3.0, 2.0, 1.6, 1.5, 1.45)]},
            {"curve": [{"val": v} for v in (3.0, 2.0, 1.6, 1.5, 1.35)]}]
    # 5 points: the last quarter starts at index 3 (1.5) and ends at 1.4 (the mean of the last points)
    assert report._tail_change(runs) == pytest.approx((1.4 - 1.5) / 1.5)
    assert report._tail_change([{"curve": [{"val": 1.0}] * 3}]) is None
