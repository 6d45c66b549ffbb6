"""XrayDataset, ImageCache, transforms and loaders: shapes, determinism, replayable views (DESIGN §5)."""
from __future__ import annotations

import random

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from kd_fracture.data.dataset import ImageCache, XrayDataset, make_loader
from kd_fracture.data.transforms import GRAY_MEAN, GRAY_STD, apply_seeded, build_transforms, image_key, resize_pad
from kd_fracture.errors import DataError

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """10 small PNGs of varying (some non-square) shapes and the manifest rows that point at them."""
    root = tmp_path_factory.mktemp("xray")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        h, w = [(48, 48), (64, 40), (36, 60)][i % 3]
        img = (rng.random((h, w)) * 60).astype(np.uint8)
        cv2.line(img, (2, 3), (w - 5, h - 2), 220, 3)  # asymmetric content so flips/rotations change pixels
        rel = f"XR_HAND/patient{i // 2}/study1_{'positive' if i % 2 else 'negative'}/image{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / rel), img)
        rows.append({"image_path": rel, "study_id": rel.rsplit("/", 1)[0], "patient_id": f"patient{i // 2}",
                     "body_part": "XR_HAND", "label": i % 2, "split": "train"})
    return root, pd.DataFrame(rows)


def make_ds(data, **kw) -> XrayDataset:
    root, df = data
    return XrayDataset(df, root, SIZE, **({"train": True} | kw))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_item_shapes_and_dtypes(data, in_chans, train):
    ds = make_ds(data, train=train, in_chans=in_chans)
    item = ds[3]
    assert item["image"].shape == (in_chans, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert item["label"].shape == () and item["label"].dtype == torch.float32 and item["label"].item() == 1.0
    assert item["index"] == 3 and item["view"] == (0 if train else -1)
    if in_chans == 3:
        assert torch.equal(item["image"][0], item["image"][1]) and torch.equal(item["image"][0], item["image"][2])


def test_eval_is_deterministic_normalised_resize_pad(data):
    root, df = data
    ds = make_ds(data, train=False)
    expected = (resize_pad(cv2.imread(str(root / df["image_path"][4]), cv2.IMREAD_GRAYSCALE), SIZE) / 255.0
                - GRAY_MEAN) / GRAY_STD
    first = ds[4]["image"]
    np.testing.assert_allclose(first[0].numpy(), expected, atol=1e-5)
    ds.set_epoch(7)  # epochs do not touch eval items
    assert ds[4]["view"] == -1 and torch.equal(ds[4]["image"], first)


def test_replayed_views_are_identical_and_distinct(data):
    a, b = make_ds(data, seed=5), make_ds(data, seed=5)
    # different call order in b: views first, then images
    first = {(i, v): a.with_view(v)[i]["image"] for i in range(len(a)) for v in range(3)}
    second = {(i, v): b.with_view(v)[i]["image"] for v in reversed(range(3)) for i in reversed(range(len(b)))}
    for key, img in first.items():
        assert torch.equal(img, second[key]), key
        assert torch.equal(img, a.with_view(key[1])[key[0]]["image"]), key
    for i in range(len(a)):
        assert not torch.equal(first[(i, 0)], first[(i, 1)]) and not torch.equal(first[(i, 1)], first[(i, 2)])
    other_seed = make_ds(data, seed=6)
    assert not torch.equal(other_seed.with_view(0)[0]["image"], first[(0, 0)])
    assert a.with_view(2)[1]["view"] == 2


def test_clean_view_of_train_dataset_is_eval_transform(data):
    assert torch.equal(make_ds(data).with_view(-1)[2]["image"], make_ds(data, train=False)[2]["image"])


def test_num_views_limits_distinct_augmentations(data):
    V = 3
    ds = make_ds(data, num_views=V)
    seen: dict[int, set[bytes]] = {i: set() for i in range(len(ds))}
    views: dict[int, set[int]] = {i: set() for i in range(len(ds))}
    for epoch in range(8):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            seen[i].add(item["image"].numpy().tobytes())
            views[i].add(item["view"])
            assert item["view"] == (epoch + image_key(ds.df["image_path"][i])) % V
    assert all(len(s) == V for s in seen.values())
    assert all(v == set(range(V)) for v in views.values())

    fresh = make_ds(data, num_views=None)
    images = []
    for epoch in range(4):
        fresh.set_epoch(epoch)
        assert fresh[0]["view"] == epoch
        images.append(fresh[0]["image"].numpy().tobytes())
    assert len(set(images)) == 4


def test_cache_matches_decoding_on_the_fly(data):
    root, df = data
    cache = ImageCache([root / p for p in df["image_path"]], SIZE)
    assert cache.array.shape == (10, SIZE, SIZE) and cache.array.dtype == np.uint8 and cache.nbytes == 10 * SIZE**2
    for train in (True, False):
        plain = make_ds(data, train=train, seed=1)
        for cached in (make_ds(data, train=train, seed=1, cache=cache), make_ds(data, train=train, seed=1, cache=True)):
            for i in range(len(plain)):
                assert torch.equal(plain[i]["image"], cached[i]["image"]), (train, i)
    with pytest.raises(ValueError, match="ImageCache holds"):
        XrayDataset(df.iloc[:5], root, SIZE, train=False, cache=cache)


def test_resize_pad_keeps_aspect_and_pads():
    tall = np.full((100, 50), 200, dtype=np.uint8)
    out = resize_pad(tall, 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    rows, cols = np.nonzero(out)
    assert (rows.min(), rows.max()) == (0, 31) and (cols.min(), cols.max()) == (8, 23)  # 16 px wide, centred
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all()
    wide = resize_pad(np.full((20, 80), 255, dtype=np.uint8), 32)  # 4:1 -> 32 x 8
    assert np.count_nonzero(wide.any(axis=1)) == 8 and wide.any(axis=0).all()
    small = resize_pad(np.full((8, 16), 100, dtype=np.uint8), 32)  # enlarging: 16 x 32
    assert np.count_nonzero(small.any(axis=1)) == 16 and small.max() == 100


def test_corrupt_image_error_names_the_path(data, tmp_path):
    root, df = data
    bad = tmp_path / "XR_HAND" / "broken.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rows = pd.concat([df.iloc[:2], df.iloc[:1].assign(image_path="XR_HAND/broken.png")], ignore_index=True)
    for p in df["image_path"][:2]:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes((root / p).read_bytes())
    ds = XrayDataset(rows, tmp_path, SIZE, train=True)
    assert ds[0]["image"].shape == (1, SIZE, SIZE)
    with pytest.raises(DataError, match="broken.png"):
        ds[2]
    with pytest.raises(DataError, match="broken.png"):
        XrayDataset(rows, tmp_path, SIZE, train=False, cache=True)


def test_apply_seeded_leaves_global_rng_alone():
    img = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE), dtype=np.uint8)
    tf = build_transforms(SIZE, True)
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    out = apply_seeded(tf, img, seed=0, key=1, view=2)
    assert (np.random.random(), random.random()) == expected
    assert out.dtype == np.float32 and out.shape == (SIZE, SIZE)


