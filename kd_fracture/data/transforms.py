"""Image geometry and augmentation for grayscale radiographs.

Two stages, so the expensive one can be cached:
1. `resize_pad` (deterministic): longest side -> `size`, zero-pad to a square. Its uint8 output is what
   `dataset.ImageCache` stores.
2. `build_transforms` (albumentations): augmentation + normalisation of the `(size, size)` uint8 image.

Augmentation is *replayable*: `apply_seeded(t, img, seed, key, view)` draws its randomness from
`np.random.SeedSequence([seed, key, view])` only, so view `v` of image `key` is the same picture in every process,
worker and call order. That is what lets the teacher's logits be computed once per view and replayed to the
student (docs/design.md §8).
"""
from __future__ import annotations

import os
import random
import zlib
from typing import Any

import cv2
import numpy as np

# albumentations asks PyPI for a newer version at import time (2 s timeout per import); the project runs offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402

from kd_fracture.errors import ConfigError  # noqa: E402

GRAY_MEAN, GRAY_STD = 0.449, 0.226
"""ImageNet channel means/stds averaged over RGB: a grayscale image normalised this way and replicated to 3 channels
looks to an ImageNet-pretrained network like a gray RGB image, so local pretrained weights stay usable."""

AUG_DEFAULTS: dict[str, Any] = {"hflip": 0.5, "rotate_limit": 10.0, "rrc_scale": (0.8, 1.0), "brightness_contrast": 0.2}
"""Keyword arguments of `build_transforms` that a config's `aug:` block may override."""


def resize_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Scale so the longest side is `size` (aspect kept), then zero-pad centrally to `(size, size)` uint8.

    `cv2.INTER_AREA` when shrinking (averages pixels, no aliasing of fine trabecular texture), `INTER_LINEAR` when
    enlarging. A (H, W) image with H > W becomes (size, round(W * size / H)) and is padded left/right.
    """
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"resize_pad expects a (H, W) uint8 image, got shape {img.shape} dtype {img.dtype}")
    h, w = img.shape
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        img = cv2.resize(img, (new_w, new_h), interpolation=interp)  # cv2 takes (width, height)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out = np.zeros((size, size), dtype=np.uint8)
    out[top : top + new_h, left : left + new_w] = img
    return out


def resolve_aug(aug: dict[str, Any] | None) -> dict[str, Any]:
    """Fill defaults into an `aug:` override dict; unknown keys are a ConfigError. Result is JSON-able (for hashes)."""
    aug = dict(aug or {})
    unknown = sorted(aug.keys() - AUG_DEFAULTS.keys())
    if unknown:
        raise ConfigError(f"aug: unknown keys {unknown}; valid keys are {sorted(AUG_DEFAULTS)}")
    resolved = AUG_DEFAULTS | aug
    resolved["rrc_scale"] = [float(s) for s in resolved["rrc_scale"]]
    for name in ("hflip", "rotate_limit", "brightness_contrast"):
        resolved[name] = float(resolved[name])
    return resolved


def build_transforms(
    img_size: int,
    train: bool,
    *,
    hflip: float = 0.5,
    rotate_limit: float = 10.0,
    rrc_scale: tuple[float, float] = (0.8, 1.0),
    brightness_contrast: float = 0.2,
) -> A.Compose:
    """Albumentations pipeline for a `resize_pad`-ed uint8 `(img_size, img_size)` image -> float32 `(H, W)`.

    train: HorizontalFlip(p=hflip) -> Rotate(U(-rotate_limit, rotate_limit) deg, zero border)
           -> RandomResizedCrop(img_size, scale=rrc_scale, aspect 3/4..4/3) -> RandomBrightnessContrast(±bc, p=0.5)
           -> Normalize.
    eval:  Normalize only, x' = (x / 255 - GRAY_MEAN) / GRAY_STD.
    A zero strength (hflip=0, rotate_limit=0, brightness_contrast=0, rrc_scale=(1, 1)) leaves that step out.
    """
    steps: list[A.BasicTransform] = []
    if train:
        lo, hi = rrc_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"aug.rrc_scale={list(rrc_scale)}: need 0 < low <= high <= 1")
        if hflip > 0:
            steps.append(A.HorizontalFlip(p=hflip))
        if rotate_limit > 0:
            steps.append(A.Rotate(limit=rotate_limit, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0))
        if lo < 1:
            steps.append(A.RandomResizedCrop(size=(img_size, img_size), scale=(lo, hi), p=1.0))
        if brightness_contrast > 0:
            steps.append(
                A.RandomBrightnessContrast(brightness_limit=brightness_contrast, contrast_limit=brightness_contrast)
            )
    steps.append(A.Normalize(mean=GRAY_MEAN, std=GRAY_STD, max_pixel_value=255.0))
    return A.Compose(steps)


def view_seed(seed: int, key: int, view: int) -> int:
    """64-bit seed for view `view` of image `key` under run seed `seed` (SeedSequence mixes the three words).

    Negative inputs (view -1) are mapped to their two's complement so SeedSequence accepts them.
    """
    words = [int(x) % (1 << 64) for x in (seed, key, view)]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])


def apply_seeded(transform: A.Compose, img: np.ndarray, seed: int, key: int, view: int) -> np.ndarray:
    """Apply `transform` to `img` with randomness fixed by (seed, key, view); returns float32 (H, W).

    Same arguments => identical output, independent of call order, process and DataLoader worker: the transform's
    generators are replaced before every call (not advanced), so no state leaks between images.
    """
    s = view_seed(seed, key, view)
    if hasattr(transform, "set_random_state"):  # albumentations >= 2: per-Compose generators
        transform.set_random_state(np.random.default_rng(s), random.Random(s))
        out = transform(image=img)["image"]
    else:  # albumentations 1.x draws from the global generators: seed them, then put the caller's state back
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(s)
            np.random.seed(s % (1 << 32))
            out = transform(image=img)["image"]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
    return np.ascontiguousarray(out, dtype=np.float32)


def image_key(image_path: str) -> int:
    """Stable 32-bit key of an image (CRC-32 of its manifest-relative path): same in every process and run."""
    return zlib.crc32(str(image_path).encode("utf-8")) & 0xFFFFFFFF
