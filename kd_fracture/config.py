"""Frozen dataclass configs, loaded from `studies/*.yaml` plus CLI overrides.

One place defines defaults (the dataclasses below); YAML files and command-line flags only override them. Unknown
keys and values of the wrong type are `ConfigError`s naming the file and key. The resolved config is written as
`config.yaml` into the run directory and is what every later command (distill, predict, aggregate) reads back.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from kd_fracture.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class PhantomConfig:
    """The synthetic MURA-layout phantom used when no `--data` is given (docs/design.md §2)."""

    patients: int = 400
    size: int = 64
    """Stored PNG side in pixels; images are resized to `data.img_size` on load anyway."""
    seed: int = 0
    holdout_frac: float = 0.25
    """Patients in valid/ (the holdout): 100 of 400, ≈ 140 studies, so the holdout κ's 95 % CI is about ±0.14 wide
    rather than ±0.2 with the generator's 15 % of 300; the CV pool keeps 300 patients."""
    cache_dir: str = ".kd_fracture_cache"


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None
    """MURA root (parent of MURA-v1.1/, or MURA-v1.1/ itself) or a folder-layout root; None → synthetic phantom."""
    name: str | None = None
    """Dataset name for data_manifests/<name>/; default: sanitised basename of the root."""
    img_size: int = 64
    folds: int = 5
    fold_seed: int = 0
    """random_state of StratifiedGroupKFold; recorded in the folds file name."""
    inner_val_frac: float = 0.2
    """Fraction of a fold's training patients held out for the epoch monitor, checkpoint choice and the decision
    threshold (≈ 60 studies per fold on the default phantom; at 0.1, ≈ 30 made the threshold a coin toss)."""
    regenerate_folds: bool = False
    verify_images: bool = False
    cache_images: bool = True
    """Decode and resize every image once into RAM (uint8, img_size²) so later epochs skip PNG decoding."""
    num_workers: int | str = "auto"
    """DataLoader worker processes, or auto: 0 on the CPU (the loop waits on its input ≈ 1 % of an epoch there,
    benchmarks/results.md figure 1), on CUDA one per core less one, at most 8, shared among `--jobs` processes."""
    aug_backend: str = "auto"
    """Where training images are augmented: albumentations (per image in the DataLoader, the CPU reference) | torch
    (batched on the training device, data.batch_aug: same transforms and ranges, resampled once) | auto (torch on
    CUDA, albumentations elsewhere). The views differ pixel by pixel, so the teacher-logit cache key includes it."""
    manifests_dir: str = "data_manifests"
    window_percentiles: tuple = (0.5, 99.5)
    """(low, high) percentiles of a 16-bit, 32-bit or float image's values that become 0 and 255 when it is read as
    uint8 (clipped outside); 0 ≤ low < high ≤ 100. 8-bit images and DICOM (its own VOI window) are not affected."""
    phantom: PhantomConfig = field(default_factory=PhantomConfig)


