"""The console and the log files of a run: one line per step and progress bars on the terminal, the rest
in ``runs/<name>/logs/``.

A run's terminal used to be a wall of Ray Data execution plans, TensorFlow start-up notices (its CUDA
probe prints ``failed call to cuInit`` on every CPU machine) and a ``TrainingReport(...)`` dump per epoch
from every worker. By default (``verbose=False``):

* msbt's own step lines (``print``) and warnings reach the terminal; its INFO logs go to the log file;
* the ``ray`` and ``ray.data`` loggers of this process write to the log file, and only their warnings
  reach the terminal (a few known notices, such as Ray's "token authentication is enabled", not even those),
  each as one line: a traceback or the further lines of a message stay in the log file;
* what Ray workers print (Train workers and controller, Ray Data's coordinators, TensorFlow inside them)
  is forwarded to this process by Ray as usual, but written to ``logs/workers.log``; the terminal gets
  only their progress bars (``ray.experimental.tqdm_ray``) and lines that name a Python exception; of what the
  raylet sends the driver, its notice about many worker processes starting at once goes there too;
* TensorFlow's C++ logging is set to warnings and up (``TF_CPP_MIN_LOG_LEVEL=2``) before it is imported,
  the CUDA probe is skipped where there is no NVIDIA device (``CUDA_VISIBLE_DEVICES=""``; never where one
  exists) and the lines TensorFlow prints before its logging is set up are captured into the log file
  (TensorFlow 2.21 still logs ``failed call to cuInit`` with no visible device); commands without a run
  folder (predict, export, external, ensemble, report) hold them back and show them only if the import fails;
* what Tune prints itself during a search (``View detailed results here``, whatever its verbosity) goes to
  the log file (:func:`printed_to_log`), and Tune's trials draw no Ray Data bars.

``verbose=True`` (``msbt --verbose``) leaves Ray's and TensorFlow's output on the terminal as before;
the log files are written either way. The log files are ``driver.log`` (Python logging of this process
and TensorFlow's start-up lines) and ``workers.log`` (every line a Ray worker printed, with its actor name
and pid), both appended to by every command run on the same run folder.

Progress bars: :func:`progress` in this process and :func:`worker_progress` inside Ray workers. Once Ray
is connected both are Ray's own ``tqdm_ray`` bars, drawn by this process, so a bar of a Train worker and
one of the driver never overwrite each other. Where stderr is not a terminal (output to a file or a pipe,
`ray job logs`, CI) nothing is redrawn: each step and each epoch is one plain line when it ends, and a long step
of this process one more a minute (workers' bars only where their output is routed: a command with a run folder).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import logging.handlers
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

LOG_DIR = "logs"
DRIVER_LOG = "driver.log"
WORKERS_LOG = "workers.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the terminal's, without --verbose

# Warnings that Ray prints on every run of a default setup; the README explains them, the log keeps them.
KNOWN_NOTICES = (
    "Token authentication is enabled for this Ray cluster",
    "Progress bars disabled",
    # TensorFlow's warning when one process scores several models in turn (each fold's or seed's model: each
    # is traced once, as it must be); it advises on code that retraces one function, which this is not
    "triggered tf.function retracing",
)
# A forwarded worker line that names a Python exception ("ValueError: ...", "Traceback (most recent ...").
ERROR_LINE = re.compile(r"^(Traceback \(most recent call last\)|[\w.]*[A-Z]\w*(Error|Exception)\b.*)")

_state: dict = {"verbose": True, "console": None, "buffer": None, "file": None, "folder": None,
                "workers": None, "workers_hidden": False, "held_back": (), "console_format": None}
# Held by route_worker_output's handler (on Ray's log thread) while it decides what to show and shows it, and
# taken by hide_worker_output to set its flag: a worker line being written when a command ends is written in
# full before the command's last line, and none starts after it.
_output_lock = threading.Lock()
OUTPUT_LOCK_WAIT_S = 1.0  # the longest hide_worker_output waits for it (a reader that stopped reading a pipe)


def has_gpu() -> bool:
    """Whether this machine shows an NVIDIA GPU: a ``/dev/nvidia<N>`` device or ``nvidia-smi`` on PATH."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None


