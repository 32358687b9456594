"""Tests for msbt.data.synth: determinism, layout on disk, fit to the preprocessing, class morphology."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from msbt.data import synth

SMALL = dict(fields_per_line=2, field_size=256, lesions_per_class=5, frames_per_lesion=(1, 3),
             ultrasound_size=96)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _truth(root: Path) -> list[dict]:
    with open(root / "ultrasound_truth.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, synth.generate(out, seed=3, **SMALL)


# --------------------------------------------------------------------------------------------------
# single items
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line", synth.CELL_LINES)
def test_microscope_field_shape_and_determinism(line):
    a = synth.microscope_field(line, np.random.default_rng(1), size=200)
    b = synth.microscope_field(line, np.random.default_rng(1), size=200)
    c = synth.microscope_field(line, np.random.default_rng(2), size=200)
    assert a.shape == (200, 200) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert 20 < a.mean() < 235 and a.std() > 3  # neither blank nor saturated


def test_unknown_cell_line_is_rejected():
    with pytest.raises(ValueError, match="unknown cell line"):
        synth.microscope_field("HEK293", np.random.default_rng(0), size=128)


def test_ultrasound_frame_shape_determinism_and_frame_variation():
    lesion = synth.ultrasound_lesion(True, np.random.default_rng(0))
    assert lesion == synth.ultrasound_lesion(True, np.random.default_rng(0))
    assert lesion != synth.ultrasound_lesion(True, np.random.default_rng(1))
    a = synth.ultrasound_frame(lesion, np.random.default_rng(5), size=96)
    b = synth.ultrasound_frame(lesion, np.random.default_rng(5), size=96)
    c = synth.ultrasound_frame(lesion, np.random.default_rng(6), size=96)
    assert a.shape == (96, 96) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)  # new speckle / probe pose
    assert 20 < a.mean() < 235 and a.std() > 10


def _thumb(img: np.ndarray) -> np.ndarray:
    t = cv2.resize(img, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    t -= t.mean()
    return t / np.linalg.norm(t)


def test_frames_of_one_lesion_look_alike_and_differ_from_other_lesions():
    """Re-acquisitions are near-duplicates (what content-based grouping relies on)."""
    within, between = [], []
    thumbs = []
    for i in range(8):
        lesion = synth.ultrasound_lesion(i % 2 == 1, synth.item_rng(11, 2, 0, i))
        a, b = (_thumb(synth.ultrasound_frame(lesion, np.random.default_rng(100 * i + k), 96))
                for k in (0, 1))
        within.append(a @ b)
        thumbs.append(a)
    for i in range(len(thumbs)):
        for j in range(i + 1, len(thumbs)):
            between.append(thumbs[i] @ thumbs[j])
    assert min(within) > 0.8
    assert max(between) < min(within)


def test_items_do_not_depend_on_generation_order():
    forward = [synth.field_image(4, "HeLa", i, 128) for i in range(3)]
    backward = [synth.field_image(4, "HeLa", i, 128) for i in reversed(range(3))][::-1]
    assert all(np.array_equal(f, b) for f, b in zip(forward, backward))
    _, frames_a = synth.lesion_images(4, "malignant", 2, (2, 2), 64)
    synth.lesion_images(4, "benign", 7, (2, 2), 64)  # unrelated work in between
    _, frames_b = synth.lesion_images(4, "malignant", 2, (2, 2), 64)
    assert all(np.array_equal(a, b) for a, b in zip(frames_a, frames_b))


# --------------------------------------------------------------------------------------------------
# fit to the preprocessing: adaptive threshold finds cells, debris stays small
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line", synth.CELL_LINES)
def test_cells_found_by_adaptive_threshold_and_debris_is_smaller(line):
    min_object = 64  # the pipeline's default remove_small_objects threshold
    debris_seen = []
    for i in range(2):
        img, truth = synth._render_field(line, synth.item_rng(0, 1, synth.CELL_LINES.index(line), i),
                                         320)
        assert len(truth.cells) >= 3 and truth.debris
        # Cells are darker than their surroundings: Gaussian adaptive threshold, inverted.
        fg = cv2.adaptiveThreshold(img, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C,
                                   cv2.THRESH_BINARY_INV, 101, 5)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
        area = stats[:, cv2.CC_STAT_AREA]
        near_cell = cv2.dilate(truth.cell_mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        touches_cell = np.zeros(n, bool)
        touches_cell[np.unique(labels[near_cell])] = True
        touches_cell[0] = False  # background label
        # Every cell is covered by a component that survives the area filter.
        found = 0
        for cell in truth.cells:
            inside = np.zeros(img.shape, np.uint8)
            cv2.fillPoly(inside, [cell.polygon], 1)
            hit = labels[(inside > 0) & (labels > 0)]
            found += bool(hit.size) and area[hit].max() >= min_object
        assert found >= 0.9 * len(truth.cells), (line, i, found, len(truth.cells))
        # Whatever is thresholded away from cells (debris, noise) is removed by the area filter,
        # and the smallest cell is several times bigger than the biggest such object.
        stray = area[1:][~touches_cell[1:]]
        assert stray.size > 0 and stray.max() < min_object
        # Debris is really there and visible to the threshold (the area filter has work to do).
        away = cv2.dilate(truth.cell_mask.astype(np.uint8), np.ones((15, 15), np.uint8)) == 0
        debris_seen += [bool(fg[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2].any())
                        for x, y, _ in truth.debris if away[y, x]]
        smallest_cell = min(cv2.contourArea(c.polygon.astype(np.float32)) for c in truth.cells)
        assert smallest_cell > 2.5 * stray.max()
    assert len(debris_seen) >= 5 and np.mean(debris_seen) >= 0.5


def _cell_stats(line: str, n_fields: int = 4, size: int = 384) -> dict[str, float]:
    areas, aspects, neighbour = [], [], []
    for i in range(n_fields):
        _, truth = synth._render_field(line, synth.item_rng(9, 1, synth.CELL_LINES.index(line), i),
                                       size)
        xy = np.array([(c.x, c.y) for c in truth.cells])
        r = np.array([c.radius for c in truth.cells])
        areas += [cv2.contourArea(c.polygon.astype(np.float32)) for c in truth.cells]
        aspects += [c.aspect for c in truth.cells]
        d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        neighbour += list(d.min(axis=1) / r)  # nearest-neighbour distance in cell radii
    return {"area": float(np.mean(areas)), "aspect": float(np.median(aspects)),
            "neighbour": float(np.median(neighbour))}


def test_cell_lines_differ_in_the_intended_direction():
    s = {line: _cell_stats(line) for line in synth.CELL_LINES}
    # Size: NCI-H1299 largest, then HeLa, then the small Huh-7 and MCF-7.
    assert s["NCI-H1299"]["area"] > s["HeLa"]["area"] > s["Huh-7"]["area"] > s["MCF-7"]["area"]
    assert s["NCI-H1299"]["area"] > 2.5 * s["MCF-7"]["area"]
    # Shape: NCI-H1299 elongated/spindle, MCF-7 round.
    assert s["NCI-H1299"]["aspect"] > 1.6 > 1.2 > s["MCF-7"]["aspect"]
    # Arrangement: MCF-7 and Huh-7 packed in colonies/islands, NCI-H1299 scattered.
    assert s["MCF-7"]["neighbour"] < 2.2 and s["Huh-7"]["neighbour"] < 2.2
    assert s["NCI-H1299"]["neighbour"] > 1.5 * s["MCF-7"]["neighbour"]
    assert s["NCI-H1299"]["neighbour"] > s["HeLa"]["neighbour"] > s["Huh-7"]["neighbour"]


# --------------------------------------------------------------------------------------------------
# ultrasound classes: intended direction, but overlapping
# --------------------------------------------------------------------------------------------------
def _lesions(n: int = 300) -> tuple[list[synth.LesionParams], np.ndarray]:
    lesions = [synth.ultrasound_lesion(bool(c), synth.item_rng(21, 2, c, i))
               for c in (0, 1) for i in range(n)]
    return lesions, np.repeat([0, 1], n)


def test_lesion_features_differ_by_class_but_overlap():
    lesions, y = _lesions()
    ben, mal = [l for l in lesions if not l.malignant], [l for l in lesions if l.malignant]
    rate = lambda ls, f: np.mean([f(l) for l in ls])  # noqa: E731
    # Non-parallel (taller-than-wide) orientation is a malignant sign, but not a rule.
    ttw_b, ttw_m = rate(ben, lambda l: l.taller_than_wide), rate(mal, lambda l: l.taller_than_wide)
    assert ttw_m > ttw_b + 0.25
    assert 0.01 < ttw_b and ttw_m < 0.8
    # Shadowing mostly malignant, enhancement mostly benign; both occur in both classes.
    shadow = lambda l: l.posterior < -0.3  # noqa: E731
    enhance = lambda l: l.posterior > 0.3  # noqa: E731
    assert rate(mal, shadow) > rate(ben, shadow) + 0.3 and rate(ben, shadow) > 0.02
    assert rate(ben, enhance) > rate(mal, enhance) + 0.2 and rate(mal, enhance) > 0.02
    # Irregular / spiculated margins mostly malignant; some cancers are circumscribed.
    assert np.median([l.margin_irregularity for l in mal]) > 2 * np.median(
        [l.margin_irregularity for l in ben])
    assert rate(mal, lambda l: not l.spicules) > 0.3 and rate(mal, lambda l: bool(l.spicules)) > 0.2
    assert not any(l.spicules for l in ben)
    # All lesions are hypoechoic relative to gland tissue (echogenicity ~1).
    assert max(l.echogenicity for l in lesions) < 0.5
    # Sizes and positions vary and stay in the frame.
    assert all(0.1 < l.center[1] - l.extent[1] and l.center[1] + l.extent[1] < 0.95 for l in lesions)
    assert np.std([l.semi_axes[0] for l in lesions]) > 0.02


def _features(lesions) -> np.ndarray:
    return np.array([[math.log(l.depth_to_width), l.margin_irregularity, l.posterior,
                      l.echogenicity, l.heterogeneity, l.edge_width, l.echogenic_rim,
                      l.calcifications, math.log(l.semi_axes[0] * l.semi_axes[1])]
                     for l in lesions])


def _logistic_accuracy(x: np.ndarray, y: np.ndarray, n_train: int) -> float:
    x = (x - x.mean(0)) / x.std(0)
    x = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(x.shape[1])
    for _ in range(1500):
        p = 1 / (1 + np.exp(-x[:n_train] @ w))
        w -= 0.2 * x[:n_train].T @ (p - y[:n_train]) / n_train
    return float(np.mean((x[n_train:] @ w > 0) == y[n_train:]))


def test_lesion_classes_are_learnable_but_not_trivially_separable():
    lesions, y = _lesions()
    order = np.random.default_rng(0).permutation(len(y))
    x, y = _features(lesions)[order], y[order]
    n_train = len(y) * 2 // 3
    full = _logistic_accuracy(x, y, n_train)
    assert 0.8 <= full <= 0.97, full
    for j in range(x.shape[1]):  # no single feature gives the answer away
        assert _logistic_accuracy(x[:, [j]], y, n_train) < 0.88


def test_lesion_is_darker_than_tissue_at_its_depth():
    darker = 0
    for i in range(12):
        lesion = synth.ultrasound_lesion(i % 2 == 0, synth.item_rng(5, 2, 0, i))
        img = synth.ultrasound_frame(lesion, np.random.default_rng(i), 128).astype(float)
        (cx, cy), (w, h) = lesion.center, lesion.extent
        row = slice(int((cy - 0.4 * h) * 128), int((cy + 0.4 * h) * 128) + 1)
        core = img[row, int((cx - 0.4 * w) * 128):int((cx + 0.4 * w) * 128) + 1]
        left, right = int((cx - w) * 128) - 10, int((cx + w) * 128) + 10
        side = np.concatenate([img[row, max(left - 20, 0):max(left, 1)],
                               img[row, min(right, 127):min(right + 20, 128)]], axis=1)
        darker += core.mean() < side.mean() - 15
    assert darker >= 11


# --------------------------------------------------------------------------------------------------
# generate(): layout, truth, determinism, cache and refusal
# --------------------------------------------------------------------------------------------------
def test_generate_layout_and_truth(dataset):
    out, summary = dataset
    assert summary["cached"] is False
    assert Path(summary["out_dir"]) == out and (out / "synth.json").is_file()
    for line in synth.CELL_LINES:
        fields = sorted((out / "microscope" / line).iterdir())
        assert [p.name for p in fields] == ["field_0000.png", "field_0001.png"]
        img = cv2.imread(str(fields[0]), cv2.IMREAD_UNCHANGED)
        assert img.shape == (256, 256) and img.dtype == np.uint8  # stored as grayscale
    assert summary["microscope"] == {line: 2 for line in synth.CELL_LINES}

    rows = _truth(out)
    assert set(rows[0]) == {"path", "label", "lesion"}
    on_disk = sorted(str(p.relative_to(out / "ultrasound")) for p in (out / "ultrasound").rglob("*.png"))
    assert sorted(r["path"] for r in rows) == on_disk  # each frame listed exactly once
    assert not (out / "ultrasound" / "ultrasound_truth.csv").exists()
    by_lesion = defaultdict(list)
    for r in rows:
        assert r["path"].split("/")[0] == r["label"] and r["lesion"].startswith(r["label"] + "-")
        by_lesion[r["lesion"]].append(r["path"])
        img = cv2.imread(str(out / "ultrasound" / r["path"]), cv2.IMREAD_UNCHANGED)
        assert img.shape == (96, 96) and img.dtype == np.uint8
    assert len(by_lesion) == 10 and all(1 <= len(v) <= 3 for v in by_lesion.values())
    for label in synth.ULTRASOUND_CLASSES:
        n = sum(r["label"] == label for r in rows)
        assert summary["ultrasound"][label] == n and summary["lesions"][label] == 5
        # Numbering within a class is 0..n-1 with no gaps.
        names = sorted(p.name for p in (out / "ultrasound" / label).iterdir())
        assert names == [f"us_{k:04d}.png" for k in range(n)]


def test_frame_names_do_not_reveal_lesions(tmp_path):
    out = tmp_path / "d"
    synth.generate(out, seed=1, fields_per_line=0, field_size=64, lesions_per_class=30,
                   frames_per_lesion=(2, 3), ultrasound_size=32)
    rows = _truth(out)
    number = lambda r: int(Path(r["path"]).stem.split("_")[1])  # noqa: E731
    groups = defaultdict(list)
    for r in rows:
        groups[r["lesion"]].append(number(r))
    runs = 0
    for nums in groups.values():
        nums.sort()
        runs += all(b - a == 1 for a, b in zip(nums, nums[1:]))
    assert runs <= 0.2 * len(groups)  # sequential naming would give 100 %
    # File number is unrelated to lesion index (within each class).
    for label in synth.ULTRASOUND_CLASSES:
        sub = [(int(r["lesion"].split("-")[1]), number(r)) for r in rows if r["label"] == label]
        a, b = np.array(sub, dtype=float).T
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.4


def test_generate_is_deterministic_and_order_independent(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    synth.generate(again, seed=3, **SMALL)
    assert _files(again) == _files(out)  # byte-identical, synth.json included

    other = tmp_path / "other"
    synth.generate(other, seed=4, **SMALL)
    a, b = _files(out), _files(other)
    assert a.keys() != b.keys() or any(a[k] != b[k] for k in a if k.endswith(".png"))
    assert a["microscope/HeLa/field_0000.png"] != b["microscope/HeLa/field_0000.png"]

    # Fewer items: every item that exists in both is identical.
    fewer = tmp_path / "fewer"
    synth.generate(fewer, seed=3, **{**SMALL, "fields_per_line": 1, "lesions_per_class": 2})
    c = _files(fewer)
    for line in synth.CELL_LINES:
        key = f"microscope/{line}/field_0000.png"
        assert c[key] == a[key]

    def frames_by_lesion(root):
        got = defaultdict(set)
        for r in _truth(root):
            got[r["lesion"]].add((root / "ultrasound" / r["path"]).read_bytes())
        return got

    big, small = frames_by_lesion(out), frames_by_lesion(fewer)
    assert set(small) == {"benign-000", "benign-001", "malignant-000", "malignant-001"}
    for lesion, frames in small.items():
        assert frames == big[lesion]


def test_generate_cache_hit_and_refusals(dataset, tmp_path):
    out, first = dataset
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    hit = synth.generate(out, seed=3, **SMALL)
    assert hit["cached"] is True
    assert {k: v for k, v in hit.items() if k != "cached"} == {
        k: v for k, v in first.items() if k != "cached"}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing rewritten

    with pytest.raises(ValueError, match=str(out)):
        synth.generate(out, seed=4, **SMALL)  # different data set in the same place
    stored = json.loads((out / "synth.json").read_text())
    assert stored["args"]["seed"] == 3

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=str(foreign)):
        synth.generate(foreign, **SMALL)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty directory is fine
    assert synth.generate(empty, seed=0, fields_per_line=1, field_size=64, lesions_per_class=1,
                          frames_per_lesion=(1, 1), ultrasound_size=32)["cached"] is False


@pytest.mark.parametrize("bad", [
    {"seed": -1}, {"field_size": 10}, {"frames_per_lesion": (3, 1)}, {"frames_per_lesion": (0, 2)},
    {"lesions_per_class": 1.5}, {"ultrasound_size": True},
])
def test_generate_rejects_bad_arguments(tmp_path, bad):
    with pytest.raises(ValueError):
        synth.generate(tmp_path / "x", **{**SMALL, **bad})
    assert not (tmp_path / "x").exists()
