"""Operation timelines of whole recordings: the operations task's pure part of annotation. Pure numpy, no Ray/MLflow.

A recording is cut into overlapping windows, the model answers each one (dominant operation, its segment, the next
operation, with a probability per label), and this package turns those answers into the recording's timeline:

* :mod:`.grid`: OpenPack's 1 Hz cells and per-second truth;
* :mod:`.fusion`: window probabilities averaged over the seconds each window covers;
* :mod:`.grammar`: the operation grammar learned from training timelines (first-order HMM at 1 Hz), Viterbi
  decoding, the anticipated next operation;
* :mod:`.boxes`: boxes, time per operation, cycle time, out-of-procedure transitions;
* :mod:`.metrics`: OpenPack frame macro-F1, edit score, F1@k, next-operation accuracy at boundaries, bootstrap
  intervals by session;
* :mod:`.session`: all of the above for one recording (:func:`annotate_windows`);
* :mod:`.outputs` / :mod:`.plot`: the CSV/JSON files and the Gantt picture.

:func:`timeline_for` is how task-agnostic machinery (``opsvlm.annotate``, ``opsvlm.timeline``) gets what it needs
from a task without naming one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from opsvlm.tasks.operations.timeline.fusion import WindowScores
from opsvlm.tasks.operations.timeline.grammar import Grammar, learn_grammar, procedure_grammar
from opsvlm.tasks.operations.timeline.grid import LABELS, SecondGrid
from opsvlm.tasks.operations.timeline.session import SessionAnnotation, annotate_windows, recording_grid


class OperationsTimeline:
    """The operations task's side of whole-recording annotation.

    Attributes:
        task: The task whose answers it reads.
        labels: Label order of every score vector.
    """

    task = "operations"
    labels: tuple[str, ...] = LABELS

    def answer_vectors(self, answer: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(float64[L] operation probabilities, float64[L] next-operation probabilities)`` of one window answer
        (an ``opsvlm.tasks.operations.Prediction`` or its ``to_dict()``)."""
        scores: Mapping[str, float] = answer["scores"] if isinstance(answer, Mapping) else answer.scores
        following: Mapping[str, float] = answer["next_scores"] if isinstance(answer, Mapping) else answer.next_scores
        return (
            np.array([float(scores.get(label, 0.0)) for label in self.labels]),
            np.array([float(following.get(label, 0.0)) for label in self.labels]),
        )


_TIMELINES = {OperationsTimeline.task: OperationsTimeline}


def timeline_for(task: str) -> OperationsTimeline:
    """The timeline support of a task.

    Raises:
        ValueError: naming the task, when its answers do not make a timeline (e.g. image inspection).
    """
    if task not in _TIMELINES:
        raise ValueError(f"task {task!r} has no recording timeline; tasks with one: {sorted(_TIMELINES)}")
    return _TIMELINES[task]()


__all__ = [
    "Grammar",
    "OperationsTimeline",
    "SecondGrid",
    "SessionAnnotation",
    "WindowScores",
    "annotate_windows",
    "learn_grammar",
    "procedure_grammar",
    "recording_grid",
    "timeline_for",
]
