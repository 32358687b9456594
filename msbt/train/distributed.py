"""Data-parallel training of one stage across Ray Train workers: a custom loop under the multi-worker strategy.

:func:`fit_stage_distributed` is :func:`msbt.train.loop.fit_stage` for ``run.num_workers > 1``. It takes
the same arguments, runs the same phases (:func:`msbt.train.loop.plan_phases`), the same input pipeline
(:func:`msbt.train.loop.train_batches` / :func:`msbt.train.loop.eval_batches`), the same compiled optimizer
(:func:`msbt.model.compiled.compile_model`), the same :class:`msbt.train.loop.BestModelSaver` and extra Keras
callbacks (the Ray report callback of ``msbt.train.runner``), and the same setup and teardown
(:func:`msbt.train.loop.start_stage`, :func:`msbt.train.loop.finish_stage`); only the loop that feeds
batches to the model is its own.

Why not ``model.fit``. Keras 3 ``fit`` under ``tf.distribute.MultiWorkerMirroredStrategy`` fails inside
Keras' own step machinery (keras-team/keras#20585, ray-project/ray#47464: ``PerReplica`` values reach
``_maybe_symbolic_build``, then ``Invalid reduction dimension`` in ``reduce_per_replica``). Patching those
internals worked but is fragile across Keras releases. A ``tf.function`` step run with ``strategy.run``
uses only public TensorFlow and Keras APIs: the model's forward pass, a ``GradientTape``, and the
optimizer's ``apply_gradients``, which sums the gradients of all replicas (an all-reduce) before one
identical update on every worker.

The arithmetic of one step. The global batch is ``stage.batch_size``; each of the ``W`` workers feeds
``stage.batch_size // W`` examples of its own shard (the training set is split into equal shards, by Ray
Data or by the workers themselves, ``msbt.train.runner.shard_arrays``: each worker gets different rows).
Replica ``r`` computes ``sum(per-example loss on its rows) / N`` where ``N`` is the number of rows in the
whole step (an all-reduced count, so a short last batch is weighted exactly); the all-reduced sum of the
replicas' gradients is then the gradient of the global-batch mean loss, the same quantity a single process
computes on the whole batch. Regularisation penalties are the same on every replica, so each adds ``1/W``
of them.

Every worker must run the same number of steps, or the all-reduce of the longer one waits forever:
each worker computes its shard's steps per epoch, the workers gather them and all use the smallest.

BatchNorm. Keras' BatchNormalization updates its moving mean/variance from the local batch only, so the
workers' statistics drift apart (measured: trainable weights identical, moving statistics not). The
moving averages are linear in the batch statistics, so averaging the workers' moving statistics at the
end of each epoch gives exactly the average of the per-step updates; :func:`sync_non_trainable` does that
(one all-reduce of the non-trainable weights per epoch) before validation and saving, so all ranks hold
identical models.

Metrics. Training metrics (``loss, accuracy, auc, sensitivity, specificity``) are computed on the global
batch: each step gathers every replica's labels and predictions (a few numbers per example) and updates
metric objects that live outside the strategy, identically on every worker. Validation is not split:
``msbt.train.runner`` gives every worker the whole validation set (``DataConfig(datasets_to_split=["train"])``)
and each evaluates it locally with the same weights, so every rank reports the same ``val_*`` values and
every rank's saver makes the same decision.

Mixed precision. Under the ``mixed_float16`` policy ``compile_model`` wraps the optimizer in Keras'
``LossScaleOptimizer``; the loop scales the loss with it. That optimizer checks the *local* gradients
for inf/NaN before its inner optimizer all-reduces them; workers that disagreed would take different
branches and deadlock the collective, so the loop first agrees on one finiteness flag (an all-reduce of
one number) and poisons every worker's gradients when any worker's are not finite.

Assumes one replica per worker (a CPU worker, or a worker with one GPU: ``use_gpu`` with the default
one GPU per worker); a worker holding several GPUs is refused, since the input pipeline feeds one batch
per worker per step.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from msbt.train import loop
from msbt.config import StageConfig
from msbt.model import compiled
from msbt.model.models import batchnorm_frozen, is_binary, set_backbone_trainable

SUM = tf.distribute.ReduceOp.SUM
MEAN = tf.distribute.ReduceOp.MEAN


def set_cpu_threads(threads: int) -> None:
    """Limit TensorFlow's thread pools (several workers share one host's cores).

    Must run before TensorFlow executes its first op in this process; later it is too late and only
    warned about (the pools keep their size).

    Args:
        threads: Threads for intra-op parallelism; inter-op gets 1 (the step is one big graph).
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, int(threads)))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError as err:  # the runtime is already initialised
        import logging

        logging.getLogger(__name__).warning("could not set TensorFlow thread counts: %s", err)


