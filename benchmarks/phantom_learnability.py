"""Is the synthetic phantom's label learnable, and only from the fracture signs? Writes JSON + Markdown.

    python benchmarks/phantom_learnability.py [--patients 450] [--epochs 14] [--out benchmarks/]

Generates a phantom (default generator settings, 64 px), trains on its train/ split and scores its valid/ split,
the holdout (disjoint patients, as in MURA):
- a 4-block CNN (3×3 conv, BN, ReLU, 2×2 max-pool; global MAX pooling, since a fracture is a small local sign),
  AdamW 2e-3, batch 32, the package's training augmentation, for `--epochs` epochs: study-level κ and AUROC
  (study probability = mean over its views; MURA's metric, Rajpurkar et al. 2017);
- a logistic regression on global intensity statistics (mean, std, fraction of bright pixels) per image: should
  score image AUROC ≈ 0.5 — the phantom has no global-brightness shortcut.
Seeded; the numbers are those of one run on this machine's CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch import nn

from kd_fracture.data.dataset import XrayDataset
from kd_fracture.data.manifest import load_manifest
from kd_fracture.data.phantom import GENERATOR_VERSION, generate_phantom
from kd_fracture.io import write_json, write_text
from kd_fracture.metrics import evaluate


def small_cnn() -> nn.Module:
    layers, c_in = [], 1
    for c_out in (16, 32, 64, 64):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c_in, 1))


def study_scores(df: pd.DataFrame, prob: np.ndarray) -> dict:
    result = evaluate(df.assign(prob=prob))  # the project's metrics: study prob = mean of its images, >= 0.5
    return {"study_kappa": result["study"]["kappa"], "study_auroc": result["study"]["auroc"],
            "image_auroc": result["image"]["auroc"], "n_studies": result["n_studies"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=450)
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_phantom(tmp, patients=args.patients, size=64, seed=args.seed, holdout_frac=1 / 3, workers=2)
        df = load_manifest(root).df
        train, test = (df[df.split == s].reset_index(drop=True) for s in ("train", "holdout"))
        ds_train = XrayDataset(train, root, 64, train=True, in_chans=1, seed=args.seed, cache=True)
        ds_test = XrayDataset(test, root, 64, train=False, in_chans=1, cache=True)
        x_test = torch.stack([ds_test[i]["image"] for i in range(len(ds_test))])  # (N, 1, 64, 64)

        # global-statistics shortcut check, on the raw uint8 pixels
        def stats(ds):
            a = ds.cache.array.reshape(len(ds), -1).astype(np.float32) / 255
            return np.stack([a.mean(1), a.std(1), (a > 0.7).mean(1)], 1)
        logreg = LogisticRegression(max_iter=1000).fit(stats(ds_train), train.label)
        shortcut_auroc = float(roc_auc_score(test.label, logreg.predict_proba(stats(ds_test))[:, 1]))

        net = small_cnn()
        opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=0.01)
        y = torch.tensor(ds_train.labels)
        for epoch in range(args.epochs):
            ds_train.set_epoch(epoch)
            x = torch.stack([ds_train[i]["image"] for i in range(len(ds_train))])
            net.train()
            for idx in torch.randperm(len(x)).split(32):
                loss = nn.functional.binary_cross_entropy_with_logits(net(x[idx]).squeeze(1), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            prob = torch.sigmoid(torch.cat([net(b) for b in x_test.split(256)]).squeeze(1)).numpy()
    result = {"generator_version": GENERATOR_VERSION, "patients": args.patients, "epochs": args.epochs,
              "train_images": len(train), "test_images": len(test), "small_cnn": study_scores(test, prob),
              "global_stats_logreg_image_auroc": shortcut_auroc, "wall_s": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "phantom_learnability.json", result)
    c = result["small_cnn"]
    write_text(out / "phantom_learnability.md",
        f"# Phantom learnability (generator v{GENERATOR_VERSION}, 64 px)\n\n"
        f"| model | train / test images | study κ | study AUROC | image AUROC |\n|:--|:--|--:|--:|--:|\n"
        f"| 4-block CNN, global max pool, {args.epochs} epochs | {len(train)} / {len(test)} | "
        f"{c['study_kappa']:.3f} | {c['study_auroc']:.3f} | {c['image_auroc']:.3f} |\n"
        f"| logistic regression on mean / std / bright fraction | {len(train)} / {len(test)} | – | – | "
        f"{shortcut_auroc:.3f} |\n\nWall time {result['wall_s']} s. Generated by `python "
        f"benchmarks/phantom_learnability.py`.\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
