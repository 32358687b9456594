"""`msbt serve`: an exported stage-2 model as a Ray Serve HTTP application.

Endpoints (FastAPI ingress of one deployment, ``Classifier``):

* ``POST /predict``: the body is one image file's bytes (PNG, JPEG, BMP, TIFF, 8 or 16 bit, grey or
  colour). Answer: JSON ``{"probability", "label", "threshold", "threshold_source", "model_id",
  "lineage_sha256", "engine"}``. The image is prepared exactly as ``msbt predict`` prepares a file
  (``decode_image`` with the run's 16-bit policy, ``prepare_rgb``, ``model_inputs``). Bytes that are not
  a usable image get HTTP 400 with the reason (never a 500); a body above ``serve.max_request_mb``
  gets 413 before it is decoded.
* ``GET /healthz``: ``{"status": "ok", "model_id", "lineage_sha256", "engine"}`` once the replica has its
  engine loaded.

Requests are scored in dynamic batches (``@serve.batch``: up to ``serve.max_batch_size`` images, or
whatever arrived within ``serve.batch_wait_timeout_s`` of the first), ``serve.streams`` batches at once.
Replicas, CPUs and GPUs per replica come from the ``serve:`` config section (or a Serve config file); the
engine gets as many threads as Ray assigned its replica CPUs, so replicas on one machine do not fight over
cores.

No ``from __future__ import annotations`` here: FastAPI reads the ``Request`` annotation at runtime, and
as a string it took ``request`` for a query parameter (every POST answered 422; measured).

Deploy it with ``msbt serve MODEL`` (which starts or joins a Ray cluster), or with Ray's own CLI from a
config file (``serve run workflows/serve.yaml``, ``serve deploy workflows/serve.yaml``) through
:func:`build_app`.
"""


import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from msbt.config import ConfigError, ServeConfig, from_dict
from msbt.raycluster import check_placeable, private_cluster

log = logging.getLogger(__name__)
APP_NAME = "msbt"  # the Serve application's name on the cluster
# How long msbt waits for the HTTP proxies that replaced one Serve killed while it started (serve.start's own wait),
# and for the application to answer through them once deployed
PROXY_WAIT_S = 60.0
api = FastAPI(title="msbt", description="Breast ultrasound malignancy probability of one image per request")


