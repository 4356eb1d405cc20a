"""Task metrics for operation understanding on packing-video clips, defined once, in plain numpy.

For each clip the model predicts three things, scored against the annotation:

* the dominant operation of the clip → **OCA** (operation classification accuracy, top-1);
* the temporal segment of that operation inside the clip, in seconds → **tIoU@0.5** (fraction of clips whose
  predicted segment has IoU ≥ 0.5 with the truth) and the mean tIoU;
* the next operation → **AA@1** (anticipation accuracy, top-1) and its class-mean recall.

The headline number is ``weighted_score = 0.3·OCA + 0.3·tIoU@0.5 + 0.4·AA@1`` (see :data:`WEIGHTS`).

Rules that hold everywhere in this module:

* A prediction that is missing or could not be parsed (``None``) counts as wrong for every sub-task and stays in
  the denominator. So does a predicted label that is not in the label list (it lands in the ``"<invalid>"``
  column of the confusion matrix) and a non-finite predicted segment boundary (IoU 0).
* Confusion matrices have rows = truth and columns = prediction, in the fixed order of the label list, plus one
  final ``"<invalid>"`` column for missing or unknown predictions.
* Classes without support (no true examples) have no recall; they are left out of class means and of the
  per-class keys rather than reported as NaN.
* Empty inputs raise ``ValueError``.

The label-array helpers (:func:`confusion_matrix`, :func:`accuracy`, :func:`per_class_recall`,
:func:`class_mean_recall`, :func:`per_class_f1`, :func:`macro_f1`) are generic over any label list, so other tasks
(e.g. image classification) reuse them with their own labels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import TypeVar

import numpy as np

from opsvlm.metrics import (
    INVALID,
    accuracy,
    check_aligned,
    confusion_matrix,
    f1_from_confusion,
    mean_defined,
    metric_key,
    recall_from_confusion,
    subset_positions,
)
from opsvlm.tasks.operations.labels import LABEL_NAMES, OPERATIONS

__all__ = [
    "BOUNDARY_TOLERANCE_S",
    "CONFUSION_COLUMNS",
    "OPERATION_NAMES",
    "TIOU_THRESHOLD",
    "WEIGHTS",
    "ClipPrediction",
    "ClipTruth",
    "compute_metrics",
    "confusion_matrices",
    "segment_iou",
    "segment_ious",
    "weighted_score",
]

_T = TypeVar("_T")

CONFUSION_COLUMNS: tuple[str, ...] = (*LABEL_NAMES, INVALID)
"""Column names of the operation confusion matrices: ``LABEL_NAMES`` then ``"<invalid>"``."""

OPERATION_NAMES: tuple[str, ...] = tuple(op.name for op in OPERATIONS)
"""The 10 OpenPack operations (Null excluded): the classes macro-F1 averages over."""

TIOU_THRESHOLD = 0.5
"""A predicted segment is a hit for tIoU@0.5 when its IoU with the truth is at least this."""

BOUNDARY_TOLERANCE_S = 0.05
"""A true segment that starts later or ends earlier than this inside its clip makes it a boundary clip (times are on a
0.1 s grid)."""

WEIGHTS: Mapping[str, float] = MappingProxyType({"oca": 0.3, "tiou_at_0_5": 0.3, "aa_at_1": 0.4})
"""Weights of the headline score, keyed by the metric names that :func:`compute_metrics` returns."""


@dataclass(frozen=True)
class ClipTruth:
    """The annotation of one clip.

    Attributes:
        operation: Dominant operation of the clip, a name from ``LABEL_NAMES``.
        start_s: Start of that operation's segment, in seconds from the clip start.
        end_s: End of that segment, in seconds from the clip start (``end_s >= start_s``).
        next_operation: The operation that follows, a name from ``LABEL_NAMES``.
        clip_length_s: Length of the clip in seconds (> 0); predicted segments are clipped to ``[0, clip_length_s]``.
    """

    operation: str
    start_s: float
    end_s: float
    next_operation: str
    clip_length_s: float


@dataclass(frozen=True)
class ClipPrediction:
    """What the model predicted for one clip, after parsing its output.

    Label fields may hold any string: one that is not in ``LABEL_NAMES`` simply counts as wrong. A boundary that is
    ``None`` or not finite gives IoU 0. A clip whose output could not be parsed at all is represented by ``None``
    instead of a ``ClipPrediction``.

    Attributes:
        operation: Predicted dominant operation.
        start_s: Predicted segment start, in seconds from the clip start.
        end_s: Predicted segment end, in seconds from the clip start.
        next_operation: Predicted next operation.
    """

    operation: str
    start_s: float
    end_s: float
    next_operation: str


# --------------------------------------------------------------------------------------------------------------------
# Temporal IoU
# --------------------------------------------------------------------------------------------------------------------


def segment_ious(
    pred_starts: np.ndarray,
    pred_ends: np.ndarray,
    true_starts: np.ndarray,
    true_ends: np.ndarray,
    clip_lengths: np.ndarray,
) -> np.ndarray:
    """Temporal IoU of predicted vs. true segments, element-wise.

    IoU follows ActivityNet's ``segment_iou``: ``intersection = max(0, min(e1, e2) − max(s1, s2))`` and
    ``union = len1 + len2 − intersection``. Before that, each predicted segment is clipped to ``[0, clip_length]``;
    a prediction whose end is not after its start (after clipping), or which has a non-finite boundary, gets IoU 0.
    A zero-length truth therefore always gets IoU 0.

    Args:
        pred_starts: float[n] predicted starts in seconds (NaN allowed: IoU 0).
        pred_ends: float[n] predicted ends in seconds (NaN allowed: IoU 0).
        true_starts: float[n] true starts in seconds, finite.
        true_ends: float[n] true ends in seconds, finite, ``>= true_starts``.
        clip_lengths: float[n] clip lengths in seconds, finite and > 0.

    Returns:
        float64[n] IoU values in ``[0, 1]``.

    Raises:
        ValueError: if the arrays differ in shape, or a truth or clip length is invalid.
    """
    arrays = [np.asarray(a, dtype=np.float64) for a in (pred_starts, pred_ends, true_starts, true_ends, clip_lengths)]
    ps, pe, ts, te, length = arrays
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"segment arrays must share one shape, got {[a.shape for a in arrays]}")
    if not np.all(np.isfinite(length) & (length > 0)):
        raise ValueError("clip lengths must be finite and > 0")
    if not np.all(np.isfinite(ts) & np.isfinite(te)):
        raise ValueError("true segment boundaries must be finite")
    if np.any(te < ts):
        raise ValueError("true segments must have end >= start")

    with np.errstate(invalid="ignore"):
        ps = np.clip(ps, 0.0, length)
        pe = np.clip(pe, 0.0, length)
        valid = np.isfinite(ps) & np.isfinite(pe) & (pe > ps)
        intersection = np.maximum(0.0, np.minimum(pe, te) - np.maximum(ps, ts))
        union = (pe - ps) + (te - ts) - intersection
        iou = np.where(valid & (union > 0), intersection / np.where(union > 0, union, 1.0), 0.0)
    return np.clip(iou, 0.0, 1.0)


def segment_iou(pred_start: float, pred_end: float, true_start: float, true_end: float, clip_length: float) -> float:
    """Temporal IoU of one predicted segment with one true segment (see :func:`segment_ious` for the rules).

    Args:
        pred_start: Predicted start in seconds; clipped to ``[0, clip_length]``.
        pred_end: Predicted end in seconds; clipped to ``[0, clip_length]``. ``end <= start`` after clipping → 0.
        true_start: True start in seconds.
        true_end: True end in seconds (``>= true_start``).
        clip_length: Clip length in seconds (> 0).

    Returns:
        The IoU, in ``[0, 1]``.

    Raises:
        ValueError: if the truth or the clip length is invalid.
    """
    iou = segment_ious(
        np.array([_as_float(pred_start)]),
        np.array([_as_float(pred_end)]),
        np.array([true_start], dtype=np.float64),
        np.array([true_end], dtype=np.float64),
        np.array([clip_length], dtype=np.float64),
    )
    return float(iou[0])


# --------------------------------------------------------------------------------------------------------------------
# The clip task
# --------------------------------------------------------------------------------------------------------------------


def weighted_score(metrics: Mapping[str, float]) -> float:
    """The headline score ``0.3·oca + 0.3·tiou_at_0_5 + 0.4·aa_at_1``.

    Args:
        metrics: Needs the keys of :data:`WEIGHTS` (as returned by :func:`compute_metrics`).

    Returns:
        The weighted score in ``[0, 1]``.
    """
    return float(sum(weight * metrics[name] for name, weight in WEIGHTS.items()))


def compute_metrics(
    truths: Sequence[ClipTruth | Mapping[str, object]],
    predictions: Sequence[ClipPrediction | Mapping[str, object] | None],
) -> dict[str, float]:
    """All clip-task metrics as a flat dict with MLflow-friendly names.

    Every clip is in every denominator: a ``None`` prediction (missing or unparseable) is wrong for OCA, AA@1 and
    gets IoU 0; an unknown label is wrong; a non-finite predicted boundary gets IoU 0.

    Keys (all values are floats):

    * ``n_clips``: number of clips.
    * ``oca``: top-1 accuracy of the dominant operation.
    * ``oca_class_mean_recall``: mean per-class recall of the dominant operation over classes present in the truth.
    * ``macro_f1``: OpenPack macro-F1 of the dominant operation over the 10 operations (Null excluded from the mean,
      confusion over all labels); operations with no support and no predictions are excluded; NaN if none is left.
    * ``tiou_at_0_5``: fraction of clips whose predicted segment has IoU ≥ 0.5 with the truth.
    * ``mean_tiou``: mean IoU over clips.
    * ``boundary_tiou_at_0_5``: tIoU@0.5 over the *boundary clips* only (clips whose true segment does not cover the
      whole clip: an operation changes inside them); NaN when there are none. Most clips lie inside one operation, so
      the whole-clip segment scores well on tIoU@0.5. ``n_boundary_clips``: their count; ``boundary_mean_tiou``: the
      mean IoU over them (the dominant operation covers at least half of a two-operation clip, so even there the whole
      clip often clears 0.5: the mean shows what tIoU@0.5 hides).
    * ``aa_at_1``: top-1 accuracy of the next operation.
    * ``aa_class_mean_recall``: mean per-class recall of the next operation over classes present in the truth.
    * ``weighted_score``: ``0.3·oca + 0.3·tiou_at_0_5 + 0.4·aa_at_1``.
    * ``parse_failure_rate``: fraction of clips whose prediction is ``None``.
    * ``invalid_label_rate``: fraction of clips with a parsed prediction whose operation or next operation is not
      a known label.
    * ``oca_recall/<label>``, ``aa_recall/<label>``: per-class recall, only for classes present in the truth.
    * ``f1/<label>``: per-operation F1 of the dominant operation (10 operations), where defined.

    ``<label>`` is :func:`metric_key` of the label name, e.g. ``oca_recall/relocate_item_label``.

    Args:
        truths: [n] annotations, as :class:`ClipTruth` or mappings with its field names.
        predictions: [n] predictions aligned with ``truths``, as :class:`ClipPrediction`, mappings with its field
            names, or ``None``.

    Returns:
        Metric name → value.

    Raises:
        ValueError: on empty or misaligned inputs, or an invalid truth.
    """
    check_aligned(truths, predictions)
    truth_list = [_to_truth(t, i) for i, t in enumerate(truths)]
    pred_list = [_to_prediction(p, i) for i, p in enumerate(predictions)]
    n = len(truth_list)

    true_ops = [t.operation for t in truth_list]
    true_next = [t.next_operation for t in truth_list]
    pred_ops = [None if p is None else p.operation for p in pred_list]
    pred_next = [None if p is None else p.next_operation for p in pred_list]

    ious = segment_ious(
        np.array([math.nan if p is None else _as_float(p.start_s) for p in pred_list]),
        np.array([math.nan if p is None else _as_float(p.end_s) for p in pred_list]),
        np.array([t.start_s for t in truth_list], dtype=np.float64),
        np.array([t.end_s for t in truth_list], dtype=np.float64),
        np.array([t.clip_length_s for t in truth_list], dtype=np.float64),
    )

    boundary = np.array(
        [t.start_s > BOUNDARY_TOLERANCE_S or t.end_s < t.clip_length_s - BOUNDARY_TOLERANCE_S for t in truth_list]
    )
    op_confusion = confusion_matrix(true_ops, pred_ops, LABEL_NAMES)
    next_confusion = confusion_matrix(true_next, pred_next, LABEL_NAMES)
    op_recall = recall_from_confusion(op_confusion)
    next_recall = recall_from_confusion(next_confusion)
    op_f1 = f1_from_confusion(op_confusion)
    op_positions = subset_positions(LABEL_NAMES, OPERATION_NAMES)

    known = set(LABEL_NAMES)
    n_invalid = sum(p is not None and (p.operation not in known or p.next_operation not in known) for p in pred_list)

    metrics: dict[str, float] = {
        "n_clips": float(n),
        "oca": accuracy(true_ops, pred_ops),
        "oca_class_mean_recall": float(np.nanmean(op_recall)),
        "macro_f1": mean_defined(op_f1[op_positions]),
        "tiou_at_0_5": float(np.mean(ious >= TIOU_THRESHOLD)),
        "mean_tiou": float(np.mean(ious)),
        "n_boundary_clips": float(boundary.sum()),
        "boundary_tiou_at_0_5": float(np.mean(ious[boundary] >= TIOU_THRESHOLD)) if boundary.any() else math.nan,
        "boundary_mean_tiou": float(np.mean(ious[boundary])) if boundary.any() else math.nan,
        "aa_at_1": accuracy(true_next, pred_next),
        "aa_class_mean_recall": float(np.nanmean(next_recall)),
        "parse_failure_rate": sum(p is None for p in pred_list) / n,
        "invalid_label_rate": n_invalid / n,
    }
    metrics["weighted_score"] = weighted_score(metrics)
    for name, recall in zip(LABEL_NAMES, op_recall, strict=True):
        if not np.isnan(recall):
            metrics[f"oca_recall/{metric_key(name)}"] = float(recall)
    for name, recall in zip(LABEL_NAMES, next_recall, strict=True):
        if not np.isnan(recall):
            metrics[f"aa_recall/{metric_key(name)}"] = float(recall)
    for pos in op_positions:
        if not np.isnan(op_f1[pos]):
            metrics[f"f1/{metric_key(LABEL_NAMES[pos])}"] = float(op_f1[pos])
    return metrics


def confusion_matrices(
    truths: Sequence[ClipTruth | Mapping[str, object]],
    predictions: Sequence[ClipPrediction | Mapping[str, object] | None],
) -> dict[str, np.ndarray]:
    """Confusion matrices of the dominant operation and the next operation.

    Args:
        truths: [n] annotations, as for :func:`compute_metrics`.
        predictions: [n] predictions, as for :func:`compute_metrics`.

    Returns:
        ``{"operation": int64[11, 12], "next_operation": int64[11, 12]}``; rows are ``LABEL_NAMES`` (truth), columns
        are :data:`CONFUSION_COLUMNS` (prediction, last column ``"<invalid>"``).

    Raises:
        ValueError: as :func:`compute_metrics`.
    """
    check_aligned(truths, predictions)
    truth_list = [_to_truth(t, i) for i, t in enumerate(truths)]
    pred_list = [_to_prediction(p, i) for i, p in enumerate(predictions)]
    return {
        "operation": confusion_matrix(
            [t.operation for t in truth_list], [None if p is None else p.operation for p in pred_list], LABEL_NAMES
        ),
        "next_operation": confusion_matrix(
            [t.next_operation for t in truth_list],
            [None if p is None else p.next_operation for p in pred_list],
            LABEL_NAMES,
        ),
    }


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def _as_float(value: object) -> float:
    """A predicted boundary as float; ``None`` or anything non-numeric becomes NaN (IoU 0)."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _to_truth(truth: ClipTruth | Mapping[str, object], position: int) -> ClipTruth:
    if isinstance(truth, Mapping):
        truth = _from_mapping(ClipTruth, truth, f"truths[{position}]")
    if not isinstance(truth, ClipTruth):
        raise ValueError(f"truths[{position}] must be a ClipTruth or a mapping, got {type(truth).__name__}")
    for field in ("operation", "next_operation"):
        if getattr(truth, field) not in LABEL_NAMES:
            raise ValueError(f"truths[{position}].{field} = {getattr(truth, field)!r} is not an OpenPack label")
    try:
        start, end, length = float(truth.start_s), float(truth.end_s), float(truth.clip_length_s)
    except (TypeError, ValueError):
        raise ValueError(f"truths[{position}] has a non-numeric time: {truth}") from None
    if not (math.isfinite(start) and math.isfinite(end) and start <= end):
        raise ValueError(f"truths[{position}] needs finite start_s <= end_s, got {start}, {end}")
    if not (math.isfinite(length) and length > 0):
        raise ValueError(f"truths[{position}] needs a finite clip_length_s > 0, got {length}")
    return truth


def _to_prediction(prediction: ClipPrediction | Mapping[str, object] | None, position: int) -> ClipPrediction | None:
    if prediction is None or isinstance(prediction, ClipPrediction):
        return prediction
    if isinstance(prediction, Mapping):
        return _from_mapping(ClipPrediction, prediction, f"predictions[{position}]")
    raise ValueError(
        f"predictions[{position}] must be a ClipPrediction, a mapping or None, got {type(prediction).__name__}"
    )


def _from_mapping(cls: type[_T], data: Mapping[str, object], where: str) -> _T:
    names = [f.name for f in fields(cls)]
    missing = [name for name in names if name not in data]
    extra = [key for key in data if key not in names]
    if missing or extra:
        raise ValueError(f"{where}: expected keys {names}, missing {missing}, unexpected {extra}")
    return cls(**{name: data[name] for name in names})
