"""The ``inspection`` task: the condition of one object in an infrastructure-inspection image.

A stage-1 detector finds slope drains, toe drains, rock toes and vegetation; for each object the VLM names its class
among the 9 condition classes of :data:`opsvlm.tasks.inspection.data.yolo.CONDITION_CLASSES` (``"Toe drain- Blocked"``,
``"rock toe damaged"``, ...). One example is one object: the model sees the whole image with the target's box drawn
on it (:func:`render_input`) and a close-up of the target (:func:`render_closeup`: the box plus a margin, at the same
pixel budget), and the prompt states the target's box in normalised coordinates, its detected type and the other
detected objects with their position relative to the target (:func:`spatial_relation`). The close-up is there
because a condition (debris in a drain, a crack) covers a few pixels of the whole image at the sizes a VLM is fed;
the whole image keeps the layout. The answer::

    {"condition": "<label>"}

Slots: 0 ``{"condition": "``, 1 the label, 2 ``"}``. When the target's object type is known (a two-stage system
always knows it: stage 1 detected the object *as* a toe drain, a rock toe, ...), slot 1 allows only that type's
classes (a toe drain is normal, blocked or damaged; it cannot be "vegetation"); with an unknown type all 9.

Labels are prefixes of one another (``"rock toe"`` / ``"rock toe damaged"``); the token trie of
:class:`opsvlm.inference.AnswerConstraint` handles that because the slot ends at the closing quote, whose token can
never continue a label (a unit test drives the walk for every label).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from opsvlm.tasks.base import Task, register_task
from opsvlm.tasks.inspection.data.yolo import CONDITION_CLASSES, CONDITIONS, OBJECT_TYPES, class_condition
from opsvlm.video.sampling import SamplingSpec

__all__ = [
    "ANSWER_PARTS",
    "CLASSES_OF_TYPE",
    "CLOSEUP_MARGIN",
    "DEAD_ZONE",
    "MAX_OTHERS",
    "NON_VEGETATION_CLASSES",
    "OVERLAP_FRACTION",
    "ConditionAnswer",
    "InspectionTask",
    "ObjectInput",
    "allowed_classes",
    "compute_metrics",
    "default_thickness",
    "instruction",
    "mark_target",
    "object_input",
    "parse_answer",
    "render_closeup",
    "render_input",
    "resize_image",
    "spatial_relation",
    "target_text",
]

Box = tuple[float, float, float, float]

# The answer's fixed pieces around the label slot; each falls on a pre-tokenizer boundary of Qwen's tokenizer
# (`` "`` then letters; ``"}`` after letters), so slot-by-slot tokenization equals whole-answer tokenization.
ANSWER_PARTS = ('{"condition": "', '"}')

# spatial_relation: centre offsets below this (normalised image units) count as "same row / column"
DEAD_ZONE = 0.05
# ... and boxes whose intersection covers at least this share of the smaller box are "overlapping"
OVERLAP_FRACTION = 0.5
# prompts list at most this many other objects, nearest first (an image rarely holds more; keeps prompts short)
MAX_OTHERS = 16

CLASSES_OF_TYPE: dict[str, tuple[str, ...]] = {
    kind: tuple(name for name in CONDITION_CLASSES if class_condition(name)[0] == kind) for kind in OBJECT_TYPES
}
# the classes with a condition to tell apart (an object type with a single class has nothing to classify)
NON_VEGETATION_CLASSES: tuple[str, ...] = tuple(
    name for kind, names in CLASSES_OF_TYPE.items() if len(names) > 1 for name in names
)


def _check_box(box: Sequence[float], what: str) -> Box:
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be 4 numbers (x1, y1, x2, y2), got {box!r}") from None
    if not (0.0 <= x1 <= x2 <= 1.0 and 0.0 <= y1 <= y2 <= 1.0):
        raise ValueError(f"{what} must be normalised with 0 <= x1 <= x2 <= 1 and 0 <= y1 <= y2 <= 1, got {box!r}")
    return (x1, y1, x2, y2)


@dataclass
class ObjectInput:
    """One object to classify.

    Attributes:
        image: uint8[H, W, 3] the whole image, already resized with the model's ``SamplingSpec.target_size`` and with
            the target's box drawn on it (:func:`render_input`).
        closeup: uint8[h, w, 3] the target with a margin around it, resized the same way (:func:`render_closeup`);
            ``None`` for a prompt with the whole image only.
        target_box: ``(x1, y1, x2, y2)`` of the target, normalised to [0, 1].
        target_type: The target's object type from stage 1 (one of ``OBJECT_TYPES``), or ``None`` when unknown.
        others: ``(object type, box)`` of every other detected object in the image.
    """

    image: np.ndarray
    target_box: Box
    target_type: str | None = None
    others: tuple[tuple[str, Box], ...] = ()
    closeup: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.target_box = _check_box(self.target_box, "target_box")
        if self.target_type is not None and self.target_type not in OBJECT_TYPES:
            raise ValueError(f"target_type must be one of {list(OBJECT_TYPES)} or None, got {self.target_type!r}")
        others = []
        for i, (kind, box) in enumerate(self.others):
            if kind not in OBJECT_TYPES:
                raise ValueError(f"others[{i}]: object type must be one of {list(OBJECT_TYPES)}, got {kind!r}")
            others.append((kind, _check_box(box, f"others[{i}] box")))
        self.others = tuple(others)


@dataclass
class ConditionAnswer:
    """A validated answer: a condition class (of the target's type when that is known).

    Attributes:
        condition: One of the 9 condition classes.
        confidence: Probability of ``condition`` under the constrained distribution (1.0 for parsed free text).
        scores: Probability per class (classes the constraint did not allow get 0).
        text: The generated text.
    """

    condition: str
    confidence: float = 1.0
    scores: dict[str, float] = field(default_factory=dict)
    text: str = ""

    @property
    def object_type(self) -> str:
        """The object type the class names (``"toe drain"``, ...)."""
        return class_condition(self.condition)[0]

    @property
    def condition_kind(self) -> str:
        """``normal``, ``blocked`` or ``damaged``."""
        return class_condition(self.condition)[1]

    def to_dict(self) -> dict:
        """JSON-ready form (what serving returns for one object)."""
        return {
            "condition": self.condition,
            "object_type": self.object_type,
            "condition_kind": self.condition_kind,
            "confidence": self.confidence,
            "scores": self.scores,
        }


# --- geometry: relations, marking, rendering -----------------------------------------------------------------------


def _axis(a1: float, a2: float, b1: float, b2: float, before: str, after: str) -> str:
    """One axis of :func:`spatial_relation`: ``before``/``after`` or ``""`` when the two are aligned on it."""
    ca, cb = (a1 + a2) / 2, (b1 + b2) / 2
    if abs(ca - cb) <= DEAD_ZONE or a1 <= cb <= a2 or b1 <= ca <= b2:
        return ""
    return before if ca < cb else after


def spatial_relation(box_a: Sequence[float], box_b: Sequence[float]) -> str:
    """Where box ``a`` lies relative to box ``b``, in image terms (y grows downwards).

    Boxes overlapping a lot (the intersection covers at least :data:`OVERLAP_FRACTION` of the smaller box) are
    ``"overlapping"``. Otherwise each axis adds a word (``"above"``/``"below"``, ``"left"``/``"right"``, combined as
    ``"below-left"``) unless the two are aligned on it: their centres are within :data:`DEAD_ZONE` of each other, or
    one box's extent on that axis contains the other's centre (a rock toe running across the whole image is
    ``"below"`` a drain, not ``"below-right"`` of it). Aligned on both axes is ``"overlapping"``.

    Args:
        box_a: ``(x1, y1, x2, y2)`` normalised.
        box_b: ``(x1, y1, x2, y2)`` normalised.

    Returns:
        One of ``above``, ``below``, ``left``, ``right``, ``above-left``, ``above-right``, ``below-left``,
        ``below-right``, ``overlapping``.
    """
    ax1, ay1, ax2, ay2 = box_a
    bx1, by1, bx2, by2 = box_b
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    smaller = min((ax2 - ax1) * (ay2 - ay1), (bx2 - bx1) * (by2 - by1))
    if smaller > 0 and inter >= OVERLAP_FRACTION * smaller:
        return "overlapping"
    vertical = _axis(ay1, ay2, by1, by2, "above", "below")
    horizontal = _axis(ax1, ax2, bx1, bx2, "left", "right")
    return "-".join(part for part in (vertical, horizontal) if part) or "overlapping"


def default_thickness(height: int, width: int) -> int:
    """Outline thickness for an image of ``height x width``: ~0.6 % of the longer side, at least 2 px.

    A 1920-px image gets 12 px, which is still ~1.4 px after the 8.6x downscale to 224 px.
    """
    return max(2, round(0.006 * max(height, width)))


def mark_target(
    image: np.ndarray, box: Sequence[float], color: tuple[int, int, int] = (255, 0, 0), thickness: int | None = None
) -> np.ndarray:
    """Draw the outline of a normalised box on a copy of an image.

    The outline is centred on the box's edges (half outside, half inside; clipped at the image border), so the
    object itself stays visible and a box touching the border still gets a visible line.

    Args:
        image: uint8[H, W, 3].
        box: ``(x1, y1, x2, y2)`` normalised to [0, 1].
        color: RGB of the outline.
        thickness: Line width in pixels; default :func:`default_thickness` (scaled to the image size).

    Returns:
        uint8[H, W, 3], a new array.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
    x1, y1, x2, y2 = _check_box(box, "box")
    height, width = image.shape[:2]
    t = thickness if thickness is not None else default_thickness(height, width)
    if t < 1:
        raise ValueError(f"thickness must be >= 1, got {t}")
    px1, px2 = round(x1 * width), round(x2 * width)
    py1, py2 = round(y1 * height), round(y2 * height)
    out_half, in_half = t // 2, t - t // 2
    top, bottom = max(0, py1 - out_half), min(height, py2 + out_half)
    left, right = max(0, px1 - out_half), min(width, px2 + out_half)
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    if py1 + in_half < py2 - in_half and px1 + in_half < px2 - in_half:
        mask[py1 + in_half : py2 - in_half, px1 + in_half : px2 - in_half] = False
    out = image.copy()
    out[mask] = np.asarray(color, dtype=np.uint8)
    return out


def resize_image(image: np.ndarray, spec: SamplingSpec) -> np.ndarray:
    """An image resized (bicubic) to ``spec.target_size``: aspect kept, within the spec's pixel limits.

    Args:
        image: uint8[H, W, 3].
        spec: The model's SamplingSpec (only its pixel limits and size multiple matter for images).

    Returns:
        uint8[h, w, 3] with ``(h, w) = spec.target_size(H, W)`` (the input itself when it already has that size).
    """
    from PIL import Image

    height, width = spec.target_size(image.shape[0], image.shape[1])
    if (height, width) == image.shape[:2]:
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def render_input(image: np.ndarray, target_box: Sequence[float], spec: SamplingSpec) -> np.ndarray:
    """The pixels the model sees: the image resized with ``spec.target_size`` (:func:`resize_image`), then the
    target marked (:func:`mark_target`). Marking after resizing keeps the outline's width right at the size the model
    sees.

    Args:
        image: uint8[H, W, 3] the decoded image.
        target_box: ``(x1, y1, x2, y2)`` normalised.
        spec: The model's SamplingSpec.

    Returns:
        uint8[h, w, 3] with ``(h, w) = spec.target_size(H, W)``.
    """
    return mark_target(resize_image(image, spec), target_box)


CLOSEUP_MARGIN = 0.25  # context around the target in its close-up, as a fraction of the box's larger side


def render_closeup(image: np.ndarray, target_box: Sequence[float], spec: SamplingSpec) -> np.ndarray:
    """The target's close-up: its box plus a margin, cut from the full-resolution image, resized like the image.

    Args:
        image: uint8[H, W, 3] the decoded image (full resolution, so the close-up keeps the detail).
        target_box: ``(x1, y1, x2, y2)`` normalised.
        spec: The model's SamplingSpec.

    Returns:
        uint8[h, w, 3] with ``(h, w) = spec.target_size`` of the cut.
    """
    height, width = image.shape[:2]
    x1, y1, x2, y2 = _check_box(target_box, "target_box")
    margin = CLOSEUP_MARGIN * max((x2 - x1) * width, (y2 - y1) * height)
    left, right = max(0, math.floor(x1 * width - margin)), min(width, math.ceil(x2 * width + margin))
    top, bottom = max(0, math.floor(y1 * height - margin)), min(height, math.ceil(y2 * height + margin))
    return resize_image(np.ascontiguousarray(image[top : max(bottom, top + 1), left : max(right, left + 1)]), spec)


def object_input(
    image: np.ndarray,
    target_box: Sequence[float],
    target_type: str | None,
    others: Sequence[tuple[str, Sequence[float]]],
    spec: SamplingSpec,
) -> ObjectInput:
    """The model input for one object of a decoded image, rendered exactly as in training, evaluation and serving.

    Args:
        image: uint8[H, W, 3] the decoded image.
        target_box: The target's normalised box.
        target_type: Its stage-1 object type, or ``None``.
        others: ``(object type, normalised box)`` of the other objects.
        spec: The model's SamplingSpec.
    """
    return ObjectInput(
        render_input(image, target_box, spec),
        tuple(target_box),
        target_type,
        tuple((kind, tuple(box)) for kind, box in others),
        render_closeup(image, target_box, spec),
    )


# --- prompt and answer ---------------------------------------------------------------------------------------------


_NOUN = {
    "toe drain": "a toe drain",
    "rock toe": "a rock toe",
    "slope drain": "a slope drain",
    "vegetation": "vegetation",
}


def _box_text(box: Box) -> str:
    return "({:.2f}, {:.2f}, {:.2f}, {:.2f})".format(*box)


def _distance(a: Box, b: Box) -> float:
    return math.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2)


