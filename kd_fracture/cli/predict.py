"""`python -m kd_fracture.predict --run RUN INPUT…`: score new images with a run's fold models.

    python -m kd_fracture.predict --run runs/phantom/resnet50 xray.png MURA-v1.1/valid/XR_WRIST/patient11185/
    python -m kd_fracture.predict --run runs/phantom/resnet50 --model student --fold 0 scans/ --out preds.csv

See kd_fracture.pipelines.predict for the probabilities and the threshold.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from kd_fracture import io
from kd_fracture.cli.common import add_model_args, models_from_args, new_parser, report_problems, show
from kd_fracture.data.inputs import collect_inputs, readable
from kd_fracture.errors import DataError, cli_main
from kd_fracture.pipelines.predict import known_truth, predict_images, study_predictions
from kd_fracture.train import engine


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("predict", __doc__)
    add_model_args(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder, or MURA study folder")
    p.add_argument("--out", type=Path, metavar="CSV",
                   help="write image predictions here (and study predictions to <stem>_studies.csv)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: 0)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models, device = models_from_args(args, num_workers=args.num_workers)
    images, problems = collect_inputs(args.inputs)
    images, unreadable = readable(images)
    problems += unreadable
    if not images:
        report_problems(problems)
        raise DataError(f"none of the {len(args.inputs)} input(s) holds a readable image; nothing was predicted")
    engine.log(f"{models.description} on {len(images)} image(s), {models.cfg.data.img_size} px, {device}")
    pred = predict_images(models, images, device)
    studies = study_predictions(pred, models.cfg.eval.threshold)
    print(show(pred[["path", "prob", "prediction", "true_label"]]))
    if len(studies):
        print(f"\nstudy level (mean of the study's image probabilities, abnormal if ≥ "
              f"{models.cfg.eval.threshold:.4g}, {models.threshold_source}):")
        print(show(studies))
    if args.out is not None:
        failed = pd.DataFrame({"path": [g for g, _ in problems], "error": [m for _, m in problems]})
        io.write_csv(args.out, pd.concat([known_truth(pred).assign(error=""), failed], ignore_index=True))
        written = [str(args.out)]
        if len(studies):
            written.append(str(io.write_csv(args.out.with_name(f"{args.out.stem}_studies.csv"), known_truth(studies))))
        engine.log(f"wrote {' and '.join(written)}")
    report_problems(problems)
    return 2 if problems else 0

