"""Reading DICOM images and cine loops as uint8 RGB frames, without touching who the patient is.

Ultrasound usually leaves the scanner as DICOM: one still (one frame) or a cine loop (many frames of one
lesion). pydicom reads the file; this module turns its pixels into the same uint8 RGB arrays as every
other image (msbt.images.imagefile) and says why when it cannot.

Patient data: only the image pixel module (group 0x0028: rows, columns, bits, photometric
interpretation, frames, palette) and the transfer syntax are ever read into memory. The header is read
with ``specific_tags`` (stopping before the pixel data, which is located, not read) and pixels through
``pydicom.pixels.pixel_array(path, ds_out=...)``, which copies only group 0x0028 and the file meta, so
PatientName, PatientID, dates, institution and every other identifying element are skipped by the parser
and cannot reach a message, a log line or a result. A frame is referred to by the file's path and its index
(``frame_ref``). pydicom's own warnings (which may quote element values) are silenced while a file is read.
Text burned into the pixels by the scanner is not detected or removed (docs/data.md).

No Ray, no TensorFlow.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom", ".dic"})
# The frame suffix of a reference to one frame of a multi-frame file: "cine.dcm#frame=0003".
_FRAME_SUFFIX = re.compile(r"^(?P<file>.+)#frame=(?P<index>\d+)$")

# The image pixel module and what decoding needs; nothing else is read from a file's data set.
_HEADER_TAGS = [
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames",
]
# Pixel Data, Float Pixel Data, Double Float Pixel Data: the elements pydicom decodes pixels from.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


class DicomError(ValueError):
    """A DICOM file that cannot be used; ``reason`` is one short phrase, never an element's value."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class DicomHeader:
    """What a DICOM file's image pixel module says about its pixels (no patient data)."""

    rows: int
    columns: int
    frames: int
    samples: int
    photometric: str
    bits_stored: int
    signed: bool
    transfer_syntax: str


def is_dicom(path: str | Path) -> bool:
    """True for a DICOM file: a Part 10 file (the ``DICM`` magic after the 128-byte preamble), whatever its
    name, or a bare data set (no preamble, no magic) named as DICOM that pydicom reads as an image.

    Files from PACS exports often have no extension (or a number as one), so for Part 10 files the bytes
    decide, not the name. Older and hand-made exports write the data set alone; such a file has no magic,
    and pydicom reads almost anything with ``force=True``, so it counts only with a DICOM extension and
    when it parses to rows, columns and a pixel data element (a text file named ``x.dcm`` does not).
    A FIFO, device or unreadable file is not DICOM (nothing is opened that could block).
    """
    import os
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    return Path(path).suffix.lower() in DICOM_EXTENSIONS and _is_bare_image(path)


def _is_bare_image(path: str | Path) -> bool:
    """True when pydicom, forced, reads a data set with rows, columns and pixel data from ``path``.

    Only a file whose first element could open a data set is parsed: forced, pydicom walks a file of zeros as
    millions of empty elements (8 s for 20 MB, an interrupted copy), and anything else is not a bare data set.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    if not opens_data_set(head):
        return False
    _quiet()
    try:
        ds, pixels = _read_module(path, force=True)
    except Exception:  # pydicom raises many types for what is not DICOM
        return False
    return pixels is not None and "Rows" in ds and "Columns" in ds


def opens_data_set(head: bytes) -> bool:
    """Whether bytes could begin a bare DICOM data set (no preamble, no magic): its first element's group is one
    a data set opens with, 0x0002 (file meta) or 0x0008 (identification) up to 0x0028 (the image pixel module), in
    either byte order. No image format's signature does (PNG, JPEG, BMP, TIFF, GIF, WebP)."""
    return len(head) >= 4 and any(0x0002 <= int.from_bytes(head[:2], order) <= 0x0028 for order in ("little", "big"))


def frame_ref(path: str | Path, index: int) -> str:
    """The reference of frame ``index`` (0-based) of a multi-frame file, e.g. ``cine.dcm#frame=0003``."""
    return f"{path}#frame={index:04d}"


def split_ref(ref: str | Path) -> tuple[str, int | None]:
    """``(file, frame index)`` of a reference made by :func:`frame_ref`; ``(ref, None)`` for a plain path.

    A path that exists as given is always a plain path (a file really named ``x#frame=1``).
    """
    text = str(ref)
    match = _FRAME_SUFFIX.match(text)
    if match is None or Path(text).exists():
        return text, None
    return match["file"], int(match["index"])


