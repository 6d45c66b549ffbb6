"""Augmentation of whole batches with torch ops, on the device the batch trains on (`data.aug_backend: torch`).

The CPU path (`transforms.build_transforms`, albumentations, one image at a time in the DataLoader) is the reference.
This path keeps its transforms, parameter ranges and order, and moves the pixel work to the GPU, where it is one
batched resampling instead of 4 OpenCV calls per image on a handful of CPU cores (MONAI's GPU transforms, timm's
PrefetchLoader). It runs on any device, so the CPU tests check it against the reference
(tests/test_batch_aug.py: parameter ranges exactly, pixel statistics within a stated tolerance).

Per image, in the reference's order:
  HorizontalFlip(p = hflip)
  → Rotate(θ ~ U(−rotate_limit, rotate_limit) degrees about the image centre, zero border)
  → RandomResizedCrop(area ~ U(scale) · S², log aspect ~ U(log 3/4, log 4/3), 10 tries, else the whole image)
  → RandomBrightnessContrast(p = 0.5: x ← clip(α·x + β, 0, 255), α = 1 + U(±bc), β = 255 · U(±bc))
  → Normalize((x / 255 − GRAY_MEAN) / GRAY_STD).
Differences, by design: flip, rotation and crop are composed into one affine map and resampled once (bilinear,
zero padding) where albumentations resamples twice and rounds to uint8 in between, so single pixels differ while
the distributions agree.

Parameters are drawn on the CPU, per image, by the DataLoader worker (`draw_params`), from
`np.random.default_rng(view_seed(seed, image key, view))`, as `transforms.apply_seeded` draws its own: view v of
image i is the same picture in every process, worker and batch, so cached teacher logits can still be replayed. Only
the uint8 image (S² bytes, a quarter of its float32 form) and 8 numbers cross to the device.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from kd_fracture.data.transforms import GRAY_MEAN, GRAY_STD, view_seed

PARAMS = ("flip", "angle", "x0", "y0", "w", "h", "alpha", "beta")
"""Per-image parameter vector (8,) float32: flip 0/1; rotation angle (degrees); crop box (x0, y0, w, h) in pixels of
the (S, S) rotated image; brightness/contrast α (gain) and β (offset, in grey levels 0..255)."""

RATIO = (3 / 4, 4 / 3)
"""RandomResizedCrop's aspect-ratio range (albumentations' and torchvision's default)."""


def identity_params(img_size: int) -> np.ndarray:
    """(8,) parameters of the clean view: no flip, no rotation, the whole image, α = 1, β = 0."""
    return np.array([0, 0, 0, 0, img_size, img_size, 1, 0], dtype=np.float32)


def draw_params(img_size: int, seed: int, key: int, view: int, *, hflip: float, rotate_limit: float,
                rrc_scale: tuple[float, float], brightness_contrast: float) -> np.ndarray:
    """(8,) parameters of view `view` of image `key`, drawn as albumentations draws them (see the module docstring).

    A zero strength leaves its step out, as `build_transforms` does, and draws nothing for it."""
    rng = np.random.default_rng(view_seed(seed, key, view))
    p = identity_params(img_size)
    size = float(img_size)
    if hflip > 0:
        p[0] = float(rng.random() < hflip)
    if rotate_limit > 0:
        p[1] = rng.uniform(-rotate_limit, rotate_limit)
    lo, hi = rrc_scale
    if lo < 1:
        area = size * size
        for _ in range(10):
            target = rng.uniform(lo * area, hi * area)
            aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= img_size and 0 < h <= img_size:
                y0 = int((img_size - h + 1) * rng.random())  # albumentations' get_crop_coords
                x0 = int((img_size - w + 1) * rng.random())
                p[2:6] = (x0, y0, w, h)
                break  # else: the whole image (a square image is inside the ratio range)
    if brightness_contrast > 0 and rng.random() < 0.5:
        p[6] = 1.0 + rng.uniform(-brightness_contrast, brightness_contrast)
        p[7] = 255.0 * rng.uniform(-brightness_contrast, brightness_contrast)
    return p


def affine_theta(params: torch.Tensor, img_size: int) -> torch.Tensor:
    """(B, 8) parameters → (B, 2, 3) `F.affine_grid` matrices (normalised coordinates, align_corners=False) that map
    an output pixel to where it is read in the input: output → crop box → un-rotate about the centre → un-flip."""
    p = params.to(torch.float64)
    b, s = len(p), float(img_size)
    flip, angle, x0, y0, w, h = (p[:, i] for i in range(6))
    eye = torch.eye(3, dtype=torch.float64, device=p.device).expand(b, 3, 3)
    c = (s - 1) / 2  # the centre of pixel-centre coordinates 0..S−1
    # output pixel u ↦ crop-frame pixel x0 + (u + 0.5)·w/S − 0.5 (cv2.resize's sampling of the crop)
    crop = eye.clone()
    crop[:, 0, 0], crop[:, 1, 1] = w / s, h / s
    crop[:, 0, 2], crop[:, 1, 2] = x0 + 0.5 * w / s - 0.5, y0 + 0.5 * h / s - 0.5
    # rotated-image pixel ↦ flipped-image pixel: rotation by −θ about the centre (θ's sign is immaterial, U(±limit))
    t = torch.deg2rad(angle)
    cos, sin = torch.cos(t), torch.sin(t)
    rot = eye.clone()
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = cos, sin, -sin, cos
    rot[:, 0, 2], rot[:, 1, 2] = c - cos * c - sin * c, c + sin * c - cos * c
    # flipped-image pixel ↦ input pixel: x ↦ S − 1 − x where flip
    unflip = eye.clone()
    unflip[:, 0, 0] = 1 - 2 * flip
    unflip[:, 0, 2] = flip * (s - 1)
    pixel = unflip @ rot @ crop  # (B, 3, 3), output pixel → input pixel
    # to normalised coordinates: x_n = (2x + 1)/S − 1 on both sides
    to_norm = eye.clone()
    to_norm[:, 0, 0] = to_norm[:, 1, 1] = 2 / s
    to_norm[:, 0, 2] = to_norm[:, 1, 2] = 1 / s - 1
    from_norm = torch.linalg.inv(to_norm)
    return (to_norm @ pixel @ from_norm)[:, :2].to(torch.float32)


def augment_batch(images: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
    """(B, C, S, S) uint8 + (B, 8) parameters (None: the clean view) → (B, C, S, S) float32, normalised.

    Runs where `images` is; every channel of an image gets the same parameters (replicated grayscale)."""
    x = images.float()  # grey levels 0..255
    if params is not None:
        params = params.to(x.device)
        b, _, s, _ = x.shape
        theta = affine_theta(params, s)
        geometric = ~((params[:, 0] == 0) & (params[:, 1] == 0) & (params[:, 2] == 0) & (params[:, 3] == 0)
                      & (params[:, 4] == s) & (params[:, 5] == s))
        if bool(geometric.any()):
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            x = torch.where(geometric[:, None, None, None], warped, x)
        alpha, beta = params[:, 6].view(b, 1, 1, 1), params[:, 7].view(b, 1, 1, 1)
        x = (x * alpha + beta).clamp_(0, 255)
    return x.div_(255.0).sub_(GRAY_MEAN).div_(GRAY_STD)
