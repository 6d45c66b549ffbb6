"""`python -m kd_fracture.bench`: the project's performance figures, each a ratio measured side by side in one run.

    python -m kd_fracture.bench                      # all six benchmarks (≈ 3–5 min on 2 busy CPU cores)
    python -m kd_fracture.bench --quick              # tiny settings: a smoke run of every code path (≈ 30 s)
    python -m kd_fracture.bench --only pipeline teacher_cache --out benchmarks/

Every figure is a ratio of two things timed in the same process, alternately (A B, B A, A B, …: slow drifts of a
shared machine hit both sides), and is the median over repeats of the per-repeat ratio; absolute times are kept
beside it. Writes `<out>/results.json` (machine, versions, threads, settings, figures) and `<out>/results.md`.

| name            | figure (target)                                                                              |
|-----------------|----------------------------------------------------------------------------------------------|
| pipeline        | training epoch through the real loader ÷ its pure compute on batches in memory (≤ 1.10)      |
| image_cache     | loader epoch 2: PIL + torchvision decoding every PNG ÷ decoded-image cache (≥ 2)             |
| teacher_cache   | KD epoch with the ResNet-50 teacher run online ÷ with cached replayed-view logits (≥ 3)      |
| student_teacher | student ÷ teacher: parameters (≤ 0.20), CPU latency at 224 px, batch 1 and 32 (≤ 0.25)       |
| pruning         | 20-trial Optuna search, pruned vs not: fold-epochs saved (≥ 40 %), best-value gap (≤ noise)  |
| scale           | manifest load + validation + folds at 10k/40k/160k rows: per-row time and peak memory (flat) |

Everything runs on CPU (the figures are defined for the 2-core machine; a GPU would change every ratio).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kd_fracture import io
from kd_fracture.errors import UserError, cli_main

# OpenMP's default wait policy spins; with more runnable threads than free cores (a shared machine) every parallel
# region then waits for a descheduled sibling, and ResNet-50 steps ran 5–10× slower at 2 threads than at 1 (see
# benchmarks/README.md). PASSIVE must be set before torch loads libgomp, hence here, before any torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BENCHMARKS = ("pipeline", "image_cache", "teacher_cache", "student_teacher", "pruning", "scale")
SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------------
# settings and results


@dataclass(frozen=True)
class Settings:
    """What each benchmark measures and how long it may take. `QUICK` shrinks everything for a smoke run."""

    threads: int = 2
    """torch intra-op threads for every benchmark (the machine has 2 cores)."""
    num_workers: int = 0
    """DataLoader workers (the project default, `data.num_workers`)."""
    repeats: int = 3
    """Paired repeats per ratio; the figure is the median of the per-repeat ratios."""
    cache_dir: str = ".kd_fracture_cache"
    """Where the benchmark phantom is generated once and reused (gitignored)."""
    phantom_patients: int = 48
    phantom_size: int = 512
    """Source PNG size: MURA's radiographs are ≈ 512 px on the long side, so decoding costs what it would there."""
    teacher: str = "resnet50"
    student: str = "hybrid_s"
    # 1. pipeline
    pipeline_sizes: tuple[int, ...] = (64, 128)
    pipeline_batch: tuple[int, ...] = (16, 8)
    pipeline_batches: tuple[int, ...] = (2, 2)
    """Batch size and batches per timed epoch at each size (ResNet-50 trains ≈ 7 img/s at 64 px and ≈ 2 img/s at
    128 px on 2 busy cores; the data cost per image does not depend on the batch size)."""
    # 2. image_cache
    cache_img_size: int = 64
    cache_batch: int = 32
    cache_images: int = 128
    # 3. teacher_cache
    kd_img_size: int = 64
    kd_batch: int = 32
    kd_batches: int = 2
    kd_views: int = 4
    # 4. student_teacher
    latency_img_size: int = 224
    latency_batches: tuple[int, ...] = (1, 32)
    latency_runs: tuple[int, ...] = (10, 3)
    """Timed forward passes per batch size (after one warm-up pass)."""
    latency_threads: int = 1
    """Threads for the latency figures: `distill.latency_threads`' default, so they match teacher_vs_student.md.
    One thread also keeps a busy machine's scheduling out of the ratio (at 2 threads the student, with many small
    ops, waits at more OpenMP barriers than ResNet-50)."""
    onnx: bool = True
    # 5. pruning
    prune_trials: int = 20
    prune_seeds: int = 5
    prune_noise: float = 0.03
    """Fold-to-fold noise (SD) of the proxy's scored-fold value, in study-κ units."""
    # 6. scale
    scale_rows: tuple[int, ...] = (10_000, 40_000, 160_000)
    scale_dir: str | None = None
    """Where the scale benchmark's files go (default: /dev/shm when writable, else the system temp dir). On tmpfs
    160k files take ≈ 25 s to create and 8 s to delete; on this machine's ext4 disk (mounted with `discard`),
    deleting 40k files alone took 150 s, so a disk-backed scale dir does not fit the 10-minute budget."""


