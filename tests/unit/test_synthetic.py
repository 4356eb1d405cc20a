"""Tests of the synthetic OpenPack-layout session generator (small frames and low frame rates to stay fast)."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from opsvlm.tasks.operations import BY_ID, NULL, PROCEDURE
from opsvlm.tasks.operations.data.openpack import (
    annotation_path,
    discover_sessions,
    frame_time_from_name,
    frames_dir,
    label_at,
    list_frames,
    read_operations_csv,
    video_path,
    write_operations_csv,
)
from opsvlm.tasks.operations.data.synthetic import (
    OPERATION_DURATIONS,
    REPEAT_PAIRS,
    SKIPPABLE_IDS,
    GeneratorConfig,
    ProcedureVariation,
    frame_labels,
    generate_dataset,
    generate_session,
    generate_timeline,
    num_frames,
    render_session,
    subject_ids,
    subject_style,
    summarize,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
REAL_SAMPLE = Path("/work/shared/openpack-sample/U0209/annotation/openpack-operations/S0500.csv")
TINY = dict(subjects=1, sessions_per_subject=1, boxes_per_session=1, fps=3, width=64, height=48)


def _decode(path: str | Path) -> list[np.ndarray]:
    """All frames of a video: uint8[H, W, 3] RGB each."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _boxes(timeline) -> list[list[int]]:
    """Operation ids per box, in order."""
    per_box: dict[int, list[int]] = {}
    for seg in timeline.segments:
        per_box.setdefault(seg.box, []).append(seg.op_id)
    return list(per_box.values())


def _clean_style(subject: str, seed: int = 0):
    """The subject's style without nuisances, so frame differences come from the worker and the box only."""
    return dataclasses.replace(
        subject_style(subject, seed),
        noise_sigma=0.0,
        shake_px=0.0,
        shake_bursts_per_min=1e-9,
        light_drift=0.0,
        occlusions_per_min=1e-9,
    )


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """The same tiny dataset generated twice with seed 0 and once with seed 1."""
    roots = {name: tmp_path_factory.mktemp(name) for name in ("seed0_a", "seed0_b", "seed1")}
    sources = {
        name: generate_dataset(root, GeneratorConfig(seed=1 if name == "seed1" else 0, **TINY))
        for name, root in roots.items()
    }
    return roots, sources


def test_same_seed_gives_identical_csv_bytes_and_frames(tiny_dataset):
    _roots, sources = tiny_dataset
    a, b, other = sources["seed0_a"][0], sources["seed0_b"][0], sources["seed1"][0]
    assert Path(a.annotation).read_bytes() == Path(b.annotation).read_bytes()
    frames_a, frames_b = _decode(a.media), _decode(b.media)
    assert len(frames_a) == len(frames_b)
    assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b, strict=True))
    assert Path(a.annotation).read_bytes() != Path(other.annotation).read_bytes()
    assert not np.array_equal(frames_a[0], _decode(other.media)[0])


def test_dataset_layout_and_video_length_match_annotation(tiny_dataset):
    roots, sources = tiny_dataset
    root, (source,) = roots["seed0_a"], sources["seed0_a"]
    assert (source.subject, source.session, source.media_kind) == ("U0101", "S0100", "video")
    assert Path(source.annotation) == annotation_path(root, "U0101", "S0100")
    assert Path(source.media) == video_path(root, "U0101", "S0100")
    assert discover_sessions(root) == [source]
    timeline = read_operations_csv(source.annotation)
    frames = _decode(source.media)
    fps = TINY["fps"]
    assert len(frames) == num_frames(timeline.duration_s, fps)
    assert abs(len(frames) / fps - timeline.duration_s) <= 1.0 / fps
    assert frames[0].shape == (TINY["height"], TINY["width"], 3)
    with av.open(source.media) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == fps