def set_mixed_precision(enabled: bool) -> None:
    """Set Keras' global dtype policy: ``mixed_float16`` (float32 variables, float16 compute) or float32.

    The classifier (``predictions``) keeps float32 compute (``msbt.model.models``), so the probabilities and
    the loss are float32; ``compile_model`` then wraps the optimizer in a ``LossScaleOptimizer``.
    """
    keras.mixed_precision.set_global_policy("mixed_float16" if enabled else "float32")


def weights_digest(model: keras.Model) -> str:
    """sha256 of every weight of a model (trainable and not), in order: equal digests = equal models."""
    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def sync_non_trainable(strategy: tf.distribute.Strategy, model: keras.Model):
    """A function that averages the model's floating non-trainable weights (BatchNorm moving statistics)
    across workers; call it on every worker at the same point (it is a collective).

    Frozen weights are equal on every worker, and the mean of equal values is that value exactly, so
    only the statistics that drifted change. Returned rather than run, so one phase traces it once.
    """
    variables = [w for w in model.non_trainable_weights if w.dtype.startswith("float")]

    def mean_values():
        ctx = tf.distribute.get_replica_context()
        return ctx.all_reduce(MEAN, [tf.identity(v.value) for v in variables])

    @tf.function
    def sync():
        # Assigned in the cross-replica context: a mirrored variable then takes the value on every device.
        means = strategy.run(mean_values)
        for variable, mean in zip(variables, means):
            variable.value.assign(strategy.experimental_local_results(mean)[0])

    return sync if variables else (lambda: None)


def gather_min(strategy: tf.distribute.Strategy, value: int) -> int:
    """The smallest of one integer per worker, known to every worker (a collective: all must call it)."""
    values = strategy.gather(strategy.run(lambda: tf.constant([value], tf.int64)), axis=0)
    return int(tf.reduce_min(values))


class _Loop:
    """The tf.function steps of one phase: model, optimizer, loss and metrics bound once."""

    def __init__(self, strategy, model: keras.Model, num_classes: int):
        self.strategy, self.model = strategy, model
        self.optimizer = model.optimizer
        self.scaled = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        binary = num_classes == 2
        # reduction=None: per-example losses; the step divides by the global row count itself.
        cls = keras.losses.BinaryCrossentropy if binary else keras.losses.CategoricalCrossentropy
        self.loss_fn = cls(reduction=None)
        # Outside the strategy's scope: plain variables, updated with the gathered global batch.
        self.train_metrics = [keras.metrics.Mean(name="loss"), *compiled.stage_metrics(num_classes)]
        self.val_metrics = [keras.metrics.Mean(name="loss"), *compiled.stage_metrics(num_classes)]
        self.train_step = tf.function(self._train_step, reduce_retracing=True)
        self.eval_step = tf.function(self._eval_step, reduce_retracing=True)
        self.sync = sync_non_trainable(strategy, model)

    def _replica_step(self, x, y, *weight):
        ctx = tf.distribute.get_replica_context()
        rows = ctx.all_reduce(SUM, tf.cast(tf.shape(y)[0], tf.float32))
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            pred = self.model(x, training=True)
            per_row = self.loss_fn(y, pred)
            if weight:  # stage.balance: as Keras weighs a loss, summed with the weights, over the row count
                per_row = per_row * tf.cast(weight[0], per_row.dtype)
            data_loss = tf.reduce_sum(per_row) / rows
            penalty = tf.add_n(self.model.losses) if self.model.losses else tf.constant(0.0)
            loss = data_loss + penalty / ctx.num_replicas_in_sync
            scaled = self.optimizer.scale_loss(loss) if self.scaled else loss
        grads = tape.gradient(scaled, variables)
        if self.scaled:
            grads = self._agree_on_finite(ctx, grads)
        self.optimizer.apply_gradients(zip(grads, variables))
        return y, pred, ctx.all_reduce(SUM, data_loss), penalty, rows

    @staticmethod
    def _agree_on_finite(ctx, grads):
        local_bad = tf.cast(
            tf.logical_not(tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])),
            tf.float32,
        )
        poison = tf.where(ctx.all_reduce(SUM, local_bad) > 0, float("nan"), 0.0)
        return [None if g is None else g + tf.cast(poison, g.dtype) for g in grads]

    def _train_step(self, x, y, *weight):
        y, pred, data_loss, penalty, rows = self.strategy.run(self._replica_step, args=(x, y, *weight))
        local = self.strategy.experimental_local_results
        y_all = self.strategy.gather(y, axis=0)
        pred_all = tf.cast(self.strategy.gather(pred, axis=0), tf.float32)
        loss, rows = local(data_loss)[0] + local(penalty)[0], local(rows)[0]
        self.train_metrics[0].update_state(loss, sample_weight=rows)
        for metric in self.train_metrics[1:]:
            metric.update_state(y_all, pred_all)
        return rows

    def _eval_step(self, x, y):
        pred = tf.cast(self.model(x, training=False), tf.float32)
        loss = tf.reduce_mean(self.loss_fn(y, pred))
        if self.model.losses:
            loss += tf.add_n(self.model.losses)
        self.val_metrics[0].update_state(loss, sample_weight=tf.shape(y)[0])
        for metric in self.val_metrics[1:]:
            metric.update_state(y, pred)

    def evaluate(self, batches: tf.data.Dataset) -> dict[str, float]:
        for metric in self.val_metrics:
            metric.reset_state()
        for x, y in batches:
            self.eval_step(x, y)
        return {f"val_{m.name}": float(m.result()) for m in self.val_metrics}