QUICK = Settings(
    repeats=1, phantom_patients=10, phantom_size=128, teacher="resnet10t", student="hybrid_t",
    pipeline_sizes=(32, 64), pipeline_batch=(4, 4), pipeline_batches=(2, 1), cache_img_size=32, cache_batch=8,
    cache_images=16, kd_img_size=32, kd_batch=8, kd_batches=2, kd_views=2, latency_img_size=64,
    latency_batches=(1, 4), latency_runs=(2, 1), onnx=False, prune_trials=6, prune_seeds=1, scale_rows=(400, 1600))


@dataclass
class Figure:
    """One targeted figure: met = value `op` target."""

    id: str
    name: str
    value: float
    target: float
    op: str
    """"<=" or ">="."""
    unit: str
    meaning: str = ""
    details: dict = field(default_factory=dict)

    @property
    def met(self) -> bool:
        return bool(self.value <= self.target if self.op == "<=" else self.value >= self.target)

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "value": _round(self.value), "target": _round(self.target),
                "op": self.op, "met": self.met, "unit": self.unit, "meaning": self.meaning,
                "details": _round(self.details)}


@dataclass
class Result:
    """What one benchmark returns: targeted figures, untargeted measurements (value, unit) and notes."""

    figures: list[Figure] = field(default_factory=list)
    measurements: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def measure(self, name: str, value: float, unit: str) -> None:
        self.measurements[name] = {"value": _round(value), "unit": unit}


def _round(x: Any, digits: int = 4) -> Any:
    """Round floats to `digits` significant digits, recursively (results.json stays readable)."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    return x


# ----------------------------------------------------------------------------------------------------------------------
# timing helpers


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired(arms: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each arm per repeat; the arm order is reversed every other repeat (A B, B A, …) so a drift in the
    machine's load does not favour the arm that always runs first."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(arms[name]))
    return times


def ratio_median(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over repeats of num[r] / den[r] (pairs taken close in time share the machine's load)."""
    return statistics.median(n / d for n, d in zip(num, den))


class WaitTimer:
    """Wraps an iterable; `wait` accumulates the seconds spent inside `next()` (= time blocked on the input)."""

    def __init__(self, iterable: Iterable):
        self.iterable, self.wait = iterable, 0.0

    def __iter__(self) -> Iterator:
        it = iter(self.iterable)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.wait += time.perf_counter() - t0
            yield item


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------------------------------
# shared fixtures: the phantom, rows, models


@dataclass
class Context:
    settings: Settings
    work: Path
    """Scratch directory of this run (deleted at the end)."""
    _manifest: Any = None

    @property
    def manifest(self):
        """The benchmark phantom's manifest (generated once into cache_dir, reused by later runs)."""
        if self._manifest is None:
            from kd_fracture.data.manifest import load_manifest
            from kd_fracture.data.synthetic import ensure_default_phantom

            s = self.settings
            root = ensure_default_phantom(s.cache_dir, patients=s.phantom_patients, size=s.phantom_size, seed=0)
            self._manifest = load_manifest(root)
        return self._manifest

    def train_rows(self, n: int):
        """The first `n` CV-pool rows (cycled when the phantom has fewer: a repeated row costs the same)."""
        pool = self.manifest.split("train")
        return pool.iloc[np.arange(n) % len(pool)].reset_index(drop=True)


def make_loader(ctx: Context, rows, img_size: int, batch_size: int, *, in_chans: int, num_views: int | None = None,
                cache: bool = True, shuffle: bool = True):
    """The project's training loader (`loaders.build_loader`, the path cv and distill take)."""
    from kd_fracture.config import AugConfig, DataConfig
    from kd_fracture.data.loaders import SharedCache, build_loader

    data = DataConfig(img_size=img_size, num_workers=ctx.settings.num_workers)
    images = SharedCache(ctx.manifest.root, img_size) if cache else None
    return build_loader(rows, ctx.manifest, data, AugConfig(), train=True, in_chans=in_chans, batch_size=batch_size,
                        seed=0, num_views=num_views, cache=images, shuffle=shuffle, drop_last=False)


