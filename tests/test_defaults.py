"""Defaults never collide: the quick start, then the README's MURA-style commands, run one after the other in one
checkout, each into its own run directory and Optuna study (issue #16, item 8)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_fracture import cv, dashboard, distill
from kd_fracture.data.phantom import generate_phantom

TINY = ["--set", "data.phantom.size=32", "--img-size", "32", "--patients", "40", "--folds", "2", "--epochs", "1",
        "--model", "resnet10t", "--pretrained", "none", "--batch-size", "16", "--set", "train.warmup_epochs=0",
        "--set", "eval.bootstrap=20", "--threads", "1"]
DISTILL = ["--n-trials", "1", "--student", "hybrid_t", "--epochs", "1", "--search-epochs", "1", "--search-folds", "1",
           "--set", "train.batch_size=16", "--set", "eval.bootstrap=20", "--set", "latency_threads=1",
           "--set", "onnx=false", "--set", "student.pretrained=none", "--threads", "1"]


@pytest.fixture
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_quick_start_then_mura_style_commands(tmp_path, monkeypatch, capsys, _one_thread):
    monkeypatch.chdir(tmp_path)
    # quick start (scaled down): no --out, no --study, no --storage
    assert cv.main(TINY) == 0
    assert distill.main(DISTILL) == 2  # the default teacher run is runs/phantom/resnet50; this one is resnet10t
    assert "runs/phantom/resnet50: no teacher run here" in capsys.readouterr().err
    assert distill.main(["--run", "runs/phantom/resnet10t", *DISTILL]) == 0
    # the README's MURA recipe on a second dataset, after the quick start, exactly as written (no --out/--study)
    other = generate_phantom(tmp_path / "MURA", patients=40, size=32, seed=5)
    assert cv.main(["--data", str(other), *[a for a in TINY if a not in ("--patients", "40")]]) == 0
    assert distill.main(["--run", "runs/mura/resnet10t", *DISTILL]) == 0
    capsys.readouterr()

    phantom, mura = Path("runs/phantom/resnet10t"), Path("runs/mura/resnet10t")
    for run, dataset in ((phantom, "phantom"), (mura, "mura")):
        assert (run / "summary.md").exists() and (run / "holdout" / "metrics.json").exists()
        study = run / "distill" / f"{dataset}-resnet10t-hybrid_t"
        assert (study / "summary.md").exists(), sorted(p.name for p in (run / "distill").iterdir())
        assert (run / "distill" / f"{dataset}-resnet10t-hybrid_t.db").exists()
    assert not Path("studies").exists()  # nothing shared between the two runs
    # the dashboard finds the run's study database without --storage (the server itself is not started here)
    monkeypatch.setattr("optuna_dashboard.run_server", lambda storage, host, port: None)
    assert dashboard.main(["--run", str(mura)]) == 0
    assert "mura-resnet10t-hybrid_t.db" in capsys.readouterr().out
