"""`python -m kd_fracture.manifest --data ROOT`: load and validate a dataset (MURA v1.1 or folder layout), print the
EDA summary and write manifest.csv and class_balance.png. Nothing is written when validation fails."""
from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from kd_fracture.cli.common import new_parser
from kd_fracture.data.manifest import (FOLDER_LAYOUT, MURA_DIR, format_summary, load_manifest, plot_class_balance,
                                       summarize)
from kd_fracture.errors import cli_main
from kd_fracture.io import write_csv


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    parser = new_parser("manifest", __doc__)
    parser.add_argument("--data", required=True, type=Path,
                        help=f"MURA root (holding {MURA_DIR}/) or {MURA_DIR}/ itself, or a folder layout "
                             f"{FOLDER_LAYOUT}")
    parser.add_argument("--verify-images", action="store_true", help="decode every image up front (slow)")
    parser.add_argument("--name", default=None, help="dataset name (default: sanitised basename of the data root)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: data_manifests/<name>/)")
    args = parser.parse_args(argv)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = load_manifest(args.data, verify_images=args.verify_images, name=args.name)
    summary = summarize(manifest)
    out = args.out if args.out is not None else Path("data_manifests") / manifest.name

    print(f"dataset '{manifest.name}' ({manifest.source}) at {manifest.root}")
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"{len(manifest.df)} images, manifest sha256 {manifest.sha256()}")
    print(format_summary(summary))
    write_csv(out / "manifest.csv", manifest.df)
    plot_class_balance(summary, out / "class_balance.png", title=f"{manifest.name}: studies per body part")
    print(f"wrote {out / 'manifest.csv'} and {out / 'class_balance.png'}")
    return 0
