"""train.precision (issue 14): auto | fp32 | bf16 autocast, resolved per device, recorded, part of the cache key.

The parity test trains the same tiny run in fp32 and in bf16. On CPUs without native bf16 (avx512_bf16/AMX) the bf16
arm is emulated by oneDNN — slower, but numerically the same autocast — so the test runs everywhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_fracture import cv
from kd_fracture.train import engine, teacher_cache


def cli_args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_picks_bf16_only_on_cpus_with_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(engine, "cpu_bf16_supported", lambda: native)
    cpu = torch.device("cpu")
    assert engine.resolve_precision("auto", cpu) == expected
    assert engine.resolve_precision("fp32", cpu) == "fp32"
    assert engine.resolve_precision("bf16", cpu) == "bf16"
    assert engine.resolve_precision("auto", cpu, amp=False) == expected  # amp is a CUDA switch


@pytest.mark.parametrize("bf16_gpu, expected", [(True, "bf16"), (False, "fp16")])
def test_cuda_keeps_amp_behaviour(monkeypatch, bf16_gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    gpu = torch.device("cuda")
    assert engine.resolve_precision("auto", gpu, amp=True) == expected
    assert engine.resolve_precision("auto", gpu, amp=False) == "fp32"
    assert engine.resolve_precision("fp32", gpu, amp=True) == "fp32"


def test_autocast_dtype_on_cpu():
    x = torch.randn(4, 8)
    w = torch.randn(8, 2)
    with engine.autocast(torch.device("cpu"), True, "bf16"):
        assert (x @ w).dtype == torch.bfloat16
    with engine.autocast(torch.device("cpu"), True, "fp32"):
        assert (x @ w).dtype == torch.float32


def test_unknown_precision_is_refused_before_anything_is_written(tiny_cv_overrides, capsys):
    over = dict(tiny_cv_overrides, **{"train.precision": "fp8"})
    rc = cv.main(cli_args(over))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "train.precision='fp8'" in err.strip().splitlines()[-1]
    assert not Path(over["run_dir"]).exists()


def test_teacher_cache_key_changes_with_precision(tmp_path):
    from kd_fracture.config import AugConfig, DataConfig, ModelConfig

    ckpt = tmp_path / "t.safetensors"
    ckpt.write_bytes(b"weights")
    args = (ckpt, ModelConfig(), DataConfig(), AugConfig(), 2, 0, ["a.png", "b.png"])
    keys = {p: teacher_cache._key(teacher_cache.cache_components(*args, precision=p)) for p in ("fp32", "bf16")}
    assert keys["fp32"] != keys["bf16"]


def _summary(run: Path) -> dict:
    rows = [json.loads((run / f"fold_{k}" / "metrics.json").read_text()) for k in (0, 1, 2)]
    return {m: np.array([r["study"][m] for r in rows]) for m in ("kappa", "auroc")}


@pytest.mark.slow
def test_bf16_matches_fp32_within_fold_noise(tiny_cv_overrides, tmp_path):
    """Same tiny 3-fold × 3-epoch run in fp32 and bf16: the mean κ and AUROC differ by less than the fold-to-fold
    spread (2 × the larger std over folds), and the recorded precision is the one asked for."""
    base = dict(tiny_cv_overrides, **{"data.folds": 3, "train.epochs": 3, "model.name": "resnet10t"})
    runs = {}
    for p in ("fp32", "bf16"):
        over = dict(base, **{"train.precision": p, "run_dir": str(tmp_path / p)})
        assert cv.main(cli_args(over)) == 0
        assert json.loads((tmp_path / p / "env.json").read_text())["precision"] == p
        runs[p] = _summary(tmp_path / p)
    for m in ("kappa", "auroc"):
        a, b = runs["fp32"][m], runs["bf16"][m]
        noise = 2 * max(a.std(ddof=1), b.std(ddof=1), 0.02)
        assert abs(a.mean() - b.mean()) <= noise, (m, a, b)


def test_pretrained_weight_keys_carry_the_precision_only_when_not_fp32(monkeypatch):
    """fp32 keeps the keys the package used before train.precision existed (cached phantom weights stay valid);
    a bf16 machine builds its own."""
    from kd_fracture.config import CVConfig, DistillConfig, replace
    from kd_fracture.pipelines import pretraining

    cv, dcfg = CVConfig(), DistillConfig()
    paths = lambda cfg: (pretraining.weights_path(cfg), pretraining.student_weights_path(dcfg, cfg, True),  # noqa: E731
                         pretraining.student_weights_path(dcfg, cfg, False))
    monkeypatch.setattr(engine, "cpu_bf16_supported", lambda: False)
    fp32 = paths(cv)
    assert paths(replace(cv, **{"train.precision": "fp32"})) == fp32
    monkeypatch.setattr(engine, "cpu_bf16_supported", lambda: True)
    bf16 = paths(cv)
    assert all(a != b for a, b in zip(fp32, bf16))
    assert paths(replace(cv, **{"train.precision": "fp32"})) == fp32
