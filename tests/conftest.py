"""Shared fixtures: the optional real data in ../shared/data and the session's local Ray cluster.

Helper functions (not fixtures) live in tests/helpers.py.
"""

from pathlib import Path

import pytest

from helpers import shared_data


@pytest.fixture
def real_data():
    """Return a function that gives a real data set's folder or skips the test with the reason."""

    def get(name: str) -> Path:
        folder = shared_data() / name
        if not folder.is_dir():
            pytest.skip(f"real data set {folder} not present (set MSBT_SHARED_DATA to use it)")
        return folder

    return get


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for the session (2 CPUs), shut down at the end.

    Started as msbt.raycluster starts one, with the dashboard: it serves the state API that Ray Train's
    placement-group cleaner queries; without it, trials that Tune stops early leak their placement
    groups and later tests wait for CPUs forever.
    """
    ray = pytest.importorskip("ray")
    from msbt.raycluster import start_private

    if not ray.is_initialized():
        # msbt's private cluster: loopback only, and every process of it knows its address, so a
        # Train placement-group cleaner never queries another cluster on the machine (docs/reliability.md)
        start_private(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()
