"""Exporting a stage-2 model for use outside msbt (`msbt export`).

The export folder holds:

* ``model.keras`` and ``manifest.json``: byte copies of the checkpoint's, so the folder is itself a
  checkpoint (its manifest's sha256 still matches) that ``msbt predict`` and ``msbt lineage`` accept;
  reloading it with Keras needs ``import msbt.model.models`` (the ``Preprocess`` layer is registered there);
* ``saved_model/``: a TensorFlow SavedModel for serving (TF Serving, ``tf.saved_model.load``) that needs
  neither msbt nor Keras: preprocessing is part of the graph, so it takes raw 0..255 pixels;
* ``export.json``: what a server must know that the graph does not: the input size, how a file becomes
  such an input (aspect and intensity policies of the run), the class names and the decision threshold
  chosen on validation, with their sources.

Signatures of the SavedModel, both taking a batch of images at the model's size, ``(N, S, S, 3)``, and
returning ``{"probability": (N,)}``, the malignancy probability:

* ``serving_default``: float32 pixels 0..255 (what JSON requests to TF Serving carry);
* ``serve_uint8``: uint8 pixels (decoded image files, no conversion on the client).
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path

from msbt.provenance import write_environment
from msbt.atomicio import atomic_path, write_text
from msbt import __version__
from msbt.model.checkpoint import DIGEST_KEY, MANIFEST_FILE, MODEL_FILE, json_digest, load_checkpoint
from msbt.serve.predict import EXPORT_DIGEST_KEY, EXPORT_FILE, find_preparation, find_profile, find_threshold

SAVED_MODEL_DIR = "saved_model"
EXPORT_FORMAT = 1


def export(checkpoint: str | Path, out_dir: str | Path, *, threshold: float | None = None) -> dict:
    """Write a stage-2 checkpoint as Keras model, SavedModel and ``export.json`` into ``out_dir``.

    Args:
        checkpoint: A stage-2 checkpoint folder.
        out_dir: A new or empty folder.
        threshold: Overrides the run's validation threshold recorded in ``export.json``.

    Returns:
        The ``export.json`` content.

    Raises:
        CheckpointError: Not a checkpoint, or its model file was changed after training.
        ValueError: Not a binary model, or ``out_dir`` is not empty (nothing is overwritten).
    """
    import tensorflow as tf

    src = Path(checkpoint).expanduser()
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; choose a new one")
    model, manifest = load_checkpoint(src)  # verifies the model against the manifest's sha256
    if len(manifest["class_names"]) != 2:
        raise ValueError(f"{src}: not a binary (stage-2) checkpoint: classes {manifest['class_names']}")
    size = int(model.input_shape[1])
    chosen, threshold_notes = find_threshold(src, threshold)
    preparation, preparation_notes = find_preparation(src, size)
    profile, _ = find_profile(src)  # the training-input profile travels with the model (out-of-depth check)

    out.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, MANIFEST_FILE):
        with atomic_path(out / name) as tmp:  # a full disk leaves no partial model that looks exported
            shutil.copy2(src / name, tmp)
    write_environment(out)
    write_saved_model(model, out / SAVED_MODEL_DIR)
    record = {
        "format": EXPORT_FORMAT,
        "checkpoint": str(src.resolve()),
        "model_sha256": manifest["model_sha256"],
        "backbone": manifest["backbone"],
        "class_names": manifest["class_names"],
        "input": {"shape": [None, size, size, 3], "pixels": "RGB 0..255", "dtypes": ["float32", "uint8"]},
        "output": "probability of class_names[1]; called class_names[1] when probability >= threshold",
        "signatures": {"serving_default": "float32 image -> probability", "serve_uint8": "uint8 image -> probability"},
        "threshold": {"value": chosen.value, "source": chosen.source},
        "preparation": preparation.as_dict(),
        "profile": profile,
        "notes": threshold_notes + preparation_notes,
        "tensorflow_version": tf.__version__,
        "msbt_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    # The digest covers what predict reads from export.json (threshold, preparation, class names, model
    # hash) and the copied manifest's own digest, so an edit to either is detected (msbt.serve.predict).
    record["manifest_sha256"] = manifest.get(DIGEST_KEY)
    record[EXPORT_DIGEST_KEY] = json_digest(record, skip=EXPORT_DIGEST_KEY)
    write_text(out / EXPORT_FILE, json.dumps(record, indent=2) + "\n")
    return record


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

