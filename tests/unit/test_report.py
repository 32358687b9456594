"""report.html: self-contained (no external URL, no script), every SVG well-formed, every section there.

The real case: `check_run_report` on the run that tests/workflows/test_workflows.py trains step by step (smoke data,
the tiny_cnn backbone, one epoch per stage, a local Ray cluster): its evaluation step writes the report.
"""

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from helpers import SECTIONS, check_self_contained, svgs  # noqa: F401
from msbt.eval import report as R

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_charts_are_well_formed_svg_even_with_gaps():
    chart = R.line_chart([{"label": "a<b", "x": [1, 2, 3], "y": [0.5, float("nan"), 0.7]},
                          {"label": "pts", "x": [0.2], "y": [0.4], "points": True, "sizes": [3]}],
                         title="t & u", xlabel="x", ylabel="y", diagonal=True, square=True,
                         marks=[{"x": 2, "label": "kept"}])
    root = ET.fromstring(chart)
    assert root.tag.endswith("svg") and len(root.findall(".//{http://www.w3.org/2000/svg}polyline")) == 1
    assert "a&lt;b" in chart and "t &amp; u" in chart
    ET.fromstring(R.line_chart([], title="empty", xlabel="x", ylabel="y"))
    cm = R.confusion_svg([[3, 1], [0, 4]], ["benign", "malignant"])
    texts = [t.text for t in ET.fromstring(cm).iter("{http://www.w3.org/2000/svg}text")]
    assert ["3", "1", "0", "4"] == [t for t in texts if t.isdigit()]


def test_ticks_are_round_and_cover_the_range():
    assert R._ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert R._ticks(1, 8)[0] >= 1 and R._ticks(1, 8)[-1] <= 8


def test_a_run_folder_without_results_still_renders_with_the_gaps_marked(tmp_path):
    text = R.render(tmp_path)
    check_self_contained(text)
    assert "No metrics.json in this run yet" in text and "No saved split" in text
    # a damaged file costs its section, not the page
    (tmp_path / "data" / "ultrasound").mkdir(parents=True)
    (tmp_path / "data" / "ultrasound" / "split.json").write_text('{"classes": ["benign"]}')
    text = R.render(tmp_path)
    check_self_contained(text)
    assert "This section could not be drawn: KeyError" in text and 'id="config"' in text


def arm(acc, auc, n=10):
    keys = ("accuracy", "auc", "sensitivity", "specificity", "ppv", "npv", "f1", "brier", "loss")
    test = {k: 0.5 for k in keys} | {"accuracy": acc, "auc": auc}
    return {"test": test, "ci95": {k: [v, v - 0.1, v + 0.1] for k, v in test.items()}, "threshold": 0.5,
            "test_images": n, "test_groups": n // 2, "checkpoint": "/x"}


def test_experiment_tables_render_from_their_json(tmp_path):
    """The report's experiments section and compare's printed table read the same compare.json shape."""
    from msbt.jobs.experiments import format_compare

    test = {"diff": 0.1, "ci": [-0.05, 0.25], "p_value": 0.2, "auc_a": 0.8, "auc_b": 0.7, "se": 0.07, "z": 1.3}
    report = {"experiment": "compare", "stage1": "/s1",
              "stage1_origin": {"checkpoint": "/s1", "backbone": "resnet50", "weights": "imagenet", "synthetic": False,
                                "microscope": "/lab/cells", "fields": 812, "classes": ["HeLa", "MCF-7"]},
              "arms": {"multistage": arm(0.8, 0.85), "scratch": arm(0.7, 0.75)},
              "paired": [{"a": "multistage", "b": "scratch", "delong": test,
                          "paired_bootstrap": {"error": "too few cases"}}],
              "naive_vs_group": {"group_aware": arm(0.8, 0.85), "naive": arm(0.95, 0.97, n=12),
                                 "inflation": {"accuracy": 0.15, "auc": 0.12},
                                 "naive_test_leakage": {"leaked_images": 9, "clean_images": 3}, "note": ""}}
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "compare.json").write_text(json.dumps(report))
    text = R.render(tmp_path)
    check_self_contained(text)
    assert "Does the middle stage help?" in text and "could not be drawn" not in text
    assert "+0.100 [-0.050, +0.250], p = 0.2" in text and "too few cases" in text
    assert "accuracy +0.150, AUC +0.120. 9 of 12 naive test images" in text
    printed = format_compare(report)
    assert "naive - group: accuracy +0.150, AUC +0.120; 9 of 12" in printed and "paired_bootstrap too few" in printed
    assert "0.500 [0.400, 0.600]" in printed.splitlines()[3]  # the loss with its interval, as the other columns
    assert "<td>0.500 [0.400, 0.600]</td></tr>" in text
    nan = float("nan")  # no interval printed: none claimed
    assert R.inflation_text({"inflation": {"accuracy": 0.15, "auc": 0.12},
                             "inflation_ci95": {"accuracy": [nan] * 3, "auc": [nan] * 3}}) == "accuracy +0.150, AUC +0.120"
    origin = "resnet50 from ImageNet weights, trained on 812 fields of HeLa, MCF-7 from /lab/cells"
    assert origin in printed and origin in text and "synthetic" not in printed
    report["stage1_origin"].update(synthetic=True, microscope="/cache/synth")
    assert "built-in synthetic microscope fields, not real cells" in format_compare(report)


