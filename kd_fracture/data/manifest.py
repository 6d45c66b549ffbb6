"""Canonical image manifest (docs/design.md §2) from MURA v1.1 CSVs or a folder layout (the EDA command is kd_fracture.cli.manifest).

One row per image: `image_path` (relative to the data root), `study_id`, `patient_id`, `body_part`, `label` (0/1),
`split` (`train` = CV pool, `holdout`). Every later stage (folds, datasets, reports) reads this table and nothing else,
so all checks on the raw data happen here, once, and fail with a one-line `DataError`:
`<file> line <n>: <what is wrong>; <what to do>`.

MURA v1.1 (Rajpurkar et al. 2017, "MURA: Large Dataset for Abnormality Detection in Musculoskeletal Radiographs"):
`ROOT/MURA-v1.1/{train,valid}_image_paths.csv` (one column) and `{train,valid}_labeled_studies.csv`
(study folder, label), header-less, paths relative to ROOT. `train` becomes the CV pool, `valid` the holdout.

    python -m kd_fracture.data.manifest --data ROOT [--verify-images] [--name NAME] [--out DIR]
"""
from __future__ import annotations

import csv
import os
import posixpath
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from kd_fracture.data.imageio import IMAGE_SUFFIXES, is_image_file, read_grayscale, strip_image_suffix
from kd_fracture.errors import DataError, UserError
from kd_fracture.io import atomic_path, sha256_bytes

COLUMNS = ("image_path", "study_id", "patient_id", "body_part", "label", "split")
SPLITS = ("train", "holdout")

MURA_DIR = "MURA-v1.1"
MURA_SPLITS = {"train": "train", "valid": "holdout"}  # MURA folder/CSV prefix -> manifest split
BODY_PARTS = ("XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST")

# MURA-v1.1/<split>/XR_<PART>/patient<N>/study<N>_<positive|negative>[/<image>]
_MURA_STUDY = (
    r"MURA-v1\.1/(?P<dir_split>[^/]+)/(?P<body_part>[^/]+)/(?P<patient_id>patient\d+)"
    r"/(?P<study_dir>study\d+_(?P<folder_label>positive|negative))"
)
_MURA_STUDY_RE = re.compile(_MURA_STUDY)
_MURA_IMAGE_RE = re.compile(_MURA_STUDY + r"/[^/]+\.(?i:png|jpe?g|dcm)")
_MURA_IMAGE_SHAPE = f"{MURA_DIR}/<split>/XR_<PART>/patient<N>/study<N>_<positive|negative>/<image>.<png|jpg|dcm>"
_MURA_STUDY_SHAPE = f"{MURA_DIR}/<split>/XR_<PART>/patient<N>/study<N>_<positive|negative>/"

FOLDER_SPLITS = {"train": "train", "val": "train", "test": "holdout"}
# class folder name (lower-case, spaces/hyphens as '_') -> label
FOLDER_CLASSES = {
    "fractured": 1, "positive": 1, "abnormal": 1,
    "not_fractured": 0, "notfractured": 0, "negative": 0, "normal": 0,
}
FOLDER_LAYOUT = "ROOT/{train,val,test}/{fractured,not_fractured}/*.{png,jpg,jpeg,tif,tiff,dcm}"

_HEADER_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_ ]*")  # `path`, `image_path`, `Label`: words, no '/' or '.'


