"""Dynamic batching of scoring requests for one reward model.

Requests wait in a bounded :class:`asyncio.Queue`; one worker coroutine takes the oldest, then keeps taking
requests that can share its model call (same key: same tensor shape and dtype, or decoded images) until
``max_batch`` items are gathered or ``max_wait`` seconds have passed since the first, runs the model once in its
own thread (the event loop keeps accepting requests meanwhile), and hands each request its own slice of the
scores. A full queue refuses at once (:class:`QueueFull`, HTTP 503) rather than letting latency grow without
bound; each request waits at most ``timeout`` seconds (:class:`RequestTimeout`, HTTP 504) and one that gave up
is dropped before it costs model time. When a shared model call fails, each request of it is scored alone, so a
bad request fails by itself and its neighbours still get their scores.

The batcher knows nothing of torch or HTTP: ``score(key, payload, prompts)`` scores one model batch and returns
floats; ``merge(payloads)`` joins the payloads of one key; a payload supports ``len()`` and slicing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

ScoreFn = Callable[[Hashable, Any, list[str]], Sequence[float]]
MergeFn = Callable[[list[Any]], Any]


class QueueFull(Exception):
    """The reward's queue holds ``capacity`` requests already: come back later (HTTP 503 + Retry-After)."""


class RequestTimeout(Exception):
    """The request was not scored within the timeout (HTTP 504)."""


class ShuttingDown(Exception):
    """The server stopped before the request was scored (HTTP 503)."""


@dataclass
class Scored:
    """One request's scores and the model call that produced them (``batch_id``, its ``batch_size`` items)."""

    scores: list[float]
    batch_id: int
    batch_size: int


@dataclass
class Job:
    key: Hashable
    payload: Any
    prompts: list[str]
    future: asyncio.Future
    abandoned: bool = False  # the request timed out: skip it

    @property
    def items(self) -> int:
        return len(self.prompts)


@dataclass
class BatchStats:
    """Counters since start: accepted requests and items, model calls, refusals, timeouts, failures."""

    requests: int = 0
    items: int = 0
    batches: int = 0
    queue_full: int = 0
    timeouts: int = 0
    failures: int = 0
    largest_batch: int = 0
    model_seconds: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "model_seconds": round(self.model_seconds, 3)}


class Batcher:
    """The queue and worker of one reward; :meth:`start` inside the running event loop, then :meth:`submit`."""

    def __init__(
        self,
        name: str,
        score: ScoreFn,
        merge: MergeFn,
        *,
        max_batch: int = 16,
        max_wait: float = 0.005,
        capacity: int = 256,
        timeout: float = 60.0,
    ):
        if max_batch < 1 or capacity < 1 or max_wait < 0 or timeout <= 0:
            raise ValueError(
                f"max_batch ({max_batch}) and capacity ({capacity}) must be >= 1, max_wait ({max_wait}) >= 0, "
                f"timeout ({timeout}) > 0"
            )
        self.name, self._score, self._merge = name, score, merge
        self.max_batch, self.max_wait, self.capacity, self.timeout = max_batch, max_wait, capacity, timeout
        self.stats = BatchStats()
        self._queue: asyncio.Queue[Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batch_ids = itertools.count(1)

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.capacity)
        # one thread per model: calls never overlap, so a reward's caches need no lock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"score-{self.name}")
        self._worker = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(ShuttingDown(f"{self.name}: the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # -- requests -----------------------------------------------------------------------------------------
    async def submit(self, key: Hashable, payload: Any, prompts: list[str]) -> Scored:
        """Queue one request and wait for its scores; raises :class:`QueueFull` at once when the queue is full,
        :class:`RequestTimeout` after ``timeout`` seconds, or the model's own error when its request failed."""
        if self._queue is None:
            raise ShuttingDown(f"{self.name}: the batcher is not running")
        job = Job(key, payload, list(prompts), asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self.stats.queue_full += 1
            raise QueueFull(f"{self.name}: {self.capacity} requests are waiting already") from None
        self.stats.requests += 1
        self.stats.items += job.items
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout)
        except asyncio.TimeoutError:
            job.abandoned = True
            self.stats.timeouts += 1
            raise RequestTimeout(f"{self.name}: not scored within {self.timeout:g} s") from None

    # -- worker -------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._queue is not None
        held: Job | None = None  # taken from the queue but not mergeable with the batch before it
        while True:
            first = held if held is not None else await self._queue.get()
            held = None
            if first.abandoned:
                continue
            batch, size = [first], first.items
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while size < self.max_batch:
                job = await self._next(deadline)
                if job is None:
                    break
                if job.abandoned:
                    continue
                if job.key != first.key or size + job.items > self.max_batch:
                    held = job
                    break
                batch.append(job)
                size += job.items
            await self._run_batch(batch)

    async def _next(self, deadline: float) -> Job | None:
        """The next queued request, waiting until ``deadline`` (loop time) at most; None when none came."""
        assert self._queue is not None
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        try:
            return await asyncio.wait_for(self._queue.get(), remaining)
        except asyncio.TimeoutError:
            return None

    async def _run_batch(self, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        batch_id, size = next(self._batch_ids), sum(job.items for job in jobs)
        try:
            results = await loop.run_in_executor(self._executor, self._score_jobs, jobs)
        except Exception as error:  # noqa: BLE001 - handed to the requests, never raised in the worker
            if len(jobs) > 1:  # isolate the request at fault: score each alone
                logger.info(
                    "%s: a batch of %d requests failed (%s); scoring them one by one", self.name, len(jobs), error
                )
                for job in jobs:
                    await self._run_batch([job])
                return
            self.stats.failures += 1
            if not jobs[0].future.done():
                jobs[0].future.set_exception(error)
            return
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, size)
        for job, scores in zip(jobs, results):
            if not job.future.done():
                job.future.set_result(Scored(scores, batch_id, size))

    def _score_jobs(self, jobs: list[Job]) -> list[list[float]]:
        """In the model thread: one model call over the jobs' items (``max_batch`` at a time when a single
        request is larger), split back per job."""
        start = time.perf_counter()
        payload = jobs[0].payload if len(jobs) == 1 else self._merge([job.payload for job in jobs])
        prompts = [prompt for job in jobs for prompt in job.prompts]
        scores: list[float] = []
        for begin in range(0, len(prompts), self.max_batch):
            end = begin + self.max_batch
            part = list(self._score(jobs[0].key, payload[begin:end], prompts[begin:end]))
            if len(part) != len(prompts[begin:end]):
                raise RuntimeError(f"{self.name} returned {len(part)} scores for {len(prompts[begin:end])} items")
            scores.extend(part)
        self.stats.model_seconds += time.perf_counter() - start
        out, offset = [], 0
        for job in jobs:
            out.append(scores[offset : offset + job.items])
            offset += job.items
        return out
