"""Ray Data preprocessing: microscope fields -> cell patches, ultrasound images -> model-ready arrays.

The input is a saved split (`split.csv` from msbt.data.splits): one row per source file with its label and
split. Ray Data streams those rows through a per-file function (pure image code from msbt.images.patches and
msbt.images.imagefile) and the workers write Parquet directly, so no image passes through the driver and memory
stays bounded by Ray Data's streaming executor. Every patch carries its source field, so the split made
per field holds per patch: patches of one field never straddle train/val/test.

The store is written in chunks of `files_per_chunk` source files; each finished chunk gets a `_DONE.json`.
`store.json` at the top holds the store's identity (settings + split). A rerun with the same identity
resumes (finished chunks are kept) or reuses a complete store; a different identity is refused unless
`on_existing: overwrite`. Two runs are never mixed in one store.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from msbt.console import progress
from msbt.config import PreprocessConfig
from msbt.images.imagefile import ImageError, fit_square, normalize_intensity, read_image

log = logging.getLogger(__name__)

STORE_FORMAT = 1
META_COLUMNS = ["label", "label_index", "split", "source"]


class StoreError(ValueError):
    """An existing store cannot be reused or resumed; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------
# Per-file functions (run inside Ray Data tasks; plain numpy in, plain numpy out)


def field_patches(batch: dict[str, np.ndarray], *, params: dict, sixteen_bit: str = "scale") -> dict[str, np.ndarray]:
    """Cut the cell patches out of each field in a batch of split rows.

    Args:
        batch: columns `path`, `source`, `label`, `label_index`, `split`, `seed` (one row per field).
        params: keyword arguments of msbt.images.patches.field_to_patches (without `seed`).
        sixteen_bit: 16-bit conversion policy.

    Returns:
        One row per patch: `image` (P, P, 3) uint8, `box` [x, y, w, h] in the field, and the field's
        `source`, `label`, `label_index`, `split`. A field that cannot be read yields no rows and a
        warning naming it (discovery normally rejected it before).
    """
    import cv2

    from msbt.images.patches import field_to_patches

    # Ray runs one task per CPU; OpenCV's own thread pool on top would oversubscribe the cores.
    cv2.setNumThreads(1)
    size = params["patch_size"]
    out: dict[str, list] = {"image": [], "box": [], **{c: [] for c in META_COLUMNS}}
    for i in range(len(batch["path"])):
        try:
            rgb = read_image(str(batch["path"][i]), sixteen_bit)
            patches, boxes, _ = field_to_patches(rgb, seed=int(batch["seed"][i]), **params)
        except (ImageError, ValueError) as exc:
            log.warning("skipped field %s: %s", batch["path"][i], exc)
            continue
        out["image"].extend(patches)
        out["box"].extend(boxes.astype(np.int32))
        for column in META_COLUMNS:
            out[column].extend([batch[column][i]] * len(patches))
    return _columns(out, (size, size, 3))


def ultrasound_arrays(batch: dict[str, np.ndarray], *, image_size: int, aspect: str, intensity: str,
                      sixteen_bit: str = "scale") -> dict[str, np.ndarray]:
    """Read each ultrasound image of a batch as a (S, S, 3) uint8 array (grayscale -> 3 channels)."""
    out: dict[str, list] = {"image": [], "group": [], **{c: [] for c in META_COLUMNS}}
    for i in range(len(batch["path"])):
        try:
            rgb = read_image(str(batch["path"][i]), sixteen_bit)
        except ImageError as exc:
            log.warning("skipped image %s: %s", batch["path"][i], exc)
            continue
        out["image"].append(fit_square(normalize_intensity(rgb, intensity), image_size, aspect))
        out["group"].append(batch["group"][i])
        for column in META_COLUMNS:
            out[column].append(batch[column][i])
    return _columns(out, (image_size, image_size, 3))


