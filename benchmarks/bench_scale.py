"""Benchmark 6, `scale`: manifest load + validation + folds at growing row counts (per-row time, peak memory)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from common import Context, Figure, Result

from kd_fracture import io


def write_scale_tree(root: Path, max_rows: int) -> list[tuple[str, str, int]]:
    """Create a MURA-v1.1 tree of 1-byte "images" for ≈ max_rows rows; return (split, image_path, label) in order.

    Patient i: body part BODY_PARTS[i % 7], 1–3 studies of 1–4 views (MURA's mix), every 12th patient in valid
    (the holdout), labels drawn per study. Only existence is checked without --verify-images, so 1 byte is enough.
    """
    from kd_fracture.data.manifest import BODY_PARTS

    rng = np.random.default_rng(0)
    rows: list[tuple[str, str, int]] = []
    patient = 0
    while len(rows) < max_rows:
        patient += 1
        split = "valid" if patient % 12 == 0 else "train"
        part = BODY_PARTS[patient % len(BODY_PARTS)]
        for study in range(1, int(rng.choice([1, 2, 3], p=[0.65, 0.25, 0.10])) + 1):
            label = int(rng.random() < 0.4)
            kind = "positive" if label else "negative"
            study_dir = f"MURA-v1.1/{split}/{part}/patient{patient:06d}/study{study}_{kind}"
            (root / study_dir).mkdir(parents=True)
            for view in range(1, int(rng.choice([1, 2, 3, 4], p=[0.12, 0.43, 0.30, 0.15])) + 1):
                path = f"{study_dir}/image{view}.png"
                (root / path).write_bytes(b"\0")
                rows.append((split, path, label))
    return rows


def study_boundary(rows: Sequence[tuple[str, str, int]], n: int) -> int:
    """The largest cut ≤ n that does not split a study (rows of a study are consecutive)."""
    def study(i: int) -> str:
        return rows[i][1].rsplit("/", 1)[0]

    while 0 < n < len(rows) and study(n - 1) == study(n):
        n -= 1
    return n


def write_scale_csvs(root: Path, rows: Sequence[tuple[str, str, int]]) -> None:
    """The four MURA CSVs listing exactly `rows` (complete studies)."""
    for split in ("train", "valid"):
        mine = [(p, y) for s, p, y in rows if s == split]
        studies = dict.fromkeys((p.rsplit("/", 1)[0], y) for p, y in mine)
        io.write_text(root / "MURA-v1.1" / f"{split}_image_paths.csv", "".join(f"{p}\n" for p, _ in mine))
        io.write_text(root / "MURA-v1.1" / f"{split}_labeled_studies.csv",
                      "".join(f"{s}/,{y}\n" for s, y in studies))


def scale_worker(root: str, manifests_dir: str, queue) -> None:
    """In a fresh process: load + validate the manifest, make and write 5 folds; report seconds and the peak
    resident memory above the imports (Linux: VmHWM after resetting it via /proc/self/clear_refs; `ru_maxrss` would
    still hold the parent's size from before exec). Elsewhere: tracemalloc's peak, timed in a second pass."""
    from kd_fracture.data.folds import load_or_make_folds
    from kd_fracture.data.manifest import load_manifest

    def work() -> tuple[int, float, float]:
        t0 = time.perf_counter()
        manifest = load_manifest(root)
        t1 = time.perf_counter()
        load_or_make_folds(manifest, 5, 0, manifests_dir, regenerate=True)
        return len(manifest.df), t1 - t0, time.perf_counter() - t1

    if _reset_peak_rss():
        base_kb = _proc_status_kb("VmRSS")
        rows, load_s, folds_s = work()
        peak_kb, method = _proc_status_kb("VmHWM") - base_kb, "VmHWM - VmRSS before (Linux /proc)"
    else:
        import tracemalloc

        rows, load_s, folds_s = work()
        tracemalloc.start()
        work()
        peak_kb, method = tracemalloc.get_traced_memory()[1] / 1024, "tracemalloc peak"
        tracemalloc.stop()
    queue.put({"rows": rows, "load_s": load_s, "folds_s": folds_s, "peak_kb": max(0, peak_kb), "method": method})


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return _proc_status_kb("VmHWM") > 0
    except (OSError, ValueError):
        return False


def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ValueError(f"/proc/self/status has no {key}")


def run(ctx: Context) -> Result:
    """Manifest load + validation + folds at growing row counts, each in a fresh process; per-row time and peak
    memory should stay flat (linear growth)."""
    import multiprocessing

    s, res = ctx.settings, Result()
    base = Path(s.scale_dir) if s.scale_dir else _scale_base()
    root = Path(tempfile.mkdtemp(prefix="kd_fracture_scale_", dir=base))
    try:
        t0 = time.perf_counter()
        all_rows = write_scale_tree(root, max(s.scale_rows))
        res.measure(f"creating {len(all_rows)} files", time.perf_counter() - t0, "s")
        points = []
        mp = multiprocessing.get_context("spawn")
        for n in s.scale_rows:
            rows = all_rows[:study_boundary(all_rows, n)]
            write_scale_csvs(root, rows)
            queue = mp.Queue()
            proc = mp.Process(target=scale_worker, args=(str(root), str(root / f"manifests_{n}"), queue))
            proc.start()
            point = queue.get(timeout=600)
            proc.join()
            point["total_s"] = point["load_s"] + point["folds_s"]
            points.append(point)
            res.measure(f"{point['rows']} rows: load + validate", point["load_s"], "s")
            res.measure(f"{point['rows']} rows: folds", point["folds_s"], "s")
            res.measure(f"{point['rows']} rows: time per row", 1e6 * point["total_s"] / point["rows"], "µs")
            res.measure(f"{point['rows']} rows: peak memory per row", 1024 * point["peak_kb"] / point["rows"],
                        "bytes")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first, last = points[0], points[-1]
    per_row = [p["total_s"] / p["rows"] for p in points]
    mem_row = [p["peak_kb"] / p["rows"] for p in points]
    fs = _filesystem(base)
    details = {"points": points, "filesystem": fs, "rows_growth": last["rows"] / first["rows"]}
    res.figures.append(Figure(
        "6a", f"time per row, {last['rows']} ÷ {first['rows']} rows", per_row[-1] / per_row[0], 1.5, "<=",
        "× (ratio)", meaning="per-row time stays flat as rows grow ×16 (≤ 1.5 allows n·log n and noise, not n²)",
        details=details))
    res.figures.append(Figure(
        "6b", f"peak memory per row, {last['rows']} ÷ {first['rows']} rows",
        mem_row[-1] / mem_row[0] if mem_row[0] else float("inf"), 1.5, "<=", "× (ratio)",
        meaning="peak memory per row stays flat (linear total)", details={"filesystem": fs}))
    res.notes.append(f"files on {fs}; created once for the largest point, CSVs rewritten per point")
    return res


def _scale_base() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=10,
                             check=False).stdout.split("\n")
        return f"{path} ({out[1].split()[1]})"
    except (OSError, IndexError, subprocess.SubprocessError):
        return str(path)
