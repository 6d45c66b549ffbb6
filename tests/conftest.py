"""Shared fixtures: tiny synthetic phantoms built in a temporary directory (never `runs/` or the user cache)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be fetched from a hub
os.environ.setdefault("KD_FRACTURE_PROGRESS", "0")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.bf16` tests check what must hold under bf16 autocast on a CPU that runs it natively (the path
    `train.precision: auto` takes on an Intel Xeon with AMX); elsewhere they are skipped with the reason.
    KD_FRACTURE_CPU_BF16=1 runs them on any CPU (emulated bf16), =0 skips them on a bf16 CPU (docs: README, Tests)."""
    from kd_fracture.train import engine

    if engine.cpu_bf16_supported():
        return
    native = engine.cpu_has_native_bf16()
    reason = (f"{engine.CPU_BF16_ENV}=0 hides this CPU's bf16" if native else
              f"this CPU has no native bf16 (no avx512_bf16/amx_bf16); {engine.CPU_BF16_ENV}=1 runs it emulated")
    for item in items:
        if "bf16" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"bf16 check: {reason}"))


@pytest.fixture
def fp32_only(monkeypatch):
    """Make this process see a CPU without bf16 (`train.precision: auto` → fp32), as an AMD EPYC would."""
    monkeypatch.setenv("KD_FRACTURE_CPU_BF16", "0")


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory):
    """A MURA-v1.1-layout phantom of 40 patients at 32 px (≈ 200 images); returns the data root."""
    from kd_fracture.data.phantom import generate_phantom

    return generate_phantom(tmp_path_factory.mktemp("phantom") / "tiny_phantom", patients=40, size=32, seed=0)


@pytest.fixture
def tiny_cv_overrides(tiny_phantom, tmp_path):
    """Config overrides for a 2-fold × 1-epoch teacher run on the tiny phantom with a small timm model."""
    return {
        "run_dir": str(tmp_path / "run"),
        "data.root": str(tiny_phantom),
        "data.folds": 2,
        "data.img_size": 32,
        "data.manifests_dir": str(tmp_path / "manifests"),
        "data.inner_val_frac": 0.2,
        "model.name": "resnet10t",
        "train.epochs": 1,
        "train.batch_size": 16,
        "train.warmup_epochs": 0,
        "eval.bootstrap": 50,
        "train.state_interval_min": 0,  # state_last.pt every epoch, so resume tests can stop after any epoch
    }


def served_tiny_run(tiny_phantom, tmp):
    """A 2-fold × 1-epoch resnet10t cv run at 32 px under tmp/runs/phantom/resnet10t (so tmp/runs is a runs root),
    with a report.html: what the app serves in its tests."""
    from kd_fracture import cv

    run = tmp / "runs" / "phantom" / "resnet10t"
    overrides = {"run_dir": str(run), "data.root": str(tiny_phantom), "data.folds": 2, "data.img_size": 32,
                 "data.manifests_dir": str(tmp / "manifests"), "data.inner_val_frac": 0.2, "model.name": "resnet10t",
                 "train.epochs": 1, "train.batch_size": 16, "train.warmup_epochs": 0, "eval.bootstrap": 10}
    assert cv.main([a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]) == 0
    if not (run / "report.html").exists():
        (run / "report.html").write_text("<!doctype html><title>report</title><p>tiny run report</p>")
    return run


@pytest.fixture(scope="session")
def app_run_builder():
    """`served_tiny_run` as a fixture (tests cannot import conftest by name)."""
    return served_tiny_run

def copy_with_student(run, dest):
    """A copy of cv run `run` at `dest` with a distilled 'student' that is the teacher's own fold checkpoints (same
    architecture), laid out as distill writes it: distill/<study>/config.yaml and final/<variant>/{config.yaml,
    fold_<k>/}. For the app's tests, which need a student without running distill."""
    import shutil

    shutil.copytree(run, dest)
    study = dest / "distill" / "s1"
    variant = study / "final" / "resnet10t_kd"
    variant.mkdir(parents=True)
    (study / "config.yaml").write_text("student:\n  name: resnet10t\n")
    shutil.copy(run / "config.yaml", variant / "config.yaml")
    for fold in sorted(run.glob("fold_*")):
        (variant / fold.name).mkdir()
        for f in fold.glob("checkpoint_best.safetensors*"):
            shutil.copy(f, variant / fold.name / f.name)
    return dest


@pytest.fixture(scope="session")
def student_copy():
    """`copy_with_student` as a fixture (tests cannot import conftest by name)."""
    return copy_with_student


@pytest.fixture(scope="session")
def fake_run(tiny_phantom, tmp_path_factory):
    """config + two untrained resnet10t fold checkpoints at 32 px: all that evaluate reads from a run."""
    from kd_fracture.config import CVConfig, load_config
    from kd_fracture.models import create_model
    from kd_fracture.runs.rundir import RunDir
    from kd_fracture.train import checkpoint

    path = tmp_path_factory.mktemp("evaluate") / "run"
    cfg = load_config(CVConfig, None, {"run_dir": str(path), "data.root": str(tiny_phantom), "data.folds": 2,
                                       "data.img_size": 32, "model.name": "resnet10t", "eval.bootstrap": 20})
    RunDir(path).write_config(cfg)
    for k in (0, 1):
        torch.manual_seed(k)
        checkpoint.save_weights(create_model("resnet10t", img_size=32), path / f"fold_{k}" / checkpoint.BEST)
    return path
