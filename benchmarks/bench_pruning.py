"""Benchmark 5, `pruning`: a 20-trial Optuna search with the project's pruner vs none, on a proxy objective."""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import replace

import numpy as np
from common import Context, Figure, Result


PROXY_OPTIMUM = {"kd.temperature": 4.0, "kd.alpha": 0.6, "train.lr": 2e-3, "train.weight_decay": 0.02}
LEARNING_GAP = 0.05
"""How far below its final value a trial's inner-val metric is after its first epoch (the same for every trial, so
an early epoch ranks trials as the last one does, up to the fold noise)."""
PROXY_FOLD_OFFSET = (0.02, -0.03, 0.01, -0.01, 0.0)
"""Per-fold difficulty (some folds are harder for every trial), added to each trial's fold score."""


def proxy_value(params: dict) -> float:
    """Noise-free 'study κ' of a distillation parameter set: a smooth bowl around PROXY_OPTIMUM.

    κ = 0.70 − 0.08·(log10(lr/2e-3)/0.5)² − 0.06·((α − 0.6)/0.4)² − 0.04·(log10(T/4)/0.5)²
            − 0.02·(log10(wd/0.02))² + depth bonus {1: −0.02, 2: 0, 3: +0.01}
            + width bonus {96: −0.01, 128: 0, 192: +0.005}
    (scale parameters matter on a log scale; a trial with every parameter at a range edge loses ≈ 0.15–0.25).
    """
    g = params.get
    kappa = 0.70
    kappa -= 0.08 * (math.log10(g("train.lr", 2e-3) / 2e-3) / 0.5) ** 2
    kappa -= 0.06 * ((g("kd.alpha", 0.6) - 0.6) / 0.4) ** 2
    kappa -= 0.04 * (math.log10(g("kd.temperature", 4.0) / 4.0) / 0.5) ** 2
    kappa -= 0.02 * math.log10(g("train.weight_decay", 0.02) / 0.02) ** 2
    kappa += {1: -0.02, 2: 0.0, 3: 0.01}.get(g("student.overrides.depth", 2), 0.0)
    kappa += {96: -0.01, 128: 0.0, 192: 0.005}.get(g("student.overrides.embed_dim", 128), 0.0)
    return kappa


