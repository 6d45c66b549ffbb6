"""Metrics equal sklearn on hand-made predictions; study probability is the mean of its images."""
import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from kd_fracture import metrics


@pytest.fixture
def preds() -> pd.DataFrame:
    # 6 studies, 2 body parts; study s3 has 3 images whose mean (0.5) sits exactly on the threshold
    rows = [
        ("s1", "XR_HAND", 1, [0.9, 0.7]),
        ("s2", "XR_HAND", 0, [0.2]),
        ("s3", "XR_HAND", 1, [0.2, 0.5, 0.8]),
        ("s4", "XR_WRIST", 0, [0.6, 0.7]),
        ("s5", "XR_WRIST", 1, [0.1, 0.3]),
        ("s6", "XR_WRIST", 0, [0.05]),
    ]
    out = [{"image_path": f"{s}/image{i}.png", "study_id": s, "patient_id": f"p{s}", "body_part": bp, "label": y,
            "prob": p} for s, bp, y, probs in rows for i, p in enumerate(probs)]
    return pd.DataFrame(out)


def test_study_prob_is_mean_of_images(preds):
    studies = metrics.study_table(preds).set_index("study_id")
    assert studies.loc["s1", "prob"] == pytest.approx(0.8)
    assert studies.loc["s3", "prob"] == pytest.approx(0.5)
    assert studies.loc["s3", "n_images"] == 3
    assert len(studies) == 6


