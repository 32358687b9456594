"""The command line as a user meets it: help, one-line errors, and each data subcommand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from helpers import textured
from msbt.cli import main

SUBCOMMANDS = ["run", "preprocess", "stage1", "stage2", "evaluate", "synth", "scan", "split", "lineage", "config"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0 and "usage: msbt " + name in capsys.readouterr().out


def test_every_subcommand_takes_debug_and_verbose_after_its_name():
    """`msbt predict --verbose ...` was refused ("unrecognized arguments") while `msbt run --verbose` worked."""
    import argparse

    from msbt.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    lacking = {name: {"--debug", "--verbose"} - {o for a in p._actions for o in a.option_strings}
               for name, p in sub.choices.items()}
    assert len(sub.choices) >= 20 and not any(lacking.values()), lacking


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: {epochs: many}\n")
    assert main(["config", "--config", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("msbt: error: ") and "stage1.epochs" in err
    with pytest.raises(Exception, match="stage1.epochs"):
        main(["config", "--debug", "--config", str(bad)])


def test_a_reader_that_goes_away_is_not_an_error():
    """`msbt config | head -1`: the closed pipe ends the command quietly, as for other Unix tools."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # output buffered, as for most users
    proc = subprocess.Popen([sys.executable, "-m", "msbt.cli", "config"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the command writes (it imports first)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "error" not in err and "Traceback" not in err


def test_missing_data_folder_is_one_clear_line(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: data folder or manifest does not exist" in capsys.readouterr().err


def make_tree(root):
    for label in ("benign", "malignant"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            cv2.imwrite(str(root / label / f"{i}.png"), textured(i + (10 if label == "malignant" else 0)))
    (root / "benign" / "broken.png").write_bytes(b"")
    return root


def test_scan_reports_rejects_and_writes_the_manifest(tmp_path, capsys):
    root = make_tree(tmp_path / "data")
    assert main(["scan", str(root), "--rejects", str(tmp_path / "rejects.csv")]) == 0
    out = capsys.readouterr().out
    assert "8 usable images (benign 4, malignant 4); 1 rejected" in out
    assert "broken.png: empty file" in out
    assert "broken.png" in (tmp_path / "rejects.csv").read_text()
    assert main(["scan", str(root), "--strict"]) == 1


def test_scan_warns_of_twelve_bit_data_that_scale_leaves_nearly_black(tmp_path, capsys):
    import numpy as np

    root = make_tree(tmp_path / "data")
    twelve = (textured(7).astype(np.uint16) * 16)  # 0..4080: a 12-bit camera's range in a 16-bit file
    assert cv2.imwrite(str(root / "benign" / "twelve.png"), twelve)
    assert main(["scan", str(root)]) == 0
    out = capsys.readouterr().out
    assert "warning: 1 of 1 16-bit files use only a small part of the 16-bit range" in out
    assert "--set data.sixteen_bit=minmax" in out
    assert main(["scan", str(root), "--set", "data.sixteen_bit=minmax"]) == 0
    assert "16-bit" not in capsys.readouterr().out


def test_scan_warns_of_a_class_with_a_quarter_or_fewer_of_the_images(tmp_path, capsys):
    root = make_tree(tmp_path / "data")
    for i in range(4, 16):
        cv2.imwrite(str(root / "benign" / f"{i}.png"), textured(100 + i))
    assert main(["scan", str(root)]) == 0
    out = capsys.readouterr().out
    assert "warning: few usable images of malignant (4) against 16 of benign" in out
    # a command that parses (it read "--set stage1.balance (microscope) or stage2.balance (ultrasound)=class")
    assert "set --set stage1.balance=class (microscope) or --set stage2.balance=class (ultrasound) so that" in out


def test_config_shows_the_settings_records_leave_out_at_their_default(capsys):
    """stage1.balance is left out of run records while 'none' (config.ADDED_LATER); msbt config shows it."""
    import yaml

    from msbt.config import StageConfig, to_dict

    assert main(["config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["stage1"]["balance"] == "none" and shown["stage2"]["balance"] == "none"
    assert shown["stage1"]["augment"]["speckle"] == 0.0
    assert "balance" not in to_dict(StageConfig())  # records stay as before


def test_scan_counts_hidden_files_and_folders_as_skipped(tmp_path, capsys):
    root = make_tree(tmp_path / "data")
    cv2.imwrite(str(root / "benign" / ".hidden_field.png"), textured(50))
    (root / "benign" / ".cache").mkdir()
    cv2.imwrite(str(root / "benign" / ".cache" / "x.png"), textured(51))
    assert main(["scan", str(root)]) == 0
    out = capsys.readouterr().out
    assert "8 usable images (benign 4, malignant 4)" in out
    assert "skipped 1: hidden file (name starts with '.')" in out
    assert "skipped 1: hidden folder (name starts with '.'), not searched" in out


def test_split_writes_files_and_will_not_overwrite(tmp_path, capsys):
    root = make_tree(tmp_path / "data")
    out = tmp_path / "split"
    assert main(["split", str(root), "--out", str(out)]) == 0
    summary = json.loads((out / "split.json").read_text())
    assert summary["images"] == 8 and (out / "split.csv").exists() and (out / "rejects.csv").exists()
    # said as the data step says it (it printed about 40 lines of the summary's JSON)
    printed = capsys.readouterr().out
    assert printed.startswith(f"data: 8 images in 2 classes (benign, malignant) from {root}; ")
    assert "  split (new, seed 0): train " in printed and "a naive random split would leak" in printed
    assert "{" not in printed and f"(the whole summary: {out / 'split.json'})" in printed
    assert main(["split", str(root), "--out", str(out)]) == 1
    assert "already saved" in capsys.readouterr().err
    assert main(["split", str(root), "--out", str(out), "--force", "--set", "data.seed=5"]) == 0


def test_synth_into_a_chosen_folder(tmp_path, capsys):
    out = tmp_path / "built-in"
    overrides = ["--set", "synth.fields_per_line=1", "--set", "synth.field_size=128",
                 "--set", "synth.lesions_per_class=2", "--set", "synth.ultrasound_size=64"]
    assert main(["synth", "--out", str(out), *overrides]) == 0
    assert capsys.readouterr().out.strip() == str(out.resolve())
    assert len(list((out / "microscope").rglob("*.png"))) == 4
    assert (out / "ultrasound_truth.csv").exists()
    # synth.sites (workflows/configs/sites-demo.yaml): the multi-site set is made as well, each site named with
    # the source data.ultrasound and `msbt external` take (it was left out without a word)
    assert main(["synth", "--out", str(out), *overrides, "--set", "synth.sites=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in lines[1:]] == ["site site-a", "site site-b"]
    for line in lines[1:]:
        source = line.split("(as a source: ")[1].rstrip(")")
        name, path = source.split("=", 1)
        assert Path(path).is_dir() and len(list(Path(path).rglob("*.png"))) >= 4 and line.startswith(f"site {name}:")


def test_parser_builds_without_importing_tensorflow_or_ray():
    code = ("import sys; from msbt.cli import build_parser; build_parser(); "
            "print('tensorflow' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# The README's `workflows/pipeline.py --smoke-test` end to end in a fresh process (on the test backbone):
# tests/workflows/test_job_submit.py.


def test_a_joined_clusters_address_goes_to_every_actor():
    """A command that joins a cluster at host:port (a `ray job submit` job, `--address`) gives the address to the
    job's runtime environment, which every task and actor of the job inherits: a state-API client in an actor
    (Ray Train's placement-group cleaner of a Tune trial) then asks this cluster, not whichever it finds on the
    machine (docs/reliability.md, item 10). A Ray Client address (ray://) is not a GCS address: nothing given."""
    from msbt.raycluster import _own_address

    assert _own_address("127.0.0.1:6379") == {"runtime_env": {"env_vars": {"RAY_ADDRESS": "127.0.0.1:6379"}}}
    assert _own_address("head.example.org:6380")["runtime_env"]["env_vars"]["RAY_ADDRESS"] == "head.example.org:6380"
    for other in ("ray://head:10001", "auto", "head", "head:port"):
        assert _own_address(other) == {}, other


@pytest.mark.parametrize("command", [["ensemble", "a", "--out", "b"], ["external", "a", "b"], ["crossval"],
                                     ["compare"], ["ablation"], ["loso-diff", "a", "b"]])
def test_every_bootstrap_refuses_fewer_than_one_resample_before_it_starts(command, capsys):
    """`--n-boot 0` was checked by `external` alone; the experiments failed at their first interval, after training."""
    for value, reason in (("0", "must be at least 1, got 0"), ("many", "expected a whole number, got 'many'")):
        with pytest.raises(SystemExit) as info:
            main([*command, "--n-boot", value])
        assert info.value.code == 2 and f"argument --n-boot: {reason}" in capsys.readouterr().err


def test_a_run_folder_without_a_model_given_as_the_model_says_which_step_is_missing(tmp_path, capsys):
    """A run folder stands for its model where a checkpoint is expected (predict, export, external, lineage); one
    that has none yet says so instead of `not a checkpoint`."""
    run = tmp_path / "runs" / "r"
    (run / "stores").mkdir(parents=True)
    (run / "config.yaml").write_text("run:\n  name: elsewhere\n  storage_path: /nowhere\n")  # as moved or copied
    for command in (["predict", str(run), str(tmp_path)], ["lineage", str(run)]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert f"{run}: a run folder without a model of its own yet ({run / 'stages.json'}: no finished stage 2 in " \
            "run 'r'); finish its stage 2 first, or name a stage-2 checkpoint folder instead" in err, err
        assert "--checkpoint" not in err
    # a folder name YAML would read as a date, and a path with " #": taken as they are
    for name in ("2026-12-01", "my runs #2/cpu"):
        odd = tmp_path / "odd" / name
        (odd / "stores").mkdir(parents=True)
        (odd / "config.yaml").write_text("run:\n  name: x\n")
        assert main(["lineage", str(odd)]) == 1
        assert f"({odd / 'stages.json'}: no finished stage 2 in run '{odd.name}')" in capsys.readouterr().err
