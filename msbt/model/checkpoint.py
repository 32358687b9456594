"""Stage checkpoints: a folder with ``model.keras`` and ``manifest.json``, linked to their parents.

The manifest records what is needed to trust and reproduce the model: the stage (1 = trained from
ImageNet/random/a weights file, 2 = trained from a stage-1 checkpoint), the parent checkpoint by path
AND sha256 of its model file, backbone, weights source, data fingerprint and split id, the resolved
stage config, class names, metrics, creation time and msbt version. The model's own sha256 is in it,
so :func:`verify` detects a model file changed after training, and :func:`lineage` can show a chain
whose parent was replaced.

This module imports no TensorFlow until a model is loaded, so ``msbt lineage`` stays fast.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from msbt.atomicio import read_json_object, write_text
from msbt import __version__
from msbt.config import StageConfig, to_dict

MODEL_FILE = "model.keras"
MANIFEST_FILE = "manifest.json"
# The training state at the kept epoch (optimizer variables, dropout seed states), for a resume that
# continues as if never interrupted (msbt.train.loop); not needed to predict.
TRAIN_STATE_FILE = "train_state.npz"
FORMAT_VERSION = 1
MAX_STAGE = 2  # the paper's chain: ImageNet -> cell lines (stage 1) -> ultrasound (stage 2)


DIGEST_KEY = "manifest_sha256"  # sha256 of the manifest's other fields (class names, config, model hash ...)


class CheckpointError(ValueError):
    """A checkpoint is missing, altered, or not allowed where it was given; the message names it."""


def json_digest(record: Mapping, skip: str = DIGEST_KEY) -> str:
    """sha256 of a JSON record's canonical form (sorted keys), leaving out the field ``skip`` that holds it.

    A manifest (or export.json) carries the digest of everything else in it, so a hand edit (swapped
    class_names, another threshold) is detected; the model file is covered through its own sha256 inside.
    """
    body = {k: v for k, v in record.items() if k != skip}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_record(weights: str) -> dict[str, Any]:
    """The weights source; a local file also gets its hash, so the run can be reproduced exactly."""
    if weights in ("imagenet", "none", "parent"):
        return {"source": weights}
    path = Path(weights).expanduser().resolve()
    return {"source": str(path), "sha256": sha256_file(path) if path.is_file() else None}


def write_manifest(
    directory: str | Path,
    *,
    stage_config: StageConfig,
    class_names: Sequence[str],
    metrics: Mapping[str, float],
    best_epoch: int,
    history: Mapping[str, Sequence[float]] = (),
    parent: str | Path | None = None,
    data_fingerprint: str = "",
    split_id: str = "",
    number: int | None = None,
    seed: int | None = None,
    members: Sequence[Mapping] | None = None,
) -> dict:
    """Write ``manifest.json`` beside an already saved ``model.keras``.

    Args:
        directory: The checkpoint folder (must contain ``model.keras``).
        stage_config: The resolved config the stage trained with.
        class_names: In label order (index 0 first).
        metrics: Logs of the best epoch (``loss``, ``val_auc`` ...).
        best_epoch: 1-based epoch whose model was kept.
        history: Per-epoch logs, ``{name: [value per epoch]}``.
        parent: The parent checkpoint folder (stage 2), or None.
        data_fingerprint: Identifies the training data (passed in by the caller).
        split_id: Identifies the train/val/test split (passed in by the caller).
        number: The stage's number (1 cell lines, 2 ultrasound). Default: 1 without a parent, else the
            parent's plus one. A stage 2 that starts from no stage 1 (``weights`` imagenet, none or a file)
            must say so: it has no parent to count from.
        seed: The training seed (weights, row order, augmentation); recorded when given, so repetitions
            of one design over seeds say which they are.
        members: An ensemble's members (msbt.model.ensemble): folder, relpath, model sha256 of each.

    Returns:
        The manifest as written.

    Raises:
        ValueError: A ``number`` that is not the parent's plus one.
    """
    directory = Path(directory)
    parent_record = None
    if parent is not None:
        parent_dir = Path(parent).resolve()
        parent_record = {
            "path": str(parent_dir),
            # relative too, so a run folder moved as a whole (e.g. copied by Ray) still resolves
            "relpath": os.path.relpath(parent_dir, directory.resolve()),
            "model_sha256": sha256_file(parent_dir / MODEL_FILE),
            "stage": read_manifest(parent_dir)["stage"],
        }
    counted = 1 if parent_record is None else parent_record["stage"] + 1
    if number is not None and parent_record is not None and number != counted:
        raise ValueError(f"stage {number} cannot have the stage-{parent_record['stage']} parent "
                         f"{parent_record['path']}")
    manifest = {
        "format": FORMAT_VERSION,
        "stage": counted if number is None else number,
        "model_file": MODEL_FILE,
        "model_sha256": sha256_file(directory / MODEL_FILE),
        "parent": parent_record,
        "backbone": stage_config.backbone,
        "weights": weights_record(stage_config.weights),
        "data_fingerprint": data_fingerprint,
        "split_id": split_id,
        "class_names": list(class_names),
        "monitor": stage_config.monitor,
        "best_epoch": best_epoch,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "history": {k: [float(x) for x in v] for k, v in dict(history).items()},
        "config": to_dict(stage_config),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "msbt_version": __version__,
    }
    if seed is not None:
        manifest["seed"] = int(seed)
    if members:
        manifest["members"] = [dict(m) for m in members]
    if (directory / TRAIN_STATE_FILE).is_file():
        manifest["train_state_sha256"] = sha256_file(directory / TRAIN_STATE_FILE)
    manifest[DIGEST_KEY] = json_digest(manifest)
    write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")  # never a half-written manifest
    return manifest


def read_manifest(path: str | Path) -> dict:
    """Read a checkpoint's manifest.

    Args:
        path: The checkpoint folder (or its ``manifest.json`` / ``model.keras``).

    Returns:
        The manifest dict.

    Raises:
        CheckpointError: No manifest, or not valid JSON.
    """
    directory = _folder(path)
    file = directory / MANIFEST_FILE
    if not file.is_file():
        if not directory.exists():  # a mistyped or deleted folder: say so, not that it lacks a manifest
            raise CheckpointError(f"{directory}: no such checkpoint folder")
        raise CheckpointError(f"{directory}: not a checkpoint (no {MANIFEST_FILE})")
    return read_json_object(file, "a checkpoint manifest", CheckpointError)


def _folder(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path.parent if path.name in (MANIFEST_FILE, MODEL_FILE) else path


def verify(path: str | Path) -> bool:
    """True when the checkpoint's model file exists, its sha256 matches the manifest, and the manifest
    itself is unchanged (its digest, where it has one); False also for a folder whose manifest is missing or
    unreadable."""
    try:
        return integrity_status(path) == "ok"
    except CheckpointError:
        return False


def integrity_status(path: str | Path) -> str:
    """``"ok"``, or which of :func:`check_integrity`'s checks fails, as ``msbt lineage`` shows it:
    ``"MANIFEST CHANGED"``, ``"MODEL MISSING"`` or ``"MODEL CHANGED"``.

    Raises:
        CheckpointError: no readable manifest (not a checkpoint).
    """
    directory = _folder(path)
    problem = _integrity_problem(directory, read_manifest(directory))
    return problem[0] if problem else "ok"


def _integrity_problem(directory: Path, manifest: Mapping) -> tuple[str, str] | None:
    """The first check of the checkpoint that fails, as (short status, message naming the file), or None."""
    recorded = manifest.get(DIGEST_KEY)
    # Manifests written before the digest existed (format 1 without it) are checked by the model hash only.
    if recorded is not None and recorded != json_digest(manifest):
        return "MANIFEST CHANGED", (f"{directory / MANIFEST_FILE}: changed after it was written (its {DIGEST_KEY} "
                                    "does not match its content: class names, config or hashes were edited)")
    model = directory / manifest.get("model_file", MODEL_FILE)
    if not model.is_file():
        return "MODEL MISSING", f"{model}: the checkpoint's model file is missing"
    if sha256_file(model) != manifest.get("model_sha256"):
        return "MODEL CHANGED", f"{directory}: {MODEL_FILE} does not match the sha256 in {MANIFEST_FILE}"
    return None


def check_integrity(path: str | Path) -> dict:
    """Everything a prediction depends on inside the checkpoint is as written: the manifest (class names,
    config, weights record ...) against its own digest, the model file against the manifest's sha256.

    Returns:
        The manifest.

    Raises:
        CheckpointError: naming the file and what changed.
    """
    directory = _folder(path)
    manifest = read_manifest(directory)
    problem = _integrity_problem(directory, manifest)
    if problem:
        raise CheckpointError(problem[1])
    return manifest


def load_checkpoint(path: str | Path, *, check: bool = True):
    """Load a checkpoint's model (uncompiled) and manifest.

    Args:
        path: The checkpoint folder.
        check: Refuse a model whose hash does not match the manifest.

    Returns:
        ``(keras.Model, manifest dict)``.

    Raises:
        CheckpointError: Not a checkpoint, or the model file was changed.
    """
    directory = _folder(path)
    manifest = check_integrity(directory) if check else read_manifest(directory)
    from msbt.model.models import load_model  # TensorFlow only when a model is really loaded

    file = directory / manifest.get("model_file", MODEL_FILE)
    try:
        return load_model(file), manifest
    except Exception as exc:  # Keras reports a damaged archive as e.g. "File not found": say what it is
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{file}: cannot be loaded as a Keras model (damaged or truncated file?): "
                              f"{type(exc).__name__}: {first}") from None


def check_parent(path: str | Path, stage_config: StageConfig) -> dict:
    """Accept ``path`` as the parent of a stage, or say why not.

    Args:
        path: The candidate parent checkpoint folder.
        stage_config: The child stage's config (its backbone must match the parent's).

    Returns:
        The parent's manifest.

    Raises:
        CheckpointError: Not a checkpoint, altered, already the last stage, or another backbone.
    """
    directory = _folder(path)
    try:
        manifest = check_integrity(directory)
    except CheckpointError as err:
        raise CheckpointError(f"parent checkpoint: {err}") from None
    if manifest["stage"] >= MAX_STAGE:
        raise CheckpointError(
            f"parent {directory} is a stage-{manifest['stage']} checkpoint; stage 2 needs a stage-1 parent"
        )
    if manifest["backbone"] != stage_config.backbone:
        raise CheckpointError(
            f"parent {directory} has backbone {manifest['backbone']}, this stage wants {stage_config.backbone}"
        )
    return manifest


# ---------------------------------------------------------------------------------------------------
# Lineage


def lineage(path: str | Path) -> list[dict]:
    """Walk from a checkpoint to its root through the recorded parents.

    Args:
        path: A checkpoint folder.

    Returns:
        One dict per checkpoint, child first: ``path``, ``manifest`` (None if the parent is missing),
        ``verified`` (its model matches its manifest), ``status`` (where a manifest was found:
        :func:`integrity_status`) and ``link_ok`` (for all but the last: the parent found has the model hash
        the child recorded).
    """
    chain: list[dict] = []
    directory: Path | None = _folder(path).resolve()
    seen: set[Path] = set()
    while directory is not None and directory not in seen:
        seen.add(directory)
        if not (directory / MANIFEST_FILE).is_file():
            chain.append({"path": str(directory), "manifest": None, "verified": False, "link_ok": None})
            break
        manifest = read_manifest(directory)
        problem = _integrity_problem(directory, manifest)
        status = problem[0] if problem else "ok"
        entry = {"path": str(directory), "manifest": manifest, "verified": status == "ok", "status": status,
                 "link_ok": None}
        chain.append(entry)
        record = manifest.get("parent")
        if not record:
            break
        directory = _find_parent(directory, record)
        if directory is None:
            entry["link_ok"] = False
            chain.append({"path": record["path"], "manifest": None, "verified": False, "link_ok": False})
            break
        entry["link_ok"] = sha256_file(directory / MODEL_FILE) == record["model_sha256"]
    return chain


def _find_parent(child: Path, record: Mapping) -> Path | None:
    for candidate in (Path(record["path"]), (child / record.get("relpath", "\0")).resolve()):
        if (candidate / MODEL_FILE).is_file():
            return candidate
    return None


def format_lineage(path: str | Path) -> str:
    """The chain from a checkpoint back to its weights source, one line per link (for ``msbt lineage``).

    Args:
        path: A checkpoint folder.

    Returns:
        Printable text, child first, e.g.::

            stage 2  resnet50  weights=parent  classes=benign,malignant  val_auc=0.9100 @ epoch 12  [ok]  runs/x/stage2
              <- stage 1  resnet50  weights=imagenet  classes=a,b,c,d  val_loss=0.1200 @ epoch 30  [ok]  runs/x/stage1
              <- imagenet
    """
    lines = []
    chain = lineage(path)
    members = (chain[0]["manifest"] or {}).get("members")
    if members:  # an ensemble (msbt.model.ensemble): its own line, then each member's chain, checked by hash
        status = chain[0]["status"]
        lines.append(f"ensemble of {len(members)}  stage 2  classes={','.join(chain[0]['manifest']['class_names'])}  "
                     f"mean of the members' probabilities  [{status}]  {chain[0]['path']}")
        for i, record in enumerate(members):
            folder = _find_parent(Path(chain[0]["path"]), record)
            if folder is None:
                lines.append(f"  member {i}: MISSING checkpoint {record['path']}")
                continue
            changed = "" if sha256_file(folder / MODEL_FILE) == record["model_sha256"] else " [MEMBER CHANGED]"
            sub = format_lineage(folder).splitlines()
            lines.append(f"  member {i}{changed}: {sub[0]}")
            lines += [f"    {line}" for line in sub[1:]]
        return "\n".join(lines)
    for depth, entry in enumerate(chain):
        prefix = "" if depth == 0 else "  <- "
        manifest = entry["manifest"]
        if manifest is None:
            lines.append(f"{prefix}MISSING checkpoint {entry['path']}")
            continue
        lines.append(prefix + _describe(entry))
    last = chain[-1]["manifest"]
    if last is not None and not last.get("parent"):
        lines.append(f"  <- {last['weights']['source']}")
    return "\n".join(lines)


def _describe(entry: Mapping) -> str:
    m = entry["manifest"]
    monitor = m.get("monitor", "")
    score = m.get("metrics", {}).get(monitor)
    score_text = f"{monitor}={score:.4f} @ epoch {m.get('best_epoch')}" if score is not None else "no metrics"
    status = entry["status"]
    if entry["link_ok"] is False:
        status += ", PARENT CHANGED"
    return (
        f"stage {m['stage']}  {m['backbone']}  weights={m['weights']['source']}  "
        f"classes={','.join(m['class_names'])}  {score_text}  [{status}]  {entry['path']}"
    )


def train_state_file(path: str | Path) -> Path | None:
    """The checkpoint's verified ``train_state.npz``, or None for a checkpoint written without one.

    Raises:
        CheckpointError: The manifest records a training state but the file is missing or changed.
    """
    directory = _folder(path)
    recorded = read_manifest(directory).get("train_state_sha256")
    if recorded is None:
        return None
    state = directory / TRAIN_STATE_FILE
    if not state.is_file():
        raise CheckpointError(f"{state}: missing, but the checkpoint's manifest records it")
    if sha256_file(state) != recorded:
        raise CheckpointError(f"{state}: changed after it was written (sha256 differs from the manifest)")
    return state
