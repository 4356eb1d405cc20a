"""Operation timelines: window fusion, the grammar and Viterbi, per-box figures on hand-made cases; OpenPack's 1 Hz
rule against the real sample's files."""

from __future__ import annotations

import csv
import datetime as dt
import itertools

import numpy as np
import pytest

from opsvlm.tasks.operations.data.openpack import Segment, SessionTimeline, read_operations_csv
from opsvlm.tasks.operations.timeline import timeline_for
from opsvlm.tasks.operations.timeline.boxes import assign_boxes, box_figures, classify_transition, session_figures
from opsvlm.tasks.operations.timeline.fusion import WindowScores, fuse
from opsvlm.tasks.operations.timeline.grammar import (
    Grammar,
    anticipate,
    argmax_decode,
    decode,
    learn_grammar,
    procedure_grammar,
    viterbi,
)
from opsvlm.tasks.operations.timeline.grid import (
    INDEX_OF_ID,
    LABELS,
    NULL_INDEX,
    SecondGrid,
    annotated_cells,
    runs_of,
    truth_labels,
)

L = len(LABELS)
ORIGIN = dt.datetime(2024, 1, 15, 9, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=9)))
PICK, RELOCATE, ASSEMBLE, INSERT, CLOSE, BOX_LABEL, SCAN, SHIP_LABEL, BACK, ORDER = (
    INDEX_OF_ID[i] for i in (100, 200, 300, 400, 500, 600, 700, 800, 900, 1000)
)


def one_hot(*indices: int) -> np.ndarray:
    out = np.zeros((len(indices), L))
    out[np.arange(len(indices)), indices] = 1.0
    return out


def timeline(*rows: tuple[int, float, float], origin: dt.datetime = ORIGIN) -> SessionTimeline:
    return SessionTimeline("U0001", "S0001", origin, tuple(Segment(op, a, b, box=1) for op, a, b in rows))


# --- fusion -------------------------------------------------------------------------------------------------------


def test_fusion_averages_windows_weighted_by_the_seconds_they_cover():
    windows = WindowScores(
        start_s=[0.0, 1.0, 2.5],
        end_s=[2.0, 3.0, 3.0],
        scores=one_hot(PICK, RELOCATE, ASSEMBLE),
        next_scores=one_hot(RELOCATE, ASSEMBLE, INSERT),
    )
    scores, next_scores, coverage = fuse(windows, np.arange(5, dtype=float))
    np.testing.assert_allclose(coverage, [1.0, 2.0, 1.5, 0.0, 0.0])
    assert scores[0, PICK] == 1.0
    assert scores[1, PICK] == scores[1, RELOCATE] == 0.5
    # cell 2: window 2 covers all of it, window 3 half of it
    np.testing.assert_allclose(scores[2, [RELOCATE, ASSEMBLE]], [1 / 1.5, 0.5 / 1.5])
    np.testing.assert_allclose(next_scores[2, [ASSEMBLE, INSERT]], [1 / 1.5, 0.5 / 1.5])
    # uncovered seconds are uniform, and reported through coverage 0
    np.testing.assert_allclose(scores[3], np.full(L, 1 / L))
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)


def test_fusion_on_a_grid_offset_by_the_origins_fraction_of_a_second():
    windows = WindowScores([0.0], [1.0], one_hot(PICK), one_hot(RELOCATE))
    _, _, coverage = fuse(windows, np.array([-0.25, 0.75]))
    np.testing.assert_allclose(coverage, [0.75, 0.25])


def test_fusion_refuses_no_windows_and_mismatched_arrays():
    with pytest.raises(ValueError, match="no window"):
        fuse(WindowScores([], [], np.zeros((0, L)), np.zeros((0, L))), np.arange(3.0))
    with pytest.raises(ValueError, match="end_s > start_s"):
        WindowScores([1.0], [1.0], one_hot(PICK), one_hot(PICK))


# --- grammar ------------------------------------------------------------------------------------------------------


