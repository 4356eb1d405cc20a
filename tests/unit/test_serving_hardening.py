"""Serving under abuse and overload, without Ray: the HTTP battery of bad inputs over the in-process app (shared with
the Serve integration test), JSON caps, load shedding and deadlines, the model's queue, truthful health, load
retries, the private model cache, safetensors only, ``/status`` without paths, and the optional API key.

Real parts: FastAPI over the in-process backend (TestClient, or httpx's ASGI transport for concurrent requests), real
videos and images, real checkpoints (the tiny model where predictions are needed). Where a test needs a model that
fails or blocks, a predictor is injected through the watcher's ``loader`` argument.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from opsvlm.config import ConfigError
from opsvlm.serving import (
    Batcher,
    BatchingSettings,
    LocalBackend,
    ModelWatcher,
    ServingError,
    ServingLimits,
    WorkItem,
    create_app,
    load_app_config,
)
from opsvlm.serving.config import AuthSettings
from opsvlm.serving.predict import Answers, SpecChanged, WrongTask
from opsvlm.serving.requests import parse_json
from opsvlm.serving.watcher import ModelCache, check_safetensors_only, load_predictor
from opsvlm.tasks.base import get_task
from opsvlm.tasks.operations import LABEL_NAMES, Prediction
from opsvlm.video.sampling import SamplingSpec
from tests.unit import test_serving as base
from tests.unit.test_serving import OTHER_SPEC, SPEC, write_adapter_checkpoint

# The model and media fixtures of the serving tests (module-scoped there, shared here).
videos, tiny_dir, checkpoints, watcher = base.videos, base.tiny_dir, base.checkpoints, base.watcher

IMAGE_SPEC = SamplingSpec(frames_per_clip=2, max_pixels=56 * 56, min_pixels=56 * 56)
MAX_IMAGE_PIXELS = 1_000_000
DETECTION = {"label": "slope drain", "box": [0.1, 0.1, 0.5, 0.6], "normalized": True, "score": 0.9}


# --- media for the battery -------------------------------------------------------------------------------------------


def image_bytes(width: int, height: int, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(buffer, format=kind)
    return buffer.getvalue()


# A Photoshop file header (what Pillow's PSD reader recognises); served as .jpg it must be refused by its content.
PSD_BYTES = b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03" + b"\x00\x00\x00\x40" * 2 + b"\x00\x08\x00\x03" + b"\x00" * 64


def battery_files(root: Path, good: Path) -> dict[str, Path]:
    """Bad inputs next to a good video in the allowed root: images named as videos and as other images."""
    files = {
        "png_as_mp4": (root / "photo.mp4", image_bytes(64, 48)),
        "tiff_as_jpg": (root / "scan.jpg", image_bytes(64, 48, "TIFF")),
        "psd_as_jpg": (root / "layers.jpg", PSD_BYTES),
        "image": (root / "site.png", image_bytes(120, 90)),
        "huge_image": (root / "huge.png", image_bytes(1100, 1000)),  # > MAX_IMAGE_PIXELS, a small file
    }
    for path, data in files.values():
        path.write_bytes(data)
    return {"good": good, **{name: path for name, (path, _) in files.items()}}


def bad_requests(http, media: dict[str, Path]) -> list[tuple[str, Callable, int, str | set[str]]]:
    """The acceptance battery: ``(input, send, status, error code)``; ``http`` is a TestClient or an httpx client of
    a server whose allowed root holds ``media`` (a video model, ``max_image_pixels`` = :data:`MAX_IMAGE_PIXELS`)."""

    def upload(path: Path, name: str | None = None, content_type="video/mp4", route="/predict", data=None):
        return lambda: http.post(route, files={"file": (name or path.name, path.read_bytes(), content_type)}, data=data)

    def raw(route: str, body: bytes | str, content_type="application/json"):
        return lambda: http.post(route, content=body, headers={"content-type": content_type})

    def image(path: Path, name: str, detections, content_type="image/jpeg"):
        text = detections if isinstance(detections, str) else json.dumps(detections)
        return upload(path, name, content_type, "/predict_objects", {"detections": text})

    deep = "[" * 100_000  # 100,000 levels open (the parser gives up long before it could see the end)
    digits = "1" + "0" * 4999
    video = media["good"]
    return [
        ("random bytes (.mp4)", upload(media["junk"]), 422, "not_a_video"),
        ("0 bytes (.mp4)", upload(media["empty"]), 422, "empty_file"),
        ("truncated MP4", upload(media["truncated"]), 422, "not_a_video"),
        ("image renamed .mp4", upload(media["png_as_mp4"]), 422, "not_a_video"),
        ("36 MB JSON body (/predict)", raw("/predict", b" " * (36 << 20)), 413, "upload_too_large"),
        ("36 MB JSON body (/batch_predict)", raw("/batch_predict", b" " * (36 << 20)), 413, "upload_too_large"),
        ("100,000-deep JSON body (/predict)", raw("/predict", deep), 400, "json_too_deep"),
        ("100,000-deep JSON body (/batch_predict)", raw("/batch_predict", deep), 400, "json_too_deep"),
        ("100,000-deep JSON body (/predict_objects)", raw("/predict_objects", deep), 400, "json_too_deep"),
        (
            "100,000-deep clips form field (/batch_predict)",
            lambda: http.post(
                "/batch_predict", files={"files": ("a.mp4", video.read_bytes(), "video/mp4")}, data={"clips": deep}
            ),
            400,
            "json_too_deep",
        ),
        (
            "100,000-deep detections form field",
            image(media["image"], "site.png", deep, "image/png"),
            400,
            "json_too_deep",
        ),
        (
            "5,000-digit integer start_s (JSON)",
            raw("/predict", f'{{"path": "good.mp4", "start_s": {digits}}}'),
            400,
            "number_too_large",
        ),
        (
            "5,000-digit integer in clips form field",
            lambda: http.post(
                "/batch_predict",
                files={"files": ("a.mp4", video.read_bytes(), "video/mp4")},
                data={"clips": f'[{{"file": 0, "end_s": {digits}}}]'},
            ),
            400,
            "number_too_large",
        ),
        ("5,000-digit start_s form field", upload(video, data={"start_s": digits}), 422, "invalid_window"),
        ("NaN window (JSON)", raw("/predict", '{"path": "good.mp4", "start_s": NaN}'), 422, "invalid_window"),
        ("NaN window (form)", upload(video, data={"start_s": "nan"}), 422, "invalid_window"),
        ("reversed window", upload(video, data={"start_s": "3", "end_s": "1"}), 422, "invalid_window"),
        ("window after the end", upload(video, data={"start_s": "7"}), 422, "beyond_media_end"),
        ("window past the end", upload(video, data={"start_s": "2", "end_s": "9"}), 422, "beyond_media_end"),
        ("33 detections", image(media["image"], "site.png", [DETECTION] * 33, "image/png"), 413, "too_many_detections"),
        ("oversized image", image(media["huge_image"], "huge.png", [DETECTION], "image/png"), 413, "image_too_large"),
        ("TIFF named .jpg", image(media["tiff_as_jpg"], "scan.jpg", [DETECTION]), 415, "unsupported_image_format"),
        ("PSD named .jpg", image(media["psd_as_jpg"], "layers.jpg", [DETECTION]), 415, "unsupported_image_format"),
        (
            "TIFF named .jpg (path mode)",
            lambda: http.post("/predict_objects", json={"path": "scan.jpg", "detections": [DETECTION]}),
            415,
            "unsupported_image_format",
        ),
        ("0-byte image", image(media["empty"], "blank.png", [DETECTION], "image/png"), 422, "empty_image"),
        ("detections not JSON", image(media["image"], "site.png", "[{", "image/png"), 400, "invalid_json"),
        (
            "no detections",
            upload(media["image"], "site.png", "image/png", "/predict_objects"),
            422,
            "missing_detections",
        ),
        ("text/plain body", raw("/predict", b"hello", "text/plain"), 415, "unsupported_media_type"),
        # A valid image and detections reach the model: a video model refuses them, naming the endpoint to use.
        ("image to a video model", image(media["image"], "site.png", [DETECTION], "image/png"), 409, "wrong_task"),
        (
            "image path to a video model",
            lambda: http.post("/predict_objects", json={"path": "site.png", "detections": [DETECTION]}),
            409,
            "wrong_task",
        ),
    ]


def run_battery(http, media: dict[str, Path]) -> dict[str, int]:
    """Send every bad request; each must get its documented 4xx and leave ``/health`` OK. Returns input -> status."""
    table = {}
    for name, send, status, reason in bad_requests(http, media):
        response = send()
        table[name] = response.status_code
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        body = response.json()
        assert body["error"] in ({reason} if isinstance(reason, str) else reason) and body["detail"], (name, body)
        assert http.get("/health").status_code == 200, name
    return table


# --- fixtures --------------------------------------------------------------------------------------------------------


def make_limits(root: Path, **overrides) -> ServingLimits:
    values = {
        "max_upload_bytes": 200_000,
        "max_duration_s": 8.0,
        "decode_deadline_s": 30.0,
        "allowed_root": str(root),
        "max_image_pixels": MAX_IMAGE_PIXELS,
        **overrides,
    }
    return ServingLimits(**values)


@pytest.fixture(scope="module")
def media(videos) -> dict[str, Path]:
    return {**videos, **battery_files(videos["root"], videos["good"])}


class FakePredictor:
    """A predictor of the video task that answers instantly, or fails while ``fail`` is set (no model)."""

    task = get_task("operations")

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls = 0

    def predict(self, inputs):
        self.calls += 1
        if self.fail:
            raise RuntimeError("device lost")
        scores = {label: 1.0 / len(LABEL_NAMES) for label in LABEL_NAMES}
        answer = Prediction(LABEL_NAMES[0], 0.0, 1.0, LABEL_NAMES[1], 0.5, scores, scores)
        return [answer] * len(inputs)


def fake_watcher(checkpoint: Path, predictor: FakePredictor) -> ModelWatcher:
    return ModelWatcher(str(checkpoint), loader=lambda directory, quantization: predictor)


# --- the battery -----------------------------------------------------------------------------------------------------


def test_every_bad_input_gets_its_documented_4xx_and_the_server_stays_healthy(watcher, media):
    limits = make_limits(media["root"])
    with TestClient(create_app(LocalBackend(watcher, limits), limits), raise_server_exceptions=False) as http:
        table = run_battery(http, media)
        response = http.post("/predict", files={"file": ("good.mp4", media["good"].read_bytes(), "video/mp4")})
        assert response.status_code == 200, response.text
    print("\n" + "\n".join(f"{status}  {name}" for name, status in table.items()))


def test_json_parsing_caps_depth_and_integers_naming_the_field():
    limits = ServingLimits(max_json_depth=4, max_json_int_digits=5)
    assert parse_json(b'{"a": [1, 2.5, -12345]}', "body", limits) == {"a": [1, 2.5, -12345]}
    assert np.isnan(parse_json('{"start_s": NaN}', "body", limits)["start_s"])  # windows refuse it, naming the field
    cases = {
        b'{"clips": [{"start_s": 123456}]}': ("number_too_large", "clips[0].start_s: an integer of 6 digits"),
        b"[[[[[1]]]]]": ("json_too_deep", "[0][0][0][0]: nested deeper than 4"),
        ("[" * 50_000).encode(): ("json_too_deep", "body: nested deeper"),
        b"\xff\xfe": ("invalid_json", "body: not UTF-8"),
        b'{"a": }': ("invalid_json", "body: not valid JSON"),
    }
    for text, (reason, detail) in cases.items():
        with pytest.raises(ServingError) as info:
            parse_json(text, "body", limits)
        assert (info.value.status, info.value.reason) == (400, reason) and detail in info.value.detail, info.value
    with pytest.raises(ServingError) as info:
        parse_json("[" * 10, "clips", limits)
    assert info.value.detail.startswith("clips")


# --- load shedding and deadlines -------------------------------------------------------------------------------------


class BlockingBackend(LocalBackend):
    """Holds every prediction until ``release`` is set (a model far slower than the requests coming in)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = asyncio.Event()
        self.entered = 0

    async def predict(self, items, deadline):
        self.entered += 1
        await self.release.wait()
        return await super().predict(items, deadline)


