"""Joining or starting a Ray cluster, for entry points only (never at import)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster a job was submitted to, or to one started with `ray start`, or start one.

    Args:
        address: a cluster address; None uses $RAY_ADDRESS (set by `ray job submit`) or a local
            cluster started with `ray start`, and otherwise starts a private local one.
        num_cpus: CPUs of a private local cluster (ignored when joining one).
    """
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"])
    else:
        # "auto" joins a running local cluster (from `ray start --head`); fall back to a private one.
        try:
            ray.init(address="auto")
        except ConnectionError:
            ray.init(num_cpus=num_cpus, include_dashboard=False)
    log.info("Ray: %s", ray.cluster_resources())