def proxy_fold_score(params: dict, fold: int, noise: float, seed: int = 0) -> float:
    """proxy_value + the fold's offset + N(0, noise²), the noise seeded by (seed, params, fold): deterministic, so
    the pruned and the unpruned search see the same score for the same trial and fold."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).digest()
    rng = np.random.default_rng([seed, fold, int.from_bytes(digest[:8], "little")])
    return proxy_value(params) + PROXY_FOLD_OFFSET[fold % len(PROXY_FOLD_OFFSET)] + float(rng.normal(0.0, noise))


def run_proxy_search(scfg, n_trials: int, noise: float, epochs: int, folds: int) -> dict:
    """One in-memory Optuna study through the project's sampler, pruner and objective factories
    (`search.make_sampler / make_pruner / make_objective`, report mode as `distill` chooses it) with the proxy as
    the inner-validation metric, reported after every epoch (step = fold × epochs + epoch) as distill does; a
    fold-epoch is counted when it runs, so a trial pruned inside a fold saves the rest of it."""
    import optuna

    from kd_fracture import search

    spent = {"fold_epochs": 0}

    def score_fold(trial, params: dict, k: int, report_epoch) -> float:
        final = proxy_fold_score(params, k, noise)
        for epoch in range(epochs):  # a learning curve: every trial is LEARNING_GAP below its final value at epoch 0
            spent["fold_epochs"] += 1
            report_epoch(epoch, final - LEARNING_GAP * (epochs - 1 - epoch) / max(epochs - 1, 1))
        return final

    space = search.parse_space(scfg.space)
    objective = search.make_objective(space, list(range(folds)), score_fold, epochs,
                                      report="per_fold" if scfg.pruner == "wilcoxon" else "running_mean")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=search.make_sampler(scfg),
                                pruner=search.make_pruner(scfg))
    study.optimize(objective, n_trials=n_trials)
    best = study.best_trial
    offset = float(np.mean([PROXY_FOLD_OFFSET[k % len(PROXY_FOLD_OFFSET)] for k in range(folds)]))
    return {"fold_epochs": spent["fold_epochs"], "best_value": best.value,
            "best_true_value": proxy_value(best.params) + offset,
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)}


def run(ctx: Context) -> Result:
    """The same 20-trial search with the project's pruner and without (NopPruner), per sampler seed; the scored
    fold of a trial comes from `proxy_fold_score` instead of training a student (the pruner only sees values)."""
    from kd_fracture.config import SearchConfig

    s, res = ctx.settings, Result()
    base = SearchConfig()
    variants = [("project default", base.pruner, base.folds or 5, base.epochs or 3),
                ("all 5 folds", base.pruner, 5, base.epochs or 3)]
    letters = iter("abcdefgh")
    for label, pruner, folds, epochs in variants:
        runs = {"pruned": [], "none": []}
        for seed in range(s.prune_seeds):
            for arm, name in (("pruned", pruner), ("none", "none")):
                scfg = replace(base, pruner=name, sampler_seed=seed, folds=folds, epochs=epochs)
                runs[arm].append(run_proxy_search(scfg, s.prune_trials, s.prune_noise, epochs, folds))
        spent = {arm: sum(r["fold_epochs"] for r in v) for arm, v in runs.items()}
        gaps = [n["best_value"] - p["best_value"] for p, n in zip(runs["pruned"], runs["none"])]
        true_gaps = [n["best_true_value"] - p["best_true_value"] for p, n in zip(runs["pruned"], runs["none"])]
        noise = 2 * s.prune_noise / math.sqrt(folds)  # 2 standard errors of a trial's mean over its folds
        settings = {"pruner": pruner, "n_startup_trials": base.n_startup_trials, "folds": folds,
                    "epochs_per_fold": epochs, "trials": s.prune_trials, "seeds": s.prune_seeds,
                    "fold_noise_sd": s.prune_noise}
        res.figures.append(Figure(
            f"5{next(letters)}", f"pruning ({label}: {pruner}, {folds} folds): fold-epochs saved",
            1 - spent["pruned"] / spent["none"], 0.40, ">=", "fraction",
            meaning=f"the pruned search spends this fraction fewer fold-epochs than the unpruned one ({label})",
            details={**settings, "fold_epochs_pruned": spent["pruned"], "fold_epochs_unpruned": spent["none"],
                     "pruned_trials_median": statistics.median(r["pruned"] for r in runs["pruned"])}))
        for arm, what in (("pruned", "with the pruner"), ("none", "without")):
            res.measure(f"{label}: fold-epochs per search {what}", spent[arm] / s.prune_seeds, "fold-epochs")
        res.figures.append(Figure(
            f"5{next(letters)}", f"pruning ({label}): best-value gap (unpruned − pruned)", statistics.median(gaps),
            noise, "<=", "κ",
            meaning="how much lower the pruned search's best value is (median over seeds); target = 2 SE of one "
                    "trial's mean",
            details={**settings, "gaps": gaps, "true_value_gaps": true_gaps,
                     "best_pruned": [r["best_value"] for r in runs["pruned"]],
                     "best_unpruned": [r["best_value"] for r in runs["none"]]}))
    res.notes.append(
        "proxy objective: a fold's final inner-val value = proxy_value(params) + fold offset + N(0, fold_noise_sd²), "
        "reported after each epoch along a learning curve LEARNING_GAP below it at epoch 0, seeded by "
        "(params, fold); proxy_value is a smooth bowl in (log lr, α, log T, log wd) + small depth/width terms "
        "(see proxy_value in benchmarks/bench_pruning.py); sampler, pruner and objective are the project's "
        "factories. Equal best values are expected: a pruned trial joins TPE's 'bad' group where its finished low "
        "value would have, so with the same sampler seed both searches mostly propose the same parameters")
    return res
