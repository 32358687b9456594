"""What a stage's model is compiled with: the optimizer from the config, the head's loss and stable metrics.

Backend-neutral (``keras`` and ``keras.ops`` only, no TensorFlow), so the paper's model with exactly
msbt's optimizer, loss and metrics also builds and trains under Keras' JAX or PyTorch backend:
``benchmarks/gpu_keras.py`` times it that way on a GPU machine that has no TensorFlow. The names are
``loss, accuracy, auc, sensitivity, specificity`` (and ``val_`` + each).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import keras

from msbt.config import StageConfig
from msbt.model.models import is_binary

OPTIMIZERS = {"adagrad": keras.optimizers.Adagrad, "adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}


@keras.saving.register_keras_serializable(package="msbt")
class ConfusionRate(keras.metrics.Metric):
    """Sensitivity or specificity from an accumulated confusion matrix.

    Binary (one sigmoid unit, threshold 0.5): class 1 (malignant) is the positive class, so
    sensitivity = TP / (TP + FN) and specificity = TN / (TN + FP). Multi-class (one-hot labels, argmax):
    each class one-vs-rest, macro-averaged over classes present (sensitivity is then balanced accuracy).

    Args:
        rate: ``"sensitivity"`` or ``"specificity"``.
        num_classes: Number of classes (2 for a sigmoid head).
        name: Metric name; defaults to ``rate``.
    """

    def __init__(self, rate: str = "sensitivity", num_classes: int = 2, name: str | None = None, **kwargs):
        if rate not in ("sensitivity", "specificity"):
            raise ValueError(f"rate must be sensitivity or specificity, got {rate!r}")
        super().__init__(name=name or rate, **kwargs)
        self.rate, self.num_classes = rate, num_classes
        self.confusion = self.add_variable(shape=(num_classes, num_classes), initializer="zeros", name="confusion")

    def update_state(self, y_true, y_pred, sample_weight=None):
        ops, k = keras.ops, self.num_classes
        if y_pred.shape[-1] == 1:  # sigmoid head
            truth = ops.cast(ops.reshape(y_true, [-1]) > 0.5, "int32")
            guess = ops.cast(ops.reshape(y_pred, [-1]) > 0.5, "int32")
        else:
            truth, guess = ops.argmax(y_true, axis=-1), ops.argmax(y_pred, axis=-1)
        rows = ops.one_hot(truth, k, dtype=self.dtype)
        if sample_weight is not None:
            rows = rows * ops.reshape(ops.cast(sample_weight, self.dtype), [-1, 1])
        # confusion[true, predicted] += count
        self.confusion.assign_add(ops.matmul(ops.transpose(rows), ops.one_hot(guess, k, dtype=self.dtype)))

    def result(self):
        ops, cm = keras.ops, self.confusion
        tp, actual, predicted, total = ops.diagonal(cm), ops.sum(cm, axis=1), ops.sum(cm, axis=0), ops.sum(cm)
        if self.rate == "sensitivity":
            num, den = tp, actual
        else:  # TN / (TN + FP), TN = everything outside class c's row and column
            num, den = total - actual - predicted + tp, total - actual
        per_class = ops.divide_no_nan(num, den)
        if self.num_classes == 2:
            return per_class[1]
        present = ops.cast(den > 0, self.dtype)
        return ops.divide_no_nan(ops.sum(per_class * present), ops.sum(present))

    def reset_state(self):
        # zeros of its shape, not zeros_like(variable): JAX cannot take a dtype from a Keras variable
        self.confusion.assign(keras.ops.zeros(self.confusion.shape, self.confusion.dtype))

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "num_classes": self.num_classes}


def stage_metrics(num_classes: int) -> list[keras.metrics.Metric]:
    """accuracy, auc, sensitivity, specificity for a sigmoid (2 classes) or softmax head.

    Multi-class AUC is the macro average of one-vs-rest AUCs (``multi_label=True`` on one-hot labels).
    """
    if num_classes == 2:
        accuracy, auc = keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")
    else:
        accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
        auc = keras.metrics.AUC(name="auc", multi_label=True, num_labels=num_classes)
    rates = [ConfusionRate(rate, num_classes) for rate in ("sensitivity", "specificity")]
    return [accuracy, auc, *rates]


@contextlib.contextmanager
def averaged(model: keras.Model) -> Iterator[None]:
    """Inside: the model holds the average of its trainable weights (``stage.ema``) and the optimizer's average
    slots the raw weights; after: back as before. Nothing changes without weight averaging.

    Keras' own ``SwapEMAWeights`` swaps the same pairs around validation, but at a fit's last epoch it also
    overwrites the raw weights with the average, so a training state saved then could not resume exactly
    (``msbt.train.loop.save_train_state``; a resumed stage may train more epochs than its checkpoint's)."""
    optimizer = averaging_optimizer(model)
    if optimizer is None:
        yield
        return
    swap_average(optimizer)
    try:
        yield
    finally:
        swap_average(optimizer)


def averaging_optimizer(model: keras.Model) -> keras.optimizers.Optimizer | None:
    """The optimizer that keeps ``model``'s weight average (a LossScaleOptimizer's inner one); None without one."""
    optimizer = getattr(model, "optimizer", None)  # an uncompiled model has none
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return optimizer if getattr(optimizer, "use_ema", False) else None


def swap_average(optimizer: keras.optimizers.Optimizer) -> None:
    """Exchange the values of the trainable variables and of their averages in ``optimizer``'s EMA slots.
    Keras keeps the pairs in two parallel lists (its ``SwapEMAWeights`` reads them the same way)."""
    for variable, average in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average):
        raw = keras.ops.convert_to_numpy(average)
        average.assign(variable)
        variable.assign(raw)


