"""Reading and validating requests: bodies under caps, JSON off the event loop, windows, paths, uploads, detections.

Nothing here trusts the client: a body is refused from its ``Content-Length`` before it is read and counted while
it streams; JSON is parsed in the bounded work pool with its nesting depth and integer sizes capped (a 100,000-deep
array or a 5,000-digit integer is a 400 naming the field, not a ``RecursionError`` or ``ValueError`` in the
handler); paths never leave the allowed root; uploads are copied with a byte budget. Every problem is a
:class:`~opsvlm.serving.errors.ServingError` whose detail names the field or file.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from opsvlm.serving.errors import ServingError
from opsvlm.serving.limits import VIDEO_CONTENT_TYPES, VIDEO_EXTENSIONS, ServingLimits
from opsvlm.serving.media import Media, Window
from opsvlm.serving.schemas import PathBatch, PathClip, PathObjects, UploadClip
from opsvlm.serving.work import WorkPool

__all__ = [
    "MULTIPART_SLACK_BYTES",
    "ClipJob",
    "ObjectsRequest",
    "ParsedRequest",
    "Window",
    "check_image_name",
    "check_video_name",
    "copy_limited",
    "limit_body",
    "media_type",
    "parse_batch",
    "parse_json",
    "parse_objects_request",
    "parse_predict",
    "parse_window",
    "read_form",
    "read_json",
    "resolve_allowed_path",
    "save_upload",
    "unsupported",
    "validated",
]

MULTIPART_SLACK_BYTES = 64 * 1024  # multipart boundaries, part headers and small fields on top of the file bytes
_COPY_CHUNK = 1 << 20


# --- windows, names, paths -------------------------------------------------------------------------------------------


def _seconds(value: Any, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ServingError(422, "invalid_window", f"{name} must be a number of seconds, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ServingError(422, "invalid_window", f"{name} must be a number of seconds, got {value!r:.80}") from None
    if not math.isfinite(number) or number < 0:
        raise ServingError(422, "invalid_window", f"{name} must be a finite number >= 0, got {value!r:.80}")
    return number


def parse_window(start_s: Any = None, end_s: Any = None) -> Window:
    """Validate an optional clip window from form fields or JSON.

    Args:
        start_s: Start in video seconds (number, numeric string, or empty/``None`` for 0).
        end_s: End in video seconds (``None``/empty: the end of the video).

    Raises:
        ServingError: 422 ``invalid_window`` for non-numeric, negative, non-finite values or ``end_s <= start_s``.
    """
    start = _seconds(start_s, "start_s") or 0.0
    end = _seconds(end_s, "end_s")
    if end is not None and end <= start:
        raise ServingError(422, "invalid_window", f"end_s ({end:g}) must be greater than start_s ({start:g})")
    return Window(start, end)


def check_video_name(filename: str | None, content_type: str | None = None) -> str:
    """Check an upload's file name and content type; returns its (lower-case) extension.

    Raises:
        ServingError: 415 if the extension is not one of :data:`~opsvlm.serving.limits.VIDEO_EXTENSIONS` or the
            content type is not a video type (``application/octet-stream`` and no type are accepted: the extension
            decides).
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


def check_image_name(filename: str | None, limits: ServingLimits) -> str:
    """Check an image's file name against the accepted formats; returns its (lower-case) extension.

    Raises:
        ServingError: 415 for a name without an accepted image suffix.
    """
    suffix = PurePosixPath(filename or "").suffix.lower()
    if suffix not in limits.image_suffixes:
        raise ServingError(
            415,
            "unsupported_media_type",
            f"{filename or '<no file name>'!r}: send an image ({', '.join(sorted(limits.image_suffixes))})",
        )
    return suffix


