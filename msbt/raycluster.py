"""Joining or starting a Ray cluster, for entry points only (never at import)."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def started_cluster() -> str | None:
    """The address of a live cluster started with `ray start` on this machine, or None.

    `ray start` records its address in `<ray temp dir>/ray_current_cluster` and `ray stop` removes it;
    a cluster whose processes died without `ray stop` (a crash, a reboot) leaves the file behind. Its
    port is probed, so a stale file means "no cluster" rather than a connection attempt that waits.
    `ray.init(address="auto")` is avoided on purpose: it also joins ANY gcs_server it finds with `ps`,
    such as the private cluster of another job (or a test session) on the same machine.
    """
    from ray._common.utils import get_ray_address_file  # where `ray start` writes it (Ray 2.60)

    try:
        with open(get_ray_address_file(None)) as f:
            address = f.read().strip()
    except OSError:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return address
    except (OSError, ValueError):
        log.warning("ignoring a stale Ray address %r (no cluster answers there; `ray stop` cleans it)", address)
        return None


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster a job was submitted to, or to one started with `ray start`, or start one.

    Args:
        address: a cluster address, or "local" for a private cluster even when another one runs;
            None uses $RAY_ADDRESS (set by `ray job submit`) or a live local cluster started with
            `ray start`, and otherwise starts a private local one.
        num_cpus: CPUs of a private local cluster (ignored when joining one).
    """
    import ray

    from msbt import console

    if ray.is_initialized():
        return
    console.tame_ray()  # Ray's start-up lines go to the run's log (unless --verbose)
    target = address or os.environ.get("RAY_ADDRESS") or started_cluster()
    if target and target != "local":
        context = ray.init(address=target)
    else:
        # A private cluster lives and dies with this process: on Linux Ray starts its GCS and raylet with
        # PR_SET_PDEATHSIG (their workers follow the raylet), so even a driver killed with SIGKILL leaves
        # no cluster behind, and no address file: a rerun starts its own.
        # With the dashboard: it serves the state API, which Ray Train's placement-group cleaner needs.
        # Without it a Tune trial stopped early (ASHA) leaves its Train worker's placement group
        # reserved, and on a small machine the next trial's data read waits for that CPU forever
        # (measured: the suite's Tune test hung at "Pending Demands: {'CPU': 1.0}" with 1.0 CPU held
        # by a dead trial). It also lets the user watch the run (port 8265, or the next free one).
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True)
    console.tame_ray()  # now that Ray is connected: what its workers print goes to the log too
    print(describe_cluster(target if target and target != "local" else None, ray.cluster_resources(),
                           getattr(context, "dashboard_url", None)), flush=True)
    log.info("Ray: %s", ray.cluster_resources())


def describe_cluster(address: str | None, resources: dict, dashboard: str | None) -> str:
    """One line about the cluster a command runs on: which one, its CPUs/GPUs, its dashboard."""
    where = f"cluster at {address}" if address else "private local cluster"
    gpus = f", {resources['GPU']:g} GPUs" if resources.get("GPU") else ""
    seen = f"; dashboard http://{dashboard}" if dashboard else ""
    return f"Ray: {where} ({resources.get('CPU', 0):g} CPUs{gpus}){seen}"
