"""Private Ray clusters that stay private and know their own address (issue #13, items 9 and 10).

Each test runs msbt in a fresh process, as a user would, so the cluster's environment (loopback node IP,
RAY_ADDRESS, the token file) is that of a real run and this test process is left untouched.
"""

import ipaddress
import json
import os
import re
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import ROOT, TINY_SETS

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
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "driver": os.environ.get("RAY_ADDRESS"),
                  "worker": seen_by_worker,
                  "listening": [[ip, port, names[pid]] for ip, port, pid in listening]}))
"""


def loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or loopback seen through an IPv6 socket (``::ffff:127.0.0.1``, as gcs_server binds)."""
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def run_probe(home):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(home)}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_private_cluster_listens_on_loopback_only_and_its_token_is_private(tmp_path):
    report = run_probe(tmp_path)
    # GCS, raylet, object manager, workers, dashboard, its agent, metrics: all on the loopback address
    assert len(report["listening"]) >= 5, report
    exposed = [row for row in report["listening"] if not loopback(row[0])]
    assert exposed == [], exposed
    assert {"gcs_server", "raylet"} <= {name for _, _, name in report["listening"]}
    # every process of the cluster names its own cluster (item 10): the driver and a worker task
    assert report["gcs"].startswith("127.0.0.1:")
    assert report["worker"] == report["gcs"]
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


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_msbt_jobs_on_one_machine_each_use_their_own_cluster(tmp_path):
    """A Tune search (Ray Train trials, whose placement groups Train's cleaner must remove) beside a
    stage-1 training, each with its own private cluster. Before: every run logged "Found multiple active
    Ray instances" from the cleaner, which then asked whichever cluster it found."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("RAY_ADDRESS", None)
    common = ["--smoke-test", "--address", "local"]
    # The search on the tiny backbone (its trials are what the cleaner must clean up); the stage job is
    # started once the search's first trial has, so that its cluster comes up and runs beside the trials.
    tune = [sys.executable, "workflows/tune.py", *common, *TINY_SETS, "--set", f"run.storage_path={tmp_path / 'a'}",
            "--set", "tune.num_samples=2", "--set", "tune.max_concurrent_trials=1"]
    stage = [sys.executable, "workflows/stage1.py", *common, "--set", f"run.storage_path={tmp_path / 'b'}",
             "--set", "stage1.epochs=3"]
    trials = tmp_path / "a" / "smoke" / "tune" / "smoke"
    started = time.time()

    def launch(cmd):
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [launch(tune)]
    ended = {}

    def finish(i):
        out = procs[i].communicate(timeout=1400)[0]
        ended[i] = time.time()
        return out

    try:
        with ThreadPoolExecutor(2) as pool:
            tune_out = pool.submit(finish, 0)
            while not list(trials.glob("*/params.json")):  # Tune writes it as a trial starts
                assert not tune_out.done(), f"the search ended before a trial started:\n{tune_out.result()[-4000:]}"
                assert time.time() - started < 900, "no trial started in 900 s"
                time.sleep(0.5)
            procs.append(launch(stage))
            stage_out = pool.submit(finish, 1)  # read at once: a full pipe would stall the job
            outputs = [tune_out.result(), stage_out.result()]
    finally:  # a failed wait or a timeout leaves no job (nor its cluster) running
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
        assert "Found multiple active Ray instances" not in out, out[-4000:]
        assert "Failed to query Ray Train Controller actor state" not in out
    assert "tune results in" in outputs[0] and "stage 1: best" in outputs[1]
    # both trials ran to a result: no placement group of the first was left holding the CPU
    results = list(trials.glob("*/result.json"))
    assert len(results) == 2 and all(r.read_text().strip() for r in results), results
    # the two clusters ran side by side while a trial ran: the stage job (started during the first trial)
    # ended after the last trial started, so the search's last Train run and its cleaner saw a second cluster
    last_trial = max(r.stat().st_ctime for r in trials.glob("*/params.json"))
    assert ended[1] > last_trial, f"the stage job ended {last_trial - ended[1]:.0f} s before the last trial started"
    print(f"two jobs took {time.time() - started:.0f} s; the stage job ended {ended[1] - last_trial:.0f} s after "
          f"the last trial started")
