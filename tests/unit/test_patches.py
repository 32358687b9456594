"""Tests for msbt.images.patches on small synthetic fields with known answers."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest

from msbt.images import patches as P

# Two dark discs and three 3-pixel debris specks on a flat 300x300 field.
DISCS = [((80, 90), 20), ((210, 200), 30)]  # ((cx, cy), r)
SPECKS = [(20, 250), (150, 30), (260, 60)]  # (x, y) of a horizontal 3-px run
BG, FG = 200, 60


def _disc_field(bg=BG, fg=FG, shape=(300, 300)):
    img = np.full(shape, bg, dtype=np.uint8)
    for (cx, cy), r in DISCS:
        cv2.circle(img, (cx, cy), r, int(fg), -1)
    for x, y in SPECKS:
        img[y, x:x + 3] = fg
    return img


def _disc_mask(shape=(300, 300)):
    m = np.zeros(shape, np.uint8)
    for (cx, cy), r in DISCS:
        cv2.circle(m, (cx, cy), r, 1, -1)
    return m.astype(bool)


@pytest.fixture
def field():
    return _disc_field()


@pytest.fixture
def no_warnings():
    """Turn every warning into an error inside the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------- to_gray
def test_to_gray_passes_2d_through_as_copy(field):
    g = P.to_gray(field)
    assert g.dtype == np.uint8 and g.shape == field.shape
    np.testing.assert_array_equal(g, field)
    g[0, 0] = 0
    assert field[0, 0] == BG  # a copy, never a view


def test_to_gray_rgb_uses_luma():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    g = P.to_gray(rgb)
    assert g.shape == (4, 5) and g.dtype == np.uint8
    assert np.all(g == 76)  # 0.299 * 255


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((10, 10), np.float32),
        np.zeros((10, 10), np.uint16),
        np.zeros((10, 10), bool),
        np.zeros(10, np.uint8),
        np.zeros((10, 10, 4), np.uint8),
        np.zeros((2, 10, 10, 3), np.uint8),
        np.zeros((0, 10), np.uint8),
    ],
)
def test_to_gray_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        P.to_gray(bad)


def test_to_gray_rejects_non_array():
    with pytest.raises(TypeError):
        P.to_gray([[1, 2], [3, 4]])


# ---------------------------------------------------------------- binarize
def test_binarize_finds_both_discs(field):
    mask = P.binarize(field, polarity="dark")
    assert mask.dtype == bool and mask.shape == field.shape
    truth = _disc_mask()
    for (cx, cy), _r in DISCS:
        assert mask[cy, cx]  # centres are foreground (not hollow)
    # Disc pixels found, background far from the discs is clean.
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95
    assert not mask[245:295, 120:290].any()


@pytest.mark.parametrize("block_size", [2, 50, 1, 0, -3, 3.0, True])
def test_binarize_rejects_bad_block_size(field, block_size):
    with pytest.raises(ValueError):
        P.binarize(field, block_size=block_size)


@pytest.mark.parametrize("kwargs", [{"offset": -1}, {"offset": "big"}, {"offset": float("nan")},
                                    {"polarity": "light"}])
def test_binarize_rejects_bad_options(field, kwargs):
    with pytest.raises(ValueError):
        P.binarize(field, **kwargs)


def test_binarize_offset_is_symmetric_and_inclusive():
    # Flat field with one pixel 10 darker and one 10 brighter.  With a large
    # block the pixel's own weight in the Gaussian mean is < 1 %, so the
    # (rounded) local mean stays 100 everywhere.
    img = np.full((81, 81), 100, np.uint8)
    img[20, 20] = 90
    img[60, 60] = 110
    for polarity, (y, x) in (("dark", (20, 20)), ("bright", (60, 60))):
        hit = P.binarize(img, block_size=31, offset=10, polarity=polarity)
        assert hit[y, x] and hit.sum() == 1, polarity
        assert not P.binarize(img, block_size=31, offset=11, polarity=polarity).any()
        # Non-integer offsets act as floor(offset) in both directions.
        assert P.binarize(img, block_size=31, offset=10.7, polarity=polarity).sum() == 1


