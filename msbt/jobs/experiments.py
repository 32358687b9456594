"""Experiments on one run's data: k-fold cross-validation, the paper's Table 1 ablation, stage comparisons.

Every experiment works on the run folder of the main job (``runs/<run.name>``): the same saved split,
the same Parquet stores (reused, or built if the run has none yet) and ONE stage-1 checkpoint shared by
every arm that starts from stage 1, so arms differ only in what the experiment varies. Each arm trains
stage 2 with :func:`msbt.train.runner.train_stage` under its own Ray run folder
(``runs/<name>/<experiment>/<arm>/stage2``) and is scored by :func:`msbt.eval.evaluate.evaluate`: threshold
chosen on the arm's validation rows, metrics with 95% group-bootstrap intervals on its held-out rows.
An arm whose ``metrics.json`` exists is reused on a rerun (``fresh=True`` starts the experiment over).

Cross-validation folds (docs/evaluation.md). ``split.csv`` deals whole lesion groups to k folds over
ALL images, independently of the train/val/test split. Default scope ``trainval``: only the images of
the train and val splits take part, so the held-out test split stays untouched and the cross-validated
numbers may be used to choose between settings; fold i is held out, fold i+1 (mod k) is the validation
part that picks the threshold (and the best epoch), the other k-2 folds train. Scope ``all`` uses every
image (as the authors' follow-up work reports 5-fold results over the whole set): each image is held
out exactly once, but then the test split has been trained on and the results must not be used to
select anything that is later reported on that test split.

Per-fold stores are copies of the run's ultrasound store with the ``split`` column rewritten (images
are already model-ready, so a copy costs a second even for BUSI), which keeps ``train_stage`` and
``evaluate`` unaware of folds.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from msbt.data.store import write_resplit
from msbt.provenance import write_environment
from msbt.atomicio import atomic_open, read_json, write_text
from msbt.eval import metrics
from msbt.eval.report import (ablation_test_text, delong_caveat, inflation_text, mean_over_sites_text,
                              stage1_origin_text)
from msbt.config import Config, ConfigError, check_ranges, stage2_seed_list, to_dict, training_seed
from msbt.runfolder import run_stages
from msbt.train.stages import index_root

log = logging.getLogger(__name__)

# The held-out metrics every experiment table uses (stable names, as in metrics.json's `test`).
SUMMARY_KEYS = ("accuracy", "auc", "sensitivity", "specificity", "ppv", "npv", "f1", "brier", "loss")

# Table 1 of Ayana, Park, Choe, "Multistage Transfer Learning for Breast Cancer Early Diagnosis via
# Ultrasound": test accuracy of the four stage-2 settings. Each row is an overlay on the run's config and
# sets exactly these three keys (everything else, including the augmentation ranges and the dense sizes,
# is the run's). The paper gives no L2 factor: 1e-4 is ours. Dropout 0.5 is the rate of our stage-2 head.
ABLATION_ROWS: dict[str, dict[str, Any]] = {
    "no_augmentation": {"stage2.augment.enabled": False, "stage2.head.l2": 0.0, "stage2.head.dropout": 0.0},
    "augmentation": {"stage2.augment.enabled": True, "stage2.head.l2": 0.0, "stage2.head.dropout": 0.0},
    "augmentation_l2": {"stage2.augment.enabled": True, "stage2.head.l2": 1e-4, "stage2.head.dropout": 0.0},
    "augmentation_dropout": {"stage2.augment.enabled": True, "stage2.head.l2": 0.0, "stage2.head.dropout": 0.5},
}
ABLATION_LABELS = {
    "no_augmentation": "No augmentation",
    "augmentation": "Augmentation",
    "augmentation_l2": "Augmentation + L2 regularization",
    "augmentation_dropout": "Augmentation + dropout",
}
PAPER_TABLE1_ACCURACY = {"no_augmentation": 0.87, "augmentation": 0.90, "augmentation_l2": 0.92,
                         "augmentation_dropout": 0.96}

# Where stage 2 starts in each arm of the comparison; the naive-split arm is `multistage` on a naive split.
COMPARE_ARMS: dict[str, dict[str, Any]] = {
    "multistage": {"stage2.weights": "parent"},  # ImageNet -> cell lines -> ultrasound
    "imagenet": {"stage2.weights": "imagenet"},  # ImageNet -> ultrasound
    "scratch": {"stage2.weights": "none"},  # random initialisation -> ultrasound
}
NAIVE_ARM = "naive_split"


# ---------------------------------------------------------------------------------------------------
# Config overlays


# A repetition of a design with another training seed k lives in ``<folder>-seed<k>`` (leave one site out).
SEED_SUFFIX = re.compile(r"-seed\d+$")


def one_seed_note(config: Config, experiment: str) -> None:
    """Say that an experiment trains one model per fold or arm when the run averages several seeds (its numbers
    are then a single seed's, not the run's model's)."""
    if config.run.stage2_seeds > 1:
        print(f"{experiment}: trains stage 2 with one seed ({training_seed(config)}) per fold or arm; "
              f"run.stage2_seeds ({config.run.stage2_seeds}) is the main job's and leave one site out's",
              flush=True)


def seed_folder(name: str, seed: int, data_seed: int) -> str:
    """The folder of ``name`` trained with training seed ``seed``: ``name`` itself for the seed equal to
    ``data.seed`` (so a run made before seeds could be chosen is found), else ``name-seed<seed>``."""
    return name if seed == data_seed else f"{name}-seed{seed}"


def with_overrides(config: Config, overrides: Mapping[str, Any], source: str = "overlay") -> Config:
    """A copy of ``config`` with dotted keys replaced, e.g. ``{"stage2.head.l2": 1e-4}``, checked as a
    config file is (``msbt.config.check_ranges``).

    Raises:
        ConfigError: A key that names no config field, or a value the result cannot work with (e.g. the
            ``imagenet`` arm on a backbone without ImageNet weights), named with ``source``.
    """
    for dotted, value in overrides.items():
        config = _replace(config, dotted.split("."), value, dotted)
    check_ranges(config, source)
    return config


def _replace(node, parts: list[str], value, dotted: str):
    if not dataclasses.is_dataclass(node) or parts[0] not in {f.name for f in dataclasses.fields(node)}:
        raise ConfigError(f"overlay key `{dotted}` names no config field")
    if len(parts) == 1:
        return dataclasses.replace(node, **{parts[0]: value})
    return dataclasses.replace(node, **{parts[0]: _replace(getattr(node, parts[0]), parts[1:], value, dotted)})


def arm_config(config: Config, experiment_dir: Path, arm: str, overrides: Mapping[str, Any] = ()) -> Config:
    """The config of one arm: the overlay, and a Ray run folder of its own (``<experiment_dir>/<arm>``)."""
    return with_overrides(config, {**dict(overrides), "run.storage_path": str(experiment_dir), "run.name": arm})


# ---------------------------------------------------------------------------------------------------
# The run's data and its shared stage 1


@dataclass(frozen=True)
class RunData:
    config: Config
    run_dir: Path
    microscope_store: Path | None  # None when no arm starts from stage 1
    ultrasound_store: Path
    ultrasound_split: Path  # the folder with split.csv / split.json


def prepare_run(config: Config, *, stage1: bool) -> RunData:
    """The run's saved split and stores (made now if the main job has not made them). Ray must be up.

    Args:
        stage1: Whether a stage 1 is needed (an arm starts from it): without, no microscope data is
            scanned and no microscope store is made or opened (``microscope_store`` is None).
    """
    from msbt.data.prepare import ensure_stores
    from msbt.runfolder import data_dir, run_dir

    stores = ensure_stores(config, ["microscope", "ultrasound"] if stage1 else ["ultrasound"])
    return RunData(config, run_dir(config), Path(stores["microscope"].path) if stage1 else None,
                   Path(stores["ultrasound"].path), data_dir(config, "ultrasound"))


def shared_stage1(data: RunData, *, verbose: int = 0) -> Path:
    """The stage-1 checkpoint every arm starts from: one the run records (or an identical one of another
    run, through the stage index) that matches the config's stage 1, else trained once into
    ``runs/<name>/experiments/stage1`` and recorded there (``msbt.train.stages.reusable_stage1``)."""
    from msbt.train.stages import index_root, reusable_stage1, reuse_message, train_stage1_once

    found = reusable_stage1(data.config, data.microscope_store)
    if found is not None and found.run is None:
        print(f"stage 1: reusing {found.checkpoint}")
        return found.checkpoint
    if found is not None:
        print(reuse_message(1, found.checkpoint, found.run))
        best = found.checkpoint
    else:
        config = arm_config(data.config, data.run_dir, "experiments")
        best = train_stage1_once(config, data.microscope_store, root=index_root(data.config), verbose=verbose)
        print(f"stage 1: trained once for the experiments -> {best}")
    record = data.run_dir / "experiments" / "stage1.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    write_text(record, json.dumps({"checkpoint": str(best)}, indent=2) + "\n")
    return best


# ---------------------------------------------------------------------------------------------------
# One arm: stage 2 + evaluation


def run_arm(config: Config, store: Path, stage1: Path | None, folder: Path, *, n_boot: int = 2000,
            verbose: int = 0, index: Path | None = None) -> dict:
    """Train stage 2 of one arm and score it; reuse the arm's earlier result if ``folder`` has one.

    Args:
        config: The arm's config (from :func:`arm_config`; its Ray run lands in ``folder/stage2``).
        store: The ultrasound store whose ``train``/``val`` rows train and pick, ``test`` rows score.
        stage1: The shared stage-1 checkpoint (used when ``stage2.weights`` is ``parent``).
        folder: The arm's folder: ``metrics.json`` and ``predictions.csv`` go there.
        index: The stage index's folder (the run's ``msbt.train.stages.index_root``): an identical
            finished stage 2 found there is scored instead of trained, and a stage 2 trained here is
            remembered there. None: always train, remember nothing.

    Returns:
        The arm's metrics.json content, with its predictions attached as in :class:`msbt.eval.evaluate.Evaluation`.
    """
    from msbt.eval.evaluate import Evaluation, evaluate, read_predictions, write_metrics
    from msbt.model.checkpoint import CheckpointError, read_manifest

    done = folder / "metrics.json"
    parent = stage1 if config.stage2.weights == "parent" else None
    if done.is_file() and (folder / "predictions.csv").is_file():
        result = Evaluation(json.loads(done.read_text()))
        try:
            manifest = read_manifest(result["checkpoint"])
        except CheckpointError:  # the checkpoint folder is gone or damaged: train again
            why = "its checkpoint is missing or damaged"
        else:
            why = _not_this_arm(result, manifest, config, store, parent)
        if why is None:
            result.predictions = read_predictions(folder / "predictions.csv")
            print(f"{folder.name}: reusing {done}")
            return result
        print(f"{folder.name}: {why}: training again")
        # the old results and Ray run folder go first: Ray Train would restore the old run it found there
        for name in ("stage2", "metrics.json", "predictions.csv", "internal.json"):
            target = folder / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    best = _arm_stage2(config, store, parent, folder, index, verbose)
    result = evaluate(best, store, n_boot=n_boot, seed=config.data.seed)
    result["arm_config"] = {"stage2": to_dict(config.stage2)}
    folder.mkdir(parents=True, exist_ok=True)
    write_metrics(result, done)
    return result


def _not_this_arm(result: dict, manifest: dict, config: Config, store: Path, parent: Path | None = None) -> str | None:
    """Why an arm's earlier result is not this arm's (None: it is). An experiment rerun with another seed, other
    stage-2 settings, another scope (``crossval --scope all`` after the default) or a stage 1 trained again since
    reused the old folds as they were, and pooled them with new ones: numbers of one design labelled as
    another's, or folds trained on the test split reported as "test split untouched"."""
    from msbt.train.stages import manifest_problem, stage_inputs

    problem = manifest_problem(manifest, stage_inputs(config, 2, store, parent), old_stage_number=True)
    if problem is not None:
        return problem
    # an arm scored from a checkpoint whose manifest records no settings: the arm's own record of them
    before = (result.get("arm_config") or {}).get("stage2")
    now = json.loads(json.dumps(to_dict(config.stage2)))
    if before is not None and before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        return f"it was trained with other stage-2 settings ({', '.join(f'stage2.{k}' for k in changed)})"
    return None


def _arm_stage2(config: Config, store: Path, parent: Path | None, folder: Path, index: Path | None,
                verbose: int) -> Path:
    """The arm's stage-2 checkpoint: an identical finished stage 2 from the index, or one trained now."""
    from msbt.train.runner import best_checkpoint, train_stage
    from msbt.train.stages import find_identical, remember_stage, reuse_message, stage_inputs
    from msbt.runfolder import run_dir

    inputs = stage_inputs(config, 2, store, parent) if index is not None else None
    if inputs is not None and config.run.reuse_stages:
        entry = find_identical(index, inputs)
        if entry is not None:
            print(f"{folder.name}: " + reuse_message(2, entry["checkpoint"], entry["run"]), flush=True)
            return Path(entry["checkpoint"])
    trained = train_stage(config, 2, store, parent_checkpoint=parent, verbose=verbose)
    best = best_checkpoint(trained, config.stage2.monitor)
    if best is None:
        raise RuntimeError(f"{folder}: stage 2 reported no checkpoint")
    if inputs is not None:
        remember_stage(index, inputs, best.path, run_dir(config))
    return Path(best.path)


def _ci(result: dict, key: str) -> list[float]:
    return [float(x) for x in result["test_ci95"][key]]


def _fresh(folder: Path, fresh: bool) -> Path:
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_environment(folder)  # what this experiment's numbers were made with
    return folder


# ---------------------------------------------------------------------------------------------------
# Stores with a rewritten split column


def read_split_rows(split_folder: str | Path) -> list[dict]:
    """``split.csv`` rows (relpath, label, group, split, fold as int)."""
    path = Path(split_folder) / "split.csv"
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"relpath", "label", "group", "split", "fold"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns relpath,label,group,split,fold")
    return [{**r, "fold": int(r["fold"])} for r in rows]


# ---------------------------------------------------------------------------------------------------
# k-fold cross-validation


CV_SCOPES = ("trainval", "all")


def fold_roles(rows: Sequence[Mapping], fold: int, folds: int, scope: str = "trainval") -> dict[str, str]:
    """source -> role in cross-validation fold ``fold``: held-out fold "test", next fold "val", rest "train".

    Args:
        rows: ``split.csv`` rows (relpath, split, fold).
        fold: The held-out fold, 0..folds-1.
        folds: k (>= 3: train, validation and held-out parts must be different folds).
        scope: ``trainval`` (the test split takes no part) or ``all``.
    """
    if scope not in CV_SCOPES:
        raise ValueError(f"cross-validation scope must be one of {CV_SCOPES}, got {scope!r}")
    if folds < 3:
        raise ValueError(f"cross-validation needs at least 3 folds (train, validation, held out), got {folds}")
    val_fold = (fold + 1) % folds
    roles = {}
    for row in rows:
        if scope == "trainval" and row["split"] == "test":
            continue
        roles[row["relpath"]] = "test" if row["fold"] == fold else "val" if row["fold"] == val_fold else "train"
    return roles


def _check_roles(roles: Mapping[str, str], labels: Mapping[str, str], where: str) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for source, role in roles.items():
        counts.setdefault(role, {}).setdefault(labels[source], 0)
        counts[role][labels[source]] += 1
    classes = set(labels.values())
    for role in ("train", "val", "test"):
        missing = classes - set(counts.get(role, {}))
        if missing:
            raise ValueError(f"{where}: its {role} part has no {', '.join(sorted(missing))} image; use fewer "
                             "folds (data.folds) or cross-validation scope 'all'")
    return counts


def crossval(config: Config, *, scope: str = "trainval", fresh: bool = False, n_boot: int = 2000,
             verbose: int = 0) -> dict:
    """k-fold cross-validation of stage 2 (k = the saved split's folds), all folds from one stage 1.

    Returns:
        The content of ``crossval.json`` (also written, with ``folds.csv``, to ``runs/<name>/crossval``):
        per-fold rows and ``summary`` = {metric: [mean, sd]} over folds.
    """
    from msbt.eval.evaluate import pooled_folds

    one_seed_note(config, "crossval")
    needs_stage1 = 1 in run_stages(config)
    data = prepare_run(config, stage1=needs_stage1)
    rows = read_split_rows(data.ultrasound_split)
    k = int(json.loads((data.ultrasound_split / "split.json").read_text())["folds"])
    labels = {r["relpath"]: r["label"] for r in rows}
    plans = [fold_roles(rows, i, k, scope) for i in range(k)]
    counts = [_check_roles(plan, labels, f"fold {i}") for i, plan in enumerate(plans)]  # fail before training
    out = _fresh(data.run_dir / "crossval", fresh)
    stage1 = shared_stage1(data, verbose=verbose) if needs_stage1 else None
    fold_rows, held_out, scopes = [], [], []
    for i, plan in enumerate(plans):
        folder = out / f"fold-{i}"
        store = write_resplit(data.ultrasound_store, plan, folder / "store")
        result = run_arm(arm_config(config, out, f"fold-{i}"), store, stage1, folder, n_boot=n_boot, verbose=verbose,
                         index=index_root(config))
        held_out.append(result.predictions["test"])
        scopes.append(result.get("scope") or {})
        low, high = result["test_ci95"]["auc"][1:]
        fold_rows.append({
            "fold": i, "val_fold": (i + 1) % k,
            "train_images": sum(counts[i]["train"].values()), "val_images": result["val_images"],
            "test_images": result["test_images"], "test_groups": result["test_groups"],
            "threshold": result["threshold"], **{key: result["test"][key] for key in SUMMARY_KEYS},
            "auc_low": low, "auc_high": high, "checkpoint": result["checkpoint"],
        })
        print(f"fold {i}: " + ", ".join(f"{key} {result['test'][key]:.3f}" for key in ("accuracy", "auc", "loss")))
    summary = metrics.summarize_folds([{key: row[key] for key in SUMMARY_KEYS} for row in fold_rows])
    report = {
        "experiment": "crossval", "folds": k, "scope": scope, "stage1": str(stage1) if stage1 else None,
        "design": _CV_DESIGN[scope].format(k=k),
        "rows": fold_rows, "summary": {key: list(value) for key, value in summary.items()},
        "pooled": pooled_scope(pooled_folds(held_out, [r["threshold"] for r in fold_rows], n_boot=n_boot,
                                            seed=config.data.seed), held_out, scopes),
    }
    if scope == "trainval":  # with scope "all" the pooled predictions include the test split: not for choosing
        report["oof_threshold"] = oof_threshold(held_out, [r["threshold"] for r in fold_rows], data.run_dir,
                                                seed=config.data.seed)
    _write_table(out / "folds.csv", fold_rows)
    write_text(out / "crossval.json", json.dumps(report, indent=2, default=float) + "\n")
    print(format_crossval(report))
    return report


def pooled_scope(pooled: dict, held_out: Sequence[dict], scopes: Sequence[Mapping]) -> dict:
    """``pooled`` (msbt.eval.evaluate.pooled_folds) with the scope of its images: internal unless some fold
    held out a site its model never trained on. k-fold folds deal lesion groups, never whole sites."""
    from msbt.eval.evaluate import with_scope

    tested = {str(s) for fold in held_out for s in np.asarray(fold.get("site", [])).tolist() if str(s)}
    unseen = {site for scope in scopes for site in scope.get("unseen_sites", ())}
    # the folds' held-out images, not a test split (the test split is untouched)
    return with_scope(pooled, sorted(tested), sorted(tested - unseen) if tested else None, images="held-out images")


def oof_threshold(held_out: Sequence[dict], fold_thresholds: Sequence[float], run: Path, *, seed: int = 0) -> dict:
    """The threshold chosen on the folds' pooled out-of-fold predictions (msbt.eval.threshold), and, when the
    main job has scored its test split, that split's sensitivity/specificity at it beside those at the run's
    own validation threshold. The test split only shows the effect; it chooses nothing."""
    from msbt.eval.evaluate import read_predictions
    from msbt.eval.threshold import at_threshold, out_of_fold_threshold

    out = out_of_fold_threshold(held_out, fold_thresholds, seed=seed)
    main = read_json(run / "metrics.json")
    if main and (run / "predictions.csv").is_file():
        test = read_predictions(run / "predictions.csv").get("test")
        if test is not None and len(test["y"]):
            out["main_run_test"] = {"run_threshold": at_threshold(test["y"], test["p"], float(main["threshold"])),
                                    "oof_threshold": at_threshold(test["y"], test["p"], out["threshold"])}
    return out


_CV_DESIGN = {
    "trainval": "{k} group-aware folds over the train+val images (test split untouched); fold i held out, "
                "fold i+1 validates (threshold, best epoch), the rest train",
    "all": "{k} group-aware folds over all images (the test split takes part: do not select on these "
           "numbers); fold i held out, fold i+1 validates (threshold, best epoch), the rest train",
}


def format_crossval(report: dict) -> str:
    keys = ("accuracy", "auc", "sensitivity", "specificity", "f1", "loss")
    lines = [f"{report['folds']}-fold cross-validation ({report['design']}):",
             "fold  n_test  " + "  ".join(f"{k:>11}" for k in keys)]
    for row in report["rows"]:
        lines.append(f"{row['fold']:>4}  {row['test_images']:>6}  " + "  ".join(f"{row[k]:>11.3f}" for k in keys))
    lines.append("mean ± sd     " + "  ".join(
        f"{_pm(*report['summary'][k]):>11}" for k in keys))
    pooled = report.get("pooled")
    if pooled:
        from msbt.eval.evaluate import pooled_lines

        lines += pooled_lines(pooled)
    oof = report.get("oof_threshold")
    if oof:
        from msbt.eval.threshold import format_oof

        lines.append(format_oof(oof))
    return "\n".join(lines)


def _pm(mean: float, sd: float) -> str:
    return f"{mean:.3f}±{sd:.3f}" if not math.isnan(sd) else f"{mean:.3f}"


def _write_table(path: Path, rows: list[dict]) -> None:
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------------
# Table 1


def ablation(config: Config, *, rows: Sequence[str] = tuple(ABLATION_ROWS), fresh: bool = False,
             n_boot: int = 2000, verbose: int = 0) -> dict:
    """The paper's Table 1: the four stage-2 settings on the run's split, one stage 1, the same seeds.

    Returns:
        The content of ``runs/<name>/ablation/ablation.json``: per row the overlay, the test loss,
        accuracy and AUC with 95% intervals, and the paper's accuracy.
    """
    unknown = [r for r in rows if r not in ABLATION_ROWS]
    if unknown:
        raise ValueError(f"unknown ablation rows {unknown}; known: {list(ABLATION_ROWS)}")
    one_seed_note(config, "ablation")
    needs_stage1 = 1 in run_stages(config)
    data = prepare_run(config, stage1=needs_stage1)
    out = _fresh(data.run_dir / "ablation", fresh)
    stage1 = shared_stage1(data, verbose=verbose) if needs_stage1 else None
    table = []
    for name in rows:
        arm = arm_config(config, out, name, ABLATION_ROWS[name])
        result = run_arm(arm, data.ultrasound_store, stage1, out / name, n_boot=n_boot, verbose=verbose,
                         index=index_root(config))
        table.append({
            "row": name, "label": ABLATION_LABELS[name], "overrides": ABLATION_ROWS[name],
            "loss": _ci(result, "loss"), "accuracy": _ci(result, "accuracy"), "auc": _ci(result, "auc"),
            "threshold": result["threshold"], "test_images": result["test_images"],
            "test_groups": result.get("test_groups"), "scope": (result.get("scope") or {}).get("kind"),
            "paper_accuracy": PAPER_TABLE1_ACCURACY[name], "checkpoint": result["checkpoint"],
        })
    report = {"experiment": "ablation", "stage1": str(stage1) if stage1 else None, "rows": table,
              "paper": "Ayana, Park, Choe, Multistage Transfer Learning for Breast Cancer Early Diagnosis via "
                       "Ultrasound, Table 1 (test accuracy)"}
    write_text(out / "ablation.json", json.dumps(report, indent=2, default=float) + "\n")
    print(format_ablation(report))
    return report


def _with_ci(value: Sequence[float]) -> str:
    return f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]"


