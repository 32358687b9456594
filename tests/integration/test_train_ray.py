"""Ray Train layer on a real local 2-CPU cluster: one stage through Ray, checkpoints in the msbt format.

The session's tiny stores (tests/conftest.py: synthetic fields cut into 200 px patches), the tiny_cnn
backbone at 32 px, 2 epochs per stage; one Train worker with 1 CPU (the other CPU is left to Ray Data).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_BACKBONE, placement_groups_held, ray_actors
from msbt.data import synth
from msbt.model.checkpoint import read_manifest, verify
from msbt.config import Config, RunConfig, StageConfig

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
STABLE = {"loss", "accuracy", "auc", "sensitivity", "specificity"}


def small(**kw) -> StageConfig:
    base = dict(**TINY_BACKBONE, image_size=32, batch_size=8, epochs=2)
    return StageConfig(**{**base, **kw})


def tiny_config(tmp_path, **run) -> Config:
    return Config(
        stage1=small(),
        stage2=small(weights="parent", monitor="val_auc"),
        run=RunConfig(name="t", storage_path=str(tmp_path / "ray"), cpus_per_worker=1.0, **run),
    )


@pytest.fixture(scope="module")
def stores(tiny_stores):
    """The session's stores (tests/conftest.py); the stages below are this file's own."""
    return tiny_stores.data.microscope_store, tiny_stores.data.ultrasound_store


POLL_SEEN = []  # the controller poll interval in the environment as the stage-1 fixture's trainer started
STARTED = []  # the class names of the actors the stage-1 fixture's run started (Ray's state API)
HELD = {}  # placement groups the stage-1 fixture's run left unremoved when it returned


@pytest.fixture(scope="module")
def stage1(stores, tmp_path_factory):
    from msbt.train import runner

    folder = tmp_path_factory.mktemp("run1")
    # deterministic: test_deterministic_runs_give_identical_models compares a resumed run with this one
    config = tiny_config(folder, deterministic=True)
    real = runner.fit_interruptibly

    def watched(trainer):  # the real call, with what Ray Train will hand its controller noted first
        POLL_SEEN.append(os.environ.get(runner.TRAIN_POLL_ENV))
        return real(trainer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(runner.TRAIN_POLL_ENV, "unset below")  # the session's value is put back after
        patch.delenv(runner.TRAIN_POLL_ENV)
        patch.setattr(runner, "fit_interruptibly", watched)
        before, held = ray_actors(), placement_groups_held()
        result = runner.train_stage(config, 1, stores[0], audit_dir=folder / "audit")
        STARTED.extend(name for actor, name in ray_actors().items() if actor not in before)
        HELD.update(placement_groups_held(ignore=held))
        return config, result


@pytest.mark.ray
@pytest.mark.parametrize("which", [0, 1], ids=["microscope", "ultrasound"])
def test_a_small_store_read_on_the_driver_gives_ray_datas_rows(stores, which):
    """A small store's split is read with pyarrow on the driver (split_tables, what train_stage hands the workers
    for a store within DRIVER_READ_BYTES), a large one with Ray Data's parallel read (split_dataset): the same
    rows and columns either way, and each worker's copy (shard_arrays) the same arrays."""
    import pyarrow as pa

    from msbt.train import runner

    def rows(frame):
        key = frame["source"] + (frame["box"].astype(str) if "box" in frame else "")
        return sorted(zip(key, frame["label_index"], frame["image"].map(bytes)))

    store = runner.Store.open(stores[which])
    assert store.memory_bytes() <= runner.DRIVER_READ_BYTES
    counts = store.summary().rows
    shape = tuple(store.image_shape)
    for split in ("train", "val"):
        direct = pa.concat_tables(runner.split_tables(stores[which], split, keys=True))
        parallel = runner.split_dataset(stores[which], split, keys=True)
        assert direct.schema.names == parallel.schema().names and direct.schema.types == parallel.schema().types
        assert rows(direct.to_pandas()) == rows(parallel.to_pandas())
        assert len(rows(direct.to_pandas())) == sum(counts[split].values()) > 0
        # a worker's copy, rows in the same order (sorted by source and box, as in deterministic mode)
        mine = runner.shard_arrays(runner.split_tables(stores[which], split, keys=True), shape, ordered=True)
        theirs = runner.shard_arrays(parallel, shape, ordered=True)
        assert all(np.array_equal(a, b) for a, b in zip(mine, theirs))
    for read in (runner.split_tables, runner.split_dataset):
        with pytest.raises(ValueError, match="has no 'test2' rows"):
            read(stores[which], "test2")


