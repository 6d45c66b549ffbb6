"""Image decoding shared by the dataset, `--verify-images`, predict, evaluate, explain and the app.

PNG/JPEG/TIFF are decoded by OpenCV, and every pixel format becomes one (H, W) uint8 image by a fixed rule
(`read_grayscale`): colour → luminance, alpha composited on black, palette through its palette, CMYK through RGB,
16-bit / 32-bit / float windowed by percentiles (`data.window_percentiles`, default 0.5–99.5). DICOM (`.dcm`, or an extension-less / UID-named file with the Part 10 preamble and
`DICM` marker) needs the `dicom` extra (pydicom) and is converted as the standard's grayscale pipeline says: stored
values → Modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence) → VOI LUT (the first VOI LUT Sequence item,
else the first WindowCenter/WindowWidth) → 8 bits over the VOI output range (without a VOI transform: min–max of the
modality values) → MONOCHROME1 inverted. Only single-frame images are read.
"""
from __future__ import annotations

import io
import sys
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np

from kd_fracture.errors import ConfigError, DataError
from kd_fracture.extras import optional

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_SUFFIX = ".dcm"
IMAGE_SUFFIXES = (*RASTER_SUFFIXES, DICOM_SUFFIX)
"""Suffixes (lower-case) read as images; an extension-less DICOM file is an image too (see `is_image_file`)."""

_DICM_OFFSET = 128  # DICOM Part 10: 128-byte preamble, then b"DICM"

cv2.setNumThreads(0)  # the DataLoader parallelises; OpenCV's own pool only oversubscribes 2 cores
try:  # a truncated file is reported by our DataError; OpenCV's own "[ WARN ] …" line is noise
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
except AttributeError:
    pass


WINDOW_PERCENTILES = (0.5, 99.5)
"""Default `data.window_percentiles`: the low and high percentile of a high-bit-depth image's values that become
0 and 255 (values outside are clipped), so a few hot or dead pixels do not squeeze the anatomy into a few grey
levels as a min–max rescale would."""

_window = WINDOW_PERCENTILES  # this process's rule; set from the run's config by set_window_percentiles


def check_window(window, key: str = "data.window_percentiles") -> tuple[float, float]:
    """(low, high) as floats, or ConfigError unless 0 ≤ low < high ≤ 100."""
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={window!r}: give two percentiles [low, high], e.g. [0.5, 99.5]") from None
    if not 0 <= lo < hi <= 100:
        raise ConfigError(f"{key}=[{lo:g}, {hi:g}]: need 0 ≤ low < high ≤ 100, e.g. [0.5, 99.5]")
    return lo, hi


def set_window_percentiles(window) -> tuple[float, float]:
    """Make `window` (data.window_percentiles of the run's config) the rule of every later `read_grayscale` call in
    this process that does not pass its own; called where a config's data section takes effect (resolving a
    manifest, loading a run's models), so training and prediction of one run decode alike."""
    global _window
    _window = check_window(window)
    return _window


