"""The batcher alone, in an event loop, with a scoring function that records its calls: requests merged up to
max_batch and split back, kinds kept apart, a failing request isolated, queue full, timeouts."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mmalign.serve.batching import Batcher, QueueFull, RequestTimeout


class Recorder:
    """score(key, payload, prompts): each item's score is its payload value; records the calls; "bad" fails;
    optionally blocks until released."""

    def __init__(self, block: bool = False):
        self.calls: list[list] = []
        self.release = threading.Event()
        if not block:
            self.release.set()

    def __call__(self, key, payload, prompts):
        self.release.wait(10)
        if "bad" in prompts:
            raise ValueError("a bad prompt")
        self.calls.append(list(payload))
        return [float(v) for v in payload]


def merge(payloads):
    return [v for p in payloads for v in p]


def run(coro):
    return asyncio.run(coro)


def test_requests_are_merged_up_to_max_batch_and_split_back():
    recorder = Recorder()

    async def main():
        batcher = Batcher("t", recorder, merge, max_batch=5, max_wait=0.2, capacity=16)
        await batcher.start()
        requests = [[10, 11], [20], [30, 31], [40, 41], [50]]  # 2 + 1 + 2 = 5, then 2 + 1
        results = await asyncio.gather(*(batcher.submit("k", r, ["p"] * len(r)) for r in requests))
        await batcher.stop()
        return requests, results, batcher.stats

    requests, results, stats = run(main())
    assert [r.scores for r in results] == [[float(v) for v in r] for r in requests]
    assert recorder.calls == [[10, 11, 20, 30, 31], [40, 41, 50]]
    assert [(r.batch_id, r.batch_size) for r in results] == [(1, 5), (1, 5), (1, 5), (2, 3), (2, 3)]
    assert stats.requests == 5 and stats.items == 8 and stats.batches == 2 and stats.largest_batch == 5


def test_kinds_are_not_merged_and_a_large_request_runs_in_max_batch_chunks():
    recorder = Recorder()

    async def main():
        batcher = Batcher("t", recorder, merge, max_batch=3, max_wait=0.2, capacity=16)
        await batcher.start()
        a = batcher.submit(("tensor", (3, 8, 8)), [1], ["p"])
        b = batcher.submit(("tensor", (3, 4, 4)), [2], ["p"])
        c = batcher.submit(("tensor", (3, 8, 8)), [3, 4, 5, 6, 7, 8, 9], ["p"] * 7)
        results = await asyncio.gather(a, b, c)
        await batcher.stop()
        return results

    a, b, c = run(main())
    assert (a.scores, b.scores, c.scores) == ([1.0], [2.0], [float(v) for v in range(3, 10)])
    # a alone (b has another shape: held for the next batch), b alone (c has a's shape), c in chunks of 3
    assert recorder.calls == [[1], [2], [3, 4, 5], [6, 7, 8], [9]]


def test_a_failing_request_fails_alone_and_its_neighbours_are_scored():
    recorder = Recorder()

    async def main():
        batcher = Batcher("t", recorder, merge, max_batch=8, max_wait=0.2, capacity=16)
        await batcher.start()
        results = await asyncio.gather(
            batcher.submit("k", [1], ["p"]),
            batcher.submit("k", [2], ["bad"]),
            batcher.submit("k", [3], ["p"]),
            return_exceptions=True,
        )
        await batcher.stop()
        return results, batcher.stats

    (first, second, third), stats = run(main())
    assert first.scores == [1.0] and third.scores == [3.0]
    assert isinstance(second, ValueError) and "bad prompt" in str(second)
    assert stats.failures == 1


def test_a_full_queue_refuses_at_once():
    recorder = Recorder(block=True)

    async def main():
        batcher = Batcher("t", recorder, merge, max_batch=1, max_wait=0.0, capacity=1)
        await batcher.start()
        running = asyncio.create_task(batcher.submit("k", [1], ["p"]))
        await asyncio.sleep(0.05)  # the worker holds it in the (blocked) model thread
        waiting = asyncio.create_task(batcher.submit("k", [2], ["p"]))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await batcher.submit("k", [3], ["p"])
        recorder.release.set()
        results = await asyncio.gather(running, waiting)
        await batcher.stop()
        return results, batcher.stats

    results, stats = run(main())
    assert [r.scores for r in results] == [[1.0], [2.0]] and stats.queue_full == 1 and stats.requests == 2


def test_a_request_that_timed_out_is_dropped_before_it_costs_model_time():
    recorder = Recorder(block=True)

    async def main():
        batcher = Batcher("t", recorder, merge, max_batch=1, max_wait=0.0, capacity=4, timeout=0.2)
        await batcher.start()
        first = asyncio.create_task(batcher.submit("k", [1], ["p"]))
        await asyncio.sleep(0.02)
        with pytest.raises(RequestTimeout):
            await batcher.submit("k", [2], ["p"])  # queued behind the blocked one, gives up
        recorder.release.set()
        with pytest.raises(RequestTimeout):
            await first  # its model call was running when it gave up: the result is discarded
        later = await batcher.submit("k", [3], ["p"])
        await batcher.stop()
        return later, batcher.stats

    later, stats = run(main())
    assert later.scores == [3.0]
    assert recorder.calls == [[1], [3]]  # [2] was abandoned in the queue: never scored
    assert stats.timeouts == 2
