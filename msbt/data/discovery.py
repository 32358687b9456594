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
import functools
import hashlib
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from msbt.atomicio import atomic_open
from msbt.console import progress
from msbt.images.grouping import fingerprint
from msbt.images.dicom import frame_ref, is_dicom
from msbt.images.imagefile import (
    DEFAULT_MAX_PIXELS,
    DIM_SIXTEEN_BIT,
    IMAGE_EXTENSIONS,
    ImageError,
    decode_image,
    image_refs,
    read_dicom_image,
    read_file_bytes,
)

# Files operating systems and viewers leave in folders; never data, never worth a reject line.
_SYSTEM_FILES = {"thumbs.db", "desktop.ini", ".ds_store"}
# Hidden (dot) files and folders inside a data folder are left out, and counted in the scan's `skipped` under these
# reasons (a `.hidden_field.png` was used while a hidden folder was left out without a word).
HIDDEN_FILE = "hidden file (name starts with '.')"
HIDDEN_FOLDER = "hidden folder (name starts with '.'), not searched"


class DataError(ValueError):
    """The data set as a whole cannot be used (missing folder, bad manifest, strict-mode reject).

    ``rejects``: the files rejected before the scan gave up, when it got that far (``msbt scan --rejects`` still
    writes them)."""

    def __init__(self, message: str, rejects: Sequence["Reject"] = ()):
        super().__init__(message)
        self.rejects = list(rejects)