def format_ablation(report: dict) -> str:
    head = f"{'setting':<34} {'loss [95% CI]':>22} {'accuracy [95% CI]':>22} {'AUC [95% CI]':>22} {'paper acc.':>10}"
    lines = [f"Table 1 (stage 2 settings; ours on {ablation_test_text(report)}; the paper's test accuracy beside):",
             head]
    for row in report["rows"]:
        lines.append(f"{row['label']:<34} {_with_ci(row['loss']):>22} {_with_ci(row['accuracy']):>22} "
                     f"{_with_ci(row['auc']):>22} {row['paper_accuracy']:>10.2f}")
    lines.append(f"paper: {report['paper']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Does the middle stage help? And how much does a naive split flatter?


def naive_roles(rows: Sequence[Mapping], ratios: Sequence[float], seed: int) -> dict[str, str]:
    """source -> split of the naive random split: the run's procedure with every image its own group
    (what ``make_split`` measures as ``leakage.naive_random``)."""
    from msbt.data.splits import SPLITS, assign_groups

    sources = [r["relpath"] for r in rows]
    bins = assign_groups([r["label"] for r in rows], sources, ratios, seed)
    return {source: SPLITS[b] for source, b in zip(sources, bins)}


def _aligned(results: Mapping[str, dict]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(y, groups, {arm: p}) on the test images in one order (by source); refuses mismatched test sets."""
    return _aligned_tests({arm: result.predictions["test"] for arm, result in results.items()})


def _aligned_tests(tests: Mapping[str, dict]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """:func:`_aligned` of the arms' test predictions themselves."""
    first = next(iter(tests.values()))
    order = np.argsort(first["source"], kind="stable")
    sources = first["source"][order]
    scores = {}
    for arm, test in tests.items():
        idx = np.argsort(test["source"], kind="stable")
        if not np.array_equal(test["source"][idx], sources):
            raise ValueError(f"arm {arm} was scored on other test images than the first arm")
        scores[arm] = test["p"][idx]
    return first["y"][order], first["group"][order], scores


def paired_tests(results: Mapping[str, dict], *, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """DeLong and a group-paired bootstrap for the AUC difference of every pair of arms on the same test set."""
    y, groups, scores = _aligned(results)
    arms = list(scores)
    out = []
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            entry: dict[str, Any] = {"a": a, "b": b}
            for name, test in (("delong", lambda: metrics.delong_test(y, scores[a], scores[b])),
                               ("paired_bootstrap", lambda: metrics.paired_bootstrap_auc_diff(
                                   y, scores[a], scores[b], groups=groups, n_boot=n_boot, seed=seed))):
                try:
                    entry[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in test().items()}
                except ValueError as err:  # e.g. fewer than 2 cases of a class for DeLong
                    entry[name] = {"error": str(err)}
            out.append(entry)
    return out


def site_pairs(preds: Mapping[str, Mapping[str, dict]], *, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Every pair of arms over all the held-out sites at once (``{arm: {site: test predictions}}``, one training
    seed): the mean over sites of each site's AUC difference, lesion groups resampled within each site
    (:func:`msbt.eval.metrics.site_mean_auc_diff`). The per-site pairs answer "here"; this answers "at a site
    it never saw", every held-out site weighing alike."""
    arms = list(preds)
    out = []
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            sites = list(preds[a])
            parts = {}
            for site in sites:
                y, groups, scores = _aligned_tests({a: preds[a][site], b: preds[b][site]})
                parts[f"held-out site {site}"] = (y, scores[a], scores[b], groups)
            try:
                test = metrics.site_mean_auc_diff(parts, n_boot=n_boot, seed=seed)
            except ValueError as err:  # e.g. a held-out site of one class
                out.append({"a": a, "b": b, "sites": sites, "error": str(err)})
                continue
            test.pop("sites")
            out.append({"a": a, "b": b, "sites": sites,
                        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in test.items()}})
    return out


def seeded_pairs(site: str, preds: Mapping[str, Mapping[int, dict]], *, n_boot: int = 2000,
                 seed: int = 0) -> list[dict]:
    """Every pair of arms at one held-out site, each arm trained with the same several seeds: the difference of
    their mean AUCs over the seeds, with an interval and p-value over the held-out images and both arms'
    seed spread (:func:`msbt.eval.metrics.repeated_auc`), in ``over_seeds``; ``paired_bootstrap`` holds the
    first seed's paired group bootstrap, as with one seed."""
    aligned = {arm: _aligned_seeds(site, p) for arm, p in preds.items()}
    arms = list(aligned)
    out = []
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            (arr_a, ps_a), (arr_b, ps_b) = aligned[a], aligned[b]
            if not np.array_equal(arr_a["source"], arr_b["source"]):
                raise ValueError(f"held-out site {site}: arms {a} and {b} scored other images")
            y, groups = arr_a["y"], arr_a["group"]
            try:
                rep = metrics.repeated_auc(y, ps_a, ps_b, groups=groups, n_boot=n_boot, seed=seed)
                first = metrics.paired_bootstrap_auc_diff(y, ps_a[0], ps_b[0], groups=groups, n_boot=n_boot,
                                                          seed=seed)
            except ValueError as err:  # e.g. a held-out site with one class: said, not a failed experiment
                out.append({"a": a, "b": b, "paired_bootstrap": {"error": str(err)}, "over_seeds": {"error": str(err)}})
                continue
            df = rep["df_diff"] if math.isfinite(rep["df_diff"]) else None
            out.append({"a": a, "b": b, "paired_bootstrap": {k: (list(v) if isinstance(v, tuple) else v)
                                                             for k, v in first.items()},
                        "over_seeds": {"seeds": len(ps_a), "auc_a": rep["auc"], "auc_b": rep["base_auc"],
                                       "diff": rep["diff"], "ci": [float(x) for x in rep["diff_ci"]],
                                       "p_value": rep["p_value"], "df": df}})
    return out


def leakage_breakdown(result: dict, naive: Mapping[str, str], rows: Sequence[Mapping], *, n_boot: int = 2000,
                      seed: int = 0) -> dict:
    """How the naive model does on naive-test images whose lesion it trained on vs the others: accuracy and AUC
    of each part, and their 95% group-bootstrap intervals (``leaked_ci95``, ``clean_ci95``)."""
    import warnings

    group_of = {r["relpath"]: r["group"] for r in rows}
    seen = {group_of[s] for s, role in naive.items() if role in ("train", "val")}
    test = result.predictions["test"]
    leaked = np.array([group_of.get(s) in seen for s in test["source"]])
    out = {"leaked_images": int(leaked.sum()), "clean_images": int((~leaked).sum())}
    for name, mask in (("leaked", leaked), ("clean", ~leaked)):
        if mask.any():
            with warnings.catch_warnings():  # a part of one class has no AUC: NaN, said by the NaN itself
                warnings.simplefilter("ignore", RuntimeWarning)
                ci = metrics.bootstrap_ci(test["y"][mask], test["p"][mask], result["threshold"],
                                          groups=np.asarray(test["group"])[mask], n_boot=n_boot, seed=seed)
            out[f"{name}_accuracy"], out[f"{name}_auc"] = ci["accuracy"][0], ci["auc"][0]
            out[f"{name}_ci95"] = {k: [float(x) for x in ci[k]] for k in ("accuracy", "auc")}
    return out


def naive_inflation(naive: dict, group: dict, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Naive minus group-aware accuracy and AUC, each ``[diff, low, high]``: a 95% interval that resamples lesion
    groups over both test sets at once (msbt.eval.metrics.bootstrap_diff_two_sets; the sets differ but share
    lesions, so the difference is neither paired nor independent). It covers the test lesions, not the training."""
    import warnings

    sides = [{**r.predictions["test"], "threshold": r["threshold"]} for r in (naive, group)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return metrics.bootstrap_diff_two_sets(*sides, keys=("accuracy", "auc"), n_boot=n_boot, seed=seed)


def compare(config: Config, *, arms: Sequence[str] = tuple(COMPARE_ARMS), naive: bool = True, fresh: bool = False,
            n_boot: int = 2000, verbose: int = 0) -> dict:
    """Multistage vs ImageNet-only vs from scratch on one split and budget, and naive vs group-aware split.

    Returns:
        The content of ``runs/<name>/compare/compare.json``: per arm the test metrics with intervals,
        ``paired`` tests for every pair of arms (same test images), and ``naive_vs_group``.
    """
    unknown = [a for a in arms if a not in COMPARE_ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {list(COMPARE_ARMS)}")
    if naive and "multistage" not in arms:
        raise ValueError("the naive-split comparison needs the multistage arm")
    # every arm's config holds before any work (stage 1 and the first arms train first)
    configs = [with_overrides(config, COMPARE_ARMS[arm], f"compare arm {arm}") for arm in arms]
    one_seed_note(config, "compare")
    needs_stage1 = any(1 in run_stages(c) for c in configs) or naive
    data = prepare_run(config, stage1=needs_stage1)
    out = _fresh(data.run_dir / "compare", fresh)
    stage1 = shared_stage1(data, verbose=verbose) if needs_stage1 else None
    results = {}
    for arm in arms:
        results[arm] = run_arm(arm_config(config, out, arm, COMPARE_ARMS[arm]), data.ultrasound_store, stage1,
                               out / arm, n_boot=n_boot, verbose=verbose, index=index_root(config))
    report: dict[str, Any] = {
        "experiment": "compare", "stage1": str(stage1) if stage1 else None,
        "stage1_origin": stage1_origin(config, stage1) if stage1 and "multistage" in arms else None,
        "arms": {arm: _arm_summary(r) for arm, r in results.items()},
        "paired": paired_tests(results, n_boot=n_boot, seed=config.data.seed) if len(results) > 1 else [],
    }
    if naive:
        rows = read_split_rows(data.ultrasound_split)
        roles = naive_roles(rows, config.data.split, config.data.seed)
        store = write_resplit(data.ultrasound_store, roles, out / NAIVE_ARM / "store")
        naive_result = run_arm(arm_config(config, out, NAIVE_ARM, COMPARE_ARMS["multistage"]), store, stage1,
                               out / NAIVE_ARM, n_boot=n_boot, verbose=verbose, index=index_root(config))
        group = results["multistage"]
        report["naive_vs_group"] = {
            "group_aware": _arm_summary(group), "naive": _arm_summary(naive_result),
            "inflation": {k: naive_result["test"][k] - group["test"][k] for k in ("accuracy", "auc")},
            "inflation_ci95": naive_inflation(naive_result, group, n_boot=n_boot, seed=config.data.seed),
            "naive_test_leakage": leakage_breakdown(naive_result, roles, rows, n_boot=n_boot, seed=config.data.seed),
            "note": "different test sets (naive vs group-aware split), so not a paired test; intervals resample "
                    "lesion groups in both; the difference's interval resamples the lesion groups of both test "
                    "sets at once and covers the test lesions, not the training of the two models",
        }
    write_text(out / "compare.json", json.dumps(report, indent=2, default=float) + "\n")
    print(format_compare(report))
    return report


def stage1_origin(config: Config, stage1: Path) -> dict:
    """What the shared stage 1 learned from (its manifest and the run's microscope split), for the tables that
    compare the multistage arm with the others."""
    from msbt.model.checkpoint import read_manifest
    from msbt.runfolder import data_dir

    manifest = read_manifest(stage1)
    split = read_json(data_dir(config, "microscope") / "split.json") or {}
    return {"checkpoint": str(stage1), "backbone": manifest.get("backbone"),
            "weights": (manifest.get("weights") or {}).get("source"), "synthetic": not config.data.microscope,
            "microscope": config.data.microscope or split.get("root"), "fields": split.get("images"),
            "classes": list(manifest.get("class_names") or split.get("classes") or ()),
            "best_epoch": manifest.get("best_epoch")}


def _arm_summary(result: dict) -> dict:
    return {"test": {k: result["test"][k] for k in SUMMARY_KEYS},
            "ci95": {k: _ci(result, k) for k in SUMMARY_KEYS},
            "threshold": result["threshold"], "test_images": result["test_images"],
            "test_groups": result["test_groups"], "checkpoint": result["checkpoint"]}


def format_compare(report: dict) -> str:
    lines = ["Stage-2 starting points on the same split and budget (the run's own test split, 95% CIs by lesion):"]
    if report.get("stage1_origin"):
        lines.append(stage1_origin_text(report["stage1_origin"]))
    lines.append(f"{'arm':<12} {'accuracy [95% CI]':>22} {'AUC [95% CI]':>22} {'loss [95% CI]':>22}")
    for arm, s in report["arms"].items():
        loss = _with_ci(s["ci95"]["loss"]) if "loss" in s.get("ci95", {}) else f"{s['test']['loss']:.3f}"
        lines.append(f"{arm:<12} {_with_ci(s['ci95']['accuracy']):>22} {_with_ci(s['ci95']['auc']):>22} {loss:>22}")
    for pair in report["paired"]:
        parts = []
        for name in ("delong", "paired_bootstrap"):
            t = pair[name]
            parts.append(f"{name} {t['error']}" if "error" in t else
                         f"{name} diff {t['diff']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}] p={t['p_value']:.3g}")
        lines.append(f"AUC {pair['a']} - {pair['b']} (paired on the same test images): " + "; ".join(parts))
    caveat = delong_caveat(report)
    if caveat:
        lines.append(f"  note: {caveat}")
    nv = report.get("naive_vs_group")
    if nv:
        lines.append("Naive random split vs group-aware split (multistage, same data and budget):")
        for name in ("group_aware", "naive"):
            s = nv[name]
            lines.append(f"  {name:<12} accuracy {_with_ci(s['ci95']['accuracy'])}  AUC {_with_ci(s['ci95']['auc'])}"
                         f"  ({s['test_images']} test images)")
        leak = nv["naive_test_leakage"]
        lines.append(f"  naive - group: {inflation_text(nv)}; "
                     f"{leak['leaked_images']} of {leak['leaked_images'] + leak['clean_images']} naive test images "
                     "have a frame of their lesion in naive train/val")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Leave one site out


def site_roles(rows: Sequence[Mapping], held_out: str, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """source -> role when ``held_out`` is the unseen site: all its images "test" (minus ``exclude``); the
    other sites keep their saved split, their train rows "train", val rows "val" (threshold and best epoch)
    and their test rows "internal" (the in-distribution number the held-out one is compared with)."""
    roles = {}
    for row in rows:
        if row.get("site", "") == held_out:
            if row["relpath"] not in exclude:
                roles[row["relpath"]] = "test"
        else:
            roles[row["relpath"]] = {"train": "train", "val": "val", "test": "internal"}[row["split"]]
    return roles


def cross_site_duplicates(split_folder: Path, rows: Sequence[Mapping], held_out: str) -> frozenset[str]:
    """Held-out images that are near-duplicates of another site's train/val image (msbt.eval.external's
    contamination check on the fingerprints saved with the split); empty when none were saved."""
    from msbt.data.splits import load_fingerprints
    from msbt.eval.external import contamination

    saved = load_fingerprints(split_folder)
    if saved is None:
        return frozenset()
    role = {r["relpath"]: (r.get("site", ""), r["split"]) for r in rows}
    index = {str(rel): i for i, rel in enumerate(saved["relpath"])}
    mine = [index[r] for r, (s, _) in role.items() if s == held_out and r in index]
    theirs = [index[r] for r, (s, split) in role.items() if s != held_out and split in ("train", "val") and r in index]
    thresholds = json.loads((split_folder / "split.json").read_text()).get("thresholds", {})
    found = contamination(saved["hashes"][theirs], saved["thumbs"][theirs], saved["digests"][theirs],
                          saved["hashes"][mine], saved["thumbs"][mine], saved["digests"][mine], **thresholds)
    return frozenset(str(saved["relpath"][mine[j]]) for j in found)


def _internal(result: dict, store: Path, folder: Path, n_boot: int, seed: int) -> dict:
    """The arm's model scored on the other sites' test rows ("internal"), cached in ``internal.json``."""
    from msbt.eval.evaluate import load_stage2, predict_split, score

    cached = read_json(folder / "internal.json")
    if cached and cached.get("checkpoint") == result["checkpoint"]:
        return cached
    model, stage = load_stage2(result["checkpoint"])
    internal = predict_split(model, stage, store, "internal")
    scored = score(result.predictions["val"], internal, n_boot=n_boot, seed=seed)
    out = {"checkpoint": result["checkpoint"], "images": scored["test_images"], "groups": scored.get("test_groups"),
           "auc": _ci(scored, "auc"), "auc_wilson": (scored.get("test_ci95_wilson_groups") or {}).get("auc")}
    (folder / "internal.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def check_several_sites(config: Config) -> None:
    """Refuse leave one site out on a config of one site before Ray starts or any image is read (the refusal
    came after the data step, which on a real collection is minutes of scanning). The sites are those of
    ``data.ultrasound``'s items, or ``synth.sites`` for the built-in data."""
    from msbt.data.sites import parse_sources

    if not config.data.ultrasound and config.synth.sites >= 2:
        return
    sites = [s.name for s in parse_sources(config.data.ultrasound)] if config.data.ultrasound else ["built-in"]
    if len(sites) < 2:
        raise ConfigError(f"data.ultrasound: leave one site out (--by site) needs at least two sites, and this config "
                          f"names one ({sites[0]}); give a list of NAME=PATH (e.g. --set 'data.ultrasound=[a=/data/a, "
                          "b=/data/b]') or use the built-in sites (--set synth.sites=3)")


def leave_one_site_out(config: Config, *, arms: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                       fresh: bool = False, n_boot: int = 2000, verbose: int = 0) -> dict:
    """Train on every site but one and score the held-out one, for every site; all from one stage 1.

    Args:
        arms: None: the config's own stage 2 (``crossval --by site``). Otherwise stage-2 starting points of
            :data:`COMPARE_ARMS` (``compare --by site``), each trained per held-out site and compared on the same
            held-out images with paired tests; an arm whose overlay leaves the config unchanged shares the
            plain design's folder (``site-<s>``), so a finished ``crossval --by site`` is reused.
        seeds: Training seeds (``run.train_seed``) to repeat stage 2 of the design with, on the same split,
            stores and stage-1 checkpoint (``crossval --by site --seeds 0 1 2``): one seed's held-out AUC moves
            by as much as most levers, so the number to quote is the mean over seeds with both uncertainties
            (:func:`msbt.eval.metrics.repeated_auc`). A design that starts from stage 1 shares one stage 1
            over the seeds: its spread is that of stage 2, given that stage 1. Folders: ``site-<s>`` for the
            seed equal to ``data.seed`` (a finished single-seed run is reused), ``site-<s>-seed<k>`` for
            another seed k (an arm's: ``site-<s>-<arm>[-seed<k>]``); a reused folder whose checkpoint records
            another seed is trained again. None: the run's stage-2 seeds (``run.stage2_seeds`` from its training
            seed; one unless set). With ``arms``, every arm is trained with every seed and the arms are compared
            on their means over the seeds, the seeds' spread counted (:func:`seeded_pairs`).

    Returns:
        The content of ``loso.json`` (or ``compare.json`` with arms; either also written, with ``sites.csv``, to
        ``runs/<name>/loso``): per held-out site its AUC with a 95% interval, the internal AUC (the other sites'
        test rows, same model) and the gap internal minus held-out; with arms, per arm and the paired tests.
        With several seeds, ``rows`` are the first seed's, ``by_seed`` every seed's, ``across_seeds`` per site
        the mean over seeds with its spread and intervals and the seeds' averaged model (an ensemble), and
        the summary is made of the means.
    """
    unknown = [a for a in arms or () if a not in COMPARE_ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {list(COMPARE_ARMS)}")
    own_seed = training_seed(config)
    seeds = list(dict.fromkeys(int(k) for k in (stage2_seed_list(config) if seeds is None else seeds)))
    if not seeds:
        raise ValueError("seeds: give at least one training seed")
    overlays = {"config": {}} if arms is None else {a: COMPARE_ARMS[a] for a in arms}
    # every arm's config is checked before any work, as compare's are
    configs = {a: with_overrides(config, ov, f"leave-one-site-out arm {a}") for a, ov in overlays.items()}
    check_several_sites(config)
    needs_stage1 = any(1 in run_stages(c) for c in configs.values())
    data = prepare_run(config, stage1=needs_stage1)
    rows = read_split_rows(data.ultrasound_split)
    sites = sorted({r.get("site", "") for r in rows})
    if len(sites) < 2:
        raise ValueError(f"{data.ultrasound_split / 'split.csv'}: leave-one-site-out needs at least two sites "
                         f"(data.ultrasound: a list of NAME=PATH, or synth.sites: 3); found {sites}")
    labels = {r["relpath"]: r["label"] for r in rows}
    excluded = {s: cross_site_duplicates(data.ultrasound_split, rows, s) for s in sites}
    plans = {s: site_roles(rows, s, excluded[s]) for s in sites}
    for s, plan in plans.items():  # fail before any training
        _check_roles({k: v for k, v in plan.items() if v != "internal"}, labels, f"held-out site {s}")

    def folder_name(arm: str, site: str, seed: int = own_seed) -> str:
        # one config, one folder: an arm equal to the config shares the design's; a training seed other than
        # data.seed, a folder of its own (a fixed rule, whatever seed the config itself names)
        return seed_folder(f"site-{site}" if configs[arm] == config else f"site-{site}-{arm}", seed, config.data.seed)

    clash = [s for s in sites for a in COMPARE_ARMS if s.endswith(f"-{a}")] if arms is not None else []
    if clash:  # site "x-imagenet" and site "x"'s imagenet arm would share a folder
        raise ValueError(f"site names {clash} end like an arm's folder suffix; rename the site (NAME=PATH)")
    clash = [s for s in sites if SEED_SUFFIX.search(s)] if seeds != [config.data.seed] else []
    if clash:  # site "x-seed1" and site "x"'s seed 1 would share a folder
        raise ValueError(f"site names {clash} end like a seed's folder suffix; rename the site (NAME=PATH)")
    out = data.run_dir / "loso"
    if fresh:
        remove_loso_results(out, {folder_name(a, s, k) for a in configs for s in sites for k in seeds}, sites,
                            compare=arms is not None)
    out = _fresh(out, False)
    stage1 = shared_stage1(data, verbose=verbose) if needs_stage1 else None
    tables: dict[str, list[dict]] = {a: [] for a in configs}  # the first seed's rows
    by_seed: dict[str, dict[int, list[dict]]] = {a: {k: [] for k in seeds} for a in configs}
    held_preds: dict[str, dict[str, dict[int, dict]]] = {a: {s: {} for s in sites} for a in configs}
    paired = {}
    for s, plan in plans.items():
        store = write_resplit(data.ultrasound_store, plan, out / f"site-{s}" / "store")
        results = {}
        for seed in seeds:
            for arm, arm_cfg in configs.items():
                name = folder_name(arm, s, seed)
                folder = out / name
                overrides = {} if seed == own_seed else {"run.train_seed": seed}
                result = run_arm(arm_config(arm_cfg, out, name, overrides), store, stage1, folder, n_boot=n_boot,
                                 verbose=verbose)
                if seed == seeds[0]:
                    results[arm] = result
                held_preds[arm][s][seed] = result.predictions["test"]
                has_internal = "internal" in plan.values()
                internal = _internal(result, store, folder, n_boot, config.data.seed) if has_internal else None
                held = _ci(result, "auc")
                row = {
                    "site": s, "test_images": result["test_images"], "test_groups": result["test_groups"],
                    "contamination_excluded": len(excluded[s]), "threshold": result["threshold"],
                    "held_out_auc": held, "sensitivity": _ci(result, "sensitivity"),
                    "specificity": _ci(result, "specificity"), "internal_auc": internal["auc"] if internal else None,
                    # how many images that internal AUC rests on (4 gave "0.000 [0.000, 0.000]" and a gap of -0.93)
                    "internal_images": internal["images"] if internal else None,
                    "gap": internal["auc"][0] - held[0] if internal else None, "checkpoint": result["checkpoint"],
                    # the gap's 95% interval: the two AUCs rest on independent images (a normal approximation from
                    # the wider of each one's bootstrap and Wilson-over-groups intervals)
                    "gap_ci95": metrics.independent_difference(
                        internal["auc"], held, internal.get("auc_wilson"),
                        (result.get("test_ci95_wilson_groups") or {}).get("auc")) if internal else None,
                    "folder": name, "seed": seed,
                }
                by_seed[arm][seed].append(row)
                if seed == seeds[0]:
                    tables[arm].append(row)
                print(f"held-out {s}{'' if arms is None else f' ({arm})'}"
                      f"{f' seed {seed}' if len(seeds) > 1 else ''}: AUC {_with_ci(held)}"
                      + (f", internal {_with_ci(internal['auc'])}" if internal else ""))
        if len(results) > 1:
            paired[s] = (paired_tests(results, n_boot=n_boot, seed=config.data.seed) if len(seeds) == 1 else
                         seeded_pairs(s, {a: held_preds[a][s] for a in configs}, n_boot=n_boot, seed=config.data.seed))
    parts = {}
    for a, t in tables.items():
        # with several seeds the summary is of the means over seeds (_seeds_summary): no interval of one seed's mean
        first_preds = {r["site"]: held_preds[a][r["site"]][seeds[0]] for r in t} if len(seeds) == 1 else None
        parts[a] = {"rows": t, "summary": _loso_summary(t, first_preds, n_boot=n_boot, seed=config.data.seed)}
        if len(seeds) > 1:
            across = [_across_seeds(s, held_preds[a][s], by_seed[a], n_boot=n_boot, seed=config.data.seed)
                      for s in sites]
            parts[a].update(by_seed={str(k): rows for k, rows in by_seed[a].items()}, across_seeds=across,
                            summary=_seeds_summary(across))
    first = next(iter(tables))
    report = {"experiment": "loso", "sites": sites, "stage1": str(stage1) if stage1 else None,
              "design": _LOSO_DESIGN, "seeds": seeds, **parts[first]}
    if arms is not None:
        across = site_pairs({a: {s: held_preds[a][s][seeds[0]] for s in sites} for a in configs}, n_boot=n_boot,
                            seed=config.data.seed) if len(configs) > 1 else []
        report.update(experiment="loso-compare", arms=parts, paired=paired,
                      across_sites={"seed": seeds[0], "pairs": across},
                      stage1_origin=stage1_origin(config, stage1) if stage1 and "multistage" in arms else None)
    _write_table(out / ("sites.csv" if arms is None else "compare-sites.csv"),
                 [{**({} if arms is None else {"arm": a}), **{k: (json.dumps(v) if isinstance(v, list) else v)
                                                            for k, v in r.items()}}
                  for a in tables for k in seeds for r in by_seed[a][k]])
    write_text(out / ("loso.json" if arms is None else "compare.json"),
               json.dumps(report, indent=2, default=float) + "\n")
    print(format_loso(report))
    return report


def remove_loso_results(out: Path, folders: set[str], sites: Sequence[str], *, compare: bool) -> None:
    """``--fresh`` for leave one site out: this experiment's own results only. The plain design
    (``compare=False``): its ``site-<s>/`` folders, ``loso.json``, ``sites.csv``, and the comparison that used
    them; ``compare --by site``: its arms' folders except the shared design's (``site-<s>/`` and its seeds'
    ``site-<s>-seed<k>/``), and ``compare.json``."""
    design = {f"site-{s}" for s in sites}
    if compare:  # the arm equal to the config trains in the design's folders, every seed's: those stay
        own = {name for name in folders if SEED_SUFFIX.sub("", name) not in design}
    else:  # every seed's folders, also of seeds this run does not name: none may be mixed in later
        own = set(folders) | {f.name for f in out.glob("site-*-seed*") if SEED_SUFFIX.sub("", f.name) in design}
    files = {"compare.json", "compare-sites.csv"} | (set() if compare else {"loso.json", "sites.csv"})
    for name in own | files:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _loso_summary(table: Sequence[Mapping], preds: Mapping[str, Mapping] | None = None, *, n_boot: int = 2000,
                  seed: int = 0) -> dict:
    """The number to quote: the worst held-out site's AUC with its interval, and the mean over sites; with every
    site's held-out predictions (``preds``: site -> predictions) the mean gets its 95% interval over the sites'
    lesions (``mean_held_out_auc_ci95``, msbt.eval.metrics.mean_auc_over_sets)."""
    import warnings

    worst = min(table, key=lambda r: r["held_out_auc"][0])
    out = {"mean_held_out_auc": float(np.mean([r["held_out_auc"][0] for r in table])),
           "worst_site": worst["site"], "worst_held_out_auc": worst["held_out_auc"]}
    if preds is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out["mean_held_out_auc_ci95"] = metrics.mean_auc_over_sets(preds, n_boot=n_boot, seed=seed)
        except ValueError:  # e.g. a held-out site of one class: no AUC to average, the mean stays as it is
            pass
    return out


def _aligned_seeds(site: str, preds: Mapping[int, dict]) -> tuple[dict, np.ndarray]:
    """One site's held-out predictions of every seed on the same images: (the first seed's arrays, ordered
    by source, and the (S, N) probabilities in that order)."""
    first = next(iter(preds.values()))
    order = np.argsort(first["source"], kind="stable")
    ps = []
    for seed, pred in preds.items():
        idx = np.argsort(pred["source"], kind="stable")
        if not np.array_equal(pred["source"][idx], first["source"][order]):
            raise ValueError(f"held-out site {site}: seed {seed} scored other images than seed {next(iter(preds))}")
        ps.append(pred["p"][idx])
    return {k: v[order] for k, v in first.items() if k != "p"}, np.stack(ps)


def _across_seeds(site: str, preds: Mapping[int, dict], by_seed: Mapping[int, Sequence[Mapping]], *, n_boot: int,
                  seed: int) -> dict:
    """One held-out site over the seeds: the mean AUC with the case interval and both uncertainties, the spread
    over seeds, and the seeds' averaged model (mean probability per image: an ensemble one could deploy), also
    of every smaller number of the seeds (:func:`msbt.eval.metrics.averaged_auc_by_size`)."""
    arrays, ps = _aligned_seeds(site, preds)
    rep = metrics.repeated_auc(arrays["y"], ps, groups=arrays["group"], n_boot=n_boot, seed=seed)
    averaged = metrics.repeated_auc(arrays["y"], ps.mean(axis=0), groups=arrays["group"], n_boot=n_boot, seed=seed)
    ensemble = [averaged["auc"], *averaged["ci_cases"]]
    internal = [r["internal_auc"][0] for k in preds for r in by_seed[k] if r["site"] == site and r["internal_auc"]]
    return {"site": site, "seeds": [int(k) for k in preds], "images": int(len(arrays["y"])),
            # the averaged model of 1, 2, ... of these seeds: whether one more seed would still add
            "ensemble_by_size": metrics.averaged_auc_by_size(arrays["y"], ps, seed=seed),
            "held_out_auc_mean": rep["auc"], "ci": list(rep["ci"]) if rep["ci"] else None, "df": rep["df"],
            "ci_cases": list(rep["ci_cases"]), "se": rep["se"], "per_seed": rep["per_seed"],
            "seed_sd": rep["seed_sd"], "seed_range": [min(rep["per_seed"]), max(rep["per_seed"])],
            "ensemble_auc": [float(x) for x in ensemble],
            "internal_auc_mean": float(np.mean(internal)) if internal else None}


def _seeds_summary(across: Sequence[Mapping]) -> dict:
    """The number to quote with several seeds: the worst site's mean over seeds with its interval over the
    held-out cases and the seeds together (and over the cases alone), the range one seed gave, the mean over
    sites, and the seeds' averaged model at the same site."""
    worst = min(across, key=lambda r: r["held_out_auc_mean"])
    # the mean over sites with an interval over their lesions and the seeds: the sites' models are trained apart,
    # so their means over seeds are independent estimates (each with its se and t df, metrics.repeated_auc)
    mean_ci = metrics.mean_of_independent([r["held_out_auc_mean"] for r in across], [r.get("se") for r in across],
                                          [r.get("df") for r in across])
    return {"mean_held_out_auc": float(np.mean([r["held_out_auc_mean"] for r in across])),
            "mean_held_out_auc_ci95": mean_ci, "mean_ci_covers": "their lesions and the training seeds",
            "worst_site": worst["site"], "worst_held_out_auc": [worst["held_out_auc_mean"], *worst["ci"]],
            "worst_ci_cases": worst["ci_cases"],
            "worst_seed_range": worst["seed_range"], "worst_seed_sd": worst["seed_sd"], "seeds": worst["seeds"],
            "worst_site_ensemble_auc": worst["ensemble_auc"],
            "mean_ensemble_auc": float(np.mean([r["ensemble_auc"][0] for r in across]))}


def loso_diff(runs: Sequence[str | Path], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Leave-one-site-out results of several runs (e.g. one per lever) against the first, per held-out site on
    the images both scored: did a lever move the number a user quotes by more than the noise? Reads
    ``runs/<name>/loso/site-<s>/predictions.csv`` (every seed's with ``crossval --by site --seeds``), or with
    ``RUN_DIR:ARM`` that arm's of ``compare --by site``; ``A+B`` averages the members' probabilities per image
    (what an ensemble of them would score; members with seeds are averaged seed by seed, in order). A run
    stopped before its last site counts with the sites it finished (those without a result are listed in
    ``missing``). Trains nothing.

    A run with several seeds counts as the mean of its seeds' AUCs, and the difference's uncertainty adds the
    seed spread to the case bootstrap (:func:`msbt.eval.metrics.repeated_auc`); with one seed on both sides
    the seed spread is unmeasured and the interval and p-value cover the held-out cases only (``seed_term``
    false): a rerun with another seed (and split of the training sites) moved held-out AUC by 0.05-0.07 on
    real sites (docs/evaluation.md).

    Raises:
        ValueError: a run without any held-out site scored, an unknown arm, or a run named twice.
    """
    from msbt.eval.evaluate import read_predictions

    def held_out(spec: str) -> tuple[str, dict[str, dict[int | None, dict]]]:
        path, _, arm = str(spec).rpartition(":")
        if not path or arm not in COMPARE_ARMS:  # no ":ARM" suffix
            path, arm = str(spec), ""
        run = Path(path)
        if arm:
            report = (read_json(run / "loso" / "compare.json") or {}).get("arms", {}).get(arm)
            if not report:
                raise ValueError(f"{run}: no arm {arm!r} in loso/compare.json (run workflows/compare.py --by site)")
            folders = {}
            for k, rows in (report.get("by_seed") or {None: report["rows"]}).items():  # every seed's, if several
                for r in rows:
                    folders.setdefault(r["site"], {})[None if k is None else int(k)] = (
                        r.get("folder") or f"site-{r['site']}-{arm}")
        else:
            report = read_json(run / "loso" / "loso.json")
            if report and report.get("by_seed"):
                folders = {}
                for k, rows in report["by_seed"].items():
                    for r in rows:
                        folders.setdefault(r["site"], {})[int(k)] = r["folder"]
            elif report:
                folders = {r["site"]: {r.get("seed"): r.get("folder") or f"site-{r['site']}"} for r in report["rows"]}
            else:  # stopped before its summary: the sites it finished (the config's own seed)
                folders = {f.parent.name[len("site-"):]: {None: f.parent.name}
                           for f in sorted((run / "loso").glob("site-*/predictions.csv"))
                           if not any(f.parent.name.endswith(f"-{a}") for a in COMPARE_ARMS)
                           and not SEED_SUFFIX.search(f.parent.name)}
            if not folders:
                raise ValueError(f"{run}: no held-out site scored in loso/ (run workflows/crossval.py --by site)")
        found = {site: {k: read_predictions(run / "loso" / name / "predictions.csv")["test"]
                        for k, name in names.items()}
                 for site, names in folders.items()}
        return str(spec), found

    def averaged(spec: str) -> tuple[str, dict[str, dict]]:
        """``A+B+...``: the members' held-out probabilities averaged per image (an ensemble's score)."""
        members = [held_out(part) for part in str(spec).split("+")]
        if len(members) == 1:
            return members[0]
        out = {}
        for site in members[0][1]:
            stacks = []
            for name, sites in members:
                if site not in sites:
                    raise ValueError(f"{name}: no held-out result at site {site}, which {members[0][0]} has")
                arrays, ps = _aligned_seeds(site, sites[site])
                if stacks and not np.array_equal(arrays["source"], stacks[0][0]["source"]):
                    raise ValueError(f"{name}: other held-out images than {members[0][0]} at site {site}")
                if stacks and len(ps) != len(stacks[0][1]):
                    raise ValueError(f"{name}: {len(ps)} seeds, {members[0][0]} {len(stacks[0][1])}; an average "
                                     "of runs pairs their seeds in order, so they need as many")
                stacks.append((arrays, ps))
            mean = np.mean([ps for _, ps in stacks], axis=0)
            out[site] = {i: {**stacks[0][0], "p": row} for i, row in enumerate(mean)}
        return "+".join(name for name, _ in members), out

    specs = [str(r) for r in runs]
    twice = sorted({r for r in specs if specs.count(r) > 1})
    if twice:
        raise ValueError(f"named more than once: {twice}")
    results = dict(averaged(r) for r in specs)
    base_name = specs[0]
    base = {site: _aligned_seeds(site, preds) for site, preds in results[base_name].items()}
    rows, missing = [], {}
    for name, sites in results.items():
        if set(sites) != set(base):
            missing[name] = sorted(set(base) ^ set(sites))
        for site, preds in sorted(sites.items()):
            if site not in base:
                continue
            (pred, ps), (ref, ps_ref) = _aligned_seeds(site, preds), base[site]
            common = sorted(set(pred["source"]) & set(ref["source"]))
            a, b = (dict(zip(x["source"], range(len(x["source"])))) for x in (pred, ref))
            ia, ib = [a[c] for c in common], [b[c] for c in common]
            y, groups = pred["y"][ia], pred["group"][ia]
            rep = metrics.repeated_auc(y, ps[:, ia], None if name == base_name else ps_ref[:, ib], groups=groups,
                                       n_boot=n_boot, seed=seed)
            row = {"run": name, "site": site, "images": len(common), "seeds": len(ps),
                   "auc": [rep["auc"], *rep["ci_cases"]], "seed_sd": rep["seed_sd"],
                   "auc_ci_with_seeds": list(rep["ci"]) if rep["ci"] else None}
            if name != base_name:
                row["diff_vs_first"] = [rep["diff"], *rep["diff_ci"]]
                row["p_value"] = rep["p_value"]
                row["seed_term"] = rep["se_seed_diff"] is not None
                row["df"] = rep["df_diff"] if math.isfinite(rep["df_diff"]) else None
            rows.append(row)
    return {"base": base_name, "rows": rows, "missing": missing}


def _short(spec: str) -> str:
    """``/x/runs/a:imagenet+/x/runs/b`` -> ``a:imagenet+b`` (the run folders' names)."""
    return "+".join(Path(p).name for p in spec.split("+"))


def format_loso_diff(report: dict) -> str:
    seeded = any(r.get("seeds", 1) > 1 for r in report["rows"])
    lines = [f"{'run':<28} {'held-out site':<14} {'images':>6}  "
             + (f"{'seeds':>5}  {'mean AUC [95% CI cases]':<24} {'sd':>5}  " if seeded else f"{'AUC [95% CI]':<24} ")
             + f"AUC - {_short(report['base'])} [95% CI], p"]
    for r in report["rows"]:
        diff = "(base)"
        if "diff_vs_first" in r:
            mark = "" if r.get("seed_term") else " *"
            diff = f"{_with_ci(r['diff_vs_first'])}, {metrics.p_text(r['p_value'])}{mark}"
        if seeded:
            sd = f"{r['seed_sd']:.3f}" if r.get("seed_sd") is not None else "-"
            lines.append(f"{_short(r['run']):<28} {r['site']:<14} {r['images']:>6}  {r.get('seeds', 1):>5}  "
                         f"{_with_ci(r['auc']):<24} {sd:>5}  {diff}")
        else:
            lines.append(f"{_short(r['run']):<28} {r['site']:<14} {r['images']:>6}  {_with_ci(r['auc']):<24} {diff}")
    for run, sites in report.get("missing", {}).items():
        lines.append(f"{_short(run)}: no result at {', '.join(sites)} (only sites both runs scored are compared)")
    if any(r.get("seed_term") is False for r in report["rows"]):
        lines.append("* one seed on both sides: the interval and p cover the held-out images only, not the training "
                     "seed (another seed and split moved held-out AUC by 0.05-0.07 on real sites); compare runs of "
                     "crossval --by site --seeds")
    if any(r.get("seed_term") for r in report["rows"]):
        lines.append("intervals and p without *: the held-out images (group bootstrap) and the spread over seeds "
                     "together (seed variance pooled over the runs with two or more seeds; t with Welch-Satterthwaite "
                     "degrees of freedom)")
    return "\n".join(lines)


_LOSO_DESIGN = ("each site held out in turn: stage 2 trains on the other sites' train rows, picks its threshold "
                "and best epoch on their val rows, and is scored on every image of the held-out site except "
                "near-duplicates of the other sites' train/val images; 'internal' scores the same model on the "
                "other sites' test rows")


def format_loso(report: dict) -> str:
    """The leave-one-site-out summary table for the job log (one per arm for compare --by site)."""
    lines = ["leave one site out (" + report["design"] + "):"]
    if report.get("stage1_origin"):
        lines.append(stage1_origin_text(report["stage1_origin"]))
    parts = report.get("arms") or {None: report}
    for arm, part in parts.items():
        if arm:
            lines.append(f"arm {arm}:")
        lines.append(f"{'held-out site':<20} {'images':>6}  {'held-out AUC [95% CI]':<26} "
                     f"{'internal AUC [95% CI] (images)':<34} gap [95% CI]")
        for r in part["rows"]:
            internal = _with_ci(r["internal_auc"]) if r["internal_auc"] else "-"
            if r["internal_auc"] and r.get("internal_images") is not None:
                internal += f" ({r['internal_images']})"
            gap = f"{r['gap']:+.3f}" if r["gap"] is not None else "-"
            if r.get("gap_ci95") and all(math.isfinite(x) for x in r["gap_ci95"]):
                gap += f" [{r['gap_ci95'][1]:+.3f}, {r['gap_ci95'][2]:+.3f}]"
            lines.append(f"{r['site']:<20} {r['test_images']:>6}  {_with_ci(r['held_out_auc']):<26} {internal:<34} {gap}")
        summary = part.get("summary")
        if part.get("across_seeds"):
            lines += _format_seeds(part, report["seeds"], arm)
        elif summary:
            lines.append(f"at a site it never saw{f' ({arm})' if arm else ''}: AUC "
                         f"{_with_ci(summary['worst_held_out_auc'])} at the worst ({summary['worst_site']}), "
                         f"{mean_over_sites_text(summary, len(part['rows']))}; quote "
                         "these, not the internal AUC")
    one_seed = False
    for site, tests in report.get("paired", {}).items():
        for t in tests:
            boot, seeded = t["paired_bootstrap"], t.get("over_seeds")
            if seeded and "error" not in seeded:
                lines.append(f"held-out {site}: mean AUC {t['a']} - {t['b']} over {seeded['seeds']} seeds "
                             f"{_with_ci([seeded['diff'], *seeded['ci']])} (the interval over the held-out images "
                             f"and both arms' seeds, {metrics.p_text(seeded['p_value'])})")
            elif not seeded and "error" not in boot:
                lines.append(f"held-out {site}: AUC {t['a']} - {t['b']} {_with_ci([boot['diff'], *boot['ci']])} "
                             f"(paired group bootstrap on the held-out images, {metrics.p_text(boot['p_value'])})")
                one_seed = True
    across = report.get("across_sites") or {}
    for t in across.get("pairs", ()):
        if "error" in t:
            lines.append(f"across the held-out sites: AUC {t['a']} - {t['b']}: {t['error']}")
            continue
        seed_note = f"training seed {across['seed']}; " if len(report.get("seeds") or ()) > 1 else ""
        lines.append(f"across the {len(t['sites'])} held-out sites: mean AUC {t['a']} - {t['b']} "
                     f"{_with_ci([t['diff'], *t['ci']])} ({seed_note}each site's own difference, every site alike, "
                     f"lesion groups resampled within each site, {metrics.p_text(t['p_value'])})")
    if one_seed:  # as loso-diff says it: these intervals leave the training seed's spread out
        lines.append("(one training seed per arm: the intervals and p cover the held-out images only, not the seed, "
                     "which moved held-out AUC by 0.05-0.07 on real sites; --seeds 0 1 2 measures it)")
    return "\n".join(lines)


def _format_seeds(part: dict, seeds: Sequence[int], arm: str | None = None) -> list[str]:
    """The leave-one-site-out table over several seeds (of the design, or of one arm): per site the mean with its
    intervals (cases and seeds together; cases alone), the seeds' spread and the seeds' averaged model (with three
    seeds or more, also averaged over fewer of them); the summary line to quote."""
    across, summary = part["across_seeds"], part["summary"]
    n = len(seeds)
    lines = [f"over {n} training seeds {list(seeds)} of stage 2{f' ({arm})' if arm else ''} (same split and stores; "
             f"the table above is seed {seeds[0]}):",
             f"{'held-out site':<20} {'mean AUC [95% CI]':<24} {'[CI cases only]':<16} {'sd':>5}  "
             f"{'seeds min-max':<13}  {'averaged model AUC [95% CI]':<28}"]
    for r in across:
        ci = _with_ci([r["held_out_auc_mean"], *r["ci"]]) if r.get("ci") else f"{r['held_out_auc_mean']:.3f}"
        cases = f"[{r['ci_cases'][0]:.3f}, {r['ci_cases'][1]:.3f}]"
        lines.append(f"{r['site']:<20} {ci:<24} {cases:<16} {r['seed_sd']:>5.3f}  "
                     f"{r['seed_range'][0]:.3f}-{r['seed_range'][1]:.3f}    {_with_ci(r['ensemble_auc']):<28}")
    sized = [r for r in across if len(r.get("ensemble_by_size") or ()) > 2]
    if sized:  # with two seeds the table above says it all (one seed, both averaged)
        lines.append(f"the averaged model of 1 to {n} of the seeds (its AUC, mean over the subsets of that many seeds): "
                     "where it stops rising, more seeds add little")
        lines += [f"{r['site']:<20} " + "  ".join(f"{e['models']}: {e['auc_mean']:.3f}" for e in r["ensemble_by_size"])
                  for r in sized]
    lines.append(f"at a site it never saw{f' ({arm})' if arm else ''}: AUC {_with_ci(summary['worst_held_out_auc'])} "
                 f"at the worst ({summary['worst_site']}; mean of {n} seeds, the interval over its held-out images "
                 "and the seeds; "
                 f"one seed gave {summary['worst_seed_range'][0]:.3f} to {summary['worst_seed_range'][1]:.3f}), "
                 f"{mean_over_sites_text(summary, len(across))}; the {n} seeds' "
                 f"averaged model: {_with_ci(summary['worst_site_ensemble_auc'])} at {summary['worst_site']}, "
                 f"{summary['mean_ensemble_auc']:.3f} on average (msbt ensemble makes it one checkpoint). Quote these, "
                 "not the internal AUC or one seed")
    return lines
