"""Uncertainty of evaluation figures: cluster bootstrap intervals and the paired bootstrap promotion gate. Pure numpy.

Evaluation examples are not independent: 5 s clips taken every 2.5 s overlap, consecutive clips mostly show the same
operation, and the objects of one image share its lighting and clutter. Resampling single examples would make every
interval far too narrow. Both functions here resample *groups* instead (a session, a contiguous block of clips, an
image): a bootstrap replicate draws as many groups as there are, with replacement, and keeps every example of each
drawn group. With ``G`` groups the interval is only as trustworthy as ``G`` is large; callers report ``G`` next to it.

A metric is any function of a set of example positions (``metric(indices) -> float``), so non-additive metrics such as
macro-F1 are resampled correctly (recomputed on each replicate, not averaged per example).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Interval",
    "PairedComparison",
    "bootstrap_interval",
    "bootstrap_intervals",
    "group_indices",
    "paired_bootstrap",
]

Metric = Callable[[np.ndarray], float]
"""A metric of a multiset of example positions: ``int64[m] -> float`` (positions may repeat)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval.

    Attributes:
        value: The metric on all examples.
        low: Lower bound of the ``level`` interval.
        high: Upper bound.
        n: Number of examples.
        groups: Number of resampled groups (sessions, blocks, images).
        level: Coverage, e.g. 0.95.
    """

    value: float
    low: float
    high: float
    n: int
    groups: int
    level: float = 0.95

    def as_list(self) -> list[float]:
        """``[low, high]`` (what summaries print as ``*_ci95``)."""
        return [self.low, self.high]


@dataclass(frozen=True)
class PairedComparison:
    """Challenger minus champion on the same examples, resampled together.

    Attributes:
        difference: ``metric_a - metric_b`` on all examples.
        low: Lower bound of the ``level`` interval of the difference.
        high: Upper bound.
        a: Interval of the challenger alone (same replicates).
        b: Interval of the champion alone (same replicates).
        n: Examples both were scored on.
        groups: Resampled groups.
        level: Coverage.
    """

    difference: float
    low: float
    high: float
    a: Interval
    b: Interval
    n: int
    groups: int
    level: float = 0.95

    def better(self, margin: float = 0.0) -> bool:
        """Whether the lower bound of the difference is above ``margin`` (a real improvement, not noise)."""
        return bool(np.isfinite(self.low) and self.low > margin)


def group_indices(groups: Sequence[Hashable]) -> list[np.ndarray]:
    """Positions of the examples of each group, groups in order of first appearance.

    Args:
        groups: [n] group key of each example.

    Returns:
        One ``int64[m_g]`` array per distinct key.
    """
    members: dict[Hashable, list[int]] = {}
    for position, key in enumerate(groups):
        members.setdefault(key, []).append(position)
    return [np.asarray(v, dtype=np.int64) for v in members.values()]


def _replicates(groups: Sequence[Hashable], n_boot: int, seed: int) -> list[np.ndarray]:
    """``n_boot`` resampled example-position arrays (whole groups drawn with replacement)."""
    if len(groups) == 0:
        raise ValueError("cannot bootstrap an empty evaluation")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    members = group_indices(groups)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(members), size=(n_boot, len(members)))
    return [np.concatenate([members[g] for g in row]) for row in draws]


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_interval(
    metric: Metric, groups: Sequence[Hashable], *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Percentile interval of ``metric`` by resampling whole groups.

    Args:
        metric: ``positions -> value``.
        groups: [n] group key of each example.
        n_boot: Bootstrap replicates.
        level: Coverage of the interval.
        seed: Seed of the resampling (fixed: the same data give the same interval).

    Returns:
        The metric on all examples with its interval.
    """
    return bootstrap_intervals(lambda idx: {"m": metric(idx)}, groups, ["m"], n_boot=n_boot, level=level, seed=seed)[
        "m"
    ]


def bootstrap_intervals(
    metrics: Callable[[np.ndarray], Mapping[str, float]],
    groups: Sequence[Hashable],
    keys: Sequence[str],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """:func:`bootstrap_interval` for several metrics computed together (one call of ``metrics`` per replicate).

    Args:
        metrics: ``positions -> {name: value}`` (e.g. a task's ``compute_metrics`` on the selected examples).
        groups: [n] group key of each example.
        keys: The metrics to give intervals (a key missing from a replicate counts as NaN and is left out).
        n_boot: Bootstrap replicates.
        level: Coverage of the intervals.
        seed: Resampling seed.

    Returns:
        ``{key: Interval}``.
    """
    everything = metrics(np.arange(len(groups), dtype=np.int64))
    replicates = [metrics(idx) for idx in _replicates(groups, n_boot, seed)]
    n, g = len(groups), len(group_indices(groups))
    out = {}
    for key in keys:
        values = np.array([r.get(key, np.nan) for r in replicates], dtype=np.float64)
        out[key] = Interval(float(everything.get(key, np.nan)), *_percentiles(values, level), n, g, level)
    return out


def paired_bootstrap(
    metric_a: Metric,
    metric_b: Metric,
    groups: Sequence[Hashable],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Interval of ``metric_a - metric_b`` where both are computed on the same resampled examples.

    Pairing removes the variance the two systems share (hard clips are hard for both), so a real improvement shows
    with fewer examples than two independent intervals would need, and a noisy tie does not.

    Args:
        metric_a: The challenger's metric of example positions.
        metric_b: The champion's metric of the same positions.
        groups: [n] group key of each example.
        n_boot: Bootstrap replicates.
        level: Coverage.
        seed: Resampling seed.
    """
    everything = np.arange(len(groups), dtype=np.int64)
    replicates = _replicates(groups, n_boot, seed)
    a = np.array([metric_a(idx) for idx in replicates], dtype=np.float64)
    b = np.array([metric_b(idx) for idx in replicates], dtype=np.float64)
    n, g = len(groups), len(group_indices(groups))
    value_a, value_b = float(metric_a(everything)), float(metric_b(everything))
    low, high = _percentiles(a - b, level)
    return PairedComparison(
        difference=value_a - value_b,
        low=low,
        high=high,
        a=Interval(value_a, *_percentiles(a, level), n, g, level),
        b=Interval(value_b, *_percentiles(b, level), n, g, level),
        n=n,
        groups=g,
        level=level,
    )
