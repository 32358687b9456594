"""Leakage-safe splits: stratified, seeded, group-aware train/val/test and k-fold.

A group (one lesion or patient) is never divided: whole groups are dealt to splits. Each group gets a
seeded hash position from its members' file paths, and within each class stratum (a group's majority
label) the groups, in hash order, are cut into contiguous runs with the requested shares (within an
explicit tolerance, `assign_groups`). The position of a group depends on that group alone, so a growing
collection keeps its old groups in their split and fold (issue #13, item 11; `split.json` reports what
moved when a split is remade over an old one), where the earlier deal in shuffled order moved 100 of 250
images when one was added. The order is random, not largest first: dealing the big groups first sends
them all to train and leaves val/test with single-image lesions only, a test set unlike the data
(measured on BUSI: 0 of 64 test images from a multi-image lesion, against 41% of the whole set). The split is saved as a CSV of files so every later stage and every rerun
reads the same one; `load_split` refuses a saved split whose data have changed. No Ray, no TensorFlow.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from msbt.atomicio import atomic_open, atomic_path, write_text
from msbt.data.discovery import DataError, Discovery
from msbt.images.grouping import connected_groups, find_links

SPLITS = ("train", "val", "test")
# Default of data.split_tolerance: how far (a fraction of a class's images) a split may stray from its
# target share to keep a group where its hash puts it (see assign_groups).
DEFAULT_TOLERANCE = 0.05


def group_position(seed: int, salt: str, key: str) -> float:
    """A seeded, uniform position in [0, 1) for one identity ``key`` (the same on every machine and run)."""
    digest = hashlib.blake2b(f"{seed}\0{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_groups(
    labels: Sequence[str],
    groups: Sequence[str],
    targets: Sequence[float],
    seed: int,
    *,
    keys: Sequence[str] | None = None,
    strata: Sequence[str] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    salt: str = "split",
) -> np.ndarray:
    """Deal whole groups to bins by a seeded hash of each group, so each class is split in ``targets``.

    Stability: each group gets a position in [0, 1), a seeded hash of one of its members' ``keys``
    (default: the group id; the member is picked by another seeded hash, so a group that gains an image
    keeps its position unless the newcomer is picked), which does not depend on any other image and is
    uniform whatever the group's size. In each stratum the groups are
    ordered by position and cut into contiguous runs, one per bin; a cut sits where the hash alone puts
    it (position ``< cumsum(targets)``) unless that misses the target share by more than the tolerance,
    and is then moved by as few groups as needed. Adding or removing images therefore moves no group
    whose position is not next to a cut, and none at all while every cut stays within its tolerance.

    Stratification (the guarantee the tests check): in every stratum (a group's majority label, and its
    ``strata`` value when given) each cut's cumulative image count is within
    ``max(tolerance / 2 * n, largest group / 2)`` of its target, so each bin holds its target share of
    the stratum's ``n`` images within ``max(tolerance * n, largest group)`` images; and when a stratum has
    at least as many groups as bins, every bin gets one of its groups (a small data set still has a test
    set), which takes precedence over the tolerance.

    Args:
        labels: class label per item.
        groups: group id per item; items sharing an id always land in the same bin.
        targets: bin proportions, e.g. (0.7, 0.2, 0.1) or (1, 1, 1, 1, 1) for 5 folds.
        seed: seeds the positions, so different seeds give different splits.
        keys: a stable identity per item (its relpath); default: the group id. Give it when group ids
            are not stable across scans (numbered components).
        strata: an extra stratum per item (e.g. a site), combined with the label.
        tolerance: see above; 0 keeps every bin as close to its target as whole groups allow.
        salt: separates independent assignments of one seed (the split and the folds).

    Returns:
        (N,) int bin index per item.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    keys = np.asarray(keys if keys is not None else groups)
    weights = np.asarray(targets, dtype=float) / float(np.sum(targets))
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    by_stratum: dict[tuple, list[tuple[float, str]]] = {}
    for group, idx in members.items():
        # A group mixing classes (a cross-class duplicate) is stratified by its majority label (ties: the
        # first label in sorted order, so the stratum never depends on file order).
        majority = Counter(sorted(labels[idx])).most_common(1)[0][0]
        extra = Counter(sorted(str(strata[i]) for i in idx)).most_common(1)[0][0] if strata is not None else ""
        # The group's representative is the member with the smallest "pick" hash; its position is a
        # second, independent hash. The minimum itself would not do: the least of k uniform numbers is
        # small for a large k, which put the multi-image lesions first in the order, i.e. in train (on
        # BUSI-256: 4% of test images from multi-image lesions against 40% of all images).
        representative = min((str(keys[i]) for i in idx), key=lambda k: group_position(seed, f"{salt}:pick", k))
        position = group_position(seed, salt, representative)
        by_stratum.setdefault((str(majority), extra), []).append((position, str(group)))
    out = np.empty(len(labels), dtype=int)
    for stratum in sorted(by_stratum):
        ordered = sorted(by_stratum[stratum])
        sizes = [len(members[g]) for _, g in ordered]
        cuts = stratum_cuts([p for p, _ in ordered], sizes, weights, tolerance)
        for b, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, len(ordered)])):
            for _, group in ordered[lo:hi]:
                out[members[group]] = b
    return out


