"""Evaluation of a binary classifier (benign 0, malignant 1) with honest uncertainty. Numpy and scipy only.

The order of work this module expects, so the reported numbers mean what they say:

1. :func:`choose_threshold` on the VALIDATION split's predictions (never the test split's);
2. :func:`binary_metrics` on the TEST split at that fixed threshold;
3. :func:`bootstrap_ci` for percentile intervals, resampling lesions/patients (``groups``) rather than
   images when a lesion has several images, because images of one lesion are not independent;
4. :func:`delong_test` (independent cases) or :func:`paired_bootstrap_auc_diff` (clustered cases) to
   compare two models scored on the same test cases;
5. :func:`summarize_folds` for k-fold cross-validation (mean and sample sd over folds).

Conventions used everywhere:

* a case is called positive (malignant) when ``p >= threshold``;
* a rate whose denominator is zero is ``nan`` (never 0 or 1): sensitivity with no malignant cases, PPV
  with no positive calls, and so on. ``auc`` is ``nan`` unless both classes are present;
* AUC is the Mann-Whitney statistic: the fraction of (malignant, benign) pairs the score orders
  correctly, a tie counting 1/2. It is exact (no ROC trapezoids over a threshold grid, no sklearn).
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Mapping, Sequence

import numpy as np

# Stable names: the same keys in every result, report and test.
METRIC_KEYS = (
    "accuracy", "auc", "sensitivity", "specificity", "ppv", "npv", "f1", "brier",
    "tp", "fp", "tn", "fn", "n", "prevalence", "threshold",
)
# The metrics that get a bootstrap interval. Counts, n and the threshold are fixed by design, not
# estimates of a population quantity, so an interval for them would mean nothing.
INTERVAL_KEYS = ("accuracy", "auc", "sensitivity", "specificity", "ppv", "npv", "f1", "brier", "prevalence")
THRESHOLD_RULES = ("youden", "sensitivity>=x", "f1")

# Bootstrap replicates are evaluated in chunks of at most this many (replicate, image) cells, which
# bounds memory to a few tens of MB whatever the test-set size.
_CHUNK_CELLS = 4_000_000


# ---------------------------------------------------------------------------------------------------
# Inputs and small helpers
# ---------------------------------------------------------------------------------------------------

def _stats():
    """scipy.stats, imported when a function here first needs it: it costs about 0.45 s, and msbt predict, stream,
    serve and the report import this module for its text helpers (threshold_text, share_text) alone."""
    from scipy import stats

    return stats


def threshold_text(value) -> str:
    """A probability or threshold as msbt prints it for a reader: 4 decimals, more where it lies within 0.001 of 0
    or 1, and a power of ten where even 12 decimals would round it to 0 or 1.

    A saturated model's threshold is often 0.0004 or 0.99987; at 3 or 4 decimals it read "0.000" or "1.000",
    which a reader takes for "every case malignant" or "none". Two significant digits of its distance to the
    nearer end are kept instead ("0.00045", "0.99987", "1.3e-13", "1 - 2.0e-13").
    """
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    if not math.isfinite(value):
        return "n/a"
    gap = min(value, 1 - value)
    if gap >= 1e-3 or gap <= 0:
        return f"{value:.4f}"
    if gap < 1e-10:  # 12 decimals would show 0.000000000000 or 1.000000000000
        return f"{value:.1e}" if value < 0.5 else f"1 - {gap:.1e}"
    return f"{value:.{1 - math.floor(math.log10(gap))}f}"



def share_text(value: float) -> str:
    """A share as a percentage that reads 0% or 100% only when it is: 0.996 of images called malignant is
    "99.6%", not "100%" (which says every image was)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    digits = 0
    while digits < 2 and 0 < value < 1 and round(100 * value, digits) in (0, 100):
        digits += 1
    if 0 < value < 1 and round(100 * value, digits) in (0, 100):  # closer than 0.005% to either end
        return "<0.01%" if value < 0.5 else ">99.99%"
    return f"{100 * value:.{digits}f}%"


