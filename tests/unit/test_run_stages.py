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
