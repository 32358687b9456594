"""Applying a trained stage-2 model to new images (`msbt predict`).

An image must reach the model exactly as the training images did: read and converted to 8-bit RGB by
:func:`msbt.images.imagefile.read_image` with the run's 16-bit policy, its intensity normalised and fitted to
the store's square size with the run's aspect policy (``msbt.data.preprocess.ultrasound_arrays``), and, if the
stage trained at another size than the store holds, resized the way ``msbt.train.loop`` does it. A
checkpoint's manifest records only the stage config (backbone, input size, head), so the rest is read
from the run the checkpoint belongs to, found by walking up from the checkpoint folder: the ultrasound
store's ``store.json`` (the settings the training images were really made with), else the run's
``config.yaml``; without either the defaults are used and a note says so. An exported model
(:mod:`msbt.serve.export`) carries all of it in its ``export.json``.

The decision threshold is the one the run chose on its validation split (``metrics.json`` of the run,
used only if it was computed for this very checkpoint), else 0.5 with a note; ``--threshold`` overrides
both. Every result says where its threshold came from.

Files are taken as discovery takes them (msbt.data.discovery): folders are searched recursively, hidden
files and folders are skipped and counted, system files ignored, segmentation masks (``*_mask.png``,
``*_mask_1.png``) skipped and counted, and a file that is not a usable image is rejected with its reason,
never a crash.
"""

from __future__ import annotations

import csv
import json
import os
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from msbt.atomicio import atomic_open, read_json_object
from msbt.model.checkpoint import DIGEST_KEY, MODEL_FILE, CheckpointError, json_digest, read_manifest
from msbt.config import PreprocessConfig, load_config
from msbt.eval.metrics import threshold_text
from msbt.console import import_tensorflow, progress
from msbt.data.discovery import Reject, is_folder, is_system_file, manifest_paths, mask_pattern, text_name, walk_files
from msbt.data.store import STORE_FILE, Store, StoreError
from msbt.images.imagefile import ImageError, fit_square, image_refs, normalize_intensity, read_image
from msbt.data.profile import check_inputs, image_features, out_of_range

log = logging.getLogger(__name__)

EXPORT_FILE = "export.json"  # written by msbt.serve.export beside the copied model
EXPORT_DIGEST_KEY = "export_sha256"  # export.json's digest of its other fields (msbt.model.checkpoint.json_digest)
# `logit` (the model's pre-sigmoid score: it still ranks images where p saturates at 1.0) and
# `out_of_range` (profile features outside the training range, msbt.data.profile) come last.
CSV_COLUMNS = ("path", "label", "probability", "threshold", "heatmap", "reason", "logit", "out_of_range")
DEFAULT_THRESHOLD = 0.5
_RUN_LEVELS = 5  # checkpoint -> stage2 -> run (or -> arm -> experiment -> run)
_CHUNK = 256  # files prepared and predicted together


@dataclass(frozen=True)
class Preparation:
    """How a file becomes a model input, and where these settings were read."""

    image_size: int  # the store's square size (fit_square); the model's may differ
    aspect: str
    intensity: str
    sixteen_bit: str
    mask_suffixes: tuple[str, ...]
    source: str

    def as_dict(self) -> dict:
        return {"image_size": self.image_size, "aspect": self.aspect, "intensity": self.intensity,
                "sixteen_bit": self.sixteen_bit, "mask_suffixes": list(self.mask_suffixes), "source": self.source}


@dataclass(frozen=True)
class Threshold:
    value: float
    source: str  # a metrics.json (with the rule and split), "--threshold", or the default

    def public_source(self) -> str:
        """The source as a service tells its clients: the file's name without the folders it lies in on the
        machine that wrote it (``/srv/runs/cpu/metrics.json (youden on val)`` -> ``metrics.json (youden on
        val)``); ``model_id`` and ``lineage_sha256`` identify the model."""
        # the last " (": a folder of the path may hold one too ("runs (old)/metrics.json (youden on val)")
        head, sep, rest = self.source.rpartition(" (") if self.source.endswith(")") else (self.source, "", "")
        return Path(head).name + sep + rest if head.endswith(".json") else self.source


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str
    probability: float
    threshold: float
    heatmap: str = ""  # PNG written with --heatmaps
    logit: float = float("nan")
    out_of_range: str = ""  # profile features of this image outside the training range ("" = none)