@dataclass(frozen=True)
class ImageRecord:
    path: str  # absolute path of the file
    relpath: str  # path relative to the data root (or as written in the manifest): the stable key
    label: str
    group: str  # from the manifest's group column; "" when none was given
    width: int
    height: int
    digest: str  # sha1 of the file's bytes
    site: str = ""  # the named source (hospital, scanner) it came from; see msbt.data.sites


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
    warnings: list[Reject] = field(default_factory=list)  # used, but only in part (data.on_partial: warn)
    sites: dict[str, str] = field(default_factory=dict)  # site name -> its root (msbt.data.sites)
    # path -> brightest sample, for every usable 16-bit PNG/TIFF (what `dim_sixteen_bit` warns about)
    sixteen_bit_peaks: dict[str, int] = field(default_factory=dict)

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
            h.update(f"{r.relpath}\t{r.label}\t{r.digest}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def discover(
    source: str | Path,
    classes: Sequence[str] = (),
    *,
    strict: bool = False,
    mask_suffixes: Sequence[str] = ("_mask",),
    sixteen_bit: str = "scale",
    workers: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    on_partial: str = "reject",
    on_conflict: str = "reject",
    inspect_all: Callable[..., list] | None = None,
    every_class: bool = True,
    progress_label: str = "scan",
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
        max_pixels: images over this many pixels are rejected from their header, before decoding.
        on_partial: "reject" or "warn" for files only part of which would be used (see
            `msbt.images.imagefile.read_image`); warnings land in `Discovery.warnings`.
        on_conflict: the same file content under two classes: "error" stops the scan naming both
            files, "reject" rejects every copy.
        inspect_all: runs `inspect_file` over every candidate and returns the (candidate, outcome) pairs
            in candidate order, given (candidates, options, desc=progress_label); None -> threads in this process
            (`inspect_in_threads`). `msbt.data.scan` passes one that runs on Ray Data.
        every_class: every class in ``classes`` must have usable images (training); False accepts a source
            with some of them only (an external site of malignant cases alone: ``msbt external``).
        progress_label: the scan's progress bar (``scan <site>`` for one of several sites: they were all "scan").

    Returns:
        Discovery with records sorted by (class order, relpath).

    Raises:
        DataError: the source, a class folder or the manifest cannot be used, a kept class has no usable
            image, or labels contradict each other (on_conflict: error).
    """
    source = _source_path(source)
    if source.is_file():
        candidates, rejects, skipped, found = _from_manifest(source, classes)
        root = source.parent
    else:
        candidates, rejects, skipped, found = _from_tree(source, classes, mask_suffixes)
        root = source
    if strict and rejects:
        raise DataError(f"{rejects[0].path}: {rejects[0].reason} (strict mode)")
    keep = tuple(classes) if classes else tuple(sorted(found))
    check_classes(source, keep, found, every=every_class)

    options = {"sixteen_bit": sixteen_bit, "max_pixels": max_pixels, "on_partial": on_partial}
    records, hashes, thumbs, warnings, peaks = [], [], [], [], []
    pairs = (inspect_all(candidates, options, desc=progress_label) if inspect_all is not None
             else inspect_in_threads(candidates, options, workers, desc=progress_label))
    for (path, relpath, label, group), outcome in pairs:
        if isinstance(outcome, Reject):
            if strict:
                raise DataError(f"{outcome.path}: {outcome.reason} (strict mode)")
            rejects.append(outcome)
            continue
        (height, width), digest, (phash, thumb), notes, peak = outcome
        if notes:
            warnings.append(Reject(text_name(str(path)), "; ".join(notes)))
        records.append(ImageRecord(str(path), relpath, label, group, width, height, digest))
        peaks.append(peak)
        hashes.append(phash)
        thumbs.append(thumb)
    conflicting = label_conflicts(records, on_conflict)
    rejects += [Reject(text_name(records[i].path), reason) for i, reason in conflicting.items()]
    order = sorted((i for i in range(len(records)) if i not in conflicting),
                   key=lambda i: (keep.index(records[i].label), records[i].relpath))
    if not order:
        examples = "; ".join(f"{r.path}: {r.reason}" for r in sorted(rejects, key=lambda r: r.path)[:3])
        raise DataError(f"{source}: no usable images ({len(rejects)} rejected" + (f"; e.g. {examples}" if examples
                        else "") + ")", rejects)
    if every_class:
        _require_every_class(source, keep, [records[i].label for i in order], rejects, candidates)
    return Discovery(
        root=str(root),
        classes=keep,
        records=[records[i] for i in order],
        rejects=sorted(rejects, key=lambda r: r.path),
        hashes=np.array([hashes[i] for i in order], dtype=np.uint64),
        thumbs=np.stack([thumbs[i] for i in order]),
        skipped=skipped,
        warnings=sorted(warnings, key=lambda r: r.path),
        sixteen_bit_peaks={text_name(records[i].path): peaks[i] for i in order if peaks[i] is not None},
    )


def dim_sixteen_bit(discovery: Discovery, sixteen_bit: str) -> str | None:
    """A warning naming how many 16-bit files hold 12- or 14-bit data that ``sixteen_bit`` leaves nearly black.

    Under ``scale`` the full 0..65535 range becomes 0..255, so a file whose brightest sample is below
    `msbt.images.imagefile.DIM_SIXTEEN_BIT` (16384: at most 14 bits used) ends at most 64 of 255 bright, a 12-bit
    one at 16: patches and images nearly black, and nothing else says so. From the peaks the scan's single decode
    recorded (`Discovery.sixteen_bit_peaks`); None when there are none such, or ``sixteen_bit`` is ``minmax``.
    """
    if sixteen_bit != "scale":
        return None
    peaks = discovery.sixteen_bit_peaks
    dim = sorted(path for path, peak in peaks.items() if peak < DIM_SIXTEEN_BIT)
    if not dim:
        return None
    brightest = max(peaks[path] for path in dim)
    bits = max(brightest.bit_length(), 1)
    return (f"{len(dim)} of {len(peaks)} 16-bit files use only a small part of the 16-bit range (brightest sample "
            f"{brightest} of 65535, at most {bits} bits: data of fewer bits stored in 16, as a 12- or 14-bit camera's "
            f"or an 8-bit image saved as 16-bit; e.g. {dim[0]}): "
            f"data.sixteen_bit: scale maps them to at most {round(brightest / 257)} of 255, nearly black; set "
            "--set data.sixteen_bit=minmax to stretch each image's own range")


def _source_path(source: str | Path) -> Path:
    """``source`` as a path that is a folder or a ``.csv`` manifest; else a DataError naming it."""
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"{source}: data folder or manifest does not exist")
    if source.is_file() and source.suffix.lower() != ".csv":
        raise DataError(f"{source}: expected a folder of class folders or a .csv manifest")
    return source


def check_source(source: str | Path, classes: Sequence[str] = (), *, group_column: bool = False,
                 min_classes: int = 1) -> None:
    """The cheap checks of `discover`, without reading any image: the folder or manifest exists and is
    readable, the classes to keep are there (a case-only difference is named), each class folder can be
    listed and a manifest is UTF-8 with path and label columns. Meant to run before Ray starts, so such
    mistakes cost seconds, not a cluster start-up.

    Args:
        group_column: the source must be a manifest with a ``group`` column (``data.grouping: manifest``).
        min_classes: classes the source must hold (2 for training a classifier; an external site may hold one).

    Raises:
        DataError: naming the folder, manifest or class and the reason.
    """
    source = _source_path(source)
    if group_column and not source.is_file():
        raise DataError(f"{source}: data.grouping: manifest needs a CSV manifest with a group column; this is a "
                        "folder (use data.grouping: auto for it)")
    if source.is_file():
        columns, rows = _read_manifest_rows(source)
        if "path" not in columns or "label" not in columns:
            raise DataError(f"{source}: manifest needs a header with columns path,label[,group]; got {columns}")
        if group_column and "group" not in columns:
            raise DataError(f"{source}: data.grouping: manifest needs a group column in the manifest; got {columns}")
        found = sorted({r.get("label", "") for r in rows if not _too_many_fields(r, columns)} - {""})
        check_classes(source, tuple(classes) or found, found)
        _check_enough(source, tuple(classes) or tuple(found), min_classes, "label")
        return
    try:
        found = [p.name for p in source.iterdir() if is_folder(p) and not p.name.startswith(".")]
    except OSError as exc:
        raise DataError(f"{source}: data folder cannot be read ({exc.strerror or exc})") from None
    if not found:
        raise DataError(f"{source}: no class folders inside (expected e.g. {source}/benign/, {source}/malignant/)")
    keep = tuple(classes) or tuple(sorted(found))
    check_classes(source, keep, found)
    _check_enough(source, keep, min_classes, "class folder")
    for c in keep:
        try:
            with os.scandir(source / c) as listing:
                next(listing, None)
        except OSError as exc:
            raise DataError(f"{source / c}: class folder cannot be read ({exc.strerror or exc})") from None


def _check_enough(source: Path, keep: Sequence[str], min_classes: int, what: str) -> None:
    """Refuse a source with fewer classes than a classifier needs, naming a one-folder-too-high root (a collection
    at ``ROOT/cells/{HeLa,...}`` given as ``ROOT`` became one class, refused only inside a Ray Train worker)."""
    if len(keep) >= min_classes:
        return
    hint = ""
    if len(keep) == 1 and source.is_dir():
        try:
            inner = sorted(p.name for p in (source / keep[0]).iterdir() if is_folder(p) and not p.name.startswith("."))
        except OSError:
            inner = []
        if inner:
            hint = (f"; {source / keep[0]} holds the folders {', '.join(inner[:4])}{' ...' if len(inner) > 4 else ''}: "
                    "if those are the classes, give that folder instead")
    raise DataError(f"{source}: {len(keep)} {what}{'s' if len(keep) != 1 else ''} "
                    f"({', '.join(map(repr, keep)) or 'none'}); training needs at least {min_classes}{hint}")


def check_classes(source: str | Path, keep: Sequence[str], found: Sequence[str], *, every: bool = True) -> None:
    """Every class to keep was found (with ``every`` False: at least one), and no other class differs from one
    only in case or spaces (a name that differs only in case is named as the likely mistake).

    Raises:
        DataError: naming the source, the missing class and what was found.
    """
    missing = [c for c in keep if c not in found]
    if missing and (every or len(missing) == len(keep)):
        near = [f for f in found if f.lower() == missing[0].lower()]
        hint = f"; {near[0]!r} differs only in case (class names are case-sensitive)" if near else ""
        raise DataError(f"{source}: class {missing[0]!r} not found (found: {', '.join(sorted(found)) or 'none'}){hint}")
    # A class folder or label that differs from a kept class only in case or spaces ("Malignant" beside
    # "malignant") would be skipped as "not selected": images the user meant to use, lost without a word.
    kept = {c.strip().lower(): c for c in keep}
    twins = [f for f in found if f not in keep and f.strip().lower() in kept]
    if twins:
        raise DataError(f"{source}: class {twins[0]!r} differs from class {kept[twins[0].strip().lower()]!r} only "
                        "in case or spaces, so its images would be left out (class names are case-sensitive); "
                        "rename or merge it")


def _require_every_class(source: Path, keep: Sequence[str], labels: Sequence[str], rejects: list[Reject],
                         candidates: list) -> None:
    """A kept class without a single usable image would train a model that never sees it: stop."""
    label_of = {text_name(str(cand[0])): cand[2] for cand in candidates}
    for c in keep:
        if c in labels:
            continue
        where = source / c if source.is_dir() else source
        # a file that was tried, or a manifest row of the class rejected before (it names its label)
        own = [r for r in rejects if label_of.get(r.path) == c or _in_class(r.path, where) and source.is_dir()
               or f"label {c!r})" in r.reason]
        if own:
            reason = f"all {len(own)} of its {'files' if source.is_dir() else 'rows'} were rejected"
        else:
            reason = "it holds no image files" if source.is_dir() else "the manifest has no row of it"
        detail = f"; e.g. {own[0].path}: {own[0].reason}" if own else ""
        raise DataError(f"{where}: class {c!r} has no usable image: {reason}{detail}", rejects)


def _in_class(path: str, where: Path) -> bool:
    return path.startswith(text_name(str(where)) + os.sep) or path == text_name(str(where))


def label_conflicts(records: list[ImageRecord], on_conflict: str) -> dict[int, str]:
    """Indices of records whose exact content also appears under another label, with the reason.

    Raises:
        DataError: on_conflict "error" and such a pair exists (both files are named).
    """
    if on_conflict not in ("error", "reject"):
        raise ValueError(f"on_conflict must be 'error' or 'reject', got {on_conflict!r}")
    by_digest: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_digest.setdefault(record.digest, []).append(i)
    out: dict[int, str] = {}
    for members in by_digest.values():
        labels = {records[i].label for i in members}
        if len(labels) < 2:
            continue
        a = members[0]
        b = next(i for i in members if records[i].label != records[a].label)
        if on_conflict == "error":
            raise DataError(f"{text_name(records[a].path)} ({records[a].label}) and {text_name(records[b].path)} "
                            f"({records[b].label}) are the same file content under two classes; remove one, "
                            "or set data.on_conflict: reject to reject every copy")
        for i in members:
            other = b if records[i].label == records[a].label else a
            out[i] = (f"same content as {text_name(records[other].path)} labelled {records[other].label!r} "
                      "(contradictory labels; data.on_conflict: reject)")
    return out


def text_name(name: str) -> str:
    """A file name as text that any UTF-8 file can hold: bytes that are not UTF-8 (Python keeps them as
    surrogates, `os.fsdecode`) are written `\\xNN`, every other character as it is. `fs_name` undoes it, so
    split.csv, rejects.csv, stores and predictions name such files and later steps find them again.
    (A name really containing the text `\\x` followed by two hex digits 80-ff is read back wrongly.)"""
    if not any("\udc80" <= ch <= "\udcff" for ch in name):
        return name
    return "".join(f"\\x{ord(ch) - 0xDC00:02x}" if "\udc80" <= ch <= "\udcff" else ch for ch in name)


def fs_name(text: str) -> str:
    """The file name `text_name` wrote: `\\xNN` (NN >= 80) back to the byte it stands for."""
    if "\\x" not in text:
        return text
    return re.sub(r"\\x([89a-f][0-9a-f])", lambda m: chr(0xDC00 + int(m[1], 16)), text)


Candidate = tuple[Path, str, str, str]  # (absolute path, relpath, label, group)


def _from_tree(root: Path, classes: Sequence[str], mask_suffixes: Sequence[str]):
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        raise DataError(f"{root}: data folder cannot be read ({exc.strerror or exc})") from None
    class_dirs = [p for p in entries if is_folder(p) and not p.name.startswith(".")]
    if not class_dirs:
        raise DataError(f"{root}: no class folders inside (expected e.g. {root}/benign/, {root}/malignant/)")
    mask = mask_pattern(mask_suffixes)
    candidates: list[Candidate] = []
    rejects: list[Reject] = []
    skipped: dict[str, int] = {}
    for p in entries:
        if p.name.startswith(".") and not is_system_file(p):
            _count_skip(skipped, HIDDEN_FOLDER if is_folder(p) else HIDDEN_FILE)
    loose = [p for p in entries if not is_folder(p) and not is_system_file(p) and not p.name.startswith(".")]
    if loose:
        skipped["file outside any class folder"] = len(loose)
    found = [d.name for d in class_dirs]
    for class_dir in class_dirs:
        if classes and class_dir.name not in classes:
            key = f"class {class_dir.name!r} not selected"
            skipped[key] = skipped.get(key, 0) + sum(1 for p in walk_files(class_dir, []) if not is_system_file(p))
            continue
        problems: list[Reject] = []
        files = sorted(p for p in walk_files(class_dir, problems, skipped) if not is_system_file(p))
        if problems and problems[0].path == text_name(str(class_dir)):
            # The class folder itself: every image of the class would be lost, so never go on without it.
            raise DataError(f"{class_dir}: class folder {problems[0].reason}")
        rejects += problems
        for path in files:
            if mask.search(path.stem):
                skipped["segmentation mask"] = skipped.get("segmentation mask", 0) + 1
            else:
                candidates.append((path, text_name(path.relative_to(root).as_posix()), class_dir.name, ""))
    return candidates, rejects, skipped, found


def is_folder(path: Path) -> bool:
    """``path.is_dir()``, False for a symbolic-link loop (reported when it is read as a file)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def walk_files(folder: str | Path, problems: list[Reject], skipped: dict[str, int] | None = None) -> Iterator[Path]:
    """Every file under `folder`, recursively; hidden files and folders (a name starting with '.') are left out,
    and counted in ``skipped`` when given (`HIDDEN_FILE`, `HIDDEN_FOLDER`; a hidden folder is not entered, so its
    files are not counted). Operating-system litter (`is_system_file`: ``.DS_Store``, ``._*``) is left out uncounted.

    Symbolic links to folders are followed (collections are often assembled from links), each real
    folder once: a link back to a folder already walked (a loop) is recorded in `problems` and not
    entered. A folder that cannot be listed is recorded in `problems` with the OS's reason (the first
    entry is `folder` itself when it is the one that failed). Entries that are neither files nor folders
    are yielded too: reading them says what they are.
    """
    seen: set[tuple[int, int]] = set()
    stack = [Path(folder)]
    while stack:
        current = stack.pop()
        try:
            info = os.stat(current)
            key = (info.st_dev, info.st_ino)
            if key in seen:
                problems.append(Reject(text_name(str(current)), "folder already walked (a symbolic link loop or a "
                                                                "second link to it); not entered again"))
                continue
            seen.add(key)
            with os.scandir(current) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            problems.append(Reject(text_name(str(current)), f"cannot be read ({exc.strerror or exc})"))
            continue
        folders = []
        for entry in entries:
            is_dir = _entry_is_dir(entry)
            if entry.name.startswith("."):
                if skipped is not None and not is_system_file(Path(entry.path)):
                    _count_skip(skipped, HIDDEN_FOLDER if is_dir else HIDDEN_FILE)
            elif is_dir:
                folders.append(Path(entry.path))
            else:
                yield Path(entry.path)
        stack.extend(reversed(folders))


def _count_skip(skipped: dict[str, int], reason: str) -> None:
    skipped[reason] = skipped.get(reason, 0) + 1


def _entry_is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symbolic links
    except OSError:
        return False



def is_system_file(path: Path) -> bool:
    """Operating-system litter (``Thumbs.db``, ``.DS_Store``, AppleDouble ``._*`` files), never an image."""
    return path.name.lower() in _SYSTEM_FILES or path.name.startswith("._")


def mask_pattern(suffixes: Sequence[str]) -> re.Pattern:
    """A pattern that finds a segmentation mask by its stem's suffix (``_mask``, ``_mask_1``...)."""
    if not suffixes:
        return re.compile(r"(?!)")  # matches nothing
    alternatives = "|".join(re.escape(s) for s in suffixes)
    return re.compile(rf"(?:{alternatives})(?:_\d+)?$", re.IGNORECASE)


def _from_manifest(manifest: Path, classes: Sequence[str]):
    columns, rows = _read_manifest_rows(manifest)
    if "path" not in columns or "label" not in columns:
        raise DataError(f"{manifest}: manifest needs a header with columns path,label[,group]; got {columns}")
    candidates: list[Candidate] = []
    rejects: list[Reject] = []
    skipped: dict[str, int] = {}
    seen: dict[str, tuple[int, str, int]] = {}  # real path -> (its index in candidates, label, line)
    conflicting: set[str] = set()  # listed with two labels: used under neither
    found: list[str] = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{manifest}:{line}"
        if reason := _too_many_fields(row, columns):
            rejects.append(Reject(where, reason))
            continue
        if not row.get("path") or not row.get("label"):
            rejects.append(Reject(where, "manifest row without a path or a label"))
            continue
        path = Path(row["path"]).expanduser()
        path = path if path.is_absolute() else manifest.parent / path
        label = row["label"]
        if label not in found:
            found.append(label)
        # realpath, not Path.resolve: it does not raise on a symbolic link loop (Python < 3.13 does).
        real = os.path.realpath(path)
        if classes and label not in classes:
            key = f"class {label!r} not selected"
            skipped[key] = skipped.get(key, 0) + 1
        elif real in seen and (seen[real][1] != label or real in conflicting):
            # Which label is right cannot be told: the file is used under neither (the first row taken back).
            index, first_label, first_line = seen[real]
            if real in conflicting:
                rejects.append(Reject(str(path), f"listed again at line {line}, already with two labels; used under "
                                                 "neither"))
                continue
            conflicting.add(real)
            candidates[index] = None
            rejects.append(Reject(str(path), f"listed with two labels: {first_label!r} at line {first_line} and "
                                             f"{label!r} at line {line}; used under neither"))
        elif real in seen:
            # the repeated row is what is rejected: the file itself is used once, from its first row
            rejects.append(Reject(str(path), f"listed twice in the manifest (again at line {line}); used once, as "
                                             f"listed at line {seen[real][2]}"))
        elif not os.path.lexists(path):
            rejects.append(Reject(str(path), f"listed in the manifest (line {line}, label {label!r}) but does not "
                                             "exist"))
        else:
            seen[real] = (len(candidates), label, line)
            candidates.append((path, row["path"], label, row.get("group", "")))
    return [c for c in candidates if c is not None], rejects, skipped, found


def _read_manifest_rows(manifest: Path) -> tuple[list[str], list[dict]]:
    """Header and rows of a CSV manifest: UTF-8, with or without a byte-order mark (Excel writes one).

    Raises:
        DataError: bytes that are not UTF-8 (e.g. a Latin-1 export), naming the line and the byte.
    """
    try:
        data = manifest.read_bytes()
    except OSError as exc:
        raise DataError(f"{manifest}: manifest cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{manifest}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the manifest as "
                        "UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet, or iconv -f latin1 -t utf-8)") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    # A row with more fields than the header keeps them under the key None (csv's own restkey): such a row's
    # path and label are shifted (an unquoted comma in a file name), and the caller rejects it, naming its line.
    # Empty extra fields (a trailing comma, as some exports write) are no sign of a shift and are dropped.
    rows = []
    for row in reader:
        extra = [field for field in row.get(None) or [] if field.strip()]
        rows.append({k.strip(): (v or "").strip() for k, v in row.items() if k} | ({None: extra} if extra else {}))
    return columns, rows


def _too_many_fields(row: dict, columns: list[str]) -> str | None:
    """Why a manifest row cannot be trusted when it has more fields than the header, else None."""
    extra = row.get(None)
    if not extra:
        return None
    return (f"manifest row with {len(columns) + len(extra)} fields where the header has {len(columns)} (a path or "
            "label with a comma must be in double quotes); not used")


def inspect_in_threads(candidates: list[Candidate], options: dict, workers: int | None = None, *,
                       desc: str = "scan") -> list[tuple[Candidate, object]]:
    """`inspect_file` over every candidate with a thread pool in this process, pairs in candidate order (``desc``
    names the progress bar)."""
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
    try:
        results = list(progress(pool.map(lambda c: inspect_file(c, options), candidates),
                                total=len(candidates), desc=desc, unit="file"))
    except BaseException:
        # Ctrl-C (or any error): drop the queued files at once instead of decoding them all first,
        # so the first Ctrl-C stops the scan.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return [pair for pairs in results for pair in pairs]


def inspect_file(candidate: Candidate, options: dict) -> list[tuple[Candidate, object]]:
    """Validate, decode and fingerprint one file: the per-file work of a scan, wherever it runs.

    Args:
        candidate: ``(path, relpath, label, group)``.
        options: ``sixteen_bit``, ``max_pixels``, ``on_partial`` (see `discover`).

    Returns:
        ``(candidate, outcome)`` pairs: one for an image file, one per frame of a multi-frame DICOM. An
        outcome is a `Reject`, or ``((height, width), sha1 digest, (hash, thumb), notes, peak)`` with the
        perceptual hash and thumbnail of `msbt.images.grouping.fingerprint`, the reasons the file was
        used only in part (``data.on_partial: warn``) and the brightest sample of a 16-bit PNG/TIFF (None
        for other files: DICOM scales by the bits it declares).
    """
    path = candidate[0]
    name = text_name(str(path))
    if is_dicom(path):
        return _decode_dicom(candidate, options)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return [(candidate, Reject(name, f"not an image file (extension '{path.suffix or 'none'}')"))]
    notes: list[str] = []
    facts: dict = {}
    try:
        data = read_file_bytes(path)
        rgb = decode_image(data, path, options["sixteen_bit"], max_pixels=options["max_pixels"],  # type: ignore[arg-type]
                           on_partial=options["on_partial"], warnings=notes, facts=facts)
    except ImageError as exc:
        return [(candidate, Reject(name, exc.reason))]
    return [(candidate, (rgb.shape[:2], hashlib.sha1(data).hexdigest(), fingerprint(rgb), notes,
                         facts.get("sixteen_bit_peak")))]


def _decode_dicom(candidate: Candidate, options: dict) -> list[tuple[Candidate, object]]:
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
        return [(candidate, Reject(text_name(str(path)), f"unreadable ({exc.strerror or exc})"))]
    out: list[tuple[Candidate, object]] = []
    for frame_candidate, index in frames:
        try:
            rgb = read_dicom_image(path, index, options["sixteen_bit"], max_pixels=options["max_pixels"])
        except ImageError as exc:
            out.append((frame_candidate, Reject(text_name(str(frame_candidate[0])), exc.reason)))
            continue
        out.append((frame_candidate, (rgb.shape[:2], digest, fingerprint(rgb), [], None)))
    return out


def _sha1_file(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_paths(manifest: str | Path) -> tuple[list[Path], list[Reject]]:
    """The image paths a CSV manifest lists (``path`` column, relative to the CSV), as discovery reads them.

    For tools that take the same manifests as training but need no labels (``msbt predict``): rows
    without a path, missing files and repeated files become rejects, as in :func:`discover`.
    """
    candidates, rejects, _, _ = _from_manifest(Path(manifest), ())
    return [c[0] for c in candidates], rejects


def refuse_output_in_inputs(out: str | Path, inputs: Sequence[str | Path], option: str) -> None:
    """Refuse an output path of a command that lies inside a folder it reads, or is a file it reads, or names an
    image file: msbt never writes into a data folder (a CSV there replaced a scan it had just read; heatmap PNGs
    there were scored as images by the next predict; split files in a class folder became its rejects).

    Raises:
        DataError: naming the option, the path and the input it falls in.
    """
    # realpath, not resolve(): an input may be a symbolic link loop (rejected by the scan; resolve() raises)
    target = Path(os.path.realpath(Path(out).expanduser()))
    for source in inputs:
        folder = Path(os.path.realpath(Path(source).expanduser()))
        if target == folder or (folder.is_dir() and folder in target.parents):
            raise DataError(f"{option} {out}: inside the data being read ({source}); msbt never writes into a data "
                            "folder: choose a path outside it")
        # a manifest's images live in folders of their own; its relative rows are read against the folder the
        # manifest is named in (a symbolic link's, as the scan reads them), not the link's target
        for images in _manifest_folders(Path(source).expanduser()):
            if target == images or images in target.parents:
                raise DataError(f"{option} {out}: inside {images}, a folder of images that {source} lists; msbt "
                                "never writes into a data folder: choose a path outside it")
    if target.is_file() and target.suffix.lower() in IMAGE_EXTENSIONS | {".dcm"}:
        raise DataError(f"{option} {out}: an image file is there; choose another path")


def _manifest_folders(source: Path) -> frozenset[Path]:
    """The folders holding the images a CSV manifest lists (none for anything else, or a manifest that cannot be
    read: the scan reports that). Only the distinct folders are resolved: one call on a 100k-row manifest took
    8.6 s when every row's file was checked, as the scan checks them."""
    if not (source.suffix.lower() == ".csv" and source.is_file()):
        return frozenset()
    stat = source.stat()
    return _manifest_folders_of(str(source), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _manifest_folders_of(source: str, mtime_ns: int, size: int) -> frozenset[Path]:
    # keyed by the manifest's time and size too, so an edited manifest is read again; a command asks once per
    # output option (predict's --out and --heatmaps)
    manifest = Path(source)
    try:
        _, rows = _read_manifest_rows(manifest)
    except (DataError, OSError):
        return frozenset()
    folders = {os.path.dirname(os.path.join(manifest.parent, os.path.expanduser(row["path"])))
               for row in rows if row.get("path")}
    return frozenset(Path(os.path.realpath(folder)) for folder in folders)


def write_rejects(rejects: Sequence[Reject], path: str | Path) -> Path:
    """Write the rejects manifest (`path,reason`) so nothing is lost silently; atomically (temp + rename).

    Paths are text (`text_name`): a file name that is not UTF-8 appears with `\\xNN` escapes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows((text_name(r.path), r.reason) for r in rejects)
    return path
