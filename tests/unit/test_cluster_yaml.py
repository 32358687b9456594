"""cluster.yaml parses, passes Ray's own launcher schema, and keeps the dashboard off the internet."""

import yaml

from helpers import ROOT


def load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_the_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config  # what `ray up` runs first

    config = load()
    validate_config(prepare_config(config))
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "max_workers"):
        assert key in config
    assert config["head_node_type"] in config["available_node_types"]


def test_gpu_workers_autoscale_and_the_project_is_installed_on_every_node():
    config = load()
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers)
    assert any(t["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5")) for t in workers)
    assert any("pip install" in c and "msbt" in c for c in config["setup_commands"])


def test_dashboard_listens_on_localhost_only():
    head = " ".join(load()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head


def test_the_schema_check_can_fail():
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load()
    config["max_wrokers"] = config.pop("max_workers")
    with pytest.raises(Exception):
        validate_config(prepare_config(config))


def test_the_install_command_names_the_project_folder_once_a_shell_has_expanded_it(tmp_path):
    """`pip install -e "~/msbt[gpu]"`: the quotes kept `~` from expanding and pip refused it ("not a valid editable
    requirement"), so `ray up` would have failed at set-up. Run here through bash as the launcher runs it, with
    `printf` standing in for pip."""
    import subprocess

    install = next(c for c in load()["setup_commands"] if "install -e" in c)
    echoed = install.replace("python3 -m pip install", "printf '%s\\n'")
    done = subprocess.run(["bash", "-c", echoed], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["-e", f"{tmp_path}/msbt[gpu]"]
    mounts = load()["file_mounts"]
    assert mounts["~/msbt"] == "." and "~/.ray/auth_token" in mounts  # the code, and the one token of the cluster
    starts = load()["head_start_ray_commands"] + load()["worker_start_ray_commands"]
    assert all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts if "ray start" in c)
