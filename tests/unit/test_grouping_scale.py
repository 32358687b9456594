"""Grouping at scale: multi-index hashing finds exactly the links of comparing every pair."""

import numpy as np
import pytest

from helpers import reference_links
from msbt.images.grouping import connected_groups, find_links, near_pairs


def random_collection(n, seed):
    """Random 64-bit hashes and unit thumbnails with planted near-duplicates (few flipped bits, a
    correlated thumbnail), some exact copies, and a dense cluster of similar hashes."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, np.iinfo(np.int64).max, n, dtype=np.int64).astype(np.uint64)
    thumbs = rng.normal(size=(n, 64)).astype(np.float32)
    digests = [f"d{i}" for i in range(n)]
    for _ in range(n // 5):
        a, b = rng.integers(0, n, 2)
        flipped = hashes[a]
        for bit in rng.choice(64, rng.integers(0, 14), replace=False):
            flipped ^= np.uint64(1) << np.uint64(bit)
        hashes[b] = flipped
        thumbs[b] = thumbs[a] + rng.normal(0, rng.uniform(0.1, 1.0), 64)
        if rng.random() < 0.1:
            digests[b] = digests[a]
    cluster = rng.integers(0, n, n // 20)  # many hashes within a few bits of one value
    for c in cluster:
        hashes[c] = hashes[0] ^ (np.uint64(1) << np.uint64(rng.integers(0, 64)))
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    thumbs /= np.linalg.norm(thumbs, axis=1, keepdims=True)
    return hashes, thumbs.astype(np.float32), digests


@pytest.mark.parametrize("max_distance", [0, 3, 10, 16])
def test_multi_index_finds_exactly_the_pairs_of_the_full_comparison(max_distance):
    hashes, _, _ = random_collection(3000, seed=max_distance)
    blocks = near_pairs(hashes, max_distance, method="blocks", chunk=5000)  # small chunk: the piecewise path
    full = near_pairs(hashes, max_distance, method="compare")
    assert len(full[0]) > 100  # the planted pairs are there to be found
    np.testing.assert_array_equal(blocks[0], full[0])
    np.testing.assert_array_equal(blocks[1], full[1])


@pytest.mark.parametrize("seed", [1, 2])
def test_links_and_groups_equal_the_quadratic_version(seed):
    hashes, thumbs, digests = random_collection(4000, seed)
    links = find_links(hashes, thumbs, max_distance=10, min_similarity=0.8, digests=digests)
    pairs, distance, similarity = reference_links(hashes, thumbs, 10, 0.8, digests)
    assert len(pairs) > 50
    np.testing.assert_array_equal(links.pairs, pairs)
    np.testing.assert_array_equal(links.distance, distance)
    np.testing.assert_array_equal(links.similarity, similarity)
    np.testing.assert_array_equal(connected_groups(len(hashes), links.pairs), connected_groups(len(hashes), pairs))


def test_auto_method_chooses_blocks_for_large_sets_and_stays_exact():
    hashes, _, _ = random_collection(6000, seed=5)
    auto = near_pairs(hashes, 10)
    blocks = near_pairs(hashes, 10, method="blocks")
    np.testing.assert_array_equal(auto[0], blocks[0])
    np.testing.assert_array_equal(auto[1], blocks[1])
    # Spot-check against the definition on a sample of hashes.
    rng = np.random.default_rng(0)
    found = set(zip(auto[0].tolist(), auto[1].tolist()))
    for i in rng.choice(len(hashes), 40, replace=False):
        d = np.bitwise_count(hashes[i] ^ hashes)
        expected = {(min(i, j), max(i, j)) for j in np.nonzero(d <= 10)[0] if j != i}
        assert expected <= found


def test_empty_and_single_inputs():
    for n in (0, 1):
        i, j = near_pairs(np.zeros(n, np.uint64), 10, method="blocks")
        assert len(i) == len(j) == 0
    with pytest.raises(ValueError, match="unknown method"):
        near_pairs(np.zeros(3, np.uint64), 10, method="bk-tree")


@pytest.mark.parametrize("max_distance", [24, 40])
def test_large_distances_stay_exact_whatever_the_block_plan(max_distance):
    hashes, _, _ = random_collection(1500, seed=max_distance)
    blocks = near_pairs(hashes, max_distance, method="blocks")
    full = near_pairs(hashes, max_distance, method="compare")
    np.testing.assert_array_equal(blocks[0], full[0])
    np.testing.assert_array_equal(blocks[1], full[1])
