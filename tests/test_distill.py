"""Distillation: replayed-view teacher cache, the DistillTask, and the end-to-end command on a tiny phantom.

One 2-fold × 1-epoch resnet10t teacher run is built per module (it is the input of every test here, never changed).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml

from kd_fracture import compare, distill, metrics
from kd_fracture.train import engine, teacher_cache
from kd_fracture.config import CVConfig, load_config
from kd_fracture.data.dataset import CLEAN_VIEW
from kd_fracture.data.folds import read_folds_csv
from kd_fracture.data.loaders import build_loader, fold_rows, resolve_manifest
from kd_fracture.models import create_model
from kd_fracture.train import tasks
from kd_fracture.runs.models import load_teacher_run
from kd_fracture.pipelines.cv import run_cv
from kd_fracture.cli import distill as distill_cli
from kd_fracture.io import read_json
from kd_fracture.train.checkpoint import BEST, load_weights, save_weights
from kd_fracture.config import DistillConfig

VIEWS = 2
SEED = 7


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """`--threads 1` (tiny images train fastest on one thread) must not leak into other test modules."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_run(tiny_phantom, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = load_config(CVConfig, None, {
        "run_dir": str(tmp / "run"), "data.root": str(tiny_phantom), "data.folds": 2, "data.img_size": 32,
        "data.manifests_dir": str(tmp / "manifests"), "data.inner_val_frac": 0.2, "model.name": "resnet10t",
        "train.epochs": 1, "train.batch_size": 16, "train.warmup_epochs": 0, "eval.bootstrap": 50,
        "train.threads": 1, "train.precision": "fp32"})  # exact numerics below: fp32 on every CPU (issue #29)
    run_cv(cfg)
    return load_teacher_run(cfg.run_dir)


@pytest.fixture(scope="module")
def fold0(teacher_run):
    """(manifest, fold-0 rows) of the teacher run."""
    manifest = resolve_manifest(teacher_run.cfg.data)
    folds = read_folds_csv(teacher_run.run.folds)
    return manifest, fold_rows(manifest, folds, 0, teacher_run.cfg.data)


def build_cache(teacher_run, fold0, cache_dir, checkpoint=None, views=VIEWS, loads=None, precision="fp32"):
    manifest, rows = fold0
    checkpoint = checkpoint or teacher_run.checkpoint(0)
    t = teacher_run.cfg

    def load():
        if loads is not None:
            loads.append(1)
        return load_weights(create_model(t.model.name, in_chans=t.model.in_chans, img_size=t.data.img_size), checkpoint)

    return teacher_cache.load_or_build(cache_dir, load, checkpoint, t.model, rows.train, manifest, t.data, t.aug,
                                       views=views, seed=SEED, device=torch.device("cpu"), batch_size=64,
                                       precision=precision)


def student_loader(teacher_run, fold0, in_chans=1, batch_size=16):
    manifest, rows = fold0
    return build_loader(rows.train, manifest, teacher_run.cfg.data, teacher_run.cfg.aug, train=True,
                        in_chans=in_chans, batch_size=batch_size, seed=SEED, num_views=VIEWS)


# ----------------------------------------------------------------------------------------------------------------------
# cache


