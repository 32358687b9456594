"""Preprocessing on a real local Ray cluster: counts, labels, field-level split, rejects, reruns.

The tests run Ray Data (`preprocess.build: ray`) unless they name the driver-thread path, which must write the
rows Ray Data writes.
"""

import collections
import dataclasses
import json

import cv2
import numpy as np
import pytest

from msbt.data import synth
from msbt.config import PreprocessConfig
from msbt.data.discovery import discover
from msbt.images.imagefile import fit_square
from msbt.images.patches import field_to_patches
from msbt.data.preprocess import (
    build_microscope_store,
    build_ultrasound_store,
    patch_params,
    split_items,
    write_contact_sheets,
)
from msbt.data.store import Store, StoreError, read_store
from msbt.data.splits import make_split, save_split

pytestmark = pytest.mark.ray

CFG = PreprocessConfig(max_patches_per_field=6, files_per_chunk=4, on_existing="resume", build="ray")


@pytest.fixture(scope="module")
def built_in(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, seed=3, fields_per_line=3, field_size=400, lesions_per_class=4,
                   frames_per_lesion=(1, 2), ultrasound_size=96)
    return out


def prepared(root, tmp_path, grouping="auto"):
    d = discover(root)
    save_split(make_split(d, grouping=grouping, seed=0), tmp_path / "split")
    return d, split_items(tmp_path / "split", d.root, d.classes, seed=0)


def test_patch_store_matches_the_pure_function_field_by_field(ray_local, built_in, tmp_path):
    d, items = prepared(built_in / "microscope", tmp_path)
    summary = build_microscope_store(items, tmp_path / "store", CFG)
    store = read_store(tmp_path / "store")
    # every field's patches are exactly what the pure function gives for it
    expected = {}
    for item in items:
        rgb = cv2.cvtColor(cv2.imread(item["path"]), cv2.COLOR_BGR2RGB)
        patches, boxes, _ = field_to_patches(rgb, seed=item["seed"], **patch_params(CFG))
        expected[item["source"]] = (len(patches), sorted(map(tuple, boxes.tolist())))
    got = collections.defaultdict(list)
    for source, box in zip(store["source"], store["box"]):
        got[source].append(tuple(box.tolist()))
    assert {s: (len(b), sorted(b)) for s, b in got.items()} == {s: e for s, e in expected.items() if e[0]}
    assert store["image"].shape[1:] == (200, 200, 3) and store["image"].dtype == np.uint8
    assert sum(sum(v.values()) for v in summary.rows.values()) == len(store["source"])
    # labels and label indices agree with the folder each field came from
    for source, label, index in zip(store["source"], store["label"], store["label_index"]):
        assert source.split("/")[0] == label == d.classes[index]


def test_patches_of_one_field_never_straddle_splits(ray_local, built_in, tmp_path):
    _, items = prepared(built_in / "microscope", tmp_path)
    build_microscope_store(items, tmp_path / "store", CFG)
    store = read_store(tmp_path / "store", columns=["source", "split"])
    splits_of = collections.defaultdict(set)
    for source, split in zip(store["source"], store["split"]):
        splits_of[source].add(split)
    assert all(len(s) == 1 for s in splits_of.values())
    assert {i["source"]: i["split"] for i in items if i["source"] in splits_of} == \
        {s: next(iter(v)) for s, v in splits_of.items()}
    assert set().union(*splits_of.values()) == {"train", "val", "test"}


@pytest.mark.parametrize("kind", ["microscope", "ultrasound"])
def test_driver_threads_write_the_rows_ray_data_writes(ray_local, built_in, tmp_path, kind):
    """`preprocess.build: local` (what `auto` picks for a small collection): the same store, row for row."""
    import pyarrow.parquet as pq

    from msbt.data.store import Store

    _, items = prepared(built_in / kind, tmp_path)
    build = build_microscope_store if kind == "microscope" else build_ultrasound_store
    cfg = dataclasses.replace(CFG, image_size=64, files_per_task=3)  # several chunks, several parts per chunk
    summaries = {where: build(items, tmp_path / where, dataclasses.replace(cfg, build=where))
                 for where in ("ray", "local")}
    assert summaries["ray"].where == "ray" and summaries["local"].where == "local"
    assert summaries["ray"].rows == summaries["local"].rows and summaries["ray"].files == summaries["local"].files
    assert summaries["ray"].empty_sources == summaries["local"].empty_sources
    stores = {where: Store.open(tmp_path / where) for where in summaries}
    assert stores["ray"].identity == stores["local"].identity  # either store is reused for the other
    columns = ["source", "box" if kind == "microscope" else "group", "label", "label_index", "split", "image"]

    def rows(store):
        table = store.read()
        return sorted(zip(*[[bytes(v) if c == "image" else str(v) for v in table[c]] for c in columns]))

    assert rows(stores["ray"]) == rows(stores["local"]) and len(rows(stores["local"])) > len(items) // 2
    schemas = {w: pq.read_schema(s.files()[0]).remove_metadata() for w, s in stores.items()}
    assert schemas["ray"] == schemas["local"]
    assert len(stores["local"].files()) > len(list((tmp_path / "local").glob("chunk-*")))


