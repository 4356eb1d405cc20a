"""Decoding real video files and real OpenPack JPEG frames (no Ray): decode-once, sampling, bad input, deadlines."""

import os
import shutil
from pathlib import Path

import decord
import numpy as np
import pytest

from opsvlm.video.frames import frame_time_from_name, list_frames
from opsvlm.video import decode
from opsvlm.video.decode import (
    ClipFrames,
    ClipRejection,
    ClipWindow,
    decode_session_views,
    decode_session_with_deadline,
    iter_session_clips,
    sample_frames,
)
from opsvlm.video.encode import write_video
from opsvlm.video.sampling import SamplingSpec, uniform_indices
from tests.conftest import frame_index_of, index_frame

FPS = 15.0


@pytest.fixture(scope="module")
def gradient_video(tmp_path_factory):
    """12 s, 15 fps, 96x128 H.264 video with a moving gradient and a bright flash at frames 40-41."""
    path = tmp_path_factory.mktemp("video") / "session.mp4"
    ramp = np.linspace(0, 200, 128, dtype=np.float32)[None, :, None]

    def frame(i):
        image = np.broadcast_to((ramp + i * 3) % 200, (96, 128, 3)).astype(np.uint8).copy()
        if i in (40, 41):
            image[:] = 255
        return image

    write_video(path, (frame(i) for i in range(180)), FPS)
    return str(path)


def clips_every(seconds, length, count):
    return [ClipWindow(f"c{i}", i * seconds, i * seconds + length) for i in range(count)]


def by_id(results):
    return {r.clip_id: r for r in results}


def test_decode_once_gives_the_same_frames_as_seeking_per_clip(gradient_video):
    spec = SamplingSpec(strategy="uniform", frames_per_clip=8, max_pixels=56 * 84)
    clips = clips_every(2.5, 5.0, 3)
    results = by_id(iter_session_clips(gradient_video, "video", clips, spec))
    height, width = spec.target_size(96, 128)
    assert (height, width) == (56, 56)  # 96x128 scaled under 56*84 pixels, sides multiples of 28
    for clip in clips:
        got = results[clip.clip_id]
        assert isinstance(got, ClipFrames) and got.frames.shape == (8, 56, 56, 3)
        # the seed-style way: open, seek, read this clip's frames
        first = int(np.ceil(clip.start_s * FPS - 1e-6))  # first frame at or after the clip start
        wanted = first + uniform_indices(round((clip.end_s - clip.start_s) * FPS), 8)
        reader = decord.VideoReader(gradient_video, width=width, height=height, num_threads=1)
        assert np.array_equal(got.frames, reader.get_batch(wanted.tolist()).asnumpy())
        assert np.allclose(got.frame_times_s, wanted / FPS - clip.start_s, atol=2e-3)
        assert got.source_fps == pytest.approx(FPS, rel=1e-3)


def test_motion_sampling_picks_the_flash(gradient_video):
    spec = SamplingSpec(strategy="motion", frames_per_clip=4, max_pixels=56 * 84)
    (result,) = iter_session_clips(gradient_video, "video", [ClipWindow("c", 2.0, 4.0)], spec)
    times = np.round(result.frame_times_s * FPS).astype(int)  # clip-relative frame offsets
    assert times[0] == 0 and times[-1] == 29
    assert {40 - 30, 42 - 30} <= set(times.tolist())  # the change into and out of the flash


def test_serving_side_sampling_matches_the_pipeline(gradient_video):
    spec = SamplingSpec(strategy="motion", frames_per_clip=6, max_pixels=56 * 84)
    (piped,) = iter_session_clips(gradient_video, "video", [ClipWindow("c", 1.0, 6.0)], spec)
    reader = decord.VideoReader(gradient_video, width=56, height=56, num_threads=1)
    all_frames = reader.get_batch(list(range(15, 90))).asnumpy()
    frames, times = sample_frames(all_frames, np.arange(75) / FPS, spec)
    assert np.array_equal(frames, piped.frames) and np.allclose(times, piped.frame_times_s, atol=2e-3)


def test_clips_beyond_the_video_are_rejected_not_dropped(gradient_video):
    clips = clips_every(2.5, 5.0, 6)  # the last ends at 17.5 s; the video is 12 s
    results = by_id(iter_session_clips(gradient_video, "video", clips, SamplingSpec(max_pixels=56 * 84)))
    assert set(results) == {c.clip_id for c in clips}
    assert [type(results[f"c{i}"]).__name__ for i in range(6)] == ["ClipFrames"] * 3 + ["ClipRejection"] * 3
    assert results["c5"].reason == "beyond_media_end" and "12.000 s" in results["c5"].detail


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty_file"), (b"this is not a video at all" * 50, "not_a_video"), (None, "missing_file")],
)
def test_bad_files_reject_every_clip_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    clips = clips_every(1, 2, 3)
    results = list(decode_session_with_deadline(str(path), "video", clips, SamplingSpec(), deadline_s=60))
    assert len(results) == 3 and all(isinstance(r, ClipRejection) and r.reason == reason for r in results)
    assert str(path) in results[0].detail


