"""Work lanes: a bounded asyncio queue in front of a worker thread, so CPU/GPU work never runs on the event loop.

    lane = Lane("mint", handler, executor=pool, max_batch=16)   # handler(items) -> [result | exception]
    result = await lane.submit(item)     # QueueFullError (429) when full, WorkTimeoutError (504) when late

A worker takes one job, waits `max_wait_s` for more to arrive, hands up to `max_batch` items to
`handler` in the executor's thread and resolves each job with its own result or exception. `workers` > 1
runs that many batches at once (the executor needs as many threads; the handler must be thread-safe). A job whose caller
gave up (timeout) before its batch started is skipped; one already running finishes unobserved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from loramint.service.errors import QueueFullError, UnavailableError, WorkTimeoutError
from loramint.service.metrics import Metrics

log = logging.getLogger(__name__)
Handler = Callable[[Sequence[Any]], Sequence[Any]]


@dataclass
class _Job:
    item: Any
    future: asyncio.Future
    enqueued: float


class Lane:
    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        executor: Executor,
        metrics: Metrics,
        max_batch: int = 1,
        max_wait_s: float = 0.0,
        queue_size: int = 64,
        timeout_s: float = 60.0,
        workers: int = 1,
    ) -> None:
        if workers < 1:
            raise ValueError(f"a lane needs at least one worker, got {workers}")
        self.name, self.handler, self.executor, self.metrics = name, handler, executor, metrics
        self.workers = workers
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue_size, self.timeout_s = queue_size, timeout_s
        self._queue: asyncio.Queue[_Job] | None = None
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._queue = asyncio.Queue(self.queue_size)
        self._gathering = asyncio.Lock()
        self._tasks = [
            asyncio.create_task(self._run(), name=f"lane-{self.name}-{i}") for i in range(self.workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(UnavailableError("the service is shutting down"))

    @property
    def running(self) -> bool:
        """Whether all its worker tasks are alive (they only end when the service stops)."""
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    def enqueue(self, item: Any) -> asyncio.Future:
        """Queue `item` (raises QueueFullError at once when the queue is full); await the future with `wait`."""
        if self._queue is None:
            raise UnavailableError(f"the {self.name} worker is not running")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Job(item, future, time.perf_counter()))
        except asyncio.QueueFull:
            self.metrics.rejected.labels(self.name).inc()
            raise QueueFullError(
                f"the {self.name} queue is full ({self.queue_size} requests waiting): retry later"
            ) from None
        self.metrics.queue_depth.labels(self.name).set(self.depth)
        return future

    async def wait(self, future: asyncio.Future, timeout_s: float | None = None) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            future.cancel()
            self.metrics.timeouts.labels(self.name).inc()
            raise WorkTimeoutError(
                f"{self.name} work did not finish within {timeout_s:g} s (server busy): retry later"
            ) from None

    async def submit(self, item: Any) -> Any:
        return await self.wait(self.enqueue(item))

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            async with self._gathering:  # one worker gathers a batch at a time; the others run theirs
                jobs = [await self._queue.get()]
                if self.max_batch > 1 and self.max_wait_s > 0:
                    await asyncio.sleep(self.max_wait_s)
                while len(jobs) < self.max_batch and not self._queue.empty():
                    jobs.append(self._queue.get_nowait())
            self.metrics.queue_depth.labels(self.name).set(self.depth)
            jobs = [j for j in jobs if not j.future.done()]  # callers that timed out while queued
            if not jobs:
                continue
            started = time.perf_counter()
            for job in jobs:
                self.metrics.wait_seconds.labels(self.name).observe(started - job.enqueued)
            self.metrics.batch_size.labels(self.name).observe(len(jobs))
            try:
                results = await loop.run_in_executor(self.executor, self.handler, [j.item for j in jobs])
                if len(results) != len(jobs):
                    raise RuntimeError(
                        f"{self.name} handler returned {len(results)} results for {len(jobs)} jobs"
                    )
            except Exception as exc:  # the handler failed as a whole: every job gets the error
                log.exception("%s worker batch failed", self.name)
                results = [exc] * len(jobs)
            self.metrics.work_seconds.labels(self.name).observe(time.perf_counter() - started)
            for job, result in zip(jobs, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
