"""Chaos (issue #15 item 7): a tiny `cv` + `distill`, SIGKILLed at 10 seeded random moments across both phases and
rerun after each kill until it finishes, ends with the results of an uninterrupted run.

Compared exactly: the cv run's tables/*.csv and holdout/predictions.csv, each distilled variant's holdout
predictions, and distill's tables (teacher_vs_student.csv without its `latency_ms` column, a timing; everything
else, parameters and FLOPs included, must be equal). Trials: every variant's study holds the same finished trials
(same parameters, states and values, in the same order; no duplicate parameter set), none RUNNING or WAITING, and no
dead trial's folder is left. Timings, durations and the trials' dates legitimately differ and are not compared.

Kill moments: per phase, each attempt is killed a seeded random delay after its first log line (imports done), up
to SPREAD × the phase's uninterrupted work time / its number of kills, so the kills spread over the phase (a resumed
attempt skips the work already done); the last distill kill comes inside a final student's second epoch, so a final
fold resumes from its state_last.pt. Kills left when a phase finishes first move to the next; at least 8 of the 10
must land.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

SEED = 15
KILLS = {"cv": 4, "distill": 5}  # + 1 in the final students: 10
FIRST_LINE = r"."
FINAL_EPOCH = r"^hybrid_t_(no_)?kd fold \d: epoch 1/2"
VARIANTS = ("hybrid_t_kd", "hybrid_t_no_kd")
SPREAD = 1.7
"""Each kill comes U(0, SPREAD × work / n) seconds after its attempt's first line: n attempts then cover ≈ 85 % of
the phase's work, kills late in the phase included."""


def cv_args(root: Path, run: Path) -> list[str]:
    sets = {"data.root": root, "data.folds": 2, "data.img_size": 32, "data.manifests_dir": run.parent / "manifests",
            "data.inner_val_frac": 0.2, "model.name": "resnet10t", "train.epochs": 2, "train.batch_size": 16,
            "train.warmup_epochs": 0, "eval.bootstrap": 50, "train.threads": 1, "train.state_interval_min": 0}
    return ["-m", "kd_fracture.cv", "--out", str(run)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def distill_args(run: Path) -> list[str]:
    return ["-m", "kd_fracture.distill", "--run", str(run), "--study", "tiny", "--n-trials", "3", "--student",
            "hybrid_t", "--epochs", "2", "--search-epochs", "1", "--views", "2", "--threads", "1",
            "--set", "train.batch_size=16", "--set", "train.warmup_epochs=0", "--set", "eval.bootstrap=50",
            "--set", "latency_threads=1", "--set", "onnx=false", "--set", "train.state_interval_min=0",
            # a trial killed twice (it and its retry) is retried again: what is compared is determinism
            "--set", "search.max_retry=20"]


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KD_FRACTURE_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    with open(log, "ab") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, env=env,
                                cwd=log.parent, start_new_session=True)  # its own group: loader workers die too


def first_output(proc: subprocess.Popen, log: Path, size: int) -> float:
    """Seconds until the attempt wrote its first line after byte `size` of the log (imports and set-up done)."""
    t0 = time.monotonic()
    while log.stat().st_size <= size and proc.poll() is None:
        time.sleep(0.05)
    return time.monotonic() - t0


def finish(args: list[str], log: Path) -> tuple[float, float]:
    """Run to the end; (seconds to the first line, seconds of work after it)."""
    t0, size = time.monotonic(), log.stat().st_size if log.exists() else 0
    proc = start(args, log)
    startup = first_output(proc, log, size)
    assert proc.wait(timeout=1200) == 0, log.read_text()[-4000:]
    return startup, time.monotonic() - t0 - startup


def wait_for(proc: subprocess.Popen, log: Path, size: int, pattern: str) -> bool:
    """Wait until a line matching `pattern` appears after byte `size` of the log; False if the attempt ended."""
    while not re.search(pattern, log.read_bytes()[size:].decode("utf-8", "replace"), re.MULTILINE):
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return True


