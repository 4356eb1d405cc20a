"""Decoding and prediction in this process: the backend of the plain-FastAPI baseline server and of the tests.

Decoding runs in the app's bounded work pool (each decode waits on its own decoder process); predictions go through
the same :class:`~opsvlm.serving.batcher.Batcher` the Serve Predictor uses: one forward pass at a time, formed
from the work queued meanwhile, so the model and its tokenizer are never used from two threads at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from opsvlm.serving.batcher import Batcher, BatchingSettings
from opsvlm.serving.errors import ServingError
from opsvlm.serving.limits import ServingLimits
from opsvlm.serving.media import DecodedClip, Media, Window, decode_media
from opsvlm.serving.predict import Outcome, WorkItem
from opsvlm.serving.timeline import TimelineSupport
from opsvlm.serving.watcher import ModelWatcher
from opsvlm.serving.work import Deadline, WorkPool
from opsvlm.video.sampling import SamplingSpec

__all__ = ["LocalBackend"]


class LocalBackend:
    """:class:`~opsvlm.serving.endpoint.Backend` in this process.

    Args:
        watcher: The model.
        limits: Decode limits and the ``Retry-After`` of shed work.
        batching: Batch size, wait and queue bound (default :class:`BatchingSettings`).
    """

    def __init__(self, watcher: ModelWatcher, limits: ServingLimits, batching: BatchingSettings | None = None):
        self.watcher = watcher
        self.limits = limits
        self.batcher = Batcher(lambda: self.watcher.current, batching or BatchingSettings(), limits.retry_after_s)
        self._timeline = TimelineSupport(lambda: self.watcher.current)

    async def sampling_spec(self) -> SamplingSpec:
        return self.watcher.current.spec

    def remember_spec(self, spec: SamplingSpec) -> None:
        """Nothing to remember: the spec is always read from the current model."""

    async def decode(
        self, media: Media, windows: Sequence[Window], spec: SamplingSpec, pool: WorkPool
    ) -> list[DecodedClip | ServingError]:
        return await pool.run(decode_media, media, windows, spec, self.limits)

    async def predict(self, items: Sequence[WorkItem], deadline: Deadline) -> list[Outcome]:
        return list(await asyncio.gather(*(self.batcher.submit(item, deadline.remaining()) for item in items)))

    async def health(self) -> dict[str, Any]:
        return {
            **self.batcher.health.describe(),
            "healthy": self.batcher.alive and self.batcher.health.healthy,
            "model_version": self.watcher.current.version,
        }

    async def status(self, show_paths: bool = False) -> dict[str, Any]:
        status = self.watcher.status(show_paths)
        status["batching"] = self.batcher.describe()
        status["health"] = self.batcher.health.describe()
        return status

    async def timeline_support(self, show_paths: bool = False) -> dict[str, Any]:
        return await asyncio.to_thread(self._timeline.get, show_paths)
