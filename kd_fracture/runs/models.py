"""A run's models: build an architecture, load a fold's checkpoint, predict with the fold ensemble, find a run's
teachers or distilled students (docs/design.md §4, nnU-Net style: one function locates a run's fold models).

Every command that reads a run — aggregation, distill, predict, evaluate, explain, compare — goes through
`load_run_models` (teachers or a student variant) or `load_teacher_run` (the finished teacher run distill needs).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from kd_fracture import io
from kd_fracture.config import CVConfig, ModelConfig, from_dict, read_yaml, replace
from kd_fracture.data.loaders import SharedCache, build_loader
from kd_fracture.data.imageio import set_window_percentiles
from kd_fracture.data.manifest import Manifest
from kd_fracture.errors import UserError
from kd_fracture.models import apply_freeze, create_model
from kd_fracture.models.serve import for_inference
from kd_fracture.models.student import TIMM_PREFIX
from kd_fracture.runs import scoring
from kd_fracture.runs.rundir import DEFAULT_RUNS_DIR, RunDir, require_done
from kd_fracture.train import checkpoint, engine

ROLES = ("teacher", "student")
VARIANT_KINDS = ("kd", "no_kd")


def build_model(m: ModelConfig, img_size: int, *, start: str | Path | None = None, file: str | None = None,
                freeze: str | None = None) -> nn.Module:
    """`m`'s architecture for `img_size`, frozen per `freeze` (default m.freeze).

    start: weights this package wrote for this very architecture (phantom pretraining, a run's checkpoint): loaded
    whole, head included, checked against their sidecar, then frozen. file: a local file such as ImageNet weights,
    which timm adapts (input conv, fresh head). Neither: random init."""
    freeze = m.freeze if freeze is None else freeze
    model = create_model(m.name, num_classes=m.num_classes, in_chans=m.in_chans, img_size=img_size,
                         pretrained=None if start is not None else file, freeze="none" if start is not None else freeze,
                         drop_rate=m.drop_rate, **m.overrides)
    if start is not None:
        checkpoint.load_weights(model, Path(start))
        model = apply_freeze(model, freeze)
    return model


def load_fold_model(cfg: CVConfig, run: RunDir, k: int | str) -> nn.Module:
    """Fold k's model of a run: the architecture of cfg.model with `fold_<k>/checkpoint_best.safetensors` loaded
    (the checkpoint holds every weight, so no start-weights file is needed to reload)."""
    return checkpoint.load_weights(build_model(cfg.model, cfg.data.img_size), run.fold(k) / checkpoint.BEST)


def ensemble_predict(cfg: CVConfig, run: RunDir, rows: pd.DataFrame, manifest: Manifest, device: torch.device,
                     cache: SharedCache | None = None, members: list[int | str] | None = None,
                     load: Callable[[int | str], nn.Module] | None = None) -> pd.DataFrame:
    """Mean of the fold models' probabilities for `rows`; one prob_fold<k> column per member, then `prob`.

    `load(member)` gives a member's model (default: `load_fold_model` from its checkpoint; the app passes models it
    keeps loaded)."""
    members = list(range(cfg.data.folds)) if members is None else members
    load = load or (lambda k: load_fold_model(cfg, run, k))
    loader = build_loader(rows, manifest, cfg.data, cfg.aug, train=False, in_chans=cfg.model.in_chans,
                          batch_size=cfg.train.eval_batch_size, seed=cfg.train.seed, cache=cache, device=device)
    pred = rows.reset_index(drop=True).copy()
    for k in members:
        model = load(k).to(device)
        pred[f"prob_fold{k}"] = engine.predict_probs(model, loader, device, cfg.train.amp, desc=f"holdout fold {k}",
                                                   precision=cfg.train.precision)
    pred["prob"] = pred[[f"prob_fold{k}" for k in members]].mean(axis=1)
    return pred


def variant_name(student: str, kind: str) -> str:
    """Folder of a distilled variant under `distill/<study>/final/`: `<student>_kd`, `<student>_no_kd`, where a
    timm student drops its `timm:` prefix (`timm:mobilevit_xxs` → `mobilevit_xxs_kd`)."""
    if kind not in VARIANT_KINDS:
        raise ValueError(f"variant kind {kind!r} is not one of {VARIANT_KINDS}")
    return f"{student.removeprefix(TIMM_PREFIX)}_{kind}"


# ----------------------------------------------------------------------------------------------------------------------
# the teacher run distill starts from


@dataclass
class TeacherRun:
    """A finished teacher cv run: its config and its K fold checkpoints."""

    run: RunDir
    cfg: CVConfig
    _sha256: dict = field(default_factory=dict, repr=False)

    def checkpoint(self, k: int) -> Path:
        return self.run.fold(k) / checkpoint.BEST

    def load(self, k: int) -> nn.Module:
        return load_fold_model(self.cfg, self.run, k)

    def checkpoint_sha256(self, k: int) -> str:
        """sha256 of fold k's checkpoint, verified against its sidecar once per process."""
        if k not in self._sha256:
            checkpoint.verify_sidecar(self.checkpoint(k))
            self._sha256[k] = io.read_json(checkpoint.sidecar(self.checkpoint(k)))["sha256"]
        return self._sha256[k]


