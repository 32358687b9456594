"""Finding and validating a user's images: class-per-folder trees and CSV manifests.

Layouts read:
- a class-per-folder tree, `ROOT/<class>/**/<image>` (the paper's Mendeley set: `benign/`, `malignant/`, BMP;
  BUSI: PNG with `<name>_mask.png` / `<name>_mask_1.png` beside each image, and a `normal/` class);
- a CSV manifest with a header `path,label[,group]`, paths absolute or relative to the CSV's folder.

DICOM files are taken whatever their name (their magic decides); a multi-frame file (a cine loop) gives
one image per frame, `file#frame=NNNN`, all of one group. Only their pixels are read, never patient data.

Every image is decoded once here: a file that cannot be used becomes a `Reject` (path and reason) and the
scan goes on, unless `strict` is set. The same decode yields the content digest and the perceptual
fingerprint that grouping needs. Nothing is ever written under the data root. No Ray, no TensorFlow.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from msbt.images.grouping import fingerprint
from msbt.images.dicom import frame_ref, is_dicom
from msbt.images.imagefile import IMAGE_EXTENSIONS, ImageError, decode_image, image_refs, read_dicom_image

# Files operating systems and viewers leave in folders; never data, never worth a reject line.
_SYSTEM_FILES = {"thumbs.db", "desktop.ini", ".ds_store"}


class DataError(ValueError):
    """The data set as a whole cannot be used (missing folder, bad manifest, strict-mode reject)."""


@dataclass(frozen=True)
class ImageRecord:
    path: str  # absolute path of the file
    relpath: str  # path relative to the data root (or as written in the manifest): the stable key
    label: str
    group: str  # from the manifest's group column; "" when none was given
    width: int
    height: int
    digest: str  # sha1 of the file's bytes


@dataclass(frozen=True)
class Reject:
    path: str
    reason: str


@dataclass
class Discovery:
    """The result of a scan: usable images (with fingerprints), rejects and what was left out on purpose."""

    root: str
    classes: tuple[str, ...]
    records: list[ImageRecord]
    rejects: list[Reject]
    hashes: np.ndarray  # (N,) uint64 perceptual hashes, aligned with records
    thumbs: np.ndarray  # (N, 1024) float32 normalised thumbnails, aligned with records
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (masks, excluded classes)

    def counts(self) -> dict[str, int]:
        """Number of usable images per class, in class order."""
        out = {c: 0 for c in self.classes}
        for record in self.records:
            out[record.label] += 1
        return out

    def fingerprint(self) -> str:
        """Digest of the data set's identity: relative paths, labels and file contents."""
        h = hashlib.sha1()
        for r in sorted(self.records, key=lambda r: r.relpath):
            h.update(f"{r.relpath}\t{r.label}\t{r.digest}\n".encode())
        return h.hexdigest()


