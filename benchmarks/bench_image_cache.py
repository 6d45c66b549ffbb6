"""Benchmark 2, `image_cache`: loader epoch 2, PIL + torchvision decoding every PNG ÷ the decoded-image cache."""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from common import Context, Figure, Result, make_loader, paired, ratio_median


class NaiveDataset:
    """The loader a first version would write: every access decodes the PNG (PIL) and transforms it (torchvision v2).

    PIL decode → grayscale → resize (long side = S, aspect kept) → zero-pad to S×S (CenterCrop pads) → hflip,
    rotate ±10°, RandomResizedCrop(0.8–1), brightness/contrast ±0.2 → float tensor, normalised, replicated to
    `in_chans`: the same augmentation family as `transforms.build_transforms`, so only the decoding strategy and
    the library differ.
    """

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, img_size: int, in_chans: int):
        import torch
        from torchvision.transforms import v2

        from kd_fracture.data.transforms import GRAY_MEAN, GRAY_STD

        self.paths, self.labels, self.size, self.in_chans = list(paths), labels, img_size, in_chans
        self.tf = v2.Compose([
            v2.CenterCrop(img_size), v2.RandomHorizontalFlip(), v2.RandomRotation(10),
            v2.RandomResizedCrop(img_size, scale=(0.8, 1.0), antialias=True), v2.ColorJitter(0.2, 0.2),
            v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([GRAY_MEAN], [GRAY_STD])])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        import torch
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            img = im.convert("L")
        scale = self.size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
        x = self.tf(img)  # (1, S, S) float32
        return {"image": x.expand(self.in_chans, -1, -1).contiguous(), "label": torch.tensor(self.labels[i])}


def run(ctx: Context) -> Result:
    """Loader-only epoch 2 (every batch produced, no model): naive PIL + torchvision loader ÷ the project's loader
    with its decoded-image cache. A third arm, the project's loader without the cache (cv2 decode + resize_pad
    every time), separates what the cache buys from what the library choice buys."""
    from torch.utils.data import DataLoader

    from kd_fracture.data.dataset import seed_worker

    s, res = ctx.settings, Result()
    rows = ctx.train_rows(s.cache_images)
    t0 = time.perf_counter()
    cached = make_loader(ctx, rows, s.cache_img_size, s.cache_batch, in_chans=3)
    build_s = time.perf_counter() - t0  # decoding every image once into the cache = "epoch 1"
    uncached = make_loader(ctx, rows, s.cache_img_size, s.cache_batch, in_chans=3, cache=False)
    naive_ds = NaiveDataset([ctx.manifest.root / p for p in rows["image_path"]], rows["label"].to_numpy(np.float32),
                            s.cache_img_size, in_chans=3)
    naive = DataLoader(naive_ds, batch_size=s.cache_batch, shuffle=True, num_workers=s.num_workers,
                       worker_init_fn=seed_worker if s.num_workers else None, persistent_workers=s.num_workers > 0)
    arms = {"naive": naive, "cached": cached, "uncached": uncached}
    for loader in arms.values():  # epoch 1: page cache warm, workers started
        drain(loader)
    times = paired({name: (lambda ld=ld: drain(ld)) for name, ld in arms.items()}, s.repeats)
    n = len(rows)
    res.figures.append(Figure(
        "2", "decoded-image cache, epoch-2 speed-up", ratio_median(times["naive"], times["cached"]), 2.0, ">=",
        "× (naive ÷ cached)",
        meaning="a loader epoch decoding every PNG with PIL + torchvision takes this multiple of the cached one",
        details={"naive_s": statistics.median(times["naive"]), "cached_s": statistics.median(times["cached"]),
                 "uncached_project_s": statistics.median(times["uncached"]), "per_repeat": times, "images": n,
                 "img_size": s.cache_img_size, "source_px": s.phantom_size, "num_workers": s.num_workers}))
    res.measure("cache speed-up over the project's own uncached loader",
                ratio_median(times["uncached"], times["cached"]), "×")
    res.measure("cached loader, ms per image", 1000 * statistics.median(times["cached"]) / n, "ms")
    res.measure("naive loader, ms per image", 1000 * statistics.median(times["naive"]) / n, "ms")
    res.measure("cache build (decode once), ms per image", 1000 * build_s / n, "ms")
    res.measure("cache memory per image", s.cache_img_size ** 2, "bytes")
    return res


def drain(loader) -> None:
    for _ in loader:
        pass
