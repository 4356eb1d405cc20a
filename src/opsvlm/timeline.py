"""Whole-recording annotation without Ray: recordings, their windows, one recording's timeline.

A *recording* is a session in the OpenPack layout (a video file or JPEG frames, with its operations CSV as truth) or
any video file ``/predict`` accepts (no truth). Its media is decoded once (``opsvlm.video.decode``: a decoder process
with a deadline, each frame read once however many windows overlap it), cut into windows of the model's clip length
slid with a stride, and predicted in batches with the model's own ``SamplingSpec`` (``opsvlm.inference.Predictor``).
The task's timeline support (``opsvlm.tasks.operations.timeline``) fuses, decodes and scores.

:func:`timeline_of_video` is the single-video path the ``/timeline`` endpoint calls; the batch job
(``opsvlm.annotate``) runs the same windows and the same pure code over many recordings with Ray Data.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opsvlm.tasks.operations.data.clips import ClipConfig, window_starts
from opsvlm.tasks.operations.data.openpack import (
    VIDEO_SUFFIXES,
    AnnotationError,
    SessionTimeline,
    discover_sessions,
    frame_time_from_name,
    list_frames,
    read_operations_csv,
)
from opsvlm.tasks.operations.timeline import (
    Grammar,
    SessionAnnotation,
    WindowScores,
    annotate_windows,
    learn_grammar,
    procedure_grammar,
    recording_grid,
    timeline_for,
)
from opsvlm.video.decode import ClipFrames, ClipRejection, ClipWindow, decode_session_with_deadline
from opsvlm.video.sampling import SamplingSpec

DEFAULT_DEADLINE_S = 120.0
# A probe window no media reaches: the decoder rejects it after opening the media and says where the media ends.
_PROBE_START_S = 1e9
_MEDIA_END = re.compile(r"media ends at (?P<end>-?[0-9]+(?:\.[0-9]+)?) s")


class TimelineError(Exception):
    """A recording that cannot be annotated. ``reason`` is a short code (the decoder's rejection reasons,
    ``duration_too_long``, ``no_windows``, ``bad_annotation``); the message names the recording."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Recording:
    """One recording to annotate.

    Attributes:
        subject: Worker id (``""`` for a plain video file).
        session: Session id (the file name without suffix for a plain video).
        media: Video file or JPEG frames folder.
        media_kind: ``"video"`` or ``"frames"``.
        annotation: Its OpenPack operations CSV (the truth), or ``None``.
    """

    subject: str
    session: str
    media: str
    media_kind: str
    annotation: str | None = None

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.session}" if self.subject else self.session


def find_recordings(sources: Sequence[str]) -> tuple[list[Recording], list[dict]]:
    """Recordings under OpenPack-layout roots, video files, or folders of video files.

    Args:
        sources: Paths: an OpenPack-layout root (every session with media; its operations CSV is the truth), a
            video file (``.mp4/.avi/.mov/.mkv``), or a folder of video files.

    Returns:
        ``(recordings, skipped)``: skipped sessions (annotation without media) as ``{"recording", "reason",
        "detail"}``, never silently dropped.

    Raises:
        FileNotFoundError: naming the source, for a path that does not exist or holds nothing to annotate.
        ValueError: naming both, for two recordings with the same subject/session.
    """
    recordings: list[Recording] = []
    skipped: list[dict] = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            if path.suffix.lower() not in VIDEO_SUFFIXES:
                raise FileNotFoundError(f"{path}: not a video file (expected one of {', '.join(VIDEO_SUFFIXES)})")
            recordings.append(Recording("", path.stem, str(path), "video"))
        elif path.is_dir():
            if any(path.glob("*/annotation/openpack-operations/*.csv")):
                for s in discover_sessions(path):
                    if s.media is None:
                        skipped.append(
                            {
                                "recording": f"{s.subject}/{s.session}",
                                "reason": "no_media",
                                "detail": f"{s.annotation}: no video file or JPEG frames for this session",
                            }
                        )
                    else:
                        recordings.append(Recording(s.subject, s.session, s.media, s.media_kind, s.annotation))
            else:
                videos = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
                if not videos:
                    raise FileNotFoundError(
                        f"{path}: neither an OpenPack-layout root (<subject>/annotation/openpack-operations/*.csv) "
                        "nor a folder of video files"
                    )
                recordings.extend(Recording("", v.stem, str(v), "video") for v in videos)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    seen: dict[str, str] = {}
    for r in recordings:
        if r.key in seen:
            raise ValueError(f"two recordings named {r.key!r}: {seen[r.key]} and {r.media}")
        seen[r.key] = r.media
    return recordings, skipped