def test_study_metrics_match_sklearn(preds):
    res = metrics.evaluate(preds)
    studies = metrics.study_table(preds)
    y, p = studies["label"], studies["prob"]
    yhat = (p >= 0.5).astype(int)  # s3 (0.5) counts as positive
    assert yhat.tolist() == [1, 0, 1, 1, 0, 0]
    s = res["study"]
    assert s["kappa"] == pytest.approx(skm.cohen_kappa_score(y, yhat))
    assert s["auroc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert s["accuracy"] == pytest.approx(skm.accuracy_score(y, yhat))
    assert s["sensitivity"] == pytest.approx(skm.recall_score(y, yhat))
    assert s["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - yhat))
    assert s["precision"] == pytest.approx(skm.precision_score(y, yhat))
    assert s["f1"] == pytest.approx(skm.f1_score(y, yhat))
    assert res["image"]["auroc"] == pytest.approx(skm.roc_auc_score(preds["label"], preds["prob"]))
    assert res["confusion"] == skm.confusion_matrix(y, yhat).tolist()
    assert res["n_images"] == 11 and res["n_studies"] == 6


def test_per_body_part(preds):
    res = metrics.evaluate(preds)
    wrist = res["per_body_part"]["XR_WRIST"]
    assert wrist["n_studies"] == 3
    # wrist studies: s4 (0, 0.65 → FP), s5 (1, 0.2 → FN), s6 (0, 0.05 → TN)
    assert wrist["accuracy"] == pytest.approx(1 / 3)
    assert wrist["precision"] == 0.0  # tp=0, fp=1: defined and zero
    assert wrist["sensitivity"] == 0.0
    hand = res["per_body_part"]["XR_HAND"]
    assert hand["kappa"] == pytest.approx(1.0) and hand["n_studies"] == 3


def test_degenerate_inputs_are_nan_not_zero():
    m = metrics.binary_metrics([1, 1, 1], [0.9, 0.8, 0.2])
    assert math.isnan(m["auroc"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == pytest.approx(2 / 3)


def test_monitor_value(preds):
    res = metrics.evaluate(preds)
    assert metrics.monitor_value(res, "study_kappa") == res["study"]["kappa"]
    assert metrics.monitor_value(res, "image_auroc") == res["image"]["auroc"]
    with pytest.raises(ValueError):
        metrics.monitor_value(res, "study_loss")


def test_bootstrap_ci_brackets_point_and_is_seeded(preds):
    big = pd.concat([preds.assign(study_id=preds["study_id"] + f"_{r}") for r in range(10)], ignore_index=True)
    a = metrics.bootstrap_ci(big, n_resamples=200, seed=3)
    b = metrics.bootstrap_ci(big, n_resamples=200, seed=3)
    c = metrics.bootstrap_ci(big, n_resamples=200, seed=4)
    assert a == b and a != c
    for m, v in a.items():
        if np.isfinite(v["value"]):
            assert v["low"] <= v["value"] + 1e-9 and v["value"] <= v["high"] + 1e-9, m


def test_fast_batch_metrics_equal_sklearn_path():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (50, 40))
    y[0] = 1  # one class only: AUROC, specificity undefined
    p = np.round(rng.random((50, 40)), 1)  # rounding creates ties
    fast = metrics.fast_binary_metrics(y, p)
    for b in range(50):
        ref = metrics.binary_metrics(y[b], p[b])
        for k, v in ref.items():
            assert (math.isnan(v) and math.isnan(fast[k][b])) or fast[k][b] == pytest.approx(v), (b, k)


# ----------------------------------------------------------------------------------------------------------------------
# decision threshold (issue #12)


def one_image_studies(y, p) -> pd.DataFrame:
    return pd.DataFrame({"study_id": [f"s{i}" for i in range(len(y))], "body_part": "XR_HAND", "label": y, "prob": p})


def test_youden_picks_the_best_cut():
    # J = TPR − FPR: t=0.35 → 1 − 1/4 = 0.75 (unique maximum); t=0.5 (the default) → 0.5 − 1/4 = 0.25
    pred = one_image_studies([0, 0, 0, 1, 1, 0, 1, 1], [0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.8, 0.9])
    assert metrics.choose_threshold(pred, "youden") == pytest.approx(0.35)
    assert metrics.choose_threshold(pred, "fixed", fixed=0.42) == pytest.approx(0.42)


def test_max_kappa_picks_the_kappa_maximising_cut():
    # 2 positives among 8: t=0.5 has J = 1 − 2/6 = 0.667 (Youden's choice) but κ = (0.75 − 0.5)/0.5 = 0.5;
    # t=0.85 has κ = (0.875 − 0.6875)/0.3125 = 0.6, the maximum
    y, p = [0, 0, 0, 0, 1, 0, 0, 1], [0.05, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.85]
    pred = one_image_studies(y, p)
    assert metrics.choose_threshold(pred, "youden") == pytest.approx(0.5)
    assert metrics.choose_threshold(pred, "max_kappa") == pytest.approx(0.85)
    kappas = {t: skm.cohen_kappa_score(y, (np.array(p) >= t).astype(int)) for t in p}
    assert max(kappas, key=kappas.get) == pytest.approx(0.85) and kappas[0.85] == pytest.approx(0.6)


def test_threshold_is_chosen_on_study_means_and_ties_go_to_the_cut_nearest_half(preds):
    # study probs 0.8 (1), 0.2 (0), 0.5 (1), 0.65 (0), 0.2 (1), 0.05 (0): J = 1/3 at 0.8, 0.5 and 0.2 → 0.5.
    # On the 11 image probabilities the candidates would differ (e.g. 0.9, 0.7).
    assert metrics.choose_threshold(preds, "youden") == pytest.approx(0.5)
    shifted = preds.assign(prob=preds["prob"] * 0.9)  # 0.72, 0.18, 0.45, 0.585, 0.18, 0.045: 0.45 is nearest 0.5
    assert metrics.choose_threshold(shifted, "youden") == pytest.approx(0.45)


def test_degenerate_inputs_fall_back_to_fixed():
    one_class = one_image_studies([1, 1, 1], [0.2, 0.7, 0.9])
    one_study = one_image_studies([1], [0.9])
    for rule in ("youden", "max_kappa"):
        assert metrics.choose_threshold(one_class, rule, fixed=0.4) == 0.4
        assert metrics.choose_threshold(one_study, rule, fixed=0.4) == 0.4
        assert metrics.choose_threshold(one_class.iloc[:0], rule) == 0.5
    with pytest.raises(ValueError, match="unknown threshold rule"):
        metrics.choose_threshold(one_class, "f1")


# ----------------------------------------------------------------------------------------------------------------------
# calibration and precision–recall


def test_ece_by_hand():
    # bins: [0, .1) {.05: y0} → .05; [.1, .2) {.15: y1} → .85; [.5, .6) {.55: y1, .58: y0} → |0.5 − 0.565| × 2;
    # [.9, 1] {.95: y1} → .05 ⇒ ECE = (0.05 + 0.85 + 0.13 + 0.05) / 5 = 0.216
    assert metrics.expected_calibration_error([0, 1, 1, 0, 1], [0.05, 0.15, 0.55, 0.58, 0.95]) == pytest.approx(0.216)
    bins = metrics.reliability_bins([0, 1, 1, 0, 1], [0.3, 0.7, 1.0, 0.0, 0.99])
    assert bins["n"].tolist() == [1, 0, 0, 1, 0, 0, 0, 1, 0, 2]  # 0.3 → bin 3, 0.7 → bin 7, 1.0 → last bin


def test_ece_is_zero_when_perfectly_calibrated():
    y = [0, 0, 0, 1] + [0, 1] + [0, 1, 1, 1]
    p = [0.25] * 4 + [0.5] * 2 + [0.75] * 4  # each bin's positive rate equals its mean probability
    assert metrics.expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)
    assert metrics.expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    assert metrics.expected_calibration_error([0, 1], [1.0, 0.0]) == 1.0


def test_brier_and_auprc_equal_sklearn_at_both_levels(preds):
    res = metrics.evaluate(preds)
    studies = metrics.study_table(preds)
    assert res["study"]["brier"] == pytest.approx(skm.brier_score_loss(studies["label"], studies["prob"]))
    assert res["study"]["auprc"] == pytest.approx(skm.average_precision_score(studies["label"], studies["prob"]))
    assert res["study"]["ece"] == pytest.approx(metrics.expected_calibration_error(studies["label"], studies["prob"]))
    assert res["image"]["brier"] == pytest.approx(skm.brier_score_loss(preds["label"], preds["prob"]))
    assert res["image"]["auprc"] == pytest.approx(skm.average_precision_score(preds["label"], preds["prob"]))
    assert res["image"]["ece"] == pytest.approx(metrics.expected_calibration_error(preds["label"], preds["prob"]))
    none_positive = metrics.prob_metrics([0, 0], [0.2, 0.4])
    assert math.isnan(none_positive["auprc"]) and none_positive["brier"] == pytest.approx(0.1)
    assert all(math.isnan(v) for v in metrics.prob_metrics([], []).values())


def test_bootstrap_resamples_patients_not_studies():
    """The patient is the independent unit (issue #13): when a patient's studies share their label and their
    model score, resampling studies treats five copies of one patient as five patients and understates the CI."""
    rng = np.random.default_rng(1)
    rows = []
    for pt in range(40):
        label, offset = int(rng.random() < 0.4), rng.normal(0, 0.2)
        for s in range(5):
            rows.append({"patient_id": f"p{pt}", "study_id": f"p{pt}/s{s}", "body_part": "XR_WRIST",
                         "label": label, "prob": float(np.clip(0.35 + 0.3 * label + offset, 0, 1))})
    pred = pd.DataFrame(rows)
    by_patient = metrics.bootstrap_ci(pred, 500, 0)["kappa"]
    by_study = metrics.bootstrap_ci(pred.drop(columns="patient_id"), 500, 0)["kappa"]  # each study its own patient
    assert by_patient["value"] == by_study["value"]
    assert (by_patient["high"] - by_patient["low"]) > 1.6 * (by_study["high"] - by_study["low"])