@dataclass(frozen=True)
class AugConfig:
    hflip: float = 0.5
    rotate_limit: float = 10.0
    rrc_scale_min: float = 0.8
    """RandomResizedCrop scale lower bound (upper is 1.0)."""
    brightness_contrast: float = 0.2


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet50"
    """Any timm model name, a registered student (hybrid_t|hybrid_s|hybrid_m) or timm:NAME."""
    num_classes: int = 1
    """1 = single logit with sigmoid/BCE; 2 = softmax/CE."""
    in_chans: int = 3
    """1 = grayscale as is; 3 = grayscale replicated (what ImageNet-pretrained weights expect)."""
    pretrained: str | None = None
    """Local weights file (safetensors/pth); never downloaded."""
    freeze: str = "none"
    """none | backbone (train only the classifier head) | bn (train every weight, BatchNorm layers frozen)."""
    drop_rate: float = 0.0
    overrides: dict = field(default_factory=dict)
    """Architecture overrides for registered students, e.g. {depth: 3, embed_dim: 192}."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    """Upper bound; early stopping on the inner-validation split usually ends sooner."""
    batch_size: int = 16
    """Small batches on the CPU default: ResNet-50 from scratch on ~700 images needs optimiser steps more than
    large batches; use 32–64 on a GPU (studies/teacher_resnet50_mura224.yaml)."""
    eval_batch_size: int = 128
    optimizer: str = "adamw"
    """adamw | adam | sgd (timm.optim.create_optimizer_v2)."""
    lr: float = 1e-3
    weight_decay: float = 0.05
    scheduler: str = "cosine"
    """cosine | step | none (timm.scheduler)."""
    schedule_per_step: bool = False
    """Update the learning rate after every optimiser step (timm `step_update`) instead of once per epoch. A short
    run (3–5 epochs) needs it: per-epoch warm-up then holds the lr at 10 % for a whole epoch, and cosine moves in
    coarse jumps."""
    warmup_epochs: int = 1
    min_lr: float = 1e-6
    step_epochs: int = 10
    """step scheduler: decay lr by 0.1 every this many epochs."""
    loss: str = "bce"
    """bce (one logit) | ce (two logits)."""
    pos_weight: float | str | None = None
    """BCE weight of positives: null = 1, a number, or auto = n_neg/n_pos of the fold's training images."""
    label_smoothing: float = 0.0
    mixup: float = 0.0
    """timm Mixup alpha; 0 disables."""
    cutmix: float = 0.0
    grad_clip: float | None = 5.0
    patience: int = 3
    """Epochs without inner-val improvement before stopping."""
    monitor: str = "study_kappa"
    """Inner-val metric for early stopping and checkpoint choice: study_kappa | study_auroc | image_auroc."""
    checkpoint: str = "best"
    """Weights a run keeps: best (the epoch with the best inner-val monitor) | last (the final epoch; the monitor is
    still logged). On a ~30-study inner split "best" is close to a coin toss between epochs (benchmarks/teacher_recipe.md)."""
    seed: int = 0
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda | cuda:N."""
    amp: bool = True
    """Mixed precision on CUDA: bf16 autocast where the GPU supports it, else fp16 with a gradient scaler."""
    precision: str = "auto"
    """auto | fp32 | bf16. On CPU, auto uses bf16 autocast when the CPU has native bf16 (avx512_bf16 or AMX) and
    fp32 elsewhere; bf16 forces it (emulated, slow, on CPUs without it). On CUDA, fp32 turns amp off; auto and bf16
    follow amp. The resolved precision is recorded in env.json and in the teacher-logit cache key."""
    channels_last: bool = True
    """channels_last (NHWC) memory format for model and inputs; faster on CUDA and on CPU (oneDNN)."""
    compile: str = "auto"
    """auto | on | off: torch.compile the training step. auto = on CUDA for fits of ≥ 10,000 optimiser steps
    (engine.COMPILE_MIN_STEPS: below that compiling costs more than it saves), never on the CPU (measured slower). A
    failure to compile falls back to eager with one line."""
    threads: int | None = None
    """torch CPU threads; null = torch's default."""
    state_interval_min: float = 10.0
    """Minutes between writes of the resumable state_last.pt (model + optimizer, ≈ 270 MB for ResNet-50): written
    at the end of an epoch once this long has passed since the last write (0 = every epoch). A killed run resumes
    from the last write; finished folds drop the file (keep_state)."""


@dataclass(frozen=True)
class EvalConfig:
    bootstrap: int = 1000
    """Holdout bootstrap resamples over patients (all studies of a drawn patient) for 95% CIs."""
    threshold: float = 0.5
    """Study-level cut (abnormal iff study prob ≥ threshold) for threshold_rule fixed, and the fallback of the other
    rules when the inner-validation split has one class only or fewer than 2 studies."""
    threshold_rule: str = "youden"
    """How each fold's cut is chosen on its inner-validation split (metrics.choose_threshold):
    fixed = `threshold`; youden = max sensitivity + specificity − 1 (Youden 1950); max_kappa = max study κ.
    The fold ensemble's holdout is scored at the mean of the fold cuts; every result also reports 0.5 (at_0.5)."""


@dataclass(frozen=True)
class PretrainConfig:
    """Domain pretraining on a disjoint phantom corpus (`python -m kd_fracture.pretrain`, kd_fracture/pretraining.py).

    The CPU analogue of the ImageNet weights every real fracture classifier starts from: the teacher architecture is
    trained once on `patients` phantom patients drawn with `phantom_seed` (a different seed = different patients
    from the CV pool and holdout) and cached; `cv` starts every fold from these weights when `model.pretrained` is
    `phantom` (or `auto` on the phantom). Recipe and figures: benchmarks/teacher_recipe.md."""

    patients: int = 2000
    phantom_seed: int = 1000
    """Must differ from data.phantom.seed: the corpus must not share patients with the data it is evaluated on."""
    holdout_frac: float = 0.05
    """The corpus's own valid/ split: logged each epoch to show the pretraining learns; no decision uses it."""
    aug: AugConfig = field(default_factory=lambda: AugConfig(rotate_limit=0.0, rrc_scale_min=1.0,
                                                             brightness_contrast=0.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=4, batch_size=64, lr=1e-3, weight_decay=0.05, warmup_epochs=1, schedule_per_step=True,
        pos_weight=None, monitor="study_auroc", patience=1000, checkpoint="last", grad_clip=None))
    """Plain recipe (AdamW, warm-up + per-step cosine, horizontal flips only, last epoch kept): on 6,600 images a
    from-scratch ResNet-50 learns the phantom with it (benchmarks/teacher_recipe.md)."""