def truth_of(recording: Recording) -> SessionTimeline | None:
    """The recording's annotation, or ``None``.

    Raises:
        TimelineError: ``bad_annotation``, naming the file and line, when it cannot be read.
    """
    if recording.annotation is None:
        return None
    try:
        return read_operations_csv(recording.annotation)
    except (AnnotationError, OSError, UnicodeDecodeError) as exc:
        raise TimelineError("bad_annotation", str(exc)) from None


def _frames_time(recording: Recording) -> tuple[dt.datetime, float] | None:
    """First frame's capture time and the frames' span in seconds (JPEG layout only)."""
    frames = list_frames(recording.media)
    if not frames:
        return None
    first, last = frame_time_from_name(frames[0]), frame_time_from_name(frames[-1])
    span = (last - first).total_seconds()
    step = span / (len(frames) - 1) if len(frames) > 1 else 1.0 / 15.0
    return first, span + step


def origin_of(recording: Recording, truth: SessionTimeline | None) -> tuple[dt.datetime | None, float]:
    """The session origin and where the media starts in session time.

    With an annotation the origin is its first row (the OpenPack convention); JPEG frames then start at their
    capture time. Without one, frames give their first capture time as origin (local time, taken as UTC: frame names
    carry no offset) and a plain video has no origin (``None``: its seconds count from its first frame).
    """
    frames = _frames_time(recording) if recording.media_kind == "frames" else None
    if truth is not None:
        return truth.origin, truth.seconds_since_origin(frames[0]) if frames else 0.0
    if frames:
        return frames[0].replace(tzinfo=dt.UTC), 0.0
    return None, 0.0


def media_span(recording: Recording, media_start_s: float, spec: SamplingSpec, deadline_s: float) -> float:
    """Where the media ends, session seconds (its last frame's time plus one frame interval).

    Raises:
        TimelineError: with the decoder's reason (``not_a_video``, ``empty_file``, ``decode_timeout`` ...).
    """
    if recording.media_kind == "frames":
        frames = _frames_time(recording)
        if frames is None:
            raise TimelineError("no_frames", f"{recording.media}: no JPEG frames")
        return media_start_s + frames[1]
    probe = ClipWindow("probe", _PROBE_START_S, _PROBE_START_S + 1.0)
    (result,) = decode_session_with_deadline(
        recording.media, recording.media_kind, [probe], spec, deadline_s, media_start_s
    )
    if isinstance(result, ClipRejection):
        match = _MEDIA_END.search(result.detail) if result.reason == "beyond_media_end" else None
        if match is not None:
            return float(match["end"])
        raise TimelineError(result.reason, result.detail if recording.media in result.detail else
                            f"{recording.media}: {result.detail}")  # fmt: skip
    raise TimelineError("probe_failed", f"{recording.media}: the decoder accepted a window past any media's end")


def plan_windows(start_s: float, end_s: float, window_s: float, stride_s: float) -> list[tuple[float, float]]:
    """Windows over ``[start_s, end_s)``: every ``stride_s`` from the start, one more aligned to the end when the
    last does not reach it, one shorter window for media shorter than ``window_s`` (``operations.data.clips`` rules)."""
    config = ClipConfig(window_s, stride_s)
    duration = end_s - start_s
    return [
        (round(start_s + s, 6), round(start_s + min(s + window_s, duration), 6))
        for s in window_starts(duration, config)
    ]


