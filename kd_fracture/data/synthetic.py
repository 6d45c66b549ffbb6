"""Synthetic phantom: a procedurally drawn, MURA-v1.1-layout dataset of stylised musculoskeletal radiographs.

This is the project's embedded default dataset (docs/design.md §2). It is **not** real data: it exists so that every
command runs end to end, deterministically, on a laptop without downloading MURA (Rajpurkar et al. 2017).

Layout written by `generate_phantom(out, ...)` (exactly MURA v1.1's, so it goes through the same loader)::

    out/MURA-v1.1/{train,valid}/XR_<PART>/patientNNNNN/study<k>_{positive|negative}/image<j>.png
    out/MURA-v1.1/{train,valid}_image_paths.csv      one column, paths relative to `out`
    out/MURA-v1.1/{train,valid}_labeled_studies.csv  "<study dir>/,<label>", label 1 = abnormal
    out/MURA-v1.1/SYNTHETIC_PHANTOM.json             parameters + counts; also the completion marker

Image model. Each patient's bones are drawn once in a canonical frame (x right, y down, a view shows about
[-1, 1]^2); each study adds its fracture; each view is an affine projection of that:
    attenuation  mu(x) = w_t T(x) + B(x) + v D(x)
        T: soft-tissue envelope (the bones' silhouette dilated by the tissue margin and smoothed)
        B: sum over bones of a cortical shell (value rho) around a medullary cavity (0.35 rho), times a trabecular
           texture, minus growth-plate / nutrient-canal lucencies (thin dark lines in BOTH classes: distractors)
        D: abnormal studies only: fractured-minus-intact bone (jagged crack, displaced, angulated, fragment) plus
           soft-tissue swelling and callus, or metal (hardware: plate + screws, screws, K-wire)
        v: per-view visibility: 0 with probability 1 - P_VISIBLE, else U(0.6, 1); metal always shows
    detector     I = 1 - exp(-g mu), Gaussian blur, standardised to a random mean and standard deviation
                 (auto-windowing), heel-effect gradient, gamma, then noise with sigma(I) = a sqrt(I) + b
                 (Poisson-like quantum noise plus read noise), quantised to uint8.
Every sign of a fracture scales with its conspicuity c = 1 - subtlety, subtlety = U(0, 1)^4 per study (most
fractures are visible, about 16 % are subtle, some nearly invisible). Views differ in rotation (±20°), foreshortening
(lateral views are narrower), zoom, shift, exposure and noise. Abnormal and normal images have matched global intensity
statistics (a logistic model on mean / std / bright fraction scores AUROC ~0.5).

Calibration (generator v3, 64 px; `benchmarks/phantom_learnability.py`): a 4-block CNN with global max pooling
trained 14 epochs (about a CPU minute) on 300 patients' train/ images and scored on 150 unseen patients reaches
study-level Cohen's kappa 0.50, AUROC 0.82 (study probability = mean over views >= 0.5); the global-statistics
logistic model scores image AUROC 0.50. A ResNet-50 from scratch needs far more steps than that (README, Results).

Determinism: patient i is drawn from `np.random.SeedSequence([seed, i])` only, split into a plan stream (studies,
labels, subtlety, views) and a drawing stream. The output bytes depend on (patients, size, seed, holdout_frac,
abnormal_frac), not on `workers`; paths and labels do not depend on `size` (nor on drawing changes).
Pixels use float32 numpy / OpenCV, so bytes can differ between CPUs or library versions; paths and labels cannot.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np

from kd_fracture.errors import UserError
from kd_fracture.io import atomic_path, write_json, write_text

BODY_PARTS = ("XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST")
GENERATOR_VERSION = 3
"""Bump when the drawing changes, so cached phantoms (`ensure_default_phantom`) are regenerated."""
MARKER_NAME = "SYNTHETIC_PHANTOM.json"
"""Written inside MURA-v1.1/ before the tree is renamed into place: present <=> the tree is complete."""

DEFAULT_HOLDOUT_FRAC = 0.15
DEFAULT_ABNORMAL_FRAC = 0.4
P_VISIBLE = 0.95
"""Probability that the fracture of an abnormal study shows in a given view."""
STUDIES_PER_PATIENT = ((1, 2, 3), (0.65, 0.25, 0.10))
VIEWS_PER_STUDY = ((1, 2, 3, 4), (0.12, 0.43, 0.30, 0.15))
FRACTURE_KINDS = (("crack", 0.05), ("displaced", 0.25), ("angulated", 0.2), ("fragment", 0.1), ("hardware", 0.4))
"""Abnormal study kinds and their probabilities. Weighted towards signs visible at 64 px (metal, displacement,
angulation), the ones a from-scratch ResNet-50 starts to pick up within a few CPU minutes; hairline cracks it does not
(the v2 mix 0.25/0.25/0.15/0.15/0.2 left it at chance after 10 epochs; v3 lifts it only slightly, README Results)."""
SUBTLETY_POWER = 4.0
"""Per-study subtlety = U(0, 1) ** SUBTLETY_POWER: most fractures are clear, about 16 % are subtle (> 0.5)."""
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]

_CANVAS_EXTENT = 1.5
"""Canonical half-width of the per-patient canvas; a view shows roughly [-1, 1] of it (more when zoomed out)."""
_FIXED = 16
"""OpenCV drawing uses 4 fractional bits (shift=4): sub-pixel geometry at any image size."""


# ---------------------------------------------------------------------------------------------------------------
# Anatomy: bones in the canonical frame (x right, y down, the view shows about [-1, 1]^2)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Bone:
    """A bone as a union of primitives: a tapered polyline shaft plus ellipses (epiphyses, heads, carpals).

    Geometry is kept in plain Python floats: a hand has ~27 bones of a few primitives each, and per-primitive
    numpy calls would cost more than the drawing itself.
    """

    axis: list[tuple[float, float]]
    """Shaft centre line, proximal to distal; empty for a bone made of ellipses only."""
    radius: list[float]
    """Shaft half-width at each axis point."""
    bulbs: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    """Ellipses (cx, cy, semi_axis_along, semi_axis_across, angle_deg)."""
    physes: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)
    """Growth plates (centre, unit direction across the bone, half-length): drawn only in young patients."""
    density: float = 1.0
    """Attenuation multiplier: flat bones seen face-on (scapula, ribs) are fainter."""
    fracturable: bool = True
    caps: tuple[bool, bool] = (True, True)
    """Round caps at the first / last axis point; False where an epiphysis ellipse closes the end instead."""

    def segments(self) -> list[tuple[float, float, float, float, float, float, float]]:
        """(x0, y0, x1, y1, length, r0, r1) per shaft segment."""
        return [(x0, y0, x1, y1, math.hypot(x1 - x0, y1 - y0), r0, r1) for (x0, y0), (x1, y1), r0, r1
                in zip(self.axis, self.axis[1:], self.radius, self.radius[1:])]

    def extent(self, grow: float = 0.0) -> tuple[float, float, float, float]:
        """Canonical bounding box (x_lo, y_lo, x_hi, y_hi) of the bone dilated by `grow`."""
        boxes = [(x, y, r + grow) for (x, y), r in zip(self.axis, self.radius)]
        boxes += [(cx, cy, max(along, across) + grow) for cx, cy, along, across, _ in self.bulbs]
        return (min(x - r for x, _, r in boxes), min(y - r for _, y, r in boxes),
                max(x + r for x, _, r in boxes), max(y + r for _, y, r in boxes))


@dataclass(frozen=True)
class Patient:
    """Per-patient anatomy, shared by all of a patient's studies."""

    body_part: str
    thick: float
    """Bone half-width multiplier."""
    cortex: float
    """Cortical thickness as a fraction of the shaft half-width."""
    density: float
    tissue: float
    """Soft-tissue attenuation w_t."""
    margin: float
    """Soft-tissue thickness around the bones (canonical units)."""
    young: bool
    """Open growth plates: dark transverse lines near bone ends in every study (a distractor, not a label)."""
    mirror: float
    """+1 right side, -1 left side (x flipped in every view)."""
    shape: tuple[float, ...]
    """Standard-normal jitter for this patient's proportions (indexed by the body-part builders)."""


