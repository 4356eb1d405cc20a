"""The stage-1 detector interface: detections, the class mapping to object types, the config and the loader.

A detector turns one RGB image into boxes, each with a detector class name and a score. The inspection task knows 4
object types (:data:`inspection.data.yolo.OBJECT_TYPES`); a :class:`ClassMapping` says which type each of the detector's
class names is. It is checked when the detector loads: a class name without a mapping is an error that names it (and
the mapping's keys), never a silently dropped box. The default mapping accepts the 4 types themselves and the 9
condition class names (a detector trained on the un-collapsed export), ignoring case, ``-``, ``_`` and spacing.

Backends implement :class:`Detector`; :func:`.load.load_detector` picks one from a :class:`DetectorConfig` (today the
Ultralytics backend, imported only when a detector is loaded).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from opsvlm.tasks.inspection.data.yolo import (
    CONDITION_CLASSES,
    OBJECT_TYPES,
    StageOneDetection,
    class_condition,
    object_type_of,
)

__all__ = [
    "BACKENDS",
    "ClassMapping",
    "Detection",
    "Detector",
    "DetectorConfig",
    "DetectorError",
    "UnmappedClassError",
    "check_image",
    "default_class_map",
    "normalise_name",
]

Box = tuple[float, float, float, float]


class DetectorError(ValueError):
    """A detector, its config or its input cannot be used; the message names the field, file or class."""


class UnmappedClassError(DetectorError):
    """A detector class name that the class mapping does not map to an object type."""


def normalise_name(name: str) -> str:
    """Lower case, ``-``/``_``/runs of spaces -> one space (``"Slope_Drain"`` -> ``"slope drain"``)."""
    return " ".join(part for part in re.split(r"[\s_\-]+", name.strip().lower()) if part)


@dataclass(frozen=True)
class Detection:
    """One object found by a detector.

    Attributes:
        box: ``(x1, y1, x2, y2)`` normalised to [0, 1] by the image width and height.
        object_type: The task's object type (one of :data:`opsvlm.tasks.inspection.data.yolo.OBJECT_TYPES`).
        score: Detector confidence in [0, 1].
        class_name: The detector's own class name (before the mapping).
    """

    box: Box
    object_type: str
    score: float
    class_name: str

    def pixel_box(self, width: int, height: int) -> Box:
        """``box`` in pixels of a ``width`` x ``height`` image."""
        x1, y1, x2, y2 = self.box
        return (x1 * width, y1 * height, x2 * width, y2 * height)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, in the stage-1 detections format of ``/predict_objects`` and
        :func:`inspection.data.yolo.parse_detections` (``label`` = object type, normalised box) plus ``class_name``."""
        return {
            "label": self.object_type,
            "box": [float(v) for v in self.box],
            "normalized": True,
            "score": float(self.score),
            "class_name": self.class_name,
        }

    def to_stage_one(self, index: int) -> StageOneDetection:
        """The :class:`inspection.data.yolo.StageOneDetection` that stage 2 (``serving.predict_objects``) consumes."""
        return StageOneDetection(self.object_type, self.object_type, tuple(self.box), float(self.score), index)


def default_class_map() -> dict[str, str]:
    """The default mapping: each object type to itself and each of the 9 condition classes to its object type."""
    mapping = {kind: kind for kind in OBJECT_TYPES}
    mapping.update({name: class_condition(name)[0] for name in CONDITION_CLASSES})
    return mapping


