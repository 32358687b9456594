"""The run folder: the one module that knows where a run's files live.

Everything a run writes goes under ``<run.storage_path>/<run.name>/`` (``run_dir``)::

    config.yaml, summary.json, metrics.json, predictions.csv, report.html
    stages.json                      finished stages (msbt.train.stages)
    data/<modality>/                 split.csv, split.json, rejects.csv (msbt.data.splits, discovery)
    stores/<modality>/               Parquet stores (msbt.data.store)
    stage1/, stage2/                 Ray Train run folders with checkpoint_*/ (msbt.train.runner)
    seeds/seed<k>/                   stage 2 with each further training seed (run.stage2_seeds > 1): a run
                                     folder of its own (stage2/, stages.json, tensorboard/)
    ensemble/checkpoint/, members.json   the seeds' average, the run's model when run.stage2_seeds > 1
    tensorboard/stage<n>/            epoch scalars (msbt.train.tblog)
    tune/                            searches, the fast mode's feature cache (msbt.tune)
    crossval/, ablation/, compare/   experiments, one Ray run folder per arm (msbt.jobs.experiments)

Paths only (checked by msbt.containment): nothing here reads or writes a file, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from msbt.config import Config, stage2_seed_list
from msbt.containment import run_location

MODALITIES = ("microscope", "ultrasound")
STAGE_MODALITY = {1: "microscope", 2: "ultrasound"}

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
STAGES_FILE = "stages.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
REPORT_FILE = "report.html"
SEEDS_FOLDER = "seeds"
ENSEMBLE_FOLDER = "ensemble"


def run_stages(config: Config) -> tuple[int, ...]:
    """The stages a run trains: ``(1, 2)`` when stage 2 starts from stage 1 (``stage2.weights: parent``, the
    paper's pipeline), else ``(2,)``: a stage 1 that nothing starts from is neither trained nor given data."""
    return (1, 2) if config.stage2.weights == "parent" else (2,)


def run_modalities(config: Config) -> tuple[str, ...]:
    """The modalities whose data and stores a run needs (those of :func:`run_stages`)."""
    return tuple(STAGE_MODALITY[n] for n in run_stages(config))


def run_dir(config: Config) -> Path:
    """The folder every result of this run goes to: ``<run.storage_path>/<run.name>``, absolute.

    Raises:
        ConfigError: ``run.name`` is not one plain folder name, or ``run.storage_path`` lies inside Ray's
            unpacked copy of a submitted job's code (msbt.containment).
    """
    return run_location(config)


def data_dir(config: Config, modality: str) -> Path:
    """Where a modality's split, split summary and rejects are saved."""
    return run_dir(config) / "data" / modality


def store_dir(config: Config, modality: str) -> Path:
    """A modality's Parquet store."""
    return run_dir(config) / "stores" / modality


def stage_dir(config: Config, number: int) -> Path:
    """Ray Train's run folder of one stage (its checkpoints)."""
    return run_dir(config) / f"stage{number}"


def stages_file(config: Config) -> Path:
    """The record of finished stages."""
    return run_dir(config) / STAGES_FILE


def tune_dir(config: Config) -> Path:
    """Every Tune search of the run, the stage-1 record of searches and the fast mode's feature cache."""
    return run_dir(config) / "tune"


def experiment_dir(config: Config, experiment: str) -> Path:
    """An experiment's folder (``crossval``, ``ablation``, ``compare``...)."""
    return run_dir(config) / experiment


def seed_runs(config: Config) -> list[tuple[int, Config]]:
    """Stage 2's further training seeds (``run.stage2_seeds`` > 1), each with the config of its own run folder
    ``<run>/seeds/seed<k>/`` (``run.train_seed`` k): ``[]`` for a run that trains stage 2 once. The first seed
    is the run's own ``stage2/``."""
    base = run_dir(config) / SEEDS_FOLDER
    return [(seed, dataclasses.replace(config, run=dataclasses.replace(
        config.run, storage_path=str(base), name=f"seed{seed}", train_seed=seed, stage2_seeds=1)))
        for seed in stage2_seed_list(config)[1:]]


def ensemble_checkpoint(config: Config) -> Path:
    """The checkpoint of the average of stage 2's seeds (the run's model when ``run.stage2_seeds`` > 1)."""
    return run_dir(config) / ENSEMBLE_FOLDER / "checkpoint"
