"""Multi-site data (msbt.data.sites, site-aware splits, the built-in multi-site set, the input profile).

Tiny generated data only: three built-in sites at 48 px; no Ray, no TensorFlow.
"""

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from msbt.config import ConfigError, load_config
from msbt.data.discovery import DataError
from msbt.data.profile import build_profile, check_inputs, image_features, out_of_range
from msbt.data.sites import Site, discover_sites, parse_sources
from msbt.data.sitesynth import generate_sites
from msbt.data.splits import load_fingerprints, make_split, save_fingerprints, save_split

CLASSES = ("benign", "malignant")


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("sites") / "built-in"
    summary = generate_sites(out, sites=3, seed=0, lesions_per_class=6, frames_per_lesion=(1, 3), size=48)
    return summary["sites"]


def test_parse_sources_names_sites_and_refuses_bad_names(tmp_path):
    assert parse_sources("/data/busi-256") == [Site("busi-256", "/data/busi-256")]
    assert parse_sources(["a=/x/one", "/y/list.csv"]) == [Site("a", "/x/one"), Site("list", "/y/list.csv")]
    with pytest.raises(DataError, match="two sources named 'one'"):
        parse_sources(["/x/one", "/y/one"])
    with pytest.raises(DataError, match="site name"):
        parse_sources(["bad name=/x"])


def test_config_takes_one_source_or_a_list_of_sites(tmp_path):
    path = tmp_path / "sites.yaml"
    path.write_text("data:\n  ultrasound: [busi=/d/busi, breast=/d/breast]\n")
    assert load_config([path]).data.ultrasound == ("busi=/d/busi", "breast=/d/breast")
    assert load_config([], ["data.ultrasound=/d/busi"]).data.ultrasound == "/d/busi"
    with pytest.raises(ConfigError, match="data.ultrasound"):
        load_config([], ["data.ultrasound=3"])


def test_the_preflight_check_takes_a_list_of_sites_and_names_a_missing_one(three_sites, tmp_path):
    """A fresh run with several named sites passes the before-Ray check (it once failed with a TypeError
    on the list); a site whose folder is missing is named."""
    from msbt.data.prepare import check_data

    sites = [f"{k}={v}" for k, v in three_sites.items()]
    config = load_config([], [f"data.ultrasound=[{', '.join(sites)}]", f"run.storage_path={tmp_path}"])
    check_data(config, ["ultrasound"])
    missing = tmp_path / "nowhere"
    config = load_config([], [f"data.ultrasound=[{sites[0]}, gone={missing}]", f"run.storage_path={tmp_path}"])
    with pytest.raises(DataError, match=f"{missing}: data folder or manifest does not exist"):
        check_data(config, ["ultrasound"])


def test_built_in_sites_differ_in_framing_and_every_record_carries_its_site(three_sites):
    sizes = {name: cv2.imread(str(next((__import__("pathlib").Path(p) / "benign").iterdir()))).shape[:2]
             for name, p in three_sites.items()}
    assert sizes == {"site-a": (48, 48), "site-b": (48, 64), "site-c": (32, 32)}  # frame, wide, crop
    d = discover_sites([f"{k}={v}" for k, v in three_sites.items()], CLASSES)
    assert {r.site for r in d.records} == set(three_sites) and d.sites == three_sites
    assert all(r.relpath.startswith(f"{r.site}/") for r in d.records)
    assert len(d.hashes) == len(d.thumbs) == len(d.records)


def test_one_source_keeps_relpaths_and_fingerprint_of_a_plain_scan(three_sites):
    from msbt.data.discovery import discover

    plain = discover(three_sites["site-a"], CLASSES)
    one = discover_sites(three_sites["site-a"], CLASSES)
    assert [r.relpath for r in one.records] == [r.relpath for r in plain.records]
    assert one.fingerprint() == plain.fingerprint() and {r.site for r in one.records} == {"site-a"}


