"""The Ray Train backend of a stage: ``TF_CONFIG`` on every worker, without TensorFlow in the controller.

Ray's ``TensorflowTrainer`` does the same thing through ``ray.train.tensorflow.TensorflowConfig``, but that
package imports TensorFlow when it is imported, and Ray Train's controller (an actor process of its own,
one per stage and one per Tune trial) imports it when it unpickles the trainer: about 4 s of CPU and
0.5 GB of memory per stage that nothing uses (the controller never runs a TensorFlow op). The backend is
eight lines, so it is written here; ``msbt.train.runner`` runs the stage with Ray's generic
``DataParallelTrainer`` and :class:`TFConfig`.

Unlike Ray's backend this one does not set ``TF_USE_LEGACY_KERAS=1``: msbt uses Keras 3, and that variable
would switch ``tf.keras`` to the legacy package where it is installed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig

#: ``TF_CONFIG`` task type of every Train worker (all are equal peers under MultiWorkerMirroredStrategy)
TASK_TYPE = "worker"


def tf_config(addresses: list[str], rank: int) -> str:
    """The ``TF_CONFIG`` JSON of worker ``rank`` in a cluster of ``addresses`` (one ``host:port`` each)."""
    return json.dumps({"cluster": {TASK_TYPE: list(addresses)}, "task": {"type": TASK_TYPE, "index": rank}})


def _address() -> str:
    """``host:port`` of a free port on this worker's node, for TensorFlow's collective ops."""
    from ray._common.network_utils import build_address
    from ray.train._internal.utils import get_address_and_port

    return build_address(*get_address_and_port())


def _set_tf_config(value: str) -> None:
    os.environ["TF_CONFIG"] = value


class _TFBackend(Backend):
    def on_start(self, worker_group, backend_config) -> None:
        import ray

        addresses = worker_group.execute(_address)
        ray.get([worker_group.execute_single_async(rank, _set_tf_config, tf_config(addresses, rank))
                 for rank in range(len(worker_group))])


@dataclass
class TFConfig(BackendConfig):
    """``backend_config`` of a stage's ``DataParallelTrainer`` (see the module docstring)."""

    @property
    def backend_cls(self):
        return _TFBackend

    @property
    def framework(self):
        """Shown in the Ray dashboard's Train view (Ray reads the TensorFlow version on worker 0)."""
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TENSORFLOW
