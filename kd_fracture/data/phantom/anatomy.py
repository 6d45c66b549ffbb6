"""Phantom anatomy: the population's constants (body parts, studies and views per patient, fracture kinds,
subtlety), one patient's anatomy parameters (`Patient`, `sample_patient`) and the bone builders that lay out each
body part's bones (`Bone`) in the canonical frame (x right, y down, a view shows about [-1, 1]^2).

Nothing here draws pixels (kd_fracture.data.phantom.render) or writes files (kd_fracture.data.phantom.tree).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kd_fracture.errors import UserError

BODY_PARTS = ("XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST")
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
