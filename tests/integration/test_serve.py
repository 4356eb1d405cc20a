"""The Ray Serve app on a real local Ray cluster, over real HTTP (httpx), with models from a real MLflow server.

One application (``serve_app.app:build_app``, the Ingress decoding itself) serves the module; every bad input is
sent for real and after each one ``/health`` must be OK and a good prediction must still succeed. The alias move is
real: ``champion`` is pointed at a second registered version (with another sampling spec) while requests keep
flowing. The last test redeploys with ``separate_decoder: true``. Serve is shut down at the end.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from opsvlm.tasks.operations import LABEL_NAMES
from opsvlm.testing.processes import free_port
from opsvlm.video.encode import write_video
from tests.unit.test_serving import (
    FPS,
    GOOD_SECONDS,
    LONG_SECONDS,
    OTHER_SPEC,
    SPEC,
    ramp_frame,
    register_checkpoint,
    write_adapter_checkpoint,
    write_bad_videos,
)
from tests.unit.test_serving_hardening import DETECTION, MAX_IMAGE_PIXELS, battery_files, image_bytes, run_battery

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "opsvlm-serve-test"  # not "opsvlm": the MLflow server is shared with other integration tests
APP_NAME = "opsvlm"
MAX_UPLOAD_BYTES = 200_000
MAX_DURATION_S = 8.0
DECODE_DEADLINE_S = 8.0  # generous: a cold decoder process on a busy 2-core box must not miss it on good input
START_TIMEOUT_S = 240.0
SWAP_TIMEOUT_S = 120.0
TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """The allowed root with good and bad videos, a FIFO (a decode that hangs) and links; a secret outside it."""
    base = tmp_path_factory.mktemp("serve_media")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    good = root / "good.mp4"
    write_video(good, (ramp_frame(i) for i in range(round(GOOD_SECONDS * FPS))), FPS)
    long = root / "long.mp4"
    write_video(long, (ramp_frame(i) for i in range(round(LONG_SECONDS * FPS))), FPS)
    (root / "sub" / "copy.mkv").write_bytes(good.read_bytes())
    secret = base / "secret.mp4"
    secret.write_bytes(good.read_bytes())
    (root / "link_out.mp4").symlink_to(secret)
    os.mkfifo(root / "hang.mp4")
    big = base / "big.mp4"
    big.write_bytes(os.urandom(MAX_UPLOAD_BYTES + 100_000))
    files = {"root": root, "good": good, "long": long, "secret": secret, "big": big, **write_bad_videos(root, good)}
    return {**files, **battery_files(root, good)}


@pytest.fixture(scope="module")
def models(mlflow_server, tiny_model_dir, tmp_path_factory) -> dict:
    """Two real adapter checkpoints registered on the MLflow server; v1 (SPEC) is champion, v2 (OTHER_SPEC) not."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server, mlflow_server)
    experiment = client.get_experiment_by_name("serve-tests")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("serve-tests")
    root = tmp_path_factory.mktemp("serve_checkpoints")
    first = write_adapter_checkpoint(root / "v1", tiny_model_dir, SPEC, seed=0)
    second = write_adapter_checkpoint(root / "v2", tiny_model_dir, OTHER_SPEC, seed=1)
    v1 = register_checkpoint(client, experiment_id, mlflow_server, MODEL_NAME, first, champion=True)
    v2 = register_checkpoint(client, experiment_id, mlflow_server, MODEL_NAME, second, champion=False)
    return {"uri": mlflow_server, "client": client, "v1": v1, "v2": v2}