def _check_inputs(y, p, *, probabilities: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return (y as int 0/1, p as float) after checking shape and values; raise ValueError otherwise."""
    y_arr, p_arr = np.asarray(y), np.asarray(p, dtype=float)
    if y_arr.ndim != 1 or p_arr.shape != y_arr.shape:
        raise ValueError(f"y and p must be 1-D of equal length, got shapes {y_arr.shape} and {p_arr.shape}")
    if y_arr.size == 0:
        raise ValueError("no cases to evaluate")
    if not np.isin(y_arr, (0, 1)).all():
        raise ValueError("labels must be 0 (benign) or 1 (malignant)")
    if not np.isfinite(p_arr).all():
        raise ValueError("scores must be finite (a NaN score would silently count as benign)")
    if probabilities and ((p_arr < 0).any() or (p_arr > 1).any()):
        raise ValueError("probabilities must lie in [0, 1]")
    return y_arr.astype(np.int64), p_arr


def _ratio(num, den):
    """num / den elementwise, nan where den == 0 (an undefined rate, not a zero one)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _rate(num: float, den: float) -> float:
    """Scalar num / den, nan when den == 0."""
    return float(_ratio(num, den))


def _group_codes(groups, n: int) -> np.ndarray:
    """Integer code 0..G-1 per case; each case is its own group when ``groups`` is None."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have one entry per case ({n}), got shape {groups.shape}")
    return np.unique(groups, return_inverse=True)[1].ravel()


# ---------------------------------------------------------------------------------------------------
# Point estimates
# ---------------------------------------------------------------------------------------------------


def roc_auc(y, p) -> float:
    """Exact ROC AUC as the Mann-Whitney statistic, ties counted 1/2.

    Args:
        y: (N,) labels, 0 benign, 1 malignant.
        p: (N,) scores (any real numbers; only their order matters).

    Returns:
        P(score of a malignant case > score of a benign case) + 1/2 P(equal), over all m*n pairs;
        nan when either class is absent (no pairs to order).
    """
    y, p = _check_inputs(y, p, probabilities=False)
    m, n = int(y.sum()), int(y.size - y.sum())
    if m == 0 or n == 0:
        return float("nan")
    # Midranks give each tied block its average rank, so a malignant case tied with a benign one
    # contributes exactly 1/2 pair. Sum of malignant midranks minus the m(m+1)/2 they would have among
    # themselves = number of correctly ordered pairs (Mann-Whitney U).
    ranks = _stats().rankdata(p, method="average")
    u = ranks[y == 1].sum() - m * (m + 1) / 2.0
    return float(u / (m * n))


def binary_metrics(y_true, p, threshold: float) -> dict[str, float]:
    """Confusion-matrix metrics at a fixed threshold, plus threshold-free AUC and Brier score.

    Args:
        y_true: (N,) labels, 0 benign, 1 malignant.
        p: (N,) predicted probability of malignancy, in [0, 1].
        threshold: a case is called malignant when ``p >= threshold``. Choose it on validation data
            (:func:`choose_threshold`), never on the data evaluated here.

    Returns:
        Dict with exactly the keys of ``METRIC_KEYS``:
        ``tp, fp, tn, fn, n`` (int counts); ``accuracy = (tp+tn)/n``;
        ``sensitivity = tp/(tp+fn)`` (nan without malignant cases);
        ``specificity = tn/(tn+fp)`` (nan without benign cases);
        ``ppv = tp/(tp+fp)`` (nan when nothing is called malignant);
        ``npv = tn/(tn+fn)`` (nan when nothing is called benign);
        ``f1 = 2tp/(2tp+fp+fn)`` (nan only when there are no malignant cases and no malignant calls);
        ``auc`` (Mann-Whitney, nan with one class); ``brier = mean((p-y)^2)``;
        ``prevalence = (tp+fn)/n``; ``threshold`` as given.
    """
    y, p = _check_inputs(y_true, p)
    pred = p >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    n = int(y.size)
    return {
        "accuracy": _rate(tp + tn, n),
        "auc": roc_auc(y, p),
        "sensitivity": _rate(tp, tp + fn),
        "specificity": _rate(tn, tn + fp),
        "ppv": _rate(tp, tp + fp),
        "npv": _rate(tn, tn + fn),
        "f1": _rate(2 * tp, 2 * tp + fp + fn),
        "brier": float(np.mean((p - y) ** 2)),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n,
        "prevalence": _rate(tp + fn, n),
        "threshold": float(threshold),
    }


# ---------------------------------------------------------------------------------------------------
# Threshold selection (validation only)
# ---------------------------------------------------------------------------------------------------


def _parse_rule(rule: str) -> tuple[str, float]:
    """'youden' -> ('youden', nan); 'sensitivity>=0.9' -> ('sensitivity', 0.9); 'f1' -> ('f1', nan)."""
    text = rule.replace(" ", "").lower()
    if text in ("youden", "f1"):
        return text, float("nan")
    if text.startswith("sensitivity>="):
        target = float(text.split(">=", 1)[1])
        if not 0.0 < target <= 1.0:
            raise ValueError(f"sensitivity target must be in (0, 1], got {target}")
        return "sensitivity", target
    raise ValueError(f"unknown threshold rule {rule!r}: use 'youden', 'f1' or e.g. 'sensitivity>=0.9'")


def choose_threshold(y_val, p_val, rule: str = "youden") -> float:
    """Choose the decision threshold on VALIDATION predictions only.

    The test split must never be used here: a threshold tuned on the test split makes its sensitivity
    and specificity optimistic, and the bootstrap intervals of :func:`bootstrap_ci` (which hold the
    threshold fixed) would not cover that optimism.

    Candidates are the distinct validation scores; with the rule ``p >= t`` every threshold between two
    adjacent scores classifies the validation set identically, so nothing is lost. The returned value
    is the validation score at which the chosen operating point starts.

    Args:
        y_val: (N,) validation labels, 0 benign, 1 malignant.
        p_val: (N,) validation probabilities.
        rule: ``"youden"``: maximise J = sensitivity + specificity - 1;
            ``"sensitivity>=x"`` (e.g. ``"sensitivity>=0.9"``): the highest threshold whose validation
            sensitivity is at least x, which is the most specific one meeting the target;
            ``"f1"``: maximise F1. Ties in J or F1 go to the lower threshold (higher sensitivity),
            because missing a cancer costs more than an unneeded biopsy.

    Returns:
        The threshold (float), to be passed to :func:`binary_metrics` on the test split.
    """
    kind, target = _parse_rule(rule)
    y, p = _check_inputs(y_val, p_val)
    m, n = int(y.sum()), int(y.size - y.sum())
    if m == 0 or (kind == "youden" and n == 0):
        raise ValueError(f"rule {rule!r} needs both classes in the validation labels (malignant={m}, benign={n})")
    # Sort descending; after the last case of each distinct score, tp/fp are the counts called positive
    # with that score as the threshold. Candidates therefore run from strictest to most lenient.
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    last_of_level = np.r_[ps[1:] != ps[:-1], True]
    thresholds = ps[last_of_level]
    tp = np.cumsum(ys)[last_of_level]
    fp = np.cumsum(1 - ys)[last_of_level]
    sensitivity = tp / m
    if kind == "sensitivity":
        # Sensitivity only grows as the threshold falls, and reaches 1 at the lowest score, so the first
        # candidate meeting the target exists and is the strictest such threshold. tp/m and the parsed
        # target are both correctly rounded, so exactly 9/10 compares equal to 0.9.
        return float(thresholds[np.argmax(sensitivity >= target)])
    if kind == "youden":
        score = sensitivity + (n - fp) / n - 1.0
    else:
        score = 2 * tp / (2 * tp + fp + (m - tp))
    # Last index of the maximum = the lowest threshold among ties (candidates are in descending order).
    # The 1e-12 slack makes mathematically equal scores tie: 1/2 + 5/6 - 1 and 1 + 2/6 - 1 are both 1/3
    # but differ in the last bits as floats.
    best = len(score) - 1 - int(np.argmax(score[::-1] >= score.max() - 1e-12))
    return float(thresholds[best])


# ---------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------


def calibration_curve(y, p, bins: int = 10, strategy: str = "uniform") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability diagram data: mean predicted probability vs observed malignant fraction per bin.

    Args:
        y: (N,) labels, 0 benign, 1 malignant.
        p: (N,) predicted probabilities in [0, 1].
        bins: number of bins.
        strategy: ``"uniform"``: edges k/bins on [0, 1]; ``"quantile"``: edges at the quantiles of p,
            so bins hold about equal numbers of cases (duplicate edges from tied scores are merged,
            which can leave fewer bins). Every bin is [lo, hi) except the last, [lo, hi]; a score
            equal to an inner edge goes to the upper bin.

    Returns:
        (mean_predicted, observed_fraction, counts), each of length = number of bins. Empty bins are
        kept (count 0, nan mean and fraction) so that bin i always means the same interval; mask with
        ``counts > 0`` to plot.
    """
    y, p = _check_inputs(y, p)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if strategy == "uniform":
        # arange(k)/bins is the correctly rounded k/bins; linspace would give 0.30000000000000004 for
        # 3/10 and put p=0.3 in the wrong bin.
        edges = np.arange(bins + 1) / bins
    elif strategy == "quantile":
        edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, bins + 1)))
        if edges.size == 1:  # every score equal: one bin holding everything
            edges = np.array([edges[0], edges[0]])
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")
    k = edges.size - 1
    index = np.searchsorted(edges[1:-1], p, side="right")
    counts = np.bincount(index, minlength=k)
    sum_p = np.bincount(index, weights=p, minlength=k)
    sum_y = np.bincount(index, weights=y.astype(float), minlength=k)
    return _ratio(sum_p, counts), _ratio(sum_y, counts), counts


