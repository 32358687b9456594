"""Preprocessing: microscope fields -> cell patches, ultrasound images -> model-ready arrays.

The input is a saved split (`split.csv` from msbt.data.splits): one row per source file with its label and
split. Ray Data streams those rows through a per-file function (pure image code from msbt.images.patches and
msbt.images.imagefile) and the workers write Parquet directly, so no image passes through the driver and memory
stays bounded by Ray Data's streaming executor. A collection below `preprocess.build_ray_min_files` files is
prepared by the same functions in threads of the driver instead (`preprocess.build: auto`, chosen as the scan
chooses; Ray Data's fixed costs would be most of its time). Every patch carries its source field, so the split made
per field holds per patch: patches of one field never straddle train/val/test.

The store's format, chunking, identity and reuse rules belong to msbt.data.store; this module supplies
the per-file functions, the rows to run them on, and the preparation settings.
"""

from __future__ import annotations

import csv
import logging
import sys
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from msbt.config import PreprocessConfig
from msbt.data.discovery import fs_name
from msbt.data.scan import choose_scan
from msbt.data.store import META_COLUMNS, Store, StoreSummary, arrow_batch, write_store
from msbt.images.imagefile import ImageError, fit_square, normalize_intensity, read_image

log = logging.getLogger(__name__)

# Files reach the store only after discovery accepted them under the run's data.max_pixels and
# data.on_partial (and the split's data fingerprint guarantees they are unchanged): read them as accepted.
_VALIDATED = {"max_pixels": None, "on_partial": "warn"}


# ---------------------------------------------------------------------------------------------------
# Per-file functions (run inside Ray Data tasks or the driver's threads; plain numpy in, plain numpy out)


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

    # Ray runs one task per CPU; OpenCV's own thread pool on top would oversubscribe the cores. (The driver's
    # threads have set it already, process-wide, and restore it afterwards: msbt.data.store.)
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    size = params["patch_size"]
    out: dict[str, list] = {"image": [], "box": [], **{c: [] for c in META_COLUMNS}}
    for i in range(len(batch["path"])):
        try:
            rgb = read_image(str(batch["path"][i]), sixteen_bit, **_VALIDATED)
            patches, boxes, _ = field_to_patches(rgb, seed=int(batch["seed"][i]), **params)
        except (ImageError, ValueError) as exc:
            log.warning("skipped field %s: %s", batch["path"][i], exc)
            continue
        out["image"].extend(patches)
        out["box"].extend(boxes.astype(np.int32))
        for column in META_COLUMNS:
            out[column].extend([batch[column][i]] * len(patches))
    return arrow_batch(out, (size, size, 3))


def ultrasound_arrays(batch: dict[str, np.ndarray], *, image_size: int, aspect: str, intensity: str,
                      sixteen_bit: str = "scale") -> dict[str, np.ndarray]:
    """Read each ultrasound image of a batch as a (S, S, 3) uint8 array (grayscale -> 3 channels)."""
    # `site` (msbt.data.sites) when the items carry it; stores made before sites existed lack the column.
    extra = ["group"] + (["site"] if "site" in batch else [])
    out: dict[str, list] = {"image": [], **{c: [] for c in extra}, **{c: [] for c in META_COLUMNS}}
    for i in range(len(batch["path"])):
        try:
            rgb = read_image(str(batch["path"][i]), sixteen_bit, **_VALIDATED)
        except ImageError as exc:
            log.warning("skipped image %s: %s", batch["path"][i], exc)
            continue
        out["image"].append(fit_square(normalize_intensity(rgb, intensity), image_size, aspect))
        for column in extra:
            out[column].append(batch[column][i])
        for column in META_COLUMNS:
            out[column].append(batch[column][i])
    return arrow_batch(out, (image_size, image_size, 3))


def unreadable_reason(item: dict, sixteen_bit: str = "scale") -> str:
    """Why a split row's file cannot be read now, as the per-file functions read it; "" when it reads.

    Asked by the store (`write_store`'s ``why_empty``) for the few files that gave no rows, so that the data step
    can tell a field without cells from a file that broke after the scan: under Ray Data the task's own warning
    reaches only ``logs/workers.log``, and neither leaves a row behind.
    """
    try:
        read_image(str(item["path"]), sixteen_bit, **_VALIDATED)  # type: ignore[arg-type]
    except ImageError as exc:
        return exc.reason
    return ""


