"""The batched torch augmentation (data.aug_backend: torch, the GPU path) against albumentations (the CPU reference).

Both are run here on CPU tensors. What must agree: the parameter ranges (exactly), the clean view (to float
rounding) and the distribution of the augmented pixels (within the tolerances stated in each test). What may differ:
single pixels, since the torch path resamples once where albumentations resamples twice.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kd_fracture.data import batch_aug
from kd_fracture.data.dataset import CLEAN_VIEW, XrayDataset
from kd_fracture.data.prefetch import DeviceBatches
from kd_fracture.data.transforms import GRAY_MEAN, GRAY_STD, apply_seeded, build_transforms

SIZE = 48
STRONG = {"hflip": 0.5, "rotate_limit": 10.0, "rrc_scale": (0.8, 1.0), "brightness_contrast": 0.2}
"""albumentations' defaults in this package (transforms.AUG_DEFAULTS): every step active."""


def radiograph(i: int) -> np.ndarray:
    """(SIZE, SIZE) uint8: a bright off-centre 'bone' bar on a dark background, padded black at the sides like
    resize_pad's output, different per i, so flips, rotations and crops change the statistics visibly."""
    rng = np.random.default_rng(i)
    img = np.zeros((SIZE, SIZE), np.uint8)
    img[:, 6:-6] = 40 + rng.integers(0, 20, (SIZE, SIZE - 12))
    x0 = 10 + i % 8
    img[4:-4, x0:x0 + 9] = 200 + rng.integers(0, 40, (SIZE - 8, 9))
    return img