@dataclass(frozen=True)
class TrackConfig:
    """Experiment tracking (issue #26); output only, so changing it never conflicts with a finished run."""

    tensorboard: bool = True
    """One TensorBoard event stream per fold, trial and final student in its `tb/` (train.tracking): every epoch's
    losses, inner-val κ/AUROC, lr, images/s, data-wait share, memory; HParams at the end. Needs the tensorboard
    package; without it one warning line and training goes on."""


@dataclass(frozen=True)
class CVConfig:
    """`python -m kd_fracture.cv`: K-fold teacher cross-validation + holdout."""

    run_dir: str | None = None
    """null → runs/<dataset>/<model> (runs.rundir.default_run_dir): phantom and MURA runs never share a folder."""
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=lambda: AugConfig(rotate_limit=0.0, rrc_scale_min=1.0,
                                                             brightness_contrast=0.0))
    """Horizontal flips only, as in pretraining: crops and rotations can cut a small fracture sign out of a 64-px
    view and leave a positive label on a normal-looking image (benchmarks/teacher_recipe.md)."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(pretrained="auto"))
    """pretrained: auto = the phantom domain weights (`pretrain`) on the synthetic phantom, random init on other
    data; phantom = those weights on any data; none = random init; else a local weights file."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=2, batch_size=32, lr=1e-4, warmup_epochs=0, schedule_per_step=True, pos_weight=None,
        monitor="study_auroc", patience=3, checkpoint="last"))
    """Teacher defaults: fine-tuning from the start weights (phantom domain pretraining by default), sized for
    ≤ 15 min on 2 CPU cores. A low lr with per-step cosine keeps what pretraining learned; the last epoch is kept
    because a ~30-study inner split cannot tell the epochs apart; no pos_weight, since the decision threshold is
    chosen on the inner split instead (eval.threshold_rule). Figures: benchmarks/teacher_recipe.md."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    refit: bool = False
    """Also train one model on the whole CV pool and report it beside the fold-ensemble."""
    keep_state: bool = False
    """Keep state_last.pt (optimizer state) of DONE folds; by default a finished fold keeps only its weights."""
    sweep: dict = field(default_factory=dict)
    """Backbone sweep: {name: {overrides}} entries run on the same folds, then compared (see studies/backbone_sweep.yaml)."""
    track: TrackConfig = field(default_factory=TrackConfig)


@dataclass(frozen=True)
class KDConfig:
    temperature: float = 4.0
    alpha: float = 0.7
    """Weight of the soft (teacher) term; 0 = no-KD baseline."""
    views: int = 2
    """Augmented views per training image whose teacher logits are cached and replayed (+ the clean view)."""
    teacher_cache: str = "views"
    """views (cached, replayed) | none (teacher runs online every step)."""


@dataclass(frozen=True)
class StudentPretrainConfig:
    """Student domain pretraining on the teacher's phantom corpus (kd_fracture/pretraining.py), built once per
    student architecture and cached, when `student.pretrained` is phantom (or auto and the teacher run started from
    phantom weights). Two starts, so KD vs no-KD stays a one-variable comparison:
    KD students: Hinton KD from the phantom-pretrained teacher on the corpus (general distillation, as in
    DistilBERT, Sanh et al. 2019), then fold-matched KD per fold; no-KD students (α = 0): the same corpus and recipe
    with hard labels only, then hard labels per fold. No teacher and no CV-pool image is involved in the no-KD start."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=4, batch_size=64, lr=2e-3, weight_decay=0.05, warmup_epochs=1, schedule_per_step=True,
        pos_weight=None, monitor="study_auroc", patience=1000, checkpoint="last"))
    temperature: float = 4.0
    alpha: float = 0.7
    """Weight of the soft term in the KD start (the no-KD start uses 0)."""


DEFAULT_SEARCH_SPACE: dict = {
    "kd.temperature": {"type": "float", "low": 1.0, "high": 10.0, "log": True},
    "kd.alpha": {"type": "float", "low": 0.0, "high": 1.0},
    "train.lr": {"type": "float", "low": 1.0e-4, "high": 2.0e-3, "log": True},
    "train.weight_decay": {"type": "float", "low": 1.0e-3, "high": 1.0e-1, "log": True},
}
"""The distillation search space of studies/distill_hybrid.yaml (kept equal to it by tests/test_config.py)."""


