"""Review of a finished (or running) tune experiment, without Ray: a self-contained HTML page.

``msbt tune-report`` writes ``review.html`` beside ``best.yaml``: the ranked trials, a parallel-coordinates
chart of the varied settings coloured by the metric, each trial's validation curve with ASHA's rungs and
the epoch it was cut at, the reference trial (trial 0: the paper's configuration) highlighted, an estimate
of how much each setting mattered, and how optimistic the winner's number is.

Importance is estimated two ways, both stated on the page: for a numeric setting the squared Spearman rank
correlation between its value and the trial's best metric (rank-based, so a log-scaled learning rate is
handled), for a categorical one the correlation ratio eta^2 (share of the metric's variance between its
groups; a one-factor version of fANOVA's variance split). With a handful of trials both are rough.

Optimism. The best of N trials ranked on one small validation split is biased upward: part of its margin
is the luck of that split. The page reports the spread of the metric across trials, the number of
validation images and lesions behind it and, for an AUC, the standard error one AUC has on that many
lesions (Hanley & McNeil, Radiology 143:29-36, 1982), and gives the commands that re-score the top k
configurations under k-fold cross-validation (``workflows/crossval.py``) before one is adopted.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any, Sequence

import yaml

from msbt.atomicio import read_json_object, write_text
from msbt.console import named_error
from msbt.tune.space import decode, flatten, merge_overlays

REVIEW_FILE = "review.html"
SEARCH_FILE = "search.json"  # written by msbt.tune.search: space, reference point, metric, epochs


# ---------------------------------------------------------------------------------------------------
# Reading an experiment (no Ray)


def read_experiment(path: str | Path) -> tuple[dict, list[dict]]:
    """Read an experiment folder without Ray: its ``search.json`` and one row per trial.

    Args:
        path: ``<run>/tune/<experiment>``.

    Returns:
        ``(search record, trials)``; each trial: ``trial`` (folder name), ``params`` (nested), ``best``
        (best value of the metric over its epochs, None if never reported), ``best_epoch``, ``epochs``
        (results reported), ``status`` (``complete``, ``stopped early``, ``error`` or ``unfinished``),
        ``reference`` (True for trial 0's values).

    Raises:
        FileNotFoundError: ``path`` is not an experiment made by ``msbt tune``.
    """
    path = Path(path).expanduser()
    if not (path / SEARCH_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a msbt tune experiment (no {SEARCH_FILE})")
    search = _json_object(path / SEARCH_FILE, ("metric", "mode", "epochs", "reference_point", "fast"))
    statuses = _trial_statuses(path)
    metric, sign = search["metric"], (1 if search["mode"] == "max" else -1)
    trials = []
    for folder in sorted(path.glob("trial_*")):
        if not (folder / "params.json").is_file():
            continue
        params = _json_object(folder / "params.json")
        results = _results(folder / "result.json")
        values = [(r[metric], r.get("training_iteration", i + 1)) for i, r in enumerate(results)
                  if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
        best = max(values, key=lambda v: sign * v[0]) if values else None
        trials.append({
            "trial": folder.name,
            "params": params,
            "best": best[0] if best else None,
            "best_epoch": best[1] if best else None,
            "epochs": len(results),
            "status": _status(folder, statuses.get(folder.name), len(results), search["epochs"]),
            "reference": flatten(params) == flatten(search["reference_point"]),
        })
    trials.sort(key=lambda r: (r["best"] is None, -sign * (r["best"] or 0.0)))
    return search, trials


def _json_object(file: Path, keys: tuple[str, ...] = ()) -> dict:
    """A JSON object written by msbt tune, with ``keys``; else a ValueError naming the file (a damaged file gave
    a bare JSON error or a KeyError such as 'metric')."""
    value = read_json_object(file, "a record of msbt tune")
    missing = [k for k in keys if k not in value]
    if missing:
        raise ValueError(f"{file}: no {', '.join(missing)} recorded (not written by this msbt, or edited)")
    return value


def _results(file: Path) -> list[dict]:
    if not file.is_file():
        return []
    rows = []
    for line in file.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run may be cut off
            break
    return rows


def _trial_statuses(path: Path) -> dict[str, str]:
    """Trial folder -> Tune status (TERMINATED, ERROR, RUNNING, PENDING) over every experiment state file.

    A restored experiment leaves the state file of the interrupted run beside its own, and which one is
    newest by mtime is not reliable; a trial that any state records as TERMINATED is finished (a restore
    never reruns it), so that status wins, then ERROR, then the rest.
    """
    rank = {"TERMINATED": 3, "ERROR": 2}
    out: dict[str, str] = {}
    for state in sorted(path.glob("experiment_state-*.json")):
        try:
            entries = json.loads(state.read_text()).get("trial_data", [])
        except (OSError, json.JSONDecodeError):
            continue  # being written
        for entry in entries:
            try:
                trial = json.loads(entry[0])
                trial_id, status = trial["trial_id"], trial["status"]
            except (TypeError, KeyError, IndexError, json.JSONDecodeError):
                continue
            if rank.get(status, 1) >= rank.get(out.get(trial_id, ""), 0):
                out[trial_id] = status
    return {f"trial_{trial_id.rsplit('_', 1)[-1]}": status for trial_id, status in out.items()}


def _status(folder: Path, tune_status: str | None, epochs: int, max_epochs: int) -> str:
    if tune_status == "ERROR" or (folder / "error.txt").is_file() and tune_status != "TERMINATED":
        return "error"
    if tune_status in ("RUNNING", "PENDING", "PAUSED") or (tune_status is None and epochs < max_epochs):
        return "unfinished"
    return "complete" if epochs >= max_epochs else "stopped early"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "/".join(_short(v) for v in value)
    return str(value)


def format_ranking(search: dict, trials: list[dict]) -> str:
    """The ranked table ``msbt tune-report`` prints: best first; trial 0 (the reference) marked."""
    metric = search["metric"]
    flat = [flatten(t["params"]) for t in trials]
    keys = [k for k in (flat[0] if flat else {}) if len({json.dumps(f.get(k)) for f in flat}) > 1]
    header = ["rank", "trial", *keys, metric, "best ep", "epochs", "status", ""]
    rows = []
    for rank, (trial, values) in enumerate(zip(trials, flat), start=1):
        score = "n/a" if trial["best"] is None else f"{trial['best']:.4f}"
        rows.append([str(rank), trial["trial"], *(_short(values.get(k)) for k in keys), score,
                     str(trial["best_epoch"] or "-"), f"{trial['epochs']}/{search['epochs']}", trial["status"],
                     f"<- trial 0: {search['reference']}'s configuration" if trial["reference"] else ""])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    mode = "fast (heads on cached features, backbone frozen)" if search["fast"] else "full training"
    title = f"{len(trials)} trials, {mode}, ranked by best {metric} ({search['mode']}) on the validation split"
    tie = tie_note(search, trials)
    return "\n".join([title, *lines, *([f"note: {tie}"] if tie else [])])


def tied_with_best(trials: Sequence[dict]) -> list[dict]:
    """The ranked trials whose best value prints as the first's does (4 decimals): the ranking cannot show them
    apart, and the validation split cannot tell them apart either."""
    scored = [t for t in trials if t["best"] is not None]
    if not scored:
        return []
    top = f"{scored[0]['best']:.4f}"
    return [t for t in scored if f"{t['best']:.4f}" == top]


def tie_note(search: dict, trials: Sequence[dict]) -> str | None:
    """What to say when the best value is shared (None: one trial is best)."""
    tied = tied_with_best(trials)
    if len(tied) < 2:
        return None
    metric, value = search["metric"], tied[0]["best"]
    names = ", ".join(t["trial"] for t in tied[:4]) + (f" and {len(tied) - 4} more" if len(tied) > 4 else "")
    every = f"all {len(tied)} trials" if len(tied) == len(trials) else f"{len(tied)} of {len(trials)} trials"
    if any(t["best"] != value for t in tied):  # equal as printed, not exactly: the first is ahead by a hair
        return (f"{every} reach the best {metric} {value:.4f} as printed: {names}. {tied[0]['trial']} is first "
                f"by less than 0.0001, far less than the validation split can tell apart; best.yaml takes it")
    why = (" (an AUC of 0.5 everywhere: no trial's scores separate the classes of the validation split; "
           "more epochs or more validation images)") if metric.endswith("auc") and round(value, 4) == 0.5 else ""
    return (f"{every} tie at the best {metric} {value:.4f}{why}: {names}. The validation split does not tell "
            f"them apart; best.yaml takes {tied[0]['trial']} only because it comes first in trial order")


def error_line(error_file: Path) -> str:
    """The last ``Type: message`` line of a trial's ``error.txt`` (Tune's record of its exception)."""
    try:
        lines = error_file.read_text(errors="replace").splitlines()
    except OSError as err:
        return f"its error could not be read ({err})"
    return named_error(lines) or "no error recorded"


def best_overlay(search: dict, trials: list[dict]) -> dict:
    """The best trial's stage-2 values as a config overlay (``trainable_backbone: false`` in fast mode)."""
    scored = [t for t in trials if t["best"] is not None]
    if not scored:
        raise ValueError("no trial reported the metric yet; nothing to choose from")
    best = scored[0]
    stage2 = merge_overlays(search.get("fixed") or {}, decode(best["params"]))
    if search["fast"]:
        stage2["trainable_backbone"] = False
    return {"stage2": stage2}


