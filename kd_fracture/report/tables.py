"""Tables of a run directory: CSV, Markdown and LaTeX from one pandas frame, mean ± std rows, CI text."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from kd_fracture import io
from kd_fracture.metrics import PROB_METRICS, STUDY_METRICS

METRIC_LABELS = {"kappa": "κ", "auroc": "AUROC", "accuracy": "Acc", "sensitivity": "Sens", "specificity": "Spec",
                 "precision": "Prec", "f1": "F1", "image_auroc": "Image AUROC", "brier": "Brier", "ece": "ECE",
                 "auprc": "AUPRC"}
REFERENCE_METRICS = ("kappa", "sensitivity", "specificity", "f1")
"""Threshold-dependent metrics also tabulated at 0.5 (`<metric>@0.5` columns / rows) beside the chosen cut."""
THRESHOLD_RULE_TEXT = {"fixed": "a fixed cut", "youden": "maximal Youden's J = sensitivity + specificity − 1",
                       "max_kappa": "maximal study κ"}


# ----------------------------------------------------------------------------------------------------------------------
# tables


def with_mean_std(df: pd.DataFrame, label_col: str) -> pd.DataFrame:
    """Append `mean` and `std` (sample, ddof=1) rows over the numeric columns."""
    numeric = df.select_dtypes("number").columns
    mean = df[numeric].mean().to_frame().T.assign(**{label_col: "mean"})
    std = df[numeric].std(ddof=1).to_frame().T.assign(**{label_col: "std"})
    out = pd.concat([df.astype({label_col: str}), mean, std], ignore_index=True)
    return out[df.columns]


def mean_pm_std(values: Iterable[float], digits: int = 3) -> str:
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return "n/a"
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.{digits}f} ± {std:.{digits}f}"


def ci_text(value: float, low: float, high: float, digits: int = 3) -> str:
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def write_table(df: pd.DataFrame, stem: str | Path, caption: str = "", digits: int = 3) -> list[Path]:
    """Write `stem.csv` (full precision), `stem.md` and `stem.tex` (rounded) atomically."""
    stem = Path(stem)
    rounded = df.copy()
    for col in rounded.select_dtypes("float").columns:
        rounded[col] = rounded[col].map(lambda x: "" if pd.isna(x) else f"{x:.{digits}f}")
    paths = [io.write_csv(stem.with_suffix(".csv"), df),
             io.write_text(stem.with_suffix(".md"), rounded.to_markdown(index=False) + "\n")]
    latex = rounded.to_latex(index=False, caption=caption or None, label=f"tab:{stem.name}", escape=True)
    paths.append(io.write_text(stem.with_suffix(".tex"), latex))
    return paths


def cv_fold_table(fold_results: Mapping[int, dict]) -> pd.DataFrame:
    """One row per fold, then mean and std rows: the decision threshold, the study-level metrics at it, brier, ece,
    auprc, image AUROC and κ/sensitivity/specificity/F1 at 0.5 (`kappa@0.5`, …; NaN for results without them)."""
    nan = float("nan")
    rows = []
    for k, r in sorted(fold_results.items()):
        at_ref = r.get("at_0.5", {}).get("study", {})
        rows.append({"fold": str(k), "n_studies": r["n_studies"], "threshold": r.get("threshold", nan),
                     **{m: r["study"][m] for m in STUDY_METRICS},
                     **{m: r["study"].get(m, nan) for m in PROB_METRICS},
                     "image_auroc": r["image"]["auroc"],
                     **{f"{m}@0.5": at_ref.get(m, nan) for m in REFERENCE_METRICS}})
    return with_mean_std(pd.DataFrame(rows), "fold")


def holdout_table(results: Mapping[str, tuple[dict, dict]]) -> pd.DataFrame:
    """results: model name → (evaluate() result, bootstrap_ci() result), as `cv.score` returns them.

    Long form: model, metric, value, CI. Rows: the threshold, the study metrics at it (95% CI), study and image
    brier/ece/auprc and image AUROC (value only), then `study_<m>@0.5` for κ, sensitivity, specificity, F1 (with the
    CI when the result carries `at_0.5.ci95`).
    """
    nan = float("nan")
    rows = []
    for model, (res, ci) in results.items():
        rows.append({"model": model, "metric": "threshold", "value": res.get("threshold", nan),
                     "ci_low": nan, "ci_high": nan})
        for m in STUDY_METRICS:
            rows.append({"model": model, "metric": f"study_{m}", "value": ci[m]["value"],
                         "ci_low": ci[m]["low"], "ci_high": ci[m]["high"]})
        for level in ("study", "image"):
            for m in PROB_METRICS:
                rows.append({"model": model, "metric": f"{level}_{m}", "value": res[level].get(m, nan),
                             "ci_low": nan, "ci_high": nan})
        rows.append({"model": model, "metric": "image_auroc", "value": res["image"]["auroc"],
                     "ci_low": nan, "ci_high": nan})
        at_ref = res.get("at_0.5", {})
        ref_ci = at_ref.get("ci95", {})
        for m in REFERENCE_METRICS:
            band = ref_ci.get(m, {})
            rows.append({"model": model, "metric": f"study_{m}@0.5", "value": at_ref.get("study", {}).get(m, nan),
                         "ci_low": band.get("low", nan), "ci_high": band.get("high", nan)})
    return pd.DataFrame(rows)


def threshold_note(rule: str, fold_thresholds: Iterable[float], threshold: float, what: str = "fold ensemble") -> str:
    """One Markdown sentence for summary.md: which rule chose the cut on which data, and where 0.5 is reported."""
    folds = ", ".join(f"{t:.3f}" for t in fold_thresholds)
    if rule == "fixed":
        head = (f"Decision threshold: fixed at {threshold:.3f} (`eval.threshold_rule: fixed`) for every fold and "
                f"the {what}.")
    else:
        head = (f"Decision threshold: `eval.threshold_rule: {rule}` ({THRESHOLD_RULE_TEXT.get(rule, rule)}) on each "
                f"fold's inner-validation split (folds: {folds}; a split with one class keeps eval.threshold), "
                f"applied to that fold's scored studies; the holdout {what} uses their mean, {threshold:.3f}.")
    return (head + " κ, sensitivity, specificity, precision and F1 are at that cut; the `@0.5` columns and rows "
            "give them at 0.5; Brier, ECE and AUPRC do not depend on it.")


def per_body_part_table(results: Mapping[str, dict]) -> pd.DataFrame:
    """results: evaluation name (e.g. holdout, cv_pooled) → evaluate() result; one row per (evaluation, body part)."""
    rows = []
    for name, res in results.items():
        for part, vals in res["per_body_part"].items():
            ci = vals.get("ci95", {})  # the holdout's parts carry patient-bootstrap CIs (report.aggregate.score)
            bounds = {f"{m}_{end}": ci[m][end] for m in ci for end in ("low", "high")}
            rows.append({"evaluation": name, "body_part": part, **{k: v for k, v in vals.items() if k != "ci95"},
                         **bounds})
    return pd.DataFrame(rows)


def markdown_link_list(run_dir: Path, paths: Iterable[Path]) -> str:
    return "\n".join(f"- [{p.relative_to(run_dir)}]({p.relative_to(run_dir)})" for p in paths)
