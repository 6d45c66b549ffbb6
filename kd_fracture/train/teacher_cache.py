"""Teacher-logit cache with replayed views (docs/design.md §8), and the two ways a student gets its teacher's logits.

A distillation epoch needs the teacher's logits for exactly the picture the student sees. The student's training
dataset draws view v = (epoch + image_key) mod V of every image, and view v of image i is the augmentation seeded by
(seed, image_key(i), v) — the same pixels in every process and call order (`transforms.apply_seeded`). So the teacher
is run once per fold over V views (+ the clean view) of every training image:

    logits[i, v]  = teacher(view v of row i),  v = 0..V-1       (N, V+1, C) float32, one file per fold
    logits[i, V]  = teacher(clean row i)        (= logits[i, -1], so dataset view -1 indexes it directly)

and every student epoch looks its batch up by (index, view) instead of running ResNet-50 again — the teacher's cost
is paid once per fold rather than once per epoch and per trial.

The teacher was trained on 3 replicated channels, the student usually takes 1; the dataset replicates grayscale
*after* augmenting, so the teacher's 3-channel view and the student's 1-channel view are the same pixels.

The cache is keyed by sha256 over everything that decides its content: the teacher checkpoint's bytes, the teacher's
architecture / in_chans / num_classes, image size, augmentation and normalisation settings (and the albumentations
version, which defines what a seed draws), V, the seed, and the ordered image paths of the rows. A file whose key
differs is rebuilt (and says why), never reused.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kd_fracture.train import checkpoint, engine
from kd_fracture import io
from kd_fracture.config import AugConfig, DataConfig, ModelConfig
from kd_fracture.data.dataset import CLEAN_VIEW, make_loader
from kd_fracture.data.loaders import SharedCache, aug_kwargs, backend_recipe, build_loader, resolve_num_workers
from kd_fracture.data.manifest import Manifest
from kd_fracture.data.transforms import GRAY_MEAN, GRAY_STD, resolve_aug

__all__ = ["CachedTeacher", "OnlineTeacher", "TeacherCache", "cache_components", "compute_teacher_logits",
           "load_or_build"]

CACHE_VERSION = 1
LOGITS_FILE = "teacher_logits.safetensors"


@dataclass(frozen=True)
class TeacherCache:
    logits: torch.Tensor
    """(N, V+1, C) float32: [:, v] = view v (v < V), [:, V] = [:, -1] = clean view; C = the teacher's logits."""
    key: str
    path: Path
    rebuilt: bool
    """True when this call computed the logits (no file, or a stale one)."""

    @property
    def views(self) -> int:
        return self.logits.shape[1] - 1


def cache_components(teacher_checkpoint: Path, teacher: ModelConfig, data: DataConfig, aug: AugConfig, views: int,
                     seed: int, image_paths: list[str], precision: str = "fp32",
                     device: torch.device | None = None) -> dict:
    """Everything the cached logits depend on (JSON-able); its sha256 is the cache key."""
    import albumentations

    return {
        "version": CACHE_VERSION,
        "teacher_sha256": io.sha256_file(teacher_checkpoint),
        "teacher": {"name": teacher.name, "in_chans": teacher.in_chans, "num_classes": teacher.num_classes},
        "img_size": data.img_size,
        "aug": resolve_aug(aug_kwargs(aug)),
        "normalize": [GRAY_MEAN, GRAY_STD],
        "albumentations": albumentations.__version__,
        "views": views,
        "seed": seed,
        "n_rows": len(image_paths),
        "rows_sha256": io.sha256_bytes("\n".join(image_paths).encode("utf-8")),
        "precision": precision,  # resolved autocast of the teacher's forward passes (bf16 logits differ from fp32)
        **backend_recipe(data, device),  # the views' pixels: albumentations (absent, as before the key existed) | torch
    }


def _key(components: dict) -> str:
    return io.sha256_bytes(json.dumps(components, sort_keys=True).encode("utf-8"))


@torch.inference_mode()
def compute_teacher_logits(teacher: nn.Module, rows: pd.DataFrame, manifest: Manifest, data: DataConfig,
                           aug: AugConfig, *, in_chans: int, views: int, seed: int, device: torch.device,
                           batch_size: int = 128, amp: bool = True, precision: str = "auto",
                           image_cache: SharedCache | None = None, desc: str = "teacher cache") -> torch.Tensor:
    """(N, V+1, C) teacher logits for views 0..V-1 and the clean view of `rows`, through the student's own dataset
    class and seed (train=True, num_views=V), only with the teacher's in_chans."""
    loader = build_loader(rows, manifest, data, aug, train=True, in_chans=in_chans, batch_size=batch_size, seed=seed,
                          num_views=views, cache=image_cache, shuffle=False, drop_last=False, device=device)
    per_view = []
    for view in [*range(views), CLEAN_VIEW]:
        view_loader = make_loader(loader.dataset.with_view(view), batch_size, shuffle=False, seed=seed,
                                  num_workers=resolve_num_workers(data, device))
        name = "clean" if view == CLEAN_VIEW else f"view {view + 1}/{views}"
        per_view.append(engine.predict_logits(teacher, view_loader, device, amp, desc=f"{desc} {name}",
                                                precision=precision))
    return torch.stack(per_view, dim=1).float()  # (N, V+1, C)


