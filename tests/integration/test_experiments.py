"""Cross-validation, the Table 1 ablation and the stage comparison (msbt.jobs.experiments).

Pure parts (fold plans, overlays, paired tests, naive split) without Ray; then real tiny runs on a local
2-CPU Ray cluster, on the session's tiny run (tests/conftest.py: built-in data at 32 px, tiny_cnn, its stage 1
trained once for the session).
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from msbt.jobs import experiments as X
from msbt.eval import metrics
from msbt.config import Config, ConfigError, to_dict
from msbt.eval.evaluate import Evaluation

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def flat(d, prefix=""):
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed(a: Config, b: Config) -> set[str]:
    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return {k for k in fa if fa[k] != fb[k]}


# ---------------------------------------------------------------------------------------------------
# No Ray


def test_ablation_rows_change_exactly_the_documented_keys():
    base = Config()  # the paper's stage 2: augmentation on, dropout 0.5, no L2
    documented = {"stage2.augment.enabled", "stage2.head.l2", "stage2.head.dropout"}
    configs = {name: X.with_overrides(base, row) for name, row in X.ABLATION_ROWS.items()}
    for name, config in configs.items():
        assert set(X.ABLATION_ROWS[name]) == documented
        assert changed(base, config) <= documented  # nothing outside the three keys moves
    assert changed(configs["no_augmentation"], configs["augmentation"]) == {"stage2.augment.enabled"}
    assert changed(configs["augmentation"], configs["augmentation_l2"]) == {"stage2.head.l2"}
    assert changed(configs["augmentation"], configs["augmentation_dropout"]) == {"stage2.head.dropout"}
    assert configs["augmentation_dropout"].stage2 == base.stage2  # the paper's own head is the last row
    assert list(X.PAPER_TABLE1_ACCURACY.values()) == [0.87, 0.90, 0.92, 0.96]
    # An arm adds only its own Ray folder.
    arm = X.arm_config(base, Path("/tmp/x/ablation"), "augmentation_l2", X.ABLATION_ROWS["augmentation_l2"])
    assert changed(configs["augmentation_l2"], arm) == {"run.storage_path", "run.name"}
    assert (arm.run.storage_path, arm.run.name) == ("/tmp/x/ablation", "augmentation_l2")
    with pytest.raises(ConfigError, match="stage2.head.l3"):
        X.with_overrides(base, {"stage2.head.l3": 1})


def test_compare_arms_differ_only_in_where_stage2_starts():
    base = Config()
    arms = {name: X.with_overrides(base, row) for name, row in X.COMPARE_ARMS.items()}
    assert {a.stage2.weights for a in arms.values()} == {"parent", "imagenet", "none"}
    for a in arms.values():
        assert changed(base, a) <= {"stage2.weights"}


@pytest.mark.parametrize("name", ["crossval", "ablation", "compare", "report"])
def test_experiment_subcommands_have_help(name, capsys):
    from msbt.cli import main

    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0 and "usage: msbt " + name in capsys.readouterr().out


@pytest.mark.parametrize("by, extra", [("site", []), ("split", ["--no-naive"])])
def test_compare_with_one_arm_is_refused_before_any_work(tmp_path, capsys, by, extra):
    """`compare --by site --arms imagenet` compared nothing and rewrote loso/compare.json, so an earlier two-arm
    comparison (its paired differences) was gone, exit 0."""
    from msbt.cli import main

    argv = ["compare", "--smoke-test", "--by", by, "--arms", "imagenet", *extra, "--set", f"run.storage_path={tmp_path}",
            "--set", f"synth.out_dir={tmp_path / 'synth'}"]
    assert main(argv) == 1
    assert "--arms imagenet: compare needs two arms or more" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before the data step: nothing written


def test_an_arm_the_backbone_cannot_run_is_refused_before_any_work(tmp_path):
    """tiny_cnn has no ImageNet weights: compare's imagenet arm (and leave-one-site-out's) is refused when
    the experiment starts, naming the arm and the key, not after stage 1 and the first arms have trained."""
    from msbt.config import load_config

    config = load_config([], ["stage1.backbone=tiny_cnn", "stage1.weights=none", "stage2.backbone=tiny_cnn",
                              f"run.storage_path={tmp_path}", f"synth.out_dir={tmp_path / 'synth'}"])
    message = r"compare arm imagenet: `stage2.weights` imagenet: backbone tiny_cnn has none"
    with pytest.raises(ConfigError, match=message):
        X.compare(config, arms=("multistage", "imagenet", "scratch"), naive=False)
    with pytest.raises(ConfigError, match=message.replace("compare", "leave-one-site-out")):
        X.leave_one_site_out(config, arms=("multistage", "imagenet"))
    assert not list(tmp_path.iterdir())  # no data step ran, nothing was written


def test_workflow_scripts_pass_their_arguments_to_the_subcommand():
    import subprocess
    import sys

    from helpers import ROOT

    for name in ("crossval", "ablation", "compare"):
        done = subprocess.run([sys.executable, str(ROOT / "workflows" / f"{name}.py"), "--help"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and f"usage: msbt {name}" in done.stdout and "--fresh" in done.stdout


def split_rows(n_groups=12, per_group=2, folds=3):
    """split.csv-like rows: groups of frames, alternating labels, a test split and folds by group."""
    rows = []
    for g in range(n_groups):
        for f in range(per_group):
            rows.append({"relpath": f"{g}_{f}.png", "label": ("benign", "malignant")[g % 2], "group": f"g{g}",
                         "split": "test" if g in (0, 1) else "val" if g in (2, 3) else "train", "fold": g % folds})
    return rows


def test_fold_roles_hold_every_trainval_image_out_once_and_never_touch_test():
    rows, k = split_rows(), 3
    plans = [X.fold_roles(rows, i, k) for i in range(k)]
    test_split = {r["relpath"] for r in rows if r["split"] == "test"}
    held = [s for plan in plans for s, role in plan.items() if role == "test"]
    assert sorted(held) == sorted(r["relpath"] for r in rows if r["split"] != "test")  # once each
    assert all(not (test_split & set(plan)) for plan in plans)
    fold_of = {r["relpath"]: r["fold"] for r in rows}
    for i, plan in enumerate(plans):
        assert {fold_of[s] for s, role in plan.items() if role == "val"} == {(i + 1) % k}
        assert {fold_of[s] for s, role in plan.items() if role == "train"} == set(range(k)) - {i, (i + 1) % k}
        group_role = {}
        for r in rows:
            if r["relpath"] in plan:
                assert group_role.setdefault(r["group"], plan[r["relpath"]]) == plan[r["relpath"]]
    everything = X.fold_roles(rows, 0, k, scope="all")
    assert test_split <= set(everything) and len(everything) == len(rows)
    with pytest.raises(ValueError, match="at least 3 folds"):
        X.fold_roles(rows, 0, 2)
    with pytest.raises(ValueError, match="scope"):
        X.fold_roles(rows, 0, 3, scope="test")
    labels = {r["relpath"]: r["label"] for r in rows}
    one_class = {s: role for s, role in plans[0].items() if not (role == "val" and labels[s] == "benign")}
    with pytest.raises(ValueError, match="fold 0: its val part has no benign"):
        X._check_roles(one_class, labels, "fold 0")


def test_naive_roles_split_lesions_and_match_the_splits_own_naive_measure():
    from msbt.data.splits import SPLITS, assign_groups, leaked_images

    rows = split_rows(n_groups=20, per_group=3)
    roles = X.naive_roles(rows, (0.7, 0.2, 0.1), seed=0)
    bins = np.array([SPLITS.index(roles[r["relpath"]]) for r in rows])
    expected = assign_groups([r["label"] for r in rows], [r["relpath"] for r in rows], (0.7, 0.2, 0.1), 0)
    np.testing.assert_array_equal(bins, expected)  # the same procedure make_split calls "naive_random"
    leaks = leaked_images(bins, [r["group"] for r in rows])
    assert leaks["val"] + leaks["test"] > 0  # frames of one lesion land on both sides


def fake_result(sources, y, p, group, threshold=0.5):
    r = Evaluation(threshold=threshold)
    r.predictions = {"test": {"source": np.asarray(sources), "y": np.asarray(y), "p": np.asarray(p, float),
                              "group": np.asarray(group)}}
    return r


def test_paired_tests_align_arms_by_image_and_match_direct_calls():
    rng = np.random.default_rng(0)
    n = 40
    y = np.arange(n) % 2
    group = np.array([f"g{i // 2}" for i in range(n)])
    sources = np.array([f"{i:02d}.png" for i in range(n)])
    pa, pb = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1), rng.random(n)
    perm = rng.permutation(n)  # arm b's predictions come in another order
    results = {"a": fake_result(sources, y, pa, group), "b": fake_result(sources[perm], y[perm], pb[perm], group[perm])}
    (pair,) = X.paired_tests(results, n_boot=300, seed=1)
    assert (pair["a"], pair["b"]) == ("a", "b")
    order = np.argsort(sources)
    direct = metrics.delong_test(y[order], pa[order], pb[order])
    assert pair["delong"]["diff"] == pytest.approx(direct["diff"]) and pair["delong"]["p_value"] == pytest.approx(
        direct["p_value"])
    boot = metrics.paired_bootstrap_auc_diff(y[order], pa[order], pb[order], groups=group[order], n_boot=300, seed=1)
    assert pair["paired_bootstrap"]["ci"] == pytest.approx(list(boot["ci"]))
    other = {"a": results["a"], "c": fake_result(sources[:-1], y[:-1], pb[:-1], group[:-1])}
    with pytest.raises(ValueError, match="other test images"):
        X.paired_tests(other)
    tiny = {"a": fake_result(["x", "y", "z"], [0, 1, 1], [0.1, 0.8, 0.7], ["1", "2", "3"]),
            "b": fake_result(["x", "y", "z"], [0, 1, 1], [0.2, 0.6, 0.9], ["1", "2", "3"])}
    assert "at least 2" in X.paired_tests(tiny, n_boot=50)[0]["delong"]["error"]  # recorded, not raised


def test_leakage_breakdown_separates_images_whose_lesion_was_trained_on():
    rows = [{"relpath": s, "group": g} for s, g in [("a1", "A"), ("a2", "A"), ("b1", "B"), ("c1", "C"), ("c2", "C")]]
    roles = {"a1": "train", "a2": "test", "b1": "test", "c1": "val", "c2": "test"}
    result = fake_result(["a2", "b1", "c2"], [1, 0, 1], [0.9, 0.8, 0.7], ["A", "B", "C"])
    out = X.leakage_breakdown(result, roles, rows)
    # a2 (A in train) and c2 (C in val) leak; b1 is clean and wrongly called malignant at 0.5.
    assert (out["leaked_images"], out["clean_images"]) == (2, 1)
    assert (out["leaked_accuracy"], out["clean_accuracy"]) == (1.0, 0.0)
    assert np.isnan(out["leaked_auc"]) and np.isnan(out["clean_auc"])  # one class in each part


# ---------------------------------------------------------------------------------------------------
# Real tiny runs on Ray


@pytest.fixture(scope="module")
def tiny_data(tiny_stores):
    """The session's run folder with its split and stores. Every experiment opens the recorded split and
    stores: the data folder has been moved away, so none reads an image."""
    return tiny_stores.config, tiny_stores.data


@pytest.fixture(scope="module")
def tiny(tiny_run):
    """The same run with its stage 1, trained once (shared by every experiment)."""
    return tiny_run.config, tiny_run.data, tiny_run.stage1


@pytest.mark.ray
@pytest.mark.slow
def test_stage1_is_trained_once_and_then_reused(tiny, capsys):
    config, data, stage1 = tiny
    assert json.loads((data.run_dir / "experiments" / "stage1.json").read_text())["checkpoint"] == str(stage1)
    assert X.shared_stage1(data) == stage1
    assert "reusing" in capsys.readouterr().out
    other = dataclasses.replace(config, stage1=dataclasses.replace(config.stage1, learning_rate=0.5))
    from msbt.train.stages import usable_stage1  # the one stage-1 lookup (msbt.train.stages)

    assert usable_stage1(stage1, other) is None  # another stage-1 config is not reused


@pytest.mark.ray
@pytest.mark.slow
def test_crossval_three_folds_from_one_stage1(tiny):
    from msbt.model.checkpoint import lineage
    from msbt.data.store import read_store

    config, data, stage1 = tiny
    report = X.crossval(config, n_boot=200)
    out = data.run_dir / "crossval"
    assert report["folds"] == 3 and report["scope"] == "trainval" and len(report["rows"]) == 3
    assert json.loads((out / "crossval.json").read_text())["summary"].keys() == set(X.SUMMARY_KEYS)
    assert (out / "folds.csv").read_text().count("\n") == 4
    rows = X.read_split_rows(data.ultrasound_split)
    test_split = {r["relpath"] for r in rows if r["split"] == "test"}
    held_out = []
    for row in report["rows"]:
        fold_store = read_store(out / f"fold-{row['fold']}" / "store", columns=["source", "split"])
        assert not test_split & set(fold_store["source"])  # the test split takes no part
        held_out += list(fold_store["source"][fold_store["split"] == "test"])
        assert lineage(row["checkpoint"])[1]["path"] == str(stage1)  # every fold from the same stage 1
        assert f"/crossval/fold-{row['fold']}/stage2/" in row["checkpoint"]
    assert sorted(held_out) == sorted(r["relpath"] for r in rows if r["split"] != "test")
    mean, sd = report["summary"]["accuracy"]
    accs = [row["accuracy"] for row in report["rows"]]
    assert (mean, sd) == pytest.approx((np.mean(accs), np.std(accs, ddof=1)))
    # the out-of-fold threshold: chosen on every train+val image, each from the fold model that held it out
    from msbt.eval.evaluate import read_predictions
    from msbt.eval.metrics import choose_threshold

    oof = report["oof_threshold"]
    pooled_preds = [read_predictions(out / f"fold-{row['fold']}" / "predictions.csv")["test"]
                    for row in report["rows"]]
    assert oof["images"] == len(held_out) == sum(len(f["y"]) for f in pooled_preds)
    assert oof["threshold"] == pytest.approx(choose_threshold(np.concatenate([f["y"] for f in pooled_preds]),
                                                              np.concatenate([f["p"] for f in pooled_preds])))
    assert oof["fold_thresholds"] == [row["threshold"] for row in report["rows"]]
    assert "out-of-fold threshold" in X.format_crossval(report)
    # the number to quote: every held-out image once, at its own fold's threshold, intervals over lesions
    from msbt.eval.metrics import roc_auc

    pooled = report["pooled"]
    assert pooled["images"] == len(held_out) and pooled["scope"]["kind"] == "internal"
    assert pooled["auc"][0] == pytest.approx(roc_auc(np.concatenate([f["y"] for f in pooled_preds]),
                                                     np.concatenate([f["p"] for f in pooled_preds])))
    assert all(row["auc_low"] <= row["auc"] <= row["auc_high"] for row in report["rows"])
    assert "pooled out-of-fold" in X.format_crossval(report) and "internal estimate" in X.format_crossval(report)


@pytest.mark.ray
def test_naive_store_is_the_naive_split_of_the_same_images(tiny_data):
    """The wiring of compare's naive arm: the run's store, split column rewritten to the naive split."""
    from msbt.data.store import read_store, write_resplit

    config, data = tiny_data
    rows = X.read_split_rows(data.ultrasound_split)
    roles = X.naive_roles(rows, config.data.split, config.data.seed)
    store = write_resplit(data.ultrasound_store, roles, data.run_dir / "naive-store")
    naive = read_store(store, columns=["image", "source", "split", "group"])
    original = read_store(data.ultrasound_store, columns=["image", "source", "group"])
    assert sorted(naive["source"]) == sorted(original["source"])  # the same images ...
    assert dict(zip(naive["source"], naive["split"])) == roles  # ... on the naive split
    by_source = dict(zip(original["source"], original["image"]))
    assert all((by_source[s] == im).all() for s, im in zip(naive["source"], naive["image"]))
    assert dict(zip(naive["source"], naive["group"])) == dict(zip(original["source"], original["group"]))
    # the naive test images sharing a lesion with naive train/val are the split's own naive leakage count
    fake = fake_result(naive["source"][naive["split"] == "test"], np.zeros(int((naive["split"] == "test").sum())),
                       np.zeros(int((naive["split"] == "test").sum())), naive["group"][naive["split"] == "test"])
    leak = X.leakage_breakdown(fake, roles, rows)
    split = json.loads((data.ultrasound_split / "split.json").read_text())
    assert leak["leaked_images"] == split["leakage"]["naive_random"]["test"] > 0


@pytest.mark.ray
@pytest.mark.slow
def test_compare_pairs_arms_on_the_same_test_images(tiny):
    config, data, stage1 = tiny
    report = X.compare(config, arms=("multistage", "scratch"), naive=False, n_boot=200)
    saved = json.loads((data.run_dir / "compare" / "compare.json").read_text())
    assert set(saved["arms"]) == {"multistage", "scratch"} and "naive_vs_group" not in saved
    (pair,) = saved["paired"]
    assert (pair["a"], pair["b"]) == ("multistage", "scratch")
    for test in ("delong", "paired_bootstrap"):
        assert set(pair[test]) == {"auc_a", "auc_b", "diff", "se", "z", "p_value", "ci"}
        assert pair[test]["auc_a"] == pytest.approx(saved["arms"]["multistage"]["test"]["auc"])
        assert pair[test]["auc_b"] == pytest.approx(saved["arms"]["scratch"]["test"]["auc"])
    assert saved["arms"]["multistage"]["test_images"] == saved["arms"]["scratch"]["test_images"]
    assert "AUC multistage - scratch" in X.format_compare(report)
    # what the multistage arm's start learned from stands beside the table (here msbt's synthetic cells)
    origin = saved["stage1_origin"]
    assert origin["checkpoint"] == str(stage1) and origin["synthetic"] is True and len(origin["classes"]) == 4
    assert origin["fields"] == json.loads((data.run_dir / "data" / "microscope" / "split.json").read_text())["images"]
    assert "synthetic microscope fields, not real cells" in X.format_compare(report)
    with pytest.raises(ValueError, match="needs the multistage arm"):
        X.compare(config, arms=("scratch",), naive=True)


@pytest.mark.ray
@pytest.mark.slow
def test_ablation_row_uses_its_overlay_and_the_shared_stage1(tiny, capsys):
    from msbt.model.checkpoint import read_manifest

    config, data, stage1 = tiny
    report = X.ablation(config, rows=("augmentation_l2",), n_boot=100)
    (row,) = report["rows"]
    manifest = read_manifest(row["checkpoint"])
    assert manifest["config"]["augment"]["enabled"] is True and manifest["config"]["head"]["l2"] == 1e-4
    assert manifest["config"]["head"]["dropout"] == 0.0 and manifest["parent"]["path"] == str(stage1)
    assert len(row["accuracy"]) == 3 and row["accuracy"][1] <= row["accuracy"][0] <= row["accuracy"][2]
    printed = capsys.readouterr().out
    assert "Augmentation + L2 regularization" in printed and "0.92" in printed
    # what the numbers were measured on, with its size (it said "the held-out test split", leave one site out's words)
    assert (f"ours on the run's own test split: {row['test_images']} images of {row['test_groups']} lesion groups, an "
            "internal estimate") in printed and "held-out" not in printed
    # A rerun reuses the finished row instead of training again.
    again = X.ablation(config, rows=("augmentation_l2",), n_boot=100)
    assert again["rows"][0]["checkpoint"] == row["checkpoint"]
    assert "reusing" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown ablation rows"):
        X.ablation(config, rows=("dropout_only",))
