"""Ray Tune layer: a stage-2 search around the paper's configuration, and its review.

Layers, as in msbt.train.runner:

* pure helpers: :func:`check_space`, :func:`param_space` (Tune distributions from ``tune.space``),
  :func:`reference_point` (trial 0: the paper's stage-2 values), :func:`trial_config`;
* trainables: :func:`train_trial` (full mode: one Ray Train run of ``msbt.train.runner.train_stage`` per trial)
  and ``msbt.tune.fast.head_trial`` (fast mode: a head on cached backbone features);
* :func:`run_search` builds the ``Tuner`` (or restores an interrupted one) and runs it;
* review: :func:`read_experiment`, :func:`format_ranking`, :func:`write_best_overlay` (``msbt tune-report``).

Tune drives Train (the Ray 2.60 / Train V2 pattern, STACK-NOTES): the trainable is a plain function that
calls ``train_stage`` with the trial's config; Ray's ``TuneReportCallback`` on the Train run forwards each
epoch's report to Tune, so the scheduler sees one result per epoch and can stop a trial between epochs.
The trainable itself asks for ``{"CPU": 0.01}``: the Train worker holds the trial's real CPUs (asking 0
is refused, and asking 1 on a 2-CPU machine would leave none for the worker).

Trial 0 is always the reference configuration (``points_to_evaluate``), so the best trial can only
match or beat the paper's configuration on ``tune.metric``. Selection uses validation metrics only:
``train_stage`` reads the store's ``train`` and ``val`` rows, never ``test``.

Layout (``<run>`` = ``<run.storage_path>/<run.name>``)::

    <run>/tune/stage1.json                 the stage-1 checkpoint every trial starts from (if trained here)
    <run>/tune/<experiment>/search.json    space, reference point, metric, epochs: what tune-report needs
    <run>/tune/<experiment>/trial_00000/   Tune's params.json, result.json, progress.csv, TensorBoard events
    <run>/tune/<experiment>/train/<trial>/stage2/checkpoint_*   each trial's Ray Train checkpoints
"""

from __future__ import annotations

import json
import os
import logging
import shutil
import time
from pathlib import Path


from msbt.atomicio import write_text
from msbt.config import Config, ConfigError, to_dict
from msbt.runfolder import run_modalities, run_stages, tune_dir
from msbt.tune.review import SEARCH_FILE
from msbt.tune.space import (
    check_space,
    fast_fixed,
    param_space,
    reference_point,
    reference_stage,
    searched,
    space_values,
    trial_config,
    trial_run,
)
from msbt.provenance import write_environment
from msbt import console

log = logging.getLogger(__name__)

STAGE1_FILE = "stage1.json"


# ---------------------------------------------------------------------------------------------------
# Stage 1, once


def experiment_dir(config: Config) -> Path:
    """``<run>/tune/<tune.experiment>``."""
    return tune_dir(config) / config.tune.experiment


def stage1_checkpoint(config: Config, microscope_store: str | Path) -> str:
    """The stage-1 checkpoint every trial starts from: a reusable one, or one trained now.

    ``msbt.train.stages.reusable_stage1`` looks in the run's records (``<run>/stages.json``, our own
    ``<run>/tune/stage1.json`` ...) and the stage index; stage 1 is trained with Ray Train only when
    none holds an intact checkpoint of the same ``stage1`` settings on this store.
    """
    from msbt.train.stages import index_root, reusable_stage1, reuse_message, train_stage1_once

    found = reusable_stage1(config, microscope_store)
    if found is not None and found.run is None:
        print(f"stage 1: reusing {found.checkpoint} (from {found.record})", flush=True)
        return str(found.checkpoint)
    if found is not None:
        print(reuse_message(1, found.checkpoint, found.run), flush=True)
        best = str(found.checkpoint)
    else:
        print("stage 1: training it once for every trial", flush=True)
        best = str(train_stage1_once(config, microscope_store, root=index_root(config)))
    own = tune_dir(config) / STAGE1_FILE
    own.parent.mkdir(parents=True, exist_ok=True)
    write_text(own, json.dumps({"stage1": {"checkpoint": best, "monitor": config.stage1.monitor}}, indent=2))
    return best


# ---------------------------------------------------------------------------------------------------
# Trainables


