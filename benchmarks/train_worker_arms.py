"""Benchmark: which part of a Ray Train worker costs the steady training rate, one part per arm, in one run.

    .venv/bin/python benchmarks/train_worker_arms.py                      # arms XTRPED, 3 runs each, 4 epochs
    .venv/bin/python benchmarks/train_worker_arms.py --arms XRD --store /tmp/bench/store
    .venv/bin/python benchmarks/train_worker_arms.py --smoke-test         # 32 px, 1 run of arms X and R

``benchmarks/train_overhead.py`` measures Ray Train's one-worker stage (its arm b) against plain Keras (arm a):
about 0.88 steady on the 2-core development CPU with the worker at Ray's nice 15, where issue #17 asks 0.95 (0.93 since
msbt's workers run at ``run.worker_niceness`` 0, docs/training.md). This one splits the gap. Every arm's process, bare
actors and Train workers alike, runs at Ray's 15 here (this script builds its own Train ``RunConfig``). Every arm
trains the same stage (``msbt.train.loop.fit_stage``: EfficientNet-Lite0 with random weights, binary head,
augmentation x3) on the same store, in a 1-CPU Ray process, and differs from the others in one thing:

* X: a bare 1-CPU actor, ``fit_stage`` on the actor's main thread, data read from the store;
* T: as X, ``fit_stage`` on a helper thread (Ray Train runs the training function on one);
* Y: as X, after importing ``ray.train``, ``ray.data`` and pandas first (what a Train worker has imported);
* G: as X, the actor in a one-bundle placement group (as a Train worker is);
* A: as X, with tf.data's autotuning thread on (``msbt.train.loop.without_autotune_thread`` bypassed: msbt's
  pipelines before 2026-12-05), whose iterators can take tens of seconds to delete after the last epoch;
* R: Ray Train (``DataParallelTrainer``, msbt's backend), a training function of this script's own: the Ray
  Data shards copied in as ``msbt.train.runner.shard_arrays`` does, then ``fit_stage``; no report, no bar;
* P: as R, with ``ray.train.report(metrics)`` every epoch (no checkpoint);
* C: as R, with msbt's own worker callbacks instead: ``msbt.train.runner.report_callback`` (a report every epoch, with
  a checkpoint when the monitor improved) and ``msbt.train.tblog.tensorboard_callback``, as ``train_stage`` has them;
* E: as R, with Ray's plain ``BackendConfig`` (no ``TF_CONFIG`` in the worker);
* D: as R, with no datasets handed to Ray Train (the worker reads the store itself);
* L: as R, with Ray Train's worker logging and print patch off (``RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING=0``,
  ``RAY_TRAIN_ENABLE_PRINT_PATCH=0``);
* M: as R, with Ray Train's metrics off (``RAY_TRAIN_METRICS_ENABLED=0``: no metrics callbacks in the worker);
* Q: as R, with the controller polling the worker every 30 s instead of Ray's default 2 s
  (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=30``; each poll is an actor call into the worker). The controller then
  notices the end up to 30 s late: Q's tail and wall time are not comparable with the other arms', its steady
  rate is.

The arms run in turns (X, T, R, ..., X, T, R, ...), ``--repeats`` times each. Per run it prints the steady rate
(training images per second over epochs 2..E, timed inside the training process), the seconds from the call to
the training function's start and to Keras' train begin, the first epoch, and the tail from the last epoch's end
to the caller's return (split into the rest of Keras' ``fit`` up to its train-end callbacks, the rest of
``fit_stage``, removing its temporary folder, and the way back); then each arm's median [min, max]. ``--watch S``
dumps every thread's Python stack each S seconds of a tail, to see where a long one waits. Results: docs/training.md
("Overhead: plain Keras vs Ray Train"). M's and Q's variables are set in this process's environment before their trainer is made (the driver
reads the first, Ray Train passes the second to its controller), so another caller's values of them are replaced;
L's reach the worker through Ray Train's ``worker_runtime_env``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
sys.path.insert(0, HERE)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import train_overhead  # noqa: E402  (this folder's: the synthetic store, steady_rate, spread)

BARE = "XTYGA"
TRAIN = "RPCEDLMQ"
#: The worker's environment variables of an arm (Ray Train's ``worker_runtime_env``)
WORKER_ENV = {"L": {"RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
#: Variables of an arm read in the driver (M) or passed by Ray Train from the driver to its controller (Q)
DRIVER_ENV = {"M": {"RAY_TRAIN_METRICS_ENABLED": "0"}, "Q": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "30"}}


def fit(stage, store: Path, classes: list[str], source: str = "store", report: bool = False,
        watch: tuple[str, float] | None = None, msbt_callbacks: bool = False) -> dict:
    """``fit_stage`` on ``store``'s train/val rows, in this process; returns its clock marks (``time.time()``).

    ``watch`` = ``(file, seconds)``: from the last epoch's end until ``fit_stage`` returns, every thread's Python
    stack is appended to ``file`` each ``seconds`` (``faulthandler``), so a long tail shows where it waits.
    """
    import faulthandler

    import keras

    from msbt.train import loop

    marks = {"fn": time.time(), "ends": []}

    class Clock(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            marks.setdefault("begin", time.time())

        def on_epoch_end(self, epoch, logs=None):
            if report:
                import ray.train

                ray.train.report({k: float(v) for k, v in (logs or {}).items()})
            marks["ends"].append(time.time())
            if watch is not None and epoch + 1 == stage.epochs:
                marks["stacks"] = open(watch[0], "a")  # noqa: SIM115 (closed after fit_stage returns)
                faulthandler.dump_traceback_later(watch[1], repeat=True, file=marks["stacks"])

        def on_train_end(self, logs=None):
            marks["train_end"] = time.time()

    if source == "store":
        from msbt.data.store import read_store

        data = {s: read_store(store, ["image", "label_index"], split=s) for s in ("train", "val")}
        train, val = (loop.dataset_from_arrays(data[s]["image"], data[s]["label_index"]) for s in ("train", "val"))
    else:
        import ray.train

        from msbt.data.store import Store
        from msbt.train.runner import shard_arrays

        shape = Store.open(store).image_shape
        train, val = (loop.dataset_from_arrays(*shard_arrays(ray.train.get_dataset_shard(s), shape))
                      for s in ("train", "val"))
    with tempfile.TemporaryDirectory() as out:
        callbacks = [Clock()]
        if msbt_callbacks:  # arm C: after fit_stage's saver, as train_stage puts them
            from msbt.train import tblog
            from msbt.train.runner import report_callback

            callbacks = [report_callback(Path(out) / "stage", stage, classes),
                         tblog.tensorboard_callback(Path(out) / "tensorboard"), *callbacks]
        try:
            loop.fit_stage(stage, train, val, class_names=classes, out_dir=Path(out) / "stage", callbacks=callbacks)
            marks["fit_returned"] = time.time()
        finally:
            if "stacks" in marks:
                faulthandler.cancel_dump_traceback_later()
                marks.pop("stacks").close()
    marks["cleaned"] = time.time()
    return marks


def run_bare(arm: str, stage, store: Path, classes: list[str], watch=None) -> dict:
    """Arms X, T, Y, G, A: ``fit`` in a bare 1-CPU actor."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=1)
    class Bare:
        def run(self):
            if arm == "A":
                from msbt.train import loop

                loop.without_autotune_thread = lambda ds: ds
            if arm == "Y":
                import pandas  # noqa: F401
                import ray.data  # noqa: F401
                import ray.train  # noqa: F401
            if arm != "T":
                return fit(stage, store, classes, watch=watch)
            sys.path.insert(0, HERE)  # this actor's process: the helper that hands a thread's error back
            from train_overhead import on_helper_thread

            return on_helper_thread(functools.partial(fit, watch=watch), stage, store, classes)

    group = None
    if arm == "G":
        group = placement_group([{"CPU": 1}])
        ray.get(group.ready())
        actor = Bare.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=0)).remote()
    else:
        actor = Bare.remote()
    try:
        return ray.get(actor.run.remote())
    finally:
        ray.kill(actor)
        if group is not None:
            remove_placement_group(group)


