"""predict: a run's fold ensemble on loose images reproduces the run's own holdout predictions; students; bad inputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from kd_fracture import metrics, predict
from kd_fracture.train import checkpoint
from kd_fracture.config import CVConfig, ModelConfig, load_config, replace, to_dict
from kd_fracture.data.dataset import XrayDataset
from kd_fracture.models import create_model
from kd_fracture.runs.models import load_run_models
from kd_fracture.pipelines.cv import run_cv


@pytest.fixture(scope="module")
def tiny_run(tiny_phantom, tmp_path_factory) -> Path:
    """A trained 2-fold × 1-epoch resnet10t run at 32 px (trained once for this module)."""
    tmp = tmp_path_factory.mktemp("predict_run")
    cfg = load_config(CVConfig, None, {
        "run_dir": str(tmp / "run"), "data.root": str(tiny_phantom), "data.folds": 2, "data.img_size": 32,
        "data.manifests_dir": str(tmp / "manifests"), "data.inner_val_frac": 0.2, "model.name": "resnet10t",
        "train.epochs": 1, "train.batch_size": 16, "train.warmup_epochs": 0, "eval.bootstrap": 10,
        "train.precision": "fp32"})  # predictions are compared with an fp32 forward pass (issue #29)
    run_cv(cfg)
    return tmp / "run"


def portable_copy(run: Path, dest: Path) -> Path:
    """config + checkpoints only, with data.root pointing nowhere: what someone receives without the data."""
    for k in (0, 1):
        (dest / f"fold_{k}").mkdir(parents=True)
        for name in (checkpoint.BEST, checkpoint.BEST + ".json"):
            shutil.copy(run / f"fold_{k}" / name, dest / f"fold_{k}" / name)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["data"]["root"] = str(dest / "no_such_data")
    (dest / "config.yaml").write_text(yaml.safe_dump(raw))
    return dest


def holdout_study_dirs(run: Path, tiny_phantom: Path, n: int = 3) -> tuple[pd.DataFrame, list[Path]]:
    pred = pd.read_csv(run / "holdout" / "predictions.csv")
    studies = sorted(pred["study_id"].unique())[:n]
    return pred[pred["study_id"].isin(studies)], [tiny_phantom / s for s in studies]


def test_predict_reproduces_holdout_predictions_without_the_data(tiny_run, tiny_phantom, tmp_path, capsys):
    run = portable_copy(tiny_run, tmp_path / "portable")
    expected, study_dirs = holdout_study_dirs(tiny_run, tiny_phantom)
    out = tmp_path / "preds.csv"
    assert predict.main(["--run", str(run), *map(str, study_dirs), "--out", str(out)]) == 0
    got = pd.read_csv(out)
    assert len(got) == len(expected)
    got["image_path"] = got["path"].map(lambda p: str(Path(p).relative_to(tiny_phantom)))
    both = expected.merge(got, on="image_path", suffixes=("_run", "_predict"))
    assert len(both) == len(expected)
    for col in ("prob", "prob_fold0", "prob_fold1"):
        assert both[f"{col}_predict"].to_numpy() == pytest.approx(both[f"{col}_run"].to_numpy(), abs=1e-5)
    # MURA study folders tell the truth and the body part
    assert (both["true_label"] == both["label"]).all() and (both["body_part_predict"] == both["body_part_run"]).all()
    assert "study level" in capsys.readouterr().out


def test_study_level_equals_metrics_study_table(tiny_run, tiny_phantom, tmp_path):
    expected, study_dirs = holdout_study_dirs(tiny_run, tiny_phantom)
    out = tmp_path / "preds.csv"
    # one study folder, one patient folder (its studies are found recursively) and a loose image of the third
    inputs = [study_dirs[0], study_dirs[1].parent, next(study_dirs[2].glob("*.png"))]
    assert predict.main(["--run", str(tiny_run), *map(str, inputs), "--out", str(out)]) == 0
    studies = pd.read_csv(tmp_path / "preds_studies.csv")
    # the run's cut: the holdout's, i.e. the mean of the fold thresholds chosen on the inner-val splits
    threshold = json.loads((tiny_run / "holdout" / "metrics.json").read_text())["fold_ensemble"]["threshold"]
    studies["study_id"] = studies["study"].map(lambda s: str(Path(s).relative_to(tiny_phantom)))
    holdout = pd.read_csv(tiny_run / "holdout" / "predictions.csv")
    loose = str(inputs[2].relative_to(tiny_phantom))
    # a loose image stands for its study alone: the reference study is that one image
    reference = metrics.study_table(holdout[(holdout["study_id"] != str(study_dirs[2].relative_to(tiny_phantom)))
                                            | (holdout["image_path"] == loose)]).set_index("study_id")
    assert set(studies["study_id"]) >= {str(Path(d).relative_to(tiny_phantom)) for d in study_dirs}
    for row in studies.itertuples():
        ref = reference.loc[row.study_id]
        assert row.prob == pytest.approx(ref["prob"], abs=1e-5) and row.n_images == ref["n_images"]
        assert row.true_label == ref["label"]
        assert row.prediction == ("abnormal" if ref["prob"] >= threshold else "normal")


def test_predict_uses_the_runs_recorded_threshold(tiny_run, tmp_path):
    """Fold k's recorded threshold for --fold k, the mean of the folds' for the ensemble and refit, else 0.5."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    for k, t in ((0, 0.3), (1, 0.6)):
        path = run / f"fold_{k}" / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "threshold": t}))
    assert load_run_models(run).cfg.eval.threshold == pytest.approx(0.45)
    assert load_run_models(run, fold=1).cfg.eval.threshold == pytest.approx(0.6)
    assert load_run_models(run).threshold_source == "mean of the fold thresholds"
    portable = portable_copy(tiny_run, tmp_path / "portable")  # checkpoints only: nothing recorded
    models = load_run_models(portable)
    assert models.cfg.eval.threshold == 0.5 and models.threshold_source == "eval.threshold"


