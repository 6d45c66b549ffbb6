"""Domain pretraining: the teacher architecture trained once on a disjoint phantom corpus, cached as safetensors.

Every real fracture classifier starts from pretrained weights (ImageNet, or a radiograph corpus); from random init a
ResNet-50 does not learn ~700 phantom images in the few hundred optimiser steps a CPU run has
(benchmarks/teacher_recipe.md). Nothing can be downloaded here, so the embedded default makes its own: the same
generator, a different seed (different patients, none shared with the CV pool or the holdout), more patients, one
plain recipe. `cv` then fine-tunes these weights per fold, exactly as it would fine-tune ImageNet weights.

    python -m kd_fracture.pretrain                       # build (or find) the weights for the default teacher config
    python -m kd_fracture.cv --folds 5                   # builds them first if missing, then reuses them

The weights are cached under `<cache_dir>/pretrained/<model>_phantom_<key>.safetensors` with a JSON sidecar
(size, sha256, generator version, corpus parameters, recipe, the corpus's own valid/ metrics). `key` hashes what the
weights depend on, so a changed recipe, image size or generator builds new weights instead of reusing stale ones.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from torch import nn

from kd_fracture import distributed, io
from kd_fracture.train import checkpoint, engine, tasks
from kd_fracture.config import CVConfig, DataConfig, DistillConfig, TrainConfig, recipe_dict, replace
from kd_fracture.data.loaders import backend_recipe, build_loader, holdout_rows
from kd_fracture.data.manifest import Manifest, load_manifest
from kd_fracture.data.phantom import GENERATOR_VERSION, generate_phantom, phantom_info
from kd_fracture.errors import ConfigError
from kd_fracture.runs.models import build_model as build
from kd_fracture.train.teacher_cache import OnlineTeacher

PHANTOM = "phantom"
AUTO = "auto"
NONE_VALUES = (None, "none", "null", "")


def uses_phantom_weights(cfg: CVConfig) -> bool:
    """`model.pretrained`: phantom → yes; auto → yes on the synthetic phantom (no data.root), no on real data."""
    value = cfg.model.pretrained
    return value == PHANTOM or (value == AUTO and cfg.data.root is None)


def weights_file(cfg: CVConfig) -> str | None:
    """The local weights file a fresh fold model starts from (None = random init); builds phantom weights if needed."""
    if uses_phantom_weights(cfg):
        return str(ensure_phantom_weights(cfg))
    return local_file(cfg.model.pretrained)


def local_file(value: str | None) -> str | None:
    """A `pretrained` value that names a local weights file, else None (none/null/auto, or phantom already handled)."""
    return None if value in NONE_VALUES or value in (AUTO, PHANTOM) else value


def recipe(cfg: CVConfig) -> dict:
    """Everything the weights depend on: the architecture, the input, the corpus and the training recipe."""
    m, p = cfg.model, cfg.pretrain
    return {"generator_version": GENERATOR_VERSION, "model": m.name, "num_classes": m.num_classes,
            "in_chans": m.in_chans, "drop_rate": m.drop_rate, "overrides": m.overrides,
            "img_size": cfg.data.img_size, "phantom_size": cfg.data.phantom.size, "pretrain": recipe_dict(p),
            "torch": torch.__version__.split("+")[0], **engine.precision_recipe(cfg.train),
            **backend_recipe(cfg.data, engine.resolve_device(cfg.train.device))}


def weights_path(cfg: CVConfig) -> Path:
    key = hashlib.sha256(json.dumps(recipe(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(cfg.data.phantom.cache_dir) / "pretrained" / f"{cfg.model.name}_phantom_{key}.safetensors"


def corpus_root(cfg: CVConfig) -> Path:
    p = cfg.pretrain
    return (Path(cfg.data.phantom.cache_dir)
            / f"pretrain_corpus_p{p.patients}_px{cfg.data.phantom.size}_s{p.phantom_seed}")


def check_disjoint(cfg: CVConfig) -> None:
    """The corpus's patients are drawn from SeedSequence([phantom_seed, i]); the same seed as the evaluated phantom
    would re-draw the CV pool's and holdout's patients."""
    if cfg.data.root is None and cfg.pretrain.phantom_seed == cfg.data.phantom.seed:
        raise ConfigError(f"pretrain.phantom_seed={cfg.pretrain.phantom_seed} equals data.phantom.seed: the "
                          "pretraining corpus would contain the CV pool's and holdout's patients; use another seed")


def ensure_phantom_weights(cfg: CVConfig) -> Path:
    """The cached phantom-pretrained weights for `cfg`'s teacher, built first when missing (rank 0 builds them; other
    ranks wait). Building: generate the corpus, train with `cfg.pretrain.train` through `engine.fit`, save atomically."""
    check_disjoint(cfg)
    path = weights_path(cfg)
    with distributed.main_first():
        if engine.is_main() and not _intact(path):
            build_phantom_weights(cfg, path)
    return path


def _intact(path: Path) -> bool:
    try:
        checkpoint.verify_sidecar(path)
        return True
    except checkpoint.CheckpointError as e:
        if path.exists() or path.with_name(path.name + ".json").exists():
            engine.log(f"warning: {e}; building the phantom-pretrained weights again")
        return False


def build_phantom_weights(cfg: CVConfig, path: Path) -> Path:
    p, m = cfg.pretrain, cfg.model
    engine.log(f"domain pretraining (one time, cached in {path.parent}/): {m.name} on a SYNTHETIC phantom "
               f"corpus of {p.patients} patients (seed {p.phantom_seed}, disjoint from the evaluated data), "
               f"{p.train.epochs} epochs")
    engine.seed_everything(p.train.seed)
    model = build(m, cfg.data.img_size, freeze="none")
    return train_on_corpus(cfg, model, lambda rows: tasks.SupervisedTask(loss=p.train.loss), p.train, m.in_chans,
                           path, recipe(cfg), "pretrain")


def ensure_corpus(cfg: CVConfig) -> Manifest:
    """The pretraining corpus's manifest, generated first when missing (or from another generator version)."""
    p = cfg.pretrain
    root = corpus_root(cfg)
    info = phantom_info(root)
    if info is None or info.get("generator_version") != GENERATOR_VERSION:
        if root.exists():
            shutil.rmtree(root)
        generate_phantom(root, patients=p.patients, size=cfg.data.phantom.size, seed=p.phantom_seed,
                         holdout_frac=p.holdout_frac)
    return load_manifest(root)


