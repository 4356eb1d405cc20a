import numpy as np
import pytest

from opsvlm.video.sampling import (
    SamplingSpec,
    frame_motion,
    motion_indices,
    sample_clip,
    sample_indices,
    to_gray,
    uniform_indices,
)


def test_uniform_keeps_first_last_budget_and_order():
    idx = uniform_indices(75, 8)
    assert len(idx) == 8 and idx[0] == 0 and idx[-1] == 74 and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, uniform_indices(75, 8))
    # fewer frames than the budget: frames repeat, the model still gets K frames
    assert uniform_indices(3, 8).tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        uniform_indices(0, 8)


def test_motion_keeps_first_last_and_the_highest_motion_frames_in_time_order():
    motion = np.zeros(20, dtype=np.float32)
    motion[[15, 3, 9]] = [5.0, 4.0, 3.0]
    motion[12] = 1.0
    assert motion_indices(motion, 5).tolist() == [0, 3, 9, 15, 19]
    assert motion_indices(motion, 6).tolist() == [0, 3, 9, 12, 15, 19]


def test_motion_is_deterministic_with_ties_to_the_earlier_frame():
    motion = np.ones(10, dtype=np.float32)
    assert motion_indices(motion, 4).tolist() == [0, 1, 2, 9]
    rng = np.random.default_rng(0)
    motion = rng.random(100).astype(np.float32)
    a, b = motion_indices(motion, 8), motion_indices(motion.copy(), 8)
    assert np.array_equal(a, b) and len(np.unique(a)) == 8 and np.all(np.diff(a) > 0)


def test_motion_scores_come_from_grayscale_frame_differences():
    frames = np.zeros((6, 8, 8, 3), dtype=np.uint8)
    frames[3] = 255  # a flash at frame 3: big change into it and out of it
    motion = frame_motion(to_gray(frames))
    assert motion[0] == 0 and motion[3] == pytest.approx(255) and motion[4] == pytest.approx(255)
    assert motion[1] == motion[2] == motion[5] == 0
    assert to_gray(np.zeros((2, 9, 9, 3), np.uint8), stride=4).shape == (2, 3, 3)


def test_sample_clip_returns_indices_and_timestamps():
    times = np.arange(75) / 15.0
    spec = SamplingSpec(strategy="uniform", frames_per_clip=8)
    idx, ts = sample_clip(spec, times)
    assert np.allclose(ts, times[idx])
    with pytest.raises(ValueError, match="motion scores"):
        sample_indices(SamplingSpec(strategy="motion"), 75)


def test_spec_round_trips_and_validates():
    spec = SamplingSpec(strategy="motion", frames_per_clip=16, max_pixels=448 * 448)
    assert SamplingSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="strategy"):
        SamplingSpec(strategy="random")
    with pytest.raises(ValueError, match="frames_per_clip"):
        SamplingSpec(frames_per_clip=1)
    with pytest.raises(ValueError, match="unknown field"):
        SamplingSpec.from_json('{"fps": 2}')


@pytest.mark.parametrize(
    ("source", "expected"),
    [((224, 224), (224, 224)), ((720, 1280), (168, 280)), ((64, 64), (56, 56)), ((20, 30), (56, 84))],
)
def test_target_size_keeps_aspect_within_pixel_limits_and_multiples_of_28(source, expected):
    spec = SamplingSpec()
    h, w = spec.target_size(*source)
    assert (h, w) == expected
    assert h % 28 == 0 and w % 28 == 0 and spec.min_pixels <= h * w <= spec.max_pixels