async def _wait_until(condition: Callable[[], bool], what: str, tries: int = 600) -> None:
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def test_overload_is_shed_with_503_and_retry_after_while_health_answers(checkpoints, media):
    limits = make_limits(media["root"], max_inflight_requests=2)

    async def scenario():
        backend = BlockingBackend(fake_watcher(checkpoints["a"], FakePredictor()), limits)
        app = create_app(backend, limits)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://serving") as http:
            body = {"path": "good.mp4", "start_s": 0, "end_s": 2}
            tasks = [asyncio.create_task(http.post("/predict", json=body)) for _ in range(6)]
            await _wait_until(lambda: backend.entered == 2 and sum(t.done() for t in tasks) == 4, "2 admitted, 4 shed")
            health = await http.get("/health")
            status = (await http.get("/status")).json()
            backend.release.set()
            responses = await asyncio.gather(*tasks)
        return health, status, responses

    health, status, responses = asyncio.run(scenario())
    assert health.status_code == 200
    assert status["server"]["inflight_requests"] == 2 and status["server"]["shed_requests"] == 4
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 503, 503, 503, 503], [r.text for r in responses]
    for response in responses:
        if response.status_code == 503:
            assert response.json()["error"] == "overloaded" and response.headers["retry-after"] == "2"


def test_a_request_past_its_deadline_gets_503_with_retry_after(checkpoints, media):
    limits = make_limits(media["root"], request_deadline_s=1.0, decode_deadline_s=1.0)
    backend = BlockingBackend(fake_watcher(checkpoints["a"], FakePredictor()), limits)  # never released
    with TestClient(create_app(backend, limits)) as http:
        response = http.post("/predict", json={"path": "good.mp4", "start_s": 0, "end_s": 2})
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "deadline_exceeded" and response.headers["retry-after"] == "2"
        assert http.get("/health").status_code == 200


