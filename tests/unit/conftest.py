"""tests/unit is the tier without Ray (docs/architecture.md, "Tests"): seconds per test, no cluster.

A unit test marked ``ray`` or asking for a fixture that starts Ray fails at set-up, before the fixture runs, with
the test named. One that starts Ray through the code it calls (Ray Data starts a local cluster by itself) fails at
its teardown, even when the code under test caught an error, and the cluster is shut down. Nothing here imports
Ray: code that behaves differently once Ray is imported (msbt.console) is tested as it runs without it. (Under
xdist a process may already hold the session's cluster from an integration file run before, and Ray Data then
uses it without starting one: `pytest tests/unit` alone, with no cluster up, catches such a test.)
"""

import sys

import pytest

from helpers import RAY_FIXTURES

MOVE = "tests/unit is the tier without Ray; move it to tests/integration (a real local cluster) or tests/workflows"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("ray") or RAY_FIXTURES & set(item.fixturenames):
        pytest.fail(f"{item.nodeid} starts Ray (a `ray` mark or one of {sorted(RAY_FIXTURES)}): {MOVE}",
                    pytrace=False)


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _no_ray_started(request):
    running_before = _ray_running()
    yield
    if not running_before and _ray_running():
        sys.modules["ray"].shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray: {MOVE}", pytrace=False)
