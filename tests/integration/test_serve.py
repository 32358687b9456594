"""Exported engines (parity with Keras), `msbt stream` and `msbt serve` on one tiny exported model.

The model is a 32 px EfficientNet-Lite0 with ImageNet features and an untrained head, exported once for
the module by ``msbt export --int8`` (Keras, SavedModel, ONNX, OpenVINO, and the int8 model calibrated on a
small store of built-in synthetic ultrasound): one export serves the float engines' tests and the int8 test
(a second full export cost about 13 s of CPU). The price: an export that fails in its int8 part fails every
test of the module at set-up, with the command's output. Images are the built-in synthetic ultrasound: a cine
loop written by ``msbt synth --cine`` and frames made by ``msbt.data.synth``.
"""

import csv
import dataclasses
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest

from msbt.cli import main
from msbt.config import ConfigError, HeadConfig, ServeConfig, StageConfig
from msbt.data.synth import cine_frames, lesion_images
from msbt.images.imagefile import fit_square
from msbt.model.checkpoint import MODEL_FILE, write_manifest
from msbt.model.models import build_model
from msbt.serve import engines as eng
from msbt.serve import export as ex
from msbt.serve import stream as st

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
STAGE = StageConfig(backbone="efficientnet_lite0", weights="imagenet", image_size=32, batch_size=4,
                    head=HeadConfig((8, 4, 2), 0.5), monitor="val_auc")