def split_items(split_folder: str | Path, root: str | Path, classes: tuple[str, ...], seed: int) -> list[dict]:
    """Rows of a saved split as pipeline input: absolute path, label index and a per-file seed."""
    with (Path(split_folder) / "split.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    items = []
    for row in sorted(rows, key=lambda r: r["relpath"]):
        items.append({
            "path": str(Path(root) / fs_name(row["relpath"])),  # \xNN escapes back to the file's bytes
            "source": row["relpath"],
            "label": row["label"],
            "label_index": classes.index(row["label"]),
            "split": row["split"],
            "group": row["group"],
            # A seed per file (not per task) keeps a field's patch subset the same however the work
            # is divided among tasks.
            "seed": zlib.crc32(f"{seed}:{row['relpath']}".encode("utf-8", "surrogateescape")),
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


def microscope_settings(cfg: PreprocessConfig, sixteen_bit: str = "scale") -> tuple[dict, tuple[int, int, int]]:
    """The patch function's keyword arguments (part of the store's identity) and the patch shape."""
    return {"params": patch_params(cfg), "sixteen_bit": sixteen_bit}, (cfg.patch_size, cfg.patch_size, 3)


def ultrasound_settings(cfg: PreprocessConfig, sixteen_bit: str = "scale") -> tuple[dict, tuple[int, int, int]]:
    """The ultrasound function's keyword arguments (part of the store's identity) and the image shape."""
    kwargs = {"image_size": cfg.image_size, "aspect": cfg.aspect, "intensity": cfg.intensity,
              "sixteen_bit": sixteen_bit}
    return kwargs, (cfg.image_size, cfg.image_size, 3)


def store_settings(kind: str, cfg: PreprocessConfig, sixteen_bit: str = "scale") -> tuple[dict, tuple[int, int, int]]:
    """:func:`microscope_settings` or :func:`ultrasound_settings` by store kind."""
    return (microscope_settings if kind == "microscope" else ultrasound_settings)(cfg, sixteen_bit)


def item_classes(items: Sequence[dict]) -> list[str]:
    """Class names in label-index order, from split rows (every class that has a row)."""
    names = {int(i["label_index"]): i["label"] for i in items}
    return [names[k] for k in sorted(names)]


def build_microscope_store(items: list[dict], out: str | Path, cfg: PreprocessConfig,
                           sixteen_bit: str = "scale", classes: Sequence[str] | None = None) -> StoreSummary:
    """Cut every field into patches (Ray Data or driver threads: `preprocess.build`) and write them to a store."""
    kwargs, shape = microscope_settings(cfg, sixteen_bit)
    return _build("microscope", items, out, field_patches, kwargs, shape, cfg, classes)


def build_ultrasound_store(items: list[dict], out: str | Path, cfg: PreprocessConfig,
                           sixteen_bit: str = "scale", classes: Sequence[str] | None = None) -> StoreSummary:
    """Convert every ultrasound image to a model-ready array and write them to a Parquet store."""
    kwargs, shape = ultrasound_settings(cfg, sixteen_bit)
    return _build("ultrasound", items, out, ultrasound_arrays, kwargs, shape, cfg, classes)


def _build(kind, items, out, fn, kwargs, shape, cfg: PreprocessConfig, classes) -> StoreSummary:
    ray = sys.modules.get("ray")  # Ray is up only if something imported and initialised it
    ray_up = ray is not None and ray.is_initialized()
    where = choose_scan(cfg.build, len(items), cfg.build_ray_min_files, ray_up, key="preprocess.build")
    return write_store(kind, items, out, fn, kwargs, image_shape=shape,
                       classes=list(classes) if classes is not None else item_classes(items),
                       files_per_chunk=cfg.files_per_chunk, files_per_task=cfg.files_per_task,
                       cpus_per_task=cfg.cpus_per_task, on_existing=cfg.on_existing, where=where,
                       why_empty=lambda item: unreadable_reason(item, kwargs["sixteen_bit"]))


# ---------------------------------------------------------------------------------------------------
# Looking at it


def write_contact_sheets(store: str | Path, items: list[dict], classes: tuple[str, ...], params: dict,
                         per_class: int = 8, fields_per_class: int = 2, sixteen_bit: str = "scale") -> list[Path]:
    """PNG sheets next to a microscope store: sample patches per class, and masks + boxes on fields.

    ``sixteen_bit`` must be the store's (`data.sixteen_bit`): the fields are shown, thresholded and cut as the store
    cut them (under the default, 12-bit fields of a ``minmax`` store were drawn black with other masks)."""
    from msbt.images.patches import field_to_patches, overlay
    from msbt.images.sheets import contact_sheet, write_png

    store = Path(store)
    patch_rows = [(f"{c}: sample patches", list(Store.open(store).sample(c, per_class))) for c in classes]
    field_rows = []
    for c in classes:
        shown = []
        for item in [i for i in items if i["label"] == c]:
            if len(shown) == fields_per_class:
                break
            try:
                rgb = read_image(item["path"], sixteen_bit, **_VALIDATED)  # type: ignore[arg-type]
            except ImageError as exc:  # broken since the scan: the store line names it; the sheet takes the next
                log.warning("contact sheet: skipped field %s: %s", item["path"], exc.reason)
                continue
            _, boxes, mask = field_to_patches(rgb, seed=int(item["seed"]), **params)
            shown.append(overlay(rgb, mask, boxes))
        field_rows.append((f"{c}: mask (red) and patch windows (green)", shown))
    return [
        write_png(contact_sheet(patch_rows, tile=112, cols=per_class), store / "contact_patches.png"),
        write_png(contact_sheet(field_rows, tile=420, cols=fields_per_class), store / "contact_fields.png"),
    ]
