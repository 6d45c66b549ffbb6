"""train.precision (issue 14): auto | fp32 | bf16 autocast, resolved per device, recorded, part of the cache key.

The parity test trains the same tiny run in fp32 and in bf16. On CPUs without native bf16 (avx512_bf16/AMX) the bf16
arm is emulated by oneDNN — slower, but numerically the same autocast — so the test runs everywhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
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


# ----------------------------------------------------------------------------------------------------------------------
# both kinds of CPU on any CPU (issue #29): KD_FRACTURE_CPU_BF16 makes this process see the other machine


@pytest.mark.parametrize("value, expected", [("0", "fp32"), ("1", "bf16")])
def test_the_environment_decides_what_auto_sees(monkeypatch, value, expected):
    monkeypatch.setenv(engine.CPU_BF16_ENV, value)
    assert engine.resolve_precision("auto", torch.device("cpu")) == expected
    assert engine.resolve_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit choice is never overridden
    monkeypatch.setenv(engine.CPU_BF16_ENV, "maybe")
    with pytest.raises(engine.UserError, match="KD_FRACTURE_CPU_BF16='maybe'"):
        engine.cpu_bf16_supported()


@pytest.fixture(scope="module")
def fold0_runs(tiny_phantom, tmp_path_factory):
    """Fold 0 of the tiny 2-fold × 1-epoch resnet10t run, three times: train.precision fp32, then auto on a CPU made
    to look like one without bf16 (an AMD EPYC), then auto on one made to look like one with it (emulated by oneDNN
    where the CPU lacks it). → {arm: run dir}."""
    tmp = tmp_path_factory.mktemp("precision_arms")
    base = {"data.root": tiny_phantom, "data.folds": 2, "data.img_size": 32, "data.manifests_dir": tmp / "manifests",
            "data.inner_val_frac": 0.2, "model.name": "resnet10t", "train.epochs": 1, "train.batch_size": 16,
            "train.warmup_epochs": 0, "eval.bootstrap": 10, "train.threads": 1}
    arms = {"fp32": ("fp32", None), "auto_without_bf16": ("auto", "0"), "auto_with_bf16": ("auto", "1")}
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for arm, (precision, env) in arms.items():
            if env is None:
                mp.delenv(engine.CPU_BF16_ENV, raising=False)
            else:
                mp.setenv(engine.CPU_BF16_ENV, env)
            over = dict(base, **{"train.precision": precision, "run_dir": tmp / arm})
            assert cv.main(cli_args(over) + ["--fold", "0"]) == 0
    torch.set_num_threads(threads)
    return {arm: tmp / arm for arm in arms}


def _fold0(run: Path) -> tuple[dict, np.ndarray]:
    env = json.loads((run / "env.json").read_text())
    probs = pd.read_csv(run / "fold_0" / "oof_predictions.csv")["prob"].to_numpy()
    return env, probs


def test_a_cpu_without_bf16_trains_exactly_the_fp32_run(fold0_runs):
    """What an AMD EPYC runs, on any CPU: `auto` where bf16 is not available is fp32, bit for bit."""
    env, probs = _fold0(fold0_runs["auto_without_bf16"])
    assert (env["precision"], env["cpu_bf16"]) == ("fp32", False)
    assert env["cpu_bf16_native"] == engine.cpu_has_native_bf16()
    _, fp32 = _fold0(fold0_runs["fp32"])
    np.testing.assert_array_equal(probs, fp32)
    a, b = (json.loads((fold0_runs[arm] / "fold_0" / "metrics.json").read_text()) for arm in ("fp32",
                                                                                              "auto_without_bf16"))
    assert a["study"] == b["study"] and a["threshold"] == b["threshold"]


def test_a_cpu_with_bf16_trains_under_bf16_autocast(fold0_runs):
    """What an Intel Xeon with AMX runs, on any CPU (emulated where the CPU lacks bf16, as torch allows on x86 and
    Arm): `auto` trains and scores under bf16 autocast, so the predictions are not the fp32 ones, yet close to them:
    every probability within 0.02 (bf16 keeps 8 mantissa bits; measured ≤ 0.003 on a Xeon with AMX)."""
    env, probs = _fold0(fold0_runs["auto_with_bf16"])
    assert (env["precision"], env["cpu_bf16"]) == ("bf16", True)
    _, fp32 = _fold0(fold0_runs["fp32"])
    assert not np.array_equal(probs, fp32)  # autocast acted
    assert np.abs(probs - fp32).max() <= 0.02, np.abs(probs - fp32).max()


def test_predictions_read_back_from_csv_reproduce_their_metrics(tmp_path):
    """bf16 logits take few distinct values, so a study probability can sit exactly on the decision threshold; the
    written oof_predictions.csv must read back to the same numbers (and so the same κ), not a shortest-repr float32
    that is another number (found under bf16: fold κ 0.0625 in metrics.json, 0.129 from its own CSV)."""
    from kd_fracture import io, metrics

    z = torch.linspace(-0.3, 0.3, 40).bfloat16().float().repeat(3)  # 40 bf16 logits, each on 3 images
    loader = [{"image": z[i:i + 16, None, None, None].expand(-1, 1, 2, 2)} for i in range(0, len(z), 16)]

    class Logit(torch.nn.Module):  # (B, 1, 2, 2) images whose pixels are the logit → (B, 1)
        def forward(self, x):
            return x[:, :, 0, 0]

    probs = engine.predict_probs(Logit(), loader, torch.device("cpu"), precision="fp32")
    pred = pd.DataFrame({"study_id": [f"s{i % 40}" for i in range(len(z))], "body_part": "XR_HAND",
                         "label": [i % 2 for i in range(len(z))], "prob": probs})
    threshold = float(metrics.study_table(pred)["prob"].iloc[17])  # a threshold equal to a study's probability
    io.write_csv(tmp_path / "pred.csv", pred)
    back = pd.read_csv(tmp_path / "pred.csv")
    np.testing.assert_array_equal(back["prob"].to_numpy(), pred["prob"].to_numpy())
    same = [json.dumps(metrics.evaluate(p, threshold)["study"], sort_keys=True) for p in (back, pred)]
    assert same[0] == same[1]