def test_binarize_auto_offset_ignores_noise():
    rng = np.random.default_rng(0)
    noisy = np.clip(_disc_field().astype(float) + rng.normal(0, 4, (300, 300)), 0, 255)
    noisy = noisy.astype(np.uint8)
    fixed = P.binarize(noisy, offset=2, polarity="dark")
    auto = P.binarize(noisy, offset="auto", polarity="dark")
    background = ~_disc_mask()
    assert fixed[background].mean() > 0.2  # offset 2 < noise: specks everywhere
    assert auto[background].mean() < 0.01
    assert all(auto[cy, cx] for (cx, cy), _ in DISCS)


def test_estimate_offset_scales_with_noise():
    rng = np.random.default_rng(1)
    noisy = np.clip(128 + rng.normal(0, 5, (200, 200)), 0, 255).astype(np.uint8)
    assert 12.0 < P.estimate_offset(noisy) < 17.0  # 3 x sigma(5)
    assert P.estimate_offset(np.full((50, 50), 7, np.uint8)) == P.AUTO_OFFSET_MIN


# ---------------------------------------------------------------- polarity
def _gradient(shape=(300, 300)):
    return np.linspace(-40, 40, shape[1])[None, :]


def test_polarity_auto_dark_on_bright():
    img = np.clip(_disc_field(bg=180, fg=80).astype(float) + _gradient(), 0, 255).astype(np.uint8)
    assert P.resolve_polarity(img) == "dark"
    np.testing.assert_array_equal(P.binarize(img), P.binarize(img, polarity="dark"))


def test_polarity_auto_bright_on_dark():
    img = np.clip(_disc_field(bg=50, fg=170).astype(float) + _gradient(), 0, 255).astype(np.uint8)
    assert P.resolve_polarity(img) == "bright"
    mask = P.binarize(img)
    np.testing.assert_array_equal(mask, P.binarize(img, polarity="bright"))
    assert all(mask[cy, cx] for (cx, cy), _ in DISCS)


def test_polarity_auto_ignores_thin_opposite_halo():
    # Phase-contrast look: dark cells ringed by a thin bright halo.
    img = np.full((300, 300), 120, np.uint8)
    for (cx, cy), r in DISCS:
        cv2.circle(img, (cx, cy), r + 3, 170, -1)
        cv2.circle(img, (cx, cy), r, 60, -1)
    assert P.resolve_polarity(img) == "dark"


def test_polarity_of_flat_field_is_dark():
    assert P.resolve_polarity(np.full((30, 30), 9, np.uint8)) == "dark"


# ---------------------------------------------------------------- remove_debris
def test_remove_debris_drops_specks_keeps_discs(field, no_warnings):
    mask = P.binarize(field, polarity="dark")
    assert all(mask[y, x:x + 3].all() for x, y in SPECKS)  # specks were thresholded
    clean = P.remove_debris(mask, min_object_size=100)
    assert not any(clean[y, x:x + 3].any() for x, y in SPECKS)
    n_labels, _ = cv2.connectedComponents(clean.astype(np.uint8), connectivity=8)
    assert n_labels - 1 == 2
    np.testing.assert_array_equal(clean & _disc_mask(), mask & _disc_mask())


@pytest.mark.parametrize("size", [2, 5, 64, 65, 100])
def test_remove_debris_exact_boundary(size, no_warnings):
    mask = np.zeros((20, 230), bool)
    mask[2, 0:size] = True          # exactly min_object_size pixels: kept
    mask[10, 0:size - 1] = True     # one pixel fewer: removed
    out = P.remove_debris(mask, min_object_size=size, close_radius=0, max_hole_size=0)
    assert out[2].sum() == size
    assert out[10].sum() == 0


def test_remove_debris_counts_diagonal_neighbours(no_warnings):
    mask = np.zeros((10, 10), bool)
    mask[np.arange(4), np.arange(4)] = True  # 4 pixels touching only diagonally
    out = P.remove_debris(mask, min_object_size=4, close_radius=0, max_hole_size=0)
    np.testing.assert_array_equal(out, mask)


