"""Image decoding shared by the dataset, `--verify-images`, predict and explain."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from kd_fracture.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

cv2.setNumThreads(0)  # the DataLoader parallelises; OpenCV's own pool only oversubscribes 2 cores
try:  # a truncated file is reported by our DataError; OpenCV's own "[ WARN ] …" line is noise
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
except AttributeError:
    pass


def read_grayscale(path: str | Path) -> np.ndarray:
    """Decode an image file to a (H, W) uint8 array; colour images are converted to luminance.

    Raises DataError naming the path for a missing, empty, truncated or otherwise undecodable file.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e.strerror}); check the path or remove the row") from None
    if data.size == 0:
        raise DataError(f"{path}: image file is empty (0 bytes); re-export it or remove its row")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or not _complete(path, data):
        raise DataError(f"{path}: image is corrupt or truncated and cannot be decoded; re-export it or remove its row")
    if img.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if img.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        img = cv2.cvtColor(img, code)
    if img.dtype != np.uint8:  # 16-bit PNG radiographs: rescale to 8 bits
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return img


def _complete(path: Path, data: np.ndarray) -> bool:
    """OpenCV decodes some truncated files with a grey tail instead of failing; check the end markers."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        return data.size >= 12 and bytes(data[-12:-4].tobytes()).endswith(b"IEND")
    if suffix in (".jpg", ".jpeg"):
        tail = bytes(data[-64:].tobytes()).rstrip(b"\x00\n\r ")
        return tail.endswith(b"\xff\xd9")
    return True
