"""opsvlm.serving without Ray: path and upload validation, limits, decoding real videos under limits (a real FIFO
for the hang), the model watcher on a real MLflow registry (SQLite) with real tiny adapter checkpoints, and the HTTP
API over the in-process backend (FastAPI TestClient, real predictions of the tiny model).

The hardening of the API (JSON caps, load shedding, health, cache, auth) is in ``test_serving_hardening.py``."""

from __future__ import annotations

import asyncio
import io
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from opsvlm.serving import LocalBackend, Media, ModelWatcher, ServingError, ServingLimits, Window, create_app
from opsvlm.serving import media as serving_media
from opsvlm.serving import requests as serving_requests
from opsvlm.serving.clips import run_jobs
from opsvlm.serving.endpoint import ServingContext
from opsvlm.serving.requests import ClipJob
from opsvlm.serving.work import Deadline, WorkPool
from opsvlm.tasks.operations import LABEL_NAMES
from opsvlm.testing import checkpoints as testing_checkpoints
from opsvlm.testing.checkpoints import register_checkpoint
from opsvlm.video.encode import write_video
from opsvlm.video.sampling import SamplingSpec

SPEC = SamplingSpec(frames_per_clip=4, max_pixels=56 * 56)
OTHER_SPEC = SamplingSpec(frames_per_clip=2, max_pixels=56 * 56)
FPS = 15.0
GOOD_SECONDS = 6.0
LONG_SECONDS = 12.0


# --- helpers shared with tests/integration/test_serve.py -------------------------------------------------------------


def write_adapter_checkpoint(
    directory: Path, tiny_dir: Path, spec: SamplingSpec, seed: int = 0, task: str = "operations"
) -> Path:
    """:func:`opsvlm.testing.checkpoints.write_adapter_checkpoint`, of the operations task unless told otherwise."""
    return testing_checkpoints.write_adapter_checkpoint(directory, tiny_dir, spec, task=task, seed=seed)


def ramp_frame(index: int, size: int = 64) -> np.ndarray:
    ramp = np.linspace(0, 255, size, dtype=np.float32)[None, :, None]
    return np.broadcast_to((ramp + index * 5) % 256, (size, size, 3)).astype(np.uint8)


