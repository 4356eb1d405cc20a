"""The order training reads rows in: a deterministic per-epoch permutation of row ids and a cursor into it. Pure.

Every epoch's order depends only on the seed, the epoch and the number of rows, never on how Ray shards the data,
so a checkpoint needs only ``(epoch, cursor)`` to say exactly which rows come next, whichever worker restarts::

    order = epoch_order(num_rows, seed, epoch)                  # int64[num_rows], the same on every worker
    end = usable_rows(num_rows, world)                         # equal rows per worker (DDP needs equal steps)
    ids = step_ids(order, cursor, rank, world, rows_per_step)  # this rank's rows for the step at ``cursor``

Rank ``r`` reads the rows at global positions ``cursor + r, cursor + r + world, ...``; a step takes
``world * micro_batch * grad_accum`` positions (fewer at the epoch's end) and moves the cursor past them. Rows after
``end`` (fewer than ``world``) sit this epoch out; the next permutation gives them their turn.
"""

from __future__ import annotations

import numpy as np

__all__ = ["epoch_order", "locate", "micro_batches", "step_ids", "usable_rows"]


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(num_rows)`` for ``epoch`` (int64[num_rows]), from ``seed`` and ``epoch`` only."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows).astype(np.int64)


def usable_rows(num_rows: int, world: int) -> int:
    """Rows an epoch uses: the largest multiple of ``world`` not above ``num_rows``."""
    return (num_rows // world) * world


def step_ids(order: np.ndarray, cursor: int, rank: int, world: int, rows_per_step: int) -> np.ndarray:
    """This rank's row ids for the step starting at global position ``cursor`` (int64[<= rows_per_step]).

    Args:
        order: The epoch's order (:func:`epoch_order`).
        cursor: Global positions of this epoch already consumed (a multiple of ``world``).
        rank: This worker's rank.
        world: Number of workers.
        rows_per_step: Rows per worker in a full step (``micro_batch * grad_accum``).

    Returns:
        The ids; empty once the epoch's usable rows are used up.
    """
    end = usable_rows(len(order), world)
    take = min(rows_per_step * world, max(0, end - cursor))
    return order[cursor + rank : cursor + take : world]


def micro_batches(ids: np.ndarray, micro_batch: int) -> list[np.ndarray]:
    """``ids`` in chunks of ``micro_batch`` (the last may be shorter)."""
    return [ids[i : i + micro_batch] for i in range(0, len(ids), micro_batch)]


def locate(ids: np.ndarray, block_sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Block index and offset in the block of each global row id, for rows stored in consecutive blocks.

    Raises:
        IndexError: an id outside ``[0, sum(block_sizes))``.
    """
    starts = np.concatenate([[0], np.cumsum(block_sizes)]).astype(np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= starts[-1]):
        raise IndexError(f"row ids must be in [0, {starts[-1]}), got {ids.min()}..{ids.max()}")
    blocks = np.searchsorted(starts, ids, side="right") - 1
    return blocks, ids - starts[blocks]
