"""`msbt external` on a tiny real run folder, the scoring of msbt.eval.external, and leave-one-site-out folds.

The run is shaped as the main job writes it (config.yaml, data/ultrasound/split.* + fingerprints.npz,
stores/ultrasound/store.json + profile.json, metrics.json, a stage-2 checkpoint) around a 32 px
EfficientNet-Lite0 model with ImageNet features and an untrained head, as in tests/unit/test_predict.py:
training would only cost time, and the checks are about what is compared and written, not accuracy.
"""

import csv
import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest

from helpers import TINY_BACKBONE
from msbt.config import Config, HeadConfig, StageConfig, dump_config
from msbt.data.profile import build_profile, image_features, write_profile
from msbt.data.sites import discover_sites
from msbt.data.sitesynth import generate_sites
from msbt.data.splits import make_split, save_fingerprints, save_split
from msbt.eval import external as ext
from msbt.model.checkpoint import MODEL_FILE, write_manifest
from msbt.model.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
STAGE = StageConfig(backbone="efficientnet_lite0", weights="imagenet", image_size=32, batch_size=4,
                    head=HeadConfig((8, 4, 2), 0.5), monitor="val_auc")
CLASSES = ("benign", "malignant")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    sites = generate_sites(root / "sites", sites=3, seed=0, lesions_per_class=6, frames_per_lesion=(1, 2), size=48)["sites"]
    run = root / "runs" / "a"
    config = Config()
    # a seed of its own: `msbt external` bootstraps with the run's data.seed, as the run's own test metrics do
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, seed=7))
    dump_config(config, run / "config.yaml")
    d = discover_sites(sites["site-a"], CLASSES)
    split = make_split(d, folds=3)
    save_split(split, run / "data" / "ultrasound")
    save_fingerprints(d, run / "data" / "ultrasound")
    store = run / "stores" / "ultrasound"
    store.mkdir(parents=True)
    (store / "store.json").write_text(json.dumps({"kind": "ultrasound", "settings": {
        "image_size": 48, "aspect": "pad", "intensity": "none", "sixteen_bit": "scale"}}))
    from msbt.serve.predict import Preparation, prepare_sized

    prep = Preparation(48, "pad", "none", "scale", ("_mask",), "test")
    train = [r for r, row in zip(d.records, split.table) if row["split"] == "train"]
    prepared = [prepare_sized(r.path, prep) for r in train]  # (image, (width, height))
    write_profile(build_profile([image_features(*size, image) for image, size in prepared]), store)
    checkpoint = run / "stage2" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    keras.utils.set_random_seed(0)
    build_model(STAGE, 2).save(checkpoint / MODEL_FILE)
    write_manifest(checkpoint, stage_config=STAGE, class_names=list(CLASSES), metrics={"val_auc": 0.5}, best_epoch=1)
    (run / "metrics.json").write_text(json.dumps({
        "checkpoint": str(checkpoint), "threshold": 0.5, "threshold_rule": "youden", "threshold_chosen_on": "val",
        "threshold_flags": ["threshold chosen among tied scores: 50% of validation images score exactly 0.5"],
        "threshold_ci95": [0.5, 0.3, 0.7]}))
    # A "new" site that holds three of the run's training images (renamed) among site b's images.
    mixed = root / "mixed"
    shutil.copytree(sites["site-b"], mixed)
    copied = [r for r in train if r.label == "benign"][:3]
    for i, r in enumerate(copied):
        shutil.copy(r.path, mixed / "benign" / f"copied_{i}.png")
    return {"run": run, "checkpoint": checkpoint, "sites": sites, "mixed": mixed, "copied": len(copied)}


