"""`python benchmarks/run.py`: the project's performance figures, each a ratio measured side by side in one run.

    python benchmarks/run.py                      # every benchmark except the long one (search_teacher_cost)
    python benchmarks/run.py --long               # … and the long one (two distill searches: ≈ 15–25 min more)
    python benchmarks/run.py --quick              # tiny settings: a smoke run of every code path, long one included
    python benchmarks/run.py --only pipeline teacher_cache --out benchmarks/
    python benchmarks/run.py --only search_teacher_cost --out /tmp/search

Every figure is a ratio of two things timed in the same process, alternately (A B, B A, A B, …: slow drifts of a
shared machine hit both sides), and is the median over repeats of the per-repeat ratio; absolute times are kept
beside it. Writes `<out>/results.json` (machine, versions, threads, settings, figures) and `<out>/results.md`.

| name            | figure (target)                                                                              |
|-----------------|----------------------------------------------------------------------------------------------|
| pipeline        | training epoch through the real loader ÷ its pure compute on batches in memory (≤ 1.10)      |
| image_cache     | loader epoch 2: PIL + torchvision decoding every PNG ÷ decoded-image cache (≥ 2)             |
| teacher_cache   | KD epoch with the ResNet-50 teacher run online ÷ with cached replayed-view logits (≥ 3)      |
| student_teacher | student ÷ teacher: parameters (≤ 0.20), CPU latency at 224 px, batch 1 and 32 (≤ 0.25);     |
|                 | student_latency: batch 1 at 64 and 224 px, torch and onnxruntime (≤ 0.15)                    |
| pruning         | 20-trial Optuna search, pruned vs not: fold-epochs saved (≥ 40 %), best-value gap (≤ noise)  |
| scale           | manifest load + validation + folds at 10k/40k/160k rows: per-row time and peak memory (flat) |
| peer_epoch      | cv epoch vs a plain PIL + albumentations + timm loop, training images/s (≥ 1.25, 64/128 px); |
|                 | checkpoint_overhead: share of that epoch spent writing checkpoints/state/history (≤ 0.05)    |
| bf16            | ResNet-50 train / inference images/s, bf16 autocast ÷ fp32 (≥ 1.4 / ≥ 2; "not supported"     |
|                 | where the CPU has no avx512_bf16 / amx_bf16)                                                 |
| student_gflops  | achieved GFLOP/s of the student's training step ÷ the teacher's, 64 px (≥ 0.5)               |
| search_teacher_cost | long, opt-in: default distill search, teacher cache vs `--teacher-cache none` (≥ 2.5)    |

Benchmark `<name>` is `run(ctx)` in `benchmarks/bench_<name>.py`; what they share (settings, figures, timing, the
benchmark phantom) is in `benchmarks/common.py`. Everything runs on CPU (the figures are defined for the 2-core
machine; a GPU would change every ratio).
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE):  # the checkout's kd_fracture without `pip install -e .`; common, bench_<name>
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from typing import Any  # noqa: E402

# common first: it sets OMP_WAIT_POLICY before anything imports torch
from common import QUICK, SCHEMA_VERSION, Context, Result, Settings, rounded  # noqa: E402, I001

import bench_bf16  # noqa: E402
import bench_image_cache  # noqa: E402
import bench_peer_epoch  # noqa: E402
import bench_pipeline  # noqa: E402
import bench_pruning  # noqa: E402
import bench_scale  # noqa: E402
import bench_search_teacher_cost  # noqa: E402
import bench_student_gflops  # noqa: E402
import bench_student_teacher  # noqa: E402
import bench_teacher_cache  # noqa: E402

from kd_fracture import io  # noqa: E402
from kd_fracture.errors import UserError, cli_main  # noqa: E402

RUNNERS: dict[str, Callable[[Context], Result]] = {
    "pipeline": bench_pipeline.run, "image_cache": bench_image_cache.run, "teacher_cache": bench_teacher_cache.run,
    "student_teacher": bench_student_teacher.run, "pruning": bench_pruning.run, "scale": bench_scale.run,
    "peer_epoch": bench_peer_epoch.run, "bf16": bench_bf16.run, "student_gflops": bench_student_gflops.run,
    "search_teacher_cost": bench_search_teacher_cost.run,
}
"""The benchmark registry, in run order: name → `run(ctx)` of `bench_<name>.py`."""
LONG = ("search_teacher_cost",)
"""Benchmarks that take many minutes at full size (two whole distill searches): run only when asked for, by
`--long` or `--only NAME`; `--quick` runs them at tiny sizes like the rest."""
ALL = tuple(RUNNERS)
BENCHMARKS = tuple(n for n in ALL if n not in LONG)
"""What a plain `python benchmarks/run.py` runs."""

VERSIONS = ("torch", "torchvision", "timm", "albumentations", "opencv-python-headless", "opencv-python", "numpy",
            "pandas", "scikit-learn", "optuna", "onnx", "onnxruntime", "pillow")
"""Packages whose versions results.json records (on top of those `rundir.environment` records)."""


# ----------------------------------------------------------------------------------------------------------------------
# environment and report


def environment(settings: Settings) -> dict:
    """Machine, versions, threads and load: what a reader needs to compare two results files.

    `kd_fracture.runs.rundir.environment` (versions, git sha, platform, python, torch threads, …, as a run dir
    records them), plus the CPU, the benchmarks' extra package versions, the OpenMP settings, DataLoader workers and
    the load average. Call it inside the benchmarks' thread setting (`torch_threads` is read, not set)."""
    import importlib.metadata as md

    import torch

    from kd_fracture.runs.rundir import environment as run_environment

    env = run_environment(seed=0, device="cpu")
    env["command"] = " ".join([Path(sys.executable).name, *sys.argv]) if sys.argv else None  # a script, not -m
    for pkg in VERSIONS:
        if pkg not in env["versions"]:
            try:
                env["versions"][pkg] = md.version(pkg)
            except md.PackageNotFoundError:
                env["versions"][pkg] = None
    env.update({
        "cpu": env["cpu"], "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "num_workers": settings.num_workers,
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "git_commit": env["git_sha"],  # the key earlier results.json files have
    })
    return env


