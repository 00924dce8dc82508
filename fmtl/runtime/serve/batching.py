"""Dynamic batching for `fmtl serve`: a bounded queue, per-request deadlines, one batch at a time
until a backlog builds, then several side by side.

Requests put their decoded images in a queue and await a future. A worker (an asyncio task whose
model calls run on a dedicated thread, so the event loop never blocks) takes whatever is queued
each time it is free, whole requests up to ``max_batch_size`` images, and runs them as one batch.
With ``batch_wait_s`` 0 (the default) it never waits for more: at low load every request runs at
once, and batches grow by themselves as load rises, because requests queue up while the previous
batch computes.

Under a backlog (the queue at least ``BACKLOG_SHARE`` full, and two full batches waiting) the batch call that uses every core
(onnxruntime's threads meeting at each operator) is the wrong shape: any other work on the
machine, the event loop answering and refusing requests included, stalls one of its threads and
so all of them. There, ``lanes`` workers run batches side by side through ``backlog_predict``
(one thread each): a stall slows one batch, not every core.

All queue state lives on the event loop thread; only ``predict`` runs elsewhere.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

BACKLOG_SHARE = 0.25  # of max_queue: from this many images waiting (and two full batches), batches run side by side


class QueueFull(Exception):
    """The queue holds too many images to take this request: answer 503 with Retry-After."""


class QueueTimeout(Exception):
    """The request waited in the queue longer than the queue timeout: answer 503."""


@dataclass
class BatchStats:
    """What one batch cost; the server turns it into metrics."""

    size: int  # images in the batch
    queue_waits: list[float]  # seconds each request waited before its batch started
    compute: float  # seconds in predict


@dataclass(eq=False)
class _Job:
    images: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """Queue requests' images and run them through ``predict`` in dynamic batches.

    Args:
        predict: uint8 batch [N, ...] -> array [N, ...]; called on the worker thread only.
        max_batch_size: most images in one batch (a request bigger than this runs alone).
        batch_wait_s: after the first request of a batch arrives, wait up to this long for
            more before running a batch that is not full (0: never wait).
        max_queue: most images waiting; a request that would go over gets QueueFull.
        queue_timeout_s: a request still queued after this long gets QueueTimeout.
        on_batch: called on the event loop with each batch's BatchStats.
        backlog_predict: like ``predict`` (the same model), for the batches run side by side under
            a backlog; safe to call from ``lanes`` threads at once.
        lanes: most batches at once under a backlog (1, or no ``backlog_predict``: one at a time).
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        max_batch_size: int,
        batch_wait_s: float,
        max_queue: int,
        queue_timeout_s: float,
        on_batch: Callable[[BatchStats], object] = lambda stats: None,
        backlog_predict: Callable[[np.ndarray], np.ndarray] | None = None,
        lanes: int = 1,
    ):
        self._predict = predict
        self._backlog_predict = backlog_predict
        self.lanes = lanes if backlog_predict is not None else 1
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self._on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self.queued_images = 0  # images waiting (not yet in a running batch)
        self._wakeup = asyncio.Event()  # lane 0: something is queued
        self._backlog_wakeup = asyncio.Event()  # the other lanes: a backlog is queued
        self._threads = concurrent.futures.ThreadPoolExecutor(self.lanes, thread_name_prefix="fmtl-infer")
        self._workers: list[asyncio.Task] = []

    def start(self) -> None:
        """Start the worker tasks on the running event loop."""
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._run(lane), name=f"fmtl-batcher-{lane}") for lane in range(self.lanes)]

    async def stop(self) -> None:
        """Stop the workers (after their current batches) and fail whatever is still queued."""
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(QueueTimeout("the server stopped"))
        self._threads.shutdown(wait=True)

    def flush(self) -> None:
        """From now on never wait for fuller batches (the server is draining: answer what is queued now)."""
        self.batch_wait_s = 0.0
        self._wakeup.set()

    async def submit(self, images: np.ndarray, arrived: float | None = None) -> np.ndarray:
        """Queue ``images`` and return predict's rows for them, in order.

        Args:
            images: a uint8 batch.
            arrived: when the request arrived (time.perf_counter()); the queue timeout counts from
                then, so time spent reading and decoding counts too [now].

        Raises:
            QueueFull: taking them would put more than max_queue images in the queue.
            QueueTimeout: they were not started within queue_timeout_s of ``arrived``.
        """
        if self.queued_images + len(images) > self.max_queue:
            raise QueueFull(f"queue full ({self.queued_images} images waiting, limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        job = _Job(images, loop.create_future())
        left = self.queue_timeout_s - (time.perf_counter() - arrived if arrived is not None else 0.0)
        if left <= 0:
            raise QueueTimeout(f"waited {(self.queue_timeout_s - left) * 1000:.0f} ms before reaching the queue")
        job.timer = loop.call_later(left, self._expire, job)
        self._queue.append(job)
        self.queued_images += len(images)
        self._wake()
        return await job.future

    def _wake(self) -> None:
        """Wake lane 0 when anything is queued, and the other lanes only under a backlog."""
        if self._queue:
            self._wakeup.set()
        if self.backlogged:
            self._backlog_wakeup.set()

    def _expire(self, job: _Job) -> None:
        """The queue timeout fired: fail the job if it is still waiting (a running one finishes)."""
        if job in self._queue:
            self._queue.remove(job)
            self.queued_images -= len(job.images)
            if not job.future.done():
                waited = time.perf_counter() - job.enqueued
                job.future.set_exception(QueueTimeout(f"waited {waited * 1000:.0f} ms in the queue"))

    @property
    def backlogged(self) -> bool:
        """Enough images waiting that batches run side by side."""
        return self.lanes > 1 and self.queued_images >= max(BACKLOG_SHARE * self.max_queue, 2 * self.max_batch_size)

    async def _run(self, lane: int) -> None:
        """Worker ``lane``: lane 0 always runs, with ``predict`` or (under a backlog) ``backlog_predict``;
        the other lanes only under a backlog."""
        loop = asyncio.get_running_loop()
        wakeup = self._wakeup if lane == 0 else self._backlog_wakeup
        while True:
            await wakeup.wait()
            wakeup.clear()
            if lane > 0 and not self.backlogged:
                continue
            if self.batch_wait_s > 0 and not self.backlogged:  # under a backlog there is no waiting for more
                await self._wait_for_more()
            predict = self._backlog_predict if self.backlogged else self._predict
            jobs = self._take_batch()
            if not jobs:
                continue
            try:
                await self._run_batch(loop, jobs, predict)
            finally:
                self._wake()  # requests queued behind this batch, whether it succeeded or failed

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job], predict: Callable) -> None:
        """One model call for ``jobs``; its rows (or its exception) go to their futures."""
        started = time.perf_counter()
        batch = jobs[0].images if len(jobs) == 1 else np.concatenate([job.images for job in jobs])
        try:
            rows = await loop.run_in_executor(self._threads, predict, batch)
        except Exception as error:  # a failing model fails its requests, never the worker
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        self._deliver(jobs, rows)
        waits = [started - job.enqueued for job in jobs]
        self._on_batch(BatchStats(len(batch), waits, time.perf_counter() - started))

    async def _wait_for_more(self) -> None:
        """Wait until a full batch is queued or batch_wait_s has passed since the oldest request came."""
        while self._queue and self.queued_images < self.max_batch_size and self.batch_wait_s > 0:
            left = self._queue[0].enqueued + self.batch_wait_s - time.perf_counter()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                return
            self._wakeup.clear()

    def _take_batch(self) -> list[_Job]:
        """Whole requests from the front of the queue, up to max_batch_size images (at least one request)."""
        jobs: list[_Job] = []
        size = 0
        while self._queue and (not jobs or size + len(self._queue[0].images) <= self.max_batch_size):
            job = self._queue.popleft()
            job.timer.cancel()
            self.queued_images -= len(job.images)
            if job.future.done():  # its client went away (cancelled)
                continue
            jobs.append(job)
            size += len(job.images)
        return jobs

    @staticmethod
    def _deliver(jobs: list[_Job], rows: np.ndarray) -> None:
        start = 0
        for job in jobs:
            end = start + len(job.images)
            if not job.future.done():
                job.future.set_result(rows[start:end])
            start = end