@pytest.mark.ray
def test_a_ray_data_read_of_a_store_asks_for_one_footer_reader_unless_the_user_chose(stores, monkeypatch):
    """Ray Data 2.60 starts 32 footer-reader actors per Parquet read by default (benchmarks/read_store.py)."""
    from msbt.data.store import FOOTER_ACTORS_ENV, Store

    monkeypatch.setenv(FOOTER_ACTORS_ENV, "recorded")  # so that the test's end puts back what was there
    monkeypatch.delenv(FOOTER_ACTORS_ENV)
    assert Store.open(stores[1]).ray_dataset(["label_index"]).count() > 0
    assert os.environ[FOOTER_ACTORS_ENV] == "1"
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "4")
    Store.open(stores[1]).ray_dataset(["label_index"])
    assert os.environ[FOOTER_ACTORS_ENV] == "4"


def test_workers_deal_themselves_the_rows_of_a_whole_split():
    """Two workers given a small store's whole training split (Arrow tables, one per Parquet file) each keep
    every other row: equal shards, the odd row out, as Ray Data's equal split; in deterministic mode sorted
    by source first, and every row kept."""
    import pyarrow as pa

    from msbt.train.runner import shard_arrays

    images = np.arange(5 * 4, dtype=np.uint8).reshape(5, 2, 2, 1)
    table = pa.table({"image": pa.array([a.tobytes() for a in images], pa.binary(4)), "label_index": [0, 1, 0, 1, 1],
                      "source": ["e", "d", "c", "b", "a"]})
    tables = [table.slice(0, 2), table.slice(2)]  # two Parquet files' worth
    shape = (2, 2, 1)
    parts = [shard_arrays(tables, shape, rank=r, world=2, batch_size=2) for r in (0, 1)]
    assert np.array_equal(parts[0][0], images[[0, 2]]) and np.array_equal(parts[1][0], images[[1, 3]])
    assert list(parts[0][1]) == [0, 0] and list(parts[1][1]) == [1, 1]
    parts = [shard_arrays(tables, shape, ordered=True, rank=r, world=2, batch_size=2) for r in (0, 1)]
    assert np.array_equal(parts[0][0], images[[4, 2, 0]]) and np.array_equal(parts[1][0], images[[3, 1]])
    whole, labels = shard_arrays(tables, shape, ordered=True)
    assert np.array_equal(whole, images[::-1]) and list(labels) == [1, 1, 0, 1, 0]  # sorted by source
    assert all(np.array_equal(a, b) for a, b in zip(shard_arrays(tables, shape), (images, [0, 1, 0, 1, 1])))


def epochs_run(audit_dir) -> int:
    """Epochs the worker trained, from its audit record (Ray's metrics_dataframe holds only the
    reports that carried a checkpoint, i.e. the improving epochs)."""
    return len(json.loads((audit_dir / "rank0.json").read_text())["epoch_end_times"])


def checkpoint_dir(checkpoint) -> str:
    return checkpoint.path  # local storage: the persisted folder itself


# ---------------------------------------------------------------------------------------------------
# No cluster needed


def test_a_worker_count_below_one_is_refused(tmp_path):
    from msbt.train.runner import train_stage

    config = tiny_config(tmp_path, num_workers=0)
    with pytest.raises(ValueError, match="num_workers must be at least 1"):
        train_stage(config, 1, tmp_path / "no-store-needed")


def test_a_parent_is_needed_exactly_for_weights_parent(tmp_path):
    from msbt.train.runner import train_stage

    config = tiny_config(tmp_path)
    with pytest.raises(ValueError, match="parent checkpoint is needed"):
        train_stage(config, 2, tmp_path / "store")
    with pytest.raises(ValueError, match="parent checkpoint is needed"):
        train_stage(config, 1, tmp_path / "store", parent_checkpoint=tmp_path)
    with pytest.raises(ValueError, match="stage_number"):
        train_stage(config, 3, tmp_path / "store")


def test_only_a_stage_that_asks_gets_the_placement_group_cleaner():
    """Tune's trials ask (msbt.tune.search): Tune ends a trial while the search goes on."""
    from ray.train import ScalingConfig

    from msbt.train.runner import stage_trainer

    def callbacks(keep):
        trainer = stage_trainer(keep)(lambda: None, scaling_config=ScalingConfig(num_workers=1))
        return [type(c).__name__ for c in trainer._create_default_callbacks()]

    assert "PlacementGroupCleanerCallback" not in callbacks(False)
    assert "PlacementGroupCleanerCallback" in callbacks(True)
    # everything else Ray Train sets up is kept, in its order
    assert [c for c in callbacks(True) if c != "PlacementGroupCleanerCallback"] == callbacks(False)


