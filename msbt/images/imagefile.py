"""Reading image files the way users have them, with a clear reason when one cannot be used.

Every image leaves here as uint8 RGB (H, W, 3). DICOM files (found by their magic, whatever their name)
are read through msbt.images.dicom; a multi-frame file holds one image per frame, referred to as
`file#frame=NNNN` (`image_refs`). The conversions are explicit because real collections mix
them: the paper's Mendeley set is 8-bit grayscale BMP, BUSI is RGB PNG, scanners export 16-bit PNG/TIFF
and some tools add an alpha channel. No Ray, no TensorFlow.
"""

from __future__ import annotations

import functools
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from msbt.images import dicom

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
# The container format each extension promises (Pillow's format names).
_FORMAT_OF = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
# Decompression-bomb guard (`data.max_pixels`): 64 MP is 8000 x 8000, far above any ultrasound image or
# microscope field of the paper, and 192 MB as uint8 RGB. A 30000 x 30000 PNG of under 1 MB would
# otherwise take 3.6 GB to decode. OpenCV's own limit (CV_IO_MAX_IMAGE_PIXELS, 2**30) is an assertion.
DEFAULT_MAX_PIXELS = 64_000_000
PARTIAL_POLICIES = ("reject", "warn")
# A 16-bit file whose brightest sample is below this uses at most 14 of its 16 bits: 12- and 14-bit cameras store
# their data so. `data.sixteen_bit: scale` maps 0..65535 onto 0..255, so such a file becomes at most 64 of 255
# (12-bit: 16 of 255), nearly black; the scan counts these files and names `minmax` (msbt.data.discovery).
DIM_SIXTEEN_BIT = 1 << 14



