"""What throttling state_last.pt saves (issue #16): the time of one resumable-state write of the default teacher.

    python benchmarks/state_write.py [--run runs/phantom/resnet50] [--repeats 3]

Builds the default teacher (timm resnet50, 1 logit) with its AdamW optimizer after one step (so the optimizer holds
both moment buffers, as after any epoch), then times `train.checkpoint.save_state` — torch.save to a temp file,
fsync, atomic rename, sha256 sidecar — exactly as `engine.fit` writes it after an epoch. With --run, the epoch times
of that run's history.csv files give the ratio (state write / epoch) on this machine. Writes
benchmarks/state_write.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from timm.optim import create_optimizer_v2

from kd_fracture.config import CVConfig
from kd_fracture.models import create_model
from kd_fracture.runs.rundir import cpu_model
from kd_fracture.train.checkpoint import save_state

HERE = Path(__file__).parent




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a finished cv run whose fold histories give the epoch time")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = CVConfig()
    model = create_model(cfg.model.name, in_chans=cfg.model.in_chans, img_size=cfg.data.img_size)
    opt = create_optimizer_v2(model, opt=cfg.train.optimizer, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    x = torch.randn(2, cfg.model.in_chans, cfg.data.img_size, cfg.data.img_size)
    model(x).sum().backward()
    opt.step()  # Adam's exp_avg / exp_avg_sq now exist: the state has its after-an-epoch size
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 0}
    seconds, size = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state_last.pt"
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            save_state(path, state)
            seconds.append(time.perf_counter() - t0)
            size = path.stat().st_size
    result = {"cpu": cpu_model(), "torch": torch.__version__, "model": cfg.model.name, "img_size": cfg.data.img_size,
              "state_mb": size / 2**20, "write_s_median": statistics.median(seconds), "write_s": seconds}
    if args.run:
        epochs = pd.concat([pd.read_csv(p) for p in sorted(args.run.glob("fold_*/history.csv"))])
        result |= {"run": str(args.run), "epochs": len(epochs), "epoch_s_median": float(epochs["time_s"].median()),
                   "write_per_epoch": statistics.median(seconds) / float(epochs["time_s"].median())}
    (HERE / "state_write.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Resumable-state write of the default teacher", "",
             f"`python benchmarks/state_write.py{' --run ' + str(args.run) if args.run else ''}` on {result['cpu']}, "
             f"torch {result['torch']}.", "",
             "| state_last.pt | one write (median of %d) |" % args.repeats + (" epoch (median) | write / epoch |"
                                                                              if args.run else ""),
             "|---|---|" + ("---|---|" if args.run else ""),
             f"| {result['state_mb']:.0f} MB | {result['write_s_median']:.2f} s |"
             + (f" {result['epoch_s_median']:.1f} s | {result['write_per_epoch']:.1%} |" if args.run else ""), "",
             "Before issue #16 every epoch of every fold ended with this write, and each DONE fold kept the file. Now "
             "it is written at most every `train.state_interval_min` minutes (default 10) and dropped when the fold "
             "is DONE, so the default run (2-epoch folds well under 10 min) saves one write per epoch."]
    (HERE / "state_write.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