def read_grayscale(path: str | Path, window: tuple[float, float] | None = None) -> np.ndarray:
    """Decode an image file to a (H, W) uint8 array by these rules (each conversion but the first two is noted once
    per process on stderr):

    - 8-bit grayscale: as stored. 8-bit colour (RGB/BGR): luminance 0.299 R + 0.587 G + 0.114 B (OpenCV).
    - palette ('P'): expanded through its palette to RGB (RGBA when an entry is transparent), then as those.
    - alpha ('RGBA', 'LA', 'PA', transparent palette entries): composited on black — transparent = black, as a
      viewer over a dark background shows it — then luminance.
    - CMYK (JPEG, TIFF): converted to RGB by Pillow (R = (255 − C)(255 − K)/255, likewise G from M and B from Y;
      Adobe's inverted JPEGs included), then luminance.
    - more than 8 bits ('I;16' PNG/TIFF, 16-bit colour, 32-bit integer 'I', float 'F' TIFF): luminance first for
      colour, then windowed: the `window` percentiles (low, high) of the finite values map to 0 and 255, linearly,
      clipped outside (`numpy.percentile`, linear interpolation); default `data.window_percentiles` = (0.5, 99.5).
      A flat image (low = high) becomes 0; NaN becomes 0.
    - DICOM: the standard's grayscale pipeline (module docstring). TIFF: its first page.

    Raises DataError naming the path for a missing, empty, truncated or otherwise undecodable file, an image under
    MIN_SIDE pixels on a side, and a DICOM that cannot be shown as one grayscale image (multi-frame, no pixel data,
    missing decoder or pydicom).
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e.strerror}); check the path, or leave the file out") from None
    if data.size == 0:
        raise DataError(f"{path}: image file is empty (0 bytes); re-export it, or leave it out")
    suffix = path.suffix.lower()
    if suffix == DICOM_SUFFIX or (suffix not in RASTER_SUFFIXES and has_dicm_marker(data[:_DICM_OFFSET + 4].tobytes())):
        return check_size(path, _read_dicom(path, data))
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or not _complete(path, data):
        raise DataError(f"{path}: image is corrupt or truncated and cannot be decoded; re-export it, or leave it out")
    if img.ndim == 2 and img.dtype == np.uint8:  # 8-bit grayscale, the common case: nothing to convert
        return check_size(path, img)
    mode = _pil_mode(path)
    if mode == "CMYK":  # OpenCV's CMYK handling differs between JPEG (BGR) and TIFF (BGR + an opaque 4th channel)
        _note_once("cmyk", f"{path}: CMYK image converted to RGB, then to luminance; further CMYK images alike")
        img = _cmyk_as_bgr(path, data)
    elif mode in ("P", "PA"):
        _note_once("palette", f"{path}: palette image expanded through its palette, then to luminance; further "
                              "palette images alike")
    if img.ndim == 3 and img.shape[2] == 4:  # alpha (RGBA, LA, PA, a transparent palette entry): composite on black
        _warn_once("rgba", f"{path}: has an alpha channel; composited on black (transparent = black). "
                           "Further RGBA images are treated alike without this note")
        top = np.iinfo(img.dtype).max if img.dtype.kind in "ui" else 1.0
        alpha = np.clip(img[..., 3:].astype(np.float32) / np.float32(top), 0, 1)
        composited = img[..., :3].astype(np.float32) * alpha
        img = composited.round().astype(img.dtype) if img.dtype.kind in "ui" else composited.astype(img.dtype)
    if img.ndim == 3 and img.dtype == np.uint8:  # 8-bit colour or expanded palette → luminance
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    elif img.ndim == 3:  # high bit depth colour: luminance in float, before windowing
        img = img[..., :3].astype(np.float64) @ np.array([0.114, 0.587, 0.299])  # BGR weights
    if img.dtype != np.uint8:
        lo, hi = _window if window is None else check_window(window)
        depth = _bit_depth(mode)
        _note_once(f"window {depth}", f"{depth} images are windowed to uint8 by percentiles {lo:g}–{hi:g} "
                                      "(data.window_percentiles)")
        img = window_to_uint8(img, (lo, hi))
    return check_size(path, img)


def window_to_uint8(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """(H, W) values → uint8: the (low, high) percentiles of the finite values → 0 and 255, linear, clipped."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=np.uint8)
    lo, hi = np.percentile(values[finite] if not finite.all() else values, window)
    return _to_uint8(np.where(finite, values, lo), float(lo), float(hi))


def _bit_depth(mode: str | None) -> str:
    """How a high-bit-depth source is named in the one-time note: '16-bit', '32-bit integer' or 'float'."""
    return {"F": "float", "I": "32-bit integer"}.get(mode or "", "16-bit")


def _pil_mode(path: Path) -> str | None:
    """Pillow's mode of the file ('P', 'CMYK', 'I;16', …) read from its header only; None when Pillow cannot tell."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # a large radiograph is no decompression bomb: only the header is read
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.mode
    except Exception:  # noqa: BLE001 - OpenCV decoded it; Pillow's opinion is only a hint
        return None


def _cmyk_as_bgr(path: Path, data: np.ndarray) -> np.ndarray:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data.tobytes())) as im:
                rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: CMYK image cannot be converted to RGB ({_first_line(e)}); re-export it as RGB "
                        f"or grayscale") from None
    return np.ascontiguousarray(rgb[..., ::-1])


MIN_SIDE = 16
"""Smallest image side accepted, in pixels: below it a radiograph holds no readable detail (a thumbnail or an icon,
not a study image); the input is refused rather than silently upscaled."""

_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()  # ImageCache decodes in threads


def _warn_once(kind: str, message: str) -> None:
    """One line on stderr the first time a kind of image conversion happens in this process."""
    _note_once(kind, message, prefix="warning")


def _note_once(kind: str, message: str, prefix: str = "note") -> None:
    """`<prefix>: <message>` on stderr the first time `kind` happens in this process."""
    with _WARNED_LOCK:
        if kind in _WARNED:
            return
        _WARNED.add(kind)
    print(f"{prefix}: {message}", file=sys.stderr)


def check_size(path: Path, img: np.ndarray) -> np.ndarray:
    """`img`, or a DataError when a side is under MIN_SIDE pixels."""
    if min(img.shape[:2]) < MIN_SIDE:
        raise DataError(f"{path}: image is {img.shape[1]}×{img.shape[0]} px, smaller than {MIN_SIDE} px on a side, "
                        "too small to read as a radiograph; use the full-size image, or leave it out")
    return img


def is_image_file(path: str | Path) -> bool:
    """True for a .png/.jpg/.jpeg/.dcm name (any case), or an extension-less file (no suffix, or a numeric one as in
    UID-named exports `1.2.840.113619.2.1`) that starts with the DICOM preamble and `DICM` marker."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix and not (suffix[1:].isascii() and suffix[1:].isdigit()):
        return False
    return is_dicom_file(path)