def stratum_cuts(positions: Sequence[float], sizes: Sequence[int], weights: np.ndarray,
                 tolerance: float) -> list[int]:
    """Cut indices (one fewer than bins) into one stratum's groups, ordered by ``positions``.

    See :func:`assign_groups` for the rule; ``sizes`` are the groups' image counts.
    """
    n, bins = len(sizes), len(weights)
    cum = np.concatenate([[0], np.cumsum(sizes)])  # images before cut c
    total = float(cum[-1])
    bounds = np.cumsum(weights)[:-1]
    slack = max(tolerance / 2 * total, max(sizes, default=0) / 2)
    cuts = []
    for j, bound in enumerate(bounds):
        target = bound * total
        natural = int(np.searchsorted(positions, bound))  # where the hash alone cuts
        if abs(cum[natural] - target) > slack + 1e-9:
            # the cut nearest the hash's own cut that meets the target within the slack (else the closest)
            ok = [c for c in range(n + 1) if abs(cum[c] - target) <= slack + 1e-9]
            pool = ok or [int(np.argmin(np.abs(cum - target)))]
            natural = min(pool, key=lambda c: (abs(c - natural), c))
        cuts.append(natural)
    if n >= bins:
        # every bin at least one group: push cuts apart left to right, then back from the right end
        for j in range(bins - 1):
            cuts[j] = max(cuts[j], (cuts[j - 1] if j else 0) + 1)
        for j in reversed(range(bins - 1)):
            cuts[j] = min(cuts[j], (cuts[j + 1] if j < bins - 2 else n) - 1)
    else:
        # fewer groups than bins: the larger bins first (a 7:2:1 split of two groups: train and val)
        order = np.argsort(-weights, kind="stable")
        counts = np.zeros(bins, int)
        counts[order[:n]] = 1
        cuts = [int(c) for c in np.cumsum(counts)[:-1]]
    for j in range(1, len(cuts)):
        cuts[j] = max(cuts[j], cuts[j - 1])
    return [int(c) for c in cuts]


def within_tolerance(labels: Sequence[str], groups: Sequence[str], bins: np.ndarray, targets: Sequence[float],
                     tolerance: float) -> bool:
    """Whether ``bins`` meets :func:`assign_groups`' guarantee: in every class stratum each bin's image
    count is within ``max(tolerance * n, largest group)`` of its share, and no bin is empty when the
    stratum has as many groups as bins."""
    labels, groups, bins = np.asarray(labels), np.asarray(groups), np.asarray(bins)
    weights = np.asarray(targets, dtype=float) / float(np.sum(targets))
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    strata: dict[str, list[str]] = {}
    for group, idx in members.items():
        strata.setdefault(Counter(sorted(labels[idx])).most_common(1)[0][0], []).append(group)
    for names in strata.values():
        idx = [i for g in names for i in members[g]]
        n, largest = len(idx), max(len(members[g]) for g in names)
        counts = np.bincount(bins[idx], minlength=len(weights))
        if np.any(np.abs(counts - weights * n) > max(tolerance * n, largest) + 1e-9):
            return False
        groups_per_bin = Counter(int(bins[members[g][0]]) for g in names)
        if len(names) >= len(weights) and len(groups_per_bin) < len(weights):
            return False
    return True


