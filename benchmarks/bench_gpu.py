"""The GPU benchmark (issue #23, #24): how much of the GPU the pipeline uses, side by side with what the GPU can do.

    python benchmarks/bench_gpu.py                      # ≈ 8 min on an H100/H200 → benchmarks/gpu.{json,md}
    python benchmarks/bench_gpu.py --skip-quickstart    # without the two README commands (≈ 4 min)
    python benchmarks/bench_gpu.py --smoke --out /tmp/g.json   # every section at toy sizes, on any device (a test)

In one process, on one GPU:
1. **ceiling**: a bare training step (synthetic tensors already on the device, bf16 autocast, channels_last, fused
   AdamW, BCE) of the teacher (resnet50) and the default student (hybrid_s) at 224 px, at the recipe's batch (32)
   and at the GPU batch (128); also batch-1 inference latency of both in their served form (`models.for_inference`,
   BatchNorm folded), eager and replayed as CUDA graphs (`models.graphed`).
2. **recipe**: `studies/teacher_resnet50_mura224.yaml` on a 224-px phantom with ≥ 4,000 training images per fold
   epoch, fold 0, 3 epochs, at batch 32 (lr 3e-4) and at the study's GPU batch; steady state = epochs after the
   first. Training and evaluation images/s, GPU utilisation (nvidia-smi every 0.5 s), peak memory, the per-epoch
   breakdown from history.csv, and the ratio to the ceiling at the same model and batch.
3. **quickstart**: the README's two commands with an empty cache directory (cold), then again (warm), wall time each,
   and the per-epoch breakdown of the teacher's and the student's fold-0 epochs.
Without CUDA it prints one line and exits 0. A GPU already busy at the start (utilisation > 10 % or other
processes) is printed and recorded in gpu.json (`busy_at_start`), not hidden in the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MURA_TRAIN_IMAGES, MURA_VALID_IMAGES = 36_808, 3_197
"""MURA v1.1 (docs/design.md §2.1): the CV pool and the holdout."""


def nvidia_smi(query: str) -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


class UtilSampler:
    """GPU utilisation (0–1) sampled with nvidia-smi every `period` s in a thread, between start() and stop()."""

    def __init__(self, index: int = 0, period: float = 0.5):
        self.index, self.period, self.samples = index, period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = nvidia_smi("gpu=utilization.gpu")
            if len(rows) > self.index:
                try:
                    self.samples.append(float(rows[self.index]) / 100)
                except ValueError:
                    pass
            self._stop.wait(self.period)

    def __enter__(self) -> UtilSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def figure(fid: str, name: str, value, target, op: str, unit: str) -> dict:
    met = None if value is None else (value >= target if op == ">=" else value <= target)
    return {"id": fid, "name": name, "value": None if value is None else round(float(value), 4), "target": target,
            "op": op, "met": met, "unit": unit}


# ----------------------------------------------------------------------------------------------------------------------
# 1. the bare step


def bare_step(model_name: str, batch: int, size: int, device, steps: int, warmup: int) -> float:
    """Training images/s of a bare step: synthetic tensors on the device, bf16 autocast, channels_last, fused AdamW."""
    import torch

    from kd_fracture.models import create_model

    torch.manual_seed(0)
    in_chans = 1 if model_name.startswith("hybrid") else 3
    model = create_model(model_name, in_chans=in_chans, img_size=size).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = torch.randn(batch, in_chans, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device).float()
    dtype = torch.bfloat16

    def step():
        with torch.autocast(device.type, dtype=dtype):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float().view(-1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def latency_ms(model_name: str, size: int, device, runs: int, graph: bool = False) -> float:
    """Batch-1 forward latency in ms of the served form (`models.for_inference`: eval, BatchNorm folded), bf16
    autocast on CUDA (fp32 elsewhere), channels_last; `graph`: replayed as a CUDA graph (`models.graphed`)."""
    import contextlib

    import torch

    from kd_fracture.models import create_model, for_inference, graphed

    in_chans = 1 if model_name.startswith("hybrid") else 3
    model = for_inference(create_model(model_name, in_chans=in_chans, img_size=size), name=model_name).to(device)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(1, in_chans, size, size, device=device).contiguous(memory_format=torch.channels_last)
    if graph:
        model = graphed(model, x, name=model_name)  # autocast is captured inside the graph
    ctx = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and not graph
           else contextlib.nullcontext())
    times = []
    with torch.inference_mode(), ctx:
        for i in range(runs + 5):
            sync(device)
            t0 = time.perf_counter()
            model(x)
            sync(device)
            if i >= 5:
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------------
# 2. the recipe


def recipe_run(work: Path, phantom: Path, batch: int, lr: float, epochs: int, size: int, smoke: bool) -> dict:
    """Fold 0 of the MURA recipe on the 224-px phantom at `batch`: its history.csv and metrics, with GPU utilisation."""
    from kd_fracture.config import CVConfig, load_config
    from kd_fracture.pipelines.cv import run_cv

    run = work / f"recipe_b{batch}"
    over = {"run_dir": str(run), "data.root": str(phantom), "data.manifests_dir": str(work / "manifests"),
            "model.pretrained": "none", "train.epochs": epochs, "train.batch_size": batch, "train.lr": lr,
            "train.warmup_epochs": 0, "train.patience": 100, "eval.bootstrap": 10, "refit": False}
    if smoke:
        over.update({"data.img_size": size, "model.name": "resnet10t", "train.eval_batch_size": 64})
    cfg = load_config(CVConfig, ROOT / "studies" / "teacher_resnet50_mura224.yaml", over)
    with UtilSampler() as util:
        t0 = time.perf_counter()
        run_cv(cfg, folds_to_run=[0])
        wall = time.perf_counter() - t0
    import pandas as pd

    history = pd.read_csv(run / "fold_0" / "history.csv")
    metrics = json.loads((run / "fold_0" / "metrics.json").read_text())
    steady = history.iloc[1:] if len(history) > 1 else history
    eval_images = metrics["n_inner_val"]
    return {"batch": batch, "lr": lr, "wall_s": round(wall, 1), "n_train": metrics["n_train"],
            "n_inner_val": eval_images, "train_ips": float(steady["train_images_per_s"].median()),
            "eval_ips": float(eval_images / steady["eval_s"].median()),
            "gpu_util": util.mean,
            "peak_mem_gb": float(history["cuda_peak_mem_gb"].max()) if "cuda_peak_mem_gb" in history else None,
            "breakdown": steady[["train_s", "data_wait_s", "eval_s", "checkpoint_s", "time_s"]].median().to_dict(),
            "kappa": metrics["study"]["kappa"], "auroc": metrics["study"]["auroc"]}


def mura_5fold_minutes(train_ips: float, eval_ips: float, folds: int = 5, epochs: int = 30,
                       inner_val_frac: float = 0.2) -> float:
    """Full MURA, `folds` folds × `epochs` epochs, from the measured per-image costs: each epoch trains on the
    fold's training part and evaluates its inner-validation split; each fold then scores its fold and the holdout."""
    pool = MURA_TRAIN_IMAGES
    train = pool * (folds - 1) / folds * (1 - inner_val_frac)
    inner = pool * (folds - 1) / folds * inner_val_frac
    per_fold = epochs * (train / train_ips + inner / eval_ips) + (pool / folds + MURA_VALID_IMAGES) / eval_ips
    return folds * per_fold / 60