def quiet_environment(verbose: bool = False) -> dict[str, str]:
    """Set, before TensorFlow is imported, the environment that keeps its notices off the terminal.

    Variables already set by the user are kept. Ray workers started by this process inherit them; for
    workers of a cluster the same values are in ``workflows/runtime_env.yaml``.

    Args:
        verbose: Change nothing.

    Returns:
        The variables set here (name -> value).
    """
    if verbose:
        return {}
    # gRPC's INFO lines (e.g. "Other threads are currently calling into gRPC, skipping fork() handlers", from a
    # Serve replica) are C++ log lines no Python logger catches
    wanted = {"TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR"}
    if not has_gpu():
        # No device, so nothing is hidden; TensorFlow's own probe would only print a CUDA error.
        wanted["CUDA_VISIBLE_DEVICES"] = ""
    changed = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(changed)
    return changed


class _NoticeFilter(logging.Filter):
    """Keeps known, harmless notices, Python's warnings module and what Ray Data marks for its log file only off
    the terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Ray Data's own terminal handler drops records with ``hide`` set (its "Full stack trace:" of a failed task,
        # kept for ray-data.log); this handler replaces that one, so it drops them too (driver.log keeps them).
        if record.name == "py.warnings" or getattr(record, "hide", False):
            return False
        message = record.getMessage()
        return not any(notice in message for notice in (*KNOWN_NOTICES, *_state["held_back"]))


class _QuietFormatter(logging.Formatter):
    """The terminal's format without ``--verbose``. A record of Ray's loggers that carries a traceback (Tune's
    "Trial task failed", a Ray Data task's error) or a message of several lines (Ray's "Unhandled error" with the
    error's text) is shown as its first line and, for an exception, the exception's own last line; the rest is in
    the run's ``driver.log``, whose handler formats the record whole."""

    def format(self, record: logging.LogRecord) -> str:
        if not record.name.startswith("ray"):
            return super().format(record)
        message = record.getMessage()
        if not (record.exc_info or record.stack_info or "\n" in message.strip()):
            return super().format(record)
        lines = message.strip().splitlines()
        brief = logging.makeLogRecord(record.__dict__)  # a copy: Formatter caches exc_text on the record
        brief.msg, brief.args = lines[0] if lines else "", None
        brief.exc_info = brief.exc_text = brief.stack_info = None
        text = super().format(brief)
        if record.exc_info and record.exc_info[1] is not None:
            text = f"{text.rstrip(':')}: {last_line(record.exc_info[1])}"
        elif named := named_error(lines[1:]):  # the error a message of several lines carries (Ray's "Unhandled
            text += f": {named}"  # error ...: <task header> ... OSError: ...")
        folder, log_file = _state["folder"], _state["file"]
        if folder is None or log_file is None or getattr(log_file, "failed", False):  # none, or a full disk
            return text + " (--verbose shows the rest)"
        return text + f" (the rest in {folder / DRIVER_LOG})"


def causes(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from, outermost first: a Ray error's original (``.cause``, which
    Ray sets on ``RayTaskError`` and keeps across processes) or Python's ``__cause__`` (``raise ... from``)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        cause = getattr(error, "cause", None)
        error = cause if isinstance(cause, BaseException) else error.__cause__


def last_line(error: BaseException) -> str:
    """``Type: message`` of the exception a chain of Ray errors started from, first line of the message only.

    Ray wraps a worker's exception (``RayTaskError(OSError)``, Train's ``WorkerGroupError``, Tune's trial error)
    in text that repeats its traceback; :func:`causes` leads to the original.
    """
    *_, error = causes(error)
    try:
        lines = [ln for ln in str(error).splitlines() if ln.strip()]
    except Exception:  # an exception whose __str__ fails
        lines = []
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def named_error(lines: Iterable[str]) -> str | None:
    """The last line of a printed traceback or error text that names an exception (``OSError: ...``), if any."""
    named = [ln.strip() for ln in lines if ERROR_LINE.match(ln.strip()) and not ln.strip().startswith("Traceback")]
    return named[-1] if named else None


def setup(verbose: bool = False, debug: bool = False) -> None:
    """Configure logging for a command: terminal handler now, the run's log file once it is known.

    Until :func:`attach_run` names the run folder, records are held in memory (then written to the file).

    Args:
        verbose: Show INFO logs and Ray's/TensorFlow's output on the terminal.
        debug: DEBUG level everywhere (implies nothing about the terminal otherwise).
    """
    quiet_environment(verbose)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for handler in (_state["console"], _state["buffer"], _state["file"]):  # an earlier command of this process
        if handler is not None:
            for name in ("", "ray", "ray.data"):
                logging.getLogger(name).removeHandler(handler)
            handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    console_format = logging.Formatter(FORMAT) if verbose or debug else _QuietFormatter(QUIET_FORMAT)
    console.setFormatter(console_format)
    if not verbose:
        console.addFilter(_NoticeFilter())
    buffer = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    buffer.setLevel(root.level)
    root.addHandler(console)
    root.addHandler(buffer)
    logging.captureWarnings(True)
    _state.update(verbose=verbose, console=console, buffer=buffer, file=None, folder=None, workers=None,
                  workers_hidden=False, held_back=(), console_format=console_format)


class RunLogHandler(logging.FileHandler):
    """The run's ``driver.log``. When a write fails for the disk (a full one: ``OSError``) it says so once on stderr
    and keeps nothing more; any other failure (a bad format string) is logging's usual report, and logging goes on.

    Python's logging prints ``--- Logging error ---`` with two tracebacks to stderr for every record a handler
    fails to write: on a full disk during a Ray Data step, 682 lines ended the command where 16 say what happened.
    """

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            super().handleError(record)
            return
        if self.failed:
            return
        self.failed = True
        with contextlib.suppress(Exception):  # stderr closed, or itself on the full disk (captured_stderr)
            sys.stderr.write(f"msbt: note: {self.baseFilename} can no longer be written ({err}); "
                             "this run's log lines from here on are not kept\n")

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError) if self.failed else contextlib.nullcontext():
            super().flush()

    def close(self) -> None:
        # the unwritten bytes stay in the file's buffer, and closing flushes them once more
        with contextlib.suppress(OSError, ValueError) if self.failed else contextlib.nullcontext():
            super().close()


