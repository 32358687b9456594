"""The quiet console (msbt.console): what reaches the terminal, what lands in runs/<name>/logs/.

Unit tests run the real logging and file-descriptor plumbing in this process or a subprocess. The main
job's terminal output (its own private Ray cluster, lines counted) is checked on the runs of
tests/integration/test_resume.py::test_a_killed_workflow_resumes_without_retraining_finished_stages, and
under `ray job submit` in tests/workflows/test_job_submit.py.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from helpers import ROOT
from msbt import console
from msbt.eval.report import line_chart
from msbt.train.runner import write_history

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_quiet_environment_keeps_what_the_user_set_and_never_hides_a_gpu(monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    assert console.quiet_environment(verbose=True) == {}
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ
    changed = console.quiet_environment()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2" and os.environ["GRPC_VERBOSITY"] == "ERROR"
    assert ("CUDA_VISIBLE_DEVICES" in changed) == (not console.has_gpu())
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert console.quiet_environment() == {}
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" and os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_logs_before_the_run_folder_is_known_reach_the_file_and_only_warnings_the_terminal(
        tmp_path, capsys, restore_logging):
    console.setup(verbose=False)
    log = logging.getLogger("msbt.some.step")
    log.info("early detail")
    log.warning("something the user must see")
    logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster. ...")
    folder = console.attach_run(tmp_path / "run")
    log.info("later detail")
    # what crossval --by site printed for each held-out site's model (scored one after another in the driver)
    logging.getLogger("tensorflow").warning("5 out of the last 5 calls to <function f> triggered tf.function "
                                            "retracing. Tracing is expensive ...")
    err = capsys.readouterr().err
    assert "something the user must see" in err
    assert "detail" not in err and "Token authentication" not in err and "retracing" not in err
    text = (folder / console.DRIVER_LOG).read_text()
    assert folder == tmp_path / "run" / "logs"
    for line in ("early detail", "something the user must see", "later detail", "triggered tf.function retracing"):
        assert line in text


def test_verbose_shows_info_on_the_terminal(tmp_path, capsys, restore_logging):
    console.setup(verbose=True)
    console.attach_run(tmp_path)
    logging.getLogger("msbt.x").info("a detail")
    assert "a detail" in capsys.readouterr().err
    assert "a detail" in (tmp_path / "logs" / console.DRIVER_LOG).read_text()


def test_tensorflow_start_up_lines_go_to_the_log_not_the_terminal(tmp_path):
    code = ("from msbt import console; console.setup(); console.attach_run(r'%s'); console.import_tensorflow(); "
            "print('imported')" % tmp_path)
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"
    assert done.stderr == "", done.stderr  # no oneDNN notice, no CUDA probe, no absl preamble
    log = (tmp_path / "logs" / console.DRIVER_LOG).read_text()
    assert "oneDNN" in log or "cuda" in log.lower()  # what TensorFlow 2.21 printed is kept


def test_a_command_without_a_run_folder_imports_tensorflow_quietly_too(tmp_path):
    """`msbt predict`/`export`/`external`/`ensemble`/`report` load a model outside a run's log: TensorFlow's
    start-up lines (oneDNN, `failed call to cuInit` on a machine without a GPU) used to reach the terminal."""
    code = "from msbt import console; console.setup(); console.import_tensorflow(); print('imported')"
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported" and done.stderr == "", done.stderr
    # a failure inside the captured block shows what was held back, so nothing that explains it is lost
    code = ("import os; from msbt import console; console.setup()\n"
            "with console.captured_stderr():\n    os.write(2, b'held back\\n'); raise SystemExit(3)")
    done = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 3 and "held back" in done.stderr


def test_captured_stderr_takes_output_written_below_python(tmp_path, restore_logging):
    console.setup(verbose=False)
    console.attach_run(tmp_path)
    with console.captured_stderr():
        os.write(2, b"a C++ library speaking\n")
    assert "a C++ library speaking" in (tmp_path / "logs" / console.DRIVER_LOG).read_text()


@pytest.mark.parametrize("line, shown", [
    ("ValueError: store has no 'val' rows", True),
    ("ray.exceptions.RayTaskError(ValueError): boom", True),
    ("Traceback (most recent call last):", True),
    ("E0000 00:00:1796181459.630264 8750 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error", False),
    ("Reporting training result 1: TrainingReport(checkpoint=None, metrics={'loss': 1.0})", False),
    ("Starting execution of Dataset train_0357U1. Full logs are in /tmp/ray/session/logs/ray-data", False),
])
def test_only_worker_lines_that_name_an_exception_reach_the_terminal(line, shown):
    assert bool(console.ERROR_LINE.match(line)) is shown


def test_history_file_holds_every_epoch_and_is_replaced_whole(tmp_path):
    path = tmp_path / "stage2" / "history.json"
    history = {"loss": [], "val_auc": []}
    for epoch in range(5):
        history["loss"].append(1.0 / (epoch + 1))
        history["val_auc"].append(0.5 + epoch / 20)
        write_history(path, history)
        data = json.loads(path.read_text())
        assert data["epochs"] == epoch + 1 and data["history"]["loss"] == history["loss"]
    assert [p.name for p in path.parent.iterdir()] == ["history.json"]  # no temporary file left


def test_chart_legends_sit_below_the_plot_area():
    series = [{"label": f"series {i}", "x": [1, 2, 3], "y": [0.1 * i, 0.5, 0.9]} for i in range(4)]
    svg = line_chart(series, title="t", xlabel="epoch", ylabel="y", marks=[{"x": 2, "label": "kept (epoch 2)"}])
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    plot = next(r for r in root.iter(f"{ns}rect") if r.get("stroke") == "#999")
    bottom, top = float(plot.get("y")) + float(plot.get("height")), float(plot.get("y"))
    legend = [t for t in root.iter(f"{ns}text") if "legend" in (t.get("class") or "")]
    assert [t.text for t in legend] == [s["label"] for s in series]
    assert all(float(t.get("y")) > bottom for t in legend)
    mark = next(t for t in root.iter(f"{ns}text") if t.text == "kept (epoch 2)")
    assert float(mark.get("y")) < top  # the kept-epoch label sits above the data too
    assert float(root.get("height")) > max(float(t.get("y")) for t in legend)


@pytest.mark.slow
def test_bootstrap_is_quiet_and_prints_its_log_when_pip_fails(tmp_path):
    """A set-up that fails shows pip's own output; PIP_NO_INDEX keeps it offline and quick."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", tmp_path / "scripts")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'broken'\nversion = 'not a version'\n")
    env = {**os.environ, "PYTHON": PY, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode != 0
    assert "set-up failed" in done.stderr and "bootstrap.log" in done.stderr
    assert re.search(r"(?i)version", done.stderr)  # pip's own complaint, from the log
    assert not (tmp_path / ".venv" / ".msbt-installed").exists()


def test_printed_to_log_takes_this_threads_prints_only(tmp_path, capsys, restore_logging):
    """Tune prints "View detailed results here" from the thread that runs the search: that goes to driver.log;
    Ray's own thread, which prints the worker lines the console lets through, keeps the terminal."""
    import threading

    console.setup(verbose=False)
    console.attach_run(tmp_path)
    with console.printed_to_log():
        print("View detailed results here: /somewhere")
        other = threading.Thread(target=lambda: print("ValueError: from a worker"))
        other.start()
        other.join()
    out = capsys.readouterr().out
    assert "ValueError: from a worker" in out and "View detailed results" not in out
    assert "View detailed results here" in (tmp_path / "logs" / console.DRIVER_LOG).read_text()


def test_a_ray_record_with_a_traceback_is_one_line_on_the_terminal_and_whole_in_the_log(tmp_path, capsys,
                                                                                         restore_logging):
    """Tune's "Trial task failed" record carried Ray's nested tracebacks (about 60 lines a failed trial) and Ray
    Data's "Full stack trace:" record, which Ray Data keeps off its own terminal handler, reached msbt's."""
    console.setup(verbose=False)
    folder = console.attach_run(tmp_path / "run")
    terminal, log_file = console._state["console"], console._state["file"]
    try:
        try:
            raise OSError(28, "No space left on device", "/run/model.keras")
        except OSError as err:
            raise RuntimeError("Training failed due to worker errors:\n  File ...") from err
    except RuntimeError as err:
        failed = logging.LogRecord("ray.tune.execution.tune_controller", logging.ERROR, __file__, 1,
                                   "Trial task failed for trial %s", ("t_00000",), (type(err), err, err.__traceback__))
    shown = terminal.format(failed)
    assert shown == ("ERROR ray.tune.execution.tune_controller: Trial task failed for trial t_00000: OSError: "
                     f"[Errno 28] No space left on device: '/run/model.keras' (the rest in {folder / 'driver.log'})")
    whole = log_file.format(failed)
    assert "Traceback (most recent call last)" in whole and "Training failed due to worker errors" in whole
    several = logging.LogRecord("ray._private.worker", logging.ERROR, __file__, 1, "Unhandled error: x\n  y\n  z", (),
                                None)
    assert terminal.format(several).startswith("ERROR ray._private.worker: Unhandled error: x (the rest in ")
    unhandled = logging.LogRecord(  # the exception a message of several lines names is shown beside its first line
        "ray._private.worker", logging.ERROR, __file__, 1, "Unhandled error (suppress with ...): ray::train() (pid=7)\n"
        "ray.train.WorkerGroupError: Training failed\nTraceback (most recent call last):\n  File \"x.py\"\n"
        "OSError: [Errno 28] No space left on device: '/run/m.keras'\n", (), None)
    assert terminal.format(unhandled) == (
        "ERROR ray._private.worker: Unhandled error (suppress with ...): ray::train() (pid=7): OSError: [Errno 28] No "
        f"space left on device: '/run/m.keras' (the rest in {folder / 'driver.log'})")
    ours = logging.LogRecord("msbt.step", logging.ERROR, __file__, 1, "two\nlines", (), None)
    assert terminal.format(ours).endswith("two\nlines")  # msbt's own records are shown as they are
    hidden = logging.LogRecord("ray.data._internal", logging.ERROR, __file__, 1, "Full stack trace:\n...", (), None)
    hidden.hide = True  # what Ray Data sets for its log file only
    assert not terminal.filter(hidden) and log_file.filter(hidden)
    console.hold_back("Trial task failed for trial")
    assert not terminal.filter(failed) and log_file.filter(failed)
    # ray.init puts Ray's format on every handler of the "ray" logger, and tame_ray gives each its own back
    ray_logging = pytest.importorskip("ray._private.ray_logging")
    ray_logger = logging.getLogger("ray")
    level, formats = ray_logger.level, {h: h.formatter for h in ray_logger.handlers}  # this process's, put back after
    ray_logger.addHandler(terminal)
    try:
        ray_logging.setup_logger(level or logging.INFO, "%(asctime)s\t%(levelname)s %(filename)s -- %(message)s")
        assert "\t" in terminal.format(several)
        console.keep_own_formats()
        assert terminal.format(several).startswith("ERROR ray._private.worker: Unhandled error: x")
    finally:
        ray_logger.removeHandler(terminal)
        ray_logger.setLevel(level)
        for handler, formatter in formats.items():
            handler.setFormatter(formatter)
    capsys.readouterr()


def test_repeated_worker_lines_ray_holds_back_are_dropped_when_the_command_ends(tmp_path, restore_logging):
    """Ray prints the worker lines it held back as repeats at ray.shutdown, after the command's error line and
    straight to the terminal; workers.log has them already."""
    ray_logging = pytest.importorskip("ray._private.ray_logging")
    if not ray_logging.RAY_DEDUP_LOGS:
        pytest.skip("Ray's log deduplication is off (RAY_DEDUP_LOGS=0)")
    console.setup(verbose=False)
    console.attach_run(tmp_path / "run")
    dedup = ray_logging.stderr_deduplicator
    line = "OSError: [Errno 28] No space left on device: '/run/model.keras'"
    for pid in (101, 102, 103, 104):
        dedup.deduplicate({"ip": "127.0.0.1", "pid": pid, "actor_name": "RayTrainWorker", "task_name": "",
                           "is_err": True, "lines": [line]})
    assert dedup.recent  # held back: [repeated 3x across cluster], printed at ray.shutdown
    console.hide_worker_output(drop_bars=False)
    assert dedup.flush() == []


@pytest.fixture
def raylet_says(restore_logging, monkeypatch):
    """Lines as the raylet sends them to a quiet command's driver (Ray prints them itself, msbt wraps that)."""
    ray_worker = pytest.importorskip("ray._private.worker")
    console.setup(verbose=False)
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # Ray's own, put back after
    console._route_raylet_notices(ray_worker)
    return lambda *lines: ray_worker.print_to_stdstream({"lines": list(lines), "pid": "raylet", "is_err": False},
                                                         ignore_prefix=False)


def test_the_raylets_worker_start_up_notice_goes_to_the_workers_log(tmp_path, capfd, raylet_says):
    """"WARNING: 8 PYTHON worker processes have been started on node: ... 4x the maximum expected startup concurrency"
    reached the terminal of every Tune search on a 2-core machine; Ray prints the raylet's messages itself."""
    folder = console.attach_run(tmp_path / "run")
    notice = ("WARNING: 8 PYTHON worker processes have been started on node: 7f04 with address: 127.0.0.1, which is 4x "
              "the maximum expected startup concurrency (2).")
    killed = "Task was killed due to the node running low on memory."
    raylet_says(notice, killed)
    raylet_says(notice)
    shown = capfd.readouterr()
    assert killed in shown.out + shown.err and "PYTHON worker processes" not in shown.out + shown.err
    assert (folder / console.WORKERS_LOG).read_text().count("PYTHON worker processes have been started") == 2


def test_serve_shutdowns_raylet_notice_stays_off_a_command_without_a_run_folder(capfd, raylet_says):
    """`msbt serve` on a `ray start` cluster ended its Ctrl-C with "(raylet) Task ServeController.graceful_shutdown
    failed ... killed by `ray.kill`" (Serve's controller ends itself in that task); it has no log to send it to."""
    notice = ("Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so the task will "
              "be retried. Error: The actor is dead because it was killed by `ray.kill`.")
    died = "A worker died or was killed while executing a task by an unexpected system error."
    raylet_says(notice, died)
    shown = capfd.readouterr()
    assert died in shown.out + shown.err and "graceful_shutdown" not in shown.out + shown.err
