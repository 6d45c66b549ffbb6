"""Training-recipe switches of the one loop: per-step lr schedule, which checkpoint a run keeps, determinism."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from kd_fracture import cv
from kd_fracture.train import engine


def cli_args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def record_lrs(monkeypatch) -> list[float]:
    """Every optimiser step's learning rate, through a step pre-hook on the loop's optimiser."""
    lrs: list[float] = []
    create = engine.create_optimizer_v2

    def recording(*args, **kwargs):
        optimizer = create(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, a, k: lrs.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(engine, "create_optimizer_v2", recording)
    return lrs


@pytest.mark.parametrize("per_step", [True, False])
def test_lr_changes_every_step_only_when_scheduled_per_step(per_step, tiny_cv_overrides, monkeypatch):
    lrs = record_lrs(monkeypatch)
    over = {**tiny_cv_overrides, "data.folds": 2, "train.epochs": 2, "train.schedule_per_step": per_step}
    assert cv.main([*cli_args(over), "--fold", "0"]) == 0
    history = pd.read_csv(f"{over['run_dir']}/fold_0/history.csv")
    steps = len(lrs) // 2
    assert len(lrs) == 2 * steps and steps >= 3
    first_epoch = lrs[:steps]
    distinct = len(set(first_epoch))
    if per_step:  # cosine from lr towards min_lr, a new value at every step, decreasing
        assert distinct == steps and all(a > b for a, b in zip(first_epoch, first_epoch[1:]))
    else:
        assert distinct == 1
    assert len(history) == 2


def test_checkpoint_last_keeps_the_final_epoch(tiny_cv_overrides, monkeypatch):
    """With checkpoint=last the kept weights are the last epoch's even when an earlier epoch scored better."""
    scores = [0.9, 0.1, 0.2]  # inner-val monitor per epoch: epoch 0 is the "best"
    monkeypatch.setattr(engine.metrics, "monitor_value", lambda result, monitor: scores.pop(0) if scores else 0.5)
    over = {**tiny_cv_overrides, "train.epochs": 3, "train.checkpoint": "last", "train.patience": 1}
    assert cv.main([*cli_args(over), "--fold", "0"]) == 0
    history = pd.read_csv(f"{over['run_dir']}/fold_0/history.csv")
    assert len(history) == 3  # patience never stops a checkpoint=last run
    done = json.loads(open(f"{over['run_dir']}/fold_0/DONE").read())
    assert done["best_epoch"] == 2


def test_unknown_checkpoint_choice_is_refused(tiny_cv_overrides, capsys):
    assert cv.main(cli_args({**tiny_cv_overrides, "train.checkpoint": "median"})) == 2
    assert "train.checkpoint" in capsys.readouterr().err


def test_same_command_twice_gives_identical_metrics(tiny_cv_overrides, tmp_path):
    """Issue 12 item 3: the same command twice on one machine gives identical folds, metrics and predictions."""
    runs = []
    for name in ("a", "b"):
        over = {**tiny_cv_overrides, "run_dir": str(tmp_path / name), "train.schedule_per_step": True}
        assert cv.main(cli_args(over)) == 0
        runs.append(tmp_path / name)
    for k in (0, 1):
        a, b = (json.loads((r / f"fold_{k}" / "metrics.json").read_text()) for r in runs)
        assert a == b
    pd.testing.assert_frame_equal(*(pd.read_csv(r / "holdout" / "predictions.csv") for r in runs))
    assert (runs[0] / "tables" / "cv_folds.csv").read_text() == (runs[1] / "tables" / "cv_folds.csv").read_text()