# ----------------------------------------------------------------------------------------------------------------------
# 3. the quick start


def quickstart(work: Path, label: str, cache: Path, smoke: bool) -> dict:
    """The README's `cv --folds 5` then `distill`, as subprocesses from the repository root, into `work/label`,
    with `cache` as the cache directory. Wall time per command and each one's fold-0 epoch breakdown."""
    import pandas as pd

    run = work / label / "runs" / "phantom" / "resnet50"
    sets = ["--set", f"data.phantom.cache_dir={cache}"]
    dsets = []
    if smoke:  # toy sizes: the command path, not the figures
        sets += ["--set", "data.phantom.patients=40", "--set", "data.phantom.size=32", "--set", "data.img_size=32",
                 "--set", "pretrain.patients=40", "--set", "pretrain.train.epochs=1", "--set", "train.epochs=1",
                 "--set", "eval.bootstrap=10", "--model", "resnet10t", "--folds", "2",
                 "--set", f"data.manifests_dir={work / 'manifests'}"]
        dsets = ["--n-trials", "1", "--epochs", "1", "--search-epochs", "1", "--student", "hybrid_t",
                 "--set", "pretrain.train.epochs=1", "--set", "eval.bootstrap=10", "--set", "onnx=false"]
    env = dict(os.environ, KD_FRACTURE_PROGRESS="0", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH",
                                                                                                        ""))
    out = {}
    commands = {"cv": [sys.executable, "-m", "kd_fracture.cv", "--folds", "5", *sets, "--out", str(run)],
                "distill": [sys.executable, "-m", "kd_fracture.distill", "--run", str(run), *dsets]}
    for name, cmd in commands.items():
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        out[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            raise SystemExit(f"bench_gpu: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out["total_s"] = round(out["cv_s"] + out["distill_s"], 1)
    cols = ["train_s", "data_wait_s", "eval_s", "checkpoint_s", "time_s", "train_images_per_s"]
    teacher = pd.read_csv(run / "fold_0" / "history.csv")
    out["teacher_epoch"] = teacher[[c for c in cols if c in teacher]].iloc[-1].to_dict()
    students = sorted((run / "distill").glob("*/final/*_kd/fold_0/history.csv"))
    if students:
        student = pd.read_csv(students[0])
        out["student_epoch"] = student[[c for c in cols if c in student]].iloc[-1].to_dict()
    return out


# ----------------------------------------------------------------------------------------------------------------------


def environment(device) -> dict:
    import torch

    from kd_fracture.runs.rundir import cpu_model, git_sha

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpu": cpu_model(), "cpu_cores": os.cpu_count(),
           "commit": git_sha(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        driver = nvidia_smi("gpu=driver_version")
        env["driver"] = driver[0] if driver else None
    return env


def busy_at_start() -> dict:
    util = nvidia_smi("gpu=utilization.gpu")
    procs = nvidia_smi("compute-apps=pid,process_name,used_memory")
    mine = str(os.getpid())
    others = [p for p in procs if not p.startswith(mine + ",")]
    busy = {"utilization": float(util[0]) / 100 if util else None, "other_processes": others}
    busy["busy"] = bool(others) or (busy["utilization"] or 0) > 0.10
    return busy


def write_md(path: Path, result: dict) -> None:
    env = result["environment"]
    lines = [f"# GPU benchmark — {env.get('gpu', env['device'])}", "",
             f"`python benchmarks/bench_gpu.py` on {env.get('gpu', env['device'])} (driver {env.get('driver')}), "
             f"torch {env['torch']} + CUDA {env['cuda']}, {env['cpu_cores']} CPU cores ({env['cpu']}), commit "
             f"{(env['commit'] or '?')[:7]}; {result['wall_s']:.0f} s.", ""]
    if result["busy_at_start"].get("busy"):
        lines += [f"**The GPU was busy at the start** ({result['busy_at_start']}): the figures may be low.", ""]
    lines += ["| id | figure | value | target | met |", "|---|---|---|---|---|"]
    for f in result["figures"]:
        value = "not measured" if f["value"] is None else f"{f['value']:g} {f['unit']}"
        met = "n/a" if f["met"] is None else ("yes" if f["met"] else "**no**")
        lines.append(f"| `{f['id']}` | {f['name']} | {value} | {f['op']} {f['target']} | {met} |")
    lines += ["", "Details (per-epoch breakdowns, every arm): `gpu.json`."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu.json"), help="gpu.json to write (and gpu.md)")
    p.add_argument("--skip-quickstart", action="store_true", help="leave out the two README commands")
    p.add_argument("--smoke", action="store_true", help="toy sizes on any device (checks the code path, not figures)")
    p.add_argument("--patients", type=int, default=1800,
                   help="224-px phantom patients: ≥ 4,000 fold-0 training images at the default")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("bench_gpu: no CUDA device found; nothing measured (run it on a machine with an NVIDIA GPU)")
        return 0
    sys.path.insert(0, str(ROOT))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    result = {"schema_version": 1, "environment": environment(device), "busy_at_start": busy_at_start(),
              "figures": [], "details": {}}
    if result["busy_at_start"]["busy"]:
        print(f"bench_gpu: warning: the GPU is busy at the start: {result['busy_at_start']}", file=sys.stderr)
    size = 32 if args.smoke else 224
    steps, warmup = (2, 1) if args.smoke else (30, 10)
    recipe_batch, gpu_batch = (8, 16) if args.smoke else (32, 128)

    # 1. ceilings
    ceiling = {f"{m}_b{b}": bare_step(m, b, size, device, steps, warmup)
               for m in ("resnet50", "hybrid_s") for b in (recipe_batch, gpu_batch)}
    runs = 5 if args.smoke else 200
    latency = {f"{m}_{mode}": latency_ms(m, size, device, runs, graph=mode == "graphed")
               for m in ("resnet50", "hybrid_s") for mode in ("eager", "graphed")}
    result["details"]["ceiling_ips"] = {k: round(v, 1) for k, v in ceiling.items()}
    result["details"]["latency_ms_b1_served"] = {k: round(v, 4) for k, v in latency.items()}
    print(f"bench_gpu: ceilings {result['details']['ceiling_ips']}, batch-1 latency {latency}", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        # 2. recipe
        from kd_fracture.data.phantom import generate_phantom

        phantom = generate_phantom(work / "phantom224", patients=40 if args.smoke else args.patients,
                                   size=size, seed=0, workers=max(1, (os.cpu_count() or 2) - 1))
        recipes = {b: recipe_run(work, phantom, b, lr, epochs=2 if args.smoke else 3, size=size, smoke=args.smoke)
                   for b, lr in ((recipe_batch, 3e-4), (gpu_batch, 3e-4 * gpu_batch / recipe_batch))}
        result["details"]["recipe"] = recipes
        small, big = recipes[recipe_batch], recipes[gpu_batch]
        result["figures"] += [
            figure("recipe_vs_ceiling", f"MURA recipe training img/s ÷ bare step, resnet50 224 px, batch {gpu_batch}",
                   big["train_ips"] / ceiling[f"resnet50_b{gpu_batch}"], 0.8, ">=", "×"),
            figure("recipe_vs_ceiling_b32", f"same at batch {recipe_batch}",
                   small["train_ips"] / ceiling[f"resnet50_b{recipe_batch}"], 0.8, ">=", "×"),
            figure("recipe_ips_gpu_batch", f"resnet50 224 px training img/s at batch {gpu_batch}", big["train_ips"],
                   3000, ">=", "img/s"),
            figure("mura_5fold_min", "full MURA, 5 folds × 30 epochs (measured per-image costs × MURA's counts)",
                   mura_5fold_minutes(big["train_ips"], big["eval_ips"]), 30, "<=", "min"),
            figure("gpu_util_recipe", "mean GPU utilisation during the recipe's epochs", big["gpu_util"], 0.7, ">=",
                   "0–1"),
            figure("student_train_gpu", f"hybrid_s ÷ resnet50 bare-step training img/s, 224 px, batch {gpu_batch}",
                   ceiling[f"hybrid_s_b{gpu_batch}"] / ceiling[f"resnet50_b{gpu_batch}"], 3, ">=", "×"),
            figure("student_latency_gpu", "batch-1 latency, served hybrid_s ÷ served resnet50, 224 px, CUDA graphs",
                   latency["hybrid_s_graphed"] / latency["resnet50_graphed"], 0.3, "<=", "×"),
            figure("student_latency_gpu_eager", "same, both eager", latency["hybrid_s_eager"] /
                   latency["resnet50_eager"], 0.3, "<=", "×"),
            figure("student_latency_gpu_ms", "batch-1 latency of the served hybrid_s, 224 px, CUDA graphs",
                   latency["hybrid_s_graphed"], 1.0, "<=", "ms"),
        ]
        # 3. quick start
        if not args.skip_quickstart:
            cache = work / "cache"
            cold = quickstart(work, "cold", cache, args.smoke)
            warm = quickstart(work, "warm", cache, args.smoke)
            result["details"]["quickstart"] = {"cold": cold, "warm": warm}
            result["figures"] += [
                figure("quickstart_cold_s", "README quick start, both commands, empty caches", cold["total_s"], 120,
                       "<=", "s"),
                figure("quickstart_warm_s", "the same again, caches built", warm["total_s"], 60, "<=", "s")]
        else:
            result["figures"] += [figure("quickstart_cold_s", "README quick start, empty caches", None, 120, "<=", "s"),
                                  figure("quickstart_warm_s", "the same, caches built", None, 60, "<=", "s")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    write_md(out.with_suffix(".md"), result)
    for f in result["figures"]:
        print(f"{f['id']:28s} {f['value']!s:>10} {f['op']} {f['target']}  met={f['met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
