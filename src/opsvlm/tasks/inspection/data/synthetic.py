"""Synthetic infrastructure-inspection scenes written as a Roboflow YOLO segmentation dataset.

The inspection task (project issue 7) classifies the condition of slope drains, toe drains, rock toes and vegetation
into the 9 classes of :data:`inspection.data.yolo.CONDITION_CLASSES`. The seed project's photos are not shipped, so this
generator draws scenes with the same objects and writes them exactly where and how ``inspection.data.yolo`` reads a
Roboflow export (``data.yaml`` with ``../train/images`` style paths and the 9 names, ``train|valid|test/images/*.jpg``
and ``.../labels/*.txt`` polygons).

* **Scene** (:func:`render_scene`): a grassy / dry / earth slope (palette, texture, lighting and camera roll vary per
  image), optionally with sky above the crest; concrete slope drains running down it (narrower at the top:
  perspective); at its foot a rock toe (band of grey stones) above a toe drain (concrete channel along the bottom),
  then a road or gravel verge; shrub patches (vegetation) on the slope.
* **Conditions**, drawn large enough to survive downscaling to ~56 px: *blocked* drains carry a plug of soil / leaves /
  rubbish filling the channel over 30-50 % of its length; *damaged* drains break with a wide dark gap, the segment
  after it displaced sideways (slope drain) or downward (toe drain), with cracks; a *damaged* rock toe has a section
  with the stones gone (brown earth, a dark scour hole, a few tumbled stones).
* **Nuisances**: lighting gradient and gain, colour cast, soft shadows, sensor noise, blur, JPEG compression.
* **Labels**: every object is painted through the mask of its own polygon and objects do not overlap, so the written
  polygon (clipped to the image, normalised) is what was drawn; :func:`render_scene` also returns the instance map.
* **Frequencies** (:func:`sample_plan`): normal classes common, blocked/damaged rarer (about 8:1 between the most and
  the least frequent class, like the seed's 7:1), about 4.5 objects per labelled image, ~6 % background images. The
  first images of each split are forced to cover all 9 classes, so every split holds every class once it has 3 or
  more labelled images (N >= ~30 with the default fractions).

Deterministic: image ``i`` depends only on (seed, i, its split position and the settings), and the same
settings give the same bytes. Rendering is numpy + Pillow only (about 30 ms of CPU per 224 px image, JPEG included).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from opsvlm.tasks.inspection.data.yolo import CONDITION_CLASSES, condition_class

__all__ = [
    "BACKGROUND",
    "COVERAGE_PLANS",
    "SPLIT_FOLDERS",
    "InspectionConfig",
    "InspectionSummary",
    "RenderedScene",
    "SceneObject",
    "ScenePlan",
    "clip_polygon",
    "data_yaml_text",
    "dataset_plans",
    "generate_inspection_dataset",
    "label_lines",
    "polygon_area",
    "render_scene",
    "sample_plan",
    "split_counts",
]

#: data.yaml split key -> folder name (Roboflow writes ``valid``).
SPLIT_FOLDERS: dict[str, str] = {"train": "train", "val": "valid", "test": "test"}

Point = tuple[float, float]


# --------------------------------------------------------------------------------------------------------------------
# Settings and plans
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InspectionConfig:
    """Settings of a generated dataset.

    Attributes:
        images: number of images over all splits.
        seed: random seed; the same settings give the same bytes.
        size: image width = height in pixels (>= 64).
        splits: train / val / test fractions (non-negative, summing to 1).
        background_fraction: share of images without any object (at least one per split of 8+ images).
        image_format: ``jpg`` or ``png``.
        jpeg_quality: JPEG quality (1-95).
    """

    images: int = 200
    seed: int = 0
    size: int = 224
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15)
    background_fraction: float = 0.06
    image_format: str = "jpg"
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ValueError(f"images must be >= 1, got {self.images}")
        if self.size < 64:
            raise ValueError(f"size must be >= 64 pixels, got {self.size}")
        if len(self.splits) != 3 or any(f < 0 for f in self.splits) or abs(sum(self.splits) - 1.0) > 1e-6:
            raise ValueError(f"splits must be 3 non-negative fractions summing to 1, got {self.splits}")
        if not 0.0 <= self.background_fraction < 1.0:
            raise ValueError(f"background_fraction must be in [0, 1), got {self.background_fraction}")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")


@dataclass(frozen=True)
class ScenePlan:
    """Which objects a scene shows.

    Attributes:
        slope_drains: condition of each slope drain (``normal``/``blocked``/``damaged``), left to right.
        toe_drain: condition of the toe drain, or ``None`` for none.
        rock_toe: condition of the rock toe (``normal``/``damaged``), or ``None``.
        vegetation: number of shrub patches wanted (fewer are drawn when they do not fit; labels say what was drawn).
    """

    slope_drains: tuple[str, ...] = ()
    toe_drain: str | None = None
    rock_toe: str | None = None
    vegetation: int = 0

    @property
    def background(self) -> bool:
        """True when the scene has no objects."""
        return not self.slope_drains and self.toe_drain is None and self.rock_toe is None and self.vegetation == 0


BACKGROUND = ScenePlan()
# The first labelled images of every split: together they hold all 9 classes.
COVERAGE_PLANS: tuple[ScenePlan, ...] = (
    ScenePlan(slope_drains=("blocked", "damaged", "normal"), toe_drain="blocked", rock_toe="damaged", vegetation=1),
    ScenePlan(slope_drains=("normal",), toe_drain="damaged", rock_toe="normal", vegetation=2),
    ScenePlan(slope_drains=("damaged", "blocked"), toe_drain="normal", rock_toe="normal", vegetation=1),
)
_DRAIN_CONDITIONS = ("normal", "blocked", "damaged")
_SLOPE_DRAIN_P = (0.62, 0.20, 0.18)
_TOE_DRAIN_P = (0.55, 0.22, 0.23)
_ROCK_DAMAGED_P = 0.28


def sample_plan(rng: np.random.Generator) -> ScenePlan:
    """A random labelled scene with realistic frequencies (normal common, blocked / damaged rare)."""
    n_drains = int(rng.choice(4, p=(0.1, 0.35, 0.4, 0.15)))
    drains = tuple(str(rng.choice(_DRAIN_CONDITIONS, p=_SLOPE_DRAIN_P)) for _ in range(n_drains))
    toe = rock = None
    if rng.random() < 0.9:  # the foot of the slope is in view
        has_rock, has_toe = rng.random() < 0.88, rng.random() < 0.88
        if not (has_rock or has_toe):
            has_toe = True
        if has_toe:
            toe = str(rng.choice(_DRAIN_CONDITIONS, p=_TOE_DRAIN_P))
        if has_rock:
            rock = "damaged" if rng.random() < _ROCK_DAMAGED_P else "normal"
    vegetation = int(rng.choice(4, p=(0.2, 0.35, 0.3, 0.15)))
    plan = ScenePlan(drains, toe, rock, vegetation)
    return plan if not plan.background else ScenePlan(vegetation=1)


def split_counts(images: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Images per split (train, val, test): rounded fractions, the remainder going to test."""
    n_train = round(images * fractions[0])
    n_val = min(round(images * fractions[1]), images - n_train)
    return n_train, n_val, images - n_train - n_val


