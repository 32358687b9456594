"""Shared fixtures: the optional real data in ../shared/data, the session's local Ray cluster, and the
session's tiny run (its stores, then its stage 1, each made once).

Helper functions (not fixtures) live in tests/helpers.py.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from helpers import ROOT, TINY_RUN_FIXTURES, file_scheduler, shared_data


@pytest.fixture
def real_data():
    """Return a function that gives a real data set's folder or skips the test with the reason."""

    def get(name: str) -> Path:
        folder = shared_data() / name
        if not folder.is_dir():
            pytest.skip(f"real data set {folder} not present (set MSBT_SHARED_DATA to use it)")
        return folder

    return get


@pytest.fixture
def restore_logging():
    """Put the logging set-up back as it was after a test that ran msbt.console.setup/attach_run."""
    import logging

    from msbt import console

    root = logging.getLogger()
    level = root.level
    # console.tame_ray (called by attach_run once Ray is imported in this process) adds them to Ray's loggers too
    loggers = [logging.getLogger(name) for name in ("", "ray", "ray.data")]
    before = {logger.name: list(logger.handlers) for logger in loggers}
    yield
    for logger in loggers:
        for handler in list(logger.handlers):
            if handler not in before[logger.name]:
                logger.removeHandler(handler)
                handler.close()
    root.setLevel(level)
    logging.captureWarnings(False)
    console._state.update(verbose=True, console=None, buffer=None, file=None, folder=None, workers=None,
                          workers_hidden=False, held_back=(), console_format=None)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for the session (2 CPUs), shut down at the end.

    Started as msbt.raycluster starts one, with the dashboard: it serves the state API that Ray Train's
    placement-group cleaner queries; without it, trials that Tune stops early leak their placement
    groups and later tests wait for CPUs forever.
    """
    ray = pytest.importorskip("ray")
    from msbt.raycluster import start_private

    if not ray.is_initialized():
        # msbt's private cluster: loopback only, and every process of it knows its address, so a
        # Train placement-group cleaner never queries another cluster on the machine (docs/reliability.md)
        start_private(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_stores(tmp_path_factory, ray_local):
    """One run for the session, its data part: built-in data -> split and stores, made once (Ray Data).

    The tests that build on it (the experiments, Tune, the Ray Train stage tests) each train only what they
    test, into their own subfolders of the run (``experiments/``, ``crossval/``, ``compare/``, ``tune/``) or
    their own run folders. The data folder is moved away afterwards: every later step must open the
    recorded split and stores and read no image.

    Returns:
        ``yaml`` (the run's overlay, for subprocesses), ``config`` and ``data`` (msbt.jobs.experiments.RunData).
    """
    from msbt.config import load_config
    from msbt.jobs import experiments as X

    folder = tmp_path_factory.mktemp("tiny-run")
    overlay = {
        "extends": str(ROOT / "workflows" / "configs" / "smoke.yaml"),
        "synth": {"out_dir": str(folder / "synth"), "fields_per_line": 3, "field_size": 400, "lesions_per_class": 9,
                  "frames_per_lesion": [1, 2], "ultrasound_size": 64},
        # a quarter of the lesions in test, so a paired DeLong has two of each class to work with
        "data": {"split": [0.5, 0.25, 0.25], "folds": 3},
        "preprocess": {"max_patches_per_field": 4, "image_size": 32},
        # tiny_cnn (random init, msbt.model.models): its features vary with the image, which Tune's fast-mode
        # checks need (and check); Lite0 with random weights at 32 px gives near-constant ones.
        "stage1": {"backbone": "tiny_cnn", "weights": "none", "image_size": 32, "epochs": 1, "batch_size": 8},
        "stage2": {"backbone": "tiny_cnn", "image_size": 32, "epochs": 2, "batch_size": 8, "monitor": "val_auc",
                   "head": {"dense_units": [8], "dropout": 0.5}},
        # val_loss is continuous: ASHA's cut at the first rung is not decided by ties of a small-split AUC. Three
        # trials, two at a time: killed once one has finished, at least one trial is left for the restore to run
        # (tests/integration/test_tune.py), with one Ray Train stage fewer than four.
        "tune": {"num_samples": 3, "grace_period": 1, "max_concurrent_trials": 2, "cpus_per_trial": 0.5,
                 "metric": "val_loss", "mode": "min", "experiment": "search",
                 "space": {"dense_units": [[256, 128, 64], [16, 16, 16]], "expansion": [1, 3]}},
        "run": {"name": "tiny", "storage_path": str(folder / "runs")},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(overlay))
    config = load_config([path])
    data = X.prepare_run(config, stage1=True)
    (folder / "synth").rename(folder / "synth-moved-away")
    return SimpleNamespace(yaml=path, config=config, data=data)


@pytest.fixture(scope="session")
def tiny_run(tiny_stores):
    """The session's run with its stage 1, trained once (Ray Train); ``stage1`` is its checkpoint folder."""
    from msbt.jobs import experiments as X

    return SimpleNamespace(**vars(tiny_stores), stage1=X.shared_stage1(tiny_stores.data))


# The suite runs in two pytest-xdist processes (scripts/test.sh; -n 0 runs it in this one). A process gets a
# whole file at a time, so that a file's module fixtures are made once, and the files built on the session's
# tiny run as one unit, so that it is made once. (xdist's own "--dist loadgroup" would do the grouping, but
# with pytest 9.2 it groups nothing: it renames the test ids through an attribute pytest no longer reads.)
TINY_RUN_FILES = {"test_experiments.py", "test_train_ray.py", "test_tune.py"}


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect: the check below sees whole files
def pytest_collection_modifyitems(config, items):
    files: dict = {}
    for item in items:
        files.setdefault(item.path, []).append(item)
    for path, tests in files.items():
        if path.name not in TINY_RUN_FILES and any(TINY_RUN_FIXTURES & set(t.fixturenames) for t in tests):
            raise pytest.UsageError(f"{path.name} uses the session's tiny run: add it to TINY_RUN_FILES in "
                                    f"tests/conftest.py, so that one test process makes that run")
    # Long files first (the longest a file's tests may run, from their timeout marks; then files with slow
    # tests), so that no long file is left for the end while the other process idles.
    def longest_first(path):
        tests = files[path]
        limits = [mark.args[0] for t in tests for mark in t.iter_markers("timeout") if mark.args]
        return -max(limits, default=0), not any(t.get_closest_marker("slow") for t in tests)

    items[:] = [test for path in sorted(files, key=longest_first) for test in files[path]]
    # Ray blocks the main thread in C++ (ray.get, a Train stage's fit): pytest-timeout's default method, a
    # SIGALRM handler that raises, fails the test there only once ray.get returns (measured 2026-12-05: a 20 s
    # limit over a 60 s task failed after 61 s), so a hung stage would hang the suite. Outside tests/unit, which
    # runs no Ray, the limits are kept by pytest-timeout's thread method instead: at the limit it prints every
    # thread's stack and ends the test process (xdist reports the test failed and starts another process).
    here = Path(__file__).parent
    for item in items:
        if item.path.relative_to(here).parts[0] != "unit":
            mark = item.get_closest_marker("timeout")
            limit = (mark.args[0] if mark.args else mark.kwargs.get("timeout")) if mark else None
            item.add_marker(pytest.mark.timeout(limit, "thread"), append=False)  # the closest mark wins


class FileScheduling:
    """pytest-xdist's scheduler for this suite: a file is one unit of work, the tiny-run files together one."""

    @staticmethod
    def pytest_xdist_make_scheduler(config, log):
        return file_scheduler(config, log, TINY_RUN_FILES)


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(FileScheduling(), "msbt-file-scheduling")
