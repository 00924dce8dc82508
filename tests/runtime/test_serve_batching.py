"""The batcher alone: a model call that fails must fail its own requests and nothing else."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from fmtl.runtime.serve.batching import Batcher


def test_a_failing_batch_does_not_strand_the_requests_queued_behind_it():
    """Two requests queue while a batch runs; the first of them fails in the model. The second must be
    taken up at once by the worker itself, not when some later request happens to wake it."""
    running, release = threading.Event(), threading.Event()
    calls = []

    def predict(batch: np.ndarray) -> np.ndarray:
        calls.append(int(batch[0, 0]))
        if len(calls) == 1:  # the batch that runs while the others queue
            running.set()
            release.wait(10)
        if int(batch[0, 0]) == 1:
            raise RuntimeError("the model failed")
        return batch.astype(np.float32)

    async def main():
        batcher = Batcher(predict, max_batch_size=1, batch_wait_s=0.0, max_queue=8, queue_timeout_s=30.0)
        batcher.start()
        try:
            submit = lambda value: asyncio.ensure_future(batcher.submit(np.full((1, 2), value, np.uint8)))  # noqa: E731
            running_one = submit(0)
            while not running.is_set():
                await asyncio.sleep(0.01)
            failing, waiting = submit(1), submit(2)
            await asyncio.sleep(0.05)  # both queued behind the running batch
            release.set()
            assert (await running_one).tolist() == [[0.0, 0.0]]
            with pytest.raises(RuntimeError, match="the model failed"):
                await failing
            rows = await asyncio.wait_for(waiting, 5)  # stranded until the 30 s queue timeout before the fix
            assert rows.tolist() == [[2.0, 2.0]] and calls == [0, 1, 2]
        finally:
            release.set()
            await batcher.stop()

    asyncio.run(main())


def test_one_batch_at_a_time_until_a_backlog_then_batches_side_by_side():
    """Below a backlog (a quarter of max_queue, two full batches) every batch goes through ``predict`` alone; from there, up to
    ``lanes`` batches run at once through ``backlog_predict``, and each answer stays with its request."""
    lock = threading.Lock()
    running = {"predict": 0, "backlog": 0}
    peaks = {"predict": 0, "backlog": 0, "both": 0}

    def counted(name: str):
        def predict(batch: np.ndarray) -> np.ndarray:
            with lock:
                running[name] += 1
                peaks[name] = max(peaks[name], running[name])
                peaks["both"] = max(peaks["both"], sum(running.values()))
            threading.Event().wait(0.05)
            with lock:
                running[name] -= 1
            return batch.astype(np.float32) * 2

        return predict

    async def main():
        batcher = Batcher(counted("predict"), max_batch_size=1, batch_wait_s=0.0, max_queue=8, queue_timeout_s=30.0,
                          backlog_predict=counted("backlog"), lanes=3)  # fmt: skip
        batcher.start()
        try:
            submit = lambda value: batcher.submit(np.full((1, 2), value, np.uint8))  # noqa: E731
            for value in range(4):  # one at a time: never a backlog
                assert (await submit(value)).tolist() == [[2.0 * value] * 2]
            assert peaks == {"predict": 1, "backlog": 0, "both": 1}
            rows = await asyncio.gather(*(submit(value) for value in range(8)))  # 8 queued: a backlog
            assert [row.tolist() for row in rows] == [[[2.0 * value] * 2] for value in range(8)]
            assert peaks["backlog"] == 3 and peaks["both"] <= 3, peaks
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_without_a_backlog_predict_there_is_one_lane():
    batcher = Batcher(
        lambda batch: batch, max_batch_size=4, batch_wait_s=0.0, max_queue=8, queue_timeout_s=1.0, lanes=4
    )
    assert batcher.lanes == 1 and not batcher.backlogged
