"""Joining or starting a Ray cluster, for entry points only (never at import)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import stat
from pathlib import Path

log = logging.getLogger(__name__)


def started_cluster() -> str | None:
    """The address of a live cluster started with `ray start` on this machine, or None.

    `ray start` records its address in `<ray temp dir>/ray_current_cluster` and `ray stop` removes it;
    a cluster whose processes died without `ray stop` (a crash, a reboot) leaves the file behind. Its
    port is probed, so a stale file means "no cluster" rather than a connection attempt that waits.
    `ray.init(address="auto")` is avoided on purpose: it also joins ANY gcs_server it finds with `ps`,
    such as the private cluster of another job (or a test session) on the same machine.
    """
    from ray._common.utils import get_ray_address_file  # where `ray start` writes it (Ray 2.60)

    try:
        with open(get_ray_address_file(None)) as f:
            address = f.read().strip()
    except OSError:
        return None
    if _no_answer(address) is None:
        return address
    log.warning("ignoring a stale Ray address %r (no cluster answers there; `ray stop` cleans it)", address)
    return None


def _no_answer(address: str, timeout: float = 2.0) -> str | None:
    """Why nothing answers at a ``host:port`` Ray address (a TCP connect, ``timeout`` seconds), or None when
    something does. Other forms (``ray://``, ``auto``) are left to Ray (None)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster a job was submitted to, or to one started with `ray start`, or start one.

    Args:
        address: a cluster address, or "local" for a private cluster even when another one runs;
            None uses $RAY_ADDRESS (set by `ray job submit`) or a live local cluster started with
            `ray start`, and otherwise starts a private local one.
        num_cpus: CPUs of a private local cluster (ignored when joining one).
    """
    import ray

    from msbt import console

    if ray.is_initialized():
        return
    console.tame_ray()  # Ray's start-up lines go to the run's log (unless --verbose)
    target = address or os.environ.get("RAY_ADDRESS") or started_cluster()
    if target and target != "local" and (why := _no_answer(target)):
        # ray.init would retry a dead address for ever (measured: --address 127.0.0.1:1 still retrying after 200 s)
        from msbt.config import ConfigError

        given = "--address" if address else "$RAY_ADDRESS"
        raise ConfigError(f"{given} {target}: no Ray cluster answers there ({why}); start one with `ray start "
                          "--head`, or use --address local for a private cluster of this command")
    dashboard = None
    with _keep_sigterm_handler():
        if target and target != "local":
            if _on_this_machine(target, started_by_ray_start=not address and not os.environ.get("RAY_ADDRESS")):
                _send_token_if_any()
            dashboard = getattr(ray.init(address=target, **_own_address(target)), "dashboard_url", None)
        else:
            start_private(num_cpus)
            dashboard = _private_dashboard
    console.tame_ray()  # now that Ray is connected: what its workers print goes to the log too
    print(describe_cluster(target if target and target != "local" else None, ray.cluster_resources(), dashboard),
          flush=True)
    log.info("Ray: %s", ray.cluster_resources())


def _on_this_machine(target: str, started_by_ray_start: bool) -> bool:
    """Whether a cluster address is this machine's: the cluster ``ray start`` recorded here, or a loopback one."""
    import ipaddress

    if started_by_ray_start:
        return True
    host = target.rsplit(":", 1)[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _send_token_if_any() -> None:
    """Before joining a cluster of this machine (:func:`_on_this_machine`): send this account's Ray token when
    there is one and ``RAY_AUTH_MODE`` is unset.

    A cluster of ``ray start`` with token authentication refused a client without ``RAY_AUTH_MODE=token``: 20
    lines of "InvalidAuthToken" from Ray's GCS client over about 20 s, then "Failed to connect to Ray cluster",
    which does not name the variable. Ray turns token mode on by itself only for a cluster it finds without an
    address, a local one; msbt passes the address of the one ``ray start`` recorded here (``started_cluster``), so
    this does what Ray does for that one, with Ray's own function (which refreshes Ray's cached config; setting the
    variable alone came too late), and for a loopback address as well. An address of another machine never gets
    the token unasked (it would go to whoever runs that cluster). A cluster without authentication accepts a
    client that sends the token (measured with Ray 2.60); ``RAY_AUTH_MODE`` set by the user is kept."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray: its own behaviour
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@contextlib.contextmanager
def _keep_sigterm_handler():
    """Put back a SIGTERM handler of the caller's after ``ray.init``.

    On the main thread ``ray.init`` replaces the SIGTERM handler with ``sys.exit`` (a private cluster's
    node with "kill every process, then exit 1"), so the CLI's handler (msbt.cli: a line, the Ctrl-C
    clean-up, exit 143) would end at the first command that starts Ray. Only a Python handler is put
    back (the default action and SIG_IGN are left to Ray); the clean-up it triggers ends Ray itself.
    """
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(previous):
            signal.signal(signal.SIGTERM, previous)


def _own_address(target: str) -> dict:
    """``ray.init`` keywords that give every task and actor of this job the cluster's GCS address.

    Ray Train's placement-group cleaner (an actor, started for a Tune trial's stage; any state-API client in
    an actor does the same) finds its cluster through ``$RAY_ADDRESS``, else by
    looking for every ``gcs_server`` on the machine: on a `ray start` cluster beside another one (a
    private cluster of another msbt job, a test session) it logged "Found multiple active Ray instances"
    and could ask the wrong one. A job's driver has the variable (`ray job submit` sets it); the actors
    it starts have only the job's runtime environment, which Ray merges with this one. Only for a
    plain ``host:port`` (a ``ray://`` client address is not the GCS).
    """
    host, _, port = target.rpartition(":")
    if "://" in target or not host or not port.isdigit():
        return {}
    return {"runtime_env": {"env_vars": {"RAY_ADDRESS": target}}}


# The GCS address of the private cluster this process started (start_private), or None: a joined cluster may
# grow (an autoscaler adds nodes), a private one never does. (A cluster of a plain `ray.init()` counts as joined.)
_private_address: str | None = None
_private_dashboard: str | None = None  # its dashboard's host:port
_warned: set[tuple[str, str]] = set()  # check_placeable's warnings already given


def private_cluster() -> str | None:
    """The address of the private cluster this process started (it ends with the process), or None: the
    process joined a cluster that outlives it, or none."""
    import ray

    if _private_address is not None and ray.is_initialized() \
            and ray.get_runtime_context().gcs_address == _private_address:
        return _private_address
    return None


def unplaceable(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> str | None:
    """Why Ray could never place ``bundles`` (one resource request each, all at once) on ``nodes`` as they are
    (each node's total resources), or None when it can. Each bundle must fit on one node, and together they must
    fit in the nodes' sum (a necessary condition, not a packing: Ray's own scheduler decides the rest)."""
    for resource in sorted({key for bundle in bundles for key in bundle if bundle[key] > 0}):
        largest = max((node.get(resource, 0.0) for node in nodes), default=0.0)
        each = max(bundle.get(resource, 0.0) for bundle in bundles)
        total = sum(node.get(resource, 0.0) for node in nodes)
        asked = sum(bundle.get(resource, 0.0) for bundle in bundles)
        if each > largest:
            return (f"each needs {each:g} {resource}, and the largest node has {largest:g}" if largest
                    else f"the cluster has no {resource}")
        if asked > total + 1e-9:
            return f"together they need {asked:g} {resource}, and the cluster has {total:g}"
    return None


def check_placeable(what: str, bundles: list[dict[str, float]], settings: str) -> None:
    """Refuse, or say, a resource request the cluster as it is could never meet, before Ray is asked for it.

    Ray waits for resources it cannot place: Ray Train retries its worker group every 60 s for ever, with a
    traceback each time (measured: ``run.num_workers=3`` on a 2-CPU machine), and Tune and Serve wait as well.
    On msbt's private cluster no node will ever join, so the request is refused (ConfigError naming the
    settings); on a joined cluster an autoscaler may add nodes, so a warning says what is waited for.

    Args:
        what: what asks, e.g. "stage 2's Ray Train workers (2)".
        bundles: one resource request per worker, replica or trial, e.g. ``[{"CPU": 1.0}] * 2``.
        settings: the config keys that set them, named in the message.
    """
    import ray

    from msbt.config import ConfigError

    if not ray.is_initialized():  # a library caller without a cluster: Ray starts one later, as it sees fit
        return
    nodes = [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]
    problem = unplaceable(bundles, nodes)
    if problem is None:
        return
    if private_cluster() is not None:
        raise ConfigError(f"{what}: {problem} ({settings}); this private local cluster gets no more, so Ray "
                          "would wait for ever: lower the settings, or run on a larger cluster (--address)")
    if (what, problem) not in _warned:  # once per process, not once per stage or fold
        _warned.add((what, problem))
        log.warning("%s: %s (%s); Ray waits until nodes join (an autoscaler), and otherwise for ever: Ctrl-C stops it",
                    what, problem, settings)


def describe_cluster(address: str | None, resources: dict, dashboard: str | None) -> str:
    """One line about the cluster a command runs on: which one, its CPUs/GPUs, its dashboard."""
    where = f"cluster at {address}" if address else "private local cluster"
    gpus = f", {resources['GPU']:g} GPUs" if resources.get("GPU") else ""
    seen = f"; dashboard http://{dashboard}" if dashboard else ""
    return f"Ray: {where} ({resources.get('CPU', 0):g} CPUs{gpus}){seen}"


def start_private(num_cpus: int | None = None, **options) -> str:
    """Start a private local cluster that listens on loopback only and that all its processes can name.

    Args:
        num_cpus: CPUs of the cluster (default: all).
        options: More ``ray.init`` keywords (the test suite's cluster passes ``log_to_driver=False``).

    Returns:
        Its GCS address (``127.0.0.1:<port>``), which every task and actor of it finds in ``RAY_ADDRESS``.

    Three settings, each for a measured problem (issue #13, items 9 and 10; docs/reliability.md):

    * Loopback only. Ray binds its GCS, raylet, object manager, workers, dashboard agent and metrics
      ports to the node's IP, which ``ray.init`` takes from the route to the outside (0.0.0.0 or the LAN
      address: reachable from the network, and the metrics ports answer without a token). With
      ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray uses the loopback address as the node IP (what it does
      on macOS/Windows), and a private cluster needs no other node.
    * Its own address everywhere. Ray Train's placement-group cleaner (an actor, a Tune trial's) finds
      "its" cluster through the state API with no address, i.e. ``$RAY_ADDRESS`` or else every
      ``gcs_server`` on the machine: with two msbt jobs it logged "Found multiple active Ray instances" and
      could query the wrong cluster, so a Tune trial's placement group was never removed. The GCS port is chosen here
      (``RAY_GCS_SERVER_PORT``) so the address is known before the cluster starts and goes into the
      job's runtime environment (every task and actor). Not into this process's own environment: a
      process it starts later, after this cluster ended, would try to join the dead address.
    * The token file private: :func:`protect_token` before Ray would write it with the umask (0644).

    And two for speed: no Ray Train preemption watcher in a cluster of one node (:func:`_no_preemption_watcher`),
    and a log monitor that lists the log folder once a second rather than ten times (:func:`_calm_log_monitor`).
    And one for a busy machine: Serve's HTTP proxy has longer to start before Serve replaces it
    (:func:`_patient_serve_proxy`).

    A start that misses one of Ray's fixed waits (the raylet's 30 s to register, the dashboard's
    RAY_DASHBOARD_STARTUP_TIMEOUT_S), as a busy small machine can, is stopped and made once more
    (:data:`START_ATTEMPTS`), with the dashboard's wait doubled.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        before = _children()
        try:
            with _dashboard_wait(attempt):
                return _start_private_once(num_cpus, options)
        except Exception as err:  # Ray raises bare Exceptions for both start-up timeouts
            import ray

            if ray.is_initialized():  # the cluster is up (what failed came after): Ray owns it, nothing to stop
                raise
            slow = _slow_start(err, before)
            retry = slow is not None and attempt < START_ATTEMPTS
            # Ray keeps no handle on a cluster whose start failed: its processes are stopped here, and its
            # session folder removed when it is started again (else kept: Ray's error names its logs).
            _stop_new_processes(before, remove_session=retry)
            if not retry:
                raise
            log.warning("Ray's private cluster did not start in time (%s); its processes were stopped, starting "
                        "it again (attempt %d of %d)", slow, attempt + 1, START_ATTEMPTS)
    raise AssertionError("unreachable")


