"""The run's record of finished stages, and how a stage starts: reused, resumed, or trained afresh.

`runs/<name>/stages.json` holds one entry per FINISHED stage (its best checkpoint, the metric that chose
it, epochs, wall time); it is written only after a stage's Ray Train run returned, so an entry means
"done". A stage that was interrupted (driver killed, node lost, more worker failures than
`run.max_failures`) has no entry, but its Ray run folder `runs/<name>/stage<n>/` holds the checkpoints
it reported.

A rerun with `--resume` reuses every recorded stage (after checking that it was trained with the same
stage settings on the same store) and continues an interrupted one from its latest checkpoint. A rerun
WITHOUT `--resume` of a run folder that already holds a stage is refused with a message naming
`--resume` and `run.name`: Ray Train V2 restores the checkpoints of a run folder it finds
(`checkpoint_manager_snapshot.json`), so "train again" there would silently continue the old run; and
deleting a finished model on a plain rerun is worse. A fresh run gets a fresh `run.name`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

from msbt.model.checkpoint import MODEL_FILE, CheckpointError, read_manifest, sha256_file, verify
from msbt.config import Config, to_dict

log = logging.getLogger(__name__)

STAGES_FILE = "stages.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


class RunStateError(ValueError):
    """The run folder's state does not allow what was asked; the message says what to do instead."""


def run_folder(config: Config) -> Path:
    """`<run.storage_path>/<run.name>` (the same folder as msbt.jobs.pipeline.run_dir)."""
    return (Path(config.run.storage_path).expanduser() / config.run.name).resolve()


def stage_folder(config: Config, number: int) -> Path:
    """Ray Train's run folder of one stage (msbt.train.runner.run_config puts it there)."""
    return run_folder(config) / f"stage{number}"


def read_stages(config: Config) -> dict[str, dict]:
    """Finished stages of this run: `{"1": entry, "2": entry}` (empty when none finished)."""
    path = run_folder(config) / STAGES_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunStateError(f"{path}: not valid JSON ({err}); remove it to retrain every stage") from None
    if not isinstance(data, dict):
        raise RunStateError(f"{path}: expected a mapping of stage number -> entry")
    return data


