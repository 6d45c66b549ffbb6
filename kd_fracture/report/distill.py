"""The distillation report: what each model costs and scores, per deployable thing, and KD vs no-KD paired.

Each variant (`final/<variant>/`) is shaped like a teacher run and was aggregated by `report.aggregate`; this module
reads those folders and the teacher run (as `report.compare.load_result` reads any run) and writes
`<teacher_run>/distill/<study>/`:
- tables/teacher_vs_student.{csv,md,tex}: two row groups per model. "single": one fold model's params, GFLOPs and
  CPU latency beside the mean ± std over folds of its scored-fold metrics (what one fold model scores on patients it
  never saw). "ensemble": the K fold models averaged — K× the params and FLOPs, its own measured latency — beside the
  holdout (what the ensemble scores). Single rows also carry Δκ and ΔAUROC against the no-KD student per fold (mean ±
  std) with the corrected resampled t-test p-value (Nadeau & Bengio 2003; `report.compare`).
- tables/paired_vs_no_kd.{csv,md,tex}: the per-fold differences behind those columns.
- student.onnx (one fold model of the first variant) and student_ensemble.onnx (its K-fold ensemble), each checked
  against torch with onnxruntime when installed; export.json; summary.md; report.html (one self-contained page).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from kd_fracture import extras, io
from kd_fracture.config import CVConfig, DistillConfig, read_yaml
from kd_fracture.models import export
from kd_fracture.report import html, tables
from kd_fracture.report.compare import RunResult, corrected_resampled_ttest, load_result
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


PAIRED = ("kappa", "auroc")


def comparison_rows(label: str, role: str, result: RunResult, members: list[nn.Module], in_chans: int, img_size: int,
                    threads: int) -> list[dict]:
    """The single-model row and the K-fold-ensemble row of one model, each with the accuracy of that same thing."""
    single = export.profile_model(members[0], in_chans, img_size, threads)
    ensemble = export.profile_model(export.FoldEnsemble(members).eval(), in_chans, img_size, threads)
    folds = result.folds
    cv_stats = {}
    for m in ("kappa", "auroc", "f1"):
        values = folds[m].to_numpy(dtype=float)  # (K,) scored-fold values
        cv_stats[f"{m}"] = float(np.nanmean(values))
        cv_stats[f"{m}_std"] = float(np.nanstd(values, ddof=1)) if np.isfinite(values).sum() > 1 else 0.0
    ci = result.holdout["ci95"]
    base = {"model": label, "role": role, "latency_threads": threads}
    return [
        {**base, "deployable": "single", "members": 1, "params_M": single["params"] / 1e6,
         "gflops": single["flops"] / 1e9, "latency_ms": single["latency_ms"], "evaluation": "CV scored folds",
         **cv_stats},
        {**base, "deployable": "ensemble", "members": len(members), "params_M": ensemble["params"] / 1e6,
         "gflops": ensemble["flops"] / 1e9, "latency_ms": ensemble["latency_ms"], "evaluation": "holdout",
         "kappa": ci["kappa"]["value"], "kappa_low": ci["kappa"]["low"], "kappa_high": ci["kappa"]["high"],
         "auroc": ci["auroc"]["value"], "auroc_low": ci["auroc"]["low"], "auroc_high": ci["auroc"]["high"],
         "f1": ci["f1"]["value"]},
    ]


def paired_vs(reference: RunResult, results: dict[str, RunResult]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-fold differences (model − reference) of κ and AUROC on the shared folds, and per model their mean, std
    and corrected resampled t-test p (n_train = studies a fold model trained on, n_test = scored studies)."""
    per_fold, summary = [], []
    for name, r in results.items():
        if r.folds_key != reference.folds_key:
            continue
        row = {"model": name}
        for m in PAIRED:
            d = (r.folds[m] - reference.folds[m]).to_numpy(dtype=float)  # (K,)
            per_fold += [{"model": name, "metric": f"study_{m}", "fold": k, "diff": v} for k, v in enumerate(d)]
            _, p = corrected_resampled_ttest(d, reference.n_train, reference.n_test)
            row |= {f"d{m}": float(d.mean()), f"d{m}_std": float(d.std(ddof=1)) if len(d) > 1 else math.nan,
                    f"p_{m}": p}
        summary.append(row)
    return pd.DataFrame(per_fold), pd.DataFrame(summary)


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """The human-readable form (Markdown/LaTeX): single rows as mean ± std (with the paired Δ and p), ensemble rows
    as holdout value [95% CI]."""

    def pm(row, m: str) -> str:
        if row.deployable == "single":
            return f"{getattr(row, m):.3f} ± {getattr(row, m + '_std'):.3f}"
        if m == "f1":
            return f"{row.f1:.3f}"
        return tables.ci_text(getattr(row, m), getattr(row, m + "_low"), getattr(row, m + "_high"))

    def delta(row, m: str) -> str:
        value = getattr(row, f"d{m}", math.nan)
        if row.deployable != "single" or not np.isfinite(value):
            return "—"
        return f"{value:+.3f} ± {getattr(row, f'd{m}_std'):.3f} (p={getattr(row, f'p_{m}'):.2f})"

    rows = list(df.itertuples())
    return pd.DataFrame({
        "model": df["model"], "deployable": [f"{r.deployable} ({r.members})" for r in rows],
        "params (M)": [f"{v:.2f}" for v in df["params_M"]], "GFLOPs": [f"{v:.3f}" for v in df["gflops"]],
        "CPU ms/img": [f"{v:.2f}" for v in df["latency_ms"]], "scored on": df["evaluation"],
        "study κ": [pm(r, "kappa") for r in rows], "AUROC": [pm(r, "auroc") for r in rows],
        "F1": [pm(r, "f1") for r in rows],
        "Δκ vs no-KD": [delta(r, "kappa") for r in rows], "ΔAUROC vs no-KD": [delta(r, "auroc") for r in rows],
    })


