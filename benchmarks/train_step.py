"""Benchmark: training and inference throughput per backbone, single process, batch 16.

    python benchmarks/train_step.py                                  # all backbones at 200 and 224 px
    python benchmarks/train_step.py --backbones resnet50 --sizes 200 --steps 10
    python benchmarks/train_step.py --smoke-test                     # seconds: 32 px, one timed step

Each model is built by msbt.model.models.build_model with random weights (speed does not depend on them), the
stage-1 head (GAP + Dense softmax over 4 classes) and compiled by msbt.model.compiled.compile_model (the
paper's Adagrad, full fine-tuning), so a train step is exactly what fit_stage runs. The first step
includes graph tracing and is reported apart; then `--warmup` untimed steps, then `--steps` timed ones.
Inference is `predict_on_batch` on the same batch size. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from msbt.config import StageConfig  # noqa: E402
from msbt.model.models import BACKBONES, build_model  # noqa: E402
from msbt.model.compiled import compile_model  # noqa: E402

NUM_CLASSES = 4


def timed(step, n: int) -> float:
    """Seconds for ``n`` calls of ``step``."""
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def measure(backbone: str, size: int, batch: int, warmup: int, steps: int) -> dict:
    """Train and inference images/s of one backbone at one input size.

    Returns:
        ``{"first_step_s", "train_img_s", "infer_img_s"}``.
    """
    stage = StageConfig(backbone=backbone, weights="none", image_size=size, batch_size=batch)
    model = build_model(stage, NUM_CLASSES)
    compile_model(model, stage)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    y = np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, batch)]
    first = timed(lambda: model.train_on_batch(x, y), 1)
    timed(lambda: model.train_on_batch(x, y), warmup)
    train = timed(lambda: model.train_on_batch(x, y), steps)
    timed(lambda: model.predict_on_batch(x), 1 + warmup)
    infer = timed(lambda: model.predict_on_batch(x), steps)
    return {"first_step_s": first, "train_img_s": steps * batch / train, "infer_img_s": steps * batch / infer}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[200, 224])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (tracing) one")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--smoke-test", action="store_true", help="32 px (75 for inceptionv3), 1 step")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.sizes, args.warmup, args.steps, args.batch = [32], 0, 1, 4
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import tensorflow as tf

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    print(f"batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps, random init, full fine-tuning\n")
    print("| backbone | px | train img/s | inference img/s | first step incl. tracing (s) |")
    print("|---|---|---|---|---|")
    for backbone in args.backbones:
        for size in args.sizes:
            size = max(size, 75) if backbone == "inceptionv3" else size  # keras' minimum for InceptionV3
            r = measure(backbone, size, args.batch, args.warmup, args.steps)
            print(
                f"| {backbone} | {size} | {r['train_img_s']:.1f} | {r['infer_img_s']:.1f} | {r['first_step_s']:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