# --- what the model brings: window length and grammar ----------------------------------------------------------------


def _train_manifest(model_dir: str | Path) -> tuple[dict | None, str]:
    """The prepared data manifest the model was trained on, or ``(None, why not)``."""
    config_path = Path(model_dir) / "train_config.json"
    try:
        prepared = json.loads(config_path.read_text())["data"]["prepared"]
        manifest = json.loads((Path(prepared) / "manifest.json").read_text())
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        return None, f"the model's training data is not readable here ({type(exc).__name__}: {exc})"
    return manifest, str(prepared)


def model_window_s(model_dir: str | Path, fallback: float = ClipConfig().length_s) -> float:
    """The clip length the model was trained on (its prepared data's ``clips.length_s``), else ``fallback``."""
    manifest, _ = _train_manifest(model_dir)
    try:
        return float(manifest["config"]["clips"]["length_s"]) if manifest else fallback
    except (KeyError, TypeError, ValueError):
        return fallback


def grammar_from_root(root: str | Path, subjects: set[str] | None = None, source: str = "") -> Grammar:
    """Learn the grammar from the sessions of an OpenPack-layout root (only ``subjects``' when given)."""
    timelines = []
    for s in discover_sessions(root):
        if subjects is None or s.subject in subjects:
            try:
                timelines.append(read_operations_csv(s.annotation))
            except (AnnotationError, OSError, UnicodeDecodeError):
                continue  # the prepare job reported it; a grammar from the readable sessions is still a grammar
    return learn_grammar(timelines, source=source or f"{root} ({len(timelines)} sessions)")


def load_grammar(spec: str, model_dir: str | Path | None = None) -> Grammar:
    """The operation grammar for annotation.

    Args:
        spec: A grammar JSON file (``Grammar.save``); a prepared data folder (learned from its training split's
            subjects); an OpenPack-layout root (learned from all its sessions); ``"procedure"`` for the procedure
            prior; or ``""``: the model's own training split (through its ``train_config.json``), else the prior.
        model_dir: The model's checkpoint (for ``""``).

    Raises:
        FileNotFoundError: naming ``spec``, when it is none of these.
    """
    if spec == "procedure":
        return procedure_grammar()
    if spec:
        path = Path(spec)
        if path.is_file():
            return Grammar.load(path)
        if (path / "manifest.json").is_file():
            manifest = json.loads((path / "manifest.json").read_text())
            subjects = set(manifest["splits"]["train"]["subjects"])
            return grammar_from_root(
                manifest["source"], subjects, f"training split of {path} ({len(subjects)} subjects)"
            )
        if path.is_dir():
            return grammar_from_root(path)
        raise FileNotFoundError(f"grammar {spec!r}: not a grammar JSON, prepared folder or OpenPack-layout root")
    if model_dir is not None:
        manifest, where = _train_manifest(model_dir)
        if manifest is not None:
            subjects = set(manifest["splits"]["train"]["subjects"])
            try:
                return grammar_from_root(
                    manifest["source"], subjects, f"the model's training split ({where}, {len(subjects)} subjects)"
                )
            except (FileNotFoundError, ValueError) as exc:
                where = f"the model's training sessions are not readable here ({exc})"
        prior = procedure_grammar()
        prior.source = f"{prior.source}: {where}"
        return prior
    return procedure_grammar()


# --- one recording -------------------------------------------------------------------------------------------------


@dataclass
class PlannedRecording:
    """A recording with its truth, origin, media span and windows (everything known before decoding)."""

    recording: Recording
    truth: SessionTimeline | None
    origin: dt.datetime | None
    media_start_s: float
    media_end_s: float
    windows: list[tuple[float, float]]

    @property
    def seconds(self) -> float:
        return self.media_end_s - self.media_start_s


