"""`fmtl serve --engine ray`: the same HTTP API as `fmtl serve`, on Ray Serve replicas across a cluster.

Needs the optional extra (``pip install "fmtl[ray]"``); importing this module without it raises a
ServeError that says so in one line.

    fmtl serve export/NAME.onnx --engine ray --replicas 2            # a local cluster, loopback only
    fmtl serve export/NAME.onnx --engine ray --address auto --host 0.0.0.0 --autoscale 1:8

Each replica is a Ray Serve deployment replica that runs fmtl serve's own Starlette app
(``create_app``: the same routes, parsing, limits, errors and metrics, so an answer is
byte-for-byte the one `fmtl serve` gives) with one ``Classifier`` whose onnxruntime threads
match the replica's CPUs. Only the batcher differs: images go through Ray Serve's ``@serve.batch``
(``--max-batch-size`` images, ``--batch-wait-ms``) instead of fmtl's own worker. The model's
bytes travel with the deployment, so no node needs the file. Ray Serve's HTTP proxy on every node
routes to the replicas; overload is its backpressure (``max_ongoing_requests`` per replica,
``max_queued_requests`` per proxy: 503), plus fmtl's own per-replica image queue (``--max-queue``).
``GET /metrics`` gives the answering replica's ``fmtl_`` metrics, then Ray Serve's own (``ray_serve_*``).

Lifecycle: a replica is ready only after it has loaded the model and run a warm-up batch (its
constructor; ``check_health`` then keeps checking it), and ``serve.run`` returns only when every
replica is. A model that fails to load ends the command with one line before anything is
deployed, and a deployment that fails is deleted, never left half up. SIGTERM or Ctrl-C drains
(the application is deleted while the proxies still run, so every accepted request is answered,
then ``serve.shutdown``) and exits 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import re
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from fmtl.runtime.classifier import Classifier, ModelError
from fmtl.runtime.serve.app import create_app
from fmtl.runtime.serve.batching import BatchStats, QueueFull
from fmtl.runtime.serve.config import ServeConfig, ServeError

try:
    import ray
    from ray import serve

    from fmtl.runtime.ray_cluster import connect_cluster
except ImportError as error:  # the extra is missing: the CLI prints this one line and exits non-zero
    raise ServeError(
        f'--engine ray needs the ray extra: pip install "fmtl[ray]" ({error.name or "ray"} is not installed)'
    ) from None

APP_NAME = "fmtl"  # the Ray Serve application (one per cluster: its proxies listen on one port)
DRAIN_POLL_S = 0.2
METRICS_FETCH_TIMEOUT_S = 2.0  # a /metrics answer waits at most this long for the node's Ray metrics


@dataclasses.dataclass(frozen=True)
class RayServeOptions:
    """Where and how wide to serve.

    Attributes:
        address: an existing cluster ("auto", "HOST:6379", "ray://HOST:10001"); None starts a local one
            (loopback only) for this command and shuts it down afterwards.
        replicas: fixed number of replicas (ignored with ``autoscale``).
        autoscale: (min, max) replicas; Ray Serve adds and removes replicas on queue length.
        cpus_per_replica: CPUs each replica reserves; its onnxruntime threads match it (at least 1).
        gpus_per_replica: GPUs each replica reserves (onnxruntime then picks CUDA when it has it).
    """

    address: str | None = None
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0

    @classmethod
    def from_cli(
        cls,
        address: str | None = None,
        replicas: int | None = None,
        autoscale: str | None = None,
        cpus_per_replica: float | None = None,
        gpus_per_replica: float | None = None,
    ) -> RayServeOptions:
        """The options as `fmtl serve` takes them (None: not given; ``autoscale`` as ``MIN:MAX``)."""
        if replicas is not None and autoscale is not None:
            raise ServeError("give either --replicas N or --autoscale MIN:MAX, not both")
        given = {"address": address, "replicas": replicas, "cpus_per_replica": cpus_per_replica,
                 "gpus_per_replica": gpus_per_replica, "autoscale": parse_autoscale(autoscale) if autoscale else None}  # fmt: skip
        return cls(**{name: value for name, value in given.items() if value is not None})

    def check(self) -> None:
        """Raise ServeError for values that cannot work."""
        if self.replicas < 1:
            raise ServeError("--replicas must be at least 1")
        low, high = self.autoscale or (0, 1)
        if not 0 <= low <= high or high < 1:
            raise ServeError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {self.autoscale}")
        if self.cpus_per_replica <= 0 or self.gpus_per_replica < 0:
            raise ServeError("--cpus-per-replica must be above 0 and --gpus-per-replica at least 0")


def parse_autoscale(text: str) -> tuple[int, int]:
    """``MIN:MAX`` as two whole numbers (for the CLI's --autoscale)."""
    low, sep, high = text.partition(":")
    if not (sep and low.isdigit() and high.isdigit() and int(low) <= int(high) and int(high) >= 1):
        raise ServeError(f"--autoscale takes MIN:MAX replicas (0 <= MIN <= MAX, MAX >= 1), got {text!r}")
    return int(low), int(high)


# --- the replica -------------------------------------------------------------------------------------


class ServeBatchQueue:
    """fmtl serve's batcher seam (``submit``, ``queued_images``, ``start``/``flush``/``stop``) over
    Ray Serve's ``@serve.batch``: each image is one batch item, so ``--max-batch-size`` counts
    images exactly as fmtl's own batcher does. ``--max-queue`` bounds the images a replica holds."""

    def __init__(self, predict_one: Callable[[np.ndarray], Awaitable[np.ndarray]], max_queue: int):
        self.predict_one = predict_one
        self.max_queue = max_queue
        self.queued_images = 0  # images submitted and not yet answered

    def start(self) -> None:
        """Nothing to start: Ray Serve runs the batching loop."""

    def flush(self) -> None:
        """Nothing to flush: Ray Serve never holds a batch longer than batch_wait_timeout_s."""

    async def stop(self) -> None:
        """Nothing to stop: Ray Serve drains the replica."""

    async def submit(self, images: np.ndarray, arrived: float | None = None) -> np.ndarray:
        """Probabilities [N, classes] for a uint8 batch [N, C, H, W], in order."""
        if self.queued_images + len(images) > self.max_queue:
            raise QueueFull(f"queue full ({self.queued_images} images waiting, limit {self.max_queue})")
        self.queued_images += len(images)
        try:
            return np.stack(await asyncio.gather(*(self.predict_one(image) for image in images)))
        finally:
            self.queued_images -= len(images)


def _replica_grpc_on_loopback() -> None:
    """Bind this replica's inter-deployment gRPC server to 127.0.0.1 instead of every interface.

    Ray Serve (2.60) starts it on ``[::]:0``, hard-coded, once the constructor has returned; on a
    cluster of one machine on loopback (fmtl's local cluster) nothing else may listen beyond it.
    Versions without that server lack the name and are left alone."""
    from ray.serve._private import replica as ray_replica

    bind = getattr(ray_replica, "add_port_to_grpc_server", None)
    if bind is not None and not getattr(bind, "fmtl_loopback", False):

        def bind_loopback(server, address: str):
            return bind(server, address.replace("[::]", "127.0.0.1"))

        bind_loopback.fmtl_loopback = True
        ray_replica.add_port_to_grpc_server = bind_loopback


class ModelReplica:
    """One Ray Serve replica: fmtl serve's app around one Classifier opened from the model's bytes."""

    async def __init__(self, model: bytes, config: ServeConfig):
        """Write ``model`` to a private scratch file, open it, run the warm-up batches, then answer.

        Ray routes requests to a replica only once this returns, so a replica is never reachable cold."""
        if ray.util.get_node_ip_address() == "127.0.0.1":
            _replica_grpc_on_loopback()
        self.config = config
        self.asgi_app = create_app(config, load=False)  # fmtl serve's routes, limits, errors and metrics
        self.server = self.asgi_app.model_server
        self.model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fmtl-model")
        with tempfile.TemporaryDirectory(prefix="fmtl-serve-ray-") as scratch:  # only while onnxruntime loads it
            path = Path(scratch) / config.model.name
            path.write_bytes(model)
            loop = asyncio.get_running_loop()
            self.classifier, self.warmup_seconds = await loop.run_in_executor(
                self.model_thread, self._open_and_warm_up, path
            )
        self.predict.set_max_batch_size(config.max_batch_size)
        self.predict.set_batch_wait_timeout_s(config.batch_wait_ms / 1000)
        self.server.attach(self.classifier, ServeBatchQueue(self.predict, config.max_queue), self.warmup_seconds)

    def _open_and_warm_up(self, path: Path) -> tuple[Classifier, float]:
        classifier = Classifier(path, threads=self.config.threads)
        started = time.perf_counter()
        # the largest batch first (allocates its buffers), then one image (the low-load path), as fmtl serve does
        for size in (self.config.max_batch_size, 1):
            classifier.predict_proba(np.zeros((size, *classifier.input_shape), dtype=np.uint8), size)
        return classifier, time.perf_counter() - started

    def __serve_build_asgi_app__(self):
        return WithRayServeMetrics(self.asgi_app, node_metrics_url())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)  # both set from the config in __init__
    async def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One onnxruntime call for the images Ray Serve gathered, on the model thread (never the event loop)."""
        batch = np.stack(images)
        started = time.perf_counter()
        probs = await asyncio.get_running_loop().run_in_executor(
            self.model_thread, self.classifier.predict_proba, batch, len(batch)
        )
        self.server.on_batch(BatchStats(len(batch), [], time.perf_counter() - started))
        return list(probs)

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        if not self.server.ready or self.server.classifier is None:
            raise RuntimeError("the model is not loaded")


def node_metrics_url() -> str | None:
    """Where this node's Ray metrics agent serves Prometheus text (Ray Serve's own metrics among them)."""
    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


def ray_serve_families(text: str) -> str:
    """The ``ray_serve_*`` metric families (HELP, TYPE and samples) of a Prometheus text exposition."""
    kept = []
    for line in text.splitlines():
        name = line.split()[2] if line.startswith("# ") and len(line.split()) > 2 else line.split("{")[0].split(" ")[0]
        if name.startswith("ray_serve_"):
            kept.append(line)
    return "\n".join(kept) + ("\n" if kept else "")


def _fetch_ray_serve_metrics(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=METRICS_FETCH_TIMEOUT_S) as answer:
            return ray_serve_families(answer.read().decode("utf-8", "replace")).encode()
    except OSError as error:
        return f"# Ray Serve's metrics are unavailable at {url}: {error}\n".encode()


class WithRayServeMetrics:
    """Pure ASGI wrapper: ``GET /metrics`` answers fmtl's metrics of this replica, then Ray Serve's own
    (``ray_serve_*``: requests, latencies, queues and health of every replica) as this node's Ray
    metrics agent has them. Every other request goes to the app untouched."""

    def __init__(self, app, metrics_url: str | None):
        self.app = app
        self.metrics_url = metrics_url

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != "/metrics" or self.metrics_url is None:
            await self.app(scope, receive, send)
            return
        messages: list[dict] = []

        async def keep(message: dict) -> None:
            messages.append(message)

        await self.app(scope, receive, keep)
        start, body = messages[0], b"".join(m.get("body", b"") for m in messages[1:])
        if start["status"] == 200:
            body += await asyncio.get_running_loop().run_in_executor(None, _fetch_ray_serve_metrics, self.metrics_url)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def deployment_options(config: ServeConfig, options: RayServeOptions) -> dict:
    """Ray Serve's deployment settings for fmtl serve's options.

    Backpressure: a replica takes at most four batches' worth of requests at once (a batch needs
    max_ongoing_requests above max_batch_size to fill; requests waiting inside a replica cost less than
    requests the proxy's router holds back and re-offers), bounded again by fmtl's own --max-queue
    images per replica; each proxy queues at most --max-queue more requests and answers 503 beyond that."""
    settings = {
        "name": "model",
        "ray_actor_options": {"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
        "max_ongoing_requests": 4 * config.max_batch_size,
        "max_queued_requests": config.max_queue,
        "graceful_shutdown_timeout_s": config.drain_timeout,
        "graceful_shutdown_wait_loop_s": 0.5,
        "health_check_period_s": 5.0,
        "max_constructor_retry_count": 2,
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},
    }
    if options.autoscale is not None:
        low, high = options.autoscale
        settings["num_replicas"] = "auto"
        settings["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(1, low),
            "target_ongoing_requests": config.max_batch_size,  # a full batch waiting per replica
        }
    else:
        settings["num_replicas"] = options.replicas
    return settings


ModelDeployment = serve.deployment(serve.ingress()(ModelReplica))


def build_application(config: ServeConfig, options: RayServeOptions) -> serve.Application:
    """The Ray Serve application: the model's bytes and the config bound to the deployment."""
    threads = config.threads or max(1, math.floor(options.cpus_per_replica))
    replica_config = dataclasses.replace(config, threads=threads, port=0)
    return ModelDeployment.options(**deployment_options(config, options)).bind(
        config.model.read_bytes(), replica_config
    )