def load_or_build(cache_dir: str | Path, load_teacher: Callable[[], nn.Module], teacher_checkpoint: Path,
                  teacher: ModelConfig, rows: pd.DataFrame, manifest: Manifest, data: DataConfig, aug: AugConfig, *,
                  views: int, seed: int, device: torch.device, batch_size: int = 128, amp: bool = True,
                  precision: str = "auto", image_cache: SharedCache | None = None,
                  desc: str = "teacher cache") -> TeacherCache:
    """The fold's cached logits if `cache_dir/teacher_logits.safetensors` matches the current key, else rebuilt.

    `load_teacher()` is only called when the logits have to be computed. Files: the safetensors tensor "logits" and
    a `.json` sidecar (size, sha256, key and its components).
    """
    path = Path(cache_dir) / LOGITS_FILE
    rows = rows.reset_index(drop=True)
    components = cache_components(teacher_checkpoint, teacher, data, aug, views, seed, list(rows["image_path"]),
                                  engine.resolve_precision(precision, device, amp), device)
    key = _key(components)
    reason = _stale_reason(path, key, components)
    if reason is None:
        logits = load_file(str(path))["logits"]
        if logits.shape[:2] == (len(rows), views + 1):
            return TeacherCache(logits, key, path, rebuilt=False)
        reason = f"its shape {tuple(logits.shape)} does not fit {len(rows)} rows × {views + 1} views"
    if reason != "absent":
        engine.log(f"{desc}: {path} is stale ({reason}); rebuilding")
    model = load_teacher().to(device).eval()
    logits = compute_teacher_logits(model, rows, manifest, data, aug, in_chans=teacher.in_chans, views=views,
                                    seed=seed, device=device, batch_size=batch_size, amp=amp, precision=precision,
                                    image_cache=image_cache, desc=desc).clone()  # a normal (not inference) tensor
    with io.atomic_path(path) as tmp:
        save_file({"logits": logits.contiguous()}, str(tmp), metadata={"key": key})
    checkpoint.write_sidecar(path, {"key": key, "shape": list(logits.shape), "components": components})
    return TeacherCache(logits, key, path, rebuilt=True)


def _stale_reason(path: Path, key: str, components: dict) -> str | None:
    """None if the file at `path` is intact and was made for `key`; else why not."""
    if not path.exists():
        return "absent"
    try:
        checkpoint.verify_sidecar(path)
    except checkpoint.CheckpointError as e:
        return str(e).split(": ", 1)[-1]
    meta = io.read_json(path.with_name(path.name + ".json"))
    if meta.get("key") == key:
        return None
    old = meta.get("components", {})
    changed = [k for k in components if old.get(k) != components[k]]
    return f"{', '.join(changed) or 'key'} changed"


# ----------------------------------------------------------------------------------------------------------------------
# where a DistillTask gets z_t from


class CachedTeacher:
    """Replays cached logits: batch {"index": (B,), "view": (B,)} → (B, C) = logits[index, view] (view -1 = clean)."""

    def __init__(self, cache: TeacherCache | torch.Tensor):
        self.logits = cache.logits if isinstance(cache, TeacherCache) else cache  # (N, V+1, C)
        self.views = self.logits.shape[1] - 1

    def __call__(self, batch: dict) -> torch.Tensor:
        index, view = batch["index"], batch["view"]
        if self.logits.device != index.device:
            self.logits = self.logits.to(index.device)
        if int(view.max()) >= self.views or int(index.max()) >= len(self.logits):
            raise ValueError(f"batch asks for view {int(view.max())} / row {int(index.max())}, but the cache holds "
                             f"{self.views} views of {len(self.logits)} rows; the student's dataset and the cache "
                             "must use the same rows and kd.views")
        return self.logits[index, view % (self.views + 1)]  # view -1 → column V (clean)


class OnlineTeacher:
    """Runs the (frozen, eval-mode) teacher on the student's batch; 1-channel input is replicated to the teacher's 3."""

    def __init__(self, model: nn.Module, in_chans: int):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.in_chans = in_chans

    def __call__(self, batch: dict) -> torch.Tensor:
        x = batch["image"]  # (B, C_student, H, W)
        if x.shape[1] != self.in_chans:
            if x.shape[1] != 1:
                raise ValueError(f"student input has {x.shape[1]} channels, teacher takes {self.in_chans}")
            x = x.expand(-1, self.in_chans, -1, -1)  # the dataset's replication, done on the batch
        self.model.eval()
        with torch.no_grad():
            return self.model(x).float()