def plan_recording(
    recording: Recording,
    spec: SamplingSpec,
    window_s: float,
    stride_s: float,
    deadline_s: float = DEFAULT_DEADLINE_S,
    max_duration_s: float | None = None,
) -> PlannedRecording:
    """Read the truth, find the media span and cut the windows of one recording.

    Raises:
        TimelineError: unreadable annotation or media, media longer than ``max_duration_s``
            (``duration_too_long``), or no window.
    """
    truth = truth_of(recording)
    origin, start = origin_of(recording, truth)
    end = media_span(recording, start, spec, deadline_s)
    if max_duration_s is not None and end - start > max_duration_s + 1e-9:
        raise TimelineError(
            "duration_too_long",
            f"{recording.media}: recording is {end - start:.3f} s long; the limit is {max_duration_s:g} s",
        )
    windows = plan_windows(start, end, window_s, stride_s)
    if not windows:
        raise TimelineError("no_windows", f"{recording.media}: media span {start:.3f}..{end:.3f} s holds no window")
    return PlannedRecording(recording, truth, origin, start, end, windows)


def window_row(frames: ClipFrames, start_s: float, end_s: float) -> dict[str, Any]:
    """A decoded window as a row in the prepared clip rows' pixel layout (what ``Task.input_of`` reads)."""
    pixels = np.ascontiguousarray(frames.frames)
    return {
        "frames": pixels.tobytes(),
        "frame_shape": list(pixels.shape),
        "frame_times_s": [float(t) for t in frames.frame_times_s],
        "start_s": start_s,
        "end_s": end_s,
    }


