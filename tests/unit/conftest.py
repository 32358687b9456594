"""tests/unit is the tier without Ray (docs/architecture.md, "Tests"): seconds per test, no cluster.

A unit test marked ``ray`` or asking for a fixture that starts Ray fails at set-up, before the fixture runs, with
the test named. One that reaches ``ray.init`` through the code it calls (Ray Data starts a local cluster by itself)
fails there. (Under xdist a process may already hold the session's cluster from an integration file run before;
Ray Data then uses it without ``ray.init``. `pytest tests/unit` alone, with no cluster up, catches such a test.)
"""

import pytest

from helpers import RAY_FIXTURES

MOVE = "tests/unit is the tier without Ray; move it to tests/integration (a real local cluster) or tests/workflows"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("ray") or RAY_FIXTURES & set(item.fixturenames):
        pytest.fail(f"{item.nodeid} starts Ray (a `ray` mark or one of {sorted(RAY_FIXTURES)}): {MOVE}",
                    pytrace=False)


@pytest.fixture(autouse=True)
def _no_ray_init(monkeypatch, request):
    try:
        import ray._private.worker as worker
    except ImportError:
        return

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} started Ray: {MOVE}")

    monkeypatch.setattr(worker, "init", refuse)
    monkeypatch.setattr("ray.init", refuse)
