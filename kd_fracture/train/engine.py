"""One training loop for the teacher and the student (nanoGPT-style: one readable `fit`).

What differs between teacher training and distillation is a small `Task` that turns a batch into named loss parts
(`{"loss": total, "ce": ..., "kd": ...}`). `fit` logs every part, steps the optimiser, evaluates on the inner
validation split each epoch, keeps the best checkpoint (safetensors) and a resumable `state_last.pt`, and stops
early when the monitored inner-val metric stops improving.

Every epoch re-derives its randomness from (seed, epoch) — shuffle order, dropout, mixup — so a run resumed from
`state_last.pt` after epoch e continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm.auto import tqdm

from kd_fracture import distributed, io, metrics
from kd_fracture.config import TrainConfig
from kd_fracture.data.prefetch import DeviceBatches
from kd_fracture.errors import UserError
from kd_fracture.models.losses import positive_prob
from kd_fracture.train.checkpoint import (BEST, HISTORY, LAST, CheckpointError, load_state, load_weights,
                                          remove_checkpoint, save_state, save_weights, unwrap, verify_sidecar)
from kd_fracture.train.tasks import Task
from kd_fracture.train.tracking import TensorBoard

CHECKPOINT_CHOICES = ("best", "last")


class TrainingError(UserError):
    """Training cannot continue (non-finite loss); finished work and the last good checkpoint are kept."""


# ----------------------------------------------------------------------------------------------------------------------
# device, distributed


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


rank, world_size, is_main = distributed.rank, distributed.world_size, distributed.is_main  # only rank 0 writes files


def show_progress() -> bool:
    env = os.environ.get("KD_FRACTURE_PROGRESS")
    return env == "1" if env is not None else sys.stderr.isatty() and is_main()


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Independent, reproducible seed for one epoch (so resume needs no saved RNG stream)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------------------------------
# inference


@torch.inference_mode()
def predict_logits(model: nn.Module, loader, device: torch.device, amp: bool = True, channels_last: bool = False,
                   transform: Callable[[torch.Tensor], torch.Tensor] | None = None, desc: str | None = None,
                   precision: str = "auto") -> torch.Tensor:
    """Raw logits (N, C) in dataset order (the loader must not shuffle); autocast per `resolve_precision`."""
    model.eval()
    out = []
    batches = DeviceBatches(loader, device)
    for batch in tqdm(batches, desc=desc, leave=False, disable=not show_progress() or desc is None):
        x = batch["image"]
        if transform is not None:
            x = transform(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp, precision):
            logits = model(x)
        out.append(logits.float().reshape(len(x), -1))  # stays on the device: a .cpu() per batch waits for the GPU
    return torch.cat(out).cpu() if out else torch.empty(0, 1)


def predict_probs(model: nn.Module, loader, device: torch.device, amp: bool = True, **kwargs) -> np.ndarray:
    """Positive-class probability (N,) float64 in dataset order.

    float64, not the model's float32: a float64 is written to CSV by its exact shortest repr, so predictions read back
    from oof_predictions.csv give the metrics.json they came with. A float32 written as its shortest repr reads back
    as another number, and under bf16 autocast, whose logits take few distinct values, a study probability can sit
    exactly on the decision threshold, where that difference flips the prediction."""
    return positive_prob(predict_logits(model, loader, device, amp, **kwargs)).numpy().astype(np.float64)


PRECISIONS = ("auto", "fp32", "bf16")
AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


CPU_BF16_ENV = "KD_FRACTURE_CPU_BF16"
"""Set to 1 or 0 to make `cpu_bf16_supported()` answer so whatever the CPU is: `0` on an Intel Xeon with AMX runs
`train.precision: auto` as fp32, as an AMD EPYC without bf16 would; `1` on such an EPYC runs it as bf16 autocast
(emulated by oneDNN: slower, the same autocast). For running the test suite as the other kind of machine would."""


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (x86 flags avx512_bf16 or amx_bf16 in /proc/cpuinfo, or Arm bf16);
    elsewhere oneDNN emulates bf16, which is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))


def cpu_bf16_supported() -> bool:
    """What `train.precision: auto` takes the CPU to be: `cpu_has_native_bf16()`, unless KD_FRACTURE_CPU_BF16 says
    otherwise (read on every call, so a test can set it)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise UserError(f"{CPU_BF16_ENV}={forced!r}: set it to 1 (treat the CPU as bf16-capable), 0 (as without "
                        "bf16) or leave it unset (detect)")
    return cpu_has_native_bf16()