def export_student(main: VariantRun, folds: int, img: int, out: RunDir) -> dict:
    """student.onnx (fold 0's model) and student_ensemble.onnx (the K-fold ensemble), each → probability (B,)."""
    members = [load_fold_model(main.cfg, main.run, k) for k in range(folds)]
    in_chans = main.cfg.model.in_chans
    info = {}
    for file, model, what in (("student.onnx", export.FoldEnsemble(members[:1]).eval(), f"{main.name} fold 0"),
                              ("student_ensemble.onnx", export.FoldEnsemble(members).eval(),
                               f"{main.name} fold ensemble ({folds} members)")):
        one = export.export_onnx(model, out.path / file, in_chans, img)
        one |= export.check_onnx(model, out.path / file, in_chans, img)
        one |= {"exported": True, "model": what, "output": "(B,) abnormality probability (mean over members)",
                "input": f"image (B, {in_chans}, {img}, {img}) float32, grayscale normalised (x/255 − 0.449)/0.226"}
        if one.get("checked") and not one["ok"]:
            engine.log(f"warning: {file} differs from torch by {one['max_abs_diff']:.2e} (> {one['tolerance']:g})")
        info[file] = one
    io.write_json(out.path / "export.json", info)
    return info


def report(out: RunDir, teacher: TeacherRun, cfg: DistillConfig, params: dict[str, dict], variants: list[VariantRun],
           search_folds: list[int], elapsed: float) -> None:
    """tables/teacher_vs_student.*, tables/paired_vs_no_kd.*, student.onnx + student_ensemble.onnx, summary.md."""
    data = teacher.cfg.data
    img, folds, threads = data.img_size, data.folds, cfg.latency_threads
    tcfg = teacher.cfg
    label = f"teacher ({tcfg.model.name})"
    results = {label: load_result(teacher.run.path, label)} | {v.name: load_result(v.run.path, v.name)
                                                                 for v in variants}
    rows = comparison_rows(label, "teacher", results[label], [teacher.load(k) for k in range(folds)],
                           tcfg.model.in_chans, img, threads)
    for v in variants:
        rows += comparison_rows(v.name, v.role, results[v.name], [load_fold_model(v.cfg, v.run, k)
                                                                  for k in range(folds)],
                                v.cfg.model.in_chans, img, threads)
    table = pd.DataFrame(rows)
    written: list[Path] = []
    no_kd = next((v for v in variants if v.name.endswith("_no_kd")), None)  # runs.models.variant_name
    if no_kd is not None:
        per_fold, paired = paired_vs(results[no_kd.name], {n: r for n, r in results.items() if n != no_kd.name})
        table = table.merge(paired.assign(deployable="single"), on=["model", "deployable"], how="left")
        written += tables.write_table(per_fold, out.tables / "paired_vs_no_kd",
                                      f"Per-fold differences against {no_kd.name} (model − no-KD)")
    stem = out.tables / "teacher_vs_student"
    written += tables.write_table(display_table(table), stem, "Teacher vs. students per deployable thing: one fold "
                                  "model (CV mean ± std over scored folds, paired Δ vs. no-KD with the corrected "
                                  "resampled t-test p) and the K-fold ensemble (holdout, 95% CI over patients)")
    io.write_csv(stem.with_suffix(".csv"), table)  # the CSV keeps full-precision numbers, not the display text

    onnx_info: dict = {}
    if cfg.onnx and extras.optional("onnx", "onnx", "student.onnx") is None:
        onnx_info = {"reason": "onnx is not installed (pip install 'kd_fracture[onnx]')"}
    elif cfg.onnx:
        onnx_info = export_student(variants[0], folds, img, out)
        written += [out.path / f for f in onnx_info]
    write_summary(out, teacher, cfg, params, table, onnx_info, search_folds, elapsed,
                  [*written, out.path / html.REPORT])
    html.write_distill_report(out.path)
    print(display_table(table).to_markdown(index=False))


