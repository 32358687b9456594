"""Benchmark: where the fixed cost of one short stage goes, plain Keras and Ray Train, in one run.

    .venv/bin/python benchmarks/stage_startup.py               # tiny store, Lite0 random weights, 32 px, 2 epochs
    .venv/bin/python benchmarks/stage_startup.py --runs 3 --image-size 64
    .venv/bin/python benchmarks/stage_startup.py --backbone efficientnet_lite0 tiny_cnn   # the test backbone
    .venv/bin/python benchmarks/stage_startup.py --backbone tiny_cnn --processes         # what Ray starts
    .venv/bin/python benchmarks/stage_startup.py --backbone tiny_cnn --cleaner --processes   # and with the cleaner

A short stage (a Tune trial, a smoke run, a test) is mostly fixed cost. Each run trains the same stage
on the same built-in microscope store and is split at the times the training process itself records
(``train_stage(audit_dir=...)``: Keras' train begin and every epoch end):

* start-up: from the call to Keras' ``on_train_begin`` (Ray: controller and worker start, TensorFlow
  import in the worker, data to the worker; both: model build and compile);
* first epoch: includes tracing the train and test steps;
* later epoch: the mean of epochs 2..E (the steady cost the first epoch is compared with);
* wind-down: from the last epoch's end to the call's return (Ray: the report, the controller's poll,
  the worker group's shutdown).

The plain run also counts how often TensorFlow traced Keras' train step (1 is right; 2 means a variable
was created inside the first trace). Ray is started here as msbt starts a private cluster
(``msbt.raycluster.start_private``, ``os.cpu_count()`` CPUs) unless ``--address`` is given. Prints a
Markdown table; ``--processes`` adds one of the Ray processes each Ray run started (Train's controller,
workers and helper actors) with the CPU seconds each used, sampled every 0.1 s (the private cluster's
processes only, which descend from this one; an idle Ray worker started before the run and then made an
actor is not counted). ``--cleaner`` adds, in turns, the same Ray run with Ray Train's placement-group cleaner,
which msbt starts only for a Tune trial's stage (``msbt.train.runner.stage_trainer``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from msbt.config import Config, PreprocessConfig, RunConfig, StageConfig  # noqa: E402


def microscope_store(out: Path) -> Path:
    """A small built-in microscope store, written by Ray Data (Ray must be running) as before `preprocess.build`
    existed, so the cluster is warmed as in the documented runs."""
    from msbt.data import synth
    from msbt.data.discovery import discover
    from msbt.data.preprocess import build_microscope_store, split_items
    from msbt.data.splits import make_split, save_split

    synth.generate(out / "synth", seed=5, fields_per_line=4, field_size=400, lesions_per_class=2,
                   ultrasound_size=64)
    found = discover(out / "synth" / "microscope")
    save_split(make_split(found, seed=0), out / "split")
    items = split_items(out / "split", found.root, found.classes, seed=0)
    config = PreprocessConfig(max_patches_per_field=4, image_size=64, build="ray")
    return build_microscope_store(items, out / "store", config).path


def phases(started: float, begin: float, ends: list[float], returned: float) -> dict:
    return {"startup_s": begin - started, "first_epoch_s": ends[0] - begin,
            "later_epoch_s": (ends[-1] - ends[0]) / max(len(ends) - 1, 1), "wind_down_s": returned - ends[-1],
            "total_s": returned - started}


def plain_run(stage: StageConfig, store: Path, out: Path) -> dict:
    """``fit_stage`` in this process, with the train step's traces counted."""
    import keras
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    from msbt.train import loop as training
    from msbt.data.store import read_store
    from msbt.train.runner import store_classes

    traces = []
    original = TensorFlowTrainer.train_step

    def counted(self, data):  # runs only while TensorFlow traces the step
        traces.append(1)
        return original(self, data)

    class Clock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.begin, self.ends = time.time(), []

        def on_epoch_end(self, epoch, logs=None):
            self.ends.append(time.time())

    TensorFlowTrainer.train_step = counted
    try:
        started = time.time()
        table = read_store(store, columns=["image", "label_index", "split"])
        split = {s: table["split"] == s for s in ("train", "val")}
        data = {s: training.dataset_from_arrays(table["image"][m], table["label_index"][m]) for s, m in split.items()}
        clock = Clock()
        training.fit_stage(stage, data["train"], data["val"], class_names=store_classes(store), out_dir=out,
                           seed=0, callbacks=[clock])
        returned = time.time()
    finally:
        TensorFlowTrainer.train_step = original
    return {**phases(started, clock.begin, clock.ends, returned), "train_step_traces": len(traces)}


