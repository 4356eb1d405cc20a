"""Per-box figures of a per-second operation sequence: boxes, time per operation, cycle time, procedure deviations.

Pure numpy. Predictions carry no box number, so boxes are found from the procedure (``PROCEDURE`` of the operations
task: ``Picking, Relocate Item Label, Assemble Box, Insert Items, Close Box, Attach Box Label, Scan Label, Fill out
Order, Attach Shipping Label, [Put on Back Table]``): a new box starts when the work jumps back in the procedure by
at least ``reset_drop`` steps from the furthest step reached in the current box (``Attach Shipping Label -> Picking``
is a jump of 8). Shorter jumps back are repeats inside the same box (real annotations have ``Picking, Relocate Item
Label, Picking, Relocate Item Label`` and ``Insert Items, Assemble Box`` within one box).

Between two consecutive operations of a box (Null gaps and repeats of the same label skipped), a transition is
*out of procedure* when it is not to the next step: a ``skip`` (steps left out, listed; optional steps never count)
or a ``repeat`` (back to an earlier step). A box also lists the required steps it never did (``missing_steps``;
boxes cut by the recording are flagged ``at_recording_edge``: the first box when it does not start with the first
step, the last when it does not reach the last required step).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from opsvlm.tasks.operations.labels import OPTIONAL_IDS, PROCEDURE
from opsvlm.tasks.operations.timeline.grid import INDEX_OF_ID, LABELS, NULL_INDEX, runs_of

PROCEDURE_INDICES: tuple[int, ...] = tuple(INDEX_OF_ID[op] for op in PROCEDURE)
OPTIONAL_INDICES: frozenset[int] = frozenset(INDEX_OF_ID[op] for op in OPTIONAL_IDS)
STEP_OF: dict[int, int] = {label: step for step, label in enumerate(PROCEDURE_INDICES)}
DEFAULT_RESET_DROP = 4


def assign_boxes(labels: np.ndarray, reset_drop: int = DEFAULT_RESET_DROP) -> np.ndarray:
    """Box number (1, 2, ...) of every second.

    Args:
        labels: int[T] label indices.
        reset_drop: Procedure steps the work must jump back to start a new box.

    Returns:
        int64[T]: Null seconds belong to the box before them; Null seconds before the first operation get 0.
    """
    boxes = np.zeros(len(labels), dtype=np.int64)
    box, furthest = 0, -1
    for run in runs_of(np.asarray(labels)):
        if run.label != NULL_INDEX:
            step = STEP_OF[run.label]
            if box == 0 or step <= furthest - reset_drop:
                box, furthest = box + 1, step
            furthest = max(furthest, step)
        boxes[run.start : run.end] = box
    return boxes


@dataclass
class Transition:
    """An out-of-procedure transition inside a box."""

    box: int
    at_s: float
    from_operation: str
    to_operation: str
    kind: str  # "skip" or "repeat"
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "box": self.box,
            "at_s": round(self.at_s, 3),
            "from": self.from_operation,
            "to": self.to_operation,
            "kind": self.kind,
            "skipped": self.skipped,
        }


@dataclass
class BoxFigures:
    """One box of a session.

    Attributes:
        box: Box number (1-based, in order).
        start_s: Session time its first operation starts.
        end_s: Session time its last operation ends.
        cycle_time_s: From its start to the next box's start (the last box: to its end).
        operation_time_s: Seconds per operation name (every operation listed, 0 when absent).
        operations: The operations in order (runs; Null gaps left out).
        missing_steps: Required procedure steps it never did.
        transitions: Its out-of-procedure transitions.
        at_recording_edge: Whether the recording starts or ends inside it (figures may be cut short).
    """

    box: int
    start_s: float
    end_s: float
    cycle_time_s: float
    operation_time_s: dict[str, float]
    operations: list[str]
    missing_steps: list[str]
    transitions: list[Transition]
    at_recording_edge: bool

    def to_dict(self) -> dict:
        return {
            "box": self.box,
            "start_s": round(self.start_s, 3),
            "end_s": round(self.end_s, 3),
            "cycle_time_s": round(self.cycle_time_s, 3),
            "operation_time_s": self.operation_time_s,
            "operations": self.operations,
            "missing_steps": self.missing_steps,
            "out_of_procedure": [t.to_dict() for t in self.transitions],
            "at_recording_edge": self.at_recording_edge,
        }


def classify_transition(current: int, following: int) -> tuple[str, list[int]] | None:
    """``None`` for an in-procedure step, else ``("skip", skipped labels)`` or ``("repeat", [])``."""
    a, b = STEP_OF[current], STEP_OF[following]
    if b <= a:
        return "repeat", []
    skipped = [label for label in PROCEDURE_INDICES[a + 1 : b] if label not in OPTIONAL_INDICES]
    return ("skip", skipped) if skipped else None


def box_figures(labels: np.ndarray, boxes: np.ndarray, cell_starts_s: np.ndarray) -> list[BoxFigures]:
    """Figures of every box.

    Args:
        labels: int[T] label indices.
        boxes: int[T] from :func:`assign_boxes`.
        cell_starts_s: float[T] session time of each second's start.

    Returns:
        One :class:`BoxFigures` per box, in order.
    """
    labels, boxes = np.asarray(labels), np.asarray(boxes)
    starts = np.asarray(cell_starts_s, dtype=np.float64)
    out: list[BoxFigures] = []
    numbers = [b for b in np.unique(boxes) if b > 0]
    for n, number in enumerate(numbers):
        cells = np.flatnonzero((boxes == number) & (labels != NULL_INDEX))
        first, last = int(cells[0]), int(cells[-1])
        box_labels = labels[first : last + 1]
        seconds = {
            LABELS[i]: float(np.sum(box_labels == i)) for i in PROCEDURE_INDICES
        }  # every operation, 0 when absent
        ops = [r.label for r in runs_of(box_labels) if r.label != NULL_INDEX]
        sequence = [ops[0]] + [b for a, b in itertools.pairwise(ops) if a != b]
        transitions = []
        run_starts = [first + r.start for r in runs_of(box_labels) if r.label != NULL_INDEX]
        for k in range(1, len(ops)):
            if ops[k] == ops[k - 1]:
                continue
            verdict = classify_transition(ops[k - 1], ops[k])
            if verdict is not None:
                kind, skipped = verdict
                transitions.append(
                    Transition(
                        int(number),
                        float(starts[run_starts[k]]),
                        LABELS[ops[k - 1]],
                        LABELS[ops[k]],
                        kind,
                        [LABELS[s] for s in skipped],
                    )
                )
        start_s, end_s = float(starts[first]), float(starts[last] + 1.0)
        if n + 1 < len(numbers):
            next_first = int(np.flatnonzero((boxes == numbers[n + 1]) & (labels != NULL_INDEX))[0])
            cycle = float(starts[next_first]) - start_s
        else:
            cycle = end_s - start_s
        done = set(ops)
        missing = [LABELS[i] for i in PROCEDURE_INDICES if i not in OPTIONAL_INDICES and i not in done]
        # cut by the recording: the first box does not start with the first step, the last does not reach the end
        edge = (n == 0 and ops[0] != PROCEDURE_INDICES[0]) or (n + 1 == len(numbers) and not _finished(ops))
        out.append(
            BoxFigures(
                int(number), start_s, end_s, cycle, seconds, [LABELS[i] for i in sequence], missing, transitions, edge
            )
        )
    return out


def _finished(ops: list[int]) -> bool:
    required = [label for label in PROCEDURE_INDICES if label not in OPTIONAL_INDICES]
    return STEP_OF[ops[-1]] >= STEP_OF[required[-1]]


def session_figures(figures: list[BoxFigures], labels: np.ndarray) -> dict:
    """Session totals: seconds per operation, boxes, cycle-time statistics, out-of-procedure counts.

    Cycle-time statistics use the boxes not cut by the recording's edges when there are any (else all boxes).
    """
    labels = np.asarray(labels)
    inner = [f for f in figures if not f.at_recording_edge] or figures
    cycles = np.array([f.cycle_time_s for f in inner], dtype=np.float64)
    kinds = [t.kind for f in figures for t in f.transitions]
    return {
        "operation_time_s": {LABELS[i]: float(np.sum(labels == i)) for i in PROCEDURE_INDICES},
        "null_time_s": float(np.sum(labels == NULL_INDEX)),
        "boxes": len(figures),
        "cycle_time_s_mean": float(cycles.mean()) if cycles.size else float("nan"),
        "cycle_time_s_median": float(np.median(cycles)) if cycles.size else float("nan"),
        "cycle_time_boxes": int(cycles.size),
        "skips": kinds.count("skip"),
        "repeats": kinds.count("repeat"),
        "boxes_with_missing_steps": sum(1 for f in figures if f.missing_steps and not f.at_recording_edge),
    }


__all__ = [
    "DEFAULT_RESET_DROP",
    "OPTIONAL_INDICES",
    "PROCEDURE_INDICES",
    "STEP_OF",
    "BoxFigures",
    "Transition",
    "assign_boxes",
    "box_figures",
    "classify_transition",
    "session_figures",
]
