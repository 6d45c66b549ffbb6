"""`python -m kd_fracture.distill`: distil each fold's teacher into a CNN+Transformer student, tuned with Optuna.

    python -m kd_fracture.distill                                  # the teacher run of `cv --folds 5`
    python -m kd_fracture.distill --n-trials 20 --storage postgresql://user@host/db    # larger, shared search
    python -m kd_fracture.distill --trials-only --storage journal:kd.journal           # an extra search worker

Everything lands in <run>/distill/<study>/; the pipeline and its steps are in kd_fracture.pipelines.distill.
"""
from __future__ import annotations

import argparse
import os

import optuna

from kd_fracture import search
from kd_fracture.cli.common import ConfigFlags, new_parser
from kd_fracture.config import DistillConfig, load_config, replace
from kd_fracture.errors import UserError, cli_main
from kd_fracture.pipelines.distill import TEACHER_CACHE_MODES, resolve_names, run_distill, study_dir
from kd_fracture.runs.rundir import RunDir

SHOWN = {"search.study": "<dataset>-<teacher model>-<student>",
         "search.storage": "sqlite:///<run>/distill/<study>.db", "search.folds": "2 (--set search.folds=null: all)"}


def build_parser() -> tuple[argparse.ArgumentParser, ConfigFlags]:
    p = new_parser("distill", __doc__)
    f = ConfigFlags(p, DistillConfig(), SHOWN)
    f.add(p, "--run", "teacher_run", "teacher cv run to read; image size, folds, data and augmentation come from "
          "its config.yaml", metavar="DIR")
    g = p.add_argument_group("search")
    f.add(g, "--n-trials", "search.n_trials", "target number of finished trials in the study; a rerun adds only "
          "the missing ones", type=int, metavar="N")
    f.add(g, "--timeout", "search.timeout", "stop starting trials after S seconds", type=float, metavar="S")
    f.add(g, "--study", "search.study", "study name, also the folder <run>/distill/<study>")
    f.add(g, "--storage", "search.storage", "sqlite:///F.db | postgresql://… | mysql://… | journal:PATH",
          metavar="URL")
    f.add(g, "--pruner", "search.pruner", choices=search.PRUNERS)
    f.add(g, "--search-epochs", "search.epochs", "epochs per fold in a trial", type=int, metavar="N")
    f.add(g, "--search-folds", "search.folds", "folds per trial, the first N", type=int, metavar="N")
    f.add(g, "--worker", "search.worker", "index of this worker among those sharing the study (seeds its sampler)",
          type=int, metavar="N")
    g.add_argument("--skip-search", action="store_true", help="train final students with best_params.yaml (or "
                   "the config's values when there is none)")
    g.add_argument("--trials-only", action="store_true", help="only run trials (an extra worker on a shared storage)")
    f.add(g, "--variants", "variants", "comma-separated rows of the comparison, each searched with the same budget: "
          "kd, no_kd, timm:NAME", type=lambda s: tuple(v.strip() for v in s.split(",") if v.strip()), metavar="LIST")
    g = p.add_argument_group("student and training")
    f.add(g, "--student", "student.name", "hybrid_t | hybrid_s | hybrid_m | timm:NAME")
    f.add(g, "--epochs", "train.epochs", "epochs of the final students", type=int)
    f.add(g, "--seed", "train.seed", "training seed (fold k trains with seed + k)", type=int)
    f.add(g, "--teacher-cache", "kd.teacher_cache", "views = cached, replayed views; none = run the teacher online "
          "every step on the same views, for comparison", choices=TEACHER_CACHE_MODES)
    f.add(g, "--views", "kd.views", "augmented views per image whose teacher logits are cached", type=int)
    f.add(g, "--device", "train.device", "auto | cpu | cuda | cuda:N")
    f.add(g, "--threads", "train.threads", "torch CPU threads (on a CPU shared with other jobs, 1 is often "
          "fastest)", type=int)
    f.add(g, "--keep-state", "keep_state", "keep the final students' state_last.pt", action="store_const")
    return p, f


def resolve_config(args: argparse.Namespace, flags: ConfigFlags) -> DistillConfig:
    """Saved study config (when resuming without --config) ← --config ← flags."""
    overrides = flags.overrides(args)
    cfg = resolve_names(load_config(DistillConfig, args.config, overrides))
    saved = RunDir(study_dir(cfg)).saved_config(DistillConfig)
    if saved is not None and args.config is None:
        cfg = resolve_names(replace(saved, **overrides))
    return cfg


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser, flags = build_parser()
    args = parser.parse_args(argv)
    if args.skip_search and args.trials_only:
        raise UserError("--skip-search and --trials-only exclude each other")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("distill does not run under torchrun (every process would write); scale it out with several "
                        "Optuna workers on one --storage instead (README: Scaling out)")
    cfg = resolve_config(args, flags)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from our callback instead
    run_distill(cfg, skip_search=args.skip_search, trials_only=args.trials_only)
    return 0