def test_contamination_is_found_excluded_by_default_and_counted(run):
    from msbt.serve.external import external

    results = external(run["checkpoint"], [f"mixed={run['mixed']}"], n_boot=100)
    r = results["mixed"]
    scored_files = len(list((run["mixed"] / "benign").iterdir())) + len(list((run["mixed"] / "malignant").iterdir()))
    assert r["contamination"]["found"] == run["copied"] and r["contamination"]["excluded"]
    assert r["images"] == scored_files - run["copied"]
    with (run["run"] / "external" / "mixed" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    excluded = [row for row in rows if row["excluded"]]
    assert sorted(Path(row["path"]).name for row in excluded) == [f"copied_{i}.png" for i in range(run["copied"])]
    assert all(np.isfinite(float(row["logit"])) for row in rows)
    # The logit is the classifier's pre-sigmoid score: sigmoid(logit) is the probability.
    for row in rows:
        assert 1 / (1 + np.exp(-float(row["logit"]))) == pytest.approx(float(row["p"]), abs=1e-5)
    kept = external(run["checkpoint"], [f"mixed={run['mixed']}"], n_boot=100, keep_duplicates=True)["mixed"]
    assert kept["images"] == scored_files and not kept["contamination"]["excluded"]


def test_external_metrics_transfer_calibration_depth_and_report(run):
    from msbt.cli import main

    assert main(["external", str(run["checkpoint"]), run["sites"]["site-c"], "--n-boot", "100"]) == 0
    r = json.loads((run["run"] / "external" / "site-c" / "metrics.json").read_text())
    assert set(r["at_run_threshold"]) >= {"auc", "sensitivity", "specificity"} and r["threshold"] == 0.5
    auc, low, high = r["at_run_threshold"]["auc"]
    assert low <= auc <= high
    assert r["ci"] == {"level": 0.95, "method": "percentile bootstrap", "resamples": 100, "seed": 7, "unit": "group"}
    assert set(r["wilson_groups"]) == {"accuracy", "sensitivity", "specificity", "auc"}
    t = r["threshold_transfer"]
    assert "optimistic" in t["note"] and t["run_threshold"] == 0.5
    # Youden on the site itself can only do as well or better in J than the run's threshold.
    j = lambda s: s["sensitivity"] + s["specificity"]  # noqa: E731
    assert j(t["site_best_optimistic"]) >= j(t["run"]) - 1e-12
    assert sum(r["calibration"]["counts"]) == r["images"]
    # Site c stores 32 px lesion crops; the run trained on 48 px frames: the size rule must fire.
    assert any("long_side" in w for w in r["out_of_depth"])
    assert any("tied scores" in n for n in r["run_notes"])
    html = (run["run"] / "report.html").read_text()
    assert 'id="external"' in html and "site-c" in html and "optimistic" in html
    assert "Wilson 95% over lesion groups" in html


def test_external_into_a_folder_that_is_not_a_run_and_bad_options(run, tmp_path, capsys):
    """--out takes any folder: the results are written whole and no report is attempted (it failed after the
    first site's results, naming `msbt report`). Options are checked before any image is read."""
    from msbt.cli import main

    site = run["sites"]["site-c"]
    out = tmp_path / "elsewhere"
    assert main(["external", str(run["checkpoint"]), site, "--n-boot", "50", "--out", str(out)]) == 0
    assert (out / "external" / "site-c" / "metrics.json").is_file() and not (out / "report.html").exists()
    assert "not a run folder, so no report.html" in capsys.readouterr().out
    inside = Path(site.split("=", 1)[-1]) / "results"
    assert main(["external", str(run["checkpoint"]), site, "--out", str(inside)]) == 1
    assert "inside the data being read" in capsys.readouterr().err and not inside.exists()
    # a named source (NAME=PATH) is checked by its path (the item as a whole is no path, and passed unchecked)
    assert main(["external", str(run["checkpoint"]), f"named={site.split('=', 1)[-1]}", "--out", str(inside)]) == 1
    assert "inside the data being read" in capsys.readouterr().err and not inside.exists()


def test_score_site_at_a_fixed_threshold_by_hand():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.7, 0.6, 0.8, 0.9])
    r = ext.score_site(y, p, [f"g{i}" for i in range(6)], 0.75, n_boot=50)
    assert r["at_run_threshold"]["sensitivity"][0] == pytest.approx(2 / 3)
    assert r["at_run_threshold"]["specificity"][0] == 1.0
    assert r["threshold_transfer"]["site_best_threshold"] == 0.6  # Youden: J = 1 - 1/3 at 0.6 (ties -> lower)
    assert r["calibration"]["in_the_large"] == pytest.approx(p.mean() - 0.5)
    assert ext.score_site([1, 1], [0.2, 0.3], ["a", "b"], 0.5)["notes"]  # one class: counts only


def test_leave_one_site_out_folds_hold_out_each_site_whole():
    from msbt.jobs.experiments import site_roles

    rows = [{"relpath": f"{s}/{i}", "site": s, "split": split, "label": "benign"}
            for s in ("a", "b", "c") for i, split in enumerate(("train", "train", "val", "test"))]
    seen_as_test = set()
    for held in ("a", "b", "c"):
        roles = site_roles(rows, held, exclude=frozenset({f"{held}/0"}))
        assert {k for k, v in roles.items() if v == "test"} == {f"{held}/1", f"{held}/2", f"{held}/3"}
        assert f"{held}/0" not in roles  # a near-duplicate of another site's training image: excluded
        others = {k: v for k, v in roles.items() if not k.startswith(held)}
        assert sorted(others.values()) == sorted(["train", "train", "val", "internal"] * 2)
        seen_as_test |= {k for k, v in roles.items() if v == "test"}
    assert len(seen_as_test) == 9


