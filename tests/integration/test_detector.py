"""The inspection detector on the platform: a YOLO detector trained from its YAML on synthetic scenes on CPU in a Ray
task, tracked in a real MLflow server and registered under its own name; resolved from the registry for Ray Data batch
detection and as a Serve deployment; the system evaluation logged with a (random) tiny VLM.

What the detector learns is asserted against reference detectors that know nothing about the image (random boxes;
each type's mean training box). The full figure on the tiny settings is in the report of jobs/train_detector.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from opsvlm.detection.registry import (
    DetectorRefError,
    promote_detector,
    register_detector,
    resolve_detector,
)
from opsvlm.detection.train import DetectorTrainConfig, train_detector
from opsvlm.tasks.inspection.data.synthetic import InspectionConfig, generate_inspection_dataset
from opsvlm.tasks.inspection.data.yolo import OBJECT_TYPES, load_detections_json, read_dataset
from opsvlm.tasks.inspection.detect.detector import DetectorConfig, DetectorError, UnmappedClassError
from opsvlm.tasks.inspection.detect.load import load_detector
from opsvlm.tasks.inspection.detect.ultralytics_backend import YoloTrainSettings

pytestmark = pytest.mark.integration

MODEL_NAME = "detector-it"
EPOCHS = 20  # from the YAML, no pretrained weights, the tiny recipe of jobs/configs/detector_tiny.yaml: ~2 min on CPU


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("detector") / "scenes"
    generate_inspection_dataset(root, InspectionConfig(images=160, size=112, seed=0))
    return root


@pytest.fixture(scope="module")
def trained(scenes, ray_local, mlflow_server, tmp_path_factory):
    config = DetectorTrainConfig(
        data=str(scenes),
        workdir=str(tmp_path_factory.mktemp("detector_work")),
        yolo=YoloTrainSettings(
            model="yolo11n.yaml",
            epochs=EPOCHS,
            imgsz=128,
            batch=8,
            workers=0,
            device="cpu",
            extra={"mosaic": 0.0, "optimizer": "AdamW", "lr0": 0.004, "warmup_epochs": 1},
        ),
        bootstrap=100,
        num_cpus=1.0,
        use_gpu="false",
        tracking_uri=mlflow_server,
        experiment="detector-it",
        model_name=MODEL_NAME,
    )
    return train_detector(config)


def test_detector_from_yaml_beats_detectors_that_know_nothing(trained):
    m = trained["metrics"]
    assert m["test/n_images"] >= 14 and m["test/n_objects"] > 50
    # Reference detectors: random boxes, and each type's mean training box scored by its frequency.
    assert m["test/map50"] > m["baseline/random/map50"] + 0.1
    assert m["test/map50"] > m["baseline/prior/map50"]
    assert m["test/map50_ci_low"] <= m["test/map50"] <= m["test/map50_ci_high"]
    assert 0.0 <= m["test/map50_95"] <= m["test/map50"]
    # The ONNX export run by onnxruntime finds the same objects.
    assert m["test_onnx/map50"] == pytest.approx(m["test/map50"], abs=0.02)
    assert m["seconds/pt_per_image"] > 0 and m["seconds/onnx_per_image"] > 0
    assert trained["dataset"]["names"] == list(OBJECT_TYPES)


def test_run_is_tracked_and_registered_with_champion(trained, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = client.get_run(trained["run_id"])
    for kind in OBJECT_TYPES:
        key = kind.replace(" ", "_")
        assert f"test/ap50/{key}" in run.data.metrics and f"test/ap50_95/{key}" in run.data.metrics
    assert run.data.params["yolo.model"] == "yolo11n.yaml"
    history = client.get_metric_history(trained["run_id"], "epoch/train/box_loss")
    assert len(history) == EPOCHS
    artifacts = {a.path for a in client.list_artifacts(trained["run_id"], "detector")}
    assert {"detector/weights.pt", "detector/weights.onnx", "detector/detector.json"} <= artifacts
    plots = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(trained["run_id"], "plots/test")}
    assert "confusion_matrix.png" in plots and any("PR_curve" in p for p in plots)

    assert trained["decision"]["promoted"] and trained["version"] == 1
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.version == "1" and champion.tags["kind"] == "detector"
    # choose on validation: the version carries the validation scores, the test figures stay in the run
    assert float(champion.tags["metric.map50"]) == pytest.approx(trained["metrics"]["val/map50"])
    assert champion.tags["eval_split"] == trained["val_split"]
    on_test = register_detector(
        trained["run_id"],
        name=MODEL_NAME,
        metrics={"map50_95": 1.0},
        eval_split=trained["eval_split"],
        tracking_uri=mlflow_server,
    )
    refused = promote_detector(MODEL_NAME, on_test.version, force=True, tracking_uri=mlflow_server)
    assert not refused["promoted"] and "chooses on validation" in refused["reason"]
    # The gate (the VLM's paired bootstrap over the same validation images): the same boxes again are a tie, not an
    # improvement; forcing is recorded.
    again = register_detector(
        trained["run_id"],
        name=MODEL_NAME,
        metrics={"map50_95": trained["metrics"]["val/map50_95"]},
        eval_split=trained["val_split"],
        tracking_uri=mlflow_server,
    )
    kept = promote_detector(MODEL_NAME, again.version, tracking_uri=mlflow_server)
    assert not kept["promoted"] and "does not clear 0" in kept["reason"] and "[+0.0000, +0.0000]" in kept["reason"]
    forced = promote_detector(MODEL_NAME, again.version, force=True, tracking_uri=mlflow_server)
    assert forced["promoted"] and forced["forced"]
    assert client.get_model_version(MODEL_NAME, again.version).tags["promotion.forced"] == "true"
    promote_detector(MODEL_NAME, 1, force=True, tracking_uri=mlflow_server)  # back to v1 for the other tests


def test_references_resolve_and_unmapped_classes_fail_clearly(trained, mlflow_server, tmp_path):
    pt = resolve_detector(f"models:/{MODEL_NAME}@champion", tracking_uri=mlflow_server, cache_dir=tmp_path)
    onnx = resolve_detector(f"runs:/{trained['run_id']}", prefer="onnx", tracking_uri=mlflow_server, cache_dir=tmp_path)
    assert pt.name == "weights.pt" and onnx.name == "weights.onnx"
    with pytest.raises(DetectorRefError, match="not found in the model registry"):
        resolve_detector("models:/no-such-detector@champion", tracking_uri=mlflow_server)
    with pytest.raises(UnmappedClassError, match=r"\['toe drain', 'slope drain', 'vegetation'\]"):
        load_detector(DetectorConfig(weights=str(pt), class_map={"rock toe": "rock toe"}))
    detector = load_detector(DetectorConfig(weights=str(onnx), imgsz=128, device="cpu"))
    with pytest.raises(DetectorError, match=r"images\[0\]"):
        detector.detect_batch([np.zeros((8, 8), np.uint8)])
    blank = detector.detect(np.zeros((64, 64, 3), np.uint8))  # nothing to find: a list (maybe empty), no error
    assert isinstance(blank, list) and all(d.object_type in OBJECT_TYPES for d in blank)


def test_batch_detection_over_a_folder(trained, mlflow_server, scenes, tmp_path, ray_local):
    import shutil

    from opsvlm.detection.batch import BatchDetectConfig, detect_folder

    folder = tmp_path / "photos"
    shutil.copytree(scenes / "test" / "images", folder / "site_a")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    summary = detect_folder(
        BatchDetectConfig(
            images=str(folder),
            out=str(tmp_path / "out"),
            detector=f"models:/{MODEL_NAME}@champion",
            device="cpu",
            batch_size=4,
            tracking_uri=mlflow_server,
            cpus_per_actor=0.5,
        )
    )
    n = len(list((folder / "site_a").iterdir()))
    assert summary["images"] == n + 1 and summary["written"] == n
    assert list(summary["unreadable"]) == ["broken.jpg"] and "cannot read image" in summary["unreadable"]["broken.jpg"]
    assert sum(summary["detections_per_type"].values()) > 0
    records = sorted((tmp_path / "out" / "json" / "site_a").glob("*.json"))
    labels = sorted((tmp_path / "out" / "labels" / "site_a").glob("*.txt"))
    assert len(records) == len(labels) == n
    parsed = load_detections_json(records[0])[0]
    rows = [line.split() for line in labels[0].read_text().splitlines()]
    assert len(rows) == len(parsed.detections)
    for row, det in zip(rows, parsed.detections, strict=True):
        assert OBJECT_TYPES[int(row[0])] == det.object_type and len(row) == 6
        assert float(row[5]) == pytest.approx(det.score, abs=1e-5)
    assert (tmp_path / "out" / "data.yaml").is_file() and json.loads((tmp_path / "out" / "summary.json").read_text())


def test_serve_deployment_detects_and_reports_unusable_detectors(trained, mlflow_server, scenes, ray_local):
    from ray import serve

    from opsvlm.detection.serve import DetectorUnavailable, detector_deployment
    from opsvlm.tasks.inspection.detect.scoring import load_rgb

    image = load_rgb(str(sorted((scenes / "test" / "images").iterdir())[0]))
    deployment = detector_deployment(num_cpus=0.5)
    try:
        handle = serve.run(
            deployment.bind(f"models:/{MODEL_NAME}@champion", device="cpu", tracking_uri=mlflow_server),
            name="detector",
            route_prefix=None,
        )
        detections = handle.detect.remote(image).result(timeout_s=120)
        assert detections and all(d.object_type in OBJECT_TYPES and 0 <= d.score <= 1 for d in detections)
        stage_one = [d.to_stage_one(i) for i, d in enumerate(detections)]  # what /predict_objects hands stage 2
        assert [s.index for s in stage_one] == list(range(len(detections)))
        with pytest.raises(DetectorError, match="uint8"):
            handle.detect.remote(image.astype(np.float32)).result(timeout_s=60)
        status = handle.status.remote().result(timeout_s=60)
        assert status["ready"] and status["format"] == "pt"

        broken = serve.run(
            deployment.options(name="BrokenDetector").bind(
                f"models:/{MODEL_NAME}@champion",
                class_map={"rock toe": "rock toe"},
                device="cpu",
                tracking_uri=mlflow_server,
            ),
            name="broken-detector",
            route_prefix=None,
        )
        assert "have no object type" in broken.status.remote().result(timeout_s=60)["error"]
        with pytest.raises(DetectorUnavailable, match="have no object type"):
            broken.detect.remote(image).result(timeout_s=60)
    finally:
        serve.shutdown()


def test_system_evaluation_is_logged(trained, mlflow_server, scenes, tiny_model_dir):
    """Both stages on the test images with the tiny random VLM: the plumbing and the bookkeeping, not the figures."""
    from mlflow import MlflowClient

    from opsvlm.detection.system_eval import SystemEvalConfig, log_system_eval, score_system
    from opsvlm.inference import Predictor
    from opsvlm.tasks.inspection.detect.system import vlm_classifier
    from opsvlm.video.sampling import SamplingSpec

    splits, _ = read_dataset(scenes)
    images = splits["test"][:6]
    train_classes = [d.name for image in splits["train"] for d in image.detections]
    weights = resolve_detector(f"models:/{MODEL_NAME}@champion", tracking_uri=mlflow_server)
    detector = load_detector(DetectorConfig(weights=str(weights), imgsz=128, device="cpu"))
    spec = SamplingSpec(frames_per_clip=2, max_pixels=3136, min_pixels=3136)
    predictor = Predictor.from_base(str(tiny_model_dir), spec, task="inspection")
    result = score_system(images, train_classes, detector.detect, vlm_classifier(predictor, spec), n_boot=50)
    perfect, two_stage = result.table["perfect stage 1"], result.table["two-stage"]
    n_true = sum(len(im.detections) for im in images)
    assert perfect["n_true"] == two_stage["n_true"] == n_true
    assert perfect["n_matched"] == n_true and perfect["matched/type_accuracy"] == 1.0
    assert perfect["e2e/macro_f1"] == pytest.approx(perfect["matched/macro_f1"])
    assert two_stage["n_matched"] + two_stage["n_missed"] == n_true
    assert two_stage["n_matched"] + two_stage["n_spurious"] == two_stage["n_pred"]
    assert result.seconds["detect"] > 0 and result.seconds["classify_perfect"] > 0
    config = SystemEvalConfig(data=str(scenes), tracking_uri=mlflow_server, experiment="detector-it", bootstrap=50)
    run_id = log_system_eval(result, config, mlflow_server)
    client = MlflowClient(tracking_uri=mlflow_server)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["perfect_stage_1/n_true"] == n_true
    assert "two-stage/e2e/macro_f1" in metrics or math.isnan(two_stage["e2e/macro_f1"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"system_table.md", "system_eval.json"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "pictures")] == ["pictures/two_stage_example.png"]
