"""`python -m kd_fracture.distill`: distil each fold's teacher into a CNN+Transformer student, tuned with Optuna.

    python -m kd_fracture.distill                               # teacher run runs/teacher_resnet50 (cv's default)
    python -m kd_fracture.distill --n-trials 20 --storage postgresql://user@host/db    # larger, shared search
    python -m kd_fracture.distill --trials-only --storage journal:studies/kd.journal # an extra search worker

Steps (every one resumes on rerun):
1. Teacher-logit cache per fold (teacher_cache.py): the fold-k teacher's logits for V seeded views + the clean view
   of fold k's training images, computed once and replayed to every student of fold k.
2. Optuna search (search.py): a trial trains one student per search fold on fold k's training patients, with fold
   k's teacher and fold k's inner-validation split for early stopping, scores fold k once, reports the running mean
   (step = fold) and may be pruned. Objective = mean scored-fold metric (study κ by default).
3. Final students with the best parameters on every fold, plus the baselines (same student without KD, a timm
   model with KD), each shaped like a teacher run (`final/<variant>/fold_<k>/…`, `holdout/`, tables, plots), the
   holdout model being the fold ensemble.
4. tables/teacher_vs_student.{csv,md,tex} (params, FLOPs, CPU latency, CV and holdout metrics), student.onnx,
   Optuna plots, summary.md.

No leakage: fold k's student sees only fold k's training patients and logits from fold k's teacher, which never saw
fold k. The search picks parameters by the same scored folds it reports, so the best trial's CV numbers are
optimistic; the holdout (never touched by teacher, search or early stopping) is the unbiased estimate.

Layout: <teacher_run>/distill/<study>/{config.yaml, env.json, trials.csv, best_params.yaml, cache/fold_<k>/,
trials/<n>/fold_<k>/{history.csv, metrics.json} (trial checkpoints are deleted once the fold is scored),
final/<variant>/…, tables/, plots/, student.onnx, export.json, summary.md}.
"""
from __future__ import annotations

import os

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from kd_fracture import cv, engine, export, extras, io, pretraining, reporting, scoring, search
from kd_fracture.config import (
    CVConfig,
    DistillConfig,
    add_config_args,
    load_config,
    overrides_from_args,
    read_yaml,
    replace,
    to_dict,
)
from kd_fracture.data.folds import read_folds_csv
from kd_fracture.data.loaders import (
    FoldRows,
    SharedCache,
    build_loader,
    fold_rows,
    resolve_manifest,
)
from kd_fracture.engine import DistillTask  # noqa: F401  (re-exported: distill.DistillTask)
from kd_fracture.errors import ConfigError, UserError, cli_main
from kd_fracture.models import count_params
from kd_fracture.models.student import TIMM_PREFIX
from kd_fracture.run_dir import RunDir, flatten_config, is_runtime_key
from kd_fracture.teacher_cache import (
    LOGITS_FILE,
    CachedTeacher,
    OnlineTeacher,
    TeacherCache,
    load_or_build,
)

DEFAULT_TEACHER_RUN = CVConfig().run_dir
FLAGS = {
    "teacher_run": "teacher_run", "n_trials": "search.n_trials", "timeout": "search.timeout",
    "study": "search.study", "storage": "search.storage", "student": "student.name", "epochs": "train.epochs",
    "teacher_cache": "kd.teacher_cache", "views": "kd.views", "pruner": "search.pruner",
    "search_epochs": "search.epochs", "search_folds": "search.folds", "device": "train.device",
    "threads": "train.threads",
}
TEACHER_CACHE_MODES = ("views", "none")


