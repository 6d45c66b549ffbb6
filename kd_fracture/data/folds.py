"""Patient-grouped, stratified cross-validation folds (docs/design.md §3).

Folds are made over **studies** (MURA's unit of diagnosis) with `StratifiedGroupKFold`: `y = body_part|label`
keeps every fold's case mix close to the pool's, `groups = patient_id` keeps all studies of a patient in one fold,
so no patient's anatomy is seen in training and scored in the same fold.

Folds are data: written once to `data_manifests/<dataset>/folds_k{K}_s{seed}.csv` with a JSON sidecar holding the
manifest's sha256, checked on every load, never re-split by training code.

    python -m kd_fracture.data.folds --data ROOT --folds 5 --seed 0
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from kd_fracture.errors import ConfigError, DataError
from kd_fracture.io import read_json, write_csv, write_json

if TYPE_CHECKING:
    from kd_fracture.data.manifest import Manifest

FOLD_COLUMNS = ["study_id", "patient_id", "body_part", "label", "fold"]
_LABEL_NAMES = {0: "normal", 1: "abnormal"}


def _split_quietly(cv: StratifiedGroupKFold, y: np.ndarray, groups: np.ndarray):
    """`cv.split` without sklearn's warning about strata smaller than n_splits (rare body part × label cells are
    expected; the label-level check in `_check_feasible` is the one that matters)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class in y has only", category=UserWarning)
        return list(cv.split(np.zeros(len(y)), y, groups))


def _strata(studies: pd.DataFrame) -> np.ndarray:
    return (studies["body_part"].astype(str) + "|" + studies["label"].astype(str)).to_numpy()


def pool_studies(df: pd.DataFrame) -> pd.DataFrame:
    """One row per study of the CV pool (`split == "train"`): study_id, patient_id, body_part, label; by study_id."""
    missing = [c for c in ("study_id", "patient_id", "body_part", "label", "split") if c not in df.columns]
    if missing:
        raise DataError(f"manifest: missing columns {missing}; rebuild it with kd_fracture.data.manifest")
    pool = df[df["split"] == "train"]
    if pool.empty:
        raise DataError("manifest: the CV pool (split == 'train') is empty; check the data root")
    studies = pool.groupby("study_id", sort=True).agg(
        patient_id=("patient_id", "first"), body_part=("body_part", "first"), label=("label", "first"),
        n_patients=("patient_id", "nunique"), n_labels=("label", "nunique"))
    bad = studies[(studies["n_patients"] > 1) | (studies["n_labels"] > 1)]
    if len(bad):
        raise DataError(f"manifest: study {bad.index[0]!r} has images of several patients or labels; "
                        "a study must belong to one patient and have one label")
    studies = studies.drop(columns=["n_patients", "n_labels"]).reset_index()
    studies["label"] = studies["label"].astype(int)
    return studies


def _check_feasible(studies: pd.DataFrame, k: int) -> None:
    """Each fold must be able to hold at least one patient of each label, else its AUROC/κ are undefined."""
    if k < 2:
        raise DataError(f"--folds {k}: cross-validation needs at least 2 folds")
    counts = {label: studies.loc[studies["label"] == label, "patient_id"].nunique() for label in (0, 1)}
    label = min(counts, key=counts.get)  # the scarcer label limits K
    if counts[label] < k:
        n = counts[label]
        fix = f"use --folds {n} or fewer, or add data" if n >= 2 else "add data (at least 2 patients per label)"
        raise DataError(f"--folds {k}: label {label} ({_LABEL_NAMES[label]}) has only {n} patients in the CV pool, "
                        f"but every fold needs at least one; {fix}")