def sample_patient(rng: np.random.Generator, body_part: str) -> Patient:
    """Draw one patient's anatomy parameters."""
    if body_part not in BODY_PARTS:
        raise UserError(f"unknown body part '{body_part}'; choose one of {', '.join(BODY_PARTS)}")
    return Patient(
        body_part=body_part,
        thick=float(rng.uniform(0.8, 1.2)),
        cortex=float(rng.uniform(0.25, 0.42)),
        density=float(rng.uniform(0.8, 1.15)),
        tissue=float(rng.uniform(0.18, 0.38)),
        margin=float(rng.uniform(0.12, 0.32)),
        young=bool(rng.random() < 0.25),
        mirror=float(rng.choice((-1.0, 1.0))),
        shape=tuple(float(v) for v in rng.standard_normal(8)),
    )


def _unit(angle_deg: float) -> np.ndarray:
    """Direction at `angle_deg` clockwise from 'up' (-y) in image coordinates."""
    a = math.radians(angle_deg)
    return np.array([math.sin(a), -math.cos(a)])


def _long_bone(p, q, r0: float, r1: float | None = None, *, bow: float = 0.0, head=None, tail=None,
               young: bool = False, density: float = 1.0, fracturable: bool = True) -> Bone:
    """Shaft from p to q (bowed sideways by `bow` x length) with optional end ellipses.

    head / tail: (semi_axis_along, semi_axis_across) of the epiphysis at p / q; a young patient gets a physis
    (growth plate) line where each epiphysis meets the shaft.
    """
    (px, py), (qx, qy) = (float(v) for v in p), (float(v) for v in q)
    r1 = r0 if r1 is None else r1
    length = math.hypot(qx - px, qy - py)
    ux, uy = (qx - px) / length, (qy - py) / length
    angle = math.degrees(math.atan2(uy, ux))
    # An epiphysis ellipse ends exactly at p (q); the shaft stops at the ellipse centre, where the ellipse is at
    # least as wide as the shaft, so nothing pokes out and neighbouring bones keep their joint gap.
    if head is not None:
        px, py = px + ux * head[0], py + uy * head[0]
    if tail is not None:
        qx, qy = qx - ux * tail[0], qy - uy * tail[0]
    axis, radius = [(px, py), (qx, qy)], [r0, r1]
    if bow:
        axis.insert(1, ((px + qx) / 2 - bow * length * uy, (py + qy) / 2 + bow * length * ux))
        radius.insert(1, (r0 + r1) / 2)
    bone = Bone(axis=axis, radius=[float(r) for r in radius], density=density, fracturable=fracturable,
                caps=(head is None, tail is None))
    u, n = np.array([ux, uy]), np.array([-uy, ux])
    for (cx, cy), sign, r, bulb in (((px, py), 1.0, r0, head), ((qx, qy), -1.0, r1, tail)):
        if bulb is None:
            continue
        along, across = (float(v) for v in bulb)
        bone.bulbs.append((cx, cy, along, across, angle))
        if young:
            bone.physes.append((np.array([cx, cy]) + sign * u * along * 0.75, n, max(0.65 * across, r) * 0.95))
    return bone


def _ellipse_bone(c, along: float, across: float, angle: float, density: float = 1.0) -> Bone:
    return Bone(axis=[], radius=[], bulbs=[(float(c[0]), float(c[1]), float(along), float(across), float(angle))],
                density=density, fracturable=False)


def _chain(start, angle: float, lengths, radii, gap: float, young: bool,
           tuft: bool = True) -> tuple[list[Bone], np.ndarray]:
    """Phalanges (or metacarpal + phalanges) end to end from `start` along `angle`, separated by joint gaps."""
    bones, p, u = [], np.asarray(start, float), _unit(angle)
    for i, (length, r) in enumerate(zip(lengths, radii)):
        q = p + u * length
        last = i == len(lengths) - 1
        tail = (0.45 * r, 1.05 * r) if (last and tuft) else (0.6 * r, 1.2 * r)
        bones.append(_long_bone(p, q, r, 0.85 * r, head=(0.55 * r, 1.3 * r), tail=tail, young=young))
        p = q + u * gap
    return bones, p


def _carpals(rng, center, scale: float, thick: float) -> list[Bone]:
    """Two rows of four small carpal bones (scaphoid ... hamate) as jittered ellipses."""
    rows = ((0.18, (-0.33, -0.11, 0.1, 0.29)), (-0.12, (-0.3, -0.1, 0.09, 0.27)))  # (dy, xs) proximal, distal
    bones = []
    for dy, xs in rows:
        for x in xs:
            c = np.asarray(center) + scale * np.array([x + rng.normal(0, 0.015), dy + rng.normal(0, 0.015)])
            a = scale * thick * rng.uniform(0.085, 0.12)
            b = scale * thick * rng.uniform(0.075, 0.1)
            bones.append(_ellipse_bone(c, a, b, rng.uniform(0, 180), density=0.9))
    return bones


def _forearm(rng, p: Patient) -> list[Bone]:
    s, t = p.shape, p.thick
    end = 1.25 + 0.15 * s[0]
    return [
        _long_bone((-0.3 + 0.03 * s[1], -1.9), (-0.3, end), 0.11 * t, 0.13 * t, bow=-0.025,
                   tail=(0.12 * t, 0.2 * t), young=p.young),  # radius, flared distal end
        _long_bone((0.27 + 0.03 * s[2], -1.9), (0.26, end + 0.05), 0.1 * t, 0.085 * t, bow=0.01,
                   tail=(0.09 * t, 0.1 * t), young=p.young),  # ulna
    ]