@dataclass(frozen=True, eq=False)
class Manifest:
    """A validated manifest: `df` has COLUMNS, one row per image, sorted by image_path, RangeIndex."""

    df: pd.DataFrame
    root: Path
    """Data root; every `image_path` is relative to it."""
    name: str
    """Dataset name used for `data_manifests/<name>/`."""
    source: str
    """"mura" or "folder"."""

    def __post_init__(self) -> None:
        if tuple(self.df.columns) != COLUMNS:
            raise ValueError(f"manifest columns {list(self.df.columns)} != {list(COLUMNS)}")

    def sha256(self) -> str:
        return manifest_sha256(self.df)

    def path(self, image_path: str) -> Path:
        """Absolute path of a row's image."""
        return self.root / image_path

    def split(self, split: str) -> pd.DataFrame:
        """Rows of one split ("train" = CV pool, "holdout"), re-indexed from 0."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.df[self.df["split"] == split].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------- entry points


def load_manifest(data: str | Path, verify_images: bool = False, name: str | None = None) -> Manifest:
    """Load and validate a MURA v1.1 tree or a folder layout (see `detect_source`)."""
    source, root = detect_source(Path(data))
    loader = load_mura if source == "mura" else load_folder
    return loader(root, verify_images=verify_images, name=name)


def detect_source(data: Path, flat: bool = False) -> tuple[str, Path]:
    """("mura", ROOT) if `data` is ROOT or ROOT/MURA-v1.1 with the MURA CSVs; ("folder", ROOT) if `data` has
    train/, val/ or test/ sub-folders; otherwise ("files", ROOT) when `flat` (any folder of images, for evaluate),
    else DataError. ROOT is absolute (symlinks kept)."""
    data = Path(os.path.abspath(data))
    if not data.is_dir():
        raise DataError(f"{data}: data folder not found; pass --data the folder holding {MURA_DIR}/ or train/val/test/")
    if (data / MURA_DIR / "train_image_paths.csv").is_file():
        return "mura", data
    if (data / "train_image_paths.csv").is_file():
        if data.name != MURA_DIR:
            raise DataError(
                f"{data}: holds MURA CSVs but is named '{data.name}'; MURA paths start with '{MURA_DIR}/', "
                f"so rename the folder to {MURA_DIR} (or pass --data its parent)"
            )
        return "mura", data.parent
    if any(p.is_dir() and p.name.lower() in FOLDER_SPLITS for p in data.iterdir()):
        return "folder", data
    if flat:
        return "files", data
    raise DataError(
        f"{data}: neither a MURA v1.1 root (no {MURA_DIR}/train_image_paths.csv) nor a folder layout "
        f"(no train/, val/ or test/ folder); expected ROOT/{MURA_DIR}/ with its four CSVs, or {FOLDER_LAYOUT}"
    )


def manifest_sha256(df: pd.DataFrame) -> str:
    """sha256 of the canonical CSV (COLUMNS, sorted by image_path, '\\n' line ends). Content only, not image bytes,
    so it is independent of row order, index and column dtypes."""
    canon = df.loc[:, list(COLUMNS)].astype({c: str for c in COLUMNS if c != "label"}).astype({"label": "int64"})
    canon = canon.sort_values("image_path", kind="mergesort")
    return sha256_bytes(canon.to_csv(index=False, lineterminator="\n").encode("utf-8"))


def summarize(m: Manifest) -> pd.DataFrame:
    """Counts per split x body part plus totals (body_part "all" per split, then split "all").

    Columns: split, body_part, images, studies, patients, positive_studies, negative_studies,
    positive_rate = positive_studies / studies (MURA labels studies, so balance is counted in studies).
    """
    df = m.df
    groups: list[tuple[str, str, pd.DataFrame]] = []
    for split in [s for s in SPLITS if (df["split"] == s).any()]:
        in_split = df[df["split"] == split]
        groups += [(split, body_part, g) for body_part, g in in_split.groupby("body_part", sort=True)]
        groups.append((split, "all", in_split))
    groups.append(("all", "all", df))
    rows = []
    for split, body_part, g in groups:
        study_labels = g.drop_duplicates("study_id")["label"]  # one label per study
        rows.append({
            "split": split, "body_part": body_part, "images": len(g), "studies": len(study_labels),
            "patients": g["patient_id"].nunique(), "positive_studies": int(study_labels.sum()),
            "negative_studies": int((study_labels == 0).sum()), "positive_rate": float(study_labels.mean()),
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------- MURA v1.1


def load_mura(root: Path, verify_images: bool = False, name: str | None = None) -> Manifest:
    """Load MURA v1.1 from ROOT (or ROOT/MURA-v1.1): train -> "train" (CV pool), valid -> "holdout".

    study_id = study folder path (no trailing slash), patient_id = `patient<N>`, body_part = `XR_<PART>`,
    label from `<split>_labeled_studies.csv` (1 = abnormal).
    """
    root = Path(os.path.abspath(root))
    if root.name == MURA_DIR and (root / "train_image_paths.csv").is_file():
        root = root.parent
    parts = [_load_mura_split(root, csv_split) for csv_split in MURA_SPLITS]
    _check_patients_disjoint(*parts)
    df = pd.concat(parts, ignore_index=True)
    _check_files_exist(root, df, lambda i: f"{df.at[i, '_file']} line {df.at[i, '_line']}")
    if verify_images:
        _verify_images(root, df, lambda i: f"{df.at[i, '_file']} line {df.at[i, '_line']}")
    return _finish(df, root, name, "mura")


def _load_mura_split(root: Path, csv_split: str) -> pd.DataFrame:
    """Validated image rows of one MURA split with COLUMNS plus `_file`, `_line` (for later messages)."""
    images_file = f"{MURA_DIR}/{csv_split}_image_paths.csv"
    studies_file = f"{MURA_DIR}/{csv_split}_labeled_studies.csv"
    images = _read_headerless_csv(root / images_file, images_file, ("image_path",))
    studies = _read_headerless_csv(root / studies_file, studies_file, ("study_id", "label"))
    for frame, file, what in ((images, images_file, "image paths"), (studies, studies_file, "studies")):
        if frame.empty:
            raise DataError(f"{file}: lists no {what}, so the {MURA_SPLITS[csv_split]} split would be empty; "
                            f"restore the file from the MURA v1.1 download")

    images["image_path"] = _normalise_paths(images, "image_path", images_file)
    images = _check_mura_shape(images, "image_path", _MURA_IMAGE_RE, _MURA_IMAGE_SHAPE, csv_split, images_file)
    _first_bad(images, images["image_path"].duplicated(keep=False), images_file,
               lambda r: f"image '{r['image_path']}' is listed twice (lines "
                         f"{_lines_of(images, 'image_path', r['image_path'])}); delete the duplicate line")

    studies["study_id"] = _normalise_paths(studies, "study_id", studies_file)
    studies = _check_mura_shape(studies, "study_id", _MURA_STUDY_RE, _MURA_STUDY_SHAPE, csv_split, studies_file)
    _first_bad(studies, ~studies["label"].isin(["0", "1"]), studies_file,
               lambda r: (f"label '{r['label']}' is not 0 or 1" if r["label"] else "label is empty")
               + "; MURA labels are 0 (normal) or 1 (abnormal)")
    studies["label"] = studies["label"].astype("int64")
    _check_study_duplicates(studies, studies_file)
    _first_bad(studies, (studies["folder_label"].str.lower() == "positive") != (studies["label"] == 1), studies_file,
               lambda r: f"study folder '{r['study_dir']}' disagrees with its label {r['label']}; "
                         f"fix the label or the folder name")

    images["study_id"] = images["image_path"].str.rpartition("/")[0]
    _first_bad(images, ~images["study_id"].isin(studies["study_id"]), images_file,
               lambda r: f"image '{r['image_path']}' belongs to study '{r['study_id']}', which is not in "
                         f"{studies_file}; add the study with its label or delete the image line")
    _first_bad(studies, ~studies["study_id"].isin(images["study_id"]), studies_file,
               lambda r: f"study '{r['study_id']}' has no images in {images_file}; "
                         f"list its images or delete the study line")

    df = images[["image_path", "study_id", "patient_id", "body_part", "_line"]].merge(
        studies[["study_id", "label"]], on="study_id", how="left", validate="many_to_one")
    df["split"] = MURA_SPLITS[csv_split]
    df["_file"] = images_file
    return df[[*COLUMNS, "_file", "_line"]]


def _check_mura_shape(df: pd.DataFrame, col: str, pattern: re.Pattern, shape: str, csv_split: str,
                      file: str) -> pd.DataFrame:
    """Split `col` into MURA path parts (regex groups become columns); error on the first off-shape path."""
    parts = df[col].str.extract(f"^{pattern.pattern}$")
    _first_bad(df, parts["patient_id"].isna(), file,
               lambda r: f"path '{r[col]}' is not of the form {shape}; use MURA v1.1 paths relative to the data root")
    df = pd.concat([df, parts], axis=1)
    _first_bad(df, df["dir_split"] != csv_split, file,
               lambda r: f"path '{r[col]}' is under '{r['dir_split']}/' but this file lists the {csv_split} split; "
                         f"move the line to {MURA_DIR}/{r['dir_split']}_*.csv or fix the path")
    _first_bad(df, ~df["body_part"].isin(BODY_PARTS), file,
               lambda r: f"unknown body part '{r['body_part']}'; expected one of {', '.join(BODY_PARTS)}")
    return df


def _check_study_duplicates(studies: pd.DataFrame, file: str) -> None:
    """A study listed twice is an error; with two different labels it is a study with mixed labels."""
    dup = studies["study_id"].duplicated(keep="first")
    if not dup.any():
        return
    r = studies[dup].iloc[0]
    first = studies[studies["study_id"] == r["study_id"]].iloc[0]
    if first["label"] != r["label"]:
        raise DataError(f"{file} line {r['_line']}: study '{r['study_id']}' has mixed labels ({first['label']} on line "
                        f"{first['_line']}, {r['label']} here); keep one line with the correct label")
    raise DataError(f"{file} line {r['_line']}: study '{r['study_id']}' is listed twice (also line {first['_line']}); "
                    f"delete the duplicate line")


def _check_patients_disjoint(pool: pd.DataFrame, holdout: pd.DataFrame) -> None:
    """MURA's valid patients are disjoint from train; overlap would leak the holdout into the CV pool."""
    shared = holdout["patient_id"].isin(pool["patient_id"])
    if not shared.any():
        return
    h = holdout[shared].iloc[0]
    p = pool[pool["patient_id"] == h["patient_id"]].iloc[0]
    raise DataError(f"{h['_file']} line {h['_line']}: patient '{h['patient_id']}' is in the holdout and also in the "
                    f"CV pool ({p['_file']} line {p['_line']}); a patient must be in one split only - remove one")


