"""Window predictions -> one score vector per second. Pure numpy.

Windows slide over a recording with a stride shorter than their length, so every second is covered by several
windows. Each window gives a probability per label for its dominant operation (and for the next operation). The
score of a second is the average of the covering windows' vectors, each weighted by how much of the second it covers
(a window covering half a second counts half). Seconds no window touches get a uniform vector and coverage 0 (they
are reported, never hidden).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class WindowScores:
    """The model's answers for the windows of one recording.

    Attributes:
        start_s: float64[W] window starts, session seconds.
        end_s: float64[W] window ends.
        scores: float64[W, L] probability per label of the window's dominant operation.
        next_scores: float64[W, L] probability per label of the operation that follows it.
    """

    start_s: np.ndarray
    end_s: np.ndarray
    scores: np.ndarray
    next_scores: np.ndarray

    def __post_init__(self) -> None:
        self.start_s = np.asarray(self.start_s, dtype=np.float64).reshape(-1)
        self.end_s = np.asarray(self.end_s, dtype=np.float64).reshape(-1)
        n = len(self.start_s)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.next_scores = np.asarray(self.next_scores, dtype=np.float64)
        if self.scores.ndim != 2 or self.scores.shape[0] != n:
            raise ValueError(f"scores must be [windows={n}, labels], got shape {self.scores.shape}")
        if len(self.end_s) != n or self.scores.shape != self.next_scores.shape:
            raise ValueError(
                f"window arrays disagree: {n} starts, {len(self.end_s)} ends, scores {self.scores.shape}, "
                f"next_scores {self.next_scores.shape}"
            )
        if n and not np.all(self.end_s > self.start_s):
            raise ValueError("every window needs end_s > start_s")

    def __len__(self) -> int:
        return len(self.start_s)


def coverage_weights(start_s: np.ndarray, end_s: np.ndarray, cell_starts_s: np.ndarray) -> np.ndarray:
    """Seconds of overlap between each window and each 1 s cell.

    Args:
        start_s: float[W] window starts.
        end_s: float[W] window ends.
        cell_starts_s: float[T] cell starts (cell t is ``[s_t, s_t + 1)``).

    Returns:
        float64[W, T] overlaps in [0, 1].
    """
    lo = np.maximum(np.asarray(start_s)[:, None], np.asarray(cell_starts_s)[None, :])
    hi = np.minimum(np.asarray(end_s)[:, None], np.asarray(cell_starts_s)[None, :] + 1.0)
    return np.clip(hi - lo, 0.0, 1.0)


def fuse(windows: WindowScores, cell_starts_s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average the windows' label probabilities over the seconds they cover.

    Args:
        windows: The recording's window answers (L labels).
        cell_starts_s: float[T] cell starts, session seconds, evenly 1 s apart.

    Returns:
        ``(scores float64[T, L], next_scores float64[T, L], coverage float64[T])``: rows sum to 1; coverage is the
        summed overlap in seconds (0 where no window covers the cell: those rows are uniform).
    """
    if len(windows) == 0:
        raise ValueError("no window predictions to fuse")
    cells = np.asarray(cell_starts_s, dtype=np.float64)
    count, labels = len(cells), windows.scores.shape[1]
    summed = np.zeros((count, labels))
    summed_next = np.zeros((count, labels))
    coverage = np.zeros(count)
    first = cells[0] if count else 0.0
    for w in range(len(windows)):  # a window touches a few cells: O(W * window length), not O(W * T)
        lo = max(0, int(np.floor(windows.start_s[w] - first)))
        hi = min(count, int(np.ceil(windows.end_s[w] - first)) + 1)
        if hi <= lo:
            continue
        weight = coverage_weights(windows.start_s[w : w + 1], windows.end_s[w : w + 1], cells[lo:hi])[0]
        summed[lo:hi] += weight[:, None] * windows.scores[w]
        summed_next[lo:hi] += weight[:, None] * windows.next_scores[w]
        coverage[lo:hi] += weight
    out = []
    covered = coverage > 0
    for total in (summed, summed_next):
        fused = np.full((count, labels), 1.0 / labels)
        fused[covered] = total[covered] / coverage[covered, None]
        sums = fused.sum(axis=1, keepdims=True)
        out.append(np.divide(fused, sums, out=np.full_like(fused, 1.0 / labels), where=sums > 0))
    return out[0], out[1], coverage


__all__ = [
    "WindowScores",
    "coverage_weights",
    "fuse",
]
