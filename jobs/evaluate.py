"""Evaluate a trained model on held-out subjects, side by side with baselines, and log it to MLflow.

Run on a laptop::

    python jobs/evaluate.py --model <train run id | models:/opsvlm@champion | checkpoint dir> --data data/prepared

Submit to a cluster::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py --model models:/opsvlm@challenger --data /mnt/prepared \
        gpus_per_actor=1 actors=4

Scores OCA, tIoU@0.5, AA@1 and the weighted score (plus macro-F1, class-mean recall, parse failures) for the model,
a majority baseline, the grammar prior, the oracle-operation grammar reference, the zero-shot base model and free
(unconstrained) generation; prints the table and writes ``eval_summary.json`` (metrics + split id) for promotion.
"""

from __future__ import annotations

import argparse
import json
import sys

from opsvlm.config import load_config
from opsvlm.evaluate.run import EvalConfig, evaluate, format_table
from opsvlm.runtime import init_ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="run id, runs:/ or models:/ URI, or checkpoint directory")
    parser.add_argument("--data", help="prepared folder (jobs/prepare_data.py output)")
    parser.add_argument("--config", help="YAML preset with EvalConfig fields")
    parser.add_argument("--summary", help="also write the metrics + split id JSON here (input of jobs/promote.py)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local instance)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. split=val max_clips=50")
    args = parser.parse_args(argv)

    # 1. config
    overrides = [*([f"model={args.model}"] if args.model else []), *([f"data={args.data}"] if args.data else [])]
    config = load_config(EvalConfig, args.config, [*overrides, *args.overrides])
    if not config.model or not config.data:
        parser.error("--model and --data are required")

    # 2. batch inference with Ray Data, metrics, baselines, MLflow run
    init_ray(args.address)
    result = evaluate(config)

    # 3. report
    print(format_table(result.table))
    summary = {
        "metrics": result.metrics,
        "eval_split": result.eval_split,
        "eval_run_id": result.run_id,
        "train_run_id": result.train_run_id,
    }
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
    print(
        json.dumps(
            {
                "eval_run_id": result.run_id,
                "eval_split": result.eval_split,
                "weighted_score": result.metrics["weighted_score"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
