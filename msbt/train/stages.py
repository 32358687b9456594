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
deleting a finished model on a plain rerun is worse. A fresh run gets a fresh `run.name`. That check is
the jobs layer's (msbt.jobs.pipeline.check_rerun, before Ray starts); `run_stage` assumes it was made.

Identical stages are trained once. A stage's result is determined by its inputs (:func:`stage_inputs`):
the stage settings, the parent model (its sha256; or the weights source), the store (its identity),
the seed, the worker count and the precision. Every finished stage is remembered under the sha256 of
those inputs in `<run.storage_path>/stage-index.json`; a new run (or an experiment, or Tune) whose stage
has the same inputs reuses that checkpoint instead of training (`run.reuse_stages: false` turns it off).
An index entry is only a pointer: before reuse the checkpoint must be intact (sha256), be the one the
entry names, and its manifest must agree with the inputs; anything else is ignored, never trusted.
The reusing run's stages.json entry says `reused_from` (the run folder that trained it), and its
stage 2's lineage leads to the checkpoint in that run.

One function finds a stage-1 checkpoint to start from (:func:`reusable_stage1`): the run's own records
first (stages.json, the experiments' and Tune's stage1.json, the evaluated model's parent), then the
index. The jobs, the experiments and Tune all use it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from msbt.atomicio import read_json, write_text
from msbt.config import Config, to_dict, training_seed
from msbt.model.checkpoint import MODEL_FILE, CheckpointError, read_manifest, sha256_file, train_state_file, verify
from msbt.runfolder import STAGES_FILE, run_dir, stage_dir

log = logging.getLogger(__name__)

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


class RunStateError(ValueError):
    """The run folder's state does not allow what was asked; the message says what to do instead."""


def read_stages(config: Config) -> dict[str, dict]:
    """Finished stages of this run: `{"1": entry, "2": entry}` (empty when none finished)."""
    path = run_dir(config) / STAGES_FILE
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
    path = run_dir(config) / STAGES_FILE
    stages = read_stages(config)
    stages[str(number)] = entry
    return write_text(path, json.dumps(stages, indent=2, sort_keys=True) + "\n")


def refuse_rerun(config: Config, numbers: Sequence[int] = (1, 2), *, label: str | None = None) -> None:
    """Raise if any of these stages already trained in this run folder (finished or interrupted).

    Args:
        label: How the message names the run (default ``run '<run.name>'``; a further training seed's folder
            names the run it belongs to).

    Raises:
        RunStateError: naming the stage, where its state lies, `--resume` and `run.name`.
    """
    stages = read_stages(config)
    for number in numbers:
        folder = stage_dir(config, number)
        if str(number) in stages:
            state = f"finished (recorded in {run_dir(config) / STAGES_FILE})"
        elif (folder / RAY_SNAPSHOT).exists() or any(folder.glob("checkpoint_*")):
            state = f"interrupted (its checkpoints are in {folder})"
        else:
            continue
        raise RunStateError(
            f"stage {number} of {label or f'run {config.run.name!r}'} is already {state}. Rerun with --resume to reuse "
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
            train_state_file(candidate)  # a training state cut short is an incomplete copy too
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
    from msbt.data.store import Store

    path = Path(path)
    try:
        manifest = read_manifest(path)
        intact = verify(path)
    except CheckpointError as err:
        raise RunStateError(f"{where}: {err}") from None
    if not intact:
        raise RunStateError(f"{where}: {path} was altered after training (sha256 mismatch)")
    _refuse_other_settings(config, number, manifest, where, ignore)
    if manifest.get("data_fingerprint") != Store.open(store_path).fingerprint()[0]:
        raise RunStateError(f"{where} was trained on another store than {store_path}; use another run.name")
    return path


def _refuse_other_settings(config: Config, number: int, manifest: dict, where: str, ignore: Sequence[str]) -> None:
    stage = config.stage1 if number == 1 else config.stage2
    ours, theirs = to_dict(stage), manifest["config"]
    changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k) and k not in ignore)
    if changed:
        details = ", ".join(f"stage{number}.{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in changed)
        raise RunStateError(f"{where} was trained with other settings ({details}); train them under another "
                            f"run.name")
    # the seed decides which folder a further stage-2 seed lives in and what an average of seeds holds: a stage
    # trained with another one is not this config's (checkpoints made before manifests recorded it pass)
    if manifest.get("seed") is not None and manifest["seed"] != training_seed(config):
        raise RunStateError(f"{where} was trained with training seed {manifest['seed']}, this config gives "
                            f"{training_seed(config)} (run.train_seed, else data.seed); train it under another "
                            "run.name")


def refuse_changed_resume(config: Config, numbers: Sequence[int] = (1, 2)) -> None:
    """Before a `--resume` writes anything: refuse stage settings that differ from what the run trained.

    The same settings check as :func:`check_fits` (a recorded stage: every setting; an interrupted one:
    all but ``epochs``), done from the manifests alone so that a refused resume leaves the run folder,
    its ``config.yaml`` included, as it was. The store check needs the store and stays in ``run_stage``.

    Raises:
        RunStateError: naming the stage, the checkpoint and each changed setting.
    """
    recorded = read_stages(config)
    for number in numbers:
        entry = recorded.get(str(number))
        path, ignore = (Path(entry["checkpoint"]), ()) if entry else (latest_checkpoint(stage_dir(config, number)),
                                                                    ("epochs",))
        if path is None:
            continue
        try:
            manifest = read_manifest(path)
        except CheckpointError:
            continue  # reported with its reason by run_stage
        where = (f"stage {number} recorded in {run_dir(config) / STAGES_FILE}" if entry
                 else f"stage {number}'s checkpoint {path}")
        _refuse_other_settings(config, number, manifest, where, ignore)


def prune_checkpoints(folder: str | Path, keep: Sequence[str | Path]) -> list[Path]:
    """Remove the stage's ``checkpoint_*`` folders that Ray's checkpoint manager does not keep.

    Ray deletes checkpoints it drops from its kept list, but a checkpoint persisted just before the driver
    was killed is on disk and missing from the restored snapshot, so after `--resume` it was never
    deleted (3 kept where ``run.checkpoints_to_keep`` is 2, issue #13 item 8).

    Args:
        folder: The stage's Ray run folder (``runs/<name>/stage<n>``).
        keep: The checkpoint folders Ray kept (``result.best_checkpoints``).

    Returns:
        The folders removed.
    """
    kept = {Path(p).resolve() for p in keep}
    removed = []
    for candidate in sorted(Path(folder).glob("checkpoint_*")):
        if candidate.is_dir() and candidate.resolve() not in kept:
            shutil.rmtree(candidate)
            removed.append(candidate)
    return removed


# ---------------------------------------------------------------------------------------------------
# What determines a stage, and the index of finished stages


INDEX_FILE = "stage-index.json"
INDEX_FORMAT = 1


def parent_identity(weights: str, parent: str | Path | None) -> str:
    """What a stage starts from: ``sha256:<model hash>`` of a parent checkpoint or a local weights file,
    else the weights source itself (``imagenet``, ``none``)."""
    if parent is not None:
        return "sha256:" + sha256_file(Path(parent) / MODEL_FILE)
    if weights in ("imagenet", "none", "parent"):
        return weights
    path = Path(weights).expanduser()
    return "sha256:" + sha256_file(path) if path.is_file() else f"missing:{path.resolve()}"


def stage_inputs(config: Config, number: int, store_path: str | Path, parent: str | Path | None = None) -> dict:
    """Everything that determines a stage's result, as plain data (the key of the stage index).

    Args:
        config: The resolved config; ``stage<number>``, the training seed (``run.train_seed``, else
            ``data.seed``), ``run.num_workers``, ``run.mixed_precision`` and ``run.deterministic`` (when
            set) enter. ``run.name``, ``run.storage_path``, ``run.use_gpu``, ``run.cpus_per_worker``,
            ``run.worker_niceness`` and the checkpoint/failure settings do not: they change where a result goes
            or how fast it comes, not what it is.
        number: 1 or 2.
        store_path: The stage's store; its identity (``store.json``: content and split) enters.
        parent: Stage 2's parent checkpoint folder (its model's sha256 enters).

    Returns:
        A JSON-able mapping; :func:`stage_key` hashes it.
    """
    from msbt.data.store import Store

    stage = config.stage1 if number == 1 else config.stage2
    fingerprint, split_id = Store.open(store_path).fingerprint()
    inputs = {
        "stage": number,
        "config": to_dict(stage),
        "parent": parent_identity(stage.weights, parent),
        "data_fingerprint": fingerprint,
        "split_id": split_id,
        "seed": training_seed(config),
        "num_workers": config.run.num_workers,  # one worker runs Keras fit, more a custom step on shards
        "mixed_precision": config.run.mixed_precision,
        # a deterministic run promises a reproducible model: never stand in for it with another one
        **({"deterministic": True} if config.run.deterministic else {}),
    }
    return json.loads(json.dumps(inputs))  # as the index holds them (lists, not tuples), so they compare equal


def stage_key(inputs: dict) -> str:
    """sha256 of a stage's inputs (canonical JSON): equal keys = a stage with equal inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def index_root(config: Config) -> Path:
    """Where the stage index lives: ``run.storage_path`` (shared by every run stored there)."""
    return Path(config.run.storage_path).expanduser().resolve()


def read_index(root: str | Path) -> dict[str, dict]:
    """The index's entries, ``{key: entry}``; empty when there is none or it cannot be read.

    An unreadable index only costs a retraining, so it is ignored (and logged), not an error.
    """
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        entries = data["stages"] if data.get("format") == INDEX_FORMAT else None
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        entries = None
    if not isinstance(entries, dict):
        log.warning("%s: not a stage index this msbt can read; ignored (stages are trained)", path)
        return {}
    return entries


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold ``<root>/.stage-index.lock``: two jobs finishing at once must not drop each other's entry."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{INDEX_FILE}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remember_stage(root: str | Path, inputs: dict, checkpoint: str | Path, run: str | Path) -> dict:
    """Add a finished stage to the index (atomically; the latest stage of a key wins).

    Args:
        root: The index folder (:func:`index_root`).
        inputs: :func:`stage_inputs` of the stage.
        checkpoint: Its best checkpoint folder.
        run: The run folder that trained it (shown to whoever reuses it).

    Returns:
        The entry written.
    """
    root = Path(root).expanduser().resolve()
    manifest = read_manifest(checkpoint)
    entry = {
        "inputs": inputs,
        "checkpoint": str(Path(checkpoint).resolve()),
        "model_sha256": manifest["model_sha256"],
        "run": str(run),
        "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with _locked(root):
        entries = read_index(root)
        entries[stage_key(inputs)] = entry
        path = root / INDEX_FILE
        write_text(path, json.dumps({"format": INDEX_FORMAT, "stages": entries}, indent=2, sort_keys=True) + "\n")
    return entry


def find_identical(root: str | Path, inputs: dict) -> dict | None:
    """The index entry of a finished stage with exactly these inputs, if its checkpoint still holds.

    Returns:
        The entry (``checkpoint``, ``run``, ``model_sha256``, ``inputs``), or None: no entry, or a stale
        or altered one (logged and ignored).
    """
    entry = read_index(root).get(stage_key(inputs))
    if entry is None:
        return None
    if isinstance(entry, dict) and entry.get("inputs") == inputs and entry.get("checkpoint") \
            and not Path(entry["checkpoint"]).exists():
        # deleted since (an experiment's --fresh, a user's clean-up): nothing to warn about, it trains again
        log.info("%s: %s is gone; the stage trains again", Path(root) / INDEX_FILE, entry["checkpoint"])
        return None
    problem = _entry_problem(entry, inputs)
    if problem:
        log.warning("%s: not reusing %s (%s)", Path(root) / INDEX_FILE, entry.get("checkpoint"), problem)
        return None
    return entry


def _entry_problem(entry: dict, inputs: dict) -> str | None:
    """Why an index entry cannot be trusted for these inputs (None: it can)."""
    if not isinstance(entry, dict) or entry.get("inputs") != inputs:
        return "the entry's inputs differ from its key"
    path = entry.get("checkpoint")
    try:
        manifest = read_manifest(path)
        intact = verify(path)
    except (CheckpointError, OSError, TypeError) as err:
        return f"checkpoint unreadable: {err}"
    if not intact:
        return "its model no longer matches its manifest's sha256"
    if manifest.get("model_sha256") != entry.get("model_sha256"):
        return "the checkpoint holds another model than the one recorded"
    if manifest.get("config") is None or manifest.get("data_fingerprint") is None:
        return "its manifest records no stage settings or no store"  # every indexed checkpoint records both
    return manifest_problem(manifest, inputs)


def manifest_problem(manifest: dict, inputs: dict, *, old_stage_number: bool = False) -> str | None:
    """Why a checkpoint is not the result of a stage with these inputs (None: nothing says it is not).

    The one comparison of a checkpoint's manifest with :func:`stage_inputs`, for the stage index and for an
    experiment arm's earlier result alike. What a manifest does not record (checkpoints written before it
    did) is not held against it.

    Args:
        manifest: The checkpoint's ``manifest.json`` content.
        inputs: :func:`stage_inputs` of the stage it should stand for.
        old_stage_number: A stage 2 without a parent (weights imagenet or none) written before 2026-12-03 says 1
            in its manifest: accept it (an experiment arm's result), or not (the stage index, which would record
            it in a stages.json as stage 2).
    """
    number = inputs["stage"]
    legacy = old_stage_number and number == 2 and manifest.get("stage") == 1 and not manifest.get("parent") \
        and inputs["config"].get("weights") != "parent"
    if manifest.get("stage") is not None and manifest["stage"] != number and not legacy:
        return f"its manifest records stage {manifest['stage']}, not {number}"
    if manifest.get("seed") is not None and manifest["seed"] != inputs["seed"]:
        return f"its checkpoint was trained with seed {manifest['seed']}, not {inputs['seed']}"
    recorded = manifest.get("data_fingerprint"), manifest.get("split_id")
    if recorded[0] is not None and (recorded[0] != inputs["data_fingerprint"]
                                    or (recorded[1] is not None and recorded[1] != inputs["split_id"])):
        return "it was trained on other images or another split of them (another --scope, or changed data)"
    theirs, ours = manifest.get("config"), inputs["config"]
    if theirs is not None and theirs != ours:
        changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        return f"it was trained with other stage-{number} settings ({', '.join(f'stage{number}.{k}' for k in changed)})"
    if inputs["parent"].startswith("sha256:") and ours.get("weights") == "parent":
        link = manifest.get("parent") or {}
        if "sha256:" + str(link.get("model_sha256")) != inputs["parent"]:
            return (f"it descends from another stage 1 ({link.get('path') or 'none recorded'}; the stage 1 "
                    "given now was trained since or elsewhere)")
    return None


# ---------------------------------------------------------------------------------------------------
# A stage-1 checkpoint to start from


@dataclass(frozen=True)
class Stage1:
    """A reusable stage-1 checkpoint and where it was found."""

    checkpoint: Path
    record: Path  # the record file that named it (a run's stages.json ..., or the stage index)
    run: str | None = None  # the run folder that trained it, when found through the index


STAGE1_RECORDS = ("stages.json", "experiments/stage1.json", "tune/stage1.json")


def recorded_stage1(run: str | Path) -> list[tuple[str, Path]]:
    """Stage-1 checkpoints a run folder records, most authoritative first, with the file naming each.

    The main job's stages.json, the experiments' and Tune's own ``stage1.json``, and the parent of the
    model evaluated in ``metrics.json``.
    """
    run = Path(run)
    found = []
    for name in STAGE1_RECORDS:
        record = run / name
        data = read_json(record)
        if isinstance(data, dict):
            # stages.json keys finished stages by number; Tune's file by "stage1"; the experiments' is flat.
            entry = data.get("1") or data.get("stage1") or data
            if isinstance(entry, dict) and entry.get("checkpoint"):
                found.append((str(entry["checkpoint"]), record))
    scored = run / "metrics.json"  # the evaluated stage-2 model's parent is the run's stage 1
    checkpoint = (read_json(scored) or {}).get("checkpoint") if scored.is_file() else None
    if checkpoint and Path(checkpoint).is_dir():
        from msbt.model.checkpoint import lineage

        members = read_manifest(checkpoint).get("members") if (Path(checkpoint) / "manifest.json").is_file() else None
        chain = lineage(members[0]["path"] if members else checkpoint)  # an average: its first member's parent
        if len(chain) > 1:
            found.append((chain[1]["path"], scored))
    return found


def usable_stage1(path: str | Path | None, config: Config, store_path: str | Path | None = None) -> Path | None:
    """``path`` if it is an intact stage-1 checkpoint trained with ``config.stage1`` (on this store, when
    one is given); else None, with the reason logged."""
    from msbt.data.store import Store

    if not path:
        return None
    path = Path(path)
    try:
        manifest = read_manifest(path)
        intact = verify(path)
    except (CheckpointError, OSError):
        log.warning("not reusing %s as stage 1: missing or not a checkpoint", path)
        return None
    if not intact or manifest.get("stage") != 1 or manifest.get("config") != to_dict(config.stage1):
        log.warning("not reusing %s as stage 1 (changed, not stage 1, or another stage-1 config)", path)
        return None
    if store_path is not None and manifest.get("data_fingerprint") != Store.open(store_path).fingerprint()[0]:
        log.warning("not reusing %s as stage 1: trained on another store than %s", path, store_path)
        return None
    return path


def reusable_stage1(config: Config, store_path: str | Path) -> Stage1 | None:
    """The one lookup of a finished stage 1 that later steps may start from without training it.

    The run's own records come first (:func:`recorded_stage1`), each checked by :func:`usable_stage1`;
    then, with ``run.reuse_stages``, an identical stage 1 of another run from the stage index.

    Returns:
        A :class:`Stage1`, or None when stage 1 must be trained.
    """
    for candidate, record in recorded_stage1(run_dir(config)):
        found = usable_stage1(candidate, config, store_path)
        if found is not None:
            return Stage1(found, record)
    if config.run.reuse_stages:
        entry = find_identical(index_root(config), stage_inputs(config, 1, store_path))
        if entry is not None:
            return Stage1(Path(entry["checkpoint"]), index_root(config) / INDEX_FILE, entry["run"])
    return None


def reuse_message(number: int, checkpoint: str | Path, run: str | Path) -> str:
    """The line printed when a stage is not trained because an identical one finished elsewhere."""
    return f"stage {number}: identical stage found in run {Path(run).name} ({run}), reused -> {checkpoint}"


def run_stage(config: Config, number: int, store_path: str | Path, parent: str | Path | None = None, *,
              resume: bool = False, index: str | Path | None = None) -> dict:
    """Train one stage with Ray Train, or reuse/continue it; record it when it finishes.

    The caller has checked that the run folder allows this (msbt.jobs.pipeline.check_rerun: without
    ``resume``, a run folder already holding this stage is refused there, before Ray starts).

    Args:
        config: The resolved config.
        number: 1 or 2.
        store_path: The stage's Parquet store.
        parent: Stage 2: stage 1's checkpoint folder.
        resume: Reuse a recorded stage; continue an interrupted one from its latest checkpoint.
        index: The stage index's folder; default :func:`index_root` of ``config`` (a run folder nested in
            another, such as a further training seed's, passes the outer run's).

    Returns:
        The stage's entry (`checkpoint`, `monitor`, `value`, `best_epoch`, `epochs`, `seconds`,
        `finished`, `resumed_from`, and `reused_from` when an identical stage of another run was
        taken) plus `reused` (True when it was not trained now).

    Raises:
        RunStateError: With `resume`, a recorded stage that no longer fits the config.
    """
    recorded = read_stages(config).get(str(number)) if resume else None
    if recorded is not None:
        return _recorded(config, number, recorded, store_path, parent)
    start = latest_checkpoint(stage_dir(config, number)) if resume else None
    inputs = stage_inputs(config, number, store_path, parent)
    index = Path(index) if index is not None else index_root(config)
    if start is None and config.run.reuse_stages:
        entry = find_identical(index, inputs)
        if entry is not None:
            return _reused(config, number, entry)
    if start is not None:
        # checked here, not only in the worker, where a mismatch would be retried max_failures times
        check_fits(config, number, start, store_path, f"stage {number}'s checkpoint {start}", ignore=("epochs",))
        print(f"stage {number}: resuming after epoch {read_manifest(start)['best_epoch']} from {start}", flush=True)
    return _trained(config, number, store_path, parent, start, inputs, index)


def _recorded(config: Config, number: int, recorded: dict, store_path, parent) -> dict:
    """A stage this run recorded as finished, checked against the config (``--resume``)."""
    path = check_fits(config, number, recorded["checkpoint"], store_path,
                      f"stage {number} recorded in {run_dir(config) / STAGES_FILE}")
    link = read_manifest(path).get("parent") or {}
    if parent is not None and link.get("model_sha256") != sha256_file(Path(parent) / MODEL_FILE):
        raise RunStateError(f"stage {number} recorded in {run_dir(config) / STAGES_FILE} descends from "
                            f"{link.get('path')}, not from {parent}; train it under another run.name")
    print(f"stage {number}: finished before, reused (--resume): best {recorded['monitor']} "
          f"{recorded['value']:.4f} -> {path}", flush=True)
    return {**recorded, "reused": True}


def _reused(config: Config, number: int, found: dict) -> dict:
    """Record an identical stage of another run (verified by find_identical) as this run's stage."""
    stage = config.stage1 if number == 1 else config.stage2
    manifest = read_manifest(found["checkpoint"])
    entry = {
        "checkpoint": found["checkpoint"],
        "monitor": stage.monitor,
        "value": float(manifest["metrics"][stage.monitor]),
        "best_epoch": int(manifest["best_epoch"]),
        "epochs": stage.epochs,
        "seconds": 0.0,  # nothing trained now
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "resumed_from": None,
        "reused_from": found["run"],
    }
    record_stage(config, number, entry)
    print(reuse_message(number, found["checkpoint"], found["run"]), flush=True)
    return {**entry, "reused": True}


