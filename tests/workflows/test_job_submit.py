"""`ray job submit` of the smoke workflow to a real `ray start` cluster, as the README tells users to (with the
test backbone, below).

This is also the suite's one end-to-end run of `workflows/pipeline.py --smoke-test` in a fresh process
(the job's driver): its outputs are checked here as a user would read them. Its stages train the test backbone
(helpers.TINY_SETS), not the smoke config's EfficientNet-Lite0 (measured 2026-12-05 on the 2-core Intel machine:
the smoke pipeline alone used 64-66 machine CPU-s with Lite0 against 41 with the test backbone; this test alone,
pytest and the `ray start` cluster included, 110 against 76 CPU-s). What that gives up: Lite0 loading its
ImageNet weights inside a Ray Train worker of a submitted job. `bash scripts/run-main.sh` (the README's main job,
outside the suite) trains Lite0 from those weights through Ray Train; in the suite they load in-process
(tests/unit/test_models.py, test_training.py, test_dicom.py; tests/integration/test_serve.py, test_external.py).
"""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, TINY_SETS

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node():
    """A head node started with `ray start` as the README says (the account's token generated first: Ray 2.60
    turns token authentication on only where one exists), for the tests below: each submits its own job, as
    users submit several jobs to one cluster. Yields the `ray` command, the dashboard's URL, the environment
    and the GCS address."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip("the `ray` command is not installed beside this Python")
    env = {**os.environ, "PATH": f"{ray_cli.parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    temp = Path("/tmp") / f"msbt-ray-{os.getpid()}"  # Ray needs a short socket path
    start = [str(ray_cli), "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true",
             f"--temp-dir={temp}", "--disable-usage-stats",
             # fixed by default (52365, 10001): another cluster on this machine would hold them, and the
             # job server then answers "No available agent to submit job"
             f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    subprocess.run([str(ray_cli), "get-auth-token", "--generate"], env=env, capture_output=True, timeout=60,
                   check=True)
    done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    try:
        yield ray_cli, f"http://127.0.0.1:{dashboard}", env, f"127.0.0.1:{port}"
    finally:
        stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def stop_cluster(temp: Path) -> None:
    """Stop only the cluster whose session lives in `temp`.

    `ray stop` kills every Ray process of this user on the machine, so on a shared machine it would also
    end other sessions' clusters (a parallel test run's included). The head's processes (gcs_server,
    raylet, dashboard, agents) name the temp folder on their command line; its workers exit when their
    raylet does.
    """
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(temp) in " ".join(proc.info["cmdline"] or []) and proc.pid != os.getpid():
            mine.append(proc)
    for proc in mine:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    # The raylet ends its workers on SIGTERM; the gcs and dashboard may linger: a few seconds, then KILL.
    _, alive = psutil.wait_procs(mine, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def submit_when_an_agent_answers(submit: list[str], env: dict, timeout: float):
    """`ray job submit` until the head's job agent has registered: right after `ray start` the job server may
    answer "No available agent to submit job". Tried every 2 s for up to 2 min (it used to wait 10 s a try)."""
    for _ in range(60):
        done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        output = done.stdout + done.stderr
        if "No available agent" not in output:
            break
        time.sleep(2)
    return done, output


def test_smoke_pipeline_job_succeeds(head_node, tmp_path, ray_local):
    """``ray_local``: the session's private cluster runs beside the `ray start` one, as another job's might."""
    ray_cli, address, env, _ = head_node
    # The CLI must send the cluster's token (written by `ray start`).
    env = {**env, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": address}
    submit = [str(ray_cli), "job", "submit",  # the README's command: runtime_env.yaml names the working dir
              "--runtime-env", "workflows/runtime_env.yaml", "--",
              "python", "workflows/pipeline.py", "--smoke-test",
              "--set", f"run.storage_path={tmp_path}", "--set", f"synth.out_dir={tmp_path / 'synth'}", *TINY_SETS]
    started = time.time()
    done, output = submit_when_an_agent_answers(submit, env, timeout=1200)
    assert done.returncode == 0, output[-4000:]
    job_id = re.search(r"raysubmit_\w+", output).group(0)

    def ray_job(*args):
        answer = subprocess.run([str(ray_cli), "job", *args], env=env, capture_output=True, text=True, timeout=60)
        return answer.stdout + answer.stderr

    # the job server's verdict, asked separately (the CLI prints SUCCEEDED as "succeeded")
    assert f"Job '{job_id}' succeeded" in ray_job("status", job_id)
    logs = ray_job("logs", job_id)
    assert "microscope store:" in logs and "results in" in logs
    assert "stage 2: best val_auc" in logs and "test split (" in logs
    # the job ran on the submitted cluster, not on a private one it started itself
    assert "Started a local Ray instance" not in output
    assert "Overriding runtime_env working_dir" not in output  # the README's command gives it once
    # the runtime env's variables reached the job: TF_CPP_MIN_LOG_LEVEL=2 hides this INFO line
    assert "cpu_feature_guard" not in logs
    # the quiet console (msbt.console): step lines and bars in `ray job logs`, Ray's and the workers'
    # own lines in the run's log files
    print(logs)  # shown with `pytest -rP`
    # Counted in bytes. A job's driver writes to a log, not a terminal, so no bar is redrawn: each step and each
    # epoch is one plain line when it ends (msbt.console.LineProgress, closed_bar_line). Before, every redraw came
    # back from `ray job logs` as a line of its own (85 lines for this job with Lite0, against 40 on a terminal).
    raw = subprocess.run([str(ray_cli), "job", "logs", job_id], env=env, capture_output=True, timeout=60).stdout
    assert raw.count(b"\n") < 60, raw[-3000:].decode("utf-8", "replace")
    assert b"\r" not in raw, [ln for ln in raw.split(b"\n") if b"\r" in ln]
    assert "stage 1 epoch 1/1:" in logs and "microscope store: 12/12 fields" in logs
    assert "Execution plan" not in logs and "TrainingReport" not in logs and "cuInit" not in logs
    workers = (tmp_path / "smoke" / "logs" / "workers.log").read_text()
    assert "Reporting training result" in workers
    # every actor of the job knows its cluster: none went looking for one (Train's placement-group cleaner once
    # did; the job's stages start none now, msbt.train.runner.stage_trainer)
    assert "Found multiple active Ray instances" not in workers + logs

    # the results are where the user asked (an absolute run.storage_path, expanded at submit time), not
    # in Ray's unpacked copy of the code (issue #13, item 0)
    run = tmp_path / "smoke"
    assert f"results in {run}" in logs and "_ray_pkg_" not in logs.split("results in")[-1].splitlines()[0]
    assert (run / "environment.json").is_file() and (run / "metrics.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["ultrasound"]["leakage"]["group_aware"] == {"val": 0, "test": 0}
    patches = summary["stores"]["microscope"]["rows"]
    assert set(patches) == {"train", "val", "test"} and all(len(v) == 4 for v in patches.values())
    assert (run / "config.yaml").exists() and set(json.loads((run / "stages.json").read_text())) == {"1", "2"}
    # both stages trained, linked, and the test split scored at a threshold picked on validation
    assert "stage 2  tiny_cnn  weights=parent" in logs and "<- stage 1" in logs
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["threshold_chosen_on"] == "val" and 0.0 <= metrics["threshold"] <= 1.0
    assert metrics["test_images"] == sum(summary["stores"]["ultrasound"]["rows"]["test"].values())
    assert set(metrics["test_ci95"]) >= {"accuracy", "auc", "sensitivity", "specificity"}
    print(f"job took {time.time() - started:.1f} s")

    # a second job after the code changed (a new package, so a new _ray_pkg_ folder) continues the same
    # run with --resume: finished stages and the saved split are found on the absolute storage path
    code = tmp_path / "code"
    shutil.copytree(ROOT, code, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", ".pytest_cache"))
    with open(code / "README.md", "a") as handle:
        handle.write("\nchanged after the first job\n")
    again = subprocess.run([*submit, "--resume"], env=env, capture_output=True, text=True, timeout=600, cwd=code)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert "split (reused" in output and "stage 1: finished before, reused (--resume)" in output
    assert "stage 2: finished before, reused (--resume)" in output and f"results in {run}" in output


def test_a_submitted_job_with_a_relative_storage_path_is_refused(head_node, tmp_path):
    """The default `run.storage_path: runs` would resolve inside Ray's unpacked package: refused by name."""
    ray_cli, address, env, _ = head_node
    env = {**env, "RAY_AUTH_MODE": "token", "RAY_ADDRESS": address}
    submit = [str(ray_cli), "job", "submit", "--runtime-env", "workflows/runtime_env.yaml",
              "--", "python", "workflows/preprocess.py", "--smoke-test", "--set", f"synth.out_dir={tmp_path / 'synth'}"]
    done, output = submit_when_an_agent_answers(submit, env, timeout=600)
    assert done.returncode != 0 and "failed" in output.lower(), output[-3000:]
    assert "run.storage_path 'runs' resolves to" in output and "_ray_pkg_" in output
    assert "--set run.storage_path=$PWD/runs" in output
    assert "microscope store:" not in output  # refused before any work


def test_a_script_run_on_the_head_node_joins_without_ray_auth_mode(head_node):
    """`python workflows/pipeline.py` on the head node, RAY_AUTH_MODE unset: Ray's client sent no token and gave 20
    lines of "InvalidAuthToken" over 20 s, then "Failed to connect to Ray cluster" (msbt.raycluster now sends the
    account's token when there is one, as Ray does for a cluster it finds without an address)."""
    import urllib.error
    import urllib.request

    _, dashboard, env, gcs = head_node
    with pytest.raises(urllib.error.HTTPError) as refused:  # the cluster does require the token
        urllib.request.urlopen(f"{dashboard}/api/jobs/", timeout=30)
    assert refused.value.code == 401
    env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    probe = "from msbt.raycluster import init_ray; init_ray({!r}); import ray; print(ray.cluster_resources()['CPU'])"
    done = subprocess.run([sys.executable, "-c", probe.format(gcs)], env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and f"Ray: cluster at {gcs} (2 CPUs)" in done.stdout, done.stderr[-2000:]
    assert "InvalidAuthToken" not in done.stderr