@dataclasses.dataclass
class Audit:
    """What one worker did, for tests and logs: proof that the data was split and the weights agree."""

    rank: int = 0
    world_size: int = 1
    local_batch: int = 0
    global_batch: int = 0
    steps_per_epoch: list[int] = dataclasses.field(default_factory=list)
    examples: int = 0  # training examples this worker fed (all epochs)
    max_step_rows: int = 0  # the largest all-reduced row count of a step: the global batch really run
    labels_sha256: str = ""  # of the labels this worker fed, in order
    label_counts: list[int] = dataclasses.field(default_factory=list)  # per class, all epochs
    pixel_sum: float = 0.0  # of the images this worker fed
    initial_weights: str = ""
    final_weights: str = ""

    def __post_init__(self):
        self._labels = hashlib.sha256()  # running digest behind labels_sha256

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def record_step(self, x, y, rows) -> None:
        """Account one training step's local batch ``(x, y)`` and its all-reduced row count."""
        labels = y.numpy()
        self.examples += len(labels)
        self.max_step_rows = max(self.max_step_rows, int(rows))
        self.pixel_sum += float(tf.reduce_sum(tf.cast(x, tf.float64)))
        self._labels.update(np.ascontiguousarray(labels).tobytes())
        self.labels_sha256 = self._labels.hexdigest()
        index = labels.argmax(-1) if labels.shape[-1] > 1 else labels.reshape(-1).round().astype(int)
        counts = np.bincount(index, minlength=max(2, labels.shape[-1]))
        self.label_counts = (np.asarray(self.label_counts or np.zeros_like(counts)) + counts).tolist()