def test_bad_inputs_are_reported_and_the_rest_predicted(tiny_run, tiny_phantom, tmp_path, capsys):
    good = sorted(tiny_phantom.glob("MURA-v1.1/valid/*/*/*/*.png"))[:2]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good[0].read_bytes()[:60])  # truncated PNG
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    out = tmp_path / "preds.csv"
    argv = ["--run", str(tiny_run), str(good[0]), str(corrupt), str(tmp_path / "missing.png"), str(text), str(good[1]),
            "--out", str(out)]
    assert predict.main(argv) == 2
    err = capsys.readouterr().err
    missing = tmp_path / "missing.png"
    for bad, why in ((corrupt, "corrupt or truncated"), (missing, "not found"), (text, "not an image")):
        assert f"error: {bad}: " in err and why in err
    assert "3 input(s) failed" in err
    table = pd.read_csv(out)
    ok = table[table["error"].isna()]
    assert sorted(ok["path"]) == sorted(map(str, good)) and ok["prob"].between(0, 1).all()
    assert table["error"].notna().sum() == 3 and table.loc[table["error"].notna(), "prob"].isna().all()


def test_only_bad_inputs_is_an_error(tiny_run, tmp_path, capsys):
    assert predict.main(["--run", str(tiny_run), str(tmp_path / "nothing.png")]) == 2
    assert "nothing was predicted" in capsys.readouterr().err


def write_fake_student(run: Path, study: str = "s1", name: str = "hybrid_t", seed: int = 0) -> torch.nn.Module:
    """distill's layout: distill/<study>/config.yaml (DistillConfig) + final/<student>_kd/{config.yaml, fold_<k>/}."""
    student = ModelConfig(name=name, in_chans=1)
    variant = run / "distill" / study / "final" / f"{name}_kd"
    variant.mkdir(parents=True)
    (run / "distill" / study / "config.yaml").write_text(yaml.safe_dump({"teacher_run": str(run),
                                                                         "student": to_dict(student)}))
    teacher_cfg = load_config(CVConfig, run / "config.yaml")
    (variant / "config.yaml").write_text(yaml.safe_dump(to_dict(replace(teacher_cfg, **{"model.name": name,
                                                                                       "model.in_chans": 1}))))
    torch.manual_seed(seed)
    model = create_model(name, in_chans=1, img_size=32).eval()
    for k in (0, 1):
        checkpoint.save_weights(model, variant / f"fold_{k}" / checkpoint.BEST)
    return model


def test_student_predictions_use_the_student_and_its_config(tiny_run, tiny_phantom, tmp_path, capsys):
    assert predict.main(["--run", str(tiny_run), "--model", "student", str(tiny_phantom)]) == 2
    assert "no distilled student yet" in capsys.readouterr().err

    run = shutil.copytree(tiny_run, tmp_path / "run")
    model = write_fake_student(run)
    image = sorted(tiny_phantom.glob("MURA-v1.1/valid/*/*/*/*.png"))[0]
    out = tmp_path / "student.csv"
    assert predict.main(["--run", str(run), "--model", "student", "--fold", "1", str(image), "--out", str(out)]) == 0
    got = pd.read_csv(out)
    # the student's own forward pass on the run's eval transform, 1 input channel
    rows = pd.DataFrame({"image_path": [str(image)], "label": [1]})
    x = XrayDataset(rows, Path("/"), 32, train=False, in_chans=1)[0]["image"][None]
    with torch.no_grad():
        expected = torch.sigmoid(model(x)).item()
    assert got.loc[0, "prob"] == pytest.approx(expected, abs=1e-5)
    assert list(got.filter(like="prob_fold").columns) == ["prob_fold1"]

    write_fake_student(run, study="s2")
    assert predict.main(["--run", str(run), "--model", "student", str(image)]) == 2
    assert "choose one with --study" in capsys.readouterr().err
    assert predict.main(["--run", str(run), "--model", "student", "--study", "s2", str(image)]) == 0
