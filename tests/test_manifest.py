"""Manifest loaders (MURA v1.1 CSVs, folder layout), their validation errors, the sha256 and the EDA CLI.

Every test builds its own tiny tree in tmp_path with the helpers below (no synthetic generator, no runs/).
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pandas as pd
import pytest

from kd_fracture.cli.manifest import main
from kd_fracture.data.manifest import (
    COLUMNS,
    Manifest,
    detect_source,
    load_folder,
    load_manifest,
    load_mura,
    manifest_sha256,
    summarize,
)
from kd_fracture.errors import DataError, UserError

# ------------------------------------------------------------------------------------------------ tiny tree builders

# (csv split, body part, patient, study number, label, number of images); CSV line numbers follow this order.
MURA_SPEC = [
    ("train", "XR_SHOULDER", "patient00001", 1, 1, 2),  # image lines 1-2, study line 1
    ("train", "XR_SHOULDER", "patient00001", 2, 0, 1),  # image line 3,   study line 2
    ("train", "XR_WRIST", "patient00002", 1, 0, 3),     # image lines 4-6, study line 3
    ("train", "XR_HAND", "patient00003", 1, 1, 1),      # image line 7,   study line 4
    ("valid", "XR_ELBOW", "patient00010", 1, 1, 2),     # image lines 1-2, study line 1
    ("valid", "XR_FINGER", "patient00011", 1, 0, 1),    # image line 3,   study line 2
]
TRAIN_IMAGES = "MURA-v1.1/train_image_paths.csv"
TRAIN_STUDIES = "MURA-v1.1/train_labeled_studies.csv"
VALID_IMAGES = "MURA-v1.1/valid_image_paths.csv"
VALID_STUDIES = "MURA-v1.1/valid_labeled_studies.csv"


def png_bytes(seed: int = 0, size: int = 32) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def study_dir(split: str, part: str, patient: str, study: int, label: int) -> str:
    return f"MURA-v1.1/{split}/{part}/{patient}/study{study}_{'positive' if label else 'negative'}"


def make_mura(root: Path, spec=MURA_SPEC) -> Path:
    """Write a MURA v1.1 tree under root (= ROOT): PNGs plus the four header-less CSVs, like the real download."""
    lines: dict[str, list[str]] = {f: [] for f in (TRAIN_IMAGES, TRAIN_STUDIES, VALID_IMAGES, VALID_STUDIES)}
    for split, part, patient, study, label, n_images in spec:
        sdir = study_dir(split, part, patient, study, label)
        (root / sdir).mkdir(parents=True, exist_ok=True)
        lines[f"MURA-v1.1/{split}_labeled_studies.csv"].append(f"{sdir}/,{label}")
        for v in range(1, n_images + 1):
            (root / sdir / f"image{v}.png").write_bytes(png_bytes(v))
            lines[f"MURA-v1.1/{split}_image_paths.csv"].append(f"{sdir}/image{v}.png")
    for file, rows in lines.items():
        (root / file).write_text("".join(r + "\n" for r in rows))
    return root


def edit_lines(root: Path, file: str, fn: Callable[[list[str]], list[str]]) -> None:
    """Rewrite a CSV through fn(list of lines without line ends)."""
    path = root / file
    path.write_text("".join(r + "\n" for r in fn(path.read_text().splitlines())))


def replace_line(n: int, text: str) -> Callable[[list[str]], list[str]]:
    return lambda rows: rows[: n - 1] + [text] + rows[n:]


def make_folder(root: Path, layout: dict[str, int]) -> Path:
    """layout: {"train/fractured": 2, ...} -> that many PNGs in each folder."""
    for i, (folder, n) in enumerate(layout.items()):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            (root / folder / f"img{j}.png").write_bytes(png_bytes(10 * i + j))
    return root


@pytest.fixture
def mura(tmp_path: Path) -> Path:
    return make_mura(tmp_path / "MURA")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ------------------------------------------------------------------------------------------------ MURA loader


def test_load_mura_counts_and_columns(mura: Path):
    m = load_manifest(mura)
    df = m.df
    assert (m.source, m.name, m.root) == ("mura", "mura", mura)
    assert tuple(df.columns) == COLUMNS
    assert isinstance(df.index, pd.RangeIndex) and df["image_path"].is_monotonic_increasing
    assert df["split"].value_counts().to_dict() == {"train": 7, "holdout": 3}
    assert df.groupby("split")["study_id"].nunique().to_dict() == {"train": 4, "holdout": 2}
    assert df.groupby("split")["patient_id"].nunique().to_dict() == {"train": 3, "holdout": 2}
    row = df[df["image_path"] == "MURA-v1.1/train/XR_SHOULDER/patient00001/study1_positive/image2.png"].iloc[0]
    assert row["study_id"] == "MURA-v1.1/train/XR_SHOULDER/patient00001/study1_positive"
    assert (row["patient_id"], row["body_part"], row["label"], row["split"]) == ("patient00001", "XR_SHOULDER", 1,
                                                                                "train")
    assert df["label"].dtype == np.int64
    assert df.loc[df["body_part"] == "XR_WRIST", "label"].tolist() == [0, 0, 0]
    assert m.path(row["image_path"]).is_file()
    holdout = m.split("holdout")
    assert len(holdout) == 3 and set(holdout["body_part"]) == {"XR_ELBOW", "XR_FINGER"}
    assert list(holdout.index) == [0, 1, 2]


def test_data_may_name_the_mura_folder(mura: Path):
    direct = load_manifest(mura / "MURA-v1.1")
    via_root = load_manifest(mura)
    assert detect_source(mura / "MURA-v1.1") == detect_source(mura) == ("mura", mura)
    assert (direct.root, direct.name) == (via_root.root, via_root.name) == (mura, "mura")
    pd.testing.assert_frame_equal(direct.df, via_root.df)
    pd.testing.assert_frame_equal(load_mura(mura / "MURA-v1.1").df, via_root.df)


def test_tolerates_crlf_blank_trailing_lines_bom_and_missing_trailing_slash(mura: Path):
    expected = load_manifest(mura).sha256()
    for file in (TRAIN_IMAGES, TRAIN_STUDIES, VALID_IMAGES, VALID_STUDIES):
        rows = (mura / file).read_text().splitlines()
        if "studies" in file:
            rows = [r.replace("/,", ",") for r in rows]  # no trailing slash on study folders
        (mura / file).write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n\r\n").encode("utf-8"))
    assert load_manifest(mura).sha256() == expected


def test_dotdot_that_stays_inside_the_root_is_accepted(mura: Path):
    # normalisation, not a substring test: '..' that resolves inside the root is a valid path
    edit_lines(mura, TRAIN_IMAGES, replace_line(
        3, "MURA-v1.1/train/XR_SHOULDER/patient00001/../patient00001/study2_negative/image1.png"))
    m = load_manifest(mura)
    assert "MURA-v1.1/train/XR_SHOULDER/patient00001/study2_negative/image1.png" in set(m.df["image_path"])


@pytest.mark.parametrize("dirname, name, expected", [
    ("MURA", None, "mura"),
    ("My Data (v2)", None, "my-data-v2"),
    ("mura-v1.1_copy", None, "mura-v1.1_copy"),
    ("MURA", "custom.set_1", "custom.set_1"),
])
def test_dataset_name(tmp_path: Path, dirname: str, name: str | None, expected: str):
    root = make_mura(tmp_path / dirname, MURA_SPEC[3:5])
    assert load_manifest(root, name=name).name == expected
    assert load_manifest(root / "MURA-v1.1", name=name).name == expected


def test_bad_name_is_a_user_error(mura: Path):
    with pytest.raises(UserError, match="--name 'Bad Name'"):
        load_manifest(mura, name="Bad Name")


def test_neither_layout_is_a_clear_error(tmp_path: Path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match="neither a MURA v1.1 root.*nor a folder layout"):
        detect_source(tmp_path)
    with pytest.raises(DataError, match="data folder not found"):
        load_manifest(tmp_path / "nope")


def test_renamed_mura_folder_is_a_clear_error(mura: Path):
    renamed = mura / "mura_copy"
    (mura / "MURA-v1.1").rename(renamed)
    with pytest.raises(DataError, match="rename the folder to MURA-v1.1"):
        load_manifest(renamed)


# ------------------------------------------------------------------------------------------------ MURA validation


def _rm(path: str) -> Callable[[Path], None]:
    return lambda root: (root / path).unlink()


def _edit(file: str, fn) -> Callable[[Path], None]:
    return lambda root: edit_lines(root, file, fn)


def _line(file: str, n: int, text: str) -> Callable[[Path], None]:
    return _edit(file, replace_line(n, text))


def _write(file: str, data: bytes) -> Callable[[Path], None]:
    return lambda root: (root / file).write_bytes(data)


def _as_dir(file: str) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        (root / file).unlink()
        (root / file).mkdir()
    return apply


S1 = study_dir("train", "XR_SHOULDER", "patient00001", 1, 1)  # train study line 1, image lines 1-2
S2 = study_dir("train", "XR_SHOULDER", "patient00001", 2, 0)  # train study line 2, image line 3
E1 = study_dir("valid", "XR_ELBOW", "patient00010", 1, 1)     # valid study line 1, image lines 1-2

# (id, how to break the tree, substrings the one-line error must contain)
MURA_ERRORS = [
    ("csv-missing", _rm(VALID_STUDIES), [VALID_STUDIES, "file not found"]),
    ("csv-not-utf8", _write(TRAIN_IMAGES, b"\xff\xfe\x00garbage\n"), [TRAIN_IMAGES, "not a UTF-8"]),
    ("csv-unreadable", _as_dir(TRAIN_STUDIES), [TRAIN_STUDIES, "cannot read"]),
    ("images-two-columns", _line(TRAIN_IMAGES, 2, f"{S1}/image2.png,1"), [f"{TRAIN_IMAGES} line 2", "2 columns"]),
    ("studies-one-column", _line(TRAIN_STUDIES, 3, "MURA-v1.1/train/XR_WRIST/patient00002/study1_negative/"),
     [f"{TRAIN_STUDIES} line 3", "1 column, expected 2"]),
    ("header-path", _edit(TRAIN_IMAGES, lambda r: ["path", *r]), [f"{TRAIN_IMAGES} line 1", "header-less"]),
    ("header-image-label", _edit(VALID_IMAGES, lambda r: ["image,label", *r]), [f"{VALID_IMAGES} line 1", "header"]),
    ("header-studies", _edit(TRAIN_STUDIES, lambda r: ["", "Study,Label", *r]),
     [f"{TRAIN_STUDIES} line 2", "header-less MURA format"]),
    ("label-7", _line(TRAIN_STUDIES, 2, f"{S2}/,7"), [f"{TRAIN_STUDIES} line 2", "label '7' is not 0 or 1"]),
    ("label-abc", _line(TRAIN_STUDIES, 2, f"{S2}/,abc"), [f"{TRAIN_STUDIES} line 2", "label 'abc' is not 0 or 1"]),
    ("label-empty", _line(TRAIN_STUDIES, 2, f"{S2}/,"), [f"{TRAIN_STUDIES} line 2", "label is empty"]),
    ("duplicate-image", _edit(TRAIN_IMAGES, lambda r: [*r, r[2]]),
     [f"{TRAIN_IMAGES} line 3", "listed twice (lines 3 and 8)"]),
    ("duplicate-study", _edit(TRAIN_STUDIES, lambda r: [*r, r[0]]),
     [f"{TRAIN_STUDIES} line 5", "listed twice (also line 1)"]),
    ("mixed-labels", _edit(TRAIN_STUDIES, lambda r: [*r, f"{S1}/,0"]),
     [f"{TRAIN_STUDIES} line 5", "mixed labels (1 on line 1, 0 here)"]),
    ("folder-disagrees-with-label", _line(TRAIN_STUDIES, 2, f"{S2}/,1"),
     [f"{TRAIN_STUDIES} line 2", "'study2_negative' disagrees with its label 1"]),
    ("image-without-study", _edit(TRAIN_STUDIES, lambda r: r[:3]),
     [f"{TRAIN_IMAGES} line 7", "patient00003/study1_positive', which is not in " + TRAIN_STUDIES]),
    ("study-without-images", _edit(TRAIN_IMAGES, lambda r: r[:6]),
     [f"{TRAIN_STUDIES} line 4", "has no images in " + TRAIN_IMAGES]),
    ("absolute-path", _line(TRAIN_IMAGES, 4, "/data/MURA-v1.1/train/XR_WRIST/patient00002/study1_negative/image1.png"),
     [f"{TRAIN_IMAGES} line 4", "is absolute"]),
    ("windows-absolute-path", _line(VALID_IMAGES, 2, r"C:\MURA-v1.1\valid\XR_ELBOW\patient00010\study1_positive\x.png"),
     [f"{VALID_IMAGES} line 2", "is absolute"]),
    ("escapes-root", _line(TRAIN_IMAGES, 5, "MURA-v1.1/../../etc/passwd.png"),
     [f"{TRAIN_IMAGES} line 5", "'MURA-v1.1/../../etc/passwd.png' leaves the data root"]),
    ("study-escapes-root", _line(VALID_STUDIES, 2, "MURA-v1.1/valid/../../../x/,0"),
     [f"{VALID_STUDIES} line 2", "leaves the data root"]),
    ("bad-shape", _line(TRAIN_IMAGES, 6, "MURA-v1.1/train/XR_WRIST/image3.png"),
     [f"{TRAIN_IMAGES} line 6", "is not of the form MURA-v1.1/<split>/XR_<PART>/patient<N>/study<N>_"]),
    ("not-an-image", _line(TRAIN_IMAGES, 1, f"{S1}/image1.txt"), [f"{TRAIN_IMAGES} line 1", "is not of the form"]),
    ("bad-study-shape", _line(VALID_STUDIES, 1, "MURA-v1.1/valid/XR_ELBOW/patient00010/,1"),
     [f"{VALID_STUDIES} line 1", "is not of the form"]),
    ("wrong-split-folder", _edit(TRAIN_IMAGES, lambda r: [*r, "MURA-v1.1/valid/XR_FINGER/patient00011/"
                                                              "study1_negative/image1.png"]),
     [f"{TRAIN_IMAGES} line 8", "is under 'valid/' but this file lists the train split"]),
    ("unknown-body-part", _line(VALID_STUDIES, 2, "MURA-v1.1/valid/XR_KNEE/patient00011/study1_negative/,0"),
     [f"{VALID_STUDIES} line 2", "unknown body part 'XR_KNEE'"]),
    ("empty-holdout", _write(VALID_IMAGES, b"\n"), [VALID_IMAGES, "holdout split would be empty"]),
    ("empty-train-studies", _write(TRAIN_STUDIES, b""), [TRAIN_STUDIES, "train split would be empty"]),
    ("missing-files", lambda root: [(root / S2 / "image1.png").unlink(), (root / E1 / "image2.png").unlink()],
     [f"{TRAIN_IMAGES} line 3", f"'{S2}/image1.png' not found", "2 of 10 listed images are missing"]),
    ("missing-study-folder", lambda root: shutil.rmtree(root / study_dir("train", "XR_WRIST", "patient00002", 1, 0)),
     [f"{TRAIN_IMAGES} line 4", "3 of 10 listed images are missing"]),
]


@pytest.mark.parametrize("breaker, expected", [c[1:] for c in MURA_ERRORS], ids=[c[0] for c in MURA_ERRORS])
def test_mura_validation_error_via_cli(mura: Path, tmp_path: Path, capsys, breaker, expected):
    load_manifest(mura)  # the tree is valid before the edit
    breaker(mura)
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(capsys, "--data", mura, "--out", out)
    assert rc == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    for text in expected:
        assert text in stderr, (text, stderr)
    assert not out.exists()
    with pytest.raises(DataError):
        load_manifest(mura)


def test_patient_in_both_pool_and_holdout(tmp_path: Path, capsys):
    spec = [*MURA_SPEC, ("valid", "XR_HAND", "patient00002", 1, 0, 1)]  # patient00002 is also in train
    root = make_mura(tmp_path / "MURA", spec)
    out = tmp_path / "out"
    rc, _, stderr = run_cli(capsys, "--data", root, "--out", out)
    assert rc == 2 and not out.exists()
    assert f"{VALID_IMAGES} line 4: patient 'patient00002'" in stderr
    assert f"{TRAIN_IMAGES} line 4" in stderr  # the first train line of that patient


# ------------------------------------------------------------------------------------------------ --verify-images


@pytest.mark.parametrize("damage, file_line, reason", [
    ("truncated", f"{TRAIN_IMAGES} line 2", "corrupt or truncated"),
    ("empty", f"{VALID_IMAGES} line 3", "empty (0 bytes)"),
])
def test_verify_images_catches_corrupt_files(mura: Path, tmp_path: Path, capsys, damage, file_line, reason):
    if damage == "truncated":
        image = f"{S1}/image2.png"
        data = (mura / image).read_bytes()
        (mura / image).write_bytes(data[: len(data) // 2])
    else:
        image = study_dir("valid", "XR_FINGER", "patient00011", 1, 0) + "/image1.png"
        (mura / image).write_bytes(b"")
    assert len(load_manifest(mura).df) == 10  # existence only without --verify-images
    with pytest.raises(DataError) as err:
        load_manifest(mura, verify_images=True)
    assert file_line in str(err.value) and image in str(err.value) and reason in str(err.value)
    out = tmp_path / "out"
    rc, _, stderr = run_cli(capsys, "--data", mura, "--out", out, "--verify-images")
    assert rc == 2 and file_line in stderr and not out.exists()


def test_verify_images_passes_on_good_tree(mura: Path):
    assert load_manifest(mura, verify_images=True).sha256() == load_manifest(mura).sha256()


# ------------------------------------------------------------------------------------------------ folder layout


@pytest.mark.parametrize("pos, neg", [
    ("fractured", "not_fractured"),
    ("positive", "negative"),
    ("Abnormal", "NORMAL"),
    ("Fractured", "not fractured"),
])
def test_folder_layout_class_aliases_and_split_mapping(tmp_path: Path, pos: str, neg: str):
    root = make_folder(tmp_path / "Bone Fracture", {
        f"train/{pos}": 2, f"train/{neg}": 3, f"val/{pos}": 1, f"val/{neg}": 1, f"test/{pos}": 1, f"test/{neg}": 2,
    })
    with pytest.warns(UserWarning, match="no patient ids.*image-level"):
        m = load_manifest(root)
    df = m.df
    assert (m.source, m.name) == ("folder", "bone-fracture")
    assert tuple(df.columns) == COLUMNS and df["image_path"].is_monotonic_increasing
    assert df["split"].value_counts().to_dict() == {"train": 7, "holdout": 3}
    assert df.groupby("split")["label"].sum().to_dict() == {"train": 3, "holdout": 1}
    assert set(df.loc[df["image_path"].str.startswith(("train/", "val/")), "split"]) == {"train"}
    assert set(df.loc[df["image_path"].str.startswith("test/"), "split"]) == {"holdout"}
    assert (df["label"] == df["image_path"].str.contains(f"/{pos}/").astype(int)).all()
    assert (df["body_part"] == "unknown").all()
    assert (df["study_id"] == df["image_path"].str.removesuffix(".png")).all()
    assert (df["patient_id"] == df["study_id"]).all() and df["study_id"].is_unique


def test_folder_layout_recurses_and_ignores_hidden_and_non_images(tmp_path: Path):
    root = make_folder(tmp_path / "ds", {"train/fractured/sub/deeper": 2, "train/not_fractured": 1,
                                         "test/fractured": 1, "test/not_fractured": 1})
    (root / "train/fractured/.DS_Store").write_bytes(b"x")
    (root / "train/not_fractured/notes.txt").write_text("x")
    (root / "test/fractured/photo.JPG").write_bytes(b"x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = load_folder(root)
    assert "train/fractured/sub/deeper/img1.png" in set(m.df["image_path"])
    assert "test/fractured/photo.JPG" in set(m.df["image_path"])
    assert len(m.df) == 6
    messages = [str(w.message) for w in caught]
    assert any("ignored 1 non-image file" in msg and "notes.txt" in msg for msg in messages)
    assert sum("no patient ids" in msg for msg in messages) == 1


@pytest.mark.parametrize("layout, expected", [
    ({"train/fractured": 0, "test/normal": 0}, "no images found; expected ROOT/{train,val,test}"),
    ({"train/fractured": 1, "val/normal": 1}, "no holdout images (the holdout split comes from test/)"),
    ({"test/fractured": 1, "test/normal": 1}, "no train images"),
    ({"train/fractured": 1, "train/broken": 1, "test/normal": 1}, "train/broken/: unknown class folder 'broken'"),
])
def test_folder_layout_errors(tmp_path: Path, capsys, layout, expected):
    root = make_folder(tmp_path / "ds", layout)
    out = tmp_path / "out"
    rc, _, stderr = run_cli(capsys, "--data", root, "--out", out)
    assert rc == 2 and expected in stderr and not out.exists(), stderr


def test_folder_layout_file_outside_class_folder(tmp_path: Path):
    root = make_folder(tmp_path / "ds", {"train/fractured": 1, "test/normal": 1})
    (root / "train" / "loose.png").write_bytes(png_bytes())
    with pytest.raises(DataError, match="train/loose.png: file directly in a split folder"):
        load_manifest(root)


def test_folder_layout_verify_images(tmp_path: Path):
    root = make_folder(tmp_path / "ds", {"train/fractured": 1, "test/normal": 1})
    (root / "test/normal/img0.png").write_bytes(b"")
    with pytest.warns(UserWarning):
        load_manifest(root)
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"^test/normal/img0.png: image file is empty"):
        load_manifest(root, verify_images=True)


# ------------------------------------------------------------------------------------------------ sha256, summary


def test_manifest_sha256_ignores_row_order_and_sees_label_changes(mura: Path):
    m = load_manifest(mura)
    shuffled = m.df.sample(frac=1.0, random_state=3)
    assert not shuffled["image_path"].is_monotonic_increasing
    assert manifest_sha256(shuffled) == m.sha256()
    assert manifest_sha256(shuffled.astype({"label": "int32"})) == m.sha256()
    flipped = m.df.copy()
    flipped.loc[0, "label"] = 1 - flipped.loc[0, "label"]
    assert manifest_sha256(flipped) != m.sha256()
    assert len(m.sha256()) == 64


def test_manifest_rejects_wrong_columns(mura: Path):
    m = load_manifest(mura)
    with pytest.raises(ValueError, match="columns"):
        Manifest(df=m.df.drop(columns="split"), root=m.root, name=m.name, source=m.source)


def test_summarize_counts(mura: Path):
    s = summarize(load_manifest(mura)).set_index(["split", "body_part"])
    assert list(s.index.get_level_values(0).unique()) == ["train", "holdout", "all"]
    assert s.loc[("train", "XR_SHOULDER")].to_dict() == {
        "images": 3, "studies": 2, "patients": 1, "positive_studies": 1, "negative_studies": 1, "positive_rate": 0.5}
    assert s.loc[("train", "all"), ["images", "studies", "patients", "positive_studies"]].tolist() == [7, 4, 3, 2]
    assert s.loc[("holdout", "all"), ["images", "studies", "patients", "positive_studies"]].tolist() == [3, 2, 2, 1]
    assert s.loc[("all", "all"), "images"] == 10 and s.loc[("all", "all"), "positive_rate"] == 0.5


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_prints_summary_and_writes_outputs(mura: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, stdout, stderr = run_cli(capsys, "--data", mura / "MURA-v1.1")
    assert rc == 0, stderr
    out = tmp_path / "data_manifests" / "mura"  # default --out: data_manifests/<name>/
    for word in ("positive_rate", "XR_SHOULDER", "holdout", load_manifest(mura).sha256()):
        assert word in stdout
    png = (out / "class_balance.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert img is not None and min(img.shape) > 100 and img.std() > 0
    written = pd.read_csv(out / "manifest.csv")
    assert tuple(written.columns) == COLUMNS and manifest_sha256(written) == load_manifest(mura).sha256()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_cli_folder_layout_prints_warning_and_honours_name(tmp_path: Path, capsys):
    root = make_folder(tmp_path / "ds", {"train/fractured": 1, "val/not_fractured": 1, "test/fractured": 1})
    out = tmp_path / "o"
    rc, stdout, stderr = run_cli(capsys, "--data", root, "--out", out, "--name", "kaggle")
    assert rc == 0
    assert "dataset 'kaggle' (folder)" in stdout and "unknown" in stdout
    assert "warning:" in stderr and "no patient ids" in stderr
    assert (out / "class_balance.png").is_file() and (out / "manifest.csv").is_file()


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--verify-images" in capsys.readouterr().out


def test_cli_bad_name_exits_2_and_writes_nothing(mura: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, stderr = run_cli(capsys, "--data", mura, "--name", "../evil")
    assert rc == 2 and "--name '../evil'" in stderr
    assert not (tmp_path / "data_manifests").exists()
