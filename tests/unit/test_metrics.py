"""msbt.eval.metrics against hand-computed values, brute force, and simulated coverage. No Ray, no TensorFlow."""

import json
import math
import time
import warnings

import numpy as np
import pytest
from scipy import stats

from msbt.eval import metrics as M

# A fixed small test split. Rule: malignant call when p >= 0.5.
#   index:  0    1    2    3    4    5    6    7
Y8 = np.array([1, 1, 1, 0, 0, 0, 0, 1])
P8 = np.array([0.9, 0.7, 0.4, 0.6, 0.2, 0.1, 0.5, 0.5])


def brute_auc(y, p):
    """Fraction of (malignant, benign) pairs ordered correctly, ties 1/2, by looping over every pair."""
    pos, neg = p[y == 1], p[y == 0]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return total / (len(pos) * len(neg))


def binormal(rng, n, d, prevalence=0.5):
    """Labels ~ Bernoulli(prevalence); score ~ N(d*y, 1) mapped to a probability with 0.5 at score d/2.

    Truth: AUC = Phi(d / sqrt 2); at threshold 0.5 sensitivity = specificity = accuracy = Phi(d / 2).
    """
    y = (rng.random(n) < prevalence).astype(int)
    p = stats.norm.cdf(rng.normal(d * y, 1.0) - d / 2)
    return y, p


# ----------------------------------------------------------------------------- binary_metrics, AUC


def test_binary_metrics_by_hand():
    # pred = [1, 1, 0, 1, 0, 0, 1, 1]  (0.5 >= 0.5 is a malignant call)
    # tp: idx 0, 1, 7 -> 3   fn: idx 2 -> 1   fp: idx 3, 6 -> 2   tn: idx 4, 5 -> 2
    m = M.binary_metrics(Y8, P8, 0.5)
    assert tuple(m) == M.METRIC_KEYS
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (3, 2, 2, 1, 8)
    assert m["accuracy"] == pytest.approx(5 / 8)  # (3 + 2) / 8
    assert m["sensitivity"] == pytest.approx(3 / 4)  # 3 / (3 + 1)
    assert m["specificity"] == pytest.approx(2 / 4)  # 2 / (2 + 2)
    assert m["ppv"] == pytest.approx(3 / 5)  # 3 / (3 + 2)
    assert m["npv"] == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert m["f1"] == pytest.approx(2 / 3)  # 2*3 / (2*3 + 2 + 1) = 6/9
    assert m["prevalence"] == pytest.approx(1 / 2)  # 4 / 8
    # (p - y)^2: .01 .09 .36 .36 .04 .01 .25 .25 -> sum 1.37, / 8
    assert m["brier"] == pytest.approx(0.17125)
    # malignant [.9 .7 .4 .5] vs benign [.6 .2 .1 .5], 16 pairs:
    # .9 -> 4, .7 -> 4, .4 -> 2 (beats .2 .1), .5 -> 2 + 1/2 (beats .2 .1, ties .5) ; 12.5 / 16
    assert m["auc"] == pytest.approx(12.5 / 16)
    assert m["threshold"] == 0.5


def test_auc_is_fraction_of_correctly_ordered_pairs_with_ties_half():
    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        y[:2] = [0, 1]
        p = np.round(rng.random(40), 1)  # one decimal: many ties, within and across classes
        assert M.roc_auc(y, p) == pytest.approx(brute_auc(y, p), abs=1e-12)
    # All tied: every pair counts 1/2.
    assert M.roc_auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == 0.5
    # Perfect and reversed order.
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert M.roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0


def test_edge_cases_are_nan_not_zero():
    # Only benign cases, nothing called malignant: no sensitivity, AUC, PPV or F1 to speak of.
    m = M.binary_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)
    for key in ("sensitivity", "auc", "ppv", "f1"):
        assert math.isnan(m[key]), key
    assert m["specificity"] == 1.0 and m["npv"] == 1.0 and m["accuracy"] == 1.0
    # Everything called malignant: NPV undefined, PPV = prevalence.
    m = M.binary_metrics([0, 1, 1, 0], [0.6, 0.7, 0.8, 0.9], 0.5)
    assert math.isnan(m["npv"]) and m["ppv"] == 0.5 and m["specificity"] == 0.0
    # Only malignant cases: specificity and AUC undefined.
    m = M.binary_metrics([1, 1], [0.2, 0.9], 0.5)
    assert math.isnan(m["specificity"]) and math.isnan(m["auc"]) and m["sensitivity"] == 0.5


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="0 \\(benign\\) or 1"):
        M.binary_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="finite"):
        M.binary_metrics([0, 1], [0.1, np.nan], 0.5)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        M.binary_metrics([0, 1], [0.1, 1.2], 0.5)
    with pytest.raises(ValueError, match="equal length"):
        M.binary_metrics([0, 1, 1], [0.1, 0.2], 0.5)


# ----------------------------------------------------------------------------- choose_threshold

# Validation split. Candidates t (call p >= t), counting tp of 3 malignant and fp of 3 benign:
#   t     tp fp  sens  spec  J     F1 = 2tp/(2tp+fp+fn)
#   0.80  1  0   1/3   1     1/3   2/4  = .500
#   0.60  2  0   2/3   1     2/3   4/5  = .800
#   0.40  2  1   2/3   2/3   1/3   4/6  = .667
#   0.35  3  1   1     2/3   2/3   6/7  = .857
#   0.30  3  2   1     1/3   1/3   6/8  = .750
#   0.10  3  3   1     0     0     6/9  = .667
Y_VAL = np.array([0, 0, 1, 0, 1, 1])
P_VAL = np.array([0.1, 0.3, 0.35, 0.4, 0.6, 0.8])


def test_choose_threshold_by_hand():
    # J ties at 2/3 between 0.60 and 0.35: the tie goes to the lower threshold (sensitivity 1).
    assert M.choose_threshold(Y_VAL, P_VAL, "youden") == 0.35
    assert M.choose_threshold(Y_VAL, P_VAL, "f1") == 0.35
    # Highest threshold with sensitivity >= x: 2/3 >= 0.6 at 0.60; >= 0.9 needs 0.35.
    assert M.choose_threshold(Y_VAL, P_VAL, "sensitivity>=0.6") == 0.6
    assert M.choose_threshold(Y_VAL, P_VAL, "sensitivity>=0.9") == 0.35
    assert M.choose_threshold(Y_VAL, P_VAL, "sensitivity >= 1") == 0.35
    # Move the benign 0.4 below 0.35: J at 0.35 becomes 1 + 1 - 1 = 1, a unique maximum.
    assert M.choose_threshold(Y_VAL, [0.1, 0.3, 0.35, 0.32, 0.6, 0.8], "youden") == 0.35
    # Equal J that floats round differently: 2 malignant, 6 benign.
    #   t = 0.9: tp 1, fp 1 -> J = 1/2 + 5/6 - 1 = 1/3 (float 0.33333333333333350)
    #   t = 0.5: tp 2, fp 4 -> J = 1   + 2/6 - 1 = 1/3 (float 0.33333333333333326)
    # Still a tie, so the lower threshold wins.
    y = [1, 0, 1, 0, 0, 0, 0, 0]
    p = [0.9, 0.9, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1]
    assert M.choose_threshold(y, p, "youden") == 0.5
    # Sensitivity exactly 9/10 satisfies '>= 0.9' (at 0.92, 9 of the 10 malignant scores .91..1.0).
    y = np.r_[np.ones(10, int), np.zeros(10, int)]
    p = np.r_[np.linspace(0.91, 1.0, 10), np.linspace(0.0, 0.5, 10)]
    assert M.choose_threshold(y, p, "sensitivity>=0.9") == pytest.approx(0.92)


def test_youden_threshold_maximises_j_over_all_cut_points():
    rng = np.random.default_rng(11)
    y, p = binormal(rng, 300, 1.2)
    chosen = M.choose_threshold(y, p, "youden")

    def youden(t):
        m = M.binary_metrics(y, p, t)
        return m["sensitivity"] + m["specificity"] - 1

    best = max(youden(t) for t in np.unique(p))
    assert youden(chosen) == pytest.approx(best, abs=1e-12)
    assert chosen in p  # an observed validation score


def test_choose_threshold_refusals():
    with pytest.raises(ValueError, match="unknown threshold rule"):
        M.choose_threshold(Y_VAL, P_VAL, "accuracy")
    with pytest.raises(ValueError, match="both classes"):
        M.choose_threshold([0, 0, 0], [0.1, 0.2, 0.3], "youden")


# ----------------------------------------------------------------------------- calibration_curve


def test_calibration_uniform_by_hand():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.12, 0.55, 0.95, 1.0])
    # 2 bins [0, .5), [.5, 1]: {.05 .15 .12 | y 0 0 1} and {.55 .95 1.0 | y 1 1 0}; 1.0 is in the last bin.
    mean_p, frac, counts = M.calibration_curve(y, p, bins=2)
    np.testing.assert_allclose(mean_p, [0.32 / 3, 2.5 / 3])
    np.testing.assert_allclose(frac, [1 / 3, 2 / 3])
    np.testing.assert_array_equal(counts, [3, 3])
    # 4 bins: [0,.25) 3 cases, [.25,.5) empty -> nan kept in place, [.5,.75) {.55}, [.75,1] {.95, 1}.
    mean_p, frac, counts = M.calibration_curve(y, p, bins=4)
    np.testing.assert_array_equal(counts, [3, 0, 1, 2])
    assert math.isnan(mean_p[1]) and math.isnan(frac[1])
    np.testing.assert_allclose(frac[[0, 2, 3]], [1 / 3, 1.0, 1 / 2])
    np.testing.assert_allclose(mean_p[[2, 3]], [0.55, 0.975])
    # A score on an edge goes to the upper bin, even where k/10 is not exact in binary (0.3, 0.7).
    _, _, counts = M.calibration_curve([0, 1, 0], [0.3, 0.7, 0.0], bins=10)
    np.testing.assert_array_equal(np.flatnonzero(counts), [0, 3, 7])


def test_calibration_quantile_by_hand():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.12, 0.55, 0.95, 1.0])
    # sorted p = .05 .12 .15 .55 .95 1.0; tertile edges by linear interpolation at positions 5/3, 10/3:
    # .12 + 2/3 * .03 = .14 and .55 + 1/3 * .40 = .6833 -> bins {.05 .12} {.15 .55} {.95 1.0}
    mean_p, frac, counts = M.calibration_curve(y, p, bins=3, strategy="quantile")
    np.testing.assert_array_equal(counts, [2, 2, 2])
    np.testing.assert_allclose(mean_p, [0.085, 0.35, 0.975])
    np.testing.assert_allclose(frac, [0.5, 0.5, 0.5])  # y: {0 1} {0 1} {1 0}
    # Heavily tied scores: duplicate quantile edges merge into fewer bins, none empty.
    _, _, counts = M.calibration_curve([0, 1, 0, 1, 1], [0.2, 0.2, 0.2, 0.2, 0.9], bins=4, strategy="quantile")
    assert counts.sum() == 5 and (counts > 0).all()


