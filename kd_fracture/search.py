"""Optuna search over the distillation hyper-parameters (docs/design.md §8; suggest → train → report → prune).

    space = parse_space(cfg.search.space, cfg)                        # from studies/distill_hybrid.yaml
    study = open_study(cfg.search, fingerprint={...})                  # sqlite:///studies/<study>.db, load_if_exists
    objective = make_objective(space, folds=[0, 1], score_fold=train_and_score, epochs=3)
    run_search(study, objective, cfg.search)                           # until the study holds n_trials finished trials

The objective trains one student per search fold and reads its value on that fold's inner-validation split — never
on the scored fold or the holdout, which report the final students afterwards (unbiased selection). It reports after
every epoch (step = fold_index × epochs + epoch) so a pruner can stop a weak trial inside a fold: MedianPruner
(Optuna's default, Golovin et al. 2017) compares the running mean with the median of earlier trials at the same
step; WilcoxonPruner (Optuna ≥ 3.6) runs a signed-rank test of the per-step values against the best trial's. The
objective value is the mean over folds either way.

Storage: `sqlite:///studies/<study>.db` by default (an `RDBStorage`); `journal:PATH` is a `JournalStorage` over a
lock-protected append-only file (several processes on one machine or NFS, no database); `postgresql://…` /
`mysql://…` are `RDBStorage`s with heartbeats (several hosts). Every process on the same storage and study name
cooperates: TPE sees all finished trials, and each stops once the study holds `n_trials` finished (complete + pruned)
trials.

Dead trials (`reap`): the process running a trial holds a lease on it — on SQLite and Journal storages an
`io.flock` on `<db>.leases/<study>/<n>.lease` (PID, host, start time), taken under the study's ask lock together
with the trial's creation, so no trial is ever RUNNING without a held lease unless its process is gone; on
PostgreSQL/MySQL a heartbeat, since a lock file on one host proves nothing about another. Every `run_search` first
fails the RUNNING trials whose lease is free (or whose heartbeat is stale) and enqueues each once more with its
parameters (user attrs `retried_from`, `retry` ≤ `max_retry`).

Determinism under kills (`SeededTPE`): the parameters of the k-th proposal (trials that are not retries, in number
order) are drawn from RNGs seeded with SeedSequence([sampler_seed, worker, k]) given the finished trials, so a
search killed and resumed any number of times proposes what the uninterrupted one proposed.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.storages._heartbeat import is_heartbeat_enabled  # what Study.optimize asks; not re-exported
from optuna.trial import TrialState

from kd_fracture import io, metrics
from kd_fracture.config import DistillConfig, SearchConfig, replace, to_dict
from kd_fracture.errors import ConfigError, UserError

__all__ = [
    "Leases",
    "Param",
    "SeededTPE",
    "apply_params",
    "best_params",
    "check_metric",
    "jsonable",
    "lease_root",
    "make_objective",
    "make_pruner",
    "make_sampler",
    "make_storage",
    "metric_value",
    "open_study",
    "parse_space",
    "proposal_index",
    "reap",
    "redact",
    "run_search",
    "storage_url",
    "suggest",
    "trial_counts",
    "trial_seed",
    "write_outputs",
]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PARAM_TYPES = ("float", "int", "categorical")
SPEC_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
             "categorical": {"type", "choices"}}
SEARCHABLE_SECTIONS = ("kd", "train", "student")
NOT_SEARCHABLE = {
    # changing these would change the cached teacher logits, the folds or where/how a trial runs, not the student
    "kd.views", "kd.teacher_cache", "train.epochs", "train.seed", "train.device", "train.threads", "train.amp",
    "train.eval_batch_size", "train.monitor", "train.precision", "train.mixup", "train.cutmix", "student.name", "student.in_chans",
    "student.num_classes", "student.pretrained",
}
NO_EFFECT = {
    # distillation's loss is kd_loss (models/losses.py): it reads neither of these, so a search over them would rank
    # noise; mixup/cutmix are refused for distill as a whole (mixed images have no cached teacher logits)
    "train.label_smoothing": "kd_loss has no label smoothing (its soft term already smooths the targets)",
    "train.loss": "kd_loss picks BCE or CE from the student's number of logits, not from train.loss",
    "train.pos_weight": "searched class weights move the decision threshold, which the inner split chooses anyway",
}
DASHBOARD_PORT = 8080
"""Where `python -m kd_fracture.dashboard` serves optuna-dashboard by default (the app links its studies there)."""
PRUNERS = ("median", "wilcoxon", "none")
WILCOXON_P = 0.1
"""WilcoxonPruner's p_threshold (Optuna's default)."""


# ----------------------------------------------------------------------------------------------------------------------
# search space


@dataclass(frozen=True)
class Param:
    """One searchable config key, e.g. Param("kd.temperature", "float", low=1, high=10, log=True)."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """What `suggest` asks for, so `study.ask(fixed_distributions)` draws all parameters when the trial is made."""
        d = optuna.distributions
        if self.type == "float":
            return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.CategoricalDistribution(list(self.choices))

    def examples(self) -> list:
        """Values that must be valid config values: both bounds, or every choice."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]