def format_markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    v = env["versions"]
    lines = [
        "# kd_fracture benchmarks", "",
        (f"`python benchmarks/run.py{' ' + report['mode_flag'] if report['mode_flag'] else ''}` — "
         f"{report['started']}, {report['wall_s']:.0f} s. CPU: {env['cpu']} ({env['cpus_usable']} usable), "
         f"torch {v['torch']}, {env['torch_threads']} threads for training and {s['latency_threads']} for latency, "
         f"OMP_WAIT_POLICY={env['omp_wait_policy']}, DataLoader workers {env['num_workers']}, load average "
         f"{_fmt_load(env['load_average_start'])} at start and {_fmt_load(env.get('load_average_end'))} at end "
         "(a shared machine: every figure is a ratio of two arms timed alternately)."), "",
        "| # | figure | value | target | met | unit |", "|---|---|---|---|---|---|"]
    figure_notes = []
    for name, bench in report["benchmarks"].items():
        for f in bench.get("figures", []):
            lines.append(f"| {f['id']} | {f['name']} | {_fmt(f['value'])} | {f['op']} {_fmt(f['target'])} | "
                         f"{_fmt_met(f['met'])} | {f['unit']} |")
            if f.get("note"):
                figure_notes.append(f"- **{f['id']}**: {f['note']}")
    if figure_notes:
        lines += ["", *figure_notes]
    lines += ["", "## Measurements (no target)", "", "| benchmark | measurement | value | unit |", "|---|---|---|---|"]
    for name, bench in report["benchmarks"].items():
        for m, mv in bench.get("measurements", {}).items():
            lines.append(f"| {name} | {m} | {_fmt(mv['value'])} | {mv['unit']} |")
    notes = [(name, n) for name, bench in report["benchmarks"].items() for n in bench.get("notes", [])]
    if notes:
        lines += ["", "## Notes", ""] + [f"- **{name}**: {n}" for name, n in notes]
    return "\n".join(lines) + "\n"


