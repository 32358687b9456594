"""One transfer-learning stage in one process: the same :func:`fit_stage` for stage 1 and stage 2.

Layers, from small to large:

* input pipelines: :func:`dataset_from_arrays`, :func:`train_batches` (expansion, shuffling and
  augmentation per epoch, see ``msbt.model.augment``), :func:`eval_batches`;
* :func:`plan_phases` (pure): the paper's single phase, or head-only then fine-tuning;
* ``msbt.model.compiled.compile_model`` (used here): optimizer from the config, loss and metrics from the head, with stable names
  ``loss, accuracy, auc, sensitivity, specificity`` (and ``val_`` + each);
* :class:`BestModelSaver`: writes a real copy of the model to disk whenever ``stage.monitor`` improves;
* the stage skeleton, shared by one worker and many: :func:`start_stage` (folder, seeded model from the
  parent checkpoint or a resumed one, saver) -> a step runner trains each of ``StageState.phases()`` ->
  :func:`finish_stage` (manifest, :class:`StageResult`);
* :func:`fit_stage`: that skeleton with Keras ``fit`` as the runner (``msbt.train.distributed`` supplies
  the multi-worker runner).

A Ray Train layer calls :func:`fit_stage` inside ``train_loop_per_worker``: pass its reporting callback
in ``callbacks`` and the worker's dataset shard as ``train_ds`` (batched shards are unbatched here).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from msbt.atomicio import atomic_path
from msbt.model import augment
from msbt.model.checkpoint import (
    MANIFEST_FILE,
    MODEL_FILE,
    TRAIN_STATE_FILE,
    CheckpointError,
    check_parent,
    load_checkpoint,
    train_state_file,
    write_manifest,
)
from msbt.config import StageConfig, to_dict
from msbt.model.compiled import averaged, averaging_callbacks, averaging_optimizer, compile_model, swap_average
from msbt.model.models import batchnorm_frozen, build_model, is_binary, set_backbone_trainable

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Input pipelines


def dataset_from_arrays(images: np.ndarray, labels: Sequence[int], weights: Sequence[float] | None = None
                        ) -> tf.data.Dataset:
    """Unbatched ``(image, label)`` dataset from in-memory arrays, the form :func:`fit_stage` takes.

    Args:
        images: uint8 ``(N, H, W, 3)``; grayscale ``(N, H, W)`` or ``(N, H, W, 1)`` is made RGB later.
        labels: ``N`` integer class indices.
        weights: ``N`` loss weights (``stage.balance``, msbt.data.balance); None: every row counts once.

    Returns:
        A ``tf.data.Dataset`` of ``(uint8 image, int32 label)``, or ``(image, label, float32 weight)``:
        Keras takes a third element as the row's sample weight.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:  # grayscale: give it a channel axis, so an element is never mistaken for a batch
        images = images[..., np.newaxis]
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 0..255 pixels, got {images.dtype}")
    if len(images) != len(labels) or labels.ndim != 1:
        raise ValueError(f"{len(images)} images but labels of shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if weights is None:
        return tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    weights = np.asarray(weights, np.float32)
    if weights.shape != labels.shape or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError(f"weights must be {len(labels)} finite non-negative numbers, got shape {weights.shape}")
    return tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32), weights))


def without_autotune_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds`` with tf.data's autotuning model thread off (``options.autotune.enabled = False``).

    Why: in TensorFlow 2.21 deleting an iterator whose autotuner is on can wait for the autotuner's next
    scheduled pass: 0 to 75 s after a stage's last epoch here, at the end of Keras ``fit`` (the N-worker step
    makes a new iterator every epoch, each open to the same wait); ``benchmarks/train_worker_arms.py --watch``
    shows it, docs/training.md. Off, ``AUTOTUNE`` map parallelism starts (and stays) at TF's initial value
    (``autotune.initial_parallelism``, 16, capped at the CPUs TF sees) and ``prefetch(AUTOTUNE)`` keeps its own
    buffer tuning; the steady training rate measured 0.99 of the autotuned one (52.4 vs 53.1 img/s, medians of 3).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def _standardize(ds: tf.data.Dataset, image_size: int) -> tf.data.Dataset:
    """Unbatch if needed, make images RGB uint8 at ``image_size`` (resizing only when they differ); every
    pipeline built on it runs without the autotuning thread (:func:`without_autotune_thread`)."""
    ds = without_autotune_thread(ds)
    if ds.element_spec[0].shape.rank == 4:
        ds = ds.unbatch()

    def fix(image, label, *weight):
        if image.shape.rank == 2:
            image = image[..., tf.newaxis]
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        if tuple(image.shape[:2]) != (image_size, image_size):
            resized = tf.image.resize(image, (image_size, image_size))
            image = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
        return (tf.ensure_shape(image, (image_size, image_size, 3)), label, *weight)

    return ds.map(fix, num_parallel_calls=tf.data.AUTOTUNE)


