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
