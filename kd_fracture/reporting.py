"""Tables (CSV / Markdown / LaTeX, mean ± std rows) and plots for a run directory (DESIGN §8)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from kd_fracture import io  # noqa: E402
from kd_fracture.metrics import (ECE_BINS, PROB_METRICS, STUDY_METRICS, prob_metrics, reliability_bins,  # noqa: E402
                                 study_table)

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
    rows = [{"evaluation": name, "body_part": part, **vals}
            for name, res in results.items() for part, vals in res["per_body_part"].items()]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------------
# plots


def _save(fig, path: Path) -> Path:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_roc(oof: Mapping[int, pd.DataFrame], holdout: pd.DataFrame | None, path: Path) -> Path:
    """Study-level ROC per fold (thin), their mean (vertical averaging at fixed FPR), and the holdout ensemble."""
    fig, ax = plt.subplots(figsize=(5, 5))
    grid = np.linspace(0, 1, 201)
    tprs = []
    for k, pred in sorted(oof.items()):
        s = study_table(pred)
        if s["label"].nunique() < 2:
            continue
        fpr, tpr, _ = roc_curve(s["label"], s["prob"])
        tprs.append(np.interp(grid, fpr, tpr))
        ax.plot(fpr, tpr, lw=1, alpha=0.5, label=f"fold {k}")
    if tprs:
        ax.plot(grid, np.mean(tprs, axis=0), lw=2, color="k", label="mean of folds")
    if holdout is not None:
        s = study_table(holdout)
        if s["label"].nunique() == 2:
            fpr, tpr, _ = roc_curve(s["label"], s["prob"])
            ax.plot(fpr, tpr, lw=2, ls="--", color="tab:red", label="holdout (fold ensemble)")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="Study-level ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_pr(oof: Mapping[int, pd.DataFrame], holdout: pd.DataFrame | None, path: Path) -> Path:
    """Study-level precision–recall curve per fold and of the holdout ensemble, AUPRC (average precision) in the
    legend; the dotted line is the holdout's (else the pooled folds') positive rate, a no-skill model's precision."""
    fig, ax = plt.subplots(figsize=(5, 5))
    base = None
    for k, pred in sorted(oof.items()):
        s = study_table(pred)
        if not (s["label"] == 1).any():
            continue
        precision, recall, _ = precision_recall_curve(s["label"], s["prob"])
        auprc = prob_metrics(s["label"], s["prob"])["auprc"]
        ax.plot(recall, precision, lw=1, alpha=0.6, drawstyle="steps-post", label=f"fold {k} (AUPRC {auprc:.3f})")
    if oof:
        base = study_table(pd.concat(oof.values(), ignore_index=True))["label"].mean()
    if holdout is not None:
        s = study_table(holdout)
        if (s["label"] == 1).any():
            precision, recall, _ = precision_recall_curve(s["label"], s["prob"])
            auprc = prob_metrics(s["label"], s["prob"])["auprc"]
            ax.plot(recall, precision, lw=2, ls="--", color="tab:red", drawstyle="steps-post",
                    label=f"holdout ensemble (AUPRC {auprc:.3f})")
        base = s["label"].mean() if len(s) else base
    if base is not None and np.isfinite(base):
        ax.axhline(base, ls=":", color="grey", label=f"no skill ({base:.2f})")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Study-level precision–recall",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_calibration(oof: Mapping[int, pd.DataFrame], holdout: pd.DataFrame | None, path: Path,
                     n_bins: int = ECE_BINS) -> Path:
    """Study-level reliability diagram: positive rate vs. mean predicted probability in `n_bins` equal-width bins
    (the bins of the ECE), for the pooled out-of-fold studies and the holdout ensemble, with the diagonal of perfect
    calibration; below, the number of studies per bin. ECE and Brier in the legend."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    sets = {}
    if oof:
        sets["CV pooled OOF"] = (study_table(pd.concat(oof.values(), ignore_index=True)), "tab:blue", "o")
    if holdout is not None:
        sets["holdout ensemble"] = (study_table(holdout), "tab:red", "s")
    width = 1 / n_bins
    offsets = np.linspace(-width / 4, width / 4, max(len(sets), 1)) if len(sets) > 1 else [0.0]
    for (name, (s, color, marker)), dx in zip(sets.items(), offsets):
        if s.empty:
            continue
        bins = reliability_bins(s["label"], s["prob"], n_bins)
        m = prob_metrics(s["label"], s["prob"])
        shown = bins["n"] > 0
        ax.plot(bins.loc[shown, "conf"], bins.loc[shown, "acc"], marker=marker, color=color, lw=1.5, ms=4,
                label=f"{name} (ECE {m['ece']:.3f}, Brier {m['brier']:.3f})")
        ax_n.bar((bins["low"] + bins["high"]) / 2 + dx, bins["n"], width=width / max(len(sets), 1) * 0.9,
                 color=color, alpha=0.6, label=name)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
    ax.set(ylabel="fraction abnormal", title=f"Study-level calibration ({n_bins} bins)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="upper left")
    ax_n.set(xlabel="mean predicted probability", ylabel="studies")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(confusions: Mapping[str, list], path: Path) -> Path:
    """Study-level confusion matrices, one panel per evaluation ([[tn, fp], [fn, tp]])."""
    fig, axes = plt.subplots(1, len(confusions), figsize=(3.6 * len(confusions), 3.4), squeeze=False)
    for ax, (name, cm) in zip(axes[0], confusions.items()):
        cm = np.asarray(cm)
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["normal", "abnormal"], yticklabels=["normal", "abnormal"],
               xlabel="predicted", ylabel="true", title=name)
    fig.tight_layout()
    return _save(fig, path)


def plot_curves(histories: Mapping[str, pd.DataFrame], path: Path) -> Path:
    """Training loss and inner-val study κ per epoch, one line per fold."""
    fig, (ax_loss, ax_kappa) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, h in histories.items():
        if h.empty:
            continue
        ax_loss.plot(h["epoch"] + 1, h["train_loss"], marker="o", ms=3, label=name)
        ax_kappa.plot(h["epoch"] + 1, h["val_study_kappa"], marker="o", ms=3, label=name)
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    ax_kappa.set(xlabel="epoch", ylabel="study κ", title="Inner-validation study κ")
    ax_kappa.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def markdown_link_list(run_dir: Path, paths: Iterable[Path]) -> str:
    return "\n".join(f"- [{p.relative_to(run_dir)}]({p.relative_to(run_dir)})" for p in paths)
