"""The serving worker's queue policy, without a model: a job with no rows is answered at once, and
batches are shared out round-robin so a small request is never stuck behind a big one."""

import asyncio
import threading

from trainer.config import TestPrompt
from trainer.generate import Completion, Row
from trainer.serving.worker import GenerationWorker


def rows(prefix: str, count: int, **sampling) -> list[Row]:
    return [Row(TestPrompt(prompt=f"{prefix}{i}", **sampling), [1], f"{prefix}{i}") for i in range(count)]


class RecordingModel:
    """A stand-in for generate_all: records each batch's prompts; the first batch waits for `release`."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.first_started, self.release = threading.Event(), threading.Event()

    def __call__(self, batch: list[Row]) -> list[Completion]:
        self.batches.append([row.prompt_text for row in batch])
        if len(self.batches) == 1:
            self.first_started.set()
            assert self.release.wait(30)
        return [Completion(f"done {row.prompt_text}", "length", 1) for row in batch]


def test_a_job_with_no_rows_is_answered_at_once_even_with_the_worker_stopped():
    worker = GenerationWorker(RecordingModel(), max_batch_size=4)  # never started: nothing could resolve a queued job
    assert asyncio.run(asyncio.wait_for(worker.submit([]), timeout=5)) == []
    assert worker.queued == 0 and worker.stats.batches == 0


def test_a_small_request_shares_the_next_batch_with_a_big_one_and_finishes_first():
    model = RecordingModel()
    worker = GenerationWorker(model, max_batch_size=4)
    worker.start()
    finished: list[str] = []

    async def scenario():
        big = asyncio.ensure_future(worker.submit(rows("big", 12)))
        big.add_done_callback(lambda _: finished.append("big"))
        assert await asyncio.to_thread(model.first_started.wait, 30)  # big0..big3 are being generated
        small = asyncio.ensure_future(worker.submit(rows("small", 1)))
        small.add_done_callback(lambda _: finished.append("small"))
        while worker.queued < 9:  # big4..big11 and small0
            await asyncio.sleep(0.01)
        model.release.set()
        return await big, await small

    try:
        big, small = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    finally:
        model.release.set()
        worker.stop()
    assert model.batches == [
        ["big0", "big1", "big2", "big3"],
        ["big4", "small0", "big5", "big6"],  # one row per waiting request per pass
        ["big7", "big8", "big9", "big10"],
        ["big11"],
    ]
    assert finished == ["small", "big"]
    assert [c.text for c in small] == ["done small0"] and [c.text for c in big] == [f"done big{i}" for i in range(12)]
    assert worker.stats.batches == 4 and worker.stats.rows == 13 and worker.stats.largest_batch == 4


def test_requests_that_cannot_share_a_batch_take_turns():
    """A seeded sampled row is generated alone (its own RNG); it waits one batch, not for the greedy job's rows."""
    model = RecordingModel()
    worker = GenerationWorker(model, max_batch_size=2)
    worker.start()

    async def scenario():
        greedy = asyncio.ensure_future(worker.submit(rows("g", 6)))
        assert await asyncio.to_thread(model.first_started.wait, 30)
        seeded = [Row(TestPrompt(prompt=f"s{i}", temperature=0.7), [1], f"s{i}", seed=i) for i in range(2)]
        sampled = asyncio.ensure_future(worker.submit(seeded))
        while worker.queued < 6:
            await asyncio.sleep(0.01)
        model.release.set()
        await asyncio.gather(greedy, sampled)

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    finally:
        model.release.set()
        worker.stop()
    assert model.batches == [["g0", "g1"], ["g2", "g3"], ["s0"], ["g4", "g5"], ["s1"]]
