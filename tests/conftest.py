"""Shared fixtures: small image trees made on the fly, and the optional real data in ../shared/data."""

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """Real data for optional tests: $MSBT_SHARED_DATA, else ../shared/data beside the project."""
    return Path(os.environ.get("MSBT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def real_data():
    """Return a function that gives a real data set's folder or skips the test with the reason."""

    def get(name: str) -> Path:
        folder = shared_data() / name
        if not folder.is_dir():
            pytest.skip(f"real data set {folder} not present (set MSBT_SHARED_DATA to use it)")
        return folder

    return get


def textured(seed: int, size: int = 64) -> np.ndarray:
    """A random smooth grayscale image: distinct seeds give unrelated images."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(size // 8, size // 8)).astype(np.float32)
    img = cv2.resize(base, (size, size), interpolation=cv2.INTER_CUBIC)
    img = (img - img.min()) / (img.max() - img.min()) * 200 + 20
    return img.astype(np.uint8)


def frame_of(img: np.ndarray, seed: int) -> np.ndarray:
    """Another 'frame' of the same scene: a one-pixel shift and fresh noise."""
    rng = np.random.default_rng(seed)
    shifted = np.roll(img, shift=(int(rng.integers(-1, 2)), int(rng.integers(-1, 2))), axis=(0, 1))
    return np.clip(shifted + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for the session (2 CPUs), shut down at the end.

    With the dashboard, as msbt.raycluster starts one: it serves the state API that Ray Train's
    placement-group cleaner queries; without it, trials that Tune stops early leak their placement
    groups and later tests wait for CPUs forever.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()
