"""What the benchmarks of `benchmarks/run.py` share: settings, figures and results, timing helpers, the benchmark
phantom and the project's loader / training step (each benchmark lives in `bench_<name>.py`)."""
from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# OpenMP's default wait policy spins; with more runnable threads than free cores (a shared machine) every parallel
# region then waits for a descheduled sibling, and ResNet-50 steps ran 5–10× slower at 2 threads than at 1 (see
# benchmarks/README.md). PASSIVE must be set before torch loads libgomp, hence here, before any torch import
# (`kd_fracture/__init__.py` sets the same default; this keeps the benchmarks independent of import order).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

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
        return {"id": self.id, "name": self.name, "value": rounded(self.value), "target": rounded(self.target),
                "op": self.op, "met": self.met, "unit": self.unit, "meaning": self.meaning,
                "details": rounded(self.details)}


@dataclass
class Result:
    """What one benchmark returns: targeted figures, untargeted measurements (value, unit) and notes."""

    figures: list[Figure] = field(default_factory=list)
    measurements: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def measure(self, name: str, value: float, unit: str) -> None:
        self.measurements[name] = {"value": rounded(value), "unit": unit}


def rounded(x: Any, digits: int = 4) -> Any:
    """Round floats to `digits` significant digits, recursively (results.json stays readable)."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}") if math.isfinite(x) else x
    if isinstance(x, dict):
        return {k: rounded(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v, digits) for v in x]
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
            from kd_fracture.data.phantom import ensure_default_phantom

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
    """(optimizer, scaler) as `kd_fracture.train.engine.fit` builds them on CPU (timm's create_optimizer_v2, with
    fit's momentum 0.9 for sgd; a disabled GradScaler)."""
    import torch
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(model, opt=train_cfg.optimizer, lr=train_cfg.lr,
                                    weight_decay=train_cfg.weight_decay,
                                    **({"momentum": 0.9} if train_cfg.optimizer == "sgd" else {}))
    return optimizer, torch.amp.GradScaler("cuda", enabled=False)


def run_epoch(model, task, batches, optimizer, scaler, cfg, epoch: int = 0) -> None:
    """One `engine.train_one_epoch` on CPU over `batches` (a loader, or a list of collated batches)."""
    import torch

    from kd_fracture.train import engine

    engine.train_one_epoch(model, task, batches, optimizer, scaler, cfg, torch.device("cpu"), epoch)


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