def fit_stage_distributed(
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
    strategy: tf.distribute.Strategy | None = None,
    audit: Audit | None = None,
    number: int | None = None,
) -> loop.StageResult:
    """Train one stage data-parallel across the strategy's workers; arguments as :func:`msbt.train.loop.fit_stage`.

    Every worker calls this with its own shard as ``train_ds`` and the whole validation set as
    ``val_ds``; every worker ends with the same model and writes the same checkpoint into its own
    ``out_dir``.

    Args:
        stage, train_ds, val_ds, class_names, out_dir, seed, parent, callbacks, data_fingerprint,
            split_id, shuffle_buffer, verbose, resume_from, number: As for ``fit_stage``; ``stage.batch_size`` is
            the global batch. ``seed`` seeds the weights identically on every worker; worker ``r`` keys
            its shuffling and augmentation with ``seed + r`` (its shard is other images anyway).
        strategy: A ``MultiWorkerMirroredStrategy`` (created before any other TensorFlow op of the
            process); default: one is created from ``TF_CONFIG``.
        audit: Filled in with what this worker fed and its weight digests (costs a little per step).

    Returns:
        A :class:`msbt.train.loop.StageResult`.

    Raises:
        ValueError: A worker with several replicas, or a global batch smaller than the worker count.
        RuntimeError: ``stage.monitor`` never had a finite value.
    """
    strategy = strategy or tf.distribute.MultiWorkerMirroredStrategy()
    workers, rank = _world(strategy)
    if strategy.num_replicas_in_sync != workers:
        raise ValueError(
            f"{strategy.num_replicas_in_sync} replicas on {workers} workers: the multi-worker loop feeds one "
            f"batch per worker; give each worker one GPU (or none)"
        )
    if stage.batch_size < workers:
        raise ValueError(f"batch_size {stage.batch_size} (global) cannot be split across {workers} workers")
    with strategy.scope():  # the model's variables are the strategy's
        state = loop.start_stage(stage, class_names=class_names, out_dir=out_dir, seed=seed, parent=parent,
                                 data_fingerprint=data_fingerprint, split_id=split_id, resume_from=resume_from,
                                 number=number)
    if audit is not None:
        audit.rank, audit.world_size = rank, workers
        audit.initial_weights = weights_digest(state.model)
    hooks = keras.callbacks.CallbackList([state.saver, *callbacks], model=state.model)
    hooks.on_train_begin()
    local_stage = dataclasses.replace(stage, batch_size=stage.batch_size // workers)
    for phase in state.phases():
        _run_phase(strategy, state, phase, local_stage, train_ds, val_ds, hooks, seed + rank, shuffle_buffer,
                   verbose and rank == 0, audit)
    hooks.on_train_end()
    if audit is not None:
        audit.local_batch, audit.global_batch = local_stage.batch_size, local_stage.batch_size * workers
        audit.final_weights = weights_digest(state.model)
    return loop.finish_stage(state)


def _world(strategy) -> tuple[int, int]:
    """(number of workers, this worker's index) from the strategy's cluster resolver."""
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    workers = len(spec.get("worker", [])) + len(spec.get("chief", [])) or 1
    return workers, int(getattr(resolver, "task_id", 0) or 0)


def _run_phase(strategy, state: loop.StageState, phase, local_stage, train_ds, val_ds, hooks, data_seed,
               shuffle_buffer, verbose, audit):
    """Set what trains, recompile inside the scope, then run the phase's epochs step by step."""
    model, stage, history = state.model, state.stage, state.history
    set_backbone_trainable(model, phase.backbone_trains, stage.fine_tune_layers, batchnorm_frozen(stage))
    num_classes = 2 if is_binary(model) else model.get_layer("predictions").units
    with strategy.scope():
        # compile_model builds the optimizer, here in the scope: built lazily inside the replica step it
        # would create its variables there.
        compiled.compile_model(model, stage, phase.learning_rate)
        state.resume_phase(phase)  # a resumed stage's optimizer state, on every replica
    steps = _Loop(strategy, model, num_classes)
    val = loop.eval_batches(val_ds, stage, num_classes=num_classes) if val_ds is not None else None
    for epoch in range(phase.first_epoch, phase.last_epoch):
        batches, local_steps = loop.train_batches(
            train_ds, local_stage, num_classes=num_classes, seed=data_seed, first_epoch=epoch,
            last_epoch=epoch + 1, shuffle_buffer=shuffle_buffer,
        )
        count = gather_min(strategy, local_steps)  # every worker the same count, or the all-reduce hangs
        hooks.on_epoch_begin(epoch)
        for metric in steps.train_metrics:
            metric.reset_state()
        for batch in batches.take(count):  # (x, y) or (x, y, loss weight)
            rows = steps.train_step(*batch)
            if audit is not None:
                audit.record_step(batch[0], batch[1], rows)
        steps.sync()
        logs = {m.name: float(m.result()) for m in steps.train_metrics}
        if val is not None:
            with compiled.averaged(model):  # stage.ema: validated as the average, as model.fit does (ValidateAverage)
                logs.update(steps.evaluate(val))
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
        if audit is not None:
            audit.steps_per_epoch.append(count)
        if verbose:
            print(f"epoch {epoch + 1}/{stage.epochs} " + " ".join(f"{k}={v:.4f}" for k, v in logs.items()), flush=True)
        hooks.on_epoch_end(epoch, logs)
    # as model.fit ends: with stage.ema the next phase starts from the average
    model.optimizer.finalize_variable_values(model.trainable_variables)


__all__ = [
    "Audit",
    "fit_stage_distributed",
    "gather_min",
    "set_cpu_threads",
    "set_mixed_precision",
    "sync_non_trainable",
    "weights_digest",
]
