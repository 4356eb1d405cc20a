"""Frame sampling: which frames of a clip the model sees. Pure, deterministic functions.

Training, evaluation and serving must pick the same frames for the same clip, so the choice is described by one
serializable :class:`SamplingSpec` that is saved with every trained model. Two strategies:

* ``uniform``: evenly spaced frames across the clip (cheap; needs only the frames it keeps).
* ``motion``: motion-adaptive (seed 002 notes): grayscale frame differences score each frame; the first and last
  frames are always kept, the remaining budget goes to the highest-motion frames, returned in time order. Frames
  where something happens (an item goes in, the lid closes) are more informative than the steady middle.

A scene/keyframe strategy was considered and left out: on packing video the camera is static and "scene changes"
are exactly the motion peaks the motion strategy already finds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from opsvlm.config import check_choices
from opsvlm.types import SamplingStrategy

__all__ = [
    "SamplingSpec",
    "frame_motion",
    "motion_indices",
    "sample_clip",
    "sample_indices",
    "to_gray",
    "uniform_indices",
]


@dataclass(frozen=True)
class SamplingSpec:
    """How frames are sampled and sized for the model. Travels with the model (logged to MLflow).

    Attributes:
        strategy: ``"uniform"`` or ``"motion"``.
        frames_per_clip: Frames given to the model per clip. Qwen2.5-VL groups frames in temporal pairs, so even
            numbers waste nothing.
        max_pixels: Upper bound on height*width of each frame after resizing (keeps aspect ratio).
        min_pixels: Lower bound; frames smaller than this are upscaled to it (the processor would otherwise do so
            silently with its own, much larger default).
        size_multiple: Height and width are rounded to a multiple of this (Qwen2.5-VL: patch 14 x merge 2 = 28).
        motion_stride: Spatial subsampling of the grayscale frames used for motion scores (speed, not quality).
    """

    strategy: SamplingStrategy = "uniform"
    frames_per_clip: int = 8
    max_pixels: int = 224 * 224
    min_pixels: int = 56 * 56
    size_multiple: int = 28
    motion_stride: int = 4

    def __post_init__(self) -> None:
        check_choices(self, "SamplingSpec.")
        if self.frames_per_clip < 2:
            raise ValueError(f"SamplingSpec.frames_per_clip must be >= 2, got {self.frames_per_clip}")
        if self.size_multiple < 1 or self.motion_stride < 1:
            raise ValueError("SamplingSpec.size_multiple and motion_stride must be >= 1")
        if not self.size_multiple**2 <= self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"SamplingSpec needs size_multiple^2 <= min_pixels <= max_pixels, got "
                f"{self.size_multiple}^2, {self.min_pixels}, {self.max_pixels}"
            )

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Frame size ``(height, width)`` for a source of ``height x width``: aspect kept, pixel count within
        [min_pixels, max_pixels], both sides multiples of ``size_multiple`` (Qwen2-VL's ``smart_resize`` rule)."""
        if height <= 0 or width <= 0:
            raise ValueError(f"frame size must be positive, got {height}x{width}")
        m = self.size_multiple
        h = max(m, round(height / m) * m)
        w = max(m, round(width / m) * m)
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = max(m, math.floor(height / beta / m) * m)
            w = max(m, math.floor(width / beta / m) * m)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / m) * m
            w = math.ceil(width * beta / m) * m
        return h, w

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SamplingSpec:
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"SamplingSpec: unknown field(s) {sorted(unknown)}")
        return cls(**data)


def uniform_indices(num_frames: int, budget: int) -> np.ndarray:
    """Evenly spaced frame indices covering the clip, first and last included.

    Args:
        num_frames: Frames in the clip (T >= 1).
        budget: Frames to return (K >= 1).

    Returns:
        int64[K] indices in [0, T), non-decreasing. When T < K frames repeat (the model always gets K frames).
    """
    if num_frames < 1 or budget < 1:
        raise ValueError(f"need num_frames >= 1 and budget >= 1, got {num_frames}, {budget}")
    return np.round(np.linspace(0, num_frames - 1, budget)).astype(np.int64)


