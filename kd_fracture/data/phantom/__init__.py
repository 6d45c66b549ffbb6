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

Modules, each importing only the ones before it: `anatomy` (population constants, `Patient`, the bone builders) →
`render` (canvas, bones, fractures, hardware, views, preview) → `tree` (the atomic MURA-v1.1 tree writer, marker,
cached default). This package re-exports the public API.
"""
from kd_fracture.data.phantom.anatomy import (BODY_PARTS, FRACTURE_KINDS, P_VISIBLE, STUDIES_PER_PATIENT,
                                              SUBTLETY_POWER, VIEWS_PER_STUDY, Bone, Patient, sample_patient)
from kd_fracture.data.phantom.render import (Anatomy, Study, render_anatomy, render_study, render_study_view,
                                             render_view, write_preview)
from kd_fracture.data.phantom.tree import (DEFAULT_ABNORMAL_FRAC, DEFAULT_HOLDOUT_FRAC, GENERATOR_VERSION,
                                           MARKER_NAME, ensure_default_phantom, generate_phantom, phantom_dir_name,
                                           phantom_info)

__all__ = [
    # anatomy
    "BODY_PARTS", "FRACTURE_KINDS", "P_VISIBLE", "STUDIES_PER_PATIENT", "SUBTLETY_POWER", "VIEWS_PER_STUDY",
    "Bone", "Patient", "sample_patient",
    # render
    "Anatomy", "Study", "render_anatomy", "render_study", "render_study_view", "render_view", "write_preview",
    # tree
    "DEFAULT_ABNORMAL_FRAC", "DEFAULT_HOLDOUT_FRAC", "GENERATOR_VERSION", "MARKER_NAME", "ensure_default_phantom",
    "generate_phantom", "phantom_dir_name", "phantom_info",
]