def dataset_plans(config: InspectionConfig) -> list[tuple[str, ScenePlan | None]]:
    """Split key and forced plan per image index (``None``: sampled from the image's own random stream)."""
    plans: list[tuple[str, ScenePlan | None]] = []
    for key, count in zip(SPLIT_FOLDERS, split_counts(config.images, config.splits), strict=True):
        n_background = round(count * config.background_fraction)
        if count >= 8:
            n_background = max(n_background, 1)
        for position in range(count):
            if position >= count - n_background:
                plans.append((key, BACKGROUND))
            elif position < len(COVERAGE_PLANS):
                plans.append((key, COVERAGE_PLANS[position]))
            else:
                plans.append((key, None))
    return plans


# --------------------------------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------------------------------


def polygon_area(points: Sequence[Point]) -> float:
    """Shoelace area (absolute) of a polygon."""
    if len(points) < 3:
        return 0.0
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    return float(abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2)


def clip_polygon(points: Sequence[Point], width: float, height: float) -> list[Point]:
    """Sutherland-Hodgman clip of a polygon to the rectangle [0, width] x [0, height]."""

    def clip(pts: list[Point], inside, cross) -> list[Point]:
        out: list[Point] = []
        for i, current in enumerate(pts):
            previous = pts[i - 1]
            if inside(current):
                if not inside(previous):
                    out.append(cross(previous, current))
                out.append(current)
            elif inside(previous):
                out.append(cross(previous, current))
        return out

    def at_x(x0: float):
        return lambda p, q: (x0, p[1] + (q[1] - p[1]) * (x0 - p[0]) / (q[0] - p[0]))

    def at_y(y0: float):
        return lambda p, q: (p[0] + (q[0] - p[0]) * (y0 - p[1]) / (q[1] - p[1]), y0)

    pts = list(points)
    for inside, cross in (
        (lambda p: p[0] >= 0.0, at_x(0.0)),
        (lambda p: p[0] <= width, at_x(width)),
        (lambda p: p[1] >= 0.0, at_y(0.0)),
        (lambda p: p[1] <= height, at_y(height)),
    ):
        if not pts:
            break
        pts = clip(pts, inside, cross)
    # Drop consecutive duplicates that clipping can leave.
    cleaned: list[Point] = []
    for p in pts:
        if not cleaned or abs(p[0] - cleaned[-1][0]) > 1e-9 or abs(p[1] - cleaned[-1][1]) > 1e-9:
            cleaned.append(p)
    if len(cleaned) > 1 and abs(cleaned[0][0] - cleaned[-1][0]) < 1e-9 and abs(cleaned[0][1] - cleaned[-1][1]) < 1e-9:
        cleaned.pop()
    return cleaned


@dataclass(frozen=True)
class _Strip:
    """A straight channel: ``point(t, s)`` with t in [0, 1] along it and s in [-1, 1] across it (world pixels)."""

    start: Point
    end: Point
    half_start: float
    half_end: float
    across: Point  # unit vector across the channel

    def point(self, t: float, s: float, shift: Point = (0.0, 0.0)) -> Point:
        half = self.half_start + t * (self.half_end - self.half_start)
        x = self.start[0] + t * (self.end[0] - self.start[0]) + s * half * self.across[0] + shift[0]
        y = self.start[1] + t * (self.end[1] - self.start[1]) + s * half * self.across[1] + shift[1]
        return (x, y)

    def quad(self, t0: float, t1: float, s0: float = -1.0, s1: float = 1.0, shift: Point = (0.0, 0.0)) -> list[Point]:
        return [
            self.point(t0, s0, shift),
            self.point(t0, s1, shift),
            self.point(t1, s1, shift),
            self.point(t1, s0, shift),
        ]

    @property
    def length(self) -> float:
        return math.hypot(self.end[0] - self.start[0], self.end[1] - self.start[1])

    def outline(self, break_t: float | None = None, shift: Point = (0.0, 0.0)) -> list[Point]:
        """The channel's outline; with ``break_t``, the part after it displaced by ``shift`` (a stepped outline)."""
        if break_t is None:
            return self.quad(0.0, 1.0)
        p = self.point
        return [
            p(0, -1),
            p(0, 1),
            p(break_t, 1),
            p(break_t, 1, shift),
            p(1, 1, shift),
            p(1, -1, shift),
            p(break_t, -1, shift),
            p(break_t, -1),
        ]