def _printed(call):
    """Run ``call()`` and return (its result, what it printed): the module fixtures below have no capsys."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = call()
    return result, out.getvalue()


# Leave one site out, the real thing at its smallest: two built-in sites, 32 px, one epoch per stage. The steps
# build on each other (the design, then compare's scratch arm, then a second seed, then both), one module fixture
# each, so that each test's time limit covers only the stages it adds (about three; all of it in one test ran
# past pytest-timeout's 600 s on the CI machine).
@pytest.fixture(scope="module")
def loso(tmp_path_factory, ray_local):
    from msbt.config import DataConfig, PreprocessConfig, RunConfig, SynthConfig
    from msbt.jobs import experiments as X

    tmp_path = tmp_path_factory.mktemp("loso")
    small = dict(**TINY_BACKBONE, image_size=32, batch_size=8, epochs=1)
    config = Config(
        synth=SynthConfig(out_dir=str(tmp_path / "synth"), fields_per_line=3, field_size=300, lesions_per_class=6,
                          frames_per_lesion=(1, 2), ultrasound_size=48, sites=2),
        data=DataConfig(split=(0.5, 0.25, 0.25), folds=3),
        preprocess=PreprocessConfig(max_patches_per_field=3, image_size=32),
        stage1=StageConfig(**small),
        # stage 2 weighs each site's each class alike (stage.balance): the Ray Train path of the site column
        stage2=StageConfig(**{**small, "weights": "parent", "monitor": "val_auc", "head": HeadConfig((8,), 0.5),
                              "balance": "site_class"}),
        run=RunConfig(name="loso", storage_path=str(tmp_path / "runs")),
    )
    report = X.leave_one_site_out(config, n_boot=100)
    return SimpleNamespace(tmp=tmp_path, config=config, report=report)


@pytest.fixture(scope="module")
def loso_arms(loso):
    """compare --by site: the multistage arm and a scratch arm, seed 0."""
    from msbt.jobs import experiments as X

    return _printed(lambda: X.leave_one_site_out(loso.config, arms=("multistage", "scratch"), n_boot=100))


@pytest.fixture(scope="module")
def loso_seeded(loso):
    """--seeds 0 1: seed 1 trained beside the design's seed 0."""
    from msbt.jobs import experiments as X

    return _printed(lambda: X.leave_one_site_out(loso.config, seeds=(0, 1), n_boot=100))