def train_on_corpus(cfg: CVConfig, model: nn.Module, make_task, train: TrainConfig, in_chans: int, path: Path,
                    key: dict, name: str) -> Path:
    """Train `model` on the corpus's train/ split with `make_task(train_rows)` through `engine.fit`, log its valid/
    split each epoch, keep the last epoch, save atomically to `path` with a sidecar describing what it is."""
    t0 = time.perf_counter()
    manifest = ensure_corpus(cfg)
    train_rows = manifest.df[manifest.df["split"] == "train"].reset_index(drop=True)
    val_rows = holdout_rows(manifest)
    data = DataConfig(img_size=cfg.data.img_size, num_workers=cfg.data.num_workers,
                      cache_images=cfg.data.cache_images, aug_backend=cfg.data.aug_backend)
    loader = lambda rows, is_train: build_loader(  # noqa: E731
        rows, manifest, data, cfg.pretrain.aug, train=is_train, in_chans=in_chans, seed=train.seed,
        batch_size=train.batch_size if is_train else train.eval_batch_size,
        device=engine.resolve_device(cfg.train.device))
    work = path.with_name(path.stem + ".work")  # state_last.pt here makes an interrupted build resume
    train = replace(train, device=cfg.train.device, threads=cfg.train.threads, amp=cfg.train.amp,
                    precision=cfg.train.precision)  # the run's precision, part of the recipe key
    fit = engine.fit(model, make_task(train_rows), loader(train_rows, True), loader(val_rows, False), val_rows, train,
                     work, name=f"{name}: ")
    last = fit.history.iloc[-1]
    meta = {"recipe": key, "corpus": str(corpus_root(cfg)), "n_train_images": len(train_rows),
            "n_val_images": len(val_rows), "corpus_val_study_auroc": float(last["val_study_auroc"]),
            "corpus_val_image_auroc": float(last["val_image_auroc"]), "seconds": round(time.perf_counter() - t0, 1)}
    checkpoint.save_weights(model, path, {"kd_fracture": name})
    checkpoint.write_sidecar(path, meta)
    shutil.rmtree(work, ignore_errors=True)
    engine.log(f"{name}: wrote {path} in {meta['seconds']:.0f}s (corpus valid/ study AUROC "
               f"{meta['corpus_val_study_auroc']:.3f})")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# students


