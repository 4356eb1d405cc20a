"""A replica starts from its cached model version while the MLflow server is down, says so, and catches up when the
server is back: a real ``mlflow server`` (SQLite, proxied artifacts) on 127.0.0.1 that this test starts, stops and
restarts (not the session's shared server), a real tiny adapter checkpoint, the real in-process HTTP app.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from opsvlm.serving import LocalBackend, ModelWatcher, ServingLimits, create_app
from opsvlm.testing.processes import MlflowServer
from tests.unit.test_serving import FPS, SPEC, ramp_frame, register_checkpoint, write_adapter_checkpoint

pytestmark = pytest.mark.integration

MODEL_NAME = "opsvlm-cache-test"
START_TIMEOUT_S = 60.0


@pytest.fixture
def server(tmp_path):
    """A server this test owns (stopped and started again by the test); stopped at the end whatever happened."""
    owned = MlflowServer(tmp_path / "mlflow", start_timeout_s=START_TIMEOUT_S)
    try:
        yield owned.start()
    finally:
        owned.stop()


def test_replica_starts_from_cache_with_mlflow_stopped_and_catches_up(server, tiny_model_dir, tmp_path, monkeypatch):
    from opsvlm.video.encode import write_video

    # An unreachable server must fail fast (MLflow's default retries for minutes): what the Serve configs set too.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    url, cache = server.url, tmp_path / "cache"
    client = MlflowClient(url, url)
    experiment_id = client.create_experiment("serving-cache")
    checkpoint = write_adapter_checkpoint(tmp_path / "v1", tiny_model_dir, SPEC)
    version = register_checkpoint(client, experiment_id, url, MODEL_NAME, checkpoint, champion=True)
    ref = f"models:/{MODEL_NAME}@champion"

    first = ModelWatcher(ref, tracking_uri=url, cache_dir=cache)
    assert first.current.source == "registry" and first.current.version == version and first.registry_reachable
    cached_dirs = list((cache / next(p.name for p in cache.iterdir() if p.name.startswith("server-"))).glob("run-*"))
    assert len(cached_dirs) == 1 and first.current.run_id in cached_dirs[0].name  # keyed by server and run
    assert cache.stat().st_mode & 0o777 == 0o700

    server.stop()  # MLflow goes away
    second = ModelWatcher(ref, tracking_uri=url, cache_dir=cache, load_attempts=1)
    assert second.current.source == "cache" and second.current.version == version
    assert second.registry_reachable is False and "unreachable" in second.last_error

    root = tmp_path / "root"
    root.mkdir()
    write_video(root / "good.mp4", (ramp_frame(i) for i in range(round(3 * FPS))), FPS)
    limits = ServingLimits(allowed_root=str(root))
    with TestClient(create_app(LocalBackend(second, limits), limits)) as http:
        status = http.get("/status").json()
        assert status["model"]["source"] == "cache" and status["model"]["registry_reachable"] is False
        assert "unreachable" in status["model"]["last_error"] and str(cache) not in http.get("/status").text
        assert http.get("/health").status_code == 200
        response = http.post("/predict", json={"path": "good.mp4", "start_s": 0, "end_s": 2})
        assert response.status_code == 200 and response.json()["model_version"] == version, response.text

    # The cache of another tracking server holds nothing for this reference: no model, no start.
    with pytest.raises(Exception, match=MODEL_NAME):
        ModelWatcher(ref, tracking_uri="http://127.0.0.1:1", cache_dir=cache, load_attempts=1)

    server.start()  # MLflow is back, on the same port and store
    assert second.poll() is False  # the same version: nothing to load, but the registry confirms it
    assert second.current.source == "registry" and second.registry_reachable and second.last_error is None
