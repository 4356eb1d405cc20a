"""Hand-computed checks of the task-free label metrics (``opsvlm.metrics``) and the clip metrics of the operations
task (``opsvlm.tasks.operations.metrics``)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from opsvlm.metrics import (
    INVALID,
    accuracy,
    class_mean_recall,
    confusion_matrix,
    macro_f1,
    metric_key,
    per_class_f1,
    per_class_recall,
)
from opsvlm.tasks.operations import LABEL_NAMES, NULL, OPERATIONS
from opsvlm.tasks.operations.metrics import (
    CONFUSION_COLUMNS,
    OPERATION_NAMES,
    WEIGHTS,
    ClipPrediction,
    ClipTruth,
    compute_metrics,
    confusion_matrices,
    segment_iou,
    segment_ious,
    weighted_score,
)

# ---------------------------------------------------------------------------------------------------------------------
# segment_iou
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [
        ((0.0, 10.0), (5.0, 15.0), 5 / 15),  # partial overlap: inter 5, union 10 + 10 - 5
        ((2.0, 8.0), (0.0, 10.0), 6 / 10),  # prediction inside truth
        ((0.0, 10.0), (2.0, 8.0), 6 / 10),  # truth inside prediction
        ((0.0, 2.0), (5.0, 8.0), 0.0),  # disjoint
        ((0.0, 5.0), (5.0, 10.0), 0.0),  # touching at one point
        ((3.0, 7.0), (3.0, 7.0), 1.0),  # identical
        ((5.0, 10.0), (0.0, 10.0), 0.5),  # exactly at the threshold
        ((5.0, 5.0), (0.0, 10.0), 0.0),  # zero-length prediction
        ((6.0, 4.0), (0.0, 10.0), 0.0),  # end before start
        ((-5.0, 30.0), (0.0, 20.0), 1.0),  # clipped to [0, 20] -> identical
        ((15.0, 30.0), (10.0, 20.0), 5 / 10),  # clipped to [15, 20]: inter 5, union 5 + 10 - 5
        ((25.0, 30.0), (10.0, 20.0), 0.0),  # entirely after the clip: clipped to [20, 20]
        ((-8.0, -1.0), (0.0, 5.0), 0.0),  # entirely before the clip: clipped to [0, 0]
        ((0.0, 10.0), (5.0, 5.0), 0.0),  # degenerate (zero-length) truth
        ((math.nan, 10.0), (0.0, 10.0), 0.0),  # non-finite prediction
        ((0.0, math.inf), (0.0, 20.0), 1.0),  # +inf end clipped to the clip end
    ],
)
def test_segment_iou_hand_computed(pred, truth, expected):
    assert segment_iou(*pred, *truth, clip_length=20.0) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("truth", "clip_length"), [((6.0, 4.0), 20.0), ((math.nan, 4.0), 20.0), ((0.0, 4.0), 0.0), ((0.0, 4.0), -1.0)]
)
def test_segment_iou_rejects_bad_truth_or_clip(truth, clip_length):
    with pytest.raises(ValueError):
        segment_iou(0.0, 5.0, *truth, clip_length)


def test_segment_ious_vectorised_matches_scalar():
    ps, pe = np.array([0.0, 2.0, -5.0]), np.array([10.0, 8.0, 30.0])
    ts, te = np.array([5.0, 0.0, 0.0]), np.array([15.0, 10.0, 20.0])
    out = segment_ious(ps, pe, ts, te, np.full(3, 20.0))
    assert out.shape == (3,) and out.dtype == np.float64
    np.testing.assert_allclose(out, [1 / 3, 0.6, 1.0])
    with pytest.raises(ValueError):
        segment_ious(ps, pe, ts, te, np.full(2, 20.0))


CLIP = 50.0
in_clip = st.floats(min_value=0.0, max_value=CLIP, allow_nan=False)
anywhere = st.floats()  # includes NaN and ±inf: a bad prediction still gives an IoU in [0, 1]


@given(in_clip, in_clip, in_clip, in_clip)
def test_segment_iou_symmetric_for_in_clip_segments(a, b, c, d):
    s1, e1 = sorted((a, b))
    s2, e2 = sorted((c, d))
    assert segment_iou(s1, e1, s2, e2, CLIP) == segment_iou(s2, e2, s1, e1, CLIP)


@given(anywhere, anywhere, in_clip, in_clip)
def test_segment_iou_in_unit_interval(ps, pe, c, d):
    ts, te = sorted((c, d))
    assert 0.0 <= segment_iou(ps, pe, ts, te, CLIP) <= 1.0


@given(in_clip, in_clip)
def test_segment_iou_identical_valid_segments_is_one(a, b):
    s, e = sorted((a, b))
    assume(e > s)
    assert segment_iou(s, e, s, e, CLIP) == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Generic label-array metrics
# ---------------------------------------------------------------------------------------------------------------------


def test_confusion_matrix_shape_counts_and_invalid_column():
    labels = ["A", "B", "C"]
    truth = ["A", "A", "B", "C", "C", "C"]
    pred = ["A", "B", "B", None, "zzz", "A"]
    cm = confusion_matrix(truth, pred, labels)
    assert cm.shape == (3, 4) and cm.dtype == np.int64
    expected = np.array(
        [
            [1, 1, 0, 0],
            [0, 1, 0, 0],
            [1, 0, 0, 2],  # None and "zzz" land in the invalid column
        ]
    )
    np.testing.assert_array_equal(cm, expected)
    assert cm.sum() == len(truth)


def test_confusion_matrix_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        confusion_matrix([], [], ["A"])
    with pytest.raises(ValueError, match="aligned"):
        confusion_matrix(["A"], ["A", "A"], ["A"])
    with pytest.raises(ValueError, match="not in the label list"):
        confusion_matrix(["Z"], ["A"], ["A"])
    with pytest.raises(ValueError, match="duplicates"):
        confusion_matrix(["A"], ["A"], ["A", "A"])
    with pytest.raises(ValueError, match="reserved"):
        confusion_matrix(["A"], ["A"], ["A", INVALID])


def test_accuracy_counts_none_and_unknown_as_wrong():
    assert accuracy(["A", "B", "A", "B"], ["A", None, "x", "B"]) == 0.5
    with pytest.raises(ValueError):
        accuracy([], [])


def test_class_mean_recall_vs_accuracy_on_imbalanced_data():
    truth = ["A"] * 9 + ["B"]
    pred = ["A"] * 10
    labels = ["A", "B", "C"]  # C has no support: left out of the mean
    assert accuracy(truth, pred) == pytest.approx(0.9)
    np.testing.assert_allclose(per_class_recall(truth, pred, labels), [1.0, 0.0, np.nan])
    assert class_mean_recall(truth, pred, labels) == pytest.approx(0.5)


def test_macro_f1_hand_computed_with_null_excluded():
    labels = ["A", "B", "Null"]
    truth = ["A", "A", "A", "B", "B", "Null", "Null"]
    pred = ["A", "A", "B", "B", "Null", "A", "Null"]
    # Confusion: A -> {A: 2, B: 1}; B -> {B: 1, Null: 1}; Null -> {A: 1, Null: 1}.
    # F1(A) = 2·2 / (2·2 + fp 1 [Null->A] + fn 1) = 2/3; F1(B) = 2 / (2 + 1 + 1) = 1/2; F1(Null) = 1/2.
    np.testing.assert_allclose(per_class_f1(truth, pred, labels), [2 / 3, 1 / 2, 1 / 2])
    assert macro_f1(truth, pred, labels, average_over=["A", "B"]) == pytest.approx(7 / 12)
    assert macro_f1(truth, pred, labels) == pytest.approx(5 / 9)


def test_macro_f1_class_without_support():
    labels = ["A", "B", "C", "Null"]
    # C: no support, no predictions -> excluded from the mean.
    assert macro_f1(["A", "B"], ["A", "B"], labels, average_over=["A", "B", "C"]) == 1.0
    # C: no support but predicted once -> F1 0, included.
    truth, pred = ["A", "A", "B", "Null"], ["A", "A", "B", "C"]
    f1 = per_class_f1(truth, pred, labels)
    assert f1[2] == 0.0
    assert macro_f1(truth, pred, labels, average_over=["A", "B", "C"]) == pytest.approx(2 / 3)
    # Nothing defined in the averaged subset -> NaN.
    assert math.isnan(macro_f1(["Null"], ["Null"], labels, average_over=["A", "B", "C"]))
    with pytest.raises(ValueError, match="average_over"):
        macro_f1(["A"], ["A"], labels, average_over=["Q"])


# ---------------------------------------------------------------------------------------------------------------------
# The clip task
# ---------------------------------------------------------------------------------------------------------------------

PICK, RELOCATE, ASSEMBLE, INSERT, CLOSE, BOX_LABEL = (op.name for op in OPERATIONS[:6])


def _truths() -> list[ClipTruth]:
    return [
        ClipTruth(PICK, 0.0, 10.0, RELOCATE, 20.0),
        ClipTruth(PICK, 0.0, 10.0, RELOCATE, 20.0),
        ClipTruth(ASSEMBLE, 2.0, 12.0, INSERT, 20.0),
        ClipTruth(INSERT, 5.0, 15.0, CLOSE, 20.0),
        ClipTruth(CLOSE, 2.0, 4.0, BOX_LABEL, 20.0),
    ]


def _predictions() -> list[ClipPrediction | None]:
    return [
        ClipPrediction(PICK, 0.0, 10.0, RELOCATE),  # all right, IoU 1
        ClipPrediction(ASSEMBLE, 5.0, 10.0, RELOCATE),  # op wrong, next right, IoU 0.5 (a hit)
        None,  # unparseable: wrong everywhere, IoU 0
        ClipPrediction(INSERT, 0.0, 10.0, "Dance"),  # op right, next invalid, IoU 1/3
        ClipPrediction("picking", 4.0, 2.0, BOX_LABEL),  # op invalid (case), next right, end < start -> IoU 0
    ]


def test_compute_metrics_hand_computed():
    m = compute_metrics(_truths(), _predictions())
    assert m["n_clips"] == 5
    assert m["oca"] == pytest.approx(2 / 5)
    assert m["aa_at_1"] == pytest.approx(3 / 5)
    assert m["tiou_at_0_5"] == pytest.approx(2 / 5)
    assert m["mean_tiou"] == pytest.approx((1 + 0.5 + 0 + 1 / 3 + 0) / 5)
    assert m["parse_failure_rate"] == pytest.approx(1 / 5)
    assert m["invalid_label_rate"] == pytest.approx(2 / 5)
    assert m["weighted_score"] == pytest.approx(0.3 * 0.4 + 0.3 * 0.4 + 0.4 * 0.6)  # = 0.48
    assert m["weighted_score"] == pytest.approx(0.48)

    # Per-class recall of the dominant operation, only for classes present in the truth.
    assert m["oca_recall/picking"] == pytest.approx(0.5)
    assert m["oca_recall/assemble_box"] == 0.0
    assert m["oca_recall/insert_items"] == 1.0
    assert m["oca_recall/close_box"] == 0.0
    assert "oca_recall/scan_label" not in m and "oca_recall/null" not in m
    assert m["oca_class_mean_recall"] == pytest.approx((0.5 + 0 + 1 + 0) / 4)

    assert m["aa_recall/relocate_item_label"] == 1.0
    assert m["aa_recall/insert_items"] == 0.0
    assert m["aa_recall/close_box"] == 0.0
    assert m["aa_recall/attach_box_label"] == 1.0
    assert m["aa_class_mean_recall"] == pytest.approx(0.5)

    # F1: Picking tp1 fp0 fn1 -> 2/3; Assemble Box tp0 fp1 fn1 -> 0; Insert Items 1; Close Box tp0 fn1 -> 0.
    assert m["f1/picking"] == pytest.approx(2 / 3)
    assert m["f1/assemble_box"] == 0.0
    assert m["f1/insert_items"] == 1.0
    assert m["f1/close_box"] == 0.0
    assert "f1/scan_label" not in m and "f1/null" not in m
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 1 + 0) / 4)


def test_compute_metrics_keys_are_mlflow_friendly_floats():
    m = compute_metrics(_truths(), _predictions())
    for key, value in m.items():
        assert re.fullmatch(r"[a-z0-9_]+(/[a-z0-9_]+)?", key), key
        assert isinstance(value, float), key
    assert set(WEIGHTS) <= set(m)
    assert weighted_score(m) == m["weighted_score"]


def test_compute_metrics_accepts_dicts():
    truths = [vars(t) for t in _truths()]
    preds = [None if p is None else vars(p) for p in _predictions()]
    assert compute_metrics(truths, preds) == compute_metrics(_truths(), _predictions())
    with pytest.raises(ValueError, match="missing"):
        compute_metrics([{"operation": PICK}], [None])


def test_compute_metrics_all_correct_and_all_missing():
    truths = _truths()
    perfect = [ClipPrediction(t.operation, t.start_s, t.end_s, t.next_operation) for t in truths]
    m = compute_metrics(truths, perfect)
    for key in ("oca", "tiou_at_0_5", "mean_tiou", "aa_at_1", "weighted_score", "macro_f1", "aa_class_mean_recall"):
        assert m[key] == 1.0, key
    assert m["parse_failure_rate"] == 0.0

    m = compute_metrics(truths, [None] * len(truths))
    assert m["parse_failure_rate"] == 1.0
    for key in ("oca", "tiou_at_0_5", "mean_tiou", "aa_at_1", "weighted_score", "macro_f1", "aa_class_mean_recall"):
        assert m[key] == 0.0, key


def test_macro_f1_nan_when_only_null():
    truths = [ClipTruth(NULL.name, 0.0, 1.0, PICK, 2.0)]
    m = compute_metrics(truths, [ClipPrediction(NULL.name, 0.0, 1.0, PICK)])
    assert math.isnan(m["macro_f1"])
    assert m["oca"] == 1.0


def test_compute_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        compute_metrics([], [])
    with pytest.raises(ValueError, match="aligned"):
        compute_metrics(_truths(), _predictions()[:-1])
    with pytest.raises(ValueError, match=r"truths\[0\]\.operation"):
        compute_metrics([ClipTruth("Dance", 0.0, 1.0, PICK, 2.0)], [None])
    with pytest.raises(ValueError, match=r"truths\[0\]"):
        compute_metrics([ClipTruth(PICK, 3.0, 1.0, PICK, 2.0)], [None])
    with pytest.raises(ValueError, match="predictions"):
        compute_metrics(_truths()[:1], ["Picking"])


def test_confusion_matrices_of_the_clip_task():
    cms = confusion_matrices(_truths(), _predictions())
    assert (*LABEL_NAMES, INVALID) == CONFUSION_COLUMNS
    idx = {name: i for i, name in enumerate(CONFUSION_COLUMNS)}
    op = cms["operation"]
    assert op.shape == (len(LABEL_NAMES), len(LABEL_NAMES) + 1) and op.dtype == np.int64
    assert op.sum() == 5
    assert op[idx[PICK], idx[PICK]] == 1 and op[idx[PICK], idx[ASSEMBLE]] == 1
    assert op[idx[ASSEMBLE], idx[INVALID]] == 1  # None
    assert op[idx[CLOSE], idx[INVALID]] == 1  # "picking"
    nxt = cms["next_operation"]
    assert nxt[idx[RELOCATE], idx[RELOCATE]] == 2
    assert nxt[idx[INSERT], idx[INVALID]] == 1 and nxt[idx[CLOSE], idx[INVALID]] == 1


def test_constants():
    assert sum(WEIGHTS.values()) == pytest.approx(1.0)
    assert dict(WEIGHTS) == {"oca": 0.3, "tiou_at_0_5": 0.3, "aa_at_1": 0.4}
    assert len(OPERATION_NAMES) == 10 and NULL.name not in OPERATION_NAMES
    assert metric_key("Fill out Order") == "fill_out_order"
    assert len({metric_key(name) for name in LABEL_NAMES}) == len(LABEL_NAMES)
