"""What a task is: a label set, a prompt and target, a constrained answer, parsing, and metrics. Pure Python.

The platform's machinery (Ray Data preparation, Ray Train, constrained decoding, evaluation, the registry, Serve) is
the same for every task; a task only says what the model is asked and what a valid answer is. Two tasks implement it:
``operations`` (video clips of packing work, :mod:`opsvlm.tasks.operations`) and ``inspection`` (condition of an
object in an inspection image, :mod:`opsvlm.tasks.inspection`).

An *input* is whatever one model call sees for one example: its pixels (``pixels``: frames of a clip or one image)
plus the context the prompt needs (clip length and frame times; the target object's box and its neighbours). A
*row* is a prepared dataset row (Parquet); :meth:`Task.input_of` and :meth:`Task.target_of` turn it into an input and
its target answer.

The answer is a sequence of *slots*: each is a choice among a few strings (a fixed piece of JSON is a choice of one),
and what a slot allows may depend on what earlier slots chose (``end_s > start_s``). Constrained decoding
(:class:`opsvlm.inference.AnswerConstraint`) walks these slots; the slots that choose a label also give per-label
probabilities.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["TASK_MODULES", "Task", "get_task", "register_task"]


class Task(ABC):
    """One task on the platform. Subclasses are small, stateless and picklable (they travel to Ray workers).

    Attributes:
        name: Registry key, stored in every checkpoint (``model.json``) so evaluation and serving pick the task.
        media: ``"video"`` or ``"image"``: the placeholder in the prompt and how the processor gets the pixels.
        labels: The label set of the answer's label slots.
        label_slots: ``{slot index: answer field}`` for the slots that choose a label from ``labels``.
        headline_metric: The metric model promotion compares (higher is better).
        table_metrics: Columns of the evaluation table, in order; each gets a 95% bootstrap interval.
        unit: What one example is, plural (``clips``, ``objects``), for counts in summaries.
        id_field: The prepared rows' unique id column.
        rows_dir: Folder of the prepared rows inside a prepared dataset (``<rows_dir>/split=<split>/*.parquet``).
    """

    name: ClassVar[str]
    media: ClassVar[str]
    labels: ClassVar[tuple[str, ...]]
    label_slots: ClassVar[dict[int, str]]
    headline_metric: ClassVar[str]
    table_metrics: ClassVar[tuple[str, ...]]
    unit: ClassVar[str] = "examples"
    id_field: ClassVar[str] = "example_id"
    rows_dir: ClassVar[str] = "examples"

    # --- prompt and target ------------------------------------------------------------------------------------

    @abstractmethod
    def instruction(self, example: Any) -> str:
        """The user instruction for one input (the text after the media placeholder)."""

    def messages(self, example: Any) -> list[dict]:
        """Chat messages in the Qwen chat-template format; the media goes where ``{"type": <media>}`` stands."""
        content = [{"type": self.media}, {"type": "text", "text": self.instruction(example)}]
        return [{"role": "user", "content": content}]

    @abstractmethod
    def input_of(self, row: Mapping[str, Any]) -> Any:
        """The model input (pixels + prompt context) of a prepared dataset row."""

    @abstractmethod
    def target_of(self, row: Mapping[str, Any]) -> str:
        """The answer text the model is trained to produce for a prepared row."""

    @abstractmethod
    def class_of(self, row: Mapping[str, Any]) -> str:
        """The row's class for class weighting and oversampling (a member of ``labels``)."""

    @abstractmethod
    def processor_kwargs(self, examples: Sequence[Any]) -> dict[str, Any]:
        """Keyword arguments that hand the pixels of ``examples`` to a Qwen2-VL-family processor."""

    # --- the answer -------------------------------------------------------------------------------------------

    @abstractmethod
    def answer_slot(self, index: int, chosen: Sequence[str], example: Any) -> Sequence[str] | None:
        """Strings allowed in slot ``index`` given the strings ``chosen`` in the slots before it.

        Returns:
            The allowed strings (one for a fixed piece), or ``None`` past the answer's last slot.
        """

    @abstractmethod
    def answer_from_slots(
        self, chosen: Sequence[str], label_scores: Mapping[int, Mapping[str, float]], text: str
    ) -> Any:
        """The typed answer from the strings chosen in every slot.

        Args:
            chosen: One string per slot.
            label_scores: ``{slot index: {label: probability}}`` for every slot in ``label_slots``.
            text: The generated text.
        """

    @abstractmethod
    def parse_answer(self, text: str, example: Any) -> Any | None:
        """Parse free text into a validated answer; ``None`` when it is not a valid answer."""

    # --- metrics ----------------------------------------------------------------------------------------------

    @abstractmethod
    def compute_metrics(self, rows: Sequence[Mapping[str, Any]], answers: Sequence[Any | None]) -> dict[str, float]:
        """Metrics of answers against the truth in prepared rows (``None`` answers count as wrong).

        Answers are typed answers or their ``to_dict()`` mappings (what evaluation stores and reads back).
        """

    # --- evaluation hooks (one evaluation flow serves every task) ----------------------------------------------

    @abstractmethod
    def group_of(self, row: Mapping[str, Any]) -> str:
        """The resampling unit of a row for bootstrap intervals: examples of one group are not independent."""

    def baselines(
        self,
        rows: Sequence[Mapping[str, Any]],
        answers: Sequence[Mapping[str, Any] | None],
        train_rows: Sequence[Mapping[str, Any]],
        manifest: Mapping[str, Any],
    ) -> dict[str, list[Mapping[str, Any] | None]]:
        """Answers of reference systems on the evaluated rows, scored beside the model with the same metrics.

        A baseline gets the same information the model gets (what the prompt states, the training split), no more.

        Args:
            rows: [n] evaluated rows (labels only, no pixels).
            answers: [n] the model's answers (mappings, ``None`` when unparseable), for baselines built on them.
            train_rows: The training split's rows (labels only).
            manifest: The prepared dataset's ``manifest.json``.

        Returns:
            ``{system name: [n] answers}``; names are short ids without spaces (they become summary keys).
        """
        return {}

    def eval_variants(self) -> dict[str, Callable[[dict], dict]]:
        """Other evaluation conditions, scored as extra systems: ``{name: row -> row as the model sees it}``."""
        return {}

    def write_plots(
        self, rows: Sequence[Mapping[str, Any]], answers: Sequence[Mapping[str, Any] | None], directory: Path
    ) -> None:
        """Write the task's evaluation plots (PNG) into ``directory`` (logged with the evaluation run)."""
        return None


_TASKS: dict[str, type[Task]] = {}
# where each task lives: imported on first use, not at package import, so nothing runs at import time
TASK_MODULES = {"operations": "opsvlm.tasks.operations", "inspection": "opsvlm.tasks.inspection"}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available to :func:`get_task` under ``cls.name``."""
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
    """The task called ``name`` (``operations`` or ``inspection``).

    Raises:
        KeyError: naming the known tasks, for an unknown name.
    """
    import importlib

    if name not in TASK_MODULES:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASK_MODULES)}")
    importlib.import_module(TASK_MODULES[name])  # registers the task class
    return _TASKS[name]()
