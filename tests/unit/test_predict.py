"""`msbt predict` and `msbt export` on a tiny real checkpoint inside a run-shaped folder.

The checkpoint is what ``fit_stage`` writes (``model.keras`` + ``manifest.json``) for a 32 px
EfficientNet-Lite0 binary model with ImageNet features and an untrained head: training would only cost
time here, and every check compares against the same model. The run folder around it has the files
predict reads: ``config.yaml``, ``stores/ultrasound/store.json`` and ``metrics.json``.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from msbt.serve import predict as pr
from msbt.model.checkpoint import MANIFEST_FILE, MODEL_FILE, write_manifest
from msbt.cli import main
from msbt.data.discovery import HIDDEN_FILE, HIDDEN_FOLDER
from msbt.config import Config, HeadConfig, StageConfig, dump_config
from msbt.images.imagefile import fit_square, normalize_intensity
from msbt.model.models import build_model, load_model
from msbt.train.loop import dataset_from_arrays, eval_batches

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
# ImageNet Lite0 (offline weights): its features, unlike a random backbone's, differ between images.
STAGE = StageConfig(backbone="efficientnet_lite0", weights="imagenet", image_size=32, batch_size=4,
                    head=HeadConfig((8, 4, 2), 0.5), monitor="val_auc")
# The store was made at 40 px with crop + minmax; config.yaml says otherwise so the test sees which wins.
STORE_SETTINGS = {"image_size": 40, "aspect": "crop", "intensity": "minmax", "sixteen_bit": "scale"}


def gray(seed, h=48, w=40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8, w // 8)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with a stage-2 checkpoint, and a folder of new images with the usual problems."""
    root = tmp_path_factory.mktemp("predict")
    run = root / "runs" / "demo"
    config = Config()
    dump_config(config, run / "config.yaml")  # preprocess: pad, none, 200 px (the store overrides these)
    (run / "data" / "ultrasound").mkdir(parents=True)
    (run / "stores" / "ultrasound").mkdir(parents=True)
    (run / "stores" / "ultrasound" / "store.json").write_text(json.dumps({"kind": "ultrasound",
                                                                          "settings": STORE_SETTINGS}))
    checkpoint = run / "stage2" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    keras.utils.set_random_seed(0)
    model = build_model(STAGE, 2)
    model.save(checkpoint / MODEL_FILE)
    write_manifest(checkpoint, stage_config=STAGE, class_names=["benign", "malignant"],
                   metrics={"val_auc": 0.5}, best_epoch=1)

    images = root / "incoming"
    (images / "sub").mkdir(parents=True)
    (images / ".hidden").mkdir()
    cv2.imwrite(str(images / "a.png"), cv2.cvtColor(gray(1), cv2.COLOR_GRAY2BGR) + np.uint8(3))
    cv2.imwrite(str(images / "b.bmp"), gray(2, 40, 60))
    cv2.imwrite(str(images / "sub" / "c.jpg"), gray(3))
    cv2.imwrite(str(images / "sub" / "a.png"), gray(4))  # same name as a.png, another folder
    cv2.imwrite(str(images / "g16.png"), (gray(5).astype(np.uint16) * 250))  # 16-bit grayscale
    cv2.imwrite(str(images / "a_mask.png"), (gray(1) > 128).astype(np.uint8) * 255)  # BUSI mask: skipped
    cv2.imwrite(str(images / ".hidden" / "x.png"), gray(6))  # hidden folder: ignored as discovery does
    cv2.imwrite(str(images / ".hidden_scan.png"), gray(7))  # hidden file: the same, counted like the folder
    good = (images / "a.png").read_bytes()
    (images / "corrupt.png").write_bytes(good[: len(good) // 2])
    (images / "notes.txt").write_text("not an image")
    cv2.imwrite(str(images / "blank.png"), np.full((20, 20), 7, np.uint8))
    (images / "Thumbs.db").write_bytes(b"\0" * 10)
    return {"run": run, "checkpoint": checkpoint, "images": images, "model": model}


def expected_input(path: Path) -> np.ndarray:
    """The model input for a file, prepared here independently of msbt.serve.predict."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw.dtype == np.uint16:
        raw = ((raw.astype(np.uint32) + 128) // 257).astype(np.uint8)  # data.sixteen_bit: scale
    rgb = cv2.cvtColor(raw, cv2.COLOR_GRAY2RGB if raw.ndim == 2 else cv2.COLOR_BGR2RGB)
    stored = fit_square(normalize_intensity(rgb, "minmax"), 40, "crop")
    # The stage trains at 32 px: msbt.train.loop resizes the 40 px store images on the fly.
    batches = eval_batches(dataset_from_arrays(stored[None], [0]), STAGE, num_classes=2)
    return next(iter(batches))[0].numpy()[0]


def write_metrics(run: Path, checkpoint, threshold: float) -> None:
    (run / "metrics.json").write_text(json.dumps({"checkpoint": str(checkpoint), "threshold": threshold,
                                                  "threshold_rule": "youden", "threshold_chosen_on": "val"}))


GOOD = ["a.png", "b.bmp", "g16.png", "sub/a.png", "sub/c.jpg"]
REJECTED = {"blank.png": "blank image (every pixel is 7)", "corrupt.png": "truncated PNG (no IEND chunk at the end)",
            "notes.txt": "not an image file (extension '.txt')"}


def test_predicts_good_files_rejects_bad_ones_with_reasons(run, tmp_path):
    images = run["images"]
    probe = pr.predict(run["checkpoint"], [images], threshold=0.5)
    p = {Path(x.path).relative_to(images).as_posix(): x.probability for x in probe.predictions}
    threshold = float(np.median(list(p.values())))  # both labels occur
    assert len(set(p.values())) > 1, p
    write_metrics(run["run"], run["checkpoint"], threshold)
    try:
        result = pr.predict(run["checkpoint"], [images, images / "a.png", tmp_path / "missing.png"],
                            heatmaps=tmp_path / "heat")
    finally:
        (run["run"] / "metrics.json").unlink()
    rows = {Path(x.path).relative_to(images).as_posix(): x for x in result.predictions}
    assert sorted(rows) == GOOD  # a.png named twice is predicted once
    assert {Path(r.path).name: r.reason for r in result.rejects} == {**REJECTED, "missing.png": "does not exist"}
    assert result.skipped == {"segmentation mask": 1, HIDDEN_FILE: 1, HIDDEN_FOLDER: 1}
    # The run's settings: the store's (40 px, crop, minmax), not config.yaml's; threshold from metrics.json.
    assert result.preparation.source.endswith("stores/ultrasound/store.json")
    prep = result.preparation
    assert (prep.image_size, prep.aspect, prep.intensity) == (40, "crop", "minmax")
    assert result.threshold.value == threshold and "metrics.json (youden on val)" in result.threshold.source
    # Probabilities: the model on inputs prepared independently, the label by p >= threshold.
    names = sorted(rows)
    x = np.stack([expected_input(images / n) for n in names])
    expected = run["model"].predict(x, verbose=0).reshape(-1)
    np.testing.assert_allclose([rows[n].probability for n in names], expected, rtol=0, atol=1e-6)
    for n in names:
        assert rows[n].label == ("malignant" if rows[n].probability >= threshold else "benign")
        assert rows[n].threshold == threshold
    assert {r.label for r in rows.values()} == {"benign", "malignant"}
    # Heatmaps: one PNG per image (prepared image | overlay), names kept apart.
    pictures = sorted(Path(r.heatmap).name for r in rows.values())
    assert pictures == ["a-2.gradcam.png", "a.gradcam.png", "b.gradcam.png", "c.gradcam.png", "g16.gradcam.png"]
    assert cv2.imread(rows["a.png"].heatmap).shape == (32, 64, 3)


def test_sixteen_bit_gray_is_prepared_as_the_store_prepares_it(run):
    prep = pr.Preparation(40, "crop", "minmax", "scale", ("_mask",), "test")
    stored = pr.prepare_image(run["images"] / "g16.png", prep)
    raw = cv2.imread(str(run["images"] / "g16.png"), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and stored.shape == (40, 40, 3) and stored.dtype == np.uint8
    eight = ((raw.astype(np.uint32) + 128) // 257).astype(np.uint8)
    np.testing.assert_array_equal(stored, fit_square(normalize_intensity(np.dstack([eight] * 3), "minmax"), 40, "crop"))


def test_model_inputs_resize_exactly_as_training_does():
    stored = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    batches = eval_batches(dataset_from_arrays(stored, [0, 1, 0]), STAGE, num_classes=2)
    from_training = np.concatenate([x.numpy() for x, _ in batches])
    np.testing.assert_array_equal(pr.model_inputs(stored, 32).astype(np.float32), from_training)
    assert pr.model_inputs(stored, 40) is stored


def test_threshold_sources(run, tmp_path):
    checkpoint, folder = run["checkpoint"], run["run"]
    t, notes = pr.find_threshold(checkpoint)
    assert t.value == 0.5 and "default" in t.source and "no metrics.json" in notes[0]
    write_metrics(folder, folder / "stage2" / "checkpoint_000002", 0.3)  # another checkpoint of the run
    try:
        t, notes = pr.find_threshold(checkpoint)
        assert t.value == 0.5 and "computed for another checkpoint" in notes[0]
        # The run folder was moved since: the recorded path no longer exists, its tail still matches.
        write_metrics(folder, Path("/elsewhere/runs/demo/stage2/checkpoint_000001"), 0.25)
        t, notes = pr.find_threshold(checkpoint)
        assert (t.value, notes) == (0.25, []) and t.source == f"{folder.resolve() / 'metrics.json'} (youden on val)"
        assert t.public_source() == "metrics.json (youden on val)"  # what `msbt serve` answers: no server folders
        assert pr.Threshold(0.7, "--threshold").public_source() == "--threshold"
        assert pr.Threshold(0.3, "/srv/runs (old)/metrics.json (youden on val)").public_source() == \
            "metrics.json (youden on val)"
        assert pr.Threshold(0.3, "/srv/exports (v2)/export.json").public_source() == "export.json"
        assert pr.find_threshold(checkpoint, 0.7)[0] == pr.Threshold(0.7, "--threshold")
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            pr.find_threshold(checkpoint, 1.5)
    finally:
        (folder / "metrics.json").unlink()
    # A run folder named for a model it reused from another run (the stage index): its own metrics.json, which
    # scored that model, holds the threshold (it came out 0.5, looked for beside the model only).
    other = tmp_path / "runs" / "reusing"
    other.mkdir(parents=True)
    write_metrics(other, checkpoint, 0.35)
    t, notes = pr.find_threshold(checkpoint, run_folder=other)
    assert (t.value, notes) == (0.35, []) and t.source.startswith(str(other / "metrics.json"))


def test_without_a_run_folder_defaults_are_used_and_said(run, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    for name in (MODEL_FILE, MANIFEST_FILE):
        (lone / name).write_bytes((run["checkpoint"] / name).read_bytes())
    prep, notes = pr.find_preparation(lone, 32)
    assert (prep.image_size, prep.aspect, prep.intensity, prep.source) == (32, "pad", "none", "defaults")
    assert "no run config.yaml" in notes[0]


def test_cli_predict_writes_csv_and_exit_codes(run, tmp_path, capsys):
    images, out = run["images"], tmp_path / "pred.csv"
    assert main(["predict", str(run["checkpoint"]), str(images), "--out", str(out), "--threshold", "0.4"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"model {run['checkpoint']}; threshold 0.4000 from --threshold") and "rejected" in printed
    assert "skipped 1: segmentation mask" in printed and f"skipped 1: {HIDDEN_FILE}" in printed
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == pr.CSV_COLUMNS and len(rows) == len(GOOD) + len(REJECTED)
    predicted = [r for r in rows if r["label"]]
    assert len(predicted) == len(GOOD) and all(r["threshold"] == "0.4" and not r["reason"] for r in predicted)
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in predicted)
    assert {Path(r["path"]).name: r["reason"] for r in rows if not r["label"]} == REJECTED
    for name in (f"{images}/a.png", f"{images}/sub/c.jpg"):
        assert any(line.startswith(f"{name}\t") and "\tp=" in line for line in printed.splitlines())
    # Nothing usable: exit code 1, the reasons still printed, no traceback.
    assert main(["predict", str(run["checkpoint"]), str(images / "notes.txt"), str(images / "corrupt.png")]) == 1
    captured = capsys.readouterr()
    assert "rejected" in captured.out and "no image could be predicted" in captured.err
    assert main(["predict", str(tmp_path), str(images)]) == 1  # not a checkpoint: one clear line
    assert "not a checkpoint" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nope"), str(images)]) == 1  # a mistyped folder is named as missing
    assert f"{tmp_path / 'nope'}: no such checkpoint folder" in capsys.readouterr().err
    # An empty folder is said before the model loads (a damaged model file is never read), the CSV still written.
    damaged, empty = tmp_path / "damaged", tmp_path / "empty"
    damaged.mkdir(), empty.mkdir()
    (damaged / MANIFEST_FILE).write_bytes((run["checkpoint"] / MANIFEST_FILE).read_bytes())
    (damaged / MODEL_FILE).write_bytes(b"not a model")
    assert main(["predict", str(damaged), str(empty), "--out", str(tmp_path / "none.csv")]) == 1
    captured = capsys.readouterr()
    assert f"no image could be predicted: no image file in {empty}" in captured.err and "Traceback" not in captured.err
    assert (tmp_path / "none.csv").read_text().count("\n") == 1  # the header
    # a stage-1 (four-class) checkpoint is named as such first, with images or without
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / MODEL_FILE).write_bytes(b"not a model")
    write_manifest(stage1, stage_config=STAGE, class_names=["HeLa", "Huh-7", "MCF-7", "NCI-H1299"],
                   metrics={}, best_epoch=1)
    assert main(["predict", str(stage1), str(empty)]) == 1
    assert "not a binary (stage-2) checkpoint: classes ['HeLa'" in capsys.readouterr().err


@pytest.mark.slow
def test_export_keras_and_saved_model_agree(run, tmp_path, capsys):
    checkpoint, out = run["checkpoint"], tmp_path / "export"
    write_metrics(run["run"], checkpoint, 0.42)
    try:
        assert main(["export", str(checkpoint), str(out)]) == 0
    finally:
        (run["run"] / "metrics.json").unlink()
    assert "threshold 0.4200 from" in capsys.readouterr().out
    record = json.loads((out / "export.json").read_text())
    assert record["threshold"]["value"] == 0.42 and record["preparation"]["aspect"] == "crop"
    assert record["input"]["shape"] == [None, 32, 32, 3]
    assert (out / MODEL_FILE).read_bytes() == (checkpoint / MODEL_FILE).read_bytes()
    # The Keras copy reloads (the Preprocess layer serialises) and the SavedModel gives the same numbers.
    images = np.random.default_rng(7).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    keras_p = load_model(out / MODEL_FILE).predict(images.astype(np.float32), verbose=0).reshape(-1)
    np.testing.assert_allclose(keras_p, run["model"].predict(images.astype(np.float32), verbose=0).reshape(-1),
                               atol=1e-6)
    served = tf.saved_model.load(str(out / "saved_model"))
    by_float = served.signatures["serving_default"](image=tf.constant(images, tf.float32))["probability"]
    np.testing.assert_allclose(by_float.numpy(), keras_p, atol=1e-5)
    np.testing.assert_allclose(served.serve_uint8(tf.constant(images))["probability"].numpy(), keras_p, atol=1e-5)
    # The export folder is a checkpoint too: predict reads its threshold and preparation from export.json.
    result = pr.predict(out, [run["images"] / "a.png"])
    assert result.threshold.value == 0.42 and "metrics.json" in result.threshold.source
    assert result.preparation.image_size == 40 and result.preparation.source.endswith("store.json")
    assert result.notes == ["images are fitted to 40 px as the store holds them, then resized to the model's "
                            "32 px as in training",
                            # this hand-made run folder has no stores/ultrasound/profile.json to export
                            "the run recorded no profile of its training images (made before msbt recorded one): "
                            "inputs are not checked against the training distribution"]
    assert result.predictions[0].probability == pytest.approx(
        pr.predict(checkpoint, [run["images"] / "a.png"]).predictions[0].probability, abs=1e-7)
    assert main(["export", str(checkpoint), str(out)]) == 1  # never over an existing export
    assert "not an empty folder" in capsys.readouterr().err
    # A fresh process with plain TensorFlow (no msbt import) serves it: nothing custom is needed.
    script = ("import sys, numpy as np, tensorflow as tf; m = tf.saved_model.load(sys.argv[1]); "
              "x = np.load(sys.argv[2]); print(repr(m.serve_uint8(tf.constant(x))['probability'].numpy().tolist())); "
              "assert not any(k.startswith('msbt') for k in sys.modules)")
    np.save(tmp_path / "x.npy", images)
    done = subprocess.run([sys.executable, "-c", script, str(out / "saved_model"), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(eval(done.stdout.strip().splitlines()[-1]), keras_p, atol=1e-5)
