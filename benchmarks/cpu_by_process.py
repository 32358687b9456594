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

* Ray workers by their process title, ``ray::TrainController.run`` -> ``ray::TrainController`` (a worker
  is named by what it became: Ray renames a ``ray::IDLE`` worker when it takes a task or an actor; a
  worker that never did stays ``ray::IDLE``);
* Ray's daemons (``raylet``, ``gcs_server``, the dashboard and its module processes, the log monitor,
  ...) by their program;
* other Python processes by their script or module (``pytest``, ``workflows/pipeline.py``, ...).

It prints a Markdown table, largest first, and the machine's busy CPU-seconds from ``/proc/stat`` over the
same time: the difference is what the sampling missed (processes that ended between two samples lose
at most one interval of CPU each) plus other users' work. The command's exit status is passed on.
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
RAY_DAEMONS = ("gcs_server", "raylet", "dashboard/dashboard.py", "dashboard/agent.py", "log_monitor.py",
               "autoscaler/_private/monitor.py", "runtime_env/agent/main.py", "job_supervisor")


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
    if "from multiprocessing" in cmdline:  # the dashboard starts its modules so, then retitles them
        return PROVISIONAL[2]
    if "default_worker.py" in cmdline:
        return PROVISIONAL[1]
    for daemon in RAY_DAEMONS:
        if daemon in cmdline:
            return f"ray {daemon.rsplit('/', 1)[-1].removesuffix('.py')}"
    words = cmdline.split()
    if not words:
        return "(unnamed: ended or a kernel thread)"
    if "python" in os.path.basename(words[0]):
        rest = [w for w in words[1:] if not w.startswith("-") or w == "-m"]
        if rest[:1] == ["-m"] and len(rest) > 1:
            return f"python -m {rest[1]}"
        if "execnet" in cmdline or cmdline.startswith(words[0] + " -u -c import sys;exec"):
            return "pytest-xdist worker"
        for word in rest:
            if word.endswith("/bin/ray"):
                return "ray (command line)"
            if word.endswith(".py"):
                return "python " + re.sub(r"^.*?(workflows/|benchmarks/|scripts/|bin/)", r"\1", word)
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
    """Busy CPU-seconds of the whole machine since boot (all but idle and iowait)."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / HZ


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

    before = {key: cpu for key, (cpu, _) in read_processes().items()}
    latest: dict[tuple[str, str], float] = {}
    names: dict[tuple[str, str], str] = {}
    busy, started = machine_busy(), time.time()
    child = subprocess.Popen(command)

    def sample():
        for key, (cpu, cmdline) in read_processes().items():
            latest[key] = cpu
            name = names.get(key)
            # Ray renames a worker when it takes work; keep the latest name until it says what it became
            if name is None or name in PROVISIONAL:
                names[key] = group(cmdline) if cmdline else (name or group(""))

    try:
        while child.poll() is None:
            sample()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        child.wait()
    sample()
    wall, busy = time.time() - started, machine_busy() - busy

    cpu, count = collections.Counter(), collections.Counter()
    for key, seconds in latest.items():
        used = seconds - before.get(key, 0.0)
        if used > 0 and key[0] != str(os.getpid()):
            cpu[names[key]] += used
            count[names[key]] += 1
    total = sum(cpu.values())
    print(f"\n{' '.join(command)}: exit {child.returncode}, {wall:.1f} s wall; machine busy {busy:.1f} CPU-s, "
          f"of which {total:.1f} seen in processes (sampled every {args.interval} s)\n")
    print("| CPU-s | share | processes | group |\n|---:|---:|---:|---|")
    for name, seconds in cpu.most_common(args.top):
        print(f"| {seconds:.1f} | {seconds / max(total, 1e-9):.1%} | {count[name]} | {name} |")
    rest = cpu.most_common()[args.top:]
    if rest:
        print(f"| {sum(s for _, s in rest):.1f} | | {sum(count[n] for n, _ in rest)} | {len(rest)} more groups |")
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