def resolve_precision(precision: str, device: torch.device, amp: bool = True) -> str:
    """train.precision (+ train.amp on CUDA) → the autocast this process uses: "fp32" | "bf16" | "fp16".

    CPU: auto → bf16 where `cpu_bf16_supported()`, else fp32; bf16 and fp32 as asked (amp is ignored).
    CUDA: fp32, or amp off → fp32; otherwise bf16 where the GPU supports it, else fp16 (with a GradScaler)."""
    if precision not in PRECISIONS:
        raise UserError(f"train.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        if precision == "fp32" or not amp:
            return "fp32"
        return "bf16" if precision == "bf16" or torch.cuda.is_bf16_supported() else "fp16"
    if precision == "auto":
        return "bf16" if device.type == "cpu" and cpu_bf16_supported() else "fp32"
    return precision


def precision_recipe(train: TrainConfig, device: torch.device | None = None) -> dict:
    """{} when `train` resolves to fp32 on `device` (default: its train.device), else {"precision": resolved}: what
    a cache key or study fingerprint adds for the precision (config.NOT_IN_RECIPES)."""
    resolved = resolve_precision(train.precision, device or resolve_device(train.device), train.amp)
    return {} if resolved == "fp32" else {"precision": resolved}


def autocast(device: torch.device, enabled: bool = True, precision: str = "auto"):
    """The autocast context of `resolve_precision(precision, device, enabled)` (a no-op for fp32)."""
    resolved = resolve_precision(precision, device, enabled)
    if resolved == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPE[resolved])


def evaluate_rows(model: nn.Module, loader, rows: pd.DataFrame, device: torch.device, amp: bool = True,
                  threshold: float = 0.5, **kwargs) -> tuple[pd.DataFrame, dict]:
    """Predict every row of `rows` (same order as the loader's dataset) → (predictions with `prob`, metrics)."""
    pred = rows.assign(prob=predict_probs(model, loader, device, amp, **kwargs))
    return pred, metrics.evaluate(pred, threshold)


# ----------------------------------------------------------------------------------------------------------------------
# compilation, GPU memory


COMPILES = ("auto", "on", "off")
COMPILE_MIN_STEPS = 10_000
"""train.compile auto compiles on CUDA from this many optimiser steps per fit. Compiled, a bf16 training step ran
1.10× (ResNet-50) and 1.33× (hybrid_s) the eager one at batch 128 on an H200 (issue #23), i.e. ≈ 3 and 5 ms saved
per step, against tens of seconds of compilation per process; below this a fit saves less than it compiles."""


def use_compile(cfg: TrainConfig, device: torch.device, steps: int) -> bool:
    """train.compile: on | off | auto (on CUDA for fits of ≥ COMPILE_MIN_STEPS steps; never on the CPU, where
    torch.compile took 46–164 s and ran 0.83–0.92× the eager step, benchmarks/README.md)."""
    if cfg.compile not in COMPILES:
        raise UserError(f"train.compile={cfg.compile!r}: choose one of {', '.join(COMPILES)}")
    if cfg.compile == "auto":
        return device.type == "cuda" and steps >= COMPILE_MIN_STEPS
    return cfg.compile == "on"


