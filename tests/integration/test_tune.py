"""Ray Tune search of stage 2 (msbt.tune.search, msbt.tune.fast) on a real local Ray cluster.

On the session's tiny run (tests/conftest.py: built-in data, the tiny_cnn backbone at 32 px, stage 2 for
2 epochs), ASHA with a grace period of 1 epoch. One search is started as a subprocess (the real workflow,
on a private cluster), killed with SIGKILL once a trial has finished, and restored in this process; its
best configuration, loaded as an overlay, must give exactly the stage 2 the winning trial trained. Fast mode runs head trials on features
cached once and reused.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import placement_groups_held, ray_actors
from msbt.config import ConfigError, Config, load_config, to_dict

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]


# ---------------------------------------------------------------------------------------------------
# No cluster needed


def test_tune_yaml_spells_out_the_defaults():
    assert to_dict(load_config([ROOT / "workflows" / "configs" / "tune.yaml"])) == to_dict(Config())


@pytest.mark.parametrize("override, message", [
    ("tune.space.dropout=[0.6, 0.2]", "tune.space.dropout` must be a range"),
    ("tune.space.dropout=[0.2, 1.0]", "tune.space.dropout` must lie within"),
    ("tune.space.learning_rate=[0, 0.01]", "tune.space.learning_rate` is log-uniform"),
    ("tune.space.dense_units=[[256, 0, 64]]", "tune.space.dense_units`"),
    ("tune.space.batch_size=[0, 8]", "tune.space.batch_size`"),
])
def test_a_bad_search_space_is_refused_naming_the_source_and_key(override, message):
    from msbt.tune.space import check_space

    config = load_config([], [override])
    with pytest.raises(ConfigError, match=message) as err:
        check_space(config.tune.space, "my.yaml")
    assert str(err.value).startswith("my.yaml: ")


def test_a_wrong_type_in_the_space_names_the_key():
    with pytest.raises(ConfigError, match="tune.space.optimizer` item 0: must be one of"):
        load_config([], ["tune.space.optimizer=[rmsprop]"])


def test_trial_0_is_the_papers_stage2_configuration():
    from msbt.tune.space import reference_point, trial_stage

    cpu = load_config([ROOT / "workflows" / "configs" / "cpu.yaml"])  # cpu.yaml uses Adam in stage 2
    point = reference_point(cpu)
    assert point == {"head": {"dense_units": "256-128-64", "dropout": 0.5, "l2": 0.0},
                     "augment": {"expansion": 3, "shift": 0.1, "rotation": 15.0, "flip": False},
                     "optimizer": "adagrad", "learning_rate": 0.001, "batch_size": 16}
    stage = trial_stage(cpu, point)
    paper = Config().stage2
    assert (stage.head, stage.augment, stage.optimizer, stage.learning_rate, stage.batch_size) == (
        paper.head, paper.augment, paper.optimizer, paper.learning_rate, paper.batch_size)
    assert (stage.backbone, stage.image_size, stage.epochs) == (cpu.stage2.backbone, 96, cpu.stage2.epochs)
    run_ref = load_config([ROOT / "workflows" / "configs" / "cpu.yaml"], ["tune.reference=run"])
    assert reference_point(run_ref)["optimizer"] == "adam"


def test_fast_mode_holds_the_augmentation_ranges_at_the_reference():
    from msbt.tune.space import param_space, reference_point, trial_stage

    config = load_config([], ["stage2.trainable_backbone=false"])
    assert set(param_space(config.tune.space, fast=True)["augment"]) == {"expansion"}
    stage = trial_stage(config, {"augment": {"expansion": 5}, "head": {"dense_units": "16-8-4"}}, fast=True)
    assert (stage.augment.expansion, stage.augment.shift, stage.augment.rotation) == (5, 0.1, 15.0)
    assert stage.head.dense_units == (16, 8, 4) and stage.trainable_backbone is False
    assert "shift" not in reference_point(config, fast=True)["augment"]


# ---------------------------------------------------------------------------------------------------
# Real Ray Tune runs


TRIALS = 3  # the session run's search (tests/conftest.py)


@pytest.mark.ray
def test_a_trial_that_finds_the_disk_full_stops_the_search_and_resume_finishes_it(ray_local, tmp_path, capfd, request):
    """A full disk under run.storage_path failed every trial of a search in turn, each after its first epoch, and the
    command ended with `no trial reported the metric yet` (325 lines on the smoke search, docs/reliability.md). Real
    Tune with a trainable that stands for a trial's checkpoint save: the first full-disk error stops the search as
    Ctrl-C does, the later trials do not start, and a restore with room again runs every trial."""
    import errno

    from ray import tune

    from msbt import console
    from msbt.tune import failures

    disk_full = tmp_path / "disk-full"  # while it exists, trial 1's save finds the disk full
    disk_full.touch()
    target = str(tmp_path / "model.keras")

    def trainable(params):
        if params["i"] == 1 and os.path.exists(disk_full):
            raise OSError(errno.ENOSPC, "No space left on device", target)
        tune.report({"score": params["i"]})

    failures.reset()
    held_back = console._state["held_back"]  # TrialFailures holds Tune's "Trial task failed" back: put back after
    request.addfinalizer(lambda: console._state.update(held_back=held_back))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 0.5}),
        param_space={"i": tune.grid_search([0, 1, 2, 3])},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, trial_dirname_creator=lambda t: f"trial_{t.trial_id[-5:]}"),
        run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), verbose=0,
                                  callbacks=[failures.TrialFailures()]),
    )
    scores = [r.metrics.get("score") for r in tuner.fit()]
    assert sorted(s for s in scores if s is not None) == [0], scores  # trials 2 and 3 never ran
    trial, error = failures.stopped()
    assert trial == "trial_00001" and error.errno == errno.ENOSPC and error.filename == target
    with pytest.raises(failures.SearchStopped) as stopped:
        failures.check_stopped(tmp_path / "exp")
    assert str(stopped.value).startswith(f"[Errno 28] No space left on device: '{target}' (trial_00001); the search "
                                         "stopped") and "--resume" in str(stopped.value)
    assert (f"tune: trial_00001 failed: OSError: [Errno 28] No space left on device: '{target}' (traceback in "
            f"{tmp_path / 'exp' / 'trial_00001' / 'error.txt'})") in capfd.readouterr().err
    disk_full.unlink()  # room again
    failures.reset()
    restored = tune.Tuner.restore(str(tmp_path / "exp"), trainable=tune.with_resources(trainable, {"CPU": 0.5}),
                                  resume_unfinished=True, resume_errored=True)
    assert sorted(r.metrics.get("score") for r in restored.fit()) == [0, 1, 2, 3]
    assert failures.stopped() is None  # the restored search (Tune's copy of the callback) did not stop


@pytest.fixture(scope="module")
def prepared(tiny_run):
    """The session's run (tests/conftest.py): its overlay (a 3-trial search of tiny_cnn at 32 px), stores and
    stage-1 checkpoint. A search opens the recorded split and stores: the data folder has been moved away,
    so it must read no image."""
    from msbt.tune.search import stage1_checkpoint

    parent = stage1_checkpoint(tiny_run.config, tiny_run.data.microscope_store)  # the run's own, reused
    assert tiny_run.config.tune.num_samples == TRIALS
    assert parent == str(tiny_run.stage1)
    return {"yaml": tiny_run.yaml, "config": tiny_run.config, "ultrasound": str(tiny_run.data.ultrasound_store),
            "parent": parent}


def _terminated(experiment: Path) -> int:
    """Trials the experiment state on disk records as finished (what a restore would keep)."""
    count = 0
    for state in experiment.glob("experiment_state-*.json"):
        try:
            entries = json.loads(state.read_text()).get("trial_data", [])
        except (json.JSONDecodeError, OSError):
            continue  # being written
        count = max(count, sum(json.loads(e[0]).get("status") == "TERMINATED" for e in entries))
    return count


def _start_search(config: Path, ray_tmp: str, log: Path) -> subprocess.Popen:
    """The tune workflow as a subprocess in its own session, on a private Ray cluster under ``ray_tmp``."""
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "workflows/tune.py", "--config", str(config), "--address", "local"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"},
        )


def _kill_session(proc: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL the workflow's process group, then any process of its private Ray cluster left behind."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(2)
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if ray_tmp.encode() in (pid_dir / "cmdline").read_bytes():
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_search_is_interrupted_restored_and_its_best_config_is_the_winners_stage(prepared, tmp_path, capfd):
    from msbt.cli import main as msbt_main
    from msbt.model.checkpoint import read_manifest
    from msbt.tune.review import read_experiment, write_best_overlay
    from msbt.tune.search import experiment_dir, run_search
    from msbt.tune.space import trial_stage

    import ray

    config = prepared["config"]
    experiment = experiment_dir(config)
    # Two msbt clusters on one machine (issue #13, item 10; docs/reliability.md): the search runs on its own
    # private cluster beside this session's, which is up throughout. The trials' Ray Train placement-group
    # cleaners once went looking for a cluster and logged "Found multiple active Ray instances", then could
    # ask the other one. What the search's workers print goes to the run's workers.log: read from here on.
    assert ray.is_initialized()
    workers_log = Path(config.run.storage_path) / config.run.name / "logs" / "workers.log"
    workers_from = workers_log.stat().st_size if workers_log.exists() else 0
    # A private cluster whose processes can be found by their temp folder (short: Unix socket paths).
    ray_tmp = tempfile.mkdtemp(prefix="msbt-tune-", dir="/tmp")
    log = tmp_path / "first.log"
    proc = _start_search(prepared["yaml"], ray_tmp, log)
    try:
        deadline = time.monotonic() + float(os.environ.get("MSBT_TUNE_TEST_WAIT", 900))
        while _terminated(experiment) < 1:
            if proc.poll() is not None and "timed out during startup" in log.read_text():
                # Ray waits a fixed 30 s for a new node to register; a busy machine can miss that.
                proc = _start_search(prepared["yaml"], ray_tmp, log)
            assert proc.poll() is None, f"the search ended before it was interrupted:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no trial finished in time:\n{log.read_text()[-3000:]}"
            time.sleep(1)
    finally:
        _kill_session(proc, ray_tmp)
    assert "stage 1: reusing" in log.read_text()  # every trial starts from the one stage-1 checkpoint
    with workers_log.open("rb") as handle:
        handle.seek(workers_from)
        search_workers = handle.read().decode("utf-8", "replace")
    assert "RayTrainWorker" in search_workers  # the trials' worker output is there: the check below can fail
    for out in (log.read_text(), search_workers):
        assert "Found multiple active Ray instances" not in out
        assert "Failed to query Ray Train Controller actor state" not in out
    # the quiet console (issue #17): Tune's start-up print goes to the run's driver.log, and the trials' Train
    # workers draw no Ray Data bars ("Dataset val_... execution finished" after every validation pass)
    terminal = log.read_text()
    assert "View detailed results here" not in terminal and "execution finished" not in terminal
    assert "View detailed results here" in (workers_log.parent / "driver.log").read_text()
    _, before = read_experiment(experiment)
    finished = {t["trial"]: (experiment / t["trial"] / "result.json").read_text()
                for t in before if t["status"] in ("complete", "stopped early")}
    assert 1 <= len(finished) < TRIALS

    with pytest.raises(ConfigError, match="--resume"):
        run_search(config)  # a second start without --resume is refused, not mixed in
    # ... and by `msbt tune` before it starts or joins Ray (it was said after a cluster's start, about 10 s)
    import msbt.cli

    def no_ray(*_args, **_kw):
        raise AssertionError("msbt tune went on to start Ray")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(msbt.cli, "_start_ray", no_ray)
        capfd.readouterr()
        assert msbt_main(["tune", "--config", str(prepared["yaml"])]) == 1
        assert "an experiment already exists; continue it with --resume" in capfd.readouterr().err
    actors_before, held_before = ray_actors(), placement_groups_held()
    capfd.readouterr()
    run_search(config, resume=True)
    # the trials' bar counts the ones that finished before the interruption too (it ended at 1/3 or 2/3 before)
    assert f"{TRIALS}/{TRIALS} trial" in capfd.readouterr().err
    # A trial's Train run keeps Ray's placement-group cleaner (msbt.train.runner.stage_trainer): Tune may end a
    # trial while the search goes on, and no trial's placement group may keep its CPUs afterwards.
    assert "PlacementGroupCleaner" in {name for actor, name in ray_actors().items() if actor not in actors_before}
    deadline = time.monotonic() + 60  # a cleaner removes an ended trial's group after its next check (1 s)
    while placement_groups_held(ignore=held_before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not placement_groups_held(ignore=held_before)

    search, trials = read_experiment(experiment)
    assert len(trials) == TRIALS and {t["status"] for t in trials} <= {"complete", "stopped early"}
    assert all(t["epochs"] >= 1 for t in trials)  # the trial cut off by the kill reran and reported
    # The workflow ran under ASHA (Tune's own start-up table, in the run's driver.log). Whether it cut one of
    # these trials depends on which reached epoch 1 first (2 at a time); its cuts are checked exactly on a
    # serial search in the fast-mode test.
    assert "AsyncHyperBandScheduler" in (workers_log.parent / "driver.log").read_text()
    reference = [t for t in trials if t["reference"]]
    assert [t["trial"] for t in reference] == ["trial_00000"]
    assert json.loads((experiment / "trial_00000" / "params.json").read_text()) == search["reference_point"]
    for name, text in finished.items():  # finished trials were kept, not rerun
        assert (experiment / name / "result.json").read_text() == text
    for trial in trials:  # Tune's files, each trial's HParams run for TensorBoard, each trial's Train checkpoints
        folder = experiment / trial["trial"]
        assert (folder / "progress.csv").is_file()
        assert list((experiment / "hparams" / trial["trial"]).glob("events.out.tfevents.*"))
    assert len(list((experiment / "train").glob("*/stage2/checkpoint_*/manifest.json"))) >= TRIALS
    assert not list((experiment / "train").glob("*/.work"))  # the trials' scratch (Tune ends a trial before its stage)

    # tune-report: the ranked table and the overlay, which the CLI accepts and which gives the winning trial's
    # stage 2 exactly: the stage that trial trained, from the same stage-1 checkpoint, in this search (so it is
    # not trained a second time here: one Ray Train stage less in the suite)
    best = write_best_overlay(experiment)
    assert msbt_main(["tune-report", str(experiment)]) == 0
    assert msbt_main(["config", "--config", str(prepared["yaml"]), "--config", str(best)]) == 0
    rerun = load_config([prepared["yaml"], best], [f"run.storage_path={tmp_path}"])
    winner = trials[0]
    assert winner["best"] is not None  # it trained and reported in this search
    assert rerun.stage2.optimizer == winner["params"]["optimizer"]
    assert rerun.stage2.learning_rate == pytest.approx(winner["params"]["learning_rate"])
    point = json.loads((experiment / winner["trial"] / "params.json").read_text())
    assert rerun.stage2 == trial_stage(config, point)
    suffix = winner["trial"].rsplit("_", 1)[-1]  # its Ray Train run: train/<Tune's trial id>/stage2
    manifests = [read_manifest(m.parent) for m in experiment.glob(f"train/*_{suffix}/stage2/checkpoint_*/manifest.json")]
    assert manifests and all(m["config"] == to_dict(rerun.stage2) and m["parent"]["path"] == prepared["parent"]
                             for m in manifests)


@pytest.mark.ray
@pytest.mark.slow
def test_fast_mode_caches_features_once_and_trains_heads_on_them(prepared, capfd):
    import dataclasses

    from msbt.tune.fast import attach_head, fit_head, frozen, load_features, train_weights
    from msbt.data.store import read_store
    from msbt.tune.review import read_experiment
    from msbt.tune.search import run_search

    over = ["tune.fast=true", "stage2.trainable_backbone=false", "tune.num_samples=2", "tune.scheduler=none"]
    config = load_config([prepared["yaml"]], over + ["tune.experiment=fast1"])
    run_search(config)
    printed = capfd.readouterr()  # file descriptors: Ray core's own log lines go to fd 2, not through Python
    assert "fast mode: features of" in printed.out
    # Ray core logged an error line for each feature actor (ray-project/ray#57733) on every fast search
    assert "constructor arguments in the object store" not in printed.err
    cache = list((Path(config.run.storage_path) / "tiny" / "tune" / "features").glob("*/features.json"))
    assert len(cache) == 1
    info = json.loads(cache[0].read_text())
    store = read_store(prepared["ultrasound"], columns=["split"])
    assert info["train"] == int((store["split"] == "train").sum()) and info["copies"] == 3  # max expansion
    assert info["val"] == int((store["split"] == "val").sum())  # and no test rows
    search, trials = read_experiment(cache[0].parents[2] / "fast1")
    assert search["fast"] and len(trials) == 2 and all(t["epochs"] == 2 for t in trials)
    assert any(t["reference"] for t in trials)

    features = load_features(cache[0].parent)
    assert features["val_x"].std(axis=0).max() > 1e-3  # the images give different features
    originals, augmented = features["train_x"][:, 0], features["train_x"][:, 1]
    assert np.abs(augmented - originals).max() > 1e-3 * np.abs(originals).max()  # copy 1 is augmented

    # Early stopping, exactly: one trial at a time, so trial k reaches epoch 1 (ASHA's only rung below
    # max_t = 2) after trials 0..k-1, and ASHA must stop it there iff its val_loss is worse than the
    # (1 - 1/reduction_factor) quantile of theirs (Tune records -val_loss for mode "min").
    # (A second search of the same stage 2 on the same store: it reuses the cached features.)
    # stage2.balance (here, not in a search of its own: one Tune start less): the heads train with the per-image
    # weights a full training would use, counted once on the same cached features (checked below)
    asha = load_config([prepared["yaml"]], over[:2] + ["tune.experiment=asha", "tune.num_samples=8",
                                                       "tune.max_concurrent_trials=1", "tune.scheduler=asha",
                                                       "stage2.balance=class"])
    run_search(asha)
    printed = capfd.readouterr().out
    assert "fast mode: reusing cached features" in printed
    assert "fast mode: loss weights (balance class): benign" in printed
    assert json.loads(cache[0].read_text()) == info
    experiment = cache[0].parents[2] / "asha"
    _, trials = read_experiment(experiment)
    first = {}
    for trial in trials:
        rows = [json.loads(line) for line in (experiment / trial["trial"] / "result.json").read_text().splitlines()]
        first[trial["trial"]] = -rows[0]["val_loss"]
    recorded, expected = [], {}
    for name in sorted(first):
        cutoff = np.nanpercentile(recorded, (1 - 1 / asha.tune.reduction_factor) * 100) if recorded else None
        expected[name] = "stopped early" if cutoff is not None and first[name] < cutoff else "complete"
        recorded.append(first[name])
    assert {t["trial"]: t["status"] for t in trials} == expected
    assert "stopped early" in expected.values() and "complete" in expected.values()
    # tune.reuse_processes (default on): trials ran in fewer processes than there were trials (a fresh
    # process per trial gives one pid per trial; that results do not change is benchmarks/tune.py --fast-reuse's check)
    pids = {json.loads(line)["pid"] for t in trials
            for line in (experiment / t["trial"] / "result.json").read_text().splitlines() if line.strip()}
    assert asha.tune.reuse_processes and len(pids) < len(trials), pids

    # the weighted heads of the ASHA search: those ASHA let run trained every epoch; each class's images together
    # weigh the same and the weights average 1
    assert all(t["epochs"] == 2 for t in trials if t["status"] == "complete")
    weights = train_weights(prepared["ultrasound"], features, "class")
    assert weights.mean() == pytest.approx(1.0, rel=1e-5)
    totals = [weights[features["train_y"] == label].sum() for label in (0, 1)]
    assert totals[0] == pytest.approx(totals[1], rel=1e-5)

    # The head goes back on the backbone: the full model gives what the head gives on the cached features.
    stage = dataclasses.replace(frozen(config.stage2), epochs=1)
    head, _ = fit_head(stage, features)
    model = attach_head(head, stage, prepared["parent"])
    images = read_store(prepared["ultrasound"], columns=["image", "source"], split="val")
    order = np.argsort(images["source"])
    assert list(images["source"][order]) == list(features["val_source"])
    full = model.predict(images["image"][order].astype(np.float32), verbose=0)
    from_cache = head.predict(features["val_x"], verbose=0)
    assert from_cache.std() > 0  # not one constant answer
    np.testing.assert_allclose(full, from_cache, atol=1e-4)
