"""The model side of `fmtl serve`: load and warm up the model, admit requests to the bounded queue,
decode uploads in a thread pool and run inference through the dynamic batcher; the server's state
(loading, ready, draining) lives here, one ModelServer per app. Nothing here knows about HTTP routes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from collections.abc import Callable

import numpy as np

from fmtl.runtime.classifier import Classifier, ModelError
from fmtl.runtime.images import DecodeError, decode_or_error
from fmtl.runtime.serve.api import ApiError, default_max_pixels
from fmtl.runtime.serve.batching import Batcher, BatchStats, QueueFull, QueueTimeout
from fmtl.runtime.serve.config import ServeConfig, usable_cpus
from fmtl.runtime.serve.metrics import Metrics


class Admission:
    """One request's claim on the queue, from when its body has been read (``hold``) until its images
    are queued (``release``). A request still being read claims nothing: a client that stalls its
    upload holds a connection (bounded by --limit-concurrency and --request-timeout), never the queue."""

    def __init__(self, server: ModelServer):
        self.server = server
        self.arrived = time.perf_counter()  # the queue timeout counts from here (reset by hold)
        self.images = 0  # images claimed while being decoded

    def hold(self, images: int) -> None:
        """The body is read: claim room for its images while they are decoded."""
        self.release()
        self.arrived = time.perf_counter()
        self.images = images
        self.server.pending += images

    def release(self) -> None:
        self.server.pending -= self.images
        self.images = 0


class ModelServer:
    """The model, its batcher and the server's state (loading, ready, draining); one per app."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.name = config.model.stem  # the model's name in URLs (/v2/models/NAME)
        self.metrics = Metrics(config.max_batch_size)
        self.classifier: Classifier | None = None
        self.backlog_classifier: Classifier | None = None  # one thread, for batches run side by side
        self.batcher: Batcher | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.warmup_seconds = 0.0
        self._served = (0, 0.0)  # images and model seconds so far, for Retry-After
        self.pending = 0  # images read and being decoded, not yet queued
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(usable_cpus(), thread_name_prefix="fmtl-decode")

    async def load(self) -> None:
        """Load the model and run a warm-up batch off the event loop, start batching, then turn ready.

        A failure is kept in ``load_error`` (the process then exits with it), never raised."""
        loop = asyncio.get_running_loop()
        try:
            classifier, self.backlog_classifier, warmup = await loop.run_in_executor(None, self._open_and_warm_up)
        except ModelError as error:
            self.load_error = str(error)
            return
        except Exception as error:  # onnxruntime can fail the warm-up run itself (e.g. out of memory)
            self.load_error = f"cannot run the model {self.config.model}: {type(error).__name__}: {error}"
            return
        config = self.config
        backlog_predict = self.backlog_classifier.predict_proba if self.backlog_classifier else None
        batcher = Batcher(classifier.predict_proba, config.max_batch_size, config.batch_wait_ms / 1000,
                          config.max_queue, config.queue_timeout_ms / 1000, self.on_batch,
                          backlog_predict, config.lanes())  # fmt: skip
        self.attach(classifier, batcher, warmup)

    def attach(self, classifier: Classifier, batcher, warmup_seconds: float) -> None:
        """Serve with an open, warmed-up classifier through ``batcher`` (fmtl's Batcher, or another engine's
        with the same submit/queued_images/start/flush/stop), then turn ready: the end of ``load``."""
        self.classifier, self.batcher, self.warmup_seconds = classifier, batcher, warmup_seconds
        self.metrics.warmup_seconds.set(warmup_seconds)
        self.batcher.start()
        self.ready = not self.draining
        self.metrics.ready.set(int(self.ready))

    def _open_and_warm_up(self) -> tuple[Classifier, Classifier | None, float]:
        """The classifier (--threads), and with more than one lane the backlog's (one thread, run
        from every lane at once), both warmed up; and the warm-up's seconds."""
        config = self.config
        classifier = Classifier(config.model, threads=config.threads or usable_cpus())
        backlog = Classifier(config.model, threads=1) if config.lanes() > 1 else None
        started = time.perf_counter()
        for session in filter(None, (classifier, backlog)):
            # the largest batch first (allocates its buffers), then one image (the low-load path)
            for size in (config.max_batch_size, 1):
                session.predict_proba(np.zeros((size, *session.input_shape), dtype=np.uint8), size)
        return classifier, backlog, time.perf_counter() - started

    def on_batch(self, stats: BatchStats) -> None:
        """Count a finished batch (metrics, and the pace Retry-After is priced from)."""
        self.metrics.observe_batch(stats)
        self._served = (self._served[0] + stats.size, self._served[1] + stats.compute)

    def start_draining(self) -> None:
        """From now on readiness and new requests get 503; accepted requests are still answered."""
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.flush()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def check_accepting(self) -> None:
        """Raise 503 unless a new inference request can be taken now."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", "draining")  # the middleware adds Connection: close
        if not self.ready:
            raise ApiError(503, "the model is not loaded yet", "not_ready", {"Retry-After": "1"})

    def admit(self) -> Admission:
        """A claim for one new request, or 503 before its body is read or decoded when the queue,
        counting the images being decoded, is already full: refused this way a request costs
        least, and no backlog of decoding work builds up in front of the queue."""
        waiting = self.batcher.queued_images + self.pending
        if waiting >= self.config.max_queue:
            raise ApiError(503, f"overloaded: queue full ({waiting} images waiting)", "queue_full",
                           {"Retry-After": self._retry_after()})  # fmt: skip
        return Admission(self)

    @property
    def max_pixels(self) -> int:
        """--max-pixels, or the default sized to the model's input."""
        if self.config.max_pixels is not None:
            return self.config.max_pixels
        return default_max_pixels(math.prod(self.classifier.spec.source_size))

    def check_name(self, name: str) -> None:
        if name != self.name:
            raise ApiError(404, f"unknown model {name!r}: this server has {self.name!r}", "unknown_model")

    async def infer(self, images: np.ndarray, admission: Admission) -> np.ndarray:
        """Probabilities [N, classes] for a uint8 batch, through the queue and the batcher."""
        admission.release()  # from here on the batcher's queue counts these images
        if len(images) > self.config.max_images:
            raise ApiError(413, f"{len(images)} images in one request (limit {self.config.max_images})",
                           "too_many_images")  # fmt: skip
        try:
            return await self.batcher.submit(images, admission.arrived)
        except QueueFull as error:
            raise ApiError(503, f"overloaded: {error}", "queue_full", {"Retry-After": self._retry_after()}) from None
        except QueueTimeout as error:
            raise ApiError(503, f"overloaded: {error}", "queue_timeout", {"Retry-After": "1"}) from None
        finally:
            self.metrics.queue_depth.set(self.batcher.queued_images)

    def _retry_after(self) -> str:
        """Seconds until the queue has likely drained: queued images over the recent batch throughput."""
        images, seconds = self._served
        per_second = images / seconds if seconds > 0 else 100.0
        return str(max(1, math.ceil(self.batcher.queued_images / per_second)))

    async def decode(self, payloads: list[bytes]) -> list[np.ndarray | DecodeError]:
        """Decode uploads in the thread pool (never on the event loop); a DecodeError in place of a failure."""
        loop = asyncio.get_running_loop()
        spec, max_pixels = self.classifier.spec, self.max_pixels
        futures = [
            loop.run_in_executor(
                self.decode_pool,
                decode_or_error,
                data,
                spec.channels,
                spec.source_size,
                spec.background,
                max_pixels,
                spec.fit,
            )  # fmt: skip
            for data in payloads
        ]
        return list(await asyncio.gather(*futures))

    async def off_loop(self, function: Callable, *args):
        """``function(*args)`` in the decoding pool: CPU work (parsing) never runs on the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, function, *args)
