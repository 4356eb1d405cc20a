"""The ``operations`` task: what happens in a clip of packing work. Label space, prompt, answer, metrics.

OpenPack annotates packing work with 10 operations plus ``8100 Null`` (time with no operation; OpenPack's own
scoring ignores it). Everything else in opsvlm refers to operations through this module. For a clip the model says
the dominant operation, its segment inside the clip and the next operation, as one JSON object::

    {"operation": "<label>", "start_s": <a>, "end_s": <b>, "next_operation": "<label>"}

with labels from the label set, times on a 0.1 s grid and ``0 <= a < b <= clip length``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from opsvlm.tasks.base import Task, register_task
from opsvlm.tasks.operations import baselines
from opsvlm.tasks.operations.labels import (
    BY_NAME,
    LABEL_NAMES,
    NULL,
)
from opsvlm.tasks.operations.metrics import ClipPrediction, ClipTruth, compute_metrics, confusion_matrices
from opsvlm.tasks.operations.plots import confusion_png, per_class_png
from opsvlm.video.clip import ClipInput

__all__ = [
    "ANSWER_KEYS",
    "ANSWER_PARTS",
    "BOOTSTRAP_BLOCK_S",
    "TIME_STEP",
    "ClipInput",
    "OperationsTask",
    "Prediction",
    "instruction",
    "parse_answer",
    "sampled_fps",
    "target_text",
    "time_choices",
    "video_metadata",
]

BOOTSTRAP_BLOCK_S = 30.0
"""Length of the contiguous blocks of clips that bootstrap intervals resample (see ``OperationsTask.group_of``)."""


# --- prompt, target and parsing for the clip task -----------------------------------------------------------------

ANSWER_KEYS = ("operation", "start_s", "end_s", "next_operation")
# The answer's fixed pieces, between its slots. Each falls on a pre-tokenizer boundary of Qwen's tokenizer, so
# slot-by-slot tokenization equals the tokenization of the whole answer (a unit test checks it).
ANSWER_PARTS = ('{"operation": "', '", "start_s": ', ', "end_s": ', ', "next_operation": "', '"}')
TIME_STEP = 0.1  # the answer's time resolution (targets are written with one decimal)


@dataclass
class Prediction:
    """A validated answer: labels from the label set, 0 <= start_s < end_s <= clip length.

    Attributes:
        operation: Dominant operation.
        start_s: Its start inside the clip.
        end_s: Its end inside the clip.
        next_operation: The operation that follows.
        confidence: Probability of ``operation`` under the constrained distribution.
        scores: Probability per label for ``operation`` (labels pruned before their first token get 0).
        next_scores: The same for ``next_operation``.
        text: The generated text.
    """

    operation: str
    start_s: float
    end_s: float
    next_operation: str
    confidence: float = 1.0
    scores: dict[str, float] = field(default_factory=dict)
    next_scores: dict[str, float] = field(default_factory=dict)
    text: str = ""

    def to_dict(self) -> dict:
        return {
            "operation": self.operation,
            "start_s": self.start_s,
            "end_s": self.end_s,
            "next_operation": self.next_operation,
            "confidence": self.confidence,
            "scores": self.scores,
            "next_scores": self.next_scores,
        }


def instruction(clip_length_s: float, frame_times_s: list[float] | tuple[float, ...]) -> str:
    """The user instruction for one clip. Frame times are stated because sampled frames need not be evenly spaced.

    Args:
        clip_length_s: Clip length in seconds.
        frame_times_s: Clip-relative time of each frame given to the model.
    """
    times = ", ".join(f"{t:.1f}" for t in frame_times_s)
    labels = ", ".join(LABEL_NAMES)
    return (
        f"This is a {clip_length_s:.1f} s clip of warehouse packing work; the frames are at {times} s. "
        f"Operations: {labels}. Reply with JSON: the dominant operation, its start_s and end_s inside the clip, "
        "and the next operation."
    )


def target_text(operation: str, start_s: float, end_s: float, next_operation: str) -> str:
    """The compact JSON answer the model is trained to produce (one decimal: frames are ~0.07 s apart)."""
    return (
        f'{{"operation": "{operation}", "start_s": {start_s:.1f}, "end_s": {end_s:.1f}, '
        f'"next_operation": "{next_operation}"}}'
    )


def parse_answer(text: str, clip_length_s: float) -> Prediction | None:
    """Parse and validate a generated answer; ``None`` when it is not a valid answer (counted as a parse failure).

    The first ``{...}`` object in the text is read. Times are clipped to the clip; labels must be in the label set.
    """
    import json

    start, end = text.find("{"), text.find("}")
    if start < 0 or end < start:
        return None
    try:
        data = json.loads(text[start : end + 1])
        operation, next_operation = data["operation"], data["next_operation"]
        start_s = min(max(float(data["start_s"]), 0.0), clip_length_s)
        end_s = min(max(float(data["end_s"]), 0.0), clip_length_s)
    except (ValueError, KeyError, TypeError):
        return None
    if operation not in BY_NAME or next_operation not in BY_NAME or not start_s < end_s:
        return None
    return Prediction(operation, start_s, end_s, next_operation, text=text)


def time_choices(clip_length_s: float) -> list[str]:
    """Every answer time on the 0.1 s grid within the clip, as text (``"0.0"`` ... ``"5.0"``)."""
    steps = int(np.floor(clip_length_s / TIME_STEP + 1e-6))
    return [f"{k * TIME_STEP:.1f}" for k in range(steps + 1)]


def sampled_fps(frame_times_s: Sequence[float]) -> float:
    """Average frame rate of sampled frames: what Qwen2.5-VL's temporal position ids assume between frames.

    Motion-sampled frames are not evenly spaced; their mean spacing is the closest single rate (the prompt also
    lists the exact times).
    """
    span = float(frame_times_s[-1]) - float(frame_times_s[0])
    return (len(frame_times_s) - 1) / span if span > 0 else 1.0


def video_metadata(frame_times_s: Sequence[float]) -> dict:
    """What the processor needs to know about already-sampled frames: their rate, count and that it keeps them all."""
    count = len(frame_times_s)
    return {"fps": sampled_fps(frame_times_s), "total_num_frames": count, "frames_indices": list(range(count))}


@register_task
class OperationsTask(Task):
    """Dominant operation, its segment and the next operation of a clip of packing video.

    Inputs are :class:`ClipInput`; prepared rows follow ``opsvlm.data.pipeline.CLIP_SCHEMA``; answers are
    :class:`Prediction`. Slots: 0 ``{"operation": "``, 1 label, 2 ``", "start_s": ``, 3 start, 4 ``, "end_s": ``,
    5 end, 6 ``, "next_operation": "``, 7 label, 8 ``"}``.
    """

    name = "operations"
    media = "video"
    labels = LABEL_NAMES
    label_slots: ClassVar[dict[int, str]] = {1: "operation", 7: "next_operation"}
    headline_metric = "weighted_score"
    table_metrics = (
        "weighted_score",
        "oca",
        "tiou_at_0_5",
        "boundary_tiou_at_0_5",
        "mean_tiou",
        "aa_at_1",
        "macro_f1",
        "parse_failure_rate",
    )
    id_field = "clip_id"
    rows_dir = "clips"
    unit = "clips"

    def instruction(self, example: ClipInput) -> str:
        return instruction(example.clip_length_s, example.frame_times_s)

    def input_of(self, row: Mapping[str, Any]) -> ClipInput:
        # a writable copy: the processor turns it into a tensor, and torch warns on read-only buffers
        frames = np.frombuffer(row["frames"], dtype=np.uint8).reshape(tuple(row["frame_shape"])).copy()
        return ClipInput(frames, list(row["frame_times_s"]), row["end_s"] - row["start_s"])

    def target_of(self, row: Mapping[str, Any]) -> str:
        start, end = row["temporal_segment"]
        return target_text(row["dominant_operation"], start, end, row["next_operation"])

    def class_of(self, row: Mapping[str, Any]) -> str:
        return row["dominant_operation"]

    def processor_kwargs(self, examples: Sequence[ClipInput]) -> dict[str, Any]:
        return {
            "videos": [np.asarray(e.frames) for e in examples],
            "video_metadata": [video_metadata(e.frame_times_s) for e in examples],
            "do_sample_frames": False,  # frames are already sampled by the model's SamplingSpec
        }

    def answer_slot(self, index: int, chosen: Sequence[str], example: ClipInput) -> Sequence[str] | None:
        if index in (1, 7):
            return self.labels
        if index == 3:  # start: leave room for an end after it
            return time_choices(example.clip_length_s)[:-1]
        if index == 5:  # end: strictly after the chosen start
            start = float(chosen[3])
            return [t for t in time_choices(example.clip_length_s) if float(t) > start + 1e-9]
        parts = {0: 0, 2: 1, 4: 2, 6: 3, 8: 4}
        return [ANSWER_PARTS[parts[index]]] if index in parts else None

    def answer_from_slots(
        self, chosen: Sequence[str], label_scores: Mapping[int, Mapping[str, float]], text: str
    ) -> Prediction:
        operation = chosen[1]
        return Prediction(
            operation=operation,
            start_s=float(chosen[3]),
            end_s=float(chosen[5]),
            next_operation=chosen[7],
            confidence=label_scores[1][operation],
            scores=dict(label_scores[1]),
            next_scores=dict(label_scores[7]),
            text=text,
        )

    def parse_answer(self, text: str, example: ClipInput) -> Prediction | None:
        return parse_answer(text, example.clip_length_s)

    def compute_metrics(self, rows: Sequence[Mapping[str, Any]], answers: Sequence[Any | None]) -> dict[str, float]:
        """OCA, tIoU@0.5, AA@1, the weighted score and the rest (:func:`.metrics.compute_metrics`).

        Args:
            rows: Prepared clip rows (their labels; frames are not needed).
            answers: :class:`Prediction`, mappings with ``operation/start_s/end_s/next_operation``, or None.
        """
        truths = [
            ClipTruth(r["dominant_operation"], *r["temporal_segment"], r["next_operation"], r["end_s"] - r["start_s"])
            for r in rows
        ]
        predictions = []
        for a in answers:
            if a is not None and not isinstance(a, Mapping):
                a = a.to_dict()
            predictions.append(
                None if a is None else ClipPrediction(a["operation"], a["start_s"], a["end_s"], a["next_operation"])
            )
        return compute_metrics(truths, predictions)

    def group_of(self, row: Mapping[str, Any]) -> str:
        # Overlapping clips of one stretch of work are not independent; whole sessions would be the purest unit, but
        # an evaluation split has only a few. Contiguous blocks of BOOTSTRAP_BLOCK_S seconds of one session keep the
        # clips that share frames or an operation together.
        return f"{row['subject']}/{row['session']}/{int(row['start_s'] // BOOTSTRAP_BLOCK_S)}"

    def baselines(
        self,
        rows: Sequence[Mapping[str, Any]],
        answers: Sequence[Mapping[str, Any] | None],
        train_rows: Sequence[Mapping[str, Any]],
        manifest: Mapping[str, Any],
    ) -> dict[str, list[Mapping[str, Any] | None]]:
        from opsvlm.tasks.operations.data.openpack import discover_sessions, read_operations_csv

        b = baselines

        subjects = set(manifest["splits"]["train"]["subjects"])
        timelines = [
            read_operations_csv(s.annotation) for s in discover_sessions(manifest["source"]) if s.subject in subjects
        ]
        successor = b.most_frequent_successor(b.successor_counts(timelines), NULL.name)
        systems: dict[str, list[Mapping[str, Any] | None]] = {}
        if train_rows:
            systems["majority"] = b.majority_predictions(train_rows, rows)
        systems["fine-tuned+whole-clip"] = b.whole_clip_segment(rows, answers)
        systems["fine-tuned+grammar"] = b.grammar_predictions(rows, answers, successor)
        systems["reference:truth-op+grammar"] = b.grammar_predictions(rows, answers, successor, oracle=True)
        return systems

    def write_plots(
        self, rows: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any] | None], directory: Path
    ) -> None:
        truths = [
            ClipTruth(r["dominant_operation"], *r["temporal_segment"], r["next_operation"], r["end_s"] - r["start_s"])
            for r in rows
        ]
        predictions = [
            None if a is None else {k: a[k] for k in ("operation", "start_s", "end_s", "next_operation")}
            for a in answers
        ]
        for name, matrix in confusion_matrices(truths, predictions).items():
            confusion_png(matrix, f"{name} (rows: truth)", directory / f"confusion_{name}.png")
        per_class_png(self.compute_metrics(rows, answers), directory / "per_class_recall.png")
