"""The suite's own test-process scheduler (tests/helpers.py ``file_scheduler``), run on a toy suite."""

import os
import subprocess
import sys
import textwrap

from helpers import ROOT


def test_a_crashed_test_process_fails_its_test_and_the_run_goes_on(tmp_path):
    # Two test processes. The first is handed test_1crash.py and test_3more.py, the second test_2.py and
    # test_4.py, which it finishes and leaves; then test_crash sends its own process SIGTERM (as a signal
    # handler gone wrong would). xdist 3.8's scope scheduler ran test_crash again in the next process, and
    # handed the new process one file with one test left, which a process holds until it is sent another:
    # the run hung with test_3more.py still queued. With the suite's scheduler test_crash fails once, naming the
    # crash, and every other test runs.
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from helpers import file_scheduler

        class Scheduling:
            @staticmethod
            def pytest_xdist_make_scheduler(config, log):
                return file_scheduler(config, log)

        def pytest_configure(config):
            config.pluginmanager.register(Scheduling(), "toy-scheduling")
    """))
    (tmp_path / "test_1crash.py").write_text(textwrap.dedent("""
        import os, signal, time

        def test_crash():
            time.sleep(2)  # the other process has finished its files by then
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

        def test_after():
            pass
    """))
    for name in ("2", "3more", "4"):
        (tmp_path / f"test_{name}.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    run = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-rA", "-q",
                          "-o", "addopts=", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "1 failed, 7 passed" in out, out
    assert "crashed while running 'test_1crash.py::test_crash'" in out, out
    assert "PASSED test_1crash.py::test_after" in out and "PASSED test_3more.py::test_two" in out, out
