"""The tune review page (msbt.tune.review) on an experiment folder laid out as Tune and `msbt tune` leave it.

No Ray: the folder is written here (search.json, trial_*/params.json and result.json lines, the run's
split.csv), so every number on the page can be checked against what went in.
"""

import csv
import json
import math
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from msbt.cli import main
from msbt.tune import review

METRIC = "val_auc"
# trial -> (learning rate, optimizer, per-epoch val_auc); 8 epochs, ASHA grace 2, factor 2 -> rungs 2, 4
TRIALS = {
    "trial_00000": (0.001, "adagrad", [0.60, 0.66, 0.70, 0.74, 0.75, 0.77, 0.78, 0.78]),  # the reference
    "trial_00001": (0.01, "adam", [0.55, 0.58, 0.62, 0.64, 0.70, 0.71, 0.72, 0.80]),
    "trial_00002": (0.0001, "sgd", [0.50, 0.52]),  # cut at the first rung
    "trial_00003": (0.003, "adam", [0.58, 0.61, 0.63, 0.65]),  # cut at the second
}


def make_experiment(root):
    run = root / "run"
    exp = run / "tune" / "search"
    exp.mkdir(parents=True)
    reference = {"optimizer": "adagrad", "learning_rate": 0.001}
    (exp / "search.json").write_text(json.dumps({
        "metric": METRIC, "mode": "max", "epochs": 8, "fast": False, "reference": "paper",
        "reference_point": reference, "fixed": {}, "searched": {}, "stage2": {}, "run": "run",
        "scheduler": {"kind": "asha", "grace_period": 2, "reduction_factor": 2, "num_samples": 4}}))
    for name, (lr, opt, curve) in TRIALS.items():
        folder = exp / name
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps({"optimizer": opt, "learning_rate": lr}))
        (folder / "result.json").write_text("".join(
            json.dumps({METRIC: v, "training_iteration": i + 1}) + "\n" for i, v in enumerate(curve)))
    # Tune's experiment state: every trial finished (ASHA's stops are TERMINATED too)
    state = [[json.dumps({"trial_id": f"abc_{name[-5:]}", "status": "TERMINATED"}), "{}"] for name in TRIALS]
    (exp / "experiment_state-2026-12-02_03-00-00.json").write_text(json.dumps({"trial_data": state}))
    split = run / "data" / "ultrasound"
    split.mkdir(parents=True)
    with (split / "split.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["relpath", "label", "group", "split", "fold"])
        for i in range(12):  # 7 benign images in 6 lesion groups (g5 has two frames), 5 malignant in 5
            label = "benign" if i < 7 else "malignant"
            writer.writerow([f"v{i}.png", label, f"g{min(i, 5) if i < 7 else i}", "val", 0])
        writer.writerow(["t0.png", "benign", "gt", "train", 0])
    return exp


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.svgs, self._svg = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_review_page_holds_every_trial_and_the_numbers_behind_it(tmp_path):
    exp = make_experiment(tmp_path)
    page = review.render(exp)
    parser = Collect()
    parser.feed(page)
    text = " ".join(parser.text)
    for name in TRIALS:
        assert text.count(name) >= 2, name  # in the table and above its curve
    assert "trial_00000 (trial 0)" in text and 'class="ref"' in page
    assert "ASHA compared trials at epoch 2, 4" in text
    assert "stopped early after epoch 2" in text and "stopped early after epoch 4" in text
    assert "12 validation images in 11 lesion groups (benign 6, malignant 5)" in text
    assert "0.8000" in text  # the winner, trial 1 at its last epoch
    # at the median trial's best (0.715 of 0.52, 0.65, 0.78, 0.80); malignant lesions are the positives
    se = review.auc_standard_error((0.65 + 0.78) / 2, 5, 6)
    assert f"{se:.3f}" in text and f"{1 / 30:.3f}" in text
    assert "Spearman" in text and "eta^2" in text
    assert "workflows/crossval.py" in text
    # every SVG is well-formed; parallel coordinates has one line per trial
    svgs = [page[i:page.index("</svg>", i) + 6] for i in range(len(page)) if page.startswith("<svg", i)]
    trees = [ET.fromstring(s) for s in svgs]
    pc = next(t for t in trees if t.get("class") == "pc")
    assert len(list(pc.iter("{http://www.w3.org/2000/svg}polyline"))) == len(TRIALS)
    assert sum(t.get("class") == "curve" for t in trees) == len(TRIALS)
    # Seen in headless Chromium on a 12-axis search: the first axis's centred label started left of the SVG and was
    # cut off, and the chart and table ran past the page. Each axis label now fits inside its SVG (about 7 px a
    # character at 12 px), and the wide chart and table sit in a box that scrolls sideways.
    svg = "{http://www.w3.org/2000/svg}"
    width = float(pc.get("width"))
    for label in (t for t in pc.iter(f"{svg}text") if t.get("class") == "ax"):
        half = 3.5 * len(label.text)
        assert half <= float(label.get("x")) <= width - half, label.text
    assert "<div class=wide><svg" in page and "<div class=wide><table>" in page and ".wide{overflow-x:auto" in page


def test_tick_labels_that_would_print_over_each_other_are_left_out():
    # an axis 260 px high: 0.0 and 1.0 always; 0.02 is 5 px from 0.0 (left out), 0.5 kept, 0.51 3 px from it
    ticks = [(1.0, "hi"), (0.02, "close"), (0.5, "mid"), (0.0, "lo"), (0.51, "next")]
    assert review.spaced_ticks(ticks, 260) == [(0.0, "lo"), (0.5, "mid"), (1.0, "hi")]
    assert review.spaced_ticks(ticks, 2600) == sorted(ticks)  # ten times the height: every label fits
    assert review.spaced_ticks([(0.5, "one")], 260) == [(0.5, "one")]


def test_the_chart_leaves_out_close_number_labels_but_keeps_every_category():
    """Two learning rates 1% apart print one label between them; categories whose labels crowd keep each one (a
    category cannot be read off the line's height)."""
    rates = [0.001, 0.00101, 0.1, 0.01]
    cats = [f"opt{i}" for i in range(30)]  # 30 categories on 260 px: 9 px apart, closer than a label
    trials = [{"trial": f"trial_{i:05d}", "params": {"lr": rates[i % 4], "opt": cats[i]}, "best": 0.5 + i / 100,
               "reference": i == 0} for i in range(30)]
    pc = ET.fromstring(review.parallel_coordinates(trials, ["lr", "opt"], METRIC, "max"))
    labels = [t.text for t in pc.iter("{http://www.w3.org/2000/svg}text") if t.get("class") == "tk"]
    assert ("0.001" in labels) != ("0.00101" in labels)  # one of the two, not both
    assert "0.1" in labels and "0.01" in labels
    assert all(c in labels for c in cats)


def test_importance_uses_rank_correlation_for_numbers_and_eta_squared_for_categories():
    trials = [{"params": {"lr": lr, "opt": opt}, "best": best}
              for lr, opt, best in [(1, "a", 0.1), (2, "a", 0.2), (3, "b", 0.9), (4, "b", 0.8)]]
    rows = {r["key"]: r for r in review.importance(trials, ["lr", "opt"])}
    assert rows["lr"]["estimate"] == "Spearman rho^2" and rows["lr"]["signed"] == pytest.approx(0.8)
    assert rows["lr"]["value"] == pytest.approx(0.64)
    # groups a: 0.1, 0.2 (mean .15); b: 0.9, 0.8 (mean .85); grand mean .5
    between, total = 2 * 0.35 ** 2 * 2, sum((y - 0.5) ** 2 for y in (0.1, 0.2, 0.9, 0.8))
    assert rows["opt"]["estimate"] == "eta^2" and rows["opt"]["value"] == pytest.approx(between / total)


def test_hanley_mcneil_standard_error_matches_the_papers_formula():
    # A = 0.8, 3 positives, 6 negatives: Q1 = 0.8/1.2, Q2 = 1.28/1.8
    a, q1, q2 = 0.8, 0.8 / 1.2, 1.28 / 1.8
    expected = math.sqrt((a * (1 - a) + 2 * (q1 - a * a) + 5 * (q2 - a * a)) / 18)
    assert review.auc_standard_error(0.8, 3, 6) == pytest.approx(expected)


def test_asha_rungs_follow_grace_period_and_reduction_factor():
    search = {"epochs": 20, "scheduler": {"kind": "asha", "grace_period": 3, "reduction_factor": 2}}
    assert review.asha_rungs(search) == [3, 6, 12]
    assert review.asha_rungs({"epochs": 8, "scheduler": {"kind": "none", "grace_period": 2}}) == []


def test_tune_report_writes_the_page_and_the_top_k_overlays(tmp_path, capsys):
    exp = make_experiment(tmp_path)
    assert main(["tune-report", str(exp), "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert (exp / "review.html").is_file() and (exp / "best.yaml").is_file()
    assert (exp / "rank1.yaml").is_file() and (exp / "rank2.yaml").is_file() and not (exp / "rank3.yaml").exists()
    assert "trial_00001" in (exp / "rank1.yaml").read_text()
    assert "crossval.py" in out and "rank2.yaml" in out
    # best.yaml's own command trains under a new run name: the searched run's name is taken by its stages, and
    # the command as it was written was refused ("stage 1 of run 'cpu' is already finished")
    comment = (exp / "best.yaml").read_text()
    assert f"--config {exp / 'best.yaml'} --set run.name=tuned" in comment and "frozen backbone" not in comment
    search = json.loads((exp / "search.json").read_text())
    (exp / "search.json").write_text(json.dumps({**search, "fast": True}))
    review.write_best_overlay(exp)
    assert "a fast-mode search: stage2.trainable_backbone is false here" in (exp / "best.yaml").read_text()


def test_hparams_files_read_back_with_tensorboards_own_parsers(tmp_path):
    pytest.importorskip("tensorboard")  # in the test extra (pyproject.toml)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    exp = make_experiment(tmp_path)
    out = review.write_hparams(exp)
    root = EventAccumulator(str(out), size_guidance={"tensors": 0})
    root.Reload()
    content = root.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = metadata.parse_experiment_plugin_data(content)
    infos = {h.name: h for h in experiment.hparam_infos}
    assert set(infos) == {"optimizer", "learning_rate", "reference"}
    assert list(infos["optimizer"].domain_discrete.values) and infos["learning_rate"].domain_interval.max_value == 0.01
    assert [m.name.tag for m in experiment.metric_infos][:2] == [METRIC, f"best_{METRIC}"]
    for name, (lr, opt, curve) in TRIALS.items():
        run = EventAccumulator(str(out / name), size_guidance={"tensors": 0, "scalars": 0})
        run.Reload()
        start = metadata.parse_session_start_info_plugin_data(
            run.PluginTagToContent("hparams")["_hparams_/session_start_info"])
        assert start.hparams["optimizer"].string_value == opt
        assert start.hparams["reference"].bool_value is (name == "trial_00000")
        assert start.hparams["learning_rate"].number_value == pytest.approx(lr)
        values = [e.value for e in run.Scalars(METRIC)]
        assert values == pytest.approx(curve)  # the trial's whole curve, step = epoch
        assert [e.step for e in run.Scalars(METRIC)] == list(range(1, len(curve) + 1))
        assert run.Scalars(f"best_{METRIC}")[0].value == pytest.approx(max(curve))
    review.write_hparams(exp)  # rewritten whole, not appended
    assert len(list((out / "trial_00001").iterdir())) == 1


def test_tune_report_on_damaged_files_names_them(tmp_path, capsys):
    """A broken search.json or params.json gave a bare JSON error, KeyError: 'metric' or KeyError: 'fast'."""
    exp = make_experiment(tmp_path)
    search = json.loads((exp / "search.json").read_text())
    del search["metric"]
    (exp / "search.json").write_text(json.dumps(search))
    assert main(["tune-report", str(exp)]) == 1
    assert f"{exp / 'search.json'}: no metric recorded" in capsys.readouterr().err
    exp = make_experiment(tmp_path / "again")
    params = sorted(exp.glob("trial_*/params.json"))[0]
    params.write_text("{cut")
    assert main(["tune-report", str(exp)]) == 1
    assert f"{params}: not valid JSON" in capsys.readouterr().err


def test_a_search_whose_every_trial_failed_says_why_instead_of_nothing_to_choose(tmp_path, capsys):
    """The error was `no trial reported the metric yet; nothing to choose from`, also when every trial had failed for
    the same reason (a full disk: each trial's error.txt named the file)."""
    exp = make_experiment(tmp_path)
    state = [[json.dumps({"trial_id": f"abc_{name[-5:]}", "status": "ERROR"}), "{}"] for name in TRIALS]
    (exp / "experiment_state-2026-12-02_03-00-00.json").write_text(json.dumps({"trial_data": state}))
    for name in TRIALS:
        (exp / name / "result.json").write_text("")
        (exp / name / "error.txt").write_text(
            "Failure # 1 (occurred at 2026-12-07_00-48-21)\n"
            "ray::ImplicitFunc.train() (pid=1, ip=127.0.0.1, repr=train_trial)\n"
            "ray.train.WorkerGroupError: Training failed due to worker errors:\n"
            "Traceback (most recent call last):\n  File \"msbt/train/loop.py\", line 280, in _save\n"
            f"OSError: [Errno 28] No space left on device: '/run/{name}/model.keras'\n"
            "raised in stage 2's Ray Train worker of rank 0\n")
    with pytest.raises(ValueError) as err:
        review.write_best_overlay(exp)
    assert str(err.value) == (
        "every trial of the search failed (4), so there is no configuration to choose; trial_00000: OSError: "
        f"[Errno 28] No space left on device: '/run/trial_00000/model.keras' (its traceback: "
        f"{exp / 'trial_00000' / 'error.txt'})")
    (exp / "trial_00003" / "error.txt").unlink()  # one trial that did not fail but reported nothing: as before
    state[-1][0] = json.dumps({"trial_id": "abc_00003", "status": "TERMINATED"})
    (exp / "experiment_state-2026-12-02_03-00-00.json").write_text(json.dumps({"trial_data": state}))
    with pytest.raises(ValueError, match="no trial reported the metric yet"):
        review.write_best_overlay(exp)


def test_tunes_stop_record_is_noticed_and_passed_on():
    """What tells an interrupted search from a finished one (msbt.tune.search.run_search): Tune's SIGINT handler
    logs "Stop signal received" and fit() returns normally."""
    import logging

    from msbt.tune.search import StopSignalSeen

    seen = StopSignalSeen()
    record = logging.LogRecord("ray.tune.tune", logging.WARNING, __file__, 1, "Stop signal received (e.g. via "
                               "SIGINT/Ctrl+C), ending Ray Tune run.", None, None)
    other = logging.LogRecord("ray.tune.tune", logging.INFO, __file__, 1, "Total run time: 3 s", None, None)
    assert seen.filter(other) and not seen.seen
    assert seen.filter(record) and seen.seen  # the record still reaches the handlers


def test_a_best_value_shared_by_several_trials_is_called_a_tie(tmp_path, capsys):
    """A fast-mode search on the built-in data ranked four trials of val_auc 0.5000 and wrote the first as "best"
    without a word: the ranking was trial order."""
    exp = make_experiment(tmp_path)
    assert review.tie_note(*review.read_experiment(exp)) is None  # one best trial (0.80): nothing to say
    for name in TRIALS:
        (exp / name / "result.json").write_text(json.dumps({METRIC: 0.5, "training_iteration": 1}) + "\n")
    assert main(["tune-report", str(exp), "--top-k", "0"]) == 0
    printed = capsys.readouterr().out
    assert ("note: all 4 trials tie at the best val_auc 0.5000 (an AUC of 0.5 everywhere: no trial's scores "
            "separate the classes") in printed
    assert "best.yaml takes trial_00000 only because it comes first in trial order" in printed
    comment = (exp / "best.yaml").read_text()
    assert "# all 4 trials tie at the best val_auc 0.5000" in comment
    assert "<p class=warn>all 4 trials tie at the best val_auc 0.5000" in review.render(exp)
    (exp / "trial_00001" / "result.json").write_text(json.dumps({METRIC: 0.64, "training_iteration": 1}) + "\n")
    (exp / "trial_00003" / "result.json").write_text(json.dumps({METRIC: 0.64004, "training_iteration": 1}) + "\n")
    note = review.tie_note(*review.read_experiment(exp))
    assert note == ("2 of 4 trials reach the best val_auc 0.6400 as printed: trial_00003, trial_00001. trial_00003 "
                    "is first by less than 0.0001, far less than the validation split can tell apart; best.yaml "
                    "takes it")  # not "first in trial order": it is ahead, by a hair


def test_the_trials_bar_shows_the_best_value_over_epochs_as_the_ranking_does():
    """The bar said `best val_auc 0.9088` (a trial's last epoch) where the ranking and best.yaml gave 0.9754 (its
    best epoch)."""
    from ray.tune.experiment import Trial

    from msbt.tune.search import trial_progress

    trials = []
    for curve in ([0.60, 0.9754, 0.9088], [0.70, 0.80]):
        trial = Trial("__fake", stub=True)  # Tune's own record of a trial, fed results as Tune feeds them
        for epoch, value in enumerate(curve, start=1):
            trial.update_last_result({METRIC: value, "training_iteration": epoch})
        trials.append(trial)
    bar = trial_progress(len(trials), METRIC, "max")
    bar.setup()
    for trial in trials:
        bar.on_trial_complete(0, trials, trial)
    assert bar.best == 0.9754
    lowest = trial_progress(len(trials), "val_loss", "min")
    lowest.setup()
    trial = Trial("__fake", stub=True)
    for epoch, value in enumerate((0.9, 0.3, 0.5), start=1):
        trial.update_last_result({"val_loss": value, "training_iteration": epoch})
    lowest.on_trial_complete(0, [trial], trial)
    assert lowest.best == 0.3
