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

import dataclasses
import json
import os
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from msbt import console
from msbt.config import Config, ConfigError, SearchSpaceConfig, StageConfig, to_dict, with_overlay

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"
STAGE1_FILE = "stage1.json"
# tune.space key -> (stage-2 key path, kind). Ranges are [low, high]; the rest are choices.
DIMENSIONS = {
    "dense_units": (("head", "dense_units"), "choice"),
    "dropout": (("head", "dropout"), "uniform"),
    "l2": (("head", "l2"), "choice"),
    "expansion": (("augment", "expansion"), "choice"),
    "shift": (("augment", "shift"), "uniform"),
    "rotation": (("augment", "rotation"), "uniform"),
    "flip": (("augment", "flip"), "choice"),
    "optimizer": (("optimizer",), "choice"),
    "learning_rate": (("learning_rate",), "loguniform"),
    "batch_size": (("batch_size",), "choice"),
}
# Fast mode computes the augmented copies once (msbt.tune.fast): their ranges are fixed at the reference,
# and `expansion` picks how many of the cached copies a trial uses.
FIXED_IN_FAST_MODE = ("shift", "rotation", "flip")


# ---------------------------------------------------------------------------------------------------
# Search space (pure)


def check_space(space: SearchSpaceConfig, source: str = "tune.space") -> None:
    """Refuse a search space Tune would accept but that makes no sense, naming the key.

    Args:
        space: ``config.tune.space``.
        source: What to name in messages (the config files it came from).

    Raises:
        ConfigError: e.g. a range that is not ``[low, high]``, a learning rate <= 0, a dropout >= 1.
    """
    bounds = {"dropout": (0.0, 1.0), "shift": (0.0, 1.0), "rotation": (0.0, 180.0)}
    for key, (_, kind) in DIMENSIONS.items():
        values = getattr(space, key)
        where = f"{source}: `tune.space.{key}`"
        if not values:
            continue
        if kind != "choice":
            if len(values) != 2 or values[0] > values[1]:
                raise ConfigError(f"{where} must be a range [low, high] with low <= high, got {list(values)}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where} is log-uniform: both ends must be > 0, got {list(values)}")
            low, high = bounds.get(key, (-math.inf, math.inf))
            if values[0] < low or values[1] > high or (key == "dropout" and values[1] >= 1.0):
                raise ConfigError(f"{where} must lie within [{low}, {high}{')' if key == 'dropout' else ']'}, "
                                  f"got {list(values)}")
        elif key == "dense_units" and any(not units or min(units) < 1 for units in values):
            raise ConfigError(f"{where}: each choice must be a non-empty list of positive sizes, got {list(values)}")
        elif key in ("expansion", "batch_size") and min(values) < 1:
            raise ConfigError(f"{where}: every choice must be >= 1, got {list(values)}")
        elif key == "l2" and min(values) < 0:
            raise ConfigError(f"{where}: every choice must be >= 0, got {list(values)}")


def searched(space: SearchSpaceConfig, fast: bool = False) -> list[str]:
    """The ``tune.space`` keys that vary across trials (given, and not fixed by fast mode)."""
    return [k for k in DIMENSIONS if getattr(space, k) and not (fast and k in FIXED_IN_FAST_MODE)]


def _plain(value: Any) -> Any:
    """YAML/JSON-friendly: tuples as lists."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def units_label(units) -> str:
    """``[256, 128, 64]`` -> ``"256-128-64"``: Tune's ``points_to_evaluate`` descends into list values and
    fails on them, so a choice of layer sizes travels as one string (also readable in progress.csv)."""
    return "-".join(str(int(u)) for u in units)


def units_list(label: str) -> list[int]:
    """Inverse of :func:`units_label`."""
    return [int(u) for u in str(label).split("-")]


def decode(params: Mapping) -> dict:
    """A trial's Tune values as a stage-2 overlay (``head.dense_units`` back to a list)."""
    out = _merge({}, params)
    if "dense_units" in out.get("head", {}):
        out["head"]["dense_units"] = units_list(out["head"]["dense_units"])
    return out