@pytest.mark.ray
@pytest.mark.slow
def test_leave_one_site_out_on_two_built_in_sites(loso):
    """Every site held out once, its store holding all its images as test and the other site's test rows as
    'internal'."""
    from msbt.data.store import read_store
    from msbt.jobs import experiments as X
    from msbt.model.checkpoint import lineage, read_manifest

    tmp_path, report = loso.tmp, loso.report
    assert [r["site"] for r in report["rows"]] == ["site-a", "site-b"]
    rows = X.read_split_rows(tmp_path / "runs" / "loso" / "data" / "ultrasound")
    stage1s = set()
    for r in report["rows"]:
        store = read_store(tmp_path / "runs" / "loso" / "loso" / f"site-{r['site']}" / "store",
                           columns=["source", "split", "site"])
        held = {s for s, role in zip(store["source"], store["split"]) if role == "test"}
        assert held == {x["relpath"] for x in rows if x["site"] == r["site"]} and set(store["site"]) == {"site-a", "site-b"}
        assert r["test_images"] == len(held) and r["internal_auc"] is not None
        # the internal AUC's images said beside it (4 images gave "0.000 [0.000, 0.000]" and a gap of -0.93)
        assert r["internal_images"] == sum(1 for role in store["split"] if role == "internal")
        assert f"{r['internal_auc'][2]:.3f}] ({r['internal_images']})" in X.format_loso(report)
        # the gap with its interval (the two AUCs rest on independent images)
        gap, low, high = r["gap_ci95"]
        assert gap == pytest.approx(r["gap"]) and low < gap < high
        assert f"{gap:+.3f} [{low:+.3f}, {high:+.3f}]" in X.format_loso(report)
        assert r["gap"] == pytest.approx(r["internal_auc"][0] - r["held_out_auc"][0])
        low, high = r["held_out_auc"][1:]
        assert low <= r["held_out_auc"][0] <= high
        stage1s.add(lineage(r["checkpoint"])[1]["path"])
        assert read_manifest(r["checkpoint"])["config"]["balance"] == "site_class"
        # the fold's metrics are of a site the model never trained on: not called an internal estimate
        fold = json.loads((tmp_path / "runs" / "loso" / "loso" / f"site-{r['site']}" / "metrics.json").read_text())
        assert fold["scope"] == {"kind": "held_out", "sites": [r["site"]], "unseen_sites": [r["site"]]}
        assert not any(note.startswith("internal estimate") for note in fold["notes"])
    assert len(stage1s) == 1  # both arms from one stage 1
    assert (tmp_path / "runs" / "loso" / "loso" / "loso.json").is_file()
    aucs = {r["site"]: r["held_out_auc"] for r in report["rows"]}
    summary = report["summary"]
    assert summary["worst_held_out_auc"] == min(aucs.values(), key=lambda v: v[0]) == aucs[summary["worst_site"]]
    assert summary["mean_held_out_auc"] == pytest.approx(np.mean([v[0] for v in aucs.values()]))
    assert "at a site it never saw" in X.format_loso(report)
    # the report gives the same number to quote (the terminal did; the page had the table only)
    from msbt.eval.report import experiments_section

    worst = summary["worst_held_out_auc"]
    assert (f"<b>The number to quote</b>: at a site it never saw, AUC {worst[0]:.3f} [{worst[1]:.3f}, {worst[2]:.3f}] "
            f"at the worst ({summary['worst_site']})") in experiments_section(tmp_path / "runs" / "loso")


@pytest.mark.ray
@pytest.mark.slow
def test_external_on_a_fold_checks_contamination_against_what_the_fold_trained_on(loso):
    """A leave-one-site-out fold's model never saw its held-out site, although that site's images are train/val
    rows of the run's split: `msbt external` of the site with the fold's checkpoint must score every image of it
    (it excluded the site's train/val images as "near-duplicates of the run's train/val images"), and the other
    site, which the fold trained on, is found contaminated by exactly the fold store's train/val rows of it."""
    from msbt.data.store import read_store
    from msbt.serve.external import external

    run = loso.tmp / "runs" / "loso"
    (row,) = [r for r in loso.report["rows"] if r["site"] == "site-a"]
    folders = {p.name: p for p in (loso.tmp / "synth").rglob("site-*") if p.is_dir() and (p / "benign").is_dir()}
    assert set(folders) == {"site-a", "site-b"}
    out = loso.tmp / "external-of-fold"
    results = external(row["checkpoint"], [f"{name}={path}" for name, path in sorted(folders.items())], out=out,
                       n_boot=50)
    held = results["site-a"]
    assert held["contamination"]["found"] == 0 and held["images"] == row["test_images"]
    fold = read_store(run / "loso" / "site-site-a" / "store", columns=["source", "split"])
    seen_b = sum(1 for s, split in zip(fold["source"], fold["split"]) if split in ("train", "val") and "site-b" in s)
    assert results["site-b"]["contamination"]["found"] == seen_b > 0
    assert any("the store this checkpoint trained on" in n for n in held["run_notes"])


