"""How much of each image lies outside the scanner's image area: what cropping to the scan area would remove.

    python benchmarks/scan_area.py busi=../shared/data/busi-256 breast=../shared/data/breast-lesions-usg \
        mendeley=../shared/data/mendeley-rodrigues

Issue #12 lists "cropping to the scan area and away from burned-in text and calipers" among the levers that
might carry a model to another hospital. Before building it into the preparation, this measures whether the
sets have anything to crop. For every image msbt would train on (``msbt.data.sites.discover_sites``: the same
rejects, masks left out), a row or column is background when at least ``--share`` of its pixels are at most
``--level`` grey levels: the black margin a scanner leaves around its image, where text and rulers sit. The
scan area is the box between the outermost rows and columns that are not background; its share of the frame
is what a crop would keep. Only exact-black margins count: dark tissue, posterior shadows and deep attenuation
carry speckle above a few grey levels, and a crop that removed them would remove findings. Burned-in text and
calipers inside the scan area are not counted; no crop removes them.

Prints, per site: images, the mean and 5th percentile of the share kept, and how many images would lose more
than 5% of their pixels. Pure image code (OpenCV, NumPy); no Ray, no TensorFlow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def kept_share(rgb: np.ndarray, level: int, share: float) -> float:
    """The share of the frame inside the box that leaves out the near-black margin rows and columns."""
    background = rgb.max(axis=2) <= level
    rows = np.flatnonzero(background.mean(axis=1) < share)
    cols = np.flatnonzero(background.mean(axis=0) < share)
    if not len(rows) or not len(cols):
        return 0.0
    return float((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1) / background.size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="NAME=FOLDER (or a CSV manifest), as data.ultrasound takes them")
    parser.add_argument("--classes", nargs="+", default=["benign", "malignant"])
    parser.add_argument("--level", type=int, default=5, help="grey levels counted as black (default 5)")
    parser.add_argument("--share", type=float, default=0.95,
                        help="share of black pixels that makes a row or column background (default 0.95)")
    args = parser.parse_args(argv)

    from msbt.data.sites import discover_sites, site_of
    from msbt.images.imagefile import read_image

    discovery = discover_sites(args.sources, args.classes)
    sites = np.array(site_of(discovery))
    kept = np.array([kept_share(read_image(r.path), args.level, args.share) for r in discovery.records])
    print(f"background: rows/columns with >= {args.share:.0%} of pixels at <= {args.level} grey levels\n")
    print("| site | images | share kept, mean | 5th percentile | smallest | images losing > 5% |")
    print("|---|---|---|---|---|---|")
    for site in sorted(set(sites)):
        k = kept[sites == site]
        print(f"| {site} | {len(k)} | {k.mean():.3f} | {np.percentile(k, 5):.3f} | {k.min():.3f} | "
              f"{int((k < 0.95).sum())} ({(k < 0.95).mean():.1%}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
