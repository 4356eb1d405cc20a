"""Scoring the two-stage system (detector -> VLM) as it will really run. Pure numpy (the stages are injected).

Per image, the true objects (box + condition class) and the system's objects (box + detected type + score + the
condition class stage 2 gave it) are compared:

* **Detection** (stage 1 alone): predictions matched to true objects of the same type at IoU >= 0.5
  (:func:`opsvlm.tasks.inspection.detect.matching.match_boxes`); per type precision = matched / predicted and
  recall = matched / true.
* **Matched objects** (stage 2 on what stage 1 found): predictions matched to true objects regardless of type, so a
  box of the wrong type is still compared; the condition class (9 classes) of each matched pair gives accuracy and
  macro-F1, and ``type_accuracy`` says how often the detected type was right (stage 2 is constrained to the detected
  type's classes, so a wrong type is always a wrong class).
* **End to end**: every true object and every spurious prediction is one item. A matched object is right when its
  class is; a missed object is predicted as ``background`` (a miss of its class); a spurious prediction is a
  ``background`` truth predicted as its class (a false positive of that class). ``e2e/macro_f1`` is the mean F1
  over the 9 classes of that confusion, ``e2e/accuracy`` = right / (true objects + spurious predictions). With a
  perfect stage 1 (true boxes and types) both equal the classifier's own figures.

:func:`bootstrap_intervals` resamples images (objects of one image are not independent). Baselines that know the
type: :func:`type_majority` (the most frequent class of each type in training) applied to the detected objects or to
the true ones. :func:`run_two_stage` runs the stages on one image with injected callables and times them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from opsvlm.tasks.inspection.data.yolo import CONDITION_CLASSES, CONDITIONS, OBJECT_TYPES, class_condition
from opsvlm.tasks.inspection.detect.matching import as_boxes, match_boxes

__all__ = [
    "BACKGROUND",
    "ImageOutcome",
    "PredictedObject",
    "StageTimes",
    "TrueObject",
    "bootstrap_intervals",
    "match_outcome",
    "perfect_stage_one",
    "run_two_stage",
    "system_metrics",
    "type_majority",
    "vlm_classifier",
    "with_classes",
]

BACKGROUND = "background"
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class TrueObject:
    """A labelled object.

    Attributes:
        box: Normalised ``(x1, y1, x2, y2)``.
        class_name: Its condition class (one of :data:`opsvlm.tasks.inspection.data.yolo.CONDITION_CLASSES`).
    """

    box: Box
    class_name: str

    @property
    def object_type(self) -> str:
        """The class's object type."""
        return class_condition(self.class_name)[0]


@dataclass(frozen=True)
class PredictedObject:
    """An object the system reported.

    Attributes:
        box: Normalised ``(x1, y1, x2, y2)``.
        object_type: The type stage 1 gave it.
        score: Stage 1's score.
        class_name: The condition class stage 2 gave it, ``None`` when stage 2 gave no valid answer (a wrong answer).
    """

    box: Box
    object_type: str
    score: float
    class_name: str | None


@dataclass(frozen=True)
class ImageOutcome:
    """The true and the reported objects of one image."""

    image: str
    truths: tuple[TrueObject, ...]
    predictions: tuple[PredictedObject, ...]


def perfect_stage_one(outcome: ImageOutcome, classes: Sequence[str | None] | None = None) -> ImageOutcome:
    """The outcome a perfect detector would give: the true boxes and types, with ``classes`` (one per true object)
    as stage 2's answers (default: no answers yet)."""
    classes = list(classes) if classes is not None else [None] * len(outcome.truths)
    if len(classes) != len(outcome.truths):
        raise ValueError(f"{outcome.image}: {len(classes)} classes for {len(outcome.truths)} true objects")
    predictions = tuple(
        PredictedObject(t.box, t.object_type, 1.0, c) for t, c in zip(outcome.truths, classes, strict=True)
    )
    return replace(outcome, predictions=predictions)