def is_dicom_file(path: str | Path) -> bool:
    """True if the file starts with the 128-byte DICOM preamble followed by `DICM` (unreadable: False)."""
    try:
        with open(path, "rb") as f:
            return has_dicm_marker(f.read(_DICM_OFFSET + 4))
    except OSError:
        return False


def strip_image_suffix(path: str) -> str:
    """`path` without its image suffix (`a/b.png` → `a/b`); an extension-less DICOM name is kept whole."""
    stem, suffix = path.rsplit(".", 1) if "." in path.rsplit("/", 1)[-1] else (path, "")
    return stem if f".{suffix.lower()}" in IMAGE_SUFFIXES else path


def has_dicm_marker(head: bytes) -> bool:
    """True if `head` (a file's first bytes) holds the DICOM Part 10 preamble followed by `DICM`."""
    return len(head) >= _DICM_OFFSET + 4 and head[_DICM_OFFSET:_DICM_OFFSET + 4] == b"DICM"


# ---------------------------------------------------------------------------------------------------- DICOM

# Transfer syntax UID → what to install when no decoder for it is present (python-gdcm decodes all of them).
_LIBJPEG = "pip install pylibjpeg pylibjpeg-libjpeg"
_OPENJPEG = "pip install pylibjpeg pylibjpeg-openjpeg"
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG, "1.2.840.10008.1.2.4.51": _LIBJPEG,  # JPEG baseline / extended
    "1.2.840.10008.1.2.4.57": _LIBJPEG, "1.2.840.10008.1.2.4.70": _LIBJPEG,  # JPEG lossless
    "1.2.840.10008.1.2.4.80": _LIBJPEG, "1.2.840.10008.1.2.4.81": _LIBJPEG,  # JPEG-LS
    "1.2.840.10008.1.2.4.90": _OPENJPEG, "1.2.840.10008.1.2.4.91": _OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _OPENJPEG, "1.2.840.10008.1.2.4.202": _OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.4.203": _OPENJPEG,
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",  # RLE lossless
}


