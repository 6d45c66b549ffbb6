"""evaluate: a run's models scored on another dataset (folder layout) write the holdout's metrics, tables and plots."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kd_fracture import evaluate, metrics


@pytest.fixture(scope="module")
def folder_dataset(tiny_phantom, tmp_path_factory) -> Path:
    """ROOT/{train,test}/{fractured,not_fractured}/*.png built from phantom images, MURA labels kept."""
    root = tmp_path_factory.mktemp("folder_data") / "fracture_folders"
    for split, mura in (("train", "train"), ("test", "valid")):
        studies = pd.read_csv(tiny_phantom / "MURA-v1.1" / f"{mura}_labeled_studies.csv", header=None)
        for i, (study, label) in enumerate(studies.itertuples(index=False)):
            if i >= 8:
                break
            image = sorted((tiny_phantom / study).glob("*.png"))[0]
            dest = root / split / ("fractured" if label else "not_fractured")
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, dest / f"{i}.png")
    return root


def test_evaluate_folder_layout_writes_holdout_shaped_report(fake_run, folder_dataset, capsys):
    assert evaluate.main(["--run", str(fake_run), "--data", str(folder_dataset)]) == 0
    out = fake_run / "evaluate" / "fracture_folders"  # default: RUN/evaluate/<dataset name>/
    for f in ("predictions.csv", "metrics.json", "classification_report.txt", "classification_report.csv",
              "summary.md", "plots/roc.png", "plots/pr.png", "plots/calibration.png", "plots/confusion.png",
              "plots/sample_predictions.png",
              "plots/gradcam_examples.png",
              *[f"tables/{t}.{ext}" for t in ("metrics", "per_body_part", "members") for ext in ("csv", "md", "tex")]):
        assert (out / f).is_file(), f
    captured = capsys.readouterr()
    assert "all images (CV pool + holdout splits)" in captured.err  # the default scope is said out loud

    pred = pd.read_csv(out / "predictions.csv")
    n_images = len(list(folder_dataset.rglob("*.png")))
    assert len(pred) == n_images and set(pred["split"]) == {"train", "holdout"}
    assert pred["prob"].to_numpy() == pytest.approx(pred[["prob_fold0", "prob_fold1"]].mean(axis=1).to_numpy())
    report = json.loads((out / "metrics.json").read_text())
    ensemble = report["fold_ensemble"]
    recomputed = metrics.evaluate(pred)
    assert ensemble["study"]["kappa"] == pytest.approx(recomputed["study"]["kappa"], nan_ok=True)
    assert ensemble["study"]["auroc"] == pytest.approx(recomputed["study"]["auroc"], nan_ok=True)
    assert ensemble["n_studies"] == n_images  # folder layout: one image per study
    # no fold_<k>/metrics.json in this run: no recorded threshold, so eval.threshold (0.5)
    assert ensemble["threshold"] == 0.5 and report["threshold_source"] == "eval.threshold"
    assert ensemble["study"]["brier"] == pytest.approx(recomputed["study"]["brier"])
    ci = ensemble["ci95"]["auroc"]
    assert ci["low"] <= ci["value"] <= ci["high"]
    assert set(report["members"]) == {"0", "1"}
    members = pd.read_csv(out / "tables" / "members.csv")
    assert members["fold"].astype(str).tolist() == ["0", "1", "mean", "std"]
    fold0 = metrics.evaluate(pred.assign(prob=pred["prob_fold0"]))
    assert members.loc[0, "auroc"] == pytest.approx(fold0["study"]["auroc"])
    report_csv = pd.read_csv(out / "classification_report.csv")
    assert {"normal", "abnormal"} <= set(report_csv["class"])
    assert report_csv.loc[report_csv["class"] == "abnormal", "support"].item() == (pred["label"] == 1).sum()


def test_evaluate_one_split_and_one_fold(fake_run, folder_dataset, tmp_path):
    out = tmp_path / "holdout_only"
    argv = ["--run", str(fake_run), "--data", str(folder_dataset), "--split", "holdout", "--fold", "1",
            "--out", str(out), "--bootstrap", "5"]
    assert evaluate.main(argv) == 0
    pred = pd.read_csv(out / "predictions.csv")
    assert len(pred) == len(list((folder_dataset / "test").rglob("*.png"))) and set(pred["split"]) == {"holdout"}
    assert [c for c in pred.columns if c.startswith("prob_fold")] == ["prob_fold1"]
    assert "fold_1" in json.loads((out / "metrics.json").read_text())


def test_evaluate_errors_are_one_line(fake_run, tmp_path, capsys):
    assert evaluate.main(["--run", str(fake_run), "--data", str(tmp_path / "nowhere")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    assert evaluate.main(["--run", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
