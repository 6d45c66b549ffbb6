"""`python -m kd_fracture.evaluate --run RUN --data ROOT`: judge a run's models on another dataset.

ROOT is a MURA root (or MURA-v1.1/), a folder layout ROOT/{train,val,test}/<class>/ with any of those splits (only
test/ is fine), or any folder of images whose labels the folder names tell: the nearest class folder
(fractured|positive|abnormal, not_fractured|negative|normal) or MURA study folder (studyN_positive|negative);
such a folder is scored as one holdout split, and an image without a label is an error (use predict for those).

    python -m kd_fracture.evaluate --run runs/phantom/resnet50 --data /data/MURA
    python -m kd_fracture.evaluate --run runs/phantom/resnet50 --model student --data /data/fractures --split holdout
    python -m kd_fracture.evaluate --run runs/phantom/resnet50 --data /data/MURA/MURA-v1.1/valid/XR_WRIST

Output (default RUN/evaluate/<dataset>/) has the holdout's shape; see kd_fracture.pipelines.evaluate.
"""
from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

from kd_fracture.cli.common import add_model_args, models_from_args, new_parser
from kd_fracture.config import replace
from kd_fracture.errors import cli_main
from kd_fracture.pipelines.evaluate import SPLIT_CHOICES, default_out, evaluate_dataset, load_source
from kd_fracture.report import tables
from kd_fracture.runs.rundir import RunDir
from kd_fracture.train import engine


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("evaluate", __doc__)
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="ROOT",
                   help="MURA root (or MURA-v1.1/), folder-layout root (train/, val/ and/or test/), or a folder of "
                        "images labelled by folder names (fractured/, not_fractured/, studyN_positive/ …)")
    p.add_argument("--split", choices=SPLIT_CHOICES, default="all",
                   help="which of the dataset's splits to score (train = its CV pool; default: all)")
    p.add_argument("--name", help="dataset name (default: sanitised basename of ROOT)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: RUN_DIR/evaluate/<dataset>/)")
    p.add_argument("--bootstrap", type=int, help="bootstrap resamples for the CIs (default: the run's eval.bootstrap)")
    p.add_argument("--verify-images", action="store_true", help="decode every image up front")
    p.add_argument("--num-workers", type=int, help="DataLoader workers (default: the run's)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models, device = models_from_args(args, num_workers=args.num_workers)
    if args.bootstrap is not None:
        models = dataclasses.replace(models, cfg=replace(models.cfg, **{"eval.bootstrap": args.bootstrap}))
    with warnings.catch_warnings(record=True) as caught:  # one-line warnings, not Python's file:line form
        warnings.simplefilter("always")
        manifest = load_source(args.data, verify_images=args.verify_images, name=args.name)
    for w in caught:
        engine.log(f"warning: {w.message}")
    out = args.out or default_out(args.run, manifest.name, args.split, models)
    report = evaluate_dataset(models, manifest, args.split, out, device, RunDir(args.run).trained_on)
    name = next(k for k in report if k.startswith("fold_"))
    kappa = report[name]["ci95"]["kappa"]
    print((out / "tables" / "metrics.md").read_text())
    print(f"{report['dataset']}: study κ {tables.ci_text(kappa['value'], kappa['low'], kappa['high'])} "
          f"({report[name]['n_studies']} studies) — wrote {out}/")
    return 0