def record_stage(config: Config, number: int, entry: dict) -> Path:
    """Add one finished stage to `stages.json` (written whole to a temporary file, then renamed)."""
    path = run_folder(config) / STAGES_FILE
    stages = read_stages(config)
    stages[str(number)] = entry
    tmp = path.with_name(f".{STAGES_FILE}.tmp")
    tmp.write_text(json.dumps(stages, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def refuse_rerun(config: Config, numbers: Sequence[int] = (1, 2)) -> None:
    """Raise if any of these stages already trained in this run folder (finished or interrupted).

    Raises:
        RunStateError: naming the stage, where its state lies, `--resume` and `run.name`.
    """
    stages = read_stages(config)
    for number in numbers:
        folder = stage_folder(config, number)
        if str(number) in stages:
            state = f"finished (recorded in {run_folder(config) / STAGES_FILE})"
        elif (folder / RAY_SNAPSHOT).exists() or any(folder.glob("checkpoint_*")):
            state = f"interrupted (its checkpoints are in {folder})"
        else:
            continue
        raise RunStateError(
            f"stage {number} of run {config.run.name!r} is already {state}. Rerun with --resume to reuse "
            f"finished stages and continue an interrupted one, or train afresh under another name "
            f"(--set run.name=...)."
        )


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint of a stage's Ray run folder with the highest epoch, among complete ones.

    A checkpoint folder whose copy was cut short (no manifest, or a model that fails its sha256) is
    skipped. Each reported checkpoint is the best model so far, so the latest is also the best.
    """
    best: tuple[int, Path] | None = None
    for candidate in Path(folder).glob("checkpoint_*"):
        if not candidate.is_dir():  # Ray's checkpoint_manager_snapshot.json
            continue
        try:
            epoch = int(read_manifest(candidate)["best_epoch"])
            complete = verify(candidate)
        except (CheckpointError, KeyError, ValueError, OSError):
            continue
        if complete and (best is None or epoch > best[0]):
            best = (epoch, candidate)
    return best[1] if best else None


def check_fits(config: Config, number: int, path: str | Path, store_path: str | Path, where: str,
               *, ignore: Sequence[str] = ()) -> Path:
    """A checkpoint of this run's stage, if it still fits the config and the store; else why not.

    Args:
        where: Names the checkpoint in messages ("stage 1 recorded in .../stages.json").
        ignore: Stage settings allowed to differ (``epochs`` for a stage that continues).

    Raises:
        RunStateError: The checkpoint is gone or altered, or was trained with other stage settings or
            on another store than this config gives.
    """
    from msbt.train.runner import store_identity

    path = Path(path)
    try:
        manifest = read_manifest(path)
        intact = verify(path)
    except CheckpointError as err:
        raise RunStateError(f"{where}: {err}") from None
    if not intact:
        raise RunStateError(f"{where}: {path} was altered after training (sha256 mismatch)")
    stage = config.stage1 if number == 1 else config.stage2
    ours, theirs = to_dict(stage), manifest["config"]
    changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k) and k not in ignore)
    if changed:
        details = ", ".join(f"stage{number}.{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in changed)
        raise RunStateError(f"{where} was trained with other settings ({details}); train them under another "
                            f"run.name")
    if manifest.get("data_fingerprint") != store_identity(store_path)[0]:
        raise RunStateError(f"{where} was trained on another store than {store_path}; use another run.name")
    return path


def run_stage(config: Config, number: int, store_path: str | Path, parent: str | Path | None = None, *,
              resume: bool = False) -> dict:
    """Train one stage with Ray Train, or reuse/continue it on `--resume`; record it when it finishes.

    Args:
        config: The resolved config.
        number: 1 or 2.
        store_path: The stage's Parquet store.
        parent: Stage 2: stage 1's checkpoint folder.
        resume: Reuse a recorded stage; continue an interrupted one from its latest checkpoint.

    Returns:
        The stage's entry (`checkpoint`, `monitor`, `value`, `best_epoch`, `epochs`, `seconds`,
        `finished`, `resumed_from`) plus `reused` (True when it was not trained now).

    Raises:
        RunStateError: Without `resume`, a stage that this run folder already holds (see the module
            docstring); with it, a recorded stage that no longer fits the config.
    """
    from msbt.train.runner import best_checkpoint, train_stage

    stage = config.stage1 if number == 1 else config.stage2
    if not resume:
        refuse_rerun(config, [number])
    recorded = read_stages(config).get(str(number)) if resume else None
    if recorded is not None:
        path = check_fits(config, number, recorded["checkpoint"], store_path,
                          f"stage {number} recorded in {run_folder(config) / STAGES_FILE}")
        link = read_manifest(path).get("parent") or {}
        if parent is not None and link.get("model_sha256") != sha256_file(Path(parent) / MODEL_FILE):
            raise RunStateError(f"stage {number} recorded in {run_folder(config) / STAGES_FILE} descends from "
                                f"{link.get('path')}, not from {parent}; train it under another run.name")
        print(f"stage {number}: finished before, reused (--resume): best {recorded['monitor']} "
              f"{recorded['value']:.4f} -> {path}", flush=True)
        return {**recorded, "reused": True}
    start = latest_checkpoint(stage_folder(config, number)) if resume else None
    if start is not None:
        # checked here, not only in the worker, where a mismatch would be retried max_failures times
        check_fits(config, number, start, store_path, f"stage {number}'s checkpoint {start}", ignore=("epochs",))
        print(f"stage {number}: resuming after epoch {read_manifest(start)['best_epoch']} from {start}", flush=True)
    began = time.time()
    result = train_stage(config, number, store_path, parent_checkpoint=parent, resume_from=start)
    best = best_checkpoint(result, stage.monitor)
    if best is None:
        raise RunStateError(f"stage {number} reported no checkpoint ({stage.monitor} never finite?)")
    manifest = read_manifest(best.path)
    entry = {
        "checkpoint": str(best.path),
        "monitor": stage.monitor,
        "value": float(manifest["metrics"][stage.monitor]),
        "best_epoch": int(manifest["best_epoch"]),
        "epochs": stage.epochs,
        "seconds": round(time.time() - began, 1),  # this invocation's training (and its restarts)
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "resumed_from": str(start) if start else None,
    }
    record_stage(config, number, entry)
    # An AUC monitored during training is Keras' binned estimate; the exact one comes with the evaluation.
    kind = " [Keras' binned AUC]" if "auc" in stage.monitor else ""
    print(f"stage {number}: best {stage.monitor} {entry['value']:.4f}{kind} (epoch {entry['best_epoch']} of "
          f"{stage.epochs}) -> {best.path}", flush=True)
    return {**entry, "reused": False}
