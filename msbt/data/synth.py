"""Deterministic built-in synthetic data: cell-line microscope fields and breast-ultrasound frames.

The project must run end to end without user data, so it can generate a small data set with the
same on-disk layout as real data::

    out_dir/microscope/<cell line>/field_0000.png ...      grayscale phase-contrast-like fields
    out_dir/ultrasound/{benign,malignant}/us_0000.png ...   B-mode-like frames, 1-3 per lesion
    out_dir/ultrasound_truth.csv                            path,label,lesion (ground truth)
    out_dir/synth.json                                      the arguments (cache key), written last

Design notes
------------
* Pure numpy + OpenCV (no Ray, no TensorFlow), so a Ray worker can import it cheaply.
* Every item draws from its own ``np.random.SeedSequence([seed, kind, class, item, ...])`` stream,
  so an item never depends on generation order or on how many other items are generated, and
  :func:`field_image` / :func:`lesion_images` can run in parallel workers.
* Microscope cells are DARKER than the local background (phase-contrast look: dark body, darker
  nucleus, faint bright halo), ~8-60 px in radius whatever the field size (cells have >= ~200 px
  area); debris specks are 1-2 px in radius and stay under ~55 px above an adaptive threshold,
  so adaptive thresholding + ``remove_small_objects`` (see :mod:`msbt.images.patches`) separate them.
* Ultrasound classes follow BI-RADS descriptors (shape, orientation, margin, posterior features)
  drawn probabilistically so the classes overlap: learnable, not trivially separable.
* Frames of one lesion share the lesion AND its surrounding anatomy; they differ by speckle,
  a small probe shift/rock and gain, like consecutive frames or re-acquisitions.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "CELL_LINES",
    "ULTRASOUND_CLASSES",
    "FORMAT_VERSION",
    "LesionParams",
    "CellLineStyle",
    "STYLES",
    "Cell",
    "FieldTruth",
    "item_rng",
    "microscope_field",
    "ultrasound_lesion",
    "ultrasound_frame",
    "field_image",
    "lesion_images",
    "frame_count",
    "generate",
]

CELL_LINES: tuple[str, ...] = ("HeLa", "Huh-7", "NCI-H1299", "MCF-7")
ULTRASOUND_CLASSES: tuple[str, ...] = ("benign", "malignant")
# Bump when the generated pixels change, so a cached data set from older code is not reused.
FORMAT_VERSION = 1

# Stream ids ("kind") for item_rng: each kind of random draw has its own independent stream.
_KIND_FIELD = 1
_KIND_LESION = 2
_KIND_FRAME = 3
_KIND_FRAME_COUNT = 4
_KIND_NAMES = 5
_KIND_CINE = 6
# Video container -> codec OpenCV's FFmpeg backend writes without extra libraries.
VIDEO_CODECS = {".avi": "MJPG", ".mp4": "mp4v", ".mkv": "FFV1"}


def item_rng(seed: int, kind: int, *key: int) -> np.random.Generator:
    """Independent random stream for one item.

    Args:
        seed: data-set seed (>= 0).
        kind: which kind of draw (field, lesion, frame, ...).
        *key: item coordinates, e.g. class index and item index.

    Returns:
        A PCG64 generator that depends only on ``(seed, kind, *key)``.
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(kind), *map(int, key)]))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_x: float,
                  sigma_y: float | None = None) -> np.ndarray:
    """Gaussian-blurred white noise rescaled to zero mean, unit std (float32).

    Large sigmas are done on a downsampled grid and resized up, which is much faster than a huge
    blur kernel and looks the same for smooth fields.
    """
    sigma_y = sigma_x if sigma_y is None else sigma_y
    h, w = shape
    factor = max(1, int(min(sigma_x, sigma_y) // 4))
    small = (max(2, -(-h // factor)), max(2, -(-w // factor)))
    noise = rng.standard_normal(small, dtype=np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=max(sigma_x / factor, 0.3),
                             sigmaY=max(sigma_y / factor, 0.3), borderType=cv2.BORDER_REFLECT)
    if factor > 1:
        noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    noise -= noise.mean()
    return noise / max(float(noise.std()), 1e-6)


# ==================================================================================================
# Microscope fields
# ==================================================================================================
@dataclass(frozen=True)
class CellLineStyle:
    """How one cell line looks under a ~20x phase-contrast objective (1000 px field).

    Distributions deliberately overlap between lines (radius, aspect, clustering), so the
    classifier must combine several cues, as with real lines.
    """

    radius: float  # median equivalent cell radius in px at scale 1
    radius_cv: float  # relative spread of the radius
    aspect: tuple[float, float]  # log-normal (median, sigma) of long/short axis ratio
    corners: tuple[int, int]  # polygon corner count (inclusive): few = polygonal, many = round
    roughness: float  # radial jitter of the corners, fraction of the radius
    cluster_size: tuple[int, int]  # cells per cluster (inclusive)
    singles: float  # probability that a placement is a lone cell
    spacing: tuple[float, float]  # neighbour centre distance / (r_i + r_j); < 1 = overlapping
    compactness: int  # proposals per new cluster member, nearest to the cluster seed wins
    smoothing: int  # corner-cutting passes on the outline: 0 = sharp polygon
    packed: bool  # cells in a cluster touch without gaps (epithelial islands, colonies)
    nucleus: float  # nucleus radius / cell radius
    nucleus_contrast: float  # extra darkness of the nucleus (0 = invisible)
    nucleoli: bool  # dark nucleoli visible inside the nucleus
    granularity: float  # amplitude of fine cytoplasm texture
    darkness: float  # fraction of background light the cytoplasm removes


STYLES: dict[str, CellLineStyle] = {
    # Cervical adenocarcinoma: medium, flat polygonal epithelial cells, loose groups, clear nuclei.
    "HeLa": CellLineStyle(radius=24, radius_cv=0.2, aspect=(1.35, 0.2), corners=(5, 8),
                          roughness=0.18, cluster_size=(2, 7), singles=0.3, spacing=(1.0, 1.45),
                          compactness=1, smoothing=1, packed=False,
                          nucleus=0.38, nucleus_contrast=0.25, nucleoli=True, granularity=0.12,
                          darkness=0.26),
    # Hepatoma: smaller polygonal cells packed edge to edge in islands; granular cytoplasm.
    "Huh-7": CellLineStyle(radius=17, radius_cv=0.18, aspect=(1.15, 0.12), corners=(5, 7),
                           roughness=0.1, cluster_size=(8, 24), singles=0.08, spacing=(0.8, 0.95),
                           compactness=4, smoothing=1, packed=True,
                           nucleus=0.4, nucleus_contrast=0.18, nucleoli=False, granularity=0.3,
                           darkness=0.3),
    # Large-cell lung carcinoma: big, often spindle/irregular, mostly scattered, few contacts.
    "NCI-H1299": CellLineStyle(radius=30, radius_cv=0.28, aspect=(2.0, 0.35), corners=(7, 11),
                               roughness=0.22, cluster_size=(1, 3), singles=0.7,
                               spacing=(1.3, 2.2), compactness=1, smoothing=2,
                               packed=False, nucleus=0.3, nucleus_contrast=0.25,
                               nucleoli=True, granularity=0.15, darkness=0.22),
    # Luminal breast carcinoma: small rounded cells piled in compact dome-like colonies; smooth.
    "MCF-7": CellLineStyle(radius=14, radius_cv=0.18, aspect=(1.08, 0.08), corners=(14, 18),
                           roughness=0.04, cluster_size=(10, 40), singles=0.05,
                           spacing=(0.75, 0.9), compactness=6, smoothing=0,
                           packed=True, nucleus=0.45, nucleus_contrast=0.2,
                           nucleoli=False, granularity=0.06, darkness=0.34),
}

# Debris specks: radius 1-2 px (<= 13 px area), far below the smallest cell (~150 px area), so an
# area threshold removes them while keeping every cell.
_DEBRIS_MAX_RADIUS = 2


@dataclass(frozen=True)
class Cell:
    """One rendered cell (ground truth)."""

    x: float
    y: float
    radius: float  # equivalent radius in px
    aspect: float  # long/short axis ratio of the outline before corner jitter
    polygon: np.ndarray  # (N, 2) int32 outline


@dataclass(frozen=True)
class FieldTruth:
    """Ground truth of one rendered field (for tests and debugging)."""

    cells: tuple[Cell, ...]
    cell_mask: np.ndarray  # bool, union of cell bodies
    debris: tuple[tuple[int, int, int], ...]  # (x, y, radius)
    scale: float  # magnification factor applied to this field


def _place_cells(style: CellLineStyle, rng: np.random.Generator, size: int,
                 scale: float, coverage: float) -> list[tuple[float, float, float]]:
    """Choose cell centres and radii by growing clusters cell by cell.

    Each cluster starts at a random point.  A new member is proposed next to random existing
    members at ``spacing`` times the summed radii (``spacing`` < 1: overlapping, piled-up cells;
    > 1.3: loose groups); of ``compactness`` proposals the one nearest the cluster's first cell
    wins, so compactness 1 grows straggly chains and larger values round, dense islands (Eden
    growth).  Proposals closer to any cell than the minimum spacing are rejected, which keeps
    cells from stacking.

    Returns:
        List of (x, y, radius) in pixels.
    """
    r_med = style.radius * scale
    n_target = max(3, round(coverage * size * size / (math.pi * r_med ** 2)))
    min_factor = style.spacing[0] * 0.97
    xs, ys, rs = (np.zeros(n_target) for _ in range(3))
    n = 0
    attempts = 0
    while n < n_target and attempts < 30 * n_target:
        if rng.random() < style.singles:
            k = 1
        else:
            k = int(rng.integers(style.cluster_size[0], style.cluster_size[1] + 1))
        members: list[int] = []
        for _ in range(min(k, n_target - n)):
            r = r_med * float(np.clip(1 + style.radius_cv * rng.standard_normal(), 0.7, 1.8))
            if members:
                tries = 8 * style.compactness
                m = np.asarray(members)[rng.integers(len(members), size=tries)]
                angle = rng.uniform(0, 2 * math.pi, tries)
                dist = rng.uniform(*style.spacing, tries) * (r + rs[m])
                cand_x, cand_y = xs[m] + dist * np.cos(angle), ys[m] + dist * np.sin(angle)
            else:
                cand_x, cand_y = rng.uniform(0, size, (2, 8))
            attempts += cand_x.size
            gap = np.hypot(cand_x[:, None] - xs[None, :n], cand_y[:, None] - ys[None, :n])
            ok = np.all(gap >= min_factor * (rs[None, :n] + r), axis=1)
            ok &= (cand_x >= 0) & (cand_x < size) & (cand_y >= 0) & (cand_y < size)
            # Proposals come in rounds of `compactness`: take the first round with a valid one.
            ok_rounds = ok.reshape(-1, style.compactness) if members else ok[:, None]
            valid = np.flatnonzero(ok_rounds.any(axis=1))
            if valid.size == 0:
                break  # this cluster is boxed in; start another one
            idx = valid[0] * ok_rounds.shape[1] + np.arange(ok_rounds.shape[1])
            idx = idx[ok[idx]]
            if members:
                seed_x, seed_y = xs[members[0]], ys[members[0]]
                idx = idx[np.argmin(np.hypot(cand_x[idx] - seed_x, cand_y[idx] - seed_y))]
            else:
                idx = idx[0]
            xs[n], ys[n], rs[n] = cand_x[idx], cand_y[idx], r
            members.append(n)
            n += 1
    return [(float(xs[i]), float(ys[i]), float(rs[i])) for i in range(n)]


def _cell_polygon(style: CellLineStyle, rng: np.random.Generator, x: float, y: float,
                  r: float) -> tuple[np.ndarray, float, float]:
    """Outline of one cell: a jittered polygon stretched to the line's aspect ratio.

    Returns:
        (polygon (N, 2) int32, orientation in radians, aspect ratio).
    """
    n = int(rng.integers(style.corners[0], style.corners[1] + 1))
    theta = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * math.pi / n)
    rad = np.clip(1 + style.roughness * rng.standard_normal(n), 0.45, 1.8)
    aspect = max(1.0, style.aspect[0] * math.exp(style.aspect[1] * rng.standard_normal()))
    phi = rng.uniform(0, math.pi)
    # Stretch along x by sqrt(aspect) and squeeze y, keeping the area ~ pi r^2.
    px = rad * np.cos(theta) * math.sqrt(aspect)
    py = rad * np.sin(theta) / math.sqrt(aspect)
    c, s = math.cos(phi), math.sin(phi)
    pts = np.stack([x + r * (c * px - s * py), y + r * (s * px + c * py)], axis=1)
    for _ in range(style.smoothing):
        # Chaikin corner cutting: rounds corners (membranes are not knife-edged) but keeps the
        # overall polygonal outline of epithelial cells.
        nxt = np.roll(pts, -1, axis=0)
        pts = np.stack([0.75 * pts + 0.25 * nxt, 0.25 * pts + 0.75 * nxt], axis=1).reshape(-1, 2)
    return np.round(pts).astype(np.int32), phi, aspect


def _illumination(rng: np.random.Generator, size: int) -> np.ndarray:
    """Background light: a level, a linear gradient, vignetting and slow unevenness."""
    level = rng.uniform(135, 185)
    t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    gx, gy = rng.uniform(-0.15, 0.15, 2)
    vignette = rng.uniform(0.0, 0.25)
    yy, xx = t[:, None], t[None, :]
    bg = 1 + gx * xx + gy * yy - vignette * (xx ** 2 + yy ** 2)
    bg = bg + 0.03 * _smooth_noise(rng, (size, size), size / 8)
    return (level * bg).astype(np.float32)


def _render_field(cell_line: str, rng: np.random.Generator, size: int
                  ) -> tuple[np.ndarray, FieldTruth]:
    """Render one microscope field and return it with its ground truth.

    Image model (phase-contrast-like): ``I = B * (1 - A) + B * (halo + borders) + noise`` where
    ``B`` is the illumination, ``A`` the absorption of cytoplasm (with line-specific texture) and
    nuclei, ``halo`` a bright ring a few px wide around cell groups (phase artefact) and
    ``borders`` faint bright cell-cell boundaries (what makes packed islands look polygonal).
    """
    if cell_line not in STYLES:
        raise ValueError(f"unknown cell line {cell_line!r}; expected one of {CELL_LINES}")
    style = STYLES[cell_line]
    # Per-field style: magnification, confluence, optics.
    scale = rng.uniform(0.85, 1.15)
    coverage = rng.uniform(0.07, 0.25)
    # Kept weaker than the cell body's darkness so the darker-than-background polarity dominates
    # (the pipeline's automatic polarity uses the skew of the local contrast).
    halo_amp = rng.uniform(0.05, 0.18)
    blur_sigma = rng.uniform(0.4, 1.6)
    noise_sigma = rng.uniform(1.5, 3.5)

    bg = _illumination(rng, size)
    body = np.zeros((size, size), np.float32)  # cytoplasm absorption
    nuc = np.zeros((size, size), np.float32)  # extra absorption of nuclei / nucleoli
    mask = np.zeros((size, size), np.uint8)
    borders = np.zeros((size, size), np.uint8)
    cells = []
    for x, y, r in _place_cells(style, rng, size, scale, coverage):
        poly, phi, aspect = _cell_polygon(style, rng, x, y, r)
        dark = style.darkness * float(np.clip(1 + 0.15 * rng.standard_normal(), 0.6, 1.4))
        cv2.fillPoly(body, [poly], dark)
        cv2.fillPoly(mask, [poly], 255)
        cv2.polylines(borders, [poly], True, 255, 1)
        # Nucleus: ellipse near the centre, following the cell's orientation.
        nr = style.nucleus * r
        axes = (max(2, round(nr * aspect ** 0.25)), max(2, round(nr / aspect ** 0.25)))
        nx, ny = x + rng.normal(0, 0.1 * r), y + rng.normal(0, 0.1 * r)
        cv2.ellipse(nuc, (round(nx), round(ny)), axes, math.degrees(phi), 0, 360,
                    style.nucleus_contrast, -1)
        if style.nucleoli:
            for _ in range(int(rng.integers(1, 4))):
                ox, oy = rng.normal(0, 0.3 * nr, 2)
                cv2.circle(nuc, (round(nx + ox), round(ny + oy)), max(1, round(0.12 * nr)),
                           style.nucleus_contrast + 0.12, -1)
        cells.append(Cell(x, y, r, aspect, poly))

    if style.packed:
        # Epithelial islands/colonies have no background showing between cells: fill the gaps
        # between neighbouring outlines with cytoplasm (a closing of the cell mask).
        k = max(3, int(style.radius * scale)) | 1
        closed = cv2.morphologyEx(mask, cv2.MORPH_CLOSE,
                                  cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        gaps = (closed > 0) & (mask == 0)
        body[gaps] = 0.9 * style.darkness
        mask = closed

    # Cytoplasm texture: fine-grained for granular lines (Huh-7), near-flat for smooth (MCF-7).
    texture = _smooth_noise(rng, (size, size), 1.0)
    # Cells are thicker (darker) in the middle and thin at the edges; inside dense colonies the
    # blurred mask stays high, which gives the darker dome of MCF-7 colonies.
    thickness = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), 0.35 * style.radius * scale)
    body *= 0.55 + 0.45 * thickness
    absorb = np.clip(body * (1 + style.granularity * texture) + nuc * (mask > 0), 0, 0.85)
    # Phase halo: a bright ring just outside the cell boundary.
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
    ring = (cv2.dilate(mask, kernel) - mask).astype(np.float32) / 255
    halo = cv2.GaussianBlur(ring, (0, 0), 2.0)
    edge = cv2.GaussianBlur(borders.astype(np.float32) / 255, (0, 0), 0.8)
    img = bg * (1 - absorb + halo_amp * halo + (0.12 if style.packed else 0.06) * edge)

    debris = _add_debris(img, bg, rng, size)
    img = cv2.GaussianBlur(img, (0, 0), blur_sigma)  # focus
    img += rng.normal(0, noise_sigma, img.shape).astype(np.float32)  # sensor noise
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return out, FieldTruth(tuple(cells), mask > 0, debris, float(scale))


def _add_debris(img: np.ndarray, bg: np.ndarray, rng: np.random.Generator,
                size: int) -> tuple[tuple[int, int, int], ...]:
    """Draw small dark and bright specks (dust, dead-cell fragments) in place.

    Returns:
        The specks as (x, y, radius).
    """
    count = int(rng.integers(30, 150) * size * size / 1e6) + int(rng.integers(2, 6))
    specks = []
    for _ in range(count):
        x, y = (int(v) for v in rng.integers(0, size, 2))
        if any(abs(x - sx) < 10 and abs(y - sy) < 10 for sx, sy, _ in specks):
            continue  # two touching specks would make one object twice the size
        radius = 1 if rng.random() < 0.6 else _DEBRIS_MAX_RADIUS
        # Mostly dark (so the threshold does pick them up and the area filter is exercised), but
        # fainter than cells so that, blurred, a speck stays well under ~50 px above threshold.
        gain = rng.uniform(-0.4, -0.15) if rng.random() < 0.8 else rng.uniform(0.2, 0.4)
        value = float(bg[y, x]) * (1 + gain)
        cv2.circle(img, (x, y), radius, value, -1)
        specks.append((x, y, radius))
    return tuple(specks)


def microscope_field(cell_line: str, rng: np.random.Generator, size: int = 1000) -> np.ndarray:
    """One full microscope field of a cell line.

    Cells are darker than the background and surrounded by a bright phase halo; debris specks are
    at most ``pi * 2^2 ~ 13`` px.  Cell size is in absolute pixels (a ~20x objective), so a smaller
    ``size`` shows fewer cells, not smaller ones.

    Args:
        cell_line: one of :data:`CELL_LINES`.
        rng: random source; the field is a pure function of its state.
        size: side of the square field in pixels (>= 64).

    Returns:
        uint8 grayscale array of shape ``(size, size)``.
    """
    return _render_field(cell_line, rng, int(size))[0]


# ==================================================================================================
# Breast ultrasound
# ==================================================================================================
@dataclass(frozen=True)
class LesionParams:
    """Geometry and appearance of one breast lesion (and the seed of its surrounding anatomy).

    Lengths are fractions of the frame side, positions fractions of the frame (x right, y depth).
    """

    malignant: bool
    center: tuple[float, float]  # (x, depth)
    semi_axes: tuple[float, float]  # (horizontal, vertical) before tilt
    tilt_deg: float  # rotation of the ellipse
    margin_harmonics: tuple[tuple[int, float, float], ...]  # (k, amplitude, phase) of the outline
    spicules: tuple[tuple[float, float], ...]  # (angle rad, length as fraction of the radius)
    edge_width: float  # blur of the margin (fraction of the radius): small = circumscribed
    echogenicity: float  # interior brightness relative to gland tissue (~1); < 0.1 anechoic
    heterogeneity: float  # amplitude of interior texture
    echogenic_rim: float  # brightness of a thick hyperechoic halo (0 = none)
    calcifications: int  # bright microcalcification dots inside
    posterior: float  # log brightness factor behind the lesion: > 0 enhancement, < 0 shadowing
    anatomy_seed: int  # seeds the surrounding tissue, shared by all frames of the lesion

    @property
    def extent(self) -> tuple[float, float]:
        """Half width and half depth of the tilted ellipse (fractions of the frame)."""
        a, b = self.semi_axes
        t = math.radians(self.tilt_deg)
        return (math.hypot(a * math.cos(t), b * math.sin(t)),
                math.hypot(a * math.sin(t), b * math.cos(t)))

    @property
    def depth_to_width(self) -> float:
        """Depth/width ratio of the lesion's ellipse; > 1 is 'taller than wide' (non-parallel)."""
        w, h = self.extent
        return h / w

    @property
    def taller_than_wide(self) -> bool:
        """BI-RADS non-parallel orientation (a malignant sign)."""
        return self.depth_to_width > 1.0

    @property
    def margin_irregularity(self) -> float:
        """RMS amplitude of the outline's small-scale (k >= 3) lobulation plus spiculation."""
        lob = math.sqrt(sum(a * a for k, a, _ in self.margin_harmonics if k >= 3) / 2)
        spic = math.sqrt(sum(length ** 2 for _, length in self.spicules) / 40)
        return lob + spic


def _choice(rng: np.random.Generator, options: dict[str, float]) -> str:
    """Pick a key with the given probabilities."""
    keys = list(options)
    return keys[int(rng.choice(len(keys), p=np.array(list(options.values())) / sum(options.values())))]


def _margin(rng: np.random.Generator, kind: str) -> tuple[tuple[tuple[int, float, float], ...],
                                                          tuple[tuple[float, float], ...]]:
    """Outline harmonics and spicules for a BI-RADS margin category."""
    spicules: list[tuple[float, float]] = []
    if kind == "circumscribed":
        ks = np.arange(2, 5)
        amps = rng.normal(0, 0.02, ks.size)
    elif kind == "macrolobulated":  # a few large gentle lobes (fibroadenoma-like)
        ks = np.array([int(rng.integers(2, 5))])
        amps = rng.uniform(0.07, 0.13, 1)
        ks, amps = np.append(ks, [2, 3]), np.append(amps, rng.normal(0, 0.02, 2))
    else:  # "irregular" / "spiculated": many angular, microlobulated harmonics
        ks = np.arange(2, 11)
        amps = rng.uniform(0.03, 0.11, ks.size) / np.sqrt(ks / 3)
    if kind == "spiculated":
        for _ in range(int(rng.integers(5, 13))):
            spicules.append((float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.15, 0.5))))
    phases = rng.uniform(0, 2 * math.pi, ks.size)
    harmonics = tuple((int(k), float(a), float(p)) for k, a, p in zip(ks, amps, phases))
    return harmonics, tuple(spicules)


def ultrasound_lesion(malignant: bool, rng: np.random.Generator) -> LesionParams:
    """Draw one lesion's geometry and appearance.

    Each BI-RADS feature is drawn with class-dependent probabilities, and every feature has a
    minority of "wrong" draws (round, enhancing benign-looking cancers; angular or shadowing benign
    lesions), so no single feature separates the classes.

    Args:
        malignant: class of the lesion.
        rng: random source.

    Returns:
        A frozen :class:`LesionParams`.
    """
    malignant = bool(malignant)
    if malignant:
        depth_to_width = math.exp(rng.normal(math.log(1.0), 0.3))  # ~50 % taller than wide
        radius = math.exp(rng.normal(math.log(0.115), 0.3))
        tilt = rng.normal(0, 20)
        margin = _choice(rng, {"circumscribed": 0.2, "irregular": 0.4, "spiculated": 0.4})
        posterior = _choice(rng, {"shadow": 0.55, "none": 0.3, "enhance": 0.15})
        echo = rng.uniform(0.06, 0.28)
        heterogeneity = rng.uniform(0.1, 0.5)
        edge = rng.uniform(0.02, 0.07) if margin == "circumscribed" else rng.uniform(0.04, 0.14)
        rim = rng.uniform(0.3, 0.8) if rng.random() < 0.35 else 0.0
        calcs = int(rng.integers(2, 9)) if rng.random() < 0.35 else 0
    else:
        depth_to_width = math.exp(rng.normal(math.log(0.65), 0.28))  # parallel; ~6 % taller
        radius = math.exp(rng.normal(math.log(0.1), 0.3))
        tilt = rng.normal(0, 10)
        margin = _choice(rng, {"circumscribed": 0.65, "macrolobulated": 0.25, "irregular": 0.1})
        posterior = _choice(rng, {"enhance": 0.5, "none": 0.4, "shadow": 0.1})
        # Cysts are anechoic; solid benign masses (fibroadenomas) are hypoechoic like cancers.
        echo = rng.uniform(0.01, 0.06) if rng.random() < 0.4 else rng.uniform(0.08, 0.3)
        heterogeneity = rng.uniform(0.05, 0.4)
        # Mostly sharp margins; some indistinct ones (inflamed cysts, fibroadenomas in fat).
        edge = rng.uniform(0.015, 0.06) if rng.random() < 0.8 else rng.uniform(0.05, 0.12)
        rim = rng.uniform(0.2, 0.5) if rng.random() < 0.05 else 0.0
        calcs = int(rng.integers(1, 3)) if rng.random() < 0.05 else 0
    harmonics, spicules = _margin(rng, margin)
    post = {"shadow": -rng.uniform(0.5, 1.5), "none": rng.normal(0, 0.08),
            "enhance": rng.uniform(0.4, 1.0)}[posterior]
    # Equal area for any aspect: semi-axes radius/sqrt(r), radius*sqrt(r).
    a = radius / math.sqrt(depth_to_width)
    b = min(radius * math.sqrt(depth_to_width), 0.3)
    cx = rng.uniform(0.3, 0.7)
    top, bottom = 0.14 + b, 0.85 - b  # below skin + a little fat, above the chest wall
    cy = rng.uniform(top, max(top, bottom))
    return LesionParams(
        malignant=malignant, center=(float(cx), float(cy)), semi_axes=(float(a), float(b)),
        tilt_deg=float(np.clip(tilt, -45, 45)), margin_harmonics=harmonics, spicules=spicules,
        edge_width=float(edge), echogenicity=float(echo), heterogeneity=float(heterogeneity),
        echogenic_rim=float(rim), calcifications=calcs, posterior=float(post),
        anatomy_seed=int(rng.integers(0, 2 ** 63)),
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


def _tissue(rng: np.random.Generator, canvas: int, size: int, offset: float) -> np.ndarray:
    """Echogenicity map of breast tissue below the skin (canvas coordinates).

    Layers (depth as a fraction of the frame): subcutaneous fat (dark lobules crossed by bright
    curved Cooper's ligaments), fibroglandular tissue (bright, streaky, roughly horizontal), then
    retromammary fat and pectoral muscle (dark with horizontal striations).  Layer boundaries
    undulate laterally.
    """
    shape = (canvas, canvas)
    pos = (np.arange(canvas, dtype=np.float32) - offset) / size
    depth, lateral = pos[:, None], pos[None, :]

    def boundary(mean: float, amp: float) -> np.ndarray:
        freq, phase = rng.uniform(0.5, 2.0), rng.uniform(0, 2 * math.pi)
        return mean + amp * np.sin(2 * math.pi * freq * lateral + phase)

    fat_end = boundary(rng.uniform(0.1, 0.3), rng.uniform(0.01, 0.05))
    gland_end = boundary(rng.uniform(0.72, 0.95), rng.uniform(0.01, 0.05))

    # Fat: dark lobules separated by thin bright septa (Cooper's ligaments) that run obliquely to
    # mostly horizontally; septa are the zero crossings of smooth anisotropic noise.
    lobules = _smooth_noise(rng, shape, 0.03 * size)
    septa = np.exp(-(_smooth_noise(rng, shape, 0.08 * size, 0.025 * size) / 0.2) ** 2)
    fat = 0.28 + 0.06 * lobules + 0.4 * septa

    # Fibroglandular tissue: bright, with thin bright horizontal streaks (zero crossings of
    # strongly anisotropic noise) and darker fat pockets between them.
    texture = _smooth_noise(rng, shape, 0.04 * size, 0.006 * size)
    streaks = sum(np.exp(-(_smooth_noise(rng, shape, 0.09 * size, 0.01 * size) / 0.15) ** 2)
                  for _ in range(2))
    pockets = _sigmoid((_smooth_noise(rng, shape, 0.05 * size, 0.02 * size) - 0.7) / 0.2)
    # Large-scale variation: denser and sparser parenchyma.
    gland_level = rng.uniform(0.6, 0.9) * np.exp(0.25 * _smooth_noise(rng, shape, 0.12 * size))
    gland = gland_level * (1 + 0.2 * texture) * (1 - 0.55 * pockets) + 0.7 * streaks

    striae = _smooth_noise(rng, shape, 0.1 * size, 0.005 * size)
    deep = 0.35 + 0.1 * striae + 0.5 * np.exp(-(striae / 0.15) ** 2)

    w_fat = _sigmoid((fat_end - depth) / 0.012)
    w_deep = _sigmoid((depth - gland_end) / 0.015)
    tissue = w_fat * fat + (1 - w_fat) * ((1 - w_deep) * gland + w_deep * deep)
    return np.clip(tissue, 0.05, None).astype(np.float32)


def _lesion_maps(lesion: LesionParams, rng: np.random.Generator, canvas: int, size: int,
                 offset: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft lesion mask, interior echogenicity and hyperechoic extras (rim, calcifications).

    The outline is an ellipse whose normalised radius is modulated by Fourier harmonics
    (lobulation) and narrow angular bumps (spicules); the soft edge width sets how circumscribed
    the margin looks.
    """
    coords = np.arange(canvas, dtype=np.float32)
    cx = offset + lesion.center[0] * size
    cy = offset + lesion.center[1] * size
    a, b = lesion.semi_axes[0] * size, lesion.semi_axes[1] * size
    t = math.radians(lesion.tilt_deg)
    dx, dy = coords[None, :] - cx, coords[:, None] - cy
    u = (dx * math.cos(t) + dy * math.sin(t)) / a
    v = (-dx * math.sin(t) + dy * math.cos(t)) / b
    dist, theta = np.hypot(u, v), np.arctan2(v, u)
    outline = np.ones_like(dist)
    for k, amp, phase in lesion.margin_harmonics:
        outline += amp * np.cos(k * theta + phase)
    for angle, length in lesion.spicules:
        wrapped = np.angle(np.exp(1j * (theta - angle)))
        outline += length * np.exp(-(wrapped / 0.035) ** 2)
    inside = (outline - dist) / max(lesion.edge_width, 1e-3)
    mask = _sigmoid(4 * inside).astype(np.float32)

    interior = lesion.echogenicity * np.clip(
        1 + lesion.heterogeneity * _smooth_noise(rng, mask.shape, 0.02 * size), 0.1, None)
    extra = lesion.echogenic_rim * np.exp(-((dist - outline - 0.18) / 0.12) ** 2) * (dist > outline)
    for _ in range(lesion.calcifications):
        r, ang = 0.7 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        px = cx + a * r * math.cos(ang) * math.cos(t) - b * r * math.sin(ang) * math.sin(t)
        py = cy + a * r * math.cos(ang) * math.sin(t) + b * r * math.sin(ang) * math.cos(t)
        cv2.circle(extra, (round(px), round(py)), max(1, round(size / 256)), 3.0, -1)
    return mask, interior.astype(np.float32), extra.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _anatomy(lesion: LesionParams, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The lesion in its tissue, on a canvas 15 % larger than the frame (probe shifts stay inside).

    Cached: all frames of a lesion share it.  The arrays are read-only.

    Returns:
        (echogenicity canvas, lesion mask canvas, scalar anatomy settings).
    """
    rng = np.random.default_rng(lesion.anatomy_seed)
    canvas = int(round(size * 1.15))
    offset = (canvas - size) / 2
    tissue = _tissue(rng, canvas, size, offset)
    mask, interior, extra = _lesion_maps(lesion, rng, canvas, size, offset)
    echo = tissue * (1 - mask) + interior * mask + extra
    # A few thin refraction shadows under ligaments, independent of the lesion class: they make
    # "dark band below something" an imperfect malignancy cue, as in real scans.
    for _ in range(int(rng.integers(0, 3))):
        x0, width = rng.uniform(0, canvas), rng.uniform(0.01, 0.03) * size
        start = offset + rng.uniform(0.1, 0.5) * size
        col = np.exp(-((np.arange(canvas) - x0) / width) ** 2)[None, :]
        below = _sigmoid((np.arange(canvas)[:, None] - start) / 3.0)
        echo *= 1 - rng.uniform(0.2, 0.45) * col * below
    settings = {
        "offset": offset,
        "skin_depth": rng.uniform(0.015, 0.04),
        "attenuation": rng.uniform(0.2, 1.0),
        "dynamic_range": rng.uniform(30, 38),
    }
    echo = echo.astype(np.float32)
    for arr in (echo, mask):
        arr.setflags(write=False)
    return echo, mask, settings


def _clipped_normal(rng: np.random.Generator, sigma: float) -> float:
    """Normal draw clipped to +-2.5 sigma (no freak acquisitions)."""
    return float(np.clip(rng.normal(0, sigma), -2.5 * sigma, 2.5 * sigma))


def _probe_matrix(rng: np.random.Generator, size: int, offset: float) -> np.ndarray:
    """Frame->canvas affine map for one acquisition: lateral slide, slight press and rock.

    The pivot is the top centre of the frame (the probe face), as when the probe is rocked.
    Motions are small (sigma: 1 % of the width laterally, 0.5 degree): frames of one lesion
    must stay recognisable as near-duplicates (32x32 thumbnail correlation ~0.95 median), as
    consecutive frames of a real clip are.  Larger slides decorrelate the fine tissue texture.
    """
    dx = _clipped_normal(rng, 0.01) * size
    dy = _clipped_normal(rng, 0.003) * size
    angle = math.radians(_clipped_normal(rng, 0.5))
    scale = 1 + _clipped_normal(rng, 0.007)
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)],
                            [math.sin(angle), math.cos(angle)]])
    pivot_frame = np.array([(size - 1) / 2, 0.0])
    pivot_canvas = np.array([offset + (size - 1) / 2 + dx, offset + dy])
    shift = pivot_canvas - rot @ pivot_frame
    return np.hstack([rot, shift[:, None]]).astype(np.float64)