def train_trial(params: dict, *, config: Config, store: str, parent: str | None, experiment: str) -> None:
    """Full mode: one trial = one Ray Train run of stage 2 from the shared stage-1 checkpoint.

    Args:
        params: The trial's values, nested like :func:`param_space`.
        config: The run's resolved config.
        store: The ultrasound store (its train and val rows are used).
        parent: The stage-1 checkpoint folder (None: stage 2 starts from its ``weights``).
        experiment: The experiment folder; the Train run goes to ``train/<trial id>/stage2`` in it.
    """
    import ray.data
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from msbt.train.runner import train_stage

    # Ray Train hands this process' DataContext to the trial's workers: with Ray Data's bars on (a trial actor's
    # default), each validation pass printed "Dataset val_... execution finished" to the terminal (issue #17).
    ray.data.DataContext.get_current().enable_progress_bars = False
    trial_id = tune.get_context().get_trial_id()
    _set_aside(Path(experiment) / "train" / trial_id)
    cfg = trial_config(config, params, storage=Path(experiment) / "train", name=trial_id)
    # Ray's callback on the Train run forwards each epoch's report to this trial: one Tune result per epoch.
    # No epoch bars: the search draws one bar over its trials (trial_progress).
    # The placement-group cleaner stays: Tune ends trials early (ASHA) while the search goes on, and a trial
    # whose controller ends with it must not keep its CPUs (msbt.train.runner.stage_trainer).
    train_stage(cfg, 2, store, parent_checkpoint=parent, callbacks=[TuneReportCallback()], progress=False,
                placement_group_cleaner=True)


def _set_aside(folder: Path) -> None:
    """Move an interrupted attempt's Train run out of the way, so a restored trial reruns from epoch 1.

    Ray Train V2 would otherwise restore that run from its checkpoint snapshot and continue (or, if it had
    trained every epoch before the interruption, report nothing), while Tune restarts the trial's results
    from scratch: the trial would end with missing epochs or no results at all.
    """
    if folder.exists():
        folder.rename(folder.with_name(f"{folder.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}"))


def trial_dirname(trial) -> str:
    """``trial_00000`` for the first trial (the reference): the counter part of Tune's trial id."""
    return f"trial_{trial.trial_id.rsplit('_', 1)[-1]}"


# ---------------------------------------------------------------------------------------------------
# The search


def _search_record(config: Config, fast: bool, parent: str | None, features: str | None) -> dict:
    space = config.tune.space
    return {
        "metric": config.tune.metric,
        "mode": config.tune.mode,
        "epochs": config.stage2.epochs,
        "fast": fast,
        "reference": config.tune.reference,
        "reference_point": reference_point(config, fast),
        "fixed": fast_fixed(config) if fast else {},
        "searched": {k: space_values(space, k) for k in searched(space, fast)},
        "stage2": to_dict(config.stage2),
        "stage1_checkpoint": parent,
        "features": features,
        "run": config.run.name,
        # Where ASHA may cut a trial (msbt.tune.review marks the rungs on each trial's curve).
        "scheduler": {"kind": config.tune.scheduler, "grace_period": config.tune.grace_period,
                      "reduction_factor": config.tune.reduction_factor, "num_samples": config.tune.num_samples},
    }


def _check_resume(record_path: Path, record: dict) -> None:
    old = json.loads(record_path.read_text())
    keys = ("metric", "mode", "epochs", "fast", "reference_point", "searched", "stage2", "stage1_checkpoint")
    changed = [k for k in keys if old.get(k) != record.get(k)]
    if changed:
        raise ConfigError(f"{record_path}: the experiment was started with other {', '.join(changed)}; "
                          "resume it with the same config, or set tune.experiment to start another")