def test_viterbi_matches_brute_force_on_small_random_models():
    rng = np.random.default_rng(0)
    for _ in range(5):
        emission = np.log(rng.dirichlet(np.ones(3), size=5))
        trans = np.log(rng.dirichlet(np.ones(3), size=3))
        start = np.log(rng.dirichlet(np.ones(3)))
        best = max(
            itertools.product(range(3), repeat=5),
            key=lambda p: (
                start[p[0]]
                + sum(emission[t, s] for t, s in enumerate(p))
                + sum(trans[a, b] for a, b in itertools.pairwise(p))
            ),
        )
        assert viterbi(emission, trans, start).tolist() == list(best)


def test_grammar_removes_a_one_second_flicker_that_argmax_keeps():
    grammar = learn_grammar([timeline((100, 0.0, 20.0), (200, 20.0, 40.0))])
    probs = np.full((6, L), 0.01)
    probs[:, PICK] = 0.9
    probs[3, PICK], probs[3, CLOSE] = 0.3, 0.6  # one unsure second
    probs /= probs.sum(axis=1, keepdims=True)
    assert argmax_decode(probs).tolist() == [PICK, PICK, PICK, CLOSE, PICK, PICK]
    assert decode(probs, grammar).tolist() == [PICK] * 6


def test_grammar_prefers_the_procedure_order_when_the_model_is_unsure():
    grammar = learn_grammar([timeline((100, 0.0, 5.0), (200, 5.0, 10.0), (300, 10.0, 15.0))] * 3)
    probs = np.full((15, L), 0.01)
    probs[:5, PICK] = probs[10:, ASSEMBLE] = 0.9
    probs[5:10, RELOCATE] = probs[5:10, CLOSE] = 0.45  # torn between the procedure's next step and another one
    labels = decode(probs / probs.sum(axis=1, keepdims=True), grammar)
    assert [LABELS[r.label] for r in runs_of(labels)] == ["Picking", "Relocate Item Label", "Assemble Box"]


def test_default_decoding_keeps_boundaries_where_the_model_puts_them():
    # Picking lasts long in training, Relocate Item Label is short: per-label self-transitions pull the boundary
    # second (0.45 Picking / 0.55 Relocate) into Picking; one switch rate for all labels leaves it to the model
    grammar = learn_grammar([timeline((100, 0.0, 30.0), (200, 30.0, 32.0), (300, 32.0, 60.0))])
    probs = np.full((8, L), 0.005)
    probs[:4, PICK] = probs[5:, RELOCATE] = 0.9
    probs[4, PICK], probs[4, RELOCATE] = 0.45, 0.55
    probs /= probs.sum(axis=1, keepdims=True)
    assert argmax_decode(probs)[4] == RELOCATE
    assert decode(probs, grammar)[4] == RELOCATE
    assert decode(probs, grammar, durations=True)[4] == PICK
    assert grammar.switch_rate == pytest.approx((2 + 0.5) / (59 + 1.0))


def test_learned_transition_counts_by_hand():
    # 1 Hz labels [P, P, P, R, R]: P->P twice, P->R once, R->R once
    grammar = learn_grammar([timeline((100, 0.0, 3.0), (200, 3.0, 5.0))], smoothing=0.5)
    row = grammar.transitions[PICK]
    assert row[PICK] == pytest.approx(2.5 / (3 + 0.5 * L))
    assert row[RELOCATE] == pytest.approx(1.5 / (3 + 0.5 * L))
    assert grammar.transitions[RELOCATE, RELOCATE] == pytest.approx(1.5 / (1 + 0.5 * L))
    assert grammar.seconds == 5 and grammar.sessions == 1
    assert LABELS[grammar.majority] == "Picking"
    # successors: never the label itself nor Null; Relocate is the one seen after Picking
    assert grammar.successors[PICK, PICK] == 0 and grammar.successors[PICK, NULL_INDEX] == 0
    assert grammar.successors[PICK].argmax() == RELOCATE
    np.testing.assert_allclose(grammar.successors.sum(axis=1), 1.0)


