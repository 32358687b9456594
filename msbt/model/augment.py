"""On-the-fly, seeded training-set augmentation inside the tf.data pipeline.

The paper "tripled" its training sets with shift and rotation. Here that is an expansion factor E
(``AugmentConfig.expansion``, 3 by default) applied on the fly: one epoch makes E passes over the
training images, pass 0 with the originals and passes 1..E-1 with freshly transformed copies, each pass
in its own shuffled order. So every epoch sees each image E times (the original plus E-1 augmented
versions), an epoch has E times as many steps as without augmentation, and the augmented copies differ
from epoch to epoch, unlike a tripled set written to disk once. Augmentation off (Table 1 row 1): one
pass of originals per epoch.

Determinism: the transform of an image depends only on ``(seed, epoch, pass, image index)`` through
stateless random ops (``tf.random.stateless_*``), never on the order in which tf.data happens to
process elements or on global random state. The pass order comes from tf.data's shuffle with an
op seed derived from the same key (deterministic for a given global seed, which ``fit_stage`` sets).

TensorFlow is used (not numpy) because these transforms run inside the tf.data graph, in parallel with
training; the maths is in :func:`affine_vector`, small enough to read.
"""

from __future__ import annotations

import functools
import math

import keras
import tensorflow as tf

from msbt.config import ERASE_MIN_AREA, AugmentConfig

# Keras' ImageDataGenerator default (which shift/rotation-range recipes like the paper's use): pixels
# moved in from outside the image repeat the nearest edge pixel.
FILL_MODE = "nearest"
# Large prime multipliers keep (seed, epoch, pass) keys of nearby values apart.
_EPOCH_STRIDE = 1_000_003


def copies_per_epoch(cfg: AugmentConfig) -> int:
    """How many times one epoch shows each training image: ``expansion`` if enabled, else 1."""
    if cfg.enabled and cfg.expansion < 1:
        raise ValueError(f"augment.expansion must be >= 1, got {cfg.expansion}")
    return cfg.expansion if cfg.enabled else 1


def affine_vector(params, height: int, width: int):
    """Keras/TF 8-number projective transform for rotation, shift, zoom and flip about the centre.

    The forward map of image content is ``p' = c + t + z R(angle) F (p - c)`` (F flips x when asked);
    ``affine_transform`` wants the inverse (output pixel -> input pixel), which is
    ``p = M (p' - c - t) + c`` with ``M = F R(-angle) / z``.

    Args:
        params: Float tensor ``[angle_rad, tx_px, ty_px, zoom, flip_sign]``.
        height: Image height in pixels.
        width: Image width in pixels.

    Returns:
        ``[a0, a1, a2, b0, b1, b2, 0, 0]`` as a float32 tensor.
    """
    angle, tx, ty, zoom, flip = tf.unstack(tf.cast(params, tf.float32))
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    m00, m01, m10, m11 = flip * cos, flip * sin, -sin, cos
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    a2 = cx - (m00 * (cx + tx) + m01 * (cy + ty))
    b2 = cy - (m10 * (cx + tx) + m11 * (cy + ty))
    return tf.stack([m00, m01, a2, m10, m11, b2, 0.0, 0.0])


def random_params(key, cfg: AugmentConfig, height: int, width: int):
    """Draw one image's transform parameters from a stateless seed.

    Args:
        key: int32/int64 tensor of shape (2,), a stateless seed.
        cfg: Ranges: rotation (degrees, +-), shift (fraction of the size, +-), zoom (fraction, +-),
            flip (horizontal, p = 0.5), contrast (fraction, +-).

    Returns:
        ``(affine params for affine_vector, contrast factor)``.
    """
    u = 2.0 * tf.random.stateless_uniform([6], seed=key) - 1.0  # six independent U(-1, 1)
    angle = u[0] * cfg.rotation * math.pi / 180.0
    tx, ty = u[1] * cfg.shift * width, u[2] * cfg.shift * height
    zoom = 1.0 + u[3] * cfg.zoom
    flip = tf.where(tf.logical_and(cfg.flip, u[4] < 0.0), -1.0, 1.0)
    contrast = 1.0 + u[5] * cfg.contrast
    return tf.stack([angle, tx, ty, zoom, flip]), contrast


