"""`python -m kd_fracture.predict --run runs/NAME INPUT…`: score new images with a run's fold models.

INPUT is an image file, a folder (searched recursively) or a MURA-style study folder (`.../studyN_positive/`).
The run directory alone is enough (DESIGN §8): its `config.yaml` gives the architecture, image size and eval
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

import argparse
import dataclasses
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from kd_fracture import cv, engine, io, metrics, scoring
from kd_fracture.config import CVConfig, ModelConfig, from_dict, read_yaml, replace
from kd_fracture.data.imageio import IMAGE_SUFFIXES, read_grayscale
from kd_fracture.data.loaders import SharedCache
from kd_fracture.data.manifest import COLUMNS, FOLDER_CLASSES, Manifest
from kd_fracture.errors import DataError, UserError, cli_main
from kd_fracture.models.student import TIMM_PREFIX
from kd_fracture.run_dir import RunDir

ROLES = ("teacher", "student")
UNKNOWN_LABEL = -1
"""`label` of an input whose truth is not known; keeps it a group key of `metrics.study_table`."""

_STUDY_DIR = re.compile(r"study\d+(?:_(?P<folder_label>positive|negative))?", re.IGNORECASE)
_BODY_PART = re.compile(r"XR_[A-Z]+")


# ----------------------------------------------------------------------------------------------------------------------
# a run's models


@dataclass(frozen=True)
class RunModels:
    """The fold models of one run — its cv teachers or a distilled student — and the config that feeds them.

    `cfg` is the teacher run's config with `model` replaced by the members' architecture, so `cv.load_fold_model`
    and `cv.ensemble_predict` serve both roles: data.img_size and the eval transform always come from the run.
    """

    cfg: CVConfig
    run: RunDir
    """`run.fold(k) / checkpoint_best.safetensors` are the members' weights."""
    members: tuple[int | str, ...]
    role: str
    description: str
    """For people: "teacher resnet50 (fold ensemble of 5)", "student hybrid_s (distill/s1/final/kd, fold 0)"."""
    threshold_source: str = "eval.threshold"
    """Where cfg.eval.threshold comes from, for people (`load_run_models` sets the run's recorded threshold)."""

    def load(self, member: int | str) -> torch.nn.Module:
        try:
            return cv.load_fold_model(self.cfg, self.run, member)
        except RuntimeError as e:  # load_state_dict: architecture and checkpoint disagree
            detail = " ".join(str(e).split())[:200]
            raise engine.CheckpointError(f"{self.run.fold(member) / engine.BEST}: does not fit model "
                                         f"'{self.cfg.model.name}' ({detail})") from None

    def predict(self, rows: pd.DataFrame, manifest: Manifest, device: torch.device,
                cache: SharedCache | None = None) -> pd.DataFrame:
        """`rows` + one prob_fold<k> column per member + `prob` (their mean), in row order."""
        return cv.ensemble_predict(self.cfg, self.run, rows, manifest, device, cache, list(self.members))


def load_run_config(run_path: str | Path) -> tuple[RunDir, CVConfig]:
    run = RunDir(run_path)
    if not run.path.is_dir():
        raise UserError(f"--run {run.path}: folder not found; give the --run-dir of a `python -m kd_fracture.cv` run")
    if not run.config.is_file():
        raise UserError(f"--run {run.path}: not a run directory (no config.yaml); give the --run-dir of a "
                        f"`python -m kd_fracture.cv` run")
    cfg = run.saved_config(CVConfig)
    if cfg.sweep:
        entries = ", ".join(str(run.path / name) for name in cfg.sweep)
        raise UserError(f"--run {run.path}: is a sweep of several runs; pick one of them: {entries}")
    return run, cfg


def load_run_models(run_path: str | Path, model: str = "teacher", fold: int | str | None = None,
                    study: str | None = None, variant: str | None = None) -> RunModels:
    """The run's teachers (`model="teacher"`) or a distilled student, all folds or only `fold`."""
    if model not in ROLES:
        raise UserError(f"--model {model}: choose one of {', '.join(ROLES)}")
    run, cfg = load_run_config(run_path)
    if model == "teacher":
        where, model_cfg, what = run, cfg.model, f"teacher {cfg.model.name}"
    else:
        where, model_cfg, what = student_location(run, study, variant)
    members = [fold] if fold is not None else list(range(cfg.data.folds))
    missing = [k for k in members if not (where.fold(k) / engine.BEST).is_file()]
    if missing:
        have = sorted(p.parent.name for p in where.path.glob(f"*/{engine.BEST}"))
        hint = "finish training them, or pick one with --fold K" if fold is None else "choose another --fold"
        raise UserError(f"{where.path}: no {engine.BEST} for fold(s) {missing} (found: {', '.join(have) or 'none'}); "
                        f"{hint}")
    scope = f"fold {fold}" if fold is not None else f"fold ensemble of {len(members)}"
    threshold, source = scoring.run_threshold(where.path, members, cfg.data.folds), "eval.threshold"
    if threshold is not None:
        cfg = replace(cfg, **{"eval.threshold": threshold})
        one = len(members) == 1 and members[0] != "refit"
        source = f"fold {members[0]}'s threshold" if one else "mean of the fold thresholds"
    return RunModels(cfg=dataclasses.replace(cfg, model=model_cfg), run=where, members=tuple(members), role=model,
                     description=f"{what} ({scope})", threshold_source=source)