# A private cluster is started at most this often: Ray gives the raylet a fixed 30 s to register with the GCS and
# the dashboard RAY_DASHBOARD_STARTUP_TIMEOUT_S (60 s) to come up, which a busy small machine can miss.
START_ATTEMPTS = 2


def _start_private_once(num_cpus: int | None, options: dict) -> str:
    """One start of the private cluster (:func:`start_private` says how and why); returns its GCS address."""
    global _private_address, _private_dashboard
    import ray

    protect_token()
    port = free_port()
    address = f"127.0.0.1:{port}"
    # These variables only while the cluster starts: its GCS, raylet and (through the raylet) its workers
    # keep them; this process's later clusters, and processes it starts later, get the usual behaviour.
    with _environment(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_GCS_SERVER_PORT=str(port), **_calm_log_monitor(),
                      **_patient_serve_proxy()), \
            _loopback_node_ip():
        # A private cluster lives and dies with this process: on Linux Ray starts its GCS and raylet with
        # PR_SET_PDEATHSIG (their workers follow the raylet), so even a driver killed with SIGKILL leaves
        # no cluster behind, and no address file: a rerun starts its own.
        # With the dashboard: it serves the state API, which Ray Train's placement-group cleaner (started for
        # a Tune trial's stage, msbt.train.runner.stage_trainer) needs.
        # Without it a Tune trial stopped early (ASHA) leaves its Train worker's placement group
        # reserved, and on a small machine the next trial's data read waits for that CPU forever
        # (measured: the suite's Tune test hung at "Pending Demands: {'CPU': 1.0}" with 1.0 CPU held
        # by a dead trial). It also lets the user watch the run, at the address the "Ray:" line prints: a free
        # port, not Ray's 8265, which a cluster the user starts later with `ray start` would then find taken (its
        # dashboard and job server did not start, and `ray job submit` to :8265 reached this private cluster).
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                           dashboard_port=free_port(),
                           runtime_env={"env_vars": {"RAY_ADDRESS": address, **_no_preemption_watcher()}}, **options)
    protect_token()
    _private_address = address
    _private_dashboard = getattr(context, "dashboard_url", None) or None
    return address


