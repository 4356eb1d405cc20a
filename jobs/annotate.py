"""Annotate whole recordings with a trained model: operation timelines, per-box figures and, with truth, scores.

Run on a laptop (starts a local Ray on 127.0.0.1)::

    python jobs/annotate.py --model models:/opsvlm@champion --source data/synthetic --out data/timelines

Submit to a cluster::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/annotate.py --model models:/opsvlm@champion --source /mnt/openpack --out /mnt/timelines \
        actors=4 gpus_per_actor=1 batch_size=32

``--source`` takes OpenPack-layout roots (sessions with their operations CSV as truth), video files, or folders of
video files, and may be repeated. Per recording the output folder gets ``<stem>.csv`` (``openpack-operations``
schema), ``<stem>-1hz.csv`` (``openpack-operations-1hz`` schema), ``<stem>.json`` (the timeline) and ``<stem>.png``
(Gantt: truth above prediction); plus ``figures.csv`` (per box and session), ``grammar.json``, ``scores.json`` and
``summary.json``. With truth, the scores (OpenPack frame macro-F1, edit score, F1@{10,25,50}, next-operation accuracy
at boundaries, 95% intervals by session) of the model with the grammar, the model with per-second argmax and the
majority baseline are printed and logged to MLflow in an annotation run linked to the model. Any other field of
``opsvlm.annotate.AnnotateConfig`` can be set as ``key=value``. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from opsvlm.annotate import AnnotateConfig, annotate, score_table
from opsvlm.config import load_config
from opsvlm.runtime import init_ray

LAST_LINE_KEYS = (
    "sessions",
    "seconds_annotated",
    "realtime_factor",
    "frame_macro_f1",
    "frame_macro_f1_ci95",
    "edit_score",
    "f1_at_50",
    "majority_frame_macro_f1",
    "argmax_frame_macro_f1",
    "next_accuracy_at_boundaries",
    "run_id",
)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="run id, runs:/ or models:/ URI, or checkpoint directory")
    parser.add_argument("--source", action="append", help="OpenPack-layout root, video file or folder (repeatable)")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--window-s", type=float, help="window length (default: the model's clip length)")
    parser.add_argument("--stride-s", type=float, help="seconds between windows (default: half the window)")
    parser.add_argument("--config", help="YAML preset with AnnotateConfig fields")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. decoder=argmax batch_size=16")
    args = parser.parse_args(argv)

    # 1. config: preset, then flags, then key=value overrides
    overrides = [
        *([f"model={args.model}"] if args.model else []),
        *([f"sources={json.dumps(args.source)}"] if args.source else []),
        *([f"out={args.out}"] if args.out else []),
        *([f"window_s={args.window_s}"] if args.window_s else []),
        *([f"stride_s={args.stride_s}"] if args.stride_s else []),
        *args.overrides,
    ]
    config = load_config(AnnotateConfig, args.config, overrides)
    if not config.model or not config.sources or not config.out:
        parser.error("--model, --source and --out are required")

    # 2. Ray Data over the recordings, then fusion, grammar, files, scores and the MLflow run
    init_ray(args.address)
    result = annotate(config)

    # 3. report
    summary = result.summary
    for problem in summary["failed"] + summary["skipped"]:
        print(f"annotate: {problem['recording']}: {problem['reason']}: {problem['detail']}", file=sys.stderr)
    if result.scores:
        print(score_table(result.scores))
    print(json.dumps({k: _finite(summary[k]) for k in LAST_LINE_KEYS if k in summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