# --------------------------------------------------------------------------------------------------------------------
# Painting
# --------------------------------------------------------------------------------------------------------------------


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise float32[size, size] in about [-1, 1] (a random grid upsampled bilinearly)."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


class _Canvas:
    """Float RGB canvas with an instance map; shapes are given in world pixels and drawn through a camera affine."""

    def __init__(self, size: int, rng: np.random.Generator, angle_deg: float, zoom: float, shift: Point):
        self.size = size
        self.rng = rng
        self.pixels = np.zeros((size, size, 3), np.float32)
        self.instance = np.zeros((size, size), np.int16)
        self.fine = rng.standard_normal((size, size)).astype(np.float32)
        self.medium = _value_noise(rng, size, max(4, size // 9))
        self.coarse = _value_noise(rng, size, 4)
        theta = math.radians(angle_deg)
        # Scale so the rotated world square still covers the whole image.
        scale = zoom * (abs(math.cos(theta)) + abs(math.sin(theta)))
        self.scale = scale
        cos, sin = scale * math.cos(theta), scale * math.sin(theta)
        c = size / 2
        self.matrix = ((cos, -sin, c + shift[0] - cos * c + sin * c), (sin, cos, c + shift[1] - sin * c - cos * c))

    def to_image(self, points: Sequence[Point]) -> list[Point]:
        (a, b, tx), (c, d, ty) = self.matrix
        return [(a * x + b * y + tx, c * x + d * y + ty) for x, y in points]

    def _new(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        image = Image.new("L", (self.size, self.size), 0)
        return image, ImageDraw.Draw(image)

    def polygon_mask(self, points: Sequence[Point]) -> np.ndarray:
        image, draw = self._new()
        draw.polygon(self.to_image(points), fill=1)
        return np.asarray(image, dtype=bool)

    def ellipses_mask(self, ellipses: Sequence[tuple[float, float, float, float]]) -> np.ndarray:
        """Mask of axis-aligned ellipses ``(cx, cy, rx, ry)`` (centres in world pixels, radii scaled by the zoom)."""
        image, draw = self._new()
        for cx, cy, rx, ry in ellipses:
            (x, y), r = self.to_image([(cx, cy)])[0], (rx * self.scale, ry * self.scale)
            draw.ellipse((x - r[0], y - r[1], x + r[0], y + r[1]), fill=1)
        return np.asarray(image, dtype=bool)

    def paint_ellipses(
        self,
        mask: np.ndarray,
        ellipses: Sequence[tuple[float, float, float, float]],
        colours: Sequence[Sequence[float]],
        medium: float = 0.1,
        fine: float = 6.0,
    ) -> None:
        """Paint ellipses ``(cx, cy, rx, ry)`` (world) each in its colour, within ``mask``, later ones on top.

        One id image for the whole group instead of one mask per ellipse (rock toes hold ~100 stones).
        """
        for first in range(0, len(ellipses), 255):
            image, draw = self._new()
            group = ellipses[first : first + 255]
            centres = self.to_image([(cx, cy) for cx, cy, _, _ in group])
            for i, ((x, y), (_, _, rx, ry)) in enumerate(zip(centres, group, strict=True)):
                rx, ry = rx * self.scale, ry * self.scale
                draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=i + 1)
            ids = np.asarray(image)
            where = mask & (ids > 0)
            if not where.any():
                continue
            lut = np.zeros((256, 3), np.float32)
            lut[1 : len(group) + 1] = np.asarray(colours[first : first + 255], np.float32)
            shade = 1.0 + medium * self.medium[where]
            self.pixels[where] = lut[ids[where]] * shade[:, None] + fine * self.fine[where][:, None]

    def lines_mask(self, lines: Sequence[Sequence[Point]], width: int) -> np.ndarray:
        image, draw = self._new()
        for line in lines:
            draw.line(self.to_image(line), fill=1, width=width)
        return np.asarray(image, dtype=bool)

    def paint(
        self, mask: np.ndarray, rgb: Sequence[float], medium: float = 0.08, fine: float = 5.0, coarse: float = 0.0
    ) -> None:
        """Fill ``mask`` with ``rgb`` modulated by the canvas' texture fields."""
        if not mask.any():
            return
        shade = 1.0 + medium * self.medium[mask] + coarse * self.coarse[mask]
        colour = np.asarray(rgb, np.float32)[None, :] * shade[:, None] + fine * self.fine[mask][:, None]
        self.pixels[mask] = colour

    def scale_colour(self, mask: np.ndarray, factor: float) -> None:
        self.pixels[mask] *= factor


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grow a bool mask by ``steps`` pixels (4-neighbourhood per step)."""
    grown = mask.copy()
    for _ in range(steps):
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    return grown


def _jitter(rng: np.random.Generator, rgb: Sequence[float], amount: float) -> tuple[float, float, float]:
    return tuple(float(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in rgb)


def _blob(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float, n: int = 16) -> list[Point]:
    """An irregular closed blob around (cx, cy)."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, n)) if n > 8 else np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = rng.uniform(0.72, 1.12, n)
    return [(cx + rx * r * math.cos(a), cy + ry * r * math.sin(a)) for a, r in zip(angles, radius, strict=True)]


# Palettes (RGB, before jitter).
_SLOPES = {
    "grass": ((104, 138, 66), (124, 150, 78)),
    "dry": ((160, 150, 98), (140, 138, 88)),
    "earth": ((146, 114, 82), (128, 104, 74)),
    "mixed": ((112, 140, 72), (150, 120, 84)),
}
_CONCRETE = (184, 182, 174)
_SOIL = (112, 78, 46)
_LEAVES = (86, 104, 40)
_GAP = (34, 28, 24)
_SHRUB = (46, 84, 34)


@dataclass(frozen=True)
class SceneObject:
    """One labelled object of a rendered scene.

    Attributes:
        class_name: one of :data:`CONDITION_CLASSES`.
        polygon: outline in image pixels, clipped to the image.
        box: ``(x1, y1, x2, y2)`` pixel bounds of the polygon.
        instance: its value in the scene's instance map.
    """

    class_name: str
    polygon: tuple[Point, ...]
    box: tuple[float, float, float, float]
    instance: int


@dataclass(frozen=True)
class RenderedScene:
    """A rendered scene.

    Attributes:
        image: uint8[H, W, 3] RGB.
        objects: the labelled objects (painted through their own polygon masks; they do not overlap).
        instance: int16[H, W], the object index + 1 that painted each pixel (0: background).
    """

    image: np.ndarray
    objects: tuple[SceneObject, ...]
    instance: np.ndarray


class _Scene:
    """Draws one scene; world coordinates are pixels of an un-rolled size x size view."""

    def __init__(self, plan: ScenePlan, size: int, rng: np.random.Generator):
        self.plan, self.size, self.rng = plan, size, rng
        angle = rng.uniform(-6.0, 6.0)
        zoom = rng.uniform(1.0, 1.08)
        shift = (rng.uniform(-0.02, 0.02) * size, rng.uniform(-0.02, 0.02) * size)
        self.canvas = _Canvas(size, rng, angle, zoom, shift)
        self.objects: list[SceneObject] = []
        self.occupied = np.zeros((size, size), bool)

    # -- labelling ----------------------------------------------------------------------------------------------------
    def _register(self, class_name: str, outline_world: Sequence[Point]) -> np.ndarray | None:
        """Label an object; returns its paint mask (None when it is not in view)."""
        polygon = clip_polygon(self.canvas.to_image(outline_world), self.size, self.size)
        mask = self.canvas.polygon_mask(outline_world)
        if polygon_area(polygon) < 4.0 or not mask.any():
            return None
        instance = len(self.objects) + 1
        xs = [p[0] for p in polygon]
        ys = [p[1] for p in polygon]
        self.objects.append(SceneObject(class_name, tuple(polygon), (min(xs), min(ys), max(xs), max(ys)), instance))
        self.canvas.instance[mask] = instance
        self.occupied |= mask
        return mask

    # -- background ---------------------------------------------------------------------------------------------------
    def background(self, crest: float | None, foot: float | None) -> None:
        s, rng, cv = self.size, self.rng, self.canvas
        big = [(-s, -s), (2 * s, -s), (2 * s, 2 * s), (-s, 2 * s)]
        palette = str(rng.choice(list(_SLOPES)))
        base, alt = (_jitter(rng, c, 12) for c in _SLOPES[palette])
        slope = cv.polygon_mask(big)
        cv.paint(slope, base, medium=0.1, fine=6.0, coarse=0.06)
        # Patches of the second colour (bare ground in grass, greener bits in dry grass).
        mix = np.clip(cv.coarse * 1.5 + rng.uniform(-0.6, 0.4), 0, 1)[slope]
        cv.pixels[slope] = (
            cv.pixels[slope] * (1 - mix[:, None] * 0.7) + np.asarray(alt, np.float32) * mix[:, None] * 0.7
        )
        # Grass streaks: short near-vertical strokes, darker and lighter.
        n = int(s * s / 160)
        for factor in (0.82, 1.12):
            xs, ys = rng.uniform(-0.1 * s, 1.1 * s, n), rng.uniform(-0.1 * s, 1.1 * s, n)
            lengths, lean = rng.uniform(2, 6, n), rng.uniform(-1.5, 1.5, n)
            lines = [((x, y), (x + d, y - h)) for x, y, h, d in zip(xs, ys, lengths, lean, strict=True)]
            cv.scale_colour(cv.lines_mask(lines, 1) & slope, factor)
        if crest is not None:
            sky = cv.polygon_mask([(-s, -s), (2 * s, -s), (2 * s, crest), (-s, crest)])
            top = _jitter(rng, (150, 180, 214) if rng.random() < 0.6 else (196, 200, 206), 14)
            cv.paint(sky, top, medium=0.04, fine=2.0, coarse=0.05)
            # A tree line or hedge along the crest now and then.
            if rng.random() < 0.4:
                hedge = [(x, crest - rng.uniform(2, 0.05 * s)) for x in np.linspace(-0.2 * s, 1.2 * s, 24)]
                hedge += [(1.2 * s, crest + 1), (-0.2 * s, crest + 1)]
                cv.paint(cv.polygon_mask(hedge), _jitter(rng, (58, 74, 48), 10), medium=0.2, fine=6.0)
        if foot is not None:
            ground = cv.polygon_mask([(-s, foot), (2 * s, foot), (2 * s, 2 * s), (-s, 2 * s)])
            colour = (104, 104, 108) if rng.random() < 0.6 else (150, 140, 120)
            cv.paint(ground, _jitter(rng, colour, 12), medium=0.06, fine=9.0)

    # -- objects ------------------------------------------------------------------------------------------------------
    def _channel(self, strip: _Strip, mask: np.ndarray, t0: float, t1: float, shift: Point, concrete, joints) -> None:
        """Concrete rims, a darker inner channel, joints: the part t0..t1 of a channel, within ``mask``."""
        cv, rng = self.canvas, self.rng
        cv.paint(mask, concrete, medium=0.06, fine=5.0)
        inner = cv.polygon_mask(strip.quad(t0, t1, -0.55, 0.55, shift)) & mask
        cv.paint(inner, tuple(c * 0.7 for c in concrete), medium=0.08, fine=5.0)
        if rng.random() < 0.5:  # a trickle of water
            water = cv.polygon_mask(strip.quad(t0, t1, -0.14, 0.14, shift)) & mask
            cv.paint(water, _jitter(rng, (96, 112, 122), 8), medium=0.1, fine=4.0)
        lines = [[strip.point(t, -1.1, shift), strip.point(t, 1.1, shift)] for t in joints if t0 < t < t1]
        cv.scale_colour(cv.lines_mask(lines, 1) & mask, 0.72)

    def _drain(self, class_name: str, condition: str, strip: _Strip, visible: tuple[float, float]) -> None:
        """A drain along ``strip``; its defect is placed within ``visible`` (the t range inside the frame)."""
        cv, rng = self.canvas, self.rng
        v0, v1 = visible
        seen = (v1 - v0) * strip.length  # visible length in pixels
        concrete = _jitter(rng, _CONCRETE, 14)
        step = rng.uniform(0.07, 0.1) * self.size / max(strip.length, 1.0)
        joints = np.arange(step * rng.uniform(0.3, 1.0), 1.0, step)
        width = 2 * max(strip.half_start, strip.half_end)
        if condition == "damaged":
            # A wide gap (>= 13 px at 224) so it survives downscaling to ~56 px.
            gap = max(float(np.clip(rng.uniform(0.12, 0.18) * seen, 13.0, 0.3 * seen)), 13.0) / strip.length
            tb = v0 + rng.uniform(0.3, 0.7) * (v1 - v0)
            # Displaced sideways either way (slope drain) or downward, away from the rock toe (toe drain), never into
            # a neighbour: drains are placed far enough apart for this offset.
            direction = 1.0 if strip.across == (0.0, 1.0) or rng.random() < 0.5 else -1.0
            offset = direction * rng.uniform(0.3, 0.5) * width
            shift = (strip.across[0] * offset, strip.across[1] * offset)
            mask = self._register(class_name, strip.outline(tb, shift))
            if mask is None:
                return
            cv.paint(mask, _jitter(rng, _GAP, 8), medium=0.25, fine=5.0)
            # The two parts, their broken ends retracted irregularly into the gap.
            s_values = np.linspace(-1, 1, 6)
            upper_end = [strip.point(tb - gap / 2 - rng.uniform(0, 0.35 * gap), s) for s in s_values[::-1]]
            upper = [strip.point(0, -1), strip.point(0, 1), *upper_end]
            lower_start = [strip.point(tb + gap / 2 + rng.uniform(0, 0.35 * gap), s, shift) for s in s_values]
            lower = [*lower_start, strip.point(1, 1, shift), strip.point(1, -1, shift)]
            for part, t0, t1, sh in ((upper, 0.0, tb, (0.0, 0.0)), (lower, tb, 1.0, shift)):
                part_mask = cv.polygon_mask(part) & mask
                self._channel(strip, part_mask, t0, t1, sh, concrete, joints)
                # Cracks running from the break into the concrete.
                cracks = []
                for _ in range(int(rng.integers(2, 4))):
                    t = tb - gap / 2 if sh == (0.0, 0.0) else tb + gap / 2
                    direction_t = -1 if sh == (0.0, 0.0) else 1
                    s0 = rng.uniform(-0.9, 0.9)
                    pts = [strip.point(t, s0, sh)]
                    for _k in range(3):
                        t += direction_t * rng.uniform(2.0, 5.0) / strip.length
                        s0 = float(np.clip(s0 + rng.uniform(-0.5, 0.5), -1, 1))
                        pts.append(strip.point(t, s0, sh))
                    cracks.append(pts)
                cv.scale_colour(cv.lines_mask(cracks, 2) & part_mask, 0.35)
            return
        mask = self._register(class_name, strip.outline())
        if mask is None:
            return
        self._channel(strip, mask, 0.0, 1.0, (0.0, 0.0), concrete, joints)
        if condition == "blocked":
            length = float(np.clip(rng.uniform(0.3, 0.5) * seen, 2.5 * width, 0.7 * seen)) / strip.length
            t0 = rng.uniform(v0 + 0.03 * (v1 - v0), max(v0 + 0.04 * (v1 - v0), v1 - 0.03 * (v1 - v0) - length))
            t1 = min(t0 + length, 1.0)
            n = 6
            left = [strip.point(t, -1.4) for t in np.linspace(t0, t1, n)]
            right = [strip.point(t, 1.4) for t in np.linspace(t1, t0, n)]
            # Ragged ends.
            end = [strip.point(t1 + rng.uniform(-0.04, 0.04), s) for s in (-0.5, 0.0, 0.5)]
            start = [strip.point(t0 + rng.uniform(-0.04, 0.04), s) for s in (0.5, 0.0, -0.5)]
            plug = cv.polygon_mask([*left, *end, *right, *start]) & mask
            kind = rng.random()
            base = _SOIL if kind < 0.5 else _LEAVES if kind < 0.8 else (96, 88, 60)
            cv.paint(plug, _jitter(rng, base, 14), medium=0.3, fine=8.0)
            # Lumps of soil, leaves and litter.
            lumps = []
            for _ in range(int(rng.integers(10, 22))):
                t, s = rng.uniform(t0, t1), rng.uniform(-1, 1)
                x, y = strip.point(t, s)
                r = rng.uniform(0.12, 0.3) * width
                lumps.append((x, y, r, r * rng.uniform(0.6, 1.0)))
            palette = (_SOIL, _LEAVES, (70, 52, 34), (118, 132, 58))
            colours = [_jitter(rng, palette[i % 4], 16) for i in range(len(lumps))]
            cv.paint_ellipses(plug, lumps, colours, medium=0.2, fine=8.0)
            litter = []
            for _ in range(int(rng.integers(2, 6))):
                x, y = strip.point(rng.uniform(t0, t1), rng.uniform(-0.7, 0.7))
                r = rng.uniform(0.06, 0.14) * width + 0.8
                litter.append((x, y, r, r))
            colour = ((230, 230, 224), (60, 90, 190), (200, 50, 40), (220, 200, 60))[int(rng.integers(0, 4))]
            cv.paint(cv.ellipses_mask(litter) & plug, colour, medium=0.05, fine=4.0)

    def slope_drain(self, condition: str, x_foot: float, top: float, foot: float) -> None:
        s, rng = self.size, self.rng
        half_foot = rng.uniform(0.04, 0.065) * s
        x_top = x_foot + rng.uniform(-0.05, 0.05) * s
        # Perspective: the far (upper) end looks narrower.
        half_top = half_foot * rng.uniform(0.6, 0.85) if top > -0.05 * s else half_foot * rng.uniform(0.75, 0.95)
        strip = _Strip((x_top, top), (x_foot, foot), half_top, half_foot, (1.0, 0.0))
        # The camera roll/zoom shows roughly world y in [0.06, 0.94] x size.
        visible = ((0.06 * s - top) / (foot - top), (0.94 * s - top) / (foot - top))
        self._drain(
            condition_class("slope drain", condition), condition, strip, (max(visible[0], 0.0), min(visible[1], 1.0))
        )

    def toe_drain(self, condition: str, top: float, height: float) -> None:
        s = self.size
        half = height / 2
        strip = _Strip((-0.3 * s, top + half), (1.3 * s, top + half), half, half, (0.0, 1.0))
        self._drain(
            condition_class("toe drain", condition), condition, strip, ((0.36 * s) / (1.6 * s), (1.24 * s) / (1.6 * s))
        )

    def rock_toe(self, condition: str, top: float, height: float) -> None:
        s, rng, cv = self.size, self.rng, self.canvas
        x0, x1 = -0.3 * s, 1.3 * s
        outline = [(x0, top), (x1, top), (x1, top + height), (x0, top + height)]
        mask = self._register(condition_class("rock toe", condition), outline)
        if mask is None:
            return
        cv.paint(mask, _jitter(rng, (78, 74, 68), 8), medium=0.15, fine=6.0)
        damaged = None
        if condition == "damaged":
            # Visible section: pick it in world x that maps inside the image.
            length = rng.uniform(0.24, 0.38) * s
            start = rng.uniform(0.08 * s, 0.92 * s - length)
            damaged = (start, start + length)
        radius = rng.uniform(0.018, 0.03) * s
        stones = []
        spacing = radius * 1.75
        for row, y in enumerate(np.arange(top + radius * 0.6, top + height + radius * 0.5, spacing * 0.85)):
            for x in np.arange(x0 + (row % 2) * spacing / 2, x1, spacing):
                cx, cy = x + rng.uniform(-0.25, 0.25) * radius, y + rng.uniform(-0.2, 0.2) * radius
                if damaged is not None and damaged[0] + rng.uniform(-1, 1) * radius < cx < damaged[1]:
                    continue
                stones.append((cx, cy, radius * rng.uniform(0.75, 1.1), radius * rng.uniform(0.6, 0.95)))
        grey = rng.uniform(0.85, 1.1)
        tones = rng.uniform(105, 175, len(stones)) * grey
        colours = np.stack(
            [tones * rng.uniform(0.95, 1.05, len(stones)), tones, tones * rng.uniform(0.9, 1.02, len(stones))], axis=1
        )
        cv.paint_ellipses(mask, stones, colours, medium=0.1, fine=6.0)
        if damaged is not None:
            a, b = damaged
            region = [(a + rng.uniform(-0.3, 0.3) * radius, y) for y in np.linspace(top - 2, top + height + 2, 4)]
            region += [(b + rng.uniform(-0.3, 0.3) * radius, y) for y in np.linspace(top + height + 2, top - 2, 4)]
            earth = cv.polygon_mask(region) & mask
            cv.paint(earth, _jitter(rng, (126, 90, 58), 12), medium=0.2, fine=7.0)
            hole = _blob(rng, (a + b) / 2, top + height * 0.55, (b - a) * 0.32, height * 0.38, n=12)
            cv.paint(cv.polygon_mask(hole) & earth, _jitter(rng, (46, 34, 26), 6), medium=0.2, fine=4.0)
            tumbled = []
            for _ in range(int(rng.integers(2, 5))):
                tumbled.append((rng.uniform(a, b), top + height * rng.uniform(0.5, 0.9), radius * 0.7, radius * 0.5))
            cv.paint(cv.ellipses_mask(tumbled) & earth, _jitter(rng, (120, 118, 112), 10), medium=0.1, fine=6.0)

    def vegetation(self, y_min: float, y_max: float) -> None:
        s, rng, cv = self.size, self.rng, self.canvas
        grown = _dilate(self.occupied, 2)
        for _attempt in range(40):
            r = rng.uniform(0.05, 0.1) * s
            if y_max - y_min < 2.2 * r:
                continue
            cx, cy = rng.uniform(0.1 * s, 0.9 * s), rng.uniform(y_min + r, y_max - r)
            outline = _blob(rng, cx, cy, r, r * rng.uniform(0.65, 0.95))
            image_poly = cv.to_image(outline)
            clipped = clip_polygon(image_poly, s, s)
            if polygon_area(clipped) < 0.9 * polygon_area(image_poly):
                continue
            candidate = cv.polygon_mask(outline)
            # Keep two pixels between objects so no pixel belongs to two polygons.
            if (candidate & grown).any():
                continue
            mask = self._register("vegetation", outline)
            if mask is None:
                return
            dark = _jitter(rng, _SHRUB, 12)
            cv.paint(mask, dark, medium=0.2, fine=7.0)
            clusters = [
                (rng.uniform(cx - r, cx + r), rng.uniform(cy - r, cy + r), rng.uniform(0.15, 0.35) * r, 0)
                for _ in range(int(rng.integers(8, 16)))
            ]
            ellipses = [(x, y, rr, rr * 0.8) for x, y, rr, _ in clusters]
            colours = [tuple(c * (1.35, 0.7, 1.15)[i % 3] for c in dark) for i in range(len(clusters))]
            cv.paint_ellipses(mask, ellipses, colours, medium=0.15, fine=7.0)
            if rng.random() < 0.2:  # flowers
                dots = [(rng.uniform(cx - r, cx + r), rng.uniform(cy - r, cy + r), 1.0, 1.0) for _ in range(8)]
                cv.paint(cv.ellipses_mask(dots) & mask, (225, 210, 90), medium=0.05, fine=4.0)
            return

    # -- camera -------------------------------------------------------------------------------------------------------
    def finish(self) -> np.ndarray:
        s, rng, cv = self.size, self.rng, self.canvas
        pixels = cv.pixels
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
        phi = rng.uniform(0, 2 * np.pi)
        light = rng.uniform(0.85, 1.12) * (1.0 + rng.uniform(0.0, 0.3) * (xx * math.cos(phi) + yy * math.sin(phi)))
        pixels *= light[..., None]
        pixels *= np.asarray([rng.uniform(0.94, 1.06) for _ in range(3)], np.float32)
        if rng.random() < 0.35:  # soft shadow of something outside the frame
            shade = Image.new("L", (s, s), 0)
            blob = _blob(
                rng, rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0.2, 0.45) * s, rng.uniform(0.15, 0.4) * s
            )
            ImageDraw.Draw(shade).polygon(blob, fill=255)
            soft = np.asarray(shade.filter(ImageFilter.GaussianBlur(rng.uniform(2, 6))), np.float32) / 255.0
            pixels *= (1.0 - rng.uniform(0.18, 0.38) * soft)[..., None]
        pixels += rng.normal(0.0, rng.uniform(1.5, 6.0), pixels.shape).astype(np.float32)
        image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
        if rng.random() < 0.3:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
        return np.asarray(image)


def render_scene(plan: ScenePlan, size: int = 224, seed: int | Sequence[int] = 0) -> RenderedScene:
    """Draw one inspection scene.

    Args:
        plan: the objects to show (vegetation patches that do not fit are left out; ``objects`` says what was drawn).
        size: image width = height in pixels.
        seed: random seed (an int or a sequence of ints such as ``(seed, index)``).

    Returns:
        The image uint8[size, size, 3], its labelled objects and the instance map int16[size, size].
    """
    rng = np.random.default_rng(seed)
    scene = _Scene(plan, size, rng)
    s = size
    crest = rng.uniform(0.04, 0.14) * s if rng.random() < 0.4 else None
    has_foot = plan.toe_drain is not None or plan.rock_toe is not None
    # The slope's foot: where the rock toe (or toe drain) starts; without one the slope runs out of the frame
    # (upper-slope view), or, in some background images, ends at a road.
    foot = rng.uniform(0.5, 0.64) * s if has_foot or (plan.background and rng.random() < 0.5) else None
    rock_height = rng.uniform(0.09, 0.14) * s if plan.rock_toe is not None else 0.0
    toe_height = rng.uniform(0.065, 0.09) * s if plan.toe_drain is not None else 0.0
    ground = None if foot is None else foot + rock_height + toe_height
    scene.background(crest, ground)
    if plan.rock_toe is not None:
        scene.rock_toe(plan.rock_toe, foot, rock_height)
    if plan.toe_drain is not None:
        scene.toe_drain(plan.toe_drain, foot + rock_height, toe_height)
    # Slope drains, left to right, at least 0.3 x size apart (room for a displaced segment): random positions in the
    # free span, then each shifted by the spacing of the drains before it. Up to 3 fit.
    top = crest if crest is not None else -0.2 * s
    bottom = (foot - 1.0) if foot is not None else 1.2 * s
    count = min(len(plan.slope_drains), 3)
    free = 0.78 - 0.3 * max(count - 1, 0)
    xs = [(0.11 + x + 0.3 * i) * s for i, x in enumerate(np.sort(rng.uniform(0.0, free, count)))]
    for condition, x in zip(plan.slope_drains, xs, strict=False):
        scene.slope_drain(condition, x, top, bottom)
    y_min = (crest if crest is not None else 0.0) + 0.02 * s
    y_max = (foot - 0.02 * s) if foot is not None else 0.98 * s
    for _ in range(plan.vegetation):
        scene.vegetation(y_min, y_max)
    image = scene.finish()
    return RenderedScene(image, tuple(scene.objects), scene.canvas.instance)


# --------------------------------------------------------------------------------------------------------------------
# Dataset writing
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InspectionSummary:
    """What :func:`generate_inspection_dataset` wrote.

    Attributes:
        out: dataset root (holds ``data.yaml``).
        images_per_split: images per split key.
        background_images: images without objects, per split key.
        objects_per_class: objects per class name over all splits (all 9 names).
        objects_per_split: objects per class name per split key.
        seconds: wall time of the generation.
    """

    out: str
    images_per_split: dict[str, int]
    background_images: dict[str, int]
    objects_per_class: dict[str, int]
    objects_per_split: dict[str, dict[str, int]]
    seconds: float = field(compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "out": self.out,
            "images": sum(self.images_per_split.values()),
            "images_per_split": self.images_per_split,
            "background_images": self.background_images,
            "objects": sum(self.objects_per_class.values()),
            "objects_per_class": self.objects_per_class,
            "objects_per_split": self.objects_per_split,
            "seconds": round(self.seconds, 3),
        }


def data_yaml_text() -> str:
    """The data.yaml a Roboflow YOLO export of the 9 condition classes carries (paths relative as Roboflow writes)."""
    return (
        "# Synthetic infrastructure-inspection scenes (opsvlm.tasks.inspection.data.synthetic), Roboflow YOLO layout.\n"
        "train: ../train/images\n"
        "val: ../valid/images\n"
        "test: ../test/images\n"
        "\n"
        f"nc: {len(CONDITION_CLASSES)}\n"
        f"names: {json.dumps(list(CONDITION_CLASSES))}\n"
    )


def label_lines(objects: Sequence[SceneObject], size: int) -> list[str]:
    """YOLO segmentation rows ``class x1 y1 ... xn yn`` (normalised, 6 decimals) for a scene's objects."""
    rows = []
    for obj in objects:
        coords = " ".join(f"{min(max(v / size, 0.0), 1.0):.6f}" for point in obj.polygon for v in point)
        rows.append(f"{CONDITION_CLASSES.index(obj.class_name)} {coords}")
    return rows


def generate_inspection_dataset(
    out: str | Path, config: InspectionConfig, overwrite: bool = False
) -> InspectionSummary:
    """Render ``config.images`` scenes and write them in the Roboflow YOLO segmentation layout under ``out``.

    Args:
        out: dataset root; ``data.yaml`` and ``train``/``valid``/``test`` are written there.
        config: settings.
        overwrite: replace an existing ``data.yaml`` and split folders there (otherwise refuse).

    Returns:
        Counts of what was written.

    Raises:
        FileExistsError: ``out`` already holds a dataset and ``overwrite`` is false.
    """
    started = time.perf_counter()
    root = Path(out)
    existing = [root / "data.yaml", *(root / folder for folder in SPLIT_FOLDERS.values())]
    if any(p.exists() for p in existing):
        if not overwrite:
            raise FileExistsError(f"{root} already holds a dataset (data.yaml or split folders); pass overwrite")
        for p in existing:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    for folder in SPLIT_FOLDERS.values():
        (root / folder / "images").mkdir(parents=True, exist_ok=True)
        (root / folder / "labels").mkdir(parents=True, exist_ok=True)
    images_per_split: Counter = Counter()
    background: Counter = Counter()
    per_split: dict[str, Counter] = {key: Counter() for key in SPLIT_FOLDERS}
    for index, (key, forced) in enumerate(dataset_plans(config)):
        rng = np.random.default_rng([config.seed, index, 1])
        plan = forced if forced is not None else sample_plan(rng)
        scene = render_scene(plan, config.size, (config.seed, index, 2))
        folder = root / SPLIT_FOLDERS[key]
        stem = f"insp_{index:05d}"
        image = Image.fromarray(scene.image)
        if config.image_format == "jpg":
            image.save(folder / "images" / f"{stem}.jpg", format="JPEG", quality=config.jpeg_quality)
        else:
            image.save(folder / "images" / f"{stem}.png", format="PNG")
        rows = label_lines(scene.objects, config.size)
        (folder / "labels" / f"{stem}.txt").write_text("".join(row + "\n" for row in rows), encoding="utf-8")
        images_per_split[key] += 1
        background[key] += not scene.objects
        per_split[key].update(obj.class_name for obj in scene.objects)
    (root / "data.yaml").write_text(data_yaml_text(), encoding="utf-8")
    total: Counter = Counter()
    for counts in per_split.values():
        total.update(counts)
    return InspectionSummary(
        out=str(root),
        images_per_split={key: images_per_split[key] for key in SPLIT_FOLDERS},
        background_images={key: background[key] for key in SPLIT_FOLDERS},
        objects_per_class={name: total[name] for name in CONDITION_CLASSES},
        objects_per_split={key: {name: per_split[key][name] for name in CONDITION_CLASSES} for key in SPLIT_FOLDERS},
        seconds=time.perf_counter() - started,
    )
