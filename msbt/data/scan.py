"""Scanning a data set on Ray Data: every file validated, decoded and fingerprinted in Ray tasks.

`msbt.data.discovery.discover` lists the candidate files and assembles the result; the per-file work
(`discovery.inspect_file`: extension, read, decode, sha1, perceptual hash and thumbnail) is what grows
with the collection. Here it runs as Ray Data tasks streaming over the file list, so every node of a
cluster decodes and no image passes through the driver. The driver receives only each file's small
record: index, reason (rejects), height, width, digest, 64-bit hash, a 16-bit file's brightest sample (for
the warning about 12- and 14-bit data) and the 32x32 thumbnail (4 KiB) that grouping needs to confirm a
near-duplicate exactly as the in-process scan does. The result is the same `Discovery`, record for record,
as the threaded scan (tested).

When to use it (`data.scan`):
- `local`: threads in the driver process (the default path of `discover`).
- `ray`: Ray Data tasks; needs Ray to be initialised (a workflow's `init_ray`).
- `auto`: Ray Data when Ray is initialised and the scan has at least `data.scan_ray_min_files`
  candidates, else threads. Below a few thousand files the threaded scan finishes in seconds on the
  driver's cores and Ray's fixed costs (worker start-up with the image libraries imported, task
  scheduling) are of the same order; above it, and on clusters of several nodes, the scan is spread
  over all nodes instead of the head node alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from msbt.data.discovery import Discovery, Reject, discover, inspect_file, inspect_in_threads, text_name
from msbt.images.dicom import is_dicom
from msbt.images.grouping import THUMB

log = logging.getLogger(__name__)

SCAN_MODES = ("auto", "local", "ray")


def choose_scan(mode: str, files: int, min_files: int, ray_up: bool, key: str = "data.scan") -> str:
    """Where per-file work over `files` files runs: "local" (driver threads) or "ray" (Ray Data).

    The scan's choice, and the store's (`preprocess.build`, msbt.data.preprocess), made the same way.

    Args:
        mode: "auto", "local" or "ray" (`data.scan`, `preprocess.build`).
        files: number of candidate files.
        min_files: `auto` uses Ray Data from this many files on (`data.scan_ray_min_files`,
            `preprocess.build_ray_min_files`).
        ray_up: whether Ray is initialised in this process.
        key: the setting named in errors.

    Raises:
        ValueError: an unknown mode, or "ray" without an initialised Ray.
    """
    if mode not in SCAN_MODES:
        raise ValueError(f"{key}: unknown mode {mode!r} (expected one of {', '.join(SCAN_MODES)})")
    if mode == "ray" and not ray_up:
        raise ValueError(f"{key}: ray needs an initialised Ray cluster (run it from a workflow, "
                         f"which joins or starts one), or use {key}: auto|local")
    if mode == "auto":
        return "ray" if ray_up and files >= min_files else "local"
    return mode


def inspect_batch(batch: dict[str, np.ndarray], *, options: dict) -> dict[str, np.ndarray]:
    """Ray Data batch function: `inspect_file` on each row, flattened to columns of small values.

    Args:
        batch: columns `index` (position in the candidate list) and `path`.
        options: `inspect_file`'s options (16-bit policy, pixel limit, partial-file policy).

    Returns:
        Columns `index`, `reason` ("" for a usable file), `notes` (reasons it is used only in part,
        joined by newlines), `height`, `width`, `digest`, `hash` (uint64), `thumb` ((n, 1024)
        float32) and `peak` (a 16-bit file's brightest sample, -1 for other files); a rejected file has
        zeros there.
    """
    import cv2

    # One task per CPU already; OpenCV's own threads on top would oversubscribe the cores.
    cv2.setNumThreads(1)
    n = len(batch["index"])
    out = {
        "index": np.asarray(batch["index"], dtype=np.int64),
        "reason": np.full(n, "", dtype=object),
        "notes": np.full(n, "", dtype=object),
        "height": np.zeros(n, np.int64),
        "width": np.zeros(n, np.int64),
        "digest": np.full(n, "", dtype=object),
        "hash": np.zeros(n, np.uint64),
        "thumb": np.zeros((n, THUMB * THUMB), np.float32),
        "peak": np.full(n, -1, np.int64),
    }
    for k, path in enumerate(batch["path"]):
        # Not a DICOM (those stay in the driver, see inspect_with_ray): exactly one outcome.
        [(_, outcome)] = inspect_file((Path(str(path)), "", "", ""), options)
        if isinstance(outcome, Reject):
            out["reason"][k] = outcome.reason
            continue
        (out["height"][k], out["width"][k]), out["digest"][k], (out["hash"][k], out["thumb"][k]), notes, peak = outcome
        out["notes"][k] = "\n".join(notes)
        out["peak"][k] = -1 if peak is None else peak
    return out


def inspect_with_ray(candidates: list, options: dict, files_per_task: int = 64) -> list:
    """Run `inspect_file` over the candidates as Ray Data tasks; (candidate, outcome) pairs in order.

    DICOM files are inspected in the driver's threads instead: a cine loop gives one outcome per frame,
    which the fixed one-row-per-file columns here do not carry, and such loops are few per collection.

    Args:
        candidates: (path, relpath, label, group) tuples from discovery.
        options: `inspect_file`'s options.
        files_per_task: files per Ray task (about 30-60 ms each for a 1000x1000 PNG: 64 files keep
            Ray's per-task cost, tens of ms, near 1% of the work).

    Returns:
        The same pairs `inspect_in_threads` gives, in candidate order.
    """
    import ray

    n = len(candidates)
    if n == 0:
        return []
    local = {i for i, c in enumerate(candidates) if is_dicom(c[0])}
    remote = [i for i in range(n) if i not in local]
    items = [{"index": i, "path": str(candidates[i][0])} for i in remote]
    outcomes: dict[int, list] = {}
    if items:
        dataset = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // files_per_task)))
        dataset = dataset.map_batches(inspect_batch, fn_kwargs={"options": options},
                                      batch_size=files_per_task, batch_format="numpy")
        # One small record per file reaches the driver, filled in as batches stream in.
        for batch in dataset.iter_batches(batch_size=1024, batch_format="numpy"):
            for j, i in enumerate(batch["index"]):
                c = candidates[int(i)]
                if batch["reason"][j]:
                    outcome = Reject(text_name(str(c[0])), str(batch["reason"][j]))
                else:
                    notes = [s for s in str(batch["notes"][j]).split("\n") if s]
                    peak = int(batch["peak"][j])
                    outcome = ((int(batch["height"][j]), int(batch["width"][j])), str(batch["digest"][j]),
                               (batch["hash"][j], np.array(batch["thumb"][j])), notes, None if peak < 0 else peak)
                outcomes[int(i)] = [(c, outcome)]
    missing = [i for i in remote if i not in outcomes]
    if missing:  # a lost row would silently drop a file from the data set
        raise RuntimeError(f"Ray Data scan returned no result for {len(missing)} files, "
                           f"e.g. {candidates[missing[0]][0]}")
    for i in sorted(local):
        outcomes[i] = inspect_file(candidates[i], options)
    return [pair for i in range(n) for pair in outcomes[i]]


def scan_inspector(mode: str = "auto", min_files: int = 2000, files_per_task: int = 64) -> Callable[..., list]:
    """The `inspect_all` argument of `discover` for a scan mode (see the module docstring).

    Returns:
        A function (candidates, options, desc) -> (candidate, outcome) pairs that picks driver threads or Ray
        Data with `choose_scan` once the number of candidates is known.
    """
    choose_scan(mode, 0, min_files, ray_up=True)  # an unknown mode fails before any file is listed

    def inspect_all(candidates: list, options: dict, desc: str = "scan") -> list:
        import ray

        where = choose_scan(mode, len(candidates), min_files, ray.is_initialized())
        log.info("scanning %d files with %s", len(candidates), "Ray Data" if where == "ray" else "driver threads")
        if where == "ray":
            return inspect_with_ray(candidates, options, files_per_task)
        return inspect_in_threads(candidates, options, desc=desc)

    return inspect_all


def scan(source: str | Path, classes: Sequence[str] = (), *, mode: str = "auto", min_files: int = 2000,
         strict: bool = False, mask_suffixes: Sequence[str] = ("_mask",), sixteen_bit: str = "scale") -> Discovery:
    """`discover` with the per-file work where `mode` puts it (driver threads or Ray Data tasks).

    Args:
        source, classes, strict, mask_suffixes, sixteen_bit: as `msbt.data.discovery.discover`.
        mode: "auto", "local" or "ray" (`data.scan`).
        min_files: the `auto` threshold (`data.scan_ray_min_files`).

    Returns:
        The Discovery, identical whichever way the files were inspected.
    """
    return discover(source, classes, strict=strict, mask_suffixes=mask_suffixes, sixteen_bit=sixteen_bit,
                    inspect_all=scan_inspector(mode, min_files))