def test_split_never_puts_a_group_across_sites_and_stratifies_by_site(three_sites, tmp_path):
    d = discover_sites([f"{k}={v}" for k, v in three_sites.items()], CLASSES)
    result = make_split(d, ratios=(0.6, 0.2, 0.2), folds=3, seed=1)
    site_of_group = {}
    for row in result.table:
        assert site_of_group.setdefault(row["group"], row["site"]) == row["site"]
    for site, per in result.summary["sites"].items():
        for split in ("train", "val", "test"):  # every site has both classes in every split
            assert set(per[split]) == set(CLASSES), (site, split, per)
    assert "cross_site_duplicates" in result.summary
    save_split(result, tmp_path)
    with (tmp_path / "split.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0].keys() >= {"relpath", "site"} and {r["site"] for r in rows} == set(three_sites)
    assert json.loads((tmp_path / "split.json").read_text())["sites"] == result.summary["sites"]


def test_an_image_copied_to_another_site_is_reported_not_merged(three_sites, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(three_sites["site-b"], copy)
    first = sorted((copy / "benign").iterdir())[0]
    shutil.copy(next((__import__("pathlib").Path(three_sites["site-a"]) / "benign").iterdir()), first)
    d = discover_sites([f"a={three_sites['site-a']}", f"b={copy}"], CLASSES)
    result = make_split(d, folds=3)
    cross = result.summary["cross_site_duplicates"]
    assert cross["pairs"] >= 1 and any(pair[1] == f"b/benign/{first.name}" for pair in cross["examples"])
    groups = {row["relpath"]: row["group"] for row in result.table}
    assert groups[f"b/benign/{first.name}"].startswith("b:")  # its group stays inside its own site


def test_fingerprints_round_trip(three_sites, tmp_path):
    d = discover_sites(three_sites["site-a"], CLASSES)
    save_fingerprints(d, tmp_path)
    saved = load_fingerprints(tmp_path)
    assert saved["relpath"].tolist() == [r.relpath for r in d.records]
    np.testing.assert_array_equal(saved["hashes"], d.hashes)
    assert load_fingerprints(tmp_path / "none") is None


def test_profile_flags_inputs_unlike_the_training_images():
    rng = np.random.default_rng(0)
    train = [image_features(256, 256, rng.integers(40, 200, (32, 32, 3)).astype(np.uint8)) for _ in range(50)]
    profile = build_profile(train)
    same = image_features(256, 256, rng.integers(40, 200, (32, 32, 3)).astype(np.uint8))
    assert out_of_range(profile, same) == []
    crop = image_features(90, 70, rng.integers(40, 200, (32, 32, 3)).astype(np.uint8))
    assert set(out_of_range(profile, crop)) >= {"long_side", "aspect"}
    warnings = check_inputs(profile, [crop] * 5 + [same] * 5)
    assert any("long_side" in w and "5 of 10" in w for w in warnings)
    assert check_inputs(profile, [same] * 20 + [crop]) == []  # 1 of 21 is under the 10% rule


def test_metrics_and_predictions_name_the_site(tmp_path):
    from msbt.eval import evaluate as E

    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 20)
    test = {"y": y, "p": np.clip(y * 0.4 + rng.uniform(0, 0.6, 40), 0, 1), "group": np.array([f"g{i}" for i in range(40)]),
            "source": np.array([f"{i}.png" for i in range(40)]), "site": np.array(["a"] * 20 + ["b"] * 20)}
    val = {"y": y, "p": test["p"][::-1].copy(), "group": test["group"]}
    r = E.score(val, test, n_boot=100)
    assert set(r["sites"]) == {"a", "b"} and r["sites"]["a"]["images"] == 20
    assert len(r["sites"]["b"]["auc"]) == 3 and len(r["threshold_ci95"]) == 3
    E.write_predictions({"test": test}, tmp_path / "predictions.csv")
    back = E.read_predictions(tmp_path / "predictions.csv")
    assert back["test"]["site"].tolist() == test["site"].tolist()


def test_a_small_site_gets_wilson_intervals_and_a_note_where_its_bootstrap_collapses():
    """A site of 8 lesions with one malignant: about a third of the resamples hold no malignant case and the
    rest agree, so the bootstrap gives a point for an interval; the Wilson interval over its groups and the
    notes say what the pooled split's would (msbt.eval.evaluate.score does the same for the whole split)."""
    from msbt.eval import evaluate as E
    from msbt.eval.report import metrics_section

    y = np.array([0, 1] * 30 + [1] + [0] * 7)
    p = np.where(y == 1, 0.9, 0.1)
    test = {"y": y, "p": p, "group": np.array([f"g{i}" for i in range(68)]),
            "site": np.array(["a"] * 60 + ["b"] * 8)}
    r = E.score(test, test, n_boot=1000)
    b = r["sites"]["b"]
    assert b["sensitivity"] == [1.0, 1.0, 1.0]  # what the bootstrap alone said
    value, low, high = b["wilson_groups"]["sensitivity"]
    assert value == 1.0 and high == 1.0 and low == pytest.approx(0.2065, abs=1e-3)  # 1 of 1 malignant lesion
    assert any("undefined in" in n and "of 1000" in n for n in b["notes"])  # the resamples left out are counted
    assert any("only 8 lesion groups in site b" in n for n in b["notes"])
    assert not any("lesion groups" in n for n in r["sites"]["a"]["notes"])  # 60 groups: no note
    html = metrics_section(r)
    assert "site b: only 8 lesion groups" in html and "Wilson 95% over lesion groups" in html


def test_one_source_named_twice_a_file_of_two_sites_and_labels_that_disagree_across_sites(three_sites, tmp_path):
    """Each site's scan sees only its own files, so what two sites disagree about was let through: the same
    folder as two sites (every image used twice), one file listed by two sites' manifests, and one image with
    opposite labels at two sites (trained under both labels)."""
    import shutil

    a = Path(three_sites["site-a"])
    with pytest.raises(DataError, match="sites 'x' and 'y' are the same source"):
        parse_sources([f"x={a}", f"y={a}/"])
    files = sorted((a / "benign").glob("*.png"))[:3]
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    one.write_text("path,label\n" + "".join(f"{p},benign\n" for p in files) + f"{sorted((a / 'malignant').glob('*.png'))[0]},malignant\n")
    two.write_text("path,label\n" + f"{files[0]},benign\n" + f"{sorted((a / 'malignant').glob('*.png'))[1]},malignant\n")
    with pytest.raises(DataError, match=f"{files[0]} is listed by two sites, 'one' and 'two'"):
        discover_sites([str(one), str(two)], CLASSES)
    # the same content (a copy) labelled benign at one site and malignant at another
    other = tmp_path / "other"
    shutil.copytree(three_sites["site-b"], other)
    shutil.copy(files[0], other / "malignant" / "copy.png")
    with pytest.raises(DataError, match="same file content under two classes"):
        discover_sites([f"a={a}", f"b={other}"], CLASSES, on_conflict="error")
    d = discover_sites([f"a={a}", f"b={other}"], CLASSES)  # on_conflict: reject (the default): neither copy used
    used = {r.relpath for r in d.records}
    assert f"a/benign/{files[0].name}" not in used and "b/malignant/copy.png" not in used
    assert len(d.records) == len(d.hashes) == len(d.thumbs)
    assert {r.reason.split(":")[0] for r in d.rejects if "contradictory labels" in r.reason} == {"site 'a'", "site 'b'"}


def test_a_class_that_differs_from_a_kept_one_only_in_case_is_refused_not_left_out(three_sites, tmp_path):
    import shutil

    from msbt.data.discovery import check_source, discover

    data = tmp_path / "data"
    shutil.copytree(three_sites["site-a"], data)
    (data / "Malignant").mkdir()
    shutil.copy(next((data / "malignant").glob("*.png")), data / "Malignant" / "x.png")
    for check in (check_source, discover):  # before Ray starts, and in the scan itself
        with pytest.raises(DataError, match="class 'Malignant' differs from class 'malignant' only in case"):
            check(data, CLASSES)
    rows = [f"{p},{'benign' if p.parent.name == 'benign' else 'malignant'}" for p in sorted(data.glob("[bm]*/*.png"))]
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\n" + "\n".join(rows + [f"{data / 'Malignant' / 'x.png'},BENIGN "]) + "\n")
    with pytest.raises(DataError, match="class 'BENIGN' differs from class 'benign'"):
        check_source(manifest, CLASSES)


def test_a_manifests_patients_join_groups_under_auto_grouping_and_skips_are_reported(three_sites, tmp_path):
    """Two images of one patient need not look alike: under the default grouping the manifest's group column
    joins them as well as near-duplicate links, and what the scan left out on purpose reaches split.json."""
    from msbt.data.discovery import discover

    a = Path(three_sites["site-a"])
    files = sorted(a.glob("*/*.png"))
    rows = [f"{p},{p.parent.name},patient{i // 2}" for i, p in enumerate(files)] + [f"{files[0]},normal,"]
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label,group\n" + "\n".join(rows) + "\n")
    d = discover(manifest, CLASSES)
    for seed in range(5):
        result = make_split(d, seed=seed)
        split_of = {}
        for row, record in zip(result.table, d.records):
            split_of.setdefault(record.group, set()).add(row["split"])
        assert all(len(v) == 1 for v in split_of.values())  # no patient straddles the split
        assert result.summary["groups"]["manifest_joined"] > 0
    assert result.summary["skipped"] == {"class 'normal' not selected": 1}
    # split.csv names each row's patient as the manifest gave it (beside msbt's own group id), so that a user can
    # check their patients against it without joining tables
    save_split(result, tmp_path / "split")
    with (tmp_path / "split" / "split.csv").open(newline="") as handle:
        saved = list(csv.DictReader(handle))
    assert [r["manifest_group"] for r in saved] == [f"patient{i // 2}" for i in range(len(files))]
    split_of_patient = {}
    for r in saved:
        split_of_patient.setdefault(r["manifest_group"], set()).add(r["split"])
        assert r["group"].startswith("g")  # msbt's id, which may join several patients' near-duplicates
    assert all(len(v) == 1 for v in split_of_patient.values())


def test_grouping_manifest_follows_the_ultrasound_manifest_and_leaves_the_built_in_cells_alone(three_sites, tmp_path):
    """data.grouping: manifest once stopped every run at the microscope step (the built-in cell images are a
    folder, with no group column), after Ray had started; a site that is a folder is now named before Ray."""
    from helpers import ROOT
    from msbt.data.prepare import check_data, prepare_data

    a = Path(three_sites["site-a"])
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label,group\n" + "".join(f"{p},{p.parent.name},patient{i // 2}\n"
                                                       for i, p in enumerate(sorted(a.glob("*/*.png")))))
    smoke = [str(ROOT / "workflows" / "configs" / "smoke.yaml")]
    common = ["data.grouping=manifest", f"run.storage_path={tmp_path}", f"synth.out_dir={tmp_path / 'synth'}"]
    config = load_config(smoke, [f"data.ultrasound={manifest}", *common])
    check_data(config)
    prepared = prepare_data(config)
    assert prepared["microscope"].split.summary["grouping"] == "auto"
    assert prepared["ultrasound"].split.summary["grouping"] == "manifest"
    folder = load_config(smoke, [f"data.ultrasound=[list={manifest}, b={three_sites['site-b']}]", *common])
    with pytest.raises(DataError, match="data.grouping: manifest needs a CSV manifest with a group column; this is"):
        check_data(folder, ["ultrasound"])
    # the built-in ultrasound data (a folder) too: said before Ray, not after it and the microscope scan
    built_in = load_config(smoke, common)
    with pytest.raises(ConfigError, match=r"needs data.ultrasound to be a CSV manifest .* built-in ultrasound"):
        check_data(built_in, ["microscope", "ultrasound"])
    check_data(built_in, ["microscope"])  # stage 1 alone needs no ultrasound data


