"""Phantom drawing: a patient's bones on a canonical canvas (`render_anatomy`), a study's fracture or hardware
(`render_study`), and each view's projection, exposure, blur and noise (`render_study_view`); `render_view` draws one
view of a new random patient and `write_preview` a labelled contact sheet.

Depends on kd_fracture.data.phantom.anatomy only; the dataset tree is written by kd_fracture.data.phantom.tree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from kd_fracture.data.phantom.anatomy import (_BUILDERS, BODY_PARTS, FRACTURE_KINDS, P_VISIBLE, Bone, Patient,
                                              sample_patient)
from kd_fracture.io import atomic_path

_CANVAS_EXTENT = 1.5
"""Canonical half-width of the per-patient canvas; a view shows roughly [-1, 1] of it (more when zoomed out)."""
_FIXED = 16
"""OpenCV drawing uses 4 fractional bits (shift=4): sub-pixel geometry at any image size."""


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
# Preview
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