def load_teacher_run(path: str | Path) -> TeacherRun:
    """The finished teacher run at `path`, or a UserError saying which command makes it."""
    run = RunDir(path)
    cfg = run.saved_config(CVConfig)
    if cfg is None:
        raise UserError(f"{path}: no teacher run here (no config.yaml); train the teachers first: "
                        f"{cv_command(path)}")
    require_done(run, range(cfg.data.folds), "teacher fold(s)", cv_command(path))
    if not (run.holdout / "metrics.json").exists():
        raise UserError(f"{path}: the teacher run has no holdout results; run: {cv_command(path)} --aggregate")
    return TeacherRun(run, cfg)


def cv_command(path: str | Path) -> str:
    """The command that makes (or resumes) the teacher run at `path`: the quick start's for the default folder."""
    default = Path(DEFAULT_RUNS_DIR) / "phantom" / CVConfig().model.name
    return ("python -m kd_fracture.cv --folds 5" if Path(path) == default
            else f"python -m kd_fracture.cv --out {path}")


# ----------------------------------------------------------------------------------------------------------------------
# any run's fold models: teachers or a distilled student


@dataclass(frozen=True)
class RunModels:
    """The fold models of one run — its cv teachers or a distilled student — and the config that feeds them.

    `cfg` is the teacher run's config with `model` replaced by the members' architecture, so `load_fold_model` and
    `ensemble_predict` serve both roles: data.img_size and the eval transform always come from the run.
    """

    cfg: CVConfig
    run: RunDir
    """`run.fold(k) / checkpoint_best.safetensors` are the members' weights."""
    members: tuple[int | str, ...]
    role: str
    description: str
    """For people: "teacher resnet50 (fold ensemble of 5)", "student hybrid_s (distill/s1/final/kd, fold 0)"."""
    threshold_source: str = "eval.threshold"
    """Where cfg.eval.threshold comes from, for people (`load_run_models` sets the run's recorded threshold)."""

    def load(self, member: int | str) -> nn.Module:
        """Member `member` in its served form (`models.for_inference`: eval mode, BatchNorm folded)."""
        try:
            return for_inference(load_fold_model(self.cfg, self.run, member), name=f"{self.description} [{member}]")
        except RuntimeError as e:  # load_state_dict: architecture and checkpoint disagree
            detail = " ".join(str(e).split())[:200]
            raise checkpoint.CheckpointError(f"{self.run.fold(member) / checkpoint.BEST}: does not fit model "
                                             f"'{self.cfg.model.name}' ({detail})") from None

    def predict(self, rows: pd.DataFrame, manifest: Manifest, device: torch.device,
                cache: SharedCache | None = None) -> pd.DataFrame:
        """`rows` + one prob_fold<k> column per member + `prob` (their mean), in row order."""
        return ensemble_predict(self.cfg, self.run, rows, manifest, device, cache, list(self.members), self.load)


def run_models(cfg: CVConfig, run: RunDir, role: str) -> RunModels:
    """All K fold models of a run whose config is `cfg` (a teacher run, or a distilled variant's folder)."""
    members = tuple(range(cfg.data.folds))
    return RunModels(cfg=cfg, run=run, members=members, role=role,
                     description=f"{role} {cfg.model.name} (fold ensemble of {len(members)})")


def load_run_config(run_path: str | Path) -> tuple[RunDir, CVConfig]:
    run = RunDir(run_path)
    if not run.path.is_dir():
        raise UserError(f"--run {run.path}: folder not found; give the --out of a `python -m kd_fracture.cv` run")
    if not run.config.is_file():
        raise UserError(f"--run {run.path}: not a run directory (no config.yaml); give the --out of a "
                        f"`python -m kd_fracture.cv` run")
    cfg = run.saved_config(CVConfig)
    if cfg.sweep:
        entries = ", ".join(str(run.path / name) for name in cfg.sweep)
        raise UserError(f"--run {run.path}: is a sweep of several runs; pick one of them: {entries}")
    set_window_percentiles(cfg.data.window_percentiles)  # its images are decoded as in training
    return run, cfg


