"""Optional extras degrade cleanly: without grad-cam, onnx and onnxruntime, `cv` and `distill` run to the end, each
skipped figure or export named in one line with the extra to install, and a rerun that switches ONNX off is not a
conflicting rerun."""
from __future__ import annotations

import json
import sys

import pytest

from kd_fracture import cv, distill, extras

BLOCKED = ("pytorch_grad_cam", "onnx", "onnxruntime")


@pytest.fixture
def base_install(monkeypatch):
    """The optional packages made unimportable, as in `pip install -e .` without extras."""
    for name in BLOCKED:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ModuleNotFoundError


def test_optional_returns_none_and_names_the_extra(base_install, capsys):
    assert extras.optional("pytorch_grad_cam", "gradcam", "plots/gradcam_examples.png") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["plots/gradcam_examples.png skipped: pytorch_grad_cam is not installed "
                   "(pip install 'kd_fracture[gradcam]')"]
    assert extras.optional("json", "none", "x") is json


def test_a_broken_installed_package_is_not_mistaken_for_a_missing_extra(monkeypatch, tmp_path):
    (tmp_path / "brokenpkg.py").write_text("import module_that_does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError):
        extras.optional("brokenpkg", "x", "y")


def test_cv_and_distill_finish_without_extras(base_install, tiny_cv_overrides, tmp_path, capsys):
    over = {**tiny_cv_overrides, "train.threads": 1}
    assert cv.main([a for k, v in over.items() for a in ("--set", f"{k}={v}")]) == 0
    run = tmp_path / "run"
    assert (run / "summary.md").exists() and (run / "plots" / "sample_predictions.png").exists()
    assert not (run / "plots" / "gradcam_examples.png").exists()
    assert "gradcam_examples.png skipped: pytorch_grad_cam is not installed" in capsys.readouterr().err

    args = ["--run", str(run), "--storage", f"sqlite:///{tmp_path / 'study.db'}", "--study", "tiny",
            "--n-trials", "1", "--student", "hybrid_t", "--epochs", "1", "--search-epochs", "1", "--views", "1",
            "--set", "train.batch_size=16", "--set", "eval.bootstrap=50", "--set", "latency_threads=1",
            "--set", "variants=[kd]", "--threads", "1"]
    assert distill.main(args) == 0
    out = run / "distill" / "tiny"
    err = capsys.readouterr().err
    assert "student.onnx skipped: onnx is not installed (pip install 'kd_fracture[onnx]')" in err
    assert (out / "summary.md").exists() and (out / "tables" / "teacher_vs_student.csv").exists()
    assert not (out / "student.onnx").exists()

    # ONNX is output-only: switching it off on the same run is not a conflicting rerun
    assert distill.main([*args, "--set", "onnx=false"]) == 0
    assert "differs" not in capsys.readouterr().err
