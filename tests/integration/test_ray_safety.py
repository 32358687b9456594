"""Private Ray clusters that stay private and know their own address (issue #13, items 9 and 10).

Each test runs msbt in a fresh process, as a user would, so the cluster's environment (loopback node IP,
RAY_ADDRESS, the token file) is that of a real run and this test process is left untouched.
"""

import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = [pytest.mark.ray]

PROBE = r"""
import json, os, sys
import psutil, ray
from msbt.raycluster import init_ray

init_ray("local", num_cpus=1)

@ray.remote
def worker_address():
    return os.environ.get("RAY_ADDRESS")

seen_by_worker = ray.get(worker_address.remote())
me = psutil.Process()
pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
listening = sorted({(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="tcp")
                    if c.status == psutil.CONN_LISTEN and c.pid in pids})
names = {pid: psutil.Process(pid).name() for _, _, pid in listening}
keys = ("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "LOG_NAME_UPDATE_INTERVAL_S")
monitors = [p for p in me.children(recursive=True) if "log_monitor.py" in " ".join(p.cmdline())]
print(json.dumps({"log_monitor": [{k: p.environ().get(k) for k in keys} for p in monitors],
                  "driver_env": {k: os.environ.get(k) for k in keys},
                  "gcs": ray.get_runtime_context().gcs_address, "driver": os.environ.get("RAY_ADDRESS"),
                  "worker": seen_by_worker,
                  "listening": [[ip, port, names[pid]] for ip, port, pid in listening]}))
"""


def loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or loopback seen through an IPv6 socket (``::ffff:127.0.0.1``, as gcs_server binds)."""
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def run_probe(home, **extra_env):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(home), **extra_env}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    *printed, report = done.stdout.strip().splitlines()
    return {**json.loads(report), "printed": printed}


def test_private_cluster_listens_on_loopback_only_and_its_token_is_private(tmp_path):
    # LOG_NAME_UPDATE_INTERVAL_S stands for a setting of the user's own, which msbt keeps
    report = run_probe(tmp_path, LOG_NAME_UPDATE_INTERVAL_S="0.3")
    # GCS, raylet, object manager, workers, dashboard, its agent, metrics: all on the loopback address
    assert len(report["listening"]) >= 5, report
    exposed = [row for row in report["listening"] if not loopback(row[0])]
    assert exposed == [], exposed
    assert {"gcs_server", "raylet"} <= {name for _, _, name in report["listening"]}
    # its dashboard is named on the Ray line, on a free port: Ray's 8265 is left to a cluster of `ray start`
    line = next(text for text in report["printed"] if text.startswith("Ray: private local cluster"))
    dashboard = int(re.search(r"; dashboard http://127\.0\.0\.1:(\d+)$", line)[1])
    assert dashboard != 8265 and dashboard in {port for _, port, _ in report["listening"]}, (line, report)
    # every process of the cluster names its own cluster (item 10): the driver and a worker task
    assert report["gcs"].startswith("127.0.0.1:")
    assert report["worker"] == report["gcs"]
    # the log monitor lists the log folder at most once per interval (raycluster._calm_log_monitor), the
    # user's interval is kept, and the driver's own environment is as it was
    assert report["log_monitor"] == [{"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "0.3"}]
    assert report["driver_env"] == {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": None, "LOG_NAME_UPDATE_INTERVAL_S": "0.3"}
    token = tmp_path / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())


def test_an_existing_world_readable_token_is_narrowed(tmp_path):
    from msbt.raycluster import protect_token

    token = tmp_path / "auth_token"
    token.write_text("a" * 64)
    token.chmod(0o644)
    assert protect_token(token) == token
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == "a" * 64
    fresh = protect_token(tmp_path / "sub" / "auth_token")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600 and len(fresh.read_text()) == 64


RETRY_PROBE = r"""
import json, logging, os
import psutil, ray
from ray._private import ray_constants
from msbt.raycluster import start_private

logging.basicConfig(level=logging.WARNING)
start_private(num_cpus=1)
log_dirs = set()
for child in psutil.Process().children(recursive=True):
    for part in child.cmdline():
        if part.startswith(("--log_dir=", "--log-dir=", "--logs-dir=")):
            log_dirs.add(os.path.dirname(part.split("=", 1)[1].rstrip("/")))
print(json.dumps({"task": ray.get(ray.remote(lambda: 1).remote()), "session": ray._private.worker._global_node.get_session_dir_path(),
                  "children_sessions": sorted(log_dirs), "wait_after": ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S}))
"""


def test_a_private_cluster_that_starts_too_slowly_is_stopped_and_started_again(tmp_path):
    """Ray gives the dashboard RAY_DASHBOARD_STARTUP_TIMEOUT_S to come up (and the raylet a fixed 30 s to
    register): a busy machine can miss it, and Ray then raises with the half-started cluster's processes
    still running. With 0 s the first start fails every time, for real, with the dashboard still starting."""
    import tempfile

    from msbt.raycluster import _children, _slow_start

    ray_tmp = tempfile.mkdtemp(prefix="msbt-retry-", dir="/tmp")  # short: Unix socket paths
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "RAY_TMPDIR": ray_tmp,
               "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "0"}
        env.pop("RAY_ADDRESS", None)
        done = subprocess.run([sys.executable, "-c", RETRY_PROBE], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "did not start in time (the dashboard was still starting after 0 s)" in done.stderr
        assert "attempt 2 of 2" in done.stderr
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["task"] == 1
        # the first start's processes were stopped (they would still be this process's children) and its
        # session folder removed: only the second cluster's is left
        assert report["children_sessions"] == [report["session"]]
        sessions = sorted(p.name for p in (Path(ray_tmp) / "ray").glob("session_2*"))
        assert [Path(report["session"]).name] == sessions
        assert report["wait_after"] == 0  # the longer wait was for the retry only
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # a failure that is not slowness is raised at once, not retried: another error, or a wait for a raylet that
    # is not running (none started since `now`; the session's cluster, when this process has one, is older)
    now = _children()
    assert _slow_start(Exception("address already in use"), now) is None
    assert _slow_start(Exception("The current node timed out during startup. This could happen"), now) is None
