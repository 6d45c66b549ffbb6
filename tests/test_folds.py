"""Folds: patient-disjoint, stratified, deterministic, checked against the manifest on reuse (DESIGN §3)."""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kd_fracture.data.folds import (
    assert_patient_disjoint,
    fold_summary,
    inner_val_split,
    load_or_make_folds,
    make_folds,
    study_ids_to_rows,
)
from kd_fracture.errors import DataError
from kd_fracture.io import read_json, write_csv

BODY_PARTS = ["XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST"]


def synthetic_manifest(n_patients: int = 500, n_holdout: int = 40, pos_rate: float = 0.4,
                       seed: int = 0) -> pd.DataFrame:
    """Image rows (no files): 1-3 studies per patient, 1-3 images per study, 7 body parts, ~pos_rate abnormal."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients + n_holdout):
        split = "train" if p < n_patients else "holdout"
        for s in range(rng.integers(1, 4)):
            part, label = BODY_PARTS[rng.integers(len(BODY_PARTS))], int(rng.random() < pos_rate)
            study = f"{part}/patient{p:05d}/study{s + 1}_{'positive' if label else 'negative'}"
            for v in range(rng.integers(1, 4)):
                rows.append({"image_path": f"{study}/image{v + 1}.png", "study_id": study,
                             "patient_id": f"patient{p:05d}", "body_part": part, "label": label, "split": split})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class FakeManifest:
    """Duck-typed stand-in for kd_fracture.data.manifest.Manifest (only what folds.py uses)."""

    df: pd.DataFrame
    root: Path = Path(".")
    name: str = "toy"
    source: str = "test"

    def sha256(self) -> str:
        return hashlib.sha256(self.df.to_csv(index=False).encode()).hexdigest()


@pytest.fixture(scope="module")
def manifest_df() -> pd.DataFrame:
    return synthetic_manifest()


@pytest.fixture(scope="module")
def folds(manifest_df) -> pd.DataFrame:
    return make_folds(manifest_df, k=5, seed=0)


def pool_study_ids(df: pd.DataFrame) -> set[str]:
    return set(df.loc[df["split"] == "train", "study_id"])


def test_folds_patient_disjoint_and_cover_each_pool_study_once(manifest_df, folds):
    assert list(folds.columns) == ["study_id", "patient_id", "body_part", "label", "fold"]
    assert folds["study_id"].is_unique and set(folds["study_id"]) == pool_study_ids(manifest_df)
    assert not set(folds["study_id"]) & set(manifest_df.loc[manifest_df["split"] == "holdout", "study_id"])
    assert set(folds["fold"]) == set(range(5))
    assert (folds.groupby("patient_id")["fold"].nunique() == 1).all()
    assert folds["study_id"].is_monotonic_increasing
    assert_patient_disjoint(folds)


def test_folds_are_stratified_by_label(folds):
    overall = folds["label"].mean()
    per_fold = folds.groupby("fold")["label"].mean()
    assert (per_fold - overall).abs().max() < 0.05, per_fold.to_dict()
    sizes = folds.groupby("fold").size()
    assert sizes.max() - sizes.min() < 0.1 * sizes.mean()


def test_folds_deterministic_per_seed(manifest_df, folds, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write_csv(a, folds)
    write_csv(b, make_folds(manifest_df, k=5, seed=0))
    assert a.read_bytes() == b.read_bytes()
    other = make_folds(manifest_df, k=5, seed=1)
    assert (other["study_id"] == folds["study_id"]).all()
    assert (other["fold"] != folds["fold"]).mean() > 0.5


def test_assert_patient_disjoint_names_the_patient(folds):
    multi = folds.groupby("patient_id").size()
    patient = multi[multi > 1].index[0]
    broken = folds.copy()
    first = broken.index[broken["patient_id"] == patient][0]
    broken.loc[first, "fold"] = (broken.loc[first, "fold"] + 1) % 5
    with pytest.raises(AssertionError, match=patient):
        assert_patient_disjoint(broken)


def test_fold_summary_counts(folds):
    summary = fold_summary(folds)
    assert summary["studies"].sum() == len(folds)
    assert summary["patients"].sum() == folds["patient_id"].nunique()
    assert summary["positives"].sum() == folds["label"].sum()
    assert summary[BODY_PARTS].to_numpy().sum() == len(folds)
    np.testing.assert_allclose(summary["pos_rate"], summary["positives"] / summary["studies"], atol=1e-3)


def test_load_or_make_folds_writes_reuses_and_checks_hash(manifest_df, tmp_path):
    manifest = FakeManifest(manifest_df)
    folds, path = load_or_make_folds(manifest, 5, 0, tmp_path)
    assert path == tmp_path / "toy" / "folds_k5_s0.csv"
    meta = read_json(path.with_suffix(".json"))
    assert meta["manifest_sha256"] == manifest.sha256()
    assert (meta["k"], meta["seed"], meta["n_studies"]) == (5, 0, len(folds))
    assert sum(f["studies"] for f in meta["per_fold"]) == len(folds)
    assert not list(path.parent.glob("*.tmp*"))  # atomic writes leave no temp files

    mtime = path.stat().st_mtime_ns
    again, _ = load_or_make_folds(manifest, 5, 0, tmp_path)
    assert path.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(again, folds)

    changed = FakeManifest(manifest_df[manifest_df["patient_id"] != "patient00000"].reset_index(drop=True))
    with pytest.raises(DataError, match="different manifest.*--regenerate-folds"):
        load_or_make_folds(changed, 5, 0, tmp_path)
    rebuilt, _ = load_or_make_folds(changed, 5, 0, tmp_path, regenerate=True)
    assert "patient00000" not in set(rebuilt["patient_id"])
    assert read_json(path.with_suffix(".json"))["manifest_sha256"] == changed.sha256()


def test_reused_folds_are_checked_against_the_manifest(manifest_df, tmp_path):
    manifest = FakeManifest(manifest_df)
    folds, path = load_or_make_folds(manifest, 5, 0, tmp_path)
    write_csv(path, folds.iloc[1:])  # a study went missing from a hand-edited file
    with pytest.raises(DataError, match="--regenerate-folds"):
        load_or_make_folds(manifest, 5, 0, tmp_path)

    leaky = folds.copy()
    patient = leaky.groupby("patient_id").size().loc[lambda s: s > 1].index[0]
    first = leaky.index[leaky["patient_id"] == patient][0]
    leaky.loc[first, "fold"] = (leaky.loc[first, "fold"] + 1) % 5
    write_csv(path, leaky)
    with pytest.raises(DataError, match=patient):
        load_or_make_folds(manifest, 5, 0, tmp_path)

    path.with_suffix(".json").unlink()
    with pytest.raises(DataError, match="sidecar"):
        load_or_make_folds(manifest, 5, 0, tmp_path)


def test_impossible_requests_are_data_errors(manifest_df):
    with pytest.raises(DataError, match="at least 2 folds"):
        make_folds(manifest_df, k=1, seed=0)
    tiny = synthetic_manifest(n_patients=30, n_holdout=0, pos_rate=0.0, seed=3)
    positives = tiny["patient_id"].isin(["patient00000", "patient00001", "patient00002"])
    tiny.loc[positives, "label"] = 1
    with pytest.raises(DataError, match=r"label 1 \(abnormal\) has only 3 patients.*--folds 3"):
        make_folds(tiny, k=5, seed=0)
    assert set(make_folds(tiny, k=3, seed=0)["fold"]) == {0, 1, 2}


def test_small_strata_do_not_warn(manifest_df):
    rare = manifest_df.copy()
    rare.loc[rare["patient_id"] == "patient00007", "body_part"] = "XR_RARE"  # a stratum smaller than k
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folds = make_folds(rare, k=5, seed=0)
    assert "XR_RARE" in set(folds["body_part"])


@pytest.mark.parametrize("fold", [0, 3, None])
def test_inner_val_split(folds, fold):
    train, val = inner_val_split(folds, fold, frac=0.1, seed=0)
    part = folds if fold is None else folds[folds["fold"] != fold]
    assert not set(train["patient_id"]) & set(val["patient_id"])
    assert set(train["study_id"]) | set(val["study_id"]) == set(part["study_id"])
    assert len(train) + len(val) == len(part)
    if fold is not None:
        assert not (set(train["study_id"]) | set(val["study_id"])) & set(folds.loc[folds["fold"] == fold, "study_id"])
    frac = val["patient_id"].nunique() / part["patient_id"].nunique()
    assert 0.07 < frac < 0.13, frac
    assert set(val["label"]) == {0, 1}

    again_train, again_val = inner_val_split(folds, fold, frac=0.1, seed=0)
    pd.testing.assert_frame_equal(again_val, val)
    pd.testing.assert_frame_equal(again_train, train)
    _, other_seed = inner_val_split(folds, fold, frac=0.1, seed=1)
    assert set(other_seed["study_id"]) != set(val["study_id"])


def test_inner_val_differs_between_folds(folds):
    _, val0 = inner_val_split(folds, 0)
    _, val1 = inner_val_split(folds, 1)
    assert set(val0["patient_id"]) != set(val1["patient_id"])


def test_inner_val_tiny_pool_keeps_both_labels():
    # 8 patients, 2 abnormal: a 10% split would hold < 1 patient; the fallback still puts one of each label in val.
    tiny = pd.DataFrame({"study_id": [f"s{i}" for i in range(8)], "patient_id": [f"p{i}" for i in range(8)],
                         "body_part": "XR_HAND", "label": [1, 1, 0, 0, 0, 0, 0, 0], "fold": 0})
    train, val = inner_val_split(tiny, None, frac=0.1, seed=0)
    assert set(val["label"]) == {0, 1} and set(train["label"]) == {0, 1}
    assert not set(train["patient_id"]) & set(val["patient_id"])


@pytest.mark.parametrize("fold", [0, 1, 2])
def test_inner_val_small_pool_stays_near_frac(fold):
    # ~27 training patients spread over 14 body_part|label strata, none with 10 members: fall back to label strata
    # instead of shrinking to 2-3 splits (which would put a third or half of the patients in inner val)
    folds = make_folds(synthetic_manifest(n_patients=40, n_holdout=0), k=3, seed=0)
    train, val = inner_val_split(folds, fold, frac=0.1, seed=0)
    n_val, n_all = val["patient_id"].nunique(), folds.loc[folds["fold"] != fold, "patient_id"].nunique()
    assert 1 <= n_val <= 0.15 * n_all, (n_val, n_all)
    assert set(val["label"]) == {0, 1} and not set(train["patient_id"]) & set(val["patient_id"])


def test_study_ids_to_rows_keeps_manifest_order(manifest_df, folds):
    ids = folds.loc[folds["fold"] == 2, "study_id"]
    rows = study_ids_to_rows(manifest_df, ids[::-1])
    assert set(rows["study_id"]) == set(ids)
    assert rows.index.is_monotonic_increasing
    assert len(rows) == manifest_df["study_id"].isin(set(ids)).sum()
    with pytest.raises(DataError, match="not in the manifest"):
        study_ids_to_rows(manifest_df, ["no/such/study"])


def test_cli_prints_table_and_writes(manifest_df, tmp_path, monkeypatch, capsys):
    from kd_fracture.cli import folds as folds_mod

    monkeypatch.setattr(folds_mod, "load_manifest", lambda data, **kw: FakeManifest(manifest_df))
    argv = ["--data", str(tmp_path), "--folds", "4", "--fold-seed", "2", "--manifests-dir", str(tmp_path / "m")]
    assert folds_mod.main(argv) == 0
    out = capsys.readouterr().out
    assert "pos_rate" in out and "XR_WRIST" in out and "written" in out
    assert (tmp_path / "m" / "toy" / "folds_k4_s2.csv").exists()
    assert folds_mod.main(argv) == 0 and "reused" in capsys.readouterr().out

    with pytest.raises(SystemExit) as e:
        folds_mod.main(["--help"])
    assert e.value.code == 0 and "--regenerate-folds" in capsys.readouterr().out


def test_cli_impossible_request_exits_2(tmp_path, monkeypatch, capsys):
    from kd_fracture.cli import folds as folds_mod

    tiny = synthetic_manifest(n_patients=4, n_holdout=0, seed=1)
    monkeypatch.setattr(folds_mod, "load_manifest", lambda data, **kw: FakeManifest(tiny))
    assert folds_mod.main(["--data", str(tmp_path), "--folds", "5", "--manifests-dir", str(tmp_path)]) == 2
    assert "error: --folds 5" in capsys.readouterr().err
    assert not any(Path(tmp_path).rglob("*.csv"))