def _label_encoder(binary: bool, num_classes: int):
    """Integer label -> what the head's loss wants: [float] for one sigmoid unit, one-hot for softmax."""
    if binary:
        return lambda x, y, *w: (x, tf.cast(tf.reshape(y, [1]), tf.float32), *w)
    return lambda x, y, *w: (x, tf.one_hot(tf.cast(y, tf.int32), num_classes), *w)


def _count(ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality())
    if n == tf.data.INFINITE_CARDINALITY:
        raise ValueError("the training dataset is infinite; give one epoch's worth of examples")
    if n == tf.data.UNKNOWN_CARDINALITY:
        n = int(ds.reduce(np.int64(0), lambda count, _: count + 1))
    if n == 0:
        raise ValueError("the training dataset is empty")
    return n


def train_batches(
    ds: tf.data.Dataset,
    stage: StageConfig,
    *,
    num_classes: int,
    seed: int,
    first_epoch: int,
    last_epoch: int,
    shuffle_buffer: int | None = None,
) -> tuple[tf.data.Dataset, int]:
    """Batches for epochs ``first_epoch .. last_epoch - 1``, each epoch expanded and augmented afresh.

    Args:
        ds: Unbatched (or batched) ``(uint8 image, int label)`` training examples.
        stage: Image size, batch size and augmentation.
        num_classes: Number of classes (2 = binary head).
        seed: Run seed; with the epoch it keys every random choice.
        first_epoch: First epoch (0-based) the dataset covers, so a second phase continues the sequence.
        last_epoch: One past the last epoch.
        shuffle_buffer: tf.data shuffle buffer; None = the whole training set (an exact shuffle; the
            buffer holds that many uint8 images).

    Returns:
        ``(dataset, steps_per_epoch)``; the dataset yields exactly ``steps_per_epoch`` batches per
        epoch, the last batch of an epoch possibly smaller.
    """
    ds = _standardize(ds, stage.image_size)
    n = _count(ds)
    copies = augment.copies_per_epoch(stage.augment)
    steps = math.ceil(n * copies / stage.batch_size)
    encode = _label_encoder(num_classes == 2, num_classes)

    def one_epoch(epoch: int) -> tf.data.Dataset:
        examples = augment.expand_epoch(ds, stage.augment, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer or n)
        batches = examples.map(encode).batch(stage.batch_size)
        if stage.mixup > 0:
            batches = batches.enumerate().map(
                lambda step, batch: augment.mix_batch(batch, stage.mixup, augment.batch_key(seed, epoch, step))
            )
        return batches

    # The epochs are part of the dataset, each built with its number as a Python int (its transforms
    # and order depend on it), so a phase that starts at epoch k continues the sequence exactly. Keras
    # keeps one iterator across epochs when steps_per_epoch is given, until all batches are consumed.
    batches = functools.reduce(tf.data.Dataset.concatenate, map(one_epoch, range(first_epoch, last_epoch)))
    return batches.prefetch(tf.data.AUTOTUNE), steps


def eval_batches(ds: tf.data.Dataset, stage: StageConfig, *, num_classes: int) -> tf.data.Dataset:
    """Validation/test batches: no augmentation, float32 pixels, labels encoded for the head."""
    encode = _label_encoder(num_classes == 2, num_classes)
    ds = _standardize(ds, stage.image_size).map(lambda x, y, *w: encode(tf.cast(x, tf.float32), y, *w))
    return ds.batch(stage.batch_size).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------------------
# Schedule, metrics, compile


@dataclass(frozen=True)
class Phase:
    """Epochs ``first_epoch .. last_epoch - 1`` trained with one trainable set and learning rate."""

    first_epoch: int
    last_epoch: int
    backbone_trains: bool
    learning_rate: float


