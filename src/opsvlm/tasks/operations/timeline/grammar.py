"""The operation grammar learned from training timelines, and decoding a per-second score sequence with it. Pure numpy.

Choice: a first-order hidden Markov model over the 11 labels at 1 Hz, decoded with Viterbi.

* Transitions are counted on the training sessions' OpenPack 1 Hz label sequences (:func:`grid.truth_labels`), so
  they hold both how long each operation lasts (the self-transition; an expected duration of ``1 / (1 - p_stay)`` s)
  and which operation follows which (packing follows a procedure: ``Picking -> Relocate Item Label -> Assemble Box
  -> ...``). Add-``smoothing`` counts keep every transition possible (repeats and skips happen).
* Decoding uses the order part by default: ``P(j | i) = switch_rate * P(j | i, switch)`` for ``j != i`` and
  ``1 - switch_rate`` to stay, with one switch rate for all labels (the training sessions' changes per second). The
  per-label self-transitions (``durations=True``) make geometric durations that pull every boundary into the label
  with the longer mean duration (a 1 s shift per boundary on a clean model, measured in the unit tests); one switch
  rate keeps boundaries where the model puts them and still makes each switch, and each out-of-order switch most of
  all, cost something, which removes flickers.
* Emissions are the fused window probabilities of each second, ``emission_weight * log p_t(label)`` (hybrid HMM:
  the model's posteriors stand in for likelihoods).
* The start distribution is uniform: a recording may start anywhere in the procedure.

Viterbi then returns the single most probable label sequence; it removes one-second flickers that per-second argmax
keeps and it prefers procedure-conform orders when the model is unsure. A semi-Markov model (explicit durations)
would model durations better but costs O(T * D) per label; the plain HMM runs in O(T * L^2) = milliseconds for an
hour of video.

The anticipated next operation at a second is the label ``n`` (not the current one, not Null) maximising
``p_next_t(n) * P(n follows current)``: the model's own next-operation scores, reweighted by the learned successor
frequencies (segment level: Null gaps and repeats of the same label skipped).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opsvlm.tasks.operations.data.openpack import SessionTimeline
from opsvlm.tasks.operations.labels import PROCEDURE
from opsvlm.tasks.operations.timeline.grid import INDEX_OF_ID, LABELS, NULL_INDEX, SecondGrid, runs_of, truth_labels

GRAMMAR_FORMAT = "opsvlm-operation-grammar/1"
_EPS = 1e-6


@dataclass
class Grammar:
    """A first-order label grammar at 1 Hz.

    Attributes:
        transitions: float64[L, L] ``P(label at t+1 = j | label at t = i)``; rows sum to 1.
        successors: float64[L, L] ``P(next different non-Null operation = j | current label i)``; rows sum to 1,
            zero on the diagonal and in the Null column.
        majority: Index of the most frequent non-Null label of the training seconds (the majority baseline).
        switch_rate: Label changes per second in the training sessions.
        source: What it was learned from (for the record).
        sessions: Training sessions it was learned from (0 for the procedure prior).
        seconds: Training seconds it was learned from.
        labels: The label order of the matrices.
    """

    transitions: np.ndarray
    successors: np.ndarray
    majority: int
    switch_rate: float = 0.1
    source: str = ""
    sessions: int = 0
    seconds: int = 0
    labels: tuple[str, ...] = LABELS

    def __post_init__(self) -> None:
        self.transitions = np.asarray(self.transitions, dtype=np.float64)
        self.successors = np.asarray(self.successors, dtype=np.float64)
        n = len(self.labels)
        if self.transitions.shape != (n, n) or self.successors.shape != (n, n):
            raise ValueError(f"grammar matrices must be {n}x{n}, got {self.transitions.shape}, {self.successors.shape}")
        if not np.allclose(self.transitions.sum(axis=1), 1.0) or np.any(self.transitions < 0):
            raise ValueError("grammar transitions must be row-stochastic")
        if not 0.0 < self.switch_rate < 1.0:
            raise ValueError(f"grammar switch_rate must be in (0, 1), got {self.switch_rate}")

    def decoding_transitions(self, durations: bool = False) -> np.ndarray:
        """float64[L, L] transitions Viterbi uses: the learned ones (``durations=True``), or the learned order with
        one switch rate for every label (default; see the module docstring)."""
        if durations:
            return self.transitions
        switch = self.transitions.copy()
        np.fill_diagonal(switch, 0.0)
        switch = _normalize_rows(switch) * self.switch_rate
        np.fill_diagonal(switch, 1.0 - self.switch_rate)
        return switch

    @property
    def expected_duration_s(self) -> np.ndarray:
        """float64[L] expected seconds per visit of each label (``1 / (1 - p_stay)``)."""
        stay = np.clip(np.diag(self.transitions), 0.0, 1.0 - _EPS)
        return 1.0 / (1.0 - stay)

    def to_dict(self) -> dict:
        return {
            "format": GRAMMAR_FORMAT,
            "labels": list(self.labels),
            "transitions": self.transitions.round(8).tolist(),
            "successors": self.successors.round(8).tolist(),
            "majority": self.labels[self.majority],
            "switch_rate": self.switch_rate,
            "source": self.source,
            "sessions": self.sessions,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "grammar") -> Grammar:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: naming ``where`` and the field, for another format or label set.
        """
        if data.get("format") != GRAMMAR_FORMAT:
            raise ValueError(f"{where}: format is {data.get('format')!r}, expected {GRAMMAR_FORMAT!r}")
        if tuple(data.get("labels", ())) != LABELS:
            raise ValueError(f"{where}: field 'labels' {data.get('labels')} differs from the task's {list(LABELS)}")
        try:
            return cls(
                transitions=np.asarray(data["transitions"]),
                successors=np.asarray(data["successors"]),
                majority=LABELS.index(data["majority"]),
                switch_rate=float(data["switch_rate"]),
                source=str(data.get("source", "")),
                sessions=int(data.get("sessions", 0)),
                seconds=int(data.get("seconds", 0)),
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Grammar:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from None
        return cls.from_dict(data, str(path))


def _normalize_rows(counts: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.full_like(counts, 1.0 / counts.shape[1]), where=totals > 0)


def _successor_matrix(successor_counts: np.ndarray, op_counts: np.ndarray, smoothing: float) -> np.ndarray:
    n = len(LABELS)
    counts = successor_counts + smoothing
    np.fill_diagonal(counts, 0.0)
    counts[:, NULL_INDEX] = 0.0
    # after Null (or a label never seen) the next operation is as frequent as operations are in general
    counts[NULL_INDEX] = op_counts + smoothing
    counts[NULL_INDEX, NULL_INDEX] = 0.0
    out = _normalize_rows(counts)
    assert out.shape == (n, n)
    return out


def learn_grammar(timelines: Iterable[SessionTimeline], smoothing: float = 0.5, source: str = "") -> Grammar:
    """Count the 1 Hz transitions and the operation successions of training timelines.

    Args:
        timelines: Training sessions' annotations.
        smoothing: Added to every transition count (and successor count), so nothing is impossible.
        source: Recorded in the grammar.

    Raises:
        ValueError: if there are no annotated seconds.
    """
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    n = len(LABELS)
    trans = np.zeros((n, n))
    succ = np.zeros((n, n))
    op_seconds = np.zeros(n)
    sessions = seconds = 0
    for timeline in timelines:
        grid = SecondGrid.covering(timeline.origin, 0.0, timeline.duration_s)
        labels = truth_labels(timeline, grid)
        if labels.size == 0:
            continue
        sessions += 1
        seconds += labels.size
        np.add.at(trans, (labels[:-1], labels[1:]), 1.0)
        np.add.at(op_seconds, labels, 1.0)
        ops = [run.label for run in runs_of(labels) if run.label != NULL_INDEX]
        for current, following in itertools.pairwise(ops):
            if current != following:
                succ[current, following] += 1.0
    if seconds == 0:
        raise ValueError(f"no annotated seconds to learn a grammar from ({source or 'no timelines'})")
    op_seconds[NULL_INDEX] = 0.0
    steps = trans.sum()
    changes = steps - np.trace(trans)
    return Grammar(
        transitions=_normalize_rows(trans + smoothing),
        successors=_successor_matrix(succ, op_seconds, smoothing),
        majority=int(np.argmax(op_seconds)),
        switch_rate=float(np.clip((changes + smoothing) / (steps + 2 * smoothing), 1e-4, 0.5)),
        source=source,
        sessions=sessions,
        seconds=seconds,
    )


def procedure_grammar(mean_duration_s: float = 7.0, smoothing: float = 0.5) -> Grammar:
    """A prior for when no training timelines are at hand: OpenPack's standard procedure, equal durations.

    Each operation lasts ``mean_duration_s`` on average and is followed by its successor in
    ``opsvlm.tasks.operations.PROCEDURE`` (the last one by the first: the next box); ``smoothing`` pseudo-counts
    (relative to 100 visits per operation) leave every other transition possible.
    """
    n = len(LABELS)
    visits = 100.0
    stay = visits * (mean_duration_s - 1.0)
    trans = np.full((n, n), smoothing)
    succ = np.zeros((n, n))
    for i, op in enumerate(PROCEDURE):
        a, b = INDEX_OF_ID[op], INDEX_OF_ID[PROCEDURE[(i + 1) % len(PROCEDURE)]]
        trans[a, a] += stay
        trans[a, b] += visits
        succ[a, b] += visits
    trans[NULL_INDEX, NULL_INDEX] += stay
    op_counts = np.ones(n)
    op_counts[NULL_INDEX] = 0.0
    return Grammar(
        transitions=_normalize_rows(trans),
        successors=_successor_matrix(succ, op_counts, smoothing),
        majority=INDEX_OF_ID[PROCEDURE[0]],
        switch_rate=1.0 / mean_duration_s,
        source=f"procedure prior (mean duration {mean_duration_s:g} s)",
    )


def viterbi(log_emission: np.ndarray, log_transitions: np.ndarray, log_start: np.ndarray | None = None) -> np.ndarray:
    """The most probable state sequence of an HMM.

    Args:
        log_emission: float[T, L] log emission scores.
        log_transitions: float[L, L] log ``P(j at t+1 | i at t)``.
        log_start: float[L] log start probabilities (default uniform).

    Returns:
        int64[T] state indices (ties go to the lower index).
    """
    emission = np.asarray(log_emission, dtype=np.float64)
    steps, states = emission.shape
    if steps == 0:
        return np.zeros(0, dtype=np.int64)
    start = np.zeros(states) if log_start is None else np.asarray(log_start, dtype=np.float64)
    delta = start + emission[0]
    back = np.zeros((steps, states), dtype=np.int64)
    for t in range(1, steps):
        candidates = delta[:, None] + log_transitions  # [from, to]
        back[t] = candidates.argmax(axis=0)
        delta = candidates[back[t], np.arange(states)] + emission[t]
    path = np.empty(steps, dtype=np.int64)
    path[-1] = int(delta.argmax())
    for t in range(steps - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


def decode(scores: np.ndarray, grammar: Grammar, emission_weight: float = 1.0, durations: bool = False) -> np.ndarray:
    """Per-second labels from fused scores with the grammar (Viterbi).

    Args:
        scores: float[T, L] fused probabilities per second.
        grammar: The label grammar.
        emission_weight: Weight of the model's log-probabilities against the grammar's.
        durations: Use the learned per-label self-transitions (see :meth:`Grammar.decoding_transitions`).

    Returns:
        int64[T] label indices.
    """
    if emission_weight <= 0:
        raise ValueError(f"emission_weight must be > 0, got {emission_weight}")
    log_emission = emission_weight * np.log(np.asarray(scores, dtype=np.float64) + _EPS)
    return viterbi(log_emission, np.log(grammar.decoding_transitions(durations) + _EPS))


def argmax_decode(scores: np.ndarray) -> np.ndarray:
    """Per-second labels without a grammar: the most probable label of each second (int64[T])."""
    scores = np.asarray(scores)
    return scores.argmax(axis=1).astype(np.int64) if scores.size else np.zeros(0, dtype=np.int64)


def anticipate(labels: np.ndarray, next_scores: np.ndarray, grammar: Grammar | None) -> tuple[np.ndarray, np.ndarray]:
    """The anticipated next operation at every second.

    Args:
        labels: int[T] the decoded current label of each second.
        next_scores: float[T, L] fused next-operation probabilities.
        grammar: Reweights them by the learned successor frequencies; ``None`` uses the model's scores alone.

    Returns:
        ``(int64[T] next label indices, float64[T] their normalized scores)``; never the current label nor Null.
    """
    labels = np.asarray(labels, dtype=np.int64)
    weights = np.array(next_scores, dtype=np.float64, copy=True) + _EPS
    if grammar is not None:
        weights *= grammar.successors[labels] + _EPS
    weights[np.arange(len(labels)), labels] = 0.0
    weights[:, NULL_INDEX] = 0.0
    totals = weights.sum(axis=1)
    best = weights.argmax(axis=1).astype(np.int64)
    confidence = np.divide(weights[np.arange(len(labels)), best], totals, out=np.zeros(len(labels)), where=totals > 0)
    return best, confidence


__all__ = [
    "GRAMMAR_FORMAT",
    "Grammar",
    "anticipate",
    "argmax_decode",
    "decode",
    "learn_grammar",
    "procedure_grammar",
    "viterbi",
]
