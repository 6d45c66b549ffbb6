"""Benchmark 1, `pipeline`: input pipeline overhead (training epoch through the real loader ÷ its pure compute)."""
from __future__ import annotations

import statistics

from common import Context, Figure, Result, WaitTimer, make_loader, paired, ratio_median, run_epoch, torch_seed, trainer


def run(ctx: Context) -> Result:
    """Training-epoch wall time through the real loader ÷ pure model compute on the same batches in memory.

    Model: the teacher (ResNet-50, 3 replicated channels, BCE), the model `cv` trains at these sizes. Loader: the
    project's (`build_loader`: decoded-image cache, seeded albumentations views, `num_workers` from Settings).
    Two arms, alternated: `engine.train_one_epoch` (forward, loss, backward, clip, AdamW step) through the loader,
    and the same function over the collated batches held in a list. The loader arm also times what the loop spends
    blocked in `next(loader)`.

    The figure is, per loader epoch, wall ÷ (wall − blocked): its compute on batches already in memory, measured in
    the same epoch, so load changes on a shared machine cancel. That is exact with num_workers=0 (all data work
    happens inside `next`); workers would also steal CPU from the compute without blocking it, so with workers the
    figure is the plain ratio of the two arms. Both estimates are kept; the plain ratio is the cross-check, noisier
    by the run-to-run spread of ResNet-50 steps (±20 % here when other jobs share the cores).
    """
    s, res = ctx.settings, Result()
    for fig_id, size, batch, n_batches in zip("abc", s.pipeline_sizes, s.pipeline_batch, s.pipeline_batches):
        times, waits = _pipeline_arms(ctx, size, batch, n_batches)
        in_epoch = statistics.median(t / (t - w) for t, w in zip(times["loader"], waits))
        two_arms = ratio_median(times["loader"], times["memory"])
        images = n_batches * batch
        res.figures.append(Figure(
            f"1{fig_id}", f"input pipeline overhead, {s.teacher} {size} px",
            in_epoch if s.num_workers == 0 else two_arms, 1.10, "<=", "× (epoch ÷ compute)",
            meaning=f"a {s.teacher} training epoch at {size} px takes this multiple of its pure compute",
            details={"estimator": "wall / (wall - data wait)" if s.num_workers == 0 else "loader arm / memory arm",
                     "two_arm_ratio": two_arms, "in_epoch_ratio": in_epoch,
                     "epoch_s": statistics.median(times["loader"]), "in_memory_epoch_s": statistics.median(
                         times["memory"]), "images": images, "batch": batch, "num_workers": s.num_workers,
                     "model": s.teacher, "ms_per_image_compute": 1000 * statistics.median(times["memory"]) / images,
                     "ms_per_image_data_wait": 1000 * statistics.median(waits) / images,
                     "per_repeat": {"loader_s": times["loader"], "wait_s": waits, "memory_s": times["memory"]}}))
        res.measure(f"{size} px: data wait per image", 1000 * statistics.median(waits) / images, "ms")
        res.measure(f"{size} px: compute per image (in-memory arm)",
                    1000 * statistics.median(times["memory"]) / images, "ms")
        res.measure(f"{size} px: cross-check, loader arm ÷ in-memory arm", two_arms, "×")
    return res


def _pipeline_arms(ctx: Context, size: int, batch: int, n_batches: int) -> tuple[dict[str, list[float]], list[float]]:
    """(seconds per repeat of both arms, seconds blocked on the loader per loader epoch) at one image size."""
    from kd_fracture.config import TrainConfig
    from kd_fracture.models import create_model
    from kd_fracture.train import engine, tasks

    cfg = TrainConfig(amp=False)
    torch_seed(0)
    model = create_model(ctx.settings.teacher, in_chans=3)
    optimizer, scaler = trainer(model, cfg)
    task = tasks.SupervisedTask(loss=cfg.loss)
    loader = make_loader(ctx, ctx.train_rows(n_batches * batch), size, batch, in_chans=3)
    in_memory = list(loader)  # the same collated batches, held in memory
    run_epoch(model, task, in_memory[:1], optimizer, scaler, cfg)  # warm-up: allocator, kernels
    waits: list[float] = []
    epochs = iter(range(1, 10**6))

    def through_loader() -> None:
        e = next(epochs)
        engine.set_epoch(loader, e, e)  # a fresh augmentation view each epoch, as in training
        timer = WaitTimer(loader)
        run_epoch(model, task, timer, optimizer, scaler, cfg, e)
        waits.append(timer.wait)

    def in_memory_epoch() -> None:
        run_epoch(model, task, in_memory, optimizer, scaler, cfg)

    return paired({"loader": through_loader, "memory": in_memory_epoch}, ctx.settings.repeats), waits

