"""benchmarks/run.py: `--quick` writes a complete, self-consistent results.json / results.md (timings are never
asserted: they depend on the machine), and the helpers that turn timings into figures are right."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS_DIR) not in sys.path:  # the suite lives outside the package: run.py, common.py, bench_<name>.py
    sys.path.insert(0, str(BENCHMARKS_DIR))

import bench_pruning  # noqa: E402
import bench_scale  # noqa: E402
import common  # noqa: E402
import run as bench  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    work = tmp_path_factory.mktemp("bench_work")
    rc = bench.main(["--quick", "--threads", "1", "--out", str(out), "--cache-dir", str(work / "cache"),
                     "--scale-dir", str(work)])
    return rc, out, work


def test_quick_run_writes_every_benchmark_with_a_complete_schema(quick_run):
    rc, out, _ = quick_run
    assert rc == 0
    report = json.loads((out / "results.json").read_text())
    assert report["schema_version"] == common.SCHEMA_VERSION
    assert list(report["benchmarks"]) == list(bench.BENCHMARKS)
    env = report["environment"]
    assert env["torch_threads"] == 1 and env["versions"]["torch"] and env["cpu_count"] >= 1
    assert report["settings"]["repeats"] == common.QUICK.repeats
    ids = []
    for name, entry in report["benchmarks"].items():
        assert entry["figures"], f"{name} reported no figure"
        for fig in entry["figures"]:
            assert {"value", "target", "met", "unit", "op", "id", "name"} <= fig.keys(), (name, fig)
            assert isinstance(fig["met"], bool) and fig["unit"] and fig["op"] in ("<=", ">=")
            assert isinstance(fig["value"], (int, float)) and isinstance(fig["target"], (int, float))
            assert math.isfinite(fig["value"]) and fig["value"] >= 0, (name, fig)
            assert fig["met"] == (fig["value"] <= fig["target"] if fig["op"] == "<=" else fig["value"] >= fig["target"])
            ids.append(fig["id"])
        for m in entry["measurements"].values():
            assert set(m) == {"value", "unit"}
    assert len(ids) == len(set(ids)), ids
    # the six items of the issue: pipeline at two sizes, params + latency ratios, pruning saving + gap, scale
    assert {"1a", "1b", "2", "3", "4a", "4b", "4c", "5a", "5b", "6a", "6b"} <= set(ids)
    markdown = (out / "results.md").read_text()
    for fig_id in ids:
        assert f"| {fig_id} |" in markdown


def test_scale_files_are_removed(quick_run):
    _, _, work = quick_run
    assert (work / "cache").is_dir()  # the phantom stays cached; the 1-byte scale tree is deleted
    assert not list(work.glob("kd_fracture_scale_*"))


def test_unknown_benchmark_is_a_user_error(tmp_path, capsys):
    assert bench.main(["--only", "pipline", "--out", str(tmp_path)]) == 2
    assert "pipline" in capsys.readouterr().err and not (tmp_path / "results.json").exists()


def test_paired_alternates_the_arm_order():
    calls = []
    times = common.paired({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in times.values()] == [3, 3]


def test_ratio_median_pairs_repeats():
    # per-repeat ratios 2, 3, 10 -> 3; a ratio of medians would give 3.33
    assert common.ratio_median([2.0, 6.0, 10.0], [1.0, 2.0, 1.0]) == 3.0


def test_figure_met_follows_direction():
    assert common.Figure("x", "x", 1.05, 1.10, "<=", "×").met
    assert not common.Figure("x", "x", 1.2, 1.10, "<=", "×").met
    assert common.Figure("x", "x", 3.0, 3.0, ">=", "×").as_dict()["met"] is True


def test_study_boundary_never_splits_a_study():
    rows = [("train", f"MURA-v1.1/train/XR_HAND/patient1/study{s}_negative/image{v}.png", 0)
            for s, views in ((1, 2), (2, 3)) for v in range(views)]
    assert bench_scale.study_boundary(rows, 3) == 2  # row 3 would cut study 2 after its first image
    assert bench_scale.study_boundary(rows, 2) == 2 and bench_scale.study_boundary(rows, 5) == 5


def test_proxy_fold_score_is_deterministic_and_prefers_the_optimum():
    best = dict(bench_pruning.PROXY_OPTIMUM, **{"student.overrides.depth": 3, "student.overrides.embed_dim": 192})
    worse = dict(best, **{"train.lr": 5e-4, "kd.alpha": 0.0})
    assert bench_pruning.proxy_fold_score(best, 1, 0.03) == bench_pruning.proxy_fold_score(dict(best), 1, 0.03)
    assert bench_pruning.proxy_fold_score(best, 1, 0.03) != bench_pruning.proxy_fold_score(best, 2, 0.03)
    assert bench_pruning.proxy_value(best) - bench_pruning.proxy_value(worse) > 0.1