def parse_space(space: Mapping[str, Any], cfg: DistillConfig | None = None,
                source: str = "search.space") -> dict[str, Param]:
    """Validate a search space (`{dotted.key: {type, low, high, log, step | choices}}`) → {key: Param}.

    With `cfg`, every key must name a config value the distillation can vary (kd.* / train.* / student.* or
    student.overrides.NAME for a registered hybrid's HybridConfig field), and every bound or choice must be a valid
    value for it. Errors are ConfigErrors naming the key.
    """
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(f"{source}: the search space is empty; give at least one parameter, e.g. "
                          "kd.temperature: {type: float, low: 1.0, high: 10.0, log: true}")
    out = {}
    for name, spec in space.items():
        where = f"{source}.{name}"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}: must be a mapping like {{type: float, low: 0.0, high: 1.0}}, got {spec!r}")
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            raise ConfigError(f"{where}: type {kind!r} is not one of {', '.join(PARAM_TYPES)}")
        unknown = sorted(set(spec) - SPEC_KEYS[kind])
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} for type {kind}; valid: {sorted(SPEC_KEYS[kind])}")
        out[name] = _param(name, kind, spec, where)
        if cfg is not None:
            _check_path(out[name], cfg, where)
    return out


def _param(name: str, kind: str, spec: Mapping, where: str) -> Param:
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list 'choices'")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise ConfigError(f"{where}: choices must be scalars (Optuna stores them), got {list(choices)!r}")
        return Param(name, kind, choices=tuple(choices))
    try:
        # YAML 1.1 reads 3e-4 (no dot) as a string: accept it like the config loader does
        low, high = float(spec["low"]), float(spec["high"])
        step = None if spec.get("step") is None else float(spec["step"])
    except KeyError as e:
        raise ConfigError(f"{where}: {kind} needs 'low' and 'high'; missing {e.args[0]!r}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: low/high/step must be numbers, got {dict(spec)!r}") from None
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    if not low < high:
        raise ConfigError(f"{where}: need low < high, got low={low:g} high={high:g}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log-uniform range needs low > 0, got {low:g}")
    if log and step is not None:
        raise ConfigError(f"{where}: Optuna cannot combine log: true with a step")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise ConfigError(f"{where}: int bounds and step must be whole numbers, got {dict(spec)!r}")
    return Param(name, kind, low=low, high=high, log=log, step=step)


def _check_path(param: Param, cfg: DistillConfig, where: str) -> None:
    name = param.name
    section = name.split(".", 1)[0]
    if section not in SEARCHABLE_SECTIONS or "." not in name:
        raise ConfigError(f"{where}: only kd.*, train.* and student.* keys can be searched")
    if name in NOT_SEARCHABLE:
        raise ConfigError(f"{where}: '{name}' cannot be searched (it changes the cached teacher logits, the data or "
                          "the run, not the student); set it with --set instead")
    if name in NO_EFFECT:
        raise ConfigError(f"{where}: '{name}' has no effect on a distilled student ({NO_EFFECT[name]}); remove it")
    if name.startswith("student.overrides."):
        from kd_fracture.models.student import STUDENT_REGISTRY, hybrid_config

        field_name = name[len("student.overrides."):]
        if cfg.student.name not in STUDENT_REGISTRY:
            raise ConfigError(f"{where}: student '{cfg.student.name}' is not a registered hybrid; architecture "
                              "overrides can only be searched for hybrid_t|hybrid_s|hybrid_m")
        for value in param.examples():
            try:
                hybrid_config(cfg.student.name, **{**cfg.student.overrides, field_name: value})
            except UserError as e:
                raise ConfigError(f"{where}: value {value!r} is invalid ({e})") from None
        return
    tree = to_dict(cfg)
    node: Any = tree
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{where}: '{name}' is not a config key of the distillation")
        node = node[part]
    if isinstance(node, dict):
        raise ConfigError(f"{where}: '{name}' is a section, not a value")
    for value in param.examples():
        replace(cfg, **{name: int(value) if param.type == "int" else value})  # wrong type → ConfigError