@dataclass(frozen=True)
class SearchConfig:
    study: str | None = None
    """null → <dataset>-<teacher model>-<student> of the teacher run (pipelines.distill.default_study)."""
    storage: str | None = None
    """null → sqlite:///<teacher_run>/distill/<study>.db; postgresql://…, mysql://…, journal:PATH."""
    n_trials: int = 6
    """Target number of finished (complete + pruned) trials per variant's study; a rerun or another worker adds only
    the missing ones, so raise it to search further. Every variant gets the same number (equal budgets)."""
    timeout: float | None = None
    """Seconds for the search (Optuna's timeout)."""
    sampler_seed: int = 0
    worker: int = 0
    """Index of this search process among the workers sharing the study (distill --worker N): its TPE sampler is
    reseeded per trial from (sampler_seed, worker, k-th proposal) (search.SeededTPE)."""
    pruner: str = "median"
    """median | wilcoxon | none."""
    metric: str = "study_auroc"
    """Objective: mean over the search folds of this metric on each fold's inner-validation split (study_kappa |
    study_auroc | image_auroc) — never the scored fold, which reports the final students. AUROC needs no cut, so
    ~30 inner-val studies rank settings with less noise than κ."""
    n_startup_trials: int = 2
    """Trials completed before the median pruner prunes, and random trials before TPE models the results."""
    folds: int | None = 2
    """Folds used inside the search (the first N; null = all); final students always train on every fold."""
    epochs: int | None = 3
    """Epochs per fold inside the search (null = train.epochs); short trials rank settings, final students train
    the full train.epochs."""
    heartbeat_interval: int = 60
    """PostgreSQL/MySQL storages: seconds between a running trial's heartbeats (SQLite/Journal use trial leases)."""
    grace_period: int | None = None
    """Seconds without a heartbeat after which a trial counts as dead and is retried (null = 2 × heartbeat)."""
    max_retry: int = 1
    """How often a dead trial (worker gone: lease free or heartbeat stale) is re-enqueued with the same parameters."""
    space: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_SEARCH_SPACE))
    """Parameter → {type: float|int|categorical, low, high, log, step, choices}; keys are kd.* / train.* /
    student.* paths (student.overrides.NAME for HybridConfig fields)."""