def test_an_unreachable_model_is_a_503_with_retry_after(checkpoints, media):
    from opsvlm.serving.errors import unavailable

    class Gone(LocalBackend):
        """A backend whose model replica cannot be reached (what ServeBackend answers when a handle call fails)."""

        async def predict(self, items, deadline):
            return [unavailable("the model replica is unavailable: ActorDiedError()", 3.0) for _ in items]

        async def health(self):
            raise ConnectionError("replica gone")

    limits = make_limits(media["root"])
    with TestClient(create_app(Gone(fake_watcher(checkpoints["a"], FakePredictor()), limits), limits)) as http:
        response = http.post("/predict", json={"path": "good.mp4", "start_s": 0, "end_s": 2})
        assert response.status_code == 503 and response.json()["error"] == "model_unavailable", response.text
        assert response.headers["retry-after"] == "3"
        health = http.get("/health")
        assert health.status_code == 503 and "replica gone" in health.json()["detail"]
        assert "retry-after" in health.headers


def test_a_full_work_pool_sheds_with_503(checkpoints, media):
    limits = make_limits(media["root"], work_threads=1, max_pending_work=1)

    async def scenario():
        app = create_app(LocalBackend(fake_watcher(checkpoints["a"], FakePredictor()), limits), limits)
        gate = threading.Event()
        pool = app.state.context.pool
        blocker = asyncio.create_task(pool.run(gate.wait))  # the only admission, held
        await _wait_until(lambda: pool.describe()["pending"] == 1, "the pool is busy")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://serving") as http:
            response = await http.post("/predict", json={"path": "good.mp4"})
        gate.set()
        await blocker
        return response

    response = asyncio.run(scenario())
    assert response.status_code == 503 and response.json()["error"] == "overloaded", response.text
    assert "retry-after" in response.headers