def write_best_overlay(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the best trial's overlay (default ``<experiment>/best.yaml``) and check that it loads."""
    from msbt.config import load_config

    search, trials = read_experiment(path)
    if trials and all(t["status"] == "error" and t["best"] is None for t in trials):
        first = Path(path) / trials[0]["trial"] / "error.txt"
        raise ValueError(f"every trial of the search failed ({len(trials)}), so there is no configuration to choose; "
                         f"{trials[0]['trial']}: {error_line(first)} (its traceback: {first})")
    overlay = best_overlay(search, trials)
    best = next(t for t in trials if t["best"] is not None)
    out = Path(out) if out else Path(path) / "best.yaml"
    comment = (f"# Best stage-2 configuration of {Path(path).resolve()}: {best['trial']}, best "
               f"{search['metric']} {best['best']:.4f} at epoch {best['best_epoch']} (validation split).\n"
               + "".join(f"# {line}\n" for line in textwrap.wrap(tie_note(search, trials) or "", 110)) +
               f"# Use on top of the configs the search ran with, under a new run name (the searched run's own\n"
               f"# stages were trained with other settings), e.g.\n"
               f"#   python workflows/pipeline.py --config workflows/configs/cpu.yaml --config {out} "
               f"--set run.name=tuned\n"
               + ("# (a fast-mode search: stage2.trainable_backbone is false here, so that run trains the head on a "
                  "frozen backbone)\n" if search.get("fast") else ""))
    write_text(out, comment + yaml.safe_dump(overlay, sort_keys=False))
    load_config([out])  # an overlay the pipeline cannot read is an error here, not later
    return out


# Viridis at five stops: perceptually even, readable in grey, for "low -> high metric".
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _color(t: float | None) -> str:
    """A viridis colour for t in [0, 1]; grey for None (no metric)."""
    if t is None or not math.isfinite(t):
        return "#bbb"
    t = min(1.0, max(0.0, t)) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return "#" + "".join(f"{round(x + (y - x) * (t - i)):02x}" for x, y in zip(a, b))


def trial_curves(path: str | Path, trials: Sequence[dict], metric: str) -> dict[str, list[tuple[int, float]]]:
    """Each trial's ``(epoch, metric)`` per reported result, from its ``result.json``."""
    out = {}
    for trial in trials:
        points = []
        for i, row in enumerate(_result_rows(Path(path) / trial["trial"] / "result.json")):
            value = row.get(metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                points.append((int(row.get("training_iteration", i + 1)), float(value)))
        out[trial["trial"]] = points
    return out


def varied_settings(trials: Sequence[dict]) -> list[str]:
    """Flattened setting names whose value differs between trials, in the order of the first trial."""
    flat = [flatten(t["params"]) for t in trials]
    return [k for k in (flat[0] if flat else {}) if len({json.dumps(f.get(k)) for f in flat}) > 1]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def importance(trials: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """How much of the spread of the trials' best metric goes with each setting.

    Returns:
        One row per key, largest first: ``key``, ``estimate`` ("Spearman rho^2" or "eta^2"), ``value``
        in [0, 1], ``signed`` (Spearman's rho, None for eta^2), ``n`` (trials with a metric).
    """
    from scipy.stats import spearmanr

    scored = [t for t in trials if t["best"] is not None]
    ys = [float(t["best"]) for t in scored]
    rows = []
    for key in keys:
        xs = [flatten(t["params"]).get(key) for t in scored]
        if len(scored) < 3 or len(set(ys)) < 2:
            rows.append({"key": key, "estimate": "-", "value": None, "signed": None, "n": len(scored)})
            continue
        if all(_is_number(x) for x in xs):
            rho = spearmanr(xs, ys).statistic
            value, signed, kind = (None, None, "Spearman rho^2") if not math.isfinite(rho) else (rho * rho, rho,
                                                                                                "Spearman rho^2")
        else:
            groups: dict[str, list[float]] = {}
            for x, y in zip(xs, ys):
                groups.setdefault(json.dumps(x), []).append(y)
            mean = sum(ys) / len(ys)
            total = sum((y - mean) ** 2 for y in ys)
            between = sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups.values())
            value, signed, kind = between / total, None, "eta^2"
        rows.append({"key": key, "estimate": kind, "value": value, "signed": signed, "n": len(scored)})
    return sorted(rows, key=lambda r: -(r["value"] if r["value"] is not None else -1))


def validation_size(path: str | Path) -> dict | None:
    """Validation images and lesion groups behind the metric, from the run's ultrasound ``split.csv``.

    Returns:
        ``images``, ``groups`` and ``groups_by_label`` (label -> lesion groups), or None without a split.
    """
    split = Path(path).resolve().parent.parent / "data" / "ultrasound" / "split.csv"
    if not split.is_file():
        return None
    with split.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("split") == "val"]
    by_label: dict[str, set] = {}
    for r in rows:
        by_label.setdefault(r["label"], set()).add(r["group"])
    return {"images": len(rows), "groups": len({r["group"] for r in rows}),
            "groups_by_label": {k: len(v) for k, v in sorted(by_label.items())}}


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC from ``positives`` and ``negatives`` cases."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc))
    return math.sqrt(max(var, 0.0) / (positives * negatives))


def optimism(search: dict, trials: Sequence[dict], path: str | Path) -> dict:
    """How far the winner's number may be luck: spread across trials and the validation split's size."""
    values = sorted(float(t["best"]) for t in trials if t["best"] is not None)
    out: dict[str, Any] = {"trials": len(values)}
    if not values:
        return out
    best = values[-1] if search["mode"] == "max" else values[0]
    median = values[len(values) // 2] if len(values) % 2 else (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
    mean = sum(values) / len(values)
    out.update(best=best, median=median, low=values[0], high=values[-1],
               sd=math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)),
               margin=abs(best - median))
    size = validation_size(path)
    out["validation"] = size
    groups = (size or {}).get("groups_by_label", {})
    # Positives are the malignant lesions (label index 1 of msbt's binary stores; the last label otherwise).
    positive = "malignant" if "malignant" in groups else (sorted(groups)[-1] if groups else None)
    negatives = sum(n for label, n in groups.items() if label != positive)
    if "auc" in search["metric"] and len(groups) == 2 and groups[positive] > 0 and negatives > 0:
        # At the median trial's AUC: at the winner's (often 1.0 on a small split) the formula collapses to 0.
        out["auc_se"] = auc_standard_error(min(max(median, 0.001), 0.999), groups[positive], negatives)
        out["auc_step"] = 1.0 / (groups[positive] * negatives)  # one lesion pair swapped
    return out


