"""Failed trials of a search: one line each on the terminal, and a full disk that stops the search.

Before, a trial's failure printed Tune's ``Trial task failed`` record with Ray's nested tracebacks (about 60
lines a trial), and a full disk under ``run.storage_path`` failed every trial of the search in turn, each after
its first epoch, before the command ended with ``no trial reported the metric yet`` (325 lines on the smoke
search on a full 60 MB tmpfs). Now each failed trial is one line naming its error (the traceback stays in its
``error.txt`` and the run's ``driver.log``), and the first full-disk error stops the search the way Ctrl-C
does (Tune's own SIGUSR1 handler): the trials that ran stay resumable and the search's state says which did not
start, so ``--resume`` with room again continues it (:func:`msbt.tune.search.run_search` raises
:class:`SearchStopped`). Imported by ``run_search`` only: this module imports Ray Tune.
"""

from __future__ import annotations

import errno
import logging
import signal
import sys
import threading
from pathlib import Path

from ray import tune

from msbt import console

log = logging.getLogger(__name__)

# A full disk, or a full quota: no trial of the search can save after one trial met it.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# What Tune logs when it is stopped by a signal; msbt's own error line says it instead.
# Ray's "Unhandled error" is the error of a trial the stop left behind, never collected (the same disk, mostly):
# workers.log and driver.log keep it.
TUNE_STOP_NOTICES = ("Stop signal received", "Experiment has been interrupted", "Trials did not complete",
                     "Unhandled error (suppress with")


class SearchStopped(OSError):
    """The search stopped because a trial found the run's disk full; ``--resume`` continues it."""

    def __init__(self, error: OSError, trial: str, experiment: Path):
        super().__init__(error.errno, error.strerror, error.filename)
        self.trial, self.experiment = trial, experiment

    def __str__(self) -> str:
        return (f"{super().__str__()} ({self.trial}); the search stopped there: free space on that disk, then run "
                f"the same command with --resume to continue {self.experiment}")


def disk_error(error: BaseException | None) -> OSError | None:
    """The full-disk ``OSError`` a chain of (Ray-wrapped) errors started from, if it did."""
    return next((e for e in console.causes(error) if isinstance(e, OSError) and e.errno in DISK_FULL), None)


def trial_name(trial) -> str:
    """The trial's folder name (``trial_00000``, msbt's ``trial_dirname``), else Tune's name for it."""
    path = getattr(trial, "path", None)
    return Path(path).name if path else str(trial)


def error_file(trial) -> Path | None:
    """Where the trial's ``error.txt`` is for the user: in the run's storage (the experiment folder). Tune writes it to
    a local folder in Ray's session directory first (gone with the session) and copies it there after this callback."""
    return Path(trial.path) / "error.txt" if getattr(trial, "path", None) else None


def trial_error(trial) -> BaseException | None:
    """The exception a failed trial raised, as Tune pickled it beside the trial (None if it could not).

    Tune writes it to the trial's local folder first and copies it to the run's storage later: read there.
    """
    from ray import cloudpickle

    local = getattr(trial, "pickled_error_file", None)
    try:
        if local and Path(local).is_file():
            return cloudpickle.loads(Path(local).read_bytes())
        return trial.get_pickled_error()
    except Exception:  # not written (a full disk), or unreadable: the caller says less
        return None


class TrialFailures(tune.Callback):
    """Says in one line why each trial failed, and stops the search at the first full disk.

    Tune pickles its callbacks into the experiment; a restored search runs that copy, so what this found is kept
    on the class, where :func:`stopped` reads it in the same process.
    """

    _stopped: tuple[str, OSError] | None = None

    def setup(self, **info):
        console.hold_back("Trial task failed for trial")  # Tune's record of what _failed says in one line

    def on_trial_error(self, iteration, trials, trial, **info):
        try:  # an exception here would end Tune's loop as a TuneError
            self._failed(trial)
        except Exception:
            log.exception("could not report the failure of %s", trial)

    def _failed(self, trial) -> None:
        error = trial_error(trial)
        name = trial_name(trial)
        where = error_file(trial)
        where = f"traceback in {where}" if where else ""
        text = console.last_line(error) if error is not None else "its error could not be kept"
        # stderr: the search sends this process's stdout to driver.log (console.printed_to_log); print(), which Ray
        # patches to redraw its bars around the line
        print(f"tune: {name} failed: {text}" + (f" ({where})" if where else ""), file=sys.stderr, flush=True)
        full = disk_error(error)
        if full is None or TrialFailures._stopped is not None or getattr(self, "_could_not_stop", False):
            return
        if stop_search():
            TrialFailures._stopped = (name, full)
            log.info("%s found the disk full (%s): stopping the search as Ctrl-C would", name, full)
        else:
            self._could_not_stop = True  # said once
            log.warning("%s found the disk full (%s); the search could not be stopped here and goes on", name, full)


def stop_search() -> bool:
    """Stop the running search as Ctrl-C does (Tune's SIGUSR1 handler: the loop ends and the state is saved for
    ``--resume``). False, and nothing done, where Tune's handler is not this process's (another thread, or a
    Tune that installs none): the search then goes on and its trials fail one by one."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        return False
    handler = signal.getsignal(signal.SIGUSR1)
    if not callable(handler) or (getattr(handler, "__module__", None) or "") != "ray.tune.tune":
        return False  # not Tune's: the default action of SIGUSR1 would end the process
    console.hold_back(*TUNE_STOP_NOTICES)
    signal.raise_signal(signal.SIGUSR1)
    return True


def reset() -> None:
    """Forget an earlier search's stop (a later search in the same process, as in tests)."""
    TrialFailures._stopped = None


def stopped() -> tuple[str, OSError] | None:
    """``(trial, error)`` of the full disk that stopped the search of this process, if one did."""
    return TrialFailures._stopped


def check_stopped(experiment: Path) -> None:
    """Raise :class:`SearchStopped` if a full disk stopped the search.

    Raises:
        SearchStopped: naming the file that could not be written and the trial.
    """
    found = stopped()
    if found is not None:
        raise SearchStopped(found[1], found[0], experiment)

