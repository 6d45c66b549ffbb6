"""`python -m kd_fracture.predict --run RUN INPUT…`: score new images with a run's fold models.

INPUT is an image file, a folder (searched recursively) or a MURA-style study folder (`.../studyN_positive/`).
The run directory alone is enough (docs/design.md §4): its `config.yaml` gives the architecture, image size and eval
transform, its `fold_<k>/checkpoint_best.safetensors` the weights; the training data need not be present.

    python -m kd_fracture.predict --run runs/teacher_resnet50 xray.png MURA-v1.1/valid/XR_WRIST/patient11185/
    python -m kd_fracture.predict --run runs/teacher_resnet50 --model student --fold 0 scans/ --out preds.csv

Image probability = mean of the fold models' probabilities (the same fold-ensemble as `holdout/predictions.csv`);
study probability = mean of its images' probabilities, prediction = prob ≥ the run's threshold: the one fold k chose
on its inner-validation split (`--fold k`), or the mean of the folds' (the ensemble, as on the holdout), read from
fold_<k>/metrics.json; eval.threshold (0.5) when the run has none recorded (e.g. a copy with checkpoints only).
A missing, non-image or corrupt input is reported and skipped; the others are still predicted, and the exit code
is 2 if any input failed.
"""
from __future__ import annotations

import pandas as pd
import torch

from kd_fracture import metrics
from kd_fracture.data.inputs import UNKNOWN_LABEL, InputImage, as_manifest
from kd_fracture.data.loaders import SharedCache
from kd_fracture.runs.models import RunModels


def predict_images(models: RunModels, images: list[InputImage], device: torch.device) -> pd.DataFrame:
    """One row per image: path, study, body_part, true_label, prob, prediction, prob_fold<k>…"""
    manifest = as_manifest(images)
    pred = models.predict(manifest.df, manifest, device, SharedCache(manifest.root, models.cfg.data.img_size))
    threshold = models.cfg.eval.threshold
    members = [c for c in pred.columns if c.startswith("prob_fold")]
    return pd.DataFrame({
        "path": [i.shown for i in images], "study": [i.study for i in images],
        "body_part": pred["body_part"], "true_label": pred["label"], "prob": pred["prob"],
        "prediction": label_names(pred["prob"] >= threshold), **{c: pred[c] for c in members},
    })


def study_predictions(pred: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Study rows for the images that are in a study folder: mean image probability (`metrics.study_table`)."""
    in_study = pred[pred["study"] != ""]
    if in_study.empty:
        return pd.DataFrame(columns=["study", "body_part", "n_images", "true_label", "prob", "prediction"])
    studies = metrics.study_table(in_study.rename(columns={"study": "study_id", "true_label": "label"}))
    return pd.DataFrame({"study": studies["study_id"], "body_part": studies["body_part"],
                         "n_images": studies["n_images"], "true_label": studies["label"], "prob": studies["prob"],
                         "prediction": label_names(studies["prob"] >= threshold)})


def label_names(abnormal: pd.Series) -> list[str]:
    return ["abnormal" if a else "normal" for a in abnormal]


def known_truth(df: pd.DataFrame) -> pd.DataFrame:
    """For files: true_label 0/1, or empty where the folder names do not tell."""
    return df.assign(true_label=df["true_label"].where(df["true_label"] != UNKNOWN_LABEL).astype("Int64"))