def attach_run(run_folder: str | Path) -> Path:
    """Write this process's logs to ``<run folder>/logs/driver.log`` from now on (and what came before).

    Returns:
        The logs folder.
    """
    folder = Path(run_folder) / LOG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if _state["folder"] == folder:
        return folder
    root = logging.getLogger()
    for name in ("ray", "ray.data"):  # tame_ray() gave them the previous file (or the buffer)
        for old in (_state["file"], _state["buffer"]):
            if old is not None:
                logging.getLogger(name).removeHandler(old)
    handler = RunLogHandler(folder / DRIVER_LOG, encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(root.level)  # Ray Data's logger passes DEBUG records; INFO unless --debug
    if _state["file"] is not None:
        root.removeHandler(_state["file"])
        _state["file"].close()
    buffer = _state["buffer"]
    if buffer is not None:
        buffer.setTarget(handler)
        buffer.flush()
        root.removeHandler(buffer)
        _state["buffer"] = None
    root.addHandler(handler)
    _state.update(file=handler, folder=folder)
    if "ray" in sys.modules:
        tame_ray()
    return folder


def is_verbose() -> bool:
    """Whether the command runs with ``--verbose`` (Ray's and TensorFlow's output on the terminal)."""
    return bool(_state["verbose"])


def log_folder() -> Path | None:
    """The logs folder of the run this process writes to, if one is attached."""
    return _state["folder"]


def tame_ray() -> None:
    """Route the ``ray`` and ``ray.data`` loggers of this process, and the output of Ray's workers, to the
    log files; without ``verbose`` also off the terminal. A no-op before Ray is imported; called again
    after ``ray.init`` (the worker output hook exists only then)."""
    if "ray" not in sys.modules:
        return
    quiet = not _state["verbose"]
    # Importing Ray Data sets up its logger (terminal handler included): do it now, so that is undone here.
    import ray.data  # noqa: F401

    ours = [h for h in ((_state["console"] if quiet else None), _state["file"] or _state["buffer"]) if h is not None]
    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)  # both have propagate=False and a terminal handler of their own
        for handler in list(logger.handlers):
            if quiet and type(handler).__name__ == "PlainRayHandler" or (
                    handler in (_state["file"], _state["buffer"]) and handler not in ours):
                logger.removeHandler(handler)
        for handler in ours:
            if handler not in logger.handlers:
                logger.addHandler(handler)
    keep_own_formats()
    if quiet:
        # Ray Data's own bars would draw one per operator of every small read; msbt draws one per step.
        ray.data.DataContext.get_current().enable_progress_bars = False
    route_worker_output()


