"""One recording's window answers -> its operation timeline (fused, decoded, anticipated, boxed, scored). Pure numpy.

:func:`annotate_windows` is the whole pure path that the batch job (``opsvlm.annotate``) and the single-video path
(``opsvlm.timeline``) share; :meth:`SessionAnnotation.to_json` is the timeline JSON both return.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from opsvlm.tasks.operations.data.openpack import SessionTimeline
from opsvlm.tasks.operations.timeline import boxes as box_mod
from opsvlm.tasks.operations.timeline.fusion import WindowScores, fuse
from opsvlm.tasks.operations.timeline.grammar import Grammar, anticipate, argmax_decode, decode
from opsvlm.tasks.operations.timeline.grid import (
    LABELS,
    NULL_INDEX,
    OP_IDS,
    SecondGrid,
    annotated_cells,
    runs_of,
    truth_boxes,
    truth_labels,
)
from opsvlm.tasks.operations.timeline.metrics import SessionStats, session_stats

TIMELINE_FORMAT = "opsvlm-timeline/1"
Decoder = Literal["viterbi", "argmax"]
# Names of the compared systems (metric keys and table rows).
GRAMMAR_SYSTEM = "model + grammar"
ARGMAX_SYSTEM = "model, per-second argmax"
MAJORITY_SYSTEM = "majority"


@dataclass
class SessionAnnotation:
    """The annotation of one recording.

    Attributes:
        subject: Worker id (``""`` for a plain video).
        session: Session id (the video's name for a plain video).
        media: The recording's path.
        grid: Its 1 Hz cells.
        window_s: Window length used.
        stride_s: Window stride used.
        windows: Windows predicted.
        rejected: Windows that could not be decoded: ``{"start_s", "end_s", "reason", "detail"}``.
        decoder: Which decoding the outputs use (``viterbi`` with the grammar, or ``argmax``).
        grammar_source: What the grammar was learned from.
        scores: float64[T, L] fused label probabilities.
        next_scores: float64[T, L] fused next-operation probabilities.
        coverage: float64[T] window-seconds covering each cell.
        labels: int64[T] the output labels (by ``decoder``).
        labels_grammar: int64[T] Viterbi labels.
        labels_argmax: int64[T] per-second argmax labels.
        next_labels: int64[T] anticipated next operation of the output labels (by ``decoder``).
        next_confidence: float64[T] its normalized score.
        next_labels_plain: int64[T] anticipated next operation of the argmax labels, from the model's scores alone.
        next_labels_grammar: int64[T] anticipated next operation of the Viterbi labels, the model's scores weighted
            by the grammar's successor frequencies.
        boxes: int64[T] box of each cell (0 before the first operation).
        figures: Per-box figures of ``labels``.
        summary: Session totals of ``labels``.
        truth: The annotation, when there is one.
        truth_labels: int64[T] OpenPack 1 Hz truth, or ``None``.
        truth_boxes: int64[T] annotated boxes (-1 where none), or ``None``.
        truth_mask: bool[T] the cells inside the annotated span (the scored ones), or ``None``.
        majority: int64[T] the majority baseline (the grammar's most frequent training operation everywhere).
    """

    subject: str
    session: str
    media: str
    grid: SecondGrid
    window_s: float
    stride_s: float
    windows: int
    rejected: list[dict]
    decoder: Decoder
    grammar_source: str
    scores: np.ndarray
    next_scores: np.ndarray
    coverage: np.ndarray
    labels: np.ndarray
    labels_grammar: np.ndarray
    labels_argmax: np.ndarray
    next_labels: np.ndarray
    next_confidence: np.ndarray
    next_labels_plain: np.ndarray
    next_labels_grammar: np.ndarray
    boxes: np.ndarray
    figures: list[box_mod.BoxFigures]
    summary: dict
    truth: SessionTimeline | None = None
    truth_labels: np.ndarray | None = None
    truth_boxes: np.ndarray | None = None
    truth_mask: np.ndarray | None = None
    majority: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def seconds(self) -> int:
        return self.grid.count

    @property
    def confidence(self) -> np.ndarray:
        """float64[T] fused probability of the output label of each second."""
        return self.scores[np.arange(self.seconds), self.labels]

    @property
    def scored_seconds(self) -> int:
        """Seconds with truth (0 without an annotation or when the media lies outside the annotated span)."""
        return int(self.truth_mask.sum()) if self.truth_mask is not None else 0

    def stats(self) -> dict[str, SessionStats]:
        """Per-system counts against the truth, on the annotated seconds (empty when there are none)."""
        if self.truth_labels is None or self.scored_seconds == 0:
            return {}
        mask = self.truth_mask
        truth = self.truth_labels[mask]
        return {
            GRAMMAR_SYSTEM: session_stats(truth, self.labels_grammar[mask], self.next_labels_grammar[mask]),
            ARGMAX_SYSTEM: session_stats(truth, self.labels_argmax[mask], self.next_labels_plain[mask]),
            MAJORITY_SYSTEM: session_stats(truth, self.majority[mask], None),
        }

    def segments(self) -> list[dict]:
        """The output labels as segments (Null runs included, so the segments tile the recording)."""
        starts = self.grid.starts_s
        out = []
        for run in runs_of(self.labels):
            conf = float(self.scores[run.start : run.end, run.label].mean())
            out.append(
                {
                    "operation": LABELS[run.label],
                    "id": OP_IDS[run.label],
                    "start_s": round(float(starts[run.start]), 3),
                    "end_s": round(float(starts[run.end - 1] + 1.0), 3),
                    "box": int(self.boxes[run.start]),
                    "confidence": round(conf, 4),
                    "next_operation": LABELS[int(self.next_labels[run.end - 1])],
                }
            )
        return out

    def to_json(self, scores: dict | None = None) -> dict:
        """The timeline JSON (``opsvlm-timeline/1``): segments with confidence, the anticipated next operation at
        every second, per-box figures and session totals; ``scores`` (metrics against the truth) when given."""
        per_second = {
            "t_s": [round(float(t), 3) for t in self.grid.starts_s],
            "operation": [LABELS[i] for i in self.labels],
            "confidence": [round(float(c), 4) for c in self.confidence],
            "next_operation": [LABELS[i] for i in self.next_labels],
            "next_confidence": [round(float(c), 4) for c in self.next_confidence],
            "box": [int(b) for b in self.boxes],
            "coverage_s": [round(float(c), 3) for c in self.coverage],
        }
        return {
            "format": TIMELINE_FORMAT,
            "subject": self.subject,
            "session": self.session,
            "media": self.media,
            "origin": self.grid.origin.isoformat(),
            "first_unixtime_ms": int(self.grid.unixtime_ms[0]) if self.seconds else None,
            "seconds": self.seconds,
            "window_s": self.window_s,
            "stride_s": self.stride_s,
            "windows": self.windows,
            "windows_rejected": self.rejected,
            "decoder": self.decoder,
            "grammar": self.grammar_source,
            "has_truth": self.truth_labels is not None,
            "scored_seconds": self.scored_seconds,
            "segments": self.segments(),
            "per_second": per_second,
            "boxes": [f.to_dict() for f in self.figures],
            "summary": self.summary,
            **({"scores": scores} if scores is not None else {}),
            **self.extra,
        }


def annotate_windows(
    windows: WindowScores,
    grid: SecondGrid,
    grammar: Grammar,
    *,
    subject: str = "",
    session: str = "",
    media: str = "",
    window_s: float = 0.0,
    stride_s: float = 0.0,
    rejected: list[dict] | None = None,
    truth: SessionTimeline | None = None,
    decoder: Decoder = "viterbi",
    emission_weight: float = 1.0,
) -> SessionAnnotation:
    """Fuse a recording's window answers per second, decode them, anticipate, find boxes and figures.

    Args:
        windows: The windows' label and next-label probabilities (session seconds).
        grid: The recording's 1 Hz cells.
        grammar: The operation grammar (see :mod:`.grammar`).
        subject: Worker id.
        session: Session id.
        media: The recording's path (for the record).
        window_s: Window length (for the record).
        stride_s: Window stride (for the record).
        rejected: Windows that could not be decoded (for the record).
        truth: The recording's annotation, if any (same origin as ``grid``).
        decoder: ``viterbi`` (grammar) or ``argmax`` for the outputs; both are always computed and scored.
        emission_weight: See :func:`.grammar.decode`.

    Raises:
        ValueError: for no windows, or a decoder that is neither.
    """
    if decoder not in ("viterbi", "argmax"):
        raise ValueError(f"decoder must be 'viterbi' or 'argmax', got {decoder!r}")
    scores, next_scores, coverage = fuse(windows, grid.starts_s)
    with_grammar = decode(scores, grammar, emission_weight)
    plain = argmax_decode(scores)
    labels = with_grammar if decoder == "viterbi" else plain
    # each system anticipates on its own labels: the grammar system with the successor frequencies, argmax without
    next_grammar, conf_grammar = anticipate(with_grammar, next_scores, grammar)
    next_plain, conf_plain = anticipate(plain, next_scores, None)
    next_labels, next_conf = (next_grammar, conf_grammar) if decoder == "viterbi" else (next_plain, conf_plain)
    boxes = box_mod.assign_boxes(labels)
    figures = box_mod.box_figures(labels, boxes, grid.starts_s)
    annotation = SessionAnnotation(
        subject=subject,
        session=session,
        media=media,
        grid=grid,
        window_s=window_s,
        stride_s=stride_s,
        windows=len(windows),
        rejected=list(rejected or []),
        decoder=decoder,
        grammar_source=grammar.source,
        scores=scores,
        next_scores=next_scores,
        coverage=coverage,
        labels=labels,
        labels_grammar=with_grammar,
        labels_argmax=plain,
        next_labels=next_labels,
        next_confidence=next_conf,
        next_labels_plain=next_plain,
        next_labels_grammar=next_grammar,
        boxes=boxes,
        figures=figures,
        summary=box_mod.session_figures(figures, labels),
        majority=np.full(grid.count, grammar.majority, dtype=np.int64),
    )
    if truth is not None:
        annotation.truth = truth
        annotation.truth_labels = truth_labels(truth, grid)
        annotation.truth_boxes = truth_boxes(truth, grid)
        annotation.truth_mask = annotated_cells(truth, grid)
    return annotation


def recording_grid(origin: dt.datetime | None, media_start_s: float, media_end_s: float) -> SecondGrid:
    """The 1 Hz cells of a recording: anchored to its session origin, or (``origin=None``, a plain video) to the unix
    epoch, so that its 1 Hz ``unixtime`` counts milliseconds from the first frame."""
    return SecondGrid.covering(origin or dt.datetime(1970, 1, 1, tzinfo=dt.UTC), media_start_s, media_end_s)


__all__ = [
    "ARGMAX_SYSTEM",
    "GRAMMAR_SYSTEM",
    "MAJORITY_SYSTEM",
    "NULL_INDEX",
    "SessionAnnotation",
    "annotate_windows",
    "recording_grid",
]