def asha_rungs(search: dict) -> list[int]:
    """Epochs at which ASHA compares trials: grace_period * reduction_factor^k below the last epoch."""
    sched = search.get("scheduler") or {}
    if sched.get("kind", "asha") != "asha" or not sched.get("grace_period"):
        return []
    rungs, rung = [], int(sched["grace_period"])
    while rung < search["epochs"]:
        rungs.append(rung)
        rung *= max(2, int(sched.get("reduction_factor", 2)))
    return rungs


def _scale(values: Sequence[Any], height: float):
    """A map value -> [0, 1] for one axis ``height`` px high, and its tick labels ``[(position, text)]``: on a
    number axis those that can be read (:func:`spaced_ticks`; the lines still place every value), on a category
    axis every one (a category is told by its label alone)."""
    if all(_is_number(v) for v in values):
        lo, hi = min(values), max(values)
        log = lo > 0 and hi / lo >= 10
        f = (lambda v: math.log10(v)) if log else (lambda v: float(v))
        a, b = f(lo), f(hi)
        span = (b - a) or 1.0
        ticks = sorted(set(values))
        if len(ticks) > 6:
            ticks = [lo, hi]
        labels = spaced_ticks([((f(t) - a) / span, f"{t:.3g}") for t in ticks], height)
        return (lambda v: (f(v) - a) / span), labels, log
    cats = sorted({json.dumps(v) for v in values})
    pos = {c: (i / (len(cats) - 1) if len(cats) > 1 else 0.5) for i, c in enumerate(cats)}
    return (lambda v: pos[json.dumps(v)]), [(p, str(json.loads(c))) for c, p in pos.items()], False