@pytest.fixture(scope="module")
def ultrasound_store(tmp_path_factory):
    """A real ultrasound store (built-in synthetic data) with train, val and test rows, 32 px: what ``--int8``
    calibrates on (train) and checks the AUC on (test). Small enough for the driver's threads, so no Ray."""
    from helpers import split_and_store
    from msbt.config import PreprocessConfig
    from msbt.data import synth
    from msbt.data.preprocess import build_ultrasound_store

    out = tmp_path_factory.mktemp("int8")
    synth.generate(out / "synth", seed=5, fields_per_line=1, field_size=200, lesions_per_class=10,
                   frames_per_lesion=(1, 2), ultrasound_size=64)
    return split_and_store(out / "synth" / "ultrasound", out, build_ultrasound_store, PreprocessConfig(image_size=32))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ultrasound_store):
    """An export folder of a tiny stage-2 checkpoint (threshold 0.5: no run around it), made as a user makes one
    with int8: ``msbt export CHECKPOINT OUT --int8 --int8-store STORE`` (a bound of 1: an untrained head's AUC
    may move any way). What the command printed is kept for the int8 test."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("serve")
    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    keras.utils.set_random_seed(0)
    model = build_model(STAGE, 2)
    model.save(checkpoint / MODEL_FILE)
    write_manifest(checkpoint, stage_config=STAGE, class_names=["benign", "malignant"],
                   metrics={"val_auc": 0.5}, best_epoch=1)
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):  # a module fixture has no capsys
        code = main(["export", str(checkpoint), str(root / "export"), "--int8", "--int8-store", str(ultrasound_store),
                     "--int8-max-auc-change", "1"])
    assert code == 0, printed.getvalue() + errors.getvalue()
    record = json.loads((root / "export" / "export.json").read_text())
    return {"folder": root / "export", "record": record, "model": model, "root": root, "printed": printed.getvalue()}


def ultrasound(n: int, size: int = 96, seed: int = 7) -> np.ndarray:
    """n synthetic ultrasound frames (both classes), prepared independently: RGB, padded square, 32 px."""
    frames = []
    for i in range(n):
        _, images = lesion_images(seed, ("benign", "malignant")[i % 2], i, (1, 1), size)
        frames.append(fit_square(np.dstack([images[0]] * 3), 32, "pad"))
    return np.stack(frames)


# ---------------------------------------------------------------------------------------------------
# Engines


def test_every_float_engine_matches_keras_on_ultrasound_frames(exported):
    folder, record = exported["folder"], exported["record"]
    for name in ("model.keras", "saved_model", "model.onnx", "openvino/model.xml", "openvino/model.bin"):
        assert (folder / name).exists(), name
    images = ultrasound(12)  # other frames than the export's own check
    reference = exported["model"].predict(images.astype(np.float32), verbose=0).reshape(-1)
    assert reference.std() > 1e-4  # the images give different answers: the comparison means something
    for name in eng.ENGINES:
        p = eng.load_engine(folder, name).predict(images)
        assert p.shape == (12,) and p.dtype == np.float64
        assert np.abs(p - reference).max() <= eng.FLOAT_PARITY, name
        assert record["engines"][name]["max_abs_diff"] <= eng.FLOAT_PARITY
    # OpenVINO's own choice on this CPU is recorded beside the f32 figures, marked as reduced precision; a CPU
    # without bfloat16 is said so, and asking for bf16 there is refused with the reason.
    bf16 = record["engines"]["openvino_bf16"]
    assert bf16["precision"] == "bf16"
    if eng.openvino_has_bf16():
        assert "reduced precision" in bf16["note"] and "max_abs_diff" in bf16
        assert eng.load_engine(folder, "openvino", precision="bf16").predict(images).shape == (12,)
        # said as such where it is printed and where it is used (stream and serve load it through load_served)
        assert "(bf16): max |p - p_keras| = " in exported["printed"]
        assert "reduced precision, for information: no parity bound and no AUC check" in exported["printed"]
        served = eng.load_served(folder, "openvino", precision="bf16")
        assert any(n.startswith("bf16 engine: reduced precision") and f"{bf16['max_abs_diff']:.2e}" in n
                   for n in served.notes), served.notes
        assert not any("bf16" in n for n in eng.load_served(folder, "openvino").notes)
    else:
        assert bf16["available"] is False and "no bfloat16" in bf16["note"] and "max_abs_diff" not in bf16
        assert bf16["openvino_default_precision"] == "f32"
        with pytest.raises(eng.EngineError, match="bf16 is not available on this CPU .*FP32"):
            eng.load_engine(folder, "openvino", precision="bf16")
    assert record["model_id"].startswith("efficientnet_lite0-32px-") and len(record["lineage_sha256"]) == 64


def test_parity_check_refuses_an_engine_beyond_the_bound(exported, monkeypatch):
    monkeypatch.setattr(eng, "FLOAT_PARITY", 0.0)  # ONNX Runtime differs from Keras by ~1e-7
    with pytest.raises(ValueError, match="onnx engine differs from Keras"):
        ex.check_parity(exported["folder"], ["keras", "onnx"], ultrasound(4))


def test_engines_with_several_streams_score_concurrent_batches_each_as_its_own(exported):
    """serve.streams: batches from several threads at once; every caller gets its own batch's answers,
    the same as one stream gives (OpenVINO: one infer request per stream, its output copied out)."""
    images = ultrasound(12)
    batches = [images[k::4] for k in range(4)]  # four different batches of 3
    for name in ("openvino", "onnx"):
        one = eng.load_engine(exported["folder"], name)
        expected = [one.predict(b) for b in batches]
        two = eng.load_engine(exported["folder"], name, threads=2, streams=2)
        with ThreadPoolExecutor(4) as pool:  # more callers than streams: the extra ones wait for a free stream
            got = list(pool.map(lambda k: two.predict(batches[k % 4]), range(40)))
        for k, p in enumerate(got):
            np.testing.assert_allclose(p, expected[k % 4], atol=1e-6, err_msg=f"{name} call {k}")
    with pytest.raises(eng.EngineError, match="streams must be at least 1"):
        eng.load_engine(exported["folder"], "onnx", streams=0)


def test_engine_refuses_wrong_inputs_and_missing_files(exported, tmp_path):
    engine = eng.load_engine(exported["folder"], "onnx")
    with pytest.raises(ValueError, match=r"uint8 \(N, 32, 32, 3\)"):
        engine.predict(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        engine.predict(np.zeros((1, 40, 40, 3), np.uint8))
    assert engine.predict(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0,)
    with pytest.raises(eng.EngineError, match="model.onnx: missing"):
        eng.load_engine(tmp_path, "onnx")
    with pytest.raises(eng.EngineError, match="unknown engine"):
        eng.load_engine(exported["folder"], "tensorrt")
    with pytest.raises(eng.EngineError, match="not an `msbt export` folder"):
        eng.load_served(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Stream


def test_smoothing_ema_and_window():
    ema = st.Smoother(st.Smoothing("ema", alpha=0.5))
    assert [ema.update(p) for p in (1.0, 0.0, 0.0)] == [1.0, 0.5, 0.25]
    window = st.Smoother(st.Smoothing("window", window=2))
    assert [window.update(p) for p in (1.0, 0.0, 0.0)] == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="alpha"):
        st.Smoothing("ema", alpha=0.0)


def test_stream_of_a_folder_scores_every_frame_like_the_engine(exported, tmp_path, capfd):
    frames = ultrasound(6)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in zip((0, 1, 3, 4, 5, 6), frames):
        cv2.imwrite(str(folder / f"f{i:03d}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    # one damaged frame file among them: skipped and counted, the frames after it still scored
    (folder / "f002.png").write_bytes((folder / "f001.png").read_bytes()[:200])
    out = tmp_path / "out" / "frames.csv"
    code = main(["stream", str(exported["folder"]), str(folder), "--out", str(out), "--engine", "onnx",
                 "--all-frames", "--smooth", "window", "--window", "3", "--heatmaps", "3"])
    assert code == 0
    printed = capfd.readouterr()  # the Grad-CAM process's TensorFlow start-up lines are held back as the parent's
    assert "absl" not in printed.err and "cuInit" not in printed.err and "heatmaps: " in printed.out, printed.err
    rows = list(csv.DictReader(out.open()))
    assert [int(r["frame"]) for r in rows] == list(range(7))
    assert [r["status"] for r in rows] == ["scored"] * 2 + ["unreadable"] + ["scored"] * 4
    rows = [r for r in rows if r["status"] == "scored"]
    expected = exported["model"].predict(frames.astype(np.float32), verbose=0).reshape(-1)
    p = np.array([float(r["probability"]) for r in rows])
    np.testing.assert_allclose(p, expected, atol=1e-6)
    np.testing.assert_allclose([float(r["smoothed"]) for r in rows][-1], p[-3:].mean(), atol=1e-12)
    for r in rows:
        assert r["label"] == ("malignant" if float(r["probability"]) >= 0.5 else "benign")
    summary = json.loads(out.with_suffix(".csv.json").read_text())
    assert f"per-frame CSV: {out} (this summary as JSON: {out}.json)" in printed.out  # the JSON named where it is
    assert (summary["frames_read"], summary["frames_scored"], summary["frames_dropped"],
            summary["frames_unreadable"]) == (7, 6, 0, 1)
    assert any(f"{folder / 'f002.png'}: truncated PNG" in note for note in summary["notes"]), summary["notes"]
    assert not any(f"{folder / 'f002.png'}: {folder / 'f002.png'}" in note for note in summary["notes"])  # once
    assert "6 scored, 0 dropped, 1 unreadable" in printed.out


def test_stream_drops_frames_a_slow_engine_cannot_keep_up_with(exported, tmp_path):
    video = tmp_path / "cine.avi"
    assert main(["synth", "--cine", str(video), "--cine-frames", "30", "--cine-fps", "30"]) == 0
    fast = eng.load_engine(exported["folder"], "openvino")

    def slow(x):  # an engine at ~10 frames/s against a 30 fps source
        time.sleep(0.1)
        return fast.run(x)

    engine = eng.Engine("slow-openvino", "f32", 32, fast.path, slow)
    served = eng.load_served(exported["folder"], "openvino")
    source = st.open_source(video)
    assert (source.kind, source.fps) == ("video", 30.0)
    out = tmp_path / "slow.csv"
    summary = st.stream(engine, source, served.preparation, served.threshold, served.class_names, out,
                        video=tmp_path / "annotated.avi")
    rows = list(csv.DictReader(out.open()))
    # Every frame is accounted for, in order: scored or dropped, never queued without bound.
    assert [int(r["frame"]) for r in rows] == list(range(30))
    dropped = [r for r in rows if r["status"] == "dropped"]
    assert summary.frames_read == 30 and summary.frames_dropped == len(dropped) >= 10
    assert summary.frames_scored + summary.frames_dropped == 30
    assert rows[-1]["status"] == "scored"  # the end of the loop is never dropped
    assert all(r["probability"] == "" for r in dropped)
    annotated = cv2.VideoCapture(str(tmp_path / "annotated.avi"))
    assert annotated.get(cv2.CAP_PROP_FRAME_COUNT) == summary.frames_scored


def test_stream_heatmaps_on_a_side_process(exported, tmp_path):
    frames = [np.dstack([f] * 3) for f in cine_frames(frames=8, size=64)]
    source = st.Source("cine", "video", 30.0, iter(frames), live=False)
    served = eng.load_served(exported["folder"], "onnx")
    summary = st.stream(served.engine, source, served.preparation, served.threshold, served.class_names,
                        tmp_path / "h.csv", pace=False, heatmap_every=2, model_folder=exported["folder"])
    pictures = sorted(p.name for p in Path(summary.heatmaps).iterdir())
    # Frames 1, 3, 5, 7 were offered (every 2nd scored, from the first); busy ones were skipped, not queued.
    assert summary.heatmaps_written == len(pictures) >= 1
    assert summary.heatmaps_written + summary.heatmaps_skipped == 4
    assert cv2.imread(str(Path(summary.heatmaps) / pictures[0])).shape == (32, 64, 3)


def test_a_video_frame_that_does_not_decode_is_skipped_and_the_frames_after_it_are_read(tmp_path):
    """OpenCV's read() fails for one undecodable frame and reads on: the stream used to end there (exit 0)."""
    video = tmp_path / "loop.avi"
    frames = np.random.default_rng(0).integers(0, 256, (8, 48, 64, 3), dtype=np.uint8)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for frame in frames:
        writer.write(frame)
    writer.release()
    data = bytearray(video.read_bytes())
    starts = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\xff\xd8"]  # each frame's JPEG
    assert len(starts) == 8
    damaged = data[:]
    damaged[starts[3]:starts[3] + 600] = bytes(600)  # frame 3's JPEG gone
    video.write_bytes(bytes(damaged))
    read = list(st.open_source(video).frames)
    assert [isinstance(f, st.Unreadable) for f in read] == [False] * 3 + [True] + [False] * 4
    assert "frame 3 of the 8 its container gives cannot be decoded" in read[3].reason
    # cut short inside frame 5: the frames the container still counts and no decode gave are one row, said so
    video.write_bytes(bytes(data[:starts[5] + 300]))
    read = list(st.open_source(video).frames)
    assert [isinstance(f, st.Unreadable) for f in read] == [False] * 6 + [True]
    assert "frames 6-7 of the 8 its container gives: none decoded (a file cut short" in read[6].reason


