"""The distillation report: teacher vs. students table (size, CPU latency, CV and holdout), student.onnx, summary.md.

Each variant (`final/<variant>/`) is shaped like a teacher run and was aggregated by `report.aggregate`; this module
reads those folders and the teacher run, and writes `<teacher_run>/distill/<study>/{tables/teacher_vs_student.*,
student.onnx, export.json, summary.md}`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from kd_fracture import extras, io
from kd_fracture.config import CVConfig, DistillConfig, read_yaml
from kd_fracture.models import export
from kd_fracture.report import tables
from kd_fracture.runs.models import TeacherRun, load_fold_model
from kd_fracture.runs.rundir import RunDir
from kd_fracture.train import engine


@dataclass(frozen=True)
class VariantRun:
    """One trained row of the comparison: its folder name, what it is, its teacher-style config and run folder."""

    name: str
    role: str
    cfg: CVConfig
    run: RunDir


def fold_metrics(run: RunDir, folds: int) -> list[dict]:
    return [io.read_json(run.fold(k) / "metrics.json") for k in range(folds)]


def comparison_row(label: str, role: str, model: nn.Module, in_chans: int, img_size: int, folds: list[dict],
                   holdout: dict, threads: int) -> dict:
    """One row of teacher_vs_student: size and speed of one fold model; CV mean/std and holdout of the ensemble."""
    prof = export.profile_model(model, in_chans, img_size, threads)
    cv_stats = {}
    for m in ("kappa", "auroc", "f1"):
        values = np.array([f["study"][m] for f in folds], dtype=float)  # (K,) scored-fold values
        cv_stats[f"cv_{m}_mean"] = float(np.nanmean(values))
        cv_stats[f"cv_{m}_std"] = float(np.nanstd(values, ddof=1)) if np.isfinite(values).sum() > 1 else 0.0
    ci = holdout["ci95"]
    return {"model": label, "role": role, "params_M": prof["params"] / 1e6, "gflops": prof["flops"] / 1e9,
            "latency_ms": prof["latency_ms"], "latency_threads": threads, **cv_stats,
            "holdout_kappa": ci["kappa"]["value"], "holdout_kappa_low": ci["kappa"]["low"],
            "holdout_kappa_high": ci["kappa"]["high"], "holdout_auroc": ci["auroc"]["value"],
            "holdout_f1": ci["f1"]["value"]}


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """The human-readable form (Markdown/LaTeX): mean ± std and value [CI] as text."""

    def pm(metric: str) -> list[str]:
        return [f"{m:.3f} ± {s:.3f}" for m, s in zip(df[f"cv_{metric}_mean"], df[f"cv_{metric}_std"])]

    def fixed(column: str, digits: int = 3) -> list[str]:
        return [f"{v:.{digits}f}" for v in df[column]]

    return pd.DataFrame({
        "model": df["model"], "role": df["role"], "params (M)": fixed("params_M", 2), "GFLOPs": fixed("gflops"),
        "CPU ms/img": [f"{v:.2f} ({t} thr)" for v, t in zip(df["latency_ms"], df["latency_threads"])],
        "CV study κ": pm("kappa"), "CV AUROC": pm("auroc"), "CV F1": pm("f1"),
        "holdout κ [95% CI]": [tables.ci_text(r.holdout_kappa, r.holdout_kappa_low, r.holdout_kappa_high)
                               for r in df.itertuples()],
        "holdout AUROC": fixed("holdout_auroc"), "holdout F1": fixed("holdout_f1"),
    })


def report(out: RunDir, teacher: TeacherRun, cfg: DistillConfig, params: dict, variants: list[VariantRun],
           search_folds: list[int], elapsed: float) -> None:
    """tables/teacher_vs_student.{csv,md,tex}, student.onnx (the first variant's fold ensemble) and summary.md."""
    data = teacher.cfg.data
    img, folds = data.img_size, data.folds
    threads = cfg.latency_threads
    tcfg = teacher.cfg
    rows = [comparison_row(f"teacher ({tcfg.model.name})", "teacher", teacher.load(0), tcfg.model.in_chans, img,
                           fold_metrics(teacher.run, folds),
                           io.read_json(teacher.run.holdout / "metrics.json")["fold_ensemble"], threads)]
    for v in variants:
        rows.append(comparison_row(v.name, v.role, load_fold_model(v.cfg, v.run, 0), v.cfg.model.in_chans, img,
                                   fold_metrics(v.run, folds),
                                   io.read_json(v.run.holdout / "metrics.json")["fold_ensemble"], threads))
    table = pd.DataFrame(rows)
    stem = out.tables / "teacher_vs_student"
    written = tables.write_table(display_table(table), stem, "Teacher vs. students: size, CPU latency at batch 1, "
                                    "study-level CV (mean ± std over folds) and holdout (fold ensemble, 95% CI)")
    io.write_csv(stem.with_suffix(".csv"), table)  # the CSV keeps full-precision numbers, not the display text

    main = variants[0]
    onnx_info: dict = {"exported": False}
    if cfg.onnx and extras.optional("onnx", "onnx", "student.onnx") is None:
        onnx_info["reason"] = "onnx is not installed (pip install 'kd_fracture[onnx]')"
    elif cfg.onnx:
        members = [load_fold_model(main.cfg, main.run, k) for k in range(folds)]
        ensemble = export.FoldEnsemble(members).eval()
        onnx_info = export.export_onnx(ensemble, out.path / "student.onnx", main.cfg.model.in_chans, img)
        onnx_info |= export.check_onnx(ensemble, out.path / "student.onnx", main.cfg.model.in_chans, img)
        onnx_info |= {"exported": True, "model": f"{main.name} fold ensemble ({folds} members)",
                      "input": f"image (B, {main.cfg.model.in_chans}, {img}, {img}) float32, grayscale "
                               "normalised (x/255 − 0.449)/0.226", "output": "(B,) mean abnormality probability"}
        io.write_json(out.path / "export.json", onnx_info)
        written.append(out.path / "student.onnx")
        if onnx_info.get("checked") and not onnx_info["ok"]:
            engine.log(f"warning: student.onnx differs from torch by {onnx_info['max_abs_diff']:.2e} "
                       f"(> {onnx_info['tolerance']:g})")
    write_summary(out, teacher, cfg, params, table, onnx_info, search_folds, elapsed, written)
    print(display_table(table).to_markdown(index=False))


def write_summary(out: RunDir, teacher: TeacherRun, cfg: DistillConfig, params: dict, table: pd.DataFrame,
                  onnx_info: dict, search_folds: list[int], elapsed: float, written: list[Path]) -> None:
    data = teacher.cfg.data
    best = read_yaml(out.path / "best_params.yaml") if (out.path / "best_params.yaml").exists() else None
    search_line = (f"Study `{cfg.search.study}`: {best['n_complete']} complete, {best['n_pruned']} pruned, "
                   f"{best['n_failed']} failed trials; best trial {best['trial']} with mean {cfg.search.metric} "
                   f"{best['value']:.3f} over search folds {search_folds}." if best else
                   "No search results (final students use the config's parameters).")
    if onnx_info.get("checked"):
        onnx_line = (f"`student.onnx` ({onnx_info['model']}, {onnx_info['exporter']} exporter, opset "
                     f"{onnx_info['opset']}): max |torch − onnxruntime| = {onnx_info['max_abs_diff']:.2e} "
                     f"({'ok' if onnx_info['ok'] else 'TOO LARGE'}, tolerance {onnx_info['tolerance']:g}).")
    elif onnx_info.get("exported"):
        onnx_line = f"`student.onnx` written; not checked: {onnx_info['reason']}."
    else:
        onnx_line = "No ONNX export (onnx: false)."
    plots = sorted((out.plots).glob("optuna_*.png")) if out.plots.exists() else []
    title = (f"# Distillation: {teacher.cfg.model.name} → {cfg.student.name} "
             f"({data.folds}-fold, {data.img_size} px)")
    data_text = data.root or "synthetic phantom (not real radiographs)"
    setup = (f"Teacher run `{teacher.run.path}`; data `{data_text}`; {cfg.kd.views} cached augmented views per image "
             f"({cfg.kd.teacher_cache}); {elapsed / 60:.1f} min.")
    chosen = ", ".join(f"`{k}` = {_fmt(v)}" for k, v in params.items())
    best_line = f"Best parameters: {chosen or '(config defaults)'}"
    if cfg.eval.threshold_rule == "fixed":
        cut = f"κ and F1 at the fixed threshold {cfg.eval.threshold:g}."
    else:
        cut = (f"κ and F1 at each fold's threshold chosen by `{cfg.eval.threshold_rule}` on its inner-validation "
               "split (teachers: the teacher run's rule), the holdout ensemble at the mean of its folds' "
               "thresholds; each variant's tables/ also give them at 0.5, and its Brier, ECE and AUPRC.")
    notes = ("CV numbers are means ± std over the scored folds; holdout = fold ensemble with 95% bootstrap CI over "
             f"studies. Latency: median of 20 batch-1 CPU forward passes after warm-up with {cfg.latency_threads} "
             f"torch thread(s); FLOPs from torch's flop counter (1 MAC = 2 FLOPs) at batch 1. {cut}")
    caveat = ("**Caveat:** the search chose its parameters by the mean scored-fold metric, so the CV numbers of the "
              "KD student are optimistically biased (selection on the same folds); the holdout, never used by the "
              "teachers, the search or early stopping, is the unbiased estimate.")
    lines = [title, "", setup, "", search_line, "", best_line, "",
             "## Teacher vs. students", "", display_table(table).to_markdown(index=False), "", notes, "", caveat, "",
             onnx_line, "", "## Files", "", tables.markdown_link_list(out.path, [*written, *plots]), ""]
    io.write_text(out.summary, "\n".join(lines))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