def test_csv_reads_back_exactly(tmp_path):
    timeline = generate_timeline("U0103", "S0200", seed=5, boxes=4)
    path = write_operations_csv(annotation_path(tmp_path, "U0103", "S0200"), timeline)
    read = read_operations_csv(path)
    assert (read.subject, read.session, read.origin) == ("U0103", "S0200", timeline.origin)
    assert read.origin.utcoffset().total_seconds() == 9 * 3600
    assert len(read.segments) == len(timeline.segments)
    for got, want in zip(read.segments, timeline.segments, strict=True):
        assert (got.op_id, got.start_s, got.end_s, got.box) == (want.op_id, want.start_s, want.end_s, want.box)
        assert got.op_id in BY_ID and got.op_id != NULL.id
    assert read.segments[0].start_s == 0.0
    assert {seg.box for seg in read.segments} == {1, 2, 3, 4}


def test_procedure_order_and_variation_over_many_boxes():
    timelines = [generate_timeline(subject, "S0100", seed=11, boxes=10) for subject in subject_ids(40)]
    boxes = [ops for timeline in timelines for ops in _boxes(timeline)]
    rank = {op: i for i, op in enumerate(PROCEDURE)}
    repeats = skips = 0
    for ops in boxes:
        assert ops[0] == 100
        for i, op in enumerate(ops):
            if op == 1000:
                assert ops[i + 1] == 800
            if op == 900:
                assert i == len(ops) - 1
        first_seen = list(dict.fromkeys(ops))
        assert [rank[op] for op in first_seen] == sorted(rank[op] for op in first_seen)
        assert {300, 400, 500, 700, 800} <= set(first_seen)
        assert set(PROCEDURE) - set(first_seen) - {900} <= set(SKIPPABLE_IDS)
        counts = Counter(ops)
        doubled = {op for op, n in counts.items() if n > 1}
        if doubled:
            repeats += 1
            assert max(counts.values()) == 2
            assert tuple(sorted(doubled)) in REPEAT_PAIRS
            first, second = sorted(doubled)
            start = ops.index(first)
            assert ops[start : start + 4] == [first, second, first, second]
        skips += len(set(PROCEDURE) - set(first_seen) - {900}) > 0
    with_back_table = sum(900 in ops for ops in boxes) / len(boxes)
    assert 0.18 <= with_back_table <= 0.32
    assert 0.05 <= repeats / len(boxes) <= 0.25
    assert skips / len(boxes) <= 0.08


def test_durations_and_null_gaps_look_like_the_real_annotation():
    timelines = [generate_timeline(subject, "S0100", seed=2, boxes=10) for subject in subject_ids(30)]
    durations: dict[int, list[float]] = {}
    gaps, transitions = [], 0
    for timeline in timelines:
        segments = timeline.segments
        for prev, seg in itertools.pairwise(segments):
            transitions += 1
            gap = round(seg.start_s - prev.end_s, 6)
            assert gap >= 0.0
            if gap > 0:
                gaps.append(gap)
        for seg in segments:
            stats = OPERATION_DURATIONS[seg.op_id]
            assert 1.0 <= seg.duration_s <= stats.max_s + 1e-9
            durations.setdefault(seg.op_id, []).append(seg.duration_s)
    assert 0.03 <= len(gaps) / transitions <= 0.12
    assert min(gaps) >= 1.0 and max(gaps) <= 4.0
    for op_id, values in durations.items():
        # Repeated rows are shorter, so the overall mean may sit a little below the measured one.
        assert 0.7 * OPERATION_DURATIONS[op_id].mean_s <= np.mean(values) <= 1.15 * OPERATION_DURATIONS[op_id].mean_s


def test_session_duration_target_adds_whole_boxes():
    timeline = generate_timeline("U0101", "S0100", seed=0, duration_s=300)
    assert timeline.duration_s >= 300
    last_box = timeline.segments[-1].box
    last_box_start = min(seg.start_s for seg in timeline.segments if seg.box == last_box)
    assert last_box_start < 300
    assert timeline.segments[-1].op_id in (800, 900)