class CompiledOrEager(nn.Module):
    """`torch.compile(module)` for the training steps; if compiling fails (it happens at the first call), one line
    says so and the eager module trains from then on. The first call's time, which is the compilation, is logged.
    Parameters, state_dict and checkpoints stay the eager module's (`unwrap`)."""

    def __init__(self, module: nn.Module, name: str = ""):
        super().__init__()
        self.module = module
        object.__setattr__(self, "_compiled", torch.compile(module))  # not a submodule: no second copy of the keys
        self._name, self._first = name, True

    def forward(self, *args, **kwargs):
        if self._compiled is None:
            return self.module(*args, **kwargs)
        if not self._first:
            return self._compiled(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 — any compiler failure: train eagerly rather than not at all
            object.__setattr__(self, "_compiled", None)
            log(f"{self._name}warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                "training without compilation (train.compile=off silences this)")
            return self.module(*args, **kwargs)
        self._first = False
        log(f"{self._name}compiled the training step in {time.perf_counter() - t0:.1f}s (train.compile)")
        return out


@contextlib.contextmanager
def out_of_memory_is_a_user_error(cfg: TrainConfig, device: torch.device, name: str = ""):
    """CUDA out of memory → one line naming the batch sizes and the keys to lower; the last state stays resumable."""
    try:
        yield
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise TrainingError(f"{name}out of GPU memory at train.batch_size={cfg.batch_size} (evaluation: "
                            f"train.eval_batch_size={cfg.eval_batch_size}) on {device}: lower them, e.g. --set "
                            f"train.batch_size={max(1, cfg.batch_size // 2)}, and rerun the same command (finished "
                            "epochs and folds are kept)") from None


def cuda_memory(device: torch.device) -> dict:
    """{"cuda_peak_mem_gb": peak allocated since the last call} on CUDA (then reset), {} elsewhere."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 1e9
    torch.cuda.reset_peak_memory_stats(device)
    return {"cuda_peak_mem_gb": peak}


# ----------------------------------------------------------------------------------------------------------------------
# fit


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    history: pd.DataFrame
    stopped_early: bool


def fit(model: nn.Module, task: Task, train_loader, val_loader, val_rows: pd.DataFrame, cfg: TrainConfig,
        out_dir: str | Path, *, name: str = "", device: torch.device | None = None,
        epoch_callback: Callable[[int, dict], None] | None = None, tensorboard: bool = False,
        hparams: dict | None = None) -> FitResult:
    """Train `model` with `task` until `cfg.epochs` or early stopping; resume from `out_dir/state_last.pt` if present.

    out_dir receives checkpoint_best.safetensors (+ .json), state_last.pt (+ .json) and history.csv; on return the
    model holds the best inner-val weights. `epoch_callback(epoch, row)` is called after each epoch (Optuna uses it
    for nothing today; benchmarks use it for timing). Raises TrainingError on a non-finite loss, keeping the last
    good checkpoint.
    """
    out_dir = Path(out_dir)
    device = device or resolve_device(cfg.device)
    model.to(device)
    if cfg.channels_last:  # NHWC: faster on CUDA tensor cores and on CPU oneDNN (ResNet-50 training at 64 px,
        model.to(memory_format=torch.channels_last)  # 2 cores, batch 32: 33 vs 31 img/s; batch 16: 25 vs 20)
    optimizer = create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    **({"momentum": 0.9} if cfg.optimizer == "sgd" else {}))
    if cfg.checkpoint not in CHECKPOINT_CHOICES:
        raise UserError(f"train.checkpoint={cfg.checkpoint!r}: choose one of {', '.join(CHECKPOINT_CHOICES)}")
    steps_per_epoch = len(train_loader)
    scheduler, _ = create_scheduler_v2(optimizer, sched="step" if cfg.scheduler == "step" else "cosine",
                                       num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, min_lr=cfg.min_lr,
                                       warmup_lr=cfg.lr * 0.1, decay_epochs=cfg.step_epochs, decay_rate=0.1,
                                       step_on_epochs=not cfg.schedule_per_step, updates_per_epoch=steps_per_epoch)
    if cfg.scheduler == "none":
        scheduler = None
    precision = resolve_precision(cfg.precision, device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")  # bf16 keeps fp32's exponent: no scaling
    train_model = model
    if world_size() > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if use_compile(cfg, device, cfg.epochs * steps_per_epoch):
        train_model = CompiledOrEager(train_model, name)  # training steps only: eval batches vary in size

    start_epoch, best_score, best_epoch, bad_epochs, history = 0, -math.inf, -1, 0, []
    if (out_dir / LAST).exists():
        try:
            state = load_state(out_dir / LAST)
            if state["best_epoch"] >= 0:  # the run goes on from this best checkpoint: a damaged one means starting over
                verify_sidecar(out_dir / BEST)
            unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, best_score, best_epoch, bad_epochs = (state["epoch"] + 1, state["best_score"],
                                                               state["best_epoch"], state["bad_epochs"])
            history = [dict(zip(state["history_columns"], row)) for row in state["history"]]
            log(f"{name}resumed after epoch {state['epoch']} from {out_dir / LAST}")
        except CheckpointError as e:
            log(f"warning: {e}; restarting {name.strip(': ') or 'training'} from scratch")
            start_epoch, best_score, best_epoch, bad_epochs, history = 0, -math.inf, -1, 0, []
            if is_main():  # a best checkpoint of the abandoned run must not stand in for this run's
                remove_checkpoint(out_dir / BEST)
    if scheduler is not None:  # the lr the uninterrupted run had at this point (per-step: its update count)
        scheduler.step(start_epoch)
        scheduler.step_update(start_epoch * steps_per_epoch)

    stopped_early = False
    last_state_write = time.monotonic()  # state_last.pt is rewritten at most every train.state_interval_min
    # one event stream per fit in out_dir/tb; a resumed fit drops what a killed process wrote past start_epoch
    tb = TensorBoard(out_dir, start_epoch, enabled=tensorboard and is_main(), name=name)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if bad_epochs >= cfg.patience:
                stopped_early = True
                break
            t0 = time.perf_counter()
            seed_everything(epoch_seed(cfg.seed, epoch))
            set_epoch(train_loader, epoch, epoch_seed(cfg.seed + 1, epoch))
            timing: dict = {}
            with out_of_memory_is_a_user_error(cfg, device, name):
                parts = train_one_epoch(train_model, task, train_loader, optimizer, scaler, cfg, device, epoch, name,
                                        scheduler=scheduler if cfg.schedule_per_step else None, timing=timing)
                distributed.broadcast_buffers(unwrap(model))  # same BN statistics → same inner-val score
                if scheduler is not None:
                    scheduler.step(epoch + 1)
                t_eval = time.perf_counter()
                _, result = evaluate_rows(model, val_loader, val_rows, device, cfg.amp, channels_last=cfg.channels_last,
                                          precision=cfg.precision)
            t_writes = time.perf_counter()
            score = metrics.monitor_value(result, cfg.monitor)
            # checkpoint=last: every epoch "improves", so the kept weights are the final epoch's and patience never ends
            # the run early; best_score/best_epoch then describe the last epoch
            improved = score > best_score or cfg.checkpoint == "last"
            if improved:
                best_score, best_epoch, bad_epochs = score, epoch, 0
                if is_main():
                    save_weights(model, out_dir / BEST, {"epoch": epoch, cfg.monitor: score})
            else:
                bad_epochs += 1
            train_s = t_eval - t0
            row = {"epoch": epoch, **{f"train_{k}": v for k, v in parts.items()},
                   "val_study_kappa": result["study"]["kappa"], "val_study_auroc": result["study"]["auroc"],
                   "val_image_auroc": result["image"]["auroc"], "lr": optimizer.param_groups[0]["lr"],
                   "time_s": time.perf_counter() - t0, "best": improved,
                   # where the epoch went (benchmarks/bench_gpu.py reads these): training (of which waiting for data),
                   # inner-val evaluation, and the writes of this epoch (best checkpoint, then resumable state)
                   "train_s": train_s, "data_wait_s": timing.get("data_wait_s"), "eval_s": t_writes - t_eval,
                   "checkpoint_s": time.perf_counter() - t_writes,
                   "train_images_per_s": timing.get("images", 0) / train_s if train_s > 0 else None,
                   **cuda_memory(device)}
            history.append(row)
            state_due = time.monotonic() - last_state_write >= cfg.state_interval_min * 60
            if is_main() and state_due:
                last_state_write = time.monotonic()
                t_state = time.perf_counter()
                save_state(out_dir / LAST, {
                    "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs, "history_columns": list(history[0]),
                    "history": [[r.get(c) for c in history[0]] for r in history], "torch_rng": torch.get_rng_state(),
                    "seed": cfg.seed})
                row["checkpoint_s"] += time.perf_counter() - t_state
            if is_main():
                io.write_csv(out_dir / HISTORY, pd.DataFrame(history))
            tb.epoch(epoch, row)
            log(f"{name}epoch {epoch + 1}/{cfg.epochs}  loss {parts['loss']:.4f}  "
                f"val κ {row['val_study_kappa']:.3f} AUROC {row['val_study_auroc']:.3f}  "
                f"lr {row['lr']:.2e}  {row['time_s']:.1f}s{'  *' if improved else ''}")
            if epoch_callback is not None:
                epoch_callback(epoch, row)
    except BaseException:  # an error or Ctrl-C: the stream is closed (its thread stopped), the run is not
        tb.close()
        raise

    tb.close({"lr": cfg.lr, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "epochs": cfg.epochs,
              "optimizer": cfg.optimizer, "seed": cfg.seed, "precision": precision, **(hparams or {})},
             {"best_inner_val": best_score, "best_epoch": best_epoch, "epochs_run": len(history)})
    distributed.barrier()  # rank 0 has written the best checkpoint that every rank loads next
    if (out_dir / BEST).exists():
        load_weights(model, out_dir / BEST)
    return FitResult(best_epoch, best_score, pd.DataFrame(history), stopped_early)


def train_one_epoch(model: nn.Module, task: Task, loader, optimizer, scaler, cfg: TrainConfig,
                    device: torch.device, epoch: int, name: str = "", scheduler=None,
                    timing: dict | None = None) -> dict[str, float]:
    """One pass over `loader`; returns the mean of every loss part. `scheduler`: timm scheduler updated per step.
    `timing`, if given, receives data_wait_s (the loop waiting for the host loader) and images.

    The loss parts are summed on the device and read once at the end of the epoch: reading a CUDA number every step
    (`float(loss)`, `isfinite(loss)`) waits for the GPU to finish that step, so the CPU could not queue the next one
    and the GPU idles between steps. A non-finite loss therefore stops the run at the end of its epoch, before
    anything of that epoch is saved."""
    model.train()
    sums: dict[str, torch.Tensor] = {}  # loss part → Σ part × batch size, float64 on the device
    n = 0
    batches = DeviceBatches(loader, device, cfg.channels_last)  # on CUDA: batch k+1 is copied during step k
    progress = show_progress()
    bar = tqdm(batches, desc=f"{name}epoch {epoch + 1}", leave=False, disable=not progress)
    for step, batch in enumerate(bar):
        with autocast(device, cfg.amp, cfg.precision):
            parts = task.losses(model, batch, epoch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(parts["loss"]).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step_update(epoch * len(loader) + step + 1)
        bs = len(batch["image"])
        n += bs
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.detach().double() * bs
        if progress:  # a terminal's progress bar reads the loss (one sync per step, only there)
            bar.set_postfix(loss=f"{float(sums['loss']) / n:.4f}")
    totals = dict(zip(sums, torch.stack(list(sums.values())).tolist())) if sums else {}  # the epoch's one sync
    if distributed.world_size() > 1:  # epoch means over all ranks' shards, as one process would log them
        summed = torch.tensor([n, *totals.values()], dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        n, totals = int(summed[0]), dict(zip(totals, summed[1:].tolist()))
    if not all(math.isfinite(v) for v in totals.values()):
        raise TrainingError(f"{name}epoch {epoch + 1}: loss became {totals.get('loss')} (lr {cfg.lr:g} too high, or "
                            "bad input?); stopped, the last good checkpoint is kept — lower --lr and rerun")
    if timing is not None:
        timing.update(data_wait_s=batches.wait_s, images=n)
    return {k: v / max(n, 1) for k, v in totals.items()}


def set_epoch(loader, epoch: int, shuffle_seed: int) -> None:
    """Per-epoch shuffle order, augmentation view and DistributedSampler epoch, all derived from (seed, epoch)."""
    sampler = getattr(loader, "sampler", None)
    for owner in (loader, sampler):  # RandomSampler draws the order from its own generator
        if getattr(owner, "generator", None) is not None:
            owner.generator.manual_seed(shuffle_seed)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def log(msg: str) -> None:
    if is_main():
        tqdm.write(msg, file=sys.stderr)