def test_crossval_and_site_comparison_sections_render_from_their_json(tmp_path):
    """The out-of-fold threshold under the cross-validation table, and compare --by site's tables."""
    keys = ("accuracy", "auc", "sensitivity", "specificity", "f1", "loss")
    cv = {"folds": 2, "design": "two folds", "rows": [{"fold": i, "test_images": 10, **{k: 0.8 for k in keys}}
                                                      for i in range(2)],
          "summary": {k: [0.8, 0.0] for k in keys},
          "oof_threshold": {"threshold": 0.42, "ci95": [0.42, 0.3, 0.6], "images": 20, "groups": 18,
                            "rule": "youden", "fold_thresholds": [0.2, 0.7], "fold_range": [0.2, 0.7], "flags": [],
                            "main_run_test": {"run_threshold": {"threshold": 0.2, "sensitivity": 1.0,
                                                                "specificity": 0.5},
                                              "oof_threshold": {"threshold": 0.42, "sensitivity": 0.9,
                                                                "specificity": 0.8}}},
          "pooled": {"images": 20, "groups": 18, "auc": [0.81, 0.7, 0.9], "sensitivity": [0.8, 0.6, 0.95],
                     "specificity": [0.75, 0.5, 0.9], "accuracy": [0.78, 0.6, 0.9],
                     "notes": ["internal estimate: the test images come from the same site"]}}
    cv["rows"][0].update(auc_low=0.6, auc_high=0.95)  # rows written before 2026-12-07 have no interval
    (tmp_path / "crossval").mkdir()
    (tmp_path / "crossval" / "crossval.json").write_text(json.dumps(cv))
    row = {"site": "a", "test_images": 30, "held_out_auc": [0.7, 0.6, 0.8], "internal_auc": [0.9, 0.8, 1.0]}
    test = {"diff": -0.05, "ci": [-0.1, 0.02], "p_value": 0.3}
    loso = {"arms": {"multistage": {"rows": [row]}, "imagenet": {"rows": [{**row, "held_out_auc": [0.75, 0.65, 0.85]}]}},
            "paired": {"a": [{"a": "multistage", "b": "imagenet", "paired_bootstrap": test}]},
            "across_sites": {"seed": 0, "pairs": [{"a": "multistage", "b": "imagenet", "sites": ["a", "b"],
                                                   "diff": -0.04, "ci": [-0.09, 0.01], "p_value": 0.12}]}}
    (tmp_path / "loso").mkdir()
    (tmp_path / "loso" / "compare.json").write_text(json.dumps(loso))
    text = R.render(tmp_path)
    check_self_contained(text)
    assert "out-of-fold threshold 0.4200 [0.3000, 0.6000]" in text and "range 0.2000-0.7000" in text
    assert "0.900/0.800 at the out-of-fold threshold" in text
    assert ("<b>The number to quote</b>: pooled out-of-fold (20 images / 18 lesion groups" in text
            and "auc 0.810 [0.700, 0.900], sensitivity 0.800 [0.600, 0.950]" in text
            and "note: internal estimate: the test images come from the same site" in text)
    # fold 0's AUC with its interval; fold 1, a row written before intervals, its value alone
    assert ("<tr><td>0</td><td>10</td><td>0.800</td><td>0.800 [0.600, 0.950]</td><td>0.800</td>" in text
            and "<tr><td>1</td><td>10</td><td>0.800</td><td>0.800</td><td>0.800</td>" in text)
    assert "Stage-2 starting points under leave one site out" in text and "multistage − imagenet" in text
    assert "<td>multistage − imagenet</td><td>-0.040 [-0.090, 0.010]</td><td>0.120</td>" in text