def test_timelines_are_deterministic_and_independent_of_other_sessions():
    a = generate_timeline("U0102", "S0300", seed=4, boxes=3)
    assert a == generate_timeline("U0102", "S0300", seed=4, boxes=3)
    assert a != generate_timeline("U0102", "S0300", seed=5, boxes=3)
    assert a.segments != generate_timeline("U0102", "S0400", seed=4, boxes=3).segments
    assert a.origin != generate_timeline("U0103", "S0300", seed=4, boxes=3).origin


def test_frame_labels_match_label_at():
    timeline = generate_timeline("U0101", "S0100", seed=3, boxes=3, variation=ProcedureVariation(p_gap=0.5))
    labels = frame_labels(timeline, 7)
    assert len(labels) == num_frames(timeline.duration_s, 7)
    assert NULL.id in labels
    for i in range(0, len(labels), 5):
        assert labels[i] == label_at(timeline, i / 7)


def test_operations_are_visually_distinct_and_moving():
    variation = ProcedureVariation(p_put_on_back_table=1.0, p_repeat=0.0, p_skip=0.0, p_gap=0.3)
    timeline = generate_timeline("U0101", "S0100", seed=0, boxes=2, variation=variation)
    fps = 5
    labels = frame_labels(timeline, fps)
    frames = np.stack(list(render_session(timeline, fps=fps, width=96, height=96))).astype(np.float32)
    assert frames.shape == (len(labels), 96, 96, 3)
    ops = sorted(set(labels.tolist()))
    assert set(ops) == set(PROCEDURE) | {NULL.id}
    mean_frames = {op: frames[labels == op].mean(axis=0) for op in ops}
    for a, b in itertools.combinations(PROCEDURE, 2):
        assert np.abs(mean_frames[a] - mean_frames[b]).mean() > 3.0, (a, b)
    # Without nuisances, consecutive frames still change in every operation (and while idle): the worker moves.
    clean = np.stack(list(render_session(timeline, _clean_style("U0101"), fps=fps, width=96, height=96)))
    clean = clean.astype(np.float32)
    for op in ops:
        index = np.flatnonzero(labels == op)
        index = index[1:][np.diff(index) == 1]
        change = np.abs(clean[index] - clean[index - 1])
        assert change.mean() > (0.05 if op == NULL.id else 0.2), op  # idle: small motion only
        assert (change.max(axis=(1, 2, 3)) > 0).mean() > 0.8, op


def test_box_state_persists_within_a_box_and_resets_for_the_next():
    variation = ProcedureVariation(p_put_on_back_table=0.0, p_repeat=0.0, p_skip=0.0, p_gap=0.0)
    timeline = generate_timeline("U0104", "S0100", seed=1, boxes=2, variation=variation)
    fps = 4
    labels = frame_labels(timeline, fps)
    frames = np.stack(list(render_session(timeline, _clean_style("U0104"), fps=fps, width=96, height=96)))
    frames = frames.astype(np.float32)
    second_box_start = next(seg.start_s for seg in timeline.segments if seg.box == 2)
    box1 = np.arange(len(labels)) / fps < second_box_start
    last_of_box1 = np.flatnonzero(box1 & (labels == 800))[-1]
    first_of_box1 = np.flatnonzero(box1 & (labels == 100))[0]
    first_of_box2 = np.flatnonzero(~box1 & (labels == 100))[0]
    # A finished box differs strongly from the empty bench; the next box starts from an empty bench again.
    assert (
        np.abs(frames[last_of_box1] - frames[first_of_box1]).mean()
        > 3 * np.abs(frames[first_of_box2] - frames[first_of_box1]).mean()
    )


def test_nuisances_are_bounded_and_noise_never_wraps_around():
    timeline = generate_timeline("U0105", "S0100", seed=0, boxes=1)
    style = subject_style("U0105", 0)
    quiet = dataclasses.replace(style, noise_sigma=0.0)
    # Same seed, same random draws: only the noise differs, and it stays within a few levels everywhere
    # (wrapping uint8 arithmetic would show up as differences near 255).
    for noisy, clean in zip(
        render_session(timeline, style, fps=2, width=64, height=64),
        render_session(timeline, quiet, fps=2, width=64, height=64),
        strict=True,
    ):
        difference = np.abs(noisy.astype(np.int16) - clean.astype(np.int16))
        assert difference.max() <= 8
    assert style.noise_sigma > 0.0 and 0.0 < style.light_drift < 0.1


