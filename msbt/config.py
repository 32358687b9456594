"""Configuration as data: frozen dataclasses loaded from YAML overlays.

The dataclass defaults ARE the paper's settings (Ayana, Park, Choe, "Multistage Transfer Learning for
Breast Cancer Early Diagnosis via Ultrasound"); `workflows/configs/paper.yaml` spells them out and a test
keeps the two equal. Overlays (`cpu.yaml`, `smoke.yaml`, a Tune best-config, a user's own file) change a
few keys on top. An overlay may name files it builds on with `extends:` (paths relative to itself).

Every key of every file is checked against the dataclasses when that file is read, so an unknown key or a
wrong type is reported with the file and the dotted key, not later and deep inside a worker.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from msbt.atomicio import write_text


# Field metadata of a setting added after runs began recording their settings (see to_dict).
ADDED_LATER = {"added_later": True}
# The smallest share of the image one erased rectangle covers (AugmentConfig.erase draws from this up to its value).
ERASE_MIN_AREA = 0.02


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and key."""


@dataclass(frozen=True)
class SynthConfig:
    """Built-in synthetic data (used when no data root is given)."""

    seed: int = 0
    out_dir: str = ""  # "" -> ~/.cache/msbt/synth/<hash of these settings>
    fields_per_line: int = 8
    field_size: int = 1000
    lesions_per_class: int = 40
    frames_per_lesion: tuple[int, int] = (1, 3)
    ultrasound_size: int = 256
    # >= 2: the built-in ultrasound set is that many sites that differ in gain, speckle and framing
    # (msbt.data.sitesynth), for multi-site runs, external evaluation and leave-one-site-out on built-in data.
    sites: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Where the images are, what to keep, and how to split them."""

    # Class-per-folder roots or CSV manifests (path,label[,group]); "" -> built-in synthetic data.
    microscope: str = ""
    # One source, or several named sites: a list of `NAME=PATH` (or bare `PATH`, named after its folder);
    # see msbt.data.sites.
    ultrasound: str | tuple[str, ...] = ""
    # Ultrasound classes to keep, in label order (index 0 = negative); BUSI's `normal/` is dropped here.
    ultrasound_classes: tuple[str, ...] = ("benign", "malignant")
    microscope_classes: tuple[str, ...] = ()  # () -> every class folder found
    strict: bool = False  # True: the first rejected file stops the run
    mask_suffixes: tuple[str, ...] = ("_mask",)  # BUSI keeps `x_mask.png` / `x_mask_1.png` beside `x.png`
    sixteen_bit: Literal["scale", "minmax"] = "scale"
    split: tuple[float, float, float] = (0.7, 0.2, 0.1)  # train:val:test, the paper's 7:2:1
    folds: int = 5
    seed: int = 0
    # Groups are placed by a seeded hash so they keep their split when images are added; a split may stray
    # this far (a fraction of a class's images) from its share before groups are moved to meet it
    # (msbt.data.splits.assign_groups; 0 = as close as whole groups allow, least stable).
    split_tolerance: float = 0.05
    # "auto": near-duplicate detection on image content; "manifest": the manifest's group column;
    # "none": every image its own group (the naive split, kept for comparisons).
    grouping: Literal["auto", "manifest", "none"] = "auto"
    hash_max_distance: int = 10  # of 64 pHash bits; candidate near-duplicate pairs
    min_similarity: float = 0.8  # correlation of 32x32 thumbnails that confirms a candidate pair
    # Bad-input policies (docs/reliability.md). Images over max_pixels are rejected from their header,
    # before decoding (a decompression-bomb guard; 64 MP = 8000 x 8000).
    max_pixels: int = 64_000_000
    # A file only part of which would be used (multi-page TIFF, animated GIF, a JPEG cut short with its
    # end marker put back, a format its extension does not name): reject it, or use it with a warning.
    on_partial: Literal["reject", "warn"] = "reject"
    # The same file content under two classes: reject every copy (each listed in rejects.csv with the
    # other file named, the run goes on), or stop with an error naming both. Reject by default, as for
    # every other file that cannot be used: public sets have such copies (BUSI: Data in Brief 48:109247).
    on_conflict: Literal["reject", "error"] = "reject"
    # Where files are decoded and fingerprinted (msbt.data.scan): "local" = threads in the driver,
    # "ray" = Ray Data tasks over the cluster, "auto" = Ray Data from scan_ray_min_files candidates on
    # when a Ray cluster is up (below that the threaded scan takes seconds and Ray's start-up is not
    # worth it; docs/preprocess.md has the measurement).
    scan: Literal["auto", "local", "ray"] = "auto"
    scan_ray_min_files: int = 2000


@dataclass(frozen=True)
class PreprocessConfig:
    """Microscope fields -> cell patches (see msbt.images.patches); ultrasound images -> model-ready arrays."""

    # Cell patches. The window must be well above the cell size for the threshold and the automatic
    # polarity to follow the cells, not their halos; "auto" offset = 3x the field's robust noise level.
    block_size: int = 151
    offset: float | Literal["auto"] = "auto"
    polarity: Literal["auto", "dark", "bright"] = "auto"
    min_object_size: int = 100  # objects with fewer pixels are debris
    patch_size: int = 200  # the paper's 200x200 patches
    max_patches_per_field: int = 40
    large_region_policy: Literal["tile", "center", "resize"] = "tile"
    min_center_distance: int | None = None  # None -> patch_size // 2; 0 keeps near-duplicate patches
    # Ultrasound images: resized to image_size x image_size.
    image_size: int = 200
    aspect: Literal["pad", "stretch", "crop"] = "pad"  # pad keeps the lesion's shape (letterbox)
    intensity: Literal["none", "minmax", "clahe", "equalize"] = "none"
    # Running over many files: a rerun into an existing store refuses, resumes (finished chunks are
    # kept) or overwrites; never mixes two runs silently.
    on_existing: Literal["refuse", "resume", "overwrite"] = "resume"
    files_per_chunk: int = 512
    files_per_task: int = 16
    cpus_per_task: float = 1.0
    # Where the files are prepared (msbt.data.store.write_store): "ray" = Ray Data tasks over the cluster,
    # "local" = threads of the driver, "auto" = Ray Data from build_ray_min_files files on when a Ray cluster
    # is up, threads below (a small collection is done before Ray Data's fixed costs are paid;
    # docs/preprocess.md has the measurement). The store's rows are the same either way.
    build: Literal["auto", "local", "ray"] = "auto"
    build_ray_min_files: int = 512


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True
    expansion: int = 3  # the paper triples the training set
    shift: float = 0.1  # fraction of the image size
    rotation: float = 15.0  # degrees
    flip: bool = False
    zoom: float = 0.0
    contrast: float = 0.0
    # Ultrasound-specific (docs/models.md, "Augmentation"): overall gain (grey levels times 1 +- brightness),
    # speckle (each pixel times 1 + N(0, speckle)), and blur (Gaussian, sigma up to `blur` pixels at the
    # image's size), each drawn per image; 0 = off. Added after runs recorded their settings: left out of
    # records while off (see to_dict), so older manifests, stage-index keys and resume checks still match.
    brightness: float = field(default=0.0, metadata=ADDED_LATER)
    speckle: float = field(default=0.0, metadata=ADDED_LATER)
    blur: float = field(default=0.0, metadata=ADDED_LATER)
    # Random erasing (Zhong et al. 2020, "Random Erasing Data Augmentation"): half of the augmented copies get one
    # rectangle of random grey noise covering 2% to `erase` of the image (aspect 0.3-3.3), so no single region,
    # such as burned-in text or a caliper mark, can carry the call alone; 0 = off.
    erase: float = field(default=0.0, metadata=ADDED_LATER)


@dataclass(frozen=True)
class HeadConfig:
    dense_units: tuple[int, ...] = ()  # stage 1: () -> GAP + Dense softmax; stage 2: three Dense layers
    dropout: float = 0.0
    l2: float = 0.0


@dataclass(frozen=True)
class StageConfig:
    """One transfer-learning stage; stage 1 and stage 2 are the same code with two of these."""

    # tiny_cnn: a small random-init CNN for smoke runs and tests only (msbt.model.models)
    backbone: Literal["resnet50", "efficientnetb2", "inceptionv3", "efficientnet_lite0", "efficientnet_lite1",
                      "efficientnet_lite2", "tiny_cnn"] = "resnet50"
    weights: str = "imagenet"  # "imagenet" | "none" | a local weights file | "parent" (previous stage)
    image_size: int = 200
    optimizer: Literal["adagrad", "adam", "sgd"] = "adagrad"
    learning_rate: float = 1e-3
    batch_size: int = 16
    epochs: int = 30
    trainable_backbone: bool = True
    # Transfer schedule (docs/models.md). Paper: one phase, the whole network trains, BatchNorm as Keras
    # trains it. head_epochs > 0: that many head-only epochs first (backbone frozen), then the backbone's
    # top `fine_tune_layers` (0 = all) train at learning_rate * fine_tune_lr_scale for the rest of `epochs`.
    head_epochs: int = 0
    fine_tune_layers: int = 0
    fine_tune_lr_scale: float = 0.1
    # Backbone BatchNorm in inference mode (moving statistics fixed) even while its weights train;
    # always the case while the backbone is frozen or after a head-only phase.
    batchnorm_inference: bool = False
    head: HeadConfig = field(default_factory=HeadConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    monitor: str = "val_loss"  # metric that picks the best checkpoint
    # Weights of the training loss (msbt.data.balance): "none" counts every training image once; "class"
    # gives each class the same total weight; "site_class" each site's each class (every site then weighs
    # the same, and no site's share of malignant images can stand in for malignancy; docs/evaluation.md,
    # "Balancing the training sites and classes"). Validation, thresholds and metrics are never weighted.
    balance: Literal["none", "class", "site_class"] = field(default="none", metadata=ADDED_LATER)
    # Weight averaging (docs/models.md, "Weight averaging: `ema`"): 0 = off (the paper); m in (0, 1) keeps an
    # exponential moving average of the trainable weights, `avg = m * avg + (1 - m) * w` after every step (about
    # 1 / (1 - m) steps long), which validation, the best-epoch choice and the saved model use.
    ema: float = field(default=0.0, metadata=ADDED_LATER)
    # Mixup (docs/models.md, "Mixup: `mixup`"): 0 = off (the paper); alpha > 0 trains every batch on pairs of
    # its examples mixed with weights drawn from Beta(alpha, alpha), their labels mixed the same way. Validation
    # is never mixed; the training accuracy and AUC are then against mixed labels (the loss is what trains).
    mixup: float = field(default=0.0, metadata=ADDED_LATER)


def _stage2_default() -> StageConfig:
    # The paper's stage 2: stage 1's Dense replaced by three Dense layers and one Dropout, then sigmoid.
    return StageConfig(
        weights="parent",
        head=HeadConfig(dense_units=(256, 128, 64), dropout=0.5),
        monitor="val_auc",
    )


@dataclass(frozen=True)
class SearchSpaceConfig:
    """Stage-2 search space of ``msbt tune`` around the paper (docs/tune.md; ``workflows/configs/tune.yaml``).

    Choices are lists of values; ranges are ``[low, high]`` (uniform; log-uniform for ``learning_rate``).
    A one-value choice or ``low == high`` fixes a dimension; an empty list leaves it out of the search
    (every trial keeps the run's own stage-2 value). msbt.tune.search checks the values.
    """

    dense_units: tuple[tuple[int, ...], ...] = ((256, 128, 64), (512, 256, 128), (128, 64, 32))  # choice
    dropout: tuple[float, ...] = (0.2, 0.6)  # range
    l2: tuple[float, ...] = (0.0, 1e-4)  # choice: off, on (the value is ours; the paper gives none)
    expansion: tuple[int, ...] = (1, 3, 5)  # choice; 1 = no augmented copies
    shift: tuple[float, ...] = (0.0, 0.2)  # range
    rotation: tuple[float, ...] = (0.0, 30.0)  # range, degrees
    flip: tuple[bool, ...] = (False, True)  # choice
    optimizer: tuple[Literal["adagrad", "adam", "sgd"], ...] = ("adagrad", "adam", "sgd")  # choice
    learning_rate: tuple[float, ...] = (1e-4, 1e-2)  # log-uniform range around the paper's 1e-3
    batch_size: tuple[int, ...] = (8, 16, 32)  # choice


@dataclass(frozen=True)
class TuneConfig:
    num_samples: int = 8  # trials in all, trial 0 (the reference configuration) included
    max_concurrent_trials: int = 2
    metric: str = "val_auc"  # a validation metric: the test split is never used by the search
    mode: Literal["max", "min"] = "max"
    grace_period: int = 3  # epochs every trial runs before the scheduler may stop it
    # Results go to <run.storage_path>/<run.name>/tune/<experiment>/.
    experiment: str = "search"
    # Trial 0: "paper" = the paper's stage-2 values (the StageConfig defaults) of every searched key,
    # "run" = this run's own resolved stage-2 values.
    reference: Literal["paper", "run"] = "paper"
    scheduler: Literal["asha", "none"] = "asha"
    reduction_factor: int = 2  # ASHA keeps the best 1/reduction_factor at each rung
    seed: int = 0  # seeds the sampling of trial configurations
    # Full mode: CPUs of each trial's Train worker (run.use_gpu gives it a GPU). Fast mode: the trial's.
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fast mode only (fractions pack several head trials onto one GPU)
    # Fast mode (frozen backbone): heads train on cached backbone features (msbt.tune.fast).
    fast: bool = False
    feature_actors: int = 1  # Ray Data actors computing the features
    # Fast mode: a trial's process runs the next trial too (Tune's reuse_actors), sparing a Python process
    # and TensorFlow's import per trial. Full mode starts one per trial (its Train run has its own worker).
    reuse_processes: bool = True
    space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)


@dataclass(frozen=True)
class RunConfig:
    name: str = "msbt"
    storage_path: str = "runs"
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    # Ray Train keeps this many of a stage's checkpoints, the best by the stage's `monitor`.
    checkpoints_to_keep: int = 2
    # Keras mixed_float16 in every Train worker (GPUs with tensor cores; float32 variables and classifier,
    # loss scaling). Slow on CPU: leave it off there.
    mixed_precision: bool = False
    # A stage whose inputs (stage settings, parent model, store, seed, workers, precision) match a finished
    # stage under the same storage_path is reused instead of trained again (msbt.train.stages); false
    # always trains.
    reuse_stages: bool = True
    # GPUs per Train worker when use_gpu: 1 normally; 0.5 puts two workers on one GPU (a plumbing
    # check of the multi-worker path on a one-GPU machine, benchmarks/gpu.sh), never faster than one.
    gpus_per_worker: float = 1.0
    # Two runs of the same config and seed give identical models: TensorFlow's op determinism, and every
    # worker's rows in one fixed order (sorted by source file and patch box, dealt to workers by
    # position). Costs speed (measured in docs/training.md, "Reproducibility").
    deterministic: bool = False
    # Seeds each stage's weight initialisation, row order, dropout and augmentation; None: data.seed. The
    # split keeps data.seed, so runs that differ only here train on the same images (`crossval --by site
    # --seeds` sets it per repetition: how much the held-out AUC moves with the training seed alone).
    train_seed: int | None = None
    # Stage 2 is trained this many times, with training seeds train_seed, train_seed + 1, ...; with more than
    # one, the average of their models (msbt.model.ensemble) is the run's model: evaluated, reported, and what
    # predict, export and serve take. Averaging three seeds raised every held-out site by 0.045-0.049 AUC on
    # real data (docs/evaluation.md, "three training seeds per design"). Leave one site out repeats each
    # held-out site with the same seeds unless --seeds says otherwise.
    stage2_seeds: int = 1
    # Scheduling priority of the Train workers, as a nice increment over the cluster's own processes. Ray
    # starts its workers at +15 so that its own processes stay responsive; it runs a submitted job's driver at
    # +0, and a stage's workers are a job's main work, as the driver is for plain Keras. At +15 a 1-worker
    # stage's steady epochs were about 9% slower on a 2-core machine (about 6% end to end; the CPU idled more
    # between TensorFlow's ops, docs/training.md); 15 gives the machine back to other work.
    worker_niceness: int = 0


@dataclass(frozen=True)
class ServeConfig:
    """`msbt serve`: the Ray Serve application (msbt.serve.app); see docs/predict.md."""

    host: str = "127.0.0.1"  # only this machine can reach it unless told otherwise (0.0.0.0: every interface)
    port: int = 8000
    engine: Literal["keras", "savedmodel", "onnx", "openvino"] = "openvino"
    # int8: onnx/openvino on an export made with --int8 (kept only within its test-AUC bound, export.json)
    precision: Literal["f32", "int8"] = "f32"
    replicas: int = 1
    cpus_per_replica: float = 1.0  # also the engine's thread count (at least 1)
    gpus_per_replica: float = 0.0
    # Dynamic batching (@serve.batch): a batch runs when it is full or the first request waited this long.
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.005
    max_request_mb: float = 32.0  # larger bodies get HTTP 413 before they are decoded
    # Batches a replica scores at once, each on its own engine stream sharing the replica's threads (OpenVINO
    # streams; ONNX Runtime threads split between calls). 1: a batch uses every thread (lowest latency when
    # idle); 2 on a 2-CPU replica served 16% more requests under load (docs/predict.md).
    streams: int = field(default=1, metadata=ADDED_LATER)
    # Ray Serve's own records (its start-up, and an access-log line per request): WARNING keeps the console to
    # msbt's lines and problems; INFO (or `msbt serve --verbose`) shows them, as Serve's files under the Ray
    # session's logs/serve/ do.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = field(default="WARNING", metadata=ADDED_LATER)


@dataclass(frozen=True)
class Config:
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=_stage2_default)
    tune: TuneConfig = field(default_factory=TuneConfig)
    run: RunConfig = field(default_factory=RunConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def training_seed(config: Config) -> int:
    """The seed of training (weights, row order, dropout, augmentation): ``run.train_seed``, else ``data.seed``."""
    return config.data.seed if config.run.train_seed is None else config.run.train_seed


def stage2_seed_list(config: Config) -> list[int]:
    """The training seeds of stage 2 (``run.stage2_seeds`` of them, from :func:`training_seed` on)."""
    first = training_seed(config)
    return [first + i for i in range(config.run.stage2_seeds)]


# ---------------------------------------------------------------------------------------------------
# Loading


def load_config(paths: typing.Sequence[str | Path] = (), overrides: typing.Sequence[str] = ()) -> Config:
    """Resolve the paper defaults, then each YAML overlay in order, then `key.sub=value` overrides.

    Args:
        paths: YAML files; each may `extends:` other files (applied before it).
        overrides: strings like `stage1.epochs=2` (value parsed as YAML), applied last.

    Returns:
        The resolved, validated, frozen Config.

    Raises:
        ConfigError: naming the file (or `--set`) and the dotted key that is wrong.
    """
    merged: dict[str, Any] = {}
    for path in paths:
        for layer_path, layer in _read_with_extends(Path(path), chain=()):
            _check(Config, layer, source=str(layer_path), prefix="")
            _deep_merge(merged, layer)
    for item in overrides:
        layer = _parse_override(item)
        _check(Config, layer, source=f"--set {item}", prefix="")
        _deep_merge(merged, layer)
    config = _build(Config(), merged)
    check_ranges(config, source=", ".join([str(p) for p in paths] + [f"--set {o}" for o in overrides]) or "defaults")
    return config


def from_dict(cls: type, data: Mapping, source: str = "<dict>") -> Any:
    """A config dataclass (e.g. StageConfig from a checkpoint manifest) from plain data, checked like a file."""
    _check(cls, data, source=source, prefix="")
    return _build(cls(), data)


def with_overlay(base: Any, data: Mapping, source: str = "<overlay>") -> Any:
    """``base`` (a config dataclass instance) with a nested mapping applied on top, checked like one more
    overlay file (e.g. a Tune trial's stage-2 values on the run's ``StageConfig``)."""
    _check(type(base), data, source=source, prefix="")
    result = _build(base, data)
    check_ranges(result, source=source)
    return result


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the loader keeps the last one silently,
    so a setting written twice in an overlay took whichever came later)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            except TypeError:  # an unhashable key: the base loader says what is wrong with it
                break
        return super().construct_mapping(node, deep)


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> list[tuple[Path, dict]]:
    path = path.expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"{path}: `extends` cycle ({' -> '.join(p.name for p in chain + (resolved,))})")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save "
                          "the file as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    parents = data.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: `extends` must be a file name or a list of them")
    layers: list[tuple[Path, dict]] = []
    for parent in parents:
        layers += _read_with_extends(path.parent / parent, chain + (resolved,))
    layers.append((path, data))
    return layers


def _parse_override(item: str) -> dict:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. stage1.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise ConfigError(f"--set {item}: the value of `{key.strip()}` is not valid YAML ({problem})") from None
    parts = key.strip().split(".")
    value = _as_number(value, _hint_at(Config, parts))
    layer: dict[str, Any] = {}
    node = layer
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return layer


def _hint_at(cls: type, parts: list[str]) -> Any:
    """The type hint of a dotted key, or None when the key does not exist (reported by _check)."""
    hint: Any = cls
    for part in parts:
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
    return hint


def _as_number(value: Any, hint: Any) -> Any:
    """A command-line string that is a number, as a number where a float is wanted.

    PyYAML follows YAML 1.1, which reads `1e-3` (no dot) as a string; users type it that way.
    """
    if not isinstance(value, str) or hint is None:
        return value
    wanted = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if float not in wanted:
        return value
    try:
        return float(value)
    except ValueError:
        return value


def _deep_merge(into: dict, layer: Mapping) -> None:
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def batchnorm_fixed(stage: StageConfig) -> bool:
    """Whether the stage's backbone BatchNorm runs with fixed statistics (``msbt.model.models.batchnorm_frozen``
    says how and why): asked for, a frozen backbone, or after head-only epochs."""
    return stage.batchnorm_inference or not stage.trainable_backbone or stage.head_epochs > 0


# Above this rate a backbone that trains behind fixed BatchNorm statistics lost its features within a few steps
# (measured, docs/models.md "BatchNorm on small data"): Adam at 3e-4 shrank the spread of Lite0's pooled features
# over 64 ultrasound images from 0.56 to 0.07 in three steps, at 1e-3 to 0.04 in one; at 1e-4 it stayed 0.35-0.45.
BATCHNORM_FIXED_MAX_RATE = 1e-4


def batchnorm_warning(stage: StageConfig) -> str | None:
    """A warning when a stage trains its backbone behind fixed BatchNorm statistics (``batchnorm_inference``, or
    after head-only epochs: ``msbt.model.models.batchnorm_frozen``) faster than :data:`BATCHNORM_FIXED_MAX_RATE`;
    else None. After head-only epochs the backbone trains at ``fine_tune_lr_scale`` times the rate, so that rate
    is the one checked."""
    if not (stage.trainable_backbone and batchnorm_fixed(stage)):
        return None
    rate = stage.learning_rate * (stage.fine_tune_lr_scale if stage.head_epochs > 0 else 1.0)
    if rate <= BATCHNORM_FIXED_MAX_RATE:
        return None
    return (f"the backbone trains at learning rate {rate:g} behind fixed BatchNorm statistics; above "
            f"{BATCHNORM_FIXED_MAX_RATE:g} that was measured to collapse its features within a few steps (training "
            "AUC 0.5 in every epoch, docs/models.md): set head_epochs (the backbone then trains at "
            "fine_tune_lr_scale x learning_rate) or a lower learning_rate")


def _check(cls: type, data: Mapping, source: str, prefix: str) -> None:
    """Validate one file's keys and value types against dataclass `cls` (recursively)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown key `{dotted}` (known here: {known})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: `{dotted}` must be a mapping, got {value!r}")
            _check(hint, value, source, prefix=f"{dotted}.")
        else:
            problem = _type_problem(hint, value)
            if problem:
                raise ConfigError(f"{source}: `{dotted}` {problem}")


