"""Stage reuse (msbt.train.stages): the key of a stage's inputs, the index of finished stages, the one
stage-1 lookup, the worker's LoopConfig, and the jobs layer's rerun check.

Everything here but the last test runs without Ray: checkpoints are written by ``write_manifest`` beside
a few bytes standing in for a model (only their sha256 matters), stores are a ``store.json``.
The last test trains a tiny stage 1 with a real local Ray cluster in run A and shows that run B with
the same inputs reuses it without training.
"""

import dataclasses
import functools
import json
import logging
import pickle

import pytest

from msbt.runfolder import run_dir, stage_dir
from msbt.config import Config, RunConfig, StageConfig, load_config
from msbt.model.checkpoint import MODEL_FILE, read_manifest, write_manifest
from msbt.train import stages as S


def fake_store(folder, items="abc"):
    """A folder whose store.json gives the store an identity (all store_identity reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "store.json").write_text(json.dumps({"kind": "microscope", "items": items, "image_shape": [8, 8, 3]}))
    return folder


def config_for(tmp_path, name="a", *overrides):
    return load_config(overrides=[f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}", *overrides])


def fake_checkpoint(folder, stage: StageConfig, store, *, parent=None, model=b"weights", epoch=2, number=None):
    """A checkpoint folder of ``stage`` trained on ``store`` (the model's bytes stand in for a model)."""
    from msbt.train.runner import store_identity

    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_bytes(model)
    fingerprint, split_id = store_identity(store)
    write_manifest(folder, stage_config=stage, class_names=["a", "b"], metrics={stage.monitor: 0.25, "loss": 0.5},
                   best_epoch=epoch, history={"loss": [0.7, 0.5]}, parent=parent, data_fingerprint=fingerprint,
                   split_id=split_id, number=number)
    return folder


# ---------------------------------------------------------------------------------------------------
# The key


def test_the_key_changes_with_every_determining_input_and_not_with_the_run_name(tmp_path):
    store, other_store = fake_store(tmp_path / "s1"), fake_store(tmp_path / "s2", items="abd")
    base = config_for(tmp_path)
    key = S.stage_key(S.stage_inputs(base, 1, store))
    same = [config_for(tmp_path, "b"), config_for(tmp_path, "a", f"run.storage_path={tmp_path / 'elsewhere'}"),
            config_for(tmp_path, "a", "run.cpus_per_worker=2.0"), config_for(tmp_path, "a", "run.max_failures=3"),
            config_for(tmp_path, "a", "stage2.epochs=5"),  # stage 2's settings do not make stage 1
            config_for(tmp_path, "a", "run.train_seed=0")]  # the training seed, named: data.seed's value
    for config in same:
        assert S.stage_key(S.stage_inputs(config, 1, store)) == key
    changed = ["stage1.learning_rate=0.5", "stage1.epochs=2", "stage1.weights=none", "stage1.augment.enabled=false",
               "data.seed=1", "run.num_workers=2", "run.mixed_precision=true", "run.train_seed=2"]
    keys = {S.stage_key(S.stage_inputs(config_for(tmp_path, "a", item), 1, store)) for item in changed}
    assert len(keys) == len(changed) and key not in keys
    assert S.stage_key(S.stage_inputs(base, 1, other_store)) != key  # another store (another split)


def test_stage2_is_keyed_by_its_parents_model(tmp_path):
    store = fake_store(tmp_path / "s")
    config = config_for(tmp_path)
    one = fake_checkpoint(tmp_path / "p1", config.stage1, store, model=b"one")
    same = fake_checkpoint(tmp_path / "p1-copy", config.stage1, store, model=b"one")
    two = fake_checkpoint(tmp_path / "p2", config.stage1, store, model=b"two")
    key = S.stage_key(S.stage_inputs(config, 2, store, one))
    assert S.stage_key(S.stage_inputs(config, 2, store, same)) == key  # the model, not the folder
    assert S.stage_key(S.stage_inputs(config, 2, store, two)) != key
    assert S.stage_inputs(config, 1, store)["parent"] == "imagenet"


# ---------------------------------------------------------------------------------------------------
# The index


def test_the_index_returns_a_remembered_stage_and_ignores_stale_or_altered_entries(tmp_path, caplog):
    store = fake_store(tmp_path / "s")
    config = config_for(tmp_path)
    root, inputs = S.index_root(config), S.stage_inputs(config, 1, store)
    checkpoint = fake_checkpoint(tmp_path / "runs" / "a" / "stage1" / "checkpoint_1", config.stage1, store)
    assert S.find_identical(root, inputs) is None  # nothing remembered yet
    S.remember_stage(root, inputs, checkpoint, run_dir(config))
    entry = S.find_identical(root, inputs)
    assert entry["checkpoint"] == str(checkpoint.resolve()) and entry["run"] == str(run_dir(config))
    other = S.stage_inputs(config_for(tmp_path, "a", "data.seed=7"), 1, store)
    assert S.find_identical(root, other) is None  # other inputs, other key

    model = checkpoint / MODEL_FILE
    model.write_bytes(b"changed after training")  # sha256 no longer matches its manifest
    assert S.find_identical(root, inputs) is None
    fake_checkpoint(checkpoint, config.stage1, store, model=b"a newer model")  # intact, but not the one recorded
    assert S.find_identical(root, inputs) is None
    fake_checkpoint(checkpoint, config.stage1, store)  # the recorded model again
    assert S.find_identical(root, inputs) is not None

    index = root / S.INDEX_FILE
    data = json.loads(index.read_text())
    (key,) = data["stages"]
    data["stages"][key]["inputs"]["seed"] = 99  # an entry edited by hand no longer matches its key
    index.write_text(json.dumps(data))
    assert S.find_identical(root, inputs) is None
    S.remember_stage(root, inputs, checkpoint, run_dir(config))  # the latest entry of a key wins
    assert S.find_identical(root, inputs) is not None
    wrong = fake_checkpoint(tmp_path / "other", dataclasses.replace(config.stage1, learning_rate=0.5), store)
    S.remember_stage(root, inputs, wrong, "elsewhere")  # points at a checkpoint of other settings
    assert S.find_identical(root, inputs) is None
    S.remember_stage(root, inputs, checkpoint, run_dir(config))
    import shutil

    shutil.rmtree(checkpoint)  # gone (an experiment's --fresh deletes its arms' checkpoints): said at INFO only
    caplog.clear()  # the altered entries above were warned about, rightly
    with caplog.at_level(logging.INFO, logger=S.__name__):
        assert S.find_identical(root, inputs) is None
    assert "is gone; the stage trains again" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    index.write_text("{not json")  # an unreadable index is ignored, not trusted and not fatal
    assert S.read_index(root) == {} and S.find_identical(root, inputs) is None


def test_a_stage2_without_a_parent_recorded_as_stage1_is_not_reused(tmp_path):
    """Before 2026-12-03 a stage 2 from ImageNet (no parent) was written as stage 1; reusing it would put a
    'stage 1' checkpoint in stages.json as stage 2. Such entries are skipped (trained once more)."""
    store = fake_store(tmp_path / "s")
    config = config_for(tmp_path, "a", "stage2.weights=imagenet")
    root, inputs = S.index_root(config), S.stage_inputs(config, 2, store)
    old = fake_checkpoint(tmp_path / "old", config.stage2, store)  # no number: counted as stage 1
    S.remember_stage(root, inputs, old, run_dir(config))
    assert S.find_identical(root, inputs) is None
    new = fake_checkpoint(tmp_path / "new", config.stage2, store, number=2)
    S.remember_stage(root, inputs, new, run_dir(config))
    assert S.find_identical(root, inputs)["checkpoint"] == str(new.resolve())


def test_run_stage_reuses_an_identical_stage_of_another_run_without_ray(tmp_path, capsys):
    """Run B's stage 1 has run A's inputs: recorded as reused, nothing trained, nothing in B's stage folder."""
    store = fake_store(tmp_path / "s")
    a, b = config_for(tmp_path, "a"), config_for(tmp_path, "b")
    checkpoint = fake_checkpoint(stage_dir(a, 1) / "checkpoint_1", a.stage1, store)
    S.remember_stage(S.index_root(a), S.stage_inputs(a, 1, store), checkpoint, run_dir(a))
    entry = S.run_stage(b, 1, store)  # no Ray here: training would fail, reuse needs none
    assert entry["reused"] and entry["checkpoint"] == str(checkpoint.resolve()) and entry["seconds"] == 0.0
    recorded = S.read_stages(b)["1"]
    assert recorded["reused_from"] == str(run_dir(a)) and recorded["value"] == 0.25
    assert not stage_dir(b, 1).exists()
    assert "stage 1: identical stage found in run a" in capsys.readouterr().out
    # B now holds a finished stage 1: a plain rerun is refused, --resume takes the record
    with pytest.raises(S.RunStateError, match=r"stage 1 of run 'b' is already finished"):
        S.refuse_rerun(b, [1])
    assert S.run_stage(b, 1, store, resume=True)["checkpoint"] == recorded["checkpoint"]
    assert "finished before, reused (--resume)" in capsys.readouterr().out


def test_reusable_stage1_takes_the_runs_records_first_then_the_index(tmp_path):
    store = fake_store(tmp_path / "s")
    a, b = config_for(tmp_path, "a"), config_for(tmp_path, "b")
    assert S.reusable_stage1(b, store) is None
    in_a = fake_checkpoint(stage_dir(a, 1) / "checkpoint_1", a.stage1, store, model=b"a")
    S.remember_stage(S.index_root(a), S.stage_inputs(a, 1, store), in_a, run_dir(a))
    found = S.reusable_stage1(b, store)
    assert found.checkpoint == in_a.resolve() and found.run == str(run_dir(a))
    off = config_for(tmp_path, "b", "run.reuse_stages=false")
    assert S.reusable_stage1(off, store) is None  # the opt-out
    assert S.reusable_stage1(b, fake_store(tmp_path / "s2", items="xyz")) is None  # another store
    in_b = fake_checkpoint(stage_dir(b, 1) / "checkpoint_1", b.stage1, store, model=b"b")
    run_dir(b).joinpath("tune").mkdir(parents=True)
    (run_dir(b) / "tune" / "stage1.json").write_text(json.dumps({"stage1": {"checkpoint": str(in_b)}}))
    found = S.reusable_stage1(b, store)
    assert found.checkpoint == in_b and found.run is None and found.record.name == "stage1.json"
    other = config_for(tmp_path, "b", "stage1.learning_rate=0.5")
    assert S.usable_stage1(in_b, other) is None  # another stage-1 config is not reused


# ---------------------------------------------------------------------------------------------------
# The worker's config, and the jobs layer's one rerun check


def test_loop_config_is_frozen_and_pickles(tmp_path):
    from ray import cloudpickle

    from msbt.train.runner import LoopConfig, loop_config, train_loop_per_worker

    store = fake_store(tmp_path / "s")
    config = Config(stage1=StageConfig(epochs=2), run=RunConfig(storage_path=str(tmp_path), name="r"))
    parent = fake_checkpoint(tmp_path / "p", config.stage1, store)
    made = loop_config(config, 2, store, parent, class_names=["a", "b"], audit_dir=tmp_path / "audit")
    assert isinstance(made, LoopConfig) and made.parent == str(parent.resolve()) and made.resume is None
    assert made.image_shape == (8, 8, 3) and made.class_names == ("a", "b") and made.stage == config.stage2
    values = [getattr(made, f.name) for f in dataclasses.fields(made)]
    assert all(isinstance(v, (str, int, bool, tuple, StageConfig, type(None))) for v in values)  # plain fields
    assert pickle.loads(pickle.dumps(made)) == made
    bound = cloudpickle.loads(cloudpickle.dumps(functools.partial(train_loop_per_worker, made)))
    assert bound.args == (made,)  # what Ray ships to every worker
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.seed = 3


def test_the_jobs_refuse_a_rerun_before_ray_starts(tmp_path):
    import ray

    from msbt.jobs import pipeline

    store = fake_store(tmp_path / "s")
    config = config_for(tmp_path, "r")
    checkpoint = fake_checkpoint(stage_dir(config, 2) / "checkpoint_1", config.stage2, store)
    S.record_stage(config, 2, {"checkpoint": str(checkpoint)})
    was_up = ray.is_initialized()
    with pytest.raises(S.RunStateError, match=r"stage 2 of run 'r' is already finished .*--resume.*run\.name"):
        pipeline.stage2_job(config, address="local")
    with pytest.raises(S.RunStateError, match=r"stage 2 of run 'r' is already finished"):
        pipeline.main_job(config, address="local")
    assert ray.is_initialized() == was_up  # refused before any cluster was joined or started
    pipeline.check_rerun(config, [2], resume=True)  # --resume lets it through


# ---------------------------------------------------------------------------------------------------
# The real thing: run B trains nothing


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_new_run_reuses_an_identical_stage1_without_training(tmp_path, ray_local, capsys):
    from msbt.config import PreprocessConfig
    from msbt.data import synth
    from msbt.data.discovery import discover
    from msbt.data.preprocess import build_microscope_store, split_items
    from msbt.data.splits import make_split, save_split
    from msbt.model.checkpoint import verify

    synth.generate(tmp_path / "synth", seed=3, fields_per_line=4, field_size=400, lesions_per_class=4,
                   frames_per_lesion=(1, 1), ultrasound_size=64)
    found = discover(tmp_path / "synth" / "microscope")
    save_split(make_split(found, seed=0), tmp_path / "split")
    store = build_microscope_store(split_items(tmp_path / "split", found.root, found.classes, seed=0),
                                   tmp_path / "store", PreprocessConfig(max_patches_per_field=3, image_size=32)).path
    tiny = ["stage1.backbone=tiny_cnn", "stage1.weights=none", "stage1.image_size=32",
            "stage1.batch_size=8", "stage1.epochs=1"]
    a, b = config_for(tmp_path, "a", *tiny), config_for(tmp_path, "b", *tiny)

    trained = S.run_stage(a, 1, store)
    assert not trained["reused"] and verify(trained["checkpoint"])
    assert "stage 1: best" in capsys.readouterr().out

    reused = S.run_stage(b, 1, store)
    assert reused["reused"] and reused["checkpoint"] == trained["checkpoint"]
    assert S.read_stages(b)["1"]["reused_from"] == str(run_dir(a))
    assert not stage_dir(b, 1).exists()  # no Ray run, no new checkpoint folder
    assert not (run_dir(b) / "tensorboard").exists()  # no worker ran
    assert "stage 1: identical stage found in run a" in capsys.readouterr().out
    assert read_manifest(reused["checkpoint"]) == read_manifest(trained["checkpoint"])  # the same model

    off = config_for(tmp_path, "c", *tiny, "run.reuse_stages=false")
    assert S.reusable_stage1(off, store) is None  # the opt-out trains (not run here: it is Ray's own path)
