"""Leakage-safe splits: stratified, seeded, group-aware train/val/test and k-fold.

A group (one lesion or patient) is never divided: whole groups are dealt to splits. Within each class
stratum (a group's majority label) groups are shuffled with the seed, then dealt in that random order to the
split that is furthest below its target count, which keeps every split's class mix close to the requested
ratio. The order is random, not largest first: dealing the big groups first sends them all to train (the
split with the largest shortfall) and leaves val/test with single-image lesions only, a test set unlike the
data (measured on BUSI: 0 of 64 test images from a multi-image lesion, against 41% of the whole set). The split is saved as a CSV of files so every later stage and every rerun
reads the same one; `load_split` refuses a saved split whose data have changed. No Ray, no TensorFlow.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from msbt.data.discovery import DataError, Discovery
from msbt.images.grouping import connected_groups, find_links

SPLITS = ("train", "val", "test")


def assign_groups(labels: Sequence[str], groups: Sequence[str], targets: Sequence[float], seed: int) -> np.ndarray:
    """Deal whole groups to bins so each class is split in the `targets` proportions.

    Args:
        labels: class label per item.
        groups: group id per item; items sharing an id always land in the same bin.
        targets: bin proportions, e.g. (0.7, 0.2, 0.1) or (1, 1, 1, 1, 1) for 5 folds.
        seed: shuffles the order in which groups are dealt, so different seeds give different splits.

    Returns:
        (N,) int bin index per item.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    weights = np.asarray(targets, dtype=float) / float(np.sum(targets))
    rng = np.random.default_rng(seed)
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    strata: dict[str, list[str]] = {}
    for group, idx in members.items():
        # A group mixing classes (a cross-class duplicate) is stratified by its majority label.
        majority = Counter(labels[idx]).most_common(1)[0][0]
        strata.setdefault(majority, []).append(group)
    out = np.empty(len(labels), dtype=int)
    for stratum in sorted(strata):
        names = sorted(strata[stratum])
        names = [names[i] for i in rng.permutation(len(names))]
        total = sum(len(members[g]) for g in names)
        filled = np.zeros(len(weights))
        if len(names) >= len(weights):
            # Every bin gets at least one group of each class when there are enough groups (a small
            # data set must still have a test set). The smallest groups seed them, so a bin with a
            # small target is not filled past it by its first group; the rest keep the random order.
            seeds = sorted(names, key=lambda g: len(members[g]))[: len(weights)]  # stable: shuffled order
            names = [g for g in names if g not in set(seeds)]
            for b, group in zip(np.argsort(-weights, kind="stable"), seeds):
                out[members[group]] = b
                filled[b] += len(members[group])
        for group in names:
            # The bin with the largest shortfall against its target takes the group; on a tie, the
            # emptier bin (rounding keeps float noise from deciding ties).
            shortfall = np.round(weights * total - filled, 9)
            b = max(range(len(weights)), key=lambda k: (shortfall[k], -filled[k]))
            out[members[group]] = b
            filled[b] += len(members[group])
    return out


@dataclass(frozen=True)
class SplitResult:
    table: list[dict]  # one row per image: relpath, label, group, split, fold
    summary: dict


def make_split(
    discovery: Discovery,
    *,
    ratios: Sequence[float] = (0.7, 0.2, 0.1),
    folds: int = 5,
    seed: int = 0,
    grouping: str = "auto",
    max_distance: int = 10,
    min_similarity: float = 0.8,
) -> SplitResult:
    """Group the images, then make the train/val/test split and k folds, and measure naive leakage.

    Args:
        discovery: the scanned data set (with fingerprints).
        ratios: train/val/test proportions.
        folds: number of cross-validation folds (over all images; test folds are disjoint by group).
        seed: split seed.
        grouping: "auto" (near-duplicate detection), "manifest" (the manifest's group column), "none".
        max_distance, min_similarity: near-duplicate thresholds (see `msbt.images.grouping.find_links`).

    Returns:
        SplitResult with a per-image table and a summary (counts, groups, leakage of a naive split).
    """
    records = discovery.records
    labels = [r.label for r in records]
    groups, links = _groups(discovery, grouping, max_distance, min_similarity)
    groups = join_frames([r.relpath for r in records], groups)
    split_index = assign_groups(labels, groups, ratios, seed)
    fold_index = assign_groups(labels, groups, [1.0] * folds, seed) if folds > 1 else np.zeros(len(records), int)
    # The naive split: the same procedure with every image its own group.
    naive = assign_groups(labels, [r.relpath for r in records], ratios, seed)
    table = [
        {"relpath": r.relpath, "label": r.label, "group": g, "split": SPLITS[s], "fold": int(f)}
        for r, g, s, f in zip(records, groups, split_index, fold_index)
    ]
    summary = {
        "data_fingerprint": discovery.fingerprint(),
        "root": discovery.root,
        "classes": list(discovery.classes),
        "seed": seed,
        "ratios": list(ratios),
        "folds": folds,
        "grouping": grouping,
        "thresholds": {"max_distance": max_distance, "min_similarity": min_similarity},
        "images": len(records),
        "rejects": len(discovery.rejects),
        "counts": _counts(labels, split_index),
        "groups": _group_stats(labels, groups, links),
        "leakage": {
            "group_aware": leaked_images(split_index, groups),
            "naive_random": leaked_images(naive, groups),
        },
    }
    return SplitResult(table, summary)


