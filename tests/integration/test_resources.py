"""Resource requests no node can meet are refused before Ray is asked (docs/reliability.md, row 12m).

Measured before: ``workflows/stage1.py --smoke-test --address local --set run.num_workers=3`` on a 2-CPU machine
retried Ray Train's worker group every 60 s with a traceback each time and never ended (stopped after 200 s).
The Ray tests use the session's private cluster (2 CPUs, no GPU), started as msbt starts one.
"""

import logging

import pytest

from helpers import ROOT, TINY_SETS
from msbt.config import ConfigError, ServeConfig, load_config
from msbt.raycluster import unplaceable


def test_what_can_never_be_placed_is_named():
    two_cpus = [{"CPU": 2.0, "memory": 1e9}]
    assert unplaceable([{"CPU": 1.0}] * 2, two_cpus) is None
    assert unplaceable([{"CPU": 1.0}] * 3, two_cpus) == "together they need 3 CPU, and the cluster has 2"
    assert unplaceable([{"CPU": 3.0}], two_cpus) == "each needs 3 CPU, and the largest node has 2"
    assert unplaceable([{"CPU": 1.0, "GPU": 1.0}], two_cpus) == "the cluster has no GPU"
    # each worker must fit on one node; two nodes of 2 CPUs hold two workers of 2, not one of 3
    nodes = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    assert unplaceable([{"CPU": 2.0, "GPU": 1.0}] * 2, nodes) is None
    assert unplaceable([{"CPU": 3.0}], nodes) == "each needs 3 CPU, and the largest node has 2"
    assert unplaceable([{"CPU": 0.5, "GPU": 0.5}] * 4, nodes) is None  # fractions add up
    assert unplaceable([{"CPU": 0.0, "GPU": 0.0}], []) is None  # asks for nothing


@pytest.mark.ray
def test_a_request_the_private_cluster_cannot_meet_is_refused_naming_the_settings(ray_local, tmp_path):
    from msbt.train.runner import check_workers_fit, train_stage
    from msbt.tune.search import check_trials_fit

    config = load_config([], [f"run.storage_path={tmp_path}", "run.num_workers=3"])
    with pytest.raises(ConfigError, match=r"stage 1's Ray Train workers \(3\): together they need 3 CPU, and the "
                                          r"cluster has 2 \(run.num_workers, run.cpus_per_worker.*private local"):
        train_stage(config, 1, tmp_path / "no-store-needed")  # refused before the store is opened
    check_workers_fit(load_config([], ["run.num_workers=2"]).run)  # what fits passes
    import ray

    if not ray.cluster_resources().get("GPU"):  # (Ray counts a GPU machine's GPUs into the private cluster)
        with pytest.raises(ConfigError, match="the cluster has no GPU"):
            check_workers_fit(load_config([], ["run.use_gpu=true"]).run)
    with pytest.raises(ConfigError, match=r"stage 1's Ray Train workers \(1\): each needs 4 CPU"):
        check_trials_fit(load_config([], ["run.cpus_per_worker=4"]))  # the stage 1 a search trains first
    with pytest.raises(ConfigError, match=r"a Tune trial's Ray Train workers \(1\) and its own actor: each needs 3 CPU"):
        check_trials_fit(load_config([], ["tune.cpus_per_trial=3"]))  # a full-mode trial's worker has these
    with pytest.raises(ConfigError, match=r"together they need 2.01 CPU, and the cluster has 2 \(.*tune.cpus_per_trial"):
        check_trials_fit(load_config([], ["tune.cpus_per_trial=2"]))  # the trial's own 0.01 CPU leaves 1.99
    check_trials_fit(load_config([], ["run.cpus_per_worker=4", "stage2.weights=imagenet"]))  # no stage 1 to train
    with pytest.raises(ConfigError, match=r"a Tune trial \(fast mode\).*tune.cpus_per_trial"):
        check_trials_fit(load_config([], ["tune.fast=true", "tune.cpus_per_trial=3"]))
    check_trials_fit(load_config([], ["tune.fast=true", "tune.feature_actors=3"]))  # Ray Data starts what fits