def _fmt_met(met: bool | str) -> str:
    """yes / **no** / the state a figure has instead (NOT_SUPPORTED)."""
    if isinstance(met, str):
        return met
    return "yes" if met else "**no**"


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _fmt_load(load: Sequence[float] | None) -> str:
    return "n/a" if not load else f"{load[0]:.1f}"


# ----------------------------------------------------------------------------------------------------------------------
# running


def run(settings: Settings, only: Sequence[str] = BENCHMARKS, out: Path | None = None, mode_flag: str = "",
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    """Run the selected benchmarks; write `out/results.json` and `out/results.md` when `out` is given."""
    from kd_fracture.models.export import num_threads

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t_all = time.perf_counter()
    with num_threads(settings.threads):  # restored afterwards (tests call this in-process)
        env = environment(settings)
    report: dict = {"schema_version": SCHEMA_VERSION, "started": started, "mode_flag": mode_flag,
                    "settings": asdict(settings), "environment": env, "benchmarks": {}}
    with tempfile.TemporaryDirectory(prefix="kd_fracture_bench_") as work:
        ctx = Context(settings, Path(work))
        for name in only:
            log(f"bench {name} …")
            t0 = time.perf_counter()
            with num_threads(settings.threads):
                result = RUNNERS[name](ctx)
            entry = {"seconds": time.perf_counter() - t0, "figures": [f.as_dict() for f in result.figures],
                     "measurements": result.measurements, "notes": result.notes}
            report["benchmarks"][name] = rounded(entry)
            for f in entry["figures"]:
                state = f["met"] if isinstance(f["met"], str) else "met" if f["met"] else "MISSED"
                log(f"  {f['id']} {f['name']}: {_fmt(f['value'])} (target {f['op']} {_fmt(f['target'])}) {state}")
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
        prog="python benchmarks/run.py",
        description="Performance figures as ratios measured side by side (see benchmarks/README.md).")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke run of every benchmark")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None,
                        help=f"run only these benchmarks: {', '.join(ALL)}")
    parser.add_argument("--long", action="store_true",
                        help=f"also run the long benchmarks ({', '.join(LONG)}; minutes each at full size)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"), help="folder for results.json / results.md")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2, or fewer cores)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 0, the project's)")
    parser.add_argument("--repeats", type=int, default=None, help="paired repeats per ratio")
    parser.add_argument("--cache-dir", default=None, help="where the benchmark phantom is cached")
    parser.add_argument("--scale-dir", default=None, help="where the scale benchmark writes its files")
    parser.add_argument("--search-phantom", choices=("default", "bench"), default=None,
                        help="data of search_teacher_cost: the project's default phantom (400 patients, 64-px PNGs; "
                             "default at full size) or the benchmark phantom")
    args = parser.parse_args(argv)

    only = args.only or list(ALL if args.long or args.quick else BENCHMARKS)
    unknown = [n for n in only if n not in ALL]
    if unknown:
        raise UserError(f"--only {' '.join(unknown)}: unknown benchmark; choose from {', '.join(ALL)}")
    settings = QUICK if args.quick else Settings()
    for flag, value, low in (("threads", args.threads, 1), ("workers", args.workers, 0), ("repeats", args.repeats, 1)):
        if value is not None and value < low:
            raise UserError(f"--{flag} {value}: must be at least {low}")
    overrides = {"threads": args.threads or min(settings.threads, os.cpu_count() or 1), "num_workers": args.workers,
                 "repeats": args.repeats, "cache_dir": args.cache_dir, "scale_dir": args.scale_dir,
                 "search_phantom": args.search_phantom}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    run(settings, only, args.out, mode_flag=" ".join(f for f, on in (("--quick", args.quick), ("--long", args.long))
                                                   if on))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
