"""The Ray Data pipeline on a real local Ray cluster, real H.264 files and the real OpenPack JPEG frames."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from opsvlm.data.pipeline import PrepareConfig, clip_dataset, frames_of, plan_sessions, prepare
from opsvlm.tasks.operations.data.clips import ClipConfig
from opsvlm.tasks.operations.data.openpack import annotation_path, discover_sessions, video_path
from opsvlm.video.decode import ClipWindow, iter_session_clips
from opsvlm.video.sampling import SamplingSpec
from tests.conftest import make_session

pytestmark = pytest.mark.integration

OPS = [(100, 3.0), (200, 4.0), (None, 1.5), (300, 3.5)]  # 12 s with a Null gap


def config(source, out, **kw):
    return PrepareConfig(
        source=str(source),
        out=str(out),
        clips=ClipConfig(4.0, 2.0),
        sampling=SamplingSpec(frames_per_clip=4, max_pixels=56 * 56),
        decode_deadline_s=30,
        decode_num_cpus=0.5,
        **kw,
    )


def read_split(out, split):
    files = sorted((out / "clips" / f"split={split}").glob("*.parquet"))
    return pq.ParquetDataset(files).read().to_pylist() if files else []


def test_prepare_writes_every_clip_once_and_rejects_bad_files_with_reasons(ray_local, tmp_path):
    source = tmp_path / "src"
    for subject in ("U0101", "U0102", "U0103"):
        make_session(source, subject, "S0100", OPS)
    # bad media, each in its own session: corrupt, zero-length, truncated, not a video, shorter than annotated
    bad = {
        ("U0101", "S0200"): "corrupt",
        ("U0102", "S0200"): "empty",
        ("U0103", "S0200"): "truncated",
        ("U0103", "S0300"): "text",
        ("U0102", "S0300"): "short",
    }
    for (subject, session), kind in bad.items():
        make_session(source, subject, session, OPS, video_seconds=6.0 if kind == "short" else None)
        path = video_path(source, subject, session)
        data = path.read_bytes()
        if kind == "corrupt":
            path.write_bytes(data[:48] + bytes(len(data) - 48))
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "truncated":
            path.write_bytes(data[: len(data) // 3])
        elif kind == "text":
            path.write_text("hello, I am a text file\n" * 100)
    # an unreadable annotation: reported as a rejected session
    make_session(source, "U0101", "S0400", OPS)
    annotation_path(source, "U0101", "S0400").write_text("uuid,user\n1,2\n")

    out = tmp_path / "prepared"
    summary = prepare(config(source, out))

    clips_per_session = 5  # 12 s, 4 s windows every 2 s
    assert summary["clips_total"] == 8 * clips_per_session
    assert summary["clips_written"] + summary["clips_rejected"] == summary["clips_total"]
    assert summary["clips_unaccounted"] == 0
    assert summary["sessions_rejected"] == 1 and "missing column" in summary["rejected_sessions"][0]["detail"]
    reasons = summary["rejected_reasons"]
    assert reasons["empty_file"] == clips_per_session and reasons["not_a_video"] >= clips_per_session
    assert reasons["beyond_media_end"] >= 3  # the 6 s video under a 12 s annotation
    assert json.loads((out / "summary.json").read_text()) == summary

    rejected = read_split(out, "rejected")
    assert len(rejected) == summary["clips_rejected"]
    assert all(row["reason"] and row["detail"] for row in rejected)
    assert any("S0200.mp4" in row["detail"] for row in rejected)

    # good clips: split by subject, frames decodable, labels present
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampling_spec"]["frames_per_clip"] == 4
    subjects = {}
    for split in ("train", "val", "test"):
        rows = read_split(out, split)
        assert len(rows) == manifest["splits"][split]["clips"]
        subjects[split] = {row["subject"] for row in rows}
        for row in rows:
            assert frames_of(row).shape == (4, 56, 56, 3)
            assert len(row["frame_times_s"]) == 4 and row["status"] == "ok"
            assert row["dominant_operation"] in {"Picking", "Relocate Item Label", "Assemble Box", "Null"}
    assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"])
    good_sessions = {(r["subject"], r["session"]) for s in ("train", "val", "test") for r in read_split(out, s)}
    assert ("U0101", "S0100") in good_sessions and ("U0102", "S0200") not in good_sessions


def test_prepare_reads_the_openpack_jpeg_frame_layout(ray_local, tmp_path, sample_root):
    # The real sample's 15 frames with an annotation placed over their second.
    root = tmp_path / "openpack"
    shutil.copytree(sample_root / "U0209/kinect", root / "U0209/kinect")
    csv_dir = root / "U0209/annotation/openpack-operations"
    csv_dir.mkdir(parents=True)
    (csv_dir / "S0500.csv").write_text(
        "uuid,user,session,box,id,operation,start,end,actions\n"
        "op:a,U0209,S0500,1,100,Picking,2022-03-29 14:25:11.030000+09:00,2022-03-29 14:25:11.500000+09:00,\n"
        "op:b,U0209,S0500,1,200,Relocate Item Label,2022-03-29 14:25:11.500000+09:00,"
        "2022-03-29 14:25:12.000000+09:00,\n"
    )
    out = tmp_path / "prepared"
    cfg = PrepareConfig(
        source=str(root),
        out=str(out),
        clips=ClipConfig(0.9, 0.9),
        sampling=SamplingSpec(frames_per_clip=4, max_pixels=112 * 112),
        split_fractions=(1.0, 0.0, 0.0),
    )
    summary = prepare(cfg)
    # 0.97 s annotated: a window at 0 s and one aligned to the end
    assert summary["clips_total"] == summary["clips_written"] == 2, summary
    rows = sorted(read_split(out, "train"), key=lambda r: r["start_s"])
    assert [r["dominant_operation"] for r in rows] == ["Picking", "Relocate Item Label"]
    height, width = cfg.sampling.target_size(720, 1280)  # the real frames are 1280x720
    assert all(frames_of(r).shape == (4, height, width, 3) for r in rows)


def test_everything_rejected_still_writes_a_summary(ray_local, tmp_path, sample_root):
    # The real sample: its 15 frames are 11 s before the first annotated operation, so no clip has frames.
    out = tmp_path / "prepared"
    summary = prepare(PrepareConfig(source=str(sample_root), out=str(out)))
    assert summary["clips_written"] == 0
    assert summary["clips_rejected"] == summary["clips_total"] > 500
    assert set(summary["rejected_reasons"]) == {"beyond_media_end"}
    assert json.loads((out / "summary.json").read_text())["clips_rejected"] == summary["clips_rejected"]


def test_sessions_cut_into_many_tasks_give_every_clip_once_and_a_hang_is_rejected(ray_local, tmp_path):
    source = tmp_path / "src"
    for subject in ("U0101", "U0102"):
        make_session(source, subject, "S0100", OPS)
    make_session(source, "U0103", "S0100", OPS[:2])  # 7 s: 3 clips, 2 tasks (each waits for its deadline)
    sources = discover_sessions(source)
    hang = tmp_path / "hang.mp4"
    os.mkfifo(hang)  # decord blocks opening a FIFO nobody writes to: a real hang, killed at the deadline
    sources = [dataclasses.replace(s, media=str(hang)) if s.subject == "U0103" else s for s in sources]
    out = tmp_path / "prepared"
    cfg = dataclasses.replace(config(source, out), clips_per_task=2, decode_deadline_s=20, split_fractions=(1, 0, 0))

    summary = prepare(cfg, sources)
    assert summary["clips_total"] == 13 and summary["clips_unaccounted"] == 0
    assert summary["clips_written"] == 10 and summary["rejected_reasons"] == {"decode_timeout": 3}, summary
    rejected = read_split(out, "rejected")
    assert {row["subject"] for row in rejected} == {"U0103"} and all("within 20 s" in r["detail"] for r in rejected)
    # 5 clips per session in tasks of at most 2 clips: 3 shard files per good session, every clip exactly once
    files = sorted(p.name for p in (out / "clips" / "split=train").glob("*.parquet"))
    assert files == [f"{s}_S0100_{part:04d}.parquet" for s in ("U0101", "U0102") for part in range(3)]
    rows = read_split(out, "train")
    assert sorted(r["clip_id"] for r in rows) == [f"{s}/S0100/{i:05d}" for s in ("U0101", "U0102") for i in range(5)]
    # the frames equal a decode of the whole session in one pass
    windows = [ClipWindow(r["clip_id"], r["start_s"], r["end_s"]) for r in rows if r["subject"] == "U0101"]
    whole = {c.clip_id: c for c in iter_session_clips(rows[0]["source"], "video", windows, cfg.sampling)}
    for row in rows:
        if row["subject"] == "U0101":
            assert np.array_equal(frames_of(row), whole[row["clip_id"]].frames)
            assert np.allclose(row["frame_times_s"], whole[row["clip_id"]].frame_times_s)
    # raw pixels are stored as they are; the small columns keep Parquet's compression
    meta = pq.ParquetFile(out / "clips" / "split=train" / files[0]).metadata.row_group(0)
    columns = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert columns["frames"].compression == "UNCOMPRESSED" and columns["clip_id"].compression == "SNAPPY"

    # a second run into the same folder replaces the first run's shards (no clip counted twice)
    again = prepare(dataclasses.replace(cfg, clips_per_task=5), sources)
    assert again["clips_written"] == 10 and again["clips_rejected"] == 3 and again["clips_unaccounted"] == 0
    assert len(read_split(out, "train")) == 10


def test_clip_dataset_streams_the_same_clips(ray_local, tmp_path):
    source = tmp_path / "src"
    make_session(source, "U0101", "S0100", OPS)
    cfg = config(source, tmp_path / "unused")
    sources = discover_sessions(source)
    plan = plan_sessions(sources, cfg.clips, {"U0101": "train"})
    rows = clip_dataset(plan, cfg.sampling, deadline_s=30, num_cpus=0.5, clips_per_task=2).take_all()
    assert sorted(r["clip_id"] for r in rows) == [f"U0101/S0100/{i:05d}" for i in range(5)]
    assert all(r["split"] == "train" and r["status"] == "ok" and frames_of(r).shape == (4, 56, 56, 3) for r in rows)
