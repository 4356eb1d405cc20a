"""Evaluation plots of the operations task (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from opsvlm.tasks.operations.labels import LABEL_NAMES
from opsvlm.tasks.operations.metrics import CONFUSION_COLUMNS

__all__ = [
    "confusion_png",
    "per_class_png",
]


def confusion_png(matrix: np.ndarray, title: str, path: Path) -> None:
    """A confusion matrix as a heat map.

    Args:
        matrix: int64[11, 12] counts, rows = truth (``LABEL_NAMES``), columns = ``CONFUSION_COLUMNS``.
        title: Plot title.
        path: PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CONFUSION_COLUMNS)), CONFUSION_COLUMNS, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(LABEL_NAMES)), LABEL_NAMES, fontsize=7)
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            ax.text(j, i, str(value), ha="center", va="center", fontsize=6)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def per_class_png(metrics: Mapping[str, float], path: Path) -> None:
    """Per-class recall of the operation (blue) and of the next operation (orange) as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k in metrics if k.startswith(("oca_recall/", "aa_recall/")))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(len(keys)), [metrics[k] for k in keys], color=["C0" if k.startswith("oca") else "C1" for k in keys])
    ax.set_xticks(range(len(keys)), keys, rotation=75, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title("per-class recall (blue: operation, orange: next operation)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
