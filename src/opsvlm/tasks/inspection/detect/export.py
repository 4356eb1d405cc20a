"""Writing detections: one JSON record per image and YOLO-format prediction files. Pure Python.

* :func:`image_record`: ``{"image", "width", "height", "detections": [...]}`` in the stage-1 detections format
  (:func:`inspection.data.yolo.load_detections_json` reads it back; ``/predict_objects`` accepts its ``detections``).
* :func:`yolo_prediction_lines`: ``class cx cy w h score`` rows (normalised), the layout Ultralytics writes with
  ``save_txt=True, save_conf=True``, class ids in the order of ``names``.
* :func:`write_predictions_yaml`: the ``names`` file that goes with them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from opsvlm.tasks.inspection.data.yolo import OBJECT_TYPES
from opsvlm.tasks.inspection.detect.detector import Detection

__all__ = [
    "image_record",
    "write_predictions_yaml",
    "yolo_prediction_lines",
]


def image_record(image: str, width: int, height: int, detections: Sequence[Detection]) -> dict[str, Any]:
    """One image's detections as JSON-ready data (boxes normalised; pixel boxes too, for convenience)."""
    return {
        "image": image,
        "width": int(width),
        "height": int(height),
        "detections": [
            {**d.to_dict(), "box_pixels": [round(v, 2) for v in d.pixel_box(width, height)]} for d in detections
        ],
    }


def yolo_prediction_lines(detections: Sequence[Detection], names: Sequence[str] = OBJECT_TYPES) -> list[str]:
    """``class cx cy w h score`` rows (6 decimals); ``class`` is the detection's object type's index in ``names``.

    Raises:
        ValueError: a detection whose type is not in ``names``.
    """
    index = {name: i for i, name in enumerate(names)}
    rows = []
    for d in detections:
        if d.object_type not in index:
            raise ValueError(f"object type {d.object_type!r} not in names {list(names)}")
        x1, y1, x2, y2 = d.box
        rows.append(
            f"{index[d.object_type]} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f} {d.score:.6f}"
        )
    return rows


def write_predictions_yaml(out: str | os.PathLike, names: Sequence[str] = OBJECT_TYPES) -> Path:
    """``out/data.yaml`` with ``nc`` and ``names`` of the prediction files' class ids."""
    path = Path(out) / "data.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Class ids of the YOLO-format prediction files (labels/*.txt: class cx cy w h score).\n"
    path.write_text(text + yaml.safe_dump({"nc": len(names), "names": dict(enumerate(names))}, sort_keys=False))
    return path
