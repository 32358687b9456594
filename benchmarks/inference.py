"""Benchmark: inference engines, `msbt stream` end to end, and `msbt serve` under load, in one run.

    flock /tmp/msbt-heavy.lock python benchmarks/inference.py --out runs/bench/inference.json
    python benchmarks/inference.py --smoke-test          # a minute: Lite0 at 32 px, short timings

For each model (EfficientNet-Lite0 at 96 and 224 px, ResNet50 at 200 px, the paper's; random weights,
since speed does not depend on them; the paper's stage-2 head) the script writes a stage-2 checkpoint,
runs ``msbt export`` on it (which checks every float engine against Keras on synthetic ultrasound frames)
and then measures, side by side in this process:

* each engine (Keras ``tf.function``, SavedModel, ONNX Runtime, OpenVINO f32, OpenVINO bf16, and ONNX Runtime
  and OpenVINO on the int8 model of ``msbt.serve.quantize.quantize``, calibrated here on the synthetic
  frames: random weights have no AUC to check, so these rows are speed only; a real export keeps int8
  only when its test AUC holds, ``msbt export --int8``): single-stream
  frames/s at batch 1 (1 / mean latency), latency p50/p99, and images/s at each batch size of
  ``--batches`` (the best is reported);
* ``msbt stream`` end to end on the demo cine loop (``msbt synth --cine``, 256 px frames): video decode,
  preparation, inference with OpenVINO f32 and the per-frame CSV, every frame scored (``--all-frames``);
  compared with the bare engine's single-stream rate;
* ``msbt serve`` (a private local Ray cluster, OpenVINO f32, one replica with all CPUs) under
  ``--clients`` concurrent clients posting PNG frames for ``--serve-seconds`` each to 127.0.0.1:
  requests/s, latency p50/p99, errors; once per ``--serve-streams`` value (``serve.streams``: batches the
  replica scores at once), each compared with the bare engine's images/s at the serve batch size, both
  single-stream and with the same streams (as many threads each scoring batches); and where each answered
  request's CPU went (the replica, Serve's HTTP proxy, the cluster's other processes, this process's client
  threads) against the bare engine's CPU per image.

Prints a Markdown table and writes every figure as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

MODELS = (("resnet50", 200), ("efficientnet_lite0", 224), ("efficientnet_lite0", 96))  # the paper's model first
ENGINE_RUNS = (("keras", "f32"), ("savedmodel", "f32"), ("onnx", "f32"), ("openvino", "f32"), ("openvino", "bf16"),
               ("onnx", "int8"), ("openvino", "int8"))


def make_export(root: Path, backbone: str, size: int) -> Path:
    """A stage-2 checkpoint with random weights, exported with ``msbt export``."""
    import keras

    from msbt.config import Config, StageConfig
    from msbt.model.checkpoint import MODEL_FILE, write_manifest
    from msbt.model.models import build_model
    from msbt.serve.export import export

    stage = StageConfig(backbone=backbone, weights="none", image_size=size, head=Config().stage2.head)
    checkpoint = root / f"{backbone}-{size}" / "checkpoint"
    checkpoint.mkdir(parents=True)
    keras.utils.set_random_seed(0)
    build_model(stage, 2).save(checkpoint / MODEL_FILE)
    write_manifest(checkpoint, stage_config=stage, class_names=["benign", "malignant"], metrics={}, best_epoch=1)
    export(checkpoint, checkpoint.parent / "export")
    return checkpoint.parent / "export"


def latencies(fn, seconds: float, min_calls: int = 20) -> np.ndarray:
    """Seconds per call of ``fn`` over at least ``seconds`` (and ``min_calls`` calls)."""
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(out) < min_calls:
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return np.array(out)


def bench_engine(engine, images: np.ndarray, seconds: float, batches: list[int]) -> dict:
    """Batch-1 frames/s and latency percentiles, and images/s per batch size."""
    one = images[:1]
    latencies(lambda: engine.predict(one), 0.5, 5)  # warm-up: first calls allocate and tune
    lat = latencies(lambda: engine.predict(one), seconds)
    result = {"fps_b1": 1.0 / lat.mean(), "p50_ms": 1e3 * np.percentile(lat, 50),
              "p99_ms": 1e3 * np.percentile(lat, 99), "calls_b1": len(lat), "throughput": {}}
    for b in batches:
        batch = images[np.arange(b) % len(images)]
        engine.predict(batch)
        t = latencies(lambda: engine.predict(batch), seconds / 2, 3)
        result["throughput"][b] = b / t.mean()
    best = max(result["throughput"], key=result["throughput"].get)
    result["best_batch"], result["best_img_s"] = best, result["throughput"][best]
    return result


def bench_stream(folder: Path, cine: Path, out: Path) -> dict:
    """``msbt stream --all-frames`` on the cine loop with OpenVINO f32: scored frames/s end to end."""
    from msbt.serve.engines import load_served
    from msbt.serve.stream import open_source, stream

    served = load_served(folder, "openvino")
    summary = stream(served.engine, open_source(cine), served.preparation, served.threshold, served.class_names,
                     out, pace=False)
    paced = stream(served.engine, open_source(cine), served.preparation, served.threshold, served.class_names,
                   out.with_name("paced.csv"), pace=True)
    return {"frames": summary.frames_scored, "seconds": summary.seconds, "fps": summary.scored_fps,
            "paced_source_fps": paced.source_fps, "paced_scored": paced.frames_scored,
            "paced_dropped": paced.frames_dropped}


def bench_concurrent(folder: Path, images: np.ndarray, batch: int, streams: int, seconds: float) -> dict:
    """The OpenVINO f32 engine with ``streams`` streams, ``streams`` threads each scoring batches: its images/s
    (``img_s``) and this process's CPU ms per image (``cpu_ms_per_img``)."""
    from msbt.serve.engines import load_engine

    engine = load_engine(folder, "openvino", threads=len(os.sched_getaffinity(0)), streams=streams)
    x = images[np.arange(batch) % len(images)]
    engine.predict(x)
    counts = [0] * streams
    stop = time.perf_counter() + seconds

    def work(k: int) -> None:
        while time.perf_counter() < stop:
            engine.predict(x)
            counts[k] += batch

    start, cpu = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"img_s": sum(counts) / elapsed, "cpu_ms_per_img": 1e3 * cpu / max(1, sum(counts))}


