"""Training the stage-1 detector on the platform: one Ray task trains, scores and logs; the driver registers.

:func:`train_detector` (what ``jobs/train_detector.py`` runs):

1. writes the collapsed detection dataset (:func:`opsvlm.tasks.inspection.detect.dataset.write_detection_dataset`:
   the 9 condition classes -> the 4 object types, or ``collapse``);
2. opens an MLflow run and runs :func:`fit_and_score` as one Ray task (``num_cpus``; one GPU when the cluster has
   one and ``use_gpu`` allows). The task trains with Ultralytics (from the model YAML, or from ``yolo.weights``),
   scores the best checkpoint on the validation and evaluation splits with the numpy mAP of
   :mod:`opsvlm.tasks.inspection.detect.matching` (AP@0.5 and AP@0.5:0.95 per type, image-bootstrap 95% intervals
   on the evaluation split) next to two reference detectors that know nothing about the image (each type's mean
   training box; random boxes), exports ONNX and scores that too, times both per image, and logs it all (metrics,
   per-epoch history from ``results.csv``, Ultralytics' plots, the ``detector/`` artifacts) to the run;
3. registers the run's ``detector/`` folder under ``model_name`` and applies the champion gate
   (:mod:`.registry`).

The dataset folder must be visible to the Ray worker (a shared path on a cluster, as for the VLM jobs).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from opsvlm.config import to_dict
from opsvlm.detection.registry import (
    ARTIFACT,
    DEFAULT_DETECTOR_NAME,
    META_FILE,
    VAL_BOXES,
    WEIGHTS_ONNX,
    WEIGHTS_PT,
    boxes_record,
    promote_detector,
    register_detector,
)
from opsvlm.tasks.inspection.data.yolo import read_data_yaml, read_split
from opsvlm.tasks.inspection.detect.detector import DetectorError
from opsvlm.tasks.inspection.detect.ultralytics_backend import YoloTrainSettings

__all__ = [
    "USE_GPU",
    "DetectorTrainConfig",
    "fit_and_score",
    "random_boxes",
    "split_id",
    "train_detector",
]

USE_GPU = ("auto", "true", "false")


@dataclass(frozen=True)
class DetectorTrainConfig:
    """Configuration of ``jobs/train_detector.py``.

    Attributes:
        data: The YOLO export (data.yaml or its folder), e.g. a Roboflow export or ``jobs/generate_inspection.py``'s.
        workdir: Where the collapsed dataset and Ultralytics' run folder go (shared storage on a cluster).
        collapse: Source class -> detector class; empty = each condition class to its object type.
        class_map: Detector class -> object type, recorded for serving; empty = the default mapping (needed only
            when ``collapse`` names classes other than the object types).
        yolo: Ultralytics training settings (model YAML or checkpoint, epochs, imgsz, batch, workers, device, ...).
        val_split: Split scored for choosing (logged as ``val/*``; the registered version's scores, the gate's).
        eval_split: Split the reported figures use (``test/*``); the gate uses ``val_split``.
        score_conf: Score threshold while scoring (low: mAP needs the whole precision-recall curve).
        serve_conf: Default score threshold recorded for serving and batch inference.
        export_onnx: Also export, score and log ``weights.onnx``.
        bootstrap: Bootstrap replicates of the mAP intervals (resampling images).
        num_cpus: CPUs of the Ray training task.
        use_gpu: ``auto`` (one GPU when the cluster has one), ``true`` or ``false``.
        tracking_uri: MLflow URI (empty: ``MLFLOW_TRACKING_URI`` or the local store in ./mlruns).
        experiment: MLflow experiment.
        run_name: MLflow run name (empty: MLflow picks one).
        model_name: Registered model name of detectors.
        register: Register the run and apply the champion gate.
        force_promote: Promote even if the gate would keep the champion (recorded).
    """

    data: str = ""
    workdir: str = "outputs/detector"
    collapse: dict[str, str] = field(default_factory=dict)
    class_map: dict[str, str] = field(default_factory=dict)
    yolo: YoloTrainSettings = field(default_factory=YoloTrainSettings)
    val_split: str = "val"
    eval_split: str = "test"
    score_conf: float = 0.001
    serve_conf: float = 0.25
    export_onnx: bool = True
    bootstrap: int = 200
    num_cpus: float = 1.0
    use_gpu: str = "auto"
    tracking_uri: str = ""
    experiment: str = "opsvlm-detector"
    run_name: str = ""
    model_name: str = DEFAULT_DETECTOR_NAME
    register: bool = True
    force_promote: bool = False

    def __post_init__(self) -> None:
        if self.use_gpu not in USE_GPU:
            raise DetectorError(f"use_gpu: must be one of {list(USE_GPU)}, got {self.use_gpu!r}")
        if not 0.0 <= self.score_conf <= 1.0 or not 0.0 <= self.serve_conf <= 1.0:
            raise DetectorError("score_conf and serve_conf must be in [0, 1]")
        if self.bootstrap < 0:
            raise DetectorError(f"bootstrap: must be >= 0, got {self.bootstrap}")
        if self.num_cpus <= 0:
            raise DetectorError(f"num_cpus: must be > 0, got {self.num_cpus}")


def split_id(split: str, image_paths: list[str]) -> str:
    """``<split>:<hash of the image file names>``: identifies the exact image set scored."""
    digest = hashlib.sha1("\n".join(sorted(Path(p).name for p in image_paths)).encode()).hexdigest()[:12]
    return f"{split}:{digest}"


def _metric_name(column: str) -> str:
    """A results.csv column as an MLflow metric name (``metrics/mAP50(B)`` -> ``epoch/metrics/mAP50_B``)."""
    return "epoch/" + re.sub(r"[^A-Za-z0-9_\-./ ]", "_", column.strip()).strip("_")


def _epoch_history(results_csv: Path) -> list[tuple[int, dict[str, float]]]:
    import csv

    rows = []
    with results_csv.open() as handle:
        for row in csv.DictReader(handle):
            epoch = int(float(row.get("epoch", len(rows) + 1)))
            values = {}
            for key, text in row.items():
                if key is None or key.strip() == "epoch":
                    continue
                try:
                    value = float(text)
                except (TypeError, ValueError):
                    continue
                if np.isfinite(value):
                    values[_metric_name(key)] = value
            rows.append((epoch, values))
    return rows


def random_boxes(images, types, per_image: int = 10, seed: int = 0):
    """The chance reference: ``per_image`` uniformly random boxes of random types and scores in every image."""
    from opsvlm.tasks.inspection.detect.matching import ImageBoxes
    from opsvlm.tasks.inspection.detect.scoring import truth_boxes

    rng = np.random.default_rng(seed)
    out = []
    for image in images:
        corners = rng.uniform(0, 1, (per_image, 2, 2))
        boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)  # [n, (x1, y1, x2, y2)]
        kinds = tuple(str(types[i]) for i in rng.integers(0, len(types), per_image))
        truth, names = truth_boxes(image)
        out.append(ImageBoxes.of(boxes, rng.uniform(0, 1, per_image), kinds, truth, names))
    return out


def fit_and_score(config: DetectorTrainConfig, data_yaml: str, run_id: str, tracking_uri: str) -> dict[str, Any]:
    """Train, score and log one detector (runs inside the Ray task; plain Python, callable directly in tests).

    Returns:
        ``{"metrics": {...}, "eval_split": id, "names": {...}, "seconds": {...}, "save_dir": ...}``.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from opsvlm.tasks.inspection.detect.detector import DetectorConfig
    from opsvlm.tasks.inspection.detect.matching import detection_map
    from opsvlm.tasks.inspection.detect.scoring import bootstrap_map, detector_boxes, flat_map_metrics, prior_boxes
    from opsvlm.tasks.inspection.detect.ultralytics_backend import (
        UltralyticsDetector,
        configure_offline,
        export_onnx,
        train_yolo,
        ultralytics_val,
    )

    configure_offline()
    client = MlflowClient(tracking_uri=tracking_uri)
    started = time.perf_counter()
    # the dataset folder is <workdir>/dataset (train_detector): Ultralytics' run goes next to it
    result = train_yolo(data_yaml, Path(data_yaml).parent.parent / "ultralytics", config.yolo)
    train_s = time.perf_counter() - started
    save_dir = Path(result.save_dir)

    dataset = read_data_yaml(data_yaml)
    types = list(dataset.names)
    train_images, _ = read_split(dataset, "train")
    splits = {name: read_split(dataset, name)[0] for name in (config.val_split, config.eval_split)}
    eval_images = splits[config.eval_split]
    detector_config = DetectorConfig(
        weights=result.best,
        class_map=config.class_map,
        conf=config.score_conf,
        imgsz=config.yolo.imgsz,
        device=config.yolo.device,
        max_det=300,
    )
    detector = UltralyticsDetector(detector_config)
    metrics: dict[str, float] = {"train_seconds": train_s}
    seconds: dict[str, float] = {}
    boxes_by_split = {}
    for split_name, images in splits.items():
        boxes, per_image = detector_boxes(detector.detect_batch, images, batch_size=1)
        boxes_by_split[split_name] = boxes
        prefix = "val/" if split_name == config.val_split and split_name != config.eval_split else "test/"
        metrics.update(flat_map_metrics(detection_map(boxes, types), prefix))
        if split_name == config.eval_split:
            seconds["pt_per_image"] = per_image
    eval_boxes = boxes_by_split[config.eval_split]
    # the validation split's boxes, image by image: what the promotion gate compares two versions on
    client.log_dict(
        run_id, {"types": types, "images": [boxes_record(b) for b in boxes_by_split[config.val_split]]}, VAL_BOXES
    )
    metrics["test/n_images"] = float(len(eval_images))
    metrics["test/n_objects"] = float(sum(len(im.detections) for im in eval_images))
    if config.bootstrap:
        for key, (low, high) in bootstrap_map(eval_boxes, types, n_boot=config.bootstrap).items():
            metrics[f"test/{key}_ci_low"], metrics[f"test/{key}_ci_high"] = low, high
    metrics.update(
        flat_map_metrics(detection_map(prior_boxes(train_images, eval_images, types), types), "baseline/prior/")
    )
    metrics.update(flat_map_metrics(detection_map(random_boxes(eval_images, types), types), "baseline/random/"))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / ARTIFACT
        folder.mkdir()
        shutil.copyfile(result.best, folder / WEIGHTS_PT)
        if config.export_onnx:
            onnx_path = export_onnx(str(folder / WEIGHTS_PT), config.yolo.imgsz, Path(tmp) / "onnx")
            shutil.copyfile(onnx_path, folder / WEIGHTS_ONNX)
            onnx_detector = UltralyticsDetector(
                DetectorConfig(**{**to_dict(detector_config), "weights": str(folder / WEIGHTS_ONNX), "device": "cpu"})
            )
            onnx_boxes, seconds["onnx_per_image"] = detector_boxes(onnx_detector.detect_batch, eval_images, 1)
            metrics.update(flat_map_metrics(detection_map(onnx_boxes, types), "test_onnx/"))
        meta = {
            "names": result.names,
            "object_types": detector.object_types,
            "class_map": config.class_map,
            "imgsz": config.yolo.imgsz,
            "conf": config.serve_conf,
            "started_from": result.started_from,
            "licence": "Ultralytics YOLO, AGPL-3.0",
        }
        (folder / META_FILE).write_text(json.dumps(meta, indent=2))
        client.log_artifacts(run_id, str(folder), ARTIFACT)
        val = ultralytics_val(
            str(folder / WEIGHTS_PT), data_yaml, config.eval_split, config.yolo.imgsz, config.yolo.device, tmp
        )
        metrics["ultralytics/test/map50"], metrics["ultralytics/test/map50_95"] = val["map50"], val["map50_95"]
        for plot in sorted(Path(val["save_dir"]).glob("*.png")):
            client.log_artifact(run_id, str(plot), "plots/test")
    for plot in sorted(save_dir.glob("*.png")) + sorted(save_dir.glob("*.jpg")):
        client.log_artifact(run_id, str(plot), "plots/training")
    if (save_dir / "results.csv").is_file():
        client.log_artifact(run_id, str(save_dir / "results.csv"), "training")
        history = _epoch_history(save_dir / "results.csv")
        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, epoch) for epoch, values in history for key, value in values.items()]
        for start in range(0, len(batch), 900):
            client.log_batch(run_id, metrics=batch[start : start + 900])
    metrics.update({f"seconds/{k}": v for k, v in seconds.items()})
    finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
    client.log_batch(run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in finite.items()])
    return {
        "metrics": metrics,
        "eval_split": split_id(config.eval_split, [im.image_path for im in eval_images]),
        "val_split": split_id(config.val_split, [im.image_path for im in splits[config.val_split]]),
        "names": result.names,
        "seconds": seconds,
        "save_dir": str(save_dir),
    }


def _gpus(use_gpu: str) -> int:
    import ray

    if use_gpu == "false":
        return 0
    available = int(ray.cluster_resources().get("GPU", 0))
    if use_gpu == "true" and not available:
        raise DetectorError("use_gpu=true but the Ray cluster has no GPU")
    return 1 if available else 0


def train_detector(config: DetectorTrainConfig) -> dict[str, Any]:
    """The whole job (see the module docstring); Ray must be initialised (``opsvlm.runtime.init_ray``).

    Returns:
        ``{"run_id", "metrics", "eval_split", "dataset", "version", "decision"}`` (``version``/``decision`` are
        ``None`` when ``register`` is off).
    """
    import mlflow
    import ray

    from opsvlm.tasks.inspection.detect.dataset import write_detection_dataset
    from opsvlm.tracking import config_params, ensure_experiment, resolve_tracking_uri

    if not config.data:
        raise DetectorError("data: give the YOLO export to train on (a data.yaml or its folder)")
    work = Path(config.workdir).resolve()
    dataset = write_detection_dataset(config.data, work / "dataset", config.collapse or None)
    uri = resolve_tracking_uri(config.tracking_uri)
    experiment_id = ensure_experiment(config.experiment, uri)
    gpus = _gpus(config.use_gpu)
    yolo = config.yolo
    if gpus == 0 and yolo.device == "auto":
        from dataclasses import replace

        config = replace(config, yolo=replace(yolo, device="cpu"))
    tags = {"opsvlm.job": "train_detector", "opsvlm.kind": "detector", "opsvlm.data": str(config.data)}
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.run_name or None, tags=tags) as run:
        mlflow.log_params({**config_params(to_dict(config)), "gpus": gpus})
        mlflow.log_dict(dataset.to_dict(), "dataset/detection_summary.json")
        task = ray.remote(fit_and_score).options(num_cpus=config.num_cpus, num_gpus=gpus, max_retries=0)
        outcome = ray.get(task.remote(config, dataset.yaml_path, run.info.run_id, uri))
        mlflow.set_tag("opsvlm.eval_split", outcome["eval_split"])
    version = decision = None
    if config.register:
        # choose on validation: the version carries its validation scores; the test figures are the run's report
        selection = {k: v for k, v in outcome["metrics"].items() if k.startswith("val/") and np.isfinite(v)}
        registered = register_detector(
            run.info.run_id,
            name=config.model_name,
            metrics={k.removeprefix("val/"): v for k, v in selection.items()},
            eval_split=outcome["val_split"],
            tracking_uri=uri,
        )
        version = int(registered.version)
        decision = promote_detector(config.model_name, version, force=config.force_promote, tracking_uri=uri)
    return {
        "run_id": run.info.run_id,
        "metrics": outcome["metrics"],
        "eval_split": outcome["eval_split"],
        "val_split": outcome["val_split"],
        "dataset": dataset.to_dict(),
        "version": version,
        "decision": decision,
    }
