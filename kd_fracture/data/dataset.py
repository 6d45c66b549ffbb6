"""Torch dataset over manifest rows, with a decoded-image cache and replayable augmentation views.

Views (docs/design.md §8): a training item's augmentation is seeded by (seed, image_key, view).
- `num_views=None`: view = epoch, a fresh deterministic augmentation every epoch (teacher training).
- `num_views=V`: view = (epoch + image_key) % V, so only V distinct views of an image ever occur; the teacher's
  logits for those V views are computed once (`ds.with_view(v)`) and the student replays them (KD).
- view -1 is the clean (eval) transform.
"""
from __future__ import annotations

import copy
import random
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from kd_fracture import distributed
from kd_fracture.data import batch_aug
from kd_fracture.data.imageio import read_grayscale
from kd_fracture.data.transforms import apply_seeded, build_transforms, image_key, resize_pad, resolve_aug
from kd_fracture.errors import ConfigError

CLEAN_VIEW = -1


class ImageCache:
    """Every image of a manifest subset decoded once (read_grayscale -> resize_pad) into one uint8 (N, S, S) array.

    Memory is N * S^2 bytes: 4 KB/image at 64 px, 50 KB at 224 px (MURA's 40k images ≈ 2 GB). Build it in the main
    process before the DataLoader starts workers: forked workers then share the array copy-on-write (one big numpy
    buffer, so Python's refcounting touches only its header, not the pixels). Under a `spawn` start method each
    worker would receive a pickled copy; `make_loader` asks for `fork` on Linux for this reason.
    Decoding uses a thread pool (cv2 releases the GIL); a bad file raises DataError naming its path.
    """

    def __init__(self, paths: Sequence[Path], img_size: int, workers: int = 2):
        self.paths = [Path(p) for p in paths]
        self.img_size = img_size
        self.array = np.empty((len(self.paths), img_size, img_size), dtype=np.uint8)  # (N, S, S)

        def decode(i: int) -> None:
            self.array[i] = resize_pad(read_grayscale(self.paths[i]), img_size)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for _ in pool.map(decode, range(len(self.paths))):  # consuming re-raises the first DataError
                pass
        self.array.flags.writeable = False  # shared between workers; augmentation must copy, never write in place

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def get(self, i: int) -> np.ndarray:
        """(S, S) uint8, read-only view into the cache."""
        return self.array[i]


AUG_BACKENDS = ("albumentations", "torch")


def check_aug_backend(backend: str) -> str:
    """`backend` if it is one of AUG_BACKENDS, else a ConfigError naming data.aug_backend."""
    if backend not in AUG_BACKENDS:
        raise ConfigError(f"data.aug_backend={backend!r}: choose auto or one of {', '.join(AUG_BACKENDS)}")
    return backend