def discover(
    source: str | Path,
    classes: Sequence[str] = (),
    *,
    strict: bool = False,
    mask_suffixes: Sequence[str] = ("_mask",),
    sixteen_bit: str = "scale",
    workers: int | None = None,
) -> Discovery:
    """Scan a class-per-folder tree or a CSV manifest and validate every image in it.

    Args:
        source: a folder (class-per-folder) or a `.csv` manifest.
        classes: classes to keep, in label order; () keeps every class found, sorted by name. A listed
            class with no folder/rows is an error; classes found but not listed are skipped and counted.
        strict: raise DataError at the first rejected file instead of recording it.
        mask_suffixes: file stems ending in one of these (optionally followed by `_<n>`) are
            segmentation masks, not images, and are skipped.
        sixteen_bit: 16-bit conversion policy (see `msbt.images.imagefile.read_image`).
        workers: decoding threads (OpenCV releases the GIL); None -> number of CPUs.

    Returns:
        Discovery with records sorted by (class order, relpath).
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"{source}: data folder or manifest does not exist")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{source}: expected a folder of class folders or a .csv manifest")
        candidates, rejects, skipped, found = _from_manifest(source, classes)
        root = source.parent
    else:
        candidates, rejects, skipped, found = _from_tree(source, classes, mask_suffixes)
        root = source
    if strict and rejects:
        raise DataError(f"{rejects[0].path}: {rejects[0].reason} (strict mode)")
    keep = tuple(classes) if classes else tuple(sorted(found))
    missing = [c for c in keep if c not in found]
    if missing:
        raise DataError(f"{source}: class {missing[0]!r} not found (found: {', '.join(sorted(found)) or 'none'})")

    records, hashes, thumbs = [], [], []
    for (path, relpath, label, group), outcome in _decode_all(candidates, sixteen_bit, workers):
        if isinstance(outcome, Reject):
            if strict:
                raise DataError(f"{outcome.path}: {outcome.reason} (strict mode)")
            rejects.append(outcome)
            continue
        (height, width), digest, (phash, thumb) = outcome
        records.append(ImageRecord(str(path), relpath, label, group, width, height, digest))
        hashes.append(phash)
        thumbs.append(thumb)
    order = sorted(range(len(records)), key=lambda i: (keep.index(records[i].label), records[i].relpath))
    if not order:
        raise DataError(f"{source}: no usable images ({len(rejects)} rejected)")
    return Discovery(
        root=str(root),
        classes=keep,
        records=[records[i] for i in order],
        rejects=sorted(rejects, key=lambda r: r.path),
        hashes=np.array([hashes[i] for i in order], dtype=np.uint64),
        thumbs=np.stack([thumbs[i] for i in order]),
        skipped=skipped,
    )


Candidate = tuple[Path, str, str, str]  # (absolute path, relpath, label, group)


def _from_tree(root: Path, classes: Sequence[str], mask_suffixes: Sequence[str]):
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders inside (expected e.g. {root}/benign/, {root}/malignant/)")
    mask = _mask_pattern(mask_suffixes)
    candidates: list[Candidate] = []
    rejects: list[Reject] = []
    skipped: dict[str, int] = {}
    loose = [p for p in root.iterdir() if p.is_file() and not _is_system_file(p)]
    if loose:
        skipped["file outside any class folder"] = len(loose)
    found = [d.name for d in class_dirs]
    for class_dir in class_dirs:
        files = sorted(p for p in _walk(class_dir) if not _is_system_file(p))
        if classes and class_dir.name not in classes:
            key = f"class {class_dir.name!r} not selected"
            skipped[key] = skipped.get(key, 0) + len(files)
            continue
        for path in files:
            if mask.search(path.stem):
                skipped["segmentation mask"] = skipped.get("segmentation mask", 0) + 1
            else:
                candidates.append((path, path.relative_to(root).as_posix(), class_dir.name, ""))
    return candidates, rejects, skipped, found


def _walk(folder: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            yield Path(dirpath) / name


def _is_system_file(path: Path) -> bool:
    return path.name.lower() in _SYSTEM_FILES or path.name.startswith("._")


def _mask_pattern(suffixes: Sequence[str]) -> re.Pattern:
    if not suffixes:
        return re.compile(r"(?!)")  # matches nothing
    alternatives = "|".join(re.escape(s) for s in suffixes)
    return re.compile(rf"(?:{alternatives})(?:_\d+)?$", re.IGNORECASE)


def _from_manifest(manifest: Path, classes: Sequence[str]):
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in columns or "label" not in columns:
            raise DataError(f"{manifest}: manifest needs a header with columns path,label[,group]; got {columns}")
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    candidates: list[Candidate] = []
    rejects: list[Reject] = []
    skipped: dict[str, int] = {}
    seen: set[Path] = set()
    found: list[str] = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{manifest}:{line}"
        if not row.get("path") or not row.get("label"):
            rejects.append(Reject(where, "manifest row without a path or a label"))
            continue
        path = Path(row["path"]).expanduser()
        path = path if path.is_absolute() else manifest.parent / path
        label = row["label"]
        if label not in found:
            found.append(label)
        if classes and label not in classes:
            key = f"class {label!r} not selected"
            skipped[key] = skipped.get(key, 0) + 1
        elif path.resolve() in seen:
            rejects.append(Reject(str(path), f"listed twice in the manifest (again at line {line})"))
        elif not path.is_file():
            rejects.append(Reject(str(path), f"listed in the manifest (line {line}) but does not exist"))
        else:
            seen.add(path.resolve())
            candidates.append((path, row["path"], label, row.get("group", "")))
    return candidates, rejects, skipped, found


def _decode_all(candidates: list[Candidate], sixteen_bit: str, workers: int | None) -> list[tuple[Candidate, object]]:
    """Decode every candidate; a multi-frame DICOM becomes one (candidate, outcome) per frame."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return [pair for pairs in pool.map(lambda c: _decode_one(c, sixteen_bit), candidates) for pair in pairs]


def _decode_one(candidate: Candidate, sixteen_bit: str) -> list[tuple[Candidate, object]]:
    path = candidate[0]
    if is_dicom(path):
        return _decode_dicom(candidate, sixteen_bit)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return [(candidate, Reject(str(path), f"not an image file (extension '{path.suffix or 'none'}')"))]
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [(candidate, Reject(str(path), f"unreadable ({exc.strerror or exc})"))]
    try:
        rgb = decode_image(data, path, sixteen_bit)  # type: ignore[arg-type]
    except ImageError as exc:
        return [(candidate, Reject(str(path), exc.reason))]
    return [(candidate, (rgb.shape[:2], hashlib.sha1(data).hexdigest(), fingerprint(rgb)))]


def _decode_dicom(candidate: Candidate, sixteen_bit: str) -> list[tuple[Candidate, object]]:
    """Each frame of a DICOM file as its own image; frames share the file's digest (msbt.data.splits
    keeps the frames of one file in one group). Only pixels are read: no patient data (msbt.images.dicom)."""
    path, relpath, label, group = candidate
    refs = image_refs(path)
    if len(refs) == 1:
        frames = [(candidate, None)]
    else:
        frames = [((Path(ref), frame_ref(relpath, i), label, group), i) for i, ref in enumerate(refs)]
    try:
        digest = _sha1_file(path)
    except OSError as exc:
        return [(candidate, Reject(str(path), f"unreadable ({exc.strerror or exc})"))]
    out: list[tuple[Candidate, object]] = []
    for frame_candidate, index in frames:
        try:
            rgb = read_dicom_image(path, index, sixteen_bit)
        except ImageError as exc:
            out.append((frame_candidate, Reject(str(frame_candidate[0]), exc.reason)))
            continue
        out.append((frame_candidate, (rgb.shape[:2], digest, fingerprint(rgb))))
    return out


def _sha1_file(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_rejects(rejects: Sequence[Reject], path: str | Path) -> Path:
    """Write the rejects manifest (`path,reason`) so nothing is lost silently."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows((r.path, r.reason) for r in rejects)
    return path
