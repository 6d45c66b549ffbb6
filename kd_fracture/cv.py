"""`python -m kd_fracture.cv --folds 5`: patient-grouped K-fold cross-validation of a timm teacher + holdout.

Per fold k (nnU-Net style: one directory per fold, folds are data):
  train on the other folds' patients minus an inner-validation split (early stopping, checkpoint choice, decision
  threshold by eval.threshold_rule), then score fold k once, at that threshold and at 0.5 →
  fold_k/{checkpoint_best.safetensors, history.csv, inner_val_predictions.csv, oof_predictions.csv, metrics.json, DONE}.
Aggregate: the K teachers' mean probability on the holdout split, scored at the mean fold threshold (95% bootstrap
CIs over studies) and at 0.5, tables with mean ± std over folds, plots (ROC, PR, calibration, …), summary.md.
Rerunning the same command resumes; `--fold k` and `--aggregate` split the work into independent jobs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kd_fracture import distributed, engine, io, metrics, pretraining, reporting, scoring
from kd_fracture.config import CVConfig, add_config_args, load_config, overrides_from_args, replace
from kd_fracture.data.loaders import SharedCache, build_loader, fold_rows, holdout_rows, resolve_folds, resolve_manifest
from kd_fracture.data.manifest import Manifest
from kd_fracture.errors import UserError, cli_main
from kd_fracture.models import count_params
from kd_fracture.run_dir import RunDir

# CLI flag (argparse dest) → config key. Everything else: --set KEY=VALUE or --config.
FLAGS = {
    "folds": "data.folds", "data": "data.root", "img_size": "data.img_size", "fold_seed": "data.fold_seed",
    "num_workers": "data.num_workers", "patients": "data.phantom.patients", "verify_images": "data.verify_images",
    "regenerate_folds": "data.regenerate_folds", "model": "model.name", "pretrained": "model.pretrained",
    "freeze": "model.freeze", "in_chans": "model.in_chans", "epochs": "train.epochs", "batch_size": "train.batch_size",
    "lr": "train.lr", "optimizer": "train.optimizer", "loss": "train.loss", "patience": "train.patience",
    "monitor": "train.monitor", "device": "train.device", "seed": "train.seed", "threads": "train.threads",
    "run_dir": "run_dir", "refit": "refit",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kd_fracture.cv", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="ROOT", help="MURA root or folder-layout root (default: synthetic phantom)")
    g.add_argument("--folds", type=int, help="K of the patient-grouped stratified K-fold")
    g.add_argument("--fold-seed", type=int, help="random_state of StratifiedGroupKFold")
    g.add_argument("--img-size", type=int, help="square input side in pixels")
    g.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    g.add_argument("--patients", type=int, help="synthetic phantom size (only without --data)")
    g.add_argument("--verify-images", action="store_const", const=True, help="decode every image up front")
    g.add_argument("--regenerate-folds", action="store_const", const=True, help="rebuild a stale folds file")
    g = p.add_argument_group("model and training")
    g.add_argument("--model", help="timm model name (resnet50, densenet121, …) or a student (hybrid_s)")
    g.add_argument("--pretrained", metavar="PATH|phantom|auto|none",
                   help="start weights: a local file (safetensors/pth; never downloaded), phantom (domain "
                        "pretraining, built once), auto (phantom on the synthetic default, none on --data), none")
    g.add_argument("--freeze", choices=["none", "backbone", "bn"], help="backbone = train only the classifier head; bn = freeze every BatchNorm")
    g.add_argument("--in-chans", type=int, choices=[1, 3], help="1 = grayscale, 3 = replicated grayscale")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--optimizer", choices=["adamw", "adam", "sgd"])
    g.add_argument("--loss", choices=["bce", "ce"])
    g.add_argument("--patience", type=int)
    g.add_argument("--monitor", choices=list(metrics.MONITORS))
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--seed", type=int, help="training seed")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", help="output directory (rerun the same command to resume)")
    g.add_argument("--fold", type=int, action="append", metavar="K", help="train only fold K (repeatable); "
                   "then --aggregate")
    g.add_argument("--aggregate", action="store_true", help="only build holdout, tables and plots from finished folds")
    g.add_argument("--refit", action="store_const", const=True, help="also train on the whole CV pool")
    return p


def resolve_config(args: argparse.Namespace) -> CVConfig:
    """Saved run config (when resuming) ← --config ← flags; a conflicting rerun is an error, not a silent mix."""
    overrides = overrides_from_args(args, FLAGS)
    if overrides.get("train.threads"):
        torch.set_num_threads(overrides["train.threads"])
    cfg = load_config(CVConfig, args.config, overrides)
    run = RunDir(cfg.run_dir)
    saved = run.saved_config(CVConfig)
    if saved is not None and args.config is None:
        cfg = replace(saved, **overrides)  # `cv --run-dir X --aggregate` needs no flags
    run.check_compatible(cfg)
    return cfg


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    if cfg.sweep:
        from kd_fracture.compare import run_sweep  # backbone sweep: several cv runs on the same folds

        return run_sweep(cfg, args)
    distributed.init_from_env(cfg.train.device)  # under torchrun: one process group, DDP in engine.fit
    try:
        run_cv(cfg, folds_to_run=args.fold, aggregate_only=args.aggregate)
    finally:
        distributed.cleanup()
    return 0


def run_cv(cfg: CVConfig, folds_to_run: list[int] | None = None, aggregate_only: bool = False) -> RunDir:
    t0 = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = distributed.local_device(engine.resolve_device(cfg.train.device))
    ks = list(range(cfg.data.folds))
    for k in folds_to_run or []:
        if k not in ks:
            raise UserError(f"--fold {k}: folds are numbered 0..{cfg.data.folds - 1}")
    scoring.check_threshold_rule(cfg.eval)
    if not aggregate_only:
        build_model(cfg)  # bad model name, --img-size vs. student stride, --pretrained file: fail before writing
    with distributed.main_first():  # rank 0 may generate the phantom and write the folds file; the others read them
        manifest = resolve_manifest(cfg.data)
        folds = resolve_folds(cfg.data, manifest)
    run = RunDir(cfg.run_dir)
    # e.g. a run made before a default of the phantom changed: its folds and holdout would not match this data
    run.check_trained_on(manifest.sha256(), manifest.root, "this run was",
                         "its folds and holdout would not match — use a new --run-dir")
    if engine.is_main():
        run.write_config(cfg)
        run.write_env(cfg.train.seed, str(device), {"dataset": manifest.name, "manifest_sha256": manifest.sha256()})
        io.write_csv(run.folds, folds)
    cache = SharedCache(manifest.root, cfg.data.img_size, cfg.data.cache_images)

    if not aggregate_only:
        for k in folds_to_run or ks:
            train_fold(cfg, manifest, folds, k, run, device, cache)
        if cfg.refit and not folds_to_run:
            train_fold(cfg, manifest, folds, None, run, device, cache)
    if folds_to_run and not aggregate_only:
        engine.log(f"trained fold(s) {folds_to_run}; when all folds are DONE run: "
                   f"python -m kd_fracture.cv --run-dir {cfg.run_dir} --aggregate")
        return run
    distributed.barrier()  # every rank has finished its folds before rank 0 reads them
    if engine.is_main():
        aggregate(cfg, manifest, run, device, cache)
        engine.log(f"\nwrote {run.path}/ in {time.perf_counter() - t0:.0f}s — summary: {run.summary}")
    return run


def train_fold(cfg: CVConfig, manifest: Manifest, folds: pd.DataFrame, k: int | None, run: RunDir,
               device: torch.device, cache: SharedCache) -> None:
    """Train one fold's teacher (k=None: refit on the whole pool) and score its held-out fold."""
    name = "refit" if k is None else k
    fold_dir = run.fold(name)
    with distributed.main_first():  # rank 0 may discard a damaged fold; the others then see the same state
        done = run.is_done(name) and checkpoint_intact(run, name)
    if done:
        engine.log(f"fold {name}: DONE, skipped")
        return
    rows = fold_rows(manifest, folds, k, cfg.data)
    engine.log(f"fold {name}: {len(rows.train)} train / {len(rows.inner_val)} inner-val / "
               f"{len(rows.scored)} scored images")
    seed = cfg.train.seed + (0 if k is None else k)
    engine.seed_everything(seed)
    m = cfg.model
    model = build_model(cfg)
    loader = lambda r, train: build_loader(r, manifest, cfg.data, cfg.aug, train=train, in_chans=m.in_chans,  # noqa: E731
                                           batch_size=cfg.train.batch_size if train else cfg.train.eval_batch_size,
                                           seed=seed, cache=cache)
    task = engine.SupervisedTask(loss=cfg.train.loss,
                                 pos_weight=engine.resolve_pos_weight(cfg.train.pos_weight, rows.train["label"]),
                                 label_smoothing=cfg.train.label_smoothing, mixup=engine.make_mixup(cfg.train))
    fit = engine.fit(model, task, loader(rows.train, True), loader(rows.inner_val, False), rows.inner_val,
                     replace(cfg.train, seed=seed), fold_dir, name=f"fold {name}: ", device=device)
    info = {"best_epoch": fit.best_epoch, f"inner_val_{cfg.train.monitor}": fit.best_score,
            "epochs_run": len(fit.history), "params": count_params(model),
            "trainable_params": count_params(model, trainable_only=True),
            "n_train": len(rows.train), "n_inner_val": len(rows.inner_val)}
    if engine.is_main():
        if k is not None:
            # the inner-val split (never the scored fold) chooses the cut; fold k is scored at it and at 0.5
            inner, pred, result = scoring.score_fold(model, loader(rows.inner_val, False), rows.inner_val,
                                                     loader(rows.scored, False), rows.scored, device, cfg.eval,
                                                     cfg.train.amp)
            info["threshold"] = result["threshold"]
            io.write_csv(fold_dir / "inner_val_predictions.csv", inner)
            io.write_csv(fold_dir / "oof_predictions.csv", pred)
            io.write_json(fold_dir / "metrics.json", {"fold": k, **info, **result})
            engine.log(f"fold {k}: scored fold κ {result['study']['kappa']:.3f} at threshold "
                       f"{result['threshold']:.3f} ({cfg.eval.threshold_rule}; κ "
                       f"{result[scoring.AT_REFERENCE]['study']['kappa']:.3f} at 0.5)  "
                       f"AUROC {result['study']['auroc']:.3f}")
        else:
            io.write_json(fold_dir / "metrics.json", {"fold": "refit", **info})
        run.mark_done(name, info)