def plan_phases(stage: StageConfig) -> list[Phase]:
    """The stage's training phases.

    Args:
        stage: ``epochs``, ``trainable_backbone``, ``head_epochs``, ``learning_rate``, ``fine_tune_lr_scale``.

    Returns:
        The paper's single phase (whole network, ``learning_rate``); or one head-only phase when the
        backbone is frozen; or head-only for ``head_epochs`` then the backbone (its top
        ``fine_tune_layers``) at ``learning_rate * fine_tune_lr_scale`` for the remaining epochs.
    """
    if not stage.trainable_backbone:
        return [Phase(0, stage.epochs, False, stage.learning_rate)]
    if stage.head_epochs <= 0:
        return [Phase(0, stage.epochs, True, stage.learning_rate)]
    head = Phase(0, min(stage.head_epochs, stage.epochs), False, stage.learning_rate)
    if stage.head_epochs >= stage.epochs:
        return [head]
    fine = Phase(stage.head_epochs, stage.epochs, True, stage.learning_rate * stage.fine_tune_lr_scale)
    return [head, fine]


# ---------------------------------------------------------------------------------------------------
# Best checkpoint and the stage


class BestModelSaver(keras.callbacks.Callback):
    """Save the model to disk whenever ``monitor`` improves: a real copy, not a live reference.

    It saves an uncompiled clone (weights copied in), so the model file holds no optimizer state (half
    the size with Adagrad/Adam) and no compile config (no custom metric needed to load it). Beside it,
    ``train_state.npz`` holds what a resume needs to continue exactly (:func:`save_train_state`). Each
    file is written to a temporary file and renamed, so it is always complete. ``*loss`` is minimised, anything
    else maximised; NaN never counts as an improvement.

    Args:
        path: Where the model goes (``.keras``).
        monitor: A key of Keras' epoch logs, e.g. ``val_loss``.
    """

    def __init__(self, path: str | Path, monitor: str):
        super().__init__()
        self.path, self.monitor = Path(path), monitor
        self.mode = "min" if monitor.endswith("loss") else "max"
        self.best: float | None = None
        self.best_epoch: int | None = None  # 1-based
        self.best_logs: dict[str, float] = {}
        self._export: keras.Model | None = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs:
            raise KeyError(f"monitor {self.monitor!r} is not in the epoch logs {sorted(logs)}")
        value = float(logs[self.monitor])
        if not self._improved(value):
            return
        self.best, self.best_epoch = value, epoch + 1
        self.best_logs = {k: float(v) for k, v in logs.items()}
        self._save()

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value < self.best if self.mode == "min" else value > self.best

    def _save(self) -> None:
        if self._export is None:
            # from_config, not clone_model: a clone of a compiled model is compiled too and would save
            # its optimizer.
            self._export = keras.Model.from_config(self.model.get_config())
        with averaged(self.model):  # with stage.ema the average is the model; the raw weights go to the state
            self._export.set_weights(self.model.get_weights())
            with atomic_path(self.path) as tmp:  # a full disk leaves the last good model, never a 0-byte one
                self._export.save(tmp)
            save_train_state(self.model, self.path.parent / TRAIN_STATE_FILE, epoch=self.best_epoch)


def _state_variables(model: keras.Model) -> tuple[list, list]:
    """``(optimizer variables, model variables outside its weights)``: what a resume restores besides
    the weights. The second are the seed generators' states (Dropout), which the model file omits."""
    weights = {id(v) for v in model.weights}
    extra = [v for v in model.variables if id(v) not in weights]
    optimizer = list(model.optimizer.variables) if getattr(model, "optimizer", None) is not None else []
    return optimizer, extra