# ----------------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    d = DistillConfig()  # defaults shown in the help; flags only override the config
    p = argparse.ArgumentParser(prog="python -m kd_fracture.distill", description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--teacher-run", metavar="DIR", help=f"teacher cv run (default {d.teacher_run}); image size, "
                   "folds, data and augmentation come from its config.yaml")
    g = p.add_argument_group("search")
    g.add_argument("--n-trials", type=int, metavar="N", help="target number of finished trials in the study; a rerun "
                   f"adds only the missing ones (default {d.search.n_trials})")
    g.add_argument("--timeout", type=float, metavar="S", help="stop starting trials after S seconds")
    g.add_argument("--study", help=f"study name, also the folder <teacher-run>/distill/<study> "
                   f"(default {d.search.study})")
    g.add_argument("--storage", metavar="URL", help="sqlite:///F.db | postgresql://… | mysql://… | journal:PATH "
                   "(default sqlite:///studies/<study>.db)")
    g.add_argument("--pruner", choices=search.PRUNERS, help=f"default {d.search.pruner}")
    g.add_argument("--search-epochs", type=int, metavar="N", help=f"epochs per fold in a trial "
                   f"(default {d.search.epochs})")
    g.add_argument("--search-folds", type=int, metavar="N", help=f"folds per trial, the first N "
                   f"(default {d.search.folds}; --set search.folds=null for all)")
    g.add_argument("--skip-search", action="store_true", help="train final students with best_params.yaml (or "
                   "the config's values when there is none)")
    g.add_argument("--trials-only", action="store_true", help="only run trials (an extra worker on a shared storage)")
    g = p.add_argument_group("student and training")
    g.add_argument("--student", help=f"hybrid_t | hybrid_s | hybrid_m | timm:NAME (default {d.student.name})")
    g.add_argument("--epochs", type=int, help=f"epochs of the final students (default {d.train.epochs})")
    g.add_argument("--teacher-cache", choices=TEACHER_CACHE_MODES, help="views = cached, replayed views (default); "
                   "none = run the teacher online every step on the same views, for comparison")
    g.add_argument("--views", type=int, help=f"augmented views per image whose teacher logits are cached "
                   f"(default {d.kd.views})")
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--threads", type=int, help="torch CPU threads (on a CPU shared with other jobs, 1 is often "
                   "fastest)")
    return p


def resolve_config(args: argparse.Namespace) -> DistillConfig:
    """Saved study config (when resuming without --config) ← --config ← flags."""
    overrides = overrides_from_args(args, FLAGS)
    cfg = load_config(DistillConfig, args.config, overrides)
    saved = RunDir(study_dir(cfg)).saved_config(DistillConfig)
    if saved is not None and args.config is None:
        cfg = replace(saved, **overrides)
    return cfg


