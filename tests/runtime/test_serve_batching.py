"""The batcher alone: a model call that fails must fail its own requests and nothing else."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from fmtl.runtime.serve_batching import Batcher


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
