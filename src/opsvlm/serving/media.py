"""Decoding what requests send: video clips under limits (in killable decoder processes), and images.

Videos: :func:`opsvlm.video.decode.decode_session_with_deadline` (a separate decoder process, so a hang can be
killed) with the model's own :class:`SamplingSpec`, exactly as training sampled frames. A clip without an end needs
the video's duration first; the decoder has no probe call, so it is asked for a window far beyond any video: the
rejection reports where the media ends (one extra round trip to an already running decoder process, no frames
decoded).

Images: Pillow, restricted to the accepted formats (:attr:`ServingLimits.image_formats`): a TIFF or PSD file named
``.jpg`` is refused by its content, and the pixel count is checked from the header before any pixels are decoded.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from opsvlm.serving.errors import ServingError
from opsvlm.serving.limits import ServingLimits
from opsvlm.video.decode import ClipFrames, ClipRejection, ClipWindow, decode_session_with_deadline
from opsvlm.video.sampling import SamplingSpec

__all__ = [
    "REJECTION_STATUS",
    "DecodedClip",
    "Media",
    "Window",
    "decode_image",
    "decode_media",
    "decode_media_bytes",
    "media_duration",
]

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


@dataclass(frozen=True)
class Window:
    """A clip window in video seconds; ``end_s=None`` means the end of the video."""

    start_s: float = 0.0
    end_s: float | None = None


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
    """Decode and sample clips of one video (one decoder pass for all windows), within the limits. Blocking.

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
    """:func:`decode_media` for an upload that arrived as bytes (a decoder replica on another machine). Blocking."""
    suffix = PurePosixPath(name).suffix.lower() or ".mp4"
    handle, path = tempfile.mkstemp(prefix="opsvlm-upload-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        return decode_media(Media(path, name, uploaded=True), windows, spec, limits)
    finally:
        Path(path).unlink(missing_ok=True)


# Signatures of image formats that are refused whatever the file is called (named here only to say which it is).
_REFUSED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"8BPS", "PSD"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"BM", "BMP"),
)


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((kind for signature, kind in _REFUSED_SIGNATURES if data.startswith(signature)), None)


def decode_image(data: bytes, name: str, limits: ServingLimits) -> np.ndarray:
    """Decode image bytes of an accepted format. Blocking.

    Args:
        data: The file's bytes.
        name: Its name, for messages (its suffix was checked by the request parser).
        limits: ``image_formats`` and ``max_image_pixels``.

    Returns:
        uint8[H, W, 3] RGB.

    Raises:
        ServingError: 422 for empty bytes or bytes that are not a (complete) image, 415 for an image of a format
            that is not accepted (whatever its name), 413 for more than ``max_image_pixels`` pixels.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ServingError(422, "empty_image", f"{name!r} is empty")
    accepted = list(limits.image_formats)
    try:
        with Image.open(io.BytesIO(data), formats=accepted) as image:
            if image.width * image.height > limits.max_image_pixels:
                raise ServingError(
                    413,
                    "image_too_large",
                    f"{name!r} has {image.width}x{image.height} pixels (limit {limits.max_image_pixels})",
                )
            return np.asarray(image.convert("RGB"))
    except ServingError:
        raise
    except Image.DecompressionBombError as exc:
        raise ServingError(413, "image_too_large", f"{name!r}: {exc}") from None
    except UnidentifiedImageError:
        kind = _sniff(data)
        if kind is not None and kind not in accepted:
            raise ServingError(
                415,
                "unsupported_image_format",
                f"{name!r} is a {kind} image; accepted formats: {', '.join(accepted)}",
            ) from None
        raise ServingError(422, "undecodable_image", f"{name!r} is not a readable {'/'.join(accepted)} image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ServingError(422, "undecodable_image", f"{name!r} is not a readable image: {exc}") from None