def augment_image(image, key, cfg: AugmentConfig):
    """Apply one random shift/rotation/zoom/flip/contrast (and gain/blur/speckle/erasing) to one image.

    Args:
        image: (H, W, C) tensor of 0..255 pixels (any numeric dtype).
        key: Stateless seed, shape (2,): the same key always gives the same output.
        cfg: The augmentation ranges.

    Returns:
        (H, W, C) float32 image, still in 0..255.
    """
    image = tf.cast(image, tf.float32)
    height, width = image.shape[0], image.shape[1]
    params, contrast = random_params(key, cfg, height, width)
    transform = affine_vector(params, height, width)
    out = keras.ops.image.affine_transform(image, transform, interpolation="bilinear", fill_mode=FILL_MODE)
    if cfg.contrast > 0:
        mean = tf.reduce_mean(out, axis=(0, 1), keepdims=True)
        out = (out - mean) * contrast + mean
    if cfg.brightness > 0 or cfg.blur > 0 or cfg.speckle > 0:
        out = _ultrasound_look(out, key, cfg)
    if cfg.erase > 0:
        out = random_erase(out, tf.random.experimental.stateless_fold_in(key, 3), cfg.erase)
    return tf.clip_by_value(out, 0.0, 255.0)


def random_erase(image, key, largest: float, probability: float = 0.5):
    """With ``probability``, one rectangle of ``image`` replaced by uniform grey noise (0..255, one value per pixel
    for all channels).

    The rectangle covers a share of the area drawn uniformly from ``ERASE_MIN_AREA`` to ``largest``, its aspect
    (height / width) log-uniformly from 0.3 to 1 / 0.3, clipped to the image, and lies anywhere inside it; every
    draw comes from ``key`` (stateless), so an image's copy is erased the same way in every run.
    """
    height, width = image.shape[0], image.shape[1]
    u = tf.random.stateless_uniform([5], seed=key)
    area = (ERASE_MIN_AREA + u[0] * (largest - ERASE_MIN_AREA)) * height * width
    aspect = tf.exp(math.log(0.3) + u[1] * 2.0 * math.log(1 / 0.3))
    h = tf.clip_by_value(tf.round(tf.sqrt(area * aspect)), 1.0, float(height))
    w = tf.clip_by_value(tf.round(tf.sqrt(area / aspect)), 1.0, float(width))
    top = tf.floor(u[2] * (height - h + 1))
    left = tf.floor(u[3] * (width - w + 1))
    rows = tf.range(height, dtype=tf.float32)[:, None]
    cols = tf.range(width, dtype=tf.float32)[None, :]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w) & (u[4] < probability)
    noise = tf.random.stateless_uniform([height, width, 1], seed=tf.random.experimental.stateless_fold_in(key, 1),
                                        maxval=255.0)
    return tf.where(inside[..., None], noise, image)


def _ultrasound_look(image, key, cfg: AugmentConfig):
    """Gain, blur and speckle of another scanner or operator, drawn from keys folded off the image's key
    (the affine and contrast draws above stay what they were, so older configs augment exactly as before)."""
    u = tf.random.stateless_uniform([2], seed=tf.random.experimental.stateless_fold_in(key, 1))
    out = image
    if cfg.brightness > 0:
        out = out * (1.0 + (2.0 * u[0] - 1.0) * cfg.brightness)
    if cfg.blur > 0:
        out = gaussian_blur(out, u[1] * cfg.blur, radius=max(1, math.ceil(3 * cfg.blur)))
    if cfg.speckle > 0:  # multiplicative, one value per pixel for all channels (the content is grey)
        noise = tf.random.stateless_normal([out.shape[0], out.shape[1], 1],
                                           seed=tf.random.experimental.stateless_fold_in(key, 2))
        out = out * (1.0 + cfg.speckle * noise)
    return out


def gaussian_blur(image, sigma, radius: int):
    """(H, W, C) float image blurred with a Gaussian of standard deviation ``sigma`` pixels (a tensor;
    near 0 leaves the image as it is), separable, edges mirrored; ``radius`` fixes the kernel's size."""
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(x / tf.maximum(tf.cast(sigma, tf.float32), 1e-3)))
    k = k / tf.reduce_sum(k)
    channels = image.shape[-1]
    kx = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, channels, 1])
    ky = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, channels, 1])
    padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    out = tf.nn.depthwise_conv2d(padded, kx, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(out, ky, [1, 1, 1, 1], "VALID")[0]


@functools.lru_cache(maxsize=16)
def traced_augment(cfg: AugmentConfig, shape: tuple, dtype: tf.DType):
    """:func:`augment_image` of an image under its :func:`image_key`, for images of one shape and dtype, as one
    ``tf.function`` traced once: ``augment(image, seed, epoch, copy, index)``.

    A stage's pipeline has an augmented map per pass and epoch (``expand_epoch``); each tf.data map traces its
    function anew, so calling :func:`augment_image` there traced (and autograph-converted) the whole transform
    ``epochs * (expansion - 1)`` times: 60 times for the paper's 30 epochs, about 4 CPU-s of a stage's start-up
    (docs/training.md). Called inside those maps, this function is traced once per (settings, shape, dtype) and
    each map holds a call to it: the same ops with the same stateless keys, so the same pixels.
    """
    scalar = tf.TensorSpec([], tf.int64)

    @tf.function(input_signature=[tf.TensorSpec(shape, dtype), scalar, scalar, scalar, scalar], autograph=False)
    def augment(image, seed, epoch, copy, index):
        return augment_image(image, image_key(seed, epoch, copy, index), cfg)

    return augment


def image_key(seed: int, epoch, copy: int, index):
    """Stateless seed of one image in one pass of one epoch."""
    base = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64) * _EPOCH_STRIDE + copy])
    return tf.random.experimental.stateless_fold_in(base, tf.cast(index, tf.int64))


