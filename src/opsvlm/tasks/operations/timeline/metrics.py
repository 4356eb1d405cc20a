"""Scores of per-second operation sequences against OpenPack's 1 Hz truth. Pure numpy.

* **Frame macro-F1** (OpenPack's challenge metric, ``openpack_toolkit.codalab.operation_segmentation``): per-class
  F1 over the 10 operations on the 1 Hz sequences of all sessions pooled, then the unweighted mean. Null is not a
  class (it is not averaged) but its seconds still count: an operation predicted where the truth is Null is a false
  positive of that operation, Null predicted where the truth is an operation a false negative. A class with no
  truth and no prediction scores 0 (sklearn's ``zero_division=0``, as OpenPack calls it).
* **Edit score** and **F1@k** (temporal action segmentation, Lea et al. 2017 / MS-TCN): on segments (maximal runs
  of one label, Null runs dropped as background). Edit = ``1 - Levenshtein(pred, truth) / max(#pred, #truth)``,
  averaged over sessions; F1@k: a predicted segment is a hit when its IoU with an unmatched true segment of the same
  label is >= k, counts pooled over sessions. All on a 0-1 scale (papers print 0-100).
* **Next-operation accuracy at boundaries**: at the last second before every true change between two operations,
  whether the anticipated next operation is the one that follows.
* **Intervals**: 95% percentile bootstrap over sessions (sessions resampled with replacement, the metric recomputed
  on each resample).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from opsvlm.tasks.operations.timeline.grid import LABELS, NULL_INDEX, runs_of

OPERATION_INDICES: tuple[int, ...] = tuple(i for i in range(len(LABELS)) if i != NULL_INDEX)
F1_OVERLAPS: tuple[float, ...] = (0.10, 0.25, 0.50)


def class_f1(truth: np.ndarray, pred: np.ndarray, classes: Sequence[int] = OPERATION_INDICES) -> np.ndarray:
    """Per-class F1 (``zero_division = 0``).

    Args:
        truth: int[T] true label indices.
        pred: int[T] predicted label indices.
        classes: Classes to score.

    Returns:
        float64[len(classes)].
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth and prediction lengths differ: {truth.shape} vs {pred.shape}")
    out = np.zeros(len(classes))
    for k, c in enumerate(classes):
        tp = float(np.sum((truth == c) & (pred == c)))
        fp = float(np.sum((truth != c) & (pred == c)))
        fn = float(np.sum((truth == c) & (pred != c)))
        out[k] = 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0
    return out


def frame_macro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """OpenPack's macro-F1 over the 10 operations (see the module docstring)."""
    return float(class_f1(truth, pred).mean())


def segments(labels: np.ndarray, background: int = NULL_INDEX) -> list[tuple[int, int, int]]:
    """``(label, start, end)`` of every maximal run, background runs dropped."""
    return [(r.label, r.start, r.end) for r in runs_of(labels) if r.label != background]


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Edit distance between two label sequences (insert, delete, substitute: cost 1)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i] + [0] * len(b)
        for j, y in enumerate(b, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y))
        previous = current
    return previous[-1]


def edit_score(truth: np.ndarray, pred: np.ndarray) -> float:
    """Segmental edit score in [0, 1] (1 = same order of segments; two empty sequences score 1)."""
    true_labels = [s[0] for s in segments(truth)]
    pred_labels = [s[0] for s in segments(pred)]
    longest = max(len(true_labels), len(pred_labels))
    if longest == 0:
        return 1.0
    return 1.0 - levenshtein(pred_labels, true_labels) / longest