def test_subject_styles_differ_and_are_deterministic():
    styles = [subject_style(subject, 0) for subject in subject_ids(6)]
    assert styles[0] == subject_style("U0101", 0)
    assert subject_style("U0101", 1) != styles[0]
    assert len({(s.clothing, s.camera_rotation_deg) for s in styles}) == len(styles)
    timeline = generate_timeline("U0101", "S0100", seed=0, boxes=1)
    first = [next(iter(render_session(timeline, style, fps=2, width=64, height=64))) for style in styles[:3]]
    for a, b in itertools.combinations(first, 2):
        assert np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() > 5.0


def test_jpeg_frames_land_at_openpack_names(tmp_path):
    config = GeneratorConfig(seed=2, write_video=False, write_frames=True, **TINY)
    source = generate_session(tmp_path, "U0101", "S0100", config)
    assert source.media_kind == "frames"
    assert Path(source.media) == frames_dir(tmp_path, "U0101", "S0100")
    timeline = read_operations_csv(source.annotation)
    paths = list_frames(source.media)
    assert len(paths) == num_frames(timeline.duration_s, config.fps)
    times = [timeline.seconds_since_origin(frame_time_from_name(p)) for p in paths]
    assert all(abs(t - i / config.fps) < 1e-3 for i, t in enumerate(times))
    assert discover_sessions(tmp_path)[0].media_kind == "frames"


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="fps"):
        GeneratorConfig(fps=0)
    with pytest.raises(ValueError, match="width"):
        GeneratorConfig(width=225)
    with pytest.raises(ValueError, match="at most one"):
        GeneratorConfig(boxes_per_session=3, session_duration_s=60)
    with pytest.raises(ValueError, match="subjects"):
        GeneratorConfig(subjects=["U01"])
    with pytest.raises(ValueError, match="seed"):
        GeneratorConfig(seed=-1)
    with pytest.raises(ValueError, match="p_gap"):
        ProcedureVariation(p_gap=1.5)
    with pytest.raises(ValueError, match="at most one"):
        generate_timeline("U0101", "S0100", boxes=2, duration_s=10)
    assert GeneratorConfig(subjects=["U0209", "U0101"]).subject_ids == ("U0209", "U0101")
    assert GeneratorConfig(subjects=3, sessions_per_subject=2).session_ids == ("S0100", "S0200")


def test_summary_counts_rows():
    timelines = [generate_timeline("U0101", "S0100", seed=0, boxes=2), generate_timeline("U0102", "S0100", boxes=3)]
    summary = summarize(timelines)
    assert (summary.sessions, summary.boxes) == (2, 5)
    assert sum(summary.op_counts.values()) == sum(len(t.segments) for t in timelines)
    assert summary.op_counts["Picking"] >= 5
    assert "Picking" in summary.format()


@pytest.mark.skipif(not REAL_SAMPLE.is_file(), reason="real OpenPack annotation sample not available")
def test_renders_a_real_annotation():
    timeline = read_operations_csv(REAL_SAMPLE)
    frames = render_session(timeline, fps=1, width=64, height=64)
    first = [frame for _, frame in zip(range(5), frames, strict=False)]
    assert len(first) == 5 and first[0].shape == (64, 64, 3)


def test_job_main_generates_and_summarises(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("generate_data", REPO_ROOT / "jobs" / "generate_data.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = ["--out", str(tmp_path), "--subjects", "2", "--sessions-per-subject", "1", "--seed", "7"]
    assert job.main([*argv, "--boxes-per-session", "1", "--fps", "2", "--size", "64x48", "--no-video"]) == 0
    out = capsys.readouterr().out
    assert "sessions: 2" in out and "Picking" in out
    assert [s.subject for s in discover_sessions(tmp_path)] == ["U0101", "U0102"]
