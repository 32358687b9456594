"""Fast mode of ``msbt tune``: heads trained on cached backbone features when the backbone is frozen.

With ``trainable_backbone: false`` every epoch of every trial pushes the same images through the same
frozen backbone; only the head learns. So the backbone's output (the ``gap`` layer of
``msbt.model.models.build_model``) is computed once per image and copy, in parallel with Ray Data, cached in
the run folder, and each trial trains just the head on those vectors.

* Training images get ``E`` copies: copy 0 the original, copies 1..E-1 augmented with
  ``msbt.model.augment.augment_image`` under fixed stateless keys (epoch 0, the copy number, and a stable
  index from the image's source name). ``E`` is the largest ``expansion`` of the search space; a trial
  with expansion ``e`` trains on copies ``0..e-1``. The augmentation ranges (shift, rotation, flip) are
  the reference's and fixed: they are part of the cache key. Unlike full training, where each epoch
  draws new transforms, the copies are the same every epoch (the paper's "tripled" set, made once).
* Validation images: the original only. The ``test`` split is never read.
* Cache: ``<run>/tune/features/<key>/features.npz`` + ``features.json``; the key hashes the stage-1
  model file, the store identity, the backbone settings, the augmentation and the seed, so a changed
  input makes a new cache and never reuses a stale one.
* ``stage2.balance``: each training image's loss weight (its (site, class) cell, as full training counts them)
  is computed on the driver from the store (:func:`train_weights`) and handed to every trial; not cached.
* The head is built by the same code as the full model (``msbt.model.models``, same layer names), so
  :func:`attach_head` puts a trained head back on the backbone as a complete stage-2 model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from msbt.atomicio import write_text
from msbt.config import Config, StageConfig, to_dict, training_seed

log = logging.getLogger(__name__)

FORMAT = 1
FEATURES_FILE = "features.npz"
INFO_FILE = "features.json"
SPLITS = ("train", "val")  # never "test"


def frozen(stage: StageConfig) -> StageConfig:
    """The stage with its backbone frozen (BatchNorm in inference mode), as fast mode trains it."""
    return dataclasses.replace(stage, trainable_backbone=False, head_epochs=0)


def image_index(source: str) -> int:
    """A stable per-image index for augmentation keys: independent of row order and task layout."""
    return zlib.crc32(source.encode())


def cache_key(parent: str | Path | None, store: str | Path, stage: StageConfig, copies: int, seed: int) -> str:
    """Hash of everything the cached features depend on."""
    from msbt.model.checkpoint import read_manifest, weights_record
    from msbt.data.store import Store

    parts = {
        "format": FORMAT,
        # the backbone's weights: the stage-1 model, or (no parent) the stage's own source (a file's sha256)
        "parent_model": read_manifest(parent)["model_sha256"] if parent else weights_record(stage.weights),
        "store": Store.open(store).fingerprint(),
        "backbone": [stage.backbone, stage.image_size],
        "augment": {k: v for k, v in to_dict(stage.augment).items() if k not in ("enabled", "expansion")},
        "copies": copies,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Computing features (Ray Data)


class FeatureExtractor:
    """A Ray Data actor: loads the stage-1 model once, returns backbone features of image batches.

    Args:
        parent: The stage-1 checkpoint folder (None: the stage's own ``weights``).
        stage: Stage-2 config (backbone, image size; its ``augment`` ranges make the copies).
        copies: Copies per training image (copy 0 = original).
        seed: Augmentation seed.
        shape: Stored image shape.
    """

    def __init__(self, parent: str | None, stage: dict, copies: int, seed: int, shape: Sequence[int]):
        import keras

        from msbt.model.checkpoint import load_checkpoint
        from msbt.config import from_dict
        from msbt.model.models import build_model

        self.stage = frozen(from_dict(StageConfig, stage, source="fast-mode stage"))
        self.copies, self.seed, self.shape = copies, seed, tuple(shape)
        model = build_model(self.stage, 2, load_checkpoint(parent)[0] if parent else None)
        self.extract = keras.Model(model.inputs, model.get_layer("gap").output)

    def __call__(self, batch):
        import tensorflow as tf

        from msbt.model import augment
        from msbt.data.store import decode_images

        images = tf.convert_to_tensor(decode_images(batch["image"], self.shape))
        size = self.stage.image_size
        if tuple(images.shape[1:3]) != (size, size):  # as msbt.train.loop resizes before augmenting
            images = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(images, (size, size))), 0, 255), tf.uint8)
        splits = [str(s) for s in batch["split"].to_pylist()]
        sources = [str(s) for s in batch["source"].to_pylist()]
        labels = np.asarray(batch["label_index"].to_numpy(), np.int64)
        out = {"feature": [], "label_index": [], "split": [], "source": [], "copy": []}
        for copy in range(self.copies):
            rows = [i for i, s in enumerate(splits) if copy == 0 or s == "train"]
            if not rows:
                continue
            if copy == 0:
                x = tf.cast(tf.gather(images, rows), tf.float32)
            else:
                x = tf.stack([augment.augment_image(images[i], augment.image_key(self.seed, 0, copy, image_index(
                    sources[i])), self.stage.augment) for i in rows])
            out["feature"].append(self.extract(x, training=False).numpy().astype(np.float32))
            out["label_index"].append(labels[rows])
            out["split"] += [splits[i] for i in rows]
            out["source"] += [sources[i] for i in rows]
            out["copy"].append(np.full(len(rows), copy, np.int64))
        return {"feature": np.concatenate(out["feature"]), "label_index": np.concatenate(out["label_index"]),
                "split": np.asarray(out["split"]), "source": np.asarray(out["source"]),
                "copy": np.concatenate(out["copy"])}


def compute_features(store: str | Path, parent: str | Path | None, stage: StageConfig, copies: int, seed: int,
                     actors: int = 1, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Backbone features of the store's train (``copies`` each) and val images, with Ray Data actors.

    Returns:
        ``train_x (N, copies, D)``, ``train_y (N,)``, ``val_x (M, D)``, ``val_y (M,)``,
        ``train_source``, ``val_source``; rows sorted by source name.
    """
    import ray
    import ray.data
    from ray.data.expressions import col

    from msbt.data.store import Store

    opened = Store.open(store)
    ds = opened.ray_dataset(["image", "label_index", "split", "source"])
    # Materialised before the actors start: on 2 CPUs an actor pool holding the CPUs starves read tasks.
    ds = ds.filter(expr=col("split").is_in(list(SPLITS))).materialize()
    ds = ds.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"parent": str(parent) if parent else None, "stage": to_dict(stage), "copies": copies,
                               "seed": seed, "shape": opened.image_shape},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=1,
        # Ray Data 2.60 gives pool actors restarts, and Ray core then logs an error line to the console for every
        # actor whose constructor arguments sit in the object store, as Ray Data's own do (ray-project/ray#57733):
        # it reached the terminal on every fast-mode search. A crashed extractor now fails the step, naming it.
        max_restarts=0,
    )
    rows = {k: [] for k in ("feature", "label_index", "split", "source", "copy")}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key in rows:
            rows[key].append(batch[key])
    cols = {k: np.concatenate(v) for k, v in rows.items()}
    return _arrange(cols, copies)


