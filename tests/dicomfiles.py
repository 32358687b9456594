"""Generated DICOM files for tests: uncompressed (or RLE, one frame damaged), with fake patient-identifying
elements to hunt for."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Values no real output could contain by chance; every test greps outputs for them.
FAKE_PHI = {
    "PatientName": "Zyxwvut^Qwertyuiop",
    "PatientID": "PHI-ID-987654321",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ACC-55544433",
    "InstitutionName": "Hospital Of Fake Values Qzx",
    "ReferringPhysicianName": "Doctor^Fakename^Qzx",
    "StudyDate": "19020304",
}


def write_dicom(path: str | Path, frames: np.ndarray, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, phi: dict | None = None) -> Path:
    """Write an uncompressed (explicit VR little endian) ultrasound DICOM.

    Args:
        path: the file (any name; DICOM is found by its magic, not its extension).
        frames: (F, H, W) or (F, H, W, 3) pixel values; F > 1 writes a multi-frame (cine) file.
            uint8 or uint16; 3 channels are stored as RGB or, for YBR_FULL, converted here.
        photometric: MONOCHROME1, MONOCHROME2, RGB or YBR_FULL.
        bits_stored: for uint16 frames (default 16).
        phi: patient-identifying elements to write (default FAKE_PHI).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    frames = np.asarray(frames)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    for key, value in (FAKE_PHI if phi is None else phi).items():
        setattr(ds, key, value)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    color = frames.ndim == 4
    pixels = frames
    if color and photometric == "YBR_FULL":
        pixels = _rgb_to_ybr_full(frames)
    ds.SamplesPerPixel = 3 if color else 1
    ds.PhotometricInterpretation = photometric
    if color:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.NumberOfFrames = frames.shape[0]
    bits = 16 if frames.dtype == np.uint16 else 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return Path(path)


def write_bare_dataset(path: str | Path, frames: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    """``frames`` as a bare data set: no preamble, no DICM magic, no file meta (implicit VR little
    endian), as older and hand-made exports write DICOM; pydicom reads it with force=True."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    ds = pydicom.dcmread(write_dicom(path, frames, photometric=photometric))
    ds.preamble, ds.file_meta = None, FileMetaDataset()
    ds.save_as(str(path), implicit_vr=True, little_endian=True, enforce_file_format=False)
    return Path(path)


def write_rle_dicom_with_a_damaged_frame(path: str | Path, frames: np.ndarray, damaged: int | tuple[int, ...]) -> Path:
    """A multi-frame RLE Lossless DICOM (pydicom's own encoder) whose frame ``damaged`` (or frames) no decoder can
    read: its RLE header claims 99 segments (the standard allows at most 15). The other frames decode as written."""
    import pydicom
    from pydicom.encaps import get_frame
    from pydicom.uid import RLELossless

    path = Path(path)
    ds = pydicom.dcmread(write_dicom(path, frames))
    ds.compress(RLELossless)
    ds.save_as(str(path), enforce_file_format=True)
    data = bytearray(path.read_bytes())
    pixel_data = pydicom.dcmread(path).PixelData
    for index in (damaged,) if isinstance(damaged, int) else damaged:
        fragment = get_frame(pixel_data, index, number_of_frames=len(frames))
        at = data.find(fragment)
        assert at > 0 and data.find(fragment, at + 1) < 0
        data[at:at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


def _rgb_to_ybr_full(rgb: np.ndarray) -> np.ndarray:
    # DICOM PS3.3 C.7.6.3.1.2: YBR_FULL is full-range ITU-R BT.601.
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    return np.clip(np.round(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


def phi_found(folder: str | Path) -> list[str]:
    """Every file under ``folder`` holding one of the fake identifying values, with the value found."""
    hits = []
    needles = [v.encode() for v in FAKE_PHI.values()] + [v.split("^")[0].encode() for v in FAKE_PHI.values()]
    for file in Path(folder).rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            hits += [f"{file}: {n.decode()}" for n in needles if n in data]
    return hits
