"""Benchmark: CPU of a private cluster's log monitor, with Ray's settings and with msbt's, alternated.

    .venv/bin/python benchmarks/log_monitor.py                  # 300 finished workers' files, 30 s, 2 pairs
    .venv/bin/python benchmarks/log_monitor.py --files 0 --pairs 1

Each run is a fresh process that starts a private cluster as msbt does (``msbt.raycluster.start_private``),
writes the files a finished worker leaves in the session's log folder (``worker-*.out``/``.err`` and a
``python-core-worker-*.log`` each) as a long-lived cluster accumulates them, and reads the log monitor's CPU
time over the window. "ray" sets Ray 2.60's own values (a user's values, which msbt keeps); "msbt" leaves them
to ``start_private`` (``raycluster.LOG_MONITOR_ENV``). Prints one line per run and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY_DEFAULTS = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "1000", "LOG_NAME_UPDATE_INTERVAL_S": "0.5"}

ONE_RUN = r"""
import json, os, sys, time
import psutil, ray
sys.path.insert(0, sys.argv[1])
from msbt.raycluster import LOG_MONITOR_ENV, start_private
files, window = int(sys.argv[2]), float(sys.argv[3])
start_private(2, log_to_driver=False)
logs = ray._private.worker.global_worker.node.get_logs_dir_path()
for i in range(files):
    for ext in (".out", ".err"):
        open(f"{logs}/worker-{i:056x}-01000000-{100000 + i}{ext}", "w").write("a line\n")
    open(f"{logs}/python-core-worker-{i:056x}_{100000 + i}.log", "w").write("a line\n")
me = psutil.Process()
monitor = next(p for p in me.children(recursive=True) if "log_monitor.py" in " ".join(p.cmdline()))
time.sleep(5)  # the monitor has found the files
before = sum(monitor.cpu_times()[:2])
time.sleep(window)
print(json.dumps({"cpu_s": sum(monitor.cpu_times()[:2]) - before,
                  "env": {k: monitor.environ().get(k) for k in LOG_MONITOR_ENV}}))
ray.shutdown()
"""


def one_run(settings: str, files: int, window: float) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k not in RAY_DEFAULTS}
    if settings == "ray":
        env.update(RAY_DEFAULTS)
    done = subprocess.run([sys.executable, "-c", ONE_RUN, str(ROOT), str(files), str(window)], env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300, help="finished workers whose files are in the folder")
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured per run")
    parser.add_argument("--pairs", type=int, default=2, help="ray/msbt pairs, alternated")
    args = parser.parse_args(argv)
    cpu: dict[str, list[float]] = {"ray": [], "msbt": []}
    for _ in range(args.pairs):
        for settings in cpu:
            row = one_run(settings, args.files, args.window)
            cpu[settings].append(row["cpu_s"])
            print(f"{settings:4s} settings {row['env']}: {row['cpu_s']:.2f} CPU-s in {args.window:g} s", flush=True)
    ray_s, msbt_s = statistics.median(cpu["ray"]), statistics.median(cpu["msbt"])
    print(f"median over {args.pairs} pair(s), {args.files} workers' files: Ray's settings {ray_s:.2f} CPU-s, "
          f"msbt's {msbt_s:.2f} ({msbt_s / ray_s:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