class XrayDataset(Dataset):
    """Manifest rows -> {"image": (in_chans, S, S) float32, "label": () float32, "index": int, "view": int}.

    backend "torch" (`data.aug_backend`): "image" is the uint8 (in_chans, S, S) image before augmentation and
    "aug" its (8,) parameters (`batch_aug.draw_params`); `prefetch.to_device` augments the batch on its device.

    `index` is the row's position in `df` (predictions align with `df.reset_index(drop=True)`).
    Grayscale is replicated to 3 identical channels when `in_chans=3` (ImageNet-pretrained stems).
    The epoch lives in a shared-memory tensor, so `set_epoch` also reaches persistent DataLoader workers (call it
    before iterating the loader for that epoch).
    """

    def __init__(self, df: pd.DataFrame, root: Path, img_size: int, train: bool, in_chans: int = 1, seed: int = 0,
                 num_views: int | None = None, cache: bool | ImageCache = False, aug: dict[str, Any] | None = None,
                 backend: str = "albumentations"):
        self.backend = check_aug_backend(backend)
        if in_chans not in (1, 3):
            raise ConfigError(f"in_chans={in_chans}: must be 1 (grayscale) or 3 (replicated grayscale)")
        if num_views is not None and num_views < 1:
            raise ConfigError(f"num_views={num_views}: must be >= 1 (or None for a fresh view every epoch)")
        self.df = df.reset_index(drop=True)
        self.root = Path(root)
        self.img_size, self.train, self.in_chans, self.seed, self.num_views = img_size, train, in_chans, seed, num_views
        self.aug = resolve_aug(aug)
        self.paths = [self.root / p for p in self.df["image_path"]]
        self.keys = np.array([image_key(p) for p in self.df["image_path"]], dtype=np.int64)
        self.labels = self.df["label"].to_numpy(dtype=np.float32)
        self.view_override: int | None = None
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._train_tf = build_transforms(img_size, True, **self.aug)
        self._eval_tf = build_transforms(img_size, False)
        if cache is True:
            cache = ImageCache(self.paths, img_size)
        if isinstance(cache, ImageCache):
            if len(cache) != len(self.df) or cache.img_size != img_size:
                raise ValueError(f"ImageCache holds {len(cache)} images at {cache.img_size} px; "
                                 f"dataset has {len(self.df)} rows at {img_size} px")
        self.cache: ImageCache | None = cache or None

    def __len__(self) -> int:
        return len(self.df)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def with_view(self, view: int) -> XrayDataset:
        """A dataset that always yields `view` (-1: clean eval transform, even if `train=True`); shares the cache."""
        ds = copy.copy(self)
        ds.view_override = view
        return ds

    def view_of(self, i: int) -> int:
        """The augmentation view item `i` gets at the current epoch."""
        if self.view_override is not None:
            return self.view_override
        if not self.train:
            return CLEAN_VIEW
        if self.num_views is None:
            return self.epoch
        return int((self.epoch + self.keys[i]) % self.num_views)

    def load(self, i: int) -> np.ndarray:
        """(S, S) uint8 after resize_pad, from the cache or decoded now."""
        if self.cache is not None:
            return self.cache.get(i)
        return resize_pad(read_grayscale(self.paths[i]), self.img_size)

    def params_of(self, i: int, view: int) -> np.ndarray:
        """(8,) batch_aug parameters of row `i` under `view` (backend "torch")."""
        if view == CLEAN_VIEW:
            return batch_aug.identity_params(self.img_size)
        return batch_aug.draw_params(self.img_size, self.seed, int(self.keys[i]), view, **self.aug)

    def get_image(self, i: int, view: int) -> np.ndarray:
        """(S, S) float32 normalised image of row `i` under `view` (-1 = clean), as the model sees it."""
        img = self.load(i)
        if self.backend == "torch":
            x = torch.from_numpy(np.ascontiguousarray(img))[None, None]  # (1, 1, S, S) uint8
            return batch_aug.augment_batch(x, torch.from_numpy(self.params_of(i, view))[None])[0, 0].numpy()
        if view == CLEAN_VIEW:
            return np.ascontiguousarray(self._eval_tf(image=img)["image"], dtype=np.float32)
        return apply_seeded(self._train_tf, img, self.seed, int(self.keys[i]), view)

    def __getitem__(self, i: int) -> dict[str, Any]:
        view = self.view_of(i)
        if self.backend == "torch":  # uint8 + parameters; the batch is augmented where it trains
            image = np.repeat(self.load(i)[None], self.in_chans, axis=0)  # (in_chans, S, S) uint8, a copy
            return {"image": torch.from_numpy(image), "aug": torch.from_numpy(self.params_of(i, view)),
                    "label": torch.tensor(self.labels[i]), "index": i, "view": view}
        image = self.get_image(i, view)[None]  # (1, S, S)
        if self.in_chans == 3:
            # (3, S, S), identical channels. numpy, not Tensor.repeat: above 32k elements torch parallelises the copy
            # over its OpenMP pool, which in the main process (num_workers=0) costs more than the copy (≈ 0.5 ms
            # per 128-px item on a busy 2-core machine, a quarter of the whole item).
            image = np.repeat(image, 3, axis=0)
        return {"image": torch.from_numpy(image), "label": torch.tensor(self.labels[i]), "index": i, "view": view}


