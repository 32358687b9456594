"""The suite's own test-process scheduler (tests/helpers.py ``file_scheduler``), run on a toy suite."""

import os
import subprocess
import sys
import textwrap

from helpers import ROOT


def test_a_crashed_test_process_fails_its_test_and_the_run_goes_on(tmp_path):
    # Two test processes; one test kills its own process (SIGTERM, as a signal handler gone wrong would).
    # xdist 3.8's scope scheduler ran that test again in the next process and then hung the run; with the
    # suite's scheduler the test fails once, naming the crash, and every other test runs.
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from helpers import file_scheduler

        class Scheduling:
            @staticmethod
            def pytest_xdist_make_scheduler(config, log):
                return file_scheduler(config, log, {{"test_b.py", "test_c.py"}})

        def pytest_configure(config):
            config.pluginmanager.register(Scheduling(), "toy-scheduling")
    """))
    for name in ("a", "b", "c", "d"):
        (tmp_path / f"test_{name}.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    (tmp_path / "test_crash.py").write_text(textwrap.dedent("""
        import os, signal, time

        def test_before():
            pass

        def test_crash():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)

        def test_after():
            pass
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    run = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-rA", "-q",
                          "-o", "addopts=", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "1 failed, 10 passed" in out, out
    assert "crashed while running 'test_crash.py::test_crash'" in out, out
    assert "PASSED test_crash.py::test_after" in out, out