def _read_headerless_csv(path: Path, file: str, columns: Sequence[str]) -> pd.DataFrame:
    """Rows of a header-less CSV as strings (fields stripped) plus `_line`, 1-based as in the file.

    Tolerates a UTF-8 BOM, '\\r\\n' or '\\r' line ends and blank lines (a trailing newline included).
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{file}: file not found; MURA v1.1 needs {{train,valid}}_image_paths.csv and "
                        f"{{train,valid}}_labeled_studies.csv in {MURA_DIR}/ - re-extract the download") from None
    except OSError as e:
        raise DataError(f"{file}: cannot read ({e.strerror}); it must be a readable CSV file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not a UTF-8 text CSV (bad byte at offset {e.start}); restore the original file") \
            from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    reader = csv.reader(lines)
    rows, line_nos = [], []
    try:
        for row in reader:
            row = [field.strip() for field in row]
            if not any(row):
                continue  # blank line
            if not rows and all(_HEADER_FIELD_RE.fullmatch(f) for f in row):
                raise DataError(f"{file} line {reader.line_num}: looks like a header row ({','.join(row)}); "
                                f"the file must be header-less MURA format - delete this line")
            if len(row) != len(columns):
                raise DataError(f"{file} line {reader.line_num}: {len(row)} column{'s' * (len(row) != 1)}, "
                                f"expected {len(columns)} "
                                f"({', '.join(columns)}); fix the line to header-less MURA format")
            rows.append(row)
            line_nos.append(reader.line_num)
    except csv.Error as e:
        raise DataError(f"{file} line {reader.line_num}: cannot parse CSV ({e}); fix the line") from None
    df = pd.DataFrame(rows, columns=list(columns), dtype=str)
    df["_line"] = np.asarray(line_nos, dtype=np.int64)
    return df


def _normalise_paths(df: pd.DataFrame, col: str, file: str) -> pd.Series:
    """Relative, normalised POSIX paths (no trailing slash); error on an empty, absolute or root-escaping path.

    Escape is decided after normalisation, so `a/../b` is fine and `a/../../b` is not (no substring test).
    """
    raw = df[col].str.replace("\\", "/", regex=False)
    _first_bad(df, raw == "", file, lambda r: "path is empty; give a path relative to the data root")
    absolute = raw.str.startswith("/") | raw.str.match(r"[A-Za-z]:")
    _first_bad(df, absolute, file,
               lambda r: f"path '{r[col]}' is absolute; paths must be relative to the data root "
                         f"(the folder holding {MURA_DIR}/)")
    norm = raw.map(posixpath.normpath)
    _first_bad(df, (norm == "..") | norm.str.startswith("../"), file,
               lambda r: f"path '{r[col]}' leaves the data root; paths must stay inside the folder holding "
                         f"{MURA_DIR}/")
    return norm


# ---------------------------------------------------------------------------------------------------- folder layout


def load_folder(root: Path, verify_images: bool = False, name: str | None = None,
                need_splits: Sequence[str] = SPLITS) -> Manifest:
    """Load ROOT/{train,val,test}/<class>/**/*.{png,jpg,jpeg,tif,tiff,dcm} (and extension-less DICOM files):
    train+val -> "train" (CV pool), test -> "holdout". Each split in `need_splits` must have images (cv needs both;
    evaluate, which only scores, passes none, so a folder with only test/ is fine).

    Class folders (case-insensitive, ' ' or '-' read as '_'): fractured|positive|abnormal -> 1,
    not_fractured|negative|normal -> 0. No patient ids exist, so each image is its own study and patient
    (study_id = patient_id = image_path without its image suffix) and folds are image-level; body_part = "unknown".
    """
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; expected {FOLDER_LAYOUT}")
    records, skipped = [], []
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in FOLDER_SPLITS):
        split = FOLDER_SPLITS[split_dir.name.lower()]
        for entry in sorted(split_dir.iterdir()):
            rel = entry.relative_to(root).as_posix()
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                raise DataError(f"{rel}: file directly in a split folder has no class; move it into a class folder "
                                f"({FOLDER_LAYOUT})")
            label = FOLDER_CLASSES.get(re.sub(r"[ -]", "_", entry.name.lower()))
            if label is None:
                raise DataError(f"{rel}/: unknown class folder '{entry.name}'; use fractured|not_fractured, "
                                f"positive|negative or abnormal|normal")
            for image_path in _walk_files(root, entry, skipped):
                records.append((image_path, label, split))

    if not records:
        raise DataError(f"{root}: no images found; expected {FOLDER_LAYOUT}")
    df = pd.DataFrame(records, columns=["image_path", "label", "split"])
    for split, dirs in (("train", "train/ or val/"), ("holdout", "test/")):
        if split in need_splits and not (df["split"] == split).any():
            raise DataError(f"{root}: no {split} images (the {split} split comes from {dirs}); "
                            f"expected {FOLDER_LAYOUT}")
    if skipped:
        warnings.warn(f"{root}: ignored {len(skipped)} non-image file(s), e.g. '{skipped[0]}' "
                      f"(images are {', '.join(IMAGE_SUFFIXES)} or extension-less DICOM)", UserWarning, stacklevel=3)
    warnings.warn(f"{root}: folder layout has no patient ids; each image is its own study and patient, so folds "
                  f"are image-level and images of one patient may land in different folds", UserWarning, stacklevel=3)

    df["study_id"] = df["image_path"].map(strip_image_suffix)
    df["patient_id"] = df["study_id"]
    df["body_part"] = "unknown"
    df["label"] = df["label"].astype("int64")
    if verify_images:
        _verify_images(root, df, lambda i: df.at[i, "image_path"])
    return _finish(df, root, name, "folder")


def _walk_files(root: Path, class_dir: Path, skipped: list[str]) -> list[str]:
    """Image paths (relative to root, POSIX) under class_dir, recursively; hidden entries are ignored. A file without
    an image suffix is an image if it is a DICOM file (`is_image_file` reads its first 132 bytes)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for f in filenames:
            if f.startswith("."):
                continue
            (found if is_image_file(os.path.join(dirpath, f)) else skipped).append(f"{rel_dir}/{f}")
    return found