# ----------------------------------------------------------------------------- bootstrap_ci


def test_weighted_metrics_equal_metrics_on_the_repeated_sample():
    # The bootstrap engine evaluates resamples as integer case weights; a weight of k must mean the
    # same as repeating the case k times and calling binary_metrics.
    rng = np.random.default_rng(5)
    y, p = binormal(rng, 60, 1.0)
    p = np.round(p, 1)  # ties
    w = rng.integers(0, 4, size=(6, 60)).astype(float)
    got = M._weighted_metrics(y, p, 0.5, w, M._AucPlan(y, p))
    for b in range(6):
        idx = np.repeat(np.arange(60), w[b].astype(int))
        want = M.binary_metrics(y[idx], p[idx], 0.5)
        for key in M.INTERVAL_KEYS:
            assert got[key][b] == pytest.approx(want[key], abs=1e-12), key


def test_bootstrap_is_deterministic_for_a_seed_and_points_match():
    rng = np.random.default_rng(0)
    y, p = binormal(rng, 150, 1.0)
    a = M.bootstrap_ci(y, p, 0.5, n_boot=200, seed=7)
    b = M.bootstrap_ci(y, p, 0.5, n_boot=200, seed=7)
    c = M.bootstrap_ci(y, p, 0.5, n_boot=200, seed=8)
    assert a == b
    assert a != c
    assert tuple(a) == M.INTERVAL_KEYS
    point = M.binary_metrics(y, p, 0.5)
    for key, (est, low, high) in a.items():
        assert est == point[key]
        assert low <= est <= high, key
        assert low < high, key


def test_bootstrap_coverage_binormal():
    # 400 simulated test splits of n=200 from a model with known truth; a 95% interval should contain
    # the truth in about 95% of them. Binomial sd over 400 reps is ~1.1 points, so 90..99 allows for the
    # percentile bootstrap's known slight under-coverage (~93.5% measured over 2 x 1000 reps) plus noise.
    d = 1.5
    truth = {"auc": stats.norm.cdf(d / math.sqrt(2)), "accuracy": stats.norm.cdf(d / 2),
             "sensitivity": stats.norm.cdf(d / 2), "specificity": stats.norm.cdf(d / 2), "prevalence": 0.5}
    rng = np.random.default_rng(2024)
    hits = {key: 0 for key in truth}
    hits_half = 0
    reps, reps_half = 400, 100
    for rep in range(reps):
        y, p = binormal(rng, 200, d)
        ci = M.bootstrap_ci(y, p, 0.5, n_boot=300, seed=rep)
        for key, value in truth.items():
            hits[key] += ci[key][1] <= value <= ci[key][2]
        if rep < reps_half:
            # A 50% interval must cover ~50%: shows the coverage count can tell intervals apart.
            half = M.bootstrap_ci(y, p, 0.5, n_boot=300, alpha=0.5, seed=rep)["auc"]
            hits_half += half[1] <= truth["auc"] <= half[2]
    coverage = {key: float(h / reps) for key, h in hits.items()}
    print("95% coverage", coverage, "| 50% interval auc coverage", hits_half / reps_half)
    for key, value in coverage.items():
        assert 0.90 <= value <= 0.99, (key, value)
    assert 0.35 <= hits_half / reps_half <= 0.65


def test_group_bootstrap_on_duplicated_images():
    # Each of 60 lesions imaged 5 times identically. Resampling images treats 300 cases as independent
    # and gives intervals about sqrt(5) too narrow; resampling lesions must give exactly the intervals of
    # the 60 distinct cases (same seed: lesion counts -> image weights, and ratios ignore the factor 5).
    rng = np.random.default_rng(9)
    y, p = binormal(rng, 60, 1.0)
    y5, p5, lesion = np.repeat(y, 5), np.repeat(p, 5), np.repeat(np.arange(60), 5)
    by_image = M.bootstrap_ci(y5, p5, 0.5, n_boot=500, seed=1)
    by_lesion = M.bootstrap_ci(y5, p5, 0.5, groups=lesion, n_boot=500, seed=1)
    distinct = M.bootstrap_ci(y, p, 0.5, n_boot=500, seed=1)
    for key in M.INTERVAL_KEYS:
        np.testing.assert_allclose(by_lesion[key], distinct[key], rtol=0, atol=1e-12, err_msg=key)
        width_image, width_lesion = by_image[key][2] - by_image[key][1], by_lesion[key][2] - by_lesion[key][1]
        assert width_lesion > 1.6 * width_image, (key, width_lesion, width_image)
    # Group labels may be strings (lesion ids from file names).
    named = M.bootstrap_ci(y5, p5, 0.5, groups=np.char.add("L", lesion.astype(str)), n_boot=500, seed=1)
    assert named["auc"][0] == by_lesion["auc"][0]


def test_group_bootstrap_keeps_coverage_where_image_bootstrap_fails():
    # 50 lesions x 4 correlated images (lesion effect sd 1, image noise sd 0.3). Population image-level
    # AUC: a malignant image minus a benign one from another lesion ~ N(d, 2 * (1 + 0.09)).
    d, lesions, per = 1.5, 50, 4
    truth = stats.norm.cdf(d / math.sqrt(2 * 1.09))
    rng = np.random.default_rng(77)
    hit_img = hit_grp = 0
    reps = 150
    for rep in range(reps):
        y_lesion = (rng.random(lesions) < 0.5).astype(int)
        score = np.repeat(rng.normal(d * y_lesion, 1.0), per) + rng.normal(0, 0.3, lesions * per)
        y, p, g = np.repeat(y_lesion, per), stats.norm.cdf(score - d / 2), np.repeat(np.arange(lesions), per)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rare one-class resamples of 50 lesions
            img = M.bootstrap_ci(y, p, 0.5, n_boot=300, seed=rep)["auc"]
            grp = M.bootstrap_ci(y, p, 0.5, groups=g, n_boot=300, seed=rep)["auc"]
        hit_img += img[1] <= truth <= img[2]
        hit_grp += grp[1] <= truth <= grp[2]
    print("clustered AUC coverage: image bootstrap", hit_img / reps, "group bootstrap", hit_grp / reps)
    assert hit_img / reps < 0.85
    assert hit_grp / reps >= 0.88


def test_bootstrap_warns_when_a_metric_is_undefined_in_resamples():
    y = np.array([1, 0, 0, 0, 0, 0, 0, 0])  # one malignant case: often absent from a resample
    p = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.1, 0.2, 0.3])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ci = M.bootstrap_ci(y, p, 0.5, n_boot=100)
    # Resamples without the malignant case (about (7/8)^8 = 34%) have no sensitivity, AUC, PPV or F1.
    flagged = sorted(str(w.message).split(":")[0] for w in caught if issubclass(w.category, RuntimeWarning))
    assert flagged == ["auc", "f1", "ppv", "sensitivity"]
    assert ci["sensitivity"] == (1.0, 1.0, 1.0)


def test_bootstrap_speed_2000_resamples_of_1000_images():
    rng = np.random.default_rng(0)
    y, p = binormal(rng, 1000, 1.0)
    start = time.perf_counter()
    M.bootstrap_ci(y, p, 0.5, n_boot=2000)
    assert time.perf_counter() - start < 2.0


# ----------------------------------------------------------------------------- DeLong, paired bootstrap

# 3 malignant, 2 benign cases, two models.
Y5 = np.array([1, 0, 1, 1, 0])
PA5 = np.array([0.8, 0.5, 0.6, 0.4, 0.2])
PB5 = np.array([0.7, 0.6, 0.3, 0.5, 0.3])


def brute_placements(y, p):
    """V10, V01 from the full pair matrix psi = 1 (correct order), 1/2 (tie), 0."""
    pos, neg = p[y == 1], p[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)


def test_delong_by_hand():
    # Model a: malignant [.8 .6 .4], benign [.5 .2]
    #   V10 = [1, 1, 1/2] (0.4 beats only 0.2)      V01 = [2/3, 1]      AUC_a = 2.5/3 = 5/6
    # Model b: malignant [.7 .3 .5], benign [.6 .3]
    #   V10 = [1, 1/4, 1/2] (0.3: loses to .6, ties .3)  V01 = [1/3, 5/6]  AUC_b = 1.75/3 = 7/12
    # S10 (ddof 1, m = 3): var_a = (1/36 + 1/36 + 4/36)/2 = 1/12; var_b = (25+16+1)/144/2 = 7/48;
    #   cov = ((1/6)(5/12) + (1/6)(-4/12) + (-1/3)(-1/12))/2 = 1/48
    # S01 (ddof 1, n = 2): var_a = 2/36 = 1/18; var_b = 2/16 = 1/8; cov = 2 * (1/6)(1/4) = 1/12
    # Var(diff) = (1/12 + 7/48 - 2/48)/3 + (1/18 + 1/8 - 2/12)/2 = (3/16)/3 + (1/72)/2 = 1/16 + 1/144 = 5/72
    for y, p, v10, v01 in ((Y5, PA5, [1, 1, 0.5], [2 / 3, 1]), (Y5, PB5, [1, 0.25, 0.5], [1 / 3, 5 / 6])):
        got10, got01 = M._placements(y, p)
        np.testing.assert_allclose(got10, v10)
        np.testing.assert_allclose(got01, v01)
    r = M.delong_test(Y5, PA5, PB5)
    assert r["auc_a"] == pytest.approx(5 / 6)
    assert r["auc_b"] == pytest.approx(7 / 12)
    assert r["diff"] == pytest.approx(0.25)
    assert r["se"] == pytest.approx(math.sqrt(5 / 72))
    assert r["z"] == pytest.approx(0.25 / math.sqrt(5 / 72))  # 0.948683
    assert r["p_value"] == pytest.approx(2 * stats.norm.sf(0.25 / math.sqrt(5 / 72)))  # 0.3428
    half = 1.959963984540054 * math.sqrt(5 / 72)
    assert r["ci"] == pytest.approx((0.25 - half, 0.25 + half))


