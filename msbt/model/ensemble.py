"""Several stage-2 models as one: the mean of their probabilities, saved as one checkpoint.

Averaging models trained with other seeds or settings raised the held-out-site AUC on real data
(docs/evaluation.md); this makes such an average something one can evaluate, predict with, export and
serve like any stage-2 checkpoint. The ensemble is a Keras model ``image -> member_0 .. member_k-1 ->
ensemble_mean``: each member is a whole msbt model (its own preprocessing, backbone and head), called on
the same uint8 image, so members may differ in backbone and head but not in input size.

Members must have been trained on the same data and split (``data_fingerprint`` and ``split_id`` of their
manifests): the ensemble's threshold is chosen on their shared validation rows, and its test rows are
then held out from every member. Members of other splits are refused, because one member's validation or
test images could be another's training images.

The manifest is an ordinary stage-2 manifest (the first member's stage settings, which give the input
size and evaluation batch size) plus ``members``: each member's folder and model sha256, so the lineage of
the average stays checkable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from msbt.model.checkpoint import CheckpointError, load_checkpoint, sha256_file, write_manifest

MEMBER_PREFIX = "member_"
MEAN_LAYER = "ensemble_mean"


def label(manifest) -> str:
    """What a manifest's model is, for ids and listings: its backbone, or ``ensemble-<k>`` for an ensemble (whose
    manifest carries its first member's stage settings)."""
    return f"ensemble-{len(manifest['members'])}" if manifest.get("members") else manifest["backbone"]


def members(model) -> list:
    """The member models of an ensemble, in order; [] for an ordinary msbt model."""
    import keras

    return [layer for layer in model.layers
            if isinstance(layer, keras.Model) and layer.name.startswith(MEMBER_PREFIX)]


def build_ensemble(models: Sequence):
    """One Keras model whose output is the mean of ``models``' outputs on the same input image.

    Raises:
        ValueError: Fewer than two models, or models with other input or output shapes.
    """
    import keras

    if len(models) < 2:
        raise ValueError(f"an ensemble needs at least two models, got {len(models)}")
    shape, out = tuple(models[0].input_shape[1:]), tuple(models[0].output_shape[1:])
    for i, model in enumerate(models):
        if tuple(model.input_shape[1:]) != shape or tuple(model.output_shape[1:]) != out:
            raise ValueError(f"member {i}: input {model.input_shape[1:]} / output {model.output_shape[1:]}, "
                             f"member 0: {shape} / {out}; members must take the same image size")
    image = keras.Input(shape, name="image")
    outputs = []
    for i, model in enumerate(models):
        model.name = f"{MEMBER_PREFIX}{i}"  # nested models need unique names; the loaded ones share msbt_<backbone>
        outputs.append(model(image))
    mean = keras.layers.Average(name=MEAN_LAYER, dtype="float32")(outputs)
    return keras.Model(image, mean, name="msbt_ensemble")


def write_ensemble(checkpoints: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Check the members, build their average and save it as a stage-2 checkpoint in ``out_dir``.

    Args:
        checkpoints: Two or more stage-2 checkpoint folders of the same data and split.
        out_dir: The new checkpoint folder (created; must not hold a checkpoint already).

    Returns:
        ``out_dir``.

    Raises:
        CheckpointError: A member that is not a verified binary stage-2 checkpoint, or members of another
            data set, split, class list or input size; each names the member's folder.
    """
    folders = [Path(c).expanduser().resolve() for c in checkpoints]
    if len(folders) < 2:
        raise CheckpointError(f"an ensemble needs at least two checkpoints, got {len(folders)}")
    if len(set(folders)) != len(folders):
        raise CheckpointError("a checkpoint is named more than once: "
                              f"{sorted({str(f) for f in folders if folders.count(f) > 1})}")
    out = Path(out_dir).expanduser().resolve()
    if (out / "manifest.json").exists():
        raise CheckpointError(f"{out}: holds a checkpoint already; choose another --out")
    loaded = []
    for folder in folders:  # every member checked (and loaded) before anything is written
        model, manifest = load_checkpoint(folder)
        if len(manifest["class_names"]) != 2:  # (manifests before 2026-12-03 numbered a parentless stage 2 as 1)
            raise CheckpointError(f"{folder}: not a binary (stage-2) checkpoint: classes {manifest['class_names']}")
        if manifest.get("members"):
            raise CheckpointError(f"{folder}: is an ensemble itself; name its members instead")
        loaded.append((folder, model, manifest))
    first_folder, _, first = loaded[0]
    for folder, model, manifest in loaded[1:]:
        for key, what in (("class_names", "class names"), ("data_fingerprint", "training data"),
                          ("split_id", "split")):
            if manifest.get(key) != first.get(key):
                raise CheckpointError(
                    f"{folder}: other {what} than {first_folder} ({manifest.get(key)!r} vs {first.get(key)!r}); "
                    "members must share the data and split, so that the ensemble's threshold is chosen on "
                    "validation rows none of them trained on (main runs of the same data and data.seed share "
                    "their store whatever their names; a leave-one-site-out fold's store records the run folder "
                    "it was cut from, so average the seeds of one run, or the arms of one compare)")
        if manifest["config"].get("image_size") != first["config"].get("image_size"):
            raise CheckpointError(f"{folder}: image size {manifest['config'].get('image_size')}, {first_folder}: "
                                  f"{first['config'].get('image_size')}; members must take the same image size")
    from msbt.config import StageConfig, from_dict
    from msbt.model.checkpoint import MODEL_FILE

    ensemble = build_ensemble([model for _, model, _ in loaded])
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        ensemble.save(str(out / MODEL_FILE))
        records = [{"path": str(folder), "relpath": os.path.relpath(folder, out),
                    "model_sha256": sha256_file(folder / MODEL_FILE), "backbone": manifest["backbone"],
                    "seed": manifest.get("seed"), "best_epoch": manifest["best_epoch"]}
                   for folder, _, manifest in loaded]
        write_manifest(out, stage_config=from_dict(StageConfig, first["config"],
                                                   source=f"{first_folder}/manifest.json"),
                       class_names=first["class_names"], metrics={}, best_epoch=0, parent=None,
                       data_fingerprint=first["data_fingerprint"], split_id=first["split_id"], number=2,
                       members=records)
    except BaseException:  # no model without its manifest is left behind
        (out / MODEL_FILE).unlink(missing_ok=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def combine_logits(logits: np.ndarray) -> np.ndarray:
    """(S, N) members' logits -> (N,) logit of the mean of their sigmoids, in float64 without overflow:
    log(mean sigmoid(l)) - log(mean sigmoid(-l)), each a log-sum-exp of log-sigmoids."""
    from scipy.special import log_expit, logsumexp

    z = np.asarray(logits, np.float64)
    return logsumexp(log_expit(z), axis=0) - logsumexp(log_expit(-z), axis=0)
