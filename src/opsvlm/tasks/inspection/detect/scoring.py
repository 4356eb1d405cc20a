"""Scoring a detector on a labelled split: its boxes, mAP with image-bootstrap intervals, and reference detectors.

The labelled images come from :func:`opsvlm.tasks.inspection.data.yolo.read_split` of the collapsed dataset
(:mod:`.dataset`), so their class names are the detector's. Two references that know nothing useful about an image:

* :func:`prior_boxes`: for each type, its mean training box placed in every image with the type's training frequency
  as score (what a detector learns from the label statistics alone);
* an untrained network (the same YAML, random weights), scored by the caller with :func:`detector_boxes`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from opsvlm.tasks.inspection.data.yolo import LabelledImage
from opsvlm.tasks.inspection.detect.matching import COCO_IOUS, ImageBoxes, image_hits, map_from_hits

__all__ = [
    "bootstrap_map",
    "detector_boxes",
    "flat_map_metrics",
    "load_rgb",
    "prior_boxes",
    "truth_boxes",
]


def load_rgb(path: str) -> np.ndarray:
    """uint8[H, W, 3] RGB pixels of an image file."""
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image.convert("RGB"))  # writable: the VLM processor turns it into a tensor


def truth_boxes(image: LabelledImage) -> tuple[np.ndarray, tuple[str, ...]]:
    """float64[T, 4] normalised true boxes of an image and their class names."""
    boxes = np.array([d.box for d in image.detections], dtype=np.float64).reshape(-1, 4)
    return boxes, tuple(d.name for d in image.detections)


def detector_boxes(
    detect_batch: Callable[[Sequence[np.ndarray]], list[list]],
    images: Sequence[LabelledImage],
    batch_size: int = 8,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[ImageBoxes], float]:
    """Run a detector over labelled images.

    Args:
        detect_batch: A detector's ``detect_batch`` (detections with ``box``, ``object_type``, ``score``).
        images: The labelled images (true names must be object types, as in the collapsed dataset).
        batch_size: Images per call.
        clock: Seconds (injected for tests).

    Returns:
        Per-image predicted and true boxes, and the detector's mean seconds per image (decoding excluded).
    """
    out: list[ImageBoxes] = []
    seconds = 0.0
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = [load_rgb(im.image_path) for im in chunk]
        began = clock()
        results = detect_batch(pixels)
        seconds += clock() - began
        for image, dets in zip(chunk, results, strict=True):
            boxes, names = truth_boxes(image)
            out.append(
                ImageBoxes.of(
                    [d.box for d in dets], [d.score for d in dets], tuple(d.object_type for d in dets), boxes, names
                )
            )
    return out, seconds / max(len(images), 1)


def prior_boxes(
    train: Sequence[LabelledImage], images: Sequence[LabelledImage], types: Sequence[str]
) -> list[ImageBoxes]:
    """The label-statistics reference: each type's mean training box in every image, scored by the type's share of
    training objects (types never seen in training get no box)."""
    sums = {kind: np.zeros(4) for kind in types}
    counts = dict.fromkeys(types, 0)
    for image in train:
        for det in image.detections:
            if det.name in sums:
                sums[det.name] += det.box
                counts[det.name] += 1
    total = max(sum(counts.values()), 1)
    seen = [k for k in types if counts[k]]
    boxes = [sums[k] / counts[k] for k in seen]
    scores = [counts[k] / total for k in seen]
    out = []
    for image in images:
        truth, names = truth_boxes(image)
        out.append(ImageBoxes.of(boxes, scores, tuple(seen), truth, names))
    return out


def bootstrap_map(
    images: Sequence[ImageBoxes],
    types: Sequence[str],
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
    ious: Sequence[float] = COCO_IOUS,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of ``map50`` and ``map50_95`` resampling images with replacement.

    Returns:
        ``{"map50": (low, high), "map50_95": (low, high)}``.
    """
    if not images:
        raise ValueError("no images to bootstrap")
    pieces = [image_hits(im, types, ious) for im in images]  # matching is per image: done once
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"map50": [], "map50_95": []}
    for _ in range(n_boot):
        result = map_from_hits([pieces[i] for i in rng.integers(0, len(pieces), len(pieces))], types, ious)
        for key in draws:
            draws[key].append(result[key])
    tail = (1 - level) / 2 * 100
    out = {}
    for key, values in draws.items():
        finite = np.asarray(values)[np.isfinite(values)]
        out[key] = (
            (float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail)))
            if len(finite)
            else (float("nan"), float("nan"))
        )
    return out


def flat_map_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """A :func:`~.matching.detection_map` result as flat metric names: ``map50``, ``map50_95``,
    ``ap50/<type>``, ``ap50_95/<type>`` (types without true objects left out)."""
    metrics = {f"{prefix}map50": result["map50"], f"{prefix}map50_95": result["map50_95"]}
    for kind, value in result["ap50"].items():
        if np.isfinite(value):
            key = kind.replace(" ", "_")
            metrics[f"{prefix}ap50/{key}"] = value
            metrics[f"{prefix}ap50_95/{key}"] = result["ap50_95"][kind]
    return metrics
