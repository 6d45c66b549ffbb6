"""Backbone sweeps: several cv runs on the same folds, then a paired comparison (no argparse).

    python -m kd_fracture.cv --config studies/backbone_sweep.yaml
"""
from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kd_fracture.config import CVConfig, from_dict, merge, set_dotted, to_dict
from kd_fracture.errors import ConfigError
from kd_fracture.pipelines.cv import run_cv
from kd_fracture.report.compare import COMPARISON_DIR, compare_runs
from kd_fracture.data.loaders import data_name
from kd_fracture.runs.rundir import RunDir, default_run_dir
from kd_fracture.train import engine

_ENTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def sweep_configs(cfg: CVConfig, cli_overrides: Mapping[str, Any] | None = None) -> dict[str, CVConfig]:
    """Each `sweep:` entry of `cfg` as a complete cv config, in file order.

    Precedence: the base config (YAML + command line) ← the entry's overrides (dotted `model.name: densenet121` or
    nested `model: {name: densenet121}`) ← the command-line overrides again, so a flag such as `--img-size 64`
    applies to every entry. run_dir = `<cfg.run_dir>/<entry>`; sweep is cleared.
    """
    root = cfg.run_dir or default_run_dir(data_name(cfg.data), "sweep")
    base = to_dict(cfg) | {"sweep": {}}
    # run_dir names the sweep's root; sweep.* flags (e.g. sweep.resnet50.model.pretrained=FILE) already shaped cfg.sweep
    cli = {k: v for k, v in (cli_overrides or {}).items() if k != "run_dir" and not k.startswith("sweep.")}
    configs = {}
    for name, entry in cfg.sweep.items():
        name = str(name)
        if not _ENTRY_NAME.fullmatch(name) or name == COMPARISON_DIR:
            raise ConfigError(f"sweep entry '{name}': names become run folders; use letters, digits, '.', '_', '-' "
                              f"(not '{COMPARISON_DIR}')")
        entry = {} if entry is None else entry
        if not isinstance(entry, Mapping):
            raise ConfigError(f"sweep entry '{name}': must be a mapping of overrides such as "
                              f"{{model.name: densenet121, data.img_size: 224}}, got {entry!r}")
        tree: dict = {}
        for key, value in [*copy.deepcopy(dict(entry)).items(), *cli.items()]:
            if str(key).split(".")[0] in ("run_dir", "sweep"):
                raise ConfigError(f"sweep entry '{name}': '{key}' cannot be set per entry")
            update: dict = {}
            set_dotted(update, str(key), value)
            tree = merge(tree, update)  # `model.name: x` and `model: {pretrained: f}` in one entry both count
        raw = merge(base, tree) | {"run_dir": str(Path(root) / name), "sweep": {}}
        configs[name] = from_dict(CVConfig, raw, f"sweep entry '{name}'")
    return configs


def run_sweep(cfg: CVConfig, cli_overrides: Mapping[str, Any], folds_to_run: list[int] | None = None,
              aggregate_only: bool = False) -> int:
    """`python -m kd_fracture.cv --config studies/backbone_sweep.yaml`: every entry on the same folds, then compare.

    Honours `--fold K` (train fold K of every entry, no comparison) and `--aggregate` (aggregate every entry, then
    compare); rerunning resumes each entry like a plain cv run.
    """
    if not cfg.sweep:
        raise ConfigError("run_sweep: the config has no sweep entries")
    configs = sweep_configs(cfg, cli_overrides)
    shared = {(c.data.root, c.data.name, c.data.folds, c.data.fold_seed, str(c.data.phantom)) for c in configs.values()}
    if len(shared) > 1:
        engine.log("warning: sweep entries differ in their data or folds settings; only entries on identical folds "
                   "are paired in the comparison")
    for c in configs.values():  # refuse a conflicting rerun before anything trains
        RunDir(c.run_dir).check_compatible(c)
    root = RunDir(cfg.run_dir)
    if engine.is_main():
        root.write_config(cfg)  # `cv --out ROOT --aggregate` finds the sweep again
    for i, (name, c) in enumerate(configs.items(), 1):
        engine.log(f"\n=== sweep entry {i}/{len(configs)}: {name} — {c.model.name}, {c.data.img_size} px, "
                   f"freeze {c.model.freeze} → {c.run_dir}")
        run_cv(c, folds_to_run=folds_to_run, aggregate_only=aggregate_only)
    if folds_to_run and not aggregate_only:
        engine.log(f"trained fold(s) {folds_to_run} of every entry; when all are DONE run: "
                   f"python -m kd_fracture.cv --out {cfg.run_dir} --aggregate")
        return 0
    if engine.is_main():
        out = root.path / COMPARISON_DIR
        _, tests = compare_runs([c.run_dir for c in configs.values()], out, names=list(configs))
        print((out / "comparison.md").read_text())
        if len(tests):
            print(tests[["run_a", "run_b", "mean_diff", "t", "p_value"]].round(4).to_markdown(index=False))
        engine.log(f"comparison: {out / 'summary.md'}")
    return 0
