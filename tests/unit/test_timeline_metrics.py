"""Timeline metrics on hand-computed cases: OpenPack frame macro-F1, edit score, F1@k, next-operation accuracy at
boundaries, bootstrap intervals by session."""

from __future__ import annotations

import numpy as np
import pytest

from opsvlm.tasks.operations.timeline.grid import NULL_INDEX as N
from opsvlm.tasks.operations.timeline.metrics import (
    boundary_next_accuracy,
    edit_score,
    frame_macro_f1,
    levenshtein,
    overlap_counts,
    score_sessions,
    session_stats,
)


def a(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_frame_macro_f1_by_hand_over_all_ten_operations():
    # class 0: tp 1, fn 1 -> 2/3; class 1: tp 2, fp 1 -> 4/5; the 8 absent classes score 0 (OpenPack's zero_division)
    assert frame_macro_f1(a(0, 0, 1, 1), a(0, 1, 1, 1)) == pytest.approx((2 / 3 + 4 / 5) / 10)


def test_null_is_not_a_class_but_its_seconds_count():
    # an operation predicted on a Null second is a false positive: class 0 tp 2, fp 1 -> 4/5
    assert frame_macro_f1(a(N, 0, 0), a(0, 0, 0)) == pytest.approx(0.8 / 10)
    # Null predicted on an operation second is a false negative: class 0 tp 1, fn 1 -> 2/3
    assert frame_macro_f1(a(0, 0), a(0, N)) == pytest.approx((2 / 3) / 10)
    # nothing but Null everywhere: no operation class has a hit
    assert frame_macro_f1(a(N, N), a(N, N)) == 0.0


def test_edit_score_by_hand():
    assert levenshtein([0, 1, 0, 1], [0, 1]) == 2
    assert edit_score(a(0, 0, 1, 1), a(0, 1, 0, 1)) == pytest.approx(1 - 2 / 4)
    # Null runs are background: they neither count as segments nor split anything away
    assert edit_score(a(0, 0, N, 1), a(0, N, N, 1)) == 1.0
    # the same label on both sides of a Null gap is two segments
    assert edit_score(a(0, N, 0), a(0, 0, 0)) == pytest.approx(1 - 1 / 2)
    assert edit_score(a(N, N), a(N, N)) == 1.0


def test_f1_at_overlap_by_hand():
    truth, pred = a(0, 0, 0, 1, 1), a(0, 0, 1, 1, 1)
    # both predicted segments overlap their true segment with IoU 2/3
    assert overlap_counts(truth, pred, 0.5) == (2, 0, 0)
    assert overlap_counts(truth, pred, 0.7) == (0, 2, 2)
    # a second predicted segment on an already matched true segment is a false positive
    assert overlap_counts(a(0, 0, 0, 0), a(0, 0, 1, 0), 0.25) == (1, 2, 0)


def test_next_operation_accuracy_at_boundaries_by_hand():
    truth = a(0, 0, 1, 1, N, 2, 2)
    # boundaries: end of run 0 (second 1, next 1) and end of run 1 (second 3, next 2 after the Null gap)
    assert boundary_next_accuracy(truth, a(9, 1, 9, 2, 9, 9, 9)) == (2, 2)
    assert boundary_next_accuracy(truth, a(9, 2, 9, 2, 9, 9, 9)) == (1, 2)
    assert boundary_next_accuracy(a(0, 0, N, 0), a(9, 9, 9, 9)) == (0, 0)  # a repeat across Null is no boundary


def test_scores_over_sessions_pool_counts_and_average_edit():
    first = session_stats(a(0, 0, 1, 1), a(0, 1, 1, 1), a(1, 1, 1, 1))
    second = session_stats(a(2, 2, 2), a(2, 2, 2), a(3, 3, 3))
    scores = score_sessions([first, second], resamples=200)
    pooled = np.concatenate([a(0, 0, 1, 1), a(2, 2, 2)]), np.concatenate([a(0, 1, 1, 1), a(2, 2, 2)])
    assert scores["frame_macro_f1"] == pytest.approx(frame_macro_f1(*pooled))
    assert scores["f1/Picking"] == pytest.approx(2 / 3)
    # edit: session 1 predicts segments [0, 1] for truth [0, 1] -> 1.0; session 2 -> 1.0
    assert scores["edit_score"] == 1.0
    # F1@50: session 1 pred (0: 0-1) vs (0: 0-2) IoU 1/2 hit, (1: 1-4) vs (1: 2-4) IoU 2/3 hit; session 2 exact
    assert scores["f1_at_50"] == 1.0 and scores["f1_at_25"] == 1.0
    assert scores["next_accuracy_at_boundaries"] == 1.0 and scores["boundaries"] == 1
    assert scores["sessions"] == 2 and scores["seconds"] == 7
    low, high = scores["frame_macro_f1_ci95"]
    assert low <= scores["frame_macro_f1"] <= high and low < high


def test_one_session_interval_is_the_value_and_lengths_must_agree():
    scores = score_sessions([session_stats(a(0, 1), a(0, 0))])
    assert scores["frame_macro_f1_ci95"] == [scores["frame_macro_f1"]] * 2
    assert np.isnan(scores["next_accuracy_at_boundaries"])  # no next-operation predictions given
    with pytest.raises(ValueError, match="lengths differ"):
        session_stats(a(0, 1), a(0))