def _humerus(rng, p: Patient) -> list[Bone]:
    s, t = p.shape, p.thick
    top, bottom = -0.95 + 0.05 * s[0], 1.05 + 0.05 * s[1]
    shaft = _long_bone((0, top), (0.02, bottom), 0.14 * t, 0.15 * t, bow=0.01, tail=(0.12 * t, 0.33 * t),
                       young=p.young)
    shaft.bulbs.append((-0.07, top - 0.02, 0.28 * t, 0.27 * t, 0.0))  # humeral head, set medially
    return [
        shaft,
        _ellipse_bone((0.14, top + 0.05), 0.11 * t, 0.13 * t, 20),  # greater tuberosity
        _ellipse_bone((-0.46, top - 0.02), 0.07, 0.24, 0, density=0.8),  # glenoid rim
        _long_bone((-0.5, top + 0.1), (-0.95, top + 1.2), 0.06, 0.04, density=0.5, fracturable=False),  # scapula
        _long_bone((-0.12, bottom + 0.17), (-0.2, 1.9), 0.07 * t, head=(0.08, 0.09), fracturable=False),  # forearm
        _long_bone((0.12, bottom + 0.17), (0.18, 1.9), 0.065 * t, head=(0.11, 0.1), fracturable=False),
    ]


def _elbow(rng, p: Patient) -> list[Bone]:
    s, t = p.shape, p.thick
    flex = rng.uniform(-10, 45)  # flexion of the forearm about the joint
    joint = np.array([0.0, 0.02 * s[0]])
    humerus = _long_bone((0.0, -1.9), joint + (0, -0.07), 0.15 * t, 0.2 * t, tail=(0.14 * t, 0.36 * t),
                         young=p.young)
    u = _unit(180 + flex)
    n = np.array([-u[1], u[0]])
    ulna_start = joint + 0.12 * n + 0.02 * u
    radius_start = joint - 0.14 * n + 0.06 * u
    return [
        humerus,
        _long_bone(ulna_start, ulna_start + 2.0 * u, 0.1 * t, 0.08 * t, head=(0.15 * t, 0.13 * t), young=p.young),
        _long_bone(radius_start, radius_start + 2.0 * u, 0.085 * t, 0.1 * t, head=(0.07 * t, 0.13 * t),
                   young=p.young),
    ]


def _shoulder(rng, p: Patient) -> list[Bone]:
    s, t = p.shape, p.thick
    abd = rng.uniform(-8, 15)  # arm abduction
    head_c = np.array([0.18 + 0.03 * s[0], -0.05])
    shaft_dir = _unit(180 - 10 - abd)
    humerus = _long_bone(head_c + 0.1 * shaft_dir, head_c + 2.2 * shaft_dir, 0.15 * t, young=p.young)
    humerus.bulbs.append((head_c[0], head_c[1], 0.33 * t, 0.31 * t, 0.0))
    bones = [
        humerus,
        _ellipse_bone(head_c + (0.22, 0.12), 0.12 * t, 0.14 * t, 10),  # greater tuberosity
        _ellipse_bone((head_c[0] - 0.43, -0.05), 0.07, 0.25, -8, density=0.9),  # glenoid
        _long_bone((head_c[0] - 0.45, 0.1), (-0.9, 1.3), 0.2, 0.08, density=0.45, fracturable=False),  # scapula
        _long_bone((-1.9, -0.95 + 0.05 * s[1]), (0.3, -0.62), 0.07 * t, bow=0.04, young=False),  # clavicle
        _long_bone((-0.35, -0.52), (0.35, -0.42), 0.06, density=0.8, fracturable=False),  # acromion
    ]
    for k in range(3):  # ribs: faint curved arcs behind the scapula
        y = 0.25 + 0.45 * k + 0.05 * s[2]
        bones.append(_long_bone((-1.9, y + 0.3), (-0.45, y - 0.1), 0.04, bow=0.12, density=0.35,
                                fracturable=False))
    return bones


def _wrist(rng, p: Patient) -> list[Bone]:
    t = p.thick
    dev = rng.uniform(-10, 10)  # radial / ulnar deviation
    bones = [
        _long_bone((-0.22, 1.9), (-0.2, 0.5), 0.12 * t, 0.17 * t, tail=(0.1 * t, 0.25 * t), young=p.young),
        _long_bone((0.3, 1.9), (0.3, 0.55), 0.09 * t, 0.08 * t, tail=(0.08 * t, 0.09 * t), young=p.young),
    ]
    bones += _carpals(rng, (0.0, 0.08), 1.0, t)
    for i, x in enumerate((-0.36, -0.16, 0.0, 0.15, 0.3)):
        a = dev + (-38 if i == 0 else -10 + 5 * i)
        start = np.array([x, -0.22 if i else 0.0])
        length = 0.5 if i == 0 else 1.5
        bones.append(_long_bone(start, start + length * _unit(a), 0.06 * t, 0.05 * t,
                                head=(0.04 * t, 0.08 * t), young=p.young))
    return bones


def _hand(rng, p: Patient) -> list[Bone]:
    s, t = p.shape, p.thick
    spread = rng.uniform(0.6, 1.3)  # finger spread
    bones = _carpals(rng, (0.0, 0.98), 0.7, t)
    fingers = ((-0.24, -12, (0.6, 0.38, 0.23, 0.15)), (-0.08, -4, (0.62, 0.42, 0.27, 0.16)),
               (0.08, 4, (0.57, 0.4, 0.25, 0.16)), (0.23, 12, (0.52, 0.32, 0.2, 0.14)))
    for x, a, lengths in fingers:
        lengths = tuple(l * (1 + 0.04 * s[0]) for l in lengths)
        radii = (0.068 * t, 0.057 * t, 0.047 * t, 0.04 * t)  # metacarpal, proximal, middle, distal phalanx
        chain, _ = _chain((x, 0.78), a * spread, lengths, radii, 0.05, p.young)
        bones += chain
    chain, _ = _chain((-0.32, 0.8), -42 * spread - 5, (0.4, 0.3, 0.2), (0.072 * t, 0.06 * t, 0.047 * t), 0.05,
                      p.young)  # thumb
    return bones + chain


def _finger(rng, p: Patient) -> list[Bone]:
    s, t = p.shape, p.thick
    bend = rng.uniform(-8, 8)
    bones, end = _chain((0.0, 1.9), bend, (0.85 + 0.05 * s[0],), (0.17 * t,), 0.12, p.young, tuft=False)
    chain, _ = _chain(end, bend, (0.85, 0.55, 0.38), (0.15 * t, 0.13 * t, 0.11 * t), 0.1, p.young)
    bones += chain
    for side in (-1, 1):  # neighbouring fingers at the edges
        nb, _ = _chain((side * 0.95, 1.9), bend - side * 6, (1.2, 0.85, 0.5), (0.14 * t, 0.12 * t, 0.1 * t),
                       0.1, p.young)
        for b in nb:
            b.fracturable = False
        bones += nb
    return bones


_BUILDERS = {"XR_ELBOW": _elbow, "XR_FINGER": _finger, "XR_FOREARM": _forearm, "XR_HAND": _hand,
             "XR_HUMERUS": _humerus, "XR_SHOULDER": _shoulder, "XR_WRIST": _wrist}