class ImageError(ValueError):
    """A file that cannot be used as an image; `reason` is one short phrase for the rejects manifest."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def read_image(path: str | Path, sixteen_bit: Literal["scale", "minmax"] = "scale", *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, on_partial: str = "reject",
               warnings: list[str] | None = None) -> np.ndarray:
    """Read one image file as uint8 RGB.

    Args:
        path: the file (or a DICOM frame reference, see `image_refs`).
        sixteen_bit: how 16-bit images become 8-bit: "scale" maps the full 0..65535 range linearly
            (keeps intensities comparable across images), "minmax" stretches each image's own range
            (for 12-bit data stored in 16-bit containers, which "scale" would leave nearly black).
        max_pixels: refuse images with more pixels than this, read from the header before decoding.
        on_partial: a file of which only part would be used (a multi-page TIFF, an animated GIF, a JPEG
            cut short with its end marker put back, a format its extension does not name): "reject" it,
            or "warn" (use it and append the reason to `warnings`).
        warnings: receives the reasons of "warn".

    Returns:
        (H, W, 3) uint8 array in RGB order.

    Raises:
        ImageError: empty, truncated, undecodable, wrong extension or degenerate file.
    """
    file, frame = dicom.split_ref(path)
    if frame is not None or dicom.is_dicom(file):
        return read_dicom_image(file, frame, sixteen_bit, max_pixels=max_pixels)
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImageError(path, f"not an image file (extension '{path.suffix or 'none'}')")
    data = read_file_bytes(path)
    return decode_image(data, path, sixteen_bit, max_pixels=max_pixels, on_partial=on_partial, warnings=warnings)


def read_file_bytes(path: str | Path) -> bytes:
    """The bytes of a regular file; anything else (FIFO, device, socket, folder, symlink loop) is refused
    with the reason, without ever blocking: the file is opened non-blocking and checked with fstat
    before a byte is read (a FIFO named x.png would otherwise hang the scan).

    Raises:
        ImageError: not a regular file, or unreadable (the OS's reason).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ImageError(path, f"unreadable ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(path, f"not a regular file ({_file_kind(mode)})")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    except OSError as exc:
        raise ImageError(path, f"unreadable ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"


def read_dicom_image(path: str | Path, frame: int | None, sixteen_bit: str = "scale", *,
                     max_pixels: int | None = DEFAULT_MAX_PIXELS, header: dicom.DicomHeader | None = None) -> np.ndarray:
    """One frame of a DICOM file (msbt.images.dicom) as uint8 RGB, checked like any other image.

    Args:
        path: the DICOM file.
        frame: 0-based frame index; None for a single-frame file (a multi-frame file needs one:
            see `image_refs`).
        sixteen_bit, max_pixels: as for `read_image` (the limit is per frame).
        header: the file's header when the caller has read it already (not read again).
    """
    try:
        header = header or dicom.read_header(path)
        if frame is None:
            if header.frames > 1:
                raise ImageError(path, f"multi-frame DICOM ({header.frames} frames): name one frame")
            frame = 0
        rgb = dicom.read_dicom_frame(path, frame, sixteen_bit, header=header, max_pixels=max_pixels)
    except dicom.DicomError as exc:
        raise ImageError(exc.path, exc.reason) from None
    # Through the same checks as every image (size, blank); RGB -> the BGR order to_rgb8 expects.
    return to_rgb8(rgb[:, :, ::-1], path, sixteen_bit)


def image_refs(path: str | Path) -> list[str]:
    """The images a file holds: one reference per frame of a multi-frame DICOM, else the path itself.

    Never raises: a file whose header cannot be read is returned as it is, and reading it says why.
    """
    if dicom.is_dicom(path):
        try:
            frames = dicom.read_header(path).frames
        except dicom.DicomError:
            return [str(path)]
        if frames > 1:
            return [dicom.frame_ref(path, i) for i in range(frames)]
    return [str(path)]


def decode_image(data: bytes, path: str | Path, sixteen_bit: Literal["scale", "minmax"] = "scale", *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, on_partial: str = "reject",
                 warnings: list[str] | None = None, facts: dict | None = None) -> np.ndarray:
    """Decode encoded image bytes (as read from `path`, used in messages) to uint8 RGB.

    The header is read first (`check_header`): size limit, format against extension, pages; then OpenCV
    decodes. Arguments after `sixteen_bit` as for `read_image`; ``facts``, when given, receives what the
    decode saw that the 8-bit result no longer shows: ``sixteen_bit_peak``, the brightest sample of a 16-bit
    file (`sixteen_bit_peak`), for the scan's warning about 12- and 14-bit data.
    """
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    truncated = _truncation(data)
    if truncated:
        raise ImageError(path, truncated)
    notes = check_header(data, path, max_pixels=max_pixels)
    _quiet_opencv()
    try:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # OpenCV asserts on sizes past its own limit instead of returning None
        array = None
    if array is None:
        raise ImageError(path, "cannot be decoded as an image (corrupt or unsupported format)")
    grey = _grey_tail(array, data)
    if grey:
        notes.append(grey)
    _apply_partial_policy(notes, path, on_partial, warnings)
    if facts is not None and (peak := sixteen_bit_peak(array)) is not None:
        facts["sixteen_bit_peak"] = peak
    return to_rgb8(array, path, sixteen_bit)


def sixteen_bit_peak(array: np.ndarray) -> int | None:
    """The brightest sample of a decoded 16-bit array (colour channels only, not alpha); None for other depths.

    Below `DIM_SIXTEEN_BIT` the file holds 12- or 14-bit data that ``sixteen_bit: scale`` leaves nearly black."""
    if array.dtype != np.uint16:
        return None
    colour = array[..., :3] if array.ndim == 3 else array
    return int(colour.max())


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding its pixels."""

    format: str  # Pillow's name: PNG, JPEG, BMP, TIFF, GIF, ...
    width: int
    height: int
    frames: int  # pages of a TIFF, frames of a GIF/APNG; 1 for a still


def read_image_header(data: bytes, path: str | Path) -> ImageHeader:
    """The format, size and page count of encoded image bytes, from the header only (Pillow).

    Raises:
        ImageError: the header is not one of an image format.
    """
    from PIL import Image, UnidentifiedImageError

    _pillow_headers_only()
    try:
        with Image.open(io.BytesIO(data)) as image:
            frames = int(getattr(image, "n_frames", 1) or 1)
            return ImageHeader(str(image.format), int(image.width), int(image.height), frames)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise ImageError(path, "cannot be decoded as an image (unrecognised or corrupt header)") from None


def check_header(data: bytes, path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[str]:
    """Refuse an image over the pixel limit before decoding it; name what would make it partial.

    Returns:
        Reasons the file would be used only in part (extra pages or frames, a format its extension
        does not name); the caller applies the `on_partial` policy.

    Raises:
        ImageError: over `max_pixels`, or an unreadable header.
    """
    header = read_image_header(data, path)
    pixels = header.width * header.height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageError(path, f"image too large ({header.width}x{header.height} = {pixels} px; "
                               f"limit data.max_pixels = {max_pixels})")
    notes = []
    promised = _FORMAT_OF.get(Path(path).suffix.lower())
    if promised and header.format != promised:
        notes.append(f"a {header.format} file named '{Path(path).suffix}'")
    if header.frames > 1:
        notes.append(f"{header.format} with {header.frames} pages/frames: only the first would be used")
    return notes


def _grey_tail(array: np.ndarray, data: bytes) -> str | None:
    """A JPEG whose data end early but whose end marker is in place decodes with its last rows filled
    with grey 128 (libjpeg's fill); a whole MCU row (8 px) of exact 128 at the bottom names it."""
    if not data.startswith(b"\xff\xd8") or array.dtype != np.uint8:
        return None
    rows = 0
    for row in array[::-1]:
        if not (row == 128).all():
            break
        rows += 1
    if rows >= 8 and rows < array.shape[0]:
        return f"truncated JPEG (its last {rows} rows are filled grey: the data end before the end marker)"
    return None


def _apply_partial_policy(notes: list[str], path: str | Path, on_partial: str, warnings: list[str] | None) -> None:
    if on_partial not in PARTIAL_POLICIES:
        raise ValueError(f"on_partial must be one of {PARTIAL_POLICIES}, got {on_partial!r}")
    if not notes:
        return
    if on_partial == "reject":
        raise ImageError(path, "; ".join(notes) + " (data.on_partial: reject)")
    if warnings is not None:
        warnings.extend(notes)


@functools.cache
def _pillow_headers_only() -> None:
    # Pillow refuses to open (even to read the header of) images over 2 x 89 MP; msbt's own, configurable
    # limit (`max_pixels`) replaces that guard, and Pillow never decodes pixels here (OpenCV does).
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None


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
    which evens out gain differences between machines; "clahe" equalises contrast locally (OpenCV's
    contrast-limited adaptive histogram equalisation on the lightness channel, clip limit 2, tiles of
    1/8 of each side), which also evens out depth-dependent gain (time-gain compensation) that differs
    between scanners and operators; "equalize" equalises the whole image's histogram (OpenCV's
    ``equalizeHist`` on the lightness channel): every image's grey levels then spread evenly over 0..255,
    whatever the scanner's gain and dynamic range, one global mapping per image (no local contrast change)."""
    if mode == "none":
        return rgb
    if mode in ("clahe", "equalize"):
        if mode == "clahe":
            equalise = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply
        else:
            equalise = cv2.equalizeHist
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return np.repeat(equalise(np.ascontiguousarray(rgb[..., 0]))[..., None], 3, axis=2)
        lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB)  # colour overlays keep their hue
        lab[..., 0] = equalise(np.ascontiguousarray(lab[..., 0]))
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    if mode != "minmax":
        raise ValueError(f"intensity must be 'none', 'minmax', 'clahe' or 'equalize', got {mode!r}")
    lo, hi = np.percentile(rgb, (1, 99))
    if hi <= lo:
        return rgb
    scaled = (rgb.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
