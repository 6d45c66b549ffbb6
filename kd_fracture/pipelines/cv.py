"""The cv pipeline: patient-grouped K-fold cross-validation of a timm teacher, then the holdout (no argparse).

Per fold k (nnU-Net style: one directory per fold, folds are data): `fold.train_and_score_fold` →
fold_k/{checkpoint_best.safetensors, history.csv, inner_val_predictions.csv, oof_predictions.csv, metrics.json, DONE}.
Then `report.aggregate`: the K teachers' mean probability on the holdout split, tables and plots, summary.md.
Rerunning the same run resumes; `folds_to_run` and `aggregate_only` split the work into independent jobs.
"""
from __future__ import annotations

import contextlib
import sys
import time

import pandas as pd
import torch

from kd_fracture import distributed, io
from kd_fracture.config import CVConfig
from kd_fracture.data.loaders import (SharedCache, build_loader, fold_rows, resolve_folds, resolve_manifest,
                                     resolve_num_workers)
from kd_fracture.data.manifest import Manifest
from kd_fracture.errors import UserError
from kd_fracture.pipelines import pretraining
from kd_fracture.pipelines.fold import fold_seed, train_and_score_fold
from kd_fracture.pipelines.jobs import resolve_jobs, run_jobs, threads_per_job
from kd_fracture.report.aggregate import aggregate
from kd_fracture.runs import scoring
from kd_fracture.runs.models import build_model
from kd_fracture.runs.rundir import RunDir
from kd_fracture.train import checkpoint, engine, tasks


def teacher_model(cfg: CVConfig) -> torch.nn.Module:
    """The run's architecture with its start weights.

    Phantom domain pretraining (built once, `pretraining.py`) is loaded whole, head included, since it was trained
    for this very task and architecture; a local file (ImageNet) is loaded by timm with a fresh head."""
    phantom = pretraining.uses_phantom_weights(cfg)
    file = pretraining.weights_file(cfg)
    return build_model(cfg.model, cfg.data.img_size, start=file if phantom else None, file=None if phantom else file)


def run_cv(cfg: CVConfig, folds_to_run: list[int] | None = None, aggregate_only: bool = False,
           jobs: int | str | None = 1) -> RunDir:
    """Train the folds not yet DONE (`folds_to_run`: only those), then aggregate. `jobs` > 1 (or auto,
    `jobs.resolve_jobs`) trains that many folds at once as `cv --out RUN --fold K` processes."""
    t0 = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = distributed.local_device(engine.resolve_device(cfg.train.device))
    ks = list(range(cfg.data.folds))
    for k in folds_to_run or []:
        if k not in ks:
            raise UserError(f"--fold {k}: folds are numbered 0..{cfg.data.folds - 1}")
    scoring.check_threshold_rule(cfg.eval)
    precision = engine.resolve_precision(cfg.train.precision, device, cfg.train.amp)
    if not aggregate_only:
        teacher_model(cfg)  # bad model name, --img-size vs. student stride, --pretrained file: fail before writing
    with distributed.main_first():  # rank 0 may generate the phantom and write the folds file; the others read them
        manifest = resolve_manifest(cfg.data)
        folds = resolve_folds(cfg.data, manifest)
    run = RunDir(cfg.run_dir)
    # e.g. a run made before a default of the phantom changed: its folds and holdout would not match this data
    run.check_trained_on(manifest.sha256(), manifest.root, "this run was",
                         "its folds and holdout would not match — use a new --out")
    if engine.is_main():
        run.write_config(cfg)
        run.write_env(cfg.train.seed, str(device), {"dataset": manifest.name, "manifest_sha256": manifest.sha256(),
                                                   "precision": precision})
        io.write_csv(run.folds, folds)
    cache = SharedCache(manifest.root, cfg.data.img_size, cfg.data.cache_images)

    hint = f"train folds as parallel jobs: python -m kd_fracture.cv --out {run.path} --fold K"

    def lock(fold: int | None = None):  # rank 0 speaks for a torchrun job; its ranks share the run by design
        return run.lock(fold, hint=hint) if engine.is_main() else contextlib.nullcontext()

    if folds_to_run and not aggregate_only:  # fold jobs: each holds its folds, beside other fold jobs
        for k in folds_to_run:
            with lock(k):
                train_fold(cfg, manifest, folds, k, run, device, cache)
        engine.log(f"trained fold(s) {folds_to_run}; when all folds are DONE run: "
                   f"python -m kd_fracture.cv --out {cfg.run_dir} --aggregate")
        return run
    pending = [k for k in ks if not run.is_done(k)]
    n_jobs = 1 if aggregate_only or distributed.world_size() > 1 else resolve_jobs(jobs, len(pending), device,
                                                                                    cfg.data.img_size)
    if n_jobs > 1:  # shared, like the fold jobs it starts; the aggregation below takes the run for itself
        with run.lock(shared=True, hint=hint):
            workers = resolve_num_workers(cfg.data, device, n_jobs)
            run_jobs([[sys.executable, "-m", "kd_fracture.cv", "--out", str(run.path), "--fold", str(k),
                       "--threads", str(threads_per_job(n_jobs)), "--set", f"data.num_workers={workers}"]
                      for k in pending], n_jobs, names=[f"fold {k}" for k in pending])
    with lock():
        if not aggregate_only:
            for k in ks:
                train_fold(cfg, manifest, folds, k, run, device, cache)
            if cfg.refit:
                train_fold(cfg, manifest, folds, None, run, device, cache)
        distributed.barrier()  # every rank has finished its folds before rank 0 reads them
        if engine.is_main():
            aggregate(cfg, manifest, run, device, cache, fix=f"python -m kd_fracture.cv --out {run.path}")
            engine.log(f"\nwrote {run.path}/ in {time.perf_counter() - t0:.0f}s — summary: {run.summary}")
    return run


