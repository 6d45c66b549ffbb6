"""compare: the corrected resampled t-test, the cross-run table, sweeps (cv --config with `sweep:`) and the presets."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import yaml
from scipy import stats

from kd_fracture import compare, cv
from kd_fracture.cli import cv as cv_cli
from kd_fracture.report import compare as compare_report
from kd_fracture.config import CVConfig, load_config, read_yaml
from kd_fracture.errors import ConfigError
from kd_fracture.pipelines import sweep as sweeps

STUDIES = Path(__file__).parents[1] / "studies"


# ---------------------------------------------------------------------------------------------------- statistics


def test_corrected_resampled_ttest_matches_formula_and_is_more_conservative():
    d = np.array([0.02, 0.05, -0.01, 0.04, 0.03])
    n_train, n_test = 400.0, 100.0
    t, p = compare_report.corrected_resampled_ttest(d, n_train, n_test)
    expected_t = d.mean() / math.sqrt((1 / 5 + 100 / 400) * d.var(ddof=1))
    assert t == pytest.approx(expected_t)
    assert p == pytest.approx(2 * stats.t.sf(abs(expected_t), df=4))
    naive = stats.ttest_rel(d, np.zeros_like(d))  # var/K only: ignores the overlap of the training sets
    assert abs(t) < abs(naive.statistic) and p > naive.pvalue
    assert compare_report.corrected_resampled_ttest(-d, n_train, n_test) == pytest.approx((-t, p))


def test_corrected_resampled_ttest_degenerate_cases():
    assert compare_report.corrected_resampled_ttest(np.zeros(3), 10, 5) == (0.0, 1.0)
    t, p = compare_report.corrected_resampled_ttest(np.full(3, 0.1), 10, 5)
    assert t == math.inf and p == 0.0
    assert all(math.isnan(v) for v in compare_report.corrected_resampled_ttest(np.array([0.1]), 10, 5))


# ---------------------------------------------------------------------------------------------------- sweep + compare


@pytest.fixture(scope="module")
def sweep(tiny_phantom, tmp_path_factory) -> Path:
    """A two-entry sweep (resnet10t fine-tuned vs frozen) run through `cv --config`; the YAML asks for 224 px and
    the command line's --img-size 32 must win over every entry."""
    tmp = tmp_path_factory.mktemp("sweep")
    config = tmp / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp / "sweep"),
        "data": {"folds": 2, "img_size": 224, "inner_val_frac": 0.2, "manifests_dir": str(tmp / "manifests")},
        "model": {"name": "resnet10t"},
        "train": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0},
        "eval": {"bootstrap": 10},
        "sweep": {"finetuned": {"model.freeze": "none"},
                  "frozen": {"model": {"freeze": "backbone"}, "data.img_size": 256}},
    }))
    assert cv.main(["--config", str(config), "--data", str(tiny_phantom), "--img-size", "32"]) == 0
    return tmp / "sweep"


def test_sweep_runs_every_entry_on_the_same_folds_and_compares(sweep):
    for name, freeze in (("finetuned", "none"), ("frozen", "backbone")):
        cfg = load_config(CVConfig, sweep / name / "config.yaml")
        assert cfg.data.img_size == 32 and cfg.model.freeze == freeze and not cfg.sweep  # the flag beat the entry
        assert (sweep / name / "holdout" / "metrics.json").is_file()
    assert (sweep / "finetuned" / "folds.csv").read_bytes() == (sweep / "frozen" / "folds.csv").read_bytes()

    out = sweep / "comparison"
    table = pd.read_csv(out / "comparison_values.csv")
    assert table["run"].tolist() == ["finetuned", "frozen"]
    assert table["freeze"].tolist() == ["none", "backbone"]
    assert (table["trainable_params"] < table["params"]).tolist() == [False, True]
    fold_kappa = {n: [json.loads((sweep / n / f"fold_{k}" / "metrics.json").read_text())["study"]["kappa"]
                      for k in (0, 1)] for n in ("finetuned", "frozen")}
    assert table.loc[0, "cv_kappa_mean"] == pytest.approx(np.mean(fold_kappa["finetuned"]))
    for ext in ("csv", "md", "tex"):
        assert (out / f"comparison.{ext}").is_file()

    tests = pd.read_csv(out / "paired_tests.csv")
    assert len(tests) == 1 and 0.0 <= tests.loc[0, "p_value"] <= 1.0
    folds = pd.read_csv(sweep / "frozen" / "folds.csv")
    n_test = folds["fold"].value_counts().mean()
    d = np.subtract(fold_kappa["finetuned"], fold_kappa["frozen"])
    inner = yaml.safe_load((sweep / "frozen" / "config.yaml").read_text())["data"]["inner_val_frac"]
    n_train = (len(folds) - n_test) * (1 - inner)  # what a fold model trained on: no scored fold, no inner split
    expected = compare_report.corrected_resampled_ttest(d, n_train, n_test)
    assert (tests.loc[0, "t"], tests.loc[0, "p_value"]) == pytest.approx(expected, nan_ok=True)