# ---------------------------------------------------------------------------------------------------------------
# Drawing: canonical canvas -> per-patient anatomy -> per-study layers -> views
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Canvas:
    """Pixel mapping of the drawing canvas, or of a window into it (one bone's bounding box)."""

    size: int
    """Side of the full canvas in pixels; pixel centres at integers, canonical 0 at (size - 1) / 2."""
    k: float
    """Pixels per canonical unit."""
    origin: tuple[int, int] = (0, 0)
    """(x0, y0) of this window in full-canvas pixels."""

    def px(self, pts) -> np.ndarray:
        return (self.size - 1) / 2 + self.k * np.asarray(pts, float) - np.asarray(self.origin, float)

    def fx(self, pts) -> np.ndarray:
        """Fixed-point (shift=4) int32 pixel coordinates for cv2 drawing."""
        return np.round(self.px(pts) * _FIXED).astype(np.int32)

    def fl(self, length: float) -> int:
        """Fixed-point length (radii, semi-axes)."""
        return max(1, int(round(length * self.k * _FIXED)))

    def window(self, bone: Bone, grow: float = 0.0) -> tuple[_Canvas, tuple[slice, slice]] | None:
        """Sub-canvas covering the bone (None if it lies outside): drawing a bone costs its area, not C^2."""
        x_lo, y_lo, x_hi, y_hi = bone.extent(grow)
        c, n = (self.size - 1) / 2, self.size
        x0, y0 = (min(n, max(0, math.floor(c + self.k * v))) for v in (x_lo, y_lo))
        x1, y1 = (min(n, max(0, math.ceil(c + self.k * v) + 2)) for v in (x_hi, y_hi))
        if x1 - x0 < 2 or y1 - y0 < 2:
            return None
        return _Canvas(self.size, self.k, (x0, y0)), (slice(y0, y1), slice(x0, x1))


def _draw_union(img: np.ndarray, cv: _Canvas, bone: Bone, value: float, scale: float, bulb_scale: float) -> None:
    """Fill the union of a bone's primitives with radii r * scale (ellipse semi-axes a * bulb_scale)."""
    k = cv.k * _FIXED  # canonical -> fixed-point pixels
    ox, oy = ((cv.size - 1) / 2 - cv.origin[0]) * _FIXED, ((cv.size - 1) / 2 - cv.origin[1]) * _FIXED
    for x0, y0, x1, y1, length, r0, r1 in bone.segments():  # tapered quad per shaft segment
        nx, ny = -(y1 - y0) / length, (x1 - x0) / length
        a, b = r0 * scale, r1 * scale
        quad = [(x0 + nx * a, y0 + ny * a), (x1 + nx * b, y1 + ny * b), (x1 - nx * b, y1 - ny * b),
                (x0 - nx * a, y0 - ny * a)]
        cv2.fillConvexPoly(img, np.array([(round(x * k + ox), round(y * k + oy)) for x, y in quad], np.int32),
                           value, cv2.LINE_8, 4)
    last = len(bone.axis) - 1
    for i, ((x, y), r) in enumerate(zip(bone.axis, bone.radius)):  # round joints and uncapped ends
        if (0 < i < last) or (i == 0 and bone.caps[0]) or (i == last and bone.caps[1]):
            cv2.circle(img, (round(x * k + ox), round(y * k + oy)), max(1, round(r * scale * k)), value,
                       -1, cv2.LINE_8, 4)
    for cx, cy, along, across, angle in bone.bulbs:
        axes = (max(1, round(along * bulb_scale * k)), max(1, round(across * bulb_scale * k)))
        cv2.ellipse(img, (round(cx * k + ox), round(cy * k + oy)), axes, angle, 0, 360, value, -1, cv2.LINE_8, 4)


_MEDULLA = 0.35
"""Medullary attenuation relative to cortex: the cortical rim is the brightest part of a bone."""


def _draw_bone(win: tuple[_Canvas, tuple[slice, slice]], bone: Bone, patient: Patient) -> np.ndarray:
    """One bone's attenuation in window `win`: a cortical shell of value rho around a medullary cavity."""
    sub, (rows, cols) = win
    img = np.zeros((rows.stop - rows.start, cols.stop - cols.start), np.float32)
    rho = patient.density * bone.density
    _draw_union(img, sub, bone, rho, 1.0, 1.0)
    _draw_union(img, sub, bone, rho * _MEDULLA, 1.0 - patient.cortex, 1.0 - 0.5 * patient.cortex)
    return img


def _line(img: np.ndarray, cv: _Canvas, centre, direction, half_length: float, value: float,
          width_px: float) -> None:
    """Overwrite a straight line of `width_px` canvas pixels (at least 1) centred on `centre` (canonical)."""
    a, b = centre - direction * half_length, centre + direction * half_length
    cv2.line(img, tuple(cv.fx(a).tolist()), tuple(cv.fx(b).tolist()), value, max(1, int(round(width_px))),
             cv2.LINE_8, 4)


