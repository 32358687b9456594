"""Finding images of the same lesion from their content, so a split can keep them together.

Real ultrasound sets hold several frames or re-acquisitions of one lesion under unrelated file names. Two
images are linked when (1) their perceptual hashes are close and (2) their small grayscale thumbnails are
strongly correlated; groups are the connected components of those links. The hash makes the search cheap
(64-bit XOR + popcount over all pairs); the correlation check stops the chaining that a hash threshold
alone causes on a modality where every image is "dark blob on speckle". Byte-identical files are always
linked. Nothing here reads file names. No Ray, no TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    chunk: int = 1024,
) -> Links:
    """All pairs (i, j) that are near-duplicates.

    Args:
        hashes: (N,) uint64 perceptual hashes.
        thumbs: (N, D) float32 unit-norm thumbnails.
        max_distance: largest Hamming distance (of 64 bits) that makes a candidate pair.
        min_similarity: smallest thumbnail correlation that confirms a candidate.
        digests: optional content digests; equal digests always link.
        chunk: rows per block, bounding memory at chunk x N distances.

    Returns:
        Links with the confirmed pairs.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    found: list[np.ndarray] = []
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        dist = np.bitwise_count(hashes[rows, None] ^ hashes[None, :])
        i, j = np.nonzero(dist <= max_distance)
        keep = j > rows[i]
        i, j = rows[i[keep]], j[keep]
        sim = np.einsum("kd,kd->k", thumbs[i], thumbs[j])
        ok = sim >= min_similarity
        found.append(np.stack([i[ok], j[ok], dist[i[ok] - start, j[ok]], np.round(sim[ok] * 1e6)], axis=1))
    table = np.concatenate(found) if found else np.zeros((0, 4))
    if digests is not None:
        table = np.concatenate([table, _identical_pairs(digests, hashes, thumbs)])
        table = np.unique(table, axis=0)
    pairs = table[:, :2].astype(np.int64)
    # Deduplicate pairs that both tests found, keeping the first row of each.
    _, first = np.unique(pairs, axis=0, return_index=True)
    table = table[np.sort(first)]
    return Links(table[:, :2].astype(np.int64), table[:, 2].astype(np.int64), table[:, 3] / 1e6)


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
