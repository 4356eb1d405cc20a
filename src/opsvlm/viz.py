"""Pictures for people: contact sheets of sampled frames (logged to MLflow next to runs)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "contact_sheet",
]


def contact_sheet(clips: Sequence[tuple[np.ndarray, str]], thumb_height: int = 96):
    """One row per clip: its sampled frames side by side under a caption.

    Args:
        clips: ``(frames uint8[K, H, W, 3], caption)`` pairs.
        thumb_height: Height of each thumbnail in pixels.

    Returns:
        A ``PIL.Image.Image`` (RGB).
    """
    from PIL import Image, ImageDraw

    caption_h, pad = 14, 4
    rows = []
    for frames, caption in clips:
        thumbs = []
        for frame in frames:
            image = Image.fromarray(np.asarray(frame))
            width = max(1, round(image.width * thumb_height / image.height))
            thumbs.append(image.resize((width, thumb_height)))
        row = Image.new("RGB", (sum(t.width for t in thumbs) + pad * (len(thumbs) + 1), thumb_height + caption_h + pad))
        ImageDraw.Draw(row).text((pad, 1), caption, fill=(255, 255, 255))
        x = pad
        for thumb in thumbs:
            row.paste(thumb, (x, caption_h))
            x += thumb.width + pad
        rows.append(row)
    sheet = Image.new("RGB", (max((r.width for r in rows), default=1), sum(r.height for r in rows) or 1))
    y = 0
    for row in rows:
        sheet.paste(row, (0, y))
        y += row.height
    return sheet