def checkpoint_intact(run: RunDir, k: int | str) -> bool:
    """A DONE fold whose best checkpoint fails its size/sha256 check is discarded (rank 0) and trained again."""
    try:
        engine.verify_sidecar(run.fold(k) / engine.BEST)
        return True
    except engine.CheckpointError as e:
        engine.log(f"warning: {e}; training fold {k} again")
        if engine.is_main():
            (run.fold(k) / "DONE").unlink(missing_ok=True)
            for checkpoint in (engine.LAST, engine.BEST):
                engine.remove_checkpoint(run.fold(k) / checkpoint)
        return False


def build_model(cfg: CVConfig, pretrained: bool = True) -> torch.nn.Module:
    """The run's architecture; pretrained=False skips the start weights (a checkpoint will overwrite them).

    Start weights: phantom domain pretraining (built once, `pretraining.py`) loaded whole, head included, since it
    was trained for this very task and architecture; or a local file (ImageNet) loaded by timm with a fresh head."""
    phantom = pretrained and pretraining.uses_phantom_weights(cfg)
    file = pretraining.weights_file(cfg) if pretrained else None
    return pretraining.build(cfg.model, cfg.data.img_size, start=file if phantom else None,
                             file=None if phantom else file)


def load_fold_model(cfg: CVConfig, run: RunDir, k: int | str) -> torch.nn.Module:
    # the checkpoint holds every weight: build the architecture only (no --pretrained file needed to reload)
    return engine.load_weights(build_model(cfg, pretrained=False), run.fold(k) / engine.BEST)


