"""TensorBoard logs of a stage: one folder per stage in the run folder, written by the Train worker.

Ray Train V2 writes no result files of its own for a stage's Train run (the stage folder holds
only ``checkpoint_*/`` and ``checkpoint_manager_snapshot.json``; V1's ``result.json``, ``progress.csv``
and event files came from Tune's loggers). So rank 0 of a stage adds :func:`tensorboard_callback` to
``fit_stage``'s callbacks, writing ``runs/<name>/tensorboard/stage<n>/{train,validation}``, and
``tensorboard --logdir runs/<name>/tensorboard`` shows both stages side by side.

Keras' own ``TensorBoard`` callback needs the ``tensorboard`` package in every worker
(``tf.summary.scalar`` is implemented there; without it: ``TBNotInstalledError``). Writing the event
files needs only TensorFlow (``tf.summary.write`` with the scalar plugin's metadata), so training does
not depend on it; only viewing them does, on whichever machine opens the folder. The layout and tags
are the ones Keras writes (``train/`` and ``validation/``, ``epoch_loss``, ``epoch_auc`` ...), the step
is the epoch number, so a resumed stage continues its curves instead of starting over.
"""

from __future__ import annotations

from pathlib import Path


def tensorboard_dir(run_folder: str | Path, stage_number: int) -> Path:
    """``<run folder>/tensorboard/stage<n>``: where a stage's event files go."""
    return Path(run_folder) / "tensorboard" / f"stage{stage_number}"


def tensorboard_callback(log_dir: str | Path):
    """A Keras callback writing each epoch's logs as TensorBoard scalars.

    Args:
        log_dir: The stage's folder (:func:`tensorboard_dir`); created if missing. On a multi-node
            cluster it must be on storage the head can read (the same as ``run.storage_path``).

    Returns:
        A ``keras.callbacks.Callback``; ``val_x`` goes to ``validation/epoch_x``, ``x`` to ``train/epoch_x``.
    """
    import keras
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    # What tensorboard's own scalar summary attaches: the scalars plugin reads these tensors as scalars.
    scalar = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR,
    )

    class _EpochScalars(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.writers: dict[str, tf.summary.SummaryWriter] = {}

        def writer(self, split: str):
            if split not in self.writers:
                self.writers[split] = tf.summary.create_file_writer(str(Path(log_dir) / split))
            return self.writers[split]

        def on_epoch_end(self, epoch, logs=None):
            for key, value in (logs or {}).items():
                split, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
                with self.writer(split).as_default():
                    tf.summary.write(f"epoch_{name}", tf.constant(float(value)), step=epoch, metadata=scalar)
            for writer in self.writers.values():
                writer.flush()  # a killed worker keeps every finished epoch

        def on_train_end(self, logs=None):
            for writer in self.writers.values():
                writer.close()
            self.writers.clear()

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return _EpochScalars()