def suggest(trial: optuna.Trial, space: Mapping[str, Param]) -> dict[str, Any]:
    """One value per parameter, in the space's order (the order is part of a seeded TPE run)."""
    return {name: p.suggest(trial) for name, p in space.items()}


def apply_params(cfg: DistillConfig, params: Mapping[str, Any]) -> DistillConfig:
    """A config with `params` (dotted keys, e.g. {"kd.alpha": 0.5, "student.overrides.depth": 2}) applied."""
    return replace(cfg, **dict(params)) if params else cfg


def check_metric(metric: str) -> str:
    """The objective is an inner-validation metric that `engine.fit` also computes after every epoch (so it can be
    reported per epoch): one of metrics.MONITORS; anything else is a ConfigError."""
    if metric not in metrics.MONITORS:
        raise ConfigError(f"search.metric '{metric}': use one of {', '.join(metrics.MONITORS)} (an inner-validation "
                          "metric computed after every epoch)")
    return metric


def metric_value(result: dict, metric: str) -> float:
    """The `metric` of an `metrics.evaluate` result (`metrics.monitor_value`); NaN when undefined."""
    value = metrics.monitor_value(result, check_metric(metric))
    return value if math.isfinite(value) else float("nan")


HISTORY_COLUMN = {"study_kappa": "val_study_kappa", "study_auroc": "val_study_auroc", "image_auroc": "val_image_auroc"}
"""metric → its column in `engine.fit`'s per-epoch history row (κ there is at 0.5: the cut is chosen after training)."""


# ----------------------------------------------------------------------------------------------------------------------
# storage, sampler, pruner, study


def storage_url(storage: str | None, study: str, studies_dir: str | Path = "studies") -> str:
    """None → `sqlite:///<studies_dir>/<study>.db`; `postgresql://` → `postgresql+psycopg://` (psycopg 3 driver)."""
    if storage is None:
        return f"sqlite:///{Path(studies_dir) / f'{study}.db'}"
    for prefix in ("postgresql://", "postgres://"):
        if storage.startswith(prefix):
            return "postgresql+psycopg://" + storage[len(prefix):]
    return storage


def redact(url: str) -> str:
    """The URL without its password (for logs and files)."""
    if url.startswith("journal:") or "://" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 — not a SQLAlchemy URL: the storage will complain
        return url


def make_storage(url: str, cfg: SearchConfig) -> optuna.storages.BaseStorage:
    """`journal:PATH` → JournalStorage(JournalFileBackend(PATH)); sqlite URL → RDBStorage (dead trials are found by
    their free lease, `lease_root`); postgresql/mysql URL → RDBStorage with a heartbeat every `heartbeat_interval`
    seconds and `grace_period` (null: 2 × interval) before a silent trial counts as dead. Retries are `reap`'s, not
    Optuna's callback's. Anything else is a ConfigError."""
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):]).expanduser()
        if not path.name:
            raise ConfigError(f"--storage {url}: give a file, e.g. journal:studies/distill_hybrid.journal")
        path.parent.mkdir(parents=True, exist_ok=True)
        journal = optuna.storages.journal
        backend = (journal.JournalFileBackend(str(path)) if hasattr(journal, "JournalFileBackend")
                   else optuna.storages.JournalFileStorage(str(path)))  # optuna < 4.0
        return optuna.storages.JournalStorage(backend)
    dialect = url.split(":", 1)[0].split("+", 1)[0]
    if dialect not in ("sqlite", "postgresql", "mysql"):
        raise ConfigError(f"--storage {redact(url)}: use sqlite:///FILE.db, postgresql://USER@HOST/DB, "
                          "mysql://USER@HOST/DB or journal:FILE")
    if dialect == "sqlite" and url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    heartbeat = {} if dialect == "sqlite" else {"heartbeat_interval": cfg.heartbeat_interval,
                                                 "grace_period": cfg.grace_period}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: stable in practice
            return optuna.storages.RDBStorage(url, **heartbeat)
    except ImportError as e:
        raise UserError(f"--storage {redact(url)}: database driver missing ({e}); for PostgreSQL install "
                        "'kd_fracture[postgres]' (psycopg 3)") from None
    except Exception as e:  # noqa: BLE001 — sqlalchemy/driver errors share no base class; message kept
        reason = " ".join(str(e).split())[:300].replace(url, redact(url))
        raise UserError(f"--storage {redact(url)}: cannot open the study storage ({type(e).__name__}: {reason})"
                        ) from None


