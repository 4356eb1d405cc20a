"""Integration fixtures: a real MLflow tracking server, prepared clips and the tiny model checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from opsvlm.data.pipeline import PrepareConfig, prepare
from opsvlm.tasks.operations.data.clips import ClipConfig
from opsvlm.testing.processes import MlflowServer
from opsvlm.video.sampling import SamplingSpec
from tests.conftest import make_session

SERVER_START_TIMEOUT_S = 60.0

# Five subjects (3 train / 1 val / 1 test with the default split), 12 s each: every clip's dominant and next
# operation come from a different pair of labels.
SESSIONS: dict[str, list[tuple[int, float]]] = {
    "U0101": [(100, 3.0), (200, 4.0), (300, 5.0)],
    "U0102": [(300, 4.0), (400, 4.0), (500, 4.0)],
    "U0103": [(500, 3.0), (600, 5.0), (700, 4.0)],
    "U0104": [(700, 4.0), (1000, 4.0), (800, 4.0)],
    "U0105": [(800, 4.0), (900, 4.0), (100, 4.0)],
}
FRAME_SIZE = 56
FRAMES_PER_CLIP = 4


def running(server: MlflowServer) -> Iterator[str]:
    """Start ``server`` (a failed start fails the test, with the server's log), yield its URL, stop it after."""
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, proxied artifacts); yields its URL."""
    yield from running(MlflowServer(tmp_path_factory.mktemp("mlflow_server"), start_timeout_s=SERVER_START_TIMEOUT_S))


@pytest.fixture(scope="session")
def prepared_clips(ray_local, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder (shards by split, manifest) of five small real sessions: 4-frame 56x56 clips."""
    root = tmp_path_factory.mktemp("train_data")
    source = root / "source"
    for subject, ops in SESSIONS.items():
        make_session(source, subject, "S0100", ops, fps=15.0, size=(FRAME_SIZE, FRAME_SIZE))
    out = root / "prepared"
    summary = prepare(
        PrepareConfig(
            source=str(source),
            out=str(out),
            clips=ClipConfig(4.0, 2.0),
            sampling=SamplingSpec(frames_per_clip=FRAMES_PER_CLIP, max_pixels=FRAME_SIZE * FRAME_SIZE),
            decode_deadline_s=60,
            decode_num_cpus=0.5,
        )
    )
    assert summary["clips_written"] == summary["clips_total"] > 0, summary
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2.5-VL checkpoint, built into this session's temporary cache (not ``~/.cache``)."""
    from opsvlm.testing.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny_cache"))