# ---------------------------------------------------------------------------------------------------- shared checks


def _first_bad(df: pd.DataFrame, bad: pd.Series | np.ndarray, file: str, describe: Callable[[pd.Series], str]) -> None:
    """Raise `<file> line <n>: <describe(row)>` for the first row flagged in `bad` (rows are in file order)."""
    bad = np.asarray(bad, dtype=bool)
    if bad.any():
        row = df.iloc[int(bad.argmax())]
        raise DataError(f"{file} line {row['_line']}: {describe(row)}")


def _lines_of(df: pd.DataFrame, col: str, value: str) -> str:
    return " and ".join(str(n) for n in df.loc[df[col] == value, "_line"])


def _check_files_exist(root: Path, df: pd.DataFrame, where: Callable[[int], str]) -> None:
    """One scandir per image folder (≈14.7k study folders for MURA) instead of a stat per image, in threads because
    a cold directory cache (or network storage) makes this I/O-bound; listed names must be regular files."""
    split_path = df["image_path"].str.rpartition("/")
    dirs, names = split_path[0], split_path[2]
    unique_dirs = dirs.unique()
    with ThreadPoolExecutor(max_workers=16) as pool:
        listing = dict(zip(unique_dirs, pool.map(lambda d: _files_in(os.path.join(root, d)), unique_dirs)))
    missing = np.fromiter((n not in listing[d] for d, n in zip(dirs, names)), dtype=bool, count=len(df))
    if missing.any():
        i = int(missing.argmax())
        raise DataError(f"{where(i)}: image '{df.at[i, 'image_path']}' not found under {root} "
                        f"({int(missing.sum())} of {len(df)} listed images are missing); "
                        f"check that --data is the dataset root, or restore the files")


