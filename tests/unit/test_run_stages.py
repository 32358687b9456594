"""Which stages a run trains (msbt.runfolder.run_stages) and what a stage 2 without a stage 1 is keyed by."""

import json

from msbt.config import load_config
from msbt.runfolder import run_modalities, run_stages
from msbt.tune.fast import cache_key


def test_stage1_is_trained_only_when_stage2_starts_from_it():
    assert run_stages(load_config()) == (1, 2) and run_modalities(load_config()) == ("microscope", "ultrasound")
    for weights in ("imagenet", "none", "/models/resnet50_notop.h5"):
        config = load_config(overrides=[f"stage2.weights={weights}"])
        assert run_stages(config) == (2,) and run_modalities(config) == ("ultrasound",)


def test_fast_mode_features_without_a_parent_are_keyed_by_the_weights_source(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "store.json").write_text(json.dumps({"kind": "ultrasound", "items": "abc", "image_shape": [8, 8, 3]}))
    weights = tmp_path / "backbone.weights.h5"
    weights.write_bytes(b"one")

    def key(source):
        return cache_key(None, store, load_config(overrides=[f"stage2.weights={source}"]).stage2, 3, 0)

    keys = {key("imagenet"), key("none"), key(weights)}
    assert len(keys) == 3
    before = key(weights)
    weights.write_bytes(b"two")  # the same path with other weights: other features
    assert key(weights) != before


def test_stage2_seeds_are_run_folders_of_their_own_and_a_rerun_checks_each(tmp_path):
    import pytest

    from msbt.config import ConfigError, stage2_seed_list
    from msbt.jobs.pipeline import check_rerun, run_model
    from msbt.runfolder import ensemble_checkpoint, run_dir, seed_runs
    from msbt.train.stages import RunStateError

    base = [f"run.storage_path={tmp_path}", "run.name=r"]
    assert seed_runs(load_config(overrides=base)) == []  # one seed: stage2/ only, no average
    config = load_config(overrides=[*base, "run.stage2_seeds=3", "run.train_seed=5"])
    assert stage2_seed_list(config) == [5, 6, 7]
    runs = seed_runs(config)
    assert [seed for seed, _ in runs] == [6, 7]
    for seed, seeded in runs:
        assert run_dir(seeded) == tmp_path / "r" / "seeds" / f"seed{seed}" and seeded.run.train_seed == seed
        assert seeded.stage2 == config.stage2 and seeded.data == config.data  # only where and which seed differ
    assert ensemble_checkpoint(config) == tmp_path / "r" / "ensemble" / "checkpoint"
    with pytest.raises(RunStateError, match="no average of its 3 stage-2 seeds"):
        run_model(config)
    # a plain rerun is refused when any seed's folder holds a stage 2, not only the run's own stage2/
    check_rerun(config, [2])
    (tmp_path / "r" / "seeds" / "seed7").mkdir(parents=True)
    (tmp_path / "r" / "seeds" / "seed7" / "stages.json").write_text(json.dumps({"2": {"checkpoint": "x"}}))
    with pytest.raises(RunStateError, match=r"stage 2 of run .r. \(training seed 7\).*seeds/seed7"):
        check_rerun(config, [2])
    check_rerun(config, [1])  # stage 1 alone is not concerned
    with pytest.raises(ConfigError, match="run.stage2_seeds"):
        load_config(overrides=["run.stage2_seeds=0"])


def test_an_experiment_arm_is_reused_only_for_the_same_seed_settings_and_split(tmp_path):
    """An experiment rerun with other stage-2 settings or another --scope reused its old folds as they were (a
    tester's crossval after `--scope all` said "test split untouched" of folds trained on the test split)."""
    import dataclasses

    from helpers import tiny_ultrasound_run
    from msbt.config import to_dict, training_seed
    from msbt.data.store import Store, read_store, write_resplit
    from msbt.jobs.experiments import _not_this_arm

    config, store = tiny_ultrasound_run(tmp_path)
    fingerprint, split_id = Store.open(store).fingerprint()
    manifest = {"seed": training_seed(config), "data_fingerprint": fingerprint, "split_id": split_id}
    result = {"arm_config": {"stage2": json.loads(json.dumps(to_dict(config.stage2)))}}
    assert _not_this_arm(result, manifest, config, store) is None
    faster = dataclasses.replace(config, stage2=dataclasses.replace(config.stage2, learning_rate=0.01))
    assert "other stage-2 settings (stage2.learning_rate)" in _not_this_arm(result, manifest, faster, store)
    rows = read_store(store, columns=["source"])
    other = write_resplit(store, {s: "train" for s in rows["source"]}, tmp_path / "fold")  # another scope
    assert "other images or another split" in _not_this_arm(result, manifest, config, other)
    assert "seed" in _not_this_arm(result, {**manifest, "seed": 99}, config, store)
    # a stage 1 trained again since: the arm's result descends from the old one (it was reused as it was)
    parent = tmp_path / "stage1"
    parent.mkdir()
    (parent / "model.keras").write_bytes(b"the stage 1 of today")
    old = {**manifest, "parent": {"path": "/runs/r/stage1/old", "model_sha256": "0" * 64}}
    assert "descends from another stage 1 (/runs/r/stage1/old" in _not_this_arm(result, old, config, store, parent)
    from msbt.model.checkpoint import sha256_file
    same = {**manifest, "parent": {"path": str(parent), "model_sha256": sha256_file(parent / "model.keras")}}
    assert _not_this_arm(result, same, config, store, parent) is None
    # an ImageNet arm's checkpoint written before 2026-12-03 says stage 1: still this arm's (not retrained)
    imagenet = dataclasses.replace(config, stage2=dataclasses.replace(config.stage2, weights="imagenet"))
    before = {"arm_config": {"stage2": json.loads(json.dumps(to_dict(imagenet.stage2)))}}
    assert _not_this_arm(before, {**manifest, "stage": 1}, imagenet, store) is None
    assert "records stage 1, not 2" in _not_this_arm(result, {**same, "stage": 1}, config, store, parent)