def write_summary(out: RunDir, teacher: TeacherRun, cfg: DistillConfig, params: dict[str, dict], table: pd.DataFrame,
                  onnx_info: dict, search_folds: list[int], elapsed: float, written: list[Path]) -> None:
    data = teacher.cfg.data
    search_lines = []
    for name, chosen in params.items():
        saved = out.path / "search" / name / "best_params.yaml"
        best = read_yaml(saved) if saved.exists() else None
        values = ", ".join(f"`{k}` = {_fmt(v)}" for k, v in chosen.items()) or "(config defaults)"
        search_lines.append(
            f"- `{name}` (study `{cfg.search.study}/{name}`): " + (
                f"{best['n_complete']} complete, {best['n_pruned']} pruned, {_failed(best)} trials; best "
                f"trial {best['trial']}, inner-val {cfg.search.metric} {best['value']:.3f}; " if best else
                "no search; ") + values)
    if onnx_info.get("student.onnx"):
        onnx_lines = []
        for file, info in onnx_info.items():
            check = (f"max |torch − onnxruntime| = {info['max_abs_diff']:.2e} "
                     f"({'ok' if info['ok'] else 'TOO LARGE'}, tolerance {info['tolerance']:g})"
                     if info.get("checked") else f"not checked: {info.get('reason')}")
            onnx_lines.append(f"- `{file}` ({info['model']}, {info['exporter']} exporter, opset {info['opset']}): "
                              f"{check}.")
        onnx_text = "\n".join(onnx_lines)
    else:
        onnx_text = f"No ONNX export ({onnx_info.get('reason', 'onnx: false')})."
    plots = sorted(out.path.glob("search/*/plots/optuna_*.png"))
    title = (f"# Distillation: {teacher.cfg.model.name} → {cfg.student.name} "
             f"({data.folds}-fold, {data.img_size} px)")
    data_text = data.root or "synthetic phantom (not real radiographs)"
    setup = (f"Teacher run `{teacher.run.path}`; data `{data_text}`; {cfg.kd.views} cached augmented views per image "
             f"({cfg.kd.teacher_cache}); {elapsed / 60:.1f} min.")
    selection = (f"**Which data chose the hyper-parameters:** each variant's own study ({cfg.search.n_trials} trials "
                 f"of search folds {search_folds} × ≤ {cfg.search.epochs or cfg.train.epochs} epochs, pruner "
                 f"`{cfg.search.pruner}`) ranked trials by `{cfg.search.metric}` on the search folds' "
                 "inner-validation splits only. The scored folds and the holdout, which the table reports, played "
                 "no part in any choice, so the CV columns are not biased by selection.")
    if cfg.eval.threshold_rule == "fixed":
        cut = f"κ and F1 at the fixed threshold {cfg.eval.threshold:g}."
    else:
        cut = (f"κ and F1 at each fold's threshold chosen by `{cfg.eval.threshold_rule}` on its inner-validation "
               "split (teachers: the teacher run's rule), the holdout ensemble at the mean of its folds' "
               "thresholds; each variant's tables/ also give them at 0.5, and its Brier, ECE and AUPRC.")
    notes = ("single = one fold model: its cost, and mean ± std of its scored-fold metrics over the K folds; "
             "ensemble = the K fold models' mean probability: K× the parameters and FLOPs, its own measured latency, "
             "and the holdout with 95% bootstrap CIs over patients. Δ = this model − the no-KD student on the same "
             "folds; p = two-sided corrected resampled t-test (Nadeau & Bengio 2003). Latency: median of 20 batch-1 "
             f"CPU forward passes after warm-up with {cfg.latency_threads} torch thread(s); FLOPs from torch's flop "
             f"counter (1 MAC = 2 FLOPs) at batch 1. {cut}")
    lines = [title, "", setup, "", selection, "", "## Searches", "", *search_lines, "",
             "## Teacher vs. students", "", display_table(table).to_markdown(index=False), "", notes, "",
             "## Export", "", onnx_text, "", "## Files", "",
             tables.markdown_link_list(out.path, [*written, *plots]), ""]
    io.write_text(out.summary, "\n".join(lines))


def _failed(best: dict) -> str:
    """"2 failed (1 whose worker died), 1 retried" from best_params.yaml's counts (older files lack the last two)."""
    reaped, retried = best.get("n_reaped", 0), best.get("n_retried", 0)
    return (f"{best['n_failed']} failed" + (f" ({reaped} whose worker died)" if reaped else "")
            + f", {retried} retried")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
