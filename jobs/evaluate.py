"""Evaluate a trained model on one split, next to baselines, with 95% intervals, and log it to MLflow.

Run on a laptop::

    python jobs/evaluate.py --model <train run id | models:/opsvlm@champion | checkpoint dir> --data data/prepared

Submit to a cluster::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py --model models:/opsvlm@challenger --data /mnt/prepared split=test \
        gpus_per_actor=1 actors=4

Choose on validation, report on test: ``split=val`` (the default) is the *selection* split that promotion and every
comparison use; ``split=test`` is the *report* split, scored and published, never used to choose. The task comes from
the model: operations models get OCA, tIoU@0.5 (all clips and boundary clips), AA@1 and the weighted score;
inspection models macro-F1 (all classes and the non-vegetation ones), accuracy and condition macro-F1. Each figure
has a 95% bootstrap interval by group (session blocks, images), beside the task's baselines, the base model without
the adapter and free generation. Prints the table and, with ``--summary``, writes the stored summary (the input of
``jobs/promote.py``); the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opsvlm.config import load_config
from opsvlm.evaluate.run import MODEL_SYSTEM, EvalConfig, evaluate, format_table
from opsvlm.runtime import init_ray
from opsvlm.tasks.base import get_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="run id, runs:/ or models:/ URI, or checkpoint directory")
    parser.add_argument("--data", help="prepared folder (jobs/prepare_data.py output)")
    parser.add_argument("--config", help="YAML preset with EvalConfig fields")
    parser.add_argument("--summary", help="also write the stored evaluation summary here (input of jobs/promote.py)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs and worker output")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. split=test max_examples=50")
    args = parser.parse_args(argv)

    # 1. config
    overrides = [*([f"model={args.model}"] if args.model else []), *([f"data={args.data}"] if args.data else [])]
    config = load_config(EvalConfig, args.config, [*overrides, *args.overrides])
    if not config.model or not config.data:
        parser.error("--model and --data are required")

    # 2. batch inference with Ray Data, metrics with intervals, baselines, MLflow run
    init_ray(args.address, verbose=args.verbose)
    result = evaluate(config, progress=lambda line: print(f"evaluate: {line}", flush=True))

    # 3. report: the table, the stored summary, one JSON line
    task = get_task(result.task)
    print(f"{result.split} split ({result.role}), n={result.n} {task.unit}, {result.groups} resampling groups")
    print(format_table(result.table, task.table_metrics, result.intervals))
    if args.summary:
        Path(args.summary).write_text(json.dumps(result.summary, indent=2))
    metric = task.headline_metric
    print(
        json.dumps(
            {
                "eval_run_id": result.run_id,
                "task": result.task,
                "split": result.split,
                "role": result.role,
                "eval_split": result.eval_split,
                f"n_{task.unit}": result.n,
                metric: result.metrics[metric],
                f"{metric}_ci95": result.intervals[MODEL_SYSTEM].get(metric),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
