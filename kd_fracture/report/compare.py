"""`python -m kd_fracture.compare RUN_A RUN_B … --out DIR`: one table across cv runs, paired tests on shared folds.

The table (comparison.{csv,md,tex}) has one row per run: model, freeze mode, image size, parameters, study κ and
AUROC as mean ± std over the CV folds, and the holdout fold-ensemble's study κ and AUROC with their 95% bootstrap
CIs. comparison_values.csv holds the same numbers unformatted.

Runs whose folds are identical (same study → fold assignment in folds.csv) are compared pairwise on the per-fold
metric with the corrected resampled t-test (paired_tests.{csv,md,tex}); runs on other folds are listed, not tested.

Backbone sweeps: `python -m kd_fracture.cv --config studies/backbone_sweep.yaml` calls `pipelines.sweep.run_sweep`, which runs every
entry of the config's `sweep:` on the same folds into `<run_dir>/<entry>/` and ends with this comparison in
`<run_dir>/comparison/`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from kd_fracture import io
from kd_fracture.config import CVConfig
from kd_fracture.errors import UserError
from kd_fracture.report import tables
from kd_fracture.metrics import STUDY_METRICS
from kd_fracture.runs.rundir import RunDir, require_done

COMPARISON_DIR = "comparison"


# ----------------------------------------------------------------------------------------------------------------------
# statistics


def corrected_resampled_ttest(diffs: np.ndarray, n_train: float, n_test: float) -> tuple[float, float]:
    """Two-sided corrected resampled t-test of paired per-fold differences (Nadeau & Bengio 2003).

    C. Nadeau and Y. Bengio, "Inference for the Generalization Error", Machine Learning 52:239–281, 2003 (the
    "corrected resampled t-test" of Bouckaert & Frank 2004). The K fold scores are not independent — any two
    folds' training sets overlap — so the naive paired t-test's variance var(d)/K is too small and its p-values
    too optimistic. The correction inflates it by the test/train size ratio:

        t = mean(d) / sqrt((1/K + n_test/n_train) · var(d)),   var with ddof = 1,   df = K − 1.

    diffs: (K,) per-fold differences d_k = score_A,k − score_B,k. Returns (t, p). Identical scores (var(d) = 0)
    give (0, 1) when mean(d) = 0 and (±inf, 0) otherwise.
    """
    d = np.asarray(diffs, dtype=float)
    k = len(d)
    if k < 2 or not np.isfinite(d).all():
        return math.nan, math.nan
    mean, var = float(d.mean()), float(d.var(ddof=1))
    if np.ptp(d) == 0.0:  # identical differences: var(d) is 0 up to rounding
        return (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / math.sqrt((1.0 / k + n_test / n_train) * var)
    return t, float(2.0 * stats.t.sf(abs(t), df=k - 1))


# ----------------------------------------------------------------------------------------------------------------------
# reading runs


@dataclass(frozen=True)
class RunResult:
    """What the comparison needs from one finished cv run directory."""

    name: str
    run: RunDir
    cfg: CVConfig
    folds: pd.DataFrame
    """One row per fold k: the fold's study-level metrics (STUDY_METRICS) and image_auroc."""
    holdout: dict
    """holdout/metrics.json["fold_ensemble"]: evaluate() result + ci95."""
    params: int
    trainable_params: int
    folds_key: str
    """sha256 of the sorted (study_id, fold) assignment: equal keys ⇔ the runs share folds."""
    n_test: float
    """Mean number of scored studies per fold (the t-test's n_test)."""
    n_train: float
    """Mean number of studies a fold model trained on: the pool outside the scored fold minus the inner-validation
    split (the t-test's n_train; Nadeau & Bengio's correction uses the training set's size)."""


