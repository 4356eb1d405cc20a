"""What a model sees of one video clip: the sampled frames, their times and the clip's length. Pure.

Every task whose media is ``video`` takes a :class:`ClipInput` per example, so the video endpoints of the Serve app
and the whole-recording annotator build it without knowing which task the served model has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ClipInput"]


@dataclass
class ClipInput:
    """One clip to predict on.

    Attributes:
        frames: uint8[K, H, W, 3] frames already sampled with the model's SamplingSpec.
        frame_times_s: float[K] their clip-relative times.
        clip_length_s: Clip length in seconds.
    """

    frames: np.ndarray
    frame_times_s: Sequence[float]
    clip_length_s: float
