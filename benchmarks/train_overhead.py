"""Benchmark: what Ray Train costs over plain Keras, on the same data and model, in one run.

    python benchmarks/train_overhead.py                          # 96 px, ~280 training images x3, 4 epochs
    python benchmarks/train_overhead.py --image-size 64 --epochs 3
    python benchmarks/train_overhead.py --store runs/cpu/stores/ultrasound
    python benchmarks/train_overhead.py --smoke-test             # 32 px, tiny: proves it runs

Three runs of one stage (EfficientNet-Lite0, random weights: speed does not depend on them; binary head;
the stage config's augmentation, i.e. every epoch feeds 3 copies of each training image):

a. ``msbt.train.loop.fit_stage`` in this process (Keras ``model.fit``), data read from the store;
b. ``msbt.train.runner.train_stage`` with 1 Ray Train worker (the same ``fit_stage`` inside the worker);
c. ``train_stage`` with 2 workers (``msbt.train.distributed``: custom step, all-reduce, global batch split);
n. (only when asked, ``--runs abn``) run b with its worker at nice 15, Ray's default for workers, instead of
   msbt's ``run.worker_niceness`` (0);
t. (only when asked, ``--runs at``) run a on a helper thread of this process, as Ray Train runs its training
   function in a worker: what the thread alone costs, without Ray.

Two rates per run, both in training images per second (images fed, all workers together):

* steady: epochs 2..E, from the wall-clock end of epoch 1 to the end of epoch E, taken inside the
  process that trains (a Keras callback; Ray runs write them with ``train_stage(audit_dir=...)``). It
  leaves out the one-time costs: worker start, TensorFlow import, building the model, graph tracing
  (epoch 1). Each epoch includes its validation pass, checkpoint save and (Ray) report.
* end to end: E epochs over the whole wall time as the caller sees it: (a) from reading the store to the
  end; (b), (c) the ``train_stage`` call (Ray data materialisation, worker start, everything).

Ray is started here as msbt's jobs start it (``msbt.raycluster.start_private``, all CPUs, the dashboard
on) unless ``--address`` is given; every arm runs with it up. The 2-worker run gives each worker
``--cpus-per-worker`` CPUs (default (CPUs - 1) / 2, leaving one to Ray Data) and as many TensorFlow
threads (at least one). Each arm runs ``--repeats`` times (default 3), the arms in turns;
prints every run, each arm's median and range, and the ratios b/a, c/a and t/a of the runs made side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from msbt.config import AugmentConfig, Config, PreprocessConfig, RunConfig, StageConfig  # noqa: E402


def synth_store(out: Path, image_size: int, lesions: int) -> Path:
    """A built-in synthetic ultrasound store, written by Ray Data (Ray must be running) as before
    `preprocess.build` existed, so the cluster is warmed as in the documented runs."""
    from msbt.data import synth
    from msbt.data.discovery import discover
    from msbt.data.preprocess import build_ultrasound_store, split_items
    from msbt.data.splits import make_split, save_split

    synth.generate(out / "synth", seed=0, fields_per_line=1, field_size=200, lesions_per_class=lesions,
                   frames_per_lesion=(1, 3), ultrasound_size=max(2 * image_size, 128))
    found = discover(out / "synth" / "ultrasound")
    save_split(make_split(found, seed=0), out / "split")
    items = split_items(out / "split", found.root, found.classes, seed=0)
    return build_ultrasound_store(items, out / "store", PreprocessConfig(image_size=image_size, build="ray")).path


def steady_rate(images_per_epoch: int, epoch_ends: list[float]) -> float:
    """Images/s over epochs 2..E (NaN with one epoch)."""
    if len(epoch_ends) < 2:
        return float("nan")
    return images_per_epoch * (len(epoch_ends) - 1) / (epoch_ends[-1] - epoch_ends[0])


def spread(values: list[float], fmt: str = ".1f") -> str:
    """``median [min, max]`` of a list of rates (NaNs left out)."""
    import numpy as np

    v = np.array([x for x in values if x == x], dtype=float)
    if v.size == 0:
        return "n/a"
    return f"{np.median(v):{fmt}} [{v.min():{fmt}}, {v.max():{fmt}}]"


def run_plain(stage: StageConfig, store: Path, classes: list[str]) -> dict:
    """(a) fit_stage in this process."""
    import keras

    from msbt.train import loop as training
    from msbt.data.store import read_store

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends: list[float] = []

        def on_epoch_end(self, epoch, logs=None):
            self.ends.append(time.time())

    start = time.time()
    data = {s: read_store(store, ["image", "label_index"], split=s) for s in ("train", "val")}
    train, val = (training.dataset_from_arrays(data[s]["image"], data[s]["label_index"]) for s in ("train", "val"))
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        training.fit_stage(stage, train, val, class_names=classes, out_dir=out, callbacks=[clock])
    wall = time.time() - start
    return {"images_per_epoch": len(data["train"]["image"]) * 3, "epoch_ends": clock.ends, "wall": wall}


def on_helper_thread(fn, *args):
    """``fn(*args)`` on a new thread, waited for; its result, or its exception raised here."""
    box: dict = {}

    def target():
        try:
            box["out"] = fn(*args)
        except BaseException as err:  # handed to the caller as it is
            box["error"] = err

    worker = threading.Thread(target=target, name="bench-helper")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["out"]


def run_ray(config: Config, store: Path, audit: Path) -> dict:
    """(b)/(c) train_stage with config.run.num_workers workers; epoch times from the ranks' audits."""
    from msbt.train.runner import train_stage

    start = time.time()
    result = train_stage(config, 1, store, audit_dir=audit)
    wall = time.time() - start
    if result.error is not None:
        raise RuntimeError(f"{config.run.num_workers}-worker run failed: {result.error}")
    ranks = [json.loads(p.read_text()) for p in sorted(audit.glob("rank*.json"))]
    # Steps run in lockstep; the last rank to finish an epoch ends it.
    ends = [max(r["epoch_end_times"][i] for r in ranks) for i in range(len(ranks[0]["epoch_end_times"]))]
    return {"ranks": ranks, "epoch_ends": ends, "wall": wall}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="an ultrasound store (default: built-in synthetic data)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--lesions", type=int, default=100, help="synthetic lesions per class (1-3 frames each)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="global batch (the 2-worker run: half each)")
    parser.add_argument("--cpus-per-worker", type=float, default=max(0.5, ((os.cpu_count() or 2) - 1) / 2))
    parser.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per Ray Train worker (a uses the driver's)")
    parser.add_argument("--mixed-precision", action="store_true", help="run.mixed_precision for b and c (GPUs)")
    parser.add_argument("--runs", default="abc", help="which runs: any of a, b, c, n, t")
    parser.add_argument("--repeats", type=int, help="runs of each arm, taken in turns (default 3; smoke test 1)")
    parser.add_argument("--smoke-test", action="store_true", help="32 px, 8 lesions per class, 2 epochs, 1 run each")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.image_size, args.lesions, args.epochs, args.batch = 32, 8, 2, 8
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke_test else 3)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray

    from msbt.train.runner import store_classes

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:  # the cluster msbt's own jobs start (raycluster.start_private): its settings are part of what b costs
        from msbt.raycluster import start_private

        start_private(num_cpus=os.cpu_count(), log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="msbt-bench-"))
    store = args.store or synth_store(work / "data", args.image_size, args.lesions)
    classes = store_classes(store)
    stage = StageConfig(backbone="efficientnet_lite0", weights="none", image_size=args.image_size,
                        batch_size=args.batch, epochs=args.epochs, optimizer="adam",
                        augment=AugmentConfig(expansion=3))
    base = Config(stage1=stage, run=RunConfig(name="bench", storage_path=str(work / "ray")))
    rows = []  # (arm key, label, repeat, measurement), in the order run
    images_per_epoch = None
    # The arms take turns (a, b, c, a, b, c, ...) so that a slow spell of the machine hits every arm.
    for repeat in range(args.repeats):
        if "a" in args.runs:
            out = run_plain(stage, store, classes)
            images_per_epoch = out["images_per_epoch"]
            rows.append(("a", "a. plain fit_stage", repeat, out))
        if "t" in args.runs:
            rows.append(("t", "t. plain fit_stage on a helper thread", repeat,
                         on_helper_thread(run_plain, stage, store, classes)))
        for key, workers, cpus, nice in (("b", 1, 1.0, base.run.worker_niceness), ("n", 1, 1.0, 15),
                                         ("c", 2, args.cpus_per_worker, base.run.worker_niceness)):
            if key not in args.runs:
                continue
            run = dataclasses.replace(base.run, name=f"bench-{key}-{repeat}", num_workers=workers, cpus_per_worker=cpus,
                                      use_gpu=args.use_gpu, mixed_precision=args.mixed_precision, worker_niceness=nice)
            out = run_ray(dataclasses.replace(base, run=run), store, work / f"audit-{key}-{repeat}")
            # Each rank feeds its own images; the 1-worker audit has no per-rank count, it feeds the whole set.
            fed = [r["examples"] // args.epochs for r in out["ranks"] if r.get("examples")]
            out["images_per_epoch"] = sum(fed) if fed else images_per_epoch
            if out["images_per_epoch"] is None:
                from msbt.data.store import read_store

                out["images_per_epoch"] = 3 * len(read_store(store, ["label_index"], split="train")["label_index"])
            gpu = " + 1 GPU" if args.use_gpu else ""
            niced = ", nice 15 (Ray's default)" if key == "n" else ""
            label = f"{key}. Ray Train, {workers} worker{'s' if workers > 1 else ''} x {cpus:g} CPU{gpu}{niced}"
            rows.append((key, label, repeat, out))
    print(f"\nstore {store}: {args.image_size} px, batch {args.batch}, {args.epochs} epochs, "
          f"{os.cpu_count()} CPUs, EfficientNet-Lite0, {args.repeats} runs of each arm, interleaved\n")
    print("| run | repeat | images/epoch | steady img/s (epochs 2..E) | end-to-end img/s | wall s |")
    print("|---|---|---|---|---|---|")
    steady, e2e, labels = {}, {}, {}
    for key, label, repeat, r in rows:
        steady.setdefault(key, []).append(steady_rate(r["images_per_epoch"], r["epoch_ends"]))
        e2e.setdefault(key, []).append(r["images_per_epoch"] * args.epochs / r["wall"])
        labels[key] = label
        print(f"| {label} | {repeat + 1} | {r['images_per_epoch']} | {steady[key][-1]:.1f} | {e2e[key][-1]:.1f} "
              f"| {r['wall']:.1f} |")
    print("\n| run | steady img/s median [min, max] | end-to-end img/s median [min, max] |")
    print("|---|---|---|")
    for key, label in labels.items():
        print(f"| {label} | {spread(steady[key])} | {spread(e2e[key])} |")
    if "a" in steady:
        print()
        # Ratios of the runs made side by side (repeat i of b against repeat i of a), then their spread.
        for key in ("b", "n", "c", "t"):
            if key in steady:
                for name, rates in (("steady", steady), ("end to end", e2e)):
                    pairs = [x / y for x, y in zip(rates[key], rates["a"])]
                    print(f"ratio {key}/a ({name}): {spread(pairs, '.2f')}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
