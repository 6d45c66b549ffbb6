"""Synthetic MURA-v1.1 phantom (kd_fracture.data.phantom): layout, CSV consistency, determinism, image
content, CLI and the cached default. Phantoms here are tiny (8-14 patients, 32 px)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from kd_fracture.cli import phantom as phantom_cli
from kd_fracture.data import phantom as phantom_pkg  # `phantom` is the fixture below
from kd_fracture.data.phantom import (BODY_PARTS, MARKER_NAME, ensure_default_phantom, generate_phantom,
                                      render_view)
from kd_fracture.data.phantom import tree as phantom_tree
from kd_fracture.errors import UserError

PATIENTS, SIZE, SEED, HOLDOUT = 14, 32, 7, 0.3


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read_csvs(root: Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    mura = root / "MURA-v1.1"
    images = (mura / f"{split}_image_paths.csv").read_text().splitlines()
    studies = [(s, int(y)) for s, y in (line.rsplit(",", 1) for line in
                                        (mura / f"{split}_labeled_studies.csv").read_text().splitlines())]
    return images, studies


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), PATIENTS, SIZE, seed=SEED, holdout_frac=HOLDOUT)


def test_tree_and_csvs_are_consistent(phantom: Path):
    mura = phantom / "MURA-v1.1"
    assert sorted(p.name for p in mura.iterdir()) == sorted(
        ["train", "valid", MARKER_NAME, "train_image_paths.csv", "valid_image_paths.csv",
         "train_labeled_studies.csv", "valid_labeled_studies.csv"])
    listed: set[str] = set()
    patients_of: dict[str, set[str]] = {}
    parts_of: dict[str, set[str]] = defaultdict(set)
    for split in ("train", "valid"):
        images, studies = _read_csvs(phantom, split)
        assert images and studies
        labels = dict(studies)
        assert len(labels) == len(studies), "duplicate study rows"
        # every image exists, sits in a labelled study of this split, and the folder name agrees with the label
        for path in images:
            assert (phantom / path).is_file(), path
            study = path.rsplit("/", 1)[0] + "/"
            assert study in labels, path
        assert {p.rsplit("/", 1)[0] + "/" for p in images} == set(labels), "studies without images or vice versa"
        for study, label in studies:
            _, split_dir, part, patient, name, _ = study.split("/")
            assert split_dir == split and part in BODY_PARTS
            assert name.endswith("_positive" if label == 1 else "_negative"), study
            parts_of[part].add(patient)
        listed |= set(images)
        patients_of[split] = {s.split("/")[3] for s, _ in studies}
        # studies per patient are study1..k (1 <= k <= 3), views per study image1..j (1 <= j <= 4)
        per_patient = defaultdict(list)
        for study, _ in studies:
            per_patient[study.split("/")[3]].append(int(study.split("/")[4].split("_")[0][len("study"):]))
        assert all(sorted(ks) == list(range(1, len(ks) + 1)) and len(ks) <= 3 for ks in per_patient.values())
        views = defaultdict(list)
        for path in images:
            views[path.rsplit("/", 1)[0]].append(int(path.rsplit("image", 1)[1][:-4]))
        assert all(sorted(js) == list(range(1, len(js) + 1)) and len(js) <= 4 for js in views.values())
    on_disk = {str(p.relative_to(phantom)) for p in mura.rglob("*.png")}
    assert on_disk == listed, "PNG files that no CSV lists"
    assert not patients_of["train"] & patients_of["valid"], "a patient in both train and valid"
    assert len(patients_of["train"]) + len(patients_of["valid"]) == PATIENTS
    assert len(patients_of["valid"]) == round(HOLDOUT * PATIENTS)
    assert set(parts_of) == set(BODY_PARTS) and all(len(p) >= 2 for p in parts_of.values())
    # one body part per patient, as in MURA
    assert sum(len(p) for p in parts_of.values()) == PATIENTS


def test_marker_counts_match_csvs(phantom: Path):
    info = phantom_pkg.phantom_info(phantom)
    assert info["synthetic"] is True and info["params"]["seed"] == SEED
    for split in ("train", "valid"):
        images, studies = _read_csvs(phantom, split)
        assert info["counts"][split]["images"] == len(images)
        assert info["counts"][split]["positive_studies"] == sum(y for _, y in studies)


def test_images_are_grayscale_uint8_of_requested_size(phantom: Path):
    images, _ = _read_csvs(phantom, "train")
    for path in images[:20]:
        img = cv2.imread(str(phantom / path), cv2.IMREAD_UNCHANGED)
        assert img is not None and img.dtype == np.uint8 and img.shape == (SIZE, SIZE), path
        assert img.std() > 10, f"{path} is flat"


def test_same_seed_same_bytes_different_seed_differs(phantom: Path, tmp_path: Path):
    again = generate_phantom(tmp_path / "again", PATIENTS, SIZE, seed=SEED, holdout_frac=HOLDOUT)
    assert _tree_hashes(again) == _tree_hashes(phantom)
    other = generate_phantom(tmp_path / "other", PATIENTS, SIZE, seed=SEED + 1, holdout_frac=HOLDOUT)
    a, b = _tree_hashes(phantom), _tree_hashes(other)
    common = set(a) & set(b) - {f"MURA-v1.1/{MARKER_NAME}"}
    assert common and sum(a[k] != b[k] for k in common) > 0.9 * len(common)


def test_structure_and_labels_do_not_depend_on_image_size_or_workers(phantom: Path, tmp_path: Path):
    bigger = generate_phantom(tmp_path / "px48", PATIENTS, 48, seed=SEED, holdout_frac=HOLDOUT, workers=2)
    for split in ("train", "valid"):
        assert _read_csvs(bigger, split) == _read_csvs(phantom, split)
    serial = generate_phantom(tmp_path / "serial", PATIENTS, 48, seed=SEED, holdout_frac=HOLDOUT, workers=1)
    assert _tree_hashes(serial) == _tree_hashes(bigger)


def test_render_view_shapes_and_fractures_change_pixels():
    rng = np.random.default_rng(0)
    for part in BODY_PARTS:
        img = render_view(rng, part, abnormal=True, size=40, subtlety=0.0)
        assert img.shape == (40, 40) and img.dtype == np.uint8
        # the same study with and without its fracture, seen through identical view parameters
        anatomy = phantom_pkg.render_anatomy(rng, phantom_pkg.sample_patient(rng, part), 64)
        study = phantom_pkg.render_study(rng, anatomy, abnormal=True, subtlety=0.0)
        normal = phantom_pkg.render_study(rng, anatomy, abnormal=False, subtlety=0.0)
        seen = phantom_pkg.render_study_view(np.random.default_rng(1), study, 0, 64, fracture_visible=True)
        plain = phantom_pkg.render_study_view(np.random.default_rng(1), normal, 0, 64)
        assert np.abs(seen.astype(int) - plain).max() > 30, f"{part}: {study.kind} left no visible trace"


def test_global_intensity_does_not_reveal_the_label():
    """Guard against a trivial cue: mean brightness alone must not separate abnormal from normal views."""
    rng = np.random.default_rng(123)
    means, labels = [], []
    for i in range(280):
        abnormal = i % 2 == 1
        img = render_view(rng, BODY_PARTS[(i // 2) % len(BODY_PARTS)], abnormal, 32, float(rng.uniform()) ** 2)
        means.append(img.mean() / 255)
        labels.append(int(abnormal))
    means, labels = np.array(means), np.array(labels)
    assert abs(means[labels == 1].mean() - means[labels == 0].mean()) < 0.03
    assert 0.38 < roc_auc_score(labels, means) < 0.62


def test_interrupted_generation_leaves_no_tree(tmp_path: Path, monkeypatch):
    calls = {"n": 0}
    real = phantom_tree.render_study_view

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(phantom_tree, "render_study_view", failing)  # where _patient_rows looks it up
    with pytest.raises(KeyboardInterrupt):
        generate_phantom(tmp_path, 10, SIZE)
    assert list(tmp_path.iterdir()) == [], "a half-written tree or temp directory was left behind"


def test_refuses_to_overwrite_a_real_dataset(tmp_path: Path):
    real = tmp_path / "MURA-v1.1"
    real.mkdir()
    (real / "train_image_paths.csv").write_text("MURA-v1.1/train/XR_HAND/patient00001/study1_negative/image1.png\n")
    with pytest.raises(UserError, match="not a synthetic phantom"):
        generate_phantom(tmp_path, 8, SIZE)
    assert (real / "train_image_paths.csv").exists()


@pytest.mark.parametrize("kwargs", [dict(holdout_frac=1.0), dict(size=8), dict(abnormal_frac=1.5),
                                    dict(patients=1, holdout_frac=0.5), dict(workers=0)])
def test_bad_arguments_are_user_errors(tmp_path: Path, kwargs):
    args = dict(patients=8, size=SIZE) | kwargs
    with pytest.raises(UserError):
        generate_phantom(tmp_path, **args)


def test_cli_help():
    with pytest.raises(SystemExit) as exc:
        phantom_cli.main(["--help"])
    assert exc.value.code == 0
    run = subprocess.run([sys.executable, "-m", "kd_fracture.phantom", "--help"], capture_output=True,
                         text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=60)
    assert run.returncode == 0 and "--patients" in run.stdout and "--preview" in run.stdout


def test_cli_writes_tree_summary_and_preview(tmp_path: Path, capsys):
    preview = tmp_path / "grid.png"
    assert phantom_cli.main(["--out", str(tmp_path / "data"), "--patients", "8", "--img-size", str(SIZE), "--phantom-seed", "1",
                           "--preview", str(preview)]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "valid" in out and "images/s" in out and "abnormal" in out
    assert (tmp_path / "data" / "MURA-v1.1" / "train_image_paths.csv").exists()
    grid = cv2.imread(str(preview))
    assert grid is not None and grid.shape[0] > 300 and grid.shape[1] > 600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left next to the preview"


def test_cli_bad_input_is_one_line_error(tmp_path: Path, capsys):
    assert phantom_cli.main(["--out", str(tmp_path), "--patients", "8", "--img-size", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_ensure_default_phantom_reuses_complete_and_regenerates_incomplete(tmp_path: Path, capsys):
    root = ensure_default_phantom(tmp_path, patients=8, size=SIZE, seed=2)
    assert root == tmp_path / "phantom_p8_px32_s2"
    assert "SYNTHETIC" in capsys.readouterr().out
    marker = root / "MURA-v1.1" / MARKER_NAME
    first_image = root / _read_csvs(root, "train")[0][0]
    stamps = (marker.stat().st_mtime_ns, first_image.stat().st_mtime_ns)

    assert ensure_default_phantom(tmp_path, patients=8, size=SIZE, seed=2) == root
    assert capsys.readouterr().out == "", "a complete phantom was regenerated"
    assert (marker.stat().st_mtime_ns, first_image.stat().st_mtime_ns) == stamps

    # interrupted / tampered: no completion marker -> regenerated from scratch, stray files gone
    marker.unlink()
    stray = root / "MURA-v1.1" / "train" / "stray.txt"
    stray.write_text("left over")
    assert ensure_default_phantom(tmp_path, patients=8, size=SIZE, seed=2) == root
    assert "SYNTHETIC" in capsys.readouterr().out
    assert marker.exists() and not stray.exists()
    assert all((root / p).is_file() for p in _read_csvs(root, "train")[0])


def test_no_global_intensity_shortcut(tmp_path: Path):
    """Issue 12: a logistic regression on global intensity statistics (mean, std, bright fraction) of each image
    must not tell abnormal from normal: image AUROC ≤ 0.55 on patients it did not see."""
    import cv2
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from kd_fracture.data.manifest import load_manifest

    manifest = load_manifest(generate_phantom(tmp_path / "p", patients=240, size=64, seed=5, holdout_frac=0.4))

    def stats(split: str):
        rows = manifest.df[manifest.df["split"] == split]
        pixels = [cv2.imread(str(manifest.root / p), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
                  for p in rows["image_path"]]
        return np.array([[a.mean(), a.std(), (a > 0.7).mean()] for a in pixels]), rows["label"].to_numpy()

    (x_train, y_train), (x_test, y_test) = stats("train"), stats("holdout")
    assert len(y_test) > 250 and 0 < y_test.mean() < 1
    model = LogisticRegression(max_iter=1000).fit(x_train, y_train)
    assert roc_auc_score(y_test, model.predict_proba(x_test)[:, 1]) <= 0.55