@pytest.mark.parametrize("precision", ["fp32", pytest.param("auto", marks=pytest.mark.bf16)])
def test_cache_replays_identical_views(teacher_run, fold0, tmp_path, precision):
    """The cached logit of view v of image i is the teacher's output on the view the student replays. fp32: within
    1e-5 of a batch-1 forward pass (batched sums round differently). Under bf16 autocast (`auto` on a CPU with native
    bf16) the cache is built and replayed under the same autocast, and the replay is the teacher's own bf16 output,
    bit for bit."""
    cpu = torch.device("cpu")
    resolved = engine.resolve_precision(precision, cpu)
    assert resolved == ("fp32" if precision == "fp32" else "bf16")
    cache = build_cache(teacher_run, fold0, tmp_path / "cache", precision=precision)
    assert read_json(cache.path.with_name(cache.path.name + ".json"))["components"]["precision"] == resolved
    n = len(fold0[1].train)
    assert cache.rebuilt and cache.logits.shape == (n, VIEWS + 1, 1)

    def same(cached, x):  # cached (C,) against the teacher on one view x (C_in, H, W), under the cache's precision
        with torch.no_grad(), engine.autocast(cpu, True, precision):
            z = teacher(x[None])[0].float()
        return torch.allclose(cached, z, atol=1e-5) if resolved == "fp32" else torch.equal(cached, z)

    student_ds = student_loader(teacher_run, fold0).dataset  # in_chans 1, the student's
    teacher_ds = student_loader(teacher_run, fold0, in_chans=3).dataset  # in_chans 3, the teacher's
    teacher = teacher_run.load(0).eval()
    seen_views = set()
    for epoch in (0, 1):
        student_ds.set_epoch(epoch)
        for i in (0, 1, n // 2, n - 1):
            item = student_ds[i]
            view = item["view"]
            seen_views.add(view)
            replayed = teacher_ds.with_view(view)[i]["image"]
            # the student's 1-channel view is the teacher's 3-channel view: the same pixels, replicated
            assert torch.equal(item["image"].expand(3, -1, -1), replayed)
            assert same(cache.logits[i, view], replayed)
    assert seen_views == set(range(VIEWS))  # every epoch's view of an image is one of the cached ones
    clean = teacher_ds.with_view(CLEAN_VIEW)[3]["image"]
    assert same(cache.logits[3, -1], clean)
    # views differ from each other (they are augmentations, not copies)
    assert not torch.allclose(cache.logits[:, 0], cache.logits[:, 1])

    batch = next(iter(student_loader(teacher_run, fold0)))
    looked_up = teacher_cache.CachedTeacher(cache)(batch)
    assert torch.equal(looked_up, cache.logits[batch["index"], batch["view"]])


def test_cache_is_reused_and_rebuilt_when_teacher_changes(teacher_run, fold0, tmp_path, capsys):
    ckpt = tmp_path / "teacher" / BEST
    ckpt.parent.mkdir()
    for name in (BEST, BEST + ".json"):
        shutil.copy(teacher_run.run.fold(0) / name, ckpt.parent / name)
    loads = []
    first = build_cache(teacher_run, fold0, tmp_path / "cache", ckpt, loads=loads)
    again = build_cache(teacher_run, fold0, tmp_path / "cache", ckpt, loads=loads)
    assert first.rebuilt and not again.rebuilt and loads == [1]  # a valid cache never loads the teacher
    assert torch.equal(first.logits, again.logits)
    meta = json.loads((tmp_path / "cache" / "teacher_logits.safetensors.json").read_text())
    assert meta["key"] == first.key and meta["components"]["views"] == VIEWS

    model = teacher_run.load(0)  # a changed teacher: same architecture, other weights
    with torch.no_grad():
        model.get_classifier().bias.add_(3.0)
    save_weights(model, ckpt)
    changed = build_cache(teacher_run, fold0, tmp_path / "cache", ckpt, loads=loads)
    assert changed.rebuilt and changed.key != first.key and len(loads) == 2
    assert torch.allclose(changed.logits, first.logits + 3.0, atol=1e-4)
    assert "stale (teacher_sha256 changed)" in capsys.readouterr().err

    more_views = build_cache(teacher_run, fold0, tmp_path / "cache", ckpt, views=3, loads=loads)
    assert more_views.rebuilt and more_views.logits.shape[1] == 4


def test_tampered_cache_is_rebuilt(teacher_run, fold0, tmp_path):
    first = build_cache(teacher_run, fold0, tmp_path / "cache")
    path = tmp_path / "cache" / teacher_cache.LOGITS_FILE
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)  # flipped bytes: the sidecar's sha256 no longer matches
    again = build_cache(teacher_run, fold0, tmp_path / "cache")
    assert again.rebuilt and torch.allclose(again.logits, first.logits)


# ----------------------------------------------------------------------------------------------------------------------
# task