def spaced_ticks(ticks: Sequence[tuple[float, str]], height: float, gap: float = 12.0) -> list[tuple[float, str]]:
    """The tick labels of a number axis that can be read: the two ends first, then each other value whose
    label keeps ``gap`` px (about a line of 11 px text) from every label already kept; values closer than that
    (two learning rates of 1.14e-4 and 1.17e-4) would print over each other, and are shown by the lines alone.
    """
    ordered = sorted(ticks)
    if len(ordered) <= 2:
        return ordered
    kept = [ordered[0], ordered[-1]]
    for tick in ordered[1:-1]:
        if all(abs(tick[0] - k[0]) * height >= gap for k in kept):
            kept.append(tick)
    return sorted(kept)


def parallel_coordinates(trials: Sequence[dict], keys: Sequence[str], metric: str, mode: str) -> str:
    """SVG: one vertical axis per varied setting and one for the metric; one line per trial."""
    scored = [t for t in trials if t["best"] is not None]
    axes = [*keys, metric]
    # The first axis's centred label and the last axis's tick labels need room inside the SVG (a label past
    # its edge is cut off); a page narrower than the chart scrolls it sideways (.wide).
    margin, top, plot_h = 90, 40, 260
    width = max(520, 150 * (len(axes) - 1) + 2 * margin)
    height = top + plot_h + 70
    x = {a: margin + i * (width - 2 * margin) / max(1, len(axes) - 1) for i, a in enumerate(axes)}
    values = {k: [flatten(t["params"]).get(k) for t in trials] for k in keys}
    values[metric] = [t["best"] for t in scored] or [0.0]
    scales = {a: _scale([v for v in values[a] if v is not None] or [0.0], plot_h) for a in axes}
    lo, hi = min(values[metric]), max(values[metric])

    def level(t):  # colour: 1 = best
        if t["best"] is None:
            return None
        frac = (t["best"] - lo) / ((hi - lo) or 1.0)
        return frac if mode == "max" else 1 - frac

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="pc" '
             f'role="img" aria-label="parallel coordinates">']
    order = sorted(trials, key=lambda t: (t["reference"], level(t) if level(t) is not None else -1))
    for t in order:  # trial 0 last, so it lies on top
        flat = flatten(t["params"])
        pts = []
        for a in axes:
            v = t["best"] if a == metric else flat.get(a)
            if v is None:
                continue
            pts.append(f"{x[a]:.1f},{top + plot_h - scales[a][0](v) * plot_h:.1f}")
        style = ('stroke="#d62728" stroke-width="4"' if t["reference"]
                 else f'stroke="{_color(level(t))}" stroke-width="2" stroke-opacity="0.85"')
        parts.append(f'<polyline points="{" ".join(pts)}" fill="none" {style}>'
                     f'<title>{_e(t["trial"])}: {metric} {_e(t["best"])}</title></polyline>')
    for a in axes:
        parts.append(f'<line x1="{x[a]:.1f}" y1="{top}" x2="{x[a]:.1f}" y2="{top + plot_h}" stroke="#333"/>')
        label = a + (" (log)" if scales[a][2] else "")
        parts.append(f'<text x="{x[a]:.1f}" y="{top - 18}" text-anchor="middle" class="ax">{_e(label)}</text>')
        for pos, text in scales[a][1]:
            y = top + plot_h - pos * plot_h
            parts.append(f'<text x="{x[a] + 5:.1f}" y="{y + 4:.1f}" class="tk">{_e(text)}</text>')
    ly = top + plot_h + 30
    for i in range(5):
        parts.append(f'<rect x="{60 + i * 24}" y="{ly}" width="24" height="10" fill="{_color(i / 4)}"/>')
    parts.append(f'<text x="{60 + 5 * 24 + 8}" y="{ly + 9}" class="tk">{_e(metric)}: worst -> best</text>'
                 f'<line x1="{340}" y1="{ly + 5}" x2="{372}" y2="{ly + 5}" stroke="#d62728" stroke-width="4"/>'
                 f'<text x="{378}" y="{ly + 9}" class="tk">trial 0 (reference)</text></svg>')
    return "".join(parts)