def expand_epoch(ds: tf.data.Dataset, cfg: AugmentConfig, *, seed: int, epoch: int, shuffle_buffer: int):
    """One epoch of training examples: E shuffled passes, pass 0 original, the rest augmented.

    Args:
        ds: Unbatched ``(image, label)`` (or ``(image, label, weight)``) with a static image shape; ``image``
            0..255.
        cfg: Augmentation settings (``copies_per_epoch(cfg)`` passes).
        seed: Run seed.
        epoch: Epoch number: new transforms and a new order every epoch.
        shuffle_buffer: tf.data shuffle buffer (the number of images for a full shuffle).

    Returns:
        Unbatched dataset of ``(float32 image, label)`` (and the weight), ``E * len(ds)`` elements.
    """
    passes = None
    indexed = ds.enumerate()
    for copy in range(copies_per_epoch(cfg)):
        # A Python int: tf.data combines it with TF's global seed (fit_stage sets that to `seed`).
        order_seed = (seed * _EPOCH_STRIDE + epoch * 101 + copy) % (2**31 - 1)
        shuffled = indexed.shuffle(shuffle_buffer, seed=order_seed, reshuffle_each_iteration=False)
        # xy[1:]: the label, and the row's loss weight when the dataset carries one (stage.balance)
        if copy == 0:
            one = shuffled.map(lambda i, xy: (tf.cast(xy[0], tf.float32), *xy[1:]))
        else:
            augment = traced_augment(cfg, tuple(ds.element_spec[0].shape), ds.element_spec[0].dtype)
            one = shuffled.map(
                lambda i, xy, c=copy: (augment(xy[0], seed, epoch, c, i), *xy[1:]),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
        passes = one if passes is None else passes.concatenate(one)
    return passes


def batch_key(seed: int, epoch, step):
    """Stateless seed of one training batch of one epoch (:func:`mix_batch`), apart from every image's key."""
    base = tf.stack([tf.cast(seed, tf.int64) + _EPOCH_STRIDE, tf.cast(epoch, tf.int64) * _EPOCH_STRIDE - 1])
    return tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))


def mix_batch(batch: tuple, alpha: float, key) -> tuple:
    """Mixup of one batch (``stage.mixup``): each example becomes ``lam * itself + (1 - lam) * a partner``.

    The partner is the example at a random permutation of the batch, ``lam ~ Beta(alpha, alpha)`` per example
    (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization"), and the label (a sigmoid's float or a
    one-hot row) and the loss weight, if any, are mixed with the same ``lam``, so the loss is that of a point
    between two images. A Beta draw is ``g1 / (g1 + g2)`` with two Gamma(alpha) draws; every draw is stateless
    under ``key`` (:func:`batch_key`), so a batch mixes the same way in any run.

    Args:
        batch: ``(images, labels)`` or ``(images, labels, weights)``, the images float32 ``(N, H, W, C)``, the
            labels ``(N, K)``, the weights ``(N,)``.
        alpha: The Beta distribution's parameter (> 0); small values keep most examples near one of the two.
        key: Stateless seed, shape (2,).

    Returns:
        The batch with the same structure, shapes and dtypes.
    """
    images, labels, *weights = batch
    n = tf.shape(images)[0]
    keys = [tf.random.experimental.stateless_fold_in(key, i) for i in range(3)]
    g1, g2 = (tf.random.stateless_gamma([n], seed=k, alpha=alpha) for k in keys[:2])
    lam = g1 / tf.maximum(g1 + g2, 1e-12)  # both draws can underflow to 0 at a small alpha
    partner = tf.argsort(tf.random.stateless_uniform([n], seed=keys[2]))

    def mix(values):
        share = tf.reshape(lam, [-1] + [1] * (len(values.shape) - 1))
        return share * values + (1.0 - share) * tf.gather(values, partner)

    return (mix(images), mix(labels), *(mix(w) for w in weights))
