"""The run directory is the interface between commands (docs/design.md §4): everything a later command needs is
in it. One folder per fold (`fold_<k>/`, nnU-Net style), a `DONE` marker per finished fold, the resolved config and
the environment at the top."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from kd_fracture import io
from kd_fracture.config import from_dict, read_yaml, to_dict
from kd_fracture.errors import UserError
from kd_fracture.train import engine
from kd_fracture.train.checkpoint import LAST, sidecar

T = TypeVar("T")

DEFAULT_RUNS_DIR = "runs"
"""Default runs live in runs/<dataset>/<model>/ (`default_run_dir`), so runs on different data never collide."""

# Keys that do not change results: a rerun may differ in them without invalidating finished folds.
RUNTIME_KEYS = {"data.num_workers", "data.verify_images", "data.regenerate_folds", "data.cache_images",
                "train.device", "train.threads", "train.eval_batch_size", "run_dir", "data.phantom.cache_dir",
                "search.n_trials", "search.timeout", "search.storage", "search.heartbeat_interval",
                "search.grace_period", "search.worker", "sweep", "track",
                # output-only: a rerun may switch an export off (e.g. without the onnx extra) and finish the run
                "onnx", "latency_threads", "keep_state", "train.state_interval_min"}


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    config = property(lambda self: self.path / "config.yaml")
    env = property(lambda self: self.path / "env.json")
    folds = property(lambda self: self.path / "folds.csv")
    holdout = property(lambda self: self.path / "holdout")
    tables = property(lambda self: self.path / "tables")
    plots = property(lambda self: self.path / "plots")
    summary = property(lambda self: self.path / "summary.md")

    def fold(self, k: int | str) -> Path:
        return self.path / (f"fold_{k}" if isinstance(k, int) else str(k))

    def is_done(self, k: int | str) -> bool:
        return (self.fold(k) / "DONE").exists()

    def mark_done(self, k: int | str, info: dict | None = None, keep_state: bool = False) -> None:
        """Write fold k's DONE marker; then drop its resumable state (`state_last.pt`, optimizer included, 2× the
        weights) unless keep_state: a DONE fold is never resumed, its weights are checkpoint_best.safetensors."""
        io.write_json(self.fold(k) / "DONE", {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **(info or {})})
        if not keep_state:
            for path in (self.fold(k) / LAST, sidecar(self.fold(k) / LAST)):
                path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self, fold: int | str | None = None, shared: bool = False, hint: str = ""):
        """One writer per run, or per fold (docs/design.md §9). A plain run holds `RUN/.lock` exclusively; a fold
        job (`fold=k`) holds it shared — fold jobs run side by side, never beside a plain run — and
        `RUN/fold_k/.lock` exclusively; `shared=True` alone lets cooperating processes in (distill --trials-only
        workers). A second writer gets a UserError naming the holder and `hint`. flock dies with its process, so a
        killed run leaves no lock behind."""
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(io.flock(self.path / ".lock", shared=shared or fold is not None))
                if fold is not None:
                    stack.enter_context(io.flock(self.fold(fold) / ".lock"))
            except io.LockedError as e:
                what = f"fold {fold} of {self.path}" if e.path.parent != self.path else str(self.path)
                raise UserError(f"{what} is being written by {e.holder}; wait for it to finish"
                                + (f", or {hint}" if hint else "")) from None
            yield self

    def saved_config(self, cls: type[T]) -> T | None:
        return from_dict(cls, read_yaml(self.config), str(self.config)) if self.config.exists() else None

    def check_compatible(self, cfg: Any) -> None:
        """A rerun must use the settings the finished folds were trained with (runtime-only keys excepted)."""
        saved = read_yaml(self.config) if self.config.exists() else None
        if saved is None:
            return
        old, new = flatten_config(saved), flatten_config(to_dict(cfg))
        diffs = changed_keys(old, new, type(cfg))
        if diffs:
            k = diffs[0]
            raise UserError(f"{self.config}: this run was made with {k}={old.get(k)!r}, now {new.get(k)!r}; "
                            "use the same settings to resume, or a new --out")

    @property
    def trained_on(self) -> str | None:
        """sha256 of the manifest the run was trained on (env.json), None for a run without one."""
        return io.read_json(self.env).get("manifest_sha256") if self.env.exists() else None

    def check_trained_on(self, manifest_sha256: str, root: Path, what: str, fix: str) -> None:
        """UserError unless the run was trained on this manifest (or records none): its folds and holdout, or its
        teachers, belong to the data it was made with."""
        if self.trained_on not in (None, manifest_sha256):
            raise UserError(f"{self.env}: {what} trained on other data (manifest sha256 {self.trained_on[:12]}… vs "
                            f"{manifest_sha256[:12]}… of {root}); {fix}")

    def write_config(self, cfg: Any) -> None:
        io.write_yaml(self.config, to_dict(cfg))

    def write_env(self, seed: int, device: str, extra: dict | None = None) -> None:
        io.write_json(self.env, environment(seed, device) | (extra or {}))


def require_done(run: RunDir, folds: Iterable[int | str], what: str, command: str) -> None:
    """The one "these folds are missing" message: UserError naming the unfinished folds and the command that
    resumes them (`command` … `--fold K` trains one)."""
    missing = [k for k in folds if not run.is_done(k)]
    if missing:
        raise UserError(f"{run.path}: {what} {missing} are not finished; resume them: {command} "
                        f"(or one at a time: {command} --fold {missing[0]})")


def default_run_dir(dataset: str, model: str) -> str:
    """runs/<dataset>/<model>: `dataset` is the manifest's name (phantom for the synthetic default), `model` the
    model name with `timm:` and path separators made file-safe."""
    safe = model.replace("timm:", "").replace("/", "-").replace(":", "-")
    return str(Path(DEFAULT_RUNS_DIR) / dataset / safe)


def flatten_config(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("space", "overrides", "sweep"):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
    return out


def changed_keys(old: dict, new: dict, cls: type) -> list[str]:
    """Keys of two flattened configs of `cls` whose values differ, runtime-only keys excepted. A key the old one
    lacks was added to the package after the run was made: at its default it is no change."""
    default = flatten_config(to_dict(cls()))
    return [k for k in sorted(set(old) | set(new)) if not is_runtime_key(k) and old.get(k) != new.get(k)
            and not (k not in old and k in default and new.get(k) == default[k])]


def is_runtime_key(key: str) -> bool:
    return key in RUNTIME_KEYS or any(key.startswith(r + ".") for r in RUNTIME_KEYS)


def environment(seed: int, device: str) -> dict:
    """Versions, git sha, device, seed and command line: what is needed to reproduce a run."""
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("kd_fracture", "torch", "torchvision", "timm", "albumentations", "scikit-learn", "optuna", "numpy",
                "pandas", "safetensors", "opencv-python-headless"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "command": " ".join([Path(sys.executable).name, "-m", *sys.argv]) if sys.argv else None,
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": seed,
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": cpu_model(),
        "cpu_bf16": engine.cpu_bf16_supported(),  # what train.precision auto saw (KD_FRACTURE_CPU_BF16 can force it)
        "cpu_bf16_native": engine.cpu_has_native_bf16(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "git_sha": git_sha(),
        "versions": versions,
    }


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else platform.processor(): timings differ 2× between CPU families."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False)
