"""Scoring a stream of ultrasound frames as they arrive (`msbt stream MODEL SOURCE`).

Two threads and one slot between them::

    reader (decodes at the source's pace) --[slot: 1 frame]--> scorer (prepare, engine, smooth, write)

The reader puts each decoded frame into a queue of size 1. When the scorer is still busy with an
earlier frame, the frame waiting in the slot is stale: the reader takes it out, counts it as dropped
and puts the new one in. Memory stays bounded whatever the rates, the scorer always gets the newest
frame, and every dropped frame is recorded (a ``dropped`` row in the CSV, the count in the summary).
With ``pace=False`` (``--all-frames``) the reader waits for the scorer instead: every frame is scored,
nothing is dropped; for recorded files whose every frame matters.

Per scored frame: the malignancy probability, its label at the run's threshold, and a smoothed
lesion-level score over the recent scored frames (exponential moving average, or the mean of a
window), with its own label, so a single noisy frame does not flip the call.

Grad-CAM (``heatmap_every=N``) runs on its own thread with its own slot of one: every N-th scored frame
is offered to it and skipped (counted) when the previous heatmap is still being computed, so the
heatmaps never hold the stream back.

Sources: a video file (whatever OpenCV's FFmpeg reads), a folder of frame images in name order, a
capture device index (``0``), or a multi-frame DICOM cine loop (recognised by its content, any extension;
``msbt.images.dicom`` decodes one frame at a time and never reads patient data).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import queue
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import cv2
import numpy as np

from msbt.eval.metrics import threshold_text
from msbt.images.imagefile import IMAGE_EXTENSIONS, ImageError, read_dicom_image, read_image, to_rgb8
from msbt.serve.engines import Engine
from msbt.serve.predict import Preparation, Threshold, model_inputs, prepare_rgb

CSV_COLUMNS = ("frame", "time_s", "status", "probability", "label", "smoothed", "smoothed_label", "threshold")
DEFAULT_FPS = 30.0  # folders of frames and DICOM loops without a frame rate
VIDEO_MAX_MISSES = 30  # undecodable video frames in a row after which a stream ends short of the container's count


class SourceError(ValueError):
    """A stream source cannot be opened; the message names it and why."""


class Unreadable(NamedTuple):
    """What a source yields for a frame it cannot read or decode (a folder's file, a video's or DICOM loop's
    frame): the stream goes on without it."""

    reason: str


@dataclass(frozen=True)
class Source:
    """An opened frame source: its kind, frame rate, and a generator of RGB uint8 frames (or :class:`Unreadable`
    for a frame that cannot be read or decoded)."""

    name: str
    kind: str  # "video" | "folder" | "device" | "dicom"
    fps: float
    frames: Iterator[np.ndarray]
    live: bool  # a device paces itself; files are paced by the reader


@dataclass(frozen=True)
class Smoothing:
    """How the lesion-level score is made from the per-frame probabilities."""

    method: str = "ema"  # "ema": s = alpha * p + (1 - alpha) * s_prev; "window": mean of the last `window`
    alpha: float = 0.3
    window: int = 8

    def __post_init__(self):
        if self.method not in ("ema", "window"):
            raise ValueError(f"smoothing must be 'ema' or 'window', got {self.method!r}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"--alpha must be in (0, 1], got {self.alpha}")
        if self.window < 1:
            raise ValueError(f"--window must be >= 1, got {self.window}")


class Smoother:
    """The running lesion-level score; ``update(p)`` returns the smoothed value after frame p."""

    def __init__(self, smoothing: Smoothing):
        self.smoothing = smoothing
        self.value: float | None = None
        self.recent: deque[float] = deque(maxlen=smoothing.window)

    def update(self, p: float) -> float:
        if self.smoothing.method == "window":
            self.recent.append(p)
            self.value = float(np.mean(self.recent))
        else:
            a = self.smoothing.alpha
            self.value = p if self.value is None else a * p + (1 - a) * self.value
        return self.value


@dataclass
class StreamSummary:
    """What a stream run did: counts, rates and where its files are."""

    source: str
    kind: str
    source_fps: float
    engine: str
    threshold: float
    threshold_source: str
    frames_read: int = 0
    frames_scored: int = 0
    frames_dropped: int = 0
    frames_unreadable: int = 0  # frames that could not be read or decoded (row status "unreadable")
    heatmaps_written: int = 0
    heatmaps_skipped: int = 0
    seconds: float = 0.0
    scored_fps: float = 0.0
    final_smoothed: float | None = None
    final_label: str = ""
    csv: str = ""
    video: str = ""
    heatmaps: str = ""
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Sources


def open_source(source: str | int, *, fps: float | None = None, sixteen_bit: str = "scale") -> Source:
    """Open a video file, a folder of frames, a device index or a DICOM cine loop.

    Args:
        source: A path, or a capture device index (an int or a string of digits).
        fps: The frame rate for folders and DICOM (default 30), or to override a video's own.
        sixteen_bit: The run's 16-bit policy (16-bit frames in folders and DICOM).

    Raises:
        SourceError: The source does not exist, cannot be decoded, or holds no frame.
    """
    if fps is not None and fps <= 0:
        raise SourceError(f"--fps must be > 0, got {fps}")
    if isinstance(source, int) or str(source).isdigit():
        return _device(int(source), fps)
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder(path, fps or DEFAULT_FPS, sixteen_bit)
    if not path.is_file():
        if os.path.lexists(path):  # a FIFO, a socket, a device, a dangling link: there, but nothing to play
            kind = "a dangling symbolic link" if not path.exists() else "not a regular file or a folder"
            raise SourceError(f"{path}: {kind}; a stream reads a video or DICOM file, a folder of frames, or a "
                              "capture device index")
        raise SourceError(f"{path}: no such file, folder or capture device")
    from msbt.images.dicom import is_dicom

    if is_dicom(path):  # by its magic bytes, whatever the extension
        return _dicom(path, fps or DEFAULT_FPS, sixteen_bit)
    return _video(path, fps)


def _video(path: Path, fps: float | None) -> Source:
    capture = cv2.VideoCapture(str(path))
    ok, first = capture.read() if capture.isOpened() else (False, None)
    if not ok:
        capture.release()
        raise SourceError(f"{path}: OpenCV cannot read a video frame from it (not a video, or a codec it lacks)")
    rate = fps or capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
    count = capture.get(cv2.CAP_PROP_FRAME_COUNT)  # the container's count (an estimate in some formats); 0 if none
    total = int(count) if math.isfinite(count) and count > 0 else 0

    def frames():
        # OpenCV's read() is False both at the end and for one frame it cannot decode, and reads on after
        # such a frame (measured on an MJPG AVI with one frame's bytes zeroed: frames 0-2, a miss, frames 4-7).
        # Misses are held until a frame decodes after them (then each is an 'unreadable' row); misses with no
        # frame after them are one row saying how many the container announced but no decode gave (a file cut
        # short, or a count the container overstates: some formats estimate it from the duration). The end is a
        # miss at or past the count, or VIDEO_MAX_MISSES misses in a row.
        try:
            yield _checked(first, path, 0)
            index, missed = 1, []
            while True:
                ok, frame = capture.read()
                if ok:
                    yield from (Unreadable(f"{path}: frame {i} of the {total} its container gives cannot be decoded")
                                for i in missed)
                    missed = []
                    yield _checked(frame, path, index)
                elif index >= total or len(missed) >= VIDEO_MAX_MISSES:
                    break
                else:
                    missed.append(index)
                index += 1
            if missed:
                yield Unreadable(f"{path}: frames {missed[0]}-{total - 1} of the {total} its container gives: none "
                                 "decoded (a file cut short, or a frame count the container overstates)")
        finally:
            capture.release()

    return Source(str(path), "video", float(rate), frames(), live=False)


def _device(index: int, fps: float | None) -> Source:
    # OpenCV warns once per capture back end it tries (V4L2, FFmpeg) on the terminal; the error below says it
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        capture = cv2.VideoCapture(index)
    finally:
        cv2.utils.logging.setLogLevel(level)
    if not capture.isOpened():
        raise SourceError(f"capture device {index}: cannot be opened (no such device, or no permission)")
    rate = fps or capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS

    def frames():
        try:
            for i in itertools.count():
                ok, frame = capture.read()
                if not ok:
                    return
                yield _checked(frame, f"device {index}", i)
        finally:
            capture.release()

    return Source(f"device {index}", "device", float(rate), frames(), live=True)


def _checked(frame: np.ndarray, where: str | Path, index: int) -> np.ndarray | Unreadable:
    """A decoded video or device frame as uint8 RGB, or Unreadable when it fails the checks of every image (blank:
    a black feed, as at the start of a capture or while the probe is lifted): that frame is skipped and
    named, and the stream goes on (it ended at the first black frame, its later frames never scored)."""
    try:
        return to_rgb8(frame, where)
    except ImageError as err:
        return Unreadable(f"{where}: frame {index}: {err.reason}")


def _folder(path: Path, fps: float, sixteen_bit: str) -> Source:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SourceError(f"{path}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder")

    def frames():
        for file in files:
            try:
                yield read_image(file, sixteen_bit)
            except (ImageError, OSError) as err:  # one bad file of many: skipped and counted, named in the notes
                # an ImageError's text already starts with the file's path
                yield Unreadable(str(err) if isinstance(err, ImageError) else f"{file}: {err}")

    return Source(str(path), "folder", fps, frames(), live=False)


def _dicom(path: Path, fps: float, sixteen_bit: str) -> Source:
    from msbt.images.dicom import read_header

    try:
        header = read_header(path)  # the image pixel module only: no patient data is read
    except ValueError as err:
        raise SourceError(str(err)) from None
    if header.frames < 1:
        raise SourceError(f"{path}: the DICOM file holds no frame")

    def frame(i: int) -> np.ndarray | Unreadable:
        try:  # as msbt predict reads a frame: through the checks of every image (too small, blank)
            return read_dicom_image(path, i, sixteen_bit, max_pixels=None, header=header)
        except ImageError as err:  # a damaged fragment of a compressed loop, a blank frame: that frame only
            return Unreadable(f"{path}: frame {i} of {header.frames}: {err.reason}")

    # Frames up to the first that decodes are read here: a file no frame of which decodes (a transfer syntax
    # without its decoder) is refused when it opens, and a damaged first frame is only that frame.
    opening: list[np.ndarray | Unreadable] = []
    for i in range(header.frames):
        opening.append(frame(i))
        if not isinstance(opening[-1], Unreadable):
            break
    else:
        raise SourceError(f"no frame of the {header.frames} is usable; the first: {opening[0].reason}")

    def frames():
        # One frame decoded at a time: a long cine loop never sits in memory whole. A frame that does not decode
        # is skipped and counted; the loop goes on.
        yield from opening
        for i in range(len(opening), header.frames):
            yield frame(i)

    return Source(str(path), "dicom", fps, frames(), live=False)


# ---------------------------------------------------------------------------------------------------
# The two threads


_END = object()


class _Slot:
    """A queue of one between the reader and the scorer that replaces a stale frame and counts it."""

    def __init__(self, drop: bool):
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.drop = drop
        self.lock = threading.Lock()
        self.dropped: list[tuple[int, float]] = []  # (frame, time) not yet written to the CSV
        self.unreadable: list[tuple[int, float, str]] = []  # (frame, time, reason), the same

    def put(self, item) -> None:
        if not self.drop:
            self.queue.put(item)
            return
        while True:
            try:
                self.queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    stale = self.queue.get_nowait()
                except queue.Empty:
                    continue  # the scorer took it meanwhile
                with self.lock:
                    self.dropped.append(stale[:2])

    def close(self) -> None:
        self.queue.put(_END)  # blocks until the scorer took the last frame: the end is never dropped

    def take_dropped(self) -> list[tuple[int, float]]:
        with self.lock:
            taken, self.dropped = self.dropped, []
        return taken

    def skip(self, index: int, due: float, reason: str) -> None:
        with self.lock:
            self.unreadable.append((index, due, reason))

    def take_unreadable(self, before: int | None = None) -> list[tuple[int, float, str]]:
        """The unreadable frames so far (those before frame ``before``: the reader may be ahead of the scorer)."""
        with self.lock:
            taken = [u for u in self.unreadable if before is None or u[0] < before]
            self.unreadable = self.unreadable[len(taken):]  # in frame order: the taken ones are the first
        return taken


def _read(source: Source, slot: _Slot, pace: bool, counts: dict, errors: list, stop: threading.Event) -> None:
    start = time.perf_counter()
    try:
        for i, frame in enumerate(source.frames):
            if stop.is_set():
                break
            due = i / source.fps
            if pace and not source.live:  # a file is played at its frame rate, as a scanner would send it
                wait = start + due - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            counts["read"] = i + 1
            if isinstance(frame, Unreadable):
                slot.skip(i, due, frame.reason)
                continue
            slot.put((i, due, frame))
    except (ImageError, OSError, ValueError) as err:
        errors.append(err)
    finally:
        slot.close()


class _Heatmaps:
    """Grad-CAM in a child process fed through a queue of one; a frame offered while busy is skipped.

    A process, not a thread: Grad-CAM on a thread held the interpreter often enough to cut the scored
    frames of a 30 fps demo loop from 87 to 31 of 90 (measured). The child uses one TensorFlow thread,
    so it never takes more than one core from the engine.
    """

    def __init__(self, model_folder: Path, out: Path, image_size: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # a fork of a process with threads and runtimes loaded is unsafe
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.jobs = ctx.Queue(maxsize=1)
        self.results = ctx.Queue()
        from msbt.console import is_verbose

        self.process = ctx.Process(target=_gradcam_worker, args=(str(model_folder), str(out), image_size,
                                                                  self.jobs, self.results, is_verbose()), daemon=True)
        self.process.start()
        ready = self.results.get()  # loaded and traced before the stream starts
        if ready != "ready":
            self.process.join(timeout=5)
            raise RuntimeError(f"Grad-CAM worker could not start: {ready}")
        self.offered = self.skipped = self.written = 0
        self.errors: list[str] = []

    def offer(self, index: int, image: np.ndarray) -> None:
        try:
            self.jobs.put_nowait((index, image))
            self.offered += 1
        except queue.Full:
            self.skipped += 1

    def close(self) -> None:
        self.jobs.put(None)  # after the frames offered: every accepted frame gets its heatmap
        written, errors = self.results.get()
        self.process.join(timeout=30)
        self.written, self.errors = written, errors


def _gradcam_worker(model_folder: str, out: str, image_size: int, jobs, results, verbose: bool = True) -> None:
    """The child process: load the model, trace Grad-CAM once, then write one PNG per frame received.

    ``verbose``: the parent's console setting; without it TensorFlow's start-up lines are held back here too
    (a spawned process starts with logging as Python sets it, not as the command did)."""
    try:
        from msbt import console

        console.setup(verbose=verbose)
        console.import_tensorflow()
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from msbt.images.sheets import write_png
        from msbt.model.gradcam import gradcam, overlay
        from msbt.model.models import load_model

        model = load_model(Path(model_folder) / "model.keras")
        gradcam(model, np.zeros((1, image_size, image_size, 3), np.uint8))
    except Exception as err:  # reported to the parent, which refuses to start the stream
        results.put(f"{type(err).__name__}: {err}")
        return
    results.put("ready")
    written, errors = 0, []
    while (item := jobs.get()) is not None:
        index, image = item
        try:
            heat = gradcam(model, image[None])[0]
            write_png(np.hstack([image, overlay(image, heat)]), Path(out) / f"frame_{index:06d}.gradcam.png")
            written += 1
        except Exception as err:  # the stream goes on; the summary names the failure
            errors.append(f"frame {index}: {err}")
    results.put((written, errors))


# ---------------------------------------------------------------------------------------------------
# Running a stream


def stream(engine: Engine, source: Source, preparation: Preparation, threshold: Threshold,
           class_names: list[str], out_csv: str | Path, *, smoothing: Smoothing = Smoothing(),
           pace: bool = True, video: str | Path | None = None, heatmap_every: int = 0,
           heatmap_dir: str | Path | None = None, model_folder: str | Path | None = None,
           max_frames: int | None = None) -> StreamSummary:
    """Score ``source`` frame by frame with ``engine``; write the per-frame CSV (and video, heatmaps).

    Args:
        engine: A loaded engine (:func:`msbt.serve.engines.load_engine`).
        source: From :func:`open_source`.
        preparation: How the run prepared its images (``msbt.serve.predict.find_preparation``).
        threshold: The run's decision threshold.
        class_names: ``[negative, positive]``.
        out_csv: One row per frame (:data:`CSV_COLUMNS`); ``status`` is ``scored`` or ``dropped``.
        smoothing: The lesion-level score.
        pace: Read files at their frame rate and drop frames the engine cannot keep up with; False:
            score every frame as fast as possible.
        video: Write the frames with their scores drawn on them here (``.avi``/``.mp4``/``.mkv``).
        heatmap_every: Offer every N-th scored frame to Grad-CAM (0: none).
        heatmap_dir: Where heatmap PNGs go (default: beside the CSV).
        model_folder: The folder with ``model.keras`` (Grad-CAM needs the Keras model).
        max_frames: Stop after this many frames read (a device stream has no end of its own).

    Returns:
        A :class:`StreamSummary`, also written as JSON beside the CSV (``<csv>.json``).
    """
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    summary = StreamSummary(source.name, source.kind, source.fps, f"{engine.name} ({engine.precision})",
                            threshold.value, threshold.source, csv=str(out_csv))
    if max_frames is not None:
        source = Source(source.name, source.kind, source.fps, _limit(source.frames, max_frames), source.live)
    heatmaps = None
    if heatmap_every:
        if model_folder is None:
            raise ValueError("heatmaps need the model folder with model.keras")
        folder = Path(heatmap_dir) if heatmap_dir else out_csv.with_name(out_csv.stem + "-gradcam")
        heatmaps, summary.heatmaps = _Heatmaps(Path(model_folder), folder, engine.image_size), str(folder)
    slot, counts, errors, stop = _Slot(drop=pace), {"read": 0}, [], threading.Event()
    reasons: list[str] = []  # why the unreadable frames could not be read
    reader = threading.Thread(target=_read, args=(source, slot, pace, counts, errors, stop), name="msbt-reader",
                              daemon=True)
    tmp = out_csv.with_name(f".{out_csv.name}.tmp")
    writer_video = None
    smoother = Smoother(smoothing)
    start = time.perf_counter()
    reader.start()
    try:
        with tmp.open("w", newline="") as handle:
            rows = csv.writer(handle)
            rows.writerow(CSV_COLUMNS)
            try:
                while (item := slot.queue.get()) is not _END:
                    index, due, frame = item
                    _write_skipped(rows, slot, summary, reasons, before=index)
                    image = model_inputs(prepare_rgb(frame, preparation)[None], engine.image_size)
                    p = float(engine.predict(image)[0])
                    s = smoother.update(p)
                    label = class_names[int(p >= threshold.value)]
                    s_label = class_names[int(s >= threshold.value)]
                    rows.writerow([index, f"{due:.4f}", "scored", repr(p), label, repr(s), s_label,
                                   repr(threshold.value)])
                    summary.frames_scored += 1
                    if video:
                        writer_video = writer_video or _video_writer(Path(video), frame.shape, source.fps)
                        writer_video.write(_annotate(frame, p, label, s, s_label, threshold.value))
                    if heatmaps and (summary.frames_scored - 1) % heatmap_every == 0:  # frames 1, N+1, 2N+1, ...
                        heatmaps.offer(index, image[0])
            except KeyboardInterrupt:  # how a live (device) stream ends: keep what was scored
                stop.set()
                _drain(slot.queue)
                summary.notes.append("stopped by Ctrl-C")
            _write_skipped(rows, slot, summary, reasons)  # after the last scored frame (none dropped, by close())
        summary.seconds = time.perf_counter() - start  # the stream's own time, not the heatmaps' wind-down
        os.replace(tmp, out_csv)
    finally:
        tmp.unlink(missing_ok=True)
        reader.join(timeout=5)
        if writer_video is not None:
            writer_video.release()
        if heatmaps:
            heatmaps.close()
    summary.frames_read = counts["read"]
    summary.scored_fps = summary.frames_scored / summary.seconds if summary.seconds else 0.0
    summary.final_smoothed = smoother.value
    summary.final_label = class_names[int(smoother.value >= threshold.value)] if smoother.value is not None else ""
    summary.video = str(video or "")
    if heatmaps:
        summary.heatmaps_written, summary.heatmaps_skipped = heatmaps.written, heatmaps.skipped
        summary.notes += [f"heatmap failed: {e}" for e in heatmaps.errors[:3]]
    if reasons:
        summary.notes.append(f"{len(reasons)} frame(s) unreadable, not scored (rows 'unreadable' in the CSV): "
                             + "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else ""))
    if errors:
        summary.notes.append(f"stream stopped early at frame {counts['read']}: {errors[0]}")
    _write_json(summary, out_csv.with_suffix(out_csv.suffix + ".json"))
    return summary


def _write_skipped(rows, slot: _Slot, summary: StreamSummary, reasons: list[str], before: int | None = None) -> None:
    """The CSV rows of the frames dropped or unreadable since the last scored frame (up to frame ``before``),
    counted."""
    skipped = [(index, due, "dropped", "") for index, due in slot.take_dropped()]
    skipped += [(index, due, "unreadable", reason) for index, due, reason in slot.take_unreadable(before)]
    for index, due, status, reason in sorted(skipped):  # in frame order
        rows.writerow([index, f"{due:.4f}", status, "", "", "", "", ""])
        if reason:
            summary.frames_unreadable += 1
            reasons.append(reason)
        else:
            summary.frames_dropped += 1


def _drain(q: queue.Queue) -> None:
    """Empty the slot so a reader blocked on it can see the stop and end."""
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def _limit(frames: Iterator[np.ndarray], n: int) -> Iterator[np.ndarray]:
    for i, frame in enumerate(frames):
        if i >= n:
            return
        yield frame


def _video_writer(path: Path, shape: tuple, fps: float):
    from msbt.data.synth import VIDEO_CODECS  # the one table of codecs this OpenCV writes

    fourcc = VIDEO_CODECS.get(path.suffix.lower())
    if fourcc is None:
        raise ValueError(f"{path}: annotated video must end in one of {', '.join(VIDEO_CODECS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (shape[1], shape[0]))
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot open a {fourcc} video writer")
    return writer


def _annotate(frame: np.ndarray, p: float, label: str, s: float, s_label: str, threshold: float) -> np.ndarray:
    """The frame (BGR for the writer) with the frame and lesion-level calls drawn on top."""
    bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
    scale = max(0.35, frame.shape[1] / 640)
    red, green = (40, 40, 230), (60, 200, 60)
    # digits as the report gives them: a saturated model's threshold 0.00045 read "t=0.000"
    lines = [(f"frame p={threshold_text(p)} {label}", red if p >= threshold else green),
             (f"lesion {threshold_text(s)} {s_label} (t={threshold_text(threshold)})", red if s >= threshold else green)]
    for n, (text, colour) in enumerate(lines):
        y = int((n + 1) * 22 * scale) + 4
        cv2.putText(bgr, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(bgr, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, colour, 1, cv2.LINE_AA)
    return bgr


def _write_json(summary: StreamSummary, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(summary), indent=2) + "\n")
    os.replace(tmp, path)


def format_summary(summary: StreamSummary) -> str:
    """One paragraph for the terminal."""
    s = summary
    final = f"{s.final_smoothed:.4f} ({s.final_label})" if s.final_smoothed is not None else "none"
    lines = [f"{s.source} ({s.kind}, {s.source_fps:g} fps) with {s.engine}: {s.frames_read} frames read, "
             f"{s.frames_scored} scored, {s.frames_dropped} dropped"
             + (f", {s.frames_unreadable} unreadable" if s.frames_unreadable else "") + f" in {s.seconds:.2f} s "
             f"({s.scored_fps:.1f} scored frames/s); lesion-level score at the end {final}, threshold "
             f"{threshold_text(s.threshold)} from {s.threshold_source}",
             f"per-frame CSV: {s.csv} (this summary as JSON: {s.csv}.json)"]
    if s.video:
        lines.append(f"annotated video: {s.video}")
    if s.heatmaps:
        lines.append(f"heatmaps: {s.heatmaps_written} written, {s.heatmaps_skipped} skipped (busy) in {s.heatmaps}")
    lines += [f"note: {n}" for n in s.notes]
    return "\n".join(lines)