# ---------------------------------------------------------------------------------------------------
# Bootstrap (image or group resampling, vectorised with integer case weights)
# ---------------------------------------------------------------------------------------------------
#
# A bootstrap resample that draws G groups with replacement is the same as giving every case the weight
# "number of times its group was drawn". Every metric here is a ratio of weighted sums, so B resamples
# become a (B, N) weight matrix and a few matrix-vector products, with no per-replicate Python loop.
# Weights are small integers, so all sums are exact in float64.


def _resample_weights(rng: np.random.Generator, codes: np.ndarray, n_boot: int) -> np.ndarray:
    """(n_boot, N) float weights: how often each case's group was drawn in each resample."""
    n_groups = int(codes.max()) + 1
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    # One bincount over all rows at once: offset row r's group ids by r * n_groups.
    flat = (draws + n_groups * np.arange(n_boot)[:, None]).ravel()
    counts = np.bincount(flat, minlength=n_boot * n_groups).reshape(n_boot, n_groups)
    return counts[:, codes].astype(float)


class _AucPlan:
    """Sorting done once so the weighted Mann-Whitney AUC of many weight vectors costs O(B N)."""

    def __init__(self, y: np.ndarray, p: np.ndarray):
        self.order = np.argsort(p, kind="stable")
        ps, ys = p[self.order], y[self.order]
        new_level = np.r_[True, ps[1:] != ps[:-1]]
        starts = np.flatnonzero(new_level)
        ends = np.r_[starts[1:], ps.size]
        level = np.cumsum(new_level) - 1
        self.pos = np.flatnonzero(ys == 1)  # malignant cases, positions in sorted order
        self.neg = ys == 0
        # For each malignant case: its tie block is sorted[start:end]; benign weight below = C[start],
        # tied = C[end] - C[start], with C the exclusive cumulative sum of benign weight.
        self.start, self.end = starts[level[self.pos]], ends[level[self.pos]]

    def __call__(self, w: np.ndarray) -> np.ndarray:
        ws = w[:, self.order]
        wneg = ws * self.neg
        cum = np.zeros((ws.shape[0], ws.shape[1] + 1))
        np.cumsum(wneg, axis=1, out=cum[:, 1:])
        below, tied = cum[:, self.start], cum[:, self.end] - cum[:, self.start]
        wpos = ws[:, self.pos]
        correct_pairs = np.sum(wpos * (below + 0.5 * tied), axis=1)
        return _ratio(correct_pairs, wpos.sum(axis=1) * wneg.sum(axis=1))


def _weighted_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float, w: np.ndarray, auc: _AucPlan
) -> dict[str, np.ndarray]:
    """The ``INTERVAL_KEYS`` metrics for each row of case weights ``w`` (B, N); same definitions as
    :func:`binary_metrics` (a row of ones reproduces it)."""
    pred = p >= threshold
    tp = w @ (pred & (y == 1)).astype(float)
    fp = w @ (pred & (y == 0)).astype(float)
    tn = w @ (~pred & (y == 0)).astype(float)
    fn = w @ (~pred & (y == 1)).astype(float)
    total = tp + fp + tn + fn
    return {
        "accuracy": _ratio(tp + tn, total),
        "auc": auc(w),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "brier": _ratio(w @ (p - y) ** 2, total),
        "prevalence": _ratio(tp + fn, total),
    }


