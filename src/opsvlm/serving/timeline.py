"""``POST /timeline``: the operation timeline of a whole recording (models whose task takes ``video`` media and whose
answers make a timeline).

``multipart/form-data`` with a ``file`` part (MP4/AVI/MOV/MKV), or ``application/json`` ``{"path": ...}`` naming a
video under the allowed root. Answers the timeline JSON of the batch job (``opsvlm-timeline/1``: segments with
confidence, the anticipated next operation and the box at every second, per-box figures, the session summary)
computed by the same code, :func:`opsvlm.timeline.timeline_of_video`, with the batch job's defaults: windows of the
clip length the model was trained on (5 s when unknown), stride half a window, Viterbi decoding with the grammar
learned from the model's training split (the procedure prior when that is not readable here). The answer adds
``model_version`` and ``latency_ms``; ``media`` is the client's file name or requested path, never a server path.

How it runs: the Ingress decodes the video once, in a decoder process with a deadline per window
(``limits.decode_deadline_s``), in one thread of the bounded work pool; each batch of windows goes to the model
through the backend as clip work items, so they are batched with concurrent ``/predict`` work by the same batcher,
and the model's version, sampling spec and task are checked on every batch exactly as for ``/predict``. What the
timeline needs from the model (task, window length, grammar) comes from the Predictor once per model version
(:func:`model_timeline_support`, :meth:`~opsvlm.serving.endpoint.Backend.timeline_support`). With
``separate_decoder`` the timeline still decodes in the Ingress (its decoder streams windows while the model works).

Limits (:class:`~opsvlm.serving.limits.ServingLimits`), defaults in brackets:

* ``max_timeline_duration_s`` [1800 s, 30 minutes]: longer videos get 413 ``duration_too_long`` (found by one
  probe of the decoder before any window is decoded). ``/predict``'s ``max_duration_s`` is for clips.
* ``max_timeline_upload_bytes`` [512 MiB]: larger uploads get 413 before they are read in full.
* ``timeline_deadline_s`` [900 s]: past it the work stops at its next batch of windows: 503 with ``Retry-After``
  (408 when the upload was still arriving).
* ``max_inflight_timelines`` [2, at most ``work_threads - 1``]: more concurrent timelines get 503 at once; they also
  count against ``max_inflight_requests``.

Errors as for ``/predict``: 415 for a file that is not named as a video (an image included) or a wrong content type;
422 for media that does not decode (random bytes, an empty or truncated file, no frames), 404/403 for paths; 504
for a decoder that hangs; 409 ``wrong_task`` when the served model takes other media (the detail names its
endpoint, e.g. ``/predict_objects``) and 409 ``no_timeline`` when the model's answers do not make a timeline; 503
when the model is unavailable or changed spec twice during the request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from opsvlm.serving.endpoint import Endpoint, ServingContext
from opsvlm.serving.errors import ServingError, overloaded
from opsvlm.serving.limits import ServingLimits
from opsvlm.serving.media import REJECTION_STATUS, Media
from opsvlm.serving.predict import Answers, SpecChanged, WorkItem, WrongTask
from opsvlm.serving.requests import (
    ClipJob,
    ParsedRequest,
    media_type,
    read_form,
    read_json,
    resolve_allowed_path,
    save_upload,
    unsupported,
    validated,
)
from opsvlm.serving.schemas import DOC_ERRORS, request_body_doc
from opsvlm.serving.work import Deadline
from opsvlm.video.sampling import SamplingSpec

__all__ = [
    "ENDPOINT",
    "MEDIA",
    "WINDOWS_PER_CALL",
    "PathTimeline",
    "TimelineSupport",
    "model_timeline_support",
    "router",
]

MEDIA = "video"
WINDOWS_PER_CALL = 8
"""Windows the timeline hands to the model at a time (each is its own work item, batched by the Predictor)."""

# Errors of opsvlm.timeline (TimelineError.reason) that are not decoder rejections.
_TIMELINE_STATUS = {"duration_too_long": 413, "no_windows": 422, "probe_failed": 422}
_ABSOLUTE_PATH = re.compile(r"(?<![\w:])/(?:[\w.@+-]+/)*[\w.@+-]+")


class PathTimeline(BaseModel):
    """A video under the server's allowed root, annotated whole."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="Relative to the allowed root, or absolute inside it")


# --- the model side --------------------------------------------------------------------------------------------------


def _scrub(text: str) -> str:
    return _ABSOLUTE_PATH.sub("<path>", text)


