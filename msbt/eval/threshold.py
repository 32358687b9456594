"""How much to trust a decision threshold: its bootstrap spread, and flags for tied or saturated scores.

A Youden threshold picked on a few dozen validation images swings between reruns (0.366, 0.072 and
0.046 were measured on BUSI for one config), and a model whose validation scores are all 0.0 or 1.0
yields a "threshold" of exactly 1.000 that means nothing. These functions say so next to the number.
No TensorFlow.
"""

from __future__ import annotations

import numpy as np

from msbt.eval import metrics

SATURATION = 1e-6  # a probability this close to 0 or 1 is "saturated" (logit beyond about +-13.8)
TIED_SHARE = 0.05  # more than this share of validation scores equal to the threshold: "chosen among ties"
SATURATED_SHARE = 0.20  # more than this share of validation scores saturated: the scores are flagged


def threshold_spread(y, p, groups=None, *, rule: str = "youden", n_boot: int = 500, seed: int = 0) -> list[float]:
    """[threshold, low, high]: the rule's threshold and the 95% percentile interval of it over bootstrap
    resamples of the validation predictions (whole groups resampled, as for the metrics).

    Resamples lacking a class are skipped (the rule needs both). Returns nan bounds if none was usable.
    """
    y, p = np.asarray(y, int), np.asarray(p, float)
    point = metrics.choose_threshold(y, p, rule)
    groups = np.asarray(groups) if groups is not None else np.arange(len(y))
    names, codes = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(codes == k) for k in range(len(names))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        drawn = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        yb = y[drawn]
        if yb.min() == yb.max():
            continue
        values.append(metrics.choose_threshold(yb, p[drawn], rule))
    if not values:
        return [float(point), float("nan"), float("nan")]
    low, high = np.quantile(values, [0.025, 0.975])
    return [float(point), float(low), float(high)]


def threshold_flags(p_val, threshold: float, what: str = "validation") -> list[str]:
    """Warnings about a threshold chosen on ``what`` scores ``p_val`` (empty when none applies)."""
    p = np.asarray(p_val, float)
    flags = []
    if threshold <= SATURATION or threshold >= 1 - SATURATION:
        flags.append(f"threshold {threshold:.6g} lies on a saturated score (within {SATURATION:g} of 0 or 1): "
                     f"the {what} scores do not separate there, so the threshold is arbitrary")
    at = int(np.sum(np.abs(p - threshold) <= 1e-12)) if len(p) else 0
    tied = at / len(p) if len(p) else 0.0
    # A threshold chosen among the scores always equals one of them: ties need two images at least (one image
    # of 14 is 7%, and the flag fired on every small validation split)
    if at >= 2 and tied > TIED_SHARE:
        flags.append(f"threshold chosen among tied scores: {tied:.0%} of {what} images score exactly "
                     f"{threshold:.6g}")
    saturated = float(np.mean((p <= SATURATION) | (p >= 1 - SATURATION))) if len(p) else 0.0
    if saturated > SATURATED_SHARE:
        flags.append(f"{saturated:.0%} of {what} scores are saturated (0 or 1 to within {SATURATION:g}): an "
                     "overconfident model; its probabilities are not calibrated")
    return flags


def logit(p, eps: float = 1e-12) -> np.ndarray:
    """log(p / (1 - p)), clipped at eps so that p = 0 or 1 gives a large finite value, not inf.

    Prefer the model's own pre-sigmoid output where available (msbt.eval.external reads it); this is
    for probabilities already written to a file."""
    p = np.clip(np.asarray(p, float), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def out_of_fold_threshold(folds, fold_thresholds, *, rule: str = "youden", seed: int = 0) -> dict:
    """The decision threshold chosen on pooled out-of-fold predictions of a cross-validation.

    Every train+val image is scored once, by the fold model that did not train on it, so the rule sees
    all of them instead of one validation split's few dozen lesions: a steadier choice for the recipe.

    Args:
        folds: One ``{"y", "p", "group"}`` per fold: its held-out images' labels, probabilities, groups.
        fold_thresholds: Each fold model's own validation threshold (their range is the rerun-to-rerun
            swing a single run's threshold has).
        rule: The threshold rule (msbt.eval.metrics.choose_threshold).

    Returns:
        ``{"threshold", "ci95": [t, low, high] over group bootstrap resamples of the pooled predictions,
        "images", "groups", "fold_thresholds", "fold_range": [min, max], "flags"}``.
    """
    y = np.concatenate([np.asarray(f["y"], int) for f in folds])
    p = np.concatenate([np.asarray(f["p"], float) for f in folds])
    groups = np.concatenate([np.asarray([f"{i}:{g}" for g in f["group"]]) for i, f in enumerate(folds)])
    spread = threshold_spread(y, p, groups, rule=rule, seed=seed)
    return {"threshold": spread[0], "ci95": spread, "images": int(len(y)), "groups": int(len(np.unique(groups))),
            "rule": rule, "fold_thresholds": [float(t) for t in fold_thresholds],
            "fold_range": [float(min(fold_thresholds)), float(max(fold_thresholds))],
            "flags": threshold_flags(p, spread[0], "out-of-fold")}


def at_threshold(y, p, threshold: float) -> dict:
    """Sensitivity and specificity of scores ``p`` at ``threshold`` (a decision is ``p >= threshold``)."""
    m = metrics.binary_metrics(np.asarray(y, int), np.asarray(p, float), threshold)
    return {"threshold": float(threshold), "sensitivity": float(m["sensitivity"]),
            "specificity": float(m["specificity"])}


def format_oof(oof: dict) -> str:
    """The out-of-fold threshold, its spread, and (when the main job ran) the test split at both thresholds."""
    lo, hi = (metrics.threshold_text(t) for t in oof["fold_range"])
    low, high = (metrics.threshold_text(t) for t in oof["ci95"][1:])
    text = (f"out-of-fold threshold {metrics.threshold_text(oof['threshold'])} [{low}, {high}] "
            f"({oof['rule']}, {oof['images']} images / {oof['groups']} groups, each scored by the fold model that "
            f"did not train on it); the folds' own validation thresholds range {lo}-{hi}")
    main = oof.get("main_run_test")
    if main:
        a, b = main["run_threshold"], main["oof_threshold"]
        text += (f"\nmain run's test split: sensitivity/specificity {a['sensitivity']:.3f}/{a['specificity']:.3f} at "
                 f"its validation threshold {metrics.threshold_text(a['threshold'])}, "
                 f"{b['sensitivity']:.3f}/{b['specificity']:.3f} at the out-of-fold threshold (to see the effect "
                 "only: choosing between the two by these test numbers would make the test split a validation split)")
    return text + "".join(f"\n  note: {flag}" for flag in oof.get("flags", ()))