def make_folds(df: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """Assign each CV-pool study to one of `k` folds; returns FOLD_COLUMNS sorted by study_id (fold in 0..k-1).

    `StratifiedGroupKFold(k, shuffle=True, random_state=seed)` over studies, `y = body_part|label`,
    `groups = patient_id`. Deterministic in (manifest, k, seed, sklearn version).
    """
    studies = pool_studies(df)
    _check_feasible(studies, k)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.full(len(studies), -1, dtype=np.int64)
    for f, (_, scored_idx) in enumerate(_split_quietly(cv, _strata(studies), studies["patient_id"].to_numpy())):
        fold[scored_idx] = f
    studies["fold"] = fold
    for f in range(k):  # the greedy assignment can, on tiny pools, leave a fold without one label
        labels = set(studies.loc[studies["fold"] == f, "label"])
        if labels != {0, 1}:
            raise DataError(f"--folds {k} --seed {seed}: fold {f} would get no studies with label "
                            f"{sorted({0, 1} - labels)}; use fewer folds or another seed")
    assert_patient_disjoint(studies)
    return studies[FOLD_COLUMNS]


def assert_patient_disjoint(folds: pd.DataFrame) -> None:
    """Raise AssertionError naming the patients whose studies fall into more than one fold."""
    n_folds = folds.groupby("patient_id")["fold"].nunique()
    leaked = n_folds[n_folds > 1].index.tolist()
    if leaked:
        shown = ", ".join(
            f"{p} (folds {sorted(folds.loc[folds['patient_id'] == p, 'fold'].unique().tolist())})" for p in leaked[:10])
        more = f" and {len(leaked) - 10} more" if len(leaked) > 10 else ""
        raise AssertionError(f"{len(leaked)} patients appear in several folds: {shown}{more}")


def fold_summary(folds: pd.DataFrame) -> pd.DataFrame:
    """Per fold: studies, patients, positives (abnormal studies), pos_rate, then studies per body part."""
    g = folds.groupby("fold")
    summary = pd.DataFrame({
        "studies": g.size(),
        "patients": g["patient_id"].nunique(),
        "positives": g["label"].sum().astype(int),
    })
    summary["pos_rate"] = (summary["positives"] / summary["studies"]).round(3)
    per_part = pd.crosstab(folds["fold"], folds["body_part"])
    return summary.join(per_part).reset_index()


def folds_path(manifests_dir: str | Path, name: str, k: int, seed: int) -> Path:
    return Path(manifests_dir) / name / f"folds_k{k}_s{seed}.csv"


def _sidecar(folds: pd.DataFrame, manifest_sha: str, name: str, k: int, seed: int) -> dict:
    import sklearn

    import kd_fracture

    per_fold = fold_summary(folds)[["fold", "studies", "patients", "positives"]]
    return {
        "manifest_sha256": manifest_sha,
        "manifest_name": name,
        "k": k,
        "seed": seed,
        "n_studies": int(len(folds)),
        "n_patients": int(folds["patient_id"].nunique()),
        "per_fold": per_fold.astype(int).to_dict(orient="records"),
        "created_with": kd_fracture.__version__,
        "sklearn": sklearn.__version__,
    }


def read_folds_csv(path: Path) -> pd.DataFrame:
    try:
        folds = pd.read_csv(path, dtype={"study_id": str, "patient_id": str, "body_part": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot parse folds CSV ({e}); pass --regenerate-folds to rebuild it") from None
    missing = [c for c in FOLD_COLUMNS if c not in folds.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; pass --regenerate-folds to rebuild it")
    return folds[FOLD_COLUMNS]


def _check_reused(path: Path, folds: pd.DataFrame, studies: pd.DataFrame, k: int) -> None:
    """A reused folds CSV must cover exactly the pool's studies, agree with the manifest, and be patient-disjoint."""
    regen = "pass --regenerate-folds to rebuild them"
    have, want = set(folds["study_id"]), set(studies["study_id"])
    if have != want or len(folds) != len(want):
        missing, extra = sorted(want - have), sorted(have - want)
        raise DataError(f"{path}: folds list {len(folds)} studies but the manifest's CV pool has {len(want)} "
                        f"(missing {missing[:3]}, unknown {extra[:3]}); {regen}")
    bad_fold = ~folds["fold"].isin(range(k))
    if bad_fold.any():
        row = int(np.flatnonzero(bad_fold)[0]) + 2  # +1 header, +1 one-based
        raise DataError(f"{path} line {row}: fold {folds['fold'].iloc[row - 2]!r} is not in 0..{k - 1}; {regen}")
    merged = folds.merge(studies, on="study_id", suffixes=("", "_manifest"))
    for col in ("patient_id", "label"):
        differ = merged[merged[col].astype(str) != merged[f"{col}_manifest"].astype(str)]
        if len(differ):
            sid = differ["study_id"].iloc[0]
            raise DataError(f"{path}: study {sid!r} has {col} {differ[col].iloc[0]!r} but the manifest says "
                            f"{differ[f'{col}_manifest'].iloc[0]!r}; {regen}")
    try:
        assert_patient_disjoint(folds)
    except AssertionError as e:
        raise DataError(f"{path}: {e}; {regen}") from None


def load_or_make_folds(manifest: Manifest, k: int, seed: int, manifests_dir: str | Path = "data_manifests",
                       regenerate: bool = False) -> tuple[pd.DataFrame, Path]:
    """Folds of `manifest` from `<manifests_dir>/<name>/folds_k{k}_s{seed}.csv`, made and written if absent.

    Reused only if the JSON sidecar's manifest sha256 equals `manifest.sha256()`; otherwise DataError (a fold file
    made for other data silently reused would leak or drop patients). `regenerate=True` rebuilds and overwrites.
    Returns (folds, csv_path).
    """
    path = folds_path(manifests_dir, manifest.name, k, seed)
    sidecar_path = path.with_suffix(".json")
    sha = manifest.sha256()
    studies = pool_studies(manifest.df)
    if path.exists() and not regenerate:
        if not sidecar_path.exists():
            raise DataError(f"{path}: its sidecar {sidecar_path.name} is missing, so the folds cannot be checked "
                            "against the manifest; pass --regenerate-folds to rebuild them")
        meta = read_json(sidecar_path)
        if meta.get("manifest_sha256") != sha:
            raise DataError(f"{path}: folds were made for a different manifest (sha256 "
                            f"{str(meta.get('manifest_sha256'))[:12]}… ≠ {sha[:12]}…); "
                            "pass --regenerate-folds to rebuild them")
        if (meta.get("k"), meta.get("seed")) != (k, seed):
            raise DataError(f"{sidecar_path}: says k={meta.get('k')} seed={meta.get('seed')} but the file name says "
                            f"k={k} seed={seed}; pass --regenerate-folds to rebuild them")
        folds = read_folds_csv(path)
        _check_reused(path, folds, studies, k)
        return folds.sort_values("study_id", kind="stable").reset_index(drop=True), path
    folds = make_folds(manifest.df, k, seed)
    # sidecar first: a CSV never exists without its sidecar, so concurrent jobs (`cv --fold k` array tasks starting
    # together) never see half a pair; they make the same folds (deterministic) and write the same bytes
    write_json(sidecar_path, _sidecar(folds, sha, manifest.name, k, seed))
    write_csv(path, folds)
    return folds, path


def _largest_stratum(strata: np.ndarray) -> int:
    return int(np.unique(strata, return_counts=True)[1].max())


def _inner_seed(seed: int, fold: int | None) -> int:
    """Distinct, reproducible random_state for each (seed, fold); fold=None (refit) gets its own stream."""
    words = [int(seed) % (1 << 32), 0 if fold is None else int(fold) + 1]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def inner_val_split(folds: pd.DataFrame, fold: int | None, frac: float = 0.1,
                    seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the training part of `fold` (every other fold; fold=None: the whole pool) into (train, inner_val).

    Grouped by patient and stratified by body_part|label: `StratifiedGroupKFold(n_splits=round(1/frac))`, split 0
    becomes inner validation (≈ frac of the patients). Tiny data: if no body_part|label stratum has n_splits
    members (sklearn's requirement), stratify by label only; if a label is still missing from inner val, one patient
    of that label is moved there when train keeps at least one. Deterministic in (seed, fold).
    Both frames have FOLD_COLUMNS, sorted by study_id; neither contains fold `fold`'s studies.
    """
    if not 0 < frac <= 0.5:
        raise ConfigError(f"inner_val_frac={frac}: must be in (0, 0.5]")
    part = folds if fold is None else folds[folds["fold"] != fold]
    part = part.sort_values("study_id", kind="stable").reset_index(drop=True)
    patients = part["patient_id"].unique()
    if len(patients) < 2:
        raise DataError(f"fold {fold}: its training part has {len(patients)} patient(s); "
                        "an inner validation split needs at least 2")
    n_splits = min(max(2, round(1 / frac)), len(patients))  # sklearn: n_splits <= #groups
    strata = _strata(part)
    if _largest_stratum(strata) < n_splits:  # sklearn also needs one stratum >= n_splits: tiny pools use label only
        strata = part["label"].astype(str).to_numpy()
        n_splits = min(n_splits, _largest_stratum(strata))
    val_patients: set[str] = set()
    if n_splits >= 2:
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=_inner_seed(seed, fold))
        _, val_idx = _split_quietly(cv, strata, part["patient_id"].to_numpy())[0]
        val_patients = set(part.loc[val_idx, "patient_id"])

    rng = np.random.default_rng(_inner_seed(seed, fold))
    for label in (0, 1):
        in_val = part["patient_id"].isin(val_patients)
        if (part.loc[in_val, "label"] == label).any():
            continue
        candidates = np.sort(part.loc[~in_val & (part["label"] == label), "patient_id"].unique())
        if len(candidates) >= 2:  # leave train at least one patient of this label
            val_patients.add(candidates[rng.integers(len(candidates))])

    in_val = part["patient_id"].isin(val_patients)
    return part[~in_val].reset_index(drop=True), part[in_val].reset_index(drop=True)


def study_ids_to_rows(df: pd.DataFrame, study_ids: Iterable[str]) -> pd.DataFrame:
    """Manifest image rows of `study_ids`, in `df`'s order and with `df`'s index (reset it for a Dataset)."""
    wanted = set(study_ids)
    rows = df[df["study_id"].isin(wanted)]
    missing = wanted - set(rows["study_id"])
    if missing:
        raise DataError(f"{len(missing)} studies of the folds are not in the manifest (e.g. {sorted(missing)[:3]}); "
                        "pass --regenerate-folds to rebuild the folds")
    return rows


def format_fold_summary(folds: pd.DataFrame) -> str:
    table = fold_summary(folds)
    total = table.drop(columns=["fold"]).sum(numeric_only=True)
    total["patients"] = folds["patient_id"].nunique()
    total["pos_rate"] = round(total["positives"] / total["studies"], 3)
    table = pd.concat([table.astype({"fold": str}), pd.DataFrame([{"fold": "all", **total.to_dict()}])])
    ints = [c for c in table.columns if c not in ("fold", "pos_rate")]
    return table.astype({c: int for c in ints}).to_string(index=False)