def test_a_store_of_a_small_collection_is_written_in_driver_threads_under_auto(ray_local, built_in, tmp_path):
    """`preprocess.build: auto`: below build_ray_min_files files the store is written on the driver, from that
    many on with Ray Data (the same rows either way: the test above), and the summary says which."""
    _, items = prepared(built_in / "ultrasound", tmp_path)
    cfg = PreprocessConfig(image_size=32)
    assert cfg.build == "auto" and len(items) < cfg.build_ray_min_files
    small = build_ultrasound_store(items, tmp_path / "small", cfg)
    large = build_ultrasound_store(items, tmp_path / "large", dataclasses.replace(cfg, build_ray_min_files=len(items)))
    assert (small.where, large.where) == ("local", "ray")
    assert json.loads((tmp_path / "small" / "summary.json").read_text())["where"] == "local"


@pytest.mark.parametrize("where", ["ray", "local"])
def test_a_field_that_breaks_after_discovery_is_skipped_not_fatal(ray_local, built_in, tmp_path, where):
    root = tmp_path / "data"
    for line in synth.CELL_LINES[:2]:
        (root / line).mkdir(parents=True)
        # Three fields per line: with two, the 7:2:1 split leaves test empty, which is now an error.
        for f in sorted((built_in / "microscope" / line).iterdir())[:3]:
            (root / line / f.name).write_bytes(f.read_bytes())
    _, items = prepared(root, tmp_path)
    broken = items[0]["path"]
    with open(broken, "r+b") as handle:  # the file is damaged between the scan and the preprocessing
        handle.truncate(200)
    summary = build_microscope_store(items, tmp_path / "store", dataclasses.replace(CFG, build=where))
    assert items[0]["source"] in summary.empty_sources
    assert len(set(read_store(tmp_path / "store", columns=["source"])["source"])) == len(items) - 1


@pytest.mark.parametrize("where", ["ray", "local"])
def test_rerun_resumes_reuses_or_refuses_never_mixes(ray_local, built_in, tmp_path, where, capfd):
    _, items = prepared(built_in / "microscope", tmp_path)
    out = tmp_path / "store"
    cfg = dataclasses.replace(CFG, build=where)
    first = build_microscope_store(items, out, cfg)
    assert first.where == where
    # a complete store is reused whole, with no progress bar of a store being written (off a terminal: its line)
    capfd.readouterr()
    again = build_microscope_store(items, out, cfg)
    assert again.reused and again.rows == first.rows
    assert "microscope store:" not in "".join(capfd.readouterr())
    rows = len(read_store(out, columns=["source"])["source"])
    # an interrupted run: the last chunk never finished
    last = sorted(out.glob("chunk-*"))[-1]
    (last / "_DONE.json").unlink()
    # resumed the other way: the unfinished chunk redone whole, the store says both ways wrote it
    other_way = "local" if where == "ray" else "ray"
    resumed = build_microscope_store(items, out, dataclasses.replace(CFG, build=other_way))
    assert resumed.reused_chunks == len(list(out.glob("chunk-*"))) - 1
    assert len(read_store(out, columns=["source"])["source"]) == rows
    assert resumed.rows == first.rows and resumed.where == "local+ray"
    assert json.loads((out / "summary.json").read_text())["where"] == "local+ray"
    # other settings into the same store: refused, then overwritten on request
    other = dataclasses.replace(CFG, max_patches_per_field=2)
    with pytest.raises(StoreError, match="other settings"):
        build_microscope_store(items, out, other)
    with pytest.raises(StoreError, match="already exists"):
        build_microscope_store(items, out, dataclasses.replace(CFG, on_existing="refuse"))
    rebuilt = build_microscope_store(items, out, dataclasses.replace(other, on_existing="overwrite"))
    assert sum(sum(v.values()) for v in rebuilt.rows.values()) <= 2 * len(items)
    assert json.loads((out / "store.json").read_text())["settings"]["params"]["max_patches"] == 2


