"""Optuna search: space validation, storages, continuing a study, pruning, cooperating workers (no training here:
the per-fold trainer is a deterministic stub, so every outcome is exact)."""
from __future__ import annotations

import multiprocessing
import time

import optuna
import pytest
from optuna.trial import TrialState

from kd_fracture import search
from kd_fracture.config import DEFAULT_SEARCH_SPACE, DistillConfig, SearchConfig
from kd_fracture.errors import ConfigError, UserError

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {"kd.alpha": {"type": "float", "low": 0.0, "high": 1.0},
         "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}


def one_epoch(score):
    """A fold scorer of the old shape (trial, params, fold) → value as a ScoreFold that trains one epoch: it reports
    the fold's value after epoch 0, so steps are folds (step = fold_index × 1 + 0)."""

    def score_fold(trial, params, fold, report_epoch):
        value = score(trial, params, fold)
        report_epoch(0, value)
        return value

    return score_fold


def stub_score(trial, params, fold):
    """A 'student' whose fold score is a fixed function of its parameters: alpha 0 is the bad configuration."""
    return 0.1 if params["kd.alpha"] == 0.0 else 0.5 + 0.1 * fold + 0.01 * params["kd.alpha"]


def sqlite(tmp_path, name="s.db"):
    return f"sqlite:///{tmp_path / name}"


def memory():
    """Tests about the search logic use an in-memory storage (SQLite setup costs ~1 s per study)."""
    return optuna.storages.InMemoryStorage()


# ----------------------------------------------------------------------------------------------------------------------
# space


def test_default_space_is_valid_for_default_config():
    space = search.parse_space(DEFAULT_SEARCH_SPACE, DistillConfig())
    assert list(space) == list(DEFAULT_SEARCH_SPACE)
    assert space["kd.temperature"].log and (space["kd.temperature"].low, space["kd.temperature"].high) == (1, 10)
    assert (space["kd.alpha"].low, space["kd.alpha"].high) == (0, 1)
    assert not any(k.startswith("student.") for k in space)  # the pretrained start fixes the architecture


@pytest.mark.parametrize("key, spec, message", [
    ("kd.alpha", {"type": "uniform", "low": 0, "high": 1}, "type 'uniform' is not one of"),
    ("train.lrr", {"type": "float", "low": 1e-4, "high": 1e-2}, "'train.lrr' is not a config key"),
    ("train.lr", {"type": "float", "low": 0.0, "high": 1e-2, "log": True}, "log-uniform range needs low > 0"),
    ("train.lr", {"type": "float", "low": 1e-2, "high": 1e-4}, "need low < high"),
    ("train.lr", {"type": "float", "low": 1e-4}, "needs 'low' and 'high'"),
    ("kd.alpha", {"type": "float", "low": 0, "high": 1, "choices": [1]}, "unknown key(s) ['choices']"),
    ("kd.views", {"type": "int", "low": 1, "high": 4}, "cannot be searched"),
    ("student.overrides.depht", {"type": "categorical", "choices": [1, 2]}, "is invalid"),
    ("student.overrides.embed_dim", {"type": "categorical", "choices": [96, 90]}, "value 90 is invalid"),
    ("train.epochs", {"type": "int", "low": 1, "high": 3}, "cannot be searched"),
    ("data.img_size", {"type": "int", "low": 32, "high": 64}, "only kd.*, train.* and student.*"),
    ("train.optimizer", {"type": "categorical", "choices": []}, "non-empty list 'choices'"),
])
def test_invalid_space_names_the_key(key, spec, message):
    with pytest.raises(ConfigError, match=r"search\.space\." + key.replace(".", r"\.") + ".*" + _re(message)):
        search.parse_space({key: spec}, DistillConfig())


def _re(text):
    import re

    return re.escape(text)


def test_suggest_and_apply_params():
    # architecture keys are not in the default space (the pretrained start fixes it) but stay searchable
    architecture = {"student.overrides.depth": {"type": "categorical", "choices": [1, 2, 3]},
                    "student.overrides.embed_dim": {"type": "categorical", "choices": [96, 128, 192]}}
    space = search.parse_space({**DEFAULT_SEARCH_SPACE, **architecture}, DistillConfig())
    fixed = {"kd.temperature": 2.0, "kd.alpha": 0.25, "train.lr": 1e-3, "train.weight_decay": 0.01,
             "student.overrides.depth": 1, "student.overrides.embed_dim": 96}
    params = search.suggest(optuna.trial.FixedTrial(fixed), space)
    assert params == fixed
    cfg = search.apply_params(DistillConfig(), params)
    assert (cfg.kd.temperature, cfg.kd.alpha, cfg.train.lr, cfg.train.weight_decay) == (2.0, 0.25, 1e-3, 0.01)
    assert cfg.student.overrides == {"depth": 1, "embed_dim": 96}
    assert cfg.student.in_chans == 1 and cfg.student.name == "hybrid_s"  # the rest of the student is untouched


# ----------------------------------------------------------------------------------------------------------------------
# storage


def test_storage_urls_and_backends(tmp_path):
    assert search.storage_url(None, "kd", tmp_path / "studies") == f"sqlite:///{tmp_path / 'studies' / 'kd.db'}"
    assert search.storage_url("postgresql://u:pw@db/kd", "x") == "postgresql+psycopg://u:pw@db/kd"
    assert search.storage_url("mysql://u@db/kd", "x") == "mysql://u@db/kd"
    assert "pw" not in search.redact("postgresql+psycopg://u:pw@db/kd")
    journal = search.make_storage(f"journal:{tmp_path / 'j' / 'kd.journal'}", SearchConfig())
    assert isinstance(journal, optuna.storages.JournalStorage)
    rdb = search.make_storage(sqlite(tmp_path, "sub/x.db"), SearchConfig(heartbeat_interval=7, max_retry=2))
    # SQLite: dead trials are found by their free lease (one host), not by a heartbeat
    assert isinstance(rdb, optuna.storages.RDBStorage) and rdb.heartbeat_interval is None
    assert search.lease_root(sqlite(tmp_path, "sub/x.db")) == tmp_path / "sub" / "x.db.leases"
    assert search.lease_root(f"journal:{tmp_path / 'kd.journal'}") == tmp_path / "kd.journal.leases"
    assert search.lease_root("postgresql+psycopg://u@db/kd") is None  # several hosts: the heartbeat decides
    assert (tmp_path / "sub" / "x.db").exists()
    with pytest.raises(ConfigError, match="use sqlite:///"):
        search.make_storage("redis://localhost", SearchConfig())


def test_default_storage_is_sqlite_under_studies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = SearchConfig(study="mystudy", space=SPACE)
    search.open_study(cfg)
    assert (tmp_path / "studies" / "mystudy.db").is_file()


# ----------------------------------------------------------------------------------------------------------------------
# objective, continuing, pruning


def test_rerun_on_same_sqlite_continues_the_study(tmp_path):
    space = search.parse_space(SPACE)
    objective = search.make_objective(space, [0, 1], one_epoch(stub_score), 1)
    cfg = SearchConfig(study="t", n_trials=2, space=SPACE)
    study = search.open_study(cfg, sqlite(tmp_path))
    assert search.run_search(study, objective, cfg) == 2
    first = [(t.number, t.params, t.value) for t in study.trials]

    again = search.open_study(cfg, sqlite(tmp_path))  # same command again: the study is complete, nothing runs
    assert search.run_search(again, objective, cfg) == 0
    more = SearchConfig(study="t", n_trials=3, space=SPACE)
    again = search.open_study(more, sqlite(tmp_path))
    assert search.run_search(again, objective, more) == 1
    trials = again.trials
    assert len(trials) == 3 and [(t.number, t.params, t.value) for t in trials[:2]] == first
    assert all(t.state == TrialState.COMPLETE for t in trials)
    value = first[0][2]
    assert trials[0].user_attrs == {"fold0": pytest.approx(value - 0.05), "fold1": pytest.approx(value + 0.05),
                                    "worker": 0, "sampler_seed": search.trial_seed(0, 0, 0)}


def test_worse_trial_is_pruned_after_first_fold(tmp_path):
    cfg = SearchConfig(study="p", n_trials=3, space=SPACE, pruner="median", n_startup_trials=2)
    study = search.open_study(cfg, memory())
    for alpha in (0.5, 0.6, 0.0):  # two sound trials, then one that cannot learn
        study.enqueue_trial({"kd.alpha": alpha, "train.lr": 1e-3})
    calls = []

    def score(trial, params, fold):
        calls.append((trial.number, fold))
        return stub_score(trial, params, fold)

    search.run_search(study, search.make_objective(search.parse_space(SPACE), [0, 1, 2], one_epoch(score), 1), cfg)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert [c for c in calls if c[0] == 2] == [(2, 0)]  # stopped after its first fold
    assert study.trials[2].intermediate_values == {0: 0.1}
    assert search.best_params(study)["n_pruned"] == 1


def test_sound_trial_is_not_pruned(tmp_path):
    cfg = SearchConfig(study="p", n_trials=3, space=SPACE, pruner="median", n_startup_trials=2)
    study = search.open_study(cfg, memory())
    for alpha in (0.5, 0.6, 0.9):
        study.enqueue_trial({"kd.alpha": alpha, "train.lr": 1e-3})
    search.run_search(study, search.make_objective(search.parse_space(SPACE), [0, 1, 2], one_epoch(stub_score), 1), cfg)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3


def test_reports_running_mean_for_median_and_fold_values_for_wilcoxon(tmp_path):
    space = search.parse_space(SPACE)
    for pruner, report, expected in (("median", "running_mean", {0: 0.505, 1: 0.555, 2: 0.605}),
                                     ("wilcoxon", "per_fold", {0: 0.505, 1: 0.605, 2: 0.705})):
        cfg = SearchConfig(study=pruner, n_trials=1, space=SPACE, pruner=pruner)
        study = search.open_study(cfg, memory())
        assert isinstance(study.pruner, {"median": optuna.pruners.MedianPruner,
                                         "wilcoxon": optuna.pruners.WilcoxonPruner}[pruner])
        study.enqueue_trial({"kd.alpha": 0.5, "train.lr": 1e-3})
        search.run_search(study, search.make_objective(space, [0, 1, 2], one_epoch(stub_score), 1, report=report), cfg)
        trial = study.trials[0]
        assert trial.intermediate_values == pytest.approx(expected)
        assert trial.value == pytest.approx(0.605)  # the mean over folds either way


def test_sampler_is_seeded(tmp_path):
    space = search.parse_space(SPACE)
    values = []
    for i in range(2):
        cfg = SearchConfig(study="s", n_trials=3, space=SPACE, sampler_seed=123)
        study = search.open_study(cfg, memory())
        search.run_search(study, search.make_objective(space, [0], one_epoch(stub_score), 1), cfg)
        values.append([t.params for t in study.trials])
    assert values[0] == values[1]


def test_study_with_other_settings_is_refused(tmp_path):
    cfg = SearchConfig(study="f", n_trials=1, space=SPACE)
    storage = memory()
    search.open_study(cfg, storage, fingerprint={"epochs": 3, "metric": "study_kappa"})
    search.open_study(cfg, storage, fingerprint={"epochs": 3, "metric": "study_kappa"})  # same: fine
    with pytest.raises(UserError, match="created with epochs=3, this run has 5"):
        search.open_study(cfg, storage, fingerprint={"epochs": 5, "metric": "study_kappa"})


def test_write_outputs(tmp_path):
    cfg = SearchConfig(study="o", n_trials=4, space=SPACE, n_startup_trials=1)
    url = "sqlite:///unused.db"
    study = search.open_study(cfg, memory())
    search.run_search(study, search.make_objective(search.parse_space(SPACE), [0, 1], one_epoch(stub_score), 1), cfg)
    search.write_outputs(study, tmp_path / "out", cfg.metric, url)
    import pandas as pd
    import yaml

    trials = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert len(trials) == 4 and {"params_kd.alpha", "user_attrs_fold0", "state"} <= set(trials.columns)
    best = yaml.safe_load((tmp_path / "out" / "best_params.yaml").read_text())
    assert best["value"] == pytest.approx(trials["value"].max())
    assert set(best["params"]) == set(SPACE)
    for name in ("optuna_history", "optuna_importances", "optuna_parallel"):
        assert (tmp_path / "out" / "plots" / f"{name}.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------------------------
# several processes on one storage


def _worker(url: str, n_trials: int, name: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def slow_score(trial, params, fold):
        trial.set_user_attr("worker", name)
        time.sleep(0.05)
        return stub_score(trial, params, fold)

    cfg = SearchConfig(study="coop", n_trials=n_trials, space=SPACE)
    study = search.open_study(cfg, url)
    search.run_search(study, search.make_objective(search.parse_space(SPACE), [0, 1], one_epoch(slow_score), 1), cfg)


def test_two_workers_share_a_journal_study(tmp_path):
    url = f"journal:{tmp_path / 'coop.journal'}"
    search.open_study(SearchConfig(study="coop", space=SPACE), url)  # create first so neither worker races to
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_worker, args=(url, 6, f"w{i}")) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    study = search.open_study(SearchConfig(study="coop", space=SPACE), url)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert 6 <= len(finished) <= 7  # each worker stops once the study holds 6; one may be mid-trial then
    assert {t.user_attrs["worker"] for t in finished} == {"w0", "w1"}
    assert len({t.number for t in finished}) == len(finished)


# ----------------------------------------------------------------------------------------------------------------------
# issue #13: search mechanics


def test_reports_every_epoch_at_step_fold_times_epochs_plus_epoch():
    cfg = SearchConfig(study="e", n_trials=1, space=SPACE, pruner="none")
    study = search.open_study(cfg, memory())

    def three_epochs(trial, params, fold, report_epoch):
        for epoch in range(3):
            report_epoch(epoch, 0.5 + 0.1 * fold + 0.01 * epoch)
        return 0.5 + 0.1 * fold

    search.run_search(study, search.make_objective(search.parse_space(SPACE), [0, 1], three_epochs, 3), cfg)
    steps = study.trials[0].intermediate_values
    assert sorted(steps) == [0, 1, 2, 3, 4, 5]
    assert steps[4] == pytest.approx((0.5 + 0.61) / 2)  # running mean: fold 0's value and fold 1 after epoch 2


def test_a_trial_is_never_pruned_at_its_last_step():
    """Pruned at its last step, a finished trial was lost to TPE and to the pruner's reference set."""
    cfg = SearchConfig(study="l", n_trials=3, space=SPACE, pruner="median", n_startup_trials=2)
    study = search.open_study(cfg, memory())
    for alpha in (0.5, 0.6, 0.0):
        study.enqueue_trial({"kd.alpha": alpha, "train.lr": 1e-3})
    search.run_search(study, search.make_objective(search.parse_space(SPACE), [0], one_epoch(stub_score), 1), cfg)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert study.trials[2].value == pytest.approx(0.1)


def test_wilcoxon_that_can_never_prune_is_refused():
    cfg = SearchConfig(space=SPACE, pruner="wilcoxon")
    with pytest.raises(ConfigError, match="2 paired step.*smallest possible p is 0.25"):
        search.check_pruner(cfg, 2)  # 2 search folds × 1 epoch
    search.check_pruner(cfg, 2 * 3)  # per-epoch steps: 6 paired values can reach p < 0.1
    search.check_pruner(SearchConfig(space=SPACE, pruner="median"), 1)


def test_failed_trials_do_not_count_towards_n_trials():
    cfg = SearchConfig(study="f", n_trials=3, space=SPACE)
    study = search.open_study(cfg, memory())
    calls = []

    def flaky(trial, params, fold):
        calls.append(trial.number)
        if len(calls) <= 2:
            raise RuntimeError("diverged")
        return stub_score(trial, params, fold)

    started = search.run_search(study, search.make_objective(search.parse_space(SPACE), [0], one_epoch(flaky), 1),
                                cfg, catch=(RuntimeError,))
    assert started == 5 and search.count_finished(study) == 3
    assert [t.state for t in study.trials].count(TrialState.FAIL) == 2


def test_a_search_that_only_fails_stops():
    cfg = SearchConfig(study="x", n_trials=2, space=SPACE)
    study = search.open_study(cfg, memory())

    def broken(trial, params, fold):
        raise RuntimeError("always")

    assert search.run_search(study, search.make_objective(search.parse_space(SPACE), [0], one_epoch(broken), 1),
                             cfg, catch=(RuntimeError,)) == 2


@pytest.mark.parametrize("key", ["train.label_smoothing", "train.loss", "train.pos_weight"])
def test_keys_without_effect_on_a_student_are_refused(key):
    spec = {"type": "categorical", "choices": ["bce", "ce"]} if key == "train.loss" else \
        {"type": "float", "low": 0.0, "high": 0.2}
    with pytest.raises(ConfigError, match=f"'{key}' has no effect on a distilled student"):
        search.parse_space({**SPACE, key: spec}, DistillConfig())


def test_each_worker_seeds_its_sampler_and_records_it():
    first = []
    for worker in (0, 1):
        cfg = SearchConfig(study="w", n_trials=1, space=SPACE, sampler_seed=7, worker=worker)
        study = search.open_study(cfg, memory())
        search.run_search(study, search.make_objective(search.parse_space(SPACE), [0], one_epoch(stub_score), 1), cfg)
        trial = study.trials[0]
        assert trial.user_attrs["worker"] == worker
        assert trial.user_attrs["sampler_seed"] == search.trial_seed(7, worker, 0)
        first.append(trial.params)
    assert first[0] != first[1]


def test_the_study_names_its_metric():
    study = search.open_study(SearchConfig(study="m", space=SPACE, metric="study_auroc"), memory())
    assert study.metric_names == ["study_auroc"]


def test_metric_must_be_an_inner_validation_metric():
    with pytest.raises(ConfigError, match="search.metric 'study_f1'"):
        search.check_metric("study_f1")


def test_a_resumed_search_never_repeats_a_finished_trial(tmp_path):
    """Resumed with the same seed, TPE replayed its start-up draws: trial 2 repeated trial 0's parameters."""
    space = search.parse_space(SPACE)
    for n in (2, 4, 6):  # the same command three times, raising --n-trials
        cfg = SearchConfig(study="r", n_trials=n, space=SPACE, n_startup_trials=10)
        study = search.open_study(cfg, sqlite(tmp_path))
        search.run_search(study, search.make_objective(space, [0], one_epoch(stub_score), 1), cfg)
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(params) == 6 and len(set(params)) == 6
    seeds = [t.user_attrs["sampler_seed"] for t in study.trials]
    assert seeds == [search.trial_seed(0, 0, k) for k in range(6)]  # one seed per proposal, however it was resumed


# ----------------------------------------------------------------------------------------------------------------------
# issue #15: a search killed and resumed proposes what the uninterrupted one proposed


def _interrupted_at(calls_to_interrupt):
    """A fold scorer that raises KeyboardInterrupt (what a kill looks like to the study: the trial stays RUNNING and
    its lease is released) on the given call numbers, else scores like `stub_score`, pruning included."""
    calls = []

    def score_fold(trial, params, fold, report_epoch):
        calls.append(trial.number)
        if len(calls) in calls_to_interrupt:
            raise KeyboardInterrupt
        value = stub_score(trial, params, fold)
        report_epoch(0, value)
        return value

    return score_fold


@pytest.mark.parametrize("pruner", ["median", "none"])
def test_a_search_killed_and_resumed_proposes_what_an_uninterrupted_one_proposed(tmp_path, pruner):
    space = search.parse_space(SPACE)
    # 2 random trials, then 4 TPE; calls 5 and 6 kill a trial and then its retry (max_retry 2 allows both)
    cfg = SearchConfig(study="k", n_trials=6, space=SPACE, n_startup_trials=2, pruner=pruner, max_retry=2)
    finished = {}
    for name, kills in (("straight", ()), ("killed", (2, 5, 6, 11))):
        objective = search.make_objective(space, [0, 1], _interrupted_at(kills), 1)
        for _ in range(len(kills) + 1):  # rerun after every kill until the study is complete
            study = search.open_study(cfg, sqlite(tmp_path, f"{name}.db"))
            try:
                search.run_search(study, objective, cfg)
            except KeyboardInterrupt:
                continue
        study = search.open_study(cfg, sqlite(tmp_path, f"{name}.db"))
        search.run_search(study, objective, cfg)
        finished[name] = [(t.params, t.state, t.value) for t in study.get_trials(states=search.FINISHED)]
        states = [t.state for t in study.trials]
        assert TrialState.RUNNING not in states and TrialState.WAITING not in states
        if kills:
            assert states.count(TrialState.FAIL) == len(kills)
            assert sum("retried_from" in t.user_attrs for t in study.trials) == len(kills)
    assert finished["killed"] == finished["straight"]  # same parameters, same order, same values and prunings
    params = [tuple(sorted(p.items())) for p, _, _ in finished["killed"]]
    assert len(params) == 6 and len(set(params)) == 6


def test_proposal_index_skips_retries_and_follows_them_to_their_origin():
    from optuna.trial import create_trial

    def trial(number, state=TrialState.COMPLETE, **attrs):
        t = create_trial(state=state, value=0.0 if state == TrialState.COMPLETE else None, user_attrs=attrs)
        t.number = number
        return t

    trials = [trial(0), trial(1, TrialState.FAIL), trial(2, retried_from=1, retry=1),
              trial(3, TrialState.FAIL), trial(4, retried_from=2, retry=2), trial(5)]
    assert [search.proposal_index(trials, t) for t in trials] == [0, 1, 1, 2, 1, 3]