@pytest.mark.parametrize("min_object_size", [0, 1])
def test_remove_debris_zero_keeps_everything(min_object_size, no_warnings):
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = True
    out = P.remove_debris(mask, min_object_size=min_object_size, close_radius=0, max_hole_size=0)
    np.testing.assert_array_equal(out, mask)


def test_remove_debris_emits_no_warning_with_defaults(field, recwarn):
    for mask in (P.binarize(field), np.zeros((30, 30), bool), np.ones((30, 30), bool)):
        P.remove_debris(mask)
    assert len(recwarn) == 0


def test_remove_debris_closing_joins_fragments(no_warnings):
    # A disc cut by a 1-px cross into 4 quarters of ~70 px each.
    mask = np.zeros((60, 60), np.uint8)
    cv2.circle(mask, (30, 30), 10, 1, -1)
    mask[30, :] = 0
    mask[:, 30] = 0
    mask = mask.astype(bool)
    assert not P.remove_debris(mask, 150, close_radius=0, max_hole_size=0).any()
    joined = P.remove_debris(mask, 150, close_radius=1, max_hole_size=0)
    n_labels, _ = cv2.connectedComponents(joined.astype(np.uint8), connectivity=8)
    assert n_labels - 1 == 1 and joined.sum() >= mask.sum()


def test_remove_debris_closing_does_not_glue_to_border(no_warnings):
    mask = np.zeros((40, 40), bool)
    mask[10:20, 1:11] = True  # one pixel away from the left edge
    out = P.remove_debris(mask, 1, close_radius=3, max_hole_size=0)
    assert not out[:, 0].any()
    np.testing.assert_array_equal(out, mask)


def test_remove_debris_fills_holes_up_to_size(no_warnings):
    mask = np.zeros((50, 50), bool)
    mask[10:30, 10:30] = True
    mask[15:25, 15:25] = False  # 100-pixel hole
    assert P.remove_debris(mask, 1, close_radius=0, max_hole_size=100)[15:25, 15:25].all()
    assert not P.remove_debris(mask, 1, close_radius=0, max_hole_size=99)[15:25, 15:25].any()


def test_remove_debris_does_not_modify_input():
    mask = np.zeros((30, 30), bool)
    mask[3, 3] = True
    before = mask.copy()
    P.remove_debris(mask, 5)
    np.testing.assert_array_equal(mask, before)


@pytest.mark.parametrize("kwargs", [{"min_object_size": -1}, {"min_object_size": 2.5},
                                    {"close_radius": -1}, {"max_hole_size": -1}])
def test_remove_debris_rejects_bad_params(kwargs):
    with pytest.raises(ValueError):
        P.remove_debris(np.zeros((5, 5), bool), **kwargs)


def test_remove_debris_rejects_non_mask():
    with pytest.raises(ValueError):
        P.remove_debris(np.zeros((5, 5), np.float32))
    with pytest.raises(ValueError):
        P.remove_debris(np.zeros((5, 5, 3), bool))


# ---------------------------------------------------------------- cell_boxes
def test_cell_boxes_match_discs(field):
    boxes = P.cell_boxes(P.remove_debris(P.binarize(field, polarity="dark"), 100))
    assert boxes.shape == (2, 4) and boxes.dtype == np.int64
    expected = np.array([[cx - r, cy - r, 2 * r + 1, 2 * r + 1] for (cx, cy), r in DISCS])
    np.testing.assert_allclose(boxes, expected, atol=1)


def test_cell_boxes_sorted_reading_order_and_min_area():
    mask = np.zeros((50, 50), bool)
    mask[30:32, 5:7] = True     # 4 px, lower left
    mask[10:13, 40:43] = True   # 9 px, upper right
    mask[10:15, 20:25] = True   # 25 px, upper middle
    boxes = P.cell_boxes(mask)
    np.testing.assert_array_equal(
        boxes, [[20, 10, 5, 5], [40, 10, 3, 3], [5, 30, 2, 2]]
    )
    np.testing.assert_array_equal(P.cell_boxes(mask, min_area=9), [[20, 10, 5, 5], [40, 10, 3, 3]])
    assert P.cell_boxes(np.zeros((8, 8), bool)).shape == (0, 4)