def _scheduler(config: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = config.tune
    if t.scheduler == "none":
        return FIFOScheduler()
    if not 1 <= t.grace_period <= config.stage2.epochs:
        raise ConfigError(f"tune.grace_period must be 1..stage2.epochs ({config.stage2.epochs}), got {t.grace_period}")
    return ASHAScheduler(time_attr="training_iteration", max_t=config.stage2.epochs, grace_period=t.grace_period,
                         reduction_factor=t.reduction_factor)


def check_search(config: Config, sources: str = "tune.space") -> None:
    """The search's own settings, checked before Ray starts or any data is touched (``msbt tune`` calls it
    first; :func:`run_search` again).

    Raises:
        ConfigError: a bad search space, fast mode on a trainable backbone, a test metric, a bad scheduler.
    """
    t = config.tune
    check_space(t.space, sources)
    if t.fast and config.stage2.trainable_backbone:
        raise ConfigError("tune.fast needs a frozen backbone: set stage2.trainable_backbone: false "
                          "(workflows/tune.py --fast does)")
    if t.metric.startswith("test"):
        raise ConfigError(f"tune.metric {t.metric!r}: the test split is never used for selection")
    _scheduler(config)  # a bad grace period


def check_start(config: Config, resume: bool) -> bool:
    """Whether the search's experiment folder holds a search Tune can restore; refused without ``resume``.

    Needs no cluster (``msbt tune`` asks before Ray starts: the refusal came after a cluster's start, 10 s).

    Raises:
        ConfigError: An experiment exists and ``resume`` is False.
    """
    from ray import tune

    exp = experiment_dir(config)
    restorable = exp.is_dir() and tune.Tuner.can_restore(str(exp))
    if restorable and not resume:
        raise ConfigError(f"{exp}: an experiment already exists; continue it with --resume, or set "
                          "tune.experiment to start another")
    return restorable


TRIAL_CPU = 0.01  # a full-mode trial's own actor (0 is refused by Tune); its Train workers hold the trial's CPUs


def check_trials_fit(config: Config) -> None:
    """A trial the cluster could never place is refused on msbt's private cluster, and said on a joined one,
    before any work (msbt.raycluster.check_placeable): Tune and Ray Train would wait for it for ever. A trial of the
    full mode is its stage's Ray Train workers with ``tune.cpus_per_trial`` CPUs each (msbt.tune.space.trial_run;
    its own actor asks for 0.01 CPU); of the fast mode, its ``tune.cpus_per_trial`` and ``tune.gpus_per_trial``.
    A stage 1 the search trains first has the run's own workers. (More ``tune.feature_actors`` than CPUs is not
    refused: Ray Data starts what fits and goes on; measured, 3 on 2 CPUs finished in 44 s.)"""
    from msbt.raycluster import check_placeable
    from msbt.train.runner import check_workers_fit, worker_bundles

    t = config.tune
    if 1 in run_stages(config):
        check_workers_fit(config.run, "stage 1's Ray Train workers")
    if not t.fast:
        run = trial_run(config)
        check_placeable(f"a Tune trial's Ray Train workers ({run.num_workers}) and its own actor",
                        worker_bundles(run) + [{"CPU": TRIAL_CPU}],
                        "run.num_workers, tune.cpus_per_trial, run.use_gpu, run.gpus_per_worker")
        return
    trial = {"CPU": float(t.cpus_per_trial)}
    if t.gpus_per_trial:
        trial["GPU"] = float(t.gpus_per_trial)
    check_placeable("a Tune trial (fast mode)", [trial], "tune.cpus_per_trial, tune.gpus_per_trial")


def run_search(config: Config, *, resume: bool = False, sources: str = "tune.space"):
    """Prepare the data, get stage 1, then run (or continue) the stage-2 search. Ray must be initialised.

    Args:
        config: The resolved config (``tune`` holds the search settings; ``tune.fast`` picks fast mode).
        resume: Continue the interrupted experiment in ``<run>/tune/<tune.experiment>`` (finished trials
            are kept, unfinished and errored ones run again); start it if there is none.
        sources: The config files, named in errors about ``tune.space``.

    Returns:
        Tune's ``ResultGrid``.

    Raises:
        ConfigError: A bad search space, an experiment that exists (without ``resume``) or that was
            started with other settings.
        SearchStopped: A trial found the run's disk full and the search stopped (``msbt.tune.failures``).
    """
    from ray import tune

    from msbt.data.prepare import ensure_stores
    from msbt.tune import failures

    t, fast = config.tune, config.tune.fast
    check_search(config, sources)
    exp = experiment_dir(config)
    restorable = check_start(config, resume)
    check_trials_fit(config)  # before the data step and stage 1, which may take long on real data
    stores = ensure_stores(config, run_modalities(config))
    # Every trial starts from the one stage-1 checkpoint, or (stage2.weights other than parent) from none.
    parent = stage1_checkpoint(config, stores["microscope"].path) if 1 in run_stages(config) else None
    store = str(stores["ultrasound"].path)
    features = None
    if fast:
        from msbt.tune.fast import ensure_features

        features = str(ensure_features(config, store, parent, reference_stage(config)))
    if not fast and parent is not None:
        check_room(config, parent, exp)
    record = _search_record(config, fast, parent, features)
    record_path = exp / SEARCH_FILE
    if restorable:
        _check_resume(record_path, record)
    trainable = _trainable(config, store, parent, str(exp), features)
    # Tune's TensorBoard logger writes HParams whose metric columns stay empty (its scalars are tagged
    # ray/tune/<name>); msbt.tune.review writes them instead, so only the CSV and JSON loggers are kept.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    if restorable:
        print(f"resuming {exp}", flush=True)
        tuner = tune.Tuner.restore(str(exp), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        exp.mkdir(parents=True, exist_ok=True)
        write_text(record_path, json.dumps(record, indent=2) + "\n")
        write_environment(exp)
        tuner = _new_tuner(config, trainable, fast)
    failures.reset()
    stop = StopSignalSeen()
    tune_log = logging.getLogger("ray.tune.tune")
    tune_log.addFilter(stop)
    try:
        with console.printed_to_log():  # Tune's own prints (its status tables are --verbose only)
            results = tuner.fit()
    finally:
        tune_log.removeFilter(stop)
        # The trials' Train workers' scratch (autograph files; a stopped trial's model and state): a trial's stage
        # removes it when fit returns, but Tune ends a trial's actor at its last report or an ASHA stop, before
        # that. A trial resumed later starts without it (train_stage clears what an earlier attempt left).
        for scratch in (exp / "train").glob("*/.work"):
            shutil.rmtree(scratch, ignore_errors=True)
    failures.check_stopped(exp)  # a full disk stopped it: nothing more is written
    if stop.seen:
        # Ctrl-C: Tune's own handler ended the search gracefully and saved its state, and fit() returned as if it
        # had finished; a ranking and best.yaml of the trials done so far would read as the search's result.
        raise KeyboardInterrupt
    from msbt.tune.review import write_hparams

    # the review page itself is the next line of `msbt tune` (or `msbt tune-report`), not a second "review:" here
    print(f"tune results in {exp}; HParams for TensorBoard in {write_hparams(exp)}", flush=True)
    return results


class StopSignalSeen(logging.Filter):
    """Notes Tune's "Stop signal received" record (its SIGINT handler's; a full disk's stop is told apart by
    ``msbt.tune.failures``). Tune keeps the flag it sets to itself."""

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Stop signal received"):
            self.seen = True
        return True


def check_room(config: Config, parent: str | Path, exp: Path) -> str | None:
    """Say before the trials start when the disk under the experiment looks too small for their checkpoints.

    Each trial of a full search keeps ``run.checkpoints_to_keep`` checkpoints of stage 2, and each trial saving
    writes one more beside them first; a stage-2 checkpoint is at least about the size of the stage-1 one the
    trials start from (the same backbone; the smoke search's: stage 1 27 MB, stage 2 30-42 MB). A warning, not a
    refusal: ASHA stops trials early and the estimate is rough; a full disk met anyway stops the search
    (``msbt.tune.failures``).

    Returns:
        The warning printed, or None.
    """
    from tqdm import tqdm

    def _size(n: float) -> str:
        return tqdm.format_sizeof(n, "B", 1024)

    size = sum(f.stat().st_size for f in Path(parent).rglob("*") if f.is_file())
    t = config.tune
    copies = t.num_samples * config.run.checkpoints_to_keep + min(t.max_concurrent_trials, t.num_samples)
    where = next((d for d in (exp, *exp.parents) if d.exists()), exp)
    free = shutil.disk_usage(where).free
    if size * copies <= free:
        return None
    message = (f"the trials' checkpoints may need about {_size(size * copies)} ({t.num_samples} trials x "
               f"{config.run.checkpoints_to_keep} kept (run.checkpoints_to_keep), and one being saved per running "
               f"trial, of at least {_size(size)} each, the stage-1 checkpoint's size) and {where} has {_size(free)} "
               "free: free space, or lower tune.num_samples or run.checkpoints_to_keep; a search that meets a full "
               "disk stops and --resume continues it")
    log.warning(message)
    return message


def _trainable(config: Config, store: str, parent: str | None, exp: str, features: str | None):
    from ray import tune

    if features is None:
        fn = tune.with_parameters(train_trial, config=config, store=store, parent=parent, experiment=exp)
        # The Train worker holds the trial's CPUs; the trial function only waits for it.
        return tune.with_resources(fn, {"CPU": TRIAL_CPU})
    from msbt.tune.fast import head_trial, load_features, train_weights

    arrays = load_features(features)
    if config.stage2.balance != "none":  # counted once here, as full training counts them on the driver
        arrays["train_weight"] = train_weights(store, arrays, config.stage2.balance)
    fn = tune.with_parameters(head_trial, config=config, features=arrays)
    resources = {"CPU": config.tune.cpus_per_trial}
    if config.tune.gpus_per_trial:
        resources["GPU"] = config.tune.gpus_per_trial
    return tune.with_resources(fn, resources)


def _new_tuner(config: Config, trainable, fast: bool):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from msbt.tune.failures import TrialFailures

    t = config.tune
    return tune.Tuner(
        trainable,
        param_space=param_space(t.space, fast),
        tune_config=tune.TuneConfig(
            metric=t.metric,
            mode=t.mode,
            num_samples=t.num_samples,
            scheduler=_scheduler(config),
            # Trial 0 is the reference; the rest are drawn from the space. The concurrency limit goes here:
            # Tune ignores TuneConfig.max_concurrent_trials when given a BasicVariantGenerator.
            search_alg=BasicVariantGenerator(points_to_evaluate=[reference_point(config, fast)],
                                             max_concurrent=t.max_concurrent_trials, random_state=t.seed),
            trial_dirname_creator=trial_dirname,
            # A fast trial is seconds of head training after a process start and TensorFlow's import
            # (head_trial seeds every trial itself: a reused process gives the same results, docs/tune.md).
            reuse_actors=fast and t.reuse_processes,
        ),
        run_config=tune.RunConfig(
            name=t.experiment,
            storage_path=str(tune_dir(config)),
            # Tune's status table every few seconds is --verbose only; by default one bar over the trials.
            verbose=1 if console.is_verbose() else 0,
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), trial_progress(t.num_samples, t.metric, t.mode),
                       TrialFailures()],
        ),
    )


