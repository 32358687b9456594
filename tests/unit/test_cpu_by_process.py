"""benchmarks/cpu_by_process.py: how processes are grouped, and a real sampled run of a busy child."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cpu_by_process():
    spec = importlib.util.spec_from_file_location("cpu_by_process", ROOT / "benchmarks" / "cpu_by_process.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cmdline, expected", [
    ("ray::TrainController.run", "ray::TrainController"),  # an actor: its class, whatever method runs now
    ("ray::_StatsActor.register_dataset", "ray::_StatsActor"),
    ("ray::RayTrainWorker.get_metadata()", "ray::RayTrainWorker"),
    ("ray::execute._propagate_data_context", "ray::execute._propagate_data_context"),  # a task: kept whole
    ("ray::IDLE", "ray::IDLE"),
    ("/v/bin/python /v/ray/_private/workers/default_worker.py --node-ip-address=127.0.0.1", "ray worker (starting)"),
    ("/v/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/x", "ray raylet"),
    ("/v/bin/python /v/ray/dashboard/dashboard.py --host=127.0.0.1", "ray dashboard"),
    ("ray-dashboard-NodeHead-0 (/v/bin/python -B -c from multiprocessing.spawn import spawn_main)", "ray dashboard module"),
    ("/v/bin/python -u -c import sys;exec(eval(sys.stdin.readline()))", "pytest-xdist worker"),
    ("/v/bin/python /repo/workflows/pipeline.py --smoke-test", "python workflows/pipeline.py"),
    ("/v/bin/python -m pytest -n 2", "python -m pytest"),
    ("/v/bin/python /v/bin/ray start --head", "ray (command line)"),
    ("", "(unnamed: ended or a kernel thread)"),
])
def test_processes_are_grouped_by_what_they_run(cpu_by_process, cmdline, expected):
    assert cpu_by_process.group(cmdline) == expected


def test_a_busy_child_is_seen_and_its_exit_status_passed_on(cpu_by_process, capsys):
    spin = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\nraise SystemExit(3)"
    script = ROOT / "benchmarks" / "cpu_by_process.py"  # a name no other process of the machine has
    code = cpu_by_process.main(["--interval", "0.1", "--", sys.executable, "-c", spin, str(script)])
    out = capsys.readouterr().out
    assert code == 3 and "exit 3" in out
    row = next(line for line in out.splitlines() if line.endswith("| python benchmarks/cpu_by_process.py |"))
    assert 0.4 <= float(row.split("|")[1]) <= 1.5  # the child's 0.6 CPU-s, sampled every 0.1 s
