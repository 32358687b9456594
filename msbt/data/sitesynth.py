"""A tiny built-in multi-site ultrasound set: the synthetic lesions of msbt.data.synth seen by different "scanners".

Real sites differ in gain, speckle texture, framing (whole frame, scan area at its own aspect, a crop
around the lesion) and burned-in marks. Each built-in site draws its own lesions (its own seed) and
renders them through one of the styles below, so a model can learn a site's look, and leave-one-site-out
and external evaluation have something to measure on built-in data. Used by tests and the multi-site demo
(`synth.sites: 3`). Numpy/OpenCV only.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from msbt.data import synth

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SiteStyle:
    """How one site's scanner and export change a frame."""

    name: str
    gain: float  # multiplies grey levels (overall brightness/contrast of the display map)
    offset: float  # added grey levels
    blur: float  # extra blur sigma in px at 256 px: coarser speckle texture
    framing: str  # "frame": as acquired; "wide": scan area in a wider image with black bars and a mark;
    # "crop": a crop around the lesion, saved smaller


STYLES = (
    SiteStyle("site-a", gain=1.0, offset=0.0, blur=0.0, framing="frame"),
    SiteStyle("site-b", gain=0.75, offset=18.0, blur=1.2, framing="wide"),
    SiteStyle("site-c", gain=1.25, offset=-10.0, blur=0.0, framing="crop"),
)


def render(frame: np.ndarray, style: SiteStyle) -> np.ndarray:
    """One synthetic frame as site ``style`` would store it (uint8 grayscale, size depends on framing)."""
    size = frame.shape[0]
    img = frame.astype(np.float32)
    if style.blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), style.blur * size / 256)
    img = np.clip(img * style.gain + style.offset, 0, 255)
    if style.framing == "wide":
        # The scan area in a 4:3 export with black margins and a bright caliper-like mark.
        out = np.zeros((size, size * 4 // 3), np.float32)
        left = (out.shape[1] - size) // 2
        out[:, left:left + size] = img
        out[size // 10 : size // 10 + 3, left + size // 4 : left + size // 4 + size // 8] = 255
        img = out
    elif style.framing == "crop":
        # Around the lesion (the frame's middle), saved at 60% of the frame size, as lesion-crop sets are.
        lo, hi = size // 5, size - size // 5
        side = max(32, size * 3 // 5)
        img = cv2.resize(img[lo:hi, lo:hi], (side, side), interpolation=cv2.INTER_AREA)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def generate_sites(out_dir, *, sites: int = 3, seed: int = 0, lesions_per_class: int = 8,
                   frames_per_lesion: tuple[int, int] = (1, 2), size: int = 96) -> dict:
    """Write ``sites`` class-folder trees ``out_dir/<site>/{benign,malignant}/*.png`` (or reuse them).

    Args:
        out_dir: target folder; missing, empty, or holding this very set (``sites.json``).
        sites: 2 or 3 built-in sites (the styles of :data:`STYLES`, in order).
        seed: data-set seed; site k draws its lesions with seed ``1000 * (seed + 1) + k``.
        lesions_per_class, frames_per_lesion, size: as msbt.data.synth.generate.

    Returns:
        {"sites": {name: folder}, "counts": {name: {class: frames}}, "cached": bool}.
    """
    if not 2 <= int(sites) <= len(STYLES):
        raise ValueError(f"synth.sites must be between 2 and {len(STYLES)}, got {sites}")
    args = {"version": FORMAT_VERSION, "sites": int(sites), "seed": int(seed), "lesions_per_class": int(lesions_per_class),
            "frames_per_lesion": [int(x) for x in frames_per_lesion], "size": int(size)}
    out = Path(out_dir)
    marker = out / "sites.json"
    styles = STYLES[: int(sites)]
    folders = {s.name: str(out / s.name) for s in styles}
    if marker.exists():
        stored = json.loads(marker.read_text())
        if stored.get("args") != args:
            raise ValueError(f"{out} already holds another built-in multi-site set ({marker}: {stored.get('args')})")
        return {"sites": folders, "counts": stored["counts"], "cached": True}
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"refusing to write the multi-site set into {out}: not empty and no sites.json")
    counts, rows = {}, []
    for k, style in enumerate(styles):
        site_seed = 1000 * (int(seed) + 1) + k
        counts[style.name] = {}
        for label in synth.ULTRASOUND_CLASSES:
            folder = out / style.name / label
            folder.mkdir(parents=True, exist_ok=True)
            n = 0
            for i in range(int(lesions_per_class)):
                _, frames = synth.lesion_images(site_seed, label, i, tuple(frames_per_lesion), int(size))
                for f, frame in enumerate(frames):
                    rel = f"{style.name}/{label}/{label[0]}{i:03d}_{f}.png"
                    if not cv2.imwrite(str(out / rel), render(frame, style)):
                        raise OSError(f"could not write {out / rel}")
                    rows.append((rel, label, f"{style.name}-{label}-{i:03d}"))
                    n += 1
            counts[style.name][label] = n
    with open(out / "truth.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "lesion"])
        writer.writerows(rows)
    tmp = out / "sites.json.tmp"
    tmp.write_text(json.dumps({"args": args, "counts": counts}, indent=2) + "\n")
    os.replace(tmp, marker)  # written last: marks a complete set
    return {"sites": folders, "counts": counts, "cached": False}
