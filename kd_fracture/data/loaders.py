"""From config to data: resolve the data source (synthetic default), split a fold into rows, build loaders.

Shared by cv, distill, evaluate and the benchmarks so every command sees the same rows in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kd_fracture.config import AugConfig, DataConfig, PhantomConfig
from kd_fracture.data.dataset import ImageCache, XrayDataset, make_loader
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


def build_loader(rows: pd.DataFrame, manifest: Manifest, data: DataConfig, aug: AugConfig, *, train: bool,
                 in_chans: int, batch_size: int, seed: int, num_views: int | None = None,
                 cache: SharedCache | None = None, shuffle: bool | None = None, drop_last: bool | None = None):
    """DataLoader over manifest rows; eval loaders keep row order (predictions align with `rows`)."""
    rows = rows.reset_index(drop=True)
    ds = XrayDataset(rows, manifest.root, data.img_size, train=train, in_chans=in_chans, seed=seed,
                     num_views=num_views, cache=cache.for_rows(rows) if cache else False, aug=aug_kwargs(aug))
    shuffle = train if shuffle is None else shuffle
    # drop a last batch of 1: BatchNorm cannot train on it
    drop_last = (train and len(rows) % batch_size == 1) if drop_last is None else drop_last
    return make_loader(ds, batch_size, shuffle=shuffle, seed=seed, num_workers=data.num_workers, drop_last=drop_last)