def test_grammar_json_round_trip_and_bad_files(tmp_path):
    grammar = procedure_grammar()
    path = grammar.save(tmp_path / "grammar.json")
    back = Grammar.load(path)
    np.testing.assert_allclose(back.transitions, grammar.transitions, atol=1e-7)
    assert back.majority == grammar.majority and back.source == grammar.source
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match=r"bad\.json.*format"):
        Grammar.load(bad)


def test_procedure_prior_follows_the_procedure():
    grammar = procedure_grammar()
    assert grammar.successors[PICK].argmax() == RELOCATE
    assert grammar.successors[SCAN].argmax() == ORDER  # OpenPack's procedure: scan, fill out order, shipping label
    assert grammar.expected_duration_s[PICK] == pytest.approx(7.0, rel=0.05)


def test_anticipation_never_names_the_current_operation_or_null_and_uses_the_grammar():
    grammar = procedure_grammar()
    next_scores = np.full((2, L), 0.05)
    next_scores[:, CLOSE] = 0.3  # the model's own guess
    next_scores[:, RELOCATE] = 0.25
    next_scores[:, NULL_INDEX] = 0.9
    labels = np.array([PICK, CLOSE])
    plain, _ = anticipate(labels, next_scores, None)
    assert plain.tolist() == [CLOSE, RELOCATE]
    with_grammar, confidence = anticipate(labels, next_scores, grammar)
    assert with_grammar[0] == RELOCATE  # after Picking the grammar strongly expects Relocate Item Label
    assert with_grammar[1] == BOX_LABEL  # after Close Box comes Attach Box Label in the procedure
    assert np.all((confidence > 0) & (confidence <= 1))


# --- grid and OpenPack's 1 Hz truth -------------------------------------------------------------------------------


def test_one_hz_truth_takes_the_row_started_before_the_end_of_each_second_and_fills_gaps():
    origin = ORIGIN + dt.timedelta(milliseconds=250)
    tl = timeline((100, 0.0, 1.5), (200, 1.5, 3.0), (300, 4.2, 5.0), origin=origin)
    grid = SecondGrid.covering(origin, 0.0, 6.0)
    assert grid.frac_s == pytest.approx(0.25) and grid.count == 7
    np.testing.assert_allclose(grid.starts_s[:2], [-0.25, 0.75])
    # cells end at 0.75, 1.75, 2.75, 3.75 (gap: keeps 200), 4.75, 5.75 (starts before the last row's end), 6.75
    assert truth_labels(tl, grid).tolist() == [PICK, RELOCATE, RELOCATE, RELOCATE, ASSEMBLE, ASSEMBLE, NULL_INDEX]
    assert grid.unixtime_ms[1] - grid.unixtime_ms[0] == 1000


def test_media_before_the_annotated_span_gets_cells_but_no_truth():
    tl = timeline((100, 0.0, 5.0))
    grid = SecondGrid.covering(ORIGIN, -11.05, -10.05)  # like the real sample's frames, 11 s before the first row
    assert (grid.first, grid.count) == (-12, 2)
    np.testing.assert_allclose(grid.starts_s, [-12.0, -11.0])
    assert grid.unixtime_ms[0] == (int(ORIGIN.timestamp()) - 12) * 1000
    assert not annotated_cells(tl, grid).any()
    assert annotated_cells(tl, SecondGrid.covering(ORIGIN, 0.0, 7.0)).tolist() == [True] * 5 + [False] * 2


def test_one_hz_truth_equals_the_real_openpack_1hz_file(sample_root):
    annotation = sample_root / "U0209" / "annotation"
    tl = read_operations_csv(annotation / "openpack-operations" / "S0500.csv")
    with (annotation / "openpack-operations-1hz" / "S0500.csv").open() as f:
        rows = list(csv.DictReader(f))
    grid = SecondGrid.covering(tl.origin, 0.0, tl.duration_s)
    labels = dict(zip(grid.unixtime_ms.tolist(), truth_labels(tl, grid).tolist(), strict=True))
    assert len(rows) > 1000
    mismatches = [r for r in rows if LABELS[labels[int(r["unixtime"])]] != LABELS[INDEX_OF_ID[int(r["id"])]]]
    assert mismatches == []


