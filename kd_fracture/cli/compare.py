"""`python -m kd_fracture.compare RUN_DIR… --out DIR`: compare finished runs fold by fold (see report.compare).

    python -m kd_fracture.compare runs/phantom/resnet50 runs/phantom/densenet121 --out runs/phantom/comparison
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kd_fracture.cli.common import new_parser
from kd_fracture.errors import UserError, cli_main
from kd_fracture.metrics import STUDY_METRICS
from kd_fracture.report.compare import compare_runs
from kd_fracture.train import engine


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("compare", __doc__)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished cv run directories")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--metric", default="kappa", choices=STUDY_METRICS,
                   help="per-fold study metric of the paired test (default: kappa)")
    p.add_argument("--names", help="comma-separated row names (default: run folder names)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    if names is not None and len(names) != len(args.runs):
        raise UserError(f"--names has {len(names)} names for {len(args.runs)} runs")
    _, tests = compare_runs(args.runs, args.out, args.metric, names)
    print((args.out / "comparison.md").read_text())
    if len(tests):
        print(tests[["run_a", "run_b", "mean_diff", "t", "df", "p_value"]].round(4).to_markdown(index=False))
    else:
        print("(no two runs share folds: no paired test)")
    engine.log(f"wrote {args.out}/")
    return 0