def _groups(discovery: Discovery, grouping: str, max_distance: int, min_similarity: float):
    records = discovery.records
    if grouping == "none":
        return [r.relpath for r in records], 0
    if grouping == "manifest":
        if not any(r.group for r in records):
            raise DataError(f"{discovery.root}: grouping 'manifest' needs a manifest with a group column")
        # Rows without a group are their own group.
        return [r.group or f"~{r.relpath}" for r in records], 0
    if grouping != "auto":
        raise ValueError(f"unknown grouping {grouping!r}")
    links = find_links(
        discovery.hashes,
        discovery.thumbs,
        max_distance=max_distance,
        min_similarity=min_similarity,
        digests=[r.digest for r in records],
    )
    component = connected_groups(len(records), links.pairs)
    return [f"g{c:05d}" for c in component], len(links.pairs)


def join_frames(relpaths: Sequence[str], groups: Sequence[str]) -> list[str]:
    """Put the frames of one multi-frame file (``cine.dcm#frame=NNNN``, msbt.images.dicom) in one group.

    A cine loop is one lesion seen many times: its frames must never straddle splits, whatever the
    grouping mode. Groups that hold frames of one file are merged (union-find), keeping the first name.
    """
    parent = list(range(len(groups)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, (relpath, group) in enumerate(zip(relpaths, groups)):
        file, frame = _frame_of(relpath)
        for key in (("group", group), ("file", file)) if frame is not None else (("group", group),):
            j = first.setdefault(key, i)
            parent[root(i)] = root(j)
    return [groups[root(i)] for i in range(len(groups))]


def _frame_of(relpath: str) -> tuple[str, int | None]:
    # The suffix msbt.images.dicom.frame_ref writes; relpaths are relative, so no file check applies.
    file, _, index = relpath.rpartition("#frame=")
    return (file, int(index)) if file and index.isdigit() else (relpath, None)


def _counts(labels: Sequence[str], bins: np.ndarray) -> dict:
    out: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    for label, b in zip(labels, bins):
        out[SPLITS[b]][label] = out[SPLITS[b]].get(label, 0) + 1
    return out


def _group_stats(labels: Sequence[str], groups: Sequence[str], links: int) -> dict:
    members: dict[str, list[str]] = {}
    for label, group in zip(labels, groups):
        members.setdefault(group, []).append(label)
    sizes = Counter(len(v) for v in members.values())
    mixed = sorted(g for g, ls in members.items() if len(set(ls)) > 1)
    return {
        "count": len(members),
        "multi_image": sum(1 for v in members.values() if len(v) > 1),
        "images_in_multi_image_groups": sum(len(v) for v in members.values() if len(v) > 1),
        "largest": max(sizes) if sizes else 0,
        "size_histogram": {str(k): v for k, v in sorted(sizes.items())},
        "mixed_label": mixed,
        "links": links,
    }


def leaked_images(bins: np.ndarray, groups: Sequence[str]) -> dict:
    """Images in val/test whose group also has an image in an earlier split (train, or train/val).

    Returns:
        {"val": n, "test": n}: val images sharing a group with train; test images sharing one with
        train or val. Zero for a group-aware split by construction.
    """
    bins, groups = np.asarray(bins), np.asarray(groups)
    seen_train = set(groups[bins == 0])
    seen_train_val = seen_train | set(groups[bins == 1])
    return {
        "val": int(sum(g in seen_train for g in groups[bins == 1])),
        "test": int(sum(g in seen_train_val for g in groups[bins == 2])),
    }


# ---------------------------------------------------------------------------------------------------
# Saved splits


def save_split(result: SplitResult, folder: str | Path) -> Path:
    """Write `split.csv` (one row per image) and `split.json` (the summary) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "split.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["relpath", "label", "group", "split", "fold"])
        writer.writeheader()
        writer.writerows(result.table)
    (folder / "split.json").write_text(json.dumps(result.summary, indent=2) + "\n")
    return folder / "split.csv"


def load_split(folder: str | Path, discovery: Discovery) -> SplitResult:
    """Read a saved split, refusing it when the data set no longer matches it."""
    folder = Path(folder)
    summary = json.loads((folder / "split.json").read_text())
    if summary["data_fingerprint"] != discovery.fingerprint():
        raise DataError(
            f"{folder / 'split.json'}: the saved split was made for different data "
            f"(files, labels or contents changed under {discovery.root}); use a new run name or --force-split"
        )
    with (folder / "split.csv").open(newline="") as handle:
        table = [{**row, "fold": int(row["fold"])} for row in csv.DictReader(handle)]
    return SplitResult(table, summary)
