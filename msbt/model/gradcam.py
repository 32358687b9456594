"""Grad-CAM heatmaps for msbt models: which part of the image raised the malignancy score.

Grad-CAM (Selvaraju et al., ICCV 2017) weighs each channel ``k`` of a convolutional feature map ``A`` by
the spatial mean of ``d score / d A_k``, sums the weighted channels and keeps the positive part::

    alpha_k = mean_ij d score / d A_k[i, j]        cam[i, j] = relu(sum_k alpha_k * A_k[i, j])

The map is then divided by its maximum (so 1 marks the strongest evidence in that image) and resized to
the input image.

Target layer. The map is the last convolutional feature map before global pooling: the backbone's
output, the only tensor the ``gap`` layer reads, and the finest map whose channels the head's weights are
about. Per backbone (:data:`TARGET_LAYERS`): ResNet50 ``conv5_block3_out`` (ReLU after the last residual
add), EfficientNetB2 ``top_activation`` (swish after the 1x1 head conv), InceptionV3 ``mixed10`` (the
last Inception block's concatenation), EfficientNet-Lite0 ``top_relu6``. :func:`target_layer` does not
trust the table: it follows the graph from the pooling layer back to the layer that produces its input,
and warns if that is not the layer the table names.

Score. The gradient is taken of the malignancy *logit* ``z`` (the ``predictions`` layer before its
sigmoid), not of ``p = sigmoid(z)``. Since ``dp/dA = p (1 - p) dz/dA`` and ``p (1 - p)`` is one positive
number per image, both give the same normalised map, except where the sigmoid saturates: a confident
model (``p`` within float32 rounding of 0 or 1) has ``p (1 - p) = 0`` and the probability's gradient is
zero everywhere, i.e. no heatmap for exactly the most confident calls. ``score="probability"`` is there
to show that (tests/unit/test_gradcam.py).

Model layout. The model must be a chain ``image -> preprocess -> backbone -> gap -> head -> predictions``
(:func:`msbt.model.models.build_model`); the backbone is a nested ``keras.Model``, so the feature map is taken
from a sub-model of the backbone, and the layers around it are called one after the other.
"""

from __future__ import annotations

import warnings

import cv2
import keras
import numpy as np
import tensorflow as tf

# The last feature map before global pooling, per backbone (layer names inside the ``backbone`` model).
TARGET_LAYERS = {
    "resnet50": "conv5_block3_out",
    "efficientnetb2": "top_activation",
    "inceptionv3": "mixed10",
    "efficientnet_lite0": "top_relu6",
    "efficientnet_lite1": "top_relu6",
    "efficientnet_lite2": "top_relu6",
    "tiny_cnn": "top_relu",
}
_POOLING = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)