def test_a_store_that_lost_files_is_refused_by_readers_and_its_chunks_written_again(built_in, tmp_path):
    """A Parquet file deleted, truncated, or a chunk folder lost in a copy of the run, after the store was written:
    the store had looked complete, and training and scoring used whatever rows were left, silently."""
    import shutil

    import pyarrow.parquet as pq

    from msbt.data.store import Store

    _, items = prepared(built_in / "microscope", tmp_path)
    out = tmp_path / "store"
    cfg = dataclasses.replace(CFG, build="local")
    first = build_microscope_store(items, out, cfg)
    rows = len(read_store(out, columns=["source"])["source"])
    chunks = sorted(out.glob("chunk-*"))
    assert len(chunks) >= 3 and Store.open(out).is_complete() and Store.open(out).damage(rows=True) == []
    lost = sorted(chunks[1].glob("*.parquet"))[0]
    lost_rows = pq.read_metadata(lost).num_rows
    lost.unlink()
    gone = json.loads((chunks[2] / "_DONE.json").read_text())["files"]
    shutil.rmtree(chunks[2])
    truncated = sorted(chunks[0].glob("*.parquet"))[0]
    truncated.write_bytes(truncated.read_bytes()[:100])
    store = Store.open(out)
    assert not store.is_complete()
    assert store.damage() == [f"{chunks[1].name}/{lost.name} is missing",
                              f"its chunks hold {len(items) - gone} of the {len(items)} source files summary.json "
                              "counts (a chunk folder missing, or unfinished)"]  # existence only: no footer read
    assert f"{chunks[0].name}/{truncated.name} is unreadable" in store.damage(rows=True)[0]
    with pytest.raises(StoreError, match=f"not as it was written: {chunks[1].name}/{lost.name} is missing.*next step"):
        read_store(out, columns=["source"])
    # the data step again, same settings: only the three damaged chunks are written, every row is back
    again = build_microscope_store(items, out, cfg)
    assert again.reused_chunks == len(chunks) - 3
    assert again.rows == first.rows and len(read_store(out, columns=["source"])["source"]) == rows
    assert Store.open(out).is_complete()
    # a store written before chunks listed their files, that lost one: its rows do not add up; all its chunks redone
    for chunk in chunks:
        done = json.loads((chunk / "_DONE.json").read_text())
        (chunk / "_DONE.json").write_text(json.dumps({k: v for k, v in done.items() if k != "parquet"}))
    assert Store.open(out).is_complete()
    lost.unlink()
    store = Store.open(out)
    assert store.damage() == [] and not store.is_complete()
    assert store.damage(rows=True)[0].startswith(f"its Parquet files hold {rows - lost_rows} rows, ")
    legacy = build_microscope_store(items, out, cfg)
    assert legacy.reused_chunks == 0 and legacy.rows == first.rows and Store.open(out).is_complete()


def test_a_full_disk_under_ray_data_names_the_chunk_folder(ray_local, built_in, tmp_path):
    """A Ray Data task that could not write its Parquet file ended the command with Ray's task header and pyarrow's
    "[Errno 28] Error writing bytes to file", naming no folder; then the store is written whole on a rerun."""
    import errno
    import re

    from helpers import leave_free, tiny_tmpfs

    _, items = prepared(built_in / "microscope", tmp_path)
    cfg = dataclasses.replace(CFG, build="ray")
    with tiny_tmpfs(tmp_path / "disk", size="8m") as disk:
        filler = leave_free(disk, 8 * 1024)  # room for store.json, not for all the chunks' rows
        with pytest.raises(OSError) as info:
            build_microscope_store(items, disk / "store", cfg)
        assert info.value.errno == errno.ENOSPC
        assert re.fullmatch(rf"\[Errno 28\] No space left on device: '{re.escape(str(disk))}/store/chunk-\d{{5}}'",
                            str(info.value)), str(info.value)
        filler.unlink()
        again = build_microscope_store(items, disk / "store", cfg)  # finishes what the full disk stopped
        whole = build_microscope_store(items, tmp_path / "whole", dataclasses.replace(CFG, build="local"))
        assert again.rows == whole.rows