def test_the_model_queue_sheds_when_full_and_drops_expired_work():
    gate = threading.Event()

    class Gated(FakePredictor):
        def predict(self, inputs):
            gate.wait(30)
            return super().predict(inputs)

    model = SimpleNamespace(predictor=Gated(), spec=SPEC, version="7")
    item = WorkItem("video", (object(),), SPEC)

    async def scenario():
        batcher = Batcher(
            lambda: model, BatchingSettings(max_batch_size=1, batch_wait_timeout_s=0, max_queued_inputs=2)
        )
        running = asyncio.create_task(batcher.submit(item))
        await _wait_until(lambda: batcher.counters["batches"] == 1, "the first batch runs")
        queued = [asyncio.create_task(batcher.submit(item)), asyncio.create_task(batcher.submit(item, 0.0))]
        await asyncio.sleep(0)
        shed = await batcher.submit(item)  # 2 inputs already wait: refused at once
        gate.set()
        outcomes = [await running, *(await asyncio.gather(*queued))]
        other = await asyncio.gather(
            batcher.submit(WorkItem("image", (object(),), SPEC)), batcher.submit(WorkItem("video", (1,), OTHER_SPEC))
        )
        batcher.stop()
        return shed, outcomes, other, batcher.describe()

    shed, (first, second, expired), (wrong, changed), counters = asyncio.run(scenario())
    assert isinstance(shed, ServingError) and (shed.status, shed.reason) == (503, "overloaded")
    assert isinstance(first, Answers) and isinstance(second, Answers) and first.model_version == "7"
    assert isinstance(expired, ServingError) and expired.reason == "deadline_exceeded" and expired.retry_after_s
    assert wrong == WrongTask("video") and changed == SpecChanged(SPEC)
    assert counters["shed"] == 1 and counters["expired"] == 1 and counters["batches"] == 4