def load_result(path: str | Path, name: str | None = None) -> RunResult:
    run = RunDir(path)
    if not run.config.is_file():
        raise UserError(f"{run.path}: not a cv run directory (no config.yaml)")
    cfg = run.saved_config(CVConfig)
    if cfg.sweep:
        entries = ", ".join(str(run.path / n) for n in cfg.sweep)
        raise UserError(f"{run.path}: is a sweep; compare its entries ({entries}) or read {run.path / COMPARISON_DIR}/")
    ks = list(range(cfg.data.folds))
    require_done(run, ks, "fold(s)", f"python -m kd_fracture.cv --out {run.path}")
    if not (run.holdout / "metrics.json").is_file():
        raise UserError(f"{run.path}: no holdout/metrics.json; run `python -m kd_fracture.cv --out {run.path} "
                        f"--aggregate` first")
    fold_json = {k: io.read_json(run.fold(k) / "metrics.json") for k in ks}
    folds = pd.DataFrame([{"fold": k, **{m: r["study"][m] for m in STUDY_METRICS}, "image_auroc": r["image"]["auroc"]}
                          for k, r in fold_json.items()]).set_index("fold")
    assignment = pd.read_csv(run.folds)[["study_id", "fold"]].sort_values("study_id", kind="mergesort")
    sizes = assignment["fold"].value_counts()
    return RunResult(
        name=name or run.path.name, run=run, cfg=cfg, folds=folds,
        holdout=io.read_json(run.holdout / "metrics.json")["fold_ensemble"],
        params=int(fold_json[0]["params"]), trainable_params=int(fold_json[0]["trainable_params"]),
        folds_key=io.sha256_bytes(assignment.to_csv(index=False, lineterminator="\n").encode()),
        n_test=float(sizes.mean()), n_train=float((len(assignment) - sizes).mean() * (1 - cfg.data.inner_val_frac)),
    )


def unique_names(paths: list[Path]) -> list[str]:
    """Run folder names, or longer path tails where two runs share a folder name."""
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    raise UserError(f"the same run is given twice: {[str(p) for p in paths]}")


# ----------------------------------------------------------------------------------------------------------------------
# tables


def values_row(r: RunResult) -> dict[str, Any]:
    ci, m = r.holdout["ci95"], r.cfg.model
    return {
        "run": r.name, "path": str(r.run.path), "model": m.name, "freeze": m.freeze, "pretrained": m.pretrained,
        "img_size": r.cfg.data.img_size, "in_chans": m.in_chans, "folds": len(r.folds), "params": r.params,
        "trainable_params": r.trainable_params,
        **{f"cv_{k}_mean": r.folds[k].mean() for k in ("kappa", "auroc")},
        **{f"cv_{k}_std": r.folds[k].std(ddof=1) for k in ("kappa", "auroc")},
        **{f"holdout_{k}{suffix}": ci[k][key] for k in ("kappa", "auroc")
           for suffix, key in (("", "value"), ("_low", "low"), ("_high", "high"))},
        "holdout_image_auroc": r.holdout["image"]["auroc"], "holdout_studies": r.holdout["n_studies"],
    }


def count_text(n: int) -> str:
    """513 → '513', 2_345_678 → '2.35 M' (a frozen backbone's head is a few hundred parameters)."""
    return f"{n:,}" if n < 100_000 else f"{n / 1e6:.2f} M"


def display_table(results: list[RunResult]) -> pd.DataFrame:
    """The human table: formatted mean ± std and [CI] strings."""
    rows = []
    for r in results:
        ci = r.holdout["ci95"]
        rows.append({
            "Run": r.name, "Model": r.cfg.model.name, "Freeze": r.cfg.model.freeze, "Image px": r.cfg.data.img_size,
            "Params (M)": f"{r.params / 1e6:.2f}" + (f" ({count_text(r.trainable_params)} trained)"
                                                     if r.trainable_params != r.params else ""),
            f"CV study κ ({len(r.folds)} folds)": tables.mean_pm_std(r.folds["kappa"]),
            "CV study AUROC": tables.mean_pm_std(r.folds["auroc"]),
            "Holdout study κ [95% CI]": tables.ci_text(ci["kappa"]["value"], ci["kappa"]["low"],
                                                          ci["kappa"]["high"]),
            "Holdout study AUROC [95% CI]": tables.ci_text(ci["auroc"]["value"], ci["auroc"]["low"],
                                                              ci["auroc"]["high"]),
        })
    return pd.DataFrame(rows)


