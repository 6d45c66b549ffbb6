"""Issue 15 item 6: odd images are decoded by a stated rule, and evaluate scores any source.

Images are made with Pillow in each mode (16-bit, 32-bit, float, palette, LA, CMYK) and decoded with
`imageio.read_grayscale`; the expected arrays are computed here from the rule in its docstring. evaluate is run on
untrained fold checkpoints (scores do not matter, only which images are scored with which labels).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kd_fracture import evaluate, predict
from kd_fracture.config import CVConfig, load_config
from kd_fracture.data import imageio
from kd_fracture.data.loaders import resolve_manifest
from kd_fracture.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    """Each test sees the one-time notes anew and the default window."""
    monkeypatch.setattr(imageio, "_WARNED", set())
    monkeypatch.setattr(imageio, "_window", imageio.WINDOW_PERCENTILES)


def windowed(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    """The documented rule, written out: percentiles lo/hi → 0/255, linear, rounded, clipped."""
    values = values.astype(np.float64)
    a, b = np.percentile(values, (lo, hi))
    return np.clip(np.rint((values - a) * 255.0 / (b - a)), 0, 255).astype(np.uint8)


def luminance(bgr: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(bgr, dtype=np.uint8), cv2.COLOR_BGR2GRAY)


def ramp16() -> np.ndarray:
    """(64, 64) uint16 0 … 65520 with 20 hot pixels at 65535 and 20 dead ones at 0: a min–max rescale would keep
    them as the range; the percentile window does not."""
    x = (np.arange(64 * 64, dtype=np.uint32) * 8 + 20000).astype(np.uint16).reshape(64, 64)
    x.flat[::205] = 65535
    x.flat[1::205] = 0
    return x


# ---------------------------------------------------------------------------------------------------- high bit depth


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_is_windowed_by_percentiles_and_noted_once(tmp_path, capsys, suffix):
    x = ramp16()
    Image.fromarray(x).save(tmp_path / f"a{suffix}")
    Image.fromarray(x).save(tmp_path / f"b{suffix}")
    assert Image.open(tmp_path / f"a{suffix}").mode == "I;16"
    got = imageio.read_grayscale(tmp_path / f"a{suffix}")
    assert got.dtype == np.uint8 and got.shape == (64, 64)
    np.testing.assert_array_equal(got, windowed(x))
    assert got.min() == 0 and got.max() == 255 and (got == 255).sum() > 20  # the window clips, hot pixels do not rule
    imageio.read_grayscale(tmp_path / f"b{suffix}")
    err = capsys.readouterr().err
    assert err.count("note: 16-bit images are windowed to uint8 by percentiles 0.5–99.5 "
                     "(data.window_percentiles)") == 1, err


def test_window_argument_and_process_default(tmp_path):
    x = ramp16()
    Image.fromarray(x).save(tmp_path / "a.png")
    np.testing.assert_array_equal(imageio.read_grayscale(tmp_path / "a.png", window=(0, 100)), windowed(x, 0, 100))
    imageio.set_window_percentiles([2, 98])
    np.testing.assert_array_equal(imageio.read_grayscale(tmp_path / "a.png"), windowed(x, 2, 98))
    for bad in ([50, 10], [-1, 99], [1, 101], [5, 5], ["a", 9], [1]):
        with pytest.raises(ConfigError, match=r"data\.window_percentiles"):
            imageio.set_window_percentiles(bad)


def test_window_percentiles_is_a_config_key(tiny_phantom, tmp_path):
    """data.window_percentiles reaches the decoder where a config's data section takes effect; a bad value is a
    one-line ConfigError there."""
    cfg = load_config(CVConfig, None, {"data.root": str(tiny_phantom), "data.window_percentiles": [1, 99],
                                       "data.manifests_dir": str(tmp_path)})
    resolve_manifest(cfg.data)
    assert imageio._window == (1.0, 99.0)
    cfg = load_config(CVConfig, None, {"data.root": str(tiny_phantom), "data.window_percentiles": "99,1"})
    with pytest.raises(ConfigError, match=r"need 0 ≤ low < high ≤ 100"):
        resolve_manifest(cfg.data)


def test_cv_refuses_a_bad_window_before_writing(tiny_cv_overrides, capsys):
    from kd_fracture import cv

    over = dict(tiny_cv_overrides, **{"data.window_percentiles": "[99.5, 0.5]"})
    assert cv.main([a for k, v in over.items() for a in ("--set", f"{k}={v}")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("error: data.window_percentiles=[99.5, 0.5]: need 0 ≤ low < high ≤ 100, "
                                            "e.g. [0.5, 99.5]"), err
    assert not Path(over["run_dir"]).exists()


def test_32_bit_and_float_tiff(tmp_path, capsys):
    x = ramp16().astype(np.int32) * 3 - 50000
    Image.fromarray(x).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_array_equal(imageio.read_grayscale(tmp_path / "i.tif"), windowed(x))
    f = ramp16().astype(np.float32) / 7.5
    f[0, :3] = np.nan
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    got = imageio.read_grayscale(tmp_path / "f.tif")
    finite = np.isfinite(f)
    a, b = np.percentile(f[finite].astype(np.float64), (0.5, 99.5))
    expect = np.clip(np.rint((np.where(finite, f, a).astype(np.float64) - a) * 255 / (b - a)), 0, 255)
    np.testing.assert_array_equal(got, expect.astype(np.uint8))
    assert (got[0, :3] == 0).all()  # NaN → 0
    assert "32-bit integer images are windowed" in capsys.readouterr().err


def test_16_bit_colour_is_luminance_then_window(tmp_path):
    import cv2

    x = ramp16()
    bgr = np.stack([x, x // 2, 65535 - x], axis=-1)
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    lum = bgr.astype(np.float64) @ np.array([0.114, 0.587, 0.299])
    np.testing.assert_array_equal(imageio.read_grayscale(tmp_path / "c.png"), windowed(lum))


def test_8_bit_grayscale_is_unchanged(tmp_path):
    x = (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64)
    Image.fromarray(x).save(tmp_path / "g.png")
    np.testing.assert_array_equal(imageio.read_grayscale(tmp_path / "g.png"), x)


# ---------------------------------------------------------------------------------------------------- palette, alpha, CMYK


def palette_image() -> Image.Image:
    """Left half red (index 1), right half blue (index 2), top rows green (index 0)."""
    p = Image.new("P", (32, 32), 1)
    p.putpalette([0, 255, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    p.paste(2, (16, 0, 32, 32))
    p.paste(0, (0, 0, 32, 4))
    return p


def test_palette_decodes_to_the_palette_colours_luminance(tmp_path, capsys):
    palette_image().save(tmp_path / "p.png")
    got = imageio.read_grayscale(tmp_path / "p.png")
    red, green, blue = (luminance(np.array([[c[::-1]]]))[0, 0] for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    assert (red, green, blue) == (76, 150, 29)
    assert (got[:4] == green).all() and (got[4:, :16] == red).all() and (got[4:, 16:] == blue).all()
    assert "palette image expanded through its palette" in capsys.readouterr().err


def test_transparent_palette_entry_and_la_are_composited_on_black(tmp_path, capsys):
    palette_image().save(tmp_path / "pt.png", transparency=1)  # red is transparent
    got = imageio.read_grayscale(tmp_path / "pt.png")
    assert (got[4:, :16] == 0).all() and (got[4:, 16:] == 29).all()
    la = np.stack([np.full((32, 32), 200, np.uint8), np.full((32, 32), 128, np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert (imageio.read_grayscale(tmp_path / "la.png") == round(200 * 128 / 255)).all()
    assert capsys.readouterr().err.count("composited on black") == 1  # once per process


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_goes_through_rgb(tmp_path, capsys, suffix):
    cmyk = Image.new("CMYK", (32, 32), (0, 128, 255, 64))
    cmyk.paste((200, 0, 0, 0), (0, 0, 16, 32))
    cmyk.save(tmp_path / f"c{suffix}")
    rgb = np.asarray(Image.open(tmp_path / f"c{suffix}").convert("RGB"))
    got = imageio.read_grayscale(tmp_path / f"c{suffix}")
    np.testing.assert_array_equal(got, luminance(rgb[..., ::-1]))
    if suffix == ".tif":  # lossless: the documented formula exactly
        expect_rgb = np.array([(255 - 0) * (255 - 64) / 255, (255 - 128) * (255 - 64) / 255, 0])
        assert abs(int(got[0, 20]) - expect_rgb @ np.array([0.299, 0.587, 0.114])) <= 1.5
    err = capsys.readouterr().err
    assert "CMYK image converted to RGB" in err and "alpha" not in err  # TIFF's 4th channel is not an alpha


def test_tiff_is_an_image_file(tmp_path):
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "x.TIFF")
    assert imageio.is_image_file(tmp_path / "x.TIFF") and imageio.is_image_file(tmp_path / "x.tif")


def test_tiny_images_are_still_refused(tmp_path):
    Image.fromarray(np.zeros((8, 40), np.uint16)).save(tmp_path / "t.png")
    with pytest.raises(DataError, match="smaller than 16 px"):
        imageio.read_grayscale(tmp_path / "t.png")


# ---------------------------------------------------------------------------------------------------- evaluate sources


def phantom_studies(tiny_phantom: Path, n: int = 6) -> list[tuple[Path, int]]:
    """(first image, label) of the first n studies of each label in the phantom's holdout."""
    studies = pd.read_csv(tiny_phantom / "MURA-v1.1" / "valid_labeled_studies.csv", header=None, names=["s", "l"])
    picked = pd.concat([studies[studies["l"] == 0].head(n), studies[studies["l"] == 1].head(n)])
    return [(sorted((tiny_phantom / s).glob("*.png"))[0], int(label)) for s, label in picked.itertuples(index=False)]


