import datetime as dt

import pytest

from opsvlm.tasks.operations.data.clips import (
    ClipConfig,
    ClipRecord,
    label_runs,
    make_clips,
    split_subjects,
    window_starts,
)
from opsvlm.tasks.operations.data.openpack import Segment, SessionTimeline, read_operations_csv

ORIGIN = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def timeline(*rows):
    """rows: (op_id, start, end)."""
    return SessionTimeline("U1", "S1", ORIGIN, tuple(Segment(op, s, e) for op, s, e in rows))


def labels(clip: ClipRecord):
    return clip.dominant_operation, clip.temporal_segment, clip.next_operation


def test_basic_window_labels():
    tl = timeline((100, 0, 3), (200, 3, 10), (300, 10, 12))
    clips = make_clips(tl, ClipConfig(5, 2.5))
    assert [(c.start_s, c.end_s) for c in clips] == [(0, 5), (2.5, 7.5), (5, 10), (7, 12)]
    assert labels(clips[0]) == ("Picking", (0.0, 3.0), "Relocate Item Label")
    assert labels(clips[1]) == ("Relocate Item Label", (0.5, 5.0), "Assemble Box")
    # last operation of the session: nothing follows -> Null
    assert labels(clips[3]) == ("Relocate Item Label", (0.0, 3.0), "Assemble Box")
    tail = make_clips(timeline((100, 0, 3), (300, 3, 12)), ClipConfig(5, 2.5))[-1]
    assert labels(tail) == ("Assemble Box", (0.0, 5.0), "Null")


def test_windows_cover_the_session_end_and_short_sessions():
    config = ClipConfig(5, 2.5)
    assert window_starts(11.0, config) == [0, 2.5, 5.0, 6.0]  # tail window aligned to the end
    assert window_starts(10.0, config) == [0, 2.5, 5.0]
    assert window_starts(3.0, config) == [0.0]  # shorter than a clip: one clip covering it
    short = make_clips(timeline((100, 0, 3)), config)
    assert [(c.start_s, c.end_s) for c in short] == [(0, 3)]
    assert window_starts(0.0, config) == []


def test_null_gap_dominant_clip_predicts_next_real_operation():
    tl = timeline((100, 0, 2), (200, 6, 9))  # 4 s un-annotated gap = Null
    (clip,) = [c for c in make_clips(tl, ClipConfig(4, 1)) if c.start_s == 2]
    assert labels(clip) == ("Null", (0.0, 4.0), "Relocate Item Label")
    runs = label_runs(tl)
    assert [(r.op_id, r.start_s, r.end_s) for r in runs] == [(100, 0, 2), (8100, 2, 6), (200, 6, 9)]


def test_ties_go_to_the_earlier_operation():
    tl = timeline((100, 0, 2.5), (200, 2.5, 5), (300, 5, 8))
    clip = make_clips(tl, ClipConfig(5, 5))[0]
    assert labels(clip) == ("Picking", (0.0, 2.5), "Relocate Item Label")


def test_repeated_rows_of_one_operation_merge_into_one_run():
    tl = timeline((400, 0, 2), (400, 2, 4), (500, 4, 5))
    clip = make_clips(tl, ClipConfig(5, 5))[0]
    assert labels(clip) == ("Insert Items", (0.0, 4.0), "Close Box")


def test_next_operation_skips_null_and_repeats_of_the_same_operation():
    tl = timeline((400, 0, 4), (500, 4, 4.5), (400, 4.5, 6), (600, 8, 9))
    clip = make_clips(tl, ClipConfig(4, 4))[0]
    assert labels(clip) == ("Insert Items", (0.0, 4.0), "Close Box")
    # an operation shorter than a frame interval (0.05 s at 15 fps is 0.067 s) still counts as the next one
    tl = timeline((100, 0, 5), (200, 5, 5.05), (300, 5.05, 9))
    assert make_clips(tl, ClipConfig(5, 5))[0].next_operation == "Relocate Item Label"


def test_real_sample_clips_label_every_window(sample_root):
    tl = read_operations_csv(sample_root / "U0209/annotation/openpack-operations/S0500.csv")
    clips = make_clips(tl, ClipConfig())
    assert len(clips) == len(window_starts(tl.duration_s, ClipConfig()))
    assert clips[-1].end_s == pytest.approx(tl.duration_s)
    for clip in clips:
        start, end = clip.temporal_segment
        assert 0 <= start < end <= clip.length_s + 1e-9
    # the sample ends with "Put on Back Table" (900): its last clip has nothing next
    assert clips[-1].dominant_operation == "Put on Back Table" and clips[-1].next_operation == "Null"
    assert sum(c.dominant_operation == "Null" for c in clips) >= 1  # the sample has a few un-annotated gaps
    assert ClipRecord.from_dict(clips[7].to_dict()) == clips[7]


def test_subject_split_is_disjoint_reproducible_and_complete():
    subjects = [f"U{i:04d}" for i in range(10)]
    a = split_subjects(subjects, (0.6, 0.2, 0.2), seed=3)
    assert a == split_subjects(list(reversed(subjects)), (0.6, 0.2, 0.2), seed=3)
    assert set(a) == set(subjects)
    assert sorted(a.values()).count("train") == 6 and list(a.values()).count("test") == 2
    assert a != split_subjects(subjects, (0.6, 0.2, 0.2), seed=4)
    small = split_subjects(["U1", "U2", "U3"])
    assert sorted(small.values()) == ["test", "train", "val"]
    with pytest.raises(ValueError, match="summing to 1"):
        split_subjects(subjects, (0.5, 0.2, 0.2))


def test_clip_config_validation():
    with pytest.raises(ValueError, match="length_s"):
        ClipConfig(0, 1)
    with pytest.raises(ValueError, match="stride_s"):
        ClipConfig(5, -1)
