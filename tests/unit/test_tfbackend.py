"""The stage's Ray Train backend: TF_CONFIG for every worker, and no TensorFlow where the controller runs."""

import json
import subprocess
import sys

from helpers import ROOT

from msbt.train.tfbackend import TFConfig, tf_config


def test_tf_config_names_every_worker_and_this_ones_rank():
    value = json.loads(tf_config(["10.0.0.1:1234", "10.0.0.2:5678"], 1))
    assert value == {"cluster": {"worker": ["10.0.0.1:1234", "10.0.0.2:5678"]}, "task": {"type": "worker", "index": 1}}


def test_the_backend_reports_tensorflow_to_the_dashboard():
    assert TFConfig().framework.value == "tensorflow"


def test_what_the_train_controller_unpickles_does_not_import_tensorflow():
    """Ray Train's controller unpickles the trainer: its loop function, config and backend (a fresh
    process, as the controller actor is). ray.train.tensorflow would import TensorFlow there."""
    code = ("import pickle, sys, functools\n"
            "from msbt.train.runner import train_loop_per_worker\n"
            "from msbt.train.tfbackend import TFConfig\n"
            "from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer\n"
            "pickle.loads(pickle.dumps((functools.partial(train_loop_per_worker, None), TFConfig())))\n"
            "print('tensorflow' in sys.modules)\n"
            "import ray.train.tensorflow\n"  # what Ray's TensorflowTrainer would have brought in
            "print('tensorflow' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]


def test_the_train_controller_is_given_msbts_poll_interval_unless_the_user_set_one(monkeypatch):
    # Ray Train's own function that picks the driver's variables for the controller's environment
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from msbt.train.runner import TRAIN_POLL_ENV, TRAIN_POLL_S, set_train_poll

    monkeypatch.setenv(TRAIN_POLL_ENV, "unset below")  # monkeypatch puts the session's value back after
    monkeypatch.delenv(TRAIN_POLL_ENV)
    assert TRAIN_POLL_ENV not in get_env_vars_to_propagate()
    set_train_poll()
    assert get_env_vars_to_propagate()[TRAIN_POLL_ENV] == TRAIN_POLL_S
    monkeypatch.setenv(TRAIN_POLL_ENV, "3")
    set_train_poll()
    assert get_env_vars_to_propagate()[TRAIN_POLL_ENV] == "3"
