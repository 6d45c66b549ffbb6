"""kd_fracture: patient-grouped cross-validation and knowledge distillation for bone X-ray abnormality
classification (MURA-style data; Rajpurkar et al. 2017, "MURA: Large Dataset for Abnormality Detection in
Musculoskeletal Radiographs")."""

__version__ = "0.1.0"

import os as _os

# albumentations checks PyPI for a newer release on import; there is no network on clusters and CI.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# OpenMP's default busy-waiting makes torch 5–10× slower whenever another process holds a core (shared nodes, CI,
# Optuna workers side by side); passive waiting costs ~nothing on an idle machine. Must be set before torch loads.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
