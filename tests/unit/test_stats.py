"""Cluster bootstrap intervals and the paired gate, on cases whose answers can be worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from opsvlm.stats import bootstrap_interval, group_indices, paired_bootstrap


def mean_of(values):
    values = np.asarray(values, dtype=np.float64)
    return lambda idx: float(values[idx].mean())


def test_group_indices_keeps_first_appearance_order() -> None:
    groups = group_indices(["s2", "s1", "s2", "s3"])
    assert [g.tolist() for g in groups] == [[0, 2], [1], [3]]


def test_one_group_has_no_spread() -> None:
    interval = bootstrap_interval(mean_of([0.0, 1.0, 1.0, 0.0]), ["s"] * 4, n_boot=200)
    assert interval.value == 0.5
    assert interval.as_list() == [0.5, 0.5]
    assert (interval.n, interval.groups) == (4, 1)


def test_two_groups_interval_spans_the_possible_replicates() -> None:
    # Groups a = (0, 0) and b = (1, 1). A replicate draws 2 groups: mean 0 (p 1/4), 0.5 (p 1/2) or 1 (p 1/4); the 95%
    # percentile interval therefore runs from 0 to 1, and the point estimate is 0.5.
    interval = bootstrap_interval(mean_of([0, 0, 1, 1]), ["a", "a", "b", "b"], n_boot=2000, seed=3)
    assert interval.value == 0.5
    assert interval.as_list() == [0.0, 1.0]


def test_resampling_whole_groups_is_wider_than_resampling_examples() -> None:
    # 10 sessions of 20 identical clips each: the effective sample size is 10, not 200.
    rng = np.random.default_rng(0)
    per_session = rng.random(10)
    values = np.repeat(per_session, 20)
    sessions = np.repeat(np.arange(10), 20)
    by_session = bootstrap_interval(mean_of(values), sessions.tolist(), n_boot=500)
    by_clip = bootstrap_interval(mean_of(values), list(range(200)), n_boot=500)
    assert by_session.high - by_session.low > 3 * (by_clip.high - by_clip.low)
    assert by_session.low < values.mean() < by_session.high


def test_interval_is_reproducible_for_a_seed() -> None:
    values, groups = np.arange(30) % 7 / 7, [i // 3 for i in range(30)]
    assert bootstrap_interval(mean_of(values), groups, seed=5) == bootstrap_interval(mean_of(values), groups, seed=5)


def test_non_additive_metric_is_recomputed_per_replicate() -> None:
    # max is not an average of per-example values: with groups (0) and (1) the replicates give 0, 1 or 1.
    interval = bootstrap_interval(lambda idx: float(np.max(np.asarray([0.0, 1.0])[idx])), ["a", "b"], n_boot=1000)
    assert interval.value == 1.0
    assert interval.low == 0.0 and interval.high == 1.0


def test_empty_evaluation_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        bootstrap_interval(mean_of([]), [])


def test_paired_gate_refuses_a_noisy_tie() -> None:
    # Same overall mean: the challenger loses 15 clips the champion got right and wins 15 others, spread at random
    # over the sessions. The difference is exactly 0 on all clips; resampled, it scatters around 0.
    rng = np.random.default_rng(1)
    sessions = np.repeat(np.arange(12), 10)
    champion = rng.integers(0, 2, size=120).astype(float)
    challenger = champion.copy()
    challenger[rng.choice(np.flatnonzero(champion == 1), size=15, replace=False)] = 0
    challenger[rng.choice(np.flatnonzero(champion == 0), size=15, replace=False)] = 1
    comparison = paired_bootstrap(mean_of(challenger), mean_of(champion), sessions.tolist(), n_boot=1000)
    assert comparison.difference == 0.0
    assert comparison.low < 0.0 < comparison.high
    assert not comparison.better()


def test_paired_gate_accepts_a_real_improvement() -> None:
    # The challenger gets right 5 more clips in every one of 10 sessions of 20 clips (+0.25 everywhere).
    sessions = np.repeat(np.arange(10), 20)
    champion = np.tile(np.r_[np.ones(10), np.zeros(10)], 10)
    challenger = np.tile(np.r_[np.ones(15), np.zeros(5)], 10)
    comparison = paired_bootstrap(mean_of(challenger), mean_of(champion), sessions.tolist(), n_boot=500)
    assert comparison.difference == pytest.approx(0.25)
    assert comparison.low == pytest.approx(0.25) and comparison.high == pytest.approx(0.25)
    assert comparison.better() and comparison.better(margin=0.2) and not comparison.better(margin=0.3)
    assert comparison.a.value == pytest.approx(0.75) and comparison.b.value == pytest.approx(0.5)


def test_pairing_detects_a_small_consistent_gain_that_separate_intervals_miss() -> None:
    # Sessions differ a lot in difficulty; the challenger is better by 2 clips of 20 in each. Separate intervals
    # overlap, the paired difference is clearly positive.
    rng = np.random.default_rng(2)
    sessions = np.repeat(np.arange(15), 20)
    champion = np.zeros(300)
    challenger = np.zeros(300)
    for s in range(15):
        k = int(rng.integers(2, 17))
        champion[s * 20 : s * 20 + k] = 1
        challenger[s * 20 : s * 20 + k + 2] = 1
    comparison = paired_bootstrap(mean_of(challenger), mean_of(champion), sessions.tolist(), n_boot=1000)
    assert comparison.a.low < comparison.b.high  # the separate intervals overlap
    assert comparison.better()
