"""Synthetic warehouse packing sessions written in the real OpenPack layout.

OpenPack's RGB stream is access-restricted, so the platform ships this generator: it writes sessions exactly where
and how ``openpack`` reads real ones (an operations CSV in the real schema, one H.264 MP4 per session and,
optionally, the JPEG frames of the real RGB layout). Three parts:

* **Timeline** (:func:`generate_timeline`): per box OpenPack's procedure
  ``100 → 200 → 300 → 400 → 500 → 600 → 700 → 1000 → 800`` with ``900`` appended for about a quarter of boxes, plus
  the variation seen in real annotations (rare skips, back-and-forth repeats such as ``100, 200, 100, 200``,
  un-annotated Null gaps between rows). Durations are lognormal around the per-operation means/stds measured on
  ``U0209/S0500``, clipped to the measured min/max.
* **Rendering** (:func:`render_session`): a top-down packing bench drawn with numpy slicing. Every operation leaves
  its own visual evidence and motion (a hand at the shelf, a label on a sheet, a folding blank, items dropping into the
  box, closing flaps, a label on the box side, a blinking red scanner beam, a big label on the box top, the box sliding
  to the back table, a pen writing lines on the order sheet). Box state persists within a box and resets for the next
  one, so the scene tells which operations are done and which comes next.
* **Nuisances and styles** (:func:`subject_style`): worker/bench/floor colours and the camera pose (zoom, shift,
  rotation, shear) come from the subject id and seed, so held-out subjects look different; every frame also gets slow
  lighting drift, sensor noise, camera shake and, occasionally, something passing in front of the camera.
* **Writing** (:func:`generate_dataset` / :func:`generate_session` with a :class:`GeneratorConfig`; CLI recipe in
  ``jobs/generate_data.py``): CSV via ``write_operations_csv``, MP4 via PyAV/libx264 (yuv420p, default settings).
  Rendering costs well under a millisecond per 224×224 frame; H.264 encoding is most of the time.

Everything is deterministic for a given seed: the CSV bytes and the rendered frames depend only on the seed, the
subject/session ids and the settings (not on how many other sessions are generated).
"""

from __future__ import annotations

import colorsys
import dataclasses
import datetime as dt
import math
import re
import shutil
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from opsvlm.tasks.operations.data.openpack import (
    Segment,
    SessionSource,
    SessionTimeline,
    annotation_path,
    frame_name,
    frames_dir,
    video_path,
    write_operations_csv,
)
from opsvlm.tasks.operations.labels import NULL, OPTIONAL_IDS, PROCEDURE, operation_by_id
from opsvlm.video.encode import write_video

__all__ = [
    "BASE_ORIGIN",
    "BOX_PROCEDURE",
    "DEFAULT_BOXES_PER_SESSION",
    "MAX_FRAME_SIDE",
    "MIN_SEGMENT_S",
    "OPERATION_DURATIONS",
    "ORDER_LINES_PER_ROW",
    "ORDER_LINES_PER_SHEET",
    "REPEAT_PAIRS",
    "RGB",
    "SKIPPABLE_IDS",
    "DatasetSummary",
    "DurationStats",
    "GeneratorConfig",
    "ProcedureVariation",
    "SubjectStyle",
    "frame_labels",
    "generate_box_operations",
    "generate_dataset",
    "generate_session",
    "generate_timeline",
    "num_frames",
    "render_session",
    "session_ids",
    "session_origin",
    "subject_ids",
    "subject_style",
    "summarize",
]

# --------------------------------------------------------------------------------------------------------------------
# Timeline
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DurationStats:
    """Duration distribution of one operation, in seconds (mean/std of a lognormal, clipped to [min_s, max_s])."""

    mean_s: float
    std_s: float
    min_s: float
    max_s: float


# Measured on the real annotation U0209/S0500 (20 boxes).
OPERATION_DURATIONS: dict[int, DurationStats] = {
    100: DurationStats(6.9, 2.5, 1.6, 11.3),
    200: DurationStats(8.9, 6.1, 3.1, 25.7),
    300: DurationStats(10.5, 4.1, 1.9, 16.4),
    400: DurationStats(5.3, 2.3, 1.8, 10.4),
    500: DurationStats(8.9, 1.7, 5.0, 11.9),
    600: DurationStats(3.1, 0.9, 2.0, 5.7),
    700: DurationStats(9.9, 1.7, 7.5, 13.3),
    800: DurationStats(6.3, 1.2, 4.1, 8.9),
    900: DurationStats(4.0, 1.9, 2.7, 7.8),
    1000: DurationStats(5.8, 2.3, 3.4, 12.0),
}
# The per-box procedure without the optional "Put on Back Table": 100, 200, 300, 400, 500, 600, 700, 1000, 800.
BOX_PROCEDURE: tuple[int, ...] = tuple(op for op in PROCEDURE if op not in OPTIONAL_IDS)
# Back-and-forth repeats seen in real annotations (e.g. 100, 200, 100, 200).
REPEAT_PAIRS: tuple[tuple[int, int], ...] = ((100, 200), (300, 400), (400, 500))
# Operations a worker occasionally leaves out; boxes always start with 100 and are always assembled and labelled.
SKIPPABLE_IDS: tuple[int, ...] = (200, 600, 1000)
DEFAULT_BOXES_PER_SESSION = 20
# Shortest row ever generated: every row then spans several frames even at low frame rates.
MIN_SEGMENT_S = 1.0
# Session origins: a fixed day, Japan time (+09:00), shifted per subject (days) and per session (hours).
BASE_ORIGIN = dt.datetime(2022, 4, 4, 9, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=9)))

_SUBJECT_RE = re.compile(r"^U\d{4}$")
_SESSION_RE = re.compile(r"^S\d{4}$")


