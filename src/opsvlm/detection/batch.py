"""Detection over a folder of images with Ray Data: per-image JSON and a YOLO-format prediction export.

:func:`detect_folder` lists the images under a folder (recursively, the suffixes Ultralytics reads), maps them
through detector actors (:class:`DetectImages`: each loads the detector once and detects a batch of images per call)
and writes, relative to the input folder::

    out/json/<relative path>.json       {"image", "width", "height", "detections": [...]}  (stage-1 detections format)
    out/labels/<relative path>.txt      class cx cy w h score  (normalised; class ids in out/data.yaml)
    out/data.yaml                       nc, names (the object types)
    out/summary.json                    images, detections per type, unreadable images (with the reason), seconds

Workers write the files (``out`` must be visible to them: a shared path on a cluster). An image that cannot be read is
listed in the summary with its reason, never skipped silently.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opsvlm.detection.registry import read_meta, resolve_detector
from opsvlm.tasks.inspection.data.yolo import IMAGE_SUFFIXES, OBJECT_TYPES
from opsvlm.tasks.inspection.detect.detector import DetectorConfig, DetectorError
from opsvlm.tasks.inspection.detect.export import image_record, write_predictions_yaml, yolo_prediction_lines
from opsvlm.tasks.inspection.detect.load import load_detector

__all__ = [
    "BatchDetectConfig",
    "DetectImages",
    "detect_folder",
    "detector_config",
    "list_images",
]


@dataclass(frozen=True)
class BatchDetectConfig:
    """Configuration of ``jobs/detect_images.py``.

    Attributes:
        images: The folder of images.
        out: Output folder (see the module docstring).
        detector: Detector reference (``models:/opsvlm-detector@champion``, ``runs:/...``, a ``.pt``/``.onnx`` file).
        prefer: ``pt`` or ``onnx`` (the registered ONNX export).
        conf: Score threshold (``None``: the one recorded with the detector).
        imgsz: Inference size (``None``: the one recorded with the detector, else its training size).
        class_map: Detector class -> object type (empty: the recorded one, else the default mapping).
        device: ``auto``, ``cpu``, ``cuda:0``...
        batch_size: Images per detector call.
        actors: Detector actors.
        cpus_per_actor: CPUs per actor.
        gpus_per_actor: GPUs per actor.
        tracking_uri: MLflow URI for registry references.
    """

    images: str = ""
    out: str = ""
    detector: str = "models:/opsvlm-detector@champion"
    prefer: str = "pt"
    conf: float | None = None
    imgsz: int | None = None
    class_map: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    batch_size: int = 8
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    tracking_uri: str = ""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.actors < 1:
            raise DetectorError("batch_size and actors must be >= 1")


def list_images(folder: str | Path) -> list[str]:
    """Image files under ``folder`` (recursive, sorted), as paths relative to it.

    Raises:
        FileNotFoundError: no such folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"images: {root} is not a folder")
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def detector_config(config: BatchDetectConfig, cache_dir: str | None = None) -> DetectorConfig:
    """The detector a batch job loads: the reference resolved to a file, settings from the config or the detector's
    recorded ones."""
    weights = resolve_detector(
        config.detector, prefer=config.prefer, tracking_uri=config.tracking_uri or None, cache_dir=cache_dir
    )
    meta = read_meta(weights)
    return DetectorConfig(
        weights=str(weights),
        class_map=dict(config.class_map or meta.get("class_map") or {}),
        conf=config.conf if config.conf is not None else float(meta.get("conf", 0.25)),
        imgsz=config.imgsz if config.imgsz is not None else meta.get("imgsz"),
        device=config.device,
    )


class DetectImages:
    """Ray Data callable class: a batch of relative paths -> detections written to files, one status row each.

    Args:
        root: The images folder.
        out: The output folder.
        config: The detector to load (once per actor).
    """

    def __init__(self, root: str, out: str, config: DetectorConfig):
        self.root, self.out = Path(root), Path(out)
        self.detector = load_detector(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from opsvlm.tasks.inspection.detect.scoring import load_rgb

        paths = [str(p) for p in batch["path"]]
        rows: dict[str, list] = {"path": [], "error": [], "types": [], "seconds": []}
        pixels, good = [], []
        for rel in paths:
            try:
                pixels.append(load_rgb(str(self.root / rel)))
                good.append(rel)
            except Exception as exc:  # Pillow raises many types for a file that is not an image
                rows["path"].append(rel)
                rows["error"].append(f"cannot read image: {exc}")
                rows["types"].append("")
                rows["seconds"].append(0.0)
        started = time.perf_counter()
        results = self.detector.detect_batch(pixels) if pixels else []
        per_image = (time.perf_counter() - started) / max(len(pixels), 1)
        for rel, image, dets in zip(good, pixels, results, strict=True):
            height, width = image.shape[:2]
            json_path = (self.out / "json" / rel).with_suffix(".json")
            txt_path = (self.out / "labels" / rel).with_suffix(".txt")
            json_path.parent.mkdir(parents=True, exist_ok=True)
            txt_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(image_record(rel, width, height, dets), indent=1))
            txt_path.write_text("".join(line + "\n" for line in yolo_prediction_lines(dets)))
            rows["path"].append(rel)
            rows["error"].append("")
            rows["types"].append(",".join(d.object_type for d in dets))
            rows["seconds"].append(per_image)
        return rows


def detect_folder(config: BatchDetectConfig) -> dict[str, Any]:
    """Detect objects in every image of ``config.images`` (see the module docstring); Ray must be initialised.

    Returns:
        The summary also written to ``out/summary.json``.

    Raises:
        FileNotFoundError: no images folder, or no image in it.
        DetectorRefError, DetectorError: the detector cannot be resolved or loaded (checked on the driver first, so
            a bad reference or an unmapped class fails before any actor starts).
    """
    import ray
    import ray.data

    if not config.images or not config.out:
        raise DetectorError("images and out are required")
    relative = list_images(config.images)
    if not relative:
        raise FileNotFoundError(f"images: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {config.images}")
    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    detector = detector_config(config, cache_dir=str(out / ".detector"))
    loaded = load_detector(detector)  # fail fast on the driver: missing file, unmapped class
    started = time.perf_counter()
    dataset = ray.data.from_items([{"path": p} for p in relative])
    rows = dataset.map_batches(
        DetectImages,
        fn_constructor_kwargs={"root": str(Path(config.images).resolve()), "out": str(out), "config": detector},
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
        max_restarts=0,  # an actor that dies fails the job loudly (a restart could not re-fetch its arguments)
    ).take_all()
    write_predictions_yaml(out, OBJECT_TYPES)
    per_type: Counter = Counter()
    for row in rows:
        per_type.update(t for t in row["types"].split(",") if t)
    errors = {row["path"]: row["error"] for row in rows if row["error"]}
    done = [row for row in rows if not row["error"]]
    summary = {
        "images": len(relative),
        "written": len(done),
        "unreadable": errors,
        "detections_per_type": {kind: per_type[kind] for kind in OBJECT_TYPES},
        "images_without_detections": sum(1 for row in done if not row["types"]),
        "detector": detector.weights,
        "conf": detector.conf,
        "imgsz": loaded.imgsz,
        "detector_seconds_per_image": float(np.mean([row["seconds"] for row in done])) if done else None,
        "seconds": time.perf_counter() - started,
    }
    if len(rows) != len(relative):  # every image must come back as written or unreadable
        raise RuntimeError(f"{len(relative)} images in, {len(rows)} rows out")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