@serve.deployment(name="Classifier")
@serve.ingress(api)
class Classifier:
    """One replica: an engine loaded from an export folder, scoring batches of prepared images."""

    def __init__(self, model: str, engine: str = "openvino", threshold: float | None = None,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.005, max_request_mb: float = 32.0,
                 precision: str = "f32", streams: int = 1):
        import ray

        from msbt.serve.engines import load_served

        # As many engine threads as CPUs Ray gave this replica (from the config or a Serve config file's
        # ray_actor_options), so replicas on one node do not oversubscribe its cores.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self.model = load_served(model, engine, precision=precision, threads=max(1, int(cpus)), threshold=threshold,
                                 streams=streams)
        self.max_bytes = int(max_request_mb * (1 << 20))
        from msbt.serve.predict import find_profile

        self.profile = find_profile(model)[0]  # the training images' profile (export.json), None if not recorded

        # Dynamic batching: up to max_batch_size requests per batch, `streams` batches at once (each on its
        # own engine stream). Made here, not as a decorated method: Serve fixes a batch's concurrency when
        # the decorator is applied, and it comes from the config.
        async def run_batch(images: list[np.ndarray]) -> list[float]:
            # Off the event loop, so requests keep being read and decoded while a batch runs.
            p = await asyncio.to_thread(self.model.engine.predict, np.stack(images))
            return [float(x) for x in p]

        self.score = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                                 max_concurrent_batches=streams)(run_batch)

    def _identity(self) -> dict:
        m = self.model
        return {"model_id": m.model_id, "lineage_sha256": m.lineage_sha256,
                "engine": f"{m.engine.name} ({m.engine.precision})"}

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", **self._identity()}

    @api.post("/predict")
    async def predict(self, request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            return self.error(413, f"request body of {int(declared)} bytes is larger than {self.max_bytes} bytes")
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):  # curl -F file=@x
            return self.error(400, "a multipart form: send the image's bytes as the request body "
                                   "(curl --data-binary @scan.png URL/predict)")
        frames = request.query_params.getlist("frame")  # one frame of a DICOM cine loop
        if len(frames) > 1:  # the last was scored, the others ignored without a word
            return self.error(400, f"?frame= given {len(frames)} times: one frame per request")
        frame = frames[0] if frames else None
        # ASCII digits only: str.isdigit() also takes '²' (then int() failed with Python's own message) and '１'
        # at most 9 digits: int() of thousands of digits refused with Python's own message
        if frame is not None and not (frame.isascii() and frame.isdigit() and len(frame) <= 9):
            return self.error(400, f"?frame={frame[:20]}: a frame index, 0 or more")
        # read piece by piece and stopped at the limit: a body sent without a length (chunked) is not held whole first
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > self.max_bytes:
                return self.error(413, f"request body of more than {self.max_bytes} bytes (the limit)")
            parts.append(part)
        body = b"".join(parts)
        try:
            image, outside = await asyncio.to_thread(self._prepare_checked, body, None if frame is None else int(frame))
        except ValueError as err:  # ImageError and DicomError are ValueErrors: their reason names the problem
            reason = getattr(err, "reason", None) or str(err)
            form = request.headers.get("content-type", "").lower().startswith("application/x-www-form-urlencoded")
            if form and len(body) > 512 and b"\n" not in body and b"\r" not in body:
                # curl's -d drops a file's line breaks (every PNG's signature has both); a form's content type alone
                # says little (Python's urllib sends it with any body), a binary file of no line break says more
                reason += (" (the body came as a form, as `curl -d @file` sends it, which strips line breaks from the "
                           "file: send the bytes with curl --data-binary @scan.png)")
            return self.error(400, reason)
        p = await self.score(image)
        m = self.model
        return {"probability": p, "label": m.class_names[int(p >= m.threshold.value)],
                "threshold": m.threshold.value, "threshold_source": m.threshold.public_source(),
                # as msbt predict's column: features of this image outside the training images' range (size, aspect,
                # brightness, contrast, dark share; msbt.data.profile), [] when none, None when the export has no profile
                "out_of_range": outside,
                **({} if frame is None else {"frame": int(frame)}), **self._identity()}

    @staticmethod
    def error(status: int, reason: str) -> JSONResponse:
        """A JSON error answer. A method, not a module function: Serve ships the ingress class to the
        replica without this module's other globals (a module-level helper raised NameError there)."""
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": reason}, status_code=status)

    def _prepare(self, body: bytes, frame: int | None = None) -> np.ndarray:
        """Request bytes -> the model input, as ``msbt predict`` prepares a file (a DICOM file: ``frame`` of it)."""
        return self._prepare_checked(body, frame)[0]

    def _prepare_checked(self, body: bytes, frame: int | None = None) -> tuple[np.ndarray, list[str] | None]:
        """:meth:`_prepare`, and the profile features of the image outside the training range (None: no profile)."""
        import cv2

        from msbt.data.profile import image_features, out_of_range
        from msbt.images.dicom import opens_data_set
        from msbt.images.imagefile import ImageError, decode_image
        from msbt.serve.predict import model_inputs, prepare_rgb

        prep = self.model.preparation
        # a DICOM Part 10 file (the magic after its 128-byte preamble), or a bare data set (no preamble), as
        # older and hand-made exports write them and `msbt predict` reads them
        if body[128:132] == b"DICM" or opens_data_set(body[:4]):
            rgb = self._dicom_frame(body, frame, prep.sixteen_bit)
        elif frame is not None:
            raise ImageError("request body", "?frame= picks a frame of a DICOM cine loop; this body is no DICOM file")
        else:
            try:
                rgb = decode_image(body, "request body", prep.sixteen_bit)  # type: ignore[arg-type]
            except cv2.error as err:  # e.g. an image above OpenCV's pixel limit asserts instead of failing
                raise ImageError("request body", f"cannot be decoded ({err.err or err})") from None
        prepared = prepare_rgb(rgb, prep)
        profile = getattr(self, "profile", None)
        outside = (out_of_range(profile, image_features(int(rgb.shape[1]), int(rgb.shape[0]), prepared))
                   if profile else None)
        return model_inputs(prepared[None], self.model.engine.image_size)[0], outside

    @staticmethod
    def _dicom_frame(body: bytes, frame: int | None, sixteen_bit: str) -> np.ndarray:
        """One frame of a DICOM file sent as the request body, as uint8 RGB, read by msbt.images.dicom (the
        pixel module only: no patient data is read, and none reaches an answer or a log line).

        pydicom reads files, so the body is written to a temporary file of this process's user only (in memory,
        /dev/shm, where the machine has it), removed as soon as the frame is decoded. A cine loop needs
        ``?frame=N``: one request is one image, and the threshold was chosen on single images."""
        import os
        import tempfile

        from msbt.images.dicom import read_header
        from msbt.images.imagefile import DEFAULT_MAX_PIXELS, ImageError, read_dicom_image

        memory = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        with tempfile.NamedTemporaryFile(prefix="msbt-request-", suffix=".dcm", dir=memory) as handle:
            handle.write(body)
            handle.flush()
            header = read_header(handle.name)
            if frame is None and header.frames > 1:
                raise ImageError("request body", f"a DICOM cine loop of {header.frames} frames: ask for one frame "
                                                 f"with ?frame=N (0 to {header.frames - 1}), or score the whole "
                                                 "loop with msbt stream")
            # as `msbt predict` reads a DICOM file: through the checks every image passes (too small, blank; an
            # all-black still was answered "malignant")
            return read_dicom_image(handle.name, frame or 0, sixteen_bit, max_pixels=DEFAULT_MAX_PIXELS, header=header)


