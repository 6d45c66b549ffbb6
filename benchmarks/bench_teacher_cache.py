"""Benchmark 3, `teacher_cache`: KD epoch with the teacher run online ÷ with cached replayed-view logits."""
from __future__ import annotations

import statistics
from dataclasses import replace

from common import (Context, Figure, Result, WaitTimer, forward_flops, make_loader, paired, ratio_median, run_epoch,
                    torch_seed, train_step_flops, trainer)


def run(ctx: Context) -> Result:
    """A KD epoch of the student: ResNet-50 teacher run online on every batch ÷ logits replayed from the cache.

    Both arms are `engine.train_one_epoch` with `distill.DistillTask` (Hinton KD, α=0.7, T=4) over the same loader
    (V replayed views, decoded-image cache); the teacher source is `teacher_cache.OnlineTeacher` (eval, no_grad)
    or `teacher_cache.CachedTeacher` over an (N, V+1, 1) tensor. The cached tensor holds random logits: values do
    not change the time of a lookup, and building the real cache (V+1 teacher passes, once per fold) is amortised
    over every epoch of every trial.
    """
    import torch

    from kd_fracture.config import DistillConfig
    from kd_fracture.models import create_model
    from kd_fracture.train.tasks import DistillTask
    from kd_fracture.train.teacher_cache import CachedTeacher, OnlineTeacher

    s, res = ctx.settings, Result()
    dcfg = DistillConfig()
    cfg = replace(dcfg.train, amp=False)
    rows = ctx.train_rows(s.kd_batches * s.kd_batch)
    loader = make_loader(ctx, rows, s.kd_img_size, s.kd_batch, in_chans=dcfg.student.in_chans, num_views=s.kd_views)
    torch_seed(0)
    student = create_model(s.student, in_chans=dcfg.student.in_chans, img_size=s.kd_img_size,
                           drop_rate=dcfg.student.drop_rate)
    teacher = create_model(s.teacher, in_chans=3)
    logits = torch.randn(len(rows), s.kd_views + 1, 1, generator=torch.Generator().manual_seed(0))
    tasks = {"online": DistillTask(OnlineTeacher(teacher, in_chans=3), dcfg.kd.temperature, dcfg.kd.alpha),
             "cached": DistillTask(CachedTeacher(logits), dcfg.kd.temperature, dcfg.kd.alpha)}
    optimizer, scaler = trainer(student, cfg)
    warm = [next(iter(loader))]
    for task in tasks.values():
        run_epoch(student, task, warm, optimizer, scaler, cfg)
    waits: list[float] = []

    def epoch(task) -> None:
        timer = WaitTimer(loader)
        run_epoch(student, task, timer, optimizer, scaler, cfg)
        waits.append(timer.wait)

    times = paired({name: (lambda t=task: epoch(t)) for name, task in tasks.items()}, s.repeats)
    n = len(rows)
    res.figures.append(Figure(
        "3", "teacher-logit cache, KD epoch speed-up", ratio_median(times["online"], times["cached"]), 3.0, ">=",
        "× (online ÷ cached)",
        meaning=f"a KD epoch running {s.teacher} online takes this multiple of one replaying cached logits",
        details={"online_s": statistics.median(times["online"]), "cached_s": statistics.median(times["cached"]),
                 "per_repeat": times,
                 "images": n, "batch": s.kd_batch, "img_size": s.kd_img_size, "views": s.kd_views,
                 "student": s.student, "teacher": s.teacher}))
    teacher_s = (statistics.median(times["online"]) - statistics.median(times["cached"])) / n  # per image
    student_s = statistics.median(times["cached"]) / n
    # FLOPs per image: teacher forward (3 ch) vs student training step ≈ 3 × its forward (forward + 2 for backward)
    teacher_flops = forward_flops(teacher, 3, s.kd_img_size)
    student_flops = train_step_flops(student, dcfg.student.in_chans, s.kd_img_size)
    res.measure("teacher forward inside the online epoch, per image", 1000 * teacher_s, "ms")
    res.measure("student KD step + data (cached epoch), per image", 1000 * student_s, "ms")
    res.measure("data wait inside the cached epoch, per image", 1000 * statistics.median(waits) / n, "ms")
    res.measure("FLOP-ideal speed-up, 1 + teacher fwd ÷ student train FLOPs", 1 + teacher_flops / student_flops, "×")
    res.measure("achieved GFLOP/s, teacher forward", teacher_flops / teacher_s / 1e9, "GFLOP/s")
    res.measure("achieved GFLOP/s, student training step", student_flops / student_s / 1e9, "GFLOP/s")
    res.notes.append(f"building the cache costs V+1 = {s.kd_views + 1} teacher forward passes per training image, "
                     "once per fold; running the teacher online costs one per image in every epoch of every trial "
                     "(a 20-trial search at 3 epochs: 60), so per search the cache removes ≈ 90 % of the teacher's "
                     "passes even where the per-epoch figure is below its target")
    return res
