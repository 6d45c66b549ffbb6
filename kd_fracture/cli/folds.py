"""`python -m kd_fracture.folds`: make (or check and reuse) patient-grouped stratified CV folds and print their
composition (the folds cv uses; docs/design.md §3)."""
from __future__ import annotations

from pathlib import Path

from kd_fracture.cli.common import new_parser
from kd_fracture.data.folds import folds_path, format_fold_summary, load_or_make_folds
from kd_fracture.data.manifest import load_manifest
from kd_fracture.data.phantom import ensure_default_phantom
from kd_fracture.errors import cli_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = new_parser("folds", __doc__)
    p.add_argument("--data", type=Path, default=None,
                   help="data root (MURA-v1.1 parent or folder layout); default: the synthetic phantom")
    p.add_argument("--folds", type=int, default=5, help="number of folds K (default 5)")
    p.add_argument("--fold-seed", type=int, default=0, help="random_state of StratifiedGroupKFold (default 0)")
    p.add_argument("--regenerate-folds", action="store_true",
                   help="rebuild the folds file even if one exists (e.g. after the manifest changed)")
    p.add_argument("--manifests-dir", type=Path, default=Path("data_manifests"),
                   help="where folds are stored: DIR/<dataset>/folds_k{K}_s{seed}.csv (default data_manifests)")
    args = p.parse_args(argv)

    if args.data is None:
        args.data = ensure_default_phantom()
    manifest = load_manifest(args.data)
    existed = folds_path(args.manifests_dir, manifest.name, args.folds, args.fold_seed).exists()
    folds, path = load_or_make_folds(manifest, args.folds, args.fold_seed, args.manifests_dir, args.regenerate_folds)
    print(f"{manifest.name}: {len(folds)} studies, {folds['patient_id'].nunique()} patients in the CV pool, "
          f"K={args.folds}, seed={args.fold_seed}")
    print(format_fold_summary(folds))
    action = "rebuilt" if existed and args.regenerate_folds else ("reused" if existed else "written")
    print(f"folds {action}: {path} (+ {path.with_suffix('.json').name}, manifest sha256 {manifest.sha256()[:12]}…)")
    return 0