def cluster_cpu() -> dict[tuple[int, float], tuple[str, float]]:
    """CPU seconds so far of each process of this process's Ray cluster (its descendants), keyed by pid and start
    time, with its role: Serve's replica, its HTTP proxy, the rest (GCS, raylet, agents, controller, workers)."""
    import psutil

    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            name, times, started = " ".join(proc.cmdline()), proc.cpu_times(), proc.create_time()
        except psutil.Error:  # ended between the listing and the read
            continue
        role = "replica" if "ServeReplica" in name else "proxy" if "ProxyActor" in name else "rest"
        found[(proc.pid, started)] = (role, times.user + times.system)
    return found


def cpu_by_role(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds each role used between two :func:`cluster_cpu` snapshots: a process started in between counts
    whole, one that ended in between is left out (its last seconds unseen; never subtracted)."""
    roles = {"replica": 0.0, "proxy": 0.0, "rest": 0.0}
    for key, (role, cpu) in after.items():
        roles[role] += cpu - before.get(key, (role, 0.0))[1]
    return roles


def bench_serve(folder: Path, pngs: list[bytes], clients: int, seconds: float, batch: int, streams: int = 1) -> dict:
    """``msbt serve`` on a private Ray cluster; ``clients`` threads post frames for ``seconds``."""
    import ray
    import requests
    from ray import serve

    from msbt.config import ServeConfig
    from msbt.serve import app

    cpus = len(os.sched_getaffinity(0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        config = ServeConfig(port=port, engine="openvino", cpus_per_replica=float(cpus), max_batch_size=batch,
                             streams=streams)
        url = app.run(folder, config, blocking=False) + "/predict"
        for body in pngs[:4]:  # warm-up
            requests.post(url, data=body, timeout=120).raise_for_status()
        times: list[float] = []
        errors = [0]
        lock = threading.Lock()
        stop = time.perf_counter() + seconds

        def client(k: int) -> None:
            session = requests.Session()
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    ok = session.post(url, data=pngs[i % len(pngs)], timeout=60).status_code == 200
                except requests.RequestException:
                    ok = False
                with lock:
                    times.append(time.perf_counter() - t) if ok else None
                    errors[0] += not ok
                i += clients

        start, before, own = time.perf_counter(), cluster_cpu(), time.process_time()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed, after, own = time.perf_counter() - start, cluster_cpu(), time.process_time() - own
        lat = np.array(times)
        # CPU per answered request, by process: where a request's cost beyond the model goes on these cores
        cpu_ms = {role: 1e3 * cpu / max(1, len(lat)) for role, cpu in cpu_by_role(before, after).items()}
        cpu_ms["clients"] = 1e3 * own / max(1, len(lat))  # this process: the client threads and Ray's driver
        return {"clients": clients, "seconds": elapsed, "requests": len(lat), "errors": errors[0],
                "rps": len(lat) / elapsed, "p50_ms": 1e3 * np.percentile(lat, 50),
                "p99_ms": 1e3 * np.percentile(lat, 99), "batch": batch, "cpus": cpus, "streams": streams,
                "cpu_ms_per_request": cpu_ms}
    finally:
        serve.shutdown()
        ray.shutdown()


def prepared_frames(cine_frames: list[np.ndarray], folder: Path) -> np.ndarray:
    from msbt.serve.engines import load_served
    from msbt.serve.predict import model_inputs, prepare_rgb

    served = load_served(folder, "onnx")
    return np.concatenate([model_inputs(prepare_rgb(np.dstack([f] * 3), served.preparation)[None],
                                        served.engine.image_size) for f in cine_frames])


def run(args) -> dict:
    import cv2

    from msbt.data.synth import cine_frames, write_cine
    from msbt.serve.engines import load_engine, openvino_has_bf16

    root = Path(tempfile.mkdtemp(prefix="msbt-bench-"))
    cine = write_cine(root / "cine.avi", frames=args.cine_frames, fps=30.0, size=256)
    frames = cine_frames(frames=16, size=256)
    pngs = [cv2.imencode(".png", f)[1].tobytes() for f in frames]
    results = {"cpus": len(os.sched_getaffinity(0)), "load_before": os.getloadavg(), "models": {}}
    for backbone, size in args.models:
        key = f"{backbone}@{size}"
        t = time.perf_counter()
        folder = make_export(root, backbone, size)
        record = json.loads((folder / "export.json").read_text())
        entry = {"export_s": time.perf_counter() - t, "parity": record["engines"], "engines": {}}
        images = prepared_frames(frames, folder)
        from msbt.serve.quantize import INT8_FILE, quantize

        quantize(folder / "model.onnx", folder / INT8_FILE, images)
        reference = load_engine(folder, "onnx").predict(images)
        entry["parity"]["int8"] = {"max_abs_diff": float(np.abs(
            load_engine(folder, "onnx", precision="int8").predict(images) - reference).max())}
        for name, precision in ENGINE_RUNS:
            if precision == "bf16" and not openvino_has_bf16():
                print(f"{key} {name}-{precision}: skipped, this CPU has no bfloat16", flush=True)
                continue
            engine = load_engine(folder, name, precision=precision)
            entry["engines"][f"{name}-{precision}"] = bench_engine(engine, images, args.seconds, args.batches)
            del engine
            print(f"{key} {name}-{precision}: {entry['engines'][f'{name}-{precision}']['fps_b1']:.1f} fps", flush=True)
        entry["stream"] = bench_stream(folder, cine, root / key / "stream.csv")
        results["models"][key] = entry
        if key in args.serve_models:
            entry["serve"] = []
            for streams in args.serve_streams:  # side by side in this run: the replica's streams, and the bare
                try:                            # engine with as many streams scoring batches from as many threads
                    bare = bench_concurrent(folder, images, args.serve_batch, streams, args.seconds)
                    entry["serve"].append({**bench_serve(folder, pngs, args.clients, args.serve_seconds,
                                                         args.serve_batch, streams),
                                           "bare_streams_img_s": bare["img_s"],
                                           "bare_cpu_ms_per_img": bare["cpu_ms_per_img"]})
                except Exception as err:  # keep the engine figures; the table says serve failed
                    entry["serve_error"] = f"streams {streams}: {type(err).__name__}: {err}"
        print(json.dumps({k: entry[k] for k in ("stream", "serve", "serve_error") if k in entry}), flush=True)
        if args.out:  # after every model, so a later failure keeps what was measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2, default=float) + "\n")
    results["load_after"] = os.getloadavg()
    return results


def table(results: dict, serve_batch: int) -> str:
    lines = ["| model | engine | max abs diff vs Keras | fps (batch 1) | p50 ms | p99 ms | best img/s (batch) |",
             "|---|---|---|---|---|---|---|"]
    for key, entry in results["models"].items():
        for name, r in entry["engines"].items():
            parity_key = ("openvino_bf16" if name == "openvino-bf16" else "int8" if name.endswith("int8")
                          else name.split("-")[0])  # int8: against ONNX Runtime f32 (speed only, see above)
            diff = entry["parity"].get(parity_key, {}).get("max_abs_diff")
            lines.append(f"| {key} | {name} | {diff:.1e} | {r['fps_b1']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
                         f"| {r['best_img_s']:.1f} ({r['best_batch']}) |")
    lines += ["", "| model | stream fps (end to end) | bare OpenVINO f32 fps | ratio "
              "| paced 30 fps: scored / dropped |", "|---|---|---|---|---|"]
    for key, entry in results["models"].items():
        s, bare = entry["stream"], entry["engines"]["openvino-f32"]
        lines.append(f"| {key} | {s['fps']:.1f} | {bare['fps_b1']:.1f} | {s['fps'] / bare['fps_b1']:.2f} "
                     f"| {s['paced_scored']} / {s['paced_dropped']} |")
    lines += ["", f"| model | replica streams | serve req/s | p50 ms | p99 ms | errors "
              f"| bare img/s at batch {serve_batch} (1 stream) | ratio | bare img/s, same streams | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key, entry in results["models"].items():
        bare_b = entry["engines"]["openvino-f32"]["throughput"].get(serve_batch, float("nan"))
        for v in entry.get("serve", []):
            lines.append(f"| {key} | {v['streams']} | {v['rps']:.1f} | {v['p50_ms']:.0f} | {v['p99_ms']:.0f} "
                         f"| {v['errors']} | {bare_b:.1f} | {v['rps'] / bare_b:.2f} | {v['bare_streams_img_s']:.1f} "
                         f"| {v['rps'] / v['bare_streams_img_s']:.2f} |")
        if "serve_error" in entry:
            lines.append(f"| {key} | serve failed: {entry['serve_error']} |")
    lines += ["", "CPU ms per answered request, by process, against the bare engine's CPU ms per image (same streams):",
              "", "| model | replica streams | replica | HTTP proxy | rest of the cluster | clients + driver | all "
              "| bare engine per image |", "|---|---|---|---|---|---|---|---|"]
    for key, entry in results["models"].items():
        for v in entry.get("serve", []):
            c = v["cpu_ms_per_request"]
            lines.append(f"| {key} | {v['streams']} | {c['replica']:.1f} | {c['proxy']:.1f} | {c['rest']:.1f} "
                         f"| {c['clients']:.1f} | {sum(c.values()):.1f} | {v['bare_cpu_ms_per_img']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per engine and batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--cine-frames", type=int, default=150)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--serve-seconds", type=float, default=30.0)
    parser.add_argument("--serve-batch", type=int, default=8)
    parser.add_argument("--serve-streams", type=int, nargs="+", default=[1, 2],
                        help="replica streams (serve.streams) to measure, each against the bare engine")
    parser.add_argument("--serve-models", nargs="*", default=["resnet50@200", "efficientnet_lite0@224"])
    parser.add_argument("--models", nargs="+", metavar="BACKBONE@SIZE",
                        help="models to measure (default: " + " ".join(f"{b}@{s}" for b, s in MODELS) + ")")
    parser.add_argument("--out", help="write all figures here as JSON")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    args.models = [(m.split("@")[0], int(m.split("@")[1])) for m in args.models] if args.models else MODELS
    if args.smoke_test:
        args.models, args.seconds, args.batches, args.cine_frames = (("efficientnet_lite0", 32),), 0.3, [1, 4], 20
        args.serve_models, args.serve_seconds, args.serve_batch = ["efficientnet_lite0@32"], 3.0, 4
    results = run(args)
    results["table"] = table(results, args.serve_batch)
    print(results["table"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
