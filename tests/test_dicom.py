"""DICOM reading (docs/design.md §2 "DICOM"): the standard's Modality LUT → VOI LUT → 8 bits → MONOCHROME1 pipeline,
the refusals (multi-frame, no pixel data, missing decoder or pydicom), and DICOM wherever images are found (folder
layout, MURA CSVs, predict/evaluate/explain inputs, extension-less files).

Every DICOM is written here with pydicom; tests that need pydicom skip cleanly without the `dicom` extra.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kd_fracture.data.dataset import CLEAN_VIEW, XrayDataset
from kd_fracture.data.imageio import is_image_file, read_grayscale
from kd_fracture.data.inputs import as_manifest, collect_inputs
from kd_fracture.data.manifest import load_manifest
from kd_fracture.errors import DataError

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


@pytest.fixture
def pydicom():
    return pytest.importorskip("pydicom")


def save(ds, path: Path) -> Path:
    """Write a DICOM Part 10 file (128-byte preamble + DICM) on pydicom 3 and 2.x."""
    import pydicom

    path.parent.mkdir(parents=True, exist_ok=True)
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    return path


def make_dataset(pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                 window: tuple[float, float] | None = None, rescale: tuple[float, float] | None = None,
                 frames: int | None = None, pixel_data: bool = True, transfer_syntax: str | None = None):
    """A single-sample DX dataset holding `pixels` ((H, W), or (F, H, W) with `frames`), uint8 or uint16."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "patient1"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if frames is not None:
        ds.NumberOfFrames = frames
    if pixel_data:
        ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def write_dicom(path: Path, pixels: np.ndarray, **kwargs) -> Path:
    return save(make_dataset(pixels, **kwargs), path)


def ramp12() -> np.ndarray:
    """Every 12-bit value once: (64, 64) uint16 holding 0 … 4095 row by row."""
    return np.arange(4096, dtype=np.uint16).reshape(64, 64)


