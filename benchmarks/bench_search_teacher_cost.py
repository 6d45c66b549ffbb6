"""Benchmark 10, `search_teacher_cost` (long, opt-in): the default distill search with the teacher-logit cache ÷
the same search with the teacher run online (`kd.teacher_cache: none`)."""
from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

from common import Context, Figure, Result, paired, ratio_median, torch_seed


def run(ctx: Context) -> Result:
    """Two arms, each one whole search as `distill` runs it (`Distiller.run_search` of the kd variant: the default
    DistillConfig's trials, search folds, search epochs, pruner, sampler seed, student and train settings), in a
    fresh study folder so nothing is resumed:

    cached: `kd.teacher_cache: views` — fold k's teacher-logit cache (V+1 teacher passes per training image) is
    built inside the search, on the first trial that needs it, and its time counts;
    online: `kd.teacher_cache: none` — the teacher runs on every training batch of every trial epoch.

    Only the kd variant is searched (no_kd has no teacher, so it costs the same in both arms and would only dilute
    the ratio). The teacher run is a stand-in: a cv run folder (config, folds, one random-init teacher checkpoint
    per fold, DONE markers) on the project's default phantom at 64 px (`search_phantom: default`) or on the
    benchmark phantom. Weights do not change a forward pass's cost; with `model.pretrained: none` in that run the
    student starts from random init in both arms (the default phantom pretraining of teacher and students would take
    longer than the benchmark and is a one-off cost of either arm).

    Teacher forward passes are counted by a forward hook on every teacher the search loads (`TeacherRun.load`).
    Figure = online wall ÷ cached wall. Measurements: teacher forward passes per (fold, training image) in each arm,
    and per student training image.
    """
    from kd_fracture.config import DistillConfig

    s, res = ctx.settings, Result()
    defaults = DistillConfig()
    teacher_dir, data = _stand_in_teacher_run(ctx)
    counters: dict[str, dict] = {}
    walls: dict[str, list[float]] = {"cached": [], "online": []}
    runs = iter(range(10**6))

    def arm(mode: str) -> None:
        t0 = time.perf_counter()
        counters[mode] = _search(ctx, teacher_dir, mode, next(runs))
        walls[mode].append(time.perf_counter() - t0)

    # online first: a cold first arm (imports, oneDNN kernels, sqlite) then weighs on the slower arm, not the figure
    paired({"online": lambda: arm("online"), "cached": lambda: arm("cached")}, 1)
    ratio = ratio_median(walls["online"], walls["cached"])
    c, o = counters["cached"], counters["online"]
    per_image = {k: v["teacher_images"] / max(v["fold_train_images"], 1) for k, v in counters.items()}
    per_step = {k: v["teacher_images"] / max(v["student_train_images"], 1) for k, v in counters.items()}
    res.figures.append(Figure(
        "search_teacher_cost", "distill search wall time, teacher online ÷ teacher-logit cache", ratio, 2.5, ">=",
        "× (online ÷ cached)",
        meaning="the default distill search (kd variant) with the teacher run online takes this multiple of the same "
                "search replaying cached teacher logits (cache build included)",
        details={"cached_s": statistics.median(walls["cached"]), "online_s": statistics.median(walls["online"]),
                 "teacher_forwards_per_fold_training_image": per_image,
                 "teacher_forwards_per_student_training_image": per_step,
                 "trials": c["trials"], "search_folds": c["folds"], "search_epochs": c["epochs"],
                 "fold_epochs_run": {"cached": c["fold_epochs"], "online": o["fold_epochs"]},
                 "trial_states": {"cached": c["states"], "online": o["states"]},
                 "teacher_images": {"cached": c["teacher_images"], "online": o["teacher_images"]},
                 "fold_train_images": c["fold_train_images"], "data": data, "img_size": s.search_img_size,
                 "teacher": s.teacher, "student": s.student, "views": defaults.kd.views,
                 "variant": "kd only (no_kd runs no teacher: the same cost in both arms)",
                 "student_start": "random init (stand-in teacher run with model.pretrained: none)",
                 "per_repeat": walls}))
    for mode in ("cached", "online"):
        res.measure(f"{mode}: teacher forward passes per (fold, training image)", per_image[mode], "passes")
        res.measure(f"{mode}: teacher forward passes per student training image", per_step[mode], "passes")
        res.measure(f"{mode}: search wall time", statistics.median(walls[mode]), "s")
    return res


