"""Grad-CAM overlays for the teacher and the student, and the example figures of a cv run.

Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization"): for the target layer's activations A^c (channel c, h × w) and the abnormal-class score y,
    w_c = mean_{i,j} ∂y / ∂A^c_ij,    L = ReLU(Σ_c w_c A^c),
upsampled to the input size and min-max scaled to [0, 1] per image. y is the abnormal log-odds: the single logit z
(sigmoid models) or z_1 − z_0 (two-logit softmax models). The target layer comes from
`kd_fracture.models.grad_cam_target_layer` (ResNet `layer4[-1]`, the hybrid student's last conv stage).
Computed with the `grad-cam` package (`pytorch_grad_cam`).

With several fold models the map and the probability are the mean over the folds (`explain --fold K` explains one
model). Aggregation calls `example_plots`, which draws `plots/sample_predictions.png` and `plots/gradcam_examples.png`
from a few holdout images and one fold model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kd_fracture import extras, io
from kd_fracture.config import DataConfig
from kd_fracture.data.dataset import XrayDataset
from kd_fracture.data.loaders import phantom_root
from kd_fracture.data.manifest import detect_source
from kd_fracture.models import grad_cam_target_layer
from kd_fracture.models.losses import positive_prob
from kd_fracture.runs.models import RunModels

MAX_EXAMPLES = 8
"""Images per example figure: the figures are drawn at the end of every cv run, so they must stay cheap."""
CAM_BATCH = 16
"""Images per Grad-CAM forward/backward (activations and gradients of the whole batch are held in memory)."""


class PositiveLogit:
    """Grad-CAM target: the abnormal class's log-odds — z for one logit, z_1 − z_0 for two. output: (C,)."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[0] if output.shape[-1] == 1 else output[1] - output[0]


