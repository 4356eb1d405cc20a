"""Bounded work: a per-request :class:`Deadline` and the :class:`WorkPool` that runs blocking work off the event loop.

Overload is shed early and cheaply instead of queued without bound: the pool admits at most ``max_pending`` tasks
(running or waiting for one of its threads) and answers 503 with ``Retry-After`` beyond that; a request past its
deadline gets 408 (its body never arrived) or 503 (its work did not finish), never an open-ended wait.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from opsvlm.serving.errors import ServingError, overloaded

__all__ = ["Deadline", "WorkPool"]

T = TypeVar("T")


class Deadline:
    """The time left to one request.

    Args:
        seconds: The request's whole budget.
        retry_after_s: ``Retry-After`` of the 503 when the work misses it.
        clock: Monotonic clock (injectable for tests).
    """

    def __init__(self, seconds: float, retry_after_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.retry_after_s = retry_after_s
        self._clock = clock
        self.expires_at = clock() + seconds

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self.expires_at - self._clock()

    def error(self, reading: bool = False) -> ServingError:
        """The answer for a missed deadline: 408 while the body was being received, else 503."""
        if reading:
            return ServingError(408, "request_timeout", f"the request body was not received within {self.seconds:g} s")
        return overloaded(
            f"the request did not finish within its deadline of {self.seconds:g} s; retry later",
            self.retry_after_s,
            reason="deadline_exceeded",
        )

    async def run(self, awaitable: Awaitable[T], *, reading: bool = False) -> T:
        """``await awaitable`` within the time left; cancelled and answered by :meth:`error` when it runs out."""
        remaining = self.remaining()
        if remaining <= 0:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise self.error(reading)
        try:
            return await asyncio.wait_for(awaitable, remaining)
        except TimeoutError:
            if self.remaining() > 0:  # a TimeoutError of the work itself, not of this deadline
                raise
            raise self.error(reading) from None


class WorkPool:
    """A bounded thread pool for blocking work (decoding, copying uploads, parsing JSON).

    Args:
        threads: Worker threads (started lazily by the executor, on first use).
        max_pending: Most tasks admitted at once, running or waiting for a thread.
        retry_after_s: ``Retry-After`` of the 503 when full.
    """

    def __init__(self, threads: int, max_pending: int, retry_after_s: float = 2.0):
        self.threads = threads
        self.max_pending = max_pending
        self.retry_after_s = retry_after_s
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="opsvlm-work")
        self._lock = threading.Lock()
        self._pending = 0
        self._shed = 0

    def _release(self, _: Any = None) -> None:
        with self._lock:
            self._pending -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a pool thread.

        The admission lasts until the call returns in its thread, even if the awaiting request was cancelled
        meanwhile (a thread cannot be interrupted), so the bound holds for the work actually running.

        Raises:
            ServingError: 503 ``overloaded`` when ``max_pending`` tasks are already admitted.
        """
        with self._lock:
            if self._pending >= self.max_pending:
                self._shed += 1
                raise overloaded(
                    f"the server is busy ({self._pending} decode/copy tasks pending); retry later", self.retry_after_s
                )
            self._pending += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def describe(self) -> dict[str, int]:
        return {"threads": self.threads, "max_pending": self.max_pending, "pending": self._pending, "shed": self._shed}

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
