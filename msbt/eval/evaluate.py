"""Evaluating a stage-2 checkpoint on the held-out test split, with the threshold chosen on validation.

The validation split picks the decision threshold (Youden's J by default); the test split is only ever
scored, once, with that threshold. Confidence intervals resample lesion groups, not images, because
frames of one lesion are not independent (msbt.eval.metrics.bootstrap_ci).

``metrics.json`` (schema version 3, see ``docs/evaluation.md``) keeps the keys of version 1 (``threshold``,
``test``, ``test_ci95``, ...; version 3 renamed ``val_auc`` to ``val_auc_exact``) and adds the curves a
report draws (ROC points, calibration bins, the confusion matrix), the test loss and a description of the
intervals. Per-image probabilities of the
validation and test splits go to ``predictions.csv`` beside it, so a report or a paired comparison of two
models never has to load a model again.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np

from msbt.atomicio import atomic_open, write_text
from msbt.eval import metrics
from msbt.data.store import read_store
from msbt.eval.threshold import threshold_flags, threshold_spread

SCHEMA_VERSION = 3  # 3: val_auc -> val_auc_exact (training logs' val_auc is Keras' binned AUC)
PREDICTIONS_FILE = "predictions.csv"
PREDICTION_COLUMNS = ("split", "source", "group", "y", "p", "site")
_OLD_PREDICTION_COLUMNS = PREDICTION_COLUMNS[:5]  # files written before sites existed
CALIBRATION_BINS = 10


class Evaluation(dict):
    """The JSON-able result of :func:`evaluate`, carrying the per-image predictions as an attribute.

    ``predictions`` is ``{split: {"p", "y", "group", "source"}}`` (numpy arrays). It is an attribute, not
    a key, so the dict stays small and JSON-able wherever it is embedded (the run's ``summary.json``);
    :func:`write_metrics` writes it to ``predictions.csv``.
    """

    predictions: dict[str, dict[str, np.ndarray]]


def load_stage2(checkpoint: str | Path):
    """(model, its StageConfig) of a stage-2 checkpoint; refuses a multi-class one."""
    from msbt.model.checkpoint import load_checkpoint
    from msbt.config import StageConfig, from_dict

    model, manifest = load_checkpoint(checkpoint)
    if len(manifest["class_names"]) != 2:
        raise ValueError(f"{checkpoint}: not a binary (stage-2) checkpoint: classes {manifest['class_names']}")
    return model, from_dict(StageConfig, manifest["config"], source=f"{checkpoint}/manifest.json")


def predict_split(model, stage, store: str | Path, split: str) -> dict[str, np.ndarray]:
    """Malignancy probabilities of one split of an ultrasound store (at the stage's own image size).

    Returns:
        `p` (N,), `y` (N,) label indices, `group` and `source` (N,) from the store. A model with several
        outputs (e.g. an ensemble's members side by side) gives `p` of shape (outputs, N).
    """
    from msbt.train.loop import dataset_from_arrays, eval_batches

    site = ["site"] if has_column(store, "site") else []  # stores made before sites existed lack it
    data = read_store(store, columns=["image", "label_index", "group", "source", *site], split=split)
    if len(data["label_index"]) == 0:
        raise ValueError(f"{store}: no {split} rows")
    batches = eval_batches(dataset_from_arrays(data["image"], data["label_index"]), stage, num_classes=2)
    out = model.predict(batches, verbose=0)
    p = (np.stack([np.asarray(o).reshape(-1) for o in out]) if isinstance(out, (list, tuple))
         else np.asarray(out).reshape(-1)).astype(np.float64)
    n = len(data["label_index"])
    return {"p": p, "y": data["label_index"].astype(int), "group": data["group"], "source": data["source"],
            "site": data["site"] if site else np.full(n, "", dtype=object)}


def has_column(store: str | Path, name: str) -> bool:
    """Whether a store's Parquet files have column ``name`` (read from the first file's schema)."""
    from msbt.data.store import Store

    return name in Store.open(store).columns()


def score(val: dict, test: dict, *, rule: str = "youden", n_boot: int = 2000, seed: int = 0,
          class_names=("benign", "malignant")) -> dict:
    """The metrics.json content from validation and test predictions (no model, no TensorFlow).

    Args:
        val, test: ``{"p", "y", "group"}`` arrays of the two splits (as :func:`predict_split` returns).
        rule: Threshold rule for msbt.eval.metrics.choose_threshold, applied to the validation predictions only.
        n_boot: Bootstrap resamples of the test split (by group).
        seed: Bootstrap seed.
        class_names: Label order (index 0 negative), recorded for the confusion matrix.

    Returns:
        A JSON-able dict with the keys documented in docs/evaluation.md (schema version 3).
    """
    y, p, groups = np.asarray(test["y"]), np.asarray(test["p"]), np.asarray(test["group"])
    threshold = metrics.choose_threshold(val["y"], val["p"], rule)
    point = metrics.binary_metrics(y, p, threshold)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        intervals = metrics.bootstrap_ci(y, p, threshold, groups=groups, n_boot=n_boot, seed=seed)
        # Same seed and groups: the loss interval comes from the very resamples of the others.
        loss = metrics.bootstrap_mean_ci(metrics.case_log_loss(y, p, 1e-7), groups, n_boot=n_boot, seed=seed)
    notes = [str(w.message) for w in caught]  # e.g. resamples without a malignant case (small test sets)
    flags = threshold_flags(val["p"], threshold)
    notes += flags
    wilson = metrics.wilson_by_groups(point, y, groups)
    few = metrics.few_groups_note(len(set(groups.tolist())), "the test split",
                                  " (test_ci95_wilson_groups), and cross-validate (workflows/crossval.py) to use "
                                  "every lesion")
    notes += [few] if few else []
    mean_p, observed, counts = metrics.calibration_curve(y, p, bins=CALIBRATION_BINS, strategy="uniform")
    filled = counts > 0  # empty bins have no observed rate; leaving them out keeps the JSON free of NaN
    return {
        "schema_version": SCHEMA_VERSION,
        "class_names": list(class_names),
        "threshold": float(threshold),
        "threshold_rule": rule,
        "threshold_chosen_on": "val",
        # The threshold's own uncertainty: 95% interval over bootstrap resamples of the validation groups.
        "threshold_ci95": threshold_spread(val["y"], val["p"], val.get("group"), rule=rule, seed=seed),
        "threshold_flags": flags,
        # Exact (rank-based) AUC of this model on validation. Named apart from training's `val_auc`, which is
        # Keras' AUC over 200 fixed thresholds: on few, bunched scores the two differ by a few hundredths.
        "val_auc_exact": metrics.roc_auc(val["y"], val["p"]),
        "val_images": int(len(val["y"])),
        "val_groups": int(len(set(np.asarray(val["group"]).tolist()))),
        "test": {**{k: (v.item() if isinstance(v, np.generic) else v) for k, v in point.items()}, "loss": loss[0]},
        "test_ci95": {**{k: [float(x) for x in v] for k, v in intervals.items()}, "loss": [float(x) for x in loss]},
        # Wilson intervals of the rates with the lesion groups behind each as the sample size: they
        # stay honest where the bootstrap collapses (few groups, a rate of 0 or 1).
        "test_ci95_wilson_groups": wilson,
        "ci": {"level": 0.95, "method": "percentile bootstrap", "resamples": int(n_boot), "seed": int(seed),
               # "image" when every lesion group holds one image: then resampling groups is resampling images
               "unit": "group" if len(set(groups.tolist())) < len(groups) else "image"},
        "test_images": int(len(y)),
        "test_groups": int(len(set(groups.tolist()))),
        "confusion_matrix": {
            "labels": list(class_names), "rows": "true", "columns": "predicted",
            "matrix": [[point["tn"], point["fp"]], [point["fn"], point["tp"]]],
        },
        "roc_curve": _roc_points(y, p),
        "calibration": {
            "strategy": "uniform", "bins": CALIBRATION_BINS,
            "mean_predicted": mean_p[filled].tolist(), "observed": observed[filled].tolist(),
            "counts": counts[filled].astype(int).tolist(),
        },
        "notes": notes,
        **({"sites": site_metrics(test, threshold, n_boot=n_boot, seed=seed)}
           if len(set(np.asarray(test.get("site", [""])).tolist())) > 1 else {}),
    }


def site_metrics(test: dict, threshold: float, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Per-site test metrics (AUC, sensitivity, specificity with 95% group-bootstrap intervals) at one
    threshold, for a test split that holds several sites; a site without both classes gets counts only.

    Each site with both classes also gets ``wilson_groups`` (Wilson intervals of its rates over its lesion
    groups) and ``notes`` (resamples left out of an interval, and a note when it has few groups)."""
    out = {}
    sites = np.asarray(test["site"])
    for site in sorted(set(sites.tolist())):
        keep = sites == site
        y, p, g = np.asarray(test["y"])[keep], np.asarray(test["p"])[keep], np.asarray(test["group"])[keep]
        row = {"images": int(keep.sum()), "groups": int(len(set(g.tolist()))), "malignant": int(y.sum())}
        if 0 < y.sum() < len(y):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                ci = metrics.bootstrap_ci(y, p, threshold, groups=g, n_boot=n_boot, seed=seed)
            row.update({k: [float(x) for x in ci[k]] for k in ("auc", "sensitivity", "specificity", "accuracy")})
            # A small site's bootstrap collapses as the pooled split's would: the same guards as score()'s.
            row["wilson_groups"] = metrics.wilson_by_groups(metrics.binary_metrics(y, p, threshold), y, g)
            few = metrics.few_groups_note(row["groups"], f"site {site}'s test images")
            row["notes"] = sorted({str(w.message) for w in caught}) + ([few] if few else [])
        out[site] = row
    return out


def pooled_folds(folds, fold_thresholds, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """One estimate with 95% intervals from a cross-validation's held-out folds pooled.

    Every held-out image is scored by the fold model that did not train on it and called at that fold's own
    validation threshold, so the pooled calls are what the recipe does on images it has not seen; intervals
    resample whole lesion groups over all folds at once (a 5-fold mean ± sd rests on five numbers and says
    nothing of the lesions behind them). The pooled AUC ranks scores of k different models together: a
    model whose scores sit higher than another's lowers it a little, so it is slightly conservative.

    Args:
        folds: One ``{"y", "p", "group"}`` per fold (a fold's held-out predictions, as :func:`predict_split`).
        fold_thresholds: Each fold model's validation threshold, in the order of ``folds``.
        n_boot, seed: Group-bootstrap resamples and their seed.

    Returns:
        ``{"images", "groups", "auc": [point, low, high], "accuracy"|"sensitivity"|"specificity": [...],
        "wilson_groups", "notes"}``; AUC over the pooled probabilities, the rates over the pooled calls.
    """
    if len(folds) != len(fold_thresholds):
        raise ValueError(f"{len(folds)} folds but {len(fold_thresholds)} thresholds")
    y = np.concatenate([np.asarray(f["y"], int) for f in folds])
    p = np.concatenate([np.asarray(f["p"], float) for f in folds])
    # folds deal whole lesion groups, so a group is in one fold; the prefix keeps that true of odd inputs
    groups = np.concatenate([np.asarray([f"{i}:{g}" for g in f["group"]]) for i, f in enumerate(folds)])
    calls = np.concatenate([(np.asarray(f["p"], float) >= t).astype(float) for f, t in zip(folds, fold_thresholds)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        ranked = metrics.bootstrap_ci(y, p, 0.5, groups=groups, n_boot=n_boot, seed=seed)
        # the same seed and groups: the rates' resamples are the AUC's
        called = metrics.bootstrap_ci(y, calls, 0.5, groups=groups, n_boot=n_boot, seed=seed)
    out = {"images": int(len(y)), "groups": int(len(set(groups.tolist()))), "malignant": int(y.sum()),
           "auc": [float(x) for x in ranked["auc"]],
           **{key: [float(x) for x in called[key]] for key in ("accuracy", "sensitivity", "specificity")}}
    # the calls' rates, and the AUC of the scores (the calls' own "AUC" is not the one reported)
    out["wilson_groups"] = metrics.wilson_by_groups({**metrics.binary_metrics(y, calls, 0.5), "auc": out["auc"][0]},
                                                    y, groups)
    few = metrics.few_groups_note(out["groups"], "the pooled held-out folds")
    # only the reported rates' notes (a resample without a malignant case...): PPV's, or those of the ranking
    # call at its unused 0.5 threshold, are about numbers nobody is shown
    shown = ("auc", "accuracy", "sensitivity", "specificity")
    out["notes"] = sorted({str(w.message) for w in caught if str(w.message).split(":", 1)[0] in shown}) + (
        [few] if few else [])
    return out


def pooled_lines(pooled: dict) -> list[str]:
    """The pooled out-of-fold estimate in words: the number to quote from a cross-validation, then its notes."""
    def ci(key: str) -> str:
        value, low, high = pooled[key]
        return f"{key} {value:.3f} [{low:.3f}, {high:.3f}]" if np.isfinite(value) else f"{key} n/a"

    lines = [f"pooled out-of-fold ({pooled['images']} images / {pooled['groups']} lesion groups, each scored by the "
             f"fold model that did not train on it, called at that fold's validation threshold; 95% intervals over "
             f"lesion groups): {ci('auc')}, {ci('sensitivity')}, {ci('specificity')}, {ci('accuracy')}"]
    wilson = pooled.get("wilson_groups")
    if wilson:  # they stay honest where the bootstrap over few groups collapses
        lines.append("  Wilson 95% intervals over lesion groups (the effective number behind each; the AUC's, the "
                     "smaller class's): " + ", ".join(
            f"{key} [{wilson[key][1]:.3f}, {wilson[key][2]:.3f}]" for key in ("auc", "sensitivity", "specificity", "accuracy")
            if key in wilson and np.isfinite(wilson[key][0])))
    return lines + [f"  note: {note}" for note in pooled.get("notes", ())]


def _roc_points(y: np.ndarray, p: np.ndarray) -> dict:
    if len(set(y.tolist())) < 2:
        return {"fpr": [], "tpr": [], "thresholds": []}
    fpr, tpr, thresholds = metrics.roc_curve(y, p)
    # +inf is not JSON: the first point ("nothing called malignant") gets null.
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": [None, *thresholds[1:].tolist()]}


def evaluate(checkpoint: str | Path, store: str | Path, *, rule: str = "youden", n_boot: int = 2000,
             seed: int = 0) -> Evaluation:
    """Test-split metrics with 95% group-bootstrap intervals, at a threshold chosen on validation.

    Args:
        checkpoint: A stage-2 checkpoint folder.
        store: The ultrasound store of the same run (its split is the run's split).
        rule: Threshold rule for msbt.eval.metrics.choose_threshold, applied to validation predictions.
        n_boot: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        :class:`Evaluation`: the dict of :func:`score` plus ``checkpoint`` and ``scope`` (:func:`with_scope`),
        with the validation and test predictions in its ``predictions`` attribute.
    """
    from msbt.model.checkpoint import read_manifest

    model, stage = load_stage2(checkpoint)
    class_names = read_manifest(checkpoint)["class_names"]
    predictions = {split: predict_split(model, stage, store, split) for split in ("val", "test")}
    scored = score(predictions["val"], predictions["test"], rule=rule, n_boot=n_boot, seed=seed, class_names=class_names)
    train_sites = read_store(store, columns=["site"], split="train")["site"] if has_column(store, "site") else None
    result = Evaluation(checkpoint=str(checkpoint), **with_scope(scored, predictions["test"].get("site", []),
                                                                 train_sites))
    result.predictions = predictions
    return result


def with_scope(result: dict, test_sites, train_sites, *, images: str = "test images") -> dict:
    """``result`` with ``scope``: whether its test images come from sites the model trained on.

    ``internal`` (every test site is a training site, or the store has no sites: a run's own test split, whose
    split deals lesion groups, not sites) gets a note that these numbers are no estimate for another hospital;
    ``held_out`` (no test site was trained on: a leave-one-site-out fold) needs none; ``mixed`` names the sites
    never seen.

    Args:
        result: From :func:`score`.
        test_sites: Every test image's site (``""`` or nothing for a store without sites).
        train_sites: Every training image's site, or None for a store without sites.
        images: What the scored images are, in the notes ("held-out images" for cross-validation's pooled folds).
    """
    tested = sorted({str(site) for site in test_sites if str(site)})
    trained = {str(site) for site in train_sites} if train_sites is not None else set(tested)
    unseen = [site for site in tested if site not in trained]
    kind = "internal" if not unseen else "held_out" if len(unseen) == len(tested) else "mixed"
    notes = list(result.get("notes", []))
    if kind == "internal":
        where = f"{len(tested)} sites ({', '.join(tested)})" if len(tested) > 1 else "site"
        notes.append(f"internal estimate: the {images} come from the same {where} as the training images, so these "
                     "numbers do not say how the model does at another hospital (in msbt's own measurements, "
                     "docs/evaluation.md, a model trained on BUSI scored AUC 0.94 on BUSI's test split and 0.73 and "
                     "0.39 at two sites it never saw); score another site with `msbt external`, or hold each site "
                     "out with `workflows/crossval.py --by site`")
    elif kind == "mixed":
        rows = "; see the per-site rows" if images == "test images" else ""
        notes.append(f"the {images} mix sites seen in training with sites never seen ({', '.join(unseen)}): "
                     f"their numbers are neither an internal nor an external estimate{rows}")
    return {**result, "scope": {"kind": kind, "sites": tested, "unseen_sites": unseen}, "notes": notes}


# Why a rate has no value (metrics.json keeps NaN; the terminal says why rather than "nan [nan, nan]")
UNDEFINED = {"ppv": "no test image called malignant", "npv": "no test image called benign",
             "sensitivity": "no malignant test image", "specificity": "no benign test image",
             "auc": "the test split lacks a class", "f1": "no malignant image, and none called malignant"}


def format_report(result: dict) -> str:
    """Lines for the job log: each test metric with its 95% interval."""
    ci = result["test_ci95"]
    parts = [f"{k} {ci[k][0]:.3f} [{ci[k][1]:.3f}, {ci[k][2]:.3f}]" if np.isfinite(ci[k][0])
             else f"{k} undefined ({UNDEFINED.get(k, 'a zero denominator')})"
             for k in ("accuracy", "auc", "sensitivity", "specificity", "ppv", "npv", "f1", "brier", "loss")
             if k in ci]
    # threshold_text: ".3g" printed a saturated model's 0.9996 as "threshold 1", as if nothing below 1 were called
    lines = [f"test split ({result['test_images']} images, {result['test_groups']} lesion groups; threshold "
             f"{metrics.threshold_text(result['threshold'])} chosen on val by {result['threshold_rule']}; "
             "95% CIs resample "
             f"{result.get('ci', {}).get('unit', 'group')}s):"]
    lines += [f"  {p}" for p in parts]
    if "val_auc_exact" in result:
        lines.append(f"  validation: val_auc_exact {result['val_auc_exact']:.4f} ({result.get('val_images')} images; "
                     "exact, where training's val_auc is Keras' binned estimate)")
    wilson = result.get("test_ci95_wilson_groups", {})
    if wilson:
        lines.append("  Wilson 95% over lesion groups: " + ", ".join(
            f"{k} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in wilson.items()))
    lines += [f"  note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def write_metrics(result: dict, path: str | Path) -> Path:
    """Write ``metrics.json``; an :class:`Evaluation`'s predictions go to ``predictions.csv`` beside it."""
    path = Path(path)
    predictions = getattr(result, "predictions", None)
    if predictions:
        written = write_predictions(predictions, path.parent / PREDICTIONS_FILE)
        result = {**result, "predictions_file": written.name}
    write_text(path, json.dumps(result, indent=2, default=float) + "\n")
    return path


def write_predictions(predictions: dict[str, dict[str, np.ndarray]], path: str | Path) -> Path:
    """One CSV row per image: split, source (path relative to the data root), group, y (label index), p."""
    path = Path(path)
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS)
        for split, data in predictions.items():
            sites = data.get("site", [""] * len(data["p"]))
            for source, group, y, p, site in zip(data["source"], data["group"], data["y"], data["p"], sites):
                writer.writerow([split, source, group, int(y), repr(float(p)), site])
    return path


def read_predictions(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """``predictions.csv`` back as ``{split: {"source", "group", "y", "p"}}``.

    Raises:
        ValueError: A missing file or a header other than :data:`PREDICTION_COLUMNS`, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no predictions file (run the evaluation first)")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) not in (PREDICTION_COLUMNS, _OLD_PREDICTION_COLUMNS):
            raise ValueError(f"{path}: expected columns {','.join(PREDICTION_COLUMNS)}, got {reader.fieldnames}")
        rows = list(reader)
    out: dict[str, dict[str, list]] = {}
    for row in rows:
        cols = out.setdefault(row["split"], {"source": [], "group": [], "y": [], "p": [], "site": []})
        for key in cols:
            cols[key].append(row.get(key, ""))
    return {split: {"source": np.asarray(c["source"]), "group": np.asarray(c["group"]),
                    "y": np.asarray(c["y"], dtype=int), "p": np.asarray(c["p"], dtype=float),
                    "site": np.asarray(c["site"])}
            for split, c in out.items()}