def test_delong_matches_brute_force_placements():
    rng = np.random.default_rng(4)
    y, pa = binormal(rng, 80, 1.0)
    pb = np.round(pa + rng.normal(0, 0.2, 80), 1)  # correlated, with ties
    m, n = y.sum(), (1 - y).sum()
    a10, a01 = brute_placements(y, pa)
    b10, b01 = brute_placements(y, pb)
    for got, want in zip(M._placements(y, pb), (b10, b01)):
        np.testing.assert_allclose(got, want, atol=1e-12)
    # The sample variance of a difference is S_aa + S_bb - 2 S_ab, computed here without covariances.
    var = np.var(a10 - b10, ddof=1) / m + np.var(a01 - b01, ddof=1) / n
    r = M.delong_test(y, pa, pb)
    assert r["auc_a"] == pytest.approx(brute_auc(y, pa)) and r["auc_b"] == pytest.approx(brute_auc(y, pb))
    assert r["se"] == pytest.approx(math.sqrt(var), rel=1e-10)


def test_delong_identical_models_and_clear_winner():
    rng = np.random.default_rng(6)
    y, p = binormal(rng, 200, 1.0)
    same = M.delong_test(y, p, p)
    assert same["diff"] == 0 and same["z"] == 0 and same["p_value"] == 1.0
    # A monotone transform ranks identically: same AUC, p = 1.
    assert M.delong_test(y, p, p ** 3)["p_value"] == 1.0
    good = stats.norm.cdf(rng.normal(3.0 * y, 1.0))  # AUC ~0.98 vs ~0.76
    clear = M.delong_test(y, good, p)
    assert clear["diff"] > 0.15 and clear["p_value"] < 1e-6 and clear["ci"][0] > 0


def test_delong_null_p_values_are_roughly_uniform():
    # Two equally good, correlated models: a valid test rejects at 5% about 5% of the time.
    rng = np.random.default_rng(12)
    pvals = []
    for _ in range(300):
        y = (rng.random(120) < 0.5).astype(int)
        shared = rng.normal(size=120)
        pa = 1.0 * y + shared + rng.normal(0, 0.7, 120)
        pb = 1.0 * y + shared + rng.normal(0, 0.7, 120)
        pvals.append(M.delong_test(y, pa, pb)["p_value"])
    pvals = np.array(pvals)
    print("DeLong null: rejection rate", np.mean(pvals < 0.05), "mean p", pvals.mean())
    assert 0.02 <= np.mean(pvals < 0.05) <= 0.09
    assert 0.4 <= pvals.mean() <= 0.6
    assert stats.kstest(pvals, "uniform").pvalue > 0.01


def test_paired_bootstrap_agrees_with_delong_and_respects_groups():
    rng = np.random.default_rng(8)
    y, pa = binormal(rng, 300, 1.2)
    pb = stats.norm.cdf(stats.norm.ppf(pa) + rng.normal(0, 0.8, 300))
    dl = M.delong_test(y, pa, pb)
    bs = M.paired_bootstrap_auc_diff(y, pa, pb, n_boot=2000, seed=0)
    assert bs["diff"] == pytest.approx(dl["diff"])
    assert bs["se"] == pytest.approx(dl["se"], rel=0.15)  # two estimates of the same standard error
    assert set(bs) == set(dl)
    assert bs == M.paired_bootstrap_auc_diff(y, pa, pb, n_boot=2000, seed=0)  # deterministic
    # Duplicated images: lesion resampling reproduces the distinct-case result; image resampling is narrower.
    y4, a4, b4, g = np.repeat(y, 4), np.repeat(pa, 4), np.repeat(pb, 4), np.repeat(np.arange(300), 4)
    grouped = M.paired_bootstrap_auc_diff(y4, a4, b4, groups=g, n_boot=500, seed=3)
    distinct = M.paired_bootstrap_auc_diff(y, pa, pb, n_boot=500, seed=3)
    naive = M.paired_bootstrap_auc_diff(y4, a4, b4, n_boot=500, seed=3)
    assert grouped["se"] == pytest.approx(distinct["se"], rel=1e-9)
    assert grouped["se"] > 1.6 * naive["se"]


def test_site_mean_auc_diff_averages_each_sites_own_difference_and_resamples_within_sites():
    """compare --by site's answer over all held-out sites: each site's AUC difference on its own images (its
    own model's scores), averaged; with one site it is that site's paired group bootstrap, resample for resample."""
    rng = np.random.default_rng(3)
    parts = []
    for shift in (0.0, 3.0):  # the second site's scores sit on another scale altogether
        y = rng.integers(0, 2, 80)
        p_a = rng.normal(1.2 * y, 1.0) + shift
        p_b = rng.normal(0.6 * y, 1.0) + shift
        parts.append((y, p_a, p_b, np.arange(80) // 2))  # two images per lesion
    one = M.site_mean_auc_diff({"a": parts[0]}, n_boot=400, seed=5)
    paired = M.paired_bootstrap_auc_diff(*parts[0][:3], groups=parts[0][3], n_boot=400, seed=5)
    assert (one["diff"], one["ci"], one["sites"]) == (pytest.approx(paired["diff"]), paired["ci"], 1)
    both = M.site_mean_auc_diff(dict(zip("ab", parts)), n_boot=400, seed=5)
    per_site = [M.roc_auc(y, a) - M.roc_auc(y, b) for y, a, b, _ in parts]
    assert both["diff"] == pytest.approx(np.mean(per_site)) and both["sites"] == 2
    assert both["auc_a"] == pytest.approx(np.mean([M.roc_auc(y, a) for y, a, _, _ in parts]))
    assert both["ci"][0] < both["diff"] < both["ci"][1] and 0 <= both["p_value"] <= 1
    # pooling the two sites' images instead ranks one site's scores against the other's: another number
    pooled = M.roc_auc(np.r_[parts[0][0], parts[1][0]], np.r_[parts[0][1], parts[1][1]]) - M.roc_auc(
        np.r_[parts[0][0], parts[1][0]], np.r_[parts[0][2], parts[1][2]])
    assert abs(pooled - both["diff"]) > 0.01
    with pytest.raises(ValueError, match="held-out site b holds one class only"):  # named, not "site 2 of 2"
        M.site_mean_auc_diff({"held-out site a": parts[0], "held-out site b": (np.zeros(4, int), np.arange(4.0),
                                                                                  np.arange(4.0), np.arange(4))})
    with pytest.raises(ValueError, match="no set"):
        M.site_mean_auc_diff({})
    with pytest.raises(ValueError, match="n_boot >= 2"):  # it was an IndexError in mean_auc_over_sets
        M.mean_auc_over_sets({"a": {"y": parts[0][0], "p": parts[0][1], "group": parts[0][3]}}, n_boot=0)
    # the mean AUC over sites is the same stratified bootstrap (one function under both)
    mean = M.mean_auc_over_sets({k: {"y": y, "p": a, "group": g} for k, (y, a, _, g) in zip("ab", parts)},
                                n_boot=400, seed=5)
    assert mean[0] == pytest.approx(both["auc_a"])


def test_delong_refuses_too_few_cases():
    with pytest.raises(ValueError, match="at least 2"):
        M.delong_test([1, 0, 0], [0.9, 0.1, 0.2], [0.8, 0.2, 0.1])


# ----------------------------------------------------------------------------- summarize_folds


def test_summarize_folds_by_hand():
    folds = [{"accuracy": 0.8, "auc": 0.90}, {"accuracy": 0.9, "auc": 0.85}, {"accuracy": 0.7, "auc": 0.95}]
    s = M.summarize_folds(folds)
    # accuracy: mean .8; deviations 0, .1, -.1 -> sd = sqrt((0 + .01 + .01) / (3 - 1)) = 0.1
    assert s["accuracy"] == pytest.approx((0.8, 0.1))
    # auc: mean .9; deviations 0, -.05, .05 -> sd = sqrt(.005 / 2) = 0.05
    assert s["auc"] == pytest.approx((0.9, 0.05))
    one = M.summarize_folds([{"auc": 0.9}])
    assert one["auc"][0] == 0.9 and math.isnan(one["auc"][1])
    undefined = M.summarize_folds([{"ppv": 0.5}, {"ppv": float("nan")}])
    assert all(math.isnan(v) for v in undefined["ppv"])
    with pytest.raises(ValueError, match="keys"):
        M.summarize_folds([{"auc": 0.9}, {"acc": 0.9}])
    # Works on whole binary_metrics dicts.
    full = M.summarize_folds([M.binary_metrics(Y8, P8, 0.5), M.binary_metrics(Y8, P8, 0.45)])
    assert set(full) == set(M.METRIC_KEYS) and full["n"] == (8.0, 0.0)


# ----------------------------------------------------------------------------- roc_curve, log_loss, mean CI


def test_roc_curve_by_hand():
    # Distinct scores of P8, descending, with the cases at each (malignant m = 4, benign n = 4):
    #   .9 M  .7 M  .6 B  .5 B+M  .4 M  .2 B  .1 B
    fpr, tpr, thresholds = M.roc_curve(Y8, P8)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 4, 2 / 4, 2 / 4, 3 / 4, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 4, 2 / 4, 2 / 4, 3 / 4, 1, 1, 1])
    assert thresholds[0] == np.inf
    np.testing.assert_allclose(thresholds[1:], [0.9, 0.7, 0.6, 0.5, 0.4, 0.2, 0.1])
    # Each point is binary_metrics at its threshold (the same p >= t rule).
    for f, t, th in zip(fpr[1:], tpr[1:], thresholds[1:]):
        m = M.binary_metrics(Y8, P8, th)
        assert (f, t) == pytest.approx((1 - m["specificity"], m["sensitivity"]))
    # The tie at .5 moves the curve diagonally, so the trapezoid area is the Mann-Whitney AUC, 12.5/16.
    assert np.trapezoid(tpr, fpr) == pytest.approx(12.5 / 16) == M.roc_auc(Y8, P8)
    with pytest.raises(ValueError, match="both classes"):
        M.roc_curve([1, 1], [0.2, 0.3])


def test_roc_curve_area_equals_auc_on_random_tied_scores():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200), 1)  # 11 score levels: many ties across classes
    fpr, tpr, _ = M.roc_curve(y, p)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.roc_auc(y, p))
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all() and (fpr[-1], tpr[-1]) == (1, 1)


def test_log_loss_by_hand():
    # -(ln .8 + ln(1 - .4)) / 2
    assert M.log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    # A confident miss is clipped at 1e-7 as Keras clips it: -ln(1e-7) = 16.118...
    assert M.log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7))
    assert M.log_loss([0, 1], [0.0, 1.0]) == pytest.approx(-math.log(1 - 1e-7))


