"""Benchmark helper: run a command and say which kinds of process used the machine's CPU while it ran.

    python benchmarks/cpu_by_process.py -- bash .ci/run                      # the whole CI run
    python benchmarks/cpu_by_process.py -- .venv/bin/python -m pytest -n 0 tests/integration/test_tune.py
    python benchmarks/cpu_by_process.py --interval 0.25 --top 50 -- bash scripts/run-main.sh

The suite and msbt's jobs are CPU-bound on a 2-core machine, so what shortens them is fewer CPU-seconds,
and those are spread over many short-lived processes: Ray Train's worker and helper actors per stage, Ray
Data's tasks, each cluster's daemons and dashboard, the workflow scripts the tests start. This samples every
process of the machine every ``--interval`` seconds from ``/proc`` (Linux only, standard library only, so
it can wrap the CI script before any virtual environment exists) and adds each one's CPU time to a group
named from its command line:

* Ray workers by their process title, ``ray::TrainController.run`` -> ``ray::TrainController``. Ray
  retitles a worker when it takes a task or an actor and reuses task workers, so the CPU between two samples
  goes to the title seen at the first; what a worker used while starting or ``ray::IDLE`` goes to the next
  title it shows (its task or actor), or stays ``ray::IDLE`` if it was never seen running anything (a task
  shorter than the interval can hide there);
* Ray's daemons (``raylet``, ``gcs_server``, the dashboard and its module processes, the log monitor,
  ...) by their program;
* other Python processes by their script or module (``pytest``, ``workflows/pipeline.py``, ...).

It prints a Markdown table, largest first, and the machine's busy CPU-seconds from ``/proc/stat`` (user,
nice, system, irq, softirq) over the same time: the difference is what the sampling missed (a process that
ended and was reaped between two samples loses at most one interval of CPU), this sampler's own CPU, which the
table leaves out, and other users' work. The command's exit status is passed on (128 + N for signal N).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")
# names a process may still change: Ray retitles a worker when it takes a task or an actor
PROVISIONAL = ("ray::IDLE", "ray worker (starting)", "multiprocessing child (starting)")
# Ray's daemons, by the program that runs (a raylet's own command line names default_worker.py, so its arguments
# must not decide): (the end of the executable or script path, label)
RAY_DAEMONS = (("/gcs_server", "ray gcs_server"), ("/raylet", "ray raylet"), ("dashboard/dashboard.py", "ray dashboard"),
               ("dashboard/agent.py", "ray dashboard agent"), ("_private/log_monitor.py", "ray log_monitor"),
               ("autoscaler/_private/monitor.py", "ray autoscaler monitor"),
               ("runtime_env/agent/main.py", "ray runtime_env agent"))


def group(cmdline: str) -> str:
    """The group a process's command line belongs to."""
    if cmdline.startswith("ray::"):
        title = cmdline.split()[0]
        # a task's title names its function (ray::execute._propagate_data_context): kept whole; an actor's
        # names its class and the method running now: the class is the group
        if "." in title and title[5:].lstrip("_")[:1].isupper():
            title = title.split(".")[0]
        return title.split("(")[0][:60]
    if "ray-dashboard-" in cmdline:
        return "ray dashboard module"
    words = cmdline.split()
    if not words:
        return "(unnamed: ended or a kernel thread)"
    # the program: the executable, or a Python interpreter's script (after its options, e.g. `python -u x.py`)
    python = "python" in os.path.basename(words[0])
    program = next((w for w in words[1:] if not w.startswith("-")), words[0]) if python else words[0]
    for end, label in RAY_DAEMONS:
        if program.endswith(end):
            return label
    if "from multiprocessing" in cmdline:  # the dashboard starts its modules so, then retitles them
        return PROVISIONAL[2]
    if program.endswith(("default_worker.py", "setup_worker.py")):  # the latter sets up a runtime env, then execs
        return PROVISIONAL[1]
    if python:
        args = words[1:]
        if "-m" in args and args.index("-m") + 1 < len(args):
            return f"python -m {args[args.index('-m') + 1]}"
        if "execnet" in cmdline or cmdline.startswith(words[0] + " -u -c import sys;exec"):
            return "pytest-xdist worker"
        for word in args:
            if word.endswith("/bin/ray"):
                return "ray (command line)"
            if word.endswith(".py"):
                return "python " + re.sub(r"^.*?site-packages/|^.*?(?=(workflows|benchmarks|scripts|bin)/)", "", word)
        return "python (other)"
    return os.path.basename(words[0])[:40]