@pytest.mark.ray
@pytest.mark.slow
def test_leave_one_site_out_compares_arms_on_each_held_out_site(loso, loso_arms):
    """compare --by site: the multistage arm is the design (its folders reused, nothing retrained), the scratch
    arm trains per site; the two are paired on each held-out site's images."""
    from msbt.eval.report import experiments_section
    from msbt.model.checkpoint import lineage

    tmp_path, report = loso.tmp, loso.report
    both, printed = loso_arms
    assert "site-site-a: reusing" in printed and "site-site-b: reusing" in printed
    # one seed per arm: said, as loso-diff says it (the intervals leave the training seed's spread out)
    assert "(one training seed per arm: the intervals and p cover the held-out images only" in printed
    assert both["arms"]["multistage"]["rows"] == report["rows"]
    assert [r["site"] for r in both["arms"]["scratch"]["rows"]] == ["site-a", "site-b"]
    for r in both["arms"]["scratch"]["rows"]:
        assert f"/loso/site-{r['site']}-scratch/" in r["checkpoint"]
        assert len(lineage(r["checkpoint"])) == 1  # trained from scratch: no parent stage
    for site in ("site-a", "site-b"):
        (test,) = both["paired"][site]
        assert (test["a"], test["b"]) == ("multistage", "scratch")
        held = {r["site"]: r["held_out_auc"][0] for r in report["rows"]}[site]
        assert test["paired_bootstrap"]["auc_a"] == pytest.approx(held)
    assert (tmp_path / "runs" / "loso" / "loso" / "compare.json").is_file()
    section = experiments_section(tmp_path / "runs" / "loso")
    assert "Stage-2 starting points under leave one site out" in section
    # the multistage arm's start, said beside both tables: built-in synthetic cells
    assert both["stage1_origin"]["synthetic"] and both["stage1_origin"]["checkpoint"] == report["stage1"]
    assert "synthetic microscope fields, not real cells" in printed and "not real cells" in section
    # at a site it never saw: the two sites' own paired differences averaged, one interval over both
    (pair,) = both["across_sites"]["pairs"]
    assert (pair["a"], pair["b"], pair["sites"]) == ("multistage", "scratch", ["site-a", "site-b"])
    per_site = [both["paired"][site][0]["paired_bootstrap"]["diff"] for site in ("site-a", "site-b")]
    assert pair["diff"] == pytest.approx(np.mean(per_site)) and pair["ci"][0] <= pair["diff"] <= pair["ci"][1]
    assert "across the 2 held-out sites: mean AUC multistage - scratch" in printed
    assert "At a site it never saw</b>: each held-out site" in section


@pytest.mark.ray
@pytest.mark.slow
def test_leave_one_site_out_over_two_training_seeds(loso, loso_arms, loso_seeded):
    """--seeds: the config's own seed (0) reuses site-<s>/, seed 1 trains site-<s>-seed1/ on the same stores; the
    summary is the mean over seeds, with the seeds' spread and their averaged model."""
    from msbt.eval.report import experiments_section
    from msbt.jobs import experiments as X
    from msbt.model.checkpoint import lineage, read_manifest

    tmp_path, report = loso.tmp, loso.report
    seeded, printed = loso_seeded
    stage1s = {lineage(r["checkpoint"])[1]["path"] for r in report["rows"]}
    assert "site-site-a: reusing" in printed and "held-out site-b seed 1: AUC" in printed
    assert seeded["seeds"] == [0, 1] and seeded["rows"] == report["rows"] == seeded["by_seed"]["0"]
    for r in seeded["by_seed"]["1"]:
        assert r["folder"] == f"site-{r['site']}-seed1" and f"/loso/site-{r['site']}-seed1/" in r["checkpoint"]
        assert read_manifest(r["checkpoint"])["seed"] == 1
        assert lineage(r["checkpoint"])[1]["path"] in stage1s  # the same stage 1
    assert {read_manifest(r["checkpoint"])["seed"] for r in report["rows"]} == {0}
    for site, across in zip(("site-a", "site-b"), seeded["across_seeds"]):
        per_seed = [next(r["held_out_auc"][0] for r in seeded["by_seed"][k] if r["site"] == site) for k in "01"]
        assert across["site"] == site and across["per_seed"] == pytest.approx(per_seed)
        assert across["held_out_auc_mean"] == pytest.approx(np.mean(per_seed))
        assert across["seed_sd"] == pytest.approx(np.std(per_seed, ddof=1))
        # the averaged model of one seed (each alone, on average) and of both
        one, both = across["ensemble_by_size"]
        assert one["auc_mean"] == pytest.approx(np.mean(per_seed)) and both["auc_mean"] == across["ensemble_auc"][0]
    worst = min(seeded["across_seeds"], key=lambda r: r["held_out_auc_mean"])
    assert seeded["summary"]["worst_site"] == worst["site"]
    assert seeded["summary"]["worst_held_out_auc"][0] == pytest.approx(worst["held_out_auc_mean"])
    assert "over 2 training seeds" in X.format_loso(seeded) and "averaged model" in X.format_loso(seeded)
    # the mean over sites with an interval over their lesions and the seeds (the sites' means are independent)
    mean, low, high = seeded["summary"]["mean_held_out_auc_ci95"]
    assert mean == pytest.approx(np.mean([r["held_out_auc_mean"] for r in seeded["across_seeds"]])) and low < mean < high
    assert f"{mean:.3f} [{low:.3f}, {high:.3f}] on average over these 2 sites (interval over their lesions and the " \
        "training seeds" in X.format_loso(seeded)
    html = experiments_section(tmp_path / "runs" / "loso")
    assert "sd over seeds" in html and "averaged over k seeds" not in html  # with two seeds the columns say it
    diff = X.loso_diff([tmp_path / "runs" / "loso", f"{tmp_path / 'runs' / 'loso'}:scratch"], n_boot=100)
    assert [r["seeds"] for r in diff["rows"]] == [2, 2, 1, 1] and all(r["seed_term"] for r in diff["rows"][2:])


