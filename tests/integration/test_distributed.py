"""Data parallelism across Ray Train workers (msbt.train.distributed) on a real local 2-CPU cluster.

Two workers of 0.5 CPU each (data is materialised on the driver first, so no read task waits for a CPU),
tiny synthetic stores, the tiny_cnn backbone at 32 px. Each rank writes an audit of
what it fed and its weight digests; the tests compare the ranks.
"""

import json

import pytest

from helpers import TINY_BACKBONE
from msbt.data import synth
from msbt.model.checkpoint import MODEL_FILE, lineage, read_manifest, verify
from msbt.config import Config, HeadConfig, PreprocessConfig, RunConfig, StageConfig
from msbt.data.discovery import discover
from msbt.data.preprocess import build_microscope_store, build_ultrasound_store, split_items
from msbt.data.splits import make_split, save_split

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]
STABLE = {"loss", "accuracy", "auc", "sensitivity", "specificity"}
BATCH = 8  # global; 4 per worker


def small(**kw) -> StageConfig:
    base = dict(**TINY_BACKBONE, image_size=32, batch_size=BATCH, epochs=2)
    return StageConfig(**{**base, **kw})


def lite0(**kw) -> StageConfig:
    return small(backbone="efficientnet_lite0", **kw)


def two_worker_config(tmp_path) -> Config:
    return Config(
        stage1=small(head=HeadConfig(dense_units=(8,), dropout=0.2, l2=1e-4)),  # dropout + L2 under the strategy
        # head-only epoch, then fine-tuning: two phases, two compiled optimizers, each averaging the weights (ema)
        stage2=small(weights="parent", monitor="val_auc", head_epochs=1, ema=0.9),
        run=RunConfig(name="d", storage_path=str(tmp_path / "ray"), num_workers=2, cpus_per_worker=0.5),
    )


def store(root, out, build, cfg):
    d = discover(root)
    save_split(make_split(d, seed=0), out / "split")
    return build(split_items(out / "split", d.root, d.classes, seed=0), out / "store", cfg).path