def run_train(arm: str, stage, store: Path, classes: list[str], work: Path, name: str, watch=None) -> dict:
    """Arms R, P, C, E, D, L, M, Q: ``fit`` as the training function of a one-worker Ray Train run."""
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.backend import BackendConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    import ray.data

    from msbt.train.runner import split_tables
    from msbt.train.tfbackend import TFConfig

    marks_file = work / f"{name}.json"
    source, report = ("store" if arm == "D" else "shard"), arm == "P"

    def train_fn():
        marks_file.write_text(json.dumps(fit(stage, store, classes, source, report, watch, arm == "C")))

    for key in {key for values in DRIVER_ENV.values() for key in values}:
        os.environ.pop(key, None)
    os.environ.update(DRIVER_ENV.get(arm, {}))
    trainer = DataParallelTrainer(
        train_fn,
        backend_config=BackendConfig() if arm == "E" else TFConfig(),
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=str(work / "ray"),
                             worker_runtime_env={"env_vars": WORKER_ENV.get(arm, {})}),
        # the store's splits as Ray Datasets of its Arrow tables (how msbt handed a small store to Ray Train
        # until 2026-12-06; it now passes the tables themselves, with no datasets: arm D's data path)
        datasets=None if arm == "D" else {s: ray.data.from_arrow(split_tables(store, s)) for s in ("train", "val")},
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    trainer.fit()
    return json.loads(marks_file.read_text())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", help=f"any of {BARE}{TRAIN} (see the module docstring; default XTRPED)")
    parser.add_argument("--repeats", type=int, help="runs of each arm, taken in turns (default 3; smoke test 1)")
    parser.add_argument("--store", type=Path, help="an ultrasound store (default: built-in synthetic data)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--lesions", type=int, default=100, help="synthetic lesions per class (1-3 frames each)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--watch", type=float, metavar="SECONDS",
                        help="dump every thread's Python stack each SECONDS from the last epoch's end until fit_stage "
                             "returns, to a folder printed at the end (kept when any tail was that long)")
    parser.add_argument("--smoke-test", action="store_true",
                        help="32 px, 8 lesions per class, 2 epochs, 1 run of each arm (arms XR unless --arms)")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.image_size, args.lesions, args.epochs = 32, 8, 2
    args.arms = args.arms or ("XR" if args.smoke_test else "XTRPED")
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke_test else 3)
    unknown = "".join(sorted(set(args.arms) - set(BARE + TRAIN)))
    if unknown:
        parser.error(f"--arms: {unknown!r} is no arm; arms are letters of {BARE}{TRAIN}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the steady rate starts after epoch 1)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray

    from msbt.raycluster import PREEMPTION_WATCHER_ENV

    # As msbt's private cluster: no preemption watcher (msbt.raycluster), so no arm pays for that process.
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {PREEMPTION_WATCHER_ENV: "0"}})
    work = Path(tempfile.mkdtemp(prefix="msbt-arms-"))
    try:
        return _measure(args, work)
    finally:
        ray.shutdown()
        if args.store:
            shutil.rmtree(work, ignore_errors=True)
        else:  # the built-in store is kept for another run (--store); the runs' own files are not
            for path in work.iterdir():
                if path.name != "data":
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
            print(f"\nthe built-in store stays for --store (remove {work} when done)")


