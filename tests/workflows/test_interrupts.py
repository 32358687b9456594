"""A running workflow stopped as users stop one: Ctrl-C at a terminal during training, and the SIGTERM of
`ray job stop` once Ray has started. Each runs a workflow script in a process of its own on its own private Ray
cluster; what is left afterwards is checked (the run folder's scratch, the system temp folder).
"""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, TINY_SETS, ctrl_c_as_at_a_terminal


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_during_training_says_so_and_leaves_no_scratch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("RAY_ADDRESS", None)
    before = set(glob.glob("/tmp/msbt-stage-*")) | set(glob.glob("/tmp/msbt-report-*"))
    run = tmp_path / "smoke"
    cmd = [sys.executable, "workflows/stage1.py", "--smoke-test", "--address", "local", *TINY_SETS,
           "--set", "stage1.epochs=50", "--set", f"run.storage_path={tmp_path}"]
    # a terminal's Ctrl-C goes to the whole foreground process group: a session of its own stands in
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=ctrl_c_as_at_a_terminal)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not list(run.glob("stage1/checkpoint_*")):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(1)
        assert list(run.glob("stage1/checkpoint_*")), "training never reported a checkpoint"
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output[-3000:]
    assert "msbt: interrupted" in output and "--resume" in output
    # the line is the last one: no worker's progress bar drawn below it (Ray's bar manager redraws its bars after
    # every print and once more when it closes them; msbt.console.hide_worker_output; text mode turns \r into \n)
    assert [ln for ln in output.splitlines() if ln.strip()][-1].startswith("msbt: interrupted"), output[-1500:]
    assert not (run / ".work").exists()
    left = (set(glob.glob("/tmp/msbt-stage-*")) | set(glob.glob("/tmp/msbt-report-*"))) - before
    assert not left, left


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_after_ray_started_says_so_and_exits_143(tmp_path):
    """`ray job stop` sends the driver SIGTERM. `ray.init` installs its own SIGTERM handler (sys.exit, or a
    private node's "kill everything, exit 1"); msbt puts its own back, so the line and exit 143 hold for
    commands that run on Ray too."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "out.log"
    cmd = [sys.executable, "workflows/preprocess.py", "--smoke-test", "--address", "local",
           "--set", f"run.storage_path={tmp_path}", "--set", f"synth.out_dir={tmp_path / 'synth'}"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and "Ray: private local cluster" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert "Ray: private local cluster" in log.read_text(), "Ray never started"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text()
    assert proc.returncode == 143, output[-3000:]
    # the data step keeps its finished store chunks and has no --resume: it says to rerun the same command
    assert "msbt: stopped (SIGTERM); finished steps are kept: rerun the same command to continue" in output
    assert "Traceback" not in output
