"""report.html: self-contained (no external URL, no script), every SVG well-formed, every section there.

The real case: `check_run_report` on the run that tests/test_workflows.py trains step by step (smoke data,
EfficientNet-Lite0, one epoch per stage, a local Ray cluster): its evaluation step writes the report.
"""

import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from msbt.eval import report as R

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]
SECTIONS = ("metrics", "training", "data", "gradcam", "lineage", "config")


class Page(HTMLParser):
    """Collects section ids, every URL-bearing attribute and the raw <svg>...</svg> blocks."""

    def __init__(self):
        super().__init__()
        self.ids, self.urls, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name == "id":
                self.ids.append(value)
            if name in ("src", "href", "action", "srcset", "data", "poster"):
                self.urls.append(value)


def svgs(text: str) -> list[str]:
    out, start = [], 0
    while (i := text.find("<svg", start)) >= 0:
        j = text.index("</svg>", i) + len("</svg>")
        out.append(text[i:j])
        start = j
    return out


def check_self_contained(text: str) -> Page:
    page = Page()
    page.feed(text)
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert all(u.startswith(("data:image/png;base64,", "#")) for u in page.urls), page.urls
    # The only http(s) text allowed is the SVG namespace name (an identifier, never fetched).
    assert text.replace('xmlns="http://www.w3.org/2000/svg"', "").count("http") == 0
    assert "url(" not in text and "@import" not in text
    for block in svgs(text):
        ET.fromstring(block)  # raises on malformed SVG
    return page


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


def check_run_report(run) -> None:
    """The report a finished run wrote (evaluation writes it): complete, self-contained, and showing the
    run's own numbers. Called on a real run by tests/test_workflows.py, which trains one."""
    text = (run / "report.html").read_text()
    page = check_self_contained(text)
    assert set(SECTIONS) <= set(page.ids)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["schema_version"] == 3 and metrics["predictions_file"] == "predictions.csv"
    # charts: ROC, calibration, confusion matrix, and loss + AUC/accuracy curves for both stages
    titles = [ET.fromstring(s).get("aria-label") for s in svgs(text)]
    assert "ROC, test split" in titles and "confusion matrix" in titles
    assert any(t.startswith("Calibration") for t in titles)
    assert {"Stage 1 (efficientnet_lite0): loss", "Stage 2 (efficientnet_lite0): loss",
            "Stage 2 (efficientnet_lite0): auc"} <= set(titles)
    # the numbers shown are metrics.json's
    acc = metrics["test_ci95"]["accuracy"]
    assert f"{acc[0]:.3f} [{acc[1]:.3f}, {acc[2]:.3f}]" in text
    assert f"{metrics['threshold']:.4f}" in text
    # data summary, lineage and config
    split = json.loads((run / "data" / "ultrasound" / "split.json").read_text())
    assert f"{split['images']} images from" in text and "naive" in text
    assert "stage 2  efficientnet_lite0  weights=parent" in text and "&lt;- stage 1" in text
    assert "backbone: efficientnet_lite0" in text
    # Grad-CAM: real overlays
    assert text.count('src="data:image/png;base64,') >= 2 and "Grad-CAM failed" not in text
    # the per-image predictions are kept for later comparisons
    rows = (run / "predictions.csv").read_text().splitlines()
    assert rows[0] == "split,source,group,y,p"
    assert sum(r.startswith("test,") for r in rows) == metrics["test_images"]


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