def chaos(args: list[str], log: Path, moments: list[tuple[str, float]]) -> tuple[list[str], list]:
    """Run `args`, SIGKILLing each attempt `delay` seconds after the first log line matching `pattern` (by default
    its first line, so the kill lands in the work, not in the imports), then once more to the end. Returns what each
    kill hit (the log's last line before it) and the moments not used because the phase finished first."""
    events = []
    for i, (pattern, delay) in enumerate(moments):
        size = log.stat().st_size if log.exists() else 0
        proc = start(args, log)
        if wait_for(proc, log, size, pattern):
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                last = log.read_bytes()[size:].decode("utf-8", "replace").strip().splitlines()[-1:] or ["(none)"]
                events.append(f"+{delay:.1f}s: {last[0][:100]}")
                with open(log, "a") as f:
                    f.write(f"\n===== SIGKILL {delay:.1f}s after /{pattern}/ =====\n")
                continue
        assert proc.wait(timeout=1200) == 0, log.read_text()[-4000:]
        return events, moments[i:]  # finished first: the rest of this phase's kills go to the next phase
    finish(args, log)
    return events, []


def tables(run: Path) -> dict[str, pd.DataFrame]:
    """Every compared CSV of a finished cv + distill run, by path relative to the run."""
    study = run / "distill" / "tiny"
    files = [*sorted((run / "tables").glob("*.csv")), run / "holdout" / "predictions.csv",
             *sorted((study / "tables").glob("*.csv")),
             *[study / "final" / v / "holdout" / "predictions.csv" for v in VARIANTS]]
    out = {}
    for f in files:
        df = pd.read_csv(f)
        out[str(f.relative_to(run))] = df.drop(columns=["latency_ms"], errors="ignore")  # a timing
    return out


def finished_trials(run: Path, variant: str) -> tuple[list, list]:
    storage = f"sqlite:///{run / 'distill' / 'tiny.db'}"
    study = optuna.load_study(study_name=f"tiny/{variant}", storage=storage)
    done = [(t.params, t.state, t.value) for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))]
    return done, study.get_trials()


def test_killed_ten_times_the_run_ends_as_an_uninterrupted_one(tmp_path):
    from kd_fracture.data.phantom import generate_phantom

    root = generate_phantom(tmp_path / "tiny_phantom", patients=40, size=32, seed=0)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for d in (straight, killed):
        d.mkdir()
    took = {"cv": finish(cv_args(root, straight / "run"), straight / "log.txt")}
    took["distill"] = finish(distill_args(straight / "run"), straight / "log.txt")

    rng = np.random.default_rng(SEED)
    events, spare = {}, []
    for phase, args in (("cv", cv_args(root, killed / "run")), ("distill", distill_args(killed / "run"))):
        n = KILLS[phase]
        work = took[phase][1]  # seconds of work after the first line, uninterrupted
        moments = spare + [(FIRST_LINE, float(d)) for d in rng.uniform(0.0, SPREAD * work / n, n)]
        if phase == "distill":  # and once inside the final students' second epoch (resumed from state_last.pt)
            moments.append((FINAL_EPOCH, float(rng.uniform(0.0, 0.3))))
        events[phase], spare = chaos(args, killed / "log.txt", moments)
    landed = sum(len(v) for v in events.values())
    print(f"uninterrupted (start-up s, work s): {took}; kills landed: {landed}")
    for phase, hits in events.items():
        print("\n".join(f"  {phase} {hit}" for hit in hits))
    assert landed >= 8, events

    want, have = tables(straight / "run"), tables(killed / "run")
    assert set(have) == set(want)
    for name in want:
        pd.testing.assert_frame_equal(have[name], want[name], check_exact=True, obj=name)

    summary = (killed / "run" / "distill" / "tiny" / "summary.md").read_text()
    reaped = 0
    for v in VARIANTS:
        (want_done, _), (have_done, trials) = finished_trials(straight / "run", v), finished_trials(killed / "run", v)
        assert have_done == want_done, v  # same parameters, states and values, in the same order
        params = [tuple(sorted(p.items())) for p, _, _ in have_done]
        assert len(params) == 3 and len(set(params)) == 3
        assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        dead = {str(t.number) for t in trials if t.state == TrialState.FAIL}
        left = {p.name for p in (killed / "run" / "distill" / "tiny" / "trials" / v).glob("*")}
        assert not dead & left, f"{v}: folders of dead trials {sorted(dead & left)} remain"
        reaped += sum("reaped" in t.user_attrs for t in trials)
        n_retried = sum("retried_from" in t.user_attrs for t in trials)
        line = next(x for x in summary.splitlines() if x.startswith(f"- `{v}` "))
        assert f"{len(dead)} failed" in line and f"{n_retried} retried" in line, line
    print(f"trials reaped: {reaped}")
