"""Task-free metrics over label arrays (a leaf module: numpy only).

Conventions: confusion matrices have rows = truth and columns = prediction in the order of the label list, plus one
final ``"<invalid>"`` column for missing (``None``) or unknown predictions; classes without support have no recall and
are left out of class means; empty or misaligned inputs raise ``ValueError``. Every task's metrics build on these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Sequence

import numpy as np

__all__ = [
    "INVALID",
    "accuracy",
    "check_aligned",
    "class_mean_recall",
    "confusion_matrix",
    "f1_from_confusion",
    "label_index",
    "macro_f1",
    "mean_defined",
    "metric_key",
    "per_class_f1",
    "per_class_recall",
    "recall_from_confusion",
    "subset_positions",
]

INVALID = "<invalid>"
"""Name of the extra confusion-matrix column that collects missing and unknown predictions."""


def confusion_matrix(
    true_labels: Sequence[Hashable], pred_labels: Sequence[Hashable | None], labels: Sequence[Hashable]
) -> np.ndarray:
    """Count (truth, prediction) pairs.

    Args:
        true_labels: [n] true labels, each in ``labels``.
        pred_labels: [n] predicted labels; ``None`` or anything not in ``labels`` is counted in the last column.
        labels: [k] the label list, fixing row and column order.

    Returns:
        int64[k, k + 1] counts; row = truth, column = prediction in ``labels`` order, last column = ``"<invalid>"``
        (missing or unknown prediction).

    Raises:
        ValueError: on empty or misaligned inputs, duplicate labels, or a true label not in ``labels``.
    """
    index = label_index(labels)
    check_aligned(true_labels, pred_labels)
    k = len(index)
    rows = np.empty(len(true_labels), dtype=np.int64)
    for i, label in enumerate(true_labels):
        if label not in index:
            raise ValueError(f"true label {label!r} (position {i}) is not in the label list {list(labels)}")
        rows[i] = index[label]
    cols = np.array([index.get(label, k) if label is not None else k for label in pred_labels], dtype=np.int64)
    counts = np.zeros((k, k + 1), dtype=np.int64)
    np.add.at(counts, (rows, cols), 1)
    return counts


def accuracy(true_labels: Sequence[Hashable], pred_labels: Sequence[Hashable | None]) -> float:
    """Top-1 accuracy: the fraction of positions where the prediction equals the truth (``None`` is wrong).

    Args:
        true_labels: [n] true labels.
        pred_labels: [n] predicted labels, ``None`` for missing.

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        ValueError: on empty or misaligned inputs.
    """
    check_aligned(true_labels, pred_labels)
    hits = sum(p is not None and p == t for t, p in zip(true_labels, pred_labels, strict=True))
    return hits / len(true_labels)


def per_class_recall(
    true_labels: Sequence[Hashable], pred_labels: Sequence[Hashable | None], labels: Sequence[Hashable]
) -> np.ndarray:
    """Per-class accuracy (recall): for each class, the fraction of its true examples predicted as that class.

    Args:
        true_labels: [n] true labels, each in ``labels``.
        pred_labels: [n] predicted labels; ``None`` or unknown labels count as wrong.
        labels: [k] the label list.

    Returns:
        float64[k] recall per class in ``labels`` order; NaN for a class with no true examples.

    Raises:
        ValueError: as :func:`confusion_matrix`.
    """
    return recall_from_confusion(confusion_matrix(true_labels, pred_labels, labels))


def class_mean_recall(
    true_labels: Sequence[Hashable], pred_labels: Sequence[Hashable | None], labels: Sequence[Hashable]
) -> float:
    """Mean of the per-class recalls over the classes that have true examples (balanced accuracy).

    Unlike :func:`accuracy`, every class present in the truth weighs the same, so rare classes matter.

    Args:
        true_labels: [n] true labels, each in ``labels``.
        pred_labels: [n] predicted labels; ``None`` or unknown labels count as wrong.
        labels: [k] the label list.

    Returns:
        Class-mean recall in ``[0, 1]``.

    Raises:
        ValueError: as :func:`confusion_matrix`.
    """
    recall = per_class_recall(true_labels, pred_labels, labels)
    return float(np.nanmean(recall))  # at least one class has support since the input is non-empty


def per_class_f1(
    true_labels: Sequence[Hashable], pred_labels: Sequence[Hashable | None], labels: Sequence[Hashable]
) -> np.ndarray:
    """Per-class F1 from the confusion over all of ``labels``.

    For class ``c``: ``tp`` = diagonal count, ``fp`` = column ``c`` minus ``tp`` (predictions of ``c`` on any other
    true class, including classes that are later left out of an average, such as Null), ``fn`` = row ``c`` minus
    ``tp`` (including missing/unknown predictions), ``F1 = 2·tp / (2·tp + fp + fn)``.

    A class with neither true examples nor predictions has no F1 (NaN). A class with no true examples but some
    predictions has F1 0.

    Args:
        true_labels: [n] true labels, each in ``labels``.
        pred_labels: [n] predicted labels; ``None`` or unknown labels count as wrong.
        labels: [k] the label list.

    Returns:
        float64[k] F1 per class in ``labels`` order, NaN where undefined.

    Raises:
        ValueError: as :func:`confusion_matrix`.
    """
    return f1_from_confusion(confusion_matrix(true_labels, pred_labels, labels))


def macro_f1(
    true_labels: Sequence[Hashable],
    pred_labels: Sequence[Hashable | None],
    labels: Sequence[Hashable],
    average_over: Sequence[Hashable] | None = None,
) -> float:
    """Macro-F1: the unweighted mean of per-class F1 (see :func:`per_class_f1`) over ``average_over``.

    OpenPack's official score is ``macro_f1(truth, pred, LABEL_NAMES, average_over=OPERATION_NAMES)``: the confusion
    covers all labels including Null, but only the 10 operations are averaged. Classes with neither true examples
    nor predictions are excluded from the mean (scikit-learn would count them as 0 instead); classes with
    predictions but no true examples count as 0.

    Args:
        true_labels: [n] true labels, each in ``labels``.
        pred_labels: [n] predicted labels; ``None`` or unknown labels count as wrong.
        labels: [k] the full label list the confusion is built over.
        average_over: [m] the subset of ``labels`` to average over; all of ``labels`` when ``None``.

    Returns:
        Macro-F1 in ``[0, 1]``; NaN if no class in ``average_over`` has true examples or predictions.

    Raises:
        ValueError: as :func:`confusion_matrix`, or if ``average_over`` has labels not in ``labels``.
    """
    f1 = per_class_f1(true_labels, pred_labels, labels)
    return mean_defined(f1[subset_positions(labels, average_over)])


def metric_key(label: str) -> str:
    """Turn a label name into the snake_case suffix of a per-class metric key.

    Args:
        label: A label name, e.g. ``"Fill out Order"``.

    Returns:
        Its snake_case form, e.g. ``"fill_out_order"``.
    """
    return re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_")


def check_aligned(a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) == 0:
        raise ValueError("cannot compute metrics on empty input")
    if len(a) != len(b):
        raise ValueError(f"truths and predictions must be aligned, got lengths {len(a)} and {len(b)}")


def label_index(labels: Sequence[Hashable]) -> dict[Hashable, int]:
    if len(labels) == 0:
        raise ValueError("the label list is empty")
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        raise ValueError(f"the label list has duplicates: {list(labels)}")
    if INVALID in index:
        raise ValueError(f"{INVALID!r} is reserved for the invalid-prediction column")
    return index


def subset_positions(labels: Sequence[Hashable], subset: Sequence[Hashable] | None) -> np.ndarray:
    index = label_index(labels)
    if subset is None:
        return np.arange(len(index))
    missing = [label for label in subset if label not in index]
    if missing:
        raise ValueError(f"average_over has labels not in the label list: {missing}")
    return np.array([index[label] for label in subset], dtype=np.int64)


def recall_from_confusion(counts: np.ndarray) -> np.ndarray:
    support = counts.sum(axis=1)
    diagonal = np.diagonal(counts[:, : counts.shape[0]])
    return np.where(support > 0, diagonal / np.maximum(support, 1), np.nan)


def f1_from_confusion(counts: np.ndarray) -> np.ndarray:
    k = counts.shape[0]
    tp = np.diagonal(counts[:, :k]).astype(np.float64)
    fp = counts[:, :k].sum(axis=0) - tp
    fn = counts.sum(axis=1) - tp
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)


def mean_defined(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else math.nan
