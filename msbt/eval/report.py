"""``report.html``: one self-contained page per run, for a reader who was not there when it ran.

Everything comes from files the run already wrote (``config.yaml``, ``data/<modality>/split.json`` and
``rejects.csv``, ``metrics.json``, the checkpoints' manifests, and the experiments' JSON files), so the
page can be rebuilt at any time with ``msbt report RUN_DIR``. No network: charts are inline SVG drawn
here, images are base64 PNGs, there is no script. Only the Grad-CAM section loads the model (and
TensorFlow); a failure there is shown in the section rather than stopping the run that writes the page.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import itertools
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from msbt.atomicio import write_text
from msbt.eval.metrics import share_text, threshold_text
from msbt import __version__

REPORT_FILE = "report.html"
COLORS = ("#1f5fa8", "#d2631c", "#2f8a3b", "#a0307a", "#6b6b6b", "#b59a00")
MODALITIES = ("ultrasound", "microscope")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ablation_test_text(report: Mapping) -> str:
    """What Table 1's numbers were measured on: the run's own test split, its size, and (where it is) that it is an
    internal estimate. It said "the held-out test split", the words leave one site out uses for a site never seen."""
    first = (report.get("rows") or [{}])[0]
    size = (f": {first['test_images']} images" + (f" of {first['test_groups']} lesion groups" if first.get("test_groups")
                                                  else "") if first.get("test_images") else "")
    internal = (", an internal estimate (its images come from the sites the model trained on)"
                if first.get("scope") == "internal" else "")
    return f"the run's own test split{size}{internal}"


def inflation_text(nv: Mapping) -> str:
    """Naive minus group-aware accuracy and AUC, with the interval over both test sets' lesions where there is one
    (compare.json files written before it have the differences alone)."""
    ci = nv.get("inflation_ci95") or {}

    def one(key: str, label: str) -> str:
        if key in ci and all(math.isfinite(x) for x in ci[key]):
            d, low, high = ci[key]
            return f"{label} {d:+.3f} [{low:+.3f}, {high:+.3f}]"
        return f"{label} {nv['inflation'][key]:+.3f}"

    shown = [key for key in ("accuracy", "auc") if key in ci and all(math.isfinite(x) for x in ci[key])]
    text = f"{one('accuracy', 'accuracy')}, {one('auc', 'AUC')}"
    return text + (" (95% CI over the lesions of both test sets, not over the training)" if shown else "")


def delong_caveat(report: Mapping) -> str:
    """What to say beside compare's DeLong column when the arms' test images are fewer lesions than images ('' when
    every lesion has one image): DeLong counts images as independent cases, so frames of one lesion shrink its
    interval and p-value; the paired bootstrap resamples lesions."""
    arm = next(iter((report.get("arms") or {}).values()), {})
    images, groups = arm.get("test_images"), arm.get("test_groups")
    if not report.get("paired") or not images or not groups or groups >= images:
        return ""
    return (f"DeLong counts the {images} test images as independent, but they are {groups} lesion groups: its "
            "interval and p-value are too narrow; the paired bootstrap by lesion is the one to read")


def mean_over_sites_text(summary: Mapping, sites: int) -> str:
    """Leave one site out's mean held-out AUC over the sites, with its interval over their lesions where the
    summary has one (``mean_held_out_auc_ci95``), for the job log and the report alike."""
    ci = summary.get("mean_held_out_auc_ci95")
    if ci and all(_finite(x) for x in ci):
        covers = summary.get("mean_ci_covers", "their lesions")  # over several seeds: the lesions and the seeds
        return (f"{_ci_text(ci)} on average over these {sites} sites (interval over {covers}; the sites "
                "themselves are not a sample of hospitals)")
    return f"{_fmt(summary['mean_held_out_auc'])} on average over the {sites} sites"


def stage1_origin_text(origin: Mapping) -> str:
    """What the multistage arms' stage 1 learned from, beside the tables that compare starting points: a gain or
    a loss of the middle stage means something else when its cells were msbt's synthetic ones."""
    weights = {"imagenet": "ImageNet weights", "none": "random weights"}.get(
        origin.get("weights"), f"the weights file {origin.get('weights')}")
    fields = f"{origin['fields']} fields of " if origin.get("fields") else ""
    text = (f"stage 1 (where the multistage arms start): {origin.get('backbone')} from {weights}, trained on "
            f"{fields}{', '.join(origin.get('classes') or ())}")
    if origin.get("synthetic"):
        return (text + ", msbt's built-in synthetic microscope fields, not real cells: what the multistage arm gains "
                "or loses here is that of synthetic cells, not a test of the paper's microscope stage")
    return text + f" from {origin.get('microscope')}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------
# Inline SVG charts


