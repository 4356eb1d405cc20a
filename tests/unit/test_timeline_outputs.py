"""A recording's annotation end to end on hand-made window answers: the predicted CSVs round-trip through the
project's OpenPack reader, the 1 Hz CSV has OpenPack's schema, the JSON and the Gantt picture are complete."""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json

import numpy as np
import pytest

from opsvlm.tasks.operations.data.openpack import read_operations_csv
from opsvlm.tasks.operations.timeline import WindowScores, annotate_windows, learn_grammar, recording_grid
from opsvlm.tasks.operations.timeline.grid import INDEX_OF_ID, LABELS, OP_IDS, SecondGrid, truth_labels
from opsvlm.tasks.operations.timeline.outputs import ONE_HZ_COLUMNS, predicted_timeline, write_figures, write_session
from opsvlm.tasks.operations.timeline.plot import gantt_png
from tests.unit.test_timeline import ORIGIN, timeline

L = len(LABELS)
TRUTH = timeline(
    (100, 0.0, 6.4), (200, 6.4, 12.0), (300, 12.0, 20.3), (400, 20.3, 25.0), (500, 25.0, 31.0),
    (600, 31.0, 33.5), (700, 33.5, 39.0), (1000, 39.0, 43.0), (800, 43.0, 48.0), (100, 48.0, 55.2),
    origin=ORIGIN + dt.timedelta(milliseconds=730),
)  # fmt: skip


def windows_from(truth, length: float = 4.0, stride: float = 1.0, noise: float = 0.3, seed: int = 0) -> WindowScores:
    """Windows whose scores are the truth's label at their centre, blurred with noise (a fake model)."""
    rng = np.random.default_rng(seed)
    starts = np.arange(0.0, truth.duration_s - length + 1e-9, stride)
    grid = SecondGrid.covering(truth.origin, 0.0, truth.duration_s)
    per_second = truth_labels(truth, grid)
    scores, following = [], []
    for start in starts:
        label = per_second[min(int(start + length / 2 + grid.frac_s), len(per_second) - 1)]
        p = rng.dirichlet(np.ones(L)) * noise
        p[label] += 1.0 - noise
        scores.append(p)
        q = np.full(L, 0.01)
        q[(label + 1) % 10] = 1.0
        following.append(q / q.sum())
    return WindowScores(starts, starts + length, np.array(scores), np.array(following))


@pytest.fixture
def annotation():
    grammar = learn_grammar([TRUTH] * 3, source="hand-made")
    grid = recording_grid(TRUTH.origin, 0.0, TRUTH.duration_s)
    return annotate_windows(
        windows_from(TRUTH), grid, grammar, subject="U0001", session="S0001", media="x.mp4", window_s=4.0,
        stride_s=1.0, truth=TRUTH,
    )  # fmt: skip


def test_predicted_operations_csv_round_trips_through_the_openpack_reader(annotation, tmp_path):
    paths = write_session(tmp_path, annotation)
    back = read_operations_csv(paths["operations"])
    written = predicted_timeline(annotation)
    assert (back.subject, back.session) == ("U0001", "S0001")
    assert back.origin == written.origin
    assert [(s.op_id, s.start_s, s.end_s, s.box) for s in back.segments] == [
        (s.op_id, s.start_s, s.end_s, s.box) for s in written.segments
    ]
    # read back and put on the session's 1 Hz grid, the file gives exactly the predicted labels
    grid = SecondGrid.covering(back.origin, 0.0, back.duration_s)
    offset = round((back.origin - annotation.grid.origin).total_seconds() + annotation.grid.frac_s)
    assert truth_labels(back, grid).tolist() == annotation.labels[offset : offset + grid.count].tolist()
    # rows start on whole seconds, like the 1 Hz cells
    assert back.origin.microsecond == 0


def test_one_hz_csv_has_openpacks_schema_and_one_row_per_second(annotation, tmp_path):
    paths = write_session(tmp_path, annotation)
    with paths["one_hz"].open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == ONE_HZ_COLUMNS
    assert len(rows) == annotation.seconds
    unixtimes = [int(r["unixtime"]) for r in rows]
    assert all(b - a == 1000 for a, b in itertools.pairwise(unixtimes))
    assert unixtimes[0] == int(ORIGIN.timestamp()) * 1000  # the origin's whole second (origin at +0.73 s)
    assert [int(r["id"]) for r in rows] == [OP_IDS[i] for i in annotation.labels]
    assert {r["user"] for r in rows} == {"U0001"}


def test_the_fake_model_is_decoded_close_to_the_truth_and_the_grammar_helps_when_it_is_noisy(annotation):
    truth = annotation.truth_labels
    assert np.mean(annotation.labels_grammar == truth) == np.mean(annotation.labels_argmax == truth) > 0.9
    noisy = annotate_windows(
        windows_from(TRUTH, stride=2.0, noise=0.8), annotation.grid, learn_grammar([TRUTH] * 3), truth=TRUTH
    )
    assert np.mean(noisy.labels_grammar == truth) > np.mean(noisy.labels_argmax == truth) + 0.05
    stats = annotation.stats()
    assert set(stats) == {"model + grammar", "model, per-second argmax", "majority"}
    assert stats["majority"].classes[:, 0].sum() == np.sum(truth == annotation.majority[0])


def test_timeline_json_segments_next_operation_and_boxes(annotation, tmp_path):
    paths = write_session(tmp_path, annotation, scores={"frame_macro_f1": 0.5, "nan": float("nan")})
    data = json.loads(paths["json"].read_text())  # strict JSON: NaN was written as null
    assert data["format"] == "opsvlm-timeline/1" and data["has_truth"] and data["scores"]["nan"] is None
    assert data["seconds"] == annotation.seconds == len(data["per_second"]["next_operation"])
    segments = data["segments"]
    assert segments[0]["start_s"] == pytest.approx(-0.73) and segments[-1]["end_s"] >= TRUTH.duration_s
    assert all(a["end_s"] == b["start_s"] for a, b in itertools.pairwise(segments))
    assert all(0 <= s["confidence"] <= 1 and s["operation"] != s["next_operation"] for s in segments)
    assert [b["box"] for b in data["boxes"]] == [1, 2]
    assert data["boxes"][0]["operations"][0] == "Picking"
    assert data["summary"]["boxes"] == 2


def test_figures_csv_and_gantt_picture(annotation, tmp_path):
    path = write_figures(tmp_path / "figures.csv", [annotation, annotation])
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["box"] for r in rows] == ["1", "2", "all"] * 2
    assert float(rows[0]["time_s/Picking"]) > 0
    png = gantt_png(annotation, tmp_path / "gantt.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_recording_without_annotation_or_operations(tmp_path):
    grammar = learn_grammar([TRUTH])
    grid = recording_grid(None, 0.0, 3.5)
    assert grid.count == 4 and grid.frac_s == 0 and grid.unixtime_ms[0] == 0
    null_only = np.zeros((1, L))
    null_only[0, INDEX_OF_ID[8100]] = 1.0
    windows = WindowScores([0.0], [3.5], null_only, null_only)
    annotation = annotate_windows(windows, grid, grammar, session="clip", decoder="argmax")
    assert annotation.stats() == {} and annotation.truth_labels is None
    paths = write_session(tmp_path, annotation)
    assert "operations" not in paths  # nothing but Null: no rows (and no empty file the reader would refuse)
    assert json.loads(paths["json"].read_text())["segments"][0]["operation"] == "Null"
    gantt_png(annotation, tmp_path / "g.png")
