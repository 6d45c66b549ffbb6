"""The one fold trainer of cv and distill: seed → build → fit → choose the threshold → score the held-out fold.

Fold k (docs/design.md §3): train on the other folds' patients minus an inner-validation split, which early-stops
and chooses the decision threshold (`eval.threshold_rule`); fold k itself is scored once, at that threshold and at
0.5. A teacher fold, a distillation trial's fold and a final student's fold differ only in the model and the Task
they pass in, so all three go through `train_and_score_fold`.

Writes into `out_dir`: history.csv, checkpoint_best.safetensors (+ .json), state_last.pt (+ .json) from
`engine.fit`; inner_val_predictions.csv, oof_predictions.csv and metrics.json = {fold, **info, **meta, **result}.
The caller marks the fold DONE (a trial fold is never DONE: its checkpoints are deleted once scored).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from kd_fracture import io, metrics
from kd_fracture.config import EvalConfig, TrainConfig, replace
from kd_fracture.data.loaders import FoldRows
from kd_fracture.models import count_params
from kd_fracture.runs import scoring
from kd_fracture.train import engine
from kd_fracture.train.tasks import Task

Loader = Callable[[pd.DataFrame, bool], torch.utils.data.DataLoader]
"""(rows, train) → DataLoader: shuffled, augmented views when train; clean images in row order otherwise."""


@dataclass
class FoldResult:
    model: nn.Module
    """Holds the kept weights (train.checkpoint: best or last epoch)."""
    fit: engine.FitResult
    info: dict
    """best_epoch, inner-val score, epochs_run, params, split sizes (+ the caller's `meta`)."""
    pred: pd.DataFrame | None = None
    """The scored fold's image predictions (None for the refit model, which has no scored fold)."""
    result: dict | None = None
    """`scoring.evaluate_at` of the scored fold + inner_val_threshold; result["threshold"] is the chosen cut."""
    inner: dict | None = None
    """`metrics.evaluate` of the inner-validation split at that cut: what a search may select by (never `result`)."""


def fold_seed(seed: int, k: int | None) -> int:
    """Fold k trains with seed + k (the refit model with the seed itself): folds differ, reruns repeat."""
    return seed + (0 if k is None else k)


def train_and_score_fold(k: int | None, rows: FoldRows, build_model: Callable[[], nn.Module],
                         make_task: Callable[[FoldRows], Task], loader: Loader, train: TrainConfig,
                         eval_cfg: EvalConfig, out_dir: Path, *, name: str, device: torch.device,
                         meta: dict | None = None, epoch_callback=None, tensorboard: bool = False,
                         hparams: dict | None = None) -> FoldResult:
    """Train fold k's model into out_dir and score fold k (k=None: the refit model, trained but not scored).

    `train.seed` is the run's seed; the fold trains with `fold_seed(seed, k)`. The model is built after seeding, so
    its random init is the fold's. Only rank 0 scores and writes (under torchrun every rank trains)."""
    seed = fold_seed(train.seed, k)
    engine.seed_everything(seed)
    model = build_model()
    task = make_task(rows)
    fit = engine.fit(model, task, loader(rows.train, True), loader(rows.inner_val, False), rows.inner_val,
                     replace(train, seed=seed), out_dir, name=f"{name}: ", device=device,
                     epoch_callback=epoch_callback, tensorboard=tensorboard, hparams=hparams)
    info = {"best_epoch": fit.best_epoch, f"inner_val_{train.monitor}": fit.best_score,
            "epochs_run": len(fit.history), "params": count_params(model),
            "trainable_params": count_params(model, trainable_only=True),
            "n_train": len(rows.train), "n_inner_val": len(rows.inner_val), **(meta or {})}
    out = FoldResult(model, fit, info)
    if not engine.is_main():
        return out
    if k is None:
        io.write_json(out_dir / "metrics.json", {"fold": "refit", **info})
        return out
    # the inner-val split (never the scored fold) chooses the cut; fold k is scored at it and at 0.5
    inner, out.pred, out.result = scoring.score_fold(model, loader(rows.inner_val, False), rows.inner_val,
                                                     loader(rows.scored, False), rows.scored, device, eval_cfg,
                                                     train.amp, train.precision)
    out.inner = metrics.evaluate(inner, out.result["threshold"])
    io.write_csv(out_dir / "inner_val_predictions.csv", inner)
    io.write_csv(out_dir / "oof_predictions.csv", out.pred)
    io.write_json(out_dir / "metrics.json", {"fold": k, **info, "threshold": out.result["threshold"], **out.result,
                                             "inner_val": {"study": out.inner["study"], "image": out.inner["image"]}})
    engine.log(f"{name}: scored fold κ {out.result['study']['kappa']:.3f} at threshold "
               f"{out.result['threshold']:.3f} ({eval_cfg.threshold_rule}; κ "
               f"{out.result[scoring.AT_REFERENCE]['study']['kappa']:.3f} at 0.5)  AUROC "
               f"{out.result['study']['auroc']:.3f}")
    return out