def type_majority(classes: Iterable[str]) -> dict[str, str]:
    """The most frequent condition class of each object type (ties: alphabetically first); types never seen get
    their normal class."""
    counts: dict[str, Counter] = {kind: Counter() for kind in OBJECT_TYPES}
    for name in classes:
        counts[class_condition(name)[0]][name] += 1
    table = {}
    for kind, counter in counts.items():
        if counter:
            table[kind] = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        else:
            table[kind] = next(c for c in CONDITION_CLASSES if class_condition(c) == (kind, "normal"))
    return table


def with_classes(outcome: ImageOutcome, table: Mapping[str, str]) -> ImageOutcome:
    """``outcome`` with every prediction's class replaced by ``table[its type]`` (a type-aware baseline)."""
    return replace(outcome, predictions=tuple(replace(p, class_name=table[p.object_type]) for p in outcome.predictions))


# --- metrics -------------------------------------------------------------------------------------------------------


def _f1(counts: np.ndarray, k: int) -> np.ndarray:
    """F1 of the first ``k`` classes of a square-ish confusion (rows truth, columns predictions), NaN where neither
    truth nor predictions exist."""
    tp = np.diagonal(counts[:k, :k]).astype(np.float64)
    fn = counts[:k].sum(axis=1) - tp
    fp = counts[:, :k].sum(axis=0) - tp
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.full(k, np.nan), where=denom > 0)


def _confusion(truth: Sequence[str], pred: Sequence[str | None], labels: Sequence[str]) -> np.ndarray:
    """Counts [len(labels), len(labels) + 1]; the last column holds predictions outside ``labels`` (``None``)."""
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels) + 1), np.int64)
    for t, p in zip(truth, pred, strict=True):
        counts[index[t], index.get(p, len(labels)) if p is not None else len(labels)] += 1
    return counts


def _macro(truth: Sequence[str], pred: Sequence[str | None], labels: Sequence[str], k: int) -> float:
    if not truth:
        return float("nan")
    values = _f1(_confusion(truth, pred, labels), k)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _condition(name: str | None) -> str | None:
    if name is None:
        return None
    return name if name == BACKGROUND else class_condition(name)[1]


def match_outcome(outcome: ImageOutcome, iou_threshold: float = 0.5, same_type: bool = False) -> np.ndarray:
    """int64[P]: the true object each prediction of ``outcome`` is matched to (-1: spurious)."""
    preds, truths = outcome.predictions, outcome.truths
    types = (tuple(p.object_type for p in preds), tuple(t.object_type for t in truths)) if same_type else (None, None)
    return match_boxes(
        as_boxes([p.box for p in preds], f"{outcome.image}: predictions"),
        [p.score for p in preds],
        as_boxes([t.box for t in truths], f"{outcome.image}: truths"),
        iou_threshold,
        *types,
    )


@dataclass(frozen=True)
class _Items:
    """Per-outcome pieces the metrics are sums of (so a bootstrap replicate only concatenates them)."""

    det_tp: np.ndarray  # int[types]
    det_pred: np.ndarray  # int[types]
    det_true: np.ndarray  # int[types]
    matched_truth: tuple[str, ...]
    matched_pred: tuple[str | None, ...]
    matched_type_ok: tuple[bool, ...]
    e2e_truth: tuple[str, ...]
    e2e_pred: tuple[str | None, ...]


def _items(outcome: ImageOutcome, iou_threshold: float) -> _Items:
    kinds = {kind: i for i, kind in enumerate(OBJECT_TYPES)}
    det_tp, det_pred, det_true = (np.zeros(len(OBJECT_TYPES), np.int64) for _ in range(3))
    typed = match_outcome(outcome, iou_threshold, same_type=True)
    for p, m in zip(outcome.predictions, typed, strict=True):
        det_pred[kinds[p.object_type]] += 1
        det_tp[kinds[p.object_type]] += m >= 0
    for t in outcome.truths:
        det_true[kinds[t.object_type]] += 1
    agnostic = match_outcome(outcome, iou_threshold, same_type=False)
    matched_truth, matched_pred, type_ok = [], [], []
    e2e_truth, e2e_pred = [], []
    found = {int(m): i for i, m in enumerate(agnostic) if m >= 0}
    for j, t in enumerate(outcome.truths):
        if j in found:
            p = outcome.predictions[found[j]]
            matched_truth.append(t.class_name)
            matched_pred.append(p.class_name)
            type_ok.append(p.object_type == t.object_type)
            e2e_truth.append(t.class_name)
            e2e_pred.append(p.class_name)
        else:
            e2e_truth.append(t.class_name)
            e2e_pred.append(BACKGROUND)
    for p, m in zip(outcome.predictions, agnostic, strict=True):
        if m < 0:
            e2e_truth.append(BACKGROUND)
            e2e_pred.append(p.class_name)
    return _Items(
        det_tp,
        det_pred,
        det_true,
        tuple(matched_truth),
        tuple(matched_pred),
        tuple(type_ok),
        tuple(e2e_truth),
        tuple(e2e_pred),
    )


