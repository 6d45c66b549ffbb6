"""Aggregation of a finished run (cv teachers or a distilled variant): holdout, tables, plots, summary.md, report.html.

The fold ensemble's holdout probability is the mean of the K members' probabilities, scored at the mean of their
inner-val thresholds (the cut on the same scale) with 95% bootstrap CIs over patients, and at 0.5
(docs/design.md §6). Tables give mean ± std over the scored folds (CSV, Markdown, LaTeX).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kd_fracture import io, metrics
from kd_fracture.config import CVConfig, replace
from kd_fracture.data.loaders import SharedCache, holdout_rows
from kd_fracture.data.manifest import Manifest
from kd_fracture.models import is_student_name
from kd_fracture.report import figures, html, plots, tables
from kd_fracture.runs import scoring
from kd_fracture.runs.models import ensemble_predict, run_models
from kd_fracture.runs.rundir import RunDir, require_done
from kd_fracture.train import checkpoint, engine


def aggregate(cfg: CVConfig, manifest: Manifest, run: RunDir, device: torch.device, cache: SharedCache,
              fix: str) -> None:
    """Holdout, tables, plots and summary.md of a run whose K folds are DONE (`fix`: the command that finishes the
    folds, named when some are not)."""
    ks = list(range(cfg.data.folds))
    require_done(run, ks, "fold(s)", fix)
    fold_results = {k: io.read_json(run.fold(k) / "metrics.json") for k in ks}
    oof = {k: pd.read_csv(run.fold(k) / "oof_predictions.csv") for k in ks}
    histories = {f"fold {k}": pd.read_csv(run.fold(k) / checkpoint.HISTORY) for k in ks}

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
    """(`scoring.evaluate_at` result, 95% bootstrap CIs over patients) of image predictions at `threshold`
    (default eval.threshold); the figures at 0.5 get their own CIs under result["at_0.5"]["ci95"], and each body
    part its κ and AUROC CIs under result["per_body_part"][part]["ci95"]."""
    threshold = cfg.eval.threshold if threshold is None else threshold
    result = scoring.evaluate_at(pred, threshold, cfg.eval.threshold_rule)
    reference = result[scoring.AT_REFERENCE]
    reference["ci95"] = metrics.bootstrap_ci(pred, cfg.eval.bootstrap, cfg.train.seed, metrics.REFERENCE_THRESHOLD)
    for part, values in result["per_body_part"].items():
        ci = metrics.bootstrap_ci(pred[pred["body_part"] == part], cfg.eval.bootstrap, cfg.train.seed, threshold)
        values["ci95"] = {m: ci[m] for m in ("kappa", "auroc")}
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
    cv_table = tables.cv_fold_table(fold_results)
    written = []
    written += tables.write_table(cv_table, run.tables / "cv_folds", f"{cfg.model.name}: per-fold study-level metrics")
    written += tables.write_table(tables.holdout_table(holdout_results), run.tables / "holdout",
                                     "Holdout study-level metrics with 95% bootstrap CI")
    written += tables.write_table(tables.per_body_part_table({"holdout": ensemble, "cv_pooled_oof": pooled}),
                                     run.tables / "per_body_part", "Study-level metrics per body part")
    written += write_classification_report(holdout_pred, threshold, run.holdout)
    written += [plots.plot_roc(oof, holdout_pred, run.plots / "roc.png"),
                plots.plot_pr(oof, holdout_pred, run.plots / "pr.png"),
                plots.plot_calibration(oof, holdout_pred, run.plots / "calibration.png"),
                plots.plot_confusion({"CV pooled OOF": pooled["confusion"], "holdout ensemble": ensemble["confusion"]},
                                         run.plots / "confusion.png"),
                plots.plot_curves(histories, run.plots / "curves.png")]
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
        f"**CV study κ {tables.mean_pm_std(cv_table['kappa'][:-2])}**, "
        f"study AUROC {tables.mean_pm_std(cv_table['auroc'][:-2])} (mean ± std over folds).  ",
        f"**Holdout (fold ensemble) study κ {tables.ci_text(ci['value'], ci['low'], ci['high'])}** "
        f"(95% bootstrap CI); κ at 0.5: {kappa_ref:.3f}.  ",
        f"Holdout calibration: Brier {ensemble['study']['brier']:.3f}, ECE {ensemble['study']['ece']:.3f} "
        f"(10 bins); AUPRC {ensemble['study']['auprc']:.3f}.",
        "",
        tables.threshold_note(cfg.eval.threshold_rule, fold_thresholds, threshold),
        "",
        "## Per fold", "", md.round(3).to_markdown(index=False), "",
        "## Files", "", tables.markdown_link_list(run.path, [*written, run.path / html.REPORT]), "",
    ])
    io.write_text(run.summary, summary)
    html.write_run_report(run.path)
    print(md.round(3).to_markdown(index=False))
    print(f"holdout study κ (fold ensemble): {tables.ci_text(ci['value'], ci['low'], ci['high'])}")


def extra_plots(cfg: CVConfig, run: RunDir, holdout_pred: pd.DataFrame) -> list[Path]:
    """Sample-prediction grid, and Grad-CAM examples when the gradcam extra is installed (else one line says so)."""
    role = "student" if is_student_name(cfg.model.name) else "teacher"  # distill aggregates its students here too
    return figures.example_plots(run_models(cfg, run, role), holdout_pred, figures.data_root(cfg.data), run.plots,
                                 engine.resolve_device(cfg.train.device), seed=cfg.train.seed)