def test_truncated_video_keeps_what_decodes_and_rejects_the_rest(tmp_path, gradient_video):
    data = Path(gradient_video).read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    clips = clips_every(2.5, 5.0, 3)
    results = list(decode_session_with_deadline(str(path), "video", clips, SamplingSpec(max_pixels=56 * 84), 60))
    assert len(results) == 3
    for result in results:
        assert isinstance(result, ClipFrames) or result.reason in {"not_a_video", "decode_error", "beyond_media_end"}
    assert any(isinstance(r, ClipRejection) for r in results)


def test_a_hanging_decode_hits_the_deadline_and_the_next_decode_works(tmp_path, gradient_video):
    fifo = tmp_path / "hangs.mp4"
    os.mkfifo(fifo)  # opening a FIFO with no writer blocks forever inside decord: a real hang
    clips = clips_every(1, 2, 2)
    results = list(decode_session_with_deadline(str(fifo), "video", clips, SamplingSpec(), deadline_s=3))
    assert [r.reason for r in results] == ["decode_timeout", "decode_timeout"]
    assert "within 3 s" in results[0].detail
    good = list(decode_session_with_deadline(gradient_video, "video", clips, SamplingSpec(max_pixels=56 * 84), 60))
    assert all(isinstance(r, ClipFrames) for r in good)


def test_jpeg_frames_layout_with_the_real_openpack_frames(sample_root, tmp_path):
    frames_dir = sample_root / "U0209/kinect/color-masked/frames/S0500"
    frames = list_frames(frames_dir)
    first = frame_time_from_name(frames[0])
    spec = SamplingSpec(frames_per_clip=4, max_pixels=224 * 224)
    # session origin 0.5 s before the first frame; clip covers the frames' second
    clips = [ClipWindow("a", 0.5, 1.5), ClipWindow("late", 5.0, 6.0)]
    results = by_id(iter_session_clips(str(frames_dir), "frames", clips, spec, origin_offset_s=0.5))
    got = results["a"]
    assert got.frames.shape == (4, 168, 280, 3)  # 1280x720 -> aspect kept, multiples of 28, <= 224*224 pixels
    assert got.frame_times_s[0] == pytest.approx(0.0, abs=1e-6)
    span = (frame_time_from_name(frames[-1]) - first).total_seconds()
    assert got.frame_times_s[-1] == pytest.approx(span, abs=1e-6)
    assert results["late"].reason == "beyond_media_end"
    # a corrupt JPEG is named in the rejection
    broken = tmp_path / "frames"
    shutil.copytree(frames_dir, broken)
    list_frames(broken)[0].write_bytes(b"not a jpeg")
    (rejected,) = iter_session_clips(str(broken), "frames", [ClipWindow("a", 0.0, 0.9)], spec)
    assert rejected.reason == "decode_error" and ".jpg" in rejected.detail


def test_index_encoded_video_samples_the_expected_frames(tmp_path):
    path = tmp_path / "idx.mp4"
    write_video(path, (index_frame(i) for i in range(30)), FPS)
    (result,) = iter_session_clips(str(path), "video", [ClipWindow("c", 0.0, 2.0)], SamplingSpec(frames_per_clip=4))
    assert [frame_index_of(f) for f in result.frames] == uniform_indices(30, 4).tolist()


@pytest.mark.parametrize("ring_bytes", [200_000, 50_000])  # a few clips (wraps, waits for room); under one clip
def test_pixels_through_a_small_shared_ring_arrive_intact(gradient_video, monkeypatch, ring_bytes):
    # A fresh decoder with a tiny ring: 21 clips of 75 KB wrap it many times, and the decoder must wait for the
    # caller to finish with each view before reusing its room; at 50 KB a clip does not fit and takes the pipe.
    monkeypatch.setattr(decode, "RING_BYTES", ring_bytes)
    monkeypatch.setattr(decode, "_IDLE_DECODERS", [])
    spec = SamplingSpec(strategy="uniform", frames_per_clip=8, max_pixels=56 * 84)
    clips = clips_every(0.5, 2.0, 21)
    expected = by_id(iter_session_clips(gradient_video, "video", clips, spec))
    held = list(decode_session_with_deadline(gradient_video, "video", clips, spec, 60))  # owned copies, kept
    assert [r.clip_id for r in held] == list(expected) and all(isinstance(r, ClipFrames) for r in held)
    for result in held:
        assert np.array_equal(result.frames, expected[result.clip_id].frames)
    for result in decode_session_views(gradient_video, "video", clips, spec, 60):  # views, used before the next
        assert np.array_equal(result.frames, expected[result.clip_id].frames)
        assert np.allclose(result.frame_times_s, expected[result.clip_id].frame_times_s)
    for decoder in decode._IDLE_DECODERS:
        decoder.kill()
