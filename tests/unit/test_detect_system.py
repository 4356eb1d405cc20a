"""Matching, AP and the two-stage system evaluation on hand-built cases (pure numpy, no detector)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opsvlm.tasks.inspection.detect.matching import (
    ImageBoxes,
    average_precision,
    box_iou,
    detection_map,
    match_boxes,
)
from opsvlm.tasks.inspection.detect.system import (
    BACKGROUND,
    ImageOutcome,
    PredictedObject,
    TrueObject,
    bootstrap_intervals,
    perfect_stage_one,
    run_two_stage,
    system_metrics,
    type_majority,
    with_classes,
)

A = (0.0, 0.0, 0.2, 0.2)
B = (0.5, 0.5, 0.9, 0.9)
C = (0.3, 0.0, 0.4, 0.6)
A_SHIFTED = (0.02, 0.0, 0.22, 0.2)  # IoU with A = 0.18 / 0.22 ~ 0.82


def test_box_iou_known_values():
    iou = box_iou([A, B], [A, A_SHIFTED, (0.1, 0.0, 0.3, 0.2)])
    assert iou.shape == (2, 3)
    assert iou[0, 0] == pytest.approx(1.0)
    assert iou[0, 1] == pytest.approx(0.18 * 0.2 / (0.22 * 0.2))
    assert iou[0, 2] == pytest.approx(1 / 3)  # half overlap: 0.02 / (0.04 + 0.04 - 0.02)
    assert np.all(iou[1] == 0.0)


def test_match_greedy_by_score_and_one_to_one():
    # Two predictions on the same true box: the higher score takes it, the other is a false positive.
    matched = match_boxes([A_SHIFTED, A], [0.3, 0.9], [A])
    assert matched.tolist() == [-1, 0]
    # Below the IoU threshold: no match.
    assert match_boxes([(0.1, 0.0, 0.3, 0.2)], [0.9], [A], iou_threshold=0.5).tolist() == [-1]
    # Type-aware: a box of the wrong type does not match.
    assert match_boxes([A], [0.9], [A], 0.5, ["rock toe"], ["toe drain"]).tolist() == [-1]
    assert match_boxes([], [], [A]).tolist() == []
    assert match_boxes([A], [1.0], []).tolist() == [-1]


def test_bad_boxes_are_named():
    with pytest.raises(ValueError, match="pred_boxes"):
        match_boxes([[0.5, 0.5, 0.1, 0.9]], [1.0], [A])
    with pytest.raises(ValueError, match="scores"):
        match_boxes([A], [1.0, 0.5], [A])


def test_average_precision_hand_computed():
    assert average_precision([0.9, 0.8], [True, True], 2) == pytest.approx(1.0)
    assert average_precision([], [], 3) == 0.0
    assert math.isnan(average_precision([0.5], [False], 0))
    # One hit at rank 1 of 2 true objects: precision 1 up to recall 0.5, nothing beyond -> 51 of 101 points.
    assert average_precision([0.9, 0.1], [True, False], 2) == pytest.approx(51 / 101)
    # A false positive ranked first: precision 0.5 at recall 1.
    assert average_precision([0.9, 0.5], [False, True], 1) == pytest.approx(0.5)


def test_detection_map_perfect_and_empty():
    truth_types = ("toe drain", "rock toe")
    perfect = ImageBoxes.of([A, B], [0.9, 0.8], truth_types, [A, B], truth_types)
    result = detection_map([perfect], ["toe drain", "rock toe", "vegetation"])
    assert result["map50"] == pytest.approx(1.0) and result["map50_95"] == pytest.approx(1.0)
    assert math.isnan(result["ap50"]["vegetation"])  # no true vegetation: left out of the mean
    nothing = ImageBoxes.of([], [], (), [A, B], truth_types)
    assert detection_map([nothing], ["toe drain", "rock toe"])["map50"] == 0.0
    # A shifted box counts at IoU 0.5 but not at the stricter thresholds.
    shifted = ImageBoxes.of([A_SHIFTED], [0.9], ("toe drain",), [A], ("toe drain",))
    result = detection_map([shifted], ["toe drain"])
    assert result["map50"] == pytest.approx(1.0)
    assert 0.0 < result["map50_95"] < 1.0


def _outcome(truths, predictions, name="im"):
    return ImageOutcome(name, tuple(TrueObject(*t) for t in truths), tuple(PredictedObject(*p) for p in predictions))


def test_perfect_system_equals_classifier():
    truths = [(A, "Toe drain- Blocked"), (B, "rock toe")]
    outcome = perfect_stage_one(_outcome(truths, []), ["Toe drain- Blocked", "rock toe"])
    m = system_metrics([outcome])
    assert m["detection/precision"] == 1.0 and m["detection/recall"] == 1.0
    assert m["matched/macro_f1"] == 1.0 and m["e2e/macro_f1"] == 1.0 and m["e2e/accuracy"] == 1.0
    assert m["n_missed"] == 0 and m["n_spurious"] == 0


def test_missed_object_counts_in_e2e_only():
    truths = [(A, "Toe drain"), (B, "rock toe")]
    # The rock toe is missed; the toe drain is found and classified right.
    outcome = _outcome(truths, [(A_SHIFTED, "toe drain", 0.9, "Toe drain")])
    m = system_metrics([outcome])
    assert m["n_missed"] == 1 and m["n_spurious"] == 0 and m["n_matched"] == 1
    assert m["detection/recall/rock_toe"] == 0.0 and m["detection/recall/toe_drain"] == 1.0
    assert m["detection/precision"] == 1.0
    assert m["matched/accuracy"] == 1.0 and m["matched/macro_f1"] == 1.0
    # End to end: Toe drain F1 1, rock toe F1 0 (a miss) -> 0.5; accuracy 1 of 2.
    assert m["e2e/macro_f1"] == pytest.approx(0.5)
    assert m["e2e/accuracy"] == pytest.approx(0.5)


def test_spurious_object_is_a_false_positive_of_its_class():
    truths = [(A, "Toe drain")]
    outcome = _outcome(truths, [(A, "toe drain", 0.9, "Toe drain"), (C, "slope drain", 0.7, "slope drain blocked")])
    m = system_metrics([outcome])
    assert m["n_spurious"] == 1 and m["n_missed"] == 0
    assert m["detection/precision"] == pytest.approx(0.5)
    assert math.isnan(m["detection/recall/slope_drain"])  # no true slope drain
    assert m["detection/precision/slope_drain"] == 0.0
    assert m["matched/macro_f1"] == 1.0
    # "slope drain blocked": 0 true, 1 predicted -> F1 0; "Toe drain" F1 1 -> mean 0.5.
    assert m["e2e/macro_f1"] == pytest.approx(0.5)
    assert m["e2e/accuracy"] == pytest.approx(0.5)


def test_wrong_type_is_matched_but_wrong():
    truths = [(A, "Toe drain"), (B, "vegetation")]
    outcome = _outcome(truths, [(A, "rock toe", 0.8, "rock toe"), (B, "vegetation", 0.9, "vegetation")])
    m = system_metrics([outcome])
    # Detection is type-aware: the rock-toe box is a false positive and the toe drain a miss.
    assert m["detection/precision/rock_toe"] == 0.0 and m["detection/recall/toe_drain"] == 0.0
    assert m["detection/recall/vegetation"] == 1.0
    # The system matching is type-agnostic: both objects are matched, one with the wrong type (so the wrong class).
    assert m["n_matched"] == 2 and m["n_missed"] == 0 and m["n_spurious"] == 0
    assert m["matched/type_accuracy"] == pytest.approx(0.5)
    assert m["matched/accuracy"] == pytest.approx(0.5)
    # Classes: Toe drain (F1 0), rock toe (predicted once, F1 0), vegetation (F1 1) -> 1/3.
    assert m["matched/macro_f1"] == pytest.approx(1 / 3)
    assert m["e2e/macro_f1"] == pytest.approx(1 / 3)


def test_unanswered_object_is_wrong_and_conditions():
    truths = [(A, "slope drain damaged"), (B, "slope drain")]
    outcome = _outcome(truths, [(A, "slope drain", 0.9, None), (B, "slope drain", 0.9, "slope drain")])
    m = system_metrics([outcome])
    assert m["matched/accuracy"] == pytest.approx(0.5)
    # conditions: damaged (F1 0), normal (F1 1) -> 0.5
    assert m["matched/condition_macro_f1"] == pytest.approx(0.5)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown"):
        system_metrics([_outcome([(A, "pothole")], [])])
    with pytest.raises(ValueError, match="object type"):
        system_metrics([_outcome([], [(A, "pothole", 0.5, None)])])


def test_background_image_with_spurious_detection():
    outcome = _outcome([], [(A, "vegetation", 0.4, "vegetation")])
    m = system_metrics([outcome])
    assert m["n_spurious"] == 1 and m["e2e/accuracy"] == 0.0 and m["e2e/macro_f1"] == 0.0
    assert math.isnan(m["detection/recall"])


def test_type_majority_and_baseline():
    table = type_majority(["Toe drain", "Toe drain- Blocked", "Toe drain- Blocked", "vegetation"])
    assert table["toe drain"] == "Toe drain- Blocked"
    assert table["rock toe"] == "rock toe"  # unseen type: its normal class
    outcome = with_classes(_outcome([(A, "Toe drain")], [(A, "toe drain", 0.9, None)]), table)
    assert outcome.predictions[0].class_name == "Toe drain- Blocked"


def test_bootstrap_intervals_cover_the_estimate():
    right = _outcome([(A, "Toe drain")], [(A, "toe drain", 0.9, "Toe drain")], "right")
    missed = _outcome([(A, "rock toe")], [], "missed")
    outcomes = [right] * 6 + [missed] * 4
    point = system_metrics(outcomes)
    bounds = bootstrap_intervals(outcomes, n_boot=300, seed=1)
    low, high = bounds["e2e/accuracy"]
    assert low <= point["e2e/accuracy"] <= high
    assert 0.0 <= low < high <= 1.0
    assert bounds["n_images"] == (10.0, 10.0)
    assert BACKGROUND == "background"


def test_run_two_stage_times_and_skips_stage_two_without_objects():
    class Det:
        def __init__(self, box, object_type, score):
            self.box, self.object_type, self.score = box, object_type, score

    ticks = iter([0.0, 0.25, 1.0, 2.0, 2.5, 9.0])
    calls = []

    def classify(image, objects):
        calls.append(objects)
        return ["rock toe damaged" for _ in objects]

    image = np.zeros((8, 8, 3), np.uint8)
    predictions, times = run_two_stage(image, lambda im: [Det(A, "rock toe", 0.8)], classify, lambda: next(ticks))
    assert predictions == [PredictedObject(A, "rock toe", 0.8, "rock toe damaged")]
    assert (times.detect_s, times.classify_s, times.objects) == (0.25, 0.75, 1)
    predictions, times = run_two_stage(image, lambda im: [], classify, lambda: next(ticks))
    assert predictions == [] and len(calls) == 1 and times.objects == 0