def _bootstrap_replicates(y, groups, n_boot: int, seed: int, evaluate) -> dict[str, np.ndarray]:
    """Run ``evaluate(w)`` over n_boot group-resampling weight rows, in memory-bounded chunks."""
    codes = _group_codes(groups, y.size)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // y.size)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_boot, chunk):
        parts.append(evaluate(_resample_weights(rng, codes, min(chunk, n_boot - start))))
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def _percentile_interval(name: str, values: np.ndarray, alpha: float) -> tuple[float, float]:
    """(low, high) percentile interval of the replicates where the metric is defined."""
    defined = values[~np.isnan(values)]
    if defined.size == 0:
        return float("nan"), float("nan")
    if defined.size < values.size:
        # e.g. a resample with no malignant case has no sensitivity. Dropping those replicates conditions
        # the interval on the metric being defined; say so rather than hide it.
        warnings.warn(
            f"{name}: undefined in {values.size - defined.size} of {values.size} bootstrap resamples; "
            "its interval uses the others",
            RuntimeWarning,
            stacklevel=3,
        )
    low, high = np.quantile(defined, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(
    y,
    p,
    threshold: float,
    groups=None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """Percentile bootstrap intervals for every rate in ``binary_metrics`` at a fixed threshold.

    Args:
        y: (N,) test labels, 0 benign, 1 malignant.
        p: (N,) test probabilities.
        threshold: fixed threshold chosen on validation data (the interval does not include the
            uncertainty of that choice).
        groups: optional (N,) lesion or patient id per image. When given, whole groups are resampled with
            replacement (a cluster bootstrap), because images of one lesion are correlated and
            resampling images would make intervals too narrow. None: each image is its own group.
        n_boot: number of resamples.
        alpha: 1 - confidence level; the interval is the [alpha/2, 1 - alpha/2] quantiles.
        seed: seed of the resampling; the same inputs and seed give identical intervals.

    Returns:
        ``{metric: (point, low, high)}`` for the keys of ``INTERVAL_KEYS``. ``point`` is the metric on
        the full data (as ``binary_metrics``), not the bootstrap mean. Resamples where a metric is
        undefined (e.g. no malignant case drawn) are left out of that metric's interval with a
        RuntimeWarning; if it is undefined in all of them the interval is (nan, nan).
    """
    y, p = _check_inputs(y, p)
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    point = binary_metrics(y, p, threshold)
    plan = _AucPlan(y, p)
    reps = _bootstrap_replicates(y, groups, n_boot, seed, lambda w: _weighted_metrics(y, p, threshold, w, plan))
    intervals = {}
    for key in INTERVAL_KEYS:  # a loop, not a comprehension, so warnings point at the caller's line
        intervals[key] = (point[key], *_percentile_interval(key, reps[key], alpha))
    return intervals


# ---------------------------------------------------------------------------------------------------
# Comparing two models on the same cases
# ---------------------------------------------------------------------------------------------------


def _placements(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components (placement values) of one score.

    V10[i] = fraction of benign cases that malignant case i outscores (ties 1/2);
    V01[j] = fraction of malignant cases that outscore benign case j (ties 1/2).
    Both average to the AUC. Computed from midranks in O(N log N) instead of the m x n pair matrix:
    a case's midrank among all cases minus its midrank within its own class counts the other class's
    cases below it, plus half those tied with it.
    """
    pos, neg = p[y == 1], p[y == 0]
    m, n = pos.size, neg.size
    ranks_all = _stats().rankdata(p, method="average")
    v10 = (ranks_all[y == 1] - _stats().rankdata(pos, method="average")) / n
    v01 = 1.0 - (ranks_all[y == 0] - _stats().rankdata(neg, method="average")) / m
    return v10, v01


def _no_spread_p(diff: float, n_boot: int | None) -> float:
    """The p-value of a difference with no variability: identical rankings (diff 0) give 1; a nonzero
    difference that no DeLong placement moves gives its limit 0, one that none of ``n_boot`` resamples moved
    the smallest p a bootstrap of that size can show, 1 / (n_boot + 1)."""
    if diff == 0:
        return 1.0
    return 0.0 if n_boot is None else 1.0 / (n_boot + 1)


def _comparison(auc_a: float, auc_b: float, se: float, diff_ci: tuple[float, float],
                n_boot: int | None = None) -> dict[str, object]:
    """Common result of the two comparisons; two-sided normal p-value of diff / se.

    ``n_boot``: the se comes from that many resamples. When none of them moved a nonzero difference, the
    p-value is given as 1 / (n_boot + 1), the smallest a resampling test of that size can show, not 0.
    """
    diff = auc_a - auc_b
    if math.isnan(se) or math.isnan(diff):
        z = p_value = float("nan")
    elif se > 0:
        z = float(diff / se)
        p_value = float(math.erfc(abs(z) / math.sqrt(2.0)))  # = 2 * (1 - Phi(|z|))
    else:
        z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        p_value = _no_spread_p(diff, n_boot)
    return {"auc_a": auc_a, "auc_b": auc_b, "diff": diff, "se": se, "z": z, "p_value": p_value, "ci": diff_ci}


def delong_test(y, p_a, p_b, alpha: float = 0.05) -> dict[str, object]:
    """DeLong's test for the difference of two correlated ROC AUCs measured on the same cases.

    DeLong ER, DeLong DM, Clarke-Pearson DL. Comparing the areas under two or more correlated receiver
    operating characteristic curves: a nonparametric approach. Biometrics 44:837-845, 1988.

    For each model r, the placements V10 (one per malignant case, m of them) and V01 (one per benign
    case, n of them) average to AUC_r. With S10 and S01 the 2x2 sample covariance matrices (ddof=1) of
    the placements across models, Cov(AUC) = S10/m + S01/n, and
    Var(AUC_a - AUC_b) = S_aa + S_bb - 2 S_ab of that matrix. z = diff / se is compared to N(0, 1).

    DeLong treats cases as independent. With several images per lesion use
    :func:`paired_bootstrap_auc_diff` with ``groups`` instead.

    Args:
        y: (N,) labels, 0 benign, 1 malignant; at least 2 of each (a sample covariance needs 2).
        p_a, p_b: (N,) scores of models a and b on the same cases (any real scores).
        alpha: the ci is diff +/- z_{1-alpha/2} se.

    Returns:
        dict with ``auc_a, auc_b, diff`` (= auc_a - auc_b), ``se``, ``z``, two-sided ``p_value`` and
        ``ci`` = (low, high) for the difference. If se is 0: z = 0 and p = 1 when diff is 0, otherwise
        z = +/-inf and p = 0.
    """
    y, p_a = _check_inputs(y, p_a, probabilities=False)
    _, p_b = _check_inputs(y, p_b, probabilities=False)
    m, n = int(y.sum()), int(y.size - y.sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least 2 malignant and 2 benign cases, got {m} and {n}")
    v10_a, v01_a = _placements(y, p_a)
    v10_b, v01_b = _placements(y, p_b)
    s10 = np.cov(np.vstack([v10_a, v10_b]), ddof=1)
    s01 = np.cov(np.vstack([v01_a, v01_b]), ddof=1)
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    se = float(math.sqrt(max(var, 0.0)))  # max(): rounding can make an exact 0 slightly negative
    auc_a, auc_b = float(v10_a.mean()), float(v10_b.mean())
    half = float(_stats().norm.ppf(1 - alpha / 2)) * se
    diff = auc_a - auc_b
    return _comparison(auc_a, auc_b, se, (diff - half, diff + half))


def paired_bootstrap_auc_diff(
    y,
    p_a,
    p_b,
    groups=None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, object]:
    """Paired bootstrap of AUC_a - AUC_b, resampling groups (lesions/patients) when given.

    Both models are evaluated on the same resample, so their correlation is kept. The p-value follows
    the bootstrap test of pROC (Robin et al., BMC Bioinformatics 12:77, 2011): z = diff / sd of the
    bootstrap differences, two-sided normal. The ci is the percentile interval of the bootstrap
    differences; near p = alpha the two can disagree slightly, since one is a normal approximation.

    Args:
        y: (N,) labels, 0 benign, 1 malignant.
        p_a, p_b: (N,) scores of the two models on the same cases.
        groups: optional (N,) lesion/patient id per image; whole groups are resampled.
        n_boot, alpha, seed: as in :func:`bootstrap_ci`.

    Returns:
        Same keys as :func:`delong_test`: ``auc_a, auc_b, diff, se, z, p_value, ci``.
    """
    y, p_a = _check_inputs(y, p_a, probabilities=False)
    _, p_b = _check_inputs(y, p_b, probabilities=False)
    if n_boot < 2 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 2 and 0 < alpha < 1, got {n_boot}, {alpha}")
    plan_a, plan_b = _AucPlan(y, p_a), _AucPlan(y, p_b)
    reps = _bootstrap_replicates(y, groups, n_boot, seed, lambda w: {"diff": plan_a(w) - plan_b(w)})
    diffs = reps["diff"]
    low, high = _percentile_interval("auc difference", diffs, alpha)
    defined = diffs[~np.isnan(diffs)]
    se = float(np.std(defined, ddof=1)) if defined.size >= 2 else float("nan")
    return _comparison(roc_auc(y, p_a), roc_auc(y, p_b), se, (low, high), n_boot=n_boot)


def bootstrap_diff_two_sets(a: Mapping, b: Mapping, keys: Sequence[str] = ("accuracy", "auc"), n_boot: int = 2000,
                            alpha: float = 0.05, seed: int = 0) -> dict[str, list[float]]:
    """Percentile intervals of metric(a) - metric(b) for two models scored on two test sets drawn from one
    collection (e.g. a naive split's test images and a group-aware split's): neither paired (other images) nor
    independent (the sets can share lesions, even images).

    Whole lesion groups are resampled from the union of both sets' groups; every image of a drawn group counts in
    whichever set holds it, so a lesion in both sets moves both metrics together in a resample. The interval
    covers the sampling of test lesions only, not the training of the two models.

    Args:
        a, b: ``{"y", "p", "group", "threshold"}``: labels, probabilities, lesion groups (one namespace for
            both sets) and the threshold each model is called at.
        keys: Metrics of :data:`INTERVAL_KEYS` to compare.
        n_boot, alpha, seed: As in :func:`bootstrap_ci`.

    Returns:
        ``{metric: [a - b, low, high]}``; resamples where a metric is undefined on either side are left out of
        its interval with a RuntimeWarning, as in :func:`bootstrap_ci`.
    """
    ya, pa = _check_inputs(a["y"], a["p"])
    yb, pb = _check_inputs(b["y"], b["p"])
    ga, gb = (np.asarray(x["group"]).astype(str) for x in (a, b))
    if ga.shape != ya.shape or gb.shape != yb.shape:
        raise ValueError("every image needs a group")
    ta, tb, na = float(a["threshold"]), float(b["threshold"]), ya.size
    plan_a, plan_b = _AucPlan(ya, pa), _AucPlan(yb, pb)

    def evaluate(w):
        ma = _weighted_metrics(ya, pa, ta, w[:, :na], plan_a)
        mb = _weighted_metrics(yb, pb, tb, w[:, na:], plan_b)
        return {k: ma[k] - mb[k] for k in keys}

    reps = _bootstrap_replicates(np.r_[ya, yb], np.r_[ga, gb], n_boot, seed, evaluate)
    point_a, point_b = binary_metrics(ya, pa, ta), binary_metrics(yb, pb, tb)
    out = {}
    for key in keys:
        out[key] = [float(point_a[key] - point_b[key]), *_percentile_interval(f"{key} difference", reps[key], alpha)]
    return out


def _stratified_aucs(sets: Mapping[str, Sequence], n_boot: int, alpha: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each named set's AUCs of one or more score vectors, and their bootstrap replicates, the set's lesion groups
    resampled on their own (set i with seed ``seed + i``: a stratified bootstrap, the sets held fixed).

    Args:
        sets: ``{name: (y, groups, p_1, ..., p_k)}``, the k score vectors on the same images of that set.

    Returns:
        ``(points (S, k), replicates (S, k, n_boot))``.

    Raises:
        ValueError: no set, a bad ``n_boot``/``alpha``, or a set (named) without both classes.
    """
    if not sets:
        raise ValueError("no set to average over")
    if n_boot < 2 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 2 and 0 < alpha < 1, got {n_boot}, {alpha}")
    points, reps = [], []
    for i, (name, (y, groups, *scores)) in enumerate(sets.items()):
        y, _ = _check_inputs(y, scores[0], probabilities=False)
        scores = [_check_inputs(y, p, probabilities=False)[1] for p in scores]
        if len(set(y.tolist())) < 2:
            raise ValueError(f"{name} holds one class only: its AUC has no value")
        plans = [_AucPlan(y, p) for p in scores]
        r = _bootstrap_replicates(y, groups, n_boot, seed + i, lambda w: {str(j): plan(w) for j, plan in enumerate(plans)})
        reps.append(np.stack([r[str(j)] for j in range(len(plans))]))
        points.append([roc_auc(y, p) for p in scores])
    return np.asarray(points), np.stack(reps)


def mean_auc_over_sets(sets: Mapping[str, Mapping], n_boot: int = 2000, alpha: float = 0.05,
                       seed: int = 0) -> list[float]:
    """The mean of several test sets' AUCs (e.g. every held-out site's) with a 95% percentile interval: each set's
    lesion groups are resampled on their own (a stratified bootstrap, the sets held fixed), and the mean is taken
    over the sets in every resample. The interval covers the sampling of lesions within these sets, not the
    choice of the sets themselves (a few sites are no sample of hospitals).

    Args:
        sets: ``{name: {"y", "p", "group"}}``, each with both classes (else ValueError naming it).
        n_boot, alpha, seed: As in :func:`bootstrap_ci`; set i is resampled with seed ``seed + i``.

    Returns:
        ``[mean, low, high]``; resamples where some set's AUC is undefined are left out (RuntimeWarning).
    """
    points, reps = _stratified_aucs({name: (s["y"], s.get("group"), s["p"]) for name, s in sets.items()},
                                    n_boot, alpha, seed)
    return [float(points[:, 0].mean()), *_percentile_interval("mean auc", reps[:, 0].mean(axis=0), alpha)]


def site_mean_auc_diff(sites: Mapping[str, Sequence], n_boot: int = 2000, alpha: float = 0.05,
                       seed: int = 0) -> dict[str, object]:
    """The mean over sites of AUC_a - AUC_b, each site's two AUCs on its own images, with the stratified bootstrap
    of :func:`mean_auc_over_sets` (both models on the same resample of a site's lesion groups).

    For "does model a beat model b at sites it never saw" over several held-out sites: every site weighs alike,
    and no site's scores are ranked against another's (under leave one site out each site was scored by a model
    of its own, whose scores need not share a scale with the others').

    Args:
        sites: ``{name: (y, p_a, p_b, groups)}``, both models scored on the same images of that site.
        n_boot, alpha, seed: as in :func:`paired_bootstrap_auc_diff`.

    Returns:
        The keys of :func:`delong_test` (``auc_a``/``auc_b`` the means over sites of each model's AUC) and
        ``sites``, the number of sites.

    Raises:
        ValueError: no site, or a site (named) without both classes.
    """
    points, reps = _stratified_aucs({name: (y, g, p_a, p_b) for name, (y, p_a, p_b, g) in sites.items()},
                                    n_boot, alpha, seed)
    diffs = (reps[:, 0] - reps[:, 1]).mean(axis=0)  # a resample where a site's AUC has no value counts as undefined
    low, high = _percentile_interval("mean AUC difference over sites", diffs, alpha)
    defined = diffs[~np.isnan(diffs)]
    se = float(np.std(defined, ddof=1)) if defined.size >= 2 else float("nan")
    mean_a, mean_b = (float(v) for v in points.mean(axis=0))
    return {**_comparison(mean_a, mean_b, se, (low, high), n_boot=n_boot), "sites": len(sites)}


def independent_difference(a: Sequence[float], b: Sequence[float], *intervals_a_b: Sequence[float] | None,
                           z: float = 1.959963984540054) -> list[float]:
    """``[a - b, low, high]`` for two estimates on independent images (e.g. one model's AUC on the other sites'
    test rows and on the held-out site), each given as ``[value, low, high]``: a normal approximation whose
    standard errors come from the widest 95% interval given for each (``intervals_a_b``: further intervals of a,
    then of b, e.g. their Wilson intervals over lesion groups, which stay wide where a bootstrap over few groups
    collapses). NaN where a value is undefined."""
    extra_a, extra_b = (list(intervals_a_b) + [None, None])[:2]

    def se(main, other) -> float:
        widths = [main[2] - main[1]] + ([other[2] - other[1]] if other is not None and all(map(math.isfinite, other))
                                        else [])
        return max(widths) / (2 * z)

    diff = float(a[0] - b[0])
    if not all(math.isfinite(x) for x in (*a, *b)):
        return [diff, float("nan"), float("nan")]
    half = z * math.hypot(se(a, extra_a), se(b, extra_b))
    return [diff, diff - half, diff + half]


def mean_of_independent(values: Sequence[float], ses: Sequence[float], dfs: Sequence[float] | None = None,
                        alpha: float = 0.05) -> list[float]:
    """``[mean, low, high]`` of estimates from independent samples (e.g. each held-out site's mean AUC over seeds,
    each with its standard error and t degrees of freedom from :func:`repeated_auc`): the mean's variance is
    sum(se^2) / S^2, and its degrees of freedom Welch-Satterthwaite's over the parts (normal without ``dfs``).
    NaN bounds where a standard error is missing or not finite."""
    values, n = [float(v) for v in values], len(values)
    if not n:
        raise ValueError("no estimates to average")
    mean = float(np.mean(values))
    if any(se is None or not math.isfinite(se) for se in ses):
        return [mean, float("nan"), float("nan")]
    var = sum(se * se for se in ses) / n ** 2
    if var == 0:
        return [mean, mean, mean]
    if dfs is None or not all(d and math.isfinite(d) for d in dfs):  # a part without finite df: normal
        q = float(_stats().norm.ppf(1 - alpha / 2))
    else:
        df = (n ** 2 * var) ** 2 / sum((se * se) ** 2 / d for se, d in zip(ses, dfs))
        q = float(_stats().t.ppf(1 - alpha / 2, df))
    half = q * math.sqrt(var)
    return [mean, mean - half, mean + half]


def p_text(p: float) -> str:
    """A p-value as printed: three decimals, and "p < 0.001" rather than a p of zero."""
    return "p < 0.001" if p < 0.0005 else f"p = {p:.3f}"


def averaged_auc_by_size(y, p_runs, max_subsets: int = 200, seed: int = 0) -> list[dict[str, float]]:
    """How the AUC of an average of models grows with the number of models averaged: for every k from 1 to the
    number of runs, the AUC of the mean probability of each subset of k runs, summarised over the subsets.

    Answers "how many training seeds are worth averaging?" from the runs at hand: where the mean stops rising
    with k, another seed adds little. The subsets of one k share runs, so their spread is a range, not an
    interval.

    Args:
        y: (N,) labels, 0 benign, 1 malignant.
        p_runs: (R, N) probabilities of R runs (e.g. training seeds) on the same cases.
        max_subsets: Where a k > 1 has more subsets than this, this many distinct ones drawn at random
            (reproducibly from ``seed``) instead of all; k = 1 always scores every run.

    Returns:
        One dict per k (1..R): ``models`` (k), ``subsets`` (how many were scored), ``auc_mean``, ``auc_min``,
        ``auc_max``. For k = 1 the mean is the runs' mean AUC; for k = R, the AUC of all runs averaged.
    """
    ps = np.asarray(p_runs, dtype=float)
    if ps.ndim != 2 or ps.shape[0] < 1:
        raise ValueError(f"p_runs: expected (runs, cases), got shape {ps.shape}")
    runs = len(ps)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(1, runs + 1):
        if k == 1 or math.comb(runs, k) <= max_subsets:
            subsets = list(itertools.combinations(range(runs), k))
        else:  # drawn without listing them all (C(30, 15) is 155 million)
            drawn: set[tuple[int, ...]] = set()
            while len(drawn) < max_subsets:
                drawn.add(tuple(sorted(int(i) for i in rng.choice(runs, k, replace=False))))
            subsets = sorted(drawn)
        aucs = [roc_auc(y, ps[list(subset)].mean(axis=0)) for subset in subsets]
        out.append({"models": k, "subsets": len(subsets), "auc_mean": float(np.mean(aucs)),
                    "auc_min": float(np.min(aucs)), "auc_max": float(np.max(aucs))})
    return out


def repeated_auc(y, p_runs, p_base=None, groups=None, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0, seed_term: bool = True) -> dict[str, object]:
    """The AUC of a design trained several times, and its difference from another design's, with both
    sources of uncertainty: which cases were sampled, and which training seed was drawn.

    Each row of ``p_runs`` is one training of the design (a seed) scored on the same N cases. The statistic
    is the mean over rows of the per-row AUC, what a user retraining the design gets on average. Its case
    uncertainty is a group bootstrap of the cases with the models fixed (every row sees the same resample);
    its seed uncertainty is the spread over rows, sd^2 / S, added in quadrature: the two-source
    decomposition of Bouthillier et al., "Accounting for variance in machine learning benchmarks", MLSys
    2021. The seed variance is estimated from few rows, so intervals and p-values use a t distribution
    with Welch-Satterthwaite degrees of freedom (the case term counted as exactly known). The spread over
    rows on fixed cases also holds the seed x case interaction, which the bootstrap counts too: that
    errs on the wide side. One row: the seed term is unknown, and only the case bootstrap is reported.

    Args:
        y: (N,) labels, 0 benign, 1 malignant.
        p_runs: (S, N) or (N,) scores of the design's S trainings.
        p_base: optional (S', N) or (N,) scores of the design compared with (the baseline); its rows need not
            pair with p_runs' rows (different designs share no training randomness worth pairing).
        groups, n_boot, alpha, seed: as in :func:`bootstrap_ci`.
        seed_term: False: conditional on these very trainings (e.g. an ensemble against its own members,
            which is a fixed function of them): case bootstrap only.

    Returns:
        ``auc`` (mean over rows), ``per_seed``, ``seed_sd`` (ddof 1; None for one row), ``ci_cases`` (percentile
        interval of the mean over the case bootstrap), ``se_cases``, ``se`` and ``ci`` (both sources, t with
        ``df`` degrees of freedom; None with one row). With ``p_base`` also ``diff`` (auc - the base's),
        ``diff_ci_cases``, ``se_cases_diff``, ``se_seed_diff`` (from the seed variances pooled over the designs
        with >= 2 rows, assumed equal, so a design with one seed borrows the other's; None when neither has
        two or without ``seed_term``), ``se_diff``, ``df_diff`` (inf on the case term alone), ``diff_ci`` (t
        interval on se_diff; the percentile case interval when there is no seed term) and ``p_value``
        (two-sided, on se_diff; as :func:`paired_bootstrap_auc_diff` for one row each).
    """
    def rows(p) -> np.ndarray:
        arr = np.asarray(p, dtype=float)
        arr = arr[None, :] if arr.ndim == 1 else arr
        for row in arr:
            _check_inputs(y, row, probabilities=False)
        return arr

    y = np.asarray(y)
    runs = rows(p_runs)
    base = rows(p_base) if p_base is not None else None
    y = _check_inputs(y, runs[0], probabilities=False)[0]
    if n_boot < 2 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 2 and 0 < alpha < 1, got {n_boot}, {alpha}")
    plans = {"a": [_AucPlan(y, r) for r in runs], "b": [_AucPlan(y, r) for r in base] if base is not None else []}
    reps = _bootstrap_replicates(
        y, groups, n_boot, seed,
        lambda w: {k: np.mean([plan(w) for plan in ps], axis=0) for k, ps in plans.items() if ps})

    def spread(arr) -> tuple[list[float], float | None]:
        aucs = [roc_auc(y, r) for r in arr]
        return aucs, float(np.std(aucs, ddof=1)) if len(aucs) > 1 else None

    def sd(values: np.ndarray) -> float:
        defined = values[~np.isnan(values)]
        return float(np.std(defined, ddof=1)) if defined.size >= 2 else float("nan")

    def t_interval(centre: float, se: float, df: float, low: float, high: float) -> tuple[float, float]:
        # cut to what the quantity can take: with two seeds (df near 1) t is 12.7 and an AUC's interval would
        # otherwise run far outside [0, 1]
        half = float(_stats().t.ppf(1 - alpha / 2, df)) * se
        return float(np.clip(centre - half, low, high)), float(np.clip(centre + half, low, high))  # NaN stays NaN

    per_seed, seed_sd = spread(runs)
    out: dict[str, object] = {
        "auc": float(np.mean(per_seed)), "per_seed": per_seed, "seed_sd": seed_sd,
        "ci_cases": _percentile_interval("auc", reps["a"], alpha), "se_cases": sd(reps["a"]),
        "se": None, "ci": None, "df": None,
    }
    if seed_sd is not None and seed_term:
        var_seed = seed_sd ** 2 / len(runs)
        se = math.sqrt(out["se_cases"] ** 2 + var_seed)
        df = se ** 4 / (var_seed ** 2 / (len(runs) - 1)) if var_seed > 0 else math.inf
        out.update(se=se, df=df, ci=t_interval(out["auc"], se, df, 0.0, 1.0))
    if base is None:
        return out
    base_aucs, base_sd = spread(base)
    diffs = reps["a"] - reps["b"]
    diff = out["auc"] - float(np.mean(base_aucs))
    se_cases = sd(diffs)
    sizes = [(len(runs), seed_sd), (len(base), base_sd)]
    dof = sum(n - 1 for n, s in sizes if n > 1)
    ci_cases = _percentile_interval("auc difference", diffs, alpha)
    if seed_term and dof:
        var_seed = sum((n - 1) * s ** 2 for n, s in sizes if n > 1) / dof * (1 / len(runs) + 1 / len(base))
        se = math.sqrt(se_cases ** 2 + var_seed)
        df = se ** 4 / (var_seed ** 2 / dof) if var_seed > 0 else math.inf
        se_seed, ci = math.sqrt(var_seed), t_interval(diff, se, df, -1.0, 1.0)
    else:
        se, df, se_seed, ci = se_cases, math.inf, None, ci_cases
    if math.isnan(se) or math.isnan(diff):
        p_value = float("nan")
    elif se > 0:
        p_value = float(2 * _stats().t.sf(abs(diff / se), df))
    else:  # no resample and no seed moved the difference
        p_value = _no_spread_p(diff, n_boot)
    out.update(diff=diff, diff_ci_cases=ci_cases, se_cases_diff=se_cases, se_seed_diff=se_seed, se_diff=se,
               df_diff=df, p_value=p_value, diff_ci=ci, base_auc=float(np.mean(base_aucs)),
               base_per_seed=base_aucs, base_seed_sd=base_sd)
    return out


# ---------------------------------------------------------------------------------------------------
# Cross-validation summary
# ---------------------------------------------------------------------------------------------------


def summarize_folds(folds: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and sample standard deviation (ddof=1) of each metric over k cross-validation folds.

    Args:
        folds: one metric dict per fold (e.g. from :func:`binary_metrics`), all with the same keys.

    Returns:
        ``{metric: (mean, sd)}``. sd is nan with a single fold. A metric that is nan in any fold gives
        (nan, nan): averaging only the folds where it happened to be defined would overstate it.
    """
    if not folds:
        raise ValueError("no folds to summarise")
    keys = list(folds[0])
    for i, fold in enumerate(folds):
        if set(fold) != set(keys):
            raise ValueError(f"fold {i} has keys {sorted(fold)}, fold 0 has {sorted(keys)}")
    summary = {}
    for key in keys:
        values = np.array([float(fold[key]) for fold in folds])
        sd = float(np.std(values, ddof=1)) if values.size > 1 else float("nan")
        summary[key] = (float(np.mean(values)), sd)
    return summary


# ---------------------------------------------------------------------------------------------------
# Curves and per-case quantities for reports (added for issue #7)
# ---------------------------------------------------------------------------------------------------


def roc_curve(y, p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The empirical ROC curve: one point per distinct score, from (0, 0) to (1, 1).

    With the rule ``p >= t``, every threshold between two adjacent distinct scores gives the same
    calls, so the distinct scores (descending) are all the operating points there are. Tied scores of
    both classes move the curve diagonally, which is why the trapezoidal area under these points equals
    :func:`roc_auc` exactly (a tie counts 1/2).

    Args:
        y: (N,) labels, 0 benign, 1 malignant; both classes needed.
        p: (N,) scores.

    Returns:
        ``(fpr, tpr, thresholds)``, each of length (distinct scores + 1). ``thresholds[0]`` is +inf (no
        case called malignant); ``thresholds[i]`` for i >= 1 is the score at which point i starts.

    Raises:
        ValueError: A class is absent (the curve's axes would be undefined).
    """
    y, p = _check_inputs(y, p, probabilities=False)
    m, n = int(y.sum()), int(y.size - y.sum())
    if m == 0 or n == 0:
        raise ValueError(f"a ROC curve needs both classes (malignant={m}, benign={n})")
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    last_of_level = np.r_[ps[1:] != ps[:-1], True]
    tp = np.cumsum(ys)[last_of_level]
    fp = np.cumsum(1 - ys)[last_of_level]
    return np.r_[0.0, fp / n], np.r_[0.0, tp / m], np.r_[np.inf, ps[last_of_level]]


def log_loss(y, p, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, with probabilities clipped to [eps, 1 - eps] as Keras clips them.

    The same number a Keras ``binary_crossentropy`` loss reports on these cases (without any L2 term
    the model adds to its training loss), so a test-split loss sits beside a ``val_loss`` on one scale.
    """
    y, p = _check_inputs(y, p)
    return float(np.mean(case_log_loss(y, p, eps)))


def case_log_loss(y: np.ndarray, p: np.ndarray, eps: float) -> np.ndarray:
    """Per-case binary cross-entropy, probabilities clipped to [eps, 1 - eps]."""
    q = np.clip(p, eps, 1.0 - eps)
    return -(y * np.log(q) + (1 - y) * np.log(1.0 - q))


def bootstrap_mean_ci(
    values,
    groups=None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval of the mean of a per-case quantity (e.g. each image's log loss).

    Resamples whole groups when ``groups`` is given, exactly as :func:`bootstrap_ci` does (same seed,
    same resamples), so a loss interval and the metric intervals of one evaluation describe the same
    resampling.

    Args:
        values: (N,) finite per-case values.
        groups, n_boot, alpha, seed: as in :func:`bootstrap_ci`.

    Returns:
        ``(mean, low, high)``.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError("values must be a non-empty 1-D array of finite numbers")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    reps = _bootstrap_replicates(values, groups, n_boot, seed, lambda w: {"mean": _ratio(w @ values, w.sum(axis=1))})
    return (float(values.mean()), *_percentile_interval("mean", reps["mean"], alpha))


def wilson_interval(rate: float, n: float, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a proportion observed as ``rate`` over ``n`` independent units.

    Used with ``n`` = the number of lesion groups behind a rate: frames of one lesion are not
    independent, so the groups, not the images, are the sample size. Unlike a percentile bootstrap it
    stays wide when the rate is 0 or 1 (5 of 5 lesions right: 0.566 to 1), where every resample
    agrees and the bootstrap interval collapses to a point.

    Args:
        rate: The observed proportion, 0..1 (may come from images; it is not rounded).
        n: Independent units behind it (> 0).
        z: Normal quantile; the default gives 95%.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when ``n`` is 0 or ``rate`` is undefined.
    """
    if not n or not np.isfinite(rate):
        return float("nan"), float("nan")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be a proportion in [0, 1], got {rate}")
    z2 = z * z
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def effective_groups(groups) -> float:
    """Kish's effective number of lesion groups behind a share of images, ``(sum c)^2 / sum c^2`` over the groups'
    image counts c: the number of groups when each holds as many images, fewer when one lesion's many frames
    dominate (a rate over 47 images of 8 lesions, 40 of them one lesion's, rests on about 1.3 lesions' worth)."""
    _, counts = np.unique(np.asarray(groups), return_counts=True)
    return float(counts.sum() ** 2 / np.sum(counts.astype(float) ** 2)) if counts.size else 0.0


def wilson_by_groups(point: Mapping[str, float], y, groups) -> dict[str, list[float]]:
    """``{rate: [value, low, high]}``: Wilson 95% intervals of accuracy, sensitivity and specificity with the
    lesion groups behind each rate as its sample size (all groups; groups with a malignant image; groups with a
    benign one), counted as Kish's effective number (:func:`effective_groups`: the plain count when every lesion
    has as many images), and of the AUC when ``point`` has one (the smaller class's: see below). ``point``
    holds the rates (from :func:`binary_metrics`)."""
    y, groups = np.asarray(y), np.asarray(groups)
    denominators = {
        "accuracy": effective_groups(groups),
        "sensitivity": effective_groups(groups[y == 1]),
        "specificity": effective_groups(groups[y == 0]),
    }
    if "auc" in point:
        # AUC's variance is at most AUC(1 - AUC) / min(malignant, benign) independent cases (Birnbaum & Klose, Ann.
        # Math. Statist. 28:933, 1957), a proportion's over that many: the Wilson interval with the smaller class's
        # effective lesion groups as n, wide where the bootstrap of few groups gives AUC 1.000 [1.000, 1.000]. With
        # the plain group count it under-covered when one lesion's frames outnumbered the others' (0.86 in a
        # simulation of 8 + 8 lesions, one with 40 frames; 1.00 with the effective count).
        denominators["auc"] = min(denominators["sensitivity"], denominators["specificity"])
    out = {}
    for name, n in denominators.items():
        value = float(point.get(name, float("nan")))
        low, high = wilson_interval(value, n)
        out[name] = [value, low, high]
    return out


FEW_GROUPS = 20  # fewer lesion groups than this behind a set of metrics: their bootstrap intervals are flagged


def few_groups_note(n_groups: int, where: str, more: str = "") -> str | None:
    """The note for metrics resting on fewer than :data:`FEW_GROUPS` lesion groups (None otherwise): a
    bootstrap over so few groups understates the uncertainty, and a rate that is right on every group gets a
    zero-width interval, so the Wilson intervals over groups are the ones to read."""
    if n_groups >= FEW_GROUPS:
        return None
    return (f"only {n_groups} lesion groups in {where}: a bootstrap over so few groups understates the uncertainty "
            f"(a rate that is right on every group gets a zero-width interval); read the Wilson intervals over "
            f"lesion groups{more}")