def lease_root(url: str) -> Path | None:
    """Where the trial leases of a storage live: `sqlite:///DIR/X.db` → DIR/X.db.leases, `journal:PATH` →
    PATH.leases; None for in-memory storages (nothing outlives the process) and PostgreSQL/MySQL (several hosts:
    a lock file on one proves nothing about another, so their heartbeat decides)."""
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):]).expanduser()
    elif url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url[len("sqlite:///"):]).expanduser()
    else:
        return None
    return path.with_name(path.name + ".leases")


class Leases:
    """The lease files of one study: `<root>/<quoted study name>/<n>.lease` per trial (an `io.flock` held by the
    process running trial n) and `.ask.lock` (held while a trial is created and leased, and while dead trials are
    reaped, so a reaper never sees a live trial before its lease is taken)."""

    def __init__(self, root: Path, study: str):
        self.dir = Path(root) / urllib.parse.quote(study, safe="")

    def path(self, number: int) -> Path:
        return self.dir / f"{number}.lease"

    @contextlib.contextmanager
    def asking(self):
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / ".ask.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits: held only while one trial is asked for or the dead are reaped
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def hold(self, number: int):
        """Trial `number`'s lease for the `with` block; the file goes when the trial is told."""
        with io.flock(self.path(number)):
            try:
                yield
            finally:
                with contextlib.suppress(FileNotFoundError):
                    self.path(number).unlink()


def trial_seed(sampler_seed: int, worker: int, k: int) -> int:
    """The sampler seed of the k-th proposal of worker `worker` (k = 0, 1, … counts trials that are not retries)."""
    if min(sampler_seed, worker) < 0:
        raise ConfigError(f"search.sampler_seed={sampler_seed}, search.worker={worker}: both must be ≥ 0")
    return int(np.random.SeedSequence([sampler_seed, worker, k]).generate_state(1)[0])


def sampler_seed(cfg: SearchConfig, k: int = 0) -> int:
    """`trial_seed` of this worker's k-th proposal."""
    return trial_seed(cfg.sampler_seed, cfg.worker, k)


def proposal_index(trials: Sequence[optuna.trial.FrozenTrial], trial: optuna.trial.FrozenTrial) -> int:
    """k of `trial`: the number of earlier trials that are not retries. A retry (user attr `retried_from`) takes
    the k of the trial it repeats, so its draws are that trial's even when it lost its parameters in the kill."""
    by_number = {t.number: t for t in trials}
    origin = trial
    while origin.user_attrs.get("retried_from") in by_number and origin.user_attrs["retried_from"] < origin.number:
        origin = by_number[origin.user_attrs["retried_from"]]
    return sum(t.number < origin.number and "retried_from" not in t.user_attrs for t in trials)


class SeededTPE(optuna.samplers.TPESampler):
    """TPE (Bergstra et al. 2011) whose two RNGs (TPE's own and its random start-up sampler's) are reseeded before
    every trial from (sampler_seed, worker, k), k = `proposal_index`: the k-th proposal depends only on those and on
    the finished trials, never on how often the search was killed and resumed or on failed trials in between (a
    killed trial is retried with its parameters and is no proposal). The trial's seed is kept as `kd_seed`."""

    def __init__(self, cfg: SearchConfig):
        super().__init__(seed=sampler_seed(cfg), n_startup_trials=max(1, cfg.n_startup_trials))
        self.base = (cfg.sampler_seed, cfg.worker)
        self.kd_seed = sampler_seed(cfg)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        k = proposal_index(study.get_trials(deepcopy=False), trial)
        self.kd_seed = trial_seed(*self.base, k)
        self._rng.rng.seed(self.kd_seed)
        self._random_sampler._rng.rng.seed(self.kd_seed)
        super().before_trial(study, trial)


