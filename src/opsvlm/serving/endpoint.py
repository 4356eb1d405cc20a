"""What an endpoint module gets to work with, and how it plugs into the app: the extension point of the HTTP API.

An endpoint module (``clips``, ``objects``, ``timeline``) exposes one
:class:`Endpoint`: the kind of media it sends to the model and a function that builds its ``APIRouter`` from a
:class:`ServingContext`. :func:`opsvlm.serving.app.create_app` includes every endpoint it is given
(:data:`opsvlm.serving.app.DEFAULT_ENDPOINTS` by default), so adding an endpoint is one new module plus one entry
in that tuple; nothing else in the app changes.

The context holds the backend (decoding and prediction), the limits, the bounded work pool, request admission
(:meth:`ServingContext.admit`: at most ``max_inflight_requests`` requests at work, the rest get 503 before their
body is read) and each request's :class:`~opsvlm.serving.work.Deadline`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import APIRouter

from opsvlm.serving.errors import ServingError, overloaded
from opsvlm.serving.limits import ServingLimits
from opsvlm.serving.media import DecodedClip, Media, Window
from opsvlm.serving.predict import Outcome, WorkItem, WrongTask
from opsvlm.serving.work import Deadline, WorkPool
from opsvlm.video.sampling import SamplingSpec

__all__ = ["Backend", "Endpoint", "ServingContext"]


class Backend(Protocol):
    """Where decoding and prediction happen (in-process: :class:`opsvlm.serving.local.LocalBackend`; Ray Serve
    deployments: ``serve_app.app.ServeBackend``)."""

    async def sampling_spec(self) -> SamplingSpec:
        """The spec to decode with: the current model's, as last seen."""
        ...

    def remember_spec(self, spec: SamplingSpec) -> None:
        """The model reported a new spec (an alias swap): decode with it from now on."""
        ...

    async def decode(
        self, media: Media, windows: Sequence[Window], spec: SamplingSpec, pool: WorkPool
    ) -> list[DecodedClip | ServingError]:
        """Clips of one video (see :func:`opsvlm.serving.media.decode_media`); blocking work goes to ``pool``."""
        ...

    async def predict(self, items: Sequence[WorkItem], deadline: Deadline) -> list[Outcome]:
        """One outcome per item (see :func:`opsvlm.serving.predict.predict_items`), within the deadline; a
        model that cannot be reached is a 503 outcome, never an exception."""
        ...

    async def health(self) -> dict[str, Any]:
        """``{"healthy": bool, "model_version": str, ...}`` of the model (see
        :class:`opsvlm.serving.predict.PredictionHealth`)."""
        ...

    async def status(self, show_paths: bool = False) -> dict[str, Any]:
        """Model, task, sampling spec, labels, batching and health; no filesystem paths unless ``show_paths``."""
        ...

    async def timeline_support(self, show_paths: bool = False) -> dict[str, Any]:
        """What a whole-recording timeline needs from the current model (see
        :func:`opsvlm.serving.timeline.model_timeline_support`): its version, task, media, window length and
        grammar."""
        ...


@dataclass
class ServingContext:
    """Shared by every endpoint of one app.

    Attributes:
        backend: Decodes and predicts.
        limits: Input limits and deadlines.
        pool: The bounded pool for blocking work (decoding, copying, JSON parsing).
        media_routes: ``{media: path}`` of the endpoint each kind of media goes to (for 409 hints).
        show_paths: Whether answers may show server filesystem paths.
    """

    backend: Backend
    limits: ServingLimits
    pool: WorkPool
    media_routes: dict[str, str] = field(default_factory=dict)
    show_paths: bool = False
    inflight: int = 0
    shed: int = 0

    def deadline(self) -> Deadline:
        """A new request's deadline (``request_deadline_s`` from now)."""
        return Deadline(self.limits.request_deadline_s, self.limits.retry_after_s)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Admit one request to work, or refuse it with 503 at once (before its body is read) when
        ``max_inflight_requests`` are already at work."""
        if self.inflight >= self.limits.max_inflight_requests:
            self.shed += 1
            raise overloaded(
                f"the server is at capacity ({self.inflight} requests in progress); retry later",
                self.limits.retry_after_s,
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def wrong_task(self, outcome: WrongTask, what: str) -> ServingError:
        """The 409 for a request of the wrong kind: names the endpoint the served model's media goes to."""
        route = self.media_routes.get(outcome.media)
        hint = f": use {route}" if route else ""
        return ServingError(409, "wrong_task", f"the served model takes {outcome.media} inputs, not {what}{hint}")

    def describe(self) -> dict[str, Any]:
        return {"inflight_requests": self.inflight, "shed_requests": self.shed, "work_pool": self.pool.describe()}


@dataclass(frozen=True)
class Endpoint:
    """One endpoint module's contribution to the app.

    Attributes:
        name: For logs and docs.
        media: The kind of media its requests send to the model (``None`` if none), so a model of another task
            can name this endpoint in its 409.
        path: The path requests of that media go to.
        router: Builds the module's routes over a context.
    """

    name: str
    media: str | None
    path: str
    router: Callable[[ServingContext], APIRouter]