def save_train_state(model: keras.Model, path: str | Path, *, epoch: int) -> Path:
    """Write ``train_state.npz``: the optimizer's variables (Adagrad accumulators, Adam moments, the
    step count), the seed generators' states, and the epoch they belong to (1-based, last one trained).

    With these and the model's weights, training after ``epoch`` continues as an uninterrupted run
    would: the batches and augmentation of every epoch are keyed by the seed and the epoch number
    (:func:`train_batches`), so they need no state of their own.
    """
    optimizer, extra = _state_variables(model)
    arrays = {f"optimizer_{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer)}
    arrays.update({f"model_{i}": np.asarray(v.numpy()) for i, v in enumerate(extra)})
    arrays["epoch"] = np.asarray(epoch)
    arrays["optimizer_paths"] = np.asarray([v.path for v in optimizer], dtype=str)
    arrays["model_paths"] = np.asarray([v.path for v in extra], dtype=str)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    return Path(path)


def restore_train_state(model: keras.Model, path: str | Path, *, optimizer: bool = True,
                        epoch: int | None = None) -> bool:
    """Put a :func:`save_train_state` file's values back into a compiled ``model``.

    Args:
        optimizer: Also the optimizer's variables (False at a phase boundary, where an uninterrupted run
            starts a new optimizer too).
        epoch: The epoch of the model the state goes with; a state of another epoch is not used.

    Returns:
        Whether the optimizer's state was restored: False when the saved one does not fit this optimizer
        (another optimizer type or mixed-precision setting), which is logged; training then continues
        with a fresh optimizer, as resumes did before training states were saved.
    """
    with np.load(path) as data:
        saved = {key: data[key] for key in data.files}
    if epoch is not None and int(saved["epoch"]) != epoch:
        log.warning("%s: a training state of epoch %d beside a model of epoch %d; not used (the resumed stage "
                    "starts its optimizer afresh)", path, int(saved["epoch"]), epoch)
        return False
    optimizer_vars, extra = _state_variables(model)
    model_values = [saved[f"model_{i}"] for i in range(len(saved["model_paths"]))]
    if [tuple(v.shape) for v in extra] == [tuple(a.shape) for a in model_values]:
        for variable, value in zip(extra, model_values):
            variable.assign(value)
    else:
        log.warning("%s: the saved seed-generator states (%d) do not fit this model (%d); dropout draws "
                    "restart", path, len(model_values), len(extra))
    if not optimizer:
        return False
    values = [saved[f"optimizer_{i}"] for i in range(len(saved["optimizer_paths"]))]
    if [tuple(v.shape) for v in optimizer_vars] != [tuple(a.shape) for a in values]:
        log.warning("%s: the saved optimizer state (%d variables) does not fit this optimizer (%d); the "
                    "resumed stage starts its optimizer afresh", path, len(values), len(optimizer_vars))
        return False
    for variable, value in zip(optimizer_vars, values):
        variable.assign(value)
    averaging = averaging_optimizer(model)
    if averaging is not None:
        # saved inside `averaged` (BestModelSaver): the model file holds the average, the state the raw weights
        swap_average(averaging)
    return True


@dataclass(frozen=True)
class StageResult:
    """What :func:`fit_stage` returns; the model itself is in ``checkpoint`` (``load_checkpoint``)."""

    checkpoint: Path
    stage: int
    monitor: str
    best_epoch: int
    best_metrics: dict[str, float]
    history: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class StageState:
    """One stage between :func:`start_stage` and :func:`finish_stage`: what a step runner trains and fills in.

    The runner (``fit_stage``'s Keras ``fit``, or ``msbt.train.distributed``'s custom step) trains
    ``model`` for each of :meth:`phases`, calls ``saver`` at every epoch end and appends every epoch's
    logs to ``history``; setup and teardown are the same for one worker and many.
    """

    stage: StageConfig
    out_dir: Path
    class_names: list[str]
    model: keras.Model
    saver: BestModelSaver
    history: dict[str, list[float]]
    done: int  # epochs already trained (a resumed stage)
    parent: str | Path | None
    data_fingerprint: str
    split_id: str
    train_state: Path | None = None  # a resumed checkpoint's train_state.npz, put back by resume_phase
    number: int | None = None  # the stage's number, for its manifest (None: counted from the parent)
    seed: int | None = None  # the training seed, for its manifest

    def phases(self) -> list[Phase]:
        """The stage's phases still to run, the first one cut to start after the epochs already done."""
        return [dataclasses.replace(p, first_epoch=max(p.first_epoch, self.done))
                for p in plan_phases(self.stage) if p.last_epoch > self.done]

    def resume_phase(self, phase: Phase) -> None:
        """After a phase's ``compile_model``: the first phase of a resumed stage gets the checkpoint's
        training state back (its optimizer's too when the checkpoint lies inside this phase; at a
        phase boundary an uninterrupted run starts a new optimizer as well). Once per stage."""
        if self.train_state is None or phase.first_epoch != self.done:
            return
        inside = any(p.first_epoch < self.done < p.last_epoch for p in plan_phases(self.stage))
        restore_train_state(self.model, self.train_state, optimizer=inside, epoch=self.done)
        self.train_state = None


def start_stage(
    stage: StageConfig,
    *,
    class_names: Sequence[str],
    out_dir: str | Path,
    seed: int = 0,
    parent: str | Path | None = None,
    data_fingerprint: str = "",
    split_id: str = "",
    resume_from: str | Path | None = None,
    number: int | None = None,
) -> StageState:
    """Set a stage up: its folder (an old manifest removed), the seeded model and the best-model saver.

    Call it inside a distribution strategy's scope when there is one, so the model's variables are
    the strategy's. Arguments are those of :func:`fit_stage`.

    Returns:
        A :class:`StageState`; ``done`` is the resumed checkpoint's ``best_epoch`` (0 for a new stage).

    Raises:
        CheckpointError: A parent that is not a verified stage-1 checkpoint with the same backbone, or a
            ``resume_from`` checkpoint of another stage config or other classes.
        ValueError: A parent given without ``weights="parent"``, or missing with it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # a half-finished run is never a checkpoint
    keras.utils.set_random_seed(seed)  # the same initial weights on every worker
    saver = BestModelSaver(out_dir / MODEL_FILE, stage.monitor)
    history: dict[str, list[float]] = {}
    done = 0
    if resume_from is None:
        model = build_model(stage, len(class_names), _open_parent(stage, parent))
    else:
        if parent is not None:
            check_parent(parent, stage)
        model, done = _resume(resume_from, stage, class_names, saver, history)
    state = StageState(stage, out_dir, list(class_names), model, saver, history, done, parent,
                       data_fingerprint, split_id, number=number, seed=seed)
    if resume_from is not None:
        state.train_state = _resumed_train_state(resume_from, out_dir)
    return state


def finish_stage(state: StageState) -> StageResult:
    """Write the stage's manifest beside its best model and return the result.

    Raises:
        RuntimeError: ``stage.monitor`` never had a finite value (no checkpoint written).
    """
    saver, stage = state.saver, state.stage
    if saver.best_epoch is None:
        raise RuntimeError(f"{stage.monitor} was never finite; no checkpoint written to {state.out_dir}")
    manifest = write_manifest(
        state.out_dir,
        stage_config=stage,
        class_names=state.class_names,
        metrics=saver.best_logs,
        best_epoch=saver.best_epoch,
        history=state.history,
        parent=state.parent,
        data_fingerprint=state.data_fingerprint,
        split_id=state.split_id,
        number=state.number,
        seed=state.seed,
    )
    return StageResult(state.out_dir, manifest["stage"], stage.monitor, saver.best_epoch, saver.best_logs,
                       state.history)


def fit_stage(
    stage: StageConfig,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset | None,
    *,
    class_names: Sequence[str],
    out_dir: str | Path,
    seed: int = 0,
    parent: str | Path | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    data_fingerprint: str = "",
    split_id: str = "",
    shuffle_buffer: int | None = None,
    verbose: int = 0,
    resume_from: str | Path | None = None,
    number: int | None = None,
) -> StageResult:
    """Train one stage and write its checkpoint folder (``model.keras`` + ``manifest.json``).

    :func:`start_stage`, then each phase with Keras ``fit``, then :func:`finish_stage`.

    Args:
        stage: The stage's config (stage 1 and stage 2 differ only here).
        train_ds: ``(uint8 image, int label)`` examples (see :func:`dataset_from_arrays`).
        val_ds: Same form, or None (then ``stage.monitor`` must be a training metric).
        class_names: In label order; 2 names -> one sigmoid unit.
        out_dir: The checkpoint folder (created; an old manifest there is removed first).
        seed: Seeds weights of new layers, dropout, shuffling and augmentation.
        parent: Stage-1 checkpoint folder; required iff ``stage.weights == "parent"``.
        callbacks: Extra Keras callbacks (e.g. a Ray Train report callback); they run after the saver.
        data_fingerprint: Recorded in the manifest.
        split_id: Recorded in the manifest.
        shuffle_buffer: See :func:`train_batches`.
        verbose: Keras ``fit`` verbosity.
        resume_from: A checkpoint folder of this same stage (e.g. one a Ray Train worker reported):
            training continues after its ``best_epoch`` with its model, best score, history and
            training state (optimizer, seed generators: ``train_state.npz``), so in deterministic mode
            it ends as an uninterrupted run does. Its config must equal ``stage`` except ``epochs``.
        number: The stage's number for its manifest (msbt.model.checkpoint.write_manifest); default:
            counted from the parent (1 without one).

    Returns:
        A :class:`StageResult` with the best epoch's metrics and the full history.

    Raises:
        CheckpointError: A parent that is not a verified stage-1 checkpoint with the same backbone.
        RuntimeError: ``stage.monitor`` never had a finite value (no checkpoint written).
    """
    state = start_stage(stage, class_names=class_names, out_dir=out_dir, seed=seed, parent=parent,
                        data_fingerprint=data_fingerprint, split_id=split_id, resume_from=resume_from,
                        number=number)
    for phase in state.phases():
        _run_phase(state, phase, train_ds, val_ds, [state.saver, *callbacks], seed, shuffle_buffer, verbose)
    return finish_stage(state)


def _resume(path, stage: StageConfig, class_names, saver: BestModelSaver, history: dict) -> tuple[keras.Model, int]:
    """Model, best score, history and epoch count of a checkpoint of this stage; its model goes to the saver's path."""
    model, manifest = load_checkpoint(path)
    theirs, ours = dict(manifest["config"]), to_dict(stage)
    theirs.pop("epochs", None), ours.pop("epochs", None)
    if theirs != ours or manifest["class_names"] != list(class_names):
        raise CheckpointError(f"{path}: trained with another stage config or classes; cannot resume this stage from it")
    done = int(manifest["best_epoch"])
    saver.best, saver.best_epoch = float(manifest["metrics"][stage.monitor]), done
    saver.best_logs = {k: float(v) for k, v in manifest["metrics"].items()}
    shutil.copyfile(Path(path) / MODEL_FILE, saver.path)  # kept if no later epoch improves on it
    history.update({k: [float(x) for x in v][:done] for k, v in manifest.get("history", {}).items()})
    return model, done


def _resumed_train_state(checkpoint: str | Path, out_dir: Path) -> Path | None:
    """The checkpoint's verified training state, copied beside the model the saver starts from (kept if
    no later epoch improves). None for a checkpoint without one: its resume restarts the optimizer."""
    source = train_state_file(checkpoint)
    target = out_dir / TRAIN_STATE_FILE
    if source is None:
        target.unlink(missing_ok=True)
        log.warning("%s: no training state in this checkpoint (written by an older msbt); the resumed "
                    "stage starts its optimizer afresh", checkpoint)
        return None
    shutil.copyfile(source, target)
    return target


def _open_parent(stage: StageConfig, parent: str | Path | None) -> keras.Model | None:
    """The parent checkpoint's model for ``weights="parent"``; refuse any other combination."""
    if stage.weights != "parent":
        if parent is not None:
            raise ValueError(f"a parent checkpoint was given but stage.weights is {stage.weights!r}, not 'parent'")
        return None
    if parent is None:
        raise ValueError("stage.weights is 'parent' but no parent checkpoint was given")
    check_parent(parent, stage)
    return load_checkpoint(parent)[0]


def _run_phase(state: StageState, phase, train_ds, val_ds, callbacks, seed, shuffle_buffer, verbose):
    """Set what trains, recompile (needed after changing `trainable`), fit, and append the history."""
    model, stage, history = state.model, state.stage, state.history
    set_backbone_trainable(model, phase.backbone_trains, stage.fine_tune_layers, batchnorm_frozen(stage))
    compile_model(model, stage, phase.learning_rate)
    state.resume_phase(phase)
    num_classes = 2 if is_binary(model) else model.get_layer("predictions").units
    train, steps = train_batches(
        train_ds,
        stage,
        num_classes=num_classes,
        seed=seed,
        first_epoch=phase.first_epoch,
        last_epoch=phase.last_epoch,
        shuffle_buffer=shuffle_buffer,
    )
    val = eval_batches(val_ds, stage, num_classes=num_classes) if val_ds is not None else None
    fitted = model.fit(
        train,
        validation_data=val,
        initial_epoch=phase.first_epoch,
        epochs=phase.last_epoch,
        steps_per_epoch=steps,
        callbacks=[*averaging_callbacks(stage), *callbacks],
        shuffle=False,  # train_batches shuffles (seeded); Keras cannot shuffle a tf.data dataset
        verbose=verbose,
    )
    for key, values in fitted.history.items():
        history.setdefault(key, []).extend(float(v) for v in values)