def _columns(out: dict[str, list], image_shape: tuple[int, ...]):
    """Build the Arrow table a batch function returns.

    Images go in as one fixed-size binary value per row (raw uint8 bytes in C order), built zero-copy
    from one contiguous buffer. Ray's tensor columns are stored in Parquet as lists of single bytes,
    which made writing cost a third as much as cutting the patches (measured: benchmarks/preprocess.py).
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
# Stores


@dataclass(frozen=True)
class StoreSummary:
    path: Path
    kind: str
    files: int
    rows: dict  # split -> class -> rows
    empty_sources: list  # source files that produced no rows
    seconds: float
    reused_chunks: int

    def as_dict(self) -> dict:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "files": self.files,
            "rows": self.rows,
            "empty_sources": self.empty_sources,
            "seconds": round(self.seconds, 2),
            "reused_chunks": self.reused_chunks,
        }


def split_items(split_folder: str | Path, root: str | Path, classes: tuple[str, ...], seed: int) -> list[dict]:
    """Rows of a saved split as pipeline input: absolute path, label index and a per-file seed."""
    with (Path(split_folder) / "split.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    items = []
    for row in sorted(rows, key=lambda r: r["relpath"]):
        items.append({
            "path": str(Path(root) / row["relpath"]),
            "source": row["relpath"],
            "label": row["label"],
            "label_index": classes.index(row["label"]),
            "split": row["split"],
            "group": row["group"],
            # A seed per file (not per task) keeps a field's patch subset the same however the work
            # is divided among tasks.
            "seed": zlib.crc32(f"{seed}:{row['relpath']}".encode()),
        })
    return items


def patch_params(cfg: PreprocessConfig) -> dict:
    """Keyword arguments of msbt.images.patches.field_to_patches from the config."""
    return {
        "block_size": cfg.block_size,
        "offset": cfg.offset,
        "polarity": cfg.polarity,
        "min_object_size": cfg.min_object_size,
        "patch_size": cfg.patch_size,
        "max_patches": cfg.max_patches_per_field,
        "large_region_policy": cfg.large_region_policy,
        "min_center_distance": cfg.min_center_distance,
    }


def build_microscope_store(items: list[dict], out: str | Path, cfg: PreprocessConfig,
                           sixteen_bit: str = "scale") -> StoreSummary:
    """Cut every field into patches with Ray Data and write them to a Parquet store."""
    kwargs = {"params": patch_params(cfg), "sixteen_bit": sixteen_bit}
    shape = (cfg.patch_size, cfg.patch_size, 3)
    return build_store("microscope", items, out, field_patches, kwargs, cfg, shape)


def build_ultrasound_store(items: list[dict], out: str | Path, cfg: PreprocessConfig,
                           sixteen_bit: str = "scale") -> StoreSummary:
    """Convert every ultrasound image to a model-ready array and write them to a Parquet store."""
    kwargs = {"image_size": cfg.image_size, "aspect": cfg.aspect, "intensity": cfg.intensity,
              "sixteen_bit": sixteen_bit}
    shape = (cfg.image_size, cfg.image_size, 3)
    return build_store("ultrasound", items, out, ultrasound_arrays, kwargs, cfg, shape)


def build_store(kind: str, items: list[dict], out: str | Path, fn: Callable, fn_kwargs: dict,
                cfg: PreprocessConfig, image_shape: tuple[int, int, int]) -> StoreSummary:
    """Run `fn` over `items` with Ray Data, chunk by chunk, into a Parquet store at `out`.

    Args:
        kind: "microscope" or "ultrasound" (recorded in the store's identity).
        items: split rows from `split_items`.
        out: store folder.
        fn: per-batch function (`field_patches` or `ultrasound_arrays`).
        fn_kwargs: its keyword arguments; part of the store's identity.
        cfg: chunking, CPU and rerun settings.
        image_shape: shape of every stored image, recorded in `store.json` for readers.

    Returns:
        StoreSummary with rows per split and class, read back from the written Parquet.
    """
    import ray

    out = Path(out)
    started = time.perf_counter()
    identity = _identity(kind, items, fn_kwargs, cfg.files_per_chunk, image_shape)
    _prepare_folder(out, identity, cfg.on_existing)
    chunks = [items[i : i + cfg.files_per_chunk] for i in range(0, len(items), cfg.files_per_chunk)]
    reused = 0
    noun = "fields -> patches" if kind == "microscope" else "images"
    bar = progress(total=len(items), desc=f"{kind} store", unit=noun.split()[0])
    for index, chunk in enumerate(chunks):
        folder = out / f"chunk-{index:05d}"
        if (folder / "_DONE.json").exists():
            reused += 1
            bar.update(len(chunk))
            continue
        shutil.rmtree(folder, ignore_errors=True)  # a chunk interrupted mid-write is redone whole
        # One task per `files_per_task` files: long enough (about 2 s for 1000 px fields) that
        # Ray's per-task cost is small, short enough that the last tasks finish together.
        blocks = max(1, -(-len(chunk) // cfg.files_per_task))
        dataset = ray.data.from_items(chunk, override_num_blocks=blocks)
        dataset = dataset.map_batches(fn, fn_kwargs=fn_kwargs, batch_size=1, num_cpus=cfg.cpus_per_task,
                                      batch_format="numpy")
        # lz4: a third of the size of raw pixels at a few ms per field; no dictionary or statistics
        # on the image column, which would only cost time.
        dataset.write_parquet(str(folder), compression="lz4", use_dictionary=["label", "split", "source"],
                              write_statistics=["label", "split", "source"])
        folder.mkdir(parents=True, exist_ok=True)  # a chunk with no rows writes no files
        (folder / "_DONE.json").write_text(json.dumps({"files": len(chunk)}) + "\n")
        log.info("%s store: chunk %d/%d done (%d files)", kind, index + 1, len(chunks), len(chunk))
        bar.update(len(chunk))
    bar.close()
    rows, empty = _count(out, items)
    summary = StoreSummary(out, kind, len(items), rows, empty, time.perf_counter() - started, reused)
    (out / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2) + "\n")
    return summary


def _identity(kind: str, items: list[dict], fn_kwargs: dict, files_per_chunk: int, image_shape) -> dict:
    listing = hashlib.sha1(json.dumps(
        [[i["source"], i["label"], i["split"], i["seed"]] for i in items]).encode()).hexdigest()
    return {"format": STORE_FORMAT, "kind": kind, "image_shape": list(image_shape), "settings": fn_kwargs,
            "files_per_chunk": files_per_chunk, "items": listing}


def _prepare_folder(out: Path, identity: dict, on_existing: str) -> None:
    marker = out / "store.json"
    exists = out.exists() and any(out.iterdir())
    if exists and on_existing == "overwrite":
        shutil.rmtree(out)
    elif exists and on_existing == "refuse":
        raise StoreError(f"{out}: a store already exists here (preprocess.on_existing: resume or overwrite)")
    elif exists:
        found = json.loads(marker.read_text()) if marker.exists() else None
        if found != json.loads(json.dumps(identity)):
            raise StoreError(
                f"{out}: the store here was made from other settings or another split; refusing to mix "
                "them (set preprocess.on_existing: overwrite, or use another run name)"
            )
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(identity, indent=2) + "\n")


def _count(out: Path, items: list[dict]) -> tuple[dict, list]:
    """Rows per split and class, and sources with no rows, from the Parquet metadata columns only."""
    table = read_store(out, columns=["source", "label", "split"])
    rows: dict[str, dict[str, int]] = {}
    for split, label in zip(table["split"], table["label"]):
        rows.setdefault(split, {}).setdefault(label, 0)
        rows[split][label] += 1
    produced = set(table["source"])
    return rows, [i["source"] for i in items if i["source"] not in produced]


def store_files(path: str | Path) -> list[str]:
    """The Parquet files of a store, in a stable order."""
    return sorted(str(p) for p in Path(path).glob("chunk-*/*.parquet"))


def image_shape(path: str | Path) -> tuple[int, ...]:
    """Shape of every image in a store, from its `store.json`."""
    return tuple(json.loads((Path(path) / "store.json").read_text())["image_shape"])


def read_store(path: str | Path, columns: list[str] | None = None, split: str | None = None) -> dict[str, np.ndarray]:
    """Read a store (or some of its columns) into numpy arrays with pyarrow; for small stores and tests.

    Returns:
        Column name -> array; `image` as (N, H, W, 3) uint8, `box` as (N, 4) int32.
    """
    import pyarrow.dataset as pads

    files = store_files(path)
    if not files:
        return {c: np.zeros(0) for c in (columns or [])}
    flt = pads.field("split") == split if split else None
    table = pads.dataset(files, format="parquet").to_table(columns=columns, filter=flt)
    out = {}
    for name in table.column_names:
        if name == "image":
            out[name] = decode_images(table[name], image_shape(path))
        elif name == "box":
            out[name] = np.asarray(table[name].combine_chunks().flatten(), np.int32).reshape(-1, 4)
        else:
            out[name] = table[name].to_numpy()
    return out


# ---------------------------------------------------------------------------------------------------
# Looking at it


def sample_store(path: str | Path, label: str, n: int) -> np.ndarray:
    """Up to `n` images of one class from a store, reading only the rows needed."""
    import pyarrow.dataset as pads

    files = store_files(path)
    if not files:
        return np.zeros((0, *image_shape(path)), np.uint8)
    table = pads.dataset(files, format="parquet").head(n, columns=["image"], filter=pads.field("label") == label)
    return decode_images(table["image"], image_shape(path))


def write_contact_sheets(store: str | Path, items: list[dict], classes: tuple[str, ...], params: dict,
                         per_class: int = 8, fields_per_class: int = 2) -> list[Path]:
    """PNG sheets next to a microscope store: sample patches per class, and masks + boxes on fields."""
    from msbt.images.patches import field_to_patches, overlay
    from msbt.images.sheets import contact_sheet, write_png

    store = Path(store)
    patch_rows = [(f"{c}: sample patches", list(sample_store(store, c, per_class))) for c in classes]
    field_rows = []
    for c in classes:
        shown = []
        for item in [i for i in items if i["label"] == c][:fields_per_class]:
            rgb = read_image(item["path"])
            _, boxes, mask = field_to_patches(rgb, seed=int(item["seed"]), **params)
            shown.append(overlay(rgb, mask, boxes))
        field_rows.append((f"{c}: mask (red) and patch windows (green)", shown))
    return [
        write_png(contact_sheet(patch_rows, tile=112, cols=per_class), store / "contact_patches.png"),
        write_png(contact_sheet(field_rows, tile=420, cols=fields_per_class), store / "contact_fields.png"),
    ]
