"""The main job, one step after another: data -> patches/arrays -> stage 1 -> stage 2 -> test metrics.

It resolves the data (the user's folders, or the built-in synthetic set), scans and validates them,
groups near-duplicates and saves the leakage-safe split of each modality into the run folder with the
resolved config beside it; builds the Parquet stores with Ray Data; trains stage 1 and stage 2 with Ray
Train; and scores the stage-2 model on the test split at a threshold chosen on validation. A rerun
reuses the saved split and finished stores; with `resume=True` it also reuses finished stages and
continues an interrupted one (msbt.train.stages), and without it a run folder holding a trained stage is refused.

With ``run.stage2_seeds`` > 1, stage 2 is trained once per training seed (the first in the run's own
``stage2/``, the others in ``seeds/seed<k>/``) and the average of their models (msbt.model.ensemble) is the
run's model: evaluated, reported, and the one later steps take (:func:`run_model`).

The steps are also jobs of their own (`stage1_job`, `stage2_job`, `evaluate_job`: one workflow script
each), linked through the run folder's `stages.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from msbt.atomicio import write_text
from msbt.config import Config, ConfigError, stage2_seed_list
from msbt.data.prepare import build_stores, ensure_stores, prepare_data, summarize, summarize_stores
from msbt.raycluster import init_ray
from msbt import console
from msbt.runfolder import SUMMARY_FILE, ensemble_checkpoint, run_dir, run_modalities, run_stages, seed_runs

log = logging.getLogger(__name__)


def train_and_evaluate(config: Config, stores: dict, *, resume: bool = False) -> dict:
    """Stage 1 (cell lines) and stage 2 (ultrasound, from stage 1's best checkpoint) with Ray Train, then
    the stage-2 model on the test split. Ray must be initialised. A stage 2 that does not start from stage 1
    (``stage2.weights`` other than ``parent``) is trained alone (msbt.runfolder.run_stages).

    Args:
        config: The resolved config.
        stores: Modality -> store summary (msbt.data.prepare).
        resume: Reuse finished stages and continue an interrupted one (msbt.train.stages.run_stage).

    Returns:
        ``stage1``/``stage2``: best checkpoint folders (``stage1`` None when not trained); ``model``: the run's
        model (stage 2's checkpoint, or the average of its seeds); ``stages``: their stages.json entries;
        ``evaluation``: the test metrics of the run's model (also in metrics.json); ``metrics_file``.
    """
    from msbt.train.stages import run_stage

    stage1, parent = None, None
    if 1 in run_stages(config):
        stage1 = run_stage(config, 1, stores["microscope"].path, resume=resume)
        parent = stage1["checkpoint"]
    else:
        print(f"stage 1: not trained (stage2.weights is {config.stage2.weights!r}: stage 2 does not start from it)",
              flush=True)
    stage2 = train_stage2(config, stores["ultrasound"].path, parent, resume=resume)
    evaluation = evaluate_checkpoint(config, stage2["model"], stores["ultrasound"].path)
    return {
        "stage1": parent,
        "stage2": stage2["checkpoint"],
        "model": stage2["model"],
        "stages": {**({"1": stage1} if stage1 else {}), "2": stage2},
        "evaluation": evaluation,
        "metrics_file": str(run_dir(config) / "metrics.json"),
    }


def train_stage2(config: Config, store: str | Path, parent: str | Path | None, *, resume: bool = False) -> dict:
    """Stage 2 with each of its training seeds (``run.stage2_seeds``) and, with several, their average.

    Each seed is a stage of its own (reused, resumed or trained by msbt.train.stages.run_stage, remembered in
    the run's stage index); the average is made once all have finished (:func:`msbt.jobs.ensemble.run_ensemble`).

    Returns:
        Stage 2's stages.json entry (the first seed's), with ``model``: the run's model (that checkpoint, or
        the average's) and, with several seeds, ``seeds``: every seed's entry with its ``seed``.
    """
    from msbt.jobs.ensemble import run_ensemble
    from msbt.train.stages import index_root, run_stage

    extra, seeds = seed_runs(config), stage2_seed_list(config)
    if extra:
        print(f"stage 2, training seed {seeds[0]} (1 of {len(seeds)}) in {run_dir(config)}", flush=True)
    first = run_stage(config, 2, store, parent=parent, resume=resume)
    if not extra:
        return {**first, "model": first["checkpoint"]}
    entries = [{**first, "seed": seeds[0]}]
    for i, (seed, seeded) in enumerate(extra, start=2):
        print(f"stage 2, training seed {seed} ({i} of {len(seeds)}) in {run_dir(seeded)}", flush=True)
        entry = run_stage(seeded, 2, store, parent=parent, resume=resume, index=index_root(config))
        entries.append({**entry, "seed": seed})
    model = run_ensemble(config, [e["checkpoint"] for e in entries])
    return {**first, "model": str(model), "seeds": entries}


def run_model(config: Config) -> str:
    """The run's model: stage 2's recorded best checkpoint, or with ``run.stage2_seeds`` > 1 the seeds' average.

    Raises:
        RunStateError: The run has not finished stage 2 (with all its seeds); says which step to run.
    """
    from msbt.jobs.ensemble import holds_members
    from msbt.train.stages import RunStateError, read_stages

    extra = seed_runs(config)
    if not extra:
        return recorded_checkpoint(config, 2)
    folder = ensemble_checkpoint(config)
    members = [read_stages(c).get("2", {}).get("checkpoint") for c in [config] + [c for _, c in extra]]
    if not (folder / "manifest.json").is_file() or None in members or not holds_members(folder, members):
        state = "no average" if not (folder / "manifest.json").is_file() else "no current average"
        raise RunStateError(f"{folder}: run {config.run.name!r} has {state} of its {config.run.stage2_seeds} "
                            "stage-2 seeds (run.stage2_seeds) yet; run workflows/stage2.py with the same config "
                            "(--resume, if some seeds have finished), or give --checkpoint")
    return str(folder)


def evaluate_checkpoint(config: Config, checkpoint: str | Path, store: str | Path) -> dict:
    """Print a stage-2 checkpoint's lineage and test metrics; write them to the run's metrics.json.

    The run's own average of seeds also gets each member scored on the same test rows (its ``members.json``)."""
    from msbt.model.checkpoint import format_lineage
    from msbt.eval.evaluate import evaluate, format_report, write_metrics

    checkpoint = str(Path(checkpoint).expanduser().resolve())  # as recorded in metrics.json and members.json
    print(format_lineage(checkpoint))
    result = evaluate(checkpoint, store, seed=config.data.seed)
    write_metrics(result, run_dir(config) / "metrics.json")
    print(format_report(result), flush=True)
    if Path(checkpoint) == ensemble_checkpoint(config).resolve():
        from msbt.jobs.ensemble import format_ensemble, write_members

        print(format_ensemble(write_members(checkpoint, store, result, seed=config.data.seed)), flush=True)
    from msbt.eval.report import write_report  # every evaluated run gets its self-contained report.html

    print(f"report: {write_report(run_dir(config))}", flush=True)
    return result


def start_ray(config: Config, address: str | None = None, stages: Sequence[int] | None = None) -> None:
    """After a job's checks: the run's log file (``runs/<name>/logs/``), TensorFlow imported with its
    start-up notices in that log, then Ray joined or started (msbt.console, msbt.raycluster.init_ray), and the
    run's Ray Train workers checked against the cluster for ``stages`` (default: every stage the run trains) that
    are not recorded finished (msbt.train.runner.check_workers_fit).

    Called only once the run folder may be written: a refused rerun leaves it as it was."""
    console.attach_run(run_dir(config))
    console.import_tensorflow()
    init_ray(address)
    from msbt.train.runner import check_workers_fit
    from msbt.train.stages import read_stages

    # before the data step, not after it; not for a --resume whose stages are all recorded finished (train_stage
    # checks again before any stage that does train: a seed of stage2_seeds, say)
    if not {str(n) for n in (run_stages(config) if stages is None else stages)} <= set(read_stages(config)):
        check_workers_fit(config.run, "the stages' Ray Train workers")


def check_rerun(config: Config, numbers: Sequence[int] = (1, 2), *, resume: bool = False) -> None:
    """The one rerun check of a job that trains stages, made before Ray starts.

    Without ``resume``, a run folder that already holds one of these stages (finished or interrupted)
    is refused (msbt.train.stages.refuse_rerun says why and what to do); with it, stage settings that
    differ from what the run trained are refused before anything is written (its config.yaml stays as
    it was), and msbt.train.stages.run_stage reuses or continues.

    Raises:
        RunStateError: A stage this run folder already holds, without ``resume``; changed stage
            settings, with it.
    """
    from msbt.train.stages import refuse_changed_resume, refuse_rerun

    runs = [(config, numbers, None)] + ([(seeded, [2], f"run {config.run.name!r} (training seed {seed})")
                                         for seed, seeded in seed_runs(config)] if 2 in numbers else [])
    for checked, stages, label in runs:  # stage 2's further seeds are run folders of their own (seed_runs)
        if not resume:
            refuse_rerun(checked, stages, label=label)
        else:
            refuse_changed_resume(checked, stages)


def main_job(config: Config, *, force_split: bool = False, resume: bool = False, address: str | None = None) -> dict:
    """Everything the README's main command runs; returns a JSON-able summary.

    Args:
        config: The resolved config.
        force_split: Make a new split even if the run folder holds one.
        resume: Continue a stopped run (see msbt.train.stages); without it a run folder holding a trained
            stage is refused before any work starts.
        address: The Ray cluster to join or start (msbt.raycluster.init_ray) once the run folder is
            checked; nothing is started when Ray is already initialised.
    """
    check_rerun(config, run_stages(config), resume=resume)
    start_ray(config, address)
    # The data step: every file is scanned again, so changed data is refused rather than mixed in.
    prepared = prepare_data(config, force_split=force_split, modalities=run_modalities(config))
    print(summarize(prepared, config), flush=True)
    stores = build_stores(config, prepared)
    print(summarize_stores(stores, config), flush=True)
    result = {
        "run_dir": str(run_dir(config)),
        "data": {m: p.split.summary for m, p in prepared.items()},
        "stores": {m: s.as_dict() for m, s in stores.items()},
        "training": train_and_evaluate(config, stores, resume=resume),
    }
    _write_summary(config, result)
    return result


def _write_summary(config: Config, result: dict) -> None:
    write_text(run_dir(config) / SUMMARY_FILE, json.dumps(result, indent=2, default=float) + "\n")
    print(f"results in {run_dir(config)}")


# ---------------------------------------------------------------------------------------------------
# One job per step (workflows/stage1.py, stage2.py, evaluate.py), linked through stages.json


def _data(config: Config, modality: str, force_split: bool):
    """One modality's store: the recorded one when it fits (no image read), else made now."""
    return ensure_stores(config, [modality], force_split=force_split)[modality]


def recorded_checkpoint(config: Config, number: int) -> str:
    """The best checkpoint of a finished stage of this run, from stages.json.

    Raises:
        RunStateError: The stage has not finished in this run folder; says which step to run first.
    """
    from msbt.train.stages import STAGES_FILE, RunStateError, read_stages

    recorded = read_stages(config).get(str(number))
    if recorded is None:
        option = "--parent" if number == 1 else "--checkpoint"
        raise RunStateError(f"{run_dir(config) / STAGES_FILE}: no finished stage {number} in run "
                            f"{config.run.name!r}; run workflows/stage{number}.py with the same config first, "
                            f"or give {option} CHECKPOINT")
    return recorded["checkpoint"]


def stage1_job(config: Config, *, force_split: bool = False, resume: bool = False,
               address: str | None = None) -> dict:
    """Microscope data and store, then stage 1; returns its stages.json entry.

    The run folder is checked (:func:`check_rerun`) before Ray is joined or started (``address``).
    """
    from msbt.train.stages import run_stage

    check_rerun(config, [1], resume=resume)
    start_ray(config, address, [1])
    store = _data(config, "microscope", force_split)
    return run_stage(config, 1, store.path, resume=resume)


def stage2_job(config: Config, *, parent: str | Path | None = None, force_split: bool = False,
               resume: bool = False, address: str | None = None) -> dict:
    """Ultrasound data and store, then stage 2 from ``parent`` or from stage 1's recorded best checkpoint (from
    no checkpoint when ``stage2.weights`` is not ``parent``).

    The run folder and the parent are checked before Ray is joined or started (``address``).

    Returns:
        Stage 2's stages.json entry, with ``model`` (see :func:`train_stage2`).

    Raises:
        RunStateError: No parent given and no finished stage 1 recorded in this run folder (for a stage 2
            that starts from one).
        ConfigError: A ``parent`` that is no folder, or one given to a stage 2 that starts from none.
    """
    check_rerun(config, [2], resume=resume)
    if parent and 1 not in run_stages(config):
        raise ConfigError(f"--parent {parent}: stage2.weights is {config.stage2.weights!r}, so stage 2 starts from no "
                          "stage-1 checkpoint; set stage2.weights: parent to start from this one")
    if parent and not Path(parent).is_dir():
        raise ConfigError(f"{parent}: no such checkpoint folder (--parent)")
    if 1 in run_stages(config):
        parent = str(Path(parent or recorded_checkpoint(config, 1)).expanduser().resolve())  # said before Ray starts
    start_ray(config, address, [2])
    store = _data(config, "ultrasound", force_split)
    return train_stage2(config, store.path, parent, resume=resume)


def evaluate_job(config: Config, *, checkpoint: str | Path | None = None) -> dict:
    """Test metrics of ``checkpoint`` or of the run's model (:func:`run_model`); written to metrics.json.

    Raises:
        RunStateError: No checkpoint given and no finished stage 2 (with all its seeds) in this run folder.
    """
    if checkpoint is not None:
        replacing_own_results(config, checkpoint)
    checkpoint = checkpoint or run_model(config)
    store = _data(config, "ultrasound", force_split=False)
    return evaluate_checkpoint(config, checkpoint, store.path)


def replacing_own_results(config: Config, checkpoint: str | Path) -> str | None:
    """Say (and return) when scoring ``checkpoint`` replaces the results of the run's own model.

    metrics.json and report.html are the run's: the model the scoring commands find beside them takes its
    threshold from there, and a metrics.json of another checkpoint leaves it at 0.5 (msbt.serve.predict)."""
    from msbt.atomicio import read_json
    from msbt.train.stages import RunStateError

    try:
        own = Path(run_model(config)).resolve()
    except RunStateError:  # the run has no model of its own: nothing of it is replaced
        return None
    scored = read_json(run_dir(config) / "metrics.json")
    scored = scored if isinstance(scored, dict) else {}
    if Path(checkpoint).expanduser().resolve() == own or Path(str(scored.get("checkpoint", ""))).resolve() != own:
        return None
    note = (f"note: {run_dir(config) / 'metrics.json'} and report.html held the test metrics of the run's own model "
            f"({own}); they now hold those of {checkpoint}, and until `msbt evaluate` without --checkpoint scores "
            "the run's model again, predict, export, stream, serve and external give it no validation threshold (0.5)")
    print(note, flush=True)
    return note