@pytest.mark.ray
@pytest.mark.slow
def test_leave_one_site_out_compares_arms_over_seeds(loso, loso_arms, loso_seeded, capsys):
    """compare --by site --seeds: every arm with every seed (the multistage arm is the design: its seed folders are
    reused; scratch trains seed 1), the arms compared on their means over the seeds, both spreads counted."""
    from msbt.eval.report import experiments_section
    from msbt.jobs import experiments as X
    from msbt.model.checkpoint import read_manifest

    tmp_path, config = loso.tmp, loso.config
    both, _ = loso_arms
    seeded, _ = loso_seeded
    capsys.readouterr()
    arms2 = X.leave_one_site_out(config, arms=("multistage", "scratch"), seeds=(0, 1), n_boot=100)
    printed = capsys.readouterr().out
    assert "site-site-a-seed1: reusing" in printed and "site-site-b-scratch: reusing" in printed
    assert arms2["arms"]["multistage"]["across_seeds"] == seeded["across_seeds"]  # the same models, reused
    scratch = arms2["arms"]["scratch"]
    assert [r["folder"] for r in scratch["by_seed"]["1"]] == ["site-site-a-scratch-seed1", "site-site-b-scratch-seed1"]
    assert {read_manifest(r["checkpoint"])["seed"] for r in scratch["by_seed"]["1"]} == {1}
    for site in ("site-a", "site-b"):
        (test,) = arms2["paired"][site]
        means = {a: next(r["held_out_auc_mean"] for r in arms2["arms"][a]["across_seeds"] if r["site"] == site)
                 for a in ("multistage", "scratch")}
        over = test["over_seeds"]
        assert over["seeds"] == 2 and over["diff"] == pytest.approx(means["multistage"] - means["scratch"])
        assert over["ci"][0] <= over["diff"] <= over["ci"][1]
        first = next(iter(both["paired"][site]))["paired_bootstrap"]  # seed 0's paired bootstrap, as before
        assert [test["paired_bootstrap"][k] for k in ("auc_a", "auc_b", "diff")] == pytest.approx(
            [first[k] for k in ("auc_a", "auc_b", "diff")], abs=1e-6)
    assert "(scratch) (same split" in X.format_loso(arms2) and "over 2 seeds" in X.format_loso(arms2)
    assert "mean AUC over seeds" in experiments_section(tmp_path / "runs" / "loso")
    diff = X.loso_diff([tmp_path / "runs" / "loso", f"{tmp_path / 'runs' / 'loso'}:scratch"], n_boot=100)
    assert [r["seeds"] for r in diff["rows"]] == [2, 2, 2, 2]
    # folders follow a fixed rule (a suffix for a training seed other than data.seed): a config whose own training
    # seed is 1 finds seed 1's folders and trains nothing
    import dataclasses

    capsys.readouterr()
    one = X.leave_one_site_out(dataclasses.replace(config, run=dataclasses.replace(config.run, train_seed=1)), n_boot=100)
    printed = capsys.readouterr().out
    assert "site-site-a-seed1: reusing" in printed and "site-site-b-seed1: reusing" in printed
    assert [r["checkpoint"] for r in one["rows"]] == [r["checkpoint"] for r in seeded["by_seed"]["1"]]