def ensemble_predict(cfg: CVConfig, run: RunDir, rows: pd.DataFrame, manifest: Manifest, device: torch.device,
                     cache: SharedCache | None = None, members: list[int | str] | None = None) -> pd.DataFrame:
    """Mean of the fold teachers' probabilities for `rows`; one prob_fold<k> column per member."""
    members = list(range(cfg.data.folds)) if members is None else members
    loader = build_loader(rows, manifest, cfg.data, cfg.aug, train=False, in_chans=cfg.model.in_chans,
                          batch_size=cfg.train.eval_batch_size, seed=cfg.train.seed, cache=cache)
    pred = rows.reset_index(drop=True).copy()
    for k in members:
        model = load_fold_model(cfg, run, k).to(device)
        pred[f"prob_fold{k}"] = engine.predict_probs(model, loader, device, cfg.train.amp, desc=f"holdout fold {k}")
    pred["prob"] = pred[[f"prob_fold{k}" for k in members]].mean(axis=1)
    return pred


def aggregate(cfg: CVConfig, manifest: Manifest, run: RunDir, device: torch.device, cache: SharedCache) -> None:
    ks = list(range(cfg.data.folds))
    missing = [k for k in ks if not run.is_done(k)]
    if missing:
        raise UserError(f"{run.path}: fold(s) {missing} are not finished; run "
                        + " ".join(f"`python -m kd_fracture.cv --run-dir {run.path} --fold {k}`" for k in missing))
    fold_results = {k: io.read_json(run.fold(k) / "metrics.json") for k in ks}
    oof = {k: pd.read_csv(run.fold(k) / "oof_predictions.csv") for k in ks}
    histories = {f"fold {k}": pd.read_csv(run.fold(k) / engine.HISTORY) for k in ks}

    # The ensemble probability is the mean of the members' probabilities, so the mean of their inner-val cuts is
    # the cut on the same scale; the refit model (no scored fold of its own) uses it too. Runs from before
    # threshold selection recorded threshold = eval.threshold in each fold's metrics.json.
    fold_thresholds = [float(fold_results[k].get("threshold", cfg.eval.threshold)) for k in ks]
    threshold = float(np.mean(fold_thresholds))
    hold = holdout_rows(manifest)
    holdout_results: dict[str, tuple[dict, dict]] = {}
    pred = ensemble_predict(cfg, run, hold, manifest, device, cache)
    io.write_csv(run.holdout / "predictions.csv", pred)
    holdout_results["fold_ensemble"] = score(cfg, pred, threshold)
    if run.is_done("refit"):
        refit_pred = ensemble_predict(cfg, run, hold, manifest, device, cache, members=["refit"])
        io.write_csv(run.holdout / "predictions_refit.csv", refit_pred)
        holdout_results["refit"] = score(cfg, refit_pred, threshold)
    io.write_json(run.holdout / "metrics.json",
                  {name: {**res, "fold_thresholds": fold_thresholds, "ci95": ci}
                   for name, (res, ci) in holdout_results.items()})
    write_reports(cfg, run, fold_results, oof, histories, pred, holdout_results, fold_thresholds)