def trainer(model, train_cfg):
    """(optimizer, scaler) exactly as `engine.fit` builds them."""
    import torch
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(model, opt=train_cfg.optimizer, lr=train_cfg.lr,
                                    weight_decay=train_cfg.weight_decay)
    return optimizer, torch.amp.GradScaler("cuda", enabled=False)


def run_epoch(model, task, batches, optimizer, scaler, cfg, epoch: int = 0) -> None:
    """One `engine.train_one_epoch` on CPU over `batches` (a loader, or a list of collated batches)."""
    import torch

    from kd_fracture import engine

    engine.train_one_epoch(model, task, batches, optimizer, scaler, cfg, torch.device("cpu"), epoch)


# ----------------------------------------------------------------------------------------------------------------------
# 1. input pipeline overhead


def bench_pipeline(ctx: Context) -> Result:
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
    from kd_fracture import engine
    from kd_fracture.config import TrainConfig
    from kd_fracture.models import create_model

    cfg = TrainConfig(amp=False)
    torch_seed(0)
    model = create_model(ctx.settings.teacher, in_chans=3)
    optimizer, scaler = trainer(model, cfg)
    task = engine.SupervisedTask(loss=cfg.loss)
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


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------------
# 2. decoded-image cache


class NaiveDataset:
    """The loader a first version would write: every access decodes the PNG (PIL) and transforms it (torchvision v2).

    PIL decode → grayscale → resize (long side = S, aspect kept) → zero-pad to S×S (CenterCrop pads) → hflip,
    rotate ±10°, RandomResizedCrop(0.8–1), brightness/contrast ±0.2 → float tensor, normalised, replicated to
    `in_chans`: the same augmentation family as `transforms.build_transforms`, so only the decoding strategy and
    the library differ.
    """

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, img_size: int, in_chans: int):
        import torch
        from torchvision.transforms import v2

        from kd_fracture.data.transforms import GRAY_MEAN, GRAY_STD

        self.paths, self.labels, self.size, self.in_chans = list(paths), labels, img_size, in_chans
        self.tf = v2.Compose([
            v2.CenterCrop(img_size), v2.RandomHorizontalFlip(), v2.RandomRotation(10),
            v2.RandomResizedCrop(img_size, scale=(0.8, 1.0), antialias=True), v2.ColorJitter(0.2, 0.2),
            v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([GRAY_MEAN], [GRAY_STD])])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        import torch
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            img = im.convert("L")
        scale = self.size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
        x = self.tf(img)  # (1, S, S) float32
        return {"image": x.expand(self.in_chans, -1, -1).contiguous(), "label": torch.tensor(self.labels[i])}


def bench_image_cache(ctx: Context) -> Result:
    """Loader-only epoch 2 (every batch produced, no model): naive PIL + torchvision loader ÷ the project's loader
    with its decoded-image cache. A third arm, the project's loader without the cache (cv2 decode + resize_pad
    every time), separates what the cache buys from what the library choice buys."""
    from torch.utils.data import DataLoader

    from kd_fracture.data.dataset import seed_worker

    s, res = ctx.settings, Result()
    rows = ctx.train_rows(s.cache_images)
    t0 = time.perf_counter()
    cached = make_loader(ctx, rows, s.cache_img_size, s.cache_batch, in_chans=3)
    build_s = time.perf_counter() - t0  # decoding every image once into the cache = "epoch 1"
    uncached = make_loader(ctx, rows, s.cache_img_size, s.cache_batch, in_chans=3, cache=False)
    naive_ds = NaiveDataset([ctx.manifest.root / p for p in rows["image_path"]], rows["label"].to_numpy(np.float32),
                            s.cache_img_size, in_chans=3)
    naive = DataLoader(naive_ds, batch_size=s.cache_batch, shuffle=True, num_workers=s.num_workers,
                       worker_init_fn=seed_worker if s.num_workers else None, persistent_workers=s.num_workers > 0)
    arms = {"naive": naive, "cached": cached, "uncached": uncached}
    for loader in arms.values():  # epoch 1: page cache warm, workers started
        drain(loader)
    times = paired({name: (lambda ld=ld: drain(ld)) for name, ld in arms.items()}, s.repeats)
    n = len(rows)
    res.figures.append(Figure(
        "2", "decoded-image cache, epoch-2 speed-up", ratio_median(times["naive"], times["cached"]), 2.0, ">=",
        "× (naive ÷ cached)",
        meaning="a loader epoch decoding every PNG with PIL + torchvision takes this multiple of the cached one",
        details={"naive_s": statistics.median(times["naive"]), "cached_s": statistics.median(times["cached"]),
                 "uncached_project_s": statistics.median(times["uncached"]), "per_repeat": times, "images": n,
                 "img_size": s.cache_img_size, "source_px": s.phantom_size, "num_workers": s.num_workers}))
    res.measure("cache speed-up over the project's own uncached loader",
                ratio_median(times["uncached"], times["cached"]), "×")
    res.measure("cached loader, ms per image", 1000 * statistics.median(times["cached"]) / n, "ms")
    res.measure("naive loader, ms per image", 1000 * statistics.median(times["naive"]) / n, "ms")
    res.measure("cache build (decode once), ms per image", 1000 * build_s / n, "ms")
    res.measure("cache memory per image", s.cache_img_size ** 2, "bytes")
    return res