def keep_previous(labels: Sequence[str], groups: Sequence[str], keys: Sequence[str], fresh: np.ndarray,
                  previous: Mapping[str, int], targets: Sequence[float], tolerance: float) -> np.ndarray:
    """``fresh`` with every group that was in ``previous`` (key -> bin) put back in its old bin.

    A group takes the bin most of its previously seen members had (a group that grew keeps its place; two
    old groups joined by a new image go where most of their images were). A group with no old member
    takes its fresh (hash) bin if its class's count there stays within the tolerance, else the bin of
    that class furthest below its share. When the result still strays beyond the tolerance (much new
    data), the fresh assignment is returned instead, and ``split.json``'s ``changes`` shows what moved.
    """
    labels = np.asarray(labels)
    weights = np.asarray(targets, dtype=float) / float(np.sum(targets))
    out = np.array(fresh, copy=True)
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    new_groups = []
    for group, idx in members.items():
        old = [previous[keys[i]] for i in idx if keys[i] in previous]
        if old:
            out[idx] = Counter(sorted(old)).most_common(1)[0][0]
        else:
            new_groups.append(group)
    stratum = {g: Counter(sorted(labels[idx])).most_common(1)[0][0] for g, idx in members.items()}
    placed = [g for g in members if g not in set(new_groups)]
    for group in sorted(new_groups, key=lambda g: (int(fresh[members[g][0]]), g)):
        mine = [g for g in placed if stratum[g] == stratum[group]] + [group]
        n = sum(len(members[g]) for g in mine)
        largest = max(len(members[g]) for g in mine)
        counts = np.zeros(len(weights))
        for g in mine[:-1]:
            counts[out[members[g][0]]] += len(members[g])
        b = int(fresh[members[group][0]])
        if counts[b] + len(members[group]) - weights[b] * n > max(tolerance * n, largest) + 1e-9:
            b = int(np.argmax(weights * n - counts))
        out[members[group]] = b
        placed.append(group)
    return out if within_tolerance(labels, groups, out, targets, tolerance) else np.array(fresh)


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
    tolerance: float = DEFAULT_TOLERANCE,
    previous: Sequence[Mapping] | None = None,
) -> SplitResult:
    """Group the images, then make the train/val/test split and k folds, and measure naive leakage.

    Args:
        discovery: the scanned data set (with fingerprints).
        ratios: train/val/test proportions.
        folds: number of cross-validation folds (over all images; test folds are disjoint by group).
        seed: split seed.
        grouping: "auto" (near-duplicate detection), "manifest" (the manifest's group column), "none".
        max_distance, min_similarity: near-duplicate thresholds (see `msbt.images.grouping.find_links`).
        tolerance: how far a split may stray from its share to keep groups where their hash puts them
            (``assign_groups``); groups are placed by their members' relpaths, so a group keeps its split
            and fold when other images are added.
        previous: the rows of an earlier split of this collection (``split.csv``): its groups keep their
            split and fold as long as the shares stay within the tolerance (:func:`keep_previous`).

    Returns:
        SplitResult with a per-image table and a summary (counts, groups, leakage of a naive split).
    """
    records = discovery.records
    labels = [r.label for r in records]
    sites = [r.site for r in records]
    several = len(set(sites)) > 1
    if several:
        # Groups never span sites: each site is grouped on its own (see site_groups for why).
        groups, links, cross = site_groups(discovery, grouping, max_distance, min_similarity)
    else:
        groups, links = _groups(discovery, grouping, max_distance, min_similarity)
    groups = join_frames([r.relpath for r in records], groups)  # the frames of one DICOM cine loop: one group
    identical = by_manifest = 0
    # The user's groups; a file copied under two of them is still one image. (`none` stays naive on purpose: it is
    # the paper's own procedure, a random split of images, reproduced to show what it leaks.)
    if grouping == "manifest":
        groups, identical = join_by([f"{r.site}\0{r.digest}" for r in records], groups)  # within a site
    elif grouping == "auto" and any(r.group for r in records):
        # A manifest's group column (a patient, a lesion) joins its rows as well: two views of one patient's lesion
        # need not look alike, so near-duplicate links alone would let them straddle the split.
        # two kinds of key kept apart: a row without a group never meets a patient whose id is its index
        groups, by_manifest = join_by([f"group\0{r.site}\0{r.group}" if r.group else f"row\0{i}"
                                       for i, r in enumerate(records)], groups)
    # Stratify by site and class: the stratum of a group is "<site>/<label>" (one site: just the label).
    strata = [f"{s}/{label}" for s, label in zip(sites, labels)] if several else labels
    relpaths = [r.relpath for r in records]
    split_index = assign_groups(strata, groups, ratios, seed, keys=relpaths, tolerance=tolerance)
    fold_index = (assign_groups(strata, groups, [1.0] * folds, seed, keys=relpaths, tolerance=tolerance, salt="fold")
                  if folds > 1 else np.zeros(len(records), int))
    if previous:
        old_split = {row["relpath"]: SPLITS.index(row["split"]) for row in previous}
        old_fold = {row["relpath"]: int(row["fold"]) for row in previous if int(row["fold"]) < max(folds, 1)}
        split_index = keep_previous(strata, groups, relpaths, split_index, old_split, ratios, tolerance)
        if folds > 1:
            fold_index = keep_previous(strata, groups, relpaths, fold_index, old_fold, [1.0] * folds, tolerance)
    check_nonempty(split_index, fold_index, groups, ratios, folds, grouping, discovery.root)
    # The naive split: the same procedure with every image its own group.
    naive = assign_groups(strata, relpaths, ratios, seed, tolerance=tolerance)
    table = [
        {"relpath": r.relpath, "label": r.label, "group": g, "split": SPLITS[s], "fold": int(f), "site": r.site,
         "manifest_group": r.group}
        for r, g, s, f in zip(records, groups, split_index, fold_index)
    ]
    summary = {
        "data_fingerprint": discovery.fingerprint(),
        "root": discovery.root,
        "classes": list(discovery.classes),
        "seed": seed,
        "ratios": list(ratios),
        "folds": folds,
        "tolerance": tolerance,
        "assignment": "seeded hash of each group's members (stable when images are added)",
        "grouping": grouping,
        "thresholds": {"max_distance": max_distance, "min_similarity": min_similarity},
        "images": len(records),
        "rejects": len(discovery.rejects),
        "empty_folds": [k for k in range(folds) if folds > 1 and not np.any(fold_index == k)],
        "counts": _counts(labels, split_index),
        "groups": {**_group_stats(labels, groups, links), "identical_joined": identical,
                   "manifest_joined": by_manifest},
        "skipped": dict(discovery.skipped),  # left out on purpose: classes not selected, masks, loose files
        "leakage": {
            "group_aware": leaked_images(split_index, groups),
            "naive_random": leaked_images(naive, groups),
        },
        "sites": {site: _counts([l for l, s in zip(labels, sites) if s == site],
                                split_index[np.asarray(sites) == site]) for site in sorted(set(sites))},
    }
    if several:
        summary["cross_site_duplicates"] = _cross_site_report(records, cross, split_index)
    return SplitResult(table, summary)