def test_bootstrap_mean_ci_matches_a_loop_over_the_same_resamples():
    values = np.array([0.1, 0.4, 0.4, 2.0, 0.3, 0.9])
    groups = np.array(["a", "b", "b", "c", "d", "d"])  # 4 groups; b and d hold two images each
    point, low, high = M.bootstrap_mean_ci(values, groups, n_boot=500, seed=3)
    assert point == pytest.approx(values.mean())
    # The same draws by hand: 500 rows of 4 group indices (codes in sorted order a, b, c, d).
    draws = np.random.default_rng(3).integers(0, 4, size=(500, 4))
    members = [[0], [1, 2], [3], [4, 5]]
    means = [np.mean([values[i] for g in row for i in members[g]]) for row in draws]
    assert (low, high) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert M.bootstrap_mean_ci(np.full(5, 0.7), n_boot=50) == pytest.approx((0.7, 0.7, 0.7))
    with pytest.raises(ValueError, match="finite"):
        M.bootstrap_mean_ci([0.1, np.nan])


# ----------------------------------------------------------------------------- metrics.json (msbt.eval.evaluate)


def test_metrics_json_schema_from_fixed_predictions(tmp_path):
    from msbt.eval import evaluate as E

    # Validation picks the threshold: Youden on this set is 0.6 (J = 1); the test set is only scored.
    val = {"y": np.array([0, 0, 1, 1]), "p": np.array([0.2, 0.4, 0.6, 0.9]), "group": np.array(["v1", "v2", "v3", "v4"])}
    groups = np.array(["a", "a", "b", "c", "d", "d", "e", "f"])
    test = {"y": Y8, "p": P8, "group": groups, "source": np.array([f"{i}.png" for i in range(8)])}
    r = E.score(val, test, n_boot=300, seed=1)
    assert r["schema_version"] == 3 and r["threshold"] == 0.6 and r["threshold_chosen_on"] == "val"
    # at 0.6: calls [1 1 0 1 0 0 0 0] -> tp 2 (idx 0, 1), fp 1 (idx 3), fn 2 (idx 2, 7), tn 3
    assert r["confusion_matrix"]["matrix"] == [[3, 1], [2, 2]]
    assert r["test"]["npv"] == pytest.approx(3 / 5) and r["test"]["ppv"] == pytest.approx(2 / 3)
    assert r["test"]["loss"] == pytest.approx(M.log_loss(Y8, P8)) == r["test_ci95"]["loss"][0]
    assert set(r["test_ci95"]) == set(M.INTERVAL_KEYS) | {"loss"}
    assert (r["test_images"], r["test_groups"], r["val_images"], r["ci"]["unit"]) == (8, 6, 4, "group")
    fpr, tpr, thresholds = M.roc_curve(Y8, P8)
    assert r["roc_curve"]["fpr"] == fpr.tolist() and r["roc_curve"]["tpr"] == tpr.tolist()
    assert r["roc_curve"]["thresholds"][0] is None
    # calibration keeps only filled bins: P8 falls in bins 1, 2, 4, 5 (x2), 6, 7, 9 of ten
    assert r["calibration"]["counts"] == [1, 1, 1, 2, 1, 1, 1] and sum(r["calibration"]["counts"]) == 8
    # JSON without NaN here, and a file round trip of the predictions
    result = E.Evaluation(checkpoint="ck", **r)
    result.predictions = {"val": {**val, "source": np.array(["v.png"] * 4)}, "test": test}
    E.write_metrics(result, tmp_path / "metrics.json")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["predictions_file"] == "predictions.csv" and saved["threshold"] == 0.6
    back = E.read_predictions(tmp_path / "predictions.csv")
    np.testing.assert_array_equal(back["test"]["p"], P8)
    np.testing.assert_array_equal(back["test"]["group"], groups)
    assert list(back) == ["val", "test"] and back["val"]["y"].tolist() == [0, 0, 1, 1]
    (tmp_path / "bad.csv").write_text("path,p\nx,0.1\n")
    with pytest.raises(ValueError, match="bad.csv: expected columns"):
        E.read_predictions(tmp_path / "bad.csv")


def test_a_runs_own_test_split_is_marked_internal_and_a_held_out_site_is_not():
    """A run's own test metrics come from the sites it trained on: said in metrics.json and in a note, so the
    numbers are not read as what another hospital would see. A site the model never trained on (a
    leave-one-site-out fold) is marked held out, without that note."""
    from msbt.eval import evaluate as E

    val = {"y": np.array([0, 0, 1, 1]), "p": np.array([0.2, 0.4, 0.6, 0.9]), "group": np.array(["v1", "v2", "v3", "v4"])}
    test = {"y": Y8, "p": P8, "group": np.arange(8).astype(str)}
    scored = E.score(val, test, n_boot=50)
    one = E.with_scope(scored, [], None)  # a store without sites
    assert one["scope"] == {"kind": "internal", "sites": [], "unseen_sites": []}
    assert one["notes"][-1].startswith("internal estimate: the test images come from the same site as the training")
    assert "msbt external" in one["notes"][-1] and "crossval.py --by site" in one["notes"][-1]
    sites = np.array(["busi", "breast"] * 4)
    two = E.with_scope(scored, sites, np.array(["breast", "busi", "busi"]))
    assert two["scope"]["kind"] == "internal" and two["scope"]["sites"] == ["breast", "busi"]
    assert "same 2 sites (breast, busi)" in two["notes"][-1]
    assert "internal estimate" in E.format_report(two)  # on the console as well
    held = E.with_scope(scored, sites, np.array(["mendeley"] * 3))
    assert held["scope"] == {"kind": "held_out", "sites": ["breast", "busi"], "unseen_sites": ["breast", "busi"]}
    assert held["notes"] == scored["notes"]
    mixed = E.with_scope(scored, sites, np.array(["busi"]))
    assert mixed["scope"]["kind"] == "mixed" and "never seen (breast)" in mixed["notes"][-1]


def test_the_auc_interval_over_lesion_groups_covers_when_one_lesion_has_most_frames():
    """8 malignant and 8 benign lesions, one malignant lesion with 40 near-identical frames: counting groups
    (8 and 8) the AUC's Wilson interval covered the true AUC in 0.86 of samples; with Kish's effective number
    per class it covers at least 95% (simulated; the truth is the mean AUC over many samples)."""
    rng = np.random.default_rng(1)

    def draw():
        ys, ps, gs = [], [], []
        for g in range(16):
            mu = rng.normal(1.0 if g < 8 else 0.0, 1.0)
            k = 40 if g == 0 else 1
            ys += [int(g < 8)] * k
            ps += list(1 / (1 + np.exp(-(mu + rng.normal(0, 0.05, k)))))
            gs += [g] * k
        return np.array(ys), np.array(ps), np.array(gs)

    truth = np.mean([M.roc_auc(*draw()[:2]) for _ in range(3000)])
    covered = 0
    for _ in range(400):
        y, p, g = draw()
        low, high = M.wilson_by_groups(M.binary_metrics(y, p, 0.5), y, g)["auc"][1:]
        covered += low <= truth <= high
    assert covered / 400 >= 0.95


def test_the_gap_of_two_aucs_on_independent_images_takes_the_wider_interval_of_each():
    """Leave one site out printed "gap -0.818" beside an internal AUC of 2 images: now with an interval whose
    standard errors come from the wider of each AUC's bootstrap and Wilson-over-groups intervals."""
    z = 1.959963984540054
    diff, low, high = M.independent_difference([0.9, 0.8, 1.0], [0.7, 0.6, 0.8])
    assert diff == pytest.approx(0.2) and high - low == pytest.approx(2 * math.hypot(0.2, 0.2) / 2)
    # a collapsed bootstrap interval (few groups) is widened by its Wilson interval
    collapsed = M.independent_difference([1.0, 1.0, 1.0], [0.7, 0.6, 0.8], [1.0, 0.4, 1.0], None)
    assert collapsed[2] - collapsed[1] == pytest.approx(2 * z * math.hypot(0.6 / (2 * z), 0.2 / (2 * z)))
    assert all(math.isnan(x) for x in M.independent_difference([float("nan")] * 3, [0.7, 0.6, 0.8])[1:])


def test_the_mean_of_independent_estimates_adds_their_variances_over_the_count_squared():
    """Leave one site out over several seeds: the mean over sites of each site's mean over seeds, whose interval
    (cases and seeds) each site has; the sites' models are trained apart, so their means are independent."""
    z = stats.norm.ppf(0.975)
    mean, low, high = M.mean_of_independent([0.7, 0.8], [0.03, 0.04])
    assert mean == pytest.approx(0.75) and high - mean == pytest.approx(z * math.hypot(0.03, 0.04) / 2)
    # with t degrees of freedom (few seeds): Welch-Satterthwaite over the parts, wider than the normal interval
    t_mean, t_low, t_high = M.mean_of_independent([0.7, 0.8], [0.03, 0.04], [2.0, 2.0])
    df = (0.03 ** 2 + 0.04 ** 2) ** 2 / (0.03 ** 4 / 2 + 0.04 ** 4 / 2)
    assert t_high - t_mean == pytest.approx(stats.t.ppf(0.975, df) * math.hypot(0.03, 0.04) / 2)
    assert t_high > high
    assert all(math.isnan(x) for x in M.mean_of_independent([0.7, 0.8], [0.03, None])[1:])


def test_a_share_reads_0_or_100_percent_only_when_it_is():
    """External sites' "called malignant": 0.996 printed as "100%" read as every image called malignant."""
    assert [M.share_text(v) for v in (0.996, 0.9999, 1.0, 0.0, 0.004, 0.5, 0.123, float("nan"), 0.9999999, 1e-7)] == [
        "99.6%", "99.99%", "100%", "0%", "0.4%", "50%", "12%", "n/a", ">99.99%", "<0.01%"]


