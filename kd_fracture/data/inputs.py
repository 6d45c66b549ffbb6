"""User inputs for predict, evaluate and explain: image files, folders and MURA study folders → manifest rows.

A folder is searched recursively; a MURA study folder (`studyN_positive/`) gives the study and the true label, a
folder-layout class folder (`fractured/`, `not_fractured/`) the label; anything else has an unknown label.
`load_labelled_folder` is evaluate's "flat folder" source: any folder of images whose labels the folder names tell.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kd_fracture.data.imageio import IMAGE_SUFFIXES, is_image_file, read_grayscale, strip_image_suffix
from kd_fracture.data.manifest import COLUMNS, FOLDER_CLASSES, Manifest, dataset_name
from kd_fracture.errors import DataError

UNKNOWN_LABEL = -1
"""`label` of an input whose truth is not known; keeps it a group key of `metrics.study_table`."""

_STUDY_DIR = re.compile(r"study\d+(?:_(?P<folder_label>positive|negative))?", re.IGNORECASE)
_BODY_PART = re.compile(r"XR_[A-Z]+")
_PATIENT_DIR = re.compile(r"patient\d+", re.IGNORECASE)


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

    Images are .png/.jpg/.jpeg/.dcm files and extension-less DICOM files (found by their `DICM` marker). Non-image
    files inside a folder are skipped (hidden entries too); a non-image file named explicitly is a problem.
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
                          if not f.startswith(".") and is_image_file(os.path.join(dirpath, f))]
            if not found:
                problems.append((given, f"folder holds no {'/'.join(IMAGE_SUFFIXES)} or DICOM images"))
            for f in found:
                images.setdefault(f, describe_image(f, os.path.join(given, os.path.relpath(f, path))))
        elif not path.exists():
            problems.append((given, "not found"))
        elif not is_image_file(path):
            problems.append((given, f"not an image file (expected {', '.join(IMAGE_SUFFIXES)} or a DICOM file)"))
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


def load_labelled_folder(root: Path, verify_images: bool = False, name: str | None = None) -> Manifest:
    """A folder of images that is neither MURA nor the train/val/test layout, as one labelled "holdout" split.

    Found as `collect_inputs` finds them (recursively; non-image and hidden files skipped). Each image's label comes
    from the nearest folder, from its own up to ROOT itself, named like a class (fractured|positive|abnormal → 1,
    not_fractured|negative|normal → 0) or a MURA study (`studyN_positive|negative`). An image without one is a
    DataError: scores need the truth (predict scores unlabelled images). In a MURA study folder the study is that
    folder and the patient its `patientN` parent (the body part its `XR_*` ancestor); elsewhere each image is its own
    study and patient, as in the folder layout. image_path is relative to ROOT.
    """
    root = Path(os.path.abspath(root))
    images, _ = collect_inputs([str(root)])
    if not images:
        raise DataError(f"{root}: no {', '.join(IMAGE_SUFFIXES)} or DICOM images found; evaluate reads a MURA root, "
                        f"a train/val/test folder layout, or a folder of images under fractured/ and not_fractured/ "
                        f"(or MURA studyN_positive|negative/) folders")
    records, unlabelled = [], []
    for image in images:
        rel = image.path.relative_to(root)
        folders = [root / f for f in rel.parents if str(f) != "."] + [root]  # nearest first, ROOT last
        label, study, patient = UNKNOWN_LABEL, "", ""
        for folder in folders:
            folder_name = folder.name
            study_match = _STUDY_DIR.fullmatch(folder_name)
            if study_match and study_match["folder_label"] and label == UNKNOWN_LABEL:
                label = int(study_match["folder_label"].lower() == "positive")
                study = folder.relative_to(root).as_posix() if folder != root else folder_name
            elif label == UNKNOWN_LABEL and (c := re.sub(r"[ -]", "_", folder_name.lower())) in FOLDER_CLASSES:
                label = FOLDER_CLASSES[c]
            if study and not patient and _PATIENT_DIR.fullmatch(folder_name):
                patient = folder.relative_to(root).as_posix() if folder != root else folder_name
        if label == UNKNOWN_LABEL:
            unlabelled.append(rel.as_posix())
        image_path = rel.as_posix()
        own = strip_image_suffix(image_path)
        records.append((image_path, study or own, patient or study or own, image.body_part, label))
    if unlabelled:
        raise DataError(f"{root}: {len(unlabelled)} of {len(images)} images have no label, e.g. '{unlabelled[0]}'; "
                        f"evaluate needs the truth, so put them under fractured/ and not_fractured/ folders (or MURA "
                        f"studyN_positive|negative/ folders), or score unlabelled images with "
                        f"`python -m kd_fracture.predict`")
    if verify_images:
        for (image_path, *_), image in zip(records, images):
            _, problems = readable([image])
            if problems:
                raise DataError(f"{image_path}: {problems[0][1]}")
    df = pd.DataFrame(records, columns=list(COLUMNS[:-1])).assign(split="holdout")
    df["label"] = df["label"].astype("int64")
    df = df.sort_values("image_path", kind="mergesort").reset_index(drop=True)
    return Manifest(df=df, root=root, name=dataset_name(root, name), source="files")
