"""Contact sheets: a grid of images with captions, for checking data and preprocessing by eye. No Ray, no TF."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from msbt.atomicio import write_bytes


def contact_sheet(rows: Sequence[tuple[str, Sequence[np.ndarray]]], tile: int = 128, cols: int = 8) -> np.ndarray:
    """Lay out labelled rows of images.

    Args:
        rows: (caption, images) per row; images are uint8 (H, W) or (H, W, 3) RGB, any size.
        tile: side of each (square, letterboxed) tile in pixels.
        cols: images per row; extra images are dropped.

    Returns:
        (H, W, 3) uint8 RGB sheet, with each row's caption in a strip above it.
    """
    strip = 18
    width = cols * tile
    parts = []
    for caption, images in rows:
        band = np.full((strip, width, 3), 32, np.uint8)
        cv2.putText(band, caption, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        tiles = [_tile(img, tile) for img in list(images)[:cols]]
        tiles += [np.zeros((tile, tile, 3), np.uint8)] * (cols - len(tiles))
        parts += [band, np.hstack(tiles)]
    return np.vstack(parts) if parts else np.zeros((tile, width, 3), np.uint8)


def _tile(image: np.ndarray, size: int) -> np.ndarray:
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    small = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    out = np.zeros((size, size, 3), np.uint8)
    y0, x0 = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    out[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small
    cv2.rectangle(out, (0, 0), (size - 1, size - 1), (64, 64, 64), 1)
    return out


def write_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB array as PNG (OpenCV wants BGR)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: could not encode PNG")
    write_bytes(path, encoded.tobytes())
    return path