def site_groups(discovery: Discovery, grouping: str, max_distance: int, min_similarity: float):
    """Groups found within each site (ids `<site>:<group>`), and the near-duplicate links across sites.

    Why cross-site near-duplicates are reported and not merged: a site is the unit that external and
    leave-one-site-out evaluation hold out whole, so a group spanning two sites could not be held out with
    either; and a pair across sites is either the same image published in two collections (a curation
    fact the user must see) or two look-alike framings (a false link). Evaluations on a held-out site
    exclude such images explicitly with the contamination check (msbt.eval.external), which counts them.

    Returns:
        (groups, links within sites, cross-site pairs (M, 2) of record indices).
    """
    records = discovery.records
    groups: list[str] = [""] * len(records)
    links = 0
    for site in sorted({r.site for r in records}):
        index = [i for i, r in enumerate(records) if r.site == site]
        part = Discovery(root=discovery.root, classes=discovery.classes, records=[records[i] for i in index],
                         rejects=[], hashes=discovery.hashes[index], thumbs=discovery.thumbs[index])
        found, n = _groups(part, grouping, max_distance, min_similarity)
        links += n
        for i, g in zip(index, found):
            groups[i] = f"{site}:{g}"
    found = find_links(discovery.hashes, discovery.thumbs, max_distance=max_distance,
                       min_similarity=min_similarity, digests=[r.digest for r in records])
    cross = np.array([(i, j) for i, j in found.pairs if records[i].site != records[j].site], dtype=np.int64)
    return groups, links, cross.reshape(-1, 2)


