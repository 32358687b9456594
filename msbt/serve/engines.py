"""One interface over the four ways an exported stage-2 model can run: ``predict(batch_uint8) -> p``.

An ``msbt export`` folder (:mod:`msbt.serve.export`) holds the same model four times:

* ``keras``: ``model.keras`` run by Keras inside a ``tf.function`` (the reference every other engine is
  compared with);
* ``savedmodel``: ``saved_model/``'s ``serve_uint8`` signature (TensorFlow only, no Keras, no msbt);
* ``onnx``: ``model.onnx`` (tf2onnx from the same uint8 signature) in ONNX Runtime;
* ``openvino``: ``openvino/model.xml`` (converted from the ONNX model, weights kept in float32) in
  OpenVINO Runtime, compiled with ``INFERENCE_PRECISION_HINT: f32``. Left to itself OpenVINO picks
  bfloat16 on CPUs that have it (AVX512_BF16 or AMX; ``BF16`` among the CPU's optimization
  capabilities); ``precision="bf16"`` asks for that explicitly, is refused with the reason on a CPU
  without it (e.g. AMD Zen 3, Intel desktop CPUs without AVX-512), and is reduced precision: its outputs are
  not within the float parity bound.

``onnx`` and ``openvino`` also run ``precision="int8"``: ``model_int8.onnx``, written by ``msbt export
--int8`` only when the test-split AUC held (:mod:`msbt.serve.quantize`; its AUC change is in
``export.json`` under ``int8``). OpenVINO reads the quantized ONNX model and runs it in int8.

Every engine takes the uint8 pixels of images already prepared as in training (``(N, S, S, 3)``, RGB,
at the model's input size: :func:`msbt.serve.predict.prepare_rgb` + ``model_inputs``) and returns the
malignancy probability per image, float64 ``(N,)``. The model's own preprocessing (``Preprocess``
layer, the backbone's normalisation) is inside every exported graph; no engine re-implements it.
"""

from __future__ import annotations

import json
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from msbt.serve.predict import Preparation, Threshold

ENGINES = ("keras", "savedmodel", "onnx", "openvino")
PRECISIONS = ("f32", "bf16", "int8")
ONNX_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"  # msbt.serve.quantize
OPENVINO_DIR = "openvino"
OPENVINO_FILE = "model.xml"
# Float engines must agree with Keras to this much (max |p_engine - p_keras|) on real images.
FLOAT_PARITY = 1e-4


class EngineError(ValueError):
    """An engine cannot be loaded from a folder; the message names the folder and what is missing."""