def test_compare_cli_pairs_only_runs_with_identical_folds(sweep, tmp_path, capsys):
    other = shutil.copytree(sweep / "frozen", tmp_path / "other_folds")
    folds = pd.read_csv(other / "folds.csv")
    folds.loc[0, "fold"] = 1 - folds.loc[0, "fold"]  # one study moved: no longer the same folds
    folds.to_csv(other / "folds.csv", index=False)
    out = tmp_path / "cmp"
    assert compare.main([str(sweep / "finetuned"), str(sweep / "frozen"), str(other), "--out", str(out)]) == 0
    assert len(pd.read_csv(out / "comparison.csv")) == 3
    tests = pd.read_csv(out / "paired_tests.csv")
    assert tests[["run_a", "run_b"]].values.tolist() == [["finetuned", "frozen"]]
    assert "Not paired" in (out / "summary.md").read_text() and "other_folds" in (out / "summary.md").read_text()
    assert "Holdout study κ [95% CI]" in capsys.readouterr().out

    assert compare.main([str(sweep), "--out", str(out)]) == 2  # the sweep root is not a run
    assert "is a sweep" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- presets, config


def sweep_presets() -> list[Path]:
    return [p for p in sorted(STUDIES.glob("*.yaml")) if read_yaml(p).get("sweep")]


def test_presets_exist_and_resolve():
    names = {p.name for p in STUDIES.glob("*.yaml")}
    assert {"resnet18_frozen_head.yaml", "resnet50_frozen_vs_finetuned.yaml", "backbone_sweep.yaml"} <= names
    head = load_config(CVConfig, STUDIES / "resnet18_frozen_head.yaml")
    assert head.model.name == "resnet18" and head.model.freeze == "backbone" and not head.sweep

    sweep = load_config(CVConfig, STUDIES / "backbone_sweep.yaml")
    entries = sweeps.sweep_configs(sweep)
    assert {c.model.name for c in entries.values()} == {"resnet18", "resnet50", "densenet121", "efficientnet_b2",
                                                       "vgg16"}
    assert entries["efficientnet_b2"].data.img_size == 260 and entries["resnet50"].data.img_size == 224
    quick = sweeps.sweep_configs(sweep, {"data.img_size": 64, "train.epochs": 2, "run_dir": "elsewhere"})
    assert {c.data.img_size for c in quick.values()} == {64} and {c.train.epochs for c in quick.values()} == {2}
    assert quick["vgg16"].run_dir == str(Path("runs/backbone_sweep/vgg16"))

    ff = sweeps.sweep_configs(load_config(CVConfig, STUDIES / "resnet50_frozen_vs_finetuned.yaml"))
    assert {n: (c.model.name, c.model.freeze) for n, c in ff.items()} == {
        "frozen": ("resnet50", "backbone"), "finetuned": ("resnet50", "none")}


@pytest.mark.parametrize("path", sweep_presets(), ids=lambda p: p.name)
def test_every_sweep_entry_names_a_known_model(path):
    for name, cfg in sweeps.sweep_configs(load_config(CVConfig, path)).items():
        assert timm.is_model(cfg.model.name), (path.name, name)


@pytest.mark.parametrize("sweep, message", [
    ({"bad name": {}}, "sweep entry 'bad name'"),
    ({"comparison": {}}, "sweep entry 'comparison'"),
    ({"a": "resnet18"}, "sweep entry 'a': must be a mapping"),
    ({"a": {"model.nam": "resnet18"}}, "sweep entry 'a': unknown key 'model.nam'"),
    ({"a": {"run_dir": "x"}}, "'run_dir' cannot be set per entry"),
])
def test_bad_sweep_entries_are_config_errors(sweep, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        sweeps.sweep_configs(load_config(CVConfig, None, {"sweep": sweep}))


def test_sweep_flags_beat_entries_and_sweep_flags_reach_one_entry():
    cfg = load_config(CVConfig, STUDIES / "backbone_sweep.yaml",
                      {"sweep.resnet50.model.pretrained": "/w/resnet50.safetensors"})
    parser, flags = cv_cli.build_parser()
    args = parser.parse_args(["--img-size", "96", "--set", "sweep.resnet50.model.pretrained=/w/resnet50.safetensors"])
    entries = sweeps.sweep_configs(cfg, flags.overrides(args))
    assert entries["resnet50"].model.pretrained == "/w/resnet50.safetensors"
    assert entries["resnet50"].model.name == "resnet50"  # `model.name:` and the nested `model:` merge
    assert entries["resnet18"].model.pretrained == "auto"  # the default: phantom weights on the phantom only
    assert {c.data.img_size for c in entries.values()} == {96}