@pytest.mark.ray
@pytest.mark.slow
def test_ensemble_of_a_held_out_sites_seeds(loso, loso_seeded):
    """msbt ensemble: site-a's two seeds averaged into one checkpoint, scored on their fold store (found from the
    checkpoint), which is the "averaged model" leave one site out reported."""
    from msbt.eval.evaluate import read_predictions
    from msbt.jobs.ensemble import make_ensemble
    from msbt.model import gradcam
    from msbt.model.checkpoint import CheckpointError, format_lineage, load_checkpoint, read_manifest
    from msbt.serve.predict import predict_logits

    tmp_path = loso.tmp
    seeded, _ = loso_seeded

    a0, a1 = (next(r["checkpoint"] for r in seeded["by_seed"][k] if r["site"] == "site-a") for k in "01")
    b0 = next(r["checkpoint"] for r in seeded["by_seed"]["0"] if r["site"] == "site-b")
    out = tmp_path / "runs" / "loso" / "ensembles" / "site-a"
    ens = make_ensemble([a0, a1], out, n_boot=100)
    assert ens["store"] == str((tmp_path / "runs" / "loso" / "loso" / "site-site-a" / "store").resolve())
    across = next(r for r in seeded["across_seeds"] if r["site"] == "site-a")
    assert ens["test_auc"][0] == pytest.approx(across["ensemble_auc"][0])
    assert [m["test_auc"][0] for m in ens["members"]] == pytest.approx(across["per_seed"])
    assert ens["vs_members"]["members_mean_auc"] == pytest.approx(across["held_out_auc_mean"])
    members = [read_predictions(tmp_path / "runs" / "loso" / "loso" / f / "predictions.csv")["test"]
               for f in ("site-site-a", "site-site-a-seed1")]
    mine = read_predictions(out / "predictions.csv")["test"]
    order = [np.argsort(m["source"]) for m in (mine, *members)]
    np.testing.assert_allclose(mine["p"][order[0]], np.mean([m["p"][o] for m, o in zip(members, order[1:])], axis=0),
                               atol=1e-6)
    model, manifest = load_checkpoint(out / "checkpoint")
    assert [m["model_sha256"] for m in manifest["members"]] == [read_manifest(c)["model_sha256"] for c in (a0, a1)]
    assert [m["seed"] for m in manifest["members"]] == [0, 1]
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3)).astype(np.uint8)
    p, logit = predict_logits(model, images)
    np.testing.assert_allclose(1 / (1 + np.exp(-logit)), p, atol=1e-5)
    parts = [load_checkpoint(c)[0] for c in (a0, a1)]
    np.testing.assert_allclose(gradcam.gradcam(model, images),
                               np.mean([gradcam.gradcam(m, images) for m in parts], axis=0), atol=1e-5)
    text = format_lineage(out / "checkpoint")
    assert text.startswith("ensemble of 2") and "member 1: stage 2" in text and "MEMBER CHANGED" not in text
    for bad, message in (([a0], "at least two"), ([a0, a0], "more than once"), ([a0, b0], "other training data")):
        with pytest.raises(CheckpointError, match=message):
            make_ensemble(bad, tmp_path / "refused", store=ens["store"], n_boot=100)
        assert not (tmp_path / "refused" / "checkpoint").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="holds checkpoint, metrics.json, predictions.csv, members.json already"):
        make_ensemble([a0, a1], out, n_boot=100)
    run_folder = tmp_path / "runs" / "loso"  # the run's own folder: its config.yaml (and results) stay its own
    with pytest.raises(ValueError, match="holds config.yaml already"):
        make_ensemble([a0, a1], run_folder, n_boot=100)
    assert not (run_folder / "checkpoint").exists() and not (run_folder / "members.json").exists()


def test_threshold_flags_and_spread():
    from msbt.eval.threshold import logit, threshold_flags, threshold_spread

    # The Mendeley failure of the issue: validation scores saturated at exactly 1.0, threshold 1.0.
    p = np.array([1.0] * 8 + [0.2, 0.1])
    flags = threshold_flags(p, 1.0)
    assert any("saturated score" in f for f in flags) and any("tied scores" in f for f in flags)
    assert threshold_flags(np.linspace(0.05, 0.95, 20), 0.5) == []
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    scores = np.clip(y * 0.3 + rng.normal(0.35, 0.15, 80), 0.001, 0.999)
    point, low, high = threshold_spread(y, scores, n_boot=200)
    assert low <= point <= high and high - low > 0.01  # a threshold from 80 noisy scores moves
    assert np.isfinite(logit([0.0, 1.0])).all() and logit([0.5])[0] == 0.0


def test_predict_takes_the_manifests_training_takes(tmp_path):
    import cv2

    from msbt.serve.predict import collect_files

    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / name), np.full((8, 8), 100, np.uint8))
    (tmp_path / "list.csv").write_text("path,label,group\na.png,benign,p1\nb.png,malignant,p2\ngone.png,benign,p3\n")
    files, rejects, _ = collect_files([tmp_path / "list.csv"])
    assert [f.name for f in files] == ["a.png", "b.png"]
    assert len(rejects) == 1 and "gone.png" in rejects[0].path and "does not exist" in rejects[0].reason