@dataclass
class Engine:
    """A loaded model: ``predict`` maps uint8 ``(N, S, S, 3)`` to float64 probabilities ``(N,)``."""

    name: str
    precision: str  # "f32" (float parity with Keras expected), "bf16" or "int8" (reduced)
    image_size: int
    path: str
    run: Callable[[np.ndarray], np.ndarray]
    owner: object = None  # the runtime object ``run`` calls into (a loaded SavedModel dies with its last reference)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Malignancy probabilities of a batch of prepared uint8 images.

        Raises:
            ValueError: Not uint8 ``(N, S, S, 3)`` at the model's size (a wrong input would otherwise
                be silently cast or fail deep inside the runtime).
        """
        images = np.asarray(images)
        s = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"{self.name} engine takes uint8 (N, {s}, {s}, 3) images, got {images.dtype} "
                             f"{images.shape}")
        if len(images) == 0:
            return np.zeros(0, np.float64)
        return np.asarray(self.run(np.ascontiguousarray(images)), np.float64).reshape(-1)


def load_engine(folder: str | Path, name: str = "openvino", *, precision: str = "f32",
                threads: int | None = None, streams: int = 1) -> Engine:
    """Load one engine from an ``msbt export`` folder (``keras`` also from a stage-2 checkpoint).

    Args:
        folder: The export folder.
        name: One of :data:`ENGINES`.
        precision: ``"f32"``; OpenVINO also ``"bf16"``; ONNX Runtime and OpenVINO also ``"int8"`` (an
            export made with ``--int8``). Reduced precisions are not within the float parity bound.
        threads: Intra-op threads (ONNX Runtime, OpenVINO, TensorFlow); default: the runtime's choice
            (all cores). A Ray Serve replica passes its CPU share.
        streams: Batches ``predict`` may run at once from several threads (OpenVINO: that many inference
            streams sharing ``threads``; ONNX Runtime: ``threads // streams`` threads per call; TensorFlow
            shares one pool). 1 (default): one batch at a time on all threads, the lowest latency.

    Raises:
        EngineError: Unknown engine or precision, or the folder lacks the engine's files.
    """
    folder = Path(folder).expanduser()
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    allowed = {"keras": ("f32",), "savedmodel": ("f32",), "onnx": ("f32", "int8"), "openvino": PRECISIONS}[name]
    if precision not in allowed:
        raise EngineError(f"precision {precision!r} is not available for the {name} engine "
                          f"(f32 everywhere; bf16 with openvino; int8 with onnx and openvino)")
    if streams < 1:
        raise EngineError(f"streams must be at least 1, got {streams}")
    loader = {"keras": _keras, "savedmodel": _savedmodel, "onnx": _onnx, "openvino": _openvino}[name]
    return loader(folder, precision, threads, streams)


def engine_file(folder: str | Path, name: str, precision: str = "f32") -> Path:
    """The file (or folder) of an export that engine ``name`` loads at ``precision``."""
    folder = Path(folder)
    if precision == "int8":
        return folder / INT8_FILE
    return {"keras": folder / "model.keras", "savedmodel": folder / "saved_model", "onnx": folder / ONNX_FILE,
            "openvino": folder / OPENVINO_DIR / OPENVINO_FILE}[name]


def check_engine_files(folder: str | Path, name: str, precision: str = "f32") -> Path:
    """The file engine ``name`` loads at ``precision`` from an export folder, or EngineError naming it and the
    command that writes it (what the engine's loader would fail on, checked without loading anything)."""
    what = f"int8 {name}" if precision == "int8" else name
    return _need(engine_file(folder, name, precision), what)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        how = "`msbt export --int8` (kept only when the test AUC holds)" if "int8" in what else "`msbt export`"
        raise EngineError(f"{path}: missing, so the {what} engine cannot run from {path.parent} "
                          f"(re-run {how} to write it)")
    return path


def _tf_threads(threads: int | None) -> None:
    import tensorflow as tf

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already started in this process: keep its pool
            pass


def _keras(folder: Path, precision: str, threads: int | None, streams: int = 1) -> Engine:
    import tensorflow as tf

    from msbt.model.models import load_model

    _tf_threads(threads)
    model = load_model(_need(folder / "model.keras", "keras"))
    size = int(model.input_shape[1])

    # One traced graph for every batch size; model.predict would add a per-call dataset pipeline.
    @tf.function(input_signature=[tf.TensorSpec((None, size, size, 3), tf.uint8)])
    def probability(images):
        return tf.reshape(model(tf.cast(images, tf.float32), training=False), [-1])

    return Engine("keras", precision, size, str(folder), lambda x: probability(x).numpy())


def _savedmodel(folder: Path, precision: str, threads: int | None, streams: int = 1) -> Engine:
    import tensorflow as tf

    _tf_threads(threads)
    loaded = tf.saved_model.load(str(_need(folder / "saved_model", "savedmodel")))
    fn = loaded.serve_uint8
    size = int(fn.input_signature[0].shape[1])
    return Engine("savedmodel", precision, size, str(folder),
                  lambda x: fn(tf.constant(x))["probability"].numpy(), owner=loaded)


def _onnx(folder: Path, precision: str, threads: int | None, streams: int = 1) -> Engine:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:  # a session runs concurrent calls, each on its own intra-op pool of this size
        options.intra_op_num_threads = max(1, threads // streams)
    model = _need(folder / INT8_FILE, "int8 onnx") if precision == "int8" else _need(folder / ONNX_FILE, "onnx")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    return Engine("onnx", precision, int(inp.shape[1]), str(folder),
                  lambda x: session.run(None, {inp.name: x})[0])


def _openvino(folder: Path, precision: str, threads: int | None, streams: int = 1) -> Engine:
    import openvino as ov

    core = ov.Core()
    capabilities = openvino_capabilities(core)
    if precision == "bf16" and "BF16" not in capabilities:
        raise EngineError(f"{folder}: bf16 is not available on this CPU (OpenVINO CPU capabilities: "
                          f"{', '.join(capabilities)}); use f32")
    # int8: the quantized ONNX model, its float parts (e.g. the head) kept in float32
    hint = "f32" if precision == "int8" else precision
    # one stream: every thread on one batch (lowest latency); several: independent streams sharing the threads
    config = {"PERFORMANCE_HINT": "THROUGHPUT" if streams > 1 else "LATENCY", "INFERENCE_PRECISION_HINT": hint}
    if streams > 1:
        config["NUM_STREAMS"] = int(streams)
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    model = (_need(folder / INT8_FILE, "int8 openvino") if precision == "int8"
             else _need(folder / OPENVINO_DIR / OPENVINO_FILE, "openvino"))
    compiled = core.compile_model(core.read_model(str(model)), "CPU", config)
    used = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    # Refuse silently different arithmetic: the name says what ran (e.g. f16 on a CPU without bf16).
    if used != hint:
        raise EngineError(f"{folder}: OpenVINO compiled with precision {used}, not the {precision} asked for")
    # One infer request per stream, reused (no per-call allocation); a call takes a free one, or waits for one
    requests: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(streams):
        requests.put(compiled.create_infer_request())
    size = int(compiled.inputs[0].get_partial_shape()[1].get_length())
    output = compiled.outputs[0]

    def run(x: np.ndarray) -> np.ndarray:
        request = requests.get()
        try:
            return np.array(request.infer([x])[output])  # a copy: the request's output buffer is reused
        finally:
            requests.put(request)

    return Engine("openvino", precision, size, str(folder), run)


@dataclass
class ServedModel:
    """An engine with what a caller reports beside its probabilities (from ``export.json``)."""

    engine: Engine
    folder: str
    threshold: "Threshold"
    preparation: "Preparation"
    class_names: list[str]
    model_id: str
    lineage_sha256: str
    notes: list[str]


def load_served(folder: str | Path, name: str = "openvino", *, precision: str = "f32", threads: int | None = None,
                threshold: float | None = None, streams: int = 1) -> ServedModel:
    """An export folder's engine, threshold, preparation, class names, model id and lineage hash.

    Raises:
        EngineError: Not an ``msbt export`` folder (no ``export.json``), or the engine's files are missing.
        ValueError: A threshold outside [0, 1].
    """
    from msbt.serve.predict import EXPORT_FILE, find_preparation, find_threshold

    folder = Path(folder).expanduser()
    record_file = folder / EXPORT_FILE
    if not record_file.is_file():
        raise EngineError(f"{folder}: not an `msbt export` folder (no {EXPORT_FILE}); run `msbt export` first")
    record = json.loads(record_file.read_text())
    chosen, notes = find_threshold(folder, threshold)  # a bad threshold fails before the model loads
    engine = load_engine(folder, name, precision=precision, threads=threads, streams=streams)
    preparation, more = find_preparation(folder, engine.image_size)
    int8 = record.get("int8") or {}
    if precision == "int8" and int8.get("accepted"):  # reduced precision is never used without its cost beside it
        more.append(f"int8 engine: test AUC {int8['auc_f32']:.4f} (float32) -> {int8['auc_int8']:.4f} (int8) on "
                    f"{int8['test_images']} test images, {int8.get('labels_changed', '?')} labels changed at the "
                    "threshold (export.json)")
    bf16 = (record.get("engines") or {}).get("openvino_bf16") or {}
    if precision == "bf16":  # said, as int8's cost is: nothing bounds it (until 2026-12-07 it ran without a word)
        measured = (f"its max |p - p_keras| was {bf16['max_abs_diff']:.2e} on {bf16.get('frames', '?')} synthetic "
                    "frames at export" if "max_abs_diff" in bf16 else
                    "export did not measure it: no bfloat16 on the exporting CPU, or an export made before 2026-12-07")
        more.append(f"bf16 engine: reduced precision, not held to the float engines' {FLOAT_PARITY:.0e} bound and "
                    f"with no AUC change measured ({measured}); use f32 (or an accepted int8) for decisions")
    return ServedModel(engine, str(folder), chosen, preparation, list(record["class_names"]),
                       record.get("model_id", ""), record.get("lineage_sha256", ""), notes + more)


def openvino_default_precision() -> str:
    """The inference precision OpenVINO picks on this machine's CPU when not told (``bf16`` or ``f32``)."""
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


def openvino_capabilities(core=None) -> list[str]:
    """What OpenVINO's CPU plugin can compute on this CPU, e.g. ``["FP32", "BF16", "INT8", ...]``."""
    if core is None:
        import openvino as ov

        core = ov.Core()
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def openvino_has_bf16() -> bool:
    """Whether this CPU runs OpenVINO models in bfloat16 (AVX512_BF16 or AMX)."""
    return "BF16" in openvino_capabilities()

