"""Benchmark: the paper's stage 2 on a GPU through Ray Train, time-boxed and projected to 30 epochs.

    python benchmarks/gpu_stage.py                  # on a GPU machine (benchmarks/gpu.sh runs this)
    python benchmarks/gpu_stage.py --dry-run        # anywhere, seconds: imports + one train step, no Ray
    python benchmarks/gpu_stage.py --cpu-smoke      # on a CPU: the whole Ray Train path, tiny and small

The stage is the paper's (workflows/configs/paper.yaml, the defaults of msbt.config): ResNet50 at 200 px,
batch 16, Adagrad, the three-Dense head, augmentation tripling the training set, with random weights
(speed does not depend on them; no ImageNet file is needed). The data are the built-in synthetic
ultrasound images in the paper's number (250, split 7:2:1, so 175 training images, 525 per epoch
after tripling), prepared into a Parquet store by the project's own Ray Data step. Each run trains
`--epochs` epochs with `msbt.train.runner.train_stage` (the same call the pipeline makes) and reads the
epoch end times from the run's audit files: the first epoch (graph tracing included) and the median of
the later ones give s/epoch, images/s, and the projected 30-epoch stage time = first + 29 x later.

Runs: 1 worker float32, 1 worker mixed precision (Keras mixed_float16), and 2 workers sharing the one
GPU (0.5 GPU each) as a plumbing check of the multi-worker path (not a speed figure: two processes on
one GPU are never faster than one). A run that would overrun `--budget` seconds is skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PAPER_STAGE_SECONDS = 400  # stage 2 on two RTX 3090, the reference figure of issue #16
PAPER_IMAGES = 250  # the paper's ultrasound set (Mendeley, Rodrigues 2018)
PAPER_EPOCHS = 30


def projection(first_epoch_s: float, later_epochs_s: list[float], images_per_epoch: int,
               epochs: int = PAPER_EPOCHS) -> dict:
    """s/epoch, images/s and the projected stage time from measured epoch durations.

    Args:
        first_epoch_s: the first epoch (includes tracing the graph).
        later_epochs_s: durations of the later epochs (at least one).
        images_per_epoch: training images per epoch (after the augmentation's expansion).
        epochs: epochs of the full stage.

    Returns:
        {"first_epoch_s", "s_per_epoch", "images_per_s", "projected_s"}.
    """
    if not later_epochs_s:
        raise ValueError("need at least two epochs to separate tracing from steady epochs")
    steady = statistics.median(later_epochs_s)
    return {"first_epoch_s": first_epoch_s, "s_per_epoch": steady, "images_per_s": images_per_epoch / steady,
            "projected_s": first_epoch_s + (epochs - 1) * steady}


def make_store(work: Path, image_size: int, lesions_per_class: int) -> tuple[Path, int]:
    """Synthetic ultrasound (one frame per lesion) -> split -> Parquet store; returns (store, train images)."""
    import dataclasses

    from msbt.config import PreprocessConfig
    from msbt.data import synth
    from msbt.data.discovery import discover
    from msbt.data.preprocess import build_ultrasound_store, split_items
    from msbt.data.splits import make_split, save_split

    out = synth.generate(work / "synth", seed=0, fields_per_line=0, lesions_per_class=lesions_per_class,
                         frames_per_lesion=(1, 1), ultrasound_size=max(image_size, 64))
    found = discover(out["ultrasound_dir"])
    split = make_split(found, folds=1, grouping="none")
    save_split(split, work / "split")
    items = split_items(work / "split", found.root, found.classes, 0)
    cfg = dataclasses.replace(PreprocessConfig(), image_size=image_size, on_existing="overwrite")
    build_ultrasound_store(items, work / "store", cfg)
    return work / "store", sum(row["split"] == "train" for row in split.table)


def run_stage(store: Path, work: Path, name: str, *, workers: int, mixed: bool, use_gpu: bool,
              image_size: int, epochs: int, cpus_per_worker: float) -> dict:
    """Train stage 2 once with Ray Train and return the epoch times from the audit files."""
    from msbt.config import load_config
    from msbt.train.runner import train_stage

    overrides = [
        "stage2.weights=none", f"stage2.epochs={epochs}", f"stage2.image_size={image_size}",
        f"run.num_workers={workers}", f"run.use_gpu={str(use_gpu).lower()}",
        f"run.mixed_precision={str(mixed).lower()}", f"run.cpus_per_worker={cpus_per_worker}",
        f"run.gpus_per_worker={1.0 if workers == 1 else 1.0 / workers}",
        f"run.storage_path={work / 'runs'}", f"run.name={name}",
    ]
    config = load_config(overrides=overrides)
    audit = work / "audit" / name
    started = time.perf_counter()
    train_stage(config, 2, store, audit_dir=audit)
    record = json.loads((audit / "rank0.json").read_text())
    ends = [record["train_begin_time"], *record["epoch_end_times"]]
    durations = [b - a for a, b in zip(ends, ends[1:])]
    return {"wall_s": time.perf_counter() - started, "first": durations[0], "later": durations[1:]}


def dry_run() -> int:
    """Imports and one training step of the stage-2 model at 32 px, no Ray: seconds on any machine.

    Its last line, ``gpus: N``, is how many GPUs TensorFlow sees (benchmarks/gpu.sh reads it): one process
    for the import check, the step and the GPU count, since each start imports TensorFlow again (about
    5 s of CPU on a 2-core machine).
    """
    try:
        import ray.train  # noqa: F401  what the timed runs need beside TensorFlow
        import tensorflow as tf

        import msbt.data.preprocess  # noqa: F401
        import msbt.train.runner  # noqa: F401
    except ImportError as error:
        print(f"imports failed ({error}): install the project first (pip install -e .)")
        return 1
    import numpy as np

    from msbt.config import load_config
    from msbt.model.models import build_model
    from msbt.model.compiled import compile_model

    stage = load_config(overrides=["stage2.weights=none", "stage2.image_size=32"]).stage2
    model = build_model(stage, 2)
    compile_model(model, stage)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (stage.batch_size, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 2, (stage.batch_size, 1)).astype(np.float32)
    loss = model.train_on_batch(x, y, return_dict=True)["loss"]
    check = projection(20.0, [2.0, 2.0], 525)
    assert abs(check["projected_s"] - 78.0) < 1e-9 and abs(check["images_per_s"] - 262.5) < 1e-9
    print(f"dry run ok: {stage.backbone} stage-2 model ({model.count_params():,} parameters), "
          f"one step of batch {stage.batch_size} at 32 px, loss {float(loss):.3f}; projection arithmetic checked")
    print(f"gpus: {len(tf.config.list_physical_devices('GPU'))}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="imports + one step, no Ray, no GPU needed")
    parser.add_argument("--cpu-smoke", action="store_true", help="the Ray Train path on CPU at 32 px, 1 worker")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (>= 2: the first traces)")
    parser.add_argument("--budget", type=float, default=420, help="seconds; runs that would overrun are skipped")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    if args.dry_run:
        return dry_run()

    import ray

    from msbt.raycluster import init_ray

    started = time.perf_counter()
    smoke = args.cpu_smoke
    size, lesions = (32, 20) if smoke else (200, PAPER_IMAGES // 2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="msbt-gpu-"))
    # Two workers sharing a GPU: TensorFlow must not take all of its memory in the first process.
    os.environ["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    init_ray("local")
    failed, rows, per_epoch = False, [], 0
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if not smoke and gpus < 1:
            print("no GPU: Ray sees no GPU on this machine; nothing timed")
            return 1
        store, train_images = make_store(work, size, lesions)
        per_epoch = 3 * train_images  # the paper's augmentation triples the training set
        print(f"data: {train_images} training images -> {per_epoch} per epoch at {size} px; "
              f"{time.perf_counter() - started:.0f} s so far", flush=True)
        cpus = max(1.0, (os.cpu_count() or 2) // 4) if not smoke else 1.0
        plan = [("1 worker, float32", 1, False), ("1 worker, mixed precision", 1, True)]
        plan += [] if smoke else [("2 workers on 1 GPU (plumbing check)", 2, False)]
        estimate = 150.0
        for label, workers, mixed in plan:
            left = args.budget - (time.perf_counter() - started)
            if left < estimate:
                print(f"{label}: skipped, {left:.0f} s of the {args.budget:.0f} s budget left "
                      f"(a run takes about {estimate:.0f} s)", flush=True)
                continue
            try:
                r = run_stage(store, work, f"w{workers}-{'mixed' if mixed else 'fp32'}",
                              workers=workers, mixed=mixed, use_gpu=not smoke, image_size=size,
                              epochs=args.epochs, cpus_per_worker=cpus)
            except Exception as exc:  # report and go on: one failed run must not hide the others
                failed = True
                print(f"{label}: FAILED: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                continue
            estimate = r["wall_s"]
            rows.append((label, workers, r, projection(r["first"], r["later"], per_epoch)))
            print(f"{label}: done in {r['wall_s']:.0f} s", flush=True)
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    # After Ray is down, so the workers' progress lines cannot interleave with the table.
    print_table(rows, per_epoch, size)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


def print_table(rows, per_epoch: int, size: int) -> None:
    print(f"\nstage 2, ResNet50 at {size} px, batch 16, {per_epoch} training images per epoch, random weights")
    print(f"| run | first epoch s | s/epoch | images/s | projected {PAPER_EPOCHS} epochs s | paper s |")
    print("|---|---|---|---|---|---|")
    for label, workers, r, p in rows:
        print(f"| {label} | {p['first_epoch_s']:.1f} | {p['s_per_epoch']:.2f} | {p['images_per_s']:.0f} | "
              f"{p['projected_s']:.0f} | {PAPER_STAGE_SECONDS} (two RTX 3090) |")
    print(json.dumps([{"run": label, **p} for label, _, _, p in rows]))


if __name__ == "__main__":
    sys.exit(main())