def trial_progress(trials: int, metric: str, mode: str):
    """A Tune callback: one progress bar over the search's trials, with the best ``metric`` so far."""
    from ray import tune

    class _TrialBar(tune.Callback):
        def __init__(self):
            self.bar = None
            self.best: float | None = None

        def setup(self, **info):
            self.bar = console.progress(total=trials, desc="tune: trials", unit="trial")
            self.counted = False

        def _count_earlier(self, trials) -> None:
            # A resumed search: the trials that finished before count from the start (the bar said 1/4 at the end
            # of a resume that ran one trial), with their best value.
            if getattr(self, "counted", True):
                return
            self.counted = True
            for trial in trials:
                if trial.status in ("TERMINATED", "ERROR"):
                    self._finished(trial)

        def on_step_begin(self, iteration, trials, **info):
            self._count_earlier(trials)

        def _finished(self, trial):
            # the best over the trial's epochs, as the ranking and best.yaml take it (its last epoch said 0.9088 of a
            # trial whose best was 0.9754); Tune keeps each metric's max and min per trial, across a restore too
            seen = (getattr(trial, "metric_analysis", None) or {}).get(metric) or {}
            value = seen.get("max" if mode == "max" else "min", (trial.last_result or {}).get(metric))
            if value is not None and (self.best is None or (value > self.best if mode == "max" else value < self.best)):
                self.best = float(value)
            if self.bar is not None:
                if self.best is not None:
                    self.bar.set_description(f"tune: trials (best {metric} {self.best:.4f})")
                self.bar.update(1)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._finished(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._finished(trial)

        def on_experiment_end(self, trials, **info):
            self._count_earlier(trials)  # a resume of a finished search runs no step
            if self.bar is not None:
                self.bar.close()

    return _TrialBar()