def test_wilson_interval_matches_hand_computation_and_stays_wide_at_the_edges():
    from msbt.eval.metrics import wilson_interval

    # 5 of 5: centre (1 + z^2/10) / (1 + z^2/5), half-width z/(1 + z^2/5) * sqrt(z^2/100)
    z = 1.959963984540054
    centre = (1 + z * z / 10) / (1 + z * z / 5)
    half = z / (1 + z * z / 5) * (z / 10)
    assert wilson_interval(1.0, 5) == pytest.approx((centre - half, 1.0))
    assert wilson_interval(1.0, 5)[0] == pytest.approx(0.5655, abs=1e-4)  # the textbook value
    low, high = wilson_interval(0.5, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert all(np.isnan(wilson_interval(0.5, 0)))
    with pytest.raises(ValueError):
        wilson_interval(1.5, 10)


def test_score_flags_a_test_split_of_few_groups_and_gives_group_wilson_intervals():
    from msbt.eval.evaluate import score

    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1] * 2)
    groups = np.array([f"g{i // 4}" for i in range(20)])  # 5 lesions of 4 frames
    p = np.where(y == 1, 0.9, 0.1)
    val = {"y": y, "p": p, "group": groups}
    result = score(val, {"y": y, "p": p, "group": groups}, n_boot=200)
    assert result["test"]["accuracy"] == 1.0
    assert result["test_ci95"]["accuracy"][1:] == [1.0, 1.0]  # the bootstrap collapses
    value, low, high = result["test_ci95_wilson_groups"]["accuracy"]
    assert value == 1.0 and low == pytest.approx(0.5655, abs=1e-4) and high == 1.0  # n = 5 groups
    assert any("only 5 lesion groups" in n for n in result["notes"])
    # the AUC too: its bootstrap gives 1.000 [1.000, 1.000]; its bound (Birnbaum-Klose) takes the smaller class's
    # lesion groups as n, so it stays wide, and the note's "read the Wilson intervals" covers it
    assert result["test_ci95"]["auc"][1:] == [1.0, 1.0]
    n = min(M.effective_groups(groups[y == 1]), M.effective_groups(groups[y == 0]))
    assert result["test_ci95_wilson_groups"]["auc"] == pytest.approx([1.0, *M.wilson_interval(1.0, n)])
    assert result["test_ci95_wilson_groups"]["auc"][1] < 0.7
    # lesions of unequal frame counts: the effective number (Kish), not the count of groups, is the sample size
    assert M.effective_groups(["a"] * 4 + ["b"] * 4) == 2.0 and M.effective_groups([]) == 0.0
    assert M.effective_groups(["big"] * 40 + [f"s{i}" for i in range(7)]) == pytest.approx(47 ** 2 / (1600 + 7))


def test_out_of_fold_threshold_pools_the_folds_and_reports_their_spread():
    from msbt.eval.threshold import at_threshold, out_of_fold_threshold

    rng = np.random.default_rng(0)
    folds = []
    for k in range(3):
        y = rng.integers(0, 2, 40)
        folds.append({"y": y, "p": np.clip(0.3 * y + rng.uniform(0, 0.7, 40), 0, 1),
                      "group": [f"g{i // 2}" for i in range(40)]})  # group names repeat across folds
    out = out_of_fold_threshold(folds, [0.2, 0.5, 0.4], seed=0)
    y = np.concatenate([f["y"] for f in folds])
    p = np.concatenate([f["p"] for f in folds])
    assert out["threshold"] == pytest.approx(M.choose_threshold(y, p))
    assert out["images"] == 120 and out["groups"] == 60  # groups are kept apart per fold
    assert out["ci95"][1] <= out["threshold"] <= out["ci95"][2] and out["fold_range"] == [0.2, 0.5]
    at = at_threshold(y, p, out["threshold"])
    m = M.binary_metrics(y, p, out["threshold"])
    assert (at["sensitivity"], at["specificity"]) == (m["sensitivity"], m["specificity"])


def test_pooled_folds_calls_each_fold_at_its_own_threshold_and_resamples_lesions_over_all_folds():
    """k-fold's number to quote: one AUC and rates over every held-out image with intervals over lesion groups,
    each image called at its own fold model's threshold (a pooled threshold would be a choice no fold made)."""
    from msbt.eval.evaluate import pooled_folds, pooled_lines
    from msbt.jobs.experiments import pooled_scope

    rng = np.random.default_rng(1)
    folds, thresholds = [], [0.3, 0.5, 0.7]
    for k, t in enumerate(thresholds):
        y = np.repeat(rng.integers(0, 2, 20), 3)  # three views of each lesion: one label, close scores
        p = np.repeat(np.clip(0.35 * y[::3] + rng.uniform(0, 0.65, 20), 0, 1), 3) + rng.uniform(0, 1e-3, 60)
        folds.append({"y": y, "p": np.clip(p, 0, 1), "group": np.asarray([f"f{k}g{i // 3}" for i in range(60)]),
                      "site": np.asarray(["a", "b"] * 30)})
    out = pooled_folds(folds, thresholds, n_boot=300, seed=0)
    y = np.concatenate([f["y"] for f in folds])
    p = np.concatenate([f["p"] for f in folds])
    calls = np.concatenate([f["p"] >= t for f, t in zip(folds, thresholds)])
    assert out["images"] == 180 and out["groups"] == 60 and out["malignant"] == int(y.sum())
    assert out["auc"][0] == pytest.approx(brute_auc(y, p))
    assert out["sensitivity"][0] == pytest.approx(calls[y == 1].mean())
    assert out["specificity"][0] == pytest.approx(1 - calls[y == 0].mean())
    assert out["accuracy"][0] == pytest.approx((calls == y).mean())
    for key in ("auc", "sensitivity", "specificity", "accuracy"):
        assert out[key][1] < out[key][0] < out[key][2]
    # the interval is over lesions: resampling images (each its own group) gives a narrower one
    images = pooled_folds([{**f, "group": np.arange(60) + 100 * k} for k, f in enumerate(folds)], thresholds,
                          n_boot=300, seed=0)
    assert out["auc"][2] - out["auc"][1] > images["auc"][2] - images["auc"][1]
    assert out["wilson_groups"]["sensitivity"][0] == out["sensitivity"][0]
    with pytest.raises(ValueError, match="3 folds but 2 thresholds"):
        pooled_folds(folds, thresholds[:2])
    # its scope: k-fold deals lesions, not sites, so the pooled images come from sites every fold trained on
    internal = pooled_scope(out, folds, [{"kind": "internal", "sites": ["a", "b"], "unseen_sites": []}] * 3)
    assert internal["scope"] == {"kind": "internal", "sites": ["a", "b"], "unseen_sites": []}
    text = "\n".join(pooled_lines(internal))
    assert f"180 images / 60 lesion groups" in text and "auc " in text and "note: internal estimate: the held-out" in text
    low, high = out["wilson_groups"]["sensitivity"][1:]
    assert f"smaller class's): auc [{out['wilson_groups']['auc'][1]:.3f}, {out['wilson_groups']['auc'][2]:.3f}], " \
        f"sensitivity [{low:.3f}, {high:.3f}]" in text  # the AUC's from the scores, not the calls
    assert out["wilson_groups"]["auc"][0] == out["auc"][0]
    # notes only of the numbers shown: a PPV undefined in some resamples is nobody's concern here
    few = pooled_folds([{k: v[:6] for k, v in f.items()} for f in folds], thresholds, n_boot=300, seed=0)
    assert few["notes"] and not any(note.startswith(("ppv", "npv", "f1")) for note in few["notes"])
    # a small site dealt into one fold only, never trained on by that fold's model: mixed, named
    mixed = pooled_scope(out, folds, [{"sites": ["a", "b"], "unseen_sites": ["b"]}, {}, {}])
    assert mixed["scope"]["kind"] == "mixed" and mixed["scope"]["unseen_sites"] == ["b"]
    assert "the held-out images mix sites seen in training with sites never seen (b)" in mixed["notes"][-1]
    assert "per-site rows" not in mixed["notes"][-1]  # crossval has none
    # a store without sites: internal, of one collection
    bare = pooled_scope(out, [{k: v for k, v in f.items() if k != "site"} for f in folds], [{}] * 3)
    assert bare["scope"]["kind"] == "internal" and "same site as the training" in bare["notes"][-1]


def test_loso_diff_pairs_two_runs_on_the_held_out_images(tmp_path, capsys):
    """`msbt loso-diff`: each run's held-out predictions against the first run's, on the same images."""
    import csv

    from msbt.cli import main
    from msbt.jobs.experiments import format_loso_diff, loso_diff

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    scores = {"base": 0.2 * y + rng.uniform(0, 0.8, 60), "lever": 0.6 * y + rng.uniform(0, 0.4, 60)}
    for run, p in scores.items():  # base: crossval --by site; lever: the imagenet arm of compare --by site
        folder = tmp_path / run / "loso" / ("site-a" if run == "base" else "site-a-imagenet")
        folder.mkdir(parents=True)
        rows = [{"site": "a", "checkpoint": str(folder / "stage2" / "checkpoint_0")}]
        if run == "base":
            (tmp_path / run / "loso" / "loso.json").write_text(json.dumps({"rows": rows}))
        else:
            (tmp_path / run / "loso" / "compare.json").write_text(json.dumps({"arms": {"imagenet": {"rows": rows}}}))
        with (folder / "predictions.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["split", "source", "group", "y", "p", "site"])
            order = range(59, -1, -1) if run == "lever" else range(60)  # rows in another order: paired by source
            w.writerows(["test", f"img{i}", f"g{i // 2}", y[i], p[i], "a"] for i in order)
    report = loso_diff([tmp_path / "base", f"{tmp_path / 'lever'}:imagenet"], n_boot=300)
    base, lever = report["rows"]
    assert base["auc"][0] == pytest.approx(M.roc_auc(y, scores["base"]))
    assert lever["diff_vs_first"][0] == pytest.approx(M.roc_auc(y, scores["lever"]) - M.roc_auc(y, scores["base"]))
    assert lever["diff_vs_first"][1] > 0 and lever["p_value"] < 0.05 and lever["images"] == 60
    assert lever["run"] == f"{tmp_path / 'lever'}:imagenet"
    both = loso_diff([tmp_path / "base", f"{tmp_path / 'base'}+{tmp_path / 'lever'}:imagenet"], n_boot=100)["rows"][1]
    assert "base+lever:imagenet " in format_loso_diff({"base": str(tmp_path / "base"), "rows": [both]})
    assert both["auc"][0] == pytest.approx(M.roc_auc(y, (scores["base"] + scores["lever"]) / 2))
    assert main(["loso-diff", str(tmp_path / "base"), f"{tmp_path / 'lever'}:imagenet", "--n-boot", "100"]) == 0
    assert "AUC - base" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no held-out site scored"):
        loso_diff([tmp_path / "base", tmp_path / "lever"])  # lever has only an arm's folder
    with pytest.raises(ValueError, match="more than once"):
        loso_diff([tmp_path / "base", tmp_path / "base"])
    assert main(["loso-diff", str(tmp_path / "base"), str(tmp_path / "nowhere")]) == 1
    assert "nowhere: no such run folder" in capsys.readouterr().err
    # an existing run with an arm misspelt: the arm named, not the run called missing
    assert main(["loso-diff", str(tmp_path / "base"), f"{tmp_path / 'lever'}:imagnet"]) == 1
    assert "lever:imagnet: unknown arm 'imagnet' (an arm of `compare --by site`: " in capsys.readouterr().err
    # a run stopped before its summary counts with the sites it finished
    (tmp_path / "base" / "loso" / "loso.json").unlink()
    partial = loso_diff([f"{tmp_path / 'lever'}:imagenet", tmp_path / "base"], n_boot=100)
    assert [r["site"] for r in partial["rows"]] == ["a", "a"] and partial["missing"] == {}
    with pytest.raises(ValueError, match="no arm 'scratch'"):
        loso_diff([tmp_path / "base", f"{tmp_path / 'lever'}:scratch"])


def test_the_out_of_fold_threshold_is_shown_on_the_main_runs_test_split(tmp_path):
    """crossval's oof_threshold adds the main run's test sensitivity/specificity at its own validation
    threshold and at the out-of-fold one, read from the run's metrics.json and predictions.csv."""
    import csv

    from msbt.jobs.experiments import oof_threshold

    rng = np.random.default_rng(2)
    folds = [{"y": (y := rng.integers(0, 2, 30)), "p": np.clip(0.4 * y + rng.uniform(0, 0.6, 30), 0, 1),
              "group": [f"g{i}" for i in range(30)]} for _ in range(2)]
    assert "main_run_test" not in oof_threshold(folds, [0.3, 0.5], tmp_path)  # no main run yet
    y_test = rng.integers(0, 2, 20)
    p_test = np.clip(0.4 * y_test + rng.uniform(0, 0.6, 20), 0, 1)
    (tmp_path / "metrics.json").write_text(json.dumps({"threshold": 0.25}))
    with (tmp_path / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "source", "group", "y", "p", "site"])
        w.writerows(["test", f"t{i}", f"t{i}", y_test[i], p_test[i], ""] for i in range(20))
    out = oof_threshold(folds, [0.3, 0.5], tmp_path)
    main = out["main_run_test"]
    for key, t in (("run_threshold", 0.25), ("oof_threshold", out["threshold"])):
        m = M.binary_metrics(y_test, p_test, t)
        assert main[key]["threshold"] == pytest.approx(t)
        assert (main[key]["sensitivity"], main[key]["specificity"]) == pytest.approx((m["sensitivity"], m["specificity"]))


