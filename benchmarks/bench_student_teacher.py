"""Benchmark 4, `student_teacher`: student ÷ teacher parameters and CPU latency (torch and ONNX Runtime)."""
from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from common import Context, Figure, Result, paired, ratio_median, torch_seed


def run(ctx: Context) -> Result:
    """Parameters, CPU latency (batch 1 and 32 at 224 px) and throughput of the default student vs the teacher,
    each with its own input (teacher: 3 replicated channels; student: 1), in torch (inference_mode) and in ONNX
    Runtime (CPU provider, same thread count). Forward passes of the two models alternate."""
    import torch

    from kd_fracture.config import DistillConfig
    from kd_fracture.models import count_params, create_model, export

    s, res = ctx.settings, Result()
    size = s.latency_img_size
    torch_seed(0)
    models = {"teacher": (create_model(s.teacher, in_chans=3).eval(), 3),
              "student": (create_model(s.student, in_chans=DistillConfig().student.in_chans, img_size=size).eval(),
                          DistillConfig().student.in_chans)}
    params = {k: count_params(m) for k, (m, _) in models.items()}
    res.figures.append(Figure("4a", "parameters, student ÷ teacher", params["student"] / params["teacher"], 0.20,
                              "<=", "× (ratio)", meaning=f"{s.student} has this fraction of {s.teacher}'s parameters",
                              details=params))
    flops = {k: export.count_flops(m, c, size) for k, (m, c) in models.items()}
    res.measure(f"FLOPs per image at {size} px, student ÷ teacher", flops["student"] / flops["teacher"], "×")

    def torch_runner(name: str, batch: int) -> Callable[[], Any]:
        model, chans = models[name]
        x = torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(batch))

        def run() -> None:
            with torch.inference_mode():
                model(x)
        return run

    runners = {"torch": torch_runner}
    if s.onnx:
        onnx_runner, why = _onnx_runners(models, size, ctx.work, s.latency_threads)
        if onnx_runner is None:
            res.notes.append(f"ONNX Runtime figures skipped: {why}")
        else:
            runners["onnxruntime"] = onnx_runner
    else:
        res.notes.append("ONNX Runtime figures skipped in --quick (export takes longer than the whole smoke run)")

    letters = iter("bcdefgh")
    for backend, make in runners.items():
        for batch, runs in zip(s.latency_batches, s.latency_runs):
            arms = {name: make(name, batch) for name in models}
            with export.num_threads(s.latency_threads):
                for fn in arms.values():
                    fn()  # warm-up
                times = paired(arms, runs)
            lat = {k: 1000 * statistics.median(v) for k, v in times.items()}
            res.figures.append(Figure(
                f"4{next(letters)}", f"CPU latency, student ÷ teacher, {backend}, batch {batch}",
                ratio_median(times["student"], times["teacher"]), 0.25, "<=", "× (ratio)",
                meaning=f"a batch of {batch} at {size} px takes the student this fraction of the teacher's time "
                        f"({backend}, {s.latency_threads} thread(s))",
                details={"teacher_ms": lat["teacher"], "student_ms": lat["student"], "per_run_s": times, "batch": batch,
                         "img_size": size, "threads": s.latency_threads, "backend": backend}))
            for name in models:
                res.measure(f"{name} throughput, {backend}, batch {batch}", 1000 * batch / lat[name], "images/s")
    return res


def _onnx_runners(models: dict, size: int, work: Path, threads: int):
    """(make_runner(name, batch), None) over ONNX Runtime sessions of both models, or (None, reason)."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None, "onnx / onnxruntime are not installed (pip install 'kd_fracture[onnx]')"
    import onnxruntime as ort

    from kd_fracture.models import export

    sessions = {}
    for name, (model, chans) in models.items():
        path = work / f"{name}.onnx"
        export.export_onnx(model, path, chans, size)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sessions[name] = (ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), chans)

    def make(name: str, batch: int) -> Callable[[], Any]:
        session, chans = sessions[name]
        x = np.random.default_rng(batch).standard_normal((batch, chans, size, size), dtype=np.float32)
        feed = {session.get_inputs()[0].name: x}
        return lambda: session.run(None, feed)

    return make, None
