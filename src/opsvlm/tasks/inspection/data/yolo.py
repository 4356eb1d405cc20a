"""Read Roboflow / Ultralytics YOLO segmentation datasets and stage-1 detection JSON for condition classification.

The inspection task (project issue 7) classifies the condition of objects in infrastructure-inspection images:
a stage-1 detector finds slope drains, toe drains, rock toes and vegetation, and the VLM names each object's class
among :data:`CONDITION_CLASSES` (the 9 names of the seed project's Roboflow export). This module is the data layer:

* **data.yaml** (:func:`read_data_yaml`): ``train`` / ``val`` / ``test`` image folders (one path or a list), ``nc``
  and ``names`` (a list or an ``{id: name}`` dict). Paths are relative to the yaml's ``path:`` key when present
  (itself relative to the yaml's folder, else to the working directory, as Ultralytics does), otherwise to the yaml's
  folder. Roboflow writes ``train: ../train/images`` next to a yaml that sits *in* the dataset root; like Ultralytics,
  a ``../`` path that does not exist is retried without the ``../``.
* **Label files** (:func:`read_label_file`): one per image, at the image path with its last ``images`` folder
  replaced by ``labels`` and the suffix replaced by ``.txt`` (next to the image when the path has no ``images``
  folder). Each row is ``class x1 y1 x2 y2 ... xn yn`` (a normalised polygon, n >= 3) or the detection format
  ``class cx cy w h``. Boxes ``(x1, y1, x2, y2)`` (normalised) are the polygon's bounds.
* **Accounting** (:class:`ReadReport`): an empty label file is a background image; a missing label file is also a
  background image but counted separately. A bad row (not a number, odd coordinate count, fewer than 3 points,
  coordinate outside [0, 1] beyond :data:`COORD_TOLERANCE`, class id not in ``0..nc-1``, zero-area box) is a
  :class:`Problem` ``path:line: reason``; the rest of the file is still read. Every label line is an object, a bad
  row or a blank line; every image is read or counted as unreadable; label files without an image are counted too.
  ``strict=True`` raises the first problem as :class:`YoloFormatError` instead.
* **Stage-1 detections** (:func:`load_detections_json`): user-supplied boxes per image, pixel or normalised.
* **Class names** (:func:`class_condition`, :func:`condition_class`): a class name's object type and condition.

Pure Python (PyYAML for data.yaml); Pillow only opens image headers to read their sizes (no pixel decoding).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "BAD_CLASS_ID",
    "CLASS_OUT_OF_RANGE",
    "CONDITIONS",
    "CONDITION_CLASSES",
    "COORD_TOLERANCE",
    "DEGENERATE_BOX",
    "IMAGE_SUFFIXES",
    "LABEL_WITHOUT_IMAGE",
    "NOT_A_NUMBER",
    "OBJECT_TYPES",
    "ODD_COORDINATES",
    "OUT_OF_RANGE",
    "ROW_PROBLEMS",
    "SPLITS",
    "TOO_FEW_POINTS",
    "UNREADABLE_IMAGE",
    "UNREADABLE_LABEL",
    "DataYamlError",
    "Detection",
    "DetectionsJsonError",
    "ImageDetections",
    "LabelledImage",
    "Problem",
    "ReadReport",
    "StageOneDetection",
    "YoloDataset",
    "YoloFormatError",
    "canonical_class_name",
    "class_condition",
    "condition_class",
    "iter_objects",
    "label_path_for",
    "load_detections_json",
    "object_type_of",
    "parse_detections",
    "read_data_yaml",
    "read_dataset",
    "read_label_file",
    "read_split",
]

# --------------------------------------------------------------------------------------------------------------------
# Class names: object type and condition
# --------------------------------------------------------------------------------------------------------------------

#: The 9 condition classes of the seed project's Roboflow export, in its class-id order.
CONDITION_CLASSES: tuple[str, ...] = (
    "Toe drain",
    "Toe drain- Blocked",
    "Toe drain- Damaged",
    "rock toe",
    "rock toe damaged",
    "slope drain",
    "slope drain blocked",
    "slope drain damaged",
    "vegetation",
)
#: Object types found by the stage-1 detector.
OBJECT_TYPES: tuple[str, ...] = ("toe drain", "rock toe", "slope drain", "vegetation")
#: Conditions a class name can carry (``normal`` when the name has none).
CONDITIONS: tuple[str, ...] = ("normal", "blocked", "damaged")

_CLASS_PARTS: dict[str, tuple[str, str]] = {
    "Toe drain": ("toe drain", "normal"),
    "Toe drain- Blocked": ("toe drain", "blocked"),
    "Toe drain- Damaged": ("toe drain", "damaged"),
    "rock toe": ("rock toe", "normal"),
    "rock toe damaged": ("rock toe", "damaged"),
    "slope drain": ("slope drain", "normal"),
    "slope drain blocked": ("slope drain", "blocked"),
    "slope drain damaged": ("slope drain", "damaged"),
    "vegetation": ("vegetation", "normal"),
}
assert tuple(_CLASS_PARTS) == CONDITION_CLASSES


def _normalise_name(name: str) -> str:
    """Lower case, ``-``/``_``/runs of spaces -> one space: ``"Toe drain- Blocked"`` -> ``"toe drain blocked"``."""
    return " ".join(part for part in re.split(r"[\s_\-]+", name.strip().lower()) if part)


_BY_NORMALISED: dict[str, str] = {_normalise_name(name): name for name in CONDITION_CLASSES}


def canonical_class_name(name: str) -> str:
    """The :data:`CONDITION_CLASSES` entry that ``name`` spells, ignoring case, ``-``, ``_`` and extra spaces.

    Raises:
        ValueError: ``name`` is not one of the 9 classes (the message lists them).
    """
    if not isinstance(name, str):
        raise ValueError(f"class name must be a string, got {type(name).__name__} {name!r}")
    canonical = _BY_NORMALISED.get(_normalise_name(name))
    if canonical is None:
        raise ValueError(f"unknown condition class {name!r}; known classes: {list(CONDITION_CLASSES)}")
    return canonical


def class_condition(name: str) -> tuple[str, str]:
    """Object type and condition of a class name.

    ``"Toe drain- Blocked"`` -> ``("toe drain", "blocked")``, ``"rock toe"`` -> ``("rock toe", "normal")``,
    ``"vegetation"`` -> ``("vegetation", "normal")``. Case, ``-``, ``_`` and spacing are ignored, so stage-1 labels
    such as ``"slope_drain"`` map to ``("slope drain", "normal")``.

    Raises:
        ValueError: unknown class name.
    """
    return _CLASS_PARTS[canonical_class_name(name)]


def condition_class(object_type: str, condition: str) -> str:
    """The class name for an object type and a condition, e.g. ``("toe drain", "blocked")`` -> ``"Toe drain- Blocked"``.

    Raises:
        ValueError: unknown object type or condition, or a combination without a class (``rock toe``/``blocked``,
            ``vegetation``/anything but ``normal``).
    """
    kind = object_type_of(object_type)
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; known conditions: {list(CONDITIONS)}")
    for name, parts in _CLASS_PARTS.items():
        if parts == (kind, condition):
            return name
    allowed = [c for k, c in _CLASS_PARTS.values() if k == kind]
    raise ValueError(f"no class for a {kind} that is {condition}; a {kind} can be: {allowed}")


def object_type_of(label: str) -> str:
    """The object type a stage-1 label names (``"slope_drain"``, ``"Toe drain"`` -> ``"slope drain"``, ``"toe drain"``).

    Raises:
        ValueError: the label is not one of :data:`OBJECT_TYPES` (a condition class such as ``"slope drain blocked"``
            is refused too: stage 1 does not know conditions).
    """
    if not isinstance(label, str):
        raise ValueError(f"object type must be a string, got {type(label).__name__} {label!r}")
    kind = _normalise_name(label)
    if kind not in OBJECT_TYPES:
        raise ValueError(f"unknown object type {label!r}; known object types: {list(OBJECT_TYPES)}")
    return kind


# --------------------------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------------------------

#: Normalised coordinates may exceed [0, 1] by this much (float rounding in exports); they are clipped.
COORD_TOLERANCE = 1e-6
#: Image suffixes Ultralytics reads.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp", ".pfm", ".heic"}
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_ALIASES = {"valid": "val", "validation": "val"}

# Problem kinds of a bad label row (the keys of ReadReport.bad_rows_by_reason).
NOT_A_NUMBER = "not_a_number"
BAD_CLASS_ID = "bad_class_id"
CLASS_OUT_OF_RANGE = "class_out_of_range"
ODD_COORDINATES = "odd_coordinates"
TOO_FEW_POINTS = "too_few_points"
OUT_OF_RANGE = "coordinate_out_of_range"
DEGENERATE_BOX = "degenerate_box"
ROW_PROBLEMS: tuple[str, ...] = (
    NOT_A_NUMBER,
    BAD_CLASS_ID,
    CLASS_OUT_OF_RANGE,
    ODD_COORDINATES,
    TOO_FEW_POINTS,
    OUT_OF_RANGE,
    DEGENERATE_BOX,
)
# File-level problem kinds.
LABEL_WITHOUT_IMAGE = "label_without_image"
UNREADABLE_IMAGE = "unreadable_image"
UNREADABLE_LABEL = "unreadable_label"

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    """One labelled object of a YOLO label file.

    Attributes:
        class_id: index into the dataset's ``names``.
        name: the class name, ``names[class_id]``.
        box: ``(x1, y1, x2, y2)`` normalised to [0, 1] by the image width/height; the polygon's bounds.
        polygon: the outline's ``(x, y)`` points, normalised; for a ``class cx cy w h`` row, the box's 4 corners.
        line: 1-based line number in the label file.
    """

    class_id: int
    name: str
    box: Box
    polygon: tuple[tuple[float, float], ...]
    line: int

    def pixel_box(self, width: int, height: int) -> Box:
        """``box`` in pixels of a ``width`` x ``height`` image."""
        x1, y1, x2, y2 = self.box
        return (x1 * width, y1 * height, x2 * width, y2 * height)


@dataclass(frozen=True)
class LabelledImage:
    """An image of a split with its objects.

    Attributes:
        image_path: the image file.
        label_path: where its label file is (it may not exist: then the image is background, see ``ReadReport``).
        split: ``train``, ``val`` or ``test`` (the data.yaml key).
        width: image width in pixels (read from the file header).
        height: image height in pixels.
        detections: the valid rows of the label file, in file order (empty for a background image).
    """

    image_path: str
    label_path: str
    split: str
    width: int
    height: int
    detections: tuple[Detection, ...]


@dataclass(frozen=True)
class YoloDataset:
    """A parsed data.yaml.

    Attributes:
        root: the folder split paths are resolved against (the ``path:`` key, else the yaml's folder).
        yaml_path: the data.yaml file.
        names: class names by id (``len(names) == nc``).
        split_dirs: resolved image folders per split key (``train``/``val``/``test``) present in the yaml; a folder
            may not exist (``read_split`` then names it in its error).
    """

    root: str
    yaml_path: str
    names: tuple[str, ...]
    split_dirs: dict[str, list[str]]

    @property
    def nc(self) -> int:
        """Number of classes."""
        return len(self.names)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located by file and (for label rows) 1-based line.

    Attributes:
        path: the file.
        line: 1-based line number, or ``None`` for a whole-file problem.
        kind: a short code counted in reports (``ROW_PROBLEMS`` for rows, ``label_without_image``, ...).
        message: human-readable reason.
    """

    path: str
    line: int | None
    kind: str
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "line": self.line, "kind": self.kind, "message": self.message}


