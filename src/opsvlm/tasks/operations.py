"""The OpenPack operation label space, defined once for the whole platform.

OpenPack annotates packing work with 10 operations plus ``8100 Null`` (time with no operation; OpenPack's own
scoring ignores it). Everything else in opsvlm refers to operations through this module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Operation:
    """One OpenPack operation class.

    Attributes:
        id: OpenPack's numeric operation id (100 ... 1000, 8100 for Null).
        name: OpenPack's human-readable name, exactly as it appears in the annotation CSVs.
    """

    id: int
    name: str


OPERATIONS: tuple[Operation, ...] = (
    Operation(100, "Picking"),
    Operation(200, "Relocate Item Label"),
    Operation(300, "Assemble Box"),
    Operation(400, "Insert Items"),
    Operation(500, "Close Box"),
    Operation(600, "Attach Box Label"),
    Operation(700, "Scan Label"),
    Operation(800, "Attach Shipping Label"),
    Operation(900, "Put on Back Table"),
    Operation(1000, "Fill out Order"),
)
NULL = Operation(8100, "Null")
ALL_LABELS: tuple[Operation, ...] = (*OPERATIONS, NULL)

BY_ID: dict[int, Operation] = {op.id: op for op in ALL_LABELS}
BY_NAME: dict[str, Operation] = {op.name: op for op in ALL_LABELS}
LABEL_NAMES: tuple[str, ...] = tuple(op.name for op in ALL_LABELS)

# OpenPack's standard procedure for one box. "Put on Back Table" (900) happens for roughly a quarter of boxes.
PROCEDURE: tuple[int, ...] = (100, 200, 300, 400, 500, 600, 700, 1000, 800, 900)
OPTIONAL_IDS: frozenset[int] = frozenset({900})


def operation_by_id(op_id: int) -> Operation:
    """Look an operation up by its OpenPack id.

    Raises:
        KeyError: with the known ids listed, if ``op_id`` is not an OpenPack operation.
    """
    try:
        return BY_ID[int(op_id)]
    except KeyError:
        raise KeyError(f"unknown OpenPack operation id {op_id!r}; known ids: {sorted(BY_ID)}") from None


def operation_by_name(name: str) -> Operation:
    """Look an operation up by its OpenPack name (exact match).

    Raises:
        KeyError: with the known names listed, if ``name`` is not an OpenPack operation.
    """
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown OpenPack operation {name!r}; known: {list(BY_NAME)}") from None


# --- prompt, target and parsing for the clip task -----------------------------------------------------------------

ANSWER_KEYS = ("operation", "start_s", "end_s", "next_operation")


@dataclass(frozen=True)
class ClipAnswer:
    """What the model says about a clip (validated: labels from the label set, 0 <= start < end <= clip length)."""

    operation: str
    start_s: float
    end_s: float
    next_operation: str


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


def chat_messages(clip_length_s: float, frame_times_s) -> list[dict]:
    """Chat messages (Qwen chat-template format) asking about one clip; the video goes where ``{"type": "video"}``
    stands."""
    return [
        {
            "role": "user",
            "content": [{"type": "video"}, {"type": "text", "text": instruction(clip_length_s, frame_times_s)}],
        }
    ]


def target_text(operation: str, start_s: float, end_s: float, next_operation: str) -> str:
    """The compact JSON answer the model is trained to produce (one decimal: frames are ~0.07 s apart)."""
    return (
        f'{{"operation": "{operation}", "start_s": {start_s:.1f}, "end_s": {end_s:.1f}, '
        f'"next_operation": "{next_operation}"}}'
    )


def parse_answer(text: str, clip_length_s: float) -> ClipAnswer | None:
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
    return ClipAnswer(operation, start_s, end_s, next_operation)