def _metrics_of(items: Sequence[_Items]) -> dict[str, float]:
    nan = float("nan")
    det_tp = sum((it.det_tp for it in items), np.zeros(len(OBJECT_TYPES), np.int64))
    det_pred = sum((it.det_pred for it in items), np.zeros(len(OBJECT_TYPES), np.int64))
    det_true = sum((it.det_true for it in items), np.zeros(len(OBJECT_TYPES), np.int64))
    m_truth = [t for it in items for t in it.matched_truth]
    m_pred = [p for it in items for p in it.matched_pred]
    m_type = [ok for it in items for ok in it.matched_type_ok]
    e_truth = [t for it in items for t in it.e2e_truth]
    e_pred = [p for it in items for p in it.e2e_pred]
    n_true, n_pred = int(det_true.sum()), int(det_pred.sum())
    n_spurious = sum(t == BACKGROUND for t in e_truth)
    n_missed = sum(p == BACKGROUND for p in e_pred)
    metrics: dict[str, float] = {
        "n_images": float(len(items)),
        "n_true": float(n_true),
        "n_pred": float(n_pred),
        "n_matched": float(len(m_truth)),
        "n_missed": float(n_missed),
        "n_spurious": float(n_spurious),
        "detection/precision": float(det_tp.sum() / n_pred) if n_pred else nan,
        "detection/recall": float(det_tp.sum() / n_true) if n_true else nan,
    }
    for i, kind in enumerate(OBJECT_TYPES):
        key = kind.replace(" ", "_")
        metrics[f"detection/precision/{key}"] = float(det_tp[i] / det_pred[i]) if det_pred[i] else nan
        metrics[f"detection/recall/{key}"] = float(det_tp[i] / det_true[i]) if det_true[i] else nan
    labels = [*CONDITION_CLASSES, BACKGROUND]
    k = len(CONDITION_CLASSES)
    metrics["matched/type_accuracy"] = float(np.mean(m_type)) if m_type else nan
    metrics["matched/accuracy"] = (
        float(np.mean([t == p for t, p in zip(m_truth, m_pred, strict=True)])) if m_truth else nan
    )
    metrics["matched/macro_f1"] = _macro(m_truth, m_pred, labels, k)
    cond_labels = [*CONDITIONS, BACKGROUND]
    metrics["matched/condition_macro_f1"] = _macro(
        [_condition(t) for t in m_truth], [_condition(p) for p in m_pred], cond_labels, len(CONDITIONS)
    )
    correct = sum(t == p and t != BACKGROUND for t, p in zip(e_truth, e_pred, strict=True))
    metrics["e2e/accuracy"] = float(correct / len(e_truth)) if e_truth else nan
    metrics["e2e/macro_f1"] = _macro(e_truth, e_pred, labels, k)
    metrics["e2e/condition_macro_f1"] = _macro(
        [_condition(t) for t in e_truth], [_condition(p) for p in e_pred], cond_labels, len(CONDITIONS)
    )
    return metrics


