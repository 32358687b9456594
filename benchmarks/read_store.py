"""Benchmark: what a Ray Data read of a small store costs, with Ray Data's footer-reader actors and with msbt's.

    .venv/bin/python benchmarks/read_store.py                    # 3 reads of train + val, 2 turns per arm
    .venv/bin/python benchmarks/read_store.py --reads 5 --repeats 3

Ray Data 2.60 reads a Parquet collection's footers in ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` actors per read
(32 by default), each a fresh process; ``msbt.data.store.Store.ray_dataset`` asks for 1. Each run is a fresh
process that starts a private cluster (``msbt.raycluster.start_private``, 2 CPUs), reads the store's train and val
splits ``--reads`` times (``msbt.train.runner.split_dataset``, materialised) and stops the cluster. Per run it
prints the seconds the reads took and the CPU seconds the machine's processes used while the run ran
(``benchmarks/cpu_by_process.py`` around it: the cluster's own start-up, the same in both arms, is included, and
so is anything else the machine ran meanwhile), and the CPU of the footer-reader actors alone. The arms run in
turns. The store is the built-in microscope
store of ``benchmarks/stage_startup.py``, made once in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = {"Ray Data's default (32)": "32", "msbt's (1)": "1"}


def child(store: Path, reads: int) -> dict:
    import ray

    from msbt.raycluster import start_private
    from msbt.train.runner import split_dataset

    start_private(num_cpus=2, log_to_driver=False)
    started = time.perf_counter()
    for _ in range(reads):
        for split in ("train", "val"):
            split_dataset(store, split)
    reads_s = time.perf_counter() - started
    ray.shutdown()
    return {"reads_s": reads_s}


def make_store(folder: Path) -> Path:
    code = ("import sys, ray; from pathlib import Path; sys.path.insert(0, 'benchmarks'); "
            "from msbt.raycluster import start_private; start_private(num_cpus=2, log_to_driver=False); "
            "from stage_startup import microscope_store; print(microscope_store(Path(sys.argv[1]))); ray.shutdown()")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=3, help="reads of the train and val splits per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm, in turns")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child), args.reads)))
        return 0
    with tempfile.TemporaryDirectory(prefix="msbt-read-store-") as tmp:
        store = make_store(Path(tmp))
        results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for _ in range(args.repeats):
            for arm, actors in ARMS.items():
                env = {**os.environ, "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": actors}
                sampler = [sys.executable, str(Path(__file__).with_name("cpu_by_process.py")), "--top", "100", "--"]
                done = subprocess.run([*sampler, sys.executable, __file__, "--child", str(store), "--reads",
                                       str(args.reads)], env=env, capture_output=True, text=True, check=True)
                run = json.loads(re.search(r'^\{"reads_s".*$', done.stdout, re.M).group(0))
                run["cpu_s"] = float(re.search(r"of which ([0-9.]+) seen in processes", done.stdout).group(1))
                footer = re.search(r"^\| ([0-9.]+) \|[^|]*\|[^|]*\| ray::FooterReader", done.stdout, re.M)
                run["footer_s"] = float(footer.group(1)) if footer else 0.0
                results[arm].append(run)
    print(f"{args.reads} reads of a small store's train and val splits per run, private 2-CPU cluster\n")
    print("| footer actors | reads s | run CPU s (cluster included) | footer readers' CPU s |")
    print("|---|---|---|---|")
    for arm, runs in results.items():
        cells = [", ".join(f"{r[key]:.1f}" for r in runs) for key in ("reads_s", "cpu_s", "footer_s")]
        print(f"| {arm} | {' | '.join(cells)} |")
    a, b = (statistics.median(r["cpu_s"] for r in runs) for runs in results.values())
    print(f"\nmedian run CPU: {a:.1f} -> {b:.1f} s ({b / a:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