def train_fold(cfg: CVConfig, manifest: Manifest, folds: pd.DataFrame, k: int | None, run: RunDir,
               device: torch.device, cache: SharedCache) -> None:
    """Train one fold's teacher (k=None: refit on the whole pool) and score its held-out fold."""
    name = "refit" if k is None else k
    with distributed.main_first():  # rank 0 may discard a damaged fold; the others then see the same state
        done = run.is_done(name) and checkpoint_intact(run, name)
    if done:
        engine.log(f"fold {name}: DONE, skipped")
        return
    rows = fold_rows(manifest, folds, k, cfg.data)
    engine.log(f"fold {name}: {len(rows.train)} train / {len(rows.inner_val)} inner-val / "
               f"{len(rows.scored)} scored images")
    seed = fold_seed(cfg.train.seed, k)

    def loader(r: pd.DataFrame, train: bool):
        return build_loader(r, manifest, cfg.data, cfg.aug, train=train, in_chans=cfg.model.in_chans,
                            batch_size=cfg.train.batch_size if train else cfg.train.eval_batch_size, seed=seed,
                            cache=cache, device=device)

    def make_task(r):
        return tasks.SupervisedTask(loss=cfg.train.loss,
                                    pos_weight=tasks.resolve_pos_weight(cfg.train.pos_weight, r.train["label"]),
                                    label_smoothing=cfg.train.label_smoothing, mixup=tasks.make_mixup(cfg.train))

    result = train_and_score_fold(k, rows, lambda: teacher_model(cfg), make_task, loader, cfg.train, cfg.eval,
                                  run.fold(name), name=f"fold {name}", device=device,
                                  tensorboard=cfg.track.tensorboard,
                                  hparams={"model": cfg.model.name, "img_size": cfg.data.img_size, "fold": str(name)})
    if engine.is_main():
        info = dict(result.info)
        if result.result is not None:
            info["threshold"] = result.result["threshold"]
        run.mark_done(name, info, keep_state=cfg.keep_state)


def checkpoint_intact(run: RunDir, k: int | str) -> bool:
    """A DONE fold whose best checkpoint fails its size/sha256 check is discarded (rank 0) and trained again."""
    try:
        checkpoint.verify_sidecar(run.fold(k) / checkpoint.BEST)
        return True
    except checkpoint.CheckpointError as e:
        engine.log(f"warning: {e}; training fold {k} again")
        if engine.is_main():
            (run.fold(k) / "DONE").unlink(missing_ok=True)
            for name in (checkpoint.LAST, checkpoint.BEST):
                checkpoint.remove_checkpoint(run.fold(k) / name)
        return False