def gradcam(
    model: keras.Model,
    images: np.ndarray,
    layer: str | None = None,
    *,
    score: str = "logit",
    class_index: int | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Grad-CAM heatmaps of a batch of images.

    Args:
        model: An msbt model (:func:`msbt.model.models.build_model`, or loaded from a checkpoint).
        images: ``(N, H, W, 3)`` raw 0..255 pixels (uint8, or float) at the model's input size.
        layer: The feature map to explain: a layer of the backbone, or a top-level layer; default
            :func:`target_layer`.
        score: ``"logit"`` (default; see the module docstring) or ``"probability"``.
        class_index: Softmax models only: the class whose score is explained (default: the predicted
            class of each image). A one-unit sigmoid model always explains its positive (malignant) unit.
        batch_size: Images per gradient computation.

    Returns:
        ``(N, H, W)`` float32 in [0, 1]; all zeros where there is no positive evidence, and for an image
        whose pixels are all equal (it has no structure to point at; what Grad-CAM would show there is
        the network's response to its own zero padding).

    Raises:
        ValueError: Wrong image shape, an unknown layer or score, or a model that is not a chain.

    An ensemble (msbt.model.ensemble) gets the mean of its members' heatmaps (each normalised as above).
    """
    if score not in ("logit", "probability"):
        raise ValueError(f"score must be 'logit' or 'probability', got {score!r}")
    images = np.asarray(images)
    size = tuple(model.input_shape[1:3])
    if images.ndim != 4 or images.shape[1:] != (*size, 3):
        raise ValueError(f"images must be (N, {size[0]}, {size[1]}, 3) at the model's input size, got {images.shape}")
    if len(images) == 0:
        return np.zeros((0, *size), np.float32)
    from msbt.model.ensemble import members

    parts = members(model)
    if parts:  # an ensemble: the mean of its members' maps, each at its own default layer
        return np.mean([gradcam(m, images, layer, score=score, class_index=class_index, batch_size=batch_size)
                        for m in parts], axis=0).astype(np.float32)
    forward = _forward_fn(model, layer or target_layer(model))
    maps = []
    for start in range(0, len(images), batch_size):
        batch = tf.convert_to_tensor(images[start : start + batch_size], tf.float32)
        maps.append(_cams(forward, batch, score, class_index))
    cams = np.concatenate(maps)
    out = np.zeros((len(images), *size), np.float32)
    for i, cam in enumerate(cams):
        flat = images[i].reshape(-1)
        if flat.min() == flat.max():
            continue
        out[i] = _normalise_and_resize(cam, size)
    return out


def _cams(forward, batch: tf.Tensor, score: str, class_index: int | None) -> np.ndarray:
    """Raw (unnormalised, feature-map sized) Grad-CAM maps of one batch."""
    with tf.GradientTape() as tape:
        features, logits, activation = forward(batch)
        if activation == "sigmoid":
            target = logits[:, 0] if score == "logit" else tf.sigmoid(logits[:, 0])
        else:
            chosen = tf.argmax(logits, axis=-1) if class_index is None else tf.fill([tf.shape(logits)[0]], class_index)
            values = logits if score == "logit" else tf.nn.softmax(logits)
            target = tf.gather(values, chosen, axis=1, batch_dims=1)
        # One image's score depends on that image alone (inference mode), so the gradient of the sum
        # gives every image its own gradient.
        total = tf.reduce_sum(target)
    grads = tape.gradient(total, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # alpha_k, one per image and channel
    cam = tf.nn.relu(tf.reduce_sum(tf.cast(weights * features, tf.float32), axis=-1))
    return np.nan_to_num(cam.numpy().astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def _normalise_and_resize(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    peak = float(cam.max())
    if not peak > 0.0:  # no positive evidence anywhere (also catches a non-finite peak)
        return np.zeros(size, np.float32)
    # Normalise first: bilinear interpolation then stays within [0, 1] (cubic could overshoot).
    resized = cv2.resize(cam / peak, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Finding the feature map


def target_layer(model: keras.Model) -> str:
    """Name of the last 4-D feature map feeding the model's global pooling layer.

    For an msbt model it is a layer inside the nested ``backbone`` (see :data:`TARGET_LAYERS`); it is
    found from the graph, not from the table, and a disagreement with the table is warned about.

    Raises:
        ValueError: The model has no global pooling layer, or what feeds it is not a 4-D map.
    """
    pools = [layer for layer in model.layers if isinstance(layer, _POOLING)]
    if len(pools) != 1:
        raise ValueError(f"model {model.name!r}: expected one global pooling layer, found {len(pools)}")
    feeder = model.get_layer(_inbound_name(model, pools[0].name))
    if isinstance(feeder, keras.Model):  # the backbone: descend to the layer producing its output
        feeder = _producer(feeder, feeder.outputs[0])
    shape = feeder.output.shape
    if len(shape) != 4:
        raise ValueError(f"model {model.name!r}: {feeder.name!r} feeds the pooling but is not a 4-D map {shape}")
    expected = TARGET_LAYERS.get(model.name.removeprefix("msbt_"))
    if expected is not None and expected != feeder.name:
        warnings.warn(f"{model.name}: the pooling reads {feeder.name!r}, not {expected!r} as msbt.model.gradcam "
                      f"expects for this backbone; using {feeder.name!r}", stacklevel=2)
    return feeder.name


def _producer(model: keras.Model, tensor) -> keras.Layer:
    """The layer of ``model`` whose output is ``tensor``."""
    for layer in reversed(model.layers):
        try:
            if layer.output is tensor:
                return layer
        except (AttributeError, ValueError):  # a layer called more than once has no single output
            continue
    raise ValueError(f"model {model.name!r}: no layer produces its output tensor")


def _chain(model: keras.Model) -> list[keras.Layer]:
    """The model's top-level layers after the input, checked to form one unbranched chain."""
    entries = model.get_config()["layers"]
    chain, previous = [], None
    for entry in entries:
        nodes = entry["inbound_nodes"]
        if not nodes:  # the input layer
            if previous is not None:
                raise ValueError(f"model {model.name!r} has more than one input; Grad-CAM needs one image input")
            previous = entry["name"]
            continue
        args = nodes[0]["args"] if len(nodes) == 1 else []
        sources = [a["config"]["keras_history"][0] for a in args if isinstance(a, dict) and "config" in a]
        if sources != [previous]:
            raise ValueError(
                f"model {model.name!r}: layer {entry['name']!r} does not simply follow {previous!r}; "
                "Grad-CAM here needs the msbt layout image -> preprocess -> backbone -> gap -> head"
            )
        chain.append(model.get_layer(entry["name"]))
        previous = entry["name"]
    return chain


def _inbound_name(model: keras.Model, name: str) -> str:
    for entry in model.get_config()["layers"]:
        if entry["name"] == name:
            return entry["inbound_nodes"][0]["args"][0]["config"]["keras_history"][0]
    raise ValueError(f"model {model.name!r} has no layer {name!r}")


def _forward_fn(model: keras.Model, layer: str):
    """A function ``images -> (feature map, logits, final activation)`` that runs ``model`` in pieces.

    The feature map comes out of the piece that holds ``layer`` (a sub-model of the backbone when the
    layer is inside it); the last layer's pre-activation is computed from its kernel and bias.
    """
    chain = _chain(model)
    last = chain[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if not isinstance(last, keras.layers.Dense) or activation not in ("sigmoid", "softmax"):
        raise ValueError(f"model {model.name!r}: the last layer must be a Dense sigmoid or softmax classifier")
    holder = None
    for index, piece in enumerate(chain[:-1]):
        if piece.name == layer:
            holder = (index, None)
        elif isinstance(piece, keras.Model) and any(inner.name == layer for inner in piece.layers):
            inner = piece.get_layer(layer)
            # The backbone's own output needs no sub-model; an earlier map comes out beside the output.
            sub = None if inner.output is piece.outputs[0] else keras.Model(
                piece.inputs, [inner.output, piece.outputs[0]], name=f"{piece.name}_gradcam")
            holder = (index, sub)
    if holder is None:
        raise ValueError(f"model {model.name!r} has no layer {layer!r} before its classifier")
    at, sub = holder

    def forward(images):
        x, features = images, None
        for index, piece in enumerate(chain[:-1]):
            if index == at and sub is not None:
                features, x = sub(x, training=False)
            else:
                x = piece(x, training=False)
                if index == at:
                    features = x
        if len(features.shape) != 4:
            raise ValueError(f"layer {layer!r} gives a {len(features.shape)}-D tensor; Grad-CAM needs a 4-D map")
        # In float32 like the layer itself (it is float32 even under a mixed-precision policy).
        x = tf.cast(x, last.kernel.dtype)
        logits = tf.matmul(x, last.kernel) + (last.bias if last.use_bias else 0.0)
        return features, logits, activation

    return forward


# ---------------------------------------------------------------------------------------------------
# Showing it


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a heatmap, coloured with OpenCV's JET colormap (blue = 0, red = 1), over an image.

    Args:
        image: ``(H, W, 3)`` RGB or ``(H, W)`` grayscale uint8.
        heatmap: ``(h, w)`` values in [0, 1] (resized to the image if its size differs; NaN counts as 0).
        alpha: Weight of the colour (0 = the image only, 1 = the colour only).

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heatmap = np.asarray(heatmap, np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {heatmap.shape}")
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image
    if heatmap.shape != rgb.shape[:2]:
        heatmap = cv2.resize(heatmap, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    levels = np.round(np.clip(np.nan_to_num(heatmap, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    blended = rgb.astype(np.float32) * (1.0 - alpha) + colour.astype(np.float32) * alpha
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)
