"""Atomic file writes: a file is either its old content or its whole new content, never a fragment.

Every file a run writes goes through here. The new content is written to a temporary file in the same
folder (so ``os.replace`` is a rename on one file system, atomic on POSIX), flushed and fsynced, then
renamed over the target. When the write fails (a full disk: ENOSPC, a quota, an interrupt) the temporary
file is removed and the target keeps what it held, so a rerun never meets a 0-byte ``split.csv`` or
``model.keras`` that looks finished. Ground layer: standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure remove it.

    The temporary name keeps ``path``'s suffix (Keras' ``model.save`` insists on ``.keras``) and starts
    with a dot, so a folder listing or glob for the real name never picks it up.

    Args:
        path: The file to (re)write; its folder is created.

    Yields:
        The temporary path to write the whole content to (a writer that writes nothing fails here).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{path}: the writer left no file to put in place")
        _fsync(tmp)
        # mkstemp makes the file 0600; give it the mode a plain open() would (or the old file's), so
        # results on shared storage stay readable by whoever could read them before
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and err.errno is not None and err.filename is None:
            # a failed write names no file ("[Errno 28] No space left on device" was all a full disk printed)
            err.filename = str(path)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` that replaces ``path`` only once the ``with`` block ends without error.

    Args:
        path: The file to (re)write.
        mode: ``"w"`` or ``"wb"`` (plus ``open`` keywords such as ``newline=""``).
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open writes a whole file: mode must contain 'w', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as handle:
            yield handle


def write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically; return ``path``."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically; return ``path``."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back (a moment in which a
    # file made by another thread would get 0o022, the usual value anyway).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    # Data on disk before the rename: after a power cut the new name never points at missing blocks.
    # A full disk can also surface here (delayed allocation), which must fail the write, not the rename.
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def read_json(path: str | Path):
    """The JSON in ``path``, or None when it is missing or unreadable (a record that may not exist yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_json_object(path: str | Path, what: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in ``path`` (a record msbt wrote and now relies on); ``error`` naming the file when it is
    not JSON, not UTF-8, or not an object (a damaged or hand-edited file gave an AttributeError or a bare codec
    error where it was read).

    Args:
        what: What the file should be, for the message (e.g. "a checkpoint manifest").
        error: The exception type to raise (the caller's own, e.g. ``CheckpointError``).
    """
    try:
        data = Path(path).read_bytes()
        value = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err}){_full_disk_hint(Path(path), data, err)}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: not {what} (a JSON object was expected, found {type(value).__name__})")
    return value


FULL_DISK_BYTES = 1 << 20  # less free space than this under a file cut short reads as the reason


def _full_disk_hint(path: Path, data: bytes, err: ValueError) -> str:
    """Why a JSON file may be cut short: it ends where its parse failed (empty, or mid-object) and it is on a full disk.
    Files msbt writes itself are atomic (never half-written); a library's (Tune's ``params.json``) may not be."""
    if isinstance(err, json.JSONDecodeError):
        at_end = err.pos >= len(err.doc.rstrip())
    else:  # UnicodeDecodeError: a multi-byte character cut at the end
        at_end = err.end >= len(data)
    if not at_end:
        return ""
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return ""
    free = stats.f_bavail * stats.f_frsize
    if free >= FULL_DISK_BYTES:
        return ""
    return f"; it is cut short and its disk is full ({free} bytes free): free space, then run the step again"
