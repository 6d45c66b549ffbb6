"""From config to data: resolve the data source (synthetic default), split a fold into rows, build loaders.

Shared by cv, distill, evaluate and the benchmarks so every command sees the same rows in the same order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from kd_fracture.config import AugConfig, DataConfig, PhantomConfig
from kd_fracture.data.dataset import ImageCache, XrayDataset, check_aug_backend, make_loader
from kd_fracture.errors import ConfigError
from kd_fracture.data.folds import inner_val_split, load_or_make_folds, study_ids_to_rows
from kd_fracture.data.imageio import set_window_percentiles
from kd_fracture.data.manifest import Manifest, dataset_name, load_manifest


def resolve_manifest(cfg: DataConfig) -> Manifest:
    """`cfg.root` → its manifest; no root → the synthetic phantom (generated once into the cache dir). Also makes
    cfg.window_percentiles this process's rule for high-bit-depth images (imageio.set_window_percentiles)."""
    set_window_percentiles(cfg.window_percentiles)
    if cfg.root is None:
        return load_manifest(phantom_root(cfg.phantom), verify_images=cfg.verify_images, name=cfg.name)
    return load_manifest(cfg.root, verify_images=cfg.verify_images, name=cfg.name)


def data_name(cfg: DataConfig) -> str:
    """The dataset's name without reading it: `phantom` for the synthetic default, else data.name or the sanitised
    basename of data.root (as `load_manifest` names it)."""
    return "phantom" if cfg.root is None else dataset_name(Path(cfg.root), cfg.name)


def phantom_root(ph: PhantomConfig) -> Path:
    """The synthetic phantom's data root for this config, generated once into the cache dir."""
    from kd_fracture.data.phantom import ensure_default_phantom

    return ensure_default_phantom(ph.cache_dir, patients=ph.patients, size=ph.size, seed=ph.seed,
                                  holdout_frac=ph.holdout_frac)


def resolve_folds(cfg: DataConfig, manifest: Manifest) -> pd.DataFrame:
    folds, _ = load_or_make_folds(manifest, cfg.folds, cfg.fold_seed, cfg.manifests_dir, cfg.regenerate_folds)
    return folds


@dataclass(frozen=True)
class FoldRows:
    """Image rows of one fold: `train` (fits weights), `inner_val` (early stopping), `scored` (never used to decide)."""

    train: pd.DataFrame
    inner_val: pd.DataFrame
    scored: pd.DataFrame


def fold_rows(manifest: Manifest, folds: pd.DataFrame, fold: int | None, cfg: DataConfig) -> FoldRows:
    """fold=None → the whole CV pool is training data (refit); scored is then empty."""
    pool = manifest.df[manifest.df["split"] == "train"]
    train_studies, inner_studies = inner_val_split(folds, fold, cfg.inner_val_frac, seed=cfg.fold_seed)
    scored_ids = folds.loc[folds["fold"] == fold, "study_id"] if fold is not None else []
    return FoldRows(train=study_ids_to_rows(pool, train_studies["study_id"]),
                    inner_val=study_ids_to_rows(pool, inner_studies["study_id"]),
                    scored=study_ids_to_rows(pool, scored_ids))


def holdout_rows(manifest: Manifest) -> pd.DataFrame:
    return manifest.df[manifest.df["split"] == "holdout"].reset_index(drop=True)


def aug_kwargs(aug: AugConfig) -> dict:
    return {"hflip": aug.hflip, "rotate_limit": aug.rotate_limit, "rrc_scale": (aug.rrc_scale_min, 1.0),
            "brightness_contrast": aug.brightness_contrast}


class SharedCache:
    """One decoded-image cache per process, keyed by image path, so folds and the holdout decode each file once."""

    def __init__(self, root: Path, img_size: int, enabled: bool = True):
        self.root, self.img_size, self.enabled = Path(root), img_size, enabled
        self._caches: dict[tuple, ImageCache] = {}

    def for_rows(self, rows: pd.DataFrame) -> ImageCache | bool:
        if not self.enabled:
            return False
        key = tuple(rows["image_path"])
        if key not in self._caches:
            self._caches[key] = ImageCache([self.root / p for p in rows["image_path"]], self.img_size)
        return self._caches[key]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_aug_backend(data: DataConfig, device: torch.device | None = None) -> str:
    """data.aug_backend → albumentations | torch (auto: torch where the batches train on CUDA)."""
    if data.aug_backend != "auto":
        return check_aug_backend(data.aug_backend)
    return "torch" if (device or default_device()).type == "cuda" else "albumentations"


def backend_recipe(data: DataConfig, device: torch.device | None = None) -> dict:
    """{} when `data` augments with albumentations on `device`, else {"aug_backend": resolved}: what a cache key or
    fingerprint adds for the backend, so keys made before data.aug_backend existed stay valid (as
    engine.precision_recipe does for the precision)."""
    backend = resolve_aug_backend(data, device)
    return {} if backend == "albumentations" else {"aug_backend": backend}


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a Slurm allocation), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_num_workers(data: DataConfig, device: torch.device | None = None, jobs: int = 1) -> int:
    """data.num_workers → an int (auto: 0 on the CPU; on CUDA the cores this process may use, less one for the
    training loop, divided among `jobs` concurrent processes, at most 8)."""
    if data.num_workers != "auto":
        try:
            workers = int(data.num_workers)
        except (TypeError, ValueError):
            raise ConfigError(f"data.num_workers={data.num_workers!r}: a number ≥ 0, or auto") from None
        if workers < 0:
            raise ConfigError(f"data.num_workers={workers}: a number ≥ 0, or auto")
        return workers
    if (device or default_device()).type != "cuda":
        return 0
    return max(1, min(8, cores() // max(1, jobs) - 1))


def build_loader(rows: pd.DataFrame, manifest: Manifest, data: DataConfig, aug: AugConfig, *, train: bool,
                 in_chans: int, batch_size: int, seed: int, num_views: int | None = None,
                 cache: SharedCache | None = None, shuffle: bool | None = None, drop_last: bool | None = None,
                 device: torch.device | None = None):
    """DataLoader over manifest rows; eval loaders keep row order (predictions align with `rows`). `device` (default:
    CUDA if available) is where the batches will train: it resolves data.aug_backend and data.num_workers auto."""
    rows = rows.reset_index(drop=True)
    ds = XrayDataset(rows, manifest.root, data.img_size, train=train, in_chans=in_chans, seed=seed,
                     num_views=num_views, cache=cache.for_rows(rows) if cache else False, aug=aug_kwargs(aug),
                     backend=resolve_aug_backend(data, device))
    shuffle = train if shuffle is None else shuffle
    # drop a last batch of 1: BatchNorm cannot train on it
    drop_last = (train and len(rows) % batch_size == 1) if drop_last is None else drop_last
    return make_loader(ds, batch_size, shuffle=shuffle, seed=seed, num_workers=resolve_num_workers(data, device),
                       drop_last=drop_last)