def _speckle(rng: np.random.Generator, size: int, looks: int = 3) -> np.ndarray:
    """Speckle intensity (mean 1), spatially correlated, with spatial compounding.

    Each look is a complex Gaussian field blurred by an anisotropic point-spread function (wider
    laterally than axially, as for a linear array): Rayleigh amplitude, exponential intensity.
    Averaging a few independent looks (spatial compounding, as modern scanners do) gives the
    calmer gamma-distributed speckle seen in clinical images.
    """
    sx, sy = 1.3 * size / 256, 0.7 * size / 256
    total = np.zeros((size, size), np.float32)
    for _ in range(looks):
        re, im = rng.standard_normal((2, size, size), dtype=np.float32)
        re = cv2.GaussianBlur(re, (0, 0), sx, sigmaY=sy)
        im = cv2.GaussianBlur(im, (0, 0), sx, sigmaY=sy)
        total += re * re + im * im
    return total / max(float(total.mean()), 1e-12)


def ultrasound_frame(lesion: LesionParams, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One B-mode-like frame of a lesion.

    The lesion and its surroundings are fixed by ``lesion``; ``rng`` draws what changes between
    consecutive frames or re-acquisitions: a new speckle realisation, a small probe slide/rock/press,
    and small gain and time-gain-compensation changes.

    Args:
        lesion: the lesion to image (from :func:`ultrasound_lesion`).
        rng: per-frame random source.
        size: side of the square frame in pixels (>= 32).

    Returns:
        uint8 grayscale array of shape ``(size, size)``.
    """
    size = int(size)
    echo_canvas, mask_canvas, anat = _anatomy(lesion, size)
    m = _probe_matrix(rng, size, anat["offset"])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    echo = cv2.warpAffine(echo_canvas, m, (size, size), flags=flags, borderMode=cv2.BORDER_REFLECT)
    mask = cv2.warpAffine(mask_canvas, m, (size, size), flags=flags, borderMode=cv2.BORDER_CONSTANT)
    depth = (np.arange(size, dtype=np.float32) / size)[:, None]

    # Skin: dark coupling layer, bright skin line, then the tissue. Drawn in frame coordinates
    # because the skin stays under the probe face whatever the probe does.
    skin = anat["skin_depth"] + rng.normal(0, 0.002)
    below_skin = _sigmoid((depth - skin) / 0.004)
    echo = 0.15 + below_skin * (echo - 0.15) + 2.0 * np.exp(-((depth - skin) / 0.007) ** 2)

    # Posterior features: beyond the lesion the beam has crossed a path with less (cyst:
    # enhancement) or more (scirrhous cancer: shadowing) attenuation than tissue, so brightness
    # changes with the lesion thickness crossed, column by column, down to the bottom.
    thickness = max(2 * lesion.extent[1] * size, 1.0)
    crossed = np.cumsum(mask, axis=0) / thickness
    posterior = np.exp(lesion.posterior * np.clip(crossed, 0, 1))
    posterior = cv2.GaussianBlur(posterior.astype(np.float32), (0, 0), 0.01 * size + 0.5, sigmaY=0.5)
    echo = echo * posterior

    # Depth attenuation not fully compensated by TGC, and the overall gain of this acquisition.
    attenuation = anat["attenuation"] + rng.normal(0, 0.08)
    gain_db = rng.normal(0, 1.5)
    # The exponent stretches tissue contrast (the display map of real scanners is steeper than
    # plain log compression of our unit-less echogenicity).
    intensity = (echo ** 2) * np.exp(-attenuation * depth * 2) * _speckle(rng, size)

    # Log compression to 8 bit: the top of the dynamic range is slightly above bright tissue.
    dr = anat["dynamic_range"]
    db = 10 * np.log10(np.maximum(intensity, 1e-6)) + gain_db
    img = (db - (8.0 - dr)) / dr * 255
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5 * size / 256 + 0.1)  # scan conversion
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ==================================================================================================
# Items and the data set on disk
# ==================================================================================================
def field_image(seed: int, cell_line: str, index: int, size: int = 1000) -> np.ndarray:
    """Field ``index`` of ``cell_line`` in the data set with ``seed`` (order independent)."""
    rng = item_rng(seed, _KIND_FIELD, CELL_LINES.index(cell_line), index)
    return microscope_field(cell_line, rng, size)


def frame_count(seed: int, label: str, index: int, frames_per_lesion: tuple[int, int]) -> int:
    """How many frames lesion ``index`` of class ``label`` gets (inclusive range)."""
    lo, hi = frames_per_lesion
    rng = item_rng(seed, _KIND_FRAME_COUNT, ULTRASOUND_CLASSES.index(label), index)
    return int(rng.integers(lo, hi + 1))


def lesion_images(seed: int, label: str, index: int, frames_per_lesion: tuple[int, int] = (1, 3),
                  size: int = 256) -> tuple[LesionParams, list[np.ndarray]]:
    """Lesion ``index`` of class ``label`` and its frames (order independent).

    Args:
        seed: data-set seed.
        label: ``"benign"`` or ``"malignant"``.
        index: lesion number within the class.
        frames_per_lesion: inclusive range of the frame count.
        size: frame side in pixels.

    Returns:
        (lesion parameters, list of uint8 frames).
    """
    c = ULTRASOUND_CLASSES.index(label)
    lesion = ultrasound_lesion(label == "malignant", item_rng(seed, _KIND_LESION, c, index))
    n = frame_count(seed, label, index, frames_per_lesion)
    frames = [ultrasound_frame(lesion, item_rng(seed, _KIND_FRAME, c, index, f), size)
              for f in range(n)]
    return lesion, frames


def _normalise_args(seed, fields_per_line, field_size, lesions_per_class, frames_per_lesion,
                    ultrasound_size) -> dict:
    """Validate generate()'s arguments and return them as a JSON-comparable dict."""
    def as_int(name, value, minimum):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        return int(value)

    frames = tuple(frames_per_lesion)
    if len(frames) != 2:
        raise ValueError(f"frames_per_lesion must be (min, max), got {frames_per_lesion!r}")
    lo, hi = as_int("frames_per_lesion[0]", frames[0], 1), as_int("frames_per_lesion[1]", frames[1], 1)
    if hi < lo:
        raise ValueError(f"frames_per_lesion must have min <= max, got {frames_per_lesion!r}")
    return {
        "version": FORMAT_VERSION,
        "seed": as_int("seed", seed, 0),
        "fields_per_line": as_int("fields_per_line", fields_per_line, 0),
        "field_size": as_int("field_size", field_size, 64),
        "lesions_per_class": as_int("lesions_per_class", lesions_per_class, 0),
        "frames_per_lesion": [lo, hi],
        "ultrasound_size": as_int("ultrasound_size", ultrasound_size, 32),
    }


def _summary(out: Path, counts: dict, cached: bool) -> dict:
    """The dict generate() returns: paths (under ``out``) plus counts."""
    return {
        "out_dir": str(out),
        "microscope_dir": str(out / "microscope"),
        "ultrasound_dir": str(out / "ultrasound"),
        "truth_csv": str(out / "ultrasound_truth.csv"),
        "cached": cached,
        **counts,
    }


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def generate(out_dir, *, seed: int = 0, fields_per_line: int = 8, field_size: int = 1000,
             lesions_per_class: int = 40, frames_per_lesion: tuple[int, int] = (1, 3),
             ultrasound_size: int = 256) -> dict:
    """Write the built-in synthetic data set (or reuse it if already there).

    Ultrasound frame numbers are a seeded random permutation within each class, so file names
    reveal nothing about which frames show the same lesion; ``ultrasound_truth.csv`` records it.
    ``synth.json`` (the arguments) is written last and marks a complete data set.

    Args:
        out_dir: target directory; must be missing, empty, or hold this very data set.
        seed: data-set seed (>= 0).
        fields_per_line: microscope fields per cell line.
        field_size: microscope field side in pixels.
        lesions_per_class: lesions per ultrasound class.
        frames_per_lesion: inclusive (min, max) frames per lesion.
        ultrasound_size: ultrasound frame side in pixels.

    Returns:
        Dict with ``out_dir``, ``microscope_dir``, ``ultrasound_dir``, ``truth_csv``, ``cached``
        (True when nothing was written), ``microscope`` ({line: fields}), ``ultrasound``
        ({class: frames}) and ``lesions`` ({class: lesions}).

    Raises:
        ValueError: invalid arguments; ``out_dir`` holds a different synthetic data set, or is
            non-empty without a ``synth.json`` (e.g. an interrupted run; delete it and retry).
    """
    args = _normalise_args(seed, fields_per_line, field_size, lesions_per_class,
                           frames_per_lesion, ultrasound_size)
    out = Path(out_dir)
    marker = out / "synth.json"
    if marker.exists():
        stored = json.loads(marker.read_text())
        if stored.get("args") != args:
            raise ValueError(f"{out} already holds a different synthetic data set "
                             f"({marker}: {stored.get('args')}, requested {args})")
        return _summary(out, stored["counts"], cached=True)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"refusing to write synthetic data into {out}: it is not an empty "
                         f"directory and has no synth.json")

    frames = tuple(args["frames_per_lesion"])
    for line in CELL_LINES:
        folder = out / "microscope" / line
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args["fields_per_line"]):
            _write_png(folder / f"field_{i:04d}.png", field_image(seed, line, i, args["field_size"]))

    rows = []
    for c, label in enumerate(ULTRASOUND_CLASSES):
        folder = out / "ultrasound" / label
        folder.mkdir(parents=True, exist_ok=True)
        n_lesions = args["lesions_per_class"]
        counts = [frame_count(seed, label, i, frames) for i in range(n_lesions)]
        names = iter(item_rng(seed, _KIND_NAMES, c).permutation(sum(counts)))
        for i in range(n_lesions):
            _, images = lesion_images(seed, label, i, frames, args["ultrasound_size"])
            for image in images:
                rel = f"{label}/us_{int(next(names)):04d}.png"
                _write_png(out / "ultrasound" / rel, image)
                rows.append((rel, label, f"{label}-{i:03d}"))
    rows.sort()
    with open(out / "ultrasound_truth.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "lesion"])
        writer.writerows(rows)

    counts = {
        "microscope": {line: args["fields_per_line"] for line in CELL_LINES},
        "ultrasound": {label: sum(r[1] == label for r in rows) for label in ULTRASOUND_CLASSES},
        "lesions": {label: args["lesions_per_class"] for label in ULTRASOUND_CLASSES},
    }
    tmp = out / "synth.json.tmp"
    tmp.write_text(json.dumps({"args": args, "counts": counts}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, marker)  # atomic: a crash never leaves a marker for a partial data set
    return _summary(out, counts, cached=False)


# ==================================================================================================
# Cine loop: a probe sweep over one lesion, as a video file
# ==================================================================================================
def cine_frames(seed: int = 0, label: str = "malignant", frames: int = 90, size: int = 256,
                drift: float = 0.12) -> list[np.ndarray]:
    """Frames of a cine loop: one lesion drifting sideways under the probe, fresh speckle every frame.

    The lesion's anatomy is fixed (as for the frames of one lesion in the data set); each frame has its
    own speckle, gain and small probe jitter (:func:`ultrasound_frame`), and the whole field slides
    sideways and back once over the loop (``drift``: amplitude as a fraction of the frame side), as
    when a sonographer sweeps across a lesion.

    Returns:
        ``frames`` uint8 grayscale ``(size, size)`` arrays.
    """
    if label not in ULTRASOUND_CLASSES:
        raise ValueError(f"label must be one of {ULTRASOUND_CLASSES}, got {label!r}")
    if frames < 1 or size < 32:
        raise ValueError(f"need frames >= 1 and size >= 32, got frames={frames}, size={size}")
    c = ULTRASOUND_CLASSES.index(label)
    lesion = ultrasound_lesion(label == "malignant", item_rng(seed, _KIND_CINE, c))
    out = []
    for f in range(frames):
        image = ultrasound_frame(lesion, item_rng(seed, _KIND_CINE, c, f), size)
        shift = drift * size * math.sin(2 * math.pi * f / frames)
        m = np.float32([[1, 0, shift], [0, 1, 0]])
        out.append(cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT))
    return out


def write_cine(path, *, seed: int = 0, label: str = "malignant", frames: int = 90, fps: float = 30.0,
               size: int = 256) -> Path:
    """Write :func:`cine_frames` as a video file (``.avi`` MJPG, ``.mp4`` mp4v or ``.mkv`` FFV1).

    The demo source of ``msbt stream``. Written to a temporary name and renamed, so a half-written
    video is never left under ``path``.

    Raises:
        ValueError: Unknown container or bad arguments.
        OSError: OpenCV cannot write the file.
    """
    path = Path(path)
    fourcc = VIDEO_CODECS.get(path.suffix.lower())
    if fourcc is None:
        raise ValueError(f"{path}: video must end in one of {', '.join(VIDEO_CODECS)}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    images = cine_frames(seed, label, frames, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc), float(fps), (size, size))
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot open a {fourcc} video writer")
    try:
        for image in images:
            writer.write(cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    finally:
        writer.release()
    os.replace(tmp, path)
    return path