def study_dir(cfg: DistillConfig) -> Path:
    return Path(cfg.teacher_run) / "distill" / cfg.search.study


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.skip_search and args.trials_only:
        raise UserError("--skip-search and --trials-only exclude each other")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("distill does not run under torchrun (every process would write); scale it out with several "
                        "Optuna workers on one --storage instead (README: Scaling out)")
    cfg = resolve_config(args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from our callback instead
    run_distill(cfg, skip_search=args.skip_search, trials_only=args.trials_only)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# the teacher run


@dataclass
class TeacherRun:
    """A finished teacher cv run: its config and its K fold checkpoints."""

    run: RunDir
    cfg: CVConfig
    _sha256: dict = field(default_factory=dict, repr=False)

    def checkpoint(self, k: int) -> Path:
        return self.run.fold(k) / engine.BEST

    def load(self, k: int) -> nn.Module:
        return cv.load_fold_model(self.cfg, self.run, k)

    def checkpoint_sha256(self, k: int) -> str:
        """sha256 of fold k's checkpoint, verified against its sidecar once per process."""
        if k not in self._sha256:
            engine.verify_sidecar(self.checkpoint(k))
            self._sha256[k] = io.read_json(self.checkpoint(k).with_name(engine.BEST + ".json"))["sha256"]
        return self._sha256[k]


def load_teacher_run(path: str | Path) -> TeacherRun:
    """The finished teacher run at `path`, or a UserError saying which command makes it."""
    run = RunDir(path)
    make = ("python -m kd_fracture.cv --folds 5" if Path(path) == Path(DEFAULT_TEACHER_RUN)
            else f"python -m kd_fracture.cv --run-dir {path}")
    cfg = run.saved_config(CVConfig)
    if cfg is None:
        raise UserError(f"{path}: no teacher run here (no config.yaml); train the teachers first: {make}")
    missing = [k for k in range(cfg.data.folds) if not run.is_done(k)]
    if missing:
        raise UserError(f"{path}: teacher fold(s) {missing} are not finished; resume them: "
                        f"python -m kd_fracture.cv --run-dir {path}")
    if not (run.holdout / "metrics.json").exists():
        raise UserError(f"{path}: the teacher run has no holdout results; run: "
                        f"python -m kd_fracture.cv --run-dir {path} --aggregate")
    return TeacherRun(run, cfg)


def check_config(cfg: DistillConfig) -> dict[str, search.Param]:
    """Config errors before any work; returns the parsed search space."""
    if cfg.kd.teacher_cache not in TEACHER_CACHE_MODES:
        raise ConfigError(f"kd.teacher_cache '{cfg.kd.teacher_cache}' is not one of {', '.join(TEACHER_CACHE_MODES)}")
    if cfg.kd.views < 1:
        raise ConfigError(f"kd.views={cfg.kd.views}: cache at least one augmented view")
    if cfg.train.mixup > 0 or cfg.train.cutmix > 0:
        raise ConfigError("train.mixup/cutmix: mixed images have no cached teacher logits; set both to 0 for distill")
    scoring.check_threshold_rule(cfg.eval)
    if cfg.search.n_trials < 1:
        raise ConfigError(f"search.n_trials={cfg.search.n_trials}: need at least 1 (or use --skip-search)")
    for name in cfg.baselines:
        if name != "no_kd" and not name.startswith(TIMM_PREFIX):
            raise ConfigError(f"baselines: '{name}' is neither no_kd nor timm:NAME")
    search.make_pruner(cfg.search)
    search.check_metric(cfg.search.metric)
    return search.parse_space(cfg.search.space, cfg)


# ----------------------------------------------------------------------------------------------------------------------
# training one student on one fold


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: a name (its folder), what it is, and its config."""

    name: str
    role: str
    cfg: DistillConfig


class Distiller:
    """Data, teachers and caches of one distillation run; trains and scores students fold by fold."""

    def __init__(self, cfg: DistillConfig, teacher: TeacherRun, out: RunDir, device: torch.device):
        self.cfg, self.teacher, self.out, self.device = cfg, teacher, out, device
        self.data, self.aug = teacher.cfg.data, teacher.cfg.aug
        self.manifest = resolve_manifest(self.data)
        teacher.run.check_trained_on(self.manifest.sha256(), self.manifest.root, "the teachers were",
                                     "distil on the data of the teacher run")
        self.folds = read_folds_csv(teacher.run.folds)  # the teachers' folds, never re-derived
        self.images = SharedCache(self.manifest.root, self.data.img_size, self.data.cache_images)
        self._rows: dict[int, FoldRows] = {}
        self._caches: dict[int, TeacherCache] = {}
        self.clock = Clock()

    def rows(self, k: int) -> FoldRows:
        if k not in self._rows:
            self._rows[k] = fold_rows(self.manifest, self.folds, k, self.data)
        return self._rows[k]

    def seed(self, cfg: DistillConfig, k: int) -> int:
        return cfg.train.seed + k

    def teacher_cache(self, k: int) -> TeacherCache:
        """Fold k's cached teacher logits (loaded, or built once with fold k's teacher)."""
        if k not in self._caches:
            t0 = time.perf_counter()
            cache = load_or_build(
                self.out.path / "cache" / f"fold_{k}", lambda: self.teacher.load(k), self.teacher.checkpoint(k),
                self.teacher.cfg.model, self.rows(k).train, self.manifest, self.data, self.aug,
                views=self.cfg.kd.views, seed=self.seed(self.cfg, k), device=self.device,
                batch_size=self.teacher.cfg.train.eval_batch_size, amp=self.teacher.cfg.train.amp,
                image_cache=self.images, desc=f"teacher cache fold {k}")
            if cache.rebuilt:
                self.clock.cache_built(time.perf_counter() - t0)
                engine.log(f"teacher cache fold {k}: {tuple(cache.logits.shape)} logits in "
                           f"{time.perf_counter() - t0:.0f}s → {cache.path}")
            self._caches[k] = cache
        return self._caches[k]

    def teacher_source(self, cfg: DistillConfig, k: int) -> Callable[[dict], torch.Tensor] | None:
        if cfg.kd.alpha == 0:
            return None  # the no-KD baseline needs no teacher
        if cfg.kd.teacher_cache == "none":
            return OnlineTeacher(self.teacher.load(k).to(self.device), self.teacher.cfg.model.in_chans)
        return CachedTeacher(self.teacher_cache(k))

    def loader(self, cfg: DistillConfig, rows: pd.DataFrame, k: int, train: bool):
        """Train: the V replayed views (same seed as the cache); eval: clean images in row order."""
        return build_loader(rows, self.manifest, self.data, self.aug, train=train, in_chans=cfg.student.in_chans,
                            batch_size=cfg.train.batch_size if train else cfg.train.eval_batch_size,
                            seed=self.seed(cfg, k), num_views=cfg.kd.views if train else None, cache=self.images)

    def student_start(self, cfg: DistillConfig) -> Path | None:
        """The student's phantom-pretrained start (KD start for α > 0, hard-label start for α = 0), None = random."""
        if not pretraining.uses_phantom_student(cfg, self.teacher.cfg):
            return None
        return pretraining.ensure_student_weights(cfg, self.teacher.cfg, kd=cfg.kd.alpha > 0)

    def build_student(self, cfg: DistillConfig) -> nn.Module:
        s = cfg.student
        start = self.student_start(cfg)
        file = None if start else pretraining.local_file(s.pretrained)
        return pretraining.build(s, self.data.img_size, start=start, file=file)

    def train_fold(self, cfg: DistillConfig, k: int, out_dir: Path, epochs: int, name: str
                   ) -> tuple[nn.Module, pd.DataFrame, dict, dict]:
        """Train fold k's student into out_dir, score fold k once → (model, oof predictions, metrics, info).

        As for a teacher fold (`scoring.score_fold`): fold k's inner-val split chooses the decision threshold
        (eval.threshold_rule; its predictions → out_dir/inner_val_predictions.csv) and fold k is scored at it and
        at 0.5; the trial objective (search.metric) is read at the chosen threshold.
        """
        rows = self.rows(k)
        seed = self.seed(cfg, k)
        engine.seed_everything(seed)
        model = self.build_student(cfg)
        pos_weight = engine.resolve_pos_weight(cfg.train.pos_weight, rows.train["label"])  # "auto" → n_neg/n_pos
        task = DistillTask(self.teacher_source(cfg, k), cfg.kd.temperature, cfg.kd.alpha, pos_weight)
        fit = engine.fit(model, task, self.loader(cfg, rows.train, k, True), self.loader(cfg, rows.inner_val, k, False),
                         rows.inner_val, replace(cfg.train, seed=seed, epochs=epochs), out_dir, name=name,
                         device=self.device, epoch_callback=self.clock.tick)
        inner, pred, result = scoring.score_fold(model, self.loader(cfg, rows.inner_val, k, False), rows.inner_val,
                                                 self.loader(cfg, rows.scored, k, False), rows.scored, self.device,
                                                 cfg.eval, cfg.train.amp)
        io.write_csv(out_dir / "inner_val_predictions.csv", inner)
        info = {"best_epoch": fit.best_epoch, f"inner_val_{cfg.train.monitor}": fit.best_score,
                "epochs_run": len(fit.history), "params": count_params(model), "n_train": len(rows.train),
                "n_inner_val": len(rows.inner_val), "kd": {"temperature": cfg.kd.temperature, "alpha": cfg.kd.alpha,
                                                          "views": cfg.kd.views, "teacher_cache": cfg.kd.teacher_cache},
                "teacher_checkpoint_sha256": self.teacher.checkpoint_sha256(k)}
        return model, pred, result, info

    # -- search --------------------------------------------------------------------------------------------------------

    def search_folds(self) -> list[int]:
        n = self.cfg.search.folds or self.data.folds
        if not 1 <= n <= self.data.folds:
            raise ConfigError(f"search.folds={n}: the teacher run has {self.data.folds} folds")
        return list(range(n))

    def search_epochs(self) -> int:
        return self.cfg.search.epochs or self.cfg.train.epochs

    def fingerprint(self, space: dict) -> dict:
        """What a trial's value depends on; a shared study refuses workers whose fingerprint differs."""
        cfg = self.cfg
        train = {k: v for k, v in to_dict(cfg.train).items() if k not in ("device", "threads", "eval_batch_size")}
        return {"teacher_checkpoints": [self.teacher.checkpoint_sha256(k) for k in range(self.data.folds)],
                "manifest_sha256": self.manifest.sha256(), "img_size": self.data.img_size,
                "student": to_dict(cfg.student), "student_pretrain": to_dict(cfg.pretrain), "train": train,
                "kd": {"temperature": cfg.kd.temperature, "alpha": cfg.kd.alpha, "views": cfg.kd.views},
                "metric": cfg.search.metric, "folds": self.search_folds(), "epochs": self.search_epochs(),
                # the objective's κ/F1/… are read at the cut this rule chooses on each fold's inner-val split
                "threshold": {"rule": cfg.eval.threshold_rule, "fixed": cfg.eval.threshold},
                "space": space}

    def score_trial_fold(self, trial: optuna.Trial, params: dict, k: int) -> float:
        cfg = search.apply_params(self.cfg, params)
        out_dir = self.out.path / "trials" / str(trial.number) / f"fold_{k}"
        if out_dir.exists():
            shutil.rmtree(out_dir)  # leftovers of a dead process that had this trial number: start clean
        _, _, result, info = self.train_fold(cfg, k, out_dir, self.search_epochs(), f"trial {trial.number} fold {k}: ")
        value = search.metric_value(result, cfg.search.metric)
        io.write_json(out_dir / "metrics.json", {"trial": trial.number, "fold": k, "params": params, **info,
                                                 **result})
        for name in (engine.BEST, engine.LAST):  # trial checkpoints are never reused: keep only history + metrics
            for path in (out_dir / name, out_dir / f"{name}.json"):
                path.unlink(missing_ok=True)
        engine.log(f"trial {trial.number} fold {k}: {cfg.search.metric} {value:.3f}")
        return value

    def run_search(self, space: dict[str, search.Param]) -> optuna.Study:
        scfg = self.cfg.search
        url = search.storage_url(scfg.storage, scfg.study)
        study = search.open_study(scfg, url, fingerprint=self.fingerprint(self.cfg.search.space))
        folds = self.search_folds()
        done = search.count_finished(study)
        todo = max(0, scfg.n_trials - done)
        engine.log(f"search: study '{scfg.study}' at {search.redact(url)} holds {done} finished trial(s); target "
                   f"{scfg.n_trials} → {todo} to run, each {len(folds)} fold(s) × ≤ {self.search_epochs()} epochs")
        self.clock.plan(epochs=todo * len(folds) * self.search_epochs())
        objective = search.make_objective(space, folds, self.score_trial_fold,
                                          report="per_fold" if scfg.pruner == "wilcoxon" else "running_mean")
        bar = tqdm(total=scfg.n_trials, initial=min(done, scfg.n_trials), desc="trials",
                   disable=not engine.show_progress())

        def on_trial_end(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            bar.update(1)
            value = "—" if trial.value is None else f"{trial.value:.3f}"
            engine.log(f"trial {trial.number}: {trial.state.name.lower()}  value {value}")

        try:
            search.run_search(study, objective, scfg, catch=(engine.TrainingError,), callbacks=[on_trial_end])
        finally:
            bar.close()
        search.write_outputs(study, self.out.path, scfg.metric, url)
        return study

    # -- final students ------------------------------------------------------------------------------------------------

    def variants(self, cfg: DistillConfig) -> list[Variant]:
        student = cfg.student.name.replace(TIMM_PREFIX, "")
        out = [Variant(f"{student}_kd", "student, KD (best trial)", cfg)]
        for name in cfg.baselines:
            if name == "no_kd":
                out.append(Variant(f"{student}_no_kd", "student, no KD (α = 0)", replace(cfg, **{"kd.alpha": 0.0})))
            else:
                timm_cfg = replace(cfg, **{"student.name": name, "student.overrides": {}})
                out.append(Variant(f"{name[len(TIMM_PREFIX):]}_kd", "timm baseline, KD", timm_cfg))
        return out

    def variant_config(self, v: Variant) -> CVConfig:
        """The variant as a teacher-style run config, so cv.aggregate, predict and explain can read its folder."""
        return CVConfig(run_dir=str(self.out.path / "final" / v.name), data=self.data, aug=self.aug,
                        model=v.cfg.student, train=v.cfg.train, eval=v.cfg.eval)

    def train_variant(self, v: Variant) -> RunDir:
        vcfg = self.variant_config(v)
        run = RunDir(vcfg.run_dir)
        # what the finished folds depend on (runtime-only keys such as threads or device excluded)
        stamp = search.jsonable({
            "config": {k: v2 for k, v2 in flatten_config(to_dict(vcfg)).items() if not is_runtime_key(k)},
            "kd": {"temperature": v.cfg.kd.temperature, "alpha": v.cfg.kd.alpha, "views": v.cfg.kd.views},
            "student_start": str(self.student_start(v.cfg) or "random init"),
            "teacher_checkpoints": [self.teacher.checkpoint_sha256(k) for k in range(self.data.folds)]})
        stamp_path = run.path / "variant.json"
        if stamp_path.exists() and io.read_json(stamp_path) != stamp:
            old = run.path.with_name(run.path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            run.path.rename(old)
            engine.log(f"{v.name}: parameters or teachers changed since it was trained (new best trial?); "
                       f"previous results moved to {old}, retraining")
        run.write_config(vcfg)
        run.write_env(v.cfg.train.seed, str(self.device), {"teacher_run": str(self.teacher.run.path),
                                                           "manifest_sha256": self.manifest.sha256()})
        io.write_json(stamp_path, stamp)
        io.write_csv(run.folds, self.folds)
        ks = range(self.data.folds)
        for k in tqdm(ks, desc=f"{v.name} folds", disable=not engine.show_progress()):
            if run.is_done(k):
                continue
            _, pred, result, info = self.train_fold(v.cfg, k, run.fold(k), v.cfg.train.epochs, f"{v.name} fold {k}: ")
            io.write_csv(run.fold(k) / "oof_predictions.csv", pred)
            io.write_json(run.fold(k) / "metrics.json", {"fold": k, **info, **result})
            run.mark_done(k, {**{k2: info[k2] for k2 in ("best_epoch", "epochs_run", "params")},
                              "threshold": result["threshold"]})
            engine.log(f"{v.name} fold {k}: scored fold κ {result['study']['kappa']:.3f} at threshold "
                       f"{result['threshold']:.3f} (κ {result[scoring.AT_REFERENCE]['study']['kappa']:.3f} at 0.5)  "
                       f"AUROC {result['study']['auroc']:.3f}")
        if not run.summary.exists():
            cv.aggregate(vcfg, self.manifest, run, self.device, self.images)
        return run


# ----------------------------------------------------------------------------------------------------------------------
# progress and time estimate


class Clock:
    """A rough upper bound of the time left, logged once after the first student epoch:
    planned epochs × that epoch's time + teacher caches still to build × the first cache's time."""

    def __init__(self):
        self.epochs, self.caches, self.cache_s, self.reported = 0, 0, 0.0, False

    def plan(self, epochs: int = 0, caches: int = 0) -> None:
        self.epochs += epochs
        self.caches += caches

    def cache_built(self, seconds: float) -> None:
        self.caches -= 1
        self.cache_s = self.cache_s or seconds

    def tick(self, epoch: int, row: dict) -> None:
        self.epochs -= 1
        if self.reported:
            return
        self.reported = True
        left = max(self.epochs, 0) * row["time_s"] + max(self.caches, 0) * self.cache_s
        caches = ""
        if self.caches > 0:
            caches = f" + {self.caches} teacher cache(s) × " + (f"{self.cache_s:.0f}s" if self.cache_s else "?")
        engine.log(f"estimate: {max(self.epochs, 0)} more student epochs × {row['time_s']:.1f}s{caches} → "
                   f"≤ {left / 60:.0f} min, plus holdout/reports (pruning and early stopping make it shorter)")


# ----------------------------------------------------------------------------------------------------------------------
# the whole command


def run_distill(cfg: DistillConfig, skip_search: bool = False, trials_only: bool = False) -> RunDir:
    t0 = time.perf_counter()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    space = check_config(cfg)
    teacher = load_teacher_run(cfg.teacher_run)
    out = RunDir(study_dir(cfg))
    try:
        out.check_compatible(cfg)
    except UserError as e:
        raise UserError(str(e).replace("a new --run-dir", "a new --study NAME")) from None
    device = engine.resolve_device(cfg.train.device)
    d = Distiller(cfg, teacher, out, device)
    out.write_config(cfg)
    out.write_env(cfg.train.seed, str(device), {"teacher_run": str(teacher.run.path),
                                                "manifest_sha256": d.manifest.sha256()})
    k_folds = teacher.cfg.data.folds
    engine.log(f"distill: teacher {teacher.cfg.model.name} × {k_folds} folds ({teacher.run.path}), student "
               f"{cfg.student.name}, {teacher.cfg.data.img_size} px, {cfg.kd.views} cached views "
               f"({cfg.kd.teacher_cache}); final: {1 + len(cfg.baselines)} variants × {k_folds} folds × "
               f"≤ {cfg.train.epochs} epochs → {out.path}")

    if cfg.kd.teacher_cache == "views":
        cached = [(out.path / "cache" / f"fold_{k}" / LOGITS_FILE).exists() for k in range(k_folds)]
        d.clock.plan(caches=cached.count(False))
    if not trials_only:
        d.clock.plan(epochs=sum(not RunDir(out.path / "final" / v.name).is_done(k) for v in d.variants(cfg)
                                for k in range(k_folds)) * cfg.train.epochs)
    params: dict = {}
    if not skip_search:
        study = d.run_search(space)
        best = search.best_params(study)
        if best is None:
            raise UserError(f"study '{cfg.search.study}': no trial completed (see {out.path / 'trials.csv'}); "
                            "raise --n-trials or fix the failing trials")
        params = best["params"]
        engine.log(f"best trial {best['trial']}: {cfg.search.metric} {best['value']:.3f}  {params}")
    elif (out.path / "best_params.yaml").exists():
        params = read_yaml(out.path / "best_params.yaml").get("params", {})
        engine.log(f"--skip-search: parameters from {out.path / 'best_params.yaml'}: {params}")
    else:
        engine.log("--skip-search: no best_params.yaml; final students use the config's values")
    if trials_only:
        engine.log(f"--trials-only: done in {time.perf_counter() - t0:.0f}s; trials in {out.path / 'trials.csv'}")
        return out

    best_cfg = search.apply_params(cfg, params)
    runs = {}
    for v in d.variants(best_cfg):
        runs[v.name] = (v, d.train_variant(v))
    report(d, best_cfg, params, runs, time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# comparison table, ONNX, summary


def fold_metrics(run: RunDir, folds: int) -> list[dict]:
    return [io.read_json(run.fold(k) / "metrics.json") for k in range(folds)]


def comparison_row(label: str, role: str, model: nn.Module, in_chans: int, img_size: int, folds: list[dict],
                   holdout: dict, threads: int) -> dict:
    """One row of teacher_vs_student: size and speed of one fold model; CV mean/std and holdout of the ensemble."""
    prof = export.profile_model(model, in_chans, img_size, threads)
    cv_stats = {}
    for m in ("kappa", "auroc", "f1"):
        values = np.array([f["study"][m] for f in folds], dtype=float)  # (K,) scored-fold values
        cv_stats[f"cv_{m}_mean"] = float(np.nanmean(values))
        cv_stats[f"cv_{m}_std"] = float(np.nanstd(values, ddof=1)) if np.isfinite(values).sum() > 1 else 0.0
    ci = holdout["ci95"]
    return {"model": label, "role": role, "params_M": prof["params"] / 1e6, "gflops": prof["flops"] / 1e9,
            "latency_ms": prof["latency_ms"], "latency_threads": threads, **cv_stats,
            "holdout_kappa": ci["kappa"]["value"], "holdout_kappa_low": ci["kappa"]["low"],
            "holdout_kappa_high": ci["kappa"]["high"], "holdout_auroc": ci["auroc"]["value"],
            "holdout_f1": ci["f1"]["value"]}


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """The human-readable form (Markdown/LaTeX): mean ± std and value [CI] as text."""

    def pm(metric: str) -> list[str]:
        return [f"{m:.3f} ± {s:.3f}" for m, s in zip(df[f"cv_{metric}_mean"], df[f"cv_{metric}_std"])]

    def fixed(column: str, digits: int = 3) -> list[str]:
        return [f"{v:.{digits}f}" for v in df[column]]

    return pd.DataFrame({
        "model": df["model"], "role": df["role"], "params (M)": fixed("params_M", 2), "GFLOPs": fixed("gflops"),
        "CPU ms/img": [f"{v:.2f} ({t} thr)" for v, t in zip(df["latency_ms"], df["latency_threads"])],
        "CV study κ": pm("kappa"), "CV AUROC": pm("auroc"), "CV F1": pm("f1"),
        "holdout κ [95% CI]": [reporting.ci_text(r.holdout_kappa, r.holdout_kappa_low, r.holdout_kappa_high)
                               for r in df.itertuples()],
        "holdout AUROC": fixed("holdout_auroc"), "holdout F1": fixed("holdout_f1"),
    })


def report(d: Distiller, cfg: DistillConfig, params: dict, runs: dict[str, tuple[Variant, RunDir]],
           elapsed: float) -> None:
    out, teacher, img = d.out, d.teacher, d.data.img_size
    threads = cfg.latency_threads
    tcfg = teacher.cfg
    rows = [comparison_row(f"teacher ({tcfg.model.name})", "teacher", teacher.load(0), tcfg.model.in_chans, img,
                           fold_metrics(teacher.run, d.data.folds),
                           io.read_json(teacher.run.holdout / "metrics.json")["fold_ensemble"], threads)]
    for name, (v, run) in runs.items():
        vcfg = d.variant_config(v)
        rows.append(comparison_row(name, v.role, cv.load_fold_model(vcfg, run, 0), v.cfg.student.in_chans, img,
                                   fold_metrics(run, d.data.folds),
                                   io.read_json(run.holdout / "metrics.json")["fold_ensemble"], threads))
    table = pd.DataFrame(rows)
    stem = out.tables / "teacher_vs_student"
    written = reporting.write_table(display_table(table), stem, "Teacher vs. students: size, CPU latency at batch 1, "
                                    "study-level CV (mean ± std over folds) and holdout (fold ensemble, 95% CI)")
    io.write_csv(stem.with_suffix(".csv"), table)  # the CSV keeps full-precision numbers, not the display text

    main_name, (main_variant, main_run) = next(iter(runs.items()))
    onnx_info: dict = {"exported": False}
    if cfg.onnx and extras.optional("onnx", "onnx", "student.onnx") is None:
        onnx_info["reason"] = "onnx is not installed (pip install 'kd_fracture[onnx]')"
    elif cfg.onnx:
        members = [cv.load_fold_model(d.variant_config(main_variant), main_run, k) for k in range(d.data.folds)]
        ensemble = export.FoldEnsemble(members).eval()
        onnx_info = export.export_onnx(ensemble, out.path / "student.onnx", main_variant.cfg.student.in_chans, img)
        onnx_info |= export.check_onnx(ensemble, out.path / "student.onnx", main_variant.cfg.student.in_chans, img)
        onnx_info |= {"exported": True, "model": f"{main_name} fold ensemble ({d.data.folds} members)",
                      "input": f"image (B, {main_variant.cfg.student.in_chans}, {img}, {img}) float32, grayscale "
                               "normalised (x/255 − 0.449)/0.226", "output": "(B,) mean abnormality probability"}
        io.write_json(out.path / "export.json", onnx_info)
        written.append(out.path / "student.onnx")
        if onnx_info.get("checked") and not onnx_info["ok"]:
            engine.log(f"warning: student.onnx differs from torch by {onnx_info['max_abs_diff']:.2e} "
                       f"(> {onnx_info['tolerance']:g})")
    write_summary(d, cfg, params, table, onnx_info, elapsed, written)
    print(display_table(table).to_markdown(index=False))


def write_summary(d: Distiller, cfg: DistillConfig, params: dict, table: pd.DataFrame, onnx_info: dict,
                  elapsed: float, written: list[Path]) -> None:
    out = d.out
    best = read_yaml(out.path / "best_params.yaml") if (out.path / "best_params.yaml").exists() else None
    search_line = (f"Study `{cfg.search.study}`: {best['n_complete']} complete, {best['n_pruned']} pruned, "
                   f"{best['n_failed']} failed trials; best trial {best['trial']} with mean {cfg.search.metric} "
                   f"{best['value']:.3f} over search folds {d.search_folds()}." if best else
                   "No search results (final students use the config's parameters).")
    if onnx_info.get("checked"):
        onnx_line = (f"`student.onnx` ({onnx_info['model']}, {onnx_info['exporter']} exporter, opset "
                     f"{onnx_info['opset']}): max |torch − onnxruntime| = {onnx_info['max_abs_diff']:.2e} "
                     f"({'ok' if onnx_info['ok'] else 'TOO LARGE'}, tolerance {onnx_info['tolerance']:g}).")
    elif onnx_info.get("exported"):
        onnx_line = f"`student.onnx` written; not checked: {onnx_info['reason']}."
    else:
        onnx_line = "No ONNX export (onnx: false)."
    plots = sorted((out.plots).glob("optuna_*.png")) if out.plots.exists() else []
    title = (f"# Distillation: {d.teacher.cfg.model.name} → {cfg.student.name} "
             f"({d.data.folds}-fold, {d.data.img_size} px)")
    data = d.data.root or "synthetic phantom (not real radiographs)"
    setup = (f"Teacher run `{d.teacher.run.path}`; data `{data}`; {cfg.kd.views} cached augmented views per image "
             f"({cfg.kd.teacher_cache}); {elapsed / 60:.1f} min.")
    chosen = ", ".join(f"`{k}` = {_fmt(v)}" for k, v in params.items())
    best_line = f"Best parameters: {chosen or '(config defaults)'}"
    if cfg.eval.threshold_rule == "fixed":
        cut = f"κ and F1 at the fixed threshold {cfg.eval.threshold:g}."
    else:
        cut = (f"κ and F1 at each fold's threshold chosen by `{cfg.eval.threshold_rule}` on its inner-validation "
               "split (teachers: the teacher run's rule), the holdout ensemble at the mean of its folds' "
               "thresholds; each variant's tables/ also give them at 0.5, and its Brier, ECE and AUPRC.")
    notes = ("CV numbers are means ± std over the scored folds; holdout = fold ensemble with 95% bootstrap CI over "
             f"studies. Latency: median of 20 batch-1 CPU forward passes after warm-up with {cfg.latency_threads} "
             f"torch thread(s); FLOPs from torch's flop counter (1 MAC = 2 FLOPs) at batch 1. {cut}")
    caveat = ("**Caveat:** the search chose its parameters by the mean scored-fold metric, so the CV numbers of the "
              "KD student are optimistically biased (selection on the same folds); the holdout, never used by the "
              "teachers, the search or early stopping, is the unbiased estimate.")
    lines = [title, "", setup, "", search_line, "", best_line, "",
             "## Teacher vs. students", "", display_table(table).to_markdown(index=False), "", notes, "", caveat, "",
             onnx_line, "", "## Files", "", reporting.markdown_link_list(out.path, [*written, *plots]), ""]
    io.write_text(out.summary, "\n".join(lines))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    sys.exit(main())