def application(model: str | Path, config: ServeConfig = ServeConfig(), *, threshold: float | None = None):
    """The bound Serve application for an export folder, with replicas and resources from ``config``.

    Raises:
        EngineError: ``model`` is not an ``msbt export`` folder with the configured engine's files
            (checked here, before any replica starts).
        ValueError: ``threshold`` (or the export's) is not a probability in [0, 1].
    """
    from msbt.serve.engines import ENGINES, INT8_FILE, EngineError, check_engine_files
    from msbt.serve.predict import EXPORT_FILE, find_threshold

    folder = Path(model).expanduser().resolve()
    if not (folder / EXPORT_FILE).is_file():
        raise EngineError(f"{folder}: not an `msbt export` folder (no {EXPORT_FILE}); run `msbt export` first")
    if config.engine not in ENGINES or config.replicas < 1 or config.cpus_per_replica <= 0 or config.streams < 1:
        raise EngineError(f"serve config: need a known engine, replicas >= 1, cpus_per_replica > 0 and streams >= 1, "
                          f"got {config}")
    if config.precision == "int8" and (config.engine not in ("onnx", "openvino") or not (folder / INT8_FILE).is_file()):
        raise EngineError(f"{folder}: serve.precision int8 needs engine onnx or openvino and {INT8_FILE}, which "
                          "`msbt export --int8` writes only when the test AUC held (see export.json's int8)")
    # What each replica would fail on when it loads, checked here: a replica that fails is retried by Serve, and
    # `msbt serve --threshold 7` or an export copied without openvino/ printed three Ray tracebacks of the
    # replica (about 140 lines) and ended with "Deploying application msbt failed", after Ray had started.
    check_engine_files(folder, config.engine, config.precision)
    find_threshold(folder, threshold)
    resources = replica_resources(config)
    options = {"num_cpus": resources["CPU"], **({"num_gpus": resources["GPU"]} if "GPU" in resources else {})}
    if config.log_level not in ("DEBUG", "INFO"):
        # gRPC's C++ INFO line in every new replica ("Other threads are currently calling into gRPC, skipping fork()
        # handlers"), which no logger catches: a private cluster's processes inherit msbt's setting
        # (msbt.console.quiet_environment), a `ray start` cluster's do not
        options["runtime_env"] = _replica_env()
    # Serve's default of 5 requests in flight per replica would cap every batch at 5.
    deployment = Classifier.options(num_replicas=config.replicas, ray_actor_options=options,
                                    max_ongoing_requests=max(5, 2 * config.max_batch_size * config.streams))
    return deployment.bind(str(folder), config.engine, threshold, config.max_batch_size,
                           config.batch_wait_timeout_s, config.max_request_mb, config.precision, config.streams)


def _replica_env() -> dict:
    """The replicas' runtime environment: the job's own, with ``GRPC_VERBOSITY=ERROR`` added to its variables.

    Serve gives replicas the job's runtime environment only when a deployment names none; one that names its own
    gets just the job's ``working_dir`` added (ray.serve's build_app, Ray 2.60), so the job's variables and
    packages are carried over here."""
    import ray

    job = dict(ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}
    job.pop("excludes", None)  # the upload's filter: its working_dir is a package URI by now
    return {**job, "env_vars": {**(job.get("env_vars") or {}), "GRPC_VERBOSITY": "ERROR"}}


