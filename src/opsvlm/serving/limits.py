"""What a request may ask of the server: sizes, durations, counts, deadlines, accepted formats.

:class:`ServingLimits` is one section of the Serve app's config (:class:`opsvlm.serving.config.ServeAppConfig`,
loaded with :mod:`opsvlm.config`); every default lives here and nowhere else.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "IMAGE_FORMAT_SUFFIXES",
    "VIDEO_CONTENT_TYPES",
    "VIDEO_EXTENSIONS",
    "ImageFormat",
    "ServingLimits",
]

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

ImageFormat = Literal["JPEG", "PNG", "BMP", "WEBP"]
# The file names each accepted image format may have (Pillow format name -> suffixes).
IMAGE_FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"),
    "PNG": (".png",),
    "BMP": (".bmp",),
    "WEBP": (".webp",),
}


@dataclass(frozen=True)
class ServingLimits:
    """Input limits, deadlines and the bounded work pool of the HTTP API.

    Attributes:
        max_upload_bytes: Largest multipart upload, bytes (for ``/batch_predict``: all files together).
        max_json_bytes: Largest JSON body, bytes: refused from ``Content-Length`` before anything is read.
        max_json_depth: Deepest nesting of arrays/objects in a JSON body or JSON form field.
        max_json_int_digits: Most digits of an integer in JSON (a 5,000-digit number is refused, not parsed).
        max_duration_s: Longest clip, seconds: the window if one is given, else the whole video.
        decode_deadline_s: Longest wait for the decoder (opening the media, then each clip); a hung decode gets 504.
        request_deadline_s: Total time one request may take, body upload included: a body not received by then gets
            408, work not done by then 503 (``Retry-After``).
        allowed_root: Directory path requests may read under; ``None`` disables path requests.
        max_batch_clips: Most clips in one ``/batch_predict`` request.
        max_detections: Most detections in one ``/predict_objects`` request (413 beyond).
        max_image_pixels: Largest image, width x height, checked from the header before its pixels are decoded.
        image_formats: Image formats accepted (Pillow names); any other (TIFF, PSD, GIF, ...) gets 415, whatever the
            file is called.
        max_inflight_requests: Most prediction requests at work at once in one server (ingress replica); more get
            503 (``Retry-After``) before their body is read.
        work_threads: Threads of the bounded pool that decodes, copies uploads and parses JSON off the event loop.
        max_pending_work: Most tasks admitted to that pool (running and waiting); beyond, requests get 503.
        retry_after_s: ``Retry-After`` of the 503s this server sheds load with.
        max_timeline_duration_s: Longest video ``/timeline`` annotates, seconds (default 30 minutes: a packing
            session's recording is split into files of about this length; at the batch job's 20x real time on the
            tiny model that is 90 s of work, a few minutes on a GPU with the full model).
        max_timeline_upload_bytes: Largest ``/timeline`` upload, bytes (default 512 MiB: 30 minutes of 224 px 15 fps
            H.264 with room to spare); path requests are not capped by size, only by duration.
        timeline_deadline_s: Total time one ``/timeline`` request may take, upload included (default 15 minutes);
            past it the work stops at the next batch of windows and the answer is 503 (408 if the upload was still
            arriving).
        max_inflight_timelines: Most ``/timeline`` requests at work at once in one server (each holds a work-pool
            thread for its whole decode); more get 503 at once. Capped at ``work_threads - 1`` (when that is at
            least 1) so that clip and image requests always find a thread.
    """

    max_upload_bytes: int = 64 * 1024 * 1024
    max_json_bytes: int = 1024 * 1024
    max_json_depth: int = 32
    max_json_int_digits: int = 32
    max_duration_s: float = 120.0
    decode_deadline_s: float = 30.0
    request_deadline_s: float = 60.0
    allowed_root: str | None = None
    max_batch_clips: int = 16
    max_detections: int = 32
    max_image_pixels: int = 64_000_000
    image_formats: tuple[ImageFormat, ...] = ("JPEG", "PNG", "BMP", "WEBP")
    max_inflight_requests: int = 32
    work_threads: int = 6
    max_pending_work: int = 64
    retry_after_s: float = 2.0
    max_timeline_duration_s: float = 1800.0
    max_timeline_upload_bytes: int = 512 * 1024 * 1024
    timeline_deadline_s: float = 900.0
    max_inflight_timelines: int = 2

    def __post_init__(self) -> None:
        for name in (
            "max_upload_bytes",
            "max_json_bytes",
            "max_json_depth",
            "max_json_int_digits",
            "max_batch_clips",
            "max_detections",
            "max_image_pixels",
            "max_inflight_requests",
            "work_threads",
            "max_pending_work",
            "max_timeline_upload_bytes",
            "max_inflight_timelines",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_duration_s",
            "decode_deadline_s",
            "request_deadline_s",
            "retry_after_s",
            "max_timeline_duration_s",
            "timeline_deadline_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.request_deadline_s < self.decode_deadline_s:
            raise ValueError(
                f"request_deadline_s ({self.request_deadline_s:g}) must be >= decode_deadline_s "
                f"({self.decode_deadline_s:g}): a slow decode would always end as a 503"
            )
        if self.timeline_deadline_s < self.decode_deadline_s:
            raise ValueError(
                f"timeline_deadline_s ({self.timeline_deadline_s:g}) must be >= decode_deadline_s "
                f"({self.decode_deadline_s:g})"
            )
        known = typing.get_args(ImageFormat)
        if not self.image_formats or any(f not in known for f in self.image_formats):
            raise ValueError(f"image_formats must be a non-empty subset of {list(known)}, got {self.image_formats}")
        if self.allowed_root is not None and not Path(self.allowed_root).is_dir():
            raise ValueError(f"allowed_root {self.allowed_root!r} is not a directory")

    @property
    def image_suffixes(self) -> tuple[str, ...]:
        """File name suffixes of the accepted image formats."""
        return tuple(s for f in self.image_formats for s in IMAGE_FORMAT_SUFFIXES[f])

    def describe(self, show_paths: bool = False) -> dict[str, Any]:
        """The limits for ``/status``; ``allowed_root`` only as "set or not" unless ``show_paths``."""
        described = asdict(self)
        described["image_formats"] = list(self.image_formats)
        if not show_paths and self.allowed_root is not None:
            described["allowed_root"] = "<set>"
        return described