def _data_config(ctx: Context):
    from kd_fracture.config import DataConfig, PhantomConfig

    s = ctx.settings
    common = {"img_size": s.search_img_size, "folds": s.search_data_folds, "num_workers": s.num_workers,
              "manifests_dir": str(ctx.work / "manifests")}
    if s.search_phantom == "bench":
        return DataConfig(root=str(ctx.manifest.root), **common), f"benchmark phantom ({s.phantom_patients} patients)"
    if s.search_phantom != "default":
        raise ValueError(f"search_phantom={s.search_phantom!r}: default | bench")
    ph = PhantomConfig(cache_dir=s.cache_dir)
    return DataConfig(phantom=ph, **common), f"default phantom ({ph.patients} patients, {ph.size}-px PNGs)"


def _stand_in_teacher_run(ctx: Context) -> tuple[Path, str]:
    """A finished-looking cv run with one random-init teacher checkpoint per fold (what distill reads)."""
    from kd_fracture import io
    from kd_fracture.config import CVConfig, ModelConfig
    from kd_fracture.data.loaders import resolve_folds, resolve_manifest
    from kd_fracture.runs.models import build_model
    from kd_fracture.runs.rundir import RunDir
    from kd_fracture.train import checkpoint

    s = ctx.settings
    data, what = _data_config(ctx)
    run = RunDir(ctx.work / "search_teacher_run")
    cfg = CVConfig(run_dir=str(run.path), data=data, model=ModelConfig(name=s.teacher, pretrained="none"))
    manifest = resolve_manifest(cfg.data)
    folds = resolve_folds(cfg.data, manifest)
    run.write_config(cfg)
    run.write_env(cfg.train.seed, "cpu", {"dataset": manifest.name, "manifest_sha256": manifest.sha256()})
    io.write_csv(run.folds, folds)
    torch_seed(0)
    model = build_model(cfg.model, cfg.data.img_size)
    first = run.fold(0) / checkpoint.BEST
    checkpoint.save_weights(model, first, {"epoch": 0})
    for k in range(cfg.data.folds):
        if k:  # the same weights for every fold: hard links (≈ 90 MB each otherwise), sidecar copied
            target = run.fold(k) / checkpoint.BEST
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(first, target)
            except OSError:
                shutil.copyfile(first, target)
            shutil.copyfile(checkpoint.sidecar(first), checkpoint.sidecar(target))
        run.mark_done(k, {"stand_in": True})
    io.write_json(run.holdout / "metrics.json", {"stand_in": True})
    return run.path, what


def _search(ctx: Context, teacher_dir: Path, mode: str, index: int) -> dict:
    """One search of the kd variant; returns what it cost in teacher passes and student epochs."""
    import torch

    from kd_fracture.config import DistillConfig, replace
    from kd_fracture.pipelines import distill
    from kd_fracture.runs import models as run_models
    from kd_fracture.runs.rundir import RunDir
    from kd_fracture.train import engine

    s = ctx.settings
    overrides = {"teacher_run": str(teacher_dir), "variants": ("kd",), "student.name": s.student,
                 "kd.teacher_cache": "views" if mode == "cached" else "none",
                 "search.study": f"bench-{mode}-{index}",
                 "search.storage": f"sqlite:///{ctx.work / f'search_{mode}_{index}.db'}"}
    for key, value in (("search.n_trials", s.search_trials), ("search.folds", s.search_folds),
                       ("search.epochs", s.search_epochs)):
        if value is not None:
            overrides[key] = value
    cfg = distill.resolve_names(replace(DistillConfig(), **overrides))
    distill.check_config(cfg)
    teacher = run_models.load_teacher_run(cfg.teacher_run)
    out = RunDir(distill.study_dir(cfg))
    d = distill.Distiller(cfg, teacher, out, torch.device("cpu"))
    v = distill.variant_list(cfg)[0]
    count = {"teacher_images": 0, "student_train_images": 0, "fold_epochs": 0}

    def hook(module, inputs, output) -> None:
        count["teacher_images"] += int(inputs[0].shape[0])

    original_load, original_epoch = run_models.TeacherRun.load, engine.train_one_epoch

    def load(self, k):
        model = original_load(self, k)
        model.register_forward_hook(hook)
        return model

    def train_one_epoch(model, task, loader, *args, **kwargs):
        count["fold_epochs"] += 1
        count["student_train_images"] += len(loader.dataset) - (len(loader.dataset) % loader.batch_size
                                                                 if loader.drop_last else 0)
        return original_epoch(model, task, loader, *args, **kwargs)

    run_models.TeacherRun.load, engine.train_one_epoch = load, train_one_epoch
    try:
        study = d.run_search(v)
    finally:
        run_models.TeacherRun.load, engine.train_one_epoch = original_load, original_epoch
    folds = d.search_folds()
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    return {**count, "fold_train_images": sum(len(d.rows(k).train) for k in folds), "trials": cfg.search.n_trials,
            "folds": len(folds), "epochs": d.search_epochs(), "states": states}
