"""Benchmark: how the data path's cost grows with the collection (scan -> split -> patches -> Parquet).

    flock /tmp/msbt-heavy.lock python benchmarks/scale.py                  # 250, 1000, 4000 fields of 500x500
    python benchmarks/scale.py --base 40 --factors 1 2 --hashes 20000      # a quick look

Built-in microscope collections of 1x, 4x and 16x a base number of fields (the four cell lines in equal
parts; the fields of a smaller collection are the first ones of the larger, listed in a CSV manifest) go
through the whole data path on a fresh local Ray cluster each, in a fresh driver process each (so the
driver's peak memory is that collection's alone): the scan on Ray Data (`msbt.data.scan`, every file
decoded, validated and fingerprinted in Ray tasks), near-duplicate grouping and the split
(`msbt.data.splits.make_split`), and cutting patches into Parquet (`build_microscope_store`). Ray's
workers are started and warmed on a few fields first, so their one-time start-up (imports of numpy,
OpenCV, scikit-image, pyarrow) is not billed to the smallest collection.

Measured per collection: wall time of the data path, time per field, the driver's peak resident memory
(`ru_maxrss` of the driver process, whole lifetime including Ray's start), the peak resident memory of
one Ray worker and of all workers together (psutil, sampled every 0.2 s; resident memory of a worker
includes object-store pages it maps), and Parquet bytes per patch. Targets: time per field at 16x within
1.15x of 1x; driver peak memory at 16x within 1.5x of 1x. Then `find_links` + `connected_groups` on
`--hashes` synthetic hashes (with planted near-duplicates and 1024-value thumbnails) against 60 s.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LINES = ("HeLa", "Huh-7", "NCI-H1299", "MCF-7")  # msbt.data.synth.CELL_LINES


# ---------------------------------------------------------------------------------------------------
# The collection


def _write_field(job: tuple[str, str, int, int]) -> None:
    import cv2

    from msbt.data.synth import field_image

    path, line, index, size = job
    if not os.path.exists(path):
        tmp = f"{path}.tmp.png"
        cv2.imwrite(tmp, field_image(0, line, index, size))
        os.replace(tmp, path)  # a half-written field never looks finished


def ensure_fields(folder: Path, per_line: int, size: int, processes: int) -> None:
    """The built-in fields (seed 0) as `folder/<line>/field_NNNNN.png`, made once and reused."""
    jobs = []
    for line in LINES:
        (folder / line).mkdir(parents=True, exist_ok=True)
        jobs += [(str(folder / line / f"field_{i:05d}.png"), line, i, size) for i in range(per_line)]
    todo = [j for j in jobs if not os.path.exists(j[0])]
    if todo:
        print(f"generating {len(todo)} fields of {size}x{size} in {folder} ...", flush=True)
        with Pool(processes) as pool:
            pool.map(_write_field, todo, chunksize=16)


def write_manifest(folder: Path, per_line: int, out: Path) -> Path:
    """A CSV manifest of the first `per_line` fields of every line."""
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for line in LINES:
            writer.writerows((str(folder / line / f"field_{i:05d}.png"), line) for i in range(per_line))
    return out


# ---------------------------------------------------------------------------------------------------
# One collection, in its own driver process


class MemorySampler(threading.Thread):
    """Peak resident memory of Ray's worker processes (children of this driver, `ray::...`)."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every, self.stop, self.one, self.all = every, threading.Event(), 0, 0

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.is_set():
            total = 0
            for p in me.children(recursive=True):
                try:
                    if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::"):
                        rss = p.memory_info().rss
                        total += rss
                        self.one = max(self.one, rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.all = max(self.all, total)
            self.stop.wait(self.every)


def run_one(manifest: Path, out: Path, cpus: int, compare_local: bool) -> dict:
    """Scan, split and cut one collection on a fresh local Ray cluster; return the measurements."""
    import dataclasses

    import ray

    from msbt.config import PreprocessConfig
    from msbt.data.discovery import discover
    from msbt.data.preprocess import build_microscope_store, split_items
    from msbt.data.store import store_files
    from msbt.data.scan import scan
    from msbt.data.splits import make_split, save_split

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    cfg = dataclasses.replace(PreprocessConfig(), on_existing="overwrite", build="ray")  # Ray Data's scaling
    try:
        # Warm: start one worker per CPU and import the image libraries in it (scan and patches).
        warm = out / "warm.csv"
        rows = list(csv.reader(manifest.open()))
        warm.write_text("\n".join(",".join(r) for r in rows[: 1 + 2 * cpus]) + "\n")
        warm_found = scan(warm, mode="ray")
        save_split(make_split(warm_found, folds=1), out / "warm-split")
        build_microscope_store(split_items(out / "warm-split", warm_found.root, warm_found.classes, 0),
                               out / "warm-store", dataclasses.replace(cfg, files_per_task=1))

        sampler = MemorySampler()
        sampler.start()
        started = time.perf_counter()
        found = scan(manifest, mode="ray")
        scanned = time.perf_counter()
        split = make_split(found, folds=1)
        save_split(split, out / "split")
        grouped = time.perf_counter()
        items = split_items(out / "split", found.root, found.classes, 0)
        summary = build_microscope_store(items, out / "store", cfg)
        ended = time.perf_counter()
        sampler.stop.set()
        sampler.join()
        driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        patches = sum(sum(v.values()) for v in summary.rows.values())
        parquet = sum(os.path.getsize(f) for f in store_files(out / "store"))
        result = {
            "fields": len(found.records), "rejects": len(found.rejects), "patches": patches,
            "groups": split.summary["groups"]["count"], "seconds": ended - started,
            "scan_s": scanned - started, "split_s": grouped - scanned, "patches_s": ended - grouped,
            "driver_peak_bytes": driver_peak, "worker_peak_bytes": sampler.one,
            "workers_total_peak_bytes": sampler.all, "parquet_bytes": parquet,
        }
        if compare_local:  # after the measured run, so its threads do not touch the driver's peak
            t = time.perf_counter()
            discover(manifest, workers=cpus)
            result["scan_local_s"] = time.perf_counter() - t
    finally:
        ray.shutdown()
    return result


# ---------------------------------------------------------------------------------------------------
# Grouping of many hashes


def grouping_run(n: int, seed: int = 0) -> dict:
    """find_links + connected_groups on n synthetic hashes with planted near-duplicates."""
    import numpy as np

    from msbt.images.grouping import connected_groups, find_links

    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, np.iinfo(np.int64).max, n, dtype=np.int64).astype(np.uint64)
    hashes ^= rng.integers(0, 2, n).astype(np.uint64) << np.uint64(63)
    thumbs = rng.standard_normal((n, 1024), dtype=np.float32)
    # One image in ten is another "frame" of an earlier one: a few hash bits flipped, a correlated thumb.
    for b in rng.choice(n, n // 10, replace=False):
        a = int(rng.integers(0, n))
        flipped = hashes[a]
        for bit in rng.choice(64, int(rng.integers(0, 9)), replace=False):
            flipped ^= np.uint64(1) << np.uint64(bit)
        hashes[b] = flipped
        thumbs[b] = thumbs[a] + 0.3 * rng.standard_normal(1024, dtype=np.float32)
    thumbs -= thumbs.mean(axis=1, keepdims=True)
    thumbs /= np.linalg.norm(thumbs, axis=1, keepdims=True)
    started = time.perf_counter()
    links = find_links(hashes, thumbs, 10, 0.8, digests=[str(i) for i in range(n)])
    groups = connected_groups(n, links.pairs)
    return {"hashes": n, "links": len(links.pairs), "groups": int(groups.max()) + 1,
            "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=250, help="fields of the 1x collection (a multiple of 4)")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--size", type=int, default=500, help="field side in pixels")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of each local Ray cluster")
    parser.add_argument("--hashes", type=int, default=100_000, help="synthetic hashes to group (0: skip)")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one; fields are cached "
                        "under ~/.cache/msbt/bench-scale)")
    parser.add_argument("--one", nargs=2, metavar=("MANIFEST", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--compare-local", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print("RESULT " + json.dumps(run_one(Path(args.one[0]), Path(args.one[1]), args.cpus, args.compare_local)))
        return 0

    per_line = [-(-args.base * f // 4) for f in args.factors]
    fields = Path.home() / ".cache" / "msbt" / "bench-scale" / f"fields-{args.size}"
    ensure_fields(fields, max(per_line), args.size, args.cpus)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="msbt-scale-"))
    results = {}
    for factor, n in zip(args.factors, per_line):
        out = work / f"x{factor}"
        out.mkdir(parents=True, exist_ok=True)
        manifest = write_manifest(fields, n, out / "manifest.csv")
        command = [sys.executable, __file__, "--one", str(manifest), str(out), "--cpus", str(args.cpus)]
        command += ["--compare-local"] if factor <= 4 else []
        done = subprocess.run(command, capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            return 1
        results[factor] = json.loads(line[0][len("RESULT "):])
        shutil.rmtree(out, ignore_errors=True)  # the 16x store is gigabytes; its size is measured
        r = results[factor]
        print(f"{factor}x done: {r['fields']} fields in {r['seconds']:.1f} s", flush=True)
    print_table(results, args)
    if args.hashes:
        g = grouping_run(args.hashes)
        print(f"grouping {g['hashes']} hashes: {g['seconds']:.1f} s ({g['links']} links, {g['groups']} groups; "
              f"target < 60 s)")
        results["grouping"] = g
    print(json.dumps(results))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(results: dict, args) -> None:
    mib = 1024 * 1024
    print(f"fields of {args.size}x{args.size}, local Ray cluster of {args.cpus} CPUs")
    print(f"{'coll.':<6}{'fields':>7}{'patches':>8}{'wall s':>8}{'scan':>6}{'split':>6}{'patch':>7}"
          f"{'ms/field':>9}{'driver MiB':>11}{'worker MiB':>11}{'workers MiB':>12}{'B/patch':>9}{'threads scan s':>15}")
    for f, r in results.items():
        print(f"{f}x{'':<4}{r['fields']:>7}{r['patches']:>8}{r['seconds']:>8.1f}{r['scan_s']:>6.1f}{r['split_s']:>6.1f}"
              f"{r['patches_s']:>7.1f}{1000 * r['seconds'] / r['fields']:>9.1f}{r['driver_peak_bytes'] / mib:>11.0f}"
              f"{r['worker_peak_bytes'] / mib:>11.0f}{r['workers_total_peak_bytes'] / mib:>12.0f}"
              f"{r['parquet_bytes'] / max(r['patches'], 1):>9.0f}"
              f"{r.get('scan_local_s', float('nan')):>15.1f}")
    lo, hi = results[min(results)], results[max(results)]
    per_field = (hi["seconds"] / hi["fields"]) / (lo["seconds"] / lo["fields"])
    memory = hi["driver_peak_bytes"] / lo["driver_peak_bytes"]
    print(f"time per field {max(results)}x / {min(results)}x: {per_field:.2f} (target <= 1.15)")
    print(f"driver peak memory {max(results)}x / {min(results)}x: {memory:.2f} (target <= 1.5)")


if __name__ == "__main__":
    sys.exit(main())