@pytest.mark.ray
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Serve's own, at import (as in test_serve.py)
def test_serve_refuses_replicas_no_node_can_hold_before_serve_starts(ray_local, tmp_path, monkeypatch):
    from msbt.serve import app

    def reached(*args, **kwargs):
        raise AssertionError("Serve was started")

    monkeypatch.setattr(app, "application", lambda *args, **kwargs: None)  # no export needed to be refused
    monkeypatch.setattr(app.serve, "start", reached)
    assert app.replica_resources(ServeConfig(cpus_per_replica=0.5, gpus_per_replica=0.25)) == {"CPU": 0.5, "GPU": 0.25}
    assert app.url(ServeConfig(host="::1", port=8000)) == "http://[::1]:8000"  # a host serve.host now accepts
    with pytest.raises(ConfigError, match=r"msbt serve's replicas \(3\): together they need 3 CPU.*serve.replicas"):
        app.run(tmp_path, ServeConfig(replicas=3, cpus_per_replica=1.0))


@pytest.mark.ray
def test_on_a_joined_cluster_it_is_said_not_refused(ray_local, monkeypatch, caplog):
    """A cluster msbt joined may grow (an autoscaler adds nodes): the wait is said, and left to Ray."""
    from msbt import raycluster

    monkeypatch.setattr(raycluster, "_private_address", None)  # as in a process that joined, not started, it
    with caplog.at_level(logging.WARNING, logger="msbt.raycluster"):
        raycluster.check_placeable("stage 2's Ray Train workers (3)", [{"CPU": 1.0}] * 3, "run.num_workers")
    assert "together they need 3 CPU" in caplog.text and "Ray waits until nodes join" in caplog.text


@pytest.mark.ray
def test_a_training_command_is_refused_before_its_data_step(ray_local, tmp_path, capsys):
    from msbt.cli import main

    argv = ["stage1", "--config", str(ROOT / "workflows" / "configs" / "smoke.yaml"), *TINY_SETS,
            "--set", f"run.storage_path={tmp_path}", "--set", f"synth.out_dir={tmp_path / 'synth'}",
            "--set", "run.num_workers=3"]
    assert main(argv) == 1
    assert "the stages' Ray Train workers (3): together they need 3 CPU" in capsys.readouterr().err
    assert not (tmp_path / "synth").exists() and not (tmp_path / "smoke" / "stores").exists()  # no data work


def test_a_private_clusters_port_is_never_one_of_rays_fixed_ports(monkeypatch):
    """The OS once gave start_private 52365, Ray's dashboard agent's default port, and Ray refused to start
    ("dashboard_agent_http is trying to use a port number 52365 that is used by other components")."""
    import socket

    from msbt import raycluster

    offered = iter([52365, 8265, 6379, 10001, 40123])

    class Socket(socket.socket):
        def getsockname(self):
            return ("127.0.0.1", next(offered))

    monkeypatch.setattr(raycluster.socket, "socket", Socket)
    assert raycluster.free_port() == 40123


@pytest.mark.ray
def test_a_resume_whose_stages_are_all_finished_is_not_refused_for_its_workers(ray_local, tmp_path, capsys):
    """Nothing will train: the settings are not held against the cluster before the data step (a stage that does
    train is checked again by train_stage)."""
    import json

    from msbt.cli import main

    run = tmp_path / "smoke"
    run.mkdir()
    (run / "stages.json").write_text(json.dumps({"1": {"checkpoint": str(tmp_path / "gone")}}))
    argv = ["stage1", "--config", str(ROOT / "workflows" / "configs" / "smoke.yaml"), *TINY_SETS,
            "--set", f"run.storage_path={tmp_path}", "--set", f"synth.out_dir={tmp_path / 'synth'}",
            "--set", "run.num_workers=3", "--resume"]
    main(argv)  # it goes on to the data step and to the recorded stage 1, which is a made-up entry here
    err = capsys.readouterr().err
    assert "together they need 3 CPU" not in err and (tmp_path / "synth").exists(), err[-2000:]