def build_app(args: dict):
    """Application builder for ``serve run``/``serve deploy``: ``args`` are ``model`` plus ``serve:`` keys.

    Example: ``serve run msbt.serve.app:build_app model=exports/cpu-v1 engine=onnx``; in a Serve config
    file the same keys go under the application's ``args``. Values given on the command line arrive as
    strings and are read as YAML scalars.
    """
    import yaml

    args = dict(args)
    if "model" not in args:
        raise ValueError("build_app needs args.model: the `msbt export` folder to serve")
    model = str(args.pop("model"))
    threshold = args.pop("threshold", None)
    values = {k: yaml.safe_load(v) if isinstance(v, str) and k not in ("engine", "precision") else v
              for k, v in args.items()}
    config = from_dict(ServeConfig, values, source="serve application args")
    return application(model, config, threshold=None if threshold is None else float(threshold))


def run(model: str | Path, config: ServeConfig, *, threshold: float | None = None, blocking: bool = True,
        on_ready=None) -> str:
    """Start Serve on the connected Ray cluster at ``config.host:config.port`` and deploy the model.

    Args:
        on_ready: Called once the application answers (:func:`wait_until_answering`), before blocking: where
            ``msbt serve`` says it serves. Said earlier, a user's first request met a refused port or Serve's
            404 for a few seconds (2026-12-07, `msbt serve exports/cpu-v1` of the README's main job on the
            2-core machine: the line at 5.2 s, answers from 9.9 s).

    Returns:
        The URL of the application (when ``blocking``, only after Ctrl-C: it serves until then).
    """
    app = application(model, config, threshold=threshold)
    # Serve would wait for ever for replicas no node can hold (msbt.raycluster.check_placeable)
    check_placeable(f"msbt serve's replicas ({config.replicas})", [replica_resources(config)] * config.replicas,
                    "serve.replicas, serve.cpus_per_replica, serve.gpus_per_replica")
    # Serve's controller, proxies and replicas log at serve.log_level, and so does its logger in this process
    # (its "Started Serve", "Application is ready" lines)
    serve_log = logging.getLogger("ray.serve")
    serve_log.setLevel(config.log_level)
    joined = private_cluster() is None  # a cluster that outlives this command (`ray start`, a submitted job's)
    ours = joined and not serve_running()  # Serve started by this command, so this command may stop it
    if joined and not ours and APP_NAME in serve.status().applications:
        log.warning("an application %r already runs on this cluster (`serve deploy`, or another msbt serve): this "
                    "one replaces it", APP_NAME)
    try:
        _start_serve(config)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False,
                  logging_config={"log_level": config.log_level})
        wait_until_answering(config)
        if on_ready is not None:
            on_ready()
        while blocking:  # as serve.run(blocking=True) waits: until Ctrl-C (or SIGTERM, msbt.cli's Stopped)
            time.sleep(3600)
    except BaseException:  # Ctrl-C, SIGTERM (msbt.cli's Stopped), or any failure: also while Serve was starting
        # a cluster that outlives this command must not keep serving (and holding the port) after it ends
        if blocking and joined:
            take_down(stop_serve=ours)
        raise
    return url(config)


def wait_until_answering(config: ServeConfig, wait_s: float = PROXY_WAIT_S) -> bool:
    """Wait until ``GET /healthz`` answers 200 through the HTTP proxy of this process's node; False if it did not
    within ``wait_s`` (said as a warning), or if this process is on no node with a proxy (a Ray Client
    connection, ``ray://``, whose node is the server's; a node without one): nothing to wait for here.

    ``serve.run`` returns once the application's replicas run, but Serve's proxies learn its route a moment
    later: until then a request is refused or gets Serve's 404 ("Path '/predict' not found"). The probe goes
    straight to the proxy, never through an ``http_proxy`` of the environment (a hospital's would not reach it).
    """
    import urllib.error
    import urllib.request

    import ray
    from ray.util.client import ray as client_ray

    if client_ray.is_connected() or ray.get_runtime_context().get_node_id() not in serve.status().proxies:
        return False
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(config.host, config.host)
    probe = url(dataclasses.replace(config, host=host)) + "/healthz"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with direct.open(probe, timeout=5) as answer:
                if answer.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.2)
    log.warning("msbt serve: %s did not answer within %.0f s of the application's start; it may need longer",
                probe, wait_s)
    return False