def curve_chart(trial: dict, points: Sequence[tuple[int, float]], epochs: int, rungs: Sequence[int],
                metric: str, ylim: tuple[float, float], color: str) -> str:
    """A small SVG of one trial's validation curve; ASHA rungs dashed, the cut (if stopped early) as x."""
    w, h, left, top, pw, ph = 230, 150, 40, 24, 180, 90
    y0, y1 = ylim if ylim[1] > ylim[0] else (ylim[0] - 0.5, ylim[0] + 0.5)

    def px(e):
        return left + (e - 1) / max(1, epochs - 1) * pw

    def py(v):
        return top + ph - (v - y0) / (y1 - y0) * ph

    title = f"{trial['trial']}" + (" (trial 0)" if trial["reference"] else "")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" class="curve" role="img" '
             f'aria-label="{_e(title)}"><text x="{left}" y="14" class="ax">{_e(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    for r in rungs:
        parts.append(f'<line x1="{px(r):.1f}" y1="{top}" x2="{px(r):.1f}" y2="{top + ph}" stroke="#999" '
                     'stroke-dasharray="3 3"/>')
    for v in (y0, y1):
        parts.append(f'<text x="{left - 4}" y="{py(v) + 4:.1f}" class="tk" text-anchor="end">{v:.2f}</text>')
    parts.append(f'<text x="{left}" y="{top + ph + 14}" class="tk">1</text>'
                 f'<text x="{left + pw}" y="{top + ph + 14}" class="tk" text-anchor="end">{epochs}</text>'
                 f'<text x="{left + pw / 2}" y="{top + ph + 14}" class="tk" text-anchor="middle">epoch</text>')
    if points:
        stroke = 'stroke="#d62728" stroke-width="3"' if trial["reference"] else f'stroke="{color}" stroke-width="2"'
        parts.append(f'<polyline points="{" ".join(f"{px(e):.1f},{py(v):.1f}" for e, v in points)}" fill="none" '
                     f'{stroke}/>')
        if trial["status"] == "stopped early":
            ex, ey = px(points[-1][0]), py(points[-1][1])
            parts.append(f'<path d="M{ex - 5:.1f},{ey - 5:.1f}L{ex + 5:.1f},{ey + 5:.1f}M{ex - 5:.1f},{ey + 5:.1f}'
                         f'L{ex + 5:.1f},{ey - 5:.1f}" stroke="#000" stroke-width="2"/>')
    status = f"{trial['status']} after epoch {points[-1][0]}" if points else trial["status"]
    parts.append(f'<text x="{left}" y="{h - 6}" class="tk">{_e(status)}</text></svg>')
    return "".join(parts)


