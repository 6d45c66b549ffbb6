"""Teacher-recipe lever: does a from-scratch ResNet-50 learn the phantom given more (disjoint) data? JSON + Markdown.

    python benchmarks/teacher_recipe.py [--patients 2000] [--epochs 4] [--batch-size 64] [--lr 1e-3]

The plain loop of the domain-pretraining lever (benchmarks/teacher_recipe.md): timm `resnet50` from random init,
a phantom corpus drawn with another seed (no patient shared with the default phantom), horizontal flips only, AdamW
with one-cycle lr, BCE, no pos_weight, batch 64, fp32, channels_last. After every epoch it scores, with no
fine-tuning, the DEFAULT phantom's CV pool and holdout at study level (study prob = mean of its images; κ at 0.5).
Seeded; the figures are one run on this machine's CPU (named in the output).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from kd_fracture.data.dataset import XrayDataset, make_loader
from kd_fracture.data.manifest import load_manifest
from kd_fracture.data.phantom import GENERATOR_VERSION, ensure_default_phantom, generate_phantom
from kd_fracture.io import write_json, write_text
from kd_fracture.metrics import evaluate
from kd_fracture.runs.rundir import cpu_model




def score(model, loaders) -> dict:
    model.eval()
    out = {}
    with torch.inference_mode():
        for split, (rows, loader) in loaders.items():
            prob = torch.cat([torch.sigmoid(model(b["image"].contiguous(memory_format=torch.channels_last)))[:, 0]
                              for b in loader]).numpy()
            r = evaluate(rows.assign(prob=prob))
            out[split] = {"image_auroc": r["image"]["auroc"], "study_auroc": r["study"]["auroc"],
                          "study_kappa": r["study"]["kappa"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--corpus-seed", type=int, default=99)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cache-dir", default=".kd_fracture_cache")
    ap.add_argument("--out", default="benchmarks")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = load_manifest(generate_phantom(Path(tmp) / "corpus", patients=args.patients, size=64,
                                                seed=args.corpus_seed, holdout_frac=0.05))
        train = corpus.df[corpus.df["split"] == "train"].reset_index(drop=True)
        flips = {"hflip": 0.5, "rotate_limit": 0.0, "rrc_scale": (1.0, 1.0), "brightness_contrast": 0.0}
        ds = XrayDataset(train, corpus.root, 64, train=True, in_chans=3, seed=0, cache=True, aug=flips)
        loader = make_loader(ds, args.batch_size, shuffle=True, seed=0, drop_last=True)
        default = load_manifest(ensure_default_phantom(args.cache_dir))
        evals = {}
        for split, name in (("train", "cv_pool"), ("holdout", "holdout")):
            rows = default.df[default.df["split"] == split].reset_index(drop=True)
            evals[name] = (rows, make_loader(XrayDataset(rows, default.root, 64, train=False, in_chans=3, cache=True),
                                             128, shuffle=False, seed=0))
        model = timm.create_model("resnet50", num_classes=1).to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * len(loader),
                                                    pct_start=0.25)
        epochs = []
        for epoch in range(args.epochs):
            ds.set_epoch(epoch)
            loader.generator.manual_seed(epoch)
            model.train()
            t, total, n = time.perf_counter(), 0.0, 0
            for b in loader:
                x = b["image"].contiguous(memory_format=torch.channels_last)
                loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], b["label"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total, n = total + loss.item() * len(x), n + len(x)
            seconds = time.perf_counter() - t
            row = {"epoch": epoch + 1, "train_loss": total / n, "train_seconds": seconds, "img_per_s": n / seconds,
                   **{f"{s}_{k}": v for s, r in score(model, evals).items() for k, v in r.items()}}
            epochs.append(row)
            print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "generator_version": GENERATOR_VERSION, "args": vars(args), "n_train_images": len(train),
              "wall_seconds": time.perf_counter() - t0, "epochs": epochs}
    out = Path(args.out)
    write_json(out / "teacher_recipe_plain_loop.json", result)
    header = "| epoch | train loss | img/s | CV-pool study AUROC | CV-pool study κ | holdout study AUROC | holdout study κ |"
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|"] + [
        f"| {r['epoch']} | {r['train_loss']:.3f} | {r['img_per_s']:.1f} | {r['cv_pool_study_auroc']:.3f} | "
        f"{r['cv_pool_study_kappa']:.3f} | {r['holdout_study_auroc']:.3f} | {r['holdout_study_kappa']:.3f} |"
        for r in epochs]
    write_text(out / "teacher_recipe_plain_loop.md",
               f"Plain loop, {args.patients}-patient corpus (seed {args.corpus_seed}), {len(train)} images, "
               f"{result['cpu']}, {result['threads']} threads, {result['wall_seconds']:.0f} s wall\n\n"
               + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