def read_processes() -> dict[tuple[str, str], tuple[float, str]]:
    """``{(pid, start time): (CPU seconds, command line)}`` for every process that can be read."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        found[(pid, fields[19])] = ((int(fields[11]) + int(fields[12])) / HZ, cmdline)
    return found


def machine_busy() -> float:
    """Busy CPU-seconds of the whole machine since boot: user, nice, system, irq, softirq (guest time is
    already in user; steal is another machine's)."""
    with open("/proc/stat") as handle:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in handle.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / HZ


class Tally:
    """CPU-seconds by group. The CPU a process used between two samples goes to the title it showed at the
    first of them (a task worker that ended its task by the second sample is ``ray::IDLE`` again); CPU used
    under a provisional title (starting, idle) waits for the next real title the process shows."""

    def __init__(self, before: dict[tuple[str, str], float], own_pid: int):
        self.seen = dict(before)  # CPU time of each process at its last sample (processes older than the run)
        self.own = str(own_pid)
        self.pending: dict[tuple[str, str], float] = {}  # CPU held while the title was provisional
        self.cpu: collections.Counter = collections.Counter()
        self.members: dict[str, set] = collections.defaultdict(set)
        self.names: dict[tuple[str, str], str] = {}  # the last title seen (an ended process shows none)

    def _credit(self, key, title: str, seconds: float) -> None:
        if seconds > 0:
            self.cpu[title] += seconds
            self.members[title].add(key)

    def add(self, processes: dict[tuple[str, str], tuple[float, str]]) -> None:
        for key, (cpu, cmdline) in processes.items():
            if key[0] == self.own:
                continue
            used = cpu - self.seen.get(key, 0.0)
            self.seen[key] = cpu
            previous = self.names.get(key)
            title = group(cmdline) if cmdline else (previous or group(""))
            self.names[key] = title
            if previous is not None and previous not in PROVISIONAL:
                self._credit(key, previous, used)
            elif title in PROVISIONAL:
                self.pending[key] = self.pending.get(key, 0.0) + used
            else:
                self._credit(key, title, self.pending.pop(key, 0.0) + used)

    def close(self) -> None:
        """Processes that never left a provisional title keep it."""
        for key, held in self.pending.items():
            self._credit(key, self.names[key], held)
        self.pending.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples (default 0.5)")
    parser.add_argument("--top", type=int, default=40, help="groups to print (default 40)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if not 0.01 <= args.interval <= 60:
        parser.error(f"--interval must be between 0.01 and 60 seconds, got {args.interval}")

    tally = Tally({key: cpu for key, (cpu, _) in read_processes().items()}, os.getpid())
    busy, started = machine_busy(), time.time()
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        parser.error(f"cannot run {command[0]!r}: {exc}")

    def exited() -> bool:
        # WNOWAIT: the child stays a zombie, whose /proc entry still holds its CPU time, until sampled
        return os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    try:
        while not exited():
            tally.add(read_processes())
            time.sleep(args.interval)
    except KeyboardInterrupt:  # the child got it too (same terminal): let it end, then report
        while True:
            try:
                os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
                break
            except KeyboardInterrupt:
                continue
    tally.add(read_processes())
    tally.close()
    code = child.wait()
    wall, busy = time.time() - started, machine_busy() - busy

    total = sum(tally.cpu.values())
    print(f"\n{' '.join(command)}: exit {code}, {wall:.1f} s wall; machine busy {busy:.1f} CPU-s, "
          f"of which {total:.1f} seen in processes (sampled every {args.interval} s)\n")
    print("| CPU-s | share | processes | group |\n|---:|---:|---:|---|")
    ranked = tally.cpu.most_common()
    for name, seconds in ranked[:args.top]:
        print(f"| {seconds:.1f} | {seconds / max(total, 1e-9):.1%} | {len(tally.members[name])} | {name} |")
    rest = ranked[args.top:]
    if rest:
        print(f"| {sum(s for _, s in rest):.1f} | | {sum(len(tally.members[n]) for n, _ in rest)} | "
              f"{len(rest)} more groups |")
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