# ---------------------------------------------------------------- extract_patches
def _dark_centroid(patch, thresh=128):
    ys, xs = np.nonzero(patch < thresh)
    return xs.mean(), ys.mean()


def test_patches_are_centred_on_discs(field):
    boxes = np.array([[cx - r, cy - r, 2 * r + 1, 2 * r + 1] for (cx, cy), r in DISCS])
    patches, pboxes = P.extract_patches(field, boxes, patch_size=100)
    assert patches.shape == (2, 100, 100) and patches.dtype == np.uint8
    assert pboxes.shape == (2, 4)
    # Largest region first.
    order = [1, 0]
    for k, i in enumerate(order):
        (cx, cy), _r = DISCS[i]
        x0, y0, w, h = pboxes[k]
        assert (w, h) == (100, 100)
        assert abs(x0 + 50 - cx) <= 1 and abs(y0 + 50 - cy) <= 1
        np.testing.assert_array_equal(patches[k], field[y0:y0 + 100, x0:x0 + 100])
        px, py = _dark_centroid(patches[k])
        assert abs(px - 49.5) <= 1 and abs(py - 49.5) <= 1


def test_border_windows_shift_inside_field():
    img = np.full((300, 300), 200, np.uint8)
    cv2.circle(img, (10, 290), 8, 0, -1)  # near the bottom-left corner
    patches, pboxes = P.extract_patches(img, [[2, 282, 17, 17]], patch_size=100)
    np.testing.assert_array_equal(pboxes, [[0, 200, 100, 100]])
    np.testing.assert_array_equal(patches[0], img[200:300, 0:100])


def test_field_smaller_than_patch_is_reflect_padded():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (50, 60), dtype=np.uint8)
    patches, pboxes = P.extract_patches(small, [[20, 20, 5, 5]], patch_size=100)
    np.testing.assert_array_equal(pboxes, [[-20, -25, 100, 100]])
    p = patches[0]
    np.testing.assert_array_equal(p[25:75, 20:80], small)
    np.testing.assert_array_equal(p[24, 20:80], small[1])   # mirror, edge not repeated
    np.testing.assert_array_equal(p[75, 20:80], small[-2])
    np.testing.assert_array_equal(p[25:75, 19], small[:, 1])


def test_rgb_field_gives_rgb_patches():
    rgb = np.dstack([_disc_field(), np.zeros((300, 300), np.uint8), _disc_field(bg=10, fg=250)])
    patches, pboxes, mask = P.field_to_patches(rgb, patch_size=100)
    assert patches.shape == (2, 100, 100, 3)
    for patch, (x0, y0, w, h) in zip(patches, pboxes):
        np.testing.assert_array_equal(patch, rgb[y0:y0 + h, x0:x0 + w])


BIG = np.array([[50, 40, 500, 320]])  # region larger than a 200 patch


def _big_field():
    img = np.full((600, 700), 220, np.uint8)
    img[40:360, 50:550] = 30
    return img


def test_large_region_tile_covers_region():
    patches, pboxes = P.extract_patches(_big_field(), BIG, 200, large_region_policy="tile")
    # x: ceil(500/200)=3 windows (spacing 150), y: ceil(320/200)=2 (spacing 120).
    assert patches.shape == (6, 200, 200)
    assert sorted(set(pboxes[:, 0])) == [50, 200, 350]
    assert sorted(set(pboxes[:, 1])) == [40, 160]
    assert np.all(patches == 30)  # all tiles inside the region
    assert np.all(pboxes[:, 2:] == 200)


def test_tile_of_slightly_large_region_is_one_window():
    img = np.zeros((400, 400), np.uint8)
    box = [[50, 50, 210, 100]]
    patches, pboxes = P.extract_patches(img, box, patch_size=200, large_region_policy="tile")
    np.testing.assert_array_equal(pboxes, [[55, 0, 200, 200]])
    patches, pboxes = P.extract_patches(img, box, 200, "tile", min_center_distance=0)
    np.testing.assert_array_equal(pboxes, [[50, 0, 200, 200], [60, 0, 200, 200]])


def test_large_region_center_policy():
    patches, pboxes = P.extract_patches(_big_field(), BIG, 200, large_region_policy="center")
    np.testing.assert_array_equal(pboxes, [[200, 100, 200, 200]])
    assert patches.shape == (1, 200, 200)