def both(views: int, aug: dict = STRONG, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(views, S, S) normalised outputs of albumentations and of the torch path for the same (image, view) pairs,
    and the torch parameters."""
    tf = build_transforms(SIZE, True, **aug)
    imgs = [radiograph(v % 12) for v in range(views)]
    ref = np.stack([apply_seeded(tf, imgs[v], seed, v % 12, v) for v in range(views)])
    params = np.stack([batch_aug.draw_params(SIZE, seed, v % 12, v, **aug) for v in range(views)])
    x = torch.from_numpy(np.stack(imgs))[:, None]
    out = batch_aug.augment_batch(x, torch.from_numpy(params))[:, 0].numpy()
    return ref, out, params


def to_grey(x: np.ndarray) -> np.ndarray:
    return (x * GRAY_STD + GRAY_MEAN) * 255


def test_parameters_stay_in_albumentations_ranges():
    params = np.stack([batch_aug.draw_params(SIZE, 0, k, v, **STRONG) for k in range(50) for v in range(40)])
    flip, angle, x0, y0, w, h, alpha, beta = params.T
    assert set(np.unique(flip)) == {0.0, 1.0} and abs(flip.mean() - 0.5) < 0.04
    assert angle.min() >= -10 and angle.max() <= 10 and abs(angle.std() - 10 / math.sqrt(3)) < 0.3  # U(−10, 10)
    area = w * h / SIZE**2
    assert area.min() >= 0.8 - 2 * SIZE / SIZE**2 and area.max() <= 1.0 + 1e-9  # rounding of w, h: ±1 px each
    assert (w / h).min() >= 3 / 4 - 0.05 and (w / h).max() <= 4 / 3 + 0.05
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= SIZE).all() and (y0 + h <= SIZE).all()
    applied = alpha != 1
    assert abs(applied.mean() - 0.5) < 0.04  # RandomBrightnessContrast's p = 0.5
    assert alpha[applied].min() >= 0.8 and alpha[applied].max() <= 1.2
    assert beta[applied].min() >= -0.2 * 255 and beta[applied].max() <= 0.2 * 255
    assert (beta[~applied] == 0).all()


def test_zero_strengths_leave_their_steps_out():
    off = {"hflip": 0.0, "rotate_limit": 0.0, "rrc_scale": (1.0, 1.0), "brightness_contrast": 0.0}
    assert np.array_equal(batch_aug.draw_params(SIZE, 0, 1, 2, **off), batch_aug.identity_params(SIZE))
    x = torch.from_numpy(np.stack([radiograph(i) for i in range(4)]))[:, None]
    ident = torch.from_numpy(np.stack([batch_aug.identity_params(SIZE)] * 4))
    grey = to_grey(batch_aug.augment_batch(x, ident).numpy())
    np.testing.assert_allclose(grey, x.numpy().astype(np.float32), atol=1e-3)


def test_clean_view_is_albumentations_normalisation():
    img = radiograph(0)
    ref = build_transforms(SIZE, False)(image=img)["image"]
    out = batch_aug.augment_batch(torch.from_numpy(img)[None, None], None)[0, 0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_a_pure_flip_is_exactly_a_flip():
    img = torch.from_numpy(radiograph(1))[None, None]
    p = torch.from_numpy(batch_aug.identity_params(SIZE))[None].clone()
    p[0, 0] = 1
    out = to_grey(batch_aug.augment_batch(img, p).numpy())
    np.testing.assert_allclose(out[0, 0], img[0, 0].flip(-1).numpy(), atol=1e-3)


VIEWS = 1200


def statistics(x: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """What the comparison looks at, for (VIEWS, S, S) normalised views `x` of the `radiograph(v % 12)` images:
    change = mean |view − clean image| in grey levels (how much augmentation moved the pixels: geometry and
    intensity alike), std = mean per-view std of the normalised pixels, corr = pixel-wise correlation of the
    average view with the reference's average view."""
    clean = np.stack([radiograph(v % 12) for v in range(len(x))]).astype(np.float32)
    return {"change": float(np.abs(to_grey(x) - clean).mean()),
            "std": float(x.reshape(len(x), -1).std(1).mean()),
            "corr": float(np.corrcoef(x.mean(0).ravel(), reference.mean(0).ravel())[0, 1])}


def agrees(stats: dict, ref: dict) -> bool:
    """The stated tolerance: change within 5 %, std within 3 %, average views correlated ≥ 0.995. Measured for the
    torch path: 0.6 %, 1.1 % (one resampling keeps a little more contrast than albumentations' two) and 0.9993."""
    return (abs(stats["change"] / ref["change"] - 1) <= 0.05 and abs(stats["std"] / ref["std"] - 1) <= 0.03
            and stats["corr"] >= 0.995)


def test_pixel_statistics_match_albumentations():
    """1,200 views of 12 images through both paths, the same (image, view) pairs: within the tolerance of `agrees`."""
    ref, out, _ = both(VIEWS)
    want, got = statistics(ref, ref), statistics(out, ref)
    assert agrees(got, want), (got, want)


@pytest.mark.parametrize("wrong", [{"rotate_limit": 40.0}, {"hflip": 0.0}, {"rrc_scale": (0.5, 1.0)},
                                   {"brightness_contrast": 0.4}])
def test_pixel_statistics_catch_a_wrong_range(wrong):
    """Negative controls: the torch path with one range changed (measured: change +13 %, −40 %, +21 %, +12 %) fails
    the same comparison."""
    ref, _, _ = both(VIEWS)
    _, out, _ = both(VIEWS, aug=dict(STRONG, **wrong))
    assert not agrees(statistics(out, ref), statistics(ref, ref))


def test_views_replay_in_any_batch_and_process_order():
    """View v of image k is a function of (seed, k, v): the same picture alone or inside another batch."""
    imgs = torch.from_numpy(np.stack([radiograph(i) for i in range(6)]))[:, None]
    params = torch.from_numpy(np.stack([batch_aug.draw_params(SIZE, 5, i, 1, **STRONG) for i in range(6)]))
    together = batch_aug.augment_batch(imgs, params)
    alone = batch_aug.augment_batch(imgs[3:4], params[3:4])
    torch.testing.assert_close(together[3:4], alone, atol=1e-5, rtol=0)
    assert np.array_equal(batch_aug.draw_params(SIZE, 5, 3, 1, **STRONG), params[3].numpy())


def test_torch_backend_dataset_hands_over_uint8_and_the_device_augments(tmp_path):
    import pandas as pd
    from PIL import Image

    paths = []
    for i in range(5):
        Image.fromarray(radiograph(i)).save(tmp_path / f"{i}.png")
        paths.append(f"{i}.png")
    rows = pd.DataFrame({"image_path": paths, "label": [0, 1, 0, 1, 1]})
    ds = XrayDataset(rows, tmp_path, SIZE, train=True, in_chans=3, seed=1, num_views=2, aug=STRONG,
                     backend="torch")
    item = ds[2]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, SIZE, SIZE)
    assert item["aug"].shape == (len(batch_aug.PARAMS),)
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    batches = DeviceBatches(loader, torch.device("cpu"), channels_last=True)
    (batch,) = list(batches)
    assert "aug" not in batch and batch["image"].dtype == torch.float32 and batch["image"].shape == (5, 3, SIZE, SIZE)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last) and batches.wait_s >= 0
    # the batch is what the dataset says each image looks like (get_image), channels replicated
    for i in range(5):
        np.testing.assert_allclose(batch["image"][i, 1].numpy(), ds.get_image(i, item_view(ds, i)), atol=1e-5)
    clean = ds.with_view(CLEAN_VIEW)[0]
    assert np.array_equal(clean["aug"].numpy(), batch_aug.identity_params(SIZE))


