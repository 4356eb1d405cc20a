"""The HTTP API's request and response schemas (pydantic), for validation and the OpenAPI page.

Responses are built as plain dicts by the endpoints; these models document them (``response_model``) and validate
the JSON request bodies (``extra="forbid"``: an unknown field is a 422 naming it).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DOC_ERRORS",
    "BatchItem",
    "BatchResponse",
    "ClipSpan",
    "ErrorResponse",
    "HealthResponse",
    "ImageSize",
    "ObjectPrediction",
    "ObjectsResponse",
    "PathBatch",
    "PathClip",
    "PathObjects",
    "PredictionResponse",
    "UploadClip",
    "inline_schema",
    "request_body_doc",
]


class ClipSpan(BaseModel):
    start_s: float = Field(description="Clip start in video seconds")
    end_s: float = Field(description="Clip end in video seconds")


class PredictionResponse(BaseModel):
    """A validated prediction: labels from the label set, 0 <= start_s < end_s <= clip length."""

    operation: str
    start_s: float = Field(description="Start of the operation, seconds from the clip start")
    end_s: float = Field(description="End of the operation, seconds from the clip start")
    next_operation: str
    confidence: float
    scores: dict[str, float]
    next_scores: dict[str, float]
    clip: ClipSpan
    model_version: str
    latency_ms: float


class ErrorResponse(BaseModel):
    error: str = Field(description="Machine-readable error code")
    detail: str = Field(description="What is wrong")


class BatchItem(BaseModel):
    index: int
    status: int
    prediction: PredictionResponse | None = None
    error: str | None = None
    detail: str | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem]
    latency_ms: float


class PathClip(BaseModel):
    """A clip of a file under the server's allowed root."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="Relative to the allowed root, or absolute inside it")
    start_s: float | None = Field(None, description="Clip start, video seconds (default 0)")
    end_s: float | None = Field(None, description="Clip end, video seconds (default: end of the video)")


class PathBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clips: list[PathClip]


class UploadClip(BaseModel):
    """A clip of one uploaded file in a multipart batch."""

    model_config = ConfigDict(extra="forbid")
    file: int = Field(description="Index of the file among the 'files' parts")
    start_s: float | None = None
    end_s: float | None = None


class ObjectPrediction(BaseModel):
    """The condition of one detected object."""

    index: int = Field(description="Position of the detection in the request")
    label: str = Field(description="The detection's label as sent")
    box: list[float] = Field(description="Normalised [x1, y1, x2, y2]")
    score: float | None = Field(None, description="The detector's score, as sent")
    condition: str = Field(description="One of the model's condition classes")
    object_type: str
    condition_kind: str = Field(description="normal, blocked or damaged")
    confidence: float
    scores: dict[str, float]


class ImageSize(BaseModel):
    width: int
    height: int


class ObjectsResponse(BaseModel):
    objects: list[ObjectPrediction]
    image: ImageSize
    model_version: str | None = Field(description="None when a detector found no object (the model was not asked)")
    stage1: Literal["request", "detector"] = Field(
        description="Where the objects came from: the request's detections, or the server's detector"
    )
    detector: dict[str, Any] | None = Field(
        None, description='The detector that found the objects ({"name", "version", "alias", "run_id"}), if it ran'
    )
    latency_ms: float


class PathObjects(BaseModel):
    """An image under the server's allowed root and its stage-1 detections."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="Relative to the allowed root, or absolute inside it")
    detections: list[dict[str, Any]] | None = Field(
        None,
        description='[{"label", "box", "normalized", "score"}, ...]; leave out to have the server\'s detector '
        "find the objects (when one is configured)",
    )


class HealthResponse(BaseModel):
    status: str = Field(description="ok")
    model_version: str


DOC_ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed JSON or multipart; JSON nested too deep or with an oversized integer (names the field)",
        401: "Missing or wrong API key (only when the server requires one)",
        403: "Path outside the allowed root, or path input disabled",
        404: "No such file under the allowed root",
        408: "The request body did not arrive within the request deadline",
        409: "The served model answers another kind of input (use the endpoint named in the detail)",
        413: "Body, upload, clip duration, image size, batch or detections over the limit",
        415: "Not an accepted content type, extension or image format",
        422: "Missing/invalid fields or window, or media that does not decode",
        503: "Overloaded, past the request deadline, or the model is unavailable (Retry-After says when to retry)",
        504: "Decoding missed its deadline",
    }.items()
}


def request_body_doc(json_schema: dict, form_properties: dict, required: list[str]) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": form_properties, "required": required}
                },
                "application/json": {"schema": json_schema},
            },
        }
    }


def inline_schema(schema: dict) -> dict:
    """A pydantic JSON schema with its ``$defs`` inlined (OpenAPI request bodies here have no components)."""
    defs = schema.pop("$defs", {})

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(dict(defs[node["$ref"].rsplit("/", 1)[-1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)
