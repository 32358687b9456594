"""Finding images of the same lesion from their content, so a split can keep them together.

Real ultrasound sets hold several frames or re-acquisitions of one lesion under unrelated file names. Two
images are linked when (1) their perceptual hashes are close and (2) their small grayscale thumbnails are
strongly correlated; groups are the connected components of those links. The hash makes the search cheap
(multi-index hashing finds the pairs within a Hamming distance without comparing all of them); the
correlation check stops the chaining that a hash threshold alone causes on a modality where every image is "dark blob on speckle". Byte-identical files are always
linked. Nothing here reads file names. No Ray, no TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from math import comb

import cv2
import numpy as np

THUMB = 32  # thumbnail side; also the DCT size of the perceptual hash
HASH = 8  # the hash keeps the HASH x HASH lowest DCT frequencies -> 64 bits


def fingerprint(rgb: np.ndarray) -> tuple[np.uint64, np.ndarray]:
    """Perceptual hash and normalised thumbnail of one image.

    Args:
        rgb: (H, W, 3) or (H, W) uint8 image.

    Returns:
        (hash, thumb): a 64-bit DCT hash, and a zero-mean unit-norm float32 vector of the 32x32
        grayscale thumbnail, so that a dot product of two thumbs is their Pearson correlation.
    """
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    small = cv2.resize(gray, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:HASH, :HASH].ravel()
    # Bits say whether each low frequency is above the median of the 63 non-DC terms, so the hash
    # ignores overall brightness (DC) and gain.
    bits = low[1:] > np.median(low[1:])
    value = np.uint64(0)
    for bit in bits:
        value = (value << np.uint64(1)) | np.uint64(bit)
    thumb = small.ravel() - small.mean()
    norm = float(np.linalg.norm(thumb))
    return value, (thumb / norm if norm > 0 else thumb).astype(np.float32)


@dataclass(frozen=True)
class Links:
    """Pairs of images judged to show the same lesion, with the evidence for each."""

    pairs: np.ndarray  # (M, 2) int indices, i < j
    distance: np.ndarray  # (M,) hash Hamming distance
    similarity: np.ndarray  # (M,) thumbnail correlation


def find_links(
    hashes: np.ndarray,
    thumbs: np.ndarray,
    max_distance: int = 10,
    min_similarity: float = 0.8,
    digests: list[str] | None = None,
    chunk: int = 1 << 20,
) -> Links:
    """All pairs (i, j) that are near-duplicates.

    Candidate pairs (hash distance <= max_distance) are found by multi-index hashing
    (`near_pairs`), not by comparing every pair, so the cost grows with N times the number of
    near neighbours rather than with N squared; the pairs found are exactly those of the full
    comparison (tested against it).

    Args:
        hashes: (N,) uint64 perceptual hashes.
        thumbs: (N, D) float32 unit-norm thumbnails.
        max_distance: largest Hamming distance (of 64 bits) that makes a candidate pair.
        min_similarity: smallest thumbnail correlation that confirms a candidate.
        digests: optional content digests; equal digests always link.
        chunk: most candidate pairs held at once while searching, bounding memory (about 64 bytes
            each); thumbnails are compared 8192 pairs at a time (64 MiB).

    Returns:
        Links with the confirmed pairs, ordered by (i, j).
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    i, j = near_pairs(hashes, max_distance, chunk)
    found: list[np.ndarray] = []
    for start in range(0, len(i), 8192):
        a, b = i[start : start + 8192], j[start : start + 8192]
        sim = np.einsum("kd,kd->k", thumbs[a], thumbs[b])
        ok = sim >= min_similarity
        dist = np.bitwise_count(hashes[a[ok]] ^ hashes[b[ok]])
        found.append(np.stack([a[ok], b[ok], dist, np.round(sim[ok] * 1e6)], axis=1))
    table = np.concatenate(found) if found else np.zeros((0, 4))
    if digests is not None:
        table = np.concatenate([table, _identical_pairs(digests, hashes, thumbs)])
        table = np.unique(table, axis=0)
    pairs = table[:, :2].astype(np.int64)
    # Deduplicate pairs that both tests found, keeping the first row of each.
    _, first = np.unique(pairs, axis=0, return_index=True)
    table = table[np.sort(first)]
    return Links(table[:, :2].astype(np.int64), table[:, 2].astype(np.int64), table[:, 3] / 1e6)


