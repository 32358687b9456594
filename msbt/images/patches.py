"""Cut fixed-size cell patches out of microscope fields.

This is the cell-line preprocessing stage of the paper (Ayana, Park, Choe,
"Multistage Transfer Learning for Breast Cancer Early Diagnosis via
Ultrasound"): adaptive thresholding binarises the field, scikit-image's
``remove_small_objects`` drops debris, OpenCV gives the bounding boxes of the
cell regions and a 200x200 patch is cut around each region.

Every function here is pure (inputs are never modified, no global state, no
randomness unless a seed is passed) and uses only numpy, OpenCV and
scikit-image, so a Ray Data pipeline can call :func:`field_to_patches` per
field in parallel workers without importing TensorFlow.

Conventions
-----------
* Images are ``uint8``: 2-D grayscale ``(H, W)`` or RGB ``(H, W, 3)``.
* Masks are 2-D ``bool`` arrays, ``True`` = cell (foreground).
* Boxes are ``int64`` arrays of shape ``(N, 4)`` holding ``[x, y, w, h]``
  (OpenCV order: x = column, y = row of the top-left corner).
* Connected regions use 8-connectivity everywhere, so "an object" means the
  same thing to ``remove_debris`` (skimage) and ``cell_boxes`` (OpenCV).

Defaults are chosen for 1000x1000 fields with cells roughly 20-80 px across.
"""

from __future__ import annotations

import cv2
import numpy as np
from skimage import morphology

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_OFFSET",
    "AUTO_OFFSET_K",
    "AUTO_OFFSET_MIN",
    "DEFAULT_MIN_OBJECT_SIZE",
    "DEFAULT_CLOSE_RADIUS",
    "DEFAULT_MAX_HOLE_SIZE",
    "DEFAULT_PATCH_SIZE",
    "POLARITIES",
    "LARGE_REGION_POLICIES",
    "to_gray",
    "resolve_polarity",
    "estimate_offset",
    "binarize",
    "remove_debris",
    "cell_boxes",
    "extract_patches",
    "field_to_patches",
    "overlay",
]

# Gaussian neighbourhood for the adaptive threshold.  OpenCV derives the
# Gaussian sigma from the block size (sigma = 0.3 * ((block - 1) / 2 - 1) + 0.8,
# about 23 px for 151), so the block must be well above the cell diameter:
# otherwise the local mean inside an 80 px cell is the cell itself, only its
# rim is segmented, and "auto" polarity can lock onto a phase-contrast halo
# (51 and 101 did both on synthetic 20-80 px cells; 151 and 201 did not).
DEFAULT_BLOCK_SIZE = 151
# Grey levels a pixel must differ from its local mean by to be foreground.
# "auto" = AUTO_OFFSET_K x the field's robust noise sigma (at least
# AUTO_OFFSET_MIN): a fixed 5 floods fields with textured background
# (skimage's cell.png has sigma ~4) with specks.
DEFAULT_OFFSET = "auto"
AUTO_OFFSET_K = 3.0
AUTO_OFFSET_MIN = 2.0
# Smallest region kept: a 20 px cell has ~300 px, specks/debris are far smaller.
DEFAULT_MIN_OBJECT_SIZE = 100
# Closing radius that re-joins a cell's rim fragments before labelling.
DEFAULT_CLOSE_RADIUS = 2
# Holes up to this area are filled: the hollow interior of an 80 px cell
# (~pi * 35^2 ~ 3850 px) is filled, wide background between cell clusters isn't.
DEFAULT_MAX_HOLE_SIZE = 4096
DEFAULT_PATCH_SIZE = 200

POLARITIES = ("dark", "bright", "auto")
LARGE_REGION_POLICIES = ("tile", "center", "resize")


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------
def _check_image(field: np.ndarray, name: str = "field") -> np.ndarray:
    """Validate a uint8 2-D or HxWx3 image and return it as an ndarray."""
    if not isinstance(field, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(field).__name__}")
    if field.dtype != np.uint8:
        # Rescaling 16-bit/float data is a per-dataset decision (bit depth,
        # saturation), so it is refused here rather than guessed.
        raise ValueError(f"{name} must be uint8, got dtype {field.dtype}")
    if not (field.ndim == 2 or (field.ndim == 3 and field.shape[2] == 3)):
        raise ValueError(
            f"{name} must be 2-D (H, W) or RGB (H, W, 3), got shape {field.shape}"
        )
    if field.shape[0] == 0 or field.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {field.shape}")
    return field


