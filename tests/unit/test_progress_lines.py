"""Progress off a terminal (msbt.console): a log, a pipe or `ray job logs` gets one plain line per step and per
epoch, never a bar's redraws. No Ray: the worker bars' state updates are the JSON lines Ray forwards."""

import contextlib
import io
import json
import sys

import pytest

from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

from msbt import console


def bar_state(desc, x, total, closed, unit="batch"):
    """One state update of a Ray worker's bar, as Ray forwards it (a JSON line carrying Ray's magic key)."""
    return json.dumps({"__magic_token__": RAY_TQDM_MAGIC, "desc": desc, "x": x, "total": total,
                       "unit": unit, "closed": closed, "uuid": "u", "pid": 7, "ip": "127.0.0.1", "pos": 0})


def test_a_worker_bar_is_one_line_when_it_closes():
    assert console.closed_bar_line(bar_state("stage 1 epoch 1/3", 1, 3, closed=False)) is None
    done = bar_state("stage 1 epoch 1/3: loss 0.5000 val_loss 0.6000", 3, 3, closed=True)
    assert console.closed_bar_line(done) == "stage 1 epoch 1/3: loss 0.5000 val_loss 0.6000"
    # closed short of its total (an interrupted epoch): the count says so
    assert console.closed_bar_line(bar_state("stage 2 epoch 4/8", 1, 3, closed=True)) == "stage 2 epoch 4/8 (1/3 batches)"
    assert console.closed_bar_line("not json") is None and console.closed_bar_line("[1, 2]") is None


Piped = io.StringIO  # isatty() is False: what a log file or a pipe answers


@contextlib.contextmanager
def worker_output_handler(monkeypatch, folder, *, verbose=False, hidden=False):
    """The handler route_worker_output installs, to be fed what Ray's dispatcher hands it (no cluster needed);
    the dispatcher's handlers are put back afterwards."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    saved = dict(dispatcher.handlers)
    monkeypatch.setitem(console._state, "folder", folder)
    monkeypatch.setitem(console._state, "verbose", verbose)
    monkeypatch.setitem(console._state, "workers", None)
    monkeypatch.setitem(console._state, "workers_hidden", hidden)
    dispatcher.add_handler("ray_print_logs", lambda data: None)  # as ray.init registers it
    try:
        assert console.route_worker_output()
        yield dict(dispatcher.handlers)["ray_print_logs"]
    finally:
        dispatcher.remove_handler("ray_print_logs")
        if "ray_print_logs" in saved:  # this process's own Ray, if it had one
            dispatcher.add_handler("ray_print_logs", saved["ray_print_logs"])


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_off_a_terminal_a_step_is_one_line_at_its_end(monkeypatch):
    err = Piped()
    monkeypatch.setattr(sys, "stderr", err)
    bar = console.progress(total=4, desc="scan", unit="file")
    assert isinstance(bar, console.LineProgress)
    bar.update(2)
    assert err.getvalue() == ""  # nothing while it runs
    bar.update(2)
    bar.set_description("scan (4 found)")
    bar.close()
    bar.close()  # once
    assert err.getvalue() == "scan (4 found): 4/4 files\n"
    assert list(console.progress(iter(range(3)), desc="store", unit="image")) == [0, 1, 2]
    with console.progress(total=None, desc="trials", unit="trial") as trials:
        trials.update()
    assert err.getvalue().splitlines()[1:] == ["store: 3 images", "trials: 1 trial"]  # no total known: the count
    # counts read as counts ("24/24 file" before); one stays singular, tqdm's "it" as it is
    with console.progress(total=1, desc="predict", unit="image") as one:
        one.update()
    assert err.getvalue().splitlines()[-1] == "predict: 1/1 image"
    assert [console.counted(u, 2) for u in ("batch", "field", "it", "")] == ["batches", "fields", "it", ""]
    assert "\r" not in err.getvalue()


def test_a_long_step_off_a_terminal_says_how_far_it_is_now_and_then(monkeypatch):
    err = Piped()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(console.LineProgress, "LINE_EVERY_S", 0.0)  # every update is "a minute later"
    bar = console.progress(total=3, desc="scan", unit="file")
    bar.update()
    bar.update()
    bar.close()
    assert err.getvalue().splitlines() == ["scan: 1/3 files ...", "scan: 2/3 files ...", "scan: 2/3 files"]


def test_on_a_terminal_a_step_is_a_bar(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = console.progress(total=2, desc="scan", unit="file")
    assert not isinstance(bar, console.LineProgress)
    bar.update(2)
    bar.close()
    assert "\r" in term.getvalue() and "scan" in term.getvalue()


def test_ctrl_c_takes_the_workers_bars_off_a_terminal(monkeypatch):
    """Ray's bar manager (this process draws the workers' bars) keeps no bar to redraw below the last line."""
    import builtins

    from ray.experimental import tqdm_ray

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(tqdm_ray, "_manager", None)
    monkeypatch.setattr(builtins, "print", builtins.print)  # instance() patches print; put back afterwards
    monkeypatch.setitem(console._state, "workers_hidden", False)
    manager = tqdm_ray.instance()
    manager.process_state_update(json.loads(bar_state("stage 1 epoch 2/3", 1, 3, closed=False)))
    assert sum(len(g.bars_by_uuid) for g in manager.bar_groups.values()) == 1
    assert "stage 1 epoch 2/3" in term.getvalue()
    console.hide_worker_output()
    assert console._state["workers_hidden"]
    assert sum(len(g.bars_by_uuid) for g in manager.bar_groups.values()) == 0
    drawn = len(term.getvalue())
    tqdm_ray.safe_print("msbt: interrupted", file=sys.stderr)  # Ray's print: hide the bars, print, redraw them
    assert term.getvalue()[drawn:] == "msbt: interrupted\n"


@pytest.mark.parametrize("hidden, verbose", [(False, False), (True, False), (True, True)])
def test_worker_bars_reach_a_log_as_lines_and_stop_after_ctrl_c(tmp_path, monkeypatch, hidden, verbose):
    """The handler route_worker_output installs, fed what Ray's dispatcher hands it (no cluster needed)."""
    import builtins

    from ray.experimental import tqdm_ray

    err, out = Piped(), Piped()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(tqdm_ray, "_manager", None)  # Ray's bar manager, made when Ray is handed a line
    monkeypatch.setattr(builtins, "print", builtins.print)  # which patches print; put back afterwards
    with worker_output_handler(monkeypatch, tmp_path, verbose=verbose, hidden=hidden) as handle:
        handle({"pid": 7, "is_err": False, "lines": [
            bar_state("stage 1 epoch 1/2", 1, 3, closed=False),
            bar_state("stage 1 epoch 1/2: loss 0.5000", 3, 3, closed=True),
            "an INFO line of the worker"]})
    assert err.getvalue() == ("" if hidden else "stage 1 epoch 1/2: loss 0.5000\n")
    # no bar went to Ray, whose manager would draw one it does not know (printing a line makes the manager)
    manager = tqdm_ray._manager
    assert manager is None or not any(g.bars_by_uuid for g in manager.bar_groups.values())
    assert ("an INFO line" in out.getvalue()) == verbose  # --verbose shows it; else only in workers.log
    assert (tmp_path / console.WORKERS_LOG).read_text() == "(pid=7) an INFO line of the worker\n"


