"""Optional extras: a missing one skips its figure or export with one line naming what to install, never a crash.

    gradcam = extras.optional("pytorch_grad_cam", "gradcam", "plots/gradcam_examples.png")
    if gradcam is None: ...                   # logged: "plots/gradcam_examples.png skipped: ..."

The extras are the `[project.optional-dependencies]` of pyproject.toml: gradcam (grad-cam), onnx (onnx,
onnxruntime), postgres (psycopg), dicom (pydicom), app (fastapi, uvicorn, python-multipart). A base install (`pip install -e .`) runs `cv` and `distill` to the end.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType


def optional(module: str, extra: str, what: str, log: bool = True) -> ModuleType | None:
    """`import module`, or None after one line on stderr: "<what> skipped: <module> is not installed (pip install
    'kd_fracture[<extra>]')". An installed module that fails to import for another reason still raises."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if getattr(e, "name", None) not in (module, module.split(".")[0]):
            raise  # the package is there but broken: a bug to see, not an extra to install
        if log:
            print(f"{what} skipped: {module.split('.')[0]} is not installed (pip install 'kd_fracture[{extra}]')",
                  file=sys.stderr)
        return None
