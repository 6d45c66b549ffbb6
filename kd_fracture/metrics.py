"""Image- and study-level metrics (docs/design.md §6), computed with sklearn.

MURA's metric (Rajpurkar et al. 2017) is study-level: a study's probability is the mean of its images'
probabilities, its prediction is `prob >= threshold`, and agreement with the radiologists' label is Cohen's κ.
The threshold is 0.5 or one chosen on the inner-validation split (`choose_threshold`); calibration (Brier, ECE)
and AUPRC do not depend on it.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from sklearn import metrics as skm

STUDY_METRICS = ("kappa", "auroc", "accuracy", "sensitivity", "specificity", "precision", "f1")
"""Study-level metrics, in table order."""

MONITORS = ("study_kappa", "study_auroc", "image_auroc")

PROB_METRICS = ("brier", "ece", "auprc")
"""Threshold-free metrics of the probabilities (calibration and precision–recall), at study and image level."""

THRESHOLD_RULES = ("fixed", "youden", "max_kappa")
"""`eval.threshold_rule` values; see `choose_threshold`."""

REFERENCE_THRESHOLD = 0.5
"""The conventional cut every result is also reported at (key `at_0.5`), whatever threshold was chosen."""

ECE_BINS = 10


def binary_metrics(y_true, prob, threshold: float = 0.5) -> dict[str, float]:
    """Cohen's κ, AUROC, accuracy, sensitivity (recall of 1), specificity (recall of 0), precision, F1.

    Undefined values (AUROC with one class present, precision with no positive prediction) are NaN, not 0,
    so they do not silently drag a mean down.
    """
    y_true = np.asarray(y_true, dtype=int)
    prob = np.asarray(prob, dtype=float)
    y_pred = (prob >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    nan = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on degenerate inputs; we return NaN instead
        kappa = skm.cohen_kappa_score(y_true, y_pred, labels=[0, 1])
    return {
        "kappa": float(kappa) if np.isfinite(kappa) else nan,
        "auroc": float(skm.roc_auc_score(y_true, prob)) if len(np.unique(y_true)) == 2 else nan,
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "sensitivity": float(skm.recall_score(y_true, y_pred, zero_division=np.nan)) if tp + fn else nan,
        "specificity": float(tn / (tn + fp)) if tn + fp else nan,
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=np.nan)) if tp + fp else nan,
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=np.nan)) if tp + fp + fn else nan,
    }


def study_table(pred: pd.DataFrame) -> pd.DataFrame:
    """Image predictions (study_id, body_part, label, prob[, patient_id]) → one row per study, prob = mean of images."""
    keys = ["study_id", "body_part", "label"] + (["patient_id"] if "patient_id" in pred else [])
    studies = pred.groupby(keys, sort=True, as_index=False).agg(prob=("prob", "mean"), n_images=("prob", "size"))
    dup = studies["study_id"].duplicated(keep=False)
    if dup.any():
        raise ValueError(f"study {studies.loc[dup, 'study_id'].iloc[0]!r} has images with different labels or body parts")
    return studies


def expected_calibration_error(y_true, prob, n_bins: int = ECE_BINS) -> float:
    """ECE = Σ_b (n_b / N) · |acc_b − conf_b| over `n_bins` equal-width bins of the predicted probability.

    Bin b holds the predictions with b/B ≤ p < (b+1)/B (the last bin also p = 1); conf_b = mean predicted probability
    of the positive class in the bin, acc_b = fraction of positives in it; empty bins add nothing. 0 = perfectly
    calibrated. Naeini, Cooper & Hauskrecht 2015 (AAAI), "Obtaining well calibrated probabilities using Bayesian
    binning"; Guo et al. 2017 (ICML), "On calibration of modern neural networks". NaN for no predictions.
    """
    p = np.asarray(prob, dtype=float)
    if len(p) == 0:
        return float("nan")
    _, sum_y, sum_p = _bin_sums(y_true, p, n_bins)
    # Σ_b (n_b/N)·|acc_b − conf_b| = Σ_b |Σ_{i∈b} y_i − Σ_{i∈b} p_i| / N
    return float(np.abs(sum_y - sum_p).sum() / len(p))


def _bin_sums(y_true, prob, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(count, Σ y, Σ p) per equal-width probability bin, each (n_bins,); bin b holds b/B ≤ p < (b+1)/B, p = 1 the
    last."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(prob, dtype=float)
    b = np.minimum(np.floor(p * n_bins).astype(int), n_bins - 1)  # (N,) bin index
    return (np.bincount(b, minlength=n_bins).astype(float), np.bincount(b, weights=y, minlength=n_bins),
            np.bincount(b, weights=p, minlength=n_bins))


def reliability_bins(y_true, prob, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Per equal-width bin (as in `expected_calibration_error`): lower/upper edge, count n, conf (mean p), acc
    (positive rate); conf and acc are NaN for empty bins. The reliability diagram's data."""
    n, sum_y, sum_p = _bin_sums(y_true, prob, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = sum_p / n
        acc = sum_y / n
    edges = np.arange(n_bins + 1) / n_bins
    return pd.DataFrame({"low": edges[:-1], "high": edges[1:], "n": n.astype(int), "conf": conf, "acc": acc})


def prob_metrics(y_true, prob) -> dict[str, float]:
    """Brier score mean((p − y)²) (Brier 1950), ECE (`expected_calibration_error`) and AUPRC (sklearn's
    average precision, AP = Σ_n (R_n − R_{n−1}) · P_n). NaN where undefined: all three with no predictions,
    AUPRC with no positive."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(prob, dtype=float)
    nan = float("nan")
    if len(y) == 0:
        return {"brier": nan, "ece": nan, "auprc": nan}
    return {"brier": float(skm.brier_score_loss(y, p, pos_label=1)),
            "ece": expected_calibration_error(y, p),
            "auprc": float(skm.average_precision_score(y, p)) if (y == 1).any() else nan}


def choose_threshold(pred: pd.DataFrame, rule: str, fixed: float = 0.5) -> float:
    """The study-level decision threshold t (predict abnormal iff study prob ≥ t) that `rule` picks on `pred`.

    `pred` holds image predictions (study_id, body_part, label, prob), usually of the inner-validation split; the
    rule works on `study_table(pred)` (study prob = mean of its images), the level MURA is scored at.
      fixed      t = `fixed`.
      youden     maximise Youden's J = sensitivity + specificity − 1 = TPR − FPR (Youden 1950, "Index for rating
                 diagnostic tests", Cancer 3:32–35) over sklearn's `roc_curve` thresholds (every distinct study
                 probability; its leading +inf, which predicts nothing positive, is dropped).
      max_kappa  maximise Cohen's κ = (p_o − p_e) / (1 − p_e) (Cohen 1960) over the distinct study probabilities.
    Ties go to the candidate closest to 0.5 (the lower one if two are equally close), so a flat optimum keeps the
    conventional cut. Degenerate inputs — fewer than 2 studies or only one class — carry no information about a
    cut, so the result is `fixed`.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose one of {THRESHOLD_RULES}")
    if rule == "fixed" or len(pred) == 0:
        return float(fixed)
    studies = study_table(pred)
    y = studies["label"].to_numpy(int) == 1
    p = studies["prob"].to_numpy(float)
    if len(y) < 2 or y.all() or not y.any():
        return float(fixed)
    if rule == "youden":
        fpr, tpr, thresholds = skm.roc_curve(y, p, drop_intermediate=False)  # every distinct p, decreasing
        candidates, score = thresholds[1:], (tpr - fpr)[1:]
    else:
        candidates = np.unique(p)  # (C,) ascending
        hit = p[None, :] >= candidates[:, None]  # (C, n) prediction of every study at every candidate
        n, n_pos, n_neg = len(y), y.sum(), (~y).sum()
        tp, fp = (hit & y).sum(1), (hit & ~y).sum(1)
        tn, fn = n_neg - fp, n_pos - tp
        p_o = (tp + tn) / n
        p_e = ((tp + fp) * n_pos + (tn + fn) * n_neg) / n**2  # < 1 because both classes are present
        score = (p_o - p_e) / (1 - p_e)
    order = np.argsort(candidates, kind="stable")  # ascending, so argmin below prefers the lower of two equals
    candidates, score = candidates[order], score[order]
    best = candidates[np.isclose(score, score.max(), rtol=0.0, atol=1e-12)]
    return float(best[np.argmin(np.abs(best - REFERENCE_THRESHOLD))])


