"""``POST /predict_objects``: the condition of every detected object in one image (models whose task takes ``image``
media).

``multipart/form-data`` with a ``file`` part (JPEG/PNG/BMP/WebP by content, whatever the name) and a
``detections`` field, or ``application/json`` ``{"path": ..., "detections": [...]}`` naming an image under the
allowed root. ``detections`` is the stage-1 detector's output: a JSON list (at most ``max_detections``) of
``{"label": <object type>, "box": [x1, y1, x2, y2], "normalized": true|false, "score": ...}``. Every detection is
classified in turn, with the others as its spatial context, in one forward pass through the model's batcher.
Answers ``{"objects": [{"index", "label", "box", "score", "condition", "object_type", "condition_kind",
"confidence", "scores"}, ...], "image": {"width", "height"}, "model_version", "stage1", "detector",
"latency_ms"}``: ``stage1`` is ``"request"`` (the request's detections) or ``"detector"`` (the server's detector found
them; ``detector`` then names its version and each object's ``score`` is the detection score).

The image is decoded once and resized to the model's size once per request (not once per object); each object's
input is that resized image with the object outlined, plus a close-up cut from the full-resolution image.
Detections come from the request; a server-side detector stage plugs in as the ``detect`` hook of
:func:`make_endpoint` (``create_app(endpoints=(clips.ENDPOINT, objects.make_endpoint(detect)))``): it is awaited
for a request that sends no detections, with the decoded image, and returns stage-1 detections (validated objects
with ``index``, ``label``, ``object_type``, normalised ``box`` and ``score``; an empty list is an answer with no
objects). It raises :class:`~opsvlm.serving.errors.ServingError` for its own failures (e.g. 503 when the detector
is unavailable), and may return a :class:`Detected` to name the detector version in the answer. The Serve app wires
its ``Detector`` deployment in here when ``detector.ref`` is configured (``serve_app/app.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from opsvlm.serving.endpoint import Endpoint, ServingContext
from opsvlm.serving.errors import ServingError
from opsvlm.serving.media import decode_image
from opsvlm.serving.predict import Answers, SpecChanged, WorkItem, WrongTask
from opsvlm.serving.requests import ObjectsRequest, parse_objects_request
from opsvlm.serving.schemas import DOC_ERRORS, ObjectsResponse, PathObjects, request_body_doc
from opsvlm.tasks.inspection import ObjectInput, mark_target, render_closeup, resize_image
from opsvlm.tasks.inspection.data.yolo import DetectionsJsonError, parse_detections
from opsvlm.video.sampling import SamplingSpec

__all__ = [
    "ENDPOINT",
    "MEDIA",
    "Detect",
    "Detected",
    "make_endpoint",
    "parse_object_detections",
    "render_object_inputs",
    "request_detections",
]

MEDIA = "image"
Detect = Callable[[np.ndarray], Awaitable[list[Any]]]


class Detected(list):
    """What a detector hook may return: its detections (a list) and the detector that found them.

    Args:
        detections: Validated stage-1 detections.
        detector: ``{"name", "version", "alias", "run_id"}`` of the detector, for the answer.
    """

    def __init__(self, detections: Sequence[Any] = (), detector: dict[str, Any] | None = None):
        super().__init__(detections)
        self.detector = detector


def render_object_inputs(image: np.ndarray, detections: Sequence[Any], spec: SamplingSpec) -> tuple[Any, ...]:
    """The model input of every detected object, the image resized once for all of them. Blocking (CPU).

    Equal to the image task's ``object_input`` per object (the rendering training and evaluation use), without
    resizing the full image again for each object.

    Args:
        image: uint8[H, W, 3] the decoded image.
        detections: Validated stage-1 detections (``box`` normalised, ``object_type``, ``index``).
        spec: The model's sampling spec.

    Returns:
        One input per detection, in order.
    """
    resized = resize_image(image, spec)
    return tuple(
        ObjectInput(
            mark_target(resized, target.box),
            tuple(target.box),
            target.object_type,
            tuple((other.object_type, tuple(other.box)) for other in detections if other.index != target.index),
            render_closeup(image, target.box, spec),
        )
        for target in detections
    )


def parse_object_detections(raw: Any, width: int, height: int, name: str, max_detections: int) -> list[Any]:
    """Validate stage-1 detections for one decoded image (:func:`tasks.inspection.data.yolo.parse_detections` rules).

    Args:
        raw: A JSON list of ``{"label", "box", "normalized", "score"}`` (or its text).
        width: The image's width in pixels (pixel boxes are normalised by it).
        height: Its height.
        name: The image's name, for messages.
        max_detections: Most detections accepted.

    Returns:
        :class:`opsvlm.tasks.inspection.data.yolo.StageOneDetection` objects, boxes normalised to [0, 1].

    Raises:
        ServingError: 422 naming the field for missing, malformed or out-of-image detections; 413 for too many.
    """
    if raw is None:
        raise ServingError(422, "missing_detections", "send 'detections': the stage-1 objects to classify")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (RecursionError, ValueError) as exc:
            raise ServingError(422, "invalid_detections", f"detections: not valid JSON: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise ServingError(422, "invalid_detections", "detections: must be a non-empty list of objects")
    if len(raw) > max_detections:
        raise ServingError(413, "too_many_detections", f"detections: {len(raw)} objects; the limit is {max_detections}")
    try:
        (parsed,) = parse_detections({"image": name, "width": width, "height": height, "detections": raw}, "request")
    except DetectionsJsonError as exc:
        raise ServingError(422, "invalid_detections", str(exc)) from None
    return list(parsed.detections)


async def request_detections(
    request: ObjectsRequest, image: np.ndarray, context: ServingContext, detect: Detect | None = None
) -> list[Any]:
    """The detections to classify: the request's, validated against the decoded image; without any, the
    detector's (when there is one), as a :class:`Detected` (``detector`` set when the hook named one)."""
    if request.detections is None and detect is not None:
        answer = await detect(image)
        found = list(answer)
        if len(found) > context.limits.max_detections:  # classify the detector's most confident objects
            found = sorted(found, key=lambda d: -(d.score or 0.0))[: context.limits.max_detections]
        return Detected(found, getattr(answer, "detector", None) or {})
    height, width = image.shape[:2]
    return parse_object_detections(request.detections, width, height, request.name, context.limits.max_detections)


