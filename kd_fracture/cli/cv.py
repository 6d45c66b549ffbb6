"""`python -m kd_fracture.cv --folds 5`: patient-grouped K-fold cross-validation of a timm teacher + holdout.

Per fold k: train on the other folds' patients minus an inner-validation split (early stopping, checkpoint choice,
decision threshold), then score fold k once. Aggregate: the K teachers' mean probability on the holdout split,
tables with mean ± std over folds, plots, summary.md. Rerunning the same command resumes; `--fold k` and
`--aggregate` split the work into independent jobs. The pipeline is kd_fracture.pipelines.cv.
"""
from __future__ import annotations

import argparse

import torch

from kd_fracture import distributed, metrics
from kd_fracture.cli.common import ConfigFlags, new_parser
from kd_fracture.config import CVConfig, load_config, replace
from kd_fracture.data.loaders import data_name
from kd_fracture.errors import cli_main
from kd_fracture.pipelines.cv import run_cv
from kd_fracture.pipelines.jobs import parse_jobs
from kd_fracture.pipelines.sweep import run_sweep
from kd_fracture.runs.rundir import RunDir, default_run_dir

SHOWN = {"run_dir": "runs/<dataset>/<model>", "data.root": "synthetic phantom"}


def build_parser() -> tuple[argparse.ArgumentParser, ConfigFlags]:
    p = new_parser("cv", __doc__)
    f = ConfigFlags(p, CVConfig(), SHOWN)
    g = p.add_argument_group("data")
    f.add(g, "--data", "data.root", "MURA root or folder-layout root", metavar="ROOT")
    f.add(g, "--folds", "data.folds", "K of the patient-grouped stratified K-fold", type=int)
    f.add(g, "--fold-seed", "data.fold_seed", "random_state of StratifiedGroupKFold", type=int)
    f.add(g, "--phantom-seed", "data.phantom.seed", "seed of the synthetic phantom (only without --data)", type=int)
    f.add(g, "--patients", "data.phantom.patients", "synthetic phantom size (only without --data)", type=int)
    f.add(g, "--img-size", "data.img_size", "square input side in pixels", type=int)
    f.add(g, "--num-workers", "data.num_workers", "DataLoader worker processes (a number, or auto)")
    f.add(g, "--aug-backend", "data.aug_backend", "where training images are augmented",
          choices=["auto", "albumentations", "torch"])
    f.add(g, "--verify-images", "data.verify_images", "decode every image up front", action="store_const")
    f.add(g, "--regenerate-folds", "data.regenerate_folds", "rebuild a stale folds file", action="store_const")
    g = p.add_argument_group("model and training")
    f.add(g, "--model", "model.name", "timm model name (resnet50, densenet121, …) or a student (hybrid_s)")
    f.add(g, "--pretrained", "model.pretrained", "start weights: a local file (safetensors/pth; never downloaded), "
          "phantom (domain pretraining, built once), auto (phantom on the synthetic default, none on --data), none",
          metavar="PATH|phantom|auto|none")
    f.add(g, "--freeze", "model.freeze", "backbone = train only the classifier head; bn = freeze every BatchNorm",
          choices=["none", "backbone", "bn"])
    f.add(g, "--in-chans", "model.in_chans", "1 = grayscale, 3 = replicated grayscale", type=int, choices=[1, 3])
    f.add(g, "--epochs", "train.epochs", type=int)
    f.add(g, "--batch-size", "train.batch_size", type=int)
    f.add(g, "--lr", "train.lr", type=float)
    f.add(g, "--optimizer", "train.optimizer", choices=["adamw", "adam", "sgd"])
    f.add(g, "--loss", "train.loss", choices=["bce", "ce"])
    f.add(g, "--patience", "train.patience", type=int)
    f.add(g, "--monitor", "train.monitor", choices=list(metrics.MONITORS))
    f.add(g, "--device", "train.device", "auto | cpu | cuda | cuda:N")
    f.add(g, "--seed", "train.seed", "training seed (fold k trains with seed + k)", type=int)
    f.add(g, "--threads", "train.threads", "torch CPU threads (null: torch's default)", type=int)
    f.add(g, "--compile", "train.compile", "torch.compile the training step", choices=["auto", "on", "off"])
    g = p.add_argument_group("run")
    f.add(g, "--out", "run_dir", "run directory to write (rerun the same command to resume)", metavar="DIR")
    g.add_argument("--fold", type=int, action="append", metavar="K", help="train only fold K (repeatable); "
                   "then --aggregate")
    g.add_argument("--aggregate", action="store_true", help="only build holdout, tables and plots from finished folds")
    g.add_argument("--jobs", default="auto", metavar="N|auto", help="folds trained at once, each its own process "
                   "(`--fold K`) with its share of the CPU cores; auto = 1 on the CPU and for inputs over 128 px, up "
                   "to 4 for small inputs on CUDA; default: auto")
    f.add(g, "--refit", "refit", "also train on the whole CV pool", action="store_const")
    f.add(g, "--keep-state", "keep_state", "keep each DONE fold's state_last.pt (optimizer state, for training on)",
          action="store_const")
    return p, f


def resolve_config(args: argparse.Namespace, flags: ConfigFlags) -> CVConfig:
    """Saved run config (when resuming) ← --config ← flags; a conflicting rerun is an error, not a silent mix."""
    overrides = flags.overrides(args)
    if overrides.get("train.threads"):
        torch.set_num_threads(overrides["train.threads"])
    cfg = load_config(CVConfig, args.config, overrides)
    if cfg.run_dir is None:  # runs/<dataset>/<model>: runs on other data or models never meet
        leaf = "sweep" if cfg.sweep else cfg.model.name
        cfg = replace(cfg, run_dir=default_run_dir(data_name(cfg.data), leaf))
    run = RunDir(cfg.run_dir)
    saved = run.saved_config(CVConfig)
    if saved is not None and args.config is None:
        cfg = replace(saved, **overrides)  # `cv --out X --aggregate` needs no flags
    run.check_compatible(cfg)
    return cfg


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser, flags = build_parser()
    args = parser.parse_args(argv)
    jobs = parse_jobs(args.jobs)  # before anything is written
    cfg = resolve_config(args, flags)
    if cfg.sweep:  # backbone sweep: several cv runs on the same folds, then a comparison
        return run_sweep(cfg, flags.overrides(args), folds_to_run=args.fold, aggregate_only=args.aggregate)
    distributed.init_from_env(cfg.train.device)  # under torchrun: one process group, DDP in engine.fit
    try:
        run_cv(cfg, folds_to_run=args.fold, aggregate_only=args.aggregate, jobs=jobs)
    finally:
        distributed.cleanup()
    return 0