@dataclass
class PredictionRun:
    """Everything ``msbt predict`` reports: predictions, rejects, what was skipped and why."""

    checkpoint: str
    class_names: list[str]
    threshold: Threshold
    preparation: Preparation
    predictions: list[Prediction] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # out of depth (msbt.data.profile), threshold flags


# ---------------------------------------------------------------------------------------------------
# What the run recorded


def _folder(checkpoint: str | Path) -> Path:
    path = Path(checkpoint).expanduser()
    return path.parent if path.name in (MODEL_FILE, "manifest.json") else path


def _ancestors(checkpoint: Path) -> list[Path]:
    folder = checkpoint.resolve()
    return [folder, *list(folder.parents)[:_RUN_LEVELS]]


def find_threshold(checkpoint: str | Path, override: float | None = None,
                   run_folder: str | Path | None = None) -> tuple[Threshold, list[str]]:
    """The decision threshold for a checkpoint, and notes on how it was found.

    Args:
        checkpoint: A stage-2 checkpoint folder (or an export folder).
        override: A threshold given by the user; wins over everything.
        run_folder: The run folder the user named for this model (msbt.cli): its ``metrics.json`` is read first. A
            stage reused from another run (the stage index) lives in that run's folder, not under this one.

    Returns:
        ``(Threshold, notes)``: the threshold from the export's ``export.json``, else from the first
        ``metrics.json`` above the checkpoint that was computed for this checkpoint, else 0.5.
    """
    if override is not None:
        if not 0.0 <= override <= 1.0:
            raise ValueError(f"--threshold must be in [0, 1], got {override}")
        return Threshold(float(override), "--threshold"), []
    folder = _folder(checkpoint)
    exported = _read_export(folder)
    if exported and exported.get("threshold", {}).get("value") is not None:
        t = exported["threshold"]
        _check_threshold(t["value"], folder / EXPORT_FILE)
        return Threshold(float(t["value"]), t.get("source", str(folder / EXPORT_FILE))), []
    notes = []
    for candidate in ([Path(run_folder)] if run_folder is not None else []) + _ancestors(folder)[1:]:
        file = candidate / "metrics.json"
        if not file.is_file():
            continue
        result = read_json_object(file, "a run's metrics")
        recorded = result.get("checkpoint")
        if not _same_checkpoint(recorded, folder, candidate):
            notes.append(f"{file} was computed for another checkpoint ({recorded}); its threshold is not used")
            continue
        _check_threshold(result.get("threshold"), file)
        rule = result.get("threshold_rule", "?")
        split = result.get("threshold_chosen_on", "?")
        return Threshold(float(result["threshold"]), f"{file} ({rule} on {split})"), []
    notes.append(f"no metrics.json of the run beside {folder}: threshold {DEFAULT_THRESHOLD} (not chosen on "
                 "validation data; pass --threshold to set one)")
    return Threshold(DEFAULT_THRESHOLD, "default (no validation threshold found)"), notes


def _check_threshold(value, file: Path) -> None:
    """Refuse a recorded threshold that is not a probability: NaN labels every image benign, a negative one every
    image malignant, and an export would seal it in."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{file}: threshold {value!r} is not a probability in [0, 1] (the file is damaged or was "
                         "edited); pass --threshold to choose one")


def _same_checkpoint(recorded, folder: Path, metrics_folder: Path) -> bool:
    """Whether metrics.json's ``checkpoint`` is ``folder``, also after the run folder was moved."""
    if not recorded or not isinstance(recorded, str):
        return False
    recorded = Path(recorded)
    if recorded.exists() and recorded.resolve() == folder.resolve():
        return True
    try:
        relative = folder.resolve().relative_to(metrics_folder.resolve())  # e.g. stage2/checkpoint_...
    except ValueError:  # a run folder named for a model stored elsewhere: only the path itself says it
        return False
    return recorded.parts[-len(relative.parts):] == relative.parts


