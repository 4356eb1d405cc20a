"""OpenPack's operation label set: the 10 operations plus ``8100 Null``, their ids, names and the standard procedure.

A leaf module (no opsvlm imports): the operations task, its metrics and baselines, its data readers and the timeline
code all take the label set from here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ALL_LABELS",
    "BY_ID",
    "BY_NAME",
    "LABEL_NAMES",
    "NULL",
    "OPERATIONS",
    "OPTIONAL_IDS",
    "PROCEDURE",
    "Operation",
    "operation_by_id",
    "operation_by_name",
]


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