def student_location(run: RunDir, study: str | None, variant: str | None) -> tuple[RunDir, ModelConfig, str]:
    """`<run>/distill/<study>/final/<variant>/` as a RunDir, the student's ModelConfig and a description.

    Each variant folder is shaped like a teacher run (kd_fracture.distill): its `config.yaml` is a CVConfig whose
    `model` is the student. Without one, `student:` of the study's `config.yaml` (DistillConfig) is used. The
    default variant is the KD student, `<student>_kd`, or the only variant there is.
    """
    distill = run.path / "distill"
    studies = sorted(p.parent.name for p in distill.glob("*/config.yaml"))
    if not studies:
        raise UserError(f"{distill}: no distilled student yet; run `python -m kd_fracture.distill --teacher-run "
                        f"{run.path}` first, or use --model teacher")
    if study is None:
        if len(studies) > 1:
            raise UserError(f"{distill}: several distillation studies ({', '.join(studies)}); choose one with --study")
        study = studies[0]
    elif study not in studies:
        raise UserError(f"--study {study}: not in {distill} (found: {', '.join(studies)})")
    study_raw = read_yaml(distill / study / "config.yaml")
    final = distill / study / "final"
    variants = sorted(p.name for p in final.iterdir()
                      if p.is_dir() and not p.name.endswith(".old")) if final.is_dir() else []
    if not variants:
        raise UserError(f"{final}: no final students yet; let `python -m kd_fracture.distill --teacher-run {run.path} "
                        f"--study {study}` finish")
    if variant is None:
        student_name = str((study_raw.get("student") or {}).get("name", ""))
        main = f"{student_name.removeprefix(TIMM_PREFIX)}_kd"
        if main not in variants and len(variants) > 1:
            raise UserError(f"{final}: several students ({', '.join(variants)}); choose one with --variant")
        variant = main if main in variants else variants[0]
    elif variant not in variants:
        raise UserError(f"--variant {variant}: not in {final} (found: {', '.join(variants)})")
    variant_config = final / variant / "config.yaml"
    if variant_config.is_file():
        source, raw, prefix = variant_config, read_yaml(variant_config).get("model"), "model."
    else:
        source, raw, prefix = distill / study / "config.yaml", study_raw.get("student"), "student."
    if not isinstance(raw, dict):
        raise UserError(f"{source}: has no '{prefix.rstrip('.')}' section, so the student's architecture is unknown")
    model_cfg = from_dict(ModelConfig, raw, str(source), prefix=prefix)
    return RunDir(final / variant), model_cfg, f"student {model_cfg.name} (distill/{study}/final/{variant})"