def score(cfg: CVConfig, pred: pd.DataFrame, threshold: float | None = None) -> tuple[dict, dict]:
    """(`scoring.evaluate_at` result, 95% bootstrap CIs over studies) of image predictions at `threshold`
    (default eval.threshold); the figures at 0.5 get their own CIs under result["at_0.5"]["ci95"]."""
    threshold = cfg.eval.threshold if threshold is None else threshold
    result = scoring.evaluate_at(pred, threshold, cfg.eval.threshold_rule)
    reference = result[scoring.AT_REFERENCE]
    reference["ci95"] = metrics.bootstrap_ci(pred, cfg.eval.bootstrap, cfg.train.seed, metrics.REFERENCE_THRESHOLD)
    return result, metrics.bootstrap_ci(pred, cfg.eval.bootstrap, cfg.train.seed, threshold)


def write_classification_report(pred: pd.DataFrame, threshold: float, out_dir: Path) -> list[Path]:
    """sklearn's study-level classification_report → out_dir/classification_report.{txt,csv}."""
    from sklearn.metrics import classification_report

    studies = metrics.study_table(pred)
    report_args = dict(y_true=studies["label"], y_pred=(studies["prob"] >= threshold).astype(int),
                       labels=[0, 1], target_names=["normal", "abnormal"], zero_division=0)
    report = pd.DataFrame(classification_report(**report_args, output_dict=True)).T.reset_index(names="class")
    return [io.write_text(out_dir / "classification_report.txt", classification_report(**report_args, digits=3)),
            io.write_csv(out_dir / "classification_report.csv", report)]