def grad_cam(model: torch.nn.Module, images: torch.Tensor,
             layer: torch.nn.Module | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps and abnormal probabilities of a batch.

    images: (B, C, H, W) normalised model inputs → (maps (B, H, W) float32 in [0, 1], probs (B,) float32).
    The input gets requires_grad so a frozen backbone (no parameter gradients before the head) still yields
    gradients at the target layer.
    """
    from pytorch_grad_cam import GradCAM

    cam = GradCAM(model=model, target_layers=[layer or grad_cam_target_layer(model, images.shape[-1])])
    try:
        images = images.detach().clone().requires_grad_(True)
        maps = cam(input_tensor=images, targets=[PositiveLogit()] * len(images))
        probs = positive_prob(cam.outputs.detach()).cpu().numpy()
    finally:  # not `with GradCAM(...)`: its __exit__ swallows IndexErrors
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)  # leave no gradients behind in the caller's model
    return np.clip(maps, 0.0, 1.0).astype(np.float32), probs.astype(np.float32)


def explain_rows(models: RunModels, rows: pd.DataFrame, root: Path, device: torch.device,
                 members: list[int | str] | None = None,
                 batch_size: int = CAM_BATCH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, S, S) uint8 as the model saw them, maps (N, S, S) in [0, 1], probs (N,)) of manifest rows.

    Maps and probabilities are averaged over `members` (default: all of `models`).
    """
    ds = XrayDataset(rows, root, models.cfg.data.img_size, train=False, in_chans=models.cfg.model.in_chans,
                     cache=True)  # decoded once, whatever the number of members
    images = np.stack([ds.load(i) for i in range(len(ds))])  # (N, S, S) uint8 after resize_pad
    members = list(models.members) if members is None else members
    maps = np.zeros(images.shape, dtype=np.float32)
    probs = np.zeros(len(ds), dtype=np.float32)
    for k in members:
        model = models.load(k).to(device)
        for start in range(0, len(ds), batch_size):
            batch = torch.stack([ds[i]["image"] for i in range(start, min(start + batch_size, len(ds)))])
            m, p = grad_cam(model, batch.to(device))
            maps[start:start + len(batch)] += m / len(members)
            probs[start:start + len(batch)] += p / len(members)
    return images, maps, probs


def overlay(image: np.ndarray, cam: np.ndarray, weight: float = 0.55) -> np.ndarray:
    """(S, S) uint8 image + (S, S) map in [0, 1] → (S, S, 3) uint8 RGB with a jet heat map."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(image[..., None], 3, axis=2).astype(np.float32) / 255.0
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=weight)


def plot_panels(panels: list[np.ndarray], titles: list[str], path: Path, ncols: int, suptitle: str = "",
                colors: list[str] | None = None, cell_inches: float = 2.0) -> Path:
    """Grid of equally sized panels (grayscale (S, S) or RGB (S, S, 3) uint8), row-major, a title above each.

    Drawn as one mosaic image on one axes: a grid of subplots costs seconds of layout, and this runs after every cv.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    rgb = [np.repeat(p[..., None], 3, axis=2) if p.ndim == 2 else p for p in panels]
    size, nrows = rgb[0].shape[0], -(-len(rgb) // ncols)
    title_px, gap = max(8, round(size * 0.22)), max(2, size // 16)  # room for two title lines; white gutter
    cell_h, cell_w = size + title_px, size + gap
    mosaic = np.full((nrows * cell_h, ncols * cell_w - gap, 3), 255, dtype=np.uint8)
    for i, panel in enumerate(rgb):
        top, left = (i // ncols) * cell_h + title_px, (i % ncols) * cell_w
        mosaic[top:top + size, left:left + size] = panel

    width = ncols * cell_inches
    head = 0.25 + 0.15 * suptitle.count("\n") if suptitle else 0.0  # inches for the figure title
    height = width * mosaic.shape[0] / mosaic.shape[1]
    fig = Figure(figsize=(width, height + head))
    ax = fig.add_axes((0, 0, 1, height / (height + head)))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for i, (title, color) in enumerate(zip(titles, colors or ["black"] * len(titles))):
        x, y = (i % ncols) * cell_w + size / 2, (i // ncols) * cell_h + title_px - 1
        ax.text(x, y, title, ha="center", va="bottom", fontsize=7, color=color)
    if suptitle:
        fig.suptitle(suptitle, fontsize=8, y=1 - 0.05 * head / (height + head))
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# example figures of a run (cv holdout, evaluate)


def pick_examples(pred: pd.DataFrame, threshold: float, per_kind: int = MAX_EXAMPLES // 4) -> pd.DataFrame:
    """Up to `per_kind` images each of TP, FP, FN, TN (image prob vs. the study's label), the most confident first."""
    y, abnormal = pred["label"] == 1, pred["prob"] >= threshold
    kinds = {"TP": (y & abnormal, False), "FP": (~y & abnormal, False),
             "FN": (y & ~abnormal, True), "TN": (~y & ~abnormal, True)}
    picked = [pred[mask].sort_values("prob", ascending=ascending, kind="mergesort").head(per_kind).assign(kind=kind)
              for kind, (mask, ascending) in kinds.items()]
    return pd.concat(picked, ignore_index=True)


def label_name(label: int) -> str:
    return {0: "normal", 1: "abnormal"}.get(int(label), "?")


def example_plots(models: RunModels, pred: pd.DataFrame, root: Path, plots_dir: Path, device: torch.device,
                  seed: int = 0) -> list[Path]:
    """plots/sample_predictions.png (random images: true vs. predicted label, probability) and
    plots/gradcam_examples.png (TP/FP/FN/TN with Grad-CAM of the first member), ≤ MAX_EXAMPLES images each."""
    threshold, member = models.cfg.eval.threshold, models.members[0]
    sample = pred.sample(n=min(MAX_EXAMPLES, len(pred)), random_state=seed).sort_values("image_path")
    ds = XrayDataset(sample, root, models.cfg.data.img_size, train=False)
    titles = [f"true {label_name(r.label)}\npred {label_name(r.prob >= threshold)} (p={r.prob:.2f})"
              for r in sample.itertuples()]
    colors = ["tab:green" if (r.prob >= threshold) == (r.label == 1) else "tab:red" for r in sample.itertuples()]
    paths = [plot_panels([ds.load(i) for i in range(len(ds))], titles, plots_dir / "sample_predictions.png",
                         ncols=min(4, len(ds)), suptitle=f"{models.description}: sample predictions", colors=colors)]

    examples = pick_examples(pred, threshold)
    if examples.empty or extras.optional("pytorch_grad_cam", "gradcam", f"{plots_dir.name}/gradcam_examples.png") is None:
        return paths
    images, maps, probs = explain_rows(models, examples, root, device, members=[member])
    n = len(examples)
    titles = [f"{r.kind}: true {label_name(r.label)}\np={r.prob:.2f}" for r in examples.itertuples()]
    titles += [f"Grad-CAM fold {member} (p={p:.2f})" for p in probs]
    paths.append(plot_panels([*images, *[overlay(img, m) for img, m in zip(images, maps)]], titles,
                             plots_dir / "gradcam_examples.png", ncols=n,
                             suptitle=f"{models.description}: most confident TP/FP/FN/TN (top: the run's p)\n"
                                      f"Grad-CAM of the fold {member} model (bottom: its own p)"))
    return paths


def data_root(data: DataConfig) -> Path:
    """The data root of a run's config (image paths are relative to it) without reloading the manifest."""
    if data.root is not None:
        return detect_source(Path(data.root))[1]
    return phantom_root(data.phantom)