def _nest(flat: Mapping[str, Any]) -> dict:
    """``{"dropout": 0.3}`` -> ``{"head": {"dropout": 0.3}}``: the shape of a stage-2 overlay."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        path = DIMENSIONS[key][0]
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return nested


def _get(stage: StageConfig, key: str) -> Any:
    value: Any = stage
    for part in DIMENSIONS[key][0]:
        value = getattr(value, part)
    return units_label(value) if key == "dense_units" else _plain(value)


def _values(space: SearchSpaceConfig, key: str) -> list:
    values = getattr(space, key)
    return [units_label(v) for v in values] if key == "dense_units" else _plain(values)


def param_space(space: SearchSpaceConfig, fast: bool = False) -> dict:
    """Tune's ``param_space``: nested like a stage-2 overlay (``{"head": {"dropout": tune.uniform(...)}}``)."""
    from ray import tune

    make = {"choice": tune.choice, "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return _nest({k: make[DIMENSIONS[k][1]](_values(space, k)) for k in searched(space, fast)})


def reference_stage(config: Config) -> StageConfig:
    """The stage-2 config whose searched values trial 0 uses: the paper's or the run's (``tune.reference``)."""
    return Config().stage2 if config.tune.reference == "paper" else config.stage2


def reference_point(config: Config, fast: bool = False) -> dict:
    """Trial 0's values of every searched key, nested like :func:`param_space`."""
    stage = reference_stage(config)
    return _nest({k: _get(stage, k) for k in searched(config.tune.space, fast)})


def fast_fixed(config: Config) -> dict:
    """What fast mode holds fixed: the reference augmentation ranges (the cached copies are made with them)."""
    stage = reference_stage(config)
    return _nest({k: _get(stage, k) for k in FIXED_IN_FAST_MODE})


def trial_stage(config: Config, params: Mapping, fast: bool = False) -> StageConfig:
    """The run's stage 2 with a trial's values (and, in fast mode, the fixed augmentation) applied."""
    overlay = _merge(fast_fixed(config), decode(params)) if fast else decode(params)
    stage = with_overlay(config.stage2, overlay, source="tune trial")
    if fast:
        stage = dataclasses.replace(stage, trainable_backbone=False)
    return stage


def trial_config(config: Config, params: Mapping, *, storage: str | Path, name: str, fast: bool = False) -> Config:
    """The Config one trial trains with: stage 2 from :func:`trial_stage`, its own Ray Train storage.

    Each trial's Train run gets its own ``run.storage_path``/``run.name``, so concurrent trials never
    write into one ``stage2`` folder; its worker has ``tune.cpus_per_trial`` CPUs.
    """
    run = dataclasses.replace(config.run, storage_path=str(storage), name=name,
                              cpus_per_worker=config.tune.cpus_per_trial)
    return dataclasses.replace(config, stage2=trial_stage(config, params, fast), run=run)


def _merge(base: Mapping, top: Mapping) -> dict:
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in top.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, Mapping) else value
    return out


def flatten(params: Mapping, prefix: str = "") -> dict:
    """``{"head": {"dropout": 0.3}}`` -> ``{"head.dropout": 0.3}`` (tables, YAML comments)."""
    out = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---------------------------------------------------------------------------------------------------
# Stage 1, once


def experiment_dir(config: Config) -> Path:
    """``<run>/tune/<tune.experiment>``."""
    from msbt.jobs.pipeline import run_dir

    return run_dir(config) / "tune" / config.tune.experiment


def _recorded_stage1(record: Path, config: Config) -> str | None:
    """A stage-1 checkpoint recorded in ``record`` that is intact and was trained with ``config.stage1``."""
    from msbt.model.checkpoint import read_manifest, verify

    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    # stages.json (msbt.train.stages) keys finished stages by number, "1"; our own tune/stage1.json by "stage1".
    path = (data.get("1") or data.get("stage1") or {}).get("checkpoint")
    if not path or not Path(path).is_dir() or not verify(path):
        log.warning("%s: its stage-1 checkpoint %s is missing or altered; not used", record, path)
        return None
    if read_manifest(path)["config"] != to_dict(config.stage1):
        log.warning("%s: its stage-1 checkpoint was trained with other stage1 settings; not used", record)
        return None
    return str(path)


