"""The stage-2 search space around the paper's configuration (pure: no Ray at import, no training).

``tune.space`` in the config lists, per searched setting, a range or a set of choices; this module checks
it, turns it into Tune's ``param_space`` (Ray is imported only there), gives trial 0's values (the
paper's stage 2, or the run's with ``tune.reference: run``) and turns a trial's values back into the
stage-2 config it trains with. Both trainables (msbt.tune.search and msbt.tune.fast) build their trial's
stage from here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

from msbt.config import Config, ConfigError, RunConfig, SearchSpaceConfig, StageConfig, with_overlay

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
    out = merge_overlays({}, params)
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


def space_values(space: SearchSpaceConfig, key: str) -> list:
    """The choices or range of one `tune.space` key as Tune takes them (layer sizes as labels)."""
    values = getattr(space, key)
    return [units_label(v) for v in values] if key == "dense_units" else _plain(values)


def param_space(space: SearchSpaceConfig, fast: bool = False) -> dict:
    """Tune's ``param_space``: nested like a stage-2 overlay (``{"head": {"dropout": tune.uniform(...)}}``)."""
    from ray import tune

    make = {"choice": tune.choice, "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return _nest({k: make[DIMENSIONS[k][1]](space_values(space, k)) for k in searched(space, fast)})


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
    overlay = merge_overlays(fast_fixed(config), decode(params)) if fast else decode(params)
    stage = with_overlay(config.stage2, overlay, source="tune trial")
    if fast:
        stage = dataclasses.replace(stage, trainable_backbone=False)
    return stage


def trial_config(config: Config, params: Mapping, *, storage: str | Path, name: str, fast: bool = False) -> Config:
    """The Config one trial trains with: stage 2 from :func:`trial_stage`, its own Ray Train storage.

    Each trial's Train run gets its own ``run.storage_path``/``run.name``, so concurrent trials never
    write into one ``stage2`` folder; its worker has ``tune.cpus_per_trial`` CPUs.
    """
    run = dataclasses.replace(trial_run(config), storage_path=str(storage), name=name)
    return dataclasses.replace(config, stage2=trial_stage(config, params, fast), run=run)


def trial_run(config: Config) -> RunConfig:
    """The run settings of a full-mode trial's Ray Train stage: the run's, its workers with ``tune.cpus_per_trial``
    CPUs each."""
    return dataclasses.replace(config.run, cpus_per_worker=config.tune.cpus_per_trial)


def merge_overlays(base: Mapping, top: Mapping) -> dict:
    """`top` laid over `base`, nested mappings merged key by key (neither is changed)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in top.items():
        out[key] = merge_overlays(out.get(key, {}), value) if isinstance(value, Mapping) else value
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
