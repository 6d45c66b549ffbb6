"""Configs: frozen dataclasses from YAML + overrides; unknown keys and bad types are errors; every study loads."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from kd_fracture.config import (CVConfig, DistillConfig, load_config, parse_set, read_yaml, replace, to_dict)
from kd_fracture.errors import ConfigError, UserError

STUDIES = sorted((Path(__file__).parents[1] / "studies").glob("*.yaml"))


def config_class(raw: dict):
    return DistillConfig if "teacher_run" in raw or "kd" in raw or "search" in raw else CVConfig


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_every_study_yaml_loads(path):
    raw = read_yaml(path)
    cfg = load_config(config_class(raw), path)
    assert dataclasses.is_dataclass(cfg)


def test_studies_exist():
    names = {p.name for p in STUDIES}
    assert {"teacher_resnet50.yaml", "teacher_resnet50_mura224.yaml", "distill_hybrid.yaml"} <= names


def test_default_study_equals_dataclass_defaults():
    """`python -m kd_fracture.cv` with no --config must be the run documented in studies/teacher_resnet50.yaml."""
    path = Path(__file__).parents[1] / "studies" / "teacher_resnet50.yaml"
    assert to_dict(load_config(CVConfig, path)) == to_dict(CVConfig())
    path = Path(__file__).parents[1] / "studies" / "distill_hybrid.yaml"
    from_file, default = to_dict(load_config(DistillConfig, path)), to_dict(DistillConfig())
    from_file["search"].pop("space"), default["search"].pop("space")
    assert from_file == default


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochs: 2\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.learning_rate'"):
        load_config(CVConfig, p)


def test_unknown_override_is_error():
    with pytest.raises(ConfigError, match="command line: unknown key 'train.epoch'"):
        load_config(CVConfig, None, {"train.epoch": 3})


def test_types_are_checked_and_coerced(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-3\n  epochs: 4\ndata:\n  root: null\n")  # YAML 1.1 reads 1e-3 as a string
    cfg = load_config(CVConfig, p, {"data.folds": "3"})
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.epochs == 4 and cfg.data.folds == 3
    with pytest.raises(ConfigError, match="'train.epochs' must be an integer"):
        load_config(CVConfig, None, {"train.epochs": "3.5"})
    with pytest.raises(ConfigError, match="'refit' must be true or false"):
        load_config(CVConfig, None, {"refit": "maybe"})


def test_frozen_and_replace():
    cfg = CVConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run_dir = "x"
    new = replace(cfg, **{"train.epochs": 7, "model.name": "resnet18"})
    assert new.train.epochs == 7 and new.model.name == "resnet18"
    assert cfg.train.epochs != 7
    assert cfg.model.name == "resnet50"


def test_parse_set():
    assert parse_set(["train.lr=3e-4", "data.root=/x", "refit=true"]) == {
        "train.lr": "3e-4", "data.root": "/x", "refit": True}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["train.lr"])


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config(CVConfig, p)


def test_key_missing_from_an_older_run_config_is_compatible_at_its_default(tmp_path):
    """A run made before a key existed (e.g. eval.threshold_rule) resumes at that key's default, not at another."""
    from kd_fracture.runs.rundir import RunDir

    run = RunDir(tmp_path / "run")
    cfg = load_config(CVConfig, None, {"run_dir": str(run.path)})
    run.write_config(cfg)
    raw = read_yaml(run.config)
    del raw["eval"]["threshold_rule"]
    run.config.write_text(yaml.safe_dump(raw))
    run.check_compatible(cfg)  # default youden: no conflict
    with pytest.raises(UserError, match="eval.threshold_rule=None, now 'max_kappa'"):
        run.check_compatible(replace(cfg, **{"eval.threshold_rule": "max_kappa"}))


def test_threshold_rule_is_checked_before_training(tmp_path, capsys):
    from kd_fracture import cv

    assert cv.main(["--out", str(tmp_path / "run"), "--set", "eval.threshold_rule=f1"]) == 2
    assert "eval.threshold_rule 'f1' is not one of fixed, youden, max_kappa" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
