"""The one-script-per-step workflows chained on the smoke config: stage1 -> stage2 -> evaluate.

Run in-process through `msbt.cli.main` (what workflows/stage1.py etc. call) on the session's local Ray
cluster; the steps find each other through the run folder's stages.json.
"""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from helpers import ROOT, TINY_SETS, check_run_report, check_self_contained, svgs

from msbt.model.checkpoint import lineage, read_manifest
from msbt.cli import main

SCRIPTS = ["pipeline", "preprocess", "stage1", "stage2", "evaluate"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_workflow_script_has_help_and_the_common_options(name):
    done = subprocess.run([sys.executable, str(ROOT / "workflows" / f"{name}.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert all(option in done.stdout for option in ("--config", "--set", "--smoke-test", "--address"))
    assert ("--resume" in done.stdout) == (name in ("pipeline", "stage1", "stage2"))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_steps_chain_through_the_recorded_stages(tmp_path, ray_local, capsys):
    common = ["--config", str(ROOT / "workflows" / "configs" / "smoke.yaml"),
              "--set", f"run.storage_path={tmp_path}", "--set", f"synth.out_dir={tmp_path / 'synth'}", *TINY_SETS]
    run = tmp_path / "smoke"

    # stage 2 and evaluation need what an earlier step records; said at once, before any work
    assert main(["stage2", *common]) == 1
    assert "no finished stage 1" in capsys.readouterr().err
    assert main(["evaluate", *common]) == 1
    assert "no finished stage 2" in capsys.readouterr().err

    assert main(["stage1", *common]) == 0
    stage1 = json.loads((run / "stages.json").read_text())["1"]
    assert read_manifest(stage1["checkpoint"])["stage"] == 1 and stage1["epochs"] == 1
    assert not (run / "stores" / "ultrasound").exists()  # stage 1's step builds only its own store

    # a second stage-1 run is refused without --resume and reuses the finished stage with it
    assert main(["stage1", *common]) == 1
    err = capsys.readouterr().err
    assert "--resume" in err and "run.name" in err
    assert main(["stage1", *common, "--resume"]) == 0
    assert "stage 1: finished before, reused" in capsys.readouterr().out
    assert json.loads((run / "stages.json").read_text())["1"] == stage1

    # Later steps open the recorded split and stores and never scan the data again: with the data
    # folder moved away (so any scan, decode or regeneration of it would fail or show), stage 2 and
    # evaluation still run.
    assert main(["preprocess", *common]) == 0  # the data step: the ultrasound store as well
    capsys.readouterr()
    away = tmp_path / "synth-moved-away"
    (tmp_path / "synth").rename(away)

    assert main(["stage2", *common]) == 0
    assert "ultrasound: split and store reused" in capsys.readouterr().out
    stage2 = json.loads((run / "stages.json").read_text())["2"]
    manifest = read_manifest(stage2["checkpoint"])
    assert manifest["stage"] == 2 and manifest["class_names"] == ["benign", "malignant"]
    assert manifest["monitor"] == "val_auc" and "val_auc" in manifest["metrics"]
    chain = lineage(stage2["checkpoint"])  # stage 2 -> stage 1, both verified against their hashes
    assert [entry["manifest"]["stage"] for entry in chain] == [2, 1]
    assert chain[0]["link_ok"] is True and all(entry["verified"] for entry in chain)
    assert chain[1]["path"] == stage1["checkpoint"]
    capsys.readouterr()
    assert main(["lineage", str(run)]) == 0  # a run folder stands for its model, named once: the chain's first line
    out = capsys.readouterr().out
    assert out.startswith("stage 2 ") and out.splitlines()[0].endswith(stage2["checkpoint"]), out
    assert out.count(stage2["checkpoint"]) == 1, out

    assert main(["evaluate", *common]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["checkpoint"] == stage2["checkpoint"] and metrics["threshold_chosen_on"] == "val"
    assert "test split (" in capsys.readouterr().out
    check_run_report(run, "tiny_cnn")  # the evaluation step wrote report.html (tests/unit/test_report.py)
    assert not (tmp_path / "synth").exists()  # nothing regenerated the built-in data either
    away.rename(tmp_path / "synth")  # a new run name below needs its own split, so its own scan
    # predict of the run folder names its model once (the run-folder line and predict's own header both did)
    image = next((tmp_path / "synth" / "ultrasound").rglob("*.png"))
    capsys.readouterr()
    assert main(["predict", str(run), str(image)]) == 0
    out = capsys.readouterr().out
    assert out.count(stage2["checkpoint"]) == 1 and out.splitlines()[1].startswith("threshold "), out

    # explicit links: a changed stage-2 setting under a new name, from stage 1 by --parent
    other = [*common, "--set", "run.name=other", "--set", "stage2.head.dropout=0.25"]
    assert main(["stage2", *other, "--parent", stage1["checkpoint"]]) == 0
    other_stage2 = json.loads((tmp_path / "other" / "stages.json").read_text())["2"]
    assert read_manifest(other_stage2["checkpoint"])["config"]["head"]["dropout"] == 0.25
    capsys.readouterr()
    assert main(["evaluate", *common, "--checkpoint", other_stage2["checkpoint"]]) == 0
    assert json.loads((run / "metrics.json").read_text())["checkpoint"] == other_stage2["checkpoint"]
    # the run's own results replaced: said, with what it costs (said once: they are another model's now)
    assert f"held the test metrics of the run's own model ({stage2['checkpoint']}); they now hold those of " \
        f"{other_stage2['checkpoint']}" in capsys.readouterr().out
    assert main(["evaluate", *common, "--checkpoint", other_stage2["checkpoint"]]) == 0
    assert "held the test metrics" not in capsys.readouterr().out

    # --resume refuses a recorded stage that the config no longer describes
    assert main(["stage2", *common, "--resume", "--set", "stage2.head.dropout=0.25"]) == 1
    assert "stage2.head" in capsys.readouterr().err

    # run.stage2_seeds: stage 2 once per training seed, and their average is the run's model. On --resume the
    # recorded seed 0 is reused and only seed 1 trains, in a run folder of its own under seeds/.
    seeded = [*common, "--set", "run.stage2_seeds=2"]
    capsys.readouterr()
    assert main(["evaluate", *seeded]) == 1  # no average yet: said before any work
    assert "no average of its 2 stage-2 seeds" in capsys.readouterr().err
    assert main(["stage2", *seeded]) == 1  # a plain rerun is still refused
    assert main(["stage2", *seeded, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "stage 2: finished before, reused" in out and "training seed 1 (2 of 2)" in out
    seed1 = json.loads((run / "seeds" / "seed1" / "stages.json").read_text())["2"]
    assert read_manifest(seed1["checkpoint"])["seed"] == 1 and read_manifest(stage2["checkpoint"])["seed"] == 0
    assert lineage(seed1["checkpoint"])[1]["path"] == stage1["checkpoint"]  # the same stage 1
    average = run / "ensemble" / "checkpoint"
    assert [m["path"] for m in read_manifest(average)["members"]] == [stage2["checkpoint"], seed1["checkpoint"]]
    assert main(["evaluate", *seeded]) == 0  # the run's model is now the average
    out = capsys.readouterr().out
    assert "ensemble - members' mean AUC" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(average)
    members = json.loads((run / "ensemble" / "members.json").read_text())
    assert [m["seed"] for m in members["members"]] == [0, 1] and members["checkpoint"] == str(average)
    report = (run / "report.html").read_text()
    assert "average of 2 stage-2 models" in report
    titles = [ET.fromstring(s).get("aria-label") for s in svgs(report)]
    assert {"Stage 2 (tiny_cnn, seed 0): auc", "Stage 2 (tiny_cnn, seed 1): auc",
            "Stage 1 (tiny_cnn): loss"} <= set(titles)
    # nothing trains or changes on a second --resume: the average is kept as it was, not made again
    made = (average / "manifest.json").stat().st_mtime_ns
    assert main(["stage2", *seeded, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "made before" in out and "stage 2: best" not in out
    assert (average / "manifest.json").stat().st_mtime_ns == made
    # an average that is not made of the seeds this config names is not the run's model
    assert main(["evaluate", *common, "--set", "run.stage2_seeds=3"]) == 1
    assert "no current average of its 3 stage-2 seeds" in capsys.readouterr().err
    # an average made again (here: damaged; likewise from other seeds) takes the old one's evaluation with it, so
    # predict never applies the old threshold to the new model at the same path
    (average / "manifest.json").write_text("{}")
    assert main(["stage2", *seeded, "--resume"]) == 0
    assert "made again (its evaluation removed" in capsys.readouterr().out
    assert not (run / "metrics.json").exists() and not (run / "ensemble" / "members.json").exists()
    assert [m["path"] for m in read_manifest(average)["members"]] == [stage2["checkpoint"], seed1["checkpoint"]]
    # --resume refuses a recorded stage 2 trained with another training seed than the config gives
    assert main(["stage2", *common, "--resume", "--set", "run.train_seed=1"]) == 1
    assert "training seed 0, this config gives 1" in capsys.readouterr().err
    # a new run with the same inputs trains no seed: both come from the stage index (seed 1 was remembered
    # under the outer run's storage path), and the new run gets its own average of them
    again = [*seeded, "--set", "run.name=again"]
    assert main(["stage2", *again, "--parent", stage1["checkpoint"]]) == 0
    out = capsys.readouterr().out
    assert out.count("identical stage found in run") == 2 and "stage 2: best" not in out
    members = read_manifest(tmp_path / "again" / "ensemble" / "checkpoint")["members"]
    assert [m["path"] for m in members] == [stage2["checkpoint"], seed1["checkpoint"]]


@pytest.mark.ray
@pytest.mark.timeout(900)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_stage2_that_starts_from_no_stage1_runs_alone(tmp_path, ray_local, capsys):
    """stage2.weights other than parent (workflows/configs/multisite.yaml starts from ImageNet): the main job
    trains no stage 1 and reads no microscope data. It used to train stage 1, then fail at stage 2 (measured
    2026-12-03: 'a parent checkpoint is needed exactly when weights is parent', after stage 1's minutes)."""
    common = ["--config", str(ROOT / "workflows" / "configs" / "smoke.yaml"), "--set", f"run.storage_path={tmp_path}",
              "--set", f"synth.out_dir={tmp_path / 'synth'}", *TINY_SETS, "--set", "stage2.weights=none"]
    # a stage-1 checkpoint given to such a stage 2 is refused at once, naming the setting
    assert main(["stage2", *common, "--parent", str(tmp_path)]) == 1
    assert "stage2.weights is 'none'" in capsys.readouterr().err

    assert main(["run", *common]) == 0
    out = capsys.readouterr().out
    assert "stage 1: not trained (stage2.weights is 'none'" in out and "microscope" not in out
    run = tmp_path / "smoke"
    assert not (run / "stage1").exists() and not (run / "stores" / "microscope").exists()
    assert not (run / "data" / "microscope").exists()
    stages = json.loads((run / "stages.json").read_text())
    assert list(stages) == ["2"]
    chain = lineage(stages["2"]["checkpoint"])
    assert len(chain) == 1 and chain[0]["verified"] and read_manifest(stages["2"]["checkpoint"])["parent"] is None
    summary = json.loads((run / "summary.json").read_text())
    assert summary["training"]["stage1"] is None and list(summary["stores"]) == ["ultrasound"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["checkpoint"] == stages["2"]["checkpoint"]
    text = (run / "report.html").read_text()
    check_self_contained(text)
    titles = [ET.fromstring(s).get("aria-label") for s in svgs(text)]
    assert "Stage 2 (tiny_cnn): loss" in titles and not any(t.startswith("Stage 1") for t in titles)
    assert "weights=none" in text


def test_tensorboard_callback_writes_epoch_scalars(tmp_path):
    import keras
    import numpy as np
    import tensorflow as tf

    from msbt.train.tblog import tensorboard_callback, tensorboard_dir

    log_dir = tensorboard_dir(tmp_path / "run", 2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
    x, y = np.random.default_rng(0).normal(size=(16, 3)), np.arange(16) % 2
    model.fit(x, y, validation_data=(x, y), epochs=2, verbose=0, callbacks=[tensorboard_callback(log_dir)])
    tags: dict[str, list[int]] = {}
    for split in ("train", "validation"):
        for event_file in (log_dir / split).glob("events.out.tfevents.*"):
            for event in tf.compat.v1.train.summary_iterator(str(event_file)):
                for value in event.summary.value:
                    tags.setdefault(f"{split}/{value.tag}", []).append(event.step)
    assert tags["train/epoch_loss"] == [0, 1] and tags["validation/epoch_auc"] == [0, 1]


# ---------------------------------------------------------------------------------------------------
# The run folder's state, without Ray: refusal, the latest complete checkpoint, a broken stages.json


def fake_checkpoint(folder, epoch: int):
    """A checkpoint folder as Ray leaves it: model file + manifest (the model's bytes do not matter here)."""
    from msbt.model.checkpoint import write_manifest
    from msbt.config import StageConfig

    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(f"weights of epoch {epoch}".encode())
    write_manifest(folder, stage_config=StageConfig(), class_names=["a", "b"], metrics={"val_loss": 1.0 / epoch},
                   best_epoch=epoch)
    return folder


def test_a_rerun_is_refused_when_the_run_folder_holds_a_stage(tmp_path):
    from msbt.config import load_config
    from msbt.train.stages import RunStateError, record_stage, refuse_rerun

    config = load_config(overrides=[f"run.storage_path={tmp_path}", "run.name=r"])
    refuse_rerun(config)  # nothing there yet
    fake_checkpoint(tmp_path / "r" / "stage2" / "checkpoint_x", 1)
    with pytest.raises(RunStateError, match=r"stage 2 of run 'r' is already interrupted .*--resume.*run\.name"):
        refuse_rerun(config)
    refuse_rerun(config, [1])
    record_stage(config, 1, {"checkpoint": "somewhere"})
    with pytest.raises(RunStateError, match=r"stage 1 .* finished \(recorded in .*stages\.json\)"):
        refuse_rerun(config, [1])


def test_latest_checkpoint_skips_incomplete_copies(tmp_path):
    from msbt.train.stages import latest_checkpoint

    assert latest_checkpoint(tmp_path) is None
    fake_checkpoint(tmp_path / "checkpoint_a", 1)
    second = fake_checkpoint(tmp_path / "checkpoint_b", 2)
    third = fake_checkpoint(tmp_path / "checkpoint_c", 3)
    (third / "model.keras").write_bytes(b"cut short")  # a copy interrupted by a kill: fails its sha256
    fake_checkpoint(tmp_path / "checkpoint_d", 4).joinpath("manifest.json").unlink()
    assert latest_checkpoint(tmp_path) == second


def test_a_broken_stages_file_is_named(tmp_path):
    from msbt.config import load_config
    from msbt.train.stages import RunStateError, read_stages

    config = load_config(overrides=[f"run.storage_path={tmp_path}", "run.name=r"])
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "stages.json").write_text("{not json")
    with pytest.raises(RunStateError, match=r"r/stages\.json: not valid JSON"):
        read_stages(config)
