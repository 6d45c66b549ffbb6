"""What every command shares: the parser (with --version), config flags whose help shows the dataclass defaults,
the flags that pick a run's models (predict, evaluate, explain), and per-input error lines.

Flag convention (docs/design.md §7): `--run` reads a run, `--out` writes a run or a file, `--seed` is the training
seed, `--fold-seed` / `--phantom-seed` the others, `--img-size` the input side. Every config key is reachable with
`--set KEY=VALUE` or `--config YAML`.
"""
from __future__ import annotations

import argparse
import ipaddress
import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from kd_fracture import __version__
from kd_fracture.config import add_config_args, overrides_from_args, replace
from kd_fracture.runs.models import ROLES, RunModels, load_run_models
from kd_fracture.train import engine


def new_parser(command: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m kd_fracture.{command}", description=(doc or "").split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"kd_fracture {__version__}")
    return p


def dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part] if isinstance(cfg, Mapping) else getattr(cfg, part)
    return cfg


NULL_MEANS = {"train.threads": "torch's default", "search.timeout": "no limit", "data.root": "synthetic phantom",
              "model.pretrained": "random init", "search.storage": "per study", "search.folds": "all"}
"""What a null default means, for --help."""


class ConfigFlags:
    """Flags that override config keys. Each flag defaults to None (not given → the config decides), and its help
    ends with the key's real default, read from the config dataclass, so `--help` never says "default: None"."""

    def __init__(self, parser: argparse.ArgumentParser, defaults: Any, shown: Mapping[str, str] | None = None):
        self.parser, self.defaults, self.shown, self.keys = parser, defaults, dict(shown or {}), {}
        add_config_args(parser)

    def add(self, group, flag: str, key: str, help: str = "", **kwargs) -> None:
        dest = flag.lstrip("-").replace("-", "_")
        default = self.shown.get(key, dotted(self.defaults, key))
        default = NULL_MEANS.get(key, "null") if default is None else default
        text = f"{help}; " if help else ""
        if kwargs.get("action") != "store_const":
            group.add_argument(flag, dest=dest, help=f"{text}default: {default}  [{key}]", **kwargs)
        else:  # a switch: given → True
            group.add_argument(flag, dest=dest, const=True, help=f"{text}default: {default}  [{key}]",
                               **{k: v for k, v in kwargs.items() if k != "const"})
        self.keys[dest] = key

    def overrides(self, args: argparse.Namespace) -> dict[str, Any]:
        """{config key: value} of the flags given, then --set."""
        return overrides_from_args(args, self.keys)


# ----------------------------------------------------------------------------------------------------------------------
# a run's models


def parse_fold(text: str) -> int | str:
    """`--fold 3` → 3; `--fold refit` → "refit" (the model trained on the whole pool)."""
    if text.isdigit():
        return int(text)
    if text == "refit":
        return text
    raise argparse.ArgumentTypeError(f"'{text}' is not a fold number (or 'refit')")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by predict, evaluate and explain."""
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory of `python -m kd_fracture.cv`")
    p.add_argument("--model", choices=ROLES, default="teacher",
                   help="the run's teachers or its distilled student (default: teacher)")
    p.add_argument("--fold", type=parse_fold, metavar="K", help="use fold K's model only (default: fold ensemble)")
    p.add_argument("--study", help="distillation study under RUN_DIR/distill/ (needed when there are several)")
    p.add_argument("--variant", help="student under distill/<study>/final/ (default: <student>_kd, the KD student)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the run's train.device)")
    p.add_argument("--batch-size", type=int, default=None, help="inference batch size (default: the run's)")


def models_from_args(args: argparse.Namespace, num_workers: int | None = None) -> tuple[RunModels, torch.device]:
    models = load_run_models(args.run, args.model, args.fold, args.study, args.variant)
    runtime = {"data.num_workers": num_workers} if num_workers is not None else {}
    if args.batch_size is not None:
        runtime["train.eval_batch_size"] = args.batch_size
    if runtime:
        models = dataclasses.replace(models, cfg=replace(models.cfg, **runtime))
    return models, engine.resolve_device(args.device or models.cfg.train.device)


def report_problems(problems: list[tuple[str, str]], verb: str = "predicted") -> None:
    """One `error: INPUT: problem` line per failed input, then which ones were left out."""
    for given, problem in problems:
        print(f"error: {given}: {problem}", file=sys.stderr)
    if problems:
        print(f"error: {len(problems)} input(s) failed and were not {verb}: {', '.join(g for g, _ in problems)}",
              file=sys.stderr)


def show(df: pd.DataFrame) -> str:
    """Console table: probabilities to 3 decimals, unknown truth as '?'."""
    shown = df.copy()
    if "true_label" in shown:
        shown["true_label"] = shown["true_label"].map({0: "normal", 1: "abnormal"}).fillna("?")
    return shown.to_string(index=False, float_format=lambda x: f"{x:.3f}")


# ----------------------------------------------------------------------------------------------------------------------
# local servers (dashboard, tensorboard)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to a public interface
        return False


def exposure_warning(host: str, server: str = "the dashboard",
                     what: str = "the study (parameters, values, notes) becomes") -> str | None:
    """The warning printed for a non-loopback --host (0.0.0.0, a LAN address, a host name), else None."""
    if is_loopback(host):
        return None
    where = "every network interface" if host in ("0.0.0.0", "::") else host
    return (f"warning: --host {host} binds {server} to {where}: {what} reachable from the network without "
            "authentication; use it only on a trusted network, or keep the default 127.0.0.1 and use an SSH tunnel")