def test_a_collection_one_folder_too_high_is_named_before_ray(tmp_path):
    """`ROOT/cells/{HeLa,...}` given as ROOT was one class 'cells', refused only by the Ray Train worker (`need at
    least 2 classes, got 1`, after Ray's start, the store and TensorFlow's)."""
    from msbt.data.prepare import check_data

    for line in ("HeLa", "MCF-7"):
        (tmp_path / "root" / "cells" / line).mkdir(parents=True)
    config = load_config([], [f"data.microscope={tmp_path / 'root'}", f"run.storage_path={tmp_path}"])
    with pytest.raises(DataError, match=r"root: 1 class folder \('cells'\); training needs at least 2; .*cells holds "
                                        r"the folders HeLa, MCF-7: if those are the classes, give that folder"):
        check_data(config, ["microscope"])


def test_a_split_made_before_manifest_groups_counted_under_auto_says_so_when_reused(three_sites, tmp_path, caplog):
    import logging

    from msbt.data.prepare import prepare_data

    a = Path(three_sites["site-a"])
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label,group\n" + "".join(f"{p},{p.parent.name},patient{i // 2}\n"
                                                       for i, p in enumerate(sorted(a.glob("*/*.png")))))
    config = load_config([], [f"data.ultrasound={manifest}", f"run.storage_path={tmp_path}", "run.name=old"])
    folder = prepare_data(config, modalities=("ultrasound",))["ultrasound"].folder
    summary = json.loads((folder / "split.json").read_text())
    del summary["groups"]["manifest_joined"]  # as a split saved before 2026-12-07 reads
    (folder / "split.json").write_text(json.dumps(summary))
    with caplog.at_level(logging.WARNING, logger="msbt.data.prepare"):
        prepare_data(config, modalities=("ultrasound",))
    assert "made before msbt joined a manifest's group column" in caplog.text


