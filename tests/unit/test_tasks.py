"""The task abstraction: lookup, and the operations task's answer slots, parsing and metrics."""

from __future__ import annotations

import numpy as np
import pytest

from opsvlm.tasks.base import get_task
from opsvlm.tasks.operations import LABEL_NAMES, ClipInput, OperationsTask, target_text
from opsvlm.tasks.operations.metrics import ClipPrediction, ClipTruth, compute_metrics


def test_get_task_names_the_known_tasks() -> None:
    assert isinstance(get_task("operations"), OperationsTask)
    with pytest.raises(KeyError, match="known tasks: \\['inspection', 'operations'\\]"):
        get_task("weather")


def _clip(length: float = 2.0) -> ClipInput:
    return ClipInput(np.zeros((2, 28, 28, 3), np.uint8), [0.0, 1.0], length)


def test_operations_slots_spell_exactly_the_target_answer() -> None:
    task, clip = OperationsTask(), _clip(2.0)
    chosen = ['{"operation": "', "Scan Label", '", "start_s": ', "1.5", ', "end_s": ', "1.9"]
    chosen += [', "next_operation": "', "Null", '"}']
    for index, value in enumerate(chosen):
        assert value in task.answer_slot(index, chosen[:index], clip), index
    assert task.answer_slot(len(chosen), chosen, clip) is None
    assert "".join(chosen) == target_text("Scan Label", 1.5, 1.9, "Null")
    # the end must come after the chosen start; the start leaves room for an end
    assert task.answer_slot(5, chosen[:5], clip) == ["1.6", "1.7", "1.8", "1.9", "2.0"]
    assert "2.0" not in task.answer_slot(3, chosen[:3], clip)
    assert task.answer_slot(1, [], clip) == LABEL_NAMES


def test_operations_answer_from_slots_and_parse_agree() -> None:
    task, clip = OperationsTask(), _clip(4.0)
    chosen = ['{"operation": "', "Picking", '", "start_s": ', "0.5", ', "end_s": ', "3.0"]
    chosen += [', "next_operation": "', "Assemble Box", '"}']
    scores = {1: {label: (0.9 if label == "Picking" else 0.01) for label in LABEL_NAMES}, 7: {"Assemble Box": 1.0}}
    answer = task.answer_from_slots(chosen, scores, "".join(chosen))
    parsed = task.parse_answer("".join(chosen), clip)
    assert (answer.operation, answer.start_s, answer.end_s, answer.next_operation) == (
        parsed.operation,
        parsed.start_s,
        parsed.end_s,
        parsed.next_operation,
    )
    assert answer.confidence == 0.9


def test_operations_metrics_equal_the_metrics_module() -> None:
    rows = [
        {"dominant_operation": "Picking", "temporal_segment": [0.0, 4.0], "next_operation": "Assemble Box"},
        {"dominant_operation": "Close Box", "temporal_segment": [1.0, 3.0], "next_operation": "Null"},
    ]
    for row in rows:
        row.update(start_s=10.0, end_s=14.0)
    answers = [OperationsTask().parse_answer(target_text("Picking", 0.0, 3.0, "Null"), _clip(4.0)), None]
    expected = compute_metrics(
        [ClipTruth("Picking", 0.0, 4.0, "Assemble Box", 4.0), ClipTruth("Close Box", 1.0, 3.0, "Null", 4.0)],
        [ClipPrediction("Picking", 0.0, 3.0, "Null"), None],
    )
    assert OperationsTask().compute_metrics(rows, answers) == expected
