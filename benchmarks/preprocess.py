"""Benchmark: cell-patch preprocessing, plain single-process loop vs the Ray Data pipeline on 1 and 2 CPUs,
and the same step in the driver's threads (`preprocess.build: local`, what `auto` picks below
`preprocess.build_ray_min_files` files).

    python benchmarks/preprocess.py                     # built-in synthetic 1000x1000 fields
    python benchmarks/preprocess.py --data /path/fields # real class-folder tree of microscope fields

The plain loop runs the pure functions (read + msbt.images.patches.field_to_patches) with nothing else; the Ray
runs do the whole step (read, cut, write lz4 Parquet) through msbt.data.preprocess.build_microscope_store in
a fresh local Ray instance each (`preprocess.build: ray`); the threads run it in this process, one thread
per core, with no Ray. All use one OpenCV thread per thread of work, so "1 CPU" means one core.
Prints a table; parallel efficiency = Ray 2-CPU throughput / (2 x plain loop throughput).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402

from msbt.data import synth  # noqa: E402
from msbt.config import PreprocessConfig  # noqa: E402
from msbt.data.discovery import discover  # noqa: E402
from msbt.images.imagefile import read_image  # noqa: E402
from msbt.images.patches import field_to_patches  # noqa: E402
from msbt.data.preprocess import build_microscope_store, patch_params, split_items  # noqa: E402
from msbt.data.splits import make_split, save_split  # noqa: E402


def plain_loop(items, params):
    cv2.setNumThreads(1)
    patches = 0
    start = time.perf_counter()
    for item in items:
        rgb = read_image(item["path"])
        patches += len(field_to_patches(rgb, seed=item["seed"], **params)[0])
    return time.perf_counter() - start, patches


def ray_run(items, cfg, cpus, out):
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        # Start and warm one worker per CPU (imports of numpy/OpenCV/scikit-image/pyarrow take seconds per
        # process) so a one-time cost is not billed to the pipeline's throughput.
        build_microscope_store(items[: 2 * cpus], out / "warm", dataclasses.replace(cfg, files_per_task=1))
        start = time.perf_counter()
        summary = build_microscope_store(items, out / f"store{cpus}", cfg)
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    return seconds, sum(sum(v.values()) for v in summary.rows.values())


def threads_run(items, cfg, out):
    """The whole step (read, cut, write Parquet) in this process's threads, no Ray: warmed as the Ray runs are."""
    local = dataclasses.replace(cfg, build="local")
    build_microscope_store(items[:4], out / "warm-local", dataclasses.replace(local, files_per_task=1))
    start = time.perf_counter()
    summary = build_microscope_store(items, out / "store-local", local)
    return time.perf_counter() - start, sum(sum(v.values()) for v in summary.rows.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="class-folder tree of microscope fields (default: built-in synthetic)")
    parser.add_argument("--fields-per-line", type=int, default=120, help="synthetic fields per cell line")
    parser.add_argument("--size", type=int, default=1000, help="synthetic field side in pixels")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="msbt-bench-"))
    if args.data:
        root = Path(args.data)
    else:
        out = work / f"synth-{args.fields_per_line}-{args.size}"
        synth.generate(out, seed=0, fields_per_line=args.fields_per_line, field_size=args.size,
                       lesions_per_class=1, frames_per_lesion=(1, 1), ultrasound_size=64)
        root = out / "microscope"
    discovery = discover(root)
    save_split(make_split(discovery, grouping="none"), work / "split")
    items = split_items(work / "split", discovery.root, discovery.classes, seed=0)
    cfg = dataclasses.replace(PreprocessConfig(), on_existing="overwrite", files_per_chunk=len(items), build="ray")
    params = patch_params(cfg)

    plain_s, plain_p = plain_loop(items, params)
    runs = {cpus: ray_run(items, cfg, cpus, work) for cpus in (1, 2)}
    threads_s, threads_p = threads_run(items, cfg, work)
    n = len(items)
    rows = [("plain loop, 1 process", plain_s, plain_p)] + [
        (f"Ray Data, {cpus} CPU{'s' if cpus > 1 else ''}", s, p) for cpus, (s, p) in runs.items()
    ] + [("driver threads", threads_s, threads_p)]
    print(f"{n} fields from {root}")
    print(f"{'run':<24}{'seconds':>9}{'fields/s':>10}{'patches/s':>11}{'patches':>9}")
    for name, seconds, patches in rows:
        print(f"{name:<24}{seconds:>9.1f}{n / seconds:>10.2f}{patches / seconds:>11.1f}{patches:>9}")
    ratio1 = plain_s / runs[1][0]
    efficiency = plain_s / (2 * runs[2][0])
    print(f"Ray 1 CPU / plain loop: {ratio1:.2f} (target >= 0.9)")
    print(f"parallel efficiency, Ray 2 CPUs / (2 x plain loop): {efficiency:.2f} (target >= 0.8)")
    print(f"driver threads / Ray 2 CPUs (throughput): {runs[2][0] / threads_s:.2f}")
    print(json.dumps({"fields": n, "plain_s": plain_s, "ray1_s": runs[1][0], "ray2_s": runs[2][0],
                      "threads_s": threads_s, "ray1_ratio": ratio1, "efficiency": efficiency}))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