def test_a_detector_stage_plugs_into_predict_objects(checkpoints, media):
    from opsvlm.serving import clips, objects
    from opsvlm.tasks.inspection.data.yolo import StageOneDetection

    found: list = [StageOneDetection("slope_drain", "slope drain", (0.1, 0.1, 0.5, 0.5), 0.8, 0)]
    seen = []

    async def detect(image):
        seen.append(image.shape)
        if found is None:
            raise ServingError(503, "detector_unavailable", "no detector loaded", 2.0)
        return found

    limits = make_limits(media["root"])
    backend = LocalBackend(fake_watcher(checkpoints["a"], FakePredictor()), limits)
    app = create_app(backend, limits, endpoints=(clips.ENDPOINT, objects.make_endpoint(detect)))
    files = {"file": ("site.png", media["image"].read_bytes(), "image/png")}
    with TestClient(app) as http:
        # the detector's objects reach the model (a video model here: it refuses them, naming the endpoint)
        response = http.post("/predict_objects", files=files)
        assert response.status_code == 409 and seen == [(90, 120, 3)], response.text
        found.clear()
        empty = http.post("/predict_objects", files=files).json()
        assert empty["objects"] == [] and empty["model_version"] is None
        found = None
        response = http.post("/predict_objects", files=files)
        assert response.status_code == 503 and response.json()["error"] == "detector_unavailable"
        sent = http.post("/predict_objects", files=files, data={"detections": json.dumps([DETECTION])})
        assert sent.status_code == 409 and len(seen) == 3  # detections in the request: no detector call


# --- the model: concurrency, health, retries, cache ------------------------------------------------------------------


