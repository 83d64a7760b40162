"""Server-side micro-batching: requests that arrive within a few milliseconds of each other share one call.

``MicroBatcher(fn, ...)`` queues items; one asyncio task takes the first waiting item, gathers more for at
most ``max_wait_s`` (or until ``max_batch``), and runs ``fn(items) -> results`` once for all of them on the
model's executor (one thread: forward passes never overlap). While a batch runs, new requests queue, so under
load the next batch fills at once. A full queue is refused (``QueueFull``), and a request whose caller gave up
(its future cancelled, e.g. on a timeout) is dropped before its batch runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any


class QueueFull(Exception):
    """The batcher's queue holds ``max_queue`` items already."""


class MicroBatcher:
    """Batches calls of ``fn`` (a function of a list of items returning one result per item, in order)."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], executor: Executor, *, max_batch: int = 32,
                 max_wait_s: float = 0.005, max_queue: int = 256) -> None:
        if max_batch < 1 or max_wait_s < 0 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be positive and max_wait_s not negative")
        self.fn, self.executor = fn, executor
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.batch_sizes: list[int] = []  # of every call so far (for /v1/model and the load benchmark)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        """The result of ``fn`` for ``item``, computed in a batch with whatever else arrives meanwhile."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run())
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests are waiting")
        future = loop.create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _gather(self) -> list[tuple[Any, asyncio.Future]]:
        queue, loop = self._queue, asyncio.get_running_loop()
        batch = [await queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                break
        return [(item, future) for item, future in batch if not future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = await loop.run_in_executor(self.executor, self.fn, [item for item, _ in batch])
            except Exception as error:  # noqa: BLE001 (each waiting request gets the error)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
