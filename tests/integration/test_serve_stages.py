"""Whole recordings and both inspection stages on the real Serve app, over real HTTP (httpx) on a local Ray cluster.

Two applications of ``serve_app.app:build_app`` run side by side on one Serve instance:

* ``/ops``: an operations model (a real tiny checkpoint) serving ``/timeline`` and ``/predict``, with a detector whose
  score threshold no detection of it reaches (an image where nothing is found: 200 without objects);
* ``/insp``: an inspection model with the detector registered on a real MLflow server (``models:/<name>@champion``):
  ``/predict_objects`` without detections runs detector -> VLM on every detected object.

The detector is a YOLO11n built from its YAML with the 4 object types and never trained (nothing can be downloaded
here; what is checked is the wiring, not what it finds): at a score threshold of 0 it returns its low-score boxes, at
0.5 none. The last test redeploys ``/ops`` with a class mapping that leaves the detector's classes unmapped. After
every bad input the server must still be healthy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from opsvlm.tasks.inspection.data.yolo import OBJECT_TYPES
from opsvlm.tasks.operations import LABEL_NAMES
from opsvlm.testing.checkpoints import write_adapter_checkpoint
from opsvlm.testing.processes import free_port
from opsvlm.video.encode import write_video
from opsvlm.video.sampling import SamplingSpec
from tests.unit.test_serving import FPS, SPEC, ramp_frame, write_bad_videos

pytestmark = pytest.mark.integration

IMAGE_SPEC = SamplingSpec(frames_per_clip=2, max_pixels=56 * 56, min_pixels=56 * 56)
DETECTOR_NAME = "opsvlm-detector-stages-test"
SECONDS = 12.0  # the recording /timeline annotates: windows of 5 s every 2.5 s
MAX_TIMELINE_S = 20.0  # long.mp4 (24 s) is over it
MAX_DETECTIONS = 3  # the untrained detector returns more boxes: its 3 most confident are classified
TIMEOUT = httpx.Timeout(120.0)


def _image(path: Path, seed: int = 0) -> Path:
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((90, 120, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stages_media")
    good = root / "shift.mp4"
    write_video(good, (ramp_frame(i) for i in range(round(SECONDS * FPS))), FPS)
    long = root / "long.mp4"
    write_video(long, (ramp_frame(i) for i in range(round(2 * SECONDS * FPS))), FPS)
    site = _image(root / "site.png")
    (root / "noise.png").write_bytes(np.random.default_rng(1).bytes(3000))
    (root / "blank.png").write_bytes(b"")
    tiff = root / "scan.tif"
    from PIL import Image

    Image.open(site).save(tiff)
    (root / "scan_named.png").write_bytes(tiff.read_bytes())
    return {"root": root, "good": good, "long": long, "site": site, **write_bad_videos(root, good)}


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stages_checkpoints")
    return {
        "operations": write_adapter_checkpoint(root / "operations", tiny_model_dir, SPEC, task="operations"),
        "inspection": write_adapter_checkpoint(root / "inspection", tiny_model_dir, IMAGE_SPEC, task="inspection"),
    }


@pytest.fixture(scope="module")
def detector(mlflow_server, tmp_path_factory) -> dict:
    """An untrained 4-type YOLO11n (from its YAML) logged as a run's ``detector`` artifacts, registered, champion."""
    import mlflow
    import torch
    from mlflow import MlflowClient

    from opsvlm.detection.registry import promote_detector, register_detector
    from opsvlm.tasks.inspection.detect.ultralytics_backend import configure_offline

    folder = tmp_path_factory.mktemp("stages_detector") / "detector"
    folder.mkdir()
    configure_offline(folder.parent / "ultralytics")
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=len(OBJECT_TYPES), verbose=False)
    model.names = dict(enumerate(OBJECT_TYPES))
    torch.save({"model": model, "train_args": {"imgsz": 64, "task": "detect"}}, folder / "weights.pt")
    meta = {"names": model.names, "object_types": model.names, "imgsz": 64}
    (folder / "detector.json").write_text(json.dumps(meta))
    client = MlflowClient(mlflow_server, mlflow_server)
    experiment = client.get_experiment_by_name("serve-stages") or client.get_experiment(
        client.create_experiment("serve-stages")
    )
    run = client.create_run(experiment.experiment_id, run_name="untrained-yolo11n")
    mlflow.set_tracking_uri(mlflow_server)
    try:
        client.log_artifacts(run.info.run_id, str(folder), "detector")
    finally:
        client.set_terminated(run.info.run_id)
    # wiring only: an untrained detector, "scored" on a validation split id of its own (the gate chooses on validation;
    # the first version of a name becomes champion without a comparison)
    version = register_detector(
        run.info.run_id,
        name=DETECTOR_NAME,
        metrics={"map50_95": 0.0},
        eval_split="val:wiring",
        tracking_uri=mlflow_server,
    )
    assert promote_detector(DETECTOR_NAME, version.version, tracking_uri=mlflow_server)["promoted"]
    return {"ref": f"models:/{DETECTOR_NAME}@champion", "version": str(version.version), "uri": mlflow_server}