def model_timeline_support(model: Any, show_paths: bool = False) -> dict[str, Any]:
    """What a timeline needs from one loaded model version, as the batch job derives it. Blocking (reads files).

    Args:
        model: A :class:`opsvlm.serving.watcher.LoadedModel`.
        show_paths: Keep filesystem paths in the grammar's ``source``.

    Returns:
        ``{"model_version", "task", "media", "timeline": bool}`` and, when the task's answers make a timeline,
        ``"window_s"`` (the clip length the model was trained on, :func:`opsvlm.timeline.model_window_s`) and
        ``"grammar"`` (an :class:`opsvlm.tasks.operations.timeline.Grammar`, :func:`opsvlm.timeline.load_grammar`
        with the model's checkpoint: its training split, else the procedure prior).
    """
    from opsvlm.tasks.operations.timeline import timeline_for

    task = model.predictor.task
    support: dict[str, Any] = {"model_version": model.version, "task": task.name, "media": task.media}
    try:
        timeline_for(task.name)
    except ValueError:
        return {**support, "timeline": False}
    from opsvlm.timeline import load_grammar, model_window_s

    grammar = load_grammar("", model.checkpoint_dir)
    if not show_paths:
        grammar.source = _scrub(grammar.source)
    return {**support, "timeline": True, "window_s": model_window_s(model.checkpoint_dir), "grammar": grammar}


class TimelineSupport:
    """:func:`model_timeline_support` computed once per model version (thread-safe; the model side of a backend).

    Args:
        current: Returns the current :class:`~opsvlm.serving.watcher.LoadedModel`.
    """

    def __init__(self, current: Any):
        self._current = current
        self._lock = threading.Lock()
        self._cached: dict[tuple[str, bool], dict[str, Any]] = {}

    def get(self, show_paths: bool = False) -> dict[str, Any]:
        model = self._current()
        key = (model.checkpoint_dir, show_paths)
        with self._lock:
            if key not in self._cached:
                self._cached = {k: v for k, v in self._cached.items() if k[0] == model.checkpoint_dir}
                self._cached[key] = model_timeline_support(model, show_paths)
            return self._cached[key]


# --- the request side ------------------------------------------------------------------------------------------------


class _Restart(Exception):
    """The model changed under the timeline (another spec or version): annotate again from the start."""

    def __init__(self, spec: SamplingSpec | None = None):
        super().__init__("the model changed during the timeline")
        self.spec = spec


