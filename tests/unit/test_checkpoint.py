"""Checkpoint manifests, verification, parent refusal and lineage, with stand-in model files (no TF)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from msbt.model.checkpoint import (
    MANIFEST_FILE,
    MODEL_FILE,
    CheckpointError,
    check_parent,
    format_lineage,
    lineage,
    read_manifest,
    sha256_file,
    verify,
    write_manifest,
)
from msbt.config import Config, StageConfig

STAGE1, STAGE2 = Config().stage1, Config().stage2


def fake_checkpoint(folder: Path, stage: StageConfig, parent=None, payload=b"weights") -> Path:
    """A checkpoint folder whose model file is arbitrary bytes: manifests only hash it."""
    folder.mkdir(parents=True)
    (folder / MODEL_FILE).write_bytes(payload)
    write_manifest(
        folder,
        stage_config=stage,
        class_names=["benign", "malignant"] if parent else ["a", "b", "c", "d"],
        metrics={"val_loss": 0.25, "val_auc": 0.75},
        best_epoch=3,
        history={"val_loss": [0.5, 0.3, 0.25]},
        parent=parent,
        data_fingerprint="data123",
        split_id="fold0",
    )
    return folder


@pytest.fixture
def chain(tmp_path):
    s1 = fake_checkpoint(tmp_path / "run" / "stage1", STAGE1, payload=b"stage one")
    s2 = fake_checkpoint(tmp_path / "run" / "stage2", STAGE2, parent=s1, payload=b"stage two")
    return s1, s2


def test_manifest_records_what_reproduces_the_model(chain):
    s1, s2 = chain
    m = read_manifest(s2)
    assert m["stage"] == 2 and read_manifest(s1)["stage"] == 1
    assert m["parent"]["path"] == str(s1.resolve())
    assert m["parent"]["model_sha256"] == sha256_file(s1 / MODEL_FILE)
    assert m["model_sha256"] == sha256_file(s2 / MODEL_FILE)
    assert (m["backbone"], m["weights"], m["class_names"]) == ("resnet50", {"source": "parent"}, ["benign", "malignant"])
    assert (m["data_fingerprint"], m["split_id"], m["best_epoch"]) == ("data123", "fold0", 3)
    assert m["config"]["head"]["dense_units"] == list(STAGE2.head.dense_units)
    assert m["metrics"]["val_auc"] == 0.75 and m["created"] and m["msbt_version"]


def test_weights_file_source_is_hashed(tmp_path):
    weights = tmp_path / "resnet50_notop.h5"
    weights.write_bytes(b"h5")
    folder = fake_checkpoint(tmp_path / "c", StageConfig(weights=str(weights)))
    assert read_manifest(folder)["weights"] == {"source": str(weights), "sha256": sha256_file(weights)}


def test_a_stage2_without_a_parent_says_it_is_stage2_and_is_no_parent(chain, tmp_path):
    """A stage 2 from ImageNet (no stage 1) used to be recorded as stage 1: the report called its curves
    stage 1's, and it passed as a stage-1 parent."""
    folder = tmp_path / "imagenet-stage2"
    folder.mkdir()
    (folder / MODEL_FILE).write_bytes(b"stage two from imagenet")
    stage = StageConfig(weights="imagenet")
    common = dict(stage_config=stage, class_names=["benign", "malignant"], metrics={"val_auc": 0.7}, best_epoch=1)
    assert write_manifest(folder, **common, number=2)["stage"] == 2 and read_manifest(folder)["parent"] is None
    with pytest.raises(CheckpointError, match="stage-2 checkpoint"):
        check_parent(folder, STAGE2)
    assert write_manifest(folder, **common)["stage"] == 1  # without a number: counted from the parent, as before
    with pytest.raises(ValueError, match="stage 1 cannot have the stage-1 parent"):
        write_manifest(chain[1], **common, parent=chain[0], number=1)


def test_verify_detects_a_changed_model(chain):
    s1, _ = chain
    assert verify(s1)
    (s1 / MODEL_FILE).write_bytes(b"tampered")
    assert not verify(s1)


def test_stage2_accepts_a_stage1_parent(chain):
    assert check_parent(chain[0], STAGE2)["stage"] == 1


def test_stage2_refuses_a_stage2_parent(chain):
    with pytest.raises(CheckpointError, match="stage-2 checkpoint; stage 2 needs a stage-1 parent"):
        check_parent(chain[1], STAGE2)


