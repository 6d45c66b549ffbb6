"""Phantom dataset tree: renders every patient (in parallel if asked) into a hidden temp MURA-v1.1/ tree, writes
the CSVs and the marker, and renames it into place whole (`generate_phantom`); reads the marker back
(`phantom_info`) and keeps the cached default phantom (`ensure_default_phantom`).

Depends on kd_fracture.data.phantom.render and kd_fracture.data.phantom.anatomy.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np

from kd_fracture.data.phantom.anatomy import (BODY_PARTS, STUDIES_PER_PATIENT, SUBTLETY_POWER, VIEWS_PER_STUDY,
                                              sample_patient)
from kd_fracture.data.phantom.render import render_anatomy, render_study, render_study_view
from kd_fracture.errors import UserError
from kd_fracture.io import write_json, write_text

GENERATOR_VERSION = 3
"""Bump when the drawing changes, so cached phantoms (`ensure_default_phantom`) are regenerated."""
MARKER_NAME = "SYNTHETIC_PHANTOM.json"
"""Written inside MURA-v1.1/ before the tree is renamed into place: present <=> the tree is complete."""

DEFAULT_HOLDOUT_FRAC = 0.15
DEFAULT_ABNORMAL_FRAC = 0.4
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]


# ---------------------------------------------------------------------------------------------------------------
# Dataset tree
# ---------------------------------------------------------------------------------------------------------------
def _patient_rows(patient_index: int, *, tree: str, split: str, size: int, seed: int,
                  abnormal_frac: float) -> tuple[list[str], list[tuple[str, int]]]:
    """Render and write all images of one patient under `tree` (the future MURA-v1.1/ directory).

    Returns its image paths and (study path, label) rows, relative to the data root as in MURA's CSVs.
    Randomness comes only from SeedSequence([seed, patient_index]), so patients can be rendered in any order or
    process. It is split in two streams: the plan (studies, labels, subtlety, views) and the drawing, so the
    tree's structure and labels depend on (seed, patients, holdout_frac, abnormal_frac) only, not on the image
    size or on how images are drawn.
    """
    plan_rng, draw_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, patient_index]).spawn(2))
    body_part = BODY_PARTS[patient_index % len(BODY_PARTS)]
    n_studies = int(plan_rng.choice(STUDIES_PER_PATIENT[0], p=STUDIES_PER_PATIENT[1]))
    plan = [(bool(plan_rng.random() < abnormal_frac), float(plan_rng.random()) ** SUBTLETY_POWER,
             int(plan_rng.choice(VIEWS_PER_STUDY[0], p=VIEWS_PER_STUDY[1]))) for _ in range(n_studies)]

    anatomy = render_anatomy(draw_rng, sample_patient(draw_rng, body_part), size)
    images, studies = [], []
    for k, (abnormal, subtlety, n_views) in enumerate(plan, start=1):
        study = render_study(draw_rng, anatomy, abnormal, subtlety)
        label = "positive" if abnormal else "negative"
        study_dir = f"{split}/{body_part}/patient{patient_index + 1:05d}/study{k}_{label}"
        os.makedirs(os.path.join(tree, study_dir))
        for j in range(1, n_views + 1):
            png = cv2.imencode(".png", render_study_view(draw_rng, study, j - 1, size), _PNG_PARAMS)[1]
            # A plain write is enough here: the whole tree is private until it is renamed into place.
            with open(os.path.join(tree, study_dir, f"image{j}.png"), "wb") as f:
                f.write(png.tobytes())
            images.append(f"MURA-v1.1/{study_dir}/image{j}.png")
        studies.append((f"MURA-v1.1/{study_dir}/", int(abnormal)))
    return images, studies


def _params(patients: int, size: int, seed: int, holdout_frac: float, abnormal_frac: float) -> dict:
    """Everything the output bytes depend on (not `workers`), as stored in the marker."""
    return {"patients": patients, "size": size, "seed": seed, "holdout_frac": holdout_frac,
            "abnormal_frac": abnormal_frac}


def _split_sizes(patients: int, holdout_frac: float) -> tuple[int, int]:
    n_valid = max(1, int(round(patients * holdout_frac))) if holdout_frac > 0 else 0
    return patients - n_valid, n_valid


def _check_args(patients: int, size: int, holdout_frac: float, abnormal_frac: float) -> None:
    if not 0 <= holdout_frac < 1:
        raise UserError(f"holdout fraction {holdout_frac} must be in [0, 1)")
    if not 0 <= abnormal_frac <= 1:
        raise UserError(f"abnormal fraction {abnormal_frac} must be in [0, 1]")
    if not 16 <= size <= 1024:
        raise UserError(f"image size {size} px must be between 16 and 1024")
    n_train, _ = _split_sizes(patients, holdout_frac)
    if patients < 1 or n_train < 1:
        raise UserError(f"{patients} patients leave no training patients with holdout fraction {holdout_frac}; "
                        "use more patients")


def _read_marker(mura_dir: Path) -> dict | None:
    try:
        return json.loads((mura_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _remove_stale_temps(out: Path) -> None:
    """Delete temp trees left by killed generations (their owner pid is gone)."""
    for d in out.glob(".MURA-v1.1.*-*-*"):
        try:
            pid = int(d.name.split("-")[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def generate_phantom(out: str | Path, patients: int, size: int = 64, seed: int = 0,
                     holdout_frac: float = DEFAULT_HOLDOUT_FRAC, abnormal_frac: float = DEFAULT_ABNORMAL_FRAC,
                     workers: int = 1) -> Path:
    """Write a synthetic MURA-v1.1 tree under `out` and return `out` (the data root).

    Patients 1..n_train go to train/, the last round(holdout_frac * patients) to valid/ (disjoint, as in MURA);
    patient i has body part BODY_PARTS[(i - 1) % 7]. The tree is built in a hidden temp directory and renamed to
    `out/MURA-v1.1` only when complete, so an interrupted run never leaves a tree that looks finished. An existing
    phantom at `out` is replaced (kept if it has the same parameters: the bytes would be the same, and a concurrent
    twin may be reading it); an existing MURA-v1.1 that is not a phantom is refused.
    """
    _check_args(patients, size, holdout_frac, abnormal_frac)
    if workers < 1:
        raise UserError(f"--workers {workers}: need at least 1 process")
    out = Path(out)
    target = out / "MURA-v1.1"
    if target.exists() and _read_marker(target) is None:
        raise UserError(f"{target} exists and is not a synthetic phantom (no {MARKER_NAME}); "
                        "choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out / f".MURA-v1.1.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        marker = _write_tree(tmp, patients, size, seed, holdout_frac, abnormal_frac, workers)
        _commit(tmp, target, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_tree(tmp: Path, patients: int, size: int, seed: int, holdout_frac: float, abnormal_frac: float,
                workers: int) -> dict:
    n_train, n_valid = _split_sizes(patients, holdout_frac)
    counts = {}
    for split, indices in (("train", range(n_train)), ("valid", range(n_train, n_train + n_valid))):
        work = partial(_patient_rows, tree=str(tmp), split=split, size=size, seed=seed,
                       abnormal_frac=abnormal_frac)
        if workers > 1 and len(indices) > 1:
            # spawn, not fork: the parent may already hold torch / OpenMP threads
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                rows = list(pool.map(work, indices, chunksize=max(1, len(indices) // (4 * workers))))
        else:
            rows = [work(i) for i in indices]
        images = [p for img, _ in rows for p in img]
        studies = [s for _, st in rows for s in st]
        (tmp / split).mkdir(exist_ok=True)  # an empty valid/ still exists, like a real tree
        write_text(tmp / f"{split}_image_paths.csv", "".join(f"{p}\n" for p in images))
        write_text(tmp / f"{split}_labeled_studies.csv", "".join(f"{s},{y}\n" for s, y in studies))
        counts[split] = {"patients": len(indices), "studies": len(studies), "images": len(images),
                         "positive_studies": sum(y for _, y in studies)}
    marker = {
        "synthetic": True,
        "note": "SYNTHETIC phantom drawn by kd_fracture.data.synthetic: not real radiographs",
        "generator_version": GENERATOR_VERSION,
        "params": _params(patients, size, seed, holdout_frac, abnormal_frac),
        "counts": counts,
    }
    write_json(tmp / MARKER_NAME, marker)
    return marker


def _commit(tmp: Path, target: Path, marker: dict) -> None:
    """Rename the finished temp tree to `target`; replace an older phantom; tolerate a concurrent twin."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if not target.exists():
            raise
    existing = _read_marker(target)
    if existing is not None and existing.get("params") == marker["params"] \
            and existing.get("generator_version") == GENERATOR_VERSION:
        return  # another process just wrote the same bytes
    old = target.parent / f".MURA-v1.1.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def phantom_info(root: str | Path) -> dict | None:
    """The phantom's marker (parameters and counts) if `root` holds a complete phantom, else None."""
    root = Path(root)
    return _read_marker(root / "MURA-v1.1" if root.name != "MURA-v1.1" else root)