def keep_own_formats() -> None:
    """Give the terminal's and the log file's handlers their own formats back.

    ``ray.init`` sets Ray's format on every handler of the ``ray`` logger (``ray._private.ray_logging.setup_logger``),
    these included once :func:`tame_ray` has put them there: the terminal then showed Ray's records (a failed Tune
    trial's, with its tracebacks) in Ray's format instead of the quiet one, and driver.log lost the logger's name.
    """
    if _state["console"] is not None and _state["console_format"] is not None:
        _state["console"].setFormatter(_state["console_format"])
    if _state["file"] is not None:
        _state["file"].setFormatter(logging.Formatter(FORMAT))


def route_worker_output() -> bool:
    """Write what Ray workers print to ``logs/workers.log``; show only progress bars and exception lines.

    Ray 2.60 has no public setting for where forwarded worker output goes (only ``log_to_driver`` on or
    off, and off would also lose the workers' progress bars), so this replaces the handler that Ray's
    ``ray.init`` registers on its output dispatcher, under the same name. Ray's own printing function still
    draws what is shown (progress bars, de-duplication). Returns False where that hook is missing (another
    Ray version, or Ray not connected), leaving Ray's default.
    """
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return False
    _route_raylet_notices(ray_worker)  # also for a command without a run folder (msbt serve)
    if _state["folder"] is None:
        return False
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC
    except ImportError:
        return False
    registered = dict(dispatcher.handlers)  # (name, function) pairs
    if "ray_print_logs" not in registered:  # Ray not connected, or log_to_driver=False
        return False
    if registered["ray_print_logs"] is _state["workers"]:
        return True
    show = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=False)

    def handle(data: dict) -> None:
        # Read at each call: a later command of this process (tests) may attach another run folder.
        lines, folder = data.get("lines", []), _state["folder"]
        if data.get("is_err"):
            # Ray Train V2 turns print() in its workers into a log record that reaches stderr as well as
            # stdout: a bar's state would arrive twice and a late copy would redraw a closed bar.
            lines = [ln for ln in lines if RAY_TQDM_MAGIC not in ln]
        name = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({name} pid={data.get('pid')}) ".replace("( ", "(")
        try:
            with (folder / WORKERS_LOG).open("a", encoding="utf-8") as out:
                out.writelines(prefix + line + "\n" for line in lines if RAY_TQDM_MAGIC not in line)
            logged = True
        except (OSError, TypeError):  # the folder is gone: show everything rather than lose it
            logged = False
        with _output_lock:  # hide_worker_output waits for this: no worker line starts after the last line
            if _state["workers_hidden"]:
                # The command is ending (hide_worker_output): no bar goes back to Ray's manager, which would draw
                # one it no longer knows as new, below the last line, verbose or not.
                lines = [ln for ln in lines if RAY_TQDM_MAGIC not in ln]
            elif not _on_terminal():
                # A log, a pipe, `ray job logs`: a bar's redraws would be kilobytes of \r per epoch there; each
                # worker bar becomes one plain line when it closes, and Ray's bar manager never sees it.
                bars = [ln for ln in lines if RAY_TQDM_MAGIC in ln]
                lines = [ln for ln in lines if RAY_TQDM_MAGIC not in ln]
                try:  # on Ray's log thread: an error here would end it, and workers.log with it
                    for text in filter(None, map(closed_bar_line, bars)):
                        sys.stderr.write(text + "\n")
                    sys.stderr.flush()
                except (OSError, ValueError):  # the reader went away (`| head`), or stderr is closed at exit
                    pass
            if _state["workers_hidden"] and not _state["verbose"]:
                # the command is ending (hide_worker_output): its line stays the last, even when workers.log could
                # not take these (a full disk: seen as a worker's traceback below the error line)
                shown = []
            elif _state["verbose"] or not logged:
                shown = lines
            else:
                # The autoscaler's own warnings (e.g. a resource request that cannot be met) stay visible.
                alert = data.get("pid") == "autoscaler"
                shown = [ln for ln in lines if RAY_TQDM_MAGIC in ln or ERROR_LINE.match(ln)
                         or alert and ("Warning:" in ln or "Error:" in ln)]
            if shown:
                show({**data, "lines": shown})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handle)
    _state["workers"] = handle
    return True


# What the raylet sends every driver on a busy small machine (a Tune search starts trial, controller and worker
# processes at once): harmless there, and read as a fault.
RAYLET_NOTICES = ("PYTHON worker processes have been started on node",
                  # serve.shutdown: Serve's controller ends itself inside its own graceful_shutdown task
                  "Task ServeController.graceful_shutdown failed")


def _route_raylet_notices(ray_worker) -> None:
    """Send the raylet's known notices (``RAYLET_NOTICES``) to ``workers.log`` instead of the terminal (a command
    without a run folder drops them).

    Ray prints the raylet's messages to this driver (``listen_error_messages``) with ``print_to_stdstream`` directly,
    not through the dispatcher :func:`route_worker_output` hooks, so this wraps that function of Ray 2.60's private
    module, once per process. Every other raylet message (a worker killed for memory, one that died) is shown as
    before, and with ``verbose`` all of them.
    """
    original = ray_worker.print_to_stdstream
    if getattr(original, "__wrapped_by_msbt__", False):
        return

    def print_to_stdstream(data, ignore_prefix):
        folder = _state["folder"]
        if data.get("pid") == "raylet" and not _state["verbose"]:
            lines = data.get("lines", [])
            known = [ln for ln in lines if any(notice in ln for notice in RAYLET_NOTICES)]
            if known:
                try:
                    if folder is not None:  # a command without a run folder (msbt serve) has no log to keep them
                        with (folder / WORKERS_LOG).open("a", encoding="utf-8") as out:
                            out.writelines(f"(raylet) {line}\n" for line in known)
                    data = {**data, "lines": [ln for ln in lines if ln not in known]}
                except OSError:  # the folder is gone or the disk full: shown rather than lost
                    pass
                if not data["lines"]:
                    return None
        return original(data, ignore_prefix)

    print_to_stdstream.__wrapped_by_msbt__ = True
    ray_worker.print_to_stdstream = print_to_stdstream


def _on_terminal() -> bool:
    """Whether progress is drawn as bars (stderr is a terminal) or written as plain lines (a log, a pipe)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def counted(unit: str, count: int | None) -> str:
    """``unit`` as a count of it reads in a line: ``3 files``, ``1 file``, ``2 batches`` (tqdm's bars show the
    unit per second, where the singular is right; a plain line said "24/24 file"). tqdm's "it" stays as is."""
    if not unit or unit == "it" or count == 1:
        return unit
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


def closed_bar_line(state_json: str) -> str | None:
    """The plain line of a Ray worker's bar (one ``tqdm_ray`` state update), or None until the bar closes.

    The line is the bar's description (for an epoch bar it carries the epoch's metrics), with its count when
    the bar closed short of its total (an interrupted epoch).
    """
    try:
        state = json.loads(state_json)
    except ValueError:
        return None
    if not isinstance(state, dict) or not state.get("closed"):
        return None
    desc, done, total = str(state.get("desc") or "").rstrip(": "), state.get("x"), state.get("total")
    if isinstance(done, int) and isinstance(total, int) and done < total:
        unit = state.get("unit")
        return f"{desc} ({done}/{total}{f' {counted(unit, total)}' if unit else ''})"
    return desc


class LineProgress:
    """:func:`progress` where stderr is not a terminal: one line when the step ends, and one every
    ``LINE_EVERY_S`` while a long step runs (a log being followed still moves).

    Supports what msbt's steps use of a ``tqdm`` bar: ``update``, ``n``, ``set_description``, ``close``,
    iteration and ``with``.
    """

    LINE_EVERY_S = 60.0

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it"):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)
        self.n, self.closed, self.last_line = 0, False, time.monotonic()

    def _write(self, suffix: str = "") -> None:
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        sys.stderr.write(f"{self.desc}: {count} {counted(self.unit, self.n if self.total is None else self.total)}"
                         f"{suffix}\n")
        sys.stderr.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last_line >= self.LINE_EVERY_S and not self.closed:
            self.last_line = time.monotonic()
            self._write(" ...")

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write()

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def hold_back(*fragments: str) -> None:
    """Keep log records whose message contains one of ``fragments`` off the terminal from now on, for the rest of
    the command (the log file keeps them): for a library's notice that msbt has replaced with a line of its own."""
    _state["held_back"] = (*_state["held_back"], *fragments)


def _drop_repeated_lines() -> None:
    """Forget the worker lines Ray holds back as repeats ("[repeated 3x across cluster]"), which it prints at
    ``ray.shutdown``, after the command's last line, straight to the terminal (not through route_worker_output's
    handler). workers.log has them already. Ray 2.60's private deduplicators; another layout keeps Ray's way.

    Looked up, never imported: a command that has not loaded Ray (a scan) has no repeats held back, and importing
    Ray here, inside the SIGTERM handler, delayed the stop line by the import (0.8 s on the 2-core machine, 4.5 s
    from signal to exit on a slow host, past the 3 s before ``ray job stop``'s SIGKILL)."""
    logging_module = sys.modules.get("ray._private.ray_logging")
    if logging_module is None:
        return
    for name in ("stdout_deduplicator", "stderr_deduplicator"):
        deduplicator = getattr(logging_module, name, None)  # None: another Ray layout
        if deduplicator is not None:
            with contextlib.suppress(Exception):
                deduplicator.flush()


def hide_worker_output(*, drop_bars: bool = True) -> None:
    """Show nothing more of what Ray workers print, for the rest of the command (``workers.log`` still gets it).

    For a command's last line after Ctrl-C or SIGTERM: the workers go on printing until Ray shuts down at the
    process's exit, and a progress bar redrawn after "msbt: interrupted ..." read as if training went on
    (seen on the smoke run: a bar of the next epoch below the line in most runs). With ``verbose`` the workers'
    lines go on showing; the bars on the screen are dropped either way.

    Args:
        drop_bars: Also take the workers' bars now on the screen off it. False inside a signal handler, where
            only the flag is set (nothing written; Ray's bar manager's lock not taken).
    """
    # Under the handler's lock (route_worker_output): a worker line being written is finished first, and the
    # handler reads the flag before it writes anything more. Ray's log thread holds the lock, never the main
    # thread; the wait is bounded all the same (a pipe whose reader stopped reading blocks that thread's write).
    locked = _output_lock.acquire(timeout=OUTPUT_LOCK_WAIT_S)
    _state["workers_hidden"] = True
    if locked:
        if not _state["verbose"]:
            _drop_repeated_lines()
        _output_lock.release()
    if not drop_bars:
        return
    # The bars Ray's bar manager draws here for the workers are taken off the screen and dropped: it redraws them
    # below every print() (it patches print to hide, print, unhide) and draws each once more when it closes it,
    # and no update of theirs reaches it any more. Ray 2.60's private structures (tqdm_ray._manager, the same
    # kind of hook as route_worker_output's); another layout leaves the bars as they are.
    tqdm_ray = sys.modules.get("ray.experimental.tqdm_ray")
    manager = getattr(tqdm_ray, "_manager", None)  # None: no bar was ever drawn in this process
    if manager is None:
        return
    try:
        with manager.lock:
            for group in manager.bar_groups.values():
                for bar in group.bars_by_uuid.values():
                    bar.bar.leave = False  # closing clears its line instead of printing it once more
                    bar.bar.close()
                group.bars_by_uuid.clear()
    except Exception:  # best effort (another Ray layout, a terminal gone away): never instead of the line
        pass


@contextlib.contextmanager
def captured_stderr():
    """Send what is written to file descriptor 2 (C++ libraries included) to ``driver.log`` meanwhile.

    Without a log folder (a command that works on a checkpoint or export, such as ``msbt predict``) it goes
    to a temporary file instead, which is written back to the terminal only if the block fails, so that an
    error is never hidden. With ``verbose`` nothing is captured.
    """
    folder = _state["folder"]
    if _state["verbose"]:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with (open(folder / DRIVER_LOG, "ab") if folder is not None else tempfile.TemporaryFile()) as log_file:
            os.dup2(log_file.fileno(), 2)
            try:
                yield
            except BaseException:
                if folder is None:  # what was held back may explain the failure
                    sys.stderr.flush()
                    log_file.seek(0)
                    os.write(saved, log_file.read())
                raise
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


@contextlib.contextmanager
def printed_to_log():
    """Send what this process ``print``s (Python's ``sys.stdout``) to ``driver.log`` meanwhile: for library
    code that prints where a logger would do (Tune prints "View detailed results here: ..." at every search's
    start, whatever its verbosity). Progress bars draw on stderr and stay.

    Without a log folder (or with ``verbose``) nothing is redirected.
    """
    folder = _state["folder"]
    if _state["verbose"] or folder is None:
        yield
        return
    sys.stdout.flush()
    # Line-buffered: a search killed hard (SIGKILL, an out-of-memory kill) keeps every line it printed; with a
    # block buffer the lines waited for the next flush (Ray's printing of a worker line flushed stdout, but off a
    # terminal worker bars are written as plain lines, and Tune's start-up line was lost with a killed search).
    try:
        log_file = open(folder / DRIVER_LOG, "a", encoding="utf-8", buffering=1)
    except OSError:  # the folder is gone: the prints stay where they were
        log_file = None
    if log_file is None:  # outside the handler: an error of the body is not chained to this one
        yield
        return
    try:
        with contextlib.redirect_stdout(_ThisThreadTo(log_file, sys.stdout)):
            yield
    finally:
        with contextlib.suppress(OSError, ValueError):  # a full disk: the unwritten rest is dropped, as below
            log_file.close()


class _ThisThreadTo:
    """A stdout that sends what the thread that made it writes to ``log``, and every other thread's writes (Ray's
    thread that prints forwarded worker lines, which the console already filters) to ``terminal`` as before.

    A write the log file refuses (a full disk) drops that text and the rest of it, rather than failing the print: the
    prints are a library's notices, and Tune's at the end of a search had ended the command with a bare
    ``[Errno 28] No space left on device`` (the log's own handler says once that the file can no longer be written).
    """

    def __init__(self, log, terminal):
        self._log, self._terminal, self._thread = log, terminal, threading.get_ident()
        self._log_failed = False

    def write(self, text: str) -> int:
        if threading.get_ident() != self._thread:
            return self._terminal.write(text)
        if not self._log_failed:
            try:
                return self._log.write(text)
            except (OSError, ValueError):
                self._log_failed = True
        return len(text)

    def flush(self) -> None:
        if not self._log_failed:
            try:
                self._log.flush()
            except (OSError, ValueError):
                self._log_failed = True
        self._terminal.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding...: the terminal's
        return getattr(self._terminal, name)


def import_tensorflow() -> None:
    """Import TensorFlow and Keras and let it probe its devices, with its start-up lines in the log file.

    TensorFlow 2.21 prints a few lines (oneDNN notice, "Could not find cuda drivers") through absl before
    its log level applies, and the device probe logs ``failed call to cuInit`` where no GPU exists; both
    happen once per process, so doing them here, captured, keeps them off the terminal for good.
    """
    with captured_stderr():
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()


def _in_ray_worker() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it"):
    """A progress bar for a long step of this process (an iterable wrapper, or ``update(n)`` by hand).

    On a terminal: with Ray connected a ``tqdm_ray`` bar, so it shares the screen with the bars of Ray
    workers; before that a plain ``tqdm`` bar on stderr. Where stderr is not a terminal (a log file, a pipe,
    `ray job logs`), a :class:`LineProgress`: one line when the step ends, and one a minute while it runs.
    Close it (or use it as a context manager) when the step ends.
    """
    if not _on_terminal():
        return LineProgress(iterable, total=total, desc=desc, unit=unit)
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            from ray.experimental.tqdm_ray import tqdm as ray_tqdm

            return _Closing(ray_tqdm(iterable, desc=desc, total=total, unit=unit))
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.2)


def worker_progress(*, total: int | None = None, desc: str = "", unit: str = "it"):
    """A progress bar inside a Ray worker, drawn by the driver (``ray.experimental.tqdm_ray``)."""
    from ray.experimental.tqdm_ray import tqdm as ray_tqdm

    return _Closing(ray_tqdm(desc=desc, total=total, unit=unit))


class _Closing:
    """Adds what ``tqdm_ray.tqdm`` lacks for use like ``tqdm``: ``with``, ``__iter__`` that closes."""

    def __init__(self, bar):
        self.bar = bar

    def __getattr__(self, name):
        return getattr(self.bar, name)

    def __iter__(self):
        try:
            yield from self.bar
        finally:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        return False