def _children() -> set[int]:
    """The process ids of this process's children and their children."""
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)}


def _slow_start(err: Exception, before: set[int]) -> str | None:
    """Why a private cluster failed to start, when a retry can help (it was slow, not broken); else None.

    Two waits of Ray 2.60 end in a bare ``Exception``: the raylet's registration with the GCS ("The current
    node timed out during startup", a fixed 30 s in ``ray/_private/node.py``) and the dashboard's start
    (``ray/_private/services.py``: "Failed to start a dashboard.", or the last lines of its log). Slow means
    that the process waited for is still running; one that exited has failed for good (a broken install, a
    port taken): no retry then.
    """
    from ray._private import ray_constants

    text = str(err)
    if "timed out during startup" in text:
        waited, reason = "/raylet", "the raylet did not register within Ray's 30 s"  # the raylet program
    elif "dashboard" in text:
        waited = "/dashboard/dashboard.py"
        reason = f"the dashboard was still starting after {ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S} s"
    else:
        return None
    running = _running(_new_ray_processes(before))
    return reason if any(part.endswith(waited) for cmdline in running for part in cmdline[:3]) else None


def _running(processes: list) -> list[list[str]]:
    """The command lines of those of ``processes`` still running (not exited, not zombies)."""
    import psutil

    out = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                out.append(process.cmdline())
    return out


