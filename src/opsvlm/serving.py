"""Serving without Ray: request validation, uploads, decoding under limits, the model watcher, the HTTP API.

Ray Serve (``serve_app/app.py``) and the benchmark's plain-FastAPI baseline run the same code: :func:`create_app`
builds the FastAPI app around a :class:`Backend` that decodes and predicts. Serve's backend sends the work to
deployments; :class:`LocalBackend` does it in-process.

API (``create_app``):

* ``GET /health``: ``{"status": "ok", "model_version": ...}``; 503 when the model cannot be reached.
* ``GET /status``: model name/version/run, task, sampling spec, label set, limits, replicas (where the backend
  knows).
* ``GET /docs``: OpenAPI UI (``/openapi.json`` for the schema).
* ``POST /predict``: ``multipart/form-data`` with a ``file`` part (MP4/AVI/MOV/MKV) and optional ``start_s`` /
  ``end_s`` fields, or ``application/json`` ``{"path": ..., "start_s": ..., "end_s": ...}`` naming a file under the
  configured allowed root. The clip is the whole video unless a window is given. Answers
  ``{operation, start_s, end_s, next_operation, confidence, scores, next_scores, clip, model_version, latency_ms}``;
  ``start_s``/``end_s`` are inside the clip (0 <= start_s < end_s <= clip length, as the model answers),
  ``clip`` holds the window in video seconds.
* ``POST /batch_predict``: JSON ``{"clips": [{"path", "start_s", "end_s"}, ...]}`` or multipart with ``files``
  parts and an optional ``clips`` field (JSON list of ``{"file": <index>, "start_s", "end_s"}``; default one
  whole-video clip per file). Answers ``{"results": [...], "latency_ms"}`` with one entry per clip, in order:
  ``{"index", "status": 200, "prediction": {...}}`` or ``{"index", "status": 4xx/5xx, "error", "detail"}``.

* ``POST /predict_objects`` (inspection models): ``multipart/form-data`` with a ``file`` part (JPEG/PNG/BMP/WebP
  image) and a ``detections`` field, or ``application/json`` ``{"path": ..., "detections": [...]}`` naming an image
  under the allowed root. ``detections`` is the stage-1 detector's output: a JSON list of
  ``{"label": <object type>, "box": [x1, y1, x2, y2], "normalized": true|false, "score": ...}``. Every detection is
  classified in turn, with the others as its spatial context; answers ``{"objects": [{"index", "label", "box",
  "score", "condition", "object_type", "condition_kind", "confidence", "scores"}, ...], "image": {"width",
  "height"}, "model_version", "latency_ms"}``. A model of the other task answers 409 on each task's endpoint.

Bad input never takes the server down: every problem becomes a :class:`ServingError` (status code, a short
machine-readable ``error`` code and a ``detail`` message naming the problem). Status codes: 400 malformed request
(bad JSON, bad multipart), 403 a path outside the allowed root (or path input disabled), 404 no such file,
413 over the upload size, clip duration or batch size limits, 415 not a video content type or extension,
422 missing/invalid fields, an invalid window, a window outside the video, and media that does not decode
(non-video bytes, empty, corrupt, truncated, no frames), 504 a decode that missed its deadline (a hung decoder is
killed), 500/503 server-side failures.

Decoding uses :func:`opsvlm.video.decode.decode_session_with_deadline` (a separate decoder process, so a hang can be
killed) with the model's own :class:`SamplingSpec`, exactly as training sampled frames. A clip without an end needs
the video's duration first; the decoder has no probe call, so it is asked for a window far beyond any video: the
rejection reports where the media ends (one extra round trip to an already running decoder process, no frames
decoded).

The model: :class:`ModelWatcher` loads the version a registry reference points to and, for alias references
(``models:/opsvlm@champion``), polls the alias; when it moves, the new version is loaded off the request path and
swapped in with one reference assignment. Requests take the current :class:`LoadedModel` once per batch, so a batch
is predicted, and reported, by exactly one version. A version that fails to load is logged, shown in ``/status``
and skipped until the alias moves again; the old model keeps serving.

torch/transformers are imported only where a model is loaded: ingress and decoder processes stay light.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from opsvlm.video.decode import ClipFrames, ClipRejection, ClipWindow, decode_session_with_deadline
from opsvlm.video.sampling import SamplingSpec

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv")
# Browsers and HTTP clients label the same container differently; octet-stream is what most send for a file part
# without a known type (the extension is still checked).
VIDEO_CONTENT_TYPES: frozenset[str] = frozenset(
    {
        "video/mp4",
        "video/x-msvideo",
        "video/avi",
        "video/msvideo",
        "video/vnd.avi",
        "video/quicktime",
        "video/x-matroska",
        "application/octet-stream",
    }
)
MULTIPART_SLACK_BYTES = 64 * 1024  # multipart boundaries, part headers and small fields on top of the file bytes
_COPY_CHUNK = 1 << 20
# A probe window no video reaches: the decoder rejects it after opening the media, reporting where the media ends.
_PROBE_START_S = 1e9
_MEDIA_END = re.compile(r"media ends at (?P<end>[0-9]+(?:\.[0-9]+)?) s")

# Decoder rejection reasons (opsvlm.video.decode) -> HTTP status.
REJECTION_STATUS: dict[str, int] = {
    "missing_file": 404,
    "empty_file": 422,
    "not_a_video": 422,
    "no_media": 422,
    "decode_error": 422,
    "no_frames": 422,
    "beyond_media_end": 422,
    "before_media_start": 422,
    # The decoder process died on this input; retrying the same file would crash it again, so it is the input's
    # problem rather than a transient server error.
    "decode_crash": 422,
    "decode_timeout": 504,
}
_REJECTION_HINT: dict[str, str] = {
    "empty_file": "empty file",
    "not_a_video": "not a decodable video (non-video bytes, or a corrupt or truncated file)",
    "decode_error": "corrupt video: frames failed to decode",
    "no_frames": "no video frames",
    "beyond_media_end": "window outside the video",
    "before_media_start": "window outside the video",
    "decode_timeout": "decoding did not finish in time",
    "decode_crash": "the decoder crashed on this file",
    "missing_file": "no such file",
}


class ServingError(Exception):
    """A request (or one clip of it) that cannot be served, as an HTTP status, an error code and a message.

    Args:
        status: HTTP status code.
        reason: Short machine-readable code (``upload_too_large``, ``not_a_video``, ...).
        detail: Human-readable message naming the problem.
    """

    def __init__(self, status: int, reason: str, detail: str):
        # All three in args so the exception pickles (it crosses Ray process boundaries).
        super().__init__(status, reason, detail)
        self.status, self.reason, self.detail = status, reason, detail

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.detail}"

    def to_dict(self) -> dict[str, str]:
        return {"error": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class ServingLimits:
    """Input limits; app args of the Serve app.

    Attributes:
        max_upload_bytes: Largest upload accepted, bytes (for ``/batch_predict``: all files together).
        max_duration_s: Longest clip, seconds: the window if one is given, else the whole video.
        decode_deadline_s: Longest wait for the decoder (opening the media, then each clip); a hung decode gets 504.
        allowed_root: Directory path requests may read under; ``None`` disables path requests.
        max_batch_clips: Most clips in one ``/batch_predict`` request.
    """

    max_upload_bytes: int = 64 * 1024 * 1024
    max_duration_s: float = 120.0
    decode_deadline_s: float = 30.0
    allowed_root: str | None = None
    max_batch_clips: int = 16

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes must be >= 1, got {self.max_upload_bytes}")
        if not self.max_duration_s > 0 or not self.decode_deadline_s > 0:
            raise ValueError("max_duration_s and decode_deadline_s must be > 0")
        if self.max_batch_clips < 1:
            raise ValueError(f"max_batch_clips must be >= 1, got {self.max_batch_clips}")
        if self.allowed_root is not None and not Path(self.allowed_root).is_dir():
            raise ValueError(f"allowed_root {self.allowed_root!r} is not a directory")

    def describe(self) -> dict[str, Any]:
        return asdict(self)


# --- request validation ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A clip window in video seconds; ``end_s=None`` means the end of the video."""

    start_s: float = 0.0
    end_s: float | None = None