def test_large_region_resize_policy():
    # Texture, so that the interpolation method matters.
    img = np.random.default_rng(0).integers(0, 256, (600, 700), dtype=np.uint8)
    patches, pboxes = P.extract_patches(img, BIG, patch_size=200, large_region_policy="resize")
    np.testing.assert_array_equal(pboxes, [[50, 0, 500, 500]])
    assert patches.shape == (1, 200, 200)
    expected = cv2.resize(img[0:500, 50:550], (200, 200), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(patches[0], expected)


def test_resize_window_larger_than_field_is_padded():
    img = np.random.default_rng(1).integers(0, 256, (300, 700), dtype=np.uint8)
    patches, pboxes = P.extract_patches(img, [[100, 50, 500, 200]], 200, "resize")
    # side 500 > field height 300: centred on the field, reflect-padded.
    np.testing.assert_array_equal(pboxes, [[100, -100, 500, 500]])
    padded = np.pad(img, ((100, 100), (0, 0)), mode="reflect")[:, 100:600]
    expected = cv2.resize(padded, (200, 200), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(patches[0], expected)


def test_small_region_ignores_large_policy():
    img = np.zeros((300, 300), np.uint8)
    for policy in P.LARGE_REGION_POLICIES:
        _, pboxes = P.extract_patches(img, [[100, 100, 20, 20]], 100, policy)
        np.testing.assert_array_equal(pboxes, [[60, 60, 100, 100]])


def _spread_boxes():
    # Five regions far apart, distinct sizes: 10, 30, 20, 40, 5 px square.
    return np.array([[10, 10, 10, 10], [300, 10, 30, 30], [10, 300, 20, 20],
                     [300, 300, 40, 40], [160, 160, 5, 5]])


def test_max_patches_keeps_largest_regions():
    img = np.zeros((500, 500), np.uint8)
    patches, pboxes = P.extract_patches(img, _spread_boxes(), 100, max_patches=3)
    assert patches.shape == (3, 100, 100)
    # regions 40, 30, 20 px, in that order
    np.testing.assert_array_equal(pboxes[:, :2], [[270, 270], [265, 0], [0, 260]])
    assert len(P.extract_patches(img, _spread_boxes(), 100)[0]) == 5
    empty, eboxes = P.extract_patches(img, _spread_boxes(), 100, max_patches=0)
    assert empty.shape == (0, 100, 100) and eboxes.shape == (0, 4)


def test_seed_shuffles_deterministically():
    img = np.zeros((500, 500), np.uint8)
    a = P.extract_patches(img, _spread_boxes(), 100, max_patches=3, seed=7)[1]
    b = P.extract_patches(img, _spread_boxes(), 100, max_patches=3, seed=7)[1]
    np.testing.assert_array_equal(a, b)
    subsets = {tuple(map(tuple, P.extract_patches(img, _spread_boxes(), 100, max_patches=2,
                                                   seed=s)[1])) for s in range(10)}
    assert len(subsets) > 1


def test_cluster_of_small_cells_gives_one_patch():
    img = np.zeros((400, 400), np.uint8)
    # 3x3 grid of 8 px cells, 15 px apart, around (200, 200); centre one biggest.
    boxes = [[186 + 15 * i, 186 + 15 * j, 8, 8] for i in range(3) for j in range(3)]
    boxes[4] = [197, 197, 10, 10]
    patches, pboxes = P.extract_patches(img, boxes, patch_size=100)
    np.testing.assert_array_equal(pboxes, [[152, 152, 100, 100]])
    assert len(P.extract_patches(img, boxes, 100, min_center_distance=0)[0]) == 9


def test_skipped_cells_stay_inside_a_patch_and_far_cells_get_their_own():
    img = np.zeros((400, 400), np.uint8)
    boxes = [[100, 100, 20, 20], [145, 100, 5, 5], [160, 100, 5, 5]]
    _, pboxes = P.extract_patches(img, boxes, patch_size=100)
    # (147, 102) lies in the first window [60, 160); (162, 102) does not.
    np.testing.assert_array_equal(pboxes, [[60, 60, 100, 100], [112, 52, 100, 100]])


def test_near_identical_border_windows_are_skipped():
    img = np.zeros((300, 300), np.uint8)
    # A: centre y 249.5 -> window y 199..299.  B: centre y 299 (last rows), its
    # window would be shifted to y 200 -- one pixel from A's.
    boxes = [[100, 240, 20, 19], [105, 298, 5, 2]]
    _, pboxes = P.extract_patches(img, boxes, patch_size=100)
    np.testing.assert_array_equal(pboxes, [[60, 199, 100, 100]])
    _, pboxes = P.extract_patches(img, boxes, patch_size=100, min_center_distance=0)
    assert len(pboxes) == 2


def test_extract_patches_empty_boxes():
    img = np.zeros((300, 300, 3), np.uint8)
    patches, pboxes = P.extract_patches(img, np.zeros((0, 4), int), patch_size=64)
    assert patches.shape == (0, 64, 64, 3) and pboxes.shape == (0, 4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"boxes": [[1, 2, 3]]},
        {"boxes": [[1.0, 2.0, 3.0, 4.0]]},
        {"boxes": [[1, 2, 0, 4]]},
        {"patch_size": 0},
        {"large_region_policy": "crop"},
        {"max_patches": -1},
        {"min_center_distance": -5},
    ],
)
def test_extract_patches_rejects_bad_args(kwargs):
    args = {"field": np.zeros((50, 50), np.uint8), "boxes": [[1, 2, 3, 4]]} | kwargs
    with pytest.raises(ValueError):
        P.extract_patches(**args)


