"""Behaviour unchanged across refactors: a tiny cv + distill run reproduces stored reference numbers.

tests/data/reference_tiny_run.json was written by the code before the redesign of issue #16 (commit 10f608e) with
the same run; its distill part was rewritten once on purpose, when issue #13 gave every variant its own search on
inner-validation splits (`_about.updated`; KD_FRACTURE_UPDATE_REFERENCE="why" rewrites it, cv must not change). On the machine type that wrote it (same CPU model) the numbers must agree to float precision; other
CPUs may round differently in oneDNN kernels, so there only the ranking quality is compared, loosely.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from kd_fracture import cv, distill
from kd_fracture.data.phantom import generate_phantom
from kd_fracture.io import read_json

REFERENCE = Path(__file__).parent / "data" / "reference_tiny_run.json"


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def pick(m: dict) -> dict:
    return {"threshold": m["threshold"], "study": {k: m["study"][k] for k in ("kappa", "auroc", "f1", "brier")}}


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.fixture
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_run_reproduces_the_reference_numbers(tmp_path, _one_thread):
    root = generate_phantom(tmp_path / "tiny_phantom", patients=40, size=32, seed=0)
    run = tmp_path / "run"
    sets = {"data.root": root, "data.folds": 2, "data.img_size": 32, "data.manifests_dir": tmp_path / "manifests",
            "data.inner_val_frac": 0.2, "model.name": "resnet10t", "train.epochs": 1, "train.batch_size": 16,
            "train.warmup_epochs": 0, "eval.bootstrap": 50, "train.threads": 1}
    assert cv.main(["--out", str(run)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]) == 0
    assert distill.main(["--run", str(run), "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--study", "tiny",
                         "--n-trials", "2", "--student", "hybrid_t", "--epochs", "1", "--search-epochs", "1",
                         "--views", "2", "--set", "train.batch_size=16", "--set", "train.warmup_epochs=0",
                         "--set", "eval.bootstrap=50", "--set", "latency_threads=1", "--set", "onnx=false",
                         "--threads", "1"]) == 0
    got = {"cv": {f"fold_{k}": pick(read_json(run / f"fold_{k}" / "metrics.json")) for k in (0, 1)},
           "cv_holdout": pick(read_json(run / "holdout" / "metrics.json")["fold_ensemble"])}
    study = run / "distill" / "tiny"
    for v in ("hybrid_t_kd", "hybrid_t_no_kd"):
        got[v] = {f"fold_{k}": pick(read_json(study / "final" / v / f"fold_{k}" / "metrics.json")) for k in (0, 1)}
        got[v]["holdout"] = pick(read_json(study / "final" / v / "holdout" / "metrics.json")["fold_ensemble"])
    got["best_params"] = yaml.safe_load((study / "search" / "hybrid_t_kd" / "best_params.yaml").read_text())["params"]

    reference = json.loads(REFERENCE.read_text())
    about = reference.pop("_about")
    if os.environ.get("KD_FRACTURE_UPDATE_REFERENCE"):  # an intended change of results: say why in the commit
        assert got["cv"] == reference["cv"] and got["cv_holdout"] == reference["cv_holdout"], "cv changed too"
        REFERENCE.write_text(json.dumps({"_about": {**about, "cpu": cpu_model(), "torch": torch.__version__,
                                                    "updated": os.environ["KD_FRACTURE_UPDATE_REFERENCE"]},
                                         **got}, indent=1) + "\n")
        pytest.skip("reference numbers rewritten")
    want, have = flatten(reference), flatten(got)
    assert set(want) == set(have)
    if about["cpu"] == cpu_model():
        for key in want:
            assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    else:  # another CPU: kernels may round differently; the ranking must still be of the same quality
        for key in (k for k in want if k.endswith("study.auroc")):
            assert have[key] == pytest.approx(want[key], abs=0.15), key
