"""Baselines scored side by side with the model (pure functions over prediction records).

* majority: the most frequent dominant and next operation of the training split, segment = the whole clip;
* grammar prior: the model's operation and segment, next = the most frequent successor of that operation in the
  training split's timelines;
* whole-clip segment: the model's operations with the segment set to the whole clip (most 5 s clips lie inside one
  operation, so this shows how much of tIoU@0.5 carries no signal);
* oracle grammar (upper reference for AA@1, not a baseline: it sees the truth): the true operation and segment,
  next = its most frequent successor.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from opsvlm.tasks.operations.labels import NULL, operation_by_id

if TYPE_CHECKING:
    from opsvlm.tasks.operations.data.openpack import SessionTimeline

__all__ = [
    "grammar_predictions",
    "majority_predictions",
    "most_frequent_successor",
    "successor_counts",
    "whole_clip_segment",
]


def successor_counts(timelines: Iterable[SessionTimeline]) -> dict[str, Counter]:
    """How often each operation is followed by each other operation (Null gaps and repeats skipped).

    Returns:
        ``{operation name: Counter({next operation name: count})}``; the last operation of a session is followed by
        ``Null`` (nothing follows), as in the clip labels.
    """
    from opsvlm.tasks.operations.data.clips import (
        label_runs,  # the data readers import the label set: not at module level
    )

    counts: dict[str, Counter] = defaultdict(Counter)
    for timeline in timelines:
        ops = [run.op_id for run in label_runs(timeline) if run.op_id != NULL.id]
        for current, following in zip(ops, [*ops[1:], NULL.id], strict=True):
            if current != following:
                counts[operation_by_id(current).name][operation_by_id(following).name] += 1
    return dict(counts)


def most_frequent_successor(counts: dict[str, Counter], fallback: str) -> dict[str, str]:
    """``{operation: its most frequent successor}`` (ties to the alphabetically first; unseen ops -> fallback)."""
    table = {op: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for op, c in counts.items() if c}
    return defaultdict(lambda: fallback, table)


def majority_predictions(train_rows: Sequence[Mapping], rows: Sequence[Mapping]) -> list[dict]:
    """The training split's most frequent dominant and next operation for every clip, segment = the whole clip."""
    operation = Counter(r["dominant_operation"] for r in train_rows).most_common(1)[0][0]
    following = Counter(r["next_operation"] for r in train_rows).most_common(1)[0][0]
    return [
        {"operation": operation, "start_s": 0.0, "end_s": r["end_s"] - r["start_s"], "next_operation": following}
        for r in rows
    ]


def whole_clip_segment(rows: Sequence[Mapping], answers: Sequence[Mapping | None]) -> list[dict | None]:
    """The model's operations with the segment replaced by the whole clip: what tIoU gives for free."""
    return [
        None if a is None else {**a, "start_s": 0.0, "end_s": r["end_s"] - r["start_s"]}
        for r, a in zip(rows, answers, strict=True)
    ]


def grammar_predictions(
    rows: Sequence[Mapping], answers: Sequence[Mapping | None], successor: dict[str, str], oracle: bool = False
) -> list[dict | None]:
    """Next operation from the grammar, applied to the model's operation (or the true one when ``oracle``).

    Args:
        rows: [n] clip rows (labels).
        answers: [n] the model's answers (mappings with ``operation``, ``start_s``, ``end_s``) or ``None``.
        successor: From :func:`most_frequent_successor`.
        oracle: Use the true operation and segment (an upper reference that sees the truth, not a baseline).
    """
    out: list[dict | None] = []
    for r, a in zip(rows, answers, strict=True):
        if oracle:
            start, end = r["temporal_segment"]
            operation = r["dominant_operation"]
            out.append({"operation": operation, "start_s": start, "end_s": end, "next_operation": successor[operation]})
        elif a is not None:
            out.append({**a, "next_operation": successor[a["operation"]]})
        else:
            out.append(None)
    return out
