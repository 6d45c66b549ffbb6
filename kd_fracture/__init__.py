"""kd_fracture: patient-grouped cross-validation and knowledge distillation for bone X-ray abnormality
classification (MURA-style data; Rajpurkar et al. 2017, "MURA: Large Dataset for Abnormality Detection in
Musculoskeletal Radiographs")."""

__version__ = "0.1.0"

import os as _os

# albumentations checks PyPI for a newer release on import; there is no network on clusters and CI.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
