"""`python -m kd_fracture.pretrain`: build (or find) the phantom domain-pretrained teacher weights.

`cv` builds them by itself the first time it needs them; this command does it ahead of time (e.g. before
launching fold jobs in parallel) and prints where they are. What the weights are: kd_fracture/pipelines/pretraining.py.
"""
from __future__ import annotations

import argparse
import torch

from kd_fracture.pipelines import pretraining
from kd_fracture.cli.common import ConfigFlags, new_parser
from kd_fracture.config import CVConfig, load_config, replace
from kd_fracture.errors import cli_main

def build_parser() -> tuple[argparse.ArgumentParser, ConfigFlags]:
    p = new_parser("pretrain", __doc__)
    f = ConfigFlags(p, CVConfig())
    f.add(p, "--patients", "pretrain.patients", "corpus patients", type=int)
    f.add(p, "--corpus-seed", "pretrain.phantom_seed", "seed of the pretraining corpus (≠ the evaluated phantom's)",
          type=int)
    f.add(p, "--epochs", "pretrain.train.epochs", "pretraining epochs", type=int)
    f.add(p, "--img-size", "data.img_size", "image side", type=int)
    f.add(p, "--model", "model.name", "timm model")
    f.add(p, "--device", "train.device", "auto | cpu | cuda | cuda:N")
    f.add(p, "--threads", "train.threads", "torch CPU threads", type=int)
    return p, f


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser, flags = build_parser()
    args = parser.parse_args(argv)
    cfg = load_config(CVConfig, args.config, flags.overrides(args))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    cfg = replace(cfg, **{"model.pretrained": pretraining.PHANTOM})
    path = pretraining.ensure_phantom_weights(cfg)
    info = pretraining.describe(path)
    print(f"{path}  (corpus valid/ study AUROC {info['corpus_val_study_auroc']:.3f}, "
          f"built in {info['seconds']:.0f}s)")
    return 0