def scored(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "predictions.csv").sort_values("image_path").reset_index(drop=True)


def test_evaluate_a_folder_with_only_test(fake_run, tiny_phantom, tmp_path, capsys):
    root = tmp_path / "only_test"
    picked = phantom_studies(tiny_phantom)
    for i, (image, label) in enumerate(picked):
        dest = root / "test" / ("fractured" if label else "not_fractured")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, dest / f"{i}.png")
    out = tmp_path / "out"
    assert evaluate.main(["--run", str(fake_run), "--data", str(root), "--out", str(out)]) == 0, capsys.readouterr()
    pred = scored(out)
    assert len(pred) == len(picked) and set(pred["split"]) == {"holdout"}
    assert pred["label"].tolist() == [int(p.startswith("test/fractured/")) for p in pred["image_path"]]
    assert set(pred["label"]) == {0, 1}


def test_evaluate_a_flat_folder_labelled_by_class_folders(fake_run, tiny_phantom, tmp_path, capsys):
    """A folder without train/val/test: the nearest class folder gives the label, however deep the image."""
    root = tmp_path / "Flat Data"
    picked = phantom_studies(tiny_phantom)
    for i, (image, label) in enumerate(picked):
        dest = root / ("Fractured" if label else "not-fractured") / ("deep" if i % 2 else "")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, dest / f"{i}.png")
    (root / "README.txt").write_text("not an image")  # skipped, as predict skips it
    assert evaluate.main(["--run", str(fake_run), "--data", str(root)]) == 0, capsys.readouterr()
    out = fake_run / "evaluate" / "flat-data"
    pred = scored(out)
    assert len(pred) == len(picked) and set(pred["split"]) == {"holdout"}
    assert pred["label"].tolist() == [int(p.startswith("Fractured/")) for p in pred["image_path"]]
    assert set(pred["label"]) == {0, 1} and pred["image_path"].str.contains("/deep/").any()
    assert (out / "summary.md").is_file() and (out / "tables" / "metrics.csv").is_file()