def evaluate(pred: pd.DataFrame, threshold: float = 0.5) -> dict:
    """All metrics of docs/design.md §6 from image-level predictions.

    Returns {"n_images", "n_studies", "threshold", "image": {auroc, brier, ece, auprc},
             "study": {kappa, auroc, ..., brier, ece, auprc}, "per_body_part": {part: {n_studies, kappa, ...}},
             "confusion": [[tn, fp], [fn, tp]]}; brier/ece/auprc are threshold-free (`prob_metrics`).
    """
    studies = study_table(pred)
    image_auroc = (float(skm.roc_auc_score(pred["label"], pred["prob"]))
                   if pred["label"].nunique() == 2 else float("nan"))
    y_pred = (studies["prob"] >= threshold).astype(int)
    confusion = skm.confusion_matrix(studies["label"], y_pred, labels=[0, 1]).tolist()
    per_part = {
        part: {"n_studies": int(len(g)), **binary_metrics(g["label"], g["prob"], threshold)}
        for part, g in studies.groupby("body_part", sort=True)
    }
    return {
        "n_images": int(len(pred)),
        "n_studies": int(len(studies)),
        "threshold": threshold,
        "image": {"auroc": image_auroc, **prob_metrics(pred["label"], pred["prob"])},
        "study": {**binary_metrics(studies["label"], studies["prob"], threshold),
                  **prob_metrics(studies["label"], studies["prob"])},
        "per_body_part": per_part,
        "confusion": confusion,
    }


