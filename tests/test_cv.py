"""End to end: a 2-fold × 1-epoch teacher CV run produces the documented tree, tables and resumes."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from kd_fracture import cv, metrics
from kd_fracture.train import engine
from kd_fracture.config import CVConfig, load_config
from kd_fracture.errors import UserError

DOCUMENTED = [
    "config.yaml", "env.json", "folds.csv",
    *[f"fold_{k}/{f}" for k in (0, 1) for f in ("checkpoint_best.safetensors", "history.csv",
                                                  "inner_val_predictions.csv", "oof_predictions.csv", "metrics.json",
                                                  "DONE")],
    "holdout/predictions.csv", "holdout/metrics.json",
    *[f"tables/{t}.{ext}" for t in ("cv_folds", "holdout", "per_body_part") for ext in ("csv", "md", "tex")],
    "plots/roc.png", "plots/pr.png", "plots/calibration.png", "plots/confusion.png", "plots/curves.png", "summary.md",
]


def cli_args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def test_two_fold_run_produces_documented_tree(tiny_cv_overrides, tmp_path, capsys):
    rc = cv.main(cli_args(tiny_cv_overrides))
    assert rc == 0
    run = tmp_path / "run"
    missing = [f for f in DOCUMENTED if not (run / f).exists()]
    assert not missing, missing
    table = pd.read_csv(run / "tables" / "cv_folds.csv")
    assert table["fold"].astype(str).tolist() == ["0", "1", "mean", "std"]
    assert table.loc[2, "kappa"] == pytest.approx(table.loc[:1, "kappa"].mean())
    assert table.loc[3, "kappa"] == pytest.approx(table.loc[:1, "kappa"].std(ddof=1))
    assert "mean" in (run / "tables" / "cv_folds.md").read_text()
    assert "\\begin{tabular}" in (run / "tables" / "cv_folds.tex").read_text()
    holdout = json.loads((run / "holdout" / "metrics.json").read_text())["fold_ensemble"]
    ci = holdout["ci95"]["kappa"]
    assert ci["low"] <= ci["value"] <= ci["high"]
    parts = pd.read_csv(run / "tables" / "per_body_part.csv")  # the holdout's body parts carry their own CIs
    held = parts[parts["evaluation"] == "holdout"]
    assert {"kappa_low", "kappa_high", "auroc_low", "auroc_high"} <= set(parts.columns)
    shown = held.dropna(subset=["kappa_low"])  # a body part with a handful of studies may have no defined κ
    assert len(shown) >= len(held) // 2 and (shown["kappa_low"] <= shown["kappa"] + 1e-12).all()
    # every pool study is scored exactly once across folds
    oof = pd.concat([pd.read_csv(run / f"fold_{k}" / "oof_predictions.csv") for k in (0, 1)])
    folds = pd.read_csv(run / "folds.csv")
    assert sorted(oof["study_id"].unique()) == sorted(folds["study_id"])
    pred = pd.read_csv(run / "holdout" / "predictions.csv")
    assert pred["prob"].to_numpy() == pytest.approx(pred[["prob_fold0", "prob_fold1"]].mean(axis=1).to_numpy())
    assert "| fold" in capsys.readouterr().out  # per-fold Markdown table printed at the end
    check_thresholds_and_calibration(run)


def check_thresholds_and_calibration(run) -> None:
    """Each fold: threshold chosen on its inner-val predictions, scored fold κ at it (and at 0.5) recomputable from
    oof_predictions.csv, brier/ece/auprc; holdout: ensemble at the mean fold threshold; tables carry all of it."""
    thresholds = []
    for k in (0, 1):
        fold = json.loads((run / f"fold_{k}" / "metrics.json").read_text())
        for key in ("threshold", "threshold_rule", "inner_val_threshold", "at_0.5"):
            assert key in fold, (k, key)
        for key in ("brier", "ece", "auprc"):
            assert key in fold["study"] and key in fold["image"], (k, key)
        t = fold["threshold"]
        thresholds.append(t)
        assert fold["threshold_rule"] == "youden" and fold["inner_val_threshold"] == t
        inner = pd.read_csv(run / f"fold_{k}" / "inner_val_predictions.csv")
        assert t == pytest.approx(metrics.choose_threshold(inner, "youden"))
        assert json.loads((run / f"fold_{k}" / "DONE").read_text())["threshold"] == t
        studies = metrics.study_table(pd.read_csv(run / f"fold_{k}" / "oof_predictions.csv"))
        at_t = metrics.binary_metrics(studies["label"], studies["prob"], t)
        at_half = metrics.binary_metrics(studies["label"], studies["prob"], 0.5)
        assert fold["study"]["kappa"] == pytest.approx(at_t["kappa"], nan_ok=True)
        assert fold["study"]["sensitivity"] == pytest.approx(at_t["sensitivity"], nan_ok=True)
        assert fold["at_0.5"]["study"]["kappa"] == pytest.approx(at_half["kappa"], nan_ok=True)
        assert fold["study"]["brier"] == pytest.approx(((studies["prob"] - studies["label"]) ** 2).mean())
    holdout = json.loads((run / "holdout" / "metrics.json").read_text())["fold_ensemble"]
    assert holdout["threshold"] == pytest.approx(sum(thresholds) / 2)
    assert holdout["fold_thresholds"] == pytest.approx(thresholds)
    studies = metrics.study_table(pd.read_csv(run / "holdout" / "predictions.csv"))
    expected = metrics.binary_metrics(studies["label"], studies["prob"], holdout["threshold"])
    assert holdout["ci95"]["kappa"]["value"] == pytest.approx(expected["kappa"], nan_ok=True)
    assert holdout["at_0.5"]["study"]["kappa"] == pytest.approx(
        metrics.binary_metrics(studies["label"], studies["prob"], 0.5)["kappa"], nan_ok=True)
    assert "kappa" in holdout["at_0.5"]["ci95"]
    table = pd.read_csv(run / "tables" / "cv_folds.csv")
    for col in ("threshold", "brier", "ece", "auprc", "kappa@0.5", "sensitivity@0.5", "specificity@0.5", "f1@0.5"):
        assert col in table, col
    assert table["threshold"][:2].tolist() == pytest.approx(thresholds)
    rows = pd.read_csv(run / "tables" / "holdout.csv").set_index("metric")
    for metric in ("threshold", "study_brier", "study_ece", "study_auprc", "image_ece", "study_kappa@0.5"):
        assert metric in rows.index, metric
    assert rows.loc["threshold", "value"] == pytest.approx(holdout["threshold"])
    assert "eval.threshold_rule: youden" in (run / "summary.md").read_text()


def test_rerun_skips_done_folds_and_aggregate_only(tiny_cv_overrides, tmp_path, monkeypatch):
    assert cv.main(cli_args(tiny_cv_overrides)) == 0
    run = tmp_path / "run"
    before = (run / "fold_0" / "checkpoint_best.safetensors").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(engine, "fit", lambda *a, **k: calls.append(1))
    assert cv.main(cli_args(tiny_cv_overrides)) == 0
    assert not calls and (run / "fold_0" / "checkpoint_best.safetensors").stat().st_mtime_ns == before
    assert cv.main(["--out", str(run), "--aggregate"]) == 0  # config comes from the run dir


def test_aggregate_names_missing_folds(tiny_cv_overrides, tmp_path, capsys):
    assert cv.main(cli_args(tiny_cv_overrides) + ["--fold", "0"]) == 0
    run = tmp_path / "run"
    assert (run / "fold_0" / "DONE").exists() and not (run / "fold_1").exists()
    assert not (run / "tables").exists()
    assert cv.main(["--out", str(run), "--aggregate"]) == 2
    assert "fold(s) [1] are not finished" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["fp32", pytest.param("auto", marks=pytest.mark.bf16)])
def test_resume_after_interruption_matches_uninterrupted(tiny_cv_overrides, tmp_path, monkeypatch, precision):
    """Killed after epoch 1 and rerun = uninterrupted, exactly: in fp32 on every CPU, and under bf16 autocast where
    `auto` resolves to it (a CPU with native bf16)."""
    over = dict(tiny_cv_overrides, **{"train.epochs": 2, "train.patience": 5, "data.folds": 2,
                                      "train.precision": precision})
    full = dict(over, run_dir=str(tmp_path / "full"))
    assert cv.main(cli_args(full) + ["--fold", "0"]) == 0
    assert json.loads((tmp_path / "full" / "env.json").read_text())["precision"] == (
        "fp32" if precision == "fp32" else "bf16")

    real = engine.train_one_epoch
    seen = []

    def crash_on_second_epoch(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt  # simulated Ctrl-C / kill after the first epoch's checkpoint
        return real(*args, **kwargs)

    interrupted = dict(over, run_dir=str(tmp_path / "resumed"))
    monkeypatch.setattr(engine, "train_one_epoch", crash_on_second_epoch)
    assert cv.main(cli_args(interrupted) + ["--fold", "0"]) == 130
    fold = tmp_path / "resumed" / "fold_0"
    assert (fold / "state_last.pt").exists() and not (fold / "DONE").exists()
    monkeypatch.setattr(engine, "train_one_epoch", real)
    assert cv.main(cli_args(interrupted) + ["--fold", "0"]) == 0
    a = json.loads((tmp_path / "full" / "fold_0" / "metrics.json").read_text())
    b = json.loads((fold / "metrics.json").read_text())
    assert a == b
    assert len(pd.read_csv(fold / "history.csv")) == 2


def test_conflicting_rerun_is_refused(tiny_cv_overrides, tmp_path, capsys):
    assert cv.main(cli_args(tiny_cv_overrides) + ["--fold", "0"]) == 0
    rc = cv.main(cli_args(dict(tiny_cv_overrides, **{"train.lr": 0.5})) + ["--fold", "1"])
    assert rc == 2
    assert "train.lr" in capsys.readouterr().err


def test_saved_config_roundtrips(tiny_cv_overrides, tmp_path):
    assert cv.main(cli_args(tiny_cv_overrides) + ["--fold", "0"]) == 0
    cfg = load_config(CVConfig, tmp_path / "run" / "config.yaml")
    assert cfg.data.folds == 2 and cfg.model.name == "resnet10t"


def test_run_on_other_data_is_refused_before_anything_is_written(tiny_cv_overrides, tmp_path, capsys):
    """A run dir whose env.json records another manifest (data changed under it, e.g. a new phantom default) must not
    be resumed or aggregated against the new data: its folds and holdout would not match."""
    assert cv.main(cli_args(tiny_cv_overrides)) == 0
    env_path = tmp_path / "run" / "env.json"
    env = json.loads(env_path.read_text())
    env["manifest_sha256"] = "0" * 64
    env_path.write_text(json.dumps(env))
    summary = (tmp_path / "run" / "summary.md").stat().st_mtime_ns
    assert cv.main(["--out", str(tmp_path / "run"), "--aggregate"]) == 2
    assert "trained on other data" in capsys.readouterr().err
    assert (tmp_path / "run" / "summary.md").stat().st_mtime_ns == summary
    assert json.loads(env_path.read_text())["manifest_sha256"] == "0" * 64  # env.json not overwritten


def test_done_folds_drop_their_state_unless_keep_state(tiny_cv_overrides, tmp_path):
    """Run dirs stay small: a DONE fold keeps its weights, not its optimizer state (--keep-state keeps it)."""
    over = dict(tiny_cv_overrides, **{"data.folds": 2})
    assert cv.main(cli_args(over) + ["--fold", "0"]) == 0
    fold = Path(over["run_dir"]) / "fold_0"
    assert (fold / "DONE").exists() and (fold / "checkpoint_best.safetensors").exists()
    assert not (fold / "state_last.pt").exists() and not (fold / "state_last.pt.json").exists()
    kept = dict(over, run_dir=str(tmp_path / "kept"))
    assert cv.main(cli_args(kept) + ["--fold", "0", "--keep-state"]) == 0
    assert (tmp_path / "kept" / "fold_0" / "state_last.pt").exists()


def test_state_is_written_at_most_every_state_interval(tiny_cv_overrides, tmp_path, monkeypatch):
    """train.state_interval_min throttles the ~2× weights-sized state write: with 10 min, a 2-epoch fold of a few
    seconds writes none; with 0, one per epoch."""
    writes = []
    real = engine.save_state
    monkeypatch.setattr(engine, "save_state", lambda path, state: (writes.append(state["epoch"]), real(path, state)))
    over = dict(tiny_cv_overrides, **{"data.folds": 2, "train.epochs": 2, "train.patience": 5})
    assert cv.main(cli_args(dict(over, **{"train.state_interval_min": 10})) + ["--fold", "0"]) == 0
    assert writes == []
    again = dict(over, run_dir=str(tmp_path / "every_epoch"))
    assert cv.main(cli_args(again) + ["--fold", "0"]) == 0  # conftest: state_interval_min = 0
    assert writes == [0, 1]


def test_one_writer_per_run_and_per_fold(tiny_cv_overrides, tmp_path, capsys):
    """A second cv on a run being written exits 2 naming the holder; fold jobs share a run but not a fold."""
    import os

    from kd_fracture.runs.rundir import RunDir

    over = dict(tiny_cv_overrides, **{"data.folds": 2})
    run = RunDir(over["run_dir"])
    with run.lock():  # a plain run in progress
        assert cv.main(cli_args(over)) == 2
        err = capsys.readouterr().err
        assert f"is being written by PID {os.getpid()}" in err and "--fold K" in err
        assert cv.main(cli_args(over) + ["--fold", "0"]) == 2  # not even a fold job beside it
    with run.lock(fold=1):  # a fold job on fold 1 ...
        assert cv.main(cli_args(over) + ["--fold", "0"]) == 0  # ... and another on fold 0: side by side
        assert cv.main(cli_args(over) + ["--fold", "1"]) == 2
        assert f"fold 1 of {run.path} is being written by PID" in capsys.readouterr().err
        assert cv.main(cli_args(over)) == 2  # a plain run waits for the fold jobs
    assert cv.main(cli_args(over)) == 0  # every lock released: the run finishes


def test_a_killed_writer_leaves_no_lock(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from kd_fracture.runs.rundir import RunDir

    run = RunDir(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom kd_fracture.runs.rundir import RunDir\n"
                               f"with RunDir({str(run.path)!r}).lock():\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="is being written by PID"):
            with run.lock():
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    with run.lock():  # flock died with the process
        pass


def test_jobs_train_folds_as_processes_with_the_sequential_results(tiny_cv_overrides, tmp_path, capsys):
    """`cv --jobs 2`: each fold is its own `cv --fold K` process (same locks, seeds and config), so the tables, fold
    metrics and holdout predictions are those of the sequential run, byte for byte (fp32, one thread in both)."""
    over = dict(tiny_cv_overrides, **{"train.threads": 1, "train.precision": "fp32"})
    runs = {}
    for name, jobs in (("sequential", "1"), ("parallel", "2")):
        runs[name] = tmp_path / name
        assert cv.main(cli_args(dict(over, run_dir=str(runs[name]))) + ["--jobs", jobs]) == 0
    err = capsys.readouterr().err
    assert "job fold 0:" in err and "job fold 1:" in err  # the parallel run started one process per fold
    seq, par = runs["sequential"], runs["parallel"]
    for rel in ["tables/cv_folds.csv", "tables/holdout.csv", "holdout/predictions.csv",
                *[f"fold_{k}/oof_predictions.csv" for k in (0, 1)]]:
        assert (par / rel).read_text() == (seq / rel).read_text(), rel
    for k in (0, 1):
        a, b = (json.loads((r / f"fold_{k}" / "metrics.json").read_text()) for r in (seq, par))
        assert a["study"] == b["study"] and a["threshold"] == b["threshold"]
        assert (par / f"fold_{k}" / "DONE").exists()


def test_jobs_beyond_the_folds_are_clamped_and_nonsense_is_refused(tiny_cv_overrides, tmp_path, capsys,
                                                                     monkeypatch):
    from kd_fracture.pipelines import jobs

    started = []
    monkeypatch.setattr(jobs.subprocess, "Popen", lambda cmd, **kw: started.append(cmd) or pytest.fail("started"))
    assert jobs.resolve_jobs(5, 2, torch.device("cpu"), 64) == 2
    assert "--jobs 5 is more than the 2 job(s) left to run" in capsys.readouterr().err
    assert jobs.resolve_jobs("auto", 5, torch.device("cpu"), 64) == 1  # auto: one process on the CPU
    assert jobs.resolve_jobs("auto", 5, torch.device("cuda"), 224) == 1  # a 224-px fold keeps a GPU busy alone
    rc = cv.main(cli_args(tiny_cv_overrides) + ["--jobs", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --jobs 0: a number ≥ 1") and not started
    assert not Path(tiny_cv_overrides["run_dir"]).exists()  # refused before anything was written