# --- the command -------------------------------------------------------------------------------------


def connect(address: str | None) -> bool:
    """Join ``address`` or start a local cluster (loopback only); True when this process started it."""
    return connect_cluster(address, ServeError)


def free_port(host: str) -> int:
    """A port free on ``host`` now (Ray Serve's proxy cannot be asked for port 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def deploy(config: ServeConfig, options: RayServeOptions) -> int:
    """Start Ray Serve's proxies on ``config.host``:``config.port`` and run the application until every
    replica is warm; return the port. A deployment that fails is deleted before ServeError is raised."""
    port = config.port or free_port(config.host)
    http = {"host": config.host, "port": port, "keep_alive_timeout_s": max(1, round(config.keep_alive_timeout))}
    serve.start(http_options=http, logging_config={"log_level": "WARNING"})
    try:
        serve.run(build_application(config, options), name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as error:  # Ray's DeploymentFailed / RuntimeError carry multi-line tracebacks
        _delete_quietly()
        raise ServeError(f"the Ray Serve deployment failed: {_cause(error)}") from None
    return port


def _cause(error: Exception) -> str:
    """The innermost exception line of a Ray error that carries a replica's traceback as text."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return (causes[-1] if causes else lines[0] if lines else type(error).__name__)[:300]


def _delete_quietly() -> None:
    try:
        serve.delete(APP_NAME)
    except Exception:  # the controller may be gone already; nothing is left to clean up then
        pass