def test_gradients_reach_every_student_parameter():
    torch.manual_seed(0)
    student = create_model("hybrid_t", in_chans=1, img_size=32)
    n, batch_size = 10, 6
    logits = torch.randn(n, VIEWS + 1, 1)
    batch = {"image": torch.randn(batch_size, 1, 32, 32), "label": torch.tensor([0., 1., 1., 0., 1., 0.]),
             "index": torch.tensor([0, 3, 5, 7, 9, 2]), "view": torch.tensor([0, 1, -1, 1, 0, 0])}
    for alpha in (1.0, 0.5):  # pure KD (only the teacher term) and the mixed loss
        student.zero_grad()
        task = tasks.DistillTask(teacher_cache.CachedTeacher(logits), temperature=4.0, alpha=alpha)
        parts = task.losses(student, batch, epoch=0)
        assert set(parts) == {"loss", "kd", "ce"}
        parts["loss"].backward()
        no_grad = [name for name, p in student.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not no_grad, no_grad
        # the key bias of attention has an exactly zero gradient (softmax is shift-invariant); everything else moves
        zero = [name for name, p in student.named_parameters() if p.grad.abs().sum() == 0 and "qkv.bias" not in name]
        assert not zero, zero
    assert parts["loss"].item() == pytest.approx(0.5 * parts["kd"].item() + 0.5 * parts["ce"].item(), rel=1e-5)


def test_online_teacher_gives_the_same_loss_as_cached_views(teacher_run, fold0, tmp_path):
    cache = build_cache(teacher_run, fold0, tmp_path / "cache")
    loader = student_loader(teacher_run, fold0)
    loader.dataset.set_epoch(1)
    batch = next(iter(loader))
    torch.manual_seed(0)
    student = create_model("hybrid_t", in_chans=1, img_size=32).eval()  # eval: no dropout between the two calls
    cached = tasks.DistillTask(teacher_cache.CachedTeacher(cache), temperature=3.0, alpha=0.6)
    online = tasks.DistillTask(teacher_cache.OnlineTeacher(teacher_run.load(0), in_chans=3), temperature=3.0,
                                 alpha=0.6)
    a, b = cached.losses(student, batch, 1), online.losses(student, batch, 1)
    for part in ("loss", "kd", "ce"):
        assert a[part].item() == pytest.approx(b[part].item(), rel=1e-5, abs=1e-6), part
    assert a["kd"].item() > 0


# ----------------------------------------------------------------------------------------------------------------------
# the command


def distill_args(teacher_run, tmp_path, *extra):
    return ["--run", str(teacher_run.run.path), "--storage", f"sqlite:///{tmp_path / 'study.db'}",
            "--study", "tiny", "--n-trials", "2", "--student", "hybrid_t", "--epochs", "1", "--search-epochs", "1",
            "--views", str(VIEWS), "--set", "train.batch_size=16", "--set", "train.warmup_epochs=0",
            "--set", "eval.bootstrap=50", "--set", "latency_threads=1", "--threads", "1",
            "--set", "train.precision=fp32", *extra]


VARIANTS = ("hybrid_t_kd", "hybrid_t_no_kd", "mobilevit_xxs_kd")
DOCUMENTED = ["config.yaml", "env.json", "student.onnx", "student_ensemble.onnx", "export.json", "summary.md",
              *[f"cache/fold_{k}/teacher_logits.safetensors{ext}" for k in (0, 1) for ext in ("", ".json")],
              *[f"search/{v}/{f}" for v in VARIANTS for f in ("trials.csv", "best_params.yaml")],
              *[f"search/{v}/plots/optuna_{p}.png" for v in VARIANTS for p in ("history", "parallel")],
              *[f"trials/{v}/{n}/fold_{k}/{f}" for v in VARIANTS for n in (0, 1) for k in (0, 1)
                for f in ("history.csv", "metrics.json")],
              *[f"tables/{name}.{ext}" for name in ("teacher_vs_student", "paired_vs_no_kd")
                for ext in ("csv", "md", "tex")]]
VARIANT_FILES = ["config.yaml", "holdout/predictions.csv", "holdout/metrics.json", "tables/cv_folds.csv",
                 "summary.md", "plots/pr.png", "plots/calibration.png", *[f"fold_{k}/{f}" for k in (0, 1) for f in (
                     "checkpoint_best.safetensors", "history.csv", "inner_val_predictions.csv",
                     "oof_predictions.csv", "metrics.json", "DONE")]]


def test_two_trial_study_writes_the_tree_and_reruns_resume(teacher_run, fold0, tmp_path, monkeypatch, capsys):
    # a private copy of the teacher run: the study goes into <teacher_run>/distill/
    run = tmp_path / "teacher"
    shutil.copytree(teacher_run.run.path, run)
    teacher = load_teacher_run(run)
    args = distill_args(teacher, tmp_path, "--set", "variants=[kd, no_kd, 'timm:mobilevit_xxs']")
    assert distill.main(args) == 0
    out = run / "distill" / "tiny"
    missing = [f for f in DOCUMENTED if not (out / f).exists()]
    missing += [f"final/{v}/{f}" for v in VARIANTS for f in VARIANT_FILES if not (out / "final" / v / f).exists()]
    assert not missing, missing
    assert not list((out / "trials").rglob("*.safetensors"))  # trial checkpoints are deleted once scored
    # one TensorBoard stream per trial fold and per final student fold, named by study, variant and trial number
    if importlib.util.find_spec("tensorboard") is not None:
        for v in VARIANTS:
            assert list((out / "trials" / v / "0" / "fold_0" / "tb").glob("events.out.tfevents.*")), v
            assert list((out / "final" / v / "fold_1" / "tb").glob("events.out.tfevents.*")), v

    # equal budgets: every variant has its own study of the same size, over the keys that act on it
    space = set(load_config(DistillConfig).search.space)
    for v in VARIANTS:
        trials = pd.read_csv(out / "search" / v / "trials.csv")
        best = yaml.safe_load((out / "search" / v / "best_params.yaml").read_text())
        assert len(trials) == 2 and set(trials["state"]) == {"COMPLETE"} and set(trials["metric"]) == {"study_auroc"}
        assert best["value"] == pytest.approx(trials["value"].max())
        assert set(best["params"]) == (space - {"kd.temperature", "kd.alpha"} if v.endswith("no_kd") else space)
        cfg = yaml.safe_load((out / "final" / v / "config.yaml").read_text())
        assert cfg["train"]["lr"] == pytest.approx(best["params"]["train.lr"])  # each row trains with its own best
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert sorted(optuna.get_all_study_names(storage)) == sorted(f"tiny/{v}" for v in VARIANTS)
    assert yaml.safe_load((out / "final" / "hybrid_t_kd" / "config.yaml").read_text())["model"]["in_chans"] == 1

    # costs per deployable thing, and KD vs no-KD paired on the folds
    table = pd.read_csv(out / "tables" / "teacher_vs_student.csv")
    models = ["teacher (resnet10t)", *VARIANTS]
    assert table["model"].tolist() == [m for m in models for _ in (0, 1)]
    assert table["deployable"].tolist() == ["single", "ensemble"] * 4
    assert (table["params_M"] > 0).all() and (table["gflops"] > 0).all() and (table["latency_ms"] > 0).all()
    single, ensemble = table[table["deployable"] == "single"], table[table["deployable"] == "ensemble"]
    assert ensemble["params_M"].to_numpy() == pytest.approx(2 * single["params_M"].to_numpy())
    teacher_holdout = json.loads((run / "holdout" / "metrics.json").read_text())["fold_ensemble"]["ci95"]["kappa"]
    assert ensemble.iloc[0]["kappa"] == pytest.approx(teacher_holdout["value"])
    fold_kappa = {v: [json.loads((out / "final" / v / f"fold_{k}" / "metrics.json").read_text())["study"]["kappa"]
                      for k in (0, 1)] for v in VARIANTS}
    kd_row = single[single["model"] == "hybrid_t_kd"].iloc[0]
    assert kd_row["kappa"] == pytest.approx(sum(fold_kappa["hybrid_t_kd"]) / 2)
    assert kd_row["dkappa"] == pytest.approx((sum(fold_kappa["hybrid_t_kd"]) - sum(fold_kappa["hybrid_t_no_kd"])) / 2)
    assert 0 <= kd_row["p_kappa"] <= 1 and 0 <= kd_row["p_auroc"] <= 1
    assert pd.isna(single[single["model"] == "hybrid_t_no_kd"].iloc[0]["dkappa"])  # no row against itself
    paired = pd.read_csv(out / "tables" / "paired_vs_no_kd.csv")
    assert len(paired) == 3 * 2 * 2  # (teacher, kd, timm) × (κ, AUROC) × folds
    assert "Δκ vs no-KD" in (out / "tables" / "teacher_vs_student.md").read_text()
    export = json.loads((out / "export.json").read_text())
    assert set(export) == {"student.onnx", "student_ensemble.onnx"}
    assert all(e["checked"] and e["ok"] and e["max_abs_diff"] < 1e-4 for e in export.values())
    assert "inner-validation splits only" in (out / "summary.md").read_text()

    # compare reads distilled variants like teacher runs
    assert compare.main([str(out / "final" / "hybrid_t_kd"), str(out / "final" / "hybrid_t_no_kd"), str(run),
                         "--out", str(tmp_path / "cmp")]) == 0
    tests = pd.read_csv(tmp_path / "cmp" / "paired_tests.csv")
    assert len(tests) == 3 and tests["p_value"].between(0, 1).all()

    # no leakage: fold k's student learnt from fold k's teacher, on fold k's training rows only
    manifest, _ = fold0
    folds = read_folds_csv(run / "folds.csv")
    thresholds = []
    for k in (0, 1):
        rows = fold_rows(manifest, folds, k, teacher.cfg.data)
        assert not set(rows.train["patient_id"]) & set(rows.scored["patient_id"])
        cache_meta = json.loads((out / f"cache/fold_{k}/teacher_logits.safetensors.json").read_text())
        assert cache_meta["components"]["teacher_sha256"] == teacher.checkpoint_sha256(k)
        assert cache_meta["components"]["n_rows"] == len(rows.train)
        fold_metrics = json.loads((out / f"final/hybrid_t_kd/fold_{k}/metrics.json").read_text())
        assert fold_metrics["teacher_checkpoint_sha256"] == teacher.checkpoint_sha256(k)
        assert fold_metrics["n_train"] == len(rows.train)
        assert fold_metrics["n_studies"] == rows.scored["study_id"].nunique()
        # the student's own cut, chosen on fold k's inner-val split, scores fold k (and 0.5 is reported beside it)
        inner = pd.read_csv(out / f"final/hybrid_t_kd/fold_{k}/inner_val_predictions.csv")
        assert set(inner["study_id"]) == set(rows.inner_val["study_id"])
        assert fold_metrics["threshold"] == pytest.approx(metrics.choose_threshold(inner, "youden"))
        studies = metrics.study_table(pd.read_csv(out / f"final/hybrid_t_kd/fold_{k}/oof_predictions.csv"))
        assert fold_metrics["study"]["kappa"] == pytest.approx(
            metrics.binary_metrics(studies["label"], studies["prob"], fold_metrics["threshold"])["kappa"], nan_ok=True)
        assert "kappa" in fold_metrics["at_0.5"]["study"] and "ece" in fold_metrics["study"]
        thresholds.append(fold_metrics["threshold"])
    student_holdout = json.loads((out / "final/hybrid_t_kd/holdout/metrics.json").read_text())["fold_ensemble"]
    assert student_holdout["threshold"] == pytest.approx(sum(thresholds) / len(thresholds))
    assert teacher.checkpoint_sha256(0) != teacher.checkpoint_sha256(1)

    # rerun of the same command: every study is complete and every fold DONE → nothing is trained again
    monkeypatch.setattr(engine, "fit", lambda *a, **k: pytest.fail("a finished fold or trial was retrained"))
    capsys.readouterr()
    assert distill.main(args) == 0
    assert capsys.readouterr().err.count("holds 2 finished trial(s); target 2 → 0 to run") == 3
    assert len(pd.read_csv(out / "search" / "hybrid_t_kd" / "trials.csv")) == 2


def test_missing_teacher_run_says_which_command_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert distill.main([]) == 2
    err = capsys.readouterr().err
    assert "runs/phantom/resnet50: no teacher run here" in err and "python -m kd_fracture.cv --folds 5" in err
    assert not (tmp_path / "studies").exists()  # nothing written before the teacher run is found


def test_unfinished_teacher_run_is_refused(teacher_run, tmp_path, capsys):
    run = tmp_path / "teacher"
    shutil.copytree(teacher_run.run.path, run)
    (run / "fold_1" / "DONE").unlink()
    assert distill.main(["--run", str(run)]) == 2
    assert "teacher fold(s) [1] are not finished" in capsys.readouterr().err


def test_mixup_is_refused(teacher_run, tmp_path, capsys):
    assert distill.main(distill_args(teacher_run, tmp_path, "--set", "train.mixup=0.2")) == 2
    assert "mixed images have no cached teacher logits" in capsys.readouterr().err


def test_student_flag_keeps_the_distill_student_defaults(tmp_path):
    """`--student hybrid_t` changes the name only: in_chans stays the student's 1, not ModelConfig's 3."""
    parser, flags = distill_cli.build_parser()
    args = parser.parse_args(["--run", str(tmp_path), "--student", "hybrid_t", "--set", "train.batch_size=16"])
    cfg = distill_cli.resolve_config(args, flags)
    assert (cfg.student.name, cfg.student.in_chans, cfg.student.drop_rate) == ("hybrid_t", 1, 0.1)
    assert (cfg.train.batch_size, cfg.train.epochs) == (16, DistillConfig().train.epochs)


def test_the_search_never_reads_a_scored_fold(teacher_run, tmp_path, monkeypatch):
    """Unbiased selection (issue #13): a trial's value is its search folds' inner-validation metric. With every
    scored fold's labels shuffled, each trial's value is unchanged (the scored-fold metrics do change)."""
    import dataclasses

    import numpy as np
    import optuna

    from kd_fracture.pipelines import distill as distill_pipeline

    def trial_values(study: str, storage: Path) -> list[float]:
        url = f"sqlite:///{storage}"
        return [t.value for t in optuna.load_study(study_name=study, storage=url).trials]

    args = [*[a for a in distill_args(teacher_run, tmp_path) if a not in ("--study", "tiny")],
            "--set", "variants=[kd]"]
    assert distill.main([*args, "--trials-only", "--study", "plain"]) == 0
    real = distill_pipeline.fold_rows

    def shuffled_scored_labels(manifest, folds, k, data):
        rows = real(manifest, folds, k, data)
        studies = rows.scored.groupby("study_id")["label"].first()  # a study's images share its label
        shuffled = dict(zip(studies.index, np.random.default_rng(k).permutation(studies.to_numpy())))
        return dataclasses.replace(rows, scored=rows.scored.assign(label=rows.scored["study_id"].map(shuffled)))

    monkeypatch.setattr(distill_pipeline, "fold_rows", shuffled_scored_labels)
    assert distill.main([*args, "--trials-only", "--study", "shuffled"]) == 0
    plain = trial_values("plain/hybrid_t_kd", tmp_path / "study.db")
    shuffled = trial_values("shuffled/hybrid_t_kd", tmp_path / "study.db")
    assert len(plain) == 2 and plain == shuffled
    scored = [read_json(teacher_run.run.path / "distill" / s / "trials" / "hybrid_t_kd" / "0" / "fold_0" /
                        "metrics.json")["study"]
              for s in ("plain", "shuffled")]
    assert scored[0] != scored[1]  # the control: the scored fold's own metrics did see the shuffled labels


def test_variants_flag_selects_the_rows(tmp_path):
    parser, flags = distill_cli.build_parser()
    args = parser.parse_args(["--run", str(tmp_path), "--variants", "kd, timm:mobilevit_xxs"])
    assert distill_cli.resolve_config(args, flags).variants == ("kd", "timm:mobilevit_xxs")
    assert DistillConfig().variants == ("kd", "no_kd")


def test_unknown_variant_is_a_config_error(tmp_path, capsys):
    assert distill.main(["--run", str(tmp_path), "--variants", "kd,distilled"]) == 2
    assert "variants: 'distilled' is none of kd, no_kd, timm:NAME" in capsys.readouterr().err


def test_a_study_has_one_final_writer_but_many_search_workers(teacher_run, tmp_path, capsys):
    from kd_fracture.runs.rundir import RunDir

    args = [*[a for a in distill_args(teacher_run, tmp_path) if a not in ("--study", "tiny")], "--study", "locked",
            "--set", "variants=[kd]", "--n-trials", "1"]
    study = RunDir(teacher_run.run.path / "distill" / "locked")
    with study.lock(shared=True):  # a --trials-only worker is searching
        assert distill.main(args) == 2  # the final run waits for the workers
        assert "is being written by PID" in capsys.readouterr().err
        assert distill.main([*args, "--trials-only"]) == 0  # another worker joins


def test_a_config_key_added_since_a_variant_was_trained_does_not_retrain_it():
    """variant.json of a run made before a key existed lacks it: at its default that is no change (it retrained every
    finished student after an upgrade), any other value or any other difference still is."""
    from kd_fracture.config import CVConfig, to_dict
    from kd_fracture.pipelines.distill import stamp_changed
    from kd_fracture.runs.rundir import flatten_config

    config = flatten_config(to_dict(CVConfig()))
    new = {"config": config, "kd": {"alpha": 0.5}, "teacher_checkpoints": ["a", "b"]}
    old = {**new, "config": {k: v for k, v in config.items() if k != "train.precision"}}
    assert not stamp_changed(old, new, CVConfig)
    assert stamp_changed(old, {**new, "config": {**config, "train.precision": "bf16"}}, CVConfig)
    assert stamp_changed(old, {**new, "config": {**config, "train.lr": 1.0}}, CVConfig)
    assert stamp_changed(old, {**new, "teacher_checkpoints": ["a", "c"]}, CVConfig)
