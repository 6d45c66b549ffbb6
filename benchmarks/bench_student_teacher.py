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
    Runtime (CPU provider, same thread count). Forward passes of the two models alternate.

    student_latency_<backend>_<size> (issue 14): batch-1 latency, student ÷ teacher, at latency_small_size (64) and
    latency_img_size (224), target ≤ 0.15. At 224 px it is the batch-1 timing of 4b / 4d (one measurement, two
    targets); at 64 px both models are timed again (the student built for 64 px, ONNX exported at 64 px).

    Both models are timed in their served form (`models.for_inference`: eval mode, BatchNorm folded into the
    convolutions, issue #24), as predict, evaluate and the app run them; parameters are counted on the trained form."""
    from kd_fracture.config import DistillConfig
    from kd_fracture.models import count_params, create_model, export, for_inference

    s, res = ctx.settings, Result()
    size = s.latency_img_size
    torch_seed(0)
    trained = {"teacher": create_model(s.teacher, in_chans=3).eval(),
               "student": create_model(s.student, in_chans=DistillConfig().student.in_chans, img_size=size).eval()}
    models = {"teacher": (for_inference(trained["teacher"]), 3),
              "student": (for_inference(trained["student"]), DistillConfig().student.in_chans)}
    params = {k: count_params(m) for k, m in trained.items()}
    res.figures.append(Figure("4a", "parameters, student ÷ teacher", params["student"] / params["teacher"], 0.20,
                              "<=", "× (ratio)", meaning=f"{s.student} has this fraction of {s.teacher}'s parameters",
                              details=params))
    flops = {k: export.count_flops(m, c, size) for k, (m, c) in models.items()}
    res.measure(f"FLOPs per image at {size} px, student ÷ teacher", flops["student"] / flops["teacher"], "×")

    runners = _runners(models, size, ctx, res)
    batch1: dict[tuple[str, int], tuple[dict, dict]] = {}  # (backend, size) → (times, lat) at batch 1
    letters = iter("bcdefgh")
    for backend, make in runners.items():
        for batch, runs in zip(s.latency_batches, s.latency_runs):
            times, lat = _time_pair(make, models, batch, runs, s.latency_threads)
            if batch == 1:
                batch1[(backend, size)] = times, lat
            res.figures.append(Figure(
                f"4{next(letters)}", f"CPU latency, student ÷ teacher, {backend}, batch {batch}",
                ratio_median(times["student"], times["teacher"]), 0.25, "<=", "× (ratio)",
                meaning=f"a batch of {batch} at {size} px takes the student this fraction of the teacher's time "
                        f"({backend}, {s.latency_threads} thread(s))",
                details={"teacher_ms": lat["teacher"], "student_ms": lat["student"], "per_run_s": times, "batch": batch,
                         "img_size": size, "threads": s.latency_threads, "backend": backend}))
            for name in models:
                res.measure(f"{name} throughput, {backend}, batch {batch}", 1000 * batch / lat[name], "images/s")

    # student_latency: batch 1 at the small size too (and at `size` if latency_batches has no batch 1)
    small = s.latency_small_size
    if small != size:
        small_models = {"teacher": models["teacher"],
                        "student": (for_inference(create_model(s.student, in_chans=DistillConfig().student.in_chans,
                                                               img_size=small)), DistillConfig().student.in_chans)}
        small_runners = _runners(small_models, small, ctx, None)
        for backend, make in small_runners.items():
            batch1[(backend, small)] = _time_pair(make, small_models, 1, s.latency_small_runs, s.latency_threads)
    for backend, make in runners.items():
        if (backend, size) not in batch1:
            batch1[(backend, size)] = _time_pair(make, models, 1, s.latency_runs[0], s.latency_threads)
    for (backend, px), (times, lat) in sorted(batch1.items(), key=lambda kv: (kv[0][0] != "torch", kv[0][1])):
        res.figures.append(Figure(
            f"student_latency_{backend}_{px}", f"batch-1 CPU latency, student ÷ teacher, {backend}, {px} px",
            ratio_median(times["student"], times["teacher"]), 0.15, "<=", "× (ratio)",
            meaning=f"one {px}-px image takes the student this fraction of the teacher's time ({backend}, "
                    f"{s.latency_threads} thread(s))",
            details={"teacher_ms": lat["teacher"], "student_ms": lat["student"], "per_run_s": times, "batch": 1,
                     "img_size": px, "threads": s.latency_threads, "backend": backend, "runs": len(times["student"]),
                     **({"same_timing_as": "4b/4d (batch 1)"} if px == size and 1 in s.latency_batches else {})}))
    return res


def _runners(models: dict, size: int, ctx: Context, res: Result | None) -> dict[str, Callable]:
    """backend → make(name, batch) → a callable running one forward pass of model `name` at `size`. `res`: where
    to note a skipped ONNX Runtime (None: say nothing, it was said already)."""
    import torch

    s = ctx.settings

    def torch_runner(name: str, batch: int) -> Callable[[], Any]:
        model, chans = models[name]
        x = torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(batch))

        def run() -> None:
            with torch.inference_mode():
                model(x)
        return run

    runners: dict[str, Callable] = {"torch": torch_runner}
    if s.onnx:
        onnx_runner, why = _onnx_runners(models, size, ctx.work, s.latency_threads)
        if onnx_runner is None:
            if res is not None:
                res.notes.append(f"ONNX Runtime figures skipped: {why}")
        else:
            runners["onnxruntime"] = onnx_runner
    elif res is not None:
        res.notes.append("ONNX Runtime figures skipped in --quick (export takes longer than the whole smoke run)")
    return runners


def _time_pair(make: Callable, models: dict, batch: int, runs: int, threads: int) -> tuple[dict, dict]:
    """(seconds per run of each model, median ms of each) for `runs` alternated forward passes after a warm-up."""
    from kd_fracture.models import export

    arms = {name: make(name, batch) for name in models}
    with export.num_threads(threads):
        for fn in arms.values():
            fn()  # warm-up
        times = paired(arms, runs)
    return times, {k: 1000 * statistics.median(v) for k, v in times.items()}


def _onnx_runners(models: dict, size: int, work: Path, threads: int):
    """(make_runner(name, batch), None) over ONNX Runtime sessions of both models, or (None, reason)."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None, "onnx / onnxruntime are not installed (pip install 'kd_fracture[onnx]')"
    import onnxruntime as ort

    from kd_fracture.models import export

    sessions = {}
    for name, (model, chans) in models.items():
        path = work / f"{name}_{size}.onnx"
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
