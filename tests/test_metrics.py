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