def test_build_transforms_eval_is_normalise_only():
    img = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    out = build_transforms(SIZE, False)(image=img)["image"]
    np.testing.assert_allclose(out, (img / 255.0 - GRAY_MEAN) / GRAY_STD, atol=1e-5)
    identity = build_transforms(SIZE, True, hflip=0, rotate_limit=0, rrc_scale=(1.0, 1.0), brightness_contrast=0)
    np.testing.assert_allclose(apply_seeded(identity, img, 0, 0, 0), out, atol=1e-6)


def _orders(loader, epochs=2):
    return [torch.cat([b["index"] for b in loader]).tolist() for _ in range(epochs)]


def test_make_loader_order_reproducible(data):
    ds = make_ds(data, train=False)
    a = _orders(make_loader(ds, 3, shuffle=True, seed=0))
    b = _orders(make_loader(ds, 3, shuffle=True, seed=0))
    c = _orders(make_loader(ds, 3, shuffle=True, seed=1))
    assert a == b and a != c and a[0] != a[1]
    assert sorted(a[0]) == list(range(len(ds)))
    assert _orders(make_loader(ds, 4, shuffle=False, seed=0), 1)[0] == list(range(len(ds)))
    dropped = _orders(make_loader(ds, 4, shuffle=True, seed=0, drop_last=True), 1)[0]
    assert len(dropped) == 8


def test_set_epoch_reaches_persistent_workers(data):
    ds = make_ds(data, num_views=None)
    loader = make_loader(ds, 4, shuffle=True, seed=0, num_workers=2)
    reference = make_ds(data, num_views=None)
    orders = []
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        batches = list(loader)
        orders.append(torch.cat([b["index"] for b in batches]).tolist())
        assert all((b["view"] == epoch).all() for b in batches)
        for b in batches:
            for idx, img in zip(b["index"].tolist(), b["image"]):
                assert torch.equal(img, reference.with_view(epoch)[idx]["image"])
    assert orders == _orders(make_loader(ds, 4, shuffle=True, seed=0), 2)  # workers do not change the order


# ----------------------------------------------------------------------------------------------------------------------
# odd images (issue #15 item 6)


def test_images_under_16_px_are_refused(tmp_path):
    import cv2

    from kd_fracture.data.imageio import read_grayscale
    from kd_fracture.errors import DataError

    for w, h in ((1, 1), (15, 64), (64, 8)):
        path = tmp_path / f"small_{w}x{h}.png"
        cv2.imwrite(str(path), np.full((h, w), 128, np.uint8))
        with pytest.raises(DataError, match=f"{w}×{h} px, smaller than 16 px on a side"):
            read_grayscale(path)
    ok = tmp_path / "ok.png"
    cv2.imwrite(str(ok), np.full((16, 16), 128, np.uint8))
    assert read_grayscale(ok).shape == (16, 16)


def test_rgba_is_composited_on_black_with_one_note(tmp_path, capsys):
    import cv2

    from kd_fracture.data import imageio

    imageio._WARNED.discard("rgba")
    bgra = np.zeros((32, 32, 4), np.uint8)
    bgra[..., :3] = 200
    bgra[:, :16, 3] = 255  # left half opaque, right half transparent
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / name), bgra)
    img = imageio.read_grayscale(tmp_path / "a.png")
    assert (img[:, :16] == 200).all() and (img[:, 16:] == 0).all()  # transparent → black, not the hidden colour
    imageio.read_grayscale(tmp_path / "b.png")
    assert capsys.readouterr().err.count("composited on black") == 1  # said once per process