def make_sampler(cfg: SearchConfig) -> optuna.samplers.BaseSampler:
    """`SeededTPE`: `n_startup_trials` random trials first, like the pruner's startup; seeded per worker and
    proposal (`trial_seed`, recorded in every trial as user attr `sampler_seed`)."""
    return SeededTPE(cfg)


def check_pruner(cfg: SearchConfig, steps: int) -> None:
    """ConfigError when the pruner can never act: WilcoxonPruner's smallest exact one-sided p-value over n paired
    steps is 1 / 2^n, so with p_threshold 0.1 it needs n ≥ 4 (here steps = search folds × search epochs)."""
    make_pruner(cfg)
    if cfg.pruner == "wilcoxon" and 0.5 ** steps >= WILCOXON_P:
        raise ConfigError(f"search.pruner wilcoxon: {steps} paired step(s) per trial can never reach p < {WILCOXON_P} "
                          f"(the smallest possible p is {0.5 ** steps:g}); use ≥ 4 fold-epochs (search.folds × "
                          "search.epochs) or pruner median")


def make_pruner(cfg: SearchConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=0)
    if cfg.pruner == "wilcoxon":
        # paired steps = fold-epochs; p_threshold 0.1 is Optuna's default
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=WILCOXON_P, n_startup_steps=2)
    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"search.pruner '{cfg.pruner}' is not one of {', '.join(PRUNERS)}")


def open_study(cfg: SearchConfig, storage: str | optuna.storages.BaseStorage | None = None,
               fingerprint: Mapping[str, Any] | None = None, studies_dir: str | Path = "studies") -> optuna.Study:
    """Create the study, or load it when it exists (a rerun, or another worker, continues it).

    `fingerprint` (JSON-able settings that change what a trial's value means: teacher checkpoints, metric, search
    folds and epochs, space, …) is stored as the study's user attribute `kd_fracture`; loading a study made with a
    different fingerprint is an error, so trials of two different experiments never share one TPE model.
    A storage given as a URL (or None) gets trial leases when it is SQLite or Journal (`lease_root`).
    """
    root = None
    if storage is None or isinstance(storage, str):
        url = storage_url(storage, cfg.study, studies_dir)
        storage, root = make_storage(url, cfg), lease_root(url)
    study = optuna.create_study(study_name=cfg.study, storage=storage, direction="maximize",
                                sampler=make_sampler(cfg), pruner=make_pruner(cfg), load_if_exists=True)
    study.kd_leases = None if root is None else Leases(root, cfg.study)  # read by run_search and reap
    if study.metric_names is None:  # the dashboard and trials.csv name the objective instead of "Objective 0"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([cfg.metric])
    if fingerprint is not None:
        fingerprint = jsonable(fingerprint)
        saved = study.user_attrs.get("kd_fracture")
        if saved is None:
            study.set_user_attr("kd_fracture", fingerprint)
        elif saved != fingerprint:
            key = next(k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k))
            raise UserError(f"study '{cfg.study}' was created with {key}={saved.get(key)!r}, this run has "
                            f"{fingerprint.get(key)!r}; use the same settings to continue it, or a new --study NAME")
    return study


def jsonable(obj: Any) -> Any:
    """Round-trip through JSON so tuples/np scalars compare equal to what the storage gives back."""
    import json

    return json.loads(json.dumps(obj, default=io._json_default))


# ----------------------------------------------------------------------------------------------------------------------
# objective and optimisation

EpochReport = Callable[[int, float], None]
"""(epoch, inner-val metric after that epoch) → None; raises optuna.TrialPruned when the trial should stop."""
ScoreFold = Callable[[optuna.Trial, dict, int, EpochReport], float]
"""(trial, params, fold, report_epoch) → the fold's objective value (its inner-val metric); calls report_epoch after
every epoch."""


