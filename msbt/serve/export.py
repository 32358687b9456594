"""Exporting a stage-2 model for use outside msbt (`msbt export`).

The export folder holds:

* ``model.keras`` and ``manifest.json``: byte copies of the checkpoint's, so the folder is itself a
  checkpoint (its manifest's sha256 still matches) that ``msbt predict`` and ``msbt lineage`` accept;
  reloading it with Keras needs ``import msbt.model.models`` (the ``Preprocess`` layer is registered there);
* ``saved_model/``: a TensorFlow SavedModel for serving (TF Serving, ``tf.saved_model.load``) that needs
  neither msbt nor Keras: preprocessing is part of the graph, so it takes raw 0..255 pixels;
* ``model.onnx``: the ``serve_uint8`` signature converted by tf2onnx (ONNX Runtime, no TensorFlow);
* ``openvino/model.xml`` + ``.bin``: the ONNX model as OpenVINO IR, weights kept in float32;
* ``export.json``: what a server must know that the graph does not: the input size, how a file becomes
  such an input (aspect and intensity policies of the run), the class names and the decision threshold
  chosen on validation, with their sources; the model id and lineage hash a service reports; and the
  parity of every engine with Keras, measured at export on built-in synthetic ultrasound frames
  (:func:`check_parity`; the export is refused when a float engine is off by more than
  :data:`msbt.serve.engines.FLOAT_PARITY`).

Signatures of the SavedModel, both taking a batch of images at the model's size, ``(N, S, S, 3)``, and
returning ``{"probability": (N,)}``, the malignancy probability:

* ``serving_default``: float32 pixels 0..255 (what JSON requests to TF Serving carry);
* ``serve_uint8``: uint8 pixels (decoded image files, no conversion on the client).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from msbt import __version__
from msbt.atomicio import atomic_path, write_text
from msbt.model.checkpoint import DIGEST_KEY, MANIFEST_FILE, MODEL_FILE, json_digest, lineage, load_checkpoint
from msbt.model.ensemble import label as model_label
from msbt.provenance import write_environment
from msbt.serve import engines as eng
from msbt.serve.predict import (EXPORT_DIGEST_KEY, EXPORT_FILE, Preparation, find_preparation, find_profile,
                                find_threshold, model_inputs, prepare_rgb)

SAVED_MODEL_DIR = "saved_model"
EXPORT_FORMAT = 1


ONNX_OPSET = 17
PARITY_FRAMES = 16  # built-in synthetic ultrasound frames (8 per class) each engine is checked on


def export(checkpoint: str | Path, out_dir: str | Path, *, threshold: float | None = None,
           formats: tuple[str, ...] = ("onnx", "openvino"), int8: bool = False,
           int8_store: str | Path | None = None, int8_max_auc_change: float = 0.01,
           run_folder: str | Path | None = None) -> dict:
    """Write a stage-2 checkpoint as Keras model, SavedModel, ONNX, OpenVINO IR and ``export.json``.

    Args:
        checkpoint: A stage-2 checkpoint folder.
        out_dir: A new or empty folder.
        threshold: Overrides the run's validation threshold recorded in ``export.json``.
        formats: Which of ``onnx`` and ``openvino`` to add (OpenVINO IR is converted from the ONNX model,
            so it needs ``onnx``).
        int8: Also an int8 model (:mod:`msbt.serve.quantize`), calibrated on the run's training split and
            kept only if its test-split AUC is within ``int8_max_auc_change`` of the float model's (either way);
            the outcome is ``export.json``'s ``int8`` record either way.
        int8_store: The ultrasound store of the checkpoint's run (default: ``<run>/stores/ultrasound``
            for a checkpoint at ``<run>/stage2/checkpoint_*``).
        run_folder: The run folder named for the model, if one was (msbt.serve.predict.find_threshold).

    Returns:
        The ``export.json`` content.

    Raises:
        CheckpointError: Not a checkpoint, or its model file was changed after training.
        ValueError: Not a binary model, ``out_dir`` is not empty (nothing is overwritten), an unknown
            format, or a float engine that disagrees with Keras by more than the parity bound (the
            folder is then removed: a half-proven export is never left behind).
    """
    src = Path(checkpoint).expanduser()
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; choose a new one")
    unknown = set(formats) - {"onnx", "openvino"}
    if unknown or ("openvino" in formats and "onnx" not in formats):
        raise ValueError(f"formats must be among onnx, openvino (openvino needs onnx), got {list(formats)}")
    if int8 and "onnx" not in formats:
        raise ValueError("--int8 quantizes the ONNX model: keep the onnx format")
    store = _int8_store(src, int8_store) if int8 else None  # a missing store is said before any work
    model, manifest = load_checkpoint(src)  # verifies the model against the manifest's sha256
    if len(manifest["class_names"]) != 2:
        raise ValueError(f"{src}: not a binary (stage-2) checkpoint: classes {manifest['class_names']}")
    size = int(model.input_shape[1])
    chosen, threshold_notes = find_threshold(src, threshold, run_folder)
    preparation, preparation_notes = find_preparation(src, size)
    profile, _ = find_profile(src)  # the training-input profile travels with the model (out-of-depth check)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        record = _write_all(model, manifest, src, out, chosen, preparation, threshold_notes + preparation_notes,
                            formats, profile, int8_store=store, int8_max_auc_change=int8_max_auc_change)
    except BaseException:
        _clear(out, remove=created)  # nothing half-written stays behind: the folder was new or empty
        raise
    return record


def _int8_store(checkpoint: Path, store: str | Path | None) -> Path:
    """The store an int8 model is calibrated and checked on; refused early when there is none."""
    from msbt.data.store import Store, StoreError

    try:
        path = Path(store).expanduser() if store else checkpoint.resolve().parents[1] / "stores" / "ultrasound"
        opened = Store.open(path)
        if not opened.is_complete():
            lost = opened.damage(rows=True)
            raise StoreError(f"{path}: the store is incomplete" + (f" ({'; '.join(lost[:3])})" if lost else ""))
    except (StoreError, OSError, ValueError, IndexError) as err:
        raise ValueError(f"--int8 needs the run's ultrasound store (train split to calibrate, test split to check "
                         f"the AUC): {err}; give it with --int8-store") from None
    return path


def _clear(out: Path, *, remove: bool) -> None:
    if remove:
        shutil.rmtree(out, ignore_errors=True)
        return
    for item in out.iterdir():
        shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)


def _write_all(model, manifest, src: Path, out: Path, chosen, preparation: Preparation, notes: list[str],
               formats, profile: dict | None, *, int8_store: Path | None = None,
               int8_max_auc_change: float = 0.01) -> dict:
    import tensorflow as tf

    size = int(model.input_shape[1])
    for name in (MODEL_FILE, MANIFEST_FILE):
        with atomic_path(out / name) as tmp:  # a full disk leaves no partial model that looks exported
            shutil.copy2(src / name, tmp)
    write_environment(out)
    write_saved_model(model, out / SAVED_MODEL_DIR)
    if "onnx" in formats:
        write_onnx(model, out / eng.ONNX_FILE)
    if "openvino" in formats:
        write_openvino(out / eng.ONNX_FILE, out / eng.OPENVINO_DIR / eng.OPENVINO_FILE)
    names = ["keras", "savedmodel", *(["onnx"] if "onnx" in formats else []),
             *(["openvino"] if "openvino" in formats else [])]
    parity = check_parity(out, names, parity_images(preparation, size))
    int8 = None
    if int8_store is not None:
        from msbt.serve.quantize import add_int8

        int8 = add_int8(out, int8_store, max_auc_change=int8_max_auc_change, threshold=chosen.value,
                        data_fingerprint=manifest.get("data_fingerprint", ""), class_names=manifest["class_names"])
    record = {
        "format": EXPORT_FORMAT,
        "checkpoint": str(src.resolve()),
        "model_sha256": manifest["model_sha256"],
        "backbone": model_label(manifest),
        "class_names": manifest["class_names"],
        "input": {"shape": [None, size, size, 3], "pixels": "RGB 0..255", "dtypes": ["float32", "uint8"]},
        "output": "probability of class_names[1]; called class_names[1] when probability >= threshold",
        "signatures": {"serving_default": "float32 image -> probability", "serve_uint8": "uint8 image -> probability"},
        "threshold": {"value": chosen.value, "source": chosen.source},
        "preparation": preparation.as_dict(),
        "profile": profile,
        "model_id": f"{model_label(manifest)}-{size}px-{manifest['model_sha256'][:12]}",
        "lineage_sha256": lineage_hash(src),
        "engines": parity,
        "int8": int8,
        "notes": notes,
        "tensorflow_version": tf.__version__,
        "msbt_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # The digest covers what predict reads from export.json (threshold, preparation, class names, model
    # hash) and the copied manifest's own digest, so an edit to either is detected (msbt.serve.predict).
    record["manifest_sha256"] = manifest.get(DIGEST_KEY)
    record[EXPORT_DIGEST_KEY] = json_digest(record, skip=EXPORT_DIGEST_KEY)
    # written last: an export.json marks a complete, checked export
    write_text(out / EXPORT_FILE, json.dumps(record, indent=2) + "\n")
    return record


def lineage_hash(checkpoint: str | Path) -> str:
    """sha256 over the model hashes of the checkpoint's chain (stage 2, its stage 1, ...), child first.

    Two exports share it only if every model in their chain is byte-identical; a parent that cannot be
    found is represented by the hash its child recorded for it.
    """
    parts = []
    for entry in lineage(checkpoint):
        m = entry["manifest"]
        parts.append(m["model_sha256"] if m else f"missing:{entry['path']}")
        if m and m.get("parent") and entry.get("link_ok") is False:
            parts.append(f"recorded:{m['parent']['model_sha256']}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def parity_images(preparation: Preparation, size: int, n: int = PARITY_FRAMES) -> np.ndarray:
    """``n`` built-in synthetic ultrasound frames (half benign, half malignant), prepared as in training.

    Real-looking B-mode frames (speckle, lesion, shadowing) rather than noise, so the check covers the
    pixel statistics the engines will see; made on the fly, so an export needs no data on disk.
    """
    from msbt.data.synth import lesion_images

    frames = []
    for i in range(n):
        _, images = lesion_images(seed=12345, label=("benign", "malignant")[i % 2], index=i // 2,
                                  frames_per_lesion=(1, 1), size=max(64, preparation.image_size))
        frames.append(prepare_rgb(np.dstack([images[0]] * 3), preparation))
    return model_inputs(np.stack(frames), size)


def check_parity(folder: Path, names: list[str], images: np.ndarray) -> dict:
    """Each engine's max |p - p_keras| on ``images``; raises when a float engine exceeds the bound.

    Returns:
        ``{engine: {"file", "precision", "max_abs_diff"}}``, plus ``openvino_bf16`` (reduced precision,
        for information: the precision OpenVINO would pick by itself on this CPU) when OpenVINO is there;
        on a CPU without bfloat16 that entry says so (``"available": False``) instead of a difference.
    """
    # The reference is the exported model.keras itself, loaded as the keras engine: its own row is that engine
    # (0 by construction), not a second load and trace of the same file (about 2 s for a small model).
    keras_engine = eng.load_engine(folder, "keras")
    reference = keras_engine.predict(images)
    files = {"keras": MODEL_FILE, "savedmodel": SAVED_MODEL_DIR, "onnx": eng.ONNX_FILE,
             "openvino": f"{eng.OPENVINO_DIR}/{eng.OPENVINO_FILE}"}
    result = {}
    for name in names:
        engine = keras_engine if name == "keras" else eng.load_engine(folder, name)
        diff = float(np.abs(engine.predict(images) - reference).max())
        if diff > eng.FLOAT_PARITY:
            raise ValueError(f"{folder}: the {name} engine differs from Keras by {diff:.2e} > "
                             f"{eng.FLOAT_PARITY:.0e} on {len(images)} synthetic ultrasound frames; not exported")
        result[name] = {"file": files[name], "precision": "f32", "max_abs_diff": diff}
    capabilities = eng.openvino_capabilities() if "openvino" in names else []
    if "BF16" in capabilities:
        diff = float(np.abs(eng.load_engine(folder, "openvino", precision="bf16").predict(images) - reference).max())
        result["openvino_bf16"] = {"file": files["openvino"], "precision": "bf16", "max_abs_diff": diff,
                                   "openvino_default_precision": eng.openvino_default_precision(),
                                   "note": "reduced precision: not within the float parity bound; use only "
                                           "with its AUC change on the run's test split"}
    elif "openvino" in names:  # said, not silently left out: the folder may be copied to a CPU that has bf16
        result["openvino_bf16"] = {"file": files["openvino"], "precision": "bf16", "available": False,
                                   "openvino_default_precision": eng.openvino_default_precision(),
                                   "note": "not measured: this CPU has no bfloat16 (OpenVINO CPU capabilities: "
                                           f"{', '.join(capabilities)})"}
    for entry in result.values():
        entry["frames"] = len(images)
    return result


def write_onnx(model, path: str | Path) -> Path:
    """The model's uint8 signature as ONNX (tf2onnx), the cast to float and all preprocessing inside.

    tf2onnx is what Keras 3's ``model.export(format="onnx")`` calls for the TensorFlow backend; calling it
    on our own ``tf.function`` keeps the uint8 input the SavedModel's ``serve_uint8`` has.
    """
    import tensorflow as tf
    import tf2onnx

    size = tuple(model.input_shape[1:])
    spec = [tf.TensorSpec((None, *size), tf.uint8, name="image")]

    @tf.function(input_signature=spec)
    def probability(image):
        return {"probability": tf.reshape(model(tf.cast(image, tf.float32), training=False), [-1])}

    path = Path(path)
    with atomic_path(path) as tmp:  # a failed write (a full disk) names the file; tf2onnx's own error named none
        tf2onnx.convert.from_function(probability, input_signature=spec, opset=ONNX_OPSET, output_path=str(tmp))
    return path


def write_openvino(onnx_path: str | Path, xml_path: str | Path) -> Path:
    """OpenVINO IR from the ONNX model, weights in float32 (``save_model`` would halve them to fp16)."""
    import openvino as ov

    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    return xml_path


def write_saved_model(model, path: str | Path) -> Path:
    """The model as a SavedModel with the two signatures described in the module docstring."""
    import keras
    import tensorflow as tf

    size = tuple(model.input_shape[1:])

    def probability(images):
        # Inference mode: BatchNorm uses its moving statistics, Dropout is off.
        return {"probability": tf.reshape(model(tf.cast(images, tf.float32), training=False), [-1])}

    archive = keras.export.ExportArchive()
    archive.track(model)
    # The first endpoint is also TF Serving's "serving_default"; naming it so keeps one name for both.
    archive.add_endpoint("serving_default", probability,
                         input_signature=[tf.TensorSpec((None, *size), tf.float32, name="image")])
    archive.add_endpoint("serve_uint8", probability,
                         input_signature=[tf.TensorSpec((None, *size), tf.uint8, name="image")])
    archive.write_out(str(path), verbose=False)
    return Path(path)