def check_model(config: ServeConfig) -> None:
    """Open the model here first, so a bad file ends with one line before anything is deployed."""
    try:
        Classifier(config.model, threads=1)
    except ModelError as error:
        raise ServeError(str(error)) from None


def _say(line: str) -> None:
    print(line, flush=True)  # at once, also into a pipe: "ready" is what a supervisor waits for


def serve_ray(config: ServeConfig, options: RayServeOptions, echo: Callable[[str], object] = _say) -> int:
    """Serve ``config.model`` on Ray Serve until SIGTERM/SIGINT has drained it; return the exit code.

    Raises:
        ServeError: bad options, a model that fails to load, an unreachable cluster, a failed deployment.
    """
    config.check()
    options.check()
    check_model(config)
    started = time.perf_counter()
    started_cluster = connect(options.address)
    stop = threading.Event()  # set by SIGTERM/SIGINT; installed after ray.init, which sets handlers of its own
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        port = deploy(config, options)
        replicas = f"{options.autoscale[0]}-{options.autoscale[1]}" if options.autoscale else str(options.replicas)
        echo(f"fmtl serve (ray): {config.model} on http://{config.host}:{port} ({replicas} replicas)")
        echo(f"ready: every replica warm after {time.perf_counter() - started:.1f} s")
        while not stop.wait(DRAIN_POLL_S):
            pass
        echo("draining")
        # the application first, while the proxies still run: each replica finishes its requests (up to
        # --drain-timeout) and the proxies deliver the answers; serve.shutdown alone kills the proxies at once
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_cluster:
            ray.shutdown()
    return 0