def _cross_site_report(records, cross: np.ndarray, split_index: np.ndarray, shown: int = 20) -> dict:
    """How many near-duplicate pairs link two sites, how many of them the internal split puts on both
    sides of train vs val/test, and the first pairs (relpaths) for the user to look at."""
    apart = sum(1 for i, j in cross if (split_index[i] == 0) != (split_index[j] == 0))
    return {
        "pairs": int(len(cross)),
        "images": int(len(set(cross.reshape(-1).tolist()))),
        "pairs_across_train_and_held_out": int(apart),
        "examples": [[records[i].relpath, records[j].relpath] for i, j in cross[:shown]],
        "policy": "reported, not merged: groups never span sites; held-out-site evaluations exclude them",
    }


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


def check_nonempty(split_index: np.ndarray, fold_index: np.ndarray, groups: Sequence[str], ratios: Sequence[float],
                   folds: int, grouping: str, root: str) -> None:
    """Every split with a share got at least one image; else say why (too few groups).

    Empty folds are not refused here (small sets have them; the summary's `empty_folds` lists them);
    cross-validation refuses them when it runs.

    Raises:
        DataError: e.g. a manifest whose rows all share one group leaves val and test empty.
    """
    n_groups = len(set(groups))
    empty = [SPLITS[b] for b in range(len(SPLITS)) if ratios[b] > 0 and not np.any(split_index == b)]
    if empty:
        raise DataError(
            f"{root}: {', '.join(empty)} would be empty: {len(split_index)} images form only {n_groups} group(s) "
            f"(grouping: {grouping}), and a group is never divided; give more groups (e.g. the manifest's "
            "group column), fewer folds (data.folds) or another grouping"
        )


