"""One forward pass at a time over the work queued meanwhile: the model's only door (no concurrent tokenizer use).

Every prediction, clip or objects, goes through :class:`Batcher`: the next batch is formed only when the previous
forward pass is done, from the items that queued meanwhile (up to ``max_batch_size`` inputs; an item with more
inputs than that runs alone), so under load the batches grow by themselves. Ray's ``@serve.batch`` is not used: it
forms the next batch while one runs (a new batch every ``batch_wait_timeout_s``), so when a forward pass is long
against the gaps between requests (a CPU) its batches stay at about one input.

Overload is shed, not queued without bound: an item that would take the queue past ``max_queued_inputs`` is
answered 503 at once, and an item whose deadline passed while it waited is answered 503 instead of being run.
The model runs in one dedicated thread; the event loop stays free for health checks and status.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from opsvlm.serving.errors import ServingError, overloaded
from opsvlm.serving.predict import Outcome, PredictionHealth, WorkItem, predict_items

__all__ = ["Batcher", "BatchingSettings"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingSettings:
    """How the model's queue forms batches and sheds load.

    Attributes:
        max_batch_size: Most inputs (clips, objects) per forward pass; an item with more runs alone.
        batch_wait_timeout_s: How long a batch that is not full waits for more work before it runs.
        max_queued_inputs: Most inputs waiting for the model; work beyond gets 503 (``Retry-After``) at once.
        unhealthy_after: Consecutive failed forward passes after which ``/health`` reports the model unhealthy.
    """

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    max_queued_inputs: int = 64
    unhealthy_after: int = 5

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queued_inputs", "unhealthy_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")


@dataclass
class _Queued:
    item: WorkItem
    future: asyncio.Future
    queued_at: float
    expires_at: float | None


class Batcher:
    """The model's queue and its single consumer (see the module docstring).

    Args:
        model: Returns the current :class:`opsvlm.serving.watcher.LoadedModel` (taken once per batch: the whole
            batch is predicted, and reported, by one version).
        settings: Batch size, wait, queue bound, health threshold.
        retry_after_s: ``Retry-After`` of the 503s it sheds load with.
    """

    def __init__(self, model: Callable[[], Any], settings: BatchingSettings, retry_after_s: float = 2.0):
        self._model = model
        self.settings = settings
        self.retry_after_s = retry_after_s
        self.health = PredictionHealth(settings.unhealthy_after)
        self._waiting: collections.deque[_Queued] = collections.deque()
        self._queued_inputs = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="opsvlm-model")
        # Counters for /status (the benchmark reads them): batches formed, items and inputs predicted, seconds the
        # model was busy, seconds items waited before their batch started, items shed (queue full) or expired.
        self.counters: dict[str, Any] = {
            "max_batch_size": settings.max_batch_size,
            "batches": 0,
            "items": 0,
            "inputs": 0,
            "largest_batch": 0,
            "busy_s": 0.0,
            "queue_wait_s": 0.0,
            "shed": 0,
            "expired": 0,
        }

    def start(self) -> None:
        """Start the consumer on the running event loop (idempotent)."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run_forever())

    @property
    def alive(self) -> bool:
        """Whether the consumer can run: not started yet (it starts on the first item) or running; a consumer that
        stopped would leave every request waiting."""
        return self._task is None or not self._task.done()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: WorkItem, timeout_s: float | None = None) -> Outcome:
        """Queue one item and wait for its outcome.

        Args:
            item: The work.
            timeout_s: The caller's remaining deadline: if the item is still waiting then, it is answered 503
                instead of being run.

        Returns:
            The item's outcome; a 503 ``overloaded`` :class:`ServingError` at once when the queue is full.
        """
        self.start()
        count = len(item.inputs)
        if self._queued_inputs and self._queued_inputs + count > self.settings.max_queued_inputs:
            self.counters["shed"] += 1
            return overloaded(
                f"the model's queue is full ({self._queued_inputs} inputs waiting); retry later", self.retry_after_s
            )
        now = time.monotonic()
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Queued(item, future, now, now + timeout_s if timeout_s is not None else None))
        self._queued_inputs += count
        self._wakeup.set()
        return await future

    def _pop(self) -> _Queued:
        queued = self._waiting.popleft()
        self._queued_inputs -= len(queued.item.inputs)
        return queued

    async def _next_batch(self) -> list[_Queued]:
        while not self._waiting:
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = [self._pop()]
        size = len(batch[0].item.inputs)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.batch_wait_timeout_s
        while size < self.settings.max_batch_size:
            if self._waiting:
                if size + len(self._waiting[0].item.inputs) > self.settings.max_batch_size:
                    break
                batch.append(self._pop())
                size += len(batch[-1].item.inputs)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        return batch

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            now = time.monotonic()
            live = []
            for queued in batch:
                if queued.future.done():  # the caller gave up (client went away)
                    continue
                if queued.expires_at is not None and now >= queued.expires_at:
                    self.counters["expired"] += 1
                    queued.future.set_result(
                        overloaded(
                            "the request's deadline passed while it waited for the model; retry later",
                            self.retry_after_s,
                            reason="deadline_exceeded",
                        )
                    )
                    continue
                live.append(queued)
            if not live:
                continue
            model = self._model()
            started = time.monotonic()
            inputs = sum(len(q.item.inputs) for q in live)
            self.counters["batches"] += 1
            self.counters["items"] += len(live)
            self.counters["inputs"] += inputs
            self.counters["largest_batch"] = max(self.counters["largest_batch"], inputs)
            self.counters["queue_wait_s"] += sum(started - q.queued_at for q in live)
            items = [q.item for q in live]
            try:
                outcomes = await loop.run_in_executor(self._executor, predict_items, model, items, self.health)
            except Exception as exc:  # predict_items contains model errors; this is a last resort
                logger.exception("batch failed")
                self.health.record(False, repr(exc))
                outcomes = [ServingError(500, "prediction_failed", f"prediction failed: {exc!r}")] * len(live)
            self.counters["busy_s"] += time.monotonic() - started
            for queued, outcome in zip(live, outcomes, strict=True):
                if not queued.future.done():
                    queued.future.set_result(outcome)

    def describe(self) -> dict[str, Any]:
        return {**self.counters, "queued_inputs": self._queued_inputs}