def _arc_point(bone: Bone, t: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Point, unit direction and half-width at fraction t of the shaft's arc length."""
    segments = bone.segments()
    s = t * sum(seg[4] for seg in segments)
    for x0, y0, x1, y1, length, r0, r1 in segments:
        if s <= length:
            break
        s -= length
    f = min(s / length, 1.0)
    point = np.array([x0 + f * (x1 - x0), y0 + f * (y1 - y0)])
    return point, np.array([x1 - x0, y1 - y0]) / length, r0 + f * (r1 - r0)


def _fracture(rng: np.random.Generator, cv: _Canvas, bone_img: np.ndarray, point, u, r: float, kind: str,
              subtlety: float, px_out: float) -> tuple[np.ndarray, np.ndarray]:
    """Fractured version of one bone's image and an extra attenuation layer, both shaped like `bone_img`.

    `cv`: the (window) canvas `bone_img` is drawn on. `point`, `u`, `r`: canonical fracture site, bone direction
    there and bone half-width. `px_out`: canvas pixels per view pixel, so widths are set in view pixels.
    Conspicuity c = 1 - subtlety scales every sign: line contrast (0.2 + 0.85 c of the bone's attenuation), gap
    width (0.6 + up to 3 c view px), displacement (up to 1.45 r), angulation (up to 20 deg), fragment size and
    callus; at subtlety ~1 a crack is a ~0.6 px line at ~20% contrast. The extra layer holds what is not bone:
    callus (healing fractures) and metal (hardware).
    """
    conspicuity = 1.0 - subtlety
    extra = np.zeros_like(bone_img)
    e = np.array([-u[1], u[0]])  # across the bone
    psi = math.radians(rng.uniform(-35, 35))  # obliquity of the fracture line
    across = math.cos(psi) * e + math.sin(psi) * u
    normal = np.array([across[1], -across[0]])
    normal *= np.sign(normal @ u)  # points distally
    p_px, r_px = cv.px(point), r * cv.k
    ys, xs = np.indices(bone_img.shape, dtype=np.float32)
    xs -= np.float32(p_px[0])
    ys -= np.float32(p_px[1])
    dist = xs * np.float32(normal[0]) + ys * np.float32(normal[1])  # signed distance to the fracture line
    along = xs * np.float32(across[0]) + ys * np.float32(across[1])
    shape = bone_img.shape[::-1]
    centre = (float(p_px[0]), float(p_px[1]))

    contrast = min(1.0, (0.2 + 0.85 * conspicuity) * rng.uniform(0.85, 1.05))
    gap = px_out * (0.6 + 3.0 * conspicuity * rng.uniform(0.7, 1.0))
    out = bone_img
    if kind in ("displaced", "angulated"):
        distal = np.clip(dist + 0.5, 0, 1)
        m = cv2.getRotationMatrix2D(centre, 0.0, 1.0)
        if kind == "displaced":
            m[:, 2] += across * r_px * (0.15 + 1.3 * conspicuity) * rng.choice((-1, 1))
            m[:, 2] -= normal * r_px * rng.uniform(0, 0.25)  # impaction: the fragments overlap (brighter band)
        else:
            m = cv2.getRotationMatrix2D(centre, float(rng.choice((-1, 1)) * (3 + 17 * conspicuity)), 1.0)
        out = bone_img * (1 - distal) + cv2.warpAffine(bone_img * distal, m, shape)
        contrast *= 0.8
    elif kind == "fragment":
        side = float(rng.choice((-1, 1)))
        chip_c = side * e * r_px * 0.9  # relative to the site
        rho = r_px * (0.3 + 0.5 * conspicuity)
        chip = np.clip(rho + 0.5 - np.hypot(xs - np.float32(chip_c[0]), ys - np.float32(chip_c[1])), 0, 1)
        m = cv2.getRotationMatrix2D((centre[0] + chip_c[0], centre[1] + chip_c[1]), rng.uniform(-30, 30), 1.0)
        m[:, 2] += side * e * rho * (0.4 + 1.2 * conspicuity)
        out = bone_img * (1 - chip) + cv2.warpAffine(bone_img * chip, m, shape)
        contrast *= 0.6
    elif kind == "hardware":
        _hardware(rng, cv, extra, point, u, e, r)
        contrast *= 0.4  # healed or fixed fracture under the metal
    if kind == "crack" and rng.random() < 0.3:  # incomplete: through one cortex only
        half = r_px * rng.uniform(0.45, 0.85)
        offset = float(rng.choice((-1, 1))) * (r_px - half * 0.8)
    else:
        half, offset = r_px * 1.6, 0.0
    # Jagged line: the strip |dist - zigzag| < gap / 2, |along - offset| < half, with soft (anti-aliased) edges.
    freq, phase = np.float32(rng.uniform(2, 4) / r_px), np.float32(rng.uniform(0, 2 * math.pi))
    wobble = np.float32(0.12 * r_px) * np.sin(along * freq + phase)
    band = np.clip(gap / 2 + 0.5 - np.abs(dist - wobble), 0, 1)
    band *= np.clip(half + 0.5 - np.abs(along - offset), 0, 1)
    out = out * (1 - contrast * band)

    if kind in ("crack", "displaced", "angulated") and rng.random() < 0.3:  # healing: callus cuff around the site
        cuff = np.exp(-(dist / np.float32(1.3 * r_px)) ** 2 - (along / np.float32(1.35 * r_px)) ** 4)
        extra += np.float32(0.45 * conspicuity * rng.uniform(0.6, 1.0)) * cuff * (bone_img < 1e-6)
    return out.astype(np.float32), extra


def _hardware(rng, cv: _Canvas, metal: np.ndarray, point, u, e, r: float) -> None:
    """Orthopaedic hardware (MURA counts it as abnormal): a plate with screws, lone screws or a K-wire."""
    value = float(rng.uniform(1.6, 2.6))
    style = rng.choice(("plate", "screws", "wire"), p=(0.5, 0.3, 0.2))
    if style == "plate":
        half_len, side = r * rng.uniform(2.0, 3.0), float(rng.choice((-1, 1)))
        c = point + side * e * r * 0.95
        w = r * 0.3
        quad = np.stack([c - u * half_len - e * w, c + u * half_len - e * w, c + u * half_len + e * w,
                         c - u * half_len + e * w])
        cv2.fillConvexPoly(metal, cv.fx(quad), value, cv2.LINE_8, 4)
        for t in np.linspace(-0.85, 0.85, int(rng.integers(3, 6))):
            _line(metal, cv, point + u * half_len * t, e, r * 1.05, value, r * 0.3 * cv.k)
    elif style == "screws":
        for _ in range(int(rng.integers(1, 4))):
            d = math.cos(a := rng.uniform(-0.5, 0.5)) * e + math.sin(a) * u
            _line(metal, cv, point + u * r * rng.uniform(-1.5, 1.5), d, r * 1.1, value, r * 0.35 * cv.k)
    else:
        d = math.cos(a := rng.uniform(0.3, 1.1)) * u + math.sin(a) * e
        _line(metal, cv, point, d, r * rng.uniform(1.8, 2.4), value, max(1.0, r * 0.15 * cv.k))


def _supersample(size: int) -> int:
    """Drawing resolution / view resolution: cv2 fills are not anti-aliased on float images, so small views are
    drawn at 2x and box-filtered down (INTER_AREA)."""
    return 2 if size <= 160 else 1


@dataclass
class Anatomy:
    """One patient's bones drawn once in the canonical frame; all the patient's studies and views reuse it."""

    patient: Patient
    bones: list[Bone]
    canvas: _Canvas
    """Drawing canvas (supersampled)."""
    shade: np.ndarray
    """(S, S) trabecular texture x (1 - lucency) at drawing resolution, applied to fracture deltas too."""
    layers: np.ndarray
    """(C, C, 2) float32 at view resolution: soft tissue T and shaded bone B."""
    supersample: int


def render_anatomy(rng: np.random.Generator, patient: Patient, size: int) -> Anatomy:
    """Draw a patient's bones, soft tissue and non-fracture lucencies for views of `size` pixels."""
    ss = _supersample(size)
    side = int(round(_CANVAS_EXTENT * size))  # view-resolution canvas side
    cv = _Canvas(size=ss * side, k=ss * size / 2)
    bones = _BUILDERS[patient.body_part](rng, patient)

    bone = np.zeros((cv.size, cv.size), np.float32)
    for b in bones:  # additive: overlapping bones are brighter, as in a projection radiograph
        win = cv.window(b)
        if win is not None:
            bone[win[1]] += _draw_bone(win, b, patient)

    # Lucent lines that are NOT fractures, in both classes: growth plates and nutrient canals.
    lucency = np.zeros_like(bone)
    for b in bones:
        for c, d, half in b.physes:
            _line(lucency, cv, c, d, half, 0.55, 0.03 * cv.k)
    shafts = [b for b in bones if b.fracturable]
    for _ in range(int(rng.poisson(0.8))):
        c, u, r = _arc_point(shafts[int(rng.integers(len(shafts)))], rng.uniform(0.3, 0.7))
        e = np.array([-u[1], u[0]])
        slant = math.cos(a := rng.uniform(0.5, 1.0)) * e + math.sin(a) * u
        _line(lucency, cv, c + float(rng.choice((-1, 1))) * e * r * 0.75, slant, r * 0.35, rng.uniform(0.15, 0.4),
              0.6 * ss)
    # Trabecular texture: band-limited noise on a fixed 32 x 32 grid over the canvas (correlation length ~0.1
    # canonical units at any image size; a fixed number of draws keeps the stream independent of the size).
    grain = rng.standard_normal((32, 32)).astype(np.float32)
    shade = (1 - lucency) * (1 + 0.12 * cv2.resize(grain, (cv.size, cv.size), interpolation=cv2.INTER_CUBIC))
    bone = cv2.resize(bone * shade, (side, side), interpolation=cv2.INTER_AREA)

    # Soft tissue: the bones' silhouette dilated by ~margin and smoothed (blur, then saturate near the bones).
    tissue = (bone > 0).astype(np.float32)
    if patient.body_part == "XR_SHOULDER":  # chest wall
        view = _Canvas(size=side, k=size / 2)
        cv2.ellipse(tissue, tuple(view.fx((-1.2, 0.6)).tolist()), (view.fl(1.3), view.fl(1.8)), 10, 0, 360, 1.0,
                    -1, cv2.LINE_8, 4)
    tissue = np.minimum(cv2.GaussianBlur(tissue, (0, 0), max(0.6 * patient.margin * size / 2, 0.5)) * 2.5, 1.0)
    return Anatomy(patient=patient, bones=bones, canvas=cv, shade=shade, layers=np.dstack([tissue, bone]),
                   supersample=ss)


@dataclass
class Study:
    """One study in the canonical frame; its views are projections of these layers."""

    layers: np.ndarray
    """(C, C, 2 or 3) float32: soft tissue T, shaded bone B and, if abnormal, the fracture delta D."""
    patient: Patient
    kind: str
    """'normal' or the fracture kind."""

    @property
    def abnormal(self) -> bool:
        return self.kind != "normal"


def render_study(rng: np.random.Generator, anatomy: Anatomy, abnormal: bool, subtlety: float) -> Study:
    """A study of this patient: the shared anatomy plus, if abnormal, one fracture (or hardware) of a shaft."""
    if not abnormal:
        return Study(layers=anatomy.layers, patient=anatomy.patient, kind="normal")
    bones, cv = anatomy.bones, anatomy.canvas
    kind = _choice(rng, FRACTURE_KINDS)
    i, point, u, r = _fracture_site(rng, bones)
    # room for moved pieces, callus and hardware; an angulated distal piece swings far: use the whole canvas
    win = cv.window(bones[i], grow=2 * _CANVAS_EXTENT if kind == "angulated" else 2.5 * r)
    target = _draw_bone(win, bones[i], anatomy.patient)
    fractured, extra = _fracture(rng, win[0], target, point, u, r, kind, subtlety, anatomy.supersample)
    delta = np.zeros((cv.size, cv.size), np.float32)
    delta[win[1]] = (fractured - target) * anatomy.shade[win[1]] + extra
    side = anatomy.layers.shape[0]
    delta = cv2.resize(delta, (side, side), interpolation=cv2.INTER_AREA)
    if kind != "hardware" and rng.random() < 0.9:  # soft-tissue swelling: locally thicker, denser tissue
        # Gaussian of width max(1.8 r, 0.12) (visible even around a phalanx), smooth: drawn at view resolution
        view = _Canvas(size=side, k=cv.k / anatomy.supersample)
        sigma = max(1.8 * r, 0.12) * view.k
        ys, xs = np.indices((side, side), dtype=np.float32)
        x0, y0 = view.px(point)
        d2 = ((xs - np.float32(x0)) ** 2 + (ys - np.float32(y0)) ** 2) * np.float32(-0.5 / sigma**2)
        delta += np.float32(anatomy.patient.tissue * (1 - subtlety) * rng.uniform(1.0, 2.5)) * np.exp(d2)
    return Study(layers=np.dstack([anatomy.layers, delta]), patient=anatomy.patient, kind=kind)


def _fracture_site(rng: np.random.Generator, bones: list[Bone]) -> tuple[int, np.ndarray, np.ndarray, float]:
    """(bone index, point, unit direction, half-width) on a shaft, preferring long thick bones, in view."""
    shafts = [i for i, b in enumerate(bones) if b.fracturable]
    weights = np.array([sum(seg[4] * (seg[5] + seg[6]) ** 2 for seg in bones[i].segments()) for i in shafts])
    for _ in range(100):  # keep the site inside the central field of view
        i = shafts[int(rng.choice(len(shafts), p=weights / weights.sum()))]
        point, u, r = _arc_point(bones[i], rng.uniform(0.1, 0.9))
        if np.abs(point).max() < 0.6:
            break
    return i, point, u, r


# Per-view random parameters, drawn together (one rng call per view), as (low, high) of a uniform.
_VIEW_RANGES = {
    "theta": (-20.0, 20.0),  # in-plane rotation, degrees
    "fore": (0.0, 1.0),  # foreshortening, mapped into _FORESHORTEN[view]
    "zoom": (0.85, 1.15), "dx": (-0.12, 0.12), "dy": (-0.12, 0.12),  # scale; shift in half-widths
    "visible": (0.0, 1.0), "vis": (0.6, 1.0),  # fracture shown if visible < P_VISIBLE, at strength vis
    "marker": (0.0, 1.0), "marker_x": (0.0, 1.0), "marker_y": (0.0, 1.0), "marker_lr": (0.0, 1.0),
    "gain": (0.7, 1.2),  # detector: I = 1 - exp(-gain * mu)
    "blur": (0.3, 0.8),  # Gaussian sigma in pixels at 64 px
    "level": (0.15, 0.4), "contrast": (0.17, 0.3),  # display mean and standard deviation (auto-windowing)
    "tilt_x": (-0.04, 0.04), "tilt_y": (-0.04, 0.04),  # heel-effect gradient
    "gamma": (0.75, 1.35),
    "a_noise": (0.015, 0.06), "b_noise": (0.005, 0.02),  # sigma(I) = a sqrt(I) + b
}
_VIEW_LO = np.array([lo for lo, _ in _VIEW_RANGES.values()])
_VIEW_SPAN = np.array([hi - lo for lo, hi in _VIEW_RANGES.values()])
_FORESHORTEN = ((0.9, 1.0), (0.6, 0.8), (0.72, 0.92), (0.8, 1.0))
"""Foreshortening across the bone's long axis for views 1-4 (AP, lateral, oblique, extra)."""


def render_study_view(rng: np.random.Generator, study: Study, view: int, size: int,
                      fracture_visible: bool | None = None) -> np.ndarray:
    """Project a study into one (size, size) uint8 view: pose, exposure, blur and noise drawn from `rng`."""
    v = dict(zip(_VIEW_RANGES, (_VIEW_LO + _VIEW_SPAN * rng.random(len(_VIEW_RANGES))).tolist()))
    lo, hi = _FORESHORTEN[view % len(_FORESHORTEN)]
    fore = lo + (hi - lo) * v["fore"]
    cos, sin = math.cos(math.radians(v["theta"])), math.sin(math.radians(v["theta"]))
    a = v["zoom"] * np.array([[cos, -sin], [sin, cos]]) @ np.diag([study.patient.mirror * fore, 1.0])
    c_src = (study.layers.shape[0] - 1) / 2  # canvas and view share pixels per canonical unit
    b = (size - 1) / 2 + np.array([v["dx"], v["dy"]]) * size / 2 - a.sum(axis=1) * c_src
    layers = cv2.warpAffine(study.layers, np.hstack([a, b[:, None]]), (size, size), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REPLICATE)

    vis = 0.0
    if study.abnormal:
        if fracture_visible is None:
            fracture_visible = v["visible"] < P_VISIBLE
        vis = 1.0 if study.kind == "hardware" else float(fracture_visible) * v["vis"]  # metal always shows
    weights = np.array([[study.patient.tissue, 1.0, vis][:layers.shape[2]]], np.float32)
    mu = cv2.transform(layers, weights)  # (size, size) attenuation w_t T + B + vis D
    if v["marker"] < 0.6:  # lead side marker ("L"/"R") in a corner
        glyph = np.zeros((size, size), np.uint8)  # putText draws on 8-bit images only
        org = (int((0.04 + 0.82 * (v["marker_x"] > 0.5)) * size),
               int((0.13 + 0.82 * (v["marker_y"] > 0.5)) * size))
        cv2.putText(glyph, "LR"[v["marker_lr"] > 0.5], org, cv2.FONT_HERSHEY_SIMPLEX, 0.1 * size / 22, 255,
                    max(1, round(size / 64)), cv2.LINE_AA)
        mu += glyph * np.float32(2.5 / 255)

    # Detector I = 1 - exp(-gain mu) (overlapping bone saturates), then blur. Display processing standardises
    # each image to a random level and contrast (like a DR console's auto-windowing), so neither class differs
    # in global intensity statistics; blur and the affine map act on the transmitted exp(-gain mu) directly.
    transmitted = cv2.GaussianBlur(cv2.exp(mu * np.float32(-v["gain"])), (0, 0), v["blur"] * size / 64)
    mean, std = (float(x[0, 0]) for x in cv2.meanStdDev(transmitted))
    scale = v["contrast"] / max(std, 1e-3)
    ramp_x, ramp_y = _ramps(size)
    img = cv2.addWeighted(transmitted, -scale, ramp_x, v["tilt_x"], v["level"] + scale * mean)
    img = cv2.scaleAdd(ramp_y, v["tilt_y"], img)
    img = cv2.pow(np.clip(img, 0, 1, out=img), v["gamma"])
    sigma = cv2.sqrt(img) * np.float32(v["a_noise"]) + np.float32(v["b_noise"])  # Poisson-like + read noise
    noise_rng = np.random.default_rng(int(rng.integers(2**63)))  # one draw from `rng` at any image size
    img += sigma * noise_rng.standard_normal((size, size), dtype=np.float32)
    return cv2.convertScaleAbs(np.maximum(img, 0, out=img), alpha=255)  # round, saturate to [0, 255]


@lru_cache(maxsize=8)
def _ramps(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(size, size) horizontal and vertical ramps from -1 to 1 (read-only, cached)."""
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    ramp_x, ramp_y = np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))
    ramp_x.flags.writeable = ramp_y.flags.writeable = False
    return ramp_x, ramp_y


def _choice(rng: np.random.Generator, weighted) -> str:
    names, p = zip(*weighted)
    return str(names[int(rng.choice(len(names), p=np.asarray(p) / sum(p)))])


def render_view(rng: np.random.Generator, body_part: str, abnormal: bool, size: int, subtlety: float,
                view: int = 0, fracture_visible: bool | None = None) -> np.ndarray:
    """One (size, size) uint8 view of a new random patient and study.

    subtlety in [0, 1]: 0 = conspicuous fracture, 1 = barely visible. `fracture_visible=None` draws visibility
    with probability P_VISIBLE, like the dataset; True forces it (previews).
    """
    anatomy = render_anatomy(rng, sample_patient(rng, body_part), size)
    return render_study_view(rng, render_study(rng, anatomy, abnormal, subtlety), view, size, fracture_visible)


# ---------------------------------------------------------------------------------------------------------------
# Dataset tree
# ---------------------------------------------------------------------------------------------------------------
def _patient_rows(patient_index: int, *, tree: str, split: str, size: int, seed: int,
                  abnormal_frac: float) -> tuple[list[str], list[tuple[str, int]]]:
    """Render and write all images of one patient under `tree` (the future MURA-v1.1/ directory).

    Returns its image paths and (study path, label) rows, relative to the data root as in MURA's CSVs.
    Randomness comes only from SeedSequence([seed, patient_index]), so patients can be rendered in any order or
    process. It is split in two streams: the plan (studies, labels, subtlety, views) and the drawing, so the
    tree's structure and labels depend on (seed, patients, holdout_frac, abnormal_frac) only, not on the image
    size or on how images are drawn.
    """
    plan_rng, draw_rng = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, patient_index]).spawn(2))
    body_part = BODY_PARTS[patient_index % len(BODY_PARTS)]
    n_studies = int(plan_rng.choice(STUDIES_PER_PATIENT[0], p=STUDIES_PER_PATIENT[1]))
    plan = [(bool(plan_rng.random() < abnormal_frac), float(plan_rng.random()) ** SUBTLETY_POWER,
             int(plan_rng.choice(VIEWS_PER_STUDY[0], p=VIEWS_PER_STUDY[1]))) for _ in range(n_studies)]

    anatomy = render_anatomy(draw_rng, sample_patient(draw_rng, body_part), size)
    images, studies = [], []
    for k, (abnormal, subtlety, n_views) in enumerate(plan, start=1):
        study = render_study(draw_rng, anatomy, abnormal, subtlety)
        label = "positive" if abnormal else "negative"
        study_dir = f"{split}/{body_part}/patient{patient_index + 1:05d}/study{k}_{label}"
        os.makedirs(os.path.join(tree, study_dir))
        for j in range(1, n_views + 1):
            png = cv2.imencode(".png", render_study_view(draw_rng, study, j - 1, size), _PNG_PARAMS)[1]
            # A plain write is enough here: the whole tree is private until it is renamed into place.
            with open(os.path.join(tree, study_dir, f"image{j}.png"), "wb") as f:
                f.write(png.tobytes())
            images.append(f"MURA-v1.1/{study_dir}/image{j}.png")
        studies.append((f"MURA-v1.1/{study_dir}/", int(abnormal)))
    return images, studies


def _params(patients: int, size: int, seed: int, holdout_frac: float, abnormal_frac: float) -> dict:
    """Everything the output bytes depend on (not `workers`), as stored in the marker."""
    return {"patients": patients, "size": size, "seed": seed, "holdout_frac": holdout_frac,
            "abnormal_frac": abnormal_frac}


def _split_sizes(patients: int, holdout_frac: float) -> tuple[int, int]:
    n_valid = max(1, int(round(patients * holdout_frac))) if holdout_frac > 0 else 0
    return patients - n_valid, n_valid


def _check_args(patients: int, size: int, holdout_frac: float, abnormal_frac: float) -> None:
    if not 0 <= holdout_frac < 1:
        raise UserError(f"holdout fraction {holdout_frac} must be in [0, 1)")
    if not 0 <= abnormal_frac <= 1:
        raise UserError(f"abnormal fraction {abnormal_frac} must be in [0, 1]")
    if not 16 <= size <= 1024:
        raise UserError(f"image size {size} px must be between 16 and 1024")
    n_train, _ = _split_sizes(patients, holdout_frac)
    if patients < 1 or n_train < 1:
        raise UserError(f"{patients} patients leave no training patients with holdout fraction {holdout_frac}; "
                        "use more patients")


def _read_marker(mura_dir: Path) -> dict | None:
    try:
        return json.loads((mura_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _remove_stale_temps(out: Path) -> None:
    """Delete temp trees left by killed generations (their owner pid is gone)."""
    for d in out.glob(".MURA-v1.1.*-*-*"):
        try:
            pid = int(d.name.split("-")[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def generate_phantom(out: str | Path, patients: int, size: int = 64, seed: int = 0,
                     holdout_frac: float = DEFAULT_HOLDOUT_FRAC, abnormal_frac: float = DEFAULT_ABNORMAL_FRAC,
                     workers: int = 1) -> Path:
    """Write a synthetic MURA-v1.1 tree under `out` and return `out` (the data root).

    Patients 1..n_train go to train/, the last round(holdout_frac * patients) to valid/ (disjoint, as in MURA);
    patient i has body part BODY_PARTS[(i - 1) % 7]. The tree is built in a hidden temp directory and renamed to
    `out/MURA-v1.1` only when complete, so an interrupted run never leaves a tree that looks finished. An existing
    phantom at `out` is replaced (kept if it has the same parameters: the bytes would be the same, and a concurrent
    twin may be reading it); an existing MURA-v1.1 that is not a phantom is refused.
    """
    _check_args(patients, size, holdout_frac, abnormal_frac)
    if workers < 1:
        raise UserError(f"--workers {workers}: need at least 1 process")
    out = Path(out)
    target = out / "MURA-v1.1"
    if target.exists() and _read_marker(target) is None:
        raise UserError(f"{target} exists and is not a synthetic phantom (no {MARKER_NAME}); "
                        "choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out / f".MURA-v1.1.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        marker = _write_tree(tmp, patients, size, seed, holdout_frac, abnormal_frac, workers)
        _commit(tmp, target, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_tree(tmp: Path, patients: int, size: int, seed: int, holdout_frac: float, abnormal_frac: float,
                workers: int) -> dict:
    n_train, n_valid = _split_sizes(patients, holdout_frac)
    counts = {}
    for split, indices in (("train", range(n_train)), ("valid", range(n_train, n_train + n_valid))):
        work = partial(_patient_rows, tree=str(tmp), split=split, size=size, seed=seed,
                       abnormal_frac=abnormal_frac)
        if workers > 1 and len(indices) > 1:
            # spawn, not fork: the parent may already hold torch / OpenMP threads
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                rows = list(pool.map(work, indices, chunksize=max(1, len(indices) // (4 * workers))))
        else:
            rows = [work(i) for i in indices]
        images = [p for img, _ in rows for p in img]
        studies = [s for _, st in rows for s in st]
        (tmp / split).mkdir(exist_ok=True)  # an empty valid/ still exists, like a real tree
        write_text(tmp / f"{split}_image_paths.csv", "".join(f"{p}\n" for p in images))
        write_text(tmp / f"{split}_labeled_studies.csv", "".join(f"{s},{y}\n" for s, y in studies))
        counts[split] = {"patients": len(indices), "studies": len(studies), "images": len(images),
                         "positive_studies": sum(y for _, y in studies)}
    marker = {
        "synthetic": True,
        "note": "SYNTHETIC phantom drawn by kd_fracture.data.synthetic: not real radiographs",
        "generator_version": GENERATOR_VERSION,
        "params": _params(patients, size, seed, holdout_frac, abnormal_frac),
        "counts": counts,
    }
    write_json(tmp / MARKER_NAME, marker)
    return marker


def _commit(tmp: Path, target: Path, marker: dict) -> None:
    """Rename the finished temp tree to `target`; replace an older phantom; tolerate a concurrent twin."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if not target.exists():
            raise
    existing = _read_marker(target)
    if existing is not None and existing.get("params") == marker["params"] \
            and existing.get("generator_version") == GENERATOR_VERSION:
        return  # another process just wrote the same bytes
    old = target.parent / f".MURA-v1.1.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def phantom_info(root: str | Path) -> dict | None:
    """The phantom's marker (parameters and counts) if `root` holds a complete phantom, else None."""
    root = Path(root)
    return _read_marker(root / "MURA-v1.1" if root.name != "MURA-v1.1" else root)


def phantom_dir_name(patients: int, size: int, seed: int, holdout_frac: float = DEFAULT_HOLDOUT_FRAC) -> str:
    """`phantom_p{patients}_px{size}_s{seed}`, plus `_h{percent}` when the holdout fraction is not the default."""
    holdout = "" if holdout_frac == DEFAULT_HOLDOUT_FRAC else f"_h{round(holdout_frac * 100)}"
    return f"phantom_p{patients}{holdout}_px{size}_s{seed}"


def ensure_default_phantom(cache_dir: str | Path = ".kd_fracture_cache", patients: int = 300, size: int = 64,
                           seed: int = 0, holdout_frac: float = DEFAULT_HOLDOUT_FRAC) -> Path:
    """Return `cache_dir/<phantom_dir_name(...)>`, generating it first if it is not complete.

    Complete = MURA-v1.1/SYNTHETIC_PHANTOM.json exists with the same parameters and generator version;
    anything else under that directory (a tree without marker, an older generator) is deleted and regenerated.
    """
    root = Path(cache_dir) / phantom_dir_name(patients, size, seed, holdout_frac)
    info = phantom_info(root)
    if (info is not None and info.get("generator_version") == GENERATOR_VERSION
            and info.get("params") == _params(patients, size, seed, holdout_frac, DEFAULT_ABNORMAL_FRAC)):
        return root
    print(f"generating a SYNTHETIC phantom dataset (not real radiographs; {patients} patients, {size} px, "
          f"seed {seed}, holdout fraction {holdout_frac}) in {root}", flush=True)
    if (root / "MURA-v1.1").exists():
        shutil.rmtree(root / "MURA-v1.1")  # incomplete or stale: our own cache directory
    return generate_phantom(root, patients=patients, size=size, seed=seed, holdout_frac=holdout_frac)


# ---------------------------------------------------------------------------------------------------------------
# Preview and CLI
# ---------------------------------------------------------------------------------------------------------------
def write_preview(path: str | Path, size: int = 64, seed: int = 0) -> Path:
    """Contact sheet: one column per body part, two normal and two abnormal rows (fracture forced visible)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rng = np.random.default_rng(np.random.SeedSequence([seed], spawn_key=(1,)))
    fig = Figure(figsize=(1.7 * len(BODY_PARTS), 1.9 * 4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(4, len(BODY_PARTS))
    for col, part in enumerate(BODY_PARTS):
        for row in range(4):
            abnormal = row >= 2
            anatomy = render_anatomy(rng, sample_patient(rng, part), size)
            study = render_study(rng, anatomy, abnormal, rng.uniform(0, 0.6))
            img = render_study_view(rng, study, row % 2, size, fracture_visible=True)
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_title(f"{part[3:].lower()}\n{study.kind}", fontsize=8,
                         color="firebrick" if abnormal else "black")
            ax.axis("off")
    fig.suptitle(f"SYNTHETIC phantom, {size} px, seed {seed} (rows 1-2 normal, 3-4 abnormal)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