def item_view(ds: XrayDataset, i: int) -> int:
    return ds.view_of(i)


def test_unknown_backend_is_refused():
    import pandas as pd

    from kd_fracture.config import DataConfig
    from kd_fracture.data.loaders import resolve_aug_backend
    from kd_fracture.errors import ConfigError

    with pytest.raises(ConfigError, match="data.aug_backend='gpu'"):
        resolve_aug_backend(DataConfig(aug_backend="gpu"))
    assert resolve_aug_backend(DataConfig(), torch.device("cpu")) == "albumentations"
    assert resolve_aug_backend(DataConfig(), torch.device("cuda")) == "torch"
    with pytest.raises(ConfigError):
        XrayDataset(pd.DataFrame({"image_path": [], "label": []}), ".", SIZE, train=True, backend="gpu")


# ----------------------------------------------------------------------------------------------------------------------
# through the pipeline, on the CPU: what a GPU run does, minus the GPU


def cli_args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def test_a_fold_trains_with_the_torch_backend_and_records_where_the_epoch_went(tiny_cv_overrides):
    import json
    from pathlib import Path

    import pandas as pd

    from kd_fracture import cv

    over = dict(tiny_cv_overrides, **{"data.aug_backend": "torch", "aug.rotate_limit": 10, "aug.rrc_scale_min": 0.8,
                                      "aug.brightness_contrast": 0.2})
    assert cv.main(cli_args(over) + ["--fold", "0"]) == 0
    fold = Path(over["run_dir"]) / "fold_0"
    history = pd.read_csv(fold / "history.csv")
    for column in ("train_s", "data_wait_s", "eval_s", "checkpoint_s", "train_images_per_s"):
        assert (history[column] >= 0).all(), column
    assert (history["data_wait_s"] <= history["train_s"]).all() and (history["train_images_per_s"] > 0).all()
    assert json.loads((fold / "metrics.json").read_text())["n_train"] > 0


def test_the_teacher_cache_key_names_the_backend_only_when_it_is_torch(tmp_path):
    from kd_fracture.config import AugConfig, DataConfig, ModelConfig
    from kd_fracture.train import teacher_cache

    ckpt = tmp_path / "t.safetensors"
    ckpt.write_bytes(b"weights")
    cpu = torch.device("cpu")
    args = (ckpt, ModelConfig(), AugConfig(), 2, 0, ["a.png"])
    default = teacher_cache.cache_components(args[0], args[1], DataConfig(), *args[2:], device=cpu)
    torch_backend = teacher_cache.cache_components(args[0], args[1], DataConfig(aug_backend="torch"), *args[2:],
                                                   device=cpu)
    assert "aug_backend" not in default  # keys made before the backend existed stay valid
    assert torch_backend["aug_backend"] == "torch"