def overlap_counts(truth: np.ndarray, pred: np.ndarray, overlap: float) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` of predicted segments at IoU >= ``overlap`` (each true segment matched at most once)."""
    true_segments = segments(truth)
    hits = np.zeros(len(true_segments), dtype=bool)
    tp = fp = 0
    for label, start, end in segments(pred):
        best, best_iou = -1, 0.0
        for j, (t_label, t_start, t_end) in enumerate(true_segments):
            if t_label != label:
                continue
            inter = min(end, t_end) - max(start, t_start)
            union = max(end, t_end) - min(start, t_start)
            iou = inter / union if union > 0 else 0.0
            if iou > best_iou:
                best, best_iou = j, iou
        if best >= 0 and best_iou >= overlap and not hits[best]:
            tp += 1
            hits[best] = True
        else:
            fp += 1
    return tp, fp, len(true_segments) - int(hits.sum())


def f1_from_counts(tp: float, fp: float, fn: float) -> float:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def boundary_next_accuracy(truth: np.ndarray, next_pred: np.ndarray) -> tuple[int, int]:
    """``(correct, boundaries)``: at the last second of every true operation run followed by a different operation
    (Null runs skipped), whether ``next_pred`` there names the operation that follows."""
    runs = [r for r in runs_of(truth) if r.label != NULL_INDEX]
    correct = total = 0
    for current, following in itertools.pairwise(runs):
        if current.label == following.label:
            continue
        total += 1
        correct += int(next_pred[current.end - 1] == following.label)
    return correct, total


# --- over sessions ------------------------------------------------------------------------------------------------


def class_counts(truth: np.ndarray, pred: np.ndarray, classes: Sequence[int] = OPERATION_INDICES) -> np.ndarray:
    """int64[len(classes), 3]: ``(tp, fp, fn)`` per class (what pooled F1 sums over sessions)."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    return np.array(
        [
            [np.sum((truth == c) & (pred == c)), np.sum((truth != c) & (pred == c)), np.sum((truth == c) & (pred != c))]
            for c in classes
        ],
        dtype=np.int64,
    ).reshape(len(classes), 3)


def macro_f1_from_counts(counts: np.ndarray) -> float:
    """Macro-F1 of per-class ``(tp, fp, fn)`` counts (float[C, 3])."""
    tp, fp, fn = (np.asarray(counts, dtype=np.float64)[:, k] for k in range(3))
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=tp > 0)
    return float(f1.mean())


@dataclass(frozen=True)
class SessionStats:
    """What the metrics need of one session, so bootstrap resamples only add numbers up.

    Attributes:
        classes: int64[10, 3] per-operation (tp, fp, fn) of the seconds.
        edit: The session's edit score.
        overlaps: int64[len(F1_OVERLAPS), 3] segment (tp, fp, fn) at each IoU threshold.
        boundaries: ``(correct, total)`` next-operation hits at boundaries (``(0, 0)`` when not scored).
        seconds: Scored seconds.
    """

    classes: np.ndarray
    edit: float
    overlaps: np.ndarray
    boundaries: tuple[int, int]
    seconds: int


def session_stats(truth: np.ndarray, pred: np.ndarray, next_pred: np.ndarray | None = None) -> SessionStats:
    """The per-session counts behind :func:`score_sessions`.

    Args:
        truth: int[T] true labels (OpenPack 1 Hz rule).
        pred: int[T] predicted labels.
        next_pred: int[T] anticipated next labels, or ``None``.
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth and prediction lengths differ: {truth.shape} vs {pred.shape}")
    return SessionStats(
        classes=class_counts(truth, pred),
        edit=edit_score(truth, pred),
        overlaps=np.array([overlap_counts(truth, pred, k) for k in F1_OVERLAPS], dtype=np.int64),
        boundaries=boundary_next_accuracy(truth, next_pred) if next_pred is not None else (0, 0),
        seconds=int(truth.size),
    )


def _headline(stats: Sequence[SessionStats]) -> dict[str, float]:
    out = {
        "frame_macro_f1": macro_f1_from_counts(sum(s.classes for s in stats)),
        "edit_score": float(np.mean([s.edit for s in stats])),
    }
    overlaps = sum(s.overlaps for s in stats)
    for k, overlap in enumerate(F1_OVERLAPS):
        out[f"f1_at_{round(overlap * 100)}"] = f1_from_counts(*overlaps[k])
    correct, total = (sum(s.boundaries[i] for s in stats) for i in (0, 1))
    out["next_accuracy_at_boundaries"] = correct / total if total else float("nan")
    return out


def score_sessions(
    stats: Sequence[SessionStats], resamples: int = 1000, seed: int = 0
) -> dict[str, float | int | list[float]]:
    """All timeline metrics over sessions, with 95% percentile bootstrap intervals by session.

    Args:
        stats: One :func:`session_stats` per session.
        resamples: Bootstrap resamples (sessions drawn with replacement; with one session the interval is the value
            itself: no spread can be estimated from one session).
        seed: Bootstrap seed (intervals are reproducible).

    Returns:
        ``frame_macro_f1``, ``edit_score``, ``f1_at_10/25/50``, ``next_accuracy_at_boundaries`` (each with a
        ``_ci95`` ``[low, high]``), per-class ``f1/<label>``, ``boundaries``, ``sessions`` and ``seconds``.
    """
    stats = list(stats)
    out: dict[str, float | int | list[float]] = {"sessions": len(stats), "seconds": sum(s.seconds for s in stats)}
    if not stats:
        return out
    point = _headline(stats)
    rng = np.random.default_rng(seed)
    draws = (
        [_headline([stats[i] for i in rng.integers(0, len(stats), len(stats))]) for _ in range(resamples)]
        if len(stats) > 1
        else [point]
    )
    for key, value in point.items():
        out[key] = value
        values = np.array([d[key] for d in draws], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[f"{key}_ci95"] = (
            [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values.size else [value, value]
        )
    tp, fp, fn = (sum(s.classes for s in stats)[:, k].astype(np.float64) for k in range(3))
    for index, c_tp, c_fp, c_fn in zip(OPERATION_INDICES, tp, fp, fn, strict=True):
        out[f"f1/{LABELS[index]}"] = float(2 * c_tp / (2 * c_tp + c_fp + c_fn)) if c_tp > 0 else 0.0
    out["boundaries"] = int(sum(s.boundaries[1] for s in stats))
    return out


__all__ = [
    "F1_OVERLAPS",
    "OPERATION_INDICES",
    "SessionStats",
    "boundary_next_accuracy",
    "class_counts",
    "class_f1",
    "edit_score",
    "f1_from_counts",
    "frame_macro_f1",
    "levenshtein",
    "macro_f1_from_counts",
    "overlap_counts",
    "score_sessions",
    "segments",
    "session_stats",
]