def _seconds(value: Any, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ServingError(422, "invalid_window", f"{name} must be a number of seconds, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ServingError(422, "invalid_window", f"{name} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ServingError(422, "invalid_window", f"{name} must be a finite number >= 0, got {value!r}")
    return number


def parse_window(start_s: Any = None, end_s: Any = None) -> Window:
    """Validate an optional clip window from form fields or JSON.

    Args:
        start_s: Start in video seconds (number, numeric string, or empty/``None`` for 0).
        end_s: End in video seconds (``None``/empty: the end of the video).

    Raises:
        ServingError: 422 for non-numeric, negative, non-finite values or ``end_s <= start_s``.
    """
    start = _seconds(start_s, "start_s") or 0.0
    end = _seconds(end_s, "end_s")
    if end is not None and end <= start:
        raise ServingError(422, "invalid_window", f"end_s ({end:g}) must be greater than start_s ({start:g})")
    return Window(start, end)


def check_video_name(filename: str | None, content_type: str | None = None) -> str:
    """Check an upload's file name and content type; returns its (lower-case) extension.

    Raises:
        ServingError: 415 if the extension is not one of :data:`VIDEO_EXTENSIONS` or the content type is not a
            video type (``application/octet-stream`` and no type are accepted: the extension decides).
    """
    suffix = PurePosixPath(filename or "").suffix.lower()
    if suffix not in VIDEO_EXTENSIONS:
        raise ServingError(
            415,
            "unsupported_media_type",
            f"{filename or '<no file name>'}: expected a video file ending in {', '.join(VIDEO_EXTENSIONS)}",
        )
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type and media_type not in VIDEO_CONTENT_TYPES:
        raise ServingError(
            415,
            "unsupported_media_type",
            f"{filename}: content type {media_type!r} is not a video type ({', '.join(sorted(VIDEO_CONTENT_TYPES))})",
        )
    return suffix


def resolve_allowed_path(root: str | os.PathLike[str] | None, requested: Any) -> Path:
    """The real path of a file a request names, guaranteed to lie inside ``root``.

    ``requested`` may be relative to ``root`` or absolute. Any ``..`` component is refused outright (even one that
    would land back inside); symlinks are resolved before the containment check, so a link inside the root that
    points out of it is refused too. The check happens before any existence test, so nothing is revealed about
    files outside the root.

    Args:
        root: The allowed root; ``None`` means path requests are disabled.
        requested: The path from the request.

    Returns:
        The resolved (symlink-free) path of an existing non-directory under ``root``.

    Raises:
        ServingError: 403 (disabled, ``..``, outside the root), 404 (does not exist), 422 (not a string, empty,
            NUL byte, a directory), 415 (not a video extension).
    """
    if root is None:
        raise ServingError(403, "paths_disabled", "this server does not accept file paths; upload the video instead")
    if not isinstance(requested, str) or not requested.strip():
        raise ServingError(422, "invalid_path", f"path must be a non-empty string, got {requested!r}")
    if "\x00" in requested:
        raise ServingError(422, "invalid_path", "path contains a NUL byte")
    parts = PurePosixPath(requested).parts
    if ".." in parts or ".." in Path(requested).parts:
        raise ServingError(403, "path_outside_root", f"{requested!r}: '..' is not allowed in paths")
    root_real = Path(os.path.realpath(root))
    candidate = Path(requested) if os.path.isabs(requested) else root_real / requested
    real = Path(os.path.realpath(candidate))
    if real != root_real and not real.is_relative_to(root_real):
        raise ServingError(403, "path_outside_root", f"{requested!r} is outside the allowed root")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise ServingError(404, "not_found", f"{requested!r}: no such file under the allowed root") from None
    except OSError as exc:
        raise ServingError(403, "unreadable", f"{requested!r}: cannot access ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise ServingError(422, "not_a_file", f"{requested!r} is a directory")
    # The extension of what is actually read, not of a link's name.
    check_video_name(real.name)
    return real


def copy_limited(source, destination: str | os.PathLike[str], max_bytes: int, name: str) -> int:
    """Copy a file object to ``destination``, refusing more than ``max_bytes``.

    Returns:
        Bytes copied.

    Raises:
        ServingError: 413 once the source goes past ``max_bytes`` (``destination`` is then removed).
    """
    copied = 0
    with open(destination, "wb") as out:
        while chunk := source.read(_COPY_CHUNK):
            copied += len(chunk)
            if copied > max_bytes:
                break
            out.write(chunk)
    if copied > max_bytes:
        Path(destination).unlink(missing_ok=True)
        raise ServingError(413, "upload_too_large", f"{name}: upload is over the limit of {max_bytes} bytes")
    return copied


def limit_body(request: Request, max_bytes: int) -> Request:
    """The request with its body capped at ``max_bytes``: refused up front from ``Content-Length``, and counted
    while streaming (chunked uploads), so an oversized upload is never spooled to disk in full.

    Raises:
        ServingError: 413 (from this call or while the body is read), 400 for an invalid ``Content-Length``.
    """
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ServingError(400, "bad_request", f"invalid Content-Length {length!r}") from None
        if declared > max_bytes:
            raise ServingError(
                413, "upload_too_large", f"request body is {declared} bytes; the limit is {max_bytes} bytes"
            )
    received = 0
    upstream = request.receive

    async def receive():
        nonlocal received
        message = await upstream()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise ServingError(413, "upload_too_large", f"request body is over the limit of {max_bytes} bytes")
        return message

    return Request(request.scope, receive)


# --- decoding --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Media:
    """A video to decode: a local path and what the client called it (used in messages instead of server paths).

    Attributes:
        path: Local file (an upload's temporary copy, or a resolved path under the allowed root).
        name: The client's file name or requested path.
        uploaded: Whether ``path`` is a temporary copy of an upload (it must travel as bytes to another machine).
    """

    path: str
    name: str
    uploaded: bool = False


@dataclass
class DecodedClip:
    """Sampled frames of one clip, ready for the predictor.

    Attributes:
        frames: uint8[K, H, W, 3] frames at the spec's size.
        frame_times_s: float[K] times from the clip start.
        start_s: Clip start in video seconds.
        end_s: Clip end in video seconds.
        spec: The sampling spec the frames were decoded with (the predictor checks it is its model's).
    """

    frames: np.ndarray
    frame_times_s: np.ndarray
    start_s: float
    end_s: float
    spec: SamplingSpec

    @property
    def clip_length_s(self) -> float:
        return self.end_s - self.start_s


def _rejection_error(rejection: ClipRejection, media: Media) -> ServingError:
    """The decoder's rejection as ``"<client's name>: <what it means>: <decoder's words>"`` (no server paths)."""
    detail = rejection.detail.replace(media.path, media.name).removeprefix(f"{media.name}: ")
    hint = _REJECTION_HINT.get(rejection.reason)
    detail = f"{media.name}: {hint}: {detail}" if hint else f"{media.name}: {detail}"
    return ServingError(REJECTION_STATUS.get(rejection.reason, 422), rejection.reason, detail)


def media_duration(media: Media, spec: SamplingSpec, deadline_s: float) -> float:
    """Duration of a video in seconds as the decoder sees it (last frame time + one frame interval).

    Raises:
        ServingError: as the decoder rejects the media (not a video, empty, hang -> 504, ...).
    """
    probe = ClipWindow("probe", _PROBE_START_S, _PROBE_START_S + 1.0)
    (result,) = decode_session_with_deadline(media.path, "video", [probe], spec, deadline_s)
    if isinstance(result, ClipRejection):
        match = _MEDIA_END.search(result.detail) if result.reason == "beyond_media_end" else None
        if match is not None:
            return float(match["end"])
        if result.reason == "beyond_media_end":
            raise ServingError(500, "probe_failed", f"{media.name}: cannot read the media duration: {result.detail}")
        raise _rejection_error(result, media)
    raise ServingError(500, "probe_failed", f"{media.name}: the decoder accepted a window past any video's end")


def decode_media(
    media: Media, windows: Sequence[Window], spec: SamplingSpec, limits: ServingLimits
) -> list[DecodedClip | ServingError]:
    """Decode and sample clips of one video (one decoder pass for all windows), within the limits.

    Args:
        media: The video.
        windows: Clip windows (``end_s=None``: to the end of the video).
        spec: The model's sampling spec (frame count, size, strategy).
        limits: Duration limit and decode deadline.

    Returns:
        One :class:`DecodedClip` or :class:`ServingError` per window, in order.
    """
    results: list[DecodedClip | ServingError | None] = [None] * len(windows)
    duration = None
    if any(w.end_s is None for w in windows):
        try:
            duration = media_duration(media, spec, limits.decode_deadline_s)
        except ServingError as error:
            return [error] * len(windows)
    clips = []
    for index, window in enumerate(windows):
        end = window.end_s if window.end_s is not None else duration
        if end <= window.start_s:
            results[index] = ServingError(
                422,
                "beyond_media_end",
                f"{media.name}: window outside the video: start_s {window.start_s:g} is at or after the end of "
                f"the video ({end:.3f} s)",
            )
        elif end - window.start_s > limits.max_duration_s + 1e-9:
            what = "video" if window.end_s is None and window.start_s == 0 else "clip"
            results[index] = ServingError(
                413,
                "duration_too_long",
                f"{media.name}: {what} is {end - window.start_s:.3f} s long; the limit is {limits.max_duration_s:g} s",
            )
        else:
            clips.append(ClipWindow(str(index), window.start_s, end))
    if clips:
        for item in decode_session_with_deadline(media.path, "video", clips, spec, limits.decode_deadline_s):
            index = int(item.clip_id)
            if isinstance(item, ClipFrames):
                window = next(c for c in clips if c.clip_id == item.clip_id)
                results[index] = DecodedClip(
                    item.frames, np.asarray(item.frame_times_s), window.start_s, window.end_s, spec
                )
            else:
                results[index] = _rejection_error(item, media)
    return results


def decode_media_bytes(
    data: bytes, name: str, windows: Sequence[Window], spec: SamplingSpec, limits: ServingLimits
) -> list[DecodedClip | ServingError]:
    """:func:`decode_media` for an upload that arrived as bytes (a decoder replica on another machine)."""
    suffix = PurePosixPath(name).suffix.lower() or ".mp4"
    handle, path = tempfile.mkstemp(prefix="opsvlm-upload-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        return decode_media(Media(path, name, uploaded=True), windows, spec, limits)
    finally:
        Path(path).unlink(missing_ok=True)


# --- the model -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """One loaded model version: what a batch is predicted with and reported as.

    Attributes:
        predictor: An :class:`opsvlm.inference.Predictor`.
        ref: The reference the server was configured with.
        version: Registry version number (as text), else the run id, else the checkpoint directory.
        name: Registered model name, if any.
        alias: Alias the reference follows, if any.
        run_id: Training run, if known.
        checkpoint_dir: Local checkpoint directory.
        base_model: Base model the adapter sits on.
        spec: Its sampling spec.
        labels: Its label set.
        loaded_at: Unix time the load finished.
    """

    predictor: Any
    ref: str
    version: str
    name: str | None
    alias: str | None
    run_id: str | None
    checkpoint_dir: str
    base_model: str
    spec: SamplingSpec
    labels: tuple[str, ...]
    loaded_at: float

    def describe(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
            "base_model": self.base_model,
            "checkpoint_dir": self.checkpoint_dir,
            "loaded_at": self.loaded_at,
        }


def load_predictor(checkpoint_dir: str | os.PathLike[str], quantization: str | None = None) -> Any:
    """The default loader: :meth:`opsvlm.inference.Predictor.from_checkpoint` (imports torch/transformers)."""
    from opsvlm.inference import Predictor

    return Predictor.from_checkpoint(checkpoint_dir, quantization=quantization)


class ModelWatcher:
    """Holds the current model of a reference and follows its alias.

    ``current`` is replaced by a single assignment after the new model has fully loaded, so readers see either
    the old or the new model, never a half-loaded one. Loading happens in the caller's thread: call :meth:`poll`
    off the request path (a background task or thread).

    Args:
        ref: ``models:/<name>@<alias>`` (watched), ``models:/<name>/<version>``, a run id or a checkpoint directory.
        tracking_uri: MLflow tracking/registry URI (default: ``MLFLOW_TRACKING_URI`` or the local store).
        cache_dir: Where checkpoints are downloaded (default: a new temporary directory for this watcher).
        quantization: Override how the base is loaded (``none`` on a CPU for an nf4-trained adapter).
        loader: ``(checkpoint_dir, quantization) -> predictor`` (default :func:`load_predictor`).

    Raises:
        opsvlm.registry.ModelRefError: if the initial model cannot be found (the replica must not start).
    """

    def __init__(
        self,
        ref: str,
        *,
        tracking_uri: str = "",
        cache_dir: str | os.PathLike[str] | None = None,
        quantization: str | None = None,
        loader: Callable[[Any, str | None], Any] = load_predictor,
    ):
        self.ref = ref
        self.tracking_uri = tracking_uri
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="opsvlm-models-"))
        self.quantization = quantization
        self._loader = loader
        self._poll_lock = threading.Lock()
        self.last_error: str | None = None
        self.last_poll_at: float | None = None
        self._failed_version: str | None = None
        self.current: LoadedModel = self._load(self._describe())

    @property
    def watches(self) -> bool:
        """Whether the reference can move (an alias); versions, runs and directories are fixed."""
        return self.ref.startswith("models:/") and "@" in self.ref

    def _describe(self) -> dict[str, Any]:
        from opsvlm import registry

        return registry.describe_model(self.ref, self.tracking_uri or None)

    @staticmethod
    def _version_of(info: dict[str, Any]) -> str:
        if info.get("version") is not None:
            return str(info["version"])
        return str(info.get("run_id") or info.get("path") or info["ref"])

    def _load(self, info: dict[str, Any]) -> LoadedModel:
        from opsvlm import registry
        from opsvlm.train import checkpoint as ckpt

        # Pin the version just described: resolving the alias again could land on a newer version than reported.
        pinned = f"models:/{info['name']}/{info['version']}" if info.get("version") is not None else self.ref
        directory = registry.resolve_model(pinned, self.tracking_uri or None, self.cache_dir)
        meta = ckpt.read_model_meta(directory)
        predictor = self._loader(directory, self.quantization)
        return LoadedModel(
            predictor=predictor,
            ref=self.ref,
            version=self._version_of(info),
            name=info.get("name"),
            alias=info.get("alias"),
            run_id=info.get("run_id"),
            checkpoint_dir=str(directory),
            base_model=str(meta["base_model"]),
            spec=ckpt.sampling_spec_of(directory),
            labels=tuple(meta["labels"]),
            loaded_at=time.time(),
        )

    def poll(self) -> bool:
        """Check the alias once and swap in the version it now points to. Blocking (loads the model).

        Returns:
            Whether a new version was swapped in. Failures (registry unreachable, a broken version) are logged and
            kept in ``last_error``; the current model stays.
        """
        if not self.watches:
            return False
        with self._poll_lock:  # one load at a time, even if a caller polls from two threads
            self.last_poll_at = time.time()
            try:
                info = self._describe()
            except Exception as exc:  # registry down or alias deleted: keep serving what we have
                self.last_error = f"cannot resolve {self.ref}: {exc}"
                logger.warning("model watcher: %s", self.last_error)
                return False
            version = self._version_of(info)
            if version == self.current.version:
                self.last_error = None
                return False
            if version == self._failed_version:  # already failed; retried when the alias moves on
                return False
            logger.info("model watcher: %s moved v%s -> v%s, loading", self.ref, self.current.version, version)
            try:
                loaded = self._load(info)
            except Exception as exc:
                self._failed_version = version
                self.last_error = f"version {version} failed to load, still serving {self.current.version}: {exc}"
                logger.exception("model watcher: %s", self.last_error)
                return False
            self.current = loaded  # the swap: one reference assignment
            self._failed_version, self.last_error = None, None
            logger.info("model watcher: now serving %s version %s", self.ref, version)
            return True

    def status(self) -> dict[str, Any]:
        model = self.current
        return {
            "model": {
                **model.describe(),
                "watching": self.watches,
                "last_poll_at": self.last_poll_at,
                "last_error": self.last_error,
            },
            "task": model.predictor.task.name,
            "sampling_spec": asdict(model.spec),
            "labels": list(model.labels),
        }


def _writable(frames: np.ndarray) -> np.ndarray:
    # Frames arrive read-only (views of the decoder pipe or of Ray's object store); torch warns on those.
    frames = np.asarray(frames)
    return frames if frames.flags.writeable else frames.copy()


def predict_clips(model: LoadedModel, clips: Sequence[DecodedClip]) -> list[dict[str, Any]]:
    """Predict clips with one model version, as plain dicts (they cross process boundaries).

    Returns:
        Per clip one of ``{"prediction": {...}, "model_version": v}``, ``{"spec_changed": {...}}`` (decoded with
        another spec than this model's: decode again with the one given), or ``{"error": message}``.
    """
    from opsvlm.inference import ClipInput

    task = model.predictor.task.name
    if task != "operations":
        message = f"the served model answers the {task} task, not video clips: use /predict_objects"
        return [{"error": message, "status": 409, "code": "wrong_task"} for _ in clips]
    outcomes: list[dict[str, Any] | None] = [None] * len(clips)
    batch = []
    for index, clip in enumerate(clips):
        if clip.spec != model.spec:
            outcomes[index] = {"spec_changed": asdict(model.spec)}
        else:
            batch.append(index)
    if batch:
        inputs = [
            ClipInput(_writable(clips[i].frames), list(clips[i].frame_times_s), clips[i].clip_length_s) for i in batch
        ]
        try:
            predictions = model.predictor.predict(inputs)
        except Exception as exc:  # one bad batch must not kill the replica; the clients get a 500 naming it
            logger.exception("prediction failed")
            for i in batch:
                outcomes[i] = {"error": f"prediction failed: {exc!r}"}
            return outcomes
        for i, prediction in zip(batch, predictions, strict=True):
            if prediction is None:  # only in unconstrained mode
                outcomes[i] = {"error": "the model's answer did not parse"}
            else:
                outcomes[i] = {"prediction": prediction.to_dict(), "model_version": model.version}
    return outcomes


# --- objects in images (the inspection task) -------------------------------------------------------------------------

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
MAX_IMAGE_PIXELS = 64_000_000  # a decompression bomb is refused before its pixels are allocated


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode image bytes.

    Args:
        data: The file's bytes.
        name: Its name, for messages.

    Returns:
        uint8[H, W, 3] RGB.

    Raises:
        ServingError: 415 for an unsupported file name, 422 for bytes that are not a (complete) image, 413 for an
            image with more than ``MAX_IMAGE_PIXELS`` pixels.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    suffix = Path(name).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ServingError(
            415, "unsupported_media_type", f"{name!r}: send an image ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    if not data:
        raise ServingError(422, "empty_image", f"{name!r} is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ServingError(
                    413,
                    "image_too_large",
                    f"{name!r} has {image.width}x{image.height} pixels (limit {MAX_IMAGE_PIXELS})",
                )
            return np.asarray(image.convert("RGB"))
    except ServingError:
        raise
    except Image.DecompressionBombError as exc:
        raise ServingError(413, "image_too_large", f"{name!r}: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ServingError(422, "undecodable_image", f"{name!r} is not a readable image: {exc}") from None


def parse_object_detections(raw: Any, image: np.ndarray, name: str) -> list[Any]:
    """Validate stage-1 detections for one decoded image (:func:`opsvlm.data.yolo.parse_detections` rules).

    Args:
        raw: A JSON list (or its text) of ``{"label", "box", "normalized", "score"}``.
        image: uint8[H, W, 3] the image they belong to (pixel boxes are normalised by its size).
        name: The image's name, for messages.

    Returns:
        :class:`opsvlm.data.yolo.StageOneDetection` objects, boxes normalised to [0, 1].

    Raises:
        ServingError: 422 naming the field, for missing, malformed or out-of-image detections.
    """
    from opsvlm.data.yolo import DetectionsJsonError, parse_detections

    if raw is None:
        raise ServingError(422, "missing_detections", "send 'detections': the stage-1 objects to classify")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ServingError(422, "invalid_detections", f"detections: not valid JSON: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise ServingError(422, "invalid_detections", "detections: must be a non-empty list of objects")
    height, width = image.shape[:2]
    try:
        (parsed,) = parse_detections({"image": name, "width": width, "height": height, "detections": raw}, "request")
    except DetectionsJsonError as exc:
        raise ServingError(422, "invalid_detections", str(exc)) from None
    return list(parsed.detections)


def predict_objects(model: LoadedModel, image: np.ndarray, detections: Sequence[Any]) -> dict[str, Any]:
    """Classify every detected object of one image with one model version (one forward pass for all of them).

    Each object in turn is the target (marked on the image resized with the model's SamplingSpec); the others are
    its spatial context.

    Returns:
        ``{"objects": [...], "model_version": v}`` or ``{"error": message, "status": code, "code": name}``.
    """
    from opsvlm.tasks.inspection import object_input

    task = model.predictor.task.name
    if task != "inspection":
        message = f"the served model answers the {task} task, not objects in images: use /predict"
        return {"error": message, "status": 409, "code": "wrong_task"}
    inputs = [
        object_input(
            image,
            target.box,
            target.object_type,
            [(other.object_type, other.box) for other in detections if other.index != target.index],
            model.spec,
        )
        for target in detections
    ]
    try:
        answers = model.predictor.predict(inputs)
    except Exception as exc:  # one bad request must not kill the replica; the client gets a 500 naming it
        logger.exception("prediction failed")
        return {"error": f"prediction failed: {exc!r}", "status": 500, "code": "prediction_failed"}
    objects = []
    for detection, answer in zip(detections, answers, strict=True):
        if answer is None:  # only in unconstrained mode
            return {"error": "the model's answer did not parse", "status": 500, "code": "prediction_failed"}
        objects.append(
            {
                "index": detection.index,
                "label": detection.label,
                "box": list(detection.box),
                "score": detection.score,
                **answer.to_dict(),
            }
        )
    return {"objects": objects, "model_version": model.version}


# --- responses -------------------------------------------------------------------------------------------------------


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
    model_version: str
    latency_ms: float


class PathObjects(BaseModel):
    """An image under the server's allowed root and its stage-1 detections."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="Relative to the allowed root, or absolute inside it")
    detections: list[dict[str, Any]] = Field(description='[{"label", "box", "normalized", "score"}, ...]')


def prediction_body(outcome: dict[str, Any], clip: tuple[float, float], latency_ms: float) -> dict[str, Any]:
    """The response body of one prediction (see :class:`PredictionResponse`)."""
    prediction = outcome["prediction"]
    return {
        "operation": prediction["operation"],
        "start_s": prediction["start_s"],
        "end_s": prediction["end_s"],
        "next_operation": prediction["next_operation"],
        "confidence": prediction["confidence"],
        "scores": prediction["scores"],
        "next_scores": prediction["next_scores"],
        "clip": {"start_s": clip[0], "end_s": clip[1]},
        "model_version": outcome["model_version"],
        "latency_ms": round(latency_ms, 3),
    }


def error_response(error: ServingError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status)


# --- the HTTP app ----------------------------------------------------------------------------------------------------


class Backend(Protocol):
    """Where decoding and prediction happen (in-process, or Serve deployments)."""

    async def sampling_spec(self) -> SamplingSpec:
        """The spec to decode with: the current model's, as last seen."""
        ...

    def remember_spec(self, spec: SamplingSpec) -> None:
        """The model reported a new spec (an alias swap): decode with it from now on."""
        ...

    async def decode(
        self, media: Media, windows: Sequence[Window], spec: SamplingSpec
    ) -> list[DecodedClip | ServingError]: ...

    async def predict(self, clips: Sequence[DecodedClip]) -> list[dict[str, Any]]:
        """Outcomes as :func:`predict_clips` returns them."""
        ...

    async def predict_objects(self, image: np.ndarray, detections: Sequence[Any]) -> dict[str, Any]:
        """The outcome of :func:`predict_objects` for one image."""
        ...

    async def status(self) -> dict[str, Any]: ...


@dataclass
class ClipJob:
    """One clip of a request: its media and window, or the error that already sank it."""

    media: Media | None = None
    window: Window | None = None
    error: ServingError | None = None


@dataclass
class _ParsedRequest:
    jobs: list[ClipJob]
    temporary: list[str] = field(default_factory=list)

    def cleanup(self) -> None:
        for path in self.temporary:
            Path(path).unlink(missing_ok=True)


async def run_jobs(
    backend: Backend, jobs: Sequence[ClipJob]
) -> list[tuple[dict[str, Any], DecodedClip] | ServingError]:
    """Decode (one pass per video) and predict every clip; one result per job.

    If the model's sampling spec changed between decoding and prediction (an alias swap), the affected clips are
    decoded again with the new spec, once.
    """
    results: list[Any] = [job.error for job in jobs]
    spec = await backend.sampling_spec()
    for _ in range(2):
        pending = [i for i, result in enumerate(results) if result is None]
        if not pending:
            break
        groups: dict[str, list[int]] = {}
        for i in pending:
            groups.setdefault(jobs[i].media.path, []).append(i)
        decoded = await asyncio.gather(
            *(backend.decode(jobs[idx[0]].media, [jobs[i].window for i in idx], spec) for idx in groups.values())
        )
        clips, owners = [], []
        for indices, outputs in zip(groups.values(), decoded, strict=True):
            for i, output in zip(indices, outputs, strict=True):
                if isinstance(output, ServingError):
                    results[i] = output
                else:
                    clips.append(output)
                    owners.append(i)
        if not clips:
            break
        outcomes = await backend.predict(clips)
        for i, clip, outcome in zip(owners, clips, outcomes, strict=True):
            if "prediction" in outcome:
                results[i] = (outcome, clip)
            elif "spec_changed" in outcome:
                spec = SamplingSpec(**outcome["spec_changed"])
                backend.remember_spec(spec)
            else:
                status, code = outcome.get("status", 500), outcome.get("code", "prediction_failed")
                results[i] = ServingError(status, code, outcome.get("error", "prediction failed"))
    # Still pending after the retry: replicas disagreed on the model while a new version rolled out.
    changing = ServingError(503, "model_changing", "the model's sampling spec changed during the request; retry")
    return [r if r is not None else changing for r in results]


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _read_json(request: Request, limits: ServingLimits) -> Any:
    body = await limit_body(request, limits.max_upload_bytes).body()
    if not body:
        raise ServingError(422, "missing_body", "the JSON body is empty")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServingError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None


async def _read_form(request: Request, limits: ServingLimits, max_files: int):
    limited = limit_body(request, limits.max_upload_bytes + MULTIPART_SLACK_BYTES)
    try:
        return await limited.form(max_files=max_files, max_fields=4 * limits.max_batch_clips + 8)
    except StarletteHTTPException as exc:  # malformed multipart, too many parts
        status = 413 if "Too many" in str(exc.detail) else 400
        raise ServingError(status, "invalid_multipart", str(exc.detail)) from None


def _validation_message(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "body"
        problems.append(f"{where}: {'missing field' if error['type'] == 'missing' else error['msg']}")
    return "; ".join(problems)


def _path_job(limits: ServingLimits, clip: PathClip) -> ClipJob:
    try:
        path = resolve_allowed_path(limits.allowed_root, clip.path)
        return ClipJob(Media(str(path), clip.path), parse_window(clip.start_s, clip.end_s))
    except ServingError as error:
        return ClipJob(error=error)


async def _save_upload(upload: UploadFile, limits: ServingLimits, budget: list[int], parsed: _ParsedRequest) -> Media:
    suffix = check_video_name(upload.filename, upload.content_type)
    handle, path = tempfile.mkstemp(prefix="opsvlm-upload-", suffix=suffix)
    os.close(handle)
    parsed.temporary.append(path)
    size = await asyncio.to_thread(copy_limited, upload.file, path, budget[0], upload.filename)
    budget[0] -= size
    if size == 0:  # caught here to name the upload; the decoder would say "empty file" about a temp path
        raise ServingError(422, "empty_file", f"{upload.filename}: the upload is empty (0 bytes)")
    return Media(path, upload.filename or "upload", uploaded=True)


async def parse_predict(request: Request, limits: ServingLimits) -> _ParsedRequest:
    """``POST /predict`` -> one clip job (errors raise: a single clip's error is the whole answer)."""
    parsed = _ParsedRequest([])
    try:
        media_type = _media_type(request)
        if media_type == "application/json":
            data = await _read_json(request, limits)
            try:
                clip = PathClip.model_validate(data)
            except ValidationError as exc:
                raise ServingError(422, "invalid_request", _validation_message(exc)) from None
            job = _path_job(limits, clip)
            if job.error is not None:
                raise job.error
            parsed.jobs.append(job)
        elif media_type == "multipart/form-data":
            form = await _read_form(request, limits, max_files=1)
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ServingError(422, "missing_file", "multipart request needs a 'file' part with the video")
            window = parse_window(form.get("start_s"), form.get("end_s"))
            media = await _save_upload(upload, limits, [limits.max_upload_bytes], parsed)
            parsed.jobs.append(ClipJob(media, window))
        else:
            raise ServingError(
                415,
                "unsupported_media_type",
                f"content type {media_type or '<none>'!r}: send multipart/form-data with a 'file' part, or "
                "application/json naming a path",
            )
    except BaseException:
        parsed.cleanup()
        raise
    return parsed


async def parse_batch(request: Request, limits: ServingLimits) -> _ParsedRequest:
    """``POST /batch_predict`` -> clip jobs; problems of one clip (bad path or window) stay with that clip."""
    parsed = _ParsedRequest([])
    try:
        media_type = _media_type(request)
        if media_type == "application/json":
            data = await _read_json(request, limits)
            clips = data.get("clips") if isinstance(data, dict) else None
            if isinstance(clips, list) and len(clips) > limits.max_batch_clips:
                raise ServingError(413, "too_many_clips", f"{len(clips)} clips; the limit is {limits.max_batch_clips}")
            try:
                batch = PathBatch.model_validate(data)
            except ValidationError as exc:
                raise ServingError(422, "invalid_request", _validation_message(exc)) from None
            if not batch.clips:
                raise ServingError(422, "invalid_request", "clips: at least one clip is needed")
            parsed.jobs.extend(_path_job(limits, clip) for clip in batch.clips)
        elif media_type == "multipart/form-data":
            form = await _read_form(request, limits, max_files=limits.max_batch_clips)
            uploads = [u for key in ("files", "file") for u in form.getlist(key) if isinstance(u, UploadFile)]
            if not uploads:
                raise ServingError(422, "missing_file", "multipart batch needs one or more 'files' parts")
            budget = [limits.max_upload_bytes]
            media = [await _save_upload(upload, limits, budget, parsed) for upload in uploads]
            clips_field = form.get("clips")
            if clips_field is None:
                specs = [UploadClip(file=i) for i in range(len(media))]
            else:
                try:
                    raw = json.loads(clips_field if isinstance(clips_field, str) else "")
                    if isinstance(raw, list) and len(raw) > limits.max_batch_clips:
                        raise ServingError(
                            413, "too_many_clips", f"{len(raw)} clips; the limit is {limits.max_batch_clips}"
                        )
                    specs = [UploadClip.model_validate(item) for item in raw] if isinstance(raw, list) else None
                except json.JSONDecodeError as exc:
                    raise ServingError(400, "invalid_json", f"clips: not valid JSON: {exc}") from None
                except ValidationError as exc:
                    raise ServingError(422, "invalid_request", f"clips: {_validation_message(exc)}") from None
                if not specs:
                    raise ServingError(422, "invalid_request", "clips must be a non-empty JSON list")
            for spec in specs:
                if not 0 <= spec.file < len(media):
                    parsed.jobs.append(
                        ClipJob(error=ServingError(422, "invalid_request", f"file index {spec.file} out of range"))
                    )
                    continue
                try:
                    parsed.jobs.append(ClipJob(media[spec.file], parse_window(spec.start_s, spec.end_s)))
                except ServingError as error:
                    parsed.jobs.append(ClipJob(error=error))
        else:
            raise ServingError(
                415,
                "unsupported_media_type",
                f"content type {media_type or '<none>'!r}: send multipart/form-data with 'files' parts, or "
                "application/json with a 'clips' list",
            )
    except BaseException:
        parsed.cleanup()
        raise
    return parsed


_DOC_ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed JSON or multipart",
        403: "Path outside the allowed root, or path input disabled",
        404: "No such file under the allowed root",
        413: "Upload, clip duration or batch over the limit",
        415: "Not a video content type or extension",
        422: "Missing/invalid fields or window, or media that does not decode",
        504: "Decoding missed its deadline",
    }.items()
}


def _request_body_doc(json_schema: dict, form_properties: dict, required: list[str]) -> dict:
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


def _inline(schema: dict) -> dict:
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


def create_app(
    backend: Backend,
    limits: ServingLimits,
    *,
    title: str = "opsvlm",
    extra_status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> FastAPI:
    """The HTTP API (see the module docstring) over a backend.

    Args:
        backend: Decodes and predicts.
        limits: Input limits.
        title: OpenAPI title.
        extra_status: Coroutine adding fields to ``/status`` (Serve: replicas and deployment options).
    """
    app = FastAPI(
        title=title,
        description="Operation recognition on packing-work video: predicts the dominant operation of a clip, "
        "its time span and the next operation.",
    )

    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return error_response(exc)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and readiness: the model answers."""
        try:
            status = await backend.status()
        except Exception as exc:
            raise ServingError(503, "model_unavailable", f"the model is not reachable: {exc!r}") from None
        return {"status": "ok", "model_version": status["model"]["version"]}

    @app.get("/status")
    async def status() -> dict[str, Any]:
        """Model name/version, sampling spec, label set, limits and replicas."""
        body = await backend.status()
        body["limits"] = limits.describe()
        if extra_status is not None:
            body.update(await extra_status())
        return body

    form_clip = {
        "start_s": {"type": "number", "description": "Clip start, video seconds (default 0)"},
        "end_s": {"type": "number", "description": "Clip end, video seconds (default: end of the video)"},
    }

    @app.post(
        "/predict",
        response_model=PredictionResponse,
        responses=_DOC_ERRORS,
        openapi_extra=_request_body_doc(
            PathClip.model_json_schema(),
            {"file": {"type": "string", "format": "binary", "description": "MP4/AVI/MOV/MKV video"}, **form_clip},
            ["file"],
        ),
    )
    async def predict(request: Request) -> JSONResponse:
        """Predict one clip of an uploaded video, or of a file under the allowed root."""
        started = time.perf_counter()
        parsed = await parse_predict(request, limits)
        try:
            (result,) = await run_jobs(backend, parsed.jobs)
        finally:
            parsed.cleanup()
        if isinstance(result, ServingError):
            return error_response(result)
        outcome, clip = result
        latency_ms = (time.perf_counter() - started) * 1000
        return JSONResponse(prediction_body(outcome, (clip.start_s, clip.end_s), latency_ms))

    @app.post(
        "/batch_predict",
        response_model=BatchResponse,
        responses=_DOC_ERRORS,
        openapi_extra=_request_body_doc(
            _inline(PathBatch.model_json_schema()),
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
        parsed = await parse_batch(request, limits)
        try:
            results = await run_jobs(backend, parsed.jobs)
        finally:
            parsed.cleanup()
        latency_ms = (time.perf_counter() - started) * 1000
        items = []
        for index, result in enumerate(results):
            if isinstance(result, ServingError):
                items.append({"index": index, "status": result.status, **result.to_dict()})
            else:
                outcome, clip = result
                body = prediction_body(outcome, (clip.start_s, clip.end_s), latency_ms)
                items.append({"index": index, "status": 200, "prediction": body})
        return JSONResponse({"results": items, "latency_ms": round(latency_ms, 3)})

    @app.post(
        "/predict_objects",
        response_model=ObjectsResponse,
        responses=_DOC_ERRORS,
        openapi_extra=_request_body_doc(
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
    async def predict_objects_route(request: Request) -> JSONResponse:
        """Classify the condition of every detected object in one image (inspection models)."""
        started = time.perf_counter()
        image, detections = await parse_objects_request(request, limits)
        outcome = await backend.predict_objects(image, detections)
        if "error" in outcome:
            raise ServingError(outcome.get("status", 500), outcome.get("code", "prediction_failed"), outcome["error"])
        latency_ms = (time.perf_counter() - started) * 1000
        body = {
            "objects": outcome["objects"],
            "image": {"width": int(image.shape[1]), "height": int(image.shape[0])},
            "model_version": outcome["model_version"],
            "latency_ms": round(latency_ms, 3),
        }
        return JSONResponse(body)

    return app


async def parse_objects_request(request: Request, limits: ServingLimits) -> tuple[np.ndarray, list[Any]]:
    """``POST /predict_objects`` -> the decoded image and its validated detections (errors raise)."""
    media_type = _media_type(request)
    if media_type == "application/json":
        data = await _read_json(request, limits)
        try:
            body = PathObjects.model_validate(data)
        except ValidationError as exc:
            raise ServingError(422, "invalid_request", _validation_message(exc)) from None
        path = resolve_allowed_path(limits.allowed_root, body.path)
        if path.stat().st_size > limits.max_upload_bytes:
            raise ServingError(413, "file_too_large", f"{body.path!r} is over {limits.max_upload_bytes} bytes")
        name, data_bytes, raw = path.name, await asyncio.to_thread(path.read_bytes), body.detections
    elif media_type == "multipart/form-data":
        form = await _read_form(request, limits, max_files=1)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ServingError(422, "missing_file", "multipart request needs a 'file' part with the image")
        name, data_bytes, raw = upload.filename or "upload", await upload.read(), form.get("detections")
    else:
        raise ServingError(
            415,
            "unsupported_media_type",
            f"content type {media_type or '<none>'!r}: send multipart/form-data with 'file' and 'detections', or "
            "application/json naming a path",
        )
    image = await asyncio.to_thread(decode_image, data_bytes, name)
    return image, parse_object_detections(raw, image, name)


class LocalBackend:
    """Decoding and prediction in this process (the plain-FastAPI baseline and tests).

    Decoding runs in worker threads (each waits on its own decoder process); predictions run one batch at a time
    under a lock, with all clips of a request in one forward pass (no batching across requests).

    Args:
        watcher: The model.
        limits: Decode limits.
    """

    def __init__(self, watcher: ModelWatcher, limits: ServingLimits):
        self.watcher = watcher
        self.limits = limits
        self._lock = threading.Lock()

    async def sampling_spec(self) -> SamplingSpec:
        return self.watcher.current.spec

    def remember_spec(self, spec: SamplingSpec) -> None:
        """Nothing to remember: the spec is always read from the current model."""

    async def decode(
        self, media: Media, windows: Sequence[Window], spec: SamplingSpec
    ) -> list[DecodedClip | ServingError]:
        return await asyncio.to_thread(decode_media, media, windows, spec, self.limits)

    async def _with_model(self, predict: Callable[..., Any], *args: Any) -> Any:
        """``predict(current model, *args)`` in a worker thread, one prediction at a time."""

        def run() -> Any:
            with self._lock:
                return predict(self.watcher.current, *args)

        return await asyncio.to_thread(run)

    async def predict(self, clips: Sequence[DecodedClip]) -> list[dict[str, Any]]:
        return await self._with_model(predict_clips, clips)

    async def predict_objects(self, image: np.ndarray, detections: Sequence[Any]) -> dict[str, Any]:
        return await self._with_model(predict_objects, image, detections)

    async def status(self) -> dict[str, Any]:
        return self.watcher.status()


@contextlib.contextmanager
def polling(watcher: ModelWatcher, interval_s: float) -> Iterator[threading.Thread | None]:
    """Poll ``watcher`` every ``interval_s`` in a daemon thread while the context is open (LocalBackend servers)."""
    if not watcher.watches or interval_s <= 0:
        yield None
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            watcher.poll()

    thread = threading.Thread(target=loop, name="opsvlm-model-watcher", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=interval_s + 60)