def app_args(models: dict, media: dict, cache_dir: Path, **overrides) -> dict:
    """The app's args (:class:`opsvlm.serving.ServeAppConfig` sections) for this module's server."""
    return {
        "model": {
            "ref": f"models:/{MODEL_NAME}@champion",
            "tracking_uri": models["uri"],
            "cache_dir": str(cache_dir),
            "poll_interval_s": 1.0,
        },
        "limits": {
            "allowed_root": str(media["root"]),
            "max_upload_bytes": MAX_UPLOAD_BYTES,
            "max_duration_s": MAX_DURATION_S,
            "decode_deadline_s": DECODE_DEADLINE_S,
            "max_batch_clips": 8,
            "max_image_pixels": MAX_IMAGE_PIXELS,
        },
        "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05},
        "separate_decoder": False,
        "use_gpu": False,
        **overrides,
    }


def deploy(args: dict) -> float:
    """serve.run the app built from ``args`` (blocks until RUNNING); returns the seconds it took."""
    from ray import serve

    from serve_app.app import build_app

    started = time.monotonic()
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    return time.monotonic() - started


def wait_healthy(http: httpx.Client, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if http.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"/health not OK within {timeout_s:.0f} s")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve_model_cache")


@pytest.fixture(scope="module")
def http(ray_local, models, media, model_cache):
    """The app on Serve (HTTP on 127.0.0.1, a free port) and an httpx client for it; Serve is shut down after."""
    from ray import serve

    port = free_port()
    serve.shutdown()  # HTTP options are fixed when Serve starts: a leftover instance would keep its own port
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        seconds = deploy(app_args(models, media, model_cache))
        print(f"\nServe app RUNNING after {seconds:.1f} s")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
            wait_healthy(client)
            yield client
    finally:
        serve.shutdown()


def upload(http: httpx.Client, path: Path, name: str | None = None, content_type="video/mp4", **fields):
    files = {"file": (name or path.name, path.read_bytes(), content_type)}
    return http.post("/predict", files=files, data={k: str(v) for k, v in fields.items()})


def assert_prediction(body: dict, clip_length: float, version: str) -> None:
    assert set(body) >= {"operation", "start_s", "end_s", "next_operation", "scores", "model_version", "latency_ms"}
    assert body["operation"] in LABEL_NAMES and body["next_operation"] in LABEL_NAMES
    assert 0 <= body["start_s"] < body["end_s"] <= clip_length + 1e-6
    assert set(body["scores"]) == set(LABEL_NAMES) and sum(body["scores"].values()) == pytest.approx(1, abs=1e-3)
    assert body["model_version"] == version and body["latency_ms"] > 0


def assert_still_serving(http: httpx.Client, media: dict, version: str) -> None:
    assert http.get("/health").status_code == 200
    response = upload(http, media["good"], start_s=0, end_s=2)
    assert response.status_code == 200, response.text
    assert_prediction(response.json(), 2.0, version)


# --- the API ---------------------------------------------------------------------------------------------------------


def test_health_status_and_docs(http, models):
    assert http.get("/health").json() == {"status": "ok", "model_version": models["v1"]}
    status = http.get("/status").json()
    assert status["model"]["name"] == MODEL_NAME and status["model"]["version"] == models["v1"]
    assert status["model"]["alias"] == "champion" and status["model"]["watching"] is True
    assert status["sampling_spec"]["frames_per_clip"] == SPEC.frames_per_clip
    assert status["labels"] == list(LABEL_NAMES)
    assert status["replicas"]["Ingress"] == {"RUNNING": 1} and status["replicas"]["Predictor"] == {"RUNNING": 1}
    assert status["separate_decoder"] is False and status["limits"]["max_upload_bytes"] == MAX_UPLOAD_BYTES
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert {"/predict", "/batch_predict", "/health", "/status"} <= set(http.get("/openapi.json").json()["paths"])