class YoloFormatError(ValueError):
    """A problem in a label file or dataset, raised in strict mode; ``.problem`` holds it."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


class DataYamlError(ValueError):
    """A data.yaml that cannot be used; the message names the file and the key."""


class DetectionsJsonError(ValueError):
    """A stage-1 detections JSON that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class ReadReport:
    """What reading a split or a dataset found; every label line and every image is accounted for.

    ``label_lines == objects + bad_rows + blank_lines`` over the label files that could be read. Images with no
    objects are ``background_images`` (label file present but without object rows) plus ``missing_label_files``
    (no label file at all, counted separately) plus images whose rows were all bad.

    Attributes:
        source: the data.yaml (or folder) that was read.
        splits: split keys read.
        images: images returned (readable image files).
        objects: valid label rows returned.
        background_images: images whose label file exists and holds no object rows (empty or blank lines only).
        missing_label_files: images without a label file (background, counted separately).
        label_files: label files read.
        label_lines: lines in those files.
        blank_lines: blank lines (ignored, counted).
        bad_rows: malformed rows (each is one problem).
        bad_rows_by_reason: ``bad_rows`` by kind (keys from ``ROW_PROBLEMS``, only kinds seen).
        label_files_without_image: label files in a split's ``labels`` folder with no image (each is a problem).
        unreadable_images: image files Pillow cannot open (skipped, each is a problem).
        unreadable_label_files: label files that cannot be read as text (their images are returned without objects).
        non_image_files: other files in the image folders (not images, not labels), ignored and counted.
        missing_split_dirs: split key -> image folder named in the yaml that does not exist.
        images_per_split: images returned per split.
        objects_per_class: valid objects per class name.
        problems: every problem, in reading order.
    """

    source: str
    splits: tuple[str, ...]
    images: int
    objects: int
    background_images: int
    missing_label_files: int
    label_files: int
    label_lines: int
    blank_lines: int
    bad_rows: int
    bad_rows_by_reason: dict[str, int]
    label_files_without_image: int
    unreadable_images: int
    unreadable_label_files: int
    non_image_files: int
    missing_split_dirs: dict[str, str]
    images_per_split: dict[str, int]
    objects_per_class: dict[str, int]
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        """True when nothing was wrong (no problems and no missing split folders)."""
        return not self.problems and not self.missing_split_dirs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (problems as ``{path, line, kind, message}`` dicts)."""
        return {
            "source": self.source,
            "splits": list(self.splits),
            "images": self.images,
            "objects": self.objects,
            "background_images": self.background_images,
            "missing_label_files": self.missing_label_files,
            "label_files": self.label_files,
            "label_lines": self.label_lines,
            "blank_lines": self.blank_lines,
            "bad_rows": self.bad_rows,
            "bad_rows_by_reason": dict(self.bad_rows_by_reason),
            "label_files_without_image": self.label_files_without_image,
            "unreadable_images": self.unreadable_images,
            "unreadable_label_files": self.unreadable_label_files,
            "non_image_files": self.non_image_files,
            "missing_split_dirs": dict(self.missing_split_dirs),
            "images_per_split": dict(self.images_per_split),
            "objects_per_class": dict(self.objects_per_class),
            "problems": [problem.to_dict() for problem in self.problems],
        }


@dataclass
class _Tally:
    """Mutable counters behind a ReadReport."""

    source: str
    splits: list[str] = field(default_factory=list)
    images: int = 0
    objects: int = 0
    background_images: int = 0
    missing_label_files: int = 0
    label_files: int = 0
    label_lines: int = 0
    blank_lines: int = 0
    label_files_without_image: int = 0
    unreadable_images: int = 0
    unreadable_label_files: int = 0
    non_image_files: int = 0
    missing_split_dirs: dict[str, str] = field(default_factory=dict)
    images_per_split: Counter = field(default_factory=Counter)
    objects_per_class: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)

    def add(self, other: ReadReport) -> None:
        for name in (
            "images",
            "objects",
            "background_images",
            "missing_label_files",
            "label_files",
            "label_lines",
            "blank_lines",
            "label_files_without_image",
            "unreadable_images",
            "unreadable_label_files",
            "non_image_files",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.splits.extend(s for s in other.splits if s not in self.splits)
        self.missing_split_dirs.update(other.missing_split_dirs)
        self.images_per_split.update(other.images_per_split)
        self.objects_per_class.update(other.objects_per_class)
        self.problems.extend(other.problems)

    def freeze(self, names: Sequence[str]) -> ReadReport:
        by_reason = Counter(p.kind for p in self.problems if p.kind in ROW_PROBLEMS)
        return ReadReport(
            source=self.source,
            splits=tuple(self.splits),
            images=self.images,
            objects=self.objects,
            background_images=self.background_images,
            missing_label_files=self.missing_label_files,
            label_files=self.label_files,
            label_lines=self.label_lines,
            blank_lines=self.blank_lines,
            bad_rows=sum(by_reason.values()),
            bad_rows_by_reason={kind: by_reason[kind] for kind in ROW_PROBLEMS if by_reason[kind]},
            label_files_without_image=self.label_files_without_image,
            unreadable_images=self.unreadable_images,
            unreadable_label_files=self.unreadable_label_files,
            non_image_files=self.non_image_files,
            missing_split_dirs=dict(self.missing_split_dirs),
            images_per_split={s: self.images_per_split[s] for s in self.splits},
            objects_per_class={name: self.objects_per_class[name] for name in names},
            problems=tuple(self.problems),
        )


# --------------------------------------------------------------------------------------------------------------------
# data.yaml
# --------------------------------------------------------------------------------------------------------------------


def _yaml_error(path: Path, key: str, message: str) -> DataYamlError:
    return DataYamlError(f"{path}: {key}: {message}")


def _parse_names(raw: Any, path: Path) -> tuple[str, ...]:
    if isinstance(raw, dict):
        ids: dict[int, Any] = {}
        for key, value in raw.items():
            if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.isdigit())):
                raise _yaml_error(path, "names", f"dict keys must be class ids 0..nc-1, got {key!r}")
            ids[int(key)] = value
        if sorted(ids) != list(range(len(ids))):
            raise _yaml_error(
                path, "names", f"class ids must be contiguous 0..{len(ids) - 1}, got {sorted(ids)} (a gap or a repeat)"
            )
        values = [ids[i] for i in range(len(ids))]
        where = [f"names[{i}]" for i in range(len(ids))]
    elif isinstance(raw, list):
        values = raw
        where = [f"names[{i}]" for i in range(len(raw))]
    else:
        raise _yaml_error(path, "names", f"must be a list or an {{id: name}} dict, got {type(raw).__name__}")
    if not values:
        raise _yaml_error(path, "names", "is empty")
    for key, value in zip(where, values, strict=True):
        if not isinstance(value, str) or not value.strip():
            # YAML 1.1 turns unquoted no/yes/on/off/numbers into non-strings; say so rather than guess.
            raise _yaml_error(
                path, key, f"must be a non-empty string, got {type(value).__name__} {value!r} (quote it in the YAML)"
            )
    counts = Counter(values)
    duplicates = sorted(name for name, n in counts.items() if n > 1)
    if duplicates:
        raise _yaml_error(path, "names", f"duplicate class names {duplicates}")
    return tuple(values)


def _resolve_split(base: Path, value: str) -> Path:
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return candidate
    resolved = (base / candidate).resolve()
    # Roboflow writes "../train/images" into a yaml that sits in the dataset root; Ultralytics retries without "../".
    if not resolved.exists() and value.startswith("../"):
        stripped = (base / value[3:]).resolve()
        if stripped.exists():
            return stripped
    return resolved


def read_data_yaml(path: str | os.PathLike) -> YoloDataset:
    """Parse and validate a Roboflow / Ultralytics ``data.yaml``.

    Args:
        path: the yaml file, or a folder holding ``data.yaml``.

    Returns:
        The dataset description with split folders resolved to absolute paths (existence is checked when read).

    Raises:
        FileNotFoundError: no such file.
        DataYamlError: invalid content; the message names the file and the key (``nc`` vs ``names`` mismatch,
            non-contiguous ids, non-string names, a split that is not a path or a list of paths, ...).
    """
    yaml_path = Path(path)
    if yaml_path.is_dir():
        yaml_path = yaml_path / "data.yaml"
    if not yaml_path.is_file():
        raise FileNotFoundError(f"{yaml_path}: data.yaml not found")
    yaml_path = yaml_path.resolve()
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DataYamlError(f"{yaml_path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise DataYamlError(f"{yaml_path}: must be a mapping with train/val/test, nc and names")
    if "names" not in data:
        raise _yaml_error(yaml_path, "names", "missing")
    names = _parse_names(data["names"], yaml_path)
    if "nc" in data and data["nc"] is not None:
        nc = data["nc"]
        if isinstance(nc, bool) or not isinstance(nc, int):
            raise _yaml_error(yaml_path, "nc", f"must be an integer, got {nc!r}")
        if nc != len(names):
            raise _yaml_error(yaml_path, "nc", f"is {nc} but names has {len(names)} entries")

    root = yaml_path.parent
    if data.get("path") not in (None, ""):
        if not isinstance(data["path"], str):
            raise _yaml_error(yaml_path, "path", f"must be a string, got {data['path']!r}")
        given = Path(data["path"]).expanduser()
        if given.is_absolute():
            root = given
        else:
            # Relative to the yaml first (portable); Ultralytics resolves it against the working directory.
            root = (yaml_path.parent / given).resolve()
            if not root.exists() and given.resolve().exists():
                root = given.resolve()

    split_dirs: dict[str, list[str]] = {}
    for key in SPLITS:
        value = data.get(key)
        if value in (None, "", []):
            continue
        values = value if isinstance(value, list) else [value]
        resolved = []
        for i, item in enumerate(values):
            where = key if not isinstance(value, list) else f"{key}[{i}]"
            if not isinstance(item, str) or not item.strip():
                raise _yaml_error(yaml_path, where, f"must be a folder path, got {item!r}")
            folder = _resolve_split(root, item)
            if folder.is_file():
                raise _yaml_error(yaml_path, where, f"{folder} is a file; only image folders are supported")
            resolved.append(str(folder))
        split_dirs[key] = resolved
    if not split_dirs:
        raise DataYamlError(f"{yaml_path}: none of the keys {list(SPLITS)} names an image folder")
    return YoloDataset(root=str(root), yaml_path=str(yaml_path), names=names, split_dirs=split_dirs)


# --------------------------------------------------------------------------------------------------------------------
# Label files
# --------------------------------------------------------------------------------------------------------------------


def label_path_for(image_path: str | os.PathLike) -> Path:
    """The label file of an image: its last ``images`` folder replaced by ``labels``, suffix ``.txt``.

    ``ds/train/images/a.jpg`` -> ``ds/train/labels/a.txt``; without an ``images`` folder the label sits next to the
    image (Ultralytics' rule).
    """
    image = Path(image_path)
    parts = list(image.parent.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts, image.stem + ".txt") if parts else Path(image.stem + ".txt")


def _labels_dir_for(image_dir: Path) -> Path:
    return label_path_for(image_dir / "x.jpg").parent


def _parse_row(
    tokens: list[str], names: Sequence[str], path: str, line: int
) -> tuple[Detection | None, Problem | None]:
    """One non-blank label row -> a detection, or the first problem found."""

    def problem(kind: str, message: str) -> tuple[None, Problem]:
        return None, Problem(path, line, kind, message)

    values = []
    for token in tokens:
        try:
            value = float(token)
        except ValueError:
            return problem(NOT_A_NUMBER, f"not a number: {token!r}")
        if not math.isfinite(value):
            return problem(NOT_A_NUMBER, f"not a finite number: {token!r}")
        values.append(value)
    if values[0] != int(values[0]):
        return problem(BAD_CLASS_ID, f"class id must be an integer, got {tokens[0]!r}")
    class_id = int(values[0])
    if not 0 <= class_id < len(names):
        return problem(CLASS_OUT_OF_RANGE, f"class id {class_id} outside 0..{len(names) - 1} (nc={len(names)})")
    coords = values[1:]
    if len(coords) == 4:
        cx, cy, w, h = coords
        if w <= 0 or h <= 0:
            return problem(DEGENERATE_BOX, f"box width and height must be positive, got w={w:g} h={h:g}")
        points = [
            (cx - w / 2, cy - h / 2),
            (cx + w / 2, cy - h / 2),
            (cx + w / 2, cy + h / 2),
            (cx - w / 2, cy + h / 2),
        ]
    elif len(coords) % 2:
        return problem(ODD_COORDINATES, f"odd number of coordinates ({len(coords)}); expected x y pairs")
    elif len(coords) < 6:
        return problem(
            TOO_FEW_POINTS, f"{len(coords) // 2} point(s); a polygon needs at least 3 (or use 'class cx cy w h')"
        )
    else:
        points = list(zip(coords[0::2], coords[1::2], strict=True))
    clipped = []
    for x, y in points:
        for value in (x, y):
            if value < -COORD_TOLERANCE or value > 1 + COORD_TOLERANCE:
                return problem(OUT_OF_RANGE, f"coordinate {value:g} outside [0, 1]")
        clipped.append((min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)))
    xs = [x for x, _ in clipped]
    ys = [y for _, y in clipped]
    box = (min(xs), min(ys), max(xs), max(ys))
    if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
        return problem(DEGENERATE_BOX, f"zero-area box {tuple(round(v, 6) for v in box)}")
    return Detection(class_id, names[class_id], box, tuple(clipped), line), None


def _parse_label_text(
    text: str, names: Sequence[str], path: str, strict: bool
) -> tuple[list[Detection], list[Problem], int, int]:
    """Returns (detections, problems, lines, blank lines)."""
    detections: list[Detection] = []
    problems: list[Problem] = []
    lines = text.splitlines()
    blank = 0
    for number, raw in enumerate(lines, start=1):
        tokens = raw.split()
        if not tokens:
            blank += 1
            continue
        detection, problem = _parse_row(tokens, names, path, number)
        if problem is not None:
            if strict:
                raise YoloFormatError(problem)
            problems.append(problem)
        else:
            detections.append(detection)
    return detections, problems, len(lines), blank


def read_label_file(
    path: str | os.PathLike, names: Sequence[str], strict: bool = False
) -> tuple[list[Detection], list[Problem]]:
    """Read one YOLO label file.

    Args:
        path: the ``.txt`` file; rows ``class x1 y1 ... xn yn`` (polygon, n >= 3) or ``class cx cy w h``, normalised.
        names: class names by id (``nc = len(names)``).
        strict: raise the first problem instead of collecting it.

    Returns:
        The valid rows as detections (file order) and one problem per bad row (``path:line: reason``); blank lines
        are skipped.

    Raises:
        FileNotFoundError: no such file.
        YoloFormatError: ``strict`` and a row is bad.
    """
    label = Path(path)
    text = label.read_text(encoding="utf-8-sig")
    detections, problems, _, _ = _parse_label_text(text, names, str(label), strict)
    return detections, problems


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image  # Only the header is read: Image.open is lazy.

    with Image.open(path) as image:
        return image.size


def _walk_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def read_split(dataset: YoloDataset, split: str, strict: bool = False) -> tuple[list[LabelledImage], ReadReport]:
    """Read every image of one split with its labels.

    Args:
        dataset: from :func:`read_data_yaml`.
        split: ``train``, ``val`` (or ``valid``) or ``test``.
        strict: raise the first problem (bad row, unreadable image or label, label without image) instead.

    Returns:
        The images (sorted by path within each folder) and the report accounting for every file and line.

    Raises:
        DataYamlError: the yaml has no such split.
        FileNotFoundError: a folder of the split does not exist (the message names the yaml and the key).
        YoloFormatError: ``strict`` and something is wrong.
    """
    key = _SPLIT_ALIASES.get(split, split)
    if key not in dataset.split_dirs:
        raise DataYamlError(f"{dataset.yaml_path}: {split}: no such split; the yaml has {list(dataset.split_dirs)}")
    tally = _Tally(source=dataset.yaml_path, splits=[key])
    images: list[LabelledImage] = []

    def report(problem: Problem) -> None:
        if strict:
            raise YoloFormatError(problem)
        tally.problems.append(problem)

    for folder_name in dataset.split_dirs[key]:
        folder = Path(folder_name)
        if not folder.is_dir():
            raise FileNotFoundError(f"{dataset.yaml_path}: {key}: image folder {folder} does not exist")
        files = _walk_files(folder)
        image_files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        expected_labels = {label_path_for(p) for p in image_files}
        labels_dir = _labels_dir_for(folder)
        label_files = [p for p in _walk_files(labels_dir) if p.suffix == ".txt"] if labels_dir.is_dir() else []
        tally.non_image_files += sum(
            1
            for p in files
            if p.suffix.lower() not in IMAGE_SUFFIXES and not (labels_dir == folder and p.suffix == ".txt")
        )
        for image_path in image_files:
            label = label_path_for(image_path)
            try:
                width, height = _image_size(image_path)
            except Exception as err:  # Pillow raises many types (UnidentifiedImageError, OSError, SyntaxError...)
                tally.unreadable_images += 1
                report(Problem(str(image_path), None, UNREADABLE_IMAGE, f"cannot read image: {err}"))
                continue
            detections: list[Detection] = []
            if not label.is_file():
                tally.missing_label_files += 1
            else:
                try:
                    text = label.read_text(encoding="utf-8-sig")
                except (OSError, UnicodeDecodeError) as err:
                    tally.unreadable_label_files += 1
                    report(Problem(str(label), None, UNREADABLE_LABEL, f"cannot read label file: {err}"))
                    text = None
                if text is not None:
                    detections, problems, lines, blank = _parse_label_text(text, dataset.names, str(label), strict)
                    tally.label_files += 1
                    tally.label_lines += lines
                    tally.blank_lines += blank
                    tally.problems.extend(problems)
                    if lines == blank:
                        tally.background_images += 1
            tally.images += 1
            tally.objects += len(detections)
            tally.objects_per_class.update(d.name for d in detections)
            images.append(LabelledImage(str(image_path), str(label), key, int(width), int(height), tuple(detections)))
        for orphan in label_files:
            if orphan not in expected_labels:
                tally.label_files_without_image += 1
                report(Problem(str(orphan), None, LABEL_WITHOUT_IMAGE, "label file without an image"))
    tally.images_per_split[key] = tally.images
    return images, tally.freeze(dataset.names)


def read_dataset(path: str | os.PathLike, strict: bool = False) -> tuple[dict[str, list[LabelledImage]], ReadReport]:
    """Read all splits of a dataset.

    Args:
        path: the data.yaml, or a folder holding ``data.yaml``.
        strict: raise the first problem instead of reporting it (a missing split folder raises too).

    Returns:
        Images per split key (``train``/``val``/``test``, those whose folders exist) and one report over all of them;
        split folders named in the yaml but absent are listed in ``report.missing_split_dirs``.

    Raises:
        DataYamlError, FileNotFoundError, YoloFormatError: see :func:`read_data_yaml` and :func:`read_split`.
    """
    dataset = read_data_yaml(path)
    tally = _Tally(source=dataset.yaml_path)
    splits: dict[str, list[LabelledImage]] = {}
    for key, folders in dataset.split_dirs.items():
        missing = [folder for folder in folders if not Path(folder).is_dir()]
        if missing:
            if strict:
                raise FileNotFoundError(f"{dataset.yaml_path}: {key}: image folder {missing[0]} does not exist")
            tally.missing_split_dirs[key] = ", ".join(missing)
            continue
        images, report = read_split(dataset, key, strict=strict)
        splits[key] = images
        tally.add(report)
    return splits, tally.freeze(dataset.names)


# --------------------------------------------------------------------------------------------------------------------
# Stage-1 detections JSON
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageOneDetection:
    """One object found by the stage-1 detector.

    Attributes:
        label: the label as given (e.g. ``"slope_drain"``).
        object_type: the label as one of :data:`OBJECT_TYPES`.
        box: ``(x1, y1, x2, y2)`` normalised to [0, 1] (pixel boxes are divided by the image width/height).
        score: detector confidence in [0, 1], or ``None`` when not given.
        index: position in the image's ``detections`` list.
    """

    label: str
    object_type: str
    box: Box
    score: float | None
    index: int


@dataclass(frozen=True)
class ImageDetections:
    """Stage-1 detections of one image.

    Attributes:
        image: the image's file name or path, as given.
        width: image width in pixels.
        height: image height in pixels.
        detections: the objects, in the order given.
    """

    image: str
    width: int
    height: int
    detections: tuple[StageOneDetection, ...]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_image_detections(item: Any, where: str, error) -> ImageDetections:
    if not isinstance(item, dict):
        raise error(where or "(top level)", "must be an object with image, width, height, detections")
    prefix = f"{where}." if where else ""
    image = item.get("image")
    if not isinstance(image, str) or not image.strip():
        raise error(f"{prefix}image", f"must be a non-empty string (file name or path), got {image!r}")
    size = {}
    for key in ("width", "height"):
        value = item.get(key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise error(f"{prefix}{key}", f"must be a positive integer (pixels), got {value!r}")
        size[key] = value
    width, height = size["width"], size["height"]
    raw = item.get("detections")
    if not isinstance(raw, list):
        raise error(f"{prefix}detections", f"must be a list (empty when nothing was found), got {raw!r}")
    detections = []
    for index, det in enumerate(raw):
        at = f"{prefix}detections[{index}]"
        if not isinstance(det, dict):
            raise error(at, f"must be an object with label, box, normalized, got {det!r}")
        label = det.get("label")
        try:
            kind = object_type_of(label)
        except ValueError as err:
            raise error(f"{at}.label", str(err)) from None
        normalized = det.get("normalized")
        if not isinstance(normalized, bool):
            raise error(f"{at}.normalized", f"must be true (box in 0..1) or false (box in pixels), got {normalized!r}")
        box = det.get("box")
        if not isinstance(box, list | tuple) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise error(f"{at}.box", f"must be 4 numbers [x1, y1, x2, y2], got {box!r}")
        x1, y1, x2, y2 = (float(v) for v in box)
        if not normalized:
            # Half a pixel of slack for detectors that do not clip exactly at the border.
            if min(x1, x2) < -0.5 or max(x1, x2) > width + 0.5 or min(y1, y2) < -0.5 or max(y1, y2) > height + 0.5:
                raise error(f"{at}.box", f"pixel box {box} outside the {width}x{height} image")
            x1, x2, y1, y2 = x1 / width, x2 / width, y1 / height, y2 / height
        elif min(x1, y1, x2, y2) < -COORD_TOLERANCE or max(x1, y1, x2, y2) > 1 + COORD_TOLERANCE:
            raise error(f"{at}.box", f"normalized box {box} outside [0, 1] (pixel box? set normalized: false)")
        x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
        if x2 <= x1 or y2 <= y1:
            raise error(f"{at}.box", f"must have x2 > x1 and y2 > y1, got {box}")
        score = det.get("score")
        if score is not None and (not _is_number(score) or not 0.0 <= score <= 1.0):
            raise error(f"{at}.score", f"must be a number in [0, 1] or absent, got {score!r}")
        detections.append(
            StageOneDetection(label, kind, (x1, y1, x2, y2), None if score is None else float(score), index)
        )
    return ImageDetections(image, width, height, tuple(detections))


def parse_detections(data: Any, source: str = "<detections>") -> list[ImageDetections]:
    """Validate already-decoded stage-1 detections (see :func:`load_detections_json`); ``source`` names them in errors.

    Raises:
        DetectionsJsonError: invalid content, naming ``source`` and the field.
    """

    def error(where: str, message: str) -> DetectionsJsonError:
        return DetectionsJsonError(f"{source}: {where}: {message}")

    if isinstance(data, dict):
        return [_parse_image_detections(data, "", error)]
    if isinstance(data, list):
        return [_parse_image_detections(item, f"[{i}]", error) for i, item in enumerate(data)]
    raise error("(top level)", f"must be an object or a list of objects, got {type(data).__name__}")


def load_detections_json(path: str | os.PathLike) -> list[ImageDetections]:
    """Read stage-1 detections supplied as JSON.

    Format (one object or a list of them)::

        {"image": "site_04.jpg", "width": 640, "height": 480,
         "detections": [{"label": "slope drain", "box": [x1, y1, x2, y2], "normalized": false, "score": 0.9}]}

    ``label`` is an object type (``toe drain``, ``rock toe``, ``slope drain``, ``vegetation``; case, ``_`` and ``-``
    ignored); ``normalized`` is required (``false``: pixel box, divided by width/height); ``score`` is optional.

    Returns:
        One :class:`ImageDetections` per image, boxes normalised to [0, 1].

    Raises:
        FileNotFoundError: no such file.
        DetectionsJsonError: invalid JSON or content; the message names the file and the field
            (e.g. ``dets.json: [2].detections[0].box: must be 4 numbers ...``).
    """
    source = Path(path)
    text = source.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DetectionsJsonError(f"{source}:{err.lineno}: not valid JSON: {err.msg} (column {err.colno})") from err
    return parse_detections(data, str(source))


def iter_objects(images: Iterable[LabelledImage]) -> Iterable[tuple[LabelledImage, Detection]]:
    """Every (image, detection) pair, in order — one classification example per object."""
    for image in images:
        for detection in image.detections:
            yield image, detection