def test_concurrent_object_requests_never_use_the_model_at_once(tiny_dir, tmp_path):
    checkpoint = write_adapter_checkpoint(tmp_path / "inspection", tiny_dir, IMAGE_SPEC, task="inspection")
    probe = {"active": 0, "most": 0, "calls": 0}
    lock = threading.Lock()

    class Probe:
        def __init__(self, predictor):
            self.inner, self.task = predictor, predictor.task

        def predict(self, inputs):
            with lock:
                probe["active"] += 1
                probe["calls"] += 1
                probe["most"] = max(probe["most"], probe["active"])
            try:
                return self.inner.predict(inputs)
            finally:
                with lock:
                    probe["active"] -= 1

    model = ModelWatcher(str(checkpoint), loader=lambda d, q: Probe(load_predictor(d, q)))
    (tmp_path / "root").mkdir()
    limits = make_limits(tmp_path / "root")
    data = image_bytes(120, 90)
    detections = json.dumps([DETECTION, {**DETECTION, "label": "vegetation", "box": [0.6, 0.5, 0.9, 0.9]}])

    async def scenario():
        app = create_app(LocalBackend(model, limits), limits)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://serving", timeout=300
        ) as http:
            send = [
                http.post(
                    "/predict_objects",
                    files={"file": ("site.png", data, "image/png")},
                    data={"detections": detections},
                )
                for _ in range(4)
            ]
            responses = await asyncio.gather(*send)
            video = await http.post("/predict", files={"file": ("a.mp4", b"\x00" * 10, "video/mp4")})
            return responses, video

    responses, video = asyncio.run(scenario())
    for response in responses:
        assert response.status_code == 200, response.text
        assert [o["index"] for o in response.json()["objects"]] == [0, 1]
        assert response.json()["image"] == {"width": 120, "height": 90}
    assert probe["most"] == 1 and 1 <= probe["calls"] <= 4
    assert video.status_code == 422  # junk bytes: refused by the decoder before any task check


def test_health_turns_unhealthy_after_k_failed_predictions_and_recovers(checkpoints, media):
    predictor = FakePredictor(fail=True)
    limits = make_limits(media["root"])
    backend = LocalBackend(fake_watcher(checkpoints["a"], predictor), limits, BatchingSettings(unhealthy_after=2))
    body = {"path": "good.mp4", "start_s": 0, "end_s": 2}
    with TestClient(create_app(backend, limits)) as http:
        assert http.get("/health").status_code == 200
        first = http.post("/predict", json=body)
        assert first.status_code == 500 and first.json()["error"] == "prediction_failed"
        assert http.get("/health").status_code == 200  # one failure is not a pattern
        assert http.post("/predict", json=body).status_code == 500
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["error"] == "unhealthy", health.text
        assert "device lost" in health.json()["detail"] and health.headers["retry-after"] == "2"
        assert http.get("/status").json()["health"]["consecutive_failures"] == 2
        predictor.fail = False
        assert http.post("/predict", json=body).status_code == 200
        assert http.get("/health").status_code == 200


def test_model_loading_is_retried_with_backoff(checkpoints):
    attempts, slept = [], []

    def flaky(directory, quantization):
        attempts.append(directory)
        if len(attempts) < 3:
            raise OSError("transient: out of file handles")
        return FakePredictor()

    loaded = ModelWatcher(str(checkpoints["a"]), loader=flaky, load_attempts=3, retry_backoff_s=1.5, sleep=slept.append)
    assert len(attempts) == 3 and slept == [1.5, 3.0] and loaded.current.source == "directory"

    slept.clear()

    def broken(directory, quantization):
        raise OSError("the adapter does not load")

    with pytest.raises(OSError, match="does not load"):
        ModelWatcher(str(checkpoints["a"]), loader=broken, load_attempts=2, retry_backoff_s=1.0, sleep=slept.append)
    assert slept == [1.0]


def test_the_model_cache_is_private_and_keyed_by_server_and_run(tmp_path):
    one, two = ModelCache(tmp_path / "cache", "http://a:5000"), ModelCache(tmp_path / "cache", "http://b:5000")
    assert one.server_dir != two.server_dir and one.run_dir("r1") != one.run_dir("r2")
    for path in (one.root, one.server_dir, two.server_dir):
        assert path.stat().st_mode & 0o777 == 0o700, path
    assert one.run_dir("../../etc").parent == one.server_dir  # a run id cannot walk out of the cache

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # a world-writable folder of ours is made private
    ModelCache(shared, "http://a:5000")
    assert shared.stat().st_mode & 0o777 == 0o700

    (tmp_path / "link").symlink_to(tmp_path / "cache")
    with pytest.raises(ValueError, match="symlink"):
        ModelCache(tmp_path / "link", "http://a:5000")
    if os.getuid() == 0:  # as root, a folder owned by someone else can be made to test the refusal
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        os.chown(foreign, 65534, 65534)
        with pytest.raises(ValueError, match="owned by uid 65534"):
            ModelCache(foreign, "http://a:5000")


