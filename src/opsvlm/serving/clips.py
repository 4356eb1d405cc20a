"""``POST /predict`` and ``POST /batch_predict``: clips of videos (models whose task takes ``video`` media).

* ``/predict``: ``multipart/form-data`` with a ``file`` part (MP4/AVI/MOV/MKV) and optional ``start_s`` / ``end_s``
  fields, or ``application/json`` ``{"path": ..., "start_s": ..., "end_s": ...}`` naming a file under the allowed
  root. The clip is the whole video unless a window is given. Answers ``{operation, start_s, end_s,
  next_operation, confidence, scores, next_scores, clip, model_version, latency_ms}``; ``start_s``/``end_s`` are
  inside the clip (0 <= start_s < end_s <= clip length), ``clip`` holds the window in video seconds.
* ``/batch_predict``: JSON ``{"clips": [{"path", "start_s", "end_s"}, ...]}`` or multipart with ``files`` parts and
  an optional ``clips`` field (JSON list of ``{"file": <index>, "start_s", "end_s"}``; default one whole-video clip
  per file). Answers ``{"results": [...], "latency_ms"}`` with one entry per clip, in order: ``{"index", "status":
  200, "prediction": {...}}`` or ``{"index", "status": 4xx/5xx, "error", "detail"}``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from opsvlm.serving.endpoint import Endpoint, ServingContext
from opsvlm.serving.errors import ServingError
from opsvlm.serving.media import DecodedClip
from opsvlm.serving.predict import Answers, SpecChanged, WorkItem, WrongTask
from opsvlm.serving.requests import ClipJob, parse_batch, parse_predict
from opsvlm.serving.schemas import (
    DOC_ERRORS,
    BatchResponse,
    PathBatch,
    PathClip,
    PredictionResponse,
    inline_schema,
    request_body_doc,
)
from opsvlm.serving.work import Deadline
from opsvlm.video.clip import ClipInput
from opsvlm.video.sampling import SamplingSpec

__all__ = ["ENDPOINT", "MEDIA", "prediction_body", "router", "run_jobs"]

MEDIA = "video"


def _clip_input(clip: DecodedClip) -> ClipInput:
    """What every video task takes for one clip."""
    return ClipInput(clip.frames, [float(t) for t in clip.frame_times_s], clip.clip_length_s)


async def run_jobs(
    context: ServingContext, jobs: Sequence[ClipJob], deadline: Deadline
) -> list[tuple[dict[str, Any], str, DecodedClip] | ServingError]:
    """Decode (one pass per video) and predict every clip; one result per job: ``(answer, model version, clip)`` or
    the clip's error.

    If the model's sampling spec changed between decoding and prediction (an alias swap), the affected clips are
    decoded again with the new spec, once.
    """
    backend = context.backend
    results: list[Any] = [job.error for job in jobs]
    spec: SamplingSpec = await backend.sampling_spec()
    for _ in range(2):
        pending = [i for i, result in enumerate(results) if result is None]
        if not pending:
            break
        groups: dict[str, list[int]] = {}
        for i in pending:
            groups.setdefault(jobs[i].media.path, []).append(i)
        decoded = await asyncio.gather(
            *(
                backend.decode(jobs[idx[0]].media, [jobs[i].window for i in idx], spec, context.pool)
                for idx in groups.values()
            ),
            return_exceptions=True,
        )
        clips, owners = [], []
        for indices, outputs in zip(groups.values(), decoded, strict=True):
            if isinstance(outputs, BaseException):
                if not isinstance(outputs, ServingError):
                    raise outputs
                outputs = [outputs] * len(indices)
            for i, output in zip(indices, outputs, strict=True):
                if isinstance(output, ServingError):
                    results[i] = output
                else:
                    clips.append(output)
                    owners.append(i)
        if not clips:
            break
        items = [WorkItem(MEDIA, (_clip_input(clip),), clip.spec) for clip in clips]
        outcomes = await backend.predict(items, deadline)
        for i, clip, outcome in zip(owners, clips, outcomes, strict=True):
            if isinstance(outcome, Answers):
                results[i] = (outcome.answers[0], outcome.model_version, clip)
            elif isinstance(outcome, SpecChanged):
                spec = outcome.spec
                backend.remember_spec(spec)
            elif isinstance(outcome, WrongTask):
                results[i] = context.wrong_task(outcome, "video clips")
            else:
                results[i] = outcome
    # Still pending after the retry: replicas disagreed on the model while a new version rolled out.
    changing = ServingError(
        503,
        "model_changing",
        "the model's sampling spec changed during the request; retry",
        context.limits.retry_after_s,
    )
    return [r if r is not None else changing for r in results]


def prediction_body(answer: dict[str, Any], version: str, clip: DecodedClip, latency_ms: float) -> dict[str, Any]:
    """The response body of one prediction: the task's answer (its ``to_dict()``) with the clip, the model version
    and the latency (see :class:`~opsvlm.serving.schemas.PredictionResponse`)."""
    return {
        **answer,
        "clip": {"start_s": clip.start_s, "end_s": clip.end_s},
        "model_version": version,
        "latency_ms": round(latency_ms, 3),
    }


def _error_response(error: ServingError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status, headers=error.headers())


_FORM_WINDOW = {
    "start_s": {"type": "number", "description": "Clip start, video seconds (default 0)"},
    "end_s": {"type": "number", "description": "Clip end, video seconds (default: end of the video)"},
}


def router(context: ServingContext) -> APIRouter:
    """The clip routes over ``context``."""
    routes = APIRouter()
    limits, pool = context.limits, context.pool

    @routes.post(
        "/predict",
        response_model=PredictionResponse,
        responses=DOC_ERRORS,
        openapi_extra=request_body_doc(
            PathClip.model_json_schema(),
            {"file": {"type": "string", "format": "binary", "description": "MP4/AVI/MOV/MKV video"}, **_FORM_WINDOW},
            ["file"],
        ),
    )
    async def predict(request: Request) -> JSONResponse:
        """Predict one clip of an uploaded video, or of a file under the allowed root."""
        started = time.perf_counter()
        with context.admit():
            deadline = context.deadline()
            parsed = await deadline.run(parse_predict(request, limits, pool), reading=True)
            try:
                (result,) = await deadline.run(run_jobs(context, parsed.jobs, deadline))
            finally:
                parsed.cleanup()
        if isinstance(result, ServingError):
            return _error_response(result)
        answer, version, clip = result
        return JSONResponse(prediction_body(answer, version, clip, (time.perf_counter() - started) * 1000))

    @routes.post(
        "/batch_predict",
        response_model=BatchResponse,
        responses=DOC_ERRORS,
        openapi_extra=request_body_doc(
            inline_schema(PathBatch.model_json_schema()),
            {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "clips": {
                    "type": "string",
                    "description": 'JSON list of {"file": <index>, "start_s": .., "end_s": ..}; '
                    "default: each whole file",
                },
            },
            ["files"],
        ),
    )
    async def batch_predict(request: Request) -> JSONResponse:
        """Predict several clips in one request: one result or one error per clip, in order."""
        started = time.perf_counter()
        with context.admit():
            deadline = context.deadline()
            parsed = await deadline.run(parse_batch(request, limits, pool), reading=True)
            try:
                results = await deadline.run(run_jobs(context, parsed.jobs, deadline))
            finally:
                parsed.cleanup()
        latency_ms = (time.perf_counter() - started) * 1000
        items = []
        for index, result in enumerate(results):
            if isinstance(result, ServingError):
                items.append({"index": index, "status": result.status, **result.to_dict()})
            else:
                answer, version, clip = result
                items.append(
                    {"index": index, "status": 200, "prediction": prediction_body(answer, version, clip, latency_ms)}
                )
        return JSONResponse({"results": items, "latency_ms": round(latency_ms, 3)})

    return routes


ENDPOINT = Endpoint(name="clips", media=MEDIA, path="/predict", router=router)