def make_endpoint(detect: Detect | None = None) -> Endpoint:
    """The ``/predict_objects`` endpoint; ``detect`` (optional) finds the objects of requests that send none."""
    return Endpoint(name="objects", media=MEDIA, path="/predict_objects", router=lambda c: _router(c, detect))


def _router(context: ServingContext, detect: Detect | None) -> APIRouter:
    """The object routes over ``context``."""
    routes = APIRouter()
    limits, pool, backend = context.limits, context.pool, context.backend

    @routes.post(
        "/predict_objects",
        response_model=ObjectsResponse,
        responses=DOC_ERRORS,
        openapi_extra=request_body_doc(
            PathObjects.model_json_schema(),
            {
                "file": {"type": "string", "format": "binary", "description": "JPEG/PNG/BMP/WebP image"},
                "detections": {
                    "type": "string",
                    "description": 'JSON list of {"label": <object type>, "box": [x1, y1, x2, y2], '
                    '"normalized": true|false, "score": ..}',
                },
            },
            ["file", "detections"],
        ),
    )
    async def predict_objects(request: Request) -> JSONResponse:
        """Classify the condition of every detected object in one image."""
        started = time.perf_counter()
        with context.admit():
            deadline = context.deadline()
            parsed = await deadline.run(parse_objects_request(request, limits, pool), reading=True)
            image = await deadline.run(pool.run(decode_image, parsed.data, parsed.name, limits))
            detections = await deadline.run(request_detections(parsed, image, context, detect))
            stage1 = {"stage1": "request", "detector": None}
            if isinstance(detections, Detected):
                stage1 = {"stage1": "detector", "detector": detections.detector or None}
            if not detections:  # a detector that found nothing: an answer without objects
                body = {
                    "objects": [],
                    "image": {"width": int(image.shape[1]), "height": int(image.shape[0])},
                    "model_version": None,
                    **stage1,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                }
                return JSONResponse(body)
            spec = await backend.sampling_spec()
            for _ in range(2):
                inputs = await deadline.run(pool.run(render_object_inputs, image, detections, spec))
                (outcome,) = await deadline.run(backend.predict([WorkItem(MEDIA, inputs, spec)], deadline))
                if not isinstance(outcome, SpecChanged):
                    break
                spec = outcome.spec
                backend.remember_spec(spec)
            else:
                raise ServingError(
                    503,
                    "model_changing",
                    "the model's sampling spec changed during the request; retry",
                    limits.retry_after_s,
                )
        if isinstance(outcome, WrongTask):
            raise context.wrong_task(outcome, "images")
        if isinstance(outcome, ServingError):
            raise outcome
        assert isinstance(outcome, Answers)
        objects = [
            {"index": d.index, "label": d.label, "box": list(d.box), "score": d.score, **answer}
            for d, answer in zip(detections, outcome.answers, strict=True)
        ]
        body = {
            "objects": objects,
            "image": {"width": int(image.shape[1]), "height": int(image.shape[0])},
            "model_version": outcome.model_version,
            **stage1,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        return JSONResponse(body)

    return routes


ENDPOINT = make_endpoint()