def test_parent_refused_when_altered_or_other_backbone_or_not_a_checkpoint(chain, tmp_path):
    s1, _ = chain
    with pytest.raises(CheckpointError, match="backbone resnet50"):
        check_parent(s1, StageConfig(backbone="inceptionv3", weights="parent"))
    (s1 / MODEL_FILE).write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="does not match"):
        check_parent(s1, STAGE2)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        check_parent(tmp_path, STAGE2)


def test_lineage_walks_child_to_root(chain):
    s1, s2 = chain
    entries = lineage(s2)
    assert [e["path"] for e in entries] == [str(s2.resolve()), str(s1.resolve())]
    assert [e["manifest"]["stage"] for e in entries] == [2, 1]
    assert all(e["verified"] for e in entries) and entries[0]["link_ok"] is True


def test_format_lineage_prints_the_chain(chain):
    text = format_lineage(chain[1])
    lines = text.splitlines()
    assert lines[0].startswith("stage 2  resnet50  weights=parent") and "val_auc=0.7500 @ epoch 3" in lines[0]
    assert lines[1].startswith("  <- stage 1  resnet50  weights=imagenet") and "val_loss=0.2500" in lines[1]
    assert lines[2] == "  <- imagenet"
    assert "[ok]" in lines[0] and "[ok]" in lines[1]


def test_lineage_flags_a_replaced_parent(chain):
    s1, s2 = chain
    (s1 / MODEL_FILE).write_bytes(b"retrained later")
    write_manifest(s1, stage_config=STAGE1, class_names=["a"], metrics={}, best_epoch=1)  # consistent again
    entries = lineage(s2)
    assert entries[1]["verified"] and entries[0]["link_ok"] is False
    assert "PARENT CHANGED" in format_lineage(s2).splitlines()[0]


def test_lineage_follows_a_moved_run_folder(chain, tmp_path):
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "run"), moved)
    entries = lineage(moved / "stage2")
    assert entries[1]["path"] == str((moved / "stage1").resolve()) and entries[0]["link_ok"]


def test_lineage_reports_a_missing_parent(chain):
    s1, s2 = chain
    shutil.rmtree(s1)
    entries = lineage(s2)
    assert entries[1]["manifest"] is None and entries[0]["link_ok"] is False
    assert "MISSING checkpoint" in format_lineage(s2)


def test_manifest_is_json_and_read_errors_name_the_file(chain, tmp_path):
    s1, _ = chain
    json.loads((s1 / MANIFEST_FILE).read_text())
    (s1 / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=str(s1 / MANIFEST_FILE)):
        read_manifest(s1)
    # a JSON list, or bytes that are not UTF-8: named too (an AttributeError and a bare codec error before)
    (s1 / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=re.escape(f"{s1 / MANIFEST_FILE}: not a checkpoint manifest")):
        read_manifest(s1)
    (s1 / MANIFEST_FILE).write_bytes(b'{"stage": "caf\xe9"}')
    with pytest.raises(CheckpointError, match=re.escape(f"{s1 / MANIFEST_FILE}: not valid JSON")):
        read_manifest(s1)


def test_msbt_lineage_command(chain, capsys):
    from msbt.cli import main

    assert main(["lineage", str(chain[1])]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stage 2") and "<- stage 1" in out
    assert main(["lineage", str(chain[1].parent / "nowhere")]) == 1
    # a broken chain is a failure, not a report that exits 0: a folder that is no checkpoint, a changed model
    capsys.readouterr()
    assert main(["lineage", str(chain[1].parent)]) == 1
    assert "not a checkpoint folder (no manifest.json)" in capsys.readouterr().err  # it said "MISSING checkpoint"
    (chain[0] / MODEL_FILE).write_bytes(b"retrained later")
    assert main(["lineage", str(chain[1])]) == 1
    assert "MODEL CHANGED" in capsys.readouterr().out
    # each failing check says itself: a model deleted is missing, not changed; an edited manifest is the manifest
    (chain[1] / MODEL_FILE).rename(chain[1] / "moved.keras")
    assert main(["lineage", str(chain[1])]) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert "[MODEL MISSING, PARENT CHANGED]" in first  # (its parent's model was overwritten above)
    (chain[1] / "moved.keras").rename(chain[1] / MODEL_FILE)
    manifest = json.loads((chain[1] / MANIFEST_FILE).read_text())
    (chain[1] / MANIFEST_FILE).write_text(json.dumps({**manifest, "class_names": ["a", "b"]}))
    assert main(["lineage", str(chain[1])]) == 1
    assert "[MANIFEST CHANGED, PARENT CHANGED]" in capsys.readouterr().out.splitlines()[0]
