"""benchmarks/cpu_by_process.py: how processes are grouped, and a real sampled run of a busy child."""

import importlib.util
import os
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
    # a raylet's own arguments name the worker script: the program decides
    ("/v/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/s/sockets/raylet "
     "--python_worker_command=/v/bin/python /v/ray/_private/workers/default_worker.py --node-ip-address=127.0.0.1",
     "ray raylet"),
    ("/v/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/s/logs", "ray gcs_server"),
    ("/v/bin/python -m ray.util.client.server", "python -m ray.util.client.server"),
    ("/v/bin/python -W ignore -m pytest -q", "python -m pytest"),
    ("/v/bin/python -u /v/ray/_private/runtime_env/agent/main.py --node-ip-address=127.0.0.1",
     "ray runtime_env agent"),
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


def test_a_busy_child_is_seen_and_its_exit_status_passed_on(cpu_by_process, tmp_path, capsys):
    # a script name no other process of the machine has (the suite may itself run under this sampler)
    script = tmp_path / f"spin_{os.getpid()}.py"
    script.write_text("import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
                      "raise SystemExit(3)\n")
    code = cpu_by_process.main(["--interval", "0.1", "--", sys.executable, str(script)])
    out = capsys.readouterr().out
    assert code == 3 and "exit 3" in out
    row = next(line for line in out.splitlines() if line.endswith(f"| python {script} |"))
    # the child's 0.6 CPU-s, read from it after it exited and before it was reaped, so none is lost
    assert 0.6 <= float(row.split("|")[1]) <= 1.5


def test_a_signal_is_passed_on_as_a_shell_would_and_bad_options_are_refused(cpu_by_process, capsys):
    kill = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    assert cpu_by_process.main(["--", sys.executable, "-c", kill]) == 143
    for argv, said in ((["--interval", "0", "--", "true"], "--interval must be"), (["--"], "give the command"),
                       (["--", "/no/such/program"], "cannot run '/no/such/program'")):
        with pytest.raises(SystemExit):
            cpu_by_process.main(argv)
        assert said in capsys.readouterr().err


def test_a_reused_ray_worker_is_credited_to_what_it_ran(cpu_by_process):
    """Idle, a task, idle again (the task ended between samples), an actor: each stretch to its title."""
    tally = cpu_by_process.Tally({}, own_pid=-1)
    worker = ("4242", "100")
    for cpu, title in ((1.0, "ray::IDLE"), (3.0, "ray::execute._propagate_data_context"), (5.0, "ray::IDLE"),
                       (6.0, "ray::TrainController.run"), (6.5, "")):
        tally.add({worker: (cpu, title)})
    tally.close()
    assert dict(tally.cpu) == {"ray::execute._propagate_data_context": 5.0, "ray::TrainController": 1.5}
    idle = cpu_by_process.Tally({}, own_pid=-1)
    idle.add({worker: (0.8, "ray::IDLE")})
    idle.add({worker: (0.9, "ray::IDLE")})
    idle.close()
    assert dict(idle.cpu) == {"ray::IDLE": 0.9}