def load_run_models(run_path: str | Path, model: str = "teacher", fold: int | str | None = None,
                    study: str | None = None, variant: str | None = None) -> RunModels:
    """The run's teachers (`model="teacher"`) or a distilled student, all folds or only `fold`."""
    if model not in ROLES:
        raise UserError(f"--model {model}: choose one of {', '.join(ROLES)}")
    run, cfg = load_run_config(run_path)
    if model == "teacher":
        where, model_cfg, what = run, cfg.model, f"teacher {cfg.model.name}"
    else:
        where, model_cfg, what = student_location(run, study, variant)
    members = [fold] if fold is not None else list(range(cfg.data.folds))
    missing = [k for k in members if not (where.fold(k) / checkpoint.BEST).is_file()]
    if missing:
        have = sorted(p.parent.name for p in where.path.glob(f"*/{checkpoint.BEST}"))
        hint = "finish training them, or pick one with --fold K" if fold is None else "choose another --fold"
        raise UserError(f"{where.path}: no {checkpoint.BEST} for fold(s) {missing} (found: {', '.join(have) or 'none'})"
                        f"; {hint}")
    scope = f"fold {fold}" if fold is not None else f"fold ensemble of {len(members)}"
    threshold, source = scoring.run_threshold(where.path, members, cfg.data.folds), "eval.threshold"
    if threshold is not None:
        cfg = replace(cfg, **{"eval.threshold": threshold})
        one = len(members) == 1 and members[0] != "refit"
        source = f"fold {members[0]}'s threshold" if one else "mean of the fold thresholds"
    return RunModels(cfg=dataclasses.replace(cfg, model=model_cfg), run=where, members=tuple(members), role=model,
                     description=f"{what} ({scope})", threshold_source=source)


def student_location(run: RunDir, study: str | None, variant: str | None) -> tuple[RunDir, ModelConfig, str]:
    """`<run>/distill/<study>/final/<variant>/` as a RunDir, the student's ModelConfig and a description.

    Each variant folder is shaped like a teacher run (docs/design.md §4): its `config.yaml` is a CVConfig whose
    `model` is the student. Without one, `student:` of the study's `config.yaml` (DistillConfig) is used. The
    default variant is the KD student, `variant_name(student, "kd")`, or the only variant there is.
    """
    distill = run.path / "distill"
    studies = sorted(p.parent.name for p in distill.glob("*/config.yaml"))
    if not studies:
        raise UserError(f"{distill}: no distilled student yet; run `python -m kd_fracture.distill --run "
                        f"{run.path}` first, or use --model teacher")
    if study is None:
        if len(studies) > 1:
            raise UserError(f"{distill}: several distillation studies ({', '.join(studies)}); choose one with --study")
        study = studies[0]
    elif study not in studies:
        raise UserError(f"--study {study}: not in {distill} (found: {', '.join(studies)})")
    study_raw = read_yaml(distill / study / "config.yaml")
    final = distill / study / "final"
    variants = sorted(p.name for p in final.iterdir()
                      if p.is_dir() and not p.name.endswith(".old")) if final.is_dir() else []
    if not variants:
        raise UserError(f"{final}: no final students yet; let `python -m kd_fracture.distill --run {run.path} "
                        f"--study {study}` finish")
    if variant is None:
        main = variant_name(str((study_raw.get("student") or {}).get("name", "")), "kd")
        if main not in variants and len(variants) > 1:
            raise UserError(f"{final}: several students ({', '.join(variants)}); choose one with --variant")
        variant = main if main in variants else variants[0]
    elif variant not in variants:
        raise UserError(f"--variant {variant}: not in {final} (found: {', '.join(variants)})")
    variant_config = final / variant / "config.yaml"
    if variant_config.is_file():
        source, raw, prefix = variant_config, read_yaml(variant_config).get("model"), "model."
    else:
        source, raw, prefix = distill / study / "config.yaml", study_raw.get("student"), "student."
    if not isinstance(raw, dict):
        raise UserError(f"{source}: has no '{prefix.rstrip('.')}' section, so the student's architecture is unknown")
    model_cfg = from_dict(ModelConfig, raw, str(source), prefix=prefix)
    return RunDir(final / variant), model_cfg, f"student {model_cfg.name} (distill/{study}/final/{variant})"