@pytest.mark.parametrize("compare", [False, True])
def test_fresh_leave_one_site_out_removes_only_its_own_results(tmp_path, compare):
    from msbt.jobs.experiments import remove_loso_results

    names = ["site-a", "site-b", "site-a-imagenet", "site-b-imagenet", "loso.json", "sites.csv", "compare.json",
             "compare-sites.csv", "environment.json"]
    for name in names:
        (tmp_path / name).mkdir() if name.startswith("site-") else (tmp_path / name).write_text("{}")
    folders = {"site-a", "site-b", "site-a-imagenet", "site-b-imagenet"} if compare else {"site-a", "site-b"}
    remove_loso_results(tmp_path, folders, ["a", "b"], compare=compare)
    kept = sorted(p.name for p in tmp_path.iterdir())
    if compare:  # the shared design stays
        assert kept == ["environment.json", "loso.json", "site-a", "site-b", "sites.csv"]
    else:  # the other arms stay; the comparison that used this design goes
        assert kept == ["environment.json", "site-a-imagenet", "site-b-imagenet"]


def test_repeated_auc_is_the_paired_bootstrap_with_one_seed_and_adds_the_seed_spread_with_more():
    """One training each: the case bootstrap alone, numbers equal to bootstrap_ci / paired_bootstrap_auc_diff.
    Several: the mean of the seeds' AUCs, a seed term added to the case term, t intervals on few seeds."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 90)
    groups = np.arange(90) // 3

    def scores(shift, n):
        return np.stack([np.clip(shift * y + rng.uniform(0, 1 - shift, 90), 0, 1) for _ in range(n)])

    a, b = scores(0.3, 1)[0], scores(0.1, 1)[0]
    one = M.repeated_auc(y, a, b, groups=groups, n_boot=400, seed=5)
    pair = M.paired_bootstrap_auc_diff(y, a, b, groups=groups, n_boot=400, seed=5)
    assert one["diff"] == pytest.approx(pair["diff"]) and one["diff_ci"] == pytest.approx(pair["ci"])
    assert one["p_value"] == pytest.approx(pair["p_value"]) and one["se_seed_diff"] is None
    assert one["seed_sd"] is None and one["ci"] is None and one["df_diff"] == math.inf
    assert [one["auc"], *one["ci_cases"]] == pytest.approx(list(M.bootstrap_ci(y, a, 0.5, groups=groups, n_boot=400,
                                                                                  seed=5)["auc"]))
    runs, base = scores(0.3, 4), scores(0.1, 3)
    many = M.repeated_auc(y, runs, base, groups=groups, n_boot=400, seed=5)
    aucs = [M.roc_auc(y, r) for r in runs]
    assert many["auc"] == pytest.approx(np.mean(aucs)) and many["per_seed"] == pytest.approx(aucs)
    assert many["seed_sd"] == pytest.approx(np.std(aucs, ddof=1))
    assert many["diff"] == pytest.approx(np.mean(aucs) - np.mean([M.roc_auc(y, r) for r in base]))
    assert many["se_diff"] > many["se_cases_diff"] > 0 and many["se_seed_diff"] > 0  # the seeds widen it
    width = many["diff_ci"][1] - many["diff_ci"][0]
    assert width > 2 * 1.96 * many["se_diff"]  # t on few seeds: wider than the normal interval of the same se
    assert 5 < many["df_diff"] < 1e6
    # given these very trainings (seed_term=False): the case bootstrap alone, as with one seed
    fixed = M.repeated_auc(y, runs, base, groups=groups, n_boot=400, seed=5, seed_term=False)
    assert fixed["se_seed_diff"] is None and fixed["diff_ci"] == fixed["diff_ci_cases"] == many["diff_ci_cases"]
    assert fixed["p_value"] < many["p_value"]
    # one design's own interval: cases and seeds together is wider than the cases alone
    assert many["ci"][1] - many["ci"][0] > many["ci_cases"][1] - many["ci_cases"][0]
    # a single-seed design borrows the other's seed variance
    lone = M.repeated_auc(y, runs[:1], base, groups=groups, n_boot=400, seed=5)
    assert lone["se_seed_diff"] == pytest.approx(many["base_seed_sd"] * math.sqrt(1 + 1 / 3))
    with pytest.raises(ValueError, match="equal length"):
        M.repeated_auc(y, runs[:, :10])
    # two seeds (df near 1, t = 12.7): the intervals stop at what an AUC and a difference of AUCs can take
    apart = np.stack([scores(0.6, 1)[0], scores(0.0, 1)[0]])  # two seeds far apart: a wide t interval
    two = M.repeated_auc(y, apart, apart[::-1] * 0.5, groups=groups, n_boot=400, seed=5)
    assert two["auc"] + 12 * two["se"] > 1 and two["diff"] + 12 * two["se_diff"] > 1  # it would have run over
    assert 0.0 <= two["ci"][0] <= two["auc"] <= two["ci"][1] <= 1.0
    assert -1.0 <= two["diff_ci"][0] <= two["diff"] <= two["diff_ci"][1] <= 1.0


def test_a_difference_no_resample_moves_gets_the_smallest_bootstrap_p_not_zero():
    """Perfect against reversed scores: every resample gives the same AUC difference (1), so the bootstrap se
    is 0. A resampling test of B draws cannot show p below 1 / (B + 1); a p of 0 read as certainty."""
    y = np.array([0, 1] * 6)
    good, bad = y * 0.8 + 0.1, (1 - y) * 0.8 + 0.1
    pair = M.paired_bootstrap_auc_diff(y, good, bad, n_boot=99, seed=1)
    assert pair["diff"] == 1.0 and pair["se"] == 0.0 and pair["p_value"] == pytest.approx(1 / 100)
    one = M.repeated_auc(y, good, bad, n_boot=99, seed=1)
    assert one["diff"] == 1.0 and one["se_diff"] == 0.0 and one["p_value"] == pytest.approx(1 / 100)
    same = M.repeated_auc(y, good, good, n_boot=99, seed=1)
    assert same["diff"] == 0.0 and same["p_value"] == 1.0  # nothing to tell apart
    assert M.delong_test(y, good, bad)["p_value"] == 0.0  # DeLong's se is analytic: its limit stays 0
    assert M.p_text(pair["p_value"]) == "p = 0.010"


def test_an_ensembles_logit_is_that_of_its_mean_probability_also_when_saturated():
    from msbt.model.ensemble import combine_logits

    z = np.array([[-3.0, 0.5, 40.0, -800.0, 800.0], [1.0, -2.0, 35.0, -790.0, 700.0]])
    out = combine_logits(z)
    assert np.isfinite(out).all()
    mean = (1 / (1 + np.exp(-z[:, :2]))).mean(axis=0)
    np.testing.assert_allclose(out[:2], np.log(mean / (1 - mean)), rtol=1e-12)
    assert out[2] == pytest.approx(np.log(2) - np.log(np.exp(-40.0) + np.exp(-35.0)))  # both near 1: still ranked
    assert out[3] == pytest.approx(-790 - np.log(2) + np.log1p(np.exp(-10.0)), abs=1e-9)
    assert out[4] == pytest.approx(700 + np.log(2), abs=1e-9)


def test_averaged_auc_by_size_scores_every_subset_of_runs():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 80)
    runs = np.clip(0.3 * y + rng.uniform(0, 0.7, (4, 80)), 0, 1)  # four noisy runs: averaging them helps
    out = M.averaged_auc_by_size(y, runs)
    assert [(e["models"], e["subsets"]) for e in out] == [(1, 4), (2, 6), (3, 4), (4, 1)]
    single = [M.roc_auc(y, p) for p in runs]
    assert out[0]["auc_mean"] == pytest.approx(np.mean(single))
    assert (out[0]["auc_min"], out[0]["auc_max"]) == (min(single), max(single))
    pairs = [M.roc_auc(y, (runs[i] + runs[j]) / 2) for i in range(4) for j in range(i + 1, 4)]
    assert out[1]["auc_mean"] == pytest.approx(np.mean(pairs)) and out[1]["auc_max"] == pytest.approx(max(pairs))
    assert out[3]["auc_mean"] == pytest.approx(M.roc_auc(y, runs.mean(axis=0))) and out[3]["auc_min"] == out[3]["auc_max"]
    assert out[0]["auc_mean"] < out[1]["auc_mean"] < out[3]["auc_mean"]  # independent noise averages out
    # more subsets than allowed: a reproducible draw of that many, each a real subset; every single run still
    capped = M.averaged_auc_by_size(y, runs, max_subsets=2, seed=5)
    assert [e["subsets"] for e in capped] == [4, 2, 2, 1] and capped == M.averaged_auc_by_size(y, runs, 2, seed=5)
    assert capped[0] == out[0] and capped[3] == out[3]
    assert capped[1]["auc_min"] >= min(pairs) and capped[1]["auc_max"] <= max(pairs)
    many = np.clip(0.3 * y + rng.uniform(0, 0.7, (30, 80)), 0, 1)  # C(30, 15) subsets: drawn, not listed
    assert [e["subsets"] for e in M.averaged_auc_by_size(y, many, max_subsets=20)] == [30] + [20] * 28 + [1]
    same = M.averaged_auc_by_size(y, np.stack([runs[0]] * 3))  # one model three times: nothing to gain
    assert {round(e["auc_mean"], 12) for e in same} == {round(single[0], 12)}
    with pytest.raises(ValueError, match="runs, cases"):
        M.averaged_auc_by_size(y, runs[0])


def test_leave_one_site_out_over_seeds_is_summarised_by_the_mean_and_both_intervals():
    from msbt.jobs.experiments import _across_seeds, _seeds_summary, _format_seeds

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 50)
    preds, by_seed = {}, {}
    for k, shift in zip((0, 1, 2), (0.2, 0.35, 0.5)):
        order = rng.permutation(50)
        preds[k] = {"source": np.array([f"i{i}" for i in order]), "y": y[order], "group": np.array([f"g{i // 2}" for i in order]),
                    "p": np.clip(shift * y[order] + rng.uniform(0, 1 - shift, 50), 0, 1), "site": np.full(50, "a")}
        by_seed[k] = [{"site": "a", "internal_auc": [0.9, 0.8, 1.0]}]
    across = _across_seeds("a", preds, by_seed, n_boot=200, seed=0)
    aucs = [M.roc_auc(p["y"], p["p"]) for p in preds.values()]
    assert across["per_seed"] == pytest.approx(aucs) and across["held_out_auc_mean"] == pytest.approx(np.mean(aucs))
    assert across["seed_range"] == [min(aucs), max(aucs)] and across["internal_auc_mean"] == pytest.approx(0.9)
    assert across["ci"][0] < across["ci_cases"][0] and across["ci"][1] > across["ci_cases"][1]
    aligned = {k: np.argsort(p["source"]) for k, p in preds.items()}
    mean_p = np.mean([p["p"][aligned[k]] for k, p in preds.items()], axis=0)
    assert across["ensemble_auc"][0] == pytest.approx(M.roc_auc(preds[0]["y"][aligned[0]], mean_p))
    other = {**across, "site": "b", "held_out_auc_mean": across["held_out_auc_mean"] + 0.1}
    summary = _seeds_summary([across, other])
    assert summary["worst_site"] == "a" and summary["worst_held_out_auc"] == [across["held_out_auc_mean"], *across["ci"]]
    by_size = across["ensemble_by_size"]
    assert [e["models"] for e in by_size] == [1, 2, 3] and [e["subsets"] for e in by_size] == [3, 3, 1]
    assert by_size[0]["auc_mean"] == pytest.approx(np.mean(aucs)) and by_size[2]["auc_mean"] == across["ensemble_auc"][0]
    text = "\n".join(_format_seeds({"across_seeds": [across, other], "summary": summary}, [0, 1, 2]))
    assert "over 3 training seeds" in text and "at the worst (a;" in text and "msbt ensemble" in text
    sizes = "  ".join(f"{e['models']}: {e['auc_mean']:.3f}" for e in by_size)
    assert "the averaged model of 1 to 3 of the seeds" in text and f"\na                    {sizes}\n" in text
    text = "\n".join(_format_seeds({"across_seeds": [across, other], "summary": summary}, [0, 1, 2], "scratch"))
    assert "of stage 2 (scratch)" in text and "never saw (scratch)" in text


def test_loso_diff_with_seeds_counts_the_mean_over_seeds_and_their_spread(tmp_path, capsys):
    """`msbt loso-diff` on runs of `crossval --by site --seeds`: each run is the mean of its seeds' AUCs on the
    held-out images, the difference carries the seed spread; a one-seed run against another says it does not."""
    import csv

    from msbt.jobs.experiments import format_loso_diff, loso_diff

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)

    def write_run(name, shifts):
        by_seed = {}
        for k, shift in enumerate(shifts):
            folder_name = "site-a" if k == 0 else f"site-a-seed{k}"
            folder = tmp_path / name / "loso" / folder_name
            folder.mkdir(parents=True)
            with (folder / "predictions.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["split", "source", "group", "y", "p", "site"])
                p = np.clip(shift * y + rng.uniform(0, 1 - shift, 60), 0, 1)
                w.writerows(["test", f"img{i}", f"g{i // 2}", y[i], p[i], "a"] for i in rng.permutation(60))
            by_seed[str(k)] = [{"site": "a", "folder": folder_name, "seed": k}]
        report = {"seeds": list(range(len(shifts))), "rows": by_seed["0"]}
        if len(shifts) > 1:
            report["by_seed"] = by_seed
        (tmp_path / name / "loso" / "loso.json").write_text(json.dumps(report))

    write_run("base", [0.1, 0.15, 0.05])
    write_run("lever", [0.5, 0.45, 0.55])
    write_run("single", [0.3])
    report = loso_diff([tmp_path / "base", tmp_path / "lever", tmp_path / "single"], n_boot=300)
    base, lever, single = report["rows"]
    assert (base["seeds"], lever["seeds"], single["seeds"]) == (3, 3, 1)
    assert lever["seed_term"] and single["seed_term"]  # the single run borrows the base's seed spread
    assert base["seed_sd"] > 0 and single["seed_sd"] is None and json.dumps(report, allow_nan=False)
    assert lever["diff_vs_first"][0] == pytest.approx(lever["auc"][0] - base["auc"][0])
    assert lever["diff_vs_first"][1] > 0 and lever["p_value"] < 0.05
    text = format_loso_diff(report)
    assert "mean AUC" in text and "spread over seeds" in text and "* one seed on both sides" not in text
    # the ensemble of two seeded runs averages seed by seed; one of another seed count is refused
    both = loso_diff([tmp_path / "base", f"{tmp_path / 'base'}+{tmp_path / 'lever'}"], n_boot=100)["rows"][1]
    assert both["seeds"] == 3
    with pytest.raises(ValueError, match="pairs their seeds in order"):
        loso_diff([tmp_path / "base", f"{tmp_path / 'base'}+{tmp_path / 'single'}"], n_boot=100)
    one_each = loso_diff([tmp_path / "single", f"{tmp_path / 'single'}+{tmp_path / 'single'}"], n_boot=100)
    assert "cover the held-out images only" in format_loso_diff(one_each)


def test_crossval_seeds_are_refused_without_by_site_before_ray_starts(tmp_path, capsys):
    from msbt.cli import main

    assert main(["crossval", "--seeds", "0", "1", "--set", f"run.storage_path={tmp_path}"]) == 1
    assert "--seeds repeats leave one site out (--by site)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_leave_one_site_out_of_one_site_is_refused_before_ray_or_the_data_step(tmp_path, capsys):
    """It was refused after the data step (minutes of scanning on a real collection), naming split.csv."""
    from msbt.cli import main

    one = tmp_path / "us"
    for label in ("benign", "malignant"):
        (one / label).mkdir(parents=True)
    for argv in (["crossval", "--by", "site"], ["compare", "--by", "site", "--set", f"data.ultrasound={one}"]):
        assert main([*argv, "--set", f"run.storage_path={tmp_path / 'runs'}"]) == 1
        err = capsys.readouterr().err
        assert "leave one site out (--by site) needs at least two sites" in err and "synth.sites=3" in err
    assert "names one (us)" in err and not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_fresh_leave_one_site_out_removes_every_seeds_folders_of_its_sites_and_nothing_else(tmp_path):
    from msbt.jobs.experiments import remove_loso_results

    names = ["site-a", "site-a-seed1", "site-a-seed7", "site-a-imagenet", "site-ab-seed1", "site-b-seedling"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "loso.json").write_text("{}")
    remove_loso_results(tmp_path, {"site-a"}, ["a"], compare=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site-a-imagenet", "site-ab-seed1", "site-b-seedling"]


def test_fresh_compare_by_site_with_seeds_keeps_every_seed_of_the_shared_design(tmp_path):
    """compare --by site --seeds --fresh: the arm equal to the config trains in the design's own seed folders
    (site-<s>-seed<k>), which loso.json lists: they stay; only the other arms' folders, every seed, go."""
    from msbt.jobs.experiments import remove_loso_results

    folders = {"site-a", "site-a-seed1", "site-a-scratch", "site-a-scratch-seed1"}
    for name in folders:
        (tmp_path / name).mkdir()
    (tmp_path / "loso.json").write_text("{}")
    (tmp_path / "compare.json").write_text("{}")
    remove_loso_results(tmp_path, folders, ["a"], compare=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loso.json", "site-a", "site-a-seed1"]


def test_an_arm_trained_with_another_seed_is_trained_again_from_a_clean_folder(tmp_path, monkeypatch):
    """run_arm reuses a folder's result only when its checkpoint records the arm's training seed; otherwise the
    old results and Ray run folder are removed first (Ray Train would restore the old run it found there)."""
    from helpers import tiny_ultrasound_run
    from msbt.jobs import experiments as X

    config, store = tiny_ultrasound_run(tmp_path, "run.train_seed=1")
    folder = tmp_path / "site-a-seed1"
    checkpoint = folder / "stage2" / "checkpoint_0"
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text(json.dumps({"seed": 5}))
    (folder / "metrics.json").write_text(json.dumps({"checkpoint": str(checkpoint)}))
    for name in ("predictions.csv", "internal.json"):
        (folder / name).write_text("old")

    class Trained(Exception):
        pass

    def train(*args, **kwargs):
        assert not any(folder.iterdir())  # nothing of the seed-5 run is left to be restored or reused
        raise Trained

    monkeypatch.setattr(X, "_arm_stage2", train)
    with pytest.raises(Trained):
        X.run_arm(config, store, None, folder)
    # the recorded seed is the arm's: reused, nothing trained
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text(json.dumps({"seed": 1}))
    (folder / "metrics.json").write_text(json.dumps({"checkpoint": str(checkpoint)}))
    (folder / "predictions.csv").write_text("split,source,group,y,p,site\ntest,a.png,g,1,0.9,a\n")
    assert X.run_arm(config, store, None, folder)["checkpoint"] == str(checkpoint)


def test_an_external_site_of_few_lesions_gets_wilson_intervals_a_note_and_its_seed():
    from msbt.eval import external as ext

    y = np.array([1] * 5 + [0] * 10)
    p = np.where(y == 1, 0.95, 0.05)  # every lesion right: the bootstrap collapses to a point
    r = ext.score_site(y, p, [f"g{i}" for i in range(15)], 0.5, n_boot=500, seed=3)
    assert r["at_run_threshold"]["sensitivity"] == [1.0, 1.0, 1.0]
    value, low, high = r["wilson_groups"]["sensitivity"]
    assert value == 1.0 and low == pytest.approx(0.5655, abs=1e-4) and high == 1.0  # 5 of 5 malignant lesions
    assert r["wilson_groups"]["specificity"][1] == pytest.approx(M.wilson_interval(1.0, 10)[0])
    assert any("only 15 lesion groups in this site" in n for n in r["notes"])
    assert r["ci"]["seed"] == 3 and r["ci"]["resamples"] == 500
    assert any("Wilson 95% over lesion groups: accuracy" in line for line in ext.format_site("x", r))
    # The run's threshold on a saturated score is flagged for the site (it was filtered out before)
    sat = ext.score_site(y, np.where(y == 1, 1.0, 0.0), [f"g{i}" for i in range(15)], 1.0, n_boot=50)
    assert any(n.startswith("threshold 1 lies on a saturated score") and "the site's scores" in n
               for n in sat["notes"])


def test_a_rate_without_a_value_says_why_on_the_terminal():
    from msbt.eval.evaluate import format_report, score

    y = np.array([0, 1] * 10)
    groups = np.array([f"g{i}" for i in range(20)])
    val = {"y": y, "p": np.where(y == 1, 0.9, 0.1), "group": groups}
    result = score(val, {"y": y, "p": np.full(20, 0.05), "group": groups}, n_boot=50)  # nothing called malignant
    assert np.isnan(result["test"]["ppv"])  # metrics.json keeps NaN
    text = format_report(result)
    assert "ppv undefined (no test image called malignant)" in text and " nan" not in text


def test_an_external_site_of_one_class_gets_its_one_rate_with_a_wilson_interval():
    from msbt.eval import external as ext

    r = ext.score_site([1, 1, 1, 1], [0.9, 0.9, 0.2, 0.8], ["a", "b", "c", "d"], 0.5, n_boot=50)
    value, low, high = r["one_class"]["sensitivity"]
    assert value == 0.75 and (low, high) == pytest.approx(M.wilson_interval(0.75, 4))
    assert "at_run_threshold" not in r and any("only malignant images" in n for n in r["notes"])
    assert any("sensitivity 0.750 [" in line for line in ext.format_site("biopsies", r))
    benign = ext.score_site([0, 0, 0], [0.1, 0.7, 0.2], ["a", "b", "b"], 0.5, n_boot=50)
    assert benign["one_class"]["specificity"][0] == pytest.approx(2 / 3)
    assert (benign["one_class"]["specificity"][1], benign["one_class"]["specificity"][2]) == pytest.approx(
        M.wilson_interval(2 / 3, 2))  # two lesion groups behind it


def test_a_threshold_on_one_images_score_is_not_called_tied():
    """A Youden threshold always equals one validation score: with fewer than 20 images that one was over 5% and
    every small run was warned of 'tied scores'."""
    from msbt.eval.threshold import threshold_flags

    p = np.linspace(0.1, 0.9, 14)
    assert threshold_flags(p, p[5]) == []
    tied = np.r_[p, [p[5]] * 3]
    assert any("chosen among tied scores: 24%" in f for f in threshold_flags(tied, p[5]))


def test_the_terminal_never_rounds_a_threshold_to_1_that_calls_cases_below_1():
    """The main job printed a saturated model's validation threshold 0.99962 as "threshold 1" (".3g"), and
    external, ensemble and cross-validation lines did so with ".4g"/".4f" from 0.99995 on: read as "only a score of
    1 is called malignant". Every line prints it as the report does (msbt.eval.metrics.threshold_text)."""
    from msbt.eval.evaluate import format_report, score
    from msbt.eval import external as ext
    from msbt.eval.threshold import format_oof

    y = np.array([0, 1] * 10)
    groups = np.array([f"g{i}" for i in range(20)])
    val = {"y": y, "p": np.where(y == 1, 0.99996, 0.9991), "group": groups}  # Youden picks 0.99996
    result = score(val, {"y": y, "p": np.where(y == 1, 0.99999, 0.999), "group": groups}, n_boot=50)
    first = format_report(result).splitlines()[0]
    assert "threshold 0.999960 chosen on val" in first and "threshold 1 " not in first
    site = ext.score_site(y, np.where(y == 1, 0.99999, 0.9993), groups, 0.99996, n_boot=50)
    lines = "\n".join(ext.format_site("b", site))
    assert "at the run's threshold 0.999960:" in lines and "threshold 1:" not in lines
    oof = {"threshold": 0.99962, "ci95": [0.99962, 0.9991, 0.99999], "images": 40, "groups": 30, "rule": "youden",
           "fold_thresholds": [0.99, 0.99997], "fold_range": [0.99, 0.99997], "flags": [],
           "main_run_test": {"run_threshold": {"threshold": 0.99996, "sensitivity": 1.0, "specificity": 0.5},
                             "oof_threshold": {"threshold": 0.99962, "sensitivity": 1.0, "specificity": 0.4}}}
    text = format_oof(oof)
    assert "out-of-fold threshold 0.99962 [0.99910, 0.9999900]" in text and "range 0.9900-0.999970" in text
    assert "validation threshold 0.999960," in text and "1.0000" not in text


def test_naive_minus_group_aware_gets_an_interval_over_the_lesions_of_both_test_sets():
    """compare.json's naive - group-aware accuracy and AUC (how much leakage flatters a number) were printed bare,
    "+0.150": a difference of two numbers whose own intervals are each +-0.1 or more. Its interval resamples the
    lesion groups of both test sets at once: the same images give exactly 0, two sets without a shared lesion the
    spread of two independent bootstraps, and a lesion in both sets moves both sides of a resample together."""
    from msbt.eval.report import inflation_text
    from msbt.jobs import experiments as X

    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(80), 2)
    y = np.repeat(rng.integers(0, 2, 80), 2)
    p = np.clip(0.5 + 0.25 * (2 * y - 1) + rng.normal(0, 0.25, y.size), 0, 1)
    side = lambda idx, t=0.5: {"y": y[idx], "p": p[idx], "group": g[idx], "threshold": t}  # noqa: E731
    first, second = np.arange(80), np.arange(80, 160)  # lesions 0-39 and 40-79: nothing shared
    same = M.bootstrap_diff_two_sets(side(first), side(first), n_boot=300)
    assert same == {"accuracy": [0.0, 0.0, 0.0], "auc": [0.0, 0.0, 0.0]}
    diff = M.bootstrap_diff_two_sets(side(first), side(second), n_boot=2000, seed=1)
    a, b = (M.bootstrap_ci(y[i], p[i], 0.5, groups=g[i], n_boot=2000, seed=2) for i in (first, second))
    for key in ("accuracy", "auc"):
        point, low, high = diff[key]
        assert point == pytest.approx(a[key][0] - b[key][0])
        independent = math.hypot(a[key][2] - a[key][1], b[key][2] - b[key][1])
        assert high - low == pytest.approx(independent, rel=0.25)
    # half the lesions shared (0-39 against 20-59): they move both sides of a resample together and cancel, so the
    # difference spreads as two independent halves of 20 lesions would, about 1/sqrt(2) of the disjoint width (a
    # bootstrap that drew each set's lesions on its own would give the full width)
    overlap = np.arange(40, 120)
    part = M.bootstrap_diff_two_sets(side(first), side(overlap), n_boot=2000, seed=1)
    c = M.bootstrap_ci(y[overlap], p[overlap], 0.5, groups=g[overlap], n_boot=2000, seed=3)
    for key in ("accuracy", "auc"):
        point, low, high = part[key]
        independent = math.hypot(a[key][2] - a[key][1], c[key][2] - c[key][1])
        assert high - low == pytest.approx(independent / math.sqrt(2), rel=0.25), key
    # compare's use: two fake arms' test predictions, the printed line carries the interval
    Result = type("Result", (dict,), {})
    naive, group = Result(threshold=0.5), Result(threshold=0.5)
    naive.predictions, group.predictions = {"test": side(first)}, {"test": side(second)}
    ci = X.naive_inflation(naive, group, n_boot=300)
    assert ci["auc"][0] == pytest.approx(diff["auc"][0]) and ci["auc"][1] < ci["auc"][0] < ci["auc"][2]
    nv = {"inflation": {k: ci[k][0] for k in ci}, "inflation_ci95": ci}
    assert f"AUC {ci['auc'][0]:+.3f} [{ci['auc'][1]:+.3f}, {ci['auc'][2]:+.3f}]" in inflation_text(nv)
    # the naive model on its leaked and clean test images: each part with its interval over lesion groups
    naive.predictions["test"]["source"] = np.array([f"s{i}" for i in first])
    rows = [{"relpath": f"s{i}", "group": g[i]} for i in first]
    roles = {f"s{i}": "train" for i in first[:4]}  # lesions 0 and 1 were trained on
    leak = X.leakage_breakdown(naive, roles, rows, n_boot=300)
    assert (leak["leaked_images"], leak["clean_images"]) == (4, 76)
    low, high = leak["clean_ci95"]["accuracy"][1:]
    assert leak["clean_ci95"]["accuracy"][0] == leak["clean_accuracy"] and low < leak["clean_accuracy"] < high


