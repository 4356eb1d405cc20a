"""Serving objects in images: decoding uploads and validating stage-1 detections, with clear 4xx errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from opsvlm.serving import ServingError, ServingLimits
from opsvlm.serving.media import decode_image
from opsvlm.serving.objects import parse_object_detections

LIMITS = ServingLimits()


def _png(width: int = 40, height: int = 30) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_image_gives_rgb_pixels() -> None:
    image = decode_image(_png(), "site.png", LIMITS)
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8 and int(image[0, 0, 0]) == 120


@pytest.mark.parametrize(
    ("data", "name", "status", "code"),
    [
        (b"", "site.png", 422, "empty_image"),
        (b"this is text", "site.jpg", 422, "undecodable_image"),
        (_png()[:40], "cut.png", 422, "undecodable_image"),
    ],
)
def test_decode_image_refuses_bad_uploads(data: bytes, name: str, status: int, code: str) -> None:
    with pytest.raises(ServingError) as caught:
        decode_image(data, name, LIMITS)
    assert (caught.value.status, caught.value.reason) == (status, code)
    assert name in caught.value.detail


def test_detections_are_normalised_and_validated() -> None:
    raw = [
        {"label": "slope drain", "box": [20, 10, 60, 90], "normalized": False, "score": 0.8},
        {"label": "rock_toe", "box": [0.0, 0.8, 1.0, 1.0], "normalized": True},
    ]
    first, second = parse_object_detections(json.dumps(raw), 200, 100, "site.jpg", 32)
    assert first.box == pytest.approx((0.1, 0.1, 0.3, 0.9)) and first.object_type == "slope drain"
    assert second.object_type == "rock toe" and second.score is None and second.index == 1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "detections"),
        ("[{", "not valid JSON"),
        ([], "non-empty list"),
        ([{"label": "bridge", "box": [0, 0, 1, 1], "normalized": True}], "detections[0].label"),
        ([{"label": "slope drain", "box": [0.5, 0.5, 0.2, 0.9], "normalized": True}], "detections[0].box"),
        ([{"label": "slope drain", "box": [0, 0, 500, 50], "normalized": False}], "outside the 200x100 image"),
        ([{"label": "slope drain", "box": [0, 0, 1, 1]}], "detections[0].normalized"),
    ],
)
def test_bad_detections_get_422_naming_the_field(raw, message: str) -> None:
    with pytest.raises(ServingError) as caught:
        parse_object_detections(raw, 200, 100, "site.jpg", 32)
    assert caught.value.status == 422 and message in caught.value.detail