def test_only_safetensors_checkpoints_are_loaded(checkpoints, tmp_path):
    check_safetensors_only(checkpoints["a"])
    pickled = shutil.copytree(checkpoints["a"], tmp_path / "pickled")
    (pickled / "adapter" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match=r"adapter_model\.bin: a pickle-format file"):
        ModelWatcher(str(pickled), loader=lambda d, q: FakePredictor(), load_attempts=1)
    missing = shutil.copytree(checkpoints["a"], tmp_path / "missing")
    (missing / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="only safetensors"):
        check_safetensors_only(missing)


# --- status, auth, config -------------------------------------------------------------------------------------------


def test_status_shows_no_filesystem_paths_unless_configured(checkpoints, media):
    limits = make_limits(media["root"])
    backend = LocalBackend(fake_watcher(checkpoints["a"], FakePredictor()), limits)
    with TestClient(create_app(backend, limits)) as http:
        text = http.get("/status").text
        assert str(checkpoints["a"]) not in text and str(media["root"]) not in text
        status = json.loads(text)
        assert status["model"]["version"] == checkpoints["a"].name and status["limits"]["allowed_root"] == "<set>"
    with TestClient(create_app(backend, limits, show_paths=True)) as http:
        status = http.get("/status").json()
        assert status["model"]["checkpoint_dir"] == str(checkpoints["a"])
        assert status["limits"]["allowed_root"] == str(media["root"])


def test_optional_api_key(checkpoints, media, monkeypatch):
    limits = make_limits(media["root"])
    backend = LocalBackend(fake_watcher(checkpoints["a"], FakePredictor()), limits)
    with TestClient(create_app(backend, limits, api_key="s3cret")) as http:
        assert http.get("/health").status_code == 200  # probes need no key
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            response = http.get("/status", headers=headers)
            assert response.status_code == 401 and response.json()["error"] == "unauthorized", headers
        assert http.post("/predict", json={"path": "good.mp4"}).status_code == 401
        assert http.get("/docs").status_code == 401
        assert http.get("/status", headers={"X-API-Key": "s3cret"}).json()["auth"]["api_key_required"] is True
        assert http.get("/status", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    with TestClient(create_app(backend, limits)) as http:  # off by default
        assert http.get("/status").json()["auth"]["api_key_required"] is False

    assert AuthSettings().api_key() is None
    monkeypatch.delenv("OPSVLM_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPSVLM_TEST_KEY"):
        AuthSettings(api_key_env="OPSVLM_TEST_KEY").api_key()
    monkeypatch.setenv("OPSVLM_TEST_KEY", "k")
    assert AuthSettings(api_key_env="OPSVLM_TEST_KEY").api_key() == "k"


def test_app_config_is_one_typed_config_with_each_default_once(tmp_path):
    config = load_app_config({})
    assert config.limits == ServingLimits() and config.batching == BatchingSettings()
    overridden = load_app_config({"limits": {"max_json_bytes": 2048}}, ["batching.max_batch_size=4"])
    assert overridden.limits.max_json_bytes == 2048 and overridden.batching.max_batch_size == 4
    cli = load_app_config({"model.ref": "models:/x@champion", "use_gpu": "false", "limits.max_detections": "8"})
    assert (cli.model.ref, cli.use_gpu, cli.limits.max_detections) == ("models:/x@champion", False, 8)
    for args, field in [
        ({"limits": {"max_json_byte": 1}}, "max_json_byte"),
        ({"model": {"quantization": "fp4"}}, "quantization"),
        ({"use_gpu": "sometimes"}, "use_gpu"),
        ({"limits": {"allowed_root": str(tmp_path / "nope")}}, "allowed_root"),
        ({"limits": {"image_formats": ["TIFF"]}}, "image_formats"),
    ]:
        with pytest.raises(ConfigError, match=field):
            load_app_config(args)