def test_leave_one_site_out_over_seeds_shows_the_averaged_model_by_number_of_seeds(tmp_path):
    """With three seeds or more, the averaged model of 1, 2, ... of them; with two (or a loso.json written before
    it was recorded) no such column: the columns before already give each seed and both averaged."""
    row = {"site": "a", "test_images": 30, "held_out_auc": [0.7, 0.6, 0.8], "internal_auc": None}
    across = {"site": "a", "images": 30, "held_out_auc_mean": 0.7, "ci": [0.6, 0.8], "ci_cases": [0.62, 0.78],
              "seed_sd": 0.02, "per_seed": [0.7, 0.68, 0.72], "ensemble_auc": [0.75, 0.65, 0.85],
              "ensemble_by_size": [{"models": k, "subsets": 3 if k < 3 else 1, "auc_mean": m, "auc_min": m,
                                    "auc_max": m} for k, m in ((1, 0.7), (2, 0.735), (3, 0.75))]}
    (tmp_path / "loso").mkdir()
    loso = {"design": "each site held out", "seeds": [0, 1, 2], "rows": [row], "across_seeds": [across]}
    (tmp_path / "loso" / "loso.json").write_text(json.dumps(loso))
    assert "<td>0.750 [0.650, 0.850]</td><td>1: 0.700 2: 0.735 3: 0.750</td></tr>" in R.render(tmp_path)
    two = {**across, "per_seed": [0.7, 0.7], "ensemble_by_size": across["ensemble_by_size"][:2]}
    for a in (two, {k: v for k, v in across.items() if k != "ensemble_by_size"}):
        (tmp_path / "loso" / "loso.json").write_text(json.dumps({**loso, "across_seeds": [a]}))
        text = R.render(tmp_path)
        assert "<td>0.750 [0.650, 0.850]</td></tr>" in text and "averaged over k seeds" not in text
        assert "1, 2, ... of the seeds" not in text


def test_a_threshold_near_0_or_1_is_not_printed_as_0_or_1(tmp_path):
    """A saturated model's thresholds: the external section's transfer table printed the run's 0.000448 as
    "0.000" and the site's own 0.99987 as "1.000", which read as "every case malignant" and "none"."""
    from msbt.eval import external as ext

    assert [R.threshold_text(t) for t in (0.5, 0.0123, 0.000448, 0.99987, 3e-7, 0.0, 1.0)] == [
        "0.5000", "0.0123", "0.00045", "0.99987", "0.00000030", "0.0000", "1.0000"]
    # beyond 12 decimals a power of ten, never a string of zeros read as 0 or 1
    assert [R.threshold_text(t) for t in (1.3e-13, 1 - 2e-13, float("nan"), None)] == [
        "1.3e-13", "1 - 2.0e-13", "n/a", "n/a"]
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([1e-6, 2e-4, 0.99, 0.999, 0.9998, 0.99987, 0.99995, 0.99999])
    result = {"source": "site", **ext.score_site(y, p, np.arange(8).astype(str), 0.000448, n_boot=50)}
    assert result["threshold_transfer"]["site_best_threshold"] == pytest.approx(0.9998)
    ext.write_site(tmp_path / "external" / "b", result, [])
    (tmp_path / "metrics.json").write_text(json.dumps({"threshold": 0.000448, "threshold_ci95": [0.000448, 0.0003, 1.0]}))
    text = R.render(tmp_path)
    assert ("<td>run&#x27;s validation threshold</td><td>0.00045</td><td>1.000</td><td>0.500</td>" in text
            and "<td>site&#x27;s own best (optimistic)</td><td>0.99980</td><td>1.000</td><td>1.000</td>" in text)
    assert "Threshold 0.00045: 95% range over bootstrap resamples of the validation groups [0.00030, 1.0000]" in text