def predict_window_rows(predictor, rows: Sequence[dict[str, Any]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Predict decoded window rows in one batch; ``(scores float64[L], next_scores float64[L])`` per row."""
    support = timeline_for(predictor.task.name)
    answers = predictor.predict([predictor.task.input_of(row) for row in rows])
    out = []
    for answer in answers:
        if answer is None:  # only free generation returns unparsable answers; annotation decodes constrained
            raise RuntimeError("the predictor returned no answer for a window: annotate with constrained decoding")
        out.append(support.answer_vectors(answer))
    return out


def iter_decoded_windows(
    planned: PlannedRecording, spec: SamplingSpec, deadline_s: float = DEFAULT_DEADLINE_S
) -> Iterator[tuple[int, ClipFrames | ClipRejection]]:
    """Decode a recording once and yield ``(window index, frames or rejection)`` as windows complete."""
    clips = [ClipWindow(str(i), a, b) for i, (a, b) in enumerate(planned.windows)]
    offset = planned.media_start_s if planned.recording.media_kind == "frames" else 0.0
    for item in decode_session_with_deadline(
        planned.recording.media, planned.recording.media_kind, clips, spec, deadline_s, offset
    ):
        yield int(item.clip_id), item


def annotate_recording(
    predictor,
    planned: PlannedRecording,
    grammar: Grammar,
    *,
    window_s: float,
    stride_s: float,
    decoder: str = "viterbi",
    emission_weight: float = 1.0,
    batch_size: int = 8,
    deadline_s: float = DEFAULT_DEADLINE_S,
) -> SessionAnnotation:
    """Decode, predict, fuse, decode with the grammar: one recording's annotation, in this process.

    Decoding runs in the decoder process while this process predicts the windows already cut (the decoder works
    ahead into its shared ring), so the two overlap.

    Raises:
        TimelineError: when no window could be decoded (the decoder's reason of the first window).
    """
    spec = predictor.spec
    starts, ends, scores, following, rejected = [], [], [], [], []
    pending: list[tuple[int, dict]] = []

    def flush() -> None:
        for (index, _), (s, n) in zip(pending, predict_window_rows(predictor, [r for _, r in pending]), strict=True):
            starts.append(planned.windows[index][0])
            ends.append(planned.windows[index][1])
            scores.append(s)
            following.append(n)
        pending.clear()

    for index, item in iter_decoded_windows(planned, spec, deadline_s):
        start, end = planned.windows[index]
        if isinstance(item, ClipRejection):
            rejected.append({"start_s": start, "end_s": end, "reason": item.reason, "detail": item.detail})
            continue
        pending.append((index, window_row(item, start, end)))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    if not scores:
        first = rejected[0] if rejected else {"reason": "no_windows", "detail": "no windows"}
        raise TimelineError(first["reason"], f"{planned.recording.media}: no window decoded: {first['detail']}")
    order = np.argsort(starts, kind="stable")
    windows = WindowScores(
        np.asarray(starts)[order], np.asarray(ends)[order], np.asarray(scores)[order], np.asarray(following)[order]
    )
    return annotation_of(planned, windows, grammar, window_s, stride_s, rejected, decoder, emission_weight)


def annotation_of(
    planned: PlannedRecording,
    windows: WindowScores,
    grammar: Grammar,
    window_s: float,
    stride_s: float,
    rejected: list[dict],
    decoder: str = "viterbi",
    emission_weight: float = 1.0,
) -> SessionAnnotation:
    """The pure part on a planned recording's window scores (shared by this module and the Ray job)."""
    recording = planned.recording
    grid = recording_grid(planned.origin, planned.media_start_s, planned.media_end_s)
    return annotate_windows(
        windows,
        grid,
        grammar,
        subject=recording.subject,
        session=recording.session,
        media=recording.media,
        window_s=window_s,
        stride_s=stride_s,
        rejected=rejected,
        truth=planned.truth,
        decoder=decoder,
        emission_weight=emission_weight,
    )


def timeline_of_video(
    predictor,
    path: str | Path,
    grammar: Grammar,
    *,
    name: str | None = None,
    window_s: float | None = None,
    stride_s: float | None = None,
    decoder: str = "viterbi",
    batch_size: int = 8,
    deadline_s: float = DEFAULT_DEADLINE_S,
    max_duration_s: float | None = None,
) -> dict:
    """The timeline JSON of one video file (what ``POST /timeline`` returns).

    Args:
        predictor: A loaded ``opsvlm.inference.Predictor`` (its ``spec`` samples the windows).
        path: The video file (an upload's temporary copy, or a path under the allowed root).
        grammar: From :func:`load_grammar`.
        name: The session name in the JSON (default: the file's stem; use the client's file name for uploads).
        window_s: Window length (default 5 s, the clip length the platform trains on).
        stride_s: Window stride (default half the window).
        decoder: ``viterbi`` (grammar) or ``argmax``.
        batch_size: Windows per forward pass.
        deadline_s: Longest wait for the decoder's next window.
        max_duration_s: Refuse longer videos (``TimelineError("duration_too_long")``).

    Raises:
        TimelineError: with the decoder's reason code for media that does not decode, or ``duration_too_long``.
    """
    window_s = window_s or ClipConfig().length_s
    stride_s = stride_s or window_s / 2
    recording = Recording("", name or Path(path).stem, str(path), "video")
    planned = plan_recording(recording, predictor.spec, window_s, stride_s, deadline_s, max_duration_s)
    annotation = annotate_recording(
        predictor,
        planned,
        grammar,
        window_s=window_s,
        stride_s=stride_s,
        decoder=decoder,
        batch_size=batch_size,
        deadline_s=deadline_s,
    )
    return annotation.to_json()


__all__ = [
    "DEFAULT_DEADLINE_S",
    "PlannedRecording",
    "Recording",
    "TimelineError",
    "annotate_recording",
    "annotation_of",
    "find_recordings",
    "grammar_from_root",
    "iter_decoded_windows",
    "load_grammar",
    "media_span",
    "model_window_s",
    "origin_of",
    "plan_recording",
    "plan_windows",
    "predict_window_rows",
    "timeline_of_video",
    "truth_of",
    "window_row",
]
