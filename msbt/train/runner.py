"""Ray Train layer: one stage = one Ray Train ``DataParallelTrainer`` run of :func:`msbt.train.loop.fit_stage` (one
worker) or :func:`msbt.train.distributed.fit_stage_distributed` (several workers, data parallel).

Three layers, as in Ray's own examples:

* :func:`train_loop_per_worker` runs inside each Train worker with the stage's :class:`LoopConfig`
  (a frozen dataclass of plain fields): it turns its dataset shards into tf.data, calls ``fit_stage``
  (or the multi-worker loop) with a :func:`report_callback` and opens the parent (stage 2) and resume
  checkpoints with ``as_directory()``;
* :func:`train_stage` builds ``ScalingConfig``/``RunConfig``/datasets from a msbt ``Config`` and a store,
  runs the trainer and returns its ``ray.train.Result``;
* :func:`best_checkpoint` picks the checkpoint that stage 2 starts from.

Workers (issue #5; ``docs/training.md``). One worker (``run.num_workers: 1``) runs ``fit_stage``, i.e.
Keras ``model.fit``: on a CPU box that is the fast configuration (two workers measured slower, 9-11 vs
28 img/s). More workers run :func:`msbt.train.distributed.fit_stage_distributed`, a custom ``tf.function``
step under ``MultiWorkerMirroredStrategy`` (``TF_CONFIG`` comes from :mod:`msbt.train.tfbackend`), because
Keras 3 ``model.fit`` under that strategy fails (keras-team/keras#20585, ray-project/ray#47464; see
STACK-NOTES): gradients are all-reduced, the global batch ``stage.batch_size`` is split across the
workers, and every worker ends with the same weights. Only the training set is split across workers;
every worker validates on the whole validation set, so all ranks report the same ``val_*`` values. With
several workers, TensorFlow's thread pools are limited to the worker's CPUs (``cpus_per_worker``), so
workers on one host do not oversubscribe its cores. ``run.mixed_precision`` sets Keras'
``mixed_float16`` policy in every worker (for GPUs; the classifier stays float32).

Checkpoints. Each epoch every rank calls ``ray.train.report(metrics)``; when ``stage.monitor`` improved,
rank 0 attaches a checkpoint in the msbt format: the ``model.keras`` that ``fit_stage``'s saver just
wrote plus a ``manifest.json`` for that epoch (stage, parent link and hash, best epoch, history so far).
It is staged in a folder of its own (in ``runs/<name>/.work/stage<n>/``, see :func:`work_folder`), so the stage folder never holds a manifest before ``fit_stage``
finishes (a manifest there means "finished"). Ray keeps ``run.checkpoints_to_keep`` of them, best by
``stage.monitor``. The parent link records the parent's path as seen by the worker: with local (or
shared) storage that is the persisted Ray checkpoint folder, so ``msbt.model.checkpoint.lineage`` follows it.

Resume. After a worker restart (``FailureConfig.max_failures``), ``ray.train.get_checkpoint()`` is the
last reported checkpoint, i.e. the best model so far and its epoch; ``train_stage(resume_from=...)``
gives one explicitly (Train V2 refuses a trainer's ``resume_from_checkpoint``, so it travels
in the :class:`LoopConfig`). ``fit_stage(resume_from=<checkpoint folder>)`` continues after that
epoch with the checkpoint's training state (``train_state.npz``: optimizer, seed generators), so a
resumed stage continues as an uninterrupted one would (docs/training.md).

Data. A store whose rows fit in :data:`DRIVER_READ_BYTES` (every ultrasound collection named in the paper
and data README, the built-in data, a test's) is read on the driver with pyarrow and put in Ray's object
store once per split; the workers take its Arrow tables from there and Ray Train is given no Ray Datasets,
so a stage starts no ``DatasetManager`` actor and runs no Ray Data task (:func:`stage_trainer`). A larger
store is read with Ray Data, filtered by split and materialised on the driver before the trainer starts: on 2
CPUs a Train worker holding a CPU starved streaming read tasks (STACK-NOTES). The training set is split into
equal shards, one per worker (Ray Data's split, or for the tables rows ``rank, rank + W, ...``); the
validation set is given whole to every worker. Each worker then copies its shard into memory once (uint8;
e.g. 10 000 patches of 200x200x3 = 1.2 GB) rather than re-reading it every epoch; ``fit_stage``'s exact
shuffle holds the whole training set in its buffer anyway.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from msbt.atomicio import write_text
from msbt.train import tblog
from msbt.model.checkpoint import MODEL_FILE, TRAIN_STATE_FILE, sha256_file, write_manifest
from msbt.config import Config, RunConfig, StageConfig, batchnorm_warning, training_seed
from msbt.containment import check_run_name, check_storage_path, run_location
from msbt.data.balance import cell_weights, describe, row_weights
from msbt.data.store import Store, decode_images

log = logging.getLogger(__name__)

HISTORY_FILE = "history.json"

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s) and
# takes several polls to see a run end and to wind its workers down: about 5 s after the last epoch of
# every stage and every Tune trial (benchmarks/stage_startup.py: wind-down 5.0-5.1 s at 2 s, 0.9-1.2 s at
# 0.25 s; docs/training.md). A poll is one small actor call per worker, and a late answer is not a failure
# (only one hanging for RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 minutes, is), so msbt polls more often
# unless the user set the variable (kept for the process: set_train_poll).
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.25"
WORKER_NICENESS_ENV = "RAY_worker_niceness"  # a Ray worker reads it at start and lowers its priority by that much

# ---------------------------------------------------------------------------------------------------
# Inside a worker


def shard_arrays(shard, shape: tuple[int, ...], batch_size: int = 512, *, ordered: bool = False,
                 rank: int = 0, world: int = 1, sites: bool = False) -> tuple[np.ndarray, ...]:
    """Copy a dataset shard (columns ``image``, ``label_index``) into memory once.

    Args:
        shard: A ``ray.data.DataIterator`` (``ray.train.get_dataset_shard(...)``), a ``ray.data.Dataset``, or
            a list of ``pyarrow.Table`` (a small store's split, :func:`split_tables`).
        shape: Every image's shape (``Store.open(path).image_shape``).
        batch_size: Rows per Arrow batch while copying.
        ordered: ``run.deterministic``: the shard carries the ``source`` (and ``box``) columns and its rows
            are sorted by them (Ray Data's block order may differ between runs).
        rank, world: This worker keeps rows ``rank, rank + world, ...`` (after sorting, if ``ordered``;
            otherwise of the first ``len - len % world`` rows, so that every worker has as many as Ray Data's
            equal split would give it); ``world`` > 1 only for a shard that holds the whole split
            (deterministic mode, or a small store's tables), not for one Ray Data already split.
        sites: Also each row's ``site`` (the shard must carry the column).

    Returns:
        ``(images uint8 (N, *shape), labels int64 (N,))``, and ``sites (N,)`` strings with ``sites``.
    """
    images, labels, keys, where = [], [], [], []
    if isinstance(shard, list):
        batches = (b for table in shard for b in table.to_batches(max_chunksize=batch_size))
    else:
        batches = shard.iter_batches(batch_size=batch_size, batch_format="pyarrow")
    for batch in batches:
        images.append(decode_images(batch["image"], shape))  # a view; concatenate copies it out
        labels.append(np.asarray(batch["label_index"].to_numpy(), np.int64))
        if ordered:
            keys.append(row_keys(batch))
        if sites:
            where.append(np.asarray(batch["site"].to_pylist(), dtype=object))
    if not images:
        empty = (np.zeros((0, *shape), np.uint8), np.zeros(0, np.int64))
        return (*empty, np.zeros(0, object)) if sites else empty
    out = [np.concatenate(images), np.concatenate(labels)] + ([np.concatenate(where)] if sites else [])
    if ordered:
        order = np.argsort(np.concatenate(keys), kind="stable")[rank::world]
        out = [a[order] for a in out]
    elif world > 1:  # equal shards, as Ray Data's split gives them: the last len % world rows sit out
        # (a copy: a strided view would keep the whole split's arrays alive in every worker)
        out = [np.ascontiguousarray(a[:len(a) - len(a) % world][rank::world]) for a in out]
    return tuple(out)


def row_keys(batch) -> np.ndarray:
    """One sortable key per row: the source file and, for a patch, its box in the field (unique per row)."""
    sources = [str(s) for s in batch["source"].to_pylist()]
    if "box" in batch.column_names:
        boxes = batch["box"].to_pylist()
        return np.array([f"{s}\t{b[1]:06d}\t{b[0]:06d}" for s, b in zip(sources, boxes)], dtype=object)
    return np.array(sources, dtype=object)


def report_callback(
    out_dir: str | Path,
    stage: StageConfig,
    class_names: Sequence[str],
    *,
    parent: str | Path | None = None,
    data_fingerprint: str = "",
    split_id: str = "",
    history: dict[str, list[float]] | None = None,
    staging_dir: str | Path | None = None,
    history_file: str | Path | None = None,
    number: int | None = None,
    seed: int | None = None,
):
    """A Keras callback that calls ``ray.train.report`` at the end of every epoch.

    It must run after ``fit_stage``'s ``BestModelSaver`` (``fit_stage`` puts extra callbacks after it).
    An improvement is seen as a changed ``model.keras`` (its sha256), so the rule that decides it stays
    the saver's alone. Rank 0 then reports a staged msbt checkpoint of that epoch; other ranks (and
    epochs without an improvement) report ``checkpoint=None``: every rank must report every epoch.

    Args:
        out_dir: ``fit_stage``'s checkpoint folder (where the saver writes ``model.keras``).
        stage, class_names, parent, data_fingerprint, split_id, number, seed: As given to ``fit_stage``; they
            go into each reported manifest.
        history: Per-epoch logs of epochs already trained (a resumed stage); this callback appends.
        staging_dir: Where each reported checkpoint is staged (default: beside ``out_dir``), so an
            interrupt leaves nothing in the system's temp folder.
        history_file: Rank 0 rewrites it after every epoch with the whole history so far (see
            :func:`write_history`): every epoch, also those after the kept checkpoint.

    Returns:
        A ``keras.callbacks.Callback``.
    """
    import keras
    import ray.train

    class _Report(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.model_file = Path(out_dir) / MODEL_FILE
            self.history = {k: list(v) for k, v in (history or {}).items()}
            self.last_hash: str | None = None
            self.rank = ray.train.get_context().get_world_rank()

        def on_train_begin(self, logs=None):
            # A resumed stage starts with the checkpoint's model in place: that is no improvement.
            if self.last_hash is None and self.model_file.is_file():
                self.last_hash = sha256_file(self.model_file)

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            for key, value in logs.items():
                self.history.setdefault(key, []).append(value)
            metrics = {**logs, "epoch": epoch + 1}
            if history_file and self.rank == 0:
                write_history(history_file, self.history)
            current = sha256_file(self.model_file) if self.model_file.is_file() else None
            improved, self.last_hash = current is not None and current != self.last_hash, current
            if self.rank != 0 or not improved:
                ray.train.report(metrics, checkpoint=None)
                return
            with tempfile.TemporaryDirectory(prefix="report-", dir=staging_dir or Path(out_dir).parent) as staging:
                self._stage(Path(staging), logs, epoch + 1)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(staging))

        def _stage(self, staging: Path, logs: dict, best_epoch: int) -> None:
            # the saver's model and, beside it, its training state (optimizer, seed generators)
            for source in (self.model_file, self.model_file.with_name(TRAIN_STATE_FILE)):
                if not source.is_file():
                    continue
                try:  # a hard link costs nothing; Ray copies the folder to storage during report()
                    os.link(source, staging / source.name)
                except OSError:
                    shutil.copy2(source, staging / source.name)
            write_manifest(
                staging,
                stage_config=stage,
                class_names=class_names,
                metrics=logs,
                best_epoch=best_epoch,
                history=self.history,
                parent=parent,
                data_fingerprint=data_fingerprint,
                split_id=split_id,
                number=number,
                seed=seed,
            )

    return _Report()


def write_history(path: str | Path, history: dict[str, list[float]]) -> Path:
    """``history.json``: ``{"epochs": N, "history": {metric: [one value per epoch]}}``, written atomically.

    ``val_auc`` (and ``auc``) in it is Keras' AUC over 200 fixed thresholds, computed during training;
    the exact validation AUC of the kept model is ``val_auc_exact`` in ``metrics.json``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = max((len(v) for v in history.values()), default=0)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"epochs": epochs, "history": history}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def epoch_progress(stage_number: int, epochs: int):
    """A Keras callback drawing one progress bar per epoch (batches; validation metrics at its end).

    The bar is Ray's ``tqdm_ray``: the worker sends its state, the driver draws it (msbt.console).

    Args:
        stage_number: Named in the bar.
        epochs: The stage's epochs, for "epoch e/E" (Keras numbers epochs across phases and resumes).
    """
    import keras

    from msbt.console import worker_progress

    class _Bars(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self.bar = None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch + 1
            self.bar = worker_progress(total=(self.params or {}).get("steps"), unit="batch",
                                       desc=f"stage {stage_number} epoch {self.epoch}/{epochs}")

        def on_train_batch_end(self, batch, logs=None):
            if self.bar is not None:
                self.bar.update(1)

        def on_epoch_end(self, epoch, logs=None):
            if self.bar is None:
                return
            shown = [(k, v) for k, v in (logs or {}).items() if k in ("loss", "val_loss", "val_accuracy", "val_auc")]
            # "val_auc~": Keras' binned AUC during training, not the exact one of metrics.json
            text = " ".join(f"{k.replace('val_auc', 'val_auc~')} {float(v):.4f}" for k, v in shown)
            self.bar.set_description(f"stage {stage_number} epoch {self.epoch}/{epochs}: {text}")
            self.bar.close()
            self.bar = None

    return _Bars()


def _resumed_history(resume_dir: str | None) -> dict[str, list[float]]:
    """History up to the resumed checkpoint's epoch, so reported manifests carry the whole run."""
    if resume_dir is None:
        return {}
    manifest = json.loads((Path(resume_dir) / "manifest.json").read_text())
    done = int(manifest["best_epoch"])
    return {k: list(v)[:done] for k, v in manifest.get("history", {}).items()}


@dataclass(frozen=True)
class LoopConfig:
    """What every Train worker of one stage receives; built by :func:`loop_config` for :func:`train_stage`.

    Plain fields only (paths as ``str``, the frozen ``StageConfig``), so it pickles through Ray.
    """

    stage: StageConfig
    image_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    seed: int
    data_fingerprint: str
    split_id: str
    parent: str | None = None  # stage 2: the parent checkpoint folder (seen from the worker)
    # Ray Train V2 refuses a trainer's resume_from_checkpoint: the checkpoint to continue from
    # travels here; a checkpoint of a restarted worker (ray.train.get_checkpoint) takes precedence.
    resume: str | None = None
    verbose: int = 0
    mixed_precision: bool = False
    cpu_threads: int = 1  # workers sharing a host each get the threads of the CPUs they reserved
    audit_dir: str | None = None  # each rank writes rank<r>.json there (see train_stage); None = no audit
    tensorboard_dir: str | None = None  # rank 0 writes epoch scalars there; None = none
    work_dir: str | None = None  # the workers' scratch (model being saved, checkpoints staged): work_folder
    history_file: str | None = None  # rank 0 rewrites every epoch's metrics there (all epochs, not only kept)
    stage_number: int = 0  # named in the progress bar and recorded in the manifests (0: counted from the parent)
    progress: bool = False  # rank 0 draws a bar per epoch on the driver's console
    deterministic: bool = False  # run.deterministic: op determinism, rows in a fixed order (shard_arrays)
    # stage.balance: (site, class index, weight) per cell of the whole training split (msbt.data.balance),
    # computed once on the driver so every worker weighs its shard alike; () = unweighted
    loss_weights: tuple[tuple[str, int, float], ...] = ()

    @property
    def weighs_sites(self) -> bool:
        """The weights differ by site: the training shard must carry its ``site`` column."""
        return any(site for site, _, _ in self.loss_weights)


def _open(path: str | None):
    """A worker-side checkpoint folder as a ``ray.train.Checkpoint`` (``as_directory`` then yields it)."""
    from ray.train import Checkpoint

    return Checkpoint.from_directory(path) if path else None


def train_loop_per_worker(config: LoopConfig, tables: dict | None = None) -> None:
    """One stage inside a Ray Train worker: ``fit_stage`` with one worker, the multi-worker loop with more.

    Args:
        config: The stage's :class:`LoopConfig` (bound by :func:`train_stage`).
        tables: A small store's splits: ``{"train": ObjectRef, "val": ObjectRef}`` of lists of Arrow tables
            (:func:`split_tables`, put in Ray's object store by :func:`train_stage`); None: the splits are the
            trainer's Ray Datasets.
    """
    import ray.train

    from msbt.train import distributed

    context = ray.train.get_context()
    world = context.get_world_size()
    strategy = None
    if world > 1:
        # Both before TensorFlow runs its first op here: thread pools are fixed then, and the
        # strategy must configure the collective runtime itself.
        distributed.set_cpu_threads(config.cpu_threads)
        import tensorflow as tf

        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    distributed.set_mixed_precision(config.mixed_precision)
    if config.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()  # before the first op of the stage
    from msbt.train import loop

    stage, shape = config.stage, tuple(config.image_shape)

    def split(name):  # the rows of a split as this worker receives them
        return ray.get(tables[name]) if tables else ray.train.get_dataset_shard(name)

    # The tables and a deterministic run's datasets hold the whole training split: each worker deals itself
    # its rows; otherwise Ray Data has split it already.
    whole = bool(tables) or config.deterministic
    order = dict(ordered=config.deterministic, rank=context.get_world_rank(), world=world if whole else 1)
    images, labels, *sites = shard_arrays(split("train"), shape, sites=config.weighs_sites, **order)
    cells = {(site, label): weight for site, label, weight in config.loss_weights}
    weights = row_weights(labels, sites[0] if sites else None, cells) if cells else None
    train_ds = loop.dataset_from_arrays(images, labels, weights)
    # every worker validates on the whole validation set
    val_ds = loop.dataset_from_arrays(*shard_arrays(split("val"), shape, ordered=config.deterministic))
    resume = ray.train.get_checkpoint() or _open(config.resume)
    parent = _open(config.parent)
    class_names = list(config.class_names)
    # In the run folder's work area, not the system temp folder: a worker killed by an interrupt
    # (Ctrl-C, `ray job stop`) runs no `finally`, and what it leaves is removed by the driver
    # (train_stage) rather than piling up in /tmp (15 MB per stage, issue #13 item 8).
    work = Path(config.work_dir) if config.work_dir else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        # TensorFlow's autograph writes each function it converts to the temp folder
        # (__autograph_generated_file*.py) and removes it only at interpreter exit, which a Train worker
        # ended by Ray never reaches: thousands piled up in /tmp. This worker's temp folder is the stage's
        # scratch, which train_stage removes however the stage ends.
        tempfile.tempdir = str(work)
        os.environ["TMPDIR"] = str(work)
    out_dir = Path(tempfile.mkdtemp(prefix=f"rank{context.get_world_rank()}-", dir=work))
    try:
        with contextlib.ExitStack() as stack:
            parent_dir = stack.enter_context(parent.as_directory()) if parent else None
            resume_dir = stack.enter_context(resume.as_directory()) if resume else None
            common = dict(parent=parent_dir, data_fingerprint=config.data_fingerprint, split_id=config.split_id,
                          number=config.stage_number or None)
            history = _resumed_history(resume_dir)
            callback = report_callback(
                out_dir, stage, class_names, history=history,
                staging_dir=work, history_file=config.history_file, seed=config.seed, **common,
            )
            clock = _epoch_clock() if config.audit_dir else None
            extra = [clock] if clock else []
            if config.progress and context.get_world_rank() == 0:
                extra.append(epoch_progress(config.stage_number, stage.epochs))
            if config.tensorboard_dir and context.get_world_rank() == 0:
                extra.append(tblog.tensorboard_callback(config.tensorboard_dir))
            kwargs = dict(class_names=class_names, out_dir=out_dir, seed=config.seed,
                          callbacks=[callback, *extra], verbose=config.verbose,
                          resume_from=resume_dir, **common)
            audit = distributed.Audit(rank=context.get_world_rank(), world_size=world)
            if strategy is None:
                loop.fit_stage(stage, train_ds, val_ds, **kwargs)
            else:
                distributed.fit_stage_distributed(
                    stage, train_ds, val_ds, strategy=strategy, audit=audit if clock else None, **kwargs
                )
            if clock is not None:
                record = {**audit.as_dict(), "train_begin_time": clock.begin, "epoch_end_times": clock.ends,
                          "niceness": os.nice(0)}
                _write_audit(config.audit_dir, audit.rank, record)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # what matters was reported to Ray's storage


def _epoch_clock():
    """A Keras callback noting wall-clock times (``time.time()``): the first train begin and every epoch end.

    Goes last, so an epoch's time includes its validation, saving and report (what a user waits for).
    """
    import time

    import keras

    class _Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.begin: float | None = None
            self.ends: list[float] = []

        def on_train_begin(self, logs=None):
            self.begin = self.begin or time.time()  # a later phase (another fit) calls it again

        def on_epoch_end(self, epoch, logs=None):
            self.ends.append(time.time())

    return _Clock()


def _write_audit(folder: str, rank: int, record: dict) -> None:
    """``<folder>/rank<r>.json``: what one worker fed and when (see ``train_stage(audit_dir=...)``)."""
    path = Path(folder) / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(record, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# Driver


def scaling_config(run: RunConfig):
    """``ScalingConfig`` from ``run``: ``num_workers`` workers, each ``cpus_per_worker`` CPUs (and one GPU
    with ``use_gpu``: the multi-worker loop feeds one replica per worker)."""
    from ray.train import ScalingConfig

    if run.num_workers < 1:
        raise ValueError(f"run.num_workers must be at least 1, got {run.num_workers}")
    resources = {"CPU": run.cpus_per_worker}
    if run.use_gpu and run.gpus_per_worker != 1:
        resources["GPU"] = run.gpus_per_worker
    return ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu, resources_per_worker=resources)


def worker_bundles(run: RunConfig) -> list[dict[str, float]]:
    """What a stage's Ray Train workers ask Ray for, one request per worker (as :func:`scaling_config` asks)."""
    bundle = {"CPU": float(run.cpus_per_worker)}
    if run.use_gpu:
        bundle["GPU"] = float(run.gpus_per_worker)
    return [bundle] * run.num_workers


WORKER_SETTINGS = "run.num_workers, run.cpus_per_worker, run.use_gpu, run.gpus_per_worker"


def check_workers_fit(run: RunConfig, what: str = "a stage's Ray Train workers") -> None:
    """Refuse (msbt's private cluster) or say (a joined one) a worker group the cluster could never place
    (msbt.raycluster.check_placeable): Ray Train would retry it every minute for ever."""
    from msbt.raycluster import check_placeable

    check_placeable(f"{what} ({run.num_workers})", worker_bundles(run), WORKER_SETTINGS)


def score_order(monitor: str) -> str:
    """``"min"`` for a ``*loss`` monitor, else ``"max"`` (the rule of ``BestModelSaver``)."""
    return "min" if monitor.endswith("loss") else "max"


def run_config(run: RunConfig, stage_number: int, monitor: str, callbacks: Sequence = ()):
    """Ray ``RunConfig`` of one stage: ``<storage_path>/<name>/stage<n>`` (inside the run folder, beside
    its data and stores), best checkpoints by ``monitor``, and Ray Train ``callbacks`` (e.g. Tune's)."""
    from ray.train import CheckpointConfig, FailureConfig
    from ray.train import RunConfig as RayRunConfig

    return RayRunConfig(
        name=f"stage{stage_number}",
        storage_path=str(check_storage_path(run.storage_path) / check_run_name(run.name)),  # Ray wants it absolute
        checkpoint_config=CheckpointConfig(
            num_to_keep=run.checkpoints_to_keep,
            checkpoint_score_attribute=monitor,
            checkpoint_score_order=score_order(monitor),
        ),
        failure_config=FailureConfig(max_failures=run.max_failures),
        callbacks=list(callbacks) or None,
        # each worker calls nice(n) on itself as it starts, relative to the cluster's own priority (Ray's own way:
        # its job manager gives a submitted driver RAY_worker_niceness=0); run.worker_niceness says why not Ray's 15
        worker_runtime_env={"env_vars": {WORKER_NICENESS_ENV: str(run.worker_niceness)}},
    )


def history_path(run: RunConfig, stage_number: int) -> Path:
    """``<storage_path>/<name>/stage<n>/history.json``: a stage's per-epoch metrics (:func:`write_history`)."""
    return check_storage_path(run.storage_path) / check_run_name(run.name) / f"stage{stage_number}" / HISTORY_FILE


# A store whose rows take up to this much memory (uncompressed) is read on the driver with pyarrow and its
# splits put in Ray's object store for the workers (split_tables; the driver holds a split twice for a
# moment, its tables and their copy in the object store): no Ray Data read (about 1 s per split on a tiny
# store) and no Ray Data actor per stage (docs/training.md). Larger stores are read by Ray Data tasks.
DRIVER_READ_BYTES = 256 * 2**20


def _columns(store: Store, keys: bool, sites: bool) -> list[str]:
    extra = (["source"] + (["box"] if store.kind == "microscope" else [])) if keys else []
    return ["image", "label_index", *extra, *(["site"] if sites else [])]


def split_tables(store_path: str | Path, split: str, *, keys: bool = False, sites: bool = False) -> list:
    """One split of a small store, read here with pyarrow: one ``pyarrow.Table`` per Parquet file that has
    rows of it, in file order, with columns ``image``, ``label_index`` (arguments as :func:`split_dataset`).

    Raises:
        ValueError: Not a store, or no rows of ``split``.
    """
    store = Store.open(store_path)
    tables = store.read_tables(_columns(store, keys, sites), split)
    if not tables:
        raise ValueError(f"{store_path}: the store has no {split!r} rows")
    return tables


def split_dataset(store_path: str | Path, split: str, *, keys: bool = False, sites: bool = False):
    """One split of a store as a Ray Dataset with columns ``image``, ``label_index``, read by Ray Data's
    parallel read (how :func:`train_stage` reads a store larger than :data:`DRIVER_READ_BYTES`).

    Materialised here, on the driver, so no read task waits for a CPU a Train worker holds.

    Args:
        keys: Also the ``source`` (and a patch's ``box``) columns, which order the rows in deterministic
            mode (:func:`shard_arrays`).
        sites: Also the ``site`` column (``stage.balance: site_class``).

    Raises:
        ValueError: Not a store, or no rows of ``split``.
    """
    from ray.data.expressions import col

    store = Store.open(store_path)
    columns = _columns(store, keys, sites)
    ds = store.ray_dataset([*columns, "split"])
    # An expression filter runs on the Arrow table (read_parquet refuses a pyarrow `filter=` in 2.60).
    ds = ds.filter(expr=col("split") == split).select_columns(columns).materialize()
    if ds.count() == 0:
        raise ValueError(f"{store_path}: the store has no {split!r} rows")
    return ds


def loss_weights(store_path: str | Path, balance: str) -> tuple[tuple[str, int, float], ...]:
    """``stage.balance``'s weight per (site, class) cell of the store's training rows; () for "none".

    A store without a ``site`` column (stage 1's microscope store, or one made before sites existed) is one
    site: ``site_class`` then balances the classes alone.
    """
    if balance == "none":
        return ()
    store = Store.open(store_path)
    by_site = balance == "site_class" and "site" in store.columns()
    rows = store.read(["label_index", *(["site"] if by_site else [])], "train")
    cells = cell_weights(rows["label_index"], rows["site"] if by_site else None, "site_class" if by_site else "class")
    log.info("loss weights (balance %s) of %s: %s", balance, store_path, describe(cells, store_classes(store_path)))
    return tuple((site, label, weight) for (site, label), weight in cells.items())


def store_classes(store_path: str | Path) -> list[str]:
    """Class names in label order, as the store recorded them."""
    return Store.open(store_path).classes


def store_identity(store_path: str | Path) -> tuple[str, str]:
    """``(data_fingerprint, split_id)`` for manifests (msbt.data.store.Store.fingerprint)."""
    return Store.open(store_path).fingerprint()


def checkpoint_path(checkpoint) -> str | None:
    """A checkpoint given as a folder or a ``ray.train.Checkpoint`` as an absolute folder path (None stays None).

    Stages live under ``run.storage_path``, a local (or shared) filesystem path, so a Ray checkpoint's
    ``path`` is a folder the workers can open.
    """
    if checkpoint is None:
        return None
    path = getattr(checkpoint, "path", checkpoint)  # a ray.train.Checkpoint, or a path
    return str(Path(path).expanduser().resolve())


def loop_config(config: Config, stage_number: int, store_path: str | Path, parent_checkpoint=None, *,
                progress: bool = False,
                resume_from=None, class_names: Sequence[str] | None = None, verbose: int = 0,
                audit_dir: str | Path | None = None) -> LoopConfig:
    """The :class:`LoopConfig` of one stage of ``config`` on a store (arguments as :func:`train_stage`)."""
    stage = config.stage1 if stage_number == 1 else config.stage2
    store_path = Path(store_path).expanduser().resolve()
    fingerprint, split_id = store_identity(store_path)
    if warning := batchnorm_warning(stage):
        log.warning("stage %d: %s", stage_number, warning)
    return LoopConfig(
        loss_weights=loss_weights(store_path, stage.balance),
        stage=stage,
        image_shape=tuple(Store.open(store_path).image_shape),
        class_names=tuple(class_names or store_classes(store_path)),
        seed=training_seed(config),
        data_fingerprint=fingerprint,
        split_id=split_id,
        parent=checkpoint_path(parent_checkpoint),
        resume=checkpoint_path(resume_from),
        verbose=verbose,
        mixed_precision=config.run.mixed_precision,
        cpu_threads=max(1, int(config.run.cpus_per_worker)),
        audit_dir=str(Path(audit_dir).expanduser().resolve()) if audit_dir else None,
        # Epoch scalars for TensorBoard beside the stage's Ray folder (Train V2 writes none itself).
        tensorboard_dir=str(tblog.tensorboard_dir(run_location(config), stage_number)),
        work_dir=str(work_folder(config, stage_number)),
        history_file=str(history_path(config.run, stage_number)),
        stage_number=stage_number,
        progress=progress,
        deterministic=config.run.deterministic,
    )


def _why_no_rows(store: Store, classes: list[str]) -> str:
    """Why ``classes``' train-split files gave no rows: those that could not be read (and why) apart from those that
    read and gave none (fields without cells), as the store recorded it; one phrase for both where it did not."""
    hint = ("see the data step's 'gave no patches' line and contact_fields.png; preprocess.offset sets the threshold "
            "by hand")
    summary = store.summary()
    readable, unreadable = summary.empty_in("train", classes)
    if not readable and not unreadable:  # no file recorded as empty: none in train, or a store from before 2026-12-07
        return (f"the split put none of their files in train (too few files or lesions of the class), or those files "
                f"gave none (for microscope fields: no cells found, or unreadable; {hint})")
    parts = []
    if unreadable:
        shown = "; ".join(f"{source}: {reason}" for source, reason in list(unreadable.items())[:3])
        parts.append(f"{len(unreadable)} could not be read when the store was written ({shown}"
                     f"{'; ...' if len(unreadable) > 3 else ''}; changed since the scan)")
    if readable:
        what = f"no cells found ({hint})" if summary.kind == "microscope" else "read, but gave no rows"
        parts.append(f"{len(readable)} gave none, {what}: {', '.join(readable[:3])}{' ...' if len(readable) > 3 else ''}")
    return "of the train-split files, " + " and ".join(parts)


def train_stage(
    config: Config,
    stage_number: int,
    store_path: str | Path,
    parent_checkpoint=None,
    *,
    resume_from=None,
    class_names: Sequence[str] | None = None,
    verbose: int = 0,
    audit_dir: str | Path | None = None,
    callbacks: Sequence = (),
    progress: bool = True,
    placement_group_cleaner: bool | None = None,
):
    """Train one stage with Ray Train (Ray must be initialised).

    Args:
        config: The resolved config; ``stage1``/``stage2`` and ``run`` are used; ``run.train_seed`` (else
            ``data.seed``) seeds it.
        stage_number: 1 (cell lines) or 2 (ultrasound, from ``parent_checkpoint``).
        store_path: A store from ``msbt.data.preprocess`` with ``train`` and ``val`` rows.
        parent_checkpoint: Stage 2 only: stage 1's checkpoint (a ``ray.train.Checkpoint`` such as
            :func:`best_checkpoint` of stage 1's result, or a checkpoint folder).
        resume_from: A checkpoint of this same stage to continue from (see "Resume" above).
        class_names: In label order; default: read from the store.
        verbose: Keras ``fit`` verbosity in the worker (multi-worker: one line per epoch on rank 0).
        audit_dir: Each rank writes ``rank<r>.json`` there (a folder every worker can write, e.g. on a
            shared filesystem): wall-clock time of the first train begin and of every epoch end, and with
            several workers also its data checksums and weight digests (:class:`msbt.train.distributed.Audit`).
        callbacks: Ray Train callbacks for the trainer's ``RunConfig`` (e.g. Tune's ``TuneReportCallback``,
            which forwards every epoch's report to a Tune trial).
        progress: A progress bar per epoch on the driver's console (rank 0 draws it through Ray).
        placement_group_cleaner: Start Ray Train's placement-group cleaner for this run (see
            :func:`stage_trainer`): needed where the stage's controller can die while its job goes on, as in a
            Tune trial that Tune ends early. Default (None): only when called from inside a Ray actor or task
            (Tune's trials are), not from a driver.

    Returns:
        The ``ray.train.Result``; its checkpoints are msbt checkpoint folders.

    Raises:
        ValueError: ``run.num_workers < 1``, a stage number other than 1 or 2, a parent given to a stage
            that does not start from one (or missing for one that does), or a store without train/val rows.
        ray.train.TrainingFailedError: The worker failed more than ``run.max_failures`` times; when it failed
            with an exception of its own, that exception instead (:func:`worker_error`).
    """
    import ray.train
    from ray.train import DataConfig

    from msbt.train.tfbackend import TFConfig

    if stage_number not in (1, 2):
        raise ValueError(f"stage_number must be 1 or 2, got {stage_number!r}")
    stage = config.stage1 if stage_number == 1 else config.stage2
    if (stage.weights == "parent") != (parent_checkpoint is not None):
        raise ValueError(
            f"stage {stage_number} has weights={stage.weights!r}: a parent checkpoint is needed exactly "
            f"when weights is 'parent' (got parent_checkpoint={parent_checkpoint!r})"
        )
    scaling = scaling_config(config.run)  # refuses a bad worker count before any data is read
    if not _inside_ray_worker():  # on a driver; a Tune trial's stage was checked before the search started
        check_workers_fit(config.run, f"stage {stage_number}'s Ray Train workers")
    store_path = Path(store_path).expanduser().resolve()
    store = Store.open(store_path)
    missing = store.classes_without_rows("train")
    if missing:  # the model would train an output for each of them on no example, and say nothing
        raise ValueError(f"{store_path}: class{'es' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)} {'have' if len(missing) > 1 else 'has'} no training rows: "
                         f"{_why_no_rows(store, missing)}; stage {stage_number} cannot learn "
                         f"{'them' if len(missing) > 1 else 'it'}")
    worker_config = loop_config(config, stage_number, store_path, parent_checkpoint, resume_from=resume_from,
                                progress=progress,
                                class_names=class_names, verbose=verbose, audit_dir=audit_dir)
    remove_work(config, stage_number)  # what an interrupted earlier attempt left
    with_sites = {"train": worker_config.weighs_sites, "val": False}  # the splits the workers read
    tables, datasets = {}, {}
    if store.memory_bytes() <= DRIVER_READ_BYTES:
        import ray

        # Referenced by the bound train function, which Ray keeps until the stage ends.
        tables = {split: ray.put(split_tables(store_path, split, keys=config.run.deterministic, sites=sites))
                  for split, sites in with_sites.items()}
    else:
        datasets = {split: split_dataset(store_path, split, keys=config.run.deterministic, sites=sites)
                    for split, sites in with_sites.items()}
    trainer = stage_trainer(needs_cleaner(placement_group_cleaner))(
        # Bound here rather than passed as train_loop_config: Ray Train V2 exports that to its state API as
        # a JSON dict, and a dataclass there would be turned into a string.
        functools.partial(train_loop_per_worker, worker_config, tables or None),
        backend_config=TFConfig(),  # TF_CONFIG for several workers; keeps TensorFlow out of the controller
        scaling_config=scaling,
        run_config=run_config(config.run, stage_number, stage.monitor, callbacks),
        datasets=datasets or None,
        # For a large store's Ray Datasets (a small store's workers deal themselves their rows, shard_arrays).
        # Only the training set is sharded: every worker validates on all of it (identical val_* on all ranks).
        # Deterministic mode deals the rows itself, by position after sorting (shard_arrays): Ray Data's
        # split follows block order, which may differ between runs. One worker takes the whole set
        # unsplit: a split into one shard gives the same rows but starts a SplitCoordinator actor, a
        # process of its own (benchmarks/stage_startup.py: about 1 s of start-up per stage and trial).
        dataset_config=DataConfig(
            datasets_to_split=[] if config.run.deterministic or config.run.num_workers == 1 else ["train"]),
    )
    set_train_poll()  # read as the controller starts; Ray Train passes it on
    try:
        return fit_interruptibly(trainer)
    except KeyboardInterrupt:
        end_workers_then_remove_work(config, stage_number)
        raise
    except ray.train.TrainingFailedError as err:
        own = worker_error(err, stage_number)
        if own is err:
            raise
        raise own from err
    finally:
        remove_work(config, stage_number)  # the workers' scratch is never a result


def worker_error(err: Exception, stage_number: int) -> Exception:
    """The exception a stage's worker raised, for the driver to raise in place of Ray Train's wrapper.

    Ray Train reports a worker's error as ``WorkerGroupError: Training failed due to worker errors:`` followed by
    the worker's traceback, which ``msbt`` printed as its one error line (a full disk during a checkpoint's save: 7
    lines of traceback before ``OSError: [Errno 28] No space left on device: '<run>/.work/stage1/.../model.keras'``).
    The worker's own exception says the same in one line; the stage and rank are added as a note (shown with
    ``--debug``), and Ray Train's error stays its ``__cause__``. Left as Ray Train raised it: a worker that died or
    stopped answering (Ray's and Ray Train's own errors, e.g. ``WorkerHealthCheckFailedError``), and workers that
    failed with different errors (with several workers, one rank's error and the others' consequences).
    """
    import ray
    from ray.train.v2._internal.exceptions import RayTrainError

    failures = getattr(err, "worker_failures", None)
    if not isinstance(failures, dict) or not failures:
        return err
    causes = {rank: failure.cause if isinstance(failure, ray.exceptions.RayTaskError) and failure.cause else failure
              for rank, failure in sorted(failures.items())}
    rank, cause = next(iter(causes.items()))
    if not all(isinstance(c, Exception) and not isinstance(c, (ray.exceptions.RayError, RayTrainError))
               for c in causes.values()):
        return err  # a worker that died or stopped answering (Ray Train's health checks): Ray's account of it
    if len({(type(c), str(c)) for c in causes.values()}) > 1:
        return err  # the workers failed differently (one rank's error, the others' consequences): every rank's
    others = f" (and {len(failures) - 1} other worker(s), the same)" if len(failures) > 1 else ""
    cause.add_note(f"raised in stage {stage_number}'s Ray Train worker of rank {rank}{others}")
    return cause


def needs_cleaner(placement_group_cleaner: bool | None) -> bool:
    """``train_stage``'s ``placement_group_cleaner``, with None resolved: True inside a Ray actor or task (a Tune
    trial, or a user's own actor), whose end need not end the job; False on a driver, whose job ends with it."""
    if placement_group_cleaner is not None:
        return bool(placement_group_cleaner)
    return _inside_ray_worker()


def _inside_ray_worker() -> bool:
    """True inside a Ray actor or task; False on a driver, or where Ray is not started."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


@functools.cache  # one class per choice, and the warning below once per process
def stage_trainer(placement_group_cleaner: bool):
    """Ray Train's ``DataParallelTrainer``, without its placement-group cleaner unless asked for, and without
    its Ray Data set-up for a stage given no Ray Datasets.

    For every run, Ray Train 2.60 starts a detached ``PlacementGroupCleaner`` actor (a process of its own) that
    asks the state API every second whether the run's controller is still alive, to remove the run's placement
    group if the controller dies while its job goes on. A stage started by an msbt command or experiment has
    its job end with it: the controller is the driver's actor, so a driver that ends, is interrupted or killed
    takes the controller and its placement group with it (Ray removes a job's placement groups when the job
    ends), and a controller that fails raises in the driver, which ends the command. The cleaner is then only
    cost on the stage's critical path: the controller waits for it at the worker group's start (registering
    the placement group) and at shutdown (stopping its poll), and it is one more process importing
    ``ray.train`` (docs/training.md, "Start-up cost of a short stage"). A Tune trial's stage keeps it: Tune
    ends a trial's actor while the search goes on, and without it that trial's placement group would hold its
    CPUs until the search ends; so does any stage started inside a Ray actor or task (:func:`needs_cleaner`).
    What stays uncovered: a driver that lives on after its stage's controller died on its own (killed, out of
    memory; a failing stage shuts its workers down and removes the group itself) keeps that group until it
    ends.

    Ray Train 2.60 also starts a ``DatasetManager`` actor for every run, with datasets or without (its
    ``DatasetsCallback``, which also sends every worker the driver's Ray Data context). A stage of a small store hands
    its workers Arrow tables through the object store instead (:func:`train_stage`): that actor would be one
    more process importing ``ray.train`` per stage and trial with nothing to do, so it is left out there.

    Ray has no setting for either; the hook is the trainer's own list of default
    callbacks (Ray 2.60, pinned in pyproject.toml; tests/integration/test_train_ray.py checks which actors a
    stage starts).
    """
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # another Ray than the pinned one: its trainer as it is, and said
        DatasetsCallback = PlacementGroupCleanerCallback = None
    if PlacementGroupCleanerCallback is None or not callable(getattr(DataParallelTrainer, "_create_default_callbacks",
                                                                     None)):
        log.warning("this Ray Train has no PlacementGroupCleanerCallback, DatasetsCallback or "
                    "_create_default_callbacks: each stage starts Ray's placement-group cleaner and dataset manager "
                    "(msbt expects Ray 2.60's)")
        return DataParallelTrainer

    class StageTrainer(DataParallelTrainer):
        def _create_default_callbacks(self):
            left_out = (() if placement_group_cleaner else (PlacementGroupCleanerCallback,)) + \
                (() if self.datasets else (DatasetsCallback,))
            return [c for c in super()._create_default_callbacks() if not isinstance(c, left_out)]

    return StageTrainer


def set_train_poll() -> None:
    """Give the Train controllers this process starts msbt's poll interval, unless the user set one.

    Set once and kept (not put back after each stage): changing the environment while Ray's own threads
    may read it is not safe, and the variable means nothing to anything but Ray Train.
    """
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)


def end_workers_then_remove_work(config: Config, stage_number: int, settle_s: float = 2.0) -> None:
    """After Ctrl-C: end this driver's Ray (and with it the stage's workers), then remove their scratch.

    A worker may still be saving into the scratch folder when the driver sees the interrupt: removed
    before the workers end, the folder came back (CI, issue #13 item 8). ``ray.shutdown`` stops a
    private cluster's processes and, on a joined cluster, ends this job, whose actors the cluster then
    kills; the folder is removed again until it stays gone for ``settle_s``.
    """
    import time

    import ray

    ray.shutdown(wait_for_processes=True)
    quiet_since = time.monotonic()
    deadline = quiet_since + 10 * settle_s
    while time.monotonic() < deadline and time.monotonic() - quiet_since < settle_s:
        if work_folder(config, stage_number).exists():
            remove_work(config, stage_number)
            quiet_since = time.monotonic()
        time.sleep(0.2)


def fit_interruptibly(trainer):
    """``trainer.fit()`` on the calling thread, with Ctrl-C (and msbt's SIGTERM) a ``KeyboardInterrupt`` there.

    On the main thread Ray Train 2.60's ``fit`` hands its controller to
    ``DataParallelTrainer._register_sigint_handler``, which replaces the process's SIGINT handler with one of
    its own and never puts Python's back (it may ``sys.exit(0)``: issue #13 item 8 measured exit code 1, no
    message, scratch folders left behind). msbt shadows that method on this one trainer with a no-op, so
    Python's handler stays and an interrupt reaches the blocking ``ray.get`` as ``KeyboardInterrupt``; the
    caller then shuts Ray down (:func:`end_workers_then_remove_work`), which ends the run's actors with
    this driver. Ray's handler first asks the controller to abort, which lets each worker take up to 5 s
    to stop (7.7 s measured on a smoke stage): too slow for ``ray job stop``, whose SIGKILL follows SIGTERM
    after 3 s, and it adds nothing that the shutdown does not do.

    Until 2026-12-05 ``fit`` ran in a helper thread (where Ray installs no handler), and the driver shut Ray
    down while that thread was still blocked in ``ray.get`` on the controller: a signal reaches the driver's
    process group, not Ray's actors, so the run went on, and when the thread next touched Ray, Ray's core
    worker ended the whole process ("The core worker has already been shutdown": exit code 1, no
    "interrupted" line; the suite's Ctrl-C test, now and then). The wait for that thread never waited:
    Python 3.11's ``Thread.join``, interrupted by ``KeyboardInterrupt``, releases the thread's state lock and
    marks the live thread as stopped (thread dumps showed it still in ``ray.get`` 10 s later). Now no msbt
    thread is inside Ray when Ray is shut down.
    """
    if not callable(getattr(type(trainer), "_register_sigint_handler", None)):
        # The hook below would then change nothing; say so rather than let Ray's handler take Ctrl-C silently.
        log.warning("this Ray Train has no DataParallelTrainer._register_sigint_handler: Ctrl-C during training "
                    "is handled by Ray (msbt expects Ray 2.60's)")
    trainer._register_sigint_handler = lambda controller: None  # Ray calls it on the main thread only
    return trainer.fit()


def work_folder(config: Config, stage_number: int) -> Path:
    """``<run>/.work/stage<n>``: the workers' scratch for one stage (on the run's storage, which every
    worker can write; removed by :func:`remove_work` when the stage ends, however it ends)."""
    return run_location(config) / ".work" / f"stage{stage_number}"


def remove_work(config: Config, stage_number: int) -> None:
    """Remove a stage's scratch folder, and ``.work`` itself once empty."""
    folder = work_folder(config, stage_number)
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


def best_checkpoint(result, monitor: str):
    """The best of a stage's kept checkpoints by ``monitor`` (the latest if none has the metric).

    Args:
        result: A ``ray.train.Result`` from :func:`train_stage`.
        monitor: The stage's ``monitor`` (``*loss`` is minimised, anything else maximised).

    Returns:
        A ``ray.train.Checkpoint``, or None if the stage reported none.
    """
    scored = [(c, m[monitor]) for c, m in (result.best_checkpoints or []) if monitor in m]
    if not scored:
        return result.checkpoint
    pick = min if score_order(monitor) == "min" else max
    return pick(scored, key=lambda pair: pair[1])[0]