def paired_tests(results: list[RunResult], metric: str = "kappa") -> pd.DataFrame:
    """Every pair of runs with identical folds: per-fold `metric` differences, corrected resampled t-test."""
    rows = []
    for a, b in itertools.combinations(results, 2):
        if a.folds_key != b.folds_key:
            continue
        d = (a.folds[metric] - b.folds[metric]).to_numpy()
        t, p = corrected_resampled_ttest(d, a.n_train, a.n_test)
        rows.append({"run_a": a.name, "run_b": b.name, "metric": f"study_{metric}", "folds": len(d),
                     "mean_a": a.folds[metric].mean(), "mean_b": b.folds[metric].mean(), "mean_diff": d.mean(),
                     "sd_diff": d.std(ddof=1) if len(d) > 1 else math.nan, "n_train": a.n_train, "n_test": a.n_test,
                     "t": t, "df": len(d) - 1, "p_value": p})
    return pd.DataFrame(rows, columns=["run_a", "run_b", "metric", "folds", "mean_a", "mean_b", "mean_diff",
                                       "sd_diff", "n_train", "n_test", "t", "df", "p_value"])


def compare_runs(paths: list[str | Path], out: str | Path, metric: str = "kappa",
                 names: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write comparison.{csv,md,tex}, comparison_values.csv, per_fold_<metric>.csv, paired_tests.* and summary.md
    into `out`; returns (values table, paired tests)."""
    if metric not in STUDY_METRICS:
        raise UserError(f"--metric {metric}: choose one of {', '.join(STUDY_METRICS)}")
    paths = [Path(p) for p in paths]
    names = names or unique_names(paths)
    results = [load_result(p, n) for p, n in zip(paths, names)]
    out = Path(out)
    values = pd.DataFrame([values_row(r) for r in results])
    display = display_table(results)
    tests = paired_tests(results, metric)
    per_fold = pd.DataFrame({r.name: r.folds[metric] for r in results}).rename_axis("fold").reset_index()

    written = tables.write_table(display, out / "comparison", "Study-level metrics across runs: CV mean ± std "
                                    "over folds, holdout fold-ensemble with 95% bootstrap CI")
    written += [io.write_csv(out / "comparison_values.csv", values),
                io.write_csv(out / f"per_fold_{metric}.csv", per_fold)]
    if len(tests):
        written += tables.write_table(tests, out / "paired_tests", f"Per-fold study {metric}: corrected resampled "
                                         "t-test (Nadeau & Bengio 2003)", digits=4)
    unpaired = sorted({r.name for r in results} - set(tests["run_a"]) - set(tests["run_b"])) if len(results) > 1 else []
    summary = "\n".join([
        "# Run comparison", "", display.to_markdown(index=False), "",
        f"## Paired comparison of per-fold study {metric}", "",
        ("Corrected resampled t-test (Nadeau & Bengio 2003): t = mean(d) / sqrt((1/K + n_test/n_train) · var(d)), "
         "df = K − 1, on runs that share folds. p-values are per pair, not corrected for multiple comparisons.\n\n"
         + tests.round(4).to_markdown(index=False)) if len(tests) else "No two runs share folds; nothing to pair.",
        "",
        *([f"Not paired (their folds differ from every other run's): {', '.join(unpaired)}.", ""] if unpaired else []),
        "## Files", "", tables.markdown_link_list(out, written), "",
    ])
    io.write_text(out / "summary.md", summary)
    return values, tests