def _ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` round tick values covering [low, high]; whole numbers only where ``integer`` (epochs,
    folds: a three-epoch chart was labelled 1, 1.5, 2, 2.5, 3)."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    if integer:
        step = max(1, round(step))
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def line_chart(series: Sequence[dict], *, title: str, xlabel: str, ylabel: str, xlim=None, ylim=None,
               diagonal: bool = False, square: bool = False, marks: Sequence[dict] = (),
               integer_x: bool = False) -> str:
    """An SVG line chart.

    Args:
        series: ``{"label", "x", "y"}`` dicts, optionally ``"points": True`` (markers, no line),
            ``"sizes"`` (marker areas, relative) and ``"dash": True``. Non-finite points are skipped.
        title, xlabel, ylabel: Text.
        xlim, ylim: Axis ranges; default: the data's.
        diagonal: Draw the y = x reference line (ROC, calibration).
        square: Plot area square (ROC, calibration).
        marks: Vertical markers ``{"x", "label"}`` (e.g. the best epoch).
        integer_x: x ticks at whole numbers only (epochs, folds).

    Returns:
        ``<svg>`` markup.
    """
    width, height = (340, 320) if square else (420, 260)
    left, right, top, bottom = 52, 12, 26, 44
    if marks:  # their labels go between the title and the plot area, off the data
        top, height = top + 12, height + 12
    pw, ph = width - left - right, height - top - bottom
    if square:
        pw = ph = min(pw, ph)
    # The legend sits below the plot area, one row per series, so it never covers a line.
    legend_top = height
    height += 15 * len(series) + 4
    xs = [x for s in series for x in s["x"] if _finite(x)]
    ys = [y for s in series for y in s["y"] if _finite(y)]
    x0, x1 = xlim or ((min(xs), max(xs)) if xs else (0, 1))
    y0, y1 = ylim or ((min(ys), max(ys)) if ys else (0, 1))
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def px(x):
        return left + (x - x0) / (x1 - x0) * pw

    def py(y):
        return top + ph - (y - y0) / (y1 - y0) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
             f'<text x="{left}" y="16" class="t">{_e(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    for tx in _ticks(x0, x1, integer=integer_x):
        parts.append(f'<line x1="{px(tx):.1f}" y1="{top + ph}" x2="{px(tx):.1f}" y2="{top + ph + 4}" stroke="#999"/>'
                     f'<text x="{px(tx):.1f}" y="{top + ph + 15}" class="k" text-anchor="middle">{_tick(tx)}</text>')
    for ty in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" y1="{py(ty):.1f}" x2="{left + pw}" y2="{py(ty):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 5}" y="{py(ty) + 3:.1f}" class="k" text-anchor="end">{_tick(ty)}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{legend_top - 8}" class="a" text-anchor="middle">{_e(xlabel)}</text>'
                 f'<text x="14" y="{top + ph / 2:.1f}" class="a" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + ph / 2:.1f})">{_e(ylabel)}</text>')
    if diagonal:
        lo, hi = max(x0, y0), min(x1, y1)
        parts.append(f'<line x1="{px(lo):.1f}" y1="{py(lo):.1f}" x2="{px(hi):.1f}" y2="{py(hi):.1f}" '
                     'stroke="#aaa" stroke-dasharray="4 3"/>')
    for mark in marks:
        # A label centred on a mark at the last (or first) epoch ran past the chart's edge and was cut
        # ("kept (epo"); near an edge it ends (or starts) at the mark instead. ~6 px a character at 10 px.
        half = 3 * len(str(mark["label"]))
        anchor = ("end" if px(mark["x"]) + half > width else "start" if px(mark["x"]) - half < 0 else "middle")
        parts.append(f'<line x1="{px(mark["x"]):.1f}" y1="{top}" x2="{px(mark["x"]):.1f}" y2="{top + ph}" '
                     f'stroke="#888" stroke-dasharray="2 2"/><text x="{px(mark["x"]):.1f}" y="{top - 4}" '
                     f'class="k" text-anchor="{anchor}">{_e(mark["label"])}</text>')
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        pts = [(px(x), py(y)) for x, y in zip(s["x"], s["y"]) if _finite(x) and _finite(y)]
        if s.get("points"):
            sizes = s.get("sizes") or [1] * len(pts)
            biggest = max(sizes) or 1
            for (cx, cy), size in zip(pts, sizes):
                r = 2.5 + 5.5 * math.sqrt(size / biggest)
                parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}" fill="{color}" fill-opacity="0.6"/>')
        elif pts:
            dash = ' stroke-dasharray="5 3"' if s.get("dash") else ""
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
            if len(pts) == 1:
                parts.append(f'<circle cx="{pts[0][0]:.1f}" cy="{pts[0][1]:.1f}" r="3" fill="{color}"/>')
        ly = legend_top + 8 + 15 * i
        dash = ' stroke-dasharray="5 3"' if s.get("dash") else ""
        key = (f'<circle cx="{left + 9}" cy="{ly - 3}" r="4" fill="{color}" fill-opacity="0.6"/>' if s.get("points")
               else f'<line x1="{left}" y1="{ly - 3}" x2="{left + 18}" y2="{ly - 3}" stroke="{color}" '
                    f'stroke-width="2"{dash}/>')
        parts.append(f'{key}<text x="{left + 24}" y="{ly + 1}" class="k legend">{_e(s["label"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _tick(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-9 else "0"


def confusion_svg(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """A 2x2 confusion matrix as SVG (rows true class, columns predicted), shaded by row share."""
    cell, left, top = 90, 110, 46
    width, height = left + 2 * cell + 10, top + 2 * cell + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="confusion matrix">',
             f'<text x="{left + cell}" y="14" class="a" text-anchor="middle">predicted</text>']
    for j, label in enumerate(labels):
        parts.append(f'<text x="{left + j * cell + cell / 2}" y="{top - 8}" class="k" '
                     f'text-anchor="middle">{_e(label)}</text>')
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        parts.append(f'<text x="{left - 8}" y="{top + i * cell + cell / 2 + 4}" class="k" text-anchor="end">'
                     f'true {_e(labels[i])}</text>')
        for j, count in enumerate(row):
            share = count / total
            fill = f"rgb({int(255 - 180 * share)},{int(255 - 130 * share)},{int(255 - 60 * share)})"
            parts.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" '
                         f'fill="{fill}" stroke="#fff"/><text x="{left + j * cell + cell / 2}" '
                         f'y="{top + i * cell + cell / 2 + 6}" class="n" text-anchor="middle">{int(count)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------
# Sections


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ci_text(v: Sequence[float]) -> str:
    return f"{_fmt(v[0])} [{_fmt(v[1])}, {_fmt(v[2])}]"


METRIC_LABELS = {
    "accuracy": "accuracy", "auc": "ROC AUC", "sensitivity": "sensitivity (recall, malignant)",
    "specificity": "specificity", "ppv": "PPV (precision)", "npv": "NPV", "f1": "F1", "brier": "Brier score",
    "loss": "log loss", "prevalence": "prevalence (malignant share)",
}


def _wilson_rows(wilson: dict | None) -> list[tuple[str, str]]:
    """Table rows for Wilson intervals over lesion groups (``test_ci95_wilson_groups``, a site's
    ``wilson_groups``): the rates' intervals that stay wide where the bootstrap collapses."""
    return [(f"{METRIC_LABELS.get(k, k)}: Wilson 95% over lesion groups", f"[{_fmt(v[1])}, {_fmt(v[2])}]")
            for k, v in (wilson or {}).items()]


def _wilson_text(wilson: dict | None, key: str) -> str:
    v = (wilson or {}).get(key)
    return f"[{_fmt(v[1])}, {_fmt(v[2])}]" if v else ""


def overview_section(run: Path, result: dict | None) -> str:
    """What a reader must know before any number: what each stage learned from (the built-in data are
    synthetic: drawn by msbt, no patient's), how many lesions the test numbers rest on, what sensitivity and
    specificity mean at the run's threshold, and where the numbers hold."""
    from msbt.config import ConfigError, load_config
    from msbt.runfolder import run_stages

    try:  # the run's own settings, with the defaults of its time filled in as every step reads them
        config = load_config([run / "config.yaml"]) if (run / "config.yaml").is_file() else None
    except ConfigError:
        config = None
    items = []
    if config and not config.data.ultrasound:
        items.append("<b>Synthetic data.</b> Every ultrasound image of this run (training, validation and test) is "
                     "msbt's built-in synthetic data: B-mode-like pictures of simulated lesions drawn by a program, "
                     "not images of patients. The numbers below say that the software works, not how the model "
                     "would do on real breast ultrasound; it is not for clinical use.")
    micro = _read_json(run / "data" / "microscope" / "split.json")
    if config and 1 in run_stages(config):
        kind = ("built-in <b>synthetic</b> microscope fields of " if not config.data.microscope
                else "microscope images of ")
        size = f" ({micro['images']} fields)" if micro else ""
        classes = ", ".join(micro["classes"]) if micro else "four cell lines"
        weights = config.stage1.weights
        start = {"imagenet": "ImageNet weights (photographs)", "none": "random weights"}.get(
            weights, f"the weights file <code>{_e(weights)}</code>")
        items.append(f"Stage 1 (the middle stage) learned to tell cell lines apart from {kind}{_e(classes)}{size}, "
                     f"starting from {start}; stage 2 starts from it.")
    us = _read_json(run / "data" / "ultrasound" / "split.json")
    if us:
        origin = "the built-in synthetic set" if config and not config.data.ultrasound else f"<code>{_e(us['root'])}</code>"
        n = {split: sum(us["counts"][split].values()) for split in ("train", "val", "test")}
        below = "for the test metrics below" if result else "for the test metrics (not measured in this run yet)"
        items.append(f"Stage 2 (benign vs malignant) was trained on {n['train']} images from {origin}; {n['val']} "
                     f"more chose its epoch and threshold (validation) and {n['test']} were held out {below} (test): "
                     f"{us['images']} images of {us['groups']['count']} lesion groups in all, several images of one "
                     "lesion always in one split.")
    if result and result.get("test"):
        items.append(_reading_text(run, result))
    scope = (result or {}).get("scope", {}).get("kind")
    if scope == "internal":
        items.append("<b>Where these numbers hold.</b> The test images come from the same source as the training "
                     "images (an internal estimate). They do not say how the model does at another hospital, "
                     "whose scanners, settings and patients differ; that is measured by scoring the other site's "
                     "images (<code>msbt external</code>, the External sites section when it is there).")
    if not items:
        return ""
    return _section("Read this first", "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>", "overview")


def _reading_text(run: Path, result: dict) -> str:
    """Sensitivity and specificity in words, with the images and lesions behind each."""
    t = result["test"]
    lesions = {}
    try:
        with (run / "predictions.csv").open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row["split"] == "test":
                    lesions.setdefault(int(row["y"]), set()).add((row.get("site", ""), row["group"]))
    except (OSError, KeyError, ValueError):
        lesions = {}
    wilson = result.get("test_ci95_wilson_groups") or {}
    perfect = (t["tp"] > 0 and t["fn"] == 0) or (t["tn"] > 0 and t["fp"] == 0)  # a rate of 1.000 to explain

    def rate(name, hit, total, cls):
        value = f"{hit} of {total} images" + (f" ({len(lesions[cls])} lesions)" if cls in lesions else "")
        w = wilson.get(name)
        return value + (f", 95% interval over lesions {_fmt(w[1])} to {_fmt(w[2])}" if w else "")

    return (f"<b>Reading the test numbers.</b> The model gives each image a probability of malignancy; an image is "
            f"called malignant when it is at least the threshold {threshold_text(result.get('threshold'))}, chosen "
            "on the validation split, never on the test images. <i>Sensitivity</i> is the share of malignant test "
            f"images called malignant: {rate('sensitivity', t['tp'], t['tp'] + t['fn'], 1)}. <i>Specificity</i> is "
            f"the share of benign test images called benign: {rate('specificity', t['tn'], t['tn'] + t['fp'], 0)}."
            + (f" With {result.get('test_groups')} lesion groups the intervals are wide"
               + (": a rate of 1.000 here is compatible with a much lower true rate" if perfect else "") + "."
               if (result.get("test_groups") or 0) < 20 else ""))


def metrics_section(result: dict | None) -> str:
    if not result:
        return _section("Test metrics", "<p class=missing>No metrics.json in this run yet (the stage-2 model "
                        "has not been evaluated).</p>", "metrics")
    ci = result.get("test_ci95", {})
    rows = [(METRIC_LABELS.get(k, k), _ci_text(ci[k])) for k in METRIC_LABELS if k in ci]
    rows += _wilson_rows(result.get("test_ci95_wilson_groups"))
    # "held-out" is the word leave one site out uses for a site never seen; a run's own split is internal
    own = "the run's own test split (internal)" if (result.get("scope") or {}).get("kind") == "internal" else "test split"
    intro = (f"<p>{_e(_sentence(own))}: {result.get('test_images')} images in {result.get('test_groups')} lesion "
             f"groups. Threshold {threshold_text(result.get('threshold'))} chosen on the validation split "
             f"({result.get('val_images', '?')} images) by {_e(result.get('threshold_rule'))}; validation AUC (exact) "
             f"{_fmt(result.get('val_auc_exact', result.get('val_auc')))}. Intervals: 95% percentile bootstrap, "
             f"{_e(result.get('ci', {}).get('resamples', '?'))} resamples; unit resampled: "
             f"{_e(result.get('ci', {}).get('unit', 'group'))}.</p>")
    site_notes = [f"site {site}: {n}" for site, r in (result.get("sites") or {}).items() for n in r.get("notes", [])]
    notes = "".join(f"<li>{_e(n)}</li>" for n in [*result.get("notes", []), *site_notes])
    charts = []
    roc = result.get("roc_curve") or {}
    if roc.get("fpr"):
        test = result["test"]
        op = {"label": "operating point", "x": [1 - test["specificity"]], "y": [test["sensitivity"]], "points": True}
        curve = {"label": f"test (AUC {_fmt(test['auc'])})", "x": roc["fpr"], "y": roc["tpr"]}
        charts.append(line_chart([curve, op], title="ROC, test split", xlabel="1 - specificity", ylabel="sensitivity",
                                 xlim=(0, 1), ylim=(0, 1), diagonal=True, square=True))
    cal = result.get("calibration") or {}
    if cal.get("counts"):
        charts.append(line_chart([{"label": "bins (area ~ images)", "x": cal["mean_predicted"], "y": cal["observed"],
                                   "points": True, "sizes": cal["counts"]}],
                                 title=f"Calibration, {cal['bins']} equal-width bins", xlabel="mean predicted p",
                                 ylabel="observed malignant share", xlim=(0, 1), ylim=(0, 1), diagonal=True,
                                 square=True))
    cm = result.get("confusion_matrix")
    if cm:
        charts.append(confusion_svg(cm["matrix"], cm["labels"]))
    per_site = [(site, r["images"], r["groups"], *[_ci_text(r[k]) if k in r else "" for k in
                                                   ("auc", "sensitivity", "specificity")],
                 *[_wilson_text(r.get("wilson_groups"), k) for k in ("sensitivity", "specificity")])
                for site, r in (result.get("sites") or {}).items()]
    if per_site:
        intro += "<p>Per site, at the same threshold (bootstrap intervals; Wilson intervals over the site's lesion " \
                 "groups beside them):</p>" + _table(
            ("site", "images", "groups", "AUC", "sensitivity", "specificity", "sensitivity, Wilson",
             "specificity, Wilson"), per_site)
    spread = result.get("threshold_ci95")
    if spread and all(isinstance(v, (int, float)) for v in spread):
        intro += (f"<p>Threshold {threshold_text(spread[0])}: 95% range over bootstrap resamples of the validation "
                  f"groups [{threshold_text(spread[1])}, {threshold_text(spread[2])}].</p>")
    body = (intro + _table(("metric", "value [95% CI]"), rows) + _members_text(result.get("checkpoint"))
            + (f"<ul class=notes>{notes}</ul>" if notes else "") + f'<div class="charts">{"".join(charts)}</div>')
    return _section("Test metrics", body, "metrics")


def _members_text(checkpoint: str | None) -> str:
    """For an average of models (msbt.model.ensemble): each member's test AUC on the same rows and what the
    average adds (``members.json`` beside the checkpoint folder, msbt.jobs.ensemble); '' otherwise."""
    report = _read_json(Path(checkpoint).parent / "members.json") if checkpoint else None
    if not report or report.get("checkpoint") != checkpoint:
        return ""
    v = report["vs_members"]
    rows = [(f"member {i}" + ("" if m.get("seed") is None else f" (seed {m['seed']})"), _ci_text(m["test_auc"]),
             m["path"]) for i, m in enumerate(report["members"])]
    return (f"<p>The model is the average of {len(rows)} stage-2 models' probabilities. Each on the same test rows, "
            "and the average minus their mean AUC (paired on the test images, given these members):</p>"
            + _table(("member", "test AUC [95% CI]", "checkpoint"), rows)
            + f"<p>Average - members' mean AUC: {v['diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}].</p>")


def _stage_history(checkpoint: Path) -> tuple[dict, int | None]:
    """A stage's per-epoch history and the kept epoch.

    From the stage folder's ``history.json`` (every epoch, written during training); for runs older
    than that file, the longest history among the kept checkpoints (each manifest holds the epochs up
    to its own, so epochs after the last improvement are missing).
    """
    best = _read_json(checkpoint / "manifest.json") or {}
    history, chosen = best.get("history", {}), best.get("best_epoch")
    full = _read_json(checkpoint.parent / "history.json")
    if full and full.get("history"):
        return full["history"], chosen
    for sibling in checkpoint.parent.glob("checkpoint_*/manifest.json"):
        other = _read_json(sibling) or {}
        if len(next(iter(other.get("history", {}).values()), [])) > len(next(iter(history.values()), [])):
            history = other["history"]
    return history, chosen


def training_section(checkpoint: str | None) -> str:
    from msbt.model.checkpoint import lineage

    if not checkpoint or not Path(checkpoint).is_dir():
        return _section("Training curves", "<p class=missing>No evaluated checkpoint recorded.</p>", "training")
    charts, notes, drawn = [], [], set()
    members = (_read_json(Path(checkpoint) / "manifest.json") or {}).get("members")
    # an average of models has no curves of its own: each member's chain is drawn (a shared stage 1 once)
    chains = ([(f", seed {m['seed']}" if m.get("seed") is not None else f", member {i}", lineage(m["path"]))
               for i, m in enumerate(members)] if members else [("", lineage(checkpoint))])
    for tag, chain in chains:
        for entry in chain:
            if entry.get("manifest") and entry["path"] not in drawn:
                drawn.add(entry["path"])
                _stage_charts(entry, tag, charts, notes)
    body = "".join(f"<p class=note>{_e(n)}</p>" for n in notes) + f'<div class="charts">{"".join(charts)}</div>'
    return _section("Training curves", body, "training")


def _stage_charts(entry: dict, tag: str, charts: list, notes: list) -> None:
    """One stage's loss and AUC (or accuracy) curves with the kept epoch marked, appended to ``charts``."""
    manifest = entry["manifest"]
    history, best_epoch = _stage_history(Path(entry["path"]))
    stage = manifest["stage"]
    tag = tag if stage == 2 else ""  # members share their stage 1
    marks = [{"x": best_epoch, "label": f"kept (epoch {best_epoch})"}] if best_epoch else []
    epochs = list(range(1, 1 + max((len(v) for v in history.values()), default=0)))
    for metric in ("loss", "auc" if stage == 2 else "accuracy"):
        # Training-time AUCs are Keras' binned estimates; the exact validation AUC is in the metrics above.
        suffix = " (Keras, 200 thresholds)" if metric == "auc" else ""
        series = [{"label": name + suffix, "x": epochs[:len(history[name])], "y": history[name],
                   "dash": name.startswith("val_")}
                  for name in (metric, f"val_{metric}") if name in history]
        if series:
            charts.append(line_chart(series, title=f"Stage {stage} ({manifest['backbone']}{tag}): {metric}",
                                     xlabel="epoch", ylabel=metric, marks=marks, integer_x=True))
    configured = manifest.get("config", {}).get("epochs")
    if configured and len(epochs) < configured:
        notes.append(f"stage {stage}{tag}: epochs 1-{len(epochs)} of {configured} recorded (no history.json in "
                     f"{Path(entry['path']).parent}: a run from before it existed, or an interrupted one)")


def data_section(run: Path) -> str:
    parts = []
    for modality in MODALITIES:
        folder = run / "data" / modality
        summary = _read_json(folder / "split.json")
        if not summary:
            continue
        classes = summary["classes"]
        rows = [(split, *[summary["counts"][split].get(c, 0) for c in classes],
                 sum(summary["counts"][split].values())) for split in ("train", "val", "test")]
        g, leak = summary["groups"], summary["leakage"]
        parts.append(
            f"<h3>{_e(modality)}</h3><p>{summary['images']} images from <code>{_e(summary['root'])}</code>; "
            f"{summary['rejects']} rejected; grouping <b>{_e(summary['grouping'])}</b>: {g['count']} groups, "
            f"{g['multi_image']} with several images (largest {g['largest']}), {len(g['mixed_label'])} mixing "
            f"classes. Split seed {summary['seed']}, ratios {summary['ratios']}, {summary['folds']} folds. A naive "
            f"random split would put {leak['naive_random']['val']} val and {leak['naive_random']['test']} test "
            f"images beside a frame of their lesion in training; this split: "
            f"{leak['group_aware']['val'] + leak['group_aware']['test']}.</p>"
            + _table(("split", *classes, "total"), rows) + _sites_table(summary) + _rejects(folder / "rejects.csv"))
    body = "".join(parts) or "<p class=missing>No saved split in this run.</p>"
    return _section("Data", body, "data")


def _sites_table(summary: dict) -> str:
    """Per-site split counts and the cross-site near-duplicates, for a split of several sites."""
    sites = summary.get("sites", {})
    if len(sites) < 2:
        return ""
    classes = summary["classes"]
    rows = [(site, split, *[per[split].get(c, 0) for c in classes]) for site, per in sites.items()
            for split in ("train", "val", "test")]
    cross = summary.get("cross_site_duplicates", {})
    return ("<p>Per site (stratified by site and class; groups never span sites):</p>"
            + _table(("site", "split", *classes), rows)
            + f"<p>Near-duplicates across sites: {cross.get('pairs', 0)} pairs ({cross.get('images', 0)} images), "
            f"{cross.get('pairs_across_train_and_held_out', 0)} of them across train and val/test; reported, "
            "not merged (see docs/evaluation.md, Sites).</p>")


def _rejects(path: Path, shown: int = 20) -> str:
    if not path.is_file():
        return ""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) <= 1:
        return "<p>No rejected files.</p>"
    header, body = rows[0], rows[1:]
    more = f"<p>... and {len(body) - shown} more in <code>{_e(path)}</code></p>" if len(body) > shown else ""
    return f"<p>Rejected files ({len(body)}):</p>" + _table(header, body[:shown]) + more


def lineage_section(checkpoint: str | None) -> str:
    from msbt.model.checkpoint import format_lineage

    if not checkpoint or not Path(checkpoint).is_dir():
        return _section("Lineage", "<p class=missing>No evaluated checkpoint recorded.</p>", "lineage")
    # long checkpoint paths wrap rather than hide behind a scroll bar (what a reader checks is their ends)
    return _section("Lineage", f"<pre class=wrap>{_e(format_lineage(checkpoint))}</pre>", "lineage")


def gradcam_section(run: Path, result: dict | None, samples: int = 4) -> str:
    """Sample Grad-CAM overlays of test images (needs msbt.model.gradcam and TensorFlow)."""
    title = "Grad-CAM samples"
    if not result or not Path(result.get("checkpoint", "")).is_dir():
        return _section(title, "<p class=missing>No evaluated checkpoint recorded.</p>", "gradcam")
    try:
        from msbt.model import gradcam
    except ImportError as err:
        return _section(title, f"<p class=missing>NOT AVAILABLE: msbt.model.gradcam could not be imported ({_e(err)}); "
                        "this section fills in once it is installed.</p>", "gradcam")
    try:
        figures = _gradcam_figures(gradcam, run, result, samples)
    except Exception as err:  # a report must still be written when explanations fail
        return _section(title, f"<p class=missing>Grad-CAM failed: {_e(type(err).__name__)}: {_e(err)}</p>", "gradcam")
    return _section(title, "<p>Test images with the heatmap of the malignant output over them (red = more "
                    "influence). Caption: true class, predicted probability of malignancy (with more digits near 0 "
                    "and 1) and the call at the run's threshold.</p>"
                    f'<div class="cams">{"".join(figures)}</div>', "gradcam")


def _gradcam_figures(gradcam, run: Path, result: dict, samples: int) -> list[str]:
    import cv2
    import numpy as np

    from msbt.model.checkpoint import read_manifest
    from msbt.eval.evaluate import load_stage2
    from msbt.data.store import read_store

    store = run / "stores" / "ultrasound"
    data = read_store(store, columns=["image", "label_index", "source"], split="test")
    if len(data["label_index"]) == 0:
        return ["<p class=missing>The store has no test images.</p>"]
    # Alternate malignant and benign images, so both classes are shown when both are there.
    malignant, benign = (list(np.flatnonzero(data["label_index"] == c)) for c in (1, 0))
    order = [i for pair in itertools.zip_longest(malignant, benign) for i in pair if i is not None][:samples]
    model, stage = load_stage2(result["checkpoint"])
    names = read_manifest(result["checkpoint"])["class_names"]
    size = stage.image_size
    images = np.stack([cv2.resize(data["image"][i], (size, size), interpolation=cv2.INTER_AREA) for i in order])
    heat = gradcam.gradcam(model, images)
    probs = np.asarray(model.predict(images.astype("float32"), verbose=0)).reshape(-1)
    threshold = result.get("threshold")
    figures = []
    for k, i in enumerate(order):
        # "p=0.00" beside a threshold of 0.00045 did not say which side the image fell on
        call = "" if not _finite(threshold) else f", called {_e(names[int(probs[k] >= threshold)])}"
        shown = gradcam.overlay(images[k], heat[k], alpha=0.4)
        ok, png = cv2.imencode(".png", cv2.cvtColor(shown, cv2.COLOR_RGB2BGR))
        if not ok:
            continue
        src = base64.b64encode(png.tobytes()).decode("ascii")
        figures.append(f'<figure><img alt="Grad-CAM {_e(data["source"][i])}" src="data:image/png;base64,{src}">'
                       f"<figcaption>{_e(names[int(data['label_index'][i])])}, p={threshold_text(float(probs[k]))}{call}<br>"
                       f"<small>{_e(data['source'][i])}</small></figcaption></figure>")
    return figures


def experiments_section(run: Path) -> str:
    """Tables of the cross-validation, Table 1 and comparison workflows, when they have run."""
    parts = []
    cv = _read_json(run / "crossval" / "crossval.json")
    if cv:
        keys = ("accuracy", "auc", "sensitivity", "specificity", "f1", "loss")
        rows = [(r["fold"], r["test_images"], *[_ci_text([r[k], r["auc_low"], r["auc_high"]]) if k == "auc" and
                                                 "auc_low" in r else r[k] for k in keys]) for r in cv["rows"]]
        rows.append(("mean ± sd", "", *[f"{_fmt(cv['summary'][k][0])} ± {_fmt(cv['summary'][k][1])}" for k in keys]))
        charts = line_chart([{"label": k, "x": [r["fold"] for r in cv["rows"]], "y": [r[k] for r in cv["rows"]],
                              "points": True} for k in ("accuracy", "auc")],
                            title="Per-fold held-out accuracy and AUC", xlabel="fold", ylabel="value", ylim=(0, 1),
                            # half a fold of room each side: fold 0's and the last fold's markers sat on the frame
                            xlim=(-0.5, len(cv["rows"]) - 0.5), integer_x=True)
        oof = cv.get("oof_threshold")
        oof_text = ""
        if oof:
            from msbt.eval.threshold import format_oof

            oof_text = "<p>" + "<br>".join(_e(line) for line in format_oof(oof).splitlines()) + "</p>"
        pooled = cv.get("pooled")
        pooled_text = ""
        if pooled:
            from msbt.eval.evaluate import pooled_lines

            first, *notes = pooled_lines(pooled)
            pooled_text = (f"<p><b>The number to quote</b>: {_e(first)}.</p>"
                           + "".join(f'<p class="note">{_e(n.strip())}</p>' for n in notes))
        parts.append(f"<h3>{cv['folds']}-fold cross-validation</h3><p>{_e(cv['design'])}.</p>"
                     + _table(("fold", "held-out images", *keys), rows) + pooled_text + oof_text
                     + f'<div class="charts">{charts}</div>')
    loso = _read_json(run / "loso" / "loso.json")
    if loso:
        rows = [(r["site"], r["test_images"], _ci_text(r["held_out_auc"]), (_ci_text(r["internal_auc"]) + (
            f" ({r['internal_images']} images)" if r.get("internal_images") is not None else "")) if r.get(
            "internal_auc") else "", _ci_text(r["gap_ci95"]) if r.get("gap_ci95") and all(_finite(x) for x in r["gap_ci95"])
            else _fmt(r.get("gap")), r.get("contamination_excluded", 0)) for r in loso["rows"]]
        seeds = loso.get("seeds") or []
        parts.append(f"<h3>Leave one site out</h3><p>{_e(loso['design'])}"
                     + (f"; training seed {seeds[0]} of {len(seeds)}" if len(seeds) > 1 else "") + ".</p>" + _table(
            ("held-out site", "images", "held-out AUC", "internal AUC (other sites' test)", "gap [95% CI]",
             "near-dupes excluded"),
            rows))
        summary = loso.get("summary") or {}
        if summary.get("worst_held_out_auc"):  # the line the terminal gives, and the docs say to quote
            over = f" (mean of {len(seeds)} training seeds)" if loso.get("across_seeds") else ""
            mean_text = mean_over_sites_text(summary, len(loso["rows"]))
            parts.append(f"<p><b>The number to quote</b>{over}: at a site it never saw, AUC "
                         f"{_ci_text(summary['worst_held_out_auc'])} at the worst ({_e(summary['worst_site'])}), "
                         f"{_e(mean_text)}; not the internal AUC.</p>")
        if loso.get("across_seeds"):
            # the averaged model of 1, 2, ... of the seeds, with three seeds or more (with two, each seed and both
            # averaged are the columns before; a loso.json written before 2026-12-07 has none)
            sized = any(len(r.get("ensemble_by_size") or ()) > 2 for r in loso["across_seeds"])
            rows = [(r["site"], r["images"], _ci_text([r["held_out_auc_mean"], *r["ci"]]) if r.get("ci") else
                     _fmt(r["held_out_auc_mean"]), _ci_text([r["held_out_auc_mean"], *r["ci_cases"]]), _fmt(r["seed_sd"]),
                     " ".join(_fmt(a) for a in r["per_seed"]), _ci_text(r["ensemble_auc"]),
                     *([" ".join(f"{e['models']}: {_fmt(e['auc_mean'])}" for e in r.get("ensemble_by_size") or ())
                        or "-"] if sized else []))
                    for r in loso["across_seeds"]]
            parts.append(f"<p>Stage 2 of the same design over {len(seeds)} training seeds {_e(str(seeds))} on the same "
                         "split: the mean over seeds is the number to quote, with its interval over the held-out "
                         "images and the seeds together (beside it, over the images alone); the averaged model scores "
                         "the mean of the seeds' probabilities (<code>msbt ensemble</code> makes it one checkpoint)"
                         + ("; last, the averaged model of 1, 2, ... of the seeds (its AUC, mean over the subsets of "
                            "that many): where it stops rising, more seeds add little" if sized else "") + ".</p>"
                     + _table(("held-out site", "images", "mean AUC [95% CI]", "[95% CI images only]", "sd over seeds",
                               "per seed", "averaged model AUC", *(["averaged over k seeds"] if sized else [])), rows))
    lc = _read_json(run / "loso" / "compare.json")
    if lc:
        seeds = lc.get("seeds") or []
        if len(seeds) > 1:  # each arm over the seeds: its mean per site, and differences of the means
            rows = [(arm, r["site"], r["images"], _ci_text([r["held_out_auc_mean"], *r["ci"]]) if r.get("ci") else
                     _fmt(r["held_out_auc_mean"]), _fmt(r["seed_sd"]), _ci_text(r["ensemble_auc"]))
                    for arm, part in lc["arms"].items() for r in part["across_seeds"]]
            header = ("arm", "held-out site", "images", "mean AUC over seeds [95% CI]", "sd over seeds",
                      "averaged model AUC")
            intro = (f"Each arm trained per held-out site on the other sites with {len(seeds)} training seeds "
                     f"{_e(str(seeds))}; differences are of the arms' means over the seeds, with intervals over the "
                     "held-out images and both arms' seeds.")
            tests = [(site, f"{t['a']} − {t['b']}", _ci_text([t["over_seeds"]["diff"], *t["over_seeds"]["ci"]]),
                      _fmt(t["over_seeds"]["p_value"])) for site, ts in lc["paired"].items() for t in ts
                     if "error" not in t["over_seeds"]]
        else:
            rows = [(arm, r["site"], r["test_images"], _ci_text(r["held_out_auc"]),
                     _ci_text(r["internal_auc"]) if r.get("internal_auc") else "")
                    for arm, part in lc["arms"].items() for r in part["rows"]]
            header = ("arm", "held-out site", "images", "held-out AUC", "internal AUC")
            intro = ("Each arm trained once per held-out site on the other sites; differences are paired on the "
                     "held-out site's images (group bootstrap).")
            tests = [(site, f"{t['a']} − {t['b']}",
                      _ci_text([t["paired_bootstrap"]["diff"], *t["paired_bootstrap"]["ci"]]),
                      _fmt(t["paired_bootstrap"]["p_value"])) for site, ts in lc["paired"].items() for t in ts
                     if "error" not in t["paired_bootstrap"]]
        if lc.get("stage1_origin"):
            intro += f" {_e(_sentence(stage1_origin_text(lc['stage1_origin'])))}."
        across = lc.get("across_sites") or {}
        pooled = [(f"{t['a']} − {t['b']}", t["error"] if "error" in t else _ci_text([t["diff"], *t["ci"]]),
                   "" if "error" in t else _fmt(t["p_value"])) for t in across.get("pairs", ())]
        if pooled:
            seed = f" (training seed {across['seed']})" if len(seeds) > 1 else ""
            pooled_html = (f"<p><b>At a site it never saw</b>{seed}: each held-out site's own AUC difference, averaged "
                           "over the sites (every site alike; lesion groups resampled within each site):</p>"
                           + _table(("arms", "mean AUC difference over sites [95% CI]", "p"), pooled))
        else:
            pooled_html = ""
        parts.append(f"<h3>Stage-2 starting points under leave one site out</h3><p>{intro}</p>" + _table(header, rows)
                     + _table(("held-out site", "arms", "AUC difference [95% CI]", "p"), tests) + pooled_html)
    ab = _read_json(run / "ablation" / "ablation.json")
    if ab:
        rows = [(r["label"], _ci_text(r["loss"]), _ci_text(r["accuracy"]), _ci_text(r["auc"]),
                 _fmt(r["paper_accuracy"], 2)) for r in ab["rows"]]
        parts.append("<h3>Table 1: stage-2 settings</h3><p>Same split, seeds and stage-1 checkpoint; ours on "
                     f"{_e(ablation_test_text(ab))}, with 95% CIs; paper: {_e(ab['paper'])}.</p>"
                     + _table(("setting", "loss", "accuracy", "AUC", "paper accuracy"), rows))
    cmp_ = _read_json(run / "compare" / "compare.json")
    if cmp_:
        rows = [(arm, _ci_text(s["ci95"]["accuracy"]), _ci_text(s["ci95"]["auc"]),
                 _ci_text(s["ci95"]["loss"]) if "loss" in s["ci95"] else s["test"]["loss"])
                for arm, s in cmp_["arms"].items()]
        body = _table(("stage-2 start", "accuracy", "AUC", "loss"), rows)
        tests = []
        for pair in cmp_["paired"]:
            cells = [f"{pair['a']} - {pair['b']}"]
            for name in ("delong", "paired_bootstrap"):
                t = pair[name]
                cells.append(t["error"] if "error" in t else
                             f"{t['diff']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}], p = {t['p_value']:.3g}")
            tests.append(cells)
        if tests:
            caveat = delong_caveat(cmp_)
            body += ("<p>AUC differences on the same test images (paired):</p>"
                     + _table(("pair", "DeLong (images as independent)", "paired bootstrap by lesion"), tests)
                     + (f"<p class=note>{_e(_sentence(caveat))}.</p>" if caveat else ""))
        nv = cmp_.get("naive_vs_group")
        if nv:
            leak = nv["naive_test_leakage"]
            body += ("<p>Naive random split vs group-aware split (multistage, same data and budget; different test "
                     "sets):</p>" + _table(("split", "accuracy", "AUC", "test images"), [
                         (name, _ci_text(nv[name]["ci95"]["accuracy"]), _ci_text(nv[name]["ci95"]["auc"]),
                          nv[name]["test_images"]) for name in ("group_aware", "naive")])
                     + f"<p>Naive minus group-aware: {_e(inflation_text(nv))}. {leak['leaked_images']} of "
                     f"{leak['leaked_images'] + leak['clean_images']} naive test images had a frame of their lesion "
                     "in naive train/val.</p>")
        origin = f"<p>{_e(_sentence(stage1_origin_text(cmp_['stage1_origin'])))}.</p>" if cmp_.get(
            "stage1_origin") else ""
        parts.append("<h3>Does the middle stage help?</h3>" + origin + body)
    if not parts:
        return ""
    return _section("Experiments", "".join(parts), "experiments")


def external_section(run: Path) -> str:
    """One subsection per external site (``external/<site>/metrics.json``, msbt.eval.external)."""
    from msbt.eval.external import read_sites

    sites = read_sites(run)
    if not sites:
        return ""
    parts = ["<p>Each site scored with the run's preparation at the run's validation threshold; intervals are 95% "
             "group bootstraps. The site's own best threshold is chosen on the site's images themselves: "
             "<b>optimistic</b>, shown only as the most a re-chosen threshold could recover.</p>"]
    for site, r in sites.items():
        c = r.get("contamination", {})
        head = (f"<h3>{_e(site)}</h3><p>{_e(r.get('source'))}: {r.get('images')} images scored "
                f"({r.get('groups')} lesion groups, {r.get('malignant')} malignant); contamination check "
                f"(near-duplicates of the run's train/val images): {_e(_contamination_text(c))}.</p>")
        body = "".join(f"<p>{_e(METRIC_LABELS.get(k, k))} at the run's threshold: {_fmt(v[0])} [{_fmt(v[1])}, "
                       f"{_fmt(v[2])}] (Wilson 95% over lesion groups; the site has one class)</p>"
                       for k, v in (r.get("one_class") or {}).items())
        at = r.get("at_run_threshold")
        if at:
            rows = [(METRIC_LABELS.get(k, k), _ci_text(v)) for k, v in at.items() if k in METRIC_LABELS]
            rows += _wilson_rows(r.get("wilson_groups"))
            t = r["threshold_transfer"]
            transfer = _table(("threshold", "value", "sensitivity", "specificity"), [
                ("run's validation threshold", threshold_text(t["run_threshold"]), t["run"]["sensitivity"],
                 t["run"]["specificity"]),
                ("site's own best (optimistic)", threshold_text(t["site_best_threshold"]),
                 t["site_best_optimistic"]["sensitivity"],
                 t["site_best_optimistic"]["specificity"])])
            cal = r["calibration"]
            chart = line_chart([{"label": "bins (area ~ images)", "x": cal["mean_predicted"], "y": cal["observed"],
                                 "points": True, "sizes": cal["counts"]}], title=f"Calibration at {site}",
                               xlabel="mean predicted p", ylabel="observed malignant share", xlim=(0, 1),
                               ylim=(0, 1), diagonal=True, square=True)
            body = (_table(("metric at the run's threshold", "value [95% CI]"), rows) + "<p>Threshold transfer:</p>"
                    + transfer + f"<p>Calibration-in-the-large (mean p minus malignant share) "
                    f"{cal['in_the_large']:+.3f}; Brier {_fmt(cal['brier'])}; {share_text(r['called_malignant'])} called "
                    f"malignant.</p><div class=charts>{chart}</div>")
        warn = "".join(f"<li>{_e(w)}</li>" for w in [*r.get("out_of_depth", []), *r.get("notes", [])])
        parts.append(head + body + (f"<ul class=notes>{warn}</ul>" if warn else ""))
    return _section("External sites", "".join(parts), "external")


def _contamination_text(c: dict) -> str:
    if not c.get("checked"):
        return "not checked"
    found = c.get("found", 0)
    if not found:
        return f"none found among {c.get('run_images_compared', '?')} run images"
    return f"{found} found, {'excluded from the numbers' if c.get('excluded') else 'kept (--keep-duplicates)'}"


def config_section(run: Path) -> str:
    path = run / "config.yaml"
    text = path.read_text() if path.is_file() else "(no config.yaml)"
    return _section("Configuration", f"<pre>{_e(text)}</pre>", "config")


# ---------------------------------------------------------------------------------------------------
# The page

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1120px;
color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
h3{font-size:15px}table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left}th{background:#f4f4f4}pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}pre.wrap{white-space:pre-wrap;overflow-wrap:anywhere}
.charts,.cams{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.missing{color:#a33}.note{color:#555}
svg text.t{font-size:13px;font-weight:600}svg text.k{font-size:10px;fill:#444}svg text.a{font-size:11px}
svg text.n{font-size:18px}figure{margin:0;width:180px}figure img{width:180px;image-rendering:pixelated}
figcaption{font-size:12px}nav a{margin-right:12px}
"""


def _safe(section, *args) -> str:
    """One section's HTML; a section that fails (e.g. a damaged file) says so instead of losing the page."""
    try:
        return section(*args)
    except Exception as err:
        name = section.__name__.removesuffix("_section")
        return _section(name, f"<p class=missing>This section could not be drawn: {_e(type(err).__name__)}: "
                        f"{_e(err)}</p>", name)


def render(run: str | Path, *, gradcam_samples: int = 4) -> str:
    """The HTML of a run's report (see the module docstring for what it reads)."""
    run = Path(run)
    result = _read_json(run / "metrics.json")
    checkpoint = result.get("checkpoint") if result else None
    sections = [_safe(overview_section, run, result), _safe(metrics_section, result), _safe(training_section, checkpoint), _safe(data_section, run),
                _safe(gradcam_section, run, result, gradcam_samples), _safe(external_section, run),
                _safe(experiments_section, run),
                _safe(lineage_section, checkpoint), _safe(config_section, run)]
    # links only to the sections the page has (external sites and experiments are left out while there are none:
    # their links led nowhere)
    body = "".join(sections)
    nav = " ".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("overview", "read this first"), ("metrics", "metrics"), ("training", "training"), ("data", "data"), ("gradcam", "Grad-CAM"),
        ("external", "external sites"), ("experiments", "experiments"), ("lineage", "lineage"),
        ("config", "config")) if f'<section id="{a}">' in body)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>msbt report: {_e(run.name)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>msbt report: {_e(run.name)}</h1><p class=note>Run folder <code>{_e(run.resolve())}</code>; written "
            f"{stamp} by msbt {__version__}.</p><nav>{nav}</nav>" + body + "</body></html>\n")


RUN_MARKERS = ("config.yaml", "stages.json")  # every run folder holds one of these; a data folder neither


def write_report(run: str | Path, *, gradcam_samples: int = 4) -> Path:
    """Write ``<run>/report.html`` and return its path.

    Raises:
        FileNotFoundError: ``run`` is not a run folder (it holds neither ``config.yaml`` nor
            ``stages.json``): msbt never writes into a data folder or any other folder given by mistake.
    """
    run = Path(run)
    if not any((run / name).is_file() for name in RUN_MARKERS):
        raise FileNotFoundError(f"{run}: not a run folder (no {' or '.join(RUN_MARKERS)}); `msbt report` writes "
                                "report.html only into a run folder, runs/<run.name>")
    path = run / REPORT_FILE
    write_text(path, render(run, gradcam_samples=gradcam_samples))
    return path