def monitor_value(result: dict, monitor: str) -> float:
    """Early-stopping scalar from an `evaluate()` result: study_kappa | study_auroc | image_auroc."""
    level, name = monitor.split("_", 1)
    if monitor not in MONITORS:
        raise ValueError(f"unknown monitor {monitor!r}; choose one of {MONITORS}")
    value = result[level][name]
    return -math.inf if value is None or not np.isfinite(value) else float(value)


def fast_binary_metrics(y_true: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """`binary_metrics` for a batch of resamples at once: y_true, prob (B, n) → {metric: (B,)}.

    Same definitions (tests check equality with the sklearn path): κ = (p_o − p_e) / (1 − p_e);
    AUROC = Mann–Whitney U / (n_pos · n_neg) with mid-ranks for ties. NaN where undefined.
    """
    from scipy.stats import rankdata

    y = np.asarray(y_true, dtype=bool)
    prob = np.asarray(prob, dtype=float)
    pred = prob >= threshold
    n = y.shape[1]
    tp = (y & pred).sum(1).astype(float)
    fp = (~y & pred).sum(1).astype(float)
    fn = (y & ~pred).sum(1).astype(float)
    tn = (~y & ~pred).sum(1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_o = (tp + tn) / n
        p_e = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / n**2
        kappa = np.where(p_e < 1, (p_o - p_e) / (1 - p_e), np.nan)
        n_pos, n_neg = tp + fn, tn + fp
        ranks = rankdata(prob, axis=1)  # mid-ranks handle ties like sklearn's AUROC
        u = (ranks * y).sum(1) - n_pos * (n_pos + 1) / 2
        auroc = np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)
        sens = np.where(n_pos > 0, tp / n_pos, np.nan)
        spec = np.where(n_neg > 0, tn / n_neg, np.nan)
        prec = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        f1 = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return {"kappa": kappa, "auroc": auroc, "accuracy": p_o, "sensitivity": sens, "specificity": spec,
            "precision": prec, "f1": f1}


def bootstrap_ci(pred: pd.DataFrame, n_resamples: int = 1000, seed: int = 0, threshold: float = 0.5,
                 level: float = 0.95) -> dict[str, dict[str, float]]:
    """Percentile bootstrap over patients (Efron & Tibshirani 1993; the cluster bootstrap, Davison & Hinkley 1997
    §3.8): resample patients with replacement, keep all studies of each drawn patient, recompute the study-level
    metrics. The patient is the independent unit — a patient's studies share anatomy and reader — so resampling
    studies would understate the spread. Without a patient_id column every study is its own patient.

    Returns {metric: {"value", "low", "high"}} for every study metric. Resamples with one class only give NaN
    for AUROC and are skipped by nanpercentile.
    """
    studies = study_table(pred)
    y = studies["label"].to_numpy(int)
    p = studies["prob"].to_numpy(float)
    patients = studies["patient_id"] if "patient_id" in studies else studies["study_id"]
    codes, uniques = pd.factorize(patients, sort=True)
    members = [np.flatnonzero(codes == i) for i in range(len(uniques))]  # patient → its study rows
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(members), (n_resamples, len(members)))  # (B, n_patients) resampled patients
    draws = np.empty((n_resamples, len(STUDY_METRICS)))
    for b, row in enumerate(drawn):
        idx = np.concatenate([members[i] for i in row])[None]  # (1, n_studies_b): all studies of the drawn patients
        fast = fast_binary_metrics(y[idx], p[idx], threshold)
        draws[b] = [fast[k][0] for k in STUDY_METRICS]
    point = binary_metrics(y, p, threshold)
    alpha = (1 - level) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column → NaN bounds
        low = np.nanpercentile(draws, alpha, axis=0)
        high = np.nanpercentile(draws, 100 - alpha, axis=0)
    return {k: {"value": point[k], "low": float(low[i]), "high": float(high[i])} for i, k in enumerate(STUDY_METRICS)}