# --- boxes --------------------------------------------------------------------------------------------------------


def seq(*runs: tuple[int, int]) -> np.ndarray:
    """Per-second labels from ``(label index, seconds)`` runs."""
    return np.concatenate([np.full(n, label) for label, n in runs])


FULL_BOX = [(PICK, 2), (RELOCATE, 2), (ASSEMBLE, 2), (INSERT, 2), (CLOSE, 2), (BOX_LABEL, 1), (SCAN, 2), (ORDER, 1),
            (SHIP_LABEL, 2)]  # fmt: skip


def test_boxes_start_when_the_work_jumps_back_in_the_procedure_not_on_a_repeat():
    labels = seq(
        *FULL_BOX,
        (BACK, 1),
        (NULL_INDEX, 2),
        (PICK, 2), (RELOCATE, 1), (PICK, 1), (RELOCATE, 1),  # a repeat inside box 2
        (ASSEMBLE, 2), (INSERT, 1), (CLOSE, 2), (BOX_LABEL, 1), (ORDER, 1), (SHIP_LABEL, 2),  # no scan
    )  # fmt: skip
    boxes = assign_boxes(labels)
    assert boxes[0] == 1 and boxes[-1] == 2
    assert set(boxes[: 16 + 1 + 2].tolist()) == {1}  # the Null gap belongs to the box before it
    figures = box_figures(labels, boxes, np.arange(len(labels), dtype=float))
    first, second = figures
    assert first.operation_time_s["Picking"] == 2 and first.operation_time_s["Put on Back Table"] == 1
    assert first.cycle_time_s == 19.0  # 17 s of work + 2 s of Null until box 2 starts
    assert first.transitions == [] and first.missing_steps == [] and not first.at_recording_edge
    kinds = [(t.kind, t.from_operation, t.to_operation, t.skipped) for t in second.transitions]
    assert kinds == [
        ("repeat", "Relocate Item Label", "Picking", []),
        ("skip", "Attach Box Label", "Fill out Order", ["Scan Label"]),
    ]
    assert second.missing_steps == ["Scan Label"]
    assert second.operation_time_s["Picking"] == 3
    summary = session_figures(figures, labels)
    assert summary["boxes"] == 2 and summary["skips"] == 1 and summary["repeats"] == 1
    assert summary["null_time_s"] == 2


def test_optional_step_is_never_a_skip_and_an_unfinished_last_box_is_at_the_edge():
    assert classify_transition(SHIP_LABEL, BACK) is None
    assert classify_transition(SCAN, ORDER) is None
    assert classify_transition(PICK, ASSEMBLE) == ("skip", [RELOCATE])
    labels = seq(*FULL_BOX, (PICK, 2), (RELOCATE, 2))
    figures = box_figures(labels, assign_boxes(labels), np.arange(len(labels), dtype=float))
    assert [f.at_recording_edge for f in figures] == [False, True]


def test_boxes_found_on_the_real_annotation_match_its_box_numbers(sample_root):
    tl = read_operations_csv(sample_root / "U0209" / "annotation" / "openpack-operations" / "S0500.csv")
    grid = SecondGrid.covering(tl.origin, 0.0, tl.duration_s)
    labels = truth_labels(tl, grid)
    from opsvlm.tasks.operations.timeline.grid import truth_boxes

    truth = truth_boxes(tl, grid)
    found = assign_boxes(labels)
    assert found.max() == truth.max() == 20
    assert np.mean(found == truth) > 0.99


def test_answer_vectors_and_unknown_tasks():
    adapter = timeline_for("operations")
    scores, following = adapter.answer_vectors({"scores": {"Picking": 0.7, "Null": 0.3}, "next_scores": {}})
    assert scores[PICK] == 0.7 and scores[NULL_INDEX] == 0.3 and following.sum() == 0
    with pytest.raises(ValueError, match="inspection"):
        timeline_for("inspection")
