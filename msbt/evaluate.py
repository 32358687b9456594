"""Evaluating a stage-2 checkpoint on the held-out test split, with the threshold chosen on validation.

The validation split picks the decision threshold (Youden's J by default); the test split is only ever
scored, once, with that threshold. Confidence intervals resample lesion groups, not images, because
frames of one lesion are not independent (msbt.metrics.bootstrap_ci).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from msbt import metrics
from msbt.preprocess import read_store


def load_stage2(checkpoint: str | Path):
    """(model, its StageConfig) of a stage-2 checkpoint; refuses a multi-class one."""
    from msbt.checkpoint import load_checkpoint
    from msbt.config import StageConfig, from_dict

    model, manifest = load_checkpoint(checkpoint)
    if len(manifest["class_names"]) != 2:
        raise ValueError(f"{checkpoint}: not a binary (stage-2) checkpoint: classes {manifest['class_names']}")
    return model, from_dict(StageConfig, manifest["config"], source=f"{checkpoint}/manifest.json")


def predict_split(model, stage, store: str | Path, split: str) -> dict[str, np.ndarray]:
    """Malignancy probabilities of one split of an ultrasound store (at the stage's own image size).

    Returns:
        `p` (N,), `y` (N,) label indices, `group` and `source` (N,) from the store.
    """
    from msbt.training import dataset_from_arrays, eval_batches

    data = read_store(store, columns=["image", "label_index", "group", "source"], split=split)
    if len(data["label_index"]) == 0:
        raise ValueError(f"{store}: no {split} rows")
    batches = eval_batches(dataset_from_arrays(data["image"], data["label_index"]), stage, num_classes=2)
    p = np.asarray(model.predict(batches, verbose=0)).reshape(-1).astype(np.float64)
    return {"p": p, "y": data["label_index"].astype(int), "group": data["group"], "source": data["source"]}


def evaluate(checkpoint: str | Path, store: str | Path, *, rule: str = "youden", n_boot: int = 2000,
             seed: int = 0) -> dict:
    """Test-split metrics with 95% group-bootstrap intervals, at a threshold chosen on validation.

    Args:
        checkpoint: A stage-2 checkpoint folder.
        store: The ultrasound store of the same run (its split is the run's split).
        rule: Threshold rule for msbt.metrics.choose_threshold, applied to validation predictions.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        JSON-able dict: threshold, rule, validation AUC, test metrics, intervals, counts.
    """
    model, stage = load_stage2(checkpoint)
    val = predict_split(model, stage, store, "val")
    test = predict_split(model, stage, store, "test")
    threshold = metrics.choose_threshold(val["y"], val["p"], rule)
    point = metrics.binary_metrics(test["y"], test["p"], threshold)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        intervals = metrics.bootstrap_ci(test["y"], test["p"], threshold, groups=test["group"], n_boot=n_boot,
                                         seed=seed)
    notes = [str(w.message) for w in caught]  # e.g. resamples without a malignant case (small test sets)
    return {
        "checkpoint": str(checkpoint),
        "threshold": float(threshold),
        "threshold_rule": rule,
        "threshold_chosen_on": "val",
        "val_auc": metrics.roc_auc(val["y"], val["p"]),
        "test": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in point.items()},
        "test_ci95": {k: [float(x) for x in v] for k, v in intervals.items()},
        "test_images": int(len(test["y"])),
        "test_groups": int(len(set(test["group"]))),
        "notes": notes,
    }


def format_report(result: dict) -> str:
    """Lines for the job log: each test metric with its 95% interval."""
    ci = result["test_ci95"]
    parts = [f"{k} {ci[k][0]:.3f} [{ci[k][1]:.3f}, {ci[k][2]:.3f}]"
             for k in ("accuracy", "auc", "sensitivity", "specificity", "ppv", "npv", "f1", "brier") if k in ci]
    lines = [f"test split ({result['test_images']} images, {result['test_groups']} lesion groups; threshold "
             f"{result['threshold']:.3g} chosen on val by {result['threshold_rule']}; 95% CIs resample groups):"]
    lines += [f"  {p}" for p in parts] + [f"  note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def write_metrics(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return path