def near_pairs(hashes: np.ndarray, max_distance: int, chunk: int = 1 << 20,
               method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Every pair i < j whose 64-bit hashes differ in at most `max_distance` bits, sorted by (i, j).

    Multi-index hashing (Norouzi, Punjani, Fleet, "Fast search in Hamming space with multi-index
    hashing", CVPR 2012): the 64 bits are cut into m blocks; if two hashes differ in at most r bits,
    at least one block differs in at most floor(r / m) bits (otherwise the total would be at least
    m * (floor(r / m) + 1) > r). So each hash looks up, block by block, the buckets of every block
    value within floor(r / m) bits of its own, and only those candidates are compared in full. For
    r = 10: 4 blocks of 16 bits, 137 block values each (1 + 16 + 120), so a hash meets about
    4 x 137 / 65536 = 0.8% of uniformly random others instead of all of them. When the blocks would
    cost more than the plain comparison (small N, or a large r) the plain comparison runs instead.

    Args:
        hashes: (N,) uint64.
        max_distance: r, in bits.
        chunk: most candidate pairs held at once.
        method: "auto" (the cheaper of the two), "blocks" (multi-index) or "compare" (all pairs).

    Returns:
        (i, j) int64 arrays.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if method not in ("auto", "blocks", "compare"):
        raise ValueError(f"unknown method {method!r}")
    blocks = _block_plan(n, max_distance, force=method == "blocks") if method != "compare" else None
    if blocks is None:
        i, j = _pairs_by_comparison(hashes, max_distance, chunk)
    else:
        i, j = _pairs_by_blocks(hashes, max_distance, blocks, chunk)
    order = np.lexsort((j, i))
    return i[order], j[order]


def _block_plan(n: int, r: int, force: bool = False) -> int | None:
    """The number of blocks that makes the fewest comparisons, or None when comparing all pairs is cheaper."""
    best, best_cost = None, float("inf") if force else n * (n - 1) / 2
    # At least 4 blocks: a block of w bits needs a bucket table of 2^w + 1 entries (16 bits: 0.5 MiB).
    for m in range(4, 17):
        width = -(-64 // m)
        if (m - 1) * width >= 64:  # fewer than m blocks of this width cover 64 bits: not an m-block plan
            continue
        probes = sum(comb(width, k) for k in range(r // m + 1))
        # Per hash and block: one bucket lookup per probe, then every hash in those buckets (for
        # uniform hashes n / 2^width of them) is compared; in numpy a lookup costs about as much as
        # a comparison.
        cost = n * m * probes * (1 + n / 2.0 ** width)
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def _pairs_by_comparison(hashes: np.ndarray, r: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(hashes)
    rows_per = max(1, chunk // max(n, 1))
    out_i, out_j = [], []
    for start in range(0, n, rows_per):
        rows = np.arange(start, min(start + rows_per, n))
        dist = np.bitwise_count(hashes[rows, None] ^ hashes[None, :])
        i, j = np.nonzero(dist <= r)
        keep = j > rows[i]
        out_i.append(rows[i[keep]])
        out_j.append(j[keep])
    return _joined(out_i), _joined(out_j)


def _pairs_by_blocks(hashes: np.ndarray, r: int, m: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(hashes)
    width = -(-64 // m)
    radius = r // m
    codes: list[np.ndarray] = []
    for b in range(m):
        shift = b * width
        bits = min(width, 64 - shift)
        keys = ((hashes >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
        # Bucket table: hashes sorted by this block's value, and where each value's run starts.
        order = np.argsort(keys, kind="stable")
        starts = np.searchsorted(keys[order], np.arange((1 << bits) + 1))
        for flip in _masks(bits, radius):
            probe = keys ^ flip
            lo, size = starts[probe], starts[probe + 1] - starts[probe]
            # Expand (query, bucket member) pairs in pieces of at most `chunk` pairs.
            ends = np.cumsum(size)
            first = 0
            while first < n:
                last = int(np.searchsorted(ends, (ends[first - 1] if first else 0) + chunk, side="right"))
                last = max(last, first + 1)
                q = np.repeat(np.arange(first, last), size[first:last])
                offsets = np.arange(len(q)) - np.repeat(np.cumsum(size[first:last]) - size[first:last], size[first:last])
                other = order[np.repeat(lo[first:last], size[first:last]) + offsets]
                keep = (other > q) & (np.bitwise_count(hashes[q] ^ hashes[other]) <= r)
                codes.append(q[keep] * n + other[keep])
                first = last
    code = np.unique(_joined(codes)) if codes else np.zeros(0, np.int64)
    return code // max(n, 1), code % max(n, 1)


def _masks(bits: int, radius: int) -> list[int]:
    """Every `bits`-bit value with at most `radius` bits set (the block values to probe, as XOR masks)."""
    return [sum(1 << p for p in ones) for k in range(radius + 1) for ones in combinations(range(bits), k)]


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _identical_pairs(digests: list[str], hashes: np.ndarray, thumbs: np.ndarray) -> np.ndarray:
    by_digest: dict[str, list[int]] = {}
    for index, digest in enumerate(digests):
        by_digest.setdefault(digest, []).append(index)
    rows = []
    for members in by_digest.values():
        for j in members[1:]:
            i = members[0]
            dist = int(np.bitwise_count(hashes[i] ^ hashes[j]))
            rows.append([i, j, dist, round(float(thumbs[i] @ thumbs[j]) * 1e6)])
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def connected_groups(n: int, pairs: np.ndarray) -> np.ndarray:
    """Group index per item: connected components of the link graph, numbered by first member."""
    parent = np.arange(n)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        ri, rj = root(int(i)), root(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([root(i) for i in range(n)])
    # Renumber 0..G-1 in order of first appearance so ids are stable for a given input order.
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse]
