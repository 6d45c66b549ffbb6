"""Benchmark 9, `student_gflops`: achieved GFLOP/s of the student's training step ÷ the teacher's."""
from __future__ import annotations

import statistics

from common import Context, Figure, Result, paired, ratio_median, run_epoch, torch_seed, train_step_flops, trainer


def run(ctx: Context) -> Result:
    """Training steps of the default student (distill's train settings, 1 channel) and of the teacher (cv's train
    settings, 3 channels), both at the same image size and batch size, over the same number of batches held in
    memory (compute only, no loader), alternated: `engine.train_one_epoch` with a supervised BCE task, models in
    channels_last as `engine.fit` puts them (train.channels_last), each config's own `train.precision`.
    FLOPs per image's step = 3 × forward (`common.train_step_flops`, the count teacher_cache uses).
    Figure = (student FLOPs / student s) ÷ (teacher FLOPs / teacher s), median over repeats of the per-repeat value.
    """
    import torch

    from kd_fracture.config import CVConfig, DistillConfig, replace
    from kd_fracture.models import count_params, create_model
    from kd_fracture.train import tasks

    s, res = ctx.settings, Result()
    dcfg, tcfg = DistillConfig(), CVConfig()
    size = s.gflops_img_size
    batch = s.gflops_batch or dcfg.train.batch_size
    torch_seed(0)
    arms = {"student": (create_model(s.student, in_chans=dcfg.student.in_chans, img_size=size,
                                     drop_rate=dcfg.student.drop_rate), dcfg.student.in_chans,
                        replace(dcfg.train, batch_size=batch)),
            "teacher": (create_model(s.teacher, in_chans=tcfg.model.in_chans), tcfg.model.in_chans,
                        replace(tcfg.train, batch_size=batch))}
    flops, runners = {}, {}
    g = torch.Generator().manual_seed(0)
    for name, (model, chans, cfg) in arms.items():
        flops[name] = train_step_flops(model, chans, size)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        batches = [{"image": torch.randn(batch, chans, size, size, generator=g),
                    "label": torch.randint(0, 2, (batch,), generator=g).float(), "index": torch.arange(batch),
                    "view": torch.zeros(batch, dtype=torch.long)} for _ in range(s.gflops_batches)]
        optimizer, scaler = trainer(model, cfg)
        task = tasks.SupervisedTask(loss=cfg.loss)
        run_epoch(model, task, batches[:1], optimizer, scaler, cfg)  # warm-up

        def step(model=model, task=task, batches=batches, optimizer=optimizer, scaler=scaler, cfg=cfg) -> None:
            run_epoch(model, task, batches, optimizer, scaler, cfg)
        runners[name] = step
    times = paired(runners, s.repeats)
    n = s.gflops_batches * batch
    rate = {k: flops[k] * n / statistics.median(times[k]) / 1e9 for k in arms}
    value = flops["student"] / flops["teacher"] * ratio_median(times["teacher"], times["student"])
    params = {k: count_params(m) for k, (m, _, _) in arms.items()}
    res.figures.append(Figure(
        "student_gflops", f"achieved GFLOP/s, {s.student} training step ÷ {s.teacher}'s, {size} px", value, 0.5,
        ">=", "× (ratio of GFLOP/s)",
        meaning=f"{s.student}'s training step runs at this fraction of {s.teacher}'s FLOP rate on this CPU "
                f"({size} px, batch {batch}, {s.threads} thread(s))",
        details={"student_gflops_per_s": rate["student"], "teacher_gflops_per_s": rate["teacher"],
                 "student_step_gflop_per_image": flops["student"] / 1e9,
                 "teacher_step_gflop_per_image": flops["teacher"] / 1e9,
                 "student_ms_per_image": 1000 * statistics.median(times["student"]) / n,
                 "teacher_ms_per_image": 1000 * statistics.median(times["teacher"]) / n, "params": params,
                 "images": n, "batch": batch, "img_size": size, "threads": s.threads,
                 "flops": "3 × forward per image (common.train_step_flops)", "per_repeat": times}))
    res.measure("student training step", rate["student"], "GFLOP/s")
    res.measure("teacher training step", rate["teacher"], "GFLOP/s")
    return res