def read_header(path: str | Path) -> DicomHeader:
    """The image pixel module of a DICOM file, read without its pixel data.

    Raises:
        DicomError: not DICOM, no pixel data, no image, or a pixel module that does not describe an image.
    """
    from pydicom.pixels.utils import get_expected_length

    _quiet()
    try:
        # A bare data set (no preamble) is read only once is_dicom has accepted it: forced on any file,
        # pydicom would find a "data set" in a text file.
        ds, pixels = _read_module(path, force=is_dicom(path))
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise DicomError(path, f"not a readable DICOM file ({type(exc).__name__})") from None
    if pixels is None:
        raise DicomError(path, "DICOM without pixel data (a report, a structured document or a header only)")
    try:
        header = DicomHeader(
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            frames=int(ds.get("NumberOfFrames", 1) or 1),
            samples=int(ds.get("SamplesPerPixel", 1)),
            photometric=str(ds.PhotometricInterpretation).strip().upper(),
            bits_stored=int(ds.get("BitsStored", ds.get("BitsAllocated", 8))),
            signed=int(ds.get("PixelRepresentation", 0)) == 1,
            transfer_syntax=_transfer_syntax(ds),
        )
        # pydicom's own count, so the check agrees with its decoder: YBR_FULL_422 holds 2 bytes a pixel
        # (Y Y Cb Cr for 2 pixels), not SamplesPerPixel; 1-bit data is packed 8 pixels a byte.
        needed = get_expected_length(ds)
    except (AttributeError, TypeError, ValueError):
        raise DicomError(path, "DICOM file without an image (no rows, columns, samples per pixel, bits allocated "
                               "or photometric interpretation)") from None
    except Exception as exc:  # elements are converted only when read: a damaged one raises what pydicom raises
        # (NotImplementedError for an unknown value representation): a reject like any other, never a crash
        raise DicomError(path, f"damaged DICOM image pixel module ({type(exc).__name__})") from None
    if header.rows <= 0 or header.columns <= 0 or header.frames <= 0:
        raise DicomError(path, f"DICOM image of {header.columns}x{header.rows} px and {header.frames} frame(s)")
    _check_length(path, header, needed, pixels)
    return header


def _read_module(path: str | Path, force: bool) -> tuple[object, tuple[int, int] | None]:
    """The image pixel module of a file and where its pixel data lies, without reading the pixels.

    Returns:
        ``(data set, pixels)``: the data set holds only _HEADER_TAGS and the file meta (no patient data);
        ``pixels`` is ``(offset of the value in the file, declared length)`` of the pixel data element,
        or None when the data set has none.
    """
    from pydicom.filereader import read_partial
    from pydicom.tag import Tag

    found = []
    with open(path, "rb") as fp:
        def at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
            # Called just past each top-level element's header, so fp.tell() is where its value starts.
            if tag in _PIXEL_TAGS:
                found.append((fp.tell(), length))
                return True
            return False

        ds = read_partial(fp, at_pixel_data, force=force, specific_tags=[Tag(t) for t in _HEADER_TAGS])
    return ds, (found[0] if found else None)