def app_args(checkpoint: Path, media: dict, detector: dict, cache: Path, **detector_settings) -> dict:
    return {
        "model": {"ref": str(checkpoint), "poll_interval_s": 0},
        "limits": {
            "allowed_root": str(media["root"]),
            "max_upload_bytes": 200_000,
            "max_timeline_upload_bytes": 600_000,
            "max_timeline_duration_s": MAX_TIMELINE_S,
            "decode_deadline_s": 30.0,
            "max_detections": MAX_DETECTIONS,
        },
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02},
        "detector": {
            "ref": detector["ref"],
            "tracking_uri": detector["uri"],
            "cache_dir": str(cache),
            "device": "cpu",
            **detector_settings,
        },
        "use_gpu": False,
    }


def wait_healthy(http: httpx.Client, prefix: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if http.get(f"{prefix}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{prefix}/health not OK within {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def serving(ray_local, checkpoints, media, detector, tmp_path_factory):
    """Both applications on Serve (HTTP on 127.0.0.1, a free port); ``deploy`` redeploys one; shut down after."""
    from ray import serve

    from serve_app.app import build_app

    cache = tmp_path_factory.mktemp("stages_cache")
    cache.chmod(0o700)

    def deploy(name: str, **detector_settings) -> None:
        kind = "operations" if name == "ops" else "inspection"
        args = app_args(checkpoints[kind], media, detector, cache, **detector_settings)
        serve.run(build_app(args), name=name, route_prefix=f"/{name}")

    port = free_port()
    serve.shutdown()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        deploy("ops", conf=0.5)  # no box of the untrained detector scores 0.5: nothing is found
        deploy("insp", conf=0.0)  # every box it proposes
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as http:
            wait_healthy(http, "/ops")
            wait_healthy(http, "/insp")
            yield {"http": http, "deploy": deploy}
    finally:
        serve.shutdown()


def post_file(http: httpx.Client, route: str, path: Path, name: str | None = None, content_type="video/mp4", **data):
    files = {"file": (name or path.name, path.read_bytes(), content_type)}
    return http.post(route, files=files, data=data)


def assert_healthy(http: httpx.Client, prefix: str) -> None:
    assert http.get(f"{prefix}/health").status_code == 200


# --- /timeline -------------------------------------------------------------------------------------------------------


def test_status_names_the_detector_version_and_routes(serving, detector):
    http = serving["http"]
    status = http.get("/insp/status").json()
    assert status["task"] == "inspection"
    loaded = status["detector"]
    assert loaded["ready"] and loaded["error"] is None, loaded
    assert (loaded["name"], loaded["version"], loaded["alias"]) == (DETECTOR_NAME, detector["version"], "champion")
    assert sorted(loaded["object_types"].values()) == sorted(OBJECT_TYPES) and "weights" not in loaded
    assert status["replicas"]["Detector"] == {"RUNNING": 1}
    ops = http.get("/ops/status").json()
    assert ops["limits"]["max_timeline_duration_s"] == MAX_TIMELINE_S and ops["detector"]["ready"]
    assert "/timeline" in http.get("/ops/openapi.json").json()["paths"]


def test_timeline_of_an_upload_and_of_a_path(serving, media):
    http = serving["http"]
    uploaded = post_file(http, "/ops/timeline", media["good"], "shift.mp4")
    assert uploaded.status_code == 200, uploaded.text
    body = uploaded.json()
    assert body["format"] == "opsvlm-timeline/1" and body["media"] == "shift.mp4" and body["session"] == "shift"
    assert body["seconds"] == round(SECONDS) and body["window_s"] == 5.0 and body["windows"] >= 4
    assert body["windows_rejected"] == [] and body["model_version"] and body["latency_ms"] > 0
    per_second = body["per_second"]
    assert len(per_second["operation"]) == body["seconds"] and set(per_second["operation"]) <= set(LABEL_NAMES)
    assert body["segments"] and body["segments"][0]["start_s"] == 0
    by_path = http.post("/ops/timeline", json={"path": "shift.mp4"})
    assert by_path.status_code == 200, by_path.text
    assert by_path.json()["per_second"]["operation"] == per_second["operation"]
    assert by_path.json()["media"] == "shift.mp4"
    assert_healthy(http, "/ops")


def test_timeline_bad_inputs_get_4xx_and_the_server_stays_up(serving, media):
    http = serving["http"]
    cases = [
        ("random bytes", lambda: post_file(http, "/ops/timeline", media["junk"], "junk.mp4"), 422, "not_a_video"),
        ("0 bytes", lambda: post_file(http, "/ops/timeline", media["empty"], "empty.mp4"), 422, "empty_file"),
        ("truncated", lambda: post_file(http, "/ops/timeline", media["truncated"]), 422, "not_a_video"),
        (
            "an image",
            lambda: post_file(http, "/ops/timeline", media["site"], "site.png", "image/png"),
            415,
            "unsupported_media_type",
        ),
        ("an image by path", lambda: http.post("/ops/timeline", json={"path": "site.png"}), 415, None),
        ("too long", lambda: post_file(http, "/ops/timeline", media["long"]), 413, "duration_too_long"),
        ("outside the root", lambda: http.post("/ops/timeline", json={"path": "../x.mp4"}), 403, None),
        ("no such file", lambda: http.post("/ops/timeline", json={"path": "nope.mp4"}), 404, None),
        ("unknown field", lambda: http.post("/ops/timeline", json={"path": "shift.mp4", "x": 1}), 422, None),
        (
            "a model of the other task",
            lambda: post_file(http, "/insp/timeline", media["good"]),
            409,
            "wrong_task",
        ),
    ]
    for name, send, status, reason in cases:
        response = send()
        assert response.status_code == status, (name, response.text)
        if reason is not None:
            assert response.json()["error"] == reason, (name, response.text)
        assert str(media["root"]) not in response.text, name
        assert_healthy(http, "/ops")
    assert "/predict_objects" in post_file(http, "/insp/timeline", media["good"]).json()["detail"]
    clip = post_file(http, "/ops/predict", media["good"], start_s="0", end_s="2")
    assert clip.status_code == 200, clip.text


# --- both stages -----------------------------------------------------------------------------------------------------


def assert_objects(body: dict, count: int) -> None:
    assert len(body["objects"]) == count and body["model_version"]
    for item in body["objects"]:
        assert len(item["box"]) == 4 and all(0.0 <= v <= 1.0 for v in item["box"])
        assert item["object_type"] in OBJECT_TYPES and item["label"] in OBJECT_TYPES
        assert isinstance(item["score"], float) and item["condition"] and 0.0 <= item["confidence"] <= 1.0


def test_predict_objects_runs_the_detector_when_no_detections_are_sent(serving, media, detector):
    http = serving["http"]
    found = post_file(http, "/insp/predict_objects", media["site"], "site.png", "image/png")
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["stage1"] == "detector" and body["detector"]["version"] == detector["version"]
    assert_objects(body, MAX_DETECTIONS)  # the detector's most confident boxes, each classified
    scores = [item["score"] for item in body["objects"]]
    assert scores == sorted(scores, reverse=True)
    by_path = http.post("/insp/predict_objects", json={"path": "site.png"})
    assert by_path.status_code == 200 and by_path.json()["stage1"] == "detector", by_path.text

    sent = [{"label": "rock toe", "box": [10, 10, 60, 50], "normalized": False, "score": 0.9}]
    given = post_file(
        http, "/insp/predict_objects", media["site"], "site.png", "image/png", detections=json.dumps(sent)
    )
    assert given.status_code == 200, given.text
    assert given.json()["stage1"] == "request" and given.json()["detector"] is None
    assert_objects(given.json(), 1)
    assert given.json()["objects"][0]["object_type"] == "rock toe" and given.json()["objects"][0]["score"] == 0.9


def test_nothing_found_is_an_answer_without_objects(serving, media):
    http = serving["http"]
    response = post_file(http, "/ops/predict_objects", media["site"], "site.png", "image/png")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["objects"] == [] and body["stage1"] == "detector" and body["model_version"] is None
    assert body["image"] == {"width": 120, "height": 90}
    # With detections the (video) model is asked, and refuses, naming the endpoint for its media.
    sent = json.dumps([{"label": "rock toe", "box": [0.1, 0.1, 0.5, 0.5], "normalized": True}])
    wrong = post_file(http, "/ops/predict_objects", media["site"], "site.png", "image/png", detections=sent)
    assert wrong.status_code == 409 and "/predict" in wrong.json()["detail"]
    assert "/timeline" not in wrong.json()["detail"]


def test_bad_images_get_4xx_with_a_detector_configured(serving, media):
    http = serving["http"]
    cases = [
        ("random bytes", media["root"] / "noise.png", 422),
        ("0 bytes", media["root"] / "blank.png", 422),
        ("a TIFF named .png", media["root"] / "scan_named.png", 415),
        ("a TIFF", media["root"] / "scan.tif", 415),
    ]
    for name, path, status in cases:
        response = post_file(http, "/insp/predict_objects", path, path.name, "image/png")
        assert response.status_code == status, (name, response.text)
        assert_healthy(http, "/insp")
    bad = post_file(
        http, "/insp/predict_objects", media["site"], "site.png", "image/png", detections='[{"label": "tree"}]'
    )
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_detections"
    assert http.post("/insp/predict_objects", json={"path": "shift.mp4"}).status_code == 415


def test_a_detector_class_without_a_mapping_is_a_clear_503(serving, media):
    """Last: redeploys /ops with a mapping that leaves 3 of the detector's 4 classes unmapped."""
    http = serving["http"]
    serving["deploy"]("ops", class_map={"rock toe": "rock toe"})
    wait_healthy(http, "/ops")
    deadline = time.monotonic() + 120
    while http.get("/ops/status").json()["detector"].get("ready", True) and time.monotonic() < deadline:
        time.sleep(1)  # the old Detector replica answers until the new one is running
    status = http.get("/ops/status").json()["detector"]
    assert status["ready"] is False and "have no object type" in status["error"]
    response = post_file(http, "/ops/predict_objects", media["site"], "site.png", "image/png")
    assert response.status_code == 503 and response.json()["error"] == "detector_unavailable", response.text
    assert "have no object type" in response.json()["detail"] and "Retry-After" in response.headers
    assert_healthy(http, "/ops")


def test_a_class_map_to_an_unknown_object_type_is_refused_at_build(checkpoints, media, detector, tmp_path):
    from opsvlm.tasks.inspection.detect.detector import DetectorError
    from serve_app.app import build_app

    args = app_args(checkpoints["inspection"], media, detector, tmp_path, class_map={"x": "pothole"})
    with pytest.raises(DetectorError, match=r"detector\.class_map\['x'\]"):
        build_app(args)