def find_run_dir(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to (the first folder above it with config.yaml beside data/ or
    stores/), or None (e.g. an exported model)."""
    for run in _ancestors(_folder(checkpoint))[1:]:
        if (run / "config.yaml").is_file() and ((run / "stores").is_dir() or (run / "data").is_dir()):
            return run
    return None


def find_store(checkpoint: str | Path) -> Path:
    """The store a checkpoint was trained on: the first store at or above its folder (``store/``, as a
    cross-validation or leave-one-site-out fold keeps its re-split copy; ``stores/ultrasound/``; or a
    leave-one-site-out fold's ``loso/site-*/store``) whose identity is the manifest's ``data_fingerprint``
    and ``split_id``.

    Raises:
        ValueError: None found (pass the store explicitly).
    """
    folder = Path(checkpoint).expanduser().resolve()
    manifest = read_manifest(folder)
    wanted = (manifest.get("data_fingerprint"), manifest.get("split_id"))
    for above in [folder, *folder.parents][:8]:
        for candidate in [above / "store", above / "stores" / "ultrasound", *sorted(above.glob("loso/site-*/store"))]:
            if not (candidate / "store.json").is_file():
                continue
            try:
                if Store.open(candidate).fingerprint() == wanted:
                    return candidate
            except StoreError:
                continue
    raise ValueError(f"{folder}: no store with its data and split found at or above it; pass --store")


def find_profile(checkpoint: str | Path) -> tuple[dict | None, list[str]]:
    """The training-input profile of the run (``stores/ultrasound/profile.json``, msbt.data.profile), or
    ``export.json``'s copy; None with a note when the run recorded none."""
    from msbt.data.profile import PROFILE_FILE

    exported = _read_export(_folder(checkpoint))
    if exported and exported.get("profile"):
        return exported["profile"], []
    run = find_run_dir(checkpoint)
    file = run / "stores" / "ultrasound" / PROFILE_FILE if run else None
    if file is not None and file.is_file():
        return json.loads(file.read_text()), []
    return None, ["the run recorded no profile of its training images (made before msbt recorded one): inputs "
                  "are not checked against the training distribution"]


def threshold_warnings(checkpoint: str | Path, chosen: "Threshold") -> list[str]:
    """The flags metrics.json recorded on the threshold (tied or saturated validation scores) and its
    bootstrap spread, when the threshold came from that file."""
    run = find_run_dir(checkpoint)
    file = run / "metrics.json" if run else None
    if file is None or not file.is_file() or str(file) not in chosen.source:
        return []
    result = json.loads(file.read_text())
    out = [f"threshold: {flag}" for flag in result.get("threshold_flags", [])]
    spread = result.get("threshold_ci95")
    if spread and all(isinstance(v, (int, float)) for v in spread):
        out.append(f"threshold {threshold_text(spread[0])}: 95% bootstrap range over validation resamples "
                   f"[{threshold_text(spread[1])}, {threshold_text(spread[2])}]")
    return out


def find_preparation(checkpoint: str | Path, model_size: int) -> tuple[Preparation, list[str]]:
    """How the run that trained ``checkpoint`` prepared its ultrasound images.

    Args:
        checkpoint: A stage-2 checkpoint folder (or an export folder).
        model_size: The model's input side, used when the run's settings cannot be found.

    Returns:
        ``(Preparation, notes)``. Sources in order: ``export.json``; the ultrasound store's
        ``store.json``; the run's ``config.yaml``; the defaults (with a note).

    Raises:
        ConfigError: A run ``config.yaml`` that cannot be read (it would silently change the images).
    """
    folder = _folder(checkpoint)
    exported = _read_export(folder)
    if exported and "preparation" in exported:
        p = exported["preparation"]
        return Preparation(int(p["image_size"]), p["aspect"], p["intensity"], p["sixteen_bit"],
                           tuple(p.get("mask_suffixes", ("_mask",))), p.get("source", str(folder / EXPORT_FILE))), []
    for run in _ancestors(folder)[1:]:
        config_file = run / "config.yaml"
        # A run folder holds its data/ and stores/ beside config.yaml; another config.yaml is not ours.
        if not config_file.is_file() or not ((run / "stores").is_dir() or (run / "data").is_dir()):
            continue
        config = load_config([config_file])
        masks = tuple(config.data.mask_suffixes)
        store = run / "stores" / "ultrasound"
        if (store / STORE_FILE).is_file():
            s = Store.open(store).settings
            return Preparation(int(s["image_size"]), s["aspect"], s["intensity"], s.get("sixteen_bit", "scale"),
                               masks, str(store / STORE_FILE)), []
        pp = config.preprocess
        return Preparation(pp.image_size, pp.aspect, pp.intensity, config.data.sixteen_bit, masks,
                           str(config_file)), []
    d = PreprocessConfig()
    note = (f"no run config.yaml above {folder}: images prepared with the defaults (aspect {d.aspect}, "
            f"intensity {d.intensity}, 16-bit scale) at the model's {model_size} px; if the model was trained "
            "otherwise, its predictions here are not comparable")
    return Preparation(model_size, d.aspect, d.intensity, "scale", ("_mask",), "defaults"), [note]


def _read_export(folder: Path) -> dict | None:
    file = folder / EXPORT_FILE
    if not file.is_file():
        return None
    record = read_json_object(file, "an export record", CheckpointError)
    # Threshold and preparation come from here: an edit would silently change every prediction.
    recorded = record.get(EXPORT_DIGEST_KEY)
    if recorded is not None and recorded != json_digest(record, skip=EXPORT_DIGEST_KEY):
        raise CheckpointError(f"{file}: changed after export (its {EXPORT_DIGEST_KEY} does not match its content: "
                              "threshold, preparation or class names were edited)")
    manifest = folder / "manifest.json"
    if recorded is not None and manifest.is_file():
        if record.get("manifest_sha256") != read_manifest(folder).get(DIGEST_KEY):
            raise CheckpointError(f"{file}: made for another manifest.json than the one beside it")
    return record


# ---------------------------------------------------------------------------------------------------
# Files and images


def collect_files(inputs: Sequence[str | Path], mask_suffixes: Sequence[str] = ("_mask",)):
    """The image candidates among files and folders, as discovery would take them.

    Args:
        inputs: Files and folders (folders are searched recursively; hidden files and folders are not, and are
            counted in ``skipped``).
        mask_suffixes: Stems ending in one of these (optionally ``_<n>``) are masks and are skipped.

    Returns:
        ``(files, rejects, skipped)``: candidate paths in the order given (folder contents sorted, each
        file once), ``Reject`` for inputs that do not exist, and ``{reason: count}`` of skipped files.
    """
    mask = mask_pattern(mask_suffixes)
    files: list[Path] = []
    rejects: list[Reject] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()
    for item in inputs:
        path = Path(item).expanduser()
        if is_folder(path):
            problems: list[Reject] = []
            found = sorted(p for p in walk_files(path, problems, skipped) if not is_system_file(p))
            rejects += problems
        elif path.is_file() and path.suffix.lower() == ".csv":
            # The manifests training takes (path,label[,group]); labels are not needed here.
            found, bad = manifest_paths(path)
            rejects += bad
        elif os.path.lexists(path):
            found = [path]  # a file, or something reading it will name (FIFO, device, link loop)
        else:
            rejects.append(Reject(text_name(str(path)), "does not exist"))
            continue
        for file in found:
            # realpath, not Path.resolve: it does not raise on a symbolic link loop (Python < 3.13 does).
            real = os.path.realpath(file)
            if real in seen:
                continue
            seen.add(real)
            if mask.search(file.stem):
                skipped["segmentation mask"] = skipped.get("segmentation mask", 0) + 1
            else:
                files.append(file)
    return files, rejects, skipped


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def prepare_image(path: str | Path, preparation: Preparation) -> np.ndarray:
    """One file as the store holds it: ``(S, S, 3)`` uint8 (``msbt.data.preprocess.ultrasound_arrays``).

    Raises:
        ImageError: The file cannot be used (the reason names the problem).
    """
    return prepare_sized(path, preparation)[0]


def prepare_sized(path: str | Path, preparation: Preparation) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`prepare_image` and the file's own (width, height), which the out-of-depth check compares."""
    rgb = read_image(path, preparation.sixteen_bit)  # type: ignore[arg-type]
    return prepare_rgb(rgb, preparation), (int(rgb.shape[1]), int(rgb.shape[0]))


def prepare_rgb(rgb: np.ndarray, preparation: Preparation) -> np.ndarray:
    """Decoded 8-bit RGB ``(H, W, 3)`` -> the store's ``(S, S, 3)`` uint8: intensity, then ``fit_square``.

    The one place (besides the store itself) that turns pixels into store pixels: ``msbt stream`` and
    ``msbt serve`` call it for frames and uploaded bytes.
    """
    return fit_square(normalize_intensity(rgb, preparation.intensity), preparation.image_size, preparation.aspect)


def predict_logits(model, batch: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, logits) of a binary model for a batch of model-sized uint8 images.

    The probability is the model's own output (the number thresholds were chosen on); the logit is the
    classifier's input times its weights plus bias, in float64, so it still ranks images whose float32
    probability has saturated at exactly 1.0. For an ensemble (msbt.model.ensemble) the logit is that of
    the mean of its members' probabilities, from their logits.
    """
    import keras

    from msbt.model.ensemble import MEAN_LAYER as ENSEMBLE_MEAN, combine_logits, members

    parts = members(model) or [model]
    heads = [part.get_layer("predictions") for part in parts]
    both = _TWO_OUTPUTS.get(model)
    if both is None:  # built once per model: a new Model per chunk would retrace its predict function
        if len(parts) == 1:
            both = keras.Model(model.inputs, [model.outputs[0], heads[0].input])
        else:  # an ensemble: its output, and each member's classifier input, in one pass over the members
            image = keras.Input(model.input_shape[1:])
            pairs = [keras.Model(m.inputs, [m.outputs[0], h.input])(image) for m, h in zip(parts, heads)]
            mean = model.get_layer(ENSEMBLE_MEAN)([p for p, _ in pairs])  # the ensemble's own averaging layer
            both = keras.Model(image, [mean, *[f for _, f in pairs]])
        _TWO_OUTPUTS[model] = both
    p, *features = both.predict(batch.astype(np.float32), batch_size=batch_size, verbose=0)
    logits = []
    for head, f in zip(heads, features):
        kernel, bias = (np.asarray(w, np.float64) for w in head.get_weights())
        logits.append((np.asarray(f, np.float64) @ kernel + bias).reshape(-1))
    return np.asarray(p, np.float64).reshape(-1), logits[0] if len(logits) == 1 else combine_logits(np.stack(logits))


_TWO_OUTPUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_inputs(images: np.ndarray, image_size: int) -> np.ndarray:
    """Store-sized uint8 images -> the model's input size, as ``msbt.train.loop`` resizes them.

    Training and evaluation resize (bilinear, rounded back to uint8) only when the store's size differs
    from the stage's; the same arithmetic is used here so the pixels agree exactly.
    """
    if images.shape[1:3] == (image_size, image_size):
        return images
    import tensorflow as tf

    resized = tf.image.resize(images, (image_size, image_size))
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()


# ---------------------------------------------------------------------------------------------------
# Predicting


def predict(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    *,
    threshold: float | None = None,
    heatmaps: str | Path | None = None,
    batch_size: int = 32,
    run_folder: str | Path | None = None,
) -> PredictionRun:
    """Malignancy probability and label for each usable image among ``inputs``.

    Args:
        checkpoint: A stage-2 checkpoint folder (``model.keras`` + ``manifest.json``) or an export folder.
        inputs: Image files and folders.
        threshold: Overrides the run's validation threshold.
        heatmaps: Folder for one Grad-CAM PNG per image (the prepared image beside its overlay).
        batch_size: Images per model call.
        run_folder: The run folder named for the model, if one was (:func:`find_threshold`).

    Returns:
        A :class:`PredictionRun`; rejected files are in ``rejects``, nothing raises for a bad image.

    Raises:
        CheckpointError: Not a checkpoint, or its model file was changed.
        ValueError: Not a binary checkpoint, or a threshold outside [0, 1].
    """
    from msbt.eval.evaluate import load_stage2

    folder = _folder(checkpoint)
    chosen, notes = find_threshold(folder, threshold, run_folder)  # a bad --threshold fails before the model loads
    manifest = read_manifest(folder)
    if len(manifest["class_names"]) != 2:  # said first, also when there is nothing to score
        raise ValueError(f"{folder}: not a binary (stage-2) checkpoint: classes {manifest['class_names']}")
    model_size = int(manifest["config"]["image_size"])
    preparation, more = find_preparation(folder, model_size)
    run = PredictionRun(str(folder), list(manifest["class_names"]), chosen, preparation, notes=notes + more)
    if preparation.image_size != model_size:
        run.notes.append(f"images are fitted to {preparation.image_size} px as the store holds them, then resized "
                         f"to the model's {model_size} px as in training")
    files, run.rejects, run.skipped = collect_files(inputs, preparation.mask_suffixes)
    # A multi-frame DICOM (a cine loop) is predicted frame by frame, each as `file#frame=NNNN`.
    files = [ref for file in files for ref in image_refs(file)]
    if not files:  # nothing to score (an empty folder, a typo'd glob): said without loading the model
        return run
    import_tensorflow()  # TensorFlow's start-up notices held back (msbt.console), shown only if it fails
    model, stage = load_stage2(folder)
    profile, more = find_profile(folder)
    run.notes += more
    run.warnings += threshold_warnings(folder, chosen)
    features: list[dict] = []
    used: set[str] = set()  # heatmap file names taken so far
    # A chunk at a time, so a folder of thousands of images never sits in memory at once.
    bar = progress(total=len(files), desc="predict", unit="image") if len(files) > _CHUNK else None
    for start in range(0, len(files), _CHUNK):
        if bar is not None and start:
            bar.update(_CHUNK)
        images, kept, sizes = [], [], []
        for path in files[start : start + _CHUNK]:
            try:
                image, size = prepare_sized(path, preparation)
                images.append(image)
                sizes.append(size)
                kept.append(path)
            except ImageError as err:
                run.rejects.append(Reject(text_name(str(path)), err.reason))
        if not kept:
            continue
        batch = model_inputs(np.stack(images), stage.image_size)
        p, z = predict_logits(model, batch, batch_size)
        pictures = _write_heatmaps(model, batch, kept, heatmaps, used) if heatmaps else [""] * len(kept)
        negative, positive = run.class_names
        for path, prob, logit, picture, image, size in zip(kept, p, z, pictures, images, sizes):
            # The rule of msbt.eval.metrics: malignant when p >= threshold.
            label = positive if prob >= chosen.value else negative
            # text_name: a file name that is not UTF-8 is printed and written with \xNN escapes.
            f = image_features(*size, image)
            features.append(f)
            outside = ",".join(out_of_range(profile, f)) if profile else ""
            run.predictions.append(Prediction(text_name(str(path)), label, float(prob), chosen.value, picture, float(logit), outside))
    if profile:
        run.warnings += check_inputs(profile, features)
    if bar is not None:
        bar.update(len(files) - bar.n)
        bar.close()
    return run


def _write_heatmaps(model, batch: np.ndarray, paths: list[Path], folder: str | Path, used: set[str]) -> list[str]:
    from msbt.model.gradcam import gradcam, overlay
    from msbt.images.sheets import write_png

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    heat = gradcam(model, batch)
    written = []
    for image, h, path in zip(batch, heat, paths):
        path = Path(path)  # a frame reference's name is `file#frame=NNNN`: its stem keeps the frame
        stem = text_name(path.stem)
        name, n = f"{stem}.gradcam.png", 1
        while name in used:  # same file name in two folders
            n += 1
            name = f"{stem}-{n}.gradcam.png"
        used.add(name)
        written.append(str(write_png(np.hstack([image, overlay(image, h)]), folder / name)))
    return written


# ---------------------------------------------------------------------------------------------------
# Reporting


def format_lines(run: PredictionRun, *, model_said: bool = False) -> list[str]:
    """What ``msbt predict`` prints: a header, one line per image, rejects, skips and notes.

    ``model_said``: the line before named the model (a run folder given for it): the header does not again."""
    prep = run.preparation
    model = "" if model_said else f"model {run.checkpoint}; "
    lines = [f"{model}threshold {threshold_text(run.threshold.value)} from {run.threshold.source}; images "
             f"fitted to {prep.image_size} px (aspect {prep.aspect}, intensity {prep.intensity}, 16-bit "
             f"{prep.sixteen_bit}) as in training, from {prep.source}"]
    lines += [f"{p.path}\t{p.label}\tp={threshold_text(p.probability)}\tlogit={p.logit:.3f}\tthreshold={threshold_text(p.threshold)}"
              + (f"\theatmap={p.heatmap}" if p.heatmap else "")
              + (f"\tout_of_range={p.out_of_range}" if p.out_of_range else "") for p in run.predictions]
    lines += [f"rejected {r.path}: {r.reason}" for r in run.rejects]
    lines += [f"skipped {n}: {reason}" for reason, n in sorted(run.skipped.items())]
    lines += [f"note: {note}" for note in run.notes]
    lines += [f"warning: {w}" for w in run.warnings]
    counts = {c: sum(p.label == c for p in run.predictions) for c in run.class_names}
    lines.append(f"{len(run.predictions)} predicted ({', '.join(f'{c} {n}' for c, n in counts.items())}), "
                 f"{len(run.rejects)} rejected")
    return lines


def write_csv(run: PredictionRun, path: str | Path) -> Path:
    """One row per input file: predictions, then rejects (empty label and probability, with the reason)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for p in run.predictions:
            writer.writerow([p.path, p.label, repr(p.probability), repr(p.threshold), p.heatmap, "", repr(p.logit),
                             p.out_of_range])
        for r in run.rejects:
            writer.writerow([r.path, "", "", "", "", r.reason, "", ""])
    return path