def test_evaluate_a_mura_style_folder_without_csvs(fake_run, tiny_phantom, tmp_path, capsys):
    """A MURA subtree (e.g. MURA-v1.1/valid/XR_WRIST): studies, patients and labels from the study folder names."""
    root = tiny_phantom / "MURA-v1.1" / "valid"
    out = tmp_path / "out"
    assert evaluate.main(["--run", str(fake_run), "--data", str(root), "--out", str(out)]) == 0, capsys.readouterr()
    pred = scored(out)
    assert len(pred) == len(list(root.rglob("*.png")))
    assert pred["label"].tolist() == [int("_positive/" in p) for p in pred["image_path"]]
    assert (pred["body_part"].str.startswith("XR_")).all()
    manifest = evaluate_source(root)
    assert manifest.df["study_id"].nunique() < len(manifest.df)  # images grouped into their studies
    assert manifest.df["patient_id"].str.fullmatch(r"XR_[A-Z]+/patient\d+").all()


def evaluate_source(root: Path):
    from kd_fracture.pipelines.evaluate import load_source

    return load_source(root)


def test_evaluate_refuses_unlabelled_images_in_one_line(fake_run, tiny_phantom, tmp_path, capsys):
    root = tmp_path / "loose"
    (root / "fractured").mkdir(parents=True)
    images = phantom_studies(tiny_phantom, 1)
    shutil.copy(images[0][0], root / "fractured" / "a.png")
    shutil.copy(images[1][0], root / "b.png")
    assert evaluate.main(["--run", str(fake_run), "--data", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {root}: 1 of 2 images have no label, e.g. 'b.png'") and "predict" in err[-1]
    assert not (fake_run / "evaluate" / "loose").exists()


def test_a_bad_file_on_the_command_line_is_a_file_not_a_row(fake_run, tiny_phantom, tmp_path, capsys):
    fake_png = tmp_path / "x.png"
    fake_png.write_text("this is text")
    good = phantom_studies(tiny_phantom, 1)[0][0]
    assert predict.main(["--run", str(fake_run), str(fake_png), str(good)]) == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if str(fake_png) in line)
    assert "row" not in err and "leave it out" in line, err