def test_the_workers_niceness_goes_to_ray_trains_worker_runtime_env(tmp_path):
    from msbt.train.runner import WORKER_NICENESS_ENV, run_config

    for nice in (0, 15):
        ray_config = run_config(RunConfig(storage_path=str(tmp_path), worker_niceness=nice), 1, "val_loss")
        assert ray_config.worker_runtime_env["env_vars"] == {WORKER_NICENESS_ENV: str(nice)}


def test_score_order_follows_the_saver():
    from msbt.train.runner import score_order

    assert (score_order("val_loss"), score_order("val_auc"), score_order("loss")) == ("min", "max", "min")


def test_fit_keeps_pythons_sigint_handler_and_ray_still_calls_the_hook_it_shadows():
    """fit_interruptibly runs ``fit`` on the caller's thread and shadows the method through which Ray Train
    installs its own SIGINT handler there (which never puts Python's back). A trainer whose ``fit`` does
    what Ray 2.60's does on the main thread leaves Python's handler in place; and Ray's code still calls that
    method, so an upgrade that stops doing so fails here (tests/workflows/test_interrupts.py: the effect)."""
    import inspect
    import signal

    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from msbt.train.runner import fit_interruptibly

    assert "self._register_sigint_handler(controller)" in inspect.getsource(
        DataParallelTrainer._initialize_and_run_controller)

    class AsRayFits(DataParallelTrainer):
        def fit(self):
            self._register_sigint_handler(object())  # Ray's: installs its handler unless shadowed
            return "result"

    trainer = AsRayFits.__new__(AsRayFits)  # no __init__: nothing of Ray's is started
    before = signal.getsignal(signal.SIGINT)  # Python's, or what an in-process Tune search left
    try:
        assert fit_interruptibly(trainer) == "result"
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, before)


def test_time_limits_outside_the_unit_tier_use_a_thread_not_a_signal(request):
    """A stage's ``fit`` blocks the main thread inside ray.get, where pytest-timeout's SIGALRM handler fails a test
    only once ray.get returns (tests/conftest.py): every test outside tests/unit keeps its limit on a thread."""
    mine = request.node.get_closest_marker("timeout")
    assert mine.args == (None, "thread")  # no limit of its own: the configured one, on a thread
    for item in request.session.items:
        mark = item.get_closest_marker("timeout")
        if "tests/unit/" in item.nodeid:
            assert mark is None or "thread" not in mark.args, item.nodeid
        else:
            assert mark is not None and mark.args[1] == "thread", item.nodeid
            kept = [m.args[0] for m in item.iter_markers("timeout") if m.args and m is not mark]
            assert mark.args[0] == (kept[0] if kept else None), item.nodeid  # its own limit, kept


# ---------------------------------------------------------------------------------------------------
# Real Ray Train runs


@pytest.mark.ray
@pytest.mark.slow
def test_a_stage_gives_its_train_controller_msbts_poll_interval(stage1):
    from msbt.train.runner import TRAIN_POLL_S

    assert POLL_SEEN == [TRAIN_POLL_S]  # docs/training.md: 4 s less wind-down per stage than Ray's 2 s


@pytest.mark.ray
@pytest.mark.slow
def test_a_stages_worker_runs_at_the_runs_niceness_not_rays_15(stage1):
    """run.worker_niceness (default 0) reaches the Train worker through its runtime environment: Ray's own
    default for workers is +15 over the cluster, so the cluster's own value (this process's: the session's
    cluster is started from it) read inside the worker shows the setting took effect."""
    config, _ = stage1
    audit = json.loads((Path(config.run.storage_path).parent / "audit" / "rank0.json").read_text())
    assert config.run.worker_niceness == 0 and audit["niceness"] == os.nice(0)


@pytest.mark.ray
@pytest.mark.slow
def test_a_one_worker_stage_starts_no_split_coordinator_preemption_watcher_or_cleaner(stage1):
    """Each actor is a process of its own (about 1 s of start-up each, docs/training.md): one worker takes
    its training set unsplit, a private cluster (one node) has nothing a preemption watcher could see, a
    stage whose job ends with it needs no placement-group cleaner (msbt.train.runner.stage_trainer): its own
    placement group is removed by the time the stage returns, and a small store's rows reach the worker as
    Arrow tables, with no Ray Data actor."""
    assert "RayTrainWorker" in STARTED and "TrainController" in STARTED, STARTED  # the query sees this run
    assert "SplitCoordinator" not in STARTED and "DatasetManager" not in STARTED, STARTED
    assert "PlacementGroupCleaner" not in STARTED, STARTED
    assert not HELD, HELD
    if "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ:  # the user's setting is kept
        assert "PreemptionWatcher" not in STARTED, STARTED