def test_the_mean_held_out_auc_over_sites_carries_an_interval_over_their_lesions():
    """Leave one site out ended with "0.675 on average over the 3 sites; quote these": the one number told to quote
    without an interval. Each site's lesions are resampled on their own and the mean taken per resample: for two
    sites the width is about that of the two sites' intervals combined, halved."""
    from msbt.jobs import experiments as X

    rng = np.random.default_rng(11)
    sets = []
    for n, d in ((120, 1.0), (60, 0.5)):
        g = np.repeat(np.arange(n // 2), 2)
        y = np.repeat(rng.integers(0, 2, n // 2), 2)
        sets.append({"y": y, "p": 1 / (1 + np.exp(-rng.normal(d * y, 1.0))), "group": g.astype(str)})
    mean, low, high = M.mean_auc_over_sets(dict(zip("ab", sets)), n_boot=2000, seed=0)
    each = [M.bootstrap_ci(s["y"], s["p"], 0.5, groups=s["group"], n_boot=2000, seed=4)["auc"] for s in sets]
    assert mean == pytest.approx(np.mean([e[0] for e in each])) and low < mean < high
    assert high - low == pytest.approx(math.hypot(*[e[2] - e[1] for e in each]) / 2, rel=0.2)
    rows = [{"site": s, "test_images": len(x["y"]), "held_out_auc": list(e), "internal_auc": None, "gap": None}
            for s, x, e in zip(("a", "b"), sets, each)]
    summary = X._loso_summary(rows, dict(zip("ab", sets)), n_boot=500)
    assert summary["mean_held_out_auc"] == pytest.approx(mean)
    c = summary["mean_held_out_auc_ci95"]
    text = X.format_loso({"design": "d", "rows": rows, "summary": summary})
    assert f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}] on average over these 2 sites" in text
    assert "not a sample of hospitals" in text
