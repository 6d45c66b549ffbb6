"""`python -m kd_fracture.explain --run RUN INPUT… --out DIR`: Grad-CAM overlays of a run's fold models.

    python -m kd_fracture.explain --run runs/phantom/resnet50 xray.png MURA-v1.1/valid/XR_WRIST/ --out gradcam/
    python -m kd_fracture.explain --run runs/phantom/resnet50 --model student --fold 0 xray.png --out gradcam/

With several fold models the map and the probability are the mean over the folds (`--fold K` explains one model);
the method is in kd_fracture.report.figures.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

from kd_fracture import io
from kd_fracture.cli.common import add_model_args, models_from_args, new_parser, report_problems
from kd_fracture.data.inputs import as_manifest, collect_inputs, readable
from kd_fracture.errors import DataError, cli_main
from kd_fracture.report.figures import CAM_BATCH, explain_rows, label_name, overlay, plot_panels
from kd_fracture.train import engine


def output_name(index: int, shown: str) -> str:
    """`007_study1_positive_image1.png`: index keeps MURA's many `image1.png` apart; the tail says which it is."""
    tail = "_".join(Path(shown).parts[-2:])
    return f"{index:03d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(tail).stem)[:80]}.png"


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("explain", __doc__)
    add_model_args(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder, or MURA study folder")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="writes one <n>_<name>.png per image (image | overlay) and gradcam.csv")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models, device = models_from_args(args, num_workers=0)
    images, problems = collect_inputs(args.inputs)
    images, unreadable = readable(images)
    problems += unreadable
    if not images:
        report_problems(problems, "explained")
        raise DataError(f"none of the {len(args.inputs)} input(s) holds a readable image; nothing was explained")
    engine.log(f"Grad-CAM of {models.description} on {len(images)} image(s), {models.cfg.data.img_size} px")
    manifest = as_manifest(images)
    pixels, maps, probs = explain_rows(models, manifest.df, manifest.root, device,
                                       batch_size=args.batch_size or CAM_BATCH)
    threshold, rows = models.cfg.eval.threshold, []
    for i, (image, px, cam, prob) in enumerate(zip(images, pixels, maps, probs)):
        file = args.out / output_name(i, image.shown)
        title = f"p(abnormal)={prob:.3f} → {label_name(prob >= threshold)}"
        plot_panels([px, overlay(px, cam)], [image.shown[-40:], title], file, ncols=2, suptitle=models.description)
        rows.append({"path": image.shown, "prob": float(prob), "prediction": label_name(prob >= threshold),
                     "gradcam": file.name})
    table = pd.DataFrame(rows)
    io.write_csv(args.out / "gradcam.csv", table)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    engine.log(f"wrote {len(rows)} overlay(s) and gradcam.csv to {args.out}/")
    report_problems(problems, "explained")
    return 2 if problems else 0

