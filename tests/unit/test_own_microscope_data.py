"""A lab's own microscope collection through the data step (scan, split, patch store in driver threads, no Ray):
what the step says about a cell line with few fields or patches, and about fields that gave no patches."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from msbt.config import load_config
from msbt.data import synth
from msbt.data.prepare import build_stores, prepare_data, summarize, summarize_stores

SMOKE = Path(__file__).resolve().parents[2] / "workflows" / "configs" / "smoke.yaml"


def fields(root: Path, per_class: dict[str, int], size: int = 300) -> Path:
    """Built-in synthetic fields of real cell lines, ``per_class`` of each, as PNG class folders."""
    for c, n in per_class.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            assert cv2.imwrite(str(root / c / f"field{i:02d}.png"),
                               cv2.cvtColor(synth.field_image(0, c, i, size), cv2.COLOR_RGB2BGR))
    return root


def data_step(tmp_path: Path, micro: Path, *overrides: str):
    # data.ultrasound names a folder so that no built-in data is generated; only the microscope data are read
    (tmp_path / "us").mkdir(exist_ok=True)
    config = load_config([str(SMOKE)], [f"data.microscope={micro}", f"data.ultrasound={tmp_path / 'us'}",
                                        f"run.storage_path={tmp_path / 'runs'}", "run.name=r",
                                        "preprocess.build=local", *overrides])
    return config, prepare_data(config, modalities=("microscope",))


def test_a_cell_line_with_a_quarter_or_fewer_of_the_fields_is_warned_about_naming_stage1_balance(tmp_path):
    micro = fields(tmp_path / "micro", {"HeLa": 12, "MCF-7": 2})
    config, prepared = data_step(tmp_path, micro)
    text = summarize(prepared, config)
    assert "warning: few source files of MCF-7 (2) against 12 of HeLa (1:4 or fewer)" in text
    assert "--set stage1.balance=class" in text
    stores = summarize_stores(build_stores(config, prepared), config)
    assert "warning: few training patches of MCF-7" in stores and "--set stage1.balance=class" in stores
    # once set, it is said as set, not suggested
    config, prepared = data_step(tmp_path, micro, "stage1.balance=class")
    text = summarize(prepared, config)
    assert "stage1.balance is class" in text and "--set stage1.balance" not in text


def test_classes_of_similar_size_give_no_minority_warning(tmp_path):
    config, prepared = data_step(tmp_path, fields(tmp_path / "micro", {"HeLa": 4, "MCF-7": 3}))
    assert "few source files" not in summarize(prepared, config)


def test_fields_without_cells_and_files_unreadable_since_the_scan_are_named_apart(tmp_path):
    """The store line and stage 1's refusal said "no cells found, or unreadable" for both; now each file is named
    under what happened to it, with the reason a file could not be read."""
    import csv

    from msbt.train.runner import train_stage

    micro = fields(tmp_path / "micro", {"HeLa": 6})
    (micro / "MCF-7").mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):  # fields of even background: the scan takes them, the threshold finds no cell
        noise = (120 + rng.normal(0, 3, (300, 300))).clip(0, 255).astype(np.uint8)
        assert cv2.imwrite(str(micro / "MCF-7" / f"field{i}.png"), noise)
    config, prepared = data_step(tmp_path, micro)
    for i in (1, 3):  # broken after the scan, before the store (a copy still running, a disk error)
        path = micro / "MCF-7" / f"field{i}.png"
        path.write_bytes(path.read_bytes()[:200])
    stores = build_stores(config, prepared)
    text = summarize_stores(stores, config)
    assert "(no cells found, or unreadable)" not in text
    assert "no cells found (see contact_fields.png; preprocess.offset sets the threshold by hand), 2: " \
           "MCF-7/field0.png, MCF-7/field2.png" in text
    assert "unreadable when the store was written (changed since the scan), 2: MCF-7/field1.png (truncated PNG " \
           "(no IEND chunk at the end)), MCF-7/field3.png (truncated PNG" in text

    with (prepared["microscope"].folder / "split.csv").open(newline="") as handle:
        train = {row["relpath"] for row in csv.DictReader(handle) if row["label"] == "MCF-7" and row["split"] == "train"}
    assert train  # the split gives MCF-7 training files, all of which gave no patches
    with pytest.raises(ValueError, match="class MCF-7 has no training rows: of the train-split files") as refused:
        train_stage(config, 1, stores["microscope"].path)
    message = str(refused.value)
    broken = sorted(train & {"MCF-7/field1.png", "MCF-7/field3.png"})
    empty = sorted(train - set(broken))
    assert (f"{len(broken)} could not be read when the store was written ({broken[0]}: truncated PNG" in message) \
        == bool(broken)
    assert (f"{len(empty)} gave none, no cells found" in message) == bool(empty)
    assert all(name in message for name in train)


def test_the_contact_sheet_shows_fields_as_the_store_read_them_under_minmax(tmp_path):
    """12-bit fields under data.sixteen_bit: minmax: the store stretched them, the sheet read them under 'scale'
    (nearly black, with the masks of that black image), so it showed nothing of what was cut."""
    import tifffile

    micro = tmp_path / "micro"
    for c in ("HeLa", "MCF-7"):
        (micro / c).mkdir(parents=True)
        for i in range(3):
            grey = synth.field_image(0, c, i, 300).astype(np.uint16) * 16
            tifffile.imwrite(micro / c / f"field{i}.tif", grey)  # a 12-bit camera's range
    config, prepared = data_step(tmp_path, micro, "data.sixteen_bit=minmax")
    store = build_stores(config, prepared)["microscope"]
    sheet = cv2.imread(str(store.path / "contact_fields.png"), cv2.IMREAD_GRAYSCALE)
    patches = cv2.imread(str(store.path / "contact_patches.png"), cv2.IMREAD_GRAYSCALE)
    # the fields' tiles as bright as the store's patches (each sheet's brightest tenth of pixels)
    assert np.percentile(sheet, 90) > 0.5 * np.percentile(patches, 90) > 40


def test_fields_smaller_than_a_patch_are_warned_about_with_a_patch_size_that_fits(tmp_path):
    """A small crop among the fields (150x120 px against the smoke config's 200 px patches): each of its patches
    would be mostly the field's mirror image, which no microscope shows; the data step says so and what to set."""
    micro = fields(tmp_path / "micro", {"HeLa": 3, "MCF-7": 3}, size=300)
    small = cv2.imread(str(micro / "HeLa" / "field00.png"))[:120, :150]
    assert cv2.imwrite(str(micro / "HeLa" / "crop.png"), small)
    config, prepared = data_step(tmp_path, micro)
    assert config.preprocess.patch_size == 200
    text = summarize(prepared, config)
    assert ("warning: 1 of 7 microscope fields are smaller than the 200 px patches (preprocess.patch_size) in width "
            "or height (smallest 150x120 px, HeLa/crop.png)") in text
    assert "--set preprocess.patch_size=120 (or less)" in text
    config, prepared = data_step(tmp_path, micro, "preprocess.patch_size=100")
    assert "smaller than the" not in summarize(prepared, config)  # patches that fit the fields: nothing to say
