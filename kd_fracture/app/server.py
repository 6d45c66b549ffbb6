"""The local web app: a FastAPI application over one run's models (`create_app`), and the runs under a runs root.

    GET  /                      the page (static/index.html: vanilla JS and CSS, nothing fetched from the network)
    GET  /api/info              the run, its models and thresholds, the limits, the disclaimer
    POST /api/predict           multipart `files` (one or more images of one study) → per file: each model's
                                probability (the teacher's with its spread over the folds), decision, Grad-CAM overlay;
                                per model: the study-level decision and the measured latency
    GET  /api/runs[?root=DIR]   the runs under the runs root (DIR must lie inside it) with headline numbers
    GET  /runs/<rel>/report.html  a run's self-contained report page, read-only; nothing outside the runs root

Models are loaded once, when the app is created (`load_run_models`, the teacher and, when the run has a `distill/`
study, the student), and their fold modules stay resident on the device; requests share them under one lock.
Uploads are written to a `TemporaryDirectory` under generated names (never the client's file name) that is removed
when the request ends. A file that is not an image, is truncated, or is larger than the pixel limit (checked on the
header, before decoding) gets one error of its own; the other files of the request are still predicted.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import re
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
import yaml
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from torch import nn

from kd_fracture import __version__, extras, search
from kd_fracture.config import replace
from kd_fracture.data.imageio import DICOM_SUFFIX, RASTER_SUFFIXES, has_dicm_marker, read_grayscale
from kd_fracture.data.inputs import UNKNOWN_LABEL, InputImage, as_manifest
from kd_fracture.errors import DataError, UserError
from kd_fracture.pipelines.predict import predict_images, study_predictions
from kd_fracture.runs.models import RunModels, load_run_models
from kd_fracture.train import engine

STATIC = Path(__file__).parent / "static"
REPORT = "report.html"
DISCLAIMER = ("Research model, not a diagnostic device: its outputs are experimental, have not been clinically "
              "validated and must not be used to diagnose, treat or triage patients.")
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64_000_000
"""Width × height above which an image is refused from its header alone (a 10,000 × 10,000 PNG is)."""
MAX_FILES = 64
UPLOAD_STUDY = "upload"
"""Study of every uploaded image: the files of one request are one study."""
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'; sandbox"
_RUN_SKIP = re.compile(r"^(fold_.*|plots|tables|holdout|evaluate|node_modules|__pycache__|.*\.old)$")
MAX_WALK_DIRS = 5000


# ----------------------------------------------------------------------------------------------------------------------
# resident models


@dataclass(frozen=True)
class ResidentModels(RunModels):
    """A RunModels whose fold modules are loaded once, on `device`, and reused by every request: the inherited
    `predict` (`runs.models.ensemble_predict`) asks `load` for each member."""

    device: torch.device = torch.device("cpu")
    modules: dict = field(default_factory=dict, compare=False, repr=False)

    def load(self, member: int | str) -> nn.Module:
        if member not in self.modules:
            self.modules[member] = super().load(member).to(self.device).eval()
        return self.modules[member]


def resident(models: RunModels, device: torch.device) -> ResidentModels:
    """`models` with every member loaded now (fail fast at startup), DataLoader in-process (no worker start-up per
    request)."""
    cfg = replace(models.cfg, **{"data.num_workers": 0})
    kept = {f.name: getattr(models, f.name) for f in dataclasses.fields(RunModels)}
    out = ResidentModels(**{**kept, "cfg": cfg}, device=device)
    for k in out.members:
        out.load(k)
    return out


@dataclass
class AppState:
    run_path: Path
    runs_root: Path
    device: torch.device
    models: dict[str, ResidentModels]
    notes: list[str]
    max_upload_bytes: int
    max_pixels: int
    gradcam: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    load_s: float = 0.0


def load_state(run_path: str | Path, device: str | None, runs_root: str | Path | None, max_upload_bytes: int,
               max_pixels: int, student: bool) -> AppState:
    t0 = time.perf_counter()
    run_path = Path(run_path)
    teacher = load_run_models(run_path, "teacher")
    dev = engine.resolve_device(device or teacher.cfg.train.device)
    models, notes = {"teacher": resident(teacher, dev)}, []
    if student and (run_path / "distill").is_dir():
        try:
            models["student"] = resident(load_run_models(run_path, "student"), dev)
        except UserError as e:
            notes.append(f"student not loaded: {e}")
    gradcam = extras.optional("pytorch_grad_cam", "gradcam", "Grad-CAM overlays", log=False) is not None
    if not gradcam:
        notes.append("Grad-CAM overlays are off: pytorch_grad_cam is not installed "
                     "(pip install 'kd_fracture[gradcam]')")
    root = Path(runs_root) if runs_root is not None else run_path.resolve().parent.parent
    return AppState(run_path=run_path, runs_root=root.resolve(), device=dev, models=models, notes=notes,
                    max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, gradcam=gradcam,
                    load_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------------------
# uploads


class UploadLimit:
    """ASGI middleware: a POST body over `max_bytes` gets 413 with a JSON message, before any multipart parsing
    (checked on Content-Length, and counted while reading when there is none)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self.too_large(int(length), scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self.too_large(None, scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def too_large(self, size: int | None, scope, receive, send):
        limit = self.max_bytes / 2**20
        got = f" ({size / 2**20:.1f} MB)" if size is not None else ""
        await JSONResponse(status_code=413, content={
            "detail": f"upload too large{got}: the limit is {limit:.3g} MB per request; send fewer or smaller files, "
                      f"or restart the app with a larger --max-upload-mb"})(scope, receive, send)


def shown_name(filename: str | None, i: int) -> str:
    """The client's file name for display only: its last path part, printable, at most 120 characters."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = "".join(c for c in name if c.isprintable()).strip()[:120]
    return name or f"file {i + 1}"


def sniff_suffix(head: bytes, name: str) -> str | None:
    """The image type from the content (PNG, JPEG, TIFF, DICOM Part 10), not from the name; a `.dcm` name without the
    DICM marker (ACR-NEMA style) is left to the DICOM reader; None: not an image this package reads."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):  # little- / big-endian TIFF (16-bit radiographs are often TIFF)
        return ".tif"
    if has_dicm_marker(head) or name.lower().endswith(DICOM_SUFFIX):
        return DICOM_SUFFIX
    return None


def header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header without decoding the pixels; None when the header cannot be read
    (the decoder then reports the problem)."""
    if path.suffix in RASTER_SUFFIXES:
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    return im.size
        except Image.DecompressionBombError as e:
            found = re.search(r"\((\d+) pixels\)", str(e))
            return (int(found[1]), 1) if found else (2**31, 1)
        except Exception:  # noqa: BLE001 — PIL raises many types for a damaged header
            return None
    pydicom = extras.optional("pydicom", "dicom", "DICOM", log=False)
    if pydicom is None:
        return None
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        return int(ds.Columns), int(ds.Rows)
    except Exception:  # noqa: BLE001
        return None


def stage_upload(data: bytes, name: str, i: int, tmp: Path, max_pixels: int) -> tuple[InputImage | None, dict]:
    """Write one upload under a generated name, check its type and size, decode it once → (image or None, entry)."""
    entry: dict[str, Any] = {"name": name, "ok": False, "error": None, "bytes": len(data)}
    if not data:
        return None, {**entry, "error": "empty file (0 bytes)"}
    suffix = sniff_suffix(data[:132], name)
    if suffix is None:
        return None, {**entry, "error": "not an image: the content is not PNG, JPEG, TIFF or DICOM (whatever the file "
                                        "name says)"}
    path = tmp / f"upload_{i:03d}{suffix}"
    path.write_bytes(data)
    size = header_size(path)
    if size is not None:
        entry["width"], entry["height"] = size
        if size[0] * size[1] > max_pixels:
            return None, {**entry, "error": f"image too large: {size[0]} × {size[1]} pixels is over the limit of "
                                            f"{max_pixels:,} pixels; downscale it before uploading"}
    try:
        img = read_grayscale(path)
    except DataError as e:
        detail = str(e).replace(f"{path}: ", "").replace(str(path), name)
        return None, {**entry, "error": detail.split("; re-export")[0].split("; remove its row")[0]}
    entry["width"], entry["height"] = int(img.shape[1]), int(img.shape[0])
    return InputImage(path=path, shown=name, study=UPLOAD_STUDY, body_part="unknown", label=UNKNOWN_LABEL), entry


def png_data_uri(rgb: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]) if rgb.ndim == 3 else rgb)
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def model_info(m: ResidentModels) -> dict:
    return {"role": m.role, "description": m.description, "architecture": m.cfg.model.name,
            "members": [str(k) for k in m.members], "threshold": finite(m.cfg.eval.threshold),
            "threshold_source": m.threshold_source, "img_size": m.cfg.data.img_size}


def run_model(m: ResidentModels, images: list[InputImage], state: AppState) -> tuple[pd.DataFrame, dict, list]:
    """(image predictions, the model's summary with study decision and latency, overlays or Nones)."""
    t0 = time.perf_counter()
    pred = predict_images(m, images, state.device)
    predict_ms = (time.perf_counter() - t0) * 1000
    threshold = float(m.cfg.eval.threshold)
    study = study_predictions(pred, threshold)
    overlays: list = [None] * len(images)
    gradcam_ms = None
    if state.gradcam:
        from kd_fracture.report.figures import explain_rows, overlay

        t0 = time.perf_counter()
        manifest = as_manifest(images)
        shown, maps, _ = explain_rows(m, manifest.df, manifest.root, state.device)
        overlays = [png_data_uri(overlay(img, cam)) for img, cam in zip(shown, maps)]
        gradcam_ms = (time.perf_counter() - t0) * 1000
    row = study.iloc[0]
    summary = {**model_info(m), "latency_ms": {"predict": round(predict_ms, 2),
                                               "gradcam": None if gradcam_ms is None else round(gradcam_ms, 2),
                                               "per_image_predict": round(predict_ms / len(images), 2)},
               "study": {"n_images": int(row["n_images"]), "prob": finite(row["prob"]),
                         "decision": row["prediction"]}}
    return pred, summary, overlays


def file_result(pred_row: pd.Series, threshold: float, overlay_uri: str | None) -> dict:
    folds = {c.removeprefix("prob_fold"): finite(pred_row[c]) for c in pred_row.index if c.startswith("prob_fold")}
    values = np.array([v for v in folds.values() if v is not None], dtype=float)
    return {"prob": finite(pred_row["prob"]), "decision": pred_row["prediction"], "threshold": threshold,
            "fold_probs": folds,
            "spread": {"min": finite(values.min()), "max": finite(values.max()), "std": finite(values.std())}
            if len(values) else None,
            "overlay": overlay_uri}


# ----------------------------------------------------------------------------------------------------------------------
# runs


def find_runs(root: Path, max_depth: int = 7) -> list[Path]:
    """Run directories under `root` (a folder with config.yaml and fold_*/ or tables/), distilled variants and
    studies included; hidden folders and a run's own fold/plot/table folders are not searched."""
    found, seen = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        seen += 1
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _RUN_SKIP.match(d)) \
            if depth < max_depth and seen < MAX_WALK_DIRS else []
        if "config.yaml" in filenames and ("tables" in os.listdir(here) or REPORT in filenames
                                           or any(d.startswith("fold_") for d in os.listdir(here))):
            found.append(here)
    return found


def read_headline(run: Path, root: Path) -> dict:
    rel = run.relative_to(root).as_posix()
    out: dict[str, Any] = {"path": rel or ".", "model": None, "kind": "run", "cv": None, "holdout": None,
                           "report": None, "has_distill": (run / "distill").is_dir()}
    try:
        raw = yaml.safe_load((run / "config.yaml").read_text()) or {}
        model = raw.get("model") or raw.get("student") or {}
        out["model"] = model.get("name") if isinstance(model, dict) else None
        out["kind"] = "distill study" if "student" in raw and "model" not in raw else out["kind"]
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    folds = run / "tables" / "cv_folds.csv"
    if folds.is_file():
        try:
            table = pd.read_csv(folds, dtype={"fold": str}).set_index("fold")
            keys = [k for k in ("kappa", "auroc", "accuracy", "sensitivity", "specificity") if k in table.columns]
            out["cv"] = {"n_folds": int(sum(str(f).isdigit() for f in table.index)),
                         **{k: finite(table.loc["mean", k]) for k in keys if "mean" in table.index},
                         **{f"{k}_std": finite(table.loc["std", k]) for k in keys if "std" in table.index}}
        except (OSError, ValueError, KeyError, pd.errors.ParserError):
            pass
    metrics = run / "holdout" / "metrics.json"
    if metrics.is_file():
        try:
            ens = json.loads(metrics.read_text()).get("fold_ensemble") or {}
            study = ens.get("study") or {}
            ci = (ens.get("ci95") or {}).get("kappa") or {}
            out["holdout"] = {"n_studies": ens.get("n_studies"), "threshold": ens.get("threshold"),
                              **{k: study.get(k) for k in ("kappa", "auroc", "accuracy", "sensitivity",
                                                           "specificity")},
                              "kappa_low": ci.get("low"), "kappa_high": ci.get("high")}
        except (OSError, ValueError, AttributeError):
            pass
    if (run / REPORT).is_file():
        out["report"] = "/runs/" + (f"{rel}/" if rel else "") + REPORT
    if out["has_distill"]:  # its studies live in <run>/distill/<study>.db: the dashboard serves them, started apart
        out["dashboard"] = {"url": f"http://127.0.0.1:{search.DASHBOARD_PORT}/dashboard/",
                            "command": f"python -m kd_fracture.dashboard --run {run}"}
    return out


def inside(root: Path, rel: str) -> Path | None:
    """root/rel resolved (symlinks followed), or None when it lies outside root."""
    try:
        path = (root / rel).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return path if path == root or path.is_relative_to(root) else None


# ----------------------------------------------------------------------------------------------------------------------
# the app


def create_app(run_path: str | Path, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, *, device: str | None = None,
               runs_root: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               student: bool = True) -> FastAPI:
    """The app for the run at `run_path`: its models are loaded here, once (a UserError for a bad run)."""
    state = load_state(run_path, device, runs_root, max_upload_bytes, max_pixels, student)
    app = FastAPI(title="kd_fracture", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kd = state
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)

    @app.middleware("http")
    async def headers(request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.get("/", response_class=HTMLResponse)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": PAGE_CSP})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/info")
    def info():
        return {"version": __version__, "run": str(state.run_path), "runs_root": str(state.runs_root),
                "device": str(state.device), "disclaimer": DISCLAIMER,
                "models": {role: model_info(m) for role, m in state.models.items()},
                "gradcam": state.gradcam, "notes": state.notes, "load_s": round(state.load_s, 3),
                "limits": {"max_upload_bytes": state.max_upload_bytes, "max_pixels": state.max_pixels,
                           "max_files": MAX_FILES}}

    @app.post("/api/predict")
    def predict(files: list[UploadFile] = File(...)):
        if len(files) > MAX_FILES:
            raise HTTPException(400, f"{len(files)} files: at most {MAX_FILES} per request (one study)")
        entries, images, where = [], [], []
        with tempfile.TemporaryDirectory(prefix="kd_app_") as tmp:
            for i, upload in enumerate(files):
                name = shown_name(upload.filename, i)
                image, entry = stage_upload(upload.file.read(), name, i, Path(tmp), state.max_pixels)
                entries.append(entry)
                if image is not None:
                    images.append(image)
                    where.append(i)
            summaries = {}
            if images:
                with state.lock:
                    for role, m in state.models.items():
                        pred, summaries[role], overlays = run_model(m, images, state)
                        for j, i in enumerate(where):
                            entries[i][role] = file_result(pred.iloc[j], summaries[role]["threshold"], overlays[j])
                for i in where:
                    entries[i]["ok"] = True
        notes = list(state.notes)
        if not images:
            notes.append("no file of the request is a readable image; nothing was predicted")
        return {"files": entries, "models": summaries, "n_files": len(entries), "n_predicted": len(images),
                "notes": notes, "disclaimer": DISCLAIMER}

    @app.get("/api/runs")
    def runs(root: str | None = Query(None, description="a folder inside the runs root")):
        base = state.runs_root
        if root is not None:
            chosen = inside(base, root)  # relative to the runs root, or absolute inside it
            if chosen is None or not chosen.is_dir():
                raise HTTPException(400, f"root {root}: not a folder inside the runs root {base} (restart the app "
                                         f"with --runs-root to list another one)")
            base = chosen
        rows = [read_headline(r, state.runs_root) for r in find_runs(base)]
        return {"root": str(base), "runs_root": str(state.runs_root), "runs": rows,
                "current": str(state.run_path.resolve())}

    @app.get("/runs/{rel:path}")
    def report(rel: str):
        path = inside(state.runs_root, rel)
        if path is None or path.name != REPORT or not path.is_file():
            raise HTTPException(404, "not found")
        return FileResponse(path, media_type="text/html", headers={"Content-Security-Policy": REPORT_CSP})

    return app
