"""Files of an annotated recording: OpenPack operations CSV, OpenPack 1 Hz CSV, timeline JSON, per-box figures CSV.

Pure Python/numpy (the Gantt picture is in :mod:`.plot`).

* ``<session>.csv`` in the ``openpack-operations`` schema (``uuid, user, session, box, id, operation, start, end,
  actions``) written by the project's own writer, so ``operations.data.openpack.read_operations_csv`` reads it back.
  Predicted rows start and end on whole seconds (the 1 Hz cells); Null seconds are not rows (as in OpenPack's files,
  time between rows is Null). The reader puts the origin at the first row, so the origin of the file is the first
  predicted operation's start (absolute times are what round-trips).
* ``<session>-1hz.csv`` in the ``openpack-operations-1hz`` schema (``unixtime, user, session, box, id``), one row per
  cell, ``unixtime`` in milliseconds; the box column is empty before the first box.
* ``<session>.json``: :meth:`SessionAnnotation.to_json`.
* ``figures.csv``: one row per (session, box) and one ``all`` row per session (:func:`figures_rows`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path

from opsvlm.tasks.operations.data.openpack import Segment, SessionTimeline, write_operations_csv
from opsvlm.tasks.operations.timeline.boxes import PROCEDURE_INDICES
from opsvlm.tasks.operations.timeline.grid import LABELS, NULL_INDEX, OP_IDS, runs_of
from opsvlm.tasks.operations.timeline.session import SessionAnnotation

ONE_HZ_COLUMNS = ("unixtime", "user", "session", "box", "id")
FIGURE_COLUMNS = (
    "subject",
    "session",
    "box",
    "start_s",
    "end_s",
    "cycle_time_s",
    *(f"time_s/{LABELS[i]}" for i in PROCEDURE_INDICES),
    "skips",
    "repeats",
    "missing_steps",
    "at_recording_edge",
)


def predicted_timeline(annotation: SessionAnnotation) -> SessionTimeline | None:
    """The output labels as an OpenPack timeline (Null runs left out); ``None`` when every second is Null."""
    runs = [r for r in runs_of(annotation.labels) if r.label != NULL_INDEX]
    if not runs:
        return None
    starts = annotation.grid.starts_s
    first = float(starts[runs[0].start])
    origin = annotation.grid.absolute(first)
    segments = tuple(
        Segment(
            op_id=OP_IDS[r.label],
            start_s=round(float(starts[r.start]) - first, 6),
            end_s=round(float(starts[r.end - 1]) + 1.0 - first, 6),
            box=int(annotation.boxes[r.start]) or None,
        )
        for r in runs
    )
    return SessionTimeline(annotation.subject, annotation.session, origin, segments)


def write_operations(path: str | Path, annotation: SessionAnnotation) -> Path | None:
    """Write the ``openpack-operations`` CSV (``None``, nothing written, when no operation was predicted)."""
    timeline = predicted_timeline(annotation)
    return None if timeline is None else write_operations_csv(path, timeline)


def write_one_hz(path: str | Path, annotation: SessionAnnotation) -> Path:
    """Write the ``openpack-operations-1hz`` CSV: one row per second."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(ONE_HZ_COLUMNS)
        for unixtime, label, box in zip(
            annotation.grid.unixtime_ms.tolist(), annotation.labels.tolist(), annotation.boxes.tolist(), strict=True
        ):
            writer.writerow([unixtime, annotation.subject, annotation.session, box or "", OP_IDS[label]])
    return path


def _clean(value):
    """JSON-safe: NaN/inf become null (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_json(path: str | Path, data: dict) -> Path:
    """Write strict JSON (NaN -> null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=1))
    return path


def figures_rows(annotation: SessionAnnotation) -> list[dict]:
    """Rows of ``figures.csv`` for one recording: one per box, then the session's ``all`` row."""
    rows = []
    for f in annotation.figures:
        rows.append(
            {
                "subject": annotation.subject,
                "session": annotation.session,
                "box": f.box,
                "start_s": round(f.start_s, 3),
                "end_s": round(f.end_s, 3),
                "cycle_time_s": round(f.cycle_time_s, 3),
                **{f"time_s/{name}": seconds for name, seconds in f.operation_time_s.items()},
                "skips": sum(1 for t in f.transitions if t.kind == "skip"),
                "repeats": sum(1 for t in f.transitions if t.kind == "repeat"),
                "missing_steps": ";".join(f.missing_steps),
                "at_recording_edge": f.at_recording_edge,
            }
        )
    summary = annotation.summary
    starts = annotation.grid.starts_s
    rows.append(
        {
            "subject": annotation.subject,
            "session": annotation.session,
            "box": "all",
            "start_s": round(float(starts[0]), 3) if annotation.seconds else 0.0,
            "end_s": round(float(starts[-1] + 1.0), 3) if annotation.seconds else 0.0,
            "cycle_time_s": round(summary["cycle_time_s_mean"], 3) if summary["boxes"] else "",
            **{f"time_s/{name}": seconds for name, seconds in summary["operation_time_s"].items()},
            "skips": summary["skips"],
            "repeats": summary["repeats"],
            "missing_steps": summary["boxes_with_missing_steps"],
            "at_recording_edge": "",
        }
    )
    return rows


def write_figures(path: str | Path, annotations: Iterable[SessionAnnotation]) -> Path:
    """Write ``figures.csv`` for several recordings (``cycle_time_s`` of an ``all`` row is the session mean over
    boxes not cut by the recording; ``missing_steps`` there counts such boxes with missing steps)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIGURE_COLUMNS)
        writer.writeheader()
        for annotation in annotations:
            writer.writerows(figures_rows(annotation))
    return path


def session_stem(annotation: SessionAnnotation) -> str:
    """File stem of a recording's outputs: ``<subject>_<session>`` (just the session for a plain video)."""
    return f"{annotation.subject}_{annotation.session}" if annotation.subject else annotation.session


def write_session(out_dir: str | Path, annotation: SessionAnnotation, scores: dict | None = None) -> dict[str, Path]:
    """Write one recording's CSVs and JSON into ``out_dir``; returns ``{kind: path}`` (no ``operations`` entry when
    nothing but Null was predicted)."""
    out = Path(out_dir)
    stem = session_stem(annotation)
    paths = {
        "one_hz": write_one_hz(out / f"{stem}-1hz.csv", annotation),
        "json": write_json(out / f"{stem}.json", annotation.to_json(scores)),
    }
    operations = write_operations(out / f"{stem}.csv", annotation)
    if operations is not None:
        paths["operations"] = operations
    return paths


__all__ = [
    "FIGURE_COLUMNS",
    "ONE_HZ_COLUMNS",
    "figures_rows",
    "predicted_timeline",
    "session_stem",
    "write_figures",
    "write_json",
    "write_one_hz",
    "write_operations",
    "write_session",
]