@pytest.mark.ray
def test_by_default_only_a_stage_started_inside_a_ray_worker_keeps_the_cleaner(ray_local):
    """A stage started from an actor or task (a Tune trial, a user's own actor) may end while its job goes on;
    a driver's stage ends with its job (msbt.train.runner.needs_cleaner)."""
    import ray

    from msbt.train.runner import needs_cleaner

    assert needs_cleaner(None) is False  # this process is the session cluster's driver
    assert ray.get(ray.remote(num_cpus=0)(needs_cleaner).remote(None)) is True
    assert ray.get(ray.remote(num_cpus=0)(needs_cleaner).remote(False)) is False  # asked for explicitly


@pytest.mark.ray
@pytest.mark.slow
def test_stage1_reports_every_epoch_and_checkpoints_in_the_msbt_format(stage1, stores):
    from msbt.train.runner import best_checkpoint, store_classes

    config, result = stage1
    assert result.error is None
    assert epochs_run(Path(config.run.storage_path).parent / "audit") == 2
    history = result.metrics_dataframe  # the epochs that improved val_loss: epoch 1 always does
    assert list(history["epoch"])[0] == 1 and set(history["epoch"]) <= {1, 2}
    assert {f"val_{m}" for m in STABLE} | STABLE <= set(history.columns)
    best = best_checkpoint(result, "val_loss")
    assert best is not None and best.path.startswith(config.run.storage_path)
    assert "/t/stage1/" in best.path
    manifest = read_manifest(checkpoint_dir(best))
    assert manifest["stage"] == 1 and manifest["parent"] is None and verify(checkpoint_dir(best))
    assert {f"val_{m}" for m in STABLE} | STABLE <= set(manifest["metrics"])
    assert manifest["class_names"] == store_classes(stores[0]) == sorted(synth.CELL_LINES)
    # the kept checkpoint is the best epoch's: its val_loss is the lowest reported
    assert manifest["metrics"]["val_loss"] == pytest.approx(min(history["val_loss"]))
    assert manifest["best_epoch"] == 1 + int(history["val_loss"].idxmin())
    # the manifest's history holds every epoch up to the best one, improving or not
    assert len(manifest["history"]["val_loss"]) == manifest["best_epoch"]
    assert manifest["history"]["val_loss"][-1] == pytest.approx(manifest["metrics"]["val_loss"])
    assert manifest["data_fingerprint"] and manifest["split_id"]


# Stage 2 from stage 1 with one worker, and its lineage: tests/workflows/test_workflows.py (the stage-2 step).
# Resuming after a checkpoint with one worker, epochs counted: tests/integration/test_resume.py (a killed worker
# restarts from its last checkpoint through the same fit_stage(resume_from=...)); with two workers and
# an explicit resume_from: tests/integration/test_distributed.py.


@pytest.mark.ray
@pytest.mark.slow
def test_deterministic_runs_give_identical_models(stage1, stores, tmp_path):
    """run.deterministic: a run of 2 epochs (the stage-1 fixture's), and a run of 1 epoch resumed to 2 from
    its checkpoint (the training state travels in it: optimizer, seed generators), end with the same
    weights, bit for bit, and the same metrics every epoch."""
    import dataclasses

    from msbt.model.checkpoint import load_checkpoint
    from msbt.train.distributed import weights_digest
    from msbt.train.runner import best_checkpoint, history_path, train_stage

    def outcome(config, best, resume=None):
        kept = checkpoint_dir(best) if best is not None else resume  # no later epoch improved on it
        model, _ = load_checkpoint(kept)
        history = json.loads(history_path(config.run, 1).read_text())["history"]
        return kept, weights_digest(model), history

    def run(name, epochs, resume=None):
        config = tiny_config(tmp_path / name, deterministic=True)
        config = dataclasses.replace(config, stage1=dataclasses.replace(config.stage1, epochs=epochs))
        best = best_checkpoint(train_stage(config, 1, stores[0], resume_from=resume), config.stage1.monitor)
        return outcome(config, best, resume)

    config, result = stage1
    assert config.run.deterministic and config.stage1.epochs == 2
    _, whole, whole_history = outcome(config, best_checkpoint(result, config.stage1.monitor))
    first, _, _ = run("b", 1)
    _, resumed, resumed_history = run("c", 2, resume=first)
    assert len(whole_history["loss"]) == 2
    assert resumed == whole
    assert resumed_history == whole_history  # every logged metric of every epoch, exactly