class ClassMapping:
    """A validated mapping from detector class names to object types.

    Keys are compared after :func:`normalise_name` (``"Slope_Drain"`` and ``"slope drain"`` are the same key).

    Args:
        mapping: ``{detector class name: object type}``; ``None`` or empty = :func:`default_class_map`.
        source: Where the mapping came from, for messages (e.g. ``"detector.class_map"``).

    Raises:
        DetectorError: a value that is not an object type, a key that is not a non-empty string, or two keys that
            normalise to the same name but map to different types (the message names the key).
    """

    def __init__(self, mapping: Mapping[str, str] | None = None, source: str = "class_map"):
        self.source = source
        raw = dict(mapping) if mapping else default_class_map()
        self._map: dict[str, str] = {}
        for key, value in raw.items():
            if not isinstance(key, str) or not key.strip():
                raise DetectorError(f"{source}: class names must be non-empty strings, got {key!r}")
            try:
                kind = object_type_of(value)
            except ValueError as exc:
                raise DetectorError(f"{source}[{key!r}]: {exc}") from None
            norm = normalise_name(key)
            if self._map.get(norm, kind) != kind:
                raise DetectorError(
                    f"{source}[{key!r}]: maps to {kind!r} but another spelling maps to {self._map[norm]!r}"
                )
            self._map[norm] = kind

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and normalise_name(name) in self._map

    def as_dict(self) -> dict[str, str]:
        """``{normalised detector class name: object type}``."""
        return dict(self._map)

    def object_type(self, name: str) -> str:
        """The object type of a detector class name.

        Raises:
            UnmappedClassError: ``name`` has no mapping (the message lists the mapped names).
        """
        kind = self._map.get(normalise_name(name)) if isinstance(name, str) else None
        if kind is None:
            raise UnmappedClassError(
                f"{self.source}: detector class {name!r} has no object type; mapped names: {sorted(self._map)} "
                f"(object types: {list(OBJECT_TYPES)})"
            )
        return kind

    def resolve(self, names: Mapping[int, str] | Sequence[str], detector: str = "detector") -> dict[int, str]:
        """Object type per class id of a detector, checking that every one of its classes is mapped.

        Args:
            names: The detector's class names by id (a dict as Ultralytics gives, or a list).
            detector: The detector's name or file, for messages.

        Returns:
            ``{class id: object type}``.

        Raises:
            UnmappedClassError: naming every unmapped class of ``detector``.
        """
        items = names.items() if isinstance(names, Mapping) else enumerate(names)
        resolved: dict[int, str] = {}
        missing: list[str] = []
        for class_id, name in items:
            if name in self:
                resolved[int(class_id)] = self.object_type(name)
            else:
                missing.append(str(name))
        if missing:
            raise UnmappedClassError(
                f"{detector}: class(es) {missing} have no object type in {self.source}; mapped names: "
                f"{sorted(self._map)}; set {self.source} to map every detector class to one of {list(OBJECT_TYPES)}"
            )
        return resolved


@runtime_checkable
class Detector(Protocol):
    """What stage 1 must offer. Implementations are loaded once and reused (a Serve replica, a Ray Data actor).

    Attributes:
        names: The detector's class names by id.
        object_types: The object type of each class id (the validated :class:`ClassMapping`).
    """

    names: dict[int, str]
    object_types: dict[int, str]

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Objects in one image.

        Args:
            image: uint8[H, W, 3] RGB.

        Returns:
            Detections sorted by score, highest first (empty when nothing is found).
        """
        ...

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """:meth:`detect` for several images (one forward pass where the backend can)."""
        ...


BACKENDS = ("ultralytics",)


@dataclass(frozen=True)
class DetectorConfig:
    """How to load and run a detector.

    Attributes:
        weights: A ``.pt`` checkpoint (Ultralytics) or an ``.onnx`` export (run with onnxruntime). Registry
            references are resolved to such a file by the caller (``opsvlm.detection.registry.resolve_detector``).
        backend: Only ``ultralytics``.
        class_map: ``{detector class name: object type}``; empty = the default (the 4 types and the 9 condition
            classes, case/``-``/``_`` ignored).
        conf: Minimum score of a returned detection.
        iou: IoU of non-maximum suppression.
        imgsz: Inference size in pixels; ``None`` = the size the checkpoint was trained at (an ONNX export always
            runs at the size it was exported with).
        max_det: At most this many detections per image.
        device: ``cpu``, ``cuda``, ``cuda:0``, ... (``auto``: CUDA when available).
    """

    weights: str = ""
    backend: str = "ultralytics"
    class_map: dict[str, str] = field(default_factory=dict)
    conf: float = 0.25
    iou: float = 0.7
    imgsz: int | None = None
    max_det: int = 100
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise DetectorError(f"detector.backend: must be one of {list(BACKENDS)}, got {self.backend!r}")
        if not 0.0 <= self.conf <= 1.0:
            raise DetectorError(f"detector.conf: must be in [0, 1], got {self.conf}")
        if not 0.0 < self.iou <= 1.0:
            raise DetectorError(f"detector.iou: must be in (0, 1], got {self.iou}")
        if self.imgsz is not None and (self.imgsz < 32 or self.imgsz % 32):
            raise DetectorError(f"detector.imgsz: must be a multiple of 32 (the YOLO stride), got {self.imgsz}")
        if self.max_det < 1:
            raise DetectorError(f"detector.max_det: must be >= 1, got {self.max_det}")
        ClassMapping(self.class_map, "detector.class_map")  # validate early

    @property
    def mapping(self) -> ClassMapping:
        """The validated class mapping."""
        return ClassMapping(self.class_map, "detector.class_map")


def check_image(image: Any, name: str = "image") -> np.ndarray:
    """An RGB image as a detector takes it.

    Raises:
        DetectorError: not a uint8[H, W, 3] array with H, W >= 1 (the message names ``name``).
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype}{list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
        raise DetectorError(f"{name}: must be a uint8[H, W, 3] RGB array, got {got}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise DetectorError(f"{name}: empty image {list(image.shape)}")
    return image
