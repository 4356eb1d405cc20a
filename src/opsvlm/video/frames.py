"""Frame-folder media: one JPEG per frame, named by its capture time (the layout OpenPack's RGB frames use).

A session's frames live under ``<folder>/YYYY/MM/DD/HH/MM/YYYYMMDD_HHMMSS_mmm.jpg``; a frame is placed in time by
its name, not by its position, so gaps and jitter in capture survive. Pure Python.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

__all__ = ["FRAME_NAME_FORMAT", "frame_name", "frame_time_from_name", "list_frames"]

FRAME_NAME_FORMAT = "%Y%m%d_%H%M%S_%f"


def frame_time_from_name(path: str | Path) -> dt.datetime:
    """Capture time encoded in a frame name ``YYYYMMDD_HHMMSS_mmm.jpg`` (naive, local time)."""
    stem = Path(path).stem
    try:
        return dt.datetime.strptime(stem, FRAME_NAME_FORMAT)
    except ValueError:
        raise ValueError(f"{path}: frame name is not YYYYMMDD_HHMMSS_mmm.jpg") from None


def frame_name(when: dt.datetime) -> str:
    """Relative path of a frame captured at ``when`` inside a frames folder."""
    return f"{when:%Y/%m/%d/%H/%M}/{when:%Y%m%d_%H%M%S}_{when.microsecond // 1000:03d}.jpg"


def list_frames(directory: str | Path) -> list[Path]:
    """All JPEG frames of a frames folder, in capture-time order."""
    return sorted(Path(directory).rglob("*.jpg"), key=lambda p: p.stem)