def _transfer_syntax(ds) -> str:
    """The file meta's transfer syntax; for a bare data set (no file meta), the encoding pydicom found."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    syntax = (getattr(ds, "file_meta", None) or {}).get("TransferSyntaxUID")
    if syntax:
        return str(syntax)
    implicit, little = ds.original_encoding
    return str(ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _check_length(path: str | Path, header: DicomHeader, needed: int, pixels: tuple[int, int]) -> None:
    """Refuse an uncompressed file whose pixel data is shorter than its frames need (``needed`` bytes):
    pydicom would decode the first frames of a cut-off cine loop and fail (or pad) later ones, so the
    whole file is refused up front. The bytes counted are those the element declares and the file holds
    after its start, not the file's size: a loop cut by less than its header's size is still cut."""
    import os

    from pydicom.uid import UID

    syntax = UID(header.transfer_syntax)
    # An unknown UID (not a transfer syntax) says nothing of the length; decoding names the problem.
    if not syntax.is_transfer_syntax or syntax.is_compressed:
        return
    offset, declared = pixels
    have = declared
    if not syntax.is_deflated:  # a deflated data set is inflated in memory: file offsets do not apply
        have = min(declared, os.path.getsize(path) - offset)
    if have < needed:
        raise DicomError(path, f"truncated DICOM (its pixel data holds {max(have, 0)} bytes; "
                               f"its {header.frames} frame(s) need {needed})")


def read_dicom_frames(path: str | Path, sixteen_bit: str = "scale", max_pixels: int | None = None) -> list[np.ndarray]:
    """Every frame of a DICOM file as uint8 RGB (H, W, 3), in file order.

    Args:
        path: a DICOM Part 10 file (any extension, or none).
        sixteen_bit: how more than 8 bits per sample become 8: "scale" maps the declared range
            (0 .. 2**BitsStored - 1) linearly onto 0..255, "minmax" stretches each frame's own range
            (see msbt.images.imagefile.read_image).
        max_pixels: refuse a file whose frames hold more pixels than this (rows x columns per frame),
            before any pixel is decoded; None: no limit.

    Returns:
        One array per frame.

    Raises:
        DicomError: the reason names what is wrong (never a value of the file's data set).
    """
    header = read_header(path)
    check_size(path, header, max_pixels)
    return [read_dicom_frame(path, i, sixteen_bit, header=header) for i in range(header.frames)]


def check_size(path: str | Path, header: DicomHeader, max_pixels: int | None) -> None:
    """Refuse a frame larger than ``max_pixels`` before it is decoded (a decompression-bomb guard)."""
    if max_pixels is not None and header.rows * header.columns > max_pixels:
        raise DicomError(path, f"image too large ({header.columns}x{header.rows} = {header.rows * header.columns} px "
                               f"per frame; limit data.max_pixels = {max_pixels})")


def read_dicom_frame(path: str | Path, index: int, sixteen_bit: str = "scale", *,
                     header: DicomHeader | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Frame ``index`` (0-based) of a DICOM file as uint8 RGB (H, W, 3); only that frame is decoded.

    Raises:
        DicomError: no such frame, an unsupported photometric interpretation or transfer syntax, or a
            decoding failure.
    """
    from pydicom.dataset import Dataset
    from pydicom.pixels import pixel_array

    header = header or read_header(path)
    check_size(path, header, max_pixels)
    if not 0 <= index < header.frames:
        raise DicomError(path, f"no frame {index} (the file has {header.frames})")
    if header.photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422"):
        raise DicomError(path, f"unsupported photometric interpretation {header.photometric}")
    module = Dataset()  # receives group 0x0028 and the file meta only: no patient data
    _quiet()
    try:
        # YBR_FULL/YBR_FULL_422 are converted to RGB by pydicom (raw=False). The transfer syntax is passed
        # because a bare data set has no file meta to name it (for a Part 10 file it is the meta's own).
        array = pixel_array(str(path), ds_out=module, index=index, transfer_syntax_uid=header.transfer_syntax)
    except Exception as exc:
        raise DicomError(path, _decode_failure(exc, header)) from None
    return _to_rgb8(array, header, sixteen_bit, path)


def _decode_failure(exc: Exception, header: DicomHeader) -> str:
    text = str(exc).lower()
    # pydicom says "exceptions were raised by all available plugins" when a decoder is installed and failed on
    # the data, and names missing plugins or dependencies when none can run: a damaged frame is not a missing decoder.
    if "raised by all available plugins" in text:
        return f"damaged compressed pixel data (its decoder failed on it; transfer syntax {header.transfer_syntax})"
    if "plugin" in text or "missing required dependencies" in text:
        return f"compressed DICOM this installation cannot decode (transfer syntax {header.transfer_syntax})"
    return f"DICOM pixel data cannot be decoded ({type(exc).__name__})"


def _to_rgb8(array: np.ndarray, header: DicomHeader, sixteen_bit: str, path: str | Path) -> np.ndarray:
    """A decoded frame (gray (H, W) or RGB (H, W, 3), any integer depth) as uint8 RGB."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise DicomError(path, f"unsupported DICOM frame shape {array.shape}")
    if header.signed:
        # Signed samples (rare in ultrasound): shift to unsigned so "scale" keeps its meaning.
        array = array.astype(np.int64) + (1 << (header.bits_stored - 1))
    if array.dtype != np.uint8:
        top = (1 << header.bits_stored) - 1
        array = np.clip(array.astype(np.int64), 0, top)
        if sixteen_bit == "minmax":
            lo, hi = int(array.min()), int(array.max())
        else:
            lo, hi = 0, top
        scale = 255.0 / max(hi - lo, 1)
        array = np.clip((array - lo) * scale + 0.5, 0, 255).astype(np.uint8)
    if header.photometric == "MONOCHROME1":
        array = 255 - array  # MONOCHROME1: the lowest value is white
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array)


@functools.cache
def _quiet() -> None:
    """Silence pydicom's warnings and log lines for good: they may quote element values.

    Set once per process (not per read): warning filters and logger levels are process-wide, and a
    per-read switch would race between the threads discovery decodes with.
    """
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