def test_ultrasound_store_is_model_ready(ray_local, built_in, tmp_path):
    d, items = prepared(built_in / "ultrasound", tmp_path)
    cfg = dataclasses.replace(CFG, image_size=64)
    summary = build_ultrasound_store(items, tmp_path / "store", cfg)
    store = read_store(tmp_path / "store")
    assert store["image"].shape == (len(items), 64, 64, 3)
    assert summary.empty_sources == []
    first = sorted(items, key=lambda i: i["source"])[0]
    row = list(store["source"]).index(first["source"])
    expected = fit_square(cv2.cvtColor(cv2.imread(first["path"]), cv2.COLOR_BGR2RGB), 64, "pad")
    assert np.array_equal(store["image"][row], expected)
    # groups travel with the images, so later steps can resample by group
    assert set(store["group"]) == {i["group"] for i in items}


def test_contact_sheets_are_written(ray_local, built_in, tmp_path):
    d, items = prepared(built_in / "microscope", tmp_path)
    build_microscope_store(items, tmp_path / "store", CFG)
    paths = write_contact_sheets(tmp_path / "store", items, d.classes, patch_params(CFG), per_class=3)
    for path in paths:
        sheet = cv2.imread(str(path))
        assert sheet is not None and sheet.shape[0] > 100 and sheet.std() > 5


def test_a_class_whose_fields_give_no_patches_is_named_and_stops_its_stage(ray_local, built_in, tmp_path):
    """Fields where no cell is found (blank, or confluent past the automatic threshold) left a class with no
    patches: stage 1 then trained a 3-class model with one class never seen, and said nothing."""
    from msbt.config import load_config
    from msbt.data.prepare import summarize_stores
    from msbt.train.runner import train_stage

    root = tmp_path / "data"
    for line in synth.CELL_LINES[:3]:
        (root / line).mkdir(parents=True)
        for i, f in enumerate(sorted((built_in / "microscope" / line).iterdir())[:3]):
            if line == synth.CELL_LINES[2]:  # noise only: no cell to find
                noise = np.random.default_rng(i).normal(128, 4, (400, 400)).clip(0, 255).astype(np.uint8)
                cv2.imwrite(str(root / line / f.name), noise)
            else:
                (root / line / f.name).write_bytes(f.read_bytes())
    _, items = prepared(root, tmp_path)
    summary = build_microscope_store(items, tmp_path / "store", dataclasses.replace(CFG, build="local"))
    blank = synth.CELL_LINES[2]
    assert Store.open(summary.path).classes_without_rows("train") == [blank]
    assert f"warning: no patches of train {blank}; val {blank}; test {blank}" in summarize_stores({"microscope": summary})
    config = load_config([], [f"run.storage_path={tmp_path}", "run.name=blank"])
    with pytest.raises(ValueError, match=rf"class {blank} has no training rows: .* stage 1 cannot learn it"):
        train_stage(config, 1, summary.path)  # before any Ray Train worker starts


def test_the_data_step_prepares_only_what_is_asked_or_what_the_run_uses(ray_local, built_in, tmp_path, capsys):
    """A lab with a microscope collection alone: `msbt preprocess --only microscope` scans and stores it, and neither
    generates nor scans the built-in ultrasound (it made and scanned both before). A run whose stage 2 does not
    start from stage 1 (`stage2.weights` other than parent) prepares only ultrasound by default, as its main job."""
    from msbt.cli import main

    base = ["preprocess", "--smoke-test", "--set", f"run.storage_path={tmp_path}",
            "--set", f"synth.out_dir={tmp_path / 'built-in'}"]
    assert main([*base, "--set", f"data.microscope={built_in / 'microscope'}", "--only", "microscope"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "smoke"
    assert "microscope store:" in out and "ultrasound" not in out
    assert (run / "stores" / "microscope" / "store.json").is_file()
    assert not (run / "data" / "ultrasound").exists() and not (run / "stores" / "ultrasound").exists()
    assert not (tmp_path / "built-in").exists()  # no synthetic data made for the modality not asked for

    assert main([*base, "--set", "run.name=imagenet-start", "--set", "stage2.weights=none"]) == 0
    out = capsys.readouterr().out
    other = tmp_path / "imagenet-start"
    assert "ultrasound store:" in out and "microscope" not in out
    assert (other / "stores" / "ultrasound" / "store.json").is_file() and not (other / "data" / "microscope").exists()
