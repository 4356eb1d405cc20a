"""The system evaluation: both stages on the test images, scored as the system will really run, logged to MLflow.

For every image of the split, stage 1 (the detector) finds objects and stage 2 (the VLM) classifies each of them,
with every other detected object as context (exactly the ``/predict_objects`` path). The same VLM also classifies
the true objects given their true types (a perfect stage 1). Four systems are scored with
:func:`opsvlm.tasks.inspection.detect.system.system_metrics` (95% image-bootstrap intervals):

* ``two-stage``: detector -> VLM;
* ``perfect stage 1``: true boxes and types -> VLM (the figures the VLM evaluation reports);
* ``two-stage, type majority``: detector -> the most frequent training class of the detected type;
* ``perfect stage 1, type majority``: true types -> the most frequent training class of the type.

Per-image seconds of each stage are measured on the machine that runs it. Runs in-process (one detector, one VLM);
the models are injected so the scoring is testable without loading either.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opsvlm.tasks.inspection.data.yolo import LabelledImage
from opsvlm.tasks.inspection.detect.scoring import load_rgb
from opsvlm.tasks.inspection.detect.system import (
    ImageOutcome,
    TrueObject,
    bootstrap_intervals,
    perfect_stage_one,
    run_two_stage,
    system_metrics,
    type_majority,
    with_classes,
)

__all__ = [
    "HEADLINE",
    "SystemEvalConfig",
    "SystemEvalResult",
    "draw_outcome",
    "evaluate_system",
    "format_table",
    "log_system_eval",
    "score_system",
    "truths_of",
]

HEADLINE = (
    "detection/precision",
    "detection/recall",
    "matched/type_accuracy",
    "matched/macro_f1",
    "e2e/macro_f1",
    "e2e/accuracy",
    "e2e/condition_macro_f1",
)


@dataclass(frozen=True)
class SystemEvalConfig:
    """Configuration of ``jobs/evaluate_system.py``.

    Attributes:
        data: The YOLO export with the 9 condition classes (data.yaml or folder).
        split: Split to score.
        detector: Detector reference (``models:/opsvlm-detector@champion``, ``runs:/...``, a file).
        model: VLM reference (``models:/opsvlm-inspection@champion``, a run id, a checkpoint folder).
        conf: Detector score threshold (``None``: the one recorded with the detector).
        iou: IoU of a match.
        bootstrap: Bootstrap replicates (resampling images).
        max_images: Score at most this many images (quick runs); ``None`` = all.
        tracking_uri: MLflow URI (empty: ``MLFLOW_TRACKING_URI`` or ./mlruns).
        experiment: MLflow experiment.
        run_name: MLflow run name.
    """

    data: str = ""
    split: str = "test"
    detector: str = "models:/opsvlm-detector@champion"
    model: str = "models:/opsvlm-inspection@champion"
    conf: float | None = None
    iou: float = 0.5
    bootstrap: int = 1000
    max_images: int | None = None
    tracking_uri: str = ""
    experiment: str = "opsvlm-inspection"
    run_name: str = ""


@dataclass
class SystemEvalResult:
    """What :func:`score_system` measured.

    Attributes:
        table: ``{system: {metric: value}}``.
        intervals: ``{system: {metric: (low, high)}}``.
        seconds: Mean seconds per image: ``detect``, ``classify`` (stage 2 on the detected objects),
            ``classify_perfect`` (stage 2 on the true objects), and ``classify_per_object``.
        outcomes: ``{system: [ImageOutcome]}`` (for pictures and further analysis).
    """

    table: dict[str, dict[str, float]]
    intervals: dict[str, dict[str, tuple[float, float]]]
    seconds: dict[str, float]
    outcomes: dict[str, list[ImageOutcome]] = field(default_factory=dict)


def truths_of(image: LabelledImage) -> tuple[TrueObject, ...]:
    """The true objects of a labelled image (class names are condition classes)."""
    return tuple(TrueObject(tuple(d.box), d.name) for d in image.detections)


def score_system(
    images: Sequence[LabelledImage],
    train_classes: Sequence[str],
    detect: Callable,
    classify: Callable,
    iou: float = 0.5,
    n_boot: int = 1000,
    clock: Callable[[], float] = time.perf_counter,
) -> SystemEvalResult:
    """Run and score the four systems (see the module docstring).

    Args:
        images: The labelled split (condition classes).
        train_classes: The training split's object classes (for the type-majority baselines).
        detect: Image -> detections (a detector's ``detect``).
        classify: ``(image, [(type, box), ...]) -> [class or None]`` (:func:`~opsvlm.tasks.inspection.detect.system.
            vlm_classifier`).
        iou: IoU of a match.
        n_boot: Bootstrap replicates.
        clock: Seconds.
    """
    two_stage, perfect = [], []
    detect_s = classify_s = perfect_s = 0.0
    detected_objects = 0
    for image in images:
        pixels = load_rgb(image.image_path)
        truths = truths_of(image)
        predictions, times = run_two_stage(pixels, detect, classify, clock)
        detect_s += times.detect_s
        classify_s += times.classify_s
        detected_objects += times.objects
        two_stage.append(ImageOutcome(image.image_path, truths, tuple(predictions)))
        began = clock()
        classes = classify(pixels, [(t.object_type, t.box) for t in truths]) if truths else []
        perfect_s += clock() - began
        perfect.append(perfect_stage_one(ImageOutcome(image.image_path, truths, ()), classes))
    table_of_types = type_majority(train_classes)
    outcomes = {
        "two-stage": two_stage,
        "perfect stage 1": perfect,
        "two-stage, type majority": [with_classes(o, table_of_types) for o in two_stage],
        "perfect stage 1, type majority": [with_classes(o, table_of_types) for o in perfect],
    }
    table = {name: system_metrics(result, iou) for name, result in outcomes.items()}
    intervals = {name: bootstrap_intervals(result, iou, n_boot) for name, result in outcomes.items()} if n_boot else {}
    n = max(len(images), 1)
    seconds = {
        "detect": detect_s / n,
        "classify": classify_s / n,
        "classify_perfect": perfect_s / n,
        "classify_per_object": classify_s / detected_objects if detected_objects else math.nan,
    }
    return SystemEvalResult(table, intervals, seconds, outcomes)


def format_table(result: SystemEvalResult, metrics: Sequence[str] = HEADLINE) -> str:
    """A Markdown table: one row per system, each figure with its 95% interval."""

    def cell(system: str, metric: str) -> str:
        value = result.table[system].get(metric, math.nan)
        if not np.isfinite(value):
            return "n/a"
        low, high = result.intervals.get(system, {}).get(metric, (math.nan, math.nan))
        return f"{value:.3f} [{low:.3f}, {high:.3f}]" if np.isfinite(low) else f"{value:.3f}"

    lines = ["| system | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += ["| " + system + " | " + " | ".join(cell(system, m) for m in metrics) + " |" for system in result.table]
    return "\n".join(lines)


def log_system_eval(
    result: SystemEvalResult, config: SystemEvalConfig, tracking_uri: str, tags: dict[str, str] | None = None
) -> str:
    """Log an evaluation to a new MLflow run: ``<system key>/<metric>`` values and ``.../ci_low|ci_high``, the table
    (text and JSON), the per-stage seconds, and one picture of boxes and conditions. Returns the run id."""
    import mlflow

    from opsvlm.config import to_dict
    from opsvlm.tracking import config_params, ensure_experiment

    experiment_id = ensure_experiment(config.experiment, tracking_uri)
    run_tags = {"opsvlm.job": "evaluate_system", "opsvlm.kind": "system", **(tags or {})}
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.run_name or None, tags=run_tags) as run:
        mlflow.log_params(config_params(to_dict(config)))
        metrics: dict[str, float] = {}
        for system, values in result.table.items():
            key = system.replace(" ", "_").replace(",", "")
            for metric, value in values.items():
                if np.isfinite(value):
                    metrics[f"{key}/{metric}"] = float(value)
                low, high = result.intervals.get(system, {}).get(metric, (math.nan, math.nan))
                if np.isfinite(low) and np.isfinite(high):
                    metrics[f"{key}/{metric}/ci_low"], metrics[f"{key}/{metric}/ci_high"] = low, high
        metrics.update({f"seconds_per_image/{k}": v for k, v in result.seconds.items() if np.isfinite(v)})
        mlflow.log_metrics(metrics)
        mlflow.log_text(format_table(result), "system_table.md")
        mlflow.log_dict(
            {"table": result.table, "intervals": result.intervals, "seconds": result.seconds}, "system_eval.json"
        )
        outcomes = result.outcomes.get("two-stage") or []
        if outcomes:
            with tempfile.TemporaryDirectory() as tmp:
                picture = Path(tmp) / "two_stage_example.png"
                draw_outcome(max(outcomes, key=lambda o: len(o.truths)), picture)
                mlflow.log_artifact(str(picture), "pictures")
    return run.info.run_id


def draw_outcome(outcome: ImageOutcome, path: str | Path, scale: int = 4) -> Path:
    """A picture of one image with the system's boxes (type, score, condition; green when a true object of that class
    is under it at IoU >= 0.5, red otherwise) and the true boxes dashed in white."""
    from PIL import Image, ImageDraw

    from opsvlm.tasks.inspection.detect.system import match_outcome

    image = Image.open(outcome.image).convert("RGB")
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for truth in outcome.truths:
        x1, y1, x2, y2 = truth.box
        draw.rectangle((x1 * width, y1 * height, x2 * width, y2 * height), outline=(255, 255, 255), width=1)
    matched = match_outcome(outcome)
    for prediction, m in zip(outcome.predictions, matched, strict=True):
        right = m >= 0 and outcome.truths[m].class_name == prediction.class_name
        colour = (40, 220, 60) if right else (230, 40, 40)
        x1, y1, x2, y2 = prediction.box
        draw.rectangle((x1 * width, y1 * height, x2 * width, y2 * height), outline=colour, width=2)
        label = f"{prediction.class_name or prediction.object_type} {prediction.score:.2f}"
        draw.text((x1 * width + 2, y1 * height + 2), label, fill=colour)
    image.save(path)
    return Path(path)


def evaluate_system(config: SystemEvalConfig) -> dict[str, Any]:
    """Load both models, score the split and log it (what ``jobs/evaluate_system.py`` runs).

    Returns:
        ``{"run_id", "table", "intervals", "seconds", "n_images"}``.
    """
    from opsvlm.detection.batch import BatchDetectConfig, detector_config
    from opsvlm.inference import Predictor
    from opsvlm.registry import resolve_model
    from opsvlm.tasks.inspection.data.yolo import read_dataset
    from opsvlm.tasks.inspection.detect.load import load_detector
    from opsvlm.tasks.inspection.detect.system import vlm_classifier
    from opsvlm.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(config.tracking_uri)
    splits, _ = read_dataset(config.data)
    if config.split not in splits:
        raise ValueError(f"data: {config.data} has no {config.split!r} split (has {sorted(splits)})")
    images = splits[config.split][: config.max_images] if config.max_images else splits[config.split]
    train_classes = [d.name for image in splits.get("train", []) for d in image.detections]
    cache = tempfile.mkdtemp(prefix="opsvlm-system-eval-")
    detector = load_detector(
        detector_config(BatchDetectConfig(detector=config.detector, conf=config.conf, tracking_uri=uri), cache)
    )
    predictor = Predictor.from_checkpoint(resolve_model(config.model, uri, cache))
    result = score_system(
        images, train_classes, detector.detect, vlm_classifier(predictor, predictor.spec), config.iou, config.bootstrap
    )
    run_id = log_system_eval(
        result, config, uri, {"opsvlm.detector": config.detector, "opsvlm.model_ref": config.model}
    )
    return {
        "run_id": run_id,
        "n_images": len(images),
        "table": result.table,
        "intervals": result.intervals,
        "seconds": result.seconds,
        "markdown": format_table(result),
        "detector": json.loads(json.dumps(detector.describe(), default=str)),
    }
