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
    # 4f–4i (student_latency, in student_teacher): batch-1 latency at a second, small size besides latency_img_size
    latency_small_size: int = 64
    latency_small_runs: int = 30
    """Timed batch-1 forward passes at latency_small_size (a 64-px forward is ≈ 12× cheaper than at 224 px)."""
    # 7. peer_epoch (+ checkpoint_overhead)
    peer_sizes: tuple[int, ...] = (64, 128)
    peer_train_images: tuple[int, ...] = (640, 128)
    peer_val_images: tuple[int, ...] = (160, 32)
    """Training and inner-validation images per arm and size: a subset of the benchmark phantom's CV pool (cycled),
    sized so one epoch of an arm takes ≈ 20–40 s at 64 px and less at 128 px on 2 idle cores (ResNet-50 at batch
    32 trains ≈ 33 img/s at 64 px and ≈ 4× slower per image at 128 px; a default cv fold has ≈ 680 training
    images)."""
    # 8. bf16
    bf16_sizes: tuple[int, ...] = (64, 128)
    bf16_batch: int = 32
    bf16_train_batches: tuple[int, ...] = (3, 2)
    bf16_infer_batches: tuple[int, ...] = (8, 4)
    bf16_measure_unsupported: bool = False
    """Time the bf16 arms even where the CPU has no native bf16 (emulated: slower than fp32). The figure is then
    still "not supported"; the measured ratio goes to its details. --quick does, to run the code path."""
    # 9. student_gflops
    gflops_img_size: int = 64
    gflops_batch: int | None = None
    """None → distill's default train.batch_size (32); the teacher trains at the same batch."""
    gflops_batches: int = 2
    # 10. search_teacher_cost (long: opt-in)
    search_phantom: str = "default"
    """default = the project's default phantom (data.phantom: 400 patients, 64-px PNGs; what the default teacher run
    and distill use) | bench = the benchmark phantom above."""
    search_img_size: int = 64
    search_trials: int | None = None
    search_folds: int | None = None
    search_epochs: int | None = None
    """None → the default distill config's (search.n_trials, search.folds, search.epochs)."""
    search_data_folds: int = 5
    """Folds of the stand-in teacher run (cv's default data.folds)."""


QUICK = Settings(
    repeats=1, phantom_patients=10, phantom_size=128, teacher="resnet10t", student="hybrid_t",
    pipeline_sizes=(32, 64), pipeline_batch=(4, 4), pipeline_batches=(2, 1), cache_img_size=32, cache_batch=8,
    cache_images=16, kd_img_size=32, kd_batch=8, kd_batches=2, kd_views=2, latency_img_size=64,
    latency_batches=(1, 4), latency_runs=(2, 1), onnx=False, prune_trials=6, prune_seeds=1, scale_rows=(400, 1600),
    latency_small_size=32, latency_small_runs=3, peer_sizes=(32, 64), peer_train_images=(16, 8),
    peer_val_images=(8, 4), bf16_sizes=(32,), bf16_batch=4, bf16_train_batches=(1,), bf16_infer_batches=(1,),
    bf16_measure_unsupported=True, gflops_img_size=32, gflops_batch=4, gflops_batches=1, search_phantom="bench",
    search_img_size=32, search_trials=2, search_folds=1, search_epochs=1, search_data_folds=2)


NOT_SUPPORTED = "not supported"
"""`Figure.met` of a figure whose feature this machine lacks (e.g. bf16 on a CPU without native bf16): recorded,
with value None and a note, and not counted as a miss."""


@dataclass
class Figure:
    """One targeted figure: met = value `op` target, or NOT_SUPPORTED when `supported` is False (value None)."""

    id: str
    name: str
    value: float | None
    target: float
    op: str
    """"<=" or ">="."""
    unit: str
    meaning: str = ""
    details: dict = field(default_factory=dict)
    supported: bool = True
    note: str = ""
    """Why the figure is not supported here (or any other one-line remark)."""

    @property
    def met(self) -> bool | str:
        if not self.supported or self.value is None:
            return NOT_SUPPORTED
        return bool(self.value <= self.target if self.op == "<=" else self.value >= self.target)

    def as_dict(self) -> dict:
        out = {"id": self.id, "name": self.name, "value": None if not self.supported else rounded(self.value),
               "target": rounded(self.target), "op": self.op, "met": self.met, "unit": self.unit,
               "meaning": self.meaning, "details": rounded(self.details)}
        if self.note:
            out["note"] = self.note
        return out

    @classmethod
    def not_supported(cls, id: str, name: str, target: float, op: str, unit: str, note: str, **kwargs) -> Figure:
        return cls(id, name, None, target, op, unit, supported=False, note=note, **kwargs)


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


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs and write timing shared by several benchmarks


def forward_flops(model, in_chans: int, img_size: int) -> int:
    """FLOPs of one image's forward pass (`kd_fracture.models.export.count_flops`: torch's counter, 1 MAC = 2)."""
    from kd_fracture.models import export

    return export.count_flops(model, in_chans, img_size)


def train_step_flops(model, in_chans: int, img_size: int) -> int:
    """FLOPs of one image's training step ≈ 3 × its forward (forward + 2 × for the backward: input and weight
    gradients). Used by teacher_cache and student_gflops, so their achieved GFLOP/s are counted alike."""
    return 3 * forward_flops(model, in_chans, img_size)


class CallTimer:
    """Wraps functions (`(owner, attribute)` pairs: a module or class and a name) with a timer while active.

    `seconds[label]` and `calls[label]` accumulate per label; a call made while another wrapped call is running
    (save_weights → write_sidecar → io.write_json) counts only in the outermost one, so `total` is wall time spent
    inside wrapped calls with no double counting. Attributes that do not exist are skipped (listed in `missing`).
    Use as a context manager; the originals are restored on exit."""

    def __init__(self, targets: Sequence[tuple[Any, str, str]]):
        self.targets = list(targets)  # (owner, attribute, label)
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.missing: list[str] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._depth = 0

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def reset(self) -> None:
        self.seconds, self.calls = {}, {}

    def _wrap(self, fn: Callable, label: str) -> Callable:
        import functools

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
                self.calls[label] = self.calls.get(label, 0) + 1
        return wrapper

    def __enter__(self) -> CallTimer:
        for owner, attr, label in self.targets:
            fn = getattr(owner, attr, None)
            if fn is None:
                self.missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
                continue
            self._saved.append((owner, attr, fn))
            setattr(owner, attr, self._wrap(fn, label))
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, fn in reversed(self._saved):
            setattr(owner, attr, fn)
        self._saved.clear()