def test_predict_uploads_and_allowed_paths(http, models, media):
    response = upload(http, media["good"])
    assert response.status_code == 200, response.text
    assert_prediction(response.json(), GOOD_SECONDS, models["v1"])
    assert response.json()["clip"] == {"start_s": 0.0, "end_s": pytest.approx(GOOD_SECONDS)}

    response = upload(http, media["good"], "clip.mov", "video/quicktime", start_s=1.5, end_s=4.5)
    assert response.status_code == 200, response.text
    assert_prediction(response.json(), 3.0, models["v1"])

    for path in ("good.mp4", "sub/copy.mkv", str(media["good"])):
        response = http.post("/predict", json={"path": path, "start_s": 1, "end_s": 3})
        assert response.status_code == 200, (path, response.text)
        assert_prediction(response.json(), 2.0, models["v1"])


def test_batch_predict_one_result_per_clip(http, models, media):
    clips = [
        {"path": "good.mp4"},
        {"path": "good.mp4", "start_s": 2, "end_s": 5},
        {"path": "sub/copy.mkv", "start_s": 0, "end_s": 3},
        {"path": "../secret.mp4"},
        {"path": "junk.mp4"},
        {"path": "good.mp4", "start_s": 10},
    ]
    response = http.post("/batch_predict", json={"clips": clips})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [200, 200, 200, 403, 422, 422]
    for result, length in zip(results[:3], (GOOD_SECONDS, 3.0, 3.0), strict=True):
        assert_prediction(result["prediction"], length, models["v1"])
    assert results[3]["error"] == "path_outside_root" and results[5]["error"] == "beyond_media_end"

    files = [
        ("files", ("a.mp4", media["good"].read_bytes(), "video/mp4")),
        ("files", ("b.mkv", b"junk", "video/x-matroska")),
    ]
    response = http.post("/batch_predict", files=files, data={"clips": '[{"file": 0, "start_s": 1}, {"file": 1}]'})
    assert response.status_code == 200, response.text
    first, second = response.json()["results"]
    assert first["status"] == 200 and first["prediction"]["clip"]["start_s"] == 1.0
    assert second["status"] == 422 and "b.mkv" in second["detail"]


def _bad_requests(http: httpx.Client, media: dict) -> list[tuple[str, Callable, int, str | set[str]]]:
    def post_json(body):
        return lambda: http.post("/predict", json=body)

    return [
        ("non-video bytes", lambda: upload(http, media["junk"]), 422, "not_a_video"),
        ("empty file", lambda: upload(http, media["empty"]), 422, "empty_file"),
        ("truncated file", lambda: upload(http, media["truncated"]), 422, "not_a_video"),
        # Which code depends on where the damage lands: the first frame is decoded when the file is opened.
        ("corrupt file", lambda: upload(http, media["corrupt"]), 422, {"decode_error", "not_a_video"}),
        ("zero frames", lambda: upload(http, media["zero_frames"]), 422, "not_a_video"),
        ("window after the end", lambda: upload(http, media["good"], start_s=7), 422, "beyond_media_end"),
        ("window past the end", lambda: upload(http, media["good"], start_s=3, end_s=9), 422, "beyond_media_end"),
        ("inverted window", lambda: upload(http, media["good"], start_s=3, end_s=1), 422, "invalid_window"),
        (
            "wrong content type (body)",
            lambda: http.post("/predict", content=b"hello", headers={"content-type": "text/plain"}),
            415,
            "unsupported_media_type",
        ),
        (
            "wrong content type (part)",
            lambda: upload(http, media["good"], "notes.txt", "text/plain"),
            415,
            "unsupported_media_type",
        ),
        (
            "missing file part",
            lambda: http.post("/predict", files={"video": ("a.mp4", b"x", "video/mp4")}),
            422,
            "missing_file",
        ),
        ("missing path field", post_json({"start_s": 1}), 422, "invalid_request"),
        (
            "malformed JSON",
            lambda: http.post("/predict", content=b"{", headers={"content-type": "application/json"}),
            400,
            "invalid_json",
        ),
        ("upload over the size limit", lambda: upload(http, media["big"]), 413, "upload_too_large"),
        ("video over the duration limit", lambda: upload(http, media["long"]), 413, "duration_too_long"),
        ("decode that hangs (FIFO)", post_json({"path": "hang.mp4"}), 504, "decode_timeout"),
    ]