def _trained(config: Config, number: int, store_path, parent, start: Path | None, inputs: dict, index: Path) -> dict:
    """Train the stage with Ray Train (from ``start`` when continuing), record it and remember it."""
    from msbt.train.runner import best_checkpoint, train_stage

    stage = config.stage1 if number == 1 else config.stage2
    began = time.time()
    result = train_stage(config, number, store_path, parent_checkpoint=parent, resume_from=start)
    best = best_checkpoint(result, stage.monitor)
    if best is None:
        raise RunStateError(f"stage {number} reported no checkpoint ({stage.monitor} never finite?)")
    kept = [c.path for c, _ in (result.best_checkpoints or [])] + [best.path]
    for gone in prune_checkpoints(stage_dir(config, number), kept):
        log.info("removed %s: not among the %d checkpoints kept", gone, config.run.checkpoints_to_keep)
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
    remember_stage(index, inputs, best.path, run_dir(config))
    # An AUC monitored during training is Keras' binned estimate; the exact one comes with the evaluation.
    kind = " [Keras' binned AUC]" if "auc" in stage.monitor else ""
    print(f"stage {number}: best {stage.monitor} {entry['value']:.4f}{kind} (epoch {entry['best_epoch']} of "
          f"{stage.epochs}) -> {best.path}", flush=True)
    return {**entry, "reused": False}


def train_stage1_once(config: Config, store_path: str | Path, *, root: str | Path, verbose: int = 0) -> Path:
    """Train stage 1 for a later step that found none to reuse (Tune, the experiments) and remember it in
    the stage index, so the next run with the same inputs reuses it.

    Args:
        config: The config whose ``run`` places the Ray run folder (``<storage_path>/<name>/stage1``).
        store_path: The microscope store.
        root: The stage index's folder: the main run's :func:`index_root` (an experiment's own config
            places its Ray folders elsewhere).
        verbose: Keras verbosity in the worker.

    Returns:
        The best checkpoint folder.
    """
    from msbt.train.runner import best_checkpoint, train_stage

    best = best_checkpoint(train_stage(config, 1, store_path, verbose=verbose), config.stage1.monitor)
    if best is None:
        raise RuntimeError("stage 1 reported no checkpoint")
    remember_stage(root, stage_inputs(config, 1, store_path), best.path, run_dir(config))
    return Path(best.path)
