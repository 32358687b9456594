"""stage.balance: loss weights per (site, class) cell, and that they reach the loss in both training loops."""

import numpy as np
import pytest

from helpers import TINY_BACKBONE
from msbt.config import AugmentConfig, ConfigError, HeadConfig, StageConfig, load_config, to_dict
from msbt.data.balance import cell_weights, describe, row_weights

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_every_cell_weighs_the_same_and_the_weights_average_one():
    sites = ["busi"] * 6 + ["breast"] * 4   # busi: 4 benign, 2 malignant; breast: 1 benign, 3 malignant
    labels = [0, 0, 0, 0, 1, 1, 0, 1, 1, 1]
    cells = cell_weights(labels, sites, "site_class")
    assert cells == pytest.approx({("breast", 0): 2.5, ("breast", 1): 10 / 12, ("busi", 0): 10 / 16,
                                   ("busi", 1): 1.25})
    w = row_weights(labels, sites, cells)
    assert w.dtype == np.float32 and w.mean() == pytest.approx(1.0)
    totals = {key: w[[(s, y) == key for s, y in zip(sites, labels)]].sum() for key in cells}
    assert list(totals.values()) == pytest.approx([2.5] * 4)  # each of the four cells: rows / cells
    # class: the sites are ignored; both classes weigh half
    by_class = cell_weights(labels, sites, "class")
    assert by_class == pytest.approx({("", 0): 1.0, ("", 1): 1.0})  # 5 and 5 already
    w = row_weights([0, 0, 0, 1], None, cell_weights([0, 0, 0, 1], None, "class"))
    assert w.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0]) and w[:3].sum() == pytest.approx(w[3])
    # site_class without sites balances the classes, as the runner does for a store without a site column
    assert cell_weights([0, 0, 0, 1], None, "site_class") == cell_weights([0, 0, 0, 1], None, "class")
    assert cell_weights(labels, sites, "none") == {} and row_weights(labels, sites, {}).tolist() == [1.0] * 10
    assert describe(cells, ["benign", "malignant"]).startswith("breast/benign 2.500, breast/malignant 0.833")


def test_bad_balance_input_is_named():
    with pytest.raises(ValueError, match="balance must be one of none, class, site_class"):
        cell_weights([0, 1], None, "sites")
    with pytest.raises(ValueError, match="no training rows"):
        cell_weights([], None, "class")
    with pytest.raises(ValueError, match="2 labels but 1 sites"):
        cell_weights([0, 1], ["a"], "site_class")
    with pytest.raises(KeyError, match="no loss weight for site 'c', class 1"):
        row_weights([1], ["c"], cell_weights([0, 1], ["a", "b"], "site_class"))


def test_balance_is_a_stage_setting_left_out_of_records_while_off():
    config = load_config(overrides=["stage2.balance=site_class"])
    assert config.stage2.balance == "site_class" and to_dict(config.stage2)["balance"] == "site_class"
    assert "balance" not in to_dict(StageConfig())  # older manifests and stage-index keys still match
    with pytest.raises(ConfigError, match="balance"):
        load_config(overrides=["stage2.balance=sites"])


def stage(**kw) -> StageConfig:
    defaults = dict(**TINY_BACKBONE, image_size=32, batch_size=4, epochs=3, optimizer="adam", learning_rate=0.01,
                    head=HeadConfig((8,), 0.0), augment=AugmentConfig(enabled=False))
    return StageConfig(**{**defaults, **kw})


def test_the_weights_reach_keras_loss(tmp_path):
    """Weighted to one class only, the model moves towards that class: the weights are in the loss."""
    import keras

    from msbt.model.checkpoint import load_checkpoint
    from msbt.train import loop

    x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    y = np.arange(16) % 2
    mean_p = {}
    for name, weights in (("benign only", (y == 0) * 2.0), ("malignant only", (y == 1) * 2.0)):
        result = loop.fit_stage(stage(), loop.dataset_from_arrays(x, y, weights), loop.dataset_from_arrays(x, y),
                                class_names=["benign", "malignant"], out_dir=tmp_path / name.replace(" ", "-"))
        model, _ = load_checkpoint(result.checkpoint)
        mean_p[name] = float(np.mean(model.predict(keras.ops.convert_to_tensor(x.astype(np.float32)), verbose=0)))
    assert mean_p["benign only"] + 0.15 < mean_p["malignant only"], mean_p  # 0.31 and 0.58 here
    with pytest.raises(ValueError, match="weights must be 16 finite non-negative"):
        loop.dataset_from_arrays(x, y, -np.ones(16))


