"""External evaluation: a trained run scored on another site's images, with what a user must know beside AUC.

For each external site (msbt.serve.external runs the model; this module scores and writes, no model):
- metrics with 95% group-bootstrap intervals at the RUN's validation threshold (msbt.eval.metrics): the
  number a deployment would see, since a new site has no labelled validation set of its own;
- threshold transfer: sensitivity/specificity at the run's threshold beside those at the site's own
  best (Youden) threshold. The latter is chosen on the very images it is scored on, so it is labelled
  optimistic: it shows what re-calibrating at the site could at most recover;
- calibration on the site (reliability bins, calibration-in-the-large = mean p - malignant share, Brier);
- a contamination check: near-duplicates of the run's train/val images in the external set, found with
  msbt.images.grouping.find_links (the code and thresholds the run's split used), excluded by default
  and counted, because a "new" site that shares images with training is not new.
No TensorFlow, no Ray.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from msbt.data.discovery import Reject, write_rejects
from msbt.eval import metrics
from msbt.eval.threshold import SATURATION, threshold_flags
from msbt.images.grouping import connected_groups, find_links

EXTERNAL_DIR = "external"
REJECTS_FILE = "rejects.csv"  # path,reason: the data step's rejects.csv, written by the same function
SCHEMA = 1
PREDICTION_COLUMNS = ("path", "relpath", "site", "group", "y", "p", "logit", "predicted", "out_of_range",
                      "excluded")
CALIBRATION_BINS = 10


def contamination(run_hashes: np.ndarray, run_thumbs: np.ndarray, run_digests: Sequence[str],
                  ext_hashes: np.ndarray, ext_thumbs: np.ndarray, ext_digests: Sequence[str], *,
                  max_distance: int = 10, min_similarity: float = 0.8) -> dict[int, int]:
    """External images that are near-duplicates of a run image: {external index: a run index it matches}.

    The two sets are searched together with :func:`msbt.images.grouping.find_links` (perceptual hash
    distance, then thumbnail correlation; byte-identical files always match) and only pairs with one
    image on each side are kept.
    """
    n = len(run_hashes)
    links = find_links(np.concatenate([np.asarray(run_hashes, np.uint64), np.asarray(ext_hashes, np.uint64)]),
                       np.concatenate([run_thumbs, ext_thumbs]), max_distance=max_distance,
                       min_similarity=min_similarity, digests=[*map(str, run_digests), *map(str, ext_digests)])
    found: dict[int, int] = {}
    for i, j in links.pairs:
        if i < n <= j:
            found.setdefault(int(j) - n, int(i))
    return found


def site_groups(hashes: np.ndarray, thumbs: np.ndarray, digests: Sequence[str], *, max_distance: int = 10,
                min_similarity: float = 0.8) -> np.ndarray:
    """Lesion groups within an external site (as the run's split groups its own images), for the bootstrap."""
    links = find_links(hashes, thumbs, max_distance=max_distance, min_similarity=min_similarity,
                       digests=list(map(str, digests)))
    return np.array([f"g{c:05d}" for c in connected_groups(len(hashes), links.pairs)])


def lesion_groups(manifest_groups: Sequence[str | None], hashes: np.ndarray, thumbs: np.ndarray,
                  digests: Sequence[str], *, max_distance: int = 10, min_similarity: float = 0.8) -> np.ndarray:
    """The lesion group of each scored image of an external site: what its intervals resample.

    As the run's own split groups under ``data.grouping: auto``: near-duplicates linked within the site (which
    always holds the frames of one DICOM cine loop together: they share the file's digest), joined with the
    manifest's group column where it names one (a patient, a lesion), so that neither two views of one patient
    nor one image under two patients' rows count as independent. A group is named by the first manifest group
    among its members in the scan's order (written to predictions.csv as given), else ``~`` and its
    near-duplicate id (``~g00001``: never to be taken for a patient called ``g00001``). Until 2026-12-07 a row
    without a manifest group was a group of its own, so a cine loop listed in a manifest without a group counted
    each frame as an independent lesion and its intervals came out too narrow (`tests/unit/test_external_groups.py`).
    """
    from msbt.data.splits import join_by

    linked = site_groups(hashes, thumbs, digests, max_distance=max_distance, min_similarity=min_similarity)
    keys = [f"group\0{g}" if g else f"row\0{i}" for i, g in enumerate(manifest_groups)]
    joined, _ = join_by(keys, [str(g) for g in linked])
    name: dict[str, str] = {}
    for given, group in zip(manifest_groups, joined):
        if given and group not in name:
            name[group] = str(given)
    return np.array([name.get(group, f"~{group}") for group in joined])


def score_site(y, p, groups, threshold: float, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Metrics of one external site at the run's threshold, threshold transfer and calibration.

    Args:
        y, p, groups: labels (0/1), probabilities and lesion groups of the site's scored images.
        threshold: the run's validation threshold.

    Returns:
        JSON-able dict: ``at_run_threshold`` ({metric: [value, low, high]}), ``wilson_groups`` (Wilson
        intervals of accuracy, sensitivity and specificity over the site's lesion groups), ``ci`` (how the
        intervals were made), ``threshold_transfer``, ``calibration``, counts and notes.
    """
    y, p, groups = np.asarray(y, int), np.asarray(p, float), np.asarray(groups)
    out: dict = {"images": int(len(y)), "groups": int(len(set(groups.tolist()))), "malignant": int(y.sum()),
                 "threshold": float(threshold), "notes": []}
    if len(y) == 0:
        out["notes"].append("no image of the site was scored; counts only")
        return out
    if y.min() == y.max():
        # One class only (a series of biopsy-proven cancers, say): its one rate at the run's threshold still
        # says something, with a Wilson interval over the site's lesion groups; AUC and the other rate cannot.
        name, hit = ("sensitivity", p >= threshold) if y[0] == 1 else ("specificity", p < threshold)
        value = float(np.mean(hit))
        out["one_class"] = {name: [value, *metrics.wilson_interval(value, out["groups"])]}
        out["called_malignant"] = float(np.mean(p >= threshold))
        out["notes"].append(f"only {'malignant' if y[0] == 1 else 'benign'} images: {name} at the run's threshold "
                            f"with a Wilson interval over the site's {out['groups']} lesion groups; AUC and "
                            f"{'specificity' if y[0] == 1 else 'sensitivity'} need both classes")
        few = metrics.few_groups_note(out["groups"], "this site")
        out["notes"] += [few] if few else []
        return out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        ci = metrics.bootstrap_ci(y, p, threshold, groups=groups, n_boot=n_boot, seed=seed)
    out["notes"] += sorted({str(w.message) for w in caught})
    out["at_run_threshold"] = {k: [float(x) for x in v] for k, v in ci.items()}
    out["ci"] = {"level": 0.95, "method": "percentile bootstrap", "resamples": int(n_boot), "seed": int(seed),
                 "unit": "group"}
    # Where the bootstrap collapses (few groups, a rate of 0 or 1 at this site) these stay honest.
    out["wilson_groups"] = metrics.wilson_by_groups(metrics.binary_metrics(y, p, threshold), y, groups)
    few = metrics.few_groups_note(out["groups"], "this site", " (wilson_groups)")
    out["notes"] += [few] if few else []
    own = metrics.choose_threshold(y, p, "youden")
    at_own = metrics.binary_metrics(y, p, own)
    out["threshold_transfer"] = {
        "run_threshold": float(threshold),
        "run": {"sensitivity": ci["sensitivity"][0], "specificity": ci["specificity"][0]},
        "site_best_threshold": float(own),
        "site_best_optimistic": {"sensitivity": float(at_own["sensitivity"]), "specificity": float(at_own["specificity"])},
        "note": "site_best is chosen on the very images it is scored on (Youden): optimistic, an upper bound "
                "of what re-choosing the threshold at this site could recover",
    }
    mean_p, observed, counts = metrics.calibration_curve(y, p, bins=CALIBRATION_BINS, strategy="uniform")
    filled = counts > 0
    out["calibration"] = {
        "strategy": "uniform", "bins": CALIBRATION_BINS, "mean_predicted": mean_p[filled].tolist(),
        "observed": observed[filled].tolist(), "counts": counts[filled].astype(int).tolist(),
        "in_the_large": float(p.mean() - y.mean()),  # > 0: the model over-calls malignancy here
        "brier": float(np.mean((p - y) ** 2)),
    }
    if at_own["sensitivity"] + at_own["specificity"] - 1 <= 1e-12:
        out["notes"].append("no threshold beats chance on this site (best Youden J = 0): the model's ranking "
                            "carries no usable signal here, whatever threshold is chosen")
    out["called_malignant"] = float(np.mean(p >= threshold))
    saturated = float(np.mean((p <= SATURATION) | (p >= 1 - SATURATION)))
    out["saturated_share"] = saturated
    # The run's threshold on a saturated score says nothing at this site either (the share of saturated scores
    # has its own note below; the tie flag concerns a threshold chosen on these scores, which this one is not).
    out["notes"] += [f for f in threshold_flags(p, threshold, what="site's") if f.startswith("threshold ")
                     and "saturated" in f]
    if saturated > 0.2:
        out["notes"].append(f"{saturated:.0%} of this site's scores are saturated (0 or 1): the model is "
                            "overconfident here; look at the logits in predictions.csv")
    return out


def write_site(folder: str | Path, result: Mapping, rows: Sequence[Mapping], rejects: Sequence[Reject] = ()) -> Path:
    """Write ``predictions.csv``, ``rejects.csv`` and ``metrics.json`` of one site atomically into ``folder``.

    ``rejects.csv`` is written even when empty, so that a list left by an earlier run never passes for this
    one's. ``metrics.json`` comes last: :func:`read_sites` takes a folder that has it as complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".predictions.csv.tmp"
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(PREDICTION_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, folder / "predictions.csv")
    write_rejects(rejects, folder / REJECTS_FILE)
    _atomic(folder / "metrics.json", json.dumps(result, indent=2, default=float) + "\n")
    return folder / "metrics.json"


def read_sites(run: str | Path) -> dict[str, dict]:
    """Every ``external/<site>/metrics.json`` of a run folder: {site: result}."""
    out = {}
    for path in sorted(Path(run).glob(f"{EXTERNAL_DIR}/*/metrics.json")):
        try:
            out[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def format_site(site: str, result: Mapping) -> list[str]:
    """Lines for the terminal: one site's numbers."""
    c = result.get("contamination", {})
    found = c.get("found", 0)
    verdict = ("not checked" if not c.get("checked") else "none found" if not found
               else f"{found} found and {'excluded' if c.get('excluded') else 'kept (--keep-duplicates)'}")
    lines = [f"site {site}: {result.get('images')} images scored ({result.get('groups')} groups, "
             f"{result.get('malignant')} malignant); near-duplicates of the run's train/val images: {verdict}"]
    rejected = result.get("rejects", 0)
    files = result.get("rejected_files", rejected)  # results written before 2026-12-07 count images only
    if rejected:
        what = (f"{rejected} file{'s' if rejected != 1 else ''} rejected (not readable or not usable as images)"
                if files == rejected else
                f"{rejected} images rejected from {files} file{'s' if files != 1 else ''} (not readable or not usable "
                "as images; a cine loop's frames count one by one)")
        lines.append(f"  {what}, listed with the reasons in {result.get('rejects_file', REJECTS_FILE)}")
    for name, (value, low, high) in (result.get("one_class") or {}).items():
        lines.append(f"  at the run's threshold {metrics.threshold_text(result['threshold'])}: {name} {value:.3f} "
                     f"[{low:.3f}, {high:.3f}] (Wilson 95% over lesion groups)")
    at = result.get("at_run_threshold")
    if at:
        lines.append(f"  at the run's threshold {metrics.threshold_text(result['threshold'])}: " + ", ".join(
            f"{k} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in at.items()
            if k in ("auc", "sensitivity", "specificity", "accuracy")))
        wilson = result.get("wilson_groups") or {}
        if wilson:
            lines.append("  Wilson 95% over lesion groups: " + ", ".join(
                f"{k} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in wilson.items()))
        t = result["threshold_transfer"]
        lines.append(f"  threshold transfer: sensitivity/specificity {t['run']['sensitivity']:.3f}/"
                     f"{t['run']['specificity']:.3f} at the run's threshold vs "
                     f"{t['site_best_optimistic']['sensitivity']:.3f}/{t['site_best_optimistic']['specificity']:.3f} "
                     f"at the site's own best {metrics.threshold_text(t['site_best_threshold'])} (optimistic)")
        cal = result["calibration"]
        lines.append(f"  calibration: mean p - malignant share {cal['in_the_large']:+.3f}, Brier {cal['brier']:.3f}; "
                     f"{metrics.share_text(result['called_malignant'])} called malignant")
    lines += [f"  warning: {w}" for w in result.get("out_of_depth", [])]
    lines += [f"  note: {n}" for n in result.get("notes", [])]
    return lines


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