def phantom_dir_name(patients: int, size: int, seed: int, holdout_frac: float = DEFAULT_HOLDOUT_FRAC) -> str:
    """`phantom_p{patients}_px{size}_s{seed}`, plus `_h{percent}` when the holdout fraction is not the default."""
    holdout = "" if holdout_frac == DEFAULT_HOLDOUT_FRAC else f"_h{round(holdout_frac * 100)}"
    return f"phantom_p{patients}{holdout}_px{size}_s{seed}"


def ensure_default_phantom(cache_dir: str | Path = ".kd_fracture_cache", patients: int = 300, size: int = 64,
                           seed: int = 0, holdout_frac: float = DEFAULT_HOLDOUT_FRAC) -> Path:
    """Return `cache_dir/<phantom_dir_name(...)>`, generating it first if it is not complete.

    Complete = MURA-v1.1/SYNTHETIC_PHANTOM.json exists with the same parameters and generator version;
    anything else under that directory (a tree without marker, an older generator) is deleted and regenerated.
    """
    root = Path(cache_dir) / phantom_dir_name(patients, size, seed, holdout_frac)
    info = phantom_info(root)
    if (info is not None and info.get("generator_version") == GENERATOR_VERSION
            and info.get("params") == _params(patients, size, seed, holdout_frac, DEFAULT_ABNORMAL_FRAC)):
        return root
    print(f"generating a SYNTHETIC phantom dataset (not real radiographs; {patients} patients, {size} px, "
          f"seed {seed}, holdout fraction {holdout_frac}) in {root}", flush=True)
    if (root / "MURA-v1.1").exists():
        shutil.rmtree(root / "MURA-v1.1")  # incomplete or stale: our own cache directory
    return generate_phantom(root, patients=patients, size=size, seed=seed, holdout_frac=holdout_frac)