def parse_fold(text: str) -> int | str:
    """`--fold 3` → 3; `--fold refit` → "refit" (the model trained on the whole pool)."""
    if text.isdigit():
        return int(text)
    if text == "refit":
        return text
    raise argparse.ArgumentTypeError(f"'{text}' is not a fold number (or 'refit')")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by predict, evaluate and explain."""
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory of `python -m kd_fracture.cv`")
    p.add_argument("--model", choices=ROLES, default="teacher",
                   help="the run's teachers (default) or its distilled student")
    p.add_argument("--fold", type=parse_fold, metavar="K", help="use fold K's model only (default: fold ensemble)")
    p.add_argument("--study", help="distillation study under RUN_DIR/distill/ (needed when there are several)")
    p.add_argument("--variant", help="student under distill/<study>/final/ (default: <student>_kd, the KD student)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the run's train.device)")
    p.add_argument("--batch-size", type=int, default=None, help="inference batch size (default: the run's)")


def models_from_args(args: argparse.Namespace, num_workers: int | None = None) -> tuple[RunModels, torch.device]:
    models = load_run_models(args.run, args.model, args.fold, args.study, args.variant)
    runtime = {"data.num_workers": num_workers} if num_workers is not None else {}
    if args.batch_size is not None:
        runtime["train.eval_batch_size"] = args.batch_size
    if runtime:
        models = dataclasses.replace(models, cfg=replace(models.cfg, **runtime))
    return models, engine.resolve_device(args.device or models.cfg.train.device)


# ----------------------------------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class InputImage:
    path: Path
    """Absolute path."""
    shown: str
    """The path as the user wrote it (a folder input joined with the file's path inside it)."""
    study: str
    """Its MURA study folder (as shown), or "" when the image is not in one."""
    body_part: str
    label: int
    """Truth read from the folder names (studyN_positive → 1, not_fractured/ → 0, …), else UNKNOWN_LABEL."""


def describe_image(path: Path, shown: str) -> InputImage:
    """Study, body part and (if the folder names tell) the true label of an image."""
    parent = path.parent.name
    study_match = _STUDY_DIR.fullmatch(parent)
    label = UNKNOWN_LABEL
    if study_match and study_match["folder_label"]:
        label = int(study_match["folder_label"].lower() == "positive")
    elif (class_name := re.sub(r"[ -]", "_", parent.lower())) in FOLDER_CLASSES:
        label = FOLDER_CLASSES[class_name]
    body = next((part for part in path.parts if _BODY_PART.fullmatch(part)), "unknown")
    study = (os.path.dirname(shown) or str(path.parent)) if study_match else ""
    return InputImage(path=path, shown=shown, study=study, body_part=body, label=label)


def collect_inputs(inputs: list[str]) -> tuple[list[InputImage], list[tuple[str, str]]]:
    """Expand INPUT… (files, folders searched recursively) into images; (images, [(input, problem), …]).

    Non-image files inside a folder are skipped (hidden entries too); a non-image file named explicitly is a problem.
    The same file reached twice is kept once.
    """
    images: dict[Path, InputImage] = {}
    problems: list[tuple[str, str]] = []
    for given in inputs:
        path = Path(os.path.abspath(given))
        if path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [Path(dirpath) / f for f in sorted(filenames)
                          if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
            if not found:
                problems.append((given, f"folder holds no {'/'.join(IMAGE_SUFFIXES)} images"))
            for f in found:
                images.setdefault(f, describe_image(f, os.path.join(given, os.path.relpath(f, path))))
        elif not path.exists():
            problems.append((given, "not found"))
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append((given, f"not an image file (expected {', '.join(IMAGE_SUFFIXES)})"))
        else:
            images.setdefault(path, describe_image(path, given))
    return list(images.values()), problems


def readable(images: list[InputImage]) -> tuple[list[InputImage], list[tuple[str, str]]]:
    """Decode every image once; the corrupt, truncated or unreadable ones become problems."""
    ok, problems = [], []
    for image in images:
        try:
            read_grayscale(image.path)
        except DataError as e:
            problems.append((image.shown, str(e).removeprefix(f"{image.path}: ")))
        else:
            ok.append(image)
    return ok, problems


def as_manifest(images: list[InputImage]) -> Manifest:
    """Manifest rows (COLUMNS) for loose images: absolute image_path under root "/", split "predict".

    study_id = the study folder, or the image itself when it is in none (a study of one image, as in the folder
    layout); patient_id = study_id.
    """
    df = pd.DataFrame({
        "image_path": [str(i.path) for i in images],
        "study_id": [i.study or i.shown for i in images],
        "patient_id": [i.study or i.shown for i in images],
        "body_part": [i.body_part for i in images],
        "label": pd.array([i.label for i in images], dtype="int64"),
        "split": "predict",
    }, columns=list(COLUMNS))
    return Manifest(df=df, root=Path(os.path.abspath(os.sep)), name="predict", source="files")


def report_problems(problems: list[tuple[str, str]], verb: str = "predicted") -> None:
    """One `error: INPUT: problem` line per failed input, then which ones were left out."""
    for given, problem in problems:
        print(f"error: {given}: {problem}", file=sys.stderr)
    if problems:
        print(f"error: {len(problems)} input(s) failed and were not {verb}: {', '.join(g for g, _ in problems)}",
              file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------------------
# predict


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


def show(df: pd.DataFrame) -> str:
    """Console table: probabilities to 3 decimals, unknown truth as '?'."""
    shown = df.copy()
    if "true_label" in shown:
        shown["true_label"] = shown["true_label"].map({0: "normal", 1: "abnormal"}).fillna("?")
    return shown.to_string(index=False, float_format=lambda x: f"{x:.3f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kd_fracture.predict", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder, or MURA study folder")
    p.add_argument("--out", type=Path, metavar="CSV",
                   help="write image predictions here (and study predictions to <stem>_studies.csv)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: 0)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models, device = models_from_args(args, num_workers=args.num_workers)
    images, problems = collect_inputs(args.inputs)
    images, unreadable = readable(images)
    problems += unreadable
    if not images:
        report_problems(problems)
        raise DataError(f"none of the {len(args.inputs)} input(s) holds a readable image; nothing was predicted")
    engine.log(f"{models.description} on {len(images)} image(s), {models.cfg.data.img_size} px, {device}")
    pred = predict_images(models, images, device)
    studies = study_predictions(pred, models.cfg.eval.threshold)
    print(show(pred[["path", "prob", "prediction", "true_label"]]))
    if len(studies):
        print(f"\nstudy level (mean of the study's image probabilities, abnormal if ≥ "
              f"{models.cfg.eval.threshold:.4g}, {models.threshold_source}):")
        print(show(studies))
    if args.out is not None:
        failed = pd.DataFrame({"path": [g for g, _ in problems], "error": [m for _, m in problems]})
        io.write_csv(args.out, pd.concat([known_truth(pred).assign(error=""), failed], ignore_index=True))
        written = [str(args.out)]
        if len(studies):
            written.append(str(io.write_csv(args.out.with_name(f"{args.out.stem}_studies.csv"), known_truth(studies))))
        engine.log(f"wrote {' and '.join(written)}")
    report_problems(problems)
    return 2 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
