"""Dead trials are reaped at start-up (issue #15 item 1): a trial whose worker was SIGKILLed is failed by the next
worker, retried once with its parameters, its leftovers removed and counted; a trial whose lease a live process
holds is left alone. No training: the objective is a stub, the dead worker a subprocess."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from kd_fracture import io, search
from kd_fracture.config import SearchConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {"kd.alpha": {"type": "float", "low": 0.0, "high": 1.0},
         "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}


def score(trial, params, fold, report_epoch):
    value = 0.5 + 0.1 * params["kd.alpha"] + 0.01 * fold
    report_epoch(0, value)
    return value


def objective():
    return search.make_objective(search.parse_space(SPACE), [0], score, 1)


def config(n_trials=3, **kw):
    return SearchConfig(study="dead", n_trials=n_trials, space=SPACE, **kw)


def run_and_wait(code: str, marker, timeout=60) -> subprocess.Popen:
    """Start `code` in a fresh Python and wait until it has written `marker` (it is then inside a trial)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the worker exited early: {proc.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("the worker did not start its trial")
        time.sleep(0.1)
    return proc


def killed_inside_a_trial(url: str, tmp_path, n_trials=3) -> dict:
    """A worker that runs one trial, writes leftovers under tmp/trials/<n>/ and is SIGKILLed inside it; returns
    that trial's params (read from the study)."""
    marker = tmp_path / "inside"
    proc = run_and_wait(f"""
        import time
        from pathlib import Path
        from kd_fracture import search
        from kd_fracture.config import SearchConfig

        def hang(trial, params, fold, report_epoch):
            leftovers = Path({str(tmp_path)!r}) / "trials" / str(trial.number) / "fold_0"
            leftovers.mkdir(parents=True)
            (leftovers / "state_last.pt").write_bytes(b"x" * 1000)
            Path({str(marker)!r}).write_text(str(trial.number))
            time.sleep(600)

        cfg = SearchConfig(study="dead", n_trials={n_trials}, space={SPACE!r})
        study = search.open_study(cfg, {url!r})
        search.run_search(study, search.make_objective(search.parse_space(cfg.space), [0], hang, 1), cfg)
    """, marker)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    number = int(marker.read_text())
    study = search.open_study(config(n_trials), url)
    trial = study.trials[number]
    assert trial.state == TrialState.RUNNING  # what the kill leaves behind
    assert (tmp_path / "trials" / str(number)).is_dir()
    return trial.params


def remove_leftovers(tmp_path):
    import shutil

    return lambda trial: shutil.rmtree(tmp_path / "trials" / str(trial.number))


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_a_killed_trial_is_failed_at_start_up_retried_and_its_leftovers_removed(storage, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}" if storage == "sqlite" else f"journal:{tmp_path / 's.journal'}"
    params = killed_inside_a_trial(url, tmp_path)

    cfg = config()
    study = search.open_study(cfg, url)  # the rerun, at once (no heartbeat grace period to wait for)
    started = search.run_search(study, objective(), cfg, on_reaped=remove_leftovers(tmp_path))
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert started == 3 and "reaped" in trials[0].user_attrs
    retry = trials[1]
    assert retry.params == params  # the same setting, not a new one
    assert retry.user_attrs["retried_from"] == 0 and retry.user_attrs["retry"] == 1
    assert len({tuple(sorted(t.params.items())) for t in trials[1:]}) == 3
    assert not (tmp_path / "trials" / "0").exists()
    assert not list(search.Leases(search.lease_root(url), "dead").dir.glob("*.lease"))  # no lease left behind

    search.write_outputs(study, tmp_path / "out", cfg.metric, url)
    table = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert table["state"].tolist() == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert table["user_attrs_reaped"].notna().sum() == 1 and table["user_attrs_retried_from"].notna().sum() == 1
    best = yaml.safe_load((tmp_path / "out" / "best_params.yaml").read_text())
    assert (best["n_complete"], best["n_failed"], best["n_reaped"], best["n_retried"], best["n_running"]) == \
        (3, 1, 1, 1, 0)


def test_a_dead_trial_is_reaped_even_when_the_study_is_complete(tmp_path):
    """The rerun used to 'finish around' a dead trial, which then stayed RUNNING in trials.csv for good."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = config(n_trials=2)
    study = search.open_study(cfg, url)
    search.run_search(study, objective(), cfg)
    dead = study.ask({n: p.distribution() for n, p in search.parse_space(SPACE).items()})  # no lease holder
    (tmp_path / "trials" / str(dead.number)).mkdir(parents=True)

    study = search.open_study(cfg, url)
    assert search.run_search(study, objective(), cfg, on_reaped=remove_leftovers(tmp_path)) == 0
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]  # no retry: nothing is missing
    assert not (tmp_path / "trials" / str(dead.number)).exists()


def test_a_trial_whose_lease_a_live_process_holds_is_left_alone(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = config(n_trials=2, timeout=4)
    study = search.open_study(cfg, url)
    live = study.ask()
    live.suggest_float("kd.alpha", 0.0, 1.0)
    lease = search.Leases(search.lease_root(url), "dead").path(live.number)
    holder = run_and_wait(f"""
        import time
        from pathlib import Path
        from kd_fracture import io

        with io.flock({str(lease)!r}):
            Path({str(tmp_path / 'held')!r}).write_text("")
            time.sleep(600)
    """, tmp_path / "held")
    try:
        study = search.open_study(cfg, url)
        # the live trial counts against n_trials: one more is run, then the search waits for it (here: timeout)
        assert search.run_search(study, objective(), cfg) == 1
        assert study.trials[live.number].state == TrialState.RUNNING  # its worker is alive
        assert f"PID {holder.pid}" in lease.read_text()
    finally:
        holder.kill()
        holder.wait(10)
    study = search.open_study(cfg, url)  # now its worker is gone: failed, and its parameters retried here
    assert search.run_search(study, objective(), cfg) == 1
    assert study.trials[live.number].state == TrialState.FAIL
    assert search.count_finished(study) == 2


def test_a_retry_is_retried_at_most_max_retry_times(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = config(n_trials=1, max_retry=1)
    study = search.open_study(cfg, url)
    distributions = {n: p.distribution() for n, p in search.parse_space(SPACE).items()}
    first = study.ask(distributions)
    assert search.reap(study, cfg, search.parse_space(SPACE)) == [first.number]
    retry = study.ask(distributions)  # the enqueued retry, then its worker dies too
    assert retry.user_attrs == {"retried_from": first.number, "retry": 1} and retry.params == first.params
    assert search.reap(study, cfg) == [retry.number]
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]  # no third try


def test_on_a_heartbeat_storage_a_stale_trial_is_reaped(tmp_path):
    """PostgreSQL/MySQL (several hosts): no lease files; a trial whose heartbeat stopped is dead after the grace
    period. Here an SQLite RDBStorage with a heartbeat stands in for the database server."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=1)
    cfg = config(n_trials=2)
    study = search.open_study(cfg, storage)
    assert study.kd_leases is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stale = study.ask({n: p.distribution() for n, p in search.parse_space(SPACE).items()})
    storage.record_heartbeat(stale._trial_id)
    time.sleep(2.5)
    search.run_search(study, objective(), cfg)
    trials = study.trials
    assert trials[0].state == TrialState.FAIL and trials[1].params == trials[0].params
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2


def test_the_lease_file_names_its_holder(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    leases = search.Leases(search.lease_root(url), "a/b")
    with leases.hold(3):
        assert f"PID {os.getpid()}" in leases.path(3).read_text()
        with pytest.raises(io.LockedError):
            with io.flock(leases.path(3)):
                pass
    assert not leases.path(3).exists()


def test_summary_counts_failed_reaped_and_retried_trials():
    from kd_fracture.report.distill import _failed

    assert _failed({"n_failed": 2, "n_reaped": 1, "n_retried": 1}) == "2 failed (1 whose worker died), 1 retried"
    assert _failed({"n_failed": 0}) == "0 failed, 0 retried"  # a best_params.yaml written before the counts
