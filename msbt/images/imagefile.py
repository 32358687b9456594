"""Reading image files the way users have them, with a clear reason when one cannot be used.

Every image leaves here as uint8 RGB (H, W, 3). The conversions are explicit because real collections mix
them: the paper's Mendeley set is 8-bit grayscale BMP, BUSI is RGB PNG, scanners export 16-bit PNG/TIFF
and some tools add an alpha channel. No Ray, no TensorFlow.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})



class ImageError(ValueError):
    """A file that cannot be used as an image; `reason` is one short phrase for the rejects manifest."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def read_image(path: str | Path, sixteen_bit: Literal["scale", "minmax"] = "scale") -> np.ndarray:
    """Read one image file as uint8 RGB.

    Args:
        path: the file.
        sixteen_bit: how 16-bit images become 8-bit: "scale" maps the full 0..65535 range linearly
            (keeps intensities comparable across images), "minmax" stretches each image's own range
            (for 12-bit data stored in 16-bit containers, which "scale" would leave nearly black).

    Returns:
        (H, W, 3) uint8 array in RGB order.

    Raises:
        ImageError: empty, truncated, undecodable, wrong extension or degenerate file.
    """
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImageError(path, f"not an image file (extension '{path.suffix}')")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(path, f"unreadable ({exc.strerror or exc})") from None
    return decode_image(data, path, sixteen_bit)


def decode_image(data: bytes, path: str | Path, sixteen_bit: Literal["scale", "minmax"] = "scale") -> np.ndarray:
    """Decode encoded image bytes (as read from `path`, used in messages) to uint8 RGB."""
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    truncated = _truncation(data)
    if truncated:
        raise ImageError(path, truncated)
    _quiet_opencv()
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ImageError(path, "cannot be decoded as an image (corrupt or unsupported format)")
    return to_rgb8(array, path, sixteen_bit)


@functools.cache
def _quiet_opencv() -> None:
    # OpenCV logs a line to stderr for every file it cannot decode; we report those files ourselves.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def _truncation(data: bytes) -> str | None:
    """Name a truncation that the file's own structure reveals, for the formats that make it cheap."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        # The last chunk of every PNG is IEND followed by its 4-byte CRC.
        if b"IEND" not in data[-12:]:
            return "truncated PNG (no IEND chunk at the end)"
    elif data.startswith(b"\xff\xd8"):
        # JPEG ends with the EOI marker; some writers pad after it, so look near the end.
        if b"\xff\xd9" not in data[-64:]:
            return "truncated JPEG (no end-of-image marker)"
    elif data.startswith(b"BM") and len(data) >= 34:
        # The header's file-size field is wrong in real files (the paper's Mendeley set declares
        # 35672 bytes for 8282-byte files), so compute the size the pixel rows need instead.
        offset = int.from_bytes(data[10:14], "little")
        width = int.from_bytes(data[18:22], "little", signed=True)
        height = int.from_bytes(data[22:26], "little", signed=True)
        bits = int.from_bytes(data[28:30], "little")
        compression = int.from_bytes(data[30:34], "little")
        if compression == 0 and width > 0 and bits:
            needed = offset + (width * bits + 31) // 32 * 4 * abs(height)
            if len(data) < needed:
                return f"truncated BMP ({len(data)} of {needed} bytes)"
    return None


def to_rgb8(array: np.ndarray, path: str | Path = "<array>", sixteen_bit: str = "scale") -> np.ndarray:
    """Normalise a decoded OpenCV array (gray, BGR, BGRA; 8/16-bit or float) to uint8 RGB."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(path, f"unsupported image shape {array.shape}")
    if min(array.shape[:2]) < 8:
        raise ImageError(path, f"image too small ({array.shape[1]}x{array.shape[0]} px)")
    array = _to_uint8(array, path, sixteen_bit)
    if array.ndim == 2:
        rgb = cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    else:
        if array.shape[2] == 4:
            # Composite over black: transparent pixels carry no acoustic or optical signal.
            alpha = array[:, :, 3:4].astype(np.float32) / 255.0
            array = (array[:, :, :3].astype(np.float32) * alpha + 0.5).astype(np.uint8)
        rgb = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    if rgb.min() == rgb.max():
        # A constant image is an export failure or a placeholder, never a usable example.
        raise ImageError(path, f"blank image (every pixel is {int(rgb.flat[0])})")
    return rgb


def _to_uint8(array: np.ndarray, path: str | Path, sixteen_bit: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        if sixteen_bit == "minmax":
            return _stretch(array)
        # 65535 / 257 = 255 exactly, so the mapping is linear and hits both ends.
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError(path, "floating-point image contains NaN or infinity")
        if array.min() >= 0.0 and array.max() <= 1.0:
            return (array * 255.0 + 0.5).astype(np.uint8)
        return _stretch(array)
    raise ImageError(path, f"unsupported pixel type {array.dtype}")


def _stretch(array: np.ndarray) -> np.ndarray:
    lo, hi = float(array.min()), float(array.max())
    if hi <= lo:
        return np.zeros(array.shape, np.uint8)
    return ((array.astype(np.float64) - lo) * (255.0 / (hi - lo)) + 0.5).astype(np.uint8)


def fit_square(rgb: np.ndarray, size: int, aspect: str = "pad") -> np.ndarray:
    """Resize an image to (size, size) with an explicit aspect policy.

    Args:
        rgb: (H, W, 3) uint8.
        size: output side in pixels.
        aspect: "pad" keeps the aspect ratio and pads the short side with black (a lesion's
            taller-than-wide shape is a malignancy sign, so it must not be distorted by default);
            "stretch" resizes each axis independently; "crop" keeps the aspect ratio and centre-crops
            the long side.

    Returns:
        (size, size, 3) uint8.
    """
    h, w = rgb.shape[:2]
    if aspect == "stretch":
        return _resize(rgb, size, size)
    if aspect == "crop":
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        return _resize(rgb[y0 : y0 + side, x0 : x0 + side], size, size)
    if aspect != "pad":
        raise ValueError(f"aspect must be 'pad', 'stretch' or 'crop', got {aspect!r}")
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((size, size, 3), np.uint8)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = _resize(rgb, nh, nw)
    return out


def _resize(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    # INTER_AREA when shrinking avoids aliasing speckle into false texture; cubic when enlarging.
    shrink = h * w < rgb.shape[0] * rgb.shape[1]
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def normalize_intensity(rgb: np.ndarray, mode: str = "none") -> np.ndarray:
    """"none" keeps the scanner's grey levels; "minmax" stretches the 1st-99th percentile to 0..255,
    which evens out gain differences between machines."""
    if mode == "none":
        return rgb
    if mode != "minmax":
        raise ValueError(f"intensity must be 'none' or 'minmax', got {mode!r}")
    lo, hi = np.percentile(rgb, (1, 99))
    if hi <= lo:
        return rgb
    scaled = (rgb.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