@pytest.mark.parametrize("bad", ["wrong-header", "empty-dir", "class-dir", "missing"])
def test_a_bad_later_source_fails_before_any_site_is_scored_or_written(run, tmp_path, capsys, monkeypatch, bad):
    """Every source is scanned before the model loads: a bad one after a good one fails the command naming it, and
    the good site's external/<site>/ is not written (it was scored and written first, then the command exited 1)."""
    from msbt.cli import main

    if bad == "wrong-header":
        source = tmp_path / "wrong.csv"
        source.write_text("file,class\nx.png,benign\n")
    elif bad == "empty-dir":
        source = tmp_path / "empty"
        source.mkdir()
    elif bad == "class-dir":
        source = Path(run["sites"]["site-b"]) / "benign"
    else:
        source = tmp_path / "missing"

    capsys.readouterr()
    assert main(["external", str(run["checkpoint"]), f"first={run['sites']['site-c']}", f"bad={source}",
                 "--n-boot", "50"]) == 1
    assert not (run["run"] / "external" / "first").exists() and not (run["run"] / "external" / "bad").exists()
    err = capsys.readouterr().err
    assert "site 'bad'" in err and str(source) in err and "nothing was written" in err

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before every source was scanned")

    # two bad sources: one attempt names both, and the model is never loaded
    monkeypatch.setattr("msbt.eval.evaluate.load_stage2", no_model)
    assert main(["external", str(run["checkpoint"]), f"gone={tmp_path / 'gone'}", f"first={run['sites']['site-c']}",
                 f"bad={source}", "--n-boot", "50"]) == 1
    err = capsys.readouterr().err
    assert "2 of 3 sources" in err and "site 'gone'" in err and "site 'bad'" in err
    assert not (run["run"] / "external" / "first").exists()


def test_a_sites_rejects_are_written_beside_its_predictions_and_named(run, tmp_path, capsys):
    """metrics.json counted a site's rejects without naming them: rejects.csv (path,reason, as the data step's)
    lists them, and the command prints how many and where; a site without rejects gets an empty list, no line."""
    from msbt.cli import main

    from dicomfiles import write_rle_dicom_with_a_damaged_frame

    site = tmp_path / "broken-site"
    shutil.copytree(run["sites"]["site-c"], site)
    (site / "benign" / "broken.png").write_text("not an image")
    # a cine loop two of whose three frames no decoder reads: two rejected images of one file (frame 1 is scored)
    loop = np.random.default_rng(3).integers(0, 255, (3, 48, 48), dtype=np.uint8)
    write_rle_dicom_with_a_damaged_frame(site / "malignant" / "loop.dcm", loop, (0, 2))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["external", str(run["checkpoint"]), str(site), run["sites"]["site-c"], "--n-boot", "50",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    folder = out / "external" / "broken-site"
    with (folder / "rejects.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((Path(r["path"]).name, bool(r["reason"])) for r in rows) == [
        ("broken.png", True), ("loop.dcm#frame=0000", True), ("loop.dcm#frame=0002", True)]
    assert list(rows[0]) == ["path", "reason"]
    result = json.loads((folder / "metrics.json").read_text())
    assert result["rejects"] == 3 and result["rejected_files"] == 2
    assert result["rejects_file"] == str(folder / "rejects.csv")
    # images and files told apart: it said "3 files rejected" of two files
    assert ("3 images rejected from 2 files (not readable or not usable as images; a cine loop's frames count one "
            f"by one), listed with the reasons in {folder / 'rejects.csv'}") in printed
    clean = out / "external" / "site-c"
    assert (clean / "rejects.csv").read_text().splitlines() == ["path,reason"]
    assert printed.count(" rejected") == 1  # the clean site gets no line


def test_a_site_of_malignant_cases_alone_is_scored_for_sensitivity(run, tmp_path, capsys):
    """A hospital's series of biopsy-proven cancers has no benign image: it was refused ("class 'benign' not
    found"); its sensitivity at the run's threshold is what it can say, with a Wilson interval."""
    from msbt.cli import main

    only = tmp_path / "biopsies"
    shutil.copytree(Path(run["sites"]["site-c"]) / "malignant", only / "malignant")
    assert main(["external", str(run["checkpoint"]), f"biopsies={only}", "--n-boot", "50",
                 "--out", str(tmp_path / "out")]) == 0
    r = json.loads((tmp_path / "out" / "external" / "biopsies" / "metrics.json").read_text())
    value, low, high = r["one_class"]["sensitivity"]
    assert r["malignant"] == r["images"] == len(list((only / "malignant").iterdir())) and low <= value <= high
    assert "sensitivity" in capsys.readouterr().out