def _new_ray_processes(before: set[int]) -> list:
    """This process's children started since ``before`` that belong to a Ray cluster: their command line names
    a Ray session folder or a program of the ``ray`` package (gcs_server, raylet, dashboard, monitors, agents)."""
    import psutil
    import ray

    package = str(Path(ray.__file__).parent)
    found = []
    for child in psutil.Process().children(recursive=True):
        if child.pid in before:
            continue
        with contextlib.suppress(psutil.Error):
            if any(package in part or "/session_" in part for part in child.cmdline()):
                found.append(child)
    return found


def _stop_new_processes(before: set[int], remove_session: bool) -> None:
    """Stop what a failed start left: the Ray processes this process started since ``before`` and, with
    ``remove_session``, their session folder (the half-started cluster's logs and sockets)."""
    import re

    import psutil

    new = _new_ray_processes(before)
    sessions = set()
    for cmdline in _running(new):
        for part in cmdline:
            if match := re.search(r"(/\S*?/session_[^/\s]+)", part):
                sessions.add(Path(match.group(1)))
    for process in new:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(new, timeout=10)
    for folder in sessions if remove_session else ():
        if folder.name != "session_latest":
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _dashboard_wait(attempt: int):
    """Ray's wait for the dashboard: on a retry twice what it was, and at least Ray's default 60 s (Ray reads
    RAY_DASHBOARD_STARTUP_TIMEOUT_S into a module constant at import; ``services.py`` looks the constant up
    on every start)."""
    from ray._private import ray_constants

    before = ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S
    if attempt > 1:
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = max(60, 2 * before)
    try:
        yield
    finally:
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = before


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def _no_preemption_watcher() -> dict[str, str]:
    """Ray Train's preemption watcher off in a private cluster, unless the user set the variable.

    Ray Train 2.60 starts a watcher actor (a process of its own) with every worker group, to report nodes
    being taken back (spot instances). A loopback-only cluster is one node that nothing can take back;
    the process cost about 1 s of start-up per stage and Tune trial (benchmarks/stage_startup.py).
    """
    return {} if PREEMPTION_WATCHER_ENV in os.environ else {PREEMPTION_WATCHER_ENV: "0"}