class ProcessWatch:
    """The processes below this one, sampled every 0.1 s: name (Ray's process title) and CPU seconds."""

    def __init__(self):
        import threading

        import psutil

        self._me, self._seen, self._stop = psutil.Process(), {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            for proc in self._me.children(recursive=True):
                try:
                    times = proc.cpu_times()
                    self._seen[proc.pid] = (proc.cmdline()[0].split()[0], times.user + times.system)
                except (psutil.Error, IndexError):
                    pass
            self._stop.wait(0.1)

    def snapshot(self) -> dict[int, tuple[str, float]]:
        return dict(self._seen)

    def close(self):
        self._stop.set()
        self._thread.join()


def ray_run(stage: StageConfig, store: Path, out: Path, watch: ProcessWatch | None = None,
            cleaner: bool = False) -> dict:
    """``train_stage`` with one Ray Train worker; the worker's audit gives its clock."""
    from msbt.train.runner import train_stage

    config = Config(stage1=stage, run=RunConfig(name="startup", storage_path=str(out / "ray")))
    before = watch.snapshot() if watch else {}
    started = time.time()
    train_stage(config, 1, store, audit_dir=out / "audit", placement_group_cleaner=cleaner)
    returned = time.time()
    audit = json.loads((out / "audit" / "rank0.json").read_text())
    row = phases(started, audit["train_begin_time"], audit["epoch_end_times"], returned)
    if watch:
        time.sleep(0.3)  # the last sample of processes that ended with the run
        row["processes"] = sorted((name, cpu) for pid, (name, cpu) in watch.snapshot().items() if pid not in before)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="runs of each kind (default 2)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--address", help="Ray cluster to join (default: a local one)")
    parser.add_argument("--backbone", nargs="+", default=["efficientnet_lite0"],
                        choices=["efficientnet_lite0", "tiny_cnn", "resnet50"],
                        help="backbones (random weights), each measured --runs times (default efficientnet_lite0)")
    parser.add_argument("--processes", action="store_true",
                        help="also list the processes each Ray run started and their CPU seconds")
    parser.add_argument("--cleaner", action="store_true",
                        help="also each Ray run with Ray Train's placement-group cleaner (a Tune trial's stage), "
                             "in turns")
    args = parser.parse_args(argv)

    import ray

    from msbt.raycluster import start_private

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        start_private(os.cpu_count(), log_to_driver=False)
    watch = ProcessWatch() if args.processes else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="msbt-startup-") as tmp:
        store = microscope_store(Path(tmp) / "data")
        for i in range(args.runs):
            for backbone in args.backbone:  # interleaved, so a drift of the machine hits every backbone alike
                stage = StageConfig(backbone=backbone, weights="none", image_size=args.image_size, batch_size=8,
                                    epochs=args.epochs)
                rows.append((f"{backbone}, plain `fit_stage`", plain_run(stage, store, Path(tmp) / f"plain{i}{backbone}")))
                rows.append((f"{backbone}, Ray Train, 1 worker",
                             ray_run(stage, store, Path(tmp) / f"ray{i}{backbone}", watch)))
                if args.cleaner:
                    rows.append((f"{backbone}, Ray Train, 1 worker, with Ray's placement-group cleaner",
                                 ray_run(stage, store, Path(tmp) / f"rayc{i}{backbone}", watch, cleaner=True)))
    if watch:
        watch.close()
    ray.shutdown()
    print(f"\nrandom weights at {args.image_size} px, {args.epochs} epochs, {os.cpu_count()} CPUs")
    print("| run | start-up s | first epoch s | later epoch s | wind-down s | total s | train-step traces |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['startup_s']:.1f} | {r['first_epoch_s']:.1f} | {r['later_epoch_s']:.1f} | "
              f"{r['wind_down_s']:.1f} | {r['total_s']:.1f} | {r.get('train_step_traces', '')} |")
    if watch:
        print("\n| Ray run | processes it started (CPU s) | their CPU s |")
        print("|---|---|---|")
        for name, r in rows:
            if "processes" in r:
                listed = ", ".join(f"{proc.removeprefix('ray::')} {cpu:.1f}" for proc, cpu in r["processes"])
                print(f"| {name} | {listed} | {sum(cpu for _, cpu in r['processes']):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
