"""The Parquet store: the one module that writes, opens and reads a store's files.

A store is a folder of model-ready images, one row each (a cell patch, or a prepared ultrasound image)::

    store.json              identity: format, kind, image shape, class names, preparation settings,
                            files per chunk and a hash of the split rows it was made from
    chunk-00000/*.parquet   rows of `files_per_chunk` source files; `_DONE.json` once the chunk is whole
                            (its source files, where it was written, its Parquet files and their rows)
    summary.json            rows per split and class, sources that gave no rows (``empty_files``: each one's
                            class, split and, when reading it failed, why), seconds, where the chunks were
                            written (``where``: "ray", "local" or "local+ray"; each chunk's `_DONE.json`)

Columns: ``image`` (fixed-size binary: raw uint8 bytes of one ``image_shape`` array, C order), ``label``,
``label_index``, ``split``, ``source`` (the source file's path relative to its data root), and ``box``
(microscope: the patch's window in its field) or ``group`` (ultrasound: the lesion group).

Writing runs a per-file function over the split's rows, chunk by chunk, either with Ray Data (the workers
write Parquet directly, so no image passes through the driver) or, for a collection too small to repay
Ray's fixed costs, in threads of this process (``where="local"``, msbt.data.preprocess chooses); the files
hold the same rows either way (tested). A rerun with the same identity resumes
(finished chunks are kept) or reuses a complete store; a different identity is refused unless
``on_existing: overwrite``. Two runs are never mixed in one store.

Everything else opens a store with :meth:`Store.open` (identity, shape and classes read once) and reads
it with :meth:`Store.read`, :meth:`Store.read_tables`, :meth:`Store.sample` or with Ray Data
(:meth:`Store.ray_dataset`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from msbt.atomicio import read_json_object, write_text
from msbt.console import progress

log = logging.getLogger(__name__)

STORE_FORMAT = 1
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"  # Store.ray_dataset
STORE_FILE = "store.json"
SUMMARY_FILE = "summary.json"
DONE_FILE = "_DONE.json"
META_COLUMNS = ["label", "label_index", "split", "source"]
# How a chunk's Parquet files are written, by Ray Data and by the in-process writer alike. lz4: a third of
# the size of raw pixels at a few ms per field; no dictionary or statistics on the image column, which would
# only cost time.
PARQUET_OPTIONS = {"compression": "lz4", "use_dictionary": ["label", "split", "source"],
                   "write_statistics": ["label", "split", "source"]}


def _identity_problem(identity) -> str | None:
    """What is wrong with a ``store.json``'s content, or None. Each entry is read when a step needs it (the
    properties below say so if one is missing); one that is there must make sense (a negative image size
    reached OpenCV's resize)."""
    if not isinstance(identity, dict):
        return f"not a store identity (a JSON object was expected, found {type(identity).__name__})"

    def size(n) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n > 0

    shape, classes, settings = (identity.get("image_shape", [1, 1, 1]), identity.get("classes", []),
                                identity.get("settings", {}))
    checks = [
        ("kind", isinstance(identity.get("kind"), str)),
        ("image_shape", isinstance(shape, list) and len(shape) == 3 and all(map(size, shape))),
        ("classes", isinstance(classes, list) and all(isinstance(c, str) for c in classes)),
        ("settings", isinstance(settings, dict) and size(settings.get("image_size", 1))),
    ]
    bad = [name for name, ok in checks if not ok]
    return f"missing or invalid {', '.join(bad)}" if bad else None


class StoreError(ValueError):
    """A store cannot be opened, reused or resumed; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------
# Rows: the image column


def arrow_batch(out: dict[str, list], image_shape: tuple[int, ...]):
    """The Arrow table a per-file function returns: its rows as the store's columns.

    Images go in as one fixed-size binary value per row (raw uint8 bytes in C order), built zero-copy
    from one contiguous buffer. Ray's tensor columns are stored in Parquet as lists of single bytes,
    which made writing cost a third as much as cutting the patches (measured: benchmarks/preprocess.py).

    Args:
        out: Column -> list of values; ``image`` holds arrays of ``image_shape``, ``box`` [x, y, w, h].
        image_shape: The shape of every image (used when there are none).
    """
    import pyarrow as pa

    listed = out.pop("image")
    images = np.stack(listed) if listed else np.zeros((0, *image_shape), np.uint8)
    size = int(np.prod(image_shape))
    columns = {"image": pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(size), len(images), [None, pa.py_buffer(np.ascontiguousarray(images))])}
    for key, values in out.items():
        if key == "box":
            flat = np.asarray(values, dtype=np.int32).reshape(-1)
            columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), 4)
        elif key == "label_index":
            columns[key] = pa.array(np.asarray(values, dtype=np.int64))
        else:
            columns[key] = pa.array([str(v) for v in values], pa.string())
    return pa.table(columns)


def decode_images(column, shape: tuple[int, ...]) -> np.ndarray:
    """(N, *shape) uint8 view of a fixed-size binary image column (pyarrow Array or ChunkedArray)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, *shape), np.uint8)
    data = np.frombuffer(column.buffers()[1], np.uint8, count=len(column) * int(np.prod(shape)),
                         offset=column.offset * int(np.prod(shape)))
    return data.reshape(len(column), *shape)