def write_bad_videos(root: Path, good: Path) -> dict[str, Path]:
    """Real bad inputs next to a good video: non-video bytes, empty, truncated, corrupt, a stream without frames."""
    import av

    data = good.read_bytes()
    files = {
        "junk": (root / "junk.mp4", os.urandom(20_000)),
        "empty": (root / "empty.mp4", b""),
        "truncated": (root / "truncated.mp4", data[: len(data) // 2]),
    }
    corrupt = bytearray(data)
    for i in range(len(corrupt) // 3, len(corrupt) // 3 + 2000):  # flip bytes inside the coded frames
        corrupt[i] ^= 0xFF
    files["corrupt"] = (root / "corrupt.mp4", bytes(corrupt))
    for path, content in files.values():
        path.write_bytes(content)
    zero = root / "zero_frames.mp4"
    with av.open(str(zero), "w") as container:  # an H.264 track with no frames in it
        stream = container.add_stream("libx264", rate=15)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return {**{k: p for k, (p, _) in files.items()}, "zero_frames": zero}


# --- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    good = root / "good.mp4"
    write_video(good, (ramp_frame(i) for i in range(round(GOOD_SECONDS * FPS))), FPS)
    long = root / "long.mp4"
    write_video(long, (ramp_frame(i) for i in range(round(LONG_SECONDS * FPS))), FPS)
    return {"root": root, "good": good, "long": long, **write_bad_videos(root, good)}


@pytest.fixture
def limits(videos) -> ServingLimits:
    return ServingLimits(
        max_upload_bytes=200_000, max_duration_s=8.0, decode_deadline_s=30.0, allowed_root=str(videos["root"])
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from opsvlm.testing.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny_cache"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    experiment_id = client.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
    return {"uri": uri, "client": client, "experiment_id": experiment_id, "root": root}


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "a": write_adapter_checkpoint(root / "a", tiny_dir, SPEC, seed=0),
        "b": write_adapter_checkpoint(root / "b", tiny_dir, OTHER_SPEC, seed=1),
    }


@pytest.fixture(scope="module")
def watcher(checkpoints) -> ModelWatcher:
    """The in-process model of the HTTP tests: a checkpoint directory reference (fixed, not watched)."""
    return ModelWatcher(str(checkpoints["a"]))


# --- validation ------------------------------------------------------------------------------------------------------


def test_parse_window_accepts_numbers_and_numeric_strings():
    assert serving_requests.parse_window() == Window(0.0, None)
    assert serving_requests.parse_window("1.5", "4") == Window(1.5, 4.0)
    assert serving_requests.parse_window("", "") == Window(0.0, None)
    assert serving_requests.parse_window(2, None) == Window(2.0, None)
    for start, end in [("a", None), (-1, None), (None, "nan"), (None, float("inf")), (3, 3), (4, 2), (True, None)]:
        with pytest.raises(ServingError) as info:
            serving_requests.parse_window(start, end)
        assert info.value.status == 422 and info.value.reason == "invalid_window", (start, end)


def test_video_names_and_content_types():
    assert serving_requests.check_video_name("a.MP4", "video/mp4") == ".mp4"
    assert serving_requests.check_video_name("clip.mkv", "application/octet-stream") == ".mkv"
    assert serving_requests.check_video_name("clip.avi", None) == ".avi"
    assert serving_requests.check_video_name("clip.mov", "video/quicktime; charset=binary") == ".mov"
    for name, content_type in [
        ("notes.txt", "text/plain"),
        ("clip.mp4", "text/plain"),
        ("clip.mp4", "image/png"),
        ("clip", "video/mp4"),
        (None, "video/mp4"),
        ("clip.mp4.exe", "application/octet-stream"),
    ]:
        with pytest.raises(ServingError) as info:
            serving_requests.check_video_name(name, content_type)
        assert info.value.status == 415, (name, content_type)
        assert "video" in info.value.detail


def test_paths_never_leave_the_allowed_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.mp4").write_bytes(b"x")
    (root / "sub" / "b.mkv").write_bytes(b"x")
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"x")
    (root / "link_out.mp4").symlink_to(outside)
    (root / "link_in.mp4").symlink_to(root / "sub" / "b.mkv")
    (root / "dir_out").symlink_to(tmp_path)
    (root / "notes.txt").write_text("x")
    os.mkfifo(root / "pipe.mp4")

    assert serving_requests.resolve_allowed_path(root, "a.mp4") == (root / "a.mp4").resolve()
    assert serving_requests.resolve_allowed_path(root, "sub/b.mkv") == (root / "sub" / "b.mkv").resolve()
    assert serving_requests.resolve_allowed_path(root, str(root / "a.mp4")) == (root / "a.mp4").resolve()
    assert serving_requests.resolve_allowed_path(root, "./sub//b.mkv").name == "b.mkv"
    assert serving_requests.resolve_allowed_path(root, "link_in.mp4") == (root / "sub" / "b.mkv").resolve()
    assert (
        serving_requests.resolve_allowed_path(root, "pipe.mp4").name == "pipe.mp4"
    )  # a hang is the decoder's to catch

    refused = {
        "../secret.mp4": 403,
        "sub/../a.mp4": 403,  # '..' is refused even when it would land inside
        "sub/../../secret.mp4": 403,
        str(outside): 403,
        "/etc/passwd": 403,
        "link_out.mp4": 403,
        "dir_out/secret.mp4": 403,
        "missing.mp4": 404,
        "sub": 422,
        ".": 422,
        "": 422,
        "a.mp4\x00.txt": 422,
        "notes.txt": 415,
    }
    for requested, status in refused.items():
        with pytest.raises(ServingError) as info:
            serving_requests.resolve_allowed_path(root, requested)
        assert info.value.status == status, (requested, info.value)
        assert str(tmp_path) not in info.value.detail or requested.startswith(str(tmp_path)), info.value.detail
    with pytest.raises(ServingError) as info:
        serving_requests.resolve_allowed_path(root, 42)
    assert info.value.status == 422
    with pytest.raises(ServingError) as info:
        serving_requests.resolve_allowed_path(None, "a.mp4")
    assert info.value.status == 403 and info.value.reason == "paths_disabled"


def test_copy_limited_refuses_past_the_limit(tmp_path):
    destination = tmp_path / "upload.mp4"
    assert serving_requests.copy_limited(io.BytesIO(b"x" * 1000), destination, 1000, "a.mp4") == 1000
    assert destination.stat().st_size == 1000
    with pytest.raises(ServingError) as info:
        serving_requests.copy_limited(io.BytesIO(b"x" * 1001), destination, 1000, "a.mp4")
    assert info.value.status == 413 and "a.mp4" in info.value.detail and "1000" in info.value.detail
    assert not destination.exists()


def test_limit_body_refuses_by_content_length_and_while_streaming():
    def request(headers: dict[str, str], chunks: list[bytes]) -> Request:
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            return messages.pop(0)

        scope = {"type": "http", "method": "POST", "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
        return Request(scope, receive)

    with pytest.raises(ServingError) as info:
        serving_requests.limit_body(request({"content-length": "101"}, [b""]), 100)
    assert info.value.status == 413 and "101" in info.value.detail
    with pytest.raises(ServingError) as info:
        serving_requests.limit_body(request({"content-length": "ten"}, [b""]), 100)
    assert info.value.status == 400

    chunked = serving_requests.limit_body(request({}, [b"x" * 60, b"x" * 60]), 100)  # no Content-Length: counted
    with pytest.raises(ServingError) as info:
        asyncio.run(chunked.body())
    assert info.value.status == 413
    assert asyncio.run(serving_requests.limit_body(request({}, [b"x" * 50, b"x" * 50]), 100).body()) == b"x" * 100


def test_serving_error_pickles():
    import pickle

    error = pickle.loads(pickle.dumps(ServingError(413, "upload_too_large", "too big")))
    assert (error.status, error.reason, error.detail) == (413, "upload_too_large", "too big")


# --- decoding under limits -------------------------------------------------------------------------------------------


def test_decode_whole_video_and_windows(videos, limits):
    media = Media(str(videos["good"]), "good.mp4")
    assert serving_media.media_duration(media, SPEC, 30) == pytest.approx(GOOD_SECONDS)
    whole, window, to_end = serving_media.decode_media(media, [Window(), Window(1.0, 4.0), Window(2.5)], SPEC, limits)
    assert (whole.start_s, whole.end_s) == (0.0, pytest.approx(GOOD_SECONDS))
    assert whole.frames.shape == (4, 56, 56, 3) and whole.frames.dtype == np.uint8
    assert whole.frame_times_s[0] == 0 and whole.frame_times_s[-1] < GOOD_SECONDS
    assert (window.start_s, window.end_s, window.clip_length_s) == (1.0, 4.0, 3.0)
    assert window.frame_times_s[0] >= 0 and window.frame_times_s[-1] < 3.0
    assert (to_end.start_s, to_end.end_s) == (2.5, pytest.approx(GOOD_SECONDS))
    assert whole.spec == SPEC


def test_decode_limits_and_bad_windows(videos, limits):
    long = Media(str(videos["long"]), "long.mp4")
    (too_long,) = serving_media.decode_media(long, [Window()], SPEC, limits)
    assert too_long.status == 413 and too_long.reason == "duration_too_long" and "8 s" in too_long.detail
    ok, window_too_long = serving_media.decode_media(long, [Window(0, 8), Window(2, 10.5)], SPEC, limits)
    assert ok.clip_length_s == 8.0 and window_too_long.status == 413

    good = Media(str(videos["good"]), "good.mp4")
    after_end, past_end, starts_after = serving_media.decode_media(
        good, [Window(7.0), Window(2.0, 9.0), Window(6.5, 7.0)], SPEC, limits
    )
    for error in (after_end, past_end, starts_after):
        assert error.status == 422 and error.reason == "beyond_media_end", error
        assert "window outside the video" in error.detail and "good.mp4" in error.detail


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("junk", "not_a_video"),
        ("empty", "empty_file"),
        ("truncated", "not_a_video"),
        # Which code depends on whether the damage hits the first frame (decoded when the file is opened).
        pytest.param("corrupt", {"decode_error", "not_a_video"}, id="corrupt"),
        ("zero_frames", "not_a_video"),
    ],
)
def test_bad_media_is_a_422_naming_the_file_not_the_server_path(videos, limits, kind, reason):
    media = Media(str(videos[kind]), f"client-{kind}.mp4")
    (error,) = serving_media.decode_media(media, [Window()], SPEC, limits)
    assert isinstance(error, ServingError)
    assert error.status == 422 and error.reason in ({reason} if isinstance(reason, str) else reason)
    assert f"client-{kind}.mp4" in error.detail and str(videos["root"]) not in error.detail


def test_a_hanging_decode_becomes_a_504(tmp_path, limits):
    fifo = tmp_path / "hang.mp4"
    os.mkfifo(fifo)  # decord blocks opening a FIFO nobody writes to
    quick = replace(limits, decode_deadline_s=1.5)
    for window in (Window(), Window(0, 2)):  # the duration probe and the decode itself both have the deadline
        (error,) = serving_media.decode_media(Media(str(fifo), "hang.mp4"), [window], SPEC, quick)
        assert (error.status, error.reason) == (504, "decode_timeout") and "hang.mp4" in error.detail


def test_decode_bytes_equals_decode_path(videos, limits):
    data = videos["good"].read_bytes()
    (from_bytes,) = serving_media.decode_media_bytes(data, "upload.mp4", [Window(1, 3)], SPEC, limits)
    (from_path,) = serving_media.decode_media(Media(str(videos["good"]), "good.mp4"), [Window(1, 3)], SPEC, limits)
    np.testing.assert_array_equal(from_bytes.frames, from_path.frames)
    (junk,) = serving_media.decode_media_bytes(b"not a video", "upload.mkv", [Window()], SPEC, limits)
    assert junk.status == 422 and "upload.mkv" in junk.detail


# --- the model watcher -----------------------------------------------------------------------------------------------


def test_watcher_swaps_on_alias_move_and_survives_a_broken_version(store, checkpoints, tmp_path):
    from tests.unit.test_registry import write_checkpoint

    client, uri, name = store["client"], store["uri"], "watched"
    first = register_checkpoint(client, store["experiment_id"], uri, name, checkpoints["a"], champion=True)
    clock = [0.0]
    watcher = ModelWatcher(
        f"models:/{name}@champion", tracking_uri=uri, cache_dir=tmp_path / "cache", clock=lambda: clock[0]
    )
    assert watcher.watches and watcher.current.version == first == "1"
    assert watcher.current.spec == SPEC and watcher.current.labels == LABEL_NAMES
    assert watcher.status()["model"]["name"] == name and watcher.status()["sampling_spec"]["frames_per_clip"] == 4
    assert watcher.poll() is False and watcher.last_error is None

    # A registered version whose adapter does not load: logged, reported, skipped; v1 keeps serving.
    broken = register_checkpoint(
        client, store["experiment_id"], uri, name, write_checkpoint(tmp_path / "broken"), champion=True
    )
    before = watcher.current
    assert watcher.poll() is False
    assert watcher.current is before and f"version {broken} failed to load" in watcher.last_error
    assert watcher.poll() is False and watcher.current is before and "try 1" in watcher.last_error  # backing off
    clock[0] += 2.5  # past the first backoff (2 s): tried again, fails again, waits twice as long
    assert watcher.poll() is False and watcher.current is before and "try 2" in watcher.last_error

    third = register_checkpoint(client, store["experiment_id"], uri, name, checkpoints["b"], champion=True)
    assert watcher.poll() is True
    assert watcher.current.version == third == "3" and watcher.current.spec == OTHER_SPEC
    assert watcher.last_error is None and watcher.status()["sampling_spec"]["frames_per_clip"] == 2

    pinned = ModelWatcher(f"models:/{name}/1", tracking_uri=uri, cache_dir=tmp_path / "cache")
    assert not pinned.watches and pinned.poll() is False and pinned.current.version == "1"


# --- the HTTP API over the in-process backend ------------------------------------------------------------------------


@pytest.fixture
def client(watcher, limits):
    app = create_app(LocalBackend(watcher, limits), limits)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def upload(client, path: Path, name: str | None = None, content_type="video/mp4", route="/predict", **fields):
    files = {"file": (name or path.name, path.read_bytes(), content_type)}
    return client.post(route, files=files, data={k: str(v) for k, v in fields.items()})


def assert_valid_prediction(body: dict, clip_length: float, version: str) -> None:
    assert body["operation"] in LABEL_NAMES and body["next_operation"] in LABEL_NAMES
    assert 0 <= body["start_s"] < body["end_s"] <= clip_length + 1e-6
    assert set(body["scores"]) == set(LABEL_NAMES) and sum(body["scores"].values()) == pytest.approx(1, abs=1e-3)
    assert body["model_version"] == version and body["latency_ms"] > 0


def test_http_api_predicts_uploads_and_paths(client, videos, watcher):
    version = watcher.current.version
    assert client.get("/health").json() == {"status": "ok", "model_version": version}
    status = client.get("/status").json()
    assert status["model"]["version"] == version and status["labels"] == list(LABEL_NAMES)
    assert status["sampling_spec"]["frames_per_clip"] == 4 and status["limits"]["max_duration_s"] == 8.0
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/status", "/predict", "/batch_predict"} <= set(paths)
    assert {"multipart/form-data", "application/json"} <= set(paths["/predict"]["post"]["requestBody"]["content"])

    response = upload(client, videos["good"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert_valid_prediction(body, GOOD_SECONDS, version)
    assert body["clip"] == {"start_s": 0.0, "end_s": pytest.approx(GOOD_SECONDS)}

    response = upload(client, videos["good"], "clip.mkv", "application/octet-stream", start_s=1, end_s=4)
    assert response.status_code == 200 and response.json()["clip"] == {"start_s": 1.0, "end_s": 4.0}
    assert_valid_prediction(response.json(), 3.0, version)

    response = client.post("/predict", json={"path": "good.mp4", "start_s": 0.5, "end_s": 2.5})
    assert response.status_code == 200, response.text
    assert_valid_prediction(response.json(), 2.0, version)


def test_http_batch_gives_one_result_per_clip(client, videos, watcher):
    clips = [
        {"path": "good.mp4"},
        {"path": "good.mp4", "start_s": 1, "end_s": 3},
        {"path": "../outside.mp4"},
        {"path": "junk.mp4"},
        {"path": "good.mp4", "start_s": 5, "end_s": 2},
    ]
    response = client.post("/batch_predict", json={"clips": clips})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == list(range(5))
    assert [r["status"] for r in results] == [200, 200, 403, 422, 422]
    assert_valid_prediction(results[1]["prediction"], 2.0, watcher.current.version)
    assert results[3]["error"] == "not_a_video" and "junk.mp4" in results[3]["detail"]

    files = [("files", ("a.mp4", videos["good"].read_bytes(), "video/mp4"))] * 2
    clips_field = json.dumps([{"file": 0}, {"file": 1, "start_s": 2, "end_s": 4}, {"file": 5}])
    response = client.post("/batch_predict", files=files, data={"clips": clips_field})
    assert response.status_code == 200, response.text
    assert [r["status"] for r in response.json()["results"]] == [200, 200, 422]

    too_many = {"clips": [{"path": "good.mp4"}] * 17}
    assert client.post("/batch_predict", json=too_many).status_code == 413
    assert client.post("/batch_predict", json={"clips": []}).status_code == 422
    assert client.post("/batch_predict", content=b"x", headers={"content-type": "text/plain"}).status_code == 415


def test_http_bad_requests_get_4xx_and_the_server_stays_up(client, videos):
    big = videos["root"] / "big.mp4"
    big.write_bytes(os.urandom(300_000))
    cases = [
        (lambda: upload(client, videos["junk"]), 422, "not_a_video"),
        (lambda: upload(client, videos["empty"]), 422, "empty_file"),
        (lambda: upload(client, videos["truncated"]), 422, "not_a_video"),
        (lambda: upload(client, videos["corrupt"]), 422, None),
        (lambda: upload(client, videos["zero_frames"]), 422, "not_a_video"),
        (lambda: upload(client, videos["good"], start_s=7), 422, "beyond_media_end"),
        (lambda: upload(client, videos["good"], start_s=2, end_s=9), 422, "beyond_media_end"),
        (lambda: upload(client, videos["good"], start_s=3, end_s=1), 422, "invalid_window"),
        (lambda: upload(client, videos["good"], start_s="soon"), 422, "invalid_window"),
        (lambda: upload(client, videos["long"]), 413, "duration_too_long"),
        (lambda: upload(client, big), 413, "upload_too_large"),
        (lambda: upload(client, videos["good"], "notes.txt", "text/plain"), 415, "unsupported_media_type"),
        (lambda: upload(client, videos["good"], "good.mp4", "image/png"), 415, "unsupported_media_type"),
        (lambda: client.post("/predict", content=b"abc", headers={"content-type": "text/plain"}), 415, None),
        (lambda: client.post("/predict", content=b"abc"), 415, "unsupported_media_type"),
        (lambda: client.post("/predict", data={"start_s": "1"}, files={"other": ("x", b"")}), 422, "missing_file"),
        (lambda: client.post("/predict", json={"start_s": 1}), 422, "invalid_request"),
        (lambda: client.post("/predict", json={"path": "good.mp4", "bogus": 1}), 422, "invalid_request"),
        (lambda: client.post("/predict", content=b"{", headers={"content-type": "application/json"}), 400, None),
        (lambda: client.post("/predict", json={"path": "../secret.mp4"}), 403, "path_outside_root"),
        (lambda: client.post("/predict", json={"path": "/etc/hostname"}), 403, "path_outside_root"),
        (lambda: client.post("/predict", json={"path": "nope.mp4"}), 404, "not_found"),
    ]
    for send, status, reason in cases:
        response = send()
        assert response.status_code == status, (status, reason, response.text)
        body = response.json()
        assert body["detail"], body
        if reason is not None:
            assert body["error"] == reason, body
        assert client.get("/health").status_code == 200
    assert upload(client, videos["good"]).status_code == 200


def test_a_spec_change_mid_request_redecodes_with_the_new_spec(watcher, limits, videos):
    class StaleSpecBackend(LocalBackend):
        """Decodes with a stale spec until told the new one, like a Serve ingress right after an alias swap."""

        def __init__(self, *args):
            super().__init__(*args)
            self.spec = OTHER_SPEC
            self.decoded_with = []

        async def sampling_spec(self):
            return self.spec

        def remember_spec(self, spec):
            self.spec = spec

        async def decode(self, media, windows, spec, pool):
            self.decoded_with.append(spec)
            return await super().decode(media, windows, spec, pool)

    backend = StaleSpecBackend(watcher, limits)
    jobs = [ClipJob(Media(str(videos["good"]), "good.mp4"), Window(0, 2))]

    async def run():
        context = ServingContext(backend, limits, WorkPool(2, 8))
        return await run_jobs(context, jobs, Deadline(limits.request_deadline_s))

    ((answer, version, clip),) = asyncio.run(run())
    assert backend.decoded_with == [OTHER_SPEC, SPEC] and clip.spec == SPEC
    assert version == watcher.current.version and answer["operation"] in LABEL_NAMES