def serve_running() -> bool:
    """Whether Serve runs on the connected cluster (its controller exists); starts nothing."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def take_down(stop_serve: bool) -> str | None:
    """Remove msbt's application from the cluster, and Serve itself when this command started it and no other
    application runs there (its HTTP proxy then frees the port); returns what was done, None if it failed.

    On a cluster that outlives ``msbt serve`` (one started with ``ray start``) Ctrl-C ended the command and left
    the application answering, its port taken, so a second ``msbt serve`` was refused as "already in use". A
    private cluster ends with the command, and everything of it. A failure here is a warning: the command's
    stop line and exit status stay those of the Ctrl-C or SIGTERM."""
    try:
        if serve_running():
            serve.delete(APP_NAME)
        if not serve_running():
            return None  # stopped while Serve was starting, before any of it ran: nothing to take down
        others = [name for name in serve.status().applications if name != APP_NAME]
        if stop_serve and not others:
            serve.shutdown()
            done = f"application {APP_NAME!r} removed and Serve shut down on the cluster"
        else:
            why = f"for {', '.join(others)}" if others else "as it did before this command"
            done = f"application {APP_NAME!r} removed from the cluster (Serve keeps running {why})"
    except Exception as err:  # the cluster may be going away at the same time
        log.warning("msbt serve: its application could not be removed from the cluster (%s: %s); `serve shutdown` "
                    "removes it", type(err).__name__, err)
        return None
    print(f"msbt serve: {done}", flush=True)
    return done


def _start_serve(config: ServeConfig, wait_s: float = PROXY_WAIT_S) -> None:
    """``serve.start`` at ``serve.host:serve.port``; returns once Serve's HTTP proxies are healthy.

    Serve's controller kills an HTTP proxy that misses three readiness checks in a row and starts another, but
    ``serve.start`` waits on the first one only, and failed with ``ActorDiedError`` (``ProxyActor ... killed by
    ray.kill``: seen once in CI, on a busy two-core machine). msbt's private cluster gives the proxy longer
    (``msbt.raycluster._patient_serve_proxy``); on any cluster, the controller that did start is joined. And
    ``serve.start`` waits on no proxy at all when its controller has not started one yet (it does so in its
    control loop), so the proxies are waited for here in every case (``wait_s``), and named if not healthy.
    """
    import ray

    options = {"host": config.host, "port": config.port}
    logging_config = {"log_level": config.log_level}
    try:
        serve.start(http_options=options, logging_config=logging_config)
    except ray.exceptions.RayActorError as err:
        if "ProxyActor" not in str(err):
            raise
        log.warning("Serve replaced its HTTP proxy while starting (it missed Serve's readiness checks, as on a busy "
                    "machine); waiting up to %.0f s for the new one", wait_s)
        serve.start(http_options=options, logging_config=logging_config)  # the controller is up: this joins it
    deadline = time.monotonic() + wait_s
    while True:
        proxies = serve.status().proxies  # node id: STARTING, HEALTHY, UNHEALTHY, DRAINING (a node with no replica)
        waiting = {node[:12]: status.value for node, status in proxies.items() if status in ("STARTING", "UNHEALTHY")}
        if proxies and not waiting:
            return
        if time.monotonic() > deadline:
            found = ", ".join(f"node {node}: {status}" for node, status in waiting.items()) or "none started"
            raise RuntimeError(
                f"Ray Serve's HTTP proxies were not healthy {wait_s:.0f} s after serve.start ({found}); its "
                "controller log (serve/controller_*.log in the Ray session's logs) says why. On a busy machine, give "
                "them longer with RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S (seconds per readiness check) where the "
                "cluster starts")
        time.sleep(0.2)


def check_port_free(config: ServeConfig) -> None:
    """Refuse ``serve.host:serve.port`` when something on this machine listens there already, before Ray starts:
    Serve's HTTP proxy failed on it only after the cluster was up, with Ray's traceback of ``ProxyActor.ready()``
    (measured, 2.2 s after ``serve.start``). A bind test as the proxy binds (address reuse on), so a port left in
    TIME_WAIT by an earlier server passes."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host, config.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"serve.port {config.port}: already in use on {config.host} (another msbt serve, "
                                  "or another program); choose another with --port") from None
            raise ConfigError(f"serve.host {config.host}: cannot listen there ({exc.strerror or exc})") from None


def replica_resources(config: ServeConfig) -> dict[str, float]:
    """What one replica asks Ray for: ``serve.cpus_per_replica`` CPUs and ``serve.gpus_per_replica`` GPUs."""
    return {"CPU": float(config.cpus_per_replica),
            **({"GPU": float(config.gpus_per_replica)} if config.gpus_per_replica else {})}


def url(config: ServeConfig) -> str:
    """The application's base URL (an IPv6 host in brackets, as URLs write one)."""
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{config.port}"