def test_the_weights_reach_the_multi_worker_step():
    """msbt.train.distributed's own step (one replica here): its loss is the weighted mean, as Keras's is."""
    import keras
    import tensorflow as tf

    from msbt.model.compiled import compile_model
    from msbt.model.models import build_model
    from msbt.train.distributed import _Loop

    keras.utils.set_random_seed(0)
    s = stage()
    model = build_model(s, 2)
    compile_model(model, s)
    x = tf.constant(np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3)).astype(np.float32))
    y = tf.constant((np.arange(8) % 2).astype(np.float32)[:, None])
    w = tf.constant([0.5, 2.0, 0.0, 1.0, 3.0, 0.5, 1.0, 0.0])
    per_row = keras.losses.BinaryCrossentropy(reduction=None)(y, model(x, training=True))
    expected = float(tf.reduce_sum(per_row * w) / 8)
    steps = _Loop(tf.distribute.get_strategy(), model, 2)
    steps.train_step(x, y, w)
    assert float(steps.train_metrics[0].result()) == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(float(tf.reduce_mean(per_row)), rel=1e-3)  # the weights changed it


def test_fast_mode_heads_take_the_weights_and_refuse_to_train_without_them():
    """Tune's fast mode: a head on cached features, weighted to one class only, moves towards that class; a
    balanced stage without weights in the features is refused rather than trained unweighted."""
    from msbt.tune.fast import fit_head

    rng = np.random.default_rng(0)
    y = np.arange(32) % 2
    features = {"train_x": rng.normal(size=(32, 1, 8)).astype(np.float32), "train_y": y,
                "val_x": rng.normal(size=(8, 8)).astype(np.float32), "val_y": np.arange(8) % 2}
    s = stage(balance="class", epochs=5, learning_rate=0.05)
    mean_p = {}
    for name, weights in (("benign only", (y == 0) * 2.0), ("malignant only", (y == 1) * 2.0)):
        head, _ = fit_head(s, {**features, "train_weight": weights.astype(np.float32)}, seed=0)
        mean_p[name] = float(np.mean(head.predict(features["val_x"], verbose=0)))
    assert mean_p["benign only"] + 0.2 < mean_p["malignant only"], mean_p
    with pytest.raises(ValueError, match="carry no train_weight"):
        fit_head(s, features)


def test_fast_mode_gives_each_cached_image_its_sites_weight():
    """The cache orders images by source; the store gives each source's site: the weights follow the image,
    whatever the order, and an image the store does not hold is named."""
    from msbt.data.balance import cell_weights
    from msbt.tune.fast import cache_weights

    store_sources = np.array(["b/3.png", "a/1.png", "b/4.png", "a/2.png", "a/5.png"])
    store_sites = np.array(["b", "a", "b", "a", "a"])
    store_labels = np.array([1, 0, 0, 1, 1])
    cells = cell_weights(store_labels, store_sites, "site_class")
    order = np.argsort(store_sources)  # as the cache holds them
    weights = cache_weights(store_sources[order], store_labels[order], store_sources, store_sites, cells)
    expected = [cells[(site, label)] for site, label in zip(store_sites[order], store_labels[order])]
    np.testing.assert_allclose(weights, expected)
    assert len(set(expected)) > 1  # the cells differ: a wrong site would show
    by_class = cache_weights(store_sources[order], store_labels[order], store_sources, None,
                             cell_weights(store_labels, None, "class"))
    assert by_class.sum() == pytest.approx(5.0)
    with pytest.raises(KeyError, match="c/9.png"):
        cache_weights(np.array(["c/9.png"]), np.array([0]), store_sources, store_sites, cells)


def test_minority_classes_are_those_with_a_quarter_or_less_of_the_largest():
    from msbt.data.balance import MINORITY_RATIO, minority_classes

    assert MINORITY_RATIO == 4
    assert minority_classes({"HeLa": 12, "MCF-7": 2, "Huh-7": 3, "NCI-H1299": 4}) == ["MCF-7", "Huh-7"]
    assert minority_classes({"benign": 437, "malignant": 210}) == []  # BUSI: about 1:2
    assert minority_classes({"a": 12, "b": 0}) == []  # a class with none is a missing class, said apart
    assert minority_classes({"a": 5}) == []
