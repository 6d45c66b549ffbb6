"""Plots of a run directory: ROC, precision-recall, reliability diagram, confusion matrices, training curves."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from kd_fracture import io  # noqa: E402
from kd_fracture.metrics import ECE_BINS, prob_metrics, reliability_bins, study_table  # noqa: E402


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
