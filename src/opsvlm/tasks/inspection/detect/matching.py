"""Matching predicted boxes to true boxes, detection precision/recall and average precision. Pure numpy.

* :func:`box_iou`: IoU of every pair of ``(x1, y1, x2, y2)`` boxes.
* :func:`match_boxes`: greedy matching as in COCO / Ultralytics evaluation: predictions in descending score order
  (ties: input order), each takes the still-unmatched true box it overlaps most with IoU >= the threshold (and of
  the same type when ``same_type``). Each true box is matched at most once; a prediction without a match is a false
  positive, a true box without one a miss.
* :func:`average_precision`: area under the precision-recall curve of scored predictions (COCO's 101-point
  interpolation of the precision envelope), for one type over a set of images.
* :func:`detection_map`: AP per type at IoU 0.5 and averaged over IoU 0.50:0.05:0.95, and their means over the types
  with true objects (mAP@0.5, mAP@0.5:0.95).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "COCO_IOUS",
    "ImageBoxes",
    "as_boxes",
    "average_precision",
    "box_iou",
    "detection_map",
    "image_hits",
    "map_from_hits",
    "match_boxes",
]

COCO_IOUS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def as_boxes(boxes: object, name: str = "boxes") -> np.ndarray:
    """``boxes`` as float64[N, 4]; an empty sequence is float64[0, 4].

    Raises:
        ValueError: not N x 4, or a box with x2 < x1 or y2 < y1 (naming ``name``).
    """
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), np.float64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name}: expected [N, 4] boxes (x1, y1, x2, y2), got shape {list(array.shape)}")
    if np.any(array[:, 2] < array[:, 0]) or np.any(array[:, 3] < array[:, 1]):
        raise ValueError(f"{name}: every box needs x2 >= x1 and y2 >= y1")
    return array


def box_iou(a: object, b: object) -> np.ndarray:
    """IoU of every pair of boxes.

    Args:
        a: [N, 4] boxes ``(x1, y1, x2, y2)``.
        b: [M, 4] boxes in the same units.

    Returns:
        float64[N, M]; 0 where the union is empty.
    """
    a, b = as_boxes(a, "a"), as_boxes(b, "b")
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_boxes(
    pred_boxes: object,
    pred_scores: object,
    true_boxes: object,
    iou_threshold: float = 0.5,
    pred_types: Sequence[str] | None = None,
    true_types: Sequence[str] | None = None,
) -> np.ndarray:
    """Greedy one-to-one matching of predictions to true boxes (see the module docstring).

    Args:
        pred_boxes: [P, 4] predicted boxes.
        pred_scores: [P] their scores.
        true_boxes: [T, 4] true boxes.
        iou_threshold: Minimum IoU of a match.
        pred_types: [P] predicted types; with ``true_types``, only boxes of the same type match.
        true_types: [T] true types.

    Returns:
        int64[P]: the matched true box index of each prediction, -1 for none.
    """
    preds, truths = as_boxes(pred_boxes, "pred_boxes"), as_boxes(true_boxes, "true_boxes")
    scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(preds):
        raise ValueError(f"pred_scores: {len(scores)} scores for {len(preds)} boxes")
    if (pred_types is None) != (true_types is None):
        raise ValueError("give both pred_types and true_types, or neither")
    if pred_types is not None and (len(pred_types) != len(preds) or len(true_types) != len(truths)):
        raise ValueError("pred_types / true_types must have one entry per box")
    matched = np.full(len(preds), -1, np.int64)
    if len(preds) == 0 or len(truths) == 0:
        return matched
    iou = box_iou(preds, truths)
    if pred_types is not None:
        same = np.array([[p == t for t in true_types] for p in pred_types], dtype=bool)
        iou = np.where(same, iou, 0.0)
    taken = np.zeros(len(truths), dtype=bool)
    for p in np.argsort(-scores, kind="stable"):
        candidates = np.where(taken, -1.0, iou[p])
        best = int(np.argmax(candidates))
        if candidates[best] >= iou_threshold and candidates[best] > 0:
            matched[p] = best
            taken[best] = True
    return matched


def average_precision(scores: object, is_tp: object, n_true: int) -> float:
    """Average precision of scored predictions against ``n_true`` true objects (101-point interpolation, COCO).

    Args:
        scores: [P] prediction scores (over all images).
        is_tp: [P] whether each prediction is a true positive (matched at the IoU in question).
        n_true: Number of true objects.

    Returns:
        AP in [0, 1]; NaN when ``n_true`` is 0 (undefined: left out of means).
    """
    if n_true <= 0:
        return float("nan")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    hits = np.asarray(is_tp, dtype=bool).reshape(-1)
    if len(scores) != len(hits):
        raise ValueError(f"is_tp: {len(hits)} flags for {len(scores)} scores")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(hits[order])
    fp = np.cumsum(~hits[order])
    recall = tp / n_true
    precision = tp / (tp + fp)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
    points = np.linspace(0.0, 1.0, 101)
    idx = np.searchsorted(recall, points, side="left")
    interpolated = np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0.0)
    return float(interpolated.mean())


@dataclass(frozen=True)
class ImageBoxes:
    """Predicted and true boxes of one image (any consistent units, e.g. normalised).

    Attributes:
        pred_boxes: float[P, 4].
        pred_scores: float[P].
        pred_types: [P] predicted types.
        true_boxes: float[T, 4].
        true_types: [T] true types.
    """

    pred_boxes: np.ndarray
    pred_scores: np.ndarray
    pred_types: tuple[str, ...]
    true_boxes: np.ndarray
    true_types: tuple[str, ...]

    @classmethod
    def of(cls, pred_boxes, pred_scores, pred_types, true_boxes, true_types) -> ImageBoxes:
        """Build with validation (shapes, one type per box)."""
        pb, tb = as_boxes(pred_boxes, "pred_boxes"), as_boxes(true_boxes, "true_boxes")
        ps = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
        if len(ps) != len(pb) or len(pred_types) != len(pb) or len(true_types) != len(tb):
            raise ValueError("one score and type per predicted box and one type per true box are needed")
        return cls(pb, ps, tuple(pred_types), tb, tuple(true_types))


def image_hits(
    image: ImageBoxes, types: Sequence[str], ious: Sequence[float] = COCO_IOUS
) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """One image's scored predictions per type: ``{type: (scores float[P], hits bool[len(ious), P], n_true)}``.

    Matching is within an image, so these pieces are fixed per image; AP pools them over images (and a bootstrap
    replicate only re-pools them).
    """
    out = {}
    for kind in types:
        pmask = np.array([p == kind for p in image.pred_types], dtype=bool).reshape(-1)
        tmask = np.array([t == kind for t in image.true_types], dtype=bool).reshape(-1)
        n_true = int(tmask.sum())
        scores = image.pred_scores[pmask] if len(pmask) else np.zeros(0)
        hits = np.zeros((len(ious), len(scores)), dtype=bool)
        if len(scores) and n_true:
            truths = image.true_boxes[tmask]
            for i, threshold in enumerate(ious):
                hits[i] = match_boxes(image.pred_boxes[pmask], scores, truths, threshold) >= 0
        out[kind] = (scores, hits, n_true)
    return out


def map_from_hits(
    per_image: Sequence[dict[str, tuple[np.ndarray, np.ndarray, int]]],
    types: Sequence[str],
    ious: Sequence[float] = COCO_IOUS,
) -> dict:
    """:func:`detection_map` from :func:`image_hits` pieces (pooled over the images given)."""
    ap50: dict[str, float] = {}
    ap_all: dict[str, float] = {}
    n_true: dict[str, int] = {}
    for kind in types:
        count = sum(hits[kind][2] for hits in per_image)
        n_true[kind] = count
        scores = np.concatenate([hits[kind][0] for hits in per_image]) if per_image else np.zeros(0)
        matched = (
            np.concatenate([hits[kind][1] for hits in per_image], axis=1)
            if per_image
            else np.zeros((len(ious), 0), bool)
        )
        per_iou = [average_precision(scores, matched[i], count) for i in range(len(ious))]
        ap50[kind] = per_iou[0]
        ap_all[kind] = float(np.mean(per_iou)) if count else float("nan")
    defined = [k for k in types if n_true[k] > 0]
    return {
        "ap50": ap50,
        "ap50_95": ap_all,
        "map50": float(np.mean([ap50[k] for k in defined])) if defined else float("nan"),
        "map50_95": float(np.mean([ap_all[k] for k in defined])) if defined else float("nan"),
        "n_true": n_true,
    }


def detection_map(images: Sequence[ImageBoxes], types: Sequence[str], ious: Sequence[float] = COCO_IOUS) -> dict:
    """AP per type and mAP over a set of images, type-aware matching at each IoU threshold.

    Args:
        images: Predictions (all of them: evaluate with a low score threshold) and truths per image.
        types: The types to score.
        ious: IoU thresholds; the first must be 0.5 (AP@0.5), their mean AP is AP@0.5:0.95 for COCO_IOUS.

    Returns:
        ``{"ap50": {type: AP}, "ap50_95": {type: AP}, "map50": float, "map50_95": float, "n_true": {type: n}}``;
        types without true objects have NaN AP and stay out of the means (NaN if no type has any).
    """
    return map_from_hits([image_hits(im, types, ious) for im in images], types, ious)