def test_a_worker_line_being_written_when_a_command_ends_comes_before_its_last_line(tmp_path, monkeypatch):
    """Ray's log thread may be writing a worker's epoch line at the moment Ctrl-C ends the command:
    hide_worker_output waits for that write, so the command's own line comes after it, and no worker line after."""
    import threading

    writing, release = threading.Event(), threading.Event()

    class SlowPipe(Piped):  # a pipe whose reader is slow: the first worker line's write takes a while
        def write(self, text):
            if "epoch" in text and not release.is_set():
                writing.set()
                release.wait(10)
            return super().write(text)

    err = SlowPipe()
    monkeypatch.setattr(sys, "stderr", err)

    def worker_line(desc):
        return {"pid": 7, "is_err": False, "lines": [bar_state(desc, 3, 3, closed=True)]}

    def command_ends():  # what msbt.cli.main does on Ctrl-C
        console.hide_worker_output(drop_bars=False)
        sys.stderr.write("msbt: interrupted\n")

    with worker_output_handler(monkeypatch, tmp_path) as handle:
        log_thread = threading.Thread(target=handle, args=(worker_line("stage 1 epoch 1/2: loss 0.5"),))
        log_thread.start()
        try:
            assert writing.wait(10)
            main = threading.Thread(target=command_ends)
            main.start()
            main.join(0.3)
            assert main.is_alive() and err.getvalue() == "", "the last line did not wait for the line being written"
        finally:
            release.set()
        log_thread.join(10)
        main.join(10)
        handle(worker_line("stage 1 epoch 2/2: loss 0.4"))  # the workers go on until Ray shuts down
    assert err.getvalue() == "stage 1 epoch 1/2: loss 0.5\nmsbt: interrupted\n"


def test_ending_a_command_that_never_loaded_ray_does_not_load_it():
    """hide_worker_output runs inside the SIGTERM handler: a scan (no Ray) stopped by SIGTERM once imported Ray
    there, and its stop line came 0.8 s late (4.5 s from signal to exit on a slow host, past the 3 s before
    `ray job stop`'s SIGKILL). In a fresh process, since this one has Ray loaded."""
    import subprocess

    from helpers import ROOT

    code = ("import sys; from msbt import console; console._state['verbose'] = False; "
            "console.hide_worker_output(); console.hide_worker_output(drop_bars=False); "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