def _check_mask(mask: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Validate a 2-D mask (bool or 0/1 integers) and return it as bool."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D numpy array, got {getattr(mask, 'shape', mask)!r}")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must be bool or integer, got dtype {mask.dtype}")
    if shape is not None and mask.shape != tuple(shape[:2]):
        raise ValueError(f"mask shape {mask.shape} does not match field shape {shape[:2]}")
    return np.ascontiguousarray(mask, dtype=bool)


def _check_int(value, name: str, minimum: int) -> int:
    """Return ``value`` as int, rejecting bools, floats and values < minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_boxes(boxes) -> np.ndarray:
    """Return boxes as an (N, 4) int64 array of [x, y, w, h] with w, h >= 1."""
    arr = np.asarray(boxes)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"boxes must be integers, got dtype {arr.dtype}")
    if np.any(arr[:, 2:] < 1):
        raise ValueError("boxes must have w >= 1 and h >= 1")
    return arr.astype(np.int64)


# --------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------
def to_gray(field: np.ndarray) -> np.ndarray:
    """Return the field as a 2-D uint8 grayscale image.

    Args:
        field: uint8 array, 2-D ``(H, W)`` or RGB ``(H, W, 3)``.

    Returns:
        ``(H, W)`` uint8 array (a copy; the input is never modified).

    Raises:
        ValueError: wrong dtype (not uint8) or shape (not 2-D / HxWx3).
        TypeError: not a numpy array.
    """
    field = _check_image(field)
    if field.ndim == 2:
        return field.copy()
    # ITU-R BT.601 luma, the same weights every image library uses.
    return cv2.cvtColor(np.ascontiguousarray(field), cv2.COLOR_RGB2GRAY)


def _check_block_size(block_size) -> int:
    block_size = _check_int(block_size, "block_size", 3)
    if block_size % 2 == 0:
        raise ValueError(f"block_size must be odd, got {block_size}")
    return block_size


def _local_contrast(gray: np.ndarray, block_size: int) -> np.ndarray:
    """``gray`` minus its Gaussian local mean (the adaptive threshold's mean).

    Subtracting the local mean cancels illumination gradients, so statistics
    of this image describe cells and noise, not the lamp.
    """
    g = gray.astype(np.float32)
    local_mean = cv2.GaussianBlur(
        g, (block_size, block_size), 0, borderType=cv2.BORDER_REPLICATE
    )
    return g - local_mean


def _polarity_from_contrast(d: np.ndarray) -> str:
    centred = d.astype(np.float64) - float(d.mean())
    third_moment = float(np.mean(centred * centred * centred))
    # The tolerance absorbs float rounding of the blur on a flat field
    # (real skews are of the order of grey levels cubed).
    return "bright" if third_moment > 1e-6 else "dark"


def _offset_from_contrast(d: np.ndarray) -> float:
    # Median absolute deviation: a noise estimate the (minority) cells barely
    # move, unlike the standard deviation.
    sigma = 1.4826 * float(np.median(np.abs(d - np.median(d))))
    return max(AUTO_OFFSET_K * sigma, AUTO_OFFSET_MIN)


def resolve_polarity(gray: np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE) -> str:
    """Decide whether the cells in a field are darker or brighter than background.

    The local contrast ``d = gray - GaussianBlur(gray, block_size)`` (the same
    local mean the adaptive threshold uses, so illumination gradients cancel)
    is computed and the sign of its third moment picks the polarity: cells
    are a minority of the pixels whose contrast forms the long tail of ``d``,
    a bright tail for bright cells (fluorescence, dark-field) and a dark tail
    for dark cells (brightfield, stained).  Cubing favours the strongest
    contrast, so a cell's thin halo of the opposite sign (phase contrast)
    does not normally outweigh the cell body -- provided ``block_size`` is
    well above the cell size, otherwise the body's contrast is subtracted
    away with the local mean and the halo wins.  A field with no contrast
    (e.g. constant) resolves to ``"dark"``.

    Args:
        gray: image accepted by :func:`to_gray` (RGB is converted).
        block_size: odd int >= 3, Gaussian neighbourhood of the local mean.

    Returns:
        ``"dark"`` or ``"bright"``.
    """
    gray = to_gray(gray)
    block_size = _check_block_size(block_size)
    return _polarity_from_contrast(_local_contrast(gray, block_size))


def estimate_offset(gray: np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE) -> float:
    """Noise-scaled threshold offset used by ``binarize(offset="auto")``.

    ``AUTO_OFFSET_K`` (3) times the robust standard deviation (1.4826 x
    median absolute deviation) of the local contrast, but at least
    ``AUTO_OFFSET_MIN`` (2) grey levels so that a noiseless flat background
    never counts as foreground.  Camera noise and background texture differ
    between microscopes, so a fixed grey-level offset either floods a noisy
    field with specks or misses faint cells on a clean one.

    Args:
        gray: image accepted by :func:`to_gray`.
        block_size: odd int >= 3, as for :func:`binarize`.

    Returns:
        The offset in grey levels (float).
    """
    gray = to_gray(gray)
    block_size = _check_block_size(block_size)
    return _offset_from_contrast(_local_contrast(gray, block_size))


def binarize(
    gray: np.ndarray,
    block_size: int = DEFAULT_BLOCK_SIZE,
    offset: float | str = DEFAULT_OFFSET,
    polarity: str = "auto",
) -> np.ndarray:
    """Binarise a field with OpenCV's Gaussian adaptive threshold.

    A pixel is foreground when it differs from its Gaussian-weighted local
    mean (over ``block_size`` x ``block_size``) by at least ``offset`` grey
    levels in the cell direction: ``gray <= mean - offset`` for ``"dark"``
    cells, ``gray >= mean + offset`` for ``"bright"`` cells (OpenCV uses
    ``floor(offset)`` for a non-integer offset, in both directions).  A local
    threshold copes with uneven illumination that a global Otsu threshold
    would not.

    Args:
        gray: uint8 image, 2-D or RGB (converted with :func:`to_gray`).
        block_size: odd int >= 3, side of the local neighbourhood; make it
            clearly larger than the cells, or big cells come out hollow and
            ``"auto"`` polarity can pick a phase-contrast halo.
        offset: grey levels (number >= 0) a pixel must differ from the local
            mean, or ``"auto"`` for 3 x the field's robust noise level
            (:func:`estimate_offset`).
        polarity: ``"dark"`` (cells darker than background), ``"bright"``
            (cells brighter), or ``"auto"`` (decided by
            :func:`resolve_polarity` from the skew of the local contrast).

    Returns:
        ``(H, W)`` bool mask, True = foreground.

    Raises:
        ValueError: bad image, even/too small block_size, bad offset,
            unknown polarity.
    """
    gray = to_gray(gray)
    block_size = _check_block_size(block_size)
    if isinstance(offset, str):
        if offset != "auto":
            raise ValueError(f'offset must be a number >= 0 or "auto", got {offset!r}')
    elif isinstance(offset, bool) or not isinstance(offset, (int, float, np.integer, np.floating)):
        raise ValueError(f'offset must be a number >= 0 or "auto", got {offset!r}')
    elif not offset >= 0:  # also rejects NaN
        raise ValueError(f"offset must be >= 0, got {offset}")
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")
    if polarity == "auto" or isinstance(offset, str):
        d = _local_contrast(gray, block_size)  # shared by both estimates
        if polarity == "auto":
            polarity = _polarity_from_contrast(d)
        if isinstance(offset, str):
            offset = _offset_from_contrast(d)

    if polarity == "dark":
        # THRESH_BINARY_INV: fg where src <= mean - floor(C)
        out = cv2.adaptiveThreshold(
            gray, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY_INV,
            block_size, float(offset),
        )
    else:
        # THRESH_BINARY: fg where src > mean - ceil(C).  C = 1 - offset makes
        # that src >= mean + floor(offset), symmetric with the dark case.
        out = cv2.adaptiveThreshold(
            gray, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY,
            block_size, 1.0 - float(offset),
        )
    return out > 0


def remove_debris(
    mask: np.ndarray,
    min_object_size: int = DEFAULT_MIN_OBJECT_SIZE,
    close_radius: int = DEFAULT_CLOSE_RADIUS,
    max_hole_size: int = DEFAULT_MAX_HOLE_SIZE,
) -> np.ndarray:
    """Drop small objects (debris, noise specks) from a binary mask.

    Optional clean-up runs first, in this order, so that one cell whose
    threshold broke into a rim of fragments is counted as one object rather
    than as several small ones that would be removed:

    1. morphological closing with an elliptical kernel of radius
       ``close_radius`` (0 = off) re-joins fragments a few pixels apart;
    2. holes (background enclosed by foreground, 8-connected) of at most
       ``max_hole_size`` pixels are filled (0 = off), e.g. the hollow
       interior of a cell larger than the threshold's block size.

    Then every 8-connected object with fewer than ``min_object_size`` pixels
    is removed, via ``skimage.morphology.remove_small_objects(max_size=
    min_object_size - 1)`` (scikit-image 0.26's non-deprecated argument,
    which removes objects of size <= max_size), so no warning is emitted.

    Args:
        mask: 2-D bool (or 0/1 integer) mask.
        min_object_size: int >= 0; objects with fewer pixels are removed, an
            object of exactly this many pixels is kept. 0 or 1 keeps all.
        close_radius: int >= 0, closing radius in pixels (0 = no closing).
        max_hole_size: int >= 0, largest hole area filled (0 = no filling).

    Returns:
        New ``(H, W)`` bool mask.

    Raises:
        ValueError: bad mask or negative parameters.
    """
    mask = _check_mask(mask)
    min_object_size = _check_int(min_object_size, "min_object_size", 0)
    close_radius = _check_int(close_radius, "close_radius", 0)
    max_hole_size = _check_int(max_hole_size, "max_hole_size", 0)

    out = mask.copy()
    if close_radius > 0:
        k = 2 * close_radius + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        # Zero-pad before closing: cv2's default border counts the outside as
        # foreground during the erosion, which would glue objects lying
        # within close_radius of the edge to it.
        p = close_radius
        padded = np.pad(out.view(np.uint8), p)
        closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)
        out = closed[p:-p, p:-p].astype(bool)
    if max_hole_size > 0:
        # Holes are background components, so their connectivity is the dual
        # (4-connectivity) of the 8-connected foreground.
        out = morphology.remove_small_holes(out, max_size=max_hole_size, connectivity=1)
    if min_object_size > 1:
        out = morphology.remove_small_objects(
            out, max_size=min_object_size - 1, connectivity=2
        )
    return out


def cell_boxes(mask: np.ndarray, min_area: int = 0) -> np.ndarray:
    """Bounding boxes of the connected regions of a mask (OpenCV).

    Uses ``cv2.connectedComponentsWithStats`` with 8-connectivity (the same
    objects ``cv2.findContours`` + ``cv2.boundingRect`` would give for
    hole-free masks, plus the exact pixel area).

    Args:
        mask: 2-D bool (or 0/1 integer) mask.
        min_area: int >= 0; regions with fewer pixels are ignored.

    Returns:
        ``(N, 4)`` int64 array of ``[x, y, w, h]``, sorted in reading order
        (by y, then x, then h, then w), so the result does not depend on
        OpenCV's labelling order.
    """
    mask = _check_mask(mask)
    min_area = _check_int(min_area, "min_area", 0)
    _n, _labels, stats, _centroids = cv2.connectedComponentsWithStats(
        mask.view(np.uint8), connectivity=8
    )
    stats = stats[1:]  # label 0 is the background
    stats = stats[stats[:, cv2.CC_STAT_AREA] >= min_area]
    boxes = stats[:, :4].astype(np.int64)
    order = np.lexsort((boxes[:, 2], boxes[:, 3], boxes[:, 0], boxes[:, 1]))
    return boxes[order]


# --------------------------------------------------------------------------
# patch extraction
# --------------------------------------------------------------------------
def _place(start: int, extent: int, size: int, limit: int) -> int:
    """Top-left of a ``size`` window centred on [start, start+extent) in [0, limit).

    The window is shifted inside the field when it would cross the border;
    if the field is smaller than the window it is centred on the field (the
    rest is reflect-padded by :func:`_crop`).
    """
    pos = start + (extent - size) // 2
    if size > limit:
        return (limit - size) // 2
    return min(max(pos, 0), limit - size)


def _tile_segments(start: int, extent: int, size: int, min_step: float) -> list[tuple[int, int]]:
    """Split [start, start+extent) into the (start, extent) spans to centre windows on.

    ``ceil(extent / size)`` windows spread evenly from the region's first to
    its last pixel (overlapping as little as possible); while their spacing
    is below ``min_step`` one window fewer is used, so a region just larger
    than a patch gets one centred window instead of two near-copies.
    """
    n = -(-extent // size)
    while n > 1 and (extent - size) / (n - 1) < min_step:
        n -= 1
    if n == 1:
        return [(start, extent)]
    step = (extent - size) / (n - 1)
    return [(start + int(round(i * step)), size) for i in range(n)]


def _crop(field: np.ndarray, x0: int, y0: int, size: int) -> np.ndarray:
    """``size`` x ``size`` crop at (x0, y0), reflect-padding any part outside."""
    h, w = field.shape[:2]
    x1, y1 = x0 + size, y0 + size
    crop = field[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)]
    pads = ((max(-y0, 0), max(y1 - h, 0)), (max(-x0, 0), max(x1 - w, 0)))
    if any(p for pair in pads for p in pair):
        pads += ((0, 0),) * (field.ndim - 2)
        # "reflect" mirrors without repeating the edge pixel; numpy repeats
        # the reflection when the pad exceeds the image, so any size works.
        # (A 1-pixel axis has nothing to mirror, so edge replication is used.)
        mode = "reflect" if min(crop.shape[:2]) > 1 else "edge"
        crop = np.pad(crop, pads, mode=mode)
    return np.ascontiguousarray(crop)


def extract_patches(
    field: np.ndarray,
    boxes,
    patch_size: int = DEFAULT_PATCH_SIZE,
    large_region_policy: str = "tile",
    max_patches: int | None = None,
    min_center_distance: float | None = None,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut fixed-size square patches centred on cell regions.

    Window placement:

    * A region that fits in a patch (w and h <= ``patch_size``) gets one
      window centred on its bounding box.
    * A region larger than the patch in either direction follows
      ``large_region_policy``:

      - ``"tile"``: a grid of patch-size windows covering the region; along
        each axis ``ceil(extent / patch_size)`` windows are spread evenly
        from the region's start to its end (minimum overlap), using one fewer
        while their spacing is below ``min_center_distance``.
      - ``"center"``: one window centred on the region (its middle only).
      - ``"resize"``: the square window of side ``max(w, h)`` centred on the
        region is cropped and shrunk to ``patch_size`` with
        ``cv2.INTER_AREA`` (whole cell, lower resolution).

    * Border policy: a window that would cross the field border is shifted
      inside the field (so the cell is off-centre but no pixel is invented).
      Only when the field is smaller than the window along an axis is the
      window centred on the field and the missing part filled by reflect
      padding (mirror without repeating the edge pixel); its box then has
      negative x/y and extends past the field.

    Selection (deterministic): regions are visited largest bounding-box
    area first (ties in reading order) -- or in a shuffled order when
    ``seed`` is given -- so big cells claim their window before the small
    fragments around them.  With ``d = min_center_distance`` a candidate
    window is skipped when

    1. the point it is meant to centre (region centre, or tile centre) is
       closer than ``d`` (Chebyshev, i.e. on both axes) to the centre of a
       window already taken -- at the default ``d = patch_size // 2`` that
       is "the region's centre already falls inside a taken window", so a
       cluster of small adjacent cells gives one patch, not twenty
       near-identical ones, and every skipped cell is inside some patch; or
    2. after the border shift its own centre is closer than ``d / 2`` to a
       taken window's centre (two cells by the border whose shifted windows
       nearly coincide).

    ``d = 0`` keeps every window.  Taking stops after ``max_patches``
    windows, so the cap keeps the largest regions.

    Args:
        field: uint8 image, 2-D or RGB ``(H, W, 3)``; patches keep its channels.
        boxes: ``(N, 4)`` int array of region boxes ``[x, y, w, h]``, e.g.
            from :func:`cell_boxes`.
        patch_size: int >= 1, side of the square patches.
        large_region_policy: ``"tile"``, ``"center"`` or ``"resize"``.
        max_patches: int >= 0 cap on the number of patches, None = no cap.
        min_center_distance: number >= 0, see above; None = ``patch_size // 2``.
        seed: None for size order; an int shuffles the region order with
            ``numpy.random.default_rng(seed)`` (unbiased subset under a cap).

    Returns:
        ``(patches, patch_boxes)``: ``patches`` is uint8 ``(K, P, P)`` or
        ``(K, P, P, 3)``; ``patch_boxes`` is int64 ``(K, 4)`` with the
        ``[x, y, w, h]`` field window each patch was cut from (w = h = P,
        or the larger square for ``"resize"``), in selection order.
    """
    field = _check_image(field)
    boxes = _check_boxes(boxes)
    patch_size = _check_int(patch_size, "patch_size", 1)
    if large_region_policy not in LARGE_REGION_POLICIES:
        raise ValueError(
            f"large_region_policy must be one of {LARGE_REGION_POLICIES}, "
            f"got {large_region_policy!r}"
        )
    if max_patches is not None:
        max_patches = _check_int(max_patches, "max_patches", 0)
    if min_center_distance is None:
        min_center_distance = patch_size // 2
    if isinstance(min_center_distance, bool) or min_center_distance < 0:
        raise ValueError(f"min_center_distance must be >= 0, got {min_center_distance!r}")

    h, w = field.shape[:2]
    if seed is None:
        # Largest first: big cells claim their window before the small
        # fragments around them, which are then deduplicated away.
        area = boxes[:, 2] * boxes[:, 3]
        order = np.lexsort((boxes[:, 0], boxes[:, 1], -area))
    else:
        order = np.random.default_rng(seed).permutation(len(boxes))

    windows: list[tuple[int, int, int]] = []  # (x0, y0, side) of taken windows
    taken_centres = np.empty((0, 2), dtype=np.float64)
    half_distance = min_center_distance / 2.0
    cap = max_patches if max_patches is not None else np.inf
    for bx, by, bw, bh in boxes[order]:
        if len(windows) >= cap:
            break
        large = bw > patch_size or bh > patch_size
        # Each candidate: the span it is centred on along x and y, and its side.
        if large and large_region_policy == "tile":
            candidates = [
                (sx, sy, patch_size)
                for sy in _tile_segments(by, bh, patch_size, min_center_distance)
                for sx in _tile_segments(bx, bw, patch_size, min_center_distance)
            ]
        elif large and large_region_policy == "resize":
            candidates = [((bx, bw), (by, bh), int(max(bw, bh)))]
        else:  # fits in a patch, or "center"
            candidates = [((bx, bw), (by, bh), patch_size)]

        for (sx, ex), (sy, ey), side in candidates:
            if len(windows) >= cap:
                break
            target = np.array([sx + ex / 2.0, sy + ey / 2.0])
            x0, y0 = _place(sx, ex, side, w), _place(sy, ey, side, h)
            centre = np.array([x0 + side / 2.0, y0 + side / 2.0])
            if len(windows):
                # Rule 1: the spot this window is for is already (near) the
                #   middle of a taken window -- at the default d = P/2 that
                #   means "inside a taken window", so the cell is covered.
                # Rule 2: after the border shift the window nearly coincides
                #   with a taken one (possible only next to the border).
                cheb_target = np.max(np.abs(taken_centres - target), axis=1)
                cheb_window = np.max(np.abs(taken_centres - centre), axis=1)
                if np.any(cheb_target < min_center_distance) or np.any(
                    cheb_window < half_distance
                ):
                    continue
            windows.append((x0, y0, side))
            taken_centres = np.vstack([taken_centres, centre])

    patch_shape = (patch_size, patch_size) + field.shape[2:]
    patches = np.empty((len(windows),) + patch_shape, dtype=np.uint8)
    for i, (x0, y0, side) in enumerate(windows):
        crop = _crop(field, x0, y0, side)
        if side != patch_size:
            # INTER_AREA averages source pixels: the alias-free way to shrink.
            crop = cv2.resize(crop, (patch_size, patch_size), interpolation=cv2.INTER_AREA)
        patches[i] = crop
    patch_boxes = np.array(
        [(x0, y0, side, side) for x0, y0, side in windows], dtype=np.int64
    ).reshape(-1, 4)
    return patches, patch_boxes


def field_to_patches(
    field: np.ndarray,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    offset: float | str = DEFAULT_OFFSET,
    min_object_size: int = DEFAULT_MIN_OBJECT_SIZE,
    patch_size: int = DEFAULT_PATCH_SIZE,
    max_patches: int | None = None,
    large_region_policy: str = "tile",
    polarity: str = "auto",
    close_radius: int = DEFAULT_CLOSE_RADIUS,
    max_hole_size: int = DEFAULT_MAX_HOLE_SIZE,
    min_center_distance: float | None = None,
    seed: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole preprocessing of one microscope field: the pipeline's entry point.

    ``to_gray`` -> ``binarize`` -> ``remove_debris`` -> ``cell_boxes`` ->
    ``extract_patches``.  Segmentation runs on the grayscale image; patches
    are cut from ``field`` as given (RGB stays RGB).

    Args:
        field: uint8 image, 2-D or RGB ``(H, W, 3)``.
        block_size, offset, polarity: see :func:`binarize`.
        min_object_size, close_radius, max_hole_size: see :func:`remove_debris`.
        patch_size, max_patches, large_region_policy, min_center_distance,
            seed: see :func:`extract_patches`.

    Returns:
        ``(patches, patch_boxes, mask)``: uint8 ``(K, P, P[, 3])`` patches,
        int64 ``(K, 4)`` field windows ``[x, y, w, h]`` they were cut from,
        and the cleaned ``(H, W)`` bool cell mask.
    """
    gray = to_gray(field)
    mask = binarize(gray, block_size=block_size, offset=offset, polarity=polarity)
    mask = remove_debris(
        mask,
        min_object_size=min_object_size,
        close_radius=close_radius,
        max_hole_size=max_hole_size,
    )
    boxes = cell_boxes(mask)
    patches, patch_boxes = extract_patches(
        field,
        boxes,
        patch_size=patch_size,
        large_region_policy=large_region_policy,
        max_patches=max_patches,
        min_center_distance=min_center_distance,
        seed=seed,
    )
    return patches, patch_boxes, mask


def overlay(
    field: np.ndarray,
    mask: np.ndarray,
    boxes,
    *,
    tint=(255, 0, 0),
    alpha: float = 0.35,
    box_color=(0, 255, 0),
    thickness: int = 2,
) -> np.ndarray:
    """Draw the mask as a colour tint and the boxes as rectangles, for checking.

    Args:
        field: uint8 image, 2-D or RGB.
        mask: ``(H, W)`` bool mask (e.g. from :func:`field_to_patches`).
        boxes: ``(N, 4)`` ``[x, y, w, h]`` boxes; parts outside are clipped.
        tint: RGB colour blended into mask pixels.
        alpha: tint opacity in [0, 1].
        box_color: RGB colour of the rectangles.
        thickness: rectangle line width in pixels.

    Returns:
        New ``(H, W, 3)`` uint8 RGB image.
    """
    field = _check_image(field)
    mask = _check_mask(mask, field.shape)
    boxes = _check_boxes(boxes)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = cv2.cvtColor(field, cv2.COLOR_GRAY2RGB) if field.ndim == 2 else field.copy()
    rgb = np.ascontiguousarray(rgb)
    if mask.any():
        blended = (1.0 - alpha) * rgb[mask] + alpha * np.asarray(tint, dtype=np.float64)
        rgb[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    for x, y, bw, bh in boxes:
        cv2.rectangle(
            rgb, (int(x), int(y)), (int(x + bw - 1), int(y + bh - 1)),
            tuple(int(c) for c in box_color), thickness,
        )
    return rgb
