"""``POST /timeline`` in process (FastAPI's TestClient over :class:`opsvlm.serving.LocalBackend`, the tiny model):
the answer is the batch job's timeline of the same video, bad inputs get the errors ``/predict`` gives, and a model
of the other task gets a 409 naming its endpoint. Over real HTTP on Ray Serve: tests/integration/test_serve_stages.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from opsvlm.serving import LocalBackend, ModelWatcher, ServingLimits, create_app
from opsvlm.serving.timeline import model_timeline_support
from opsvlm.testing.checkpoints import write_adapter_checkpoint
from opsvlm.video.encode import write_video
from opsvlm.video.sampling import SamplingSpec
from tests.unit.test_serving import FPS, SPEC, ramp_frame, write_bad_videos

SECONDS = 12.0
IMAGE_SPEC = SamplingSpec(frames_per_clip=2, max_pixels=56 * 56, min_pixels=56 * 56)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("timeline_videos")
    good = root / "shift.mp4"
    write_video(good, (ramp_frame(i) for i in range(round(SECONDS * FPS))), FPS)
    long = root / "long.mp4"
    write_video(long, (ramp_frame(i) for i in range(round(2 * SECONDS * FPS))), FPS)
    image = root / "site.png"
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    return {"root": root, "good": good, "long": long, "image": image, **write_bad_videos(root, good)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from opsvlm.testing.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny_cache"))


@pytest.fixture(scope="module")
def watchers(tiny_dir, tmp_path_factory) -> dict[str, ModelWatcher]:
    root = tmp_path_factory.mktemp("timeline_checkpoints")
    operations = write_adapter_checkpoint(root / "operations", tiny_dir, SPEC, task="operations")
    inspection = write_adapter_checkpoint(root / "inspection", tiny_dir, IMAGE_SPEC, task="inspection")
    return {"operations": ModelWatcher(str(operations)), "inspection": ModelWatcher(str(inspection))}


def limits_for(videos, **overrides) -> ServingLimits:
    values = {
        "max_upload_bytes": 1_000,  # /predict's cap: /timeline has its own
        "max_timeline_upload_bytes": 400_000,
        "max_timeline_duration_s": 20.0,
        "decode_deadline_s": 30.0,
        "allowed_root": str(videos["root"]),
    }
    return ServingLimits(**{**values, **overrides})


def client_for(watcher: ModelWatcher, limits: ServingLimits) -> TestClient:
    return TestClient(create_app(LocalBackend(watcher, limits), limits), raise_server_exceptions=False)


def upload(http: TestClient, path: Path, name: str | None = None, content_type: str = "video/mp4", **fields):
    files = {"file": (name or path.name, path.read_bytes(), content_type)}
    return http.post("/timeline", files=files, data=fields)


def test_timeline_is_the_batch_jobs_timeline(watchers, videos):
    from opsvlm.timeline import timeline_of_video

    watcher = watchers["operations"]
    support = model_timeline_support(watcher.current)
    assert support["timeline"] and support["window_s"] == 5.0 and support["media"] == "video"
    expected = timeline_of_video(watcher.current.predictor, videos["good"], support["grammar"], window_s=5.0)
    with client_for(watcher, limits_for(videos)) as http:
        uploaded = upload(http, videos["good"], "shift.mp4")
        by_path = http.post("/timeline", json={"path": "shift.mp4"})
        health = http.get("/health")
    assert uploaded.status_code == 200, uploaded.text
    assert by_path.status_code == 200, by_path.text
    assert health.status_code == 200
    for body in (uploaded.json(), by_path.json()):
        assert body["model_version"] == watcher.current.version and body["latency_ms"] > 0
        assert body["media"] == "shift.mp4" and body["session"] == "shift"
        assert body["seconds"] == round(SECONDS) and body["windows"] == expected["windows"] > 1
        assert body["per_second"]["t_s"] == expected["per_second"]["t_s"]
        assert body["per_second"]["operation"] == expected["per_second"]["operation"]
        assert body["per_second"]["confidence"] == pytest.approx(expected["per_second"]["confidence"], abs=1e-3)
        assert [s["operation"] for s in body["segments"]] == [s["operation"] for s in expected["segments"]]
        assert str(videos["root"]) not in json.dumps(body)


@pytest.mark.parametrize(
    ("name", "status", "reason"),
    [
        ("junk", 422, "not_a_video"),
        ("empty", 422, "empty_file"),
        ("truncated", 422, "not_a_video"),
        ("long", 413, "duration_too_long"),
    ],
)
def test_bad_videos_get_4xx_naming_the_upload(watchers, videos, name, status, reason):
    with client_for(watchers["operations"], limits_for(videos)) as http:
        response = upload(http, videos[name], f"mine-{name}.mp4")
        assert (response.status_code, response.json()["error"]) == (status, reason), response.text
        assert "mine-" in response.json()["detail"] and str(videos["root"]) not in response.text
        assert http.get("/health").status_code == 200


def test_bad_requests_and_limits(watchers, videos):
    with client_for(watchers["operations"], limits_for(videos, max_timeline_upload_bytes=2_000)) as http:
        image = upload(http, videos["image"], "site.png", "image/png")
        assert image.status_code == 415 and image.json()["error"] == "unsupported_media_type"
        assert upload(http, videos["good"]).status_code == 413  # over this server's timeline upload cap
        window = upload(http, videos["junk"], start_s="1")
        assert window.status_code == 422 and "start_s" in window.json()["detail"]
        assert http.post("/timeline", json={"path": "../x.mp4"}).status_code == 403
        assert http.post("/timeline", json={"path": "nope.mp4"}).status_code == 404
        assert http.post("/timeline", json={"path": "site.png"}).status_code == 415
        assert http.post("/timeline", json={"path": "shift.mp4", "stride_s": 1}).status_code == 422
        assert http.get("/health").status_code == 200


def test_a_model_of_the_other_task_is_a_409_naming_its_endpoint(watchers, videos):
    with client_for(watchers["inspection"], limits_for(videos)) as http:
        response = upload(http, videos["good"])
    assert response.status_code == 409 and response.json()["error"] == "wrong_task", response.text
    assert "/predict_objects" in response.json()["detail"]
