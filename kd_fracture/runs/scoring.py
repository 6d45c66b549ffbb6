"""Scoring at a decision threshold chosen on the inner-validation split (issue #12) — one place for cv and distill.

A fold's model is trained on its training patients and early-stopped on its inner-validation split; the same split
then chooses the study-level threshold (`metrics.choose_threshold`, rule `eval.threshold_rule`), and the scored
fold is scored once at that threshold and once at 0.5 (`at_0.5`), so the cut never sees the scored fold. The fold
ensemble's holdout is scored at the mean of the fold thresholds: its probability is the mean of the members'
probabilities, so the mean of their cuts is the cut on the same scale (cv.aggregate).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from kd_fracture.train import engine
from kd_fracture import io, metrics
from kd_fracture.config import EvalConfig
from kd_fracture.errors import ConfigError
from kd_fracture.runs.rundir import RunDir

AT_REFERENCE = f"at_{metrics.REFERENCE_THRESHOLD}"
"""Key of the figures at 0.5 in every result: "at_0.5"."""


def check_threshold_rule(cfg: EvalConfig) -> None:
    """A ConfigError before any training when eval.threshold_rule is not a known rule."""
    if cfg.threshold_rule not in metrics.THRESHOLD_RULES:
        raise ConfigError(f"eval.threshold_rule '{cfg.threshold_rule}' is not one of "
                          f"{', '.join(metrics.THRESHOLD_RULES)}")


def evaluate_at(pred: pd.DataFrame, threshold: float, rule: str) -> dict:
    """`metrics.evaluate(pred, threshold)` plus `threshold_rule` and the study metrics and confusion at 0.5.

    → {n_images, n_studies, threshold, image, study, per_body_part, confusion, threshold_rule,
       "at_0.5": {"study": {...}, "confusion": [[tn, fp], [fn, tp]]}}.
    """
    result = metrics.evaluate(pred, threshold)
    reference = metrics.evaluate(pred, metrics.REFERENCE_THRESHOLD)
    return {**result, "threshold_rule": rule,
            AT_REFERENCE: {"study": reference["study"], "confusion": reference["confusion"]}}


def score_fold(model: nn.Module, inner_loader, inner_rows: pd.DataFrame, scored_loader, scored_rows: pd.DataFrame,
               device: torch.device, cfg: EvalConfig, amp: bool = True,
               precision: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Predict the inner-val rows → choose the threshold → score the scored fold at it and at 0.5.

    The loaders must not shuffle (rows and loader in the same order). Returns (inner-val predictions, scored-fold
    predictions, `evaluate_at` result + `inner_val_threshold`); the result's `threshold` is the chosen one.
    """
    inner = inner_rows.assign(prob=engine.predict_probs(model, inner_loader, device, amp, precision=precision))
    threshold = metrics.choose_threshold(inner, cfg.threshold_rule, cfg.threshold)
    pred = scored_rows.assign(prob=engine.predict_probs(model, scored_loader, device, amp, precision=precision))
    return inner, pred, {**evaluate_at(pred, threshold, cfg.threshold_rule), "inner_val_threshold": threshold}


def fold_threshold(run_path: str | Path, member: int | str) -> float | None:
    """The threshold fold `member` was scored at (fold_<k>/metrics.json `threshold`), None when not recorded.

    Runs from before threshold selection recorded `threshold` = eval.threshold there too, so they keep their cut.
    """
    path = RunDir(run_path).fold(member) / "metrics.json"
    if not path.is_file():
        return None
    value = io.read_json(path).get("threshold")
    return None if value is None else float(value)


def run_threshold(run_path: str | Path, members: list[int | str], folds: int) -> float | None:
    """The cut a finished run applies to `members`: one fold → its own threshold; several folds, or the refit
    model, → the mean of the fold thresholds (the holdout's rule); None when any is not recorded."""
    ks = list(range(folds)) if "refit" in members else list(members)
    values = [fold_threshold(run_path, k) for k in ks]
    return None if not values or any(v is None for v in values) else float(np.mean(values))