def _table(search: dict, trials: Sequence[dict], keys: Sequence[str]) -> str:
    metric = search["metric"]
    head = "".join(f"<th>{_e(h)}</th>" for h in ["rank", "trial", *keys, f"best {metric}", "best epoch",
                                                    "epochs", "status"])
    rows = []
    for rank, t in enumerate(trials, start=1):
        flat = flatten(t["params"])
        cells = [rank, t["trial"], *(f"{v:.3g}" if isinstance(v, float) else v for v in (flat.get(k) for k in keys)),
                 "n/a" if t["best"] is None else f"{t['best']:.4f}", t["best_epoch"] or "-",
                 f"{t['epochs']}/{search['epochs']}", t["status"]]
        cls = ' class="ref"' if t["reference"] else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return f"<div class=wide><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def _importance_section(rows: Sequence[dict]) -> str:
    body = []
    for r in rows:
        if r["value"] is None:
            body.append(f"<tr><td>{_e(r['key'])}</td><td>-</td><td colspan=2>too few trials or no spread</td></tr>")
            continue
        bar = f'<span class="bar" style="width:{200 * r["value"]:.0f}px"></span>'
        sign = "" if r["signed"] is None else f" (rho {r['signed']:+.2f})"
        body.append(f"<tr><td>{_e(r['key'])}</td><td>{_e(r['estimate'])}</td><td>{r['value']:.2f}{sign}</td>"
                    f"<td>{bar}</td></tr>")
    return ("<table><tr><th>setting</th><th>estimate</th><th>value</th><th></th></tr>" + "".join(body)
            + "</table>")


def _optimism_section(search: dict, o: dict, top_commands: Sequence[str]) -> str:
    metric = search["metric"]
    if not o.get("trials"):
        return "<p>No trial reported the metric yet.</p>"
    size = o.get("validation")
    where = (f"{size['images']} validation images in {size['groups']} lesion groups "
             f"({', '.join(f'{k} {v}' for k, v in size['groups_by_label'].items())})" if size
             else "a validation split of unknown size (no split.csv found for this run)")
    lines = [f"The winner's best {metric} is {o['best']:.4f}, chosen as the best of {o['trials']} trials on "
             f"{where}. Across trials the best {metric} ranges {o['low']:.4f}-{o['high']:.4f} (median "
             f"{o['median']:.4f}, standard deviation {o['sd']:.4f}); the winner is {o['margin']:.4f} above the "
             "median trial."]
    if "auc_se" in o:
        lines.append(f"At the median trial's AUC, one AUC on that many lesions has a standard error of about "
                     f"{o['auc_se']:.3f} (Hanley &amp; McNeil 1982, lesions counted as cases), and one misordered "
                     f"malignant/benign lesion pair moves it by {o['auc_step']:.3f}: margins of that size between "
                     "trials are within the noise of the split, and the maximum of several noisy values is biased "
                     "upward.")
    lines.append("Before adopting a configuration, re-score the top ones under k-fold cross-validation (every "
                 "fold a fresh split of the train+val lesions; the test split stays untouched):")
    cmds = f"<pre>{_e(chr(10).join(top_commands))}</pre>"
    return "".join(f"<p>{line}</p>" for line in lines) + cmds


def write_top_overlays(path: str | Path, k: int) -> list[Path]:
    """``rank<i>.yaml`` overlays of the ``k`` best trials, beside ``best.yaml``, for re-scoring."""
    search, trials = read_experiment(path)
    out = []
    for rank, trial in enumerate([t for t in trials if t["best"] is not None][:k], start=1):
        overlay = best_overlay(search, [trial])
        file = Path(path) / f"rank{rank}.yaml"
        file.write_text(f"# {trial['trial']}: best {search['metric']} {trial['best']:.4f} (rank {rank} of the "
                        f"search's validation ranking)\n" + yaml.safe_dump(overlay, sort_keys=False))
        out.append(file)
    return out


def crossval_commands(path: str | Path, k: int) -> list[str]:
    """The commands that re-score the ``k`` best trials' overlays with workflows/crossval.py."""
    exp = Path(path)
    run = exp.resolve().parent.parent
    return [f"msbt tune-report {exp} --top-k {k}      # writes rank1.yaml ... rank{k}.yaml here"] + [
        f"python workflows/crossval.py --config <the configs of the search> --config {exp / f'rank{i}.yaml'} "
        f"--set run.name={run.name}-rank{i}" for i in range(1, k + 1)]


