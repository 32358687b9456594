"""int8 engines: post-training quantization of an export's ONNX model, kept only within an AUC bound.

``msbt export --int8`` calls :func:`add_int8`. The export's ``model.onnx`` (uint8 pixels in, probability
out, all preprocessing inside) is quantized by ONNX Runtime's static quantizer (``onnxruntime.quantization``:
weights int8 per output channel, activations uint8, QDQ format) with activation ranges calibrated on
images of the run's **training** split. The result, ``model_int8.onnx``, runs in ONNX Runtime and in
OpenVINO (which reads the QDQ nodes and runs the convolutions in int8): engines ``onnx`` and
``openvino`` with ``precision="int8"`` (:mod:`msbt.serve.engines`).

Reduced precision changes the scores, so it is judged on the decision the model is for: the AUC of the
float32 ONNX engine and of the int8 one on the run's **test** split (every image, exact AUC), written
into ``export.json`` beside the engine. When the AUC moves by more than ``max_auc_change`` (either way:
:func:`accepted`) the int8 model is deleted and the refusal is recorded instead. Calibration never sees a test image.

Written on ONNX Runtime's quantizer (already a dependency through the ``onnx`` engine) rather than
OpenVINO's NNCF: one more package would bring nothing the QDQ model does not already give OpenVINO.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from msbt.data.store import Store
from msbt.eval.metrics import roc_auc

log = logging.getLogger(__name__)

INT8_FILE = "model_int8.onnx"
CALIBRATION_IMAGES = 64  # training-split images whose activations set the int8 ranges


def quantize(onnx_path: str | Path, out_path: str | Path, calibration: np.ndarray) -> Path:
    """Statically quantize ``onnx_path`` (uint8 image input) to ``out_path`` with ``calibration`` images.

    Args:
        calibration: uint8 ``(N, S, S, 3)`` images at the model's input size, fed one at a time.
    """
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class _Images(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter([{name: calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self._feeds, None)

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="int8-", dir=out_path.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Shape inference and graph clean-up the quantizer expects (symbolic shapes: not needed, the
        # input is (N, S, S, 3) with a fixed S).
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), _Images(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    return out_path


def split_images(store: Store, split: str, size: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 images at the model's size, labels)`` of one split of a store: all of it, or a seeded
    sample of ``limit`` rows spread over the classes (calibration must see both)."""
    from msbt.serve.predict import model_inputs

    if limit is not None:
        images, labels = store.sample_split(split, limit, seed=0)
    else:
        rows = store.read(columns=["image", "label_index"], split=split)
        images = rows.get("image", np.zeros((0, *store.image_shape), np.uint8))
        labels = np.asarray(rows.get("label_index", np.zeros(0)), np.int64)
    if len(images) == 0:
        return np.zeros((0, size, size, 3), np.uint8), labels
    return model_inputs(images, size), labels


def accepted(auc_f32: float, auc_int8: float, max_auc_change: float) -> bool:
    """Whether an int8 model is kept: its AUC is within ``max_auc_change`` of the float32 model's, either way.

    Two-sided: every number of the run (metrics.json, the report) was measured on the float model, and an
    int8 model whose AUC moved up by more than the bound scores the images differently enough that those
    numbers no longer describe it either (on a test split of a few dozen lesions a gain is as much chance
    as a loss). Until 2026-12-07 a gain always passed."""
    return bool(abs(auc_int8 - auc_f32) <= max_auc_change)


def add_int8(folder: str | Path, store_path: str | Path, *, max_auc_change: float, data_fingerprint: str = "",
             threshold: float = 0.5, class_names: list[str] | None = None) -> dict:
    """Quantize an export folder's ONNX model and keep it only if the test AUC holds.

    Args:
        folder: An export folder with ``model.onnx``.
        store_path: The run's ultrasound store: calibration from its train split, the AUC check on its
            test split.
        max_auc_change: Largest accepted ``|AUC(int8) - AUC(float32)|`` on the test split.
        data_fingerprint: The checkpoint's recorded store fingerprint; a store that differs is refused.
        threshold: The export's decision threshold: test images whose label at it differs between the
            float32 and int8 engines are counted (the AUC can hold while single calls flip).
        class_names: The checkpoint's classes; a store with other classes (or another order) is refused.

    Returns:
        The ``int8`` record for ``export.json``: file (or None when refused), calibration and test
        counts, both AUCs, their difference, max |p_int8 - p_f32| on the test images, the test labels
        that change at ``threshold``, accepted.

    Raises:
        ValueError: A store that is not the checkpoint's, or without train or test images of both classes.
    """
    from msbt.serve import engines as eng

    folder, store = Path(folder), Store.open(store_path)
    fingerprint = store.fingerprint()[0]
    if data_fingerprint and fingerprint != data_fingerprint:
        raise ValueError(f"{store_path}: not the store this checkpoint trained on (fingerprint {fingerprint[:12]}, "
                         f"checkpoint {data_fingerprint[:12]}); give the run's stores/ultrasound")
    if class_names is not None and list(store.classes) != list(class_names):
        raise ValueError(f"{store_path}: classes {list(store.classes)}, but the model's are {list(class_names)}; "
                         "give the run's stores/ultrasound")
    if not data_fingerprint:
        log.warning("%s: the checkpoint records no store fingerprint; the store is taken as given", store_path)
    reference = eng.load_engine(folder, "onnx")
    size = reference.image_size
    calibration, _ = split_images(store, "train", size, CALIBRATION_IMAGES)
    test, labels = split_images(store, "test", size)
    if len(calibration) == 0 or len(set(labels.tolist())) < 2:
        raise ValueError(f"{store_path}: int8 needs training images to calibrate on and test images of both "
                         f"classes to check the AUC (found {len(calibration)} train, test labels "
                         f"{sorted(set(labels.tolist()))})")
    path = quantize(folder / eng.ONNX_FILE, folder / INT8_FILE, calibration)
    p32 = reference.predict(test)
    p8 = eng.load_engine(folder, "onnx", precision="int8").predict(test)
    auc32, auc8 = roc_auc(labels, p32), roc_auc(labels, p8)
    record = {
        "file": INT8_FILE,
        "quantizer": "onnxruntime.quantization.quantize_static (QDQ, int8 weights per channel, uint8 activations)",
        "calibration": {"split": "train", "images": int(len(calibration)), "store": str(Path(store_path).resolve())},
        "test_images": int(len(test)),
        "auc_f32": float(auc32),
        "auc_int8": float(auc8),
        "auc_change": float(auc8 - auc32),
        "max_auc_change": float(max_auc_change),
        "max_abs_diff": float(np.abs(p8 - p32).max()),
        "threshold": float(threshold),
        "labels_changed": int(np.sum((p8 >= threshold) != (p32 >= threshold))),
        "accepted": accepted(auc32, auc8, max_auc_change),
    }
    if not record["accepted"]:
        path.unlink(missing_ok=True)
        record["file"] = None
        log.warning("int8 refused: test AUC %.4f -> %.4f (change %+.4f, beyond ±%.4f); %s removed", auc32, auc8,
                    auc8 - auc32, max_auc_change, INT8_FILE)
    return record
