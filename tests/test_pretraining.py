"""Domain pretraining: a disjoint corpus, weights cached by recipe, cv starting from them."""
from __future__ import annotations

import hashlib

import pytest
import torch

from kd_fracture.pipelines import pretraining
from kd_fracture.config import CVConfig, replace
from kd_fracture.data.manifest import load_manifest
from kd_fracture.errors import ConfigError
from kd_fracture.runs.models import build_model
from kd_fracture.pipelines.cv import teacher_model


def tiny_cfg(tmp_path, **extra) -> CVConfig:
    """Default phantom config shrunk to seconds: 20-patient corpus, 1 epoch, resnet10t at 32 px."""
    overrides = {"data.phantom.cache_dir": str(tmp_path / "cache"), "data.phantom.patients": 30,
                 "data.phantom.size": 32, "data.img_size": 32, "model.name": "resnet10t",
                 "pretrain.patients": 20, "pretrain.holdout_frac": 0.2, "pretrain.train.epochs": 1,
                 "pretrain.train.batch_size": 16, "pretrain.train.warmup_epochs": 0, **extra}
    return replace(CVConfig(), **overrides)


def image_hashes(root) -> set[str]:
    manifest = load_manifest(root)
    return {hashlib.sha256((manifest.root / p).read_bytes()).hexdigest() for p in manifest.df["image_path"]}


def test_auto_means_phantom_only_on_the_synthetic_default(tmp_path):
    cfg = tiny_cfg(tmp_path)
    assert cfg.model.pretrained == "auto" and pretraining.uses_phantom_weights(cfg)
    assert not pretraining.uses_phantom_weights(replace(cfg, **{"data.root": str(tmp_path)}))
    assert pretraining.uses_phantom_weights(replace(cfg, **{"data.root": str(tmp_path), "model.pretrained": "phantom"}))
    assert pretraining.weights_file(replace(cfg, **{"model.pretrained": "none"})) is None


def test_corpus_seed_equal_to_the_data_seed_is_refused(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"pretrain.phantom_seed": 0})
    with pytest.raises(ConfigError, match="phantom_seed"):
        pretraining.ensure_phantom_weights(cfg)


def test_weights_are_built_once_cached_by_recipe_and_start_every_fold(tmp_path):
    cfg = tiny_cfg(tmp_path)
    path = pretraining.ensure_phantom_weights(cfg)
    info = pretraining.describe(path)
    assert info["recipe"]["pretrain"]["phantom_seed"] == cfg.pretrain.phantom_seed
    assert 0.0 <= info["corpus_val_study_auroc"] <= 1.0
    mtime = path.stat().st_mtime_ns
    assert pretraining.ensure_phantom_weights(cfg) == path and path.stat().st_mtime_ns == mtime  # reused

    # a different recipe is a different file, never the stale one
    assert pretraining.weights_path(replace(cfg, **{"pretrain.train.epochs": 2})) != path

    # the corpus shares no patient (and so no image) with the evaluated phantom's CV pool or holdout
    from kd_fracture.data.loaders import resolve_manifest

    evaluated = resolve_manifest(cfg.data).root
    assert not image_hashes(pretraining.corpus_root(cfg)) & image_hashes(evaluated)

    # cv's fold models start from exactly these weights, head included
    from safetensors.torch import load_file

    saved = load_file(str(path))
    model = teacher_model(cfg)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    # ...and a fold model rebuilt to load its own checkpoint needs no pretraining
    assert not torch.equal(build_model(cfg.model, cfg.data.img_size).state_dict()["fc.weight"], saved["fc.weight"])


def test_damaged_weights_are_rebuilt(tmp_path):
    cfg = tiny_cfg(tmp_path)
    path = pretraining.ensure_phantom_weights(cfg)
    path.write_bytes(path.read_bytes()[:-10])
    pretraining.ensure_phantom_weights(cfg)
    pretraining.checkpoint.verify_sidecar(path)  # intact again


def test_fields_that_change_no_result_keep_the_weights_path(tmp_path):
    """How often state is saved, or whether it is kept, is no part of the recipe: adding such a field must not
    throw away weights that took minutes to build (it did once: state_interval_min changed the hash)."""
    from kd_fracture.config import DistillConfig

    cfg = tiny_cfg(tmp_path)
    for key in ("pretrain.train.state_interval_min", "train.state_interval_min"):
        assert pretraining.weights_path(replace(cfg, **{key: 0.5})) == pretraining.weights_path(cfg)
    assert pretraining.weights_path(replace(cfg, keep_state=True)) == pretraining.weights_path(cfg)
    d = DistillConfig()
    for kd in (True, False):
        assert (pretraining.student_weights_path(replace(d, **{"pretrain.train.state_interval_min": 0.5}), cfg, kd)
                == pretraining.student_weights_path(d, cfg, kd))