def join_by(keys: Sequence[str], groups: Sequence[str]) -> tuple[list[str], int]:
    """Merge the groups of records that share a key (union-find); the earliest member's group names each result.

    Used for byte-identical files under ``grouping: manifest`` (key: the site and the file's digest; the
    manifest's groups are the user's, but a file copied under two patient ids, and two names, would otherwise
    land in train and test at once: identical bytes are the same image in every mode, and ``auto`` links them
    itself), and for a manifest's group column under ``grouping: auto`` (key: the site and the group).

    Returns:
        The groups, and how many of the given groups were merged into another one (0: nothing joined).
    """
    parent = list(range(len(groups)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, (content, group) in enumerate(zip(keys, groups)):
        for key in (("group", group), ("content", content)):
            a, b = root(i), root(first.setdefault(key, i))
            parent[max(a, b)] = min(a, b)  # the earliest member's group names the merged one
    joined = [groups[root(i)] for i in range(len(groups))]
    return joined, len(set(groups)) - len(set(joined))


def join_frames(relpaths: Sequence[str], groups: Sequence[str]) -> list[str]:
    """Put the frames of one multi-frame file (``cine.dcm#frame=NNNN``, msbt.images.dicom) in one group.

    A cine loop is one lesion seen many times: its frames must never straddle splits, whatever the
    grouping mode. Groups that hold frames of one file are merged (:func:`join_by`).
    """
    files = [_frame_of(relpath) for relpath in relpaths]
    return join_by([f"file\0{file}" if frame is not None else f"row\0{i}" for i, (file, frame) in enumerate(files)],
                   groups)[0]


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
    """Write `split.csv` (one row per image) and `split.json` (the summary) into `folder`, atomically.

    When the folder already holds a split (a re-split with ``--force-split`` / ``--force``), the summary
    gets ``changes``: how many images were added or removed and how many kept images moved to another
    split or fold (:func:`split_changes`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    previous = read_table(folder / "split.csv") if (folder / "split.csv").is_file() else None
    summary = {**result.summary, "changes": split_changes(previous, result.table)}
    with atomic_open(folder / "split.csv", "w", newline="", encoding="utf-8") as handle:
        # Newer columns last, so readers of the older ones keep working: `site`, then `manifest_group` (the
        # manifest's own group value, a patient or dish id, beside msbt's `group` id, which joins it with
        # near-duplicates and cine frames: what a user checks their patients against; empty without one).
        writer = csv.DictWriter(handle, fieldnames=["relpath", "label", "group", "split", "fold", "site",
                                                    "manifest_group"],
                                extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(result.table)
    write_text(folder / "split.json", json.dumps(summary, indent=2) + "\n")
    result.summary.update(changes=summary["changes"])
    return folder / "split.csv"


def read_table(path: str | Path) -> list[dict]:
    """The rows of a saved ``split.csv`` (``fold`` as int)."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return [{**row, "fold": int(row["fold"])} for row in csv.DictReader(handle)]


def previous_rows(folder: str | Path, *, seed: int, ratios: Sequence[float], folds: int) -> list[dict] | None:
    """The rows of the split saved in ``folder`` if it was made with the same seed, ratios and folds
    (a split asked for with other settings is a new split, not a continuation), else None."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / "split.json").read_text())
        rows = read_table(folder / "split.csv")
    except (OSError, ValueError, KeyError):
        return None
    same = (summary.get("seed") == seed and summary.get("folds") == folds
            and np.allclose(summary.get("ratios", []), list(ratios)))
    return rows if same else None


def split_changes(previous: list[dict] | None, table: list[dict], examples: int = 10) -> dict:
    """What changed from a previous split of (mostly) the same images, by relpath.

    Returns:
        ``{"previous": False}`` without one; else ``previous: True``, ``added``, ``removed``, ``kept``,
        ``moved_split`` / ``moved_fold`` (kept images now in another split / fold), ``moved_groups`` (groups
        of the new split with a moved image) and up to ``examples`` moved relpaths.
    """
    if previous is None:
        return {"previous": False}
    before = {row["relpath"]: row for row in previous}
    now = {row["relpath"]: row for row in table}
    kept = [p for p in now if p in before]
    moved = [p for p in kept if now[p]["split"] != before[p]["split"]]
    moved_fold = [p for p in kept if int(now[p]["fold"]) != int(before[p]["fold"])]
    return {
        "previous": True,
        "added": sum(p not in before for p in now),
        "removed": sum(p not in now for p in before),
        "kept": len(kept),
        "moved_split": len(moved),
        "moved_fold": len(moved_fold),
        "moved_groups": len({now[p]["group"] for p in set(moved) | set(moved_fold)}),
        "moved_examples": sorted(set(moved) | set(moved_fold))[:examples],
    }


def load_split(folder: str | Path, discovery: Discovery) -> SplitResult:
    """Read a saved split, refusing it when the data set no longer matches it."""
    folder = Path(folder)
    summary = json.loads((folder / "split.json").read_text())
    if summary["data_fingerprint"] != discovery.fingerprint():
        # A file msbt has since begun to refuse (one image labelled differently at two sites, 2026-12-07) changes
        # the data as much as an edit does: say so, or the user looks for an edit that never happened.
        refused = (f"; or msbt now rejects files it once used ({len(discovery.rejects)} rejected in this scan, with "
                   "the reasons in the data step's rejects.csv)") if discovery.rejects else ""
        # Likewise a hidden file (a name starting with '.') inside a class folder: used until 2026-12-07, left out
        # and counted since (msbt.data.discovery)
        hidden = [r["relpath"] for r in read_table(folder / "split.csv")
                  if any(part.startswith(".") for part in Path(r["relpath"]).parts)]
        if hidden:
            refused += (f"; or it holds {len(hidden)} hidden files (names starting with '.', e.g. {hidden[0]}) that "
                        "msbt used until 2026-12-07 and now leaves out")
        raise DataError(
            f"{folder / 'split.json'}: the saved split was made for different data "
            f"(files, labels or contents changed under {discovery.root}{refused}); use a new run name, or "
            "--force-split to re-split (groups of the old split keep their split and fold; split.json's `changes` "
            "says what moved)"
        )
    return SplitResult(read_table(folder / "split.csv"), summary)


FINGERPRINTS_FILE = "fingerprints.npz"


def save_fingerprints(discovery: Discovery, folder: str | Path) -> Path:
    """Keep the perceptual hashes and thumbnails of every image beside the split (`fingerprints.npz`), so a
    later contamination check (msbt.eval.external) can compare new images with this run's without the
    training data at hand."""
    path = Path(folder) / FINGERPRINTS_FILE
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, relpath=np.array([r.relpath for r in discovery.records]), hashes=discovery.hashes,
                            thumbs=discovery.thumbs, digests=np.array([r.digest for r in discovery.records]))
    return path


def load_fingerprints(folder: str | Path) -> dict[str, np.ndarray] | None:
    """`fingerprints.npz` of a saved split as arrays (relpath, hashes, thumbs, digests), or None if absent."""
    path = Path(folder) / FINGERPRINTS_FILE
    if not path.is_file():
        return None
    with np.load(path) as data:
        return {key: data[key] for key in data.files}