@dataclass(frozen=True)
class ProcedureVariation:
    """How far generated boxes stray from OpenPack's standard procedure.

    Attributes:
        p_put_on_back_table: Probability that a box ends with ``900 Put on Back Table`` (real data: about 1/4).
        p_repeat: Probability that a box contains one back-and-forth repeat of a pair from ``REPEAT_PAIRS``.
        p_skip: Probability that a box leaves out one operation from ``SKIPPABLE_IDS`` (rare).
        p_gap: Probability of an un-annotated (Null) gap between two consecutive rows.
        gap_s: (min, max) length of such a gap, seconds (uniform).
        repeat_duration_scale: Duration factor for rows of a repeated pair (each occurrence does part of the work).
    """

    p_put_on_back_table: float = 0.25
    p_repeat: float = 0.15
    p_skip: float = 0.03
    p_gap: float = 0.07
    gap_s: tuple[float, float] = (1.0, 4.0)
    repeat_duration_scale: float = 0.6

    def __post_init__(self) -> None:
        for name in ("p_put_on_back_table", "p_repeat", "p_skip", "p_gap"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ProcedureVariation.{name} must be a probability in [0, 1], got {value!r}")
        low, high = self.gap_s
        if not 0.0 < low <= high:
            raise ValueError(
                f"ProcedureVariation.gap_s must be (min, max) seconds with 0 < min <= max, got {self.gap_s}"
            )
        if not 0.0 < self.repeat_duration_scale <= 1.0:
            raise ValueError(
                f"ProcedureVariation.repeat_duration_scale must be in (0, 1], got {self.repeat_duration_scale!r}"
            )


def subject_ids(count: int) -> tuple[str, ...]:
    """OpenPack-style worker ids ``U0101, U0102, ...``."""
    return tuple(f"U{101 + i:04d}" for i in range(count))


def session_ids(count: int) -> tuple[str, ...]:
    """OpenPack-style session ids ``S0100, S0200, ...``."""
    return tuple(f"S{100 * (i + 1):04d}" for i in range(count))


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """An independent random stream for (seed, keys); keys name the subject/session and the purpose."""
    return np.random.default_rng(np.random.SeedSequence([seed, *(zlib.crc32(k.encode()) for k in keys)]))


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def session_origin(subject: str, session: str) -> dt.datetime:
    """The fixed, timezone-aware (+09:00) start time of a synthetic session.

    Subjects are a day apart and sessions an hour apart (from the digits of their ids); a millisecond offset derived
    from the ids keeps frame names from all landing on whole seconds, as in real recordings.
    """
    subject_number = int(re.sub(r"\D", "", subject) or 0)
    session_number = int(re.sub(r"\D", "", session) or 0)
    millis = zlib.crc32(f"{subject}/{session}".encode()) % 60_000
    return BASE_ORIGIN + dt.timedelta(
        days=subject_number % 1000, hours=(session_number // 100) % 12, milliseconds=millis
    )


def _draw_duration_ms(rng: np.random.Generator, stats: DurationStats, scale: float = 1.0) -> int:
    """A lognormal duration with the given mean/std (times ``scale``), clipped and rounded to milliseconds."""
    sigma2 = math.log1p((stats.std_s / stats.mean_s) ** 2)
    mu = math.log(stats.mean_s) - sigma2 / 2.0
    seconds = float(rng.lognormal(mu, math.sqrt(sigma2))) * scale
    seconds = min(max(seconds, stats.min_s * scale, MIN_SEGMENT_S), max(stats.max_s * scale, MIN_SEGMENT_S))
    return round(seconds * 1000.0)


def generate_box_operations(rng: np.random.Generator, variation: ProcedureVariation) -> list[tuple[int, bool]]:
    """The operation sequence of one box.

    Args:
        rng: Random stream (advanced).
        variation: Probabilities of skips, repeats and ``900``.

    Returns:
        ``[(op_id, is_repeat_part), ...]`` in order; ``is_repeat_part`` marks rows of a back-and-forth repeat.
    """
    ops = list(BOX_PROCEDURE)
    if rng.random() < variation.p_skip:
        ops.remove(int(rng.choice(SKIPPABLE_IDS)))
    repeated = [False] * len(ops)
    if rng.random() < variation.p_repeat:
        first, second = REPEAT_PAIRS[int(rng.integers(len(REPEAT_PAIRS)))]
        if first in ops and second in ops and ops.index(second) == ops.index(first) + 1:
            i = ops.index(first)
            ops[i : i + 2] = [first, second, first, second]
            repeated[i : i + 2] = [True] * 4
    if rng.random() < variation.p_put_on_back_table:
        ops.append(900)
        repeated.append(False)
    return list(zip(ops, repeated, strict=True))


def generate_timeline(
    subject: str,
    session: str,
    *,
    seed: int = 0,
    boxes: int | None = None,
    duration_s: float | None = None,
    variation: ProcedureVariation | None = None,
    origin: dt.datetime | None = None,
) -> SessionTimeline:
    """Generate one session's annotation: whole boxes of OpenPack operations, times in whole milliseconds.

    Args:
        subject: Worker id, e.g. ``U0101``.
        session: Session id, e.g. ``S0100``.
        seed: Non-negative seed; the result depends only on (seed, subject, session, boxes/duration, variation).
        boxes: Number of boxes to pack. Give at most one of ``boxes`` and ``duration_s``; with neither,
            ``DEFAULT_BOXES_PER_SESSION`` boxes.
        duration_s: Minimum session length; whole boxes are added until the last row ends at or after it.
        variation: Procedure variation (defaults to ``ProcedureVariation()``).
        origin: Absolute time of t = 0, timezone-aware (defaults to :func:`session_origin`).

    Returns:
        The timeline; its first row starts at t = 0 and boxes are numbered from 1. Time between rows is Null.

    Raises:
        ValueError: for a bad seed, both or invalid ``boxes``/``duration_s``, or a naive ``origin``.
    """
    _check_seed(seed)
    if boxes is not None and duration_s is not None:
        raise ValueError("give at most one of boxes and duration_s")
    if boxes is None and duration_s is None:
        boxes = DEFAULT_BOXES_PER_SESSION
    if boxes is not None and (isinstance(boxes, bool) or not isinstance(boxes, int) or boxes < 1):
        raise ValueError(f"boxes must be a positive integer, got {boxes!r}")
    if duration_s is not None and not (isinstance(duration_s, (int, float)) and duration_s > 0):
        raise ValueError(f"duration_s must be a positive number of seconds, got {duration_s!r}")
    if origin is None:
        origin = session_origin(subject, session)
    elif origin.tzinfo is None:
        raise ValueError("origin must be timezone-aware (OpenPack times carry a UTC offset)")
    variation = variation or ProcedureVariation()
    rng = _rng(seed, subject, session, "timeline")
    gap_lo_ms, gap_hi_ms = round(variation.gap_s[0] * 1000), round(variation.gap_s[1] * 1000)
    target_ms = None if duration_s is None else math.ceil(duration_s * 1000)

    segments: list[Segment] = []
    now_ms = 0
    box = 0
    while (boxes is not None and box < boxes) or (target_ms is not None and now_ms < target_ms):
        box += 1
        for op_id, is_repeat_part in generate_box_operations(rng, variation):
            if segments and rng.random() < variation.p_gap:
                now_ms += int(rng.integers(gap_lo_ms, gap_hi_ms + 1))
            scale = variation.repeat_duration_scale if is_repeat_part else 1.0
            length_ms = _draw_duration_ms(rng, OPERATION_DURATIONS[op_id], scale)
            segments.append(Segment(op_id, now_ms / 1000.0, (now_ms + length_ms) / 1000.0, box))
            now_ms += length_ms
    return SessionTimeline(subject, session, origin, tuple(segments))


def num_frames(duration_s: float, fps: float) -> int:
    """Frames of a video that starts at t = 0 and covers ``[0, duration_s)``: frame i is captured at ``i / fps``."""
    return max(1, math.ceil(duration_s * fps - 1e-6))


def frame_labels(timeline: SessionTimeline, fps: float, count: int | None = None) -> np.ndarray:
    """The operation id at each frame's capture time (Null between rows).

    Args:
        timeline: The session.
        fps: Frame rate; frame i is at ``i / fps`` seconds.
        count: Number of frames (defaults to :func:`num_frames` of the timeline).

    Returns:
        labels: int64[count] operation ids.
    """
    count = num_frames(timeline.duration_s, fps) if count is None else count
    times = np.arange(count) / fps
    starts = np.array([s.start_s for s in timeline.segments])
    ends = np.array([s.end_s for s in timeline.segments])
    ops = np.array([s.op_id for s in timeline.segments], dtype=np.int64)
    index = np.searchsorted(starts, times, side="right") - 1
    inside = (index >= 0) & (times < ends[np.clip(index, 0, None)])
    return np.where(inside, ops[np.clip(index, 0, None)], NULL.id)


# --------------------------------------------------------------------------------------------------------------------
# Subject styles
# --------------------------------------------------------------------------------------------------------------------

RGB = tuple[int, int, int]

_SKIN_TONES: tuple[RGB, ...] = ((241, 194, 167), (224, 172, 138), (198, 134, 94), (161, 102, 66), (112, 72, 48))
_HAIR_COLOURS: tuple[RGB, ...] = ((30, 24, 20), (58, 40, 28), (95, 70, 45), (40, 40, 45), (150, 120, 80))
# Benches are kept away from cardboard brown so the box stays visible on every style.
_BENCH_COLOURS: tuple[RGB, ...] = ((200, 202, 205), (226, 226, 218), (176, 192, 204), (190, 206, 186), (214, 200, 170))
_FLOOR_COLOURS: tuple[RGB, ...] = ((92, 96, 100), (120, 112, 100), (70, 94, 84), (104, 104, 124), (140, 138, 132))
_TABLE_COLOURS: tuple[RGB, ...] = ((150, 152, 158), (120, 130, 150), (160, 140, 120), (100, 120, 110))
_SHELF_COLOURS: tuple[RGB, ...] = ((70, 90, 140), (140, 70, 60), (80, 80, 84), (60, 120, 90))


@dataclass(frozen=True)
class SubjectStyle:
    """The look of one worker's recordings: colours, camera pose and nuisance strengths.

    Attributes:
        subject: Worker id the style was derived from.
        skin, hair, clothing, cardboard, bench, floor, back_table, shelf: RGB colours.
        short_sleeves: Forearms drawn in skin colour (else in the clothing colour).
        camera_zoom: Magnification of the camera (>1 zooms in).
        camera_shift: (x, y) shift of the camera centre, fraction of the frame size.
        camera_rotation_deg: In-plane camera rotation.
        camera_shear: Horizontal shear of the camera mapping (a slight perspective stand-in).
        white_balance: Per-channel RGB gain.
        light_drift: Amplitude of the slow lighting gain drift (fraction).
        light_period_s: Period of the slow lighting drift.
        noise_sigma: Standard deviation of the sensor noise, in 8-bit levels.
        shake_px: Typical jitter while the camera shakes, pixels (at 224 px frame height).
        shake_bursts_per_min: Mean rate of short camera-shake bursts (the bench gets bumped).
        occlusions_per_min: Mean rate of something passing in front of the camera.
    """

    subject: str
    skin: RGB
    hair: RGB
    clothing: RGB
    cardboard: RGB
    bench: RGB
    floor: RGB
    back_table: RGB
    shelf: RGB
    short_sleeves: bool
    camera_zoom: float
    camera_shift: tuple[float, float]
    camera_rotation_deg: float
    camera_shear: float
    white_balance: tuple[float, float, float]
    light_drift: float
    light_period_s: float
    noise_sigma: float
    shake_px: float
    shake_bursts_per_min: float
    occlusions_per_min: float


def _jitter(rng: np.random.Generator, colour: RGB, amount: int) -> RGB:
    r, g, b = (int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)
    return (r, g, b)


def _pick(rng: np.random.Generator, options: Sequence[RGB]) -> RGB:
    return options[int(rng.integers(len(options)))]


def subject_style(subject: str, seed: int = 0) -> SubjectStyle:
    """The deterministic style of one worker for one seed.

    Args:
        subject: Worker id (any string; ``U0101``-style in generated datasets).
        seed: Dataset seed; the same subject gets a different look under a different seed.

    Returns:
        The style used for every session of that subject.
    """
    _check_seed(seed)
    rng = _rng(seed, subject, "style")
    hue = float(rng.random())
    clothing_rgb = colorsys.hsv_to_rgb(hue, float(rng.uniform(0.35, 0.85)), float(rng.uniform(0.35, 0.85)))
    return SubjectStyle(
        subject=subject,
        skin=_jitter(rng, _pick(rng, _SKIN_TONES), 8),
        hair=_jitter(rng, _pick(rng, _HAIR_COLOURS), 6),
        clothing=(int(clothing_rgb[0] * 255), int(clothing_rgb[1] * 255), int(clothing_rgb[2] * 255)),
        cardboard=_jitter(rng, (178, 134, 84), 10),
        bench=_jitter(rng, _pick(rng, _BENCH_COLOURS), 8),
        floor=_jitter(rng, _pick(rng, _FLOOR_COLOURS), 10),
        back_table=_jitter(rng, _pick(rng, _TABLE_COLOURS), 8),
        shelf=_jitter(rng, _pick(rng, _SHELF_COLOURS), 10),
        short_sleeves=bool(rng.random() < 0.5),
        camera_zoom=float(rng.uniform(0.93, 1.1)),
        camera_shift=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
        camera_rotation_deg=float(rng.uniform(-4.0, 4.0)),
        camera_shear=float(rng.uniform(-0.06, 0.06)),
        white_balance=(float(rng.uniform(0.94, 1.06)), 1.0, float(rng.uniform(0.94, 1.06))),
        light_drift=float(rng.uniform(0.03, 0.08)),
        light_period_s=float(rng.uniform(60.0, 240.0)),
        noise_sigma=float(rng.uniform(0.5, 1.2)),
        shake_px=float(rng.uniform(0.8, 2.0)),
        shake_bursts_per_min=float(rng.uniform(1.0, 3.0)),
        occlusions_per_min=float(rng.uniform(0.5, 1.5)),
    )


# --------------------------------------------------------------------------------------------------------------------
# Drawing primitives on a packed canvas: uint32[H, W], one little-endian RGBA word per pixel, so filling a shape is
# one store per pixel (masked stores into 3-channel arrays are several times slower). Colours are packed uint32.
# --------------------------------------------------------------------------------------------------------------------

MAX_FRAME_SIDE = 2048
_CANVAS_DTYPE = np.dtype("<u4")
# Pixel-centre coordinates shared by every shape mask (slicing this is far cheaper than np.ogrid per shape).
_COORDS = np.arange(2 * MAX_FRAME_SIDE, dtype=np.float32)


def _shade(rgb: RGB, factor: float) -> RGB:
    r, g, b = (int(np.clip(c * factor, 0, 255)) for c in rgb)
    return (r, g, b)


def _mix(a: RGB, b: RGB, w: float) -> RGB:
    r, g, bl = (round(x + (y - x) * w) for x, y in zip(a, b, strict=True))
    return (r, g, bl)


def _rect(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, colour: np.ndarray) -> None:
    """Fill the axis-aligned box [x0, x1) × [y0, y1) (float corners, clipped to the canvas)."""
    height, width = img.shape
    xa, xb = max(round(x0), 0), min(round(x1), width)
    ya, yb = max(round(y0), 0), min(round(y1), height)
    if xa < xb and ya < yb:
        img[ya:yb, xa:xb] = colour


def _ellipse(img: np.ndarray, cx: float, cy: float, rx: float, ry: float, colour: np.ndarray) -> None:
    """Fill an axis-aligned ellipse (a disc when rx == ry)."""
    height, width = img.shape
    xa, xb = max(int(cx - rx), 0), min(int(cx + rx) + 2, width)
    ya, yb = max(int(cy - ry), 0), min(int(cy + ry) + 2, height)
    if xa >= xb or ya >= yb:
        return
    dx = (_COORDS[xa:xb] - cx) * (1.0 / max(rx, 0.5))
    dy = (_COORDS[ya:yb] - cy) * (1.0 / max(ry, 0.5))
    inside = dy[:, None] ** 2 + dx[None, :] ** 2 <= 1.0
    img[ya:yb, xa:xb][inside] = colour


def _capsule(
    img: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], radius: float, colour: np.ndarray
) -> None:
    """Fill all pixels within ``radius`` of the segment p0–p1 (a thick line with round ends)."""
    height, width = img.shape
    (x0, y0), (x1, y1) = p0, p1
    xa, xb = max(int(min(x0, x1) - radius), 0), min(int(max(x0, x1) + radius) + 2, width)
    ya, yb = max(int(min(y0, y1) - radius), 0), min(int(max(y0, y1) + radius) + 2, height)
    if xa >= xb or ya >= yb:
        return
    dx, dy = x1 - x0, y1 - y0
    length = math.hypot(dx, dy)
    ux, uy = (dx / length, dy / length) if length > 1e-6 else (1.0, 0.0)
    xs, ys = _COORDS[xa:xb] - x0, _COORDS[ya:yb] - y0
    along = np.add.outer(ys * uy, xs * ux)  # position along the segment, from p0
    across = np.subtract.outer(ys * ux, xs * uy)  # distance from the segment's line (signed)
    # Distance beyond the nearer end (0 alongside the segment): |along - L/2| - L/2, floored at 0.
    along -= length / 2
    np.abs(along, out=along)
    along -= length / 2
    np.maximum(along, 0.0, out=along)
    along *= along
    across *= across
    across += along
    img[ya:yb, xa:xb][across <= radius * radius] = colour


def _ease(x: float) -> float:
    """Smoothstep on [0, 1] (clipped): motions start and stop gently."""
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


def _lerp(a: tuple[float, float], b: tuple[float, float], w: float) -> tuple[float, float]:
    return (a[0] + (b[0] - a[0]) * w, a[1] + (b[1] - a[1]) * w)


def _along(points: Sequence[tuple[float, float]], knots: Sequence[float], q: float) -> tuple[float, float]:
    """Position on a keyframed path at phase q in [0, 1]; eased between keyframes ``points`` at times ``knots``."""
    for i in range(1, len(knots)):
        if q <= knots[i]:
            span = max(knots[i] - knots[i - 1], 1e-9)
            return _lerp(points[i - 1], points[i], _ease((q - knots[i - 1]) / span))
    return points[-1]


def _trip(p: float, trips: int) -> tuple[int, float]:
    """Split progress p in [0, 1] into (trip index, phase within that trip) for ``trips`` equal back-and-forths."""
    k = min(int(p * trips), trips - 1)
    return k, p * trips - k


# --------------------------------------------------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------------------------------------------------


class _Layout:
    """Where things are on the bench, in world pixels (the central W×H region of the world canvas plus margins)."""

    def __init__(self, width: int, height: int, margin: int) -> None:
        self.width, self.height, self.margin = width, height, margin
        self.unit = float(min(width, height))
        u = self.unit
        at = self.at
        self.rest_left, self.rest_right = at(0.40, 0.77), at(0.60, 0.77)
        self.shoulder_left, self.shoulder_right = at(0.35, 0.93), at(0.65, 0.93)
        self.head = at(0.50, 0.93)
        self.bins = (at(0.08, 0.30), at(0.08, 0.50), at(0.08, 0.70))
        self.item_slots = tuple(at(0.245 + 0.07 * (i % 2), 0.40 + 0.065 * (i // 2)) for i in range(6))
        self.sheet_box = (*at(0.22, 0.60), *at(0.35, 0.73))
        self.sheet_slots = tuple(at(0.25 + 0.05 * (i % 2), 0.63 + 0.035 * (i // 2)) for i in range(6))
        self.box_on_bench, self.box_on_back_table = at(0.55, 0.48), at(0.55, 0.09)
        self.blank_stack = at(0.87, 0.31)
        self.printer = (*at(0.62, 0.26), *at(0.74, 0.34))
        self.printer_slot = at(0.68, 0.35)
        self.scanner_rest = at(0.88, 0.47)
        self.order_sheet = (*at(0.75, 0.56), *at(0.92, 0.78))
        self.pen_rest = (at(0.945, 0.58), at(0.945, 0.72))
        self.box_side = 0.20 * u
        self.box_front = 0.07 * u
        self.wall_length = 0.085 * u
        self.flap_length = 0.07 * u
        self.item_size = 0.05 * u
        self.hand_radius = 0.028 * u
        self.arm_radius = 0.033 * u

    def at(self, fx: float, fy: float) -> tuple[float, float]:
        """World pixel position of a point given as fractions of the frame's width and height."""
        return (self.margin + fx * self.width, self.margin + fy * self.height)

    def order_line(self, k: int) -> tuple[float, float, float]:
        """(x_start, x_end, y) of the k-th written line on the order sheet."""
        x0, y0, x1, _ = self.order_sheet
        return (x0 + 0.12 * (x1 - x0), x1 - 0.1 * (x1 - x0), y0 + 0.012 * self.unit + (k + 1) * 0.033 * self.unit)


ORDER_LINES_PER_SHEET = 5
ORDER_LINES_PER_ROW = 4
_ITEM_PALETTE: tuple[RGB, ...] = (
    (220, 60, 60),
    (60, 140, 220),
    (240, 200, 40),
    (60, 180, 90),
    (150, 80, 200),
    (240, 130, 40),
    (30, 170, 170),
    (230, 90, 160),
)


@dataclass
class _BoxState:
    """What the scene shows about the current box (persists between frames, resets with the next box)."""

    box: int | None = None
    item_colours: tuple[np.ndarray, ...] = ()
    first_pick: int = 2  # items fetched by the box's first Picking
    picked: int = 0  # items fetched from the shelf so far; item g lies in staging slot g % 6 until inserted
    labels_moved: int = 0  # items (from the first) whose label is already on the label sheet
    items_in_box: int = 0
    box_present: bool = False
    blank_pos: float = 1.0  # 0 on the blank stack ... 1 in place on the bench
    fold: float = 0.0  # 0 flat blank ... 1 walls up
    lid: float = 0.0  # 0 flaps open outwards ... 1 closed and taped
    box_label: bool = False
    order_lines: float = 0.0  # written lines; the fraction is the line being written
    shipping_label: bool = False
    to_back: float = 0.0  # 0 on the bench ... 1 on the back table


@dataclass
class _Pose:
    """Per-frame transient things: hands and whatever they carry."""

    left: tuple[float, float]
    right: tuple[float, float]
    carried: list[tuple[str, tuple[float, float], np.ndarray]] = field(default_factory=list)
    scanner: tuple[float, float] | None = None
    beam_to: tuple[float, float] | None = None
    pen: tuple[float, float] | None = None


class _Scene:
    """Draws frames of one subject's bench: a static background plus box state and a pose per frame."""

    def __init__(self, style: SubjectStyle, width: int, height: int) -> None:
        self.style = style
        # The margin lets the camera rotate/zoom out/shake without running off the world canvas.
        self.margin = math.ceil(0.16 * max(width, height)) + 4
        self.layout = _Layout(width, height, self.margin)
        self.world_shape = (height + 2 * self.margin, width + 2 * self.margin)
        s = style
        self._white_balance = np.array(style.white_balance)
        # Every colour handed out is a live 0-d array; set_lighting() rewrites them all in place, so boxes, items and
        # poses holding a colour are re-lit without knowing about lighting.
        self._colours: list[tuple[np.ndarray, np.ndarray]] = []
        self.c_skin, self.c_hair = self.colour(s.skin), self.colour(s.hair)
        self.c_cloth, self.c_sleeve = (
            self.colour(s.clothing),
            self.colour(s.skin if s.short_sleeves else _shade(s.clothing, 0.85)),
        )
        self.c_card, self.c_card_light = self.colour(s.cardboard), self.colour(_shade(s.cardboard, 1.12))
        self.c_card_dark, self.c_card_inside = (
            self.colour(_shade(s.cardboard, 0.72)),
            self.colour(_shade(s.cardboard, 0.42)),
        )
        self.c_card_flap = self.colour(_shade(s.cardboard, 1.05))
        self.c_tape = self.colour((214, 190, 140))
        self.c_white = self.colour((246, 246, 240))
        self.c_ink, self.c_box_label = self.colour((25, 25, 35)), self.colour((255, 226, 70))
        self.c_scanner, self.c_beam = self.colour((45, 45, 50)), self.colour((255, 20, 20))
        self.c_pen = self.colour((20, 40, 160))
        inside = _shade(s.cardboard, 0.42)
        self.c_folding = tuple(self.colour(_mix(s.cardboard, inside, k / 7)) for k in range(8))
        self.item_palette = tuple(self.colour(c) for c in _ITEM_PALETTE)
        self.background = self._draw_background()
        self.lit_background = self.background

    def colour(self, rgb: Sequence[float]) -> np.ndarray:
        """A live colour of this subject's canvas (white balance applied, re-lit by ``set_lighting``).

        Returns:
            colour: 0-d uint32 array holding the packed RGBA word (updated in place by ``set_lighting``).
        """
        base = self._unlit(rgb)
        live = np.array(base, dtype=_CANVAS_DTYPE)
        self._colours.append((np.array([base], dtype=_CANVAS_DTYPE).view(np.uint8), live))
        return live

    def _unlit(self, rgb: Sequence[float]) -> np.uint32:
        """A packed colour for the static background (lit with the whole background by ``set_lighting``)."""
        r, g, b = (int(c) for c in np.clip(np.rint(np.asarray(rgb, dtype=np.float64) * self._white_balance), 0, 255))
        return np.uint32(r | (g << 8) | (b << 16) | (0xFF << 24))

    def set_lighting(self, table: np.ndarray) -> None:
        """Apply a lighting lookup table (uint8[256]: unlit level -> lit level) to the background and all colours."""
        self.lit_background = table.take(self.background.view(np.uint8)).view(_CANVAS_DTYPE)
        for base_bytes, live in self._colours:
            live[...] = table.take(base_bytes).view(_CANVAS_DTYPE)[0]

    def _draw_background(self) -> np.ndarray:
        """The static part of the scene: floor, back table, shelf with stock, bench, printer, blank stack, torso."""
        s, lay, u = self.style, self.layout, self.layout.unit
        rng = _rng(0, s.subject, "background")
        img = np.empty(self.world_shape, dtype=_CANVAS_DTYPE)
        img[:] = self._unlit(s.floor)
        # Floor tiles: faint texture so camera shake is visible everywhere.
        tile = max(int(0.125 * u), 4)
        floor_alt = self._unlit(_shade(s.floor, 1.06))
        for ty in range(0, img.shape[0], tile):
            for tx in range((ty // tile) % 2 * tile, img.shape[1], 2 * tile):
                img[ty : ty + tile, tx : tx + tile] = floor_alt
        # Back table (top strip) with an edge.
        x0, y0 = lay.at(0.20, -0.2)
        x1, y1 = lay.at(0.94, 0.18)
        _rect(img, x0, y0, x1, y1, self._unlit(s.back_table))
        _rect(img, x0, y1 - 0.012 * u, x1, y1, self._unlit(_shade(s.back_table, 0.7)))
        # Shelf with three bins of stock.
        x0, y0 = lay.at(-0.2, 0.20)
        x1, y1 = lay.at(0.165, 0.80)
        _rect(img, x0, y0, x1, y1, self._unlit(s.shelf))
        for cx, cy in lay.bins:
            _rect(img, cx - 0.06 * u, cy - 0.075 * u, cx + 0.06 * u, cy + 0.075 * u, self._unlit(_shade(s.shelf, 0.6)))
            for _ in range(4):
                colour = self._unlit(_ITEM_PALETTE[int(rng.integers(len(_ITEM_PALETTE)))])
                ix, iy = cx + rng.uniform(-0.04, 0.02) * u, cy + rng.uniform(-0.06, 0.03) * u
                _rect(img, ix, iy, ix + 0.035 * u, iy + 0.035 * u, colour)
        # Bench with a darker rim.
        x0, y0 = lay.at(0.19, 0.23)
        x1, y1 = lay.at(0.975, 0.81)
        _rect(img, x0, y0, x1, y1, self._unlit(_shade(s.bench, 0.78)))
        _rect(img, x0 + 0.012 * u, y0 + 0.012 * u, x1 - 0.012 * u, y1 - 0.012 * u, self._unlit(s.bench))
        # Label sheet (where item labels go) and order-sheet clipboard.
        _rect(img, *lay.sheet_box, self._unlit((236, 236, 200)))
        ox0, oy0, ox1, oy1 = lay.order_sheet
        _rect(img, ox0 - 0.01 * u, oy0 - 0.01 * u, ox1 + 0.01 * u, oy1 + 0.01 * u, self._unlit((120, 90, 60)))
        _rect(img, ox0, oy0, ox1, oy1, self._unlit((246, 246, 240)))
        # Label printer with its output slot.
        _rect(img, *lay.printer, self._unlit((70, 72, 78)))
        px, py = lay.printer_slot
        _rect(img, px - 0.04 * u, py - 0.025 * u, px + 0.04 * u, py - 0.012 * u, self.c_white)
        # Stack of flat box blanks.
        bx, by = lay.blank_stack
        for k in range(3):
            shade = self._unlit(_shade(s.cardboard, 0.85 + 0.07 * k))
            _rect(img, bx - 0.08 * u + k, by - 0.05 * u + k, bx + 0.08 * u + k, by + 0.05 * u + k, shade)
        # Worker torso (only arms and head move).
        tx, ty = lay.at(0.5, 1.05)
        _ellipse(img, tx, ty, 0.3 * self.layout.width, 0.15 * self.layout.height, self.c_cloth)
        return img

    # -- box ---------------------------------------------------------------------------------------------------------

    def box_centre(self, state: _BoxState) -> tuple[float, float]:
        lay = self.layout
        on_bench = _lerp(lay.blank_stack, lay.box_on_bench, state.blank_pos)
        return _lerp(on_bench, lay.box_on_back_table, _ease(state.to_back))

    def box_item_point(self, k: int, state: _BoxState) -> tuple[float, float]:
        cx, cy = self.box_centre(state)
        step = 0.055 * self.layout.unit
        return (cx + (k % 3 - 1) * step, cy + (k // 3 - 0.5) * step)

    def box_label_point(self, state: _BoxState) -> tuple[float, float]:
        cx, cy = self.box_centre(state)
        lay = self.layout
        return (cx + 0.22 * lay.box_side, cy + lay.box_side / 2 + 0.5 * lay.box_front * state.fold)

    def _draw_box(self, img: np.ndarray, state: _BoxState) -> None:
        lay = self.layout
        half, item = lay.box_side / 2, lay.item_size
        cx, cy = self.box_centre(state)
        left, right, top, bottom = cx - half, cx + half, cy - half, cy + half
        front = lay.box_front * state.fold
        if state.fold < 1.0:
            # Flat blank: base panel plus four wall panels that shorten as they are folded up.
            wall = lay.wall_length * (1.0 - state.fold)
            _rect(img, left - wall, top, left, bottom, self.c_card_light)
            _rect(img, right, top, right + wall, bottom, self.c_card_light)
            _rect(img, left, top - wall, right, top, self.c_card_light)
            _rect(img, left, bottom, right, bottom + wall + front, self.c_card_light)
            _rect(img, left, bottom, right, bottom + front, self.c_card_dark)
            inside = self.c_folding[round(state.fold * (len(self.c_folding) - 1))]
            _rect(img, left, top, right, bottom, self.c_card_dark)
            _rect(img, left + 1, top + 1, right - 1, bottom - 1, inside)
            return
        _rect(img, left, bottom, right, bottom + front, self.c_card_dark)
        rim = max(2.0, 0.012 * lay.unit)
        _rect(img, left, top, right, bottom, self.c_card)
        _rect(img, left + rim, top + rim, right - rim, bottom - rim, self.c_card_inside)
        for k in range(min(state.items_in_box, 6)):
            x, y = self.box_item_point(k, state)
            colour = state.item_colours[k % len(state.item_colours)]
            _rect(img, x - item / 2, y - item / 2, x + item / 2, y + item / 2, colour)
        if state.lid < 0.5:
            # Flaps standing open, seen from above: they shorten as they rise.
            flap = lay.flap_length * (1.0 - 2.0 * state.lid)
            _rect(img, left - flap, top, left, bottom, self.c_card_flap)
            _rect(img, right, top, right + flap, bottom, self.c_card_flap)
            _rect(img, left, top - flap, right, top, self.c_card_flap)
        else:
            # Flaps folding over the opening from both sides until they meet in the middle.
            cover = half * min(1.0, (state.lid - 0.5) * 2.0)
            _rect(img, left, top, left + cover, bottom, self.c_card_flap)
            _rect(img, right - cover, top, right, bottom, self.c_card_flap)
            if state.lid >= 0.97:
                _rect(img, cx - 0.07 * lay.box_side, top - 1, cx + 0.07 * lay.box_side, bottom + 1, self.c_tape)
        if state.box_label:
            lx, ly = self.box_label_point(state)
            _rect(
                img,
                lx - 0.12 * lay.box_side,
                ly - 0.3 * front,
                lx + 0.12 * lay.box_side,
                ly + 0.3 * front,
                self.c_box_label,
            )
        if state.shipping_label:
            self._draw_shipping_label(img, (cx, cy))

    def _draw_shipping_label(self, img: np.ndarray, centre: tuple[float, float]) -> None:
        side = self.layout.box_side
        x, y = centre
        _rect(img, x - 0.32 * side, y - 0.24 * side, x + 0.32 * side, y + 0.24 * side, self.c_white)
        for k in range(7):  # barcode stripes
            bx = x - 0.25 * side + k * 0.075 * side
            _rect(img, bx, y - 0.05 * side, bx + 0.035 * side + (k % 2), y + 0.17 * side, self.c_ink)
        _rect(img, x - 0.25 * side, y - 0.17 * side, x + 0.1 * side, y - 0.12 * side, self.c_ink)

    # -- frame -------------------------------------------------------------------------------------------------------

    def draw(self, state: _BoxState, pose: _Pose, t: float, occluder: tuple | None) -> np.ndarray:
        """Draw one frame in world coordinates.

        Returns:
            world: uint32[Hw, Ww] packed RGBA canvas (a fresh copy of the background with everything drawn on top).
        """
        lay, u = self.layout, self.layout.unit
        img = self.lit_background.copy()
        # Bench items (with their own label until relocated) and relocated labels on the label sheet.
        item, tag = lay.item_size, 0.45 * lay.item_size
        for g in range(state.items_in_box, state.picked):
            x, y = lay.item_slots[g % 6]
            _rect(img, x - item / 2, y - item / 2, x + item / 2, y + item / 2, state.item_colours[g % 6])
            if g >= state.labels_moved:
                _rect(img, x - tag / 2, y - tag / 2, x + tag / 2, y + tag / 2, self.c_white)
        for k in range(min(state.labels_moved, 6)):
            x, y = lay.sheet_slots[k]
            _rect(img, x - tag, y - tag / 2, x + tag, y + tag / 2, self.c_white)
        # Lines written on the order sheet so far.
        lines = min(state.order_lines, float(ORDER_LINES_PER_SHEET))
        for k in range(math.ceil(lines)):
            x0, x1, y = lay.order_line(k)
            _rect(img, x0, y, x0 + (x1 - x0) * min(1.0, lines - k), y + max(1.0, 0.008 * u), self.c_ink)
        if pose.pen is None:
            (px, py0), (_, py1) = lay.pen_rest
            _rect(img, px - 0.008 * u, py0, px + 0.008 * u, py1, self.c_pen)
        if pose.scanner is None:
            sx, sy = lay.scanner_rest
            _rect(img, sx - 0.035 * u, sy - 0.025 * u, sx + 0.035 * u, sy + 0.025 * u, self.c_scanner)
        if state.box_present:
            self._draw_box(img, state)
        # The worker: head, arms (sleeves then forearms), carried things, hands.
        sway = 0.08 * ((pose.left[0] + pose.right[0]) / 2 - (lay.rest_left[0] + lay.rest_right[0]) / 2)
        hx, hy = lay.head
        _ellipse(img, hx + sway + 0.006 * u * math.sin(0.7 * t), hy, 0.075 * u, 0.07 * u, self.c_hair)
        for shoulder, hand in ((lay.shoulder_left, pose.left), (lay.shoulder_right, pose.right)):
            elbow = _lerp(shoulder, hand, 0.5)
            _capsule(img, shoulder, elbow, lay.arm_radius, self.c_cloth)
            _capsule(img, elbow, hand, lay.arm_radius * 0.85, self.c_sleeve)
        for kind, (x, y), colour in pose.carried:
            if kind == "item":
                _rect(img, x - item / 2, y - item / 2, x + item / 2, y + item / 2, colour)
            elif kind == "tag":
                _rect(img, x - tag / 2, y - tag / 2, x + tag / 2, y + tag / 2, colour)
            elif kind == "shipping":
                self._draw_shipping_label(img, (x, y))
            elif kind == "blank":
                half = 0.5 * lay.box_side
                _rect(img, x - half, y - 0.35 * half, x + half, y + 0.35 * half, colour)
        for x, y in (pose.left, pose.right):
            _ellipse(img, x, y, lay.hand_radius, lay.hand_radius, self.c_skin)
        if pose.pen is not None:
            px, py = pose.pen
            _capsule(img, (px, py), (px + 0.03 * u, py + 0.05 * u), 0.008 * u, self.c_pen)
        if pose.scanner is not None:
            sx, sy = pose.scanner
            _rect(img, sx - 0.04 * u, sy - 0.03 * u, sx + 0.04 * u, sy + 0.02 * u, self.c_scanner)
            _rect(img, sx + 0.01 * u, sy + 0.02 * u, sx + 0.035 * u, sy + 0.07 * u, self.c_scanner)
            if pose.beam_to is not None:
                tip = (sx - 0.04 * u, sy - 0.005 * u)
                _capsule(img, tip, pose.beam_to, max(0.8, 0.005 * u), self.c_beam)
                _ellipse(img, *pose.beam_to, 0.018 * u, 0.018 * u, self.c_beam)
        if occluder is not None:
            anchor, tip, radius, colour = occluder
            _capsule(img, anchor, tip, radius, colour)
        return img


# --------------------------------------------------------------------------------------------------------------------
# Operation choreography: (state before the row, progress p in [0, 1], seconds into the row) -> (state now, pose)
# --------------------------------------------------------------------------------------------------------------------


def _idle(lay: _Layout, t: float) -> _Pose:
    """Null: hands resting near the bench edge with a small sway."""
    u = lay.unit
    wobble = 0.02 * u * math.sin(1.9 * t)
    return _Pose(
        left=(lay.rest_left[0] + wobble, lay.rest_left[1] + 0.012 * u * math.sin(1.4 * t + 1.0)),
        right=(lay.rest_right[0] - 0.7 * wobble, lay.rest_right[1] + 0.012 * u * math.sin(1.7 * t)),
    )


def _animate(scene: _Scene, op_id: int, before: _BoxState, p: float, t: float, trips: int) -> tuple[_BoxState, _Pose]:
    """The box state and pose ``p`` of the way through a row of ``op_id`` that started from ``before``.

    Args:
        scene: The scene (layout and box geometry).
        op_id: Operation of the row.
        before: Box state when the row started (not modified).
        p: Progress through the row in [0, 1]; ``p = 1`` gives the state the row leaves behind.
        t: Seconds into the row (drives oscillations such as the scanner blink).
        trips: Back-and-forth hand trips the row makes (items or labels to move).

    Returns:
        ``(state, pose)``.
    """
    lay, u = scene.layout, scene.layout.unit
    state = dataclasses.replace(before)
    pose = _idle(lay, t)
    jiggle = (0.006 * u * math.sin(7.0 * t), 0.006 * u * math.cos(5.0 * t))
    if op_id == 100:  # Picking: left hand shelf -> staging area, one item per trip.
        k, q = _trip(p, trips)
        g = before.picked + k
        bin_point, slot = lay.bins[(g + (before.box or 0)) % 3], lay.item_slots[g % 6]
        pose.left = _along([lay.rest_left, bin_point, bin_point, slot, lay.rest_left], [0, 0.35, 0.45, 0.8, 1], q)
        if 0.4 <= q < 0.8:
            pose.carried.append(("item", pose.left, before.item_colours[g % 6]))
        state.picked = before.picked + k + (q >= 0.8)
    elif op_id == 200:  # Relocate Item Label: right hand moves small labels from items to the label sheet.
        k, q = _trip(p, trips)
        g = before.labels_moved + k
        pending = g < before.picked
        source = lay.item_slots[g % 6] if pending else lay.item_slots[0]
        target = lay.sheet_slots[min(g, 5)]
        pose.right = _along([lay.rest_right, source, source, target, lay.rest_right], [0, 0.3, 0.4, 0.75, 1], q)
        pose.left = _lerp(lay.item_slots[1], lay.rest_left, 0.3)
        if pending and 0.35 <= q < 0.75:
            pose.carried.append(("tag", pose.right, scene.c_white))
        if pending:
            state.labels_moved = g + (q >= 0.75)
    elif op_id == 300:  # Assemble Box: a blank comes from the stack and folds up between both hands.
        state.box_present = True
        if before.box_present and before.fold >= 1.0:
            state.fold = 1.0 - 0.3 * math.sin(math.pi * p)  # re-squaring an assembled box
        else:
            state.blank_pos = _ease(p / 0.2)
            state.fold = _ease((p - 0.2) / 0.8)
        cx, cy = scene.box_centre(state)
        reach = lay.box_side / 2 + lay.wall_length * (1.0 - state.fold)
        pose.left = (cx - reach + jiggle[0], cy + 0.3 * lay.box_side + jiggle[1])
        pose.right = (cx + reach - jiggle[0], cy + 0.3 * lay.box_side - jiggle[1])
    elif op_id == 400:  # Insert Items: left hand moves staging items into the (re)opened box.
        state.lid = before.lid * (1.0 - _ease(p / 0.15))
        waiting = before.picked - before.items_in_box
        k, q = _trip(p, trips)
        if waiting > 0:
            g = before.items_in_box + k
            slot, drop = lay.item_slots[g % 6], scene.box_item_point(min(g, 5), state)
            pose.left = _along([lay.rest_left, slot, slot, drop, lay.rest_left], [0, 0.3, 0.4, 0.75, 1], q)
            if g < before.picked:
                if 0.35 <= q < 0.75:
                    pose.carried.append(("item", pose.left, before.item_colours[g % 6]))
                state.items_in_box = min(before.picked, g + (q >= 0.75))
        else:  # nothing left on the bench: rearranging what is inside
            cx, cy = scene.box_centre(state)
            pose.left = (cx - 0.15 * lay.box_side + 2 * jiggle[0], cy + 2 * jiggle[1])
        cx, cy = scene.box_centre(state)
        pose.right = (cx + 0.6 * lay.box_side, cy + 0.2 * lay.box_side)
    elif op_id == 500:  # Close Box: flaps fold over, hands sweep from the sides to the middle, tape goes on.
        state.lid = before.lid + (1.0 - before.lid) * _ease(p / 0.9)
        cx, cy = scene.box_centre(state)
        reach = lay.box_side * (0.65 - 0.5 * state.lid)
        pose.left = (cx - reach + jiggle[0], cy + jiggle[1])
        pose.right = (cx + reach - jiggle[0], cy - jiggle[1])
    elif op_id == 600:  # Attach Box Label: a small yellow label from the printer onto the box's front side.
        target = scene.box_label_point(state)
        pose.right = _along(
            [lay.rest_right, lay.printer_slot, lay.printer_slot, target, target, lay.rest_right],
            [0, 0.25, 0.35, 0.6, 0.9, 1],
            p,
        )
        if 0.6 <= p < 0.9:
            pose.right = (pose.right[0] + 2 * jiggle[0], pose.right[1])
        if 0.3 <= p < 0.6:
            pose.carried.append(("tag", pose.right, scene.c_box_label))
        state.box_label = before.box_label or p >= 0.6
        cx, cy = scene.box_centre(state)
        pose.left = (cx - 0.6 * lay.box_side, cy + 0.1 * lay.box_side)
    elif op_id == 700:  # Scan Label: hand scanner held at the box label, red beam blinking at 3 Hz.
        label = scene.box_label_point(state)
        hover = (label[0] + 0.18 * u, label[1] + 0.02 * u)
        position = _along([lay.scanner_rest, hover, hover, lay.scanner_rest], [0, 0.15, 0.85, 1], p)
        if 0.15 <= p < 0.85:
            position = (position[0] + jiggle[0], position[1] + jiggle[1])
            if int(t * 6.0) % 2 == 0:
                pose.beam_to = label
        pose.scanner = position
        pose.right = (position[0] + 0.02 * u, position[1] + 0.05 * u)
        cx, cy = scene.box_centre(state)
        pose.left = (cx - 0.6 * lay.box_side, cy + 0.1 * lay.box_side)
    elif op_id == 1000:  # Fill out Order: pen writes lines on the order sheet, left hand holds the sheet.
        state.order_lines = before.order_lines + ORDER_LINES_PER_ROW * p
        line = min(state.order_lines, ORDER_LINES_PER_SHEET - 1e-3)
        k = int(line)
        x0, x1, y = lay.order_line(k)
        pose.pen = (x0 + (x1 - x0) * (line - k), y - 0.008 * u + 0.007 * u * math.sin(40.0 * t))
        pose.right = (pose.pen[0] + 0.035 * u, pose.pen[1] + 0.06 * u)
        pose.left = (lay.order_sheet[0] - 0.01 * u, lay.order_sheet[3] - 0.02 * u)
    elif op_id == 800:  # Attach Shipping Label: a big barcode label from the printer onto the box top.
        cx, cy = scene.box_centre(state)
        pose.right = _along(
            [lay.rest_right, lay.printer_slot, lay.printer_slot, (cx, cy), (cx, cy), lay.rest_right],
            [0, 0.25, 0.35, 0.6, 0.92, 1],
            p,
        )
        if 0.6 <= p < 0.92:  # smoothing the label down
            pose.right = (pose.right[0] + 0.12 * lay.box_side * math.sin(6.0 * t), pose.right[1])
        if 0.3 <= p < 0.6:
            pose.carried.append(("shipping", pose.right, scene.c_white))
        state.shipping_label = before.shipping_label or p >= 0.6
        pose.left = (cx - 0.6 * lay.box_side, cy + 0.25 * lay.box_side)
    elif op_id == 900:  # Put on Back Table: the box slides up onto the back table between both hands.
        state.to_back = _ease(p / 0.8)
        cx, cy = scene.box_centre(state)
        grip_left, grip_right = (cx - 0.6 * lay.box_side, cy), (cx + 0.6 * lay.box_side, cy)
        back = _ease((p - 0.8) / 0.2)
        pose.left, pose.right = _lerp(grip_left, lay.rest_left, back), _lerp(grip_right, lay.rest_right, back)
    return state, pose


def _trips_for(op_id: int, state: _BoxState) -> int:
    """How many hand trips a row makes, given the box state when it starts."""
    if op_id == 100:
        return state.first_pick if state.picked == 0 else 1
    if op_id == 200:
        return max(1, state.picked - state.labels_moved)
    if op_id == 400:
        return max(1, state.picked - state.items_in_box)
    return 1


# --------------------------------------------------------------------------------------------------------------------
# Camera
# --------------------------------------------------------------------------------------------------------------------


def _camera_index(style: SubjectStyle, width: int, height: int, margin: int, slack: int) -> np.ndarray:
    """Flat world-canvas index of every output pixel under the subject's camera pose (nearest neighbour).

    Args:
        style: Camera zoom, shift, rotation and shear.
        width, height: Output frame size.
        margin: World margin around the W×H scene region.
        slack: Pixels kept free at the world border so shaking by up to ``slack`` stays inside the canvas.

    Returns:
        index: intp[H, W] into the flattened uint32[Hw, Ww] world canvas.
    """
    world_w = width + 2 * margin
    angle = math.radians(style.camera_rotation_deg)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    # Output -> world: undo zoom, rotate, shear; then move to the (shifted) scene centre.
    forward = np.array([[cos_a, -sin_a], [sin_a, cos_a]]) @ np.array([[1.0, style.camera_shear], [0.0, 1.0]])
    inverse = np.linalg.inv(forward) / style.camera_zoom
    v, h = np.mgrid[0:height, 0:width].astype(np.float64)
    du, dv = h - (width - 1) / 2, v - (height - 1) / 2
    centre_x = margin + (width - 1) / 2 + style.camera_shift[0] * width
    centre_y = margin + (height - 1) / 2 + style.camera_shift[1] * height
    wx = np.rint(inverse[0, 0] * du + inverse[0, 1] * dv + centre_x).astype(np.intp)
    wy = np.rint(inverse[1, 0] * du + inverse[1, 1] * dv + centre_y).astype(np.intp)
    wx = np.clip(wx, slack, width + 2 * margin - 1 - slack)
    wy = np.clip(wy, slack, height + 2 * margin - 1 - slack)
    return wy * world_w + wx


# --------------------------------------------------------------------------------------------------------------------
# Session rendering
# --------------------------------------------------------------------------------------------------------------------

_NOISE_PAD = 16
_NOISE_MAX = 8  # sensor noise is clipped to +-8 levels
_GAIN_STEPS = 256  # lighting gain is quantised to 1/256 (invisible steps, few re-lightings)


def _check_frame_settings(fps: int, width: int, height: int) -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or not 1 <= fps <= 120:
        raise ValueError(f"fps must be an integer frame rate in [1, 120], got {fps!r}")
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value % 2:
            raise ValueError(f"{name} must be an even integer (H.264 yuv420p needs even sizes), got {value!r}")
        if not 32 <= value <= MAX_FRAME_SIDE:
            raise ValueError(f"{name} must be in [32, {MAX_FRAME_SIDE}] pixels, got {value!r}")


def render_session(
    timeline: SessionTimeline,
    style: SubjectStyle | None = None,
    *,
    fps: int = 15,
    width: int = 224,
    height: int = 224,
    seed: int = 0,
) -> Iterator[np.ndarray]:
    """Render the video of a session, one frame per ``1 / fps`` seconds from t = 0 to the last row's end.

    Works for any timeline, including real OpenPack annotations (boxes are then told apart by the ``box`` column, or
    by a new Picking when it is empty).

    Args:
        timeline: The session's annotation.
        style: The worker's look (defaults to ``subject_style(timeline.subject, seed)``).
        fps: Frame rate.
        width: Frame width (even, >= 32).
        height: Frame height (even, >= 32).
        seed: Seed of the per-session randomness (items, shake, noise, lighting, occlusions).

    Yields:
        frame: uint8[H, W, 3] RGB; frame i shows the scene at ``i / fps`` seconds
        (``num_frames(timeline.duration_s, fps)`` frames in all).

    Raises:
        ValueError: for bad frame settings or seed, or a timeline without rows.
    """
    _check_frame_settings(fps, width, height)
    _check_seed(seed)
    if not timeline.segments:
        raise ValueError(f"{timeline.subject}/{timeline.session}: timeline has no rows to render")
    style = style or subject_style(timeline.subject, seed)
    return _render(timeline, style, int(fps), int(width), int(height), int(seed))


def _plan_rows(scene: _Scene, timeline: SessionTimeline, rng: np.random.Generator) -> list[tuple[_BoxState, int]]:
    """For every row: the box state it starts from and its number of hand trips (replaying the rows in order)."""
    palette = scene.item_palette
    plans = []
    state: _BoxState | None = None
    for seg in timeline.segments:
        new_box = state is None or seg.box != state.box
        if seg.box is None and state is not None and seg.op_id == 100 and state.box_present:
            new_box = True  # real annotations without box numbers: a Picking after a built box starts the next one
        if new_box:
            colours = tuple(palette[int(i)] for i in rng.choice(len(palette), size=6, replace=False))
            state = _BoxState(box=seg.box, item_colours=colours, first_pick=int(rng.integers(1, 4)))
        trips = _trips_for(seg.op_id, state)
        plans.append((state, trips))
        state, _ = _animate(scene, seg.op_id, state, 1.0, seg.duration_s, trips)
    return plans


def _shake_offsets(
    rng: np.random.Generator, count: int, fps: int, amplitude_px: float, bursts_per_min: float, limit: int
) -> np.ndarray:
    """Per-frame integer camera offsets.

    A camera on a pole above a bench mostly sits still: it creeps by a pixel now and then, and shakes for a moment
    when the bench is bumped. Keeping the offset constant between those events also keeps H.264 encoding cheap.

    Returns:
        offsets: intp[count, 2] (dx, dy) in pixels, within [-limit, limit].
    """
    offsets = np.zeros((count, 2), dtype=np.float64)
    if amplitude_px <= 0:
        return offsets.astype(np.intp)
    # Creep: a +-1 px random walk, one step every ~5 s on average.
    t = float(rng.exponential(5.0))
    position = np.zeros(2)
    while t * fps < count:
        position = np.clip(position + rng.integers(-1, 2, size=2), -1, 1)
        offsets[int(t * fps) :] = position
        t += float(rng.exponential(5.0))
    # Bumps: short bursts of jitter that decay.
    t = float(rng.exponential(60.0 / bursts_per_min))
    while t * fps < count:
        start, length = int(t * fps), max(2, int(float(rng.uniform(0.4, 1.2)) * fps))
        decay = np.linspace(1.0, 0.2, length)[:, None]
        burst = rng.normal(0.0, amplitude_px, size=(length, 2)) * decay
        end = min(count, start + length)
        offsets[start:end] += burst[: end - start]
        t += length / fps + float(rng.exponential(60.0 / bursts_per_min))
    return np.clip(np.rint(offsets), -limit, limit).astype(np.intp)


def _render(timeline: SessionTimeline, style: SubjectStyle, fps: int, width: int, height: int, seed: int):
    rng = _rng(seed, timeline.subject, timeline.session, "render")
    scene = _Scene(style, width, height)
    lay = scene.layout
    count = num_frames(timeline.duration_s, fps)
    times = np.arange(count) / fps
    plans = _plan_rows(scene, timeline, rng)
    segments = timeline.segments
    starts = np.array([s.start_s for s in segments])
    row_of_frame = np.searchsorted(starts, times, side="right") - 1

    # Camera shake (see _shake_offsets), applied by gathering each frame from a shifted view of the world canvas.
    scale = height / 224.0
    slack = math.ceil(3.0 * style.shake_px * scale) + 2
    world_w = scene.world_shape[1]
    # Index of every output byte (pixel and R, G, B) into the world canvas's bytes, relative to the canvas shifted by
    # (-slack, -slack); each frame then gathers from a view that starts at its shake offset. Gathering bytes straight
    # into uint8[H, W, 3] also unpacks the RGBA words for free.
    camera = _camera_index(style, width, height, scene.margin, slack) - (slack * world_w + slack)
    camera = (camera[..., None] * 4 + np.arange(3)).astype(np.intp)
    shake = _shake_offsets(rng, count, fps, style.shake_px * scale, style.shake_bursts_per_min, slack) + slack
    view_start = (shake[:, 1] * world_w + shake[:, 0]) * 4

    # Lighting: a slow global drift (two incommensurate sines), quantised so the lit background and colours only need
    # recomputing every several frames; slow changes also keep H.264 encoding cheap. Lit levels stay in
    # [_NOISE_MAX, 255 - _NOISE_MAX] so the noise below can be added in wrapping uint8 arithmetic.
    phase = rng.uniform(0, 2 * math.pi, size=2)
    gains = (
        1.0
        + 0.75 * style.light_drift * np.sin(2 * math.pi * times / style.light_period_s + phase[0])
        + 0.25 * style.light_drift * np.sin(2 * math.pi * times / (0.37 * style.light_period_s) + phase[1])
    )
    gain_steps = np.rint(gains * _GAIN_STEPS).astype(np.int64)
    levels = np.arange(256, dtype=np.float64)
    lit_step = None

    # Sensor noise: one precomputed tile, a different window of it each frame (mostly luma, a little chroma).
    tile_shape = (height + _NOISE_PAD, width + _NOISE_PAD)
    luma = rng.normal(0.0, style.noise_sigma, size=(*tile_shape, 1))
    chroma = rng.normal(0.0, 0.3 * style.noise_sigma, size=(*tile_shape, 3))
    noise = np.clip(np.rint(luma + chroma), -_NOISE_MAX, _NOISE_MAX).astype(np.int8).view(np.uint8)
    noise_at = rng.integers(0, _NOISE_PAD, size=(count, 2))

    # Occlusions: something (another person's arm, a trolley) sweeps across the view for a second or two.
    occlusions = []
    t_next = float(rng.exponential(60.0 / style.occlusions_per_min))
    while t_next < timeline.duration_s:
        length = float(rng.uniform(0.8, 2.0))
        side = int(rng.integers(4))
        along = float(rng.uniform(0.2, 0.8))
        radius = float(rng.uniform(0.08, 0.14)) * lay.unit
        colour = scene.colour(tuple(int(c) for c in rng.integers(20, 200, size=3)))
        occlusions.append((t_next, length, side, along, radius, colour))
        t_next += length + float(rng.exponential(60.0 / style.occlusions_per_min))

    def occluder_at(t: float) -> tuple | None:
        for start, length, side, along, radius, colour in occlusions:
            if start <= t < start + length:
                q = (t - start) / length
                reach = math.sin(math.pi * q)  # in and back out
                if side == 0:  # from the left edge
                    anchor, tip = lay.at(-0.3, along), lay.at(-0.3 + 0.8 * reach, along + 0.1 * q)
                elif side == 1:  # from the right edge
                    anchor, tip = lay.at(1.3, along), lay.at(1.3 - 0.8 * reach, along - 0.1 * q)
                elif side == 2:  # from the top
                    anchor, tip = lay.at(along, -0.3), lay.at(along + 0.1 * q, -0.3 + 0.7 * reach)
                else:  # passing across the top of the view
                    anchor, tip = lay.at(-0.3 + 1.6 * q, -0.3), lay.at(-0.2 + 1.6 * q, 0.15)
                return anchor, tip, radius, colour
        return None

    for i in range(count):
        t = float(times[i])
        row = int(row_of_frame[i])
        seg = segments[row]
        before, trips = plans[row]
        if t < seg.end_s:
            state, pose = _animate(scene, seg.op_id, before, (t - seg.start_s) / seg.duration_s, t - seg.start_s, trips)
        else:  # un-annotated gap after the row: the row's result stays, the worker idles
            state, _ = _animate(scene, seg.op_id, before, 1.0, seg.duration_s, trips)
            pose = _idle(lay, t)
        if gain_steps[i] != lit_step:
            lit_step = gain_steps[i]
            scene.set_lighting(
                np.clip(np.rint(levels * (lit_step / _GAIN_STEPS)), _NOISE_MAX, 255 - _NOISE_MAX).astype(np.uint8)
            )
        world = scene.draw(state, pose, t, occluder_at(t) if occlusions else None)
        frame = world.view(np.uint8).reshape(-1)[view_start[i] :].take(camera)
        ny, nx = noise_at[i]
        frame += noise[ny : ny + height, nx : nx + width]  # wraps like signed addition: no clipping needed
        yield frame


# --------------------------------------------------------------------------------------------------------------------
# Writing sessions
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate.

    Attributes:
        subjects: Number of workers (named ``U0101, U0102, ...``) or explicit ``U####`` ids.
        sessions_per_subject: Sessions per worker (named ``S0100, S0200, ...``).
        boxes_per_session: Boxes per session. Give at most one of this and ``session_duration_s``; with neither,
            ``DEFAULT_BOXES_PER_SESSION``.
        session_duration_s: Minimum session length in seconds (whole boxes are added until reached).
        fps: Video frame rate (OpenPack's RGB runs at 15).
        width: Frame width, even, >= 32.
        height: Frame height, even, >= 32.
        seed: Non-negative dataset seed.
        write_video: Write ``<subject>/kinect/color-masked/video/<session>.mp4``.
        write_frames: Also write the real RGB layout's JPEG frames (``frames/<session>/YYYY/.../*.jpg``).
        jpeg_quality: JPEG quality of those frames.
        variation: Procedure variation of the generated timelines.
    """

    subjects: int | tuple[str, ...] = 2
    sessions_per_subject: int = 1
    boxes_per_session: int | None = None
    session_duration_s: float | None = None
    fps: int = 15
    width: int = 224
    height: int = 224
    seed: int = 0
    write_video: bool = True
    write_frames: bool = False
    jpeg_quality: int = 90
    variation: ProcedureVariation = field(default_factory=ProcedureVariation)

    def __post_init__(self) -> None:
        if isinstance(self.subjects, (int, np.integer)) and not isinstance(self.subjects, bool):
            if not 1 <= self.subjects <= 899:
                raise ValueError(f"GeneratorConfig.subjects must be a count in [1, 899] or ids, got {self.subjects!r}")
        elif isinstance(self.subjects, (list, tuple)) and self.subjects:
            bad = [s for s in self.subjects if not (isinstance(s, str) and _SUBJECT_RE.match(s))]
            if bad:
                raise ValueError(f"GeneratorConfig.subjects: ids must look like 'U0101', got {bad}")
            if len(set(self.subjects)) != len(self.subjects):
                raise ValueError(f"GeneratorConfig.subjects: duplicate ids in {list(self.subjects)}")
            object.__setattr__(self, "subjects", tuple(self.subjects))
        else:
            raise ValueError(
                f"GeneratorConfig.subjects must be a positive count or a list of ids, got {self.subjects!r}"
            )
        if isinstance(self.sessions_per_subject, bool) or not isinstance(self.sessions_per_subject, int):
            raise ValueError(
                f"GeneratorConfig.sessions_per_subject must be an integer, got {self.sessions_per_subject!r}"
            )
        if not 1 <= self.sessions_per_subject <= 99:
            raise ValueError(
                f"GeneratorConfig.sessions_per_subject must be in [1, 99], got {self.sessions_per_subject!r}"
            )
        if self.boxes_per_session is not None and self.session_duration_s is not None:
            raise ValueError("GeneratorConfig: set at most one of boxes_per_session and session_duration_s")
        if self.boxes_per_session is not None and (
            isinstance(self.boxes_per_session, bool)
            or not isinstance(self.boxes_per_session, int)
            or self.boxes_per_session < 1
        ):
            raise ValueError(
                f"GeneratorConfig.boxes_per_session must be a positive integer, got {self.boxes_per_session!r}"
            )
        if self.session_duration_s is not None and not (
            isinstance(self.session_duration_s, (int, float)) and 0 < self.session_duration_s <= 24 * 3600
        ):
            raise ValueError(
                f"GeneratorConfig.session_duration_s must be in (0, 86400] seconds, got {self.session_duration_s!r}"
            )
        try:
            _check_frame_settings(self.fps, self.width, self.height)
            _check_seed(self.seed)
        except ValueError as error:
            raise ValueError(f"GeneratorConfig: {error}") from None
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"GeneratorConfig.jpeg_quality must be in [1, 100], got {self.jpeg_quality!r}")
        if not isinstance(self.variation, ProcedureVariation):
            raise ValueError("GeneratorConfig.variation must be a ProcedureVariation")

    @property
    def subject_ids(self) -> tuple[str, ...]:
        return subject_ids(self.subjects) if isinstance(self.subjects, (int, np.integer)) else tuple(self.subjects)

    @property
    def session_ids(self) -> tuple[str, ...]:
        return session_ids(self.sessions_per_subject)


def generate_session(out_dir: str | Path, subject: str, session: str, config: GeneratorConfig) -> SessionSource:
    """Generate and write one session: its operations CSV, then its MP4 and/or JPEG frames.

    Args:
        out_dir: Dataset root (OpenPack layout underneath).
        subject: Worker id.
        session: Session id.
        config: Generation settings (seed, size, fps, what to write).

    Returns:
        Where the session's annotation and media were written (``media_kind`` ``"video"`` when an MP4 was written,
        else ``"frames"`` or ``"none"``).
    """
    root = Path(out_dir)
    timeline = generate_timeline(
        subject,
        session,
        seed=config.seed,
        boxes=config.boxes_per_session,
        duration_s=config.session_duration_s,
        variation=config.variation,
    )
    csv_path = write_operations_csv(annotation_path(root, subject, session), timeline)
    media, kind = None, "none"
    if config.write_frames:
        media, kind = str(frames_dir(root, subject, session)), "frames"
    if config.write_video:
        media, kind = str(video_path(root, subject, session)), "video"
    if not (config.write_video or config.write_frames):
        return SessionSource(subject, session, str(csv_path), media, kind)

    frames = render_session(
        timeline,
        subject_style(subject, config.seed),
        fps=config.fps,
        width=config.width,
        height=config.height,
        seed=config.seed,
    )
    jpeg_dir = frames_dir(root, subject, session)
    if config.write_frames and jpeg_dir.is_dir():
        # Frames are found by globbing, so frames left from an earlier, longer run would corrupt this session.
        shutil.rmtree(jpeg_dir)

    def with_jpegs(frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        from PIL import Image  # imported here: only needed for the JPEG layout

        made_dirs: set[Path] = set()
        for i, frame in enumerate(frames):
            target = jpeg_dir / frame_name(timeline.origin + dt.timedelta(seconds=i / config.fps))
            if target.parent not in made_dirs:
                target.parent.mkdir(parents=True, exist_ok=True)
                made_dirs.add(target.parent)
            Image.fromarray(frame).save(target, format="JPEG", quality=config.jpeg_quality)
            yield frame

    if config.write_frames:
        frames = with_jpegs(frames)
    if config.write_video:
        write_video(video_path(root, subject, session), frames, config.fps)
    else:
        for _ in frames:  # JPEGs only: drive the generator
            pass
    return SessionSource(subject, session, str(csv_path), media, kind)


def generate_dataset(out_dir: str | Path, config: GeneratorConfig) -> list[SessionSource]:
    """Generate every (subject, session) of ``config`` under ``out_dir``, in the OpenPack layout.

    Each session depends only on (seed, subject, session) and the settings, so datasets generated with more subjects
    or sessions contain the smaller ones unchanged.

    Returns:
        One source per session, in ``config.subject_ids`` × ``config.session_ids`` order.
    """
    return [
        generate_session(out_dir, subject, session, config)
        for subject in config.subject_ids
        for session in config.session_ids
    ]


@dataclass(frozen=True)
class DatasetSummary:
    """Totals over a set of sessions.

    Attributes:
        sessions: Number of sessions.
        boxes: Number of boxes (distinct box numbers per session).
        duration_s: Total session length (first row's start to last row's end).
        null_s: Total un-annotated time between rows.
        op_counts: Rows per operation name, in label-space order.
        op_seconds: Annotated seconds per operation name.
    """

    sessions: int
    boxes: int
    duration_s: float
    null_s: float
    op_counts: dict[str, int]
    op_seconds: dict[str, float]

    def format(self) -> str:
        """A few human-readable lines."""
        hours, rest = divmod(round(self.duration_s), 3600)
        lines = [
            f"sessions: {self.sessions}  boxes: {self.boxes}  duration: {hours}:{rest // 60:02d}:{rest % 60:02d}"
            f" ({self.duration_s:.1f} s, of which Null gaps {self.null_s:.1f} s)",
            "operation                  rows   seconds",
        ]
        for name, rows in self.op_counts.items():
            lines.append(f"{name:<25} {rows:>5} {self.op_seconds[name]:>9.1f}")
        return "\n".join(lines)


def summarize(timelines: Iterable[SessionTimeline]) -> DatasetSummary:
    """Count sessions, boxes, durations and rows per operation."""
    sessions = boxes = 0
    duration = annotated = 0.0
    counts: Counter[int] = Counter()
    seconds: Counter[int] = Counter()
    for timeline in timelines:
        sessions += 1
        boxes += len({seg.box for seg in timeline.segments})
        duration += timeline.duration_s
        for seg in timeline.segments:
            counts[seg.op_id] += 1
            seconds[seg.op_id] += seg.duration_s
            annotated += seg.duration_s
    order = sorted(counts, key=lambda op_id: PROCEDURE.index(op_id) if op_id in PROCEDURE else len(PROCEDURE))
    return DatasetSummary(
        sessions=sessions,
        boxes=boxes,
        duration_s=duration,
        null_s=duration - annotated,
        op_counts={operation_by_id(op_id).name: counts[op_id] for op_id in order},
        op_seconds={operation_by_id(op_id).name: round(seconds[op_id], 3) for op_id in order},
    )