def _type_problem(hint: Any, value: Any) -> str | None:
    """Return why `value` does not fit `hint`, or None when it fits."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        return None if value in allowed else f"must be one of {list(allowed)}, got {value!r}"
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return f"must be a list, got {value!r}"
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                return f"must be a list of {len(args)} items, got {len(value)}"
            item_types = list(args)
        for i, (item_type, item) in enumerate(zip(item_types, value)):
            problem = _type_problem(item_type, item)
            if problem:
                return f"item {i}: {problem}"
        return None
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(arg, value) for arg in typing.get_args(hint)]
        if None in problems:
            return None
        # "must be a number, got 'x'" + "must be one of ['auto'], got 'x'" -> one sentence
        wanted = [p.split(", got ")[0].removeprefix("must be ") for p in problems if p]
        return f"must be {' or '.join(wanted)}, got {value!r}"
    # bool is a subclass of int in Python; `epochs: true` is a mistake, not 1.
    if hint is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"must be an integer, got {value!r}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"must be a number, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    if hint is type(None):
        return None if value is None else f"must be null, got {value!r}"
    raise TypeError(f"config type {hint!r} is not supported by the loader")


def _build(base: Any, data: Mapping) -> Any:
    """A copy of dataclass instance `base` with checked `data` applied (recursively).

    Nested defaults come from the parent's default object, so `stage2.head.dropout` changes only the
    dropout of stage 2's three-Dense head and keeps its layer sizes.
    """
    hints = typing.get_type_hints(type(base))
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(base):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(getattr(base, f.name), value)
        elif typing.get_origin(hint) is tuple:
            kwargs[f.name] = _as_tuple(value, hint)
        elif isinstance(value, list) and typing.get_origin(hint) in (typing.Union, types.UnionType):
            kwargs[f.name] = tuple(value)  # `str | tuple[str, ...]` given as a YAML list (data.ultrasound)
        elif hint is float:
            kwargs[f.name] = float(value)
        else:
            kwargs[f.name] = value
    return dataclasses.replace(base, **kwargs)


def _as_tuple(value, hint: Any) -> tuple:
    """YAML lists as the tuples the hint names, nested ones included (``tuple[tuple[int, ...], ...]``),
    so a config read back from its own dump compares equal to the original."""
    args = [a for a in typing.get_args(hint) if a is not Ellipsis]
    if _is_float_tuple(hint):
        return tuple(float(v) for v in value)
    inner = args[0] if len(set(args)) == 1 else None
    if inner is not None and typing.get_origin(inner) is tuple:
        return tuple(_as_tuple(v, inner) for v in value)
    return tuple(value)


def _is_float_tuple(hint: Any) -> bool:
    return all(a is float for a in typing.get_args(hint) if a is not Ellipsis)


# ---------------------------------------------------------------------------------------------------
# Writing


def to_dict(config: Any, *, every_field: bool = False) -> dict:
    """Plain dict (lists, not tuples) of a config, suitable for YAML/JSON.

    A field marked :data:`ADDED_LATER` is left out while it has its default: records written before it
    existed (checkpoint manifests, stage-index keys, saved config.yaml files) compare equal to a record of
    the same settings today; reading such a record fills the default back in. ``every_field`` keeps such
    fields too: for showing a config to a person (``msbt config``), who could not otherwise find them
    (``stage1.balance`` was missing from its output), never for a record.
    """
    return json.loads(json.dumps(_record(config, every_field)))


def _record(value: Any, every_field: bool = False) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _record(getattr(value, f.name), every_field) for f in dataclasses.fields(value)
                if every_field or not (f.metadata.get("added_later") and getattr(value, f.name) == f.default)}
    if isinstance(value, (list, tuple)):
        return [_record(v, every_field) for v in value]
    if isinstance(value, dict):
        return {k: _record(v, every_field) for k, v in value.items()}
    return value


def dump_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML next to a result, so the result can be reproduced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------
# Ranges: values of the right type that cannot work (batch_size 0, NaN learning rate, ...) are refused
# when the config is read, not as a worker traceback a minute after Ray started.


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


_HOST_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(\.{_HOST_LABEL})*\.?")


def _host(value) -> bool:
    """An IP address (v4 or v6) or a host name as RFC 1123 spells one (its last label not all digits, so that
    999.1.1.1 is no name); checked by form only (no DNS lookup: the value is checked before anything starts,
    and a lookup can wait for a network)."""
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    return (len(value.rstrip(".")) <= 253 and _HOST_NAME.fullmatch(value) is not None
            and not value.rstrip(".").rpartition(".")[2].isdigit())


def _positive(v) -> bool:
    return _finite(v) and v > 0


# What a stage logs each epoch (msbt.model.compiled.stage_metrics and the loss), on the training rows and as
# val_* on the validation rows: the names a stage's `monitor` may take.
METRIC_NAMES = ("loss", "accuracy", "auc", "sensitivity", "specificity")
MONITORS = tuple(f"{prefix}{name}" for prefix in ("val_", "") for name in METRIC_NAMES)
_MAX_SEED = 2**31 - 1  # Keras takes seeds below 2**32; this leaves room for the seeds derived from one


def _seed(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_SEED


def _distinct_names(v) -> bool:
    return all(isinstance(x, str) and x.strip() for x in v) and len(set(v)) == len(v)


_MAX_FOLDS = 100  # beyond this a fold is a handful of images: a typo, not a design
_RANGES: dict[type, list[tuple[str, Any, str]]] = {
    SynthConfig: [
        ("fields_per_line", lambda v: v >= 1, ">= 1"),
        ("field_size", lambda v: v >= 64, ">= 64"),
        ("lesions_per_class", lambda v: v >= 1, ">= 1"),
        ("frames_per_lesion", lambda v: 1 <= v[0] <= v[1], "[low, high] with 1 <= low <= high"),
        ("ultrasound_size", lambda v: v >= 32, ">= 32"),
    ],
    DataConfig: [
        ("seed", _seed, f"an integer in [0, {_MAX_SEED}]"),
        ("ultrasound_classes", lambda v: len(v) == 2 and _distinct_names(v),
         "two different class names, the negative one first (e.g. [benign, malignant]): stage 2 is binary"),
        ("microscope_classes", lambda v: len(v) != 1 and _distinct_names(v),
         "[] (every class folder found) or two or more different class names"),
        ("split", lambda v: all(_positive(x) for x in v) and abs(sum(v) - 1.0) < 1e-6,
         "three shares, each > 0, summing to 1 (e.g. [0.7, 0.2, 0.1])"),
        ("folds", lambda v: 2 <= v <= _MAX_FOLDS, f"between 2 and {_MAX_FOLDS}"),
        ("hash_max_distance", lambda v: 0 <= v <= 64, "between 0 and 64 (bits of the hash)"),
        ("min_similarity", lambda v: _finite(v) and 0.0 <= v <= 1.0, "between 0 and 1"),
        ("max_pixels", lambda v: 64 <= v <= 2**30, "between 64 and 2**30 (OpenCV's own limit)"),
    ],
    PreprocessConfig: [
        ("block_size", lambda v: v >= 3 and v % 2 == 1, "an odd number >= 3"),
        ("offset", lambda v: v == "auto" or _finite(v), "'auto' or a finite number"),
        ("min_object_size", lambda v: v >= 0, ">= 0"),
        ("patch_size", lambda v: v >= 16, ">= 16"),
        ("max_patches_per_field", lambda v: v >= 1, ">= 1"),
        ("min_center_distance", lambda v: v is None or v >= 0, "null or >= 0"),
        ("image_size", lambda v: v >= 32, ">= 32"),
        ("files_per_chunk", lambda v: v >= 1, ">= 1"),
        ("files_per_task", lambda v: v >= 1, ">= 1"),
        ("cpus_per_task", _positive, "> 0"),
        ("build_ray_min_files", lambda v: v >= 0, ">= 0"),
    ],
    AugmentConfig: [
        ("expansion", lambda v: v >= 1, ">= 1"),
        ("shift", lambda v: _finite(v) and 0.0 <= v < 1.0, "in [0, 1)"),
        ("rotation", lambda v: _finite(v) and 0.0 <= v <= 180.0, "in [0, 180] degrees"),
        ("zoom", lambda v: _finite(v) and 0.0 <= v < 1.0, "in [0, 1)"),
        ("contrast", lambda v: _finite(v) and 0.0 <= v < 1.0, "in [0, 1)"),
        ("brightness", lambda v: _finite(v) and 0.0 <= v < 1.0, "in [0, 1)"),
        ("speckle", lambda v: _finite(v) and 0.0 <= v <= 1.0, "in [0, 1]"),
        ("blur", lambda v: _finite(v) and 0.0 <= v <= 10.0, "in [0, 10] pixels"),
        ("erase", lambda v: _finite(v) and (v == 0.0 or ERASE_MIN_AREA <= v < 1.0),
         f"0 (off) or in [{ERASE_MIN_AREA}, 1) of the image's area"),
    ],
    HeadConfig: [
        ("dense_units", lambda v: all(u >= 1 for u in v), "units >= 1"),
        ("dropout", lambda v: _finite(v) and 0.0 <= v < 1.0, "in [0, 1)"),
        ("l2", lambda v: _finite(v) and v >= 0.0, "a finite number >= 0"),
    ],
    StageConfig: [
        ("monitor", lambda v: v in MONITORS, f"one of {', '.join(MONITORS)}"),
        ("image_size", lambda v: v >= 32, ">= 32"),
        ("learning_rate", _positive, "a finite number > 0"),
        ("batch_size", lambda v: v >= 1, ">= 1"),
        ("epochs", lambda v: v >= 1, ">= 1"),
        ("head_epochs", lambda v: v >= 0, ">= 0"),
        ("fine_tune_layers", lambda v: v >= 0, ">= 0"),
        ("fine_tune_lr_scale", _positive, "a finite number > 0"),
        ("ema", lambda v: _finite(v) and 0.0 <= v < 1.0, "in [0, 1) (0: no weight averaging)"),
        ("mixup", lambda v: _finite(v) and 0.0 <= v <= 10.0, "in [0, 10] (0: no mixup)"),
    ],
    TuneConfig: [
        ("seed", _seed, f"an integer in [0, {_MAX_SEED}]"),
        ("num_samples", lambda v: v >= 1, ">= 1"),
        ("max_concurrent_trials", lambda v: v >= 1, ">= 1"),
        ("grace_period", lambda v: v >= 1, ">= 1"),
        ("reduction_factor", lambda v: v >= 2, ">= 2"),
        ("cpus_per_trial", _positive, "> 0"),
        ("gpus_per_trial", lambda v: _finite(v) and v >= 0, ">= 0"),
        ("feature_actors", lambda v: v >= 1, ">= 1"),
    ],
    ServeConfig: [
        ("host", _host, "an IP address or a host name (127.0.0.1: this machine only; 0.0.0.0: every interface)"),
        ("port", lambda v: 1 <= v <= 65535, "a TCP port in [1, 65535]"),
        ("replicas", lambda v: v >= 1, ">= 1"),
        ("cpus_per_replica", _positive, "> 0"),
        ("gpus_per_replica", lambda v: _finite(v) and v >= 0, ">= 0"),
        ("max_batch_size", lambda v: v >= 1, ">= 1"),
        ("batch_wait_timeout_s", lambda v: _finite(v) and v >= 0, "a finite number of seconds >= 0"),
        ("max_request_mb", _positive, "a finite number > 0"),
        ("streams", lambda v: v >= 1, ">= 1"),
    ],
    RunConfig: [
        ("num_workers", lambda v: v >= 1, ">= 1"),
        ("cpus_per_worker", _positive, "> 0"),
        ("max_failures", lambda v: v >= -1, ">= -1 (-1: retry without limit)"),
        ("checkpoints_to_keep", lambda v: v >= 1, ">= 1"),
        ("stage2_seeds", lambda v: 1 <= v <= 32, "in [1, 32]"),
        ("train_seed", lambda v: v is None or _seed(v), f"null (data.seed) or an integer in [0, {_MAX_SEED}]"),
        ("worker_niceness", lambda v: 0 <= v <= 19, "in [0, 19] (a lower priority; raising one needs root)"),
    ],
}


def check_ranges(config: Any, source: str = "config", prefix: str = "") -> None:
    """Refuse values that have the right type but cannot work, naming the dotted key and the range.

    Args:
        config: a config dataclass instance (Config or any part of it).
        source: where the values came from, for the message.

    Raises:
        ConfigError: the first value out of range.
    """
    for name, test, wanted in _RANGES.get(type(config), []):
        value = getattr(config, name)
        try:
            ok = bool(test(value))
        except (TypeError, ValueError, IndexError):
            ok = False
        if not ok:
            raise ConfigError(f"{source}: `{prefix}{name}` must be {wanted}, got {value!r}")
    if isinstance(config, StageConfig) and config.backbone == "tiny_cnn" and config.weights == "imagenet":
        raise ConfigError(f"{source}: `{prefix}weights` imagenet: backbone tiny_cnn has none (it is for smoke "
                          f"runs and tests); use none or a local weights file")
    if isinstance(config, StageConfig) and config.head_epochs > config.epochs:
        raise ConfigError(f"{source}: `{prefix}head_epochs` ({config.head_epochs}) must not exceed "
                          f"`{prefix}epochs` ({config.epochs})")
    for f in dataclasses.fields(config):
        child = getattr(config, f.name)
        if dataclasses.is_dataclass(child):
            check_ranges(child, source, prefix=f"{prefix}{f.name}.")
