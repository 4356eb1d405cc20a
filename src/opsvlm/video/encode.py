"""Write H.264 MP4 files (PyAV / libx264): used by the synthetic generator, test fixtures and benchmarks."""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = [
    "write_video",
]


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float = 15.0, **codec_options: str) -> int:
    """Encode RGB frames as an H.264 MP4 (yuv420p, libx264 defaults unless ``codec_options`` say otherwise).

    Args:
        path: Destination ``.mp4``; parent folders are created.
        frames: Iterable of uint8[H, W, 3] frames, all the same size (H and W even: yuv420p needs it).
        fps: Frame rate.
        **codec_options: libx264 options, e.g. ``crf="28"``.

    Returns:
        Number of frames written.
    """
    import av  # imported here: only writers need PyAV

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with av.open(str(path), "w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.options = dict(codec_options)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
            count += 1
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return count
