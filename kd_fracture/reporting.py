"""Tables (CSV / Markdown / LaTeX, mean ± std rows) and plots for a run directory (DESIGN §8)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from kd_fracture import io  # noqa: E402
from kd_fracture.metrics import STUDY_METRICS, study_table  # noqa: E402

METRIC_LABELS = {"kappa": "κ", "auroc": "AUROC", "accuracy": "Acc", "sensitivity": "Sens", "specificity": "Spec",
                 "precision": "Prec", "f1": "F1", "image_auroc": "Image AUROC"}


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
    """One row per fold (study-level metrics + image AUROC), then mean and std rows."""
    rows = [{"fold": str(k), "n_studies": r["n_studies"], **{m: r["study"][m] for m in STUDY_METRICS},
             "image_auroc": r["image"]["auroc"]} for k, r in sorted(fold_results.items())]
    return with_mean_std(pd.DataFrame(rows), "fold")


def holdout_table(results: Mapping[str, tuple[dict, dict]]) -> pd.DataFrame:
    """results: model name → (evaluate() result, bootstrap_ci() result). Long form: model, metric, value, CI."""
    rows = []
    for model, (res, ci) in results.items():
        for m in STUDY_METRICS:
            rows.append({"model": model, "metric": f"study_{m}", "value": ci[m]["value"],
                         "ci_low": ci[m]["low"], "ci_high": ci[m]["high"]})
        rows.append({"model": model, "metric": "image_auroc", "value": res["image"]["auroc"],
                     "ci_low": np.nan, "ci_high": np.nan})
    return pd.DataFrame(rows)


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
