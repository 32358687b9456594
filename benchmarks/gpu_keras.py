"""Benchmark: the paper's stage-2 model on a GPU through Keras 3's JAX or PyTorch backend (no TensorFlow).

    python benchmarks/gpu_keras.py                           # on a GPU machine; JAX, then PyTorch
    python benchmarks/gpu_keras.py --smoke --backends jax    # anywhere: 32 px, a few images, seconds

Why a second GPU benchmark beside ``benchmarks/gpu.sh``. That script times msbt's own stage (TensorFlow,
tf.data, Ray Train) and needs TensorFlow with CUDA. The GPU machine lent to this project's sessions has
JAX and PyTorch with CUDA 13 but no TensorFlow and no Ray, and reaches no package index; TensorFlow's
wheel and its CUDA 12 libraries (gigabytes) cannot be carried there. Keras 3 runs the same model code
on JAX or PyTorch, so this script times what can be timed there: **the paper's stage-2 model, built by
``msbt.model.models.build_model`` and compiled by ``msbt.model.compiled.compile_model``** (ResNet50 at
200 px, the three-Dense head, Adagrad lr 0.001, the stage's loss and metrics), trained with Keras
``fit`` at batch 16 on random images in the paper's number (525 training images per epoch after the
tripling, 50 validation images per epoch), random weights (speed does not depend on them). What it
does not time: msbt's input pipeline (tf.data decoding and augmentation), Ray Train, TensorFlow's own
GPU kernels. The figures are the model's compute on that GPU through Keras on JAX or PyTorch.

Each backend runs in its own process (Keras picks its backend once per process). Runs, in order of
value: training in float32, inference (batch 1 latency p50/p99 and throughput at batch 64) of the
stage-2 model, training under ``mixed_bfloat16`` and ``mixed_float16`` (msbt's ``run.mixed_precision``
uses the latter), EfficientNet-Lite0 at 224 px inference, and last the stage with EfficientNet-Lite0 at
224 px (3 epochs; its training speed under XLA is the unknown, so it must not cost the others). A run
is skipped when less of the backend's share of ``--budget`` is left than the longest training run so far
took (60 s before any), and a training run stops after the epoch that passes the share's end. The projected 30-epoch stage is first epoch + 29 x the median later epoch, beside
the paper's 400 s for stage 2 on two RTX 3090. ``--out FILE`` writes every result as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_stage import PAPER_EPOCHS, PAPER_STAGE_SECONDS, projection  # noqa: E402

TRAIN_IMAGES, VAL_IMAGES = 525, 50  # 175 training images tripled; 50 validation (7:2:1 of 250)
TAG = "RESULT "


# ---------------------------------------------------------------------------------------------------
# One backend, in its own process


def device_name(backend: str) -> str:
    if backend == "jax":
        import jax

        return ", ".join(f"{d.platform}:{getattr(d, 'device_kind', d)}" for d in jax.devices())
    if backend == "torch":
        import torch

        return f"cuda:{torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"
    return backend


def stage2_model(size: int, policy: str, backbone: str = "resnet50"):
    import keras

    from msbt.config import load_config
    from msbt.model.compiled import compile_model
    from msbt.model.models import build_model

    keras.mixed_precision.set_global_policy(policy)
    stage = load_config(overrides=["stage2.weights=none", f"stage2.image_size={size}",
                                   f"stage2.backbone={backbone}"]).stage2
    keras.utils.set_random_seed(0)
    model = build_model(stage, 2)
    compile_model(model, stage)
    return model, stage


def train_run(size: int, policy: str, epochs: int, n_train: int, n_val: int, backbone: str = "resnet50",
              deadline: float = float("inf")) -> dict:
    import keras
    import numpy as np

    model, stage = stage2_model(size, policy, backbone)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8).astype(np.float32)
    y = rng.integers(0, 2, (n_train, 1)).astype(np.float32)
    vx = rng.integers(0, 256, (n_val, size, size, 3), dtype=np.uint8).astype(np.float32)
    vy = rng.integers(0, 2, (n_val, 1)).astype(np.float32)

    ends: list[float] = []

    class EpochEnds(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ends.append(time.perf_counter())
            if ends[-1] > deadline and len(ends) >= 2:  # two epochs: the compile and one steady one
                self.model.stop_training = True

    began = time.perf_counter()
    history = model.fit(x, y, batch_size=stage.batch_size, epochs=epochs, shuffle=True, verbose=0,
                        validation_data=(vx, vy), callbacks=[EpochEnds()])
    times = [b - a for a, b in zip([began, *ends], ends)]
    loss = history.history["loss"][-1]
    if not np.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss}")
    return {**projection(times[0], times[1:], n_train), "epochs_run": len(times), "epochs_s": times,
            "batch": stage.batch_size, "train_images": n_train, "size": size, "last_loss": float(loss),
            "params": model.count_params()}


def infer_run(size: int, backbone: str, calls: int, big_batch: int) -> dict:
    import numpy as np

    model, _ = stage2_model(size, "float32", backbone)
    rng = np.random.default_rng(1)
    one = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8).astype(np.float32)
    many = rng.integers(0, 256, (big_batch, size, size, 3), dtype=np.uint8).astype(np.float32)
    for _ in range(5):  # compile and warm up both shapes
        np.asarray(model.predict_on_batch(one)), np.asarray(model.predict_on_batch(many))
    latencies = []
    for _ in range(calls):
        t = time.perf_counter()
        np.asarray(model.predict_on_batch(one))  # to the host: the frame's answer is in hand
        latencies.append(time.perf_counter() - t)
    t, reps = time.perf_counter(), max(3, calls // 20)
    for _ in range(reps):
        np.asarray(model.predict_on_batch(many))
    per_image = (time.perf_counter() - t) / (reps * big_batch)
    latencies.sort()  # nearest-rank percentiles
    p50, p99 = latencies[math.ceil(0.50 * calls) - 1], latencies[math.ceil(0.99 * calls) - 1]
    return {"p50_ms": 1e3 * p50, "p99_ms": 1e3 * p99, "fps_batch1": 1 / p50,
            "batch": big_batch, "images_per_s_batch": 1 / per_image}


def worker(backend: str, smoke: bool, budget: float, only: list[str], lite_size: int | None,
           images: int | None) -> int:
    """Runs the measurements of one backend (those named in ``only``, or all), one ``RESULT {json}`` line each."""
    started = time.perf_counter()
    size, lite_default = (32, 32) if smoke else (200, 224)
    lite_size = lite_size or lite_default
    n_train, n_val, epochs = (40, 8, 2) if smoke else (TRAIN_IMAGES, VAL_IMAGES, 4)
    n_train = images or n_train
    calls, big = (10, 8) if smoke else (200, 64)
    print(TAG + json.dumps({"backend": backend, "run": "device", "device": device_name(backend)}), flush=True)
    end = started + budget
    plan = [
        ("train float32", lambda: train_run(size, "float32", epochs, n_train, n_val, deadline=end)),
        ("infer resnet50 float32", lambda: infer_run(size, "resnet50", calls, big)),
        ("train mixed_bfloat16", lambda: train_run(size, "mixed_bfloat16", epochs, n_train, n_val, deadline=end)),
        ("train mixed_float16", lambda: train_run(size, "mixed_float16", epochs, n_train, n_val, deadline=end)),
        ("infer efficientnet_lite0 float32", lambda: infer_run(lite_size, "efficientnet_lite0", calls, big)),
        # Lite0 (depthwise convolutions) is msbt's CPU and multi-site backbone; its training speed under
        # XLA is unknown (a leave-one-site-out run of it on the H200 did not finish one fold in 385 s)
        ("train float32 efficientnet_lite0", lambda: train_run(lite_size, "float32", 3, n_train, n_val,
                                                               "efficientnet_lite0", deadline=end)),
    ]
    plan = [(name, run) for name, run in plan if not only or name in only]
    estimate = 60.0
    for name, run in plan:
        left = budget - (time.perf_counter() - started)
        if left < estimate:
            print(TAG + json.dumps({"backend": backend, "run": name, "skipped": f"{left:.0f} s of budget left"}),
                  flush=True)
            continue
        t = time.perf_counter()
        try:
            result = {"backend": backend, "run": name, **run()}
        except Exception as exc:  # report and go on: one failed run must not hide the others
            result = {"backend": backend, "run": name, "failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
        result["wall_s"] = time.perf_counter() - t
        estimate = max(estimate, result["wall_s"]) if name.startswith("train") else estimate
        print(TAG + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------
# The driver: one process per backend, a shared budget, the tables


def table(results: list[dict]) -> str:
    lines = ["stage 2 (the paper's head, Adagrad, random weights), Keras fit, validation each epoch",
             f"| backend | model, precision | px | batch | images/epoch | first epoch s | s/epoch | images/s | projected {PAPER_EPOCHS} epochs s | paper s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["run"].startswith("train") and "s_per_epoch" in r:
            model = r["run"].split()[2] if len(r["run"].split()) > 2 else "resnet50"
            lines.append(f"| {r['backend']} | {model} {r['run'].split()[1]} | {r['size']} | {r['batch']} | "
                         f"{r['train_images']} | {r['first_epoch_s']:.1f} | "
                         f"{r['s_per_epoch']:.2f} | {r['images_per_s']:.0f} | {r['projected_s']:.0f} | "
                         f"{PAPER_STAGE_SECONDS} (two RTX 3090) |")
    lines += ["", "inference, float32: batch 1 (to host) and a large batch",
              "| backend | model | p50 ms | p99 ms | frames/s batch 1 (1/p50) | images/s at batch |",
              "|---|---|---|---|---|---|"]
    for r in results:
        if r["run"].startswith("infer") and "p50_ms" in r:
            lines.append(f"| {r['backend']} | {r['run'].split()[1]} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{r['fps_batch1']:.0f} | {r['images_per_s_batch']:.0f} at {r['batch']} |")
    for r in results:
        if "failed" in r or "skipped" in r:
            lines.append(f"{r['backend']} {r['run']}: {r.get('failed') or 'skipped, ' + r['skipped']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="jax,torch", help="comma-separated Keras backends, in order")
    parser.add_argument("--budget", type=float, default=400, help="seconds for all backends together")
    parser.add_argument("--smoke", action="store_true", help="32 px, few images: a plumbing check on any machine")
    parser.add_argument("--out", help="write every result as JSON here")
    parser.add_argument("--only", action="append", default=[], metavar="RUN",
                        help="run only this one (repeatable), e.g. 'train float32 efficientnet_lite0'")
    parser.add_argument("--lite-size", type=int, help="EfficientNet-Lite0's image size (default 224)")
    parser.add_argument("--images", type=int, help=f"training images per epoch (default {TRAIN_IMAGES})")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.smoke, args.budget, args.only, args.lite_size, args.images)

    started, results, failed = time.perf_counter(), [], False
    backends = [b for b in args.backends.split(",") if b]
    for i, backend in enumerate(backends):
        left = args.budget - (time.perf_counter() - started)
        share = left / (len(backends) - i) if i < len(backends) - 1 else left
        # The first backend gets the larger share: JAX is the one Keras recommends for speed.
        share = max(share, 0.6 * left) if i == 0 and len(backends) > 1 else share
        if share < 60:
            results.append({"backend": backend, "run": "all", "skipped": f"{share:.0f} s of budget left"})
            continue
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, __file__, "--worker", backend, "--budget", f"{share:.0f}"]
        cmd += ["--smoke"] if args.smoke else []
        cmd += [f"--only={name}" for name in args.only]
        cmd += [f"--lite-size={args.lite_size}"] if args.lite_size else []
        cmd += [f"--images={args.images}"] if args.images else []
        print(f"== {backend}: {share:.0f} s of budget", flush=True)
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace", timeout=share + 120)
        except subprocess.TimeoutExpired as stopped:  # keep the runs it finished, and what it said

            def text(out) -> str:
                return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")

            done = subprocess.CompletedProcess(cmd, -9, text(stopped.stdout),
                                               text(stopped.stderr) + "\ntimed out: a run overran the backend's budget")
        if args.out:  # the backend's own messages (XLA, CUDA), for a run that needs explaining
            Path(args.out).with_suffix(f".{backend}.stderr.txt").write_text(done.stderr[-200_000:])
        for line in done.stdout.splitlines():
            if line.startswith(TAG):
                results.append(json.loads(line[len(TAG):]))
                print(line[len(TAG):], flush=True)
        if done.returncode != 0:
            failed = True
            results.append({"backend": backend, "run": "all",
                            "failed": f"exit {done.returncode}: {done.stderr.strip()[-600:]}"})
    failed = failed or any("failed" in r for r in results)
    print("\n" + table(results))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