def _read_dicom(path: Path, data: np.ndarray) -> np.ndarray:
    pydicom = optional("pydicom", "dicom", "reading DICOM", log=False)
    if pydicom is None:
        raise DataError(f"{path}: is a DICOM file and pydicom is not installed; "
                        f"pip install 'kd_fracture[dicom]' to read it")
    marker = has_dicm_marker(data[:_DICM_OFFSET + 4].tobytes())
    try:  # a .dcm without the preamble (old ACR-NEMA style) is read by force
        ds = pydicom.dcmread(io.BytesIO(data.tobytes()), force=not marker)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for a damaged file
        raise DataError(f"{path}: DICOM is corrupt or truncated and cannot be read ({_first_line(e)}); "
                        f"re-export it, or leave it out") from None
    if "PixelData" not in ds:
        what = "DICOM holds no pixel data" if marker else "not a DICOM image (no DICM marker, no pixel data)"
        raise DataError(f"{path}: {what} (a report or other non-image object); leave it out")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise DataError(f"{path}: multi-frame DICOM ({frames} frames) is not supported; export the view as a "
                        f"single-frame DICOM, PNG or JPEG")
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    monochrome = photometric in ("MONOCHROME1", "MONOCHROME2")
    colour = ("RGB", "YBR_FULL", "YBR_FULL_422") if _pydicom_major(pydicom) >= 3 else ("RGB",)
    if not monochrome and photometric not in colour:
        raise DataError(f"{path}: DICOM photometric interpretation '{photometric or 'missing'}' is not supported "
                        f"(readable: MONOCHROME1, MONOCHROME2, {', '.join(colour)}); re-export as MONOCHROME2")

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and _is_compressed(ts) and not _decoder_available(pydicom, ts):
        name = getattr(ts, "name", str(ts))
        hint = _DECODER_HINTS.get(str(ts))
        install = f"{hint} (or pip install python-gdcm)" if hint else "pip install python-gdcm"
        raise DataError(f"{path}: DICOM pixel data is compressed ({name}) and no installed decoder reads it; "
                        f"{install}")
    try:
        arr = ds.pixel_array  # pydicom >= 3 converts YBR colour to RGB here
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: DICOM pixel data cannot be decoded ({_first_line(e)}); "
                        f"re-export it, or leave it out") from None
    if arr.ndim != (2 if monochrome else 3) or min(arr.shape[:2]) == 0:
        raise DataError(f"{path}: DICOM pixel array has shape {arr.shape}, not one {photometric} image; "
                        f"re-export it as a single-frame image")
    if not monochrome:  # colour secondary capture: luminance, as for a colour PNG
        if arr.dtype != np.uint8:
            arr = _to_uint8(arr.astype(np.float64), float(arr.min()), float(arr.max()))
        return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY)

    apply_modality_lut, apply_voi_lut = _lut_functions()
    try:
        values = apply_modality_lut(arr, ds)
        kind = _voi_kind(ds)
        if kind is None:  # no VOI transform: the modality values' own range
            lo, hi = float(np.min(values)), float(np.max(values))
            windowed = values
        else:
            if kind == "lut" and values.dtype.kind == "f" and np.array_equal(values, np.round(values)):
                values = values.astype(np.int64)  # a VOI LUT indexes by integer value
            windowed = apply_voi_lut(values, ds, index=0)
            lo, hi = _voi_output_range(apply_voi_lut, ds, kind)
    except Exception as e:  # noqa: BLE001 - malformed LUT descriptors, window width < 1, …
        raise DataError(f"{path}: DICOM Modality/VOI LUT cannot be applied ({_first_line(e)}); "
                        f"fix the header or re-export the image") from None
    img = _to_uint8(np.asarray(windowed, dtype=np.float64), lo, hi)
    if photometric == "MONOCHROME1":  # minimum value is white: invert after windowing, as a display does
        img = 255 - img
    return img


def _to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """[lo, hi] → [0, 255] (lo > hi flips), rounded and clipped; a flat range gives zeros."""
    if hi == lo or not np.isfinite(hi - lo):
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _voi_kind(ds) -> str | None:
    """Which VOI transform `apply_voi_lut(prefer_lut=True)` applies: "lut", "window" or None (pydicom's rule)."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return None


def _voi_output_range(apply_voi_lut, ds, kind: str) -> tuple[float, float]:
    """(output for the lowest input, output for the highest): the VOI output range in display order.

    A window maps [center − width/2, center + width/2] (PS3.3 C.11.2.1.2) onto an output range that pydicom derives
    from BitsStored, PixelRepresentation and the rescale; probing far below and above the window reads it back
    exactly for LINEAR, LINEAR_EXACT and SIGMOID. A VOI LUT's range runs from its first entry to its last.
    """
    if kind == "lut":
        descriptor = ds.VOILUTSequence[0].LUTDescriptor
        entries, first = int(descriptor[0]) or 2 ** 16, int(descriptor[1])
        probe = np.array([first, first + entries - 1], dtype=np.int64)
    else:
        probe = np.array([-1e300, 1e300], dtype=np.float64)
    with np.errstate(all="ignore"):
        out = np.asarray(apply_voi_lut(probe, ds, index=0), dtype=np.float64)
    return float(out[0]), float(out[1])


def _lut_functions():
    try:  # pydicom >= 3
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _pydicom_major(pydicom) -> int:
    try:
        return int(str(pydicom.__version__).split(".")[0])
    except ValueError:
        return 0


def _is_compressed(ts) -> bool:
    try:
        return bool(ts.is_compressed)
    except (ValueError, AttributeError):  # a private / unknown transfer syntax
        return True


def _decoder_available(pydicom, ts) -> bool:
    try:
        from pydicom.pixels import get_decoder  # pydicom >= 3
    except ImportError:  # pydicom 2.x: pixel data handler modules
        return any(h.supports_transfer_syntax(ts) and h.is_available() for h in pydicom.config.pixel_data_handlers)
    try:
        return bool(get_decoder(ts).is_available)
    except (NotImplementedError, ValueError):
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _complete(path: Path, data: np.ndarray) -> bool:
    """OpenCV decodes some truncated files with a grey tail instead of failing; check the end markers."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        return data.size >= 12 and bytes(data[-12:-4].tobytes()).endswith(b"IEND")
    if suffix in (".jpg", ".jpeg"):
        tail = bytes(data[-64:].tobytes()).rstrip(b"\x00\n\r ")
        return tail.endswith(b"\xff\xd9")
    return True
