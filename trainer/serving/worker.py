"""The generation worker: one thread owns the model and serves queued requests in fair, dynamic batches.

A request (a job: its rows, one per prompt and sample, or one per input to embed) waits in a queue
and awaits a future. Each round the worker builds one batch of at most `max_batch_size` rows: the
request at the head of the queue sets the kind of batch (embedding, or the `batch_key` of its next
row: same sampling settings), then the waiting requests each give one compatible row in turn,
round after round, until the batch is full. After the batch the head request goes to the back of
the queue. So a request never waits for another request's remaining rows: a request whose rows
can share the next batch (greedy rows always can) gets into it, so it waits at most for the batch
being generated; one that cannot (other sampling settings, a seeded sampled row: alone) waits at
most one batch per request ahead of it in the queue. A big request advances by its fair share of
every batch. Each request has its completions when all of
its rows are done; a job with no rows is answered at once. One thread means the model never runs
two forward passes at once. A request whose client went away is cancelled: its queued rows are
dropped and its running rows stop at the next token.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from trainer.generate import Completion, Row, batch_key

GENERATE, EMBED = "generate", "embed"


@dataclass
class _Job:
    """One request's rows, which of them wait, and where their results go."""

    kind: str
    rows: list
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    on_result: Callable[[int, Any], None] | None = None
    results: list = field(default_factory=list)
    remaining: int = 0
    pending: deque = field(default_factory=deque)
    cancelled: bool = False

    def deliver(self, index: int, result: Any) -> None:
        self.results[index] = result
        self.remaining -= 1
        if self.on_result is not None:
            self.loop.call_soon_threadsafe(self.on_result, index, result)
        if self.remaining == 0:
            self.loop.call_soon_threadsafe(_resolve, self.future, self.results, None)

    def fail(self, error: BaseException) -> None:
        self.remaining = -1  # delivered once
        self.cancelled = True  # its rows still queued are dropped
        self.loop.call_soon_threadsafe(_resolve, self.future, None, error)

    def next_key(self) -> tuple:
        index = self.pending[0]
        return (EMBED,) if self.kind == EMBED else batch_key(self.rows[index])


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
    """`generate_batch(rows)` and `embed_batch(rows)` run on the worker thread only; rows given to
    `generate_batch` share a `batch_key`."""

    def __init__(
        self,
        generate_batch: Callable[[list[Row]], list[Completion]],
        max_batch_size: int = 8,
        embed_batch: Callable[[list], list] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.generate_batch = generate_batch
        self.embed_batch = embed_batch
        self.max_batch_size = max_batch_size
        self.stats = WorkerStats()
        self._jobs: deque[_Job] = deque()  # in turn order; each has rows still to take
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
        """Rows waiting for a batch."""
        with self._wakeup:
            return sum(len(job.pending) for job in self._jobs)

    def waiting_jobs(self) -> list[_Job]:
        with self._wakeup:
            return list(self._jobs)

    async def submit(
        self, rows: list[Row], on_result: Callable[[int, Completion], None] | None = None
    ) -> list[Completion]:
        """The completions of `rows`, in order; `on_result(index, completion)` is also called (on the
        event loop) as each row finishes. Cancelling the awaiting task cancels the rows."""
        return await self._submit(GENERATE, rows, on_result)

    async def embed(self, rows: list) -> list:
        """`embed_batch`'s results for `rows`, in order, batched with other requests' rows."""
        if self.embed_batch is None:
            raise RuntimeError("this worker was made without embed_batch")
        return await self._submit(EMBED, rows, None)

    async def _submit(self, kind: str, rows: list, on_result) -> list:
        if not rows:  # nothing to wait for: a job with no rows would never be resolved by the worker
            return []
        loop = asyncio.get_running_loop()
        job = _Job(
            kind, rows, loop.create_future(), loop, on_result, [None] * len(rows), len(rows), deque(range(len(rows)))
        )
        if kind == GENERATE:
            for row in rows:
                row.cancelled = lambda: job.cancelled
        with self._wakeup:
            self._jobs.append(job)
            self._wakeup.notify()
        try:
            return await job.future
        finally:
            job.cancelled = not job.future.done() or job.future.cancelled()

    def _next_batch(self) -> tuple[str, list[tuple[_Job, int]]] | None:
        """(kind, rows) of the next batch, shared out fairly (see the module docstring); None when stopping."""
        with self._wakeup:
            while True:
                for job in [job for job in self._jobs if job.cancelled]:
                    self.stats.dropped_rows += len(job.pending)
                    self._jobs.remove(job)
                if self._jobs or self._stopping:
                    break
                self._wakeup.wait()
            if self._stopping:
                return None
            head = self._jobs[0]
            key = head.next_key()
            batch: list[tuple[_Job, int]] = []
            taking = True
            while taking and len(batch) < self.max_batch_size:
                taking = False  # one row from each request whose next row fits, per pass
                for job in self._jobs:
                    if len(batch) == self.max_batch_size:
                        break
                    if job.pending and job.next_key() == key:
                        batch.append((job, job.pending.popleft()))
                        taking = True
            self._jobs.rotate(-1)  # the next batch starts with the next request
            self._jobs = deque(job for job in self._jobs if job.pending)
            return head.kind, batch

    def _run(self) -> None:
        while (taken := self._next_batch()) is not None:
            kind, batch = taken
            self.stats.batches += 1
            self.stats.rows += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            run = self.generate_batch if kind == GENERATE else self.embed_batch
            try:
                results = run([job.rows[index] for job, index in batch])
            except Exception as error:  # a bug, not a bad request: fail these requests, keep serving
                for job in {id(job): job for job, _ in batch}.values():
                    job.fail(error)
                continue
            for (job, index), result in zip(batch, results):
                if job.remaining > 0:
                    job.deliver(index, result)