# Ray 2.60's log monitor (ray/_private/log_monitor.py) reads these when it starts.
LOG_MONITOR_ENV = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "1"}


def _calm_log_monitor() -> dict[str, str]:
    """Settings for the private cluster's log monitor, except those the user set.

    The log monitor (the process that sends workers' output to the driver) lists the session's log folder
    every 0.1 s while it holds fewer than 1000 files, and that folder gains files with every worker: a
    long-lived cluster paid for it all along (the test suite's two session clusters: 100 CPU-s of 2,320 in
    a two-process run). With the threshold at 0 it lists the folder once every ``LOG_NAME_UPDATE_INTERVAL_S``
    (1 s here): over 30 s with 300 finished workers' files, 0.20 CPU-s instead of 1.06
    (benchmarks/log_monitor.py, docs/suite-time.md). It still reads the files it knows ten times a second;
    a new worker's file is found up to a second later and read from its first line, or missed if the
    cluster ends within that second (0.1 s with Ray's settings).
    """
    return _unless_set(LOG_MONITOR_ENV)


# Ray Serve 2.60's controller reads this when it starts (ray/serve/_private/constants.py); its default is 5 s.
SERVE_PROXY_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "20"}


def _patient_serve_proxy() -> dict[str, str]:
    """Give Serve's HTTP proxy 20 s, not 5, to answer each readiness check, unless the user set the variable.

    Serve's controller marks a proxy that misses three readiness checks in a row unhealthy and kills it, and
    ``serve.start`` waits on the first proxy only: on a busy two-core machine (the CI's, with a training test
    beside it) that proxy's worker process had not started within those three 5 s checks, was killed before it
    ran, and ``msbt serve`` failed with ``ActorDiedError: ... ProxyActor ... killed by ray.kill``. Three 20 s
    checks are the 60 s that ``serve.start`` itself waits for the proxy (HTTP_PROXY_TIMEOUT).
    """
    return _unless_set(SERVE_PROXY_ENV)


def _unless_set(values: dict[str, str]) -> dict[str, str]:
    """Those of ``values`` whose variable this process's environment does not set already (the user's wins)."""
    return {key: value for key, value in values.items() if key not in os.environ}


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it; the cluster binds it a moment later), and none of the
    fixed ports Ray gives its other components by default: Ray refuses a GCS port equal to one of them
    ("dashboard_agent_http is trying to use a port number 52365 that is used by other components", seen once
    in the suite: the OS had picked 52365, inside Linux's range of ports it picks from)."""
    from ray._private import ray_constants

    # 52365 lies in Linux's range; the others (6379, 8265, 10001: Ray Client's server) only where it is widened
    taken = {ray_constants.DEFAULT_PORT, ray_constants.DEFAULT_DASHBOARD_PORT,
             ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT, 10001}
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def protect_token(path: str | Path | None = None) -> Path:
    """Make Ray's token file (``~/.ray/auth_token``, or ``$RAY_AUTH_TOKEN_PATH``) readable by its owner only.

    Anyone who can read the token can run code on the cluster. Ray creates the file with the process
    umask (0644 measured: world-readable); a missing file is created here first, mode 0600, with a token
    of Ray's own form (64 hex digits), which Ray then uses; an existing one is narrowed to 0600.
    """
    path = Path(path or os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it just now; narrowed below
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o600)
        log.info("%s: made readable by its owner only (0600)", path)
    return path


@contextlib.contextmanager
def _environment(**values: str):
    """Set environment variables for the ``with`` block, then put back what was there."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _loopback_node_ip():
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER into a module constant when it is first imported, which
    # may have happened before this call: the constant follows the variable for the block.
    import ray._private.ray_constants as ray_constants  # Ray 2.60: ENABLE_RAY_CLUSTER

    before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