def small_run(folder, ultrasound):
    """A run folder as the main job leaves it, reduced to what the report's first section reads."""
    folder.mkdir()
    (folder / "config.yaml").write_text(f"data:\n  microscope: ''\n  ultrasound: '{ultrasound}'\nstage2:\n  weights: parent\n")
    for modality, classes, counts in (("ultrasound", ["benign", "malignant"], [59, 54, 15, 19, 8, 6]),
                                      ("microscope", ["HeLa", "MCF-7"], [4, 4, 1, 1, 1, 1])):
        (folder / "data" / modality).mkdir(parents=True)
        (folder / "data" / modality / "split.json").write_text(json.dumps({
            "root": ultrasound or "/cache/synth", "classes": classes, "images": sum(counts),
            "groups": {"count": 81}, "counts": {s: dict(zip(classes, counts[2 * i:2 * i + 2]))
                                                for i, s in enumerate(("train", "val", "test"))}}))
    (folder / "metrics.json").write_text(json.dumps({
        "threshold": 0.000448, "test_groups": 7, "scope": {"kind": "internal"},
        "test": {"tp": 6, "fn": 0, "tn": 7, "fp": 1}, "test_ci95_wilson_groups": {
            "sensitivity": [1.0, 0.439, 1.0], "specificity": [0.875, 0.396, 0.987]}}))
    rows = [("test", f"m{i}", f"g{i // 2}", 1) for i in range(6)] + [("test", f"b{i}", f"h{i // 2}", 0) for i in range(8)]
    (folder / "predictions.csv").write_text("split,source,group,y,p\n" + "".join(
        f"{s},{src},{g},{y},0.5\n" for s, src, g, y in rows))
    return folder


def test_the_first_section_says_the_data_are_synthetic_and_what_the_rates_rest_on(tmp_path):
    """A clinician opening the main job's report met 'ROC AUC 1.000 [1.000, 1.000]' first; that every image was
    msbt's own synthetic data was said nowhere (only a cache path in the Data section), nor on how many lesions
    a sensitivity rested, nor that the stage-1 cells were synthetic too."""
    text = R.render(small_run(tmp_path / "builtin", ""))
    first = text[text.index('<section id="overview">'):text.index('<section id="metrics">')]
    assert "<b>Synthetic data.</b>" in first and "not images of patients" in first and "not for clinical use" in first
    assert "built-in <b>synthetic</b> microscope fields of HeLa, MCF-7 (12 fields)" in first
    # trained on the train split only: the validation and test images are said for what they did
    assert ("was trained on 113 images from the built-in synthetic set; 34 more chose its epoch and threshold (validation) "
            "and 14 were held out for the test metrics below (test): 161 images of 81 lesion groups in all") in first
    assert "called malignant when it is at least the threshold 0.00045" in first
    assert ("malignant test images called malignant: 6 of 6 images (3 lesions), 95% interval over lesions 0.439 to "
            "1.000") in first and "benign: 7 of 8 images (4 lesions)" in first
    assert "With 7 lesion groups the intervals are wide: a rate of 1.000 here is compatible" in first
    assert "internal estimate" in first and "another hospital" in first
    check_self_contained(text)
    # the user's own data: no synthetic warning, the folder named
    text = R.render(small_run(tmp_path / "own", "/data/busi"))
    first = text[text.index('<section id="overview">'):text.index('<section id="metrics">')]
    assert "Synthetic" not in first and "images from <code>/data/busi</code>; 34 more" in first


