"""Shared fixtures: small real sessions (annotation CSV + real H.264 video), the real OpenPack sample, local Ray."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from opsvlm.tasks.operations.data.openpack import (
    Segment,
    SessionTimeline,
    annotation_path,
    video_path,
    write_operations_csv,
)
from opsvlm.video.encode import write_video

SAMPLE_ROOT = Path(__file__).resolve().parents[2] / "shared" / "openpack-sample"
ORIGIN = dt.datetime(2024, 1, 15, 9, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=9)))


def pytest_configure(config):
    # Two cores shared by Ray workers, decoders and the test process: torch's default thread pool spins and slows
    # small CPU models by 10-50x under that contention. One intra-op thread per process is the fast setting here.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


def index_frame(index: int, height: int = 64, width: int = 64) -> np.ndarray:
    """uint8[H, W, 3] frame whose brightness encodes its index (8 levels apart, survives H.264)."""
    return np.full((height, width, 3), (index * 8) % 256, dtype=np.uint8)


def frame_index_of(frame: np.ndarray) -> int:
    """Inverse of :func:`index_frame` for indices < 32."""
    return round(float(frame.mean()) / 8)


def make_session(
    root: Path,
    subject: str,
    session: str,
    ops: list[tuple[int, float]],
    fps: float = 15.0,
    size: tuple[int, int] = (64, 64),
    video_seconds: float | None = None,
    frame_fn=None,
) -> SessionTimeline:
    """Write one session (annotation CSV + H.264 MP4) in the OpenPack layout.

    Args:
        ops: ``(op_id, duration_s)`` rows, contiguous from t = 0; op_id ``None`` leaves an un-annotated gap.
        video_seconds: Video length (default: the annotated span).
        frame_fn: ``index -> uint8[H, W, 3]`` (default: a moving gradient).
    """
    segments, t = [], 0.0
    for op_id, duration in ops:
        if op_id is not None:
            segments.append(Segment(op_id, round(t, 3), round(t + duration, 3), box=1))
        t += duration
    timeline = SessionTimeline(subject, session, ORIGIN, tuple(segments))
    write_operations_csv(annotation_path(root, subject, session), timeline)
    n_frames = round((video_seconds if video_seconds is not None else t) * fps)
    height, width = size
    if frame_fn is None:
        ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]

        def frame_fn(i):
            return np.broadcast_to((ramp + i * 5) % 256, (height, width, 3)).astype(np.uint8)

    write_video(video_path(root, subject, session), (frame_fn(i) for i in range(n_frames)), fps)
    return timeline


@pytest.fixture(scope="session")
def sample_root() -> Path:
    if not SAMPLE_ROOT.is_dir():
        pytest.fail(f"the real OpenPack sample is missing at {SAMPLE_ROOT}")
    return SAMPLE_ROOT


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance on 127.0.0.1 with 2 CPUs, shared by the integration tests."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never attach to another `ray start` cluster on this machine (e.g. the e2e test's)
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src")])}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def copy_tree(tmp_path):
    def _copy(src: Path, name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return _copy