def write_reports(cfg: CVConfig, run: RunDir, fold_results: dict, oof: dict, histories: dict,
                  holdout_pred: pd.DataFrame, holdout_results: dict, fold_thresholds: list[float]) -> None:
    ensemble = holdout_results["fold_ensemble"][0]
    threshold = ensemble["threshold"]  # mean of the fold thresholds (aggregate)
    # pooled OOF: one cut for all folds' studies, the holdout's, so the two per-body-part rows are comparable
    pooled = metrics.evaluate(pd.concat(oof.values(), ignore_index=True), threshold)
    cv_table = reporting.cv_fold_table(fold_results)
    written = []
    written += reporting.write_table(cv_table, run.tables / "cv_folds", f"{cfg.model.name}: per-fold study-level metrics")
    written += reporting.write_table(reporting.holdout_table(holdout_results), run.tables / "holdout",
                                     "Holdout study-level metrics with 95% bootstrap CI")
    written += reporting.write_table(reporting.per_body_part_table({"holdout": ensemble, "cv_pooled_oof": pooled}),
                                     run.tables / "per_body_part", "Study-level metrics per body part")
    written += write_classification_report(holdout_pred, threshold, run.holdout)
    written += [reporting.plot_roc(oof, holdout_pred, run.plots / "roc.png"),
                reporting.plot_pr(oof, holdout_pred, run.plots / "pr.png"),
                reporting.plot_calibration(oof, holdout_pred, run.plots / "calibration.png"),
                reporting.plot_confusion({"CV pooled OOF": pooled["confusion"], "holdout ensemble": ensemble["confusion"]},
                                         run.plots / "confusion.png"),
                reporting.plot_curves(histories, run.plots / "curves.png")]
    written += extra_plots(replace(cfg, **{"eval.threshold": threshold}), run, holdout_pred)
    ci = holdout_results["fold_ensemble"][1]["kappa"]
    kappa_ref = ensemble[scoring.AT_REFERENCE]["study"]["kappa"]
    md = cv_table.copy()
    summary = "\n".join([
        f"# {cfg.model.name} — {cfg.data.folds}-fold patient-grouped cross-validation",
        "",
        f"Data: `{cfg.data.root or 'synthetic phantom (not real radiographs)'}`, image size {cfg.data.img_size}, "
        f"seed {cfg.train.seed}, fold seed {cfg.data.fold_seed}.",
        "",
        f"**CV study κ {reporting.mean_pm_std(cv_table['kappa'][:-2])}**, "
        f"study AUROC {reporting.mean_pm_std(cv_table['auroc'][:-2])} (mean ± std over folds).  ",
        f"**Holdout (fold ensemble) study κ {reporting.ci_text(ci['value'], ci['low'], ci['high'])}** "
        f"(95% bootstrap CI); κ at 0.5: {kappa_ref:.3f}.  ",
        f"Holdout calibration: Brier {ensemble['study']['brier']:.3f}, ECE {ensemble['study']['ece']:.3f} "
        f"(10 bins); AUPRC {ensemble['study']['auprc']:.3f}.",
        "",
        reporting.threshold_note(cfg.eval.threshold_rule, fold_thresholds, threshold),
        "",
        "## Per fold", "", md.round(3).to_markdown(index=False), "",
        "## Files", "", reporting.markdown_link_list(run.path, written), "",
    ])
    io.write_text(run.summary, summary)
    print(md.round(3).to_markdown(index=False))
    print(f"holdout study κ (fold ensemble): {reporting.ci_text(ci['value'], ci['low'], ci['high'])}")


def extra_plots(cfg: CVConfig, run: RunDir, holdout_pred: pd.DataFrame) -> list[Path]:
    """Sample-prediction grid, and Grad-CAM examples when the gradcam extra is installed (else one line says so)."""
    from kd_fracture.explain import run_plots

    return run_plots(cfg, run, holdout_pred)


if __name__ == "__main__":
    sys.exit(main())
