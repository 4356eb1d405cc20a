"""Quantization study: one fine-tuned model unquantized, LLM.int8 and NF4 on the same examples, logged to MLflow.

Run on a laptop (CPU; bitsandbytes' CPU backend runs both int8 and nf4, slowly)::

    python jobs/quant_study.py --model <train run id | models:/opsvlm@champion | checkpoint dir> \
        --data data/prepared max_examples=32

Submit to a cluster (the study runs in the job's driver process, which ``--entrypoint-num-gpus`` places on a GPU node;
no Ray tasks or actors are started)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . --entrypoint-num-gpus 1 -- \
        python jobs/quant_study.py --model models:/opsvlm@champion --data /mnt/prepared --split test \
        max_examples=500 batch_size=16

Prints the table (headline metric, retention vs unquantized, agreement with the unquantized answers, latency per
example p50/p90, loaded / saved / quantized-part size) and one JSON line with the MLflow run id. Modes that cannot
run on the device are skipped with their reason (in the table and the run's ``opsvlm.quant.<mode>.skipped`` tag).
Any field of ``opsvlm.evaluate.quant_study.QuantStudyConfig`` can be overridden as ``key=value``, e.g.
``modes=[none,nf4]`` or ``tracking.experiment=quant``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from opsvlm.config import load_config
from opsvlm.evaluate.quant_study import QuantStudyConfig, format_table, quantization_study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="run id, runs:/ or models:/ URI, or checkpoint directory")
    parser.add_argument("--data", help="prepared folder (jobs/prepare_data.py output)")
    parser.add_argument("--split", help="split to score (default: test)")
    parser.add_argument("--config", help="YAML preset with QuantStudyConfig fields")
    parser.add_argument("--summary", help="also write the study (table, metrics, skipped modes) as JSON here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_examples=64 modes=[none,int8]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # 1. config
    flags = {"model": args.model, "data": args.data, "split": args.split}
    overrides = [f"{key}={value}" for key, value in flags.items() if value]
    config = load_config(QuantStudyConfig, args.config, [*overrides, *args.overrides])
    if not config.model or not config.data:
        parser.error("--model and --data are required")

    # 2. every mode on the same examples, one MLflow run
    study = quantization_study(config)

    # 3. report
    print(format_table(study["table"], study["headline_metric"]))
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(study, f, indent=2, default=str)
    print(
        json.dumps(
            {
                "quant_study_run_id": study["run_id"],
                "train_run_id": study["train_run_id"],
                "examples": study["examples"],
                "skipped": study["skipped"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