_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
tr.ref td{background:#fde8e8;font-weight:600}.ax{font-size:12px;font-weight:600}.tk{font-size:11px;fill:#444}
.bar{display:inline-block;height:10px;background:#3b528b}.curves{display:flex;flex-wrap:wrap;gap:6px}
pre{background:#f6f6f6;padding:6px;white-space:pre-wrap;word-break:break-all}.note{color:#555}
.wide{overflow-x:auto;max-width:100%}.warn{background:#fff4e5;border-left:4px solid #e69500;padding:6px 10px}"""


def render(path: str | Path, top_k: int = 3) -> str:
    """The review page of an experiment folder (see the module docstring)."""
    path = Path(path)
    search, trials = read_experiment(path)
    metric, keys = search["metric"], varied_settings(trials)
    curves = trial_curves(path, trials, metric)
    rungs = asha_rungs(search)
    all_values = [v for pts in curves.values() for _, v in pts]
    ylim = (min(all_values), max(all_values)) if all_values else (0.0, 1.0)
    scored = [t["best"] for t in trials if t["best"] is not None]
    lo, hi = (min(scored), max(scored)) if scored else (0.0, 1.0)

    def level(t):
        if t["best"] is None:
            return None
        frac = (t["best"] - lo) / ((hi - lo) or 1.0)
        return frac if search["mode"] == "max" else 1 - frac

    charts = "".join(curve_chart(t, curves[t["trial"]], search["epochs"], rungs, metric, ylim, _color(level(t)))
                     for t in trials)
    mode = "fast (heads on cached features, backbone frozen)" if search["fast"] else "full training"
    rung_text = (f"ASHA compared trials at epoch {', '.join(map(str, rungs))} (dashed) and stopped the weaker "
                 f"ones (x marks the last epoch of a stopped trial)" if rungs else "no early stopping")
    reference = next((t for t in trials if t["reference"]), None)
    ref_text = (f"Trial 0 ({reference['trial']}, {search['reference']}'s configuration) is drawn in red." if reference
                else "The reference configuration (trial 0) is not among the trials.")
    top = min(top_k, len(scored)) or 1
    sections = [
        f"<h1>Tune review: {_e(path.resolve())}</h1>",
        f"<p class=note>{len(trials)} trials, {mode}, ranked by best {_e(metric)} ({search['mode']}) over "
        f"{search['epochs']} epochs on the validation split (the test split is never read). {ref_text} "
        f"Best overlay: <code>{_e(path / 'best.yaml')}</code>.</p>",
        *([f"<p class=warn>{_e(tie)}.</p>"] if (tie := tie_note(search, trials)) else []),
        "<h2 id=optimism>How optimistic is the winner?</h2>",
        _optimism_section(search, optimism(search, trials, path), crossval_commands(path, top)),
        "<h2 id=ranking>Trials, best first</h2>", _table(search, trials, keys),
        "<h2 id=parallel>Settings of every trial</h2>",
        "<p class=note>One line per trial through the value of each varied setting and its best metric.</p>",
        f'<div class=wide>{parallel_coordinates(trials, keys, metric, search["mode"])}</div>' if keys
        else "<p>No setting was varied.</p>",
        "<h2 id=curves>Validation curves</h2>", f"<p class=note>{_e(metric)} per epoch; {rung_text}.</p>",
        f'<div class="curves">{charts}</div>',
        "<h2 id=importance>Which settings mattered</h2>",
        "<p class=note>Numeric settings: squared Spearman rank correlation of the value with the trial's best "
        "metric (sign shown as rho). Categorical settings: eta^2, the share of the metric's variance between the "
        "setting's groups (a one-factor fANOVA-style split). Rough with few trials.</p>",
        _importance_section(importance(trials, keys)),
    ]
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>msbt tune review</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(sections)}</body></html>\n")


def write_review(path: str | Path, top_k: int = 3) -> Path:
    """Write ``<experiment>/review.html`` (atomically) and return its path."""
    out = Path(path) / REVIEW_FILE
    tmp = out.with_name(f".{REVIEW_FILE}.tmp")
    tmp.write_text(render(path, top_k))
    os.replace(tmp, out)
    return out



# ---------------------------------------------------------------------------------------------------
# TensorBoard HParams

HPARAMS_DIR = "hparams"
# Per-epoch metrics written as each trial's curves (Tune's own bookkeeping keys are left out).
_CURVE = ("loss", "accuracy", "auc", "sensitivity", "specificity")


def _hparam_value(value: Any) -> Any:
    """A value the HParams dashboard can show: numbers, strings and booleans; a list as "a/b/c"."""
    if isinstance(value, (list, tuple)):
        return "/".join(str(v) for v in value)
    return value


def _plugin_summary(tag: str, content) -> Any:
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams",
                                                                      content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata)])