def stage1_checkpoint(config: Config, microscope_store: str | Path) -> str:
    """The stage-1 checkpoint every trial starts from: the run's recorded one, or one trained now.

    Looks in ``<run>/stages.json`` (the pipeline's record) and ``<run>/tune/stage1.json`` (ours); trains
    stage 1 with Ray Train only when neither holds an intact checkpoint of the same ``stage1`` settings.
    """
    from msbt.jobs.pipeline import run_dir
    from msbt.train.runner import best_checkpoint, train_stage

    own = run_dir(config) / "tune" / STAGE1_FILE
    for record in (run_dir(config) / "stages.json", own):
        found = _recorded_stage1(record, config)
        if found:
            print(f"stage 1: reusing {found} (from {record})", flush=True)
            return found
    print("stage 1: training it once for every trial", flush=True)
    best = best_checkpoint(train_stage(config, 1, microscope_store), config.stage1.monitor)
    if best is None:
        raise RuntimeError("stage 1 reported no checkpoint")
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_text(json.dumps({"stage1": {"checkpoint": best.path, "monitor": config.stage1.monitor}}, indent=2))
    return best.path


# ---------------------------------------------------------------------------------------------------
# Trainables


def train_trial(params: dict, *, config: Config, store: str, parent: str, experiment: str) -> None:
    """Full mode: one trial = one Ray Train run of stage 2 from the shared stage-1 checkpoint.

    Args:
        params: The trial's values, nested like :func:`param_space`.
        config: The run's resolved config.
        store: The ultrasound store (its train and val rows are used).
        parent: The stage-1 checkpoint folder.
        experiment: The experiment folder; the Train run goes to ``train/<trial id>/stage2`` in it.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from msbt.train.runner import train_stage

    trial_id = tune.get_context().get_trial_id()
    _set_aside(Path(experiment) / "train" / trial_id)
    cfg = trial_config(config, params, storage=Path(experiment) / "train", name=trial_id)
    # Ray's callback on the Train run forwards each epoch's report to this trial: one Tune result per epoch.
    # No epoch bars: the search draws one bar over its trials (trial_progress).
    train_stage(cfg, 2, store, parent_checkpoint=parent, callbacks=[TuneReportCallback()], progress=False)


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


def _search_record(config: Config, fast: bool, parent: str, features: str | None) -> dict:
    space = config.tune.space
    return {
        "metric": config.tune.metric,
        "mode": config.tune.mode,
        "epochs": config.stage2.epochs,
        "fast": fast,
        "reference": config.tune.reference,
        "reference_point": reference_point(config, fast),
        "fixed": fast_fixed(config) if fast else {},
        "searched": {k: _values(space, k) for k in searched(space, fast)},
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
    """
    from ray import tune

    from msbt.jobs.pipeline import prepare_data, preprocess, summarize, summarize_stores

    t, fast = config.tune, config.tune.fast
    check_space(t.space, sources)
    if fast and config.stage2.trainable_backbone:
        raise ConfigError("tune.fast needs a frozen backbone: set stage2.trainable_backbone: false "
                          "(workflows/tune.py --fast does)")
    if t.metric.startswith("test"):
        raise ConfigError(f"tune.metric {t.metric!r}: the test split is never used for selection")
    _scheduler(config)  # a bad grace period is refused before any data work
    exp = experiment_dir(config)
    restorable = exp.is_dir() and tune.Tuner.can_restore(str(exp))
    if restorable and not resume:
        raise ConfigError(f"{exp}: an experiment already exists; continue it with --resume, or set "
                          "tune.experiment to start another")
    prepared = prepare_data(config)
    print(summarize(prepared), flush=True)
    stores = preprocess(config, prepared)
    print(summarize_stores(stores), flush=True)
    parent = stage1_checkpoint(config, stores["microscope"].path)
    store = str(stores["ultrasound"].path)
    features = None
    if fast:
        from msbt.tune.fast import ensure_features

        features = str(ensure_features(config, store, parent, reference_stage(config)))
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
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        tuner = _new_tuner(config, trainable, fast)
    results = tuner.fit()
    from msbt.tune.review import write_hparams

    print(f"tune results in {exp}; HParams for TensorBoard in {write_hparams(exp)}; review: msbt tune-report "
          f"{exp}", flush=True)
    return results


def _trainable(config: Config, store: str, parent: str, exp: str, features: str | None):
    from ray import tune

    if features is None:
        fn = tune.with_parameters(train_trial, config=config, store=store, parent=parent, experiment=exp)
        # The Train worker holds the trial's CPUs; the trial function only waits for it.
        return tune.with_resources(fn, {"CPU": 0.01})
    from msbt.tune.fast import head_trial, load_features

    fn = tune.with_parameters(head_trial, config=config, features=load_features(features))
    resources = {"CPU": config.tune.cpus_per_trial}
    if config.tune.gpus_per_trial:
        resources["GPU"] = config.tune.gpus_per_trial
    return tune.with_resources(fn, resources)


def _new_tuner(config: Config, trainable, fast: bool):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from msbt.jobs.pipeline import run_dir

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
        ),
        run_config=tune.RunConfig(
            name=t.experiment,
            storage_path=str(run_dir(config) / "tune"),
            # Tune's status table every few seconds is --verbose only; by default one bar over the trials.
            verbose=1 if console.is_verbose() else 0,
            callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), trial_progress(t.num_samples, t.metric, t.mode)],
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

        def _finished(self, trial):
            value = (trial.last_result or {}).get(metric)
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
            if self.bar is not None:
                self.bar.close()

    return _TrialBar()


# ---------------------------------------------------------------------------------------------------
# Review