def test_every_bad_input_gets_a_4xx_and_the_server_stays_up(http, models, media):
    timings = {}
    for name, send, status, reason in _bad_requests(http, media):
        started = time.monotonic()
        response = send()
        timings[name] = time.monotonic() - started
        assert response.status_code == status, (name, response.status_code, response.text)
        body = response.json()
        assert body["error"] in ({reason} if isinstance(reason, str) else reason) and body["detail"], (name, body)
        assert_still_serving(http, media, models["v1"])
    assert timings["decode that hangs (FIFO)"] >= DECODE_DEADLINE_S - 0.5
    print("\nbad input latencies (s):", {k: round(v, 2) for k, v in timings.items()})


def test_abuse_battery_on_both_endpoints(http, models, media):
    """The acceptance battery (tests/unit/test_serving_hardening.py) against the real Serve app: every input gets
    its documented 4xx and /health stays 200 after each; then concurrent /predict_objects calls all get the
    model's answer for this (video) model, 409 naming /predict, and a good prediction still works."""
    started = time.monotonic()
    table = run_battery(http, media)
    print(f"\nbattery ({len(table)} inputs, {time.monotonic() - started:.1f} s):")
    print("\n".join(f"  {status}  {name}" for name, status in table.items()))

    def objects(_):
        files = {"file": ("site.png", image_bytes(120, 90), "image/png")}
        return http.post("/predict_objects", files=files, data={"detections": json.dumps([DETECTION] * 3)})

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(objects, range(6)))
    assert [r.status_code for r in responses] == [409] * 6, [r.text for r in responses]
    assert all("/predict" in r.json()["detail"] for r in responses)
    assert_still_serving(http, media, models["v1"])


def test_paths_outside_the_root_are_refused(http, models, media):
    attempts = {
        "../secret.mp4": 403,
        "sub/../../secret.mp4": 403,
        "sub/../good.mp4": 403,
        str(media["secret"]): 403,
        "/etc/hostname": 403,
        "link_out.mp4": 403,
        "%2e%2e/secret.mp4": 404,  # not decoded: a literal (missing) name inside the root
        "sub": 422,
        "missing.mp4": 404,
    }
    for path, status in attempts.items():
        response = http.post("/predict", json={"path": path})
        assert response.status_code == status, (path, response.text)
        assert str(media["secret"]) not in response.json()["detail"] or path == str(media["secret"])
    assert_still_serving(http, media, models["v1"])


def test_concurrent_requests_share_forward_passes(http, models, media):
    before = http.get("/status").json()["batching"]

    def one(i):
        return http.post("/predict", json={"path": "good.mp4", "start_s": i * 0.25, "end_s": i * 0.25 + 2})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    for response in responses:
        assert_prediction(response.json(), 2.0, models["v1"])
    after = http.get("/status").json()["batching"]
    assert after["items"] - before["items"] == 8
    # the Predictor's batcher: clips of concurrent requests went through shared forward passes
    assert after["batches"] - before["batches"] < 8 and after["largest_batch"] >= 2, (before, after)
    print(f"\n8 concurrent requests -> {after['batches'] - before['batches']} forward passes")


def test_configs_are_valid_serve_configs_for_this_app():
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from opsvlm.serving import load_app_config

    for name in ("config.yaml", "config_tiny_cpu.yaml"):
        config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve_app" / name).read_text()))
        assert config.http_options.host == "127.0.0.1", name
        (application,) = config.applications
        assert application.import_path == "serve_app.app:build_app"
        args = load_app_config(application.args)
        expected = {"Ingress", "Predictor"} | ({"Decoder"} if args.separate_decoder else set())
        deployments = {d.name: d for d in application.deployments}
        assert set(deployments) == expected, name
        for deployment in deployments.values():
            if isinstance(deployment.autoscaling_config, dict):
                scaling = AutoscalingConfig(**deployment.autoscaling_config)
                assert 1 <= scaling.min_replicas <= scaling.max_replicas and scaling.target_ongoing_requests > 0, name
            else:  # a fixed replica count
                assert isinstance(deployment.num_replicas, int) and deployment.num_replicas >= 1, name
            assert deployment.ray_actor_options.num_cpus > 0
        gpus = deployments["Predictor"].ray_actor_options.num_gpus or 0
        assert gpus == (1 if args.use_gpu is True else 0), name
        if name == "config_tiny_cpu.yaml":  # whole CPUs would not fit (or deadlock) on a 2-core box
            assert all(d.ray_actor_options.num_cpus < 1 for d in deployments.values())