class ValidateAverage(keras.callbacks.Callback):
    """Validation of a fit sees the averaged weights (:func:`averaged`); training goes on with the raw ones."""

    def __init__(self):
        super().__init__()
        self._inside: contextlib.ExitStack | None = None

    def on_test_begin(self, logs=None):
        self._inside = contextlib.ExitStack()
        self._inside.enter_context(averaged(self.model))

    def on_test_end(self, logs=None):
        if self._inside is not None:
            self._inside.close()
            self._inside = None


def averaging_callbacks(stage: StageConfig) -> list[keras.callbacks.Callback]:
    """What a fit needs for ``stage.ema``: :class:`ValidateAverage`, so the epoch's validation metrics and the
    best-epoch choice are the average's (``msbt.train.loop.BestModelSaver`` saves the average). Empty without it."""
    return [ValidateAverage()] if stage.ema > 0 else []


def compile_model(model: keras.Model, stage: StageConfig, learning_rate: float | None = None) -> None:
    """Compile with the stage's optimizer (built: its variables exist), the head's loss and the stable metrics.

    Args:
        model: From ``msbt.model.models.build_model``.
        stage: ``optimizer`` and ``learning_rate``.
        learning_rate: Overrides ``stage.learning_rate`` (a fine-tuning phase).
    """
    num_classes = 2 if is_binary(model) else model.get_layer("predictions").units
    averaging = {"use_ema": True, "ema_momentum": stage.ema} if stage.ema > 0 else {}
    optimizer = OPTIMIZERS[stage.optimizer](learning_rate=learning_rate or stage.learning_rate, **averaging)
    loss = "binary_crossentropy" if num_classes == 2 else "categorical_crossentropy"
    model.compile(optimizer=optimizer, loss=loss, metrics=stage_metrics(num_classes))
    # The optimizer's slot variables now (under the caller's distribution scope, if any), not inside the
    # first train step: a tf.function whose first trace creates variables is traced a second time. That
    # second trace was half the time before a Lite0 stage's first batch (~5 s of 10 s on 2 CPU cores).
    model.optimizer.build(model.trainable_variables)