def _files_in(folder: str) -> set[str]:
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it if e.is_file()}
    except OSError:  # missing folder: all its images are missing
        return set()


def _verify_images(root: Path, df: pd.DataFrame, where: Callable[[int], str]) -> None:
    """Decode every image (threads: OpenCV releases the GIL); raise for the first bad one in manifest order."""
    def check(image_path: str) -> str | None:
        try:
            read_grayscale(root / image_path)
        except DataError as e:
            prefix = f"{root / image_path}: "
            return str(e).removeprefix(prefix)
        return None

    workers = min(8, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, problem in enumerate(pool.map(check, df["image_path"])):
            if problem is not None:
                pool.shutdown(wait=False, cancel_futures=True)
                where_i = where(i)
                what = "" if where_i == df.at[i, "image_path"] else f"image '{df.at[i, 'image_path']}': "
                raise DataError(f"{where_i}: {what}{problem}")


def _finish(df: pd.DataFrame, root: Path, name: str | None, source: str) -> Manifest:
    df = df.loc[:, list(COLUMNS)].sort_values("image_path", kind="mergesort").reset_index(drop=True)
    return Manifest(df=df, root=root, name=dataset_name(root, name), source=source)


def dataset_name(root: Path, name: str | None) -> str:
    """`name` if given (must already be clean), else the basename of ROOT lower-cased with runs outside
    [a-z0-9._-] replaced by '-' (`MURA` -> `mura`, `My Data` -> `my-data`)."""
    if name is not None:
        if not re.fullmatch(r"[a-z0-9._-]+", name) or set(name) == {"."}:
            raise UserError(f"--name '{name}': use lower-case letters, digits, '.', '_' and '-' only")
        return name
    clean = re.sub(r"[^a-z0-9._-]+", "-", root.name.lower()).strip("-.")
    return clean or "data"


# ---------------------------------------------------------------------------------------------------- CLI


def plot_class_balance(summary: pd.DataFrame, path: Path, title: str = "") -> None:
    """Bar chart of normal/abnormal study counts per body part, one panel per split, each pair labelled with its
    positive rate; written atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    per_part = summary[(summary["split"] != "all") & (summary["body_part"] != "all")]
    splits = [s for s in SPLITS if s in set(per_part["split"])]
    fig = Figure(figsize=(4 + 1.1 * per_part["body_part"].nunique(), 0.4 + 3.2 * len(splits)), layout="constrained")
    axes = fig.subplots(len(splits), 1, squeeze=False)[:, 0]
    for ax, split in zip(axes, splits):
        rows = per_part[per_part["split"] == split]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, rows["negative_studies"], width=0.4, label="normal (0)", color="tab:blue")
        ax.bar(x + 0.2, rows["positive_studies"], width=0.4, label="abnormal (1)", color="tab:red")
        top = rows[["negative_studies", "positive_studies"]].to_numpy().max(axis=1)
        for xi, yi, rate in zip(x, top, rows["positive_rate"]):
            ax.annotate(f"{rate:.0%} abn.", (xi, yi), textcoords="offset points", xytext=(0, 3), ha="center",
                        fontsize=8)
        ax.set_xticks(x, [bp.removeprefix("XR_").lower() for bp in rows["body_part"]])
        ax.set_ylim(0, 1.25 * top.max())
        ax.set_ylabel("studies")
        ax.set_title("train (CV pool)" if split == "train" else "holdout")
        ax.legend(loc="upper right", ncols=2, fontsize=8)
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def format_summary(summary: pd.DataFrame) -> str:
    return summary.to_string(index=False, formatters={"positive_rate": "{:.3f}".format})
