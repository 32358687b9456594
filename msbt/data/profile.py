"""What the training images looked like, and a simple rule for inputs that look different ("out of depth").

A model trained on 256 px whole frames and handed 80 px lesion crops (or the reverse) answers with
confident nonsense. At training time the run records a profile of its training images; `msbt predict`
and `msbt external` compare every input with it and warn.

Features (one value per image):
- `long_side`: the source file's longer side in pixels (log scale in the rule);
- `aspect`: width / height of the source file (log scale in the rule);
- `mean`, `std`: grey-level mean and standard deviation of the prepared (model-ready) image;
- `dark`: fraction of prepared pixels below 10 grey levels (padding bars, black surroundings: framing).

The rule (documented in docs/evaluation.md): a feature of an input is out of range when it lies outside
the training [1st, 99th] percentile range widened by a margin of max(10% of that range, a floor: 25% in
size, 10% in aspect, 5 grey levels, 0.05 of dark fraction). A set of inputs is flagged for a feature when
more than 10% of its images are out of range there (any one image for a single input). No Ray, no TF.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

PROFILE_FILE = "profile.json"
FEATURES = ("long_side", "aspect", "mean", "std", "dark")
_LOG = {"long_side", "aspect"}  # compared as logarithms: 2x larger and 2x smaller are equally far
_FLOOR = {"long_side": math.log(1.25), "aspect": math.log(1.10), "mean": 5.0, "std": 5.0, "dark": 0.05}
DARK_LEVEL = 10
FLAG_FRACTION = 0.10


def image_features(width: int, height: int, prepared: np.ndarray) -> dict[str, float]:
    """The profile features of one image: source size, and grey statistics of the prepared array."""
    gray = prepared.mean(axis=-1) if prepared.ndim == 3 else prepared
    return {"long_side": float(max(width, height)), "aspect": float(width) / float(max(height, 1)),
            "mean": float(gray.mean()), "std": float(gray.std()), "dark": float((gray < DARK_LEVEL).mean())}


def build_profile(features: Sequence[Mapping[str, float]], source: str = "") -> dict:
    """Quantiles (1, 50, 99%) and the allowed range of every feature over the training images."""
    if not features:
        raise ValueError("a profile needs at least one training image")
    out = {"images": len(features), "source": source, "rule": __doc__.split("The rule")[1].split("No Ray")[0].strip(),
           "features": {}}
    for name in FEATURES:
        values = np.array([_scale(name, f[name]) for f in features], dtype=float)
        q01, q50, q99 = np.percentile(values, [1, 50, 99])
        margin = max(0.1 * (q99 - q01), _FLOOR[name])
        out["features"][name] = {"q01": _unscale(name, q01), "q50": _unscale(name, q50), "q99": _unscale(name, q99),
                                 "low": _unscale(name, q01 - margin), "high": _unscale(name, q99 + margin)}
    return out


def out_of_range(profile: Mapping, features: Mapping[str, float]) -> list[str]:
    """The features of one image outside the profile's allowed range (empty: looks like training)."""
    bad = []
    for name, r in profile["features"].items():
        value = features.get(name)
        if value is not None and not r["low"] <= value <= r["high"]:
            bad.append(name)
    return bad


def check_inputs(profile: Mapping, features: Sequence[Mapping[str, float]]) -> list[str]:
    """Warnings for a set of inputs: one line per feature flagged by the rule, with the numbers."""
    if not features:
        return []
    warnings = []
    for name, r in profile["features"].items():
        values = np.array([f[name] for f in features], dtype=float)
        outside = (values < r["low"]) | (values > r["high"])
        share = float(outside.mean())
        if share > FLAG_FRACTION or (len(values) == 1 and outside.any()):
            warnings.append(
                f"out of depth: {outside.sum()} of {len(values)} inputs ({share:.0%}) have {name} outside the "
                f"training range [{r['low']:.4g}, {r['high']:.4g}] (training median {r['q50']:.4g}, inputs' "
                f"median {float(np.median(values)):.4g}); predictions on them are not backed by the validation")
    return warnings


def write_profile(profile: Mapping, folder: str | Path) -> Path:
    """Write `profile.json` into `folder` atomically."""
    path = Path(folder) / PROFILE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(profile, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _scale(name: str, value: float) -> float:
    return math.log(max(value, 1e-9)) if name in _LOG else float(value)


def _unscale(name: str, value: float) -> float:
    return round(math.exp(value), 6) if name in _LOG else float(value)  # 256, not 255.99999999999994


def profile_from_store(store: str | Path, sizes: Mapping[str, tuple[int, int]]) -> dict:
    """The profile of a store's `train` rows; `sizes` maps a row's `source` to its file's (width, height)."""
    from msbt.data.store import read_store

    data = read_store(store, columns=["image", "source"], split="train")
    features = [image_features(*sizes[s], image) for s, image in zip(data["source"], data["image"]) if s in sizes]
    return build_profile(features, source=str(Path(store) / "train rows"))