# --- the alias move, then the separate-decoder deployment (these change the app: keep them last) ---------------------


def test_alias_move_is_picked_up_without_downtime(http, models, media):
    # Background traffic (uploads and paths) runs through the whole swap: every request must succeed.
    stop, background = threading.Event(), []

    def traffic():
        while not stop.is_set():
            background.append(http.post("/predict", json={"path": "sub/copy.mkv", "start_s": 1, "end_s": 3}))

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        models["client"].set_registered_model_alias(MODEL_NAME, "champion", models["v2"])
        started = time.monotonic()
        versions_seen = []
        while True:
            response = upload(http, media["good"], start_s=0, end_s=2)
            assert response.status_code == 200, response.text
            assert_prediction(response.json(), 2.0, response.json()["model_version"])
            versions_seen.append(response.json()["model_version"])
            status = http.get("/status").json()
            if status["model"]["version"] == models["v2"] and versions_seen[-1] == models["v2"]:
                break
            assert time.monotonic() - started < SWAP_TIMEOUT_S, f"still on {status['model']} after {SWAP_TIMEOUT_S} s"
        swap_seconds = time.monotonic() - started
    finally:
        stop.set()
        thread.join(timeout=60)
    assert background and all(r.status_code == 200 for r in background), [r.text for r in background[-3:]]
    background_versions = [r.json()["model_version"] for r in background]
    assert set(versions_seen + background_versions) <= {models["v1"], models["v2"]}
    assert status["sampling_spec"]["frames_per_clip"] == OTHER_SPEC.frames_per_clip  # the new model's spec
    assert status["model"]["last_error"] is None
    print(
        f"\nalias move picked up after {swap_seconds:.1f} s; {len(versions_seen) + len(background)} requests "
        f"during the swap, all 200"
    )
    batch = http.post("/batch_predict", json={"clips": [{"path": "good.mp4"}, {"path": "sub/copy.mkv"}]})
    assert [r["prediction"]["model_version"] for r in batch.json()["results"]] == [models["v2"]] * 2


def test_separate_decoder_deployment(http, models, media, model_cache):
    seconds = deploy(app_args(models, media, model_cache, separate_decoder=True))
    print(f"\nredeployed with separate_decoder in {seconds:.1f} s")
    wait_healthy(http)
    status = http.get("/status").json()
    assert status["separate_decoder"] is True and status["replicas"]["Decoder"] == {"RUNNING": 1}
    version = status["model"]["version"]

    response = upload(http, media["good"], "upload.avi", "video/x-msvideo")
    assert response.status_code == 200, response.text
    assert_prediction(response.json(), GOOD_SECONDS, version)
    response = http.post("/predict", json={"path": "sub/copy.mkv", "start_s": 1, "end_s": 4})
    assert response.status_code == 200, response.text
    assert_prediction(response.json(), 3.0, version)

    junk = upload(http, media["junk"], "client-name.mp4")
    assert junk.status_code == 422 and "client-name.mp4" in junk.json()["detail"]
    hang = http.post("/predict", json={"path": "hang.mp4", "start_s": 0, "end_s": 2})
    assert hang.status_code == 504 and hang.json()["error"] == "decode_timeout"
    assert_still_serving(http, media, version)