def system_metrics(outcomes: Sequence[ImageOutcome], iou_threshold: float = 0.5) -> dict[str, float]:
    """Detection, matched-object and end-to-end figures of a set of images (see the module docstring).

    Keys: ``n_images``, ``n_true``, ``n_pred``, ``n_matched``, ``n_missed``, ``n_spurious``;
    ``detection/precision``, ``detection/recall`` (over all types) and ``detection/{precision,recall}/<type>``;
    ``matched/{type_accuracy,accuracy,macro_f1,condition_macro_f1}``; ``e2e/{accuracy,macro_f1,condition_macro_f1}``.
    Undefined figures (no predictions, no true objects of a type) are NaN.

    Raises:
        ValueError: a class or type name that is not one of the task's, or malformed boxes (naming the image).
    """
    for outcome in outcomes:
        for t in outcome.truths:
            class_condition(t.class_name)  # raises on an unknown class
        for p in outcome.predictions:
            if p.object_type not in OBJECT_TYPES:
                raise ValueError(f"{outcome.image}: unknown object type {p.object_type!r}")
            if p.class_name is not None:
                class_condition(p.class_name)
    return _metrics_of([_items(o, iou_threshold) for o in outcomes])


def bootstrap_intervals(
    outcomes: Sequence[ImageOutcome],
    iou_threshold: float = 0.5,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of every :func:`system_metrics` figure, resampling images with replacement.

    Returns:
        ``{metric: (low, high)}``; NaN bounds where a figure is undefined on too many replicates (over half).
    """
    if not outcomes:
        raise ValueError("no images to bootstrap")
    items = [_items(o, iou_threshold) for o in outcomes]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        sample = rng.integers(0, len(items), len(items))
        for key, value in _metrics_of([items[i] for i in sample]).items():
            draws.setdefault(key, []).append(value)
    tail = (1 - level) / 2 * 100
    out = {}
    for key, values in draws.items():
        array = np.asarray(values)
        finite = array[np.isfinite(array)]
        if len(finite) * 2 < len(array):
            out[key] = (float("nan"), float("nan"))
        else:
            out[key] = (float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail)))
    return out


# --- running both stages -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageTimes:
    """Seconds spent on one image: stage 1 (detection) and stage 2 (classifying every detected object)."""

    detect_s: float
    classify_s: float
    objects: int


def run_two_stage(
    image: np.ndarray,
    detect: Callable[[np.ndarray], Sequence],
    classify: Callable[[np.ndarray, Sequence[tuple[str, Box]]], Sequence[str | None]],
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[PredictedObject], StageTimes]:
    """Stage 1 then stage 2 on one image.

    Args:
        image: uint8[H, W, 3] RGB.
        detect: Image -> detections with ``box`` (normalised), ``object_type`` and ``score`` (a
            :class:`~opsvlm.tasks.inspection.detect.detector.Detector`'s ``detect``).
        classify: ``(image, [(object type, box), ...]) -> [condition class or None, ...]`` (see
            :func:`vlm_classifier`); not called when nothing is detected.
        clock: Seconds (injected for tests).

    Returns:
        The system's objects and the time each stage took.
    """
    start = clock()
    detections = list(detect(image))
    mid = clock()
    objects = [(d.object_type, tuple(d.box)) for d in detections]
    classes = list(classify(image, objects)) if objects else []
    end = clock()
    if len(classes) != len(objects):
        raise ValueError(f"classify returned {len(classes)} answers for {len(objects)} objects")
    predictions = [
        PredictedObject(tuple(d.box), d.object_type, float(d.score), c)
        for d, c in zip(detections, classes, strict=True)
    ]
    return predictions, StageTimes(mid - start, end - mid, len(objects))


def vlm_classifier(predictor, spec) -> Callable[[np.ndarray, Sequence[tuple[str, Box]]], list[str | None]]:
    """Stage 2 as :func:`run_two_stage` takes it: every object of an image in one ``predictor.predict`` call, each
    in turn the target and the others its context (exactly as ``/predict_objects`` serves it).

    Args:
        predictor: An :class:`opsvlm.inference.Predictor` of an inspection model (or anything with ``predict``).
        spec: Its SamplingSpec.
    """
    from opsvlm.tasks.inspection import object_input

    def classify(image: np.ndarray, objects: Sequence[tuple[str, Box]]) -> list[str | None]:
        inputs = [
            object_input(image, box, kind, [o for j, o in enumerate(objects) if j != i], spec)
            for i, (kind, box) in enumerate(objects)
        ]
        answers = predictor.predict(inputs)
        return [None if a is None else a.condition for a in answers]

    return classify
