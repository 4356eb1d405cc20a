"""The tasks' evaluation hooks on hand-built cases: boundary tIoU, the whole-clip segment, the inspection baselines
that get the object type as the model does, macro-F1 without vegetation, bootstrap groups."""

from __future__ import annotations

import pytest

from opsvlm.tasks.base import get_task
from opsvlm.tasks.inspection import CLASSES_OF_TYPE, NON_VEGETATION_CLASSES
from opsvlm.tasks.operations import baselines


def clip(op: str, segment: tuple[float, float], start_s: float = 0.0, session: str = "S0100") -> dict:
    return {
        "clip_id": f"{session}/{start_s}",
        "subject": "U0101",
        "session": session,
        "start_s": start_s,
        "end_s": start_s + 5.0,
        "dominant_operation": op,
        "temporal_segment": list(segment),
        "next_operation": "Scan Label",
    }


def answer(op: str, start: float, end: float, following: str = "Scan Label") -> dict:
    return {"operation": op, "start_s": start, "end_s": end, "next_operation": following}


def test_boundary_tiou_counts_only_clips_where_the_operation_changes() -> None:
    task = get_task("operations")
    rows = [
        clip("Picking", (0.0, 5.0)),
        clip("Picking", (0.0, 5.0)),
        clip("Picking", (0.0, 3.0)),
        clip("Picking", (1.0, 5.0)),
    ]
    # whole-clip answers: IoU 1, 1, 0.6 (hit), 0.8 (hit) -> all hits
    whole = [answer("Picking", 0.0, 5.0)] * 4
    metrics = task.compute_metrics(rows, whole)
    assert metrics["n_boundary_clips"] == 2
    assert metrics["tiou_at_0_5"] == 1.0 and metrics["boundary_tiou_at_0_5"] == 1.0
    assert metrics["boundary_mean_tiou"] == pytest.approx(0.7)  # what the 0.5 threshold hides
    # segments that miss the boundary clips: IoU 1, 1, then [3.5, 5] vs [0, 3] = 0 and [0, 0.5] vs [1, 5] = 0
    off = [
        answer("Picking", 0.0, 5.0),
        answer("Picking", 0.0, 5.0),
        answer("Picking", 3.5, 5.0),
        answer("Picking", 0.0, 0.5),
    ]
    metrics = task.compute_metrics(rows, off)
    assert metrics["tiou_at_0_5"] == 0.5 and metrics["boundary_tiou_at_0_5"] == 0.0
    inside_only = task.compute_metrics(rows[:2], whole[:2])
    assert (
        inside_only["n_boundary_clips"] == 0
        and inside_only["boundary_tiou_at_0_5"] != inside_only["boundary_tiou_at_0_5"]
    )


def test_whole_clip_and_grammar_baselines_keep_the_models_operation() -> None:
    rows = [clip("Picking", (0.0, 3.0)), clip("Close Box", (1.0, 5.0))]
    answers = [answer("Picking", 0.0, 2.0, "Null"), None]
    assert baselines.whole_clip_segment(rows, answers) == [answer("Picking", 0.0, 5.0, "Null"), None]
    grammar = baselines.grammar_predictions(rows, answers, {"Picking": "Relocate Item Label"})
    assert grammar == [answer("Picking", 0.0, 2.0, "Relocate Item Label"), None]
    oracle = baselines.grammar_predictions(
        rows, answers, {"Picking": "X", "Close Box": "Attach Box Label"}, oracle=True
    )
    assert oracle[1] == answer("Close Box", 1.0, 5.0, "Attach Box Label")


def test_operations_groups_are_blocks_of_a_session() -> None:
    task = get_task("operations")
    groups = [task.group_of(clip("Picking", (0, 5), start_s=t)) for t in (0.0, 2.5, 27.5, 30.0, 32.5)]
    assert groups[:3] == ["U0101/S0100/0"] * 3 and groups[3:] == ["U0101/S0100/1"] * 2
    assert task.group_of(clip("Picking", (0, 5), session="S0200")) != groups[0]


def obj(condition: str, image: str = "train/a") -> dict:
    kind = {c: k for k, cs in CLASSES_OF_TYPE.items() for c in cs}[condition]
    return {"example_id": f"{image}#{condition}", "image_id": image, "condition": condition, "target_type": kind}


def test_inspection_baselines_get_the_type_as_the_model_does() -> None:
    task = get_task("inspection")
    train = [obj("Toe drain")] * 3 + [obj("Toe drain- Blocked")] * 5 + [obj("vegetation")] * 9 + [obj("rock toe")]
    rows = [obj("Toe drain"), obj("Toe drain- Blocked"), obj("rock toe damaged"), obj("vegetation")]
    systems = task.baselines(rows, [None] * len(rows), train, {})
    assert [a["condition"] for a in systems["majority"]] == ["vegetation"] * 4
    # the type's most frequent training class; a type never seen in training falls back to its first class
    assert [a["condition"] for a in systems["type-majority"]] == [
        "Toe drain- Blocked",
        "Toe drain- Blocked",
        "rock toe",
        "vegetation",
    ]
    for row, a in zip(rows, systems["random-within-type"], strict=True):
        assert a["condition"] in CLASSES_OF_TYPE[row["target_type"]]
    assert systems["random-within-type"] == task.baselines(rows, [None] * 4, train, {})["random-within-type"]  # seeded
    assert "type-majority" not in task.baselines([{**rows[0], "target_type": ""}], [None], train, {})


def test_macro_f1_without_vegetation_ignores_the_free_class() -> None:
    task = get_task("inspection")
    rows = [obj("vegetation"), obj("vegetation"), obj("Toe drain"), obj("Toe drain- Blocked")]
    answers = [
        {"condition": "vegetation"},
        {"condition": "vegetation"},
        {"condition": "Toe drain"},
        {"condition": "Toe drain"},
    ]
    metrics = task.compute_metrics(rows, answers)
    # 9-class macro-F1 over the 3 classes that occur: vegetation 1, Toe drain 2/3, Blocked 0 -> 5/9
    assert metrics["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    # without vegetation: Toe drain 2/3, Blocked 0 -> 1/3
    assert metrics["macro_f1_non_vegetation"] == pytest.approx(1 / 3)
    assert "vegetation" not in NON_VEGETATION_CLASSES and len(NON_VEGETATION_CLASSES) == 8


def test_type_unknown_variant_hides_the_type() -> None:
    task = get_task("inspection")
    (transform,) = task.eval_variants().values()
    assert transform(obj("rock toe"))["target_type"] == ""
    assert task.group_of(obj("rock toe", image="test/b")) == "test/b"