def read_experiment(path: str | Path) -> tuple[dict, list[dict]]:
    """Read an experiment folder without Ray: its ``search.json`` and one row per trial.

    Args:
        path: ``<run>/tune/<experiment>``.

    Returns:
        ``(search record, trials)``; each trial: ``trial`` (folder name), ``params`` (nested), ``best``
        (best value of the metric over its epochs, None if never reported), ``best_epoch``, ``epochs``
        (results reported), ``status`` (``complete``, ``stopped early``, ``error`` or ``unfinished``),
        ``reference`` (True for trial 0's values).

    Raises:
        FileNotFoundError: ``path`` is not an experiment made by ``msbt tune``.
    """
    path = Path(path).expanduser()
    if not (path / SEARCH_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a msbt tune experiment (no {SEARCH_FILE})")
    search = json.loads((path / SEARCH_FILE).read_text())
    statuses = _trial_statuses(path)
    metric, sign = search["metric"], (1 if search["mode"] == "max" else -1)
    trials = []
    for folder in sorted(path.glob("trial_*")):
        if not (folder / "params.json").is_file():
            continue
        params = json.loads((folder / "params.json").read_text())
        results = _results(folder / "result.json")
        values = [(r[metric], r.get("training_iteration", i + 1)) for i, r in enumerate(results)
                  if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
        best = max(values, key=lambda v: sign * v[0]) if values else None
        trials.append({
            "trial": folder.name,
            "params": params,
            "best": best[0] if best else None,
            "best_epoch": best[1] if best else None,
            "epochs": len(results),
            "status": _status(folder, statuses.get(folder.name), len(results), search["epochs"]),
            "reference": flatten(params) == flatten(search["reference_point"]),
        })
    trials.sort(key=lambda r: (r["best"] is None, -sign * (r["best"] or 0.0)))
    return search, trials


def _results(file: Path) -> list[dict]:
    if not file.is_file():
        return []
    rows = []
    for line in file.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run may be cut off
            break
    return rows


def _trial_statuses(path: Path) -> dict[str, str]:
    """Trial folder -> Tune status (TERMINATED, ERROR, RUNNING, PENDING) over every experiment state file.

    A restored experiment leaves the state file of the interrupted run beside its own, and which one is
    newest by mtime is not reliable; a trial that any state records as TERMINATED is finished (a restore
    never reruns it), so that status wins, then ERROR, then the rest.
    """
    rank = {"TERMINATED": 3, "ERROR": 2}
    out: dict[str, str] = {}
    for state in sorted(path.glob("experiment_state-*.json")):
        try:
            entries = json.loads(state.read_text()).get("trial_data", [])
        except (OSError, json.JSONDecodeError):
            continue  # being written
        for entry in entries:
            try:
                trial = json.loads(entry[0])
                trial_id, status = trial["trial_id"], trial["status"]
            except (TypeError, KeyError, IndexError, json.JSONDecodeError):
                continue
            if rank.get(status, 1) >= rank.get(out.get(trial_id, ""), 0):
                out[trial_id] = status
    return {f"trial_{trial_id.rsplit('_', 1)[-1]}": status for trial_id, status in out.items()}


def _status(folder: Path, tune_status: str | None, epochs: int, max_epochs: int) -> str:
    if tune_status == "ERROR" or (folder / "error.txt").is_file() and tune_status != "TERMINATED":
        return "error"
    if tune_status in ("RUNNING", "PENDING", "PAUSED") or (tune_status is None and epochs < max_epochs):
        return "unfinished"
    return "complete" if epochs >= max_epochs else "stopped early"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "/".join(_short(v) for v in value)
    return str(value)


def format_ranking(search: dict, trials: list[dict]) -> str:
    """The ranked table ``msbt tune-report`` prints: best first; trial 0 (the reference) marked."""
    metric = search["metric"]
    flat = [flatten(t["params"]) for t in trials]
    keys = [k for k in (flat[0] if flat else {}) if len({json.dumps(f.get(k)) for f in flat}) > 1]
    header = ["rank", "trial", *keys, metric, "best ep", "epochs", "status", ""]
    rows = []
    for rank, (trial, values) in enumerate(zip(trials, flat), start=1):
        score = "n/a" if trial["best"] is None else f"{trial['best']:.4f}"
        rows.append([str(rank), trial["trial"], *(_short(values.get(k)) for k in keys), score,
                     str(trial["best_epoch"] or "-"), f"{trial['epochs']}/{search['epochs']}", trial["status"],
                     f"<- trial 0: {search['reference']}'s configuration" if trial["reference"] else ""])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    mode = "fast (heads on cached features, backbone frozen)" if search["fast"] else "full training"
    title = f"{len(trials)} trials, {mode}, ranked by best {metric} ({search['mode']}) on the validation split"
    return "\n".join([title, *lines])


def best_overlay(search: dict, trials: list[dict]) -> dict:
    """The best trial's stage-2 values as a config overlay (``trainable_backbone: false`` in fast mode)."""
    scored = [t for t in trials if t["best"] is not None]
    if not scored:
        raise ValueError("no trial reported the metric yet; nothing to choose from")
    best = scored[0]
    stage2 = _merge(search.get("fixed") or {}, decode(best["params"]))
    if search["fast"]:
        stage2["trainable_backbone"] = False
    return {"stage2": stage2}


def write_best_overlay(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the best trial's overlay (default ``<experiment>/best.yaml``) and check that it loads."""
    from msbt.config import load_config

    search, trials = read_experiment(path)
    overlay = best_overlay(search, trials)
    best = next(t for t in trials if t["best"] is not None)
    out = Path(out) if out else Path(path) / "best.yaml"
    comment = (f"# Best stage-2 configuration of {Path(path).resolve()}: {best['trial']}, best "
               f"{search['metric']} {best['best']:.4f} at epoch {best['best_epoch']} (validation split).\n"
               f"# Use on top of the configs the search ran with, e.g.\n"
               f"#   python workflows/pipeline.py --config workflows/configs/cpu.yaml --config {out}\n")
    out.write_text(comment + yaml.safe_dump(overlay, sort_keys=False))
    load_config([out])  # an overlay the pipeline cannot read is an error here, not later
    return out
