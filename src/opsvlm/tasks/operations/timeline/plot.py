"""Gantt-style picture of a recording's operation timeline (matplotlib, Agg; imported lazily)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from opsvlm.tasks.operations.timeline.grid import LABELS, NULL_INDEX, runs_of
from opsvlm.tasks.operations.timeline.session import SessionAnnotation


def _colours() -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colours = [cmap(i) for i in range(10)]
    colours.insert(NULL_INDEX, (0.85, 0.85, 0.85, 1.0))
    return colours


def gantt_png(annotation: SessionAnnotation, path: str | Path, title: str | None = None) -> Path:
    """Draw truth (when there is one) above prediction, one coloured bar per segment, and the per-second confidence.

    Args:
        annotation: The annotated recording.
        path: Destination PNG.
        title: Figure title (default: subject/session and the decoder).

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = _colours()
    starts = annotation.grid.starts_s
    minutes = annotation.seconds / 60.0
    rows = [("prediction", annotation.labels)]
    if annotation.truth_labels is not None:
        rows.insert(0, ("truth", annotation.truth_labels))
    fig, (ax, conf_ax) = plt.subplots(
        2,
        1,
        figsize=(min(24.0, 6.0 + 2.0 * minutes), 1.4 + 0.6 * len(rows) + 1.2),
        sharex=True,
        gridspec_kw={"height_ratios": [0.6 * len(rows) + 0.4, 1.0]},
    )
    for y, (_, labels) in enumerate(reversed(rows)):
        for run in runs_of(labels):
            ax.broken_barh(
                [(starts[run.start], run.length)], (y - 0.4, 0.8), facecolors=colours[run.label], linewidth=0
            )
    for f in annotation.figures:  # box starts
        ax.axvline(f.start_s, color="black", linewidth=0.4, alpha=0.5)
    ax.set_yticks(range(len(rows)), [name for name, _ in reversed(rows)])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_title(title or f"{annotation.subject}/{annotation.session} ({annotation.decoder})".lstrip("/"))
    used = sorted(set(np.unique(annotation.labels)) | set(np.unique(rows[0][1])))
    ax.legend(
        handles=[Patch(color=colours[i], label=LABELS[i]) for i in used],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.02),
        ncol=min(6, len(used)),
        fontsize=7,
        frameon=False,
    )
    conf_ax.plot(starts + 0.5, annotation.confidence, linewidth=0.8, color="black")
    conf_ax.set_ylim(0, 1)
    conf_ax.set_ylabel("confidence", fontsize=8)
    conf_ax.set_xlabel("session time (s)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = [
    "gantt_png",
]
