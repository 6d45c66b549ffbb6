"""Every command: one flag convention, real defaults in --help, --version, an entry point and a `python -m` alias."""
from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import pytest

import kd_fracture

COMMANDS = ["cv", "distill", "dashboard", "predict", "evaluate", "explain", "compare", "pretrain", "phantom", "folds",
            "manifest"]
PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def help_text(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"kd_fracture.{command}").main(["--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_real_defaults_and_one_flag_convention(command, capsys):
    text = help_text(command, capsys)
    assert "default: None" not in text and "(default: None)" not in text
    for old in ("--run-dir", "--teacher-run", "--size ", "--workers"):
        assert old not in text, f"{command}: {old}"
    if "--seed" in text:  # --seed is the training seed wherever it exists; the others are named
        assert re.search(r"--seed SEED training seed", text), text


@pytest.mark.parametrize("command", COMMANDS)
def test_version(command, capsys):
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"kd_fracture.{command}").main(["--version"])
    assert exc.value.code == 0 and kd_fracture.__version__ in capsys.readouterr().out


def test_help_defaults_come_from_the_dataclasses(capsys):
    text = help_text("cv", capsys)
    assert "--epochs EPOCHS default: 2 [train.epochs]" in text
    assert "--out DIR run directory to write (rerun the same command to resume); default: runs/<dataset>/<model>" in text
    text = help_text("distill", capsys)
    assert "default: runs/phantom/resnet50 [teacher_run]" in text and "default: 6 [search.n_trials]" in text


def test_entry_points_name_every_command_main():
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    for name in ("kd-cv", "kd-distill", "kd-dashboard", "kd-predict", "kd-evaluate", "kd-explain", "kd-compare"):
        module, func = scripts[name].split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
        assert importlib.import_module(f"kd_fracture.{name[3:]}").main is getattr(importlib.import_module(module), func)
