"""`python -m kd_fracture.phantom --out DIR`: write the synthetic MURA-v1.1-layout phantom (stylised radiographs,
NOT real data) — the data cv uses when no --data is given. Defaults shown by --help."""
from __future__ import annotations

import time

from kd_fracture.cli.common import new_parser
from kd_fracture.data.phantom import (DEFAULT_ABNORMAL_FRAC, DEFAULT_HOLDOUT_FRAC, generate_phantom, phantom_info,
                                      write_preview)
from kd_fracture.errors import cli_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = new_parser("phantom", __doc__)
    ap.add_argument("--out", required=True, help="data root; MURA-v1.1/ is created inside it")
    ap.add_argument("--patients", type=int, default=300, help="number of patients (train + valid); default: %(default)s")
    ap.add_argument("--img-size", type=int, default=64, help="image side in pixels; default: %(default)s")
    ap.add_argument("--phantom-seed", type=int, default=0, help="same seed, same bytes; default: %(default)s")
    ap.add_argument("--holdout-frac", type=float, default=DEFAULT_HOLDOUT_FRAC,
                    help="fraction of patients in valid/ (the holdout), as in MURA disjoint from train/; default: %(default)s")
    ap.add_argument("--abnormal-frac", type=float, default=DEFAULT_ABNORMAL_FRAC,
                    help="probability that a study is abnormal; default: %(default)s")
    ap.add_argument("--processes", type=int, default=1, help="processes (output is identical for any value); default: %(default)s")
    ap.add_argument("--preview", metavar="PNG", help="also write a labelled contact sheet here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    root = generate_phantom(args.out, args.patients, args.img_size, args.phantom_seed, args.holdout_frac, args.abnormal_frac,
                            args.processes)
    seconds = time.perf_counter() - t0
    counts = phantom_info(root)["counts"]
    total = sum(c["images"] for c in counts.values())
    for split, c in counts.items():
        rate = c["positive_studies"] / max(c["studies"], 1)
        print(f"{split:5s}: {c['patients']} patients, {c['studies']} studies, {c['images']} images, "
              f"{rate:.1%} abnormal studies")
    print(f"wrote {root / 'MURA-v1.1'} ({total} images in {seconds:.1f} s, {total / seconds:.0f} images/s) "
          "-- SYNTHETIC phantom, not real radiographs")
    if args.preview:
        print(f"preview: {write_preview(args.preview, args.img_size, args.phantom_seed)}")
    return 0
