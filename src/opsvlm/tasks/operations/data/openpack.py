"""Read (and write) sessions in the real OpenPack layout.

A dataset root holds one folder per subject (worker)::

    <root>/<subject>/annotation/openpack-operations/<session>.csv
    <root>/<subject>/kinect/color-masked/frames/<session>/YYYY/MM/DD/HH/MM/YYYYMMDD_HHMMSS_mmm.jpg   (real RGB)
    <root>/<subject>/kinect/color-masked/video/<session>.mp4                                       (or a video)

The operations CSV has one row per operation (uuid, user, session, box, id, operation, start, end, actions) with
ISO-8601 times carrying a UTC offset. A session's time origin (t = 0 s) is the start of its first annotated row;
every time inside opsvlm is seconds from that origin. A video file's first frame is at t = 0; JPEG frames are
placed by the capture time in their names (local time, in the annotation's offset).
"""

from __future__ import annotations

import csv
import datetime as dt
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from opsvlm.tasks.operations.labels import NULL, operation_by_id
from opsvlm.video.frames import FRAME_NAME_FORMAT, frame_name, frame_time_from_name, list_frames

__all__ = [
    "CSV_COLUMNS",
    "FRAME_NAME_FORMAT",
    "VIDEO_SUFFIXES",
    "AnnotationError",
    "Segment",
    "SessionSource",
    "SessionTimeline",
    "annotation_path",
    "discover_sessions",
    "find_media",
    "frame_name",
    "frame_time_from_name",
    "frames_dir",
    "label_at",
    "list_frames",
    "read_operations_csv",
    "video_path",
    "write_operations_csv",
]

CSV_COLUMNS = ("uuid", "user", "session", "box", "id", "operation", "start", "end", "actions")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv")
# Contiguous rows in real OpenPack annotations share their boundary exactly; allow float rounding only.
_OVERLAP_TOLERANCE_S = 1e-3


class AnnotationError(ValueError):
    """An annotation file that cannot be read exactly; the message names the file and line."""


@dataclass(frozen=True)
class Segment:
    """One annotated operation inside a session.

    Attributes:
        op_id: OpenPack operation id (see ``opsvlm.tasks.operations``).
        start_s: Start, in seconds from the session origin.
        end_s: End, in seconds from the session origin (> ``start_s``).
        box: The box number the row belongs to (``None`` when the CSV leaves it empty).
        uuid: The row's uuid (generated when writing synthetic sessions).
    """

    op_id: int
    start_s: float
    end_s: float
    box: int | None = None
    uuid: str = ""

    @property
    def name(self) -> str:
        return operation_by_id(self.op_id).name

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class SessionTimeline:
    """The ordered operation segments of one recorded session.

    Attributes:
        subject: Worker id, e.g. ``U0209``.
        session: Session id, e.g. ``S0500``.
        origin: Absolute time of t = 0 (start of the first annotated row), timezone-aware.
        segments: Annotated rows in time order. Time between rows is not annotated and counts as Null.
        source: Path of the CSV the timeline was read from ("" when built in memory).
    """

    subject: str
    session: str
    origin: dt.datetime
    segments: tuple[Segment, ...]
    source: str = ""

    @property
    def duration_s(self) -> float:
        return self.segments[-1].end_s if self.segments else 0.0

    def seconds_since_origin(self, when: dt.datetime) -> float:
        """Seconds from the origin to ``when``; naive times are taken in the origin's UTC offset."""
        if when.tzinfo is None:
            when = when.replace(tzinfo=self.origin.tzinfo)
        return (when - self.origin).total_seconds()


