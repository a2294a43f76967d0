"""The generation worker: one thread owns the model and serves queued rows in dynamic batches.

Requests put their rows (one per prompt and sample) in a queue and await a future. The worker takes
the oldest row and every queued row that may share its `generate` call (`batch_key`: same sampling
settings), up to `max_batch_size`, generates them, and hands each request its completions when all
of its rows are done. One thread means the model never runs two generations at once. A request
whose client went away is cancelled: its queued rows are dropped and its running rows stop at the
next token.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from trainer.generate import Completion, Row, batch_key


@dataclass
class _Job:
    """One request's rows and where their completions go."""

    rows: list[Row]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    results: list[Completion | None] = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False

    def deliver(self, index: int, completion: Completion) -> None:
        self.results[index] = completion
        self.remaining -= 1
        if self.remaining == 0:
            self.loop.call_soon_threadsafe(_resolve, self.future, self.results, None)

    def fail(self, error: BaseException) -> None:
        self.remaining = -1  # delivered once
        self.loop.call_soon_threadsafe(_resolve, self.future, None, error)


def _resolve(future: asyncio.Future, results, error) -> None:
    if future.done():  # cancelled: the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(results)


@dataclass
class WorkerStats:
    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    dropped_rows: int = 0
    """Rows never generated because their request was cancelled while they were queued."""


class GenerationWorker:
    """`generate_batch(rows)` runs on the worker thread only; rows given to it share a `batch_key`."""

    def __init__(self, generate_batch: Callable[[list[Row]], list[Completion]], max_batch_size: int = 8):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.generate_batch = generate_batch
        self.max_batch_size = max_batch_size
        self.stats = WorkerStats()
        self._queue: deque[tuple[_Job, int]] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, rows: list[Row]) -> list[Completion]:
        """The completions of `rows`, in order. Cancelling the awaiting task cancels the rows."""
        loop = asyncio.get_running_loop()
        job = _Job(rows, loop.create_future(), loop, [None] * len(rows), len(rows))
        for row in rows:
            row.cancelled = lambda: job.cancelled
        with self._wakeup:
            self._queue.extend((job, index) for index in range(len(rows)))
            self._wakeup.notify()
        try:
            return await job.future
        finally:
            job.cancelled = not job.future.done() or job.future.cancelled()

    def _next_batch(self) -> list[tuple[_Job, int]] | None:
        """The oldest live row and the queued rows that can share its batch; None when stopping."""
        with self._wakeup:
            while True:
                while self._queue and self._queue[0][0].cancelled:
                    self._queue.popleft()
                    self.stats.dropped_rows += 1
                if self._queue or self._stopping:
                    break
                self._wakeup.wait()
            if self._stopping:
                return None
            key = batch_key(self._queue[0][0].rows[self._queue[0][1]])
            batch, rest = [], deque()
            for job, index in self._queue:
                if job.cancelled:
                    self.stats.dropped_rows += 1
                elif len(batch) < self.max_batch_size and batch_key(job.rows[index]) == key:
                    batch.append((job, index))
                else:
                    rest.append((job, index))
            self._queue = rest
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.stats.batches += 1
            self.stats.rows += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            try:
                completions = self.generate_batch([job.rows[index] for job, index in batch])
            except Exception as error:  # a bug, not a bad request: fail these requests, keep serving
                for job in {id(job): job for job, _ in batch}.values():
                    job.fail(error)
                continue
            for (job, index), completion in zip(batch, completions):
                if job.remaining > 0:
                    job.deliver(index, completion)