def drain(loader) -> None:
    for _ in loader:
        pass


# ----------------------------------------------------------------------------------------------------------------------
# 3. teacher-logit cache


def bench_teacher_cache(ctx: Context) -> Result:
    """A KD epoch of the student: ResNet-50 teacher run online on every batch ÷ logits replayed from the cache.

    Both arms are `engine.train_one_epoch` with `distill.DistillTask` (Hinton KD, α=0.7, T=4) over the same loader
    (V replayed views, decoded-image cache); the teacher source is `teacher_cache.OnlineTeacher` (eval, no_grad)
    or `teacher_cache.CachedTeacher` over an (N, V+1, 1) tensor. The cached tensor holds random logits: values do
    not change the time of a lookup, and building the real cache (V+1 teacher passes, once per fold) is amortised
    over every epoch of every trial.
    """
    import torch

    from kd_fracture import export
    from kd_fracture.config import DistillConfig
    from kd_fracture.distill import DistillTask
    from kd_fracture.models import create_model
    from kd_fracture.teacher_cache import CachedTeacher, OnlineTeacher

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
    teacher_flops = export.count_flops(teacher, 3, s.kd_img_size)
    student_flops = 3 * export.count_flops(student, dcfg.student.in_chans, s.kd_img_size)
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


# ----------------------------------------------------------------------------------------------------------------------
# 4. student vs teacher


def bench_student_teacher(ctx: Context) -> Result:
    """Parameters, CPU latency (batch 1 and 32 at 224 px) and throughput of the default student vs the teacher,
    each with its own input (teacher: 3 replicated channels; student: 1), in torch (inference_mode) and in ONNX
    Runtime (CPU provider, same thread count). Forward passes of the two models alternate."""
    import torch

    from kd_fracture import export
    from kd_fracture.config import DistillConfig
    from kd_fracture.models import count_params, create_model

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
            with torch_threads(s.latency_threads):
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

    from kd_fracture import export

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


# ----------------------------------------------------------------------------------------------------------------------
# 5. pruning


PROXY_OPTIMUM = {"kd.temperature": 4.0, "kd.alpha": 0.6, "train.lr": 2e-3, "train.weight_decay": 0.02}
PROXY_FOLD_OFFSET = (0.02, -0.03, 0.01, -0.01, 0.0)
"""Per-fold difficulty (some folds are harder for every trial), added to each trial's fold score."""


def proxy_value(params: dict) -> float:
    """Noise-free 'study κ' of a distillation parameter set: a smooth bowl around PROXY_OPTIMUM.

    κ = 0.70 − 0.08·(log10(lr/2e-3)/0.5)² − 0.06·((α − 0.6)/0.4)² − 0.04·(log10(T/4)/0.5)²
            − 0.02·(log10(wd/0.02))² + depth bonus {1: −0.02, 2: 0, 3: +0.01}
            + width bonus {96: −0.01, 128: 0, 192: +0.005}
    (scale parameters matter on a log scale; a trial with every parameter at a range edge loses ≈ 0.15–0.25).
    """
    g = params.get
    kappa = 0.70
    kappa -= 0.08 * (math.log10(g("train.lr", 2e-3) / 2e-3) / 0.5) ** 2
    kappa -= 0.06 * ((g("kd.alpha", 0.6) - 0.6) / 0.4) ** 2
    kappa -= 0.04 * (math.log10(g("kd.temperature", 4.0) / 4.0) / 0.5) ** 2
    kappa -= 0.02 * math.log10(g("train.weight_decay", 0.02) / 0.02) ** 2
    kappa += {1: -0.02, 2: 0.0, 3: 0.01}.get(g("student.overrides.depth", 2), 0.0)
    kappa += {96: -0.01, 128: 0.0, 192: 0.005}.get(g("student.overrides.embed_dim", 128), 0.0)
    return kappa


