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
    assert list(report["benchmarks"]) == list(bench.ALL)  # --quick runs the long benchmarks too, at tiny sizes
    env = report["environment"]
    assert env["torch_threads"] == 1 and env["versions"]["torch"] and env["cpu_count"] >= 1
    assert report["settings"]["repeats"] == common.QUICK.repeats
    ids = []
    for name, entry in report["benchmarks"].items():
        assert entry["figures"], f"{name} reported no figure"
        for fig in entry["figures"]:
            assert {"value", "target", "met", "unit", "op", "id", "name"} <= fig.keys(), (name, fig)
            assert fig["unit"] and fig["op"] in ("<=", ">=") and isinstance(fig["target"], (int, float))
            ids.append(fig["id"])
            if fig["met"] == common.NOT_SUPPORTED:  # e.g. bf16 on a CPU without native bf16: recorded, not a miss
                assert fig["value"] is None and fig["note"], (name, fig)
                continue
            assert isinstance(fig["met"], bool)
            assert isinstance(fig["value"], (int, float))
            assert math.isfinite(fig["value"]) and fig["value"] >= 0, (name, fig)
            assert fig["met"] == (fig["value"] <= fig["target"] if fig["op"] == "<=" else fig["value"] >= fig["target"])
        for m in entry["measurements"].values():
            assert set(m) == {"value", "unit"}
    assert len(ids) == len(set(ids)), ids
    # the six items of the issue: pipeline at two sizes, params + latency ratios, pruning saving + gap, scale
    assert {"1a", "1b", "2", "3", "4a", "4b", "4c", "5a", "5b", "6a", "6b"} <= set(ids)
    # issue 14's figures, at the quick sizes (peer 32/64 px, bf16 32 px, latency 32 px + latency_img_size 64 px)
    q = common.QUICK
    assert {*(f"peer_epoch_{px}" for px in q.peer_sizes), "checkpoint_overhead", "student_gflops",
            "search_teacher_cost", *(f"bf16_{m}_{px}" for m in ("train", "infer") for px in q.bf16_sizes),
            *(f"student_latency_torch_{px}" for px in (q.latency_small_size, q.latency_img_size))} <= set(ids)
    markdown = (out / "results.md").read_text()
    for fig_id in ids:
        assert f"| {fig_id} |" in markdown
    search = next(f for f in report["benchmarks"]["search_teacher_cost"]["figures"])
    per_image = search["details"]["teacher_forwards_per_fold_training_image"]
    assert per_image["cached"] == 3.0  # V + 1 = 3 passes per training image per fold (kd.views 2)
    assert per_image["online"] == q.search_trials * q.search_epochs  # one per image per trial epoch (none pruned)


def test_long_benchmarks_are_opt_in():
    assert "search_teacher_cost" in bench.LONG and "search_teacher_cost" not in bench.BENCHMARKS
    assert set(bench.ALL) == set(bench.BENCHMARKS) | set(bench.LONG)


def test_not_supported_figure_is_recorded_not_missed():
    fig = common.Figure.not_supported("bf16_train_64", "bf16", 1.4, ">=", "×", "no native bf16")
    d = fig.as_dict()
    assert d["met"] == common.NOT_SUPPORTED and d["value"] is None and d["note"] == "no native bf16"
    report = {"environment": {"versions": {"torch": "x"}, "cpu": "cpu", "cpus_usable": 2, "torch_threads": 2,
                              "omp_wait_policy": "PASSIVE", "num_workers": 0, "load_average_start": [1.0]},
              "settings": {"latency_threads": 1}, "mode_flag": "", "started": "now", "wall_s": 1.0,
              "benchmarks": {"bf16": {"figures": [d], "measurements": {}, "notes": []}}}
    md = bench.format_markdown(report)
    assert "| bf16_train_64 | bf16 | n/a | >= 1.4 | not supported | × |" in md and "no native bf16" in md


def test_call_timer_counts_nested_calls_once_and_restores():
    import types

    mod = types.SimpleNamespace()
    mod.inner = lambda: None
    mod.outer = lambda: mod.inner()
    original = mod.outer
    with common.CallTimer([(mod, "outer", "a"), (mod, "inner", "b"), (mod, "absent", "c")]) as timer:
        mod.outer()
        mod.inner()
    assert timer.calls == {"a": 1, "b": 1} and timer.missing and mod.outer is original


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
