"""`python -m kd_fracture.pretrain`: build (or find) the phantom domain-pretrained teacher weights.

`cv` builds them by itself the first time it needs them; this command does it ahead of time (e.g. before
launching fold jobs in parallel) and prints where they are. What the weights are: kd_fracture/pretraining.py.
"""
from __future__ import annotations

import argparse
import sys

import torch

from kd_fracture import pretraining
from kd_fracture.config import CVConfig, add_config_args, load_config, overrides_from_args, replace
from kd_fracture.errors import cli_main

FLAGS = {"patients": "pretrain.patients", "phantom_seed": "pretrain.phantom_seed", "epochs": "pretrain.train.epochs",
         "img_size": "data.img_size", "model": "model.name", "device": "train.device", "threads": "train.threads"}


def build_parser() -> argparse.ArgumentParser:
    d = CVConfig()
    p = argparse.ArgumentParser(prog="python -m kd_fracture.pretrain", description=__doc__.split("\n\n")[0])
    add_config_args(p)
    p.add_argument("--patients", type=int, help=f"corpus patients (default {d.pretrain.patients})")
    p.add_argument("--phantom-seed", type=int, help=f"corpus seed (default {d.pretrain.phantom_seed})")
    p.add_argument("--epochs", type=int, help=f"pretraining epochs (default {d.pretrain.train.epochs})")
    p.add_argument("--img-size", type=int, help=f"image side (default {d.data.img_size})")
    p.add_argument("--model", help=f"timm model (default {d.model.name})")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(CVConfig, args.config, overrides_from_args(args, FLAGS))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    cfg = replace(cfg, **{"model.pretrained": pretraining.PHANTOM})
    path = pretraining.ensure_phantom_weights(cfg)
    info = pretraining.describe(path)
    print(f"{path}  (corpus valid/ study AUROC {info['corpus_val_study_auroc']:.3f}, "
          f"built in {info['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