def _arrange(cols: Mapping[str, np.ndarray], copies: int) -> dict[str, np.ndarray]:
    """Rows (source, copy) -> per-split arrays in source order; train as (N, copies, D)."""
    out = {}
    for split in SPLITS:
        mine = cols["split"] == split
        order = np.lexsort((cols["copy"][mine], cols["source"][mine]))
        feats, labels = cols["feature"][mine][order], cols["label_index"][mine][order]
        sources = cols["source"][mine][order]
        n = 1 if split == "val" else copies
        if len(feats) % n:
            raise RuntimeError(f"{split}: {len(feats)} feature rows is not a multiple of {n} copies")
        feats = feats.reshape(len(feats) // n, n, -1)
        out[f"{split}_x"] = feats[:, 0] if split == "val" else feats
        out[f"{split}_y"], out[f"{split}_source"] = labels[::n], sources[::n].astype(str)
    if not len(out["train_y"]) or not len(out["val_y"]):
        raise ValueError("the store needs train and val rows for fast mode")
    return out


def features_dir(config: Config, key: str) -> Path:
    from msbt.runfolder import tune_dir

    return tune_dir(config) / "features" / key


def ensure_features(config: Config, store: str | Path, parent: str | Path | None, reference: StageConfig) -> Path:
    """The cached features for this run, computed now if there are none for this key.

    Args:
        config: The run's config (``stage2`` backbone and image size, ``tune.space.expansion``).
        store: The ultrasound store.
        parent: The stage-1 checkpoint folder (None: the stage's own ``weights``).
        reference: The stage whose augmentation ranges make the copies (trial 0's).

    Returns:
        The cache folder (``features.npz``, ``features.json``).
    """
    from msbt.model.augment import copies_per_epoch

    stage = frozen(dataclasses.replace(config.stage2, augment=reference.augment))
    copies = max([*config.tune.space.expansion, copies_per_epoch(reference.augment)])
    key = cache_key(parent, store, stage, copies, training_seed(config))
    out = features_dir(config, key)
    if (out / INFO_FILE).is_file():
        print(f"fast mode: reusing cached features {out}", flush=True)
        return out
    started = time.perf_counter()
    arrays = compute_features(store, parent, stage, copies, training_seed(config), actors=config.tune.feature_actors)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{FEATURES_FILE}.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(out / FEATURES_FILE)
    seconds = time.perf_counter() - started
    info = {"key": key, "parent": str(parent) if parent else None, "store": str(store), "copies": copies,
            "seed": training_seed(config), "stage": to_dict(stage), "train": int(len(arrays["train_y"])),
            "val": int(len(arrays["val_y"])), "dim": int(arrays["val_x"].shape[1]), "seconds": round(seconds, 2)}
    write_text(out / INFO_FILE, json.dumps(info, indent=2) + "\n")  # written last: marks the cache complete
    print(f"fast mode: features of {info['train']} train images x {copies} copies and {info['val']} val images "
          f"in {seconds:.1f} s -> {out}", flush=True)
    return out


def load_features(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a feature cache folder."""
    with np.load(Path(path) / FEATURES_FILE) as data:
        return {k: data[k] for k in data.files}


def train_weights(store: str | Path, features: Mapping[str, np.ndarray], balance: str) -> np.ndarray:
    """Each cached training image's loss weight under ``balance``, in the cache's row order (``train_source``).

    The table is the one a full stage-2 training uses (``msbt.train.runner.loss_weights``: per (site, class)
    cell of the store's training rows); each image's site comes from the store by its source name, so the
    cache itself needs no sites and a cache made before weights existed serves as it is.
    """
    from msbt.data.balance import describe
    from msbt.data.store import Store
    from msbt.train.runner import loss_weights

    cells = {(site, label): weight for site, label, weight in loss_weights(store, balance)}
    opened = Store.open(store)
    rows = opened.read(["source", *(["site"] if "site" in opened.columns() else [])], "train")
    weights = cache_weights(features["train_source"], features["train_y"], rows["source"], rows.get("site"), cells)
    print(f"fast mode: loss weights (balance {balance}): {describe(cells, opened.classes)}", flush=True)
    return weights


def cache_weights(sources: Sequence[str], labels: Sequence[int], store_sources: Sequence[str],
                  store_sites: Sequence[str] | None, cells: Mapping[tuple[str, int], float]) -> np.ndarray:
    """The weight of each cached image (``sources``, ``labels``: the cache's order) from its (site, class) cell;
    its site is the store row's of the same source (``store_sites`` None: a store without sites).

    Raises:
        KeyError: A cached image the store's training rows do not hold, named.
    """
    from msbt.data.balance import row_weights

    store_sources = np.asarray(store_sources).astype(str)
    site_of = dict(zip(store_sources, np.asarray(store_sites).astype(str) if store_sites is not None
                       else [""] * len(store_sources)))
    sources = np.asarray(sources).astype(str)
    missing = [source for source in sources if source not in site_of]
    if missing:
        raise KeyError(f"cached image {missing[0]!r} is not a training row of the store ({len(missing)} such)")
    return row_weights(labels, [site_of[source] for source in sources], dict(cells))


# ---------------------------------------------------------------------------------------------------
# Heads


def head_model(stage: StageConfig, feature_dim: int, num_classes: int = 2):
    """The stage's head alone, on backbone features: the same layers (and names) as ``build_model``'s."""
    import keras

    from msbt.model.models import head_layers

    inputs = keras.Input((feature_dim,), name="features")
    return keras.Model(inputs, head_layers(inputs, stage.head, num_classes), name=f"msbt_head_{stage.backbone}")


def attach_head(head, stage: StageConfig, parent: str | Path | None):
    """A complete stage-2 model: stage 1's backbone (as ``build_model`` copies it) with a trained head.

    Args:
        head: From :func:`head_model`, trained.
        stage: The stage-2 config the head was trained under.
        parent: The stage-1 checkpoint the features came from (None: the stage's own ``weights``).

    Returns:
        A ``keras.Model`` whose output equals ``head(features(image))``.
    """
    from msbt.model.checkpoint import load_checkpoint
    from msbt.model.models import build_model

    num_classes = 2 if head.get_layer("predictions").units == 1 else head.get_layer("predictions").units
    model = build_model(frozen(stage), num_classes, load_checkpoint(parent)[0] if parent else None)
    for layer in head.layers:
        if layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())
    return model


def fit_head(stage: StageConfig, features: Mapping[str, np.ndarray], *, seed: int = 0, callbacks=(),
             verbose: int = 0):
    """Train the stage's head on cached features; returns ``(head model, Keras history dict)``.

    The trial's ``augment.expansion`` (1 when augmentation is off) picks how many cached copies of each
    training image an epoch uses; optimizer, learning rate, batch size and epochs are the stage's.
    """
    import keras

    from msbt.model.augment import copies_per_epoch
    from msbt.model.compiled import averaging_callbacks, compile_model

    if stage.balance != "none" and "train_weight" not in features:  # never silently unweighted
        raise ValueError(f"balance {stage.balance!r}: the features carry no train_weight "
                         "(msbt.tune.fast.train_weights)")
    keras.utils.set_random_seed(seed)
    copies = copies_per_epoch(stage.augment)
    available = features["train_x"].shape[1]
    if copies > available:
        raise ValueError(f"expansion {copies} needs {copies} cached copies; the cache has {available}")
    x = features["train_x"][:, :copies].reshape(-1, features["train_x"].shape[-1])
    y = np.repeat(features["train_y"], copies).astype(np.float32)[:, None]
    # rows are image-major (each image's copies in turn), as y; validation stays unweighted, as in full training
    weights = np.repeat(features["train_weight"], copies) if stage.balance != "none" else None
    head = head_model(stage, x.shape[1])
    compile_model(head, stage)
    history = head.fit(x, y, sample_weight=weights, batch_size=stage.batch_size, epochs=stage.epochs,
                       shuffle=True, verbose=verbose,
                       validation_data=(features["val_x"], features["val_y"].astype(np.float32)[:, None]),
                       callbacks=[*averaging_callbacks(stage), *callbacks])
    return head, history.history


def head_trial(params: dict, *, config: Config, features: Mapping[str, np.ndarray]) -> None:
    """Fast-mode trainable: the trial's head on the cached features, one Tune report per epoch."""
    import keras
    from ray import tune

    from msbt.tune.space import trial_stage

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            tune.report({**{k: float(v) for k, v in (logs or {}).items()}, "epoch": epoch + 1})

    # With tune.reuse_processes this process runs the next trial once this one's thread has ended, and Tune
    # marks that next trial as failed if the thread has not ended within TUNE_FUNCTION_THREAD_TIMEOUT_S (read
    # at every reuse; Ray's default 2 s). A trial stopped by ASHA ends at its next report, which a loaded
    # machine may delay: more time here, unless the user set it.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
    fit_head(trial_stage(config, params, fast=True), features, seed=training_seed(config), callbacks=[Report()])