def uses_phantom_student(dcfg: DistillConfig, teacher_cfg: CVConfig) -> bool:
    """`student.pretrained`: phantom → yes; auto → when the teacher run itself started from phantom weights."""
    value = dcfg.student.pretrained
    return value == PHANTOM or (value == AUTO and uses_phantom_weights(teacher_cfg))


def student_recipe(dcfg: DistillConfig, teacher_cfg: CVConfig, kd: bool) -> dict:
    s, p = dcfg.student, dcfg.pretrain
    return {"student": {"name": s.name, "num_classes": s.num_classes, "in_chans": s.in_chans,
                        "drop_rate": s.drop_rate, "overrides": s.overrides},
            "start": "kd" if kd else "hard_labels", "train": recipe_dict(p.train),
            **({"temperature": p.temperature, "alpha": p.alpha, "teacher": recipe(teacher_cfg)} if kd else {}),
            "corpus": recipe_dict(teacher_cfg.pretrain), "img_size": teacher_cfg.data.img_size,
            "generator_version": GENERATOR_VERSION, "torch": torch.__version__.split("+")[0],
            **engine.precision_recipe(teacher_cfg.train),
            **backend_recipe(teacher_cfg.data, engine.resolve_device(teacher_cfg.train.device))}


def student_weights_path(dcfg: DistillConfig, teacher_cfg: CVConfig, kd: bool) -> Path:
    key = hashlib.sha256(json.dumps(student_recipe(dcfg, teacher_cfg, kd), sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    name = dcfg.student.name.replace(":", "_")
    return (Path(teacher_cfg.data.phantom.cache_dir) / "pretrained"
            / f"{name}_phantom_{'kd' if kd else 'hard'}_{key}.safetensors")


def ensure_student_weights(dcfg: DistillConfig, teacher_cfg: CVConfig, kd: bool) -> Path:
    """The cached phantom start of `dcfg.student`: KD from the phantom-pretrained teacher (kd=True) or hard labels
    only (kd=False), on the teacher's pretraining corpus; built first when missing."""
    check_disjoint(teacher_cfg)
    path = student_weights_path(dcfg, teacher_cfg, kd)
    if _intact(path):
        return path
    s, p = dcfg.student, dcfg.pretrain
    engine.log(f"student pretraining (one time, cached in {path.parent}/): {s.name} on the phantom corpus, "
               + (f"KD from the phantom-pretrained {teacher_cfg.model.name} (T {p.temperature}, α {p.alpha})"
                  if kd else "hard labels only (the no-KD start)") + f", {p.train.epochs} epochs")
    teacher = None
    if kd:
        teacher = build(teacher_cfg.model, teacher_cfg.data.img_size, start=ensure_phantom_weights(teacher_cfg),
                        freeze="none")
        teacher = OnlineTeacher(teacher.to(engine.resolve_device(teacher_cfg.train.device)),
                                teacher_cfg.model.in_chans)
    engine.seed_everything(p.train.seed)
    model = build(s, teacher_cfg.data.img_size, freeze="none")
    make_task = ((lambda rows: tasks.DistillTask(teacher, p.temperature, p.alpha)) if kd
                 else (lambda rows: tasks.SupervisedTask(loss=p.train.loss)))
    return train_on_corpus(teacher_cfg, model, make_task, p.train, s.in_chans, path,
                           student_recipe(dcfg, teacher_cfg, kd), "student pretrain" + (" (KD)" if kd else ""))


def describe(path: Path) -> dict:
    """The sidecar of a cached weights file (what was trained, how, with which result)."""
    return io.read_json(path.with_name(path.name + ".json"))
