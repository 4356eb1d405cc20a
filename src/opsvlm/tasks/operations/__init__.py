"""The ``operations`` task, one folder: label set, prompt and answer (``task``), clip metrics (``metrics``), baselines
(``baselines``). Importing it registers the task."""

from opsvlm.tasks.operations.labels import (
    ALL_LABELS,
    BY_ID,
    BY_NAME,
    LABEL_NAMES,
    NULL,
    OPERATIONS,
    OPTIONAL_IDS,
    PROCEDURE,
    Operation,
    operation_by_id,
    operation_by_name,
)
from opsvlm.tasks.operations.task import (
    ANSWER_PARTS,
    ClipInput,
    OperationsTask,
    Prediction,
    instruction,
    parse_answer,
    sampled_fps,
    target_text,
    time_choices,
    video_metadata,
)

__all__ = [
    "ALL_LABELS",
    "ANSWER_PARTS",
    "BY_ID",
    "BY_NAME",
    "LABEL_NAMES",
    "NULL",
    "OPERATIONS",
    "OPTIONAL_IDS",
    "PROCEDURE",
    "ClipInput",
    "Operation",
    "OperationsTask",
    "Prediction",
    "instruction",
    "operation_by_id",
    "operation_by_name",
    "parse_answer",
    "sampled_fps",
    "target_text",
    "time_choices",
    "video_metadata",
]