def instruction(example: ObjectInput) -> str:
    """The user instruction for one object: label set, the target's box and type, the other objects' positions.

    Other objects are listed nearest first (at most :data:`MAX_OTHERS`, the rest counted) with their position
    relative to the target, e.g. ``rock toe above, vegetation below-left``.
    """
    labels = ", ".join(CONDITION_CLASSES)
    kind = f"detected as {_NOUN[example.target_type]}" if example.target_type else "of unknown type"
    others = sorted(example.others, key=lambda other: _distance(other[1], example.target_box))
    if others:
        listed = [f"{kind_} {spatial_relation(box, example.target_box)}" for kind_, box in others[:MAX_OTHERS]]
        more = f" and {len(others) - MAX_OTHERS} more" if len(others) > MAX_OTHERS else ""
        context = f"Other detected objects, relative to the target: {', '.join(listed)}{more}."
    else:
        context = "No other objects were detected."
    closeup = " The second image is a close-up of the target." if example.closeup is not None else ""
    return (
        f"This is an infrastructure-inspection image.{closeup} The target object is outlined in red at "
        f"{_box_text(example.target_box)} (x1, y1, x2, y2 as fractions of the image width and height, origin top "
        f"left), {kind}. {context} Condition classes: {labels}. Reply with JSON: the condition class of the target."
    )