def _experiment_summary(trials: Sequence[dict], keys: Sequence[str], metrics: Sequence[str]):
    """The HParams dashboard's columns: every setting with its domain, and the metrics."""
    from tensorboardX.proto.api_pb2 import DataType, DatasetType, Experiment, HParamInfo, MetricInfo, MetricName
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    infos = []
    for key in keys:
        values = [_hparam_value(flatten(t["params"]).get(key)) for t in trials]
        values = [v for v in values if v is not None]
        info = HParamInfo(name=key)
        if values and all(isinstance(v, bool) for v in values):
            info.type = DataType.Value("DATA_TYPE_BOOL")
        elif values and all(_is_number(v) for v in values):
            info.type = DataType.Value("DATA_TYPE_FLOAT64")
            info.domain_interval.min_value, info.domain_interval.max_value = float(min(values)), float(max(values))
        else:
            info.type = DataType.Value("DATA_TYPE_STRING")
            info.domain_discrete.extend(sorted({str(v) for v in values}))
        infos.append(info)
    infos.append(HParamInfo(name="reference", type=DataType.Value("DATA_TYPE_BOOL"),
                            description="trial 0: the reference (paper's) configuration"))
    metric_infos = [MetricInfo(name=MetricName(tag=m), display_name=m,
                               dataset_type=DatasetType.Value("DATASET_VALIDATION")) for m in metrics]
    experiment = Experiment(hparam_infos=infos, metric_infos=metric_infos)
    return _plugin_summary("_hparams_/experiment", HParamsPluginData(experiment=experiment, version=0))


def _session_summaries(trial: dict, keys: Sequence[str]):
    from tensorboardX.proto.api_pb2 import Status
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo

    start = SessionStartInfo(group_name=trial["trial"])
    flat = flatten(trial["params"])
    for key in keys:
        value = _hparam_value(flat.get(key))
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
        elif _is_number(value):
            start.hparams[key].number_value = float(value)
        elif value is not None:
            start.hparams[key].string_value = str(value)
    start.hparams["reference"].bool_value = bool(trial["reference"])
    status = {"error": "STATUS_FAILURE", "unfinished": "STATUS_RUNNING"}.get(trial["status"], "STATUS_SUCCESS")
    end = SessionEndInfo(status=Status.Value(status))
    return (_plugin_summary("_hparams_/session_start_info", HParamsPluginData(session_start_info=start, version=0)),
            _plugin_summary("_hparams_/session_end_info", HParamsPluginData(session_end_info=end, version=0)))


def write_hparams(path: str | Path) -> Path:
    """Write ``<experiment>/hparams/``: TensorBoard HParams data of every trial, read from Tune's files.

    One run per trial (``hparams/<trial>``) holds its settings, its per-epoch curves (``val_auc``,
    ``val_loss`` ... with the epoch as step) and ``best_<metric>``; ``hparams/`` itself holds the
    experiment summary (each setting's domain, the metrics). ``tensorboard --logdir runs/<name>/tune``
    then shows the search in the HParams tab (table, parallel coordinates, scatter plots).

    TensorFlow 2.21 ships no HParams protocol buffers (they live in the ``tensorboard`` package, which
    msbt needs only for viewing); ``tensorboardX``, installed with Ray Tune, has them and an event-file
    writer, so writing needs neither TensorFlow nor TensorBoard. The folder is rewritten whole.

    Returns:
        The ``hparams`` folder.
    """
    import shutil
    import tempfile

    from tensorboardX import FileWriter
    from tensorboardX.summary import scalar

    path = Path(path)
    search, trials = read_experiment(path)
    metric, keys = search["metric"], [k for k in varied_settings(trials)] or list(
        flatten(trials[0]["params"]) if trials else [])
    curves = {t["trial"]: _result_rows(path / t["trial"] / "result.json") for t in trials}
    names = sorted({k for rows in curves.values() for r in rows for k in r
                    if k.removeprefix("val_") in _CURVE and _is_number(r[k])})
    metrics = [metric, f"best_{metric}", *[n for n in names if n != metric]]
    staging = Path(tempfile.mkdtemp(prefix=".hparams-", dir=path))
    writer = FileWriter(str(staging))
    writer.add_summary(_experiment_summary(trials, keys, metrics))
    writer.close()
    for trial in trials:
        writer = FileWriter(str(staging / trial["trial"]))
        start, end = _session_summaries(trial, keys)
        writer.add_summary(start)
        for i, row in enumerate(curves[trial["trial"]]):
            step = int(row.get("training_iteration", i + 1))
            for name in names:
                if _is_number(row.get(name)) and math.isfinite(row[name]):
                    writer.add_summary(scalar(name, float(row[name])), global_step=step)
        if trial["best"] is not None:
            writer.add_summary(scalar(f"best_{metric}", float(trial["best"])), global_step=trial["best_epoch"] or 0)
        writer.add_summary(end)
        writer.close()
    out = path / HPARAMS_DIR
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out


def _result_rows(file: Path) -> list[dict]:
    """Tune's ``result.json`` lines as dicts (a killed trial's cut-off last line is dropped)."""
    rows = []
    for line in file.read_text().splitlines() if file.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows
