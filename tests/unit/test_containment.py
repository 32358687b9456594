"""A run writes only into its own run folder, completely or not at all (issue #13, items 0 and 8).

Run names with paths, a storage path inside Ray's copy of a submitted job, `msbt report` on a data
folder, a full disk (a real, tiny tmpfs), a refused `--resume`, checkpoints beyond `checkpoints_to_keep`.
Ctrl-C and SIGTERM of a running workflow (real Ray): tests/workflows/test_interrupts.py.
"""

import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

import cv2
import pytest
import yaml

from helpers import ROOT, frame_of, leave_free, textured, tiny_tmpfs
from msbt.cli import main as msbt_main
from msbt.config import ConfigError, dump_config, load_config
from msbt.containment import check_storage_path, run_location

# ---------------------------------------------------------------------------------------------------
# Where the run folder may be


@pytest.mark.parametrize("name", ["../../x", "..", ".", "/tmp/elsewhere", "a/b", "a\\b", "", "  "])
def test_a_run_name_with_a_path_is_refused_naming_the_key(name):
    config = load_config(overrides=[f"run.name={name}"])
    with pytest.raises(ConfigError, match=r"run\.name"):
        run_location(config)


def test_the_cli_refuses_a_bad_run_name_before_ray_and_writes_nothing(tmp_path, capsys):
    rc = msbt_main(["preprocess", "--set", f"run.storage_path={tmp_path / 'runs'}", "--set", "run.name=../../x"])
    err = capsys.readouterr().err
    assert rc == 1 and "run.name" in err and "one plain folder name" in err
    assert not any(tmp_path.rglob("*")) and not (tmp_path.parent / "x").exists()


def test_a_storage_path_inside_a_ray_job_package_is_refused(tmp_path, monkeypatch):
    # what `ray job submit --working-dir .` gives the driver as its working directory
    package = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    with pytest.raises(ConfigError, match=r"run\.storage_path 'runs' resolves to .*_ray_pkg_0123abcd.*"
                                          r"--set run\.storage_path=\$PWD/runs"):
        run_location(load_config())
    # an absolute path given at submit time is fine
    assert check_storage_path(tmp_path / "shared" / "runs") == tmp_path / "shared" / "runs"
    assert run_location(load_config(overrides=[f"run.storage_path={tmp_path}/runs"])) == tmp_path / "runs" / "msbt"


# ---------------------------------------------------------------------------------------------------
# msbt report never writes into a data folder


def test_report_refuses_a_folder_that_is_not_a_run_folder(tmp_path, capsys):
    data = tmp_path / "busi" / "benign"
    data.mkdir(parents=True)
    cv2.imwrite(str(data / "a.png"), textured(1))
    rc = msbt_main(["report", str(tmp_path / "busi")])
    assert rc == 1 and "not a run folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "busi").rglob("*")) == ["a.png", "benign"]
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    dump_config(load_config(), run / "config.yaml")
    assert msbt_main(["report", str(run)]) == 0 and (run / "report.html").is_file()


# ---------------------------------------------------------------------------------------------------
# A full disk (a real tmpfs) leaves no 0-byte or temporary file, and a rerun goes through


def small_collection(root: Path) -> None:
    for modality, classes in (("micro", ("hela", "mcf7")), ("ultra", ("benign", "malignant"))):
        for c, label in enumerate(classes):
            (root / modality / label).mkdir(parents=True, exist_ok=True)
            for lesion in range(6):
                base = textured(100 * c + lesion + (50 if modality == "micro" else 0), 48)
                for k in range(2):
                    cv2.imwrite(str(root / modality / label / f"{lesion}_{k}.png"), frame_of(base, lesion * 3 + k))


def debris(folder: Path) -> list[str]:
    """Files that must never be left: empty ones and temporaries."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and (p.stat().st_size == 0 or ".tmp" in p.name))


def test_a_full_disk_leaves_no_empty_or_temporary_files_and_a_rerun_succeeds(tmp_path):
    from msbt.jobs.pipeline import prepare_data

    small_collection(tmp_path / "data")
    with tiny_tmpfs(tmp_path / "disk") as disk:
        config = load_config(overrides=[
            f"data.microscope={tmp_path / 'data' / 'micro'}", f"data.ultrasound={tmp_path / 'data' / 'ultra'}",
            f"run.storage_path={disk / 'runs'}", "run.name=full", "data.folds=2",
        ])
        failures = 0
        for free_kib in range(0, 64, 4):  # the run folder needs about 30 KiB: it fails at every step below
            filler = leave_free(disk, free_kib * 1024)
            try:
                prepare_data(config)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
                # and names the file it could not write ("[Errno 28] No space left on device" was all it said)
                assert str(disk / "runs" / "full") in str(err), err
                failures += 1
                assert debris(disk / "runs") == [], (free_kib, debris(disk / "runs"))
            filler.unlink()
            # with room again, the same command goes through: nothing half-written blocks it
            prepared = prepare_data(config)
            assert prepared["ultrasound"].split.summary["images"] == 24
            assert (disk / "runs" / "full" / "data" / "ultrasound" / "split.csv").stat().st_size > 0
            assert debris(disk / "runs") == []
            shutil.rmtree(disk / "runs")
        assert failures >= 4  # the disk really was full at several points of the run


@pytest.mark.slow
def test_a_model_saved_on_a_full_disk_keeps_the_previous_model(tmp_path):
    keras = pytest.importorskip("keras")
    from msbt.train.loop import BestModelSaver

    with tiny_tmpfs(tmp_path / "disk", size="4m") as disk:
        inputs = keras.Input((8,))
        model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Dense(4)(inputs)))
        saver = BestModelSaver(disk / "model.keras", "val_loss")
        saver.set_model(model)
        saver.on_epoch_end(0, {"val_loss": 1.0})
        first = (disk / "model.keras").read_bytes()
        state = (disk / "train_state.npz").read_bytes()  # its training state, for a resume
        filler = leave_free(disk, 1024)
        model.layers[1].kernel.assign(model.layers[1].kernel + 1.0)
        with pytest.raises(OSError):
            saver.on_epoch_end(1, {"val_loss": 0.5})
        assert (disk / "model.keras").read_bytes() == first  # the last good model, whole
        assert (disk / "train_state.npz").read_bytes() == state  # and the state that goes with it
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "model.keras", "train_state.npz"]
        filler.unlink()


# ---------------------------------------------------------------------------------------------------
# --resume: a refused one writes nothing; at most checkpoints_to_keep are kept


def fake_trained_run(tmp_path) -> tuple[Path, list[str]]:
    """A run folder whose stage 1 finished (a real manifest over a stand-in model file)."""
    from msbt.model.checkpoint import write_manifest
    from msbt.train.stages import record_stage

    overrides = [f"run.storage_path={tmp_path}", "run.name=r", "stage1.epochs=2"]
    config = load_config(overrides=overrides)
    checkpoint = tmp_path / "r" / "stage1" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.keras").write_bytes(b"stand-in model")
    write_manifest(checkpoint, stage_config=config.stage1, class_names=["a", "b"], metrics={"val_loss": 1.0},
                   best_epoch=2, history={"val_loss": [1.2, 1.0]})
    record_stage(config, 1, {"checkpoint": str(checkpoint), "monitor": "val_loss", "value": 1.0})
    dump_config(config, tmp_path / "r" / "config.yaml")
    return tmp_path / "r", overrides


def test_a_refused_resume_leaves_config_yaml_as_it_was(tmp_path, capsys):
    run, overrides = fake_trained_run(tmp_path)
    before = (run / "config.yaml").read_bytes()
    listing = sorted(p.relative_to(run) for p in run.rglob("*"))
    args = ["run", "--resume"]
    for item in overrides[:-1] + ["stage1.epochs=5", "stage1.learning_rate=0.01"]:
        args += ["--set", item]
    assert msbt_main(args) == 1
    err = capsys.readouterr().err
    assert "stage1.epochs: 2 -> 5" in err and "stage1.learning_rate" in err
    assert (run / "config.yaml").read_bytes() == before
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == listing
    assert yaml.safe_load(before)["stage1"]["epochs"] == 2


def test_prune_keeps_only_the_checkpoints_ray_kept(tmp_path):
    from msbt.train.stages import prune_checkpoints

    stage = tmp_path / "stage1"
    for i in range(4):
        (stage / f"checkpoint_00000{i}").mkdir(parents=True)
        (stage / f"checkpoint_00000{i}" / "model.keras").write_bytes(b"m")
    (stage / "checkpoint_manager_snapshot.json").write_text("{}")
    removed = prune_checkpoints(stage, [stage / "checkpoint_000002", str(stage / "checkpoint_000003")])
    assert [p.name for p in removed] == ["checkpoint_000000", "checkpoint_000001"]
    assert sorted(p.name for p in stage.iterdir()) == ["checkpoint_000002", "checkpoint_000003",
                                                      "checkpoint_manager_snapshot.json"]


# ---------------------------------------------------------------------------------------------------
# Provenance: every result folder says what made it


def test_environment_json_records_versions_revision_and_hardware(tmp_path):
    import json

    from msbt.provenance import ENVIRONMENT_FILE, git_revision, write_environment

    record = json.loads(write_environment(tmp_path).read_text())
    assert (tmp_path / ENVIRONMENT_FILE).is_file()
    packages = record["packages"]
    for name in ("ray", "tensorflow", "keras", "numpy", "opencv", "msbt"):
        assert packages[name], (name, packages)
    assert packages["ray"].startswith("2.60")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert record["git"]["commit"] == head.stdout.strip() and isinstance(record["git"]["dirty"], bool)
    hardware = record["hardware"]
    assert hardware["cpu_count"] >= 1 and hardware["cpu_model"] and isinstance(hardware["gpus"], list)
    # a copy of the code without .git (what `ray job submit` uploads) is no error
    outside = git_revision(tmp_path)
    assert outside["commit"] is None and "not a git checkout" in outside["reason"]


def test_the_run_folder_gets_its_environment_json(tmp_path):
    import json

    from msbt.jobs.pipeline import prepare_data

    small_collection(tmp_path / "data")
    config = load_config(overrides=[
        f"data.microscope={tmp_path / 'data' / 'micro'}", f"data.ultrasound={tmp_path / 'data' / 'ultra'}",
        f"run.storage_path={tmp_path / 'runs'}", "run.name=p", "data.folds=2"])
    prepare_data(config)
    record = json.loads((tmp_path / "runs" / "p" / "environment.json").read_text())
    assert record["packages"]["msbt"] and record["hardware"]["cpu_count"] >= 1


def test_atomic_writes_keep_the_usual_file_mode(tmp_path):
    from msbt.atomicio import write_text

    mask = os.umask(0o022)
    try:
        assert stat.S_IMODE(write_text(tmp_path / "a.json", "{}").stat().st_mode) == 0o644
        (tmp_path / "b.json").write_text("old")
        (tmp_path / "b.json").chmod(0o640)
        assert stat.S_IMODE(write_text(tmp_path / "b.json", "new").stat().st_mode) == 0o640
    finally:
        os.umask(mask)
    assert (tmp_path / "b.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_the_submitted_package_holds_every_module_of_msbt(tmp_path):
    """`ray job submit --working-dir . --runtime-env workflows/runtime_env.yaml` uploads what Ray's own
    packager keeps; a bare `data/` exclude dropped msbt/data/ (the job then imported another msbt)."""
    import zipfile

    pytest.importorskip("ray")
    from ray._private.runtime_env.packaging import create_package  # what `ray job submit` runs

    excludes = yaml.safe_load((ROOT / "workflows" / "runtime_env.yaml").read_text())["excludes"]
    create_package(str(ROOT), tmp_path / "pkg.zip", include_gitignore=True, excludes=list(excludes))
    packaged = set(zipfile.ZipFile(tmp_path / "pkg.zip").namelist())
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "msbt").rglob("*.py") if "__pycache__" not in p.parts}
    assert modules and modules <= packaged, sorted(modules - packaged)
    assert "workflows/pipeline.py" in packaged and not any(n.startswith((".venv/", "runs/", ".git/")) for n in packaged)


def test_a_run_log_on_a_full_disk_says_so_once_and_the_command_goes_on(tmp_path, capsys, restore_logging):
    """Python's logging printed `--- Logging error ---` and two tracebacks for every record driver.log could not take:
    on a full disk during a Ray Data step, 682 lines of them ended the command."""
    import logging

    from msbt import console

    with tiny_tmpfs(tmp_path / "disk", size="64k") as disk:
        console.setup(verbose=False)
        folder = console.attach_run(disk / "run")
        leave_free(disk, 0)
        for i in range(20):
            logging.getLogger("msbt.test").info("a line the full disk cannot take %d %s", i, "x" * 4096)
        err = capsys.readouterr().err
        assert "Logging error" not in err and "Traceback" not in err, err[:2000]
        assert err.count("can no longer be written") == 1 and str(folder / "driver.log") in err
        logging.getLogger("msbt.test").warning("still shown on the terminal")
        assert "still shown on the terminal" in capsys.readouterr().err
        console._state["file"].close()  # on the full disk: its unwritten bytes are flushed once more, and dropped
        # a record that cannot be formatted is logging's usual one-off report, and the log goes on
        other = console.RunLogHandler(tmp_path / "other.log", encoding="utf-8", errors="backslashreplace")
        other.emit(logging.LogRecord("msbt.test", logging.INFO, __file__, 1, "%d", ("x",), None))
        other.emit(logging.LogRecord("msbt.test", logging.INFO, __file__, 1, "name \udcff ok", (), None))
        other.close()
        assert not other.failed and "Logging error" in capsys.readouterr().err
        assert (tmp_path / "other.log").read_text() == "name \\udcff ok\n"


def test_a_librarys_prints_on_a_full_disk_are_dropped_and_a_file_it_left_short_says_why(tmp_path, capsys,
                                                                                      restore_logging):
    """A fast Tune search on a full disk ended with a bare `[Errno 28] No space left on device` (Tune's end-of-search
    print into driver.log failed inside Tune), then, once that was fixed, with `params.json: not valid JSON`: Tune had
    left the file empty on the full disk."""
    from msbt import console
    from msbt.atomicio import read_json_object

    with tiny_tmpfs(tmp_path / "disk", size="64k") as disk:
        console.setup(verbose=False)
        console.attach_run(disk / "run")
        (disk / "params.json").write_text("")  # what Tune left
        (disk / "edited.json").write_text('{"a": 1} # a comment')  # broken in its middle: not cut short
        leave_free(disk, 0)
        with console.printed_to_log():
            for i in range(50):  # more than a 4 KB page can take
                print("Tune's notice", i, "x" * 400)
        print("after the search")
        assert "after the search" in capsys.readouterr().out
        with pytest.raises(ValueError) as err:
            read_json_object(disk / "params.json", "a record")
        assert str(err.value).startswith(f"{disk / 'params.json'}: not valid JSON (")
        assert "it is cut short and its disk is full (0 bytes free): free space, then run the step again" in str(err.value)
        with pytest.raises(ValueError) as err:
            read_json_object(disk / "edited.json", "a record")
        assert "disk is full" not in str(err.value)


def test_a_json_file_cut_short_on_a_disk_with_room_is_only_named(tmp_path):
    from msbt.atomicio import read_json_object

    for text in ('{"a": 1', "", '{"a": {"b": 1}'):
        (tmp_path / "cut.json").write_text(text)
        with pytest.raises(ValueError) as err:
            read_json_object(tmp_path / "cut.json", "a record")
        assert str(err.value).startswith(f"{tmp_path / 'cut.json'}: not valid JSON (") and "disk" not in str(err.value)


def test_a_search_says_before_its_trials_when_their_checkpoints_may_not_fit(tmp_path, caplog):
    """A full search on a disk too small for its trials' checkpoints ran until the first trial met the full disk."""
    import logging

    from msbt.config import load_config
    from msbt.tune.search import check_room

    parent = tmp_path / "stage1"
    parent.mkdir()
    (parent / "model.keras").write_bytes(b"\0" * 20_000)
    config = load_config([], ["tune.num_samples=4", "run.checkpoints_to_keep=2", "tune.max_concurrent_trials=2"])
    with caplog.at_level(logging.WARNING, logger="msbt.tune.search"):
        assert check_room(config, parent, tmp_path / "run" / "tune" / "search") is None  # a disk with room
    with tiny_tmpfs(tmp_path / "disk", size="128k") as disk:  # 10 copies of 20 KB do not fit
        with caplog.at_level(logging.WARNING, logger="msbt.tune.search"):
            message = check_room(config, parent, disk / "run" / "tune" / "search")
    assert message and message.startswith("the trials' checkpoints may need about 195kB (4 trials x 2 kept "
                                          "(run.checkpoints_to_keep), and one being saved per running trial, of at "
                                          f"least 19.5kB each, the stage-1 checkpoint's size) and {disk} has ")
    assert message in caplog.text