@pytest.fixture(scope="module")
def stores(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("dist")
    synth.generate(out / "synth", seed=5, fields_per_line=4, field_size=400, lesions_per_class=5,
                   frames_per_lesion=(1, 2), ultrasound_size=96)
    cfg = PreprocessConfig(max_patches_per_field=4, image_size=64)
    micro = store(out / "synth" / "microscope", out / "micro", build_microscope_store, cfg)
    ultra = store(out / "synth" / "ultrasound", out / "ultra", build_ultrasound_store, cfg)
    return micro, ultra


@pytest.fixture(scope="module")
def stage1(stores, tmp_path_factory):
    """Stage 1 on two workers, its store read as a large one's is: Ray Data's parallel read, the training set
    split between the workers by Ray Data (DataConfig). The later stages of this file take the small-store
    path (Arrow tables through the object store, each worker dealing itself its rows)."""
    from msbt.train import runner

    tmp = tmp_path_factory.mktemp("run")
    config = two_worker_config(tmp)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "DRIVER_READ_BYTES", 0)
        result = runner.train_stage(config, 1, stores[0], audit_dir=tmp / "audit1")
    audits = [json.loads((tmp / "audit1" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return config, result, audits


# ---------------------------------------------------------------------------------------------------
# No cluster needed


def test_mixed_precision_policy_keeps_the_classifier_and_variables_float32(tmp_path):
    """On CPU only the policy and dtypes are checked; a mixed-precision training run needs a GPU."""
    import keras

    from msbt.train.distributed import set_mixed_precision
    from msbt.model.models import build_model, load_model
    from msbt.model.compiled import compile_model

    try:
        set_mixed_precision(True)
        model = build_model(lite0(), 4)
        compile_model(model, lite0())
        backbone_convs = [layer for layer in model.get_layer("backbone").layers if "conv" in layer.name.lower()]
        assert backbone_convs and all(layer.compute_dtype == "float16" for layer in backbone_convs)
        assert model.get_layer("predictions").compute_dtype == "float32"
        assert {w.dtype for w in model.weights} == {"float32"}  # variables stay float32
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert model.predict(keras.ops.zeros((1, 32, 32, 3)), verbose=0).dtype == "float32"
        model.save(tmp_path / "mixed.keras")
    finally:
        set_mixed_precision(False)
    # a mixed-precision checkpoint loads and predicts in a float32 process (e.g. evaluation on CPU)
    reloaded = load_model(tmp_path / "mixed.keras")
    assert reloaded.get_layer("predictions").compute_dtype == "float32"
    assert reloaded.predict(keras.ops.zeros((1, 32, 32, 3)), verbose=0).shape == (1, 4)
    assert build_model(lite0(), 4).get_layer("backbone").layers[-1].compute_dtype == "float32"


def test_one_non_finite_gradient_makes_every_gradient_non_finite():
    """The loss-scaled step's agreement: a skipped step must be skipped by every worker (here one replica)."""
    import numpy as np
    import tensorflow as tf

    from msbt.train.distributed import _Loop

    ctx = tf.distribute.get_replica_context()  # the default strategy's: all_reduce over one replica
    finite = [tf.constant([1.0, 2.0]), None, tf.constant([[3.0]])]
    kept = _Loop._agree_on_finite(ctx, finite)
    assert kept[1] is None and np.array_equal(kept[0], [1.0, 2.0]) and np.array_equal(kept[2], [[3.0]])
    poisoned = _Loop._agree_on_finite(ctx, [tf.constant([1.0, np.inf]), tf.constant([[3.0]])])
    assert all(np.isnan(g.numpy()).all() for g in poisoned)


def test_mixed_precision_is_a_run_setting():
    from msbt.config import load_config

    assert RunConfig().mixed_precision is False
    assert load_config(overrides=["run.mixed_precision=true"]).run.mixed_precision is True


# ---------------------------------------------------------------------------------------------------
# Real Ray Train runs with two workers


@pytest.mark.ray
@pytest.mark.slow
def test_two_workers_end_with_identical_weights_from_different_data(stage1, stores):
    from msbt.train.runner import split_dataset

    config, result, (rank0, rank1) = stage1
    assert result.error is None
    # (Ray's metrics_dataframe holds only the epochs that kept a checkpoint; the audit has every epoch.)
    assert len(rank0["epoch_end_times"]) == len(rank1["epoch_end_times"]) == 2
    assert {f"val_{m}" for m in STABLE} | STABLE <= set(result.metrics_dataframe.columns)
    assert (rank0["rank"], rank1["rank"], rank0["world_size"]) == (0, 1, 2)
    # same start (same seed), same end, and training moved the weights
    assert rank0["initial_weights"] == rank1["initial_weights"]
    assert rank0["final_weights"] == rank1["final_weights"]
    assert rank0["final_weights"] != rank0["initial_weights"]
    # the ranks fed different images and labels ...
    assert rank0["labels_sha256"] != rank1["labels_sha256"]
    assert rank0["pixel_sum"] != rank1["pixel_sum"]
    # ... half of the training set each: 2 epochs x 3 copies (augmentation) x its half of the rows
    rows = split_dataset(stores[0], "train").count()
    assert rank0["examples"] == rank1["examples"] == 2 * 3 * (rows // 2)
    # the global batch of 8 was split 4 + 4, and every step of both ranks ran in lockstep
    assert (rank0["local_batch"], rank0["global_batch"]) == (BATCH // 2, BATCH)
    assert rank0["max_step_rows"] == BATCH
    assert rank0["steps_per_epoch"] == rank1["steps_per_epoch"] == [-(-3 * (rows // 2) // (BATCH // 2))] * 2


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_checkpoints_match_the_one_worker_format(stage1, stores):
    from msbt.train.distributed import weights_digest
    from msbt.model.models import load_model
    from msbt.train.runner import best_checkpoint, store_classes

    config, result, (rank0, _) = stage1
    reported = result.metrics_dataframe  # the checkpointed epochs (rank 0's reports)
    best = best_checkpoint(result, "val_loss")
    assert "/d/stage1/" in best.path
    manifest = read_manifest(best.path)
    assert manifest["stage"] == 1 and manifest["parent"] is None and verify(best.path)
    assert {f"val_{m}" for m in STABLE} | STABLE <= set(manifest["metrics"])
    assert manifest["class_names"] == store_classes(stores[0])
    assert manifest["metrics"]["val_loss"] == pytest.approx(reported["val_loss"].min())
    assert manifest["best_epoch"] == reported["epoch"][reported["val_loss"].idxmin()]
    history = manifest["history"]
    assert {f"val_{m}" for m in STABLE} | STABLE <= set(history)
    assert all(len(values) == manifest["best_epoch"] for values in history.values())
    assert manifest["metrics"]["val_loss"] == pytest.approx(min(history["val_loss"]))
    assert manifest["config"]["batch_size"] == BATCH  # the global batch is what the stage trained with
    if manifest["best_epoch"] == 2:  # the last epoch's model is the final weights of every rank
        assert weights_digest(load_model(f"{best.path}/{MODEL_FILE}")) == rank0["final_weights"]


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_stage2_starts_from_stage1_and_links_back(stage1, stores, tmp_path):
    from msbt.train.runner import best_checkpoint, split_tables, train_stage

    config, first, _ = stage1
    parent = best_checkpoint(first, config.stage1.monitor)
    result = train_stage(config, 2, stores[1], parent_checkpoint=parent, audit_dir=tmp_path)
    assert result.error is None
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["epoch_end_times"]) for r in ranks] == [2, 2]  # head-only phase, then fine-tuning
    assert ranks[0]["final_weights"] == ranks[1]["final_weights"] != ranks[0]["initial_weights"]
    # the small store's rows, dealt by the workers themselves: different images, half of the rows each
    # (2 epochs x 3 copies, augmentation), as Ray Data's equal split gives them to stage 1 above
    rows = sum(len(t) for t in split_tables(stores[1], "train"))
    assert ranks[0]["pixel_sum"] != ranks[1]["pixel_sum"]
    assert ranks[0]["examples"] == ranks[1]["examples"] == 2 * 3 * (rows // 2)
    child = best_checkpoint(result, config.stage2.monitor)
    manifest = read_manifest(child.path)
    assert manifest["stage"] == 2 and manifest["class_names"] == ["benign", "malignant"]
    chain = lineage(child.path)
    assert [entry["manifest"]["stage"] for entry in chain] == [2, 1]
    assert chain[0]["link_ok"] is True and all(entry["verified"] for entry in chain)
    assert chain[1]["path"] == str(parent.path)
    if manifest["best_epoch"] == 2:  # the saved model is the average, which every rank ends with (stage2.ema)
        from msbt.model.models import load_model
        from msbt.train.distributed import weights_digest
        assert weights_digest(load_model(f"{child.path}/{MODEL_FILE}")) == ranks[0]["final_weights"]


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_resume_continues_after_the_checkpoint_epoch(stage1, stores, tmp_path):
    import dataclasses

    from msbt.train.distributed import weights_digest
    from msbt.model.models import load_model
    from msbt.train.runner import best_checkpoint, train_stage

    config, first, _ = stage1
    start = best_checkpoint(first, "val_loss")
    done = read_manifest(start.path)["best_epoch"]
    longer = dataclasses.replace(config, stage1=dataclasses.replace(config.stage1, epochs=done + 1),
                                 run=dataclasses.replace(config.run, storage_path=str(tmp_path / "ray")))
    result = train_stage(longer, 1, stores[0], resume_from=start, audit_dir=tmp_path / "audit")
    assert result.error is None
    ranks = [json.loads((tmp_path / "audit" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["epoch_end_times"]) for r in ranks] == [1, 1]  # only the epoch after the checkpoint
    # both ranks resumed from the checkpoint's model
    resumed = weights_digest(load_model(f"{start.path}/{MODEL_FILE}"))
    assert ranks[0]["initial_weights"] == ranks[1]["initial_weights"] == resumed
    assert ranks[0]["final_weights"] == ranks[1]["final_weights"] != ranks[0]["initial_weights"]
    if result.checkpoint is not None:  # reported only if that epoch beat the resumed best
        manifest = read_manifest(result.checkpoint.path)
        assert manifest["best_epoch"] == done + 1 and len(manifest["history"]["val_loss"]) == done + 1
