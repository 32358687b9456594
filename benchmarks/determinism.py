"""Benchmark: what `run.deterministic` costs, and that it reproduces, in one run.

    python benchmarks/determinism.py                  # 96 px, ~280 training images x3, 4 epochs, 2 repeats
    python benchmarks/determinism.py --smoke-test     # 32 px, tiny: proves it runs

One stage (EfficientNet-Lite0, random weights, binary head) through Ray Train with one worker, default
and deterministic, repeated and interleaved (default, deterministic, default, deterministic, ...) so
that load on the machine falls on both alike. Prints steady images/s (epochs 2..E, inside the worker,
as benchmarks/train_overhead.py), wall seconds, and the final weights' digest of every run: the
deterministic runs must all share one digest; the default runs usually do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.train_overhead import run_ray, steady_rate, synth_store  # noqa: E402
from msbt.config import AugmentConfig, Config, RunConfig, StageConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--lesions", type=int, default=100, help="synthetic lesions per class (1-3 frames each)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, interleaved")
    parser.add_argument("--smoke-test", action="store_true", help="32 px, 8 lesions per class, 2 epochs")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.image_size, args.lesions, args.epochs = 32, 8, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray

    from msbt.data.store import read_store

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="msbt-bench-"))
    store = synth_store(work / "data", args.image_size, args.lesions)
    images = 3 * len(read_store(store, ["label_index"], split="train")["label_index"])
    stage = StageConfig(backbone="efficientnet_lite0", weights="none", image_size=args.image_size, batch_size=16,
                        epochs=args.epochs, optimizer="adam", augment=AugmentConfig(expansion=3))
    rows = []
    for i in range(args.repeats):
        for deterministic in (False, True):
            name = f"{'det' if deterministic else 'default'}-{i}"
            config = Config(stage1=stage, run=RunConfig(name=name, storage_path=str(work / "ray"),
                                                        deterministic=deterministic))
            audit = work / f"audit-{name}"
            out = run_ray(config, store, audit)
            # run_ray returns the timing; the model comes from the run folder's checkpoints
            model_digest = digest_folder(work / "ray" / name / "stage1")
            rows.append((deterministic, steady_rate(images, out["epoch_ends"]), out["wall"], model_digest))
    print(f"\n{args.image_size} px, {images} images/epoch, {args.epochs} epochs, {os.cpu_count()} CPUs, "
          "EfficientNet-Lite0, 1 Ray Train worker\n")
    print("| mode | steady img/s | wall s | final weights digest |")
    print("|---|---|---|---|")
    for deterministic, rate, wall, model_digest in rows:
        print(f"| {'deterministic' if deterministic else 'default'} | {rate:.1f} | {wall:.1f} | {model_digest} |")
    det = [r for r in rows if r[0]]
    default = [r for r in rows if not r[0]]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    print(f"\nsteady rate deterministic / default: {mean([r[1] for r in det]) / mean([r[1] for r in default]):.2f}")
    print(f"deterministic runs identical: {len({r[3] for r in det}) == 1}; "
          f"default runs identical: {len({r[3] for r in default}) == 1}")
    print(json.dumps({"rows": rows}, default=str))
    ray.shutdown()
    return 0


def digest_folder(stage_folder: Path) -> str:
    """The weights digest of the latest (= best) checkpoint a stage's Ray folder holds."""
    from msbt.model.checkpoint import load_checkpoint
    from msbt.train.distributed import weights_digest
    from msbt.train.stages import latest_checkpoint

    model, _ = load_checkpoint(latest_checkpoint(stage_folder))
    return weights_digest(model)


if __name__ == "__main__":
    raise SystemExit(main())