# ---------------------------------------------------------------------------------------------------
# Opening and reading


def store_files(path: str | Path) -> list[str]:
    """The Parquet files of a store, in a stable order."""
    return sorted(str(p) for p in Path(path).glob("chunk-*/*.parquet"))


@dataclass(frozen=True)
class Store:
    """An opened store: its identity, read once from ``store.json``."""

    path: Path
    identity: dict

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open a store folder.

        Raises:
            StoreError: No ``store.json`` there (not a store), or one that cannot be read.
        """
        path = Path(path).expanduser().resolve()
        marker = path / STORE_FILE
        try:
            identity = json.loads(marker.read_text())
        except FileNotFoundError:
            raise StoreError(f"{path}: not a store (no {STORE_FILE}); build it with `msbt preprocess`") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{marker}: unreadable ({err}); rebuild the store "
                             "(preprocess.on_existing: overwrite)") from None
        problem = _identity_problem(identity)
        if problem:
            raise StoreError(f"{marker}: {problem}; rebuild the store (preprocess.on_existing: overwrite)")
        return cls(path, identity)

    @property
    def kind(self) -> str:
        return self.identity["kind"]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self._recorded("image_shape"))

    @property
    def classes(self) -> list[str]:
        """Class names in label-index order (recorded when the store was written)."""
        return list(self._recorded("classes"))

    def classes_without_rows(self, split: str) -> list[str]:
        """The store's classes with no row in ``split`` (from ``summary.json``): fields that gave no patches (no
        cells found: an empty or confluent field) can leave a class without any, while its files were split."""
        rows = self.summary().rows.get(split, {})
        return [c for c in self.classes if not rows.get(c)]

    @property
    def settings(self) -> dict:
        """The preparation settings the rows were made with (the per-file function's arguments)."""
        return dict(self._recorded("settings"))

    def _recorded(self, key: str):
        if key not in self.identity:
            raise StoreError(f"{self.path / STORE_FILE}: no {key!r} recorded; rebuild the store "
                             "(preprocess.on_existing: overwrite)")
        return self.identity[key]

    def fingerprint(self) -> tuple[str, str]:
        """``(data_fingerprint, split_id)`` for checkpoint manifests: hashes of the identity and rows."""
        digest = hashlib.sha1(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        return digest, str(self.identity.get("items", ""))[:16]

    def files(self) -> list[str]:
        return store_files(self.path)

    def data_files(self) -> list[str]:
        """Its Parquet files, for a step that reads rows: a store with none is refused here.

        Raises:
            StoreError: No Parquet file (a ``store.json`` without rows: an emptied or hand-made folder), or a file
                missing or added since the store was written (:meth:`damage`; existence only, no footer read).
        """
        files = self.intact_files()
        if not files:
            raise StoreError(f"{self.path}: no Parquet files (not a store, or an empty one)")
        return files

    def intact_files(self) -> list[str]:
        """Its Parquet files (none for an empty store), for every reader of rows.

        Raises:
            StoreError: A file missing or added since the store was written (:meth:`damage`, existence only).
        """
        lost = self.damage()
        if lost:
            more = f" (and {len(lost) - 3} more)" if len(lost) > 3 else ""
            remedy = ("Rerun the experiment that made it (crossval, compare, ...), which writes it again from its "
                      "run's store" if "derived_from" in self.identity else
                      "The run's next step (run, stage1, stage2, evaluate, ...) writes those chunks again from the "
                      "source images; or rebuild the store (preprocess.on_existing: overwrite)")
            raise StoreError(f"{self.path}: not as it was written: {'; '.join(lost[:3])}{more}. {remedy}")
        return self.files()

    def memory_bytes(self) -> int:
        """The size of its rows in memory, uncompressed (from the Parquet footers; pixels compress well)."""
        import pyarrow.parquet as pq

        total = 0
        for f in self.intact_files():
            try:
                meta = pq.read_metadata(f)
            except Exception as err:  # pyarrow's ArrowInvalid/OSError for a truncated or foreign file
                raise StoreError(f"{f}: unreadable ({err}); the run's next step writes its chunk again") from None
            total += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        return total

    def read_tables(self, columns: list[str] | None = None, split: str | None = None) -> list:
        """Some columns of one split (or of every row), as one ``pyarrow.Table`` per Parquet file, in file
        order and as stored (``image`` still encoded); files without such rows are left out.

        Raises:
            StoreError: No Parquet file (:meth:`data_files`), or two files disagree on the columns' types (names
                the file).
        """
        import pyarrow.dataset as pads

        flt = pads.field("split") == split if split else None
        tables, schema = [], None
        for f in self.data_files():
            table = pads.dataset(f, format="parquet").to_table(columns=columns, filter=flt)
            if schema is not None and not table.schema.equals(schema):
                raise StoreError(f"{f}: its columns differ from the store's other files ({table.schema} vs {schema})")
            schema = table.schema
            if table.num_rows:
                tables.append(table)
        return tables

    def ray_dataset(self, columns: list[str]):
        """Some columns of every row as a (lazy) Ray Dataset: Ray Data's parallel Parquet read of the files.

        Ray Data 2.60 reads the files' footers first, in ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` actors per read,
        32 by default, each a fresh process (about 1.5 CPU-s to start) that is ended after the read. A store
        has one file per source chunk on one filesystem, and each such actor reads footers 128 at a time
        (``RAY_DATA_PARQUET_FOOTER_IO_CONCURRENCY``), so msbt asks for one unless the variable is set
        (process-wide: Ray Data reads it when it plans the read). Measured on 2 CPUs, three reads of a
        small store's two splits (``benchmarks/read_store.py``): docs/training.md.

        Raises:
            StoreError: No Parquet file (:meth:`data_files`), said before Ray Data plans a read of nothing.
        """
        files = self.data_files()  # before Ray Data is imported or told anything
        import ray.data

        os.environ.setdefault(FOOTER_ACTORS_ENV, "1")
        return ray.data.read_parquet(files, columns=columns)

    def columns(self) -> list[str]:
        """The column names of the rows (from the first Parquet file's schema; none for an empty store)."""
        import pyarrow.parquet as pq

        files = self.files()
        return list(pq.read_schema(files[0]).names) if files else []

    def is_complete(self) -> bool:
        """Every chunk written whole (the summary is written after the last chunk), and nothing lost since
        (:meth:`damage`, row counts included)."""
        return (self.path / SUMMARY_FILE).is_file() and all(
            _read_done(chunk) is not None for chunk in self.path.glob("chunk-*")) and not self.damage(rows=True)

    def damage(self, rows: bool = False) -> list[str]:
        """What the store has lost or gained since it was written, one line each; empty when it is as written.

        Each finished chunk's ``_DONE.json`` lists its Parquet files and their rows: a file listed and not there
        (deleted, or lost in a copy of the run folder) or there and not listed is named, and with ``rows`` a file
        whose footer counts other rows (replaced, or truncated: unreadable). A whole chunk folder missing shows
        as fewer source files in the chunks than ``summary.json`` counts. Chunks written before they listed their
        files (2026-12-06) are checked, with ``rows``, by the store's total rows against ``summary.json``.
        Without these checks a run trained and was scored on whatever rows were left, and said nothing.
        """
        problems, files_in_chunks, unlisted = [], 0, False
        for chunk in sorted(self.path.glob("chunk-*")):
            done = _read_done(chunk)
            if done is None:
                continue  # unfinished: is_complete's matter (a resumed write redoes it)
            files = done.get("files")
            files_in_chunks += files if isinstance(files, int) else 0
            unlisted = unlisted or not isinstance(done.get("parquet"), dict)
            problems += _chunk_damage(chunk, done, rows)
        summarised = _read_summary(self.path).get("files")
        # (a fold store written before chunks listed their files counted rows there, not source files)
        if isinstance(summarised, int) and files_in_chunks < summarised and not (
                unlisted and "derived_from" in self.identity):
            problems.append(f"its chunks hold {files_in_chunks} of the {summarised} source files {SUMMARY_FILE} "
                            "counts (a chunk folder missing, or unfinished)")
        if rows and unlisted and not problems and (legacy := _unlisted_rows_problem(self.path)):
            problems.append(legacy)
        return problems

    def summary(self) -> "StoreSummary":
        """The summary written with the store (rows per split and class), as a StoreSummary.

        Raises:
            StoreError: ``summary.json`` missing, not a JSON object, or without one of its keys (naming the file).
        """
        file = self.path / SUMMARY_FILE
        try:
            data = read_json_object(file, "a store summary", StoreError)
        except OSError as err:
            raise StoreError(f"{file}: unreadable ({err}); rebuild the store (preprocess.on_existing: overwrite)") from None
        missing = [k for k in ("kind", "files", "rows", "empty_sources") if k not in data]
        if missing or not isinstance(data["rows"], dict):
            raise StoreError(f"{file}: no {missing[0] if missing else 'rows per split'!r} recorded (the file is damaged "
                             "or was edited); rebuild the store (preprocess.on_existing: overwrite)")
        return StoreSummary(self.path, data["kind"], data["files"], data["rows"], data["empty_sources"],
                            0.0, data.get("reused_chunks", 0), reused=True, source_files=data.get("source_files"),
                            empty_files=data.get("empty_files") or {})

    def read(self, columns: list[str] | None = None, split: str | None = None) -> dict[str, np.ndarray]:
        """Read the store (or some columns, one split) into numpy arrays; for small stores and tests.

        Returns:
            Column name -> array; ``image`` as (N, H, W, 3) uint8, ``box`` as (N, 4) int32.
        """
        import pyarrow.dataset as pads

        files = self.intact_files()
        if not files:
            return {c: np.zeros(0) for c in (columns or [])}
        flt = pads.field("split") == split if split else None
        table = pads.dataset(files, format="parquet").to_table(columns=columns, filter=flt)
        out = {}
        for name in table.column_names:
            if name == "image":
                out[name] = decode_images(table[name], self.image_shape)
            elif name == "box":
                out[name] = np.asarray(table[name].combine_chunks().flatten(), np.int32).reshape(-1, 4)
            else:
                out[name] = table[name].to_numpy()
        return out

    def sample_split(self, split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(images, label indices)`` of up to ``n`` rows of one split, drawn at random (seeded) and as
        evenly over the classes as the split allows; only the chosen rows' images are decoded."""
        import pyarrow.dataset as pads

        files = self.intact_files()
        if not files:
            return np.zeros((0, *self.image_shape), np.uint8), np.zeros(0, np.int64)
        table = pads.dataset(files, format="parquet").to_table(columns=["image", "label_index"],
                                                               filter=pads.field("split") == split)
        labels = table["label_index"].to_numpy()
        rng = np.random.default_rng(seed)
        by_class = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
        chosen: list[int] = []
        while len(chosen) < n and any(by_class):  # one of each class in turn
            for rows in by_class:
                if rows and len(chosen) < n:
                    chosen.append(rows.pop())
        picked = table.take(sorted(chosen))
        return decode_images(picked["image"], self.image_shape), picked["label_index"].to_numpy().astype(np.int64)

    def sample(self, label: str, n: int) -> np.ndarray:
        """Up to ``n`` images of one class, reading only the rows needed."""
        import pyarrow.dataset as pads

        files = self.intact_files()
        if not files:
            return np.zeros((0, *self.image_shape), np.uint8)
        table = pads.dataset(files, format="parquet").head(n, columns=["image"],
                                                            filter=pads.field("label") == label)
        return decode_images(table["image"], self.image_shape)


def read_store(path: str | Path, columns: list[str] | None = None, split: str | None = None) -> dict[str, np.ndarray]:
    """``Store.open(path).read(columns, split)``."""
    return Store.open(path).read(columns, split)


# ---------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class StoreSummary:
    path: Path
    kind: str
    files: int
    rows: dict  # split -> class -> rows
    empty_sources: list  # source files that produced no rows
    seconds: float
    reused_chunks: int
    reused: bool = False  # opened as it was, nothing run
    where: str = ""  # "ray" (Ray Data), "local" (driver threads) or "local+ray", from the chunks' _DONE.json; "" for
    # copies (write_resplit) and stores written before it was recorded
    source_files: int | None = None  # distinct files, where frames of multi-frame files (cine loops) made
    # ``files`` (one a frame) larger; None: each item is a file of its own
    # source -> {"label", "split", "unreadable"} for each of ``empty_sources``: "unreadable" is why reading the file
    # failed when the store was written ("" when it read: it gave no rows of itself, a field without cells); empty
    # for stores written before it was recorded (2026-12-07) and for re-split copies
    empty_files: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "files": self.files,
            "rows": self.rows,
            "empty_sources": self.empty_sources,
            "seconds": round(self.seconds, 2),
            "reused_chunks": self.reused_chunks,
            **({"where": self.where} if self.where else {}),
            **({"source_files": self.source_files} if self.source_files is not None else {}),
            **({"empty_files": self.empty_files} if self.empty_files else {}),
        }

    def unreadable(self) -> dict[str, str]:
        """The sources that gave no rows because they could not be read, with the reason (from ``empty_files``)."""
        return {source: e["unreadable"] for source, e in self.empty_files.items() if e.get("unreadable")}

    def empty_in(self, split: str, classes: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """The files of ``classes`` in ``split`` that gave no rows: ``(read but gave none, {unreadable: why})``.

        Both empty for a store that did not record ``empty_files``."""
        mine = {s: e for s, e in self.empty_files.items() if e.get("split") == split and e.get("label") in classes}
        return ([s for s, e in mine.items() if not e.get("unreadable")],
                {s: e["unreadable"] for s, e in mine.items() if e.get("unreadable")})


def _multi_frame_files(items: Sequence[Mapping]) -> int | None:
    """How many files the items come from, when some are frames of one multi-frame file (else None)."""
    from msbt.images.dicom import split_ref

    if not any("#frame=" in str(item["source"]) for item in items):
        return None
    files = {split_ref(item["source"])[0] if "#frame=" in str(item["source"]) else item["source"] for item in items}
    return len(files) if len(files) != len(items) else None


def identity(kind: str, items: Sequence[Mapping], settings: dict, files_per_chunk: int,
             image_shape: tuple[int, ...], classes: Sequence[str]) -> dict:
    """What a store is made from; two stores with equal identities hold the same rows.

    Args:
        kind: "microscope" or "ultrasound".
        items: The split rows the store is made from (``source``, ``label``, ``split``, ``seed``).
        settings: The per-file function's keyword arguments (the preparation settings).
        files_per_chunk: Chunking (a store resumes chunk by chunk).
        image_shape: Every image's shape.
        classes: Class names in label-index order.
    """
    listing = hashlib.sha1(json.dumps(
        [[i["source"], i["label"], i["split"], i["seed"]] for i in items]).encode()).hexdigest()
    return {"format": STORE_FORMAT, "kind": kind, "image_shape": list(image_shape), "classes": list(classes),
            "settings": settings, "files_per_chunk": files_per_chunk, "items": listing}


def write_store(kind: str, items: list[dict], out: str | Path, fn: Callable, fn_kwargs: dict, *,
                image_shape: tuple[int, ...], classes: Sequence[str], files_per_chunk: int,
                files_per_task: int, cpus_per_task: float, on_existing: str, where: str = "ray",
                why_empty: Callable[[Mapping], str] | None = None) -> StoreSummary:
    """Run ``fn`` over ``items``, chunk by chunk, into a store at ``out``.

    Args:
        kind: "microscope" or "ultrasound" (recorded in the identity).
        items: Split rows (msbt.data.preprocess.split_items).
        out: The store folder.
        fn: Per-batch function returning :func:`arrow_batch` tables.
        fn_kwargs: Its keyword arguments; part of the identity.
        image_shape, classes: Recorded in ``store.json`` for readers.
        files_per_chunk, files_per_task, cpus_per_task: Chunking and Ray Data task sizing.
        on_existing: "resume" (default behaviour: reuse a complete store, finish an interrupted one),
            "overwrite", "refuse", or "replace" (as "resume", but a store of other settings or another split is
            rebuilt, not refused: for a split the run has just made anew).
        where: "ray" (Ray Data tasks; Ray initialised) or "local" (threads of this process, one Parquet
            file per ``files_per_task`` files).
        why_empty: Given a split row whose file gave no rows, why reading it fails ("" when it reads); asked in
            this process for those rows only, and recorded as ``empty_files`` (a Ray task's skip reaches only the
            workers' log, and an empty field and an unreadable one look alike in the rows).

    Returns:
        StoreSummary with rows per split and class, read back from the written Parquet.
    """
    if where not in ("ray", "local"):
        raise ValueError(f"where: expected 'ray' or 'local', got {where!r}")
    out = Path(out)
    started = time.perf_counter()
    ident = identity(kind, items, fn_kwargs, files_per_chunk, image_shape, classes)
    _prepare_folder(out, ident, on_existing)
    chunks = [items[i : i + files_per_chunk] for i in range(0, len(items), files_per_chunk)]
    reused = 0
    # a store written before chunks listed their files, that lost rows since: which chunk is not known, so all
    # of its unlisted chunks are written again
    unlisted_lost = _unlisted_rows_problem(out) if (out / SUMMARY_FILE).is_file() else None
    # The bar starts with the first chunk to write: a store whose every chunk is complete draws none (its reuse is
    # the store line's, and a bar racing to 24/24 said the store was being written again)
    bar, reused_files = None, 0
    for index, chunk in enumerate(chunks):
        folder = out / f"chunk-{index:05d}"
        done = _read_done(folder)
        if done is not None:
            lost = _chunk_damage(folder, done, rows=True)
            if unlisted_lost and not isinstance(done.get("parquet"), dict):
                lost = [unlisted_lost]
            if not lost:
                reused += 1
                reused_files += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
                continue
            log.warning("%s store: %s; writing chunk %d/%d again", kind, "; ".join(lost), index + 1, len(chunks))
        if bar is None:
            bar = progress(total=len(items), desc=f"{kind} store", unit="field" if kind == "microscope" else "image")
            bar.update(reused_files)
        shutil.rmtree(folder, ignore_errors=True)  # a chunk interrupted mid-write is redone whole
        if where == "local":
            _write_chunk_here(chunk, folder, fn, fn_kwargs, files_per_task, bar)
        else:
            _write_chunk_with_ray(chunk, folder, fn, fn_kwargs, files_per_task, cpus_per_task)
            bar.update(len(chunk))
        folder.mkdir(parents=True, exist_ok=True)  # a chunk with no rows writes no files
        _write_json(folder / DONE_FILE, {"files": len(chunk), "where": where, "parquet": _listing(folder)})
        log.info("%s store: chunk %d/%d done (%d files, %s)", kind, index + 1, len(chunks), len(chunk),
                 "Ray Data" if where == "ray" else "driver threads")
    if bar is not None:
        bar.close()
    rows, empty = _count(out, items)
    summary = StoreSummary(out, kind, len(items), rows, empty, time.perf_counter() - started, reused,
                           reused=bool(chunks) and reused == len(chunks),  # every chunk complete: nothing written
                           where=_written_where(out), source_files=_multi_frame_files(items),
                           empty_files=_empty_files(items, empty, why_empty))
    _write_json(out / SUMMARY_FILE, summary.as_dict())
    return summary


def _empty_files(items: Sequence[Mapping], empty: list, why_empty: Callable[[Mapping], str] | None) -> dict:
    """``StoreSummary.empty_files`` of the sources that gave no rows; {} without ``why_empty``."""
    if why_empty is None or not empty:
        return {}
    by_source = {item["source"]: item for item in items}
    return {source: {"label": str(by_source[source]["label"]), "split": str(by_source[source]["split"]),
                     "unreadable": why_empty(by_source[source])} for source in empty}


def _written_where(out: Path) -> str:
    """Where the store's chunks were written, from their _DONE.json ("" where none recorded it)."""
    found = {json.loads((chunk / DONE_FILE).read_text()).get("where") for chunk in out.glob("chunk-*")}
    return "+".join(sorted(w for w in found if w))


def _write_chunk_with_ray(chunk: list[dict], folder: Path, fn: Callable, fn_kwargs: dict, files_per_task: int,
                          cpus_per_task: float) -> None:
    import ray

    # One task per `files_per_task` files: long enough (about 2 s for 1000 px fields) that Ray's per-task
    # cost is small, short enough that the last tasks finish together.
    blocks = max(1, -(-len(chunk) // files_per_task))
    dataset = ray.data.from_items(chunk, override_num_blocks=blocks)
    dataset = dataset.map_batches(fn, fn_kwargs=fn_kwargs, batch_size=1, num_cpus=cpus_per_task, batch_format="numpy")
    try:
        dataset.write_parquet(str(folder), **PARQUET_OPTIONS)
    except ray.exceptions.RayTaskError as err:
        # A task that could not write (a full disk) reached the command as "ray::MapBatches(...)->Write() (pid=...)"
        # and pyarrow's "[Errno 28] Error writing bytes to file", naming no folder: the folder and the reason instead
        # (the cause's own filename, where set, is Ray Data's retry notice, not a file)
        cause = err.cause
        if isinstance(cause, OSError) and cause.errno:
            raise OSError(cause.errno, os.strerror(cause.errno), str(folder)) from err
        raise


def _write_chunk_here(chunk: list[dict], folder: Path, fn: Callable, fn_kwargs: dict, files_per_task: int,
                      bar) -> None:
    """The chunk in this process: ``fn`` on one file at a time (the batch Ray Data would hand it) in a thread per
    usable core, each part of at most ``files_per_task`` files written as one Parquet file (so memory holds a few
    parts, not the chunk). Parts are cut so that every thread has one even for a chunk of a few files. Most of the
    image work (OpenCV, numpy, much of scikit-image) runs without the GIL: two threads reached 0.97 of two
    single-process loops (docs/preprocess.md, "Benchmark"). OpenCV's own pool is process-wide: held at one thread
    while the threads run (as in a Ray task) and given back after."""
    import cv2
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    # The cores this process may use (its affinity; a container's CPU quota is not seen, as os.cpu_count's is not)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    size = max(1, min(files_per_task, -(-len(chunk) // cores)))
    parts = [chunk[i : i + size] for i in range(0, len(chunk), size)]

    def write(number: int) -> int:
        tables = [fn({key: np.asarray([value]) for key, value in item.items()}, **fn_kwargs)
                  for item in parts[number]]
        table = pa.concat_tables(tables)
        if table.num_rows:
            pq.write_table(table, folder / f"part-{number:05d}.parquet", **PARQUET_OPTIONS)
        return len(parts[number])

    opencv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    pool = ThreadPoolExecutor(max_workers=min(cores, len(parts)))
    try:
        for done in pool.map(write, range(len(parts))):
            bar.update(done)
    except BaseException:
        # Ctrl-C or an error: the queued parts are dropped at once; the running ones (one per thread) are waited
        # for, so none writes into the chunk folder after this call has returned (a retry redoes the chunk whole).
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        cv2.setNumThreads(opencv_threads)
    pool.shutdown()


def matches(out: str | Path, kind: str, items: Sequence[Mapping], settings: dict, files_per_chunk: int,
            image_shape: tuple[int, ...], classes: Sequence[str]) -> bool:
    """Whether a complete store with exactly this identity is at ``out`` (reusable without any work)."""
    try:
        store = Store.open(out)
    except StoreError:
        return False
    wanted = json.loads(json.dumps(identity(kind, items, settings, files_per_chunk, image_shape, classes)))
    return store.identity == wanted and store.is_complete()


def write_resplit(store: str | Path, roles: Mapping[str, str], out: str | Path) -> Path:
    """Copy a store keeping the rows of the sources in ``roles``, their split rewritten to the role.

    Cross-validation's fold stores: the images are the store's own (no file is read or prepared again).

    Args:
        store: A store (one or more rows per source).
        roles: source -> "train" | "val" | "test"; sources not listed are left out.
        out: The new store folder (replaced if it exists).

    Returns:
        ``out``: a store read like any other; its ``store.json`` records the store it came from and
        hashes the new assignment.
    """
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    source_store, out = Store.open(store), Path(out)
    files = source_store.data_files()
    table = pads.dataset(files, format="parquet").to_table()
    sources = table["source"].to_pylist()
    keep = [s in roles for s in sources]
    table = table.filter(pa.array(keep))
    splits = pa.array([roles[s] for s, k in zip(sources, keep) if k], pa.string())
    table = table.set_column(table.column_names.index("split"), "split", splits)
    if out.exists():
        shutil.rmtree(out)
    (out / "chunk-00000").mkdir(parents=True)
    pq.write_table(table, out / "chunk-00000" / "part-00000.parquet", compression="lz4")
    _write_json(out / "chunk-00000" / DONE_FILE, {"files": len(roles), "parquet": _listing(out / "chunk-00000")})
    listing = hashlib.sha1(json.dumps(sorted(roles.items())).encode()).hexdigest()
    ident = {**source_store.identity, "items": listing,
             "derived_from": {"store": str(source_store.path), "items": source_store.identity.get("items")}}
    _write_json(out / STORE_FILE, ident)
    rows, _ = _count(out, [])
    _write_json(out / SUMMARY_FILE, StoreSummary(out, source_store.kind, len(set(roles)), rows, [], 0.0, 0).as_dict())
    return out


def _listing(chunk: Path) -> dict[str, int]:
    """A finished chunk's Parquet files and their rows (footers only), as its ``_DONE.json`` records them."""
    import pyarrow.parquet as pq

    return {f.name: pq.read_metadata(f).num_rows for f in sorted(chunk.glob("*.parquet"))}


def _read_done(chunk: Path) -> dict | None:
    """A chunk's ``_DONE.json``; None when it has none (unfinished) or one that is not a JSON object (redone)."""
    try:
        done = json.loads((chunk / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) else None


def _read_summary(path: Path) -> dict:
    """A store's ``summary.json`` as a dict; empty when missing or unreadable."""
    try:
        summary = json.loads((path / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _unlisted_rows_problem(path: Path) -> str | None:
    """For a store with chunks written before chunks listed their files: its Parquet files' rows (footers)
    against the rows ``summary.json`` counts, when they differ; else None (also when every chunk lists its files)."""
    import pyarrow.parquet as pq

    chunks = [done for chunk in path.glob("chunk-*") if (done := _read_done(chunk)) is not None]
    counted = _read_summary(path).get("rows")
    if not isinstance(counted, dict) or not all(isinstance(per_class, dict) for per_class in counted.values()) or \
            all(isinstance(done.get("parquet"), dict) for done in chunks):
        return None
    try:
        held = sum(pq.read_metadata(f).num_rows for f in store_files(path))
    except Exception as err:  # a truncated or foreign file
        return f"a Parquet file is unreadable ({err})"
    total = sum(sum(per_class.values()) for per_class in counted.values())
    if held == total:
        return None
    return (f"its Parquet files hold {held} rows, {SUMMARY_FILE} counts {total} (a file lost or changed; its chunks "
            "were written before they listed their files, so which one is not known)")


def _chunk_damage(chunk: Path, done: dict, rows: bool) -> list[str]:
    """What a finished chunk lost or gained since its ``_DONE.json`` listed its files (Store.damage)."""
    import pyarrow.parquet as pq

    listed = done.get("parquet")
    if not isinstance(listed, dict):
        return []  # written before chunks listed their files
    present = {f.name for f in chunk.glob("*.parquet")}
    problems = [f"{chunk.name}/{name} is missing" for name in sorted(set(listed) - present)]
    problems += [f"{chunk.name}/{name} was not written with the store" for name in sorted(present - set(listed))]
    for name in sorted(set(listed) & present) if rows else ():
        try:
            found = pq.read_metadata(chunk / name).num_rows
        except Exception as err:  # pyarrow's ArrowInvalid/OSError for a truncated or foreign file
            problems.append(f"{chunk.name}/{name} is unreadable ({err})")
            continue
        if found != listed[name]:
            problems.append(f"{chunk.name}/{name} holds {found} rows, written with {listed[name]}")
    return problems


def _write_json(path: Path, data) -> None:
    """Write whole or not at all (msbt.atomicio)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def _prepare_folder(out: Path, ident: dict, on_existing: str) -> None:
    marker = out / STORE_FILE
    exists = out.exists() and any(out.iterdir())
    if exists and on_existing == "overwrite":
        shutil.rmtree(out)
    elif exists and on_existing == "refuse":
        raise StoreError(f"{out}: a store already exists here (preprocess.on_existing: resume or overwrite)")
    elif exists:
        found = json.loads(marker.read_text()) if marker.exists() else None
        if found != json.loads(json.dumps(ident)) and on_existing == "replace":
            # The run's split was just made anew (--force-split): the store of its old split matches nothing the
            # run folder records any more, so it is rebuilt rather than refused.
            log.warning("%s: made from the run's previous split or settings; rebuilt for the new split", out)
            shutil.rmtree(out)
        elif found != json.loads(json.dumps(ident)):
            raise StoreError(
                f"{out}: the store here was made from other settings or another split; refusing to mix "
                "them (set preprocess.on_existing: overwrite, or use another run name)"
            )
    out.mkdir(parents=True, exist_ok=True)
    _write_json(marker, ident)


def _count(out: Path, items: Sequence[Mapping]) -> tuple[dict, list]:
    """Rows per split and class, and sources with no rows, from the Parquet metadata columns only."""
    table = read_store(out, columns=["source", "label", "split"])
    rows: dict[str, dict[str, int]] = {}
    for split, label in zip(table["split"], table["label"]):
        rows.setdefault(str(split), {}).setdefault(str(label), 0)
        rows[str(split)][str(label)] += 1
    produced = set(table["source"])
    return rows, [i["source"] for i in items if i["source"] not in produced]