# ---------------------------------------------------------------- pipeline
def test_field_to_patches_end_to_end(field, no_warnings):
    before = field.copy()
    patches, pboxes, mask = P.field_to_patches(field, patch_size=100)
    np.testing.assert_array_equal(field, before)  # pure
    assert patches.shape == (2, 100, 100)
    assert not any(mask[y, x:x + 3].any() for x, y in SPECKS)
    assert ((mask & _disc_mask()).sum() / (mask | _disc_mask()).sum()) > 0.95
    centres = sorted((x + w / 2, y + h / 2) for x, y, w, h in pboxes)
    for (px, py), ((cx, cy), _r) in zip(centres, DISCS):
        assert abs(px - cx - 0.5) <= 1 and abs(py - cy - 0.5) <= 1
    again = P.field_to_patches(field, patch_size=100)
    np.testing.assert_array_equal(again[0], patches)
    np.testing.assert_array_equal(again[1], pboxes)


def test_field_to_patches_defaults_on_noisy_field():
    rng = np.random.default_rng(3)
    img = _disc_field(bg=150, fg=100).astype(float) + _gradient() / 2 + rng.normal(0, 3, (300, 300))
    img = np.clip(img, 0, 255).astype(np.uint8)
    patches, pboxes, mask = P.field_to_patches(img)
    assert patches.shape == (2, 200, 200)  # both discs, no noise regions
    assert len(P.cell_boxes(mask)) == 2


# ---------------------------------------------------------------- overlay
def test_overlay_draws_tint_and_boxes(field):
    mask = _disc_mask()
    before = field.copy()
    out = P.overlay(field, mask, [[10, 20, 30, 40]], tint=(255, 0, 0), box_color=(0, 255, 0),
                    thickness=1)
    np.testing.assert_array_equal(field, before)
    assert out.shape == (300, 300, 3) and out.dtype == np.uint8
    (cx, cy), _ = DISCS[0]
    assert out[cy, cx, 0] > out[cy, cx, 1]  # red tint on a grey cell
    np.testing.assert_array_equal(out[150, 5], [BG, BG, BG])  # untouched background
    np.testing.assert_array_equal(out[20, 10], [0, 255, 0])   # box corner
    np.testing.assert_array_equal(out[59, 39], [0, 255, 0])   # opposite corner
    assert not np.array_equal(out[60, 40], [0, 255, 0])


def test_overlay_rejects_mismatched_mask(field):
    with pytest.raises(ValueError):
        P.overlay(field, np.zeros((10, 10), bool), [])