def standard_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) onto [0, 255], written out independently of pydicom."""
    x = x.astype(np.float64)
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(x <= center - 0.5 - (width - 1) / 2, 0, np.where(x > center - 0.5 + (width - 1) / 2, 255, y))
    return np.clip(np.rint(y), 0, 255)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ conversion maths


def test_window_maps_center_pm_width_over_2_onto_0_255(pydicom, tmp_path):
    center, width = 2048, 1024
    img = read_grayscale(write_dicom(tmp_path / "w.dcm", ramp12(), bits_stored=12, window=(center, width)))
    assert img.dtype == np.uint8 and img.shape == (64, 64)
    x = ramp12().ravel()
    got = img.ravel().astype(np.int64)
    assert np.abs(got - standard_window(x, center, width)).max() <= 1  # rounding of pydicom's float path
    assert (got[x <= center - width // 2] == 0).all() and (got[x >= center + width // 2] == 255).all()
    inside = (x > center - width // 2) & (x < center + width // 2)
    assert (np.diff(got[inside]) >= 0).all() and got[x == center][0] in (127, 128)
    assert len(np.unique(got[inside])) == 256  # the whole 8-bit range is used by the window, none by the rest


def test_8_bits_span_the_window_not_the_pixels(pydicom, tmp_path):
    """Pixels 1000 … 3047 under a window [0, 4096): grey levels stay where the window puts them (no min–max)."""
    x = (1000 + ramp12() // 2).astype(np.uint16)
    img = read_grayscale(write_dicom(tmp_path / "wide.dcm", x, bits_stored=12, window=(2048, 4096)))
    assert np.abs(img.astype(np.int64) - standard_window(x, 2048, 4096)).max() <= 1
    assert 60 <= img.min() <= 66 and 188 <= img.max() <= 194  # ≈ 1000/4096·255 and 3047/4096·255


def test_rescale_is_applied_before_the_window(pydicom, tmp_path):
    slope, intercept = 2.0, -1000.0
    center, width = 2 * 2048 + intercept, 2 * 1024  # the same window as above, in modality (rescaled) units
    img = read_grayscale(write_dicom(tmp_path / "r.dcm", ramp12(), bits_stored=12, window=(center, width),
                                     rescale=(slope, intercept)))
    modality = ramp12().ravel() * slope + intercept
    assert np.abs(img.ravel().astype(np.int64) - standard_window(modality, center, width)).max() <= 1
    plain = read_grayscale(write_dicom(tmp_path / "p.dcm", ramp12(), bits_stored=12, window=(2048, 1024)))
    assert np.abs(img.astype(np.int64) - plain).max() <= 1


def test_without_a_window_the_modality_values_are_scaled_min_max(pydicom, tmp_path):
    x = ramp12()
    img = read_grayscale(write_dicom(tmp_path / "a.dcm", x, bits_stored=12))
    np.testing.assert_array_equal(img, np.rint(x / 4095 * 255).astype(np.uint8))
    sub = (1000 + x // 2).astype(np.uint16)  # 1000 … 3047: stretched to the full 8 bits
    img = read_grayscale(write_dicom(tmp_path / "b.dcm", sub, bits_stored=12))
    np.testing.assert_array_equal(img, np.rint((sub - 1000.0) / 2047 * 255).astype(np.uint8))
    # a negative slope is part of the Modality LUT: the values (and so the picture) run the other way
    img = read_grayscale(write_dicom(tmp_path / "c.dcm", x, bits_stored=12, rescale=(-1.0, 4095.0)))
    np.testing.assert_array_equal(img, np.rint((4095 - x) / 4095 * 255).astype(np.uint8))


def test_bits_stored_16(pydicom, tmp_path):
    x = (np.arange(4096, dtype=np.uint32) * 16).astype(np.uint16).reshape(64, 64)  # 0 … 65520
    img = read_grayscale(write_dicom(tmp_path / "a.dcm", x, bits_stored=16))
    np.testing.assert_array_equal(img, np.rint(x / 65520 * 255).astype(np.uint8))
    center, width = 30000, 20000
    img = read_grayscale(write_dicom(tmp_path / "w.dcm", x, bits_stored=16, window=(center, width)))
    assert np.abs(img.ravel().astype(np.int64) - standard_window(x.ravel(), center, width)).max() <= 1
    assert img.min() == 0 and img.max() == 255


@pytest.mark.parametrize("window", [None, (2048, 1024)])
def test_monochrome1_is_the_inverse_of_monochrome2(pydicom, tmp_path, window):
    m2 = read_grayscale(write_dicom(tmp_path / "m2.dcm", ramp12(), bits_stored=12, window=window))
    m1 = read_grayscale(write_dicom(tmp_path / "m1.dcm", ramp12(), bits_stored=12, window=window,
                                    photometric="MONOCHROME1"))
    np.testing.assert_array_equal(m1, 255 - m2)
    assert m1[0, 0] == 255 and m1[-1, -1] == 0  # minimum stored value shows white


def test_voi_lut_sequence_maps_its_first_entry_to_0_and_last_to_255(pydicom, tmp_path):
    from pydicom.dataset import Dataset

    ds = make_dataset(ramp12(), bits_stored=12, window=(100, 10))  # the LUT takes precedence over the window
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 16])  # LUTDescriptor: 256 entries, first mapped value 0, 16 bits
    item.add_new(0x00283006, "US", [16 * i for i in range(256)])  # LUTData: 0, 16, …, 4080
    ds.VOILUTSequence = [item]
    img = read_grayscale(save(ds, tmp_path / "lut.dcm"))
    x = ramp12()
    np.testing.assert_array_equal(img, np.minimum(x, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------ same pixels as PNG


def write_png(path: Path, img: np.ndarray) -> Path:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())
    return path


def xray_like(seed: int = 0, size: int = 48) -> np.ndarray:
    img = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    img[0, 0], img[-1, -1] = 0, 255  # spans the full 8-bit range
    return img


@pytest.mark.parametrize("variant", ["8-bit", "16-bit container", "8-bit windowed", "extension-less"])
def test_8bit_representable_dicom_reads_exactly_as_the_png(pydicom, tmp_path, variant):
    img = xray_like()
    png = write_png(tmp_path / "img.png", img)
    if variant == "8-bit":
        dcm = write_dicom(tmp_path / "img.dcm", img)
    elif variant == "16-bit container":
        dcm = write_dicom(tmp_path / "img.dcm", img.astype(np.uint16), bits_stored=16)
    elif variant == "8-bit windowed":
        img = np.clip(img, 7, 200)  # not spanning 0 … 255: min–max would stretch it, the identity window does not
        png = write_png(tmp_path / "img.png", img)
        dcm = write_dicom(tmp_path / "img.dcm", img, window=(128, 256))
    else:
        dcm = write_dicom(tmp_path / "IM000001", img)
    np.testing.assert_array_equal(read_grayscale(dcm), read_grayscale(png))
    np.testing.assert_array_equal(read_grayscale(dcm), img)


def test_dicom_and_png_inputs_give_identical_model_inputs_and_outputs(pydicom, tmp_path):
    """Identical decoded pixels → identical dataset tensors → identical predictions of any model."""
    img = xray_like(1, size=40)
    png, dcm = write_png(tmp_path / "png" / "a.png", img), write_dicom(tmp_path / "dcm" / "a.dcm", img)
    tensors = []
    for path in (png, dcm):
        images, problems = collect_inputs([str(path)])
        assert not problems and [i.path for i in images] == [path]
        m = as_manifest(images)
        ds = XrayDataset(m.df, m.root, img_size=32, train=False)
        tensors.append(torch.from_numpy(ds.get_image(0, CLEAN_VIEW))[None, None])
    torch.testing.assert_close(tensors[0], tensors[1], rtol=0, atol=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 1))
    with torch.no_grad():
        assert torch.equal(model(tensors[0]), model(tensors[1]))


# ------------------------------------------------------------------------------------------------ refusals


def test_multi_frame_is_refused(pydicom, tmp_path):
    frames = np.stack([xray_like(0), xray_like(1)])
    path = write_dicom(tmp_path / "cine.dcm", frames, frames=2)
    with pytest.raises(DataError) as e:
        read_grayscale(path)
    msg = one_line(e)
    assert msg.startswith(f"{path}: ") and "multi-frame" in msg and "2 frames" in msg


def test_dicom_without_pixel_data_is_refused(pydicom, tmp_path):
    path = write_dicom(tmp_path / "report.dcm", xray_like(), pixel_data=False)
    with pytest.raises(DataError) as e:
        read_grayscale(path)
    assert "no pixel data" in one_line(e)


def test_truncated_dicom_is_a_data_error(pydicom, tmp_path):
    good = write_dicom(tmp_path / "good.dcm", ramp12(), bits_stored=12)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom may warn about the short element before failing
        with pytest.raises(DataError) as e:
            read_grayscale(bad)
    assert one_line(e).startswith(f"{bad}: ") and "DICOM" in str(e.value)


def test_compressed_without_a_decoder_names_what_to_install(pydicom, tmp_path):
    from pydicom.uid import JPEGLSLossless

    try:
        from pydicom.pixels import get_decoder
        available = get_decoder(JPEGLSLossless).is_available
    except ImportError:  # pydicom 2.x
        available = any(h.supports_transfer_syntax(JPEGLSLossless) and h.is_available()
                        for h in pydicom.config.pixel_data_handlers)
    if available:
        pytest.skip("a JPEG-LS decoder is installed")
    from pydicom.encaps import encapsulate

    ds = make_dataset(xray_like(), transfer_syntax=JPEGLSLossless, pixel_data=False)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7 not a real JPEG-LS codestream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path = save(ds, tmp_path / "jls.dcm")
    with pytest.raises(DataError) as e:
        read_grayscale(path)
    msg = one_line(e)
    assert "compressed" in msg and "JPEG-LS" in msg and "pip install pylibjpeg pylibjpeg-libjpeg" in msg
    assert "python-gdcm" in msg


def test_missing_pydicom_names_the_extra(tmp_path, monkeypatch):
    """No pydicom needed: the DICM marker alone routes the file to the DICOM reader."""
    fake = tmp_path / "IM0001"
    fake.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom → ModuleNotFoundError
    with pytest.raises(DataError) as e:
        read_grayscale(fake)
    msg = one_line(e)
    assert msg.startswith(f"{fake}: ") and "pydicom is not installed" in msg and "kd_fracture[dicom]" in msg
    named = tmp_path / "x.dcm"  # a .dcm is DICOM by its name, marker or not
    named.write_bytes(b"anything")
    with pytest.raises(DataError, match=r"kd_fracture\[dicom\]"):
        read_grayscale(named)


def test_extension_less_files_are_images_only_with_the_dicm_marker(tmp_path):
    dicm = b"\0" * 128 + b"DICM" + b"\0" * 16
    for name in ("IM0001", "1.2.840.113619.2.55.3"):
        (tmp_path / name).write_bytes(dicm)
        assert is_image_file(tmp_path / name)
    for name, data in (("README", b"\0" * 200), ("short", b"DICM"), ("notes.txt", dicm), ("scan.v2", dicm)):
        (tmp_path / name).write_bytes(data)
        assert not is_image_file(tmp_path / name), name
    for name in ("a.png", "b.JPG", "c.jpeg", "d.DCM"):
        assert is_image_file(tmp_path / name)  # by suffix alone, as before


# ------------------------------------------------------------------------------------------------ where images are found


def test_collect_inputs_finds_extension_less_dicom_in_folders_and_explicitly(pydicom, tmp_path):
    study = tmp_path / "XR_WRIST" / "patient1" / "study1_positive"
    a = write_dicom(study / "IM000001", xray_like(0))
    b = write_dicom(study / "1.2.826.0.1.3680043.8.498.7", xray_like(1))
    c = write_dicom(study / "view3.dcm", xray_like(2))
    (study / "README").write_text("not an image")
    (study / "notes.txt").write_text("not an image")
    images, problems = collect_inputs([str(tmp_path / "XR_WRIST")])
    assert not problems
    assert sorted(i.path for i in images) == sorted([a, b, c])
    assert {i.label for i in images} == {1} and {i.body_part for i in images} == {"XR_WRIST"}
    for i in images:
        assert read_grayscale(i.path).shape == (48, 48)

    images, problems = collect_inputs([str(a), str(study / "README")])
    assert [i.path for i in images] == [a]
    assert problems == [(str(study / "README"), "not an image file (expected .png, .jpg, .jpeg, .tif, .tiff, .dcm or a DICOM file)")]


def test_folder_layout_with_dicom_loads_and_verifies(pydicom, tmp_path):
    root = tmp_path / "xr"
    write_dicom(root / "train" / "fractured" / "a.dcm", xray_like(0))
    write_dicom(root / "train" / "not_fractured" / "IM000002", xray_like(1), photometric="MONOCHROME1")
    write_png(root / "val" / "normal" / "c.png", xray_like(2))
    write_dicom(root / "test" / "fractured" / "d.DCM", ramp12(), bits_stored=12, window=(2048, 1024))
    write_dicom(root / "test" / "not_fractured" / "1.2.3.4.5", ramp12(), bits_stored=12)
    write_dicom(root / "test" / "not_fractured" / "1.2.3.4.6", ramp12(), bits_stored=12)
    (root / "test" / "not_fractured" / "README").write_text("not an image")
    with pytest.warns(UserWarning) as record:
        m = load_manifest(root, verify_images=True)
    assert any("ignored 1 non-image file" in str(w.message) and "README" in str(w.message) for w in record)
    assert m.source == "folder"
    df = m.df.set_index("image_path")
    assert sorted(df.index) == ["test/fractured/d.DCM", "test/not_fractured/1.2.3.4.5", "test/not_fractured/1.2.3.4.6",
                                "train/fractured/a.dcm", "train/not_fractured/IM000002", "val/normal/c.png"]
    assert df.loc["train/fractured/a.dcm", "study_id"] == "train/fractured/a"
    assert df.loc["test/fractured/d.DCM", "study_id"] == "test/fractured/d"
    # a UID-named file keeps its whole name: two images never collapse into one study
    assert df.loc["test/not_fractured/1.2.3.4.5", "study_id"] == "test/not_fractured/1.2.3.4.5"
    assert df["study_id"].is_unique
    assert df["label"].to_dict() == {"test/fractured/d.DCM": 1, "test/not_fractured/1.2.3.4.5": 0,
                                     "test/not_fractured/1.2.3.4.6": 0, "train/fractured/a.dcm": 1,
                                     "train/not_fractured/IM000002": 0, "val/normal/c.png": 0}
    ds = XrayDataset(m.df, m.root, img_size=32, train=False, cache=True)
    assert len(ds) == 6 and ds[0]["image"].shape == (1, 32, 32)


def test_mura_csv_paths_may_name_dcm_files(pydicom, tmp_path):
    root = tmp_path / "MURA"
    mura = root / "MURA-v1.1"
    rows = {"train": ("patient00001", 1), "valid": ("patient00002", 0)}
    for split, (patient, label) in rows.items():
        study = f"MURA-v1.1/{split}/XR_WRIST/{patient}/study1_{'positive' if label else 'negative'}"
        write_dicom(root / study / "image1.dcm", xray_like(label))
        write_png(root / study / "image2.png", xray_like(label + 2))
        (mura / f"{split}_image_paths.csv").write_text(f"{study}/image1.dcm\n{study}/image2.png\n")
        (mura / f"{split}_labeled_studies.csv").write_text(f"{study}/,{label}\n")
    m = load_manifest(root, verify_images=True)
    assert m.source == "mura" and len(m.df) == 4
    assert m.df["image_path"].str.endswith(".dcm").sum() == 2
    (mura / "train_image_paths.csv").write_text(
        "MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/image1.dicom\n")
    with pytest.raises(DataError, match="is not of the form"):
        load_manifest(root)


def test_verify_images_reports_a_bad_dicom_row(pydicom, tmp_path):
    root = tmp_path / "xr"
    write_dicom(root / "train" / "fractured" / "a.dcm", xray_like(0))
    write_dicom(root / "test" / "normal" / "cine.dcm", np.stack([xray_like(1)] * 3), frames=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_manifest(root)  # found without decoding
        with pytest.raises(DataError) as e:
            load_manifest(root, verify_images=True)
    msg = one_line(e)
    assert msg.startswith("test/normal/cine.dcm: ") and "multi-frame" in msg


def test_png_and_jpeg_reading_is_unchanged(tmp_path):
    """The DICOM branch never sees a raster suffix, even when its bytes 128-131 happen to read DICM."""
    img = xray_like(3, size=64)
    png = write_png(tmp_path / "a.png", img)
    np.testing.assert_array_equal(read_grayscale(png), img)
    data = bytearray(png.read_bytes())
    data[128:132] = b"DICM"  # damages the PNG: whatever OpenCV makes of it, it is never read as DICOM
    (tmp_path / "b.png").write_bytes(bytes(data))
    try:
        read_grayscale(tmp_path / "b.png")
    except DataError as e:
        assert "corrupt or truncated" in str(e) and "DICOM" not in str(e)
