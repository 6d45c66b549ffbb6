"""The distill pipeline: distil each fold's teacher into a CNN+Transformer student, tuned with Optuna (no argparse).

Steps (every one resumes on rerun):
1. Teacher-logit cache per fold (train/teacher_cache.py): the fold-k teacher's logits for V seeded views + the clean view
   of fold k's training images, computed once and replayed to every student of fold k.
2. One Optuna study per variant (`<study>/<variant>`: kd, no_kd, timm:NAME), each with the same budget (n_trials,
   search folds, search epochs, pruner) over the keys that act on it. A trial trains one student per search fold on
   fold k's training patients with fold k's teacher; its value is the search metric on fold k's inner-validation
   split, reported after every epoch (step = fold × epochs + epoch) so the pruner can stop it inside a fold. No
   scored fold and no holdout image enters any choice (unbiased selection).
3. Each variant's final students with its own best parameters on every fold, each shaped like a teacher run
   (`final/<variant>/fold_<k>/…`, `holdout/`, tables, plots), the holdout model being the fold ensemble.
4. report.distill: tables/teacher_vs_student.* per deployable thing (one fold model: cost + scored-fold mean ± std,
   paired Δ vs no-KD with the corrected resampled t-test; the K-fold ensemble: cost + holdout),
   tables/paired_vs_no_kd.*, student.onnx + student_ensemble.onnx, summary.md.

No leakage: fold k's student sees only fold k's training patients and logits from fold k's teacher, which never saw
fold k.

Layout: <teacher_run>/distill/<study>/{config.yaml, env.json, cache/fold_<k>/, search/<variant>/{trials.csv,
best_params.yaml, plots/}, trials/<variant>/<n>/fold_<k>/{history.csv, metrics.json} (trial checkpoints are deleted
once the fold is scored; a trial whose worker died is removed when the next worker starts and retried, see
search.reap), final/<variant>/…, tables/, student.onnx, student_ensemble.onnx, export.json, summary.md}.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from functools import partial
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from kd_fracture import io, search
from kd_fracture.config import CVConfig, DistillConfig, from_dict, read_yaml, recipe_dict, replace, to_dict
from kd_fracture.data.folds import read_folds_csv
from kd_fracture.data.loaders import (FoldRows, SharedCache, backend_recipe, build_loader, data_name, fold_rows,
                                     resolve_manifest)
from kd_fracture.errors import ConfigError, UserError
from kd_fracture.models.student import TIMM_PREFIX
from kd_fracture.pipelines import pretraining
from kd_fracture.pipelines.fold import FoldResult, fold_seed, train_and_score_fold
from kd_fracture.report.aggregate import aggregate
from kd_fracture.report.distill import VariantRun, report
from kd_fracture.runs import scoring
from kd_fracture.runs.models import TeacherRun, load_teacher_run, variant_name
from kd_fracture.runs.rundir import RunDir, changed_keys, flatten_config, is_runtime_key
from kd_fracture.train import checkpoint, engine, tasks
from kd_fracture.train.teacher_cache import LOGITS_FILE, CachedTeacher, OnlineTeacher, TeacherCache, load_or_build

TEACHER_CACHE_MODES = ("views", "none")


# ----------------------------------------------------------------------------------------------------------------------
# the teacher run


def study_dir(cfg: DistillConfig) -> Path:
    return Path(cfg.teacher_run) / "distill" / cfg.search.study


def default_study(teacher_run: str | Path, student: str) -> str:
    """`<dataset>-<teacher model>-<student>` of the teacher run (its config.yaml; else the run's last two path
    parts), so studies of different teacher runs never share a name on a shared storage."""
    config = RunDir(teacher_run).config
    if config.is_file():
        teacher = from_dict(CVConfig, read_yaml(config), str(config))
        parts = [data_name(teacher.data), teacher.model.name]
    else:
        parts = list(Path(teacher_run).parts[-2:])
    return "-".join([*parts, student]).replace("timm:", "").replace("/", "-")


def resolve_names(cfg: DistillConfig) -> DistillConfig:
    """Fill the defaults that derive from the teacher run: search.study (`default_study`) and search.storage
    (sqlite:///<teacher_run>/distill/<study>.db)."""
    study = cfg.search.study or default_study(cfg.teacher_run, cfg.student.name)
    storage = cfg.search.storage or search.storage_url(None, study, Path(cfg.teacher_run) / "distill")
    return replace(cfg, **{"search.study": study, "search.storage": storage})


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
    if not cfg.variants:
        raise ConfigError("variants: name at least one of kd, no_kd, timm:NAME")
    for name in cfg.variants:
        if name not in VARIANTS and not name.startswith(TIMM_PREFIX):
            raise ConfigError(f"variants: '{name}' is none of {', '.join(VARIANTS)}, timm:NAME")
    if len(set(cfg.variants)) != len(cfg.variants):
        raise ConfigError(f"variants: {list(cfg.variants)} names one twice")
    search.make_pruner(cfg.search)
    search.check_metric(cfg.search.metric)
    return search.parse_space(cfg.search.space, cfg)


# ----------------------------------------------------------------------------------------------------------------------
# training one student on one fold


@dataclass(frozen=True)
class Variant:
    """One row of the comparison, with its own search: a name (its folder and its study `<study>/<name>`), what it
    is, its config before the search, and the part of the search space that applies to it."""

    name: str
    role: str
    cfg: DistillConfig
    space: dict


VARIANTS = ("kd", "no_kd")
"""Variant kinds besides timm:NAME: the student with KD, and the same student without (α = 0, T unused)."""


def variant_list(cfg: DistillConfig) -> list[Variant]:
    """cfg.variants as Variants, each searched over the keys that act on it (docs/design.md §8): kd = the whole
    space; no_kd = without kd.* (α is fixed at 0, so T never enters the loss); timm:NAME = without the hybrid's
    student.overrides.* (another architecture)."""
    space = search.parse_space(cfg.search.space, cfg)
    out = []
    for name in cfg.variants:
        if name == "kd":
            out.append(Variant(variant_name(cfg.student.name, "kd"), "student, KD", cfg, space))
        elif name == "no_kd":
            out.append(Variant(variant_name(cfg.student.name, "no_kd"), "student, no KD (α = 0)",
                               replace(cfg, **{"kd.alpha": 0.0}),
                               {k: v for k, v in space.items() if not k.startswith("kd.")}))
        else:
            timm_cfg = replace(cfg, **{"student.name": name, "student.overrides": {}})
            out.append(Variant(variant_name(name, "kd"), "timm baseline, KD", timm_cfg,
                               {k: v for k, v in space.items() if not k.startswith("student.overrides.")}))
    return out


def stamp_changed(old: dict, new: dict, cls: type) -> bool:
    """A final variant's variant.json differs in what its folds depend on (a config key added to the package since,
    at its default, is no change: `changed_keys`)."""
    rest = lambda stamp: {k: v for k, v in stamp.items() if k != "config"}  # noqa: E731
    return rest(old) != rest(new) or bool(changed_keys(old.get("config", {}), new["config"], cls))


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
        return fold_seed(cfg.train.seed, k)  # the fold trainer's seed: cache views and replay agree

    def teacher_cache(self, k: int) -> TeacherCache:
        """Fold k's cached teacher logits (loaded, or built once with fold k's teacher)."""
        if k not in self._caches:
            t0 = time.perf_counter()
            cache = load_or_build(
                self.out.path / "cache" / f"fold_{k}", lambda: self.teacher.load(k), self.teacher.checkpoint(k),
                self.teacher.cfg.model, self.rows(k).train, self.manifest, self.data, self.aug,
                views=self.cfg.kd.views, seed=self.seed(self.cfg, k), device=self.device,
                batch_size=self.teacher.cfg.train.eval_batch_size, amp=self.teacher.cfg.train.amp,
                precision=self.teacher.cfg.train.precision,
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
                            seed=self.seed(cfg, k), num_views=cfg.kd.views if train else None, cache=self.images,
                            device=self.device)

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

    def train_fold(self, cfg: DistillConfig, k: int, out_dir: Path, epochs: int, name: str,
                   meta: dict | None = None, report_epoch: search.EpochReport | None = None) -> FoldResult:
        """Train fold k's student into out_dir and score fold k once (`fold.train_and_score_fold`, as a teacher
        fold): fold k's inner-val split chooses the decision threshold and fold k is scored at it and at 0.5.
        `report_epoch(epoch, inner-val search metric)` runs after every epoch (a search trial's pruning hook)."""
        rows = self.rows(k)
        info = {"kd": {"temperature": cfg.kd.temperature, "alpha": cfg.kd.alpha, "views": cfg.kd.views,
                       "teacher_cache": cfg.kd.teacher_cache},
                "teacher_checkpoint_sha256": self.teacher.checkpoint_sha256(k)}

        def make_task(r):
            pos_weight = tasks.resolve_pos_weight(cfg.train.pos_weight, r.train["label"])  # "auto" → n_neg/n_pos
            return tasks.DistillTask(self.teacher_source(cfg, k), cfg.kd.temperature, cfg.kd.alpha, pos_weight)

        def after_epoch(epoch: int, row: dict) -> None:
            self.clock.tick(epoch, row)
            if report_epoch is not None:
                report_epoch(epoch, float(row[search.HISTORY_COLUMN[cfg.search.metric]]))

        return train_and_score_fold(k, rows, lambda: self.build_student(cfg), make_task,
                                    lambda r, train: self.loader(cfg, r, k, train), replace(cfg.train, epochs=epochs),
                                    cfg.eval, out_dir, name=name, device=self.device, meta={**(meta or {}), **info},
                                    epoch_callback=after_epoch, tensorboard=cfg.track.tensorboard,
                                    hparams={"student": cfg.student.name, "img_size": self.data.img_size, "fold": k,
                                             "kd.temperature": cfg.kd.temperature, "kd.alpha": cfg.kd.alpha,
                                             "kd.views": cfg.kd.views, "run": name})

    # -- search --------------------------------------------------------------------------------------------------------

    def search_folds(self) -> list[int]:
        n = self.cfg.search.folds or self.data.folds
        if not 1 <= n <= self.data.folds:
            raise ConfigError(f"search.folds={n}: the teacher run has {self.data.folds} folds")
        return list(range(n))

    def search_epochs(self) -> int:
        return self.cfg.search.epochs or self.cfg.train.epochs

    def fingerprint(self, cfg: DistillConfig, space: dict) -> dict:
        """What a trial's value depends on; a shared study refuses workers whose fingerprint differs."""
        train = {k: v for k, v in recipe_dict(cfg.train).items() if k not in ("device", "threads", "eval_batch_size")}
        train.update(engine.precision_recipe(cfg.train, self.device))
        train.update(backend_recipe(self.data, self.device))  # {} for albumentations: earlier studies stay valid
        return {"teacher_checkpoints": [self.teacher.checkpoint_sha256(k) for k in range(self.data.folds)],
                "manifest_sha256": self.manifest.sha256(), "img_size": self.data.img_size,
                "student": to_dict(cfg.student), "student_pretrain": recipe_dict(cfg.pretrain), "train": train,
                "kd": {"temperature": cfg.kd.temperature, "alpha": cfg.kd.alpha, "views": cfg.kd.views},
                "metric": cfg.search.metric, "folds": self.search_folds(), "epochs": self.search_epochs(),
                # a κ objective is read at the cut this rule chooses on each fold's inner-val split
                "threshold": {"rule": cfg.eval.threshold_rule, "fixed": cfg.eval.threshold},
                "space": {k: cfg.search.space[k] for k in space}}

    def score_trial_fold(self, v: Variant, trial: optuna.Trial, params: dict, k: int,
                         report_epoch: search.EpochReport) -> float:
        """Train fold k's student of variant v with the trial's parameters; its value is the search metric on fold
        k's inner-validation split (the scored fold is scored and saved, but no selection reads it)."""
        cfg = search.apply_params(v.cfg, params)
        out_dir = self.out.path / "trials" / v.name / str(trial.number) / f"fold_{k}"
        if out_dir.exists():
            shutil.rmtree(out_dir)  # leftovers of a dead process that had this trial number: start clean
        try:
            fold = self.train_fold(cfg, k, out_dir, self.search_epochs(), f"{v.name} trial {trial.number} fold {k}",
                                   meta={"trial": trial.number, "params": params}, report_epoch=report_epoch)
        finally:  # trial checkpoints are never reused (pruned or not): keep history + metrics
            for name in (checkpoint.BEST, checkpoint.LAST):
                checkpoint.remove_checkpoint(out_dir / name)
        value = search.metric_value(fold.inner, cfg.search.metric)
        engine.log(f"{v.name} trial {trial.number} fold {k}: inner-val {cfg.search.metric} {value:.3f}")
        return value

    def study_name(self, v: Variant) -> str:
        return f"{self.cfg.search.study}/{v.name}"

    def search_dir(self, v: Variant) -> Path:
        """<study dir>/search/<variant>/: trials.csv, best_params.yaml, plots/."""
        return self.out.path / "search" / v.name

    def run_search(self, v: Variant) -> optuna.Study:
        """Variant v's own study `<study>/<variant>` in the shared storage: the same n_trials, search folds, epochs
        and pruner for every variant (equal budgets), over the keys that act on it."""
        scfg = replace(v.cfg.search, study=self.study_name(v))
        url = search.storage_url(scfg.storage, scfg.study, Path(self.cfg.teacher_run) / "distill")
        study = search.open_study(scfg, url, fingerprint=self.fingerprint(v.cfg, v.space))
        folds = self.search_folds()
        done = search.count_finished(study)
        todo = max(0, scfg.n_trials - done)
        engine.log(f"search {v.name}: study '{scfg.study}' at {search.redact(url)} holds {done} finished trial(s); "
                   f"target {scfg.n_trials} → {todo} to run, each {len(folds)} fold(s) × ≤ {self.search_epochs()} "
                   f"epochs, over {', '.join(v.space)}")
        objective = search.make_objective(v.space, folds, partial(self.score_trial_fold, v), self.search_epochs(),
                                          report="per_fold" if scfg.pruner == "wilcoxon" else "running_mean")
        bar = tqdm(total=scfg.n_trials, initial=min(done, scfg.n_trials), desc=f"{v.name} trials",
                   disable=not engine.show_progress())

        def on_trial_end(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            bar.update(1)
            value = "—" if trial.value is None else f"{trial.value:.3f}"
            engine.log(f"{v.name} trial {trial.number}: {trial.state.name.lower()}  value {value}")

        def on_reaped(trial: optuna.trial.FrozenTrial) -> None:
            leftovers = self.out.path / "trials" / v.name / str(trial.number)
            shutil.rmtree(leftovers, ignore_errors=True)  # a dead worker's half-trained folds and checkpoints
            engine.log(f"{v.name} trial {trial.number}: its worker is gone; failed, {leftovers} removed")

        try:
            search.run_search(study, objective, scfg, catch=(engine.TrainingError,), callbacks=[on_trial_end],
                              on_reaped=on_reaped)
        finally:
            bar.close()
        search.write_outputs(study, self.search_dir(v), scfg.metric, url)
        return study

    def best_params(self, v: Variant, skip_search: bool) -> dict:
        """Variant v's parameters: its study's best trial, or with skip_search its saved best_params.yaml (else
        the config's values)."""
        saved = self.search_dir(v) / "best_params.yaml"
        if not skip_search:
            best = search.best_params(self.run_search(v))
            if best is None:
                raise UserError(f"study '{self.study_name(v)}': no trial completed (see "
                                f"{self.search_dir(v) / 'trials.csv'}); raise --n-trials or fix the failing trials")
            engine.log(f"{v.name}: best trial {best['trial']}: inner-val {self.cfg.search.metric} "
                       f"{best['value']:.3f}  {best['params']}")
            return best["params"]
        if saved.exists():
            params = read_yaml(saved).get("params", {})
            engine.log(f"--skip-search: {v.name} parameters from {saved}: {params}")
            return params
        engine.log(f"--skip-search: no {saved}; {v.name} uses the config's values")
        return {}

    # -- final students ------------------------------------------------------------------------------------------------

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
        if stamp_path.exists() and stamp_changed(io.read_json(stamp_path), stamp, type(vcfg)):
            old = run.path.with_name(run.path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            run.path.rename(old)
            engine.log(f"{v.name}: parameters or teachers changed since it was trained (new best trial?); "
                       f"previous results moved to {old}, retraining")
        run.write_config(vcfg)
        run.write_env(v.cfg.train.seed, str(self.device), {
            "teacher_run": str(self.teacher.run.path), "manifest_sha256": self.manifest.sha256(),
            "precision": engine.resolve_precision(v.cfg.train.precision, self.device, v.cfg.train.amp)})
        io.write_json(stamp_path, stamp)
        io.write_csv(run.folds, self.folds)
        ks = range(self.data.folds)
        for k in tqdm(ks, desc=f"{v.name} folds", disable=not engine.show_progress()):
            if run.is_done(k):
                continue
            fold = self.train_fold(v.cfg, k, run.fold(k), v.cfg.train.epochs, f"{v.name} fold {k}")
            run.mark_done(k, {**{k2: fold.info[k2] for k2 in ("best_epoch", "epochs_run", "params")},
                              "threshold": fold.result["threshold"]}, keep_state=self.cfg.keep_state)
        if not run.summary.exists():
            aggregate(vcfg, self.manifest, run, self.device, self.images,
                      fix=f"python -m kd_fracture.distill --run {self.teacher.run.path} --study {self.cfg.search.study}")
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
    """Teacher caches → one search per variant (equal budgets) → each variant's final students on every fold with
    its own best parameters → the comparison report."""
    t0 = time.perf_counter()
    cfg = resolve_names(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    check_config(cfg)
    teacher = load_teacher_run(cfg.teacher_run)
    out = RunDir(study_dir(cfg))
    try:
        out.check_compatible(cfg)
    except UserError as e:
        raise UserError(str(e).replace("a new --out", "a new --study NAME")) from None
    with out.lock(shared=trials_only, hint="start extra search workers with --trials-only, which share a study"):
        return _run_distill(cfg, teacher, out, skip_search, trials_only, t0)


def _run_distill(cfg: DistillConfig, teacher: TeacherRun, out: RunDir, skip_search: bool, trials_only: bool,
                 t0: float) -> RunDir:
    device = engine.resolve_device(cfg.train.device)
    d = Distiller(cfg, teacher, out, device)
    search.check_pruner(cfg.search, len(d.search_folds()) * d.search_epochs())
    variants = variant_list(cfg)
    out.write_config(cfg)
    out.write_env(cfg.train.seed, str(device), {
        "teacher_run": str(teacher.run.path), "manifest_sha256": d.manifest.sha256(),
        "precision": engine.resolve_precision(cfg.train.precision, device, cfg.train.amp)})
    k_folds = teacher.cfg.data.folds
    engine.log(f"distill: teacher {teacher.cfg.model.name} × {k_folds} folds ({teacher.run.path}), "
               f"{teacher.cfg.data.img_size} px, {cfg.kd.views} cached views ({cfg.kd.teacher_cache}); variants "
               f"{', '.join(v.name for v in variants)}: each {cfg.search.n_trials} trials, then {k_folds} folds × "
               f"≤ {cfg.train.epochs} epochs → {out.path}")

    if cfg.kd.teacher_cache == "views":
        cached = [(out.path / "cache" / f"fold_{k}" / LOGITS_FILE).exists() for k in range(k_folds)]
        d.clock.plan(caches=cached.count(False))
    if not skip_search:
        d.clock.plan(epochs=len(variants) * cfg.search.n_trials * len(d.search_folds()) * d.search_epochs())
    if not trials_only:
        d.clock.plan(epochs=sum(not RunDir(out.path / "final" / v.name).is_done(k) for v in variants
                                for k in range(k_folds)) * cfg.train.epochs)
    params = {v.name: d.best_params(v, skip_search) for v in variants}
    if trials_only:
        engine.log(f"--trials-only: done in {time.perf_counter() - t0:.0f}s; trials in {out.path / 'search'}/")
        return out

    tuned = [dataclasses.replace(v, cfg=search.apply_params(v.cfg, params[v.name])) for v in variants]
    runs = [VariantRun(v.name, v.role, d.variant_config(v), d.train_variant(v)) for v in tuned]
    report(out, teacher, cfg, params, runs, d.search_folds(), time.perf_counter() - t0)
    return out