class ShardedRandomSampler(Sampler[int]):
    """Distributed sampler that keeps the single-process batches: rank r of W gets slice r of every global batch.

    The global order is the wrapped `RandomSampler`'s (same generator, re-seeded per epoch by `engine.set_epoch`
    through the `generator` attribute), so global batch b holds the same images as batch b of a one-process run
    with the same `batch_size`; DDP's gradient mean over ranks is then that batch's mean gradient (exactly when the
    shards are equal, i.e. all but possibly the last batch). torch's `DistributedSampler` instead deals out a
    different permutation (seed + epoch) round-robin, so a DDP run could not be compared with a single-process one.
    A last global batch that would leave some rank fewer than 2 images (BatchNorm cannot train on 1, and a rank with
    none would hang DDP's all-reduce) is dropped, as is any partial last batch with `drop_last`.
    """

    def __init__(self, base: RandomSampler, batch_size: int, rank: int, world_size: int, drop_last: bool = False):
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size {batch_size} is not divisible by the {world_size} torchrun "
                              f"processes; it is the global batch, each process takes batch_size / {world_size}")
        self.base, self.generator = base, base.generator
        self.batch_size, self.rank, self.world_size, self.drop_last = batch_size, rank, world_size, drop_last
        self.local_batch_size = batch_size // world_size
        self.epoch = 0
        n = len(base)
        last = n % batch_size
        self.n_global = n - last if last and (drop_last or last < 2 * world_size) else n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # the order comes from the generator, which engine.set_epoch seeds from (seed, epoch)

    def shard(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's [start, stop) of the global batch [start, stop): W near-equal contiguous pieces."""
        n = stop - start
        lo, hi = (n * self.rank) // self.world_size, (n * (self.rank + 1)) // self.world_size
        return start + lo, start + hi

    def __iter__(self):
        order = list(self.base)[: self.n_global]  # (N,) global order, identical on every rank
        for start in range(0, self.n_global, self.batch_size):
            lo, hi = self.shard(start, min(start + self.batch_size, self.n_global))
            yield from order[lo:hi]

    def __len__(self) -> int:
        full, last = divmod(self.n_global, self.batch_size)
        return full * self.local_batch_size + (self.shard(0, last)[1] - self.shard(0, last)[0] if last else 0)


def seed_worker(worker_id: int) -> None:
    """Seed python/numpy in a DataLoader worker from torch's per-worker seed (PyTorch reproducibility notes).

    Augmentation does not depend on it (views are seeded explicitly); this only covers third-party randomness.
    """
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    """DataLoader with a seeded shuffle: the same seed gives the same batch order, epoch after epoch.

    The sampler owns a generator seeded with `seed` that advances once per epoch, so epoch e's order is a function
    of (seed, e) only. It is separate from the loader's generator (which DataLoader draws worker base seeds from on
    every fresh iterator, but not on persistent workers' later epochs), so the order does not depend on
    `num_workers`. Workers are persistent (no re-fork per epoch) and forked on Linux so an `ImageCache` is shared,
    not copied. Under torchrun a shuffled loader is sharded (`ShardedRandomSampler`): `batch_size` stays the global
    batch, each rank loads `batch_size / world_size` of it.
    """
    sampler = None
    if shuffle:
        sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
        if distributed.world_size() > 1:  # torchrun: each rank trains on its shard of every (global) batch
            sampler = ShardedRandomSampler(sampler, batch_size, distributed.rank(), distributed.world_size(),
                                           drop_last=drop_last)
            batch_size, drop_last = sampler.local_batch_size, False  # the sampler already dropped what must go
    workers = num_workers > 0
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=seed_worker if workers else None,
        persistent_workers=workers, pin_memory=torch.cuda.is_available(),
        multiprocessing_context="fork" if workers and sys.platform.startswith("linux") else None,
    )
