"""The detector's training data: a YOLO export with its classes collapsed (the 9 condition classes -> 4 object types).

:func:`write_detection_dataset` reads a Roboflow / Ultralytics export with :func:`inspection.data.yolo.read_dataset`
(its accounting and error rules: bad rows are reported, never silently dropped, or raised with ``strict``) and writes
a detection dataset Ultralytics trains on::

    out/data.yaml                       path: <out>, train/val/test: images/<split>, names: {0: toe drain, ...}
    out/images/<split>/<stem>.<ext>     hard links to (or copies of) the source images
    out/labels/<split>/<stem>.txt       one ``class cx cy w h`` row per object (the polygon's bounds)

The collapse is a mapping from the source's class names to detector class names; the default maps each condition
class to its object type, so the detector's names are :data:`inspection.data.yolo.OBJECT_TYPES` in that order. A source
class without a mapping is an error naming it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from opsvlm.tasks.inspection.data.yolo import OBJECT_TYPES, class_condition, read_data_yaml, read_dataset
from opsvlm.tasks.inspection.detect.detector import DetectorError, normalise_name

__all__ = [
    "SUMMARY_FILE",
    "DetectionDataset",
    "default_collapse",
    "write_detection_dataset",
    "yolo_box_row",
]

SUMMARY_FILE = "detection_summary.json"


def default_collapse(names: tuple[str, ...]) -> dict[str, str]:
    """Source class name -> object type, for every source class that names a condition class or an object type.

    Raises:
        DetectorError: a source class that is neither (the message names it; pass an explicit collapse).
    """
    mapping = {}
    for name in names:
        try:
            mapping[name] = class_condition(name)[0]
        except ValueError:
            if normalise_name(name) in OBJECT_TYPES:
                mapping[name] = normalise_name(name)
            else:
                raise DetectorError(
                    f"dataset class {name!r} is neither a condition class nor an object type; "
                    "give an explicit collapse mapping (source class -> detector class)"
                ) from None
    return mapping


@dataclass(frozen=True)
class DetectionDataset:
    """What :func:`write_detection_dataset` wrote.

    Attributes:
        yaml_path: The new data.yaml (absolute).
        names: Detector class names by id.
        collapse: Source class name -> detector class name.
        images_per_split: Images written per split key.
        objects_per_split: ``{split: {detector class: objects}}``.
        background_images: Images without objects per split.
        source_problems: Problems the reader reported in the source (bad rows etc.), as ``path:line: reason``.
    """

    yaml_path: str
    names: tuple[str, ...]
    collapse: dict[str, str]
    images_per_split: dict[str, int]
    objects_per_split: dict[str, dict[str, int]]
    background_images: dict[str, int]
    source_problems: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "yaml_path": self.yaml_path,
            "names": list(self.names),
            "collapse": self.collapse,
            "images_per_split": self.images_per_split,
            "objects_per_split": self.objects_per_split,
            "background_images": self.background_images,
            "source_problems": list(self.source_problems),
        }


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def yolo_box_row(class_id: int, box: tuple[float, float, float, float]) -> str:
    """``class cx cy w h`` (normalised, 6 decimals) for a normalised ``(x1, y1, x2, y2)`` box."""
    x1, y1, x2, y2 = box
    return f"{class_id} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}"


def write_detection_dataset(
    source: str | os.PathLike,
    out: str | os.PathLike,
    collapse: Mapping[str, str] | None = None,
    strict: bool = False,
) -> DetectionDataset:
    """Write the collapsed detection dataset of a YOLO export (see the module docstring).

    Args:
        source: The export's data.yaml or its folder.
        out: Output folder (its ``images``, ``labels`` and ``data.yaml`` are replaced).
        collapse: Source class name -> detector class name; ``None`` = :func:`default_collapse` (object types).
        strict: Stop at the first problem in the source instead of reporting it.

    Returns:
        What was written; also saved as ``out/detection_summary.json``.

    Raises:
        DetectorError: a source class without a mapping, or a source without a train split.
        DataYamlError, FileNotFoundError, YoloFormatError: from the reader.
    """
    source_names = read_data_yaml(source).names
    splits, report = read_dataset(source, strict=strict)
    if collapse:
        unknown = [name for name in source_names if name not in collapse]
        if unknown:
            raise DetectorError(f"collapse: dataset class(es) {unknown} have no detector class; collapse={collapse}")
        mapping = {name: str(collapse[name]) for name in source_names}
        targets = sorted(set(mapping.values()))
    else:
        mapping = default_collapse(source_names)
        targets = list(OBJECT_TYPES)  # the 4 types, in their fixed order, even if one is absent from the data
    if "train" not in splits:
        raise DetectorError(f"{source}: no train split to train a detector on (splits: {sorted(splits)})")
    index = {name: i for i, name in enumerate(targets)}

    root = Path(out).resolve()
    for sub in ("images", "labels"):
        if (root / sub).exists():
            shutil.rmtree(root / sub)
    images_per_split: dict[str, int] = {}
    objects_per_split: dict[str, dict[str, int]] = {}
    background: dict[str, int] = {}
    for split, images in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        counts: Counter = Counter()
        seen: set[str] = set()
        for image in images:
            stem = _unique_stem(Path(image.image_path).stem, seen)
            suffix = Path(image.image_path).suffix.lower()
            _link_or_copy(Path(image.image_path), root / "images" / split / f"{stem}{suffix}")
            rows = []
            for det in image.detections:
                target = mapping[det.name]
                rows.append(yolo_box_row(index[target], det.box))
                counts[target] += 1
            (root / "labels" / split / f"{stem}.txt").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        images_per_split[split] = len(images)
        objects_per_split[split] = {name: counts[name] for name in targets}
        background[split] = sum(1 for image in images if not image.detections)

    data = {"path": str(root), **{split: f"images/{split}" for split in splits}, "nc": len(targets)}
    data["names"] = dict(enumerate(targets))
    (root / "data.yaml").write_text(
        "# Detection dataset written by opsvlm.tasks.inspection.detect.dataset (classes collapsed).\n"
        + yaml.safe_dump(data, sort_keys=False),
        encoding="utf-8",
    )
    result = DetectionDataset(
        yaml_path=str(root / "data.yaml"),
        names=tuple(targets),
        collapse=mapping,
        images_per_split=images_per_split,
        objects_per_split=objects_per_split,
        background_images=background,
        source_problems=tuple(str(p) for p in report.problems),
    )
    (root / SUMMARY_FILE).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return result


def _unique_stem(stem: str, seen: set[str]) -> str:
    candidate, n = stem, 1
    while candidate in seen:
        candidate, n = f"{stem}_{n}", n + 1
    seen.add(candidate)
    return candidate