def test_a_file_used_in_part_is_said_when_several_sites_are_scanned_together(three_sites, tmp_path):
    """data.on_partial: warn uses a multi-page TIFF's first page and says so; a scan of several sites dropped what
    each site's scan had said, so such files were used without a word."""
    import shutil

    from PIL import Image

    sites = {name: tmp_path / name for name in ("site-a", "site-b")}
    for name, folder in sites.items():
        shutil.copytree(three_sites[name], folder)
    first = sorted(sites["site-b"].glob("benign/*.png"))[0]
    pages = [Image.open(first).convert("L"), Image.open(first).convert("L").rotate(90)]
    pages[0].save(sites["site-b"] / "benign" / "stack.tif", "TIFF", save_all=True, append_images=pages[1:])
    d = discover_sites([f"{name}={folder}" for name, folder in sites.items()], CLASSES, on_partial="warn")
    assert [(Path(w.path).name, w.reason) for w in d.warnings] == [
        ("stack.tif", "TIFF with 2 pages/frames: only the first would be used")]
    assert any(r.relpath == "site-b/benign/stack.tif" for r in d.records)  # used, and said
    refused = discover_sites([f"{name}={folder}" for name, folder in sites.items()], CLASSES)
    assert not refused.warnings and "stack.tif" in {Path(r.path).name for r in refused.rejects}


def test_each_sites_scan_is_named_on_its_progress_line(three_sites, capfd):
    """Scans of several sites (a multi-site run, `msbt external` of several) printed one "scan" line each."""
    discover_sites([f"{name}={path}" for name, path in sorted(three_sites.items())[:2]], CLASSES)
    printed = "".join(capfd.readouterr())
    assert "scan site-a: " in printed and "scan site-b: " in printed