def test_a_black_video_frame_is_skipped_and_the_stream_goes_on(exported, tmp_path):
    """A black (one-value) frame, as a scanner feed gives at its start or while the probe is lifted: the
    whole stream ended there ('stream stopped early at frame 0: ... blank image'), no later frame scored."""
    video = tmp_path / "feed.avi"
    frames = ultrasound(6, size=64)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (32, 32))
    for i, frame in enumerate(frames):
        writer.write(np.zeros_like(frame) if i in (0, 3) else cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    read = list(st.open_source(video).frames)
    assert [isinstance(f, st.Unreadable) for f in read] == [True, False, False, True, False, False]
    assert read[0].reason == f"{video}: frame 0: blank image (every pixel is 0)"
    served = eng.load_served(exported["folder"], "onnx")
    out = tmp_path / "feed.csv"
    summary = st.stream(served.engine, st.open_source(video), served.preparation, served.threshold,
                        served.class_names, out, pace=False)
    assert [r["status"] for r in csv.DictReader(out.open())] == ["unreadable", "scored", "scored", "unreadable",
                                                                "scored", "scored"]
    assert (summary.frames_read, summary.frames_scored, summary.frames_unreadable) == (6, 4, 2)
    assert not any("stopped early" in n for n in summary.notes)


def test_a_dicom_frame_that_does_not_decode_is_skipped_and_named(exported, tmp_path):
    from dicomfiles import write_rle_dicom_with_a_damaged_frame

    frames = ultrasound(4)
    loop = write_rle_dicom_with_a_damaged_frame(tmp_path / "cine.dcm", frames[..., 0], damaged=2)
    served = eng.load_served(exported["folder"], "onnx")
    out = tmp_path / "dicom.csv"
    summary = st.stream(served.engine, st.open_source(loop), served.preparation, served.threshold,
                        served.class_names, out, pace=False)
    rows = list(csv.DictReader(out.open()))
    assert [r["status"] for r in rows] == ["scored", "scored", "unreadable", "scored"]
    assert (summary.frames_read, summary.frames_scored, summary.frames_unreadable) == (4, 3, 1)
    (note,) = [n for n in summary.notes if "unreadable" in n]
    assert f"{loop}: frame 2 of 4: damaged compressed pixel data" in note
    assert not any("stopped early" in n for n in summary.notes)
    # a damaged first frame is that frame only; a loop no frame of which decodes is refused when it opens
    first_bad = write_rle_dicom_with_a_damaged_frame(tmp_path / "first.dcm", frames[..., 0], damaged=0)
    read = list(st.open_source(first_bad).frames)
    assert [isinstance(f, st.Unreadable) for f in read] == [True, False, False, False]
    one = write_rle_dicom_with_a_damaged_frame(tmp_path / "one.dcm", frames[:1, ..., 0], damaged=0)
    with pytest.raises(st.SourceError, match=r"no frame of the 1 is usable; the first: .*frame 0 of 1: damaged"):
        st.open_source(one)


def test_stream_sources_that_cannot_be_opened(tmp_path, capfd):
    with pytest.raises(st.SourceError, match="no such file"):
        st.open_source(tmp_path / "missing.avi")
    (tmp_path / "notes.avi").write_text("not a video")
    with pytest.raises(st.SourceError, match="cannot read a video frame"):
        st.open_source(tmp_path / "notes.avi")
    (tmp_path / "empty").mkdir()
    with pytest.raises(st.SourceError, match="no image files"):
        st.open_source(tmp_path / "empty")
    capfd.readouterr()
    with pytest.raises(st.SourceError, match="capture device 97"):
        st.open_source("97")
    assert "WARN" not in capfd.readouterr().err  # OpenCV's own lines per back end it tried: the error says it
    import os

    os.mkfifo(tmp_path / "pipe.avi")  # there, but nothing to play: said as such, not "no such file"
    with pytest.raises(st.SourceError, match="pipe.avi: not a regular file or a folder"):
        st.open_source(tmp_path / "pipe.avi")
    (tmp_path / "gone.avi").symlink_to(tmp_path / "nowhere.avi")
    with pytest.raises(st.SourceError, match="gone.avi: a dangling symbolic link"):
        st.open_source(tmp_path / "gone.avi")


# ---------------------------------------------------------------------------------------------------
# Serve (a real local Ray cluster, real HTTP)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_serve_answers_images_and_refuses_bad_bytes(exported, ray_local, tmp_path, capsys):
    import requests
    from ray import serve

    from msbt.serve import app

    port = _free_port()
    # two batches at once (serve.streams): each answer must still be its own image's
    config = ServeConfig(port=port, engine="onnx", cpus_per_replica=0.5, max_batch_size=4, streams=2, max_request_mb=1)
    frames = ultrasound(8)
    files = [cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes() for frame in frames]
    # `msbt serve` says it serves when on_ready is called: a request sent then must be answered (it met a refused
    # port or Serve's 404 "Path '/predict' not found" for some seconds after the line)
    first = []
    url = app.run(exported["folder"], config, blocking=False, on_ready=lambda: first.append(
        requests.post(f"http://127.0.0.1:{port}/predict", data=files[0], timeout=60, allow_redirects=False)))
    assert url == f"http://127.0.0.1:{port}"
    try:
        assert [a.status_code for a in first] == [200], [a.text[:300] for a in first]
        health = requests.get(f"{url}/healthz", timeout=30).json()
        assert health["status"] == "ok" and health["model_id"] == exported["record"]["model_id"]
        # Eight at once: @serve.batch groups them; each answer is its own image's.
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda b: requests.post(f"{url}/predict", data=b, timeout=60), files))
        assert [a.status_code for a in answers] == [200] * 8, [a.text[:300] for a in answers]
        expected = exported["model"].predict(frames.astype(np.float32), verbose=0).reshape(-1)
        got = [a.json() for a in answers]
        np.testing.assert_allclose([g["probability"] for g in got], expected, atol=1e-6)
        first = got[0]
        assert first["label"] == ("malignant" if first["probability"] >= 0.5 else "benign")
        assert (first["threshold"], first["model_id"], first["lineage_sha256"]) == (
            0.5, exported["record"]["model_id"], exported["record"]["lineage_sha256"])
        assert first["out_of_range"] is None  # this export (a bare checkpoint, no run) has no training profile
        # DICOM as a PACS router sends it: a still is one image; a cine loop one frame of it (?frame=N)
        from dicomfiles import FAKE_PHI, write_bare_dataset, write_dicom

        still = write_dicom(tmp_path / "still.dcm", frames[2:3], photometric="RGB").read_bytes()
        loop = write_dicom(tmp_path / "loop.dcm", frames[3:6], photometric="RGB").read_bytes()
        bare = write_bare_dataset(tmp_path / "bare.dcm", frames[2:3], photometric="RGB").read_bytes()  # was 400
        assert bare[128:132] != b"DICM"
        for body in (still, bare):
            answer = requests.post(f"{url}/predict", data=body, timeout=30)
            assert answer.status_code == 200 and answer.json()["probability"] == pytest.approx(expected[2], abs=1e-6)
        # above serve.max_request_mb (1 MB here): refused, whether the length is declared or the body comes in chunks
        # (a chunked body was read whole before the limit applied)
        answer = requests.post(f"{url}/predict", data=bytes(2 << 20), timeout=30)
        assert answer.status_code == 413 and "larger than 1048576 bytes" in answer.json()["error"]
        answer = requests.post(f"{url}/predict", data=iter([bytes(1 << 19)] * 4), timeout=30)  # no Content-Length
        assert answer.status_code == 413 and "more than 1048576 bytes" in answer.json()["error"]
        answer = requests.post(f"{url}/predict", params={"frame": 1}, data=loop, timeout=30)
        assert answer.status_code == 200 and answer.json()["frame"] == 1
        assert answer.json()["probability"] == pytest.approx(expected[4], abs=1e-6)
        # Bad bytes: 400 with the reason, never a 500.
        bad = {b"": "empty", b"this is not an image": "cannot be decoded", files[0][: len(files[0]) // 2]: "truncated",
               np.zeros(4, np.uint8).tobytes(): "cannot be decoded",
               bytes(128) + b"DICM" + bytes(64): "DICOM without pixel data",
               loop: "a DICOM cine loop of 3 frames: ask for one frame with ?frame=N (0 to 2)",
               loop[: len(loop) - 500]: "truncated DICOM"}
        for body, reason in bad.items():
            answer = requests.post(f"{url}/predict", data=body, timeout=30)
            assert answer.status_code == 400 and reason in answer.json()["error"], (body[:20], answer.text)
            assert not any(value in answer.text for value in FAKE_PHI.values())  # patient data never answered
        for frame, body, reason in (("3", loop, "no frame 3 (the file has 3)"), ("-1", loop, "a frame index"),
                                    ("9" * 5000, loop, "a frame index"),  # int() of 5000 digits: Python's message
                                    ("0", files[0], "this body is no DICOM file"),
                                    ("\u00b2", loop, "a frame index, 0 or more"),  # isdigit(): int() failed
                                    ("\uff11", loop, "a frame index, 0 or more"),  # a full-width 1 was frame 1
                                    (["1", "2"], loop, "?frame= given 2 times")):  # frame 2 was scored
            answer = requests.post(f"{url}/predict", params={"frame": frame}, data=body, timeout=30)
            assert answer.status_code == 400 and reason in answer.json()["error"], (frame, answer.text)
        # `curl -d @scan.png` (a form; it strips the file's line breaks): the answer says how to send the bytes
        mangled = files[0].replace(b"\r", b"").replace(b"\n", b"")
        answer = requests.post(f"{url}/predict", data=mangled, timeout=30,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert answer.status_code == 400 and "send the bytes with curl --data-binary" in answer.json()["error"]
        answer = requests.post(f"{url}/predict", data=files[0][: len(files[0]) // 2], timeout=30,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})  # as urllib sends any
        assert answer.status_code == 400 and "curl" not in answer.json()["error"]
        if Path("/dev/shm").is_dir():  # the request's temporary file is gone once it is read, answered or refused
            assert not list(Path("/dev/shm").glob("msbt-request-*"))
        assert requests.get(f"{url}/nothing-here", timeout=30).status_code == 404
        form = requests.post(f"{url}/predict", files={"file": ("scan.png", files[0])}, timeout=30)  # curl -F
        assert form.status_code == 400 and "a multipart form: send the image's bytes" in form.json()["error"]
        # What `msbt serve` does on Ctrl-C or SIGTERM (msbt.serve.app.run) when it started Serve itself: the
        # application and Serve both go, and the port is free again (with Serve started before it: the next test)
        assert app.take_down(stop_serve=True) == "application 'msbt' removed and Serve shut down on the cluster"
        assert "msbt serve: application 'msbt' removed and Serve shut down" in capsys.readouterr().out
        assert not app.serve_running()
        with pytest.raises(requests.ConnectionError):  # nothing answers there any more
            requests.get(f"{url}/healthz", timeout=10)
        assert app.take_down(stop_serve=True) is None  # nothing left to take down: said by nothing, no error
    finally:
        serve.shutdown()


def test_ctrl_c_of_serve_on_a_cluster_that_outlives_it_takes_the_application_down(exported, ray_local, capsys,
                                                                                   monkeypatch):
    """On a `ray start` cluster Ctrl-C ended `msbt serve` and left its application answering, the port taken (a
    second `msbt serve` was refused: "already in use"). `msbt.serve.app.run` as `msbt serve` calls it (blocking),
    on a cluster it treats as one that outlives the command (msbt's own `private_cluster` says none is private,
    as on a `ray start` cluster), with Ctrl-C arriving once it serves (signals sent to pytest's own process ended
    it now and then: docs/reliability.md; the signal itself was checked on a real `ray start` cluster,
    docs/predict.md): the application goes, and Serve stays when it ran before the command (Serve started by the
    command goes with it: test_serve_answers_images_and_refuses_bad_bytes)."""
    from ray import serve

    from msbt.serve import app

    port = _free_port()
    config = ServeConfig(engine="onnx", cpus_per_replica=0.5, port=port)
    monkeypatch.setattr(app, "private_cluster", lambda: None)
    answered = []

    def ready_then_ctrl_c():
        # once it serves, the readiness probe goes straight to Serve's proxy, never through an http_proxy of the
        # environment (a hospital's would not reach it: the wait ran out its 60 s)
        import urllib.request

        with pytest.MonkeyPatch.context() as env:
            env.setattr(urllib.request, "_opener", None)  # urlopen's opener reads the environment when first built
            env.setenv("http_proxy", "http://10.255.255.1:3128")
            env.setenv("HTTP_PROXY", "http://10.255.255.1:3128")
            env.delenv("no_proxy", raising=False)
            env.delenv("NO_PROXY", raising=False)
            answered.append(app.wait_until_answering(config, wait_s=10))
        raise KeyboardInterrupt

    # Serve already running (another user's, or `serve deploy`'s): msbt's application goes, Serve stays
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        with pytest.raises(KeyboardInterrupt):
            app.run(exported["folder"], config, blocking=True, on_ready=ready_then_ctrl_c)
        assert answered == [True]
        assert ("msbt serve: application 'msbt' removed from the cluster (Serve keeps running as it did before this "
                "command)") in capsys.readouterr().out
        assert app.serve_running() and "msbt" not in serve.status().applications
    finally:
        serve.shutdown()


def test_stream_of_a_dicom_cine_loop(exported, tmp_path):
    from dicomfiles import phi_found, write_dicom

    frames = ultrasound(5)
    loop = write_dicom(tmp_path / "cine.bin", frames[..., 0])  # MONOCHROME2; found by content, not extension
    source = st.open_source(loop, fps=20)
    assert (source.kind, source.fps) == ("dicom", 20.0)
    served = eng.load_served(exported["folder"], "openvino")
    out = tmp_path / "dicom.csv"
    summary = st.stream(served.engine, source, served.preparation, served.threshold, served.class_names, out,
                        pace=False)
    assert (summary.frames_read, summary.frames_scored, summary.frames_dropped) == (5, 5, 0)
    p = [float(r["probability"]) for r in csv.DictReader(out.open())]
    expected = exported["model"].predict(frames.astype(np.float32), verbose=0).reshape(-1)
    np.testing.assert_allclose(p, expected, atol=eng.FLOAT_PARITY)
    # The fake patient data written into the loop reaches none of the outputs.
    assert all(hit.startswith(f"{loop}:") for hit in phi_found(tmp_path)), phi_found(tmp_path)


def test_a_blank_or_tiny_dicom_is_refused_by_serve_and_skipped_by_stream_as_predict_rejects_it(exported, tmp_path):
    """`msbt predict` rejects a DICOM still that is all one value or under 8 px (as any image); `msbt serve` answered
    it ("malignant" for an all-black still of the smoke run's model) and `msbt stream` scored such frames. The
    request's preparation is called here as the replica calls it (no Ray)."""
    from dicomfiles import write_dicom
    from msbt.images.imagefile import ImageError, read_image
    from msbt.serve.app import Classifier

    replica = Classifier.func_or_class.__new__(Classifier.func_or_class)
    replica.model = eng.load_served(exported["folder"], "onnx")
    frames = ultrasound(2)
    blank = write_dicom(tmp_path / "blank.dcm", np.zeros((1, 64, 64), np.uint8))
    tiny = write_dicom(tmp_path / "tiny.dcm", (np.arange(4, dtype=np.uint8) * 60).reshape(1, 2, 2))
    for path, reason in ((blank, "blank image (every pixel is 0)"), (tiny, "image too small (2x2 px)")):
        with pytest.raises(ImageError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            read_image(path)  # msbt predict
        with pytest.raises(ImageError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            replica._prepare(path.read_bytes())  # msbt serve: HTTP 400 with this reason
    good = write_dicom(tmp_path / "still.dcm", frames[:1], photometric="RGB")
    np.testing.assert_array_equal(replica._prepare(good.read_bytes()), frames[0])
    loop = write_dicom(tmp_path / "loop.dcm", np.stack([frames[0, ..., 0], np.zeros((32, 32), np.uint8),
                                                        frames[1, ..., 0]]))
    read = list(st.open_source(loop).frames)
    assert [isinstance(f, st.Unreadable) for f in read] == [False, True, False]
    assert read[1].reason == f"{loop}: frame 1 of 3: blank image (every pixel is 0)"


def test_serve_answers_say_which_features_of_an_image_are_outside_the_training_range(exported):
    """`msbt predict` names an input unlike the training images (out_of_range, msbt.data.profile); `msbt serve`
    answered such an image with a probability and no word. The request's preparation as the replica calls it
    (no Ray), with a profile of the kind export.json carries."""
    from msbt.data.profile import build_profile, image_features
    from msbt.serve.app import Classifier

    replica = Classifier.func_or_class.__new__(Classifier.func_or_class)
    replica.model = eng.load_served(exported["folder"], "onnx")
    frames = ultrasound(8)
    png = [cv2.imencode(".png", cv2.cvtColor(f, cv2.COLOR_RGB2BGR))[1].tobytes() for f in frames]
    replica.profile = None  # an export without a profile: nothing to say either way
    assert replica._prepare_checked(png[0])[1] is None
    replica.profile = build_profile([image_features(32, 32, f) for f in frames])
    image, outside = replica._prepare_checked(png[0])
    assert outside == [] and np.array_equal(image, replica._prepare(png[0]))
    # four times the training images' size and nearly white: named, as msbt predict names them
    bright = np.clip(cv2.resize(frames[0], (128, 128)).astype(int) + 180, 0, 255).astype(np.uint8)
    body = cv2.imencode(".png", cv2.cvtColor(bright, cv2.COLOR_RGB2BGR))[1].tobytes()
    _, outside = replica._prepare_checked(body)
    assert {"long_side", "mean"} <= set(outside), outside


def test_shipped_serve_config_is_a_valid_serve_deploy_config(exported):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from msbt.serve.app import build_app

    root = Path(__file__).resolve().parents[2]
    config = ServeDeploySchema.model_validate(yaml.safe_load((root / "workflows" / "serve.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "msbt.serve.app:build_app"
    assert config.http_options.host == "127.0.0.1"  # this machine only unless told otherwise
    args = {**application.args, "model": str(exported["folder"]), "max_batch_size": "4"}  # CLI args are strings
    assert build_app(args) is not None
    assert application.args["streams"] == 2  # two batches at once on the replica's 2 CPUs (docs/predict.md)
    # gRPC's fork notice silenced in the replicas, which take the application's environment (`serve run` printed it)
    assert application.runtime_env["env_vars"]["GRPC_VERBOSITY"] == "ERROR"
    assert "runtime_env" not in application.deployments[0].ray_actor_options  # which would replace it
    with pytest.raises(Exception, match="max_batch_size"):
        build_app({**args, "max_batch_size": "many"})
    with pytest.raises(eng.EngineError, match="streams >= 1"):
        build_app({**args, "streams": "0"})
    with pytest.raises(eng.EngineError, match="not an `msbt export` folder"):
        build_app({**args, "model": str(exported["root"])})


def test_serve_and_stream_commands_refuse_a_folder_that_is_not_an_export(tmp_path, capsys):
    # Both fail with the reason before Ray or an engine starts.
    assert main(["serve", str(tmp_path)]) == 1
    assert "not an `msbt export` folder" in capsys.readouterr().err
    assert main(["stream", str(tmp_path), str(tmp_path / "cine.avi")]) == 1
    assert "not an `msbt export` folder" in capsys.readouterr().err
    assert main(["stream", str(tmp_path), "0", "--alpha", "2"]) == 1
    assert "--alpha must be in (0, 1]" in capsys.readouterr().err
    # TensorFlow aborted the process on --threads -2 (exit 134); --max-frames 0 scored nothing, said nothing
    for option, value in (("--threads", "-2"), ("--threads", "0"), ("--max-frames", "0")):
        assert main(["stream", str(tmp_path), "0", option, value]) == 1
        assert f"{option} must be >= 1, got {value}" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.csv*"))


def test_serve_refuses_a_bad_threshold_or_missing_engine_files_before_ray_starts(exported, tmp_path, capsys,
                                                                                   monkeypatch):
    """`msbt serve --threshold 7`, or an export copied without its openvino/ folder: Ray started, Serve retried the
    failing replica three times (about 140 lines of Ray tracebacks) and the command ended with "Deploying
    application msbt failed: Failed to update the deployments ['Classifier']"."""
    import shutil

    from msbt import raycluster
    from msbt.serve.app import build_app

    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(raycluster, "init_ray", started)
    port = str(_free_port())
    for threshold in ("7", "-0.1", "nan"):
        assert main(["serve", str(exported["folder"]), "--threshold", threshold, "--port", port]) == 1
        assert "--threshold must be in [0, 1]" in capsys.readouterr().err
    copy = tmp_path / "export"
    shutil.copytree(exported["folder"], copy, ignore=shutil.ignore_patterns("openvino"))
    assert main(["serve", str(copy), "--port", port]) == 1
    assert "openvino/model.xml: missing, so the openvino engine cannot run" in capsys.readouterr().err
    from msbt.serve import app

    assert app.application(copy, ServeConfig(engine="onnx")) is not None  # its model.onnx is there
    with pytest.raises(ValueError, match=r"--threshold must be in \[0, 1\]"):  # a Serve config file's args too
        build_app({"model": str(exported["folder"]), "threshold": "7"})
    with pytest.raises(eng.EngineError, match="missing, so the openvino"):
        build_app({"model": str(copy)})


def test_serve_refuses_a_port_in_use_before_ray_starts(exported, capsys, monkeypatch):
    """Serve's HTTP proxy failed on a taken port only once the cluster was up (Ray's traceback of
    ProxyActor.ready()); the command now says so before Ray starts."""
    from msbt import raycluster
    from msbt.serve import app

    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(raycluster, "init_ray", started)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(exported["folder"]), "--port", str(port)]) == 1
        assert f"serve.port {port}: already in use on 127.0.0.1" in capsys.readouterr().err
    app.check_port_free(ServeConfig(port=port))  # free again: passes
    with pytest.raises(ConfigError, match="serve.host 192.0.2.77: cannot listen there"):
        app.check_port_free(ServeConfig(host="192.0.2.77", port=port))  # an address of no interface here


# ---------------------------------------------------------------------------------------------------
# int8: calibrated on the train split, kept only within its test-AUC bound


@pytest.mark.slow
def test_int8_is_kept_only_within_its_test_auc_bound(exported, ultrasound_store, tmp_path):
    """The module's export was made with ``--int8`` (the fixture): its int8 model kept, recorded and loadable;
    then an impossible bound, and no store."""
    from msbt.data.store import Store

    checkpoint, kept = exported["root"] / "checkpoint", exported["folder"]
    assert "int8: test AUC" in exported["printed"]
    record = exported["record"]["int8"]
    test_rows = int((Store.open(ultrasound_store).read(columns=["split"])["split"] == "test").sum())
    assert record["accepted"] and record["file"] == "model_int8.onnx" and record["test_images"] == test_rows
    assert record["calibration"]["split"] == "train" and record["calibration"]["images"] > 0
    assert record["auc_change"] == pytest.approx(record["auc_int8"] - record["auc_f32"])
    assert record["threshold"] == 0.5 and 0 <= record["labels_changed"] <= record["test_images"]
    images = ultrasound(8)
    reference = eng.load_engine(kept, "onnx").predict(images)
    for name in ("onnx", "openvino"):
        p = eng.load_engine(kept, name, precision="int8").predict(images)
        assert p.shape == (8,) and np.all((p >= 0) & (p <= 1))
        assert 0 < np.abs(p - reference).max() < 0.1  # quantized: close, not equal
    served = eng.load_served(kept, "openvino", precision="int8")
    assert any(note.startswith("int8 engine: test AUC") for note in served.notes)  # its cost travels with it

    # An impossible bound: the int8 model is refused, recorded as such, and cannot be loaded.
    ex.export(checkpoint, tmp_path / "refused", formats=("onnx",), int8=True, int8_store=ultrasound_store,
              int8_max_auc_change=-1.0)
    record = json.loads((tmp_path / "refused" / "export.json").read_text())["int8"]
    assert not record["accepted"] and record["file"] is None
    assert not (tmp_path / "refused" / "model_int8.onnx").exists()
    with pytest.raises(eng.EngineError, match="--int8"):
        eng.load_engine(tmp_path / "refused", "onnx", precision="int8")
    from msbt.serve import app  # `msbt serve` with serve.precision int8: refused before any replica starts

    with pytest.raises(eng.EngineError, match="precision int8 needs"):
        app.application(tmp_path / "refused", ServeConfig(engine="onnx", precision="int8"))
    assert app.application(kept, ServeConfig(precision="int8")) is not None
    # No store to calibrate on: said before anything is written.
    with pytest.raises(ValueError, match="--int8 needs the run's ultrasound store"):
        ex.export(checkpoint, tmp_path / "nostore", int8=True)
    assert not (tmp_path / "nostore").exists()
