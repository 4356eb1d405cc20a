"""The model side of serving, task-agnostic: work items in, typed outcomes out, and a health record that is true.

A request becomes one :class:`WorkItem` per clip (``/predict``, ``/batch_predict``) or per image (all its objects,
``/predict_objects``): the task inputs, the kind of media they came from and the sampling spec they were decoded
with. :func:`predict_items` predicts a list of items with one model version in one forward pass and answers each
with one outcome:

* :class:`Answers`: one answer dict per input, and the model version;
* :class:`SpecChanged`: the model's spec differs from the one the item was decoded with (an alias swap): decode
  again with the spec given;
* :class:`WrongTask`: the served model's task takes another kind of media (checked through ``task.media``);
* :class:`~opsvlm.serving.errors.ServingError`: the prediction failed (500, logged).

Outcomes are small picklable dataclasses: they cross Ray process boundaries. :class:`PredictionHealth` records
whether predictions succeed: after ``unhealthy_after`` consecutive failures ``/health`` answers 503.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from opsvlm.serving.errors import ServingError
from opsvlm.video.sampling import SamplingSpec

__all__ = [
    "Answers",
    "Outcome",
    "PredictionHealth",
    "SpecChanged",
    "WorkItem",
    "WrongTask",
    "predict_items",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    """Task inputs of one request part, to be predicted together by one model version.

    Attributes:
        media: The kind of media they came from (``"video"``, ``"image"``): must be the served task's ``media``.
        inputs: Task inputs (e.g. a clip's frames, or one rendered input per detected object).
        spec: The sampling spec they were decoded / rendered with.
    """

    media: str
    inputs: tuple[Any, ...]
    spec: SamplingSpec


@dataclass(frozen=True)
class Answers:
    """One answer (the task answer's ``to_dict()``) per input, by ``model_version``."""

    answers: tuple[dict[str, Any], ...]
    model_version: str


@dataclass(frozen=True)
class SpecChanged:
    """The model's sampling spec is not the one the item was decoded with: decode again with ``spec``."""

    spec: SamplingSpec


@dataclass(frozen=True)
class WrongTask:
    """The served model takes ``media`` inputs, not the item's."""

    media: str


Outcome = Answers | SpecChanged | WrongTask | ServingError


class PredictionHealth:
    """Whether this model's predictions succeed: unhealthy after ``unhealthy_after`` consecutive failures.

    Only server-side failures count (the forward pass raised, or an answer did not parse); client errors never reach
    the model. One success makes it healthy again. Thread-safe.

    Args:
        unhealthy_after: K, the number of consecutive failed predictions that make the replica unhealthy.
    """

    def __init__(self, unhealthy_after: int = 5):
        if unhealthy_after < 1:
            raise ValueError(f"unhealthy_after must be >= 1, got {unhealthy_after}")
        self.unhealthy_after = unhealthy_after
        self._lock = threading.Lock()
        self.consecutive_failures = 0
        self.predictions = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_failure_at: float | None = None

    def record(self, ok: bool, error: str | None = None) -> None:
        with self._lock:
            self.predictions += 1
            if ok:
                self.consecutive_failures = 0
            else:
                self.failures += 1
                self.consecutive_failures += 1
                self.last_error, self.last_failure_at = error, time.time()

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures < self.unhealthy_after

    def describe(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "consecutive_failures": self.consecutive_failures,
            "unhealthy_after": self.unhealthy_after,
            "predictions": self.predictions,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_failure_at": self.last_failure_at,
        }


def _writable(example: Any) -> Any:
    """The input with read-only arrays copied (they arrive as views of Ray's object store; torch warns on those)."""
    if not dataclasses.is_dataclass(example):
        return example
    changes = {}
    for field in dataclasses.fields(example):
        value = getattr(example, field.name)
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            changes[field.name] = value.copy()
    return dataclasses.replace(example, **changes) if changes else example


def predict_items(model: Any, items: Sequence[WorkItem], health: PredictionHealth | None = None) -> list[Outcome]:
    """Predict work items with one model version, in one forward pass. Blocking (runs the model).

    Args:
        model: A :class:`opsvlm.serving.watcher.LoadedModel` (its ``predictor.task`` decides what it takes).
        items: The work items.
        health: Where success or failure of the forward pass is recorded.

    Returns:
        One outcome per item, in order.
    """
    task = model.predictor.task
    outcomes: list[Outcome | None] = [None] * len(items)
    run = []
    for index, item in enumerate(items):
        if item.media != task.media:
            outcomes[index] = WrongTask(task.media)
        elif item.spec != model.spec:
            outcomes[index] = SpecChanged(model.spec)
        else:
            run.append(index)
    if not run:
        return outcomes
    inputs = [_writable(example) for i in run for example in items[i].inputs]
    try:
        answers = model.predictor.predict(inputs)
    except Exception as exc:  # one bad batch must not kill the replica; the clients get a 500 naming it
        logger.exception("prediction failed")
        if health is not None:
            health.record(False, repr(exc))
        error = ServingError(500, "prediction_failed", f"prediction failed: {exc!r}")
        return [error if outcome is None else outcome for outcome in outcomes]
    unparsed = 0
    offset = 0
    for index in run:
        count = len(items[index].inputs)
        mine = answers[offset : offset + count]
        offset += count
        if any(answer is None for answer in mine):  # only in unconstrained mode
            unparsed += 1
            outcomes[index] = ServingError(500, "prediction_failed", "the model's answer did not parse")
        else:
            outcomes[index] = Answers(tuple(answer.to_dict() for answer in mine), model.version)
    if health is not None:
        health.record(unparsed == 0, f"{unparsed} answers did not parse" if unparsed else None)
    return outcomes