def make_objective(space: Mapping[str, Param], folds: Sequence[int], score_fold: ScoreFold, epochs: int,
                   report: str = "running_mean") -> Callable[[optuna.Trial], float]:
    """suggest → per fold: train, reporting after every epoch (step = fold_index × epochs + epoch) → prune? →
    returns the mean of the folds' values.

    report="running_mean" (MedianPruner compares the mean so far: the finished folds' values and this fold's
    value after this epoch) or "per_fold" (WilcoxonPruner pairs each step's own value with the best trial's at the
    same step). A trial is never pruned at its last step: it has finished, and its value informs TPE and the
    pruner's reference set. Each fold's value is kept as user attribute `fold<k>` (a column of trials.csv).
    """
    if report not in ("running_mean", "per_fold"):
        raise ValueError(f"report must be running_mean or per_fold, got {report!r}")

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        scores: list[float] = []
        for i, k in enumerate(folds):
            last_fold = i == len(folds) - 1

            def report_epoch(epoch: int, value: float, i=i, k=k, last_fold=last_fold) -> None:
                running = float(np.mean([*scores, value]))
                trial.report(value if report == "per_fold" else running, step=i * epochs + epoch)
                if not (last_fold and epoch >= epochs - 1) and trial.should_prune():
                    raise optuna.TrialPruned(f"fold {k} epoch {epoch + 1}: running mean {running:.4f}")

            value = float(score_fold(trial, params, k, report_epoch))
            scores.append(value)
            trial.set_user_attr(f"fold{k}", value)
        return float(np.mean(scores))

    objective.space = dict(space)  # run_search draws these when it creates a trial (see run_search)
    return objective


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run_search(study: optuna.Study, objective: Callable[[optuna.Trial], float], cfg: SearchConfig,
               catch: Iterable[type[Exception]] = (), callbacks: Sequence[Callable] = (),
               on_reaped: Callable[[optuna.trial.FrozenTrial], None] | None = None) -> int:
    """Run trials until the study holds `cfg.n_trials` finished (complete + pruned) trials, all workers together,
    or `cfg.timeout` seconds pass. A failed trial does not count: another one is started in its place, until
    `cfg.n_trials` trials of this process have failed (then the failures are the problem, not the budget).

    First, and before every trial, dead trials are reaped (`reap`; `on_reaped(trial)` removes their leftovers).
    Each trial is created, given all of `objective.space`'s parameters (`make_objective` sets it) and leased in one
    step under the study's ask lock, then run under its lease (SQLite/Journal) or heartbeat (PostgreSQL/MySQL).
    Returns the number of trials this process started. A rerun of a finished study starts none. Exceptions in
    `catch` fail only their trial (e.g. a non-finite loss at an extreme learning rate); Ctrl-C leaves the trial
    RUNNING with its lease released, so the next start reaps and retries it like a killed one. Each trial records
    its worker index and sampler seed as user attributes; `callbacks(study, frozen_trial)` run after each.
    """
    space = getattr(objective, "space", None)
    distributions = {name: p.distribution() for name, p in space.items()} if space else None
    leases: Leases | None = getattr(study, "kd_leases", None)
    asking = leases.asking if leases is not None else contextlib.nullcontext
    with asking():
        reap(study, cfg, space, on_reaped)  # also when the study is complete: no trial stays RUNNING for good

    started, failed, t0 = 0, 0, time.monotonic()
    while count_finished(study) < cfg.n_trials and failed < cfg.n_trials:
        if cfg.timeout is not None and time.monotonic() - t0 >= cfg.timeout:
            break
        with contextlib.ExitStack() as held:
            with asking():
                reap(study, cfg, space, on_reaped)
                finished = count_finished(study)
                if finished >= cfg.n_trials:
                    break
                # other workers' RUNNING trials count against the budget (no overshoot, equal budgets per variant):
                # wait for them to finish, or to be reaped when their worker died (a retry then runs here)
                running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                if finished + running >= cfg.n_trials:
                    trial = None
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize"
                        trial = study.ask(distributions)
                    if leases is not None:
                        held.enter_context(leases.hold(trial.number))
            if trial is None:
                time.sleep(_wait_s(study))
                continue
            held.enter_context(_heartbeat(study, trial))
            trial.set_user_attr("worker", cfg.worker)
            trial.set_user_attr("sampler_seed", getattr(study.sampler, "kd_seed", sampler_seed(cfg)))
            frozen = _run_trial(study, trial, objective, tuple(catch))
        started += 1
        failed += frozen.state == TrialState.FAIL
        for callback in callbacks:
            callback(study, frozen)
    return started