def test_the_kept_epoch_label_stays_inside_its_chart_at_the_last_epoch():
    """Stage 1 of the main job keeps its last epoch: the label centred on that mark was cut at the chart's
    right edge ('kept (epo' in the browser)."""
    for kept in (1, 2, 3):
        chart = R.line_chart([{"label": "loss", "x": [1, 2, 3], "y": [1.2, 1.0, 0.8]}], title="t", xlabel="epoch",
                             ylabel="loss", marks=[{"x": kept, "label": f"kept (epoch {kept})"}])
        root = ET.fromstring(chart)
        label = next(t for t in root.iter("{http://www.w3.org/2000/svg}text") if t.text.startswith("kept"))
        x, size = float(label.get("x")), 6 * len(label.text)  # generous: 10 px sans-serif is ~5.5 px a character
        low = {"start": x, "middle": x - size / 2, "end": x - size}[label.get("text-anchor")]
        assert 0 <= low and low + size <= float(root.get("width")), (kept, label.attrib)


def test_epoch_and_fold_axes_are_labelled_with_whole_numbers_only():
    """A three-epoch stage's curves were labelled 1, 1.5, 2, 2.5, 3 on the epoch axis."""
    def x_labels(chart):
        root = ET.fromstring(chart)
        return [t.text for t in root.iter("{http://www.w3.org/2000/svg}text") if t.get("class") == "k"
                and t.get("text-anchor") == "middle"]

    series = [{"label": "loss", "x": [1, 2, 3], "y": [1.2, 1.0, 0.8]}]
    assert x_labels(R.line_chart(series, title="t", xlabel="epoch", ylabel="loss", integer_x=True)) == ["1", "2", "3"]
    assert "1.5" in x_labels(R.line_chart(series, title="t", xlabel="x", ylabel="loss"))  # a continuous axis keeps them
    long = [{"label": "loss", "x": list(range(1, 31)), "y": [1.0] * 30}]
    assert x_labels(R.line_chart(long, title="t", xlabel="epoch", ylabel="loss", integer_x=True)) == ["10", "20", "30"]


def test_compare_says_delong_counts_frames_as_independent_when_lesions_have_several(tmp_path):
    """compare printed DeLong's p first and unqualified beside the paired bootstrap by lesion. On 40 lesions of 4
    near-identical frames each, DeLong gave +0.118 [0.033, 0.203], p = 0.006 where the lesion bootstrap gives
    [-0.044, 0.296], p = 0.18: a reader took the first p. Where the test images are fewer lesions, both outputs say
    which one to read; with one image per lesion they say nothing more."""
    from msbt.jobs.experiments import format_compare

    test = {"diff": 0.118, "ci": [0.033, 0.203], "p_value": 0.006}
    report = {"experiment": "compare", "arms": {"multistage": arm(0.8, 0.85, n=160), "imagenet": arm(0.7, 0.75, n=160)},
              "paired": [{"a": "multistage", "b": "imagenet", "delong": test,
                          "paired_bootstrap": {**test, "ci": [-0.044, 0.296], "p_value": 0.18}}]}
    for a in report["arms"].values():
        a["test_groups"] = 40
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "compare.json").write_text(json.dumps(report))
    caveat = "DeLong counts the 160 test images as independent, but they are 40 lesion groups"
    assert caveat in format_compare(report) and caveat in R.render(tmp_path)
    for a in report["arms"].values():
        a["test_groups"] = 160
    (tmp_path / "compare" / "compare.json").write_text(json.dumps(report))
    assert "counts the" not in format_compare(report) and "counts the" not in R.render(tmp_path)