def target_text(condition: str) -> str:
    """The compact JSON answer the model is trained to produce."""
    return f"{ANSWER_PARTS[0]}{condition}{ANSWER_PARTS[1]}"


def allowed_classes(target_type: str | None) -> tuple[str, ...]:
    """The classes an object of ``target_type`` can have (all 9 when the type is unknown)."""
    return CONDITION_CLASSES if target_type is None else CLASSES_OF_TYPE[target_type]


def parse_answer(text: str, target_type: str | None = None) -> ConditionAnswer | None:
    """Parse and validate free text; ``None`` when it is not a valid answer (counted as a parse failure).

    The first ``{...}`` object in the text is read; its ``condition`` must be a class, and one of
    ``target_type``'s classes when the type is known.
    """
    start, end = text.find("{"), text.find("}")
    if start < 0 or end < start:
        return None
    try:
        data = json.loads(text[start : end + 1])
        condition = data["condition"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(condition, str) or condition not in allowed_classes(target_type):
        return None
    return ConditionAnswer(condition, text=text)


# --- metrics -------------------------------------------------------------------------------------------------------


def _condition_of(answer: Any) -> str | None:
    if answer is None:
        return None
    return answer["condition"] if isinstance(answer, Mapping) else answer.condition


def _parts(label: str | None, index: int) -> str | None:
    return class_condition(label)[index] if label in CONDITION_CLASSES else None


def compute_metrics(rows: Sequence[Mapping[str, Any]], answers: Sequence[Any | None]) -> dict[str, float]:
    """Condition-classification metrics as a flat dict with MLflow-friendly names.

    Unparsed answers (``None``) and unknown classes count as wrong and stay in every denominator. Keys:

    * ``n_examples``, ``accuracy``, ``macro_f1`` (over the 9 classes; classes with neither truth nor predictions
      are left out of the mean), ``class_mean_recall``, ``parse_failure_rate``;
    * ``macro_f1_non_vegetation``: macro-F1 over the 8 classes that carry a condition. Vegetation has one class, so
      once its type is given it is right for free and lifts ``macro_f1`` without any condition being seen;
    * ``recall/<class>`` (classes with support), ``precision/<class>`` (classes predicted at least once),
      ``f1/<class>`` (where defined);
    * per condition (``normal`` / ``blocked`` / ``damaged``, from the class names): ``condition_accuracy`` and
      ``condition_macro_f1`` of the condition alone (3 classes), ``f1_condition/<condition>``, and
      ``accuracy_by_condition/<condition>``: 9-class accuracy over the objects that truly have that condition;
    * per object type: ``object_type_accuracy`` (the predicted class names the right type) and
      ``accuracy_by_type/<type>``: 9-class accuracy over the objects of that type.

    ``<class>`` etc. are :func:`opsvlm.metrics.metric_key` forms (``toe_drain_blocked``).

    Args:
        rows: [n] prepared rows (only ``condition`` is read).
        answers: [n] :class:`ConditionAnswer`, mappings with ``condition``, or ``None``.

    Raises:
        ValueError: empty or misaligned inputs, or a true condition that is not a class.
    """
    from opsvlm.metrics import accuracy, confusion_matrix, macro_f1, metric_key, per_class_f1

    if len(rows) != len(answers):
        raise ValueError(f"rows and answers must be aligned, got lengths {len(rows)} and {len(answers)}")
    truth = [row["condition"] for row in rows]
    pred = [_condition_of(a) for a in answers]
    labels = CONDITION_CLASSES
    counts = confusion_matrix(truth, pred, labels)  # [9, 10]; validates truth and non-emptiness
    k = len(labels)
    tp = np.diagonal(counts[:, :k]).astype(np.float64)
    support, predicted = counts.sum(axis=1), counts[:, :k].sum(axis=0)
    f1 = per_class_f1(truth, pred, labels)

    n = len(truth)
    metrics: dict[str, float] = {
        "n_examples": float(n),
        "accuracy": accuracy(truth, pred),
        "macro_f1": macro_f1(truth, pred, labels),
        "macro_f1_non_vegetation": macro_f1(truth, pred, labels, average_over=NON_VEGETATION_CLASSES),
        "class_mean_recall": float(np.mean(tp[support > 0] / support[support > 0])),
        "parse_failure_rate": sum(p is None for p in pred) / n,
    }
    for i, name in enumerate(labels):
        key = metric_key(name)
        if support[i]:
            metrics[f"recall/{key}"] = float(tp[i] / support[i])
        if predicted[i]:
            metrics[f"precision/{key}"] = float(tp[i] / predicted[i])
        if not np.isnan(f1[i]):
            metrics[f"f1/{key}"] = float(f1[i])

    true_kind = [_parts(t, 1) for t in truth]
    pred_kind = [_parts(p, 1) for p in pred]
    metrics["condition_accuracy"] = accuracy(true_kind, pred_kind)
    metrics["condition_macro_f1"] = macro_f1(true_kind, pred_kind, CONDITIONS)
    for kind, value in zip(CONDITIONS, per_class_f1(true_kind, pred_kind, CONDITIONS), strict=True):
        if not np.isnan(value):
            metrics[f"f1_condition/{metric_key(kind)}"] = float(value)
    true_type = [_parts(t, 0) for t in truth]
    metrics["object_type_accuracy"] = accuracy(true_type, [_parts(p, 0) for p in pred])
    for group, keys, prefix in (
        (CONDITIONS, true_kind, "accuracy_by_condition"),
        (OBJECT_TYPES, true_type, "accuracy_by_type"),
    ):
        for value in group:
            members = [i for i, g in enumerate(keys) if g == value]
            if members:
                metrics[f"{prefix}/{metric_key(value)}"] = accuracy(
                    [truth[i] for i in members], [pred[i] for i in members]
                )
    return metrics


# --- the task ------------------------------------------------------------------------------------------------------


@register_task
class InspectionTask(Task):
    """Condition class of one object in an inspection image (see the module docstring).

    Inputs are :class:`ObjectInput`; prepared rows follow :data:`opsvlm.data.inspection_prep.EXAMPLE_SCHEMA` (one
    row per object: the rendered image, the target's box and type, the other objects); answers are
    :class:`ConditionAnswer`. Slots: 0 ``{"condition": "``, 1 label, 2 ``"}``. When the target's type is known
    (stage 1 of a two-stage system detected the object as that type), slot 1 allows only that type's classes.
    """

    name = "inspection"
    media = "image"
    labels = CONDITION_CLASSES
    label_slots: ClassVar[dict[int, str]] = {1: "condition"}
    headline_metric = "macro_f1"
    unit = "objects"
    table_metrics = ("macro_f1", "macro_f1_non_vegetation", "accuracy", "condition_macro_f1", "parse_failure_rate")

    def instruction(self, example: ObjectInput) -> str:
        return instruction(example)

    def messages(self, example: ObjectInput) -> list[dict]:
        images = [{"type": "image"}] * (1 if example.closeup is None else 2)
        return [{"role": "user", "content": [*images, {"type": "text", "text": self.instruction(example)}]}]

    def input_of(self, row: Mapping[str, Any]) -> ObjectInput:
        # writable copies: the processor turns them into tensors, and torch warns on read-only buffers
        image = np.frombuffer(row["image"], dtype=np.uint8).reshape(tuple(row["image_shape"])).copy()
        closeup = None
        if row.get("closeup"):
            closeup = np.frombuffer(row["closeup"], dtype=np.uint8).reshape(tuple(row["closeup_shape"])).copy()
        others = tuple((kind, tuple(box)) for kind, box in zip(row["object_types"], row["object_boxes"], strict=True))
        return ObjectInput(image, tuple(row["target_box"]), row["target_type"] or None, others, closeup)

    def target_of(self, row: Mapping[str, Any]) -> str:
        return target_text(row["condition"])

    def class_of(self, row: Mapping[str, Any]) -> str:
        return row["condition"]

    def processor_kwargs(self, examples: Sequence[ObjectInput]) -> dict[str, Any]:
        # Images are already at a size the processor keeps (multiples of 28 within the pixel limits of the processor
        # saved with the model), so the processor only normalises and patches them.
        # One flat list in prompt order: the processor gives the image placeholders of the batch's texts their images
        # in turn.
        images = []
        for example in examples:
            images.append(np.asarray(example.image))
            if example.closeup is not None:
                images.append(np.asarray(example.closeup))
        return {"images": images}

    def answer_slot(self, index: int, chosen: Sequence[str], example: ObjectInput) -> Sequence[str] | None:
        if index == 0:
            return [ANSWER_PARTS[0]]
        if index == 1:
            return allowed_classes(example.target_type)
        if index == 2:
            return [ANSWER_PARTS[1]]
        return None

    def answer_from_slots(
        self, chosen: Sequence[str], label_scores: Mapping[int, Mapping[str, float]], text: str
    ) -> ConditionAnswer:
        condition = chosen[1]
        return ConditionAnswer(condition, label_scores[1][condition], dict(label_scores[1]), text)

    def parse_answer(self, text: str, example: ObjectInput | None) -> ConditionAnswer | None:
        return parse_answer(text, example.target_type if example is not None else None)

    def compute_metrics(self, rows: Sequence[Mapping[str, Any]], answers: Sequence[Any | None]) -> dict[str, float]:
        return compute_metrics(rows, answers)

    def group_of(self, row: Mapping[str, Any]) -> str:
        return row["image_id"]  # the objects of one image share its light, clutter and annotator

    def baselines(
        self,
        rows: Sequence[Mapping[str, Any]],
        answers: Sequence[Mapping[str, Any] | None],
        train_rows: Sequence[Mapping[str, Any]],
        manifest: Mapping[str, Any],
    ) -> dict[str, list[Mapping[str, Any] | None]]:
        """Majority; and, given the object type as the model is (a perfect stage 1), the type's most frequent class
        in training and a seeded uniform draw among the type's classes."""
        if not train_rows:
            return {}
        counts = Counter(r["condition"] for r in train_rows)
        majority = counts.most_common(1)[0][0]
        by_type = {
            kind: max(names, key=lambda name: (counts[name], -names.index(name)))
            for kind, names in CLASSES_OF_TYPE.items()
        }
        rng = np.random.default_rng(0)
        systems: dict[str, list[Mapping[str, Any] | None]] = {"majority": [{"condition": majority} for _ in rows]}
        if all(r["target_type"] for r in rows):
            systems["type-majority"] = [{"condition": by_type[r["target_type"]]} for r in rows]
            systems["random-within-type"] = [
                {"condition": str(rng.choice(CLASSES_OF_TYPE[r["target_type"]]))} for r in rows
            ]
        return systems

    def eval_variants(self) -> dict[str, Callable[[dict], dict]]:
        # A real stage 1 is sometimes wrong: without the type, the prompt says nothing of it and all 9 classes are
        # allowed.
        return {"fine-tuned,type-unknown": _without_type}


def _without_type(row: dict) -> dict:
    return {**row, "target_type": ""}
