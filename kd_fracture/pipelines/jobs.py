"""N independent jobs of one command as concurrent processes (nnU-Net's one process per fold), e.g. `cv --jobs N`.

One fold of the default run (ResNet-50 at 64 px, ≈ 700 images) fills a few percent of an H100/H200; N folds side by
side fill it N times as much. Each job is the command a user could have typed (`python -m kd_fracture.cv --out RUN
--fold K`), so it takes the run's locks, seeds and resume rules unchanged: the results are those of a sequential
run. The CPU threads and DataLoader workers of the machine are divided among the jobs; a job that fails fails the
whole with its own last line.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

from kd_fracture.data.loaders import cores
from kd_fracture.errors import UserError
from kd_fracture.train import engine

JOBS_AUTO = "auto"


def parse_jobs(value: int | str | None) -> int | str:
    """`--jobs` as given → a number ≥ 1 or "auto"; anything else is a UserError (checked before anything is written)."""
    if value in (None, JOBS_AUTO):
        return JOBS_AUTO
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"--jobs {value!r}: a number ≥ 1, or auto") from None
    if n < 1:
        raise UserError(f"--jobs {n}: a number ≥ 1, or auto")
    return n


def resolve_jobs(value: int | str | None, pending: int, device: torch.device, img_size: int) -> int:
    """`--jobs` → how many processes to run at once (never more than `pending`; more is clamped with a note).

    auto: 1 on the CPU (two processes on the same cores only split them) and for large inputs on CUDA (> 128 px:
    one ResNet-50 fold at 224 px already keeps the GPU busy, issue #23); for small inputs on CUDA, one process per
    two CPU cores, at most 4 and at most the pending jobs."""
    n = parse_jobs(value)
    if n == JOBS_AUTO:
        if device.type != "cuda" or img_size > 128:
            return 1
        return max(1, min(pending, 4, cores() // 2))
    if n > pending > 0:
        engine.log(f"note: --jobs {n} is more than the {pending} job(s) left to run; running {pending} at once")
        return pending
    return n


def threads_per_job(jobs: int) -> int:
    """torch threads of each of `jobs` concurrent processes: this process's cores, shared out."""
    return max(1, cores() // jobs)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the job gets SIGKILL when the process that started it dies (a killed `cv --jobs` leaves no orphans)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def run_jobs(commands: Sequence[list[str]], jobs: int, names: Sequence[str]) -> None:
    """Run `commands` (argv lists), at most `jobs` at once; each gets cores // jobs torch threads. Their stderr is
    this process's. Returns when all succeeded; otherwise, once the running ones have finished, raises a UserError
    naming the first failure and its exit code."""
    threads = threads_per_job(jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    queue = list(zip(names, commands))
    running: list[tuple[str, subprocess.Popen]] = []
    failed: list[tuple[str, int]] = []
    try:
        while queue or running:
            while queue and len(running) < jobs and not failed:
                name, cmd = queue.pop(0)
                engine.log(f"job {name}: {' '.join(cmd[1:])}")
                running.append((name, subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                                       preexec_fn=_die_with_parent if sys.platform == "linux"
                                                       else None)))
            for item in list(running):
                name, proc = item
                if proc.poll() is not None:
                    running.remove(item)
                    if proc.returncode != 0:
                        failed.append((name, proc.returncode))
            if failed and not running:
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        for _, proc in running:
            proc.send_signal(signal.SIGINT)
        for _, proc in running:
            proc.wait()
        raise
    if failed:
        name, rc = failed[0]
        raise UserError(f"job {name} exited with code {rc} (its error is above); rerun the same command to resume: "
                        "finished folds are kept")
