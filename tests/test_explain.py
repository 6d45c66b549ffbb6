"""explain: Grad-CAM maps for teacher and student, the explain CLI, and the example figures cv draws."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from kd_fracture.train import checkpoint
from kd_fracture import explain
from kd_fracture.config import CVConfig, ModelConfig, load_config, to_dict
from kd_fracture.models.losses import positive_prob
from kd_fracture.models import create_model
from kd_fracture.runs.rundir import RunDir
from kd_fracture.report import figures
from kd_fracture.report import aggregate


@pytest.mark.parametrize("name, in_chans, freeze, num_classes", [
    ("resnet10t", 3, "none", 1),
    ("resnet10t", 3, "backbone", 1),   # no parameter gradients before the head: input gradients carry Grad-CAM
    ("hybrid_t", 1, "none", 1),         # the student: CNN stages → Transformer; its last conv stage is the layer
    ("hybrid_t", 1, "none", 2),
])
def test_grad_cam_map_has_input_size_and_unit_range(name, in_chans, freeze, num_classes):
    torch.manual_seed(0)
    model = create_model(name, in_chans=in_chans, img_size=64, freeze=freeze, num_classes=num_classes).eval()
    x = torch.randn(2, in_chans, 64, 64)
    maps, probs = figures.grad_cam(model, x)
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert maps.reshape(2, -1).max(axis=1).min() > 0.5  # min-max scaled per image, not a blank map
    assert (maps.reshape(2, -1).std(axis=1) > 0).all()
    with torch.no_grad():
        assert probs == pytest.approx(positive_prob(model(x)).numpy(), abs=1e-5)
    assert all(p.grad is None for p in model.parameters())  # explaining leaves no gradients behind


class TwoHalves(torch.nn.Module):
    """(B, 1, H, W) → (B, 2, H, W): channel 0 is the image's left half, channel 1 its right half (zeros elsewhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = torch.zeros_like(x)
        left[..., : x.shape[-1] // 2] = 1.0
        return torch.cat([x * left, x * (1 - left)], dim=1)


class HalfScorer(torch.nn.Module):
    """One logit = mean of the left half; two logits = (mean of left half, mean of right half)."""

    def __init__(self, two_logits: bool):
        super().__init__()
        self.halves, self.two_logits = TwoHalves(), two_logits
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.halves(x).mean(dim=(2, 3)) * self.scale  # (B, 2)
        return scores if self.two_logits else scores[:, :1]


@pytest.mark.parametrize("two_logits, evidence", [(False, "left"), (True, "right")])
def test_grad_cam_lights_up_the_evidence_for_abnormal(two_logits, evidence):
    """Target = abnormal log-odds: z (one logit) counts the left patch; z1 − z0 (two logits) counts the right one."""
    x = torch.zeros(1, 1, 32, 32)
    x[..., 8:24, 4:12] = 1.0   # left patch
    x[..., 8:24, 20:28] = 1.0  # identical right patch
    model = HalfScorer(two_logits)
    maps, _ = figures.grad_cam(model, x, layer=model.halves)
    left, right = maps[0, 8:24, 4:12].mean(), maps[0, 8:24, 20:28].mean()
    hot, cold = (left, right) if evidence == "left" else (right, left)
    assert hot > 0.9 and cold < 0.05
    assert maps[0, :4].max() < 0.05  # background stays cold


def fake_run(path: Path, data_root: Path, name: str = "resnet10t", in_chans: int = 3) -> Path:
    """A run directory with config + untrained fold checkpoints: enough for predict/explain, no training."""
    cfg = load_config(CVConfig, None, {"run_dir": str(path), "data.root": str(data_root), "data.folds": 2,
                                       "data.img_size": 32, "model.name": name, "model.in_chans": in_chans})
    RunDir(path).write_config(cfg)
    for k in (0, 1):
        torch.manual_seed(k)
        checkpoint.save_weights(create_model(name, in_chans=in_chans, img_size=32), path / f"fold_{k}" / checkpoint.BEST)
    return path


def test_explain_cli_teacher_and_student(tiny_phantom, tmp_path, capsys):
    run = fake_run(tmp_path / "run", tiny_phantom)
    study = sorted(tiny_phantom.glob("MURA-v1.1/valid/*/*/study*"))[0]
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "cams"
    assert explain.main(["--run", str(run), str(study), str(corrupt), "--out", str(out)]) == 2
    assert f"error: {corrupt}: " in capsys.readouterr().err
    table = pd.read_csv(out / "gradcam.csv")
    n_images = len(list(study.glob("*.png")))
    assert len(table) == n_images and table["prob"].between(0, 1).all()
    assert all((out / f).is_file() for f in table["gradcam"]) and len(set(table["gradcam"])) == n_images

    # a distilled student in distill's layout: <run>/distill/<study>/final/<student>_kd/
    student = ModelConfig(name="hybrid_t", in_chans=1)
    variant = fake_run(run / "distill" / "s1" / "final" / "hybrid_t_kd", tiny_phantom, "hybrid_t", in_chans=1)
    (variant.parents[1] / "config.yaml").write_text(yaml.safe_dump({"student": to_dict(student)}))
    out = tmp_path / "student_cams"
    assert explain.main(["--run", str(run), "--model", "student", "--fold", "0", str(study), "--out", str(out)]) == 0
    assert len(pd.read_csv(out / "gradcam.csv")) == n_images


def test_pick_examples_takes_the_most_confident_of_each_kind():
    pred = pd.DataFrame({"label": [1, 1, 1, 0, 0, 0, 1, 0],
                         "prob": [0.9, 0.6, 0.2, 0.8, 0.1, 0.3, 0.45, 0.55],
                         "image_path": list("abcdefgh")})
    ex = figures.pick_examples(pred, threshold=0.5, per_kind=1)
    assert dict(zip(ex["kind"], ex["image_path"])) == {"TP": "a", "FP": "d", "FN": "c", "TN": "e"}
    assert len(figures.pick_examples(pred, 0.5, per_kind=2)) == 8


def test_run_plots_writes_sample_grid_and_gradcam_examples(tiny_phantom, tmp_path):
    run = fake_run(tmp_path / "run", tiny_phantom)
    cfg = RunDir(run).saved_config(CVConfig)
    holdout = pd.read_csv(tiny_phantom / "MURA-v1.1" / "valid_image_paths.csv", header=None, names=["image_path"])
    labels = pd.read_csv(tiny_phantom / "MURA-v1.1" / "valid_labeled_studies.csv", header=None,
                         names=["study", "label"])
    holdout["study_id"] = holdout["image_path"].str.rpartition("/")[0]
    holdout = holdout.merge(labels.assign(study_id=labels["study"].str.rstrip("/")), on="study_id")
    holdout["prob"] = np.random.default_rng(0).uniform(size=len(holdout))
    paths = aggregate.extra_plots(cfg, RunDir(run), holdout)
    assert [p.name for p in paths] == ["sample_predictions.png", "gradcam_examples.png"]
    for p in paths:
        assert p.parent == run / "plots" and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