def _wait_s(study: optuna.Study) -> float:
    """How long to sleep before looking again at other workers' RUNNING trials: the heartbeat interval on
    PostgreSQL/MySQL (a dead worker's trial goes stale after the grace period), a second on lease storages."""
    storage = study._storage
    return float(storage.get_heartbeat_interval()) if is_heartbeat_enabled(storage) else 1.0


def _run_trial(study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], float],
               catch: tuple[type[Exception], ...]) -> optuna.trial.FrozenTrial:
    """objective(trial) → told COMPLETE / PRUNED (value: its last report) / FAIL (an exception in `catch`, or a
    non-finite value); any other exception fails the trial and is raised (as `study.optimize` does)."""
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        return study.tell(trial, state=TrialState.PRUNED)
    except catch as e:
        _log_warning(f"trial {trial.number} failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return study.tell(trial, state=TrialState.FAIL)
    except Exception:
        study.tell(trial, state=TrialState.FAIL)
        raise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a NaN value fails the trial; logged below
        frozen = study.tell(trial, value)
    if frozen.state == TrialState.FAIL:
        _log_warning(f"trial {trial.number} failed: its value {value!r} is not a finite number")
    return frozen


def _log_warning(message: str) -> None:
    optuna.logging.get_logger("optuna").warning(message)


@contextlib.contextmanager
def _heartbeat(study: optuna.Study, trial: optuna.Trial):
    """RDB storages with a heartbeat (PostgreSQL/MySQL): record the trial's heartbeat every interval while it runs,
    as `study.optimize` would; nothing for the others."""
    storage = study._storage
    if not is_heartbeat_enabled(storage):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        first = True
        while True:
            storage.record_heartbeat(trial._trial_id)
            if first:  # reap: a RUNNING trial without this attribute never had a heartbeat
                storage.set_trial_user_attr(trial._trial_id, "heartbeat", True)
                first = False
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-trial-{trial.number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def reap(study: optuna.Study, cfg: SearchConfig, space: Mapping[str, Param] | None = None,
         on_reaped: Callable[[optuna.trial.FrozenTrial], None] | None = None) -> list[int]:
    """Fail the study's RUNNING trials whose worker is gone and enqueue each once more with its parameters.

    Gone = its lease can be taken (SQLite/Journal: no live process holds `<n>.lease`; the caller holds the ask
    lock) or its heartbeat is older than the grace period (PostgreSQL/MySQL). A reaped trial gets user attr
    `reaped` (lease storages) and FAIL; its retry is a WAITING trial with the same parameters (all of them, or
    none when the kill came before `space` was fully drawn: then the retry redraws them with the same seed) and
    user attrs `retried_from` = its number, `retry` = how many times this setting has been retried (at most
    `cfg.max_retry`). No retry is enqueued once the study holds `n_trials` finished trials. `on_reaped(trial)`
    runs for every reaped trial (distill removes its folder). Returns the reaped trial numbers.
    """
    storage = study._storage
    leases: Leases | None = getattr(study, "kd_leases", None)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    dead: list[int] = []
    if leases is not None:
        for t in running:
            try:
                with io.flock(leases.path(t.number)):
                    # still RUNNING with its lease free: dead (else it was told between our listing and now)
                    if storage.get_trial(t._trial_id).state == TrialState.RUNNING:
                        storage.set_trial_user_attr(t._trial_id, "reaped", "its worker is gone (lease free)")
                        storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                        dead.append(t.number)
            except io.LockedError:
                continue  # a live process holds it
            leases.path(t.number).unlink(missing_ok=True)
    elif is_heartbeat_enabled(storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # the storage has no stale-trial callback: retries are ours
        # a worker killed between creating its trial and its first heartbeat leaves no heartbeat to go stale:
        # without the "heartbeat" attribute (set right after the first beat) past the grace period, it is dead too
        grace = cfg.grace_period or 2 * cfg.heartbeat_interval
        now = datetime.datetime.now()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "heartbeat" not in t.user_attrs and t.datetime_start is not None and \
                    (now - t.datetime_start).total_seconds() > grace:
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        dead = [t.number for t in running if states.get(t.number) == TrialState.FAIL]
    if not dead:
        return []
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for n in dead:
        trial = by_number[n]
        retry = int(trial.user_attrs.get("retry", 0)) + 1
        if retry <= cfg.max_retry and count_finished(study) < cfg.n_trials:
            params = dict(trial.params) if space is None or set(trial.params) == set(space) else {}
            study.enqueue_trial(params, user_attrs={"retried_from": n, "retry": retry})
            what = f"retried with the same parameters ({retry} of {cfg.max_retry})"
        else:
            what = "not retried" + (f" (max_retry={cfg.max_retry} reached)" if retry > cfg.max_retry else
                                    " (the study is complete)")
        _log_warning(f"study '{study.study_name}': trial {n} was RUNNING but its worker is gone: failed, {what}")
        if on_reaped is not None:
            on_reaped(trial)
    return dead


# ----------------------------------------------------------------------------------------------------------------------
# results


def best_params(study: optuna.Study) -> dict[str, Any] | None:
    """{"trial", "value", "params", `trial_counts`…} of the best complete trial, or None when none completed."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    complete = [t for t in complete if t.value is not None and math.isfinite(t.value)]
    if not complete:
        return None
    best = max(complete, key=lambda t: (t.value, -t.number))
    return {"study": study.study_name, "trial": best.number, "value": best.value, "params": dict(best.params),
            "fold_values": {k: v for k, v in best.user_attrs.items() if k.startswith("fold")}, **trial_counts(study)}


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """n_complete, n_pruned, n_failed (of which n_reaped: RUNNING trials whose worker was gone), n_retried (trials
    that repeated a reaped one's parameters), n_running, n_waiting — for best_params.yaml and summary.md."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    return {"n_complete": states.count(TrialState.COMPLETE), "n_pruned": states.count(TrialState.PRUNED),
            "n_failed": states.count(TrialState.FAIL), "n_reaped": sum("reaped" in t.user_attrs for t in trials),
            "n_retried": sum("retried_from" in t.user_attrs for t in trials),
            "n_running": states.count(TrialState.RUNNING), "n_waiting": states.count(TrialState.WAITING)}


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    df = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "datetime_start",
                                       "duration"))
    if "duration" in df:
        df["duration_s"] = df.pop("duration").dt.total_seconds()
    named = [c for c in df.columns if c.startswith("value_")]  # a study with metric names writes value_<metric>
    if named and "value" not in df:
        df = df.rename(columns={named[0]: "value"})
        df.insert(df.columns.get_loc("value") + 1, "metric", named[0][len("value_"):])
    for column in ("user_attrs_reaped", "user_attrs_retried_from"):  # always there, so dead and retried count
        if column not in df and len(df):
            df[column] = None
    return df


def write_outputs(study: optuna.Study, out_dir: str | Path, metric: str, storage: str) -> list[Path]:
    """trials.csv, best_params.yaml (when a trial completed) and the three Optuna plots under out_dir."""
    out_dir = Path(out_dir)
    written = [io.write_csv(out_dir / "trials.csv", trials_frame(study))]
    best = best_params(study)
    if best is not None:
        written.append(io.write_yaml(out_dir / "best_params.yaml",
                                     {**best, "metric": metric, "storage": redact(storage)}))
    written += plot_study(study, out_dir / "plots")
    return written


def plot_study(study: optuna.Study, plots_dir: str | Path) -> list[Path]:
    """optuna.visualization.matplotlib: optimisation history, parameter importances, parallel coordinates (PNG).

    A plot that needs more trials than the study has (importances need ≥ 2 complete trials) is skipped with a note.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    from kd_fracture.train.engine import log

    plots_dir = Path(plots_dir)
    written = []
    for name, plot in (("optuna_history", ovm.plot_optimization_history),
                       ("optuna_importances", ovm.plot_param_importances),
                       ("optuna_parallel", ovm.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning of optuna.visualization.matplotlib
                ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            log(f"note: {name}.png skipped ({' '.join(str(e).split())[:120]})")
            continue
        ax = ax.flat[0] if isinstance(ax, np.ndarray) else ax
        fig = ax.figure
        fig.set_size_inches(max(fig.get_figwidth(), 7), max(fig.get_figheight(), 4))
        path = plots_dir / f"{name}.png"
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        plt.close(fig)
        written.append(path)
    return written