class _ServedPredictor:
    """The part of :class:`opsvlm.inference.Predictor` that :func:`opsvlm.timeline.timeline_of_video` uses
    (``spec``, ``task``, ``predict``), answered by the backend from a work-pool thread.

    Each window is one clip work item, sent from the event loop (``loop``) as ``/predict`` sends its clips.
    """

    def __init__(
        self,
        task: Any,
        spec: SamplingSpec,
        context: ServingContext,
        deadline: Deadline,
        loop: asyncio.AbstractEventLoop,
        stop: threading.Event,
    ):
        self.task = task
        self.spec = spec
        self._context = context
        self._deadline = deadline
        self._loop = loop
        self._stop = stop
        self.versions: set[str] = set()

    async def _predict(self, inputs: Sequence[Any]) -> list[dict[str, Any]]:
        items = [WorkItem(MEDIA, (example,), self.spec) for example in inputs]
        outcomes = await self._context.backend.predict(items, self._deadline)
        answers = []
        for outcome in outcomes:
            if isinstance(outcome, Answers):
                self.versions.add(outcome.model_version)
                answers.append(outcome.answers[0])
            elif isinstance(outcome, SpecChanged):
                raise _Restart(outcome.spec)
            elif isinstance(outcome, WrongTask):
                raise self._context.wrong_task(outcome, "videos")
            else:
                raise outcome
        if len(self.versions) > 1:
            raise _Restart()
        return answers

    def predict(self, inputs: Sequence[Any]) -> list[dict[str, Any]]:
        """One answer dict per window input, in order. Blocking: call from a worker thread, never the loop."""
        if self._stop.is_set() or self._deadline.remaining() <= 0:
            raise self._deadline.error()
        future = asyncio.run_coroutine_threadsafe(self._predict(inputs), self._loop)
        try:
            return future.result(max(self._deadline.remaining(), 0.0) + 1.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise self._deadline.error() from None


def _timeline_error(exc: Exception, media: Media) -> ServingError:
    """An :class:`opsvlm.timeline.TimelineError` as the HTTP error, in the client's words (no server paths)."""
    reason = getattr(exc, "reason", "timeline_failed")
    detail = str(exc).replace(media.path, media.name)
    if not detail.startswith(media.name):
        detail = f"{media.name}: {detail}"
    return ServingError(REJECTION_STATUS.get(reason, _TIMELINE_STATUS.get(reason, 422)), reason, detail)


def _annotate(
    predictor: _ServedPredictor,
    media: Media,
    grammar: Any,
    window_s: float,
    limits: ServingLimits,
) -> dict[str, Any]:
    """The batch job's single-video path on ``media``. Blocking (decodes and waits for the model)."""
    from opsvlm.timeline import TimelineError, timeline_of_video

    try:
        return timeline_of_video(
            predictor,
            media.path,
            grammar,
            name=PurePosixPath(media.name).stem or "upload",
            window_s=window_s,
            batch_size=WINDOWS_PER_CALL,
            deadline_s=limits.decode_deadline_s,
            max_duration_s=limits.max_timeline_duration_s,
        )
    except TimelineError as exc:
        raise _timeline_error(exc, media) from None


def _client_words(body: dict[str, Any], media: Media) -> dict[str, Any]:
    """The timeline with the server's file path replaced by the client's name (window rejections quote it)."""
    body["media"] = media.name
    text = json.dumps(body)
    server = json.dumps(media.path)[1:-1]
    if server in text:
        body = json.loads(text.replace(server, json.dumps(media.name)[1:-1]))
    return body


async def parse_timeline(request: Request, limits: ServingLimits, pool: Any) -> ParsedRequest:
    """``POST /timeline`` -> one video (an upload's temporary copy, or a path under the allowed root).

    Raises:
        ServingError: as ``/predict``'s parsing (415 not a video name or type, 413 over the upload cap, 422 empty
            upload or unknown fields, 403/404 paths).
    """
    parsed = ParsedRequest([])
    try:
        kind = media_type(request)
        if kind == "application/json":
            body = validated(PathTimeline, await read_json(request, limits, pool))
            path = resolve_allowed_path(limits.allowed_root, body.path)
            parsed.jobs.append(ClipJob(Media(str(path), body.path)))
        elif kind == "multipart/form-data":
            form = await read_form(request, limits, max_files=1)
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ServingError(422, "missing_file", "multipart request needs a 'file' part with the video")
            extra = sorted(k for k in form if k != "file")
            if extra:
                raise ServingError(422, "invalid_request", f"unknown form field(s) {extra}: /timeline takes 'file'")
            media = await save_upload(upload, limits, pool, [limits.max_upload_bytes], parsed)
            parsed.jobs.append(ClipJob(media))
        else:
            raise unsupported(kind, "send multipart/form-data with a 'file' part, or application/json naming a path")
    except BaseException:
        parsed.cleanup()
        raise
    return parsed


class _Admission:
    """At most ``limit`` timelines at work at once; more get 503 at once."""

    def __init__(self, limit: int, retry_after_s: float):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.inflight = 0

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        if self.inflight >= self.limit:
            raise overloaded(
                f"{self.inflight} timelines are in progress (the limit is {self.limit}); retry later",
                self.retry_after_s,
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1


def router(context: ServingContext) -> APIRouter:
    """The timeline route over ``context``."""
    routes = APIRouter()
    limits, pool = context.limits, context.pool
    # The request's upload cap is the timeline's (the rest of the limits are shared with /predict).
    request_limits = dataclasses.replace(limits, max_upload_bytes=limits.max_timeline_upload_bytes)
    timelines = _Admission(min(limits.max_inflight_timelines, max(1, limits.work_threads - 1)), limits.retry_after_s)

    @routes.post(
        "/timeline",
        responses=DOC_ERRORS,
        openapi_extra=request_body_doc(
            PathTimeline.model_json_schema(),
            {"file": {"type": "string", "format": "binary", "description": "MP4/AVI/MOV/MKV video"}},
            ["file"],
        ),
    )
    async def timeline(request: Request) -> JSONResponse:
        """The operation timeline of a whole video (the batch annotation job's JSON for one recording)."""
        started = time.perf_counter()
        with context.admit(), timelines.admit():
            deadline = Deadline(limits.timeline_deadline_s, limits.retry_after_s)
            parsed = await deadline.run(parse_timeline(request, request_limits, pool), reading=True)
            try:
                body, version = await deadline.run(_run(context, parsed.jobs[0].media, deadline))
            finally:
                parsed.cleanup()
        body = _client_words(body, parsed.jobs[0].media)
        body["model_version"] = version
        body["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return JSONResponse(body)

    return routes


async def _run(context: ServingContext, media: Media, deadline: Deadline) -> tuple[dict[str, Any], str]:
    """Annotate ``media`` with the current model; once more from the start if the model changed meanwhile."""
    from opsvlm.tasks.base import get_task

    backend = context.backend
    loop = asyncio.get_running_loop()
    spec = await backend.sampling_spec()
    for _ in range(2):
        try:
            support = await backend.timeline_support(context.show_paths)
        except ServingError:
            raise
        except Exception as exc:
            raise ServingError(
                503, "model_unavailable", f"the model is not reachable: {exc!r}", context.limits.retry_after_s
            ) from None
        if support["media"] != MEDIA:
            raise context.wrong_task(WrongTask(support["media"]), "videos")
        if not support["timeline"]:
            raise ServingError(409, "no_timeline", "the served model's answers do not make an operation timeline")
        stop = threading.Event()
        predictor = _ServedPredictor(get_task(support["task"]), spec, context, deadline, loop, stop)
        try:
            body = await context.pool.run(
                _annotate, predictor, media, support["grammar"], support["window_s"], context.limits
            )
        except _Restart as restart:
            if restart.spec is not None:
                spec = restart.spec
                backend.remember_spec(spec)
            continue
        finally:
            stop.set()  # a request that gave up (deadline, client gone) stops its thread at the next batch
        (version,) = predictor.versions
        return body, version
    raise ServingError(
        503, "model_changing", "the model changed twice during the timeline; retry", context.limits.retry_after_s
    )


ENDPOINT = Endpoint(name="timeline", media=MEDIA, path="/timeline", router=router)
