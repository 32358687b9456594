"""Which addresses a private Ray cluster listens on: plain ``ray.init`` (what msbt did before) or msbt's ``init_ray``.

Usage (starts Ray: on the shared dev machine run it under the heavy lock):

    HOME=/tmp/h1 python benchmarks/ray_listeners.py before
    HOME=/tmp/h2 PYTHONPATH=. python benchmarks/ray_listeners.py after

Prints (address, process) of every listening TCP socket of this process and its children (from
``ss -ltnpH``), those not on loopback, the RAY_ADDRESS a worker task sees, and the mode of
``~/.ray/auth_token``. Results: docs/reliability.md (item 9).
"""

import os
import subprocess
import sys
import time

import psutil
import ray


def listeners() -> list[tuple[str, str]]:
    """(address, process name) of each listening socket owned by this process or its descendants."""
    mine = {os.getpid()} | {c.pid for c in psutil.Process().children(recursive=True)}
    rows = set()
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
        parts = line.split()
        local, users = parts[3], " ".join(parts[5:])
        pids = {int(x.split("=")[1]) for x in users.replace(")", ",").split(",") if x.startswith("pid=")}
        if pids & mine:
            rows.add((local.rsplit(":", 1)[0], users.split('"')[1] if '"' in users else "?"))
    return sorted(rows)


def main(mode: str) -> None:
    if mode == "before":
        ray.init(address="local", num_cpus=1, include_dashboard=True)
    else:
        from msbt.raycluster import init_ray

        init_ray("local", num_cpus=1)

    @ray.remote
    def worker_address():
        return os.environ.get("RAY_ADDRESS")

    print("gcs", ray.get_runtime_context().gcs_address, "worker RAY_ADDRESS", ray.get(worker_address.remote()))
    time.sleep(4)  # agents and metrics servers come up after init returns
    rows = listeners()
    print(f"{mode}: listening (address, process):")
    for row in rows:
        print("  ", row)
    loopback = ("127.", "[::1]", "[::ffff:127.")
    print(f"{mode}: not on loopback:", [r for r in rows if not r[0].startswith(loopback)])
    token = os.path.expanduser("~/.ray/auth_token")
    print("token mode", oct(os.stat(token).st_mode & 0o777) if os.path.exists(token) else None)
    ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "after")