@dataclass(frozen=True)
class DistillConfig:
    """`python -m kd_fracture.distill`: KD into the hybrid student with an Optuna search."""

    teacher_run: str = "runs/phantom/resnet50"
    """The teacher cv run (cv's default run directory on the phantom); the study lives in <teacher_run>/distill/."""
    student: ModelConfig = field(default_factory=lambda: ModelConfig(name="hybrid_s", in_chans=1, drop_rate=0.1,
                                                                     pretrained="auto"))
    """pretrained: auto = phantom student pretraining (`pretrain` below) when the teacher run started from phantom
    weights, random init otherwise; phantom; none. The architecture is fixed by the pretrained weights."""
    kd: KDConfig = field(default_factory=KDConfig)
    pretrain: StudentPretrainConfig = field(default_factory=StudentPretrainConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=4, batch_size=32, lr=5e-4, warmup_epochs=0, schedule_per_step=True, pos_weight=None, patience=3,
        monitor="study_auroc", checkpoint="last"))
    """Final students: fine-tuning from the pretrained start per fold, as the teacher does (low lr, per-step cosine,
    last epoch kept, threshold chosen on the inner split), sized so the default run fits in 20 minutes on 2 CPU cores."""
    search: SearchConfig = field(default_factory=SearchConfig)
    variants: tuple = ("kd", "no_kd")
    """Rows of the comparison, each with its own search of the same budget (study `<study>/<variant>`): kd = the
    student with KD; no_kd = the same student with α = 0 (hard-label start, hard labels per fold; kd.* not
    searched); timm:NAME = a timm model with KD (its own phantom KD start when the student is pretrained; not in the
    20-minute default)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    latency_threads: int = 1
    """torch CPU threads while timing batch-1 latency (fixed, so rows are comparable across machines' loads)."""
    keep_state: bool = False
    """Keep state_last.pt (optimizer state) of the final students' DONE folds."""
    onnx: bool = True
    """Export the first variant's fold-0 model to student.onnx and its fold ensemble to student_ensemble.onnx
    (each checked against torch when onnxruntime is installed)."""
    track: TrackConfig = field(default_factory=TrackConfig)


# ----------------------------------------------------------------------------------------------------------------------
# loading


def from_dict(cls: type[T], raw: Mapping[str, Any] | None, source: str = "config", prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) mapping; unknown keys and wrong types raise ConfigError."""
    raw = dict(raw or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        where = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{source}: unknown key '{where}' (known: {', '.join(prefix + k for k in known)})")
    hints = typing.get_type_hints(cls)
    for name, value in raw.items():
        # a partial section ({"student": {"name": "hybrid_t"}}) overrides the field's own default instance (e.g.
        # DistillConfig.student has in_chans=1), not the bare section class's defaults
        default = _default_instance(known[name])
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            raw[name] = _on_defaults(default, value)
    kwargs = {name: _coerce(hints[name], value, source, prefix + name) for name, value in raw.items()}
    return cls(**kwargs)


def _default_instance(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _on_defaults(default: Any, value: Mapping) -> dict:
    """`value` over the dataclass instance `default`: nested sections merge, plain fields (dicts such as
    search.space included) are replaced as a whole."""
    out: dict = {f.name: getattr(default, f.name) for f in fields(default)}
    for k, v in value.items():
        current = out.get(k)
        out[k] = _on_defaults(current, v) if dataclasses.is_dataclass(current) and isinstance(v, Mapping) else v
    return out


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, source, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else ConfigError(f"{source}: '{key}' has invalid value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        try:
            # YAML 1.1 reads "1e-3" as a string; accept it. int("3.5") must fail, not truncate.
            number = float(value) if tp is float else int(str(value), 10) if isinstance(value, str) else value
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: '{key}' must be {'a number' if tp is float else 'an integer'}, got {value!r}") from None
        if tp is int and (not isinstance(number, int) or isinstance(number, bool)):
            if isinstance(number, float) and number.is_integer():
                return int(number)
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off (and yes/no, true/false) as booleans: `compile: on`
            return "on" if value else "off"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
    if tp is tuple or origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return raw


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[leaf] = value


def merge(base: dict, update: Mapping) -> dict:
    """Recursive dict merge; `update` wins. Mappings under `space`/`sweep`/`overrides` merge too."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> T:
    """Defaults ← YAML file ← dotted overrides (`{"train.epochs": 3}`)."""
    raw = read_yaml(path) if path else {}
    from_dict(cls, raw, str(path) if path else "defaults")  # errors in the file name the file
    tree: dict = {}
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    # the file alone is valid, so any error from here on comes from the overrides
    return from_dict(cls, merge(raw, tree), "command line")


def to_dict(cfg: Any) -> dict:
    """Plain-YAML-safe dict of a config (tuples → lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


NOT_IN_RECIPES = frozenset({"state_interval_min", "keep_state", "precision", "compile"})
"""Fields left out of every hash of "what the weights depend on", so a cache built before such a field existed stays
valid: those that never change a result (how often state is saved, whether it is kept), train.compile (the same
computation, fused: it changes results at float rounding only, as another GPU or CPU kernel would), and
train.precision, whose *resolved* value enters the hashes instead, and only when it is not fp32
(`engine.precision_recipe`): "auto" on a CPU without bf16 trains exactly what the package trained before the field
existed."""


def recipe_dict(cfg: Any) -> dict:
    """`to_dict(cfg)` without NOT_IN_RECIPES at any depth: the part of a config that results depend on, for keys
    and fingerprints (phantom-pretrained weights, Optuna study fingerprint)."""

    def strip(v: Any) -> Any:
        return {k: strip(x) for k, x in v.items() if k not in NOT_IN_RECIPES} if isinstance(v, dict) else v

    return strip(to_dict(cfg))


def replace(cfg: T, **dotted: Any) -> T:
    """`replace(cfg, **{"train.epochs": 2})` → new frozen config with validated values."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        set_dotted(tree, key, value)
    return from_dict(type(cfg), tree, "override")


# ----------------------------------------------------------------------------------------------------------------------
# command line


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set train.lr=3e-4 --set data.folds=3` → {"train.lr": 3e-4, ...} with YAML scalar parsing."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="study config (e.g. studies/teacher_resnet50.yaml)")
    parser.add_argument("--set", dest="set_", action="append", metavar="KEY=VALUE",
                        help="override any config key, e.g. --set train.lr=3e-4 (repeatable)")


def overrides_from_args(args: argparse.Namespace, flag_to_key: Mapping[str, str]) -> dict[str, Any]:
    """Map explicitly given CLI flags (not None) to dotted config keys, then apply --set."""
    out = {key: getattr(args, flag) for flag, key in flag_to_key.items() if getattr(args, flag, None) is not None}
    out.update(parse_set(getattr(args, "set_", None)))
    return out
