"""The 1 Hz grid of a session and OpenPack's per-second labels. Pure numpy.

OpenPack scores operations second by second on whole unix seconds (``openpack-operations-1hz``): the row at unix
second ``u`` (milliseconds in the file) carries the operation of the latest annotation row that started before
``u + 1`` s; time between rows keeps the previous operation (checked against the real ``U0209/S0500`` files by a
unit test). A session's time origin (t = 0) is its first annotation row's start (``operations.data.openpack``), which
rarely falls on a whole second, so cell ``k`` of the grid covers session time ``[k - frac, k + 1 - frac)`` where
``frac`` is the origin's fraction of a second. For a recording without annotation the origin is its first frame and
``frac`` is 0.

Labels are indices into :data:`LABELS` (the task's label order: the 10 operations, then Null).
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from dataclasses import dataclass

import numpy as np

from opsvlm.tasks.operations.data.openpack import SessionTimeline
from opsvlm.tasks.operations.labels import ALL_LABELS, LABEL_NAMES, NULL

LABELS: tuple[str, ...] = LABEL_NAMES
OP_IDS: tuple[int, ...] = tuple(op.id for op in ALL_LABELS)
NULL_INDEX: int = LABELS.index(NULL.name)
INDEX_OF_ID: dict[int, int] = {op_id: i for i, op_id in enumerate(OP_IDS)}
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class SecondGrid:
    """The 1 Hz cells of a recording.

    Attributes:
        origin: Absolute time of session t = 0 (timezone-aware).
        count: Number of cells.
        frac_s: Fraction of a second of the origin past its whole unix second.
        first: Index of the first cell: cell ``k`` covers session time ``[k - frac_s, k + 1 - frac_s)`` (negative
            for media that starts before the origin, e.g. frames recorded before the first annotated row).
    """

    origin: dt.datetime
    count: int
    frac_s: float = 0.0
    first: int = 0

    @classmethod
    def covering(cls, origin: dt.datetime, start_s: float, end_s: float) -> SecondGrid:
        """The cells that overlap session time ``[start_s, end_s)``.

        Args:
            origin: Session origin (timezone-aware).
            start_s: Where the media starts, session seconds.
            end_s: Where the media ends, session seconds.
        """
        if origin.tzinfo is None:
            raise ValueError(f"the session origin must be timezone-aware, got {origin!r}")
        unix = (origin - EPOCH).total_seconds()
        frac = round(unix - math.floor(unix), 6) % 1.0
        first = math.floor(start_s + frac + 1e-6)
        stop = math.ceil(end_s + frac - 1e-6)
        return cls(origin, max(0, stop - first), frac, first)

    @property
    def starts_s(self) -> np.ndarray:
        """float64[count]: session time where each cell starts."""
        return self.first + np.arange(self.count, dtype=np.float64) - self.frac_s

    @property
    def unixtime_ms(self) -> np.ndarray:
        """int64[count]: each cell's whole unix second in milliseconds (the 1 Hz files' ``unixtime``)."""
        whole = math.floor((self.origin - EPOCH).total_seconds() + 1e-9)
        return (whole + self.first + np.arange(self.count, dtype=np.int64)) * 1000

    def absolute(self, session_s: float) -> dt.datetime:
        return self.origin + dt.timedelta(seconds=float(session_s))


def annotated_cells(timeline: SessionTimeline, grid: SecondGrid) -> np.ndarray:
    """bool[count]: the cells inside the annotated span (first row's start to last row's end), the seconds
    OpenPack's 1 Hz file has a label for; media outside it has no truth and is not scored."""
    if not timeline.segments:
        return np.zeros(grid.count, dtype=bool)
    starts = grid.starts_s
    return (starts + 1.0 > 1e-9) & (starts < timeline.segments[-1].end_s - 1e-9)


def truth_labels(timeline: SessionTimeline, grid: SecondGrid) -> np.ndarray:
    """OpenPack's per-second truth: the operation of the latest row starting before the end of each cell.

    Cells before the first row and after the last row's end are Null; gaps between rows keep the previous row's
    operation (as in ``openpack-operations-1hz``).

    Args:
        timeline: The session's annotation (same origin as ``grid``).
        grid: The session's cells.

    Returns:
        int64[count] label indices.
    """
    out = np.full(grid.count, NULL_INDEX, dtype=np.int64)
    if not timeline.segments or grid.count == 0:
        return out
    ends = grid.starts_s + 1.0
    starts = np.array([seg.start_s for seg in timeline.segments])
    labels = np.array([INDEX_OF_ID[seg.op_id] for seg in timeline.segments])
    row = np.searchsorted(starts, ends - 1e-9, side="left") - 1  # latest row with start < cell end
    inside = (row >= 0) & (grid.starts_s < timeline.segments[-1].end_s - 1e-9)
    out[inside] = labels[row[inside]]
    return out


def truth_boxes(timeline: SessionTimeline, grid: SecondGrid) -> np.ndarray:
    """The annotated box of each cell by the same rule as :func:`truth_labels` (-1 where none)."""
    out = np.full(grid.count, -1, dtype=np.int64)
    if not timeline.segments or grid.count == 0:
        return out
    ends = grid.starts_s + 1.0
    starts = np.array([seg.start_s for seg in timeline.segments])
    boxes = np.array([-1 if seg.box is None else seg.box for seg in timeline.segments])
    row = np.searchsorted(starts, ends - 1e-9, side="left") - 1
    inside = (row >= 0) & (grid.starts_s < timeline.segments[-1].end_s - 1e-9)
    out[inside] = boxes[row[inside]]
    return out


@dataclass(frozen=True)
class Run:
    """A maximal stretch of one label on the grid: cells ``[start, end)``."""

    label: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def runs_of(labels: np.ndarray) -> list[Run]:
    """Maximal runs of equal labels.

    Args:
        labels: int[T] label indices.

    Returns:
        Runs in order, covering ``[0, T)``.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return []
    change = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    bounds = np.concatenate(([0], change, [labels.size]))
    return [Run(int(labels[a]), int(a), int(b)) for a, b in itertools.pairwise(bounds)]


__all__ = [
    "EPOCH",
    "INDEX_OF_ID",
    "LABELS",
    "NULL_INDEX",
    "OP_IDS",
    "Run",
    "SecondGrid",
    "annotated_cells",
    "runs_of",
    "truth_boxes",
    "truth_labels",
]