def _measure(args: argparse.Namespace, work: Path) -> int:
    """The arms in turns, printed as they finish, then each arm's median; ``main`` sets up and cleans up."""
    from msbt.config import AugmentConfig, StageConfig
    from msbt.data.store import read_store
    from msbt.train.runner import store_classes

    store = (args.store or train_overhead.synth_store(work / "data", args.image_size, args.lesions)).resolve()
    classes = store_classes(store)
    stage = StageConfig(backbone="efficientnet_lite0", weights="none", image_size=args.image_size, batch_size=16,
                        epochs=args.epochs, optimizer="adam", augment=AugmentConfig(expansion=3))
    images = 3 * len(read_store(store, ["label_index"], split="train")["label_index"])
    print(f"store {store}: {images} training images per epoch, {args.epochs} epochs, {os.cpu_count()} CPUs\n")
    print("| arm | run | steady img/s | to function s | to train begin s | epoch 1 s | tail s (to Keras' train "
          "end, rest of fit_stage, folder removal, return) | wall s |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    rates: dict[str, list[float]] = {}
    stacks = Path(tempfile.mkdtemp(prefix="msbt-arms-stacks-")) if args.watch else None
    for repeat in range(args.repeats):
        for arm in args.arms:
            started = time.time()
            watch = (str(stacks / f"{arm}{repeat + 1}.txt"), args.watch) if stacks else None
            if arm in BARE:
                marks = run_bare(arm, stage, store, classes, watch)
            else:
                marks = run_train(arm, stage, store, classes, work, f"{arm}{repeat}", watch)
            done = time.time()
            ends = marks["ends"]
            rates.setdefault(arm, []).append(train_overhead.steady_rate(images, ends))
            print(f"| {arm} | {repeat + 1} | {rates[arm][-1]:.1f} | {marks['fn'] - started:.1f} | "
                  f"{marks['begin'] - started:.1f} | {ends[0] - marks['begin']:.1f} | {done - ends[-1]:.1f} "
                  f"({marks['train_end'] - ends[-1]:.1f}, {marks['fit_returned'] - marks['train_end']:.1f}, "
                  f"{marks['cleaned'] - marks['fit_returned']:.1f}, "
                  f"{done - marks['cleaned']:.1f}) | "
                  f"{done - started:.1f} |", flush=True)
    print("\n| arm | steady img/s median [min, max] |\n|---|---|")
    for arm, values in rates.items():
        print(f"| {arm} | {train_overhead.spread(values)} |")
    if stacks is not None:
        if any(path.stat().st_size for path in stacks.iterdir()):
            print(f"\nstacks of the tails longer than {args.watch:g} s: {stacks}")
        else:
            shutil.rmtree(stacks)
            print(f"\nno tail was longer than {args.watch:g} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
