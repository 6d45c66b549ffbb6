"""The GPU code paths that also run on the CPU (issue #23): train.compile and its fallback, CUDA out of memory as
one line, the GPU benchmark without a GPU. (The batched augmentation is tests/test_batch_aug.py; `--jobs` is in
tests/test_cv.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_fracture import cv
from kd_fracture.config import TrainConfig
from kd_fracture.train import engine

ROOT = Path(__file__).resolve().parents[1]


def cli_args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def test_compile_auto_is_off_on_the_cpu_and_for_short_fits_on_cuda():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not engine.use_compile(TrainConfig(), cpu, 10**6)
    assert not engine.use_compile(TrainConfig(), gpu, engine.COMPILE_MIN_STEPS - 1)
    assert engine.use_compile(TrainConfig(), gpu, engine.COMPILE_MIN_STEPS)
    assert engine.use_compile(TrainConfig(compile="on"), cpu, 1)
    assert not engine.use_compile(TrainConfig(compile="off"), gpu, 10**6)
    with pytest.raises(engine.UserError, match="train.compile='yes'"):
        engine.use_compile(TrainConfig(compile="yes"), cpu, 1)


def test_a_failing_compile_falls_back_to_eager_with_one_line(tiny_cv_overrides, monkeypatch, capsys, tmp_path):
    """train.compile on, with a compiler that fails at its first call (as inductor does without a C compiler): one
    warning line, and the fold trains eagerly to exactly the numbers of train.compile off."""

    def broken_compile(module, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("inductor: no working C++ compiler found\nlong traceback text")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    over = dict(tiny_cv_overrides, **{"train.precision": "fp32", "train.threads": 1})
    runs, warnings = {}, {}
    for mode in ("on", "off"):
        runs[mode] = tmp_path / mode
        assert cv.main(cli_args(dict(over, **{"train.compile": mode, "run_dir": runs[mode]})) + ["--fold", "0"]) == 0
        err = capsys.readouterr().err
        assert "Traceback" not in err
        warnings[mode] = [line for line in err.splitlines() if "torch.compile failed" in line]
    assert len(warnings["on"]) == 1 and not warnings["off"]
    assert "RuntimeError: inductor: no working C++ compiler found)" in warnings["on"][0]
    a, b = (json.loads((runs[m] / "fold_0" / "metrics.json").read_text()) for m in ("on", "off"))
    assert a["study"] == b["study"]


def test_compiled_steps_keep_the_eager_state_dict():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    wrapped = engine.CompiledOrEager(model)
    assert list(wrapped.module.state_dict()) == list(model.state_dict())
    assert engine.unwrap(model) is model and len(list(wrapped.parameters())) == len(list(model.parameters()))


def test_cuda_out_of_memory_is_one_line_naming_the_batch(tiny_cv_overrides, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "train_one_epoch", out_of_memory)
    rc = cv.main(cli_args(tiny_cv_overrides) + ["--fold", "0"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err, err
    assert "out of GPU memory at train.batch_size=16" in last and "--set train.batch_size=8" in last
    fold = Path(tiny_cv_overrides["run_dir"]) / "fold_0"
    assert not (fold / "DONE").exists()


def test_gpu_benchmark_without_cuda_says_so_and_exits_0(tmp_path):
    """`python benchmarks/bench_gpu.py` on a machine without CUDA: one line, exit 0, nothing written."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env={"CUDA_VISIBLE_DEVICES": "",
                                                                           "PATH": "/usr/bin:/bin",
                                                                           "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert lines == ["bench_gpu: no CUDA device found; nothing measured (run it on a machine with an NVIDIA GPU)"]
    assert not out.exists()


@pytest.mark.slow
def test_gpu_benchmark_runs_every_section_at_toy_sizes(tmp_path):
    """`bench_gpu.py --smoke` runs the ceilings, the recipe at both batches and both quick starts on the CPU at toy
    sizes (≈ 1 min), so a GPU user does not meet a broken script: gpu.json and gpu.md with every figure id."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ids = {f["id"] for f in result["figures"]}
    assert {"recipe_vs_ceiling", "recipe_ips_gpu_batch", "mura_5fold_min", "quickstart_cold_s", "quickstart_warm_s",
            "gpu_util_recipe", "student_train_gpu", "student_latency_gpu", "student_latency_gpu_ms"} <= ids
    recipe = result["details"]["recipe"]
    assert all(r["train_ips"] > 0 and r["eval_ips"] > 0 for r in recipe.values())
    assert set(result["details"]["quickstart"]) == {"cold", "warm"}
    assert "| `mura_5fold_min` |" in out.with_suffix(".md").read_text()
