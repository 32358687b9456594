"""Bad input, as a careless or hostile user gives it, through every entry point it reaches (issue 13).

Each case: the message names the file or key and the reason, the run goes on or stops as documented in
docs/reliability.md, and nothing is lost (every file is either used or in the rejects) or left behind
(no temporary files). Generated files only; no Ray (the pipeline's data step runs without it).
"""

import csv
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from helpers import ROOT, ctrl_c_as_at_a_terminal, textured
from msbt.cli import main
from msbt.config import ConfigError, load_config
from msbt.data.discovery import DataError, discover, fs_name
from msbt.data.preprocess import split_items, ultrasound_arrays
from msbt.images.imagefile import ImageError, read_image

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
PYTHON = sys.executable


def png(path: Path, seed: int, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), textured(seed, size))
    return path


def tree(root: Path, per_class: int = 4, classes=("benign", "malignant")) -> Path:
    for c, label in enumerate(classes):
        for k in range(per_class):
            png(root / label / f"{label[0]}{k}.png", 100 * c + k)
    return root


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming width x height, with a tiny compressed body (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def run_cli(*args, timeout=60, env=None):
    """The CLI in its own process (for signals, privileges and start-up timing)."""
    return subprocess.run([PYTHON, "-m", "msbt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def no_temp_files(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


def read_rejects(path: Path) -> dict[str, str]:
    with path.open(newline="", encoding="utf-8") as handle:
        return {row["path"]: row["reason"] for row in csv.DictReader(handle)}


def scan_and_split(root: Path, out: Path, *extra: str) -> tuple[int, dict, list]:
    """`msbt scan --rejects` then `msbt split`; returns split's exit code, its rejects and split rows."""
    rc_scan = main(["scan", str(root), "--rejects", str(out / "scan_rejects.csv"), *extra])
    rc = main(["split", str(root), "--out", str(out / "split"), "--set", "data.folds=2", *extra])
    assert rc_scan == rc
    if rc:
        return rc, {}, []
    assert read_rejects(out / "scan_rejects.csv") == read_rejects(out / "split" / "rejects.csv")
    with (out / "split" / "split.csv").open(newline="", encoding="utf-8") as handle:
        return rc, read_rejects(out / "split" / "rejects.csv"), list(csv.DictReader(handle))


def pipeline_data_step(tmp_path: Path, ultrasound: Path, *extra: str):
    """The pipeline's data step (scan, rejects.csv, split) and the Ray Data per-file function on its split."""
    from msbt.data.prepare import prepare_data

    micro = tree(tmp_path / "micro", 3, ("lineA", "lineB"))
    config = load_config([], [f"data.microscope={micro}", f"data.ultrasound={ultrasound}",
                              f"run.storage_path={tmp_path / 'runs'}", "run.name=r", "data.folds=2", *extra])
    prepared = prepare_data(config, modalities=("ultrasound",))["ultrasound"]
    items = split_items(prepared.folder, prepared.discovery.root, prepared.discovery.classes, 0)
    batch = {k: np.array([item[k] for item in items]) for k in items[0]}
    table = ultrasound_arrays(batch, image_size=32, aspect="pad", intensity="none")
    return prepared, items, table


# ---------------------------------------------------------------------------------------------------
# A tiny real stage-2 checkpoint for predict/export (tiny_cnn at 32 px, untrained: the inputs are the subject)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import keras

    from msbt.config import HeadConfig, StageConfig
    from msbt.model.checkpoint import MODEL_FILE, write_manifest
    from msbt.model.models import build_model

    stage = StageConfig(backbone="tiny_cnn", weights="none", image_size=32,
                        head=HeadConfig((4,), 0.0), monitor="val_auc")
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint_000001"
    folder.mkdir()
    keras.utils.set_random_seed(0)
    build_model(stage, 2).save(folder / MODEL_FILE)
    write_manifest(folder, stage_config=stage, class_names=["benign", "malignant"], metrics={}, best_epoch=1)
    return folder


def predict_rows(checkpoint: Path, inputs, out: Path) -> tuple[int, dict, dict]:
    """`msbt predict --out`: exit code, {path: label} predicted and {path: reason} rejected."""
    rc = main(["predict", str(checkpoint), *map(str, inputs), "--out", str(out)])
    if not out.exists():
        return rc, {}, {}
    with out.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return rc, {r["path"]: r["label"] for r in rows if r["label"]}, {r["path"]: r["reason"] for r in rows if not r["label"]}


# ---------------------------------------------------------------------------------------------------
# 1. Class folders that cannot be read or hold nothing usable


def test_empty_class_is_an_error_naming_the_folder(tmp_path, capsys):
    root = tree(tmp_path / "data")
    for f in (root / "malignant").iterdir():
        f.unlink()
    (root / "malignant" / "notes.txt").write_text("x")
    assert main(["split", str(root), "--out", str(tmp_path / "out"), "--set", "data.folds=2"]) == 1
    err = capsys.readouterr().err
    assert f"{root / 'malignant'}: class 'malignant' has no usable image: all 1 of its files were rejected" in err
    assert "notes.txt: not an image file" in err
    assert not (tmp_path / "out" / "split.csv").exists()


@pytest.mark.skipif(not Path("/usr/bin/setpriv").exists() and os.geteuid() == 0, reason="needs setpriv as root")
def test_unreadable_class_folder_is_an_error_not_a_missing_class(tmp_path):
    root = tree(tmp_path / "data")
    os.chmod(root / "malignant", 0)
    try:
        # As root, drop the capabilities that bypass file permissions (as a hospital user would lack them).
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"] if os.geteuid() == 0 else []
        start = time.monotonic()
        result = subprocess.run([*prefix, PYTHON, "-m", "msbt.cli", "split", str(root), "--out", str(tmp_path / "o"),
                                 "--classes", "benign", "malignant", "--set", "data.folds=2"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.chmod(root / "malignant", 0o755)
    assert result.returncode == 1, result.stdout
    assert f"{root / 'malignant'}: class folder cannot be read (Permission denied)" in result.stderr
    assert not (tmp_path / "o" / "split.csv").exists()
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------------------------------------------
# 2. Huge images: rejected from the header, before decoding


def test_huge_image_is_rejected_from_its_header_everywhere(tmp_path, checkpoint):
    root = tree(tmp_path / "data")
    bomb = huge_png(root / "benign" / "bomb.png", 40000, 40000)
    with pytest.raises(ImageError, match="bomb.png: image too large \\(40000x40000 = 1600000000 px; limit data.max_pixels"):
        read_image(bomb)
    rc, rejects, rows = scan_and_split(root, tmp_path / "out")
    assert rc == 0 and rejects == {str(bomb): "image too large (40000x40000 = 1600000000 px; limit "
                                              "data.max_pixels = 64000000)"}
    assert len(rows) == 8  # nothing else lost
    prepared, items, table = pipeline_data_step(tmp_path, root)
    assert read_rejects(prepared.folder / "rejects.csv") == rejects and table.num_rows == 8
    rc, predicted, rejected = predict_rows(checkpoint, [root / "benign"], tmp_path / "p.csv")
    assert rc == 0 and len(predicted) == 4 and rejected[str(bomb)].startswith("image too large")
    assert no_temp_files(tmp_path) == []


def test_pixel_limit_is_configurable(tmp_path):
    root = tree(tmp_path / "data")
    png(root / "benign" / "big.png", 7, 128)  # 16384 px
    rc, rejects, rows = scan_and_split(root, tmp_path / "out", "--set", "data.max_pixels=10000")
    assert rc == 0 and list(rejects.values()) == ["image too large (128x128 = 16384 px; limit data.max_pixels = 10000)"]
    with pytest.raises(ConfigError, match="`data.max_pixels` must be between 64 and 2\\*\\*30"):
        load_config([], ["data.max_pixels=0"])


# ---------------------------------------------------------------------------------------------------
# 3. Odd file system entries: names that are not UTF-8, link loops, FIFOs, devices, Ctrl-C


def test_non_utf8_file_names_round_trip_through_split_pipeline_and_predict(tmp_path, checkpoint, capsys):
    root = tree(tmp_path / "data")
    raw = os.fsencode(root / "malignant") + b"/caf\xe9 l\xe9sion.png"
    with open(raw, "wb") as handle:  # a str path cannot carry these bytes: write through the bytes path
        handle.write(cv2.imencode(".png", textured(77))[1].tobytes())
    rc, rejects, rows = scan_and_split(root, tmp_path / "out")
    assert rc == 0 and rejects == {}
    escaped = [r["relpath"] for r in rows if "caf" in r["relpath"]]
    assert escaped == ["malignant/caf\\xe9 l\\xe9sion.png"]  # valid UTF-8 text in split.csv...
    assert os.fsencode(root / fs_name(escaped[0])) == raw  # ...that names the very file again
    prepared, items, table = pipeline_data_step(tmp_path, root)
    assert table.num_rows == 9 and "malignant/caf\\xe9 l\\xe9sion.png" in table["source"].to_pylist()
    capsys.readouterr()
    rc, predicted, rejected = predict_rows(checkpoint, [root / "malignant"], tmp_path / "p.csv")
    assert rc == 0 and rejected == {} and f"{root}/malignant/caf\\xe9 l\\xe9sion.png" in predicted
    assert "caf" in capsys.readouterr().out


def test_link_loops_fifos_and_devices_are_rejected_never_followed_or_opened(tmp_path, checkpoint):
    root = tree(tmp_path / "data")
    os.symlink("loop.png", root / "benign" / "loop.png")  # a link to itself
    os.mkfifo(root / "benign" / "fifo.png")  # opened for reading, it would block forever
    os.symlink("/dev/zero", root / "benign" / "zero.png")  # endless when read
    os.symlink(".", root / "benign" / "again")  # a folder link to itself: a walk loop
    (root / "malignant" / "real").mkdir()
    png(root / "malignant" / "real" / "m9.png", 9)
    os.symlink("real", root / "malignant" / "linked")  # a folder reached twice: walked once
    start = time.monotonic()
    rc, rejects, rows = scan_and_split(root, tmp_path / "out")
    assert time.monotonic() - start < 30
    b = root / "benign"
    walked = "folder already walked (a symbolic link loop or a second link to it); not entered again"
    assert rc == 0 and rejects == {
        str(b / "again"): walked,
        str(b / "fifo.png"): "not a regular file (a FIFO)",
        str(b / "loop.png"): "unreadable (Too many levels of symbolic links)",
        str(b / "zero.png"): "not a regular file (a character device)",
        str(root / "malignant" / "real"): walked,  # reached first through `linked`
    }
    assert len([r for r in rows if r["label"] == "malignant"]) == 5  # m9 once, not twice
    assert len(rows) == 9
    rc, predicted, rejected = predict_rows(checkpoint, [b / "loop.png", b / "fifo.png", b / "zero.png", b / "b0.png"],
                                           tmp_path / "p.csv")
    assert rc == 0 and list(predicted) == [str(b / "b0.png")]
    assert rejected == {str(b / "loop.png"): "unreadable (Too many levels of symbolic links)",
                        str(b / "fifo.png"): "not a regular file (a FIFO)",
                        str(b / "zero.png"): "not a regular file (a character device)"}
    assert time.monotonic() - start < 60


@pytest.mark.slow
# a scan has nothing to resume: the line says no more than what happened (it once told to rerun with --resume,
# an option scan does not have)
@pytest.mark.parametrize("sig, code, line", [(signal.SIGINT, 130, "msbt: interrupted\n"),
                                             (signal.SIGTERM, 143, "msbt: stopped (SIGTERM)\n")])
def test_first_ctrl_c_or_sigterm_stops_a_scan(tmp_path, sig, code, line):
    """One large image linked 400 times: a scan of several seconds, stopped by one SIGINT (Ctrl-C) or
    SIGTERM (what `ray job stop` sends a job's driver, SIGKILL following 3 s later)."""
    root = tmp_path / "data"
    first = png(root / "benign" / "b0000.png", 1, 1500)
    for k in range(1, 400):
        os.link(first, root / "benign" / f"b{k:04d}.png")
    png(root / "malignant" / "m.png", 2)
    proc = subprocess.Popen([PYTHON, "-m", "msbt.cli", "scan", str(root)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=ctrl_c_as_at_a_terminal)
    time.sleep(4)  # imports done, decoding under way
    assert proc.poll() is None, "the scan ended before the signal: make it longer"
    sent = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    stopped = time.monotonic() - sent
    assert proc.returncode == code and line in err and "Traceback" not in err, err
    assert stopped < 3.0, f"took {stopped:.1f} s after the first signal"


def test_a_stopped_command_says_what_to_do_next_only_where_there_is_something_to_continue():
    from msbt.cli import _stop_line, build_parser

    parse = build_parser().parse_args
    assert _stop_line(parse(["stage2"]), "interrupted") == (
        "msbt: interrupted; finished steps and checkpoints are kept: rerun the same command with --resume to continue")
    assert _stop_line(parse(["preprocess"]), "stopped (SIGTERM)") == (
        "msbt: stopped (SIGTERM); finished steps are kept: rerun the same command to continue")
    assert _stop_line(parse(["crossval", "--fresh"]), "interrupted") == (  # the same command deletes them again
        "msbt: interrupted; finished steps are kept: rerun the command without --fresh to continue")
    assert _stop_line(parse(["crossval"]), "interrupted").endswith("rerun the same command to continue")
    for argv in (["serve", "m"], ["stream", "m", "s"], ["predict", "m", "x.png"], ["scan", "d"]):
        assert _stop_line(parse(argv), "stopped (SIGTERM)") == "msbt: stopped (SIGTERM)", argv


# Run in a child process: a SIGTERM that finds no msbt handler in pytest's own process ends the test process,
# and xdist then reports only "crashed" (it happened in 2 of about 8 whole suites, cause not found; see the
# test's docstring). Here such an end is a failed assertion with the child's exit status and output.
SIGTERM_CHILD = r'''
import os, signal, sys, time
from msbt import cli

def sigterm_turned_into(kind):
    def command(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises here
        except KeyboardInterrupt:
            raise kind() from None
        return 0
    return command

def ctrl_c(args):
    raise KeyboardInterrupt()

before = signal.getsignal(signal.SIGTERM)
for name, command in (("KeyboardInterrupt", sigterm_turned_into(KeyboardInterrupt)),
                      ("RuntimeError", sigterm_turned_into(RuntimeError)), ("ctrl-c", ctrl_c)):
    cli._cmd_scan = command
    code = cli.main(["scan", sys.argv[1]])
    sys.stderr.flush()
    os.write(2, f"\n== {name} {code} {signal.getsignal(signal.SIGTERM) is before}\n".encode())
'''


def test_sigterm_is_named_even_when_a_library_turns_it_into_another_exception(tmp_path):
    """Ray's blocking ``ray.get`` on the main thread runs pending signal handlers itself and raises a plain
    KeyboardInterrupt for msbt's ``Stopped``: a SIGTERM during a stage exited 130 with the Ctrl-C line after the
    SIGTERM one. The commands below do what Ray does (and what a library that wraps errors would); the CLI still
    exits 143 with the SIGTERM line alone, puts back the handler it found, and the next command's Ctrl-C is Ctrl-C
    again. In a child process of its own: in two whole suites (108621c's clean clone, caa7db5's CI) the xdist
    process that ran this test in-process died, and xdist said no more than that."""
    proc = subprocess.run([PYTHON, "-c", SIGTERM_CHILD, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, f"the commands' process ended with {proc.returncode}:\n{proc.stderr}"
    parts = re.split(r"^== (\S+) (-?\d+) (True|False)$", proc.stderr, flags=re.M)
    results = {name: (int(code), kept == "True", err) for err, name, code, kept in zip(*[iter(parts)] * 4)}
    assert list(results) == ["KeyboardInterrupt", "RuntimeError", "ctrl-c"], proc.stderr
    for kind in ("KeyboardInterrupt", "RuntimeError"):
        code, kept, err = results[kind]
        assert code == 143 and kept, (kind, code, kept, err)
        assert err.count("msbt: stopped (SIGTERM)") == 1 and "interrupted" not in err and "error" not in err, err
    code, kept, err = results["ctrl-c"]
    assert code == 130 and kept and "msbt: interrupted" in err, (code, kept, err)


# ---------------------------------------------------------------------------------------------------
# 4. Files only part of which would be used


def partial_files(folder: Path) -> dict[str, Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (128, 128, 3)).astype(np.uint8)
    data = cv2.imencode(".jpg", noise)[1].tobytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2] + b"\xff\xd9")  # end marker put back
    frames = [Image.fromarray(textured(3)), Image.fromarray(textured(4))]
    frames[0].save(folder / "anim.png", "GIF", save_all=True, append_images=frames[1:])
    frames[0].save(folder / "pages.tif", "TIFF", save_all=True, append_images=frames[1:])
    frames[0].save(folder / "still_gif.png", "GIF")
    return {name: folder / name for name in ("cut.jpg", "anim.png", "pages.tif", "still_gif.png")}


PARTIAL_REASONS = {
    "anim.png": "a GIF file named '.png'; GIF with 2 pages/frames: only the first would be used",
    "pages.tif": "TIFF with 2 pages/frames: only the first would be used",
    "still_gif.png": "a GIF file named '.png'",
}


def test_partial_files_are_rejected_with_the_reason_or_used_with_a_warning(tmp_path, checkpoint, capsys):
    root = tree(tmp_path / "data")
    files = partial_files(root / "benign")
    rc, rejects, rows = scan_and_split(root, tmp_path / "reject")
    assert rc == 0 and len(rows) == 8
    reasons = {Path(p).name: r for p, r in rejects.items()}
    assert reasons["cut.jpg"].startswith("truncated JPEG (its last ") and "filled grey" in reasons["cut.jpg"]
    for name, reason in PARTIAL_REASONS.items():
        assert reasons[name] == f"{reason} (data.on_partial: reject)"
    capsys.readouterr()
    rc, rejects, rows = scan_and_split(root, tmp_path / "warn", "--set", "data.on_partial=warn")
    assert rc == 0 and rejects == {} and len(rows) == 12  # used...
    out = capsys.readouterr().out
    for name, reason in PARTIAL_REASONS.items():
        assert f"warning {files[name]}: {reason} (used; data.on_partial: warn)" in out  # ...and said
    prepared, items, table = pipeline_data_step(tmp_path, root)
    assert {Path(p).name for p in read_rejects(prepared.folder / "rejects.csv")} == set(files)
    rc, predicted, rejected = predict_rows(checkpoint, [root / "benign"], tmp_path / "p.csv")
    assert {Path(p).name for p in rejected} == set(files) and len(predicted) == 4


# ---------------------------------------------------------------------------------------------------
# 5. Labels that contradict each other, manifests, class names


def test_same_image_under_two_classes_is_an_error_or_both_are_rejected(tmp_path, capsys):
    root = tree(tmp_path / "data")
    (root / "malignant" / "copy.png").write_bytes((root / "benign" / "b1.png").read_bytes())
    assert main(["split", str(root), "--out", str(tmp_path / "o"), "--set", "data.folds=2",
                 "--set", "data.on_conflict=error"]) == 1
    err = capsys.readouterr().err
    assert f"{root / 'benign' / 'b1.png'} (benign) and {root / 'malignant' / 'copy.png'} (malignant) are the same " \
           "file content under two classes" in err
    assert not (tmp_path / "o" / "split.csv").exists()
    rc, rejects, rows = scan_and_split(root, tmp_path / "out")  # the default: both copies rejected
    assert rc == 0 and set(rejects) == {str(root / "benign" / "b1.png"), str(root / "malignant" / "copy.png")}
    assert "contradictory labels" in rejects[str(root / "benign" / "b1.png")]
    assert len(rows) == 7
    with pytest.raises(DataError, match="same file content under two classes"):
        pipeline_data_step(tmp_path, root, "data.on_conflict=error")


def manifest(path: Path, root: Path, groups: bool, encoding="utf-8", bom=False, extra_row="") -> Path:
    lines = ["path,label,group"] + [
        f"{p.relative_to(path.parent).as_posix()},{p.parent.name},{'one' if groups else p.stem}"
        for p in sorted(root.rglob("*.png"))]
    text = "\n".join(lines + ([extra_row] if extra_row else [])) + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    return path


def test_manifest_with_one_group_is_an_error_not_empty_splits(tmp_path, capsys):
    root = tree(tmp_path / "data", 6)
    csv_file = manifest(tmp_path / "m.csv", root, groups=True)
    assert main(["split", str(csv_file), "--out", str(tmp_path / "o"), "--set", "data.grouping=manifest"]) == 1
    assert "val, test would be empty: 12 images form only 1 group(s) (grouping: manifest)" in capsys.readouterr().err
    assert not (tmp_path / "o" / "split.csv").exists()
    with pytest.raises(DataError, match="would be empty"):
        pipeline_data_step(tmp_path, csv_file, "data.grouping=manifest")


def test_bom_manifest_is_read_and_latin1_is_an_error_naming_file_and_line(tmp_path, capsys):
    root = tree(tmp_path / "data")
    bom = manifest(tmp_path / "bom.csv", root, groups=False, bom=True)
    assert len(discover(bom).records) == 8
    latin = manifest(tmp_path / "latin.csv", root, groups=False, encoding="latin-1",
                     extra_row="data/benign/l\xe9sion.png,benign,x")
    assert main(["scan", str(latin)]) == 1
    assert f"{latin}:10: not UTF-8 (byte 0xe9)" in capsys.readouterr().err
    with pytest.raises(DataError, match="latin.csv:10: not UTF-8"):
        pipeline_data_step(tmp_path, latin)


def test_class_folder_differing_in_case_fails_before_ray_starts(tmp_path):
    root = tree(tmp_path / "data", 2, ("Benign", "malignant"))
    micro = tree(tmp_path / "micro", 2, ("a", "b"))
    start = time.monotonic()
    result = run_cli("run", "--set", f"data.ultrasound={root}", "--set", f"data.microscope={micro}",
                     "--set", f"run.storage_path={tmp_path / 'runs'}")
    took = time.monotonic() - start
    assert result.returncode == 1
    assert f"{root}: class 'benign' not found (found: Benign, malignant); 'Benign' differs only in case" in result.stderr
    assert "Ray" not in result.stderr + result.stdout  # no cluster was started
    assert took < 5.0 + 3.0  # 5 s as asked, plus this machine's interpreter start under load
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------
# 6. Config values of the right type that cannot work


@pytest.mark.parametrize("override, key", [
    ("stage1.batch_size=0", "stage1.batch_size"),
    ("stage2.epochs=-1", "stage2.epochs"),
    ("stage1.image_size=0", "stage1.image_size"),
    ("preprocess.image_size=8", "preprocess.image_size"),
    ("stage1.learning_rate=.nan", "stage1.learning_rate"),
    ("stage1.learning_rate=nan", "stage1.learning_rate"),
    ("stage2.learning_rate=-0.1", "stage2.learning_rate"),
    ("stage2.head.dropout=1.5", "stage2.head.dropout"),
    ("stage2.ema=1", "stage2.ema"),  # an average that never moves
    ("stage2.ema=-0.5", "stage2.ema"),
    ("stage2.mixup=-0.2", "stage2.mixup"),
    ("stage1.mixup=.inf", "stage1.mixup"),
    ("data.folds=0", "data.folds"),
    ("data.folds=1000", "data.folds"),
    ("data.split=[1,0,0]", "data.split"),
    ("data.split=[0.5,0.2,0.1]", "data.split"),
    ("run.num_workers=0", "run.num_workers"),
    ("run.checkpoints_to_keep=0", "run.checkpoints_to_keep"),
    ("run.worker_niceness=-5", "run.worker_niceness"),
    ("run.worker_niceness=20", "run.worker_niceness"),
    ("preprocess.build_ray_min_files=-1", "preprocess.build_ray_min_files"),
    ("preprocess.build=cluster", "preprocess.build"),
    ("tune.num_samples=0", "tune.num_samples"),
    ("preprocess.block_size=150", "preprocess.block_size"),
    # each of these failed only inside training, after Ray had started (a helper's bad-input probe)
    ("stage1.monitor=val_foo", "stage1.monitor"),
    ("run.train_seed=-1", "run.train_seed"),
    ("data.seed=-1", "data.seed"),
    ("data.seed=4294967296", "data.seed"),
    ("tune.seed=-3", "tune.seed"),
    ("data.ultrasound_classes=[benign]", "data.ultrasound_classes"),
    ("data.ultrasound_classes=[benign,malignant,normal]", "data.ultrasound_classes"),
    ("data.ultrasound_classes=[benign,benign]", "data.ultrasound_classes"),
    ("data.microscope_classes=[hela]", "data.microscope_classes"),
    ("serve.port=70000", "serve.port"),
    ("serve.port=-1", "serve.port"),
    ("serve.host=", "serve.host"),
    ("serve.host=http://127.0.0.1", "serve.host"),  # a URL, not a host: first used by Ray Serve, after Ray started
    ("serve.host=127.0.0.1:8000", "serve.host"),
    ("serve.host=my host", "serve.host"),
    ("serve.host=999.1.1.1", "serve.host"),  # no IP address, and a name's last label is never all digits
    ("serve.max_request_mb=0", "serve.max_request_mb"),
    ("serve.batch_wait_timeout_s=-1", "serve.batch_wait_timeout_s"),
])
def test_config_ranges_are_checked_when_read(override, key, capsys):
    with pytest.raises(ConfigError, match=f"--set {re.escape(override)}.*`{re.escape(key)}` must be"):
        load_config([], [override])
    assert main(["config", "--set", override]) == 1
    assert f"`{key}` must be" in capsys.readouterr().err


def test_serve_hosts_of_every_usual_form_are_accepted():
    for host in ("127.0.0.1", "0.0.0.0", "::1", "localhost", "gpu-node-3.hospital.example", "node7.example."):
        assert load_config([], [f"serve.host={host}"]).serve.host == host
    assert load_config([], ["serve.host='::'"]).serve.host == "::"  # YAML reads a bare :: as a mapping


def test_config_numbers_and_broken_values_from_the_command_line(capsys):
    assert load_config([], ["stage1.learning_rate=1e-3"]).stage1.learning_rate == 0.001
    assert load_config([], ["stage1.learning_rate=2E-4"]).stage1.learning_rate == 0.0002
    assert load_config([], ["run.name=1e3"]).run.name == "1e3"  # a string where a string is wanted
    with pytest.raises(ConfigError, match=r"--set data.split=\[1: the value of `data.split` is not valid YAML"):
        load_config([], ["data.split=[1"])
    assert main(["config", "--set", "stage2.learning_rate=1e-3"]) == 0
    assert "learning_rate: 0.001" in capsys.readouterr().out


def test_config_error_fails_run_before_ray(tmp_path):
    start = time.monotonic()
    result = run_cli("run", "--set", "stage1.batch_size=0", "--set", f"run.storage_path={tmp_path}")
    assert result.returncode == 1 and "`stage1.batch_size` must be >= 1, got 0" in result.stderr
    assert time.monotonic() - start < 8.0 and not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------
# 7. Integrity of everything a prediction depends on


def copy_checkpoint(checkpoint: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(checkpoint, to)
    return to


def rewrite_manifest(folder: Path, change, rehash: bool = False) -> None:
    import json

    from msbt.model.checkpoint import DIGEST_KEY, json_digest

    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    if rehash:  # a careful forger: every hash made to match again
        manifest[DIGEST_KEY] = json_digest(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_swapped_class_names_are_detected_by_predict_and_export(tmp_path, checkpoint, capsys):
    folder = copy_checkpoint(checkpoint, tmp_path / "swapped")
    rewrite_manifest(folder, lambda m: m.__setitem__("class_names", ["malignant", "benign"]))
    images = tree(tmp_path / "data", 1)
    rc, predicted, _ = predict_rows(folder, [images], tmp_path / "p.csv")
    assert rc == 1 and predicted == {} and not (tmp_path / "p.csv").exists()
    err = capsys.readouterr().err
    assert f"{folder / 'manifest.json'}: changed after it was written" in err and "class names" in err
    assert main(["export", str(folder), str(tmp_path / "exp")]) == 1
    assert "changed after it was written" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


def test_truncated_model_with_matching_hash_names_the_file(tmp_path, checkpoint, capsys):
    from msbt.model.checkpoint import sha256_file

    folder = copy_checkpoint(checkpoint, tmp_path / "cut")
    model = folder / "model.keras"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    rewrite_manifest(folder, lambda m: m.__setitem__("model_sha256", sha256_file(model)), rehash=True)
    rc, predicted, _ = predict_rows(folder, [tree(tmp_path / "data", 1)], tmp_path / "p.csv")
    err = capsys.readouterr().err
    assert rc == 1 and f"{model}: cannot be loaded as a Keras model (damaged or truncated file?)" in err
    assert "File not found" not in err.split("file?):")[0]


@pytest.mark.slow
def test_edited_export_threshold_is_detected(tmp_path, checkpoint, capsys):
    import json

    assert main(["export", str(checkpoint), str(tmp_path / "exp"), "--threshold", "0.3"]) == 0
    record = json.loads((tmp_path / "exp" / "export.json").read_text())
    record["threshold"]["value"] = 0.9
    (tmp_path / "exp" / "export.json").write_text(json.dumps(record))
    capsys.readouterr()
    rc, predicted, _ = predict_rows(tmp_path / "exp", [tree(tmp_path / "data", 1)], tmp_path / "p.csv")
    assert rc == 1 and predicted == {}
    assert f"{tmp_path / 'exp' / 'export.json'}: changed after export" in capsys.readouterr().err
    assert no_temp_files(tmp_path) == []


def test_a_store_without_rows_is_refused_by_name_by_every_reader(tmp_path):
    """A ``store.json`` with no Parquet file beside it (an emptied or hand-made folder): every step that reads
    rows (a stage's small-store read, Ray Data's read for a large store or for fast mode, a fold's re-split) says
    so, naming the folder, before any read is planned."""
    import json

    from msbt.data.store import STORE_FILE, Store, StoreError, write_resplit
    from msbt.train.runner import split_tables

    folder = tmp_path / "store"
    folder.mkdir()
    (folder / STORE_FILE).write_text(json.dumps({"kind": "ultrasound", "image_shape": [32, 32, 3],
                                                 "classes": ["benign", "malignant"], "settings": {}}))
    store = Store.open(folder)  # the identity alone opens
    assert store.files() == [] and store.columns() == []
    message = f"{folder.resolve()}: no Parquet files"
    for read in (store.data_files, lambda: store.read_tables(["label_index"], "train"),
                 lambda: store.ray_dataset(["label_index"]), lambda: split_tables(folder, "train"),
                 lambda: write_resplit(folder, {}, tmp_path / "fold")):
        with pytest.raises(StoreError, match=re.escape(message)):
            read()
    assert not (tmp_path / "fold").exists()


@pytest.mark.parametrize("value", [float("nan"), -3, 1.5, "abc", None, True])
def test_a_damaged_run_threshold_is_refused_naming_the_file(tmp_path, value):
    """The run's metrics.json gives predict, export, stream, serve and external their threshold: a NaN there
    labelled every image benign (exit 0), and an export sealed it into export.json."""
    import json

    from msbt.serve.predict import find_threshold

    checkpoint = tmp_path / "run" / "stage2" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    metrics = tmp_path / "run" / "metrics.json"
    metrics.write_text(json.dumps({"checkpoint": str(checkpoint), "threshold": value}))
    with pytest.raises(ValueError, match=re.escape(f"{metrics}: threshold {value!r} is not a probability")):
        find_threshold(checkpoint)
    assert find_threshold(checkpoint, 0.4)[0].value == 0.4  # --threshold still chooses one
    metrics.write_text(json.dumps({"checkpoint": str(checkpoint), "threshold": 0.3}))
    assert find_threshold(checkpoint)[0].value == 0.3
    metrics.write_text(json.dumps([str(checkpoint), 0.3]))
    with pytest.raises(ValueError, match=re.escape(f"{metrics}: not a run's metrics")):
        find_threshold(checkpoint)


def test_no_command_writes_into_the_data_it_reads(tmp_path, checkpoint, capsys):
    """An output path inside a folder being read (or onto one of its images) is refused before anything is read
    or written: a CSV replaced a scanned image, heatmap PNGs were scored as images by the next predict, and a
    split in a class folder became that class's rejects."""
    root = tree(tmp_path / "data", 2)
    image = root / "benign" / "b0.png"
    before = image.read_bytes()
    cases = [
        (["scan", str(root), "--rejects", str(image)], "--rejects", image),
        (["split", str(root), "--out", str(root / "benign" / "sub")], "--out", root / "benign" / "sub"),
        (["predict", str(checkpoint), str(root / "benign"), "--out", str(image)], "--out", image),
        (["predict", str(checkpoint), str(root), "--heatmaps", str(root / "maps")], "--heatmaps", root / "maps"),
    ]
    for argv, option, out in cases:
        assert main(argv) == 1, argv
        assert f"msbt: error: {option} {out}: inside the data being read" in capsys.readouterr().err, argv
    assert image.read_bytes() == before
    assert not (root / "benign" / "sub").exists() and not (root / "maps").exists()
    # `msbt stream` of a folder of frames: its CSV, video and heatmap folder (its frames would be read next time)
    import shutil

    shutil.copytree(root / "benign", tmp_path / "x-gradcam")  # e.g. the heatmaps of an earlier stream, streamed
    for source, extra, option in ((root / "benign", ["--out", str(root / "benign" / "s.csv")], "--out"),
                                  (root / "benign", ["--video", str(root / "benign" / "s.mp4")], "--video"),
                                  (tmp_path / "x-gradcam", ["--out", str(tmp_path / "x.csv"), "--heatmaps", "5"],
                                   "--heatmaps")):
        assert main(["stream", str(checkpoint), str(source), *extra]) == 1, extra
        assert f"msbt: error: {option} " in capsys.readouterr().err, extra
    assert not list(root.rglob("s.*")) and not (tmp_path / "x.csv").exists()
    # a manifest's images live in their own folders: an output there is refused as well, naming the manifest
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,label\n{image},benign\n")
    assert main(["predict", str(checkpoint), str(manifest), "--out", str(root / "benign" / "p.csv")]) == 1
    assert f"inside {root / 'benign'}, a folder of images that {manifest} lists" in capsys.readouterr().err
    # a link to a manifest elsewhere: its relative rows are read from the link's folder, as the scan reads them
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "rel.csv").write_text("path,label\ndata/benign/b0.png,benign\n")
    (tmp_path / "rel.csv").symlink_to(tmp_path / "lists" / "rel.csv")
    assert main(["predict", str(checkpoint), str(tmp_path / "rel.csv"), "--out", str(root / "benign" / "q.csv")]) == 1
    assert "a folder of images that" in capsys.readouterr().err and not (root / "benign" / "q.csv").exists()
    # --heatmaps onto an existing file: named before the model loads (it was a bare "[Errno 17] File exists")
    (tmp_path / "taken.csv").write_text("x")
    assert main(["predict", str(checkpoint), str(image), "--heatmaps", str(tmp_path / "taken.csv")]) == 1
    assert f"--heatmaps {tmp_path / 'taken.csv'}: a file is there" in capsys.readouterr().err
    assert (tmp_path / "taken.csv").read_text() == "x"
    # onto an image file elsewhere: refused too; next to the data, not inside it: written
    other = png(tmp_path / "other.png", 5)
    assert main(["scan", str(root), "--rejects", str(other)]) == 1
    assert f"--rejects {other}: an image file is there" in capsys.readouterr().err
    assert main(["scan", str(root), "--rejects", str(tmp_path / "rejects.csv")]) == 0
    assert (tmp_path / "rejects.csv").is_file()


def test_a_class_named_twice_on_the_command_line_is_refused(tmp_path, capsys):
    root = tree(tmp_path / "data", 2)
    assert main(["split", str(root), "--out", str(tmp_path / "split"), "--classes", "benign", "benign"]) == 1
    assert "--classes names a class twice: benign benign" in capsys.readouterr().err
    assert not (tmp_path / "split").exists()


def test_serve_options_are_checked_before_ray_starts(tmp_path, capsys):
    """--port 70000 started Ray, printed the address, then failed with 70 lines of Ray's tracebacks; 0 was
    silently ignored."""
    for port in ("70000", "0"):
        assert main(["serve", str(tmp_path), "--port", port]) == 1
        err = capsys.readouterr().err
        assert f"command line (--host, --port): `serve.port` must be a TCP port in [1, 65535], got {port}" in err


def test_export_int8_options_are_checked_before_anything_loads(tmp_path, checkpoint, capsys):
    out = tmp_path / "exp"
    for argv, message in [
        (["--int8-max-auc-change", "-1"], "--int8-store and --int8-max-auc-change apply to --int8 only"),
        (["--int8", "--int8-max-auc-change", "nan"], "--int8-max-auc-change must be an AUC difference in [0, 1], got nan"),
        (["--int8", "--int8-max-auc-change", "inf"], "--int8-max-auc-change must be an AUC difference in [0, 1], got inf"),
        # its name until the bound became two-sided still reaches the same check
        (["--int8", "--int8-max-auc-drop", "-0.5"], "--int8-max-auc-change must be an AUC difference in [0, 1], got -0.5"),
    ]:
        assert main(["export", str(checkpoint), str(out), *argv]) == 1, argv
        assert message in capsys.readouterr().err, argv
        assert not out.exists()


def test_a_manifest_whose_rows_all_fail_says_why(tmp_path, capsys):
    """Paths relative to the wrong folder: 'no usable images (2 rejected)' and nothing more, no --rejects
    written; a class whose only row named a missing file was said to hold no image files."""
    root = tree(tmp_path / "data", 2)
    wrong = tmp_path / "lists" / "m.csv"
    wrong.parent.mkdir()
    wrong.write_text("path,label\nbenign/b0.png,benign\nmalignant/m0.png,malignant\n")  # relative to data/
    rejects = tmp_path / "rejects.csv"
    assert main(["scan", str(wrong), "--rejects", str(rejects)]) == 1
    err = capsys.readouterr().err
    assert f"{wrong}: no usable images (2 rejected; e.g. {wrong.parent / 'benign' / 'b0.png'}: listed in the " \
           "manifest (line 2, label 'benign') but does not exist" in err
    assert len(rejects.read_text().splitlines()) == 3  # header and both rows
    half = tmp_path / "half.csv"
    half.write_text(f"path,label\n{root / 'benign' / 'b0.png'},benign\n{tmp_path / 'gone.png'},malignant\n")
    assert main(["scan", str(half)]) == 1
    assert (f"{half}: class 'malignant' has no usable image: all 1 of its rows were rejected; e.g. "
            f"{tmp_path / 'gone.png'}: listed in the manifest (line 3, label 'malignant') but does not exist"
            in capsys.readouterr().err)


def test_an_overlay_with_a_key_twice_or_not_utf8_is_refused_naming_the_file(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("stage1:\n  epochs: 3\n  epochs: 5\n")  # YAML's loader kept the last value silently
    with pytest.raises(ConfigError, match=re.escape(f"{twice}: not valid YAML (key 'epochs' is given twice")):
        load_config([twice])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("run:\n  name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"{latin}: not UTF-8 (byte 0xe9")):
        load_config([latin])


@pytest.mark.parametrize("identity, problem", [
    ([1, 2], "not a store identity (a JSON object was expected, found list)"),
    ({"kind": "ultrasound", "image_shape": [-4, 32, 3]}, "missing or invalid image_shape"),
    ({"kind": "ultrasound", "settings": {"image_size": -4}}, "missing or invalid settings"),
    ({"image_shape": [32, 32, 3], "settings": []}, "missing or invalid kind, settings"),
])
def test_a_damaged_store_identity_is_refused_naming_the_file(tmp_path, identity, problem):
    """A store.json without settings raised a KeyError; a negative image size reached OpenCV's resize."""
    import json

    from msbt.data.store import STORE_FILE, Store, StoreError

    (tmp_path / STORE_FILE).write_text(json.dumps(identity))
    with pytest.raises(StoreError, match=re.escape(f"{tmp_path / STORE_FILE}: {problem}")):
        Store.open(tmp_path)
    (tmp_path / STORE_FILE).write_text(json.dumps({"kind": "ultrasound", "image_shape": [32, 32, 3]}))
    with pytest.raises(StoreError, match=re.escape(f"{tmp_path / STORE_FILE}: no 'settings' recorded")):
        Store.open(tmp_path).settings


@pytest.mark.parametrize("text, problem", [
    ("{cut", "not valid JSON"),
    ("[]", "not a store summary (a JSON object was expected, found list)"),
    ('{"kind": "ultrasound", "files": 2, "empty_sources": []}', "no 'rows' recorded"),
    (None, "unreadable ([Errno 2]"),
])
def test_a_damaged_store_summary_is_refused_naming_the_file(tmp_path, text, problem):
    """Every later step opens the recorded store's summary.json: a damaged one gave a bare JSONDecodeError or
    KeyError: 'rows'."""
    import json

    from msbt.data.store import STORE_FILE, SUMMARY_FILE, Store, StoreError

    (tmp_path / STORE_FILE).write_text(json.dumps({"kind": "ultrasound", "image_shape": [32, 32, 3], "settings": {},
                                                   "classes": ["benign", "malignant"]}))
    if text is not None:
        (tmp_path / SUMMARY_FILE).write_text(text)
    with pytest.raises(StoreError, match=re.escape(f"{tmp_path / SUMMARY_FILE}: {problem}")):
        Store.open(tmp_path).summary()


def test_synth_cine_options_are_checked(tmp_path, capsys):
    """--cine-frames without --cine was ignored (the data set was made instead); --cine-fps nan reached OpenCV."""
    assert main(["synth", "--cine-frames", "5"]) == 1
    assert "--cine-frames: for a cine loop only; add --cine VIDEO" in capsys.readouterr().err
    for option, value in (("--cine-fps", "nan"), ("--cine-fps", "0"), ("--cine-frames", "0")):
        assert main(["synth", "--cine", str(tmp_path / "loop.avi"), option, value]) == 1
        assert "--cine-frames must be >= 1 and --cine-fps a finite number > 0" in capsys.readouterr().err
        assert not (tmp_path / "loop.avi").exists()


def test_a_bad_search_space_is_refused_before_ray_starts(tmp_path, capsys):
    """A reversed range was accepted by msbt config and refused only inside the search, after Ray's start-up."""
    import sys

    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    assert main(["tune", "--set", f"run.storage_path={tmp_path}", "--set", "tune.space.dropout=[0.6,0.2]"]) == 1
    assert "--set: `tune.space.dropout` must be a range [low, high] with low <= high" in capsys.readouterr().err
    assert ("ray" in sys.modules and sys.modules["ray"].is_initialized()) == ray_before


def test_an_address_where_no_cluster_answers_is_refused_before_ray_is_asked(tmp_path):
    """ray.init retries a dead address for ever: `workflows/stage1.py --smoke-test --address 127.0.0.1:1` was still
    retrying after 200 s (2026-12-06); it now ends at once, naming the address and where it came from. In a child
    process: this one may hold the session's cluster already (xdist), and init_ray joins nothing then."""
    import socket

    from msbt.raycluster import _no_answer

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _no_answer(f"127.0.0.1:{port}") == "Connection refused"
    with socket.socket() as s:  # a listener answers; other forms are left to Ray
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert _no_answer(f"127.0.0.1:{s.getsockname()[1]}") is None
        assert _no_answer(f"[::1]:{port}") is not None  # brackets taken off (refused or no IPv6: not None)
    assert [_no_answer(a) for a in ("auto", "ray://127.0.0.1:1", "local")] == [None, None, None]
    base = ["preprocess", "--smoke-test", "--set", f"run.storage_path={tmp_path}", "--set",
            f"synth.out_dir={tmp_path / 'synth'}"]
    done = run_cli(*base, "--address", f"127.0.0.1:{port}", timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"--address 127.0.0.1:{port}: no Ray cluster answers there (Connection refused)" in done.stderr
    done = run_cli(*base, timeout=300, env={"RAY_ADDRESS": f"127.0.0.1:{port}"})  # a stale one in the environment
    assert done.returncode == 1 and f"$RAY_ADDRESS 127.0.0.1:{port}: no Ray cluster answers there" in done.stderr
    assert not (tmp_path / "synth").exists()


def test_evaluate_names_a_deleted_or_changed_model_before_ray_starts(tmp_path, capsys):
    """The run's recorded stage-2 checkpoint deleted (or its model changed): evaluate said so only after Ray had
    started and the data step had run (about 10 s); here, a unit test, Ray must not start at all."""
    import json

    run = tmp_path / "smoke"
    run.mkdir()
    gone = run / "stage2" / "checkpoint_2026-12-06_00-00-00.000000"
    (run / "stages.json").write_text(json.dumps({"2": {"checkpoint": str(gone)}}))
    argv = ["evaluate", "--smoke-test", "--set", f"run.storage_path={tmp_path}", "--set",
            f"synth.out_dir={tmp_path / 'synth'}"]
    assert main(argv) == 1
    assert f"{gone}: no such checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "synth").exists()