def resolve_allowed_path(
    root: str | os.PathLike[str] | None, requested: Any, check_name: Callable[[str], Any] = check_video_name
) -> Path:
    """The real path of a file a request names, guaranteed to lie inside ``root``.

    ``requested`` may be relative to ``root`` or absolute. Any ``..`` component is refused outright (even one that
    would land back inside); symlinks are resolved before the containment check, so a link inside the root that
    points out of it is refused too. The check happens before any existence test, so nothing is revealed about
    files outside the root.

    Args:
        root: The allowed root; ``None`` means path requests are disabled.
        requested: The path from the request.
        check_name: Checks the name of what is actually read (after links): videos by default.

    Returns:
        The resolved (symlink-free) path of an existing non-directory under ``root``.

    Raises:
        ServingError: 403 (disabled, ``..``, outside the root), 404 (does not exist), 422 (not a string, empty,
            NUL byte, a directory), 415 (not an accepted extension).
    """
    if root is None:
        raise ServingError(403, "paths_disabled", "this server does not accept file paths; upload the file instead")
    if not isinstance(requested, str) or not requested.strip():
        raise ServingError(422, "invalid_path", f"path must be a non-empty string, got {requested!r:.80}")
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
    check_name(real.name)  # the extension of what is actually read, not of a link's name
    return real


# --- bodies ----------------------------------------------------------------------------------------------------------


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
    while streaming (chunked uploads), so an oversized body is never read (or spooled to disk) in full.

    Raises:
        ServingError: 413 (from this call or while the body is read), 400 for an invalid ``Content-Length``.
    """
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ServingError(400, "bad_request", f"invalid Content-Length {length!r:.40}") from None
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


class _BigInt:
    """Stands in for a JSON integer with too many digits (parsed as text length only, never as a number)."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits


def _child(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return key if path == "body" else f"{path}.{key}"


def parse_json(data: bytes | str, field: str, limits: ServingLimits) -> Any:
    """Parse untrusted JSON (a body, or a JSON form field) with its depth and integer sizes capped.

    Blocking and CPU-bound for large inputs: run it in the work pool (:func:`read_json` does).

    Args:
        data: The JSON text (UTF-8 bytes or a string).
        field: What it is, for messages (``body``, ``clips``, ``detections``).
        limits: ``max_json_depth`` and ``max_json_int_digits``.

    Raises:
        ServingError: 400 naming the field (and the key path inside it) for text that is not UTF-8 or not JSON
            (``invalid_json``), nesting deeper than the limit (``json_too_deep``), or an integer with more digits
            than the limit (``number_too_large``).
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ServingError(400, "invalid_json", f"{field}: not UTF-8 text: {exc}") from None
    digits = limits.max_json_int_digits

    def parse_int(text: str) -> int | _BigInt:
        length = len(text) - text.startswith("-")
        return _BigInt(length) if length > digits else int(text)

    try:
        value = json.loads(data, parse_int=parse_int)
    except RecursionError:
        raise ServingError(
            400, "json_too_deep", f"{field}: nested deeper than {limits.max_json_depth} levels"
        ) from None
    except ValueError as exc:  # JSONDecodeError, and anything else the parser refuses
        raise ServingError(400, "invalid_json", f"{field}: not valid JSON: {str(exc)[:200]}") from None
    stack: list[tuple[Any, str, int]] = [(value, field, 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, _BigInt):
            raise ServingError(
                400, "number_too_large", f"{path}: an integer of {node.digits} digits (the limit is {digits})"
            )
        if isinstance(node, (dict, list)):
            if depth >= limits.max_json_depth:
                raise ServingError(400, "json_too_deep", f"{path}: nested deeper than {limits.max_json_depth} levels")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((child, _child(path, key), depth + 1) for key, child in items)
    return value


async def read_json(request: Request, limits: ServingLimits, pool: WorkPool) -> Any:
    """The request's JSON body: at most ``max_json_bytes`` (checked before reading), parsed in the work pool.

    Raises:
        ServingError: 413 over the cap, 422 empty body, 400 as :func:`parse_json`, 503 when the pool is full.
    """
    body = await limit_body(request, limits.max_json_bytes).body()
    if not body:
        raise ServingError(422, "missing_body", "the JSON body is empty")
    return await pool.run(parse_json, body, "body", limits)


async def read_form(request: Request, limits: ServingLimits, max_files: int):
    """The request's multipart form, its body capped at ``max_upload_bytes`` and each text field at
    ``max_json_bytes``.

    Raises:
        ServingError: 413 over a cap or with too many parts, 400 for malformed multipart.
    """
    limited = limit_body(request, limits.max_upload_bytes + MULTIPART_SLACK_BYTES)
    try:
        return await limited.form(
            max_files=max_files, max_fields=4 * limits.max_batch_clips + 8, max_part_size=limits.max_json_bytes
        )
    except StarletteHTTPException as exc:  # malformed multipart, too many parts, a field over the cap
        detail = str(exc.detail)
        status = 413 if ("Too many" in detail or "exceeded maximum size" in detail) else 400
        raise ServingError(status, "invalid_multipart", detail) from None


def media_type(request: Request) -> str:
    """The request's content type, lower case, without parameters."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def validation_message(exc: ValidationError) -> str:
    """A pydantic validation error as ``field: problem; ...``."""
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "body"
        problems.append(f"{where}: {'missing field' if error['type'] == 'missing' else error['msg']}")
    return "; ".join(problems)


def unsupported(kind: str, expected: str) -> ServingError:
    return ServingError(415, "unsupported_media_type", f"content type {kind or '<none>'!r}: {expected}")


# --- clips: /predict and /batch_predict -------------------------------------------------------------------------------


@dataclass
class ClipJob:
    """One clip of a request: its media and window, or the error that already sank it."""

    media: Media | None = None
    window: Window | None = None
    error: ServingError | None = None


@dataclass
class ParsedRequest:
    """The clip jobs of a request and the temporary upload copies to delete when it is done."""

    jobs: list[ClipJob]
    temporary: list[str] = field(default_factory=list)

    def cleanup(self) -> None:
        for path in self.temporary:
            Path(path).unlink(missing_ok=True)


def _path_job(limits: ServingLimits, clip: PathClip) -> ClipJob:
    try:
        path = resolve_allowed_path(limits.allowed_root, clip.path)
        return ClipJob(Media(str(path), clip.path), parse_window(clip.start_s, clip.end_s))
    except ServingError as error:
        return ClipJob(error=error)


async def save_upload(
    upload: UploadFile, limits: ServingLimits, pool: WorkPool, budget: list[int], parsed: ParsedRequest
) -> Media:
    suffix = check_video_name(upload.filename, upload.content_type)
    handle, path = tempfile.mkstemp(prefix="opsvlm-upload-", suffix=suffix)
    os.close(handle)
    parsed.temporary.append(path)
    size = await pool.run(copy_limited, upload.file, path, budget[0], upload.filename)
    budget[0] -= size
    if size == 0:  # caught here to name the upload; the decoder would say "empty file" about a temp path
        raise ServingError(422, "empty_file", f"{upload.filename}: the upload is empty (0 bytes)")
    return Media(path, upload.filename or "upload", uploaded=True)


def validated(model: Any, data: Any, field_name: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        prefix = f"{field_name}: " if field_name else ""
        raise ServingError(422, "invalid_request", prefix + validation_message(exc)) from None


async def parse_predict(request: Request, limits: ServingLimits, pool: WorkPool) -> ParsedRequest:
    """``POST /predict`` -> one clip job (errors raise: a single clip's error is the whole answer)."""
    parsed = ParsedRequest([])
    try:
        kind = media_type(request)
        if kind == "application/json":
            clip = validated(PathClip, await read_json(request, limits, pool))
            job = _path_job(limits, clip)
            if job.error is not None:
                raise job.error
            parsed.jobs.append(job)
        elif kind == "multipart/form-data":
            form = await read_form(request, limits, max_files=1)
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ServingError(422, "missing_file", "multipart request needs a 'file' part with the video")
            window = parse_window(form.get("start_s"), form.get("end_s"))
            media = await save_upload(upload, limits, pool, [limits.max_upload_bytes], parsed)
            parsed.jobs.append(ClipJob(media, window))
        else:
            raise unsupported(kind, "send multipart/form-data with a 'file' part, or application/json naming a path")
    except BaseException:
        parsed.cleanup()
        raise
    return parsed


def _too_many_clips(count: int, limits: ServingLimits) -> ServingError:
    return ServingError(413, "too_many_clips", f"{count} clips; the limit is {limits.max_batch_clips}")


async def parse_batch(request: Request, limits: ServingLimits, pool: WorkPool) -> ParsedRequest:
    """``POST /batch_predict`` -> clip jobs; problems of one clip (bad path or window) stay with that clip."""
    parsed = ParsedRequest([])
    try:
        kind = media_type(request)
        if kind == "application/json":
            data = await read_json(request, limits, pool)
            clips = data.get("clips") if isinstance(data, dict) else None
            if isinstance(clips, list) and len(clips) > limits.max_batch_clips:
                raise _too_many_clips(len(clips), limits)
            batch = validated(PathBatch, data)
            if not batch.clips:
                raise ServingError(422, "invalid_request", "clips: at least one clip is needed")
            parsed.jobs.extend(_path_job(limits, clip) for clip in batch.clips)
        elif kind == "multipart/form-data":
            form = await read_form(request, limits, max_files=limits.max_batch_clips)
            uploads = [u for key in ("files", "file") for u in form.getlist(key) if isinstance(u, UploadFile)]
            if not uploads:
                raise ServingError(422, "missing_file", "multipart batch needs one or more 'files' parts")
            budget = [limits.max_upload_bytes]
            media = [await save_upload(upload, limits, pool, budget, parsed) for upload in uploads]
            clips_field = form.get("clips")
            if clips_field is None:
                specs = [UploadClip(file=i) for i in range(len(media))]
            else:
                if not isinstance(clips_field, str):
                    raise ServingError(422, "invalid_request", "clips must be a text field holding a JSON list")
                raw = await pool.run(parse_json, clips_field, "clips", limits)
                if not isinstance(raw, list) or not raw:
                    raise ServingError(422, "invalid_request", "clips must be a non-empty JSON list")
                if len(raw) > limits.max_batch_clips:
                    raise _too_many_clips(len(raw), limits)
                specs = [validated(UploadClip, item, f"clips[{i}]") for i, item in enumerate(raw)]
            for spec in specs:
                if not 0 <= spec.file < len(media):
                    error = ServingError(422, "invalid_request", f"file index {spec.file} out of range")
                    parsed.jobs.append(ClipJob(error=error))
                    continue
                try:
                    parsed.jobs.append(ClipJob(media[spec.file], parse_window(spec.start_s, spec.end_s)))
                except ServingError as error:
                    parsed.jobs.append(ClipJob(error=error))
        else:
            raise unsupported(
                kind, "send multipart/form-data with 'files' parts, or application/json with a 'clips' list"
            )
    except BaseException:
        parsed.cleanup()
        raise
    return parsed


# --- objects: /predict_objects ----------------------------------------------------------------------------------------


@dataclass
class ObjectsRequest:
    """An image to decode and its (not yet validated) stage-1 detections.

    Attributes:
        name: The client's file name or requested path (for messages).
        data: The image file's bytes.
        detections: The detections as sent (a list, after JSON parsing).
    """

    name: str
    data: bytes
    detections: Any


def _read_file(path: Path, max_bytes: int, name: str) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ServingError(413, "file_too_large", f"{name!r} is over {max_bytes} bytes")
    return data


async def parse_objects_request(request: Request, limits: ServingLimits, pool: WorkPool) -> ObjectsRequest:
    """``POST /predict_objects`` -> the image's bytes and its detections (errors raise).

    JSON bodies name an image under the allowed root (``{"path", "detections"}``); multipart bodies carry a
    ``file`` part and a ``detections`` JSON text field.
    """
    kind = media_type(request)
    if kind == "application/json":
        data = await read_json(request, limits, pool)
        raw = data.get("detections") if isinstance(data, dict) else None
        _check_detection_count(raw, limits)
        body = validated(PathObjects, data)
        path = resolve_allowed_path(limits.allowed_root, body.path, lambda name: check_image_name(name, limits))
        image = await pool.run(_read_file, path, limits.max_upload_bytes, body.path)
        return ObjectsRequest(body.path, image, body.detections)
    if kind == "multipart/form-data":
        form = await read_form(request, limits, max_files=1)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ServingError(422, "missing_file", "multipart request needs a 'file' part with the image")
        name = upload.filename or "upload"
        check_image_name(name, limits)
        raw = form.get("detections")
        if isinstance(raw, str):
            raw = await pool.run(parse_json, raw, "detections", limits)
        elif raw is not None:
            raise ServingError(422, "invalid_detections", "detections must be a text field holding a JSON list")
        _check_detection_count(raw, limits)
        return ObjectsRequest(name, await upload.read(), raw)
    raise unsupported(kind, "send multipart/form-data with 'file' and 'detections', or application/json naming a path")


def _check_detection_count(raw: Any, limits: ServingLimits) -> None:
    if isinstance(raw, list) and len(raw) > limits.max_detections:
        raise ServingError(
            413, "too_many_detections", f"detections: {len(raw)} objects; the limit is {limits.max_detections}"
        )