def proxy_fold_score(params: dict, fold: int, noise: float, seed: int = 0) -> float:
    """proxy_value + the fold's offset + N(0, noise²), the noise seeded by (seed, params, fold): deterministic, so
    the pruned and the unpruned search see the same score for the same trial and fold."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).digest()
    rng = np.random.default_rng([seed, fold, int.from_bytes(digest[:8], "little")])
    return proxy_value(params) + PROXY_FOLD_OFFSET[fold % len(PROXY_FOLD_OFFSET)] + float(rng.normal(0.0, noise))


def run_proxy_search(scfg, n_trials: int, noise: float, epochs: int, folds: int) -> dict:
    """One in-memory Optuna study through the project's sampler, pruner and objective factories
    (`search.make_sampler / make_pruner / make_objective`, report mode as `distill` chooses it) with the proxy as
    the scored-fold metric; each fold counts `epochs` fold-epochs."""
    import optuna

    from kd_fracture import search

    spent = {"fold_epochs": 0}

    def score_fold(trial, params: dict, k: int) -> float:
        spent["fold_epochs"] += epochs
        return proxy_fold_score(params, k, noise)

    space = search.parse_space(scfg.space)
    objective = search.make_objective(space, list(range(folds)), score_fold,
                                      report="per_fold" if scfg.pruner == "wilcoxon" else "running_mean")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=search.make_sampler(scfg),
                                pruner=search.make_pruner(scfg))
    study.optimize(objective, n_trials=n_trials)
    best = study.best_trial
    offset = float(np.mean([PROXY_FOLD_OFFSET[k % len(PROXY_FOLD_OFFSET)] for k in range(folds)]))
    return {"fold_epochs": spent["fold_epochs"], "best_value": best.value,
            "best_true_value": proxy_value(best.params) + offset,
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)}


def bench_pruning(ctx: Context) -> Result:
    """The same 20-trial search with the project's pruner and without (NopPruner), per sampler seed; the scored
    fold of a trial comes from `proxy_fold_score` instead of training a student (the pruner only sees values)."""
    from kd_fracture.config import SearchConfig

    s, res = ctx.settings, Result()
    base = SearchConfig()
    variants = [("project default", base.pruner, base.folds or 5, base.epochs or 3),
                ("all 5 folds", base.pruner, 5, base.epochs or 3)]
    letters = iter("abcdefgh")
    for label, pruner, folds, epochs in variants:
        runs = {"pruned": [], "none": []}
        for seed in range(s.prune_seeds):
            for arm, name in (("pruned", pruner), ("none", "none")):
                scfg = replace(base, pruner=name, sampler_seed=seed, folds=folds, epochs=epochs)
                runs[arm].append(run_proxy_search(scfg, s.prune_trials, s.prune_noise, epochs, folds))
        spent = {arm: sum(r["fold_epochs"] for r in v) for arm, v in runs.items()}
        gaps = [n["best_value"] - p["best_value"] for p, n in zip(runs["pruned"], runs["none"])]
        true_gaps = [n["best_true_value"] - p["best_true_value"] for p, n in zip(runs["pruned"], runs["none"])]
        noise = 2 * s.prune_noise / math.sqrt(folds)  # 2 standard errors of a trial's mean over its folds
        settings = {"pruner": pruner, "n_startup_trials": base.n_startup_trials, "folds": folds,
                    "epochs_per_fold": epochs, "trials": s.prune_trials, "seeds": s.prune_seeds,
                    "fold_noise_sd": s.prune_noise}
        res.figures.append(Figure(
            f"5{next(letters)}", f"pruning ({label}: {pruner}, {folds} folds): fold-epochs saved",
            1 - spent["pruned"] / spent["none"], 0.40, ">=", "fraction",
            meaning=f"the pruned search spends this fraction fewer fold-epochs than the unpruned one ({label})",
            details={**settings, "fold_epochs_pruned": spent["pruned"], "fold_epochs_unpruned": spent["none"],
                     "pruned_trials_median": statistics.median(r["pruned"] for r in runs["pruned"])}))
        for arm, what in (("pruned", "with the pruner"), ("none", "without")):
            res.measure(f"{label}: fold-epochs per search {what}", spent[arm] / s.prune_seeds, "fold-epochs")
        res.figures.append(Figure(
            f"5{next(letters)}", f"pruning ({label}): best-value gap (unpruned − pruned)", statistics.median(gaps),
            noise, "<=", "κ",
            meaning="how much lower the pruned search's best value is (median over seeds); target = 2 SE of one "
                    "trial's mean",
            details={**settings, "gaps": gaps, "true_value_gaps": true_gaps,
                     "best_pruned": [r["best_value"] for r in runs["pruned"]],
                     "best_unpruned": [r["best_value"] for r in runs["none"]]}))
    res.notes.append(
        "proxy objective: scored-fold value = proxy_value(params) + fold offset + N(0, fold_noise_sd²), seeded by "
        "(params, fold); proxy_value is a smooth bowl in (log lr, α, log T, log wd) + small depth/width terms "
        "(see kd_fracture.bench.proxy_value); sampler, pruner and objective are the project's factories. Equal "
        "best values are expected: a pruned trial joins TPE's 'bad' group where its finished low value would have, "
        "so with the same sampler seed both searches mostly propose the same parameters")
    return res


# ----------------------------------------------------------------------------------------------------------------------
# 6. scale


def write_scale_tree(root: Path, max_rows: int) -> list[tuple[str, str, int]]:
    """Create a MURA-v1.1 tree of 1-byte "images" for ≈ max_rows rows; return (split, image_path, label) in order.

    Patient i: body part BODY_PARTS[i % 7], 1–3 studies of 1–4 views (MURA's mix), every 12th patient in valid
    (the holdout), labels drawn per study. Only existence is checked without --verify-images, so 1 byte is enough.
    """
    from kd_fracture.data.manifest import BODY_PARTS

    rng = np.random.default_rng(0)
    rows: list[tuple[str, str, int]] = []
    patient = 0
    while len(rows) < max_rows:
        patient += 1
        split = "valid" if patient % 12 == 0 else "train"
        part = BODY_PARTS[patient % len(BODY_PARTS)]
        for study in range(1, int(rng.choice([1, 2, 3], p=[0.65, 0.25, 0.10])) + 1):
            label = int(rng.random() < 0.4)
            kind = "positive" if label else "negative"
            study_dir = f"MURA-v1.1/{split}/{part}/patient{patient:06d}/study{study}_{kind}"
            (root / study_dir).mkdir(parents=True)
            for view in range(1, int(rng.choice([1, 2, 3, 4], p=[0.12, 0.43, 0.30, 0.15])) + 1):
                path = f"{study_dir}/image{view}.png"
                (root / path).write_bytes(b"\0")
                rows.append((split, path, label))
    return rows


def study_boundary(rows: Sequence[tuple[str, str, int]], n: int) -> int:
    """The largest cut ≤ n that does not split a study (rows of a study are consecutive)."""
    def study(i: int) -> str:
        return rows[i][1].rsplit("/", 1)[0]

    while 0 < n < len(rows) and study(n - 1) == study(n):
        n -= 1
    return n


def write_scale_csvs(root: Path, rows: Sequence[tuple[str, str, int]]) -> None:
    """The four MURA CSVs listing exactly `rows` (complete studies)."""
    for split in ("train", "valid"):
        mine = [(p, y) for s, p, y in rows if s == split]
        studies = dict.fromkeys((p.rsplit("/", 1)[0], y) for p, y in mine)
        io.write_text(root / "MURA-v1.1" / f"{split}_image_paths.csv", "".join(f"{p}\n" for p, _ in mine))
        io.write_text(root / "MURA-v1.1" / f"{split}_labeled_studies.csv",
                      "".join(f"{s}/,{y}\n" for s, y in studies))


def scale_worker(root: str, manifests_dir: str, queue) -> None:
    """In a fresh process: load + validate the manifest, make and write 5 folds; report seconds and the peak
    resident memory above the imports (Linux: VmHWM after resetting it via /proc/self/clear_refs; `ru_maxrss` would
    still hold the parent's size from before exec). Elsewhere: tracemalloc's peak, timed in a second pass."""
    from kd_fracture.data.folds import load_or_make_folds
    from kd_fracture.data.manifest import load_manifest

    def work() -> tuple[int, float, float]:
        t0 = time.perf_counter()
        manifest = load_manifest(root)
        t1 = time.perf_counter()
        load_or_make_folds(manifest, 5, 0, manifests_dir, regenerate=True)
        return len(manifest.df), t1 - t0, time.perf_counter() - t1

    if _reset_peak_rss():
        base_kb = _proc_status_kb("VmRSS")
        rows, load_s, folds_s = work()
        peak_kb, method = _proc_status_kb("VmHWM") - base_kb, "VmHWM - VmRSS before (Linux /proc)"
    else:
        import tracemalloc

        rows, load_s, folds_s = work()
        tracemalloc.start()
        work()
        peak_kb, method = tracemalloc.get_traced_memory()[1] / 1024, "tracemalloc peak"
        tracemalloc.stop()
    queue.put({"rows": rows, "load_s": load_s, "folds_s": folds_s, "peak_kb": max(0, peak_kb), "method": method})


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return _proc_status_kb("VmHWM") > 0
    except (OSError, ValueError):
        return False


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ValueError(f"/proc/self/status has no {key}")


def bench_scale(ctx: Context) -> Result:
    """Manifest load + validation + folds at growing row counts, each in a fresh process; per-row time and peak
    memory should stay flat (linear growth)."""
    import multiprocessing

    s, res = ctx.settings, Result()
    base = Path(s.scale_dir) if s.scale_dir else _scale_base()
    root = Path(tempfile.mkdtemp(prefix="kd_fracture_scale_", dir=base))
    try:
        t0 = time.perf_counter()
        all_rows = write_scale_tree(root, max(s.scale_rows))
        res.measure(f"creating {len(all_rows)} files", time.perf_counter() - t0, "s")
        points = []
        mp = multiprocessing.get_context("spawn")
        for n in s.scale_rows:
            rows = all_rows[:study_boundary(all_rows, n)]
            write_scale_csvs(root, rows)
            queue = mp.Queue()
            proc = mp.Process(target=scale_worker, args=(str(root), str(root / f"manifests_{n}"), queue))
            proc.start()
            point = queue.get(timeout=600)
            proc.join()
            point["total_s"] = point["load_s"] + point["folds_s"]
            points.append(point)
            res.measure(f"{point['rows']} rows: load + validate", point["load_s"], "s")
            res.measure(f"{point['rows']} rows: folds", point["folds_s"], "s")
            res.measure(f"{point['rows']} rows: time per row", 1e6 * point["total_s"] / point["rows"], "µs")
            res.measure(f"{point['rows']} rows: peak memory per row", 1024 * point["peak_kb"] / point["rows"],
                        "bytes")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first, last = points[0], points[-1]
    per_row = [p["total_s"] / p["rows"] for p in points]
    mem_row = [p["peak_kb"] / p["rows"] for p in points]
    fs = _filesystem(base)
    details = {"points": points, "filesystem": fs, "rows_growth": last["rows"] / first["rows"]}
    res.figures.append(Figure(
        "6a", f"time per row, {last['rows']} ÷ {first['rows']} rows", per_row[-1] / per_row[0], 1.5, "<=",
        "× (ratio)", meaning="per-row time stays flat as rows grow ×16 (≤ 1.5 allows n·log n and noise, not n²)",
        details=details))
    res.figures.append(Figure(
        "6b", f"peak memory per row, {last['rows']} ÷ {first['rows']} rows",
        mem_row[-1] / mem_row[0] if mem_row[0] else float("inf"), 1.5, "<=", "× (ratio)",
        meaning="peak memory per row stays flat (linear total)", details={"filesystem": fs}))
    res.notes.append(f"files on {fs}; created once for the largest point, CSVs rewritten per point")
    return res


def _scale_base() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=10, check=False).stdout.split("\n")
        return f"{path} ({out[1].split()[1]})"
    except (OSError, IndexError, subprocess.SubprocessError):
        return str(path)


# ----------------------------------------------------------------------------------------------------------------------
# environment and report


def environment(settings: Settings) -> dict:
    """Machine, versions, threads and load: what a reader needs to compare two results files."""
    import importlib.metadata as md

    import torch

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "torchvision", "timm", "albumentations", "opencv-python-headless",
                                              "opencv-python", "numpy", "pandas", "scikit-learn", "optuna", "onnx",
                                              "onnxruntime", "pillow")},
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "num_workers": settings.num_workers,
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None, "git_commit": commit,
    }


def format_markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    v = env["versions"]
    lines = [
        "# kd_fracture benchmarks", "",
        (f"`python -m kd_fracture.bench{' ' + report['mode_flag'] if report['mode_flag'] else ''}` — "
         f"{report['started']}, {report['wall_s']:.0f} s. CPU: {env['cpu']} ({env['cpus_usable']} usable), "
         f"torch {v['torch']}, {env['torch_threads']} threads for training and {s['latency_threads']} for latency, "
         f"OMP_WAIT_POLICY={env['omp_wait_policy']}, DataLoader workers {env['num_workers']}, load average "
         f"{_fmt_load(env['load_average_start'])} at start and {_fmt_load(env.get('load_average_end'))} at end "
         "(a shared machine: every figure is a ratio of two arms timed alternately)."), "",
        "| # | figure | value | target | met | unit |", "|---|---|---|---|---|---|"]
    for name, bench in report["benchmarks"].items():
        for f in bench.get("figures", []):
            lines.append(f"| {f['id']} | {f['name']} | {_fmt(f['value'])} | {f['op']} {_fmt(f['target'])} | "
                         f"{'yes' if f['met'] else '**no**'} | {f['unit']} |")
    lines += ["", "## Measurements (no target)", "", "| benchmark | measurement | value | unit |", "|---|---|---|---|"]
    for name, bench in report["benchmarks"].items():
        for m, mv in bench.get("measurements", {}).items():
            lines.append(f"| {name} | {m} | {_fmt(mv['value'])} | {mv['unit']} |")
    notes = [(name, n) for name, bench in report["benchmarks"].items() for n in bench.get("notes", [])]
    if notes:
        lines += ["", "## Notes", ""] + [f"- **{name}**: {n}" for name, n in notes]
    return "\n".join(lines) + "\n"


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _fmt_load(load: Sequence[float] | None) -> str:
    return "n/a" if not load else f"{load[0]:.1f}"


RUNNERS: dict[str, Callable[[Context], Result]] = {
    "pipeline": bench_pipeline, "image_cache": bench_image_cache, "teacher_cache": bench_teacher_cache,
    "student_teacher": bench_student_teacher, "pruning": bench_pruning, "scale": bench_scale,
}


def run(settings: Settings, only: Sequence[str] = BENCHMARKS, out: Path | None = None, mode_flag: str = "",
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Run the selected benchmarks; write `out/results.json` and `out/results.md` when `out` is given."""
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t_all = time.perf_counter()
    with torch_threads(settings.threads):  # restored afterwards (tests call this in-process)
        env = environment(settings)
    report: dict = {"schema_version": SCHEMA_VERSION, "started": started, "mode_flag": mode_flag,
                    "settings": asdict(settings), "environment": env, "benchmarks": {}}
    with tempfile.TemporaryDirectory(prefix="kd_fracture_bench_") as work:
        ctx = Context(settings, Path(work))
        for name in only:
            log(f"bench {name} …")
            t0 = time.perf_counter()
            with torch_threads(settings.threads):
                result = RUNNERS[name](ctx)
            entry = {"seconds": time.perf_counter() - t0, "figures": [f.as_dict() for f in result.figures],
                     "measurements": result.measurements, "notes": result.notes}
            report["benchmarks"][name] = _round(entry)
            for f in entry["figures"]:
                log(f"  {f['id']} {f['name']}: {_fmt(f['value'])} (target {f['op']} {_fmt(f['target'])}) "
                    f"{'met' if f['met'] else 'MISSED'}")
            log(f"  ({entry['seconds']:.0f} s)")
    report["wall_s"] = time.perf_counter() - t_all
    report["environment"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if out is not None:
        io.write_json(Path(out) / "results.json", report)
        io.write_text(Path(out) / "results.md", format_markdown(report))
    return report


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kd_fracture.bench",
        description="Performance figures as ratios measured side by side (see benchmarks/README.md).")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run of every benchmark")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None,
                        help=f"run only these benchmarks: {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="folder for results.json / results.md")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2, or fewer cores)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 0, the project's)")
    parser.add_argument("--repeats", type=int, default=None, help="paired repeats per ratio")
    parser.add_argument("--cache-dir", default=None, help="where the benchmark phantom is cached")
    parser.add_argument("--scale-dir", default=None, help="where the scale benchmark writes its files")
    args = parser.parse_args(argv)

    only = args.only or list(BENCHMARKS)
    unknown = [n for n in only if n not in BENCHMARKS]
    if unknown:
        raise UserError(f"--only {' '.join(unknown)}: unknown benchmark; choose from {', '.join(BENCHMARKS)}")
    settings = QUICK if args.quick else Settings()
    for flag, value, low in (("threads", args.threads, 1), ("workers", args.workers, 0), ("repeats", args.repeats, 1)):
        if value is not None and value < low:
            raise UserError(f"--{flag} {value}: must be at least {low}")
    overrides = {"threads": args.threads or min(settings.threads, os.cpu_count() or 1), "num_workers": args.workers,
                 "repeats": args.repeats, "cache_dir": args.cache_dir, "scale_dir": args.scale_dir}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    run(settings, only, args.out, mode_flag="--quick" if args.quick else "")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