def frame_motion(gray: np.ndarray) -> np.ndarray:
    """Motion score per frame: mean absolute grayscale difference to the previous frame.

    Args:
        gray: uint8[T, H, W] grayscale frames (any spatial subsampling).

    Returns:
        float32[T]; element 0 is 0 (no previous frame inside the input).
    """
    if gray.ndim != 3:
        raise ValueError(f"gray must be [T, H, W], got shape {gray.shape}")
    motion = np.zeros(len(gray), dtype=np.float32)
    if len(gray) > 1:
        diffs = np.abs(gray[1:].astype(np.int16) - gray[:-1].astype(np.int16))
        motion[1:] = diffs.reshape(len(gray) - 1, -1).mean(axis=1)
    return motion


def to_gray(frames: np.ndarray, stride: int = 1) -> np.ndarray:
    """ITU-R 601 luma of RGB frames, subsampled by ``stride`` in both spatial axes.

    Args:
        frames: uint8[T, H, W, 3].
        stride: Keep every ``stride``-th row and column.

    Returns:
        uint8[T, ceil(H/stride), ceil(W/stride)].
    """
    small = frames[:, ::stride, ::stride].astype(np.float32)
    return (small @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).round().astype(np.uint8)


def motion_indices(motion: np.ndarray, budget: int) -> np.ndarray:
    """Motion-adaptive frame choice: keep first and last, fill the budget with the highest-motion frames.

    Ties are broken by the earlier frame so the result is deterministic.

    Args:
        motion: float[T] motion score per frame of the clip (``motion[t]`` = change from frame t-1 to t;
            ``motion[0]`` is ignored since frame 0 is always kept).
        budget: Frames to return (K >= 2).

    Returns:
        int64[K] strictly increasing indices when T >= K; when T < K all frames are used and the clip is padded
        to K by ``uniform_indices``.
    """
    num_frames = len(motion)
    if budget < 2:
        raise ValueError(f"motion sampling needs budget >= 2, got {budget}")
    if num_frames <= budget:
        return uniform_indices(num_frames, budget)
    inner = np.asarray(motion[1:-1], dtype=np.float64)
    # stable sort on -motion: equal scores keep time order, so the earlier frame wins a tie
    chosen = np.argsort(-inner, kind="stable")[: budget - 2] + 1
    return np.sort(np.concatenate(([0], chosen, [num_frames - 1]))).astype(np.int64)


def sample_indices(spec: SamplingSpec, num_frames: int, motion: np.ndarray | None = None) -> np.ndarray:
    """Frame indices of a clip of ``num_frames`` frames under ``spec``.

    Args:
        spec: The sampling spec.
        num_frames: Frames in the clip (T).
        motion: float[T] motion scores, required for the ``motion`` strategy (see :func:`frame_motion`).

    Returns:
        int64[spec.frames_per_clip] indices into the clip, in time order.
    """
    if spec.strategy == "uniform":
        return uniform_indices(num_frames, spec.frames_per_clip)
    if motion is None or len(motion) != num_frames:
        raise ValueError(f"motion sampling needs motion scores for all {num_frames} frames")
    return motion_indices(motion, spec.frames_per_clip)


def sample_clip(
    spec: SamplingSpec, frame_times_s: np.ndarray, motion: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices and their timestamps for one clip.

    Args:
        spec: The sampling spec.
        frame_times_s: float[T] timestamps of the clip's frames (any origin; returned as given).
        motion: float[T] motion scores, for the ``motion`` strategy.

    Returns:
        ``(indices int64[K], timestamps float64[K])`` with K = ``spec.frames_per_clip``.
    """
    indices = sample_indices(spec, len(frame_times_s), motion)
    return indices, np.asarray(frame_times_s, dtype=np.float64)[indices]