def _parse_time(text: str, where: str, field: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise AnnotationError(f"{where}: field '{field}' is not an ISO-8601 time: {text!r}") from None
    if value.tzinfo is None:
        raise AnnotationError(f"{where}: field '{field}' has no UTC offset: {text!r}")
    return value


def read_operations_csv(path: str | Path) -> SessionTimeline:
    """Read one OpenPack ``openpack-operations/<session>.csv`` file exactly.

    Every row becomes one segment; nothing is merged or dropped. Rows are sorted by start time.

    Args:
        path: The CSV file.

    Returns:
        The session timeline, times relative to the first row's start.

    Raises:
        AnnotationError: naming the file, line and field, for a missing column, an unparsable time, an unknown
            operation id, an id that disagrees with the operation name, end <= start, overlapping rows, mixed
            users/sessions, or a file without rows.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise AnnotationError(f"{path}: missing column(s) {missing}; expected {list(CSV_COLUMNS)}")
        raw = []
        for line_no, row in enumerate(reader, start=2):
            where = f"{path}:{line_no}"
            try:
                op = operation_by_id(int(row["id"]))
            except (KeyError, ValueError):
                raise AnnotationError(f"{where}: field 'id' is not an OpenPack operation id: {row['id']!r}") from None
            if row["operation"] and row["operation"] != op.name:
                raise AnnotationError(
                    f"{where}: id {op.id} is '{op.name}' but field 'operation' says {row['operation']!r}"
                )
            start = _parse_time(row["start"], where, "start")
            end = _parse_time(row["end"], where, "end")
            if end <= start:
                raise AnnotationError(f"{where}: end {row['end']} is not after start {row['start']}")
            box_text = (row["box"] or "").strip()
            try:
                box = int(float(box_text)) if box_text else None
            except ValueError:
                raise AnnotationError(f"{where}: field 'box' is not a number: {box_text!r}") from None
            raw.append((start, end, op.id, box, row["uuid"], row["user"], row["session"], where))
    if not raw:
        raise AnnotationError(f"{path}: no annotation rows")
    users = {r[5] for r in raw}
    sessions = {r[6] for r in raw}
    if len(users) != 1 or len(sessions) != 1:
        raise AnnotationError(f"{path}: rows mix users {sorted(users)} / sessions {sorted(sessions)}")
    raw.sort(key=lambda r: r[0])
    origin = raw[0][0]
    segments = []
    for i, (start, end, op_id, box, row_uuid, _, _, where) in enumerate(raw):
        if i and (start - raw[i - 1][1]).total_seconds() < -_OVERLAP_TOLERANCE_S:
            raise AnnotationError(f"{where}: row overlaps the previous one ({raw[i - 1][7]})")
        segments.append(Segment(op_id, (start - origin).total_seconds(), (end - origin).total_seconds(), box, row_uuid))
    return SessionTimeline(users.pop(), sessions.pop(), origin, tuple(segments), str(path))


def write_operations_csv(path: str | Path, timeline: SessionTimeline) -> Path:
    """Write a timeline as an OpenPack operations CSV (same schema and time format as the real files).

    Rows without a uuid get a deterministic one derived from subject, session and row index.

    Args:
        path: Destination CSV; parent folders are created.
        timeline: The session to write.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for i, seg in enumerate(timeline.segments):
            row_uuid = (
                seg.uuid or f"op:{uuidlib.uuid5(uuidlib.NAMESPACE_URL, f'{timeline.subject}/{timeline.session}/{i}')}"
            )
            start = timeline.origin + dt.timedelta(seconds=seg.start_s)
            end = timeline.origin + dt.timedelta(seconds=seg.end_s)
            writer.writerow(
                [
                    row_uuid,
                    timeline.subject,
                    timeline.session,
                    "" if seg.box is None else seg.box,
                    seg.op_id,
                    seg.name,
                    start.isoformat(sep=" ", timespec="microseconds"),
                    end.isoformat(sep=" ", timespec="microseconds"),
                    "",
                ]
            )
    return path


@dataclass(frozen=True)
class SessionSource:
    """Where one session's annotation and media live.

    Attributes:
        subject: Worker id.
        session: Session id.
        annotation: Path of the operations CSV.
        media: Path of the video file or of the session's JPEG frames folder; ``None`` when there is none.
        media_kind: ``"video"``, ``"frames"`` or ``"none"``.
    """

    subject: str
    session: str
    annotation: str
    media: str | None
    media_kind: str


def annotation_path(root: str | Path, subject: str, session: str) -> Path:
    return Path(root) / subject / "annotation" / "openpack-operations" / f"{session}.csv"


def frames_dir(root: str | Path, subject: str, session: str) -> Path:
    return Path(root) / subject / "kinect" / "color-masked" / "frames" / session


def video_path(root: str | Path, subject: str, session: str, suffix: str = ".mp4") -> Path:
    return Path(root) / subject / "kinect" / "color-masked" / "video" / f"{session}{suffix}"


def find_media(root: str | Path, subject: str, session: str) -> tuple[str | None, str]:
    """Locate a session's media: a video file named ``<session>.<mp4|avi|mov|mkv>`` anywhere under the subject's
    folder (the ``kinect/color-masked/video`` folder first), else the OpenPack JPEG frames folder.

    Returns:
        ``(path, kind)`` with kind ``"video"``, ``"frames"`` or ``"none"``.
    """
    for suffix in VIDEO_SUFFIXES:
        candidate = video_path(root, subject, session, suffix)
        if candidate.is_file():
            return str(candidate), "video"
    subject_dir = Path(root) / subject
    for candidate in sorted(subject_dir.rglob(f"{session}.*")):
        if candidate.suffix.lower() in VIDEO_SUFFIXES and candidate.is_file():
            return str(candidate), "video"
    frames = frames_dir(root, subject, session)
    if frames.is_dir() and any(frames.rglob("*.jpg")):
        return str(frames), "frames"
    return None, "none"


def discover_sessions(root: str | Path) -> list[SessionSource]:
    """Find every session under an OpenPack-layout root, sorted by (subject, session).

    Raises:
        FileNotFoundError: if ``root`` does not exist or holds no operations CSV.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    sources = []
    for csv_path in sorted(root.glob("*/annotation/openpack-operations/*.csv")):
        subject = csv_path.parents[2].name
        session = csv_path.stem
        media, kind = find_media(root, subject, session)
        sources.append(SessionSource(subject, session, str(csv_path), media, kind))
    if not sources:
        raise FileNotFoundError(f"{root}: no <subject>/annotation/openpack-operations/<session>.csv files")
    return sources


def label_at(timeline: SessionTimeline, t: float) -> int:
    """The operation id annotated at time ``t`` (Null where no row covers it)."""
    for seg in timeline.segments:
        if seg.start_s <= t < seg.end_s:
            return seg.op_id
    return NULL.id
