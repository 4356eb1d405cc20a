"""Cut session timelines into labelled clips, and split them by subject.

A clip is a fixed-length window over a session. Its labels answer the three questions the model is trained on:

* ``dominant_operation``: the operation of the single contiguous *run* that covers most of the window. A run is a
  maximal stretch of one label: consecutive rows with the same operation merge into one run, and time no row covers
  is a Null run. Ties go to the earlier run.
* ``temporal_segment``: that run's extent inside the window, in clip-relative seconds ``(start, end)``.
* ``next_operation``: the first non-Null operation after the dominant run that differs from it. When the session
  has no further operation it is ``Null`` (nothing follows). For a Null-dominant clip it is the operation the
  worker starts next.

Edge cases, defined here once: an operation shorter than a frame interval is still a run (labels are computed on
time, not on frames); windows start at 0 s every ``stride_s``; when the last full window does not reach the end of
the session one more window is aligned to the session's end so no annotated time is left uncovered; a session
shorter than one window yields a single clip covering the session.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from opsvlm.tasks.operations.data.openpack import SessionTimeline
from opsvlm.tasks.operations.labels import NULL, operation_by_id

__all__ = [
    "SPLITS",
    "ClipConfig",
    "ClipRecord",
    "Run",
    "label_runs",
    "label_window",
    "make_clips",
    "split_subjects",
    "window_starts",
]

# Rows closer than this are treated as touching (annotation times have millisecond precision).
_TOUCH_S = 1e-3
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ClipConfig:
    """How sessions are windowed into clips.

    Attributes:
        length_s: Clip length in seconds.
        stride_s: Seconds between the starts of consecutive clips (< length_s makes clips overlap).
    """

    length_s: float = 5.0
    stride_s: float = 2.5

    def __post_init__(self) -> None:
        if not self.length_s > 0:
            raise ValueError(f"ClipConfig.length_s must be > 0, got {self.length_s}")
        if not self.stride_s > 0:
            raise ValueError(f"ClipConfig.stride_s must be > 0, got {self.stride_s}")


@dataclass(frozen=True)
class Run:
    """A maximal stretch of one label on a session timeline (seconds from the session origin)."""

    op_id: int
    start_s: float
    end_s: float


@dataclass(frozen=True)
class ClipRecord:
    """One labelled clip: where it comes from and what the model must say about it.

    Attributes:
        clip_id: ``<subject>/<session>/<index>``, unique within a dataset.
        source: Path of the session's media (video file or JPEG frames folder); "" if it has none.
        media_kind: ``"video"``, ``"frames"`` or ``"none"``.
        subject: Worker id.
        session: Session id.
        start_s: Clip start, seconds from the session origin.
        end_s: Clip end, seconds from the session origin.
        dominant_operation: Operation name covering most of the clip (may be ``Null``).
        temporal_segment: ``(start, end)`` of the dominant run inside the clip, clip-relative seconds.
        next_operation: Name of the operation that follows the dominant one (``Null`` at the end of a session).
    """

    clip_id: str
    source: str
    media_kind: str
    subject: str
    session: str
    start_s: float
    end_s: float
    dominant_operation: str
    temporal_segment: tuple[float, float]
    next_operation: str

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s

    def to_dict(self) -> dict:
        row = asdict(self)
        row["temporal_segment"] = list(self.temporal_segment)
        return row

    @classmethod
    def from_dict(cls, row: dict) -> ClipRecord:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        values["temporal_segment"] = tuple(float(x) for x in values["temporal_segment"])
        return cls(**values)


def label_runs(timeline: SessionTimeline) -> list[Run]:
    """Merge a timeline into runs: consecutive same-operation rows join, uncovered time becomes Null.

    Returns:
        Runs in time order covering ``[0, timeline.duration_s]`` without gaps.
    """
    runs: list[Run] = []
    cursor = 0.0
    for seg in timeline.segments:
        if seg.start_s - cursor > _TOUCH_S:
            runs.append(Run(NULL.id, cursor, seg.start_s))
        if runs and runs[-1].op_id == seg.op_id and seg.start_s - runs[-1].end_s <= _TOUCH_S:
            runs[-1] = Run(seg.op_id, runs[-1].start_s, max(runs[-1].end_s, seg.end_s))
        else:
            runs.append(Run(seg.op_id, seg.start_s, seg.end_s))
        cursor = max(cursor, seg.end_s)
    return runs


def window_starts(duration_s: float, config: ClipConfig) -> list[float]:
    """Start times of the clips over ``[0, duration_s]`` (see the module docstring for the edge rules)."""
    if duration_s <= 0:
        return []
    if duration_s <= config.length_s:
        return [0.0]
    count = int(np.floor((duration_s - config.length_s) / config.stride_s + 1e-9)) + 1
    starts = [round(i * config.stride_s, 6) for i in range(count)]
    if starts[-1] + config.length_s < duration_s - _TOUCH_S:
        starts.append(round(duration_s - config.length_s, 6))
    return starts


def label_window(runs: Sequence[Run], start_s: float, end_s: float) -> tuple[int, tuple[float, float], int]:
    """Labels of one window.

    Args:
        runs: Output of :func:`label_runs`.
        start_s: Window start (session seconds).
        end_s: Window end (session seconds).

    Returns:
        ``(dominant op id, (segment start, segment end) clip-relative, next op id)``.
    """
    best, best_cover = -1, 0.0
    for i, run in enumerate(runs):
        cover = min(run.end_s, end_s) - max(run.start_s, start_s)
        if cover > best_cover + 1e-9:  # strict: on a tie the earlier run stays
            best, best_cover = i, cover
    if best < 0:
        raise ValueError(f"window [{start_s}, {end_s}] does not overlap the timeline")
    dominant = runs[best]
    segment = (
        round(max(dominant.start_s, start_s) - start_s, 6),
        round(min(dominant.end_s, end_s) - start_s, 6),
    )
    next_id = NULL.id
    for run in runs[best + 1 :]:
        if run.op_id not in (NULL.id, dominant.op_id):
            next_id = run.op_id
            break
    return dominant.op_id, segment, next_id


def make_clips(
    timeline: SessionTimeline, config: ClipConfig, source: str = "", media_kind: str = "none"
) -> list[ClipRecord]:
    """All labelled clips of one session.

    Args:
        timeline: The session's annotation.
        config: Window length and stride.
        source: Media path recorded in each clip.
        media_kind: ``"video"``, ``"frames"`` or ``"none"``.

    Returns:
        Clips in time order.
    """
    runs = label_runs(timeline)
    clips = []
    for index, start in enumerate(window_starts(timeline.duration_s, config)):
        end = round(min(start + config.length_s, timeline.duration_s), 6)
        dominant, segment, next_id = label_window(runs, start, end)
        clips.append(
            ClipRecord(
                clip_id=f"{timeline.subject}/{timeline.session}/{index:05d}",
                source=source,
                media_kind=media_kind,
                subject=timeline.subject,
                session=timeline.session,
                start_s=start,
                end_s=end,
                dominant_operation=operation_by_id(dominant).name,
                temporal_segment=segment,
                next_operation=operation_by_id(next_id).name,
            )
        )
    return clips


def split_subjects(
    subjects: Iterable[str], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, str]:
    """Assign each subject to exactly one of train / val / test, reproducibly.

    Subjects are sorted, shuffled with ``seed`` and cut by ``fractions``. With three or more subjects, val and test
    each get at least one subject; with fewer, later splits stay empty (train first).

    Args:
        subjects: Subject ids (duplicates are ignored).
        fractions: Shares of (train, val, test); must sum to 1.
        seed: Shuffle seed.

    Returns:
        ``{subject: split}``.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    ordered = sorted(set(subjects))
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    n = len(shuffled)
    n_test = round(fractions[2] * n)
    n_val = round(fractions[1] * n)
    if n >= 3:
        n_test = max(n_test, 1) if fractions[2] > 0 else 0
        n_val = max(n_val, 1) if fractions[1] > 0 else 0
    n_train = max(n - n_val - n_test, min(n, 1))
    n_val = min(n_val, n - n_train)
    assignment = {}
    for i, subject in enumerate(shuffled):
        assignment[subject] = "train" if i < n_train else "val" if i < n_train + n_val else "test"
    return assignment
